"""Baselines: each one's defining behaviour on a tiny rotated-MNIST federation."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from privacy.noise import ReproducibleNoise
from secure_fedora.algorithms.baselines import (
    APFL,
    BASELINE_HYPERPARAMETERS,
    BASELINE_NAMES,
    IFCA,
    BaselineConfigError,
    Ditto,
    FedAMP,
    FedProx,
    MixtureGradient,
    ProximalGradient,
    attention_weights,
    make_baseline,
)
from secure_fedora.algorithms.methods import FedAvg, MethodContext
from secure_fedora.core.config import parse_config
from secure_fedora.experiments.sweep import method_factory
from secure_fedora.learning.client import ClientUpdateError, PlainGradient, Workspace, local_train
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context


def tiny(**overrides):
    base = {
        "name": "tiny",
        "seed": 1,
        "methods": ["local"],
        "data": {"num_clients": 5, "train_per_client": 32, "val_per_client": 16,
                 "test_per_client": 32, "groups": 2},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "fedavg": {"finetune_epochs": 1},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(base)


@pytest.fixture(scope="module")
def clients():
    return build_clients(tiny())


@pytest.fixture
def ctx(clients):
    return build_context(tiny(), clients)


ALL = list(range(5))


# --------------------------------------------------------------------------- factory


def test_defaults_cover_every_baseline(ctx):
    assert set(BASELINE_HYPERPARAMETERS) == set(BASELINE_NAMES) == {
        "fedprox", "ditto", "apfl", "fedamp", "ifca"}
    assert BASELINE_HYPERPARAMETERS["fedprox"] == {"mu": 0.01}
    for name in BASELINE_NAMES:
        method = make_baseline(name, ctx, {})
        assert method.name == name


def test_factory_rejects_bad_names_keys_and_values(ctx):
    with pytest.raises(BaselineConfigError, match="unknown baseline 'fedsgd'"):
        make_baseline("fedsgd", ctx, {})
    with pytest.raises(BaselineConfigError, match=r"baselines\.fedprox\.mue: unknown key"):
        make_baseline("fedprox", ctx, {"mue": 0.1})
    with pytest.raises(BaselineConfigError, match=r"baselines\.ditto\.lam"):
        make_baseline("ditto", ctx, {"lam": -1.0})
    with pytest.raises(BaselineConfigError, match=r"baselines\.apfl\.alpha"):
        make_baseline("apfl", ctx, {"alpha": 1.5})
    with pytest.raises(BaselineConfigError, match=r"baselines\.ifca\.num_clusters"):
        make_baseline("ifca", ctx, {"num_clusters": 0})
    with pytest.raises(BaselineConfigError, match=r"baselines\.ifca\.selection_split"):
        make_baseline("ifca", ctx, {"selection_split": "test"})
    with pytest.raises(BaselineConfigError, match="must be a mapping"):
        make_baseline("fedamp", ctx, [("sigma", 1.0)])


# --------------------------------------------------------------------------- oracle wrappers


def test_proximal_gradient_adds_mu_times_distance(ctx, clients):
    theta = ctx.init.clone() + 0.01
    anchor = ctx.init.clone()
    grad = torch.zeros_like(theta)
    model = ctx.flat.bind(theta, grad)
    x, y = clients[0].train_x[:8], clients[0].train_y[:8]
    PlainGradient(8).gradient(model, x, y, grad)
    plain = grad.clone()
    prox = ProximalGradient(PlainGradient(8), mu=3.0)
    prox.target(theta, anchor)
    prox.gradient(model, x, y, grad)
    assert torch.allclose(grad, plain + 3.0 * (theta - anchor), atol=1e-6)
    assert prox.batch_size == 8  # other attributes reach the wrapped oracle
    with pytest.raises(BaselineConfigError, match="target"):
        ProximalGradient(PlainGradient(8), 1.0).gradient(model, x, y, grad)


def test_mixture_gradient_is_alpha_times_gradient_at_the_mixture(ctx, clients):
    v = ctx.init.clone()
    w = ctx.init.clone() + 0.05 * torch.randn(ctx.init.shape, generator=torch.Generator().manual_seed(0))
    x, y = clients[0].train_x[:8], clients[0].train_y[:8]
    mix_point = 0.3 * v + 0.7 * w
    ref_grad = torch.zeros_like(v)
    PlainGradient(8).gradient(ctx.flat.bind(mix_point, ref_grad), x, y, ref_grad)
    grad = torch.zeros_like(v)
    v_before = v.clone()
    oracle = MixtureGradient(PlainGradient(8), v.numel(), adaptive=True, alpha_lr=0.1)
    oracle.target(v, w, 0.3)
    oracle.gradient(ctx.flat.bind(v, grad), x, y, grad)
    assert torch.equal(v, v_before)  # the trained row is restored
    assert torch.allclose(grad, 0.3 * ref_grad, atol=1e-6)
    expected = 0.3 - 0.1 * float(torch.dot(v - w, ref_grad))
    assert oracle.alpha == pytest.approx(min(1.0, max(0.0, expected)), abs=1e-5)
    with pytest.raises(BaselineConfigError, match=r"\[0, 1\]"):
        oracle.target(v, w, 1.2)


def _stored_and_fresh(init, count=3):
    """Rows as the in-process runtime stores them (rows of one matrix; rows one float off, as
    in a matrix of a model with an odd parameter count) and fresh copies (a Flower node's)."""
    size = init.numel()
    matrix = init + 0.02 * torch.randn(count, size, generator=torch.Generator().manual_seed(4))
    odd = torch.empty(count * (size + 1))
    stored = [matrix[k] for k in range(1, count)] + [
        odd[k * (size + 1) + 1: (k + 1) * (size + 1)].copy_(matrix[k]) for k in range(count)]
    return stored, [r.clone() for r in stored]


@pytest.mark.parametrize("kind", ["proximal", "mixture"])
def test_proximal_and_mixture_training_depend_on_values_not_on_where_rows_are_stored(ctx, clients, kind):
    """FedProx/Ditto's and APFL's oracles hold the trained row; trained with a batch of one,
    a row of the in-process matrix must give the bits a Flower node's own tensors give."""
    trained, trained_fresh = _stored_and_fresh(ctx.init)
    others, others_fresh = _stored_and_fresh(ctx.init + 0.01)
    x, y = clients[0].train_x[:3], clients[0].train_y[:3]
    train = dataclasses.replace(ctx.train, batch_size=1, local_epochs=1)
    for k in range(len(trained)):
        results = []
        for theta, other in ((trained[k], others[k]), (trained_fresh[k], others_fresh[k])):
            if kind == "proximal":
                oracle = ProximalGradient(PlainGradient(1), mu=0.5)
                oracle.target(theta, other)
            else:
                oracle = MixtureGradient(PlainGradient(1), theta.numel(), adaptive=True, alpha_lr=0.5)
                oracle.target(theta, other, 0.4)
            local_train(ctx.flat, theta, x, y, train, oracle, torch.Generator().manual_seed(k),
                        Workspace.for_size(theta.numel()))
            results.append((theta, getattr(oracle, "alpha", None)))
        (row, alpha), (fresh, fresh_alpha) = results
        assert not torch.equal(row, others[k])
        assert torch.equal(row, fresh) and alpha == fresh_alpha, f"row {k}"


# --------------------------------------------------------------------------- FedProx


def test_fedprox_with_mu_zero_is_fedavg(clients):
    cfg = tiny()
    prox = FedProx(build_context(cfg, clients), mu=0.0)
    avg = FedAvg(build_context(cfg, clients), finetune_epochs=0)
    for rnd in (1, 2):
        prox.train_round(rnd, ALL)
        avg.train_round(rnd, ALL)
    assert torch.allclose(prox.global_params, avg.global_params, atol=1e-6)


def test_fedprox_proximal_term_keeps_local_models_near_global(clients):
    cfg = tiny(training={"local_epochs": 3})
    drift = {}
    for mu in (0.0, 4.0):
        method = FedProx(build_context(cfg, clients), mu=mu)
        start = method.global_params.clone()
        method.train_round(1, ALL)
        drift[mu] = float((method.theta - start).norm(dim=1).mean())
    assert drift[4.0] < 0.8 * drift[0.0]


# --------------------------------------------------------------------------- Ditto


def test_ditto_global_is_fedavg_and_personal_models_are_pulled(clients):
    cfg = tiny()
    ditto = Ditto(build_context(cfg, clients), lam=0.0)
    avg = FedAvg(build_context(cfg, clients), finetune_epochs=0)
    ditto.train_round(1, ALL)
    avg.train_round(1, ALL)
    # round 1: the global copies see exactly FedAvg's batches, so the averages agree
    assert torch.allclose(ditto.global_params, avg.global_params, atol=1e-6)
    dist = {}
    for lam in (0.0, 5.0):
        method = Ditto(build_context(tiny(training={"local_epochs": 3}), clients), lam=lam)
        method.train_round(1, ALL)
        method.train_round(2, ALL)
        # personal models differ from the global one and are evaluated
        assert not torch.equal(method.eval_row(0), method.global_params)
        assert torch.equal(method.eval_row(2), method.theta[2])
        dist[lam] = float((method.theta - method.global_params).norm(dim=1).mean())
    assert dist[5.0] < 0.8 * dist[0.0]


# --------------------------------------------------------------------------- APFL


def test_apfl_fixed_alpha_evaluates_the_mixture(ctx):
    method = APFL(ctx, alpha=0.3, adaptive=False)
    method.train_round(1, [0, 1, 2])
    assert torch.allclose(method.alpha, torch.full((5,), 0.3, dtype=torch.float64))
    expected = 0.3 * method.theta[1] + 0.7 * method.global_params
    assert torch.allclose(method.eval_row(1), expected, atol=1e-6)
    # a non-participant's local model stays at the initialization
    assert torch.equal(method.theta[4], ctx.init)


def test_apfl_alpha_zero_is_the_global_model(ctx):
    method = APFL(ctx, alpha=0.0, adaptive=False)
    method.train_round(1, ALL)
    assert torch.equal(method.eval_row(3), method.global_params)


def test_apfl_adaptive_alpha_moves_toward_the_better_model(clients):
    cfg = tiny(training={"local_epochs": 4})
    ctx = build_context(cfg, clients)
    good = ctx.init.clone()
    for i in ALL:  # a global model fitted to everyone's data
        ctx.train_client(i, good)
    method = APFL(ctx, alpha=0.5, adaptive=True, alpha_lr=0.05)
    method.global_params.copy_(good)
    method.theta.zero_()  # useless local models
    method.train_round(1, ALL)
    assert (method.alpha < 0.5).all()
    assert ((method.alpha >= 0) & (method.alpha <= 1)).all()


# --------------------------------------------------------------------------- FedAMP


def test_attention_weights_favour_similar_models():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 50, generator=g)
    theta = torch.stack([base[0], base[0] + 0.01 * torch.randn(50, generator=g),
                         base[1], base[1] + 0.01 * torch.randn(50, generator=g)])
    xi = attention_weights(theta, sigma=5.0, self_weight=0.4)
    assert torch.allclose(xi.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(xi.diagonal(), torch.full((4,), 0.4, dtype=torch.float64))
    assert xi[0, 1] > xi[0, 2] and xi[0, 1] > xi[0, 3]
    assert xi[2, 3] > xi[2, 0]
    with pytest.raises(BaselineConfigError, match="self_weight"):
        attention_weights(theta, sigma=5.0, self_weight=1.0)
    with pytest.raises(BaselineConfigError, match="N >= 2"):
        attention_weights(theta[:1], sigma=5.0, self_weight=0.5)


def test_fedamp_messages_and_proximal_pull(clients):
    cfg = tiny(training={"local_epochs": 3})
    dist = {}
    for lam in (0.0, 8.0):
        method = FedAMP(build_context(cfg, clients), sigma=10.0, self_weight=0.5, lam=lam)
        method.train_round(1, ALL)
        method.train_round(2, ALL)
        method.compute_messages()
        assert torch.allclose(method.messages, method.xi.float() @ method.theta, atol=1e-5)
        dist[lam] = float((method.theta - method.messages).norm(dim=1).mean())
    assert dist[8.0] < 0.8 * dist[0.0]


@pytest.mark.parametrize("name, key", [("fedprox", "mu"), ("ditto", "lam"), ("fedamp", "lam"),
                                       ("apfl", "alpha_lr")])
def test_baseline_weights_beyond_float32_range_are_config_errors(clients, name, key):
    """FedProx's mu, Ditto's and FedAMP's lam (1e300) failed mid-training, after setup (and
    under DP after the round's releases were admitted), with torch's "value cannot be
    converted to type float without overflow"; like the learning rate they are now at most
    MAX_SCALE, refused when the config is read, naming the key."""
    from secure_fedora.core.config import MAX_SCALE, ConfigError

    doc = {"methods": [name], "baselines": {name: {key: 1e300}}}
    with pytest.raises(ConfigError, match=rf"baselines\.{name}\.{key}: Input should be less "
                                          r"than or equal to 1000000"):
        parse_config(doc)
    with pytest.raises(BaselineConfigError, match=rf"baselines\.{name}\.{key}"):
        make_baseline(name, build_context(tiny(), clients), {key: 1e300})
    method = make_baseline(name, build_context(tiny(), clients), {key: MAX_SCALE})
    method.train_round(1, ALL)  # the largest value trains


# --------------------------------------------------------------------------- IFCA


def test_ifca_clients_pick_lowest_loss_cluster_and_average_within_it(clients, ctx):
    method = IFCA(ctx, num_clusters=3)
    assert not torch.equal(method.clusters[0], method.clusters[1])
    assert torch.equal(method.clusters[0], ctx.init)
    # cluster 2: a model that always predicts class 0 (bias only), hence a high loss for all
    method.clusters[2].zero_()
    n = ctx.flat.num_params
    method.clusters[2][n - 10] = 50.0
    chosen = []
    for i in ALL:  # each client's half picks against the cluster models it receives
        losses = []
        for k in range(3):
            model = ctx.flat.bind(method.clusters[k])
            with torch.no_grad():
                losses.append(float(F.cross_entropy(model(clients[i].train_x), clients[i].train_y)))
        chosen.append(method.choose(i, method.clusters))
        assert chosen[i] == min(range(3), key=losses.__getitem__)
        assert chosen[i] != 2
    assert (method.assignment == -1).all()  # the server knows no choice before any reply
    before = method.clusters.clone()
    stats = method.train_round(1, ALL)
    assert method.assignment.tolist() == chosen  # learnt from the replies
    assert stats["clusters_used"] == len(set(chosen))
    assert torch.equal(method.clusters[2], before[2])  # nobody picked it: unchanged
    for k in (0, 1):
        members = [i for i in ALL if chosen[i] == k]
        if members:
            assert torch.allclose(method.clusters[k], method.theta[members].mean(dim=0), atol=1e-6)
        else:
            assert torch.equal(method.clusters[k], before[k])
    now = method.choose(0, method.clusters)
    assert torch.equal(method.eval_row(0), method.clusters[now])
    assert method.extra_results() == {"assignment": [method.choose(i, method.clusters) for i in ALL]}


def test_ifca_refuses_training_loss_selection_under_a_private_oracle(clients):
    private = build_context(tiny(), clients)
    private.oracle = _Private(private.oracle)
    with pytest.raises(BaselineConfigError, match="selection_split='val'"):
        IFCA(private, num_clusters=2, selection_split="train")
    method = IFCA(private, num_clusters=2, selection_split="val")
    method.train_round(1, ALL)
    assert all(0 <= k < 2 for k in method.assignment.tolist())
    # a baseline wrapper around the plain oracle is still plain
    wrapped = build_context(tiny(), clients, oracle=ProximalGradient(PlainGradient(16), 0.0))
    IFCA(wrapped, num_clusters=2, selection_split="train")


def test_ifca_cluster_bound_is_the_payload_cap_of_its_messages(ctx):
    """IFCA sends all K cluster models in every message: the largest K is exactly where its
    real message passes payload_size_problem (K + 1 does not), and more clusters are refused
    when the method is built, before the K x P matrix is allocated."""
    from secure_fedora.algorithms.contract import payload_size_problem
    from secure_fedora.algorithms.messages import KIND_CLUSTERS

    p = ctx.flat.num_params
    largest = IFCA.largest_cluster_count(p, ctx.init.dtype)
    assert largest == 35  # the 118,282-parameter MLP: 16 MiB over 4-byte parameters
    method = IFCA(ctx, num_clusters=largest)
    assert payload_size_problem(method.configure(1, [0])[0], p) is None
    over = {**method.configure(1, [0])[0],
            KIND_CLUSTERS: torch.zeros(largest + 1, p, dtype=ctx.init.dtype)}
    assert payload_size_problem(over, p) is not None
    assert IFCA.largest_cluster_count(p, torch.float64) == largest // 2
    with pytest.raises(BaselineConfigError, match=rf"baselines\.ifca\.num_clusters = {largest + 1}: "
                       rf".* at most {largest} models of {p:,} parameters \(float32\)"):
        IFCA(ctx, num_clusters=largest + 1)
    with pytest.raises(BaselineConfigError, match=r"baselines\.ifca\.num_clusters = 1000000000"):
        IFCA(ctx, num_clusters=10**9)  # refused, not a K x P allocation


def test_ifca_names_a_client_without_data_on_its_selection_split(clients):
    emptied = list(clients)
    emptied[3] = dataclasses.replace(clients[3], train_x=clients[3].train_x[:0],
                                     train_y=clients[3].train_y[:0])
    method = IFCA(build_context(tiny(), emptied), num_clusters=2)
    with pytest.raises(ClientUpdateError, match="IFCA: client 3 has an empty train split"):
        method.choose(3, method.clusters)
    assert method.choose(0, method.clusters) in (0, 1)


class _Private:
    """Stands for a DP oracle: any oracle that is not the plain one."""

    def __init__(self, inner):
        self.inner = inner

    def batches(self, n, epochs, generator):
        return self.inner.batches(n, epochs, generator)

    def gradient(self, model, x, y, grad):
        self.inner.gradient(model, x, y, grad)


def test_checkpoint_fields_are_validated(ctx):
    method = IFCA(ctx, num_clusters=2)
    method.train_round(1, ALL)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    state["assignment"][0] = 7
    with pytest.raises(ValueError, match="assignment"):
        IFCA(build_context(tiny(), ctx.clients), num_clusters=2).load_state_dict(state)
    apfl = APFL(ctx)
    bad = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in apfl.state_dict().items()}
    bad["alpha"][1] = 2.0
    with pytest.raises(ValueError, match="alpha"):
        APFL(build_context(tiny(), ctx.clients)).load_state_dict(bad)
    ditto = Ditto(ctx)
    with pytest.raises(ValueError, match="global"):
        Ditto(build_context(tiny(), ctx.clients)).load_state_dict({"theta": ditto.theta})


