"""Gaussian mechanisms: generic release, noised second-moment matrix, noised mean of a scalar.

Neighbouring relation: add/remove one record, everywhere in this module, with the record
count used for normalization (``n``, ``m``) treated as a *public constant* of the mechanism
(the same relation Opacus's accountants assume, so these releases compose with DP-SGD in one
:class:`privacy.accounting.Accountant`). Each Gaussian release with noise std
``noise_multiplier * sensitivity`` is accounted as ``(noise_multiplier, sample_rate=1.0,
steps=1)``.

Randomness (applies to every function here): noise comes from the caller's
:class:`privacy.noise.NoiseSource`. With :class:`~privacy.noise.CsprngNoise` it is a ChaCha20
keystream under a key from ``os.urandom``, converted to Gaussians hardened against
floating-point attacks (sum of four draws, as Opacus's ``secure_mode``); the formal guarantee
still assumes ideal real-valued Gaussian noise. With :class:`~privacy.noise.ReproducibleNoise`
the noise is a function of a seed and gives no guarantee against anyone who knows it.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from privacy.accounting import MechanismRecord
from privacy.errors import ToolkitError
from privacy.noise import NoiseSource, is_noise_source


class MechanismError(ToolkitError, ValueError):
    """Bad input to a mechanism; the message names the offending argument."""


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise MechanismError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_noise(noise: object) -> NoiseSource:
    if not is_noise_source(noise):
        raise MechanismError(
            f"noise must be a privacy.noise.NoiseSource (CsprngNoise or ReproducibleNoise),"
            f" got {type(noise).__name__}"
        )
    return noise


def _check_float_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise MechanismError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise MechanismError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if not _all_finite(value):
        raise MechanismError(f"{name} contains NaN or infinite values")
    return value


def _all_finite(value: Tensor) -> bool:
    """True iff every entry of the floating-point ``value`` is finite (no NaN, no +-inf); the
    screen of ``secure_fedora.core.tensors.all_finite``, which this lower layer cannot import.

    Exact: a sum is NaN or infinite whenever an addend is (IEEE arithmetic propagates both),
    so a finite sum proves every entry finite in one reduction without a temporary; only a
    sum that is not finite (a non-finite entry, or finite entries whose sum overflows) is
    decided entry by entry."""
    flat = value.detach()
    if math.isfinite(float(flat.sum())):
        return True
    return bool(torch.isfinite(flat).all())


def _exactly_symmetric(m: Tensor) -> bool:
    """True iff the square float ``m`` equals its transpose bit for bit (so that
    ``(m + m^T) / 2`` would return ``m`` itself: the comparison is of the stored bits, which
    tells ``-0.0`` from ``0.0``)."""
    bits = {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }.get(m.dtype)
    if bits is None:
        return False
    m = m.detach()
    return torch.equal(m.view(bits), m.mT.view(bits))


def _symmetrized(m: Tensor) -> Tensor:
    """``(m + m^T) / 2`` of the finite square ``m``, bit for bit; ``m`` itself (no copy) where
    it is exactly symmetric already, and halves summed (``m / 2 + m^T / 2``, finite) where
    the plain sum would overflow."""
    if _exactly_symmetric(m):
        return m
    sym = (m + m.mT).div_(2)
    if not _all_finite(sym):  # entries beyond half the largest float: halve first
        sym = (m / 2).add_(m.mT / 2)
    return sym


@functools.lru_cache(maxsize=1)
def _strict_upper_mask(d: int, device: torch.device) -> Tensor:
    """The (d, d) boolean mask of the strict upper triangle (read-only). The last one is kept
    (d^2 bytes): every client's summary in a run has the same d."""
    return torch.ones(d, d, dtype=torch.bool, device=device).triu_(1)


