"""What a reply reports besides its payload -- the ClientApp's timestamps and, under DP, its
spending and ledger state -- is checked like the payload: a malformed or out-of-place report
rejects only that client's reply (nothing of it recorded), it never raises out of the
ServerApp. Found by mutating real replies at the ServerApp's reply check."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord

from secure_fedora.core.config import ExperimentConfig
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import (
    MSG_EVALUATE,
    MSG_FINALIZE,
    MSG_ROUND,
    DeployError,
    RunSettings,
)
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    run_config,
    task_identity,
    tiny_config,
    with_methods,
)
from tests.secure_fedora.runtimes.flower.test_reply_schema import _resigned

pytestmark = pytest.mark.usefixtures("task_identity")
_ = task_identity  # the fixture, imported for use above

Change = Callable[[Any], None]


def _run(root: Path, cfg: ExperimentConfig,
         tamper: dict[tuple[int, int, str], Callable[[Message, Message], Message]]
         ) -> dict[str, Any]:
    rc = run_config(cfg, root, **{"result-dir": str(root / "res")})
    grid = InMemoryGrid(root / "nodes", rc, cfg.data.num_clients, tamper_reply=tamper)
    with contextlib.redirect_stdout(io.StringIO()):
        return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)


def _metrics(**values: Any) -> Change:
    """Set (a value) or drop (None) metrics of a reply."""
    def apply(content: Any) -> None:
        metrics = dict(content["metrics"])
        for key, value in values.items():
            if value is None:
                metrics.pop(key, None)
            else:
                metrics[key] = value
        content["metrics"] = MetricRecord(metrics)
    return apply


def _unsigned(change: Change) -> Callable[[Message, Message], Message]:
    """Client 0's reply changed by ``change`` and left without its envelope."""
    def tamper(request: Message, reply: Message) -> Message:
        content = reply.content
        del content["envelope"]
        change(content)
        return Message(content, reply_to=request)
    return tamper


def _rejected_client_0_round_1(results: dict[str, Any]) -> str:
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    [rejection] = results["security"]["rejections"]
    assert (rejection["client"], rejection["round"]) == (0, 1)
    return str(rejection["detail"])


@pytest.mark.parametrize("change", [
    _metrics(**{"t-handler-start": None}),
    _metrics(**{"t-handler-end": [1, 2]}),
    _metrics(**{"t-process-start": float("nan")}),
], ids=["missing", "list", "nan"])
def test_a_reply_with_malformed_timestamps_is_left_out_of_the_timing_only(tmp_path, change):
    """The exchange read every reply's timestamps before its envelope was verified: a reply
    whose ``t-handler-start`` was missing or held a list raised KeyError or TypeError out of
    the ServerApp, so any node answering a message (even with an unsigned reply) stopped the
    run. Signed by its client, such a reply is now taken (the timestamps are not part of what
    it releases) and only left out of the timing breakdown; unsigned, it is rejected."""
    signed = _run(tmp_path / "signed", with_methods(tiny_config(rounds=2), "fedavg"),
                  {(0, 1, MSG_ROUND): _resigned(tmp_path / "signed", _settings(tmp_path / "signed"),
                                                0, change)})
    assert [r["replied"] for r in signed["rounds"]] == [3, 3]
    assert not signed["security"]["rejections"]
    unsigned = _run(tmp_path / "unsigned", with_methods(tiny_config(rounds=2), "fedavg"),
                    {(0, 1, MSG_ROUND): _unsigned(change)})
    assert "no envelope record" in _rejected_client_0_round_1(unsigned)


def _settings(root: Path, cfg: ExperimentConfig | None = None) -> RunSettings:
    cfg = cfg or with_methods(tiny_config(rounds=2), "fedavg")
    return RunSettings.from_run_config(run_config(cfg, root, **{"result-dir": str(root / "res")}))


@pytest.mark.parametrize("change, detail", [
    (_metrics(**{"ledger-entries": float("inf")}), "ledger-entries must be an integer >= 0"),
    (_metrics(**{"ledger-entries": 1.5}), "ledger-entries must be an integer >= 0"),
    (_metrics(**{"epsilon-spent": float("nan")}), "epsilon-spent must be a finite number >= 0"),
    (_metrics(**{"epsilon-spent": -1.0}), "epsilon-spent must be a finite number >= 0"),
    (_metrics(**{"epsilon-budget": float("inf")}), "epsilon-budget must be a finite number > 0"),
    (_metrics(**{"epsilon-spent": None}), "lacks its epsilon-spent report"),
], ids=["entries-inf", "entries-fraction", "spent-nan", "spent-negative", "budget-inf",
        "no-report"])