# --------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baseline_runs_in_the_simulation_and_resumes_identically(tmp_path, clients, name):
    cfg = tiny(training={"rounds": 3, "participation": 0.6}).model_copy(update={"methods": [name]})
    full = Simulation(cfg, tmp_path / "full", clients=clients, method_factory=method_factory).run()

    class Stop(Exception):
        pass

    def stop(method, rnd, total):
        if rnd == 2:
            raise Stop

    cut = Simulation(cfg, tmp_path / "cut", clients=clients, method_factory=method_factory,
                     progress=stop)
    with pytest.raises(Stop):
        cut.run()
    resumed = Simulation(cfg, tmp_path / "cut", clients=clients,
                         method_factory=method_factory).run(resume=True)
    body = full["methods"][name]
    assert resumed["methods"][name]["selected"] == body["selected"]
    assert len(body["selected"]["per_client"]) == 5
    assert 0.0 <= body["selected"]["min"] <= body["selected"]["max"] <= 1.0


def test_ifca_refuses_validation_selection_on_private_validation(ctx):
    with pytest.raises(BaselineConfigError, match="data.validation is 'private'"):
        make_baseline("ifca", ctx, {"selection_split": "val"}, validation="private")
    with pytest.raises(BaselineConfigError, match="validation must be"):
        make_baseline("fedprox", ctx, {}, validation="secret")


