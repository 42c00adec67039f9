"""Privacy accounting: an accountant over Opacus's RDP/PRV analyses, budgets, noise calibration.

Every accounted release is a (Poisson-subsampled) Gaussian mechanism described by
``(noise_multiplier, sample_rate, steps)``:

- DP-SGD: ``steps`` optimizer steps, each with Poisson sampling at ``sample_rate`` and
  Gaussian noise of std ``noise_multiplier * clip_norm``;
- a one-shot Gaussian release (noised summary, noised lambda): ``sample_rate = 1.0``,
  ``steps = 1``, noise std ``noise_multiplier * sensitivity``.

All of them go into one history, so they compose under one accountant. The neighbouring
relation is add/remove-one-record throughout (the relation Opacus's analyses assume for
Poisson sampling); mechanisms in :mod:`privacy.mechanisms` calibrate their sensitivity to
the same relation so that composition is sound.
"""

from __future__ import annotations

import decimal
import functools
import importlib.util
import json
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from privacy.errors import ToolkitError

# Opacus is imported where it is used: importing the package costs about 2 s and 100 MB
# (it loads its whole PrivacyEngine stack), which every non-private Flower ClientApp process
# would otherwise pay on each message.

#: Opacus's default RDP orders, ``RDPAccountant.DEFAULT_ALPHAS`` (a test keeps them equal):
#: held here so that accounting needs only Opacus's analysis module, not its package.
OPACUS_RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)]
                                             + list(range(12, 64)))

#: Largest noise multiplier accepted: far beyond it epsilon is 0 to every digit shown, and the
#: analyses overflow float64 (at 1e300 every accountant raised OverflowError).
MAX_NOISE_MULTIPLIER = 1e6

#: Smallest sample rate accepted: the smallest normal float64. Below it (a subnormal rate, which
#: no run reaches: it takes more than 10^307 samples) dp_accounting's PLD analysis raised a bare
#: ValueError ("a must be greater than b").
MIN_SAMPLE_RATE = sys.float_info.min

#: Largest step count one recorded release may claim: far beyond any run (a million steps a
#: second for thirty years), and below where the accountants' float arithmetic overflows.
MAX_STEPS = 10**15

#: Largest PRV discretization grid (points) we let Opacus allocate. Opacus's PRV accountant
#: allocates several float64 arrays of this length; beyond this it can exhaust memory
#: (measured: a 125,000-step history is killed for memory on a 2-core CI machine).
PRV_MAX_GRID_POINTS = 20_000_000

#: PRV adds its discretization error ``eps_error`` to every epsilon (Gopi et al.'s bound; the
#: configured ``prv_eps_error``, 0.01 by default, is an absolute error). Where that is large
#: against the epsilon, a second pass uses this fraction of the first estimate instead ...
PRV_RELATIVE_ERROR = 0.005

#: ... but never less than this (dp_accounting's default PLD discretization, the first with
#: which ``audit verify`` rechecks a small epsilon), nor on a grid larger than
#: :data:`PRV_REFINE_MAX_GRID_POINTS`. The smallest PRV epsilon is then ~0.00019 (noise
#: multiplier 10,000, one release; the true epsilon is ~0.00009).
PRV_MIN_EPS_ERROR = 1e-4

#: Largest grid (points) of that second pass: its size is inversely proportional to its
#: error (measured: 500,000 points, 1.1-1.6 s for 100 to 1,000 DP-SGD steps).
PRV_REFINE_MAX_GRID_POINTS = 500_000

#: RDP orders beyond Opacus's defaults (which stop at 63). Large orders are what a small
#: epsilon needs: with orders <= 63 a single Gaussian release can never be accounted below
#: epsilon ~0.1 at delta 1e-5 (log(1/delta) / 62). These four are also in dp_accounting's
#: default orders, so the audit's independent RDP uses a superset of ours.
RDP_EXTRA_ORDERS: tuple[float, ...] = (128.0, 256.0, 512.0, 1024.0)

#: PLD discretization of privacy-loss values (dp_accounting's ``value_discretization_interval``).
#: The estimate is pessimistic (an upper bound on epsilon) at any interval; 1e-3 instead of the
#: library's 1e-4 is ~10x faster and measured 1e-6 relative looser on DP-SGD plans.
PLD_VALUE_DISCRETIZATION = 1e-3

#: Largest privacy-loss distribution (points of its discretized PMF) we let dp_accounting
#: build or compose. Building one peaks at about 180 bytes per point (measured: 12 million
#: points, 2.2 GB), so this bounds one PLD epsilon near 1 GB; only huge epsilons need more
#: (a single Gaussian release at noise multiplier 0.04 is already epsilon ~400).
PLD_MAX_GRID_POINTS = 5_000_000

_STATE_VERSION = 1

class AccountingError(ToolkitError, ValueError):
    """Bad input to the accounting layer; the message names the offending field."""


class CalibrationError(AccountingError):
    """No noise multiplier can meet the requested target for the given plan."""


class FixedEntriesOverTargetError(CalibrationError):
    """The plan's entries with a fixed noise multiplier alone already spend the target: no
    noise for the others can help (the caller names where those multipliers come from)."""


class UnreachableTargetError(CalibrationError):
    """Even the largest noise multiplier calibration tries spends more than the target: the
    target itself (the budget, or its share) is too small for the plan."""


class AccountingSizeError(AccountingError):
    """The analysis would allocate more than its memory guard allows (an epsilon far too large
    for the discretized accountants); nothing was allocated. ``problem`` says why, ``remedy``
    what may help; the message is both."""

    def __init__(self, problem: str, remedy: str) -> None:
        self.problem, self.remedy = problem, remedy
        super().__init__(f"{problem}; {remedy}")

    def __reduce__(self) -> tuple[type[AccountingSizeError], tuple[str, str]]:
        # pickle and copy rebuild an exception from its args (the one message) by default
        return type(self), (self.problem, self.remedy)


def _check_kind(kind: str) -> str:
    if kind not in ACCOUNTANT_REGISTRY:
        raise AccountingError(
            f"accountant must be one of {tuple(ACCOUNTANT_REGISTRY)}, got {kind!r}")
    return kind


def _check_release(noise_multiplier: Any, sample_rate: Any, steps: Any) -> tuple[float, float, int]:
    """Validate one (noise_multiplier, sample_rate, steps) triple; return it normalized."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real):
        raise AccountingError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise AccountingError(
            f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}"
            " (a zero noise multiplier has no finite epsilon)"
        )
    if noise_multiplier > MAX_NOISE_MULTIPLIER:
        raise AccountingError(f"noise_multiplier must be at most {MAX_NOISE_MULTIPLIER:g}, got"
                              f" {noise_multiplier!r} (beyond it epsilon is 0 and the analyses"
                              " overflow)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise AccountingError(f"sample_rate must be a number, got {sample_rate!r}")
    if not (0 < sample_rate <= 1):
        raise AccountingError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if sample_rate < MIN_SAMPLE_RATE:
        raise AccountingError(f"sample_rate must be at least {format_exact(MIN_SAMPLE_RATE)} (the"
                              " smallest normal float64; no run samples at a lower rate), got"
                              f" {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise AccountingError(f"steps must be an int, got {steps!r}")
    if steps < 1:
        raise AccountingError(f"steps must be >= 1, got {steps!r}")
    return float(noise_multiplier), float(sample_rate), int(steps)


def validate_release(noise_multiplier: Any, sample_rate: Any, steps: Any) -> tuple[float, float, int]:
    """Check a (noise_multiplier > 0, sample_rate in (0, 1], steps >= 1) triple; AccountingError if bad."""
    return _check_release(noise_multiplier, sample_rate, steps)


def _check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not (0 < delta < 1):
        raise AccountingError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _merge(history: Iterable[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Merge consecutive entries with equal (noise_multiplier, sample_rate), as Opacus does."""
    merged: list[tuple[float, float, int]] = []
    for nm, q, steps in history:
        if merged and merged[-1][0] == nm and merged[-1][1] == q:
            merged[-1] = (nm, q, merged[-1][2] + steps)
        else:
            merged.append((nm, q, steps))
    return tuple(merged)


