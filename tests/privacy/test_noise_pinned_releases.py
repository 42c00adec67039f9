"""CsprngNoise's released values, pinned bit for bit: for one key, nonce and stream position
every draw (float32 and float64 Gaussians of odd sizes and across the float32 sampler's block
boundaries, uniforms, Bernoullis; the numpy path and the torch/device path; a request that
crosses a nonce change) and the stream position after it must stay exactly these. Speed work
on the sampler may change how the values are computed, never which values are released."""

from __future__ import annotations

import hashlib

import pytest
import torch

import privacy.noise as noise_module
from privacy.noise import CsprngNoise
from tests.pinned_support import assert_pinned

_KEY = bytes(range(100, 132))


def _state(nonce: int, offset: int) -> bytes:
    return _KEY + nonce.to_bytes(12, "little") + offset.to_bytes(8, "little") + b"CSv1"


def _digest(noise: CsprngNoise, draws: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in draws:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    h.update(noise.journal_state()[32:52])  # the stream position after the draws
    return h.hexdigest()


def _draws(noise: CsprngNoise, device: str | None) -> list[torch.Tensor]:
    block = noise_module._FLOAT32_BLOCK
    sizes = (1, 2, 3, 5, 63, 1001, block - 1, block, block + 1, 3 * block + 7)
    draws = [noise.normal(c, 1.0, device=device) for c in sizes]
    draws += [noise.normal((10, 13), 0.37, torch.float32, device),
              noise.normal((), 2.0, torch.float64, device),
              noise.normal(3, 1.0, torch.float64, device),
              noise.normal((7, 9), 0.5, torch.float64, device),
              noise.uniform(1001, device), noise.bernoulli(999, 0.3, device),
              noise.normal(4097, 3.0, torch.float64, device)]
    return draws


# Digests of the implementation before the DP-round speed work (privacy/noise.py of 62fb842).
_NUMPY_PATH = {
    (3, 1000): "d80d41bd3e3692961cfa5f9f22e7da290e6f064dca789e0b7f0d37f8b16b00fb",
    (0, 0): "5ccd690f93e5ad66468f817467b6cbd114dcdfd7ad99b20fdd666a0386bd72fd",
    (5, 37): "f8602c761f0f831cec315bfe21869c78de78682bc2a5a22031c2a232da4662ac",
}
_TORCH_PATH = "361caabd6b98a4b1a7c236b2d69b0b3066daa06ed6ad27bfb9b7045d423b01a7"


@pytest.mark.parametrize(("nonce", "offset"), sorted(_NUMPY_PATH))
def test_numpy_path_releases_are_pinned_bit_for_bit(nonce, offset):
    noise = CsprngNoise()
    noise.restore_journal_state(_state(nonce, offset))
    assert_pinned(_digest(noise, _draws(noise, None)), _NUMPY_PATH[(nonce, offset)])


def test_a_dp_sgd_sized_float32_request_is_pinned():
    noise = CsprngNoise()
    noise.restore_journal_state(_state(1, 100))
    first = noise.normal(118_282, 0.25)
    second = noise.normal(118_282, 0.25)
    assert_pinned(_digest(noise, [first, second]),
                  "df94c2a0f87c496ad5819242c7727895021c2472972df74ade3c9a1a6e6592f9")


def test_device_path_releases_are_pinned_bit_for_bit():
    # The path every non-CPU device takes (torch keystream and sampler), run on the CPU.
    noise = CsprngNoise()
    noise.restore_journal_state(_state(3, 1000))
    noise._torch_keystream = True
    draws = [noise.normal(c, 1.0) for c in (1, 3, 1001, 16385)]
    draws += [noise.normal(5, 1.0, torch.float64), noise.uniform(77), noise.bernoulli(33, 0.5)]
    assert_pinned(_digest(noise, draws), _TORCH_PATH)


def test_a_float32_request_across_a_nonce_change_is_pinned(monkeypatch):
    # A request that does not fit under its nonce is materialized first (the other branch).
    monkeypatch.setattr(noise_module, "_BYTES_PER_NONCE", 1 << 16)
    noise = CsprngNoise()
    noise.restore_journal_state(_state(2, (1 << 16) - 5000))
    draws = [noise.normal(3001, 1.0), noise.normal(20_001, 1.0), noise.normal(5, 1.0)]
    assert_pinned(_digest(noise, draws),
                  "c8729513db30d37e875433958722571f6322a85ec2524480b3ff0c35bb2fa455")


@pytest.mark.parametrize("torch_path", [False, True])
@pytest.mark.parametrize("std", [1.0, 0.0137, 1 / 3, 7.25])
def test_normal_into_out_releases_the_same_values_as_a_new_tensor(std, torch_path):
    block = noise_module._FLOAT32_BLOCK
    drawn, written = CsprngNoise(), CsprngNoise()
    for source in (drawn, written):
        source.restore_journal_state(_state(4, 999))
        source._torch_keystream = torch_path
    for shape in ((2,), (block + 3,), (9, 11)):
        expected = drawn.normal(shape, std)
        out = torch.full(shape, float("nan"))
        assert written.normal(shape, std, out=out) is out
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
        # Scaling by std is torch's float32 multiply of the N(0, 1) values, bit for bit.
        assert written.journal_state() == drawn.journal_state()
    # A non-contiguous out (every other column of a matrix) gets the same values too.
    expected = drawn.normal((4, 5), std)
    holder = torch.zeros(4, 10)
    assert torch.equal(written.normal((4, 5), std, out=holder[:, ::2]), expected)
    assert float(holder[:, 1::2].abs().sum()) == 0.0


def test_normal_scales_the_unit_draw_with_torch_s_float32_multiply():
    unit, scaled = CsprngNoise(), CsprngNoise()
    for source in (unit, scaled):
        source.restore_journal_state(_state(6, 64))
    for std in (0.0137, 1 / 3, 1e-3 * 7.1, 2.5):
        expected = unit.normal(40_001, 1.0).mul_(std)
        assert torch.equal(scaled.normal(40_001, std).view(torch.int32),
                           expected.view(torch.int32))


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(4, dtype=torch.float64),
                                 torch.zeros(4, requires_grad=True), [0.0] * 4])
