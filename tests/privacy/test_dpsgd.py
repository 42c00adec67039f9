"""DP-SGD: fused per-sample clipping equals a brute-force loop; noise; Poisson sampling; views."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from privacy.dpsgd import DPSGD, DPSGDError, clip_overflowing_rows, poisson_sample
from privacy.noise import CsprngNoise, ReproducibleNoise
from tests.pinned_support import assert_pinned

CE = nn.CrossEntropyLoss(reduction="none")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 5))


def _brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, clip: float,
                 ) -> list[torch.Tensor]:
    """Clip each per-sample gradient (flat over all trainable params, +1e-6 like Opacus), sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum(), params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += g.double() * factor
    return [t.float() for t in total], norms


def _data(n: int, seed: int = 1, shape: tuple[int, ...] = (20,), classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def test_fused_clipped_sum_matches_brute_force_loop():
    model = _mlp()
    x, y = _data(24)
    _, norms = _brute_force(model, x, y, CE, clip=1e9)
    clip = float(torch.tensor(norms).median())  # about half the samples get clipped
    expected, _ = _brute_force(model, x, y, CE, clip)
    with DPSGD(model, clip, 1.0, 24, ReproducibleNoise(0)) as dp:
        assert dp.mode == "fused"
        got = dp.clipped_gradient_sum(x, y, CE)
    assert sum(n > clip for n in norms) >= 5 and sum(n < clip for n in norms) >= 5
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_private_gradient_is_clipped_sum_plus_noise_over_expected_batch():
    model = _mlp()
    x, y = _data(10)
    clip, sigma, batch = 0.5, 1.3, 8.0
    expected, _ = _brute_force(model, x, y, CE, clip)
    dp = DPSGD(model, clip, sigma, batch, ReproducibleNoise(42))
    dp.private_gradient(x, y, CE)
    # The noise is one draw over all parameters, in parameter order: reproduce it.
    total = sum(p.numel() for p in model.parameters())
    flat_noise = ReproducibleNoise(42).normal(total, sigma * clip / batch)
    offset = 0
    for p, e in zip(model.parameters(), expected, strict=True):
        noise = flat_noise[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        torch.testing.assert_close(p.grad, noise + e / batch, atol=1e-5, rtol=1e-5)
    assert dp.steps == 1
    with torch.no_grad():  # the caller's grad mode does not matter
        dp.private_gradient(x, y, CE)
    assert dp.steps == 2
    rec = dp.record(sample_rate=0.1)
    assert (rec.noise_multiplier, rec.sample_rate, rec.steps) == (sigma, 0.1, 2)
    assert rec.params["clip_norm"] == clip and rec.params["per_sample_method"] == "fused"


@pytest.mark.parametrize("source", ["reproducible", "csprng"])
def test_noise_std_matches_sigma_c_over_b_and_empty_batch_is_noise_only(source):
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 50))
    clip, sigma, batch = 2.0, 1.5, 16.0
    dp = DPSGD(model, clip, sigma, batch, ReproducibleNoise(3) if source == "reproducible" else CsprngNoise())
    x, y = torch.zeros(0, 100), torch.zeros(0, dtype=torch.long)
    dp.private_gradient(x, y, CE)
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert flat.numel() > 15_000
    expected = sigma * clip / batch
    assert dp.noise_std == pytest.approx(expected)
    assert float(flat.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(flat.mean())) < 4 * expected / math.sqrt(flat.numel())


@pytest.mark.parametrize("source", ["reproducible", "csprng"])
def test_poisson_sampling_rate_and_independence(source):
    g = ReproducibleNoise(0) if source == "reproducible" else CsprngNoise()
    n, q = 200_000, 0.05
    idx = DPSGD.sample_batch(n, q, g)
    sd = math.sqrt(n * q * (1 - q))
    assert abs(idx.numel() - n * q) < 4 * sd
    assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
    sizes = torch.tensor([float(poisson_sample(50, 0.1, g).numel()) for _ in range(2000)])
    assert float(sizes.mean()) == pytest.approx(5.0, abs=0.25)
    assert float(sizes.var()) == pytest.approx(50 * 0.1 * 0.9, rel=0.15)  # binomial, not fixed
    assert (sizes == 0).any()  # empty batches happen and are legal
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(DPSGDError, match="sample_rate"):
            poisson_sample(10, bad, g)
    with pytest.raises(DPSGDError, match="n must"):
        poisson_sample(-1, 0.5, g)


