"""A run that failed at its final evaluation (a client could not answer it, asked twice) is
resumed once that client's node is fixed: the resume asks the clients the checkpoint does not
record as answering it, they answer from their saved state, and the run ends with the results
of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from privacy.ledger import LedgerWriter, read_ledger
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE, DeployError, RunSettings
from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT
from secure_fedora.runtimes.flower.state import ClientRunState
from secure_fedora.runtimes.inprocess import load_checkpoint, save_checkpoint
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)

ROUNDS = 2
FAILING = 0  # the client whose node cannot save its final evaluation


def _config(setting: str) -> Any:
    if setting != "plain":
        cfg = dp_config(rounds=ROUNDS, noise="reproducible")
        if setting in ("dp", "dp-close"):  # private validation: the final round is reported
            return cfg
        # public validation: the round of the best mean validation metric is reported. With
        # this seed client 0's final validation metric is below its round-1 one, so round 2's
        # mean without it beats its mean with it: a selection made from the partial final
        # evaluation would keep client 0's older test metric as the selected one
        return cfg.model_copy(update={"seed": 2, "data": cfg.data.model_copy(
            update={"validation": "public"})})
    # without DP a client that misses only the final evaluation keeps its earlier metric and
    # the run completes; evaluated only in the final round, it has none and the run fails
    cfg = with_methods(tiny_config(rounds=ROUNDS), "fedavg")
    return cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"every": 3})})


def _settings(cfg: Any, root: Path, **over: Any) -> dict[str, Any]:
    (root / "res").mkdir(parents=True, exist_ok=True)
    return run_config(cfg, root, **{"reproducible-dp-noise": True, "round-timeout": 5.0,
                                    "result-dir": str(root / "res"), **over})


def _run(rc: dict[str, Any], grid: InMemoryGrid, run_id: int = 42) -> dict[str, Any]:
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), run_id)  # type: ignore[arg-type]


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if not ("timing" in k or "seconds" in k or k.endswith("_s"))}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _node_records(root: Path, method: str) -> list[Any]:
    """Every node's release journal and (DP) ledger of ``method`` without what differs
    between any two runs (timestamps, so hashes and signatures)."""
    stamped = {"timestamp", "prev_hash", "signature"}
    out: list[Any] = []
    for c in range(3):
        run = root / "nodes" / f"node-{c}" / "runs" / "42"
        out.append(len((run / "releases.jsonl").read_text().splitlines()))
        ledger = run / method / f"client-{c:03d}.jsonl"
        if ledger.exists():
            out.append([{k: v for k, v in e.items() if k not in stamped}
                        for e in read_ledger(ledger)])
    return out


def _fail_at_the_final_evaluation(root: Path, monkeypatch: pytest.MonkeyPatch, cfg: Any,
                                  at_close: bool = False) -> tuple[dict[str, Any], list[bool]]:
    """Run ``cfg`` in ``root`` with client FAILING's node unable to save its state (or, with
    ``at_close``, to append its ledger's close entry, its answer saved) from its final
    evaluation message on (its replies: "OSError (details withheld)"): the run fails there.
    Returns the resume's run config and the switch that keeps the node broken."""
    broken = [False]
    save, close = ClientRunState.save, LedgerWriter.close_run

    def unwritable(self: ClientRunState, path: Path) -> None:
        if broken[0] and self.client_id == FAILING and not at_close:
            raise OSError(30, "Read-only file system", str(path))
        save(self, path)

    def unwritable_ledger(self: LedgerWriter, **entry: Any) -> Any:
        if broken[0] and self.path.name == f"client-{FAILING:03d}.jsonl":
            raise OSError(30, "Read-only file system", str(self.path))
        return close(self, **entry)

    def break_disk(message: Message) -> Message:
        broken[0] = True
        return message

    monkeypatch.setattr(ClientRunState, "save", unwritable)
    if at_close:
        monkeypatch.setattr(LedgerWriter, "close_run", unwritable_ledger)
    rc = _settings(cfg, root)
    grid = InMemoryGrid(root / "nodes", rc, 3,
                        tamper_request={(FAILING, ROUNDS, MSG_EVALUATE): break_disk})
    with pytest.raises(DeployError, match=rf"clients \[{FAILING}\] {_why(cfg)}.*--resume"):
        _run(rc, grid)
    assert [kind for c, kind, _ in grid.errors if c == FAILING] == [MSG_EVALUATE, MSG_EVALUATE]
    assert not (root / "res" / "results.json").exists()
    return {**rc, "resume": 42}, broken