def test_a_dp_reply_with_a_malformed_spending_report_is_rejected(tmp_path, change, detail):
    """``int(ledger-entries)`` of a signed DP reply raised OverflowError out of the ServerApp
    for an infinite count (only KeyError, TypeError and ValueError were caught); a NaN or
    negative ``epsilon-spent``, an infinite budget or a fractional count was recorded as the
    client's spending (and the count truncated), and a reply without any report was taken
    without one. Each is now that client's rejected reply; the others' rounds go on."""
    cfg = with_methods(dp_config(rounds=2), "fedavg")
    results = _run(tmp_path, cfg,
                   {(0, 1, MSG_ROUND): _resigned(tmp_path, _settings(tmp_path, cfg), 0, change)})
    assert detail in _rejected_client_0_round_1(results)
    [row] = [r for r in results["privacy"]["fedavg"]["clients"] if r["client"] == "client-000"]
    assert row["epsilon_spent"] is None or row["epsilon_spent"] >= 0


def _with_ledger(plan: bool) -> Change:
    def apply(content: Any) -> None:
        _metrics(**{"epsilon-spent": 1.0, "epsilon-budget": 8.0, "ledger-entries": 1})(content)
        content["ledger"] = ConfigRecord({"entries": 1, "head": "a" * 64,
                                          **({"noise-multiplier": 1.0, "accountant": "pld"}
                                             if plan else {})})
    return apply


@pytest.mark.parametrize("plan", [False, True], ids=["spending", "spending-and-plan"])
def test_a_spending_report_in_a_run_without_dp_is_rejected(tmp_path, plan):
    """A run without DP recorded a client's (signed) spending report as its ledger state, then
    stated it back to that client in every later request; with a plan in it the ServerApp
    raised KeyError (no plan is calibrated without DP). It is now a rejected reply."""
    results = _run(tmp_path, with_methods(tiny_config(rounds=2), "fedavg"),
                   {(0, 1, MSG_ROUND): _resigned(tmp_path, _settings(tmp_path), 0,
                                                 _with_ledger(plan))})
    assert "the run has no DP" in _rejected_client_0_round_1(results)
    assert "privacy" not in results or not results["privacy"]
    json.loads((tmp_path / "res" / "results.json").read_text())


def _client_info(**values: Any) -> Change:
    def apply(content: Any) -> None:
        content["client"] = ConfigRecord({**dict(content["client"]), **values})
    return apply


@pytest.mark.parametrize("values, detail", [
    ({"train": float("inf")}, "train must be an integer >= 0, not inf"),
    ({"train": -5}, "train must be an integer >= 0, not -5"),
    ({"test": 1.7}, "test must be an integer >= 0, not 1.7"),
    ({"num-classes": float("inf")}, "num-classes must be an integer >= 1, not inf"),
], ids=["train-inf", "train-negative", "test-fraction", "classes-inf"])
def test_a_hello_reply_with_malformed_split_sizes_is_rejected(tmp_path, values, detail):
    """A signed first-contact reply stating an infinite split size or class count raised
    OverflowError out of the ServerApp; a negative size was recorded (results.json's client
    rows stated ``train: -5``) and a fractional one truncated. Each is now a malformed hello
    reply: the client is not identified and the run stops for it, naming the reason."""
    from secure_fedora.runtimes.flower.protocol import MSG_HELLO, DeployError

    cfg = with_methods(tiny_config(rounds=1), "fedavg")
    tamper = {(0, 0, MSG_HELLO): _resigned(tmp_path, _settings(tmp_path, cfg), 0,
                                           _client_info(**values))}
    with pytest.raises(DeployError, match="needs every client's identification") as err:
        _run(tmp_path, cfg, tamper)
    assert f"hello reply malformed ({detail})" in str(err.value)


@pytest.mark.parametrize("values, detail", [
    ({"meta-train": float("inf")}, "'meta-train' is not a partition fact"),
    ({"meta-id": 7}, "'meta-id' is not a partition fact"),
    ({"meta-rotation_degrees": float("nan")}, "meta-rotation_degrees 'nan'"),
    ({"meta-group": "g" * 5000}, "meta-group"),
    ({"meta-classes": [0, 99]}, "meta-classes"),
    ({"multilabel": "no"}, "multilabel must be true or false"),
], ids=["meta-train", "meta-id", "meta-nan", "meta-long", "meta-classes", "multilabel-text"])
def test_a_hello_reply_with_malformed_partition_facts_is_rejected(tmp_path, values, detail):
    """A signed first-contact reply's ``meta-<key>`` entries were recorded unchecked, after the
    split sizes were: ``meta-train: inf`` overwrote the checked size and raised OverflowError
    out of the ServerApp, ``meta-id`` replaced the client's id in results.json, and a NaN,
    a 5000-character text or a class the data does not have became a client row's fact; a
    ``multilabel`` of ``"no"`` was read as true. Each is now a malformed hello reply."""
    from secure_fedora.runtimes.flower.protocol import MSG_HELLO, DeployError

    cfg = with_methods(dp_config(rounds=1), "fedavg")
    tamper = {(0, 0, MSG_HELLO): _resigned(tmp_path, _settings(tmp_path, cfg), 0,
                                           _client_info(**values))}
    with pytest.raises(DeployError, match="needs every client's identification") as err:
        _run(tmp_path, cfg, tamper)
    assert "hello reply malformed" in str(err.value) and detail in str(err.value)


