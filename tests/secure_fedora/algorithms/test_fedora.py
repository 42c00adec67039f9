"""FEDORA's math against small hand-computed cases (docs/design.md section 2)."""

import math

import pytest
import torch

from secure_fedora.algorithms import fedora
from secure_fedora.algorithms.fedora import RelatednessError


def test_summary_is_top_left_singular_vector_of_stacked_rows():
    x = torch.tensor([[[3.0, 0.0]], [[3.0, 0.0]]])  # two rows, 2 "pixels"
    y = torch.tensor([0, 0])
    u = fedora.client_summary(x, y, num_classes=2, q=1)
    # Z = [[3,0,1,0],[3,0,1,0]]: rank one, direction (3,0,1,0)/sqrt(10)
    expected = torch.tensor([3.0, 0.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(10)
    assert u.shape == (4, 1)
    assert torch.allclose(u[:, 0], expected, atol=1e-12)


def test_summary_columns_orthonormal_and_sign_fixed():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 3, 3, generator=gen)
    y = torch.randint(0, 3, (20,), generator=gen)
    u = fedora.client_summary(x, y, 3, q=3)
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-10)
    idx = u.abs().argmax(dim=0)
    assert (u[idx, torch.arange(3)] > 0).all()
    # flipping the data's sign convention cannot change the summary
    assert torch.allclose(fedora.client_summary(x, y, 3, q=3), u)


