"""DP-SGD's gradient oracle: per-sample clipping and Gaussian noise inside local training.

:class:`DPGradient` is a :class:`~secure_fedora.learning.client.GradientOracle` (what local
training asks for each step's gradient); it belongs to learning, not to the secure layer:
it computes a DP-SGD step, while budgets, gates, ledgers and journals (what makes the step
count an accounted release) are :mod:`secure_fedora.secure.private`'s, which re-exports these
names for existing code. :func:`check_per_sample_gradients` refuses, before training, a model
whose per-sample gradients the DP path cannot compute exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from privacy.dpsgd import DPSGD, DPSGDError, poisson_sample, rescaled_gradient
from privacy.ledger import is_finite_number
from privacy.noise import NoiseSource, is_noise_source
from secure_fedora.learning.tasks import Task

__all__ = ["DPGradient", "check_per_sample_gradients", "check_rows_independent",
           "expected_batch_size", "largest_poisson_batch"]


class DPGradient:
    """A :class:`~secure_fedora.learning.client.GradientOracle` running DP-SGD for the selected client.

    One :class:`privacy.dpsgd.DPSGD` serves every client (the model's parameters are views of
    the selected client's row); :meth:`select` sets the client's noise multiplier and noise
    source. Batches are Poisson samples at rate ``q`` (``ceil(epochs / q)`` of them per local
    run), drawn from the selected client's noise source, which also draws the noise: sampling
    is part of the mechanism, so it never uses the (non-private) training-order generator.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float, sample_rate: float,
                 expected_batch_size: float, noise: NoiseSource,
                 task: Task | None = None) -> None:
        self.sample_rate = sample_rate
        #: the divisor until a local run sets its client's ``q * n`` (and for a client without records)
        self.empty_batch_size = float(expected_batch_size)
        self.dpsgd = DPSGD(module, max_grad_norm, 1.0, expected_batch_size, noise)
        # Per-sample losses (reduction="none"): DP-SGD clips each sample's gradient of
        # whichever loss the task uses.
        self._loss = task.checked if task is not None else nn.CrossEntropyLoss(reduction="none")
        #: Called after every executed DP-SGD step (the step counter's hook); set by
        #: ``secure_fedora.secure.private.FederationPrivacy.select_client`` to count the selected client's steps.
        self.on_step: Callable[[], None] | None = None
        self.steps_executed = 0

    @property
    def max_grad_norm(self) -> float:
        """The per-sample clip norm C."""
        return self.dpsgd.max_grad_norm

    def select(self, noise_multiplier: float, noise: NoiseSource) -> None:
        """Use this client's noise multiplier and noise source from now on. DPSGDError (and
        nothing changed) unless the multiplier is a finite number > 0 and ``noise`` a noise
        source, as :class:`~privacy.dpsgd.DPSGD` requires of its own."""
        if not is_finite_number(noise_multiplier) or noise_multiplier <= 0:
            raise DPSGDError(f"noise_multiplier must be a finite number > 0, got "
                             f"{noise_multiplier!r} (without noise DP-SGD is not private)")
        if not is_noise_source(noise):
            raise DPSGDError(f"noise must be a privacy.noise.NoiseSource, got {type(noise).__name__}")
        self.dpsgd.noise_multiplier = float(noise_multiplier)
        self.dpsgd.noise = noise

    def batches(self, n: int, epochs: int, generator: torch.Generator, *,
                divisor_records: int | None = None) -> Iterator[Tensor]:
        """``ceil(epochs / q)`` Poisson samples of ``range(n)`` (the count the gate accounted in
        advance), drawn from the selected noise source (``generator`` is not used: see the class
        doc). The steps of this local run divide their clipped, noised sums by ``q * n``, this
        client's expected batch size, so every client's step is a mean gradient whatever its
        size (``n`` is public, as for the summary; the division is post-processing).
        ``divisor_records`` replaces ``n`` in the divisor only (an audit that samples canaries
        beside the client's ``n`` records keeps the client's own divisor)."""
        records = n if divisor_records is None else divisor_records
        self.dpsgd.expected_batch_size = expected_batch_size(self.sample_rate, records,
                                                             self.empty_batch_size)
        for _ in range(math.ceil(epochs / self.sample_rate - 1e-9)):
            yield poisson_sample(n, self.sample_rate, self.dpsgd.noise)

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor, *,
                 extra_gradients: Tensor | None = None) -> None:
        """One DP-SGD step's gradient (counted by the step hook); ``extra_gradients``: see
        ``DPSGD.private_gradient`` (audits)."""
        self.dpsgd.private_gradient(x, y, self._loss, extra_gradients=extra_gradients)
        self.steps_executed += 1
        if self.on_step is not None:
            self.on_step()

    def check_model(self, x: Tensor, y: Tensor) -> None:
        """Verify, before training, that the DP path computes this model's per-sample
        gradients exactly: the clipped sum over ``(x, y)`` (a few training rows) must equal
        the sum of individually computed, clipped gradients. A model neither path supports
        raises :class:`privacy.dpsgd.DPSGDError` naming its first unsupported layer."""
        check_per_sample_gradients(self.dpsgd, self._loss, x, y)



