"""Sealed messages: public-key authenticated encryption to one recipient's X25519 key.

Construction (an ECIES / HPKE-base-mode style "sealed box"):

1. the sender draws an ephemeral X25519 key pair and computes the shared secret with the
   recipient's X25519 public key;
2. HKDF-SHA256 derives a 32-byte key from the shared secret, salted with the ephemeral
   and recipient public keys and bound to this format's version by its ``info`` string;
3. ChaCha20-Poly1305 encrypts the plaintext with a random 96-bit nonce; the header and the
   caller's ``associated_data`` are authenticated as AEAD associated data.

Wire format, version 1::

    b"SFSEAL" | version (1 byte) | ephemeral X25519 public key (32) | nonce (12) | ciphertext+tag

Guarantees: confidentiality and integrity of the plaintext toward anyone without the
recipient's X25519 private key; any change to the blob or to ``associated_data`` makes
:func:`open_sealed` raise :class:`SealingError`. The sender is *not* authenticated by the
seal itself (anyone can seal to a public key); authenticate the sender by signing the blob
(e.g. with :mod:`privacy.envelope`).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.errors import ToolkitError

__all__ = ["SEAL_MAGIC", "SEAL_VERSION", "SealingError", "open_sealed", "seal", "sealed_overhead"]

SEAL_MAGIC = b"SFSEAL"
SEAL_VERSION = 1
_INFO = b"secure-fedora/seal/v1/x25519-hkdf-sha256-chacha20poly1305"
_NONCE_LEN = 12
_KEY_LEN = 32
_TAG_LEN = 16
_HEADER_LEN = len(SEAL_MAGIC) + 1 + 32 + _NONCE_LEN


class SealingError(ToolkitError):
    """A sealed blob is malformed, of an unsupported version, tampered with, or not for this key."""


def sealed_overhead() -> int:
    """Bytes a sealed blob adds to its plaintext (header + AEAD tag)."""
    return _HEADER_LEN + _TAG_LEN


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive_key(shared: bytes, ephemeral_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=_KEY_LEN,
        salt=ephemeral_pub + recipient_pub,
        info=_INFO,
    ).derive(shared)


def _aad(header: bytes, associated_data: bytes) -> bytes:
    # Length-prefix the caller's data so header/AD boundaries are unambiguous.
    return header + len(associated_data).to_bytes(8, "big") + associated_data


def seal(
    plaintext: bytes, recipient_x25519_public: X25519PublicKey, associated_data: bytes = b""
) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of the matching X25519 private key can open it.

    ``associated_data`` is authenticated, not encrypted, and must be given again to open.
    """
    if not isinstance(recipient_x25519_public, X25519PublicKey):
        raise SealingError(
            f"recipient key must be an X25519PublicKey, got {type(recipient_x25519_public).__name__}"
        )
    if not isinstance(plaintext, (bytes, bytearray, memoryview)):
        raise SealingError(f"plaintext must be bytes, got {type(plaintext).__name__}")
    if not isinstance(associated_data, (bytes, bytearray, memoryview)):
        raise SealingError(f"associated_data must be bytes, got {type(associated_data).__name__}")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = _raw(ephemeral.public_key())
    recipient_pub = _raw(recipient_x25519_public)
    try:
        shared = ephemeral.exchange(recipient_x25519_public)
    except ValueError as exc:  # low-order recipient point
        raise SealingError(f"invalid recipient X25519 public key: {exc}") from exc
    key = _derive_key(shared, ephemeral_pub, recipient_pub)
    nonce = os.urandom(_NONCE_LEN)
    header = SEAL_MAGIC + bytes([SEAL_VERSION]) + ephemeral_pub + nonce
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, bytes(plaintext), _aad(header, bytes(associated_data)))
    return header + ciphertext


def open_sealed(
    blob: bytes, recipient_x25519_private: X25519PrivateKey, associated_data: bytes = b""
) -> bytes:
    """Decrypt a blob made by :func:`seal`; raise :class:`SealingError` unless it is intact.

    Fails on: wrong magic or version, truncated data, a different recipient key, modified
    ciphertext/header, or ``associated_data`` different from the sender's.
    """
    if not isinstance(recipient_x25519_private, X25519PrivateKey):
        raise SealingError(
            "recipient key must be an X25519PrivateKey, got "
            f"{type(recipient_x25519_private).__name__}"
        )
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SealingError(f"sealed blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _HEADER_LEN + _TAG_LEN:
        raise SealingError(f"sealed blob too short ({len(blob)} bytes)")
    if not blob.startswith(SEAL_MAGIC):
        raise SealingError("not a sealed blob (bad magic)")
    version = blob[len(SEAL_MAGIC)]
    if version != SEAL_VERSION:
        raise SealingError(f"unsupported sealed-blob version {version} (this build reads {SEAL_VERSION})")
    header = blob[:_HEADER_LEN]
    ephemeral_pub = header[len(SEAL_MAGIC) + 1 : len(SEAL_MAGIC) + 33]
    nonce = header[len(SEAL_MAGIC) + 33 :]
    try:
        ephemeral = X25519PublicKey.from_public_bytes(ephemeral_pub)
        shared = recipient_x25519_private.exchange(ephemeral)
    except ValueError as exc:
        raise SealingError(f"sealed blob carries an invalid ephemeral key: {exc}") from exc
    key = _derive_key(shared, ephemeral_pub, _raw(recipient_x25519_private.public_key()))
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, blob[_HEADER_LEN:], _aad(header, bytes(associated_data)))
    except InvalidTag:
        raise SealingError(
            "sealed blob failed authentication (tampered, wrong recipient key, or wrong associated data)"
        ) from None
