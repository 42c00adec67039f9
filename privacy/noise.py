"""Noise sources for every DP mechanism: a CSPRNG (the default) or a reproducible PRNG.

A mechanism draws all of its randomness — Gaussian noise and Poisson sampling — from one
:class:`NoiseSource`, a deliberately small interface (``normal``, ``uniform``, ``bernoulli``,
plus checkpoint hooks). Two implementations:

- :class:`CsprngNoise` (``[privacy] noise = "csprng"``): a ChaCha20 keystream (the
  ``cryptography`` package, i.e. OpenSSL) under a 256-bit key from ``os.urandom``. The key
  lives only in this object's memory: it is never derived from the config, never logged and
  never checkpointed (:meth:`CsprngNoise.checkpoint_state` returns ``None``), so nobody —
  including a server that knows the whole config — can predict or replay the noise. A
  process that restarts draws a fresh key: fresh, independent noise is exactly what the DP
  analysis assumes for every release, so the accounting (which counts every release, before
  and after the restart) still holds.
- :class:`ReproducibleNoise` (``[privacy] noise = "reproducible"``): a ``torch.Generator``
  seeded from the experiment seed and the client index, so two runs of one config repeat
  exactly. **Not private against anyone who knows the config**: such a party replays every
  draw and subtracts the noise (``secure-fedora audit replay`` demonstrates it). Its state
  may be checkpointed: it is derivable from the config anyway.

Gaussian sampling under :class:`CsprngNoise` (floating-point attacks): a textbook
floating-point Gaussian sampler leaves gaps and irregular spacing in the set of values it can
output, and an attacker who sees ``value + noise`` can sometimes tell which value could have
produced the observed float (Mironov, CCS 2012; for Gaussians, Jin et al., IEEE S&P 2022).
As Opacus's ``secure_mode`` does (after Holohan & Braghin, "Secure random sampling in
differential privacy", ESORICS 2021), every output is the sum of ``GAUSSIAN_TERMS`` = 4
independent standard normals divided by two — again exactly N(0, 1) — which fills the gaps of a
single sampler so that the attack's advantage vanishes in practice. Each standard normal comes
from the Box-Muller transform; the radius ``sqrt(-2 log(1 - u1))``, which sets the tails,
always comes from a 53-bit uniform (the low 53 bits of a keystream word), so no term is cut
below 8.5 sigma. Float64 output: all math in float64 with a 53-bit angle. Float32 output
(DP-SGD gradients): ``1 - u1`` rounded to float32 (which keeps its magnitude down to 2^-53),
a 32-bit angle rounded to float32 (float32's full resolution), math and sum in float32, as
Opacus samples in the output dtype. The normals of an output come from different Box-Muller
pairs, so they are independent draws. Cost: 24 (float32) or 32 (float64) keystream
bytes per output value; everything is vectorized over whole tensors (one keystream call per
request, reused scratch buffers).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import Tensor

from privacy.errors import ToolkitError

__all__ = [
    "NOISE_MODES",
    "REPRODUCIBLE_WARNING",
    "CsprngNoise",
    "NoiseError",
    "NoiseSource",
    "ReproducibleNoise",
    "make_noise_source",
    "reproducible_noise_seed",
]

#: The values of ``[privacy] noise``.
NOISE_MODES = ("csprng", "reproducible")

#: How every output of a run with reproducible noise is flagged (plan, results, ledger, report).
REPRODUCIBLE_WARNING = ("not private against anyone who knows the config: the noise is seeded "
                        "from the experiment seed and can be replayed")

#: Independent standard normals summed per output Gaussian (the sum is scaled by
#: 1/sqrt(GAUSSIAN_TERMS) exactly, inside the radius' square root). 4 is Opacus secure_mode's
#: count (2n draws with n = 2, Holohan & Braghin); 2 (n = 1) halves the cost. Must be 2 or 4.
GAUSSIAN_TERMS = 4

#: Keystream bytes under one (key, nonce): ChaCha20's 32-bit block counter allows 2^32 blocks
#: of 64 bytes; a fresh nonce is taken well before that.
_BYTES_PER_NONCE = 1 << 36

_MASK53 = (1 << 53) - 1

Shape = int | tuple[int, ...] | torch.Size


#: Per-thread scratch buffers of CsprngNoise (shared by all sources of a thread, so that a
#: federation of many clients does not hold one set per client; contents never outlive a call).
_SCRATCH = threading.local()
_JOURNAL_STATE_TAG = b"CSv1"


def _scratch(name: str, size: int, dtype: torch.dtype) -> Tensor:
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = torch.empty(size, dtype=dtype)
        setattr(_SCRATCH, name, buffer)
    return buffer[:size]


class NoiseError(ToolkitError, ValueError):
    """Bad argument to a noise source; the message names it."""


def _shape(shape: Shape) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise NoiseError(f"shape must be non-negative ints, got {shape!r}")
    return dims


def _std(std: float) -> float:
    if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) \
            or std < 0:
        raise NoiseError(f"std must be a finite number >= 0, got {std!r}")
    return float(std)


def _probability(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not (0 <= p <= 1):
        raise NoiseError(f"p must be a probability in [0, 1], got {p!r}")
    return float(p)


@runtime_checkable
class NoiseSource(Protocol):
    """Where a DP mechanism's randomness comes from (one source per client).

    ``kind`` is ``"csprng"`` or ``"reproducible"`` (the ``[privacy] noise`` value).
    """

    kind: str

    def normal(self, shape: Shape, std: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """I.i.d. N(0, std^2) values of ``shape`` and ``dtype`` (CPU)."""
        ...

    def uniform(self, shape: Shape) -> Tensor:
        """I.i.d. uniform float64 values in [0, 1) of ``shape``."""
        ...

    def bernoulli(self, shape: Shape, p: float) -> Tensor:
        """I.i.d. bool values of ``shape``, each True with probability ``p``."""
        ...

    def checkpoint_state(self) -> Tensor | None:
        """What a checkpoint may store to continue this stream, or None (store nothing)."""
        ...

    def restore_state(self, state: Tensor | None) -> None:
        """Continue from :meth:`checkpoint_state`'s value (None: keep the current stream)."""
        ...


