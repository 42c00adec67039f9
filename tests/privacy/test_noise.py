"""Noise sources: CSPRNG keystream Gaussians and Bernoullis, reproducible generators, refusals."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from privacy.noise import (
    CsprngNoise,
    NoiseError,
    NoiseSource,
    ReproducibleNoise,
    is_noise_source,
    make_noise_source,
    reproducible_noise_seed,
)
from tests.pinned_support import assert_pinned


@pytest.mark.parametrize("terms", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csprng_gaussian_has_the_right_mean_variance_and_tails(dtype, terms, monkeypatch):
    import privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "GAUSSIAN_TERMS", terms)
    n, std = 400_000, 2.5
    x = CsprngNoise().normal((n,), std, dtype)
    assert x.dtype == dtype and x.shape == (n,)
    z = x.double() / std
    # Fixed tolerances, about 5 standard errors: mean se 1/sqrt(n) = 0.0016, variance se
    # sqrt(2/n) = 0.0022, fourth moment (3 for a Gaussian) se sqrt(96/n) = 0.015.
    assert abs(float(z.mean())) < 0.008
    assert abs(float(z.var()) - 1.0) < 0.011
    assert abs(float((z**4).mean()) - 3.0) < 0.08
    # Tail mass beyond 3 sigma: 2 * 0.0013499 = 0.0026998 (se 8e-5).
    assert abs(float((z.abs() > 3).double().mean()) - 0.0026998) < 0.0004
    # Neighbouring outputs share Box-Muller pairs (one's cosine, the other's sine), which are
    # independent: no correlation (se 1/sqrt(n) = 0.0016), also across the wrap-around. A shift
    # of n/2 would count each product twice (se sqrt(2/n) = 0.0022, so 0.008 is only 3.6 se):
    # the far shift is n/3, whose n products are all different pairs.
    for shift in (1, n // 3, n - 1):
        assert abs(float((z * z.roll(shift)).mean())) < 0.008
    small = CsprngNoise().normal((1,), std, dtype)
    assert small.shape == (1,) and bool(torch.isfinite(small).all())


def test_csprng_uniform_and_bernoulli_rates():
    noise = CsprngNoise()
    u = noise.uniform(200_000)
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.004  # se 0.00065
    for p in (0.01, 0.25, 0.9):
        b = noise.bernoulli((400, 500), p)
        assert b.dtype == torch.bool and b.shape == (400, 500)
        se = math.sqrt(p * (1 - p) / b.numel())
        assert abs(float(b.double().mean()) - p) < 5 * se
    assert not noise.bernoulli(1000, 0.0).any() and noise.bernoulli(1000, 1.0).all()


def test_two_csprng_sources_differ_and_keys_are_fresh_and_hidden():
    a, b = CsprngNoise(), CsprngNoise()
    assert a._key != b._key and len(a._key) == 32
    assert not torch.equal(a.normal(100, 1.0), b.normal(100, 1.0))
    assert a._key.hex() not in repr(a)
    assert a.checkpoint_state() is None
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(a)
    with pytest.raises(NoiseError, match="fresh key"):
        a.restore_state(torch.zeros(3))


def test_csprng_stream_moves_to_a_new_nonce_before_the_counter_wraps(monkeypatch):
    import privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "_BYTES_PER_NONCE", 64 * 4)
    noise = CsprngNoise()
    words = noise._words(200).clone()  # 1600 bytes: 7 nonces
    assert noise._nonce_index == 6
    assert len(set(words.tolist())) == 200  # no block repeats across nonces


def test_reproducible_source_repeats_and_continues_from_its_state():
    a = ReproducibleNoise(7)
    b = ReproducibleNoise(7)
    assert torch.equal(a.normal((3, 4), 1.5), b.normal((3, 4), 1.5))
    state = a.checkpoint_state()
    expected = a.uniform(10)
    c = ReproducibleNoise(7)
    c.restore_state(state)
    assert torch.equal(c.uniform(10), expected)
    assert not torch.equal(ReproducibleNoise(8).uniform(10), ReproducibleNoise(7).uniform(10))


def test_make_noise_source_and_the_public_seed():
    assert isinstance(make_noise_source("csprng", 0, 1), CsprngNoise)
    r = make_noise_source("reproducible", 3, 2)
    assert isinstance(r, ReproducibleNoise) and r.seed == reproducible_noise_seed(3, 2)
    assert reproducible_noise_seed(3, 2) != 3 * 1_000_003 + 2 + 1  # not the training order
    assert isinstance(r, NoiseSource) and isinstance(CsprngNoise(), NoiseSource)
    assert not isinstance(torch.Generator(), NoiseSource)
    with pytest.raises(NoiseError, match="noise mode"):
        make_noise_source("os_random", 0, 0)


class _Duck:
    """A source of another library: all of NoiseSource's members, no toolkit base class."""

    kind = "reproducible"

    def normal(self, shape, std, dtype=torch.float32, device=None):
        return torch.zeros(shape, dtype=dtype)

    def uniform(self, shape, device=None):
        return torch.zeros(shape, dtype=torch.float64)

    def bernoulli(self, shape, p, device=None):
        return torch.zeros(shape, dtype=torch.bool)

    def checkpoint_state(self):
        return None

    def restore_state(self, state):
        return None


