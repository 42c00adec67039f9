"""A client that signs its reply correctly can still send a wrong one: the ServerApp checks
every reply against what the method's replies carry (entries, shapes, counts) and every metric
against [0, 1], rejecting only that client; a run in which no training reply was ever accepted
because every one failed stops instead of reporting the initial model."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.envelopes import MessageSecurity
from secure_fedora.runtimes.flower.protocol import (
    MSG_EVALUATE,
    MSG_FINALIZE,
    MSG_ROUND,
    DeployError,
    RunSettings,
)
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    run_config,
    task_identity,
    tiny_config,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("task_identity")
_ = task_identity  # the fixture, imported for use above


def _run(root: Path, method: str, tamper: dict | None = None, grids: list | None = None,
         client_errors: str = "withheld", **training: Any) -> dict[str, Any]:
    cfg = with_methods(tiny_config(**{"rounds": 2, **training}), method)
    if client_errors != "withheld":  # the error texts reach the server whole (nodes allow it)
        cfg = parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                            "security": {"client_errors": client_errors}})
    rc = run_config(cfg, root, **{"result-dir": str(root / "res")})
    settings = RunSettings.from_run_config(rc)
    grid = InMemoryGrid(root / "nodes", rc, cfg.data.num_clients,
                        node_errors=dict.fromkeys(range(cfg.data.num_clients), client_errors),
                        tamper_reply={k: _resigned(root, settings, k[0], f)
                                      for k, f in (tamper or {}).items()})
    if grids is not None:
        grids.append(grid)
    with contextlib.redirect_stdout(io.StringIO()):
        return server_app.run_federation(grid, settings, 42)


def _refused_in_both_runtimes(root: Path, name: str, method: Any, message: str) -> None:
    """Register ``method`` as ``name`` and require a one-round run of it to stop with a
    ContractError matching ``message`` in process and on the in-memory Flower grid."""
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.core.registry import METHODS
    from tests.secure_fedora.runtimes.flower.deploy_support import in_process

    METHODS.register(name, method)
    try:
        with pytest.raises(ContractError, match=message):
            in_process(with_methods(tiny_config(rounds=1), name), root / "inproc", name)
        with pytest.raises(ContractError, match=message):
            _run(root, name, rounds=1)
    finally:
        METHODS.unregister(name)


def _resigned(root: Path, settings: RunSettings, client: int,
              change: Callable[[Any], None]) -> Callable[[Message, Message], Message]:
    """Client ``client``'s real reply, changed by ``change`` and signed again with its own key
    (so it passes every envelope check)."""
    def tamper(request: Message, reply: Message) -> Message:
        content = reply.content
        rnd = json.loads(request.content["envelope"][f"client-{client:03d}"])["round"]
        del content["envelope"]
        change(content)
        MessageSecurity.for_client(root / "ids" / f"client-{client:03d}", root / f"sig{client}",
                                   42, settings.config_hash, client, 3
                                   ).sign(content, request.metadata.message_type, ["server"], rnd,
                                          reply=True)
        return Message(content, reply_to=request)
    return tamper


def _array(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Any], None]:
    def apply(content: Any) -> None:
        arrays = {k: content["payload"][k].numpy() for k in content["payload"].keys()}
        arrays[name] = change(arrays[name])
        content["payload"] = ArrayRecord({k: Array(np.array(v, copy=True)) for k, v in arrays.items()})
    return apply


def _drop(name: str) -> Callable[[Any], None]:
    def apply(content: Any) -> None:
        arrays = {k: content["payload"][k].numpy() for k in content["payload"].keys() if k != name}
        content["payload"] = ArrayRecord({k: Array(np.array(v, copy=True)) for k, v in arrays.items()})
    return apply


def _metric(name: str, value: float) -> Callable[[Any], None]:
    def apply(content: Any) -> None:
        metrics = dict(content["metrics"])
        metrics[name] = value
        content["metrics"] = MetricRecord(metrics)
    return apply


@pytest.mark.parametrize("change", [
    _array("num_examples", lambda a: a.reshape(1)),  # would have pinned the shape for all
    _array("theta", lambda a: a[:10]),
    _array("theta", lambda a: a.astype(np.float64)),
    _array("num_examples", lambda a: np.array(-128)),  # weights summing to 0: a NaN model
    _array("num_examples", lambda a: np.array(0)),
    _drop("theta"),
], ids=["num_examples-shape", "theta-shape", "theta-dtype", "num_examples-negative",
        "num_examples-zero", "theta-missing"])
def test_a_wrong_reply_from_the_first_client_rejects_only_that_client(tmp_path, change):
    results = _run(tmp_path, "fedavg", {(0, 1, MSG_ROUND): change})
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    rejected = [(x["client"], x["round"]) for x in results["security"]["rejections"]]
    assert len(rejected) == 1 and rejected[0][1] == 1


@pytest.mark.parametrize("name, value", [("test-metric", float("nan")),
                                         ("val-metric", float("inf")), ("test-metric", 50.0)])
def test_an_invalid_metric_is_an_event_and_results_stay_valid_json(tmp_path, name, value):
    results = _run(tmp_path, "fedavg", {(0, 1, MSG_EVALUATE): _metric(name, value)})
    text = (tmp_path / "res" / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    assert all(0.0 <= r["test_mean"] <= 1.0 for r in results["rounds"])
    assert any("outside [0, 1]" in e["event"] for e in results["events"])
    # the refused metric is not round 1's: 'evaluated' (and the means) leave client 0 out
    assert [r["evaluated"] for r in results["rounds"]] == [2, 3]


def test_a_fine_tuned_metric_outside_0_1_is_left_out_of_the_ft_row(tmp_path, caplog,
                                                                    monkeypatch):
    """Client 0's finalize reply (round 3, after 2 rounds) says 1.5: it was averaged into
    fedavg_ft; client 1's fine-tuned test metric is NaN: its reply could not leave and the
    run stopped. Both are null there, listed as missing and named in a warning, and the
    row's figures are client 2's."""
    import dataclasses

    from secure_fedora.algorithms import methods
    from secure_fedora.runtimes.inprocess import build_clients

    target = build_clients(with_methods(tiny_config(rounds=2), "fedavg"))[1].test_x
    real = methods.evaluate

    def nan_for_client_1(flat, row, x, y, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(flat, row, x, y, *args, **kwargs)
        same = x.shape == target.shape and torch.equal(x.cpu(), target)
        return dataclasses.replace(out, metric=float("nan")) if same else out

    monkeypatch.setattr(methods, "evaluate", nan_for_client_1)
    over = _array("finetuned_test_metric", lambda a: np.array(1.5, dtype=a.dtype))
    with caplog.at_level("WARNING", logger="secure_fedora.algorithms.methods"):
        results = _run(tmp_path, "fedavg", {(0, 3, MSG_FINALIZE): over})
    tuned = results["methods"]["fedavg_ft"]["selected"]
    assert tuned["per_client"][:2] == [None, None] and tuned["missing_clients"] == [0, 1]
    assert tuned["mean"] == tuned["min"] == tuned["max"] == tuned["per_client"][2]
    assert results["methods"]["fedavg"]["extra"]["finetuned_left_out"] == [0, 1]
    for client, value in ((0, r"1\.5"), (1, r"-1\.0")):
        assert re.search(rf"client {client}: fine-tuned test metric {value} is no number in "
                         r"\[0, 1\]; left out of fedavg_ft", caplog.text)


def test_a_run_whose_every_training_failed_stops(tmp_path):
    with pytest.raises(DeployError, match="no client's training reply was accepted in any of "
                                          "the 2 rounds"):
        # weight decay 0: lr * weight_decay would reach the local step bound the config
        # refuses; the data gradient alone diverges at this lr
        _run(tmp_path, "fedavg", lr=1e6, weight_decay=0.0)


def test_a_run_whose_every_training_reply_was_rejected_stops(tmp_path):
    wrong = _array("theta", lambda a: a[:10])
    with pytest.raises(DeployError, match=r"no client's training reply was accepted .* failed or "
                                          "were rejected"):
        _run(tmp_path, "fedavg", {(c, r, MSG_ROUND): wrong for c in range(3) for r in (1, 2)})


def _plugin_reply(change: str) -> type:
    """A plug-in method (the contract tests' Toy) whose client 0 changes its ``theta`` in
    round 1 as ``change`` says."""
    from tests.secure_fedora.algorithms.test_contract_checks import Toy

    class Plugin(Toy):
        def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
            reply = dict(super().client_update(i, rnd, message))
            if (i, rnd) == (0, 1):
                theta = reply.pop("theta")
                if change != "missing":
                    reply["theta"] = {"shape": theta[:10], "nan": theta * float("nan"),
                                      "float64": theta.double()}.get(change, theta)
                if change == "extra":
                    reply["extra"] = torch.zeros(1)
            return reply
    return Plugin


@pytest.mark.parametrize("change, problem", [
    ("shape", r"entry 'theta' is torch.float32 \(10,\), the exchange carries torch.float32"),
    ("missing", r"reply carries \['steps'\], the method's round replies carry \['steps', 'theta'\]"),
    ("nan", "entry 'theta' contains non-finite values"),
    ("float64", r"entry 'theta' is torch.float64 \(\d+,\), the exchange carries torch.float32"),
])
def test_a_plugin_reply_is_refused_alike_in_both_runtimes(tmp_path, change, problem):
    """Both runtimes check a reply with ReplyRules.check_received before any of it is used: in
    process the run stops with a ContractError naming the method, client and entry (the
    method's own code made the reply; before, a raw RuntimeError or KeyError from aggregate, or
    a float64 model averaged in); the Flower server rejects that client's reply (it takes no
    part in the round) with the same reason, or its ClientApp refuses to send it."""
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.core.registry import METHODS
    from tests.secure_fedora.runtimes.flower.deploy_support import in_process

    name = f"plugin_{change}_x"
    METHODS.register(name, _plugin_reply(change))
    try:
        with pytest.raises(ContractError, match=f"method '{name}': client 0's round (reply )?"
                                                f"{problem}"):
            in_process(with_methods(tiny_config(rounds=2), name), tmp_path / "inproc", name)
        results = _run(tmp_path, name, client_errors="full")
    finally:
        METHODS.unregister(name)
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    [event] = [e for e in results["events"] if e["round"] == 1]
    assert event["client"] == 0 and "counts as not taking part" in event["event"]
    assert re.search(problem, event["event"]), event


@pytest.mark.parametrize("change, problem", [
    ("shape", r"entry 'theta' is torch.float32 \(10,\), the exchange carries torch.float32"),
    ("missing", r"reply carries \['steps'\], the method's round replies carry \['steps', 'theta'\]"),
    ("nan", "entry 'theta' contains non-finite values"),
    ("float64", r"entry 'theta' is torch.float64 \(\d+,\), the exchange carries torch.float32"),
    ("extra", r"reply carries \['extra', 'steps', 'theta'\], the method's round replies carry"),
])
def test_a_malformed_plugin_reply_fails_in_the_client_app_before_it_leaves(tmp_path, change,
                                                                           problem):
    """The ClientApp checked its reply only for undeclared entries in a private run: a reply
    the server would refuse (a wrong shape or dtype, a missing entry, an extra one without DP)
    was journaled as a release, saved as answered, signed and sent, and only the server's
    rejection named it (a NaN one failed in the payload encoder with a bare ValueError after it
    was journaled). The ClientApp now runs the server's check (check_received) on it first: a
    ContractError naming the method, the client, the exchange and the entry, sent as an error
    reply; nothing is journaled; the server still takes the other clients' replies."""
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.core.registry import METHODS
    from secure_fedora.runtimes.flower.state import ReleaseJournal

    name = f"client_checks_{change}_x"
    METHODS.register(name, _plugin_reply(change))
    grids: list[InMemoryGrid] = []
    try:
        results = _run(tmp_path, name, grids=grids, client_errors="full")
    finally:
        METHODS.unregister(name)
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    [(client, kind, err)] = grids[0].errors
    assert (client, kind) == (0, MSG_ROUND) and isinstance(err, ContractError)
    assert re.match(f"method '{name}': client 0's round (reply )?{problem}", str(err)), err
    [event] = [e for e in results["events"] if e["round"] == 1]
    assert event["event"].startswith("error reply (")
    assert f"ContractError: method '{name}': client 0's round" in event["event"]
    assert not results["security"]["rejections"]  # refused by the client, not the server
    journal = ReleaseJournal(tmp_path / "nodes" / "node-0" / "runs" / "42" / "releases.jsonl")
    assert [e["round"] for e in journal.entries() if e["kind"] == f"{name}/round"] == [2]


