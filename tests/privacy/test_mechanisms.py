"""Gaussian mechanism, row clipping, noised second moment, top eigenvectors, noised scalar."""

from __future__ import annotations

import pytest
import torch

from privacy.mechanisms import (
    GaussianMechanism,
    MechanismError,
    clip_rows,
    noised_mean_sensitivity,
    noised_scalar,
    noised_second_moment,
    scalar_record,
    second_moment_sensitivity,
    summary_record,
    top_eigenvectors,
)
from privacy.noise import CsprngNoise, ReproducibleNoise


def _gen(seed: int = 0) -> ReproducibleNoise:
    return ReproducibleNoise(seed)


def test_gaussian_mechanism_noise_std_and_record():
    mech = GaussianMechanism(2.0, 0.25)
    assert mech.std == 0.5
    value = torch.full((200_000,), 3.0)
    out = mech.release(value, _gen())
    assert out.shape == value.shape and out.dtype == value.dtype
    noise = out - value
    assert float(noise.std()) == pytest.approx(0.5, rel=0.01)
    assert abs(float(noise.mean())) < 0.005
    assert torch.equal(value, torch.full((200_000,), 3.0))  # input untouched
    rec = mech.record("gaussian", n=10)
    assert (rec.noise_multiplier, rec.sample_rate, rec.steps) == (2.0, 1.0, 1)
    assert rec.params == {"sensitivity": 0.25, "n": 10}
    with pytest.raises(MechanismError, match="sensitivity"):
        mech.record("gaussian", sensitivity=0.1)  # a record cannot understate the sensitivity


def test_gaussian_mechanism_rejects_bad_input():
    with pytest.raises(MechanismError, match="noise_multiplier"):
        GaussianMechanism(0.0, 1.0)
    with pytest.raises(MechanismError, match="sensitivity"):
        GaussianMechanism(1.0, -1.0)
    mech = GaussianMechanism(1.0, 1.0)
    with pytest.raises(MechanismError, match="NoiseSource"):
        mech.release(torch.zeros(3), None)
    with pytest.raises(MechanismError, match="floating-point"):
        mech.release(torch.zeros(3, dtype=torch.long), _gen())
    with pytest.raises(MechanismError, match="NaN"):
        mech.release(torch.tensor([1.0, float("nan")]), _gen())
    with pytest.raises(MechanismError, match="Tensor"):
        mech.release([1.0, 2.0], _gen())


def test_clip_rows():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]])
    out = clip_rows(z, 1.0)
    norms = out.norm(dim=1)
    assert torch.allclose(norms, torch.tensor([1.0, 0.5, 0.0, 1.0]))
    assert torch.equal(out[1], z[1]) and torch.equal(out[2], z[2])
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8]))  # direction kept
    with pytest.raises(MechanismError, match="2-D"):
        clip_rows(torch.zeros(3), 1.0)
    with pytest.raises(MechanismError, match="max_norm"):
        clip_rows(z, 0.0)


def test_a_row_whose_norm_overflows_is_clipped_to_the_bound_not_dropped():
    """A float32 row with finite entries whose L2 norm overflows float32 (3e19 and 4e19: a
    squared norm of 2.5e39) was scaled by max_norm / inf = 0, so it vanished from the clipped
    data; it is clipped to the bound in its own direction, as DP-SGD clips such a gradient.
    The other rows keep their bits."""
    z = torch.tensor([[3e19, -4e19], [3.0, 4.0], [0.3, 0.4]], dtype=torch.float32)
    out = clip_rows(z, 2.0)
    assert torch.allclose(out[0], torch.tensor([1.2, -1.6]))
    assert torch.equal(out[1:], clip_rows(z[1:], 2.0))


def test_second_moment_exact_without_noise_and_its_sensitivity_claim():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(50, 6, generator=g, dtype=torch.float64) * 2
    r = 1.5
    tiny = noised_second_moment(z, r, 1e-12, _gen(), n=50)
    zc = clip_rows(z, r)
    torch.testing.assert_close(tiny, zc.T @ zc / 50)
    # Neighbour: add one row of norm > R. M changes by clip(z)clip(z)^T/n, Frobenius R^2/n.
    extra = torch.randn(1, 6, generator=g, dtype=torch.float64) * 10
    z2 = torch.cat([z, extra])
    m1 = noised_second_moment(z, r, 1e-12, _gen(), n=50)
    m2 = noised_second_moment(z2, r, 1e-12, _gen(), n=50)
    diff = float(torch.linalg.matrix_norm(m2 - m1))
    assert diff == pytest.approx(second_moment_sensitivity(r, 50), rel=1e-6)
    assert second_moment_sensitivity(r, 50) == r**2 / 50


