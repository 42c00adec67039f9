"""Accountant equals Opacus; budgets; calibration lands within 1% of the target."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accounting import (
    ACCOUNTANT_KINDS,
    ACCOUNTANT_REGISTRY,
    PLD_VALUE_DISCRETIZATION,
    PRV_MIN_EPS_ERROR,
    RDP_EXTRA_ORDERS,
    Accountant,
    AccountingError,
    BudgetExceededError,
    CalibrationError,
    MechanismRecord,
    PlannedRelease,
    PrivacyBudget,
    calibrate_noise_multiplier,
    plan_epsilon,
    prv_refined_eps_error,
    register_accountant,
)

DELTA = 1e-5


def test_rdp_epsilon_equals_opacus_for_the_same_history():
    ours = Accountant("rdp")
    theirs = RDPAccountant()
    ours.record(3.0, 1.0)  # summary release
    theirs.step(noise_multiplier=3.0, sample_rate=1.0)
    for _ in range(40):  # DP-SGD steps recorded one at a time in Opacus
        theirs.step(noise_multiplier=1.1, sample_rate=0.05)
    ours.record(1.1, 0.05, steps=25)  # ... and in two chunks here
    ours.record(1.1, 0.05, steps=15)
    ours.record(8.0, 1.0)  # lambda release
    theirs.step(noise_multiplier=8.0, sample_rate=1.0)
    assert ours.history == theirs.history == [(3.0, 1.0, 1), (1.1, 0.05, 40), (8.0, 1.0, 1)]
    for delta in (1e-5, 1e-3):
        assert ours.epsilon(delta) == theirs.get_epsilon(delta)
    assert ours.total_steps == 42


def test_prv_epsilon_equals_opacus_prv():
    ours = Accountant("prv")
    theirs = PRVAccountant()
    for _ in range(20):
        theirs.step(noise_multiplier=1.0, sample_rate=0.1)
    ours.record(1.0, 0.1, steps=20)
    assert ours.epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-12)
    # PRV is tighter than RDP for the same history
    rdp = Accountant("rdp")
    rdp.record(1.0, 0.1, steps=20)
    assert ours.epsilon(DELTA) < rdp.epsilon(DELTA)


def _dp_accounting_pld(history, delta, discretization=1e-4):
    """dp_accounting's own PLD accountant (pessimistic: an upper bound on the true epsilon)."""
    import dp_accounting
    from dp_accounting import pld

    acc = pld.PLDAccountant(value_discretization_interval=discretization)
    for nm, q, steps in history:
        event = dp_accounting.GaussianDpEvent(nm)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(("history", "slack"), [
    ([(10_000.0, 1.0, 1)], 1.1 * PRV_MIN_EPS_ERROR), ([(1_000.0, 1.0, 1)], 1.1 * PRV_MIN_EPS_ERROR),
    ([(100.0, 1.0, 1)], 1.1 * PRV_MIN_EPS_ERROR), ([(25.0, 1.0, 1)], 1.1 * PRV_MIN_EPS_ERROR),
    ([(100.0, 0.1, 100)], 1e-3), ([(100.0, 0.01, 1000)], 1e-3),
])
def test_prv_at_large_noise_is_within_its_error_of_pld_and_never_below_it(history, slack):
    """PRV added its absolute eps_error 0.01 to every epsilon: 0.00999 at noise 10,000 (RDP
    0.0035, the truth ~0.0001), so PRV refused every budget below 0.01. Now its error is 0.5%
    of the estimate, at least PRV_MIN_EPS_ERROR (more where the grid cap binds: many steps):
    never below dp_accounting's pessimistic PLD (an upper bound on the true epsilon), within
    2% + slack of it, and at most RDP + slack."""
    prv = Accountant("prv")
    rdp = Accountant("rdp")
    for release in history:
        prv.record(*release)
        rdp.record(*release)
    eps = prv.epsilon(DELTA)
    pld = _dp_accounting_pld(history, DELTA)
    assert pld <= eps <= 1.02 * pld + slack
    assert eps <= rdp.epsilon(DELTA) + slack


def test_prv_refined_epsilon_is_opacus_bound_at_the_refined_error():
    """Where the refinement applies, the epsilon is Opacus's PRVAccountant upper bound at the
    smaller eps_error (the same proven bound, on a finer grid), below Opacus's default."""
    history = [(100.0, 1.0, 1)]
    theirs = PRVAccountant()
    theirs.history = list(history)
    coarse = theirs.get_epsilon(DELTA)  # eps_error 0.01
    refined = prv_refined_eps_error(coarse - 0.01, 0.01, 2_000)
    assert refined == pytest.approx(0.005 * (coarse - 0.01))  # 0.5% of the estimate
    ours = Accountant("prv")
    ours.record(*history[0])
    assert ours.epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA, eps_error=refined),
                                                rel=1e-12)
    assert ours.epsilon(DELTA) < coarse - 0.009
    # a large estimate keeps the configured error (nothing to gain), so does a huge grid
    assert prv_refined_eps_error(2.0, 0.01, 1000) is None
    assert prv_refined_eps_error(0.01, 0.01, 300_000) is None
    assert prv_refined_eps_error(0.01, 0.01, 100_000) == pytest.approx(0.002)
    assert prv_refined_eps_error(0.5, 0.01, 1000) == pytest.approx(0.0025)


@pytest.mark.parametrize("eps_error", [0.01, 0.0013, 0.5])
def test_prv_bound_equals_opacus_bit_for_bit_at_any_eps_error(eps_error):
    """Each PRV pass (its domain sized once per history) is Opacus's PRVAccountant bound
    exactly, also where eps_error exceeds the RDP part of the domain size."""
    from privacy.accounting import _prv_upper_bound

    for history in ([(1.0, 0.01, 1000)], [(5.3, 0.01, 1000), (100.0, 1.0, 1)],
                    [(10_000.0, 1.0, 1)]):
        theirs = PRVAccountant()
        theirs.history = list(history)
        expected = theirs.get_epsilon(DELTA, eps_error=eps_error)
        assert _prv_upper_bound(tuple(history), DELTA, eps_error)[0] == expected


#: accountant_params of PRV ledger entries written before the refining pass existed
PRV_PARAMS_BEFORE_REFINEMENT = {"name": "prv", "library": "opacus", "eps_error": 0.01,
                                "delta_error": "delta/1000"}


def test_an_accountant_reproducing_prv_parameters_recorded_before_refinement_uses_one_pass():
    """Parameters without refined_eps_error give an accountant that computes Opacus's single
    pass (what those ledgers recorded) and says so; parameters no accountant has give None."""
    history = [(100.0, 1.0, 1), (4.0, 0.01, 300)]
    old = Accountant.reproducing(PRV_PARAMS_BEFORE_REFINEMENT, "prv")
    assert old is not None and not old.prv_refine
    assert old.parameters == PRV_PARAMS_BEFORE_REFINEMENT
    theirs = PRVAccountant()
    theirs.history = list(history)
    for nm, q, steps in history:
        old.record(nm, q, steps)
    assert old.epsilon(DELTA) == theirs.get_epsilon(DELTA, eps_error=0.01)  # exactly
    today = Accountant("prv")
    for nm, q, steps in history:
        today.record(nm, q, steps)
    assert today.epsilon(DELTA) < old.epsilon(DELTA)
    assert Accountant.reproducing(today.parameters, "prv").prv_refine
    assert Accountant.reproducing({**PRV_PARAMS_BEFORE_REFINEMENT, "eps_error": 0.02}, "prv") is None
    assert Accountant.reproducing(PRV_PARAMS_BEFORE_REFINEMENT, "rdp") is None
    restored = Accountant.from_state_dict(json.loads(json.dumps(old.state_dict())))
    assert not restored.prv_refine and restored.epsilon(DELTA) == old.epsilon(DELTA)
    with pytest.raises(AccountingError, match="prv_refine"):
        today.load_state_dict(old.state_dict())


