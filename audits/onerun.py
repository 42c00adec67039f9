"""One-run auditing statistics (Steinke, Nasr, Jagielski, NeurIPS 2023, "Privacy Auditing
with One (1) Training Run").

Setting: ``m`` canaries, each included in the training run independently with probability
1/2. After training, an attacker looks at the output and, for each canary, guesses "in",
"out" or abstains. Let ``r`` be the number of guesses and ``W`` the number of correct ones.
The paper's main theorem: if the training algorithm is (eps, delta)-DP with respect to each
canary, then with ``q = e^eps / (1 + e^eps)`` and ``f(v) = P[Binomial(r, q) >= v]``,

    P[W >= v]  <=  f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,

whatever the attacker does (the guesses may be any function of the output; abstentions are
free). The right-hand side is the p-value of the hypothesis "(eps, delta)-DP" given ``v``
correct of ``r`` guesses; :func:`one_run_lower_bound` returns the largest eps it rejects at
``1 - confidence``. With ``delta = 0`` that bound has the closed form
``logit(ClopperPearsonLower(v, r, 1 - confidence))``; for ``v = r`` (every guess right),
``logit(alpha^(1/r))`` with ``alpha = 1 - confidence``.

The guesses here come from two score thresholds chosen on a *calibration* part of the
canaries (whose membership the attacker may then look at) and applied to the disjoint
*evaluation* part, which alone enters the bound: conditional on the calibration canaries the
run is (eps, delta)-DP with respect to each evaluation canary, so the theorem applies with
``m`` = the evaluation count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from audits.arguments import check_count, check_open_fraction, check_seed
from audits.options import API_AUDIT_OPTIONS
from privacy.errors import ToolkitError

__all__ = [
    "GuessRule",
    "OneRunAuditError",
    "OneRunOutcome",
    "calibrate_guess_rule",
    "certifiable_maximum",
    "one_run_lower_bound",
    "one_run_p_value",
    "pure_dp_lower_bound",
    "split_indices",
    "split_one_run_audit",
]

#: Largest epsilon the bisection looks at; a bound this large means "no finite evidence limit".
EPSILON_SEARCH_CAP = 64.0


class OneRunAuditError(ToolkitError, ValueError):
    """Bad input to the one-run statistics; the message names it."""


def _check_counts(m: int, r: int, v: int, m_name: str = "m") -> tuple[int, int, int]:
    """``(m, r, v)`` as Python ints (numpy's int32 or uint64 would overflow or wrap in
    ``r - v + 1``), or OneRunAuditError naming the one that is wrong."""
    for name, value in ((m_name, m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise OneRunAuditError(f"{name} must be an integer, got {value!r:.80}")
    check_count(m, m_name, OneRunAuditError)  # scipy refuses ints beyond int64
    if not 0 <= v <= r <= m:
        raise OneRunAuditError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    return int(m), int(r), int(v)


def _check_level(delta: float, confidence: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        raise OneRunAuditError(f"delta must be in [0, 1), got {delta!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
            or not 0 < confidence < 1:
        raise OneRunAuditError(f"confidence must be in (0, 1), got {confidence!r}")
    return 1.0 - float(confidence)


#: Up to this many guesses the delta term is maximised over every ``i`` at once (one array of
#: this length at most); beyond, over a window around the maximiser found by bisection.
DIRECT_TERMS = 1 << 16
#: Half-width of that window: the maximiser of the computed terms, where rounding makes it
#: differ from the exact one, lies within it.
WINDOW = 1 << 10


def _gap_terms(i: np.ndarray, r: int, v: int, q: float, tail: float) -> np.ndarray:
    """``(f(v - i) - f(v)) / i`` for the given ``i``, computed as tail differences."""
    # f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v]
    return (stats.binom.sf(v - i - 1, r, q) - tail) / i


def _window_mass(r: int, v: int, q: float, i: int) -> float:
    """P[v - i <= Binomial(r, q) < v], from the cdf or the survival function, whichever side
    of the distribution the window lies on (no cancellation against a value near 1)."""
    if float(stats.binom.cdf(v - 1, r, q)) <= 0.5:
        return float(stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q))
    return float(stats.binom.sf(v - i - 1, r, q) - stats.binom.sf(v - 1, r, q))


def _max_gap_term(r: int, v: int, q: float, tail: float) -> float:
    """``max_{1 <= i <= v} (f(v - i) - f(v)) / i`` in memory independent of ``v``.

    The term for ``i`` is the mean of the pmf at ``v - 1, ..., v - i``. The pmf is unimodal,
    so these means rise while the next pmf value exceeds the mean and fall from the first ``i``
    where it does not: bisection on that condition finds the maximiser, and the terms are then
    evaluated, as for small ``v``, on a window around it."""
    if v <= DIRECT_TERMS:
        return float(np.max(_gap_terms(np.arange(1, v + 1), r, v, q, tail)))
    # Means over pmf values at or above the mode only rise: start past them (a margin for the
    # mode's rounding), where a pmf value underflowed to 0 would stop the rise too early.
    # Beyond the mode the means hold the mode's mass, so an underflowed value is below them,
    # as the exact one is.
    mode = math.floor((r + 1) * q)
    lo, hi = min(v, max(1, v - 1 - mode - 2 - int(r * 1e-14))), v
    while lo < hi:
        mid = (lo + hi) // 2
        if float(stats.binom.pmf(v - mid - 1, r, q)) * mid > _window_mass(r, v, q, mid):
            lo = mid + 1
        else:
            hi = mid
    first, last = max(1, lo - WINDOW), min(v, lo + WINDOW)
    return float(np.max(_gap_terms(np.arange(first, last + 1, dtype=np.int64), r, v, q, tail)))


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[W >= v] for an (epsilon, delta)-DP run (the theorem above), capped at 1.
    OneRunAuditError unless ``epsilon`` is a number >= 0 and ``delta`` one in [0, 1). Memory
    does not grow with ``v``; up to :data:`DIRECT_TERMS` guesses every term is evaluated."""
    m, r, v = _check_counts(m, r, v)
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon >= 0:
        raise OneRunAuditError(f"epsilon must be a number >= 0, got {epsilon!r:.80}")
    _check_level(delta, 0.5)  # a negative delta lowered the p-value below the pure-DP tail
    try:
        q = float(special.expit(float(epsilon)))
    except OverflowError:  # an int beyond float's range: q is 1 there
        q = 1.0
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    return min(1.0, tail + 2.0 * m * delta * _max_gap_term(r, v, q, tail))


