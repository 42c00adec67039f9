"""Encrypted parameter propagation for FEDORA: the server forms phi_i = sum_j P_ij theta_j on
CKKS ciphertexts and only client i decrypts its own phi_i.

Protocol (run in process with the roles kept apart):

1. key ceremony, once per run (:class:`EncryptedPropagator`): a key holder creates CKKS keys
   (ring degree 8192, moduli [60, 40, 40, 60], scale 2^40), seals the secret context to every
   client's X25519 key, and gives the server a public context holding the public key only --
   no secret key, no relinearization or rotation keys (plaintext-weight sums need none);
2. each client packs its model row theta_j into ciphertexts -- two consecutive parameters
   per complex slot, 8192 parameters per ciphertext -- encrypted one level below the top
   (one rescale left), and uploads them (:class:`PropagationClient`);
3. the server (:class:`PropagationServer`, public context only) computes, for every client
   i, sum_j P_ij Enc(theta_j) with the propagation weights as plaintext scalars: one
   plaintext multiplication per (i, j, ciphertext) and a single rescale per output
   ciphertext (depth 1 of the two available), see :func:`privacy.ckks.weighted_sums`;
4. client i decrypts only its own phi_i.

Accuracy: CKKS noise plus weight quantization (multiples of about 9e-13) give errors near
1e-8 for parameters of magnitude 1; the result is returned in theta's dtype (float32 in the
runtime, whose own rounding is larger).

What each party learns (honest-but-curious, stated assumptions): the server sees ciphertexts
only (IND-CPA under RLWE) and the propagation matrix it already holds; client i sees phi_i,
exactly what plaintext FEDORA sends it. All clients hold the same secret key (the design
seals it to each of them), so confidentiality assumes the server never hands one client's
ciphertext to another client and does not collude with any client; in this in-process run no
client receives another's ciphertext. Ciphertexts are not authenticated here: wrap them in
:class:`secure_fedora.secure.transport.SecureTransport` envelopes (``*_bytes`` methods) in a deployment.

Cost (complex packing halves ciphertexts, uploads and server work compared with
:func:`privacy.ckks.encrypt_rows`): per round N * ceil(P / 8192) client encryptions, N^2 *
ceil(P / 8192) plaintext-scalar products on the server, N * ceil(P / 8192) decryptions.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi
import torch
from torch import Tensor

from privacy.ckks import (
    MAX_ABS_VALUE,
    MAX_WEIGHT_L1,
    CkksError,
    EncryptedVector,
    Encryption,
    check_decrypted,
    context_from_bytes,
    context_parameters,
    context_to_bytes,
    create_secret_context,
    open_secret_context,
    public_context_bytes,
    seal_secret_context,
    weighted_sums,
)
from privacy.envelope import EnvelopeError
from privacy.errors import ToolkitError
from privacy.identity import SERVER_ID, Identity
from privacy.pipeline import EncryptPayload
from secure_fedora.secure.relatedness import CkksCeremony, PhaseClock
from secure_fedora.secure.transport import (
    KIND_ENC_PHI,
    KIND_ENC_THETA,
    MalformedPayloadError,
    Rejection,
    SecureExchange,
    UnaccountedReleases,
    log_rejection,
)

__all__ = [
    "EncryptedPropagationError",
    "EncryptedPropagator",
    "PropagationClient",
    "PropagationServer",
    "PropagationStats",
    "complex_length",
]

_UPLOAD_LEVEL = 1  # one rescale left: exactly what the plaintext-weight sum needs
_RESULT_LEVEL = 0


class EncryptedPropagationError(ToolkitError, ValueError):
    """Invalid input, context or ciphertext for encrypted propagation (names the culprit)."""


def complex_length(num_params: int) -> int:
    """Complex slots a row of ``num_params`` real parameters occupies (two per slot)."""
    return (num_params + 1) // 2


@contextmanager
def _scratch_path():  # type: ignore[no-untyped-def]
    """A file path SEAL can save to, read back in memory (memfd on Linux, else a temp file)."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("secure-fedora-prop", os.MFD_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}", lambda: os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    else:
        with tempfile.TemporaryDirectory(prefix="secure-fedora-prop-") as tmp:
            path = Path(tmp) / "blob"
            yield str(path), path.read_bytes


def _saved(obj: Any) -> bytes:
    with _scratch_path() as (path, read):
        obj.save(path)
        return read()