def test_parameters_as_views_of_a_flat_matrix_are_kept_and_written_in_place():
    model = _mlp()
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    flat = torch.zeros(3, sum(sizes))  # the runtime's (N, P) matrix; this model is row 1
    flat_grad = torch.zeros(3, sum(sizes))
    offset = 0
    for p, s in zip(params, sizes, strict=True):
        flat[1, offset:offset + s] = p.detach().flatten()
        p.data = flat[1, offset:offset + s].view_as(p)
        p.grad = flat_grad[1, offset:offset + s].view_as(p)
        offset += s
    ids = [id(p) for p in params]
    grad_ids = [id(p.grad) for p in params]
    x, y = _data(12)
    expected, _ = _brute_force(model, x, y, CE, 0.7)
    dp = DPSGD(model, 0.7, 1.0, 12, ReproducibleNoise(5))
    dp.private_gradient(x, y, CE)
    assert [id(p) for p in model.parameters()] == ids
    assert [id(p.grad) for p in model.parameters()] == grad_ids
    flat_noise = ReproducibleNoise(5).normal(sum(sizes), 1.0 * 0.7 / 12)
    offset = 0
    for p, e, s in zip(params, expected, sizes, strict=True):
        assert p.data_ptr() == flat[1, offset:offset + s].data_ptr()
        noise = flat_noise[offset:offset + s].view_as(p)
        torch.testing.assert_close(flat_grad[1, offset:offset + s].view_as(p), noise + e / 12,
                                   atol=1e-5, rtol=1e-5)
        offset += s
    assert float(flat_grad[0].abs().sum()) == 0.0 and float(flat_grad[2].abs().sum()) == 0.0
    # An optimizer step on the views updates the flat matrix row.
    before = flat[1].clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, flat[1])


class _SeqModel(nn.Module):
    """Linear on (B, T, d) inputs and one layer called twice: exercises the T > 1 path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))                 # (B, T, 8)
        h = torch.tanh(self.shared(h))
        h = self.shared(h).mean(dim=1)                # shared layer used twice
        return self.head(h)


def test_fused_handles_sequence_inputs_and_reused_layers_exactly():
    model = _SeqModel()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, 6, generator=g)
    y = torch.randint(0, 3, (9,), generator=g)
    _, norms = _brute_force(model, x, y, CE, 1e9)
    clip = float(torch.tensor(norms).median())
    expected, _ = _brute_force(model, x, y, CE, clip)
    dp = DPSGD(model, clip, 1.0, 9, ReproducibleNoise(0))
    assert dp.mode == "fused"
    for got, e in zip(dp.clipped_gradient_sum(x, y, CE), expected, strict=True):
        torch.testing.assert_close(got, e, atol=1e-5, rtol=1e-5)


def test_conv_model_uses_opacus_exact_per_sample_gradients_with_a_log_line(caplog):
    torch.manual_seed(0)
    # a module name of its own: the notice is said once per reason in a process
    model = nn.Sequential(OrderedDict(conv_of_the_log_line_test=nn.Conv2d(1, 3, 3),
                                      relu=nn.ReLU(), flat=nn.Flatten(),
                                      out=nn.Linear(3 * 4 * 4, 4)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    _, norms = _brute_force(model, x, y, CE, 1e9)
    clip = float(torch.tensor(norms).median())
    expected, _ = _brute_force(model, x, y, CE, clip)
    with caplog.at_level(logging.WARNING, logger="privacy.dpsgd"):
        dp = DPSGD(model, clip, 1.0, 8, ReproducibleNoise(0))
    assert dp.mode == "opacus"
    assert any("Opacus" in r.getMessage() and "same privacy guarantee" in r.getMessage()
               for r in caplog.records)
    for got, e in zip(dp.clipped_gradient_sum(x, y, CE), expected, strict=True):
        torch.testing.assert_close(got, e, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        dp.private_gradient(x, y, CE)
    assert all(p.grad is not None and getattr(p, "grad_sample", None) is None
               for p in model.parameters())
    model.eval()
    with pytest.raises(DPSGDError, match="train mode"):
        dp.private_gradient(x, y, CE)
    model.train()
    dp.close()
    with pytest.raises(DPSGDError, match="fused"):
        DPSGD(model, clip, 1.0, 8, ReproducibleNoise(0), mode="fused")


def test_the_opacus_fallback_is_said_once_per_reason_in_a_process():
    """A DP run builds one DPSGD per check and per method (a Flower node one per message), and
    each build logged the same Opacus fallback notice: a two-method Python API run said it three
    times. It is now said the first time its reason occurs in the process; another reason is
    said too, and the log's other warnings are untouched. In a fresh process (this one's
    earlier tests may have said any reason already)."""
    script = """