def pure_dp_lower_bound(r: int, v: int, confidence: float = 0.95) -> float:
    """The delta = 0 bound in closed form: ``logit`` of the Clopper-Pearson lower bound, >= 0."""
    _, r, v = _check_counts(r, r, v, "r")
    alpha = _check_level(0.0, confidence)
    if v == 0:
        return 0.0
    p_lo = float(stats.beta.ppf(alpha, v, r - v + 1))
    if p_lo <= 0.5:
        return 0.0
    return min(EPSILON_SEARCH_CAP, float(special.logit(p_lo)))


def one_run_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon whose (epsilon, delta)-DP hypothesis is rejected at ``1 - confidence``.

    Guarantee: if the run is (eps, delta)-DP with respect to each of the ``m`` canaries, the
    returned value exceeds eps with probability at most ``1 - confidence``. 0 when nothing is
    rejected; the p-value at the returned epsilon is ``<= 1 - confidence`` (bisection keeps
    that invariant, so no monotonicity is assumed).
    """
    m, r, v = _check_counts(m, r, v)
    alpha = _check_level(delta, confidence)
    if delta == 0:
        return pure_dp_lower_bound(r, v, confidence)
    # the delta term only adds to the p-value: the pure bound caps the search
    hi = pure_dp_lower_bound(r, v, confidence)
    if hi == 0.0 or one_run_p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo = 0.0
    if one_run_p_value(m, r, v, hi, delta) <= alpha:
        return hi
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def certifiable_maximum(m: int, delta: float, confidence: float = 0.95,
                        guesses: int | None = None) -> float:
    """The bound a perfect attacker gets: ``guesses`` (default all ``m``) guesses, all right.

    This is the most the audit design can ever certify; a claim at or above it cannot be
    refuted by any outcome.
    """
    r = m if guesses is None else guesses
    return one_run_lower_bound(m, r, r, delta, confidence)


@dataclass(frozen=True)
class GuessRule:
    """Guess "in" when ``score >= threshold_in``, "out" when ``score <= threshold_out``, else abstain."""

    threshold_in: float
    threshold_out: float

    def __post_init__(self) -> None:
        if not self.threshold_in > self.threshold_out:
            raise OneRunAuditError(f"threshold_in {self.threshold_in} must exceed threshold_out"
                                   f" {self.threshold_out}")

    def counts(self, scores: np.ndarray, member: np.ndarray) -> tuple[int, int]:
        """(guesses, correct guesses) of this rule on ``scores`` with true ``member``ship."""
        guess_in = scores >= self.threshold_in
        guess_out = scores <= self.threshold_out
        r = int(guess_in.sum() + guess_out.sum())
        v = int((guess_in & member).sum() + (guess_out & ~member).sum())
        return r, v


@dataclass(frozen=True)
class OneRunOutcome:
    """The calibrated rule, its counts on the evaluation canaries and the resulting bound."""

    rule: GuessRule
    calibration_size: int
    evaluation_size: int
    guesses: int
    correct: int
    lower_bound: float
    certifiable_max: float
    calibration_pure_bound: float


def _count_grid(n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    geo = np.unique(np.round(np.geomspace(1, n, 48)).astype(np.int64))
    lin = np.round(np.linspace(0, n, 41)).astype(np.int64)
    return np.unique(np.concatenate([[0], geo, lin]))


def _scores_and_member(scores: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and bool membership, or OneRunAuditError naming the argument (numpy
    would read strings as numbers and any non-empty string as a member)."""
    arrays = []
    for name, value in (("scores", scores), ("member", member)):
        try:
            arrays.append(np.asarray(value))
        except (TypeError, ValueError):  # a ragged nesting
            raise OneRunAuditError(f"{name} must be a 1-D array, got {value!r:.80}") from None
    s, mem = arrays
    if s.dtype.kind not in "iuf":
        raise OneRunAuditError(f"scores must be an array of real numbers, got {scores!r:.80}")
    if mem.dtype.kind != "b" and not (mem.dtype.kind in "iu" and np.isin(mem, (0, 1)).all()):
        raise OneRunAuditError(f"member must be an array of bools (or 0/1), got {member!r:.80}")
    if s.ndim != 1 or s.shape != mem.shape:
        raise OneRunAuditError("scores and member must be 1-D arrays of equal length")
    return s.astype(np.float64), mem.astype(bool)