class CsprngNoise:
    """ChaCha20 keystream noise with a 256-bit key from ``os.urandom`` (see the module doc).

    Guarantees: every value is computed from keystream bytes no one else can predict; the key
    is never exposed through any public attribute, ``repr`` or checkpoint. Not thread-safe.
    """

    kind = "csprng"

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._nonce_index = 0
        self._bytes_under_nonce = 0
        self._encryptor = self._new_encryptor()

    def __repr__(self) -> str:
        return "CsprngNoise(ChaCha20, key from os.urandom, not shown)"

    def __getstate__(self) -> None:
        raise TypeError("CsprngNoise cannot be pickled: its key must never leave memory")

    def _new_encryptor(self):  # type: ignore[no-untyped-def]
        # 16-byte nonce = 4-byte little-endian block counter (0) + 12-byte nonce; a fresh key
        # per object, so the nonce only has to be unique under this key.
        nonce = b"\x00" * 4 + self._nonce_index.to_bytes(12, "little")
        return Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()

    def _words(self, count: int) -> Tensor:
        """``count`` uniformly random 64-bit words (int64 view) from the keystream.

        The result is a view of a per-thread buffer reused by the next call: consume it first.
        """
        buffer = getattr(_SCRATCH, "words", None)
        if buffer is None or buffer.size < count:
            size = max(count, 1 << 16)
            buffer = _SCRATCH.words = np.empty(size, dtype=np.int64)
            # Encrypting zeros yields the keystream itself; a zero source kept beside the output
            # buffer saves zeroing the output before every request.
            _SCRATCH.zeros = bytes(8 * size)
        out = buffer[:count]
        view = memoryview(out).cast("B")
        zeros = memoryview(_SCRATCH.zeros)
        done = 0
        while done < len(view):
            if self._bytes_under_nonce >= _BYTES_PER_NONCE:
                self._nonce_index += 1
                self._bytes_under_nonce = 0
                self._encryptor = self._new_encryptor()
            take = min(len(view) - done, _BYTES_PER_NONCE - self._bytes_under_nonce)
            self._encryptor.update_into(zeros[:take], view[done:done + take])
            done += take
            self._bytes_under_nonce += take
        return torch.from_numpy(out)

    def _uniform53(self, count: int) -> Tensor:
        """``count`` uniform float64 values in [0, 1): 53 random bits each, times 2^-53."""
        return self._words(count).bitwise_and_(_MASK53).to(torch.float64).mul_(2.0 ** -53)

    def _standard_normal(self, count: int, dtype: torch.dtype) -> Tensor:
        """``count`` N(0, 1) values: (sum of ``GAUSSIAN_TERMS`` independent Box-Muller normals)
        / sqrt(GAUSSIAN_TERMS).

        The radius ``sqrt(-2 log(1 - u1))`` (which sets the tail) always comes from a 53-bit
        uniform, so no term is cut below 8.5 sigma. For float64 output the angle is a 53-bit
        uniform too and everything is float64; for float32 (or narrower) output ``1 - u1`` is
        rounded to float32 (relative error 2^-24, magnitude kept down to 2^-53), the angle is a
        32-bit uniform rounded to float32 and the math and the sum are float32, as Opacus's
        secure mode samples in the output dtype.
        """
        if count < 2:  # the composition below needs at least two columns
            return self._standard_normal(2, dtype)[:count]
        c = count
        groups = GAUSSIAN_TERMS // 2  # Box-Muller pairs per output, each giving a cos and a sin
        pairs = groups * c
        # radius * sqrt(1 / GAUSSIAN_TERMS) = sqrt(-2 log(1 - u1) / GAUSSIAN_TERMS): the factor
        # 2 / GAUSSIAN_TERMS (1 or 1/2) is exact, so the scaling of the sum adds no rounding.
        log_factor = -2.0 / GAUSSIAN_TERMS
        if dtype == torch.float64:
            u = self._uniform53(2 * pairs)
            # 1 - u1 in (0, 1]: the log is finite.
            radius = u[:pairs].neg_().log1p_().mul_(log_factor).sqrt_()
            angle = u[pairs:].mul_(2.0 * math.pi)
            xs, ys = torch.empty(pairs, dtype=torch.float64), torch.empty(pairs, dtype=torch.float64)
        else:
            # 1 - u1 = (b + 1) 2^-53 for a 53-bit b, rounded to float32 keeps its magnitude down
            # to 2^-53 (relative error 2^-24), so the tail reaches 8.5 sigma per term. The
            # angle is a signed 32-bit word times 2 pi / 2^32 rounded to float32: the uniform
            # on [-pi, pi) at float32's resolution. One keystream call (a 64-bit word per
            # radius, a 32-bit half-word per angle); intermediates in reused scratch buffers.
            words = self._words(pairs + (pairs + 1) // 2)
            radius = _scratch("radius", pairs, torch.float32)
            # int64 -> float32 conversion and the exact power-of-two scaling in one pass.
            torch.mul(words[:pairs].bitwise_and_(_MASK53).add_(1), 2.0 ** -53, out=radius)
            radius.log_().mul_(log_factor).sqrt_()
            angle = _scratch("angle", pairs, torch.float32)
            torch.mul(words[pairs:].view(torch.int32)[:pairs], 2.0 * math.pi / 2 ** 32, out=angle)
            xs, ys = _scratch("cos", pairs, torch.float32), _scratch("sin", pairs, torch.float32)
        # Pair i gives X_i = r_i cos a_i and Y_i = r_i sin a_i (independent normals). Output j
        # sums X over pairs j, j + c, ... and Y over pairs j', j' + c, ... with
        # j' = (j + 1) mod c: GAUSSIAN_TERMS normals from as many different pairs, i.e.
        # independent draws (as Opacus's separate torch.normal calls). Summation order: the X
        # terms, then the Y terms, then the two partial sums.
        torch.cos(angle, out=xs).mul_(radius)
        torch.sin(angle, out=ys).mul_(radius)
        out = torch.empty(c, dtype=xs.dtype)
        if groups == 1:
            torch.add(xs[:c - 1], ys[1:], out=out[:c - 1])
            torch.add(xs[c - 1:], ys[:1], out=out[c - 1:])
            return out
        y_columns = _scratch(f"y_columns_{xs.dtype}", c, xs.dtype)
        torch.add(xs[:c], xs[c:], out=out)
        torch.add(ys[:c], ys[c:], out=y_columns)
        out[:c - 1] += y_columns[1:]
        out[c - 1:] += y_columns[:1]
        return out

    def normal(self, shape: Shape, std: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """I.i.d. N(0, std^2), floating-point hardened (``GAUSSIAN_TERMS``-term sum), in ``dtype``."""
        dims, std = _shape(shape), _std(std)
        if not dtype.is_floating_point:
            raise NoiseError(f"dtype must be a floating-point dtype, got {dtype}")
        values = self._standard_normal(math.prod(dims), dtype).mul_(std)
        return values.reshape(dims).to(dtype)

    def uniform(self, shape: Shape) -> Tensor:
        """I.i.d. uniform float64 in [0, 1) on the 2^-53 grid."""
        dims = _shape(shape)
        return self._uniform53(math.prod(dims)).reshape(dims)

    def bernoulli(self, shape: Shape, p: float) -> Tensor:
        """I.i.d. Bernoulli(p) (``uniform < p``: exact for p on the 2^-53 grid)."""
        p = _probability(p)
        return self.uniform(shape) < p

    def checkpoint_state(self) -> None:
        """Always None: the key and stream position are never written in a checkpoint."""
        return None

    def journal_state(self) -> bytes:
        """Key and stream position (56 bytes), for the client's release journal only, which
        seals every record to the client's own key (:mod:`privacy.journal`) so that an
        interrupted release can be re-made identically on resume. Never write it in clear."""
        return (self._key + self._nonce_index.to_bytes(12, "little")
                + self._bytes_under_nonce.to_bytes(8, "little") + _JOURNAL_STATE_TAG)

    def restore_journal_state(self, state: bytes) -> None:
        """Continue exactly from a :meth:`journal_state` value (re-making a journaled release)."""
        if (not isinstance(state, (bytes, bytearray)) or len(state) != 56
                or bytes(state[52:]) != _JOURNAL_STATE_TAG):
            raise NoiseError("not a CSPRNG journal state (it was written by another noise source)")
        key, nonce_index = bytes(state[:32]), int.from_bytes(state[32:44], "little")
        offset = int.from_bytes(state[44:52], "little")
        if offset > _BYTES_PER_NONCE:
            raise NoiseError(f"CSPRNG journal state has an impossible stream position {offset}")
        self._key, self._nonce_index, self._bytes_under_nonce = key, nonce_index, 0
        self._encryptor = self._new_encryptor()
        skip = bytearray(min(offset, 1 << 20))
        while self._bytes_under_nonce < offset:
            take = min(len(skip), offset - self._bytes_under_nonce)
            self._encryptor.update_into(memoryview(skip)[:take], memoryview(skip)[:take])
            self._bytes_under_nonce += take

    def rekey(self) -> None:
        """Continue with a fresh key from ``os.urandom`` (fresh randomness after re-made releases)."""
        self._key = os.urandom(32)
        self._nonce_index = 0
        self._bytes_under_nonce = 0
        self._encryptor = self._new_encryptor()

    def restore_state(self, state: Tensor | None) -> None:
        """Refuses any state: a CSPRNG stream is never restored (a resume uses a fresh key)."""
        if state is not None:
            raise NoiseError("a CSPRNG noise source has no restorable state (a resume draws a"
                             " fresh key); this checkpoint was written in reproducible mode")


def reproducible_noise_seed(experiment_seed: int, client: int) -> int:
    """Seed of client ``client``'s reproducible noise generator: a public function of the config.

    Distinct from the client's training-order generator (``seed * 1_000_003 + client + 1``)
    so the two streams are not the same numbers. Anyone who knows the config can compute it.
    """
    if isinstance(experiment_seed, bool) or not isinstance(experiment_seed, int):
        raise NoiseError(f"experiment_seed must be an int, got {experiment_seed!r}")
    if isinstance(client, bool) or not isinstance(client, int) or client < 0:
        raise NoiseError(f"client must be an int >= 0, got {client!r}")
    return ((experiment_seed * 1_000_003 + client + 1) ^ 0x5EED_0F_D0_15E) & 0xFFFF_FFFF_FFFF_FFFF


class ReproducibleNoise:
    """Noise from a ``torch.Generator`` seeded with ``seed``: repeatable, **not private**
    against anyone who knows the seed (e.g. from the config). Plain ``torch.randn`` sampling."""

    kind = "reproducible"

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise NoiseError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __repr__(self) -> str:
        return f"ReproducibleNoise(seed={self.seed})"

    def normal(self, shape: Shape, std: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """I.i.d. N(0, std^2) from the seeded generator."""
        dims, std = _shape(shape), _std(std)
        return torch.randn(dims, generator=self.generator, dtype=dtype) * std

    def uniform(self, shape: Shape) -> Tensor:
        """I.i.d. uniform float64 in [0, 1) from the seeded generator."""
        return torch.rand(_shape(shape), generator=self.generator, dtype=torch.float64)

    def bernoulli(self, shape: Shape, p: float) -> Tensor:
        """I.i.d. Bernoulli(p) as ``uniform < p``."""
        p = _probability(p)
        return self.uniform(shape) < p

    def checkpoint_state(self) -> Tensor:
        """The generator state (derivable from the config, so storing it reveals nothing new)."""
        return self.generator.get_state()

    def restore_state(self, state: Tensor | None) -> None:
        """Continue the stream from a :meth:`checkpoint_state` value (None: keep as is)."""
        if state is None:
            return
        if not isinstance(state, Tensor):
            raise NoiseError(f"generator state must be a tensor, got {type(state).__name__}")
        self.generator.set_state(state)


def make_noise_source(mode: str, experiment_seed: int, client: int) -> NoiseSource:
    """Client ``client``'s noise source for ``[privacy] noise = mode``.

    ``"csprng"``: a fresh :class:`CsprngNoise` (the seed is not used at all);
    ``"reproducible"``: :class:`ReproducibleNoise` seeded by :func:`reproducible_noise_seed`.
    """
    if mode == "csprng":
        return CsprngNoise()
    if mode == "reproducible":
        return ReproducibleNoise(reproducible_noise_seed(experiment_seed, client))
    raise NoiseError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")
