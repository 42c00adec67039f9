"""Encrypted relatedness (CKKS, key-holder client) and signed envelopes in the Flower runtime.

Fast tests drive the ServerApp and ClientApp handlers over an in-memory grid or call the
envelope and ceremony pieces directly; the one test marked ``deploy`` runs a TLS SuperLink
with node authentication and three SuperNodes on 127.0.0.1.

Test setting for the encrypted runs: TINY with ``k = 1``, so the top-k graph is not the full
graph and depends on the overlaps. CKKS noise moves the overlaps by about 1e-5 (plus the
2^-16 release rounding); in this setting that changes neither the graph nor any test
prediction, so per-client accuracies agree within 1e-4 (checked below, graph included).
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from privacy.ckks import InnerProductUpload
from privacy.envelope import (
    BadSignatureError,
    EnvelopeError,
    MalformedEnvelopeError,
    NonFiniteTensorError,
    PayloadHashMismatchError,
    ReplayedNonceError,
    StaleRoundError,
    TensorShapeError,
    UnexpectedKindError,
    UnknownSenderError,
    WrongRecipientError,
)
from privacy.identity import (
    ALLOWLIST_FILENAME,
    Identity,
    allowlist_bytes,
    load_allowlist,
    load_identity,
)
from secure_fedora.algorithms import fedora
from secure_fedora.core.config import ExperimentConfig, config_hash, parse_config
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.ceremony import (
    CeremonyError,
    KeyHolderStore,
    layout_for,
    public_context_digest,
)
from secure_fedora.runtimes.flower.contexts import DataSchema
from secure_fedora.runtimes.flower.envelopes import (
    ENVELOPE_RECORD,
    MessageSecurity,
    checked_array,
    content_digest,
)
from secure_fedora.runtimes.flower.local import LocalFederation, RunTimeouts
from secure_fedora.runtimes.flower.protocol import (
    MSG_CEREMONY,
    MSG_DECRYPT,
    MSG_ENCRYPTED_SUMMARY,
    MSG_ROUND,
    DeployError,
    RunSettings,
)
from secure_fedora.runtimes.flower.state import ClientRunState, NodeStateError, ReleaseJournal
from secure_fedora.runtimes.inprocess import build_clients
from secure_fedora.secure.relatedness import (
    SecureRelatednessError,
    decrypt_rows,
    encrypt_summary,
    gram_rows,
    open_keys,
    open_server_context,
    overlaps_from_rows,
    parse_upload,
)
from secure_fedora.secure.transport import MalformedPayloadError, SenderMismatchError
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    in_process,
    run_config,
    server_security,
    signed_request,
    task_identity,  # noqa: F401 - a fixture
)


def enc_config(relatedness: str = "encrypted", **privacy: Any) -> ExperimentConfig:
    """TINY with CKKS relatedness and k = 1 (see the module docstring)."""
    data = json.loads(json.dumps(TINY))
    data["fedora"].update(relatedness=relatedness, k=1)
    if "noised" in relatedness:
        data["data"]["validation"] = "private"
        # Reproducible noise (with the reproducible-dp-noise flag) so that the grid run and
        # the in-process run draw the same noise and can be compared.
        data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                           "noise": "reproducible", **privacy}
    return parse_config(data)


def _client_security(rc: dict[str, Any], root: Path, client: int) -> MessageSecurity:
    settings = RunSettings.from_run_config(rc)
    ids = settings.identity_dir.parent
    return MessageSecurity.for_client(ids / f"client-{client:03d}", root / f"c{client}", 42,
                                      settings.config_hash, client, 3)


def _server_security(rc: dict[str, Any], root: Path) -> MessageSecurity:
    settings = RunSettings.from_run_config(rc)
    return MessageSecurity.for_server(settings.identity_dir, root / "srv", 42,
                                      settings.config_hash, 3)


def _theta_reply(security: MessageSecurity, rnd: int, theta: torch.Tensor) -> RecordDict:
    content = RecordDict({
        "theta": ArrayRecord({"theta": Array(theta.numpy())}),
        "metrics": MetricRecord({"round": rnd}),
    })
    return security.sign(content, MSG_ROUND, ["server"], rnd, reply=True)


def _verify(server: MessageSecurity, content: RecordDict, rnd: int, client: int = 1) -> Any:
    return server.verify(content, MSG_ROUND, reply=True, expected_round=rnd,
                         expected_sender=f"client-{client:03d}")


# --------------------------------------------------------------------------- envelopes


def test_server_accepts_a_signed_reply_once_and_rejects_its_replay_also_after_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rc = run_config(enc_config(), tmp_path)
    client, server = _client_security(rc, tmp_path, 1), _server_security(rc, tmp_path)
    content = _theta_reply(client, 1, torch.ones(4))
    envelope = _verify(server, content, 1)
    assert (envelope.sender, envelope.recipient, envelope.round) == ("client-001", "server", 1)
    with caplog.at_level(logging.WARNING, logger="secure_fedora.security"):
        with pytest.raises(ReplayedNonceError, match="client-001"):
            _verify(server, content, 1)
    assert any(getattr(r, "security_event", {}).get("reason") == "replayed_nonce"
               for r in caplog.records)
    restarted = _server_security(rc, tmp_path)  # nonce memory read back from the server's disk
    with pytest.raises(ReplayedNonceError):
        _verify(restarted, content, 1)
    assert stat.S_IMODE((tmp_path / "srv" / "server.nonces.jsonl").stat().st_mode) == 0o600



def test_a_reply_the_envelope_checks_refuse_leaves_the_nonce_file_unchanged(
    tmp_path: Path,
) -> None:
    """The chosen nonce rule on Flower: a reply refused by the envelope checks (tampered
    content, a wrong sender, a later round) records nothing; an accepted one records its
    nonce before anything reads it, kept even if the ServerApp then refuses its content, so
    the same signed reply is a replay, after a restart too."""
    rc = run_config(enc_config(), tmp_path)
    client, server = _client_security(rc, tmp_path, 1), _server_security(rc, tmp_path)
    nonces = tmp_path / "srv" / "server.nonces.jsonl"
    before = nonces.read_bytes()
    tampered = _theta_reply(client, 1, torch.ones(4))
    tampered["theta"] = ArrayRecord({"theta": Array(np.array([1, 1, 1, 2], dtype=np.float32))})
    for content, rnd, sender in ((tampered, 1, 1), (_theta_reply(client, 1, torch.ones(4)), 1, 2),
                                 (_theta_reply(client, 2, torch.ones(4)), 1, 1)):
        with pytest.raises(EnvelopeError):
            _verify(server, content, rnd, sender)
        assert nonces.read_bytes() == before
    content = _theta_reply(client, 1, torch.ones(4))
    _verify(server, content, 1)  # accepted (whatever the caller then makes of its content)
    assert nonces.read_bytes() != before
    for receiver in (server, _server_security(rc, tmp_path)):
        with pytest.raises(ReplayedNonceError):
            _verify(receiver, content, 1)

def test_server_rejects_tampered_envelopes_and_tampered_content(tmp_path: Path) -> None:
    rc = run_config(enc_config(), tmp_path)
    client, server = _client_security(rc, tmp_path, 1), _server_security(rc, tmp_path)

    def with_header(content: RecordDict, **change: Any) -> RecordDict:
        header = json.loads(content[ENVELOPE_RECORD]["server"])
        header.update(change)
        content[ENVELOPE_RECORD] = ConfigRecord({"server": json.dumps(header)})
        return content

    # A header field changed after signing (here the round) breaks the signature.
    with pytest.raises(BadSignatureError):
        _verify(server, with_header(_theta_reply(client, 1, torch.ones(4)), round=2), 2)
    forged = _theta_reply(client, 1, torch.ones(4))
    signature = json.loads(forged[ENVELOPE_RECORD]["server"])["signature"]
    with pytest.raises(BadSignatureError):
        _verify(server, with_header(forged, signature=("0" if signature[0] != "0" else "1")
                                    + signature[1:]), 1)
    with pytest.raises(MalformedEnvelopeError):
        _verify(server, with_header(_theta_reply(client, 1, torch.ones(4)), nonce="xyz"), 1)
    unsigned = _theta_reply(client, 1, torch.ones(4))
    del unsigned[ENVELOPE_RECORD]
    with pytest.raises(MalformedEnvelopeError, match="no envelope"):
        _verify(server, unsigned, 1)
    # The content changed after signing (one value of theta) no longer matches the digest.
    content = _theta_reply(client, 1, torch.ones(4))
    content["theta"] = ArrayRecord({"theta": Array(np.array([1, 1, 1, 2], dtype=np.float32))})
    with pytest.raises(PayloadHashMismatchError):
        _verify(server, content, 1)
    content = _theta_reply(client, 1, torch.ones(4))
    content["metrics"] = MetricRecord({"round": 1, "lambda": 0.5})  # an added field
    with pytest.raises(PayloadHashMismatchError):
        _verify(server, content, 1)
    # Untouched, the same kind of reply is accepted.
    _verify(server, _theta_reply(client, 1, torch.ones(4)), 1)


def test_server_rejects_unknown_senders_spliced_slots_stale_rounds_and_wrong_kinds(
    tmp_path: Path,
) -> None:
    rc = run_config(enc_config(), tmp_path)
    server = _server_security(rc, tmp_path)
    settings = RunSettings.from_run_config(rc)
    stranger = MessageSecurity(Identity.generate("client-009"), {}, tmp_path / "s.nonces", 42,
                               settings.config_hash)
    with pytest.raises(UnknownSenderError, match="client-009"):
        _verify(server, _theta_reply(stranger, 1, torch.ones(4)), 1)
    impostor = MessageSecurity(Identity.generate("client-001"), {}, tmp_path / "i.nonces", 42,
                               settings.config_hash)  # the right name, another key
    with pytest.raises(BadSignatureError):
        _verify(server, _theta_reply(impostor, 1, torch.ones(4)), 1)
    client2 = _client_security(rc, tmp_path, 2)
    with pytest.raises(SenderMismatchError, match="slot of 'client-001'"):
        _verify(server, _theta_reply(client2, 1, torch.ones(4)), 1, client=1)
    client1 = _client_security(rc, tmp_path, 1)
    _verify(server, _theta_reply(client1, 2, torch.ones(4)), 2)
    with pytest.raises(StaleRoundError):
        _verify(server, _theta_reply(client1, 1, torch.ones(4)), 2)
    request_kind = client1.sign(RecordDict({"m": MetricRecord({"round": 2})}), MSG_ROUND,
                                ["server"], 2, reply=False)
    with pytest.raises(UnexpectedKindError):
        _verify(server, request_kind, 2)
    to_client0 = client1.sign(RecordDict({"m": MetricRecord({"round": 2})}), MSG_ROUND,
                              ["client-000"], 2, reply=True)
    with pytest.raises(MalformedEnvelopeError, match="addressed to 'server'"):
        _verify(server, to_client0, 2)
    # Another run or config: the digest differs, so the reply does not verify here.
    other_run = MessageSecurity(client1.identity, {}, tmp_path / "o.nonces", 43,
                                settings.config_hash)
    with pytest.raises(PayloadHashMismatchError):
        _verify(server, _theta_reply(other_run, 2, torch.ones(4)), 2)
    # A client verifies the server's messages the same way (recipient checked too).
    wrong = server.sign(RecordDict({"m": MetricRecord({"round": 3})}), MSG_ROUND,
                        ["client-002"], 3, reply=False)
    wrong[ENVELOPE_RECORD] = ConfigRecord({"client-001": wrong[ENVELOPE_RECORD]["client-002"]})
    with pytest.raises(WrongRecipientError):
        client1.verify(wrong, MSG_ROUND, reply=False, expected_round=None,
                       expected_sender="server")


def test_checked_array_rejects_wrong_dtype_shape_and_non_finite_values(tmp_path: Path) -> None:
    rc = run_config(enc_config(), tmp_path)
    client, server = _client_security(rc, tmp_path, 1), _server_security(rc, tmp_path)
    for theta, error in (
        (torch.ones(5), TensorShapeError),
        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), NonFiniteTensorError),
        (torch.ones(4, dtype=torch.float64), MalformedPayloadError),
    ):
        content = _theta_reply(client, 1, theta)
        envelope = _verify(server, content, 1)  # authentic: the sender did send this
        with pytest.raises(error, match="client-001"):
            checked_array(content, "theta", "theta", torch.float32, (4,), envelope)
    content = _theta_reply(client, 1, torch.ones(4))
    envelope = _verify(server, content, 1)
    with pytest.raises(MalformedPayloadError, match="lacks"):
        checked_array(content, "phi", "phi", torch.float32, (4,), envelope)
    assert torch.equal(checked_array(content, "theta", "theta", torch.float32, (4,), envelope),
                       torch.ones(4))


def test_content_digest_covers_every_record_and_the_run() -> None:
    base = RecordDict({"a": ArrayRecord({"x": Array(np.zeros(3, np.float32))}),
                       "c": ConfigRecord({"k": 1, "b": b"\x00", "l": [1.5, 2.5]})})
    digest = content_digest(base, run_id=1, config_hash="h", message_type=MSG_ROUND)
    assert digest == content_digest(base, run_id=1, config_hash="h", message_type=MSG_ROUND)
    for args in ({"run_id": 2, "config_hash": "h", "message_type": MSG_ROUND},
                 {"run_id": 1, "config_hash": "g", "message_type": MSG_ROUND},
                 {"run_id": 1, "config_hash": "h", "message_type": "train.other"}):
        assert content_digest(base, **args) != digest
    changed = RecordDict({"a": ArrayRecord({"x": Array(np.zeros(3, np.float64))}),
                          "c": ConfigRecord({"k": 1, "b": b"\x00", "l": [1.5, 2.5]})})
    assert content_digest(changed, run_id=1, config_hash="h", message_type=MSG_ROUND) != digest
    changed = RecordDict({"a": ArrayRecord({"x": Array(np.zeros(3, np.float32))}),
                          "c": ConfigRecord({"k": True, "b": b"\x00", "l": [1.5, 2.5]})})
    assert content_digest(changed, run_id=1, config_hash="h", message_type=MSG_ROUND) != digest


# --------------------------------------------------------------------------- CKKS roles


def test_key_holder_stores_keys_0600_reuses_them_and_the_protocol_steps_run_on_them(
    tmp_path: Path,
) -> None:
    """The key holder's disk store; the protocol's steps themselves are tested once, in
    tests/secure_fedora/secure/test_relatedness.py."""
    cfg = enc_config()
    ids = [Identity.generate(f"client-{i:03d}") for i in range(3)]
    recipients = {i.party_id: i.agreement_key.public_key() for i in ids}
    store = KeyHolderStore(tmp_path / "ckks", ids[0])
    with pytest.raises(CeremonyError, match="no key ceremony ran"):
        store.secret_context()
    with pytest.raises(SecureRelatednessError, match="not among the recipients"):
        KeyHolderStore(tmp_path / "other", Identity.generate("client-009")).ceremony(recipients)
    public, sealed = store.ceremony(recipients)
    for path in (store.secret_path, store.public_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A restarted key holder (a new store on the same disk) reuses the stored keys.
    again, resealed = KeyHolderStore(tmp_path / "ckks", ids[0]).ceremony(recipients)
    assert again == public and set(resealed) == set(sealed)
    with pytest.raises(CeremonyError, match="unusable"):
        KeyHolderStore(tmp_path / "ckks", ids[1]).secret_context()  # sealed to client 0 only

    layout = layout_for(cfg, DataSchema((1, 28, 28), 10, False))
    assert (layout.num_vectors, layout.dim) == (3, 794)
    server_ctx = open_server_context(public)
    summaries = torch.linalg.qr(torch.randn(3, 794, 1, dtype=torch.float64)).Q
    uploads = {c: parse_upload(layout, c, 1, encrypt_summary(
        open_keys(resealed[ident.party_id], ident), layout, c, summaries[c]))
        for c, ident in enumerate(ids)}
    rows, vectors = gram_rows(server_ctx, layout, 3, 1, uploads)
    restarted = KeyHolderStore(tmp_path / "ckks", ids[0]).secret_context()
    overlaps = overlaps_from_rows(decrypt_rows(restarted, layout, rows, vectors), vectors, 3, 1)
    expected = torch.einsum("idq,jdr->ijqr", summaries, summaries)
    assert torch.allclose(overlaps, expected, atol=1e-4, rtol=0)


@pytest.mark.usefixtures("task_identity")
def test_client_ceremony_handlers_check_the_key_holder_and_the_layout(tmp_path: Path) -> None:
    """What the Flower handlers check before they call a protocol step: the key holder the
    server names, which node may decrypt, and the server's layout."""
    cfg = enc_config()
    rc = run_config(cfg, tmp_path)
    nodes = InMemoryGrid(tmp_path / "nodes", rc, 3).node_config
    signer = server_security(rc, tmp_path / "signer")
    sent = iter(range(100))

    def handle(handler: Any, kind: str, client: int, **records: Any) -> Message:
        extra = records.pop("fedora", {})
        content = RecordDict({"fedora": ConfigRecord({"config-hash": config_hash(cfg), **extra}),
                              **records})
        msg = signed_request(signer, content, kind, f"client-{client:03d}", 0, node=1000 + client,
                             message_id=f"m{next(sent)}")
        return handler(msg, Context(42, 1000 + client, dict(nodes[1000 + client]), RecordDict(), rc))

    other = "ab" * 32  # the digest of a public context this node never made
    rows = ConfigRecord({"rows": [b"row"], "answered-ceremony": other})
    with pytest.raises(DeployError, match="names client 1 as key holder"):
        handle(client_app.ceremony, MSG_CEREMONY, 0, fedora={"key-holder": 1})
    with pytest.raises(DeployError, match="client 1 is not the key holder"):
        handle(client_app.decrypt_overlaps_handler, MSG_DECRYPT, 1, rows=rows)
    with pytest.raises(DeployError, match="answered-ceremony is malformed: None"):
        handle(client_app.decrypt_overlaps_handler, MSG_DECRYPT, 0,
               rows=ConfigRecord({"rows": [b"row"]}))
    with pytest.raises(NodeStateError, match="holds no CKKS keys"):
        handle(client_app.decrypt_overlaps_handler, MSG_DECRYPT, 0, rows=rows)
    reply = handle(client_app.ceremony, MSG_CEREMONY, 0, fedora={"key-holder": 0})
    public = reply.content["ceremony"]["public-context"]
    assert public
    with pytest.raises(NodeStateError, match="holds other CKKS keys"):
        handle(client_app.decrypt_overlaps_handler, MSG_DECRYPT, 0, rows=rows)
    answered = public_context_digest(public)
    with pytest.raises(SecureRelatednessError, match="1 encrypted rows, expected 3"):
        handle(client_app.decrypt_overlaps_handler, MSG_DECRYPT, 0,
               rows=ConfigRecord({"rows": [b"row"], "answered-ceremony": answered}))
    with pytest.raises(SecureRelatednessError, match="not a list of bytes"):
        handle(client_app.decrypt_overlaps_handler, MSG_DECRYPT, 0,
               rows=ConfigRecord({"rows": "row", "answered-ceremony": answered}))
    sealed = reply.content["ceremony"]["sealed-client-001"]
    with pytest.raises(DeployError, match=r"layout \(4, 794\) differs from this run's \(3, 794\)"):
        handle(client_app.encrypted_summary, MSG_ENCRYPTED_SUMMARY, 1, ckks=ConfigRecord(
            {"sealed-context": sealed, "num-vectors": 4, "dim": 794}))
    # a node whose allowlist lacks the key holder stops the run at its first contact, before
    # the key holder has made its keys, not when its summary is asked for
    node_allowlist = Path(nodes[1002]["identity-dir"]) / ALLOWLIST_FILENAME
    listed = load_allowlist(node_allowlist)
    node_allowlist.write_bytes(allowlist_bytes({p: listed[p] for p in ("server", "client-002")}))
    with pytest.raises(DeployError, match="lacks the key holder client-000"):
        handle(client_app.ceremony, MSG_CEREMONY, 2, fedora={"key-holder": 0})


