"""DP-SGD's model checks: the batch sizes probed for row independence."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binom
from torch import nn

from privacy.dpsgd import DPSGDError
from secure_fedora.learning.dp import check_rows_independent, largest_poisson_batch


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
