"""One-run audit statistics (Steinke-Nasr-Jagielski 2023): p-value, bound, certifiable maximum."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from audits.onerun import (
    GuessRule,
    OneRunAuditError,
    calibrate_guess_rule,
    certifiable_maximum,
    one_run_lower_bound,
    one_run_p_value,
    pure_dp_lower_bound,
    split_indices,
    split_one_run_audit,
)


@pytest.mark.parametrize("m", [10, 300, 1000, 20_000])
def test_certifiable_maximum_matches_the_closed_form_for_all_correct_guesses(m):
    alpha = 0.05
    closed = math.log(alpha ** (1 / m) / (1 - alpha ** (1 / m)))  # logit(alpha^(1/m))
    assert certifiable_maximum(m, 0.0, 0.95) == pytest.approx(closed, rel=1e-9)
    # with delta > 0 the p-value only grows: the bound can only shrink
    with_delta = certifiable_maximum(m, 1e-5, 0.95)
    assert with_delta <= closed + 1e-9
    assert one_run_p_value(m, m, m, with_delta, 1e-5) <= alpha + 1e-12


def test_certifiable_maximum_is_monotone_in_the_number_of_guesses():
    m = 20_000
    values = [certifiable_maximum(m, 1e-5, 0.95, guesses=r)
              for r in (1, 10, 100, 1000, 5000, 10_000, 16_000, 20_000)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[0] == 0.0 and values[-1] > 8.0  # the default white-box design beats 8
    pure = [certifiable_maximum(m_, 0.0) for m_ in (100, 300, 3000, 30_000)]
    assert all(b > a for a, b in zip(pure, pure[1:], strict=False))
    # 300 canaries (the canary audit's size) cannot certify epsilon 8
    assert certifiable_maximum(300, 1e-5) < 5.0


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    m, r, v, eps = 1000, 200, 150, 1.0
    q = special.expit(eps)
    from scipy import stats
    assert one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q))
    assert one_run_p_value(m, r, v, eps, 1e-3) > one_run_p_value(m, r, v, eps, 0.0)
    assert one_run_p_value(m, r, 0, eps, 1e-3) == 1.0


def test_pure_bound_is_the_logit_of_the_clopper_pearson_lower_bound():
    from audits.canary import clopper_pearson_lower
    r, v = 500, 450
    expected = special.logit(clopper_pearson_lower(v, r, 0.05))
    assert pure_dp_lower_bound(r, v, 0.95) == pytest.approx(expected, rel=1e-9)
    assert pure_dp_lower_bound(100, 40) == 0.0  # below chance: no evidence
    assert pure_dp_lower_bound(0, 0) == 0.0


def test_bound_holds_for_randomized_response_at_its_confidence():
    # eps-DP randomized response per canary: the attacker sees the true bit w.p. e^eps/(1+e^eps)
    eps, m, trials = 1.0, 500, 400
    rng = np.random.default_rng(0)
    q = special.expit(eps)
    exceed = 0
    for _ in range(trials):
        correct = int((rng.random(m) < q).sum())  # a perfect attacker on RR output
        exceed += one_run_lower_bound(m, m, correct, 0.0, 0.95) > eps
    assert exceed / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    # and it is not vacuous: the typical bound is well above zero
    assert one_run_lower_bound(m, m, int(round(q * m)), 0.0) > 0.6


def test_synthetic_perfect_and_random_guessers():
    rng = np.random.default_rng(1)
    m = 5000
    member = rng.random(m) < 0.5
    perfect = np.where(member, 1.0 + rng.random(m), 0.0)
    out = split_one_run_audit(perfect, member, 1e-5, 0.95, calibration_fraction=0.2, seed=0)
    assert out.evaluation_size == 4000 and out.guesses == out.correct == 4000
    assert out.lower_bound == pytest.approx(out.certifiable_max)
    assert out.certifiable_max == pytest.approx(certifiable_maximum(4000, 1e-5))
    bounds = []
    for seed in range(20):
        scores = rng.normal(size=m)  # carries no information about membership
        bounds.append(split_one_run_audit(scores, member, 1e-5, seed=seed).lower_bound)
    assert sum(b > 0 for b in bounds) <= 3 and max(bounds) < 1.0


def test_calibrated_rule_prefers_confident_guesses_on_a_noisy_signal():
    rng = np.random.default_rng(2)
    member = rng.random(4000) < 0.5
    scores = rng.normal(size=4000) + 3.0 * member
    rule, cal = calibrate_guess_rule(scores, member)
    r, v = rule.counts(scores, member)
    assert 0 < r < 4000 and v / r > 0.95 and cal > 1.0


def test_argument_errors():
    with pytest.raises(OneRunAuditError, match="0 <= v <= r <= m"):
        one_run_p_value(10, 11, 3, 1.0, 0.0)
    with pytest.raises(OneRunAuditError, match="delta"):
        one_run_lower_bound(10, 10, 10, 1.5)
    with pytest.raises(OneRunAuditError, match="confidence"):
        certifiable_maximum(10, 0.0, confidence=1.0)
    with pytest.raises(OneRunAuditError, match="must exceed"):
        GuessRule(0.0, 0.0)
    with pytest.raises(OneRunAuditError, match="NaN"):
        calibrate_guess_rule(np.array([0.0, np.nan]), np.array([True, False]))
    with pytest.raises(OneRunAuditError, match="cannot be split"):
        split_one_run_audit(np.zeros(2), np.array([True, False]), 0.0, calibration_fraction=0.1)


def test_wrong_split_arguments_are_one_run_audit_errors_naming_them():
    """numpy's TypeError/ValueError (SeedSequence, 'expected non-negative integer') or a '<'
    TypeError came out of the split before."""
    scores, member = np.random.default_rng(0).normal(size=100), np.arange(100) % 2 == 0
    for seed in ("0", None, 1.5, -1, 2**64):
        with pytest.raises(OneRunAuditError, match="^seed must be an integer"):
            split_one_run_audit(scores, member, 1e-5, seed=seed)
    for fraction in ("0.2", None, math.inf):
        with pytest.raises(OneRunAuditError, match="^calibration_fraction must be in"):
            split_one_run_audit(scores, member, 1e-5, calibration_fraction=fraction)


def test_a_bad_seed_names_its_argument():
    """As the other audits' seed errors name their flag or argument."""
    with pytest.raises(OneRunAuditError, match=r"\(the seed= argument\), got -1$"):
        split_indices(10, 0.5, seed=-1)


