"""The propagation operator: dense exact, sparse with a proven error bound, factored exact and
sparse, chosen by N."""

import numpy as np
import pytest
import torch

from secure_fedora.algorithms import fedora
from secure_fedora.algorithms.propagation import (
    PropagationOperator,
    build_operator,
    embed_operator,
    resolve_propagation,
    sparse_propagation_matrix,
)
from secure_fedora.core.config import AUTO_DENSE_MAX_CLIENTS, parse_config
from secure_fedora.runtimes.inprocess import (
    Simulation,
    build_clients,
    build_context,
    load_checkpoint,
    make_method,
)


def random_graph(n: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    similarity = torch.exp(10 * torch.rand(n, n, generator=g, dtype=torch.float64))
    similarity.fill_diagonal_(0.0)
    return fedora.topk_graph(similarity, k)


@pytest.mark.parametrize("tolerance", [1e-2, 1e-4, 1e-7])
def test_sparse_operator_error_is_within_its_proven_bound(tolerance):
    n = 80
    graph = random_graph(n, k=3)
    exact = fedora.propagation_matrix(graph, 0.8)
    approx, deficit = sparse_propagation_matrix(graph, 0.8, tolerance)
    dense_approx = approx.to_dense()
    # 0 <= P~ <= P entrywise, deficits are the exact row-sum shortfall and within tolerance
    assert (dense_approx >= 0).all() and (dense_approx <= exact + 1e-15).all()
    assert torch.allclose(deficit, 1 - dense_approx.sum(1), atol=1e-14)
    assert float(deficit.max()) <= tolerance
    assert torch.allclose((exact - dense_approx).abs().sum(1), deficit, atol=1e-13)
    # |phi - phi~| <= d_i * max_j |theta_j| per coordinate (float64 parameters: no float32 noise)
    theta = torch.randn(n, 500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    op = PropagationOperator("sparse", approx, float(deficit.max()), tolerance)
    err = (op.apply(theta) - exact @ theta).abs()
    bound = deficit.unsqueeze(1) * theta.abs().max(0).values.unsqueeze(0)
    assert (err <= bound + 1e-12).all()
    if tolerance >= 1e-4:  # the pruning uses its budget: the bound is not vacuous
        assert float(deficit.max()) > tolerance / 20 and float(err.max()) > 0
    assert op.nnz < n * n


@pytest.mark.parametrize("mode", ["dense", "sparse", "factored"])
def test_embedded_operator_leaves_excluded_clients_exactly_alone(mode):
    sub = random_graph(5)
    members = [0, 2, 3, 5, 6]  # clients 1, 4, 7 excluded
    op = embed_operator(build_operator(sub, 0.8, mode, 1e-3), members, 8)
    assert op.kind == mode
    dense = op.to_dense()
    for i in (1, 4, 7):
        unit = torch.zeros(8, dtype=torch.float64)
        unit[i] = 1.0
        assert torch.equal(dense[i], unit) and torch.equal(dense[:, i], unit)
    inner = build_operator(sub, 0.8, mode, 1e-3).to_dense()
    if mode == "factored":  # factored anew with the self-loops: equal up to float64 rounding
        assert torch.allclose(dense[members][:, members], inner, atol=1e-14, rtol=0)
    else:
        assert torch.equal(dense[members][:, members], inner)
    # applied, the excluded clients keep their parameters bit for bit (all rows and a subset)
    for dtype in (torch.float32, torch.float64):
        theta = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1), dtype=dtype)
        assert torch.equal(op.apply(theta)[[1, 4, 7]], theta[[1, 4, 7]])
        out = torch.zeros_like(theta)
        op.apply_rows(theta, [4, 2], out)
        assert torch.equal(out[4], theta[4])


