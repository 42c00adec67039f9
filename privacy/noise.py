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
bytes per output value. Float64 requests are vectorized over whole tensors with torch's
kernels (one keystream call per request). Float32 requests (the DP-SGD hot path, about 0.9 ms
per 118k values on one core) are computed in cache-sized blocks with numpy's vectorized
float32 kernels (log, sqrt, cos and sin within 4 ulp), each block reading its keystream
directly from ChaCha20 streams positioned in the request (no whole-request keystream buffer),
and each finished block is scaled by the std while in cache; ``normal(..., out=...)`` writes
such a request straight into a caller's tensor (DP-SGD's gradient buffer), same values.

Devices: ``normal``, ``uniform`` and ``bernoulli`` take ``device`` (None: the CPU, the paths
above, unchanged). On any other device :class:`CsprngNoise` computes the ChaCha20 keystream
with torch integer ops on that device (int64 lanes holding uint32 words, masked adds and
rotates; byte for byte OpenSSL's keystream under the same key, nonce and stream position,
which it advances exactly as the CPU path does, so the two paths never reuse keystream) and
then the same float32 or float64 sampler in torch: float64 values equal the CPU path's on
the CPU's kernels; float32 values are within a few ulp (the device's log, cos and sin). The
key's words are then held in the device computation's temporary tensors only.
:class:`ReproducibleNoise` seeds a generator on the device for each draw from its CPU
generator, so each device's stream is reproducible but CPU and CUDA streams differ. The
torch keystream path is tested on the CPU (``CsprngNoise._torch_keystream``); no GPU has run it.
"""

from __future__ import annotations

import math
import os
import struct
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


def _np_scratch(name: str, size: int, dtype: type) -> np.ndarray:
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = np.empty(size, dtype=dtype)
        setattr(_SCRATCH, name, buffer)
    return buffer[:size]


def _float32_scratch(groups: int, block: int) -> tuple[np.ndarray, ...]:
    """The float32 sampler's scratch arrays for ``groups`` groups of ``block`` outputs (bits,
    halves, radius, angle, xs, ys: ``groups * block`` each; y_sum: ``block``), looked up once
    per request."""
    key = (groups, block)
    cached = getattr(_SCRATCH, "float32", None)
    if cached is None or cached[0] != key:
        size = groups * block
        cached = _SCRATCH.float32 = (key, (
            _np_scratch("bits", size, np.int64), _np_scratch("halves", size, np.int32),
            _np_scratch("radius", size, np.float32), _np_scratch("angle", size, np.float32),
            _np_scratch("xs", size, np.float32), _np_scratch("ys", size, np.float32),
            _np_scratch("y_sum", block, np.float32)))
    return cached[1]


#: Zero bytes to encrypt (encrypting zeros yields the keystream itself); immutable, shared.
_ZEROS = memoryview(bytes(1 << 20))


#: Cipher contexts a CsprngNoise keeps for re-use (a float32 draw positions at most 3 new ones).
_SPARE_ENCRYPTORS = 3


def _keystream_into(encryptor, out: memoryview) -> None:  # type: ignore[no-untyped-def]
    """Fill ``out`` (bytes) with the encryptor's next ``len(out)`` keystream bytes."""
    for done in range(0, len(out), len(_ZEROS)):
        chunk = out[done:done + len(_ZEROS)]
        encryptor.update_into(_ZEROS[:len(chunk)], chunk)


#: Outputs per block of the float32 sampler: a block's keystream, radii, angles and terms
#: (64 bytes per output, 1 MiB) stay near the core's L2 cache; the keystream is never
#: materialized for the whole request.
_FLOAT32_BLOCK = 16384
_MASK53_NP = np.int64(_MASK53)
_TWO_POW_MINUS_53 = np.float32(2.0 ** -53)
#: 2 pi / 2^32 rounded to float32 (the angle's scale; float32 arithmetic throughout).
_ANGLE_SCALE = np.float32(2.0 * math.pi / 2 ** 32)

#: ChaCha20's constant words ("expand 32-byte k") and the 32-bit mask of the torch keystream.
_CHACHA_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
_M32 = 0xFFFFFFFF
#: ChaCha20 blocks per step of the torch keystream (4 MiB of keystream; bounds device memory).
_TORCH_BLOCKS = 1 << 16


