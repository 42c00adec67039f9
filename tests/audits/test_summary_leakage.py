"""Summary-leakage audit on real rotated / label-skewed MNIST clients."""

from __future__ import annotations

import math

import pytest
import torch

from audits.summary_leakage import (
    LeakageError,
    cosine,
    leakage_from_similarity,
    leakage_from_summaries,
    noised_summaries,
    plain_summaries,
    population_prior,
    reconstruct_from_summary,
    run_summary_leakage_audit,
    truth_of,
)
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import build_clients


@pytest.fixture(scope="module")
def skewed():
    cfg = parse_config({"data": {"partition": "dirichlet", "dirichlet_alpha": 0.2,
                                 "num_clients": 4, "train_per_client": 300,
                                 "val_per_client": 8, "test_per_client": 8}})
    return build_clients(cfg)


@pytest.fixture(scope="module")
def audit(skewed):
    return run_summary_leakage_audit(skewed, clip_norm=10.0, noise_multiplier=0.05, seed=1)


def test_plain_summaries_reveal_each_clients_data_direction(audit):
    plain = audit.modes["plain"]
    assert plain.mean_image_cosine > 0.99
    assert plain.mean_image_cosine > plain.mean_prior_image_cosine
    assert plain.mean_label_cosine > 0.9 > plain.mean_prior_label_cosine
    assert plain.identification_accuracy == 1.0 and plain.chance_identification == 0.25


def test_encrypted_mode_gives_the_server_only_the_prior(audit):
    enc = audit.modes["encrypted"]
    for row in enc.clients:
        assert row.image_cosine == pytest.approx(row.prior_image_cosine)
        assert row.label_cosine == pytest.approx(row.prior_label_cosine)
    assert enc.identification_accuracy == pytest.approx(enc.chance_identification)
    assert enc.mean_label_cosine < audit.modes["plain"].mean_label_cosine


def test_noise_degrades_reconstruction(skewed, audit):
    light = audit.modes["noised"]
    assert light.mean_image_cosine > 0.95  # small noise: close to plain
    noised = noised_summaries(skewed, clip_norm=10.0, noise_multiplier=20.0, seed=1)
    heavy = leakage_from_summaries(skewed, noised, "noised",
                                   {"clip_norm": 10.0, "noise_multiplier": 20.0})
    assert heavy.mean_image_cosine < light.mean_image_cosine - 0.3
    assert heavy.details == {"clip_norm": 10.0, "noise_multiplier": 20.0}


def test_reconstruction_is_sign_invariant_and_reads_the_right_coordinates(skewed):
    u = plain_summaries(skewed[:1])[0]
    a, b = reconstruct_from_summary(u), reconstruct_from_summary(-u)
    assert torch.equal(a.image, b.image) and torch.equal(a.label_histogram, b.label_histogram)
    assert float(a.label_histogram.sum()) == pytest.approx(1.0)
    truth = truth_of(skewed[0])
    assert cosine(a.image, truth.image) > 0.99
    assert float(truth.label_histogram.sum()) == pytest.approx(1.0)
    prior = population_prior(skewed)
    assert prior.image.shape == (784,) and float(prior.label_histogram.sum()) == pytest.approx(1)


def test_report_serializes(audit):
    doc = audit.to_json()
    assert set(doc["modes"]) == {"plain", "noised", "encrypted"}
    assert [r["mode"] for r in audit.summary_rows()] == ["plain", "noised", "encrypted"]