def expected_batch_size(sample_rate: float, num_samples: int, empty: float) -> float:
    """``q * n``: the expected size of a Poisson sample of ``n`` records at rate ``q``, the
    divisor of a DP-SGD step on those records (both engines use this). A client without
    records (runs refuse one under DP; the engines accept it) has only noise to divide:
    by ``empty``, the oracle's configured expected batch."""
    return sample_rate * num_samples if num_samples > 0 else empty


#: A Poisson batch larger than :func:`largest_poisson_batch` has probability below this per step.
POISSON_TAIL = 1e-12


def largest_poisson_batch(sample_rate: float, num_samples: int) -> int:
    """The largest Poisson batch of ``num_samples`` records at rate ``q`` worth probing: the
    smallest ``b`` (at most ``num_samples``) with ``P(batch > b) < 1e-12`` by the Chernoff
    bound ``P(X >= (1 + d) mu) <= exp(-d^2 mu / (2 + d))``, ``mu = q n``."""
    mu = sample_rate * num_samples
    if num_samples <= 0 or mu <= 0:
        return max(num_samples, 0)
    log_tail = -math.log(POISSON_TAIL)
    d = (log_tail + math.sqrt(log_tail ** 2 + 8 * mu * log_tail)) / (2 * mu)
    return min(num_samples, math.ceil((1 + d) * mu))


@torch.no_grad()
def check_rows_independent(model: nn.Module, x: Tensor, *, training: bool, rows: str,
                           loss: Any = None, y: Tensor | None = None) -> None:
    """Refuse (DPSGDError) a model whose output for a row of ``x`` (a batch of real rows, as
    large as the batches it runs on under DP) changes when the batch's other rows are replaced:
    per-sample clipping, and the clipped validation losses of a private lambda, bound one
    record's effect only if no other row's output depends on it (BatchNorm, a layer that
    subtracts the batch mean). Two forwards besides ``x``'s own: the second half replaced by
    copies of the first row, the first half by copies of the last; then the first half as a
    batch of its own (a model depending on the batch's size is refused). Runs in train mode
    (``training``: dropout in eval mode, as the gradient check) or eval mode; random draws come
    from a seeded fork of torch's generator, so nothing is drawn from the run's streams.
    ``rows`` names the rows in the message. With ``loss`` (and ``y``, the rows' targets) the
    per-sample losses of those outputs are then compared with each row's loss scored alone
    (no backward pass): a loss using batch statistics is refused as such. A batch size never probed is not
    covered."""
    from privacy.dpsgd import DPSGDError

    n = int(x.shape[0])
    if n < 2:
        return
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    half = n // 2
    devices = [x.device.index or 0] if x.device.type == "cuda" else []

    def forward(batch: Tensor, seed: int = 0) -> Tensor:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            try:
                return model(batch)
            except Exception as err:  # the user's model code: report whatever it raised
                from secure_fedora.core.plugins import raised_at
                from secure_fedora.learning.models import ModelError

                raise ModelError(
                    f"the model fails on a batch of {int(batch.shape[0])} {rows} rows (DP's "
                    f"check that it treats every row alone): {type(err).__name__}: {err}"
                    f"{raised_at(err)}") from err

    try:
        out = forward(x)
        for kept, batch in ((slice(0, half), torch.cat([x[:half], x[:1].expand(n - half, *x.shape[1:])])),
                            (slice(half, n), torch.cat([x[-1:].expand(half, *x.shape[1:]), x[half:]]))):
            got, want = forward(batch)[kept], out[kept]
            scale = float(want.abs().max()) if want.numel() else 0.0
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
                raise DPSGDError(
                    f"the model's outputs for rows of a batch of {n} {rows} rows change when the "
                    f"batch's other rows are replaced (max difference "
                    f"{float((got - want).abs().max()):.3g}): DP needs a model that treats every "
                    "row alone (per-sample clipping bounds one record's effect only then); layers "
                    "that mix the rows of a batch (BatchNorm, subtracting the batch mean) are "
                    "not supported under DP")
        # the same rows in a batch of another size: a model scaling by x.shape[0] passes the
        # replacements (same size), but under DP one record added to a Poisson batch would then
        # move every other row's output, and so its clipped gradient
        # (a model drawing random numbers draws others for another batch size from the same
        # seed: it is judged only when its outputs do not depend on the seed; 1e-2 relative,
        # as kernels chosen per batch size round differently, e.g. TF32 convolutions on CUDA)
        got, want = forward(x[:half]), out[:half]
        scale = float(want.abs().max()) if want.numel() else 0.0
        if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * max(1.0, scale)) \
                and torch.equal(forward(x[:half], seed=1), got):
            raise DPSGDError(
                f"the model's outputs for {half} {rows} rows differ between a batch of {n} rows "
                f"and a batch of those {half} alone (max difference "
                f"{float((got - want).abs().max()):.3g}): they depend on the batch's size (e.g. a "
                "division by x.shape[0]); DP needs a model that treats every row alone (one "
                "record added to a batch must not move the other rows' outputs)")
        if loss is not None and y is not None:
            _refuse_a_loss_mixing_outputs(out, loss, y)
    finally:
        for m, mode in modes.items():
            m.train(mode)


