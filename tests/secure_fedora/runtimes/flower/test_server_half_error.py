"""A plug-in's server half that raises on the ServerApp: a one-line PluginError naming the
method, the hook and where it raised (the original as its cause), as in process
(tests/secure_fedora/algorithms/test_contract_checks.py); the result-dir resumes from the
last completed round's checkpoint, the nodes' ledgers intact. And the ServerApp asks every
method's ``assumptions`` before any message, as the in-process runtime does."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from privacy.ledger import read_ledger
from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.core.plugins import PluginError
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import RunSettings
from secure_fedora.runtimes.inprocess import CheckpointError
from tests.secure_fedora.algorithms import test_contract_checks
from tests.secure_fedora.algorithms.test_contract_checks import LoadBreaks, ServerBreaks, Toy
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    run_config,
    task_identity,
    tiny_config,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("task_identity")
_ = task_identity  # the fixture, imported for use above

#: The server-side hooks the ServerApp calls (a client's client_state_dict is its node's).
FLOWER_HOOKS = {hook: words for hook, words in test_contract_checks.SERVER_HOOKS.items()
                if hook != "client_state_dict"}


def _dp(cfg: Any) -> Any:
    return parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                         "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3}})


def _federate(rc: dict[str, Any], grid: InMemoryGrid, run_id: int = 42) -> dict[str, Any]:
    with contextlib.redirect_stdout(io.StringIO()):
        return server_app.run_federation(grid, RunSettings.from_run_config(rc), run_id)


def _resumed(tmp_path: Path, rc: dict[str, Any], name: str, run_id: int = 777) -> dict[str, Any]:
    """The run of ``rc`` resumed (run 42 goes on as ``run_id``), checking that each client's
    ledger holds each round's release once and its close entry."""
    results = _federate({**rc, "resume": "42"},
                        InMemoryGrid(tmp_path / "nodes", {**rc, "resume": "42"}, 3,
                                     run_id=run_id), run_id)
    for c in range(3):  # each round's release made and accounted once
        ledger = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / name / \
            f"client-{c:03d}.jsonl"
        assert [(e["round"], e["mechanism"]) for e in read_ledger(ledger)] == [
            (1, "dpsgd"), (2, "dpsgd"), (3, "dpsgd"), (3, "close")]
    return results


@pytest.mark.parametrize("hook", sorted(FLOWER_HOOKS))
def test_a_plugins_server_half_that_raises_is_named_and_the_run_resumes(tmp_path, monkeypatch,
                                                                      hook):
    """Raised raw from the ServerApp before (a traceback naming neither method nor hook)."""
    name = f"server_breaks_fl_{hook}"
    METHODS.register(name, ServerBreaks)
    try:
        cfg = _dp(with_methods(tiny_config(rounds=3), name))
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        monkeypatch.setattr(ServerBreaks, "breaks", hook)
        with pytest.raises(PluginError) as info:
            _federate(rc, InMemoryGrid(tmp_path / "nodes", rc, 3))
        message = str(info.value)
        assert message.startswith(f"method '{name}': its server half's {FLOWER_HOOKS[hook]} "
                                  f"raised RuntimeError: {hook} broke (at "
                                  f"{test_contract_checks.__file__}:")
        assert message.endswith(" in _fail)") and "\n" not in message
        assert isinstance(info.value.__cause__, RuntimeError)
        assert not (tmp_path / "res" / "results.json").exists()
        monkeypatch.setattr(ServerBreaks, "breaks", None)  # the plug-in fixed: resumed
        results = _resumed(tmp_path, rc, name)
        assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    finally:
        METHODS.unregister(name)