def test_a_wrong_out_is_refused_and_no_keystream_is_spent(bad):
    noise = CsprngNoise()
    noise.restore_journal_state(_state(3, 1000))
    before = noise.journal_state()
    with pytest.raises(noise_module.NoiseError, match="out must"):
        noise.normal(4, 1.0, out=bad)
    assert noise.journal_state() == before


def test_a_source_that_drew_under_another_key_releases_the_pinned_values():
    # A source re-uses the cipher contexts of its earlier draws: after a key change (a restored
    # journal state, a rekey) only contexts under the new key may be used.
    noise = CsprngNoise()
    for c in (5, 70_001, 3):  # draws under the source's own key leave contexts behind
        noise.normal(c, 1.0)
    noise.restore_journal_state(_state(0, 0))
    assert_pinned(_digest(noise, _draws(noise, None)), _NUMPY_PATH[(0, 0)])
    noise.restore_journal_state(_state(3, 1000))  # the same key bytes: pinned as well
    assert_pinned(_digest(noise, _draws(noise, None)), _NUMPY_PATH[(3, 1000)])
    noise.rekey()
    fresh = CsprngNoise()
    fresh.restore_journal_state(noise.journal_state())
    for c in (2, 1001, 40_000, 7):
        assert torch.equal(noise.normal(c, 1.0), fresh.normal(c, 1.0))
    assert noise.journal_state() == fresh.journal_state()


class _NoReset:
    """A cipher context without ``reset_nonce`` (cryptography < 43)."""

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        self.update, self.update_into = context.update, context.update_into


def test_releases_are_pinned_where_cipher_contexts_cannot_be_repositioned(monkeypatch):
    class Cipher(noise_module.Cipher):  # type: ignore[misc]
        def encryptor(self):  # type: ignore[no-untyped-def]
            return _NoReset(super().encryptor())

    monkeypatch.setattr(noise_module, "Cipher", Cipher)
    noise = CsprngNoise()
    noise.restore_journal_state(_state(5, 37))
    assert_pinned(_digest(noise, _draws(noise, None)), _NUMPY_PATH[(5, 37)])