class _Keys:
    """SEAL encoder/encryptor/decryptor of one TenSEAL CKKS context."""

    def __init__(self, ctx: ts.Context) -> None:
        self.ctx = ctx
        self.seal = ctx.data.seal_context()
        self.encoder = sealapi.CKKSEncoder(self.seal)
        self.slots = self.encoder.slot_count()
        self.scale = float(ctx.global_scale)
        self.parms: dict[int, Any] = {}
        data = self.seal.first_context_data()
        while data is not None:
            self.parms[data.chain_index()] = data.parms_id()
            data = data.next_context_data()
        if _UPLOAD_LEVEL not in self.parms:
            raise EncryptedPropagationError("CKKS context has no level 1 (needs [60, 40, 40, 60])")


def _encrypt_row(keys: _Keys, encryptor: Any, symmetric: bool, row: Tensor) -> bytes:
    """Pack ``row`` two values per complex slot and encrypt it at level 1 (see PropagationClient)."""
    if not isinstance(row, Tensor) or row.dim() != 1 or row.numel() == 0:
        shape = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
        raise EncryptedPropagationError(f"row must be a non-empty 1-D tensor, got {shape}")
    if row.is_complex() or not row.is_floating_point():
        raise EncryptedPropagationError(f"row must be real floating point, got {row.dtype}")
    x = row.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(x).all():
        raise EncryptedPropagationError("row holds NaN or infinite values")
    peak = float(np.abs(x).max())
    if peak > MAX_ABS_VALUE:
        raise EncryptedPropagationError(
            f"row reaches |x| = {peak:.4g} > MAX_ABS_VALUE = {MAX_ABS_VALUE:g}")
    if x.size % 2:
        x = np.append(x, 0.0)
    z = x[0::2] + 1j * x[1::2]
    parms = keys.parms[_UPLOAD_LEVEL]
    parts = []
    for start in range(0, z.size, keys.slots):
        pt = sealapi.Plaintext()
        keys.encoder.encode(z[start:start + keys.slots].tolist(), parms, keys.scale, pt)
        if symmetric:
            parts.append(_saved(encryptor.encrypt_symmetric(pt)))
        else:
            ct = sealapi.Ciphertext(keys.seal)
            encryptor.encrypt(pt, ct)
            parts.append(_saved(ct))
    return EncryptedVector(length=int(z.size), level=_UPLOAD_LEVEL, parts=parts).serialize()


@dataclass
class PropagationStats:
    """Traffic and time of encrypted propagation.

    ``client_bytes_sent[i]`` / ``client_bytes_received[i]`` are client i's cumulative upload and
    download bytes over all rounds; ``last_round`` holds the latest round's per-client bytes and
    its wall (``<phase>_s``) and process CPU (``<phase>_cpu_s``) seconds for the phases
    ``clients_encrypt`` (all clients, one after another), ``server_combine`` and
    ``clients_decrypt``; ``totals`` accumulates the same keys over all rounds.
    """

    rounds: int = 0
    client_bytes_sent: list[int] = field(default_factory=list)
    client_bytes_received: list[int] = field(default_factory=list)
    last_round: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    ceremony_seconds: float = 0.0
    server_context_bytes: int = 0
    sealed_context_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return dict(self.__dict__)