import logging
from torch import nn
from privacy.dpsgd import DPSGD
from privacy.noise import ReproducibleNoise

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.WARNING)
conv = lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
for _ in range(3):
    DPSGD(conv(), 1.0, 1.0, 8, ReproducibleNoise(0)).close()
DPSGD(nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 2)), 1.0, 1.0, 8,
      ReproducibleNoise(0)).close()
DPSGD(conv(), 1.0, 1.0, 8, ReproducibleNoise(0)).close()
logging.getLogger("privacy.dpsgd").warning("another warning")
logging.getLogger("privacy.dpsgd").warning("another warning")
import json
print(json.dumps(records))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120)
    said = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(said) == 4, said
    assert "module '0' (Conv2d)" in said[0] and "using Opacus GradSampleModule" in said[0]
    assert "module '0' (Embedding)" in said[1] and "using Opacus GradSampleModule" in said[1]
    assert said[2:] == ["another warning", "another warning"]


def test_opacus_path_captures_only_inside_private_steps_and_survives_an_interrupted_pass():
    """Passes through the module between private steps (a client-held model trained without
    noise, an interrupted forward) leave no captured state, so the next private step's
    clipped sum is the brute-force one for its own batch, whatever came before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (13,), generator=g)
    dp = DPSGD(model, 0.5, 1.0, 8, ReproducibleNoise(0))
    assert dp.mode == "opacus"
    conv = model[0]
    CE(model(x), y).sum().backward()  # a plain (non-private) step through the same module
    assert not getattr(conv, "activations", None)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())

    def failing(module, inputs, output):
        raise RuntimeError("interrupted")

    handle = model[3].register_forward_hook(failing)
    dp._gsm.enable_hooks()  # as if a private step had died between forward and backward
    with pytest.raises(RuntimeError, match="interrupted"):
        model(x[:3])
    dp._gsm.disable_hooks()
    handle.remove()
    assert conv.activations  # the stale capture the next step must not see
    for batch in (12, 5):
        expected, _ = _brute_force(model, x[:batch], y[:batch], CE, 0.5)
        for got, e in zip(dp.clipped_gradient_sum(x[:batch], y[:batch], CE), expected, strict=True):
            torch.testing.assert_close(got, e, atol=1e-5, rtol=1e-5)
    assert not conv.activations and not dp._gsm.hooks_enabled
    dp.close()


def test_close_removes_hooks_and_eval_forward_captures_nothing():
    model = _mlp()
    dp = DPSGD(model, 1.0, 1.0, 4, ReproducibleNoise(0))
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(len(m._forward_hooks) == 1 for m in linear)
    model(torch.randn(3, 20))  # outside private_gradient: nothing is kept
    assert all(not c.inputs and not c.outputs for c in dp._captures)
    dp.close()
    assert all(len(m._forward_hooks) == 0 for m in linear)
    with pytest.raises(DPSGDError, match="closed"):
        dp.private_gradient(*_data(2), CE)


def test_bad_configurations_are_rejected_with_the_field_named():
    model = _mlp()
    gen = ReproducibleNoise(0)
    with pytest.raises(DPSGDError, match="max_grad_norm"):
        DPSGD(model, 0.0, 1.0, 4, gen)
    with pytest.raises(DPSGDError, match="noise_multiplier"):
        DPSGD(model, 1.0, 0.0, 4, gen)
    with pytest.raises(DPSGDError, match="expected_batch_size"):
        DPSGD(model, 1.0, 1.0, 0, gen)
    with pytest.raises(DPSGDError, match="NoiseSource"):
        DPSGD(model, 1.0, 1.0, 4, None)
    with pytest.raises(DPSGDError, match="NoiseSource"):
        DPSGD(model, 1.0, 1.0, 4, torch.Generator())
    with pytest.raises(DPSGDError, match="mode"):
        DPSGD(model, 1.0, 1.0, 4, gen, mode="ghost")
    with pytest.raises(DPSGDError, match="BatchNorm1d"):
        DPSGD(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False)), 1.0, 1.0, 4, gen)
    dp = DPSGD(model, 1.0, 1.0, 4, gen)
    x, y = _data(4)
    with pytest.raises(DPSGDError, match="per-sample losses"):
        dp.private_gradient(x, y, nn.CrossEntropyLoss())  # reduced to a scalar: rejected
    with pytest.raises(DPSGDError, match="samples"):
        dp.private_gradient(x, y[:3], CE)


@pytest.mark.parametrize("bind", ["one buffer", "separate", "buffer out of order"])
def test_csprng_noise_written_into_one_gradient_buffer_is_the_separate_gradients_noise(bind):
    """With gradients that are consecutive pieces of one buffer (a flat model's binding), the
    CSPRNG noise is written straight into that buffer; the released gradient is bit for bit
    the one of separately held gradients, for the same key and stream position."""
    state = bytes(range(32)) + (2).to_bytes(12, "little") + (640).to_bytes(8, "little") + b"CSv1"
    x, y = _data(9)
    released = {}
    for how in ("separate", bind):
        model = _mlp()
        params = list(model.parameters())
        sizes = [p.numel() for p in params]
        buffer = torch.full((sum(sizes) + 3,), float("nan"))
        order = list(range(len(params)))
        if how == "buffer out of order":
            order = order[1:] + order[:1]
        offset = 3
        for i in order:
            if how != "separate":
                params[i].grad = buffer[offset:offset + sizes[i]].view_as(params[i])
                offset += sizes[i]
        noise = CsprngNoise()
        noise.restore_journal_state(state)
        with DPSGD(model, 0.7, 1.1, 7.5, noise) as dp:
            dp.private_gradient(x, y, CE)
            dp.private_gradient(x[:0], y[:0], CE)  # noise only
        released[how] = torch.cat([p.grad.flatten() for p in params])
        if how != "separate":
            assert all(p.grad.data_ptr() >= buffer.data_ptr() for p in params)
        assert noise.journal_state() != state
    assert torch.equal(released[bind].view(torch.int32), released["separate"].view(torch.int32))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


@pytest.mark.parametrize("mode", ["fused", "opacus"])
@pytest.mark.parametrize("act", ["relu", "tanh", "none"])
def test_a_finite_gradient_whose_squared_norm_overflows_is_clipped_to_c_not_dropped(mode, act):
    """A sample with entries ~1e19 has a finite gradient whose squared norm overflows float32:
    its factor was C / inf = 0 (the sample contributed nothing) or, on the fused path with a
    saturated tanh, ||a||^2 ||g||^2 = inf * 0 = NaN (the whole sum NaN). It now contributes its
    gradient's direction at norm C, as DP-SGD specifies; the other samples are unchanged."""
    torch.manual_seed(0)
    layers = {"relu": [nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)],
              "tanh": [nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)],
              "none": [nn.Linear(6, 3)]}[act]
    model = nn.Sequential(*layers)
    x, y = _data(4, shape=(6,), classes=3)
    x[2] = torch.tensor([1e19, -2e19, 3e19, 1e19, -1e19, 2e19])
    clip = 0.7
    dp = DPSGD(model, clip, 1.0, 4, ReproducibleNoise(0), mode=mode)
    raw = _flat(torch.autograd.grad(CE(model(x[2:3]), y[2:3]).sum(), list(model.parameters())))
    assert bool(torch.isfinite(raw).all()) and float(raw.norm()) > clip
    # the tanh saturates: the first layer's gradient is 0 and the squared norm small, but the
    # fused path's ||a||^2 of that layer still overflows
    assert math.isfinite(float((raw.float() ** 2).sum())) == (act == "tanh")
    alone = _flat(dp.clipped_gradient_sum(x[2:3], y[2:3], CE))
    assert float(alone.norm()) == pytest.approx(clip, rel=1e-5)
    assert float(alone @ raw / (alone.norm() * raw.norm())) == pytest.approx(1.0, abs=1e-6)
    others = [0, 1, 3]
    together = _flat(dp.clipped_gradient_sum(x, y, CE))
    rest = _flat(dp.clipped_gradient_sum(x[others], y[others], CE))
    torch.testing.assert_close(together, rest + alone, atol=1e-5, rtol=1e-5)


