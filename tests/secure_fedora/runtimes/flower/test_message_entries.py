"""A signed server message whose entries the method's client half cannot use (an entry renamed,
reshaped, of another dtype, or one too many) is refused by the Flower client against what the
method declares (``FederatedAlgorithm.message_entries``), before any budget is admitted or its
client half runs: a ContractError naming the entry, no ledger entry, no journal record. A
plug-in method without its own declaration receives what the message carries, as before."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from privacy.ledger import read_ledger
from secure_fedora.algorithms.contract import ContractError
from secure_fedora.algorithms.methods import FedAvg
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.envelopes import ENVELOPE_RECORD
from secure_fedora.runtimes.flower.protocol import MSG_ROUND, DeployError, RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    run_config,
    server_security,
    task_identity,
    with_methods,
)

pytestmark = pytest.mark.usefixtures("task_identity")
_ = task_identity  # the fixture, imported for use above

Change = Callable[[dict[str, np.ndarray]], None]


def _resigned_request(rc: dict[str, Any], root: Path, change: Change) -> Callable[[Message], Message]:
    """Client 0's request with its payload changed by ``change``, signed again by the server's
    own key (a message the client verifies as the server's)."""
    signer = server_security(rc, root / "resign")

    def tamper(request: Message) -> Message:
        content = request.content
        rnd = json.loads(content[ENVELOPE_RECORD]["client-000"])["round"]
        del content[ENVELOPE_RECORD]
        arrays = {k: content["payload"][k].numpy() for k in content["payload"].keys()}
        change(arrays)
        content["payload"] = ArrayRecord({k: Array(np.array(v, copy=True))
                                          for k, v in arrays.items()})
        signer.sign(content, request.metadata.message_type, ["client-000"], rnd, reply=False)
        return request

    return tamper


def _run(root: Path, method: str, change: Change) -> tuple[dict[str, Any], InMemoryGrid]:
    cfg = with_methods(dp_config(rounds=2), method)
    rc = run_config(cfg, root, **{"result-dir": str(root / "res")})
    grid = InMemoryGrid(root / "nodes", rc, 3,
                        tamper_request={(0, 1, MSG_ROUND): _resigned_request(rc, root, change)})
    with contextlib.redirect_stdout(io.StringIO()):
        return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42), grid


def _ledger_rounds(root: Path, method: str, client: int) -> list[tuple[int, str]]:
    path = root / "nodes" / f"node-{client}" / "runs" / "42" / method / f"client-{client:03d}.jsonl"
    return [(e["round"], e["mechanism"]) for e in read_ledger(path)]


def _rename(name: str) -> Change:
    def apply(arrays: dict[str, np.ndarray]) -> None:
        arrays["x"] = arrays.pop(name)
    return apply


def _reshape(name: str) -> Change:
    def apply(arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = arrays[name][:-1]
    return apply


def _retype(name: str) -> Change:
    def apply(arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = arrays[name].astype(np.float64)
    return apply


def _extra(arrays: dict[str, np.ndarray]) -> None:
    arrays["extra"] = np.zeros(3, np.float32)


@pytest.mark.parametrize("method, change, detail", [
    ("fedavg", _rename("global"), "carries ['x'], the method's round messages carry ['global']"),
    ("fedavg", _reshape("global"), "entry 'global' is torch.float32"),
    ("fedavg", _retype("global"), "entry 'global' is torch.float64"),
    ("fedavg", _extra, "carries ['extra', 'global']"),
    ("fedora", _reshape("phi"), "entry 'phi' is torch.float32"),
], ids=["fedavg-renamed", "fedavg-reshaped", "fedavg-float64", "fedavg-extra", "fedora-reshaped"])
def test_a_message_the_method_cannot_use_is_refused_before_any_budget_is_admitted(
        tmp_path, method, change, detail):
    """Before, the client admitted round 1's release into its ledger, then its client half
    failed on the message (``KeyError: 'global'``, a shape mismatch in ``copy_``) or trained
    from it (a float64 model copied in, an extra entry ignored); the ledger kept a round-1
    entry for a release never made. Now the message is refused first: client 0's ledger holds
    no round-1 entry, the run goes on without it in round 1."""
    results, grid = _run(tmp_path, method, change)
    [(client, kind, err)] = grid.errors
    assert (client, kind) == (0, MSG_ROUND) and isinstance(err, ContractError)
    assert f"method {method!r}: the round message to client 0" in str(err) and detail in str(err)
    assert "refused before anything was admitted" in str(err)
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    # (FEDORA's setup summary is round 0's entry; a round may account several mechanisms)
    assert {r for r, m in _ledger_rounds(tmp_path, method, 0) if m != "close"} - {0} == {2}
    assert {r for r, m in _ledger_rounds(tmp_path, method, 1) if m != "close"} - {0} == {1, 2}
    journal = tmp_path / "nodes" / "node-0" / "runs" / "42" / "releases.jsonl"
    assert all(json.loads(line).get("round") != 1 for line in journal.read_text().splitlines())


class PlugInAvg(FedAvg):
    """A plug-in built on FedAvg that declares no messages of its own: its round messages
    carry what its server half sends (here FedAvg's global model plus a round counter)."""

    name = "plug_in_avg"
    seen: list[list[str]] = []

    def configure(self, rnd, participants):  # type: ignore[no-untyped-def]
        return {i: {**m, "tick": torch.tensor([float(rnd)])}
                for i, m in super().configure(rnd, participants).items()}

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        PlugInAvg.seen.append(sorted(message))
        return super().client_update(i, rnd, message)


def test_a_plug_in_without_its_own_declaration_receives_its_messages_as_before(tmp_path):
    METHODS.register("plug_in_avg", PlugInAvg)
    PlugInAvg.seen.clear()
    try:
        cfg = with_methods(dp_config(rounds=1), "plug_in_avg")
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        with contextlib.redirect_stdout(io.StringIO()):
            results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)
    finally:
        METHODS.unregister("plug_in_avg")
    assert not grid.errors
    assert [r["replied"] for r in results["rounds"]] == [3]
    assert PlugInAvg.seen == [["global", "tick"]] * 3


class DeclaringPlugIn(PlugInAvg):
    """The same plug-in declaring its round message: a message without ``tick`` is refused."""

    name = "declaring_plug_in"

    def configure(self, rnd, participants):  # type: ignore[no-untyped-def]
        return FedAvg.configure(self, rnd, participants)

    def message_entries(self, stage):  # type: ignore[no-untyped-def]
        if stage == "round":
            return {"global": (self.ctx.init.dtype, tuple(self.ctx.init.shape)),
                    "tick": (torch.float32, (1,))}
        return None


def test_a_plug_in_that_declares_its_messages_is_checked_against_its_declaration(tmp_path):
    METHODS.register("declaring_plug_in", DeclaringPlugIn)
    try:
        cfg = with_methods(dp_config(rounds=1), "declaring_plug_in")
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        with contextlib.redirect_stdout(io.StringIO()):
            with pytest.raises(DeployError, match="no client.s training reply was accepted"):
                server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)
    finally:
        METHODS.unregister("declaring_plug_in")
    assert {type(e) for _, _, e in grid.errors} == {ContractError}
    assert "carries ['global'], the method's round messages carry ['global', 'tick']" in \
        str(grid.errors[0][2])
    for c in range(3):
        assert [m for _, m in _ledger_rounds(tmp_path, "declaring_plug_in", c)
                if m != "close"] == []
