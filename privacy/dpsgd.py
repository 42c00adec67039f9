"""DP-SGD gradients: Poisson sampling, exact per-sample clipping, Gaussian noise.

Two exact ways to clip per-sample gradients, with the same privacy guarantee:

- ``"fused"`` (models whose trainable parameters all live in ``nn.Linear`` layers): one
  forward pass with the inputs ``A`` of every Linear captured, one backward pass
  (``torch.autograd.grad`` of the summed loss w.r.t. the Linear *outputs*, giving ``G``),
  per-sample squared gradient norms from ``||a_i||^2 ||g_i||^2 + ||g_i||^2`` (the weight
  gradient of sample i is the outer product ``g_i a_i^T``), then one matmul per layer for the
  clipped sum ``(c * G)^T A``. No per-sample gradient is materialized.
- ``"opacus"`` (any model Opacus's hook-based ``GradSampleModule`` supports, e.g. Conv2d,
  LayerNorm, GroupNorm, Embedding): exact per-sample gradients, then the same clipping and
  noise. Slower; chosen automatically (with a log line) when the fused path does not apply.

Both clip a per-sample gradient to C whose squared norm, or one of whose entries (a weight
gradient ``g_k a_j`` of finite ``g`` and ``a``), overflows the float range: the fused path
from its factors (:func:`fused_clip_factors`), Opacus's by recomputing that sample with its
loss scaled by a power of two (:func:`clip_overflowing_rows`).

Fused-path caveat: a Linear's parameters must be used only through that module's forward
(a weight also used directly elsewhere, e.g. ``x @ fc.weight.T``, would contribute gradient
the hooks do not see: the written gradient is then still clipped and noised — privacy holds
— but it misses that contribution). Use ``mode="opacus"`` for such models.

Privacy: each call of :meth:`DPSGD.private_gradient` on a Poisson sample (each record
included independently with probability ``sample_rate``) is one step of the
Poisson-subsampled Gaussian mechanism with noise multiplier ``noise_multiplier``, accounted
as ``(noise_multiplier, sample_rate, 1)`` under add/remove-one-record. This holds under the
standard assumption that the model treats samples of a batch independently (no BatchNorm
or other cross-sample operation; BatchNorm is rejected, custom cross-sample code is not
detectable). Noise and sampling come from a :class:`privacy.noise.NoiseSource`: a CSPRNG
(:class:`~privacy.noise.CsprngNoise`, floating-point hardened Gaussians) for a real guarantee,
or :class:`~privacy.noise.ReproducibleNoise`, which is not private against anyone who knows
its seed.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from privacy.accounting import MechanismRecord
from privacy.errors import ToolkitError
from privacy.mechanisms import combine_scaled_norms, largest_entries, overflow_safe_row_norms
from privacy.noise import CsprngNoise, NoiseSource, is_noise_source

logger = logging.getLogger(__name__)

#: Added to per-sample norms before dividing, as Opacus does, so a clipped norm is < C.
_NORM_EPS = 1e-6

LossFn = Callable[[Tensor, Tensor], Tensor]

#: The reasons for the Opacus fallback already logged in this process: a run builds one DPSGD
#: per check and per method (a Flower node one per message), so the notice is said once per
#: reason, not once per build.
_FALLBACKS_SAID: set[str] = set()
_FALLBACKS_LOCK = threading.Lock()


def _first_time_said(reason: str) -> bool:
    """Whether ``reason`` is new to this process (and record it)."""
    with _FALLBACKS_LOCK:
        new = reason not in _FALLBACKS_SAID
        _FALLBACKS_SAID.add(reason)
        return new


class DPSGDError(ToolkitError, ValueError):
    """Bad configuration or input for DP-SGD; the message names what is wrong."""


def poisson_sample(n: int, sample_rate: float, noise: NoiseSource) -> Tensor:
    """Indices (int64, ascending) of a Poisson sample: each of ``range(n)`` kept w.p. ``sample_rate``.

    The inclusions are ``noise.bernoulli(n, sample_rate)``; the sample can be empty; its size
    is Binomial(n, sample_rate).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DPSGDError(f"n must be an int >= 0, got {n!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float) \
            or not (0 < sample_rate <= 1):
        raise DPSGDError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    _check_noise(noise)
    return noise.bernoulli(n, float(sample_rate)).nonzero().squeeze(1)


def _check_noise(noise: object) -> NoiseSource:
    if not is_noise_source(noise):
        raise DPSGDError(f"noise must be a privacy.noise.NoiseSource (CsprngNoise or"
                         f" ReproducibleNoise), got {type(noise).__name__}")
    return noise


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm | nn.SyncBatchNorm)


def clip_factors(sq_norms: Tensor, max_norm: float | Tensor,
                 exact_norms: Callable[[tuple[Tensor, ...]], Tensor]) -> Tensor:
    """Per-sample clip factors ``min(1, C / (||g|| + 1e-6))`` from squared norms ``sq_norms``.

    Where a squared norm is finite the factor is exactly ``(C / (sqrt(sq) + 1e-6)).clamp(max=1)``
    in ``sq_norms``'s dtype. Where it is not (a sum of squares beyond the float range, or the
    fused path's ``||a||^2 ||g||^2`` giving ``inf * 0``), ``exact_norms(where)`` (``where``: those
    samples' ``nonzero(as_tuple=True)`` index) gives their norms in float64, computed without
    overflow, and the factor comes from them: a gradient with finite entries is clipped to
    norm C, not dropped. A gradient with an infinite or NaN entry keeps a factor of 0 or NaN,
    so its clipped gradient is not finite, as before. ``max_norm``: a float, or a tensor
    broadcasting to ``sq_norms`` (a bound per row). When every squared norm is finite this
    costs one ``isfinite().all()`` check.
    """
    factors, _ = _factors_and_exact(sq_norms, max_norm, exact_norms)
    return factors