def test_a_non_finite_evaluation_row_is_refused_in_both_runtimes(tmp_path):
    """A plug-in whose client_eval_row returned NaN was scored silently (the argmax of NaN
    logits is class 0) and its metric reported in results.json; both runtimes now refuse the
    row before evaluating it, naming the method and the client: in process the run stops, on
    Flower that client's evaluation is an error reply, and a client that never evaluated
    stops the run instead of reporting a made-up metric."""
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.core.registry import METHODS
    from tests.secure_fedora.algorithms.test_contract_checks import Toy
    from tests.secure_fedora.runtimes.flower.deploy_support import in_process

    class NanRow(Toy):
        def client_eval_row(self, i, message=None):  # type: ignore[no-untyped-def]
            row = super().client_eval_row(i, message)
            return row * float("nan") if i == 1 else row

    name = "nan_eval_row_x"
    METHODS.register(name, NanRow)
    try:
        with pytest.raises(ContractError, match=f"method '{name}': client 1's client_eval_row "
                                                r"returned a row with \d+ non-finite value"):
            in_process(with_methods(tiny_config(rounds=2), name), tmp_path / "inproc", name)
        with pytest.raises(DeployError, match=r"clients \[1\] never reported an evaluation.*"
                                              f"method '{name}': client 1's client_eval_row"):
            _run(tmp_path, name, client_errors="full")
    finally:
        METHODS.unregister(name)
    assert not (tmp_path / "res" / "results.json").exists()