def calibrate_guess_rule(scores: np.ndarray, member: np.ndarray,
                         confidence: float = 0.95) -> tuple[GuessRule, float]:
    """The thresholds with the best delta = 0 bound on these (calibration) canaries.

    Candidates: "top k in" and "bottom k out" for k on a grid (geometric and linear), and for
    every out-threshold the rule that guesses everything above it "in". Returns the rule and
    its (optimistic, since chosen here) calibration bound.
    """
    s, mem = _scores_and_member(scores, member)
    if s.size == 0:
        raise OneRunAuditError("scores and member must be non-empty 1-D arrays of equal length")
    if not np.isfinite(s).all():
        raise OneRunAuditError("scores contain NaN or infinite values")
    _check_level(0.0, confidence)
    alpha = 1.0 - confidence
    desc = np.sort(s)[::-1]
    asc = np.sort(s)
    grid = _count_grid(s.size)
    t_in = np.array([math.inf if k == 0 else desc[k - 1] for k in grid])
    t_out = np.array([-math.inf if k == 0 else asc[k - 1] for k in grid])
    complete = np.nextafter(t_out[np.isfinite(t_out)], math.inf)
    cand_in = np.unique(np.concatenate([t_in, complete]))
    cand_out = np.unique(t_out)
    mem_sorted, non_sorted = np.sort(s[mem]), np.sort(s[~mem])
    # members with score >= t, non-members with score >= t, and the same for <= t
    in_mem = mem_sorted.size - np.searchsorted(mem_sorted, cand_in, side="left")
    in_non = non_sorted.size - np.searchsorted(non_sorted, cand_in, side="left")
    out_mem = np.searchsorted(mem_sorted, cand_out, side="right")
    out_non = np.searchsorted(non_sorted, cand_out, side="right")
    r = (in_mem + in_non)[:, None] + (out_mem + out_non)[None, :]
    v = in_mem[:, None] + out_non[None, :]
    valid = (cand_in[:, None] > cand_out[None, :]) & (v > 0)
    p_lo = np.zeros(r.shape)
    p_lo[valid] = stats.beta.ppf(alpha, v[valid], r[valid] - v[valid] + 1)
    with np.errstate(divide="ignore"):
        score = np.where(p_lo > 0.5, special.logit(np.clip(p_lo, 0.5, 1 - 1e-300)), 0.0)
    score[~valid] = -1.0
    a, b = np.unravel_index(int(np.argmax(score)), score.shape)
    best_rule = GuessRule(float(cand_in[a]), float(cand_out[b])) if score[a, b] >= 0 \
        else GuessRule(math.inf, -math.inf)
    best = float(max(score[a, b], 0.0))
    # complete rules (no abstention) split at every gap: "out" up to the midpoint, "in" above
    order = np.argsort(s, kind="stable")
    sorted_s, sorted_mem = s[order], mem[order]
    out_correct = np.concatenate([[0], np.cumsum(~sorted_mem)])
    in_correct = np.concatenate([np.cumsum(sorted_mem[::-1])[::-1], [0]])
    v_split = out_correct + in_correct  # split j: the j lowest out, the rest in
    gaps = np.concatenate([[True], sorted_s[1:] > sorted_s[:-1], [True]])
    v_split = np.where(gaps, v_split, -1)
    j = int(np.argmax(v_split))
    pure = pure_dp_lower_bound(int(s.size), int(v_split[j]), confidence)
    if pure > best:
        biggest = float(np.finfo(np.float64).max)
        if j == 0:  # everything in
            best_rule = GuessRule(-biggest, -math.inf)
        elif j == s.size:  # everything out
            best_rule = GuessRule(math.inf, biggest)
        else:
            mid = 0.5 * (float(sorted_s[j - 1]) + float(sorted_s[j]))
            best_rule = GuessRule(math.nextafter(mid, math.inf), mid)
        best = pure
    return best_rule, best


