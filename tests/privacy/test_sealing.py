import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy.sealing import SEAL_MAGIC, SealingError, open_sealed, seal, sealed_overhead


@pytest.fixture()
def keys():
    return X25519PrivateKey.generate(), X25519PrivateKey.generate()


def test_roundtrip_with_associated_data(keys):
    alice, _ = keys
    blob = seal(b"secret payload", alice.public_key(), b"ctx")
    assert blob.startswith(SEAL_MAGIC)
    assert len(blob) == len(b"secret payload") + sealed_overhead()
    assert open_sealed(blob, alice, b"ctx") == b"secret payload"


def test_each_seal_is_fresh(keys):
    alice, _ = keys
    a = seal(b"same", alice.public_key())
    b = seal(b"same", alice.public_key())
    assert a != b
    assert open_sealed(a, alice) == open_sealed(b, alice) == b"same"


def test_empty_and_large_plaintexts(keys):
    alice, _ = keys
    assert open_sealed(seal(b"", alice.public_key()), alice) == b""
    big = bytes(range(256)) * 4000
    assert open_sealed(seal(big, alice.public_key()), alice) == big


def test_wrong_recipient_rejected(keys):
    alice, bob = keys
    blob = seal(b"for alice", alice.public_key())
    with pytest.raises(SealingError, match="failed authentication"):
        open_sealed(blob, bob)


def test_wrong_associated_data_rejected(keys):
    alice, _ = keys
    blob = seal(b"x", alice.public_key(), b"client-001")
    with pytest.raises(SealingError, match="failed authentication"):
        open_sealed(blob, alice, b"client-002")


@pytest.mark.parametrize("position", [0, 6, 10, 50, -1])
def test_any_tampered_byte_rejected(keys, position):
    alice, _ = keys
    blob = bytearray(seal(b"tamper me please", alice.public_key()))
    blob[position] ^= 0x01
    with pytest.raises(SealingError):
        open_sealed(bytes(blob), alice)


def test_truncated_and_version(keys):
    alice, _ = keys
    blob = seal(b"abc", alice.public_key())
    with pytest.raises(SealingError, match="too short"):
        open_sealed(blob[:20], alice)
    bad_version = bytearray(blob)
    bad_version[len(SEAL_MAGIC)] = 2
    with pytest.raises(SealingError, match="unsupported sealed-blob version 2"):
        open_sealed(bytes(bad_version), alice)


def test_type_errors(keys):
    alice, _ = keys
    with pytest.raises(SealingError, match="X25519PublicKey"):
        seal(b"x", alice)  # type: ignore[arg-type]
    with pytest.raises(SealingError, match="plaintext must be bytes"):
        seal("text", alice.public_key())  # type: ignore[arg-type]
    with pytest.raises(SealingError, match="X25519PrivateKey"):
        open_sealed(b"x" * 80, alice.public_key())  # type: ignore[arg-type]
