"""Checks on large tensors that allocate only a bounded scratch, whatever the tensor's size,
and a count of the tensor memory an object graph holds."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

__all__ = ["FINITE_CHECK_ELEMENTS", "all_finite", "reachable_bytes"]

#: Elements checked per slice by :func:`all_finite` (64 MiB of float32): ``torch.isfinite`` on
#: a whole (N x P) matrix allocates an N x P temporary (a 4.5 GiB matrix at 10,000 clients
#: would need several GiB more while a checkpoint is restored).
FINITE_CHECK_ELEMENTS = 1 << 24


def all_finite(tensor: Tensor) -> bool:
    """Whether every element of ``tensor`` is finite (always True for non-float dtypes).

    Screened by the tensor's sum first (one read pass, no scratch, several times faster than
    ``isfinite``): a NaN or infinite element makes the sum NaN or infinite. Only a sum that is
    not finite (a non-finite element, or finite elements whose sum overflowed) is checked
    element by element, slice by slice, so that the scratch never exceeds
    :data:`FINITE_CHECK_ELEMENTS` elements (a non-contiguous tensor row by row of its first
    dimension)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    if tensor.numel() <= FINITE_CHECK_ELEMENTS:
        return bool(tensor.isfinite().all())
    if not tensor.is_contiguous():
        return all(all_finite(part) for part in tensor.unbind(0))
    flat = tensor.view(-1)
    return all(bool(part.isfinite().all()) for part in flat.split(FINITE_CHECK_ELEMENTS))


def reachable_bytes(*roots: Any) -> int:
    """Bytes of every strided tensor storage (each storage once, however many views share it)
    and every ``torch.Generator`` state reachable from ``roots`` through dicts, lists, tuples,
    sets, instance ``__dict__`` and ``__slots__``. Types, modules, functions and scalars are not
    followed. Used to check what a process holds (e.g. one Flower client's method)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    total = 0
    stack = list(roots)
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.MethodType, str, bytes, int, float, bool, type(None))
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if obj.layout == torch.strided:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0),
                                                   storage.nbytes())
            continue
        if isinstance(obj, torch.Generator):
            total += obj.get_state().numel()
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        if hasattr(obj, "__dict__"):
            stack.append(vars(obj))
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                stack.append(getattr(obj, slot))
    return total + sum(storages.values())
