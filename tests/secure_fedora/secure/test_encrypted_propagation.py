"""Encrypted propagation: equals plaintext P @ theta, the server cannot decrypt, bad input is named."""

import logging

import pytest
import torch

from privacy.ckks import CkksError, EncryptedVector, context_to_bytes, decrypt_vector
from privacy.identity import Identity, default_party_ids, init_keys
from secure_fedora.secure.encrypted_propagation import (
    EncryptedPropagationError,
    EncryptedPropagator,
    PropagationClient,
    PropagationServer,
    complex_length,
)
from secure_fedora.secure.transport import SecureExchange, SecureTransport

N = 4
P = 9001  # odd, and more than one ciphertext (8192 parameters each)


@pytest.fixture(scope="module")
def propagator():
    return EncryptedPropagator(N, identities=[Identity.generate(f"client-{i:03d}") for i in range(N)])


def case(seed=0, n=N, p=P):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, p, generator=g) * 0.1
    prop = torch.rand(n, n, generator=g, dtype=torch.float64)
    return prop / prop.sum(dim=1, keepdim=True), theta


def test_equals_plaintext_propagation(propagator):
    prop, theta = case()
    phi = propagator.propagate(prop, theta)
    assert phi.shape == theta.shape and phi.dtype == torch.float32
    expected = prop.to(theta.dtype) @ theta
    assert (phi - expected).abs().max().item() < 1e-5
    exact = prop @ theta.double()
    assert (phi.double() - exact).abs().max().item() < 1e-6
    assert propagator.ciphertexts_per_row(P) == 2


def test_float64_and_identity_weights(propagator):
    _, theta = case(1)
    theta = theta.double()
    phi = propagator.propagate(torch.eye(N, dtype=torch.float64), theta)
    assert phi.dtype == torch.float64
    assert (phi - theta).abs().max().item() < 1e-7


def test_only_changed_clients_upload(propagator):
    prop, theta = case(2)
    propagator.propagate(prop, theta)
    theta2 = theta.clone()
    theta2[2] += 0.5
    phi = propagator.propagate(prop, theta2, changed=[2])
    assert (phi - prop.float() @ theta2).abs().max().item() < 1e-5
    last = propagator.stats.last_round
    assert [b > 0 for b in last["bytes_sent"]] == [False, False, True, False]
    assert all(b > 0 for b in last["bytes_received"])


def test_traffic_and_time_are_counted(propagator):
    before = propagator.stats.rounds
    sent = list(propagator.stats.client_bytes_sent)
    prop, theta = case(3)
    propagator.propagate(prop, theta)
    s = propagator.stats
    assert s.rounds == before + 1
    last = s.last_round
    assert [a - b for a, b in zip(s.client_bytes_sent, sent, strict=True)] == last["bytes_sent"]
    # complex packing: 2 ciphertexts per row, each well under the 4 * 8192 plaintext bytes x 8
    assert all(0 < b < 2 * 8192 * 4 * 8 for b in last["bytes_sent"])
    for phase in ("clients_encrypt", "server_combine", "clients_decrypt", "total"):
        assert last[f"{phase}_s"] >= 0 and last[f"{phase}_cpu_s"] >= 0
    assert s.server_context_bytes > 0 and s.sealed_context_bytes > 0 and s.ceremony_seconds > 0
    assert set(s.to_dict()) >= {"rounds", "client_bytes_sent", "last_round", "totals"}


def test_server_holds_no_secret_key_and_cannot_decrypt(propagator):
    server = propagator.server
    assert not server.context.has_secret_key()
    for value in vars(server).values():
        assert not isinstance(value, PropagationClient)
    prop, theta = case(4)
    uploads = [propagator.client.encrypt(row) for row in theta]
    results = server.combine(prop, uploads, P)
    enc = EncryptedVector.deserialize(results[0])
    with pytest.raises(CkksError, match="no secret key"):
        decrypt_vector(server.context, enc)
    with pytest.raises(CkksError, match="no secret key"):
        decrypt_vector(server.context, EncryptedVector.deserialize(uploads[0]))
    with pytest.raises(EncryptedPropagationError, match="secret CKKS context"):
        PropagationClient(server.context)
    # The key holder's client role decrypts the same bytes correctly.
    phi0 = propagator.client.decrypt(results[0], P)
    assert (phi0 - prop[0] @ theta.double()).abs().max().item() < 1e-6
    # A server context that carries a secret key is refused outright.
    with pytest.raises(EncryptedPropagationError, match="server context rejected"):
        PropagationServer(context_to_bytes(propagator.client.keys.ctx, include_secret_key=True))