def _rotl32(x: Tensor, n: int) -> Tensor:
    return (x << n).bitwise_and_(_M32).bitwise_or_(x >> (32 - n))


def _quarter_rounds(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, ...]:
    """ChaCha20 quarter rounds on rows (a[i], b[i], c[i], d[i]) of (4, blocks) word tensors."""
    a = a.add_(b).bitwise_and_(_M32)
    d = _rotl32(d.bitwise_xor_(a), 16)
    c = c.add_(d).bitwise_and_(_M32)
    b = _rotl32(b.bitwise_xor_(c), 12)
    a = a.add_(b).bitwise_and_(_M32)
    d = _rotl32(d.bitwise_xor_(a), 8)
    c = c.add_(d).bitwise_and_(_M32)
    b = _rotl32(b.bitwise_xor_(c), 7)
    return a, b, c, d


def _chacha20_torch(key: bytes, nonce_index: int, position: int, out: Tensor) -> None:
    """Fill ``out`` (uint8, on its device) with ChaCha20 keystream bytes ``position`` ..
    ``position + len(out)`` under (``key``, ``nonce_index``), byte for byte the keystream of
    :meth:`CsprngNoise._new_encryptor` (OpenSSL: 32-bit block counter in word 12, 96-bit nonce
    in words 13-15, all words little-endian). Integer torch ops only: int64 lanes hold uint32
    words, each add and rotate masked to 32 bits; the state's four rows of four words are
    processed together (a column round on the rows, a diagonal round on rolled rows)."""
    device, size = out.device, out.numel()
    key_words = struct.unpack("<8I", key)
    nonce_words = struct.unpack("<3I", nonce_index.to_bytes(12, "little"))
    first, end = position // 64, -(-(position + size) // 64)
    done = 0
    for b0 in range(first, end, _TORCH_BLOCKS):
        b1 = min(b0 + _TORCH_BLOCKS, end)
        n = b1 - b0
        init = torch.tensor([*_CHACHA_CONSTANTS, *key_words, 0, *nonce_words],
                            dtype=torch.int64, device=device).view(16, 1).repeat(1, n)
        init[12] = torch.arange(b0, b1, dtype=torch.int64, device=device)
        a, b, c, d = init.clone().view(4, 4, n).unbind(0)
        for _ in range(10):  # 20 rounds: a column round and a diagonal round each
            a, b, c, d = _quarter_rounds(a, b, c, d)
            # Diagonals (0, 5, 10, 15), (1, 6, 11, 12), ...: row i of b, c, d moved by i.
            a, b, c, d = _quarter_rounds(a, b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0))
            b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
        words = torch.cat([a, b, c, d]).add_(init).bitwise_and_(_M32).T  # (n, 16), block order
        # uint32 -> the int32 of the same bits (exact), whose bytes are the keystream bytes.
        words = words - ((words >> 31) << 32)
        stream = words.to(torch.int32).contiguous().view(torch.uint8).reshape(-1)
        lo = position - 64 * b0 if b0 == first else 0
        take = min(stream.numel() - lo, size - done)
        out[done:done + take] = stream[lo:lo + take]
        done += take


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


_CPU = torch.device("cpu")


def _device(device: torch.device | str | None) -> torch.device:
    """``device`` as a usable torch.device (None: the CPU); NoiseError if it is not usable."""
    if device is None or (type(device) is torch.device and device.type == "cpu"):
        return _CPU
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise NoiseError(f"device must be a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r} ({err})") from None
    if dev.type == "cpu":
        return _CPU
    if dev.type == "meta":
        raise NoiseError("device 'meta' holds no values, so noise drawn there would not exist; "
                         "draw on the device that holds the tensor being noised")
    try:
        return torch.empty(0, device=dev).device  # e.g. 'cuda' -> 'cuda:0'
    except (RuntimeError, AssertionError) as err:
        raise NoiseError(f"device {dev} is not usable in this process ({err}); draw on a "
                         "device this machine has, e.g. 'cpu'") from None


