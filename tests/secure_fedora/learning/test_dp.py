"""DP-SGD's model checks: the batch sizes probed for row independence, the per-sample
gradient check."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binom
from torch import nn

from privacy.dpsgd import DPSGD, DPSGDError
from privacy.noise import ReproducibleNoise
from secure_fedora.learning.dp import (
    check_per_sample_gradients,
    check_rows_independent,
    largest_poisson_batch,
)
from secure_fedora.learning.tasks import resolve_task


@pytest.mark.parametrize(("q", "n"), [(0.5, 20), (1.0, 20), (0.01, 100), (0.05, 1280),
                                      (64 / 60000, 60000), (0.001, 100), (0.3, 3)])
def test_largest_poisson_batch_bounds_every_plausible_batch(q, n):
    """A Poisson batch larger than the probed size has probability below 1e-12 per step, and
    the probe never exceeds the client's records."""
    b = largest_poisson_batch(q, n)
    assert 1 <= b <= n
    assert b == n or binom.sf(b, n, q) < 1e-12


def test_rows_independence_probe_is_exact_for_row_wise_models_and_draws_nothing():
    """Row-wise layers (LayerNorm, dropout, a random layer drawing per row) pass; a layer
    subtracting the batch mean is refused; torch's global generator is left as it was."""
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))

    class Noisy(nn.Module):
        def forward(self, h):
            return h + 0.1 * torch.randn_like(h)

    class Centered(nn.Module):
        def forward(self, h):
            return h - h.mean(dim=0, keepdim=True)

    row_wise = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Dropout(0.5), Noisy(),
                             nn.Linear(4, 2))
    centered = nn.Sequential(nn.Linear(5, 4), Centered())
    state = torch.get_rng_state()
    for training in (True, False):
        check_rows_independent(row_wise, x, training=training, rows="training")
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(DPSGDError, match="batch of 9 training rows change"):
        check_rows_independent(centered, x, training=True, rows="training")


def test_a_model_depending_on_the_batch_size_is_named_as_such():
    """A model scaling its outputs by 1 / x.shape[0] passed the row-replacement probe (same
    batch size) and was refused by the gradient check as "a parameter used outside its layer's
    call", which it is not; under DP one record added to a Poisson batch moves every other
    row's output. The probe now names the batch size."""

    class PerBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 2)

        def forward(self, h):
            return self.linear(h) * (8.0 / h.shape[0])

    class Noisy(nn.Module):  # row-wise, drawing other numbers for 7 rows than for 3 rows
        def forward(self, h):
            return h + 0.1 * torch.randn_like(h)

    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    check_rows_independent(nn.Sequential(nn.Linear(5, 4), Noisy()), x[:7], training=True,
                           rows="training")
    with pytest.raises(DPSGDError, match=r"outputs for 4 training rows differ between a batch "
                                         r"of 9 rows and a batch of those 4 alone .* depend on "
                                         r"the batch's size"):
        check_rows_independent(PerBatch(), x, training=True, rows="training")


def test_a_model_failing_on_the_probe_rows_is_a_model_error_naming_its_line():
    """An embedding given an id beyond its table in a training row past the first two (the
    other model checks' rows) raised a bare IndexError from DP's row probe."""
    from secure_fedora.learning.models import ModelError

    class Ids(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(4, 2)

        def forward(self, h):
            return self.embedding(h.long()).sum(dim=1)

    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 9.0], [0.0, 0.0]])
    with pytest.raises(ModelError, match=r"the model fails on a batch of 4 training rows .*"
                                         r"IndexError: .* \(at .*test_dp.py:\d+ in forward\)"):
        check_rows_independent(Ids(), x, training=True, rows="training")