def test_one_run_p_value_refuses_a_delta_outside_0_1_and_a_non_number_epsilon():
    """delta was not checked: a negative one gave a p-value below the pure-DP tail (0.032
    for 0.065 here, evidence the run does not give), a str one a TypeError; a str epsilon
    raised a '>=' TypeError."""
    for delta in (-1e-3, 1.0, "1e-5", None):
        with pytest.raises(OneRunAuditError, match="^delta must be in"):
            one_run_p_value(100, 20, 18, 1.0, delta)
    for epsilon in ("1", None, math.nan, True):
        with pytest.raises(OneRunAuditError, match="^epsilon must be a number"):
            one_run_p_value(100, 20, 18, epsilon, 1e-5)


def test_counts_beyond_int64_are_one_run_audit_errors_naming_them():
    """Python ints beyond int64 (1e30 canaries) raised scipy's "ufunc '_beta_ppf' not
    supported" TypeError; int64's largest count still works."""
    big = 10**30
    for call, name in ((lambda: pure_dp_lower_bound(big, big), "r"),
                       (lambda: certifiable_maximum(big, 1e-5), "m"),
                       (lambda: one_run_lower_bound(big, 10, 10, 0.0), "m"),
                       (lambda: one_run_p_value(big, 10, 10, 1.0, 1e-5), "m"),
                       (lambda: pure_dp_lower_bound(np.uint64(2**64 - 1), 3), "r")):
        with pytest.raises(OneRunAuditError, match=f"^{name} must be an integer in \\[0, 2\\*\\*63\\)"):
            call()
    assert pure_dp_lower_bound(2**63 - 1, 2**63 - 1) == 64.0


def test_scores_and_member_that_are_not_numbers_and_bools_are_one_run_audit_errors():
    """A str scores raised numpy's ValueError ('could not convert string to float'), a complex
    one a TypeError; str scores such as '1.5' were read as numbers and str or fractional
    member values ('no', 0.3) as members."""
    scores, member = np.random.default_rng(0).normal(size=20), np.arange(20) % 2 == 0
    for call in (calibrate_guess_rule, lambda s, m: split_one_run_audit(s, m, 1e-5)):
        for bad in ("abc", [1, "a"] * 10, ["1.5"] * 20, [1 + 2j] * 20, None):
            with pytest.raises(OneRunAuditError, match="^scores must be an array of real numbers"):
                call(bad, member)
        with pytest.raises(OneRunAuditError, match="^scores must be a 1-D array"):
            call([[1.0, 2.0], [3.0]], member)
        for bad in (["no"] * 20, [0.3] * 20, np.arange(20) % 3):
            with pytest.raises(OneRunAuditError, match=r"^member must be an array of bools \(or 0/1\)"):
                call(scores, bad)
        assert call(list(scores), list(member.astype(int))) == call(scores, member)


