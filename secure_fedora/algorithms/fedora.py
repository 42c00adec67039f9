"""FEDORA's mathematics as pure functions over tensors (docs/design.md section 2).

Every function here is deterministic, has no side effects beyond the documented in-place
updates, and is shared by the in-process simulation and the Flower runtime. Relatedness
computations run in float64: the similarities are exponentials of sums of cosines, and the
propagation matrix is an inverse, so float32 rounding would show in the graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from privacy.accounting import format_exact
from privacy.errors import ToolkitError
from secure_fedora.algorithms.config_checks import (
    MAX_POWER_ITERATIONS,
    POWER_TOLERANCE,
    power_iterations,
)
from secure_fedora.learning.client import proximal_pull_

__all__ = [
    "RelatednessError",
    "attach_from_overlaps",
    "attach_new_client",
    "attach_neighbours",
    "attach_row",
    "bounded_regularization_weight",
    "check_summary_determined",
    "client_summary",
    "cosine_sums",
    "embed_subproblem",
    "propagate",
    "propagate_power",
    "propagation_matrix",
    "propagation_matrix_power",
    "proximal_pull_",
    "regularization_weight",
    "similarity_matrix",
    "subspace_overlaps",
    "summary_rows",
    "topk_graph",
    "topk_graph_from_cosine_sums",
    "topk_graph_from_summaries",
]


class RelatednessError(ToolkitError, ValueError):
    """Raised for summaries, similarity matrices or graphs that violate FEDORA's contracts."""


