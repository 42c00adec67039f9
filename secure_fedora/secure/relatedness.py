"""Encrypted relatedness for FEDORA: subspace overlaps U_i^T U_j computed under CKKS.

The plaintext relatedness code computes ``overlaps = U_i^T U_j`` for every pair (exactly
rounded dot products, ``fedora.subspace_overlaps``) and
derives similarities from the singular values of each q x q block. This module holds the one
implementation of the protocol (on :mod:`privacy.ckks`) that both runtimes run: small step
functions over tensors and bytes, one per party and step, which know nothing of how their
bytes travel. The in-process runtime runs them through :func:`encrypted_overlaps` (below);
the Flower runtime calls the same steps in the processes of the parties
(``runtimes/flower/ceremony.py`` keeps the key holder's keys on its disk; ``server_app`` and
``client_app`` only move the steps' bytes in signed Flower messages).

Steps (``N`` clients, summaries ``U_i`` of ``d x q``; column ``r`` of client ``i`` is vector
``i * q + r`` of the packing layout, :func:`plan_layout`):

1. key ceremony. Key holder (a designated client): :func:`create_keys`, then
   :func:`public_keys` (public, relinearization and Galois keys, no secret key) for the
   server and :func:`seal_keys` (the secret context sealed to every client's X25519 key, the
   key holder's own included). Client: :func:`open_keys`. Server: :func:`open_server_context`
   refuses a context that holds a secret key or lacks the evaluation keys. Where an untrusted
   server forwards the sealed contexts (Flower), the key holder signs each
   (:func:`sign_sealed_keys`) and a client opens it with :func:`open_signed_keys`;
2. client: :func:`encrypt_summary`, its q columns as q serialized uploads;
3. server: :func:`parse_upload` checks each client's q uploads (vector indices, ciphertext
   counts); :func:`gram_rows` computes the encrypted Gram rows with the public context only,
   an encryption of zero standing in for every absent client (so the packing is unchanged),
   and names the clients whose ciphertexts it cannot use (:class:`InvalidUploadsError`);
4. key holder: :func:`decrypt_rows` checks that it received exactly the requested rows and
   decrypts them into inner products rounded to the 2^-16 grid
   (:func:`privacy.ckks.decrypt_inner_product_rows`); :func:`overlaps_from_rows` arranges
   rows into the (N, N, q, q) blocks (zero for excluded clients). The key holder releases
   these inner products and nothing else. Rows it refuses for their values
   (:class:`RowValuesError`: a client's corrupt ciphertexts spoil every row) are followed by
   :func:`isolated_rows` (server: each client's rows from its uploads alone) and
   :func:`blame_uploads` (key holder: :class:`CorruptUploadsError` naming the clients whose
   rows alone fail, or every client when none does).

What each party learns (honest-but-curious): the server sees ciphertexts only, then the
released overlaps; the key holder sees the overlaps (it holds the secret key, so it must be
given the computed rows only, never a client's upload); clients see nothing of each other.
Assumptions: every client holds the secret key (it is sealed to each of them), so no client
may ever receive another client's upload; an authentic ciphertext that encrypts a wrong
vector cannot be detected (the server cannot see its content) -- clients are trusted to
encrypt their own summary honestly.

In process (:func:`encrypted_overlaps`), every role is separated and every byte moved is
counted. With signed envelopes (``transport``, a
:class:`~secure_fedora.secure.transport.SecureTransport` acting as the server and every
client) the three message kinds -- each client's uploads (``enc_summary``), the server's
encrypted rows to the key holder (``enc_gram_rows``) and the key holder's released rows
(``gram_release``, float64) -- travel as signed envelopes for round 0 and are verified by
their receiver (unknown sender, bad signature, tampered payload, replay: rejected and logged
on ``secure_fedora.security``). A client whose upload is rejected, or authentic but
malformed (steps 3), is excluded: its overlaps are zero and ``result.excluded`` names it. A
rejected message to or from the key holder cannot be worked around and raises
:class:`SecureRelatednessError` naming the key holder. (The Flower runtime needs every
client and stops the run instead, naming the client.)
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from torch import Tensor

from privacy.ckks import (
    GRAM_SYMMETRY_TOLERANCE,
    CkksError,
    DecryptedValuesError,
    EncryptedRow,
    Encryption,
    InnerProductLayout,
    InnerProductUpload,
    check_inner_product_upload,
    context_from_bytes,
    context_parameters,
    context_to_bytes,
    create_secret_context,
    decrypt_inner_product_rows,
    encrypt_for_inner_products,
    inner_product_rows,
    open_secret_context,
    public_context,
    public_context_bytes,
    seal_secret_context,
)
from privacy.envelope import EnvelopeError
from privacy.errors import ToolkitError
from privacy.identity import SERVER_ID, Identity, PublicIdentity
from privacy.pipeline import EncryptPayload
from secure_fedora.secure.transport import (
    KIND_RELATEDNESS_RELEASE,
    KIND_RELATEDNESS_ROWS,
    KIND_RELATEDNESS_UPLOAD,
    Channel,
    ClientReleases,
    MalformedPayloadError,
    Rejection,
    SecureTransport,
    UnaccountedReleases,
    log_rejection,
)

__all__ = [
    "CkksCeremony",
    "CorruptUploadsError",
    "EncryptedOverlaps",
    "InvalidUploadsError",
    "RowValuesError",
    "SecureRelatednessError",
    "blame_uploads",
    "ceremony_summary",
    "check_sealed_signature",
    "create_keys",
    "decrypt_rows",
    "encrypt_summary",
    "encrypted_newcomer_overlaps",
    "encrypted_overlaps",
    "gram_rows",
    "isolated_rows",
    "open_keys",
    "open_server_context",
    "open_signed_keys",
    "overlaps_from_rows",
    "parse_upload",
    "plan_layout",
    "public_keys",
    "run_key_ceremony",
    "seal_keys",
    "sealed_context_statement",
    "sign_sealed_keys",
    "summary_encryption",
    "unpack_summary_upload",
]


class SecureRelatednessError(ToolkitError, ValueError):
    """Invalid summaries, key holder, ceremony, upload or rows for encrypted relatedness."""


class InvalidUploadsError(SecureRelatednessError):
    """The server cannot compute with some clients' ciphertexts; ``invalid`` maps each such
    client to the reason (a ciphertext that does not load, or sits at the wrong level or
    scale)."""

    def __init__(self, invalid: Mapping[int, str]) -> None:
        self.invalid = dict(sorted(invalid.items()))
        named = "; ".join(f"client {c}: {why}" for c, why in self.invalid.items())
        super().__init__(f"encrypted summary refused: {named}")


class RowValuesError(SecureRelatednessError):
    """The key holder decrypted the encrypted Gram rows to values no honest computation gives
    (beyond the inputs' limits, or not one Gram matrix's rows). Every client's ciphertexts went
    into every row (the server's sums mix them), so the values alone cannot say whose upload
    is at fault: :func:`isolated_rows` and :func:`blame_uploads` find out."""


class CorruptUploadsError(SecureRelatednessError):
    """Encrypted summaries that are authentic and well-formed but decrypt to values no honest
    upload gives. ``certain``: each client in ``clients`` is at fault (its uploads, with
    nothing of any other client's, decrypt to such values); otherwise ``clients`` are every
    client whose uploads went in, one or more of them at fault."""

    def __init__(self, clients: Sequence[int], certain: bool, detail: str) -> None:
        self.clients, self.certain, self.detail = sorted(clients), certain, detail
        named = ", ".join(str(c) for c in self.clients)
        if certain:
            who = f"client {named}'s" if len(self.clients) == 1 else f"clients {named}'s"
            super().__init__(
                f"{who} encrypted summary decrypts to values no honest upload gives, with no "
                f"other client's ciphertexts in the sums (authentic, but not an encryption of "
                f"a summary under the run's keys): {detail}; nothing is released")
        else:
            super().__init__(
                f"one or more of clients {named} sent an encrypted summary that decrypts to "
                f"values no honest upload gives ({detail}); each client's uploads alone "
                "decrypt to rows that pass, and the server's sums mix their ciphertexts, so "
                "which client cannot be told; nothing is released")


# --------------------------------------------------------------------------------------
# The protocol's steps (shared by both runtimes)
# --------------------------------------------------------------------------------------


def plan_layout(num_clients: int, q: int, dim: int) -> InnerProductLayout:
    """The packing layout: ``num_clients * q`` vectors of dimension ``dim`` (client ``i``'s
    column ``r`` is vector ``i * q + r``)."""
    for name, value in (("num_clients", num_clients), ("q", q), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SecureRelatednessError(f"{name} must be a positive integer, got {value!r}")
    try:
        return InnerProductLayout.plan(num_clients * q, dim)
    except CkksError as exc:
        raise SecureRelatednessError(f"no CKKS layout for {num_clients} x {q} vectors: {exc}") from None


def create_keys() -> ts.Context:
    """Key holder: a fresh secret CKKS context with relinearization and Galois keys."""
    return create_secret_context(galois_keys=True)


def public_keys(secret: ts.Context) -> bytes:
    """Key holder: the server's context (public, relinearization and Galois keys, no secret key)."""
    try:
        return public_context_bytes(secret, galois_keys=True, relin_keys=True)
    except CkksError as exc:
        raise SecureRelatednessError(f"the key holder cannot publish its public context: {exc}") from None


def seal_keys(
    secret: ts.Context, recipients: Mapping[str, X25519PublicKey], key_holder: str
) -> dict[str, bytes]:
    """Key holder: the secret context (secret and public key) sealed to every recipient's
    X25519 key, bound to its party id. ``key_holder`` (the key holder's own party id) must be
    a recipient: it needs its own sealed copy too."""
    if key_holder not in recipients:
        raise SecureRelatednessError(f"the key holder {key_holder} is not among the recipients")
    try:
        return seal_secret_context(secret, recipients)
    except CkksError as exc:
        raise SecureRelatednessError(f"the key holder cannot seal its secret context: {exc}") from None


def open_keys(blob: bytes, identity: Identity) -> ts.Context:
    """Client: open the secret context sealed to ``identity``; raises naming the party
    unless the blob is intact and sealed to it."""
    try:
        return open_secret_context(bytes(blob), identity.agreement_key, identity.party_id)
    except (CkksError, TypeError) as exc:
        raise SecureRelatednessError(f"{identity.party_id}: {exc}") from None


_SEALED_CONTEXT_DOMAIN = "secure-fedora/sealed-ckks-context/v1"


def sealed_context_statement(
    *,
    run_id: int,
    config_hash: str,
    key_holder: str,
    recipient: str,
    public_digest: str,
    blob: bytes,
) -> bytes:
    """The bytes the key holder signs for one sealed secret context: a domain tag, the run
    (id and config hash), the key holder's and the recipient's party ids, the SHA-256 (hex)
    of the public context the server is to compute with, and the SHA-256 of the sealed blob.
    Any two statements that differ in one of these differ as bytes (canonical JSON)."""
    return json.dumps(
        {
            "domain": _SEALED_CONTEXT_DOMAIN,
            "run-id": int(run_id),
            "config-hash": str(config_hash),
            "key-holder": str(key_holder),
            "recipient": str(recipient),
            "public-context-sha256": str(public_digest),
            "sealed-context-sha256": hashlib.sha256(bytes(blob)).hexdigest(),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def sign_sealed_keys(
    key_holder: Identity,
    sealed: Mapping[str, bytes],
    public_digest: str,
    *,
    run_id: int,
    config_hash: str,
) -> dict[str, bytes]:
    """Key holder: its Ed25519 signature of every recipient's sealed context
    (:func:`sealed_context_statement`), binding the blob to the run, the recipient and the
    public context ``public_digest`` (SHA-256 hex) it hands the server."""
    return {
        recipient: key_holder.sign(
            sealed_context_statement(
                run_id=run_id,
                config_hash=config_hash,
                key_holder=key_holder.party_id,
                recipient=recipient,
                public_digest=public_digest,
                blob=blob,
            )
        )
        for recipient, blob in sealed.items()
    }


def check_sealed_signature(
    blob: object,
    signature: object,
    public_digest: object,
    recipient: str,
    key_holder: PublicIdentity,
    *,
    run_id: int,
    config_hash: str,
) -> None:
    """Raise SecureRelatednessError naming the key holder unless ``signature`` is
    ``key_holder``'s signature of ``blob`` sealed for ``recipient`` in this run (id and
    config hash) beside the public context ``public_digest``."""
    ok = (
        isinstance(blob, bytes)
        and isinstance(signature, bytes)
        and isinstance(public_digest, str)
        and len(public_digest) == 64
        and key_holder.verify(
            signature,
            sealed_context_statement(
                run_id=run_id,
                config_hash=config_hash,
                key_holder=key_holder.party_id,
                recipient=recipient,
                public_digest=public_digest,
                blob=blob,
            ),
        )
    )
    if not ok:
        shown = public_digest[:12] if isinstance(public_digest, str) else repr(public_digest)
        raise SecureRelatednessError(
            f"the CKKS context offered to {recipient} is not signed by the key holder "
            f"{key_holder.party_id} for run {run_id}, {recipient} and public context {shown} "
            "(made, or sealed for another run, recipient or public context, by someone else): "
            "refused, nothing encrypted"
        )


def open_signed_keys(
    blob: object,
    signature: object,
    public_digest: object,
    identity: Identity,
    key_holder: PublicIdentity,
    *,
    run_id: int,
    config_hash: str,
) -> ts.Context:
    """Client: open the secret context sealed to ``identity`` only when the key holder signed
    it for this run, this recipient and the public context ``public_digest`` the server
    states (:func:`check_sealed_signature`, checked before the blob is opened); then as
    :func:`open_keys`. A context sealed by anyone else (the server) to this client's real
    X25519 key is refused naming the key holder."""
    check_sealed_signature(
        blob,
        signature,
        public_digest,
        identity.party_id,
        key_holder,
        run_id=run_id,
        config_hash=config_hash,
    )
    assert isinstance(blob, bytes)
    return open_keys(blob, identity)


def open_server_context(blob: bytes) -> ts.Context:
    """Server: parse the key holder's public context; refuse one that is not a CKKS context
    with the run's parameters, that holds a secret key (the server must never be able to
    decrypt) or that lacks the relinearization or Galois keys the inner products need."""
    try:
        ctx = context_from_bytes(bytes(blob), expect_secret_key=False)
    except (CkksError, TypeError) as exc:
        raise SecureRelatednessError(f"the key holder's public context is refused: {exc}") from None
    if not (ctx.has_galois_keys() and ctx.has_relin_keys()):
        raise SecureRelatednessError(
            "the key holder's public context lacks Galois or relinearization keys")
    return ctx


def encrypt_summary(
    ctx: ts.Context, layout: InnerProductLayout, client: int, summary: Tensor,
    encryption: Encryption = "symmetric",
) -> list[bytes]:
    """Client ``client``: its ``d x q`` summary as ``q`` serialized uploads, column ``r`` as
    vector ``client * q + r`` of ``layout`` (symmetric encryption with the secret context by
    default; ``"public"`` needs only the public key). Columns must have norm <= 256."""
    if not isinstance(summary, Tensor) or summary.dim() != 2 or summary.shape[0] != layout.dim \
            or summary.shape[1] < 1:
        shape = tuple(summary.shape) if isinstance(summary, Tensor) else type(summary).__name__
        raise SecureRelatednessError(
            f"client {client}: summary has shape {shape}, expected ({layout.dim}, q)")
    q = summary.shape[1]
    if (not isinstance(client, int) or isinstance(client, bool) or client < 0
            or (client + 1) * q > layout.num_vectors):
        raise SecureRelatednessError(
            f"client {client!r} with q = {q} has no place in a layout of {layout.num_vectors} vectors")
    u = summary.detach().to("cpu", torch.float64)
    try:
        return [encrypt_for_inner_products(ctx, layout, client * q + r, u[:, r],
                                           encryption=encryption).serialize()
                for r in range(q)]
    except CkksError as exc:
        raise SecureRelatednessError(f"client {client}: {exc}") from None


def parse_upload(
    layout: InnerProductLayout, client: int, q: int, columns: object
) -> list[InnerProductUpload]:
    """Server: client ``client``'s ``q`` uploads (a list of bytes), each for its own vector
    ``client * q + r`` and with the layout's ciphertext counts; raises naming the client
    otherwise. Whether the ciphertexts themselves load is checked by :func:`gram_rows`."""
    if not isinstance(columns, (list, tuple)):
        raise SecureRelatednessError(f"client {client} sent no list of encrypted columns")
    if len(columns) != q:
        raise SecureRelatednessError(
            f"client {client} sent {len(columns)} encrypted columns, expected {q}")
    uploads = []
    for r, blob in enumerate(columns):
        if not isinstance(blob, bytes):
            raise SecureRelatednessError(f"client {client}: encrypted column {r} is not bytes")
        try:
            upload = InnerProductUpload.deserialize(blob)
        except CkksError as exc:
            raise SecureRelatednessError(f"client {client}: encrypted column {r}: {exc}") from None
        if upload.index != client * q + r:
            raise SecureRelatednessError(
                f"client {client}: encrypted column {r} is for vector {upload.index}, "
                f"expected {client * q + r}")
        if len(upload.packed) != layout.packs or len(upload.broadcast) != layout.chunks:
            raise SecureRelatednessError(
                f"client {client}: encrypted column {r} has {len(upload.packed)} + "
                f"{len(upload.broadcast)} ciphertexts, the layout needs {layout.packs} + "
                f"{layout.chunks}")
        uploads.append(upload)
    return uploads


def gram_rows(
    server_ctx: ts.Context,
    layout: InnerProductLayout,
    num_clients: int,
    q: int,
    uploads: Mapping[int, Sequence[InnerProductUpload]],
    rows: Sequence[int] | None = None,
) -> tuple[list[bytes], list[int]]:
    """Server: the serialized encrypted Gram rows and the vectors they are for, computed with
    the public context only.

    ``uploads`` holds the parsed uploads of the present clients; an encryption of zero stands
    in for every other client (its overlaps come out zero). Rows are computed for the present
    clients' vectors (those of ``rows`` only, when given). Raises
    :class:`InvalidUploadsError` naming the clients whose ciphertexts are unusable, and
    :class:`SecureRelatednessError` for a context that holds a secret key or a failure no
    client's upload explains.
    """
    if server_ctx.has_secret_key():
        raise SecureRelatednessError("the server's context holds a secret key; refusing to compute")
    if not uploads:
        raise SecureRelatednessError("no client's encrypted summary to compute with")
    d = layout.dim
    everyone = [
        up
        for i in range(num_clients)
        for up in (uploads[i] if i in uploads else [
            encrypt_for_inner_products(server_ctx, layout, i * q + r,
                                       torch.zeros(d, dtype=torch.float64), encryption="public")
            for r in range(q)])
    ]
    if rows is None:
        wanted = [i * q + r for i in sorted(uploads) for r in range(q)]
    else:
        wanted = [v for v in rows if v // q in uploads]
    try:
        computed = inner_product_rows(server_ctx, layout, everyone, rows=wanted)
    except (CkksError, ValueError, RuntimeError) as exc:
        invalid = {}
        for i in sorted(uploads):
            try:
                for up in uploads[i]:
                    check_inner_product_upload(server_ctx, layout, up)
            except CkksError as why:
                invalid[i] = str(why)
        if invalid:
            raise InvalidUploadsError(invalid) from None
        raise SecureRelatednessError(f"server computation failed: {exc}") from exc
    return [row.serialize() for row in computed], wanted


def decrypt_rows(
    secret_ctx: ts.Context, layout: InnerProductLayout, rows: object, vectors: Sequence[int]
) -> Tensor:
    """Key holder: the ``(len(vectors), num_vectors)`` float64 inner products of the encrypted
    rows, rounded to the 2^-16 release grid. ``rows`` must be a list of serialized rows for
    exactly ``vectors``, in that order, each a final-level row ciphertext (a client's upload,
    or anything else, is refused)."""
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, bytes) for r in rows):
        raise SecureRelatednessError("the encrypted rows are not a list of bytes")
    if len(rows) != len(vectors):
        raise SecureRelatednessError(f"{len(rows)} encrypted rows, expected {len(vectors)}")
    try:
        parsed = [EncryptedRow.deserialize(blob) for blob in rows]
    except CkksError as exc:
        raise SecureRelatednessError(f"encrypted rows refused: {exc}") from None
    indexes = [row.index for row in parsed]
    if indexes != list(vectors):
        raise SecureRelatednessError(
            f"encrypted rows are for vectors {indexes[:8]}, not the requested {list(vectors)[:8]}")
    try:
        return decrypt_inner_product_rows(secret_ctx, layout, parsed)
    except DecryptedValuesError as exc:
        raise RowValuesError(f"encrypted rows refused: {exc}") from None
    except CkksError as exc:
        raise SecureRelatednessError(f"encrypted rows refused: {exc}") from None


def isolated_rows(
    server_ctx: ts.Context,
    layout: InnerProductLayout,
    num_clients: int,
    q: int,
    uploads: Mapping[int, Sequence[InnerProductUpload]],
) -> tuple[list[bytes], list[int]]:
    """Server, after the key holder refused the rows (:class:`RowValuesError`): for each
    client in ``uploads`` (in order), its ``q`` encrypted Gram rows computed from its own
    uploads alone (an encryption of zero standing in for every other client), and the
    vectors they are for. They decrypt to the client's own q x q block and zeros: what the
    key holder sees of it in the joint rows, nothing more."""
    rows: list[bytes] = []
    vectors: list[int] = []
    for i in sorted(uploads):
        got, wanted = gram_rows(server_ctx, layout, num_clients, q, {i: uploads[i]},
                                [i * q + r for r in range(q)])
        rows += got
        vectors += wanted
    return rows, vectors


def blame_uploads(
    secret_ctx: ts.Context, layout: InnerProductLayout, rows: object, vectors: Sequence[int],
    q: int, refused: str,
) -> CorruptUploadsError:
    """Key holder: the error naming whose uploads made the refused joint rows (``refused``,
    the :class:`RowValuesError`'s text) wrong, from :func:`isolated_rows`' ``rows`` for
    ``vectors``. A client is named when its own rows fail :func:`decrypt_rows`' checks or
    give another client's lanes anything but zero (within
    :data:`~privacy.ckks.GRAM_SYMMETRY_TOLERANCE`): only its ciphertexts went into them, so
    no other client can make it fail. When none fails alone, every client is named as one
    that may be at fault. Releases nothing: it returns an error."""
    if not isinstance(rows, (list, tuple)) or len(rows) != len(vectors):
        raise SecureRelatednessError("the isolated encrypted rows are not one per vector")
    clients = sorted({v // q for v in vectors})
    if [v for c in clients for v in range(c * q, (c + 1) * q)] != list(vectors):
        raise SecureRelatednessError(
            f"isolated encrypted rows are for vectors {list(vectors)[:8]}, not every row of "
            "each client in turn")
    faults: dict[int, str] = {}
    for k, c in enumerate(clients):
        mine = list(range(c * q, (c + 1) * q))
        try:
            values = decrypt_rows(secret_ctx, layout, list(rows[k * q:(k + 1) * q]), mine)
        except RowValuesError as err:
            faults[c] = str(err)
            continue
        others = torch.ones(layout.num_vectors, dtype=torch.bool)
        others[mine] = False
        peak = float(values[:, others].abs().max()) if bool(others.any()) else 0.0
        if peak > GRAM_SYMMETRY_TOLERANCE:
            faults[c] = (f"its rows alone give |x| = {peak:.4g} in other clients' lanes, where "
                         "zeros stand in")
    if faults:
        detail = "; ".join(f"client {c}: {why}" for c, why in faults.items())
        return CorruptUploadsError(list(faults), True, f"{detail} (with every client: {refused})")
    return CorruptUploadsError(clients, False, refused)


def overlaps_from_rows(
    gram: Tensor, vectors: Sequence[int], num_clients: int, q: int, excluded: Sequence[int] = ()
) -> Tensor:
    """The (N, N, q, q) float64 overlap blocks from decrypted rows ``gram`` (row ``k`` is
    vector ``vectors[k]``); rows not computed and the rows and columns of ``excluded``
    clients are zero."""
    nq = num_clients * q
    if tuple(gram.shape) != (len(vectors), nq):
        raise SecureRelatednessError(
            f"decrypted rows have shape {tuple(gram.shape)}, expected ({len(vectors)}, {nq}) "
            f"for {num_clients} clients with q = {q}")
    if not torch.isfinite(gram).all():
        raise SecureRelatednessError("decrypted rows hold NaN or infinite values")
    full = torch.zeros(nq, nq, dtype=torch.float64)
    full[list(vectors)] = gram.to(torch.float64)
    gone = [i * q + r for i in excluded for r in range(q)]
    full[gone] = 0.0
    full[:, gone] = 0.0  # an encryption of zero decrypts to CKKS noise: release exact zeros
    # full[a, b] with a = i*q + r, b = j*q + s  ->  overlaps[i, j, r, s]
    return full.reshape(num_clients, q, num_clients, q).permute(0, 2, 1, 3).contiguous()


# --------------------------------------------------------------------------------------
# In-process runtime: the steps with every role separated
# --------------------------------------------------------------------------------------


@dataclass
class CkksCeremony:
    """Result of the key ceremony, reusable across relatedness computations.

    ``client_context`` is the secret context every client opened from its sealed blob (all
    blobs carry the same keys; one parsed copy serves all in-process clients).
    ``server_context`` is parsed from the bytes the server receives and holds no secret key.
    """

    num_clients: int
    key_holder: int
    key_holder_context: ts.Context
    client_context: ts.Context
    client_public_context: ts.Context
    server_context: ts.Context
    server_context_bytes: int
    sealed_context_bytes: list[int]
    seconds: float


def run_key_ceremony(
    num_clients: int,
    key_holder: int = 0,
    *,
    identities: Sequence[Identity] | None = None,
) -> CkksCeremony:
    """Key holder creates CKKS keys, seals the secret context to each client, publishes the public one.

    ``identities`` (one per client, in client order) supply the X25519 keys to seal to; when
    omitted, fresh in-memory identities are generated (simulation only). Every client's blob
    is opened with its own private key and checked to carry the key holder's bundle.
    """
    if not isinstance(num_clients, int) or num_clients < 1:
        raise SecureRelatednessError(f"num_clients must be a positive integer, got {num_clients!r}")
    _check_key_holder(key_holder, num_clients)
    if identities is None:
        identities = [Identity.generate(f"client-{i:03d}") for i in range(num_clients)]
    if len(identities) != num_clients:
        raise SecureRelatednessError(f"{len(identities)} identities for {num_clients} clients")
    start = time.perf_counter()
    recipients = {ident.party_id: ident.agreement_key.public_key() for ident in identities}
    if len(recipients) != num_clients:
        raise SecureRelatednessError("client identities must have distinct party ids")
    secret = create_keys()
    sealed = seal_keys(secret, recipients, identities[key_holder].party_id)
    bundle_digest = hashlib.sha256(context_to_bytes(secret, include_secret_key=True)).digest()
    opened = [open_keys(sealed[ident.party_id], ident) for ident in identities]
    for ident, ctx in zip(identities, opened, strict=True):
        if hashlib.sha256(context_to_bytes(ctx, include_secret_key=True)).digest() != bundle_digest:
            raise SecureRelatednessError(f"client {ident.party_id} opened a different CKKS context")
    server_bytes = public_keys(secret)
    return CkksCeremony(
        num_clients=num_clients,
        key_holder=key_holder,
        key_holder_context=secret,
        client_context=opened[0],
        client_public_context=public_context(opened[0], galois_keys=False, relin_keys=False),
        server_context=open_server_context(server_bytes),
        server_context_bytes=len(server_bytes),
        sealed_context_bytes=[len(sealed[ident.party_id]) for ident in identities],
        seconds=time.perf_counter() - start,
    )


@dataclass
class EncryptedOverlaps:
    """Overlap blocks computed under encryption, with the traffic and time each role spent.

    ``overlaps`` is (N, N, q, q) for :func:`encrypted_overlaps` and (N, q, q) for
    :func:`encrypted_newcomer_overlaps`. ``client_bytes_sent[i]`` counts client i's
    serialized uploads; ``server_bytes_received`` all uploads; ``key_holder_bytes_received``
    the encrypted rows the server sends to the key holder; ``released_bytes`` the float64
    rows the key holder returns to the server. Context distribution is one-off and is
    reported by the :class:`CkksCeremony`. ``timings`` holds wall seconds (``<phase>_s``)
    and process CPU seconds (``<phase>_cpu_s``) for the phases ``clients_encrypt`` (all
    clients, one after another), ``server_compute``, ``key_holder_decrypt`` and ``total``.
    With envelopes the byte counts are those of the signed messages, ``accepted`` lists the
    clients whose uploads the server used and ``rejections`` the dropped uploads; the
    overlaps of an excluded client (a client not in ``accepted``) are zero.
    ``ckks_parameters`` are those of the server's context the rows were computed with
    (:func:`privacy.ckks.context_parameters`).
    """

    overlaps: Tensor
    layout: InnerProductLayout
    client_bytes_sent: list[int]
    server_bytes_received: int
    key_holder_bytes_received: int
    released_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    ckks_parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def excluded(self) -> list[int]:
        """Clients whose uploads were rejected (excluded from relatedness)."""
        n = len(self.client_bytes_sent)
        return [i for i in range(n) if i not in set(self.accepted)]


class PhaseClock:
    """Wall-clock and process CPU seconds per protocol phase (CPU time is robust to machine load)."""

    def __init__(self) -> None:
        self.start_wall = self.wall = time.perf_counter()
        self.start_cpu = self.cpu = time.process_time()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Record the wall and CPU seconds since the last lap under ``<name>_s`` and
        ``<name>_cpu_s``."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.timings[f"{name}_s"] = wall - self.wall
        self.timings[f"{name}_cpu_s"] = cpu - self.cpu
        self.wall, self.cpu = wall, cpu

    def finish(self) -> dict[str, float]:
        """The timings, with ``total_s`` and ``total_cpu_s`` up to the last lap."""
        self.timings["total_s"] = self.wall - self.start_wall
        self.timings["total_cpu_s"] = self.cpu - self.start_cpu
        return self.timings


def _check_key_holder(key_holder: int, num_clients: int) -> None:
    if not isinstance(key_holder, int) or isinstance(key_holder, bool) or not 0 <= key_holder < num_clients:
        raise SecureRelatednessError(f"key_holder must be a client index in [0, {num_clients}), got {key_holder!r}")


def _check_summaries(summaries: Tensor, name: str = "summaries") -> Tensor:
    if not isinstance(summaries, Tensor):
        raise SecureRelatednessError(f"{name} must be a tensor, got {type(summaries).__name__}")
    if summaries.dim() != 3 or min(summaries.shape) < 1:
        raise SecureRelatednessError(f"{name} must be (N, d, q) with N, d, q >= 1; got {tuple(summaries.shape)}")
    if summaries.is_complex():
        raise SecureRelatednessError(f"{name} must be real")
    if not torch.isfinite(summaries).all():
        raise SecureRelatednessError(f"{name} contain NaN or infinite values")
    return summaries.detach().to("cpu", torch.float64)


def _ceremony_for(ceremony: CkksCeremony | None, num_clients: int, key_holder: int) -> CkksCeremony:
    if ceremony is None:
        return run_key_ceremony(num_clients, key_holder)
    if ceremony.num_clients != num_clients:
        raise SecureRelatednessError(
            f"ceremony was run for {ceremony.num_clients} clients, the computation has {num_clients}"
        )
    if ceremony.key_holder != key_holder:
        raise SecureRelatednessError(
            f"ceremony key holder is client {ceremony.key_holder}, not client {key_holder}"
        )
    return ceremony


def _check_transport(transport: SecureTransport, n: int) -> None:
    if not isinstance(transport, SecureTransport):
        raise SecureRelatednessError(
            f"transport must be a SecureTransport, got {type(transport).__name__}")
    if transport.num_clients != n:
        raise SecureRelatednessError(
            f"transport is for {transport.num_clients} clients, the summaries are for {n}")
    missing = [p for p in (SERVER_ID, *transport.client_ids) if p not in transport.identities]
    if missing:
        raise SecureRelatednessError(
            "the in-process protocol needs a transport acting as the server and every client; "
            f"it lacks the keys of {missing[:3]}{' ...' if len(missing) > 3 else ''}")


_PARTS_MAGIC = b"SFPK"


def _pack_parts(parts: Sequence[bytes]) -> bytes:
    """Length-prefixed concatenation: magic, u32 count, then (u32 length, bytes) per part."""
    out = [_PARTS_MAGIC, struct.pack(">I", len(parts))]
    for part in parts:
        out.append(struct.pack(">I", len(part)))
        out.append(bytes(part))
    return b"".join(out)


def _unpack_parts(data: bytes) -> list[bytes]:
    """Inverse of :func:`_pack_parts`; raises ValueError for anything else (the count of
    parts is checked by the step that reads them)."""
    data = bytes(data)
    if len(data) < 8 or not data.startswith(_PARTS_MAGIC):
        raise ValueError("not a packed list of ciphertexts (bad magic or too short)")
    (count,) = struct.unpack(">I", data[4:8])
    parts, offset = [], 8
    for k in range(count):
        if len(data) < offset + 4:
            raise ValueError(f"truncated before part {k}")
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        offset += 4
        if len(data) < offset + length:
            raise ValueError(f"truncated inside part {k}")
        parts.append(data[offset:offset + length])
        offset += length
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes")
    return parts


def summary_encryption(ctx: ts.Context, layout: InnerProductLayout, client: int,
                       encryption: Encryption = "symmetric") -> EncryptPayload:
    """Client ``client``'s encryption stage (:class:`privacy.pipeline.EncryptPayload`): its
    summary -> :func:`encrypt_summary`'s ``q`` ciphertexts, packed as one upload (the bytes
    the client's pipeline then signs and sends; :func:`unpack_summary_upload` reads them)."""

    def encrypt(summary: Tensor) -> bytes:
        return _pack_parts(encrypt_summary(ctx, layout, client, summary, encryption))

    return EncryptPayload(encrypt, f"ckks-{encryption}")


def unpack_summary_upload(data: bytes) -> list[bytes]:
    """The ``q`` ciphertexts of a packed summary upload (ValueError if it is not one)."""
    return _unpack_parts(data)


class _DirectLink:
    """The parties' bytes handed over as they are (no envelopes): nothing can be rejected, so
    an unusable upload is a bug and raises. Each client's upload is still released through
    its pipeline (``releases``): the encryption stage, with no signature."""

    def __init__(self, key_holder: int, releases: ClientReleases | None = None) -> None:
        self.key_holder = key_holder
        self.releases = releases if releases is not None else UnaccountedReleases()
        self.rejections: list[Rejection] = []
        self.client_bytes_sent: list[int] = []
        self.server_bytes_received = self.key_holder_bytes_received = self.released_bytes = 0

    def uploads(self, summaries: Tensor, encrypters: Sequence[EncryptPayload]) -> dict[int, object]:
        columns = {}
        for i, encrypt in enumerate(encrypters):
            released = self.releases.release_upload(i, 0, KIND_RELATEDNESS_UPLOAD, summaries[i],
                                                    encrypt=encrypt)
            assert isinstance(released.payload, bytes)
            columns[i] = _unpack_parts(released.payload)
        self.client_bytes_sent = [sum(len(c) for c in columns[i]) for i in sorted(columns)]
        self.server_bytes_received = sum(self.client_bytes_sent)
        return dict(columns)

    def reject_upload(self, client: int, why: str) -> None:
        raise SecureRelatednessError(f"client {client}'s encrypted summary is unusable: {why}")

    def to_key_holder(self, rows: list[bytes], decrypt: Callable[[object], Tensor]) -> Tensor:
        self.key_holder_bytes_received = sum(len(r) for r in rows)
        return self._at_key_holder(decrypt, rows)

    def _at_key_holder(self, decrypt: Callable[[object], Tensor], rows: object) -> Tensor:
        try:
            return decrypt(rows)
        except SecureRelatednessError as err:
            raise SecureRelatednessError(f"key holder client {self.key_holder}: {err}") from err

    def release(self, gram: Tensor) -> Tensor:
        self.released_bytes = gram.numel() * 8
        return gram


class _EnvelopedLink(_DirectLink):
    """Every message a signed envelope for round 0, seen by ``channel`` on its way; a
    rejected or malformed upload excludes its client, anything rejected to or from the key
    holder raises."""

    def __init__(self, key_holder: int, transport: SecureTransport, channel: Channel | None) -> None:
        super().__init__(key_holder)
        self.transport = transport
        self.channel = channel

    def _deliver(self, kind: str, client: int, message: bytes) -> bytes:
        return self.channel(kind, 0, client, message) if self.channel is not None else message

    def uploads(self, summaries: Tensor, encrypters: Sequence[EncryptPayload]) -> dict[int, object]:
        tr = self.transport
        # each client's pipeline encrypts (EncryptPayload) then signs (SignEnvelope) its summary
        sent = {i: tr.client_release(0, i, KIND_RELATEDNESS_UPLOAD, summaries[i], encrypt=encrypt)
                for i, encrypt in enumerate(encrypters)}
        delivered = {i: self._deliver(KIND_RELATEDNESS_UPLOAD, i, m) for i, m in sent.items()}
        self.client_bytes_sent = [len(sent[i]) for i in range(len(encrypters))]
        self.server_bytes_received = sum(len(m) for m in delivered.values())

        def unpack(i: int, payload: bytes) -> object:
            try:
                return _unpack_parts(payload)
            except ValueError as exc:
                raise self._malformed_upload(i, str(exc)) from None

        received, self.rejections = tr.server_receive_bytes(0, delivered, KIND_RELATEDNESS_UPLOAD,
                                                            parse=unpack)
        return dict(sorted(received.items()))

    def _malformed_upload(self, client: int, why: str) -> EnvelopeError:
        return log_rejection(MalformedPayloadError(
            f"encrypted summary upload: {why}", sender=self.transport.client_id(client), round=0,
            kind=KIND_RELATEDNESS_UPLOAD, recipient=SERVER_ID))

    def reject_upload(self, client: int, why: str) -> None:
        self.rejections.append(Rejection.from_error(client, 0, self._malformed_upload(client, why),
                                                    "upload"))

    def to_key_holder(self, rows: list[bytes], decrypt: Callable[[object], Tensor]) -> Tensor:
        kh, tr = self.key_holder, self.transport
        message = self._deliver(KIND_RELATEDNESS_ROWS, kh, tr.server_send_bytes(
            0, kh, _pack_parts(rows), KIND_RELATEDNESS_ROWS))
        self.key_holder_bytes_received = len(message)
        try:
            payload = tr.client_receive_bytes(0, kh, message, KIND_RELATEDNESS_ROWS)
        except EnvelopeError as err:
            raise SecureRelatednessError(
                f"key holder client {kh} rejected the server's encrypted rows ({err.reason}): "
                f"{err}; relatedness cannot be computed without them") from err
        try:
            parts: object = _unpack_parts(payload)
        except ValueError as exc:
            raise SecureRelatednessError(
                f"key holder client {kh} cannot parse the server's encrypted rows: {exc}") from exc
        return self._at_key_holder(decrypt, parts)

    def release(self, gram: Tensor) -> Tensor:
        kh, tr = self.key_holder, self.transport
        message = self._deliver(KIND_RELATEDNESS_RELEASE, kh, tr.client_upload(
            0, kh, gram, kind=KIND_RELATEDNESS_RELEASE, dtype=torch.float64))
        self.released_bytes = len(message)
        released, rejections = tr.server_receive(
            0, {kh: message}, tuple(gram.shape), kind=KIND_RELATEDNESS_RELEASE, dtype=torch.float64)
        if rejections:
            r = rejections[0]
            raise SecureRelatednessError(
                f"the server rejected key holder client {kh}'s release of the q x q blocks "
                f"({r.reason}: {r.detail}); relatedness cannot be computed without it")
        return released[kh]


def _run(
    summaries: Tensor,
    key_holder: int,
    ceremony: CkksCeremony | None,
    client_encryption: Encryption,
    rows: Sequence[int] | None,
    transport: SecureTransport | None = None,
    channel: Channel | None = None,
    releases: ClientReleases | None = None,
) -> tuple[Tensor, EncryptedOverlaps, list[int]]:
    """The protocol's steps in process. Returns the released rows, the result record
    (``overlaps`` left empty) and the vectors whose rows were computed."""
    n, d, q = summaries.shape
    _check_key_holder(key_holder, n)
    if transport is not None:
        _check_transport(transport, n)
        if ceremony is None:
            ceremony = run_key_ceremony(
                n, key_holder, identities=[transport.identities[c] for c in transport.client_ids])
    elif channel is not None:
        raise SecureRelatednessError("a channel needs a transport (signed envelopes)")
    cer = _ceremony_for(ceremony, n, key_holder)
    layout = plan_layout(n, q, d)
    if client_encryption not in ("symmetric", "public"):
        raise SecureRelatednessError(
            f"client_encryption must be 'symmetric' or 'public', got {client_encryption!r}")
    client_ctx = cer.client_context if client_encryption == "symmetric" else cer.client_public_context
    link = _DirectLink(key_holder, releases) if transport is None else \
        _EnvelopedLink(key_holder, transport, channel)
    clock = PhaseClock()

    encrypters = [summary_encryption(client_ctx, layout, i, client_encryption) for i in range(n)]
    received = link.uploads(summaries, encrypters)  # through each client's release pipeline
    clock.lap("clients_encrypt")

    uploads: dict[int, list[InnerProductUpload]] = {}
    for i, parts in received.items():
        try:
            uploads[i] = parse_upload(layout, i, q, parts)
        except SecureRelatednessError as err:
            link.reject_upload(i, str(err))
    while True:
        if not uploads:
            named = ", ".join(f"client {r.client} ({r.reason})" for r in link.rejections)
            raise SecureRelatednessError(f"no encrypted summary upload was accepted: {named}")
        try:
            enc_rows, wanted = gram_rows(cer.server_context, layout, n, q, uploads, rows)
            break
        except InvalidUploadsError as err:
            for i, why in err.invalid.items():
                link.reject_upload(i, why)
                del uploads[i]
    clock.lap("server_compute")

    try:
        gram = link.to_key_holder(
            enc_rows, lambda received: decrypt_rows(cer.key_holder_context, layout, received, wanted))
    except SecureRelatednessError as err:
        if not isinstance(err.__cause__, RowValuesError):
            raise
        # whose upload: each client's rows computed alone and checked by the key holder (in
        # one process, handed over directly: a refusal, not a protocol message)
        alone, vectors = isolated_rows(cer.server_context, layout, n, q, uploads)
        raise blame_uploads(cer.key_holder_context, layout, alone, vectors, q,
                            str(err.__cause__)) from None
    gram = link.release(gram)
    clock.lap("key_holder_decrypt")
    result = EncryptedOverlaps(
        overlaps=torch.empty(0),
        layout=layout,
        client_bytes_sent=link.client_bytes_sent,
        server_bytes_received=link.server_bytes_received,
        key_holder_bytes_received=link.key_holder_bytes_received,
        released_bytes=link.released_bytes,
        timings=clock.finish(),
        accepted=sorted(uploads),
        rejections=sorted(link.rejections, key=lambda r: r.client),
        ckks_parameters=context_parameters(cer.server_context),
    )
    return gram, result, wanted


def encrypted_overlaps(
    summaries: Tensor,
    key_holder: int = 0,
    *,
    ceremony: CkksCeremony | None = None,
    client_encryption: Encryption = "symmetric",
    transport: SecureTransport | None = None,
    channel: Channel | None = None,
    releases: ClientReleases | None = None,
) -> EncryptedOverlaps:
    """All overlap blocks U_i^T U_j (an (N, N, q, q) float64 tensor) computed under CKKS.

    Equal to ``torch.einsum("idq,jdr->ijqr", U, U)`` within about 1e-5 (CKKS noise plus the
    2^-16 release rounding). ``client_encryption="symmetric"`` has clients encrypt with the
    secret context they received (faster, half the bytes); ``"public"`` with the public key
    only. Pass a ``ceremony`` from :func:`run_key_ceremony` to reuse keys across calls.
    Summaries must have column norms <= 256 (orthonormal summaries have norm 1).

    With ``transport`` every protocol message is a signed envelope for round 0 (the ceremony,
    if not given, seals the keys to the transport's client identities); ``channel(kind,
    round, client, message)`` sees every message on its way (fault injection). Clients whose
    upload is rejected are left out (``result.accepted`` / ``result.excluded``; their
    overlaps are zero); a rejected message to or from the key holder raises
    :class:`SecureRelatednessError`.

    Each client's upload is released through its pipeline: an
    :class:`~privacy.pipeline.EncryptPayload` stage (:func:`summary_encryption`), then, with
    ``transport``, the signature (``transport.releases``, e.g. the run's privacy state, whose
    summary pipeline the encrypted upload continues); without one, through ``releases``
    (default: the unaccounted path, encryption only).
    """
    u = _check_summaries(summaries)
    n, _, q = u.shape
    gram, result, computed = _run(u, key_holder, ceremony, client_encryption, None,
                                  transport, channel, releases)
    result.overlaps = overlaps_from_rows(gram, computed, n, q, excluded=result.excluded)
    return result


def encrypted_newcomer_overlaps(
    summaries: Tensor,
    new_summary: Tensor,
    key_holder: int = 0,
    *,
    ceremony: CkksCeremony | None = None,
    client_encryption: Encryption = "symmetric",
) -> EncryptedOverlaps:
    """Overlaps U_new^T U_j (an (N, q, q) tensor) of a newly joining client with the N others.

    Matches ``torch.einsum("dq,jdr->jqr", new, U)``. All N + 1 clients upload (the packing
    depends on the number of vectors) but the server computes, and the key holder decrypts,
    only the newcomer's q rows. The ceremony, if given, must cover N + 1 clients.
    """
    u = _check_summaries(summaries)
    new = new_summary
    if isinstance(new, Tensor) and new.dim() == 2:
        new = new.unsqueeze(0)
    new = _check_summaries(new, "new_summary")
    if new.shape[0] != 1 or new.shape[1:] != u.shape[1:]:
        raise SecureRelatednessError(
            f"new_summary must be (d, q) = {tuple(u.shape[1:])}, got {tuple(new_summary.shape)}"
        )
    n, _, q = u.shape
    everyone = torch.cat([u, new], dim=0)
    rows = [n * q + r for r in range(q)]
    gram, result, _ = _run(everyone, key_holder, ceremony, client_encryption, rows)
    # gram[r, j*q + s] -> overlaps[j, r, s] for the n existing clients
    result.overlaps = gram[:, : n * q].reshape(q, n, q).permute(1, 0, 2).contiguous()
    return result


def ceremony_summary(ceremony: CkksCeremony) -> Mapping[str, float]:
    """One-off ceremony traffic: public context bytes to the server, sealed context bytes per client."""
    return {
        "server_context_bytes": float(ceremony.server_context_bytes),
        "sealed_context_bytes_per_client": float(
            sum(ceremony.sealed_context_bytes) / max(len(ceremony.sealed_context_bytes), 1)
        ),
        "ceremony_seconds": ceremony.seconds,
    }