def test_bad_inputs_are_rejected(skewed):
    u = plain_summaries(skewed)
    with pytest.raises(LeakageError, match="expected image_dim"):
        reconstruct_from_summary(torch.zeros(10))
    with pytest.raises(LeakageError, match="NaN"):
        reconstruct_from_summary(torch.full((794,), float("nan")))
    with pytest.raises(LeakageError, match="at least 2 clients"):
        run_summary_leakage_audit(skewed[:1])
    with pytest.raises(LeakageError, match="both clip_norm"):
        run_summary_leakage_audit(skewed, clip_norm=1.0)
    with pytest.raises(LeakageError, match="modes plain/noised"):
        leakage_from_summaries(skewed, u, "encrypted")
    with pytest.raises(LeakageError, match="must be"):
        leakage_from_summaries(skewed, u[:2], "plain")
    with pytest.raises(LeakageError, match="similarity must be"):
        leakage_from_similarity(skewed, torch.zeros(3, 3))
    with pytest.raises(LeakageError, match="different lengths"):
        cosine(torch.ones(3), torch.ones(4))
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0
    odd = skewed[0]
    bad_labels = type(odd)(9, odd.train_x[:3], torch.tensor([1, 2, 12]), odd.val_x, odd.val_y,
                           odd.test_x, odd.test_y)
    with pytest.raises(LeakageError, match="labels outside"):
        truth_of(bad_labels)
    empty = type(odd)(9, odd.train_x[:0], odd.train_y[:0], odd.val_x, odd.val_y, odd.test_x,
                      odd.test_y)
    with pytest.raises(LeakageError, match="no training rows"):
        truth_of(empty)
    small = type(odd)(9, odd.train_x[:, :, :14, :14].contiguous(), odd.train_y, odd.val_x,
                      odd.val_y, odd.test_x, odd.test_y)
    with pytest.raises(LeakageError, match="784"):
        run_summary_leakage_audit([small, small])
    with pytest.raises(LeakageError, match="ClientData"):
        run_summary_leakage_audit([odd, "client"])
    with pytest.raises(LeakageError, match="at least one client"):
        population_prior([])
    with pytest.raises(LeakageError, match="q must be"):
        run_summary_leakage_audit(skewed, q=0)
    with pytest.raises(LeakageError, match="clip_norm must be"):
        run_summary_leakage_audit(skewed, clip_norm=-1.0, noise_multiplier=1.0)


def test_per_client_noise_multipliers_match_one_client_at_a_time(skewed):
    """Clients with their own budgets have their own summary noise; each client's noised
    summary equals the one computed with its own multiplier alone."""
    sigmas = [0.05, 0.5, 0.05, 2.0]
    mixed = noised_summaries(skewed, 10.0, sigmas, seed=1)
    for i, sigma in enumerate(sigmas):
        assert torch.equal(mixed[i], noised_summaries(skewed, 10.0, sigma, seed=1)[i])
    report = run_summary_leakage_audit(skewed, clip_norm=10.0, noise_multiplier=sigmas, seed=1)
    assert report.to_json()["noise_multiplier"] == sigmas
    same = run_summary_leakage_audit(skewed, clip_norm=10.0, noise_multiplier=[0.05] * 4, seed=1)
    assert same.to_json()["noise_multiplier"] == 0.05
    with pytest.raises(LeakageError, match="3 noise multipliers for 4 clients"):
        run_summary_leakage_audit(skewed, clip_norm=10.0, noise_multiplier=sigmas[:3])


def test_wrong_argument_types_are_leakage_errors_naming_them(skewed):
    """A tau, seed or client list of the wrong type raised TypeErrors from torch or
    arithmetic deep inside ('unsupported operand', ''float' object is not iterable'), and a
    negative or zero tau was taken."""
    for bad in (None, 5.5, skewed[0]):
        with pytest.raises(LeakageError, match="^clients must be a sequence of ClientData"):
            run_summary_leakage_audit(bad)
    for tau in ("10", None, 0, -1.0, math.nan, True):
        with pytest.raises(LeakageError, match="^tau must be a finite number > 0"):
            run_summary_leakage_audit(skewed, tau=tau)
    for seed in ("0", None, -1):
        with pytest.raises(LeakageError, match="^seed must be an integer"):
            run_summary_leakage_audit(skewed, seed=seed)
    for sigma in ("abc", True, [1.0, None, 1.0, 1.0]):
        with pytest.raises(LeakageError, match="^noise_multiplier must be a number"):
            run_summary_leakage_audit(skewed, clip_norm=1.0, noise_multiplier=sigma)


def test_a_bad_seed_names_its_argument(skewed):
    """As the other audits' seed errors name their flag or argument."""
    with pytest.raises(LeakageError, match=r"\(the seed= argument\), got -1$"):
        run_summary_leakage_audit(skewed, seed=-1)


