"""Per-client state in a process that serves one client: one slot, not ``num_clients``.

A Flower ClientApp runs the client half of a method for one client ``i`` of ``N``. Its
method object is the same class the server and the in-process runtime build, whose state
layout is "one row per client" (``theta`` is N x P). On a client context
(``MethodContext.held = i``) the methods allocate that state as :class:`HeldRows` (client
``i``'s row only) and the context's generators and noise sources as :class:`HeldSlots`, so a
client holds O(P) memory whatever ``N`` is. Reading another client's entry, iterating, or
computing on the whole matrix raises :class:`DataAccessError`: never a silent wrong value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from privacy.errors import ToolkitError

__all__ = ["DataAccessError", "HeldAttributeError", "HeldRows", "HeldSlots", "held_index",
           "per_client"]

T = TypeVar("T")


class DataAccessError(ToolkitError, RuntimeError):
    """A method read client data or state its process does not hold (a contract violation)."""


def _refusal(party: str, i: int) -> DataAccessError:
    return DataAccessError(
        f"{party} read client {i}'s data, which it does not hold (the method's halves must "
        "keep to the contract: the server half reads no client data, client i's half only "
        "client i's)")


def held_index(index: Any, n: int, held: int | None, party: str) -> int:
    """``index`` (negative counts from the end) as a client number, when it is ``held``, the
    one client ``party`` holds (None: it holds none); IndexError out of range,
    DataAccessError for any other client or an index that is not an int."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise DataAccessError(
            f"{party} holds only client {held}'s entry of a per-client matrix; it can be "
            f"indexed by a client number, not by {type(index).__name__} {index!r}")
    i = index + n if index < 0 else index
    if not 0 <= i < n:
        raise IndexError(f"client {index} out of range for {n} clients")
    if i != held:
        raise _refusal(party, i)
    return i


class HeldAttributeError(DataAccessError, AttributeError):
    """A whole-matrix tensor method was asked of a :class:`HeldRows` (``hasattr`` is False)."""


class HeldSlots(Generic[T]):
    """``num_clients`` slots of which only ``held``'s can be read or replaced."""

    def __init__(self, num_clients: int, held: int, value: T, party: str | None = None) -> None:
        self._n, self._held, self._value = num_clients, held, value
        self._party = party or f"client {held}"

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> T:
        held_index(index, self._n, self._held, self._party)
        return self._value

    def __setitem__(self, index: int, value: T) -> None:
        held_index(index, self._n, self._held, self._party)
        self._value = value

    def __iter__(self) -> Iterator[T]:
        raise DataAccessError(f"{self._party} cannot iterate over every client's entries")


class HeldRows:
    """An ``N x ...`` per-client matrix of which a client holds only its own row ``held``.

    ``rows[held]`` (also with trailing indices, ``rows[held, 0]``) and the one-row slice
    ``rows[held:held + 1]`` are views of one stored row and can be written in place;
    ``shape``, ``dtype``, ``device`` and ``len`` describe the full matrix. Any other row,
    slice, iteration or torch operation on the whole matrix raises :class:`DataAccessError`.
    """

    def __init__(self, num_clients: int, held: int, row: Tensor, party: str | None = None) -> None:
        self._n, self._held = num_clients, held
        self._data = row.unsqueeze(0)
        self._party = party or f"client {held}"

    @property
    def shape(self) -> torch.Size:
        """The whole matrix's shape (N rows), as the server's matrix has, though only one row is
        held."""
        return torch.Size((self._n, *self._data.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        """The held row's dtype."""
        return self._data.dtype

    @property
    def device(self) -> torch.device:
        """The held row's device."""
        return self._data.device

    @property
    def held(self) -> int:
        """The client whose row this is."""
        return self._held

    def __len__(self) -> int:
        return self._n

    def _resolve(self, index: Any) -> Any:
        if isinstance(index, tuple) and index:
            return (self._resolve(index[0]), *index[1:])
        if isinstance(index, slice):
            n = self._n
            start, stop, step = index.indices(n)
            if step == 1 and start == self._held and stop == self._held + 1:
                return slice(0, 1)
            raise DataAccessError(
                f"{self._party} holds only row {self._held} of a per-client matrix and cannot "
                f"read rows {start}:{stop}:{step}")
        held_index(index, self._n, self._held, self._party)
        return 0

    def __getitem__(self, index: Any) -> Tensor:
        return self._data[self._resolve(index)]

    def __setitem__(self, index: Any, value: Any) -> None:
        self._data[self._resolve(index)] = value

    def __iter__(self) -> Iterator[Tensor]:
        raise DataAccessError(f"{self._party} cannot iterate over every client's rows")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise HeldAttributeError(
            f"{name!r} of a whole per-client matrix in a process that holds only client "
            f"{self._held}'s row: only the server (or the in-process runtime) computes on "
            "every client's rows")

    def clone(self) -> HeldRows:
        """A copy (the same one row held)."""
        return HeldRows(self._n, self._held, self._data[0].clone(), self._party)

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        raise DataAccessError(
            f"{getattr(func, '__name__', func)} over a whole per-client matrix in a process "
            "that holds one client's row: only the server (or the in-process runtime) computes "
            "on every client's rows")


def per_client(num_clients: int, held: int | None, row: Tensor) -> Tensor | HeldRows:
    """``num_clients`` copies of ``row`` stacked (an N x ... tensor), or with ``held`` set
    (a process serving that one client) a :class:`HeldRows` holding a copy of ``row`` only."""
    if held is None:
        return row.unsqueeze(0).repeat(num_clients, *([1] * row.dim()))
    return HeldRows(num_clients, held, row.clone())
