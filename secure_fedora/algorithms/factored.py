"""The exact propagation operator at any N, as a short product of sparse passes.

``P = (1 - alpha)(I - alpha S)^-1`` is dense (every client reaches every other through the
graph), but ``M = I - alpha S`` is as sparse as the top-k graph, and so are its LU factors
(SuperLU with a fill-reducing ordering: about 5 non-zeros per row on FEDORA's graphs). With
``Pr M Pc = L U``::

    P = (1 - alpha) Pc U^-1 L^-1 Pr

``L^-1`` stays sparse (about 4 non-zeros per row at 10,000 clients). ``U^-1`` is denser (about
24), so it is applied as a product of a few passes instead: the rows of ``U`` are grouped by
their level in back substitution, and each pass solves one group of rows given the groups
already solved (the inverse of that group's diagonal block, times the group's coupling to the
solved rows). The number of groups is chosen by the non-zeros it leaves plus one per pass.

Every pass is a sparse matrix in float64, computed once per graph and checked by a residual
test; applied to the (N x P) parameters a pass is one weighted embedding-bag sum per row over
a cache-sized column block, as the truncated operator of
:mod:`~secure_fedora.algorithms.propagation`. Unlike that operator nothing is dropped: the
result is ``P @ theta`` up to float rounding, like the dense solve, for about a seventh of the
truncated operator's non-zeros at 10,000 clients (11.4 against 76.2 per row at
``tolerance = 1e-4``). Graphs with long chains fill the inverse factors in; a budget
(``max_nnz_per_row``) stops the factoring early so that "auto" can take the truncated series.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from secure_fedora.algorithms.fedora import RelatednessError

__all__ = ["FactorTooDense", "FactoredPropagation", "check_graph", "factor_propagation", "gather_sources",
           "select_rows"]


class FactorTooDense(RelatednessError):
    """The passes would hold more entries than the budget given to
    :func:`factor_propagation` (graphs with long chains, such as clients on a line, whose
    inverse factors fill in)."""


# Most groups the back substitution is split into (each one pass; with the first and last
# passes at most MAX_GROUPS + 1 passes); the cost model picks the number below it.
MAX_GROUPS = 8
# One more pass costs about one non-zero per row (writing the pass's rows back, the call).
PASS_COST_NNZ = 1.0
# Bytes of the (N x width) work block kept in cache while every pass reads it, and the fewest
# columns per block (below it the calls cost more than the cache saves). Measured (CPU s, one
# thread, 118,282 columns, 1 MiB L2 per core): 1,000 clients, 32 -> 0.30, 64 -> 0.28,
# 128 -> 0.23, 256 -> 0.40; 10,000 clients, 16 -> 5.0, 32 -> 3.3.
_BLOCK_BYTES = 1 << 19
_MIN_WIDTH = 32
# Largest residual |M x - (1 - alpha) b| / max|b| the factorization may leave (float64).
RESIDUAL_LIMIT = 1e-9


def _scipy():
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    return sp, spl


def select_rows(row_offsets: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """For a CSR row-offset vector and some ``rows``: the offsets of those rows alone and the
    positions (into the column and value arrays) of their entries, row after row."""
    starts, lengths = row_offsets[rows], row_offsets[rows + 1] - row_offsets[rows]
    offsets = torch.zeros(rows.numel() + 1, dtype=row_offsets.dtype)
    torch.cumsum(lengths, 0, out=offsets[1:])
    total = int(offsets[-1])
    positions = (torch.repeat_interleave(starts - offsets[:-1], lengths, output_size=total)
                 + torch.arange(total, dtype=row_offsets.dtype))
    return offsets, positions


def gather_sources(columns: Tensor) -> tuple[Tensor, Tensor]:
    """For the source rows some bags read (``columns``): the distinct rows, increasing, and
    the columns renumbered into them. A subset's bag sums then run on
    ``block.index_select(0, sources)``: a bag sum over a strided column block copies all of
    its rows first, however few the bags read. Renumbering changes no bag's values or order."""
    sources, local = torch.unique(columns, return_inverse=True)
    return sources, local.reshape(-1)


