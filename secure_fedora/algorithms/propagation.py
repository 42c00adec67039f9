"""FEDORA's propagation operator, built once per relatedness graph and applied every round.

The relatedness graph ``S`` is fixed after the first round, so the personalized-PageRank
operator ``P = (1 - alpha)(I - alpha S)^-1`` is fixed too; only ``phi = P @ theta`` changes.
:class:`PropagationOperator` holds ``P`` either dense (an exact solve, for small N) or as a
sparse matrix with a proven error bound (a truncated power series on the sparse top-k graph,
for large N). Each round is then one (sparse or dense) product over the (N x P) parameters,
written straight into the ``phi`` matrix (no N x P temporary); a sparse operator can also
compute only some rows (:meth:`PropagationOperator.apply_rows`), at a cost proportional to
their non-zeros. A factored operator (:mod:`~secure_fedora.algorithms.factored`) is exact like
the dense one and sparse like the truncated one: the default above ``AUTO_DENSE_MAX_CLIENTS``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from privacy.accounting import format_exact
from secure_fedora.algorithms.config_checks import series_terms
from secure_fedora.algorithms.factored import (
    FactoredPropagation,
    FactorTooDense,
    check_graph,
    factor_propagation,
    gather_sources,
    select_rows,
)
from secure_fedora.algorithms.fedora import (
    RelatednessError,
    embed_subproblem,
    propagation_matrix,
    propagation_matrix_power,
)
from secure_fedora.core.config import AUTO_DENSE_MAX_CLIENTS

__all__ = [
    "AUTO_DENSE_MAX_CLIENTS",
    "OperatorKind",
    "PropagationOperator",
    "build_operator",
    "embed_operator",
    "resolve_propagation",
    "sparse_graph",
    "sparse_propagation_matrix",
]

OperatorKind = Literal["dense", "sparse", "factored"]

# "auto" above AUTO_DENSE_MAX_CLIENTS takes the factored operator when its passes hold at most
# this many entries per client (FEDORA's rotated-MNIST graphs: 8.5 at 1,000 clients, 11.4 at
# 10,000), the factoring stopping as soon as they would hold more. Long chains in the graph
# fill the inverse factors in (clients on a line, k = 2, alpha 0.8: 145 entries per row at
# 1,000 clients, 460 at 4,000, where the truncated series keeps 28), so "auto" then builds
# the truncated series and keeps whichever costs fewer entries per row plus one per pass.
AUTO_FACTORED_MAX_NNZ_PER_ROW = 48.0

# Past that budget, "auto" builds the truncated series only while it stays cheap to build and
# apply: it stops (and the complete factored operator is taken) once the series holds more
# than this many entries per client, or when it would need more than AUTO_SERIES_MAX_TERMS
# terms (alpha near 1: log(tolerance / 4) / log(alpha) terms, each one sparse product; at
# alpha 0.999 and tolerance 1e-4, 10,597 terms took 259 s at 257 clients, where the complete
# factored operator of the same graph builds in 1 s).
AUTO_SERIES_MAX_NNZ_PER_ROW = 4 * AUTO_FACTORED_MAX_NNZ_PER_ROW
AUTO_SERIES_MAX_TERMS = 1024

# A graph keeping at least this fraction of the other clients per row (k near N) makes P dense
# whatever the operator: up to AUTO_DENSE_GRAPH_MAX_CLIENTS clients "auto" then solves densely
# (1,000 clients, k = 999: 0.14 s, where the factored operator took 10 s to reach 1,001
# entries per row, applied by embedding-bag sums instead of one BLAS product).
AUTO_DENSE_GRAPH_FRACTION = 0.25
AUTO_DENSE_GRAPH_MAX_CLIENTS = 4096

# Columns of theta processed per sparse product: a (N x block) slice of theta stays in cache
# while every non-zero of P reads it. CSR product (CUDA), measured (CPU s, one thread, 118,282
# columns): N = 1,000: 32 -> 0.41, 256 -> 0.42, 512 -> 0.51, unblocked 1.3; N = 3,000: 16 ->
# 2.03, 32 -> 1.59, 128 -> 2.04, 512 -> 2.25.
_SPARSE_COLUMN_BLOCK = 32
# The CPU kernel (a weighted embedding-bag sum per row; embedding_bag first copies the strided
# theta block to a contiguous one, about 0.03 s of a full product at N = 1,000), measured on one thread, 22 nnz/row at N = 1,000: 64 -> 0.17 s, 128 -> 0.165 s,
# 256 -> 0.172 s, 1024 -> 0.21 s (the CSR product above: 0.29 s); 215 nnz/row at N = 10,000:
# 64 -> 18.6 s, 128 -> 13.8 s, 256 -> 13.3 s (CSR: 40.9 s).
_BAG_COLUMN_BLOCK = 128

# First drop threshold of the series terms, tolerance / (THRESHOLD_DIVISOR * terms); lowered
# 100-fold and rebuilt while the deficits exceed tolerance / 2 (the bound is always checked).
THRESHOLD_DIVISOR = 4.0


def resolve_propagation(mode: str, num_clients: int) -> str:
    """The propagation actually used: ``"auto"`` becomes ``"dense"`` for at most
    ``AUTO_DENSE_MAX_CLIENTS`` clients and ``"factored"`` (exact, sparse) above; other modes
    are returned as is."""
    if mode == "auto":
        return "dense" if num_clients <= AUTO_DENSE_MAX_CLIENTS else "factored"
    if mode not in ("dense", "sparse", "factored", "power", "encrypted"):
        raise RelatednessError(f"unknown propagation mode {mode!r}")
    return mode


def sparse_graph(graph: Tensor) -> Tensor:
    """``graph`` (dense or sparse, N x N) as a coalesced sparse COO float64 tensor."""
    if graph.is_sparse:
        return graph.to(torch.float64).coalesce()
    if graph.layout != torch.strided:
        return graph.to_sparse_coo().to(torch.float64).coalesce()
    return graph.to(torch.float64).to_sparse().coalesce()


def _csr(t: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": used as documented
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        return t.to_sparse_csr()


def _coo(indices: Tensor, values: Tensor, n: int) -> Tensor:
    return torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=False).coalesce()


def _row_sums(coo: Tensor) -> Tensor:
    n = coo.shape[0]
    return torch.zeros(n, dtype=coo.dtype, device=coo.device).index_add_(0, coo.indices()[0], coo.values())


class SeriesTooCostly(RelatednessError):
    """The truncated series would need more terms, or hold more entries per client, than the
    budget given to :func:`sparse_propagation_matrix` (``"auto"`` then takes the complete
    factored operator)."""


def sparse_propagation_matrix(graph: Tensor, alpha: float, tolerance: float, *,
                              max_terms: int | None = None,
                              max_nnz_per_row: float | None = None) -> tuple[Tensor, Tensor]:
    """A sparse ``P~`` with ``0 <= P~ <= P`` entrywise and row deficits ``d_i <= tolerance``.

    Returns ``(P~ as sparse COO float64, d)`` with ``d_i = 1 - sum_j P~_ij``. With
    ``max_terms`` or ``max_nnz_per_row``, raises :class:`SeriesTooCostly` as soon as the series
    needs more terms or its sum holds more entries per client.

    Construction: the series ``P = (1 - alpha) sum_t alpha^t S^t`` truncated after ``T``
    terms, where each term ``W_{t+1} = drop(S W_t)`` (``W_0 = I``) loses its entries below a
    threshold, and finally each row loses its smallest entries while its deficit stays within
    ``tolerance``. If a row's deficit exceeds ``tolerance`` the threshold is lowered and the
    series rebuilt.

    Error bound (proof). ``S`` is row-stochastic with non-negative entries, so ``S^t 1 = 1`` and
    ``P 1 = (1 - alpha) sum_t alpha^t 1 = 1``: every row of ``P`` sums to 1, and every term of
    the series is non-negative. By induction ``0 <= W_t <= S^t`` entrywise (``W_0 = I``;
    ``W_{t+1} = drop(S W_t) <= S W_t <= S S^t``, since dropping only zeroes non-negative
    entries); truncating the series and the final per-row pruning also only remove
    non-negative terms. Hence ``E = P - P~ >= 0`` entrywise and its row ``i`` has L1 norm
    ``sum_j E_ij = 1 - sum_j P~_ij = d_i``. For any parameters ``theta`` (N x P) and any
    coordinate ``p``: ``|phi_i[p] - phi~_i[p]| = |sum_j E_ij theta_j[p]|
    <= d_i * max_j |theta_j[p]| <= tolerance * max_j |theta_j[p]|``. The deficits are computed
    exactly from ``P~`` (up to float64 rounding, about ``1e-15`` per row), so the bound is
    checked, not assumed; applying ``P~`` in float32 adds the same rounding as the dense path.

    Rows of ``S`` summing to slightly more than 1 (the graph check accepts ``1 + 1e-5``):
    with ``r = max_i sum_j S_ij = 1 + eps``, ``S^t 1 <= r^t`` gives ``P 1 <= (1 - alpha) /
    (1 - alpha r) = 1 + slack``, ``slack = alpha eps / (1 - alpha r)``, so ``d_i`` includes
    ``slack`` (about 1e-15 for a graph normalized in float64; 9e-4 at alpha 0.99 and eps
    9e-6, which a tolerance below it refuses).
    """
    if not 0.0 <= alpha < 1.0:
        raise RelatednessError(f"alpha must lie in [0, 1); got {alpha}")
    if not 0.0 < tolerance < 1.0:
        raise RelatednessError(f"propagation tolerance must lie in (0, 1); got {tolerance}")
    checked = check_graph(graph, alpha)
    excess = max(0.0, float(np.asarray(checked.sum(axis=1)).max()) - 1.0)
    slack = 0.0
    if excess > 0.0:
        if alpha * (1.0 + excess) >= 1.0:
            raise RelatednessError(f"graph rows sum to up to 1 + {excess:.3g}: at alpha "
                                   f"{format_exact(alpha)} the series does not converge; "
                                   "normalize the graph's rows")
        slack = alpha * excess / (1.0 - alpha * (1.0 + excess))
    if slack >= tolerance / 2.0:  # "auto" then takes the exact factored operator
        raise SeriesTooCostly(
            f"graph rows sum to up to 1 + {excess:.3g}, which at alpha {format_exact(alpha)} may"
            f" put {slack:.3g} more weight in each row of P than the truncated series can bound"
            f" within tolerance {format_exact(tolerance)}; normalize the graph's rows, or use an"
            " exact operator")
    tolerance -= slack  # the series' own budget
    s = sparse_graph(graph.detach())
    n = s.shape[0]
    # Series tail alpha^T <= tolerance / 4; the rest of the budget goes to dropped entries.
    terms = series_terms(alpha, tolerance)
    if max_terms is not None and terms > max_terms:
        raise SeriesTooCostly(f"the truncated series needs {terms} terms (alpha"
                              f" {format_exact(alpha)}, tolerance {format_exact(tolerance)}), more"
                              f" than {max_terms}")
    max_nnz = None if max_nnz_per_row is None else int(max_nnz_per_row * n)
    threshold = tolerance / (THRESHOLD_DIVISOR * terms)
    s_csr = _csr(s)
    for _ in range(8):
        approx = _truncated_series(s_csr, n, alpha, terms, threshold, max_nnz)
        deficit = 1.0 - _row_sums(approx)
        if float(deficit.max()) <= tolerance / 2.0:
            pruned = _prune_rows(approx, deficit, tolerance)
            return pruned, 1.0 - _row_sums(pruned) + slack
        threshold /= 100.0
    raise RelatednessError(
        f"could not reach propagation tolerance {tolerance + slack} (largest row deficit"
        f" {float(deficit.max()) + slack:.3g})")


def _truncated_series(s_csr: Tensor, n: int, alpha: float, terms: int, threshold: float,
                      max_nnz: int | None = None) -> Tensor:
    eye = torch.arange(n, device=s_csr.device)
    term = _coo(torch.stack([eye, eye]), torch.ones(n, dtype=torch.float64, device=s_csr.device), n)
    acc = _coo(term.indices(), term.values() * (1.0 - alpha), n)
    for t in range(1, terms):
        term = (s_csr @ _csr(term)).to_sparse_coo().coalesce()
        weight = (1.0 - alpha) * alpha**t
        keep = term.values() * weight >= threshold
        term = _coo(term.indices()[:, keep], term.values()[keep], n)
        if term._nnz() == 0:
            break
        # summed term by term: memory stays O(nnz of the sum), not O(sum of the terms' nnz)
        acc = _coo(torch.cat([acc.indices(), term.indices()], dim=1),
                   torch.cat([acc.values(), term.values() * weight]), n)
        if max_nnz is not None and acc._nnz() > max_nnz:
            raise SeriesTooCostly(f"the truncated series holds more than {max_nnz / n:g} entries"
                                  f" per client after {t + 1} of {terms} terms")
    return acc


def _prune_rows(approx: Tensor, deficit: Tensor, tolerance: float) -> Tensor:
    """Drop each row's smallest entries while the row's deficit stays <= ``tolerance / 1.01``
    (a margin for the float64 rounding of the sums)."""
    n = approx.shape[0]
    rows, cols = approx.indices()
    vals = approx.values()
    order = torch.argsort(vals, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # by row, ascending value within
    r, v = rows[order], vals[order]
    csum = torch.cumsum(v, 0)
    counts = torch.bincount(r, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    before_row = torch.cat([csum.new_zeros(1), csum])[starts][r]
    dropped_if_cut = csum - before_row  # mass dropped if this entry and the smaller ones go
    keep = deficit[r] + dropped_if_cut > tolerance / 1.01
    kept = order[keep]
    return _coo(torch.stack([rows[kept], cols[kept]]), vals[kept], n)


@dataclass
class PropagationOperator:
    """``P`` for one graph: ``apply(theta)`` is ``phi = P @ theta`` in ``theta``'s dtype.

    ``kind == "dense"``: ``matrix`` is the (N x N) float64 ``P`` and ``error_bound`` 0 (exact up
    to float rounding). ``kind == "sparse"``: ``matrix`` is ``P~`` (sparse COO float64) with
    ``0 <= P~ <= P`` and ``error_bound = max_i d_i <= tolerance``, so that
    ``|phi - phi~| <= error_bound * max_j |theta_j|`` per coordinate (see
    :func:`sparse_propagation_matrix`). ``kind == "factored"``: ``matrix`` is the graph ``S``
    (sparse COO float64) and ``factors`` the exact ``P`` as sparse passes
    (:func:`~secure_fedora.algorithms.factored.factor_propagation`); ``error_bound`` 0.
    """

    kind: OperatorKind
    matrix: Tensor
    error_bound: float = 0.0
    tolerance: float = 0.0
    factors: FactoredPropagation | None = None

    def __post_init__(self) -> None:
        self._cast: dict[torch.dtype, Tensor] = {}

    @property
    def num_clients(self) -> int:
        """N, the operator's rows (one per client)."""
        return int(self.matrix.shape[0])

    @property
    def nnz(self) -> int:
        """Stored entries of ``P`` (N * N when dense; of all passes when factored)."""
        if self.factors is not None:
            return self.factors.nnz
        return self.num_clients**2 if self.kind == "dense" else int(self.matrix._nnz())

    def _matrix_as(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        if key not in self._cast:
            m = self.matrix.to(device)
            self._cast[key] = m.to(dtype) if self.kind == "dense" else _csr(m.to(dtype))
        return self._cast[key]

    def apply(self, theta: Tensor, out: Tensor | None = None) -> Tensor:
        """``phi = P @ theta`` (N x P), written into ``out`` when given (``out`` must not alias
        ``theta``). Dense: one BLAS product, bit-identical to ``P.to(theta.dtype) @ theta``.
        Sparse: on the CPU each row is a weighted sum of theta rows in the stored order of its
        non-zeros (deterministic, independent of the thread count and of theta's memory layout,
        and equal bit for bit to :meth:`apply_rows` of any subset of rows); on CUDA one CSR
        product per column block. Sparse and factored operators read a non-contiguous theta
        through a contiguous copy."""
        out = self._checked_out(theta, out)
        if self.kind != "dense":  # the row sums' order is that of a contiguous theta
            theta = theta.contiguous()
        if self.factors is not None:
            self.factors.apply(theta, out)
            return out
        m = self._matrix_as(theta.dtype, theta.device)
        if self.kind == "dense":
            return torch.matmul(m, theta, out=out)
        if theta.device.type != "cpu":
            for start in range(0, theta.shape[1], _SPARSE_COLUMN_BLOCK):
                stop = min(start + _SPARSE_COLUMN_BLOCK, theta.shape[1])
                out[:, start:stop] = m @ theta[:, start:stop].contiguous()
            return out
        self._weighted_row_sums(theta, m.crow_indices(), m.col_indices(), m.values(), out, None)
        return out

    def apply_rows(self, theta: Tensor, rows: Sequence[int] | Tensor, out: Tensor) -> Tensor:
        """``out[i] = (P @ theta)[i]`` for the clients in ``rows`` only; every other row of
        ``out`` is left untouched. The cost is proportional to the non-zeros of those rows
        (sparse, CPU); each written row equals :meth:`apply`'s bit for bit. A dense operator,
        or sparse on CUDA, computes the full product and copies the rows (so the rows are
        :meth:`apply`'s there too)."""
        out = self._checked_out(theta, out)
        if self.kind != "dense":
            theta = theta.contiguous()
        index = _client_indices(rows)
        n = self.num_clients
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise RelatednessError(f"rows outside 0..{n - 1} requested from the propagation operator")
        if index.numel() == 0:
            return out
        if index.numel() >= n and torch.unique(index).numel() == n:
            return self.apply(theta, out)  # every row: the blocked product
        if self.factors is not None:
            self.factors.apply(theta, out, torch.unique(index))
            return out
        if self.kind == "dense" or theta.device.type != "cpu":
            on_device = index.to(theta.device)
            out[on_device] = self.apply(theta)[on_device]
            return out
        m = self._matrix_as(theta.dtype, theta.device)
        crow, col, val = m.crow_indices(), m.col_indices(), m.values()
        offsets, positions = select_rows(crow, index)
        total = positions.numel()
        # Few non-zeros: read the theta rows in place (whole rows, no copy); more than one per
        # client on average: by cache-sized column blocks, as apply (equal results either way).
        width = theta.shape[1] if total <= n else _BAG_COLUMN_BLOCK
        self._weighted_row_sums(theta, offsets, col[positions], val[positions], out, index, width)
        return out

    def _checked_out(self, theta: Tensor, out: Tensor | None) -> Tensor:
        n = self.num_clients
        if theta.dim() != 2 or theta.shape[0] != n:
            raise RelatednessError(f"propagation operator for {n} clients does not match parameters "
                                   f"{tuple(theta.shape)}")
        if not theta.dtype.is_floating_point:
            raise RelatednessError(f"parameters must be floating point, got {theta.dtype}")
        if out is None:
            return torch.empty_like(theta)
        if out.shape != theta.shape:
            raise RelatednessError(f"out has shape {tuple(out.shape)}, theta {tuple(theta.shape)}")
        if out.dtype != theta.dtype or out.device != theta.device:
            raise RelatednessError(f"out ({out.dtype} on {out.device}) must have theta's dtype and "
                                   f"device ({theta.dtype} on {theta.device})")
        if _overlap(out, theta):
            raise RelatednessError("out must not share memory with theta (their address ranges "
                                   "intersect, and phi is written while theta is still read)")
        return out

    @staticmethod
    def _weighted_row_sums(theta: Tensor, offsets: Tensor, columns: Tensor, weights: Tensor,
                           out: Tensor, rows: Tensor | None, width: int = _BAG_COLUMN_BLOCK) -> None:
        """``out[rows[r]] = sum_k weights[k] * theta[columns[k]]`` over ``k`` in
        ``offsets[r]:offsets[r + 1]`` (``rows`` None: every row in order), ``width`` columns at
        a time. Each output row is one bag of a weighted embedding-bag sum: accumulated in the
        stored order by one thread, whatever the other bags and the width are (tested)."""
        sources = None
        if rows is not None and width < theta.shape[1]:
            sources, columns = gather_sources(columns)
        for start in range(0, theta.shape[1], width):
            stop = min(start + width, theta.shape[1])
            source = theta[:, start:stop] if sources is None else theta[:, start:stop].index_select(0, sources)
            block = F.embedding_bag(columns, source, offsets, mode="sum",
                                    per_sample_weights=weights, include_last_offset=True)
            if rows is None:
                out[:, start:stop] = block
            else:
                out[rows, start:stop] = block

    def combine(self, weights: Tensor) -> Tensor:
        """``weights @ P`` (N,) float64 for a weight vector over the clients (a late joiner's
        normalized similarity row): its propagation weights over the existing clients."""
        if weights.shape != (self.num_clients,):
            raise RelatednessError(f"{tuple(weights.shape)} weights for {self.num_clients} clients")
        w = weights.to(torch.float64)
        if self.factors is not None:
            return self.factors.combine(w)
        if self.kind == "dense":
            return w @ self.matrix.to(torch.float64)
        return torch.sparse.mm(self.matrix.t().coalesce(), w.unsqueeze(1)).squeeze(1)

    def to_dense(self) -> Tensor:
        """``P`` (or ``P~``) as a dense (N x N) float64 matrix (for plots and small N)."""
        if self.factors is not None:
            return self.factors.to_dense()
        return self.matrix if self.kind == "dense" else self.matrix.to_dense()


def _client_indices(rows: Sequence[int] | Tensor) -> Tensor:
    """``rows`` as a flat int64 tensor of client indices; booleans (a mask read as indices
    would select clients 0 and 1) and floating-point values are refused."""
    def is_boolean(r: object) -> bool:
        return isinstance(r, (bool, np.bool_)) or (isinstance(r, (Tensor, np.ndarray))
                                                    and r.dtype in (torch.bool, np.bool_))

    # list elements are checked first: torch.as_tensor reads [True, 3] as [1, 3]
    if is_boolean(rows) or (isinstance(rows, (list, tuple)) and any(is_boolean(r) for r in rows)):
        raise RelatednessError("rows must be client indices, not a boolean mask (pass mask.nonzero())")
    if isinstance(rows, (str, bytes)):
        raise RelatednessError(f"rows must be client indices, got {type(rows).__name__} {rows!r}")
    try:
        index = rows if isinstance(rows, Tensor) else torch.as_tensor(rows)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RelatednessError(f"rows must be client indices, got {type(rows).__name__}: {err}") from None
    if index.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if index.is_floating_point() or index.is_complex():
        raise RelatednessError(f"rows must be integer client indices, got {index.dtype}")
    return index.to(torch.long).reshape(-1).cpu()


def _address_range(t: Tensor) -> tuple[int, int]:
    """The half-open range of memory addresses ``t``'s elements span (``data_ptr`` already
    points at the first element, whatever storage or buffer the tensor views)."""
    low = high = 0
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride < 0:
            low += (size - 1) * stride
        else:
            high += (size - 1) * stride
    return t.data_ptr() + low * t.element_size(), t.data_ptr() + (high + 1) * t.element_size()


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory: non-empty, on one device, and spanning
    intersecting address ranges. Compared by address, not by storage, so two tensors over one
    buffer (``torch.from_numpy`` of two views, ``frombuffer``) are caught too; conservative
    for interleaved strides (column halves of one buffer count as overlapping)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _address_range(a), _address_range(b)
    return a0 < b1 and b0 < a1


def embed_operator(sub: PropagationOperator, members: list[int], n: int) -> PropagationOperator:
    """The operator over ``n`` clients that applies ``sub`` (over ``members``, increasing) to
    the members and leaves every other client exactly alone (a unit row and column): FEDORA
    over a subset of the federation, as :func:`~secure_fedora.algorithms.fedora.embed_subproblem`."""
    if sub.kind == "dense":
        return PropagationOperator("dense", embed_subproblem(sub.matrix, members, n, 1.0))
    index = torch.as_tensor(members, dtype=torch.long)
    if index.numel() != sub.num_clients:
        raise RelatednessError(f"{index.numel()} members for an operator over {sub.num_clients} clients")
    if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= n
                          or bool((index[1:] <= index[:-1]).any())):
        raise RelatednessError(f"members must be strictly increasing client indices in 0..{n - 1}")
    rest = torch.as_tensor(sorted(set(range(n)) - set(members)), dtype=torch.long)
    m = sub.matrix.coalesce()
    indices = torch.cat([index[m.indices()], torch.stack([rest, rest])], dim=1)
    values = torch.cat([m.values(), torch.ones(rest.numel(), dtype=m.values().dtype)])
    embedded = _coo(indices, values, n)
    if sub.factors is not None:  # the embedded graph's self-loops leave those clients alone
        return PropagationOperator("factored", embedded, factors=factor_propagation(embedded, sub.factors.alpha))
    return PropagationOperator("sparse", embedded, sub.error_bound, sub.tolerance)


