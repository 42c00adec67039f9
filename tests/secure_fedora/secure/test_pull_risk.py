"""The plan's warning that FEDORA's noised lambda alone will make the pull unstable."""

import math

import pytest
from scipy.stats import norm

from secure_fedora.core.config import load_config
from secure_fedora.secure.private import (
    check_budget_plans,
    client_budget,
    lambda_pull_risk,
    plan_table,
)

CONFIG = "configs/dp_rotated_mnist.toml"


def plan_rows(epsilon: float, **fedora):
    cfg = load_config(CONFIG)
    cfg = cfg.model_copy(update={
        "methods": ["fedora"],
        "privacy": cfg.privacy.model_copy(update={"epsilon": epsilon}),
        "fedora": cfg.fedora.model_copy(update=fedora)})
    n = cfg.data.num_clients
    choice, plans = check_budget_plans(cfg, "fedora", n)
    budgets = [client_budget(cfg, i) for i in range(n)]
    return cfg, plans, plan_table(cfg, "fedora", budgets, plans, choice.name, choice, {})


def test_small_epsilon_plan_warns_with_the_gaussian_tail_figures():
    cfg, plans, rows = plan_rows(0.3)
    (row,) = rows
    risk = row["lambda_pull"]
    sigma = next(iter(plans.values())).lambda_noise
    s = sigma * cfg.privacy.lambda_clip / cfg.data.val_per_client  # sensitivity clip / m
    assert risk["lambda_noise_std"] == pytest.approx(s, rel=1e-12)
    assert s == pytest.approx(2.156, abs=0.01)  # noise multiplier 269.455
    t = 2 * math.log(2 / 0.5)  # lr 0.5 * exp(d / 2) >= 2
    assert risk["unstable_difference"] == pytest.approx(t)
    assert risk["unstable_probability"] == pytest.approx(norm.sf(t / s), rel=1e-9)
    assert risk["lambda_releases"] == 40 * 30
    assert risk["expected_unstable_pulls"] == pytest.approx(1200 * norm.sf(t / s), rel=1e-9)
    assert risk["expected_unstable_pulls"] > 100
    warning = row["pull_warning"]
    assert "fedora.max_pull = 1" in warning and f"{risk['expected_unstable_pulls']:.3g}" in warning


def test_lambda_releases_count_the_round_participants_of_the_stated_participation():
    """0.07 of 100 clients is 7 per round (as both runtimes draw them), not the 8 that
    ceil(0.07 * 100 = 7.000000000000001) gave: 100 clients x 30 rounds x 7 / 100."""
    cfg = load_config(CONFIG)
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"num_clients": 100}),
        "training": cfg.training.model_copy(update={"participation": 0.07})})
    assert lambda_pull_risk(cfg, 30.0, 100)["lambda_releases"] == 100 * 30 * 7 / 100


def test_main_job_plan_does_not_warn():
    _, _, rows = plan_rows(3.0)
    assert "pull_warning" not in rows[0]
    assert rows[0]["lambda_pull"]["expected_unstable_pulls"] < 1e-6


def test_a_bounded_pull_has_nothing_to_warn_about_and_keeps_the_figures_stating_the_bound():
    """max_pull dropped the figures too: the plan no longer said how often the noise alone
    takes lr * lambda to the limit, which the bound then stops."""
    _, _, (unbounded,) = plan_rows(0.3)
    _, _, (row,) = plan_rows(0.3, max_pull=1.0)
    assert "pull_warning" not in row
    assert row["lambda_pull"] == {**unbounded["lambda_pull"], "max_pull": 1.0}
    assert row["lambda_pull"]["expected_unstable_pulls"] > 100
