"""A plug-in method's messages are signed in process as on Flower: one whose ``message_state``
is the inherited None (nothing tracked) and one whose clients reply with an empty payload.
A client whose reply is tampered with is refused in both runtimes alike."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message

from privacy.envelope import decode_message, encode_message
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_ROUND, RunSettings
from secure_fedora.secure import transport as transport_module
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    TINY,
    InMemoryGrid,
    UntrackedMean,
    in_process,
    run_config,
    task_identity,
)


class SilentClients(UntrackedMean):
    """Clients train from the global model and reply with nothing (an empty payload); the
    server counts the replies it accepted. It declares an exchange tracking nothing, as Local
    does, so it had one in process before a None message_state got one."""

    def message_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {}, {}

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        return {} if stage == "round" else super().reply_entries(cfg, stage)

    def client_update(self, i: int, rnd: int, message: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        self.theta[i].copy_(message["global"])
        self.ctx.train_client(i, self.theta[i])
        return {}

    def aggregate(self, rnd: int, replies: Any) -> dict[str, float]:
        return {"accepted": float(len(replies))}


@pytest.fixture(params=[UntrackedMean, SilentClients], ids=["untracked", "empty-reply"])
def plug_in(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"plug_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, request.param)
    try:
        yield name
    finally:
        METHODS.unregister(name)


def _config(method: str) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["training"]["rounds"] = 3
    data["security"] = {"envelopes": True}
    return parse_config(data)


def _flip_reply_signature(_request: Message, reply: Message) -> Message:
    """The reply's envelope with one bit of its signature flipped (the payload as sent)."""
    record = reply.content["envelope"]
    for name in list(record.keys()):
        envelope = json.loads(record[name])
        signature = bytes.fromhex(envelope["signature"])
        envelope["signature"] = (bytes([signature[0] ^ 0x01]) + signature[1:]).hex()
        record[name] = json.dumps(envelope)
    return reply


def _flip_inprocess(monkeypatch: pytest.MonkeyPatch, client: int, rnd: int) -> list[str]:
    """In process: the signature of every round-``rnd`` reply message of ``client`` (kinds
    ``round`` and ``round.<entry>``) has its first bit flipped. Returns the kinds of every
    message the exchange moved (filled as the run goes)."""
    seen: list[str] = []
    real_init = transport_module.SecureExchange.__init__

    def channel(kind: str, r: int, i: int, message: bytes) -> bytes:
        seen.append(kind)
        if (i, r) != (client, rnd) or not (kind == "round" or kind.startswith("round.")):
            return message
        envelope, payload = decode_message(message)
        if envelope.sender == "server":
            return message
        signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
        return encode_message(dataclasses.replace(envelope, signature=signature), payload)

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    return seen


@pytest.mark.usefixtures("task_identity")
def test_a_plug_ins_tampered_reply_is_refused_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plug_in: str) -> None:
    """Client 1's round-2 reply carries a bad signature. On Flower every reply is a signed
    envelope, so the server refuses it and client 1 takes no part in round 2. In process a
    plug-in whose message_state is None got no exchange at all (nothing signed, the tampered
    reply counted), and an empty reply was never signed; both are envelopes now, refused
    alike, with equal results."""
    cfg = _config(plug_in)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_reply={(1, 2, MSG_ROUND): _flip_reply_signature})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    flower = [(r["client"], r["round"], r["reason"]) for r in results["security"]["rejections"]]
    assert flower == [(1, 2, "bad_signature")]
    seen = _flip_inprocess(monkeypatch, 1, 2)
    sim, outcome = in_process(cfg, tmp_path, plug_in)
    method = sim.methods[plug_in]
    assert method.exchange is not None
    ours = [(r.client, r.round, r.reason) for r in method.exchange.rejections]
    assert ours == flower
    assert [r["replied"] for r in sim.history] == [r["replied"] for r in results["rounds"]] \
        == [3, 2, 3]
    assert [r["accepted"] for r in sim.history] == [3.0, 2.0, 3.0]
    # every reply travelled as an envelope (the empty ones as one of kind 'round'); client
    # 1's round-2 steps entry was not sent once its theta entry was refused
    replies = sorted(k for k in seen if k == "round" or k.startswith("round."))
    if METHODS.get(plug_in) is UntrackedMean:
        assert replies == ["round.steps"] * 8 + ["round.theta"] * 9
    else:
        assert replies == ["round"] * 9
    mine, theirs = outcome.to_json(), results["methods"][plug_in]
    for part in ("selected", "final"):
        assert np.allclose(mine[part]["per_client"], theirs[part]["per_client"],
                           atol=1e-4, rtol=0), part
