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
    make_noise_source,
    reproducible_noise_seed,
)


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
    # independent: no correlation (se 1/sqrt(n) = 0.0016), also across the wrap-around.
    for shift in (1, n // 2, n - 1):
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
# journal-state hook; the digests below were produced by the implementation before it was
# optimized (commit 0fe2956), so any change to the values drawn from a given keystream fails.
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


@pytest.mark.parametrize(("terms", "digest", "third_of_three", "stream_end"), [
    (4, "b69e5abe0a8dd2713a7555a66d9b7e4d6945392ea92066ec07633c0baeaaa789",
     -1.4814479351043701, "030000000000000000000000380e2e0000000000"),
    (2, "b04b75c80b94676fb5958ec626f47830b6fbfc64e301406a65fd27e5c82b45d5",
     0.40932536125183105, "0300000000000000000000005828170000000000"),
])
def test_csprng_values_for_a_fixed_key_are_pinned(terms, digest, third_of_three, stream_end,
                                                  monkeypatch):
    import privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "GAUSSIAN_TERMS", terms)
    noise = CsprngNoise()
    noise.restore_journal_state(_PINNED_STATE)
    draws = _pinned_draws(noise)
    assert float(draws[2][2]) == third_of_three
    assert _digest(draws) == digest
    # The stream position after the draws (bytes consumed) is pinned too.
    assert noise.journal_state()[32:52].hex() == stream_end


def test_csprng_values_across_nonce_changes_are_pinned(monkeypatch):
    import privacy.noise as noise_module

    monkeypatch.setattr(noise_module, "_BYTES_PER_NONCE", 4096)
    noise = CsprngNoise()
    noise.restore_journal_state(_PINNED_STATE)
    draws = [noise.normal(3000, 1.0), noise.uniform(333), noise.normal(100, 1.0, torch.float64)]
    assert _digest(draws) == "b74a33748bbc948cc31157d402a4db21e00962570670de666505518199a43da0"
    assert noise.journal_state()[32:52].hex() == "1600000000000000000000001004000000000000"
