"""CKKS homomorphic encryption (TenSEAL): key ceremony, encrypted inner products, weighted sums.

Roles and what each holds:

- the **key holder** creates the CKKS keys (:func:`create_secret_context`);
- every **client** receives the *secret* context sealed to its X25519 key
  (:func:`seal_secret_context` / :func:`open_secret_context`): secret key + public key, no
  evaluation keys;
- the **server** receives a *public* context (:func:`public_context`): public key, relin
  keys, and Galois (rotation) keys only when the computation needs rotations. It cannot
  decrypt: TenSEAL and :func:`decrypt_vector` raise on a public context.

Parameters (fixed by :class:`CkksParameters`): ring degree 8192 (4096 complex slots),
coefficient moduli of 60, 40, 40, 60 bits (two rescales), scale 2^40; SEAL's default
128-bit security check applies.

Encrypted inner products ("relatedness")
----------------------------------------
Goal: for V real vectors u_0..u_{V-1} of dimension d, each held by one party, the server
computes every inner product <u_a, u_b> on ciphertexts; a key holder decrypts them.

Layout (:class:`InnerProductLayout`): G = next power of two >= V *lanes*, c = 4096 / G
*positions*; slot s = k * G + g (position k, lane g). Two consecutive real coordinates are
packed into one complex slot, so one "chunk" holds 2c coordinates and a vector has
M = ceil(d / 2c) chunks. Each vector's party uploads (:func:`encrypt_for_inner_products`):

- one compact ciphertext W_v (fresh level) holding conj(chunk m) of u_v in lane (v + m) mod G;
- M *broadcast* ciphertexts B_{v,m} (one level down, smaller) holding chunk m repeated in
  every lane.

The server (:func:`inner_product_rows`) builds, for each chunk m, X_m = rot(sum_v W_v * mask_{(v+m) mod G}, m)
-- every vector's chunk m in its own lane -- with one plaintext mask multiplication per
(vector, chunk) and one rotation per chunk (first rescale). Row a is then
sum_m B_{a,m} * X_m (ciphertext products summed *before* one relinearization and the second
rescale), plus its complex conjugate (kills the imaginary cross terms: Re(z w*) =
x1 y1 + x2 y2), then an all-reduce over the positions (log2 c rotations). Every slot of row a
then holds exactly <u_a, u_g> for lane g (0 for empty lanes): the decrypted row holds the
inner products and nothing else -- no partial sums, no cross terms.

Cost per call, V vectors: clients encrypt V * (M + 1) ciphertexts; the server does V * M
mask multiplications, M rotations, V * M ciphertext products and V * (2 + log2 c)
key switches; the key holder decrypts V ciphertexts. For V = 100, d = 794: M = 13.

Why this packing (measured on the 2-core development machine, one thread, CPU seconds):
a naive encrypted dot product per pair costs about 30 ms, so 4950 pairs (V = 100) take
over two minutes; packing several pairs per ciphertext in contiguous 1024-slot blocks
still needs a 10-rotation tree per product ciphertext (about 12,000 key switches). Here
the reduction over coordinates happens by *adding* ciphertexts before any key switch, and
one log2(c)-rotation all-reduce serves a whole Gram row; complex packing halves uploads
and products at the price of one conjugation per row. Measured (benchmarks/he_cost.py):
V = 100, d = 794: 10.7 CPU-s in total (clients 5.8 s for all 100 together, server 4.7 s,
key holder 0.2 s), 1.66 MB uploaded per client, max error 8e-6; V = 36: 2.5 CPU-s. Public
key client encryption: 13.1 CPU-s, 3.4 MB per client (no seeding).

What the key holder learns: the V x V Gram matrix. What the server learns: nothing from
ciphertexts (IND-CPA under RLWE), the released inner products if the key holder returns
them. Decrypted CKKS values carry noise that can leak key material if handed to an
adversary (Li & Micciancio, EUROCRYPT 2021); :func:`decrypt_inner_product_rows` therefore
rounds released values to a grid of ``release_quantum`` (default 2^-16) -- a heuristic
mitigation, not a proof.

Encrypted weighted sums ("propagation")
---------------------------------------
:func:`encrypt_rows` packs each row of an (N, P) matrix into ceil(P / 4096) ciphertexts,
encrypted one level below the top (one rescale is all that is needed, and the ciphertexts
are a third smaller); :func:`weighted_sums` forms sum_j W_ij Enc(row_j) with plaintext
weights (N^2 * ceil(P / 4096) plaintext-scalar products, one rescale per output
ciphertext, no evaluation keys needed); :func:`decrypt_vector` decrypts one result, so
client i decrypts only its own phi_i. Measured at N = 36, P = 118,282 (29 ciphertexts per
model): 18.7 CPU-s per round in total (server 12.5 s) vs 23 ms for the plaintext product,
3.35 MB sent and 3.80 MB received per client, max error 1.3e-8.

Input bounds (checked): every encrypted value has |x| <= :data:`MAX_ABS_VALUE`, every
inner-product vector has Euclidean norm <= :data:`MAX_VECTOR_NORM`, every weight row has
L1 norm <= :data:`MAX_WEIGHT_L1`; this keeps every intermediate value far inside the
modulus.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from torch import Tensor

from privacy.errors import ToolkitError
from privacy.sealing import SealingError, open_sealed, seal

__all__ = [
    "CkksError",
    "CkksParameters",
    "DecryptedValuesError",
    "EncryptedRow",
    "EncryptedVector",
    "Encryption",
    "InnerProductLayout",
    "InnerProductUpload",
    "MAX_ABS_VALUE",
    "MAX_VECTOR_NORM",
    "MAX_WEIGHT_L1",
    "GRAM_SYMMETRY_TOLERANCE",
    "gram_tolerance",
    "HE_STANDARD_MAX_COEFF_BITS",
    "check_inner_product_upload",
    "context_from_bytes",
    "context_parameters",
    "context_to_bytes",
    "create_secret_context",
    "decrypt_inner_product_rows",
    "decrypt_vector",
    "encrypt_for_inner_products",
    "check_decrypted",
    "encrypt_rows",
    "encrypt_vector",
    "he_standard_security",
    "parameter_notes",
    "parameters_text",
    "inner_product_rows",
    "open_secret_context",
    "public_context",
    "public_context_bytes",
    "seal_secret_context",
    "weighted_sums",
]

Encryption = Literal["symmetric", "public"]

MAX_ABS_VALUE = 2.0**10
MAX_VECTOR_NORM = 2.0**8
MAX_WEIGHT_L1 = 2.0**8
#: The most the decrypted <u_a, u_b> and <u_b, u_a> may ever differ (:func:`gram_tolerance`
#: for two columns of norm >= 7; honest rows differ by at most about 1e-4 at norms
#: MAX_VECTOR_NORM); farther apart, the rows are not one Gram matrix's.
GRAM_SYMMETRY_TOLERANCE = 2.0**-10
#: gram_tolerance's scale: honest rows of unit-norm columns differ by at most about 3e-6.
_GRAM_NOISE_UNIT = 2.0**-16

_VECTOR_MAGIC = b"SFCV"
_ROW_MAGIC = b"SFIR"
_UPLOAD_MAGIC = b"SFIU"
_FORMAT_VERSION = 1
_SEAL_HEADER_BYTES = 16
_CONTEXT_AD_PREFIX = b"secure-fedora/ckks-secret-context/v1\x00"


class CkksError(ToolkitError):
    """Invalid CKKS input, context, ciphertext or layout (the message names the culprit)."""


class DecryptedValuesError(CkksError):
    """Ciphertexts that load and decrypt, to values no honest computation gives (beyond the
    inputs' limits, or rows that are not one Gram matrix's): the fault is in what was
    encrypted or computed, not in the ciphertexts' form."""


@dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters shared by every party. Defaults: 8192 / [60, 40, 40, 60] / 2^40."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    scale_bits: int = 40

    @property
    def slot_count(self) -> int:
        """Number of complex slots per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The global scale 2^scale_bits."""
        return float(2**self.scale_bits)


DEFAULT_PARAMETERS = CkksParameters()

#: The HE security standard's bound (Albrecht et al., homomorphicencryption.org, 2018; the
#: table SEAL enforces): per security level in bits and ring degree, the most total
#: coefficient-modulus bits that keep that level against classical attacks on a ternary
#: secret (SEAL's secret distribution).
HE_STANDARD_MAX_COEFF_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}

#: What :func:`he_standard_security`'s level assumes, for results and reports.
HE_STANDARD_BASIS = ("HE security standard (homomorphicencryption.org, 2018; classical "
                     "attacks, ternary secret)")


def he_standard_security(poly_modulus_degree: Any, coeff_modulus_bits: Any) -> int | None:
    """The highest security level (128, 192 or 256 bits) the HE standard's table gives a ring
    of ``poly_modulus_degree`` with ``coeff_modulus_bits`` total coefficient-modulus bits;
    None for a degree the table lacks, more bits than its 128-bit bound, or non-integers
    (never a guess)."""
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1
           for v in (poly_modulus_degree, coeff_modulus_bits)):
        return None
    levels = [level for level, bounds in HE_STANDARD_MAX_COEFF_BITS.items()
              if coeff_modulus_bits <= bounds.get(poly_modulus_degree, 0)]
    return max(levels, default=None)


def parameters_text(params: Any) -> str:
    """One encrypted step's CKKS parameters (as :func:`context_parameters` records them in
    results.json) in words, with the security level :func:`he_standard_security` gives its
    ring degree and total coefficient bits (recomputed here, never the level the document
    states; "unknown" where the table gives none)."""
    if not isinstance(params, dict):
        return "parameters not readable in results.json; security level unknown"
    degree, bits = params.get("poly_modulus_degree"), params.get("coeff_mod_bit_sizes")
    if not isinstance(bits, list) or not bits or any(
            isinstance(b, bool) or not isinstance(b, int) for b in bits):
        bits = None
    total = sum(bits) if bits else None
    level = he_standard_security(degree, total)
    scale = _finite_or_none(params.get("global_scale_bits"))
    text = (f"polynomial modulus degree {degree!r}, coefficient modulus "
            + (f"{' + '.join(map(str, bits))} = {total} bits" if bits
               else f"bit sizes {params.get('coeff_mod_bit_sizes')!r}")
            + (f", global scale 2^{scale:g}" if scale is not None
               else f", global scale {params.get('global_scale')!r}") + ": ")
    if level is None:
        text += ("security level unknown (the HE security standard's table gives no level"
                 " for these parameters)")
    else:
        text += f"{level}-bit security per the {HE_STANDARD_BASIS}"
    stated = params.get("security_level")
    derived = "unknown" if level is None else f"{level}-bit"
    if stated is not None and stated != derived:
        text += f" (results.json states {stated!r}, which these parameters do not give)"
    return text


def _finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond float range
        return None
    return number if math.isfinite(number) else None


def parameter_notes(parameters: Any) -> list[str]:
    """The notes on a run's CKKS parameters (results.json ``assumptions.ckks_parameters``:
    encrypted step -> parameters), one per step (:func:`parameters_text`); one note saying
    they are not recorded when there are none. The audit report and sweep.md word them so."""
    if not isinstance(parameters, dict) or not parameters:
        return ["CKKS parameters: not recorded in results.json, so no security level can be"
                " stated for the encryption."]
    return [f"CKKS parameters ({step}): {parameters_text(params)}."
            for step, params in parameters.items()]


def context_parameters(ctx: ts.Context) -> dict[str, Any]:
    """The CKKS parameters ``ctx`` was built with, read from the context itself: ring degree,
    coefficient-modulus bit sizes and their total, the global scale (and its log2) and the
    security level :func:`he_standard_security` gives them ("unknown" when it gives none)."""
    parms = ctx.data.seal_context().key_context_data().parms()
    degree = int(parms.poly_modulus_degree())
    bits = [int(m.bit_count()) for m in parms.coeff_modulus()]
    scale = float(ctx.global_scale)
    level = he_standard_security(degree, sum(bits))
    return {
        "poly_modulus_degree": degree,
        "coeff_mod_bit_sizes": bits,
        "coeff_modulus_bits": sum(bits),
        "global_scale": scale,
        "global_scale_bits": math.log2(scale) if scale > 0 else None,
        "security_level": "unknown" if level is None else f"{level}-bit",
        "security_basis": HE_STANDARD_BASIS,
    }


# --------------------------------------------------------------------------------------
# Contexts and the key ceremony
# --------------------------------------------------------------------------------------


def create_secret_context(
    params: CkksParameters = DEFAULT_PARAMETERS, *, galois_keys: bool = True
) -> ts.Context:
    """Key holder: a fresh CKKS context with secret, public and relinearization keys.

    With ``galois_keys`` (default) it also holds SEAL's default rotation keys (every power of
    two in both directions, plus complex conjugation), needed by :func:`inner_product_rows`.
    """
    if len(params.coeff_mod_bit_sizes) < 3:
        raise CkksError("coeff_mod_bit_sizes needs at least a data prime, one rescale prime and a special prime")
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except ValueError as exc:
        raise CkksError(f"invalid CKKS parameters {params}: {exc}") from exc
    ctx.global_scale = params.scale
    if galois_keys:
        ctx.generate_galois_keys()
    return ctx


def check_context(ctx: ts.Context, params: CkksParameters = DEFAULT_PARAMETERS) -> None:
    """Raise :class:`CkksError` unless ``ctx`` is a CKKS context with exactly ``params``."""
    if not isinstance(ctx, ts.Context):
        raise CkksError(f"expected a tenseal.Context, got {type(ctx).__name__}")
    key_data = ctx.data.seal_context().key_context_data()
    parms = key_data.parms()
    scheme = getattr(parms.scheme(), "name", str(parms.scheme()))
    if scheme != "CKKS":
        raise CkksError(f"context scheme is {scheme}, expected CKKS")
    if parms.poly_modulus_degree() != params.poly_modulus_degree:
        raise CkksError(
            f"context poly_modulus_degree {parms.poly_modulus_degree()} != {params.poly_modulus_degree}"
        )
    bits = tuple(m.bit_count() for m in parms.coeff_modulus())
    if bits != tuple(params.coeff_mod_bit_sizes):
        raise CkksError(f"context coeff_mod_bit_sizes {bits} != {tuple(params.coeff_mod_bit_sizes)}")
    try:
        scale = ctx.global_scale
    except ValueError as exc:
        raise CkksError("context has no global scale set") from exc
    if scale != params.scale:
        raise CkksError(f"context global scale {scale} != 2^{params.scale_bits}")


