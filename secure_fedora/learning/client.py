"""The client update: local SGD on a personalized model with FEDORA's proximal pull.

All client parameters live as rows of one (N x P) float32 matrix; a :class:`FlatModel` binds a
single module's parameters (and gradients) as views onto one row, so training a client updates
its row in place. No state-dict round trips and no deep copies happen inside the training loop:
the only per-step pass the proximal pull adds is ``theta - phi`` into a reused buffer, and only
when the pull is active.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from privacy.errors import ToolkitError
from secure_fedora.core.config import pull_limit_text, pull_stability_limit
from secure_fedora.core.tensors import all_finite
from secure_fedora.learning.tasks import CROSS_ENTROPY, Task

__all__ = [
    "ALIGNMENT_BYTES",
    "ClientUpdateError",
    "Evaluation",
    "FlatModel",
    "GradientOracle",
    "MomentumSGD",
    "PlainGradient",
    "TrainConfig",
    "aligned",
    "aligned_empty",
    "aliased_module",
    "client_randomness",
    "evaluate",
    "evaluate_loss",
    "local_train",
    "retarget",
    "same_row",
]


def proximal_pull_(theta: Tensor, theta_before: Tensor, phi: Tensor, lr: float, lam: float) -> Tensor:
    """In place: ``theta <- theta - lr * lam * (theta_before - phi)``; returns ``theta``.

    Applied after every optimizer step with ``theta_before`` the parameters before that step.
    """
    if lam != 0.0:
        theta.add_(theta_before - phi, alpha=-lr * lam)
    return theta


class ClientUpdateError(ToolkitError, ValueError):
    """Raised for a client update that cannot be applied (shape, non-finite values)."""


PULL_RESUME_COMMAND = "secure-fedora run CONFIG --out RUN_DIR --resume"
"""The resume command a pull's divergence names (the CLI puts in the run's own paths)."""

def name_resume_command(err: BaseException, command: str) -> None:
    """Put ``command`` in place of :data:`PULL_RESUME_COMMAND` in the message of ``err`` and
    of every error it was raised from (``__cause__``), in place: the runtime that stopped
    names the resume that works there. A message without it is left as it is."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.args and isinstance(e.args[0], str) and PULL_RESUME_COMMAND in e.args[0]:
            e.args = (e.args[0].replace(PULL_RESUME_COMMAND, command), *e.args[1:])
        e = e.__cause__


PULL_RESUME_HINT = (f"the run keeps what it released: with fedora.max_pull = 1 set in its "
                    f"config (the one change a resume accepts), `{PULL_RESUME_COMMAND}` "
                    "continues it")
"""How a run stopped by an unstable pull continues (``fedora.max_pull`` only post-processes
lambda, so a resume may change it)."""

PULL_DIVERGED = "FEDORA's pull diverged"
"""How every error for a non-finite result of an unstable pull begins its cause (the Flower
runtime recognises it, see ``protocol.client_error_text``)."""

DIVERGED_HINT = ("training diverged: lower training.lr; a non-private run can also set "
                 "training.clip_grad_norm")
"""What a non-finite training result tells the user to change."""


def diverged_hint(cfg: TrainConfig, lam: float) -> str:
    """:data:`DIVERGED_HINT`, or, when FEDORA's pull itself is unstable (``cfg.lr * lam`` at or
    above :func:`~secure_fedora.core.config.pull_stability_limit` of ``cfg``: 2 without weight
    decay, where each step multiplies ``theta - phi`` by ``1 - lr * lam``), that cause and its
    remedy."""
    pull = cfg.lr * lam
    if math.isinf(lam):
        # exp((L_loc - L_rec) / 2) overflows only for losses over 1,419 nats apart: no lr
        # makes such a pull stable, and losses that far apart come from the inputs' scale
        return (f"{PULL_DIVERGED}: lambda = inf (the client's validation losses "
                "differ by more than 1,419 nats, so exp overflows), which no training.lr can "
                "make stable; losses that large usually mean inputs (or initial parameters) "
                "on a very large scale: scale the features (e.g. standardize them), or set "
                f"fedora.max_pull = 1 (a pull then stops at phi); {PULL_RESUME_HINT}")
    if pull >= pull_stability_limit(cfg.lr, cfg.momentum, cfg.weight_decay):
        return (f"{PULL_DIVERGED}: lr * lambda = {pull:.3g} >= "
                f"{pull_limit_text(cfg.lr, cfg.momentum, cfg.weight_decay)}, so each step moves "
                f"theta farther from phi (lambda = {lam:.3g} from the validation losses); set "
                "fedora.max_pull = 1 (a pull then stops at phi) or lower training.lr; "
                f"{PULL_RESUME_HINT}")
    return DIVERGED_HINT