def test_public_key_client_encryption(propagator):
    client = PropagationClient(propagator.client.keys.ctx, encryption="public")
    prop, theta = case(5, p=100)
    uploads = [client.encrypt(row) for row in theta]
    out = propagator.server.combine(prop, uploads, 100)
    got = torch.stack([client.decrypt(b, 100) for b in out])
    assert (got - prop @ theta.double()).abs().max().item() < 1e-6


def test_input_errors(propagator):
    prop, theta = case(6)
    # a first round fixes the column count: under pytest-xdist this test may be the first of
    # the module on its worker, and the module's propagator would take 100 columns below
    propagator.propagate(prop, theta)
    with pytest.raises(EncryptedPropagationError, match=r"propagation matrix must be \(4, 4\)"):
        propagator.propagate(prop[:3, :3], theta)
    with pytest.raises(EncryptedPropagationError, match=r"theta must be \(4, P\)"):
        propagator.propagate(prop, theta[:3])
    with pytest.raises(EncryptedPropagationError, match="earlier rounds"):
        propagator.propagate(prop, theta[:, :100])
    bad = theta.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(EncryptedPropagationError, match="client 1: row holds NaN"):
        propagator.propagate(prop, bad)
    big = theta.clone()
    big[3, 0] = 5000.0
    with pytest.raises(EncryptedPropagationError, match="client 3: row reaches"):
        propagator.propagate(prop, big)
    with pytest.raises(EncryptedPropagationError, match="not a client index"):
        propagator.propagate(prop, theta, changed=[7])
    with pytest.raises(EncryptedPropagationError, match="MAX_WEIGHT_L1"):
        propagator.propagate(prop * 1000, theta)
    with pytest.raises(EncryptedPropagationError, match="1-D"):
        propagator.client.encrypt(theta)
    with pytest.raises(EncryptedPropagationError, match="real floating"):
        propagator.client.encrypt(torch.ones(3, dtype=torch.int64))
    with pytest.raises(EncryptedPropagationError, match="num_clients"):
        EncryptedPropagator(0)
    with pytest.raises(EncryptedPropagationError, match="key_holder"):
        EncryptedPropagator(2, key_holder=2)
    with pytest.raises(EncryptedPropagationError, match="encryption"):
        PropagationClient(propagator.client.keys.ctx, encryption="none")


def test_server_rejects_bad_uploads(propagator):
    prop, theta = case(7, p=100)
    uploads = [propagator.client.encrypt(row) for row in theta]
    server = propagator.server
    tampered = bytearray(uploads[2])
    # Corrupt the serialized structure (the compressed frame's magic at byte 40), not a
    # coefficient: a flip inside the compressed coefficients can decode to another valid
    # ciphertext (about 2% of random flips at byte 60), since CKKS has no integrity of its
    # own; authenticity comes from the envelopes tested below.
    tampered[41] ^= 0xFF
    with pytest.raises(EncryptedPropagationError, match="upload of client 2"):
        server.combine(prop, [*uploads[:2], bytes(tampered), uploads[3]], 100)
    with pytest.raises(EncryptedPropagationError, match="upload of client 1 rejected: length"):
        server.combine(prop, [uploads[0], propagator.client.encrypt(theta[1, :50]), *uploads[2:]], 100)
    with pytest.raises(EncryptedPropagationError, match="upload of client 0"):
        server.combine(prop, [b"garbage", *uploads[1:]], 100)
    with pytest.raises(EncryptedPropagationError, match="3 uploads"):
        server.combine(prop, uploads[:3], 100)
    with pytest.raises(EncryptedPropagationError, match="NaN"):
        server.combine(prop * float("nan"), uploads, 100)
    # a result of the wrong size for the client's model
    out = server.combine(prop, uploads, 100)
    with pytest.raises(EncryptedPropagationError, match="expected 100 at level 0"):
        propagator.client.decrypt(out[0], 200)
    # an upload (level 1) is not a result (level 0)
    with pytest.raises(EncryptedPropagationError, match="level"):
        propagator.client.decrypt(uploads[0], 100)
    assert complex_length(100) == 50 and complex_length(101) == 51


# -- ciphertexts in signed envelopes ---------------------------------------------------------


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    init_keys(d, default_party_ids(N))
    return d


def flip_last_byte(message):
    data = bytearray(message)
    data[-1] ^= 0x01
    return bytes(data)