def test_summary_rejects_bad_input():
    with pytest.raises(RelatednessError, match="rows"):
        fedora.client_summary(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(RelatednessError, match="labels"):
        fedora.client_summary(torch.zeros(2, 4), torch.tensor([0, 5]), 2)
    with pytest.raises(RelatednessError, match="q must"):
        fedora.client_summary(torch.zeros(2, 4), torch.tensor([0, 1]), 2, q=9)


def test_summary_refuses_rows_of_rank_below_q():
    # ten copies of one row: rank 1, so a second direction would be any null-space vector
    # LAPACK returns (a 1e-7 rescale of the features once moved a cosine sum from 0.89 to 1.26)
    x = torch.tensor([[0.3, -1.2, 0.7, 2.0]]).repeat(10, 1)
    y = torch.zeros(10, dtype=torch.long)
    assert fedora.client_summary(x, y, 3, q=1).shape == (7, 1)
    with pytest.raises(RelatednessError, match=r"client 4's .* span only 1 direction .* "
                                               r"use fedora.q <= 1"):
        fedora.client_summary(x, y, 3, q=2, client=4)
    with pytest.raises(RelatednessError, match="client 1's .* are all zero"):
        fedora.client_summary(torch.zeros(4, 3), torch.zeros(4, 2), 2, q=1, client=1)


def test_summary_refuses_a_tie_at_the_qth_singular_value():
    # all-zero inputs, two rows of each class: three equal singular values, no unique top 1
    x = torch.zeros(6, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(RelatednessError, match="equal singular values 1 and 2"):
        fedora.client_summary(x, y, 3, q=1)
    # the top 3 are unique: the span of the classes
    u = fedora.client_summary(x, y, 3, q=3)
    assert torch.allclose(u @ u.T, torch.diag(torch.tensor([0.0] * 4 + [1.0] * 3,
                                                            dtype=torch.float64)), atol=1e-12)


def test_similarity_from_principal_angles_by_hand():
    # three 1-d subspaces of R^2 at 0, 60 and 90 degrees
    def unit(deg):
        r = math.radians(deg)
        return torch.tensor([[math.cos(r)], [math.sin(r)]], dtype=torch.float64)

    u = torch.stack([unit(0), unit(60), unit(90)])
    s = fedora.similarity_matrix(fedora.subspace_overlaps(u), tau=10.0)
    assert s[0, 0] == 0 and s[1, 1] == 0 and s[2, 2] == 0
    assert s[0, 1].item() == pytest.approx(math.exp(10 * 0.5))
    assert s[1, 2].item() == pytest.approx(math.exp(10 * math.cos(math.radians(30))))
    assert s[0, 2].item() == pytest.approx(1.0, abs=1e-9)  # cos 90 = 0 -> exp(0)
    assert torch.allclose(s, s.T)


def test_similarity_is_sign_invariant_and_sums_cosines_for_q2():
    u = torch.eye(4, dtype=torch.float64)[:, :2].unsqueeze(0)
    v = torch.eye(4, dtype=torch.float64)[:, [0, 2]].unsqueeze(0) * -1
    s = fedora.similarity_matrix(fedora.subspace_overlaps(torch.cat([u, v])), tau=1.0)
    # principal cosines between span(e1,e2) and span(e1,e3): 1 and 0
    assert s[0, 1].item() == pytest.approx(math.e)


def test_topk_graph_keeps_k_largest_and_is_row_stochastic():
    s = torch.tensor(
        [[0.0, 4.0, 1.0, 3.0], [4.0, 0.0, 2.0, 1.0], [1.0, 2.0, 0.0, 8.0], [3.0, 1.0, 8.0, 0.0]]
    )
    g = fedora.topk_graph(s, k=2)
    expected = torch.tensor(
        [[0, 4 / 7, 0, 3 / 7], [4 / 6, 0, 2 / 6, 0], [0, 2 / 10, 0, 8 / 10], [3 / 11, 0, 8 / 11, 0]],
        dtype=torch.float64,
    )
    assert torch.allclose(g, expected)
    assert torch.allclose(g.sum(1), torch.ones(4, dtype=torch.float64))
    assert (torch.diagonal(g) == 0).all()


def test_topk_graph_never_selects_self_and_validates():
    s = torch.zeros(3, 3)
    s[0, 1] = s[1, 0] = 1.0
    with pytest.raises(RelatednessError, match="no positive similarity"):
        fedora.topk_graph(s, 1)
    with pytest.raises(RelatednessError, match="k must"):
        fedora.topk_graph(torch.ones(3, 3), 0)
    with pytest.raises(RelatednessError, match="finite"):
        fedora.topk_graph(torch.full((3, 3), float("nan")), 1)
    g = fedora.topk_graph(torch.ones(3, 3), k=5)  # k >= N-1 keeps all others
    assert torch.allclose(g, torch.tensor([[0, .5, .5], [.5, 0, .5], [.5, .5, 0]], dtype=torch.float64))


def test_propagation_matrix_by_hand_two_clients():
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    p = fedora.propagation_matrix(g, alpha=0.5)
    # (1-a) (I - aS)^-1 with S the swap: 0.5 * [[1,-.5],[-.5,1]]^-1 = [[2/3,1/3],[1/3,2/3]]
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]], dtype=torch.float64))


def test_power_iteration_equals_dense_inverse():
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(30, 30, generator=gen, dtype=torch.float64)
    g = fedora.topk_graph(s, k=3)
    dense = fedora.propagation_matrix(g, 0.8)
    assert torch.allclose(dense.sum(1), torch.ones(30, dtype=torch.float64))
    assert torch.allclose(fedora.propagation_matrix_power(g, 0.8), dense, atol=1e-10)
    theta = torch.randn(30, 50, generator=gen, dtype=torch.float64)
    assert torch.allclose(fedora.propagate_power(g, theta, 0.8, tol=1e-12), dense @ theta, atol=1e-9)
    assert torch.allclose(fedora.propagate(dense, theta), dense @ theta)


def test_propagation_rejects_bad_alpha_and_shapes():
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(RelatednessError, match="alpha"):
        fedora.propagation_matrix(g, 1.0)
    with pytest.raises(RelatednessError, match="does not match"):
        fedora.propagate(torch.eye(2), torch.zeros(3, 5))


def test_regularization_weight_is_selective():
    assert fedora.regularization_weight(1.0, 2.0) == 0.0
    assert fedora.regularization_weight(1.0, 1.0) == 0.0
    assert fedora.regularization_weight(3.0, 1.0) == pytest.approx(math.e)
    with pytest.raises(ValueError, match="finite"):
        fedora.regularization_weight(float("nan"), 1.0)
    assert fedora.regularization_weight(2000.0, 1.0) == math.inf  # beyond float range