class PropagationClient:
    """Client role: encrypts its own row and decrypts its own phi (holds the secret context)."""

    def __init__(self, secret_ctx: ts.Context, encryption: Encryption = "symmetric") -> None:
        if not isinstance(secret_ctx, ts.Context) or not secret_ctx.has_secret_key():
            raise EncryptedPropagationError("a propagation client needs a secret CKKS context")
        if encryption not in ("symmetric", "public"):
            raise EncryptedPropagationError(
                f"encryption must be 'symmetric' or 'public', got {encryption!r}")
        self.keys = _Keys(secret_ctx)
        self.encryption = encryption
        seal = self.keys.seal
        data = secret_ctx.data
        self._encryptor = (sealapi.Encryptor(seal, data.secret_key()) if encryption == "symmetric"
                           else sealapi.Encryptor(seal, data.public_key()))
        self._decryptor = sealapi.Decryptor(seal, data.secret_key())

    def encrypt(self, row: Tensor) -> bytes:
        """Serialized ciphertexts of a 1-D real row, two parameters per complex slot.

        Symmetric encryption (default) uses the secret key and yields seeded ciphertexts of
        half the size (same IND-CPA security under RLWE); ``"public"`` uses the public key.
        Raises :class:`EncryptedPropagationError` for a non-1-D, empty, non-finite row or one
        with |x| > MAX_ABS_VALUE (1024).
        """
        return _encrypt_row(self.keys, self._encryptor, self.encryption == "symmetric", row)

    def decrypt(self, message: bytes, num_params: int) -> Tensor:
        """Decrypt one combined result into a float64 tensor of ``num_params`` parameters."""
        if not isinstance(num_params, int) or num_params < 1:
            raise EncryptedPropagationError(f"num_params must be a positive integer, got {num_params!r}")
        keys = self.keys
        try:
            enc = EncryptedVector.deserialize(message, slot_count=keys.slots)
            if enc.level != _RESULT_LEVEL or enc.length != complex_length(num_params):
                raise CkksError(
                    f"result has length {enc.length} at level {enc.level}, expected "
                    f"{complex_length(num_params)} at level {_RESULT_LEVEL}")
            cts = enc.ciphertexts(keys.ctx)
        except CkksError as exc:
            raise EncryptedPropagationError(f"cannot decrypt propagation result: {exc}") from exc
        out = np.empty(2 * enc.length, dtype=np.float64)
        for k, ct in enumerate(cts):
            pt = sealapi.Plaintext()
            self._decryptor.decrypt(ct, pt)
            vals = np.asarray(keys.encoder.decode_complex(pt), dtype=np.complex128)
            n = min(keys.slots, enc.length - k * keys.slots)
            lo = 2 * k * keys.slots
            out[lo:lo + 2 * n:2] = vals[:n].real
            out[lo + 1:lo + 2 * n:2] = vals[:n].imag
        try:  # rows within MAX_ABS_VALUE, weight rows within MAX_WEIGHT_L1 (checked on both sides)
            check_decrypted(out[:num_params], MAX_ABS_VALUE * MAX_WEIGHT_L1, "propagated values")
        except CkksError as exc:
            raise EncryptedPropagationError(f"cannot decrypt propagation result: {exc}") from None
        return torch.from_numpy(out[:num_params].copy())


class PropagationServer:
    """Server role: combines encrypted rows with plaintext weights; holds the public context only."""

    def __init__(self, public_context: bytes) -> None:
        try:
            self.context = context_from_bytes(public_context, expect_secret_key=False)
        except CkksError as exc:
            raise EncryptedPropagationError(f"server context rejected: {exc}") from exc
        self.context_bytes = len(public_context)
        self.keys = _Keys(self.context)
        self._encryptor = sealapi.Encryptor(self.keys.seal, self.context.data.public_key())

    def check_upload(self, data: bytes, num_params: int, client: int) -> EncryptedVector:
        """Parse and validate one client's upload (level, length, ciphertext count, scale,
        ciphertext structure); raises :class:`EncryptedPropagationError` naming ``client``."""
        length = complex_length(num_params)
        try:
            vec = EncryptedVector.deserialize(data, slot_count=self.keys.slots)
            if vec.level != _UPLOAD_LEVEL or vec.length != length:
                raise CkksError(f"length {vec.length} at level {vec.level}, expected {length} "
                                f"at level {_UPLOAD_LEVEL}")
            vec.ciphertexts(self.context)  # parse and check every ciphertext now
        except CkksError as exc:
            raise EncryptedPropagationError(f"upload of client {client} rejected: {exc}") from exc
        return vec

    def encrypt_public(self, row: Tensor) -> bytes:
        """Encrypt a row the server knows in the clear (the common initialization of a client
        none of whose uploads was ever accepted) under the public key, in the upload format."""
        return _encrypt_row(self.keys, self._encryptor, False, row)

    def combine(self, weights: Tensor, uploads: Sequence[bytes], num_params: int) -> list[bytes]:
        """Row i of the result is sum_j weights[i, j] * upload_j, still encrypted and serialized.

        ``weights`` is (K, N) for N uploads of ``num_params``-parameter rows (each checked with
        :meth:`check_upload`; a bad upload is named by its client index).
        """
        if not isinstance(weights, Tensor) or weights.dim() != 2:
            raise EncryptedPropagationError("weights must be a (K, N) tensor")
        if weights.shape[1] != len(uploads):
            raise EncryptedPropagationError(
                f"weights have {weights.shape[1]} columns for {len(uploads)} uploads")
        if not torch.isfinite(weights).all():
            raise EncryptedPropagationError("weights hold NaN or infinite values")
        rows = [self.check_upload(data, num_params, j) for j, data in enumerate(uploads)]
        try:
            combined = weighted_sums(self.context, rows, weights.detach().to(torch.float64))
        except CkksError as exc:
            raise EncryptedPropagationError(f"encrypted propagation failed: {exc}") from exc
        return [vec.serialize() for vec in combined]