History = tuple[tuple[float, float, int], ...]


@functools.cache
def opacus_rdp_analysis() -> ModuleType:
    """Opacus's RDP analysis, the module ``opacus.accountants.analysis.rdp`` (its functions,
    so its results bit for bit). While the opacus package is not imported yet, that one file
    is loaded from Opacus's installation on its own: it needs numpy and scipy only, where
    importing the package loads Opacus's whole training stack (about as long as importing
    torch), which a DP run training on the fused path, or a Flower ClientApp process per
    message, would pay for accounting alone. Falls back to the package import if the file
    cannot be loaded alone."""
    if "opacus" not in sys.modules:
        try:
            found = importlib.util.find_spec("opacus")
            if found is None or found.origin is None:
                raise ImportError("opacus is not installed")
            path = Path(found.origin).parent / "accountants" / "analysis" / "rdp.py"
            spec = importlib.util.spec_from_file_location("secure_fedora_opacus_rdp", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # any failure: the (slower) package import below
            pass
    from opacus.accountants.analysis import rdp

    return rdp


@functools.cache
def _rdp_orders() -> tuple[float, ...]:
    """Opacus's default RDP orders plus :data:`RDP_EXTRA_ORDERS` (ascending)."""
    return tuple(sorted({*map(float, OPACUS_RDP_ORDERS), *RDP_EXTRA_ORDERS}))


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Opacus's RDP curve of one step over :func:`_rdp_orders` (cached, read-only)."""
    rdp_analysis = opacus_rdp_analysis()

    if sample_rate > 0 and noise_multiplier * noise_multiplier == 0.0:
        # sigma^2 underflows (sigma below about 1e-162): Opacus divides by it. The RDP of a
        # vanishing noise is unbounded, so the exact bound is +inf (the plan is over budget).
        vec = np.full(len(_rdp_orders()), np.inf)
        vec.setflags(write=False)
        return vec
    vec = rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=list(_rdp_orders()),
    )
    vec = np.asarray(vec, dtype=np.float64)
    vec.setflags(write=False)
    return vec


def _rdp_epsilon(history: History, delta: float, options: dict[str, float]) -> float:
    """Opacus's RDP analysis (same functions, same summation order) over Opacus's orders plus
    :data:`RDP_EXTRA_ORDERS`; equals ``RDPAccountant().get_epsilon(delta)`` whenever the best
    order is <= 63, and is tighter (still a valid bound) when a larger order is better.

    ``compute_rdp(q, sigma, steps)`` is ``steps * compute_rdp(q, sigma, 1)`` in Opacus, so
    caching the one-step curve gives bit-identical sums while avoiding recomputation.
    """
    if not history:
        return 0.0
    rdp_analysis = opacus_rdp_analysis()
    rdp = sum(_rdp_one_step(q, nm) * steps for nm, q, steps in history)
    with warnings.catch_warnings():
        # Opacus suggests more orders near 1 when the smallest (1.1) is optimal: that happens
        # only for epsilons of at least 10 ln(1/delta) - 3.4 (112 at delta 1e-5), and the bound
        # stays valid, only looser; the caller reports the epsilon itself
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha",
                                category=UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(_rdp_orders()), rdp=rdp,
                                                delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def _prv_domain_half_width(history: History, delta_error: float) -> float:
    """Opacus's safe PRV domain half-width for ``history`` at eps_error 0: its
    ``compute_safe_domain_size`` is ``max(L, eps_error) + 3`` with ``L`` from two RDP
    analyses that do not depend on eps_error, so every pass over one history shares it
    (those RDP analyses were a third of a PRV epsilon's time)."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
    from opacus.accountants.analysis.prv.domain import compute_safe_domain_size

    with warnings.catch_warnings():
        # Opacus's domain sizing calls its RDP analysis at tiny deltas, which may warn about
        # the alpha grid edge; that only widens the (safe) domain.
        warnings.simplefilter("ignore")
        return float(compute_safe_domain_size(
            [PoissonSubsampledGaussianPRV(q, nm) for nm, q, _ in history],
            [steps for _, _, steps in history], eps_error=0.0, delta_error=delta_error))


def _prv_domain(history: History, eps_error: float, delta_error: float) -> Any:
    """The discretization domain Opacus's ``PRVAccountant._get_domain`` builds for ``history``
    (bit for bit: ``max(L, e) + 3`` equals ``max(max(L, 0) + 3, e + 3)`` in floating point,
    rounding being monotone), its half-width computed once per history."""
    from opacus.accountants.analysis.prv.domain import Domain

    half_width = max(_prv_domain_half_width(history, delta_error), eps_error + 3)
    total = sum(steps for _, _, steps in history)
    mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    return Domain.create_aligned(-half_width, half_width, mesh_size)


@functools.cache
def _prv_accountant_class() -> type:
    """Opacus's PRVAccountant with :func:`_prv_domain` as its domain (imported on first use)."""
    from opacus.accountants import PRVAccountant

    class _SharedDomainPRVAccountant(PRVAccountant):
        def _get_domain(self, prvs: Any, num_self_compositions: Any, eps_error: float,
                        delta_error: float) -> Any:
            history = tuple((float(p.noise_multiplier), float(p.sample_rate), int(n))
                            for p, n in zip(prvs, num_self_compositions, strict=True))
            return _prv_domain(history, eps_error, delta_error)

    return _SharedDomainPRVAccountant


def _prv_grid_points(history: History, eps_error: float, delta_error: float) -> int:
    """Size of the discretization grid Opacus's PRVAccountant would allocate for history."""
    return int(_prv_domain(history, eps_error, delta_error).size)


def _prv_upper_bound(history: History, delta: float, eps_error: float) -> tuple[float, int]:
    """Opacus's PRVAccountant.get_epsilon at ``eps_error`` (an upper bound) and the size of
    its grid, with a memory guard.

    The bound is Gopi et al.'s: the grid's mesh is chosen from ``eps_error`` so that the
    discretized epsilon plus ``eps_error`` is at least the true epsilon, for any ``eps_error``.
    """
    delta_error = delta / 1000
    # Opacus evaluates log(1 - q) in both branches of an np.where; for q = 1 (a plain
    # Gaussian release) that is log(0) in a branch that is then discarded: harmless.
    with np.errstate(divide="ignore", invalid="ignore"):
        try:
            points = _prv_grid_points(history, eps_error, delta_error)
        except (ZeroDivisionError, OverflowError):
            # Opacus sizes the grid with RDP terms 1 / sigma^2, beyond float64 for such noise
            smallest = min(nm for nm, _, _ in history)
            raise AccountingSizeError(
                f"PRV accounting cannot size its grid for this history: its noise multipliers "
                f"(smallest {format_exact(smallest)}) are too small for float64 arithmetic",
                "use more noise") from None
        if points > PRV_MAX_GRID_POINTS:
            raise AccountingSizeError(
                f"PRV accounting of this history needs a grid of {points:,} points"
                f" (limit {PRV_MAX_GRID_POINTS:,})", "use accountant='rdp' or a larger eps_error")
        acc = _prv_accountant_class()()
        acc.history = [tuple(h) for h in history]
        try:
            bound = float(acc.get_epsilon(delta, eps_error=eps_error, delta_error=delta_error))
        except (ValueError, RuntimeError) as exc:
            # Opacus's own limits of its discretization: a delta too small for float64 on the
            # grid ("Floating point errors will dominate"), or a noise level too small for it
            # ("Discrete mean differs significantly from continuous mean")
            raise AccountingError(
                "the PRV accountant cannot evaluate this history at delta"
                f" {format_exact(delta)} (Opacus: {exc}); use accountant='rdp' or 'pld'") from None
    return bound, points


