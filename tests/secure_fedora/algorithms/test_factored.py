"""The factored propagation operator: the exact P as sparse passes, at any N."""

import pytest
import torch

from secure_fedora.algorithms import factored, fedora
from secure_fedora.algorithms.factored import factor_propagation
from secure_fedora.algorithms.propagation import build_operator, sparse_propagation_matrix


def random_graph(n: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    similarity = torch.exp(10 * torch.rand(n, n, generator=g, dtype=torch.float64))
    similarity.fill_diagonal_(0.0)
    return fedora.topk_graph(similarity, k)


def clustered_graph(n: int, groups: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    """Clients in ``groups`` clusters, each client's top-k inside its own cluster (the shape
    FEDORA's relatedness graphs have on rotated MNIST)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % groups
    similarity = torch.exp(10 * torch.rand(n, n, generator=g, dtype=torch.float64))
    similarity[label.unsqueeze(0) != label.unsqueeze(1)] *= 1e-6
    similarity.fill_diagonal_(0.0)
    return fedora.topk_graph(similarity, k)


@pytest.mark.parametrize(("n", "k", "alpha"), [(2, 1, 0.8), (7, 2, 0.0), (60, 2, 0.8), (60, 5, 0.5),
                                               (150, 3, 0.95), (300, 2, 0.8)])
def test_factored_operator_is_the_exact_propagation_matrix(n, k, alpha):
    graph = random_graph(n, k, seed=n + k)
    exact = fedora.propagation_matrix(graph, alpha)
    op = build_operator(graph, alpha, "factored")
    assert op.kind == "factored" and op.error_bound == 0.0
    assert torch.allclose(op.to_dense(), exact, atol=1e-13, rtol=0)
    theta = torch.randn(n, 257, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(op.apply(theta), exact @ theta, atol=1e-12, rtol=0)
    # float32 parameters: the float rounding of the dense path's order of magnitude
    theta32 = theta.float()
    assert torch.allclose(op.apply(theta32), exact.float() @ theta32, atol=2e-5, rtol=0)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(op.combine(weights / weights.sum()), weights / weights.sum() @ exact, atol=1e-14)


def test_factored_operator_takes_a_sparse_graph_and_is_deterministic():
    graph = clustered_graph(400, groups=4)
    a = factor_propagation(graph.to_sparse(), 0.8)
    b = factor_propagation(graph, 0.8)
    theta = torch.randn(400, 300, generator=torch.Generator().manual_seed(3))
    out_a, out_b = torch.empty_like(theta), torch.empty_like(theta)
    a.apply(theta, out_a)
    b.apply(theta, out_b)
    assert torch.equal(out_a, out_b)


def test_factored_operator_stores_far_fewer_entries_than_the_truncated_one():
    """On a clustered graph the exact passes hold fewer entries than the series truncated at
    the default tolerance (which drops entries), and far fewer than N x N."""
    n = 600
    graph = clustered_graph(n, groups=4, seed=5)
    op = factor_propagation(graph, 0.8)
    truncated, _ = sparse_propagation_matrix(graph, 0.8, 1e-4)
    assert op.nnz < truncated._nnz() < n * n / 4
    assert op.residual <= factored.RESIDUAL_LIMIT


def test_factored_operator_computes_a_few_rows_through_several_passes():
    """A subset of rows needs only the rows it depends on in each pass: equal to the full
    product's rows bit for bit (the general subset test is in test_propagation.py)."""
    graph = clustered_graph(120, groups=3, k=3, seed=2)
    op = build_operator(graph, 0.8, "factored")
    assert op.factors is not None and op.factors.passes >= 2
    theta = torch.randn(120, 700, generator=torch.Generator().manual_seed(2))
    out = torch.zeros_like(theta)
    op.apply_rows(theta, [5, 77], out)
    assert torch.equal(out[[5, 77]], op.apply(theta)[[5, 77]]) and not bool(out[6].any())


def test_factored_product_is_independent_of_the_block_width(monkeypatch):
    graph = clustered_graph(200, groups=4)
    op = build_operator(graph, 0.8, "factored")
    theta = torch.randn(200, 1500, generator=torch.Generator().manual_seed(4))
    narrow = op.apply(theta)
    monkeypatch.setattr(factored, "_BLOCK_BYTES", 1 << 25)  # 512 columns a block
    assert torch.equal(narrow, op.apply(theta))


def test_many_passes_are_exact_too():
    """A deep back substitution split into the most passes allowed still gives P."""
    graph = random_graph(200, k=2, seed=11)
    op = factor_propagation(graph, 0.9, max_groups=factored.MAX_GROUPS)
    exact = fedora.propagation_matrix(graph, 0.9)
    assert op.passes > 2
    assert torch.allclose(op.to_dense(), exact, atol=1e-13, rtol=0)


def test_factored_operator_rejects_bad_input():
    graph = random_graph(10)
    with pytest.raises(fedora.RelatednessError, match="alpha"):
        factor_propagation(graph, 1.0)
    with pytest.raises(fedora.RelatednessError, match="alpha"):
        factor_propagation(graph, -0.1)
    with pytest.raises(fedora.RelatednessError, match="row-stochastic"):
        factor_propagation(graph * 2, 0.8)
    with pytest.raises(fedora.RelatednessError, match="non-negative"):
        factor_propagation(-graph, 0.8)
    bad = graph.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(fedora.RelatednessError, match="finite"):
        factor_propagation(bad, 0.8)
    with pytest.raises(fedora.RelatednessError, match="square"):
        factor_propagation(graph[:, :9], 0.8)
    op = build_operator(graph, 0.8, "factored")
    with pytest.raises(fedora.RelatednessError, match="does not match"):
        op.apply(torch.randn(9, 5))
    with pytest.raises(fedora.RelatednessError, match="rows outside"):
        op.apply_rows(torch.randn(10, 5), [10], torch.zeros(10, 5))


def test_a_failed_residual_check_is_an_error_naming_the_other_modes(monkeypatch):
    monkeypatch.setattr(factored, "RESIDUAL_LIMIT", 0.0)
    with pytest.raises(fedora.RelatednessError, match="residual check.*'sparse' or 'dense'"):
        factor_propagation(random_graph(30, k=3), 0.8)


def line_graph(n: int) -> torch.Tensor:
    """Clients on a line, each related to its two neighbours: long chains, so the inverse
    factors fill in while the truncated series stays narrow."""
    index = torch.arange(n, dtype=torch.float64)
    similarity = torch.exp(-(index.unsqueeze(0) - index.unsqueeze(1)).abs())
    similarity.fill_diagonal_(0.0)
    return fedora.topk_graph(similarity, 2)


def test_auto_takes_the_truncated_series_where_the_factors_fill_in():
    from secure_fedora.algorithms.propagation import AUTO_FACTORED_MAX_NNZ_PER_ROW

    graph = line_graph(600)
    with pytest.raises(factored.FactorTooDense):
        factor_propagation(graph, 0.8, max_nnz_per_row=AUTO_FACTORED_MAX_NNZ_PER_ROW)
    auto = build_operator(graph, 0.8, "auto", 1e-4)
    assert auto.kind == "sparse" and 0 < auto.error_bound <= 1e-4
    assert auto.nnz / 600 < AUTO_FACTORED_MAX_NNZ_PER_ROW
    # FEDORA passes "factored" with fallback for auto; a forced "factored" stays exact
    assert build_operator(graph, 0.8, "factored", 1e-4, fallback=True).kind == "sparse"
    forced = build_operator(graph, 0.8, "factored", 1e-4)
    assert forced.kind == "factored" and forced.nnz / 600 > AUTO_FACTORED_MAX_NNZ_PER_ROW
    assert torch.allclose(forced.to_dense(), fedora.propagation_matrix(graph, 0.8), atol=1e-13, rtol=0)


def test_auto_keeps_the_factored_operator_when_it_is_still_the_cheaper_one():
    """Random graphs fill in past the budget, but the truncated series is denser still."""
    graph = random_graph(300, k=2, seed=1)
    auto = build_operator(graph, 0.8, "auto", 1e-4)
    truncated = build_operator(graph, 0.8, "sparse", 1e-4)
    assert auto.kind == "factored" and auto.nnz < truncated.nnz


@pytest.mark.parametrize("alpha", [0.999, 0.95])
def test_auto_does_not_build_a_series_too_costly_to_build(monkeypatch, alpha):
    """Past the factored budget, "auto" built the whole truncated series before comparing it:
    at alpha 0.999 its 10,597 terms took 259 s at 257 clients (the factored operator: 1 s).
    It now stops the series at AUTO_SERIES_MAX_TERMS terms or AUTO_SERIES_MAX_NNZ_PER_ROW
    entries per client and takes the complete factored operator."""
    from secure_fedora.algorithms import propagation

    built: list[int] = []
    real = propagation._truncated_series

    def counting(s_csr, n, alpha_, terms, threshold, max_nnz=None):  # type: ignore[no-untyped-def]
        built.append(terms)
        return real(s_csr, n, alpha_, terms, threshold, max_nnz)

    monkeypatch.setattr(propagation, "_truncated_series", counting)
    graph = random_graph(257, k=2, seed=4)
    auto = build_operator(graph, alpha, "auto", 1e-4)
    assert auto.kind == "factored" and auto.error_bound == 0.0
    assert auto.nnz / 257 > propagation.AUTO_FACTORED_MAX_NNZ_PER_ROW  # past the budget
    assert torch.allclose(auto.to_dense(), fedora.propagation_matrix(graph, alpha), atol=1e-10, rtol=0)
    terms = propagation.series_terms(alpha, 1e-4)
    if terms > propagation.AUTO_SERIES_MAX_TERMS:  # not even started
        assert built == []
    else:  # started, stopped once it held too many entries
        assert built == [terms]
        with pytest.raises(propagation.SeriesTooCostly, match="entries per client"):
            sparse_propagation_matrix(graph, alpha, 1e-4, max_nnz_per_row=48)
    with pytest.raises(propagation.SeriesTooCostly, match="terms"):
        sparse_propagation_matrix(graph, 0.999, 1e-4, max_terms=1024)


def test_auto_solves_densely_a_graph_that_keeps_most_clients():
    """k near N makes P dense whatever the operator: "auto" above 256 clients factored it
    (1,000 clients, k = 999: 10 s to 1,001 entries per row, where the dense solve takes
    0.14 s); it now solves such a graph densely, and keeps the factored operator for k = 2."""
    from secure_fedora.algorithms import propagation

    graph = random_graph(300, k=299, seed=5)
    auto = build_operator(graph, 0.8, "auto", 1e-4)
    assert auto.kind == "dense"
    assert torch.allclose(auto.to_dense(), fedora.propagation_matrix(graph, 0.8), atol=1e-13, rtol=0)
    assert build_operator(graph.to_sparse(), 0.8, "factored", 1e-4, fallback=True).kind == "dense"
    assert build_operator(graph, 0.8, "factored", 1e-4).kind == "factored"  # forced: as asked
    assert build_operator(random_graph(300, k=2, seed=5), 0.8, "auto", 1e-4).kind == "factored"
    half = random_graph(300, k=int(propagation.AUTO_DENSE_GRAPH_FRACTION * 300) - 1, seed=5)
    assert build_operator(half, 0.8, "auto", 1e-4).kind != "dense"


def test_factored_operator_accepts_float32_and_grad_graphs_and_refuses_an_empty_one():
    graph = random_graph(30, k=3, seed=3)
    exact = fedora.propagation_matrix(graph, 0.8)
    for variant in (graph.float(), graph.clone().requires_grad_(True)):
        assert torch.allclose(factor_propagation(variant, 0.8).to_dense(), exact, atol=1e-6, rtol=0)
    with pytest.raises(fedora.RelatednessError, match="no clients"):
        factor_propagation(torch.zeros(0, 0, dtype=torch.float64), 0.8)