def _overflowing_entry_model() -> nn.Sequential:
    """Linear -> Tanh -> Linear whose first weight's second column is 0 (the tanh is not
    saturated on a row ``(u, v)``, whatever ``v``) and whose last weight is 1e10: on the row
    ``(u, 1e30)`` the backpropagated value 1e10 and the input 1e30 are finite, their product,
    a weight-gradient entry, is not in float32. (Columns cancelling on ``(v, v)`` left the
    tanh's input to the BLAS kernel's rounding of ``w v - w v``: 1e22 with AVX-512 FMA.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[:, 1] = 0.0
        model[2].weight.mul_(1e10)
    return model


def _clipped_in_float64(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    """Sum of the per-sample autograd gradients, each clipped to ``clip``, all in float64."""
    import copy

    wide = copy.deepcopy(model).double()
    total = torch.zeros(sum(p.numel() for p in wide.parameters()), dtype=torch.float64)
    for i in range(x.shape[0]):
        g = _flat(torch.autograd.grad(CE(wide(x[i:i + 1].double()), y[i:i + 1]).sum(),
                                      list(wide.parameters())))
        total += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    return total


@pytest.mark.parametrize("mode", ["fused", "opacus"])
@pytest.mark.parametrize("big", [1e30, 1e36])
def test_a_gradient_entry_that_overflows_float32_is_clipped_to_c_by_both_paths(mode, big):
    """A sample whose weight-gradient entry ``g_k a_j`` overflows float32 (finite ``g`` and
    ``a``): Opacus formed it as inf and the clipped sum was NaN (the step refused), while the
    fused path clipped it with a float32 factor below 1e-38 (digits lost at 1e30; 0 at 1e36,
    the sample dropped). Both paths now add it at norm C in its direction, as per-sample
    autograd in float64 clips it; the other samples are unchanged."""
    model = _overflowing_entry_model()
    x, y = _data(5, shape=(2,), classes=3)
    x[3, 1] = big
    with torch.no_grad():  # a label the model gets wrong: a loss gradient that is not 0
        y[3] = model(x[3:4]).argmin()
    raw = torch.autograd.grad(CE(model(x[3:4]), y[3:4]).sum(), list(model.parameters()))
    assert not bool(torch.isfinite(raw[0]).all()) and bool(torch.isfinite(raw[2]).all())
    clip = 0.5
    dp = DPSGD(model, clip, 1.0, 5, ReproducibleNoise(0), mode=mode)
    alone = _flat(dp.clipped_gradient_sum(x[3:4], y[3:4], CE))
    assert float(alone.norm()) == pytest.approx(clip, rel=1e-5)
    together = _flat(dp.clipped_gradient_sum(x, y, CE))
    torch.testing.assert_close(together, _clipped_in_float64(model, x, y, clip), atol=1e-6,
                               rtol=1e-5)
    others = [0, 1, 2, 4]
    rest = _flat(dp.clipped_gradient_sum(x[others], y[others], CE))
    torch.testing.assert_close(together, rest + alone, atol=1e-6, rtol=1e-5)
    model.zero_grad()
    dp.private_gradient(x, y, CE)  # the released step: finite, the same clipped sum plus noise
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_the_clip_factor_of_finite_squared_norms_is_the_plain_formula_bit_for_bit():
    """Only non-finite squared norms take the overflow-safe route: every other factor is the
    float32 ``(C / (sqrt(sq) + 1e-6)).clamp(max=1)`` itself (released bits unchanged)."""
    from privacy.dpsgd import clip_factors

    sq = torch.tensor([0.0, 1e-30, 0.25, 4.0, 3.0e38, float("inf"), float("nan")])
    calls = []

    def exact(where):
        calls.append(where[0].tolist())
        return torch.tensor([1e20, float("nan")], dtype=torch.float64)

    got = clip_factors(sq, 0.5, exact)
    plain = (0.5 / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    assert torch.equal(got[:5], plain[:5]) and calls == [[5, 6]]
    assert float(got[5]) == pytest.approx(0.5e-20, rel=1e-6) and math.isnan(float(got[6]))
    assert clip_factors(sq[:5], 0.5, exact).equal(plain[:5]) and len(calls) == 1


class _FrozenAndBiasless(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.frozen = nn.Linear(20, 8)
        self.frozen.weight.requires_grad_(False)  # only its bias is trained
        self.nobias = nn.Linear(8, 7, bias=False)
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.nobias(torch.tanh(self.frozen(x)))))


def _released_gradient_digest(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                              flat_buffer: bool) -> str:
    """SHA-256 of the gradients three fused DP-SGD steps and a noise-only step release (one
    fixed CSPRNG key), and of the stream position after them."""
    import hashlib

    params = [p for p in model.parameters() if p.requires_grad]
    if flat_buffer:
        buffer = torch.zeros(sum(p.numel() for p in params))
        offset = 0
        for p in params:
            p.grad = buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    noise = CsprngNoise()
    noise.restore_journal_state(bytes(range(50, 82)) + (1).to_bytes(12, "little")
                                + (4160).to_bytes(8, "little") + b"CSv1")
    h = hashlib.sha256()
    with DPSGD(model, 0.9, 1.3, 6.0, noise, mode="fused") as dp:
        for batch in (x, x[:1], x[:3], x[:0]):
            dp.private_gradient(batch, y[:batch.shape[0]], CE)
            for p in params:
                h.update(p.grad.contiguous().numpy().tobytes())
    h.update(noise.journal_state()[32:52])
    return h.hexdigest()


# Digests of the implementation before the DP-step speed work (privacy/dpsgd.py of 7dec6ea),
# under the test suite's one torch thread (tests/conftest.py).
_MLP = "bc88da60dca14225e8c31923d67039106a508f58b507b8c171a7efc46a880614"


@pytest.mark.parametrize(("case", "flat_buffer", "expected"), [
    ("mlp", True, _MLP), ("mlp", False, _MLP),
    ("sequence", True, "5535faaeb2c0bdb1df4df3b0a3400e8131c69acc11ff7f60166ba17a682fe2d4"),
    ("frozen and biasless", False,
     "8f798c8b739c67d862ef8c46643069e3bc5005a3b550fb93ac9fe4b9b5085dea")])
def test_fused_releases_are_pinned_bit_for_bit(case, flat_buffer, expected):
    """The released gradients of fused DP-SGD steps for one key (clipping, noise, the flat
    buffer's direct noise write): speed work may change how, never what, is released."""
    if case == "mlp":
        model, (x, y) = _mlp(3), _data(7, seed=4)
    elif case == "sequence":
        model = _SeqModel()
        g = torch.Generator().manual_seed(6)
        x, y = torch.randn(7, 5, 6, generator=g), torch.randint(0, 3, (7,), generator=g)
    else:
        model, (x, y) = _FrozenAndBiasless(), _data(7, seed=8)
    assert_pinned(_released_gradient_digest(model, x, y, flat_buffer), expected)


def test_a_row_not_finite_at_every_loss_scale_becomes_the_zero_vector():
    """A per-sample gradient row still non-finite after every loss scale (its direction
    cannot be computed) was left as it was, so the clipped sum and the noised update were
    not finite. It is now the zero vector (within C), its squared norm 0; the other rows,
    finite or recomputed, are clipped as before."""
    parts = [torch.tensor([[3.0, 4.0], [float("nan"), 1.0], [float("inf"), 0.0]])]
    sq = (parts[0] ** 2).sum(dim=1)

    def recompute(index: torch.Tensor, scale: float) -> list[torch.Tensor]:
        # row 2 comes out finite once scaled; row 1 never does
        rows = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [6.0, 8.0]])[index] * scale
        return [rows]

    sq = clip_overflowing_rows(parts, sq, 1.0, recompute)
    assert torch.equal(parts[0][0], torch.tensor([3.0, 4.0])) and float(sq[0]) == 25.0
    assert torch.equal(parts[0][1], torch.zeros(2)) and float(sq[1]) == 0.0
    torch.testing.assert_close(parts[0][2], torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize("mode", ["fused", "opacus"])
def test_a_sample_whose_activations_overflow_adds_nothing_and_the_update_stays_finite(mode):
    """Inputs of 3e38 through Linear(all ones) -> ReLU overflow float32's activations: the
    sample's gradient has no direction (NaN), and both paths wrote a non-finite update
    (noise included). Now it contributes the zero vector: the clipped sum is the other
    samples' alone, and the noised update is finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    extreme = torch.cat([x, torch.full((1, 2), 3e38)]), torch.cat([y, torch.tensor([1])])
    with DPSGD(model, 0.5, 1.0, 5.0, ReproducibleNoise(0), mode=mode) as dp:
        without = dp.clipped_gradient_sum(x, y, CE)
        with_it = dp.clipped_gradient_sum(*extreme, CE)
        for a, b in zip(with_it, without, strict=True):
            torch.testing.assert_close(a, b)
        dp.private_gradient(*extreme, CE)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
