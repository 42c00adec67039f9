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
    "exact_dots",
    "joiner_overlaps",
    "propagate",
    "propagate_power",
    "propagation_matrix",
    "propagation_matrix_power",
    "proximal_pull_",
    "regularization_weight",
    "similarity_matrix",
    "subspace_overlaps",
    "summary_rows",
    "top_k_lowest_index",
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
    """All blocks ``U_i^T U_j`` (N x N x q x q) for summaries stacked as (N x d x q).

    Every entry is :func:`exact_dots`' value for its two columns: it depends on those two
    columns only, never on N, on the order of the stack or on how a builder splits it into
    blocks, so every graph builder sees the same overlaps bit for bit (and ``U_i^T U_j`` is
    exactly the transpose of ``U_j^T U_i``).
    """
    u = _checked_summaries(summaries)
    n, d, q = u.shape
    v = u.transpose(1, 2).reshape(n * q, d)
    return _symmetric_exact_gram(v).reshape(n, q, n, q).permute(0, 2, 1, 3).contiguous()


def joiner_overlaps(new_summary: Tensor, summaries: Tensor) -> Tensor:
    """A late joiner's blocks ``U_new^T U_j`` (N x q x q) over the summaries (N x d x q): the
    same values, bit for bit, as the joiner's row of :func:`subspace_overlaps` of the stack
    extended by it (both are :func:`exact_dots`)."""
    if new_summary.dim() == 3 and new_summary.shape[0] == 1:
        new_summary = new_summary[0]
    u = _checked_summaries(summaries)
    if new_summary.dim() != 2 or tuple(new_summary.shape) != tuple(u.shape[1:]):
        raise RelatednessError(
            f"new summary {tuple(new_summary.shape)} does not match {tuple(u.shape[1:])}"
        )
    new = _checked_summaries(new_summary.unsqueeze(0))[0]
    n, d, q = u.shape
    dots = exact_dots(new.T, u.transpose(1, 2).reshape(n * q, d))  # (q, N q)
    return dots.reshape(q, n, q).permute(1, 0, 2).contiguous()


def _checked_summaries(summaries: Tensor) -> Tensor:
    if summaries.dim() != 3:
        raise RelatednessError(f"summaries must be (N, d, q); got shape {tuple(summaries.shape)}")
    if not torch.isfinite(summaries).all():
        raise RelatednessError("summaries contain NaN or infinite values")
    return summaries.to(torch.float64)


# The cosines are dot products computed exactly. Each vector is scaled by a power of two to
# entries in [-1, 1] and split into three fixed-point pieces of _piece_bits(d) bits each
# (h1 + h2 + h3, each a multiple of 2^(-b), 2^(-2b), 2^(-3b)). The products of two pieces
# summed over d are integers (in units of their grid) below 2^53, so a matrix product
# computes them exactly in any summation order, whatever the shapes, the blocking or the
# threads of the BLAS. The levels h_k . h_l with k + l = 2, 3, 4 (the rest lie below
# float64's resolution of the result) are then added in one fixed order and rescaled.
_PIECES = 3


def _piece_bits(d: int) -> int:
    # Level 4 sums 3 d products of at most 2^(2b) units: 2b + log2(3d) <= 53.
    bits = (53 - math.ceil(math.log2(3 * max(d, 1)))) // 2
    if bits < 12:
        raise RelatednessError(f"summaries of dimension {d:,} are too long for exact overlaps")
    return bits


def _split(v: Tensor, bits: int) -> tuple[list[Tensor], Tensor]:
    """Vectors (M x d) as fixed-point pieces of their scaled values, and each one's exponent."""
    top = v.abs().amax(dim=1) if v.shape[1] else torch.zeros(v.shape[0], dtype=v.dtype)
    _, exp = torch.frexp(top)  # top < 2^exp: the scaled entries lie in (-1, 1)
    exp = torch.where(top > 0, exp, torch.zeros_like(exp)).to(torch.int64)
    rest = _times_pow2(v, -exp.unsqueeze(1))
    pieces = []
    for p in range(1, _PIECES + 1):
        grid = 2.0 ** (bits * p)
        piece = torch.round(rest * grid) / grid
        pieces.append(piece)
        rest = rest - piece
    return pieces, exp


