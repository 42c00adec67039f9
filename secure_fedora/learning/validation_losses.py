"""FEDORA's two validation losses per client, for many clients in one call, each client's
values bit-identical to computing that client alone.

FEDORA's selective regularization compares ``L(theta_i)`` and ``L(phi_i)`` on client ``i``'s
validation split and pulls only when ``L(theta_i) > L(phi_i)``: a jump from 0 to about 1. When
``phi_i`` is close to ``theta_i`` (early rounds) the two losses differ by float rounding only,
so *any* change of arithmetic between two computations of the same client can flip its
``lambda``. The Flower runtime computes one client per process, the in-process runtime all
participants at once; both must give the same ``lambda``.

Batched matmuls (``torch.bmm`` over a chunk of clients) do not give that guarantee: measured
with torch 2.13 / MKL on CPU, a client's ``bmm`` result changes with the number of other
clients in the batch (one row per client with ``W @ h^T``, and with two threads also
``baddbmm`` at 5 or 10 rows per client). :func:`validation_losses` therefore computes every
client with the arithmetic of :func:`~secure_fedora.learning.client.evaluate` itself, client by
client, with every call's arguments depending only on that client's row and split:

- for a stack of ``nn.Linear`` layers, ``nn.Flatten`` and elementwise activations (the built-in
  ``mlp``), the layers are called directly on views of the parameter row (``torch.addmm``,
  exactly what ``nn.Linear`` calls for 2-D inputs), skipping ``evaluate``'s per-call module
  binding, metric and bookkeeping; a one-time probe per model checks that this gives the
  module's outputs bit for bit, else the module itself is used;
- for any other model, the module itself (``FlatModel.bind`` + forward, as ``evaluate``).

Either way a row or inputs stored off a 64-byte boundary are computed on an aligned copy, as
``evaluate`` does (:func:`~secure_fedora.learning.client.aligned`: one-row forwards round
differently by address; on the direct path a row is copied into one reused aligned buffer whose
layer views are made once per call), and the loss is ``evaluate``'s: ``task.sum_loss`` per 4096-row batch in float32,
summed as Python floats and divided by the split size. So a client's two losses are equal to
``evaluate(flat, row, x, y).loss`` bit for bit, whether the call holds one client or thousands
(tested), and identical rows give identical losses (``lambda = 0`` exactly).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from secure_fedora.learning.batched_eval import _Flatten, _Linear, _linear_program, _Map, _Step
from secure_fedora.learning.client import (
    ALIGNMENT_BYTES,
    ClientUpdateError,
    FlatModel,
    aligned,
    aligned_empty,
)

__all__ = ["EVALUATE_BATCH", "ValidationLossPair", "direct_path", "validation_losses"]

EVALUATE_BATCH = 4096
"""Rows per forward pass; :func:`~secure_fedora.learning.client.evaluate`'s default batch size."""


class ValidationLossPair(NamedTuple):
    """Per client, in the order given: the mean validation loss of ``theta_i`` (``local``) and
    of ``phi_i`` (``received``)."""

    local: list[float]
    received: list[float]


# Per model: the direct Linear program, or None when the module itself must be called.
_PROGRAMS: weakref.WeakKeyDictionary[FlatModel, tuple[list[_Step] | None, str]] = weakref.WeakKeyDictionary()


def _layer_views(program: list[_Step], row: Tensor) -> list[tuple[Tensor, Tensor | None] | None]:
    """Per step of ``program``: the ``(W^T, bias)`` views of ``row`` for a Linear step (as
    ``nn.Linear`` passes them to ``addmm``), None for any other step."""
    views: list[tuple[Tensor, Tensor | None] | None] = []
    for step in program:
        if type(step) is _Linear:
            w = row[step.weight: step.weight + step.out_features * step.in_features].view(
                step.out_features, step.in_features)
            bias = None if step.bias is None else row[step.bias: step.bias + step.out_features]
            views.append((w.t(), bias))
        else:
            views.append(None)
    return views