_NO_LAYER = "(no single layer identified)"


def _first_unsupported_layer(model: nn.Module) -> str:
    """The first layer with trainable parameters that is neither nn.Linear (fused path) nor
    a layer Opacus has a per-sample gradient rule for, as "'name' (Type)"."""
    from opacus import GradSampleModule

    fallback = None
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if type(module) not in GradSampleModule.GRAD_SAMPLERS:
            return f"{name or '(root)'!r} ({type(module).__name__})"
        if fallback is None and type(module) is not nn.Linear:
            fallback = f"{name or '(root)'!r} ({type(module).__name__})"
    return fallback or _NO_LAYER


def _recurrent_advice(model: nn.Module) -> str:
    """For a model holding torch's nn.RNN, nn.GRU or nn.LSTM, which Opacus computes no
    per-sample gradients for: the drop-in layer of ``opacus.layers`` that it does."""
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if type(m) in (nn.RNN, nn.GRU, nn.LSTM)})
    if not kinds:
        return ""
    return "; " + ", ".join(f"for nn.{kind} use Opacus's drop-in opacus.layers.DP{kind}"
                            for kind in kinds) + " (same arguments)"


@torch.no_grad()
def _refuse_a_loss_mixing_rows(model: nn.Module, loss: Any, x: Tensor, y: Tensor) -> None:
    """DPSGDError when ``loss``'s per-sample values on the model's outputs for ``x`` change
    when each row is scored alone (a loss using batch statistics): then the loss, not a
    layer, is why per-sample gradients differ."""
    _refuse_a_loss_mixing_outputs(model(x), loss, y)


@torch.no_grad()
def _refuse_a_loss_mixing_outputs(out: Tensor, loss: Any, y: Tensor) -> None:
    """DPSGDError when ``loss``'s per-sample values on the outputs ``out`` (targets ``y``)
    change when each row is scored alone."""
    from privacy.dpsgd import DPSGDError

    n = int(out.shape[0])
    together = loss(out, y).reshape(-1)
    alone = torch.cat([loss(out[i:i + 1], y[i:i + 1]).reshape(-1) for i in range(n)])
    if together.shape == alone.shape and not torch.allclose(together, alone, rtol=1e-4, atol=1e-6):
        raise DPSGDError(
            f"the loss's value for a row changes with the other rows of its batch (on {n}"
            f" probe rows, max difference {float((together - alone).abs().max()):.3g}): DP-SGD "
            "needs per-sample losses that each depend on their own row only (per-sample "
            "clipping bounds one record's effect only then); compute the loss without batch "
            "statistics (e.g. reduction='none', no batch mean or normalization)")