def public_context_bytes(
    secret_ctx: ts.Context, *, galois_keys: bool, relin_keys: bool = True
) -> bytes:
    """Serialized server context: public key (+ relin keys, + Galois keys if asked), no secret key.

    Raises :class:`CkksError` if Galois/relin keys are requested but absent from ``secret_ctx``.
    """
    check_context(secret_ctx)
    if galois_keys and not secret_ctx.has_galois_keys():
        raise CkksError("secret context has no Galois keys; create it with galois_keys=True")
    if relin_keys and not secret_ctx.has_relin_keys():
        raise CkksError("secret context has no relinearization keys")
    return secret_ctx.serialize(
        save_public_key=True,
        save_secret_key=False,
        save_galois_keys=galois_keys,
        save_relin_keys=relin_keys,
    )


def public_context(
    secret_ctx: ts.Context, *, galois_keys: bool, relin_keys: bool = True
) -> ts.Context:
    """The server's context, parsed from :func:`public_context_bytes`; it holds no secret key."""
    return context_from_bytes(
        public_context_bytes(secret_ctx, galois_keys=galois_keys, relin_keys=relin_keys),
        expect_secret_key=False,
    )


def context_to_bytes(ctx: ts.Context, *, include_secret_key: bool) -> bytes:
    """Serialize ``ctx``. With ``include_secret_key`` only secret + public key (a client bundle);
    without it, public key plus whatever evaluation keys ``ctx`` holds (a server context).
    """
    check_context(ctx)
    if include_secret_key:
        if not ctx.has_secret_key():
            raise CkksError("context holds no secret key to serialize")
        return ctx.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
    return ctx.serialize(
        save_public_key=True,
        save_secret_key=False,
        save_galois_keys=ctx.has_galois_keys(),
        save_relin_keys=ctx.has_relin_keys(),
    )


def context_from_bytes(
    data: bytes, *, expect_secret_key: bool, params: CkksParameters = DEFAULT_PARAMETERS
) -> ts.Context:
    """Load a serialized context and check its parameters and whether it holds a secret key."""
    try:
        ctx = ts.context_from(bytes(data))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CkksError(f"cannot parse CKKS context: {exc}") from exc
    check_context(ctx, params)
    if expect_secret_key and not ctx.has_secret_key():
        raise CkksError("expected a secret context, got a public one")
    if not expect_secret_key and ctx.has_secret_key():
        raise CkksError("expected a public context, but it holds a secret key")
    return ctx


def _context_ad(party_id: str) -> bytes:
    return _CONTEXT_AD_PREFIX + party_id.encode()


def seal_secret_context(
    secret_ctx: ts.Context, recipients: Mapping[str, X25519PublicKey]
) -> dict[str, bytes]:
    """Key ceremony: the secret context (secret + public key only) sealed to each recipient.

    Each blob is bound to its recipient's party id as associated data, so a blob sealed
    for one party cannot be passed off as another's.
    """
    bundle = context_to_bytes(secret_ctx, include_secret_key=True)
    return {party: seal(bundle, pub, _context_ad(party)) for party, pub in recipients.items()}


def open_secret_context(
    blob: bytes,
    agreement_key: X25519PrivateKey,
    party_id: str,
    params: CkksParameters = DEFAULT_PARAMETERS,
) -> ts.Context:
    """Open a blob from :func:`seal_secret_context`; raise :class:`CkksError` if it is not intact."""
    try:
        bundle = open_sealed(blob, agreement_key, _context_ad(party_id))
    except SealingError as exc:
        raise CkksError(f"sealed CKKS context for {party_id!r} cannot be opened: {exc}") from exc
    return context_from_bytes(bundle, expect_secret_key=True, params=params)


# --------------------------------------------------------------------------------------
# Low-level engine (SEAL objects behind a TenSEAL context) and ciphertext I/O
# --------------------------------------------------------------------------------------

_HAS_MEMFD = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextmanager
def _scratch():  # type: ignore[no-untyped-def]
    """A path SEAL can write to and read from, plus a reader/writer (in-memory on Linux)."""
    if _HAS_MEMFD:
        fd = os.memfd_create("secure-fedora-ckks", os.MFD_CLOEXEC)
        try:
            path = f"/proc/self/fd/{fd}"

            def read() -> bytes:
                size = os.fstat(fd).st_size
                return os.pread(fd, size, 0)

            def write(data: bytes) -> None:
                os.ftruncate(fd, 0)
                view = memoryview(data)
                offset = 0
                while offset < len(view):
                    offset += os.pwrite(fd, view[offset:], offset)

            yield path, read, write
        finally:
            os.close(fd)
    else:
        with tempfile.TemporaryDirectory(prefix="secure-fedora-ckks-") as tmp:
            p = Path(tmp) / "blob"

            def read() -> bytes:
                return p.read_bytes()

            def write(data: bytes) -> None:
                p.write_bytes(data)

            yield str(p), read, write


def _save(obj: Any) -> bytes:
    with _scratch() as (path, read, _):
        obj.save(path)
        return read()


