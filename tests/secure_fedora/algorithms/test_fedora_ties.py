"""FEDORA's top-k graph with exact ties (identical and duplicated clients): every builder keeps
the same neighbours, lowest client index first among equal similarities, with the same
weights bit for bit, whatever the block size, the propagation mode or the late joiner's path
(docs/design.md section 2)."""

import math

import numpy as np
import pytest
import torch

from secure_fedora.algorithms import fedora
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context, make_method


def _summaries(n: int, d: int, q: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, d, q, generator=g, dtype=torch.float64)).Q


def _pairs_of_duplicates(q: int) -> torch.Tensor:
    """6 clients, 3 pairs of duplicates: clients 0, 1, 2 and, again, 3, 4, 5 (in another order:
    client 3 is client 2, 4 is 0, 5 is 1)."""
    u = _summaries(3, 11, q, seed=q)
    return u[[0, 1, 2, 2, 0, 1]].clone()


def _ten_identical(q: int) -> torch.Tensor:
    """40 clients of which 10 (scattered) hold one summary."""
    u = _summaries(40, 13, q, seed=10 + q)
    u[[1, 5, 6, 12, 19, 20, 27, 33, 38, 39]] = u[20].clone()
    return u


def _rule_neighbours(c: torch.Tensor, i: int, k: int) -> list[int]:
    """The stated rule by a plain sort: row i's k largest cosine sums (self excluded), equal
    sums lowest index first; returned increasing."""
    others = [j for j in range(c.shape[0]) if j != i]
    order = sorted(others, key=lambda j: (-float(c[i, j]), j))
    return sorted(order[:k])


CASES = [
    (make, q, k)
    for make in (_pairs_of_duplicates, _ten_identical)
    for q in (1, 3)
    for k in (1, 2, None)
]  # None: k = N - 1


@pytest.mark.parametrize("make,q,k", CASES)
@pytest.mark.parametrize("tau", [10.0, 1000.0])  # 1000: every similarity overflows float64
def test_every_builder_gives_the_same_graph_with_the_lowest_index_rule(make, q, k, tau):
    u = make(q)
    n = u.shape[0]
    k = n - 1 if k is None else k
    overlaps = fedora.subspace_overlaps(u)
    sums = fedora.cosine_sums(overlaps)
    dense = fedora.topk_graph_from_cosine_sums(sums, tau, k)
    assert torch.equal(dense.sum(1) > 0, torch.ones(n, dtype=torch.bool))
    for block in (1, 3, 7, 256):
        blockwise = fedora.topk_graph_from_summaries(u, tau, k, block=block)
        assert torch.equal(blockwise.to_dense(), dense), block
    # the kept neighbours (at tau = 1000 the farther ones weigh exactly 0 but stay listed)
    rows, cols = blockwise.indices()
    for i in range(n):
        assert cols[rows == i].tolist() == _rule_neighbours(sums, i, k), i
    if tau == 10.0:  # raw similarities exist: the builder from them agrees too
        assert torch.equal(fedora.topk_graph(fedora.similarity_matrix(overlaps, tau), k), dense)
    for i in range(n):  # each client as a late joiner to the others
        others = [j for j in range(n) if j != i]
        joiner = fedora.joiner_overlaps(u[i], u[others])
        assert torch.equal(joiner, overlaps[i, others])
        row = fedora.attach_row(joiner, tau, k)
        assert torch.equal(row, dense[i, others]), i
        chosen = fedora.attach_neighbours(joiner, tau, k)
        assert [others[t] for t in chosen] == _rule_neighbours(sums, i, k)


def test_duplicated_clients_have_bit_identical_cosines_whatever_the_split():
    """Duplicates' cosines are equal bit for bit (a tie is a tie), and every cosine is the
    same bits from the full overlaps, from a block of any shape, or from one pair."""
    u = _ten_identical(1)[:, :, 0]
    full = fedora.exact_dots(u, u)
    assert torch.equal(full, full.T)
    same = [1, 5, 6, 12, 19, 20, 27, 33, 38, 39]
    assert (full[same][:, 0] == full[20, 0]).all()
    for rows in ([0], [3, 4, 5], list(range(7, 14)), list(range(40))):
        assert torch.equal(fedora.exact_dots(u[rows], u), full[rows])
        assert torch.equal(fedora.exact_dots(u, u[rows]), full[:, rows])
    for i, j in ((0, 1), (5, 39), (17, 17)):
        assert torch.equal(fedora.exact_dots(u[i : i + 1], u[j : j + 1])[0, 0], full[i, j])


