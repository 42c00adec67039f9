"""A method's generic setup and finalize replies are signed envelopes in process, as on
Flower: a tampered one is refused in both runtimes, asked once more in both, and a client
without an accepted reply after two tries stops the run in both."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from privacy.envelope import decode_message, encode_message
from secure_fedora.algorithms.methods import (
    FinalizeRejectedError,
    SetupRejectedError,
)
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_FINALIZE, MSG_SETUP, RunSettings
from secure_fedora.runtimes.flower.server_app import DeployError
from secure_fedora.secure import transport as transport_module
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    TINY,
    InMemoryGrid,
    UntrackedMean,
    in_process,
    run_config,
    task_identity,
)

ROUNDS = 2


class Tallies(UntrackedMean):
    """A plug-in with a setup exchange (an empty message; each client replies its number of
    training rows) and a finalize exchange (the global model; each client replies its norm),
    training as FedAvg does between them."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.counts: list[float] = []

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        if stage == "setup":
            return {"count": "the number of training rows (public in this test)"}
        if stage == "finalize":
            return {"norm": "the norm of the global model it was sent (public)"}
        return super().reply_entries(cfg, stage)

    def setup_messages(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {} for i in range(self.ctx.num_clients)}

    def client_setup(self, i: int, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor([float(len(self.ctx.clients[i].train_y))])}

    def server_setup(self, replies: Any) -> None:
        self.counts = [float(replies[i]["count"]) for i in sorted(replies)]

    def finalize_messages(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {"global": self.global_params} for i in range(self.ctx.num_clients)}

    def client_finalize(self, i: int, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"norm": message["global"].double().norm().reshape(1)}

    def server_finalize(self, replies: Any) -> dict[str, Any]:
        return {"counts": self.counts,
                "norms": [round(float(replies[i]["norm"]), 4) for i in sorted(replies)]}



@pytest.fixture()
def plug_in() -> Iterator[str]:
    name = f"tallies_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, Tallies)
    try:
        yield name
    finally:
        METHODS.unregister(name)


def _config(method: str) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["training"]["rounds"] = ROUNDS
    data["security"] = {"envelopes": True}
    return parse_config(data)


def _flower_flip(times: int) -> Callable[[Message, Message], Message]:
    """A reply tamperer flipping one bit of the reply envelope's signature, the first
    ``times`` times it is called."""
    calls = [0]

    def flip(_request: Message, reply: Message) -> Message:
        calls[0] += 1
        if calls[0] > times:
            return reply
        record = reply.content["envelope"]
        for name in list(record.keys()):
            envelope = json.loads(record[name])
            signature = bytes.fromhex(envelope["signature"])
            envelope["signature"] = (bytes([signature[0] ^ 0x01]) + signature[1:]).hex()
            record[name] = json.dumps(envelope)
        return reply
    return flip


def _flip_inprocess(monkeypatch: pytest.MonkeyPatch, client: int, stage: str,
                    times: int) -> list[str]:
    """In process: the signature of ``client``'s ``stage`` reply envelopes (kinds ``stage``
    and ``stage.<entry>``) flipped in its first ``times`` replies. Returns the kinds of
    every client reply the exchanges moved."""
    replies: list[str] = []
    flipped: list[int] = []
    real_init = transport_module.SecureExchange.__init__

    def channel(kind: str, r: int, i: int, message: bytes) -> bytes:
        envelope, payload = decode_message(message)
        if envelope.sender == "server":
            return message
        replies.append(kind)
        if i != client or not (kind == stage or kind.startswith(f"{stage}.")) \
                or len(flipped) >= times:
            return message
        flipped.append(r)
        signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
        return encode_message(dataclasses.replace(envelope, signature=signature), payload)

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    return replies