def _ledger(**values: Any) -> Change:
    def apply(content: Any) -> None:
        record = dict(content["ledger"])
        for key, value in values.items():
            if value is None:
                record.pop(key, None)
            else:
                record[key] = value
        content["ledger"] = ConfigRecord(record)
    return apply


def _payload_entry(content: Any) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    content["payload"] = ArrayRecord({"global": Array(np.zeros(4, np.float32))})


@pytest.mark.parametrize("change, detail", [
    (_metrics(**{"epsilon-budget": 1e18}), "is not the client's configured budget 8.0"),
    (_ledger(entries=2**62), "differ from ledger-entries"),
    (_ledger(**{"noise-multiplier": None}), "without noise-multiplier"),
    (_payload_entry, "evaluation reply carries entries ['global']"),
], ids=["budget", "entries", "partial-plan", "payload-entry"])
def test_a_dp_evaluation_reply_with_a_report_no_client_makes_is_rejected(tmp_path, change,
                                                                          detail):
    """A signed DP evaluation reply stating another budget than the config's was recorded
    (results.json's privacy row stated ``epsilon_budget: 1e+18``); a ledger record whose
    entry count differed from ``ledger-entries`` recorded the record's count (a later, true
    report then read as a ledger that went back and stopped the run); a plan without its
    noise multiplier was recorded as no plan; an evaluation reply carrying a payload entry
    was taken and the entry pinned the stage's schema, unread. Each is now a rejected reply:
    the client keeps its last metrics and report."""
    cfg = with_methods(dp_config(rounds=2), "fedavg")
    results = _run(tmp_path, cfg,
                   {(0, 1, MSG_EVALUATE): _resigned(tmp_path, _settings(tmp_path, cfg), 0,
                                                    change)})
    [rejection] = results["security"]["rejections"]
    assert (rejection["client"], rejection["round"]) == (0, 1)
    assert detail in rejection["detail"]
    assert [r["evaluated"] for r in results["rounds"]] == [2, 3]
    rows = results["privacy"]["fedavg"]["clients"]
    assert all(r["epsilon_budget"] == 8.0 for r in rows)


def _spent_above(step: Callable[[float], float]) -> Change:
    """The reply's epsilon-spent raised by ``step``, its ledger state left as it is."""
    def apply(content: Any) -> None:
        spent = float(content["metrics"]["epsilon-spent"])
        _metrics(**{"epsilon-spent": step(spent)})(content)
    return apply


@pytest.mark.parametrize("rnd, kind, step", [
    (1, MSG_EVALUATE, lambda e: e * (1 + 1e-9)),
    (3, MSG_FINALIZE, lambda e: e + 0.05),
], ids=["evaluate-1e-9", "finalize"])
def test_a_signed_reply_stating_another_spend_for_the_same_ledger_stops_the_run(
        tmp_path, rnd, kind, step):
    """Client 0's evaluation reply of round 1 (its ledger as its round reply stated it) or its
    finalize reply (as its last evaluation reply) states a higher epsilon, within the budget,
    for the same entries and head: it was recorded, and results.json could state a spend its
    ledger does not account (a client's epsilon is its ledger replayed, bit for bit). Now the
    run stops naming the client, and no results.json is written."""
    cfg = with_methods(dp_config(rounds=2), "fedavg")
    tamper = {(0, rnd, kind): _resigned(tmp_path, _settings(tmp_path, cfg), 0,
                                        _spent_above(step))}
    with pytest.raises(DeployError, match=r"fedavg: client client-000 \(node \d+\) reported "
                                          r"another spend for the same ledger \(epsilon .* for "
                                          r"the \d+ entries it had reported with epsilon .*\) in "
                                          r"its (evaluate|finalize) reply"):
        _run(tmp_path, cfg, tamper)
    assert not (tmp_path / "res" / "results.json").exists()
