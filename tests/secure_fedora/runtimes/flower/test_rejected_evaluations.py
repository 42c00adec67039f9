"""A rejected evaluation message, and a rejected download of a kind the method does not track,
in both runtimes: every server -> client message is signed in process as on Flower, and a
client that rejects one is treated alike (no metrics: it keeps its last ones, named under
stale_clients; a run without any metric of a client, or under DP without its final one, stops)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from privacy.envelope import decode_message, encode_message
from secure_fedora.algorithms.baselines import KEY_CLUSTERS_VERSION
from secure_fedora.algorithms.messages import KIND_CLUSTERS, KIND_EVALUATION_REPLY, KIND_GLOBAL
from secure_fedora.algorithms.methods import EvaluationRejectedError
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE, MSG_ROUND, DeployError, RunSettings
from secure_fedora.secure import transport as transport_module
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    InMemoryGrid,
    in_process,
    run_config,
    task_identity,
)
from tests.secure_fedora.runtimes.flower.test_rejected_downloads import _config

EVALUATED = {"fedavg": KIND_GLOBAL, "ifca": KIND_CLUSTERS}


def _times(tamper: Any, times: int) -> Any:
    """``tamper`` for the first ``times`` requests it sees, then the request as sent."""
    left = {"n": times}

    def once(request: Message) -> Message:
        if left["n"]:
            left["n"] -= 1
            return tamper(request)
        return request

    return once


def _tamper_inprocess(monkeypatch: pytest.MonkeyPatch, kind: str,
                      times: dict[tuple[int, int], int]) -> None:
    """In process: the first ``times[(client, round)]`` messages of ``kind`` to that client in
    that round are tampered (one bit of the payload flipped)."""
    real_init = transport_module.SecureExchange.__init__
    left = dict(times)

    def channel(sent: str, rnd: int, client: int, message: bytes) -> bytes:
        if sent == kind and left.get((client, rnd)):
            left[client, rnd] -= 1
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)


def _tamper_entry(kind: str) -> Any:
    """A request whose ``kind`` entry is changed by one (dtype kept; the envelope as signed)."""
    def tamper(request: Message) -> Message:
        arrays = {k: request.content["payload"][k].numpy().copy()
                  for k in request.content["payload"]}
        arrays[kind] = np.asarray(arrays[kind] + 1, dtype=arrays[kind].dtype)
        request.content["payload"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return request

    return tamper


def _flower(cfg: Any, tmp_path: Path, kind: str, times: dict[tuple[int, int], int],
            message_type: str = MSG_EVALUATE, dp: bool = False) -> tuple[dict[str, Any], Any]:
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": dp})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request={
        (c, r, message_type): _times(_tamper_entry(kind), n) for (c, r), n in times.items()})
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42), grid  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("times", "stale"), [
    ({(1, 2): 1, (1, 3): 2}, [{"client": 1, "round": 1}]),  # final rejected twice: stale
    ({(1, 3): 1}, None),  # final rejected once: asked again, not stale
], ids=["twice", "once"])
@pytest.mark.parametrize("method", ["fedavg", "ifca"])
def test_a_rejected_evaluation_message_keeps_the_last_metrics_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        times: dict[tuple[int, int], int], stale: list[dict[str, int]] | None) -> None:
    """Client 1 rejects its evaluation message (FedAvg's global model, IFCA's cluster models).
    On Flower it reports no metrics and keeps its last ones (the final evaluation is sent
    once more); in process the evaluation messages travelled unsigned, so a tampered one
    could not be rejected and the client was evaluated on it. Both runtimes now agree on the
    evaluated counts, the per-client results and stale_clients."""
    cfg = _config(method, dp=False)
    results, grid = _flower(cfg, tmp_path, EVALUATED[method], times)
    assert {type(e).__name__ for _, _, e in grid.errors} == {"PayloadHashMismatchError"}
    _tamper_inprocess(monkeypatch, f"evaluate.{EVALUATED[method]}", times)
    sim, outcome = in_process(cfg, tmp_path, method)
    rejected = [(r.client, r.round) for r in sim.methods[method].exchange.rejections]
    assert rejected == [k for k, n in sorted(times.items()) for _ in range(n)]
    assert [r["evaluated"] for r in sim.history] == [r["evaluated"] for r in results["rounds"]]
    for ours_row, their_row in zip(sim.history, results["rounds"], strict=True):
        for key in ("test_mean", "test_min", "test_max", "test_std", "val_mean"):
            assert np.isclose(ours_row[key], their_row[key], atol=1e-4, rtol=0), (key, ours_row)
    ours, theirs = outcome.to_json(), results["methods"][method]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], theirs[part]["per_client"],
                           atol=1e-4, rtol=0), part
        assert ours[part].get("stale_clients") == theirs[part].get("stale_clients"), part
    assert ours["selected"]["round"] == theirs["selected"]["round"]
    assert ours["final"].get("stale_clients") == stale


@pytest.mark.usefixtures("task_identity")
def test_a_round_with_a_placeholder_metric_is_not_selected_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1 rejects round 1's evaluation message, so it has no metric in round 1 (a
    placeholder 0). Both runtimes selected round 1 there, its selected_mean averaging that 0
    in; now round 1 is not eligible (no selection in its row) and results.json names it under
    selected.unmeasured_rounds, in both runtimes alike."""
    cfg = _config("fedavg", dp=False)
    times = {(1, 1): 1}
    results, _ = _flower(cfg, tmp_path, KIND_GLOBAL, times)
    _tamper_inprocess(monkeypatch, f"evaluate.{KIND_GLOBAL}", times)
    sim, outcome = in_process(cfg, tmp_path, "fedavg")
    for rows in (sim.history, results["rounds"]):
        assert [r["evaluated"] for r in rows] == [2, 3, 3]
        assert (rows[0]["selected_mean"], rows[0]["selected_round"]) == (None, None)
        assert all(r["selected_round"] in (2, 3) for r in rows[1:])
    ours, theirs = outcome.to_json()["selected"], results["methods"]["fedavg"]["selected"]
    assert ours["unmeasured_rounds"] == theirs["unmeasured_rounds"] == [1]
    assert ours["round"] == theirs["round"] != 1
    assert "stale_clients" not in ours and "stale_clients" not in theirs