# --------------------------------------------------------------------------- grid runs


def _grid_run(
    cfg: ExperimentConfig, tmp_path: Path, run_config_over: dict[str, Any] | None = None,
    **grid: Any,
) -> tuple[dict[str, Any], InMemoryGrid, dict[str, Any]]:
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": cfg.privacy.enabled,
                                      **(run_config_over or {})})
    g = InMemoryGrid(tmp_path / "nodes", rc, 3, **grid)
    settings = RunSettings.from_run_config(rc)
    results = server_app.run_federation(g, settings, 42)  # type: ignore[arg-type]
    return results, g, rc


def _journal(tmp_path: Path, client: int) -> list[str]:
    path = tmp_path / "nodes" / f"node-{client}" / "runs" / "42" / "releases.jsonl"
    return [e["kind"] for e in ReleaseJournal(path).entries()]


@pytest.mark.usefixtures("task_identity")
def test_grid_encrypted_run_equals_in_process_encrypted_run(tmp_path: Path) -> None:
    cfg = enc_config()
    results, grid, _ = _grid_run(cfg, tmp_path)
    sim, outcome = in_process(cfg, tmp_path)
    ours = results["methods"]["fedora"]
    assert grid.errors == [] and results["events"] == [] and results["security"]["rejections"] == []
    assert np.allclose(ours["final"]["per_client"], outcome.final["per_client"], atol=1e-4, rtol=0)
    assert np.allclose(ours["selected"]["per_client"], outcome.selected["per_client"], atol=1e-4,
                       rtol=0)
    graph = sim.methods["fedora"].relatedness.graph
    assert ours["extra"]["graph_neighbours"] == [torch.nonzero(r).flatten().tolist() for r in graph]
    # The graph is the plaintext one too: CKKS noise does not move the top-k choice here.
    summaries = torch.stack([fedora.client_summary(c.train_x, c.train_y, 10, 1)
                             for c in build_clients(cfg)])
    plain = fedora.topk_graph(
        fedora.similarity_matrix(fedora.subspace_overlaps(summaries), cfg.fedora.tau), cfg.fedora.k)
    assert torch.equal(plain != 0, graph != 0)
    assert torch.allclose(sim.methods["fedora"].relatedness.overlaps,
                          fedora.subspace_overlaps(summaries), atol=1e-4, rtol=0)
    details = results["relatedness_details"]
    assert details["server_context_has_secret_key"] is False and details["key_holder"] == 0
    assert results["assumptions"]["key_holder"].startswith("client 0")
    # The CKKS parameters of the context the key holder built, as the in-process run states.
    stated = results["assumptions"]["ckks_parameters"]
    assert stated == {"relatedness": details["ckks_parameters"]} \
        == {"relatedness": outcome.extra["ckks_parameters"]["relatedness"]}
    assert stated["relatedness"]["poly_modulus_degree"] == 8192
    assert stated["relatedness"]["security_level"] == "128-bit"
    # What left each node: the encrypted summary; the key holder also released the overlaps.
    assert _journal(tmp_path, 0) == ["summary", "overlaps", "fedora/round", "fedora/round"]
    assert _journal(tmp_path, 1) == ["summary", "fedora/round", "fedora/round"]
    for c in range(3):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora"
                                    / "client.pt", c, 42, config_hash(cfg), "fedora")
        assert torch.allclose(state.algorithm["theta"], sim.methods["fedora"].theta[c], atol=1e-4,
                              rtol=0)
    keys = tmp_path / "nodes" / "node-0" / "runs" / "42" / "ckks"
    assert stat.S_IMODE((keys / "secret-context.sealed").stat().st_mode) == 0o600
    assert not (tmp_path / "nodes" / "node-1" / "runs" / "42" / "ckks").exists()
    # No message to the server's side ever carried a secret context in the clear: the only
    # context the server saw is the public one it parsed (checked in open_server_context).
    summaries = [m for m in grid.sent if m.metadata.message_type == MSG_ENCRYPTED_SUMMARY]
    assert len(summaries) == 3 and all("summary" not in m.content for m in summaries)


