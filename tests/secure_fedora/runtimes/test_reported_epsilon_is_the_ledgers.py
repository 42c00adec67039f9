"""A DP client's reported epsilon is a function of its ledger: for every accountant (rdp, pld,
prv, auto), with the built-in mechanisms or a plug-in one, the epsilon each client reports with
its evaluation replies equals, bit for bit, the epsilon of an accountant replayed from the
ledger lines it had written at that point, in an uninterrupted run and across a crash and
resume (after a checkpoint, or inside a round whose entries the resumed run consumes). This is
what lets the server refuse a report whose ledger (entry count and head) is unchanged but
whose epsilon differs (:func:`~secure_fedora.secure.private.ledger_went_back`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from privacy import accounting
from privacy.ledger import _read_raw, line_hash, replay_accountant
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.inprocess import Simulation
from secure_fedora.secure import private
from tests.secure_fedora.core.crash_support import crashes_at
from tests.secure_fedora.runtimes.flower.deploy_support import TINY
from tests.secure_fedora.runtimes.test_crash_resume import clients, config_dict  # noqa: F401
from tests.secure_fedora.secure.mechanism_plugin import MECHANISM, LabelShareFedAvg

Report = tuple[Path, float, float, int, str]


def _clear_caches() -> None:
    """Forget every cached accounting result, so that a replay computes from scratch."""
    for name in dir(accounting):
        clear = getattr(getattr(accounting, name), "cache_clear", None)
        if callable(clear):
            clear()


def _run(cfg: Any, run_dir: Path, monkeypatch: pytest.MonkeyPatch, crash: str | None,
         **kwargs: Any) -> list[Report]:
    """Run ``cfg`` (killed at ``crash`` and resumed, when given); every ledger report a
    client made, as (ledger file, delta, epsilon, entries, head)."""
    seen: list[Report] = []
    real = private.ledger_report

    def report(client: Any) -> list[float]:
        values = real(client)
        got = private.read_ledger_report(values)
        seen.append((client.ledger.path, client.budget.delta, got["epsilon_spent"],
                     got["ledger_entries"], got["ledger_head"]))
        return values

    monkeypatch.setattr(private, "ledger_report", report)
    if crash is not None:
        with crashes_at(crash):
            Simulation(cfg, run_dir, **kwargs).run()
    Simulation(cfg, run_dir, **kwargs).run(resume=crash is not None)
    return seen


def _check(seen: list[Report], least: int) -> None:
    """Each report's epsilon is that of the ledger's first ``entries`` lines (whose last
    hashes to the head), replayed from scratch, bit for bit; so one (file, entries, head)
    never comes with two epsilons."""
    assert len(seen) >= least
    assert len({epsilon for _, _, epsilon, _, _ in seen}) > 1  # the spend grew
    _clear_caches()
    by_state: dict[tuple[Path, int, str], set[str]] = {}
    for path, delta, epsilon, count, head in seen:
        lines, torn = _read_raw(path)
        assert not torn and count <= len(lines)
        # the ledger the client reported is the file's first ``count`` lines (append-only)
        assert count == 0 or line_hash(lines[count - 1]) == head
        replayed = replay_accountant([json.loads(line) for line in lines[:count]])
        again = replayed.epsilon(delta) if replayed.history else 0.0
        assert again.hex() == epsilon.hex(), (path.name, count)
        by_state.setdefault((path, count, head), set()).add(epsilon.hex())
    assert all(len(spent) == 1 for spent in by_state.values())


@pytest.mark.parametrize("crash", [None, "checkpoint_written@1", "train@5"],
                         ids=["uninterrupted", "resumed", "resumed-mid-round"])
@pytest.mark.parametrize("accountant", ["rdp", "pld", "prv", "auto"])
def test_each_reported_epsilon_is_the_replayed_ledgers_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clients: Any,  # noqa: F811
        accountant: str, crash: str | None) -> None:
    """FedAvg and FEDORA with noised relatedness, 3 clients, 2 rounds."""
    doc = config_dict(["fedavg", "fedora"], True, rounds=2)
    doc["privacy"]["accountant"] = accountant
    seen = _run(parse_config(doc), tmp_path, monkeypatch, crash, clients=clients)
    _check(seen, 12)  # 3 clients, 2 methods, 2 rounds (more with a resume)


@pytest.fixture
def plug_in_method() -> Iterator[str]:
    name = "epsilon_replay_label_share"
    METHODS.register(name, LabelShareFedAvg)
    try:
        yield name
    finally:
        METHODS.unregister(name)


@pytest.mark.parametrize("crash", [None, "train@5"], ids=["uninterrupted", "resumed-mid-round"])
def test_a_plug_in_mechanisms_run_reports_its_replayed_ledgers_epsilon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plug_in_method: str,
        crash: str | None) -> None:
    """FedAvg releasing a plug-in Gaussian mechanism each round, private validation, auto."""
    doc = json.loads(json.dumps(TINY))
    doc["methods"] = [plug_in_method]
    doc["training"]["rounds"] = 2
    doc["data"]["validation"] = "private"
    doc["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible",
                      "mechanisms": {MECHANISM: {"budget_fraction": 0.1}}}
    seen = _run(parse_config(doc), tmp_path / "run", monkeypatch, crash,
                keystore=tmp_path / "keys")
    _check(seen, 6)


def test_a_report_stating_another_spend_for_the_same_ledger_stops_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clients: Any) -> None:  # noqa: F811
    """Client 1's second evaluation reply re-states its first one's ledger (entries and head)
    with an epsilon higher by a relative 1e-9, within its budget: it was accepted and became the
    client's latest report. The server now stops the run naming the client."""
    from privacy.ledger import LedgerError

    first: list[list[float]] = []
    real = private.ledger_report

    def report(client: Any) -> list[float]:
        values = real(client)
        if not client.client_id.endswith("-001"):
            return values
        if not first:
            first.append(values)
            return values
        return [first[0][0] * (1 + 1e-9), *first[0][1:]]

    monkeypatch.setattr(private, "ledger_report", report)
    cfg = parse_config(config_dict(["fedavg"], True, rounds=2))
    with pytest.raises(LedgerError, match=r"fedavg: client 1 reported another spend for the "
                                          r"same ledger \(epsilon .* for the \d+ entries it had "
                                          r"reported with epsilon .*\) in its evaluation reply "
                                          r"of round 2: "):
        Simulation(cfg, tmp_path, clients=clients).run()
    assert not (tmp_path / "results.json").exists()
