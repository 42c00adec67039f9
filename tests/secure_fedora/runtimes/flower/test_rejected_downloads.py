"""A rejected round download in both runtimes: the client sits the round out (no training,
no release, under DP nothing admitted), as a Flower ClientApp that refuses the message does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from audits.verify import verify_run
from privacy.envelope import decode_message, encode_message
from privacy.identity import client_ids
from privacy.ledger import read_ledger
from secure_fedora.algorithms.messages import KIND_CLUSTERS, KIND_GLOBAL, KIND_PHI
from secure_fedora.algorithms.methods import FederatedMethod, FinalizeRejectedError
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_FINALIZE, MSG_ROUND, RunSettings
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

DOWNLOAD = {"fedora": KIND_PHI, "fedavg": KIND_GLOBAL, "ifca": KIND_CLUSTERS}


def _config(method: str, dp: bool) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["training"]["rounds"] = 3
    data["security"] = {"envelopes": True}
    data["baselines"] = {"ifca": {"num_clusters": 2}}
    if dp:
        # IFCA picks its cluster on validation data it declares public
        data["data"]["validation"] = "public" if method == "ifca" else "private"
        data["baselines"]["ifca"]["selection_split"] = "val"
        data["fedora"]["relatedness"] = "noised"
        data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                           "noise": "reproducible"}
    return parse_config(data)


def _tamper_request(kind: str) -> Any:
    def tamper(request: Message) -> Message:
        arrays = {k: request.content["payload"][k].numpy().copy()
                  for k in request.content["payload"]}
        arrays[kind] = arrays[kind] + 1.0  # the envelope is left as signed
        request.content["payload"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return request

    return tamper


def _tamper_inprocess(monkeypatch: pytest.MonkeyPatch, kind: str,
                      rejected: set[tuple[int, int]]) -> None:
    real_init = transport_module.SecureExchange.__init__

    def channel(sent: str, rnd: int, client: int, message: bytes) -> bytes:
        if sent == kind and (client, rnd) in rejected:
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
@pytest.mark.parametrize("method", ["fedora", "fedavg", "ifca"])
def test_a_rejected_download_leaves_the_client_out_of_the_round_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, dp: bool) -> None:
    """Client 1 rejects its round-2 download (FEDORA's phi, FedAvg's global model, IFCA's
    cluster models). On Flower it refuses the message and sends no reply; in process it used
    to train on its last accepted copy (and under DP IFCA stopped the run with a
    StepCountMismatchError: its release was admitted before the download was checked). Both
    runtimes now leave it out of round 2: the replies per round, per-client results, client
    states, the ledgers and the reported epsilon agree."""
    cfg = _config(method, dp)
    kind, rejected = DOWNLOAD[method], {(1, 2)}
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": dp})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_request={(c, r, MSG_ROUND): _tamper_request(kind)
                                        for c, r in rejected})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "PayloadHashMismatchError")]
    _tamper_inprocess(monkeypatch, kind, rejected)
    sim, outcome = in_process(cfg, tmp_path, method)
    assert {(r.client, r.round) for r in sim.methods[method].exchange.rejections} == rejected
    flower_rounds = [r["replied"] for r in results["rounds"]]
    assert flower_rounds == [3, 2, 3]
    assert [r["replied"] for r in sim.history] == flower_rounds
    ours = results["methods"][method]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], outcome.to_json()[part]["per_client"],
                           atol=1e-4, rtol=0), part
    assert_client_states_match(tmp_path, cfg, sim, method)
    if dp:
        spent = {r["client"]: r["epsilon_spent"] for r in sim.privacy[method]["clients"]}
        for row in results["privacy"][method]["clients"]:
            assert row["epsilon_spent"] == pytest.approx(spent[row["client"]], abs=1e-6)
            assert 0 < row["epsilon_spent"] <= 8.0 and not row["refused"]
        allowlist = tmp_path / "ids" / "server" / "allowlist.json"
        report = verify_run(audit_folder(tmp_path, method), allowlist=allowlist,
                            anchor=tmp_path / "res" / "anchor.json")
        assert report.errors == [], report.errors
        report = verify_run(tmp_path / "inproc")
        assert report.errors == [], report.errors
        for c, cid in enumerate(client_ids(3)):  # the same releases: none of client 1 in round 2
            node = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / method / f"{cid}.jsonl"
            ours = tmp_path / "inproc" / "ledgers" / method / f"{cid}.jsonl"
            assert _releases(node) == _releases(ours), cid
            assert (c != 1) == any(r == 2 for r, _ in _releases(ours)), cid


def _releases(ledger: Path) -> list[tuple[int, str]]:
    return [(e["round"], e["mechanism"]) for e in read_ledger(ledger) if e["mechanism"] != "close"]


def _tamper_first_finalize(monkeypatch: pytest.MonkeyPatch, kind: str, client: int,
                           times: int) -> None:
    """In process: the first ``times`` finalize messages of ``kind`` to ``client`` tampered."""
    real_init = transport_module.SecureExchange.__init__
    real_finalize = FederatedMethod.finalize
    state = {"finalizing": False, "left": times}

    def finalize(self):  # type: ignore[no-untyped-def]
        state["finalizing"] = True
        return real_finalize(self)

    def channel(sent: str, rnd: int, to: int, message: bytes) -> bytes:
        if state["finalizing"] and sent == kind and to == client and state["left"]:
            state["left"] -= 1
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    monkeypatch.setattr(FederatedMethod, "finalize", finalize)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ["fedavg", "ifca"])
def test_a_rejected_finalize_message_is_sent_again_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Client 1 rejects its first finalize message (FedAvg's final model, IFCA's cluster
    models). The Flower server asks it again and its results are those of an undisturbed
    run; in process it used to fine-tune its last accepted (stale) model (FedAvg) or be left
    out of the results (IFCA). It is now sent the message again too, and both agree."""
    cfg = _config(method, dp=False)
    tampered = {"left": 1}

    def once(request: Message) -> Message:
        if tampered["left"]:
            tampered["left"] -= 1
            return _tamper_request(DOWNLOAD[method])(request)
        return request

    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_request={(1, 4, MSG_FINALIZE): once})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "PayloadHashMismatchError")]
    _tamper_first_finalize(monkeypatch, DOWNLOAD[method], 1, times=1)
    sim, outcome = in_process(cfg, tmp_path, method)
    assert [(r.client, r.direction) for r in sim.methods[method].exchange.rejections] == \
        [(1, "download")]
    ours, theirs = outcome.to_json()["extra"], results["methods"][method]["extra"]
    key = "finetuned_test_accuracy" if method == "fedavg" else "assignment"
    assert key in ours and np.allclose(ours[key], theirs[key], atol=1e-4, rtol=0)