@pytest.mark.parametrize("d", [5, 794, 3082])
def test_exact_dots_are_within_about_one_rounding_of_the_true_products(d):
    u = _summaries(30, d, 2, seed=d).transpose(1, 2).reshape(60, d)
    u[7] *= 3e-7  # vectors of other scales
    u[8] *= 5e4
    wide = u.numpy().astype(np.longdouble)
    truth = wide @ wide.T
    got = fedora.exact_dots(u, u).numpy().astype(np.longdouble)
    norms = np.linalg.norm(u.numpy(), axis=1)
    scale = np.outer(norms, norms)
    assert np.all(np.abs(got - truth) <= 2 * np.finfo(np.float64).eps * scale)


def test_top_k_lowest_index_by_hand():
    scores = torch.tensor(
        [[3.0, 5.0, 5.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0], [-math.inf, 1.0, 0.0, 1.0, 7.0]],
        dtype=torch.float64,
    )
    assert fedora.top_k_lowest_index(scores, 2).tolist() == [[1, 2], [0, 1], [1, 4]]
    assert fedora.top_k_lowest_index(scores, 4).tolist() == [
        [0, 1, 2, 4],
        [0, 1, 2, 3],
        [1, 2, 3, 4],
    ]


def test_a_tau_that_would_reverse_the_ranking_is_refused():
    u = _pairs_of_duplicates(1)
    sums = fedora.cosine_sums(fedora.subspace_overlaps(u))
    for tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(fedora.RelatednessError, match="fedora.tau"):
            fedora.topk_graph_from_cosine_sums(sums, tau, 2)
        with pytest.raises(fedora.RelatednessError, match="fedora.tau"):
            fedora.topk_graph_from_summaries(u, tau, 2)
        with pytest.raises(fedora.RelatednessError, match="fedora.tau"):
            fedora.attach_row(fedora.subspace_overlaps(u)[0], tau, 2)


def _tiny(propagation: str):
    from secure_fedora.core.config import parse_config

    return parse_config(
        {
            "seed": 2,
            "methods": ["fedora"],
            "data": {
                "num_clients": 8,
                "train_per_client": 24,
                "val_per_client": 8,
                "test_per_client": 8,
                "groups": 2,
            },
            "training": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.05},
            "fedora": {"propagation": propagation, "propagation_tolerance": 1e-6, "k": 3},
        }
    )


@pytest.fixture(scope="module")
def duplicated_clients():
    """8 clients whose last four train on copies of the first four's training data."""
    from dataclasses import replace

    clients = build_clients(_tiny("dense"))
    return [
        c
        if i < 4
        else replace(
            c, train_x=clients[i - 4].train_x.clone(), train_y=clients[i - 4].train_y.clone()
        )
        for i, c in enumerate(clients)
    ]


def test_a_run_with_duplicated_clients_has_one_graph_in_every_propagation_mode(
    tmp_path, duplicated_clients
):
    graphs, results = {}, {}
    for mode in ("dense", "sparse", "factored"):
        cfg = _tiny(mode)
        method = make_method("fedora", build_context(cfg, duplicated_clients), cfg)
        method.setup()
        graph = method.relatedness.graph
        graphs[mode] = graph.to_dense() if graph.is_sparse else graph
        sim = Simulation(cfg, tmp_path / mode, clients=duplicated_clients)
        sim.run()
        results[mode] = sim.methods["fedora"]
    assert results["sparse"].relatedness.overlaps is None  # the blockwise builder ran
    assert torch.equal(graphs["sparse"], graphs["dense"]) and torch.equal(
        graphs["factored"], graphs["dense"]
    )
    sums = fedora.cosine_sums(results["dense"].relatedness.overlaps)
    assert sums[4, 0] == sums[0, 0] and sums[5, 1] == sums[1, 1]  # the duplicates tie exactly
    for i in range(8):
        assert graphs["dense"][i].nonzero().flatten().tolist() == _rule_neighbours(sums, i, 3)
    dense = results["dense"]
    for mode in ("sparse", "factored"):  # exact (factored) or within 1e-6 of P (sparse)
        assert torch.allclose(results[mode].theta, dense.theta, atol=1e-4, rtol=0), mode
        assert torch.allclose(results[mode].phi, dense.phi, atol=1e-4, rtol=0), mode
