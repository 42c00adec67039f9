"""Authenticated model messages: every attack is dropped with its own error, the rest go through."""

import dataclasses
import logging

import pytest
import torch

from privacy.envelope import (
    BadSignatureError,
    FutureRoundError,
    MalformedEnvelopeError,
    NonFiniteTensorError,
    PayloadHashMismatchError,
    ReplayedNonceError,
    StaleRoundError,
    TensorShapeError,
    UnexpectedKindError,
    UnknownSenderError,
    WrongRecipientError,
    decode_message,
    encode_message,
    make_envelope,
)
from privacy.identity import Identity, IdentityError, init_keys
from secure_fedora.secure.transport import (
    MalformedPayloadError,
    Rejection,
    SecureExchange,
    SecureTransport,
    SenderMismatchError,
    TransportError,
    decode_tensor,
    encode_tensor,
)

LOGGER = "secure_fedora.security"
N, P = 4, 10


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    init_keys(d, ["server", "client-000", "client-001", "client-002", "client-003"])
    return d


@pytest.fixture()
def transport(key_dir, tmp_path):
    return SecureTransport(key_dir, tmp_path / "state", N)


def rows(seed=0):
    return torch.randn(N, P, generator=torch.Generator().manual_seed(seed))


def uploads(transport, rnd, theta):
    return {i: transport.client_upload(rnd, i, theta[i]) for i in range(N)}


def tamper_payload(message: bytes) -> bytes:
    data = bytearray(message)
    data[-3] ^= 0x01
    return bytes(data)


def forged_header(message: bytes) -> bytes:
    env, payload = decode_message(message)
    return encode_message(dataclasses.replace(env, nonce="ab" * 16), payload)


def foreign(identity, rnd, tensor, recipient="server", kind="theta"):
    payload = encode_tensor(tensor)
    return encode_message(make_envelope(identity, recipient, rnd, kind, payload), payload)


def _events(caplog):
    return [r.security_event for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING and hasattr(r, "security_event")]


def test_roundtrip_is_exact_and_counted(transport):
    theta = rows()
    accepted, rejections = transport.server_receive(1, uploads(transport, 1, theta), (P,))
    assert rejections == []
    assert sorted(accepted) == list(range(N))
    for i in range(N):
        assert accepted[i].dtype == torch.float32
        assert torch.equal(accepted[i], theta[i])
    phi = transport.client_receive(1, 2, transport.server_send(1, 2, theta[3]), (P,))
    assert torch.equal(phi, theta[3])
    s = transport.stats
    assert s.messages_sent == N + 1 and s.messages_accepted == N + 1 and s.messages_rejected == 0
    assert s.bytes_sent == s.bytes_received > (N + 1) * P * 4


def _attack(name, transport, key_dir, rnd, theta, msgs):
    """Replace client 1's message by an attack; return the expected error class."""
    if name == "tampered_payload":
        msgs[1] = tamper_payload(msgs[1])
        return PayloadHashMismatchError
    if name == "tampered_envelope":
        msgs[1] = forged_header(msgs[1])
        return BadSignatureError
    if name == "impostor_key":
        msgs[1] = foreign(Identity.generate("client-001"), rnd, theta[1])
        return BadSignatureError
    if name == "unknown_sender":
        msgs[1] = foreign(Identity.generate("client-099"), rnd, theta[1])
        return UnknownSenderError
    if name == "stale_round":
        msgs[1] = transport.client_upload(rnd - 1, 1, theta[1])
        return StaleRoundError
    if name == "future_round":
        msgs[1] = transport.client_upload(rnd + 1, 1, theta[1])
        return FutureRoundError
    if name == "wrong_shape":
        msgs[1] = transport.client_upload(rnd, 1, torch.zeros(P + 1))
        return TensorShapeError
    if name == "nan_values":
        bad = theta[1].clone()
        bad[4] = float("nan")
        msgs[1] = transport.client_upload(rnd, 1, bad)
        return NonFiniteTensorError
    if name == "inf_values":
        bad = theta[1].clone()
        bad[0] = float("-inf")
        msgs[1] = transport.client_upload(rnd, 1, bad)
        return NonFiniteTensorError
    if name == "wrong_kind":
        msgs[1] = transport.client_upload(rnd, 1, theta[1], kind="phi")
        return UnexpectedKindError
    if name == "spliced_sender":
        msgs[1] = msgs[2]
        return SenderMismatchError
    if name == "malformed_payload":
        msgs[1] = transport.client_upload_bytes(rnd, 1, b"SFTR\x01\x01\x01\x00" + b"\0" * 7, "theta")
        return MalformedPayloadError
    if name == "garbage":
        msgs[1] = b"not an envelope at all"
        return MalformedEnvelopeError
    raise AssertionError(name)


