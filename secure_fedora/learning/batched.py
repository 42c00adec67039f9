"""Batched client training: many clients' rows of the (N x P) parameter matrix trained together.

:func:`train_clients` runs the local training of a set of clients at once, in place on their
rows, with the per-client loop's semantics (:func:`secure_fedora.learning.client.local_train`
with :class:`~secure_fedora.learning.client.PlainGradient` or the DP-SGD oracle
``secure_fedora.learning.dp.DPGradient``): the same batches in the same order (each
client's own ``torch.Generator`` draws its permutations, each client's own
:class:`privacy.noise.NoiseSource` its Poisson samples and noise, interleaved as in the loop),
the same SGD/momentum/weight-decay update, FEDORA's pull toward ``phi_i`` with weight
``lam_i``, FedProx's ``mu`` term, and the same number of steps. Results equal the loop's within
float rounding (batched matrix products sum in a different order).

Engines (chosen per model, once, by :func:`batched_plan`):

- ``"linear"``: an ``nn.Sequential`` of ``nn.Linear`` and per-sample activation layers
  (ReLU, Tanh, Sigmoid, Identity, Flatten): every layer of all clients is one ``torch.bmm``
  with a hand-written backward that writes the gradients straight into the stacked gradient
  rows (no per-step allocation of gradients). Supports plain SGD and DP-SGD (per-sample
  gradient norms from ``||a||^2 ||g||^2 + ||g||^2``, the fused path of :mod:`privacy.dpsgd`,
  for all clients' samples at once).
- ``"vmap"``: any other model ``torch.func.functional_call`` + ``torch.vmap`` can run (e.g. the
  CNN), forward vmapped over the clients' stacked parameters, backward by autograd; under
  DP-SGD, exact per-sample gradients by ``torch.func.grad`` vmapped over samples and clients
  (in groups bounded in memory), clipped and summed per client. Accepted per model only after
  it reproduced per-client autograd on a probe.

Unequal data sizes are handled by padding every step's batches to the largest one with
weight-0 rows; clients whose local run is shorter (fewer batches) are ordered last and drop out
of the batch once their steps are done. Anything the batched path does not support (another
oracle, a model neither engine runs exactly) is detected up front and trained by the
per-client loop, the reference path (white-box audits, which pass extra per-sample gradients,
keep calling ``local_train`` directly); the returned :class:`BatchedOutcome` says which
engine ran and why.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from privacy.dpsgd import (
    LOSS_SCALES,
    clip_factors,
    clip_overflowing_rows,
    float64_linear_terms,
    fused_clip_factors,
    overflow_safe_linear_norms,
    poisson_sample,
    rescaled_gradient,
    uncomputable_samples,
)
from privacy.ledger import is_finite_number
from privacy.mechanisms import overflow_safe_row_norms
from privacy.noise import NoiseSource, is_noise_source
from secure_fedora.learning.client import (
    ClientUpdateError,
    FlatModel,
    GradientOracle,
    PlainGradient,
    TrainConfig,
    Workspace,
    aliased_module,
    aligned,
    failure_hint,
    local_train,
    pull_weight_overflows,
    retarget,
    same_row,
)
from secure_fedora.learning.dp import DPGradient, expected_batch_size

__all__ = [
    "BatchedOutcome",
    "BatchedPlan",
    "BatchedTrainingError",
    "ClientJob",
    "batched_plan",
    "DP_ERROR_TEXT_WITHHELD",
    "engine_probe",
    "evaluate_losses",
    "jobs_for_context",
    "synthetic_probe",
    "train_clients",
    "train_participants",
]

log = logging.getLogger(__name__)

DP_ERROR_TEXT_WITHHELD = "its text withheld under DP; the process logs it"
"""What a DP run's fallback reason says in place of the text of the error the model raised
in the engine's probe (the reason names the error's class; the log holds the text)."""

#: Added to per-sample norms before dividing (Opacus's and privacy.dpsgd's convention).
_NORM_EPS = 1e-6
# Buffers of the step's elementwise passes larger than _BLOCK_FROM values are updated row block
# by row block (about _BLOCK_VALUES values each), so a block of each stays in the cache from
# one pass to the next; each element's arithmetic is the same as over whole buffers. Measured
# (weight decay, pull and step, P = 118,282, 2 threads): 256 rows 24.3 -> 17.6 ms a step
# (1 thread 29.0 -> 24.2); 36 rows, which stay in the cache whole, 1.75 ms whole, 1.95 blocked.
_BLOCK_VALUES = 2**19
_BLOCK_FROM = 2**23
# On one CPU thread, blocks of about _CORE_BLOCK_VALUES values: a block of the three or four
# buffers a step passes over then stays in the core's own cache (about 2 MB) from one pass to
# the next. Measured (reference setting, 36 rows of P = 118,282, so one row a block, the first
# Linear's gradient moved into the momentum buffer in the same blocks; 1 thread, thread CPU
# time, medians of 20 alternating runs): the batched training 0.94x-0.95x of whole buffers.
_CORE_BLOCK_VALUES = 2**17

_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity",
}


class BatchedTrainingError(ClientUpdateError):
    """Some clients' training produced non-finite parameters; their rows were restored.

    ``failed`` lists the client indices whose update was discarded; ``steps`` the steps every
    client executed (the other clients' rows keep their trained values).
    """

    def __init__(self, message: str, failed: list[int], steps: dict[int, int]) -> None:
        super().__init__(message)
        self.failed = failed
        self.steps = steps


@dataclass
class ClientJob:
    """One client's local run: its row (trained in place), data, randomness and regularizers.

    ``theta`` is the client's parameter row (a view into the (N x P) matrix, updated in place).
    ``phi``/``lam``: FEDORA's pull ``theta <- theta - lr * lam * (theta_before_step - phi)``
    after every step (``lam > 0`` needs ``phi``). ``anchor``/``mu``: FedProx's gradient term
    ``mu * (theta - anchor)`` added after the data gradient. DP-SGD only: ``noise`` (the
    client's own source, used for its Poisson samples and noise, never shared with another
    job), ``noise_multiplier``, ``max_grad_norm`` (per-client clip bound; default the
    oracle's) and ``on_step`` (called once per executed DP-SGD step, the ledger's step hook).
    ``mix_with``/``mix_alpha``: APFL's mixture (non-private oracles only): the gradient is
    ``alpha * grad f(alpha * theta + (1 - alpha) * mix_with)``, and with ``mix_adaptive``
    ``alpha`` takes a projected step ``alpha - mix_lr * <theta - mix_with, grad f(mixture)>``
    per batch (baselines.MixtureGradient's arithmetic); the final alpha is in the outcome.
    """

    index: int
    theta: Tensor
    x: Tensor
    y: Tensor
    generator: torch.Generator
    phi: Tensor | None = None
    lam: float = 0.0
    anchor: Tensor | None = None
    mu: float = 0.0
    noise: NoiseSource | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    on_step: Callable[[], None] | None = None
    mix_with: Tensor | None = None
    mix_alpha: float = 1.0
    mix_adaptive: bool = False
    mix_lr: float = 0.0


@dataclass(frozen=True)
class BatchedPlan:
    """Whether (and how) a model trains batched: ``engine`` is ``"linear"``, ``"vmap"`` or
    ``"loop"`` (the per-client reference path, with ``reason`` saying why)."""

    engine: str
    reason: str = ""
    layers: tuple[tuple[Any, ...], ...] = ()
    names: tuple[str, ...] = ()


@dataclass
class BatchedOutcome:
    """What :func:`train_clients` did: steps per client index, the engine that ran and, for
    ``"loop"``, why the batched path was not used."""

    steps: dict[int, int]
    engine: str
    reason: str = ""
    #: The final mixing weight of every job with a mixture (``ClientJob.mix_with``).
    alphas: dict[int, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- model analysis

def _param_offsets(flat: FlatModel) -> dict[int, tuple[int, torch.Size]]:
    offsets: dict[int, tuple[int, torch.Size]] = {}
    offset = 0
    for p, shape, size in zip(flat.params, flat.shapes, flat.sizes, strict=True):
        offsets[id(p)] = (offset, shape)
        offset += size
    return offsets


def _sequential_children(module: nn.Module) -> list[nn.Module] | None:
    if type(module) is not nn.Sequential:
        return None
    out: list[nn.Module] = []
    for child in module:
        if type(child) is nn.Sequential:
            inner = _sequential_children(child)
            if inner is None:
                return None
            out.extend(inner)
        else:
            out.append(child)
    return out


def _linear_layers(flat: FlatModel) -> tuple[tuple[tuple[Any, ...], ...] | None, str]:
    """The ``"linear"`` engine's layer program, or None and why the model does not fit it."""
    children = _sequential_children(flat.module)
    if children is None:
        return None, "the model is not an nn.Sequential"
    offsets = _param_offsets(flat)
    used: set[int] = set()
    layers: list[tuple[Any, ...]] = []
    for child in children:
        if type(child) is nn.Linear:
            w = child.weight
            b = child.bias
            if id(w) not in offsets or id(w) in used or not w.requires_grad or (
                    b is not None and (id(b) not in offsets or id(b) in used or not b.requires_grad)):
                return None, "a Linear parameter is shared, frozen or outside the flat layout"
            used.add(id(w))
            w_off, w_shape = offsets[id(w)]
            b_off = None
            if b is not None:
                used.add(id(b))
                b_off = offsets[id(b)][0]
            layers.append(("linear", w_off, tuple(w_shape), b_off))
        elif type(child) in _ACTIVATIONS:
            layers.append(("act", _ACTIVATIONS[type(child)]))
        elif type(child) is nn.Flatten and child.start_dim == 1 and child.end_dim == -1:
            layers.append(("flatten",))
        else:
            return None, f"layer {type(child).__name__} is not Linear or a supported activation"
    if len(used) != len(offsets):
        return None, "some parameters are not in a Linear layer"
    return tuple(layers), ""


_PLANS: weakref.WeakKeyDictionary[FlatModel, dict[tuple[str, int | None], BatchedPlan]] = \
    weakref.WeakKeyDictionary()


def _oracle_kind(oracle: GradientOracle) -> tuple[str | None, str]:
    """``("plain" | "dp", "")`` for the oracles the batched path reproduces, else (None, why)."""
    if type(oracle) is DPGradient:
        if oracle.dpsgd.mode != "fused" and oracle.dpsgd.mode != "opacus":
            return None, f"unknown DP-SGD mode {oracle.dpsgd.mode!r}"
        return "dp", ""
    if isinstance(oracle, PlainGradient) and type(oracle).gradient is PlainGradient.gradient \
            and type(oracle).batches is PlainGradient.batches:
        return "plain", ""
    return None, f"oracle {type(oracle).__name__} is not PlainGradient or DPGradient"


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


@contextmanager
def _hooks_stripped(module: nn.Module) -> Iterator[None]:
    """The module's hooks (e.g. Opacus's per-sample capture, whose backward hooks functorch
    cannot transform) are removed during the vmap engine's passes and put back afterwards. A
    model whose output depends on its hooks fails the engine's probe check and uses the loop."""
    saved = []
    for sub in module.modules():
        held = {name: getattr(sub, name) for name in _HOOK_DICTS if getattr(sub, name, None)}
        for name, hooks in held.items():
            setattr(sub, name, type(hooks)())
        saved.append((sub, held))
    try:
        yield
    finally:
        for sub, held in saved:
            for name, hooks in held.items():
                setattr(sub, name, hooks)


@contextmanager
def _vmap_pass(module: nn.Module, sample: Tensor) -> Iterator[None]:
    """One of the vmap engine's passes over the clients, the module's hooks stripped
    (:func:`_hooks_stripped`). A RuntimeError of a model with buffers is first held to
    :func:`~secure_fedora.learning.models.check_buffers_constant` on ``sample`` (one client's
    rows, not vmapped): a forward that writes a buffer fails under vmap with torch's in-place
    shape error, and is refused by the ModelError that names the buffer instead, as the
    vmapped evaluation does; any other error is re-raised as it was."""
    with _hooks_stripped(module):
        try:
            yield
        except RuntimeError:
            if any(True for _ in module.buffers()):
                from secure_fedora.learning.models import check_buffers_constant

                check_buffers_constant(module, sample, "model")
            raise


def batched_plan(flat: FlatModel, oracle: GradientOracle, probe_x: Tensor | None = None,
                 probe_y: Tensor | None = None) -> BatchedPlan:
    """Decide, once per model, oracle kind and (plain oracle) batch size, which engine trains
    ``flat`` batched: a plan probed at one batch size says nothing of a larger one.

    Candidates: the ``"linear"`` engine for Sequential Linear/activation stacks, then
    ``"vmap"`` for any model. With ``probe_x``/``probe_y`` (:func:`engine_probe`'s rows) a
    candidate is accepted only if it reproduces per-client autograd on them to 1e-5 relative
    (:func:`_probe_engine`: batch gradients, or DP's clipped per-sample sums), for a full batch
    and for a batch padded as the engine pads a smaller client's, so a model whose outputs mix
    the samples of a batch (e.g. BatchNorm without running statistics) or whose layers the
    linear engine reads in another shape (a Linear before the Flatten) is never batched.
    Without probe data (no client has a sample) nothing can be checked, so the loop trains
    (not cached). Anything else gives ``engine="loop"`` with the reason.
    """
    kind, why = _oracle_kind(oracle)
    if kind is None:
        return BatchedPlan("loop", why)
    key = (kind, int(oracle.batch_size) if kind == "plain" else None)  # type: ignore[attr-defined]
    cached = _PLANS.get(flat, {}).get(key)
    if cached is not None:
        return cached
    if probe_x is None or probe_y is None or probe_x.shape[0] == 0:
        return BatchedPlan("loop", "no probe data to check the engines")
    aliased = aliased_module(flat.module)
    if aliased is not None:  # probing would leave torch.func's tensors in the module
        plan = BatchedPlan("loop", f"{aliased} (one module under two names; torch.func "
                                   "cannot run it)")
        _PLANS.setdefault(flat, {})[key] = plan
        return plan
    layers, why = _linear_layers(flat)
    if layers is None:  # the vmap engine's fallback reason then names this as the linear one's
        why = f"the linear engine does not apply: {why}"
    plan = None
    if layers is not None:
        plan = _probe_engine(flat, oracle, kind, BatchedPlan("linear", layers=layers), probe_x, probe_y)
        if plan.engine == "loop":
            why, plan = f"the linear engine failed its probe: {plan.reason}", None
    if plan is None:
        names = tuple(n for n, _ in flat.module.named_parameters())
        if len(names) != len(flat.params):
            plan = BatchedPlan("loop", f"the model's named parameters do not match its flat layout ({why})")
        else:
            plan = _probe_engine(flat, oracle, kind, BatchedPlan("vmap", why, names=names), probe_x, probe_y)
    _PLANS.setdefault(flat, {})[key] = plan
    return plan


def engine_probe(splits: Iterable[tuple[Tensor, Tensor]],
                 oracle: GradientOracle) -> tuple[Tensor, Tensor] | None:
    """The rows :func:`batched_plan` probes the engines with. Plain oracle: taken in order
    from ``splits`` (clients' training ``(x, y)``), one fewer than its batch size (the probe
    adds the padding row: a full batch, as the engine pads a smaller client's to it), at least
    3; ``None`` when no split has a row. A model that mixes rows only in batches larger than
    those it trains on is probed at the size it trains on.

    Under DP (a model mixing the rows of a batch is refused before training) 3 synthetic rows
    (:func:`synthetic_probe`) shaped and typed as the first split's, whatever its rows hold
    (``None`` only without a split): the engine choice, and the fallback reason results.json
    records, then depend on the model, the oracle and the data's shape and dtype, never on a
    client's private records."""
    kind, _ = _oracle_kind(oracle)
    if kind == "dp":
        first = next(iter(splits), None)
        return None if first is None else synthetic_probe(first[0], first[1], 3)
    size = max(3, int(oracle.batch_size) - 1) if kind == "plain" else 3  # type: ignore[attr-defined]
    xs, ys, held = [], [], 0
    for x, y in splits:
        if held >= size:
            break
        if x.shape[0]:
            xs.append(x[:size - held])
            ys.append(y[:size - held])
            held += int(xs[-1].shape[0])
    return (torch.cat(xs), torch.cat(ys)) if xs else None


def synthetic_probe(x: Tensor, y: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``rows`` probe samples shaped, typed and placed like a row of ``x`` and of ``y``,
    drawn from a fixed seed and reading nothing of their values: floating inputs uniform in
    [0, 1) (distinct rows, inside the domain of a log or a square root), integer and boolean inputs 0 or 1 (valid indices of an embedding); targets
    all 0 (a valid class index, and a valid binary or regression target)."""
    generator = torch.Generator().manual_seed(0)
    shape = (rows, *x.shape[1:])
    if x.dtype.is_floating_point or x.dtype.is_complex:
        sx = torch.rand(shape, generator=generator).to(x.dtype)
    else:
        sx = torch.randint(0, 2, shape, generator=generator).to(x.dtype)
    sy = torch.zeros((rows, *y.shape[1:]), dtype=y.dtype)
    return sx.to(x.device), sy.to(y.device)


def _oracle_loss(oracle: Any, kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample loss the loop's oracle differentiates (DPGradient clips ``_loss``)."""
    return oracle._loss if kind == "dp" else oracle.task.checked


def _probe_engine(flat: FlatModel, oracle: Any, kind: str, plan: BatchedPlan, x: Tensor,
                  y: Tensor) -> BatchedPlan:
    """``plan`` if its engine reproduces per-client autograd through the module on the probe
    samples ``x``/``y`` (:func:`engine_probe`), else a loop plan saying why. Two clients with
    different rows: client 0 holds the samples plus one all-zero padding sample of weight 0
    (the engine's padding of a smaller batch), client 1 the samples plus a repeat of the first."""
    device = x.device
    generator = torch.Generator().manual_seed(0)
    base = torch.cat([p.detach().reshape(-1) for p in flat.params]).to(device)
    rows = torch.stack([base, base + 0.01 * torch.randn(base.shape, generator=generator).to(device)])
    loss = _oracle_loss(oracle, kind)
    batch = x.shape[0]
    xs = torch.stack([torch.cat([x, torch.zeros_like(x[:1])]), torch.cat([x, x[:1]])])
    ys = torch.stack([torch.cat([y, torch.zeros_like(y[:1])]), torch.cat([y, y[:1]])])
    valid = torch.ones((2, batch + 1), dtype=torch.bool, device=device)
    valid[0, batch] = False
    samples = [xs[0, :batch], xs[1]], [ys[0, :batch], ys[1]]
    why = plan.reason
    try:
        with warnings.catch_warnings():
            got = torch.zeros_like(rows)
            if kind == "dp":
                clip = float(oracle.dpsgd.max_grad_norm)
                bounds = torch.full((2, 1), clip, device=device)
                if plan.engine == "linear":
                    _linear_clipped_sum(plan, rows, xs, ys, valid, bounds, loss, got)
                else:
                    _vmap_clipped_sum(flat, plan, rows, xs, ys, valid, bounds, loss, got)
            else:
                weights = valid.to(rows.dtype) / valid.sum(dim=1, keepdim=True).to(rows.dtype)
                if plan.engine == "linear":
                    _linear_gradient(plan, rows, xs, ys, weights, loss, got)
                else:
                    _vmap_gradient(flat, plan, rows, xs, ys, weights, loss, got)
            # the reference: per-client autograd through the module as the loop runs it (a
            # disabled Opacus hook still wraps the outputs, and torch warns about that)
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            names = tuple(n for n, _ in flat.module.named_parameters())
            for r in range(2):
                params = {n: v.detach().clone().requires_grad_()
                          for n, v in zip(names, _row_views(flat, rows[r]), strict=True)}
                xr, yr = samples[0][r], samples[1][r]
                if kind == "dp":
                    want = torch.zeros_like(base)
                    for b in range(xr.shape[0]):
                        def sample_grad(scale: float | None = None, xb: Tensor = xr[b:b + 1],
                                        yb: Tensor = yr[b:b + 1],
                                        named: dict[str, Tensor] = params) -> list[Tensor]:
                            total = loss(torch.func.functional_call(flat.module, named, (xb,)), yb).sum()
                            grads = torch.autograd.grad(total if scale is None else total * scale,
                                                        list(named.values()))
                            return [torch.cat([v.reshape(-1) for v in grads])]

                        (g,), scale = sample_grad(), 1.0
                        if not bool(torch.isfinite(g).all()):  # an entry overflows: as DP-SGD
                            (g,), scale = rescaled_gradient(sample_grad) or ([g], 1.0)
                        norm = float(g.double().norm()) / scale
                        want += g * (min(1.0, clip / (norm + _NORM_EPS)) / scale)
                else:
                    out = torch.func.functional_call(flat.module, params, (xr,))
                    grads = torch.autograd.grad(loss(out, yr).mean(), list(params.values()))
                    want = torch.cat([g.reshape(-1) for g in grads])
                if not torch.allclose(got[r], want, rtol=1e-5, atol=1e-6):
                    padded = " on a padded batch (its outputs depend on the other samples)" if r == 0 else ""
                    return BatchedPlan("loop", f"{plan.engine} engine does not reproduce the model's "
                                               f"gradients{padded}" + (f" ({why})" if why else ""))
    except Exception as err:  # any model code: the batched path just does not apply
        if kind == "dp":
            # Under DP results.json records the error's class alone: model code's text is not
            # a statement this module controls. Its full text stays in the local log.
            log.warning("%s engine cannot run the model under DP-SGD (results.json records "
                        "only the class %s): %s: %s", plan.engine, type(err).__name__,
                        type(err).__name__, err)
            return BatchedPlan("loop", f"{plan.engine} engine cannot run the model "
                                       f"({type(err).__name__}; {DP_ERROR_TEXT_WITHHELD}"
                                       + (f"; {why})" if why else ")"))
        return BatchedPlan("loop", f"{plan.engine} engine cannot run the model ({type(err).__name__}:"
                                   f" {err}" + (f"; {why})" if why else ")"))
    return plan


def _row_views(flat: FlatModel, rows: Tensor) -> list[Tensor]:
    """Views of ``rows`` (..., P) shaped like each parameter, with the leading dims kept."""
    lead = rows.shape[:-1]
    views, offset = [], 0
    for shape, size in zip(flat.shapes, flat.sizes, strict=True):
        views.append(rows[..., offset:offset + size].view(*lead, *shape))
        offset += size
    return views


# ---------------------------------------------------------------------------- engines

def _activation(kind: str, h: Tensor, inplace: bool = False) -> Tensor:
    """The activation of ``h``; with ``inplace`` (``h`` is a temporary the caller owns) written
    into ``h`` itself: the same values, without a new (k, B, d) tensor per layer and step."""
    if kind == "relu":
        return h.relu_() if inplace else torch.relu(h)
    if kind == "tanh":
        return h.tanh_() if inplace else torch.tanh(h)
    if kind == "sigmoid":
        return h.sigmoid_() if inplace else torch.sigmoid(h)
    return h


def _activation_backward(kind: str, out: Tensor, g: Tensor, inplace: bool = False) -> Tensor:
    """``g`` times the activation's derivative, from its output ``out``, in one elementwise
    kernel (autograd's own backward kernels): ``g * (out > 0)`` as a product made a boolean
    mask, converted it to float and multiplied, three passes and two temporaries. With
    ``inplace`` (``g`` is a temporary the caller owns) the same values are written into ``g``:
    a fresh (k, B, d) output costs more than the kernel itself (its pages are touched anew)."""
    if kind == "relu":
        if inplace:
            return torch.ops.aten.threshold_backward.grad_input(g, out, 0, grad_input=g)
        return torch.ops.aten.threshold_backward(g, out, 0)
    if kind == "tanh":
        if inplace:
            return torch.ops.aten.tanh_backward.grad_input(g, out, grad_input=g)
        return torch.ops.aten.tanh_backward(g, out)
    if kind == "sigmoid":
        if inplace:
            return torch.ops.aten.sigmoid_backward.grad_input(g, out, grad_input=g)
        return torch.ops.aten.sigmoid_backward(g, out)
    return g


def _output_grad(logits: Tensor, y: Tensor, weights: Tensor,
                 loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """d(sum_b weights_b * loss_b)/d logits for (k, B, C) logits, by autograd on the small
    logits tensor only (any per-sample loss)."""
    k, batch = weights.shape
    with torch.enable_grad():
        z = logits.detach().reshape(k * batch, *logits.shape[2:]).requires_grad_()
        losses = loss(z, y.reshape(k * batch, *y.shape[2:]))
        (g,) = torch.autograd.grad((losses * weights.reshape(-1)).sum(), z)
    return g.reshape(logits.shape)


def _linear_forward(plan: BatchedPlan, rows: Tensor, x: Tensor) -> tuple[Tensor, list[Any]]:
    k = rows.shape[0]
    h = x
    # whether h is a temporary of this pass that nothing saved (not the input, not an
    # activation's output, which its backward reads)
    owned = False
    saved: list[Any] = []
    for layer in plan.layers:
        if layer[0] == "linear":
            _, w_off, (d_out, d_in), b_off = layer
            if h.dim() != 3 or h.shape[-1] != d_in:
                raise ClientUpdateError(f"Linear({d_in}, {d_out}) got input of shape {tuple(h.shape)}")
            w = rows[:, w_off:w_off + d_out * d_in].view(k, d_out, d_in)
            saved.append(h)
            # bmm, then the bias: baddbmm with a broadcast bias runs per client (slower)
            h = torch.bmm(h, w.transpose(1, 2))
            if b_off is not None:
                h.add_(rows[:, b_off:b_off + d_out].unsqueeze(1))
            owned = True
        elif layer[0] == "act":
            h = _activation(layer[1], h, inplace=owned)
            owned = False  # saved for the backward: the next activation must not overwrite it
            saved.append(h)
        else:
            saved.append(h.shape)
            h = h.reshape(k, h.shape[1], -1)
    return h, saved


def _linear_backward(plan: BatchedPlan, rows: Tensor, saved: list[Any], g: Tensor,
                     out: Tensor | None, decay: float = 0.0, beta: float = 0.0,
                     work: Tensor | None = None, defer_first: bool = False
                     ) -> list[tuple[Tensor, Tensor]]:
    """Backpropagate the output gradient ``g`` (k, B, C); returns each Linear's (A, G), last
    layer first. With ``out`` (k, P) given, writes every parameter's gradient plus
    ``decay * rows`` (plus ``beta * out``: a momentum buffer accumulated in the GEMM) into it
    (one batched GEMM per weight, straight into the rows). ``defer_first`` (with ``work``):
    the first Linear's weight gradient is left in ``work`` for the caller to move into ``out``
    (see :func:`_write_linear`)."""
    k = rows.shape[0]
    pairs: list[tuple[Tensor, Tensor]] = []
    first_linear = next(i for i, layer in enumerate(plan.layers) if layer[0] == "linear")
    # whether g is a temporary of this pass that nothing else holds (not the caller's, not in
    # pairs), so an activation's backward may overwrite it
    owned = False
    for i in range(len(plan.layers) - 1, -1, -1):
        layer = plan.layers[i]
        kept = saved[i]
        if layer[0] == "linear":
            _, w_off, (d_out, d_in), b_off = layer
            pairs.append((kept, g))
            if out is not None:
                _write_linear(layer, out, kept, g, rows, decay, beta, work,
                              defer=defer_first and i == first_linear)
            if i == first_linear:
                break
            g = torch.bmm(g, rows[:, w_off:w_off + d_out * d_in].view(k, d_out, d_in))
            owned = True
        elif layer[0] == "act":
            g_in, g = g, _activation_backward(layer[1], kept, g, inplace=owned)
            owned = owned or g is not g_in  # (the identity returns g itself)
        else:
            g = g.reshape(kept)
    return pairs


def _write_linear(layer: tuple[Any, ...], out: Tensor, a: Tensor, g: Tensor,
                  rows: Tensor | None = None, decay: float = 0.0, beta: float = 0.0,
                  work: Tensor | None = None, defer: bool = False) -> None:
    """``out[weight] <- g^T a (+ decay * rows[weight])`` as one batched GEMM written into the
    rows, and the bias ``sum_b g (+ decay * rows[bias])``; with ``beta`` (no decay), the GEMM
    accumulates: ``out <- beta * out + g^T a`` (SGD momentum). With ``work`` (a contiguous
    buffer of at least k * d_out * d_in floats, no decay), the GEMM writes there and one pass
    moves it into ``out``: a batched GEMM whose output is a strided view of the rows runs
    matrix by matrix, which parallelizes poorly over threads. With ``defer`` (and ``work``) that
    pass is left to the caller (:func:`_move_deferred`), which runs it row block by row block
    with the step's other passes."""
    _, w_off, (d_out, d_in), b_off = layer
    k = out.shape[0]
    w_out = out[:, w_off:w_off + d_out * d_in].view(k, d_out, d_in)
    if work is not None and not decay:
        product = torch.bmm(g.transpose(1, 2), a, out=work[:k * d_out * d_in].view(k, d_out, d_in))
        if defer:
            pass
        elif beta:
            torch.add(product, w_out, alpha=beta, out=w_out)
        else:
            w_out.copy_(product)
        if b_off is not None:
            if beta:
                torch.add(g.sum(dim=1), out[:, b_off:b_off + d_out], alpha=beta,
                          out=out[:, b_off:b_off + d_out])
            else:
                torch.sum(g, dim=1, out=out[:, b_off:b_off + d_out])
        return
    if beta:
        w_out.baddbmm_(g.transpose(1, 2), a, beta=beta)
        if b_off is not None:
            out[:, b_off:b_off + d_out].mul_(beta).add_(g.sum(dim=1))
        return
    if decay and rows is not None:
        torch.baddbmm(rows[:, w_off:w_off + d_out * d_in].view(k, d_out, d_in), g.transpose(1, 2), a,
                      beta=decay, out=w_out)
    else:
        torch.bmm(g.transpose(1, 2), a, out=w_out)
    if b_off is not None:
        b_out = out[:, b_off:b_off + d_out]
        torch.sum(g, dim=1, out=b_out)
        if decay and rows is not None:
            b_out.add_(rows[:, b_off:b_off + d_out], alpha=decay)


def _linear_gradient(plan: BatchedPlan, rows: Tensor, x: Tensor, y: Tensor, weights: Tensor,
                     loss: Callable[[Tensor, Tensor], Tensor], out: Tensor, decay: float = 0.0,
                     beta: float = 0.0, work: Tensor | None = None,
                     defer_first: bool = False) -> None:
    """Write ``sum_b weights[:, b] * grad loss_b + decay * rows`` of each client into ``out``
    (with ``beta``: ``beta * out +`` that, the momentum buffer accumulated in the GEMMs;
    ``work``, ``defer_first``: see :func:`_linear_backward`)."""
    logits, saved = _linear_forward(plan, rows, x)
    g = _output_grad(logits, y, weights, loss)
    _linear_backward(plan, rows, saved, g, out, decay, beta, work, defer_first)


def _move_deferred(layer: tuple[Any, ...], work: Tensor, k: int, lo: int, hi: int, out: Tensor,
                   beta: float) -> None:
    """The pass :func:`_write_linear` left undone with ``defer``, for rows ``lo:hi`` of the
    ``k`` whose weight gradient ``work`` holds: ``out <- beta * out + work`` (``beta`` 0: a
    copy), element for element the same arithmetic."""
    _, w_off, (d_out, d_in), _ = layer
    size = d_out * d_in
    product = work[:k * size].view(k, size)[lo:hi]
    dest = out[:, w_off:w_off + size]
    if beta:
        torch.add(product, dest, alpha=beta, out=dest)
    else:
        dest.copy_(product)


def _linear_clipped_sum(plan: BatchedPlan, rows: Tensor, x: Tensor, y: Tensor, valid: Tensor,
                        clip: Tensor, loss: Callable[[Tensor, Tensor], Tensor], out: Tensor,
                        input_sq: Tensor | None = None, work: Tensor | None = None) -> None:
    """Write each client's sum of per-sample gradients clipped to its bound ``clip`` (k, 1)
    into ``out`` (k, P); padding samples (``valid`` False) contribute nothing. Per-sample norms
    come from ``||a||^2 ||g||^2 + ||g||^2`` per Linear (no per-sample gradient is formed).
    ``input_sq`` (k, B): the samples' squared norms ``||x||^2``, when the first Linear reads
    the (flattened) input itself (:func:`_reads_raw_input`), so they need not be recomputed."""
    logits, saved = _linear_forward(plan, rows, x)
    g = _output_grad(logits, y, valid.to(logits.dtype), loss)
    pairs = _linear_backward(plan, rows, saved, g, None)
    sq = torch.zeros(valid.shape, dtype=logits.dtype, device=logits.device)
    linears = [layer for layer in plan.layers if layer[0] == "linear"][::-1]
    for n, (layer, (a, gl)) in enumerate(zip(linears, pairs, strict=True)):
        g_sq = (gl * gl).sum(dim=2)
        a_sq = input_sq if (input_sq is not None and n == len(linears) - 1) else (a * a).sum(dim=2)
        sq += a_sq * g_sq
        if layer[3] is not None:
            sq += g_sq

    def overflow_norms(where: tuple[Tensor, ...]) -> Tensor:
        # the layers in forward order, as the loop's fused path lists them (same factor)
        return overflow_safe_linear_norms([
            (a[where].unsqueeze(1), gl[where].unsqueeze(1), True, layer[3] is not None)
            for layer, (a, gl) in reversed(list(zip(linears, pairs, strict=True)))])

    factors, tiny = fused_clip_factors(sq, clip, overflow_norms)
    bad = None
    if not bool(torch.isfinite(sq).all()):  # (tiny is None where every norm is finite)
        k, width = sq.shape
        bad = uncomputable_samples([t.reshape(k * width, -1) for pair in pairs for t in pair],
                                   k * width).view(k, width)
        if bool(bad.any()):
            # no direction in float32: zeroed here (factor 0), recomputed with the loss scaled
            factors = factors.masked_fill(bad, 0.0)
            keep = ~bad.unsqueeze(2)
            pairs = [(torch.where(keep, a, 0.0), torch.where(keep, gl, 0.0)) for a, gl in pairs]
        else:
            bad = None
    for layer, (a, gl) in zip(linears, pairs, strict=True):
        _write_linear(layer, out, a, gl * factors.unsqueeze(2), work=work)
    if tiny is not None:  # samples whose factor only float64 holds: added in float64
        (client, at), f64 = tiny
        if bad is not None:
            kept = ~bad[client, at]
            client, at, f64 = client[kept], at[kept], f64[kept]
        _add_float64_terms(linears, pairs, out, client, at, f64, 1.0)
    if bad is not None:
        _add_rescaled(plan, linears, rows, x, y, valid, bad, clip, loss, out)


def _add_float64_terms(linears: list[tuple[Any, ...]], pairs: list[tuple[Tensor, Tensor]],
                       out: Tensor, client: Tensor, at: Tensor, f64: Tensor, scale: float) -> None:
    """Add, computed in float64, ``f64 * grad_s / scale`` of each sample ``(client, at)`` into
    its client's row of ``out``, ``grad_s`` its gradient from ``pairs`` (each Linear's (A, G),
    last layer first, ``linears`` alike)."""
    for layer, (a, gl) in zip(linears, pairs, strict=True):
        _, w_off, (d_out, d_in), b_off = layer
        for c, sample, f in zip(client.tolist(), at.tolist(), (f64 / scale).unsqueeze(1), strict=True):
            weight, bias = float64_linear_terms(a[c, sample][None, None], gl[c, sample][None, None],
                                                f, True, b_off is not None)
            out[c, w_off:w_off + d_out * d_in] += weight.reshape(-1)
            if bias is not None:
                out[c, b_off:b_off + d_out] += bias


def _add_rescaled(plan: BatchedPlan, linears: list[tuple[Any, ...]], rows: Tensor, x: Tensor,
                  y: Tensor, valid: Tensor, bad: Tensor, clip: Tensor,
                  loss: Callable[[Tensor, Tensor], Tensor], out: Tensor) -> None:
    """The linear engine's :meth:`privacy.dpsgd.DPSGD._rescaled_terms`: each real sample of
    ``bad`` (k, B) (a non-finite activation or backpropagated value) recomputed with its loss
    multiplied by the first scale of :data:`~privacy.dpsgd.LOSS_SCALES` that makes it finite,
    clipped with its float64 norm and added into its client's row of ``out``; a sample never
    finite adds nothing (:func:`~privacy.dpsgd.uncomputable_samples`)."""
    client, at = (bad & valid).nonzero(as_tuple=True)
    for scale in LOSS_SCALES:
        n = int(client.numel())
        if n == 0:
            return
        sub = rows[client]
        logits, saved = _linear_forward(plan, sub, x[client, at].unsqueeze(1))
        g = _output_grad(logits, y[client, at].unsqueeze(1),
                         torch.full((n, 1), scale, dtype=logits.dtype, device=logits.device), loss)
        pairs = _linear_backward(plan, sub, saved, g, None)
        ok = ~uncomputable_samples([t.reshape(n, -1) for pair in pairs for t in pair], n)
        if bool(ok.any()):
            mine = ok.nonzero().squeeze(1)
            norms = overflow_safe_linear_norms([
                (a[mine], gl[mine], True, layer[3] is not None)
                for layer, (a, gl) in reversed(list(zip(linears, pairs, strict=True)))]) / scale
            f64 = (clip[client[mine], 0].to(torch.float64) / (norms + _NORM_EPS)).clamp(max=1.0)
            first = torch.zeros(1, dtype=torch.long)
            for j, (m, c) in enumerate(zip(mine.tolist(), client[mine].tolist(), strict=True)):
                _add_float64_terms(linears, [(a[m:m + 1], gl[m:m + 1]) for a, gl in pairs],
                                   out[c:c + 1], first, first, f64[j:j + 1], scale)
        client, at = client[~ok], at[~ok]


def _reads_raw_input(plan: BatchedPlan) -> bool:
    """Whether the first Linear of a ``"linear"`` plan reads the input itself (flattened)."""
    for layer in plan.layers:
        if layer[0] == "linear":
            return True
        if layer[0] != "flatten":
            return False
    return False


def _vmap_gradient(flat: FlatModel, plan: BatchedPlan, rows: Tensor, x: Tensor, y: Tensor,
                   weights: Tensor, loss: Callable[[Tensor, Tensor], Tensor], out: Tensor) -> None:
    """As :func:`_linear_gradient`, for any model: vmapped ``functional_call`` + autograd."""
    module = flat.module
    names = plan.names
    with torch.enable_grad():
        stacked = [v.detach().requires_grad_() for v in _row_views(flat, rows)]

        def forward(params: tuple[Tensor, ...], inputs: Tensor) -> Tensor:
            return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (inputs,))

        with _vmap_pass(module, x[0]):
            logits = torch.vmap(forward)(tuple(stacked), x)
        k, batch = weights.shape
        losses = loss(logits.reshape(k * batch, *logits.shape[2:]), y.reshape(k * batch, *y.shape[2:]))
        grads = torch.autograd.grad((losses * weights.reshape(-1)).sum(), stacked)
    offset = 0
    for g, size in zip(grads, flat.sizes, strict=True):
        out[:, offset:offset + size].copy_(g.reshape(g.shape[0], -1))
        offset += size


#: Bound on the per-sample gradients the vmap engine holds at once under DP (bytes).
_PER_SAMPLE_BYTES = 256 * 2**20


def _vmap_clipped_sum(flat: FlatModel, plan: BatchedPlan, rows: Tensor, x: Tensor, y: Tensor,
                      valid: Tensor, clip: Tensor, loss: Callable[[Tensor, Tensor], Tensor],
                      out: Tensor) -> None:
    """As :func:`_linear_clipped_sum`, for any model: exact per-sample gradients from
    ``torch.func.grad`` vmapped over samples and clients (Opacus's result, without hooks), in
    groups of clients small enough to hold about ``_PER_SAMPLE_BYTES`` of them at once."""
    module, names = flat.module, plan.names

    def sample_loss(params: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> Tensor:
        logits = torch.func.functional_call(module, dict(zip(names, params, strict=True)),
                                            (xi.unsqueeze(0),))
        return loss(logits, yi.unsqueeze(0)).sum()

    per_sample = torch.vmap(torch.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0)))
    k, width = valid.shape
    group = max(1, _PER_SAMPLE_BYTES // max(1, width * flat.num_params * rows.element_size()))
    for first in range(0, k, group):
        part = slice(first, min(first + group, k))
        with torch.no_grad(), _vmap_pass(module, x[first]):
            grads = per_sample(tuple(v.detach() for v in _row_views(flat, rows[part])),
                               x[part], y[part])
        kk = grads[0].shape[0]
        flat_grads = [g.reshape(kk, width, -1) for g in grads]
        sq = sum((g * g).sum(dim=2) for g in flat_grads)
        if not bool(torch.isfinite(sq).all()):
            flat_grads, sq = _clip_overflowing(flat, plan, rows[part], x[part], y[part], x[first],
                                               loss, flat_grads, sq, clip[part])
        factors = clip_factors(sq, clip[part], lambda where, fg=flat_grads: overflow_safe_row_norms(
            [g[where] for g in fg])) * valid[part]
        offset = 0
        for g, size in zip(flat_grads, flat.sizes, strict=True):
            torch.bmm(factors.unsqueeze(1), g, out=out[part, offset:offset + size].unsqueeze(1))
            offset += size


def _clip_overflowing(flat: FlatModel, plan: BatchedPlan, rows: Tensor, x: Tensor, y: Tensor,
                      sample: Tensor, loss: Callable[[Tensor, Tensor], Tensor],
                      grads: list[Tensor], sq: Tensor, clip: Tensor) -> tuple[list[Tensor], Tensor]:
    """:func:`privacy.dpsgd.clip_overflowing_rows` for the vmap engine's per-sample gradients
    ``grads`` (each (k, B, d)) of the clients ``rows`` (k, P) on ``x``/``y`` (k, B, ...): a
    sample's gradient with an entry beyond the float range is recomputed with its loss scaled
    and replaced by its clipped value, as the loop's Opacus path does. Returns the gradients
    and their squared norms (0 where replaced)."""
    module, names = flat.module, plan.names
    k, width = sq.shape
    pieces = [g.reshape(k * width, -1) for g in grads]

    def scaled(index: Tensor, scale: float) -> list[Tensor]:
        def sample_loss(params: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> Tensor:
            logits = torch.func.functional_call(module, dict(zip(names, params, strict=True)),
                                                (xi.unsqueeze(0),))
            return loss(logits, yi.unsqueeze(0)).sum() * scale

        client, at = index // width, index % width
        params = tuple(v.detach()[client] for v in _row_views(flat, rows))
        with torch.no_grad(), _vmap_pass(module, sample):
            got = torch.vmap(torch.func.grad(sample_loss))(params, x[client, at], y[client, at])
        return [g.reshape(index.shape[0], -1) for g in got]

    sq = clip_overflowing_rows(pieces, sq.reshape(-1), clip.expand(k, width).reshape(-1), scaled)
    return [p.reshape(k, width, -1) for p in pieces], sq.reshape(k, width)


# ---------------------------------------------------------------------------- the trainer

def _loop_train(flat: FlatModel, cfg: TrainConfig, oracle: Any, kind: str | None,
                jobs: Sequence[ClientJob], workspace: Workspace,
                alphas: dict[int, float]) -> dict[int, int]:
    """The reference path: :func:`local_train` per job, in the given order (final mixing
    weights into ``alphas``)."""
    steps: dict[int, int] = {}
    default_clip = oracle.dpsgd.max_grad_norm if kind == "dp" else None
    try:
        for job in jobs:
            inner = oracle
            if kind == "dp":
                oracle.select(job.noise_multiplier, job.noise)
                oracle.on_step = job.on_step
                oracle.dpsgd.max_grad_norm = float(
                    job.max_grad_norm if job.max_grad_norm is not None else default_clip)
            # the proximal term outside the mixture (as the batched engine): at theta itself,
            # not scaled by alpha and not part of alpha's step
            mixture = _MixtureStep(inner, job) if job.mix_with is not None else None
            if mixture is not None:
                inner = mixture
            if job.mu:
                inner = _ProximalStep(inner, job.theta, job.anchor, job.mu)
            steps[job.index] = local_train(flat, job.theta, job.x, job.y, cfg, inner,
                                           job.generator, workspace, phi=job.phi, lam=job.lam,
                                           client=job.index)
            if mixture is not None:
                alphas[job.index] = mixture.alpha
    finally:
        if kind == "dp":
            oracle.dpsgd.max_grad_norm = default_clip
    return steps


class _ProximalStep:
    """FedProx's ``mu * (theta - anchor)`` added after the wrapped oracle's gradient (the
    loop form of :class:`ClientJob`'s ``mu``; the same arithmetic as baselines.ProximalGradient)."""

    def __init__(self, inner: Any, theta: Tensor, anchor: Tensor, mu: float) -> None:
        self.inner, self.theta, self.anchor, self.mu = inner, theta, anchor, mu

    def retarget(self, old: Tensor, new: Tensor) -> None:
        retarget(self.inner, old, new)
        if same_row(self.theta, old):
            self.theta = new

    def batches(self, n: int, epochs: int, generator: torch.Generator) -> Any:
        return self.inner.batches(n, epochs, generator)

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        self.inner.gradient(model, x, y, grad)
        grad.add_(self.theta, alpha=self.mu).sub_(self.anchor, alpha=self.mu)


class _MixtureStep:
    """APFL's mixture gradient around the wrapped oracle (the loop form of
    :class:`ClientJob`'s ``mix_with``; the same arithmetic as baselines.MixtureGradient)."""

    def __init__(self, inner: Any, job: ClientJob) -> None:
        assert job.mix_with is not None
        self.inner, self.v, self.w = inner, job.theta, job.mix_with
        self.alpha, self.adaptive, self.lr = float(job.mix_alpha), job.mix_adaptive, job.mix_lr
        self.saved = torch.empty_like(job.theta)

    def retarget(self, old: Tensor, new: Tensor) -> None:
        retarget(self.inner, old, new)
        if same_row(self.v, old):
            self.v = new

    def batches(self, n: int, epochs: int, generator: torch.Generator) -> Any:
        return self.inner.batches(n, epochs, generator)

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        a = self.alpha
        self.saved.copy_(self.v)
        self.v.mul_(a).add_(self.w, alpha=1.0 - a)
        try:
            self.inner.gradient(model, x, y, grad)
        finally:
            self.v.copy_(self.saved)
        if self.adaptive:
            step = float(torch.dot(self.v, grad) - torch.dot(aligned(self.w), grad))  # dot rounds by address
            self.alpha = min(1.0, max(0.0, a - self.lr * step))
        grad.mul_(a)


def _positive_finite(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and > 0."""
    return is_finite_number(value) and value > 0  # type: ignore[operator]


def _validate(flat: FlatModel, jobs: Sequence[ClientJob], kind: str | None) -> None:
    seen_rows: set[int] = set()
    seen_noise: set[int] = set()
    for job in jobs:
        if job.theta.shape != (flat.num_params,):
            raise ClientUpdateError(f"client {job.index}: row has shape {tuple(job.theta.shape)},"
                                    f" expected ({flat.num_params},)")
        if job.lam < 0 or (job.lam > 0 and job.phi is None):
            raise ClientUpdateError(f"client {job.index}: invalid regularization lam={job.lam},"
                                    f" phi given: {job.phi is not None}")
        if job.mu < 0 or (job.mu > 0 and job.anchor is None):
            raise ClientUpdateError(f"client {job.index}: invalid proximal term mu={job.mu},"
                                    f" anchor given: {job.anchor is not None}")
        if job.x.shape[0] != job.y.shape[0]:
            raise ClientUpdateError(f"client {job.index}: {job.x.shape[0]} inputs but"
                                    f" {job.y.shape[0]} targets")
        if job.mix_with is not None and (kind != "plain" or not 0.0 <= job.mix_alpha <= 1.0
                                         or job.mix_with.shape != job.theta.shape):
            raise ClientUpdateError(f"client {job.index}: a mixture needs a non-private oracle,"
                                    f" alpha in [0, 1] (got {job.mix_alpha}) and a row of the"
                                    " trained row's shape")
        if job.theta.data_ptr() in seen_rows:
            raise ClientUpdateError(f"client {job.index}: two jobs train the same row")
        seen_rows.add(job.theta.data_ptr())
        if kind == "dp":
            if not is_noise_source(job.noise) or job.noise_multiplier is None:
                raise ClientUpdateError(f"client {job.index}: DP-SGD needs the client's noise"
                                        " source and noise multiplier")
            # checked here, before any client's sample or noise is drawn (a noise source
            # would refuse a bad std only after the other clients' draws of the step)
            for name, value in (("noise multiplier", job.noise_multiplier),
                                ("clip norm", job.max_grad_norm)):
                if value is not None and not _positive_finite(value):
                    raise ClientUpdateError(f"client {job.index}: DP-SGD's {name} must be a"
                                            f" finite number > 0, got {value!r}")
            if id(job.noise) in seen_noise:
                raise ClientUpdateError(f"client {job.index}: its noise source is shared with"
                                        " another job (each client draws from its own)")
            seen_noise.add(id(job.noise))


def train_clients(flat: FlatModel, cfg: TrainConfig, oracle: GradientOracle,
                  jobs: Sequence[ClientJob], workspace: Workspace | None = None, *,
                  engine: str = "auto", chunk: int = 256) -> BatchedOutcome:
    """Train every job's row in place for ``cfg.local_epochs`` epochs, all clients together.

    Guarantees: each row ends where :func:`local_train` (run per job, in order, with the same
    oracle) would leave it, up to float rounding; each client's generator / noise source is
    advanced exactly as by the loop; under DP each executed step calls the job's ``on_step``
    once and counts in ``oracle.steps_executed``. ``engine="loop"`` forces the per-client
    reference path (``workspace`` is then used; one is made if None); ``"auto"`` batches when
    :func:`batched_plan` allows it. Non-finite results: the affected rows are restored to their
    values before the call and :class:`BatchedTrainingError` names them. ``chunk`` bounds how
    many clients train together (memory: about four (chunk x P) float matrices).
    """
    if engine not in ("auto", "loop"):
        raise ClientUpdateError(f"engine must be 'auto' or 'loop'; got {engine!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ClientUpdateError(f"chunk must be a positive int; got {chunk!r}")
    kind, why = _oracle_kind(oracle)
    _validate(flat, jobs, kind)
    if not jobs:
        return BatchedOutcome({}, "none")
    if engine == "loop":
        plan = BatchedPlan("loop", "engine='loop' requested")
    else:
        probe = engine_probe(((j.x, j.y) for j in jobs), oracle)
        plan = batched_plan(flat, oracle, *(probe or (None, None)))
    if plan.engine == "loop":
        ws = workspace if workspace is not None else Workspace.for_size(flat.num_params, jobs[0].theta.device)
        alphas: dict[int, float] = {}
        steps = _loop_train(flat, cfg, oracle, kind, jobs, ws, alphas)
        return BatchedOutcome(steps, "loop", plan.reason or why, alphas)
    return _train_batched(flat, cfg, oracle, kind, plan, jobs, chunk)


class _Scratch:
    """Work buffers and gathered client data kept between calls for one model: large fresh
    allocations page-fault on every touch, which costs as much as a round's elementwise work."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}
        # each gather with weak references to the tensors it was gathered from: a key of
        # addresses alone also matches new tensors allocated where freed ones were
        self.data: dict[tuple[Any, ...], tuple[Tensor, Tensor, tuple[weakref.ref[Tensor], ...]]] = {}
        self.norms: tuple[weakref.ref[Tensor], Tensor] | None = None
        # Gathers are kept up to twice the bytes the largest call (one train_clients or
        # evaluate_losses) asked for, least recently used out first: a round's chunks are
        # reused by the next round, while other participants' gathers (partial participation)
        # do not pile up beside them.
        self.call_bytes = 0
        self.budget = 0

    def begin_call(self) -> None:
        """A call starts: the gathers it asks for count toward the budget afresh."""
        self.call_bytes = 0

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized tensor of ``shape`` (a view of a reused one when it is big enough)."""
        held = self.buffers.get(name)
        need = math.prod(shape)
        if held is None or held.dtype != dtype or held.device != device or held.numel() < need:
            held = torch.empty(need, dtype=dtype, device=device)
            self.buffers[name] = held
        return held[:need].view(shape)

    def gathered(self, xs: Sequence[Tensor], ys: Sequence[Tensor], device: torch.device
                 ) -> tuple[Tensor, Tensor]:
        """The inputs ``xs`` and targets ``ys`` concatenated, plus one all-zero padding sample
        last. Reused while every tensor is unchanged (the same tensor objects, storage, shape
        and version)."""
        sources = (*xs, *ys)
        key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in sources)
        hit = self.data.get(key)
        if hit is not None and all(ref() is t for ref, t in zip(hit[2], sources, strict=True)):
            self.data[key] = self.data.pop(key)  # the most recently used last
            self._count(hit[0], hit[1])
            return hit[0], hit[1]
        x_pad = torch.zeros((1, *xs[0].shape[1:]), dtype=xs[0].dtype, device=device)
        y_pad = torch.zeros((1, *ys[0].shape[1:]), dtype=ys[0].dtype, device=device)
        value = (torch.cat([x.to(device) for x in xs] + [x_pad]),
                 torch.cat([y.to(device) for y in ys] + [y_pad]))
        self.data.pop(key, None)  # gathered from tensors freed since
        self.data[key] = (*value, tuple(weakref.ref(t) for t in sources))
        self._count(*value)
        total = sum(_nbytes(x) + _nbytes(y) for x, y, _ in self.data.values())
        for old in list(self.data)[:-1]:
            if total <= self.budget:
                break
            x, y, _ = self.data.pop(old)
            total -= _nbytes(x) + _nbytes(y)
        return value

    def _count(self, x: Tensor, y: Tensor) -> None:
        self.call_bytes += _nbytes(x) + _nbytes(y)
        self.budget = max(self.budget, 2 * self.call_bytes)

    def squared_norms(self, x_all: Tensor) -> Tensor:
        """``||x_b||^2`` of every (flattened) row of a gathered input, kept with it."""
        if self.norms is not None and self.norms[0]() is x_all:
            return self.norms[1]
        flat = x_all.reshape(x_all.shape[0], -1)
        held = torch.linalg.vecdot(flat, flat)
        self.norms = (weakref.ref(x_all), held)
        return held


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


_SCRATCH: weakref.WeakKeyDictionary[FlatModel, _Scratch] = weakref.WeakKeyDictionary()


def _train_batched(flat: FlatModel, cfg: TrainConfig, oracle: Any, kind: str | None,
                   plan: BatchedPlan, jobs: Sequence[ClientJob], chunk: int) -> BatchedOutcome:
    sizes = [int(j.x.shape[0]) for j in jobs]
    if kind == "dp":
        counts = [math.ceil(cfg.local_epochs / oracle.sample_rate - 1e-9)] * len(jobs)
        schedules: list[list[Tensor] | None] = [None] * len(jobs)
    else:
        # each client's whole batch order, drawn up front from its own generator (as the loop)
        schedules = [list(oracle.batches(n, cfg.local_epochs, j.generator))
                     for n, j in zip(sizes, jobs, strict=True)]
        counts = [len(s) for s in schedules]
    flat.module.train()  # as local_train does (matters for the vmap engine's modules)
    # longest runs first: in a chunk, the clients still training at step t are a prefix
    order = sorted(range(len(jobs)), key=lambda r: -counts[r])
    scratch = _SCRATCH.setdefault(flat, _Scratch())
    scratch.begin_call()
    steps: dict[int, int] = {}
    failed: list[int] = []
    alphas: dict[int, float] = {}
    for first in range(0, len(order), chunk):
        part = order[first:first + chunk]
        done, bad = _train_chunk(flat, cfg, oracle, kind, plan, scratch, [jobs[r] for r in part],
                                 [counts[r] for r in part], [sizes[r] for r in part],
                                 [schedules[r] for r in part], alphas)
        steps.update(done)
        failed.extend(bad)
    if failed:
        lam = max(float(jobs[r].lam) for r in range(len(jobs)) if jobs[r].index in failed)
        first = next(j for j in jobs if j.index == min(failed))  # its row was left unchanged
        # as local_train says it, which refuses an overflowing pull weight before training
        why = (f" (the pull's weight overflows {first.theta.dtype})"
               if pull_weight_overflows(cfg, lam, first.theta.dtype) else "")
        hint = failure_hint(flat, first.theta, first.x, first.y, cfg, lam)
        raise BatchedTrainingError(f"local training produced non-finite parameters for clients"
                                   f" {sorted(failed)}{why}; their updates were discarded"
                                   f" ({hint})", sorted(failed), steps)
    return BatchedOutcome(steps, plan.engine, alphas=alphas)


def _rows_per_block(k: int, num_params: int, device: torch.device) -> int:
    """Rows per block of the step's elementwise passes (see _BLOCK_VALUES, _CORE_BLOCK_VALUES)."""
    if device.type == "cpu" and torch.get_num_threads() == 1 and k * num_params > _CORE_BLOCK_VALUES:
        return max(1, _CORE_BLOCK_VALUES // num_params)
    return k if k * num_params <= _BLOCK_FROM else max(1, _BLOCK_VALUES // num_params)


def _schedule_index(schedules: Sequence[Sequence[Tensor] | None], offsets: Sequence[int],
                    pad_row: int, steps: int) -> tuple[Tensor, Tensor, list[int]]:
    """The rows into the gathered data of every client's batch at every step, as one
    (steps, clients, width) index (each client's batches shifted by its offset, left-aligned;
    padding: ``pad_row``), its validity mask and each step's own width (its largest batch, at
    least 1), built with a few tensor operations."""
    k = len(schedules)
    lengths = torch.zeros((k, steps), dtype=torch.long)
    flat_parts = []
    for r, batches in enumerate(schedules):
        assert batches is not None
        if batches:
            lengths[r, :len(batches)] = torch.tensor([int(b.shape[0]) for b in batches])
            flat_parts.append(torch.cat(list(batches)) + offsets[r])
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    valid = torch.arange(width)[None, None, :] < lengths[:, :, None]
    index = torch.full((k, steps, width), pad_row, dtype=torch.long)
    if flat_parts:
        index[valid] = torch.cat(flat_parts)  # client by client, step by step: row-major order
    step_widths = lengths.max(dim=0).values.clamp(min=1).tolist() if k else [1] * steps
    return index.transpose(0, 1).contiguous(), valid.transpose(0, 1).contiguous(), step_widths


def _train_chunk(flat: FlatModel, cfg: TrainConfig, oracle: Any, kind: str | None,
                 plan: BatchedPlan, scratch: _Scratch, jobs: list[ClientJob], counts: list[int],
                 sizes: list[int], schedules: list[list[Tensor] | None],
                 alphas_out: dict[int, float]) -> tuple[dict[int, int], list[int]]:
    """Train one chunk of jobs (sorted by decreasing step count) together; returns the steps
    per client and the clients whose rows were left unchanged because training diverged
    (final mixing weights of mixture jobs into ``alphas_out``)."""
    device = jobs[0].theta.device
    dtype = jobs[0].theta.dtype
    k_all, num_params = len(jobs), flat.num_params
    lr, momentum, wd = cfg.lr, cfg.momentum, cfg.weight_decay
    rows = torch.stack([j.theta.detach() for j in jobs],
                       out=scratch.buffer("rows", (k_all, num_params), dtype, device))
    grad = scratch.buffer("grad", (k_all, num_params), dtype, device)
    buffer = scratch.buffer("momentum", (k_all, num_params), dtype, device) if momentum else None

    proximal = any(j.mu > 0 for j in jobs)
    anchor = mu = None
    if proximal:
        anchor = torch.stack([j.anchor if j.anchor is not None else j.theta for j in jobs],
                             out=scratch.buffer("anchor", (k_all, num_params), dtype, device))
        mu = torch.tensor([j.mu for j in jobs], dtype=dtype, device=device)[:, None]
    # FEDORA's pull, applied with the step: theta <- keep * theta + lr*lam*phi - lr * step,
    # keep = 1 - lr*lam (the loop's theta - lr*step - lr*lam*(theta - phi), regrouped).
    pulled = any(j.lam > 0 for j in jobs)
    keep = pulled_phi = None
    if pulled:
        lams = torch.tensor([j.lam for j in jobs], dtype=dtype, device=device)[:, None]
        keep = 1 - lr * lams
        scaled = lr * lams
        pulled_phi = scratch.buffer("phi", (k_all, num_params), dtype, device)
        # one pass per row (read phi_i, write lr*lam_i*phi_i): the values of stack-then-scale,
        # without a second pass over the whole (k x P) buffer
        for r, j in enumerate(jobs):
            torch.mul(j.phi if j.phi is not None else j.theta, scaled[r], out=pulled_phi[r])

    # APFL's mixture: gradients at alpha * theta + (1 - alpha) * w (a job without one: alpha 1)
    mixing = any(j.mix_with is not None for j in jobs)
    mix_w = mixed = alphas = one_minus = adaptive = mix_lr = None
    if mixing:
        mix_w = torch.stack([j.mix_with if j.mix_with is not None else j.theta for j in jobs],
                            out=scratch.buffer("mix_w", (k_all, num_params), dtype, device))
        mixed = scratch.buffer("mixed", (k_all, num_params), dtype, device)
        # float64 on the CPU, as the loop's Python floats
        alphas = torch.tensor([float(j.mix_alpha) if j.mix_with is not None else 1.0 for j in jobs],
                              dtype=torch.float64)
        adaptive = torch.tensor([j.mix_with is not None and j.mix_adaptive for j in jobs])
        mix_lr = torch.tensor([float(j.mix_lr) for j in jobs], dtype=torch.float64)

    # every client's data in one tensor (plus one padding sample): one gather per step
    x_all, y_all = scratch.gathered([j.x for j in jobs], [j.y for j in jobs], device)
    pad_row = x_all.shape[0] - 1
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    offset_column = torch.tensor(offsets, dtype=torch.long)[:, None]

    loss = _oracle_loss(oracle, kind)
    if kind == "dp":
        clip_default = float(oracle.dpsgd.max_grad_norm)
        clips = [float(j.max_grad_norm) if j.max_grad_norm is not None else clip_default for j in jobs]
        clip = torch.tensor(clips, dtype=dtype, device=device)[:, None]
        # each client's own expected batch q * n_i, as the loop's DPGradient.batches sets it
        scales = [1.0 / expected_batch_size(oracle.sample_rate, n, oracle.empty_batch_size)
                  for n in sizes]
        scale = torch.tensor(scales, dtype=dtype, device=device)[:, None]
        noise_std = [float(j.noise_multiplier) * c * s
                     for j, c, s in zip(jobs, clips, scales, strict=True)]
    else:
        max_norm = oracle.max_grad_norm
    # SGD momentum accumulated inside the gradient GEMMs (buffer <- m * buffer + grad), where
    # nothing (clip, mixture, noise) must see the data gradient alone; weight decay and
    # FedProx's term are then added to the buffer, as the loop adds them to the gradient
    # before its momentum step (the same sum, in another order)
    fold_momentum = (kind == "plain" and max_norm is None and plan.engine == "linear"
                     and not mixing and bool(momentum))
    # contiguous output of the largest weight-gradient GEMM (see _write_linear)
    work = None
    if plan.engine == "linear":
        largest = max(math.prod(layer[2]) for layer in plan.layers if layer[0] == "linear")
        work = scratch.buffer("work", (k_all * largest,), dtype, device)
    # with the momentum in the GEMMs, the first Linear's weight gradient (the last GEMM of the
    # backward, usually the largest) is moved into the buffer in the step's row blocks, while
    # each block is in the cache for the passes that follow
    deferred = next(layer for layer in plan.layers if layer[0] == "linear") if (
        fold_momentum and work is not None) else None
    executed = [0] * k_all
    steps_total = counts[0] if counts else 0
    if kind != "dp" and steps_total:
        # the whole run's (step, client, width) sample rows at once, padded with the padding row
        all_index, all_valid, step_widths = _schedule_index(schedules, offsets, pad_row, steps_total)
        all_index, all_valid = all_index.to(device), all_valid.to(device)
    x_shape, y_shape = x_all.shape[1:], y_all.shape[1:]
    # DP-SGD's per-sample norms need ||x||^2 of every sample the first Linear reads: once per
    # sample (reused while the data is unchanged), not once per step
    x_sq_all = scratch.squared_norms(x_all) if (
        kind == "dp" and plan.engine == "linear" and _reads_raw_input(plan)
        and x_all.is_floating_point()) else None
    for t in range(steps_total):
        k = sum(1 for c in counts if c > t)
        if kind == "dp":
            batches = [poisson_sample(sizes[r], oracle.sample_rate, jobs[r].noise) for r in range(k)]
            # (k, width) sample rows into x_all: each client's batch shifted by its offset,
            # padded with the all-zero padding sample (weight 0)
            lengths = torch.tensor([int(b.shape[0]) for b in batches])
            width = max(int(lengths.max()), 1)
            valid = torch.arange(width)[None, :] < lengths[:, None]
            index = torch.nn.utils.rnn.pad_sequence(list(batches), batch_first=True)
            if index.shape[1] < width:  # every batch empty
                index = torch.nn.functional.pad(index, (0, width - index.shape[1]))
            index = torch.where(valid, index + offset_column[:k], pad_row)
            index, valid = index.to(device).view(-1), valid.to(device)
        else:
            width = step_widths[t]  # the step's largest batch: no column is padding for all
            index, valid = all_index[t, :k, :width].reshape(-1), all_valid[t, :k, :width]
        x = torch.index_select(x_all, 0, index, out=scratch.buffer(
            "x", (index.shape[0], *x_shape), x_all.dtype, device)).view(k, width, *x_shape)
        x_sq = x_sq_all.index_select(0, index).view(k, width) if x_sq_all is not None else None
        y = torch.index_select(y_all, 0, index, out=scratch.buffer(
            "y", (index.shape[0], *y_shape), y_all.dtype, device)).view(k, width, *y_shape)
        w_rows, g_rows = rows[:k], grad[:k]
        if kind == "dp":
            # (sum_i clip(g_i) + noise) / B_expected, the noise drawn after the sample (loop order)
            if plan.engine == "linear":
                _linear_clipped_sum(plan, w_rows, x, y, valid, clip[:k], loss, g_rows, x_sq, work)
            else:
                _vmap_clipped_sum(flat, plan, w_rows, x, y, valid, clip[:k], loss, g_rows)
            g_rows.mul_(scale[:k])
            for r in range(k):
                g_rows[r].add_(jobs[r].noise.normal(num_params, noise_std[r], dtype=dtype, device=device))
        else:
            weights = valid.to(dtype) / valid.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
            at_rows = w_rows
            if mixing:
                a_now = alphas[:k].to(dtype=dtype, device=device)[:, None]
                one_minus = (1.0 - alphas[:k]).to(dtype=dtype, device=device)[:, None]
                at_rows = torch.mul(w_rows, a_now, out=mixed[:k]).addcmul_(mix_w[:k], one_minus)
            if fold_momentum:
                assert buffer is not None
                g_rows = buffer[:k]  # from here on: the momentum step itself
                _linear_gradient(plan, at_rows, x, y, weights, loss, g_rows, 0.0,
                                 momentum if t > 0 else 0.0, work, deferred is not None)
            elif plan.engine == "linear":
                _linear_gradient(plan, at_rows, x, y, weights, loss, g_rows, work=work)
            else:
                _vmap_gradient(flat, plan, at_rows, x, y, weights, loss, g_rows)
            if max_norm is not None:
                norms = g_rows.norm(dim=1, keepdim=True)
                g_rows.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)))
            if mixing:
                if bool(adaptive[:k].any()):
                    dots = (torch.bmm(w_rows.unsqueeze(1), g_rows.unsqueeze(2))
                            - torch.bmm(mix_w[:k].unsqueeze(1), g_rows.unsqueeze(2))).view(k)
                    moved = (alphas[:k] - mix_lr[:k] * dots.to(device="cpu", dtype=torch.float64)
                             ).clamp(0.0, 1.0)
                    alphas[:k] = torch.where(adaptive[:k], moved, alphas[:k])
                g_rows.mul_(a_now)
        step = buffer[:k] if (momentum and not fold_momentum) else g_rows
        rows_per_block = _rows_per_block(k, num_params, device)
        for lo in range(0, k, rows_per_block):
            hi = min(lo + rows_per_block, k)
            w_b, g_b, s_b = w_rows[lo:hi], g_rows[lo:hi], step[lo:hi]
            if deferred is not None:
                assert work is not None
                _move_deferred(deferred, work, k, lo, hi, g_b, momentum if t > 0 else 0.0)
            if proximal:
                g_b.add_(w_b * mu[lo:hi]).sub_(anchor[lo:hi] * mu[lo:hi])
            if wd:
                g_b.add_(w_b, alpha=wd)
            if momentum and not fold_momentum:
                if t == 0:
                    s_b.copy_(g_b)
                else:
                    torch.add(g_b, s_b, alpha=momentum, out=s_b)  # one pass: g + m * buffer
            if pulled:
                torch.addcmul(pulled_phi[lo:hi], w_b, keep[lo:hi], out=w_b)
            w_b.add_(s_b, alpha=-lr)
        for r in range(k):
            executed[r] += 1
            if kind == "dp":
                oracle.steps_executed += 1
                oracle.dpsgd.steps += 1
                if jobs[r].on_step is not None:
                    jobs[r].on_step()
    # a non-finite entry makes the row sum non-finite (a fast screen; rows it flags are checked
    # entry by entry, since huge finite values can overflow the sum); diverged rows are not
    # written back, so they keep their value before the call
    finite = torch.isfinite(rows.sum(dim=1)).tolist()
    failed = []
    for r, j in enumerate(jobs):
        if finite[r] or bool(torch.isfinite(rows[r]).all()):
            j.theta.copy_(rows[r])
        else:
            failed.append(j.index)
        if j.mix_with is not None:
            assert alphas is not None
            alphas_out[j.index] = float(alphas[r])
    return {j.index: executed[r] for r, j in enumerate(jobs)}, failed


@torch.no_grad()
def evaluate_losses(flat: FlatModel, matrix: Tensor, participants: Sequence[int],
                    xs: Sequence[Tensor], ys: Sequence[Tensor], chunk: int = 256) -> list[float]:
    """Mean loss (``flat.task``) of row ``matrix[i]`` on ``(xs[k], ys[k])`` for the k-th
    participant ``i``: :func:`secure_fedora.learning.client.evaluate`'s ``loss``, within float
    rounding, for all rows in one batched forward per chunk (Linear models; other models are
    evaluated row by row with ``evaluate``). Does not change ``matrix``. An empty split raises
    :class:`ClientUpdateError` as ``evaluate`` does."""
    from secure_fedora.learning.client import evaluate_loss

    if len(xs) != len(participants) or len(ys) != len(participants):
        raise ClientUpdateError(f"{len(xs)} inputs and {len(ys)} targets for {len(participants)} rows")
    for i, x in zip(participants, xs, strict=True):
        if x.shape[0] == 0:
            raise ClientUpdateError(f"cannot evaluate client {i} on an empty split")
    layers, _ = _linear_layers(flat)
    if layers is None:
        return [evaluate_loss(flat, matrix[i], x, y) for i, x, y in zip(participants, xs, ys, strict=True)]
    plan = BatchedPlan("linear", layers=layers)
    scratch = _SCRATCH.setdefault(flat, _Scratch())
    scratch.begin_call()
    device, dtype = matrix.device, matrix.dtype
    losses: list[float] = []
    for first in range(0, len(participants), chunk):
        part = list(range(first, min(first + chunk, len(participants))))
        index = torch.tensor([participants[k] for k in part], device=device)
        rows = torch.index_select(matrix, 0, index,
                                  out=scratch.buffer("eval_rows", (len(part), flat.num_params), dtype, device))
        sizes = [int(xs[k].shape[0]) for k in part]
        width = max(sizes)
        x_all, y_all = scratch.gathered([xs[k] for k in part], [ys[k] for k in part], device)
        gather = torch.full((len(part), width), x_all.shape[0] - 1, dtype=torch.long)
        offset = 0
        for r, n in enumerate(sizes):
            gather[r, :n] = torch.arange(offset, offset + n)
            offset += n
        gather = gather.to(device).view(-1)
        valid = (gather != x_all.shape[0] - 1).view(len(part), width)
        x = x_all.index_select(0, gather).view(len(part), width, *x_all.shape[1:])
        y = y_all.index_select(0, gather)
        logits, _ = _linear_forward(plan, rows, x)
        per_sample = flat.task.checked(logits.reshape(len(part) * width, *logits.shape[2:]), y)
        sums = (per_sample.view(len(part), width) * valid).sum(dim=1, dtype=torch.float64)
        losses.extend((sums / torch.tensor(sizes, dtype=torch.float64, device=device)).tolist())
    return losses


# ---------------------------------------------------------------------------- method wiring

def jobs_for_context(ctx: Any, participants: Sequence[int], theta: Tensor,
                     phi: Tensor | Mapping[int, Tensor] | None = None,
                     lams: Sequence[float] | None = None,
                     anchor: Tensor | Mapping[int, Tensor] | None = None,
                     mu: float = 0.0, mix_with: Tensor | Mapping[int, Tensor] | None = None,
                     mix_alphas: Sequence[float] | None = None, mix_adaptive: bool = False,
                     mix_lr: float = 0.0) -> list[ClientJob]:
    """One :class:`ClientJob` per participant from a ``MethodContext``-like ``ctx`` (clients,
    generators, noise, privacy, select): rows ``theta[i]`` of the (N x P) matrix, pulls toward
    ``phi[i]`` (an (N x P) matrix or a mapping client -> row, e.g. the received messages) with
    ``lams[k]`` for the k-th participant, FedProx anchors ``anchor[i]`` (or one shared 1-D
    row) with ``mu``, APFL mixtures with ``mix_with[i]`` (or one shared 1-D row) at
    ``mix_alphas[k]``. Under DP, each job gets the client's noise source, noise multiplier and
    the step hook ``ctx.privacy.select_client`` installs for it (the ledger's step count)."""
    if lams is not None and len(lams) != len(participants):
        raise ClientUpdateError(f"{len(lams)} lambdas for {len(participants)} participants")
    jobs = []
    for k, i in enumerate(participants):
        c = ctx.clients[i]
        job = ClientJob(index=i, theta=theta[i], x=c.train_x, y=c.train_y,
                        generator=ctx.generators[i],
                        phi=phi[i] if phi is not None else None,
                        lam=float(lams[k]) if lams is not None else 0.0)
        if mu:
            job.mu = float(mu)
            if isinstance(anchor, Tensor) and anchor.dim() == 1:
                job.anchor = anchor
            elif anchor is not None:
                job.anchor = anchor[i]
        if mix_with is not None:
            if mix_alphas is None or len(mix_alphas) != len(participants):
                raise ClientUpdateError("a mixture needs one alpha per participant")
            job.mix_with = mix_with if isinstance(mix_with, Tensor) and mix_with.dim() == 1 \
                else mix_with[i]
            job.mix_alpha, job.mix_adaptive, job.mix_lr = float(mix_alphas[k]), mix_adaptive, float(mix_lr)
        if ctx.privacy is not None:
            ctx.select(i)  # sets the oracle's noise source and the ledger's step hook for i
            job.noise = ctx.noise[i]
            job.noise_multiplier = ctx.privacy.clients[i].noise_multiplier
            job.on_step = getattr(ctx.oracle, "on_step", None)
        jobs.append(job)
    return jobs


def train_participants(ctx: Any, participants: Sequence[int], theta: Tensor,
                       phi: Tensor | Mapping[int, Tensor] | None = None,
                       lams: Sequence[float] | None = None, *,
                       anchor: Tensor | Mapping[int, Tensor] | None = None, mu: float = 0.0,
                       oracle: GradientOracle | None = None, engine: str = "auto",
                       chunk: int = 256, mix_with: Tensor | Mapping[int, Tensor] | None = None,
                       mix_alphas: Sequence[float] | None = None, mix_adaptive: bool = False,
                       mix_lr: float = 0.0) -> BatchedOutcome:
    """Batched equivalent of ``for k, i in enumerate(participants): ctx.train_client(i,
    theta[i], phi[i], lams[k])`` (plus FedProx's ``mu * (theta - anchor)`` gradient term):
    trains the rows of the (N x P) matrix ``theta`` in place; the outcome gives the steps per
    client. ``ctx`` is a ``secure_fedora.algorithms.methods.MethodContext``; ``oracle``
    defaults to ``ctx.oracle`` and must be the plain or DP oracle itself (not a wrapper that
    needs per-client setup, such as ``ProximalGradient``: give ``mu``/``anchor`` instead)."""
    jobs = jobs_for_context(ctx, participants, theta, phi, lams, anchor, mu, mix_with, mix_alphas,
                            mix_adaptive, mix_lr)
    return train_clients(ctx.flat, ctx.train, oracle if oracle is not None else ctx.oracle, jobs,
                         ctx.workspace, engine=engine, chunk=chunk)