class _Recording:
    """A stand-in for the runtime's DP oracle: records client selection and every gradient."""

    def __init__(self, batch_size):
        self.inner = PlainGradient(batch_size)
        self.selected = []
        self.gradients = 0

    def select(self, noise_multiplier, generator):
        self.selected.append(noise_multiplier)

    def batches(self, n, epochs, generator):
        return self.inner.batches(n, epochs, generator)

    def gradient(self, model, x, y, grad):
        self.gradients += 1
        self.inner.gradient(model, x, y, grad)


class _PrivacyState:
    def __init__(self, n):
        self.clients = [type("C", (), {"noise_multiplier": float(10 + i)})() for i in range(n)]

    def select_client(self, i, oracle):  # FederationPrivacy counts DP-SGD steps per client
        pass

    def confirm_steps(self, rnd, participants):  # FederationPrivacy's step check
        pass


@pytest.mark.skipif(not hasattr(MethodContext, "select"),
                    reason="this build's MethodContext has no client selection for DP oracles")
@pytest.mark.parametrize("name", ["fedprox", "ditto", "apfl", "fedamp"])
def test_every_local_step_goes_through_the_contexts_oracle(clients, name):
    oracle = _Recording(16)
    ctx = build_context(tiny(), clients, oracle=oracle)
    ctx.privacy = _PrivacyState(5)  # what the runtime attaches when DP is on
    ctx.noise = [ReproducibleNoise(i) for i in range(5)]
    method = make_baseline(name, ctx, {})
    stats = method.train_round(1, [1, 3])
    # each released run selects its client's noise first and every one of its steps is the
    # oracle's; Ditto's and APFL's personal run (never sent) trains without the DP oracle
    assert oracle.selected == [11.0, 13.0]
    released_share = 0.5 if name in ("ditto", "apfl") else 1.0
    assert oracle.gradients == stats["steps"] * released_share > 0
    assert ctx.oracle is oracle  # the wrapper was only in place during the runs


