"""A rejected round upload in both runtimes: the server keeps its last accepted row, the
client keeps what it trained (a Flower ClientApp saves its own state whatever the server
accepts; in process the upload matrix is also the clients' state)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from secure_fedora.algorithms.methods import FederatedMethod
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_ROUND, RunSettings
from secure_fedora.secure import transport as transport_module
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    TINY,
    InMemoryGrid,
    assert_client_states_match,
    in_process,
    run_config,
    task_identity,
)

PLUG_IN = "own_rows_mean_x"


class OwnRowsMean(FederatedMethod):
    """A plug-in whose clients keep training their own rows (never reset) and upload them;
    the server keeps every client's last accepted row and reports their mean's norm."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.server_rows = self.theta.clone()

    def message_state(self):  # type: ignore[no-untyped-def]
        return {"theta": self.theta}, {}

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        steps = self.ctx.train_client(i, self.theta[i])
        return {"theta": self.theta[i], "steps": torch.tensor(steps)}

    def aggregate(self, rnd, replies):  # type: ignore[no-untyped-def]
        for i, reply in replies.items():
            self.server_rows[i].copy_(reply["theta"])
        return {"mean_norm": float(self.server_rows.mean(0).norm())}


HALF = "releasing_half_x"


def _releasing_half() -> type:
    """FEDORA releasing half of the row it trained (its reply is not its state)."""
    from secure_fedora.algorithms.methods import Fedora

    class ReleasingHalf(Fedora):
        def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
            reply = super().client_update(i, rnd, message)
            return {**reply, "theta": reply["theta"] * 0.5}

    return ReleasingHalf


def _config(method: str, rounds: int = 3, **over: Any) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["training"]["rounds"] = rounds
    data["security"] = {"envelopes": True}
    for key, value in over.items():
        data.setdefault(key, {}).update(value)
    return parse_config(data)


def _tamper_reply(_request: Message, reply: Message) -> Message:
    arrays = {k: reply.content["payload"][k].numpy().copy() for k in reply.content["payload"]}
    arrays["theta"] = arrays["theta"] + 1.0  # the envelope is left as signed
    reply.content["payload"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return reply


def _tamper_inprocess(monkeypatch: pytest.MonkeyPatch, rejected: set[tuple[int, int]]) -> None:
    real_init = transport_module.SecureExchange.__init__

    def channel(kind: str, rnd: int, client: int, message: bytes) -> bytes:
        if kind == "theta" and (client, rnd) in rejected:
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)


def _both_runtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfg: Any, method: str,
                   rejected: set[tuple[int, int]], before_in_process: Any = None
                   ) -> tuple[dict[str, Any], Any, Any]:
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_reply={(c, r, MSG_ROUND): _tamper_reply for c, r in rejected})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == []
    _tamper_inprocess(monkeypatch, rejected)
    if before_in_process is not None:
        before_in_process()
    sim, outcome = in_process(cfg, tmp_path, method)
    flower_rejected = {(r["client"], r["round"]) for r in results["security"]["rejections"]}
    ours_rejected = {(r.client, r.round) for r in sim.methods[method].exchange.rejections}
    assert flower_rejected == ours_rejected == rejected
    ours = results["methods"][method]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], outcome.to_json()[part]["per_client"],
                           atol=1e-4, rtol=0), part
    assert_client_states_match(tmp_path, cfg, sim, method)
    return results, sim, outcome


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ["fedora", "fedavg", PLUG_IN, HALF])
def test_a_rejected_upload_leaves_the_client_its_trained_row_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Client 1's round-1 upload is rejected: the server goes on with its last accepted row,
    client 1 starts round 2 from the row it trained in round 1 (in process, FEDORA's theta
    used to be put back to the server's row, unlike on Flower; so was the row of a client
    whose reply is not its row, HALF) and per-client results, client states and the server's
    round statistics agree."""
    from secure_fedora.algorithms import methods as methods_module

    starts: list[torch.Tensor] = []
    trained: list[torch.Tensor] = []
    local_train = methods_module.local_train

    def recording(flat, theta, *args, client=None, **kwargs):  # type: ignore[no-untyped-def]
        if client == 1:
            starts.append(theta.detach().clone())
        steps = local_train(flat, theta, *args, client=client, **kwargs)
        if client == 1:
            trained.append(theta.detach().clone())
        return steps

    def record_in_process() -> None:
        monkeypatch.setattr(methods_module, "local_train", recording)

    METHODS.register(PLUG_IN, OwnRowsMean)
    METHODS.register(HALF, _releasing_half())
    try:
        results, sim, _ = _both_runtimes(tmp_path, monkeypatch, _config(method), method, {(1, 1)},
                                       record_in_process)
    finally:
        METHODS.unregister(PLUG_IN)
        METHODS.unregister(HALF)
    assert [r["replied"] for r in results["rounds"]] == [2, 3, 3]
    if method != "fedavg":  # FedAvg's clients start every round from the global model
        assert torch.equal(starts[1], trained[0])  # its own trained row, not the server's
    if method == PLUG_IN:  # the server's view of client 1 stays its initial row in round 1
        flower = [r["mean_norm"] for r in results["rounds"]]
        ours = [r["mean_norm"] for r in sim.history]
        assert len(flower) == 3 and np.allclose(flower, ours, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("propagation", ["dense", "sparse"])
def test_a_round_with_every_upload_rejected_runs_alike_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, propagation: str) -> None:
    """Participants [0, 2], [1, 2], [0, 2], [0, 1]: client 0's round-1 upload and both round-2
    uploads are rejected. In process, the sparse operator's pending phi rows then raised
    RuntimeError in round 3; both runtimes now agree on every client's results and state."""
    cfg = _config("fedora", rounds=4, training={"participation": 0.5},
                  fedora={"propagation": propagation})
    results, _, _ = _both_runtimes(tmp_path, monkeypatch, cfg, "fedora", {(0, 1), (1, 2), (2, 2)})
    assert [r["replied"] for r in results["rounds"]] == [1, 0, 2, 2]
