"""A plug-in's client half that raises on a Flower node: the ClientApp answers with an error
reply carrying a ClientHalfError that names the method and the client (the original exception
kept as its cause), and the ServerApp treats that client as not taking part, as in process the
same error stops the run (tests/secure_fedora/algorithms/test_contract_checks.py)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from privacy.ledger import read_ledger
from secure_fedora.algorithms.contract import ClientHalfError
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE, MSG_ROUND, DeployError, RunSettings
from tests.secure_fedora.algorithms.test_contract_checks import Toy
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    run_config,
    task_identity,
    tiny_config,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("task_identity")
_ = task_identity  # the fixture, imported for use above


class Breaks(Toy):
    """Toy whose client 1 divides by zero in round 1's client_update."""

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        if (i, rnd) == (1, 1):
            return {"steps": torch.tensor(1 // 0)}
        return super().client_update(i, rnd, message)


class BreaksEvaluating(Toy):
    """Toy whose client 1 cannot produce its evaluation row."""

    def client_eval_row(self, i, message=None):  # type: ignore[no-untyped-def]
        if i == 1:
            raise KeyError("no such row")
        return super().client_eval_row(i, message)


class BreaksStating(Toy):
    """Toy whose client 1 cannot state its client state after round 1's training."""

    trained = 0  # the round this instance trained in (a node builds one per message)

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        self.trained = rnd
        return super().client_update(i, rnd, message)

    def client_state_dict(self, i):  # type: ignore[no-untyped-def]
        if (i, self.trained) == (1, 1):
            raise RuntimeError("no state to give")
        return super().client_state_dict(i)


class BreaksLoading(Toy):
    """Toy whose client 1 cannot load its saved client state, once (``armed``)."""

    armed = False

    def load_client_state_dict(self, i, state):  # type: ignore[no-untyped-def]
        if i == 1 and type(self).armed:
            type(self).armed = False
            raise LookupError("state from another version")
        super().load_client_state_dict(i, state)


class Discards(Toy):
    """Toy whose every client fails round 1's training; records the rounds the server
    discarded (``round_discarded``)."""

    discarded: list[int] = []

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        if rnd == 1:
            raise ArithmeticError("nothing trained")
        return super().client_update(i, rnd, message)

    def round_discarded(self, rnd):  # type: ignore[no-untyped-def]
        type(self).discarded.append(rnd)


def _run(root: Path, cls: type, name: str, dp: bool = False
         ) -> tuple[dict[str, Any] | None, InMemoryGrid, Any]:
    """A 2-round Flower run of ``cls`` registered as ``name`` (``dp``: with privacy):
    (results or None, the grid, the DeployError the ServerApp raised or None)."""
    METHODS.register(name, cls)
    try:
        cfg = with_methods(tiny_config(rounds=2), name)
        if dp:
            cfg = parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                                "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3}})
        rc = run_config(cfg, root, **{"result-dir": str(root / "res")})
        grid = InMemoryGrid(root / "nodes", rc, cfg.data.num_clients)
        with contextlib.redirect_stdout(io.StringIO()):
            return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42), grid, None
    except DeployError as err:
        return None, grid, err
    finally:
        METHODS.unregister(name)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_a_client_update_that_raises_is_an_error_reply_naming_method_and_client(tmp_path, dp):
    """Under DP the failed round's admitted release stays accounted: the client's ledger
    records both rounds, as the others' (nothing left, nothing is under-counted)."""
    results, grid, stopped = _run(tmp_path, Breaks, "breaks_x", dp)
    assert stopped is None and results is not None
    [(client, kind, err)] = grid.errors
    assert (client, kind) == (1, MSG_ROUND) and isinstance(err, ClientHalfError)
    assert str(err).startswith("method 'breaks_x': client 1's client_update of round 1 failed: "
                               "ZeroDivisionError")
    assert isinstance(err.__cause__, ZeroDivisionError)
    # that client takes no part in round 1, the others do, and the run goes on
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    [event] = [e for e in results["events"] if e["round"] == 1]
    assert event["client"] == 1
    # the server learns the error's classes; the client's text stays on its node
    assert "ClientHalfError (from ZeroDivisionError) (details withheld" in event["event"]
    assert event["event"].endswith("counts as not taking part in the round exchange")
    assert (tmp_path / "res" / "results.json").exists()
    if dp:
        for c in range(3):
            ledger = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "breaks_x" / \
                f"client-{c:03d}.jsonl"
            assert [(e["round"], e["mechanism"]) for e in read_ledger(ledger)] == [
                (1, "dpsgd"), (2, "dpsgd"), (2, "close")]


def test_a_client_eval_row_that_raises_stops_the_run_naming_method_and_client(tmp_path):
    """A client that never evaluated has no metric: the run stops (no made-up results),
    naming the client's error."""
    results, grid, stopped = _run(tmp_path, BreaksEvaluating, "breaks_eval_x")
    assert results is None and stopped is not None
    assert "clients [1] never reported an evaluation" in str(stopped)
    assert "ClientHalfError (from KeyError) (details withheld" in str(stopped)
    errors = [(c, k, type(e), type(e.__cause__)) for c, k, e in grid.errors]
    assert set(errors) == {(1, MSG_EVALUATE, ClientHalfError, KeyError)}
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_a_client_state_dict_that_raises_is_an_error_reply_naming_method_and_client(tmp_path,
                                                                                   dp):
    """The node asks the method for its client state after each exchange, outside the client
    half: a plug-in raising there was a raw RuntimeError reply naming neither method nor
    hook. Now a ClientHalfError, as a client_update raising; the round goes on without that
    client, nothing is saved as answered and (under DP) the ledgers account each admitted
    release once."""
    results, grid, stopped = _run(tmp_path, BreaksStating, "breaks_state_x", dp)
    assert stopped is None and results is not None
    [(client, kind, err)] = grid.errors
    assert (client, kind) == (1, MSG_ROUND) and isinstance(err, ClientHalfError)
    assert str(err).startswith("method 'breaks_state_x': client 1's client_state_dict after its "
                               "round exchange of round 1 failed: RuntimeError: no state to "
                               "give (at ")
    assert isinstance(err.__cause__, RuntimeError)
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    if dp:
        for c in range(3):
            ledger = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "breaks_state_x" / \
                f"client-{c:03d}.jsonl"
            assert [(e["round"], e["mechanism"]) for e in read_ledger(ledger)] == [
                (1, "dpsgd"), (2, "dpsgd"), (2, "close")]


def test_a_load_client_state_dict_that_raises_is_an_error_reply_naming_method_and_client(
        tmp_path, monkeypatch):
    """The node restores the method's client state before each exchange: a plug-in raising
    there was a raw LookupError reply. Now a ClientHalfError naming the method, the client
    and the hook; the node's saved state is left as it was, so the next message loads it."""
    monkeypatch.setattr(BreaksLoading, "armed", True)
    results, grid, stopped = _run(tmp_path, BreaksLoading, "breaks_load_x")
    [(client, kind, err)] = grid.errors
    # its first message with a saved state: round 1's evaluation
    assert (client, kind) == (1, MSG_EVALUATE) and isinstance(err, ClientHalfError)
    assert str(err).startswith("method 'breaks_load_x': client 1's load_client_state_dict "
                               "failed: LookupError: state from another version (at ")
    assert isinstance(err.__cause__, LookupError)
    # the state it kept loads in round 2: every client trains and evaluates there
    assert stopped is None and results is not None
    assert [r["replied"] for r in results["rounds"]] == [3, 3]


def test_a_round_with_no_accepted_reply_is_discarded_as_in_process(tmp_path, monkeypatch):
    """The in-process runtime calls ``round_discarded`` instead of ``aggregate`` for a round
    with no accepted reply; the ServerApp called neither, so a method computing server state
    there (FEDORA's pending ``phi`` rows) was not told. Now it is called, once, for that round
    only."""
    monkeypatch.setattr(Discards, "discarded", [])
    results, grid, stopped = _run(tmp_path, Discards, "discards_x")
    assert stopped is None and results is not None
    assert [r["replied"] for r in results["rounds"]] == [0, 3]
    assert sorted(c for c, _, _ in grid.errors) == [0, 1, 2]
    assert Discards.discarded == [1]


class StatesLate(Toy):
    """Toy whose client 1 cannot state its client state after round 1's training while
    ``client_armed``, and whose server's ``aggregate`` of round 1 raises while
    ``server_armed`` (the ServerApp stops after round 1's messages were answered, so its
    resume asks round 1 again)."""

    client_armed = False
    server_armed = False
    refused = False  # return what check_client_state refuses instead of raising
    trained = 0  # the round this instance trained in (a node builds one per message)

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        self.trained = rnd
        return super().client_update(i, rnd, message)

    def client_state_dict(self, i):  # type: ignore[no-untyped-def]
        if (i, self.trained) == (1, 1) and type(self).client_armed:
            type(self).client_armed = False
            if type(self).refused:
                return [self.theta[i]]
            raise RuntimeError("no state to give")
        return super().client_state_dict(i)

    def aggregate(self, rnd, replies):  # type: ignore[no-untyped-def]
        if rnd == 1 and type(self).server_armed:
            type(self).server_armed = False
            raise RuntimeError("aggregate broke")
        return super().aggregate(rnd, replies)


@pytest.mark.parametrize(("noise", "refused"), [("csprng", False), ("reproducible", False),
                                               ("csprng", True)])
def test_a_client_state_dict_that_raises_journals_no_reply_and_the_exchange_is_remade(
        tmp_path, monkeypatch, noise, refused):
    """A node asked the method for its client state after it had journaled (fsynced) the
    reply as released, so a plug-in raising there left a reply on the node's release journal
    that never left. Now the client state is taken before the reply is journaled: the node
    answers with the ClientHalfError (a state check_client_state refuses: its ContractError)
    and its journal holds no reply of that exchange (the release admitted before training
    stays on its ledger). Asked round 1 again (the ServerApp
    resumed from its round-0 checkpoint), the node re-makes the release under the ledger
    entries it admitted then (accounted once), journals it once, and the ledgers verify."""
    from audits.verify import verify_run
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.core.plugins import PluginError
    from secure_fedora.runtimes.flower.state import ReleaseJournal
    from tests.secure_fedora.runtimes.flower.deploy_support import audit_folder

    name = f"states_late_{noise}_{refused}".lower()
    monkeypatch.setattr(StatesLate, "client_armed", True)
    monkeypatch.setattr(StatesLate, "refused", refused)
    monkeypatch.setattr(StatesLate, "server_armed", True)
    METHODS.register(name, StatesLate)
    try:
        cfg = parse_config({**with_methods(tiny_config(rounds=2), name).model_dump(
            mode="json", exclude_none=True), "privacy": {
                "enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": noise}})
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                          "reproducible-dp-noise": noise == "reproducible"})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        with pytest.raises(PluginError, match="aggregate broke"), \
                contextlib.redirect_stdout(io.StringIO()):
            server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)
        [(client, kind, err)] = grid.errors
        assert (client, kind) == (1, MSG_ROUND)
        if refused:
            assert isinstance(err, ContractError) and str(err) == (
                f"method '{name}': client 1's client_state_dict is a list, not a dict of "
                "tensors")
        else:
            assert isinstance(err, ClientHalfError)
            assert str(err).startswith(f"method '{name}': client 1's client_state_dict after "
                                       "its round exchange of round 1 failed: RuntimeError: no "
                                       "state to give (at ")
        run_dir = tmp_path / "nodes" / "node-1" / "runs" / "42"
        replies = [e for e in ReleaseJournal(run_dir / "releases.jsonl").entries()
                   if e["kind"] == f"{name}/round"]
        assert replies == []  # the reply never left: nothing records it as released
        ledger = run_dir / name / "client-001.jsonl"
        assert [(e["round"], e["mechanism"]) for e in read_ledger(ledger)] == [(1, "dpsgd")]
        rc = {**rc, "resume": "42"}
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777)
        with contextlib.redirect_stdout(io.StringIO()):
            results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 777)
        assert grid.errors == []
        assert [r["replied"] for r in results["rounds"]] == [3, 3]
        for c in range(3):  # each round's release made and accounted once, journaled once
            node = tmp_path / "nodes" / f"node-{c}" / "runs" / "42"
            assert [(e["round"], e["mechanism"])
                    for e in read_ledger(node / name / f"client-{c:03d}.jsonl")] == [
                (1, "dpsgd"), (2, "dpsgd"), (2, "close")]
            assert [e["round"] for e in ReleaseJournal(node / "releases.jsonl").entries()
                    if e["kind"] == f"{name}/round"] == [1, 2]
        report = verify_run(audit_folder(tmp_path, name),
                            allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                            anchor=tmp_path / "res" / "anchor.json")
        assert report.errors == [], report.errors
    finally:
        METHODS.unregister(name)
