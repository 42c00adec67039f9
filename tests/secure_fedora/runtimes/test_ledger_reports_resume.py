"""The in-process server's record of each DP client's last accepted ledger report (its
evaluation replies') is part of the checkpoint: a resumed run goes on checking that every
report extends it, so a report going back across a resume is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from privacy.ledger import LedgerError
from secure_fedora.runtimes.inprocess import (
    CheckpointError,
    Simulation,
    load_checkpoint,
    save_checkpoint,
)
from secure_fedora.secure import private
from tests.secure_fedora.core.crash_support import crashes_at
from tests.secure_fedora.runtimes.test_crash_resume import clients, config  # noqa: F401


def _crash_after_round_2(tmp_path: Path, clients: Any) -> tuple[Any, Simulation]:  # noqa: F811
    """A DP FedAvg run of 3 rounds killed once round 2's checkpoint is written."""
    cfg = config(["fedavg"], True, rounds=3)
    sim = Simulation(cfg, tmp_path, clients=clients)
    with crashes_at("checkpoint_written@2"):
        sim.run()
    return cfg, sim


def test_a_ledger_report_going_back_across_a_resume_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clients: Any) -> None:  # noqa: F811
    """Killed after round 2's checkpoint, resumed: client 1's round-3 report claims fewer
    entries than the round-2 report the server accepted before the kill. The record lived in
    memory only, so the resumed process started it afresh and accepted the report; it is in
    the checkpoint now, and the resumed run stops naming the client."""
    cfg, crashed = _crash_after_round_2(tmp_path, clients)
    before = crashed._ledger_reports["fedavg"][1]["ledger_entries"]  # its round-2 report
    real = private.ledger_report

    def report(client: Any) -> list[float]:
        values = real(client)
        if client.client_id.endswith("-001"):
            assert values[2] > before
            values = [*values[:2], float(before - 1), *values[3:]]
        return values

    monkeypatch.setattr(private, "ledger_report", report)
    with pytest.raises(LedgerError, match=rf"client 1 reported a ledger that went back "
                                          rf"\({before - 1} entries after {before}\)"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)


def test_an_unreadable_ledger_record_refuses_the_resume(tmp_path: Path, clients: Any) -> None:  # noqa: F811
    """A checkpoint whose record is not [client, report] pairs is refused by name, and the
    untouched record resumes to completion."""
    cfg, _ = _crash_after_round_2(tmp_path, clients)
    path = tmp_path / "checkpoints" / "fedavg.pt"
    good = path.read_bytes()
    state = load_checkpoint(path)
    state["ledger_reports"][0][1]["ledger_entries"] = "many"
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="ledger_reports"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    path.write_bytes(good)
    results = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert torch.isfinite(torch.tensor(results["methods"]["fedavg"]["final"]["mean"]))