def _run_views(program: list[_Step], views: list[tuple[Tensor, Tensor | None] | None], x: Tensor) -> Tensor:
    """The model's outputs on ``x`` with the Linear layers' views ``views`` (:func:`_layer_views`)."""
    h = x
    owned = False
    for step, view in zip(program, views, strict=True):
        if view is not None:
            if h.dim() != 2:
                raise ValueError("the direct path takes 2-D activations only")
            w_t, bias = view
            h = torch.mm(h, w_t) if bias is None else torch.addmm(bias, h, w_t)
            owned = True
        elif type(step) is _Flatten:
            h = h.flatten(1)
        else:
            assert isinstance(step, _Map)
            if not owned and getattr(step.module, "inplace", False):
                h, owned = h.clone(), True  # never write into the caller's inputs
            h = step.module.forward(h)
    return h


def _run_program(program: list[_Step], row: Tensor, x: Tensor) -> Tensor:
    """The model's outputs on ``x`` (a batch of samples) with parameters ``row``, computed as
    ``nn.Linear`` (``addmm(bias, h, W^T)`` on 2-D inputs), ``nn.Flatten`` and the activation
    modules compute them (their ``forward``; the program has no hooks)."""
    return _run_views(program, _layer_views(program, row), x)


class _Staged:
    """One reusable copy of a parameter row on an :data:`ALIGNMENT_BYTES` boundary, with the
    direct program's layer views bound to it once. A row stored off the boundary is copied in
    and computed there: the same values at an aligned address, as :func:`aligned`'s fresh copy
    gives them (the same bits), without a new allocation and the per-call views each time."""

    def __init__(self, program: list[_Step], num_params: int, like: Tensor) -> None:
        self.program = program
        self.row = aligned_empty((num_params,), like.dtype, like.device)
        self.views = _layer_views(program, self.row)

    def load(self, row: Tensor) -> Callable[[Tensor], Tensor]:
        """Copy ``row`` in; the forward of the staged copy on a batch ``x``."""
        self.row.copy_(row)
        return lambda x: _run_views(self.program, self.views, x)


@torch.no_grad()
def direct_path(flat: FlatModel, sample: Tensor) -> tuple[bool, str]:
    """Whether :func:`validation_losses` calls the layers directly for ``flat`` (and why not):
    decided once per model by comparing the direct outputs of two parameter rows on
    ``sample`` (a few real inputs) with the module's own, bit for bit."""
    cached = _PROGRAMS.get(flat)
    if cached is not None:
        return cached[0] is not None, cached[1]
    try:
        program = _linear_program(flat)
    except ValueError as err:
        _PROGRAMS[flat] = (None, f"the module itself: {err}")
        return False, _PROGRAMS[flat][1]
    gen = torch.Generator().manual_seed(20231201)
    rows = (torch.randn(2, flat.num_params, generator=gen) * 0.05).to(sample.device)
    module = flat.module
    was_training = module.training
    module.eval()
    try:
        same = all(torch.equal(_run_program(program, rows[j], sample), flat.bind(rows[j])(sample))
                   for j in range(2))
        reason = "direct Linear layers (bit-identical to the module on the probe)" if same else \
            "the module itself: the direct Linear layers differ from the module on the probe"
    except Exception as err:  # noqa: BLE001 - any failure means: call the module itself
        same, reason = False, f"the module itself: {type(err).__name__}: {err}"
    finally:
        module.train(was_training)
    _PROGRAMS[flat] = (program if same else None, reason)
    return same, reason


