"""FEDORA's server math against an independent numpy derivation of its definition
(docs/design.md section 2): summaries, similarities, top-k graph, P, phi, a late joiner's
weights and the lambda gate, on small federations (2 and 3 clients, k >= N - 1, k = 1,
alpha at 0 and near 1, unequal client sizes, degenerate but determined summaries) and
through every propagation operator, with and without clients excluded from relatedness."""

import numpy as np
import pytest
import torch

from secure_fedora.algorithms import fedora
from secure_fedora.algorithms.propagation import build_operator, embed_operator


def _summary(x: np.ndarray, y: np.ndarray, classes: int, q: int) -> np.ndarray:
    z = np.concatenate([x.reshape(len(x), -1), np.eye(classes)[y]], axis=1)
    return np.linalg.svd(z.T, full_matrices=False)[0][:, :q]


def _graph(summaries: list[np.ndarray], tau: float, k: int) -> np.ndarray:
    n = len(summaries)
    s = np.array(
        [
            [
                0.0
                if i == j
                else np.exp(
                    tau * np.linalg.svd(summaries[i].T @ summaries[j], compute_uv=False).sum()
                )
                for j in range(n)
            ]
            for i in range(n)
        ]
    )
    g = np.zeros_like(s)
    for i in range(n):
        keep = [j for j in np.argsort(-s[i], kind="stable") if j != i][:k]
        g[i, keep] = s[i, keep] / s[i, keep].sum()
    return g


def _propagation(graph: np.ndarray, alpha: float) -> np.ndarray:
    n = graph.shape[0]
    return (1.0 - alpha) * np.linalg.inv(np.eye(n) - alpha * graph)


def _clients(sizes: list[int], seed: int, d: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((m, d)) + 2.0 * (i % 2), rng.integers(0, classes, m))
        for i, m in enumerate(sizes)
    ]


CASES = [  # sizes, k, q, alpha
    ([5, 40], 1, 1, 0.8),
    ([7, 12, 30], 2, 2, 0.5),  # k = N - 1
    ([9, 9, 9], 5, 1, 0.0),  # k beyond N - 1; alpha 0: P = I
    ([3, 20, 8, 15], 1, 3, 0.9),  # one client with as many rows as q
    ([10, 6, 25, 4, 11], 2, 1, 0.999),
]


@pytest.mark.parametrize("sizes, k, q, alpha", CASES)
def test_graph_propagation_and_phi_match_the_definition(sizes, k, q, alpha):
    data = _clients(sizes, seed=len(sizes))
    ref_summaries = [_summary(x, y, 3, q) for x, y in data]
    summaries = torch.stack(
        [fedora.client_summary(torch.tensor(x), torch.tensor(y), 3, q) for x, y in data]
    )
    for mine, theirs in zip(ref_summaries, summaries.numpy(), strict=True):  # same subspace
        assert np.abs(mine @ mine.T - theirs @ theirs.T).max() < 1e-12
    want_graph = _graph(ref_summaries, 10.0, k)
    overlaps = fedora.subspace_overlaps(summaries)
    graph = fedora.topk_graph_from_cosine_sums(fedora.cosine_sums(overlaps), 10.0, k)
    assert np.abs(graph.numpy() - want_graph).max() < 1e-12
    blockwise = fedora.topk_graph_from_summaries(summaries, 10.0, k, block=2).to_dense()
    assert np.abs(blockwise.numpy() - want_graph).max() < 1e-12
    want = _propagation(want_graph, alpha)
    theta = torch.randn(
        len(sizes), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    modes = ["dense", "factored", "auto", "power"] + (["sparse"] if alpha <= 0.9 else [])
    for mode in modes:
        op = build_operator(graph, alpha, mode, 1e-6)
        phi = op.apply(theta)
        bound = op.error_bound * float(theta.abs().max()) + 1e-9
        assert np.abs(phi.numpy() - want @ theta.numpy()).max() <= bound, mode
        assert np.abs(op.to_dense().numpy() - want).max() <= op.error_bound + 1e-9, mode
        out = torch.zeros_like(theta)
        op.apply_rows(theta, [len(sizes) - 1], out)
        assert torch.equal(out[-1], phi[-1]), mode
        # a late joiner: its normalized top-k row times P
        x, y = _clients([13], seed=99)[0]
        new = _summary(x, y, 3, q)
        s = np.array(
            [np.exp(10.0 * np.linalg.svd(new.T @ u, compute_uv=False).sum()) for u in ref_summaries]
        )
        keep = np.argsort(-s, kind="stable")[: min(k, len(sizes))]
        row = np.zeros(len(sizes))
        row[keep] = s[keep] / s[keep].sum()
        blocks = torch.einsum("dq,jdr->jqr", torch.tensor(new), summaries)
        weights = op.combine(fedora.attach_row(blocks, 10.0, k))
        assert np.abs(weights.numpy() - row @ want).max() <= op.error_bound + 1e-9, mode


@pytest.mark.parametrize("mode", ["dense", "factored", "sparse", "power"])
def test_excluded_clients_keep_their_rows_and_the_rest_match_the_definition(mode):
    data = _clients([8, 14, 6, 20, 9, 11], seed=5)
    summaries = [_summary(x, y, 3, 1) for x, y in data]
    members = [0, 2, 3, 5]
    sub = torch.tensor(_graph([summaries[i] for i in members], 10.0, 2))
    op = embed_operator(build_operator(sub, 0.8, mode, 1e-8), members, 6)
    want = np.eye(6)
    want[np.ix_(members, members)] = _propagation(sub.numpy(), 0.8)
    theta = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    phi = op.apply(theta)
    for i in (1, 4):
        assert torch.equal(phi[i], theta[i])
    assert np.abs(op.to_dense().numpy() - want).max() < 1e-8
    assert np.abs(phi.double().numpy() - want @ theta.double().numpy()).max() < 1e-5


def test_lambda_gate_is_strict_and_uses_half_the_loss_difference():
    assert fedora.regularization_weight(1.25, 1.25) == 0.0  # equal losses: no pull
    assert fedora.regularization_weight(1.0, 1.5) == 0.0
    assert fedora.regularization_weight(2.0, 0.5) == pytest.approx(np.exp(0.75), rel=1e-15)
    assert fedora.regularization_weight(1.0 + 2e-16 * 8, 1.0) > 1.0