def _tamper_signature(request: Message) -> Message:
    """A request whose envelopes' signatures have one bit flipped (the payload as sent)."""
    record = request.content["envelope"]
    for name in list(record.keys()):
        envelope = json.loads(record[name])
        signature = bytes.fromhex(envelope["signature"])
        envelope["signature"] = (bytes([signature[0] ^ 0x01]) + signature[1:]).hex()
        record[name] = json.dumps(envelope)
    return request


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ["ditto", "fedora"])
def test_a_tampered_empty_evaluation_message_is_rejected_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Ditto's and FEDORA's evaluation messages are empty (each client is evaluated on its
    own model). On Flower they are signed like every message, so a tampered one is rejected
    and the client keeps its last metrics; in process nothing was sent, so nothing could be
    rejected and the runtimes' evaluated counts differed. An empty message is now one signed
    empty envelope (kind 'evaluate') in process too."""
    cfg = _config(method, dp=False)
    times = {(1, 2): 1}
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request={
        (1, 2, MSG_EVALUATE): _times(_tamper_signature, 1)})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    _tamper_inprocess(monkeypatch, "evaluate", times)
    sim, outcome = in_process(cfg, tmp_path, method)
    assert [(r.client, r.round) for r in sim.methods[method].exchange.rejections] == [(1, 2)]
    assert [r["evaluated"] for r in results["rounds"]] == [r["evaluated"] for r in sim.history] \
        == [3, 2, 3]
    ours, theirs = outcome.to_json(), results["methods"][method]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], theirs[part]["per_client"],
                           atol=1e-4, rtol=0), part
        assert ours[part].get("stale_clients") == theirs[part].get("stale_clients"), part


@pytest.mark.usefixtures("task_identity")
def test_a_client_that_rejects_every_evaluation_stops_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its figures would be placeholder zeros: Flower stops with a DeployError, in process
    the run used to complete with the client evaluated on the tampered model."""
    cfg = _config("fedavg", dp=False)
    times = {(1, 1): 1, (1, 2): 1, (1, 3): 2}
    with pytest.raises(DeployError, match=r"clients \[1\] never reported an evaluation"):
        _flower(cfg, tmp_path, KIND_GLOBAL, times)
    _tamper_inprocess(monkeypatch, f"evaluate.{KIND_GLOBAL}", times)
    with pytest.raises(EvaluationRejectedError, match=r"clients \[1\] never reported"):
        in_process(cfg, tmp_path, "fedavg")


