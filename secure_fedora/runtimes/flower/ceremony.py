"""CKKS relatedness in the Flower runtime: the key holder's keys on its own disk.

The protocol is :mod:`secure_fedora.secure.relatedness` (one implementation for both runtimes):
its step functions run in the process of the party that performs them, and the Flower apps
only move their bytes in signed messages:

- key holder (``client_app.ceremony``, then ``client_app.decrypt_overlaps_handler``): creates
  the keys once per run with :class:`KeyHolderStore` (below), which keeps the secret context
  sealed to the key holder's own X25519 key (file mode 0600) and hands out the public context
  and the secret context sealed to every client of the allowlist; later decrypts the
  encrypted Gram rows (``decrypt_rows``) into the ``q x q`` overlap blocks and releases
  nothing else;
- key holder: signs each sealed context for the run, its recipient and the public context
  (``sign_sealed_keys``);
- client (``client_app.encrypted_summary``): ``open_signed_keys`` (refuses, naming the key
  holder, a context the key holder did not sign for this run, this client and the public
  context the server states), then ``encrypt_summary``;
- server (``server_app._encrypted_overlaps``): ``open_server_context`` (refuses a context that
  holds a secret key), ``parse_upload`` per client, ``gram_rows`` with the public context only.

What each party learns (honest-but-curious, docs/design.md section 3): the server sees
ciphertexts, then the released overlaps; the key holder sees the overlaps. Assumptions: the
server forwards only the computed rows to the key holder (a server deviating from the
protocol could mod-switch a client's ciphertext to the row level and have it decrypted);
every client holds the secret key (the design seals it to each of them), so no client may
ever receive another client's upload -- the server never forwards uploads. Galois keys: the
server receives TenSEAL's default rotation set (powers of two and conjugation); TenSEAL
offers no way to generate only the steps the layout uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from privacy.ckks import InnerProductLayout
from privacy.identity import Identity
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.core.files import atomic_write_bytes
from secure_fedora.runtimes.flower.contexts import DataSchema
from secure_fedora.runtimes.flower.protocol import DeployError
from secure_fedora.runtimes.flower.state import NodeStateError
from secure_fedora.secure.relatedness import (
    SecureRelatednessError,
    create_keys,
    open_keys,
    plan_layout,
    public_keys,
    seal_keys,
)

__all__ = [
    "CeremonyError",
    "KeyHolderStore",
    "SealedContext",
    "layout_for",
    "public_context_digest",
]


def public_context_digest(public: bytes) -> str:
    """SHA-256 (hex) of a serialized public CKKS context: what the server re-states to the key
    holder as the ceremony it accepted (``answered-ceremony``)."""
    return hashlib.sha256(public).hexdigest()


@dataclass(frozen=True)
class SealedContext:
    """One client's sealed secret context as the server forwards it: the blob, the key
    holder's signature of it (:func:`~secure_fedora.secure.relatedness.sign_sealed_keys`) and
    the digest of the public context the server computes with, which that signature binds."""

    blob: bytes
    signature: bytes
    public_digest: str


class CeremonyError(DeployError, SecureRelatednessError):
    """The key holder's stored CKKS keys are missing or unusable (a deployment failure that is
    also a relatedness-protocol error)."""


def layout_for(cfg: ExperimentConfig, schema: DataSchema) -> InnerProductLayout:
    """The packing layout of the run: ``N * q`` vectors of the summary's dimension on data of
    ``schema`` (input features + classes: the rows of every client's summary ``U_i``)."""
    return plan_layout(cfg.data.num_clients, cfg.fedora.q, schema.summary_width)


def _write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``; the file is created 0600, its directory 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


@dataclass(frozen=True)
class KeyHolderStore:
    """The key holder's CKKS keys for one run, kept in ``directory`` on its own disk.

    ``secret-context.sealed``: the secret context (secret and public key) sealed to the key
    holder's own X25519 key, mode 0600. ``public-context.bin``: the public context the server
    receives (mode 0600 as well). Both are written atomically, the public one first, so a
    crash leaves either a complete pair or a pair that :meth:`ceremony` recreates.
    """

    directory: Path
    identity: Identity

    @property
    def secret_path(self) -> Path:
        """Where the sealed secret context lives."""
        return self.directory / "secret-context.sealed"

    @property
    def public_path(self) -> Path:
        """Where the serialized public context lives."""
        return self.directory / "public-context.bin"

    def exists(self) -> bool:
        """True once a ceremony completed for this run (both files present)."""
        return self.secret_path.exists() and self.public_path.exists()

    def ceremony(self, recipients: Mapping[str, X25519PublicKey]) -> tuple[bytes, dict[str, bytes]]:
        """``(public context bytes, {client id: sealed secret context})`` for ``recipients``.

        The keys are created on the first call of a run and stored; every later call (a
        repeated request, a restarted node) reuses them, so the public context is byte-identical
        and ciphertexts made under it stay decryptable. ``recipients`` must include the key
        holder itself.
        """
        if self.exists():
            secret = self.secret_context()
            public = self.public_path.read_bytes()
        else:
            secret = create_keys()
            public = public_keys(secret)
        sealed = seal_keys(secret, recipients, self.identity.party_id)
        if not self.exists():
            _write_private(self.public_path, public)
            _write_private(self.secret_path, sealed[self.identity.party_id])
        return public, sealed

    def check_answered(self, answered: str) -> None:
        """Refuse (NodeStateError) to decrypt with a store that is not the one whose ceremony
        the server accepted: ``answered`` is the digest of the public context it holds
        (:func:`public_context_digest`). A store gone (the state-dir wiped) or holding other
        keys (an older or other copy) is refused before it decrypts: the first cannot decrypt,
        the second decrypts the rows into noise, which ``decrypt_rows`` refuses only as "a
        ciphertext under another key, or corrupted" (the server's rows, it seems)."""
        if not self.exists():
            raise NodeStateError(
                f"the server accepted {self.identity.party_id}'s key ceremony (public context "
                f"{answered[:12]}), but {self.directory} holds no CKKS keys: the node's "
                "state-dir was wiped or replaced since. Restore it from a copy, or start a new "
                "run")
        have = public_context_digest(self.public_path.read_bytes())
        if have != answered:
            raise NodeStateError(
                f"{self.directory} holds other CKKS keys (public context {have[:12]}) than the "
                f"ones whose ceremony the server accepted ({answered[:12]}): an older or other "
                "copy of the store, which cannot decrypt this run's rows. Restore the node's "
                "state-dir from a copy taken after the ceremony, or start a new run")

    def secret_context(self) -> ts.Context:
        """The stored secret context, opened with the key holder's X25519 key."""
        if not self.exists():
            raise CeremonyError(
                f"{self.identity.party_id} holds no CKKS keys for this run in {self.directory} "
                "(no key ceremony ran on this node)"
            )
        try:
            return open_keys(self.secret_path.read_bytes(), self.identity)
        except SecureRelatednessError as err:
            raise CeremonyError(f"stored secret context is unusable: {err}") from None