def prv_refined_eps_error(estimate: float, eps_error: float, points: int) -> float | None:
    """The eps_error of the refining PRV pass for a first-pass ``estimate`` (the bound minus
    ``eps_error``) on a grid of ``points``; None when refining would not halve ``eps_error``.

    It is :data:`PRV_RELATIVE_ERROR` of the estimate, never below :data:`PRV_MIN_EPS_ERROR`,
    nor so small that the grid (whose size is inversely proportional to eps_error) would
    exceed :data:`PRV_REFINE_MAX_GRID_POINTS`.
    """
    refined = max(PRV_RELATIVE_ERROR * estimate, PRV_MIN_EPS_ERROR,
                  eps_error * points / PRV_REFINE_MAX_GRID_POINTS)
    return refined if refined <= eps_error / 2 else None


def _prv_epsilon(history: History, delta: float, options: dict[str, float]) -> float:
    """PRV upper bound on epsilon: Opacus's PRVAccountant at ``prv_eps_error``, then, where
    that absolute error is large against the estimate, again at a smaller error
    (:func:`prv_refined_eps_error`). Each pass is a proven upper bound, so their minimum is.
    """
    if not history:
        return 0.0
    eps_error = options["prv_eps_error"]
    bound, points = _prv_upper_bound(history, delta, eps_error)
    if not options.get("prv_refine", 1.0):
        return bound  # the single pass of ledgers written before the refined one existed
    refined = prv_refined_eps_error(max(bound - eps_error, 0.0), eps_error, points)
    if refined is None:
        return bound
    return min(bound, _prv_upper_bound(history, delta, refined)[0])


@functools.lru_cache(maxsize=16)
def _subsampled_gaussian_pld(noise_multiplier: float, sample_rate: float,
                             discretization: float) -> Any:
    """dp_accounting's PLD of one Poisson-subsampled Gaussian release (add/remove one record,
    pessimistic), exactly as its ``PLDAccountant`` builds it for a ``PoissonSampledDpEvent``.

    Cached: building it is most of the cost of a PLD epsilon, and a run composes the same
    (sigma, q) again at every release. PLD objects are never modified (composition returns
    new ones), so sharing one changes no result.
    """
    import dp_accounting
    from dp_accounting import pld

    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=discretization,
        sampling_prob=sample_rate,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


@functools.lru_cache(maxsize=256)
def _gaussian_pld_points(noise_multiplier: float, sample_rate: float, discretization: float) -> int:
    """Points of the PMF of one (subsampled) Gaussian release's PLD, from the loss range that
    dp_accounting's connect-the-dots construction discretizes (no array is built)."""
    from dp_accounting.pld import privacy_loss_mechanism as mechanism

    points = 0
    for adjacency in (mechanism.AdjacencyType.REMOVE, mechanism.AdjacencyType.ADD):
        # a noise multiplier whose square underflows (1e-300) makes dp_accounting divide by
        # zero: the loss range is then unbounded, which the guard refuses without its warning
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            bounds = mechanism.GaussianPrivacyLoss(
                noise_multiplier, sampling_prob=sample_rate, adjacency_type=adjacency,
            ).connect_dots_bounds()
            span = (bounds.epsilon_upper - bounds.epsilon_lower) / discretization
        # + 3: both ends of the span, and the point dp_accounting's rounding may add
        points = max(points, int(min(span, 1e18) if math.isfinite(span) else 1e18) + 3)
    return points


#: dp_accounting self-composes a sparse PMF sparsely while ``size ** steps`` is at most this.
PLD_SPARSE_LIMIT = 1000


def sparse_power_fits(size: int, steps: int, limit: int = PLD_SPARSE_LIMIT) -> bool:
    """``size ** steps <= limit``, exactly, in at most about log2(limit) multiplications:
    the power itself has ``steps * log2(size)`` bits, which takes minutes to build at 10**7
    steps and never ends at 10**12 (a count a ledger may state)."""
    if size <= 1:
        return True
    power = 1
    for _ in range(steps):
        power *= size
        if power > limit:
            return False
    return True


def self_compose_pld(single: Any, steps: int) -> Any:
    """``single.self_compose(steps)`` (a dp_accounting PrivacyLossDistribution), bit for bit,
    in time independent of ``steps``: where dp_accounting would first compute
    ``size ** steps`` of a sparse PMF (see :func:`sparse_power_fits`) to find that it must
    convert the PMF to a dense one, the PMF is converted first, as dp_accounting then does."""
    from dp_accounting.pld import pld_pmf, privacy_loss_distribution

    def dense(pmf: Any) -> Any:
        if isinstance(pmf, pld_pmf.DensePLDPmf) or sparse_power_fits(pmf.size, steps):
            return pmf
        return pmf.to_dense_pmf()

    if steps > 1:
        remove, add = dense(single._pmf_remove), None
        if not single._symmetric:
            add = dense(single._pmf_add)
        if remove is not single._pmf_remove or (add is not None and add is not single._pmf_add):
            single = privacy_loss_distribution.PrivacyLossDistribution(remove, add)
    return single.self_compose(steps)


def _self_composition_points(pmf: Any, steps: int) -> int:
    """Length of the array dp_accounting allocates to self-compose ``pmf`` ``steps`` times (its
    own Chernoff truncation bounds, computed on the already built PMF)."""
    from dp_accounting.pld import common, pld_pmf

    if steps == 1:
        return int(pmf.size)
    trivial = (int(pmf.size) - 1) * steps + 1  # no truncation at all
    if trivial <= PLD_MAX_GRID_POINTS:
        return trivial
    if not isinstance(pmf, pld_pmf.DensePLDPmf):
        if sparse_power_fits(pmf.size, steps):  # dp_accounting composes such PMFs sparsely
            return int(pmf.size ** steps)
        pmf = pmf.to_dense_pmf()
    probs = pmf._probs
    lower, upper = common.compute_self_convolve_bounds(probs, steps, 1e-15)
    return max(upper - lower + 1, len(probs))


def pld_grid_points(history: Iterable[tuple[float, float, int]],
                    discretization: float = PLD_VALUE_DISCRETIZATION) -> int:
    """An upper bound on the largest PMF (in points) that dp_accounting's PLD accountant builds
    to compose ``history`` of ``(noise_multiplier, sample_rate, steps)``, found without ever
    allocating more than :data:`PLD_MAX_GRID_POINTS` points: each group of equal
    (sigma, q) is sized from its loss range and, when that fits, from the self-composition
    bounds of its built single-release PMF; the running composition is bounded by the sum."""
    counts: dict[tuple[float, float], int] = {}
    for nm, q, steps in history:
        nm, q, steps = _check_release(nm, q, steps)
        counts[(nm, q)] = counts.get((nm, q), 0) + steps
    total = 0
    for (nm, q), steps in sorted(counts.items()):
        if q >= 1.0:
            part = _gaussian_pld_points(nm / math.sqrt(steps), 1.0, discretization)
        else:
            part = _gaussian_pld_points(nm, q, discretization)
            if part <= PLD_MAX_GRID_POINTS:
                single = _subsampled_gaussian_pld(nm, q, discretization)
                pmfs = [single._pmf_remove] + ([] if single._symmetric else [single._pmf_add])
                part = max(_self_composition_points(pmf, steps) for pmf in pmfs)
        total += part
    return total


def check_pld_size(history: Iterable[tuple[float, float, int]],
                   discretization: float = PLD_VALUE_DISCRETIZATION) -> None:
    """AccountingSizeError when composing ``history`` under PLD would exceed
    :data:`PLD_MAX_GRID_POINTS` points; nothing large is allocated either way."""
    history = list(history)
    points = pld_grid_points(history, discretization)
    if points > PLD_MAX_GRID_POINTS:
        smallest = min((nm for nm, _, _ in history), default=float("nan"))
        raise AccountingSizeError(
            f"PLD accounting of this history needs a grid of about {points:,} points (limit"
            f" {PLD_MAX_GRID_POINTS:,}): its noise multipliers (smallest"
            f" {format_exact(smallest)}) give an"
            " epsilon far beyond any meaningful budget", "use accountant='rdp' or more noise")


