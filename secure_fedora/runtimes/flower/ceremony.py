"""CKKS relatedness across Flower processes: key holder, clients and server, each on its own.

The protocol of :mod:`secure_fedora.secure.relatedness`, split by role so that each step runs
in the process of the party that performs it (the building blocks are :mod:`privacy.ckks`):

- key holder (:class:`KeyHolderStore`, on the key holder's SuperNode): creates the CKKS keys
  once per run, keeps the secret context on its own disk -- sealed to its own X25519 key, file
  mode 0600 -- and hands out the public context (public, relinearization and Galois keys; no
  secret key) and the secret context sealed to every client's X25519 key from the allowlist.
  Later, it decrypts the encrypted Gram rows into the ``q x q`` overlap blocks
  (:func:`decrypt_overlaps`) and releases nothing else;
- client (:func:`encrypt_summary`): opens its sealed context and encrypts the ``q`` columns of
  its summary ``U_i`` (column ``r`` is vector ``i * q + r`` of the layout);
- server (:func:`receive_public_context`, :func:`parse_upload`, :func:`encrypted_rows`):
  refuses any context that holds a secret key, checks each client's upload, and computes the
  encrypted rows with the public context only.

What each party learns (honest-but-curious, docs/design.md section 3): the server sees ciphertexts, then
the released overlaps; the key holder sees the overlaps. Assumptions: the server forwards
only the computed rows to the key holder (a server deviating from the protocol could
mod-switch a client's ciphertext to the row level and have it decrypted); every client holds
the secret key (the design seals it to each of them), so no client may ever receive another
client's upload -- the server never forwards uploads. Galois keys: the server receives
TenSEAL's default rotation set (powers of two and conjugation); TenSEAL offers no way to
generate only the steps the layout uses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from torch import Tensor

from privacy.ckks import (
    CkksError,
    EncryptedRow,
    InnerProductLayout,
    InnerProductUpload,
    context_from_bytes,
    create_secret_context,
    decrypt_inner_product_rows,
    encrypt_for_inner_products,
    inner_product_rows,
    open_secret_context,
    public_context_bytes,
    seal_secret_context,
)
from privacy.identity import Identity
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.core.files import atomic_write_bytes
from secure_fedora.runtimes.flower.protocol import SUMMARY_DIM, DeployError

__all__ = [
    "CeremonyError",
    "KeyHolderStore",
    "decrypt_overlaps",
    "encrypt_summary",
    "encrypted_rows",
    "layout_for",
    "open_client_context",
    "parse_upload",
    "receive_public_context",
]


class CeremonyError(DeployError):
    """A CKKS step of the encrypted relatedness phase failed (the message names the party)."""


def layout_for(cfg: ExperimentConfig) -> InnerProductLayout:
    """The packing layout of the run: ``N * q`` vectors of dimension ``SUMMARY_DIM``."""
    try:
        return InnerProductLayout.plan(cfg.data.num_clients * cfg.fedora.q, SUMMARY_DIM)
    except CkksError as err:
        raise CeremonyError(f"no CKKS layout for this federation: {err}") from None


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
        if self.identity.party_id not in recipients:
            raise CeremonyError(
                f"the key holder {self.identity.party_id} is not among the recipients"
            )
        if self.exists():
            secret = self.secret_context()
            public = self.public_path.read_bytes()
        else:
            secret = create_secret_context(galois_keys=True)
            public = public_context_bytes(secret, galois_keys=True, relin_keys=True)
        sealed = seal_secret_context(secret, recipients)
        if not self.exists():
            _write_private(self.public_path, public)
            _write_private(self.secret_path, sealed[self.identity.party_id])
        return public, sealed

    def secret_context(self) -> ts.Context:
        """The stored secret context, opened with the key holder's X25519 key."""
        if not self.exists():
            raise CeremonyError(
                f"{self.identity.party_id} holds no CKKS keys for this run in {self.directory} "
                "(no key ceremony ran on this node)"
            )
        try:
            return open_secret_context(
                self.secret_path.read_bytes(), self.identity.agreement_key, self.identity.party_id
            )
        except CkksError as err:
            raise CeremonyError(f"stored secret context is unusable: {err}") from None


def open_client_context(blob: bytes, identity: Identity) -> ts.Context:
    """A client opens the secret context sealed to it; :class:`CeremonyError` if not intact."""
    try:
        return open_secret_context(blob, identity.agreement_key, identity.party_id)
    except CkksError as err:
        raise CeremonyError(f"{identity.party_id}: {err}") from None


def encrypt_summary(
    ctx: ts.Context, layout: InnerProductLayout, client: int, summary: Tensor
) -> list[bytes]:
    """Client ``client``: its ``d x q`` summary as ``q`` serialized uploads (symmetric CKKS).

    Column ``r`` is vector ``client * q + r`` of ``layout``, exactly as the in-process
    :func:`secure_fedora.secure.relatedness.encrypted_overlaps` numbers them.
    """
    if summary.dim() != 2 or summary.shape[0] != layout.dim:
        raise CeremonyError(
            f"client {client}: summary has shape {tuple(summary.shape)}, expected ({layout.dim}, q)"
        )
    q = summary.shape[1]
    u = summary.detach().to(torch.float64)
    try:
        return [
            encrypt_for_inner_products(ctx, layout, client * q + r, u[:, r]).serialize()
            for r in range(q)
        ]
    except CkksError as err:
        raise CeremonyError(f"client {client}: {err}") from None