def _losses(flat: FlatModel, forward, rows: Sequence[Tensor], splits: Sequence[tuple[Tensor, Tensor]],
            name: str, staged: _Staged | None = None) -> list[float]:
    """``evaluate``'s loss of ``rows[k]`` on ``splits[k]``: float32 ``sum_loss`` per batch of
    :data:`EVALUATE_BATCH` rows, summed as Python floats from 0.0, divided by the split size.
    With ``staged`` (the direct path on the CPU) a row off the alignment is computed on the
    staged copy instead of a fresh :func:`aligned` copy (equal values and alignment)."""
    sum_loss = flat.task.sum_loss
    shape = (flat.num_params,)
    single: list[Tensor] = []  # float32 sums of one-batch splits, read together below
    totals: list[float | None] = []
    for k, ((x, y), row) in enumerate(zip(splits, rows, strict=True)):
        if row.shape != shape:
            raise ClientUpdateError(f"{name} row {k} has shape {tuple(row.shape)}, "
                                    f"expected ({flat.num_params},)")
        if row.data_ptr() % ALIGNMENT_BYTES:
            if staged is not None and row.dtype == staged.row.dtype and row.device == staged.row.device:
                run = staged.load(row)  # the copy also brings the row into L2
            else:
                run = partial(forward, aligned(row))  # as evaluate() computes it
        else:
            if row.device.type == "cpu":
                # One streaming read first: the forward's transposed-weight GEMM (addmm(b, x, W^T)
                # with a few rows) reads a cold row far below memory bandwidth, a plain sum at full
                # bandwidth; the row then sits in L2. 1,000 clients x 10 rows, one thread: 0.255 s
                # -> 0.21 s. The values computed are unchanged.
                row.sum()
            run = partial(forward, row)
        if x.shape[0] <= EVALUATE_BATCH:
            single.append(sum_loss(run(aligned(x)), y))
            totals.append(None)
        else:  # several batches: accumulated exactly as evaluate() does
            total = 0.0
            for start in range(0, x.shape[0], EVALUATE_BATCH):
                stop = start + EVALUATE_BATCH
                total += sum_loss(run(aligned(x[start:stop])), y[start:stop]).item()
            totals.append(total)
    # one read of all one-batch sums: float32 values become the same Python floats as .item()
    read = iter(torch.stack(single).tolist() if single else [])
    return [(0.0 + (next(read) if t is None else t)) / x.shape[0]
            for t, (x, _) in zip(totals, splits, strict=True)]


@torch.no_grad()
def validation_losses(flat: FlatModel, theta_rows: Sequence[Tensor], phi_rows: Sequence[Tensor],
                      splits: Sequence[tuple[Tensor, Tensor]]) -> ValidationLossPair:
    """For each client ``k``: ``evaluate(flat, theta_rows[k], *splits[k]).loss`` and the same
    for ``phi_rows[k]``, bit for bit, and independent of which other clients the call holds.

    Rows are float32 vectors of ``flat.num_params`` values (e.g. views ``theta[i]``); splits are
    ``(x_k, y_k)`` pairs on the rows' device. Raises :class:`ClientUpdateError` for mismatched
    counts, a row of the wrong shape or an empty split (as ``evaluate`` does).
    """
    count = len(splits)
    if len(theta_rows) != count or len(phi_rows) != count:
        raise ClientUpdateError(f"{len(theta_rows)} theta rows and {len(phi_rows)} phi rows for "
                                f"{count} validation splits")
    local: list[float] = []
    received: list[float] = []
    if count == 0:
        return ValidationLossPair(local, received)
    direct, _ = direct_path(flat, splits[0][0][:2])
    module = flat.module
    was_training = module.training
    module.eval()
    try:
        program = _PROGRAMS[flat][0]
        if direct:
            assert program is not None

            def forward(row: Tensor, x: Tensor) -> Tensor:
                return _run_program(program, row, x)
        else:
            def forward(row: Tensor, x: Tensor) -> Tensor:
                return flat.bind(row)(x)

        for k, (x, y) in enumerate(splits):
            if x.shape[0] == 0:
                raise ClientUpdateError(f"split {k}: cannot evaluate on an empty split")
            if y.shape[0] != x.shape[0]:
                raise ClientUpdateError(f"split {k} has {x.shape[0]} inputs but {y.shape[0]} targets")
        staged = None
        if direct and theta_rows[0].device.type == "cpu":
            staged = _Staged(program, flat.num_params, theta_rows[0])
        local = _losses(flat, forward, theta_rows, splits, "theta", staged)
        received = _losses(flat, forward, phi_rows, splits, "phi", staged)
    finally:
        module.train(was_training)
    return ValidationLossPair(local, received)