class _Engine:
    """SEAL evaluator, encoder and keys of one TenSEAL context (cached per context)."""

    def __init__(self, ctx: ts.Context) -> None:
        check_context(ctx)
        self.ctx = ctx
        self.data = ctx.data
        self.seal = self.data.seal_context()
        self.evaluator = sealapi.Evaluator(self.seal)
        self.encoder = sealapi.CKKSEncoder(self.seal)
        self.slot_count = self.encoder.slot_count()
        self.scale = float(ctx.global_scale)
        first = self.seal.first_context_data()
        self.top_level = first.chain_index()
        self.parms_by_level: dict[int, list[int]] = {}
        self.rescale_prime: dict[int, float] = {}
        cd = first
        while cd is not None:
            self.parms_by_level[cd.chain_index()] = cd.parms_id()
            self.rescale_prime[cd.chain_index()] = float(cd.parms().coeff_modulus()[-1].value())
            cd = cd.next_context_data()
        self._public_encryptor: Any = None
        self._secret_encryptor: Any = None
        self._decryptor: Any = None
        self.lane_masks: dict[tuple[int, int], Any] = {}

    def level_of(self, ct: Any) -> int:
        data = self.seal.get_context_data(ct.parms_id())
        if data is None:
            raise CkksError("ciphertext parameters do not belong to this context")
        return int(data.chain_index())

    def encryptor(self, mode: Encryption) -> Any:
        if mode == "public":
            if not self.ctx.has_public_key():
                raise CkksError("context has no public key for public-key encryption")
            if self._public_encryptor is None:
                self._public_encryptor = sealapi.Encryptor(self.seal, self.data.public_key())
            return self._public_encryptor
        if mode == "symmetric":
            if not self.ctx.has_secret_key():
                raise CkksError(
                    "symmetric encryption needs the secret key; this context is public "
                    "(use encryption='public')"
                )
            if self._secret_encryptor is None:
                self._secret_encryptor = sealapi.Encryptor(self.seal, self.data.secret_key())
            return self._secret_encryptor
        raise CkksError(f"encryption must be 'symmetric' or 'public', got {mode!r}")

    def decryptor(self) -> Any:
        if not self.ctx.has_secret_key():
            raise CkksError("this context holds no secret key and cannot decrypt (public context)")
        if self._decryptor is None:
            self._decryptor = sealapi.Decryptor(self.seal, self.data.secret_key())
        return self._decryptor

    def galois_keys(self) -> Any:
        if not self.ctx.has_galois_keys():
            raise CkksError("context has no Galois keys; the server needs them for rotations")
        return self.data.galois_keys()

    def relin_keys(self) -> Any:
        if not self.ctx.has_relin_keys():
            raise CkksError("context has no relinearization keys")
        return self.data.relin_keys()

    def encode(self, values: np.ndarray | float, level: int, scale: float) -> Any:
        pt = sealapi.Plaintext()
        parms = self.parms_by_level[level]
        if isinstance(values, np.ndarray):
            if np.iscomplexobj(values):
                self.encoder.encode(values.tolist(), parms, scale, pt)
            else:
                self.encoder.encode(values.astype(np.float64).tolist(), parms, scale, pt)
        else:
            self.encoder.encode(float(values), parms, scale, pt)
        return pt

    def encrypt_to_bytes(self, values: np.ndarray, level: int, mode: Encryption) -> bytes:
        """Encrypt one slot vector at ``level`` and scale 2^40; serialized (seeded if symmetric)."""
        pt = self.encode(values, level, self.scale)
        enc = self.encryptor(mode)
        if mode == "symmetric":
            return _save(enc.encrypt_symmetric(pt))
        ct = sealapi.Ciphertext(self.seal)
        enc.encrypt(pt, ct)
        return _save(ct)

    def load(self, data: bytes, what: str) -> Any:
        data = bytes(data)
        # SEAL's header states the object's size (bytes 8-16, little endian) and SEAL reads no
        # further: bytes after it would otherwise be accepted unread.
        if len(data) >= _SEAL_HEADER_BYTES:
            (size,) = struct.unpack("<Q", data[8:_SEAL_HEADER_BYTES])
            if size != len(data):
                raise CkksError(
                    f"{what}: not a valid ciphertext for this context (its header "
                    f"states {size} bytes, it has {len(data)})"
                )
        ct = sealapi.Ciphertext(self.seal)
        try:
            with _scratch() as (path, _, write):
                write(bytes(data))
                ct.load(self.seal, path)
        except Exception as exc:  # SEAL raises std::logic_error/invalid_argument variants
            raise CkksError(f"{what}: not a valid ciphertext for this context ({exc})") from exc
        if ct.size() != 2:
            raise CkksError(f"{what}: ciphertext has {ct.size()} polynomials, expected 2")
        # All-zero polynomials encrypt nothing under any key; SEAL refuses every product with
        # one ("result ciphertext is transparent") deep in a computation, naming no ciphertext.
        if ct.is_transparent():
            raise CkksError(f"{what}: ciphertext is transparent (all zero), not an encryption")
        return ct

    def check(self, ct: Any, level: int, scale: float, what: str) -> None:
        got = self.level_of(ct)
        if got != level:
            raise CkksError(f"{what}: ciphertext at level {got}, expected level {level}")
        # Exactly: SEAL adds only ciphertexts whose scales agree to the last bits, so a scale
        # off in its last bits would pass a looser check and fail inside the server's sums
        # ("scale mismatch"), naming no ciphertext.
        if ct.scale != scale:
            raise CkksError(f"{what}: ciphertext scale {ct.scale!r}, expected {scale!r}")

    def decrypt(self, ct: Any) -> np.ndarray:
        pt = sealapi.Plaintext()
        self.decryptor().decrypt(ct, pt)
        return np.asarray(self.encoder.decode_complex(pt), dtype=np.complex128)

    def new_ciphertext(self) -> Any:
        return sealapi.Ciphertext(self.seal)


_ENGINES: weakref.WeakKeyDictionary[ts.Context, _Engine] = weakref.WeakKeyDictionary()


def _engine(ctx: ts.Context) -> _Engine:
    if not isinstance(ctx, ts.Context):
        raise CkksError(f"expected a tenseal.Context, got {type(ctx).__name__}")
    eng = _ENGINES.get(ctx)
    if eng is None:
        eng = _Engine(ctx)
        _ENGINES[ctx] = eng
    return eng