def _entries_per_row(graph: Tensor) -> float:
    """Non-zero entries per row of ``graph`` (dense or sparse)."""
    n = max(int(graph.shape[0]), 1)
    if graph.is_sparse:
        return graph.coalesce()._nnz() / n
    if graph.layout != torch.strided:
        return graph.to_sparse_coo()._nnz() / n
    return int(torch.count_nonzero(graph)) / n


def build_operator(graph: Tensor, alpha: float, mode: str, tolerance: float = 1e-4,
                   fallback: bool = False) -> PropagationOperator:
    """The operator for ``graph`` in propagation ``mode`` (``auto`` resolved by N).

    ``auto`` above ``AUTO_DENSE_MAX_CLIENTS`` clients (or ``factored`` with ``fallback``, as
    FEDORA passes it for ``auto``): the factored operator when its passes hold at most
    ``AUTO_FACTORED_MAX_NNZ_PER_ROW`` entries per client; else the truncated series, unless the
    complete factored operator costs less (entries per row plus one per pass) or the series
    is too costly to build (more than ``AUTO_SERIES_MAX_TERMS`` terms, or more than
    ``AUTO_SERIES_MAX_NNZ_PER_ROW`` entries per client while it is built); a graph keeping at
    least ``AUTO_DENSE_GRAPH_FRACTION`` of the clients per row, up to
    ``AUTO_DENSE_GRAPH_MAX_CLIENTS`` clients, is solved densely. The operator's
    ``kind`` says which (FEDORA reports it in results.json); the choice depends on the graph
    only, so a resume makes it again.

    dense / encrypted: exact solve; power: the same ``P`` by power iteration (the reference);
    sparse: :func:`sparse_propagation_matrix` with ``tolerance``; factored: the exact ``P`` as
    sparse passes (:func:`~secure_fedora.algorithms.factored.factor_propagation`).
    """
    n = graph.shape[0]
    resolved = resolve_propagation(mode, n)
    chosen = fallback or mode == "auto"
    if (resolved == "factored" and chosen and n <= AUTO_DENSE_GRAPH_MAX_CLIENTS
            and _entries_per_row(graph) >= AUTO_DENSE_GRAPH_FRACTION * n):
        resolved = "dense"  # k near N: P is dense whatever the operator
    if resolved == "factored":
        if not chosen:
            return PropagationOperator("factored", sparse_graph(graph), factors=factor_propagation(graph, alpha))
        try:
            factors = factor_propagation(graph, alpha, max_nnz_per_row=AUTO_FACTORED_MAX_NNZ_PER_ROW)
            return PropagationOperator("factored", sparse_graph(graph), factors=factors)
        except FactorTooDense:
            truncated = None
            try:
                matrix, deficit = sparse_propagation_matrix(
                    graph, alpha, tolerance, max_terms=AUTO_SERIES_MAX_TERMS,
                    max_nnz_per_row=AUTO_SERIES_MAX_NNZ_PER_ROW)
                truncated = PropagationOperator("sparse", matrix, float(deficit.max()), tolerance)
                if truncated.nnz / n + 1 <= AUTO_FACTORED_MAX_NNZ_PER_ROW:
                    return truncated
            except SeriesTooCostly:
                pass
            factors = factor_propagation(graph, alpha)
            if truncated is None or factors.nnz / n + factors.passes < truncated.nnz / n + 1:
                return PropagationOperator("factored", sparse_graph(graph), factors=factors)
            return truncated
    if resolved == "sparse":
        matrix, deficit = sparse_propagation_matrix(graph, alpha, tolerance)
        return PropagationOperator("sparse", matrix, float(deficit.max()), tolerance)
    check_graph(graph, alpha)  # as the sparse and factored builders check it
    dense = graph.to_dense() if graph.layout != torch.strided else graph
    if resolved == "power":
        return PropagationOperator("dense", propagation_matrix_power(dense, alpha))
    return PropagationOperator("dense", propagation_matrix(dense, alpha))
