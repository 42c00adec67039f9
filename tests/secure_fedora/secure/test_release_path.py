"""One release path: every client upload is signed by the SignEnvelope stage of the client's
release pipeline (after gate + ledger + journal and the step check under DP), and CKKS
summary uploads are encrypted by its EncryptPayload stage."""

import json

import pytest
import torch

from privacy.identity import SERVER_ID
from privacy.ledger import read_ledger
from privacy.noise import ReproducibleNoise
from privacy.pipeline import EncryptPayload, PipelineError, SignEnvelope, StepCountMismatchError
from secure_fedora.algorithms.messages import KIND_EVALUATION_REPLY
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import Simulation, build_clients
from secure_fedora.secure.transport import SecureTransport

BASE = {
    "seed": 5,
    "methods": ["fedora", "fedavg"],
    "data": {"num_clients": 4, "train_per_client": 60, "val_per_client": 20,
             "test_per_client": 20, "groups": 2},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 20, "lr": 0.05},
    "fedavg": {"finetune_epochs": 0},
    "security": {"envelopes": True},
}


def config(dp: bool, **overrides):
    data = json.loads(json.dumps(BASE))
    data["fedora"] = {"relatedness": "noised" if dp else "plain"}
    if dp:
        data["privacy"] = {"enabled": True, "epsilon": 6.0, "delta": 1e-3,
                           "noise": "reproducible"}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


@pytest.fixture(scope="module")
def clients():
    return build_clients(config(False))


@pytest.fixture
def spy(monkeypatch):
    """Records every envelope the transport signs: (sender, kind, round, signed inside a
    SignEnvelope stage, EncryptPayload stages run so far for that sender), and lets a test
    look at the disk at signing time (``on_client_send``)."""
    state = {"depth": 0, "encrypted": {}, "hooks": []}
    sent = []
    real_sign, real_encrypt = SignEnvelope.process, EncryptPayload.process
    real_send = SecureTransport._send

    def sign(self, release):
        state["depth"] += 1
        try:
            return real_sign(self, release)
        finally:
            state["depth"] -= 1

    def encrypt(self, release):
        out = real_encrypt(self, release)
        state["encrypted"][release.round] = state["encrypted"].get(release.round, 0) + 1
        return out

    def send(self, rnd, sender, recipient, kind, payload, digest=None):
        if sender != SERVER_ID:
            for hook in state["hooks"]:
                hook(self, sender, kind, rnd)
        sent.append((sender, kind, rnd, state["depth"] > 0))
        return real_send(self, rnd, sender, recipient, kind, payload, digest)

    monkeypatch.setattr(SignEnvelope, "process", sign)
    monkeypatch.setattr(EncryptPayload, "process", encrypt)
    monkeypatch.setattr(SecureTransport, "_send", send)
    spy_obj = type("Spy", (), {})()
    spy_obj.sent, spy_obj.state = sent, state
    spy_obj.on_client_send = state["hooks"].append
    return spy_obj


def _client_sends(sent):
    return [s for s in sent if s[0] != SERVER_ID]


@pytest.mark.parametrize("dp", [False, True])
def test_every_in_process_upload_is_signed_by_the_pipeline(tmp_path, clients, spy, dp):
    """FEDORA (summary + theta uploads) and FedAvg, with and without DP: each client
    envelope is produced inside a SignEnvelope stage; under DP the ledger already holds the
    accounted entry of the upload's round (and the summary's) when it is signed. Evaluation
    replies (metrics, no accounted release) are signed inside a SignEnvelope stage too."""
    run_dir = tmp_path / "run"
    checked = []
    if dp:
        def ledger_first(transport, sender, kind, rnd):
            if kind == KIND_EVALUATION_REPLY:
                return
            method = transport.context.split("/")[-1].split("-")[0]
            ledger = run_dir / "ledgers" / method / f"{sender}.jsonl"
            wanted = "gaussian_summary" if kind == "summary" else "dpsgd"
            entries = read_ledger(ledger) if ledger.exists() else []
            journal = ledger.with_suffix(".journal")
            checked.append(any(e["round"] == rnd and e["mechanism"] == wanted for e in entries)
                           and journal.exists() and journal.stat().st_size > 0)
        spy.on_client_send(ledger_first)
    Simulation(config(dp), run_dir, clients=clients).run()
    sends = _client_sends(spy.sent)
    assert all(inside for *_, inside in sends), [u for u in sends if not u[3]]
    replies = [s for s in sends if s[1] == KIND_EVALUATION_REPLY]
    assert len(replies) == 2 * 4 * 2  # FEDORA's and FedAvg's 4 clients, 2 evaluated rounds
    uploads = [s for s in sends if s[1] != KIND_EVALUATION_REPLY]
    assert {k for _, k, _, _ in uploads} == {"theta", "summary"}
    # 4 FEDORA summaries, FEDORA's and FedAvg's theta uploads of 4 clients in 2 rounds
    assert [k for _, k, _, _ in uploads].count("summary") == 4
    assert [k for _, k, _, _ in uploads].count("theta") == 2 * 4 * 2
    if dp:  # accounted and journaled before signed, every time
        assert len(checked) == len(uploads) and all(checked)