class _Noisy(_Recording):
    """A private stand-in that adds large Gaussian noise from its own generator."""

    max_grad_norm = 1e9

    def __init__(self, batch_size):
        super().__init__(batch_size)
        self.noise = torch.Generator().manual_seed(123)

    def gradient(self, model, x, y, grad):
        super().gradient(model, x, y, grad)
        grad.add_(torch.randn(grad.shape, generator=self.noise) * 100.0)


@pytest.mark.parametrize("name", ["ditto", "apfl"])
def test_personal_models_that_never_leave_the_client_train_without_noise(clients, name):
    params = {"lam": 0.0} if name == "ditto" else {"alpha": 1.0, "adaptive": False}
    plain = make_baseline(name, build_context(tiny(), clients, oracle=PlainGradient(16)), params)
    noisy_ctx = build_context(tiny(), clients, oracle=_Noisy(16))
    noisy_ctx.privacy = _PrivacyState(5)
    noisy_ctx.noise = [ReproducibleNoise(i) for i in range(5)]
    noisy = make_baseline(name, noisy_ctx, params)
    plain.train_round(1, ALL)
    noisy.train_round(1, ALL)
    # the released global copies carry the noise, the personal models do not
    assert (noisy.global_params - plain.global_params).norm() > 10.0
    assert torch.allclose(noisy.theta, plain.theta, atol=1e-6)
    assert torch.allclose(noisy.eval_row(2), plain.eval_row(2), atol=1e-6)