def test_sparse_operator_rejects_bad_input():
    graph = random_graph(10)
    for tol in (0.0, 1.0, -1e-3):
        with pytest.raises(fedora.RelatednessError, match="tolerance"):
            sparse_propagation_matrix(graph, 0.8, tol)
    with pytest.raises(fedora.RelatednessError, match="alpha"):
        sparse_propagation_matrix(graph, 1.0, 1e-3)
    with pytest.raises(fedora.RelatednessError, match="row-stochastic"):
        sparse_propagation_matrix(graph * 2, 0.8, 1e-3)
    with pytest.raises(fedora.RelatednessError, match="non-negative"):
        sparse_propagation_matrix(-graph, 0.8, 1e-3)


def test_dense_operator_is_bit_identical_to_the_matrix_product_and_checks_shapes():
    graph = random_graph(30)
    op = build_operator(graph, 0.8, "dense")
    theta = torch.randn(30, 1000)
    phi = torch.empty_like(theta)
    op.apply(theta, out=phi)
    assert torch.equal(phi, fedora.propagation_matrix(graph, 0.8).to(torch.float32) @ theta)
    with pytest.raises(fedora.RelatednessError, match="share memory"):
        op.apply(theta, out=theta)
    with pytest.raises(fedora.RelatednessError, match="does not match"):
        op.apply(torch.randn(29, 1000))
    power = build_operator(graph, 0.8, "power")
    assert torch.allclose(power.matrix, op.matrix, atol=1e-10)


def test_auto_is_dense_up_to_the_threshold_then_factored():
    assert resolve_propagation("auto", AUTO_DENSE_MAX_CLIENTS) == "dense"
    assert resolve_propagation("auto", AUTO_DENSE_MAX_CLIENTS + 1) == "factored"
    assert resolve_propagation("sparse", 10_000) == "sparse"
    assert resolve_propagation("power", 10_000) == "power"
    # the config forces either exact operator at any N
    assert resolve_propagation("dense", 10_000) == "dense"
    assert resolve_propagation("factored", 3) == "factored"
    with pytest.raises(fedora.RelatednessError, match="unknown propagation"):
        resolve_propagation("magic", 10)
    base = {"data": {"num_clients": 36}}
    auto, dense = parse_config(base), parse_config({**base, "fedora": {"propagation": "dense"}})
    from secure_fedora.core.config import config_hash

    assert config_hash(auto) == config_hash(dense)  # same behaviour, same hash
    sparse = parse_config({**base, "fedora": {"propagation": "sparse"}})
    assert config_hash(sparse) != config_hash(dense)
    # above the threshold "auto" (factored, else sparse by the graph) hashes apart from both
    # forced modes and from what "auto" meant before (such a checkpoint is not resumed with
    # another operator)
    large = {"data": {"num_clients": AUTO_DENSE_MAX_CLIENTS + 1}}
    auto_large = parse_config(large)
    for forced in ("factored", "sparse"):
        assert config_hash(auto_large) != config_hash(parse_config({**large, "fedora": {"propagation": forced}}))


def test_fedora_reports_the_propagation_operator_it_used(clients):
    for propagation, kind in (("auto", "dense"), ("factored", "factored"), ("sparse", "sparse")):
        cfg = tiny(fedora={"propagation": propagation})
        method = make_method("fedora", build_context(cfg, clients), cfg)
        method.setup()
        report = method.server_finalize({})["propagation"]
        assert report["requested"] == propagation and report["operator"] == kind
        assert (report["error_bound"] == 0.0) == (kind != "sparse")
        assert ("tolerance" in report) == (kind == "sparse")


@pytest.mark.parametrize("q", [1, 2])
def test_blockwise_graph_equals_the_full_graph(q):
    g = torch.Generator().manual_seed(q)
    summaries = torch.linalg.qr(torch.randn(40, 30, q, generator=g, dtype=torch.float64)).Q
    full = fedora.topk_graph(fedora.similarity_matrix(fedora.subspace_overlaps(summaries), 3.0), 2)
    blockwise = fedora.topk_graph_from_summaries(summaries, 3.0, 2, block=7)
    assert blockwise.is_sparse and blockwise._nnz() == 40 * 2
    assert torch.allclose(blockwise.to_dense(), full, atol=1e-12)


