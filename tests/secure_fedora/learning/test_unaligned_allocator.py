"""Every aligned buffer a client computation makes (``aligned``'s copies, ``local_train``'s
row, ``validation_losses``' staged row) starts on the 64-byte boundary even when the
allocator returns buffers off it, and gives the bits of the default allocator."""

from __future__ import annotations

import pytest
import torch

from secure_fedora.learning.client import (
    ALIGNMENT_BYTES,
    FlatModel,
    PlainGradient,
    TrainConfig,
    Workspace,
    aligned,
    aligned_empty,
    evaluate,
    local_train,
)
from secure_fedora.learning.models import make_model
from secure_fedora.learning.validation_losses import validation_losses

_REAL_EMPTY = torch.empty


def _off_boundary_empty(*size, dtype=None, device=None, **kwargs):  # type: ignore[no-untyped-def]
    """torch.empty, but every buffer of more than one element starts 4-byte elements off
    the boundary (an allocator that does not align)."""
    shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
    base = _REAL_EMPTY(int(torch.Size(shape).numel()) + 16, dtype=dtype, device=device, **kwargs)
    numel = torch.Size(shape).numel()
    if numel <= 1:
        return base[:numel].view(shape)
    step = base.element_size()
    start = next(k for k in range(1, 17) if (base.data_ptr() + k * step) % ALIGNMENT_BYTES)
    return base[start: start + numel].view(shape)


@pytest.fixture
def off_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "empty", _off_boundary_empty)
    assert torch.empty(100).data_ptr() % ALIGNMENT_BYTES


def _case():  # type: ignore[no-untyped-def]
    flat = FlatModel(make_model("mlp", seed=0))
    gen = torch.Generator().manual_seed(7)
    rows = flat.initial_vector() + 0.05 * torch.randn(4, flat.num_params, generator=gen)
    x = torch.rand(3, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (3,), generator=gen)
    return flat, rows, x, y


def _train(flat, rows, x, y) -> torch.Tensor:  # type: ignore[no-untyped-def]
    trained = rows.clone()  # rows 1-3 sit off the boundary inside the matrix
    cfg = TrainConfig(lr=0.05, batch_size=1, local_epochs=1)
    workspace = Workspace.for_size(flat.num_params)
    for k in range(1, 4):
        local_train(flat, trained[k], x, y, cfg, PlainGradient(1),
                    torch.Generator().manual_seed(k), workspace, phi=rows[0], lam=0.5)
    return trained


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16])
def test_aligned_buffers_start_on_the_boundary_whatever_the_allocator_returns(
        off_boundary: None, dtype: torch.dtype) -> None:
    for shape in [(1000,), (3, 77), (5, 1, 13)]:
        buffer = aligned_empty(shape, dtype, "cpu")
        assert buffer.shape == shape and buffer.dtype == dtype and buffer.is_contiguous()
        assert buffer.data_ptr() % ALIGNMENT_BYTES == 0
    source = torch.arange(1001, dtype=dtype)[1:]
    copy = aligned(source)
    assert copy.data_ptr() % ALIGNMENT_BYTES == 0 and torch.equal(copy, source)


def test_training_evaluation_and_validation_losses_keep_their_bits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    flat, rows, x, y = _case()
    splits = [(x[:1], y[:1]), (x, y), (x[1:2], y[1:2])]
    expected = (_train(flat, rows, x, y),
                [evaluate(flat, rows[k], x[:1], y[:1]) for k in range(4)],
                validation_losses(flat, list(rows[1:]), list(rows[:3]), splits))
    monkeypatch.setattr(torch, "empty", _off_boundary_empty)
    flat, rows, x, y = _case()  # a model, a workspace and staged rows made by that allocator
    trained = _train(flat, rows, x, y)
    assert torch.equal(trained, expected[0])
    assert [evaluate(flat, rows[k], x[:1], y[:1]) for k in range(4)] == expected[1]
    assert validation_losses(flat, list(rows[1:]), list(rows[:3]), splits) == expected[2]