def pull_weight_overflows(cfg: TrainConfig, lam: float, dtype: torch.dtype) -> bool:
    """Whether FEDORA's pull weight ``cfg.lr * lam`` is beyond the range of ``dtype`` (the
    parameters'): then every step makes them non-finite, so both engines refuse to train."""
    return lam > 0 and dtype.is_floating_point and cfg.lr * lam > torch.finfo(dtype).max


def failure_hint(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor, cfg: TrainConfig,
                 lam: float) -> str:
    """The cause both engines name for a non-finite training result from ``theta``: a start
    already non-finite (:func:`start_scale_problem`) first, noting a pull that is unstable
    too, else :func:`diverged_hint`. So the pull's tag (``(FEDORA's pull diverged: ``) always
    means that the loss and its gradient at the start were finite, as results.json's
    ``assumptions.client_errors`` states of it."""
    start = start_scale_problem(flat, theta, x, y)
    if start is None:
        return diverged_hint(cfg, lam)
    pull = cfg.lr * lam
    if lam > 0 and pull >= pull_stability_limit(cfg.lr, cfg.momentum, cfg.weight_decay):
        start += (f"; FEDORA's pull is unstable too (lr * lambda = {pull:.3g} >= "
                  f"{pull_limit_text(cfg.lr, cfg.momentum, cfg.weight_decay)}): an unstable "
                  "pull of an earlier round can leave the parameters on such a scale; "
                  f"fedora.max_pull = 1 bounds it, and {PULL_RESUME_HINT}")
    return start