def test_enveloped_rounds_drop_bad_messages_and_keep_going(propagator, key_dir, tmp_path, caplog):
    transport = SecureTransport(key_dir, tmp_path / "state", N)
    prop, theta = case(8, p=300)
    init = theta.clone()
    attacks = {}
    kinds_seen = set()

    def channel(kind, rnd, client, message):
        kinds_seen.add(kind)
        return flip_last_byte(message) if (kind, rnd, client) in attacks else message

    exchange = SecureExchange.start(transport, theta, channel=channel)
    ep = EncryptedPropagator(N)
    # Round 1: client 2's ciphertext is authentic (signed) but not a ciphertext at all.
    theta += 0.01
    real_encrypt = ep.client.encrypt
    ep.client.encrypt = lambda row: b"garbage" if torch.equal(row, theta[2]) else real_encrypt(row)
    with caplog.at_level(logging.WARNING, logger="secure_fedora.security"):
        phi = ep.propagate(prop, theta, rnd=1, exchange=exchange)
    ep.client.encrypt = real_encrypt
    assert [(r.client, r.reason, r.error_type) for r in exchange.rejections] == [
        (2, "malformed_payload", "MalformedPayloadError")]
    assert torch.equal(theta[2], init[2])  # a non-participant: back to the initialization
    assert (phi - prop.float() @ theta).abs().max().item() < 1e-5
    assert torch.equal(exchange.server_theta, theta) and torch.equal(exchange.client_phi, phi)
    assert any(getattr(r, "security_event", {}).get("reason") == "malformed_payload" for r in caplog.records)
    assert kinds_seen == {"enc_theta", "enc_phi"}  # no plaintext row was ever sent
    assert transport.stats.messages_sent == 2 * N

    # Round 2: client 1's upload is tampered in transit, client 3's result too.
    attacks = {("enc_theta", 2, 1): True, ("enc_phi", 2, 3): True}
    before = theta.clone()
    phi_before = phi.clone()
    theta[[0, 1]] += 0.02
    phi = ep.propagate(prop, theta, changed=[0, 1], rnd=2, exchange=exchange)
    new = [(r.client, r.round, r.reason, r.direction) for r in exchange.rejections[1:]]
    assert new == [(1, 2, "payload_hash_mismatch", "upload"), (3, 2, "payload_hash_mismatch", "download")]
    assert torch.equal(theta[1], before[1])
    expected = prop.float() @ theta
    for i in (0, 1, 2):
        assert (phi[i] - expected[i]).abs().max().item() < 1e-5
    assert torch.equal(phi[3], phi_before[3])  # client 3 kept its last accepted phi
    assert torch.equal(exchange.server_theta, theta) and torch.equal(exchange.client_phi, phi)
    assert ep.stats.last_round["bytes_sent"][2] == 0 and ep.stats.last_round["bytes_sent"][0] > 0

    with pytest.raises(EncryptedPropagationError, match="needs rnd"):
        ep.propagate(prop, theta, rnd=None, exchange=exchange)


def test_enveloped_round_errors(propagator, key_dir, tmp_path):
    transport = SecureTransport(key_dir, tmp_path / "state", N)
    prop, theta = case(9)
    exchange = SecureExchange.start(transport, theta[:, :10].clone())
    with pytest.raises(EncryptedPropagationError, match="exchange is for"):
        propagator.propagate(prop, theta, rnd=1, exchange=exchange)


def test_uploads_without_envelopes_are_made_by_the_encrypt_stage(propagator, monkeypatch):
    """Without an exchange there is no envelope to sign, but each changed client's ciphertext
    is still produced by an EncryptPayload stage of its upload pipeline, and only by it."""
    from privacy.pipeline import EncryptPayload

    made = []
    real = EncryptPayload.process

    def encrypt(self, release):
        out = real(self, release)
        made.append((release.kind, len(out.payload)))
        return out

    monkeypatch.setattr(EncryptPayload, "process", encrypt)
    prop, theta = case(5)
    propagator.propagate(prop, theta)
    theta2 = theta.clone()
    theta2[1] -= 0.25
    phi = propagator.propagate(prop, theta2, changed=[1])
    assert (phi - prop.float() @ theta2).abs().max().item() < 1e-5
    sent = propagator.stats.last_round["bytes_sent"]
    assert [kind for kind, _ in made] == ["enc_theta"] * (N + 1)
    assert made[-1][1] == sent[1] and [b > 0 for b in sent] == [False, True, False, False]


def test_a_result_decrypted_by_another_key_holder_is_an_error_not_garbage(propagator):
    """A result decrypted with another secret key gave values around 1e7, silently."""
    from privacy.ckks import create_secret_context

    prop, theta = case(7)
    results = propagator.server.combine(prop, [propagator.client.encrypt(r) for r in theta], P)
    stranger = PropagationClient(create_secret_context())
    with pytest.raises(EncryptedPropagationError, match="cannot decrypt propagation result: .*another key"):
        stranger.decrypt(results[0], P)
    assert (propagator.client.decrypt(results[0], P) - prop[0] @ theta.double()).abs().max() < 1e-6
