"""On Flower, every client reply is signed by the SignEnvelope stage of the client's release
pipeline: under DP after gate + ledger and the step check of the round's model release, for
an encrypted summary after its EncryptPayload stage (in-memory grid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict

from privacy.identity import SERVER_ID
from privacy.ledger import read_ledger
from privacy.pipeline import EncryptPayload, SignEnvelope
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.envelopes import MessageSecurity
from secure_fedora.runtimes.flower.protocol import RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    dp_config,
    in_process,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    with_methods,
)


class Signatures:
    """Every envelope signed on the grid: (party, message type, round, signed inside a
    SignEnvelope stage, EncryptPayload stages run so far, record names of the content)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, nodes: Path) -> None:
        self.rows: list[tuple[str, str, int, bool, int, list[str]]] = []
        self.ledger_ok: list[bool] = []
        self.depth = self.encrypted = 0
        real_sign, real_encrypt, real_msg = (SignEnvelope.process, EncryptPayload.process,
                                             MessageSecurity.sign)
        spy = self

        def sign(stage: SignEnvelope, release: Any) -> Any:
            spy.depth += 1
            try:
                return real_sign(stage, release)
            finally:
                spy.depth -= 1

        def encrypt(stage: EncryptPayload, release: Any) -> Any:
            spy.encrypted += 1
            return real_encrypt(stage, release)

        def msg_sign(security: MessageSecurity, content: RecordDict, message_type: str,
                     recipients: Any, rnd: int, *, reply: bool) -> RecordDict:
            party = security.party_id
            if party != SERVER_ID and message_type == "train.round" and "payload" in content:
                method = content["run"]["method"]
                c = int(party.split("-")[1])
                ledger = nodes / f"node-{c}" / "runs" / "42" / str(method) / f"{party}.jsonl"
                spy.ledger_ok.append(ledger.exists() and any(
                    e["round"] == rnd and e["mechanism"] == "dpsgd" for e in read_ledger(ledger)))
            spy.rows.append((party, message_type, rnd, spy.depth > 0, spy.encrypted,
                             sorted(content.keys())))
            return real_msg(security, content, message_type, recipients, rnd, reply=reply)

        monkeypatch.setattr(SignEnvelope, "process", sign)
        monkeypatch.setattr(EncryptPayload, "process", encrypt)
        monkeypatch.setattr(MessageSecurity, "sign", msg_sign)

    def replies(self) -> list[tuple[str, str, int, bool, int, list[str]]]:
        return [r for r in self.rows if r[0] != SERVER_ID]


@pytest.mark.usefixtures("task_identity")
def test_dp_grid_replies_are_signed_by_the_pipeline_and_a_refusal_carries_no_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FEDORA (noised summary) and FedAvg under DP; client 1 is refused at round 2: its
    round-2 reply is a signed refusal without a payload; every other reply went through the
    pipeline with its round's ledger entry already on disk; results equal in-process."""
    original = client_app.ClientSidePrivacy.admit

    def admit(self, i, rnd, theta, with_lambda, noise=None):  # type: ignore[no-untyped-def]
        if i == 1 and rnd == 2 and self.method == "fedavg":
            self.sole.refused_at, self.sole.refusal = rnd, "budget exhausted (test)"
            return False
        return original(self, i, rnd, theta, with_lambda, noise=noise)

    monkeypatch.setattr(client_app.ClientSidePrivacy, "admit", admit)
    spy = Signatures(monkeypatch, tmp_path / "nodes")
    cfg = with_methods(dp_config(noise="reproducible"), "fedora", "fedavg")
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True, "compare-methods": True})
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    replies = spy.replies()
    assert replies and all(inside for *_, inside, _, _ in replies)
    rounds = [r for r in replies if r[1] == "train.round"]
    assert len(rounds) == 2 * 3 * 2  # two methods, three clients, two rounds
    refused = [r for r in rounds if r[0] == "client-001" and r[2] == 2 and "refusal" in r[5]]
    assert len(refused) == 1 and "payload" not in refused[0][5]
    assert len(spy.ledger_ok) == 2 * 3 * 2 - 1 and all(spy.ledger_ok)
    sim, outcome = in_process(cfg, tmp_path, "fedora")
    assert np.allclose(results["methods"]["fedora"]["selected"]["per_client"],
                       outcome.selected["per_client"], atol=1e-4, rtol=0)


@pytest.mark.usefixtures("task_identity")
def test_grid_encrypted_summary_passes_encrypt_payload_before_it_is_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = json.loads(json.dumps(TINY))
    data["fedora"].update(relatedness="noised+encrypted", k=1)
    data["data"]["validation"] = "private"
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible"}
    cfg = parse_config(data)
    spy = Signatures(monkeypatch, tmp_path / "nodes")
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True})
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    assert results["events"] == []
    uploads = [r for r in spy.replies() if r[1] == "query.encrypted_summary"]
    assert len(uploads) == 3 and all(inside for *_, inside, _, _ in uploads)
    # each reply was signed after its own EncryptPayload stage, with the ciphertext in it
    assert [r[4] for r in uploads] == [1, 2, 3]
    assert all("upload" in r[5] for r in uploads)
    for c in range(3):  # the summary was accounted (gate + ledger) before it was encrypted
        ledger = (tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora"
                  / f"client-{c:03d}.jsonl")
        assert read_ledger(ledger)[0]["mechanism"] == "gaussian_summary"
