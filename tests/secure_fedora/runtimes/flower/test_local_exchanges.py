"""Local's messages in both runtimes: its round and evaluation messages are empty and its
replies carry only the step count, but on Flower each is a signed envelope that the receiver
checks. In process Local sent nothing at all, so a tampered Local message could not be
simulated there; each is now an envelope too, and a tampered one is refused alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from audits.verify import verify_run
from privacy.envelope import decode_message, encode_message
from privacy.identity import client_ids
from privacy.ledger import read_ledger
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE, MSG_ROUND, RunSettings
from secure_fedora.secure import transport as transport_module
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    TINY,
    InMemoryGrid,
    assert_client_states_match,
    audit_folder,
    in_process,
    run_config,
    task_identity,
)

N, ROUNDS = 3, 3


def _config(dp: bool = False) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = ["local"]
    data["training"]["rounds"] = ROUNDS
    data["security"] = {"envelopes": True}
    if dp:
        data["data"]["validation"] = "private"
        data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                           "noise": "reproducible"}
    return parse_config(data)


def _flip_signature(message: bytes) -> bytes:
    """``message`` (an in-process wire message) with one bit of its signature flipped."""
    envelope, payload = decode_message(message)
    signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
    return encode_message(dataclasses.replace(envelope, signature=signature), payload)


def _flip_payload(message: bytes) -> bytes:
    """``message`` with one bit of its payload's last byte flipped (the envelope as signed)."""
    return message[:-1] + bytes([message[-1] ^ 0x01])


def _tamper_inprocess(monkeypatch: pytest.MonkeyPatch, kind: str, at: set[tuple[int, int]],
                      how: Any) -> dict[str, int]:
    """In process: every message of ``kind`` to or from client c in round r, (c, r) in ``at``,
    passes ``how``. Returns the count of messages sent per kind (filled as the run goes)."""
    real_init = transport_module.SecureExchange.__init__
    sent: dict[str, int] = {}

    def channel(name: str, rnd: int, client: int, message: bytes) -> bytes:
        sent[name] = sent.get(name, 0) + 1
        return how(message) if name == kind and (client, rnd) in at else message

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    return sent


def _tamper_request_signature(request: Message) -> Message:
    """A Flower request whose envelopes' signatures have one bit flipped."""
    record = request.content["envelope"]
    for name in list(record.keys()):
        envelope = json.loads(record[name])
        signature = bytes.fromhex(envelope["signature"])
        envelope["signature"] = (bytes([signature[0] ^ 0x01]) + signature[1:]).hex()
        record[name] = json.dumps(envelope)
    return request


def _tamper_steps(_request: Message, reply: Message) -> Message:
    """A Flower round reply whose step count is one more (the envelope as signed)."""
    arrays = {k: reply.content["payload"][k].numpy().copy() for k in reply.content["payload"]}
    arrays["steps"] = np.asarray(arrays["steps"] + 1, dtype=arrays["steps"].dtype)
    reply.content["payload"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply


def _flower(tmp_path: Path, cfg: Any, dp: bool = False, **tamper: Any
            ) -> tuple[dict[str, Any], InMemoryGrid]:
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": dp})
    grid = InMemoryGrid(tmp_path / "nodes", rc, N, **tamper)
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42), grid  # type: ignore[arg-type]


def _assert_same_results(results: dict[str, Any], sim: Any, outcome: Any) -> None:
    assert [r["replied"] for r in sim.history] == [r["replied"] for r in results["rounds"]]
    assert [r["evaluated"] for r in sim.history] == [r["evaluated"] for r in results["rounds"]]
    assert [r["steps"] for r in sim.history] == [r["steps"] for r in results["rounds"]]
    ours, theirs = outcome.to_json(), results["methods"]["local"]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], theirs[part]["per_client"],
                           atol=1e-4, rtol=0), part
        assert ours[part].get("stale_clients") == theirs[part].get("stale_clients"), part
    assert ours["selected"]["round"] == theirs["selected"]["round"]