_TOO_LARGE = (": the inputs or the model's initial parameters are too large for float32 "
              "arithmetic; scale the inputs (e.g. standardize them in the data source) or the "
              "model's initialization")


def check_per_sample_gradients(dpsgd: DPSGD, loss: Any, x: Tensor, y: Tensor) -> None:
    """Refuse (DPSGDError naming the layer) a model whose per-sample gradients the DP path
    cannot compute, or computes differently from per-sample autograd; gradients that are not
    finite because the numbers overflow the parameters' float range are refused as such,
    naming no layer (a finite gradient whose squared norm overflows is clipped exactly and
    passes). Dropout layers run in
    eval mode during the check (random masks would make the two computations differ); nothing
    is changed: no noise is drawn, no gradient is written, no step is counted."""
    from privacy.dpsgd import DPSGDError

    model = dpsgd.model
    modes = {m: m.training for m in model.modules()}
    model.train()  # Opacus captures activations in train mode only
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    params = dpsgd._params
    try:
        try:
            with warnings.catch_warnings():
                # Opacus's hooks fire on module outputs when the input needs no gradient.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                got = dpsgd.clipped_gradient_sum(x, y, loss)
        except DPSGDError:
            raise
        except Exception as err:  # what the per-sample machinery raised on this model
            raise DPSGDError(
                f"DP-SGD cannot compute per-sample gradients for this model (path "
                f"{dpsgd.mode!r}): layer {_first_unsupported_layer(model)} is supported neither "
                f"by the fused path (nn.Linear only) nor by Opacus ({type(err).__name__}: {err})"
                f"{_recurrent_advice(model)}"
            ) from err
        expected = [torch.zeros_like(p) for p in params]
        largest = 0.0
        for i in range(int(x.shape[0])):
            def row_gradient(scale: float | None = None, i: int = i) -> list[Tensor]:
                with torch.enable_grad(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    total = loss(model(x[i:i + 1]), y[i:i + 1]).sum()
                    grads = torch.autograd.grad(total if scale is None else total * scale,
                                                params, allow_unused=True)
                return [g if g is not None else torch.zeros_like(p)
                        for g, p in zip(grads, params, strict=True)]

            grads, scale = row_gradient(), 1.0
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
            if not math.isfinite(norm):  # an entry overflows: DP-SGD scales the loss
                grads, scale = rescaled_gradient(row_gradient) or (grads, 1.0)
                norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) / scale
            if not math.isfinite(norm):  # no layer is at fault: the numbers overflow
                raise DPSGDError(f"the loss's gradient on probe row {i} of the training data is "
                                 f"not finite (its norm is {norm}) before training{_TOO_LARGE}")
            largest = max(largest, norm)
            factor = min(1.0, dpsgd.max_grad_norm / (norm + 1e-6)) / scale
            for e, g in zip(expected, grads, strict=True):
                e.add_(g, alpha=factor)
        for (pname, _), a, b in zip(((dpsgd._param_names[id(p)], p) for p in params), got, expected,
                                    strict=True):
            if not bool(torch.isfinite(a).all()) and \
                    largest > math.sqrt(torch.finfo(a.dtype).max):  # a squared norm overflows
                raise DPSGDError(
                    f"DP-SGD's clipped per-sample gradients of parameter {pname!r} are not "
                    f"finite (path {dpsgd.mode!r}; the probe rows' largest per-sample gradient "
                    f"norm is {largest:.3g}) before training{_TOO_LARGE}")
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-5):
                _refuse_a_loss_mixing_rows(model, loss, x, y)
                layer = _first_unsupported_layer(model)
                cause = f"layer {layer} is not supported" if layer != _NO_LAYER else (
                    "every layer holding parameters is supported, so a parameter is used "
                    "outside its layer's call (e.g. `x @ layer.weight.T`, a weight tied by "
                    "hand), where per-sample hooks do not see it: use each parameter only "
                    "through its module (call the layer itself, or share the module)")
                raise DPSGDError(
                    f"DP-SGD's per-sample gradients of parameter {pname!r} differ from per-sample "
                    f"autograd (path {dpsgd.mode!r}; max difference "
                    f"{float((a - b).abs().max()):.3g}); {cause}"
                )
    finally:
        for p in params:  # what Opacus's hooks stored during the autograd reference pass
            if getattr(p, "grad_sample", None) is not None:
                p.grad_sample = None
        for m, training in modes.items():
            m.train(training)
