"""all_finite: the same answer as torch.isfinite(...).all(), slice by slice."""

from __future__ import annotations

import pytest
import torch

import secure_fedora.core.tensors as tensors
from secure_fedora.core.tensors import all_finite


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    monkeypatch.setattr(tensors, "FINITE_CHECK_ELEMENTS", 7)  # many slices on small tensors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 6, 7, 23, 59])
def test_a_non_finite_value_anywhere_is_found(bad, where):
    t = torch.randn(6, 10)
    assert all_finite(t)
    t.view(-1)[where] = bad
    assert not all_finite(t)
    assert not all_finite(t.t())  # non-contiguous: checked along its first dimension
    assert not all_finite(t.to(torch.float64))


def test_other_dtypes_and_shapes():
    assert all_finite(torch.arange(100))  # integers are always finite
    assert all_finite(torch.zeros(0, 5))
    assert all_finite(torch.tensor(1.5))
    assert not all_finite(torch.tensor(float("nan")))
    z = torch.zeros(20, dtype=torch.complex64)
    z[13] = complex(0, float("inf"))
    assert not all_finite(z)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finite_values_whose_sum_overflows_are_finite(dtype):
    """The sum screen overflows on huge finite values; those are still all finite, and one
    non-finite value among them is still found."""
    big = torch.finfo(dtype).max
    t = torch.full((6, 10), big, dtype=dtype)
    t[::2] = -big / 3  # a sum that overflows, then (in float16 and float32) is far from 0
    assert not bool(torch.isfinite(t.sum())) or dtype == torch.float64
    assert all_finite(t) and all_finite(t.t())
    for bad in (float("nan"), float("inf")):
        u = t.clone()
        u[5, 9] = bad
        assert not all_finite(u) and not all_finite(u.t())


def test_the_answer_is_isfinite_all_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 0.0])
    for _ in range(300):
        t = torch.randn(int(torch.randint(1, 40, (1,), generator=g)), generator=g)
        hits = torch.randint(0, 3, (1,), generator=g).item()
        for _ in range(hits):
            i = int(torch.randint(0, t.numel(), (1,), generator=g))
            t[i] = specials[int(torch.randint(0, len(specials), (1,), generator=g))]
        assert all_finite(t) == bool(torch.isfinite(t).all())