@pytest.mark.parametrize("base", BASELINE_NAMES)
def test_a_plug_in_deriving_from_a_baseline_is_built_as_itself(clients, base):
    """A baseline's from_config built the built-in class of its name, so a method registered
    as a subclass of a baseline silently ran the baseline: its overrides (here a round
    statistic) never ran, in either runtime. It is now built as the registered class, with
    the hyper-parameters of its own [baselines.<name>] section (the parent's section, here
    with other values, configures the parent only), and its results name the section."""
    from secure_fedora.algorithms.contract import build_method, method_class
    from secure_fedora.core.registry import METHODS

    class Plugged(method_class(base)):  # type: ignore[misc, valid-type]
        def round_statistics(self, rnd, replies):  # type: ignore[no-untyped-def]
            return {**super().round_statistics(rnd, replies), "plugged": 1.0}

    name = f"plugged_{base}_x"
    section = {"fedprox": {"mu": 0.3}, "ditto": {"lam": 0.3}, "apfl": {"alpha": 0.3},
               "fedamp": {"sigma": 0.3}, "ifca": {"num_clusters": 2}}[base]
    parents = {"fedprox": {"mu": 0.7}, "ditto": {"lam": 0.7}, "apfl": {"alpha": 0.7},
               "fedamp": {"sigma": 0.7}, "ifca": {"num_clusters": 3}}[base]
    METHODS.register(name, Plugged)
    try:
        cfg = tiny(methods=[name], baselines={name: section, base: parents})
        method = build_method(name, build_context(cfg, clients), cfg)
        only_parent = tiny(methods=[name], baselines={base: parents})
        defaults = build_method(name, build_context(only_parent, clients), only_parent)
    finally:
        METHODS.unregister(name)
    assert type(method) is Plugged
    assert type(make_baseline(base, build_context(cfg, clients), section)) is method_class(base)
    for key, value in section.items():  # its own section, not its parent's nor the defaults
        assert torch.all(torch.as_tensor(getattr(method, key), dtype=torch.float64) == value), key
        default = BASELINE_HYPERPARAMETERS[base][key]  # the parent's section never applies
        assert torch.all(torch.as_tensor(getattr(defaults, key), dtype=torch.float64) == default)
    method.setup()
    assert method.train_round(1, [0, 1])["plugged"] == 1.0
    assert method.server_finalize({})["hyperparameters_section"] == f"baselines.{name}"