def _pld_epsilon(history: History, delta: float, options: dict[str, float]) -> float:
    """dp_accounting's PLD accountant, pessimistic estimate (an upper bound on epsilon).

    Releases with equal (noise_multiplier, sample_rate) are composed as one self-composition
    (composition is commutative), which keeps an alternating DP-SGD/lambda history cheap.
    Neighbouring relation: add/remove one record, as everywhere in this package. The
    composition is dp_accounting's ``PLDAccountant`` step for step (identity, then each
    group's PLD in sorted order: a Gaussian of sigma / sqrt(steps) for q = 1, the
    subsampled Gaussian's PLD self-composed ``steps`` times otherwise), with the subsampled
    Gaussian's PLD and each group's PLD taken from caches (:func:`_subsampled_gaussian_pld`,
    :func:`_pld_group`); the result is the
    accountant's, bit for bit, when it is given the same groups in the same order. Fed the
    releases one by one in the order they were made, the accountant discretizes differently
    and lands near it (the discretization is absolute: 2e-5 relative at epsilon 3, 7e-4 at
    epsilon 0.1, measured); both are pessimistic (upper) bounds.
    """
    if not history:
        return 0.0
    from dp_accounting import pld

    counts: dict[tuple[float, float], int] = {}
    for nm, q, steps in history:
        counts[(nm, q)] = counts.get((nm, q), 0) + steps
    discretization = options.get("value_discretization_interval", PLD_VALUE_DISCRETIZATION)
    check_pld_size(history, discretization)
    composed = pld.privacy_loss_distribution.identity(
        value_discretization_interval=discretization)
    for (nm, q), steps in sorted(counts.items()):
        _check_release(nm, q, steps)  # PLDAccountant's other cases never arise
        composed = composed.compose(_pld_group(nm, q, steps, discretization))
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=8)
def _pld_group(noise_multiplier: float, sample_rate: float, steps: int,
               discretization: float) -> Any:
    """The PLD of ``steps`` releases of one (sigma, q), as :func:`_pld_epsilon` composes it: a
    Gaussian of sigma / sqrt(steps) for q = 1, else the subsampled Gaussian self-composed.

    Cached: the gate asks for epsilon at every release, and consecutive releases share most
    groups (DP-SGD's steps of a round, the previous lambda count, the summary). PLD objects
    are never modified, so a shared one changes no result. At most 8 are kept; each is below
    :data:`PLD_MAX_GRID_POINTS` points (checked before any is built).
    """
    import dp_accounting
    from dp_accounting import pld

    if sample_rate >= 1.0:
        return pld.privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=noise_multiplier / math.sqrt(steps),
            value_discretization_interval=discretization,
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return self_compose_pld(_subsampled_gaussian_pld(noise_multiplier, sample_rate, discretization),
                            steps)


@dataclass(frozen=True)
class AccountingMethod:
    """A named analysis turning a history of (subsampled) Gaussian releases into epsilon.

    ``compute(history, delta, options)`` must return an upper bound on the epsilon of the
    composed history under add/remove-one-record; ``ledger_params(options)`` describes the
    analysis (library, orders, discretization, ...) so that an auditor can redo it.
    """

    name: str
    description: str
    compute: Callable[[History, float, dict[str, float]], float]
    ledger_params: Callable[[dict[str, float]], dict[str, Any]]


#: Accountants by name. Add one with :func:`register_accountant`.
ACCOUNTANT_REGISTRY: dict[str, AccountingMethod] = {}


def register_accountant(method: AccountingMethod) -> AccountingMethod:
    """Make ``method`` selectable by its name; refuses a name that is already taken."""
    if not isinstance(method, AccountingMethod):
        raise AccountingError(f"expected an AccountingMethod, got {type(method).__name__}")
    if method.name in ACCOUNTANT_REGISTRY or method.name == "auto":
        raise AccountingError(f"accountant {method.name!r} is already registered (or reserved)")
    ACCOUNTANT_REGISTRY[method.name] = method
    return method


register_accountant(AccountingMethod(
    "rdp", "Renyi DP (Opacus's analysis; Opacus's orders plus 128, 256, 512, 1024)",
    _rdp_epsilon,
    lambda o: {"library": "opacus", "orders": "opacus_default_alphas",
               "extra_orders": list(RDP_EXTRA_ORDERS)},
))
register_accountant(AccountingMethod(
    "prv", "privacy random variables (Opacus's PRVAccountant, upper bound)",
    _prv_epsilon,
    lambda o: {"library": "opacus", "eps_error": o["prv_eps_error"], "delta_error": "delta/1000",
               **({"refined_eps_error": {"relative": PRV_RELATIVE_ERROR, "min": PRV_MIN_EPS_ERROR,
                                         "max_grid_points": PRV_REFINE_MAX_GRID_POINTS}}
                  if o.get("prv_refine", 1.0) else {})},
))
register_accountant(AccountingMethod(
    "pld", "privacy loss distributions (dp_accounting, pessimistic estimate)",
    _pld_epsilon,
    lambda o: {"library": "dp_accounting", "pessimistic_estimate": True,
               "value_discretization_interval": o.get("value_discretization_interval",
                                                      PLD_VALUE_DISCRETIZATION),
               "neighboring_relation": "add_or_remove_one"},
))

#: Names of the built-in accountants (a ledger may name any registered one: looked up in
#: :data:`ACCOUNTANT_REGISTRY` when checked, so a plug-in's counts).
ACCOUNTANT_KINDS: tuple[str, ...] = tuple(ACCOUNTANT_REGISTRY)


@functools.lru_cache(maxsize=1024)
def _epsilon(kind: str, history: History, delta: float,
             options: tuple[tuple[str, float], ...]) -> float:
    return ACCOUNTANT_REGISTRY[kind].compute(history, delta, dict(options))