class _Tagged(torch.Tensor):
    """A user's torch.Tensor subclass (module level: a checkpoint pickles it by name)."""


def test_a_tensor_subclass_in_a_client_state_is_refused_when_written_in_both_runtimes(tmp_path):
    """A client_state_dict field that is a torch.Tensor subclass was written (the in-process
    checkpoint, a Flower node's run state), then refused by the safe loader on resume ('corrupt
    or holds objects other than tensors'): in process the run could not be resumed, on Flower
    the node failed its next message without naming the cause. Both runtimes now refuse it
    when the state is written, a ContractError naming the method, the client and the field; a
    torch.nn.Parameter, which the loader reads back, is kept."""
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.core.registry import METHODS
    from tests.secure_fedora.algorithms.test_contract_checks import Toy
    from tests.secure_fedora.runtimes.flower.deploy_support import in_process

    class Tagged(Toy):
        def client_state_dict(self, i):  # type: ignore[no-untyped-def]
            state = {**super().client_state_dict(i), "param": torch.nn.Parameter(torch.ones(2))}
            return {**state, "tag": torch.ones(2).as_subclass(_Tagged)} if i == 1 else state

    name = "tagged_state_x"
    problem = (f"method '{name}': client 1's client state field 'tag' holds a _Tagged "
               r"\(a torch.Tensor subclass\), which a checkpoint cannot load back")
    METHODS.register(name, Tagged)
    try:
        with pytest.raises(ContractError, match=problem):
            in_process(with_methods(tiny_config(rounds=1), name), tmp_path / "inproc", name)
        with pytest.raises(DeployError, match=rf"clients \[1\] never reported an evaluation.*"
                                              f"ContractError: {problem}"):
            _run(tmp_path, name, client_errors="full", rounds=1)
    finally:
        METHODS.unregister(name)