def test_bounded_regularization_weight_caps_lr_times_lambda():
    assert fedora.bounded_regularization_weight(50.0, 0.1, None) == 50.0  # the paper's rule
    assert fedora.bounded_regularization_weight(50.0, 0.1, 1.0) == 10.0
    assert fedora.bounded_regularization_weight(math.inf, 0.1, 1.5) == 15.0
    assert fedora.bounded_regularization_weight(3.0, 0.1, 1.0) == 3.0  # below the bound
    assert fedora.bounded_regularization_weight(0.0, 0.1, 1.0) == 0.0
    for lam, lr, bound in ((-1.0, 0.1, 1.0), (math.nan, 0.1, 1.0), (1.0, 0.0, 1.0),
                           (1.0, 0.1, 0.0), (1.0, 0.1, math.inf)):
        with pytest.raises(ValueError):
            fedora.bounded_regularization_weight(lam, lr, bound)


def test_proximal_pull_by_hand():
    theta = torch.tensor([1.0, 2.0])
    before = torch.tensor([2.0, 2.0])
    phi = torch.tensor([0.0, 4.0])
    fedora.proximal_pull_(theta, before, phi, lr=0.1, lam=2.0)
    # theta - 0.1*2*(before - phi) = [1 - .2*2, 2 - .2*(-2)]
    assert torch.allclose(theta, torch.tensor([0.6, 2.4]))
    unchanged = torch.tensor([1.0, 2.0])
    fedora.proximal_pull_(unchanged, before, phi, lr=0.1, lam=0.0)
    assert torch.equal(unchanged, torch.tensor([1.0, 2.0]))


def test_attach_new_client_matches_extended_graph():
    gen = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(8, 6, 1, generator=gen, dtype=torch.float64))[0]
    new = torch.linalg.qr(torch.randn(6, 1, generator=gen, dtype=torch.float64))[0]
    sim = fedora.similarity_matrix(fedora.subspace_overlaps(u), 10.0)
    g = fedora.topk_graph(sim, 2)
    p = fedora.propagation_matrix(g, 0.8)
    w = fedora.attach_new_client(new, u, p, tau=10.0, k=2, alpha=0.8)
    # the extended (N+1) system whose old rows do not point at the newcomer
    all_u = torch.cat([u, new.unsqueeze(0)])
    sim_ext = fedora.similarity_matrix(fedora.subspace_overlaps(all_u), 10.0)
    g_ext = torch.zeros(9, 9, dtype=torch.float64)
    g_ext[:8, :8] = g
    g_ext[8] = fedora.topk_graph(sim_ext, 2)[8]
    p_ext = fedora.propagation_matrix(g_ext, 0.8)
    assert p_ext[8, 8].item() == pytest.approx(0.2)
    assert torch.allclose(w, p_ext[8, :8] / p_ext[8, :8].sum(), atol=1e-12)
    assert w.sum().item() == pytest.approx(1.0)