class Accountant:
    """One client's privacy accountant: a composable history of Gaussian releases.

    History entries are ``(noise_multiplier, sample_rate, steps)``; consecutive entries with
    the same noise multiplier and sample rate are merged (as Opacus does). Epsilon is computed
    by the registered analysis of the chosen kind (:data:`ACCOUNTANT_REGISTRY`): ``"rdp"``
    (Opacus's RDP analysis over its orders plus :data:`RDP_EXTRA_ORDERS`; equals
    ``RDPAccountant().get_epsilon(delta)`` whenever the best order is <= 63), ``"prv"``
    (Opacus's PRVAccountant; an upper bound, at most ``prv_eps_error`` above the estimate, less
    where the estimate is small: :func:`prv_refined_eps_error`) or
    ``"pld"`` (dp_accounting's PLD accountant, pessimistic estimate).

    The guarantee is for the add/remove-one-record neighbouring relation. The accountant does
    not enforce anything itself; :class:`privacy.pipeline.BudgetGate` does.
    """

    def __init__(self, kind: str = "rdp", *, prv_eps_error: float = 0.01,
                 prv_refine: bool = True) -> None:
        self._kind = _check_kind(kind)
        if not (isinstance(prv_eps_error, int | float) and 0 < prv_eps_error < 1):
            raise AccountingError(f"prv_eps_error must be in (0, 1), got {prv_eps_error!r}")
        if not isinstance(prv_refine, bool):
            raise AccountingError(f"prv_refine must be a bool, got {prv_refine!r}")
        self._prv_eps_error = float(prv_eps_error)
        self._prv_refine = prv_refine
        self._history: History = ()

    def _options(self) -> tuple[tuple[str, float], ...]:
        if self._prv_refine:
            return (("prv_eps_error", self._prv_eps_error),)
        return (("prv_eps_error", self._prv_eps_error), ("prv_refine", 0.0))

    @property
    def parameters(self) -> dict[str, Any]:
        """The analysis and its parameters, as written to the ledger (``accountant_params``)."""
        return {"name": self._kind,
                **ACCOUNTANT_REGISTRY[self._kind].ledger_params(dict(self._options()))}

    @property
    def kind(self) -> str:
        """The accountant's registered name (``"rdp"``, ``"prv"``, ``"pld"``, ...)."""
        return self._kind

    @property
    def prv_eps_error(self) -> float:
        """Largest epsilon error of the PRV discretization (PRV uses less where the estimate is
        small: :func:`prv_refined_eps_error`; unused by the other accountants)."""
        return self._prv_eps_error

    @property
    def prv_refine(self) -> bool:
        """Whether PRV refines a small estimate (:func:`prv_refined_eps_error`). False only
        for an accountant that continues a ledger written before that pass existed
        (:meth:`reproducing`): its epsilons are then Opacus's single pass at
        ``prv_eps_error``, as that ledger recorded them."""
        return self._prv_refine

    @classmethod
    def reproducing(cls, parameters: Any, kind: str, *,
                    prv_eps_error: float = 0.01) -> Accountant | None:
        """An empty accountant of ``kind`` whose :attr:`parameters` equal ``parameters`` (the
        ``accountant_params`` a ledger recorded), so that it computes every recorded epsilon
        again exactly; None when this toolkit has no such accountant. Only PRV's refining
        pass may be switched off for it: ledgers written before that pass existed record
        parameters without ``refined_eps_error``."""
        for refine in (True, False):
            acc = cls(kind, prv_eps_error=prv_eps_error, prv_refine=refine)
            if acc.parameters == parameters:
                return acc
        return None

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """A copy of the merged history, oldest first."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        """Number of mechanism invocations recorded (sum of steps)."""
        return sum(steps for _, _, steps in self._history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Add ``steps`` invocations of a Poisson-subsampled Gaussian mechanism to the history."""
        entry = _check_release(noise_multiplier, sample_rate, steps)
        self._history = _merge((*self._history, entry))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 for an empty history)."""
        return _epsilon(self._kind, self._history, _check_delta(delta), self._options())

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float,
                      steps: int = 1) -> float:
        """Epsilon after a hypothetical release; the accountant's state is not changed."""
        return self.epsilon_after_releases(delta, [(noise_multiplier, sample_rate, steps)])

    def epsilon_after_releases(self, delta: float,
                               releases: Sequence[tuple[float, float, int]]) -> float:
        """Epsilon after several hypothetical releases (composed in order); state unchanged."""
        extra = [_check_release(*r) for r in releases]
        history = _merge((*self._history, *extra))
        return _epsilon(self._kind, history, _check_delta(delta), self._options())

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: ``{"version", "accountant", "prv_eps_error", "prv_refine",
        "history"}``."""
        return {
            "version": _STATE_VERSION,
            "accountant": self._kind,
            "prv_eps_error": self._prv_eps_error,
            "prv_refine": self._prv_refine,
            "history": [[nm, q, steps] for nm, q, steps in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accountant's state; the kind in ``state`` must match this accountant's."""
        if not isinstance(state, dict):
            raise AccountingError(f"accountant state must be a dict, got {type(state).__name__}")
        for key in ("version", "accountant", "prv_eps_error", "history"):
            if key not in state:
                raise AccountingError(f"accountant state is missing the key {key!r}")
        if state["version"] != _STATE_VERSION:
            raise AccountingError(f"accountant state version {state['version']!r} is not supported")
        if state["accountant"] != self._kind:
            raise AccountingError(
                f"accountant state is for {state['accountant']!r}, this accountant is {self._kind!r}"
            )
        if state["prv_eps_error"] != self._prv_eps_error:
            raise AccountingError(
                f"accountant state has prv_eps_error {state['prv_eps_error']!r}, this accountant"
                f" uses {self._prv_eps_error!r}"
            )
        if state.get("prv_refine", True) != self._prv_refine:
            raise AccountingError(
                f"accountant state has prv_refine {state.get('prv_refine', True)!r}, this"
                f" accountant uses {self._prv_refine!r}")
        history = state["history"]
        if not isinstance(history, list):
            raise AccountingError("accountant state key 'history' must be a list")
        entries = []
        for i, item in enumerate(history):
            if not isinstance(item, list | tuple) or len(item) != 3:
                raise AccountingError(
                    f"accountant state history[{i}] must be [noise_multiplier, sample_rate, steps]"
                )
            try:
                entries.append(_check_release(*item))
            except AccountingError as exc:
                raise AccountingError(f"accountant state history[{i}]: {exc}") from None
        self._history = _merge(entries)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Accountant:
        """Build an accountant of the kind named in ``state`` and load it."""
        if not isinstance(state, dict) or "accountant" not in state:
            raise AccountingError("accountant state is missing the key 'accountant'")
        acc = cls(state["accountant"], prv_eps_error=state.get("prv_eps_error", 0.01),
                  prv_refine=state.get("prv_refine", True) is not False)
        acc.load_state_dict(state)
        return acc

    def __repr__(self) -> str:
        return f"Accountant(kind={self._kind!r}, history={list(self._history)!r})"


@dataclass(frozen=True)
class PrivacyBudget:
    """A client's (epsilon, delta) budget; validated on construction.

    ``epsilon`` must be finite and > 0; ``delta`` in (0, 1). Use :meth:`check_dataset_size`
    to also require the usual ``delta < 1/n`` for a dataset of n records.
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        eps, delta = self.epsilon, self.delta
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) \
                or eps <= 0:
            raise AccountingError(f"budget epsilon must be a finite number > 0, got {eps!r}")
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not (0 < delta < 1):
            raise AccountingError(f"budget delta must be a number in (0, 1), got {delta!r}")
        object.__setattr__(self, "epsilon", float(eps))
        object.__setattr__(self, "delta", float(delta))

    def check_dataset_size(self, n: int) -> None:
        """Raise AccountingError unless ``delta < 1/n`` (a delta that large permits leaking a record)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise AccountingError(f"dataset size n must be an int >= 1, got {n!r}")
        if self.delta >= 1.0 / n:
            raise AccountingError(
                f"budget delta {self.delta!r} must be < 1/n = {1.0 / n!r} for n = {n} records"
            )


class BudgetExceededError(ToolkitError, RuntimeError):
    """A release was refused because it would push epsilon past the client's budget."""

    def __init__(self, *, client_id: str, round: int, mechanism: str,
                 epsilon_would_be: float, budget: PrivacyBudget, reason: str = "") -> None:
        self.client_id = client_id
        self.round = round
        self.mechanism = mechanism
        self.epsilon_would_be = epsilon_would_be
        self.budget = budget
        self.reason = reason
        message = (
            f"client {client_id!r} round {round}: release {mechanism!r} refused; epsilon would"
            f" reach {format_spent(epsilon_would_be, budget.epsilon)} > budget"
            f" {format_exact(budget.epsilon)} (delta={format_exact(budget.delta)})"
        )
        if reason:
            message += f"; {reason}"
        super().__init__(message)


@dataclass(frozen=True)
class MechanismRecord:
    """One accounted mechanism invocation carried by a release.

    ``noise_multiplier``, ``sample_rate`` and ``steps`` are what the accountant composes;
    ``params`` holds extra description (clip norm, sensitivity, n, ...) that goes into the
    ledger entry unchanged; it must be JSON-serializable with finite numbers (checked here).
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise AccountingError(f"mechanism must be a non-empty string, got {self.mechanism!r}")
        _check_release(self.noise_multiplier, self.sample_rate, self.steps)
        if not isinstance(self.params, dict):
            raise AccountingError(f"params of {self.mechanism!r} must be a dict")
        try:
            json.dumps(self.params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AccountingError(
                f"params of {self.mechanism!r} must be JSON-serializable with finite numbers"
                f" (they go into the ledger): {exc}"
            ) from None
        reserved = {"noise_multiplier", "sample_rate", "steps"} & set(self.params)
        if reserved:
            raise AccountingError(
                f"params of {self.mechanism!r} must not repeat {sorted(reserved)}; they are fields"
            )

    def as_release(self) -> tuple[float, float, int]:
        """The ``(noise_multiplier, sample_rate, steps)`` triple the accountant composes."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))

    def ledger_params(self) -> dict[str, Any]:
        """All parameters as written to a ledger entry (the triple plus ``params``)."""
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            **self.params,
        }