class _NoNormal(ReproducibleNoise):
    normal = None  # a subclass that drops a member: not a NoiseSource


class _NoBernoulli(_Duck):
    bernoulli = None


def test_is_noise_source_answers_as_the_protocol_check():
    for obj in (CsprngNoise(), ReproducibleNoise(1), _Duck(), _NoNormal(1), _NoBernoulli(),
                torch.Generator(), None, "csprng", CsprngNoise):
        assert is_noise_source(obj) == isinstance(obj, NoiseSource), obj
    assert is_noise_source(CsprngNoise()) and is_noise_source(_Duck())
    assert not is_noise_source(_NoBernoulli()) and not is_noise_source(_NoNormal(1))


@pytest.mark.parametrize("source", [CsprngNoise(), ReproducibleNoise(0)])
def test_bad_arguments_are_refused_by_name(source):
    with pytest.raises(NoiseError, match="std"):
        source.normal(3, -1.0)
    with pytest.raises(NoiseError, match="std"):
        source.normal(3, float("nan"))
    with pytest.raises(NoiseError, match="shape"):
        source.normal((2, -1), 1.0)
    with pytest.raises(NoiseError, match="probability"):
        source.bernoulli(3, 1.5)
    assert source.normal((), 1.0).shape == ()
    assert source.normal(0, 1.0).numel() == 0


# A fixed key and stream position (key bytes 0..31, nonce 3, 1000 bytes in), set through the
# journal-state hook. The float64 Gaussians, uniforms, Bernoullis and stream positions are
# pinned to the values of the implementation before the float32 sampler was optimized (commit
# 0fe2956); its float32 Gaussians are pinned to today's values and, value by value, to the
# formula (test_csprng_float32_values_follow_the_formula_from_the_keystream).
_PINNED_STATE = bytes(range(32)) + (3).to_bytes(12, "little") + (1000).to_bytes(8, "little") \
    + b"CSv1"


def _pinned_draws(noise: CsprngNoise) -> list[torch.Tensor]:
    draws = [noise.normal(c, 1.0) for c in (1, 2, 3, 31, 32, 33, 1000, 118_282)]
    draws += [noise.normal((), 2.0, torch.float64), noise.normal((7, 9), 0.5, torch.float64),
              noise.normal(4097, 3.0, torch.float64), noise.uniform(1000),
              noise.bernoulli(999, 0.25), noise.normal((10, 12), 1.5, torch.float32)]
    return draws


def _digest(tensors: list[torch.Tensor]) -> str:
    import hashlib

    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()


@pytest.mark.parametrize(("terms", "before", "float32_now", "first_four_before", "stream_end"), [
    (4, "8f6283a942f8f88a516924a4b3d970775567edfd3690cd0f46f5ec3ff6cd3ee2",
     "e1249553a8abf5dff95f4dcfc3d7dc710b32243ff9bf0fdc2268ad6d4999d82e",
     [-1.4375110864639282, 1.029707670211792, 0.3020610511302948, -1.5446252822875977],
     "030000000000000000000000380e2e0000000000"),
    (2, "777672f118d41d8bf9b9a8f466bf3bdf0ec494f9af15312ce5064ebd90645086",
     "7117e96d950bff85d9e3e2a30a3a707ea8c75eae9ccc9b2913bbb579aaf6bd90",
     [0.9927789568901062, 0.07640325278043747, -0.779568612575531, -0.6990242600440979],
     "0300000000000000000000005828170000000000"),
])
def test_csprng_values_for_a_fixed_key_are_pinned(terms, before, float32_now, first_four_before,
                                                  stream_end, monkeypatch):
    import privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "GAUSSIAN_TERMS", terms)
    noise = CsprngNoise()
    noise.restore_journal_state(_PINNED_STATE)
    draws = _pinned_draws(noise)
    assert_pinned(_digest([d for d in draws if d.dtype != torch.float32]), before)
    assert_pinned(_digest([d for d in draws if d.dtype == torch.float32]), float32_now)
    # The float32 values moved by at most a few float32 ulps (other rounding, same formula).
    assert torch.allclose(draws[6][:4].double(), torch.tensor(first_four_before,
                                                              dtype=torch.float64),
                          rtol=0, atol=1e-6)
    # The stream position after the draws (bytes consumed) is unchanged too.
    assert noise.journal_state()[32:52].hex() == stream_end