def test_a_plug_in_baseline_section_is_checked_with_its_parents_keys(clients):
    """[baselines.<plug-in>] is validated as its parent's fields, naming the section; an
    unknown section name stays a ConfigError; a subclass with its own ``name`` attribute (once
    refused as an 'unknown baseline') reads its section too; a class registered under two
    names is refused rather than guessing which section applies."""
    from secure_fedora.algorithms.contract import build_method
    from secure_fedora.core.config import ConfigError
    from secure_fedora.core.registry import METHODS

    class MyProx(FedProx):
        pass

    class Named(FedProx):
        name = "named_prox_x"

    METHODS.register("my_prox_x", MyProx)
    METHODS.register("named_prox_x", Named)
    try:
        with pytest.raises(ConfigError, match=r"baselines\.my_prox_x\.bogus: unknown key"):
            tiny(methods=["my_prox_x"], baselines={"my_prox_x": {"bogus": 1}})
        with pytest.raises(ConfigError, match=r"baselines\.my_prox_x\.mu"):
            tiny(methods=["my_prox_x"], baselines={"my_prox_x": {"mu": -1.0}})
        with pytest.raises(ConfigError, match="unknown baseline 'no_such_x'"):
            tiny(methods=["my_prox_x"], baselines={"no_such_x": {"mu": 0.5}})
        cfg = tiny(methods=["named_prox_x"], baselines={"named_prox_x": {"mu": 0.4}})
        named = build_method("named_prox_x", build_context(cfg, clients), cfg)
        assert named.mu == 0.4 and named.hyperparameters_section == "named_prox_x"
        METHODS.register("my_prox_again_x", MyProx)
        with pytest.raises(ConfigError, match="registered as .*ambiguous"):
            tiny(methods=["my_prox_x"], baselines={"my_prox_x": {"mu": 0.5}})
    finally:
        for name in ("my_prox_x", "named_prox_x", "my_prox_again_x"):
            METHODS.unregister(name)
    fedprox = build_method("fedprox", build_context(tiny(), clients), tiny())
    assert "hyperparameters_section" not in fedprox.server_finalize({})


def test_a_plug_in_ifca_names_its_own_section_in_its_refusals(clients):
    """IFCA's DP, validation and size refusals named [baselines.ifca] (and 'ifca' as the
    method to leave out) for a subclass registered under its own name, which reads its own
    section: a user told to fix baselines.ifca changed a section its method never reads."""
    from secure_fedora.core.config import ConfigError
    from secure_fedora.core.registry import METHODS

    class MyIFCA(IFCA):
        pass

    dp = {"enabled": True, "epsilon": 8.0, "delta": 1e-5}
    METHODS.register("my_ifca_x", MyIFCA)
    try:
        with pytest.raises(ConfigError) as err:
            tiny(methods=["my_ifca_x"], privacy=dp)
        assert "baselines.my_ifca_x.selection_split='train'" in str(err.value)
        assert "leave 'my_ifca_x' out of methods" in str(err.value)
        assert "baselines.ifca" not in str(err.value)
        with pytest.raises(ConfigError) as err:
            tiny(methods=["my_ifca_x"], privacy=dp, data={"validation": "private"},
                 baselines={"my_ifca_x": {"selection_split": "val"}})
        assert "baselines.my_ifca_x.selection_split='val'" in str(err.value)
        assert "baselines.ifca" not in str(err.value)
        private = build_context(tiny(), clients)
        private.oracle = _Private(private.oracle)
        with pytest.raises(BaselineConfigError, match=r"^baselines\.my_ifca_x\.selection_split"):
            MyIFCA(private, num_clusters=2, selection_split="train")
        ctx = build_context(tiny(), clients)
        with pytest.raises(BaselineConfigError, match=r"^baselines\.my_ifca_x\.selection_split"):
            MyIFCA(ctx, num_clusters=2, selection_split="val", validation="private")
        with pytest.raises(BaselineConfigError, match=r"^baselines\.my_ifca_x\.num_clusters"):
            MyIFCA(ctx, num_clusters=10**9)
        with pytest.raises(BaselineConfigError, match=r"^baselines\.my_ifca_x\.num_clusters"):
            MyIFCA.check_model_size(tiny(baselines={"my_ifca_x": {"num_clusters": 10**9}}),
                                    ctx.flat.num_params, ctx.init.dtype)
        emptied = list(clients)
        emptied[3] = dataclasses.replace(clients[3], train_x=clients[3].train_x[:0],
                                         train_y=clients[3].train_y[:0])
        method = MyIFCA(build_context(tiny(), emptied), num_clusters=2)
        with pytest.raises(ClientUpdateError, match=r"\[baselines\.my_ifca_x\] selection_split"):
            method.choose(3, method.clusters)
    finally:
        METHODS.unregister("my_ifca_x")
    # the built-in keeps its wording
    with pytest.raises(ConfigError, match=r"baselines\.ifca\.selection_split='train'.*'ifca' out"):
        tiny(methods=["ifca"], privacy=dp)