@pytest.mark.parametrize("failure", [ZeroDivisionError, ValueError])
def test_a_plugins_load_server_state_dict_that_raises_is_a_checkpoint_error_changing_nothing(
        tmp_path, monkeypatch, failure):
    """As in process: a plug-in's ``load_server_state_dict`` raising on a resume was raw
    (ZeroDivisionError) or a CheckpointError naming neither method nor hook (ValueError).
    Now a CheckpointError naming the method, the hook and where it raised (the PluginError
    its cause); the ServerApp's checkpoint and the nodes' ledgers are left as they were, and
    the plug-in fixed resumes."""
    name = f"load_breaks_fl_{failure.__name__}"
    METHODS.register(name, LoadBreaks)
    try:
        cfg = _dp(with_methods(tiny_config(rounds=3), name))
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        monkeypatch.setattr(ServerBreaks, "breaks", "configure")  # stops after round 1
        with pytest.raises(PluginError):
            _federate(rc, InMemoryGrid(tmp_path / "nodes", rc, 3))
        monkeypatch.setattr(ServerBreaks, "breaks", None)
        monkeypatch.setattr(LoadBreaks, "loading", "load_server_state_dict")
        monkeypatch.setattr(LoadBreaks, "failure", failure)
        # the ServerApp's result-dir (its checkpoint) and each node's state of the method
        # (ledger, journal, client state); the first contact's nonce memories move on: the
        # resume's hello is answered before the checkpoint is read
        kept = [*(tmp_path / "res").rglob("*"), *(tmp_path / "nodes").glob(f"*/runs/42/{name}/*")]
        before = {p: p.read_bytes() for p in sorted(kept) if p.is_file()}
        assert sorted(p.name for p in before if p.suffixes == [".jsonl"]) == [
            "client-000.jsonl", "client-001.jsonl", "client-002.jsonl"]  # the ledgers
        assert len([p for p in before if p.suffix == ".pt"]) == 4
        rc = {**rc, "resume": "42"}
        with pytest.raises(CheckpointError) as info:
            _federate(rc, InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777), 777)
        message = str(info.value)
        assert message.startswith(
            f"the ServerApp checkpoint of '{name}' cannot be restored: method '{name}': its "
            f"server half's load_server_state_dict(state) for the resume raised "
            f"{failure.__name__}: load_server_state_dict cannot load (at "
            f"{test_contract_checks.__file__}:")
        assert message.endswith(" in _load_fails)") and "\n" not in message
        assert isinstance(info.value.__cause__, PluginError)
        assert {p: p.read_bytes() for p in before} == before
        monkeypatch.setattr(LoadBreaks, "loading", None)  # the plug-in fixed: resumed
        results = _resumed(tmp_path, rc, name, 778)
        assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    finally:
        METHODS.unregister(name)


def _stating(value: str) -> type:
    return type(f"States{value}", (Toy,), {
        "assumptions": classmethod(lambda cls, cfg: {"reference_set": value})})


def _raising_assumptions(cls, cfg):  # type: ignore[no-untyped-def]
    raise KeyError("no reference set")


@pytest.mark.parametrize("case", ["raises", "differ"])
def test_the_serverapp_asks_assumptions_before_any_message(tmp_path, case):
    """The ServerApp asked ``assumptions`` only when it wrote results.json, after every
    round: a method whose ``assumptions`` raises, or two stating one key differently, wasted
    the run. Now refused before the first contact, as in process."""
    classes = ({"asks_raising": type("Raising", (Toy,), {
        "assumptions": classmethod(_raising_assumptions)})} if case == "raises"
        else {"states_a": _stating("a"), "states_b": _stating("b")})
    for name, cls in classes.items():
        METHODS.register(name, cls)
    try:
        cfg = with_methods(tiny_config(rounds=1), *classes)
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                          "compare-methods": True})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        expected = (r"^method 'asks_raising': its assumptions\(cfg\) raised KeyError"
                    if case == "raises" else
                    r"^methods 'states_a' and 'states_b' state results.json assumption "
                    r"'reference_set' differently \('a' vs 'b'\)")
        with pytest.raises(ConfigError, match=expected):
            _federate(rc, grid)
        assert grid.sent == []  # nothing asked of any node
    finally:
        for name in classes:
            METHODS.unregister(name)


def test_a_plugins_round_discarded_that_raises_is_named_and_the_run_resumes(tmp_path,
                                                                          monkeypatch):
    """As in process: a plug-in's ``round_discarded`` (round 2 gets no accepted reply: every
    node answers with an error) raising is a one-line PluginError naming the method, the hook
    and the round; no file is written after it (the result-dir keeps round 1's checkpoint)
    and the run resumes, each round's release accounted once."""
    from tests.secure_fedora.algorithms.test_contract_checks import DiscardBreaks

    name = "discard_breaks_fl"
    METHODS.register(name, DiscardBreaks)
    try:
        cfg = _dp(with_methods(tiny_config(rounds=3), name))
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        monkeypatch.setattr(DiscardBreaks, "breaks", True)
        monkeypatch.setattr(DiscardBreaks, "watch", tmp_path)
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                            fail={(c, 2): "node busy" for c in range(3)})
        with pytest.raises(PluginError) as info:
            _federate(rc, grid)
        message = str(info.value)
        assert message.startswith(f"method '{name}': its server half's round_discarded(rnd) of "
                                  f"round 2 raised RuntimeError: round_discarded broke (at "
                                  f"{test_contract_checks.__file__}:")
        assert message.endswith(" in round_discarded)") and "\n" not in message
        assert isinstance(info.value.__cause__, RuntimeError)
        after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
        assert DiscardBreaks.seen and after == DiscardBreaks.seen
        assert json.loads((tmp_path / "res" / "progress.json").read_text())["round"] == 1
        assert not (tmp_path / "res" / "results.json").exists()
        monkeypatch.setattr(DiscardBreaks, "breaks", False)  # the plug-in fixed: resumed
        results = _resumed(tmp_path, rc, name)
        assert [(r["round"], r["replied"]) for r in results["rounds"]] == [(1, 3), (2, 3),
                                                                          (3, 3)]
    finally:
        METHODS.unregister(name)