def test_a_step_mismatch_is_refused_before_the_upload_is_signed(tmp_path, clients, spy,
                                                                monkeypatch):
    """A client that ran one DP-SGD step more than its ledger accounts is refused at the
    step check of its pipeline: no envelope of that round is signed for it."""
    from secure_fedora.secure.private import DPGradient

    honest = DPGradient.batches

    def one_extra(self, n, epochs, generator):
        yield from honest(self, n, epochs, generator)
        yield from list(honest(self, n, epochs, generator))[:1]

    monkeypatch.setattr(DPGradient, "batches", one_extra)
    with pytest.raises(StepCountMismatchError, match="in round 1"):
        Simulation(config(True, methods=["fedavg"]), tmp_path / "run", clients=clients).run()
    assert [s for s in _client_sends(spy.sent) if s[2] >= 1] == []
    last = read_ledger(tmp_path / "run" / "ledgers" / "fedavg" / "client-000.jsonl")[-1]
    assert last["mechanism"] == "refusal"


@pytest.fixture
def dp_privacy(tmp_path):
    from secure_fedora.secure.private import FederationPrivacy

    cfg = config(True, methods=["fedora"])
    privacy = FederationPrivacy.open(cfg, "fedora", 4, tmp_path / "ledgers", tmp_path / "keys")
    transport = SecureTransport.for_simulation(tmp_path, 4, "fedora", key_dir=tmp_path / "keys")
    transport.attach_releases(privacy)
    yield privacy, transport
    privacy.close()


def test_a_refused_release_is_never_signed_or_sent(dp_privacy, spy):
    from privacy.accounting import MechanismRecord, PlannedRelease, calibrate_noise_multiplier
    from privacy.pipeline import Release

    privacy, transport = dp_privacy
    c = privacy.clients[1]
    # something else spent 99% of client 1's budget: its round-1 model no longer fits
    sigma = calibrate_noise_multiplier(0.99 * 6.0, 1e-3, [PlannedRelease("other", 1.0, 1)],
                                       privacy.accountant)
    c.gate.process(Release("other", torch.zeros(1), 0, [MechanismRecord("other", sigma, 1.0)]))
    assert not privacy.admit(1, 1, torch.zeros(3), False, noise=ReproducibleNoise(1))
    assert privacy.admit(2, 1, torch.zeros(3), False, noise=ReproducibleNoise(2))
    with pytest.raises(PipelineError, match="client-001.*refused"):
        transport.client_upload(1, 1, torch.ones(3))
    with pytest.raises(PipelineError, match="client-001.*refused"):
        transport.client_upload_bytes(1, 1, b"ciphertext", "enc_theta")
    # client 2 was admitted but ran no step of the 3 its ledger accounts: refused, unsigned
    with pytest.raises(StepCountMismatchError, match="executed 0"):
        transport.client_upload(1, 2, torch.ones(3))
    assert _client_sends(spy.sent) == []
    assert read_ledger(privacy.clients[2].ledger.path)[-1]["mechanism"] == "refusal"


def test_the_uploaded_summary_must_be_the_admitted_one(dp_privacy, clients, spy):
    privacy, transport = dp_privacy
    summaries = privacy.noised_summaries(clients, 1, 10, [ReproducibleNoise(i) for i in range(4)])
    with pytest.raises(PipelineError, match="not the summary its gate admitted"):
        transport.client_upload(0, 0, summaries[0] + 1e-3, kind="summary")
    assert _client_sends(spy.sent) == []
    message = transport.client_upload(0, 0, summaries[0], kind="summary")
    assert isinstance(message, bytes) and spy.sent[-1][3]