class EncryptedPropagator:
    """FEDORA's propagation step ``phi = P @ theta`` computed under CKKS (see the module doc).

    Created once per run: the key ceremony runs in the constructor and its contexts are
    reused by every :meth:`propagate` call. Pass ``ceremony`` (from
    :func:`secure_fedora.secure.relatedness.run_key_ceremony`) to share the relatedness keys:
    the server then still receives a context with the public key only. ``identities`` (one per
    client, in order) supply the X25519 keys the secret context is sealed to; by default fresh
    in-memory identities are generated (simulation only).
    """

    def __init__(
        self,
        num_clients: int,
        *,
        key_holder: int = 0,
        ceremony: CkksCeremony | None = None,
        identities: Sequence[Identity] | None = None,
        encryption: Encryption = "symmetric",
    ) -> None:
        if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
            raise EncryptedPropagationError(f"num_clients must be a positive integer, got {num_clients!r}")
        if not isinstance(key_holder, int) or not 0 <= key_holder < num_clients:
            raise EncryptedPropagationError(
                f"key_holder must be a client index in [0, {num_clients}), got {key_holder!r}")
        self.num_clients = num_clients
        self.stats = PropagationStats(client_bytes_sent=[0] * num_clients,
                                      client_bytes_received=[0] * num_clients)
        start = time.perf_counter()
        if ceremony is not None:
            if ceremony.num_clients != num_clients:
                raise EncryptedPropagationError(
                    f"ceremony covers {ceremony.num_clients} clients, not {num_clients}")
            key_holder_ctx = ceremony.key_holder_context
            client_ctx = ceremony.client_context
            self.stats.sealed_context_bytes = max(ceremony.sealed_context_bytes)
        else:
            key_holder_ctx, client_ctx = self._ceremony(num_clients, identities)
        server_bytes = public_context_bytes(key_holder_ctx, galois_keys=False, relin_keys=False)
        self.server = PropagationServer(server_bytes)
        #: The server context's CKKS parameters (:func:`privacy.ckks.context_parameters`).
        self.ckks_parameters = context_parameters(self.server.context)
        # Every in-process client opened the same keys; one client object serves them all.
        self.client = PropagationClient(client_ctx, encryption)
        self.stats.server_context_bytes = len(server_bytes)
        self.stats.ceremony_seconds = time.perf_counter() - start
        self._uploads: list[bytes | None] = [None] * num_clients
        self._num_params: int | None = None

    def _ceremony(self, n: int, identities: Sequence[Identity] | None) -> tuple[ts.Context, ts.Context]:
        if identities is None:
            identities = [Identity.generate(f"client-{i:03d}") for i in range(n)]
        if len(identities) != n or len({i.party_id for i in identities}) != n:
            raise EncryptedPropagationError(f"need {n} identities with distinct party ids")
        secret = create_secret_context(galois_keys=False)
        sealed = seal_secret_context(
            secret, {ident.party_id: ident.agreement_key.public_key() for ident in identities})
        digest = hashlib.sha256(context_to_bytes(secret, include_secret_key=True)).digest()
        client_ctx: ts.Context | None = None
        for ident in identities:
            ctx = open_secret_context(sealed[ident.party_id], ident.agreement_key, ident.party_id)
            if hashlib.sha256(context_to_bytes(ctx, include_secret_key=True)).digest() != digest:
                raise EncryptedPropagationError(f"client {ident.party_id} opened a different context")
            client_ctx = client_ctx or ctx
        assert client_ctx is not None
        self.stats.sealed_context_bytes = max(len(b) for b in sealed.values())
        return secret, client_ctx

    def propagate(
        self,
        prop: Tensor,
        theta: Tensor,
        changed: Sequence[int] | None = None,
        *,
        rnd: int | None = None,
        exchange: SecureExchange | None = None,
    ) -> Tensor:
        """``prop @ theta`` (N, P) computed on ciphertexts; returned in ``theta``'s dtype.

        ``changed`` lists the clients whose rows changed since the previous call (e.g. the
        round's participants): only they re-encrypt and upload; the server reuses the other
        clients' last accepted ciphertexts. Default: every client uploads. Equal to the
        plaintext product within about 1e-7 for parameters of magnitude <= 1.

        With ``exchange`` (and the round ``rnd``) every ciphertext travels in a signed envelope
        (kinds ``enc_theta`` up, ``enc_phi`` down) through ``exchange.transport`` and its
        channel; plaintext rows are never sent (do not also call ``exchange.upload_theta``).
        A rejected upload -- bad envelope, or an authentic but malformed ciphertext -- makes
        that client a non-participant: its row of ``theta`` is restored in place to
        ``exchange.server_theta`` and the server uses its last accepted ciphertext (or, if it
        never accepted one, a public-key encryption of ``exchange.server_theta``, the common
        initialization). A client that rejects its result keeps ``exchange.client_phi``'s row.
        Rejections are appended to ``exchange.rejections``; the exchange's copies stay equal
        to ``theta`` and the returned phi.
        """
        n = self.num_clients
        if not isinstance(prop, Tensor) or tuple(prop.shape) != (n, n):
            shape = tuple(prop.shape) if isinstance(prop, Tensor) else type(prop).__name__
            raise EncryptedPropagationError(f"propagation matrix must be ({n}, {n}), got {shape}")
        if not isinstance(theta, Tensor) or theta.dim() != 2 or theta.shape[0] != n:
            shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
            raise EncryptedPropagationError(f"theta must be ({n}, P), got {shape}")
        p = int(theta.shape[1])
        if self._num_params is not None and p != self._num_params:
            raise EncryptedPropagationError(f"theta has {p} columns, earlier rounds had {self._num_params}")
        if exchange is not None:
            if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
                raise EncryptedPropagationError(f"an enveloped round needs rnd >= 0, got {rnd!r}")
            if exchange.transport.num_clients != n or exchange.server_theta.shape != theta.shape:
                raise EncryptedPropagationError(
                    f"exchange is for {tuple(exchange.server_theta.shape)} rows, theta is {tuple(theta.shape)}")
        redo = range(n) if changed is None or self._num_params is None else sorted(set(changed))
        for j in redo:
            if not isinstance(j, int) or not 0 <= j < n:
                raise EncryptedPropagationError(f"changed lists {j!r}, not a client index in [0, {n})")
        clock = PhaseClock()
        sent = [0] * n
        fresh: dict[int, bytes] = {}
        if exchange is None:
            # No envelope to sign, so the upload's pipeline is its encryption stage alone (the
            # model release behind it was accounted and step-checked by the runtime).
            encrypt = self._encrypt_stage()
            unaccounted = UnaccountedReleases()
            for j in redo:
                try:
                    released = unaccounted.release_upload(j, rnd or 0, KIND_ENC_THETA, theta[j],
                                                          encrypt=encrypt)
                except EncryptedPropagationError as exc:
                    raise EncryptedPropagationError(f"client {j}: {exc}") from exc
                assert isinstance(released.payload, bytes)
                fresh[j] = released.payload
                sent[j] = len(fresh[j])
        else:
            assert rnd is not None
            fresh, sent = self._enveloped_uploads(rnd, exchange, theta, list(redo), p)
        for j, data in fresh.items():
            self._uploads[j] = data
        self._num_params = p
        clock.lap("clients_encrypt")
        uploads = [u for u in self._uploads if u is not None]
        results = self.server.combine(prop, uploads, p)
        clock.lap("server_combine")
        if exchange is not None:
            assert rnd is not None
            phi, received = self._enveloped_downloads(rnd, exchange, results, p, theta.dtype)
        else:
            phi = torch.empty(n, p, dtype=theta.dtype)
            for i in range(n):
                phi[i] = self.client.decrypt(results[i], p).to(theta.dtype)
            received = [len(r) for r in results]
        clock.lap("clients_decrypt")
        self._record(sent, received, clock.timings)
        return phi

    def _encrypt_stage(self) -> EncryptPayload:
        """The clients' upload-pipeline stage that turns a row into its CKKS ciphertext."""
        return EncryptPayload(self.client.encrypt, f"ckks-{self.client.encryption}")

    def _enveloped_uploads(
        self, rnd: int, exchange: SecureExchange, theta: Tensor, redo: Sequence[int], p: int
    ) -> tuple[dict[int, bytes], list[int]]:
        """Each client in ``redo`` releases its row through its pipeline: after the round's
        accounted stages (under DP), an :class:`~privacy.pipeline.EncryptPayload` stage (this
        client's CKKS encryption), then the signature; the server verifies them."""
        transport = exchange.transport
        encrypt = self._encrypt_stage()
        messages = {}
        for j in redo:
            try:
                messages[j] = transport.client_release(rnd, j, KIND_ENC_THETA, theta[j],
                                                       encrypt=encrypt)
            except EncryptedPropagationError as exc:
                raise EncryptedPropagationError(f"client {j}: {exc}") from exc
        sent = [len(messages.get(j, b"")) for j in range(self.num_clients)]

        def check(j: int, payload: bytes) -> bytes:
            try:
                self.server.check_upload(payload, p, j)
            except EncryptedPropagationError as exc:
                raise log_rejection(MalformedPayloadError(
                    str(exc), sender=transport.client_id(j), round=rnd, kind=KIND_ENC_THETA,
                    recipient=SERVER_ID)) from exc
            return payload

        accepted, rejections = transport.server_receive_bytes(
            rnd, exchange.deliver(KIND_ENC_THETA, rnd, messages), KIND_ENC_THETA, parse=check)
        kept: dict[int, bytes] = {}
        for j in sorted(accepted):
            kept[j] = accepted[j]
            exchange.server_theta[j].copy_(theta[j])
        for r in sorted(rejections, key=lambda r: r.client):
            theta[r.client].copy_(exchange.server_theta[r.client])
            if self._uploads[r.client] is None:
                kept[r.client] = self.server.encrypt_public(exchange.server_theta[r.client])
        exchange.rejections.extend(sorted(rejections, key=lambda r: r.client))
        # clients that were not asked to upload keep the server's cached ciphertexts; on the
        # first round every client uploads (or gets its public initialization above)
        for j in range(self.num_clients):
            if j not in kept and self._uploads[j] is None:
                kept[j] = self.server.encrypt_public(exchange.server_theta[j])
        return kept, sent

    def _enveloped_downloads(
        self, rnd: int, exchange: SecureExchange, results: list[bytes], p: int, dtype: torch.dtype
    ) -> tuple[Tensor, list[int]]:
        transport = exchange.transport
        messages = {i: transport.server_send_bytes(rnd, i, results[i], KIND_ENC_PHI)
                    for i in range(self.num_clients)}
        received = [len(messages[i]) for i in range(self.num_clients)]
        delivered = exchange.deliver(KIND_ENC_PHI, rnd, messages)
        phi = torch.empty(self.num_clients, p, dtype=dtype)

        def decrypt(i: int, payload: bytes) -> Tensor:
            try:
                return self.client.decrypt(payload, p)
            except EncryptedPropagationError as exc:
                raise log_rejection(MalformedPayloadError(
                    str(exc), sender=SERVER_ID, round=rnd, kind=KIND_ENC_PHI,
                    recipient=transport.client_id(i))) from exc

        for i in range(self.num_clients):
            try:
                row = transport.client_receive_bytes(rnd, i, delivered[i], KIND_ENC_PHI,
                                                     parse=decrypt)
            except EnvelopeError as err:
                exchange.rejections.append(Rejection.from_error(i, rnd, err, "download"))
                phi[i] = exchange.client_phi[i]
                continue
            phi[i] = row.to(dtype)
            exchange.client_phi[i].copy_(phi[i])
        return phi, received

    def _record(self, sent: list[int], received: list[int], timings: dict[str, float]) -> None:
        s = self.stats
        s.rounds += 1
        s.client_bytes_sent = [a + b for a, b in zip(s.client_bytes_sent, sent, strict=True)]
        s.client_bytes_received = [a + b for a, b in zip(s.client_bytes_received, received, strict=True)]
        timings["total_s"] = sum(v for k, v in timings.items() if k.endswith("_s") and not k.endswith("cpu_s"))
        timings["total_cpu_s"] = sum(v for k, v in timings.items() if k.endswith("_cpu_s"))
        s.last_round = {"bytes_sent": sent, "bytes_received": received, **timings}
        for key, value in timings.items():
            s.totals[key] = s.totals.get(key, 0.0) + value

    def ciphertexts_per_row(self, num_params: int) -> int:
        """Ciphertexts one model row of ``num_params`` parameters occupies."""
        return math.ceil(complex_length(num_params) / self.client.keys.slots)
