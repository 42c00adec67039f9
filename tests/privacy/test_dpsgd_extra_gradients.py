"""DPSGD's audit hook: extra per-sample gradients are clipped like samples and summed exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privacy.dpsgd import DPSGD, DPSGDError
from privacy.noise import ReproducibleNoise


def _sparse(indices, values, size):
    return torch.sparse_coo_tensor(indices, values, size, check_invariants=True)


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _grads(extra, x, y, mode="fused"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with DPSGD(model, 1.5, 0.7, 8.0, ReproducibleNoise(5), mode=mode) as dp:
        dp.private_gradient(x, y, _loss, extra_gradients=extra)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("mode", ["fused", "opacus"])
def test_extra_rows_are_clipped_and_added_to_the_same_noised_sum(mode):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    d = 6 * 4 + 4 + 4 * 3 + 3
    # row 0: a Dirac gradient of norm 1.5 (= C, kept); row 1: norm 5 across two coordinates
    # (clipped to C); both touch the first and the last parameter
    indices = torch.tensor([[0, 1, 1], [2, 2, d - 1]])
    values = torch.tensor([1.5, 3.0, 4.0])
    extra = _sparse(indices, values, (2, d))
    base = _grads(None, x, y, mode)
    with_extra = _grads(extra, x, y, mode)
    expected = torch.zeros(d)
    factor = 1.5 / (5.0 + 1e-6)
    expected[2] = 1.5 * min(1.0, 1.5 / (1.5 + 1e-6)) + 3.0 * factor
    expected[d - 1] = 4.0 * factor
    torch.testing.assert_close(with_extra - base, expected / 8.0, atol=1e-6, rtol=1e-5)


def test_extra_gradients_on_an_empty_batch_and_bad_input():
    x, y = torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64)
    d = 6 * 4 + 4 + 4 * 3 + 3
    extra = _sparse(torch.tensor([[0], [7]]), torch.tensor([1.0]), (1, d))
    diff = _grads(extra, x, y) - _grads(None, x, y)
    assert diff[7] == pytest.approx(1.0 / 8.0, rel=1e-5) and int((diff != 0).sum()) == 1
    with pytest.raises(DPSGDError, match="sparse COO"):
        _grads(torch.zeros(1, d), x, y)
    with pytest.raises(DPSGDError, match="sparse COO"):
        _grads(_sparse(torch.tensor([[0], [0]]), torch.tensor([1.0]), (1, d + 1)),
               x, y)
    with pytest.raises(DPSGDError, match="NaN"):
        _grads(_sparse(torch.tensor([[0], [0]]), torch.tensor([float("nan")]),
                                       (1, d)), x, y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_extra_gradient_is_refused_and_a_large_finite_one_accepted(bad):
    """The hook's finiteness check is exact: any NaN or infinite value among the extra rows is
    refused, while the largest finite float32 values (whose sum overflows) pass it."""
    x, y = torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64)
    d = 6 * 4 + 4 + 4 * 3 + 3
    big = torch.finfo(torch.float32).max
    indices = torch.tensor([[0, 0, 1], [1, 2, 7]])
    with pytest.raises(DPSGDError, match="NaN or infinite"):
        _grads(_sparse(indices, torch.tensor([big, bad, 1.0]), (2, d)), x, y)
    grads = _grads(_sparse(indices, torch.tensor([big, big, -big]), (2, d)), x, y)
    assert bool(torch.isfinite(grads).all())


def test_an_extra_row_whose_squared_norm_overflows_is_clipped_to_c():
    """An extra row with entries 3e19 and 4e19 (norm 5e19, squared norm beyond float32) was
    clipped by C / inf = 0 (dropped); it now adds C in its direction."""
    x, y = torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64)
    d = 6 * 4 + 4 + 4 * 3 + 3
    extra = _sparse(torch.tensor([[0, 0], [3, 9]]), torch.tensor([3e19, 4e19]), (1, d))
    diff = _grads(extra, x, y) - _grads(None, x, y)
    expected = torch.zeros(d)
    expected[3], expected[9] = 1.5 * 0.6, 1.5 * 0.8
    torch.testing.assert_close(diff, expected / 8.0, atol=1e-6, rtol=1e-5)


def _model_and_dp(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    return model, DPSGD(model, 1.5, 0.7, 8.0, ReproducibleNoise(5), mode=mode)


def _state(model, dp):
    return ([p.detach().clone() for p in model.parameters()],
            [p.grad.clone() for p in model.parameters()], dp.steps)


def _assert_same_state(a, b):
    (params_a, grads_a, steps_a), (params_b, grads_b, steps_b) = a, b
    assert steps_a == steps_b
    for x, y in zip(params_a + grads_a, params_b + grads_b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["fused", "opacus"])
@pytest.mark.parametrize("batch", [0, 5])
@pytest.mark.parametrize("bad", ["dense", "width", "nan"])
def test_a_refused_extra_gradient_changes_nothing_and_a_retry_matches_an_untouched_twin(
        mode, batch, bad):
    """extra_gradients are checked before the step draws noise or writes a gradient: the
    refused step leaves the gradients, parameters, step count and noise source as they were,
    and the step retried with a good input gives the bits of a twin that never saw the bad
    one (its next noise draw included)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 6, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
    d = 6 * 4 + 4 + 4 * 3 + 3
    good = _sparse(torch.tensor([[0, 1], [2, d - 1]]), torch.tensor([1.0, 4.0]), (2, d))
    wrong = {"dense": torch.zeros(1, d),
             "width": _sparse(torch.tensor([[0], [0]]), torch.tensor([1.0]), (1, d + 1)),
             "nan": _sparse(torch.tensor([[0], [0]]), torch.tensor([float("nan")]), (1, d))}[bad]
    model, dp = _model_and_dp(mode)
    twin_model, twin = _model_and_dp(mode)
    with dp, twin:
        for oracle in (dp, twin):  # a first step: gradients to keep
            oracle.private_gradient(x, y, _loss)
        before = _state(model, dp)
        with pytest.raises(DPSGDError):
            dp.private_gradient(x, y, _loss, extra_gradients=wrong)
        _assert_same_state(_state(model, dp), before)
        dp.private_gradient(x, y, _loss, extra_gradients=good)
        twin.private_gradient(x, y, _loss, extra_gradients=good)
        _assert_same_state(_state(model, dp), _state(twin_model, twin))
        assert torch.equal(dp.noise.normal(7, 1.0), twin.noise.normal(7, 1.0))