@pytest.mark.usefixtures("task_identity")
def test_grid_noised_encrypted_run_equals_in_process_and_the_ledger_records_the_summary(
    tmp_path: Path,
) -> None:
    from privacy.ledger import read_ledger, verify_ledger_file

    cfg = enc_config("noised+encrypted")
    results, grid, rc = _grid_run(cfg, tmp_path)
    sim, outcome = in_process(cfg, tmp_path)
    ours = results["methods"]["fedora"]
    assert grid.errors == [] and results["events"] == []
    assert np.allclose(ours["final"]["per_client"], outcome.final["per_client"], atol=1e-4, rtol=0)
    spent = {row["client"]: row["epsilon_spent"] for row in sim.privacy["fedora"]["clients"]}
    ids = Path(rc["identity-dir"]).parent
    for c in range(3):
        cid = f"client-{c:03d}"
        ours_spent = results["privacy"]["fedora"]["clients"][c]["epsilon_spent"]
        assert ours_spent == pytest.approx(spent[cid], abs=1e-6)
        ledger = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora" / f"{cid}.jsonl"
        key = load_identity(ids / cid, cid).signing_key.public_key()
        assert verify_ledger_file(ledger, key) == []
        assert [e["mechanism"] for e in read_ledger(ledger)][0] == "gaussian_summary"