@pytest.mark.usefixtures("task_identity")
def test_under_dp_a_final_evaluation_rejected_twice_stops_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Flower a DP client closes its ledger when it answers the final evaluation, so the
    server stops the run; in process it now stops too rather than complete where Flower
    cannot."""
    cfg = _config("fedavg", dp=True)
    times = {(1, 3): 2}
    with pytest.raises(DeployError, match=r"clients \[1\] did not answer the final evaluation"):
        _flower(cfg, tmp_path, KIND_GLOBAL, times, dp=True)
    _tamper_inprocess(monkeypatch, f"evaluate.{KIND_GLOBAL}", times)
    with pytest.raises(EvaluationRejectedError, match=r"clients \[1\] rejected the final"):
        in_process(cfg, tmp_path, "fedavg")


@pytest.mark.usefixtures("task_identity")
def test_an_untracked_download_kind_is_signed_and_a_tampered_one_rejected_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IFCA's clusters_version (an integer entry the exchange does not track) travelled
    unsigned in process, so a tampered one was used; Flower signs every entry. Client 1
    tampered with in round 2 now sits that round out in both runtimes, with equal results."""
    cfg = _config("ifca", dp=False)
    times = {(1, 2): 1}
    results, grid = _flower(cfg, tmp_path, KEY_CLUSTERS_VERSION, times, MSG_ROUND)
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "PayloadHashMismatchError")]
    _tamper_inprocess(monkeypatch, KEY_CLUSTERS_VERSION, times)
    sim, outcome = in_process(cfg, tmp_path, "ifca")
    assert [(r.client, r.round, r.reason) for r in sim.methods["ifca"].exchange.rejections] == \
        [(1, 2, "payload_hash_mismatch")]
    assert [r["replied"] for r in results["rounds"]] == [3, 2, 3]
    assert [r["replied"] for r in sim.history] == [3, 2, 3]
    ours, theirs = outcome.to_json(), results["methods"]["ifca"]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], theirs[part]["per_client"],
                           atol=1e-4, rtol=0), part
    assert ours["extra"]["assignment"] == theirs["extra"]["assignment"]