STAGES = {"setup": MSG_SETUP, "finalize": MSG_FINALIZE}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("stage", ["setup", "finalize"])
def test_a_tampered_setup_or_finalize_reply_is_refused_and_asked_again_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plug_in: str, stage: str) -> None:
    """Client 1's first setup (finalize) reply carries a bad signature. On Flower it is an
    envelope: the server refuses it and asks client 1 once more, which answers from its saved
    state. In process the reply went to the server half unsigned (the tampering had nothing
    to tamper with, and nothing was refused); it is an envelope now, refused, and client 1
    is sent its message once more and sends its reply again: the same rejection (client,
    reason and round: 0 for setup, rounds + 1 for finalize in both), the same results."""
    cfg = _config(plug_in)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    rnd = 0 if stage == "setup" else ROUNDS + 1
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_reply={(1, rnd, STAGES[stage]): _flower_flip(1)})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    flower = [(r["client"], r["reason"], r["round"]) for r in results["security"]["rejections"]]
    assert flower == [(1, "bad_signature", rnd)]
    replies = _flip_inprocess(monkeypatch, 1, stage, 1)
    sim, outcome = in_process(cfg, tmp_path, plug_in)
    security = outcome.extra["security"]
    # the same round in both runtimes: the finalize exchange's is rounds + 1 (in process it
    # was the last round's, so its rejection read as one of round 2's)
    assert [(r["client"], r["reason"], r["round"]) for r in security["rejections"]] == flower
    # every client's reply of the stage is an envelope, client 1's twice
    entry = "count" if stage == "setup" else "norm"
    assert sorted(k for k in replies if k.startswith(stage)) == [f"{stage}.{entry}"] * 4
    theirs = results["methods"][plug_in]["extra"]
    for key in ("counts", "norms"):
        assert outcome.extra[key] == theirs[key], key
    assert outcome.extra["counts"] == [float(len(c.train_y)) for c in sim.clients]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("stage, error", [("setup", SetupRejectedError),
                                          ("finalize", FinalizeRejectedError)])
def test_a_setup_or_finalize_reply_rejected_twice_stops_the_run_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plug_in: str, stage: str,
        error: type[Exception]) -> None:
    """Every setup (finalize) reply of client 1 carries a bad signature: the method needs
    every client's reply, so both runtimes stop after asking twice (in process the unsigned
    reply was used and the run completed)."""
    cfg = _config(plug_in)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    rnd = 0 if stage == "setup" else ROUNDS + 1
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_reply={(1, rnd, STAGES[stage]): _flower_flip(99)})
    with pytest.raises(DeployError, match=rf"clients \[1\] gave no accepted {stage} reply "
                                          r"\(asked twice\)"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    _flip_inprocess(monkeypatch, 1, stage, 99)
    with pytest.raises(error, match=rf"client\(s\) \[1\] gave no accepted {stage} reply "
                                    r"\(asked twice\)"):
        in_process(cfg, tmp_path, plug_in)


class NoisedSummaries(Tallies):
    """Tallies whose setup reply is a declared DP release: each client's noised summary."""

    @classmethod
    def releases(cls, cfg: Any) -> tuple[Any, ...]:
        from secure_fedora.algorithms.contract import SETUP, ReleaseSpec
        return (ReleaseSpec("summary", ("gaussian_summary",), SETUP), *super().releases(cfg))

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        if stage == "setup":
            return {"summary": "the noised summary (the 'summary' release)"}
        return super().reply_entries(cfg, stage)

    def client_setup(self, i: int, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        return {"summary": ctx.privacy.noised_summary(i, ctx.clients[i], 2, ctx.num_classes,
                                                      ctx.noise[i])}

    def server_setup(self, replies: Any) -> None:
        self.counts = [round(float(replies[i]["summary"].sum()), 6) for i in sorted(replies)]


@pytest.mark.usefixtures("task_identity")
def test_a_dp_setup_summary_is_signed_by_its_release_pipeline_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DP a plug-in's noised summary (its declared setup release) travels as an envelope
    of kind ``summary`` signed by the summary release's own pipeline (which checks it is the
    admitted payload), the server receives exactly what the client released, and client 1's
    tampered summary is refused and asked for once more, as on Flower."""
    name = f"noised_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, NoisedSummaries)
    try:
        data = json.loads(json.dumps(TINY))
        data.update(methods=[name], security={"envelopes": True},
                    privacy={"enabled": True, "epsilon": 50.0, "delta": 1e-3,
                             "noise": "reproducible"})
        data["training"]["rounds"] = ROUNDS
        cfg = parse_config(data)
        replies = _flip_inprocess(monkeypatch, 1, "summary", 1)
        sim, outcome = in_process(cfg, tmp_path, name)
        assert [(r["client"], r["reason"]) for r in outcome.extra["security"]["rejections"]] \
            == [(1, "bad_signature")]
        assert sorted(k for k in replies if k.startswith(("summary", "setup"))) \
            == ["setup.summary", "summary", "summary", "summary"]
        privacy = sim.methods[name].ctx.privacy
        released = [round(float(privacy.clients[i].summary_release.payload.sum()), 6)
                    for i in range(3)]
        assert outcome.extra["counts"] == released
    finally:
        METHODS.unregister(name)