@pytest.mark.usefixtures("task_identity")
def test_grid_noised_encrypted_run_on_a_registered_dataset_of_another_shape(
    tmp_path: Path,
) -> None:
    """The CKKS layout had a fixed summary dimension, 784 + 10 (MNIST's): on a registered
    dataset of another shape every client's encrypted summary failed ('summary has shape
    (10, 1), expected (794, q)') after, under DP, its noised summary had been drawn and
    written to its ledger. Server and clients now plan it from the data's schema (input
    features + classes), and the run equals the in-process one."""
    from privacy.ledger import read_ledger
    from secure_fedora.core.registry import DATASETS
    from secure_fedora.data.partition import LabeledDataset

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 6, generator=gen), torch.randint(0, 4, (600,), generator=gen)
    DATASETS.register("six-features-x", lambda seed: LabeledDataset(x[:400], y[:400], x[400:],
                                                                    y[400:], 4))
    try:
        doc = enc_config("noised+encrypted").model_dump(mode="json", exclude_none=True)
        doc["data"].update(dataset="six-features-x", partition="iid", train_per_client=40,
                           val_per_client=20, test_per_client=20)
        cfg = parse_config(doc)
        results, grid, _ = _grid_run(cfg, tmp_path)
        sim, outcome = in_process(cfg, tmp_path)
    finally:
        DATASETS.unregister("six-features-x")
    assert grid.errors == [] and results["events"] == []
    ours = results["methods"]["fedora"]
    assert np.allclose(ours["final"]["per_client"], outcome.final["per_client"], atol=1e-4, rtol=0)
    ledger = tmp_path / "nodes" / "node-0" / "runs" / "42" / "fedora" / "client-000.jsonl"
    assert [e["mechanism"] for e in read_ledger(ledger)][0] == "gaussian_summary"