def test_a_factory_plug_in_is_config_checked_by_its_algorithms_section(clients):
    """As the README says: a factory registered with ``build.algorithm = IFCA`` gets IFCA's
    config checks, which read [baselines.ifca] (the config cannot know the factory's section),
    while build.params checks the factory's own section; IFCA still refuses a private cluster
    choice when the factory builds it."""
    from pydantic import BaseModel, ConfigDict

    from secure_fedora.algorithms.contract import build_method
    from secure_fedora.core.config import ConfigError
    from secure_fedora.core.registry import METHODS

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        selection_split: str = "val"

    def build(ctx, cfg):
        own = Params.model_validate(cfg.baselines.get("fact_ifca_x", {}))
        return IFCA(ctx, num_clusters=2, selection_split=own.selection_split,
                    validation=cfg.data.validation)

    build.params = Params
    build.algorithm = IFCA
    dp = {"enabled": True, "epsilon": 8.0, "delta": 1e-5}
    METHODS.register("fact_ifca_x", build)
    try:
        with pytest.raises(ConfigError, match=r"baselines\.ifca\.selection_split='train'"):
            tiny(methods=["fact_ifca_x"], privacy=dp,
                 baselines={"fact_ifca_x": {"selection_split": "val"}})
        cfg = tiny(methods=["fact_ifca_x"], baselines={"ifca": {"selection_split": "val"},
                                                        "fact_ifca_x": {"selection_split": "train"}})
        private = build_context(cfg, clients)
        private.oracle = _Private(private.oracle)
        with pytest.raises(BaselineConfigError, match=r"selection_split='train'"):
            build_method("fact_ifca_x", private, cfg)
    finally:
        METHODS.unregister("fact_ifca_x")


def test_data_validation_reaches_every_class_declaring_takes_validation(clients):
    """make_baseline passed data.validation only when the baseline's name was 'ifca': the
    choice is now the class attribute takes_validation, so a subclass of IFCA registered under
    its own name gets it exactly as IFCA does, and a plug-in of another baseline declaring it
    gets it too (one not declaring it never does)."""
    from secure_fedora.algorithms.contract import build_method
    from secure_fedora.core.registry import METHODS

    class SeenIFCA(IFCA):
        def __init__(self, ctx, validation="unset", **params):
            self.seen = validation
            super().__init__(ctx, validation=validation, **params)

    class DeclaringProx(FedProx):
        takes_validation = True

        def __init__(self, ctx, mu=0.01, validation="unset"):
            self.seen = validation
            super().__init__(ctx, mu)

    assert IFCA.takes_validation and not FedProx.takes_validation
    ctx = build_context(tiny(), clients)
    for validation in ("public", "private"):
        seen = make_baseline("ifca", ctx, {"num_clusters": 2}, validation=validation, cls=SeenIFCA)
        assert seen.seen == validation
        prox = make_baseline("fedprox", ctx, {}, validation=validation, cls=DeclaringProx)
        assert prox.seen == validation
    with pytest.raises(BaselineConfigError, match=r"^baselines\.seen_ifca_x\.selection_split='val'"):
        METHODS.register("seen_ifca_x", SeenIFCA)
        try:
            make_baseline("ifca", ctx, {"selection_split": "val"}, validation="private",
                          cls=SeenIFCA, label="seen_ifca_x")
        finally:
            METHODS.unregister("seen_ifca_x")
    METHODS.register("seen_ifca_x", SeenIFCA)
    METHODS.register("declaring_prox_x", DeclaringProx)
    try:
        cfg = tiny(methods=["seen_ifca_x", "declaring_prox_x"],
                   baselines={"seen_ifca_x": {"num_clusters": 2}})
        for name in ("seen_ifca_x", "declaring_prox_x"):
            assert build_method(name, build_context(cfg, clients), cfg).seen == "public"
    finally:
        METHODS.unregister("seen_ifca_x")
        METHODS.unregister("declaring_prox_x")