def test_second_moment_noise_is_symmetric_with_the_documented_variances():
    d, n, r, sigma = 40, 200, 2.0, 3.0
    s = sigma * r**2 / n
    diag, off = [], []
    for seed in range(15):
        m = noised_second_moment(torch.zeros(n, d, dtype=torch.float64), r, sigma, _gen(seed))
        assert torch.equal(m, m.T)
        diag.append(torch.diagonal(m))
        iu = torch.triu_indices(d, d, offset=1)
        off.append(m[iu[0], iu[1]])
    diag_t, off_t = torch.cat(diag), torch.cat(off)
    assert float(diag_t.var()) == pytest.approx(s**2, rel=0.15)       # 600 samples
    assert float(off_t.var()) == pytest.approx(s**2 / 2, rel=0.05)    # 11,700 samples
    rec = summary_record(r, sigma, n, q=1)
    assert rec.params["sensitivity"] == r**2 / n and rec.sample_rate == 1.0


class _CountingNoise(ReproducibleNoise):
    """Counts the normal values drawn."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.drawn = 0

    def normal(self, shape, std, dtype=torch.float32, device=None):  # type: ignore[no-untyped-def]
        self.drawn += int(torch.Size(shape).numel())
        return super().normal(shape, std, dtype, device)


@pytest.mark.parametrize("d", [1, 2, 7, 40])
def test_second_moment_noise_draws_only_the_independent_entries(d: int) -> None:
    noise = _CountingNoise(3)
    m = noised_second_moment(torch.zeros(5, d, dtype=torch.float64), 1.0, 2.0, noise)
    assert noise.drawn == d * (d + 1) // 2
    assert m.shape == (d, d) and torch.equal(m, m.T)


def test_second_moment_noise_mixes_csprng_draws_with_the_documented_variances() -> None:
    d, n, r, sigma = 120, 100, 1.0, 2.0
    s = sigma * r**2 / n
    iu = torch.triu_indices(d, d, offset=1)
    diag, off = [], []
    for _ in range(5):
        m = noised_second_moment(torch.zeros(n, d, dtype=torch.float64), r, sigma, CsprngNoise())
        assert torch.equal(m, m.T)
        diag.append(torch.diagonal(m))
        off.append(m[iu[0], iu[1]])
    diag_t, off_t = torch.cat(diag), torch.cat(off)
    # unseeded draws: each tolerance is about 5 standard errors of the variance estimate
    assert float(diag_t.var()) == pytest.approx(s**2, rel=0.3)        # 600 samples
    assert float(off_t.var()) == pytest.approx(s**2 / 2, rel=0.04)    # 35,700 samples
    # Distinct entries are independent draws, not copies of one another.
    assert len(set(off_t.tolist())) == off_t.numel()


def test_release_symmetric_symmetrizes_an_asymmetric_value_and_refuses_non_square() -> None:
    mech = GaussianMechanism(1e-12, 1.0)
    value = torch.tensor([[1.0, 2.0], [4.0, 3.0]], dtype=torch.float64)
    out = mech.release_symmetric(value, _gen())
    assert torch.equal(out, out.T)
    torch.testing.assert_close(out, torch.tensor([[1.0, 3.0], [3.0, 3.0]],
                                                 dtype=torch.float64))
    with pytest.raises(MechanismError, match="square"):
        mech.release_symmetric(torch.zeros(2, 3), _gen())
    with pytest.raises(MechanismError, match="NaN"):
        mech.release_symmetric(torch.full((2, 2), float("nan")), _gen())


def test_second_moment_rejects_bad_input():
    with pytest.raises(MechanismError, match="2-D"):
        noised_second_moment(torch.zeros(4), 1.0, 1.0, _gen())
    with pytest.raises(MechanismError, match="no rows"):
        noised_second_moment(torch.zeros(0, 3), 1.0, 1.0, _gen())
    assert noised_second_moment(torch.zeros(0, 3), 1.0, 1.0, _gen(), n=10).shape == (3, 3)
    with pytest.raises(MechanismError, match="n must"):
        noised_second_moment(torch.zeros(4, 3), 1.0, 1.0, _gen(), n=0)
    with pytest.raises(MechanismError, match="clip_norm"):
        noised_second_moment(torch.zeros(4, 3), -1.0, 1.0, _gen())


def test_top_eigenvectors_order_sign_and_orthonormality():
    g = torch.Generator().manual_seed(3)
    q_mat, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    eigvals = torch.tensor([5.0, -7.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    m = q_mat @ torch.diag(eigvals) @ q_mat.T
    u = top_eigenvectors(m, 2)
    assert u.shape == (5, 2)
    # algebraically largest first: 5 then 3 (not -7)
    for col, idx in ((0, 0), (1, 2)):
        v = q_mat[:, idx]
        assert abs(float(u[:, col] @ v)) == pytest.approx(1.0, abs=1e-10)
        assert float(u[u[:, col].abs().argmax(), col]) > 0
    torch.testing.assert_close(u.T @ u, torch.eye(2, dtype=torch.float64))
    # Deterministic signs: same subspace from a sign-flipped construction gives the same output
    flipped = q_mat * torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(top_eigenvectors(flipped @ torch.diag(eigvals) @ flipped.T, 2), u)
    with pytest.raises(MechanismError, match="q must"):
        top_eigenvectors(m, 0)
    with pytest.raises(MechanismError, match="q must"):
        top_eigenvectors(m, 6)
    with pytest.raises(MechanismError, match="square"):
        top_eigenvectors(torch.zeros(3, 4), 1)


def _random_symmetric(d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((a + a.T) / 2).to(dtype)


def _projector(u: torch.Tensor) -> torch.Tensor:
    u = u.double()
    return u @ u.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("d", "q"), [(1, 1), (2, 1), (7, 3), (7, 7), (40, 1), (40, 5), (40, 40), (150, 1), (150, 20)]
)
def test_top_eigenvectors_span_the_top_eigenspace_of_a_full_decomposition(d, q, dtype):
    m = _random_symmetric(d, dtype, seed=d * 100 + q)
    u = top_eigenvectors(m, q)
    assert u.shape == (d, q) and u.dtype == dtype and u.device == m.device
    assert u.is_contiguous() and not u.requires_grad
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    evals, evecs = torch.linalg.eigh(m.double())
    # a random matrix has simple eigenvalues (the gap below the q-th is far above tol)
    top = evecs[:, d - q :]
    assert float((_projector(u) - _projector(top)).abs().max()) < tol
    torch.testing.assert_close(
        u.double().T @ u.double(), torch.eye(q, dtype=torch.float64), atol=tol, rtol=0
    )
    # decreasing eigenvalues: the Rayleigh quotients are the top q, largest first
    rayleigh = torch.einsum("ij,ik,kj->j", u.double(), m.double(), u.double())
    torch.testing.assert_close(rayleigh, evals.flip(0)[:q], atol=tol * max(1, d), rtol=0)
    # sign: the entry of largest magnitude of each column is positive
    assert bool((u[u.abs().argmax(dim=0), torch.arange(q)] > 0).all())


def test_top_eigenvectors_of_repeated_eigenvalues_are_an_orthonormal_basis_of_the_eigenspace():
    d = 9
    ident = top_eigenvectors(torch.eye(d, dtype=torch.float64), 4)
    torch.testing.assert_close(ident.T @ ident, torch.eye(4, dtype=torch.float64))
    assert top_eigenvectors(torch.eye(d, dtype=torch.float64), d).shape == (d, d)
    # eigenvalue 5 three times, 2 twice, then 1: block-diagonal, then rotated
    rot, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    )
    vals = torch.tensor([5.0, 5, 5, 2, 2, 1, 1, 1, 1], dtype=torch.float64)
    for m, basis in (
        (torch.diag(vals), torch.eye(d, dtype=torch.float64)),
        (rot @ torch.diag(vals) @ rot.T, rot),
    ):
        p5 = _projector(basis[:, :3])
        for q in (1, 2, 3):
            u = top_eigenvectors(m, q)
            torch.testing.assert_close(u.T @ u, torch.eye(q, dtype=torch.float64))
            torch.testing.assert_close(p5 @ u, u)  # inside the eigenspace of 5
        torch.testing.assert_close(_projector(top_eigenvectors(m, 3)), p5)
        torch.testing.assert_close(_projector(top_eigenvectors(m, 5)), _projector(basis[:, :5]))


def test_top_eigenvectors_symmetrize_first_and_refuse_bad_input():
    m = _random_symmetric(6, torch.float64, seed=1)
    skew = torch.triu(torch.ones(6, 6, dtype=torch.float64), diagonal=1)
    torch.testing.assert_close(top_eigenvectors(m + skew - skew.T, 2), top_eigenvectors(m, 2))
    grad = m.clone().requires_grad_(True)
    torch.testing.assert_close(top_eigenvectors(grad, 2), top_eigenvectors(m, 2))
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = m.clone()
        poisoned[2, 3] = bad
        with pytest.raises(MechanismError, match="NaN or infinite"):
            top_eigenvectors(poisoned, 1)
    with pytest.raises(MechanismError, match="float32 or float64"):
        top_eigenvectors(m.half(), 1)
    with pytest.raises(MechanismError, match="floating-point"):
        top_eigenvectors(torch.eye(3, dtype=torch.int64), 1)
    with pytest.raises(MechanismError, match="q must"):
        top_eigenvectors(m, True)


def test_top_eigenvectors_are_bit_identical_whatever_the_thread_counts():
    """The summary release is computed in each Flower ClientApp and in one in-process run,
    whose torch and BLAS thread counts differ; a threaded solver sums in a thread-dependent
    order, so its last bits (and the released summary) would differ between runtimes."""
    from threadpoolctl import threadpool_limits

    m = _random_symmetric(300, torch.float64, seed=4)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with threadpool_limits(limits=threads, user_api="blas"):
                outs.append(top_eigenvectors(m, 3))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(top_eigenvectors(m, 3), outs[0])  # and repeatable


def test_top_eigenvectors_fall_back_to_the_full_solver_if_inverse_iteration_fails(monkeypatch):
    import numpy as np
    import scipy.linalg

    m = _random_symmetric(30, torch.float64, seed=6)
    expected = top_eigenvectors(m, 4)
    real_eigh = scipy.linalg.eigh

    def failing_subset_eigh(*args, **kwargs):
        if kwargs.get("subset_by_index") is not None:
            raise np.linalg.LinAlgError("2 eigenvectors failed to converge")
        return real_eigh(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", failing_subset_eigh)
    u = top_eigenvectors(m, 4)
    assert float((_projector(u) - _projector(expected)).abs().max()) < 1e-10
    assert bool((u[u.abs().argmax(dim=0), torch.arange(4)] > 0).all())


def test_noised_scalar_clamps_per_record_and_noise_matches_sensitivity():
    values = torch.tensor([0.5, -3.0, 10.0, 0.1], dtype=torch.float64)
    exact = noised_scalar(values, 1.0, 1e-12, _gen())
    assert exact.ndim == 0
    assert float(exact) == pytest.approx((0.5 - 1.0 + 1.0 + 0.1) / 4)
    # Neighbour (remove one record, m public): the clamped mean moves by at most clip/m.
    removed = noised_scalar(values[:3], 1.0, 1e-12, _gen(), m=4)
    assert abs(float(exact - removed)) <= noised_mean_sensitivity(1.0, 4) + 1e-12
    assert noised_mean_sensitivity(2.0, 50) == 2.0 / 50
    sigma, clip, m = 2.0, 0.5, 20
    zeros = torch.zeros(m, dtype=torch.float64)
    draws = torch.stack([noised_scalar(zeros, clip, sigma, _gen(s)) for s in range(3000)])
    assert float(draws.std()) == pytest.approx(sigma * clip / m, rel=0.05)
    rec = scalar_record(clip, sigma, m)
    assert rec.mechanism == "gaussian_lambda" and rec.params["sensitivity"] == clip / m


def test_noised_scalar_rejects_bad_input():
    with pytest.raises(MechanismError, match="1-D"):
        noised_scalar(torch.tensor(0.3), 1.0, 1.0, _gen())
    with pytest.raises(MechanismError, match="empty"):
        noised_scalar(torch.zeros(0), 1.0, 1.0, _gen())
    with pytest.raises(MechanismError, match="clip"):
        noised_scalar(torch.zeros(3), 0.0, 1.0, _gen())
    with pytest.raises(MechanismError, match="m must"):
        noised_scalar(torch.zeros(3), 1.0, 1.0, _gen(), m=0)


def test_mechanism_registry_recomputes_recorded_sensitivities_and_lists_names():
    from privacy.mechanisms import MECHANISMS, MechanismRegistry, MechanismSpec

    assert MECHANISMS.names()[:3] == ("dpsgd", "gaussian_summary", "gaussian_lambda")
    summary = summary_record(2.5, 3.0, 70, 2)
    assert MECHANISMS.expected_sensitivity("gaussian_summary", summary.params) == \
        second_moment_sensitivity(2.5, 70) == summary.params["sensitivity"]
    lam = scalar_record(0.3, 2.0, 17)
    assert MECHANISMS.expected_sensitivity("gaussian_lambda", lam.params) == \
        noised_mean_sensitivity(0.3, 17) == lam.params["sensitivity"]
    # not recomputable: DP-SGD has no formula; unknown names; missing or ill-typed inputs
    assert MECHANISMS.expected_sensitivity("dpsgd", {"clip_norm": 1.0}) is None
    assert MECHANISMS.expected_sensitivity("laplace", {"clip": 1.0, "m": 3}) is None
    assert MECHANISMS.expected_sensitivity("gaussian_lambda", {"clip": 1.0}) is None
    assert MECHANISMS.expected_sensitivity("gaussian_lambda", {"clip": 1.0, "m": 0}) is None
    assert MECHANISMS.expected_sensitivity("gaussian_lambda", {"clip": True, "m": 3}) is None
    assert MECHANISMS.expected_sensitivity("gaussian_summary", {"clip_norm": 1.0, "n": 2.0}) is None
    with pytest.raises(MechanismError, match="registered: .*gaussian_lambda"):
        MECHANISMS.get("laplace")
    registry = MechanismRegistry()
    registry.register(MechanismSpec("laplace", "test", {"scale": "number"}, lambda p: p["scale"]))
    assert "laplace" in registry and registry.expected_sensitivity("laplace", {"scale": 2}) == 2
    with pytest.raises(MechanismError, match="already registered"):
        registry.register(MechanismSpec("laplace", "again"))
    with pytest.raises(MechanismError, match="'number' or 'count'"):
        registry.register(MechanismSpec("bad", "x", {"k": "float"}, lambda p: 1.0))


def test_a_registered_mechanisms_gaussian_record_carries_the_sensitivity_its_formula_gives():
    """A plug-in's accounting record: ``(noise_multiplier, 1.0, 1)`` with the sensitivity of
    its formula added to the params (as the auditor recomputes it); params that cannot give
    one, or that claim their own, are refused."""
    from privacy.mechanisms import MechanismRegistry, MechanismSpec

    registry = MechanismRegistry()
    registry.register(MechanismSpec("share", "test", {"clip": "number", "m": "count"},
                                    lambda p: float(p["clip"]) / p["m"],
                                    record_params=lambda cfg: {"clip": 2.0, "m": 8}))
    record = registry.gaussian_record("share", 3.0, {"clip": 2.0, "m": 8})
    assert (record.mechanism, record.noise_multiplier, record.sample_rate, record.steps) == \
        ("share", 3.0, 1.0, 1)
    assert record.params == {"clip": 2.0, "m": 8, "sensitivity": 0.25}
    assert registry.expected_sensitivity("share", record.params) == 0.25
    with pytest.raises(MechanismError, match="lack or mistype a sensitivity input"):
        registry.gaussian_record("share", 3.0, {"clip": 2.0, "m": 0})
    with pytest.raises(MechanismError, match="may not set 'sensitivity'"):
        registry.gaussian_record("share", 3.0, {"clip": 2.0, "m": 8, "sensitivity": 0.1})
    with pytest.raises(MechanismError, match="sensitivity must be a finite number > 0"):
        registry.gaussian_record("share", 3.0, {"clip": 0.0, "m": 8})
    registry.register(MechanismSpec("noformula", "test"))
    with pytest.raises(MechanismError, match="has no sensitivity formula"):
        registry.gaussian_record("noformula", 3.0, {})


def test_a_plug_in_mechanism_registered_again_says_to_unregister_it_first() -> None:
    """A notebook cell run again (an edited sensitivity formula) had no way out but a new
    process: the refusal names MECHANISMS.unregister, which removes a plug-in, not a built-in."""
    from privacy.mechanisms import MECHANISMS, MechanismError, MechanismSpec

    spec = MechanismSpec("again_test", "x", {"m": "count"}, lambda p: 1.0 / p["m"],
                         record_params=lambda cfg: {"m": 4})
    MECHANISMS.register(spec)
    try:
        with pytest.raises(MechanismError, match=r"call MECHANISMS.unregister\('again_test'\)"):
            MECHANISMS.register(spec)
        MECHANISMS.unregister("again_test")
        MECHANISMS.register(spec)
    finally:
        MECHANISMS.unregister("again_test")
    assert "again_test" not in MECHANISMS
    for builtin in ("dpsgd", "gaussian_summary", "gaussian_lambda"):
        with pytest.raises(MechanismError, match="is built in: it cannot be removed"):
            MECHANISMS.unregister(builtin)
        with pytest.raises(MechanismError, match="already registered$"):
            MECHANISMS.register(MechanismSpec(builtin, "x"))


def test_finite_checks_refuse_every_non_finite_entry_and_accept_sums_that_overflow():
    huge = torch.tensor([1e308, 1e308, -1e308, 1e308], dtype=torch.float64)  # sums to inf
    assert torch.equal(GaussianMechanism(1e-300, 1.0).release(huge, _gen()), huge)
    assert clip_rows(torch.full((2, 3), 6e4, dtype=torch.float16), 1.0).isfinite().all()
    for bad in ([float("inf"), -float("inf")], [float("nan"), 1.0], [1.0, -float("inf")]):
        with pytest.raises(MechanismError, match="NaN or infinite"):
            GaussianMechanism(1.0, 1.0).release(torch.tensor(bad), _gen())
        with pytest.raises(MechanismError, match="NaN or infinite"):
            clip_rows(torch.tensor([bad]), 1.0)
        with pytest.raises(MechanismError, match="NaN or infinite"):
            noised_second_moment(torch.tensor([bad, [0.5, 0.5]]), 1.0, 1.0, _gen())


@pytest.mark.parametrize(
    ("dtype", "digest"),
    [
        (torch.float32, "46c0b32cbea9b3da84f151d7070f0ab4037be38516e25465abc4acd1efaf31f2"),
        (torch.float64, "01a1f87d8a6735c8368f68d3258bada46327f9a1547c2c7629edfc18e1088a64"),
    ],
)
def test_release_symmetric_of_an_asymmetric_value_is_bit_identical_to_the_pinned_one(dtype, digest):
    import hashlib

    # pinned with the code before the summary path skipped its repeated work
    value = torch.arange(49, dtype=dtype).reshape(7, 7) / 8
    out = GaussianMechanism(2.0, 0.5).release_symmetric(value, ReproducibleNoise(9))
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest() == digest
    assert torch.equal(value, torch.arange(49, dtype=dtype).reshape(7, 7) / 8)  # untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_eigenvectors_of_a_matrix_and_of_its_symmetrization_are_bit_identical(dtype):
    m = torch.randn(40, 40, generator=torch.Generator().manual_seed(4), dtype=dtype)
    sym = (m + m.T) / 2
    assert torch.equal(top_eigenvectors(m, 3), top_eigenvectors(sym, 3))
    assert torch.equal(top_eigenvectors(m.T, 3), top_eigenvectors(sym, 3))  # a strided view
    before = sym.clone()
    top_eigenvectors(sym, 3)
    assert torch.equal(sym, before)  # the input is never overwritten (LAPACK gets a copy)


def test_summaries_of_entries_beyond_half_the_largest_float_are_exact():
    # (m + m^T) / 2 overflows there: it used to hand LAPACK infinities and return a (3, 0)
    # tensor; a symmetric matrix is used as it is, an asymmetric one symmetrized by halves.
    m = torch.tensor(
        [[1e308, 1e307, 0.0], [1e307, 3e307, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    expected = torch.linalg.eigh(m / 1e308).eigenvectors[:, -1:]
    expected = expected * torch.sign(expected[expected.abs().argmax()])
    torch.testing.assert_close(top_eigenvectors(m, 1), expected)
    skewed = m.clone()
    skewed[0, 1], skewed[1, 0] = 1.5e307, 0.5e307
    torch.testing.assert_close(top_eigenvectors(skewed, 1), expected)
    out = GaussianMechanism(1e-300, 1.0).release_symmetric(m, _gen())
    assert torch.equal(out, out.T) and bool(out.isfinite().all())
    torch.testing.assert_close(out, m)