@pytest.mark.usefixtures("task_identity")
def test_grid_rejected_replies_count_as_not_participating(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from secure_fedora.runtimes.flower.protocol import MSG_ROUND as ROUND

    cfg = enc_config()
    saved: dict[str, Message] = {}

    def tamper_theta(_request: Message, reply: Message) -> Message:
        arrays = {k: reply.content["payload"][k].numpy().copy() for k in reply.content["payload"]}
        arrays["theta"][0] += 1.0
        reply.content["payload"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        # the envelope is left as signed
        return reply

    def keep(_request: Message, reply: Message) -> Message:
        saved["round1"] = reply
        return reply

    def replay_old(request: Message, _reply: Message) -> Message:
        return Message(saved["round1"].content, reply_to=request)  # round 1's signed reply

    def stranger(request: Message, reply: Message) -> Message:
        content = reply.content
        fake = MessageSecurity(Identity.generate("client-077"), {}, tmp_path / "x.nonces", 42,
                               config_hash(cfg))
        fake.sign(content, ROUND, ["server"], 2, reply=True)
        return Message(content, reply_to=request)

    with caplog.at_level(logging.WARNING, logger="secure_fedora.security"):
        results, grid, _ = _grid_run(cfg, tmp_path, tamper_reply={
            (1, 1, ROUND): tamper_theta, (2, 1, ROUND): keep, (2, 2, ROUND): replay_old,
            (0, 2, ROUND): stranger,
        })
    reasons = {(r["round"], r["client"]): r["reason"] for r in results["security"]["rejections"]}
    assert reasons == {(1, 1): "payload_hash_mismatch", (2, 2): "stale_round",
                       (2, 0): "unknown_sender"}
    assert [r["replied"] for r in results["rounds"]] == [2, 1]
    assert all("counts as not taking part" in e["event"] for e in results["events"])
    logged = {getattr(r, "security_event", {}).get("reason") for r in caplog.records}
    assert {"payload_hash_mismatch", "stale_round", "unknown_sender"} <= logged
    assert grid.errors == []


@pytest.mark.usefixtures("task_identity")
def test_grid_client_refuses_a_tampered_or_replayed_server_message(tmp_path: Path) -> None:
    from secure_fedora.runtimes.flower.protocol import MSG_ROUND as ROUND

    cfg = enc_config()
    saved: dict[str, Message] = {}

    def tamper_phi(request: Message) -> Message:
        arrays = {k: request.content["payload"][k].numpy().copy()
                  for k in request.content["payload"]}
        arrays["phi"][:10] = 0.0
        request.content["payload"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return request

    def keep(request: Message) -> Message:
        saved["r1"] = request
        return request

    def replay(_request: Message) -> Message:
        return saved["r1"]

    results, grid, _ = _grid_run(cfg, tmp_path, tamper_request={
        (1, 1, ROUND): tamper_phi, (2, 1, ROUND): keep, (2, 2, ROUND): replay})
    refused = {(c, type(e).__name__) for c, _, e in grid.errors}
    assert refused == {(1, "PayloadHashMismatchError"), (2, "ReplayedNonceError")}
    assert [r["replied"] for r in results["rounds"]] == [2, 2]
    events = {(e["round"], e["client"]) for e in results["events"]}
    assert events == {(1, 1), (2, 2)}


@pytest.mark.usefixtures("task_identity")
def test_grid_tampered_ciphertexts_stop_relatedness_naming_the_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = enc_config()

    def columns(reply: Message) -> list[bytes]:
        return list(reply.content["upload"]["columns"])

    def in_transit(_request: Message, reply: Message) -> Message:
        blob = bytearray(columns(reply)[0])
        blob[len(blob) // 2] ^= 0xFF
        reply.content["upload"] = ConfigRecord({"columns": [bytes(blob)]})
        return reply

    with pytest.raises(DeployError, match=r"missing clients \[1\] \(asked twice; .*their last "
                                          r"events: client 1: message rejected \("):
        _grid_run(cfg, tmp_path / "a", tamper_reply={(1, 0, MSG_ENCRYPTED_SUMMARY): in_transit})

    def garbage_signed_by_client(request: Message, reply: Message) -> Message:
        upload = InnerProductUpload.deserialize(columns(reply)[0])
        bad = InnerProductUpload(upload.index, (b"\x01" * 128,), upload.broadcast)
        content = reply.content
        content["upload"] = ConfigRecord({"columns": [bad.serialize()]})
        _client_security(rc_b, tmp_path / "b", 2).sign(
            content, MSG_ENCRYPTED_SUMMARY, ["server"], 0, reply=True)
        return Message(content, reply_to=request)

    rc_b = run_config(cfg, tmp_path / "b")
    # Authentic but unusable ciphertexts: the server's gram_rows names the client, the reply is
    # rejected as malformed, and the run stops because relatedness needs every client.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="secure_fedora.security"):
        with pytest.raises(DeployError, match=r"missing clients \[2\] \(nodes online: .*their "
                                              r"last events: client 2: message rejected "
                                              r"\(malformed_payload: .*vector"):
            _grid_run(cfg, tmp_path / "b",
                      tamper_reply={(2, 0, MSG_ENCRYPTED_SUMMARY): garbage_signed_by_client})
    events = [getattr(r, "security_event", {}) for r in caplog.records]
    assert [(e.get("reason"), e.get("sender")) for e in events if e] == [
        ("malformed_payload", "client-002")]


# --------------------------------------------------------------------------- real deployment

ENC_TIMEOUTS = RunTimeouts(startup=120.0, connect=240.0, round=300.0, run=600.0, poll=0.2)


@pytest.mark.deploy
def test_flower_encrypted_relatedness_equals_in_process_runtime(tmp_path: Path) -> None:
    """TLS SuperLink with node authentication, 3 SuperNodes on 127.0.0.1, encrypted
    relatedness with client 0 as key holder, 2 rounds: per-client accuracy equals the
    in-process runtime's encrypted run within 1e-4 (graph equal; see the module docstring).
    One evaluation exchange (every 2 rounds): each message starts a ClientApp process."""
    cfg = enc_config().model_copy(update={"evaluation": enc_config().evaluation.model_copy(
        update={"every": 2})})
    with LocalFederation(tmp_path / "fed", 3, timeouts=ENC_TIMEOUTS) as fed:
        run_id = fed.submit(cfg, tmp_path / "res")
        status = fed.follow(run_id, timeout=ENC_TIMEOUTS.run)
        logs = (fed.logs / "serverapp.log").read_text()
    assert status == "finished:completed", logs[-3000:]
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    sim, outcome = in_process(cfg, tmp_path)
    ours = results["methods"]["fedora"]
    assert np.allclose(ours["final"]["per_client"], outcome.final["per_client"], atol=1e-4, rtol=0)
    assert np.allclose(ours["selected"]["per_client"], outcome.selected["per_client"], atol=1e-4,
                       rtol=0)
    graph = sim.methods["fedora"].relatedness.graph
    assert ours["extra"]["graph_neighbours"] == [torch.nonzero(r).flatten().tolist() for r in graph]
    assert results["events"] == [] and results["security"]["rejections"] == []
    assert results["relatedness_details"]["server_context_has_secret_key"] is False
    state_dir = tmp_path / "fed" / "nodes"
    journal = ReleaseJournal(state_dir / "node-0" / "runs" / str(run_id) / "releases.jsonl")
    assert [e["kind"] for e in journal.entries()] == [
        "summary", "overlaps", "fedora/round", "fedora/round"]
    secret = state_dir / "node-0" / "runs" / str(run_id) / "ckks" / "secret-context.sealed"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "fedora: setup ceremony ckks_overlaps done" in logs


@pytest.mark.usefixtures("task_identity")
def test_grid_a_node_wiped_after_its_encrypted_summary_is_refused(tmp_path: Path) -> None:
    """The ceremony's summary reply carried no ledger state, so a node wiped between its
    encrypted summary and round 1 started a fresh ledger and the summary release dropped out
    of its accounting. The reply now reports the head (signed) and round 1's request
    re-states it."""
    from secure_fedora.runtimes.flower.protocol import MSG_ROUND, DeployError

    def wipe(message: Any) -> Any:
        shutil.rmtree(tmp_path / "nodes" / "node-1" / "runs" / "42")
        return message

    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        _grid_run(enc_config("noised+encrypted"), tmp_path,
                  tamper_request={(1, 1, MSG_ROUND): wipe})



@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("damage", ["run state wiped", "client.pt deleted"])
def test_grid_without_dp_a_node_that_lost_its_state_after_its_encrypted_summary_is_refused(
    tmp_path: Path, damage: str,
) -> None:
    """Without DP the encrypted summary's accepted reply was not among the answered-<exchange>
    rounds the server re-states, so a node wiped (or its client.pt deleted) between its
    summary and round 1 went on from a fresh state and the run completed, its summary's
    journal record lost. Round 1's request now states answered-setup = 0 and the client
    refuses."""
    from secure_fedora.runtimes.flower.protocol import MSG_ROUND, DeployError
    from secure_fedora.runtimes.flower.state import NodeStateError

    run = tmp_path / "nodes" / "node-1" / "runs" / "42"

    def hit(message: Any) -> Any:
        if damage == "run state wiped":
            shutil.rmtree(run)
        else:
            (run / "fedora" / "client.pt").unlink()
        return message

    rc = run_config(enc_config(), tmp_path)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request={(1, 1, MSG_ROUND): hit})
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert "accepted this client's setup reply of round 0" in str(refusals[0])


#: The budget text of client 1's refused summary (what its ledger records): accountant facts.
_SUMMARY_REFUSED = ("client 'client-001' round 0: release 'gaussian_summary' refused; epsilon "
                    "would reach 9.5000 > budget 8 (delta=0.001)")


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("relatedness", ["noised", "noised+encrypted"])
def test_grid_a_summary_refused_by_the_budget_reaches_the_server_with_its_budget_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relatedness: str) -> None:
    """Client 1's budget refuses its summary. In the noised mode the client answered with a
    signed refusal holding the budget's text; in noised+encrypted it raised a DeployError, so
    the server learnt only "DeployError (details withheld ...)" and asked it twice. Both modes
    now answer with the refusal: the run stops naming the budget text, no error reply."""
    from privacy.accounting import BudgetExceededError, PrivacyBudget
    from secure_fedora.algorithms.methods import Fedora

    real = Fedora.client_setup

    def client_setup(self: Fedora, i: int, message: Any) -> Any:
        if i == 1:
            raise BudgetExceededError(
                client_id="client-001", round=0, mechanism="gaussian_summary",
                epsilon_would_be=9.5, budget=PrivacyBudget(epsilon=8.0, delta=1e-3))
        return real(self, i, message)

    monkeypatch.setattr(Fedora, "client_setup", client_setup)
    with pytest.raises(DeployError) as err:
        _grid_run(enc_config(relatedness), tmp_path)
    assert f"refused its release ({_SUMMARY_REFUSED})" in str(err.value)
    assert "details withheld" not in str(err.value) and "asked twice" not in str(err.value)


_UNDISTURBED: dict[str, dict[str, Any]] = {}  # the run without a lost reply, made once


def _lose_first(lost: list[Message]):  # type: ignore[no-untyped-def]
    def hook(_request: Message, reply: Message) -> Message | None:
        lost.append(reply)
        return None if len(lost) == 1 else reply
    return hook


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("client", "kind"), [(1, MSG_CEREMONY), (0, MSG_CEREMONY),
                                              (1, MSG_ENCRYPTED_SUMMARY), (0, MSG_DECRYPT)])
def test_grid_a_lost_ceremony_reply_is_asked_again_and_the_summary_released_once(
    tmp_path: Path, client: int, kind: str,
) -> None:
    """One lost reply anywhere in the CKKS ceremony (an identification, the key holder's
    keys, an encrypted summary, the decrypted overlaps) stopped the run with a DeployError.
    That party is now asked once more: the key holder repeats its stored keys and decrypts
    the same rows again, a client re-encrypts its saved summary (under DP drawn and accounted
    once), and the run equals one without the loss."""
    from privacy.ledger import read_ledger

    cfg = enc_config("noised+encrypted")
    timeouts = {"round-timeout": 0.3, "connect-timeout": 0.3}
    lost: list[Message] = []
    results, grid, _ = _grid_run(cfg, tmp_path, run_config_over=timeouts,
                                 tamper_reply={(client, 0, kind): _lose_first(lost)})
    assert len(lost) == 2 and grid.errors == []
    assert [e["client"] for e in results["events"]] in ([client], [None])
    if "results" not in _UNDISTURBED:
        _UNDISTURBED["results"] = _grid_run(cfg, tmp_path / "ref")[0]
    expected = _UNDISTURBED["results"]
    for part in ("selected", "final"):
        assert np.allclose(results["methods"]["fedora"][part]["per_client"],
                           expected["methods"]["fedora"][part]["per_client"], atol=1e-4, rtol=0)
    for c in range(3):
        ledger = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora" / f"client-{c:03d}.jsonl"
        assert [e["mechanism"] for e in read_ledger(ledger)] == [
            "gaussian_summary", "dpsgd", "gaussian_lambda", "dpsgd", "gaussian_lambda", "close"]
        assert results["privacy"]["fedora"]["clients"][c]["epsilon_spent"] == \
            expected["privacy"]["fedora"]["clients"][c]["epsilon_spent"]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("store", ["wiped", "other keys"])
def test_grid_a_key_holder_whose_ckks_store_changed_since_the_ceremony_stops_the_run(
        tmp_path: Path, store: str) -> None:
    """The key holder's CKKS store was outside the answered-<exchange> checks. Wiped after the
    ceremony, the decryption failed with a CeremonyError, was asked again, and the run
    stopped only then ("did not return the overlaps, asked twice: CeremonyError"); replaced
    by another store of the same key holder (an older copy from an earlier ceremony), it
    decrypted the rows into noise (|x| = 2.6e+07), refused as "a ciphertext under another
    key, or corrupted", as if the server's rows were at fault, also after a retry. The
    decryption request now re-states the ceremony the server accepted (the digest of its
    public context); the key holder refuses it (NodeStateError) before decrypting and the
    run stops at once, naming the store."""
    keys = tmp_path / "nodes" / "node-0" / "runs" / "42" / "ckks"
    rc = run_config(enc_config(), tmp_path)
    holder = load_identity(Path(rc["identity-dir"]).parent / "client-000", "client-000")

    def change(message: Message) -> Message:
        shutil.rmtree(keys, ignore_errors=True)
        if store == "other keys":  # a ceremony of its own: other keys, the same key holder
            KeyHolderStore(keys, holder).ceremony(
                {"client-000": holder.agreement_key.public_key()})
        return message

    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request={(0, 0, MSG_DECRYPT): change})
    with pytest.raises(DeployError, match=(
            r"the key holder \(client 0, node 1000\) refuses to decrypt, its node's CKKS store "
            r"being lost or replaced since the key ceremony \(.*NodeStateError")):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    [(client, kind, err)] = grid.errors
    assert (client, kind, type(err)) == (0, MSG_DECRYPT, NodeStateError)
    assert ("holds no CKKS keys" if store == "wiped" else "holds other CKKS keys") in str(err)
    assert _journal(tmp_path, 0) == ["summary"]  # no overlaps released