def test_embed_subproblem_isolates_the_other_clients():
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(4, 12, 2, generator=g, dtype=torch.float64)).Q
    members = [0, 2, 3]
    graph = fedora.topk_graph(fedora.similarity_matrix(fedora.subspace_overlaps(u[members])), 1)
    prop = fedora.propagation_matrix(graph, 0.8)
    full_graph = fedora.embed_subproblem(graph, members, 5, isolated=1.0)
    full_prop = fedora.embed_subproblem(prop, members, 5, isolated=1.0)
    assert full_graph.shape == (5, 5) and full_prop.dtype == torch.float64
    for i in (1, 4):  # not members: unit rows, no weight from anyone else
        unit = torch.zeros(5, dtype=torch.float64)
        unit[i] = 1.0
        assert torch.equal(full_prop[i], unit) and torch.equal(full_prop[:, i], unit)
    assert torch.equal(full_prop[[0, 2, 3]][:, [0, 2, 3]], prop)
    # The self-loop keeps the graph row-stochastic, and both propagation forms agree with it.
    assert torch.allclose(full_graph.sum(dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(fedora.propagation_matrix(full_graph, 0.8), full_prop, atol=1e-12)
    theta = torch.randn(5, 7, generator=g, dtype=torch.float64)
    phi = fedora.propagate_power(full_graph, theta, 0.8, tol=1e-12)
    assert torch.allclose(phi, full_prop @ theta, atol=1e-9)
    assert torch.allclose(phi[[1, 4]], theta[[1, 4]], atol=1e-9)
    sim = fedora.embed_subproblem(torch.ones(3, 3), members, 5)
    assert sim[1].abs().sum() == 0 and sim[4, 4] == 0
    with pytest.raises(RelatednessError, match="shape"):
        fedora.embed_subproblem(torch.ones(2, 2), members, 5)
    with pytest.raises(RelatednessError, match="increasing"):
        fedora.embed_subproblem(torch.ones(3, 3), [0, 3, 2], 5)
    with pytest.raises(RelatednessError, match="increasing"):
        fedora.embed_subproblem(torch.ones(3, 3), [0, 2, 5], 5)


def test_relatedness_errors_name_their_config_key():
    """``q must lie in [1, 13]`` and ``similarities must be finite`` named neither key nor fix."""
    x = torch.rand(5, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(fedora.RelatednessError, match=r"fedora.q = 20: .*lower fedora.q"):
        fedora.client_summary(x, y, 2, q=20)
    overlaps = torch.eye(1, dtype=torch.float64).expand(3, 3, 1, 1).clone()
    with pytest.raises(fedora.RelatednessError, match=r"fedora.tau = 1e\+06: .*lower fedora.tau"):
        fedora.similarity_matrix(overlaps, tau=1e6)
    assert torch.isfinite(fedora.similarity_matrix(overlaps, tau=10.0)).all()


def _rule_top(values, k):
    """The stated tie rule, by a sort: indices (increasing) of the k largest of ``values`` (a
    row, self excluded by the caller), equal values lowest index first."""
    order = sorted(range(len(values)), key=lambda j: (-float(values[j]), j))
    return sorted(order[:k])


def _seq_sum(xs):
    total = 0.0
    for x in xs:
        total += float(x)
    return total


def _direct_graph(cosine_sums, tau, k):
    """The direct formula (only defined without overflow): ``exp(tau * c)``, each row's top k
    off-diagonal similarities by the tie rule, divided by their sum (in column order)."""
    n = cosine_sums.shape[0]
    s = torch.exp(tau * cosine_sums)
    graph = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        keep = [others[t] for t in _rule_top(cosine_sums[i, others].tolist(), min(k, n - 1))]
        total = _seq_sum(s[i, keep])
        graph[i, keep] = s[i, keep] / total
    return graph


def _logsumexp_row(c, tau, k):
    """float64 reference: softmax of ``tau * c`` over the top-k cosine sums of one row."""
    index = torch.tensor(_rule_top(c.tolist(), k))
    top = c[index]
    return torch.zeros_like(c).scatter_(0, index, torch.exp(tau * top - torch.logsumexp(tau * top, 0)))


def _random_summaries(n, d, q, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, d, q, generator=g, dtype=torch.float64)).Q


def test_every_graph_builder_handles_similarities_beyond_float64():
    """exp(tau * sum of the cosines) beyond float64 stopped every builder (the run failed after
    every client had released its summary); top-k sums beyond float64 with each entry finite
    too. Those rows are now the normalized similarities computed shifted by the row's largest
    cosine sum, equal to a float64 logsumexp reference."""
    u = torch.zeros(4, 5, 1, dtype=torch.float64)
    u[:, 0, 0] = 1.0  # identical summaries: every cosine is 1
    overlaps = fedora.subspace_overlaps(u)
    near = fedora.similarity_matrix(overlaps, tau=709.0)  # each entry finite, sums of 3 not
    uniform = (torch.ones(4, 4, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)) / 3
    assert torch.allclose(fedora.topk_graph(near, 3), uniform, rtol=0, atol=1e-15)
    for tau in (709.0, 800.0, 1e6):
        sums = fedora.cosine_sums(overlaps)
        assert torch.allclose(fedora.topk_graph_from_cosine_sums(sums, tau, 3), uniform, rtol=0, atol=1e-15)
        assert torch.allclose(fedora.topk_graph_from_summaries(u, tau, 3).to_dense(), uniform, rtol=0, atol=1e-15)
        joiner = torch.einsum("dq,jdr->jqr", u[0], u)
        assert torch.allclose(fedora.attach_row(joiner, tau, 4), torch.full((4,), 0.25, dtype=torch.float64),
                              rtol=0, atol=1e-15)
        graph = fedora.topk_graph_from_cosine_sums(sums, tau, 1)
        assert torch.equal(graph.sum(1), torch.ones(4, dtype=torch.float64)) and (graph.diagonal() == 0).all()


@pytest.mark.parametrize("q", [1, 3])
def test_overflowing_rows_match_a_logsumexp_reference(q):
    """Distinct cosine sums at tau = 1000 (every exp overflows): each builder's rows equal
    softmax(tau * c) over the row's top-k cosine sums within 1e-12."""
    tau, k = 1000.0 / q, 4
    u = _random_summaries(12, 8, q, seed=q)
    u[6:] = (u[:6] + 0.02 * _random_summaries(6, 8, q, seed=10 + q))  # near neighbours
    u = torch.linalg.qr(u).Q
    sums = fedora.cosine_sums(fedora.subspace_overlaps(u))
    with pytest.raises(fedora.RelatednessError, match="lower fedora.tau"):
        fedora.similarity_matrix(fedora.subspace_overlaps(u), tau)  # raw values: still refused
    dense = fedora.topk_graph_from_cosine_sums(sums, tau, k)
    blockwise = fedora.topk_graph_from_summaries(u, tau, k, block=5).to_dense()
    masked = sums.clone().fill_diagonal_(-math.inf)
    for i in range(12):
        ref = _logsumexp_row(masked[i], tau, k)
        assert (ref > 0).sum() >= 2  # the reference weighs more than one neighbour
        assert torch.allclose(dense[i], ref, rtol=0, atol=1e-12)
        assert torch.allclose(blockwise[i], ref, rtol=0, atol=1e-12)
    overlaps = fedora.subspace_overlaps(u)
    for i in range(12):
        others = [j for j in range(12) if j != i]
        row = fedora.attach_row(overlaps[i, others], tau, k)
        assert torch.allclose(row, _logsumexp_row(sums[i, others], tau, k), rtol=0, atol=1e-12)
        assert fedora.attach_neighbours(overlaps[i, others], tau, k) == sorted(row.nonzero().flatten().tolist())


@pytest.mark.parametrize("q,tau,k", [(1, 10.0, 2), (2, 300.0, 3), (3, 200.0, 20), (4, 0.5, 1)])
def test_graphs_without_overflow_are_bit_identical_to_the_direct_formula(q, tau, k):
    """Rows whose similarities fit in float64 are exactly exp(tau * c) / sum over the top k
    (the same neighbours, ties included: a third of the summaries are one summary)."""
    u = _random_summaries(30, 9, q, seed=k)
    u[20:] = u[3]
    overlaps = fedora.subspace_overlaps(u)
    sums = fedora.cosine_sums(overlaps)
    direct = _direct_graph(sums, tau, k)
    assert torch.equal(fedora.topk_graph_from_cosine_sums(sums, tau, k), direct)
    assert torch.equal(fedora.topk_graph(fedora.similarity_matrix(overlaps, tau), k), direct)
    for i in (0, 3, 25):
        others = [j for j in range(30) if j != i]
        assert torch.equal(fedora.attach_row(overlaps[i, others], tau, k), direct[i, others])


def test_only_overflowing_rows_change_form():
    """In one graph, rows whose similarities overflow take the shifted form and every other
    row stays bit-identical to the direct formula."""
    sums = torch.tensor([[0.0, 0.5, 0.1, 0.2],
                         [0.5, 0.0, 0.3, 0.9],
                         [0.1, 0.3, 0.0, 0.8],
                         [0.2, 0.9, 0.8, 0.0]], dtype=torch.float64)
    sums[1, 3] = sums[3, 1] = 0.95
    tau, k = 780.0, 2  # exp(780 * 0.9) and beyond overflow: rows 1 and 3; rows 0 and 2 do not
    graph = fedora.topk_graph_from_cosine_sums(sums, tau, k)
    direct = _direct_graph(sums, tau, k)
    assert torch.equal(graph[[0, 2]], direct[[0, 2]])
    assert not torch.isfinite(direct[[1, 3]]).all()
    masked = sums.clone().fill_diagonal_(-math.inf)
    for i in (1, 3):
        assert torch.allclose(graph[i], _logsumexp_row(masked[i], tau, k), rtol=0, atol=1e-12)

def test_a_late_joiners_row_refuses_bad_overlaps_and_k():
    """k = 0 gave NaN weights; NaN overlaps a raw torch linalg error."""
    good = torch.rand(4, 2, 2, dtype=torch.float64)
    assert torch.isclose(fedora.attach_row(good, 10.0, 2).sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(fedora.RelatednessError, match="k must be at least 1"):
        fedora.attach_row(good, 10.0, 0)
    nan = good.clone()
    nan[1, 0, 0] = float("nan")
    with pytest.raises(fedora.RelatednessError, match="NaN"):
        fedora.attach_row(nan, 10.0, 2)
    with pytest.raises(fedora.RelatednessError, match="shape"):
        fedora.attach_row(good[0], 10.0, 2)


@pytest.mark.parametrize("alpha", [0.999, 0.9995])
def test_power_iteration_converges_for_alpha_near_one(alpha):
    # Two clients pull on each other (S = swap): the change decays exactly as 2 alpha^(t+1),
    # which needed about 28,000 iterations at alpha 0.999 and stopped at 10,000 before.
    g = fedora.topk_graph(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), k=1)
    power = fedora.propagation_matrix_power(g, alpha)
    assert torch.allclose(power, fedora.propagation_matrix(g, alpha), atol=1e-9)
    from secure_fedora.algorithms.propagation import build_operator

    theta = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    phi = build_operator(g, alpha, "power").apply(theta.clone())
    assert torch.allclose(phi, fedora.propagation_matrix(g, alpha) @ theta, atol=1e-8)


def test_power_iteration_beyond_its_bound_names_exact_modes():
    g = fedora.topk_graph(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), k=1)
    with pytest.raises(RelatednessError, match="'dense' or 'factored'"):
        fedora.propagation_matrix_power(g, 0.9, max_iter=5)


@pytest.mark.parametrize("relatedness", ["noised", "noised+encrypted"])
def test_the_summary_reply_states_every_protection_its_relatedness_mode_applies(relatedness):
    """FEDORA's setup reply declared its summary "noised: the 'summary' release" in every
    mode, so a noised+encrypted run (results.json's reply_entries, the audit report's table
    of what leaves each client) did not say that the upload is CKKS-encrypted. The reason now
    names both there; the noised mode's is unchanged. A built-in reason either way."""
    from secure_fedora.algorithms.contract import declared_reply_entries
    from secure_fedora.core.config import parse_config

    cfg = parse_config({"methods": ["fedora"], "data": {"num_clients": 3},
                        "fedora": {"relatedness": relatedness},
                        "privacy": {"enabled": True, "epsilon": 8.0}})
    summary = declared_reply_entries("fedora", cfg)["setup"]["summary"]
    assert summary["built_in"]
    if relatedness == "noised":
        assert summary["reason"] == "the relatedness summary (noised: the 'summary' release)"
    else:
        assert summary["reason"].startswith("the relatedness summary (noised and encrypted: the"
                                            " 'summary' release")
        assert "CKKS-encrypted" in summary["reason"]