def test_ifca_keeps_the_round_choice_of_a_client_whose_final_choice_is_invalid(tmp_path, clients):
    """Both runtimes hand server_finalize every client's reply (or stop the run), but a reply
    whose cluster index is out of range or not an integer is still left out: the client keeps
    the choice of its latest accepted round reply (-1 when it has none), as documented."""
    from secure_fedora.algorithms.messages import KIND_CLUSTER_CHOICE
    from secure_fedora.core.registry import METHODS

    class BadFinal(IFCA):
        def client_finalize(self, i, message):
            if i == 1:
                return {KIND_CLUSTER_CHOICE: torch.tensor([7.0], dtype=self.theta.dtype)}
            return super().client_finalize(i, message)

        def server_finalize(self, replies):
            self.round_assignment = self.assignment.tolist()
            return super().server_finalize(replies)

    METHODS.register("bad_final_x", BadFinal)
    try:
        cfg = tiny(methods=["bad_final_x"], baselines={"bad_final_x": {"num_clusters": 2}})
        sim = Simulation(cfg, tmp_path / "run", clients=clients)
        got = sim.run()["methods"]["bad_final_x"]["extra"]["assignment"]
    finally:
        METHODS.unregister("bad_final_x")
    method = sim.methods["bad_final_x"]
    assert got[1] == method.round_assignment[1] >= 0  # the latest accepted round choice
    final = method.finalize_messages()
    assert [got[i] for i in (0, 2, 3, 4)] == [method._choice_for(i, final[i]) for i in (0, 2, 3, 4)]
    fresh = make_baseline("ifca", build_context(tiny(), clients), {"num_clusters": 2})
    half = {KIND_CLUSTER_CHOICE: torch.tensor([0.5])}
    assert fresh.server_finalize({0: half})["assignment"] == [-1] * 5  # no choice yet


def test_ifca_chooses_on_a_single_class_training_split_under_bce(tmp_path):
    """IFCA's cluster choice needs only the loss: a BCE client whose training rows are all one
    class (its test and validation splits hold both) must not stop the run with the AUC's
    MetricError, whatever the engine; the choice is the loss argmin as with two classes."""
    from sklearn.datasets import load_breast_cancer
    from torch import nn

    from secure_fedora import Experiment

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    pos, neg = (y == 1).nonzero()[0], (y == 0).nonzero()[0]

    def split(p, n):
        idx = list(p) + list(n)
        return x[idx], y[idx]

    data = [{"train": split(pos[:1], []), "val": split(pos[1:4], neg[:3]),
             "test": split(pos[4:9], neg[3:8])}]
    for c in range(1, 3):
        p, n = pos[10 + 20 * c: 20 + 20 * c], neg[10 + 20 * c: 20 + 20 * c]
        data.append({"train": split(p[:6], n[:6]), "val": split(p[6:8], n[6:8]),
                     "test": split(p[8:], n[8:])})

    def mlp(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 4), nn.Tanh(),
                             nn.Linear(4, num_classes))

    for engine in ("loop", "batched"):
        config = {"name": f"ifca-{engine}", "methods": ["ifca"],
                  "data": {"partition": "iid", "num_clients": 3, "train_per_client": 1,
                           "val_per_client": 4, "test_per_client": 10},
                  "training": {"rounds": 2, "local_epochs": 1, "batch_size": 4, "lr": 0.05,
                               "loss": "bce", "engine": engine}}
        results = Experiment(config, data=data, model=mlp, run_dir=tmp_path / engine).run()
        selected = results.selected("ifca")
        assert len(selected["per_client"]) == 3
        assert all(0.0 <= v <= 1.0 for v in selected["per_client"])


@pytest.mark.parametrize("name, key", [("fedprox", "mu"), ("ditto", "lam"), ("fedamp", "lam")])
def test_a_proximal_weight_at_the_local_step_bound_is_refused_and_just_below_runs(tmp_path, name, key):
    """The proximal term w/2 ||theta - anchor||^2 is added after clipping and goes through
    momentum as weight decay does: from lr * (weight_decay + w) = 2 (1 + momentum) on, every
    local run diverges whatever the data (the hunt's FedProx mu = 1e6 finished with finite
    garbage, the engines disagreeing: loop 0.14, batched 0.08). Refused when read; just below,
    the run completes and both engines agree."""
    from secure_fedora.core.config import ConfigError

    def config(weight, engine="loop"):
        # lr 0.5 with momentum 0.5: bound 3, so weight_decay + w = 6 sits on it exactly
        return tiny(methods=[name], training={"lr": 0.5, "momentum": 0.5, "weight_decay": 1.0,
                                              "engine": engine},
                    data={"num_clients": 2, "train_per_client": 8},
                    baselines={name: {key: weight}})

    with pytest.raises(ConfigError) as err:
        config(5.0)
    text = str(err.value)
    assert (f"training.lr * (training.weight_decay + baselines.{name}.{key}) = 0.5 * (1 + 5) = 3 "
            "reaches the local step's stability bound 2 (1 + training.momentum) = 3") in text
    assert f"lower training.lr or training.weight_decay or baselines.{name}.{key}" in text
    below = 5.0 - 1e-3
    finals = []
    for engine in ("loop", "batched"):
        results = Simulation(config(below, engine), tmp_path / engine,
                             method_factory=method_factory).run()
        finals.append(results["methods"][name]["final"]["per_client"])
    # the batched engine trained every round itself (no fallback to the loop)
    assert results["methods"][name]["extra"]["training_engine"]["fallbacks"] == []
    assert finals[0] == pytest.approx(finals[1])