def tiny(**overrides):
    base = {"seed": 2, "methods": ["fedora"],
            "data": {"num_clients": 8, "train_per_client": 24, "val_per_client": 8, "test_per_client": 8,
                     "groups": 2},
            "training": {"rounds": 3, "local_epochs": 1, "batch_size": 8, "lr": 0.05}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(base)


@pytest.fixture(scope="module")
def clients():
    return build_clients(tiny())


def test_fedora_with_sparse_propagation_stays_within_the_bound_of_dense(clients):
    dense_cfg = tiny(fedora={"propagation": "dense"})
    sparse_cfg = tiny(fedora={"propagation": "sparse", "propagation_tolerance": 1e-3})
    methods = []
    for cfg in (dense_cfg, sparse_cfg):
        m = make_method("fedora", build_context(cfg, clients), cfg)
        m.setup()
        methods.append(m)
    dense, sparse = methods
    assert sparse.relatedness.operator.kind == "sparse" and sparse.relatedness.overlaps is None
    assert torch.allclose(sparse.relatedness.graph.to_dense(), dense.relatedness.graph, atol=1e-12)
    theta = torch.randn_like(dense.theta)
    dense.theta.copy_(theta)
    sparse.theta.copy_(theta)
    dense.propagate()
    sparse.propagate()
    bound = sparse.relatedness.operator.error_bound * theta.abs().max(0).values
    assert sparse.relatedness.operator.error_bound <= 1e-3
    assert ((sparse.phi - dense.phi).abs() <= bound + 1e-5).all()
    # a late joiner: the same weights through either operator (within the bound)
    u = fedora.client_summary(clients[0].train_x, clients[0].train_y, 10, 1)
    others = torch.stack([fedora.client_summary(c.train_x, c.train_y, 10, 1) for c in clients])
    overlaps = torch.einsum("dq,jdr->jqr", u, others)
    assert ((sparse.attach(overlaps) - dense.attach(overlaps)).abs() <= bound.max() + 1e-5).all()
    assert dense.relatedness.neighbours() == sparse.relatedness.neighbours()


def test_a_late_joiner_is_attached_through_the_operator_its_run_propagates_with(clients):
    """Late joiners use the same operator as the round's propagation: under a sparse operator
    the newcomer's weights are ``s_new^T P~`` (the truncated series, within its bound), not the
    exact ``s_new^T P``. The comparison with dense above holds either way; this one does not."""
    cfg = tiny(fedora={"propagation": "sparse", "propagation_tolerance": 1e-2})
    sparse = make_method("fedora", build_context(cfg, clients), cfg)
    sparse.setup()
    theta = torch.randn(sparse.theta.shape, generator=torch.Generator().manual_seed(3))
    sparse.theta.copy_(theta)
    u = fedora.client_summary(clients[0].train_x, clients[0].train_y, 10, 1)
    others = torch.stack([fedora.client_summary(c.train_x, c.train_y, 10, 1) for c in clients])
    overlaps = torch.einsum("dq,jdr->jqr", u, others)
    row = fedora.attach_row(overlaps, cfg.fedora.tau, cfg.fedora.k)
    truncated = row @ sparse.relatedness.operator.to_dense()
    exact = row @ fedora.propagation_matrix(sparse.relatedness.graph.to_dense(), cfg.fedora.alpha)
    assert float((truncated - exact).abs().max()) > 1e-5  # the two operators differ here
    got = sparse.attach(overlaps)
    torch.testing.assert_close(got, truncated.to(torch.float32) @ theta, rtol=0, atol=1e-6)
    assert float((got - exact.to(torch.float32) @ theta).abs().max()) > 1e-5


@pytest.mark.parametrize("propagation", ["dense", "sparse", "factored"])
def test_checkpoint_holds_neither_phi_nor_operator_and_resume_is_bit_identical(tmp_path, clients,
                                                                                propagation):
    cfg = tiny(training={"rounds": 5, "checkpoint_every": 2}, fedora={"propagation": propagation})
    full = Simulation(cfg, tmp_path / "full", clients=clients)
    full.run()
    cut = Simulation(cfg, tmp_path / "cut", clients=clients)

    class Crash(Exception):
        pass

    def crash(method, rnd, total):
        if rnd == 3:  # the last checkpoint is round 2's
            raise Crash

    cut.progress = crash
    with pytest.raises(Crash):
        cut.run()
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "fedora.pt")
    assert state["round"] == 2
    assert "phi" not in state["method"]
    assert not {"propagation", "similarity"} & set(state["method"]["relatedness"])
    resumed = Simulation(cfg, tmp_path / "cut", clients=clients)
    resumed.run(resume=True)
    a, b = full.methods["fedora"], resumed.methods["fedora"]
    assert torch.equal(a.theta, b.theta) and torch.equal(a.phi, b.phi)
    assert (tmp_path / "cut" / "rounds.csv").read_text() == (tmp_path / "full" / "rounds.csv").read_text()
    # checkpoint_every is not part of the config hash: a resume may change it
    other_k = tiny(training={"rounds": 5, "checkpoint_every": 1}, fedora={"propagation": propagation})
    Simulation(other_k, tmp_path / "cut", clients=clients).run(resume=True)