@pytest.mark.parametrize("entry, value, problem", [
    ("bad name", torch.zeros(1), "has a name that is not a plain identifier"),
    ("extra", torch.zeros(2, dtype=torch.bfloat16), "has dtype torch.bfloat16"),
    ("extra", torch.zeros(1, 1, 1, 1, 1), "has 5 dimensions"),
    ("extra", torch.tensor([float("nan")]), "contains non-finite values"),
])
def test_a_message_entry_flower_cannot_send_is_refused_in_both_runtimes(tmp_path, entry, value,
                                                                        problem):
    """A round message entry the Flower runtime cannot move (a name that is no plain
    identifier, bfloat16, over 4 dimensions, non-finite) ran in process, and stopped the
    ServerApp with a raw ValueError from the payload encoder; both runtimes now refuse it
    before it is sent, naming the method, the client and the entry (and, for a reply, the
    in-process check took what Flower's ClientApp refuses to encode)."""
    from tests.secure_fedora.algorithms.test_contract_checks import Toy

    class Sends(Toy):
        def configure(self, rnd, participants):  # type: ignore[no-untyped-def]
            return {i: {**m, entry: value} for i, m in super().configure(rnd, participants).items()}

    name = "sends_unfit_x"
    message = rf"method '{name}': its round message to client \d: entry '{entry}' {problem}"
    _refused_in_both_runtimes(tmp_path, name, Sends, message)