def _factors_and_exact(sq_norms: Tensor, max_norm: float | Tensor,
                       exact_norms: Callable[[tuple[Tensor, ...]], Tensor]
                       ) -> tuple[Tensor, tuple[tuple[Tensor, ...], Tensor] | None]:
    """:func:`clip_factors`, and the float64 factors of the non-finite squared norms with
    their index (None where every squared norm is finite)."""
    factors = (max_norm / (sq_norms.sqrt() + _NORM_EPS)).clamp(max=1.0)
    finite = torch.isfinite(sq_norms)
    if bool(finite.all()):
        return factors, None
    where = (~finite).nonzero(as_tuple=True)
    bound = torch.as_tensor(max_norm, dtype=torch.float64, device=sq_norms.device)
    bound = bound.expand(sq_norms.shape)[where]
    exact = (bound / (exact_norms(where).to(torch.float64) + _NORM_EPS)).clamp(max=1.0)
    return factors.index_put(where, exact.to(factors.dtype)), (where, exact)


def fused_clip_factors(sq_norms: Tensor, max_norm: float | Tensor,
                       exact_norms: Callable[[tuple[Tensor, ...]], Tensor]
                       ) -> tuple[Tensor, tuple[tuple[Tensor, ...], Tensor] | None]:
    """:func:`clip_factors` for the fused paths, which scale each sample's backpropagated
    values ``G`` by its factor: where the float64 factor is positive but below the smallest
    normal number of ``sq_norms``'s dtype (a gradient norm beyond ``C / tiny``, e.g. a weight
    gradient entry ``g_k a_j`` that overflows), a factor in that dtype would lose its digits
    or be 0 (the sample dropped). Those samples get the factor 0 here, and ``(where,
    factor64)`` is returned for the caller to add ``factor64 * g a^T`` computed in float64
    (:func:`float64_linear_terms`). Every other factor is :func:`clip_factors`'s, the same bits.
    """
    factors, exact = _factors_and_exact(sq_norms, max_norm, exact_norms)
    if exact is None:
        return factors, None
    where, f64 = exact
    tiny = (f64 > 0) & (f64 < torch.finfo(factors.dtype).tiny)
    if not bool(tiny.any()):
        return factors, None
    where = tuple(w[tiny] for w in where)
    return factors.index_put(where, torch.zeros((), dtype=factors.dtype)), (where, f64[tiny])