def test_a_loss_using_batch_statistics_is_named_not_a_layer():
    """A custom loss that centres the outputs over the batch was refused as "layer (no single
    layer identified) is not supported", which sent the user looking for a layer of a plain
    MLP; the check now names the loss. A per-sample loss on the same rows passes."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    dpsgd = DPSGD(model, 0.5, 1.0, 4.0, ReproducibleNoise(0))

    def centred(out, target):
        return F.cross_entropy(out - out.mean(0, keepdim=True), target, reduction="none")

    with pytest.raises(DPSGDError, match=r"the loss's value for a row changes with the other "
                                         r"rows of its batch .* without batch statistics") as err:
        check_per_sample_gradients(dpsgd, centred, x, y)
    assert "layer" not in str(err.value)
    check_per_sample_gradients(dpsgd, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)


def test_gradients_that_overflow_are_named_as_such_not_as_an_unsupported_layer():
    """Inputs so large (1e30) that the per-sample gradient norms' squares overflow float32 were
    refused (first as "layer ... is not supported", then as "too large for float32"): their
    gradients are finite, and DP-SGD now clips them to C exactly as per-sample autograd does,
    so the check passes. Inputs whose loss gradient itself overflows (3e38) are refused as
    such, naming the inputs' scale and no layer (found by the hunt of user data)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    task = resolve_task("cross_entropy", False)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    for mode in ("fused", "opacus"):
        dpsgd = DPSGD(model, 0.5, 1.0, 4.0, ReproducibleNoise(0), mode=mode)
        check_per_sample_gradients(dpsgd, task.checked, x * 1e30, y)
        with pytest.raises(DPSGDError, match=r"gradient on probe row 0 of the training data is "
                                             r"not finite .* too large for float32 arithmetic; "
                                             r"scale the inputs") as err:
            check_per_sample_gradients(dpsgd, task.checked, x * 3e38, y)
        assert "not supported" not in str(err.value)
        check_per_sample_gradients(dpsgd, task.checked, x, y)


def test_a_probe_row_whose_gradient_entry_overflows_float32_passes_the_check():
    """A probe row whose weight-gradient entry ``g_k a_j`` overflows float32 (input 1e30,
    backpropagated value 1e10, both finite) was refused as "too large for float32" (per-sample
    autograd forms the entry as inf). Both DP paths clip it to C, and the check's reference
    clips it as they do (its loss scaled by a power of two), so the check passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():  # the tanh is not saturated on (u, 1e30); a backprop of 1e10 into it
        model[0].weight[:, 1] = 0.0  # not -weight[:, 0]: w v - w v is the BLAS kernel's rounding
        model[2].weight.mul_(1e10)
    task = resolve_task("cross_entropy", False)
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 2])
    x[1, 1] = 1e30
    with torch.no_grad():
        y[1] = model(x[1:2]).argmin()
    for mode in ("fused", "opacus"):
        check_per_sample_gradients(DPSGD(model, 0.5, 1.0, 3.0, ReproducibleNoise(0), mode=mode),
                                   task.checked, x, y)


class _WeightUsedByHand(nn.Module):
    """``b.weight`` is used by its layer and again by hand (``h @ b.weight.T``): per-sample
    hooks see only the layer's call."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.o(torch.relu(self.b(h)) + torch.relu(h @ self.b.weight.T))


def test_a_parameter_used_outside_its_layer_is_named_as_such_not_as_no_layer():
    """A model using a Linear's weight also by hand (a tied weight) was refused as "layer (no
    single layer identified) is not supported", though every layer is supported; the check
    now says a parameter is used outside its layer's call and what to do. Calling the layer
    twice (the same module shared) passes."""
    torch.manual_seed(0)
    task = resolve_task("cross_entropy", False)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    dpsgd = DPSGD(_WeightUsedByHand(), 0.5, 1.0, 4.0, ReproducibleNoise(0))
    with pytest.raises(DPSGDError, match=r"differ from per-sample autograd .*a parameter is used "
                                         r"outside its layer's call .* use each parameter only "
                                         r"through its module") as err:
        check_per_sample_gradients(dpsgd, task.checked, x, y)
    assert "no single layer" not in str(err.value)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(5, 3))
    check_per_sample_gradients(DPSGD(model, 0.5, 1.0, 4.0, ReproducibleNoise(0)), task.checked, x, y)