def test_a_prv_budget_below_its_floor_says_why():
    plan = [PlannedRelease("dpsgd", 1.0, 1)]
    with pytest.raises(CalibrationError, match=r"even noise multiplier 10000 gives epsilon 0\.000\d+"
                                               r" > target 0\.00015.*includes its discretization error \(at least"
                                               r" 0\.0001\), so PRV cannot certify less$"):
        calibrate_noise_multiplier(0.00015, DELTA, plan, "prv")
    # a budget of 0.0005 (refused before: PRV's floor was 0.01; PLD's is 0.00075) calibrates
    sigma = calibrate_noise_multiplier(0.0005, DELTA, plan, "prv")
    assert 0.99 * 0.0005 <= plan_epsilon(plan, DELTA, sigma, "prv") <= 0.0005


def test_prv_refuses_histories_whose_grid_would_exhaust_memory():
    acc = Accountant("prv")
    acc.record(1.0, 0.01, steps=50_000_000)
    with pytest.raises(AccountingError, match="grid"):
        acc.epsilon(DELTA)


@pytest.mark.parametrize("noise, rate, steps, delta, opacus", [
    (1.0, 0.1, 20, 1e-20, "Floating point errors will dominate"),
    (0.01, 1.0, 1, 9e-4, "Discrete mean differs significantly"),
])
def test_prv_names_what_opacus_cannot_discretize(noise, rate, steps, delta, opacus):
    """A delta too small for PRV's grid (privacy.delta = 1e-20, which the config accepts) or
    a noise level too small for it raised Opacus's raw ValueError / RuntimeError, a traceback
    from `secure-fedora run`; it is an AccountingError naming PRV and the alternatives."""
    acc = Accountant("prv")
    acc.record(noise, rate, steps=steps)
    with pytest.raises(AccountingError, match=rf"^the PRV accountant cannot evaluate this history "
                                              rf"at delta {delta:g} \(Opacus: {opacus}.*"
                                              r"use accountant='rdp' or 'pld'$"):
        acc.epsilon(delta)


def test_empty_history_and_epsilon_after_does_not_change_state():
    acc = Accountant()
    assert acc.epsilon(DELTA) == 0.0
    after = acc.epsilon_after(DELTA, 1.0, 0.1, 10)
    assert acc.history == [] and acc.epsilon(DELTA) == 0.0
    acc.record(1.0, 0.1, 10)
    assert acc.epsilon(DELTA) == after
    both = acc.epsilon_after_releases(DELTA, [(2.0, 1.0, 1), (1.0, 0.1, 5)])
    assert both > acc.epsilon(DELTA) and acc.history == [(1.0, 0.1, 10)]


def test_state_dict_round_trips_through_json():
    acc = Accountant("rdp")
    acc.record(1.2, 0.03, 100)
    acc.record(5.0, 1.0)
    state = json.loads(json.dumps(acc.state_dict()))
    other = Accountant("rdp")
    other.load_state_dict(state)
    assert other.history == acc.history and other.epsilon(DELTA) == acc.epsilon(DELTA)
    assert Accountant.from_state_dict(state).epsilon(DELTA) == acc.epsilon(DELTA)
    with pytest.raises(AccountingError, match="'prv'"):
        Accountant("prv").load_state_dict(state)
    for key in ("history", "accountant", "version"):
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(AccountingError, match=repr(key)):
            Accountant("rdp").load_state_dict(broken)
    with pytest.raises(AccountingError, match=r"history\[1\].*sample_rate"):
        Accountant("rdp").load_state_dict({**state, "history": [[1.0, 0.1, 3], [1.0, 2.0, 1]]})


@pytest.mark.parametrize(
    ("args", "field"),
    [((0.0, 0.1, 1), "noise_multiplier"), ((-1.0, 0.1, 1), "noise_multiplier"),
     ((float("inf"), 0.1, 1), "noise_multiplier"), ((1.0, 0.0, 1), "sample_rate"),
     ((1.0, 1.01, 1), "sample_rate"), ((1.0, 5e-324, 1), "sample_rate"),
     ((1.0, 1e-310, 1), "sample_rate"), ((1.0, 0.1, 0), "steps"), ((1.0, 0.1, 2.0), "steps")],
)
def test_bad_records_are_rejected_naming_the_field(args, field):
    with pytest.raises(AccountingError, match=field):
        Accountant().record(*args)


def test_numpy_scalars_are_accepted():
    import numpy as np

    acc = Accountant()
    acc.record(np.float32(1.5), np.float64(0.1), np.int64(3))
    assert acc.history == [(1.5, 0.1, 3)] and isinstance(acc.history[0][2], int)
    assert acc.epsilon(np.float64(DELTA)) > 0


def test_bad_accountant_kind_and_delta():
    with pytest.raises(AccountingError, match="accountant must be one of"):
        Accountant("gdp")
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(AccountingError, match="delta"):
            Accountant().epsilon(delta)


def test_privacy_budget_validation():
    budget = PrivacyBudget(3, 1e-5)
    assert budget.epsilon == 3.0 and isinstance(budget.epsilon, float)
    for eps in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(AccountingError, match="epsilon"):
            PrivacyBudget(eps, 1e-5)
    for delta in (0, 1, 1.5, -0.1):
        with pytest.raises(AccountingError, match="delta"):
            PrivacyBudget(1.0, delta)
    budget.check_dataset_size(1000)
    with pytest.raises(AccountingError, match="1/n"):
        PrivacyBudget(1.0, 1e-3).check_dataset_size(1000)


def test_budget_exceeded_error_names_everything():
    err = BudgetExceededError(client_id="c7", round=12, mechanism="dpsgd",
                              epsilon_would_be=8.4321, budget=PrivacyBudget(8.0, 1e-5))
    text = str(err)
    assert "'c7'" in text and "round 12" in text and "'dpsgd'" in text
    assert "8.4321" in text and "budget 8" in text
    assert isinstance(err, RuntimeError) and err.epsilon_would_be == 8.4321


def test_a_refusal_reads_its_epsilon_above_the_budget_it_exceeds():
    """The refusal showed both at six significant digits to nearest: 1.0000002 over a budget
    of 1.0000001 read "1 > budget 1", and a delta 1.2345678e-05 as the larger 1.23457e-05."""
    err = BudgetExceededError(client_id="c7", round=12, mechanism="dpsgd",
                              epsilon_would_be=1.0000002,
                              budget=PrivacyBudget(1.0000001, 1.2345678e-5))
    assert "would reach 1.0000002 > budget 1.0000001 (delta=1.2345678e-05)" in str(err)
    err = BudgetExceededError(client_id="c7", round=12, mechanism="dpsgd",
                              epsilon_would_be=9.5, budget=PrivacyBudget(8.0, 1e-3))
    assert "would reach 9.5000 > budget 8 (delta=0.001)" in str(err)