def test_a_finalize_message_rejected_twice_stops_the_in_process_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on Flower (a DeployError after the second try), not a fine-tuning of a stale model."""
    cfg = _config("fedavg", dp=False)
    _tamper_first_finalize(monkeypatch, KIND_GLOBAL, 1, times=2)
    with pytest.raises(FinalizeRejectedError, match=r"client\(s\) \[1\] rejected the finalize"):
        in_process(cfg, tmp_path, "fedavg")


@pytest.mark.usefixtures("task_identity")
def test_a_tampered_empty_finalize_message_is_sent_again_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """APFL's finalize message (asking each client's mixing weight) is empty. Flower signs it,
    so client 1 refuses one with a bad signature and is asked again; in process nothing was
    sent, so nothing could be refused. It is now one signed empty envelope of kind
    'finalize': both runtimes refuse it with the same error and report the same weights."""
    cfg = _config("apfl", dp=False)
    left = {"flower": 1, "ours": 1}

    def once(request: Message) -> Message:
        if left["flower"]:
            left["flower"] -= 1
            record = request.content["envelope"]
            for name in list(record.keys()):
                envelope = json.loads(record[name])
                signature = bytes.fromhex(envelope["signature"])
                envelope["signature"] = (bytes([signature[0] ^ 0x01]) + signature[1:]).hex()
                record[name] = json.dumps(envelope)
        return request

    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request={(1, 4, MSG_FINALIZE): once})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [(c, type(e).__name__) for c, _, e in grid.errors] == [(1, "BadSignatureError")]
    real_init = transport_module.SecureExchange.__init__

    def channel(kind: str, rnd: int, client: int, message: bytes) -> bytes:
        if kind == "finalize" and client == 1 and left["ours"]:
            left["ours"] -= 1
            envelope, payload = decode_message(message)
            signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
            return encode_message(dataclasses.replace(envelope, signature=signature), payload)
        return message

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    sim, outcome = in_process(cfg, tmp_path, "apfl")
    assert [(r.client, r.direction, r.error_type) for r in sim.methods["apfl"].exchange.rejections] \
        == [(1, "download", "BadSignatureError")]
    ours, theirs = outcome.to_json()["extra"], results["methods"]["apfl"]["extra"]
    assert np.allclose(ours["alpha"], theirs["alpha"], atol=1e-4, rtol=0)