def _unfit_exchange(stage: str, value: Any) -> type:
    """The contract tests' Toy with a setup or finalize exchange, whose ``stage`` messages
    (setup, evaluate or finalize) carry ``value`` as entry ``extra``."""
    from tests.secure_fedora.algorithms.test_contract_checks import Toy

    def messages(clients: Any, base: Callable[[int], dict] = lambda i: {}) -> dict:
        return {i: {**base(i), "extra": value} for i in clients}

    class Unfit(Toy):
        def setup_messages(self):  # type: ignore[no-untyped-def]
            return messages(range(self.ctx.num_clients)) if stage == "setup" else {}

        def client_setup(self, i, message):  # type: ignore[no-untyped-def]
            return {}

        def evaluation_messages(self, rnd, clients):  # type: ignore[no-untyped-def]
            if stage != "evaluate":
                return super().evaluation_messages(rnd, clients)
            return messages(clients, lambda i: {"global": self.global_params})

        def finalize_messages(self):  # type: ignore[no-untyped-def]
            return messages(range(self.ctx.num_clients)) if stage == "finalize" else {}

        def client_finalize(self, i, message):  # type: ignore[no-untyped-def]
            return {}
    return Unfit


@pytest.mark.parametrize("stage", ["setup", "evaluate", "finalize"])
@pytest.mark.parametrize("value, problem", [
    (1.5, "must be a dict of tensors; entry 'extra' is a float"),
    (torch.tensor([float("nan")]), "entry 'extra' contains non-finite values"),
    (torch.zeros(2, dtype=torch.bfloat16), "entry 'extra' has dtype torch.bfloat16"),
])
def test_an_unfit_setup_evaluation_or_finalize_message_is_refused_in_both_runtimes(
        tmp_path, stage, value, problem):
    """Only round messages were checked: a plug-in's setup, evaluation or finalize message
    holding a non-tensor or non-finite entry ran in process (the client half got it) and on
    Flower stopped the ServerApp with a raw ValueError from the payload encoder. Both runtimes now check every exchange's messages with check_messages before any
    is sent, with the same ContractError naming the method, the exchange and the client."""

    name = f"unfit_{stage}_x"
    message = rf"^method '{name}': its {stage} message to client 0:? {problem}"
    _refused_in_both_runtimes(tmp_path, name, _unfit_exchange(stage, value), message)
    state = tmp_path / "nodes" / "node-0" / "runs" / "42" / name / "client.pt"
    assert state.exists() == (stage != "setup")  # a refused setup exchange reached no client


@pytest.mark.parametrize("stage", ["setup", "finalize"])
def test_setup_and_finalize_messages_address_only_the_run_s_clients(tmp_path, stage):
    """A setup or finalize message to a client the run does not have reached the Flower
    ServerApp's node lookup (a raw KeyError); both runtimes now refuse it by name."""

    class Beyond(_unfit_exchange(stage, torch.zeros(1))):  # type: ignore[misc]
        def setup_messages(self):  # type: ignore[no-untyped-def]
            return {7: {}} if stage == "setup" else {}

        def finalize_messages(self):  # type: ignore[no-untyped-def]
            return {7: {}} if stage == "finalize" else {}

    name = f"beyond_{stage}_x"
    message = (rf"method '{name}': the {stage} messages address client\(s\) \[7\] outside the "
               rf"{stage} exchange's clients \[0, 1, 2\]")
    _refused_in_both_runtimes(tmp_path, name, Beyond, message)