def float64_linear_terms(a3: Tensor, g3: Tensor, factor: Tensor, has_weight: bool,
                         has_bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """The sum over samples of a Linear's clipped weight and bias gradients, computed in
    float64 and returned in ``a3``'s dtype: ``sum_i factor_i sum_t g_it a_it^T`` and
    ``sum_i factor_i sum_t g_it``, for ``a3`` (n, T, in), ``g3`` (n, T, out) and float64
    ``factor`` (n,) (:func:`fused_clip_factors`'s)."""
    g = g3.to(torch.float64) * factor[:, None, None]
    weight = torch.einsum("nto,nti->oi", g, a3.to(torch.float64)).to(a3.dtype) if has_weight \
        else None
    bias = g.sum(dim=(0, 1)).to(a3.dtype) if has_bias else None
    return weight, bias


#: The powers of two a sample's loss is multiplied by, mildest first, when its per-sample
#: gradient has an entry beyond the float range although every activation is finite (a weight
#: gradient ``g_k a_j``, or a backpropagated value). The backward pass is linear in the loss,
#: so the gradient comes out multiplied by exactly that power (only parts below the smallest
#: normal float after scaling are lost, far below the largest entry's rounding). 2^-128 brings
#: any one float32 product ``g_k a_j`` into range. No smaller power is tried: at 2^-160 a loss
#: gradient of at most 1 (cross-entropy's) is below float32's smallest subnormal, so the
#: gradient would come out 0, not in its direction.
LOSS_SCALES = (2.0**-32, 2.0**-64, 2.0**-96, 2.0**-128)


def rescaled_gradient(gradient: Callable[[float], list[Tensor]]
                      ) -> tuple[list[Tensor], float] | None:
    """``(gradient(s), s)`` for the first scale ``s`` of :data:`LOSS_SCALES` where every piece
    of ``gradient(s)`` (one sample's gradient, its loss multiplied by ``s``) is finite, or None:
    how a per-sample autograd reference gets a gradient whose entries overflow, as
    :func:`clip_overflowing_rows` gets it."""
    for scale in LOSS_SCALES:
        pieces = gradient(scale)
        if all(bool(torch.isfinite(g).all()) for g in pieces):
            return pieces, scale
    return None


def clip_overflowing_rows(parts: list[Tensor], sq_norms: Tensor, max_norm: float | Tensor,
                          recompute: Callable[[Tensor, float], list[Tensor]]) -> Tensor:
    """Clip in float64, in place, the per-sample gradients that a factor in their dtype cannot
    clip; return ``sq_norms`` with their squared norms set to 0 (so :func:`clip_factors` gives
    them the factor 1, leaving them as they are). Only rows whose squared norm is not finite
    are looked at; every other row, and its bits, stay as they are.

    ``parts``: the per-sample gradients as pieces, each ``(n, d_j)`` (a row of each is one
    sample's). ``sq_norms`` (n,): their squared norms. ``max_norm`` (C): a float or a tensor
    broadcasting to ``sq_norms``. ``recompute(index, scale)``: the pieces of the samples
    ``index`` (int64) with each sample's loss multiplied by ``scale``.

    - A row with an entry beyond the float range (a weight gradient ``g_k a_j`` of finite
      ``g`` and ``a``): the sample's gradient is recomputed at the first scale ``s`` of
      :data:`LOSS_SCALES` where it comes out finite, and the row becomes ``grad * min(1, C /
      (||grad|| + 1e-6))`` with ``||grad|| = ||s * grad|| / s`` (float64, without overflow):
      the sample clipped to norm C as a finite one is.
    - A row still not finite at every scale (its direction cannot be computed: an activation
      or the loss overflowed, or the model gave NaN) becomes the zero vector, the rule of
      every DP-SGD path (:func:`uncomputable_samples`): within C, and never non-finite.
    - A row with finite entries whose float64 factor is below the smallest normal number of
      its dtype (a norm beyond ``C / tiny``): the row becomes ``grad * factor`` computed in
      float64, as the fused paths add it (:func:`fused_clip_factors`).
    """
    rows = (~torch.isfinite(sq_norms)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return sq_norms
    bound = torch.as_tensor(max_norm, dtype=torch.float64, device=sq_norms.device)
    bound = bound.expand(sq_norms.shape)
    tiny = torch.finfo(sq_norms.dtype).tiny
    done = []

    def clip(index: Tensor, pieces: list[Tensor], scale: float) -> None:
        norms = overflow_safe_row_norms(pieces) / scale
        factor = (bound[index] / (norms + _NORM_EPS)).clamp(max=1.0) / scale
        for p, g in zip(parts, pieces, strict=True):
            p[index] = (g * factor[:, None]).to(p.dtype)
        done.append(index)

    entries_finite = torch.stack([torch.isfinite(p[rows]).all(dim=1) for p in parts]).all(dim=0)
    held = rows[entries_finite]
    if held.numel():
        pieces = [p[held].to(torch.float64) for p in parts]
        factor = bound[held] / (overflow_safe_row_norms(pieces) + _NORM_EPS)
        small = (factor > 0) & (factor < tiny)
        if bool(small.any()):
            clip(held[small], [g[small] for g in pieces], 1.0)
    bad = rows[~entries_finite]
    for scale in LOSS_SCALES:
        if bad.numel() == 0:
            break
        got = recompute(bad, scale)
        ok = torch.stack([torch.isfinite(g).all(dim=1) for g in got]).all(dim=0)
        if bool(ok.any()):
            clip(bad[ok], [g[ok].to(torch.float64) for g in got], scale)
        bad = bad[~ok]
    if bad.numel():
        for p in parts:
            p[bad] = 0
        done.append(bad)
    return sq_norms.index_fill(0, torch.cat(done), 0.0) if done else sq_norms


def uncomputable_samples(tensors: list[Tensor], batch: int) -> Tensor:
    """The samples (a bool mask over ``batch``) with a non-finite entry in any of ``tensors``
    (each ``(batch, ...)``: a sample's activations and backpropagated values). DP-SGD's rule,
    the same in every path: such a sample's gradient is first recomputed with its loss scaled
    (:data:`LOSS_SCALES`); one still not finite has no computable direction and contributes
    the zero vector (within the clip norm C), so no non-finite value reaches the noised sum."""
    bad = torch.zeros(batch, dtype=torch.bool, device=tensors[0].device if tensors else None)
    for t in tensors:
        bad |= ~torch.isfinite(t.reshape(batch, -1)).all(dim=1)
    return bad


def overflow_safe_linear_norms(layers: list[tuple[Tensor, Tensor, bool, bool]]) -> Tensor:
    """Float64 per-sample gradient norms of Linear layers from their inputs and output gradients,
    without overflow: ``layers`` holds ``(A, G, has_weight, has_bias)`` per layer, ``A`` (n, T,
    in) and ``G`` (n, T, out) over the T positions of each of n samples; the weight gradient is
    ``sum_t g_t a_t^T``, the bias gradient ``sum_t g_t``. ``A`` and ``G`` are scaled by their
    per-sample largest entry before any product. Both DP-SGD engines use it, so they derive the
    same factor from the same gradient."""
    scales, norms = [], []
    for a3, g3, has_weight, has_bias in layers:
        a, g = a3.to(torch.float64), g3.to(torch.float64)
        top_a, top_g = largest_entries(a, (1, 2)), largest_entries(g, (1, 2))
        a, g = a / top_a[:, None, None], g / top_g[:, None, None]
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if has_weight:
            if t == 1:
                w = a[:, 0].norm(dim=1) * g[:, 0].norm(dim=1)
            elif t * t <= d_in * d_out:
                w = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
                     ).sum(dim=(1, 2)).clamp(min=0).sqrt()
            else:
                w = torch.bmm(g.transpose(1, 2), a).flatten(1).norm(dim=1)
            scales.append(top_a * top_g)
            norms.append(w)
        if has_bias:
            scales.append(top_g)
            norms.append(g.sum(dim=1).norm(dim=1))
    return combine_scaled_norms(scales, norms)


def _row_major_2d(t: Tensor) -> bool:
    """Whether ``t`` is 2-D, not empty in its last dimension, with the strides
    ``t.reshape(t.shape[0], -1, t.shape[1]).reshape(-1, t.shape[1])`` (a view) has:
    ``(t.shape[1], 1)``."""
    return t.ndim == 2 and t.shape[1] > 0 and t.stride() == (t.shape[1], 1)


def _scale_rows(g2: Tensor, factors: Tensor) -> Tensor:
    """Multiply the rows of G (B*T, out) by the clip factor (B, 1) of their sample."""
    batch = factors.shape[0]
    if g2.shape[0] == batch:
        return g2 * factors
    return (g2.reshape(batch, -1, g2.shape[-1]) * factors[:, :, None]).reshape(g2.shape)


def _float32_gradients_finite(layers: list[tuple[_LinearCapture, Tensor, Tensor]], scale: float,
                              n: int) -> Tensor:
    """Per sample (n,): whether its weight and bias gradients formed in float32 from
    ``(cap, A, G)`` (A (n, T, in), G (n, T, out)), G multiplied by ``scale``, are finite, as
    the per-sample paths (Opacus, vmap) form them: the fused paths never form them, and use
    this only where a sample is recomputed or its factor is below float32's normal range."""
    ok = torch.ones(n, dtype=torch.bool, device=layers[0][1].device if layers else None)
    for cap, a3, g3 in layers:
        gs = g3 * scale if scale != 1.0 else g3
        if cap.weight is not None:
            ok &= torch.isfinite(torch.einsum("nto,nti->noi", gs, a3)).flatten(1).all(dim=1)
        if cap.bias is not None:
            ok &= torch.isfinite(gs.sum(dim=1)).all(dim=1)
    return ok


def _zero_samples(t2: Tensor, index: Tensor, batch: int) -> Tensor:
    """A copy of ``t2`` ((B*T, d), a sample's T rows consecutive) with the rows of the
    samples ``index`` set to 0."""
    t = t2.clone()
    t.view(batch, -1, t.shape[-1])[index] = 0
    return t


def _sparse_row_norms(k: int, rows: Tensor, values: Tensor) -> Tensor:
    """Float64 norms of the k rows of a sparse matrix (COO ``rows``, ``values``), each row scaled
    by its largest entry so a norm whose square exceeds the float range is still exact."""
    v = values.to(torch.float64)
    top = torch.zeros(k, dtype=torch.float64, device=v.device).scatter_reduce_(
        0, rows, v.abs(), reduce="amax")
    top = torch.where(top > 0, top, torch.ones_like(top))
    return top * torch.zeros_like(top).index_add_(0, rows, (v / top[rows]).pow(2)).sqrt()


class _LinearCapture:
    """Forward hook state for one nn.Linear: inputs and outputs of every call in a step."""

    __slots__ = ("module", "weight", "bias", "inputs", "outputs")

    def __init__(self, module: nn.Linear) -> None:
        self.module = module
        self.weight = module.weight if module.weight.requires_grad else None
        self.bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []


class DPSGD:
    """Writes a DP-SGD gradient into each trainable parameter's ``.grad``.

    ``private_gradient(x, y, loss_fn)`` computes, for the batch ``(x, y)`` (normally a
    Poisson sample from :meth:`sample_batch`)::

        grad = (sum_i clip_C(grad_i) + N(0, (noise_multiplier * C)^2 I)) / expected_batch_size

    with ``clip_C(g) = g * min(1, C / (||g|| + 1e-6))`` over the concatenation of all
    trainable parameters (flat clipping) — Opacus's convention. The result is written in place
    (``p.grad.copy_``-style; a new tensor is assigned only where ``p.grad`` is None), so
    parameters that are views into a larger flat tensor keep working; Parameter objects are
    never replaced. An empty batch gives noise only. The caller's optimizer then steps.

    Use as a context manager or call :meth:`close` to remove the hooks from the model.

    ``mode="auto"`` takes the fused path where it applies, else Opacus's hooks, and logs why
    (a warning of logger ``privacy.dpsgd``) the first time a reason occurs in the process.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, noise_multiplier: float,
                 expected_batch_size: float, noise: NoiseSource, *,
                 mode: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise DPSGDError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value in (("max_grad_norm", max_grad_norm),
                            ("expected_batch_size", expected_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise DPSGDError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, int | float) \
                or not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
            raise DPSGDError(
                f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}"
                " (without noise DP-SGD is not private; train without DPSGD instead)"
            )
        _check_noise(noise)
        if mode not in ("auto", "fused", "opacus"):
            raise DPSGDError(f"mode must be 'auto', 'fused' or 'opacus', got {mode!r}")

        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.noise = noise
        self.steps = 0
        self._closed = False

        for name, module in model.named_modules():
            if _is_batchnorm(module):
                raise DPSGDError(
                    f"module {name!r} ({type(module).__name__}) mixes the samples of a batch, so"
                    " per-sample clipping gives no guarantee; use GroupNorm or LayerNorm"
                )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise DPSGDError("model has no trainable parameters")
        self._params: list[nn.Parameter] = [p for _, p in named]
        self._param_names = {id(p): n for n, p in named}

        fused_ok, reason = self._fused_applicable(model)
        if mode == "fused" and not fused_ok:
            raise DPSGDError(f"mode='fused' is not applicable: {reason}")
        self.mode = "fused" if (mode == "fused" or (mode == "auto" and fused_ok)) else "opacus"
        if self.mode == "fused":
            self._setup_fused(model)
        else:
            if mode == "auto" and _first_time_said(reason):
                logger.warning(
                    "DPSGD: %s; using Opacus GradSampleModule (hooks) for exact per-sample "
                    "gradients: the same privacy guarantee as the fused path, but slower", reason
                )
            self._setup_opacus(model)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _fused_applicable(model: nn.Module) -> tuple[bool, str]:
        owners: dict[int, str] = {}
        for mname, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(module) is not nn.Linear:
                return False, (f"module {mname!r} ({type(module).__name__}) has trainable "
                               "parameters and is not nn.Linear")
            for _, p in own:
                if id(p) in owners:
                    return False, (f"a parameter is shared by modules {owners[id(p)]!r} and "
                                   f"{mname!r}")
                owners[id(p)] = mname
        return True, ""

    def _setup_fused(self, model: nn.Module) -> None:
        self._captures: list[_LinearCapture] = []
        self._handles = []
        self._capturing = False
        for module in model.modules():
            if type(module) is nn.Linear and (
                    module.weight.requires_grad
                    or (module.bias is not None and module.bias.requires_grad)):
                cap = _LinearCapture(module)
                self._captures.append(cap)
                self._handles.append(module.register_forward_hook(self._make_hook(cap)))

    def _make_hook(self, cap: _LinearCapture) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self._capturing:
                cap.inputs.append(inputs[0].detach())
                cap.outputs.append(output)
        return hook

    def _setup_opacus(self, model: nn.Module) -> None:
        from opacus import GradSampleModule

        try:
            self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum",
                                         strict=True)
        except NotImplementedError as exc:
            raise DPSGDError(f"Opacus cannot compute per-sample gradients for this model: {exc}"
                             ) from exc
        # On only inside _opacus_clipped_sum (as the fused hooks capture only there): other
        # passes through the same module (a client-held model's training, evaluation, the
        # batched engine's probes) must neither pay for the capture nor leave captured
        # activations behind, which would corrupt the next private step's batch size.
        self._gsm.disable_hooks()

    def _reset_opacus_state(self) -> None:
        """Drop whatever an earlier, interrupted pass left in Opacus's capture state."""
        for module in self._gsm._module.modules():
            if getattr(module, "activations", None):
                module.activations = []
            if hasattr(module, "max_batch_len"):
                del module.max_batch_len
        for p in self._params:
            p.grad_sample = None
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0

    # ------------------------------------------------------------------ API
    @staticmethod
    def sample_batch(n: int, sample_rate: float, noise: NoiseSource) -> Tensor:
        """Poisson sample of ``range(n)`` at ``sample_rate`` (see :func:`poisson_sample`)."""
        return poisson_sample(n, sample_rate, noise)

    @property
    def noise_std(self) -> float:
        """Std of the noise per coordinate of the written ``.grad``: sigma * C / B_expected."""
        return self.noise_multiplier * self.max_grad_norm / self.expected_batch_size

    def record(self, sample_rate: float, steps: int | None = None,
               mechanism: str = "dpsgd") -> MechanismRecord:
        """Accounting record for ``steps`` steps (default: all steps taken so far) at ``sample_rate``.

        The caller must have drawn every batch by Poisson sampling at ``sample_rate``.
        """
        steps = self.steps if steps is None else steps
        return MechanismRecord(mechanism, self.noise_multiplier, sample_rate, steps,
                               {"clip_norm": self.max_grad_norm,
                                "expected_batch_size": self.expected_batch_size,
                                "per_sample_method": self.mode,
                                "sampling": "poisson"})

    def private_gradient(self, x: Tensor, y: Tensor, loss_fn: LossFn, *,
                         extra_gradients: Tensor | None = None) -> None:
        """Write the clipped, summed, noised gradient / expected_batch_size into each ``.grad``.

        ``loss_fn(model(x), y)`` must return per-sample losses of shape ``(B,)`` (e.g.
        ``nn.CrossEntropyLoss(reduction="none")``); a reduced scalar is rejected because a
        mean would silently rescale each per-sample gradient. ``x`` may have batch size 0.

        ``extra_gradients`` (audit hook): a sparse COO tensor ``(k, D)``, ``D`` the number of
        trainable parameters in ``model.parameters()`` order, holding the per-sample gradients
        of ``k`` more records of this batch (e.g. the gradient canaries of a white-box audit).
        Each row is clipped like a real sample and added to the same clipped sum before the
        division; the noise is unchanged.
        """
        if self._closed:
            raise DPSGDError("this DPSGD was closed; create a new one")
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise DPSGDError("x and y must be tensors")
        if x.shape[0] != y.shape[0]:
            raise DPSGDError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        batch = int(x.shape[0])
        scale = 1.0 / self.expected_batch_size
        # Checked and clipped before any noise is drawn or gradient written: a refused step
        # leaves the noise source, the gradients and the step count as they were.
        extra_rows = None if extra_gradients is None \
            else self._clipped_extra_gradients(extra_gradients, scale)
        if batch == 0:
            self._write_noise()
        elif self.mode == "fused":
            layers, factors, extra = self._fused_pass(x, y, loss_fn)
            self._write_noise()
            with torch.no_grad():
                for cap, a2, g2 in layers:
                    gc = _scale_rows(g2, factors)
                    if cap.weight is not None:
                        cap.weight.grad.addmm_(gc.T, a2, alpha=scale)
                    if cap.bias is not None:
                        cap.bias.grad.add_(gc.sum(dim=0), alpha=scale)
                for cap, weight, bias in extra:
                    if weight is not None:
                        cap.weight.grad.add_(weight, alpha=scale)
                    if bias is not None:
                        cap.bias.grad.add_(bias, alpha=scale)
        else:
            sums = self._opacus_clipped_sum(x, y, loss_fn)
            self._write_noise()
            with torch.no_grad():
                for p, s in zip(self._params, sums, strict=True):
                    p.grad.add_(s, alpha=scale)
        if extra_rows is not None:
            self._add_extra_gradients(*extra_rows)
        self.steps += 1

    def _clipped_extra_gradients(self, extra: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Check the sparse ``(k, D)`` ``extra`` (DPSGDError when it is not a finite sparse COO
        tensor of D columns) and clip each row to C: its column indices and ``scale`` times
        its clipped values, for :meth:`_add_extra_gradients`. Reads no state but C."""
        total = sum(p.numel() for p in self._params)
        if not isinstance(extra, Tensor) or extra.layout != torch.sparse_coo or extra.dim() != 2 \
                or extra.shape[1] != total:
            raise DPSGDError(f"extra_gradients must be a sparse COO tensor (k, {total})")
        extra = extra.coalesce()
        rows, cols = extra.indices()
        values = extra.values()
        if not bool(torch.isfinite(values).all()):
            raise DPSGDError("extra_gradients contain NaN or infinite values")
        sq_norms = torch.zeros(extra.shape[0], dtype=values.dtype).index_add_(0, rows, values * values)
        factors = clip_factors(sq_norms, self.max_grad_norm,
                               lambda where: _sparse_row_norms(extra.shape[0], rows, values)[where])
        return cols, values * factors[rows] * scale

    def _add_extra_gradients(self, cols: Tensor, clipped: Tensor) -> None:
        """Add the clipped extra values (:meth:`_clipped_extra_gradients`) to the ``.grad``
        their columns fall in."""
        offset = 0
        with torch.no_grad():
            for p in self._params:
                size = p.numel()
                here = (cols >= offset) & (cols < offset + size)
                if bool(here.any()):
                    p.grad.view(-1).index_add_(0, cols[here] - offset,
                                               clipped[here].to(p.grad.dtype))
                offset += size

    def clipped_gradient_sum(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> list[Tensor]:
        """The clipped per-sample gradient sum (no noise, no division), one tensor per parameter.

        Not private on its own; exposed for tests and diagnostics. Order: ``model.parameters()``
        restricted to trainable ones.
        """
        if x.shape[0] == 0:
            return [torch.zeros_like(p) for p in self._params]
        if self.mode == "opacus":
            return self._opacus_clipped_sum(x, y, loss_fn)
        layers, factors, extra = self._fused_pass(x, y, loss_fn)
        by_param: dict[int, Tensor] = {}
        with torch.no_grad():
            for cap, a2, g2 in layers:
                gc = _scale_rows(g2, factors)
                if cap.weight is not None:
                    by_param[id(cap.weight)] = gc.T @ a2
                if cap.bias is not None:
                    by_param[id(cap.bias)] = gc.sum(dim=0)
            for cap, weight, bias in extra:
                if weight is not None:
                    by_param[id(cap.weight)] += weight
                if bias is not None:
                    by_param[id(cap.bias)] += bias
        return [by_param[id(p)] if id(p) in by_param else torch.zeros_like(p)
                for p in self._params]

    def close(self) -> None:
        """Remove all hooks this object placed on the model (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "fused":
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        else:
            self._gsm._close()

    def __enter__(self) -> DPSGD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _per_sample_losses(self, out: Tensor, y: Tensor, loss_fn: LossFn, batch: int) -> Tensor:
        losses = loss_fn(out, y)
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise DPSGDError(
                f"loss_fn must return per-sample losses of shape ({batch},), got {shape};"
                " use reduction='none'"
            )
        return losses

    @staticmethod
    def _float64_terms(layers: list[tuple[_LinearCapture, Tensor, Tensor]],
                       tiny: tuple[Tensor, Tensor] | None, batch: int
                       ) -> list[tuple[_LinearCapture, Tensor | None, Tensor | None]]:
        """Each layer's clipped (weight, bias) gradient sum over the samples ``tiny`` holds
        (index, float64 factor; see :func:`fused_clip_factors`), computed in float64."""
        if tiny is None:
            return []
        index, f64 = tiny
        return [(cap, *float64_linear_terms(
            a2.reshape(batch, -1, a2.shape[-1])[index], g2.reshape(batch, -1, g2.shape[-1])[index],
            f64, cap.weight is not None, cap.bias is not None)) for cap, a2, g2 in layers]

    def _fused_pass(self, x: Tensor, y: Tensor, loss_fn: LossFn
                    ) -> tuple[list[tuple[_LinearCapture, Tensor, Tensor]], Tensor,
                               list[tuple[_LinearCapture, Tensor | None, Tensor | None]]]:
        """Forward + backward to the Linear outputs; per-layer (A, G), clip factors (B, 1) and
        the (weight, bias) gradient sums computed in float64 that are to be added besides:
        those of the samples whose factor only float64 holds (:func:`fused_clip_factors`),
        and those of the samples with a non-finite activation or backpropagated value, whose
        rows of A and G are zeroed here (factor 0) and whose gradient is recomputed with the
        loss scaled (:meth:`_rescaled_terms`; one that stays non-finite adds nothing).

        A and G are returned flattened to (B*T, in) and (B*T, out), where T is the number of
        positions per sample (1 for plain 2-D inputs; calls of a layer reused in one forward
        are stacked as extra positions, so their gradients add up per sample exactly).
        """
        batch = int(x.shape[0])
        layers, sq_norms = self._fused_layers(x, y, loss_fn)

        def overflow_norms(where: tuple[Tensor, ...]) -> Tensor:
            (index,) = where
            return overflow_safe_linear_norms([
                (a2.reshape(batch, -1, a2.shape[-1])[index], g2.reshape(batch, -1, g2.shape[-1])[index],
                 cap.weight is not None, cap.bias is not None) for cap, a2, g2 in layers])

        factors, tiny = fused_clip_factors(sq_norms, self.max_grad_norm, overflow_norms)
        extra: list[tuple[_LinearCapture, Tensor | None, Tensor | None]] = []
        bad = None
        if not bool(torch.isfinite(sq_norms).all()):  # tiny is None where they all are
            bad = uncomputable_samples([t for cap, a2, g2 in layers
                                        for t in ((a2, g2) if cap.weight is not None else (g2,))],
                                       batch)
            if not bool(bad.any()):
                bad = None
        if tiny is not None:
            (index,), f64 = tiny
            if bad is not None:
                keep = ~bad[index]
                index, f64 = index[keep], f64[keep]
            # the rule's: a gradient whose float32 entries overflow even at the last loss scale
            # (a sum over positions) has no direction there and adds nothing (factor 0 already)
            keep = _float32_gradients_finite([
                (cap, a2.reshape(batch, -1, a2.shape[-1])[index],
                 g2.reshape(batch, -1, g2.shape[-1])[index]) for cap, a2, g2 in layers],
                LOSS_SCALES[-1], int(index.numel()))
            extra += self._float64_terms(layers, (index[keep], f64[keep]), batch)
        if bad is not None:
            index = bad.nonzero().squeeze(1)
            factors = factors.index_fill(0, index, 0.0)
            layers = [(cap, _zero_samples(a2, index, batch), _zero_samples(g2, index, batch))
                      for cap, a2, g2 in layers]
            extra += self._rescaled_terms(x, y, loss_fn, index)
        return layers, factors[:, None], extra

    def _rescaled_terms(self, x: Tensor, y: Tensor, loss_fn: LossFn, index: Tensor
                        ) -> list[tuple[_LinearCapture, Tensor | None, Tensor | None]]:
        """The clipped (weight, bias) gradient sums, in float64, of the samples ``index`` whose
        activations or backpropagated values are not finite: each recomputed with its loss
        multiplied by the first scale of :data:`LOSS_SCALES` that makes them finite and
        clipped with its float64 norm (as :func:`clip_overflowing_rows` does for the per-sample
        paths); a sample never finite adds nothing (:func:`uncomputable_samples`)."""
        terms: list[tuple[_LinearCapture, Tensor | None, Tensor | None]] = []
        for scale in LOSS_SCALES:
            if index.numel() == 0:
                break
            n = int(index.numel())
            layers, _ = self._fused_layers(x[index], y[index], loss_fn, scale)
            shaped = [(cap, a2.reshape(n, -1, a2.shape[-1]), g2.reshape(n, -1, g2.shape[-1]))
                      for cap, a2, g2 in layers]
            ok = ~uncomputable_samples([t for cap, a3, g3 in shaped
                                        for t in ((a3, g3) if cap.weight is not None else (g3,))], n)
            ok &= _float32_gradients_finite(shaped, 1.0, n)
            if bool(ok.any()):
                norms = overflow_safe_linear_norms([
                    (a3[ok], g3[ok], cap.weight is not None, cap.bias is not None)
                    for cap, a3, g3 in shaped]) / scale
                factor = (self.max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0) / scale
                terms += [(cap, *float64_linear_terms(a3[ok], g3[ok], factor, cap.weight is not None,
                                                      cap.bias is not None))
                          for cap, a3, g3 in shaped]
            index = index[~ok]
        return terms

    def _fused_layers(self, x: Tensor, y: Tensor, loss_fn: LossFn, scale: float | None = None
                      ) -> tuple[list[tuple[_LinearCapture, Tensor, Tensor]], Tensor]:
        """Forward + backward (of the per-sample losses multiplied by ``scale`` if given) to
        the Linear outputs: per-layer (A, G), flattened as :meth:`_fused_pass` returns them,
        and the per-sample squared gradient norms (not checked for overflow)."""
        batch = int(x.shape[0])
        caps = self._captures
        for cap in caps:
            cap.inputs.clear()
            cap.outputs.clear()
        self._capturing = True
        try:
            with torch.enable_grad():
                out = self.model(x)
                losses = self._per_sample_losses(out, y, loss_fn, batch)
                total_loss = (losses if scale is None else losses * scale).sum()
        finally:
            self._capturing = False
        try:
            outputs = [o for cap in caps for o in cap.outputs]
            if not outputs:
                raise DPSGDError("no nn.Linear was called in the forward pass")
            for cap in caps:
                for a in cap.inputs:
                    if a.ndim < 2 or a.shape[0] != batch:
                        raise DPSGDError(
                            f"an nn.Linear input has shape {tuple(a.shape)}; the fused path needs"
                            f" batch-first inputs with batch size {batch}"
                        )
            out_grads = torch.autograd.grad(total_loss, outputs, allow_unused=True)
            layers: list[tuple[_LinearCapture, Tensor, Tensor]] = []
            sq_norms: Tensor | None = None
            k = 0
            for cap in caps:
                if len(cap.inputs) == 1 and _row_major_2d(cap.inputs[0]) \
                        and out_grads[k] is not None and _row_major_2d(out_grads[k]):
                    # One call on (B, in) rows: the general path's reshapes would give views
                    # of exactly these shapes and strides, so it takes these tensors as they are.
                    a2, g2 = cap.inputs[0], out_grads[k]
                    k += 1
                    layer_sq = self._layer_sq_norms_2d(cap, a2, g2)
                else:
                    a_list, g_list = [], []
                    for a in cap.inputs:
                        g = out_grads[k]
                        k += 1
                        if g is None:
                            continue
                        a_list.append(a.reshape(batch, -1, a.shape[-1]))
                        g_list.append(g.reshape(batch, -1, g.shape[-1]))
                    if not a_list:
                        continue
                    a3 = a_list[0] if len(a_list) == 1 else torch.cat(a_list, dim=1)
                    g3 = g_list[0] if len(g_list) == 1 else torch.cat(g_list, dim=1)
                    layer_sq = self._layer_sq_norms(cap, a3, g3)
                    a2, g2 = a3.reshape(-1, a3.shape[-1]), g3.reshape(-1, g3.shape[-1])
                if sq_norms is None:
                    sq_norms = layer_sq
                elif sq_norms.dtype == layer_sq.dtype:
                    sq_norms += layer_sq  # a new tensor of ours: the same bits as out of place
                else:
                    sq_norms = sq_norms + layer_sq
                layers.append((cap, a2, g2))
        finally:
            for cap in caps:
                cap.inputs.clear()
                cap.outputs.clear()
        if sq_norms is None:
            sq_norms = torch.zeros(batch, dtype=out.dtype, device=out.device)

        return layers, sq_norms

    @staticmethod
    def _layer_sq_norms(cap: _LinearCapture, a3: Tensor, g3: Tensor) -> Tensor:
        """Per-sample squared norm of this layer's (weight, bias) gradient, exactly."""
        batch, t, d_in = a3.shape
        if t == 1:
            return DPSGD._layer_sq_norms_2d(cap, a3[:, 0, :], g3[:, 0, :])
        d_out = g3.shape[-1]
        # Each term is a new tensor, >= +0 or NaN (the weight term sums the products of two
        # Gram matrices, whose diagonal is >= +0), so starting from the first term (in g3's
        # dtype) instead of adding it to zeros gives the same bits.
        total: Tensor | None = None
        if cap.weight is not None:
            if t * t <= d_in * d_out:
                # ||sum_t g_t a_t^T||_F^2 = <A A^T, G G^T> (Gram matrices over positions)
                total = (torch.bmm(a3, a3.transpose(1, 2))
                         * torch.bmm(g3, g3.transpose(1, 2))).sum(dim=(1, 2)).to(g3.dtype)
            else:
                per_sample = torch.bmm(g3.transpose(1, 2), a3)
                total = (per_sample * per_sample).sum(dim=(1, 2)).to(g3.dtype)
        if cap.bias is not None:
            gb = g3.sum(dim=1)
            bias_sq = (gb * gb).sum(dim=1)
            total = bias_sq if total is None else total.add_(bias_sq)
        if total is None:  # not reached: a captured layer has a trainable weight or bias
            total = torch.zeros(batch, dtype=g3.dtype, device=g3.device)
        return total

    @staticmethod
    def _layer_sq_norms_2d(cap: _LinearCapture, a2: Tensor, g2: Tensor) -> Tensor:
        """:meth:`_layer_sq_norms` for one position per sample: ``a2`` (B, in), ``g2`` (B, out)."""
        g_sq = (g2 * g2).sum(dim=1)
        if cap.weight is None:
            return g_sq if cap.bias is not None else torch.zeros_like(g_sq)
        # (a new tensor, >= +0 or NaN: the same bits as adding it to zeros of g2's dtype)
        total = (a2 * a2).sum(dim=1) * g_sq
        if total.dtype != g2.dtype:
            total = total.to(g2.dtype)
        if cap.bias is not None:
            total += g_sq
        return total

    def _opacus_clipped_sum(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> list[Tensor]:
        batch = int(x.shape[0])
        if not self.model.training:
            raise DPSGDError("the Opacus per-sample path needs the model in train mode"
                             " (model.train())")
        samples = self._opacus_per_sample(x, y, loss_fn)
        sq = torch.zeros(batch, dtype=samples[0].dtype, device=samples[0].device)
        for gs in samples:
            sq += gs.reshape(batch, -1).pow(2).sum(dim=1)
        if not bool(torch.isfinite(sq).all()):
            flat = [gs.reshape(batch, -1) for gs in samples]

            def scaled(index: Tensor, scale: float) -> list[Tensor]:
                return [gs.reshape(index.shape[0], -1) for gs in self._opacus_per_sample(
                    x[index], y[index], loss_fn, scale)]

            sq = clip_overflowing_rows(flat, sq, self.max_grad_norm, scaled)
            samples = [f.reshape(gs.shape) for f, gs in zip(flat, samples, strict=True)]
        factors = clip_factors(sq, self.max_grad_norm, lambda where: overflow_safe_row_norms(
            [gs.reshape(batch, -1)[where] for gs in samples]))
        return [torch.tensordot(factors, gs, dims=1) for gs in samples]

    def _opacus_per_sample(self, x: Tensor, y: Tensor, loss_fn: LossFn,
                           scale: float | None = None) -> list[Tensor]:
        """Opacus's per-sample gradients (batch, *p.shape) of every trainable parameter, of the
        losses multiplied by ``scale`` if given."""
        batch = int(x.shape[0])
        self._reset_opacus_state()
        self._gsm.enable_hooks()
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # Opacus's hooks fire on module outputs when the input needs no gradient
                # (the first layer); torch warns about that, and it is exactly what we want.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                out = self._gsm(x)
                losses = self._per_sample_losses(out, y, loss_fn, batch)
                if scale is not None:
                    losses = losses * scale
                torch.autograd.grad(losses.sum(), self._params, allow_unused=True)
            samples = []
            for p in self._params:
                gs = p.grad_sample
                if isinstance(gs, list):
                    raise DPSGDError("per-sample gradients were accumulated over several passes")
                if gs is None:
                    gs = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)
                samples.append(gs)
        finally:
            self._gsm.disable_hooks()
            self._reset_opacus_state()
        return samples

    def _write_noise(self) -> None:
        """Fill every trainable ``.grad`` in place with N(0, (sigma C / B_expected)^2) noise.

        One draw of all coordinates from ``self.noise`` (in ``self._params`` order), whichever
        path ran, made on the parameters' device (not drawn on the CPU and moved). A
        :class:`~privacy.noise.CsprngNoise` draw goes straight into the gradients when they are
        consecutive pieces of one buffer (a flat model's binding): the same values, no copy.
        """
        total = sum(p.numel() for p in self._params)
        dtype, device = self._params[0].dtype, self._params[0].device
        if isinstance(self.noise, CsprngNoise):
            flat_grad = self._flat_grad(total)
            if flat_grad is not None:
                # The same values, written straight into the gradients (no temporary, no copy).
                self.noise.normal(total, self.noise_std, dtype, device, out=flat_grad)
                return
        flat = self.noise.normal(total, self.noise_std, dtype=dtype, device=device)
        offset = 0
        with torch.no_grad():
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(flat[offset:offset + p.numel()].view(p.shape))
                offset += p.numel()

    def _flat_grad(self, total: int) -> Tensor | None:
        """One contiguous 1-D tensor over every trainable ``.grad``, in ``self._params`` order,
        when the gradients are consecutive pieces of one buffer (as a flat model binds them);
        otherwise None. Checked on every call: the gradients may be re-bound between steps."""
        params = self._params
        first = params[0].grad
        dtype, device = params[0].dtype, params[0].device
        if first is None or first.dtype != dtype or first.device != device:
            return None
        storage = first.untyped_storage().data_ptr()
        address = first.data_ptr()
        item = first.element_size()
        for p in params:
            g = p.grad
            if (g is None or g.dtype != dtype or g.device != device or g.shape != p.shape
                    or not g.is_contiguous() or g.untyped_storage().data_ptr() != storage
                    or g.data_ptr() != address):
                return None
            address += g.numel() * item
        return first.detach().as_strided((total,), (1,), first.storage_offset())