def test_ints_beyond_floats_range_are_taken_or_refused_not_overflowed():
    """An int epsilon of 1e30 raised scipy's "ufunc 'expit' not supported" TypeError (q is 1
    there: the p-value of a run that is no evidence against it); an int calibration fraction
    beyond float's range math's OverflowError."""
    assert one_run_p_value(22, 9, 5, 10**30, 0.5) == 1.0
    assert one_run_p_value(22, 9, 5, 10**400, 0.0) == one_run_p_value(22, 9, 5, 1e30, 0.0) == 1.0
    scores, member = np.random.default_rng(0).normal(size=100), np.arange(100) % 2 == 0
    with pytest.raises(OneRunAuditError, match="^calibration_fraction must be in"):
        split_one_run_audit(scores, member, 1e-5, calibration_fraction=10**400)


def _p_value_every_term(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The theorem's p-value with the delta term maximised over every i in one array (the
    definition; memory linear in v)."""
    from scipy import stats

    q = float(special.expit(float(epsilon)))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    gaps = stats.binom.sf(v - i - 1, r, q) - tail
    return min(1.0, tail + 2.0 * m * delta * float(np.max(gaps / i)))


def test_p_value_matches_every_term_maximisation_on_a_grid():
    """Beyond DIRECT_TERMS guesses the delta term is maximised on a window found by bisection;
    it gives the maximisation over every i (465 cases at r up to 400,000 gave bit-identical
    values; here a sample, both sides of the mode, tails that underflow and q near 1)."""
    from audits.onerun import DIRECT_TERMS

    rng = np.random.default_rng(7)
    cases = [(75_000, 70_000, 69_300, 0.05, 1e-10),  # the window's terms underflow near v
             (70_000, 70_000, 70_000, 3.0, 1e-5), (90_000, 80_000, 66_000, 12.0, 0.1),
             (80_000, 80_000, 40_100, 0.0, 1e-6), (70_000, 70_000, 65_537, 0.2, 0.5)]
    for _ in range(10):
        r = int(rng.integers(DIRECT_TERMS + 1, 120_000))
        v = int(rng.integers(DIRECT_TERMS + 1, r + 1))
        cases.append((int(r * rng.uniform(1, 3)), r, v, float(rng.uniform(0, 4)),
                      float(10 ** rng.uniform(-12, -1))))
    cases += [(300, 200, v, eps, 1e-5) for v in (1, 100, 150, 200) for eps in (0.0, 1.0, 5.0)]
    for m, r, v, eps, delta in cases:
        expected = _p_value_every_term(m, r, v, eps, delta)
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-12,
                                                                      abs=0.0), (m, r, v, eps)


def test_p_value_memory_does_not_grow_with_the_number_of_correct_guesses():
    """np.arange(1, v + 1) made memory linear in v: 2 million correct guesses took tens of
    MB, 10**15 could not be allocated (MemoryError)."""
    import tracemalloc

    tracemalloc.start()
    try:
        p = one_run_p_value(2_000_000, 2_000_000, 1_200_000, 0.3, 1e-5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0 < p < 1 and peak < 2 * 2**20
    big = one_run_p_value(10**15, 10**15, 6 * 10**14, 0.3, 1e-5)
    assert 0 < big < 1
    r, v = 10**12, 10**12 // 2 + 10**9
    lower = one_run_lower_bound(r, r, v, 1e-5)
    assert 0 < lower <= pure_dp_lower_bound(r, v)
    assert one_run_p_value(r, r, v, lower, 1e-5) <= 0.05


def test_numpy_integer_counts_are_taken_as_python_ints():
    """pure_dp_lower_bound(2**62, np.int32(3)) raised numpy's OverflowError ('Python integer
    ... out of bounds for int32') from r - v + 1; numpy integers are counts like ints."""
    assert pure_dp_lower_bound(2**62, np.int32(3)) == pure_dp_lower_bound(2**62, 3) == 0.0
    assert pure_dp_lower_bound(np.int64(2**40), np.uint64(2**31)) \
        == pure_dp_lower_bound(2**40, 2**31)
    assert one_run_lower_bound(np.uint64(100), np.uint64(90), np.uint64(80), 1e-5) \
        == one_run_lower_bound(100, 90, 80, 1e-5)
    assert one_run_p_value(np.int64(2**41), 2**40, np.int16(7), 1.0, 1e-5) \
        == one_run_p_value(2**41, 2**40, 7, 1.0, 1e-5)


@pytest.mark.parametrize("size", [2**62, 2**63 - 2, 2**63 - 1])
def test_split_indices_of_a_size_numpy_cannot_permute_is_a_one_run_audit_error(size):
    """numpy's "array is too big" ValueError came through, and near 2**63 numpy permuted
    nothing (an empty array): the audit then said the canaries "cannot be split"."""
    from audits.onerun import split_indices

    with pytest.raises(OneRunAuditError, match=f"^size {size} is too large"):
        split_indices(size, 0.5)