def test_mechanism_record_validation():
    rec = MechanismRecord("dpsgd", 1.0, 0.1, 5, {"clip_norm": 1.0})
    assert rec.ledger_params() == {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5,
                                   "clip_norm": 1.0}
    with pytest.raises(AccountingError, match="mechanism"):
        MechanismRecord("", 1.0, 0.1)
    with pytest.raises(AccountingError, match="steps"):
        MechanismRecord("dpsgd", 1.0, 0.1, 1, {"steps": 3})
    with pytest.raises(AccountingError, match="JSON"):
        MechanismRecord("dpsgd", 1.0, 0.1, 1, {"clip_norm": float("nan")})
    with pytest.raises(AccountingError, match="JSON"):
        MechanismRecord("dpsgd", 1.0, 0.1, 1, {"obj": object()})


PLAN = [
    PlannedRelease("gaussian_summary", 1.0, 1),
    PlannedRelease("dpsgd", 0.064, 400),
    PlannedRelease("gaussian_lambda", 1.0, 25),
]


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_sigma_gives_epsilon_within_one_percent_below_target(target):
    sigma = calibrate_noise_multiplier(target, DELTA, PLAN)
    acc = Accountant("rdp")  # plug sigma back in through an independent accountant
    for item in PLAN:
        acc.record(sigma, item.sample_rate, item.steps)
    eps = acc.epsilon(DELTA)
    assert 0.99 * target <= eps <= target
    assert plan_epsilon(PLAN, DELTA, sigma) == eps


def test_calibration_with_prv_and_with_a_fixed_entry():
    plan = [PlannedRelease("dpsgd", 0.1, 50)]
    sigma = calibrate_noise_multiplier(2.0, DELTA, plan, "prv")
    prv = PRVAccountant()
    prv.history = [(sigma, 0.1, 50)]
    assert 0.99 * 2.0 <= prv.get_epsilon(DELTA) <= 2.0
    fixed = [PlannedRelease("gaussian_summary", 1.0, 1, noise_multiplier=4.0),
             PlannedRelease("dpsgd", 0.1, 50)]
    sigma2 = calibrate_noise_multiplier(2.0, DELTA, fixed)
    assert 0.99 * 2.0 <= plan_epsilon(fixed, DELTA, sigma2) <= 2.0
    assert sigma2 > calibrate_noise_multiplier(2.0, DELTA, plan)  # summary uses up budget


def test_calibration_errors():
    with pytest.raises(CalibrationError, match="already spend"):
        calibrate_noise_multiplier(1.0, DELTA, [PlannedRelease("s", 1.0, 1, 0.5),
                                                PlannedRelease("dpsgd", 0.1, 10)])
    with pytest.raises(AccountingError, match="no entry"):
        calibrate_noise_multiplier(1.0, DELTA, [PlannedRelease("s", 1.0, 1, 5.0)])
    with pytest.raises(AccountingError, match="empty"):
        calibrate_noise_multiplier(1.0, DELTA, [])
    with pytest.raises(AccountingError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, DELTA, PLAN)
    with pytest.raises(AccountingError, match="sample_rate"):
        PlannedRelease("dpsgd", 0.0, 10)
    with pytest.raises(AccountingError, match="no noise_multiplier"):
        plan_epsilon(PLAN, DELTA)


# --------------------------------------------------------------------------- PLD, registry


def test_pld_is_dp_accountings_pessimistic_estimate_and_tighter_than_rdp():
    import dp_accounting
    from dp_accounting import pld

    ours = Accountant("pld")
    ours.record(5.0, 1.0)  # summary
    for _ in range(3):  # DP-SGD and lambda alternate; composition order does not matter
        ours.record(1.0, 0.25, 4)
        ours.record(20.0, 1.0)
    ref = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.0)), 12)
    ref.compose(dp_accounting.GaussianDpEvent(5.0))
    ref.compose(dp_accounting.GaussianDpEvent(20.0), 3)
    assert ours.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-9)
    rdp = Accountant("rdp")
    for nm, q, steps in ours.history:
        rdp.record(nm, q, steps)
    assert ours.epsilon(DELTA) < rdp.epsilon(DELTA)
    assert ours.parameters == {"name": "pld", "library": "dp_accounting",
                               "pessimistic_estimate": True,
                               "value_discretization_interval": PLD_VALUE_DISCRETIZATION,
                               "neighboring_relation": "add_or_remove_one"}