@pytest.mark.usefixtures("task_identity")
def test_a_tampered_evaluation_message_of_ckks_propagation_fedora_is_rejected_as_on_flower(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With encrypted propagation (which Flower does not run) FEDORA's evaluation message is
    still the empty one that Flower signs for FEDORA; in process it went unsigned, so a
    tampered one could not be rejected. Client 1's evaluation message has a bad signature
    in round 2 and twice in the final round: both runtimes reject it with the same error,
    evaluate alike and name client 1 stale in the final results."""
    times = {(1, 2): 1, (1, 3): 2}
    cfg = _config("fedora", dp=False)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request={
        (c, r, MSG_EVALUATE): _times(_tamper_signature, n) for (c, r), n in times.items()})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "BadSignatureError")] * 3
    encrypted = parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                              "fedora": {**cfg.fedora.model_dump(mode="json"),
                                         "propagation": "encrypted"}})
    left = dict(times)
    real_init = transport_module.SecureExchange.__init__

    def channel(kind: str, rnd: int, client: int, message: bytes) -> bytes:
        if kind == "evaluate" and left.get((client, rnd)):
            left[client, rnd] -= 1
            envelope, payload = decode_message(message)
            signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
            return encode_message(dataclasses.replace(envelope, signature=signature), payload)
        return message

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    sim, outcome = in_process(encrypted, tmp_path, "fedora")
    method = sim.methods["fedora"]
    assert method.propagator is not None and method.propagator.stats.rounds == 3
    assert [(r.client, r.round, r.error_type, r.direction) for r in method.exchange.rejections] \
        == [(1, 2, "BadSignatureError", "download")] + [(1, 3, "BadSignatureError", "download")] * 2
    assert [r["evaluated"] for r in results["rounds"]] == [r["evaluated"] for r in sim.history] \
        == [3, 2, 2]
    ours, theirs = outcome.to_json(), results["methods"]["fedora"]
    for part in ("selected", "final"):
        assert ours[part].get("stale_clients") == theirs[part].get("stale_clients"), part
    assert ours["final"]["stale_clients"] == [{"client": 1, "round": 1}]
    # per client and round, as the plaintext run: theta up, phi down (ciphertexts), the
    # evaluation message; and the final one once more to client 1; an evaluation reply per
    # accepted evaluation message (3 + 2 + 2)
    transport = method.exchange.transport.stats
    assert transport.messages_sent == 3 * 3 * 3 + 1 + 7 and transport.messages_rejected == 3


def _tamper_kinds(monkeypatch: pytest.MonkeyPatch,
                  times: dict[str, dict[tuple[int, int], int]]) -> dict[str, int]:
    """In process: the first ``times[kind][(client, round)]`` messages of ``kind`` to or from
    that client in that round have their signature's first bit flipped (a reply: its last
    payload byte). Returns the count of messages per kind (filled as the run goes)."""
    left = {kind: dict(t) for kind, t in times.items()}
    sent: dict[str, int] = {}
    real_init = transport_module.SecureExchange.__init__

    def channel(kind: str, rnd: int, client: int, message: bytes) -> bytes:
        sent[kind] = sent.get(kind, 0) + 1
        if not left.get(kind, {}).get((client, rnd)):
            return message
        left[kind][client, rnd] -= 1
        if kind == KIND_EVALUATION_REPLY:
            return message[:-1] + bytes([message[-1] ^ 0x01])
        envelope, payload = decode_message(message)
        signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
        return encode_message(dataclasses.replace(envelope, signature=signature), payload)

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    return sent


def _tamper_metrics(times: int) -> Any:
    """A Flower evaluation reply whose test metric is halved (still in [0, 1]; the envelope as
    signed), for the first ``times`` replies it sees."""
    left = {"n": times}

    def tamper(_request: Message, reply: Message) -> Message:
        if left["n"]:
            left["n"] -= 1
            metrics = reply.content["metrics"]
            metrics["test-metric"] = float(metrics["test-metric"]) / 2
        return reply

    return tamper


def _flower_replies(cfg: Any, tmp_path: Path, replies: dict[tuple[int, int], int],
                    requests: dict[tuple[int, int], int] | None = None,
                    dp: bool = False) -> tuple[dict[str, Any], Any]:
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": dp})
    grid = InMemoryGrid(
        tmp_path / "nodes", rc, 3,
        tamper_reply={(c, r, MSG_EVALUATE): _tamper_metrics(n) for (c, r), n in replies.items()},
        tamper_request={(c, r, MSG_EVALUATE): _times(_tamper_signature, n)
                        for (c, r), n in (requests or {}).items()})
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42), grid  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("times", "stale"), [
    ({(1, 2): 1, (1, 3): 2}, [{"client": 1, "round": 1}]),  # final rejected twice: stale
    ({(1, 3): 1}, None),  # final rejected once: asked again, not stale
], ids=["twice", "once"])
@pytest.mark.parametrize("method", ["fedavg", "fedora"])
def test_a_tampered_evaluation_reply_keeps_the_last_metrics_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        times: dict[tuple[int, int], int], stale: list[dict[str, int]] | None) -> None:
    """Client 1's evaluation reply (its metrics) is tampered with on the way to the server.
    On Flower the reply is a signed envelope: the server rejects it (payload hash), the
    client keeps its last metrics and the final evaluation is asked once more; in process
    the metrics never travelled, so the tampered figures could not be rejected. Both
    runtimes now reject the same replies for the same reason and report alike."""
    cfg = _config(method, dp=False)
    results, grid = _flower_replies(cfg, tmp_path, times)
    assert grid.errors == []
    flower = [(r["client"], r["round"], r["reason"]) for r in results["security"]["rejections"]
              if r["method"] == method]
    assert flower == [(c, r, "payload_hash_mismatch") for (c, r), n in sorted(times.items())
                      for _ in range(n)]
    sent = _tamper_kinds(monkeypatch, {KIND_EVALUATION_REPLY: times})
    sim, outcome = in_process(cfg, tmp_path, method)
    ours = sim.methods[method].exchange.rejections
    assert [(r.client, r.round, r.reason) for r in ours] == flower
    assert {(r.error_type, r.direction) for r in ours} == {("PayloadHashMismatchError", "upload")}
    assert [r["evaluated"] for r in sim.history] == [r["evaluated"] for r in results["rounds"]]
    for ours_row, their_row in zip(sim.history, results["rounds"], strict=True):
        for key in ("test_mean", "test_min", "test_max", "test_std", "val_mean"):
            assert np.isclose(ours_row[key], their_row[key], atol=1e-4, rtol=0), (key, ours_row)
    mine, theirs = outcome.to_json(), results["methods"][method]
    for part in ("selected", "final"):
        assert np.allclose(mine[part]["per_client"], theirs[part]["per_client"],
                           atol=1e-4, rtol=0), part
        assert mine[part].get("stale_clients") == theirs[part].get("stale_clients"), part
    assert mine["selected"]["round"] == theirs["selected"]["round"]
    assert mine["final"].get("stale_clients") == stale
    # one reply per evaluation message accepted, as the Flower evaluation requests and replies
    requests = sum(1 for m in grid.sent if m.metadata.message_type == MSG_EVALUATE
                   and m.metadata.group_id.startswith(f"{method}:"))
    assert sent[KIND_EVALUATION_REPLY] == requests == 3 * 3 + 1  # the final one asked again


@pytest.mark.usefixtures("task_identity")
def test_a_final_evaluation_gets_two_tries_of_message_and_reply_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1 rejects its final evaluation message once, then its reply to the message
    sent again is tampered with: on Flower the retry was its last try, so it keeps its round-2
    metrics; in process it must not get a third try either."""
    cfg = _config("fedora", dp=False)
    results, grid = _flower_replies(cfg, tmp_path, {(1, 3): 1}, requests={(1, 3): 1})
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "BadSignatureError")]
    assert [(r["client"], r["round"], r["reason"]) for r in results["security"]["rejections"]] \
        == [(1, 3, "payload_hash_mismatch")]
    _tamper_kinds(monkeypatch, {"evaluate": {(1, 3): 1}, KIND_EVALUATION_REPLY: {(1, 3): 1}})
    sim, outcome = in_process(cfg, tmp_path, "fedora")
    assert [(r.client, r.round, r.error_type) for r in sim.methods["fedora"].exchange.rejections] \
        == [(1, 3, "BadSignatureError"), (1, 3, "PayloadHashMismatchError")]
    assert [r["evaluated"] for r in results["rounds"]] == [r["evaluated"] for r in sim.history] \
        == [3, 3, 2]
    mine, theirs = outcome.to_json(), results["methods"]["fedora"]
    assert mine["final"]["stale_clients"] == theirs["final"]["stale_clients"] \
        == [{"client": 1, "round": 2}]
    assert np.allclose(mine["final"]["per_client"], theirs["final"]["per_client"], atol=1e-4, rtol=0)


@pytest.mark.usefixtures("task_identity")
def test_under_dp_a_final_evaluation_reply_rejected_twice_stops_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DP client's final evaluation reply (sent as it closes its ledger) is tampered with
    in both tries: the Flower server stops the run, and so does the in-process runtime
    (before, the unsigned metrics were used and the run completed)."""
    cfg = _config("fedavg", dp=True)
    times = {(1, 3): 2}
    with pytest.raises(DeployError, match=r"clients \[1\] did not answer the final evaluation"):
        _flower_replies(cfg, tmp_path, times, dp=True)
    _tamper_kinds(monkeypatch, {KIND_EVALUATION_REPLY: times})
    with pytest.raises(EvaluationRejectedError, match=r"clients \[1\] rejected the final"):
        in_process(cfg, tmp_path, "fedavg")