def _why(cfg: Any) -> str:
    return ("did not answer the final evaluation .round 2., asked twice" if cfg.privacy.enabled
            else "never reported an evaluation")


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("setting", ["dp", "dp-close", "dp-selected-by-validation", "plain"])
def test_a_run_failed_at_its_final_evaluation_resumes_to_an_uninterrupted_runs_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    """Found by a deployment: a client's state dir became unwritable at the final evaluation
    (its replies: "OSError"), the run failed, and `deploy local --resume` after the disk was
    fixed failed at once with the same error: the checkpoint after the last round made the
    resume skip the evaluation, and that client was never asked again."""
    cfg = _config(setting)
    private = cfg.privacy.enabled
    method = cfg.methods[0]
    whole = _settings(cfg, tmp_path / "whole")
    expected = _run(whole, InMemoryGrid(tmp_path / "whole" / "nodes", whole, 3))
    root = tmp_path / "cut"
    rc, broken = _fail_at_the_final_evaluation(root, monkeypatch, cfg, setting == "dp-close")

    # a resume while the node is still broken fails the same way, and says so again
    broken[0] = True
    with pytest.raises(DeployError, match=rf"clients \[{FAILING}\] {_why(cfg)}.*--resume"):
        _run(rc, InMemoryGrid(root / "nodes", rc, 3, run_id=777), run_id=777)

    broken[0] = False  # the disk is writable again
    grid = InMemoryGrid(root / "nodes", rc, 3, run_id=777)
    resumed = _run(rc, grid, run_id=777)
    asked = [m.metadata.group_id for m in grid.sent if m.metadata.dst_node_id == 1000 + FAILING
             and m.metadata.message_type == MSG_EVALUATE]
    assert asked == [f"{method}:evaluate:{ROUNDS}"]  # that client alone, once
    assert not any(m.metadata.message_type == MSG_EVALUATE for m in grid.sent
                   if m.metadata.dst_node_id != 1000 + FAILING)
    # the events record what happened before the resume; everything else is the same
    events = resumed.pop("events")
    assert {(e["client"], e["round"]) for e in events} == {(FAILING, ROUNDS)}
    expected.pop("events")
    if private:
        # the resumes' own record of themselves (the failed one checkpointed its attempt):
        # each after the last round, no release sent again
        assert resumed["privacy"][method].pop("resumes") == [
            {"after_round": ROUNDS, "remade_from_journal": []}] * 2
        for results in (resumed, expected):
            for row in results["privacy"][method]["clients"]:
                assert len(row.pop("ledger_head")) == 64
    assert json.dumps(_untimed(resumed), sort_keys=True) == \
        json.dumps(_untimed(expected), sort_keys=True)
    assert (root / "res" / "rounds.csv").read_bytes() == \
        (tmp_path / "whole" / "res" / "rounds.csv").read_bytes()
    # nothing released or accounted twice: the same journal lengths and ledger entries,
    # that client's ledger closed once
    assert _node_records(root, method) == _node_records(tmp_path / "whole", method)
    if private:
        ledger = read_ledger(root / "nodes" / f"node-{FAILING}" / "runs" / "42" / method
                             / f"client-{FAILING:03d}.jsonl")
        assert [e["mechanism"] for e in ledger].count("close") == 1


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("setting", ["dp", "dp-selected-by-validation"])
def test_a_checkpoint_without_the_selection_before_the_final_evaluation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    """A checkpoint of an older secure-fedora holds the model selection only as the partial
    final evaluation left it: where that selection did not use the round (the final round is
    reported) the resume finishes the run exactly; where it did, the resume says it cannot
    and changes no checkpoint."""
    cfg = _config(setting)
    whole = _settings(cfg, tmp_path / "whole")
    expected = _run(whole, InMemoryGrid(tmp_path / "whole" / "nodes", whole, 3))
    root = tmp_path / "cut"
    rc, broken = _fail_at_the_final_evaluation(root, monkeypatch, cfg)
    broken[0] = False
    path = root / "res" / SERVER_CHECKPOINT
    state = load_checkpoint(path)
    assert state["current"].pop("tracker_before_final") is not None
    save_checkpoint(path, state)
    grid = InMemoryGrid(root / "nodes", rc, 3, run_id=777)
    if setting == "dp":
        resumed = _run(rc, grid, run_id=777)
        assert _untimed(resumed["methods"]) == _untimed(expected["methods"])
        assert _untimed(resumed["rounds"]) == _untimed(expected["rounds"])
        return
    before = path.read_bytes()
    with pytest.raises(DeployError, match=rf"resume: clients \[{FAILING}\] did not answer the "
                                          r"final evaluation .*start a new run"):
        _run(rc, grid, run_id=777)
    assert path.read_bytes() == before
    assert not any(m.metadata.message_type == MSG_EVALUATE for m in grid.sent)
