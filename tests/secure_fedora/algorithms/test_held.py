"""Per-client state held for one client: its row reads and writes like the matrix's row,
everything else is refused."""

from __future__ import annotations

import pytest
import torch

from secure_fedora.algorithms.held import DataAccessError, HeldRows, HeldSlots, per_client


def test_per_client_without_a_held_client_is_the_stacked_matrix() -> None:
    row = torch.arange(4, dtype=torch.float32)
    full = per_client(3, None, row)
    assert isinstance(full, torch.Tensor) and torch.equal(full, row.repeat(3, 1))
    assert torch.equal(per_client(3, None, torch.tensor(0.5)), torch.full((3,), 0.5))


def test_held_rows_read_and_write_the_held_row_only() -> None:
    row = torch.arange(4, dtype=torch.float32)
    rows = per_client(5, 2, row)
    assert isinstance(rows, HeldRows)
    assert rows.shape == (5, 4) and len(rows) == 5 and rows.dtype == torch.float32
    rows[2].add_(1.0)
    assert torch.equal(rows[2], row + 1) and torch.equal(row, torch.arange(4.0))  # a copy
    assert torch.equal(rows[-3], rows[2]) and rows[2:3].shape == (1, 4)
    rows[2, 0] = 7.0
    assert float(rows[2, 0]) == 7.0 and float(rows[2][0]) == 7.0
    copy = rows.clone()
    copy[2].zero_()
    assert float(rows[2, 0]) == 7.0
    with pytest.raises(DataAccessError, match="client 2 read client 1"):
        rows[1]
    with pytest.raises(DataAccessError, match="client 2 read client 0"):
        rows[0] = torch.zeros(4)
    with pytest.raises(DataAccessError, match="cannot read rows 0:5:1"):
        rows[:]
    with pytest.raises(DataAccessError):
        list(rows)
    with pytest.raises(DataAccessError, match="matmul"):
        torch.ones(5) @ rows
    with pytest.raises(DataAccessError, match="'sum'"):
        rows.sum()
    assert not hasattr(rows, "_version")
    with pytest.raises(IndexError):
        rows[5]


def test_held_slots_hold_one_entry() -> None:
    slots = HeldSlots(4, 3, "mine")
    assert len(slots) == 4 and slots[3] == "mine" and slots[-1] == "mine"
    slots[3] = "new"
    assert slots[3] == "new"
    with pytest.raises(DataAccessError, match="client 3 read client 0"):
        slots[0]
    with pytest.raises(DataAccessError, match="client 3 read client 1"):
        slots[1] = "theirs"
    with pytest.raises(DataAccessError):
        list(slots)