def start_scale_problem(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor,
                        rows: int = 64) -> str | None:
    """Why training from ``theta`` on ``x``/``y`` cannot succeed at any learning rate, or None:
    when the loss, its gradient or the gradient's squared norm on the first ``rows`` examples
    is already non-finite at ``theta`` (before any step), the inputs or parameters are on a
    scale float32 cannot hold.
    Reads ``theta`` and ``x`` only (copies are bound and fed); for a failure path's message."""
    if x.shape[0] == 0:
        return None
    row = theta.detach().clone()
    grad = torch.zeros_like(row)
    model = flat.bind(row, grad)
    was_training = model.training
    try:
        model.train()
        with torch.enable_grad():
            # a copy: a model may write its (train-mode) batch in place, and x is stored data
            batch = x[:rows].clone()
            loss = flat.task.sum_loss(model(batch), y[:rows]) / min(rows, int(x.shape[0]))
            what = "loss" if not bool(torch.isfinite(loss).all()) else None
            if what is None:
                loss.backward()
                if not all_finite(grad):
                    what = "gradient of the loss"
                elif not math.isfinite(float(torch.dot(grad, grad))):
                    # its norm overflows: every step, clipped or not, works on overflowed values
                    what = "squared norm of the loss's gradient"
    finally:
        model.train(was_training)
    if what is None:
        return None
    return (f"the {what} is already non-finite at the start of training, before any step (so "
            "the learning rate is not the cause): the inputs or the model's initial parameters are on a "
            "scale float32 cannot hold; scale the features (e.g. standardize them) or the "
            "initialisation")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation hyper-parameters (reference: lr 5e-3, momentum 0.9, wd 5e-5, batch 64, E 5)."""

    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    batch_size: int = 64
    local_epochs: int = 5


def aliased_module(module: nn.Module) -> str | None:
    """Which submodule ``module`` registers under a second name (``"module 'b' is module
    'a'"``), else None. ``torch.func.functional_call`` does not restore such a model: it
    leaves the tensors it substituted in the module, unbound from the flat row, so the batched
    engines must not run it."""
    seen: dict[int, str] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        if id(sub) in seen:
            return f"module {name!r} is module {seen[id(sub)]!r}"
        seen[id(sub)] = name
    return None


class FlatModel:
    """One module whose parameters can be bound as views onto any row of a flat matrix."""

    def __init__(self, module: nn.Module, task: Task | None = None) -> None:
        self.module = module
        # The loss and metric clients train and are evaluated with (cross-entropy/accuracy
        # by default); see secure_fedora.learning.tasks.
        self.task: Task = task if task is not None else CROSS_ENTROPY
        self.params: list[nn.Parameter] = list(module.parameters())
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.num_params = sum(self.sizes)
        self._bound: tuple[int, int] | None = None

    def initial_vector(self) -> Tensor:
        """The module's current parameters flattened into one float32 vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params]).to(torch.float32).clone()

    def bind(self, row: Tensor, grad: Tensor | None = None) -> nn.Module:
        """Make the module's parameters (and ``.grad``) views of ``row`` (and ``grad``).

        Afterwards, forward passes use ``row`` and backward passes accumulate into ``grad``;
        writing to ``row`` changes the model. Rebinding the same storage is free.
        """
        if row.shape != (self.num_params,):
            raise ClientUpdateError(f"parameter row has shape {tuple(row.shape)}, expected ({self.num_params},)")
        key = (row.data_ptr(), grad.data_ptr() if grad is not None else 0)
        if self._bound == key:
            return self.module
        offset = 0
        for p, shape, size in zip(self.params, self.shapes, self.sizes, strict=True):
            p.data = row[offset : offset + size].view(shape)
            p.grad = grad[offset : offset + size].view(shape) if grad is not None else None
            offset += size
        self._bound = key
        return self.module


@dataclass(frozen=True)
class Evaluation:
    """Mean loss, accuracy and the task's metric of one model on one data split.

    ``metric`` is what model selection uses: the accuracy for cross-entropy, the ROC AUC for
    binary/multi-label BCE (see :mod:`secure_fedora.learning.tasks`); ``accuracy`` is always the
    fraction of correct predictions (label entries for multi-label, threshold 0.5). The
    metric is stored as given: one that is no number (a NaN AUC) stays NaN, never replaced by
    the accuracy, and the runtimes leave it out (see README "Failure model").
    """

    loss: float
    accuracy: float
    metric: float


ALIGNMENT_BYTES = 64
"""The address alignment every client computation runs at: what torch's CPU allocator gives."""


def aligned(t: Tensor) -> Tensor:
    """``t`` itself when its data starts on an :data:`ALIGNMENT_BYTES` boundary, else a
    contiguous copy (which does). Equal values then give equal bits wherever they were stored.

    Why: the matmul kernels choose their code path by address, so the same parameter row
    gave different float rounding inside the in-process (N x P) matrix (row ``i`` starts ``i *
    P * 4`` bytes in) than as a Flower node's own tensor, in one-sample forwards of the MNIST
    MLP (measured with torch 2.13 / MKL: the losses of 5 of 40 clients at one validation
    row). FEDORA's gate and IFCA's choice flip on such near-ties, so evaluation computes on
    aligned copies, and :func:`local_train` trains one (a batch of one has the same
    dependence)."""
    if t.data_ptr() % ALIGNMENT_BYTES == 0:
        return t
    copy = aligned_empty(t.shape, t.dtype, t.device)
    copy.copy_(t)
    return copy


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised contiguous tensor whose data starts on an :data:`ALIGNMENT_BYTES`
    boundary, whatever address the allocator returns: the allocation itself when it is
    aligned (torch's CPU and CUDA allocators give that), else one with
    :data:`ALIGNMENT_BYTES` to spare, viewed from its first boundary. :class:`ClientUpdateError`
    only when no boundary can be reached (an address that is not a multiple of the element
    size)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if t.data_ptr() % ALIGNMENT_BYTES == 0:
        return t
    size = t.element_size()
    spare = torch.empty(t.numel() + ALIGNMENT_BYTES // size, dtype=dtype, device=device)
    skip = -spare.data_ptr() % ALIGNMENT_BYTES
    if skip % size:
        raise ClientUpdateError(f"the allocator returned a buffer {spare.data_ptr() % size} bytes"
                                f" off a multiple of its {size}-byte elements: no"
                                f" {ALIGNMENT_BYTES}-byte boundary can be reached in it; use"
                                " torch's default CPU or CUDA allocator")
    start = skip // size
    return spare[start: start + t.numel()].view(t.shape)


@torch.no_grad()
def evaluate(flat: FlatModel, row: Tensor, x: Tensor, y: Tensor, batch_size: int = 4096) -> Evaluation:
    """Loss, accuracy and metric (``flat.task``) of the parameters ``row`` on ``(x, y)``;
    does not change ``row``. Computed on :func:`aligned` copies of a row or inputs stored off
    the alignment, so the result depends on the values only, not on where they are stored."""
    return _evaluate(flat, row, x, y, batch_size, scored=True)


@torch.no_grad()
def evaluate_loss(flat: FlatModel, row: Tensor, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """``evaluate(flat, row, x, y).loss`` bit for bit, without the task's metric: for choices
    made on the loss alone (IFCA's cluster), where a split the metric cannot score (one class
    under AUC) is no error."""
    return _evaluate(flat, row, x, y, batch_size, scored=False).loss


def _evaluate(flat: FlatModel, row: Tensor, x: Tensor, y: Tensor, batch_size: int,
              scored: bool) -> Evaluation:
    if x.shape[0] == 0:
        raise ClientUpdateError("cannot evaluate on an empty split")
    task = flat.task
    model = flat.bind(aligned(row))
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0.0
    outputs = []
    for start in range(0, x.shape[0], batch_size):
        logits = model(aligned(x[start : start + batch_size]))
        target = y[start : start + batch_size]
        total_loss += task.sum_loss(logits, target).item()
        correct += task.correct(logits, target)
        if scored and task.metric_name != "accuracy":
            outputs.append(logits)
    model.train(was_training)
    accuracy = correct / x.shape[0]
    metric = task.metric(torch.cat(outputs), y) if outputs else accuracy
    return Evaluation(loss=total_loss / x.shape[0], accuracy=accuracy, metric=metric)


class GradientOracle(Protocol):
    """How a client turns its data into gradient steps (plain SGD or DP-SGD).

    ``batches`` yields the index sets of one local training run; ``gradient`` writes the
    step's gradient into the bound model's ``.grad`` views (which alias the flat grad buffer).
    """

    def batches(self, n: int, epochs: int, generator: torch.Generator) -> Iterator[Tensor]:
        """The index tensors of one local run's batches over ``n`` rows for ``epochs`` epochs, drawn
        from ``generator``."""

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        """Write the batch's gradient (DP-SGD: clipped per sample and noised) into ``grad``, the
        flat buffer the model's ``.grad`` views alias."""


def same_row(held: Tensor | None, row: Tensor) -> bool:
    """Whether ``held`` is a view of exactly the memory of ``row`` (same start, shape and
    strides): distinct views of one matrix row are the same row."""
    return (held is not None and held.data_ptr() == row.data_ptr() and held.shape == row.shape
            and held.stride() == row.stride())


def retarget(oracle: GradientOracle, old: Tensor, new: Tensor) -> None:
    """Tell ``oracle`` that the row it trains is now ``new`` instead of ``old``.

    An oracle that keeps a reference to the trained row (FedProx's proximal term, APFL's
    mixture) must define ``retarget(old, new)`` and replace every held view of ``old``
    (:func:`same_row`) by ``new``; wrappers pass the call on. :func:`local_train` calls it when
    it trains an aligned copy of a row, and again, with the arguments swapped, afterwards;
    an oracle (or one it wraps as ``inner``) still holding a view of ``old`` then is refused
    with a :class:`ClientUpdateError` before any step."""
    hook = getattr(oracle, "retarget", None)
    if hook is not None:
        hook(old, new)


def _still_held(oracle: object, row: Tensor) -> str | None:
    """The first attribute of ``oracle`` or of an oracle it wraps (``inner``) that is still
    a view of ``row`` after :func:`retarget`, as ``"Class.name"``; else None."""
    seen: set[int] = set()
    while oracle is not None and id(oracle) not in seen and hasattr(oracle, "__dict__"):
        seen.add(id(oracle))
        for name, value in vars(oracle).items():
            if isinstance(value, Tensor) and same_row(value, row):
                return f"{type(oracle).__name__}.{name}"
        oracle = vars(oracle).get("inner")
    return None


class PlainGradient:
    """Non-private gradients: shuffled mini-batches, the task's mean loss (cross-entropy by
    default), one backward pass.

    With ``max_grad_norm`` set, the batch gradient is rescaled to L2 norm at most
    ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_`` semantics over all parameters). This
    is a stability knob for non-private training, not a privacy mechanism.
    """

    def __init__(self, batch_size: int, max_grad_norm: float | None = None,
                 task: Task | None = None) -> None:
        if batch_size < 1:
            raise ClientUpdateError(f"batch_size must be positive; got {batch_size}")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ClientUpdateError(f"max_grad_norm must be positive and finite; got {max_grad_norm}")
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm
        self.task = task if task is not None else CROSS_ENTROPY

    def batches(self, n: int, epochs: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Each epoch, a fresh permutation cut into batches (the last one may be smaller)."""
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            yield from order.split(self.batch_size)

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        """Write the mean-loss gradient of the batch into ``grad`` (clipped if configured)."""
        grad.zero_()
        self.task.mean_loss(model(x), y).backward()
        if self.max_grad_norm is not None:
            norm = float(grad.norm())
            if norm > self.max_grad_norm:
                grad.mul_(self.max_grad_norm / norm)


class MomentumSGD:
    """SGD with momentum and weight decay on one flat vector, matching ``torch.optim.SGD``.

    ``g = grad + wd * theta``; ``buf = g`` on the first step, else ``buf = m * buf + g``;
    ``theta -= lr * buf``. The momentum buffer is reset at the start of each local run, as a
    freshly created ``torch.optim.SGD`` would be.
    """

    def __init__(self, num_params: int, device: torch.device | str = "cpu") -> None:
        self.buffer = torch.zeros(num_params, device=device)
        self.fresh = True

    def reset(self) -> None:
        """Forget the momentum buffer: the next step starts it afresh, as a new
        ``torch.optim.SGD``."""
        self.fresh = True

    def step(self, theta: Tensor, grad: Tensor, cfg: TrainConfig) -> None:
        """One SGD step on ``theta`` in place: weight decay added to ``grad`` (in place), then
        momentum, as ``torch.optim.SGD``."""
        if cfg.weight_decay:
            grad.add_(theta, alpha=cfg.weight_decay)
        if cfg.momentum:
            if self.fresh:
                self.buffer.copy_(grad)
                self.fresh = False
            else:
                self.buffer.mul_(cfg.momentum).add_(grad)
            theta.add_(self.buffer, alpha=-cfg.lr)
        else:
            theta.add_(grad, alpha=-cfg.lr)


@dataclass
class Workspace:
    """Per-process scratch buffers reused by every client update (never reallocated per step)."""

    grad: Tensor
    before: Tensor
    optimizer: MomentumSGD
    row: Tensor | None = None
    """Where :func:`local_train` trains a row stored off the alignment (allocated on first use)."""

    def aligned_row(self, like: Tensor) -> Tensor:
        """A buffer of ``like``'s shape, dtype and device starting on an
        :data:`ALIGNMENT_BYTES` boundary (its values are whatever it held)."""
        row = self.row
        if row is None or row.shape != like.shape or row.dtype != like.dtype or row.device != like.device:
            row = self.row = aligned_empty(like.shape, like.dtype, like.device)
        return row

    @classmethod
    def for_size(cls, num_params: int, device: torch.device | str = "cpu") -> Workspace:
        """Zeroed buffers for a model of ``num_params`` parameters on ``device``."""
        return cls(torch.zeros(num_params, device=device), torch.zeros(num_params, device=device),
                   MomentumSGD(num_params, device))


def _run_seed(generator: torch.Generator) -> int:
    """A 63-bit seed fixed by ``generator``'s state (without drawing from it)."""
    digest = hashlib.sha256(generator.get_state().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextmanager
def client_randomness(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Inside: torch's global generator on ``device`` (where random layers such as dropout
    draw) is seeded from the client's batch generator as it stands at the start of the local
    run; afterwards it is restored. So a stochastic model's masks depend only on the client's
    own stream (checkpointed, and the same in both runtimes), not on which clients or methods
    ran before, and a resumed run repeats them; models that draw nothing are unaffected."""
    if device.type == "cpu":
        default = torch.default_generator
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        default = torch.cuda.default_generators[index]
    else:
        raise ClientUpdateError(f"no per-client random stream for device type {device.type!r}")
    saved = default.get_state()
    default.manual_seed(_run_seed(generator))
    try:
        yield
    finally:
        default.set_state(saved)


def local_train(
    flat: FlatModel,
    theta: Tensor,
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    oracle: GradientOracle,
    generator: torch.Generator,
    workspace: Workspace,
    phi: Tensor | None = None,
    lam: float = 0.0,
    client: int | None = None,
) -> int:
    """Train ``theta`` in place for ``cfg.local_epochs`` epochs; returns the number of steps.
    ``client`` (its index, when known) only names it in errors.

    After every optimizer step, when ``lam > 0``, the proximal pull
    ``theta <- theta - lr * lam * (theta_before_step - phi)`` is applied (docs/design.md section 2, a round, step 2).
    Raises :class:`ClientUpdateError` if training produced non-finite parameters; ``theta`` is
    then restored to its value before the run, so nothing is lost.

    The result depends on ``theta``'s values only, not on where it is stored: a row off an
    :data:`ALIGNMENT_BYTES` boundary (a row of the in-process N x P matrix) is trained as an
    aligned copy in ``workspace`` (the oracle :func:`retarget`-ed to it) and written back, so it
    gets the bits a Flower node's own tensor gets (one-sample batches round by address).
    """
    if lam < 0 or (lam > 0 and phi is None):
        raise ClientUpdateError(f"invalid regularization: lam={lam}, phi given: {phi is not None}")
    who = "" if client is None else f"client {client}: "
    if pull_weight_overflows(cfg, lam, theta.dtype):
        # the pull's weight itself overflows theta's dtype: every step would make theta
        # non-finite (as the batched engine finds), so say so before touching it
        raise ClientUpdateError(f"{who}local training would produce non-finite parameters (the pull's"
                                f" weight overflows {theta.dtype}); update discarded"
                                f" ({failure_hint(flat, theta, x, y, cfg, lam)})")
    if theta.data_ptr() % ALIGNMENT_BYTES:
        trained = workspace.aligned_row(theta).copy_(theta)
        retarget(oracle, theta, trained)
        held = _still_held(oracle, theta)
        if held is not None:
            retarget(oracle, trained, theta)
            raise ClientUpdateError(
                f"{who}the gradient oracle holds the trained row ({held}) but cannot follow it"
                " to the aligned copy local_train trains: give the oracle a retarget(old, new)"
                " method that replaces its views of old by new (see client.retarget)")
        try:
            steps = _train_steps(flat, trained, x, y, cfg, oracle, generator, workspace, phi, lam)
        finally:
            retarget(oracle, trained, theta)
            flat.bind(theta, workspace.grad)  # as after training in place
        finite = all_finite(trained)
        if finite:
            theta.copy_(trained)
    else:
        start = theta.clone()
        steps = _train_steps(flat, theta, x, y, cfg, oracle, generator, workspace, phi, lam)
        finite = all_finite(theta)
        if not finite:
            theta.copy_(start)
    if not finite:
        hint = failure_hint(flat, theta, x, y, cfg, lam)
        raise ClientUpdateError(f"{who}local training produced non-finite parameters; update discarded"
                                f" ({hint})")
    return steps


def _train_steps(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor, cfg: TrainConfig,
                 oracle: GradientOracle, generator: torch.Generator, workspace: Workspace,
                 phi: Tensor | None, lam: float) -> int:
    """:func:`local_train`'s loop on ``theta`` in place; returns the number of steps."""
    model = flat.bind(theta, workspace.grad)
    model.train()
    workspace.optimizer.reset()
    steps = 0
    with client_randomness(generator, theta.device):
        for index in oracle.batches(x.shape[0], cfg.local_epochs, generator):
            oracle.gradient(model, x[index], y[index], workspace.grad)
            if lam > 0:
                # proximal_pull_'s (theta_before - phi), taken before the step: the same values
                # bit for bit, without a copy of theta and a temporary per step.
                torch.sub(theta, phi, out=workspace.before)  # type: ignore[arg-type]
            workspace.optimizer.step(theta, workspace.grad, cfg)
            if lam > 0:
                theta.add_(workspace.before, alpha=-cfg.lr * lam)
            steps += 1
    return steps