@runtime_checkable
class NoiseSource(Protocol):
    """Where a DP mechanism's randomness comes from (one source per client).

    ``kind`` is ``"csprng"`` or ``"reproducible"`` (the ``[privacy] noise`` value).
    """

    kind: str

    def normal(self, shape: Shape, std: float, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
        """I.i.d. N(0, std^2) values of ``shape`` and ``dtype``, drawn on ``device`` (None:
        the CPU)."""
        ...

    def uniform(self, shape: Shape, device: torch.device | str | None = None) -> Tensor:
        """I.i.d. uniform float64 values in [0, 1) of ``shape``, drawn on ``device``."""
        ...

    def bernoulli(self, shape: Shape, p: float, device: torch.device | str | None = None
                  ) -> Tensor:
        """I.i.d. bool values of ``shape``, each True with probability ``p``, on ``device``."""
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
        #: Cipher contexts a float32 draw has finished with, kept (with the key they were made
        #: under) to be re-positioned by ``reset_nonce`` instead of built anew; only ever used
        #: under that same key (see :meth:`_new_encryptor`).
        self._spare: tuple[bytes, list] = (self._key, [])  # type: ignore[type-arg]
        self._encryptor = self._new_encryptor()
        #: Compute the keystream with torch on the CPU too (what a non-CPU device always does);
        #: the values are the same keystream, so this only tests the device path on a CPU.
        self._torch_keystream = False

    def __repr__(self) -> str:
        return "CsprngNoise(ChaCha20, key from os.urandom, not shown)"

    def __getstate__(self) -> None:
        raise TypeError("CsprngNoise cannot be pickled: its key must never leave memory")

    def _new_encryptor(self, position: int = 0):  # type: ignore[no-untyped-def]
        """A keystream under the current nonce, starting ``position`` bytes in."""
        # 16-byte nonce = 4-byte little-endian block counter + 12-byte nonce; a fresh key
        # per object, so the nonce only has to be unique under this key.
        nonce = (position // 64).to_bytes(4, "little") + self._nonce_index.to_bytes(12, "little")
        key, spare = self._spare
        if spare and key is self._key:
            # A context under this very key, moved to the new nonce and block counter (the same
            # keystream as a new context; it also drops any partial block it had buffered).
            encryptor = spare.pop()
            encryptor.reset_nonce(nonce)
        else:
            encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        if position % 64:
            encryptor.update(bytes(position % 64))
        return encryptor

    def _next_nonce_if_spent(self) -> None:
        if self._bytes_under_nonce >= _BYTES_PER_NONCE:
            self._nonce_index += 1
            self._bytes_under_nonce = 0
            self._encryptor = self._new_encryptor()

    def _use_torch(self, device: torch.device) -> bool:
        return device.type != "cpu" or self._torch_keystream

    def _torch_stream(self, size: int, device: torch.device) -> Tensor:
        """The next ``size`` keystream bytes (uint8 on ``device``), computed with torch
        (:func:`_chacha20_torch`); the nonce and stream position move exactly as
        :meth:`_words` moves them, so the numpy path continues after these bytes."""
        out = torch.empty(size, dtype=torch.uint8, device=device)
        done = 0
        while done < size:
            self._next_nonce_if_spent()
            take = min(size - done, _BYTES_PER_NONCE - self._bytes_under_nonce)
            _chacha20_torch(self._key, self._nonce_index, self._bytes_under_nonce,
                            out[done:done + take])
            done += take
            self._bytes_under_nonce += take
        if size:
            self._encryptor = self._new_encryptor(self._bytes_under_nonce)
        return out

    def _words(self, count: int, device: torch.device | None = None) -> Tensor:
        """``count`` uniformly random 64-bit words (int64 view) from the keystream.

        On the CPU (numpy path) the result is a view of a per-thread buffer reused by the next
        call: consume it first. On the torch path it is a new tensor on ``device``.
        """
        if device is not None and self._use_torch(device):
            return self._torch_stream(8 * count, device).view(torch.int64)
        buffer = getattr(_SCRATCH, "words", None)
        if buffer is None or buffer.size < count:
            buffer = _SCRATCH.words = np.empty(max(count, 1 << 16), dtype=np.int64)
        out = buffer[:count]
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            self._next_nonce_if_spent()
            take = min(len(view) - done, _BYTES_PER_NONCE - self._bytes_under_nonce)
            _keystream_into(self._encryptor, view[done:done + take])
            done += take
            self._bytes_under_nonce += take
        return torch.from_numpy(out)

    def _uniform53(self, count: int, device: torch.device | None = None) -> Tensor:
        """``count`` uniform float64 values in [0, 1): 53 random bits each, times 2^-53."""
        return self._words(count, device).bitwise_and_(_MASK53).to(torch.float64).mul_(2.0 ** -53)

    def _standard_normal(self, count: int, dtype: torch.dtype,
                         device: torch.device | None = None) -> Tensor:
        """``count`` N(0, 1) values: (sum of ``GAUSSIAN_TERMS`` independent Box-Muller normals)
        / sqrt(GAUSSIAN_TERMS).

        The radius ``sqrt(-2 log(1 - u1))`` (which sets the tail) always comes from a 53-bit
        uniform, so no term is cut below 8.5 sigma. For float64 output the angle is a 53-bit
        uniform too and everything is float64; for float32 (or narrower) output ``1 - u1`` is
        rounded to float32 (relative error 2^-24, magnitude kept down to 2^-53), the angle is a
        32-bit uniform rounded to float32 and the math and the sum are float32, as Opacus's
        secure mode samples in the output dtype (:meth:`_standard_normal_float32`).
        """
        if count < 2:  # the composition below needs at least two columns
            return self._standard_normal(2, dtype, device)[:count]
        device = device if device is not None else torch.device("cpu")
        if dtype != torch.float64:
            if self._use_torch(device):
                return self._standard_normal_float32_torch(count, device)
            return torch.from_numpy(self._standard_normal_float32(count))
        c = count
        groups = GAUSSIAN_TERMS // 2  # Box-Muller pairs per output, each giving a cos and a sin
        pairs = groups * c
        # radius * sqrt(1 / GAUSSIAN_TERMS) = sqrt(-2 log(1 - u1) / GAUSSIAN_TERMS): the factor
        # 2 / GAUSSIAN_TERMS (1 or 1/2) is exact, so the scaling of the sum adds no rounding.
        log_factor = -2.0 / GAUSSIAN_TERMS
        u = self._uniform53(2 * pairs, device)
        # 1 - u1 in (0, 1]: the log is finite.
        radius = u[:pairs].neg_().log1p_().mul_(log_factor).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi)
        xs = torch.empty(pairs, dtype=torch.float64, device=device)
        ys = torch.empty(pairs, dtype=torch.float64, device=device)
        # Pair i gives X_i = r_i cos a_i and Y_i = r_i sin a_i (independent normals). Output j
        # sums X over pairs j, j + c, ... and Y over pairs j', j' + c, ... with
        # j' = (j + 1) mod c: GAUSSIAN_TERMS normals from as many different pairs, i.e.
        # independent draws (as Opacus's separate torch.normal calls). Summation order: the X
        # terms, then the Y terms, then the two partial sums.
        torch.cos(angle, out=xs).mul_(radius)
        torch.sin(angle, out=ys).mul_(radius)
        out = torch.empty(c, dtype=torch.float64, device=device)
        if groups == 1:
            torch.add(xs[:c - 1], ys[1:], out=out[:c - 1])
            torch.add(xs[c - 1:], ys[:1], out=out[c - 1:])
            return out
        y_columns = torch.empty(c, dtype=torch.float64, device=device)
        torch.add(xs[:c], xs[c:], out=out)
        torch.add(ys[:c], ys[c:], out=y_columns)
        out[:c - 1] += y_columns[1:]
        out[c - 1:] += y_columns[:1]
        return out

    def _standard_normal_float32(self, c: int, out: np.ndarray | None = None,
                                 scale: float = 1.0) -> np.ndarray:
        """``c >= 2`` float32 N(0, 1) values, the float32 case of :meth:`_standard_normal`,
        times ``float32(scale)`` (one float32 multiply per value, as torch's ``mul_`` by a
        Python float), written into ``out`` (float32, ``c`` contiguous values) or a new array.

        Keystream layout of one request (as the float64 case, with 32-bit angles): a 64-bit
        word per Box-Muller pair (radius: ``1 - u1 = (b + 1) 2^-53`` for its low 53 bits
        ``b``), then a 32-bit half-word per pair (angle: the signed word times 2 pi / 2^32);
        ``groups = GAUSSIAN_TERMS / 2`` pairs per output, pair ``g c + j`` in group ``g``.
        Output ``j`` is ``sum_g X[g c + j] + sum_g Y[g c + (j + 1) mod c]`` (X = r cos a,
        Y = r sin a), summed in that order in float32.

        Computed in blocks of :data:`_FLOAT32_BLOCK` outputs with numpy's vectorized float32
        log, sqrt, cos and sin. When the request lies under one nonce (always, but for one
        request per 2^36 keystream bytes) each group's radius words and angles are read as
        their own sequential keystream (ChaCha20 seeks to any 64-byte block), so no buffer
        holds the whole request's keystream; otherwise the keystream is materialized first
        (:meth:`_words`, which changes the nonce mid-request) and read by the same blocks.
        Both give the same values. Each output is scaled as soon as its sum is complete (the
        block's values are still in cache), so a scaled request takes no extra pass.
        """
        groups = GAUSSIAN_TERMS // 2
        pairs = groups * c
        radius_bytes, angle_bytes = 8 * pairs, 8 * ((pairs + 1) // 2)
        log_factor = np.float32(-2.0 / GAUSSIAN_TERMS)
        self._next_nonce_if_spent()
        start = self._bytes_under_nonce
        block = _FLOAT32_BLOCK
        # Per block, group g's radius words and angles sit at [g n, (g + 1) n) of these.
        bits, halves, radius, angle, xs, ys, y_sum = _float32_scratch(groups, block)
        streamed = start + radius_bytes + angle_bytes <= _BYTES_PER_NONCE
        if streamed:
            radius_streams = [self._encryptor] + [self._new_encryptor(start + 8 * g * c)
                                                  for g in range(1, groups)]
            angle_streams = [self._new_encryptor(start + radius_bytes + 4 * g * c)
                             for g in range(groups)]
        else:
            words = self._words(pairs + (pairs + 1) // 2).numpy()
            all_halves = words[pairs:].view(np.int32)
        if out is None:
            out = np.empty(c, dtype=np.float32)
        factor = np.float32(scale) if scale != 1.0 else None
        first_y = np.float32(0.0)
        # Every block but the last has n = block outputs: its views (and the byte views the
        # keystream is written into) are made once per request, not once per block.
        shape_n = -1
        for j0 in range(0, c, block):
            j1 = min(j0 + block, c)
            n = j1 - j0
            if n != shape_n:
                shape_n, m = n, groups * n
                b, h, r, a, x, y = bits[:m], halves[:m], radius[:m], angle[:m], xs[:m], ys[:m]
                b_parts = [b[g * n:(g + 1) * n] for g in range(groups)]
                h_parts = [h[g * n:(g + 1) * n] for g in range(groups)]
                x0, x1, y0, y1, y_part = x[:n], x[n:], y[:n], y[n:], y_sum[:n]
                if streamed:
                    fills = [(stream, memoryview(part).cast("B"))
                             for streams, parts in ((radius_streams, b_parts),
                                                    (angle_streams, h_parts))
                             for stream, part in zip(streams, parts, strict=True)]
                    fills = [(stream, _ZEROS[:len(view)] if len(view) <= len(_ZEROS) else None,
                              view) for stream, view in fills]
            if streamed:
                # Keystream order within a block is immaterial: each stream is its own.
                for stream, zeros, view in fills:
                    if zeros is None:
                        _keystream_into(stream, view)
                    else:
                        stream.update_into(zeros, view)
            else:
                for g in range(groups):
                    b_parts[g][:] = words[g * c + j0:g * c + j1]
                    h_parts[g][:] = all_halves[g * c + j0:g * c + j1]
            b &= _MASK53_NP
            b += 1
            np.copyto(r, b, casting="unsafe")  # 1 - u1 rounded to float32
            r *= _TWO_POW_MINUS_53  # exact
            np.log(r, out=r)
            r *= log_factor  # exact (-1 or -1/2)
            np.sqrt(r, out=r)
            np.copyto(a, h, casting="unsafe")  # rounded to float32
            a *= _ANGLE_SCALE
            np.cos(a, out=x)
            x *= r
            np.sin(a, out=y)
            y *= r
            if groups == 1:
                out[j0:j1] = x
                y_block = y
            else:
                np.add(x0, x1, out=out[j0:j1])
                y_block = y_part
                np.add(y0, y1, out=y_block)
            # out[j] = X[j] + Y[(j + 1) mod c]: Y's first value waits for the last output.
            if j0 == 0:
                first_y = y_block[0]
                done = out[:j1 - 1]
                done += y_block[1:]
            else:
                done = out[j0 - 1:j1 - 1]
                done += y_block
            if factor is not None:
                done *= factor
        out[c - 1] += first_y
        if factor is not None:
            out[c - 1:] *= factor
        if streamed:
            last = angle_streams[-1]
            if angle_bytes > 4 * pairs:  # the unused half of the last angle word
                last.update(bytes(angle_bytes - 4 * pairs))
            self._encryptor = last
            self._bytes_under_nonce = start + radius_bytes + angle_bytes
            self._retire(radius_streams + angle_streams[:-1])
        return out

    def _retire(self, encryptors: list) -> None:  # type: ignore[type-arg]
        """Keep ``encryptors`` (made under the current key, no longer read) for
        :meth:`_new_encryptor` to re-position, where the cipher context can be re-positioned."""
        if not hasattr(encryptors[0], "reset_nonce"):  # cryptography < 43
            return
        key, spare = self._spare
        if key is not self._key:
            spare = []
            self._spare = (self._key, spare)
        spare.extend(encryptors[:_SPARE_ENCRYPTORS - len(spare)])

    def _standard_normal_float32_torch(self, c: int, device: torch.device) -> Tensor:
        """:meth:`_standard_normal_float32` computed with torch on ``device``: the same
        keystream bytes (:meth:`_torch_stream`), layout, float32 roundings and summation order;
        only log, sqrt, cos and sin are the device's float32 kernels (a few ulp apart)."""
        groups = GAUSSIAN_TERMS // 2
        pairs = groups * c
        stream = self._torch_stream(8 * pairs + 8 * ((pairs + 1) // 2), device)
        words = stream[:8 * pairs].view(torch.int64)
        halves = stream[8 * pairs:12 * pairs].view(torch.int32)
        # 1 - u1 = (b + 1) 2^-53 rounded to float32; the scalings by powers of two are exact.
        r = words.bitwise_and(_MASK53).add_(1).to(torch.float32).mul_(2.0 ** -53)
        r = r.log_().mul_(-2.0 / GAUSSIAN_TERMS).sqrt_()
        a = halves.to(torch.float32).mul_(float(_ANGLE_SCALE))
        x = torch.cos(a).mul_(r).view(groups, c)
        y = torch.sin(a).mul_(r).view(groups, c)
        if groups == 1:
            return x[0].add(y[0].roll(-1))
        out = x[0].add(x[1])
        return out.add_(y[0].add(y[1]).roll(-1))  # out[j] += Y[(j + 1) mod c]

    def normal(self, shape: Shape, std: float, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, *, out: Tensor | None = None
               ) -> Tensor:
        """I.i.d. N(0, std^2), floating-point hardened (``GAUSSIAN_TERMS``-term sum), in
        ``dtype`` on ``device`` (None: the CPU). Off the CPU the keystream and the sampler run
        in torch on that device; the key is never copied anywhere but into the keystream
        computation's temporaries.

        ``out`` (optional): a tensor of exactly this shape, dtype and device that receives the
        values (and is returned); the values are the same as without it. A float32 CPU request
        is then written straight into it (no temporary)."""
        dims, std = _shape(shape), _std(std)
        if not dtype.is_floating_point:
            raise NoiseError(f"dtype must be a floating-point dtype, got {dtype}")
        dev = _device(device)
        count = math.prod(dims)
        if out is not None:
            if not isinstance(out, Tensor) or tuple(out.shape) != dims or out.dtype != dtype \
                    or out.device != dev:
                got = (f"{tuple(out.shape)} {out.dtype} on {out.device}"
                       if isinstance(out, Tensor) else type(out).__name__)
                raise NoiseError(f"out must be a tensor of shape {dims}, dtype {dtype} on {dev};"
                                 f" got {got}")
            if out.requires_grad:
                raise NoiseError("out must not require grad (noise is written into it in place);"
                                 " pass a .grad buffer or a detached tensor")
        if dtype == torch.float32 and count >= 2 and not self._use_torch(dev):
            if out is not None and out.is_contiguous():
                self._standard_normal_float32(count, out.numpy().reshape(-1), std)
                return out
            values = torch.from_numpy(self._standard_normal_float32(count, scale=std))
        else:
            values = self._standard_normal(count, dtype, dev).mul_(std)
        values = values.reshape(dims).to(dtype)
        return values if out is None else out.copy_(values)

    def uniform(self, shape: Shape, device: torch.device | str | None = None) -> Tensor:
        """I.i.d. uniform float64 in [0, 1) on the 2^-53 grid, on ``device``."""
        dims = _shape(shape)
        return self._uniform53(math.prod(dims), _device(device)).reshape(dims)

    def bernoulli(self, shape: Shape, p: float, device: torch.device | str | None = None
                  ) -> Tensor:
        """I.i.d. Bernoulli(p) (``uniform < p``: exact for p on the 2^-53 grid), on ``device``."""
        p = _probability(p)
        return self.uniform(shape, device) < p

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
        self._key, self._nonce_index, self._bytes_under_nonce = key, nonce_index, offset
        self._spare = (key, [])  # the old key's contexts are dropped, never re-used
        self._encryptor = self._new_encryptor(offset)  # ChaCha20 seeks to the position

    def rekey(self) -> None:
        """Continue with a fresh key from ``os.urandom`` (fresh randomness after re-made releases)."""
        self._key = os.urandom(32)
        self._nonce_index = 0
        self._bytes_under_nonce = 0
        self._spare = (self._key, [])  # the old key's contexts are dropped, never re-used
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
    against anyone who knows the seed (e.g. from the config). Plain ``torch.randn`` sampling.

    On the CPU every draw comes from one CPU generator (``self.generator``). A draw on another
    device comes from a generator on that device, seeded for that draw with the next 63-bit
    value of the CPU generator: the CPU generator's state is still the whole state (so
    checkpoints and journals stay exact), and each device's stream is reproducible on that
    device, but the CPU and CUDA streams of one seed differ (other generators, other values).
    """

    kind = "reproducible"

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise NoiseError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        #: Draw on the CPU as a device draws (a per-draw generator): tests the device path.
        self._device_generators = False

    def __repr__(self) -> str:
        return f"ReproducibleNoise(seed={self.seed})"

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu" and not self._device_generators:
            return self.generator
        seed = int(torch.randint(0, 2 ** 63 - 1, (), generator=self.generator))
        return torch.Generator(device=device).manual_seed(seed)

    def normal(self, shape: Shape, std: float, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
        """I.i.d. N(0, std^2) from the seeded generator, on ``device`` (None: the CPU)."""
        dims, std = _shape(shape), _std(std)
        dev = _device(device)
        return torch.randn(dims, generator=self._generator(dev), dtype=dtype, device=dev) * std

    def uniform(self, shape: Shape, device: torch.device | str | None = None) -> Tensor:
        """I.i.d. uniform float64 in [0, 1) from the seeded generator, on ``device``."""
        dims, dev = _shape(shape), _device(device)
        return torch.rand(dims, generator=self._generator(dev), dtype=torch.float64, device=dev)

    def bernoulli(self, shape: Shape, p: float, device: torch.device | str | None = None
                  ) -> Tensor:
        """I.i.d. Bernoulli(p) as ``uniform < p``, on ``device``."""
        p = _probability(p)
        return self.uniform(shape, device) < p

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


#: The toolkit's own sources: every instance has all of NoiseSource's members (class-level).
_OWN_SOURCES = (CsprngNoise, ReproducibleNoise)


def is_noise_source(obj: object) -> bool:
    """``isinstance(obj, NoiseSource)``, answered without the runtime Protocol check (tens of
    microseconds, on every draw) for an instance of exactly CsprngNoise or ReproducibleNoise."""
    return type(obj) in _OWN_SOURCES or isinstance(obj, NoiseSource)