def test_pld_with_the_cached_subsampled_gaussian_equals_dp_accountings_accountant_exactly():
    """The cached subsampled-Gaussian PLD changes no bit of the epsilon, also when reused for
    histories that differ only in their counts (as at every release of a run)."""
    import dp_accounting
    from dp_accounting import pld

    from privacy.accounting import _pld_epsilon, _subsampled_gaussian_pld

    def reference(history):
        counts = {}
        for nm, q, steps in history:
            counts[(nm, q)] = counts.get((nm, q), 0) + steps
        acc = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
        for (nm, q), steps in sorted(counts.items()):
            gaussian = dp_accounting.GaussianDpEvent(nm)
            acc.compose(gaussian if q >= 1.0
                        else dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
        return float(acc.get_epsilon(DELTA))

    _subsampled_gaussian_pld.cache_clear()
    histories = [((5.98, 1.0, 1), (2.13, 0.25, 4)),
                 ((5.98, 1.0, 1), (2.13, 0.25, 4), (14.6, 1.0, 1), (2.13, 0.25, 4)),
                 ((5.98, 1.0, 1), (2.13, 0.25, 12), (14.6, 1.0, 3)),
                 ((1.3, 0.5, 2), (2.13, 0.25, 7), (0.9, 1.0, 2))]
    for history in histories:
        assert _pld_epsilon(history, DELTA, {}) == reference(history)
    info = _subsampled_gaussian_pld.cache_info()
    assert info.hits >= 3 and info.misses == 2  # (2.13, 0.25) built once, (1.3, 0.5) once


def test_rdp_orders_beyond_63_lift_the_small_epsilon_floor():
    # One Gaussian release at a large sigma: with Opacus's orders (<= 63) epsilon cannot go
    # below ~0.103 at delta 1e-5 however large sigma is; with the extra orders it can.
    theirs = RDPAccountant()
    theirs.step(noise_multiplier=200.0, sample_rate=1.0)
    ours = Accountant("rdp")
    ours.record(200.0, 1.0)
    with pytest.warns(UserWarning, match="largest alpha"):
        assert theirs.get_epsilon(DELTA) > 0.1
    assert ours.epsilon(DELTA) < 0.05
    assert ours.parameters["extra_orders"] == list(RDP_EXTRA_ORDERS)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target", [0.1, 0.3])
def test_small_budgets_calibrate(accountant, target):
    # The main job's plan shape: 30 rounds x 4 DP-SGD steps at q = 0.25, one summary and 30
    # lambdas, each of the latter at 20% of the budget on its own.
    summary = calibrate_noise_multiplier(0.2 * target, DELTA, [PlannedRelease("s", 1.0, 1)],
                                         accountant)
    lam = calibrate_noise_multiplier(0.2 * target, DELTA, [PlannedRelease("l", 1.0, 30)],
                                     accountant)
    plan = [PlannedRelease("dpsgd", 0.25, 120), PlannedRelease("s", 1.0, 1, summary),
            PlannedRelease("l", 1.0, 30, lam)]
    sigma = calibrate_noise_multiplier(target, DELTA, plan, accountant)
    eps = plan_epsilon(plan, DELTA, sigma, accountant)
    assert 0.99 * target <= eps <= target


def test_accountant_registry_refuses_duplicates_and_names_the_choices():
    assert set(ACCOUNTANT_KINDS) == {"rdp", "prv", "pld"}
    with pytest.raises(AccountingError, match="already registered"):
        register_accountant(ACCOUNTANT_REGISTRY["pld"])
    with pytest.raises(AccountingError, match="'pld'"):
        Accountant("nope")


@pytest.mark.parametrize("history", [
    ((0.001, 1.0, 1),),          # one Gaussian release at a tiny noise multiplier
    ((0.1, 1.0, 1_000_000),),    # many plain releases: sigma / sqrt(steps) is tiny
    ((0.2, 0.9, 200_000),),      # a subsampled Gaussian whose self-composition is huge
    ((1.0, 0.01, 100), (0.004, 1.0, 1)),
])
def test_pld_refuses_histories_beyond_its_memory_guard_before_allocating(history):
    """Each of these needed 2 GB to 747 GB (out of memory or killed); now a named error,
    with no large allocation on the way."""
    import tracemalloc

    from privacy.accounting import PLD_MAX_GRID_POINTS, AccountingSizeError, pld_grid_points

    acc = Accountant("pld")
    for release in history:
        acc.record(*release)
    tracemalloc.start()
    try:
        with pytest.raises(AccountingSizeError, match="rdp"):
            acc.epsilon(DELTA)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1500 * 2**20
    assert pld_grid_points(history) > PLD_MAX_GRID_POINTS


def test_pld_grid_points_bound_the_arrays_dp_accounting_builds():
    """The size estimate is an upper bound of the composed PLD's PMFs (so the guard never
    lets a larger one through), and not far above them where the guard is near (the last
    history's untruncated self-composition would exceed the limit)."""
    import dp_accounting
    from dp_accounting import pld

    from privacy.accounting import pld_grid_points

    for history in [((1.1, 0.05, 400),), ((0.6, 1.0, 300),), ((5.98, 1.0, 1), (2.13, 0.25, 40)),
                    ((0.7, 0.3, 50), (3.0, 1.0, 2)), ((1.0, 0.01, 1),), ((0.6, 0.5, 3000),)]:
        acc = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
        for nm, q, steps in history:
            gaussian = dp_accounting.GaussianDpEvent(nm)
            acc.compose(gaussian if q >= 1.0
                        else dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
        built = acc._pld
        sizes = [built._pmf_remove.size] + ([] if built._symmetric else [built._pmf_add.size])
        estimate = pld_grid_points(history)
        assert max(sizes) <= estimate, (history, sizes, estimate)
    assert estimate <= 4 * max(sizes), (sizes, estimate)


def test_calibration_names_targets_the_discretized_accountants_cannot_reach():
    """Epsilon 1e6 needs a PLD of ~10^8 points, epsilon ~1000 overflows dp_accounting's float
    range (it then reports inf, which misled the search into 100 evaluations): both are named
    errors that point to RDP, and RDP itself still calibrates both."""
    plan = [PlannedRelease("dpsgd", 0.05, 50), PlannedRelease("summary", 1.0, 1)]
    with pytest.raises(CalibrationError, match="rdp"):
        calibrate_noise_multiplier(1e6, DELTA, plan, "pld")
    overflowing = [PlannedRelease("dpsgd", 0.05, 500), PlannedRelease("summary", 1.0, 1)]
    with pytest.raises(CalibrationError, match="infinite epsilon at noise multiplier"):
        calibrate_noise_multiplier(1000.0, DELTA, overflowing, "pld")
    for target in (1e6, 1000.0):
        sigma = calibrate_noise_multiplier(target, DELTA, plan, "rdp")
        assert 0.99 * target * 0.99 <= plan_epsilon(plan, DELTA, sigma, "rdp") <= target


def test_a_noise_multiplier_beyond_the_analyses_range_is_refused_when_recorded():
    """At 1e300 every accountant raised OverflowError; the limit is a named error."""
    from privacy.accounting import MAX_NOISE_MULTIPLIER

    for kind in ("rdp", "pld"):
        acc = Accountant(kind)
        acc.record(MAX_NOISE_MULTIPLIER, 0.1, 10)
        assert 0 <= acc.epsilon(DELTA) < 0.01
        with pytest.raises(AccountingError, match="at most"):
            acc.record(1e300, 1.0, 1)


@pytest.mark.parametrize("value", [0.993920414924093, 0.01990025730349798, 7.9348940000000001,
                                   1.0, 0.0, 123456.1234564999, 1e-9, 2.5e-7])
def test_round_up_never_shows_less_than_the_value_and_at_most_one_unit_more(value):
    from privacy.accounting import round_up

    shown = round_up(value)
    assert value <= shown <= value + 1e-6 + 1e-12
    assert abs(shown * 1e6 - round(shown * 1e6)) < 1e-3  # six decimals


def test_round_up_keeps_infinity_and_nan():
    from privacy.accounting import round_up

    assert round_up(math.inf) == math.inf and math.isnan(round_up(math.nan))


def test_a_noise_multiplier_whose_square_underflows_has_an_unbounded_rdp() -> None:
    """sigma = 1e-170 (sigma^2 == 0.0) was a ZeroDivisionError traceback inside Opacus;
    the RDP of vanishing noise is +inf, so the plan is simply over any budget."""
    from privacy.accounting import _rdp_one_step

    assert np.isinf(_rdp_one_step(0.5, 1e-170)).all()
    assert np.isfinite(_rdp_one_step(0.5, 1e-3)).any()


@pytest.mark.parametrize("value", [2.98341, 0.993920414924093, 7.9999999, 0.1, 2.983, 0.0, 1e-9,
                                   123456.1234564999])
@pytest.mark.parametrize("decimals", [1, 3, 4])
def test_format_up_never_shows_less_than_the_value_and_at_most_one_unit_more(value, decimals):
    from decimal import Decimal

    from privacy.accounting import format_up

    shown = format_up(value, decimals)
    assert len(shown.partition("e")[0].partition(".")[2]) == decimals
    assert ("e" in shown) == (0 < value < 10.0 ** -decimals)  # small: scientific notation
    assert Decimal(repr(value)) <= Decimal(shown) < Decimal(repr(value)) + Decimal(10) ** -decimals


@pytest.mark.parametrize("value", [1.3284739842813091, 2.38397, 0.1, 7.0, 1e-9, 0.99999])
@pytest.mark.parametrize("decimals", [1, 4])
def test_format_down_never_shows_more_than_the_value_and_at_most_one_unit_less(value, decimals):
    """A noise multiplier shown short must never be above the one drawn (rounding 1.32847398
    to nearest showed "1.3285", more noise than the ledger records)."""
    from decimal import Decimal

    from privacy.accounting import format_down

    shown = format_down(value, decimals)
    assert len(shown.partition("e")[0].partition(".")[2]) == decimals
    assert ("e" in shown) == (0 < value < 10.0 ** -decimals)  # small: scientific notation
    assert Decimal(repr(value)) - Decimal(10) ** -decimals < Decimal(shown) <= Decimal(repr(value))
    assert format_down(1.3284739842813091, 4) == "1.3284" and format_down(math.inf, 2) == "inf"


def test_a_value_below_one_unit_of_the_last_decimal_is_shown_readably_and_still_bounded():
    """A sigma below 5e-5 was shown as "0.0000" (format_down at four decimals) and an epsilon
    of 1e-9 as "0.0001": a value with no digit of its own in the fixed form is now shown in
    scientific notation, still rounded down (sigma) or up (epsilon), exact at a power of ten."""
    from decimal import Decimal

    from privacy.accounting import format_down, format_up

    assert format_down(4.21789e-05, 4) == "4.2178e-5" and format_up(4.21789e-05, 4) == "4.2179e-5"
    assert format_up(1.23456e-07, 4) == "1.2346e-7" and format_down(1e-9, 4) == "1.0000e-9"
    assert format_up(9.99999e-05, 4) == "1.0000e-4" and format_down(9.99999e-05, 4) == "9.9999e-5"
    assert format_down(5e-324, 2) == "5.00e-324"  # its shortest decimal form, as ever
    # one unit and above keep the fixed form; zero is zero
    assert (format_down(0.0001, 4), format_up(0.00012, 4), format_down(0.0, 4)) == \
        ("0.0001", "0.0002", "0.0000")
    for value in (4.21789e-05, 3.3e-5, 7.77777777e-12, 2.5e-300):
        exact = Decimal(repr(value))
        assert Decimal(format_down(value, 4)) <= exact <= Decimal(format_up(value, 4))


@pytest.mark.parametrize("budget", [1.0, 0.0625, 0.03125, 1.23456789, 1.0000001, 2.5e-9, 1e6 + 0.5])
def test_a_spend_shown_beside_its_budget_reads_on_the_same_side_of_it(budget):
    """An epsilon spent rounded up to four decimals read above a budget of more decimals that
    it stays under (0.03124 of 0.03125 as "0.0313"); the budget itself, shown with :g (six
    significant digits, to nearest), could read under a spend above it (1.0000001 as "1")."""
    from decimal import Decimal

    from privacy.accounting import format_exact, format_spent

    shown_budget = Decimal(format_exact(budget))
    assert shown_budget == Decimal(repr(budget))
    under, over = math.nextafter(budget, 0.0), math.nextafter(budget, math.inf)
    for spent in (under, budget * 0.999999, budget, over, budget * 1.000001):
        shown = Decimal(format_spent(spent, budget))
        assert (shown > shown_budget) == (spent > budget), (spent, budget, shown)
        assert shown >= Decimal(repr(spent))  # still rounded up
    assert format_spent(0.03124, 0.03125) == "0.03124" and format_spent(2.98341, 3.0) == "2.9835"
    assert (format_exact(4.0), format_exact(1e-5), format_exact(1.2345678e-5)) == \
        ("4", "1e-05", "1.2345678e-05")


@pytest.mark.parametrize(("claim", "bounds"), [
    (1.0, [1.00004, 8.1]), (1.0, [0.99996, 1.00003]), (0.5, [0.5, 0.5]),
    (2.98341, [2.98342, 2.98341]), (1e-7, [1.000001e-7, 3.0]), (1.0, [math.inf, 0.0])])
def test_a_claim_and_the_bounds_against_it_read_in_the_order_of_the_values(claim, bounds):
    """An audit's claim rounded up to four decimals beside its lower bound and certifiable
    maximum to four significant digits: a lower bound 1.00004 over a claim 1.0 (refuted) read
    "1" beside "1.0000", a certifiable maximum 1.00003 (consistent) read at the claim."""
    from decimal import Decimal

    from privacy.accounting import format_against

    claim_s, bounds_s = format_against(claim, bounds, 4)
    assert Decimal(claim_s) >= Decimal(repr(claim))
    for bound, shown in zip(bounds, bounds_s, strict=True):
        assert (Decimal(shown) > Decimal(claim_s)) == (bound > claim), (bound, shown, claim_s)
        assert Decimal(shown) <= Decimal(repr(bound))
    assert format_against(1.0, [1.00004, 8.1], 4) == ("1.00000", ["1.00004", "8.10000"])
    assert format_against(2.0, [0.5, 8.1], 4) == ("2.0000", ["0.5000", "8.1000"])


_FINITE = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def _near(draw, value: float) -> float:
    """A float some steps away from ``value`` (or ``value`` itself, or any other float)."""
    if draw(st.booleans()):
        return draw(_FINITE)
    for _ in range(draw(st.integers(0, 3))):
        value = math.nextafter(value, draw(st.sampled_from([-math.inf, math.inf])))
    return value


@settings(max_examples=400, deadline=None)
@given(budget=st.one_of(_FINITE, st.sampled_from([0.1, 1 / 3, 1e-5, 3.0, 5e-324, 1e-320, 1e308,
                                                  1e-300, -1e-300, 2.5e-13, 1.0000000000001,
                                                  1.2345678901234567e-05, 0.0, -0.0])),
       data=st.data())
def test_figures_beside_bounds_read_on_the_side_of_the_values_for_any_float(budget, data):
    """Properties over every finite float (huge, subnormal, negative, 17 digits): a spend reads
    above its budget shown exactly exactly when it is above (a subnormal budget 5e-324 read
    "4.94066e-324", below its own shortest form "5e-324"); no figure fails to show (a spend of
    1e80 beside a budget 5e-324 needed more than the 400 digits the rounding kept:
    decimal.InvalidOperation), nor a share of a budget; an audit's bounds and two ordered
    figures read in the values' order."""
    from decimal import Decimal, localcontext

    from privacy.accounting import (
        format_against,
        format_exact,
        format_ordered,
        format_share_up,
        format_spent,
    )

    spent = data.draw(_near(budget))
    shown_budget = Decimal(format_exact(budget))
    assert shown_budget == Decimal(repr(budget))
    spent_s = format_spent(spent, budget)
    shown = Decimal(spent_s)
    assert (shown > shown_budget) == (spent > budget) and shown >= Decimal(repr(spent))
    # readable: never more decimals than a float's 17 significant digits need (a budget 1e-300
    # showed its spend with 300), and no figure reads "-0"
    assert len(spent_s.partition("e")[0].partition(".")[2]) <= 17, (spent_s, budget)
    assert not spent_s.startswith("-") or shown < 0
    claim_s, bounds_s = format_against(spent, [budget], 4)
    assert (Decimal(bounds_s[0]) > Decimal(claim_s)) == (budget > spent)
    first, second = format_ordered(spent, budget)
    assert ((float(first) > float(second)) - (float(first) < float(second))
            == (spent > budget) - (spent < budget))
    if budget > 0 and 0 <= spent < math.inf:  # (one step past the largest float is inf)
        # the share to more digits than it is shown with (3.1277149239204276e+129 of a budget
        # 7.354050489286967e-269 showed below it: the quotient was rounded at 400 digits)
        with localcontext(prec=1000):
            exact = Decimal(repr(spent)) * 100 / Decimal(repr(budget))
            assert exact <= Decimal(format_share_up(spent, budget, 1)) < exact + Decimal("0.1")


def test_a_spend_beside_a_budget_of_many_decimals_is_shown_in_scientific_notation():
    """A budget epsilon of 1e-300 showed a spend of 2.5 as "2.5000...0" with 300 decimals; a
    budget whose decimals are more than 12 and than its significant digits now has its spend
    shown in scientific notation with the budget's significant digits (at least four
    decimals), still rounded up and on the budget's side."""
    from privacy.accounting import format_spent

    assert format_spent(2.5, 1e-300) == "2.5000e+0"
    assert format_spent(5e-301, 1e-300) == "5.0000e-301"
    assert format_spent(1e-300, 1e-300) == "1.0000e-300"
    assert format_spent(math.nextafter(1e-300, 1.0), 1e-300) == "1.0001e-300"
    assert format_spent(0.0, 2.5e-13) == "0.0000e+0"
    assert format_spent(1.2345678901234566e-05, 1.2345678901234567e-05) == \
        "1.2345678901234566e-5"
    # significant decimals read as they did: fixed form
    assert format_spent(0.5, 1.0000000000001) == "0.5000000000000"
    assert format_spent(0.03124, 0.03125) == "0.03124"


def test_negative_zero_is_shown_as_zero():
    """format_up(-0.0, 4) read "-0.0000" (and format_down, format_exact's "-0", an audit's
    claim and bounds, a share of a budget): zero of either sign now reads unsigned, as does a
    negative share rounded up to zero."""
    from privacy.accounting import (
        format_against,
        format_down,
        format_exact,
        format_ordered,
        format_share_up,
        format_spent,
        format_up,
    )

    assert (format_up(-0.0, 4), format_down(-0.0, 4), format_exact(-0.0)) == ("0.0000", "0.0000", "0")
    assert format_against(-0.0, [-0.0, 0.0, 1.0], 4) == ("0.0000", ["0.0000", "0.0000", "1.0000"])
    assert format_ordered(-0.0, 0.0) == ("0", "0") and format_spent(-0.0, 1.0) == "0.0000"
    assert format_share_up(-0.0, 2.0, 1) == "0.0" and format_share_up(-1e-10, 1.0, 1) == "0.0"
    assert format_up(-1e-9, 4) == "-1.0000e-9" and format_down(-0.5, 0) == "-5e-1"


def test_a_share_of_an_exactly_spent_budget_shows_exactly_and_no_share_shows_less():
    """The report showed 2.0363 of a budget of 2.909 (exactly 70%) as "70.1%": format_up of
    the float share 70.00000000000001 rounds up. The share is now taken exactly of the
    recorded values."""
    import decimal
    import random
    from decimal import Decimal

    from privacy.accounting import format_share_up, format_up

    assert format_up(100 * (2.0363 / 2.909), 1) == "70.1"  # the float share is above 70
    assert format_up(100 * (0.021 / 0.3), 1) == "7.1"
    assert format_share_up(2.0363, 2.909, 1) == "70.0" and format_share_up(0.021, 0.3, 1) == "7.0"
    assert format_share_up(3.0, 3.0, 1) == "100.0"
    assert format_share_up(2.98341, 3.0, 1) == "99.5" and format_share_up(1.0, 3.0, 2) == "33.34"
    assert [format_share_up(1.0, whole, 1) for whole in (0.0, -2.0, math.nan)] == ["nan"] * 3
    assert format_share_up(math.inf, 2.0, 1) == "inf" and format_share_up(1.0, math.inf, 1) == "0.0"
    # a share with more than 400 digits before the point was rounded below the exact one
    part, whole = 7.662496779753813e+268, 5.623007294035125e-154
    with decimal.localcontext(prec=1000):
        assert Decimal(format_share_up(part, whole, 1)) >= Decimal(repr(part)) * 100 / Decimal(repr(whole))
    rng = random.Random(0)
    for _ in range(2000):
        budget = round(rng.uniform(0.01, 20), rng.randint(0, 6))
        spent = round(rng.uniform(0, budget), rng.randint(0, 8)) if budget > 0 else 0.0
        if budget <= 0:
            continue
        decimals = rng.randint(0, 4)
        exact = Decimal(repr(spent)) * 100 / Decimal(repr(budget))
        shown = Decimal(format_share_up(spent, budget, decimals))
        assert exact <= shown < exact + Decimal(10) ** -decimals
        eps = Decimal(format_up(spent, decimals))
        assert Decimal(repr(spent)) <= eps < Decimal(repr(spent)) + Decimal(10) ** -decimals


def test_format_up_rounds_where_rounding_to_nearest_shows_less():
    from privacy.accounting import format_up

    assert (format_up(2.98341, 3), f"{2.98341:.3f}") == ("2.984", "2.983")
    assert format_up(0.1, 3) == "0.100" and format_up(math.inf, 2) == "inf"


def test_opacus_rdp_orders_and_analysis_are_opacus_own():
    """The orders held here are RDPAccountant's defaults, and the RDP analysis loaded without
    the opacus package gives the package's curves bit for bit."""
    import subprocess
    import sys

    from opacus.accountants.analysis import rdp as packaged

    from privacy.accounting import OPACUS_RDP_ORDERS

    assert [float(a) for a in OPACUS_RDP_ORDERS] == [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]
    code = (
        "import sys, json\n"
        "from privacy.accounting import Accountant, opacus_rdp_analysis\n"
        "eps = Accountant('rdp').epsilon_after_releases(1e-5, [(1.1, 0.02, 300), (4.0, 1.0, 1)])\n"
        "curve = opacus_rdp_analysis().compute_rdp(q=0.02, noise_multiplier=1.1, steps=300,"
        " orders=[1.5, 2.0, 7.3, 32.0])\n"
        "print(json.dumps({'eps': eps, 'curve': [float(v) for v in curve],"
        " 'opacus_imported': 'opacus' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["opacus_imported"] is False  # accounting alone does not load Opacus's package
    want = packaged.compute_rdp(q=0.02, noise_multiplier=1.1, steps=300, orders=[1.5, 2.0, 7.3, 32.0])
    assert got["curve"] == [float(v) for v in want]
    acc = RDPAccountant()
    acc.history = [(1.1, 0.02, 300), (4.0, 1.0, 1)]
    assert got["eps"] <= acc.get_epsilon(1e-5)


# Calibrated before the look-ahead at the largest sigma existed: it must not change a value
# beyond the libraries' own rounding (the PLD and PRV analyses moved by up to 5e-13 relative
# between numpy/scipy releases: 1777.8713616260216 -> 1777.8713616268144 on a fresh machine).
_CALIBRATED = [
    ("rdp", 3.0, 1e-5, 0.1, 100, 1.8024998193462316),
    ("rdp", 1.0, 1e-5, 0.05, 500, 4.681331873797801),
    ("rdp", 0.3, 1e-6, 0.02, 1000, 9.013490404467065),
    ("rdp", 8.0, 1e-5, 1.0, 5, 1.4322886103625159),
    ("rdp", 0.05, 1e-5, 0.1, 1000, 205.39750703626098),
    ("rdp", 0.01, 1e-5, 0.01, 200, 39.87461618005117),
    ("rdp", 20.0, 1e-3, 0.2, 50, 0.6368398261684697),
    ("rdp", 0.5, 1e-5, 0.01, 10000, 7.754978806900529),
    ("rdp", 0.004, 1e-5, 1.0, 1, 1024.0),
    ("pld", 0.05, 1e-5, 0.1, 1000, 270.53437506256296),
    ("pld", 0.001, 1e-5, 1.0, 1, 1777.8713616260216),  # below RDP's reach
    ("pld", 0.002, 1e-6, 1.0, 2, 1958.5691842307372),
    ("prv", 0.02, 1e-5, 0.1, 100, 135.1343772547132),
    ("prv", 0.015, 1e-5, 1.0, 1, 172.09243422716023),
]


@pytest.mark.parametrize(("accountant", "target", "delta", "q", "steps", "sigma"), _CALIBRATED)
def test_reachable_targets_calibrate_to_the_same_sigma(accountant, target, delta, q, steps, sigma):
    calibrated = calibrate_noise_multiplier(target, delta, [PlannedRelease("dpsgd", q, steps)],
                                            accountant)
    assert calibrated == pytest.approx(sigma, rel=1e-11, abs=0)


@pytest.mark.parametrize(("accountant", "target", "q", "steps", "most"), [
    ("rdp", 1e-6, 0.1, 100, 2),  # below the smallest epsilon RDP certifies (was 8 evaluations)
    ("rdp", 0.00352, 0.1, 1000, 5),  # above it, still missed at sigma 64 (was 8)
    ("pld", 1e-6, 1.0, 1, 4),  # RDP fails first (was 16)
    ("prv", 1e-6, 1.0, 1, 4),
])
def test_an_unreachable_target_fails_without_climbing_to_the_largest_sigma(
        monkeypatch, accountant, target, q, steps, most):
    import privacy.accounting as accounting

    sigmas = []

    def counted(plan, delta, sigma=None, *args, **kwargs):
        sigmas.append(sigma)
        return plan_epsilon(plan, delta, sigma, *args, **kwargs)

    monkeypatch.setattr(accounting, "plan_epsilon", counted)
    with pytest.raises(CalibrationError, match=r"even noise multiplier 10000 gives epsilon .* > target"):
        calibrate_noise_multiplier(target, DELTA, [PlannedRelease("dpsgd", q, steps)], accountant)
    assert len(sigmas) <= most and sigmas[-1] == 1e4


def test_the_least_sample_rate_a_refusal_states_is_accepted():
    """"sample_rate must be at least 2.22507e-308" named a rate below the least one
    (2.2250738585072014e-308) that the same check then refused."""
    with pytest.raises(AccountingError) as err:
        Accountant("rdp").record(1.0, 5e-324, 1)
    found = re.search(r"sample_rate must be at least (\S+) ", str(err.value))
    assert found is not None, str(err.value)
    Accountant("rdp").record(1.0, float(found.group(1)), 1)


def test_a_calibration_refusal_states_its_target_and_delta_exactly():
    """"(target epsilon 1, delta 1e-05)" was printed for a target of 1.0000001 and a delta of
    1.0000001e-05: neither was the one asked for."""
    with pytest.raises(CalibrationError, match=r"\(target epsilon 1\.0000001, delta "
                                               r"1\.0000001e-05\)$"):
        calibrate_noise_multiplier(1.0000001, 1.0000001e-05, [PlannedRelease("dpsgd", 0.1, 50)],
                                   "rdp", max_evaluations=1)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(1, 8))
def test_a_stated_bound_is_rounded_toward_the_side_it_bounds(value, digits):
    """A lower bound stated to ``digits`` significant digits ("at least X") is never below the
    bound, an upper one ("below X") never above it; rounded ones say so, exact ones are the
    float's shortest form."""
    from privacy.accounting import format_at_least, format_at_most, format_exact

    for shown, rounded_ok in ((format_at_least(value, digits), lambda x: x >= value),
                              (format_at_most(value, digits), lambda x: x <= value)):
        number, _, said = shown.partition(" ")
        assert rounded_ok(float(number))
        if said:
            assert said in ("(rounded up)", "(rounded down)") and float(number) != value
            assert len(number.split("e")[0].lstrip("-").replace(".", "").strip("0")) <= digits
        else:
            assert number == format_exact(value)
    assert format_at_least(1.234567891) == "1.23457 (rounded up)"
    assert format_at_most(2.2469167) == "2.24691 (rounded down)"
    assert format_at_least(0.125) == format_at_most(0.125) == "0.125"


@pytest.mark.parametrize("kind", ["rdp", "prv", "pld"])
def test_a_subnormal_sample_rate_is_refused_by_every_accountant(kind):
    """At a subnormal rate the PLD analysis raised dp_accounting's bare ValueError; the smallest
    normal rate still accounts (epsilon near 0)."""
    with pytest.raises(AccountingError, match="sample_rate must be at least"):
        Accountant(kind).record(1.0, 5e-324, 1)
    acc = Accountant(kind)
    acc.record(1.0, 2.3e-308, 1)
    assert 0 <= acc.epsilon(DELTA) < 0.02


def test_the_gate_s_epsilons_of_a_run_are_dp_accountings_and_build_each_group_once(monkeypatch):
    """A run asks for epsilon after every release (summary, then per round the DP-SGD steps and
    the lambda). Each value is dp_accounting's PLDAccountant's bit for bit, and each group
    (sigma, q, count) is built once however many releases share it: per round one new
    self-composition of the subsampled Gaussian, not one per release."""
    import collections

    import dp_accounting
    from dp_accounting import pld

    from privacy.accounting import _pld_epsilon, _pld_group

    def reference(history):
        counts = {}
        for nm, q, steps in history:
            counts[(nm, q)] = counts.get((nm, q), 0) + steps
        acc = pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
        for (nm, q), steps in sorted(counts.items()):
            gaussian = dp_accounting.GaussianDpEvent(nm)
            acc.compose(gaussian if q >= 1.0
                        else dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
        return float(acc.get_epsilon(DELTA))

    built = []
    pmf_class = type(pld.privacy_loss_distribution.from_gaussian_mechanism(
        1.0, sampling_prob=0.5)._pmf_remove)
    original = pmf_class.self_compose

    def counting(self, count, *args, **kwargs):
        built.append(count)
        return original(self, count, *args, **kwargs)

    _pld_group.cache_clear()
    history = [(5.98, 1.0, 1)]
    releases = []
    for _ in range(4):  # four rounds: DP-SGD's 4 steps, then the lambda
        for release in ((2.13, 0.25, 4), (14.6, 1.0, 1)):
            history.append(release)
            releases.append(tuple(history))
    expected = [reference(h) for h in releases]
    monkeypatch.setattr(pmf_class, "self_compose", counting)
    assert [_pld_epsilon(h, DELTA, {}) for h in releases] == expected
    # The remove-side PMF of the subsampled Gaussian self-composed once per round (its add side
    # too where it is not symmetric): 4, 8, 12, 16 steps, never twice.
    counts = collections.Counter(built)
    assert sorted(counts) == [4, 8, 12, 16]
    assert max(counts.values()) <= 2  # one build per side (remove, add) of each count


@pytest.mark.parametrize("sigma", [1e-9, 1e-300])
@pytest.mark.parametrize("kind", ["rdp", "pld", "prv"])
def test_a_tiny_noise_multiplier_gives_a_named_error_or_epsilon_and_no_library_warning(sigma,
                                                                                       kind):
    """At sigma 1e-300 Opacus's PRV grid sizing raised ZeroDivisionError (a traceback from
    `secure-fedora run`), dp_accounting warned "divide by zero" while sizing the PLD grid and
    Opacus's RDP "Optimal order is the smallest alpha" (lines before the CLI's one error line):
    now RDP gives its (huge or infinite) epsilon, PLD and PRV an AccountingSizeError, silently."""
    import warnings

    from privacy.accounting import AccountingSizeError

    plan = [PlannedRelease("dpsgd", 0.5, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if kind == "rdp":
            assert plan_epsilon(plan, DELTA, sigma, kind) > 1e17
        else:
            with pytest.raises(AccountingSizeError):
                plan_epsilon(plan, DELTA, sigma, kind)


@pytest.mark.parametrize("kind", ["pld", "prv"])
def test_calibration_beside_a_tiny_fixed_noise_does_not_suggest_rdp_when_rdp_is_over_too(kind):
    """A fixed entry (the summary release at sigma 1e-9) that PLD or PRV cannot evaluate raised
    an AccountingSizeError saying "use accountant='rdp'", where RDP gives epsilon 5.5e17 for it:
    a CalibrationError now says that more noise is needed."""
    tiny = [PlannedRelease("dpsgd", 0.5, 4), PlannedRelease("gaussian_summary", 1.0, 1, 1e-9)]
    with pytest.raises(CalibrationError, match=r"^entries with a fixed noise multiplier: "
                                               rf"{kind.upper()} accounting .*; RDP accounting "
                                               r"gives epsilon \S+ > 8 too, so more noise is "
                                               r"needed$") as caught:
        calibrate_noise_multiplier(8.0, DELTA, tiny, kind)
    assert "accountant='rdp'" not in str(caught.value)


def test_an_accounting_size_error_survives_pickle_and_copy() -> None:
    """AccountingSizeError takes its problem and remedy apart; pickle and copy rebuild an
    exception from its args (the joined message), which raised TypeError for it."""
    import copy
    import pickle

    from privacy.accounting import AccountingSizeError

    err = AccountingSizeError("a grid of 10 points", "use more noise")
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert (again.problem, again.remedy, str(again)) == (
            "a grid of 10 points", "use more noise", "a grid of 10 points; use more noise")


def test_a_size_error_remedy_never_states_rdps_epsilon_below_its_value():
    # "RDP gives epsilon X > target too": X rounded to nearest could read below RDP's epsilon
    from privacy.accounting import (
        AccountingSizeError,
        PlannedRelease,
        plan_epsilon,
        size_error_remedy,
    )

    exc = AccountingSizeError("the grid would be too large", "use accountant='rdp'")
    below = []
    for sigma in (0.61, 0.62, 0.63, 0.64, 0.65, 0.66, 0.67, 0.68):
        plan = [PlannedRelease("dpsgd", 0.1, 100, sigma)]
        rdp = plan_epsilon(plan, 1e-5, sigma, "rdp")
        text = size_error_remedy(exc, plan, 1e-5, sigma, 0.5)
        shown = float(text.split("RDP accounting gives epsilon ")[1].split(" ")[0])
        if shown < rdp:
            below.append((sigma, shown, rdp))
    assert below == []


def test_two_figures_compared_in_a_message_read_in_their_order():
    """A check's message named two epsilons at six significant digits to nearest: 2.4999999
    below 2.5 read "2.5 is below 2.5"; more digits now where six do not keep their order."""
    from privacy.accounting import format_ordered

    assert format_ordered(2.4999999, 2.5) == ("2.4999999", "2.5")
    assert format_ordered(1.0, 1.0 + 2 ** -52) == ("1", "1.0000000000000002")
    assert format_ordered(2.98341, 3.0) == ("2.98341", "3")  # apart at six: unchanged
    assert format_ordered(2.5, 2.5) == ("2.5", "2.5")
    assert format_ordered(math.inf, 1.0) == ("inf", "1")


def _within_seconds(seconds, fn):
    """fn() or AssertionError after ``seconds`` (SIGALRM; the call is interrupted)."""
    import signal

    def expired(signum, frame):
        raise AssertionError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_pld_of_many_steps_of_a_sparse_release_is_computed_at_once():
    """A release whose PLD has few points (sigma 1000, q 0.01: 3) composed 10**8 times made
    both the size guard and dp_accounting compute size ** steps (an integer of 1.6e8 bits)
    before converting the PMF to a dense one: minutes, and never ending for 10**12 steps, so a
    ledger entry stating that many steps hung `audit verify`. Both are now at once; the run's
    accountant and verify's independent PLD agree, and a history beyond the size guard is
    refused at once."""
    from audits.verify import independent_epsilons
    from privacy.accounting import (
        PLD_MAX_GRID_POINTS,
        AccountingSizeError,
        _pld_epsilon,
        check_pld_size,
        pld_grid_points,
    )

    release = (1000.0, 0.01, 10**8)
    assert _within_seconds(30, lambda: pld_grid_points([release])) <= PLD_MAX_GRID_POINTS
    run = _within_seconds(30, lambda: _pld_epsilon((release,), 1e-5, {}))
    independent = _within_seconds(30, lambda: independent_epsilons([release], 1e-5, "pld"))
    assert math.isfinite(run) and 0 < run == independent[0]
    huge = (25.55, 0.25, 10**12)
    with pytest.raises(AccountingSizeError):
        _within_seconds(30, lambda: check_pld_size([huge]))
    assert _within_seconds(30, lambda: independent_epsilons([huge], 1e-5, "pld")) == [None]


def test_self_compose_pld_is_dp_accountings_self_composition_bit_for_bit():
    from privacy.accounting import _subsampled_gaussian_pld, self_compose_pld, sparse_power_fits

    assert sparse_power_fits(10, 3) and not sparse_power_fits(10, 4) and sparse_power_fits(1, 10**15)
    for sigma, q, steps in ((1000.0, 0.01, 2), (1000.0, 0.01, 50_000), (2.0, 0.25, 40)):
        single = _subsampled_gaussian_pld(sigma, q, 1e-3)
        ours, theirs = self_compose_pld(single, steps), single.self_compose(steps)
        for delta in (1e-5, 1e-9):
            assert ours.get_epsilon_for_delta(delta) == theirs.get_epsilon_for_delta(delta)