@dataclass
class _Bags:
    """A sparse matrix as embedding-bag arguments: row ``r`` sums ``weights[k] * src[columns[k]]``
    over ``k`` in ``offsets[r]:offsets[r + 1]``, in stored order."""

    offsets: Tensor
    columns: Tensor
    weights: Tensor  # float64
    _cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, repr=False)

    @classmethod
    def from_csr(cls, m) -> _Bags:
        m = m.tocsr()
        m.sort_indices()
        return cls(torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int64)),
                   torch.from_numpy(m.data.astype(np.float64)))

    def on(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = (self.offsets.to(device), self.columns.to(device),
                               self.weights.to(device=device, dtype=dtype))
        return self._cast[key]

    def select(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Offsets, columns and positions (into ``columns``) of the bags ``rows`` only."""
        offsets, positions = select_rows(self.offsets, rows)
        return offsets, self.columns[positions], positions

    def subset(self, rows: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Offsets and columns (on the CPU, to be renumbered) and weights (``dtype`` on
        ``device``) of the bags ``rows`` only."""
        offsets, columns, positions = self.select(rows)
        return offsets, columns, self.on(dtype, device)[2][positions.to(device)]

    @property
    def nnz(self) -> int:
        return int(self.columns.numel())


@dataclass
class _Plan:
    """Which rows each pass computes for a request of some output rows (all: ``None``)."""

    first: Tensor | None
    groups: list[Tensor | None]
    out: Tensor | None


@dataclass
class FactoredPropagation:
    """``P = (1 - alpha)(I - alpha S)^-1`` as passes over a work buffer of N rows.

    ``first`` (N x N, columns = clients): ``buffer = first @ theta``. ``groups[j]`` is
    ``(start, stop, F_j)``: ``buffer[start:stop] = F_j @ buffer`` (F_j reads only rows already
    final or its own). ``last`` (N x N, rows = clients): ``phi = last @ buffer``. All float64
    ``scipy.sparse`` CSR matrices; see the module docstring for how they arise.
    """

    num_clients: int
    alpha: float
    first: object
    groups: list[tuple[int, int, object]]
    last: object
    residual: float = 0.0

    def __post_init__(self) -> None:
        self._first = _Bags.from_csr(self.first)
        self._groups = [(s, e, _Bags.from_csr(m)) for s, e, m in self.groups]
        self._last = _Bags.from_csr(self.last)

    @property
    def nnz(self) -> int:
        """Stored entries of all passes (the multiply-adds per parameter column)."""
        return self._first.nnz + sum(b.nnz for _, _, b in self._groups) + self._last.nnz

    @property
    def passes(self) -> int:
        """Sparse passes one product applies: ``first``, one per back-substitution group, and
        ``last``."""
        return 2 + len(self._groups)

    # ------------------------------------------------------------------ float64 reference
    def apply_float64(self, x: np.ndarray) -> np.ndarray:
        """``P @ x`` for a dense float64 (N x K) array through the same passes (scipy)."""
        buffer = self.first @ x
        for start, stop, m in self.groups:
            buffer[start:stop] = m @ buffer
        return self.last @ buffer

    def to_dense(self) -> Tensor:
        """``P`` as a dense (N x N) float64 matrix."""
        return torch.from_numpy(np.ascontiguousarray(self.apply_float64(np.eye(self.num_clients))))

    def combine(self, weights: Tensor) -> Tensor:
        """``weights @ P`` (N,) float64: the transposed passes in reverse order."""
        v = self.last.T @ weights.to(torch.float64).numpy()
        for start, stop, m in reversed(self.groups):
            part = v[start:stop].copy()
            v[start:stop] = 0.0
            v = v + m.T @ part
        return torch.from_numpy(np.ascontiguousarray(self.first.T @ v))

    # ------------------------------------------------------------------ the product
    def _plan(self, rows: Tensor) -> _Plan:
        """The rows every pass must compute so that output ``rows`` are exact: walk the passes
        backwards, replacing each needed row a pass writes by the rows its bag reads."""
        n = self.num_clients
        need = torch.zeros(n, dtype=torch.bool)
        _, cols, _ = self._last.select(rows)
        need[cols] = True
        groups: list[Tensor | None] = [None] * len(self._groups)
        for j in range(len(self._groups) - 1, -1, -1):
            start, stop, bags = self._groups[j]
            written = need[start:stop].nonzero().flatten()
            groups[j] = written
            if written.numel():
                _, cols, _ = bags.select(written)
                need[start:stop] = False
                need[cols] = True
        return _Plan(need.nonzero().flatten(), groups, rows)

    def apply(self, theta: Tensor, out: Tensor, rows: Tensor | None = None) -> None:
        """``out[rows] = (P @ theta)[rows]`` (every row when ``rows`` is None); other rows of
        ``out`` are untouched. Each pass computes only the rows the requested ones depend on;
        every row is the same sequence of float operations whichever rows are requested, so
        a subset equals the full product's rows bit for bit (and neither depends on threads)."""
        if rows is not None:
            self._apply_subset(theta, out, rows)
            return
        width = self._width(theta, self.num_clients)
        dtype, device = theta.dtype, theta.device
        first = self._first.on(dtype, device)
        groups = [(s, e, b.on(dtype, device)) for s, e, b in self._groups]
        last = self._last.on(dtype, device)
        for begin in range(0, theta.shape[1], width):
            end = min(begin + width, theta.shape[1])
            buffer = _bag_sum(first, theta[:, begin:end])
            for start, stop, bags in groups:
                buffer[start:stop] = _bag_sum(bags, buffer)
            out[:, begin:end] = _bag_sum(last, buffer)

    def _apply_subset(self, theta: Tensor, out: Tensor, rows: Tensor) -> None:
        """:meth:`apply` for some rows, on a compact work buffer: it holds only the rows the
        plan computes (those of the first pass, which include every row a later pass writes,
        since each group reads its own rows), renumbered in order, so that its column blocks
        are as small as the request and can be as wide as the full product's. Renumbering
        changes no bag's values or order: the rows are the full product's bit for bit."""
        plan = self._plan(rows)
        assert plan.first is not None and plan.out is not None
        dtype, device = theta.dtype, theta.device
        m = plan.first.numel()
        local = torch.full((self.num_clients,), -1, dtype=torch.long)
        local[plan.first] = torch.arange(m)

        def renumbered(bags: _Bags, written: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            offsets, columns, weights = bags.subset(written, dtype, device)
            columns = local[columns]
            if columns.numel() and int(columns.min()) < 0:  # the plan's invariant, never expected
                raise RelatednessError("factored propagation plan reads a row it never computes")
            return offsets.to(device), columns.to(device), weights

        offsets, columns, weights = self._first.subset(plan.first, dtype, device)
        sources, columns = gather_sources(columns)  # the theta rows the first pass reads
        first = (offsets.to(device), columns.to(device), weights)
        sources = sources.to(device)
        groups = []
        for (start, _, bags), written in zip(self._groups, plan.groups, strict=True):
            if written is not None and written.numel():
                groups.append((local[start + written].to(device), renumbered(bags, written)))
        last = renumbered(self._last, plan.out)
        out_rows = plan.out.to(device)
        width = self._width(theta, max(1, m))
        for begin in range(0, theta.shape[1], width):
            end = min(begin + width, theta.shape[1])
            if m:
                buffer = _bag_sum(first, theta[:, begin:end].index_select(0, sources))
            else:
                buffer = theta.new_empty((0, end - begin))
            for positions, bags in groups:
                buffer[positions] = _bag_sum(bags, buffer)
            out[out_rows, begin:end] = _bag_sum(last, buffer)

    @staticmethod
    def _width(theta: Tensor, rows: int) -> int:
        """Columns per block: about ``_BLOCK_BYTES`` of work buffer (``rows`` rows), at least
        ``_MIN_WIDTH``, at most 512."""
        per_row = max(1, rows * theta.element_size())
        width = 1 << max(0, round(np.log2(max(1.0, _BLOCK_BYTES / per_row))))
        return int(min(max(width, _MIN_WIDTH), 512))


def _bag_sum(bags: tuple[Tensor, Tensor, Tensor], source: Tensor) -> Tensor:
    offsets, columns, weights = bags
    return F.embedding_bag(columns, source, offsets, mode="sum", per_sample_weights=weights,
                           include_last_offset=True)


# ---------------------------------------------------------------------- construction
def _levels(t, lower: bool) -> np.ndarray:
    """Each row's level in substitution with triangular ``t`` (CSR): 0 for rows that depend on
    no other row, else one more than the deepest row they depend on."""
    n = t.shape[0]
    level = np.zeros(n, dtype=np.int64)
    indptr, indices = t.indptr, t.indices
    order = range(n) if lower else range(n - 1, -1, -1)
    for r in order:
        cols = indices[indptr[r]:indptr[r + 1]]
        cols = cols[cols != r]
        if cols.size:
            level[r] = int(level[cols].max()) + 1
    return level


def _triangular_inverse(t, lower: bool, budget: float = np.inf):
    """``t^-1`` (CSR float64) of a sparse triangular ``t`` with a non-zero diagonal, row by
    row in level order: ``X_r = (e_r - sum_{j != r} t_rj X_j) / t_rr`` (exact up to float64
    rounding; its pattern is each row's reach in the dependency graph). Raises
    :class:`FactorTooDense` as soon as it holds more than ``budget`` entries."""
    sp, _ = _scipy()
    t = t.tocsr()
    n = t.shape[0]
    diagonal = t.diagonal()
    if n and (np.abs(diagonal) == 0).any():
        raise RelatednessError("the propagation system is singular (a zero pivot)")
    off = (t - sp.diags(diagonal)).tocsr()
    off.eliminate_zeros()
    level = _levels(t, lower)
    inverse = sp.csr_matrix((n, n))
    for lev in range(int(level.max()) + 1 if n else 0):
        rows = np.nonzero(level == lev)[0]
        unit = sp.csr_matrix((np.ones(rows.size), (np.arange(rows.size), rows)), shape=(rows.size, n))
        block = sp.diags(1.0 / diagonal[rows]) @ (unit - off[rows] @ inverse)
        placed = sp.csr_matrix((np.ones(rows.size), (rows, np.arange(rows.size))), shape=(n, rows.size))
        inverse = (inverse + placed @ block).tocsr()
        if inverse.nnz > budget:
            raise FactorTooDense(f"an inverse factor exceeds {budget:.0f} entries")
    return inverse


def check_graph(graph: Tensor, alpha: float) -> object:
    """``graph`` as a scipy CSR float64 matrix, after the checks every operator makes: alpha in
    [0, 1), a non-empty square graph with finite, non-negative entries and rows summing to 1
    (:class:`RelatednessError` otherwise)."""
    sp, _ = _scipy()
    if not 0.0 <= alpha < 1.0:
        raise RelatednessError(f"alpha must lie in [0, 1); got {alpha}")
    if graph.dim() != 2 or graph.shape[0] != graph.shape[1]:
        raise RelatednessError(f"graph must be square; got shape {tuple(graph.shape)}")
    n = int(graph.shape[0])
    if n == 0:
        raise RelatednessError("the graph has no clients")
    graph = graph.detach()
    g = (graph if graph.is_sparse else graph.to_sparse()).to(torch.float64).coalesce().cpu()
    values = g.values().numpy()
    if (values < 0).any() or not np.isfinite(values).all():
        raise RelatednessError("graph entries must be finite and non-negative")
    rows, cols = g.indices().numpy()
    s = sp.csr_matrix((values, (rows, cols)), shape=(n, n))
    sums = np.asarray(s.sum(axis=1)).ravel()
    if not np.allclose(sums, 1.0, rtol=1e-5, atol=1e-9):  # the truncated series' check
        raise RelatednessError("the graph must be row-stochastic (every row sums to 1)")
    return s


def factor_propagation(graph: Tensor, alpha: float, max_groups: int = MAX_GROUPS,
                       max_nnz_per_row: float | None = None) -> FactoredPropagation:
    """The exact operator ``P = (1 - alpha)(I - alpha S)^-1`` for a row-stochastic,
    non-negative ``graph`` ``S`` (dense or sparse N x N), as sparse passes.

    Guarantees: no entry of ``P`` is dropped; the passes are verified on a probe (a column of
    ones and three random columns, float64) to leave a residual ``|M x - (1 - alpha) b|`` of at
    most ``RESIDUAL_LIMIT * max|b|``, else :class:`RelatednessError`. An isolated client (a
    self-loop of weight 1 that no other client points to, as excluded clients are embedded)
    keeps its parameters bit for bit: its passes are exact copies, not ``(1 - alpha)`` times
    their inverse. With ``max_nnz_per_row``, :class:`FactorTooDense` is raised as soon as the
    passes would hold more entries than that per client. Deterministic: the same graph gives
    the same passes (SuperLU with a fixed ordering, no randomness).
    """
    sp, _ = _scipy()
    s = check_graph(graph, alpha)
    n = s.shape[0]
    budget = np.inf if max_nnz_per_row is None else float(max_nnz_per_row) * n
    diagonal = s.diagonal()
    pointed_to = np.bincount(s.tocoo().col, minlength=n)
    isolated = (diagonal == 1.0) & (np.diff(s.indptr) == 1) & (pointed_to == 1)
    members = np.nonzero(~isolated)[0]
    if members.size:
        sub = s[members][:, members].tocsr()
        core = _factor_core(sub, alpha, max_groups, budget)
        result = _embed(core, members, n)
    else:
        eye = sp.identity(n, format="csr")
        result = FactoredPropagation(n, alpha, eye, [], eye)
    system = (sp.identity(n, format="csr") - alpha * s).tocsr()
    probe = np.random.default_rng(0).standard_normal((n, 4))
    probe[:, 0] = 1.0
    solution = result.apply_float64(probe)
    residual = float(np.abs(system @ solution - (1.0 - alpha) * probe).max())
    if not residual <= RESIDUAL_LIMIT * max(1.0, float(np.abs(probe).max())):
        raise RelatednessError(f"the factored propagation operator failed its residual check "
                               f"({residual:.3g}); use propagation = 'sparse' or 'dense'")
    result.residual = residual
    return result


def _factor_core(s, alpha: float, max_groups: int, budget: float) -> FactoredPropagation:
    """The passes for a graph without isolated clients (see :func:`factor_propagation`)."""
    sp, spl = _scipy()
    n = s.shape[0]
    system = (sp.identity(n, format="csr") - alpha * s).tocsc()
    try:
        lu = spl.splu(system, permc_spec="MMD_AT_PLUS_A")
    except RuntimeError as err:
        raise RelatednessError(f"the propagation system could not be factored: {err}") from err
    lower, upper = lu.L.tocsr(), lu.U.tocsr()
    row_perm = sp.csr_matrix((np.ones(n), (lu.perm_r, np.arange(n))), shape=(n, n))
    lower_inv = _triangular_inverse(lower, lower=True, budget=budget) @ row_perm  # columns: clients
    level = _levels(upper, lower=False)
    best: FactoredPropagation | None = None
    best_cost = np.inf
    for count in range(1, min(max_groups, int(level.max()) + 1) + 1):
        try:
            candidate = _with_groups(n, alpha, lower_inv, upper, lu.perm_c, level, count,
                                     budget - lower_inv.nnz)
        except FactorTooDense:
            continue  # more groups hold fewer entries: try them
        cost = candidate.nnz / n + PASS_COST_NNZ * candidate.passes
        if cost < best_cost and candidate.nnz <= budget:
            best, best_cost = candidate, cost
    if best is None:
        raise FactorTooDense(f"the factored operator would hold more than {budget / n:.0f} "
                             "entries per client")
    return best


def _embed(core: FactoredPropagation, members: np.ndarray, n: int) -> FactoredPropagation:
    """``core`` (over ``members``) as passes over ``n`` clients: the buffer holds the members'
    rows first, then every other client's own row, copied in and out with weight exactly 1."""
    sp, _ = _scipy()
    m = members.size
    if m == n:
        return core
    others = np.setdiff1d(np.arange(n), members, assume_unique=True)
    to_client = np.concatenate([members, others])  # buffer row -> client
    first = core.first.tocoo()
    first = sp.csr_matrix((np.concatenate([first.data, np.ones(others.size)]),
                           (np.concatenate([first.row, np.arange(m, n)]),
                            np.concatenate([members[first.col], others]))), shape=(n, n))
    groups = [(start, stop, sp.csr_matrix((mat.data, mat.indices, mat.indptr), shape=(stop - start, n)))
              for start, stop, mat in core.groups]
    last = core.last.tocoo()
    buffer_of = np.empty(n, dtype=np.int64)
    buffer_of[to_client] = np.arange(n)
    last = sp.csr_matrix((np.concatenate([last.data, np.ones(others.size)]),
                          (np.concatenate([members[last.row], others]),
                           np.concatenate([last.col, buffer_of[others]]))), shape=(n, n))
    return FactoredPropagation(n, core.alpha, first, groups, last)


def _with_groups(n: int, alpha: float, lower_inv, upper, perm_c: np.ndarray, level: np.ndarray,
                 count: int, budget: float = np.inf) -> FactoredPropagation:
    """The passes with back substitution split into ``count`` groups of consecutive levels
    (:class:`FactorTooDense` once the groups hold more than ``budget`` entries)."""
    sp, _ = _scipy()
    bounds = np.linspace(0, int(level.max()) + 1 if n else 1, count + 1).round().astype(np.int64)
    group = np.searchsorted(bounds, level, side="right") - 1
    order = np.argsort(group, kind="stable")  # buffer position -> row of U
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)  # row of U -> buffer position
    to_buffer = sp.csr_matrix((np.ones(n), (np.arange(n), order)), shape=(n, n))
    first = ((1.0 - alpha) * (to_buffer @ lower_inv)).tocsr()
    upper = upper.tocsr()
    groups: list[tuple[int, int, object]] = []
    for j in range(count):
        members = order[group[order] == j]
        if members.size == 0:
            continue
        start = int(position[members[0]])
        rest = np.setdiff1d(np.arange(n), members, assume_unique=True)
        block_inv = _triangular_inverse(upper[members][:, members], lower=False, budget=budget)
        coupling = -(block_inv @ upper[members][:, rest])
        combined = sp.hstack([block_inv, coupling]).tocsr()
        budget -= combined.nnz
        if budget < 0:
            raise FactorTooDense("the back-substitution passes exceed the budget")
        columns = position[np.concatenate([members, rest])][combined.indices]
        groups.append((start, start + members.size,
                       sp.csr_matrix((combined.data, columns, combined.indptr), shape=(members.size, n))))
    # phi[i] = y[perm_c[i]]: the last group's rows are solved on the way out
    start, stop, final = groups.pop()
    target = position[perm_c]
    in_final = (target >= start) & (target < stop)
    unit = sp.csr_matrix((np.ones(n), (np.arange(n), target)), shape=(n, n))
    picked = sp.csr_matrix((np.ones(int(in_final.sum())), (np.nonzero(in_final)[0], target[in_final] - start)),
                           shape=(n, stop - start))
    keep = sp.diags((~in_final).astype(np.float64))
    last = (keep @ unit + picked @ final).tocsr()
    last.eliminate_zeros()
    return FactoredPropagation(n, alpha, first, groups, last)