def test_wrong_dims_clients_and_labels_are_leakage_errors_naming_them(skewed):
    """A str image_dim or num_classes raised TypeErrors ('can only concatenate str', bincount's
    minlength), a client that is no ClientData an AttributeError, float labels torch's
    NotImplementedError and a client without rows an IndexError; a negative image_dim and
    population_prior(num_classes=0) (its histogram as long as the largest label) were taken."""
    u = plain_summaries(skewed)[0]
    for name, kwargs in (("image_dim", {"image_dim": "784"}), ("image_dim", {"image_dim": -10,
                                                                             "num_classes": 804}),
                         ("num_classes", {"num_classes": 0}), ("num_classes", {"num_classes": 1.0})):
        with pytest.raises(LeakageError, match=f"^{name} must be an int >= 1"):
            reconstruct_from_summary(u, **kwargs)
    for num_classes in ("10", 0, -1, True):
        with pytest.raises(LeakageError, match="^num_classes must be an int >= 1"):
            truth_of(skewed[0], num_classes)
        with pytest.raises(LeakageError, match="^num_classes must be an int >= 1"):
            population_prior(skewed, num_classes)
    with pytest.raises(LeakageError, match="^client must be ClientData, got str"):
        truth_of("client")
    with pytest.raises(LeakageError, match="^clients must be ClientData, got str"):
        population_prior([skewed[0], "client"])
    with pytest.raises(LeakageError, match="^clients must be a sequence of ClientData"):
        population_prior(skewed[0])
    with pytest.raises(LeakageError, match="labels outside \\[0, 3\\)"):
        population_prior(skewed, 3)
    odd = skewed[0]
    multi_hot = type(odd)(9, odd.train_x[:3], torch.eye(10)[:3], odd.val_x, odd.val_y,
                          odd.test_x, odd.test_y)
    empty = type(odd)(9, odd.train_x[:0], odd.train_y[:0], odd.val_x, odd.val_y, odd.test_x,
                      odd.test_y)
    with pytest.raises(LeakageError, match="needs integer class labels"):
        run_summary_leakage_audit([odd, multi_hot])
    with pytest.raises(LeakageError, match="^client 9 has no training rows"):
        run_summary_leakage_audit([odd, empty])
    assert torch.equal(population_prior([*skewed, empty]).image, population_prior(skewed).image)


def test_clip_norm_and_noise_multiplier_beyond_the_configs_caps_are_leakage_errors(skewed):
    """clip_norm=1e30 and noise multipliers of 1e300 were audited, though the config caps
    privacy.summary_clip at 1e6 and the noise multiplier at MAX_NOISE_MULTIPLIER; a bool clip,
    a zero, negative or NaN multiplier were the mechanism's MechanismError."""
    from privacy.accounting import MAX_NOISE_MULTIPLIER
    from secure_fedora.core.config import MAX_SCALE

    for clip in (1e30, MAX_SCALE * 2, True, 0.0, math.inf, "1.0"):
        with pytest.raises(LeakageError, match=r"^clip_norm must be a number in \(0, 1e\+06\]"):
            run_summary_leakage_audit(skewed, clip_norm=clip, noise_multiplier=1.0)
        with pytest.raises(LeakageError, match="^clip_norm must be"):
            noised_summaries(skewed, clip, 1.0)
    for sigma in (1e300, MAX_NOISE_MULTIPLIER * 2, 0, -1.0, math.nan, [1.0, 1.0, 1.0, math.inf]):
        with pytest.raises(LeakageError, match=r"^noise_multiplier must be in \(0, "):
            run_summary_leakage_audit(skewed, clip_norm=1.0, noise_multiplier=sigma)
    report = run_summary_leakage_audit(skewed[:2], clip_norm=MAX_SCALE,
                                       noise_multiplier=MAX_NOISE_MULTIPLIER)
    assert report.clip_norm == MAX_SCALE


def test_a_tau_beyond_floats_range_is_a_leakage_error(skewed):
    """An int tau beyond float's range raised math's OverflowError ('int too large to convert
    to float')."""
    with pytest.raises(LeakageError, match="^tau must be a finite number > 0"):
        run_summary_leakage_audit(skewed, tau=10**400)


def test_a_tau_whose_raw_similarities_overflow_is_audited(skewed):
    """tau = 1000 raised RelatednessError ("exp(tau * sum of the cosines) overflows float64")
    from the encrypted mode's stand-in similarity matrix, though a FEDORA run with that tau
    completes (its graph is built from the cosine sums); the audit now runs and gives the
    same verdicts as at the default tau (no mode's result depends on tau)."""
    big = run_summary_leakage_audit(skewed, tau=1000.0)
    assert big.to_json()["modes"] == run_summary_leakage_audit(skewed).to_json()["modes"]