def receive_public_context(blob: bytes) -> ts.Context:
    """Server: parse the key holder's public context; refuse one that could decrypt.

    Raises :class:`CeremonyError` if the bytes are not a CKKS context with the run's
    parameters, if the context holds a secret key, or if it lacks the relinearization or
    Galois keys the encrypted inner products need.
    """
    try:
        ctx = context_from_bytes(bytes(blob), expect_secret_key=False)
    except CkksError as err:
        raise CeremonyError(f"the key holder's public context is refused: {err}") from None
    if ctx.has_secret_key():  # context_from_bytes checks this too; the server must never hold it
        raise CeremonyError("the key holder's public context holds a secret key")
    if not (ctx.has_galois_keys() and ctx.has_relin_keys()):
        raise CeremonyError("the key holder's public context lacks Galois or relinearization keys")
    return ctx


def parse_upload(
    layout: InnerProductLayout, client: int, q: int, columns: Sequence[bytes]
) -> list[InnerProductUpload]:
    """Server: client ``client``'s ``q`` uploads, each for its own vector index and with the
    layout's ciphertext counts; :class:`CeremonyError` naming the client otherwise."""
    if len(columns) != q:
        raise CeremonyError(f"client {client} sent {len(columns)} encrypted columns, expected {q}")
    uploads = []
    for r, blob in enumerate(columns):
        if not isinstance(blob, bytes):
            raise CeremonyError(f"client {client}: encrypted column {r} is not bytes")
        try:
            upload = InnerProductUpload.deserialize(blob)
        except CkksError as err:
            raise CeremonyError(f"client {client}: encrypted column {r}: {err}") from None
        if upload.index != client * q + r:
            raise CeremonyError(
                f"client {client}: encrypted column {r} is for vector {upload.index}, "
                f"expected {client * q + r}"
            )
        if len(upload.packed) != layout.packs or len(upload.broadcast) != layout.chunks:
            raise CeremonyError(
                f"client {client}: encrypted column {r} has {len(upload.packed)} + "
                f"{len(upload.broadcast)} ciphertexts, the layout needs {layout.packs} + "
                f"{layout.chunks}"
            )
        uploads.append(upload)
    return uploads


def encrypted_rows(
    server_ctx: ts.Context, layout: InnerProductLayout, q: int,
    uploads: Mapping[int, Sequence[InnerProductUpload]],
) -> list[bytes]:
    """Server: every serialized encrypted Gram row, computed with the public context only.

    A ciphertext that does not load or sits at the wrong level or scale raises
    :class:`CeremonyError` naming the client whose upload it is.
    """
    if server_ctx.has_secret_key():
        raise CeremonyError("the server's context holds a secret key; refusing to compute")
    flat = [up for client in sorted(uploads) for up in uploads[client]]
    try:
        rows = inner_product_rows(server_ctx, layout, flat)
    except CkksError as err:
        # privacy.ckks names the culprit ciphertext ("packed ciphertext 0 of vector 5: ...").
        found = re.search(r"of vector (\d+)", str(err))
        culprit = f"client {int(found.group(1)) // q}" if found else "a client"
        raise CeremonyError(f"encrypted summary of {culprit} is refused: {err}") from None
    return [row.serialize() for row in rows]


def decrypt_overlaps(
    secret_ctx: ts.Context, layout: InnerProductLayout, num_clients: int, q: int,
    rows: Sequence[bytes],
) -> Tensor:
    """Key holder: decrypt the ``N q`` rows into the ``(N, N, q, q)`` overlap blocks.

    The rows must be exactly vectors ``0 .. N q - 1`` in order, each a final-level row
    ciphertext (:func:`privacy.ckks.decrypt_inner_product_rows` refuses anything else, e.g. a
    client's upload). Released values are rounded to the 2^-16 grid of that function.
    """
    if layout.num_vectors != num_clients * q:
        raise CeremonyError(f"layout has {layout.num_vectors} vectors, expected {num_clients * q}")
    if len(rows) != layout.num_vectors:
        raise CeremonyError(f"{len(rows)} encrypted rows, expected {layout.num_vectors}")
    try:
        parsed = [EncryptedRow.deserialize(blob) for blob in rows]
    except CkksError as err:
        raise CeremonyError(f"encrypted rows refused: {err}") from None
    indexes = [row.index for row in parsed]
    if indexes != list(range(layout.num_vectors)):
        raise CeremonyError(
            f"encrypted rows are for vectors {indexes[:8]}..., expected "
            f"0..{layout.num_vectors - 1} in order"
        )
    try:
        gram = decrypt_inner_product_rows(secret_ctx, layout, parsed)
    except CkksError as err:
        raise CeremonyError(f"encrypted rows refused: {err}") from None
    n = num_clients
    return gram.reshape(n, q, n, q).permute(0, 2, 1, 3).contiguous()
