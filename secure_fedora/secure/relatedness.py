"""Encrypted relatedness for FEDORA: subspace overlaps U_i^T U_j computed under CKKS.

The plaintext relatedness code computes ``overlaps = einsum("idq,jdr->ijqr", U, U)`` and
derives similarities from the singular values of each q x q block. This adapter returns
the same (N, N, q, q) tensor, computed by the protocol of :mod:`privacy.ckks`, run
in-process with every role separated:

1. key ceremony (:func:`run_key_ceremony`): the key holder (a designated client) creates
   the CKKS keys, seals the secret context to every client's X25519 key and hands the
   server a public context with rotation and relinearization keys only;
2. each client encrypts the q columns of its summary U_i (d x q) -- column r of client i is
   vector i * q + r of the layout -- and sends the serialized upload;
3. the server, holding only the public context, computes the encrypted Gram rows;
4. the key holder decrypts the rows and releases the q x q blocks (rounded, see
   :func:`privacy.ckks.decrypt_inner_product_rows`).

What each party learns (honest-but-curious): the server sees ciphertexts only, then the
released overlaps; the key holder sees the overlaps (it also holds the secret key, so it
must not be given any client's ciphertexts other than the rows); clients see nothing of
each other. Every byte moved between parties is counted in the result.

Signed envelopes (``transport``, a :class:`~secure_fedora.secure.transport.SecureTransport` acting
as the server and every client): all three message kinds of the protocol -- each client's
uploads (``enc_summary``, one envelope per client holding its q uploads), the server's
encrypted rows to the key holder (``enc_gram_rows``) and the key holder's released blocks
(``gram_release``, float64) -- travel as signed envelopes for round 0 and are verified by
their receiver (unknown sender, bad signature, tampered payload, replay: rejected and
logged on ``secure_fedora.security``). An upload that is rejected, or that is authentic but
malformed (its container or a ciphertext does not parse, carries the wrong vector indices or
counts, or fails the server's level/scale checks) excludes that client: the server uses a
public-key encryption of zero vectors in its place (so the packing is unchanged), computes
only the accepted clients' rows and reports the excluded clients; the returned overlaps are
zero in their rows and columns. A rejected message to or from the key holder cannot be
worked around and raises :class:`SecureRelatednessError` naming the key holder. Byte counts
then include the envelopes. What this does not check: an authentic ciphertext that encrypts
a wrong vector (the server cannot see its content) -- clients are trusted to encrypt their
own summary honestly.

Assumption: clients hold the secret key (the design seals it to each of them), so a
client must never receive another client's upload; in this in-process run nothing does.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import tenseal as ts
import torch
from torch import Tensor

from privacy.ckks import (
    CkksError,
    EncryptedRow,
    Encryption,
    InnerProductLayout,
    InnerProductUpload,
    context_from_bytes,
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
from privacy.identity import SERVER_ID, Identity
from secure_fedora.secure.transport import (
    KIND_RELATEDNESS_RELEASE,
    KIND_RELATEDNESS_ROWS,
    KIND_RELATEDNESS_UPLOAD,
    Channel,
    MalformedPayloadError,
    Rejection,
    SecureTransport,
    log_rejection,
)

__all__ = [
    "CkksCeremony",
    "EncryptedOverlaps",
    "SecureRelatednessError",
    "ceremony_summary",
    "encrypted_newcomer_overlaps",
    "encrypted_overlaps",
    "run_key_ceremony",
]


class SecureRelatednessError(ToolkitError, ValueError):
    """Invalid summaries, key holder or ceremony for encrypted relatedness."""


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
    secret = create_secret_context(galois_keys=True)
    recipients = {ident.party_id: ident.agreement_key.public_key() for ident in identities}
    if len(recipients) != num_clients:
        raise SecureRelatednessError("client identities must have distinct party ids")
    sealed = seal_secret_context(secret, recipients)
    bundle_digest = hashlib.sha256(context_to_bytes(secret, include_secret_key=True)).digest()
    client_context: ts.Context | None = None
    for ident in identities:
        ctx = open_secret_context(sealed[ident.party_id], ident.agreement_key, ident.party_id)
        digest = hashlib.sha256(context_to_bytes(ctx, include_secret_key=True)).digest()
        if digest != bundle_digest:
            raise SecureRelatednessError(f"client {ident.party_id} opened a different CKKS context")
        if client_context is None:
            client_context = ctx
    assert client_context is not None
    server_bytes = public_context_bytes(secret, galois_keys=True)
    server = context_from_bytes(server_bytes, expect_secret_key=False)
    return CkksCeremony(
        num_clients=num_clients,
        key_holder=key_holder,
        key_holder_context=secret,
        client_context=client_context,
        client_public_context=public_context(client_context, galois_keys=False, relin_keys=False),
        server_context=server,
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
    overlaps the key holder returns to the server. Context distribution is one-off and is
    reported by the :class:`CkksCeremony`. ``timings`` holds wall seconds (``<phase>_s``)
    and process CPU seconds (``<phase>_cpu_s``) for the phases ``clients_encrypt`` (all
    clients, one after another), ``server_compute``, ``key_holder_decrypt`` and ``total``.
    With envelopes the byte counts are those of the signed messages, ``accepted`` lists the
    clients whose uploads the server used and ``rejections`` the dropped uploads; the
    overlaps of an excluded client (a client not in ``accepted``) are zero.
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

    @property
    def excluded(self) -> list[int]:
        """Clients whose uploads were rejected (excluded from relatedness)."""
        n = len(self.client_bytes_sent)
        return [i for i in range(n) if i not in set(self.accepted)]


class _PhaseClock:
    """Wall-clock and process CPU seconds per protocol phase (CPU time is robust to machine load)."""

    def __init__(self) -> None:
        self.start_wall = self.wall = time.perf_counter()
        self.start_cpu = self.cpu = time.process_time()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.timings[f"{name}_s"] = wall - self.wall
        self.timings[f"{name}_cpu_s"] = cpu - self.cpu
        self.wall, self.cpu = wall, cpu

    def finish(self) -> dict[str, float]:
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


def _run(
    summaries: Tensor,
    key_holder: int,
    ceremony: CkksCeremony | None,
    client_encryption: Encryption,
    rows: Sequence[int] | None,
    transport: SecureTransport | None = None,
    channel: Channel | None = None,
) -> tuple[Tensor, EncryptedOverlaps, list[int]]:
    """Released Gram rows (one per computed vector), the result record, and the vectors
    whose rows were computed."""
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
    try:
        layout = InnerProductLayout.plan(n * q, d)
    except CkksError as exc:
        raise SecureRelatednessError(str(exc)) from exc
    if client_encryption == "public":
        client_ctx = cer.client_public_context
    elif client_encryption == "symmetric":
        client_ctx = cer.client_context
    else:
        raise SecureRelatednessError(
            f"client_encryption must be 'symmetric' or 'public', got {client_encryption!r}"
        )
    clock = _PhaseClock()

    # Clients: encrypt and serialize their columns.
    wire: list[list[bytes]] = []
    for i in range(n):
        msgs = []
        for r in range(q):
            try:
                up = encrypt_for_inner_products(
                    client_ctx, layout, i * q + r, summaries[i, :, r], encryption=client_encryption
                )
            except CkksError as exc:
                raise SecureRelatednessError(f"client {i}: {exc}") from exc
            msgs.append(up.serialize())
        wire.append(msgs)
    clock.lap("clients_encrypt")
    if transport is not None:
        return _run_enveloped(cer, layout, (n, d, q), wire, rows, transport, channel, clock)

    # Server: public context only.
    uploads = [InnerProductUpload.deserialize(m) for msgs in wire for m in msgs]
    enc_rows = inner_product_rows(cer.server_context, layout, uploads, rows=rows)
    row_wire = [row.serialize() for row in enc_rows]
    clock.lap("server_compute")

    # Key holder: decrypt the rows, release the inner products.
    received = [EncryptedRow.deserialize(b) for b in row_wire]
    gram = decrypt_inner_product_rows(cer.key_holder_context, layout, received)
    clock.lap("key_holder_decrypt")
    timings = clock.finish()

    client_bytes = [sum(len(m) for m in msgs) for msgs in wire]
    result = EncryptedOverlaps(
        overlaps=torch.empty(0),
        layout=layout,
        client_bytes_sent=client_bytes,
        server_bytes_received=sum(client_bytes),
        key_holder_bytes_received=sum(len(b) for b in row_wire),
        released_bytes=gram.numel() * 8,
        timings=timings,
        accepted=list(range(n)),
    )
    return gram, result, list(range(n * q)) if rows is None else list(rows)


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


def _unpack_parts(data: bytes, expected: int) -> list[bytes]:
    """Inverse of :func:`_pack_parts`; raises ValueError unless it holds ``expected`` parts exactly."""
    data = bytes(data)
    if len(data) < 8 or not data.startswith(_PARTS_MAGIC):
        raise ValueError("not a packed list of ciphertexts (bad magic or too short)")
    (count,) = struct.unpack(">I", data[4:8])
    if count != expected:
        raise ValueError(f"holds {count} parts, expected {expected}")
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


def _parse_uploads(data: bytes, client: int, q: int, layout: InnerProductLayout) -> list[InnerProductUpload]:
    """Client ``client``'s q uploads for vectors ``client * q + r``, with the layout's counts;
    raises (and logs) :class:`MalformedPayloadError` otherwise."""
    ctx = {"sender": f"client-{client:03d}", "round": 0, "kind": KIND_RELATEDNESS_UPLOAD,
           "recipient": SERVER_ID}
    try:
        uploads = [InnerProductUpload.deserialize(part) for part in _unpack_parts(data, q)]
    except (ValueError, CkksError) as exc:
        raise log_rejection(MalformedPayloadError(f"encrypted summary upload: {exc}", **ctx)) from None
    for r, up in enumerate(uploads):
        if up.index != client * q + r:
            raise log_rejection(MalformedPayloadError(
                f"upload {r} is for vector {up.index}, expected vector {client * q + r}", **ctx))
        if len(up.packed) != layout.packs or len(up.broadcast) != layout.chunks:
            raise log_rejection(MalformedPayloadError(
                f"upload {r} has {len(up.packed)} packed + {len(up.broadcast)} broadcast "
                f"ciphertexts, the layout needs {layout.packs} + {layout.chunks}", **ctx))
    return uploads


def _invalid_ciphertexts(ctx: ts.Context, uploads: Sequence[InnerProductUpload]) -> str | None:
    """Why the server cannot use these uploads (a ciphertext does not load for its context,
    or sits at the wrong level or scale), or None. Mirrors the checks of
    :func:`privacy.ckks.inner_product_rows` per client, through its engine."""
    from privacy.ckks import _engine  # per-upload validation is not public in privacy.ckks

    eng = _engine(ctx)
    try:
        for up in uploads:
            for i, blob in enumerate(up.packed):
                what = f"packed ciphertext {i} of vector {up.index}"
                eng.check(eng.load(blob, what), eng.top_level, eng.scale, what)
            for m, blob in enumerate(up.broadcast):
                what = f"broadcast ciphertext {m} of vector {up.index}"
                eng.check(eng.load(blob, what), eng.top_level - 1, eng.scale, what)
    except CkksError as exc:
        return str(exc)
    return None


def _run_enveloped(
    cer: CkksCeremony,
    layout: InnerProductLayout,
    shape: tuple[int, int, int],
    wire: list[list[bytes]],
    rows: Sequence[int] | None,
    transport: SecureTransport,
    channel: Channel | None,
    clock: _PhaseClock,
) -> tuple[Tensor, EncryptedOverlaps, list[int]]:
    """The protocol with every message in a signed envelope (see the module docstring).
    Returns the released rows (all ``n * q`` columns), the result record (``accepted`` =
    clients used) and the vectors whose rows were computed."""
    n, d, q = shape
    kh = cer.key_holder

    def deliver(kind: str, client: int, message: bytes) -> bytes:
        return channel(kind, 0, client, message) if channel is not None else message

    # Clients -> server: one envelope per client with its q uploads.
    messages = {i: transport.client_upload_bytes(0, i, _pack_parts(wire[i]), KIND_RELATEDNESS_UPLOAD)
                for i in range(n)}
    client_bytes = [len(messages[i]) for i in range(n)]
    delivered = {i: deliver(KIND_RELATEDNESS_UPLOAD, i, m) for i, m in messages.items()}
    payloads, rejections = transport.server_receive_bytes(0, delivered, KIND_RELATEDNESS_UPLOAD)
    uploads: dict[int, list[InnerProductUpload]] = {}
    for i in sorted(payloads):
        try:
            uploads[i] = _parse_uploads(payloads[i], i, q, layout)
        except MalformedPayloadError as err:
            rejections.append(Rejection.from_error(i, 0, err, "upload"))

    # Server: public context only; excluded clients' vectors become encryptions of zero.
    zeros: dict[int, list[InnerProductUpload]] = {}
    while True:
        if not uploads:
            named = ", ".join(f"client {r.client} ({r.reason})" for r in rejections)
            raise SecureRelatednessError(f"no encrypted summary upload was accepted: {named}")
        accepted = sorted(uploads)
        for i in range(n):
            if i not in uploads and i not in zeros:
                zeros[i] = [encrypt_for_inner_products(
                    cer.server_context, layout, i * q + r, torch.zeros(d, dtype=torch.float64),
                    encryption="public") for r in range(q)]
        everyone = [up for i in range(n) for up in (uploads[i] if i in uploads else zeros[i])]
        if rows is None:
            wanted = [i * q + r for i in accepted for r in range(q)]
        else:
            wanted = [v for v in rows if v // q in uploads]
        try:
            enc_rows = inner_product_rows(cer.server_context, layout, everyone, rows=wanted)
            break
        except (CkksError, ValueError, RuntimeError) as exc:
            bad = {i: why for i in accepted
                   if (why := _invalid_ciphertexts(cer.server_context, uploads[i])) is not None}
            if not bad:
                raise SecureRelatednessError(f"server computation failed: {exc}") from exc
            for i, why in bad.items():
                err = log_rejection(MalformedPayloadError(
                    f"encrypted summary upload: {why}", sender=transport.client_id(i), round=0,
                    kind=KIND_RELATEDNESS_UPLOAD, recipient=SERVER_ID))
                rejections.append(Rejection.from_error(i, 0, err, "upload"))
                del uploads[i]
    clock.lap("server_compute")

    # Server -> key holder: the encrypted rows, one envelope.
    row_message = deliver(KIND_RELATEDNESS_ROWS, kh, transport.server_send_bytes(
        0, kh, _pack_parts([row.serialize() for row in enc_rows]), KIND_RELATEDNESS_ROWS))
    try:
        row_payload = transport.client_receive_bytes(0, kh, row_message, KIND_RELATEDNESS_ROWS)
        received = [EncryptedRow.deserialize(b) for b in _unpack_parts(row_payload, len(wanted))]
    except EnvelopeError as err:
        raise SecureRelatednessError(
            f"key holder client {kh} rejected the server's encrypted rows ({err.reason}): {err}; "
            "relatedness cannot be computed without them") from err
    except (ValueError, CkksError) as exc:
        raise SecureRelatednessError(
            f"key holder client {kh} cannot parse the server's encrypted rows: {exc}") from exc
    if [row.index for row in received] != wanted:
        raise SecureRelatednessError(
            f"key holder client {kh} received rows for vectors {[r.index for r in received][:10]}, "
            f"not the requested {wanted[:10]}")
    try:
        gram = decrypt_inner_product_rows(cer.key_holder_context, layout, received)
    except CkksError as exc:
        raise SecureRelatednessError(f"key holder client {kh} cannot decrypt the rows: {exc}") from exc
    excluded_vectors = [v for v in range(n * q) if v // q not in uploads]
    gram[:, excluded_vectors] = 0.0  # encryptions of zero: exactly zero, not CKKS noise

    # Key holder -> server: the released blocks (float64, exact), one envelope.
    release = deliver(KIND_RELATEDNESS_RELEASE, kh, transport.client_upload(
        0, kh, gram, kind=KIND_RELATEDNESS_RELEASE, dtype=torch.float64))
    released, release_rejections = transport.server_receive(
        0, {kh: release}, tuple(gram.shape), kind=KIND_RELATEDNESS_RELEASE, dtype=torch.float64)
    if release_rejections:
        r = release_rejections[0]
        raise SecureRelatednessError(
            f"the server rejected key holder client {kh}'s release of the q x q blocks "
            f"({r.reason}: {r.detail}); relatedness cannot be computed without it")
    gram = released[kh]
    clock.lap("key_holder_decrypt")
    timings = clock.finish()
    result = EncryptedOverlaps(
        overlaps=torch.empty(0),
        layout=layout,
        client_bytes_sent=client_bytes,
        server_bytes_received=sum(len(m) for m in delivered.values()),
        key_holder_bytes_received=len(row_message),
        released_bytes=len(release),
        timings=timings,
        accepted=sorted(uploads),
        rejections=sorted(rejections, key=lambda r: r.client),
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
    """
    u = _check_summaries(summaries)
    n, _, q = u.shape
    gram, result, computed = _run(u, key_holder, ceremony, client_encryption, None,
                                  transport, channel)
    full = torch.zeros(n * q, n * q, dtype=torch.float64)
    full[computed] = gram.to(torch.float64)
    # full[a, b] with a = i*q + r, b = j*q + s  ->  overlaps[i, j, r, s]
    result.overlaps = full.reshape(n, q, n, q).permute(0, 2, 1, 3).contiguous()
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