@pytest.mark.parametrize("stage", ["round", "finalize"])
@pytest.mark.parametrize("entries, size, problem", [
    (70, 1, r"holds 7[01] entries, at most 64"),
    (1, 5 * 1024 * 1024, r"holds \d+ bytes, at most 16777216 for a model of \d+ parameters"),
])
def test_a_message_over_the_payload_caps_is_refused_in_both_runtimes(tmp_path, stage, entries,
                                                                     size, problem):
    """A message of more entries or bytes than one payload may carry ran in process and
    stopped the Flower ServerApp with a raw ValueError from the payload encoder; both runtimes
    now refuse it before it is sent (check_messages with the model's size), naming the
    method, the exchange and the client."""

    big = {f"e{k}": torch.zeros(size) for k in range(entries)}

    class Large(_unfit_exchange("none", torch.zeros(1))):  # type: ignore[misc]
        def configure(self, rnd, participants):  # type: ignore[no-untyped-def]
            messages = super().configure(rnd, participants)
            return {i: {**m, **big} for i, m in messages.items()} if stage == "round" else messages

        def finalize_messages(self):  # type: ignore[no-untyped-def]
            return {i: dict(big) for i in range(self.ctx.num_clients)} if stage == "finalize" else {}

    name = f"large_{stage}_x"
    message = rf"^method '{name}': its {stage} message to client 0 {problem}"
    _refused_in_both_runtimes(tmp_path, name, Large, message)


def test_a_reply_over_the_payload_caps_fails_in_the_client_app(tmp_path):
    """A reply larger than one payload may carry failed in the ClientApp's payload encoder
    (a bare ValueError) after it was journaled as a release; it is now refused before, by the
    reply check both runtimes run (ReplySchema), naming the method, the client and the
    exchange."""
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.core.registry import METHODS
    from tests.secure_fedora.algorithms.test_contract_checks import Toy
    from tests.secure_fedora.runtimes.flower.deploy_support import in_process

    class Declares(Toy):
        @classmethod
        def reply_entries(cls, cfg, stage):  # type: ignore[no-untyped-def]
            return {"theta": "", "steps": "", "big": ""} if stage == "round" else {}

        def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
            big = torch.zeros(5 * 1024 * 1024 if (i, rnd) == (0, 1) else 1)
            return {**super().client_update(i, rnd, message), "big": big}

    name = "large_reply_x"
    METHODS.register(name, Declares)
    problem = r"method 'large_reply_x': client 0's round reply holds \d+ bytes, at most 16777216"
    grids: list[InMemoryGrid] = []
    try:
        with pytest.raises(ContractError, match=problem):
            in_process(with_methods(tiny_config(rounds=1), name), tmp_path / "inproc", name)
        results = _run(tmp_path, name, grids=grids, rounds=1)
    finally:
        METHODS.unregister(name)
    [(client, _, err)] = grids[0].errors
    assert client == 0 and isinstance(err, ContractError) and re.match(problem, str(err))
    assert results["rounds"][0]["replied"] == 2


def _fedavg_then(method: str, **over: Any) -> Any:
    """The tiny one-round config running FedAvg, then ``method`` (``over``: top-level keys)."""
    from secure_fedora.core.config import parse_config

    cfg = with_methods(tiny_config(rounds=1), "fedavg", method)
    return parse_config({**cfg.model_dump(mode="json", exclude_none=True), **over})