def split_indices(size: int, calibration_fraction: float,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The calibration and evaluation indices :func:`split_one_run_audit` uses for ``size``
    canaries (a random permutation from ``seed``, the first ``round(fraction * size)``
    calibrate); both parts non-empty, else :class:`OneRunAuditError`."""
    check_open_fraction(calibration_fraction, "calibration_fraction", OneRunAuditError)
    check_seed(seed, OneRunAuditError, flag=API_AUDIT_OPTIONS["seed"])
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise OneRunAuditError(f"size must be an int >= 0, got {size!r:.80}")
    try:
        perm = np.random.default_rng(seed).permutation(size)
    except (MemoryError, ValueError) as err:  # numpy's "array is too big" is a ValueError
        raise OneRunAuditError(f"size {size} is too large: its permutation cannot be"
                               f" allocated ({err})") from None
    if perm.size != size:  # numpy gives an empty permutation for sizes near 2**63
        raise OneRunAuditError(f"size {size} is too large: numpy permuted {perm.size} items")
    n_cal = int(round(calibration_fraction * size))
    cal, ev = perm[:n_cal], perm[n_cal:]
    if n_cal == 0 or ev.size == 0:
        raise OneRunAuditError(f"{size} canaries cannot be split into calibration and"
                               f" evaluation parts at fraction {calibration_fraction}")
    return cal, ev


def split_one_run_audit(scores: np.ndarray, member: np.ndarray, delta: float,
                        confidence: float = 0.95, calibration_fraction: float = 0.2,
                        seed: int = 0) -> OneRunOutcome:
    """Choose the guess rule on a random calibration part, bound epsilon on the rest.

    Guarantee: the rule depends on the calibration canaries only, so :func:`one_run_lower_bound`
    on the evaluation canaries holds at ``confidence`` with ``m`` = the evaluation count; the
    certifiable maximum is the bound with every evaluation canary guessed right.
    """
    s, mem = _scores_and_member(scores, member)
    cal, ev = split_indices(s.size, calibration_fraction, seed)
    n_cal = cal.size
    rule, cal_bound = calibrate_guess_rule(s[cal], mem[cal], confidence)
    r, v = rule.counts(s[ev], mem[ev])
    m = int(ev.size)
    return OneRunOutcome(
        rule=rule, calibration_size=int(n_cal), evaluation_size=m, guesses=r, correct=v,
        lower_bound=one_run_lower_bound(m, r, v, delta, confidence),
        certifiable_max=certifiable_maximum(m, delta, confidence),
        calibration_pure_bound=cal_bound,
    )
