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