def summary_rows(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Stack a client's training rows as ``z = [flatten(x), onehot(y)]`` (n x d, float64).

    For multi-label targets ``y`` of shape ``(n, num_classes)`` (multi-hot), ``y`` itself
    takes the place of ``onehot(y)``. This is the data matrix ``Z_i`` whose dominant left
    singular subspace of ``Z_i^T`` is the client's summary; the noised mode clips and noises
    ``Z_i^T Z_i / n`` built from the same rows.
    """
    if x.shape[0] != y.shape[0]:
        raise RelatednessError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise RelatednessError("a client summary needs at least one training row")
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    if y.dim() == 2:
        if y.shape[1] != num_classes:
            raise RelatednessError(f"multi-label targets have {y.shape[1]} columns, expected {num_classes}")
        return torch.cat([flat, y.to(torch.float64)], dim=1)
    if y.min() < 0 or y.max() >= num_classes:
        raise RelatednessError(f"labels must lie in [0, {num_classes}); got {int(y.min())}..{int(y.max())}")
    onehot = torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64)
    return torch.cat([flat, onehot], dim=1)


def client_summary(x: Tensor, y: Tensor, num_classes: int, q: int = 1,
                   client: int | None = None) -> Tensor:
    """Top-``q`` left singular vectors of ``Z^T`` (d x q, orthonormal columns, float64).

    No centering (as in the reference). Column signs are fixed so that each column's entry of
    largest magnitude is positive; similarities do not depend on signs, but a deterministic sign
    makes summaries comparable across runs and runtimes.

    RelatednessError where the rows do not determine a top-``q`` subspace (see
    :func:`check_summary_determined`, naming ``client`` when given): rows of rank below ``q``,
    or a tie at the ``q``-th singular value, would leave some of the summary's directions to
    LAPACK's choice.
    """
    z = summary_rows(x, y, num_classes)
    if not 1 <= q <= min(z.shape):
        raise RelatednessError(f"fedora.q = {q}: q must lie in [1, {min(z.shape)}] (at most a "
                               "client's number of rows and of summary features); lower fedora.q")
    # Z^T = U S V^T; the left singular vectors of Z^T are the eigenvectors of Z^T Z.
    u, s, _ = torch.linalg.svd(z.T, full_matrices=False)
    check_summary_determined(s, q, tuple(z.shape),
                             "this client" if client is None else f"client {client}")
    return _fix_signs(u[:, :q].contiguous())


def check_summary_determined(singular_values: Tensor, q: int, shape: tuple[int, int],
                             who: str = "this client") -> None:
    """RelatednessError unless the top-``q`` left singular subspace of ``Z^T`` is unique.

    ``singular_values`` are those of the client's summary rows ``Z`` (``shape`` n x d),
    descending; ``who`` names the client in the error. The subspace is unique when ``q == d``
    (all of it) or the ``q``-th singular value exceeds the next one (zero beyond the
    ``min(n, d)`` computed) by more than the numerical-rank tolerance
    ``sigma_1 * max(n, d) * eps`` (that of ``torch.linalg.matrix_rank``).
    Otherwise some summary directions are arbitrary vectors of a null space (rank below ``q``)
    or of a tied pair, whichever LAPACK returns, and the similarities built on them would not
    be a function of the data.
    """
    n, d = shape
    if q >= d:
        return
    s = singular_values.to(torch.float64)
    tol = float(s[0]) * max(n, d) * torch.finfo(torch.float64).eps
    rank = int((s > tol).sum())
    if rank == 0:  # all-zero inputs with all-zero multi-label targets
        raise RelatednessError(f"{who}'s summary rows [inputs, labels] are all zero: they "
                               "span no direction to summarize")
    if rank < q:
        raise RelatednessError(
            f"fedora.q = {q}: {who}'s summary rows [inputs, one-hot labels] span only "
            f"{rank} direction{'s' if rank != 1 else ''} (the numerical rank of its {n} training "
            f"rows: e.g. duplicated or all-zero rows), so {q - rank} of its "
            f"summary's {q} directions would be arbitrary null-space vectors, and its "
            f"similarities not a function of its data; use fedora.q <= {rank}")
    after = float(s[q]) if q < s.shape[0] else 0.0
    if float(s[q - 1]) - after <= tol:
        raise RelatednessError(
            f"fedora.q = {q}: {who}'s summary rows [inputs, one-hot labels] have equal "
            f"singular values {q} and {q + 1} ({float(s[q - 1]):.17g} and {after:.17g}), so "
            f"their top-{q} subspace is not unique: its last direction would be whichever of "
            f"the tied ones LAPACK returns, and its similarities not a function of its data; "
            f"use another fedora.q (one where the singular values differ)")


def _fix_signs(u: Tensor) -> Tensor:
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs


def subspace_overlaps(summaries: Tensor) -> Tensor:
    """All blocks ``U_i^T U_j`` (N x N x q x q) for summaries stacked as (N x d x q)."""
    if summaries.dim() != 3:
        raise RelatednessError(f"summaries must be (N, d, q); got shape {tuple(summaries.shape)}")
    if not torch.isfinite(summaries).all():
        raise RelatednessError("summaries contain NaN or infinite values")
    u = summaries.to(torch.float64)
    return torch.einsum("idq,jdr->ijqr", u, u)


def cosine_sums(overlaps: Tensor) -> Tensor:
    """``c_ij = sum_k cos_k``, the sum of the cosines of the principal angles between
    span(U_i) and span(U_j), from the blocks ``U_i^T U_j`` (N x N x q x q) as (N x N) float64.

    The cosines are the singular values of each block, clamped to [0, 1] against rounding
    (and against noise in the noised and encrypted modes, whose blocks are only approximately
    orthonormal). The diagonal is returned as computed (each client's own sum).
    """
    if overlaps.dim() != 4 or overlaps.shape[0] != overlaps.shape[1]:
        raise RelatednessError(f"overlaps must be (N, N, q, q); got shape {tuple(overlaps.shape)}")
    if not torch.isfinite(overlaps).all():
        raise RelatednessError("overlaps contain NaN or infinite values")
    return torch.linalg.svdvals(overlaps.to(torch.float64)).clamp(0.0, 1.0).sum(dim=-1)


def similarity_matrix(overlaps: Tensor, tau: float = 10.0) -> Tensor:
    """``s_ij = exp(tau * sum_k cos_k)`` from the principal angles, with ``s_ii = 0`` (N x N).

    The raw similarities (see :func:`cosine_sums`); RelatednessError naming ``fedora.tau``
    where one overflows float64. The graph never needs them raw:
    :func:`topk_graph_from_cosine_sums` gives the same graph for any ``tau``.
    """
    s = _exp_similarities(cosine_sums(overlaps), tau)
    s.fill_diagonal_(0.0)
    return s


def _exp_similarities(cosine_sums: Tensor, tau: float) -> Tensor:
    """``exp(tau * cosine_sums)``; RelatednessError naming ``fedora.tau`` where it overflows."""
    s = torch.exp(tau * cosine_sums)
    if not torch.isfinite(s).all():
        raise RelatednessError(f"fedora.tau = {format_exact(tau)}: exp(tau * sum of the cosines) "
                               "overflows float64 (tau times a sum of cosines above about 709): "
                               "lower fedora.tau for raw "
                               "similarities; the graph builders need none (topk_graph_from_cosine_sums)")
    return s


def _softmax_rows(cosines: Tensor, tau: float) -> Tensor:
    """``exp(tau (c_ij - m_i)) / sum_j exp(tau (c_ij - m_i))`` with ``m_i`` the row's largest
    entry: each row's similarities normalized, finite for any ``tau`` (the largest term is 1)."""
    m = cosines.max(dim=-1, keepdim=True).values
    e = torch.exp(tau * (cosines - m))
    return e / e.sum(dim=-1, keepdim=True)


def _check_graph_args(n: int, k: int) -> None:
    if n < 2:
        raise RelatednessError("a relatedness graph needs at least two clients")
    if k < 1:
        raise RelatednessError(f"k must be at least 1; got {k}")


def _dense_topk(similarity: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's ``k`` largest off-diagonal entries (sorted), the (N x N) matrix holding only
    them, and its row sums (inf where they overflow); RelatednessError for a row summing to 0."""
    masked = similarity.clone()
    masked.fill_diagonal_(-math.inf)
    values, index = torch.topk(masked, k, dim=1)
    graph = torch.zeros_like(masked).scatter_(1, index, values)
    row_sums = graph.sum(dim=1, keepdim=True)
    if (row_sums <= 0).any():
        rows = torch.nonzero(row_sums.squeeze(1) <= 0).flatten().tolist()
        raise RelatednessError(f"rows {rows} have no positive similarity to any other client")
    return values, graph, row_sums


def topk_graph(similarity: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest off-diagonal entries of each row, zero the rest, row-normalize.

    The result is row-stochastic with a zero diagonal. With ``k >= N - 1`` every other
    client is kept. Ties are broken by ``torch.topk``: deterministically for a given input,
    but not necessarily lowest index first. A row whose kept entries (each finite) sum
    beyond float64 is divided by its largest entry first; every other row is ``values / sum``.
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise RelatednessError(f"similarity must be square; got shape {tuple(similarity.shape)}")
    _check_graph_args(n, k)
    if (similarity < 0).any() or not torch.isfinite(similarity).all():
        raise RelatednessError("similarities must be finite and non-negative")
    values, graph, row_sums = _dense_topk(similarity.to(torch.float64), min(k, n - 1))
    out = graph / row_sums
    big = ~torch.isfinite(row_sums.squeeze(1))
    if big.any():
        scaled = graph[big] / values[big, :1]
        out[big] = scaled / scaled.sum(dim=1, keepdim=True)
    return out


def topk_graph_from_cosine_sums(cosine_sums: Tensor, tau: float, k: int) -> Tensor:
    """The top-``k`` graph (N x N float64, row-stochastic, zero diagonal) from the sums of
    cosines ``c_ij`` (:func:`cosine_sums`; the diagonal is ignored), for any ``tau``.

    A row whose similarities ``exp(tau c_ij)`` and their top-``k`` sum are finite is exactly
    ``topk_graph(similarity_matrix(...), k)``'s row (bit for bit, the same neighbours); a row
    where either overflows keeps its ``k`` largest ``c_ij`` and weighs them
    ``exp(tau (c_ij - m_i)) / sum exp(tau (c_ij - m_i))``, ``m_i`` the largest (the same
    normalized similarities, computed without their overflowing scale).
    """
    n = cosine_sums.shape[0]
    if cosine_sums.shape != (n, n):
        raise RelatednessError(f"cosine sums must be square; got shape {tuple(cosine_sums.shape)}")
    _check_graph_args(n, k)
    if not torch.isfinite(cosine_sums).all():
        raise RelatednessError("cosine sums contain NaN or infinite values")
    k = min(k, n - 1)
    c = cosine_sums.to(torch.float64)
    s = torch.exp(tau * c)
    s.fill_diagonal_(0.0)
    _, graph, row_sums = _dense_topk(s, k)
    out = graph / row_sums
    big = torch.nonzero(~torch.isfinite(row_sums.squeeze(1))).flatten()
    if big.numel():
        cb = c[big].clone()
        cb[torch.arange(big.numel()), big] = -math.inf
        top, idx = torch.topk(cb, k, dim=1)
        out[big] = torch.zeros_like(cb).scatter_(1, idx, _softmax_rows(top, tau))
    return out


def propagation_matrix(graph: Tensor, alpha: float = 0.8) -> Tensor:
    """Dense personalized-PageRank matrix ``P = (1 - alpha) (I - alpha S)^-1`` (rows sum to 1)."""
    _check_alpha(alpha)
    n = graph.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    return torch.linalg.solve(eye - alpha * graph.to(torch.float64), (1.0 - alpha) * eye)


def propagation_matrix_power(
    graph: Tensor, alpha: float = 0.8, tol: float = POWER_TOLERANCE, max_iter: int | None = None
) -> Tensor:
    """The same ``P`` by power iteration ``W <- (1 - alpha) I + alpha S W`` on a sparse ``S``.

    Converges geometrically with rate ``alpha`` because ``S`` is row-stochastic; stops when the
    largest entry change is below ``tol``. Raises if ``max_iter`` is reached first (default:
    :func:`power_iterations` for ``alpha``, at least 10,000 and at most
    :data:`MAX_POWER_ITERATIONS`, so that any alpha below ``max_power_alpha()``, about
    0.999858, converges; the config refuses a larger one).
    """
    _check_alpha(alpha)
    n = graph.shape[0]
    if max_iter is None:
        dense = graph.to_dense() if graph.is_sparse else graph
        row_sum = float(dense.sum(dim=1, dtype=torch.float64).max()) if n else 1.0
        max_iter = max(10_000, min(power_iterations(alpha, tol, row_sum), MAX_POWER_ITERATIONS))
    w0 = torch.eye(n, dtype=torch.float64)
    return _power_iterate(graph, w0, alpha, tol, max_iter)


def propagate(prop: Tensor, theta: Tensor) -> Tensor:
    """``phi_i = sum_j P_ij theta_j`` for all clients at once: one (N x N) @ (N x P) product."""
    if prop.shape[0] != prop.shape[1] or prop.shape[1] != theta.shape[0]:
        raise RelatednessError(
            f"propagation matrix {tuple(prop.shape)} does not match parameters {tuple(theta.shape)}"
        )
    return prop.to(theta.dtype) @ theta


def propagate_power(
    graph: Tensor, theta: Tensor, alpha: float = 0.8, tol: float = 1e-7, max_iter: int = 10_000
) -> Tensor:
    """``phi = P theta`` without forming ``P``: iterate ``Phi <- (1 - alpha) Theta + alpha S Phi``.

    The reference iteration over the whole N x P parameter matrix (each iteration one sparse
    product plus difference passes): the in-process runtime instead builds the operator once
    per graph (:mod:`secure_fedora.algorithms.propagation`) and applies it once per round. ``tol`` bounds
    the largest absolute change of a parameter between the last two iterations.
    """
    _check_alpha(alpha)
    return _power_iterate(graph, theta, alpha, tol, max_iter)


def _power_iterate(graph: Tensor, w0: Tensor, alpha: float, tol: float, max_iter: int) -> Tensor:
    dtype = w0.dtype
    sparse = graph.to(dtype).to_sparse() if not graph.is_sparse else graph.to(dtype).coalesce()
    base = (1.0 - alpha) * w0
    w = w0.clone()
    for _ in range(max_iter):
        nxt = base + alpha * torch.sparse.mm(sparse, w)
        delta = (nxt - w).abs().max().item()
        w = nxt
        if delta < tol:
            return w
    raise RelatednessError(
        f"power iteration did not converge in {max_iter:,} iterations (alpha {format_exact(alpha)},"
        f" tolerance {format_exact(tol)}); use fedora.propagation 'dense' or 'factored' (exact) or"
        " a smaller fedora.alpha")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise RelatednessError(f"alpha must lie in [0, 1); got {alpha}")


def regularization_weight(loss_local: float, loss_received: float) -> float:
    """Selective regularization: ``exp((L_loc - L_rec) / 2)`` if ``L_loc > L_rec``, else 0.

    The client pulls toward the received parameters only when they generalize better on its
    own validation data. A difference beyond float range (over about 1,419 nats) gives
    ``math.inf``, the value the formula tends to, not an OverflowError.
    """
    if not (math.isfinite(loss_local) and math.isfinite(loss_received)):
        raise ValueError(f"validation losses must be finite; got {loss_local}, {loss_received}")
    if loss_local > loss_received:
        try:
            return math.exp((loss_local - loss_received) / 2.0)
        except OverflowError:
            return math.inf
    return 0.0


def bounded_regularization_weight(lam: float, lr: float, max_pull: float | None) -> float:
    """``lambda_i`` with the pull's per-step fraction ``lr * lambda_i`` bounded by ``max_pull``:
    ``min(lam, max_pull / lr)``; ``max_pull`` None returns ``lam`` unchanged (the paper).

    The pull multiplies ``theta - phi_i`` by ``1 - lr * lambda_i`` per step, so from
    ``lr * lambda_i >= 2`` on it diverges (with weight decay from the lower
    ``core.config.pull_stability_limit``, which the config holds ``max_pull`` below); at 1 a
    step lands on ``phi_i`` plus the SGD step.
    """
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lambda must be >= 0 (math.inf allowed), got {lam}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if max_pull is None:
        return lam
    if not (math.isfinite(max_pull) and max_pull > 0):
        raise ValueError(f"max_pull must be finite and > 0, got {max_pull}")
    return min(lam, max_pull / lr)


def attach_new_client(
    new_summary: Tensor,
    summaries: Tensor,
    prop: Tensor,
    tau: float = 10.0,
    k: int = 2,
    alpha: float = 0.8,
) -> Tensor:
    """Propagation weights over the existing clients for a client that joins late.

    The graph is extended by the newcomer's row only (existing rows are unchanged, so nobody
    retrains). In the extended matrix ``(1 - alpha)(I - alpha S_ext)^-1`` the newcomer's row is
    ``[alpha * s_new^T P, 1 - alpha]``; the last weight is on its own, still untrained
    parameters, so the weights over the existing clients are renormalized to sum to one:
    ``w = s_new^T P`` (already a probability vector because ``s_new`` and ``P`` are
    row-stochastic). Returns ``w`` (N,), and ``phi_new = w @ theta``.
    """
    if new_summary.dim() == 2:
        new_summary = new_summary.unsqueeze(0)
    n = summaries.shape[0]
    if prop.shape != (n, n):
        raise RelatednessError(f"propagation matrix {tuple(prop.shape)} does not match {n} clients")
    if new_summary.shape[1:] != summaries.shape[1:]:
        raise RelatednessError(
            f"new summary {tuple(new_summary.shape[1:])} does not match {tuple(summaries.shape[1:])}"
        )
    overlaps = torch.einsum("dq,jdr->jqr", new_summary[0].to(torch.float64), summaries.to(torch.float64))
    return attach_from_overlaps(overlaps, prop, tau=tau, k=k)


def attach_from_overlaps(overlaps: Tensor, prop: Tensor, tau: float = 10.0, k: int = 2) -> Tensor:
    """As :func:`attach_new_client`, from the newcomer's blocks ``U_new^T U_j`` (N x q x q).

    Lets the encrypted and noised relatedness modes attach a newcomer from the overlaps they
    computed, without the server ever holding a summary.
    """
    n = prop.shape[0]
    if overlaps.shape[0] != n:
        raise RelatednessError(f"{overlaps.shape[0]} overlap blocks for {n} clients")
    return attach_row(overlaps, tau, k) @ prop.to(torch.float64)


def embed_subproblem(sub: Tensor, members: Sequence[int], n: int, isolated: float = 0.0) -> Tensor:
    """An (n x n) float64 matrix with ``sub`` (m x m) at the rows and columns ``members``.

    ``members`` are distinct client indices in [0, n), increasing, with ``sub[a, b]``
    belonging to clients ``members[a]``, ``members[b]``. Every other client ``i`` gets
    ``out[i, i] = isolated`` and zeros elsewhere in its row and column. FEDORA over a subset
    of the federation: ``isolated = 1`` for a graph or propagation matrix (the client keeps
    only its own model -- a unit row, and no member weighs it; with a self-loop of weight 1
    the graph stays row-stochastic and both ``propagation_matrix`` and
    ``propagate_power`` leave the client alone), ``isolated = 0`` for a similarity matrix.
    """
    idx = [int(i) for i in members]
    m = len(idx)
    if sub.shape != (m, m):
        raise RelatednessError(f"sub-matrix has shape {tuple(sub.shape)} for {m} members")
    if any(b <= a for a, b in zip(idx, idx[1:], strict=False)) or (idx and not 0 <= idx[0] <= idx[-1] < n):
        raise RelatednessError(f"members must be increasing client indices in [0, {n}); got {idx[:10]}")
    out = torch.zeros(n, n, dtype=torch.float64)
    rest = sorted(set(range(n)) - set(idx))
    out[rest, rest] = float(isolated)
    if m:
        index = torch.as_tensor(idx)
        out[index.unsqueeze(1), index.unsqueeze(0)] = sub.to(torch.float64)
    return out


def attach_row(overlaps: Tensor, tau: float = 10.0, k: int = 2) -> Tensor:
    """A late joiner's graph row over the ``N`` existing clients (N,), float64: its top-``k``
    similarities from the blocks ``U_new^T U_j`` (N x q x q), normalized to sum to one, for
    any ``tau``: where ``exp(tau c_j)`` or the top-``k`` sum overflows float64, the top-``k``
    by cosine sum weighed ``exp(tau (c_j - m)) / sum exp(tau (c_j - m))``, ``m`` the largest."""
    n = overlaps.shape[0] if overlaps.dim() == 3 else 0
    index, weights = _attach_topk(overlaps, tau, k)
    return torch.zeros(n, dtype=torch.float64).scatter_(0, index, weights)


def attach_neighbours(overlaps: Tensor, tau: float = 10.0, k: int = 2) -> list[int]:
    """The existing clients (indices, increasing) that :func:`attach_row` weighs for a late
    joiner with the blocks ``U_new^T U_j`` (N x q x q): its top-``k`` similarities."""
    index, _ = _attach_topk(overlaps, tau, k)
    return sorted(index.tolist())


def _attach_topk(overlaps: Tensor, tau: float, k: int) -> tuple[Tensor, Tensor]:
    if overlaps.dim() != 3:
        raise RelatednessError(f"a newcomer's overlaps must be (N, q, q); got shape {tuple(overlaps.shape)}")
    n = overlaps.shape[0]
    if n < 1:
        raise RelatednessError("a newcomer needs at least one existing client to attach to")
    if k < 1:
        raise RelatednessError(f"k must be at least 1; got {k}")
    if not torch.isfinite(overlaps).all():
        raise RelatednessError("a newcomer's overlaps contain NaN or infinite values")
    c = torch.linalg.svdvals(overlaps.to(torch.float64)).clamp(0.0, 1.0).sum(dim=-1)
    s = torch.exp(tau * c)
    values, index = torch.topk(s, min(k, n))
    row = torch.zeros(n, dtype=torch.float64).scatter_(0, index, values)
    total = row.sum(dim=0, keepdim=True)
    if torch.isfinite(total).all():
        return index, (row / total)[index]
    top, index = torch.topk(c, min(k, n))
    return index, _softmax_rows(top, tau)


def topk_graph_from_summaries(summaries: Tensor, tau: float = 10.0, k: int = 2, block: int = 256) -> Tensor:
    """The top-``k`` graph of plain summaries (N x d x q) as a sparse COO float64 (N x N)
    tensor, computed ``block`` rows at a time: memory O(block * N + N * k), never N x N.

    Row ``i`` equals ``topk_graph_from_cosine_sums(cosine_sums(subspace_overlaps(summaries)),
    tau, k)[i]`` up to float rounding of the overlap products (the blocks are products of
    other shapes), for any ``tau``: rows whose similarities overflow float64 are weighed in
    the shifted form, as there.
    For ``q = 1`` the cosine is ``|u_i . u_j|``, the singular value of the 1 x 1 block.
    """
    if summaries.dim() != 3:
        raise RelatednessError(f"summaries must be (N, d, q); got shape {tuple(summaries.shape)}")
    if not torch.isfinite(summaries).all():
        raise RelatednessError("summaries contain NaN or infinite values")
    n, _, q = summaries.shape
    if n < 2:
        raise RelatednessError("a relatedness graph needs at least two clients")
    if k < 1:
        raise RelatednessError(f"k must be at least 1; got {k}")
    k = min(k, n - 1)
    u = summaries.to(torch.float64)
    rows, cols, vals = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        if q == 1:
            cosines = (u[start:stop, :, 0] @ u[:, :, 0].T).abs().clamp(0.0, 1.0)
        else:
            blocks = torch.einsum("idq,jdr->ijqr", u[start:stop], u)
            cosines = torch.linalg.svdvals(blocks).clamp(0.0, 1.0).sum(dim=-1)
        s = torch.exp(tau * cosines)
        own = torch.arange(start, stop)
        s[own - start, own] = -math.inf
        values, index = torch.topk(s, k, dim=1)
        sums = values.sum(dim=1, keepdim=True)
        weights = values / sums
        big = torch.nonzero(~torch.isfinite(sums.squeeze(1))).flatten()
        if big.numel():
            cb = cosines[big].clone()
            cb[torch.arange(big.numel()), own[big]] = -math.inf
            top, index[big] = torch.topk(cb, k, dim=1)
            weights[big] = _softmax_rows(top, tau)
        rows.append(own.repeat_interleave(k))
        cols.append(index.reshape(-1))
        vals.append(weights.reshape(-1))
    indices = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(indices, torch.cat(vals), (n, n), check_invariants=True).coalesce()