@dataclass(frozen=True)
class PlannedRelease:
    """One line of a release plan; ``noise_multiplier=None`` means "to be calibrated"."""

    mechanism: str
    sample_rate: float
    steps: int
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise AccountingError(f"mechanism must be a non-empty string, got {self.mechanism!r}")
        nm = 1.0 if self.noise_multiplier is None else self.noise_multiplier
        try:
            _check_release(nm, self.sample_rate, self.steps)
        except AccountingError as exc:
            raise AccountingError(f"planned release {self.mechanism!r}: {exc}") from None


def round_up(epsilon: float, digits: int = 6) -> float:
    """``epsilon`` rounded up to ``digits`` decimals: a shown epsilon is never below the one
    accounted (rounding to nearest can show less). Infinite and NaN values pass unchanged."""
    if not math.isfinite(epsilon):
        return epsilon
    scale = 10.0 ** digits
    shown = math.ceil(epsilon * scale) / scale
    while shown < epsilon:  # the product or the quotient rounded down
        shown = math.nextafter(shown, math.inf)
    return shown


def format_up(value: float, decimals: int) -> str:
    """``value`` as text with ``decimals`` decimals, rounded up: a shown epsilon (or share of a
    budget) is never below the one recorded, as rounding to nearest can show (2.98341 is
    "2.984" at three decimals, not "2.983"). The ceiling is taken of the value's shortest
    decimal form (the one results.json and the ledgers hold, so 0.1 stays "0.100"). Infinite
    and NaN values are shown as ``str`` shows them. A value of magnitude below one unit of the
    last decimal (which would show as "0.0000" or "0.0001" at four) is shown in scientific
    notation with ``decimals`` decimals, rounded up the same way (1.23456e-07 is "1.2346e-7")."""
    return _format_rounded(value, decimals, decimal.ROUND_CEILING)


def format_down(value: float, decimals: int) -> str:
    """``value`` as text with ``decimals`` decimals, rounded down (toward minus infinity) from
    its shortest decimal form, as :func:`format_up` rounds up: a shown noise multiplier is never
    above the one drawn (1.32847398 is "1.3284" at four decimals, where rounding to nearest
    shows the larger "1.3285"). Infinite and NaN values are shown as ``str`` shows them, and a
    value of magnitude below one unit of the last decimal in scientific notation, rounded down
    the same way (4.21789e-05 is "4.2178e-5", not "0.0000")."""
    return _format_rounded(value, decimals, decimal.ROUND_FLOOR)


def format_exact(value: float) -> str:
    """A bound (a budget epsilon, a delta, a target) as text that reads as exactly ``value``:
    as ``:g`` shows it where that is the value (2.0 is "2", 1e-05 "1e-05"), else the float's
    shortest round-trip form (1.0000001 is "1.0000001", where ``:g`` rounds it to "1" and a
    spend above it could read as at or under it). Infinite and NaN values as ``str`` shows them."""
    value = float(value) or 0.0  # -0.0 as "0"
    short = f"{value:g}"
    if not math.isfinite(value):
        return short
    # the same decimal as the shortest form, not merely the same float: a subnormal's ``:g``
    # (5e-324 as "4.94066e-324") reads back as the float but below its shortest form
    return short if decimal.Decimal(short) == decimal.Decimal(repr(value)) else repr(value)


def format_at_least(value: float, digits: int = 6) -> str:
    """A lower bound that a message tells the user to meet ("use at least X") as text whose
    number meets it when set as the value: ``value``'s shortest decimal form rounded up (toward
    plus infinity) to ``digits`` significant digits, followed by " (rounded up)" where that
    changed it (1.234567891 is "1.23457 (rounded up)", where ``:g`` shows "1.23457", still
    below it); as :func:`format_exact` shows it where it has no more digits or where the
    rounded number is beyond float range. Infinite and NaN values as ``str`` shows them."""
    return _format_bound(value, digits, decimal.ROUND_CEILING, "rounded up")


def format_at_most(value: float, digits: int = 6) -> str:
    """An upper bound that a message tells the user to stay at or below ("until it is below
    X") as text whose number is not above it: ``value``'s shortest decimal form rounded down
    (toward minus infinity) to ``digits`` significant digits, followed by " (rounded down)"
    where that changed it (2.2469167 is "2.24691 (rounded down)", where ``:g`` shows the larger
    "2.24692"); as :func:`format_exact` shows it where it has no more digits or where the
    rounded number is beyond float range. Infinite and NaN values as ``str`` shows them."""
    return _format_bound(value, digits, decimal.ROUND_FLOOR, "rounded down")


def _format_bound(value: float, digits: int, rounding: str, said: str) -> str:
    """``value`` rounded with ``rounding`` to ``digits`` significant digits, as ``:g`` shows
    it, with `` (<said>)`` after it where that is not the value (:func:`format_at_least`)."""
    value = float(value) or 0.0
    if not math.isfinite(value) or value == 0.0:
        return format_exact(value)
    exact = decimal.Decimal(repr(value))
    shown = exact.quantize(decimal.Decimal(1).scaleb(exact.adjusted() - digits + 1),
                           rounding=rounding)
    if shown == exact or not math.isfinite(float(shown)):  # 2e308: beyond float, say it exactly
        return format_exact(value)
    # ``shown`` has at most ``digits`` significant digits (10.0000 after a carry: one), so
    # ``:g`` at ``digits`` writes its float back as the same decimal
    return f"{float(shown):.{digits}g} ({said})"


def spent_decimals(budget: float | None, least: int) -> int:
    """Decimals to show an epsilon spent under ``budget`` with: at least ``least``, and as many
    as the budget's shortest decimal form has, so that a spend rounded up reads above the
    budget's exact form (:func:`format_exact`) exactly when it is above (0.0623 of a budget
    0.0625 reads "0.063" at three decimals, above the budget it stays under)."""
    if budget is None or not math.isfinite(budget):
        return least
    exponent = decimal.Decimal(repr(float(budget))).as_tuple().exponent
    return max(least, -exponent if isinstance(exponent, int) else 0)


# a budget with more decimals than this and than its significant digits (1e-300 has 300 and 1)
# has its spend shown in scientific notation: the fixed form would be a line of zeros
SPENT_FIXED_DECIMALS = 12


def format_spent(spent: float, budget: float | None, decimals: int = 4) -> str:
    """An epsilon ``spent`` (or planned) shown beside its ``budget``: rounded up as
    :func:`format_up` rounds, at ``decimals`` decimals or the budget's own
    (:func:`spent_decimals`), so it reads above the budget exactly when it is above. Where
    the budget has more decimals than :data:`SPENT_FIXED_DECIMALS` and than significant
    digits (1e-300: 300 decimals, one digit), the spend is shown in scientific notation,
    rounded up, with at least ``decimals`` decimals and as many significant digits as the
    budget has (5e-301 of 1e-300 is "5.0000e-301"): the same guarantee, as a spend at or
    under the budget is shown to a last digit no coarser than the budget's."""
    shown = spent_decimals(budget, decimals)
    if budget is None or shown <= SPENT_FIXED_DECIMALS or not math.isfinite(spent):
        return format_up(spent, shown)
    digits = len(decimal.Decimal(repr(float(budget))).as_tuple().digits)
    if shown <= digits:  # all significant (0.1234567890123456): the fixed form reads well
        return format_up(spent, shown)
    return _format_scientific(decimal.Decimal(repr(float(spent))), max(decimals, digits - 1),
                              decimal.ROUND_CEILING)