@pytest.mark.usefixtures("task_identity")
def test_grid_a_key_holder_that_misses_the_decryption_twice_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=r"the key holder \(client 0\) did not return the "
                                          r"overlaps, asked twice: no reply in time"):
        _grid_run(enc_config(), tmp_path, run_config_over={"round-timeout": 0.3,
                                                           "connect-timeout": 0.3},
                  tamper_reply={(0, 0, MSG_DECRYPT): lambda q, r: None})


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("client", "kind", "what", "last"), [
    (1, MSG_CEREMONY, "identification", "no query.ceremony reply in time"),
    (2, MSG_ENCRYPTED_SUMMARY, "encrypted summary", "no encrypted summary in time"),
    (1, MSG_ENCRYPTED_SUMMARY, "encrypted summary",
     "encrypted summary failed: 1: RuntimeError: disk full"),
])
def test_grid_a_client_that_misses_a_ceremony_step_twice_is_named_with_its_last_event(
    tmp_path: Path, client: int, kind: str, what: str, last: str,
) -> None:
    """The ceremony's "missing clients" errors named only the clients, while the setup
    exchange's name each client's last event (its error reply, no reply in time)."""
    def fail(request: Message, _reply: Message) -> Message:  # what Flower makes of a raise
        return Message(Error(code=1, reason="RuntimeError: disk full"), reply_to=request)

    lose = fail if "disk full" in last else (lambda q, r: None)
    with pytest.raises(DeployError, match=(
            rf"the run needs every client's {what}; missing clients \[{client}\] \(asked "
            rf"twice; nodes online: \[1000, 1001, 1002\]\); their last events: client "
            rf"{client}: {last}$")):
        _grid_run(enc_config(), tmp_path, run_config_over={"round-timeout": 0.3,
                                                           "connect-timeout": 0.3},
                  tamper_reply={(client, 0, kind): lose})