def _times_pow2(x: Tensor, exp: Tensor) -> Tensor:
    """``x * 2^exp`` (integer ``exp``, broadcast) in two exact multiplications by powers of
    two built from their bits, each within float64's normal range."""
    half = torch.div(exp, 2, rounding_mode="floor")
    out = x
    for part in (half, exp - half):
        out = out * ((part.clamp(-1022, 1023) + 1023) << 52).view(torch.float64)
    return out


def _combine(l2: Tensor, l3: Tensor, l4: Tensor, exp_sum: Tensor) -> Tensor:
    return _times_pow2(l2 + (l3 + l4), exp_sum)


def exact_dots(a: Tensor, b: Tensor) -> Tensor:
    """Dot products of every row of ``a`` (M x d) with every row of ``b`` (K x d), float64.

    Each entry is a function of its two rows alone (the same bits whatever the shapes,
    the other rows or the BLAS), within about one float64 rounding of the true dot product
    (relative to the rows' norms). The kernel of every relatedness cosine.
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise RelatednessError(
            f"exact_dots needs (M, d) and (K, d); got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    bits = _piece_bits(a.shape[1])
    pa, ea = _split(a, bits)
    pb, eb = _split(b, bits)
    return _levels_mm(_left(pa), _right(pb), ea.unsqueeze(1) + eb.unsqueeze(0))


def _left(p: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return p[0], torch.cat([p[0], p[1]], -1), torch.cat([p[0], p[1], p[2]], -1)


def _right(p: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return p[0], torch.cat([p[1], p[0]], -1), torch.cat([p[2], p[1], p[0]], -1)


def _levels_mm(left: tuple[Tensor, ...], right: tuple[Tensor, ...], exp_sum: Tensor) -> Tensor:
    l2, l3, l4 = (x @ y.T for x, y in zip(left, right, strict=True))
    return _combine(l2, l3, l4, exp_sum)


def _symmetric_exact_gram(v: Tensor) -> Tensor:
    """``exact_dots(v, v)`` in four matrix products instead of six (each level's mixed
    products are transposes of each other, and their sum is exact)."""
    bits = _piece_bits(v.shape[1])
    (h1, h2, h3), e = _split(v, bits)
    l2 = h1 @ h1.T
    x = h1 @ h2.T
    l3 = x + x.T
    x = h1 @ h3.T
    l4 = (x + x.T).add_(h2 @ h2.T)
    del x
    return _combine(l2, l3, l4, e.unsqueeze(1) + e.unsqueeze(0))


def _exact_pair_dots(a: Tensor, b: Tensor, exp_sum: Tensor) -> Tensor:
    """``exact_dots`` of paired rows from their stacked pieces (3 x ... x d, broadcast over
    the middle dimensions): the same bits as the matrix products, every level's partial sums
    being exact in any order."""

    def dot(i: int, j: int) -> Tensor:
        return (a[i] * b[j]).sum(-1)

    l2 = dot(0, 0)
    l3 = dot(0, 1) + dot(1, 0)
    l4 = dot(0, 2) + dot(1, 1) + dot(2, 0)
    return _combine(l2, l3, l4, exp_sum)


def _sequential_sum(x: Tensor) -> Tensor:
    """Sum over the last dimension strictly left to right (``torch.sum`` reduces in an order
    that depends on the tensor's shape; a cumulative sum does not)."""
    if x.shape[-1] == 0:
        return x.sum(dim=-1)
    return torch.cumsum(x, dim=-1)[..., -1]


def _block_cosine_sums(blocks: Tensor) -> Tensor:
    """``sum_k cos_k`` of overlap blocks (... x q x q): each block's singular values (its
    absolute value for q = 1), clamped to [0, 1], summed in order; a function of the block
    alone."""
    if blocks.shape[-1] == 1 and blocks.shape[-2] == 1:
        return blocks[..., 0, 0].abs().clamp(0.0, 1.0)
    return _sequential_sum(torch.linalg.svdvals(blocks).clamp(0.0, 1.0))


def cosine_sums(overlaps: Tensor) -> Tensor:
    """``c_ij = sum_k cos_k``, the sum of the cosines of the principal angles between
    span(U_i) and span(U_j), from the blocks ``U_i^T U_j`` (N x N x q x q) as (N x N) float64.

    The cosines are the singular values of each block, clamped to [0, 1] against rounding
    (and against noise in the noised and encrypted modes, whose blocks are only approximately
    orthonormal). Each ``c_ij`` is a function of its block alone (the same bits as the
    blockwise builder and :func:`attach_row` compute). The diagonal is returned as computed
    (each client's own sum).
    """
    if overlaps.dim() != 4 or overlaps.shape[0] != overlaps.shape[1]:
        raise RelatednessError(f"overlaps must be (N, N, q, q); got shape {tuple(overlaps.shape)}")
    if not torch.isfinite(overlaps).all():
        raise RelatednessError("overlaps contain NaN or infinite values")
    return _block_cosine_sums(overlaps.to(torch.float64))


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
    return e / _sequential_sum(e).unsqueeze(-1)


def _check_graph_args(n: int, k: int) -> None:
    if n < 2:
        raise RelatednessError("a relatedness graph needs at least two clients")
    if k < 1:
        raise RelatednessError(f"k must be at least 1; got {k}")


def _check_tau(tau: float) -> None:
    # The builders rank by cosine sum: the order of the similarities exp(tau c) for tau > 0.
    if not (math.isfinite(tau) and tau > 0):
        raise RelatednessError(f"fedora.tau = {tau}: tau must be finite and > 0")


def top_k_lowest_index(scores: Tensor, k: int) -> Tensor:
    """Column indices (R x k, increasing in each row) of each row's ``k`` largest scores
    (R x M, no NaN, ``k <= M``); among equal scores the lowest column index first.

    FEDORA's tie rule for every graph builder. It costs one ``torch.topk`` for the ``k``-th
    largest value and a few passes over the rows (a cumulative count only in rows with more
    tied entries than places), no sort of a row.
    """
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    keep = scores > kth
    tied = scores == kth
    need = k - keep.sum(dim=1, keepdim=True)
    crowded = (tied.sum(dim=1, keepdim=True) > need).squeeze(1)
    if crowded.any():
        t = tied[crowded]
        tied[crowded] = t & (torch.cumsum(t, dim=1) <= need[crowded])
    keep |= tied
    return keep.nonzero()[:, 1].reshape(-1, k)


def _graph_weights(kept: Tensor, tau: float) -> Tensor:
    """Weights of each row's kept cosine sums (R x k, in increasing column order):
    ``exp(tau c) / sum exp(tau c)``, summed left to right; where the similarities or their sum
    overflow float64, the shifted form :func:`_softmax_rows` (the same normalized values)."""
    s = torch.exp(tau * kept)
    total = _sequential_sum(s).unsqueeze(1)
    out = s / total
    big = ~torch.isfinite(total.squeeze(1))
    if big.any():
        out[big] = _softmax_rows(kept[big], tau)
    return out


def _no_self(values: Tensor, rows: Tensor) -> Tensor:
    """``values`` (R x N) with each row's own client (column ``rows[r]``) set to -inf."""
    out = values.clone()
    out[torch.arange(rows.numel(), device=out.device), rows.to(out.device)] = -math.inf
    return out


def topk_graph(similarity: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest off-diagonal entries of each row, zero the rest, row-normalize.

    The result is row-stochastic with a zero diagonal. With ``k >= N - 1`` every other
    client is kept. Among equal similarities the lowest client index is kept first
    (:func:`top_k_lowest_index`). Each row is ``values / sum`` (summed in increasing column
    order); a row whose kept entries (each finite) sum beyond float64 is divided by its
    largest entry first.
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise RelatednessError(f"similarity must be square; got shape {tuple(similarity.shape)}")
    _check_graph_args(n, k)
    if (similarity < 0).any() or not torch.isfinite(similarity).all():
        raise RelatednessError("similarities must be finite and non-negative")
    s = _no_self(similarity.to(torch.float64), torch.arange(n))
    index = top_k_lowest_index(s, min(k, n - 1))
    values = s.gather(1, index)
    total = _sequential_sum(values).unsqueeze(1)
    if (total <= 0).any():
        rows = torch.nonzero(total.squeeze(1) <= 0).flatten().tolist()
        raise RelatednessError(f"rows {rows} have no positive similarity to any other client")
    weights = values / total
    big = ~torch.isfinite(total.squeeze(1))
    if big.any():
        scaled = values[big] / values[big].amax(dim=1, keepdim=True)
        weights[big] = scaled / _sequential_sum(scaled).unsqueeze(1)
    return torch.zeros_like(s).scatter_(1, index, weights)


def topk_graph_from_cosine_sums(cosine_sums: Tensor, tau: float, k: int) -> Tensor:
    """The top-``k`` graph (N x N float64, row-stochastic, zero diagonal) from the sums of
    cosines ``c_ij`` (:func:`cosine_sums`; the diagonal is ignored), for any ``tau > 0``.

    Each row keeps its ``k`` largest ``c_ij`` (the ``k`` largest similarities
    ``exp(tau c_ij)``); among equal sums the lowest client index first
    (:func:`top_k_lowest_index`), as every graph builder here. A row whose similarities and
    their top-``k`` sum are finite is ``exp(tau c) / sum exp(tau c)`` over them, summed in
    increasing column order (``topk_graph(similarity_matrix(...), k)``'s row, bit for bit,
    unless float64's ``exp`` rounds two different sums of the row to one similarity at the
    ``k``-th place, where this keeps the larger sum); a row where either overflows weighs
    them ``exp(tau (c_ij - m_i)) / sum exp(tau (c_ij - m_i))``, ``m_i`` the largest (the same
    normalized similarities, computed without their overflowing scale).
    """
    n = cosine_sums.shape[0]
    if cosine_sums.shape != (n, n):
        raise RelatednessError(f"cosine sums must be square; got shape {tuple(cosine_sums.shape)}")
    _check_graph_args(n, k)
    _check_tau(tau)
    if not torch.isfinite(cosine_sums).all():
        raise RelatednessError("cosine sums contain NaN or infinite values")
    c = _no_self(cosine_sums.to(torch.float64), torch.arange(n))
    index = top_k_lowest_index(c, min(k, n - 1))
    weights = _graph_weights(c.gather(1, index), tau)
    return torch.zeros_like(c).scatter_(1, index, weights)


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
    n = summaries.shape[0]
    if prop.shape != (n, n):
        raise RelatednessError(f"propagation matrix {tuple(prop.shape)} does not match {n} clients")
    overlaps = joiner_overlaps(new_summary, summaries)
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
    _check_tau(tau)
    if not torch.isfinite(overlaps).all():
        raise RelatednessError("a newcomer's overlaps contain NaN or infinite values")
    c = _block_cosine_sums(overlaps.to(torch.float64)).unsqueeze(0)
    index = top_k_lowest_index(c, min(k, n))
    return index[0], _graph_weights(c.gather(1, index), tau)[0]


def topk_graph_from_summaries(summaries: Tensor, tau: float = 10.0, k: int = 2, block: int = 256) -> Tensor:
    """The top-``k`` graph of plain summaries (N x d x q) as a sparse COO float64 (N x N)
    tensor, computed ``block`` rows at a time: memory O(block * N + N * k), never N x N.

    Equal, bit for bit and for any ``block`` and ``tau > 0``, to
    ``topk_graph_from_cosine_sums(cosine_sums(subspace_overlaps(summaries)), tau, k)``: the
    same neighbours (the same tie rule) and weights. Each block's cosine sums are first
    computed with one fast matrix product; the entries that can reach the top ``k`` (within
    a bound on that product's rounding error of the row's ``k``-th largest) are then
    recomputed with :func:`exact_dots`, as the dense overlaps are, and only those rank.
    """
    u = _checked_summaries(summaries)
    n, d, q = u.shape
    _check_graph_args(n, k)
    _check_tau(tau)
    if block < 1:
        raise RelatednessError(f"block must be at least 1; got {block}")
    k = min(k, n - 1)
    cols = u.transpose(1, 2)  # (N, q, d): client j's summary columns
    split, exps = _split(cols.reshape(n * q, d), _piece_bits(d))
    pieces = torch.stack(split).reshape(_PIECES, n, q, d)
    del split
    exps = exps.reshape(n, q)
    # |fast - exact| <= delta for every cosine sum: q^2 entries each off by at most a few
    # (d + q) roundings of products of norms, plus the singular values' own rounding.
    norm2 = float(cols.square().sum(-1).amax())
    delta = 64.0 * q * q * (d + q + 8) * torch.finfo(torch.float64).eps * max(norm2, 1.0)
    rows, col_idx, vals = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        own = torch.arange(start, stop)
        local = torch.arange(stop - start)
        if q == 1:
            fast = (u[start:stop, :, 0] @ u[:, :, 0].T).abs_().clamp_(0.0, 1.0)
        else:
            blocks = torch.einsum("idq,jdr->ijqr", u[start:stop], u)
            fast = torch.linalg.svdvals(blocks).clamp(0.0, 1.0).sum(dim=-1)
        fast[local, own] = -math.inf
        kth = torch.topk(fast, k, dim=1).values[:, -1:]
        r, c = (fast >= kth - 2.0 * delta).nonzero(as_tuple=True)
        del fast
        if r.numel() * 32 > (stop - start) * n:  # many near-ties: the whole block exactly
            exact = _exact_cosine_sums(pieces, exps, own, torch.arange(n))
            exact[local, own] = -math.inf
            index = top_k_lowest_index(exact, k)
            kept = exact.gather(1, index)
        else:
            # Only the candidates, one row of them per client (nonzero lists them by row and
            # then column, so the lowest position is the lowest client index), padded by -inf.
            counts = torch.bincount(r, minlength=stop - start)
            slot = torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r]
            width = int(counts.max())
            exact = torch.full((stop - start, width), -math.inf, dtype=torch.float64)
            column = torch.zeros((stop - start, width), dtype=torch.long)
            for lo in range(0, r.numel(), 4096):
                part = slice(lo, lo + 4096)
                exact[r[part], slot[part]] = _exact_cosine_sums(
                    pieces, exps, r[part] + start, c[part], pairs=True
                )
            column[r, slot] = c
            where = top_k_lowest_index(exact, k)
            index = column.gather(1, where)
            kept = exact.gather(1, where)
        rows.append(own.repeat_interleave(k))
        col_idx.append(index.reshape(-1))
        vals.append(_graph_weights(kept, tau).reshape(-1))
    indices = torch.stack([torch.cat(rows), torch.cat(col_idx)])
    return torch.sparse_coo_tensor(indices, torch.cat(vals), (n, n), check_invariants=True).coalesce()


def _exact_cosine_sums(
    pieces: Tensor, exps: Tensor, a: Tensor, b: Tensor, pairs: bool = False
) -> Tensor:
    """Cosine sums of clients ``a`` with clients ``b`` from their columns' stacked pieces
    (3 x N x q x d) and exponents (N x q): every pair (``len(a) x len(b)``), or ``a[p]`` with
    ``b[p]`` when ``pairs``; the same bits as :func:`cosine_sums` of :func:`subspace_overlaps`."""
    pa, pb = pieces[:, a], pieces[:, b]
    q = exps.shape[1]
    if pairs:
        blocks = _exact_pair_dots(
            pa.unsqueeze(3), pb.unsqueeze(2), exps[a].unsqueeze(2) + exps[b].unsqueeze(1)
        )
        return _block_cosine_sums(blocks)
    m, n = a.numel(), b.numel()
    dots = _levels_mm(
        _left(list(pa.reshape(3, m * q, -1))),
        _right(list(pb.reshape(3, n * q, -1))),
        exps[a].reshape(-1, 1) + exps[b].reshape(1, -1),
    )
    return _block_cosine_sums(dots.reshape(m, q, n, q).permute(0, 2, 1, 3))