def test_auto_checkpoints_first_round_then_by_time(tmp_path, clients, monkeypatch):
    import secure_fedora.runtimes.inprocess as runtime

    cfg = tiny(training={"rounds": 4, "checkpoint_every": "auto"})
    sim = Simulation(cfg, tmp_path, clients=clients)
    monkeypatch.setattr(runtime, "AUTO_CHECKPOINT_FACTOR", 1e9)  # nothing after the first
    sim.run()
    written = [r["round"] for r in sim.round_timings["fedora"] if r["checkpoint"] > 0]
    assert written == [1, 4]  # the first round, and the last (with the outcome)
    with pytest.raises(Exception, match="checkpoint_every"):
        tiny(training={"checkpoint_every": 0})


def test_dp_resume_between_checkpoints_is_identical_and_never_records_less_epsilon(tmp_path):
    """Rounds after the last checkpoint are repeated on resume: their journaled releases are
    re-made, not accounted again, so the ledgers end exactly as the uninterrupted run's (the
    recorded epsilon never drops and nothing is counted twice), and the models are identical."""
    from privacy.ledger import read_ledger

    dp = parse_config({
        "seed": 3, "methods": ["local"],
        "data": {"num_clients": 3, "train_per_client": 40, "val_per_client": 8, "test_per_client": 8},
        "training": {"rounds": 4, "local_epochs": 1, "batch_size": 10, "lr": 0.05, "checkpoint_every": 2},
        "privacy": {"enabled": True, "epsilon": 50.0, "delta": 1e-3, "noise_multiplier": 1.0,
                    "noise": "reproducible"},
    })
    clients = build_clients(dp)
    full = Simulation(dp, tmp_path / "full", clients=clients)
    full.run()
    cut = Simulation(dp, tmp_path / "cut", clients=clients)

    class Crash(Exception):
        pass

    def crash(method, rnd, total):
        if rnd == 3:
            raise Crash

    cut.progress = crash
    with pytest.raises(Crash):
        cut.run()
    ledgers = sorted((tmp_path / "cut" / "ledgers" / "local").glob("*.jsonl"))
    before = {p.name: read_ledger(p)[-1]["epsilon_after"] for p in ledgers}
    resumed = Simulation(dp, tmp_path / "cut", clients=clients)
    resumed.run(resume=True)
    assert torch.equal(resumed.methods["local"].theta, full.methods["local"].theta)
    full_eps = {p.name: read_ledger(p)[-1]["epsilon_after"]
                for p in (tmp_path / "full" / "ledgers" / "local").glob("*.jsonl")}
    for p in ledgers:
        entries = read_ledger(p)
        eps = [e["epsilon_after"] for e in entries]
        assert eps == sorted(eps) and eps[-1] >= before[p.name]
        assert eps[-1] == full_eps[p.name]  # round 3 is accounted once, as in the full run
        full_entries = read_ledger(tmp_path / "full" / "ledgers" / "local" / p.name)
        assert [(e["round"], e["mechanism"]) for e in entries] == \
            [(e["round"], e["mechanism"]) for e in full_entries]


