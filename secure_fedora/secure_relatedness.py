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

Assumption: clients hold the secret key (the design seals it to each of them), so a
client must never receive another client's upload; in this in-process run nothing does.
"""

from __future__ import annotations

import hashlib
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
from privacy.identity import Identity

__all__ = [
    "CkksCeremony",
    "EncryptedOverlaps",
    "SecureRelatednessError",
    "ceremony_summary",
    "encrypted_newcomer_overlaps",
    "encrypted_overlaps",
    "run_key_ceremony",
]


class SecureRelatednessError(ValueError):
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
    """

    overlaps: Tensor
    layout: InnerProductLayout
    client_bytes_sent: list[int]
    server_bytes_received: int
    key_holder_bytes_received: int
    released_bytes: int
    timings: dict[str, float] = field(default_factory=dict)


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
) -> tuple[Tensor, EncryptedOverlaps]:
    n, d, q = summaries.shape
    _check_key_holder(key_holder, n)
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
    )
    return gram, result


def encrypted_overlaps(
    summaries: Tensor,
    key_holder: int = 0,
    *,
    ceremony: CkksCeremony | None = None,
    client_encryption: Encryption = "symmetric",
) -> EncryptedOverlaps:
    """All overlap blocks U_i^T U_j (an (N, N, q, q) float64 tensor) computed under CKKS.

    Equal to ``torch.einsum("idq,jdr->ijqr", U, U)`` within about 1e-5 (CKKS noise plus the
    2^-16 release rounding). ``client_encryption="symmetric"`` has clients encrypt with the
    secret context they received (faster, half the bytes); ``"public"`` with the public key
    only. Pass a ``ceremony`` from :func:`run_key_ceremony` to reuse keys across calls.
    Summaries must have column norms <= 256 (orthonormal summaries have norm 1).
    """
    u = _check_summaries(summaries)
    n, _, q = u.shape
    gram, result = _run(u, key_holder, ceremony, client_encryption, rows=None)
    # gram[a, b] with a = i*q + r, b = j*q + s  ->  overlaps[i, j, r, s]
    result.overlaps = gram.reshape(n, q, n, q).permute(0, 2, 1, 3).contiguous()
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
    gram, result = _run(everyone, key_holder, ceremony, client_encryption, rows=rows)
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
