"""Evaluate many clients' parameter rows at once, equal to the per-client :func:`evaluate`.

A round evaluates every client (validation and test metric) and FEDORA's clients each compute
two validation losses (``theta_i`` and ``phi_i``) for their regularization weight. With small
splits the per-call overhead of :func:`~secure_fedora.learning.client.evaluate` dominates;
here the clients are evaluated together, in chunks:

- ``"linear"``: the model is a stack of ``nn.Linear`` layers with ``nn.Flatten`` and
  elementwise activations (the built-in ``mlp``, the breast-cancer example). Each layer of a
  chunk of clients is one batched matmul (``torch.baddbmm``) of the clients' weight matrices,
  read as views of their parameter rows, with the clients' samples padded to the chunk's
  largest split; padded rows are dropped before the loss.
- ``"vmap"``: any other model that ``torch.func.functional_call`` + ``torch.func.vmap`` can
  run (e.g. the CNNs of ``examples/digits.py`` and the built-in ``cnn``), on the same padded
  layout.
- ``"loop"``: the per-client :func:`evaluate` itself, for models neither path runs.

The strategy is chosen once per model and input shape (:func:`plan_evaluation`), before any
client is evaluated: a probe compares the batched forward of two random parameter rows with
the module's own forward on real inputs. A path that fails or disagrees is not used, and the
plan says why (``EvaluationPlan.reason``); a strategy forced by the caller that does not apply
raises :class:`ClientUpdateError`. Results never depend on the strategy beyond float rounding.

Equality with :func:`evaluate` (tested): the loop path is exactly :func:`evaluate`. The
batched paths compute the same float32 forward with a different matmul kernel (``bmm`` instead
of ``addmm``) and sum per-sample losses in float64 instead of per-batch float32 sums, so the
loss agrees within 1e-5 relative (measured: about 1e-7), accuracy and AUC are exactly equal
unless two logits (or scores) of a sample are within float32 rounding of each other.
Identical rows on identical data give bit-identical results within one call, so a
FEDORA client whose ``theta_i`` equals ``phi_i`` still gets ``lambda = 0`` exactly.

Clients are packed (sorted by split size, padded, moved to the rows' device) by
:func:`pack_splits`; pack a run's fixed validation/test splits once and reuse the
:class:`PackedSplits` every round. Chunks are sized to about ``chunk_bytes`` of memory, so
evaluating 10,000 clients never materializes all of them at once beyond the rows the caller
holds. :func:`pack_split_sets` + :func:`evaluate_many_sets` evaluate each row on several sets
(validation and test) in one pass, reading the row once (at 10,000 clients the rows, not the
arithmetic, bound the time).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from secure_fedora.learning.client import (
    ClientUpdateError,
    Evaluation,
    FlatModel,
    aliased_module,
    aligned,
    evaluate,
)
from secure_fedora.learning.tasks import MetricError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EvaluationPlan",
    "PackedSplits",
    "ValidationLosses",
    "evaluate_many",
    "evaluate_many_sets",
    "pack_split_sets",
    "pack_splits",
    "plan_evaluation",
    "validation_losses_many",
]

Strategy = Literal["auto", "linear", "vmap", "loop"]
Split = tuple[Tensor, Tensor]
Rows = Tensor | Sequence[Tensor]

DEFAULT_CHUNK_BYTES = 128 * 2**20
"""Memory a chunk of clients may take (rows it gathers and its padded inputs and activations)."""

# Layers applied sample by sample and element by element: the batched path calls them as is.
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Identity,
)
# Identity in evaluation mode (evaluate() runs the model in eval mode).
_EVAL_IDENTITY: tuple[type[nn.Module], ...] = (nn.Dropout, nn.AlphaDropout)
# Activation memory allowance per input element when sizing chunks (a CNN's first layers
# hold several times its input).
_ACTIVATION_FACTOR = 8
_PROBE_SEED = 20231201
# Up to this many rows per client a layer is computed as W @ h^T (measured faster on CPU for
# 1-4 rows, slower from 6).
_FEW_ROWS = 4


@dataclass(frozen=True)
class EvaluationPlan:
    """How a model is evaluated in batch: ``"linear"``, ``"vmap"`` or ``"loop"``, and why."""

    strategy: Literal["linear", "vmap", "loop"]
    reason: str


class ValidationLosses(NamedTuple):
    """Mean validation losses of ``theta_i`` (``local``) and ``phi_i`` (``received``) per client,
    in the order of the rows given."""

    local: list[float]
    received: list[float]


# ----------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class _Chunk:
    clients: list[int]  # positions in the caller's order
    index: Tensor  # the same, as a long tensor on the device
    start: int | None  # clients == range(start, start + K): rows are a view, not a copy
    counts: list[int]  # rows per segment: segment j * num_sets + s is client j's split of set s
    sample_shape: tuple[int, ...]
    x: Tensor  # (K, max_rows, *sample_shape): each client's sets one after the other, zero padded
    y: Tensor  # (S, ...) targets of the chunk's samples, segment by segment
    valid: Tensor  # (S,) positions of the real samples in the flattened (K * max_rows)
    owner: Tensor  # (S,) segment of each real sample


@dataclass(frozen=True)
class PackedSplits:
    """One or more sets of splits ``(x_k, y_k)`` of many clients (e.g. validation and test),
    sorted by size into padded chunks on ``device``; client ``k``'s splits of all sets share
    one padded slot, so its row is read once for all of them.

    Built by :func:`pack_splits` / :func:`pack_split_sets`; reusable for every evaluation of
    the same splits (the data is copied once into the padded chunks; ``sets`` keeps the
    originals on ``device`` for the per-client path).
    """

    sets: list[list[Split]]
    chunks: list[_Chunk]
    device: torch.device
    num_params: int

    def __len__(self) -> int:
        return len(self.sets[0]) if self.sets else 0

    @property
    def num_sets(self) -> int:
        """How many splits are packed."""
        return len(self.sets)


def pack_splits(flat: FlatModel, splits: Sequence[Split], device: torch.device | str | None = None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PackedSplits:
    """Pack ``splits`` for :func:`evaluate_many` / :func:`validation_losses_many`.

    Clients are ordered by (sample shape, split size) and cut into chunks of about
    ``chunk_bytes`` (``4 * (num_params + 8 * rows * sample_size)`` bytes per client); within
    a chunk the inputs are zero padded to its largest split. ``device``: where evaluation runs
    (the rows' device; default: the first split's). Raises :class:`ClientUpdateError` for an
    empty split (as :func:`evaluate` does) or inputs and targets of different lengths.
    """
    return pack_split_sets(flat, [splits], device, chunk_bytes)


def pack_split_sets(flat: FlatModel, sets: Sequence[Sequence[Split]],
                    device: torch.device | str | None = None,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PackedSplits:
    """Pack several sets of splits of the same clients (``sets[s][k]``: client ``k``'s split
    of set ``s``, e.g. ``[val_splits, test_splits]``) for :func:`evaluate_many_sets`, which
    evaluates each row on all its sets in one pass. Same rules as :func:`pack_splits`
    (which is the one-set case); every set must hold the same number of clients.
    """
    if chunk_bytes < 1:
        raise ClientUpdateError(f"chunk_bytes must be positive; got {chunk_bytes}")
    sets = [list(splits) for splits in sets]
    if not sets:
        raise ClientUpdateError("no split sets to pack")
    count = len(sets[0])
    if any(len(splits) != count for splits in sets):
        raise ClientUpdateError(f"split sets hold different numbers of clients: {[len(x) for x in sets]}")
    if count == 0:
        return PackedSplits([[] for _ in sets], [], torch.device(device or "cpu"), flat.num_params)
    target = torch.device(device) if device is not None else sets[0][0][0].device
    moved_sets: list[list[Split]] = []
    for number, splits in enumerate(sets):
        moved: list[Split] = []
        for k, split in enumerate(splits):
            where = f"split {k}" if len(sets) == 1 else f"set {number} split {k}"
            if not (isinstance(split, tuple | list) and len(split) == 2):
                raise ClientUpdateError(f"{where} must be a pair (x, y); got {type(split).__name__}")
            x, y = split
            if x.shape[0] == 0:
                raise ClientUpdateError(f"{where}: cannot evaluate on an empty split")
            if y.shape[0] != x.shape[0]:
                raise ClientUpdateError(f"{where} has {x.shape[0]} inputs but {y.shape[0]} targets")
            if number and tuple(x.shape[1:]) != tuple(moved_sets[0][k][0].shape[1:]):
                raise ClientUpdateError(f"{where} has inputs {tuple(x.shape[1:])}, set 0 has "
                                        f"{tuple(moved_sets[0][k][0].shape[1:])}")
            moved.append((x.to(target), y.to(target)))
        moved_sets.append(moved)

    def rows_of(k: int) -> int:
        return sum(int(splits[k][0].shape[0]) for splits in moved_sets)

    def shape_of(k: int) -> tuple[int, ...]:
        return tuple(moved_sets[0][k][0].shape[1:])

    order = sorted(range(count), key=lambda k: (shape_of(k), rows_of(k)))
    chunks: list[_Chunk] = []
    group: list[int] = []
    for k in order:
        # rows_of(k) is the largest so far in this group (sorted)
        per_client = 4 * (flat.num_params + _ACTIVATION_FACTOR * rows_of(k) * max(1, math.prod(shape_of(k))))
        if group and (shape_of(group[0]) != shape_of(k) or (len(group) + 1) * per_client > chunk_bytes):
            chunks.append(_make_chunk(moved_sets, group, target))
            group = []
        group.append(k)
    chunks.append(_make_chunk(moved_sets, group, target))
    return PackedSplits(moved_sets, chunks, target, flat.num_params)


def _make_chunk(sets: list[list[Split]], clients: list[int], device: torch.device) -> _Chunk:
    parts = [splits[k] for k in clients for splits in sets]  # segment order
    counts = [int(x.shape[0]) for x, _ in parts]
    num_sets = len(sets)
    slot_rows = [sum(counts[j * num_sets: (j + 1) * num_sets]) for j in range(len(clients))]
    sample_shape = tuple(parts[0][0].shape[1:])
    size, longest = len(clients), max(slot_rows)
    xs = torch.cat([x for x, _ in parts])
    ys = torch.cat([y for _, y in parts])
    owner = torch.repeat_interleave(torch.arange(len(parts), device=device),
                                    torch.tensor(counts, device=device))
    slot = torch.repeat_interleave(torch.arange(size, device=device),
                                   torch.tensor(slot_rows, device=device))
    first = torch.cumsum(torch.tensor([0, *slot_rows[:-1]], device=device), 0)
    valid = slot * longest + (torch.arange(xs.shape[0], device=device) - first[slot])
    if all(c == longest for c in slot_rows):
        x = xs.reshape(size, longest, *sample_shape)
    else:
        x = xs.new_zeros((size * longest, *sample_shape))
        x.index_copy_(0, valid, xs)
        x = x.reshape(size, longest, *sample_shape)
    contiguous = clients == list(range(clients[0], clients[0] + size))
    return _Chunk(clients, torch.tensor(clients, device=device, dtype=torch.long),
                  clients[0] if contiguous else None, counts, sample_shape, x, ys, valid, owner)


# ----------------------------------------------------------------------------- batched forwards
@dataclass(frozen=True)
class _Linear:
    weight: int  # offset of the (out, in) weight in the row
    in_features: int
    out_features: int
    bias: int | None


@dataclass(frozen=True)
class _Flatten:
    pass


@dataclass(frozen=True)
class _Map:
    module: nn.Module


_Step = _Linear | _Flatten | _Map


def _leaves(module: nn.Module) -> list[nn.Module]:
    if module._forward_hooks or module._forward_pre_hooks:
        raise ValueError(f"{type(module).__name__} has forward hooks")
    if type(module) is nn.Sequential:
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _linear_program(flat: FlatModel) -> list[_Step]:
    """The model as batched steps; raises ValueError naming what is not a Linear stack."""
    offsets: dict[int, int] = {}
    offset = 0
    for p, size in zip(flat.params, flat.sizes, strict=True):
        offsets[id(p)] = offset
        offset += size
    program: list[_Step] = []
    used: set[int] = set()
    for leaf in _leaves(flat.module):
        kind = type(leaf)
        if kind is nn.Linear:
            assert isinstance(leaf, nn.Linear)
            if id(leaf.weight) not in offsets or (leaf.bias is not None and id(leaf.bias) not in offsets):
                raise ValueError("a Linear layer's parameters are not in the flat row")
            program.append(_Linear(offsets[id(leaf.weight)], leaf.in_features, leaf.out_features,
                                   None if leaf.bias is None else offsets[id(leaf.bias)]))
            used.update(id(p) for p in leaf.parameters())
        elif kind is nn.Flatten:
            assert isinstance(leaf, nn.Flatten)
            if (leaf.start_dim, leaf.end_dim) != (1, -1):
                raise ValueError(f"Flatten(start_dim={leaf.start_dim}, end_dim={leaf.end_dim}) "
                                 "is not the per-sample flatten")
            program.append(_Flatten())
        elif kind in _ELEMENTWISE:
            program.append(_Map(leaf))
        elif kind in _EVAL_IDENTITY:
            continue
        else:
            raise ValueError(f"layer {kind.__name__} is not Linear, Flatten or an elementwise activation")
        if kind is not nn.Linear and any(True for _ in leaf.parameters()):
            raise ValueError(f"layer {kind.__name__} has parameters")
    if used != set(offsets):
        raise ValueError("the model has parameters outside its Linear layers")
    return program


def _forward_linear(program: list[_Step], rows: Tensor, x: Tensor) -> Tensor:
    """Outputs ``(K, n, ...)`` of ``K`` rows on their inputs ``x`` ``(K, n, ...)``."""
    k, n = int(x.shape[0]), int(x.shape[1])
    h, owned = x, False
    for step in program:
        if isinstance(step, _Linear):
            w = rows[:, step.weight: step.weight + step.out_features * step.in_features]
            w = w.view(k, step.out_features, step.in_features)
            inner = h.shape[2:-1]
            flat_h = h.reshape(k, -1, step.in_features)
            bias = None if step.bias is None else rows[:, step.bias: step.bias + step.out_features].unsqueeze(1)
            if flat_h.shape[1] <= _FEW_ROWS:
                # a few rows per client: W @ h^T streams each weight matrix once, ~1.7x faster
                out = torch.bmm(w, flat_h.transpose(1, 2)).transpose(1, 2)
                out = out if bias is None else out + bias
            elif bias is None:
                out = torch.bmm(flat_h, w.transpose(1, 2))
            else:
                out = torch.baddbmm(bias, flat_h, w.transpose(1, 2))
            h, owned = out.reshape(k, n, *inner, step.out_features), True
        elif isinstance(step, _Flatten):
            h = h.reshape(k, n, -1)
        else:
            if not owned:  # an in-place activation must not write into the packed inputs
                h, owned = h.clone(), True
            h = step.module(h)
    return h


def _forward_vmap(flat: FlatModel, names: list[str], rows: Tensor, x: Tensor) -> Tensor:
    k = int(rows.shape[0])
    params = []
    offset = 0
    for shape, size in zip(flat.shapes, flat.sizes, strict=True):
        params.append(rows[:, offset: offset + size].view(k, *shape))
        offset += size
    module = flat.module

    def one(ps: tuple[Tensor, ...], xi: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(zip(names, ps, strict=True)), (xi,))

    if any(getattr(m, "inplace", False) for m in module.modules()):
        x = x.clone()
    try:
        return torch.func.vmap(one)(tuple(params), x)
    except RuntimeError:
        if any(True for _ in module.buffers()):
            _name_written_buffer(module, x[0])
        raise


def _name_written_buffer(module: nn.Module, sample: Tensor) -> None:
    """A vmapped evaluation failed: raise ModelError naming the buffer that ``module``'s
    forward writes on ``sample`` (one client's rows, not vmapped), so that a model writing a
    buffer while evaluating is refused by name, as in a Flower client, instead of with torch's
    in-place shape error; return when no buffer is written (the caller re-raises)."""
    from secure_fedora.learning.models import check_buffers_constant

    check_buffers_constant(module, sample, "model")


def _parameter_names(flat: FlatModel) -> list[str]:
    aliased = aliased_module(flat.module)
    if aliased is not None:  # torch.func would leave its tensors in the module
        raise ValueError(f"{aliased} (one module under two names)")
    by_id = {id(p): name for name, p in flat.module.named_parameters()}
    if len(by_id) != len(flat.params) or any(id(p) not in by_id for p in flat.params):
        raise ValueError("the flat parameters are not the module's named parameters")
    return [by_id[id(p)] for p in flat.params]


# ----------------------------------------------------------------------------- plans
_PLANS: weakref.WeakKeyDictionary[FlatModel, dict[tuple, tuple[EvaluationPlan, object]]] = (
    weakref.WeakKeyDictionary())


class _EvalMode:
    def __init__(self, module: nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)


@torch.no_grad()
def _probe(flat: FlatModel, forward, sample: Tensor) -> str | None:
    """None when the batched ``forward`` matches the module on two random rows, else why not."""
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    rows = (torch.randn(2, flat.num_params, generator=gen) * 0.05).to(sample.device)
    x = sample.unsqueeze(0).expand(2, *sample.shape).contiguous()
    try:
        with _EvalMode(flat.module):
            batched = forward(rows, x)
            expected = torch.stack([flat.bind(rows[j])(x[j]) for j in range(2)])
    except Exception as err:  # noqa: BLE001 - any failure means: do not use this path
        return f"{type(err).__name__}: {err}"
    if batched.shape != expected.shape:
        return f"batched outputs {tuple(batched.shape)} differ from {tuple(expected.shape)}"
    if not torch.allclose(batched, expected, rtol=1e-4, atol=1e-5):
        return f"batched outputs differ by up to {float((batched - expected).abs().max()):.3g}"
    return None


def plan_evaluation(flat: FlatModel, sample: Tensor, strategy: Strategy = "auto") -> EvaluationPlan:
    """The strategy :func:`evaluate_many` uses for ``flat`` on inputs like ``sample`` (a few
    real input rows ``(n, ...)``), decided once per model, input shape, dtype and device.

    ``"auto"`` takes the first of ``linear``, ``vmap``, ``loop`` whose probe matches the
    module; a forced ``"linear"`` or ``"vmap"`` that does not apply raises
    :class:`ClientUpdateError` with the reason; ``"loop"`` is always available.
    """
    return _plan(flat, sample, strategy)[0]


def _plan(flat: FlatModel, sample: Tensor, strategy: Strategy) -> tuple[EvaluationPlan, object]:
    if strategy not in ("auto", "linear", "vmap", "loop"):
        raise ClientUpdateError(f"unknown evaluation strategy {strategy!r}; expected auto, linear, "
                                "vmap or loop")
    if strategy == "loop":
        return EvaluationPlan("loop", "requested"), None
    sample = sample[:4]
    key = (strategy, tuple(sample.shape[1:]), sample.dtype, sample.device)
    cache = _PLANS.setdefault(flat, {})
    if key in cache:
        return cache[key]
    reasons: list[str] = []
    found: tuple[EvaluationPlan, object] | None = None
    if strategy in ("auto", "linear"):
        try:
            program = _linear_program(flat)
        except ValueError as err:
            reasons.append(f"linear: {err}")
        else:
            why = _probe(flat, lambda r, x: _forward_linear(program, r, x), sample)
            if why is None:
                found = EvaluationPlan("linear", "a stack of Linear layers and activations"), program
            else:
                reasons.append(f"linear: {why}")
    if found is None and strategy in ("auto", "vmap"):
        try:
            names = _parameter_names(flat)
        except ValueError as err:
            reasons.append(f"vmap: {err}")
        else:
            why = _probe(flat, lambda r, x: _forward_vmap(flat, names, r, x), sample)
            if why is None:
                note = "; ".join(reasons)
                found = EvaluationPlan("vmap", "torch.func.vmap over the stacked parameters"
                                       + (f" ({note})" if note else "")), names
            else:
                reasons.append(f"vmap: {why}")
    if found is None:
        if strategy != "auto":
            raise ClientUpdateError(f"evaluation strategy {strategy!r} does not apply to this model: "
                                    + "; ".join(reasons))
        found = EvaluationPlan("loop", "per-client evaluate: " + "; ".join(reasons)), None
    cache[key] = found
    return found


# ----------------------------------------------------------------------------- evaluation
def _device_of(rows: Rows) -> torch.device:
    if isinstance(rows, Tensor):
        return rows.device
    return rows[0].device if len(rows) else torch.device("cpu")


def _check_rows(flat: FlatModel, rows: Rows, count: int, device: torch.device, name: str) -> None:
    if isinstance(rows, Tensor):
        if rows.dim() != 2 or rows.shape[1] != flat.num_params:
            raise ClientUpdateError(f"{name} have shape {tuple(rows.shape)}, expected (K, {flat.num_params})")
    if len(rows) != count:
        raise ClientUpdateError(f"{len(rows)} {name} for {count} splits")
    if count and _device_of(rows) != device:
        raise ClientUpdateError(f"{name} are on {_device_of(rows)} but the splits were packed for {device}")


def _strided_view(picked: list[Tensor], num_params: int) -> Tensor | None:
    """The rows as one ``(K, P)`` view when they lie at evenly spaced offsets of one storage
    (e.g. ``[theta[i] for i in ...]`` or the same row K times), else None (they are copied)."""
    first = picked[0]
    storage = first.untyped_storage().data_ptr()
    offsets = [row.storage_offset() for row in picked]
    step = offsets[1] - offsets[0] if len(picked) > 1 else num_params
    if step < 0:
        return None
    for j, row in enumerate(picked):
        if (row.stride(0) != 1 or row.dtype != first.dtype or row.device != first.device
                or row.untyped_storage().data_ptr() != storage or offsets[j] != offsets[0] + j * step):
            return None
    return first.as_strided((len(picked), num_params), (step, 1))


def _take(rows: Rows, chunk: _Chunk, num_params: int, name: str) -> Tensor:
    if isinstance(rows, Tensor):
        if chunk.start is not None:
            taken = rows[chunk.start: chunk.start + len(chunk.clients)]
        else:
            taken = rows.index_select(0, chunk.index)
    else:
        picked = [rows[k] for k in chunk.clients]
        for k, row in zip(chunk.clients, picked, strict=True):
            if row.shape != (num_params,):
                raise ClientUpdateError(f"{name} {k} has shape {tuple(row.shape)}, expected ({num_params},)")
        view = _strided_view(picked, num_params)
        taken = view if view is not None else torch.stack(picked)
    if taken.dtype != torch.float32:
        raise ClientUpdateError(f"{name} are {taken.dtype}; the batched evaluation takes float32 rows")
    return taken


def _outputs(flat: FlatModel, plan: tuple[EvaluationPlan, object], rows: Tensor, chunk: _Chunk) -> Tensor:
    """The real samples' outputs ``(S, ...)`` of the chunk, client by client."""
    strategy, program = plan[0].strategy, plan[1]
    with _EvalMode(flat.module):
        if strategy == "linear":
            out = _forward_linear(program, rows, chunk.x)  # type: ignore[arg-type]
        else:
            out = _forward_vmap(flat, program, rows, chunk.x)  # type: ignore[arg-type]
    return out.reshape(-1, *out.shape[2:]).index_select(0, chunk.valid)


def _per_segment_sum(values: Tensor, chunk: _Chunk) -> list[float]:
    sums = torch.zeros(len(chunk.counts), dtype=torch.float64, device=values.device)
    return sums.index_add_(0, chunk.owner, values.to(torch.float64)).tolist()


def _packed(flat: FlatModel, rows: Rows, splits: Sequence[Split] | PackedSplits) -> PackedSplits:
    if isinstance(splits, PackedSplits):
        if splits.num_params != flat.num_params:
            raise ClientUpdateError(f"splits were packed for {splits.num_params} parameters, the model "
                                    f"has {flat.num_params}")
        return splits
    return pack_splits(flat, splits, device=_device_of(rows))


def _chunk_plan(flat: FlatModel, chunk: _Chunk, strategy: Strategy) -> tuple[EvaluationPlan, object]:
    return _plan(flat, chunk.x[0, : chunk.counts[0]], strategy)


@torch.no_grad()
def evaluate_many(flat: FlatModel, rows: Rows, splits: Sequence[Split] | PackedSplits,
                  strategy: Strategy = "auto") -> list[Evaluation]:
    """``[evaluate(flat, rows[k], *splits[k]) for k]``, computed for many clients at once.

    ``rows``: a ``(K, P)`` float32 matrix (e.g. the run's ``theta``; contiguous chunks are read
    as views) or a sequence of ``K`` rows; ``splits``: ``K`` pairs ``(x_k, y_k)`` or a
    one-set :class:`PackedSplits` of them. Runs on the rows' device. Returns the same
    :class:`Evaluation` fields as :func:`evaluate` (loss within 1e-5 relative, accuracy and
    AUC exact up to logit ties within float rounding; see the module docstring). Raises
    :class:`ClientUpdateError` for an empty split, mismatched counts, shapes or devices, and
    :class:`MetricError` (naming the split) where :func:`evaluate` raises it.
    """
    packed = _packed(flat, rows, splits)
    if packed.num_sets != 1:
        raise ClientUpdateError(f"splits packed as {packed.num_sets} sets; use evaluate_many_sets")
    return evaluate_many_sets(flat, rows, packed, strategy)[0]


@torch.no_grad()
def evaluate_many_sets(flat: FlatModel, rows: Rows, packed: PackedSplits,
                       strategy: Strategy = "auto") -> list[list[Evaluation]]:
    """:func:`evaluate_many` of the same rows on every set of a :func:`pack_split_sets`
    packing (e.g. validation and test), reading each row once: ``result[s][k]`` equals
    ``evaluate(flat, rows[k], *sets[s][k])`` within the tolerance of :func:`evaluate_many`.
    """
    if not isinstance(packed, PackedSplits):
        raise ClientUpdateError("evaluate_many_sets takes splits packed by pack_split_sets")
    packed = _packed(flat, rows, packed)
    _check_rows(flat, rows, len(packed), packed.device, "rows")
    num_sets = packed.num_sets
    results: list[list[Evaluation | None]] = [[None] * len(packed) for _ in range(num_sets)]
    task = flat.task
    for chunk in packed.chunks:
        plan = _chunk_plan(flat, chunk, strategy)
        if plan[0].strategy == "loop":
            for k in chunk.clients:
                for number in range(num_sets):
                    results[number][k] = evaluate(flat, rows[k], *packed.sets[number][k])
            continue
        out = _outputs(flat, plan, _take(rows, chunk, flat.num_params, "rows"), chunk)
        losses = _per_segment_sum(task.checked(out, chunk.y), chunk)
        correct = _per_segment_sum(task.correct_per_sample(out, chunk.y), chunk)
        if task.metric_name != "accuracy":
            segments = zip(out.split(chunk.counts), chunk.y.split(chunk.counts), strict=True)
        for segment, n in enumerate(chunk.counts):
            k, number = chunk.clients[segment // num_sets], segment % num_sets
            accuracy = correct[segment] / n
            metric = accuracy
            if task.metric_name != "accuracy":
                scores, targets = next(segments)
                try:
                    metric = task.metric(scores, targets)
                except MetricError as err:
                    where = f"split {k}" if num_sets == 1 else f"set {number} split {k}"
                    raise MetricError(f"{where}: {err}") from err
            results[number][k] = Evaluation(loss=losses[segment] / n, accuracy=accuracy, metric=metric)
    return [[r for r in one if r is not None] for one in results]


@torch.no_grad()
def _loss(flat: FlatModel, row: Tensor, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """The loss part of :func:`evaluate`, computed the same way (without the metric)."""
    model = flat.bind(aligned(row))
    total = 0.0
    with _EvalMode(model):
        for start in range(0, x.shape[0], batch_size):
            total += flat.task.sum_loss(model(aligned(x[start: start + batch_size])),
                                        y[start: start + batch_size]).item()
    return total / x.shape[0]


@torch.no_grad()
def validation_losses_many(flat: FlatModel, theta_rows: Rows, phi_rows: Rows,
                           val_splits: Sequence[Split] | PackedSplits,
                           strategy: Strategy = "auto") -> ValidationLosses:
    """The two mean validation losses of FEDORA's lambda rule for many clients at once:
    ``evaluate(flat, theta_rows[k], *val_splits[k]).loss`` and the same for ``phi_rows[k]``.

    Same tolerance as :func:`evaluate_many`; ``theta_rows[k]`` equal to ``phi_rows[k]`` gives
    two bit-identical losses (so ``lambda = 0`` as in the per-client rule). Only the loss is
    computed: unlike ``evaluate(...).loss``, a single-class validation split of a BCE task does
    not raise the AUC's :class:`MetricError` (the lambda rule needs no metric).
    """
    packed = _packed(flat, theta_rows, val_splits)
    if packed.num_sets != 1:
        raise ClientUpdateError(f"validation splits packed as {packed.num_sets} sets; pack one set")
    _check_rows(flat, theta_rows, len(packed), packed.device, "theta rows")
    _check_rows(flat, phi_rows, len(packed), packed.device, "phi rows")
    local: list[float] = [math.nan] * len(packed)
    received: list[float] = [math.nan] * len(packed)
    task = flat.task
    for chunk in packed.chunks:
        plan = _chunk_plan(flat, chunk, strategy)
        if plan[0].strategy == "loop":
            for k in chunk.clients:
                local[k] = _loss(flat, theta_rows[k], *packed.sets[0][k])
                received[k] = _loss(flat, phi_rows[k], *packed.sets[0][k])
            continue
        for rows, into, name in ((theta_rows, local, "theta rows"), (phi_rows, received, "phi rows")):
            out = _outputs(flat, plan, _take(rows, chunk, flat.num_params, name), chunk)
            sums = _per_segment_sum(task.checked(out, chunk.y), chunk)
            for j, k in enumerate(chunk.clients):
                into[k] = sums[j] / chunk.counts[j]
    return ValidationLosses(local, received)