@pytest.fixture(scope="module", params=["sparse", "factored"])
def sparse_operator(request):
    graph = random_graph(60, k=3, seed=4)
    return build_operator(graph, 0.8, request.param, 1e-4)


def test_sparse_product_is_deterministic_and_independent_of_threads(sparse_operator):
    theta = torch.randn(60, 700, generator=torch.Generator().manual_seed(5))
    reference = sparse_operator.to_dense() @ theta.double()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparse_operator.apply(theta)
        torch.set_num_threads(2)
        two = sparse_operator.apply(theta)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.allclose(one.double(), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("count", [1, 2, 7, 30, 59])
def test_apply_rows_writes_those_rows_bit_identical_to_the_full_product(sparse_operator, count):
    # few rows read whole theta rows, more read cache-sized column blocks: equal either way
    theta = torch.randn(60, 1000, generator=torch.Generator().manual_seed(count))
    full = sparse_operator.apply(theta)
    rows = torch.randperm(60, generator=torch.Generator().manual_seed(9))[:count]
    out = torch.full_like(theta, 7.0)
    sparse_operator.apply_rows(theta, rows.tolist(), out)
    others = torch.ones(60, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(out[rows], full[rows])
    assert bool((out[others] == 7.0).all())


def test_apply_rows_of_a_dense_operator_and_bad_rows():
    op = build_operator(random_graph(12), 0.8, "dense")
    theta = torch.randn(12, 30)
    out = torch.zeros_like(theta)
    op.apply_rows(theta, [3, 5], out)
    assert torch.equal(out[[3, 5]], op.apply(theta)[[3, 5]]) and bool((out[0] == 0).all())
    with pytest.raises(fedora.RelatednessError, match="rows outside"):
        op.apply_rows(theta, [12], out)
    with pytest.raises(fedora.RelatednessError, match="share memory"):
        op.apply_rows(theta, [1], theta)


@pytest.mark.parametrize("mode", ["dense", "sparse", "factored"])
def test_operators_refuse_outputs_that_overlap_theta_or_differ_in_dtype(mode):
    op = build_operator(random_graph(10), 0.8, mode, 1e-3)
    storage = torch.randn(11, 30)
    theta = storage[:10]
    shifted = storage[1:]  # the same memory, one row further: phi rows would overwrite theta
    with pytest.raises(fedora.RelatednessError, match="share memory"):
        op.apply(theta, out=shifted)
    with pytest.raises(fedora.RelatednessError, match="share memory"):
        op.apply_rows(theta, [2], shifted)
    assert torch.equal(storage[:10], theta)  # nothing was written
    # two tensors over one numpy buffer have separate torch storages: compared by address
    buffer = np.random.default_rng(0).standard_normal((10, 31)).astype(np.float32)
    with pytest.raises(fedora.RelatednessError, match="share memory"):
        op.apply(torch.from_numpy(buffer[:, :30]), out=torch.from_numpy(buffer[:, 1:]))
    with pytest.raises(fedora.RelatednessError, match="dtype"):
        op.apply(theta, out=torch.empty(10, 30, dtype=torch.float64))
    with pytest.raises(fedora.RelatednessError, match="dtype"):
        op.apply_rows(theta, [1], torch.empty(10, 30, dtype=torch.float64))
    with pytest.raises(fedora.RelatednessError, match="floating point"):
        op.apply(torch.ones(10, 30, dtype=torch.int64))
    # disjoint views of one buffer are fine, and equal the separate product
    both = torch.empty(20, 30)
    both[:10] = theta
    op.apply(both[:10], out=both[10:])
    assert torch.equal(both[10:], op.apply(theta.clone()))


@pytest.mark.parametrize("mode", ["dense", "sparse", "factored"])
def test_apply_rows_refuses_masks_and_fractional_rows(mode):
    op = build_operator(random_graph(10), 0.8, mode, 1e-3)
    theta = torch.randn(10, 8)
    out = torch.zeros_like(theta)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[7] = True
    for rows in (mask, [True, False], [0, True], [torch.tensor(True), 3], [np.True_, 3], mask.numpy()):
        with pytest.raises(fedora.RelatednessError, match="boolean mask"):
            op.apply_rows(theta, rows, out)
    with pytest.raises(fedora.RelatednessError, match="integer"):
        op.apply_rows(theta, torch.tensor([1.0, 2.0]), out)
    for rows in (None, "12", [None], [[1, 2], [3]]):  # raw TypeError/RuntimeError before
        with pytest.raises(fedora.RelatednessError, match="rows must be client indices"):
            op.apply_rows(theta, rows, out)
    assert bool((out == 0).all())
    op.apply_rows(theta, mask.nonzero().flatten(), out)
    op.apply_rows(theta, [], out)
    op.apply_rows(theta, torch.tensor([7, 7]), out)
    assert torch.equal(out[7], op.apply(theta)[7]) and bool((out[:7] == 0).all())


def _sparse_fedora(participation, propagation="sparse"):
    return tiny(training={"rounds": 4, "participation": participation},
                fedora={"propagation": propagation, "propagation_tolerance": 1e-3})


@pytest.mark.parametrize("propagation", ["sparse", "factored"])
@pytest.mark.parametrize("participation", [0.5, 1.0])
def test_sparse_fedora_computes_only_the_participants_phi_rows_and_equals_eager(tmp_path, clients,
                                                                                 participation,
                                                                                 propagation,
                                                                                 monkeypatch):
    from secure_fedora.algorithms.methods import Fedora

    cfg = _sparse_fedora(participation, propagation)
    sent: list[list[int]] = []
    computed: list[list[int]] = []
    configure, apply_rows = Fedora.configure, PropagationOperator.apply_rows

    def recording_configure(self, rnd, participants):
        sent.append(list(participants))
        return configure(self, rnd, participants)

    def recording_rows(self, theta, rows, out):
        computed.append(sorted(torch.as_tensor(rows).tolist()))
        return apply_rows(self, theta, rows, out)

    monkeypatch.setattr(Fedora, "configure", recording_configure)
    monkeypatch.setattr(PropagationOperator, "apply_rows", recording_rows)
    lazy = Simulation(cfg, tmp_path / "lazy", clients=clients)
    lazy.run()
    # round 1 sends the initial rows; every later round computes exactly its participants'
    assert len(sent) == 4 and computed == sent[1:]
    assert all(len(p) == (4 if participation == 0.5 else 8) for p in sent)
    monkeypatch.undo()

    # eager: every row right after every aggregation
    propagate = Fedora.propagate

    def eager(self, rnd=0, participants=None):
        propagate(self, rnd, participants)
        self.phi  # noqa: B018 - reading phi computes every pending row

    monkeypatch.setattr(Fedora, "propagate", eager)
    full = Simulation(cfg, tmp_path / "eager", clients=clients)
    full.run()
    a, b = lazy.methods["fedora"], full.methods["fedora"]
    assert torch.equal(a.theta, b.theta)
    assert torch.equal(a.phi, b.phi) and torch.equal(a.phi, a.relatedness.operator.apply(a.theta))
    assert (tmp_path / "lazy" / "rounds.csv").read_text() == (tmp_path / "eager" / "rounds.csv").read_text()


@pytest.mark.parametrize("propagation", ["sparse", "factored"])
def test_pending_phi_rows_are_refused_once_theta_has_changed(clients, propagation):
    cfg = _sparse_fedora(1.0, propagation)
    method = make_method("fedora", build_context(cfg, clients), cfg)
    method.setup()
    method.propagate()
    sent = method.configure(1, [0, 1])  # rows 0 and 1 computed, the rest still pending
    expected = method.relatedness.operator.apply(method.theta)
    assert torch.equal(sent[0]["phi"], expected[0]) and torch.equal(sent[1]["phi"], expected[1])
    method.theta[2].add_(1.0)  # as in-process training does, before the next propagation
    with pytest.raises(RuntimeError, match="after theta changed"):
        method.configure(1, [2])
    with pytest.raises(RuntimeError, match="after theta changed"):
        method.phi  # noqa: B018
    method.propagate()  # a new propagation: every row current again
    assert torch.equal(method.phi, method.relatedness.operator.apply(method.theta))


def test_the_sparse_bound_holds_for_rows_summing_slightly_above_one():
    """The graph check accepts rows summing to 1 + 1e-5; the series' deficits measured only
    the shortfall from 1, so at alpha 0.99 P's extra weight (up to 9e-4 a row) escaped the
    bound. The deficits now include it, and a tolerance below it is refused."""
    n, alpha = 30, 0.99  # at alpha 0.99 the series keeps ~1,150 terms: a small graph suffices
    graph = random_graph(n, k=2, seed=5) * (1 + 9e-6)
    exact = np.linalg.solve(np.eye(n) - alpha * graph.numpy(), (1 - alpha) * np.eye(n))
    with pytest.raises(fedora.RelatednessError, match="normalize the graph's rows"):
        build_operator(graph, alpha, "sparse", 1e-5)
    op = build_operator(graph, alpha, "sparse", 1e-2)
    l1 = np.abs(exact - op.to_dense().numpy()).sum(axis=1)
    assert l1.max() > 5e-4 and l1.max() <= op.error_bound <= 1e-2
    # "auto" falls back to the exact operator where the series cannot bound it
    auto = build_operator(graph, alpha, "factored", 1e-5, fallback=True)
    assert auto.kind == "factored" and np.allclose(auto.to_dense().numpy(), exact, atol=1e-10)


@pytest.mark.parametrize("mode", ["dense", "power", "sparse", "factored"])
def test_every_mode_refuses_a_graph_that_is_not_row_stochastic(mode):
    """The dense and power operators skipped the graph checks (a graph of rows summing to 0.5
    gave a P whose rows sum to 0.33, silently)."""
    graph = random_graph(6, k=2, seed=1)
    nan = graph.clone()
    nan[0, 0] = float("nan")
    for bad, message in ((graph * 0.5, "row-stochastic"), (nan, "finite"),
                         (graph[:, :-1], "square"), (torch.zeros(0, 0, dtype=torch.float64), "no clients")):
        with pytest.raises(fedora.RelatednessError, match=message):
            build_operator(bad, 0.8, mode)


@pytest.mark.parametrize("mode", ["dense", "sparse", "factored"])
def test_embedding_refuses_members_out_of_range_or_repeated(mode):
    """The sparse and factored embeddings checked only the number of members: an index past
    the federation gave an invalid sparse tensor, a repeated one a row summing to 2."""
    sub = build_operator(random_graph(5, k=2, seed=2), 0.8, mode)
    for members, n in (([1, 2, 3, 4, 5], 5), ([0, 0, 1, 2, 3], 7), ([-1, 0, 1, 2, 3], 7)):
        with pytest.raises(fedora.RelatednessError, match="increasing"):
            embed_operator(sub, members, n)
    ones = embed_operator(sub, [0, 2, 3, 5, 6], 7).apply(torch.ones(7, 3))
    assert torch.allclose(ones, torch.ones(7, 3), atol=1e-3)  # the series drops up to 1e-4


@pytest.mark.parametrize("mode", ["sparse", "factored"])
def test_a_non_contiguous_theta_gives_the_rows_of_a_contiguous_one(mode):
    """A column-strided or column-major theta changed the last bits of the sparse and factored
    products, so its full product and its rows differed (the promise: bit for bit)."""
    n = 300
    op = build_operator(random_graph(n, k=3, seed=3), 0.8, mode)
    base = torch.randn(n, 400, generator=torch.Generator().manual_seed(0))
    want = op.apply(base[:, ::2].contiguous())
    rows = list(range(0, n, 7))
    for view in (base[:, ::2], base[:, ::2].T.contiguous().T):
        assert torch.equal(op.apply(view), want)
        out = torch.zeros(view.shape)
        op.apply_rows(view, rows, out)
        assert torch.equal(out[rows], want[rows])


def test_a_sparse_series_of_too_many_terms_is_refused_when_the_config_is_read():
    """propagation = "sparse" at alpha 0.999999 asks for a series of 10.6 million terms:
    accepted by the config, it was built at round 1 while torch's sparse product held about
    40 KB per term, until the process was killed for memory. The config now refuses a series
    beyond MAX_SERIES_TERMS, naming the keys; the exact operators stay available."""
    from secure_fedora.algorithms.config_checks import MAX_SERIES_TERMS, series_terms
    from secure_fedora.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"fedora\.propagation 'sparse' at fedora\.alpha = "
                                          r"0\.999999 and fedora\.propagation_tolerance = "
                                          r"0\.0001 needs a series of 10,596,630 terms"):
        parse_config({"fedora": {"propagation": "sparse", "alpha": 0.999999}})
    assert series_terms(0.999, 1e-4) <= MAX_SERIES_TERMS
    assert parse_config({"fedora": {"propagation": "sparse", "alpha": 0.999}})
    for mode in ("dense", "factored", "auto"):
        assert parse_config({"fedora": {"propagation": mode, "alpha": 0.999999}})


def test_a_power_iteration_beyond_its_cap_is_refused_when_the_config_is_read():
    """propagation = "power" at alpha 0.9999 was accepted by the config and failed at round 1,
    after 200,000 iterations, once the clients' summaries were released (two clients each
    other's only neighbour never converge there). The config now refuses every alpha whose
    iteration bound exceeds MAX_POWER_ITERATIONS, naming the keys and the exact modes, and
    accepts every alpha up to the bound, where even that periodic graph converges."""
    import math

    from secure_fedora.algorithms.config_checks import (
        MAX_POWER_ITERATIONS,
        max_power_alpha,
        power_iterations,
    )
    from secure_fedora.algorithms.fedora import propagation_matrix, propagation_matrix_power
    from secure_fedora.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"fedora\.propagation 'power' at fedora\.alpha = 0\.9999 "
                                          r"needs up to 283,229 iterations, more than 200,000") as err:
        parse_config({"fedora": {"propagation": "power", "alpha": 0.9999}})
    assert "'auto', 'factored' or 'dense'" in str(err.value)
    assert "at most 0.999858" in str(err.value)
    largest = max_power_alpha()
    assert power_iterations(largest, 1e-12) <= MAX_POWER_ITERATIONS
    assert power_iterations(math.nextafter(largest, 1.0), 1e-12) > MAX_POWER_ITERATIONS
    assert parse_config({"fedora": {"propagation": "power", "alpha": largest}})
    with pytest.raises(ConfigError, match="fedora.propagation 'power'"):
        parse_config({"fedora": {"propagation": "power", "alpha": math.nextafter(largest, 1.0)}})
    for mode in ("dense", "factored", "auto"):
        assert parse_config({"fedora": {"propagation": mode, "alpha": 0.9999}})
    # the largest accepted alpha converges on the slowest graph (the change decays as 2 alpha^t)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(propagation_matrix_power(swap, largest), propagation_matrix(swap, largest),
                          atol=1e-9)