def _refused_before_any_method(root: Path, cfg: Any, error: type, message: str) -> None:
    """Require ``cfg`` to stop with ``error`` matching ``message`` before any method runs: in
    process (DP: no ledger, key store or run directory made) and on the in-memory Flower grid
    (no message after the first contact)."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.flower.protocol import MSG_HELLO
    from secure_fedora.runtimes.inprocess import Simulation

    private = parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                            "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3}})
    with pytest.raises(error, match=message):
        Simulation(private, root / "inproc", keystore=root / "keystore").run()
    assert not (root / "inproc").exists() and not (root / "keystore").exists()
    rc = run_config(cfg, root, **{"result-dir": str(root / "res")})
    grid = InMemoryGrid(root / "nodes", rc, cfg.data.num_clients)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(error, match=message):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)
    assert {m.metadata.message_type for m in grid.sent} == {MSG_HELLO}


def test_more_ifca_clusters_than_a_message_carries_are_refused_before_any_method_runs(
        tmp_path):
    """IFCA sends all its cluster models in every message. More than one message can carry
    were refused only by the payload cap at IFCA's round 1: after the methods before it had
    run and, under DP, after its round-1 releases were admitted to the ledgers. Both runtimes
    now refuse them once the model is built, before any method runs, naming the key, the
    model's parameter count and the largest cluster count."""
    from secure_fedora.algorithms.baselines import BaselineConfigError

    cfg = _fedavg_then("ifca", baselines={"ifca": {"num_clusters": 36, "selection_split": "val"}})
    _refused_before_any_method(tmp_path, cfg, BaselineConfigError,
                               r"^baselines\.ifca\.num_clusters = 36: .* at most 35 models of "
                               r"118,282 parameters \(float32\); use at most 35 clusters$")


def test_a_plug_in_refusing_the_model_is_refused_before_any_method_runs(tmp_path):
    """A plug-in's check_model_size hook is asked by both runtimes once the model is built,
    before any method runs; a plain ValueError it raises is a ConfigError naming it."""
    from secure_fedora.core.config import ConfigError
    from secure_fedora.core.registry import METHODS
    from tests.secure_fedora.algorithms.test_contract_checks import Toy

    class Small(Toy):
        @classmethod
        def check_model_size(cls, cfg, num_params, dtype):  # type: ignore[no-untyped-def]
            if num_params > 1000:
                raise ValueError(f"small.models holds at most 1000 parameters ({dtype})")

    name = "small_models_x"
    METHODS.register(name, Small)
    try:
        _refused_before_any_method(
            tmp_path, _fedavg_then(name), ConfigError,
            rf"^method '{name}' cannot run on a model of 118,282 parameters: small\.models holds "
            r"at most 1000 parameters \(torch\.float32\)$")
    finally:
        METHODS.unregister(name)


def test_a_fedora_q_above_the_summary_width_is_refused_before_any_method_runs(tmp_path):
    """FEDORA's q above its summary width (input features + classes) was refused only when
    FEDORA set up: with methods ["local", "fedora"] under DP, Local had trained and closed its
    ledgers and FEDORA's ledgers and keys were opened first (and the fixed config, with another
    hash, could not resume them). Both runtimes now refuse it from the data's facts before any
    method runs: in process nothing is written (no run directory, key store or ledger), on the
    Flower grid nothing follows the first contact and no client opens a ledger."""
    from secure_fedora.core.config import ConfigError, parse_config
    from secure_fedora.runtimes.flower.protocol import MSG_HELLO
    from secure_fedora.runtimes.inprocess import Simulation
    from tests.secure_fedora.runtimes.flower.deploy_support import dp_config

    base = with_methods(dp_config(rounds=1, noise="reproducible"), "local", "fedora")
    cfg = parse_config({**base.model_dump(mode="json", exclude_none=True),
                        "fedora": {"k": 2, "q": 795, "relatedness": "noised"}})
    message = (r"^method 'fedora' cannot run on this data: fedora\.q = 795 is above the summary "
               r"width 794 \(784 input features \+ 10 classes\)")
    with pytest.raises(ConfigError, match=message):
        Simulation(cfg, tmp_path / "inproc", keystore=tmp_path / "keystore").run()
    assert not (tmp_path / "inproc").exists() and not (tmp_path / "keystore").exists()
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": True, "compare-methods": True})
    grid = InMemoryGrid(tmp_path / "nodes", rc, cfg.data.num_clients)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(ConfigError, match=message):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)
    assert {m.metadata.message_type for m in grid.sent} == {MSG_HELLO}
    written = {p.relative_to(tmp_path / "nodes").parts[1:]
               for p in (tmp_path / "nodes").rglob("*") if p.is_file()}
    assert {w[:3] for w in written if w[0] == "runs"} == {("runs", "42", "hello")}  # nonces
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())