@pytest.mark.usefixtures("task_identity")
def test_a_dp_run_names_relatedness_timing_only_where_a_ceremony_filled_it(
        tmp_path: Path) -> None:
    """results.json's ``assumptions.timing`` named ``relatedness_timing`` in every DP run;
    only the encrypted relatedness ceremony fills it. A noised+encrypted FEDORA run still
    names it (and holds it, in results.json and the ServerApp checkpoint); a noised FEDORA
    run, whose relatedness has no ceremony, holds it empty and does not name it."""
    from secure_fedora.runtimes.inprocess import load_checkpoint

    def one_round(relatedness: str) -> ExperimentConfig:
        doc = enc_config(relatedness).model_dump(mode="json", exclude_none=True)
        doc["training"]["rounds"] = 1
        return parse_config(doc)

    results, _, _ = _grid_run(one_round("noised+encrypted"), tmp_path / "enc",
                              {"result-dir": str(tmp_path / "enc" / "res")})
    stated = results["assumptions"]["timing"]
    held = load_checkpoint(tmp_path / "enc" / "res" / server_app.SERVER_CHECKPOINT)
    assert results["relatedness_timing"] and held["relatedness_timing"]
    assert "in results.json also timings and relatedness_timing" in stated
    assert "holds them too: the timings, relatedness_timing," in stated
    results, _, _ = _grid_run(one_round("noised"), tmp_path / "noised")
    assert results["relatedness_timing"] == {}
    assert "relatedness_timing" not in results["assumptions"]["timing"]
    assert "in results.json also timings)" in results["assumptions"]["timing"]