def test_encrypted_summary_uploads_pass_encrypt_payload_then_sign(dp_privacy, clients, spy):
    """Noised + encrypted: each client's upload continues its admitted summary's pipeline:
    EncryptPayload, then SignEnvelope (the signed bytes are the ciphertext)."""
    from secure_fedora.secure.relatedness import encrypted_overlaps

    privacy, transport = dp_privacy
    summaries = privacy.noised_summaries(clients, 1, 10, [ReproducibleNoise(i) for i in range(4)])
    order = []
    spy.on_client_send(lambda _transport, sender, kind, rnd: order.append(
        (sender, kind, spy.state["encrypted"].get(0, 0))))
    result = encrypted_overlaps(summaries, transport=transport)
    assert result.accepted == [0, 1, 2, 3]
    uploads = [s for s in _client_sends(spy.sent) if s[1] == "enc_summary"]
    assert len(uploads) == 4 and all(inside for *_, inside in uploads)
    # the k-th client's upload is signed after the k-th encryption
    assert [n for _, kind, n in order if kind == "enc_summary"] == [1, 2, 3, 4]
    expected = torch.einsum("idq,jdr->ijqr", summaries, summaries)
    assert torch.allclose(result.overlaps, expected, atol=1e-4)


def test_release_stages_list_sign_and_encrypt_where_production_runs_them(tmp_path):
    from secure_fedora.secure.private import (
        FederationPrivacy,
        encrypted_release_kinds,
        release_stage_names,
    )

    cfg = config(True, methods=["fedora"], fedora={"relatedness": "noised+encrypted"})
    privacy = FederationPrivacy.open(cfg, "fedora", 4, tmp_path / "ledgers", tmp_path / "keys")
    try:
        stages = privacy.release_stages(0)
    finally:
        privacy.close()
    assert stages["model"] == ["RecordParams", "BudgetGate", "JournalRelease",
                               "CheckExecutedSteps", "SignEnvelope"]
    assert stages["summary"][-5:] == ["RecordParams", "BudgetGate", "JournalRelease",
                                      "EncryptPayload", "SignEnvelope"]
    # encryption is what the method declares: FedAvg's model is never encrypted
    propagated = config(True, fedora={"propagation": "encrypted"})
    assert encrypted_release_kinds(propagated, "fedora") == ("model",)
    assert encrypted_release_kinds(propagated, "fedavg") == ()
    names = release_stage_names(propagated, "fedora", signed=True)
    assert names["model"][-3:] == ["CheckExecutedSteps", "EncryptPayload", "SignEnvelope"]


@pytest.mark.parametrize(("relatedness", "validation", "envelopes"), [
    ("noised", "private", True), ("noised+encrypted", "public", False)])
def test_results_and_plan_show_the_stages_both_runtimes_build(tmp_path, relatedness, validation,
                                                              envelopes):
    from secure_fedora.cli import privacy_plan_table
    from secure_fedora.secure.private import FederationPrivacy, release_stage_names

    cfg = config(True, methods=["fedora"], fedora={"relatedness": relatedness},
                 data={"validation": validation}, security={"envelopes": envelopes})
    privacy = FederationPrivacy.open(cfg, "fedora", 4, tmp_path / "ledgers", tmp_path / "keys")
    try:
        shown = privacy.summary()["release_stages"]
        rows = privacy.plan_rows()
        # the Flower node's pipeline: journaled as in process, always signed
        flower = {k: v for k, v in privacy.release_stages(0, signed=True).items() if k in shown}
    finally:
        privacy.close()
    assert shown == release_stage_names(cfg, "fedora", signed=envelopes)
    assert flower == release_stage_names(cfg, "fedora", signed=True)
    assert "JournalRelease" in flower["model"] and "JournalRelease" in flower["summary"]
    assert ("lambda" in shown) == (validation == "private") and "summary" in shown
    assert shown["model"][-1] == ("SignEnvelope" if envelopes else "CheckExecutedSteps")
    assert ("EncryptPayload" in shown["summary"]) == ("encrypted" in relatedness)
    assert rows[0]["release_stages"] == shown
    caption = str(privacy_plan_table(rows).caption)
    assert "model release: RecordParams -> BudgetGate -> JournalRelease" in caption


@pytest.mark.parametrize("envelopes", [False, True])
def test_in_process_encrypted_summaries_continue_the_admitted_summary_pipeline(
        tmp_path, clients, monkeypatch, envelopes):
    """Noised + encrypted relatedness in a run: each client's EncryptPayload stage runs on its
    admitted (gated, ledgered, journaled) summary release, with or without envelopes."""
    seen = []
    real = EncryptPayload.process

    def encrypt(self, release):
        seen.append((release.kind, "ledger_index" in release.metadata))
        return real(self, release)

    monkeypatch.setattr(EncryptPayload, "process", encrypt)
    cfg = config(True, methods=["fedora"], fedora={"relatedness": "noised+encrypted"},
                 security={"envelopes": envelopes}, training={"rounds": 1})
    Simulation(cfg, tmp_path / "run", clients=clients).run()
    assert seen == [("summary", True)] * 4