ATTACKS = ["tampered_payload", "tampered_envelope", "impostor_key", "unknown_sender", "stale_round",
           "future_round", "wrong_shape", "nan_values", "inf_values", "wrong_kind",
           "spliced_sender", "malformed_payload", "garbage"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_each_attack_is_dropped_and_others_accepted(attack, transport, key_dir, caplog):
    rnd = 5
    theta = rows(1)
    msgs = uploads(transport, rnd, theta)
    expected = _attack(attack, transport, key_dir, rnd, theta, msgs)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        accepted, rejections = transport.server_receive(rnd, msgs, (P,))
    assert sorted(accepted) == [0, 2, 3]
    for i in (0, 2, 3):
        assert torch.equal(accepted[i], theta[i])
    assert len(rejections) == 1
    r = rejections[0]
    assert (r.client, r.round, r.error_type, r.direction) == (1, rnd, expected.__name__, "upload")
    assert r.reason == expected.reason and r.detail
    events = [e for e in _events(caplog) if e.get("event") == "message_rejected"]
    assert [e["reason"] for e in events] == [expected.reason]
    assert transport.stats.messages_rejected == 1


def test_replay_in_same_round_and_after_restart(key_dir, tmp_path, caplog):
    state = tmp_path / "state"
    first = SecureTransport(key_dir, state, N)
    theta = rows(2)
    msgs = uploads(first, 3, theta)
    accepted, rejections = first.server_receive(3, msgs, (P,))
    assert len(accepted) == N and not rejections
    # The same message again in the same round: a replay.
    fresh = {0: first.client_upload(3, 0, theta[0]), 1: msgs[1]}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        accepted, rejections = first.server_receive(3, fresh, (P,))
    assert sorted(accepted) == [0]
    assert [(r.client, r.error_type) for r in rejections] == [(1, "ReplayedNonceError")]
    # A restarted server (new process, same state directory) still remembers the nonces.
    restarted = SecureTransport(key_dir, state, N)
    accepted, rejections = restarted.server_receive(3, {2: msgs[2], 3: restarted.client_upload(3, 3, theta[3])}, (P,))
    assert sorted(accepted) == [3]
    assert [(r.client, r.reason) for r in rejections] == [(2, ReplayedNonceError.reason)]
    # ... and a message of round 3 replayed in round 4 is stale.
    _, rejections = restarted.server_receive(4, {0: msgs[0]}, (P,))
    assert [r.error_type for r in rejections] == ["StaleRoundError"]
    # Without the state directory a fresh transport would have accepted the replay.
    other = SecureTransport(key_dir, tmp_path / "elsewhere", N)
    assert sorted(other.server_receive(3, {2: msgs[2]}, (P,))[0]) == [2]


def test_client_side_checks(transport, key_dir, caplog):
    theta = rows(3)
    msg = transport.server_send(2, 1, theta[0])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with pytest.raises(PayloadHashMismatchError, match="server"):
            transport.client_receive(2, 1, tamper_payload(msg), (P,))
        with pytest.raises(WrongRecipientError):
            transport.client_receive(2, 0, msg, (P,))  # addressed to client-001
        # Another client (a known party, but not the server) cannot send phi.
        with pytest.raises(UnknownSenderError):
            transport.client_receive(2, 1, transport.client_upload(2, 3, theta[0]), (P,))
        with pytest.raises(TensorShapeError):
            transport.client_receive(2, 1, transport.server_send(2, 1, theta[:, :2]), (P,))
        with pytest.raises(StaleRoundError):
            transport.client_receive(3, 1, msg, (P,))
    assert {e["reason"] for e in _events(caplog)} >= {
        "payload_hash_mismatch", "wrong_recipient", "unknown_sender", "wrong_shape", "stale_round"}
    # Batch form: client 2's message is forged, the other three are accepted.
    msgs = {i: transport.server_send(4, i, theta[i]) for i in range(N)}
    msgs[2] = forged_header(msgs[2])
    accepted, rejections = transport.clients_receive(4, msgs, (P,))
    assert sorted(accepted) == [0, 1, 3]
    assert rejections == [Rejection(2, 4, "bad_signature", "BadSignatureError",
                                    rejections[0].detail, "download")]


def test_client_replay_caught_after_restart(key_dir, tmp_path):
    a = SecureTransport(key_dir, tmp_path / "s", N)
    msg = a.server_send(1, 0, torch.ones(P))
    assert torch.equal(a.client_receive(1, 0, msg, (P,)), torch.ones(P))
    b = SecureTransport(key_dir, tmp_path / "s", N, parties=["client-000"])
    with pytest.raises(ReplayedNonceError):
        b.client_receive(1, 0, msg, (P,))


def test_opaque_payloads(transport):
    msg = transport.client_upload_bytes(1, 2, b"ciphertext", "enc_theta")
    accepted, rejections = transport.server_receive_bytes(1, {2: msg}, "enc_theta")
    assert accepted == {2: b"ciphertext"} and not rejections
    down = transport.server_send_bytes(1, 3, b"phi-ct", "enc_phi")
    assert transport.client_receive_bytes(1, 3, down, "enc_phi") == b"phi-ct"
    with pytest.raises(PayloadHashMismatchError):
        transport.client_receive_bytes(1, 3, tamper_payload(transport.server_send_bytes(1, 3, b"xyz", "enc_phi")), "enc_phi")


def test_setup_and_argument_errors(key_dir, tmp_path):
    with pytest.raises(TransportError, match="lacks 1 party"):
        SecureTransport(key_dir, tmp_path / "s", N + 1)
    with pytest.raises(TransportError, match="not part of this federation"):
        SecureTransport(key_dir, tmp_path / "s", N, parties=["client-007"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(TransportError, match="not a directory"):
        SecureTransport(key_dir, tmp_path / "file", N)
    server_only = SecureTransport(key_dir, tmp_path / "s", N, parties=["server"])
    with pytest.raises(TransportError, match="does not act as 'client-001'"):
        server_only.client_upload(1, 1, torch.zeros(P))
    client_only = SecureTransport(key_dir, tmp_path / "s2", N, parties=["client-001"])
    with pytest.raises(TransportError, match="does not act as 'server'"):
        client_only.server_receive(1, {1: client_only.client_upload(1, 1, torch.zeros(P))}, (P,))
    with pytest.raises(TransportError, match="client"):
        server_only.server_send(1, N, torch.zeros(P))
    with pytest.raises(TransportError, match="client index"):
        server_only.server_receive(1, {N: b"x"}, (P,))
    with pytest.raises(TransportError, match="round"):
        client_only.client_upload(-1, 1, torch.zeros(P))
    with pytest.raises(TypeError, match="floating"):
        client_only.client_upload(1, 1, torch.zeros(P, dtype=torch.int64))
    # Non-bytes input is a rejection record, not an exception (issue 14, "Why" 7).
    accepted, rejections = server_only.server_receive(1, {1: "text"}, (P,))  # type: ignore[dict-item]
    assert accepted == {} and [(r.client, r.reason) for r in rejections] == [
        (1, "malformed_envelope")]
    assert "must be bytes" in rejections[0].detail


def test_tensor_payload_format():
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7
    data = encode_tensor(t)
    assert data[:4] == b"SFTR" and len(data) == 8 + 2 * 8 + 6 * 4
    back = decode_tensor(data)
    assert back.dtype == torch.float32 and torch.equal(back, t.float())
    for bad, match in [
        (b"SFT", "too short"),
        (b"XXXX" + data[4:], "not a version-1"),
        (data[:5] + b"\x02" + data[6:], "dtype"),
        (data[:6] + b"\x09" + data[7:], "dimensions"),
        (data[:10], "truncated"),
        (data[:-1], "needs 24 value bytes"),
        (data + b"\0", "needs 24 value bytes"),
    ]:
        with pytest.raises(MalformedPayloadError, match=match):
            decode_tensor(bad, sender="client-000", round=1)



def test_an_empty_tensor_with_a_dimension_beyond_int64_is_a_malformed_payload(
        key_dir, tmp_path):
    """A signed tensor payload of shape (0, 2**63) or (0, 2**32, 2**31) has no value bytes, so
    its length matched and decode_tensor reached torch's reshape, whose TypeError or
    RuntimeError (not an EnvelopeError) stopped the server's receive; it is now a
    MalformedPayloadError, that client's rejection."""
    import struct

    for shape in [(0, 1 << 63), ((1 << 64) - 1, 0), (0, 1 << 32, 1 << 31), (1 << 40, 0, 1 << 23)]:
        bad = encode_tensor(torch.zeros((0,) * len(shape)))[:8] \
            + struct.pack(f">{len(shape)}Q", *shape)
        with pytest.raises(MalformedPayloadError, match="beyond 64-bit sizes"):
            decode_tensor(bad, sender="client-000", round=1)
    huge = (0, 1 << 31, 1 << 31)  # still within int64: an empty tensor of that shape
    assert decode_tensor(encode_tensor(torch.zeros(0, 1, 1))[:8]
                         + struct.pack(">3Q", *huge)).shape == huge
    head = encode_tensor(torch.zeros(0, 1))[:8]
    tr = SecureTransport(key_dir, tmp_path / "s", N)
    message = tr.client_upload_bytes(1, 0, head + struct.pack(">2Q", 0, 1 << 63), "theta")
    accepted, rejections = tr.server_receive(1, {0: message, 1: tr.client_upload(1, 1, rows()[1])},
                                             (P,))
    assert list(accepted) == [1] and [(r.client, r.reason) for r in rejections] == \
        [(0, "malformed_payload")]

def test_exchange_restores_rejected_rows(key_dir, tmp_path):
    tr = SecureTransport(key_dir, tmp_path / "s", N)
    theta0 = rows(4)
    theta = theta0.clone()
    phi = theta0.clone()

    def channel(kind, rnd, client, message):
        if rnd == 2 and client == 1:
            return tamper_payload(message)
        return message

    ex = SecureExchange.start(tr, theta, phi, channel=channel)
    theta[[0, 1, 2]] += 1.0  # "training" of the participants of round 1
    assert ex.upload_theta(1, theta, [0, 1, 2]) == [0, 1, 2]
    assert torch.equal(ex.server_theta, theta)
    after_round1 = theta.clone()
    theta[[0, 1]] += 1.0  # round 2: clients 0 and 1 train; client 1's upload is tampered
    assert ex.upload_theta(2, theta, [0, 1]) == [0]
    assert torch.equal(theta[1], after_round1[1])  # restored: a non-participant of round 2
    assert torch.equal(theta[0], after_round1[0] + 1.0)
    assert torch.equal(ex.server_theta, theta)
    phi_before = phi.clone()
    phi.copy_(theta * 2)
    assert ex.download_phi(2, phi) == [0, 2, 3]
    assert torch.equal(phi[1], phi_before[1]) and torch.equal(phi[0], theta[0] * 2)
    assert torch.equal(ex.client_phi, phi)
    assert [(r.client, r.round, r.direction) for r in ex.rejections] == [(1, 2, "upload"), (1, 2, "download")]
    with pytest.raises(TransportError, match="shape"):
        ex.upload_theta(3, theta[:, :3], [0])
    with pytest.raises(TransportError, match="rows"):
        SecureExchange.start(tr, torch.zeros(N + 1, P))


def test_for_simulation_creates_keys_once_and_separates_methods(tmp_path):
    tr = SecureTransport.for_simulation(tmp_path, 3, "fedora")
    assert (tmp_path / "keys" / "allowlist.json").exists()
    assert oct((tmp_path / "keys" / "client-000.ed25519.key").stat().st_mode & 0o777) == "0o600"
    msg = tr.client_upload(1, 0, torch.ones(2))
    again = SecureTransport.for_simulation(tmp_path, 3, "fedora")  # reuses keys and nonce state
    _, rejections = again.server_receive(1, {0: msg}, (2,))
    assert not rejections
    _, rejections = SecureTransport.for_simulation(tmp_path, 3, "fedora").server_receive(1, {0: msg}, (2,))
    assert [r.reason for r in rejections] == ["replayed_nonce"]
    # Round 5 of one method does not make round 1 of the next method stale.
    tr.server_receive(5, {1: tr.client_upload(5, 1, torch.ones(2))}, (2,))
    other = SecureTransport.for_simulation(tmp_path, 3, "fedavg")
    assert (tmp_path / "transport" / "fedora" / "server.nonces.jsonl").exists()
    accepted, rejections = other.server_receive(1, {1: other.client_upload(1, 1, torch.ones(2))}, (2,))
    assert sorted(accepted) == [1] and not rejections
    with pytest.raises(IdentityError):
        SecureTransport.for_simulation(tmp_path, 3, "../escape")


def test_batch_receivers_persist_with_one_fsync_per_state_file(key_dir, tmp_path, monkeypatch):
    import os

    tr = SecureTransport(key_dir, tmp_path / "s", N)
    theta = rows(5)
    ups = uploads(tr, 1, theta)
    downs = {i: tr.server_send(1, i, theta[i]) for i in range(N)}
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    accepted, _ = tr.server_receive(1, ups, (P,))
    assert len(accepted) == N and len(calls) == 1
    accepted, _ = tr.clients_receive(1, downs, (P,))
    assert len(accepted) == N and len(calls) == 2  # all clients share one journal
    monkeypatch.undo()
    assert (tmp_path / "s" / "clients.nonces.jsonl").exists()
    # A restarted transport remembers every client's nonce.
    again = SecureTransport(key_dir, tmp_path / "s", N)
    accepted, rejections = again.clients_receive(1, downs, (P,))
    assert not accepted and {r.reason for r in rejections} == {"replayed_nonce"}


def test_float64_payloads_and_expected_dtype(transport):
    t = torch.tensor([[1 / 3, 2**-40], [1e300, -0.0]], dtype=torch.float64)
    back = decode_tensor(encode_tensor(t, dtype=torch.float64), dtype=torch.float64)
    assert back.dtype == torch.float64 and torch.equal(back, t)
    with pytest.raises(TypeError, match="wire dtype"):
        encode_tensor(t, dtype=torch.float16)
    msg = transport.client_upload(1, 0, t, kind="gram_release", dtype=torch.float64)
    accepted, rejections = transport.server_receive(1, {0: msg}, (2, 2), kind="gram_release")
    assert not accepted and rejections[0].reason == "malformed_payload"  # float32 expected
    msg = transport.client_upload(2, 0, t, kind="gram_release", dtype=torch.float64)
    accepted, _ = transport.server_receive(2, {0: msg}, (2, 2), kind="gram_release",
                                           dtype=torch.float64)
    assert torch.equal(accepted[0], t)


def test_generic_exchange_kinds_checks_and_fallbacks(key_dir, tmp_path, caplog):
    from secure_fedora.secure.transport import InvalidValueError

    tr = SecureTransport(key_dir, tmp_path / "s", N)
    models = rows(6)
    choice = torch.zeros(N, 1)
    glob = torch.zeros(N, P)

    def channel(kind, rnd, client, message):
        return tamper_payload(message) if kind in ("global", "clusters") and client == 2 else message

    ex = SecureExchange(tr, uploads={"theta": models, "choice": choice},
                        downloads={"global": glob}, channel=channel, last_round=3)
    assert ex.last_round == 3
    with pytest.raises(TransportError, match="does not track"):
        ex.upload_rows(4, models, [0], kind="other")
    with pytest.raises(TransportError, match="rows for"):
        SecureExchange(tr, uploads={"theta": torch.zeros(N + 1, P)})

    def small(t):
        return None if float(t[0]) < 2 else f"index {float(t[0]):g} too large"

    choice.copy_(torch.tensor([[0.0], [1.0], [5.0], [1.0]]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ex.upload_rows(4, choice, [3, 2, 1], kind="choice", check=small) == [3, 1]
    assert float(choice[2, 0]) == 0.0  # restored to the server's last accepted value
    assert ex.rejections[-1].error_type == InvalidValueError.__name__
    assert any(e["reason"] == "invalid_value" for e in _events(caplog))
    new_global = torch.full((P,), 3.0)
    held, accepted = ex.download_rows(4, {i: new_global for i in range(N)}, kind="global")
    assert accepted == [0, 1, 3]
    assert torch.equal(held[0], new_global) and torch.equal(held[2], torch.zeros(P))  # fallback
    held, accepted = ex.download_rows(4, {0: torch.ones(2, P), 2: torch.ones(2, P)}, kind="clusters")
    assert accepted == [0] and list(held) == [0]  # untracked kind: a rejecting client has nothing
    assert ex.last_round == 4
    with pytest.raises(TransportError, match="one shape"):
        ex.download_rows(5, {0: torch.ones(P), 1: torch.ones(P + 1)}, kind="clusters")


# --------------------------------------------------------------------- bound and bounded (issue 14)


def test_fedora_message_replayed_into_fedavg_exchange_is_rejected(tmp_path, caplog):
    """Issue 14, "Why" 7: both methods' exchanges share the keys and the round numbers; the
    envelope's context binds a message to its method, so the replay is a rejection record."""
    run = tmp_path / "run"
    fedora = SecureTransport.for_simulation(run, N, "fedora", context="run-a/fedora")
    fedavg = SecureTransport.for_simulation(run, N, "fedavg", context="run-a/fedavg")
    theta = rows(3)
    message = fedora.client_upload(2, 1, theta[1])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        accepted, rejections = fedavg.server_receive(2, {1: message}, (P,))
    assert accepted == {}
    assert [(r.client, r.round, r.reason) for r in rejections] == [(1, 2, "wrong_context")]
    assert _events(caplog)[-1]["reason"] == "wrong_context"
    # The message itself was fine for its own exchange.
    accepted, rejections = fedora.server_receive(2, {1: message}, (P,))
    assert rejections == [] and torch.equal(accepted[1], theta[1])
    # Default contexts differ per method too.
    a = SecureTransport.for_simulation(tmp_path / "r2", N, "fedora")
    b = SecureTransport.for_simulation(tmp_path / "r2", N, "fedavg")
    assert b.server_receive(1, {0: a.client_upload(1, 0, theta[0])}, (P,))[1][0].reason \
        == "wrong_context"


def test_oversize_upload_is_rejected_unparsed_as_a_record(transport, key_dir, tmp_path,
                                                          monkeypatch):
    """An upload larger than the expected tensor (as a 400 MB payload would be) is rejected
    on its length alone: crafted here by a tight shape, without allocating 400 MB."""
    import privacy.envelope as envelope_module

    big = transport.client_upload(1, 0, torch.zeros(8192))  # 32 KiB > header cap + 10 floats
    good = transport.client_upload(1, 1, torch.zeros(P))
    calls = {"sha256": 0}
    real_sha256 = envelope_module.hashlib.sha256

    def counting(data=b""):
        calls["sha256"] += 1
        return real_sha256(data)

    monkeypatch.setattr(envelope_module.hashlib, "sha256", counting)
    accepted, rejections = transport.server_receive(1, {0: big, 1: good}, (P,))
    assert list(accepted) == [1]
    assert [(r.client, r.reason) for r in rejections] == [(0, "message_too_large")]
    assert calls["sha256"] == 1  # only the well-sized message was hashed
    # Opaque payloads are capped by max_message_bytes.
    tight = SecureTransport(key_dir, tmp_path / "t2", N, max_message_bytes=512)
    message = tight.client_upload_bytes(1, 2, b"z" * 600, "blob")
    _, rejections = tight.server_receive_bytes(1, {2: message}, "blob")
    assert [r.reason for r in rejections] == ["message_too_large"]
    with pytest.raises(TransportError, match="max_message_bytes"):
        SecureTransport(key_dir, tmp_path / "t3", N, max_message_bytes=0)


def test_a_message_refused_on_its_payload_records_no_nonce_and_a_replay_stays_refused(
        key_dir, tmp_path):
    """The batch receivers committed the nonce of every message whose envelope verified and
    only then decoded its payload, so a signed upload refused for its shape, for a value
    check or for a tensor that does not decode still changed server.nonces.jsonl. A message
    refused for any reason now leaves the file's bytes as they were; an accepted one is
    durable first, so its replay is refused, after a restart too."""
    state = tmp_path / "state"
    transport = SecureTransport(key_dir, state, N)
    nonces = state / "server.nonces.jsonl"
    theta = rows()
    good = transport.client_upload(1, 0, theta[0])
    accepted, rejections = transport.server_receive(1, {0: good}, (P,))
    assert list(accepted) == [0] and rejections == []
    before = nonces.read_bytes()
    refused = {
        1: transport.client_upload(1, 1, theta[1][: P - 1]),  # wrong shape
        2: transport.client_upload(1, 2, theta[2] + 100.0),  # refused by the value check
        3: transport.client_upload_bytes(1, 3, b"SFTR not a tensor", "theta"),  # no tensor
    }
    accepted, rejections = transport.server_receive(
        1, refused, (P,), check=lambda t: "too large" if t.abs().max() > 50 else None)
    assert accepted == {}
    assert [(r.client, r.reason) for r in rejections] == \
        [(1, "wrong_shape"), (2, "invalid_value"), (3, "malformed_payload")]
    assert nonces.read_bytes() == before
    # the same refused message is refused again for the same reason, not as a replay
    _, again = transport.server_receive(1, {1: refused[1]}, (P,))
    assert [r.reason for r in again] == ["wrong_shape"]
    assert nonces.read_bytes() == before
    # a client refusing a download on its shape keeps its own journal unchanged too
    journal = state / "clients.nonces.jsonl"
    before_journal = journal.read_bytes()
    with pytest.raises(TensorShapeError):
        transport.client_receive(1, 0, transport.server_send(1, 0, theta[0]), (P + 1,))
    assert journal.read_bytes() == before_journal
    for receiver in (transport, SecureTransport(key_dir, state, N)):  # and after a restart
        _, replayed = receiver.server_receive(1, {0: good}, (P,))
        assert [r.reason for r in replayed] == ["replayed_nonce"]


def test_send_entries_signs_any_entry_hands_it_over_uncopied_and_drops_a_tampered_one(
        key_dir, tmp_path, monkeypatch):
    """Untracked kinds and evaluation entries (any payload dtype) travel signed: an accepted
    client holds the sent tensor itself (no per-client copy), a tampered message is rejected,
    a validly signed message with another payload is decoded, and batches bound the messages
    held at once."""
    from secure_fedora.secure.transport import decode_entry, encode_entry

    for value in (torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.tensor(True),
                  torch.randn(3, dtype=torch.float16), torch.randn(2, 2, dtype=torch.float64)):
        assert torch.equal(decode_entry(encode_entry(value), value.dtype, value.shape), value)
    with pytest.raises(MalformedPayloadError, match="expects torch.int32"):
        decode_entry(encode_entry(torch.zeros(2, dtype=torch.int64)), torch.int32, (2,))
    tr = SecureTransport(key_dir, tmp_path / "s", N)
    seen = []

    def channel(kind, rnd, client, message):
        seen.append(client)
        return tamper_payload(message) if client == 2 else message

    ex = SecureExchange(tr, channel=channel)
    version = torch.tensor(7, dtype=torch.int64)
    assert ex.send_entries(1, {i: version for i in range(N)}, kind="clusters_version") == [0, 1, 3]
    assert [(r.client, r.reason) for r in ex.rejections] == [(2, "payload_hash_mismatch")]
    monkeypatch.setattr(SecureExchange, "BATCH_BYTES", 8)  # one client per batch
    seen.clear()
    glob = torch.randn(P)
    received = {}
    real = tr.clients_receive_entries

    def spy(rnd, messages, kind, sent):
        accepted, rejections = real(rnd, messages, kind, sent)
        received.update(accepted)
        assert len(messages) == 1
        return accepted, rejections

    monkeypatch.setattr(tr, "clients_receive_entries", spy)
    assert ex.send_entries(1, {i: glob for i in range(N)}, kind="evaluate.global") == [0, 1, 3]
    assert seen == [0, 1, 2, 3] and all(received[i] is glob for i in (0, 1, 3))
    other = tr.server_send_entry(2, 0, torch.zeros(P), "global")  # signed, another payload
    got, rejections = real(2, {0: other}, "global", {0: (encode_entry(glob), glob)})
    assert not rejections and torch.equal(got[0], torch.zeros(P))