class GaussianMechanism:
    """Adds i.i.d. N(0, (noise_multiplier * sensitivity)^2) noise to every coordinate.

    Guarantee: if the caller's ``sensitivity`` bounds the L2 norm of the change of the value
    between neighbouring datasets, one release is a Gaussian mechanism accounted as
    ``(noise_multiplier, 1.0, 1)``. The sensitivity is the caller's claim; this class cannot
    check it.
    """

    def __init__(self, noise_multiplier: float, sensitivity: float) -> None:
        self.noise_multiplier = _check_positive("noise_multiplier", noise_multiplier)
        self.sensitivity = _check_positive("sensitivity", sensitivity)

    @property
    def std(self) -> float:
        """Standard deviation of the noise added to each coordinate."""
        return self.noise_multiplier * self.sensitivity

    def release(self, value: Tensor, noise: NoiseSource) -> Tensor:
        """Return ``value + N(0, std^2)`` noise from ``noise`` (a new tensor, same
        shape/dtype/device as ``value``)."""
        value = _check_float_tensor("value", value)
        noise = _check_noise(noise)
        return value + noise.normal(value.shape, self.std, value.dtype, device=value.device)

    def release_symmetric(self, value: Tensor, noise: NoiseSource) -> Tensor:
        """Return ``S + E`` for a square ``value``, ``S = (value + value^T) / 2`` and ``E`` a
        symmetric noise matrix: diagonal N(0, std^2), strictly upper triangle N(0, std^2 / 2),
        all independent, mirrored below. The result is exactly symmetric (bit for bit). ``S``
        is ``value`` itself where that is symmetric bit for bit (the same values), and
        ``value / 2 + value^T / 2`` where the sum would overflow.

        Guarantee: for a value that is symmetric between neighbours (``S`` equals ``value``
        there), the Gaussian mechanism on its isometric upper-triangle vector (the diagonal,
        and the off-diagonal entries times sqrt(2): an L2 isometry, so the caller's
        Frobenius ``sensitivity`` holds for it unchanged) with N(0, std^2) per coordinate,
        mapped back: accounted as ``(noise_multiplier, 1.0, 1)``, like :meth:`release`.
        ``E`` has exactly the distribution of ``(G + G^T) / 2`` for ``G`` with i.i.d.
        N(0, std^2) entries (the symmetrized output of :meth:`release`), from d(d+1)/2 draws
        instead of d^2: the diagonal's d values first, then the upper triangle row by row."""
        value = _check_float_tensor("value", value)
        if value.ndim != 2 or value.shape[0] != value.shape[1]:
            raise MechanismError(f"value must be a square (d, d) matrix, got shape"
                                 f" {tuple(value.shape)}")
        noise = _check_noise(noise)
        d = int(value.shape[0])
        diagonal = noise.normal((d,), self.std, value.dtype, device=value.device)
        upper = noise.normal((d * (d - 1) // 2,), self.std * math.sqrt(0.5), value.dtype,
                             device=value.device) if d > 1 else None
        sym_noise = torch.zeros_like(value)
        if upper is not None:  # row-major fill of the strict upper triangle, then mirrored
            sym_noise.masked_scatter_(_strict_upper_mask(d, value.device), upper)
            sym_noise = sym_noise + sym_noise.T
        sym_noise.diagonal().copy_(diagonal)
        # noise + value, the sum of value + noise (IEEE addition commutes), in place
        return sym_noise.add_(_symmetrized(value))

    def record(self, mechanism: str, **params: object) -> MechanismRecord:
        """The accounting record of one release (``sensitivity`` is added to ``params``)."""
        if "sensitivity" in params and params["sensitivity"] != self.sensitivity:
            raise MechanismError(
                f"params sensitivity {params['sensitivity']!r} differs from the mechanism's"
                f" {self.sensitivity!r}"
            )
        return MechanismRecord(mechanism, self.noise_multiplier, 1.0, 1,
                               {**params, "sensitivity": self.sensitivity})

    def __repr__(self) -> str:
        return (f"GaussianMechanism(noise_multiplier={self.noise_multiplier!r},"
                f" sensitivity={self.sensitivity!r})")


def largest_entries(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Per-sample largest ``|entry|`` of ``t`` over ``dims``; 1 where it is 0 (nothing to scale)."""
    top = t.abs().amax(dim=dims)
    return torch.where(top > 0, top, torch.ones_like(top))


def combine_scaled_norms(scales: list[Tensor], norms: list[Tensor]) -> Tensor:
    """``sqrt(sum_j (scales[j] * norms[j])^2)`` per sample (float64), without overflow: the terms
    are divided by their largest scale before squaring. The largest scale itself where it is
    not finite (an entry is infinite or NaN)."""
    s, n = torch.stack(scales), torch.stack(norms)
    top = s.amax(dim=0)
    safe = torch.where((top > 0) & torch.isfinite(top), top, torch.ones_like(top))
    total = safe * ((s / safe) * n).pow(2).sum(dim=0).sqrt()
    return torch.where(torch.isfinite(top), total, top)  # inf or NaN: an entry is not finite


def overflow_safe_row_norms(parts: list[Tensor]) -> Tensor:
    """Float64 norms of n rows given as pieces ``parts`` (each ``(n, d_j)``, a row being their
    concatenation: a per-sample gradient, a data row), each piece scaled by its largest entry,
    so a norm whose square exceeds the float range is still exact. Not finite for an entry
    that is not."""
    scales, norms = [], []
    for part in parts:
        if part.shape[1] == 0:
            continue
        p = part.to(torch.float64)
        top = largest_entries(p, (1,))
        scales.append(top)
        norms.append((p / top[:, None]).pow(2).sum(dim=1).sqrt())
    return combine_scaled_norms(scales, norms)


def clip_rows(z: Tensor, max_norm: float) -> Tensor:
    """Scale each row of ``z`` (n, d) to L2 norm at most ``max_norm``; shorter rows unchanged.

    Returns a new tensor. The bound holds up to floating-point rounding of the norm
    (relative error about 1e-7 in float32, 1e-16 in float64); a row whose norm overflows
    ``z``'s dtype (its entries are finite) is clipped through its norm computed without
    overflow (:func:`overflow_safe_row_norms`), as DP-SGD clips such a gradient.
    """
    z = _check_float_tensor("z", z)
    if z.ndim != 2:
        raise MechanismError(f"z must be 2-D (n, d), got shape {tuple(z.shape)}")
    max_norm = _check_positive("max_norm", max_norm)
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    factor = (max_norm / norms).clamp(max=1.0)  # zero rows: max_norm/0 = inf -> 1
    overflowed = ~torch.isfinite(norms[:, 0])
    if bool(overflowed.any()):  # finite entries whose norm overflows z's dtype: not dropped
        exact = overflow_safe_row_norms([z[overflowed]])
        factor[overflowed, 0] = (max_norm / exact).clamp(max=1.0).to(factor.dtype)
    return z * factor


def second_moment_sensitivity(clip_norm: float, n: int) -> float:
    """L2 sensitivity ``R^2 / n`` of the clipped second moment (see noised_second_moment)."""
    clip_norm = _check_positive("clip_norm", clip_norm)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MechanismError(f"n must be an int >= 1, got {n!r}")
    return clip_norm**2 / n


def noised_second_moment(z: Tensor, clip_norm: float, noise_multiplier: float,
                         noise: NoiseSource, *, n: int | None = None) -> Tensor:
    """Gaussian mechanism on ``M = clip(Z)^T clip(Z) / n``; returns an exactly symmetric (d, d)
    matrix.

    Rows of ``z`` (n_rows, d) are clipped to L2 norm ``R = clip_norm``. ``n`` is the public
    normalizer (default ``z.shape[0]``, which is then assumed public: the guarantee protects
    each row's content and presence, not the dataset size itself).

    Neighbouring relation: add/remove one row, ``n`` fixed. Adding or removing a clipped
    row ``z`` changes ``M`` by ``z z^T / n``, whose Frobenius norm is ``||z||^2 / n <= R^2 / n``
    (equality for ``||z|| = R``): the L2 sensitivity of ``M`` as a d*d vector is exactly
    ``R^2 / n``.

    Noise: the Gaussian mechanism with that sensitivity and ``s = noise_multiplier * R^2 /
    n``, accounted as ``(noise_multiplier, 1.0, 1)``, on the isometric upper-triangle
    vectorization of the symmetric ``M`` (off-diagonal entries times sqrt(2), so Frobenius
    norms and the sensitivity ``R^2 / n`` are unchanged), mapped back: the returned noise is
    symmetric with variance ``s^2`` on the diagonal and ``s^2 / 2`` off it, all d(d+1)/2
    entries independent (:meth:`GaussianMechanism.release_symmetric`). That is exactly the
    distribution of ``(G + G^T) / 2`` for ``G`` with i.i.d. N(0, s^2) entries on all d*d
    entries (the same mechanism, symmetrized by post-processing), drawn from half the
    values. (Adding ``s^2`` noise to each plain upper-triangle entry would be equally
    private but noisier off the diagonal, and ``(G + G^T) / sqrt(2)`` would double the
    diagonal noise; neither is done.)
    """
    z = _check_float_tensor("z", z)
    if z.ndim != 2:
        raise MechanismError(f"z must be 2-D (n, d), got shape {tuple(z.shape)}")
    if z.shape[1] < 1:
        raise MechanismError("z must have at least one column")
    nm = _check_positive("noise_multiplier", noise_multiplier)
    noise = _check_noise(noise)
    if n is None:
        n = int(z.shape[0])
        if n < 1:
            raise MechanismError("z has no rows; pass the public n explicitly")
    sensitivity = second_moment_sensitivity(clip_norm, n)
    zc = clip_rows(z, clip_norm)
    return GaussianMechanism(nm, sensitivity).release_symmetric((zc.T @ zc).div_(n), noise)


def summary_record(clip_norm: float, noise_multiplier: float, n: int, q: int,
                   mechanism: str = "gaussian_summary") -> MechanismRecord:
    """Accounting record for one :func:`noised_second_moment` release (+ top-q post-processing)."""
    sensitivity = second_moment_sensitivity(clip_norm, n)
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise MechanismError(f"q must be an int >= 1, got {q!r}")
    return MechanismRecord(mechanism, _check_positive("noise_multiplier", noise_multiplier), 1.0,
                           1, {"clip_norm": float(clip_norm), "n": n, "q": q,
                               "sensitivity": sensitivity,
                               "neighbouring": "add/remove one row, n public"})


def top_eigenvectors(m: Tensor, q: int) -> Tensor:
    """Eigenvectors of the q algebraically largest eigenvalues of symmetric ``m``, as (d, q).

    Columns are ordered by decreasing eigenvalue, unit norm, and sign-normalized so that the
    entry of largest absolute value in each column is positive (first such entry on ties).
    ``m`` is symmetrized as ``(m + m^T) / 2`` first (a matrix that is symmetric bit for bit,
    as :meth:`GaussianMechanism.release_symmetric` returns, is used as it is: the same
    values; where the sum would overflow, as ``m / 2 + m^T / 2``). Post-processing: no
    privacy cost. Same dtype and device as ``m`` (float32 or float64), without autograd
    history. MechanismError for NaN or infinite entries, a non-square ``m`` or a bad ``q``.

    Exact (to working precision) on every device. On the CPU only the q wanted eigenpairs are
    computed (LAPACK ``?syevr`` through scipy, bisection and inverse iteration), with the BLAS
    pinned to one thread, so the output is bit-identical for one input on one machine whatever
    the thread settings of the process; elsewhere a full ``torch.linalg.eigh``. For repeated
    eigenvalues the eigenvectors are not unique and the basis is whatever LAPACK returns (an
    orthonormal basis of the eigenspace, deterministic as above).
    """
    m = _check_float_tensor("m", m)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise MechanismError(f"m must be a square (d, d) matrix, got shape {tuple(m.shape)}")
    if m.dtype not in (torch.float32, torch.float64):
        raise MechanismError(f"m must be float32 or float64, got dtype {m.dtype}")
    d = m.shape[0]
    if isinstance(q, bool) or not isinstance(q, int) or not (1 <= q <= d):
        raise MechanismError(f"q must be an int in [1, {d}], got {q!r}")
    sym = _symmetrized(m.detach())
    if sym.device.type == "cpu":
        top = _top_eigenvectors_cpu(sym, q)
    else:
        _, vecs = torch.linalg.eigh(sym)
        top = vecs[:, -q:].flip(dims=(1,))
    idx = top.abs().argmax(dim=0)
    signs = torch.sign(top[idx, torch.arange(q, device=top.device)])
    signs[signs == 0] = 1
    return (top * signs).contiguous()


_BLAS_LOCK = threading.Lock()
_blas_controller: Any = None


def _top_eigenvectors_cpu(sym: Tensor, q: int) -> Tensor:
    """The top-q eigenvectors of the exactly symmetric CPU tensor ``sym`` (not modified),
    decreasing order."""
    global _blas_controller
    import numpy as np  # imported here: keeps the command line's start-up light
    import scipy.linalg
    from threadpoolctl import ThreadpoolController

    d = sym.shape[0]
    # A private copy that LAPACK may overwrite, in Fortran order: for the symmetric ``sym``
    # that is the transpose's C order, a straight copy instead of a transposing one.
    a = np.array(sym.numpy().T, order="F")
    # A threaded BLAS sums in an order that depends on its thread count, and the process's
    # count differs between runtimes (each Flower ClientApp vs one in-process run): one thread
    # makes the release a function of the input alone. The lock keeps concurrent callers
    # from restoring the count under each other.
    with _BLAS_LOCK:
        if _blas_controller is None:  # after scipy's import, so that its BLAS is seen
            _blas_controller = ThreadpoolController()
        with _blas_controller.limit(limits=1, user_api="blas"):
            try:
                _, vecs = scipy.linalg.eigh(
                    a,
                    subset_by_index=[d - q, d - 1],
                    driver="evr",
                    overwrite_a=True,
                    check_finite=False,
                )
            except np.linalg.LinAlgError:
                # inverse iteration failed to converge for some vector (LAPACK info > 0):
                # the full, always-convergent divide-and-conquer solver, equally exact.
                _, vecs = scipy.linalg.eigh(
                    np.array(sym.numpy().T, order="F"),
                    driver="evd",
                    overwrite_a=True,
                    check_finite=False,
                )
                vecs = vecs[:, d - q :]
    return torch.from_numpy(vecs[:, ::-1].copy()).to(sym.dtype)  # a copy: positive strides


def noised_mean_sensitivity(clip: float, m: int) -> float:
    """L2 sensitivity ``clip / m`` of the clipped mean (see noised_scalar)."""
    clip = _check_positive("clip", clip)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise MechanismError(f"m must be an int >= 1, got {m!r}")
    return clip / m


def noised_scalar(values: Tensor, clip: float, noise_multiplier: float,
                  noise: NoiseSource, *, m: int | None = None) -> Tensor:
    """Gaussian mechanism on the mean of per-record values clamped to ``[-clip, clip]``.

    ``values`` is 1-D: one value per record (e.g. the per-example validation-loss difference
    ``loss(theta_local; x_k) - loss(theta_received; x_k)``, whose mean is ``L_loc - L_rec``).
    Returns a 0-dim tensor ``sum_k clamp(v_k) / m + N(0, s^2)`` with
    ``s = noise_multiplier * clip / m``; ``m`` is the public normalizer (default
    ``len(values)``, then assumed public).

    Exact sensitivity: under add/remove one record with ``m`` fixed, the sum changes by one
    clamped value, so the mean changes by at most ``clip / m`` — this is what is accounted,
    as ``(noise_multiplier, 1.0, 1)``. (Under replace-one it would be ``2 * clip / m``; the
    whole package uses add/remove, matching Opacus.) Clamping is per record: clamping only
    the final mean would give sensitivity ``2 * clip`` and is not what this computes.
    """
    values = _check_float_tensor("values", values)
    if values.ndim != 1:
        raise MechanismError(
            f"values must be 1-D (one value per record), got shape {tuple(values.shape)}"
        )
    nm = _check_positive("noise_multiplier", noise_multiplier)
    noise = _check_noise(noise)
    if m is None:
        m = int(values.shape[0])
        if m < 1:
            raise MechanismError("values is empty; pass the public m explicitly")
    sensitivity = noised_mean_sensitivity(clip, m)
    total = values.clamp(-float(clip), float(clip)).sum() / m
    return total + noise.normal((), nm * sensitivity, values.dtype, device=values.device)


def scalar_record(clip: float, noise_multiplier: float, m: int,
                  mechanism: str = "gaussian_lambda") -> MechanismRecord:
    """Accounting record for one :func:`noised_scalar` release."""
    sensitivity = noised_mean_sensitivity(clip, m)
    return MechanismRecord(mechanism, _check_positive("noise_multiplier", noise_multiplier), 1.0,
                           1, {"clip": float(clip), "m": m, "sensitivity": sensitivity,
                               "neighbouring": "add/remove one record, m public"})


SensitivityInputs = dict[str, str]


@dataclass(frozen=True)
class MechanismSpec:
    """What the toolkit knows about one accounted mechanism, by its ledger name.

    ``sensitivity_inputs`` names the ledger params the L2 sensitivity is computed from, each
    as ``"number"`` (finite) or ``"count"`` (int > 0); ``sensitivity`` computes it from them
    (None: the mechanism records no sensitivity of its own, e.g. DP-SGD, whose per-step
    sensitivity is its clip norm). An auditor recomputes the recorded sensitivity with it.

    ``record_params`` (a plug-in Gaussian mechanism's): the public params of one release
    under a run's config (``cfg -> {name: value}``, the sensitivity inputs among them), so
    that a runtime accounts the release before any data is read; such a mechanism can be
    declared in a method's round release after ``"dpsgd"`` and released with
    :meth:`secure_fedora.secure.private.FederationPrivacy.gaussian`.
    """

    name: str
    description: str
    sensitivity_inputs: SensitivityInputs = field(default_factory=dict)
    sensitivity: Callable[[Mapping[str, Any]], float] | None = None
    record_params: Callable[[Any], Mapping[str, Any]] | None = None


class MechanismRegistry:
    """Name -> :class:`MechanismSpec`. Registering a name twice raises MechanismError (a
    plug-in cannot silently replace a built-in); an unknown name lists the known ones."""

    def __init__(self) -> None:
        self._specs: dict[str, MechanismSpec] = {}
        self._builtins: frozenset[str] = frozenset()

    def register(self, spec: MechanismSpec) -> MechanismSpec:
        """Add ``spec`` under ``spec.name``; returns it."""
        if not isinstance(spec, MechanismSpec):
            raise MechanismError(f"register needs a MechanismSpec, got {type(spec).__name__}")
        if not spec.name:
            raise MechanismError("a mechanism needs a name, got an empty one")
        if spec.name in self._specs:
            raise MechanismError(
                f"mechanism {spec.name!r} is already registered"
                + ("" if spec.name in self._builtins else
                   f"; to replace it (a notebook cell run again), call "
                   f"MECHANISMS.unregister({spec.name!r}) first"))
        for key, kind in spec.sensitivity_inputs.items():
            if kind not in ("number", "count"):
                raise MechanismError(f"mechanism {spec.name!r}: input {key!r} must be"
                                     f" 'number' or 'count', got {kind!r}")
        self._specs[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        """Remove plug-in mechanism ``name`` (a notebook re-registering an edited spec); a
        name not registered is no error. A built-in is refused: its ledger entries would
        then be audited with another formula."""
        if name in self._builtins:
            raise MechanismError(f"mechanism {name!r} is built in: it cannot be removed")
        self._specs.pop(name, None)

    def seal_builtins(self) -> None:
        """Mark every mechanism registered so far as built in (called once, below)."""
        self._builtins = frozenset(self._specs)

    def get(self, name: str) -> MechanismSpec:
        """The spec of ``name``; MechanismError listing the registered names if unknown."""
        if name not in self._specs:
            raise MechanismError(f"unknown mechanism {name!r}; registered: {sorted(self._specs)}")
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._specs)

    def gaussian_record(self, name: str, noise_multiplier: float,
                        params: Mapping[str, Any]) -> MechanismRecord:
        """The accounting record of one Gaussian release of registered mechanism ``name``
        with ``params`` (its sensitivity inputs among them): ``(noise_multiplier, 1.0, 1)``,
        the sensitivity its formula gives added to the params. MechanismError when ``name``
        has no sensitivity formula, an input is missing or of the wrong type, or the
        sensitivity is not a finite number > 0."""
        spec = self.get(name)
        if spec.sensitivity is None:
            raise MechanismError(f"mechanism {name!r} has no sensitivity formula; a Gaussian"
                                 " release of it cannot be accounted")
        if "sensitivity" in params:
            raise MechanismError(f"mechanism {name!r}: params may not set 'sensitivity' (its"
                                 " formula computes it)")
        sensitivity = self.expected_sensitivity(name, params)
        if sensitivity is None:
            raise MechanismError(
                f"mechanism {name!r}: params {dict(params)!r} lack or mistype a sensitivity"
                f" input (needs {spec.sensitivity_inputs})")
        sensitivity = _check_positive(f"mechanism {name!r}: its sensitivity", sensitivity)
        return MechanismRecord(name, _check_positive("noise_multiplier", noise_multiplier), 1.0,
                               1, {**params, "sensitivity": sensitivity})

    def expected_sensitivity(self, name: str, params: Mapping[str, Any]) -> float | None:
        """The sensitivity ``name``'s recorded ``params`` imply, or None when it cannot be
        recomputed: an unregistered mechanism, one without a sensitivity formula, or params
        missing an input (or holding one of the wrong type: a non-finite number, a count
        that is not an int > 0); ``math.inf`` when an input or the implied value is beyond
        float64, so that no recorded sensitivity matches it. MechanismError naming the
        mechanism when its formula raises."""
        spec = self._specs.get(name)
        if spec is None or spec.sensitivity is None:
            return None
        try:
            for key, kind in spec.sensitivity_inputs.items():
                value = params.get(key)
                if isinstance(value, bool) or not isinstance(value, int | float) \
                        or not math.isfinite(value):
                    return None
                if kind == "count" and not (isinstance(value, int) and value > 0):
                    return None
            return float(spec.sensitivity(params))
        except OverflowError:
            # an input or the implied value beyond float64 (e.g. clip_norm 1e308 squared):
            # no recorded float sensitivity can equal it
            return math.inf
        except Exception as err:  # a plug-in's formula: say whose, not a bare traceback
            raise MechanismError(f"mechanism {name!r}: its sensitivity formula raised "
                                 f"{type(err).__name__}: {err} on params {dict(params)!r}"
                                 ) from err


#: The accounted mechanisms, by the name their ledger entries carry.
MECHANISMS = MechanismRegistry()
MECHANISMS.register(MechanismSpec(
    "dpsgd", "DP-SGD: Poisson-sampled steps, per-sample gradients clipped to clip_norm,"
    " Gaussian noise of std noise_multiplier * clip_norm (privacy.dpsgd)"))
MECHANISMS.register(MechanismSpec(
    "gaussian_summary", "Gaussian mechanism on the clipped second moment Z^T Z / n"
    " (noised_second_moment), top-q eigenvectors as post-processing",
    {"clip_norm": "number", "n": "count"},
    lambda p: float(p["clip_norm"]) ** 2 / p["n"]))
MECHANISMS.register(MechanismSpec(
    "gaussian_lambda", "Gaussian mechanism on the mean of per-record values clamped to"
    " [-clip, clip] (noised_scalar)",
    {"clip": "number", "m": "count"},
    lambda p: float(p["clip"]) / p["m"]))
MECHANISMS.seal_builtins()