def format_against(claim: float, bounds: Sequence[float], decimals: int) -> tuple[str, list[str]]:
    """``claim`` rounded up (:func:`format_up`) and each of ``bounds`` rounded down
    (:func:`format_down`), all at the fewest decimals, at least ``decimals``, at which each
    shown bound reads above the shown claim exactly when the bound is above the claim: an
    audit's lower bound 1.00004 over a claim 1.0 reads "1.00004" over "1.00000" (at four
    decimals both read "1.0000", as if the claim were not refuted)."""
    shown = decimals
    while True:
        claim_s = format_up(claim, shown)
        bounds_s = [format_down(b, shown) for b in bounds]
        if all((decimal.Decimal(b_s) > decimal.Decimal(claim_s)) == (b > claim)
               for b, b_s in zip(bounds, bounds_s, strict=True)
               if not (math.isnan(b) or math.isnan(claim))):
            return claim_s, bounds_s
        shown += 1  # exact once ``shown`` reaches the values' own decimals: the loop ends


def format_ordered(first: float, second: float, digits: int = 6) -> tuple[str, str]:
    """``first`` and ``second`` with ``digits`` significant digits (``:g``, to nearest), or
    as many more as make the shown figures compare as the values do (below, equal, above): a
    check's message comparing two epsilons never reads "2.5 is below 2.5". Non-finite values
    and NaN as ``:g`` shows them; zero of either sign as "0"."""
    first, second = float(first) or 0.0, float(second) or 0.0  # not "-0"
    if not (math.isfinite(first) and math.isfinite(second)):
        return f"{first:.{digits}g}", f"{second:.{digits}g}"
    order = (first > second) - (first < second)
    for shown in range(digits, 18):  # 17 significant digits round-trip every float
        a, b = f"{first:.{shown}g}", f"{second:.{shown}g}"
        if (float(a) > float(b)) - (float(a) < float(b)) == order:
            return a, b
    return repr(float(first)), repr(float(second))


def _format_rounded(value: float, decimals: int, rounding: str) -> str:
    """``value``'s shortest decimal form quantized to ``decimals`` decimals with ``rounding``
    (a ``decimal`` rounding mode); infinite and NaN values as ``str`` shows them. A nonzero
    value below one unit of the last decimal keeps ``decimals`` decimals of its own leading
    digit: scientific notation, so that a small sigma or epsilon is not shown as 0 or as 1 unit.
    Zero (either sign, or a negative value rounded up to it) is shown unsigned."""
    if not math.isfinite(value):
        return str(value)
    exact = decimal.Decimal(repr(float(value)))
    if exact and abs(exact) < decimal.Decimal(1).scaleb(-decimals):
        return _format_scientific(exact, decimals, rounding)
    # every digit the quantized value has (up to 309 before the point, ``decimals`` after it)
    context = decimal.Context(prec=max(exact.adjusted(), 0) + max(decimals, 0) + 2)
    shown = exact.quantize(decimal.Decimal(1).scaleb(-decimals), rounding=rounding, context=context)
    return f"{shown.copy_abs() if not shown else shown:f}"  # not "-0.0000"


def _format_scientific(exact: decimal.Decimal, decimals: int, rounding: str) -> str:
    """``exact`` in scientific notation with ``decimals`` decimals of its leading digit, rounded
    with ``rounding``; zero as "0" with those decimals (unsigned)."""
    if not exact:
        return f"0{'.' if decimals > 0 else ''}{'0' * decimals}e+0"
    context = decimal.Context(prec=max(decimals, 0) + 2)
    shown = exact.quantize(decimal.Decimal(1).scaleb(exact.adjusted() - decimals),
                           rounding=rounding, context=context)
    # rounded up to the next power of ten (9.99999e-5 to 1.00000e-4): exact at one digit less
    shown = shown.quantize(decimal.Decimal(1).scaleb(shown.adjusted() - decimals), context=context)
    return f"{shown:e}"


def format_share_up(part: float, whole: float, decimals: int) -> str:
    """``100 * part / whole`` (a share of a budget, in percent) as text with ``decimals``
    decimals, rounded up as :func:`format_up` rounds: the quotient is taken exactly of the two
    values' shortest decimal forms (the recorded ones), so the share of an exactly spent
    budget shows exactly (2.0363 of 2.909 is "70.0", where the float share
    70.00000000000001 showed "70.1") and no share is shown below the recorded one. A ``whole``
    that is not positive (or NaN) has no share: ``"nan"``; with a non-finite ``part`` or an
    infinite ``whole`` the float quotient is shown as ``str`` shows it."""
    if not (math.isfinite(part) and math.isfinite(whole) and whole > 0):
        return str(100 * part / whole) if whole > 0 else str(math.nan)
    part_d, whole_d = decimal.Decimal(repr(float(part))), decimal.Decimal(repr(float(whole)))
    # digits enough for every one shown (a share of 1e129 over 7e-269 has 400 before the point),
    # the quotient rounded up: never below the exact share when it does not terminate
    digits = max(part_d.adjusted() - whole_d.adjusted() + 3, 0) + max(decimals, 0) + 40
    context = decimal.Context(prec=max(400, digits), rounding=decimal.ROUND_CEILING)
    exact = context.divide(context.multiply(part_d, 100), whole_d)
    shown = exact.quantize(decimal.Decimal(1).scaleb(-decimals), rounding=decimal.ROUND_CEILING,
                           context=context)
    return f"{shown.copy_abs() if not shown else shown:f}"  # not "-0.0"


def plan_epsilon(plan: Sequence[PlannedRelease], delta: float, noise_multiplier: float | None = None,
                 accountant: str = "rdp", *, prv_eps_error: float = 0.01,
                 prv_refine: bool = True) -> float:
    """Total epsilon of ``plan`` at ``delta``, with ``noise_multiplier`` filling the None entries
    (``prv_refine``: :attr:`Accountant.prv_refine`)."""
    acc = Accountant(accountant, prv_eps_error=prv_eps_error, prv_refine=prv_refine)
    releases = []
    for item in plan:
        nm = item.noise_multiplier if item.noise_multiplier is not None else noise_multiplier
        if nm is None:
            raise AccountingError(
                f"planned release {item.mechanism!r} has no noise_multiplier and none was given"
            )
        releases.append((nm, item.sample_rate, item.steps))
    return acc.epsilon_after_releases(delta, releases)


#: A calibration still above its target at this noise multiplier evaluates the largest one
#: (1e4) before climbing further: far beyond any useful training noise, and where Opacus's RDP
#: series starts to cost seconds per evaluation.
CALIBRATION_PROBE_SIGMA = 64.0


@functools.cache
def _rdp_epsilon_floor(delta: float) -> float:
    """The epsilon RDP accounting gives a release with zero RDP at every order: no noise
    multiplier gets an RDP epsilon below it at ``delta`` (about 0.0035 at delta 1e-5)."""
    orders = list(_rdp_orders())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the best order is the largest: expected here
        eps, _ = opacus_rdp_analysis().get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)),
                                                          delta=delta)
    return float(eps)


def size_error_remedy(exc: AccountingSizeError, plan: Sequence[PlannedRelease], delta: float,
                      noise_multiplier: float | None, target_epsilon: float) -> str:
    """``exc``'s message, for a plan that a discretized accountant cannot evaluate; when RDP
    (which has no such limit) also gives an epsilon above ``target_epsilon``, its remedy
    "use accountant='rdp'" cannot help, and the message says so and asks for more noise."""
    rdp = plan_epsilon(plan, delta, noise_multiplier, "rdp")
    if rdp <= target_epsilon:
        return str(exc)
    return (f"{exc.problem}; RDP accounting gives epsilon {format_spent(rdp, target_epsilon)} >"
            f" {format_exact(target_epsilon)} too, "
            "so more noise is needed")