def _as_numpy(x: Tensor | np.ndarray, what: str, ndim: int) -> np.ndarray:
    if isinstance(x, Tensor):
        if x.is_complex():
            raise CkksError(f"{what} must be real")
        arr = x.detach().to("cpu", torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        if np.iscomplexobj(x):
            raise CkksError(f"{what} must be real")
        arr = x.astype(np.float64)
    else:
        raise CkksError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if arr.ndim != ndim:
        raise CkksError(f"{what} must have {ndim} dimension(s), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise CkksError(f"{what} holds NaN or infinite values")
    return arr


def _check_mode(mode: str) -> None:
    if mode not in ("symmetric", "public"):
        raise CkksError(f"encryption must be 'symmetric' or 'public', got {mode!r}")


# --------------------------------------------------------------------------------------
# Encrypted vectors (propagation)
# --------------------------------------------------------------------------------------


@dataclass
class EncryptedVector:
    """A real vector of ``length`` values packed into consecutive CKKS ciphertexts.

    Holds serialized ciphertexts (``parts``), loaded ciphertexts, or both; each form is
    produced lazily from the other. Ciphertexts never hold more values than slots.
    """

    length: int
    level: int
    parts: list[bytes] | None = field(default=None, repr=False)
    _cts: list[Any] | None = field(default=None, repr=False)

    def check_shape(self, slot_count: int, what: str = "encrypted vector") -> None:
        """Raise :class:`CkksError` unless it holds exactly ceil(length / slot_count) ciphertexts."""
        if self.parts is None and self._cts is None:
            raise CkksError(f"{what} holds no ciphertexts")
        expected = math.ceil(self.length / slot_count) if self.length > 0 else -1
        if self.length < 1 or self.num_ciphertexts != expected:
            raise CkksError(
                f"{what} of length {self.length} holds {self.num_ciphertexts} ciphertexts, "
                f"expected {max(expected, 1)}"
            )

    @property
    def num_ciphertexts(self) -> int:
        """Number of ciphertexts the vector occupies."""
        if self.parts is not None:
            return len(self.parts)
        assert self._cts is not None
        return len(self._cts)

    def ciphertexts(self, ctx: ts.Context) -> list[Any]:
        """The SEAL ciphertexts (loaded and validated against ``ctx`` on first use)."""
        if self._cts is None:
            eng = _engine(ctx)
            assert self.parts is not None
            cts = [eng.load(p, f"encrypted vector part {i}") for i, p in enumerate(self.parts)]
            for i, ct in enumerate(cts):
                eng.check(ct, self.level, eng.scale, f"encrypted vector part {i}")
            self._cts = cts
        return self._cts

    def part_bytes(self) -> list[bytes]:
        """Serialized ciphertexts (cached)."""
        if self.parts is None:
            assert self._cts is not None
            self.parts = [_save(ct) for ct in self._cts]
        return self.parts

    def serialize(self) -> bytes:
        """Wire form: magic, version, length, level, then length-prefixed SEAL ciphertexts."""
        parts = self.part_bytes()
        out = [_VECTOR_MAGIC, struct.pack(">BQBI", _FORMAT_VERSION, self.length, self.level, len(parts))]
        for p in parts:
            out.append(struct.pack(">I", len(p)))
            out.append(p)
        return b"".join(out)

    @property
    def nbytes(self) -> int:
        """Size of :meth:`serialize` output."""
        return 4 + struct.calcsize(">BQBI") + sum(4 + len(p) for p in self.part_bytes())

    @classmethod
    def deserialize(cls, data: bytes, *, slot_count: int = DEFAULT_PARAMETERS.slot_count) -> EncryptedVector:
        """Parse :meth:`serialize` output (ciphertexts are validated when first used)."""
        data = bytes(data)
        head = struct.calcsize(">BQBI")
        if len(data) < 4 + head or not data.startswith(_VECTOR_MAGIC):
            raise CkksError("not a serialized EncryptedVector (bad magic or too short)")
        version, length, level, count = struct.unpack(">BQBI", data[4 : 4 + head])
        if version != _FORMAT_VERSION:
            raise CkksError(f"unsupported EncryptedVector version {version}")
        if length < 1 or count != math.ceil(length / slot_count):
            raise CkksError(f"EncryptedVector of length {length} cannot have {count} ciphertexts")
        parts = _read_parts(data, 4 + head, count, "EncryptedVector")
        return cls(length=length, level=level, parts=parts)


def _read_parts(data: bytes, offset: int, count: int, what: str) -> list[bytes]:
    parts = []
    for i in range(count):
        if offset + 4 > len(data):
            raise CkksError(f"{what} truncated before part {i}")
        (n,) = struct.unpack(">I", data[offset : offset + 4])
        offset += 4
        if offset + n > len(data):
            raise CkksError(f"{what} truncated inside part {i}")
        parts.append(data[offset : offset + n])
        offset += n
    if offset != len(data):
        raise CkksError(f"{what} has {len(data) - offset} trailing bytes")
    return parts


def encrypt_vector(
    ctx: ts.Context,
    values: Tensor,
    *,
    encryption: Encryption = "symmetric",
    rescales: int = 1,
) -> EncryptedVector:
    """Encrypt a 1-D real tensor into ceil(len / 4096) fresh ciphertexts at scale 2^40.

    ``rescales`` is how many rescalings the ciphertexts must still allow (their level):
    1 suffices for :func:`weighted_sums` and keeps ciphertexts at two of the three data
    primes (a third smaller and cheaper than the top level). ``encryption="symmetric"``
    uses the secret key (clients hold it; seeded ciphertexts are half the size, same
    IND-CPA security under RLWE); ``"public"`` uses the public key. Values must be finite
    with |x| <= MAX_ABS_VALUE.
    """
    _check_mode(encryption)
    eng = _engine(ctx)
    if not isinstance(rescales, int) or not 0 <= rescales <= eng.top_level:
        raise CkksError(f"rescales must be an integer in [0, {eng.top_level}], got {rescales!r}")
    arr = _as_numpy(values, "values", 1)
    if arr.size == 0:
        raise CkksError("cannot encrypt an empty vector")
    peak = float(np.abs(arr).max())
    if peak > MAX_ABS_VALUE:
        raise CkksError(f"values reach |x| = {peak:.4g} > MAX_ABS_VALUE = {MAX_ABS_VALUE:g}")
    slots = eng.slot_count
    parts = [
        eng.encrypt_to_bytes(arr[i : i + slots], rescales, encryption)
        for i in range(0, arr.size, slots)
    ]
    return EncryptedVector(length=int(arr.size), level=rescales, parts=parts)


def encrypt_rows(
    ctx: ts.Context,
    matrix: Tensor,
    *,
    encryption: Encryption = "symmetric",
    rescales: int = 1,
) -> list[EncryptedVector]:
    """Encrypt every row of an (N, P) real matrix with :func:`encrypt_vector`."""
    arr = _as_numpy(matrix, "matrix", 2)
    return [
        encrypt_vector(ctx, torch.from_numpy(row), encryption=encryption, rescales=rescales)
        for row in arr
    ]


def weighted_sums(
    public_ctx: ts.Context, enc_rows: Sequence[EncryptedVector], weights: Tensor
) -> list[EncryptedVector]:
    """Server: out_i = sum_j weights[i, j] * enc_rows[j] for every row i of ``weights`` (K, N).

    Needs only the public context (no evaluation keys). Inputs must share one level >= 1;
    each output is one rescale below, at scale exactly 2^40 (weights are encoded at the
    scale of the prime the rescale removes, i.e. quantized to multiples of about 9.1e-13;
    smaller weights count as zero). A row of zero weights yields a fresh public-key
    encryption of zero. Weight rows must have L1 norm <= MAX_WEIGHT_L1.
    """
    eng = _engine(public_ctx)
    w = _as_numpy(weights, "weights", 2)
    if not enc_rows:
        raise CkksError("weighted_sums needs at least one encrypted row")
    if w.shape[1] != len(enc_rows):
        raise CkksError(f"weights have {w.shape[1]} columns for {len(enc_rows)} encrypted rows")
    l1 = np.abs(w).sum(axis=1)
    if (l1 > MAX_WEIGHT_L1).any():
        i = int(np.argmax(l1))
        raise CkksError(f"weight row {i} has L1 norm {l1[i]:.4g} > MAX_WEIGHT_L1 = {MAX_WEIGHT_L1:g}")
    length, level = enc_rows[0].length, enc_rows[0].level
    if level < 1:
        raise CkksError("encrypted rows are at level 0 and cannot be rescaled; encrypt with rescales >= 1")
    for j, row in enumerate(enc_rows):
        row.check_shape(eng.slot_count, f"encrypted row {j}")
        if row.length != length:
            raise CkksError(f"encrypted row {j} has length {row.length}, row 0 has {length}")
        if row.level != level:
            raise CkksError(f"encrypted row {j} is at level {row.level}, row 0 at level {level}")
    cts = [row.ciphertexts(public_ctx) for row in enc_rows]
    n_parts = len(cts[0])
    ev = eng.evaluator
    prime = eng.rescale_prime[level]
    out_level = level - 1
    quantum = 0.5 / prime
    plain_cache: dict[float, Any] = {}
    results: list[EncryptedVector] = []
    for i in range(w.shape[0]):
        terms = []
        for j in range(w.shape[1]):
            wij = float(w[i, j])
            if abs(wij) <= quantum:
                continue
            pt = plain_cache.get(wij)
            if pt is None:
                pt = eng.encode(wij, level, prime)
                plain_cache[wij] = pt
            terms.append((j, pt))
        out_cts = []
        for p in range(n_parts):
            acc = None
            for j, pt in terms:
                tmp = eng.new_ciphertext()
                ev.multiply_plain(cts[j][p], pt, tmp)
                if acc is None:
                    acc = tmp
                else:
                    ev.add_inplace(acc, tmp)
            if acc is None:
                acc = eng.new_ciphertext()
                eng.encryptor("public").encrypt_zero(eng.parms_by_level[out_level], acc)
            else:
                ev.rescale_to_next_inplace(acc)
            acc.scale = eng.scale
            out_cts.append(acc)
        results.append(EncryptedVector(length=length, level=out_level, _cts=out_cts))
    return results


def decrypt_vector(secret_ctx: ts.Context, enc: EncryptedVector) -> Tensor:
    """Decrypt an :class:`EncryptedVector` into a float64 tensor of its length.

    Raises :class:`CkksError` when ``secret_ctx`` holds no secret key (e.g. the server's).
    """
    eng = _engine(secret_ctx)
    eng.decryptor()
    enc.check_shape(eng.slot_count)
    out = np.empty(enc.length, dtype=np.float64)
    slots = eng.slot_count
    for i, ct in enumerate(enc.ciphertexts(secret_ctx)):
        vals = eng.decrypt(ct).real
        n = min(slots, enc.length - i * slots)
        out[i * slots : i * slots + n] = vals[:n]
    check_decrypted(out, MAX_ABS_VALUE * MAX_WEIGHT_L1, "values")
    return torch.from_numpy(out)


def check_decrypted(values: np.ndarray, bound: float, what: str) -> None:
    """CkksError unless the decrypted ``values`` are finite and within ``bound`` (what the
    encrypted inputs' limits allow, plus CKKS noise): a ciphertext under another key, or one
    corrupted in transit, decrypts to values far beyond it, not to an error."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not np.isfinite(values).all() or peak > bound * (1.0 + 1e-6) + 1e-3:
        raise DecryptedValuesError(f"decrypted {what} reach |x| = {peak:.4g}, beyond the {bound:g} that the "
                        "encrypted inputs' limits allow: a ciphertext under another key, or "
                        "corrupted (ciphertexts are not authenticated by CKKS itself)")


# --------------------------------------------------------------------------------------
# Encrypted inner products (relatedness)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InnerProductLayout:
    """Public packing plan for ``num_vectors`` vectors of dimension ``dim`` (see module doc)."""

    num_vectors: int
    dim: int
    slot_count: int
    lanes: int
    positions: int
    chunks: int
    packs: int

    @classmethod
    def plan(
        cls, num_vectors: int, dim: int, slot_count: int = DEFAULT_PARAMETERS.slot_count
    ) -> InnerProductLayout:
        """Lanes = next power of two >= num_vectors; positions = slot_count / lanes."""
        if not isinstance(num_vectors, int) or num_vectors < 1:
            raise CkksError(f"num_vectors must be a positive integer, got {num_vectors!r}")
        if not isinstance(dim, int) or dim < 1:
            raise CkksError(f"dim must be a positive integer, got {dim!r}")
        if slot_count < 1 or slot_count & (slot_count - 1):
            raise CkksError(f"slot_count must be a power of two, got {slot_count}")
        if num_vectors > slot_count:
            raise CkksError(f"at most {slot_count} vectors fit one lane each; got {num_vectors}")
        lanes = 1 << (num_vectors - 1).bit_length()
        positions = slot_count // lanes
        chunks = math.ceil(dim / (2 * positions))
        packs = math.ceil(chunks / lanes)
        return cls(num_vectors, dim, slot_count, lanes, positions, chunks, packs)

    @property
    def ciphertexts_per_vector(self) -> int:
        """Ciphertexts each vector's owner uploads."""
        return self.chunks + self.packs

    def chunk_values(self, vector: np.ndarray) -> np.ndarray:
        """(chunks, positions) complex array: coordinates 2t, 2t+1 -> real, imaginary part."""
        padded = np.zeros(2 * self.positions * self.chunks, dtype=np.float64)
        padded[: self.dim] = vector
        z = padded[0::2] + 1j * padded[1::2]
        return z.reshape(self.chunks, self.positions)


@dataclass(frozen=True)
class InnerProductUpload:
    """What the owner of vector ``index`` sends: ``packs`` compact and ``chunks`` broadcast ciphertexts."""

    index: int
    packed: tuple[bytes, ...]
    broadcast: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of :meth:`serialize` output."""
        return len(self.serialize())

    def serialize(self) -> bytes:
        """Wire form: magic, version, index, counts, then length-prefixed ciphertexts."""
        out = [
            _UPLOAD_MAGIC,
            struct.pack(">BIII", _FORMAT_VERSION, self.index, len(self.packed), len(self.broadcast)),
        ]
        for p in (*self.packed, *self.broadcast):
            out.append(struct.pack(">I", len(p)))
            out.append(p)
        return b"".join(out)

    @classmethod
    def deserialize(cls, data: bytes) -> InnerProductUpload:
        """Parse :meth:`serialize` output (ciphertexts are validated by the server)."""
        data = bytes(data)
        head = struct.calcsize(">BIII")
        if len(data) < 4 + head or not data.startswith(_UPLOAD_MAGIC):
            raise CkksError("not a serialized InnerProductUpload (bad magic or too short)")
        version, index, n_packed, n_broadcast = struct.unpack(">BIII", data[4 : 4 + head])
        if version != _FORMAT_VERSION:
            raise CkksError(f"unsupported InnerProductUpload version {version}")
        parts = _read_parts(data, 4 + head, n_packed + n_broadcast, f"upload of vector {index}")
        return cls(index, tuple(parts[:n_packed]), tuple(parts[n_packed:]))


@dataclass(frozen=True)
class EncryptedRow:
    """Server output for vector ``index``: one ciphertext whose lane g holds <u_index, u_g>."""

    index: int
    data: bytes

    @property
    def nbytes(self) -> int:
        """Bytes of :meth:`serialize` output."""
        return len(self.data) + 4 + struct.calcsize(">BI")

    def serialize(self) -> bytes:
        """Wire form: magic, version, index, SEAL ciphertext."""
        return _ROW_MAGIC + struct.pack(">BI", _FORMAT_VERSION, self.index) + self.data

    @classmethod
    def deserialize(cls, data: bytes) -> EncryptedRow:
        """Parse :meth:`serialize` output."""
        data = bytes(data)
        head = struct.calcsize(">BI")
        if len(data) < 4 + head or not data.startswith(_ROW_MAGIC):
            raise CkksError("not a serialized EncryptedRow (bad magic or too short)")
        version, index = struct.unpack(">BI", data[4 : 4 + head])
        if version != _FORMAT_VERSION:
            raise CkksError(f"unsupported EncryptedRow version {version}")
        return cls(index, data[4 + head :])


def _check_layout(eng: _Engine, layout: InnerProductLayout) -> None:
    if not isinstance(layout, InnerProductLayout):
        raise CkksError(f"expected an InnerProductLayout, got {type(layout).__name__}")
    if layout.slot_count != eng.slot_count:
        raise CkksError(f"layout is for {layout.slot_count} slots, context has {eng.slot_count}")
    if eng.top_level < 2:
        raise CkksError("inner products need two rescales (coeff_mod_bit_sizes with >= 4 primes)")


def encrypt_for_inner_products(
    ctx: ts.Context,
    layout: InnerProductLayout,
    index: int,
    vector: Tensor,
    *,
    encryption: Encryption = "symmetric",
) -> InnerProductUpload:
    """Client: encrypt vector ``index`` of the layout for :func:`inner_product_rows`.

    Produces ``layout.packs`` fresh-level compact ciphertexts and ``layout.chunks`` broadcast
    ciphertexts one level down (smaller and cheaper). The vector must be finite, of length
    ``layout.dim`` and Euclidean norm <= MAX_VECTOR_NORM.
    """
    _check_mode(encryption)
    eng = _engine(ctx)
    _check_layout(eng, layout)
    if not isinstance(index, int) or not 0 <= index < layout.num_vectors:
        raise CkksError(f"vector index {index!r} outside [0, {layout.num_vectors})")
    u = _as_numpy(vector, f"vector {index}", 1)
    if u.size != layout.dim:
        raise CkksError(f"vector {index} has dimension {u.size}, layout expects {layout.dim}")
    norm = float(np.linalg.norm(u))
    if norm > MAX_VECTOR_NORM:
        raise CkksError(f"vector {index} has norm {norm:.4g} > MAX_VECTOR_NORM = {MAX_VECTOR_NORM:g}")
    chunks = layout.chunk_values(u)
    G, c, S = layout.lanes, layout.positions, layout.slot_count
    base = np.arange(c) * G
    packed = []
    for w in range(layout.packs):
        slots = np.zeros(S, dtype=np.complex128)
        for local in range(min(G, layout.chunks - w * G)):
            slots[(base + index + local) % S] = np.conj(chunks[w * G + local])
        packed.append(eng.encrypt_to_bytes(slots, eng.top_level, encryption))
    broadcast = [
        eng.encrypt_to_bytes(np.repeat(chunks[m], G), eng.top_level - 1, encryption)
        for m in range(layout.chunks)
    ]
    return InnerProductUpload(index, tuple(packed), tuple(broadcast))


def check_inner_product_upload(
    public_ctx: ts.Context, layout: InnerProductLayout, upload: InnerProductUpload
) -> None:
    """Server: raise :class:`CkksError` (naming the ciphertext) unless ``upload`` is usable by
    :func:`inner_product_rows` under ``public_ctx``: its vector index lies in the layout, it
    carries the layout's ciphertext counts, and every ciphertext loads for the context and
    sits at the level and scale :func:`encrypt_for_inner_products` produces. The same checks
    :func:`inner_product_rows` applies, for one upload (to find which upload it refused)."""
    eng = _engine(public_ctx)
    _check_layout(eng, layout)
    if not isinstance(upload, InnerProductUpload):
        raise CkksError(f"expected InnerProductUpload, got {type(upload).__name__}")
    v = upload.index
    if not 0 <= v < layout.num_vectors:
        raise CkksError(f"upload for vector {v} outside [0, {layout.num_vectors})")
    if len(upload.packed) != layout.packs or len(upload.broadcast) != layout.chunks:
        raise CkksError(
            f"upload for vector {v} has {len(upload.packed)} packed + {len(upload.broadcast)} "
            f"broadcast ciphertexts, layout expects {layout.packs} + {layout.chunks}"
        )
    for level, kind, blobs in ((eng.top_level, "packed", upload.packed),
                               (eng.top_level - 1, "broadcast", upload.broadcast)):
        for i, blob in enumerate(blobs):
            what = f"{kind} ciphertext {i} of vector {v}"
            eng.check(eng.load(blob, what), level, eng.scale, what)


def _lane_mask(eng: _Engine, layout: InnerProductLayout, lane: int) -> Any:
    key = (layout.lanes, lane)
    pt = eng.lane_masks.get(key)
    if pt is None:
        mask = np.zeros(layout.slot_count, dtype=np.float64)
        mask[np.arange(layout.positions) * layout.lanes + lane] = 0.5
        # Scale = the prime the next rescale removes, so the result keeps scale exactly 2^40.
        pt = eng.encode(mask, eng.top_level, eng.rescale_prime[eng.top_level])
        eng.lane_masks[key] = pt
    return pt


def inner_product_rows(
    public_ctx: ts.Context,
    layout: InnerProductLayout,
    uploads: Sequence[InnerProductUpload],
    rows: Sequence[int] | None = None,
) -> list[EncryptedRow]:
    """Server: encrypted rows of the Gram matrix of all uploaded vectors.

    ``uploads`` must hold exactly one upload per vector index of the layout. ``rows``
    selects the rows to compute (default: all), e.g. only a newly joined vector's row.
    Needs Galois and relinearization keys, never the secret key. Each returned row
    decrypts to <u_row, u_g> in every slot of lane g (0 for lanes >= num_vectors).

    The lane masks' CKKS encodings are off by about 2^-40..2^-36 outside their lane, so values
    a client puts outside its own lanes survive scaled by that and move every row's overlap
    with the vector whose lane they fill, except that vector's own row: the key holder's
    symmetry check (:func:`gram_tolerance`) refuses such a shift, unless it moves both
    <u_a, u_b> and <u_b, u_a> alike.
    """
    eng = _engine(public_ctx)
    _check_layout(eng, layout)
    gk = eng.galois_keys()
    rk = eng.relin_keys()
    by_index: dict[int, InnerProductUpload] = {}
    for up in uploads:
        if not isinstance(up, InnerProductUpload):
            raise CkksError(f"expected InnerProductUpload, got {type(up).__name__}")
        if not 0 <= up.index < layout.num_vectors:
            raise CkksError(f"upload for vector {up.index} outside [0, {layout.num_vectors})")
        if up.index in by_index:
            raise CkksError(f"two uploads for vector {up.index}")
        by_index[up.index] = up
    missing = [v for v in range(layout.num_vectors) if v not in by_index]
    if missing:
        raise CkksError(f"missing uploads for vectors {missing[:10]}{'...' if len(missing) > 10 else ''}")
    wanted = list(range(layout.num_vectors)) if rows is None else list(rows)
    for r in wanted:
        if not isinstance(r, int) or not 0 <= r < layout.num_vectors:
            raise CkksError(f"row {r!r} outside [0, {layout.num_vectors})")

    ev = eng.evaluator
    top = eng.top_level
    G, S = layout.lanes, layout.slot_count
    packed: dict[int, list[Any]] = {}
    for v, up in by_index.items():
        if len(up.packed) != layout.packs or len(up.broadcast) != layout.chunks:
            raise CkksError(
                f"upload for vector {v} has {len(up.packed)} packed + {len(up.broadcast)} broadcast "
                f"ciphertexts, layout expects {layout.packs} + {layout.chunks}"
            )
        cts = [eng.load(p, f"packed ciphertext {i} of vector {v}") for i, p in enumerate(up.packed)]
        for i, ct in enumerate(cts):
            eng.check(ct, top, eng.scale, f"packed ciphertext {i} of vector {v}")
        packed[v] = cts

    # X_m: chunk m of every vector in its own lane (first rescale).
    xs = []
    for m in range(layout.chunks):
        w, local = divmod(m, G)
        acc = None
        for v in range(layout.num_vectors):
            tmp = eng.new_ciphertext()
            ev.multiply_plain(packed[v][w], _lane_mask(eng, layout, (v + local) % G), tmp)
            if acc is None:
                acc = tmp
            else:
                ev.add_inplace(acc, tmp)
        assert acc is not None
        ev.rescale_to_next_inplace(acc)
        acc.scale = eng.scale
        if local:
            rotated = eng.new_ciphertext()
            ev.rotate_vector(acc, local, gk, rotated)
            acc = rotated
        xs.append(acc)
    del packed

    out = []
    for r in wanted:
        up = by_index[r]
        acc = None
        for m, blob in enumerate(up.broadcast):
            b = eng.load(blob, f"broadcast ciphertext {m} of vector {r}")
            eng.check(b, top - 1, eng.scale, f"broadcast ciphertext {m} of vector {r}")
            tmp = eng.new_ciphertext()
            ev.multiply(b, xs[m], tmp)
            if acc is None:
                acc = tmp
            else:
                ev.add_inplace(acc, tmp)
        assert acc is not None
        ev.relinearize_inplace(acc, rk)
        ev.rescale_to_next_inplace(acc)
        conj = eng.new_ciphertext()
        ev.complex_conjugate(acc, gk, conj)
        ev.add_inplace(acc, conj)
        step = G
        while step < S:
            rotated = eng.new_ciphertext()
            ev.rotate_vector(acc, step, gk, rotated)
            ev.add_inplace(acc, rotated)
            step *= 2
        out.append(EncryptedRow(r, _save(acc)))
    return out


def gram_tolerance(norm_a: float, norm_b: float) -> float:
    """How far apart honest decrypted <u_a, u_b> and <u_b, u_a> may be for columns of norms
    ``norm_a`` and ``norm_b``: 2^-16 (1 + |u_a|)(1 + |u_b|), at most
    :data:`GRAM_SYMMETRY_TOLERANCE`. CKKS noise in a row grows at most with the product of
    the norms (measured: up to 2.8e-6 at unit norms, 1e-4 at norms 256), so this bounds it
    with a margin of about 20 at unit norms; it is also how far a client's ciphertexts may move one
    of two honest clients' overlaps unseen (see :func:`inner_product_rows`)."""
    return min(GRAM_SYMMETRY_TOLERANCE,
               _GRAM_NOISE_UNIT * (1.0 + max(norm_a, 0.0)) * (1.0 + max(norm_b, 0.0)))


def _check_gram(values: np.ndarray, indexes: Sequence[int]) -> None:
    """CkksError unless the decrypted rows ``values`` (row ``k`` for vector ``indexes[k]``)
    agree where they overlap as rows of one Gram matrix: <u_a, u_b> = <u_b, u_a> within
    :func:`gram_tolerance` of the norms the rows' own diagonals give, and <u_a, u_a> >= 0
    within :func:`gram_tolerance` (0, 0)."""
    norms = [math.sqrt(max(float(values[k, a]), 0.0)) for k, a in enumerate(indexes)]
    for k, a in enumerate(indexes):
        if values[k, a] < -gram_tolerance(0.0, 0.0):
            raise DecryptedValuesError(
                f"decrypted row {a} gives <u_{a}, u_{a}> = {values[k, a]:.6g} < 0: "
                "not a row of a Gram matrix (replaced, or under another scale)"
            )
        for m in range(k):
            b = indexes[m]
            if abs(values[k, b] - values[m, a]) > gram_tolerance(norms[k], norms[m]):
                raise DecryptedValuesError(
                    f"decrypted rows {a} and {b} disagree on <u_{a}, u_{b}> ({values[k, b]:.6g} "
                    f"vs {values[m, a]:.6g}): not rows of one Gram matrix (a row swapped, "
                    "replaced or computed from other ciphertexts)"
                )


def decrypt_inner_product_rows(
    secret_ctx: ts.Context,
    layout: InnerProductLayout,
    rows: Sequence[EncryptedRow],
    *,
    release_quantum: float | None = 2.0**-16,
) -> Tensor:
    """Key holder: decrypt encrypted rows into a (len(rows), num_vectors) float64 tensor.

    Row i of the result is <u_{rows[i].index}, u_g> for g in [0, num_vectors). Values are
    rounded to multiples of ``release_quantum`` (None: no rounding) before release, a
    heuristic mitigation of key-recovery attacks on CKKS decryptions. Raises
    :class:`CkksError` for a public context, a ciphertext that is not a final row (level and
    scale), values beyond what MAX_VECTOR_NORM allows, and rows that are not rows of one
    symmetric Gram matrix (:data:`GRAM_SYMMETRY_TOLERANCE`).
    """
    eng = _engine(secret_ctx)
    eng.decryptor()
    _check_layout(eng, layout)
    if release_quantum is not None and not release_quantum > 0:
        raise CkksError(f"release_quantum must be positive or None, got {release_quantum!r}")
    out = np.empty((len(rows), layout.num_vectors), dtype=np.float64)
    final_level = eng.top_level - 2
    row_scale = eng.scale * eng.scale / eng.rescale_prime[eng.top_level - 1]
    for i, row in enumerate(rows):
        if not isinstance(row, EncryptedRow):
            raise CkksError(f"expected EncryptedRow, got {type(row).__name__}")
        ct = eng.load(row.data, f"encrypted row {row.index}")
        if eng.level_of(ct) != final_level:
            raise CkksError(f"encrypted row {row.index} is at level {eng.level_of(ct)}, expected {final_level}")
        # a row's scale is 2^80 / (the prime its last rescale removed), as inner_product_rows
        # leaves it: another scale would decode to the inner products times the ratio
        eng.check(ct, final_level, row_scale, f"encrypted row {row.index}")
        vals = eng.decrypt(ct).real
        out[i] = vals[: layout.num_vectors]
    check_decrypted(out, MAX_VECTOR_NORM**2, "inner products")
    _check_gram(out, [row.index for row in rows])
    if release_quantum is not None:
        out = np.round(out / release_quantum) * release_quantum
    return torch.from_numpy(out)