@pytest.mark.usefixtures("task_identity")
def test_local_signs_the_same_messages_in_both_runtimes(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per client and round Flower signs an (empty) round message, a round reply (the step
    count), an (empty) evaluation message and its reply (the metrics); in process Local
    signed none. Now the in-process run signs and accepts the same four per client and round,
    and its results are those of the run without envelopes."""
    cfg = _config()
    results, grid = _flower(tmp_path, cfg)
    flower = {t: sum(1 for m in grid.sent if m.metadata.message_type == t
                     and m.metadata.group_id.startswith("local:")) for t in (MSG_ROUND, MSG_EVALUATE)}
    assert flower == {MSG_ROUND: N * ROUNDS, MSG_EVALUATE: N * ROUNDS}
    assert grid.errors == [] and results["security"]["rejections"] == []
    sent = _tamper_inprocess(monkeypatch, "", set(), lambda m: m)
    sim, outcome = in_process(cfg, tmp_path, "local")
    # each Flower request, and each reply, is one in-process envelope
    assert sent == {"round": flower[MSG_ROUND], "round.steps": flower[MSG_ROUND],
                    "evaluate": flower[MSG_EVALUATE], "evaluate.reply": flower[MSG_EVALUATE]}
    stats = sim.methods["local"].exchange.transport.stats
    assert stats.messages_sent == stats.messages_accepted == 4 * N * ROUNDS
    assert stats.messages_rejected == 0
    assert outcome.to_json()["extra"]["security"]["transport"]["messages_accepted"] == 4 * N * ROUNDS
    _assert_same_results(results, sim, outcome)
    plain, _ = in_process(parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                                        "security": {"envelopes": False}}),
                          tmp_path / "plain", "local")
    assert plain.methods["local"].exchange is None
    assert torch.equal(plain.methods["local"].theta, sim.methods["local"].theta)
    assert _without_seconds(plain.history) == _without_seconds(sim.history)


def _without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_a_tampered_local_round_message_leaves_the_client_out_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp: bool) -> None:
    """Client 1's round-2 message (empty) has a bad signature. On Flower the client refuses
    it (BadSignatureError) and neither trains nor releases; in process nothing was sent, so
    it trained. Both runtimes now leave it out of round 2 with the same error: replies,
    step counts, results, client states and, under DP, the ledgers agree."""
    cfg = _config(dp)
    results, grid = _flower(tmp_path, cfg, dp, tamper_request={
        (1, 2, MSG_ROUND): _tamper_request_signature})
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "BadSignatureError")]
    _tamper_inprocess(monkeypatch, "round", {(1, 2)}, _flip_signature)
    sim, outcome = in_process(cfg, tmp_path, "local")
    rejections = sim.methods["local"].exchange.rejections
    assert [(r.client, r.round, r.direction, r.error_type) for r in rejections] == \
        [(1, 2, "download", "BadSignatureError")]
    assert [r["replied"] for r in results["rounds"]] == [3, 2, 3]
    _assert_same_results(results, sim, outcome)
    assert_client_states_match(tmp_path, cfg, sim, "local")
    if dp:
        spent = {r["client"]: r["epsilon_spent"] for r in sim.privacy["local"]["clients"]}
        for row in results["privacy"]["local"]["clients"]:
            assert row["epsilon_spent"] == pytest.approx(spent[row["client"]], abs=1e-6)
        report = verify_run(audit_folder(tmp_path, "local"),
                            allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                            anchor=tmp_path / "res" / "anchor.json")
        assert report.errors == [], report.errors
        assert verify_run(tmp_path / "inproc").errors == []
        for c, cid in enumerate(client_ids(N)):  # the same releases: none of client 1 in round 2
            node = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "local" / f"{cid}.jsonl"
            ours = tmp_path / "inproc" / "ledgers" / "local" / f"{cid}.jsonl"
            assert _releases(node) == _releases(ours), cid
            assert (c != 1) == any(r == 2 for r, _ in _releases(ours)), cid


def _releases(ledger: Path) -> list[tuple[int, str]]:
    return [(e["round"], e["mechanism"]) for e in read_ledger(ledger) if e["mechanism"] != "close"]


@pytest.mark.usefixtures("task_identity")
def test_a_tampered_local_reply_is_refused_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1's round-1 reply (its step count) is tampered with. The Flower server rejects
    it (a payload hash mismatch) and counts the client as not having replied, while the
    client keeps what it trained; in process the reply was never signed, so it counted.
    Both now refuse it alike: the same reason, replies, step counts, results and states."""
    cfg = _config()
    results, grid = _flower(tmp_path, cfg, tamper_reply={(1, 1, MSG_ROUND): _tamper_steps})
    assert grid.errors == []
    _tamper_inprocess(monkeypatch, "round.steps", {(1, 1)}, _flip_payload)
    sim, outcome = in_process(cfg, tmp_path, "local")
    flower = [(r["client"], r["round"], r["reason"]) for r in results["security"]["rejections"]]
    ours = sim.methods["local"].exchange.rejections
    assert [(r.client, r.round, r.reason) for r in ours] == flower
    assert [(r.error_type, r.direction) for r in ours] == [("PayloadHashMismatchError", "upload")]
    assert [r["replied"] for r in results["rounds"]] == [2, 3, 3]
    _assert_same_results(results, sim, outcome)
    assert_client_states_match(tmp_path, cfg, sim, "local")


@pytest.mark.usefixtures("task_identity")
def test_a_tampered_local_evaluation_message_keeps_the_last_metrics_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1's round-2 evaluation message (empty) has a bad signature: on Flower it
    reports no metrics for round 2; in process it was evaluated as if nothing happened.
    Both now agree on the evaluated counts, the error and the per-client results."""
    cfg = _config()
    results, grid = _flower(tmp_path, cfg, tamper_request={
        (1, 2, MSG_EVALUATE): _tamper_request_signature})
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "BadSignatureError")]
    _tamper_inprocess(monkeypatch, "evaluate", {(1, 2)}, _flip_signature)
    sim, outcome = in_process(cfg, tmp_path, "local")
    assert [(r.client, r.round, r.error_type) for r in sim.methods["local"].exchange.rejections] \
        == [(1, 2, "BadSignatureError")]
    assert [r["evaluated"] for r in results["rounds"]] == [3, 2, 3]
    _assert_same_results(results, sim, outcome)