def test_csprng_values_across_nonce_changes_are_pinned(monkeypatch):
    import privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "_BYTES_PER_NONCE", 4096)
    noise = CsprngNoise()
    noise.restore_journal_state(_PINNED_STATE)
    draws = [noise.normal(3000, 1.0), noise.uniform(333), noise.normal(100, 1.0, torch.float64)]
    assert_pinned(_digest(draws[:1]), "aa158b9613d3feedf3f6c6ee3ba581817fa4c068ae2a6bdfe7cb01f46d38f0c2")
    assert_pinned(_digest(draws[1:]), "20f4b87f754b4b654bcb02f620a0406f32fe44007f48db41aa09139aeec1252c")
    assert noise.journal_state()[32:52].hex() == "1600000000000000000000001004000000000000"


def _keystream(key: bytes, nonce_index: int, offset: int, size: int,
               bytes_per_nonce: int) -> tuple[bytes, int, int]:
    """``size`` ChaCha20 keystream bytes from ``offset`` under nonce ``nonce_index``, moving to
    the next nonce every ``bytes_per_nonce`` bytes (computed here, independently of the
    class), and the (nonce, offset) position after them."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    out = b""
    while len(out) < size:
        if offset >= bytes_per_nonce:
            nonce_index, offset = nonce_index + 1, 0
        nonce = b"\x00" * 4 + nonce_index.to_bytes(12, "little")
        stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        take = min(size - len(out), bytes_per_nonce - offset)
        out += stream.update(bytes(offset + take))[offset:]
        offset += take
    return out, nonce_index, offset


@pytest.mark.parametrize("terms", [4, 2])
@pytest.mark.parametrize(("bytes_per_nonce", "block"), [(1 << 36, 16384), (1 << 36, 7),
                                                        (50_000, 1000)])
def test_csprng_float32_values_follow_the_formula_from_the_keystream(terms, bytes_per_nonce,
                                                                     block, monkeypatch):
    """Each float32 output equals the documented formula evaluated exactly (float64) on the
    float32-rounded radius argument and angle read from the keystream, within float32
    rounding: blocks, streams positioned mid-request and nonce changes mid-request included."""
    import numpy as np

    import privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "GAUSSIAN_TERMS", terms)
    monkeypatch.setattr(noise_module, "_BYTES_PER_NONCE", bytes_per_nonce)
    monkeypatch.setattr(noise_module, "_FLOAT32_BLOCK", block)
    noise = CsprngNoise()
    noise.restore_journal_state(_PINNED_STATE)
    nonce_index, offset = 3, 1000
    for c in (2, 3, 1001, 40_000):
        values = noise.normal(c, 1.0).double().numpy()
        groups = terms // 2
        pairs = groups * c
        size = 8 * pairs + 8 * ((pairs + 1) // 2)
        stream, nonce_index, offset = _keystream(bytes(range(32)), nonce_index, offset, size,
                                                 bytes_per_nonce)
        words = np.frombuffer(stream, dtype=np.int64)
        one_minus_u1 = ((words[:pairs] & ((1 << 53) - 1)) + 1).astype(np.float32) \
            * np.float32(2.0 ** -53)
        angle = words[pairs:].view(np.int32)[:pairs].astype(np.float32) \
            * np.float32(2 * np.pi / 2**32)
        radius = np.sqrt(-2.0 / terms * np.log(one_minus_u1.astype(np.float64)))
        x = (radius * np.cos(angle.astype(np.float64))).reshape(groups, c)
        y = np.roll((radius * np.sin(angle.astype(np.float64))).reshape(groups, c), -1, axis=1)
        exact = x.sum(0) + y.sum(0)
        scale = np.abs(x).sum(0) + np.abs(y).sum(0)
        assert np.all(np.abs(values - exact) <= 2.0**-20 * scale + 1e-30), c
    state = noise.journal_state()
    assert (int.from_bytes(state[32:44], "little"), int.from_bytes(state[44:52], "little")) \
        == (nonce_index, offset)


def test_csprng_float32_gaussians_pass_a_kolmogorov_smirnov_test():
    """10^6 float32 draws under the fixed key against N(0, 1): the KS distance is below the
    0.1% critical value (1.95 / sqrt(n)); deterministic, as the key is fixed."""
    import numpy as np
    from scipy import stats

    noise = CsprngNoise()
    noise.restore_journal_state(_PINNED_STATE)
    values = np.concatenate([noise.normal(250_000, 1.0).double().numpy() for _ in range(4)])
    result = stats.kstest(values, "norm")
    assert result.statistic < 1.95 / np.sqrt(values.size), result


def test_csprng_words_equal_the_chacha20_keystream_across_zero_chunks():
    """A request larger than the 1 MiB zero source is the plain keystream, in order."""
    noise = CsprngNoise()
    noise.restore_journal_state(_PINNED_STATE)
    words = noise._words(300_000).clone()  # 2.4 MB
    stream, _, _ = _keystream(bytes(range(32)), 3, 1000, 8 * 300_000, 1 << 36)
    assert words.numpy().tobytes() == stream