def calibrate_noise_multiplier(target_epsilon: float, delta: float,
                               plan: Sequence[PlannedRelease], accountant: str = "rdp", *,
                               prv_eps_error: float = 0.01, rel_tol: float = 0.01,
                               max_evaluations: int = 100, prv_refine: bool = True) -> float:
    """One noise multiplier for every plan entry whose ``noise_multiplier`` is None.

    Guarantees: the returned sigma gives a total plan epsilon (at ``delta``, under the named
    accountant) that is ``<= target_epsilon`` and ``>= (1 - rel_tol) * target_epsilon``.
    Entries with a fixed noise multiplier are composed as given; ``prv_refine`` is
    :attr:`Accountant.prv_refine` (False only to continue a run ledgered without it). Raises CalibrationError when
    the fixed entries alone already exceed the target, or when no sigma in [1e-3, 1e4] works.
    Searches by bracketing then a safeguarded false-position (Illinois) step on
    log(epsilon) versus log(sigma), which falls back to bisection when it stalls. Where the
    target looks unreachable (below the smallest epsilon RDP can certify at ``delta``, RDP
    failing before PLD or PRV, or still missed at sigma :data:`CALIBRATION_PROBE_SIGMA`), the
    largest sigma is evaluated once first, so an unreachable target fails without climbing
    to it (the climb's evaluations near it are the dearest); the search itself, and so the
    returned sigma, is the same as without that look-ahead.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, int | float) \
            or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise AccountingError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    _check_kind(accountant)
    if not (0 < rel_tol < 1):
        raise AccountingError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    plan = list(plan)
    if not plan:
        raise AccountingError("plan is empty")
    for item in plan:
        if not isinstance(item, PlannedRelease):
            raise AccountingError(f"plan entries must be PlannedRelease, got {type(item).__name__}")
    if all(item.noise_multiplier is not None for item in plan):
        raise AccountingError("plan has no entry with noise_multiplier=None to calibrate")

    fixed = [item for item in plan if item.noise_multiplier is not None]
    if fixed:
        try:
            eps_fixed = plan_epsilon(fixed, delta, None, accountant, prv_eps_error=prv_eps_error,
                                     prv_refine=prv_refine)
        except AccountingSizeError as exc:
            why = size_error_remedy(exc, fixed, delta, None, target_epsilon)
            raise CalibrationError(f"entries with a fixed noise multiplier: {why}") from None
        if eps_fixed >= target_epsilon:
            raise FixedEntriesOverTargetError(
                f"entries with a fixed noise multiplier already spend epsilon"
                f" {format_spent(eps_fixed, target_epsilon)} >= target"
                f" {format_exact(target_epsilon)}; no noise multiplier can meet the target"
            )

    low_ok = (1.0 - rel_tol) * target_epsilon
    evaluations = 0

    def eps_at(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        if evaluations > max_evaluations:
            raise CalibrationError(
                f"no noise multiplier found within {max_evaluations} evaluations"
                f" (target epsilon {format_exact(target_epsilon)}, delta {format_exact(delta)})"
            )
        with warnings.catch_warnings():
            # Opacus warns when the optimal RDP order is at the edge of its alpha grid; the
            # bound is still valid (only looser), and probing extreme sigmas triggers it.
            warnings.simplefilter("ignore")
            try:
                eps = plan_epsilon(plan, delta, sigma, accountant, prv_eps_error=prv_eps_error,
                                   prv_refine=prv_refine)
            except AccountingSizeError as exc:
                raise CalibrationError(
                    f"calibrating to epsilon {format_exact(target_epsilon)} reached noise"
                    f" multiplier {sigma:.4g}, which {accountant.upper()} accounting cannot"
                    f" evaluate: {exc}"
                ) from exc
        if math.isinf(eps) and accountant != "rdp":
            # The discretized accountants compute exp(-epsilon) terms that underflow float64
            # beyond epsilon ~700 and then report inf (a safe bound, but no longer monotone in
            # sigma, so it would mislead the search).
            raise CalibrationError(
                f"calibrating to epsilon {format_exact(target_epsilon)}: {accountant.upper()}"
                f" accounting reports an infinite epsilon at noise multiplier {sigma:.4g} (its"
                " float range ends near epsilon 700); use accountant='rdp' or a smaller target")
        return eps

    sigma_min, sigma_max = 1e-3, 1e4

    def unreachable(eps_max: float) -> UnreachableTargetError:
        hint = ""
        if accountant == "prv":
            floor = format_exact(min(prv_eps_error, PRV_MIN_EPS_ERROR))
            hint = ("; a PRV epsilon includes its discretization error (at least"
                    f" {floor}), so PRV cannot certify less")
        return UnreachableTargetError(f"even noise multiplier {sigma_max:g} gives epsilon"
                                      f" {format_spent(eps_max, target_epsilon)} > target"
                                      f" {format_exact(target_epsilon)}{hint}")

    probed = False

    def refuse_if_unreachable() -> None:
        """Raise :func:`unreachable` if even ``sigma_max`` misses the target; a look-ahead
        that the search does not count (it then goes on exactly as without it)."""
        nonlocal evaluations, probed
        if probed:
            return
        probed = True
        try:
            eps_max = eps_at(sigma_max)
        except CalibrationError:
            return  # the search meets the same error where it gets there
        finally:
            evaluations -= 1
        if eps_max > target_epsilon:
            raise unreachable(eps_max)

    factor = 4.0
    hi = 1.0
    rdp_failed = False
    if accountant in ("prv", "pld"):
        # PRV and PLD are costly where epsilon is large (their grids grow with epsilon), so
        # start from the RDP calibration: their epsilon is close to and usually below RDP's,
        # so their sigma lies just below the RDP one and small steps bracket it cheaply.
        try:
            hi = calibrate_noise_multiplier(target_epsilon, delta, plan, "rdp",
                                            rel_tol=rel_tol, max_evaluations=max_evaluations)
            factor = 1.25
        except CalibrationError:
            rdp_failed = True  # RDP cannot reach the target (e.g. a tiny epsilon): from sigma 1
    # Bracket: hi has eps <= target, lo has eps > target.
    eps_hi = eps_at(hi)
    if eps_hi > target_epsilon and (
            rdp_failed or (accountant == "rdp" and target_epsilon < _rdp_epsilon_floor(delta))):
        refuse_if_unreachable()
    while eps_hi > target_epsilon:
        if hi >= sigma_max:
            raise unreachable(eps_hi)
        if hi >= CALIBRATION_PROBE_SIGMA:
            refuse_if_unreachable()
        hi = min(hi * factor, sigma_max)
        eps_hi = eps_at(hi)
    if eps_hi >= low_ok:
        return hi
    lo = hi
    eps_lo = eps_hi
    while eps_lo <= target_epsilon:
        if eps_lo >= low_ok:
            return lo
        hi, eps_hi = lo, eps_lo
        if lo <= sigma_min:
            raise CalibrationError(
                "even noise multiplier {:g} gives epsilon {} < {}; the target is too large to"
                " calibrate".format(sigma_min, *format_ordered(eps_lo, low_ok))
            )
        lo = max(lo / factor, sigma_min)
        eps_lo = eps_at(lo)

    # Invariant: eps(lo) > target >= eps(hi), eps(hi) < low_ok. Solve log eps(s) = log(goal).
    goal = math.log(target_epsilon * (1.0 - rel_tol / 2.0))

    def f(eps: float) -> float:
        return (math.log(eps) if eps > 0 else -math.inf) - goal

    x_lo, x_hi = math.log(lo), math.log(hi)
    f_lo = f(eps_lo) if math.isfinite(eps_lo) else math.inf
    f_hi = f(eps_hi)
    side = 0
    while True:
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
            if not (min(x_lo, x_hi) < x < max(x_lo, x_hi)):
                x = 0.5 * (x_lo + x_hi)
        else:
            x = 0.5 * (x_lo + x_hi)
        sigma = math.exp(x)
        eps = eps_at(sigma)
        if low_ok <= eps <= target_epsilon:
            return sigma
        fx = f(eps) if math.isfinite(eps) else math.inf
        if eps > target_epsilon:
            x_lo, f_lo = x, fx
            if side == -1 and math.isfinite(f_hi):
                f_hi /= 2.0
            side = -1
        else:
            x_hi, f_hi = x, fx
            if side == 1 and math.isfinite(f_lo):
                f_lo /= 2.0
            side = 1
