"""Noise drawn on a device: the torch ChaCha20 keystream and sampler of CsprngNoise (the path
every non-CPU device takes, run here on the CPU), ReproducibleNoise's per-device generators,
refusals of unusable devices, and the DP mechanisms drawing on their tensor's device."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

import privacy.noise as noise_module
from privacy.dpsgd import DPSGD
from privacy.mechanisms import GaussianMechanism, noised_scalar, noised_second_moment
from privacy.noise import CsprngNoise, NoiseError, ReproducibleNoise

_KEY = bytes(range(32))
_CPU = torch.device("cpu")


def _state(nonce: int, offset: int) -> bytes:
    return _KEY + nonce.to_bytes(12, "little") + offset.to_bytes(8, "little") + b"CSv1"


def _pair(nonce: int = 3, offset: int = 1000) -> tuple[CsprngNoise, CsprngNoise]:
    """Two sources at one key and stream position: the numpy path and the torch path."""
    numpy_path, torch_path = CsprngNoise(), CsprngNoise()
    numpy_path.restore_journal_state(_state(nonce, offset))
    torch_path.restore_journal_state(_state(nonce, offset))
    torch_path._torch_keystream = True
    return numpy_path, torch_path


def _openssl(nonce: int, offset: int, size: int, bytes_per_nonce: int) -> tuple[bytes, int, int]:
    """``size`` keystream bytes from (nonce, offset), moving on every ``bytes_per_nonce`` bytes,
    straight from ``cryptography``; and the position after them."""
    out = b""
    while len(out) < size:
        if offset >= bytes_per_nonce:
            nonce, offset = nonce + 1, 0
        iv = b"\x00" * 4 + nonce.to_bytes(12, "little")
        stream = Cipher(algorithms.ChaCha20(_KEY, iv), mode=None).encryptor()
        take = min(size - len(out), bytes_per_nonce - offset)
        out += stream.update(bytes(offset + take))[offset:]
        offset += take
    return out, nonce, offset


@pytest.mark.parametrize(("position", "size"), [(0, 64), (1, 1), (63, 2), (1000, 777),
                                                (64 * 9 + 37, 5000), (7, 64 * 11)])
@pytest.mark.parametrize("blocks_per_step", [1 << 16, 3])
def test_torch_keystream_equals_openssl_byte_for_byte(position, size, blocks_per_step,
                                                      monkeypatch):
    monkeypatch.setattr(noise_module, "_TORCH_BLOCKS", blocks_per_step)
    out = torch.empty(size, dtype=torch.uint8)
    noise_module._chacha20_torch(_KEY, 5, position, out)
    assert bytes(out.numpy()) == _openssl(5, position, size, 1 << 36)[0]


@pytest.mark.parametrize(("offset", "count", "bytes_per_nonce"), [
    (1000, 513, 1 << 36), (1003, 100, 1 << 36), (3000, 300, 4096), (4096, 10, 4096),
    (0, 1500, 4096)])
def test_torch_path_uniforms_read_the_openssl_keystream_and_move_the_position(
        offset, count, bytes_per_nonce, monkeypatch):
    monkeypatch.setattr(noise_module, "_BYTES_PER_NONCE", bytes_per_nonce)
    _, torch_path = _pair(3, offset)
    got = torch_path.uniform(count)
    stream, nonce, end = _openssl(3, offset, 8 * count, bytes_per_nonce)
    words = np.frombuffer(stream, dtype="<i8") & ((1 << 53) - 1)
    assert torch.equal(got, torch.from_numpy(words.astype(np.float64) * 2.0 ** -53))
    assert torch_path.journal_state()[32:52] == nonce.to_bytes(12, "little") + end.to_bytes(
        8, "little")


@pytest.mark.parametrize("terms", [4, 2])
@pytest.mark.parametrize("bytes_per_nonce", [1 << 36, 4096])
def test_torch_path_gaussians_match_the_numpy_path_on_the_same_keystream(
        terms, bytes_per_nonce, monkeypatch):
    monkeypatch.setattr(noise_module, "GAUSSIAN_TERMS", terms)
    monkeypatch.setattr(noise_module, "_BYTES_PER_NONCE", bytes_per_nonce)
    numpy_path, torch_path = _pair()
    for c in (1, 2, 3, 33, 1000, 20_000):
        a, b = numpy_path.normal(c, 1.0), torch_path.normal(c, 1.0)
        assert b.dtype == torch.float32 and b.shape == (c,)
        # Same terms and summation order; only float32 log/cos/sin differ (a few ulp).
        ulp = torch.finfo(torch.float32).eps * a.abs().clamp(min=1.0)
        assert ((a - b).abs() <= 8 * ulp).all(), c
        assert numpy_path.journal_state() == torch_path.journal_state()
    for shape in ((), (7, 9), 4097):  # float64: the same torch kernels, so bit-identical
        assert torch.equal(numpy_path.normal(shape, 2.0, torch.float64),
                           torch_path.normal(shape, 2.0, torch.float64))
    assert torch.equal(numpy_path.bernoulli(999, 0.25), torch_path.bernoulli(999, 0.25))
    assert numpy_path.journal_state() == torch_path.journal_state()


def test_torch_path_journal_state_remakes_identical_values():
    _, noise = _pair()
    state = noise.journal_state()
    first = [noise.normal(5000, 1.0), noise.normal((3, 4), 0.5, torch.float64),
             noise.uniform(17)]
    again = CsprngNoise()
    again.restore_journal_state(state)
    again._torch_keystream = True
    remade = [again.normal(5000, 1.0), again.normal((3, 4), 0.5, torch.float64),
              again.uniform(17)]
    assert all(torch.equal(x, y) for x, y in zip(first, remade, strict=True))
    assert again.journal_state() == noise.journal_state()


def test_mixing_the_paths_never_reuses_keystream():
    numpy_path, mixed = _pair()
    reference = [numpy_path.normal(1000, 1.0), numpy_path.uniform(100)]
    first = mixed.normal(1000, 1.0)  # torch path
    mixed._torch_keystream = False
    assert torch.equal(mixed.uniform(100), reference[1])  # numpy path continues after it
    assert not torch.equal(first[:100].double(), reference[1])
    assert mixed.journal_state() == numpy_path.journal_state()


def test_the_key_stays_hidden_after_a_torch_path_draw():
    _, noise = _pair()
    noise.normal(100, 1.0)
    assert _KEY.hex() not in repr(noise) and str(list(_KEY)) not in repr(noise)
    with pytest.raises(TypeError, match="never leave memory"):
        pickle.dumps(noise)
    assert noise.checkpoint_state() is None


def test_reproducible_cpu_values_are_pinned():
    r = ReproducibleNoise(7)
    assert r.normal(4, 1.0).tolist() == [-0.1467950940132141, 0.7861412763595581,
                                         0.9468216300010681, -1.1143440008163452]
    assert r.normal(2, 2.0, torch.float64).tolist() == [3.3815802515884665, -1.7896557583452772]
    assert r.uniform(3).tolist() == [0.2947121080128837, 0.5607215973721555, 0.7630434112121387]
    assert r.bernoulli(8, 0.5).tolist() == [False, True, True, True, True, True, False, True]


def test_reproducible_device_draws_repeat_and_resume_from_the_checkpoint():
    def device_path(seed: int) -> ReproducibleNoise:
        source = ReproducibleNoise(seed)
        source._device_generators = True  # the per-draw generator every non-CPU device uses
        return source

    a, b = device_path(7), device_path(7)
    assert torch.equal(a.normal((3, 4), 1.5), b.normal((3, 4), 1.5))
    state = a.checkpoint_state()
    expected = [a.normal(50, 1.0), a.uniform(10), a.bernoulli(20, 0.3)]
    c = device_path(7)
    c.restore_state(state)
    assert all(torch.equal(x, y) for x, y in zip(
        expected, [c.normal(50, 1.0), c.uniform(10), c.bernoulli(20, 0.3)], strict=True))
    # Another stream than the CPU generator's (documented: CPU and device streams differ).
    assert not torch.equal(device_path(7).normal(50, 1.0), ReproducibleNoise(7).normal(50, 1.0))


@pytest.mark.parametrize("source", [CsprngNoise(), ReproducibleNoise(0)])
def test_unusable_devices_are_refused_by_name(source):
    with pytest.raises(NoiseError, match="device"):
        source.normal(3, 1.0, device="no_such_device")
    if not torch.cuda.is_available():
        with pytest.raises(NoiseError, match="not usable"):
            source.normal(3, 1.0, device="cuda")
        with pytest.raises(NoiseError, match="not usable"):
            source.uniform(3, device=torch.device("cuda"))
    assert source.normal(3, 1.0, device="cpu").device == _CPU


@pytest.mark.parametrize("source", [CsprngNoise(), ReproducibleNoise(0)])
def test_the_meta_device_is_refused_because_its_noise_would_have_no_values(source):
    for draw in (lambda: source.normal(3, 1.0, device="meta"),
                 lambda: source.uniform(3, device="meta"),
                 lambda: source.bernoulli(3, 0.5, device=torch.device("meta"))):
        with pytest.raises(NoiseError, match="meta"):
            draw()


class _Recording(CsprngNoise):
    """A real CSPRNG source that also records the device each Gaussian was drawn on."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[object] = []

    def normal(self, shape, std, dtype=torch.float32, device=None):  # type: ignore[no-untyped-def]
        self.devices.append(device)
        return super().normal(shape, std, dtype, device)


def test_mechanisms_and_dpsgd_draw_on_the_device_of_what_they_noise():
    noise = _Recording()
    value = torch.zeros(5, dtype=torch.float64)
    GaussianMechanism(1.0, 1.0).release(value, noise)
    noised_second_moment(torch.ones(4, 3), 1.0, 1.0, noise)
    noised_scalar(torch.ones(4), 1.0, 1.0, noise)
    model = torch.nn.Linear(3, 2)
    dp = DPSGD(model, 1.0, 1.0, 4.0, noise)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    dp.private_gradient(torch.ones(4, 3), torch.zeros(4, dtype=torch.long), loss)
    assert len(noise.devices) == 5  # the second moment: its diagonal, then its upper triangle
    assert all(d is not None and torch.device(d) == _CPU for d in noise.devices), noise.devices
