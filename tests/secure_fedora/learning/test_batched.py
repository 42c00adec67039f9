"""Batched client training equals the per-client loop (local_train) within float tolerance.

Tolerance: rows after one local run agree to atol 1e-5 (rtol 1e-4); the differences are float
rounding from summing the same products in another order (batched matmuls).
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from privacy.dpsgd import DPSGD, rescaled_gradient
from privacy.noise import ReproducibleNoise
from secure_fedora.learning.batched import (
    BatchedTrainingError,
    ClientJob,
    batched_plan,
    engine_probe,
    train_clients,
)
from secure_fedora.learning.client import (
    ClientUpdateError,
    FlatModel,
    PlainGradient,
    TrainConfig,
    Workspace,
    local_train,
)
from secure_fedora.learning.models import make_model
from secure_fedora.secure.private import DPGradient

ATOL, RTOL = 1e-5, 1e-4
ROOT = Path(__file__).resolve().parents[3]


def _clients(sizes, seed=0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def _matrix(flat, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = flat.initial_vector()
    return torch.stack([base + 0.02 * torch.randn(base.shape, generator=g) for _ in range(n)])


def _jobs(theta, data, *, phi=None, lams=None, anchor=None, mu=0.0, seed=10):
    jobs = []
    for i, (x, y) in enumerate(data):
        jobs.append(ClientJob(i, theta[i], x, y, torch.Generator().manual_seed(seed + i),
                              phi=None if phi is None else phi[i],
                              lam=0.0 if lams is None else lams[i],
                              anchor=anchor, mu=mu))
    return jobs


def _loop(flat, cfg, oracle, theta, data, *, phi=None, lams=None, seed=10):
    ws = Workspace.for_size(flat.num_params)
    steps = []
    for i, (x, y) in enumerate(data):
        steps.append(local_train(flat, theta[i], x, y, cfg, oracle,
                                 torch.Generator().manual_seed(seed + i), ws,
                                 phi=None if phi is None else phi[i],
                                 lam=0.0 if lams is None else lams[i]))
    return steps


def _assert_rows_close(a, b):
    assert torch.allclose(a, b, atol=ATOL, rtol=RTOL), float((a - b).abs().max())


CFG_PLAIN = TrainConfig(lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=16, local_epochs=2)
CFG_FULL = TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-3, batch_size=16, local_epochs=2)


@pytest.mark.parametrize("cfg", [CFG_PLAIN, CFG_FULL], ids=["plain", "momentum+wd"])
def test_equal_sizes_match_the_loop(cfg):
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([48] * 4)
    theta = _matrix(flat, 4)
    reference = theta.clone()
    want = _loop(flat, cfg, PlainGradient(16), reference, data)
    outcome = train_clients(flat, cfg, PlainGradient(16), _jobs(theta, data))
    assert outcome.engine == "linear"
    assert [outcome.steps[i] for i in range(4)] == want == [6] * 4
    _assert_rows_close(theta, reference)
    assert not torch.allclose(theta, _matrix(flat, 4))  # it trained


def test_stacked_tanh_sigmoid_and_relu_layers_train_with_the_linear_engine_as_the_loop():
    # an activation's output is kept for its backward, so the next activation (or one after a
    # Flatten) must not be computed in place over it
    flat = FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Sigmoid(),
                                   nn.Linear(16, 16), nn.ReLU(), nn.Flatten(), nn.Tanh(),
                                   nn.Linear(16, 10), nn.ReLU(), nn.ReLU(), nn.Linear(10, 10)))
    data = _clients([40, 23, 9], shape=(1, 8, 8))
    theta = _matrix(flat, 3)
    phi = _matrix(flat, 3, seed=5)
    reference = theta.clone()
    want = _loop(flat, CFG_FULL, PlainGradient(16), reference, data, phi=phi, lams=[0.5, 0.0, 1.0])
    outcome = train_clients(flat, CFG_FULL, PlainGradient(16),
                            _jobs(theta, data, phi=phi, lams=[0.5, 0.0, 1.0]))
    assert outcome.engine == "linear"
    assert [outcome.steps[i] for i in range(3)] == want
    _assert_rows_close(theta, reference)
    assert not torch.allclose(theta, _matrix(flat, 3))


def test_anchor_pull_and_unequal_sizes_match_the_loop():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([50, 7, 33, 0, 16])  # last batches of 2, 7, 1; an empty client steps on weight decay only, as in the loop
    theta = _matrix(flat, 5)
    phi = _matrix(flat, 5, seed=7)
    lams = [0.5, 0.0, 2.0, 1.0, 0.3]
    reference = theta.clone()
    want = _loop(flat, CFG_FULL, PlainGradient(16), reference, data, phi=phi, lams=lams)
    outcome = train_clients(flat, CFG_FULL, PlainGradient(16),
                            _jobs(theta, data, phi=phi, lams=lams))
    assert outcome.engine == "linear"
    assert [outcome.steps[i] for i in range(5)] == want == [8, 2, 6, 2, 2]
    _assert_rows_close(theta, reference)


def test_generators_advance_as_in_the_loop_and_a_second_run_still_matches():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([20, 40])
    theta = _matrix(flat, 2)
    reference = theta.clone()
    gens_loop = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    gens_batch = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    ws = Workspace.for_size(flat.num_params)
    for _ in range(2):
        for i, (x, y) in enumerate(data):
            local_train(flat, reference[i], x, y, CFG_FULL, PlainGradient(16), gens_loop[i], ws)
        jobs = [ClientJob(i, theta[i], x, y, gens_batch[i]) for i, (x, y) in enumerate(data)]
        train_clients(flat, CFG_FULL, PlainGradient(16), jobs)
    _assert_rows_close(theta, reference)
    for a, b in zip(gens_loop, gens_batch, strict=True):
        assert torch.equal(a.get_state(), b.get_state())


def test_fedprox_mu_and_gradient_clipping_match_the_loop():
    from secure_fedora.algorithms.baselines import ProximalGradient

    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([32, 24])
    theta = _matrix(flat, 2)
    anchor = flat.initial_vector()
    reference = theta.clone()
    ws = Workspace.for_size(flat.num_params)
    for i, (x, y) in enumerate(data):
        oracle = ProximalGradient(PlainGradient(16, max_grad_norm=0.5), mu=0.3)
        oracle.target(reference[i], anchor)
        local_train(flat, reference[i], x, y, CFG_FULL, oracle, torch.Generator().manual_seed(10 + i), ws)
    outcome = train_clients(flat, CFG_FULL, PlainGradient(16, max_grad_norm=0.5),
                            _jobs(theta, data, anchor=anchor, mu=0.3))
    assert outcome.engine == "linear"
    _assert_rows_close(theta, reference)


def _dp_oracle(flat, sample_rate=0.25, expected=8.0):
    return DPGradient(flat.module, 1.0, sample_rate, expected, ReproducibleNoise(0))


def test_dp_matches_the_loop_with_per_client_noise_and_counts_steps():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([40, 32, 25])
    sigmas = [0.8, 1.2, 2.0]
    clips = [1.0, 0.5, 2.0]
    theta = _matrix(flat, 3)
    reference = theta.clone()
    loop_oracle = _dp_oracle(flat)
    loop_counts: dict[int, int] = {}
    loop_sources = [ReproducibleNoise(100 + i) for i in range(3)]
    ws = Workspace.for_size(flat.num_params)
    for i, (x, y) in enumerate(data):
        loop_oracle.select(sigmas[i], loop_sources[i])
        loop_oracle.dpsgd.max_grad_norm = clips[i]
        loop_oracle.on_step = lambda i=i: loop_counts.__setitem__(i, loop_counts.get(i, 0) + 1)
        local_train(flat, reference[i], x, y, CFG_FULL, loop_oracle, torch.Generator(), ws)
    batch_oracle = _dp_oracle(flat)
    counts: dict[int, int] = {}
    sources = [ReproducibleNoise(100 + i) for i in range(3)]
    jobs = [ClientJob(i, theta[i], x, y, torch.Generator(), noise=sources[i],
                      noise_multiplier=sigmas[i], max_grad_norm=clips[i],
                      on_step=lambda i=i: counts.__setitem__(i, counts.get(i, 0) + 1))
            for i, (x, y) in enumerate(data)]
    outcome = train_clients(flat, CFG_FULL, batch_oracle, jobs)
    assert outcome.engine == "linear"
    assert counts == loop_counts == {0: 8, 1: 8, 2: 8}
    assert outcome.steps == {0: 8, 1: 8, 2: 8}
    assert batch_oracle.steps_executed == loop_oracle.steps_executed == 24
    _assert_rows_close(theta, reference)
    for a, b in zip(loop_sources, sources, strict=True):  # same draws, same order
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert batch_oracle.dpsgd.max_grad_norm == 1.0  # the oracle's own bound is untouched


def test_dp_refuses_a_noise_source_shared_by_two_clients():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([8, 8])
    theta = _matrix(flat, 2)
    shared = ReproducibleNoise(1)
    jobs = [ClientJob(i, theta[i], x, y, torch.Generator(), noise=shared, noise_multiplier=1.0)
            for i, (x, y) in enumerate(data)]
    before = theta.clone()
    with pytest.raises(ClientUpdateError, match="shared"):
        train_clients(flat, CFG_FULL, _dp_oracle(flat), jobs)
    assert torch.equal(theta, before)


@pytest.mark.parametrize("change", [{"noise_multiplier": 0.0}, {"noise_multiplier": float("nan")},
                                    {"noise_multiplier": -1.0}, {"max_grad_norm": 0.0},
                                    {"max_grad_norm": float("inf")}])
def test_dp_refuses_a_bad_noise_multiplier_or_clip_before_any_draw(change):
    """A client's noise multiplier or clip bound that is not a finite number > 0 is refused
    before any client's batch or noise is drawn (no noiseless step is ever taken): every
    row, noise source and step count stays as it was."""
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([8, 8])
    theta = _matrix(flat, 2)
    sources = [ReproducibleNoise(100 + i) for i in range(2)]
    jobs = [ClientJob(i, theta[i], x, y, torch.Generator(), noise=sources[i],
                      noise_multiplier=1.0) for i, (x, y) in enumerate(data)]
    for key, value in change.items():
        setattr(jobs[1], key, value)
    before = theta.clone()
    oracle = _dp_oracle(flat)
    with pytest.raises(ClientUpdateError, match="client 1: DP-SGD's"):
        train_clients(flat, CFG_FULL, oracle, jobs)
    assert torch.equal(theta, before) and oracle.steps_executed == 0
    for i, source in enumerate(sources):
        assert torch.equal(source.generator.get_state(),
                           ReproducibleNoise(100 + i).generator.get_state())


def test_dp_oracle_refuses_a_client_without_noise():
    """DPGradient.select takes only a finite noise multiplier > 0 (as DPSGD itself), so no
    client's steps run without noise; a refused select changes nothing."""
    from privacy.dpsgd import DPSGDError

    oracle = _dp_oracle(FlatModel(make_model("mlp", seed=0)))
    source = oracle.dpsgd.noise
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(DPSGDError, match="noise_multiplier"):
            oracle.select(bad, ReproducibleNoise(1))
    with pytest.raises(DPSGDError, match="NoiseSource"):
        oracle.select(1.0, torch.Generator())
    assert oracle.dpsgd.noise_multiplier == 1.0 and oracle.dpsgd.noise is source


class _RecordingNoise(ReproducibleNoise):
    """A real reproducible source that also records the device of each Gaussian draw."""

    def __init__(self, seed):
        super().__init__(seed)
        self.devices = []

    def normal(self, shape, std, dtype=torch.float32, device=None):
        self.devices.append(device)
        return super().normal(shape, std, dtype, device)


def test_dp_noise_is_drawn_on_the_rows_device():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([16, 12])
    theta = _matrix(flat, 2)
    sources = [_RecordingNoise(100 + i) for i in range(2)]
    jobs = [ClientJob(i, theta[i], x, y, torch.Generator(), noise=sources[i], noise_multiplier=1.0)
            for i, (x, y) in enumerate(data)]
    train_clients(flat, CFG_FULL, _dp_oracle(flat), jobs)
    for source in sources:
        assert source.devices and all(d is not None and torch.device(d) == theta.device
                                      for d in source.devices), source.devices


def _examples_cnn():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.cnn((1, 8, 8), 10)


def test_examples_cnn_trains_batched_with_vmap_and_matches_the_loop():
    flat = FlatModel(_examples_cnn())
    data = _clients([24, 13, 30], shape=(1, 8, 8))
    theta = _matrix(flat, 3)
    reference = theta.clone()
    _loop(flat, CFG_FULL, PlainGradient(8), reference, data)
    outcome = train_clients(flat, CFG_FULL, PlainGradient(8), _jobs(theta, data))
    assert outcome.engine == "vmap", outcome.reason
    _assert_rows_close(theta, reference)


def test_dp_with_the_cnn_batches_per_sample_gradients_and_matches_the_loop():
    flat = FlatModel(_examples_cnn())
    data = _clients([16, 11], shape=(1, 8, 8))
    theta = _matrix(flat, 2)
    reference = theta.clone()
    oracle = DPGradient(flat.module, 1.0, 0.5, 8.0, ReproducibleNoise(0))
    assert oracle.dpsgd.mode == "opacus"  # the loop's reference: Opacus per-sample gradients
    for i, (x, y) in enumerate(data):
        oracle.select(1.0, ReproducibleNoise(50 + i))
        local_train(flat, reference[i], x, y, CFG_FULL, oracle, torch.Generator(),
                    Workspace.for_size(flat.num_params))
    jobs = [ClientJob(i, theta[i], x, y, torch.Generator(), noise=ReproducibleNoise(50 + i),
                      noise_multiplier=1.0) for i, (x, y) in enumerate(data)]
    outcome = train_clients(flat, CFG_FULL, oracle, jobs)
    assert outcome.engine == "vmap", outcome.reason
    assert outcome.steps == {0: 4, 1: 4}
    _assert_rows_close(theta, reference)


class _RandomLayer(nn.Module):
    def forward(self, x):
        return x * (1 + torch.rand_like(x))


def test_a_model_the_vmap_engine_cannot_reproduce_uses_the_loop():
    module = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), _RandomLayer(), nn.Linear(8, 3))
    flat = FlatModel(module)
    x, y = torch.rand(6, 16), torch.randint(0, 3, (6,))
    for oracle in (PlainGradient(4), DPGradient(module, 1.0, 0.5, 4.0, ReproducibleNoise(0))):
        plan = batched_plan(flat, oracle, x, y)
        assert plan.engine == "loop"
        assert "_RandomLayer" in plan.reason


def test_a_fallback_reason_says_which_engine_each_part_is_about():
    """A Dropout MLP's reason read "vmap engine cannot run the model (...; layer Dropout is not
    Linear or a supported activation)": the layer named as the cause is the linear engine's."""
    module = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.2), nn.Linear(8, 3))
    x, y = torch.rand(6, 16), torch.randint(0, 3, (6,))
    plan = batched_plan(FlatModel(module), PlainGradient(4), x, y)
    assert plan.engine == "loop" and plan.reason.startswith("vmap engine cannot run the model")
    assert plan.reason.endswith("; the linear engine does not apply: layer Dropout is not Linear "
                                "or a supported activation)")


def _module_twice():
    torch.manual_seed(0)
    hidden = nn.Linear(8, 8)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), hidden, nn.ReLU(), hidden,
                         nn.ReLU(), nn.Linear(8, 10))


def test_a_module_registered_twice_is_trained_by_the_loop_and_stays_bound():
    """torch.func.functional_call does not restore a module registered under two names: the
    engine probe left its own tensors in the module, unbound from the flat row, and the run
    failed later with a raw functorch error (or trained a copy)."""
    flat = FlatModel(_module_twice())
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for oracle in (PlainGradient(4), DPGradient(flat.module, 1.0, 0.5, 4.0, ReproducibleNoise(0))):
        plan = batched_plan(flat, oracle, x, y)
        assert plan.engine == "loop" and "module '5' is module '3'" in plan.reason
    assert [p for p in flat.module.parameters()] == flat.params  # still the flat's parameters
    _trained_by_the_loop(flat)


def test_non_finite_rows_are_restored_and_named():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([16, 16])
    theta = _matrix(flat, 2)
    theta[1, 0] = float("inf")
    before = theta.clone()
    with pytest.raises(BatchedTrainingError) as err:
        train_clients(flat, CFG_FULL, PlainGradient(8), _jobs(theta, data))
    assert err.value.failed == [1]
    assert torch.equal(theta[1], before[1])
    assert not torch.equal(theta[0], before[0])


@pytest.mark.parametrize("change, message", [
    (dict(lam=1.0), "invalid regularization"),
    (dict(mu=0.5), "invalid proximal term"),
])
def test_bad_jobs_are_refused_before_anything_changes(change, message):
    flat = FlatModel(make_model("mlp", seed=0))
    (x, y), = _clients([8])
    theta = _matrix(flat, 1)
    before = theta.clone()
    job = ClientJob(0, theta[0], x, y, torch.Generator(), **change)
    with pytest.raises(ClientUpdateError, match=message):
        train_clients(flat, CFG_FULL, PlainGradient(8), [job])
    assert torch.equal(theta, before)


def test_wrong_row_shape_and_unknown_engine_are_refused():
    flat = FlatModel(make_model("mlp", seed=0))
    (x, y), = _clients([8])
    with pytest.raises(ClientUpdateError, match="row has shape"):
        train_clients(flat, CFG_FULL, PlainGradient(8), [ClientJob(0, torch.zeros(5), x, y, torch.Generator())])
    with pytest.raises(ClientUpdateError, match="engine"):
        train_clients(flat, CFG_FULL, PlainGradient(8), [], engine="fast")


def test_chunks_of_clients_match_the_loop():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([30, 12, 30, 5, 20])
    theta = _matrix(flat, 5)
    reference = theta.clone()
    _loop(flat, CFG_FULL, PlainGradient(16), reference, data)
    outcome = train_clients(flat, CFG_FULL, PlainGradient(16), _jobs(theta, data), chunk=2)
    assert outcome.engine == "linear"
    _assert_rows_close(theta, reference)
    with pytest.raises(ClientUpdateError, match="chunk"):
        train_clients(flat, CFG_FULL, PlainGradient(16), _jobs(theta, data), chunk=0)


@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["momentum-in-gemm", "clipped"])
def test_the_step_is_the_same_whatever_the_row_blocks(monkeypatch, max_norm):
    """The step's elementwise passes (weight decay, FedProx term, momentum, FEDORA pull, and
    with the momentum in the GEMMs the first Linear's gradient moved into its buffer) run row
    block by row block; the rows equal those of one pass over the whole buffers bit for bit,
    whatever the block size."""
    from secure_fedora.learning import batched

    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([30, 12, 30, 5, 20])
    phi = _matrix(flat, 5, seed=7)
    lams = [0.5, 0.0, 2.0, 1.0, 0.3]
    results = []
    for values in (10**12, 1, 3 * flat.num_params):  # whole buffers; one row; three rows
        monkeypatch.setattr(batched, "_BLOCK_VALUES", values)
        monkeypatch.setattr(batched, "_CORE_BLOCK_VALUES", values)  # (on one thread)
        monkeypatch.setattr(batched, "_BLOCK_FROM", 0)  # blocked however small the buffers
        theta = _matrix(flat, 5)
        train_clients(flat, CFG_FULL, PlainGradient(16, max_grad_norm=max_norm),
                      _jobs(theta, data, phi=phi, lams=lams, anchor=flat.initial_vector(), mu=0.3))
        results.append(theta)
    assert not torch.equal(results[0], _matrix(flat, 5))
    assert all(torch.equal(results[0], other) for other in results[1:])


def _private_context(tmp_path: Path, name: str):
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import build_clients, build_context
    from secure_fedora.secure.keystore import ensure_keystore, run_party_ids
    from secure_fedora.secure.private import FederationPrivacy

    cfg = parse_config({
        "seed": 3, "methods": ["fedora"], "fedora": {"relatedness": "noised"},
        "data": {"num_clients": 3, "train_per_client": 40, "val_per_client": 10,
                 "test_per_client": 10, "groups": 3},
        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 10, "lr": 0.05},
        "privacy": {"enabled": True, "epsilon": 50.0, "delta": 1e-3, "noise_multiplier": 1.0,
                    "summary_noise_multiplier": 2.0, "noise": "reproducible"},
    })
    clients = build_clients(cfg)
    ctx = build_context(cfg, clients)
    keys = tmp_path / f"keys-{name}"
    ensure_keystore(keys, run_party_ids(3), "test")
    ctx.privacy = FederationPrivacy.open(cfg, "fedora", 3, tmp_path / f"ledgers-{name}", keys)
    return ctx


def test_train_participants_under_dp_matches_train_client_and_the_ledger_step_count(tmp_path):
    from secure_fedora.learning.batched import train_participants

    loop_ctx, batch_ctx = _private_context(tmp_path, "loop"), _private_context(tmp_path, "batch")
    everyone = [0, 1, 2]
    theta = _matrix(loop_ctx.flat, 3)
    phi = _matrix(loop_ctx.flat, 3, seed=4)
    lams = [0.5, 0.0, 1.5]
    rows = {}
    for ctx, key in ((loop_ctx, "loop"), (batch_ctx, "batch")):
        rows[key] = theta.clone()
        for i in everyone:
            assert ctx.privacy.admit(i, 1, rows[key][i], with_lambda=False, noise=ctx.noise[i])
    for k, i in enumerate(everyone):
        loop_ctx.train_client(i, rows["loop"][i], phi[i], lams[k])
    received = {i: phi[i].clone() for i in everyone}  # phi as the round's messages carry it
    outcome = train_participants(batch_ctx, everyone, rows["batch"], received, lams)
    assert outcome.engine == "linear"
    _assert_rows_close(rows["batch"], rows["loop"])
    assert batch_ctx.privacy.executed_steps == loop_ctx.privacy.executed_steps
    assert sum(batch_ctx.privacy.executed_steps.values()) > 0
    # the ledger accounted exactly the executed steps: the release check passes
    batch_ctx.privacy.confirm_steps(1, everyone)
    for ctx in (loop_ctx, batch_ctx):
        ctx.privacy.close()


def test_evaluate_losses_equal_evaluate_per_row():
    from secure_fedora.learning.batched import evaluate_losses
    from secure_fedora.learning.client import evaluate

    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([12, 30, 7])
    theta = _matrix(flat, 4)
    participants = [3, 0, 2]
    got = evaluate_losses(flat, theta, participants, [x for x, _ in data], [y for _, y in data], chunk=2)
    want = [evaluate(flat, theta[i], x, y).loss for i, (x, y) in zip(participants, data, strict=True)]
    assert got == pytest.approx(want, rel=1e-6)
    cnn = FlatModel(_examples_cnn())  # not a Linear stack: evaluated row by row
    rows = _matrix(cnn, 2)
    small = _clients([5, 9], shape=(1, 8, 8))
    assert evaluate_losses(cnn, rows, [1, 0], [x for x, _ in small], [y for _, y in small]) == [
        evaluate(cnn, rows[i], x, y).loss for i, (x, y) in zip([1, 0], small, strict=True)]
    with pytest.raises(ClientUpdateError, match="empty split"):
        evaluate_losses(flat, theta, [0], [torch.zeros(0, 1, 28, 28)], [torch.zeros(0, dtype=torch.long)])


def test_an_oracle_the_batched_path_does_not_know_uses_the_loop_and_says_so():
    from secure_fedora.algorithms.baselines import ProximalGradient

    flat = FlatModel(make_model("mlp", seed=0))
    (x, y), = _clients([16])
    theta = _matrix(flat, 1)
    anchor = flat.initial_vector()
    reference = theta.clone()
    loop_oracle = ProximalGradient(PlainGradient(8), mu=0.2)
    loop_oracle.target(reference[0], anchor)
    local_train(flat, reference[0], x, y, CFG_FULL, loop_oracle, torch.Generator().manual_seed(1),
                Workspace.for_size(flat.num_params))
    oracle = ProximalGradient(PlainGradient(8), mu=0.2)
    oracle.target(theta[0], anchor)
    outcome = train_clients(flat, CFG_FULL, oracle, [ClientJob(0, theta[0], x, y, torch.Generator().manual_seed(1))])
    assert outcome.engine == "loop"
    assert "ProximalGradient" in outcome.reason
    assert torch.equal(theta, reference)  # the reference path itself: bit-identical


def test_dp_with_an_empty_client_and_mostly_empty_poisson_batches_matches_the_loop():
    flat = FlatModel(make_model("mlp", seed=0))
    data = [(torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), *_clients([2])]
    theta = _matrix(flat, 2)
    reference = theta.clone()
    oracle = DPGradient(flat.module, 1.0, 0.1, 1.0, ReproducibleNoise(0))
    for i, (x, y) in enumerate(data):
        oracle.select(1.0, ReproducibleNoise(9 + i))
        local_train(flat, reference[i], x, y, CFG_FULL, oracle, torch.Generator(),
                    Workspace.for_size(flat.num_params))
    jobs = [ClientJob(i, theta[i], x, y, torch.Generator(), noise=ReproducibleNoise(9 + i),
                      noise_multiplier=1.0) for i, (x, y) in enumerate(data)]
    outcome = train_clients(flat, CFG_FULL, oracle, jobs)
    assert outcome.steps == {0: 20, 1: 20}  # ceil(epochs / q) steps, noise only when empty
    _assert_rows_close(theta, reference)


def _dp_jobs(theta, data, sources, sigmas, order):
    return [ClientJob(i, theta[i], data[i][0], data[i][1], torch.Generator(), noise=sources[i],
                      noise_multiplier=sigmas[i]) for i in order]


def test_dp_rows_and_noise_streams_do_not_depend_on_the_other_clients_or_their_order():
    """Each client's DP noise comes from its own stream only: training the clients in another
    order, or one at a time (chunk 1), gives the same rows and leaves every stream alike."""
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([30, 24, 17])
    sigmas = [0.8, 1.2, 2.0]
    results = []
    for order, chunk in (([0, 1, 2], 256), ([2, 0, 1], 1), ([1, 2, 0], 2)):
        theta = _matrix(flat, 3)
        sources = [ReproducibleNoise(200 + i) for i in range(3)]
        train_clients(flat, CFG_FULL, _dp_oracle(flat), _dp_jobs(theta, data, sources, sigmas, order),
                      chunk=chunk)
        results.append((theta, [s.generator.get_state() for s in sources]))
    (first, first_states), *others = results
    for theta, states in others:
        torch.testing.assert_close(theta, first, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(states, first_states, strict=True))


def test_a_mixture_matches_the_loop_and_updates_alpha_as_the_loop():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([30, 21])
    theta = _matrix(flat, 2)
    w = _matrix(flat, 2, seed=7)
    outcomes = {}
    rows = {}
    for engine in ("loop", "auto"):
        rows[engine] = theta.clone()
        jobs = _jobs(rows[engine], data)
        for k, job in enumerate(jobs):
            job.mix_with, job.mix_alpha, job.mix_adaptive, job.mix_lr = w[k], (0.3, 0.8)[k], True, 0.05
        outcomes[engine] = train_clients(flat, CFG_FULL, PlainGradient(8, 2.0), jobs, engine=engine)
    assert outcomes["auto"].engine == "linear" and outcomes["loop"].engine == "loop"
    _assert_rows_close(rows["auto"], rows["loop"])
    assert outcomes["auto"].alphas == pytest.approx(outcomes["loop"].alphas, abs=1e-6)
    assert outcomes["auto"].alphas != {0: 0.3, 1: 0.8}  # alpha moved
    with pytest.raises(ClientUpdateError, match="mixture"):
        bad = _jobs(theta.clone(), data)
        bad[0].mix_with, bad[0].mix_alpha = w[0], 1.5
        train_clients(flat, CFG_FULL, PlainGradient(8), bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_rows_data_and_noise_stay_on_the_device_and_match_the_cpu():
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([30, 24])
    sigmas = [1.0, 1.5]
    rows = {}
    start = _matrix(flat, 2)
    for device in ("cpu", "cuda"):
        flat.module.to(device)
        theta = start.to(device)
        on_device = [(x.to(device), y.to(device)) for x, y in data]
        sources = [ReproducibleNoise(300 + i) for i in range(2)]
        train_clients(flat, CFG_FULL, _dp_oracle(flat), _dp_jobs(theta, on_device, sources, sigmas, [0, 1]))
        assert theta.device.type == device
        rows[device] = theta.cpu()
    flat.module.to("cpu")
    torch.testing.assert_close(rows["cuda"], rows["cpu"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_dp_step_is_a_mean_gradient_whatever_the_client_size(engine):
    """Every record repeated 4 times is the same data distribution: at q = 1 with a large clip
    and negligible noise, the step equals the original client's (it was 4x as long when every
    client divided by one expected batch q * train_per_client)."""
    flat = FlatModel(make_model("mlp", seed=0))
    (x, y), = _clients([12])
    data = [(x, y), (x.repeat(4, 1, 1, 1), y.repeat(4))]
    cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=12, local_epochs=1)
    start = _matrix(flat, 1).expand(2, -1).clone()
    theta = start.clone()
    oracle = DPGradient(flat.module, 1e3, 1.0, 12.0, ReproducibleNoise(0))
    sources = [ReproducibleNoise(7 + i) for i in range(2)]
    if engine == "loop":
        ws = Workspace.for_size(flat.num_params)
        for i, (xi, yi) in enumerate(data):
            oracle.select(1e-9, sources[i])
            local_train(flat, theta[i], xi, yi, cfg, oracle, torch.Generator(), ws)
    else:
        jobs = [ClientJob(i, theta[i], xi, yi, torch.Generator(), noise=sources[i],
                          noise_multiplier=1e-9) for i, (xi, yi) in enumerate(data)]
        assert train_clients(flat, cfg, oracle, jobs).steps == {0: 1, 1: 1}
    moved = theta - start
    assert float(moved[0].norm()) > 1e-3
    torch.testing.assert_close(moved[1], moved[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("lam", "named"), [
    (1e30, r"pull diverged: lr \* lambda = 5e\+28 >= 2"),  # diverges while training
    (1e40, r"pull diverged: lr \* lambda = 5e\+38 >= 2"),  # beyond float32: said before training
], ids=["diverging", "overflowing-float32"])
def test_a_diverging_pull_is_named_by_both_engines(lam, named):
    """lr * lambda >= 2 makes FEDORA's pull diverge: both engines say so and keep the rows
    (a weight beyond float32's range: the loop says so before training, as the batched
    engine does after)."""
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([16])
    theta = _matrix(flat, 1)
    phi = theta + 1.0
    before = theta.clone()
    with pytest.raises(ClientUpdateError, match=r"client 0: .*" + named):
        local_train(flat, theta[0], *data[0], CFG_PLAIN, PlainGradient(16), torch.Generator(),
                    Workspace.for_size(flat.num_params), phi=phi[0], lam=lam, client=0)
    assert torch.equal(theta, before)
    with pytest.raises(BatchedTrainingError, match=named):
        train_clients(flat, CFG_PLAIN, PlainGradient(16), _jobs(theta, data, phi=phi, lams=[lam]))
    assert torch.equal(theta, before)


def test_a_pull_overflowing_float32_from_a_huge_start_gets_one_cause_from_both_engines():
    """An earlier round's unstable pull leaves theta huge (finite, but its loss is not) and the
    next noised lambda makes lr * lambda overflow float32. The loop tagged the pull ("(FEDORA's
    pull diverged: "), which a Flower client's withheld error text states as meaning that the
    loss at the start was finite, here untrue; the batched engine blamed the start alone,
    without the pull (found by a generated config: DP-FEDORA, private validation, epsilon
    0.05, engine "batched"). Both now name the non-finite start first and the unstable pull
    with its remedy, untagged, and keep the row."""
    flat = FlatModel(make_model("mlp", seed=0))
    data = _clients([16])
    theta = _matrix(flat, 1) * 1e20
    phi = theta + 1.0
    before = theta.clone()
    named = (r"the pull's weight overflows torch.float32.*already non-finite at the start of "
             r"training.*FEDORA's pull is unstable too \(lr \* lambda = 5e\+38 >= 2\).*"
             r"fedora.max_pull = 1")
    with pytest.raises(ClientUpdateError, match=named) as loop:
        local_train(flat, theta[0], *data[0], CFG_PLAIN, PlainGradient(16), torch.Generator(),
                    Workspace.for_size(flat.num_params), phi=phi[0], lam=1e40, client=0)
    with pytest.raises(BatchedTrainingError, match=named) as batched:  # its own module: the
        # loop's check bound this one to a huge row, which its engine probe would refuse
        train_clients(FlatModel(make_model("mlp", seed=0)), CFG_PLAIN, PlainGradient(16),
                      _jobs(theta, data, phi=phi, lams=[1e40]))
    for err in (loop, batched):
        assert "(FEDORA's pull diverged: " not in str(err.value)
    assert torch.equal(theta, before)


_CAUSES = ("pull's weight overflows", "(FEDORA's pull diverged: ", "pull is unstable too",
           "already non-finite at the start", "lower training.lr")


def _outcome(train):
    """None when ``train()`` succeeds, else which of :data:`_CAUSES` its error names."""
    try:
        train()
    except ClientUpdateError as err:
        return tuple(cause in str(err) for cause in _CAUSES)
    return None


@settings(max_examples=30, derandomize=True, deadline=None, database=None)
@given(start=st.sampled_from([1.0, 1e15, 1e20]), inputs=st.sampled_from([1.0, 1e30]),
       lam=st.sampled_from([0.0, 1.0, 1e3, 1e30, 1e40]), lr=st.sampled_from([0.05, 1.0, 30.0]))
def test_both_engines_train_or_name_the_same_cause(start, inputs, lam, lr):
    """Whatever the start's scale, the inputs' scale, lambda and lr: the loop and the batched
    engine both train, or both refuse naming the same cause (the pull, a non-finite start, the
    learning rate), and neither changes the row it refused."""
    flat = FlatModel(make_model("mlp", seed=0))
    (x, y), = _clients([8])
    x = x * inputs
    cfg = TrainConfig(lr=lr, momentum=0.0, weight_decay=0.0, batch_size=8, local_epochs=1)
    theta = _matrix(flat, 1) * start
    phi = theta + 1.0
    loop_row, batched_row = theta.clone(), theta.clone()
    loop = _outcome(lambda: local_train(
        flat, loop_row[0], x, y, cfg, PlainGradient(8), torch.Generator().manual_seed(0),
        Workspace.for_size(flat.num_params), phi=phi[0], lam=lam))
    batched = _outcome(lambda: train_clients(  # its own module, probed unbound
        FlatModel(make_model("mlp", seed=0)), cfg, PlainGradient(8), _jobs(batched_row, [(x, y)], phi=phi, lams=[lam]),
        engine="auto"))
    assert batched == loop
    if loop is not None:
        assert torch.equal(loop_row, theta) and torch.equal(batched_row, theta)


@pytest.mark.parametrize(("scale", "lr", "named"), [
    (1e30, 0.05, r"squared norm of the loss's gradient is already non-finite at the start of "
                 r"training, before any step \(so the learning rate is not the cause\).*scale the features"),
    (1e38, 0.05, r"the loss is already non-finite at the start of training"),
    (1.0, 1e30, r"\(training diverged: lower training.lr"),  # finite at the start: a real divergence
], ids=["inputs-x1e30", "inputs-x1e38", "lr-1e30"])
def test_inputs_too_large_for_float32_are_named_by_both_engines_not_the_lr(scale, lr, named):
    """Inputs scaled x1e30 were refused as "training diverged: lower training.lr", which no lr
    fixes: a loss, gradient or gradient norm already non-finite before the first step now names
    the inputs' scale; a divergence from a finite start keeps the lr message. Rows are kept."""
    flat = FlatModel(make_model("mlp", seed=0))
    (x, y), = _clients([16])
    data = [(x * scale, y)]
    cfg = TrainConfig(lr=lr, momentum=0.0, weight_decay=0.0, batch_size=16, local_epochs=2)
    theta = _matrix(flat, 1)
    before = theta.clone()
    with pytest.raises(ClientUpdateError, match=r"client 0: local training produced non-finite "
                       r"parameters; update discarded .*" + named) as err:
        local_train(flat, theta[0], *data[0], cfg, PlainGradient(16), torch.Generator(),
                    Workspace.for_size(flat.num_params), client=0)
    assert ("lower training.lr" in str(err.value)) == (scale == 1.0)
    assert torch.equal(theta, before)
    with pytest.raises(ClientUpdateError, match=named):  # whichever engine train_clients picks
        train_clients(flat, cfg, PlainGradient(16), _jobs(theta, data))
    assert torch.equal(theta, before)


def _batchnorm_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16, track_running_stats=False),
                         nn.ReLU(), nn.Linear(16, 10))


def _trained_by_the_loop(flat):
    """Train clients of 24, 13 and 6 rows with batches of 8: the engine must choose the loop,
    and the parameters equal the per-client loop's exactly. Returns the outcome."""
    data = _clients([24, 13, 6], shape=(1, 8, 8))
    theta = _matrix(flat, 3)
    reference = theta.clone()
    _loop(flat, CFG_FULL, PlainGradient(8), reference, data)
    outcome = train_clients(flat, CFG_FULL, PlainGradient(8), _jobs(theta, data))
    assert outcome.engine == "loop"
    assert torch.equal(theta, reference)
    return outcome


def test_a_model_that_mixes_the_samples_of_a_batch_is_not_batched_and_equals_the_loop():
    """BatchNorm without running statistics: a smaller client's batch, padded by the engine,
    would change its statistics; the probe sees it and the loop trains every client."""
    flat = FlatModel(_batchnorm_mlp())
    outcome = _trained_by_the_loop(flat)
    assert "padded batch" in outcome.reason and "BatchNorm1d" in outcome.reason


class _CenteredFrom(nn.Module):
    """Subtracts the batch mean from batches of at least ``rows`` rows."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, h):
        return h - h.mean(dim=0, keepdim=True) if h.shape[0] >= self.rows else h


@pytest.mark.parametrize("rows", [5, 8])
def test_a_model_mixing_only_larger_batches_is_probed_at_the_training_batch_size(rows):
    """The engines were probed on batches of 3 rows plus the padding row, so a model mixing
    the rows of batches of 5 (or 8) or more was batched with vmap, and a smaller client's
    batches, padded to 8, mixed the padding in: rows differed from the loop by up to 0.02.
    The probe now fills a training batch; the loop trains."""
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), _CenteredFrom(rows), nn.ReLU(),
                                   nn.Linear(16, 10)))
    outcome = _trained_by_the_loop(flat)
    assert "padded batch" in outcome.reason


def test_a_plan_probed_at_a_small_batch_is_not_reused_for_a_larger_one():
    """The plan was cached per model and oracle kind: a second plain oracle with a larger batch
    reused the plan probed at the first one's batch size, so a model mixing only the rows of
    the larger batches was batched with vmap (padding mixed in). Now each batch size is probed."""
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), _CenteredFrom(5), nn.ReLU(),
                                   nn.Linear(16, 10)))
    data = _clients([24, 13, 6], shape=(1, 8, 8))
    small = train_clients(flat, CFG_FULL, PlainGradient(4), _jobs(_matrix(flat, 3), data))
    assert small.engine == "vmap", small.reason
    theta = _matrix(flat, 3)
    reference = theta.clone()
    _loop(flat, CFG_FULL, PlainGradient(8), reference, data)
    outcome = train_clients(flat, CFG_FULL, PlainGradient(8), _jobs(theta, data))
    assert outcome.engine == "loop" and "padded batch" in outcome.reason
    assert torch.equal(theta, reference)


def test_a_linear_layer_before_the_flatten_is_batched_with_vmap_and_matches_the_loop():
    """nn.Linear acts on the last input dimension of a (B, 1, 8, 8) batch: the linear engine
    (which reads each sample as a vector) fails its probe, and the vmap engine trains it."""
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Flatten(), nn.Linear(32, 10)))
    data = _clients([24, 13], shape=(1, 8, 8))
    theta = _matrix(flat, 2)
    reference = theta.clone()
    _loop(flat, CFG_FULL, PlainGradient(8), reference, data)
    outcome = train_clients(flat, CFG_FULL, PlainGradient(8), _jobs(theta, data))
    assert outcome.engine == "vmap", outcome.reason
    x, y = data[0]
    assert "linear engine failed its probe" in batched_plan(flat, PlainGradient(8), x[:3], y[:3]).reason
    _assert_rows_close(theta, reference)
    # on inputs that are vectors per sample, the same layers are the linear engine's
    flat_rows = FlatModel(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 10)))
    x, y = torch.rand(5, 8), torch.randint(0, 10, (5,))
    assert batched_plan(flat_rows, PlainGradient(4), x, y).engine == "linear"


def test_new_data_where_a_freed_tensor_was_is_gathered_again():
    """The gathered data was reused by the source tensors' address, version and shape: a new
    tensor at a freed one's address (here: the same numpy buffer refilled, as the allocator
    hands out freed memory again) trained on the old data, silently."""
    import numpy as np

    flat = FlatModel(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    rng = np.random.default_rng(0)
    buffer = rng.normal(size=(8, 6)).astype(np.float32)
    y = torch.arange(8) % 3
    for _ in range(2):
        x = torch.from_numpy(buffer)
        theta = flat.initial_vector().repeat(1, 1)
        expected = theta.clone()
        train_clients(flat, CFG_PLAIN, PlainGradient(4), [ClientJob(0, theta[0], x, y, torch.Generator().manual_seed(0))])
        local_train(flat, expected[0], x, y, CFG_PLAIN, PlainGradient(4), torch.Generator().manual_seed(0),
                    Workspace.for_size(flat.num_params))
        _assert_rows_close(theta, expected)
        del x
        buffer[:] = rng.normal(size=buffer.shape)  # new data, same address


def test_gathered_data_of_changing_participants_does_not_pile_up():
    """Every call's gathered data was kept until 256 gathers: under partial participation
    (other participants every round) memory grew round by round to 256 copies of a round's
    data. Now at most twice what the largest call gathered is kept; a round with the same
    participants still reuses its gathers."""
    from secure_fedora.learning import batched

    flat = FlatModel(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    data = [(torch.randn(10, 6), torch.arange(10) % 3) for _ in range(12)]
    theta = flat.initial_vector().repeat(12, 1)
    for rnd in range(12):
        members = [rnd, (rnd + 5) % 12]
        jobs = [ClientJob(i, theta[i], *data[i], torch.Generator().manual_seed(i)) for i in members]
        train_clients(flat, CFG_PLAIN, PlainGradient(4), jobs)
    scratch = batched._SCRATCH[flat]
    assert len(scratch.data) <= 2
    kept = list(scratch.data.values())[-1][0]
    train_clients(flat, CFG_PLAIN, PlainGradient(4),
                  [ClientJob(i, theta[i], *data[i], torch.Generator().manual_seed(i)) for i in members])
    assert list(scratch.data.values())[-1][0] is kept


def test_a_mixture_with_a_proximal_term_is_the_same_in_the_loop_and_batched():
    """The loop path put the proximal term inside the mixture (at the mixed row, scaled by
    alpha, and part of alpha's step) where the batched engine and ClientJob's definition
    add it after: the rows (here by 0.03) and alpha differed."""
    flat = FlatModel(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.arange(12) % 3
    base = flat.initial_vector()
    w = base + 0.3 * torch.randn(base.shape, generator=g)
    out = {}
    for engine in ("loop", "auto"):
        theta = base.clone().repeat(1, 1)
        job = ClientJob(0, theta[0], x, y, torch.Generator().manual_seed(0), anchor=base - 0.5, mu=1.0,
                        mix_with=w, mix_alpha=0.4, mix_adaptive=True, mix_lr=0.5)
        outcome = train_clients(flat, CFG_PLAIN, PlainGradient(4), [job], engine=engine)
        out[engine] = theta, outcome.alphas[0], outcome.engine
    assert out["auto"][2] == "linear" and out["loop"][2] == "loop"
    _assert_rows_close(out["loop"][0], out["auto"][0])
    assert out["loop"][1] == pytest.approx(out["auto"][1], abs=1e-5)


def test_clients_without_samples_train_as_in_the_loop_whatever_the_model():
    """With no sample to probe, the linear engine was taken on the model's structure alone:
    a Linear before the Flatten (which it reads in another shape) raised a ClientUpdateError
    where the loop trains (weight decay and the pull still move the rows)."""
    flat = FlatModel(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)))
    x, y = torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long)
    theta = _matrix(flat, 2)
    reference = theta.clone()
    phi = torch.zeros_like(theta)
    _loop(flat, CFG_FULL, PlainGradient(2), reference, [(x, y)] * 2, phi=phi, lams=[0.5, 0.5])
    outcome = train_clients(flat, CFG_FULL, PlainGradient(2),
                            _jobs(theta, [(x, y)] * 2, phi=phi, lams=[0.5, 0.5]))
    assert outcome.engine == "loop" and "no probe data" in outcome.reason
    _assert_rows_close(theta, reference)


@pytest.mark.parametrize("at", [3, 0], ids=["after-the-probe-rows", "a-probe-row"])
@pytest.mark.parametrize("engine", ["linear", "vmap"])
def test_dp_clips_a_finite_gradient_whose_squared_norm_overflows_to_c_in_both_engines(engine, at):
    """A record of entries 1e19 has a finite per-sample gradient whose squared norm overflows
    float32: both engines gave it the factor C / inf = 0 (it added nothing). Now the batched
    engine and the loop both add it at norm C in its gradient's direction: the step is the
    per-sample autograd gradients each clipped with its float64 norm. Among the rows the
    engines are probed with, it does not send the run to the loop."""
    shape = (1, 4, 4) if engine == "linear" else (1, 8, 8)
    flat = FlatModel(make_model("mlp", seed=0, input_shape=shape) if engine == "linear"
                     else _examples_cnn())
    (x, y), = _clients([4], shape=shape)
    x[at] = 1e19
    clip = 0.5
    cfg = TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0, batch_size=4, local_epochs=1)
    start = _matrix(flat, 1)
    module = flat.bind(start[0].clone())
    with torch.no_grad():  # a label the saturated softmax gets wrong: a gradient that is not 0
        y[at] = module(x[at:at + 1]).argmin()
    want = torch.zeros(flat.num_params, dtype=torch.float64)
    for i in range(4):
        loss = nn.functional.cross_entropy(module(x[i:i + 1]), y[i:i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(module.parameters()))])
        assert bool(torch.isfinite(g).all())
        norm = float(g.double().norm())
        if i == at:
            assert norm > clip and not torch.isfinite((g * g).sum())
        want += g.double() * min(1.0, clip / (norm + 1e-6))
    want = -want / 4  # lr 1, divided by q * n = 4
    oracle = DPGradient(flat.module, clip, 1.0, 4.0, ReproducibleNoise(0))
    batched, loop = start.clone(), start.clone()
    job = ClientJob(0, batched[0], x, y, torch.Generator(), noise=ReproducibleNoise(3),
                    noise_multiplier=1e-9)
    outcome = train_clients(flat, cfg, oracle, [job])
    assert outcome.engine == engine, outcome.reason
    assert outcome.steps == {0: 1}
    oracle.select(1e-9, ReproducibleNoise(3))
    local_train(flat, loop[0], x, y, cfg, oracle, torch.Generator(), Workspace.for_size(flat.num_params))
    torch.testing.assert_close((batched - start)[0].double(), want, atol=1e-6, rtol=1e-4)
    _assert_rows_close(batched, loop)


class _TwoLinears(nn.Module):
    """Linear -> Tanh -> Linear, not a Sequential: the batched engine trains it by vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _one_dp_step(flat: FlatModel, clip: float, engine: str, x: torch.Tensor, y: torch.Tensor,
                 start: torch.Tensor) -> torch.Tensor:
    """The (1, P) parameters after one DP-SGD step of ``engine`` ("loop-opacus", "loop" or
    a batched engine's name) from ``start``: lr 1, all 6 rows of one client in the batch,
    noise multiplier 1e-9; checks that engine trained and took the one step."""
    oracle = DPGradient(flat.module, clip, 1.0, 6.0, ReproducibleNoise(0))
    if engine == "loop-opacus":
        oracle.dpsgd.close()
        oracle.dpsgd = DPSGD(flat.module, clip, 1.0, 6.0, ReproducibleNoise(0), mode="opacus")
    cfg = TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0, batch_size=6, local_epochs=1)
    theta = start.clone()
    job = ClientJob(0, theta[0], x, y, torch.Generator(), noise=ReproducibleNoise(3),
                    noise_multiplier=1e-9)
    outcome = train_clients(flat, cfg, oracle, [job],
                            engine="loop" if engine.startswith("loop") else "auto")
    assert outcome.engine == engine.split("-")[0], outcome.reason
    assert outcome.steps == {0: 1}
    return theta


@pytest.mark.parametrize("at", [4, 0], ids=["after-the-probe-rows", "a-probe-row"])
@pytest.mark.parametrize("engine", ["linear", "vmap", "loop-fused", "loop-opacus"])
def test_dp_clips_a_gradient_entry_that_overflows_float32_alike_in_every_engine(engine, at):
    """A record whose weight-gradient entry ``g_k a_j`` overflows float32 (input 1e36,
    backpropagated value 1e10, both finite): the vmap engine and Opacus formed it as inf and
    the update was refused as non-finite, while the fused paths (the linear engine, the loop's
    fused DP-SGD) gave it a float32 factor of 0 and dropped it. Every engine now adds it at
    norm C in its direction: the step is the per-sample float64 autograd gradients, each
    clipped; a probe row that overflows does not send the run to the loop. The huge input meets
    weights of 0: weights cancelling on a row ``(v, v)`` left fc1's output to the BLAS kernel's
    rounding of ``w v - w v`` (the bias, 0, or 1.5e28 with AVX-512 FMA, saturating the tanh),
    so the engines (addmm, bmm) and the reference disagreed on some CPUs."""
    torch.manual_seed(0)
    module = (nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
              if engine == "linear" else _TwoLinears())
    with torch.no_grad():  # the tanh is not saturated on (x_0, 1e36); a backprop of 1e10 into it
        weights = list(module.parameters())
        weights[0][:, 1] = 0.0
        weights[2].mul_(1e10)
    flat = FlatModel(module)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, generator=g), torch.randint(0, 3, (6,), generator=g)
    x[at, 1] = 1e36
    clip = 0.5
    start = torch.cat([p.detach().reshape(-1) for p in flat.params]).unsqueeze(0)
    bound = flat.bind(start[0].clone())
    with torch.no_grad():  # a label the model gets wrong: a loss gradient that is not 0
        y[at] = bound(x[at:at + 1]).argmin()
    raw = torch.autograd.grad(nn.functional.cross_entropy(bound(x[at:at + 1]), y[at:at + 1]),
                              list(bound.parameters()))
    assert not bool(torch.isfinite(raw[0]).all())  # fc1's entries g_k 1e36 overflow float32
    wide = copy.deepcopy(bound).double()
    want = torch.zeros(flat.num_params, dtype=torch.float64)
    for i in range(6):
        loss = nn.functional.cross_entropy(wide(x[i:i + 1].double()), y[i:i + 1])
        grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(wide.parameters()))])
        want += grad * min(1.0, clip / (float(grad.norm()) + 1e-6))
    want = -want / 6  # lr 1, divided by q * n = 6
    theta = _one_dp_step(flat, clip, engine, x, y, start)
    torch.testing.assert_close((theta - start)[0].double(), want, atol=1e-6, rtol=1e-5)


class _ReluLinears(_TwoLinears):
    """Linear -> ReLU -> Linear (not saturating: a huge input overflows the activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _OverPositions(_TwoLinears):
    """Each row read as pairs (positions) through Linear -> Tanh -> Linear, logits summed
    over the positions: fc1's weight gradient is a sum of products over positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.view(x.shape[0], -1, 2)))).sum(dim=1)


class _NanFeatures(nn.Module):
    """``log(1 + x)`` of each input (NaN below -1), then Linear -> Tanh -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _TwoLinears()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.log1p(x))


def _extreme_case(case: str, engine: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model and 6 rows of which row 4 (and row 1 in "mixed") is extreme."""
    torch.manual_seed(0)
    relu = case in ("activation-overflow", "huge-parameters", "mixed")
    if case == "positions-beyond-2^-128":
        module: nn.Module = _OverPositions()
    elif case == "model-nan":
        module = _NanFeatures()
    elif engine == "linear":
        module = nn.Sequential(nn.Linear(2, 4), nn.ReLU() if relu else nn.Tanh(), nn.Linear(4, 3))
    else:
        module = _ReluLinears() if relu else _TwoLinears()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64 if case.startswith("positions") else 2, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    w1, b1, w2, b2 = module.parameters()
    with torch.no_grad():
        if case == "activation-overflow":  # fc1's outputs overflow float32 (6e38)
            w1.fill_(1.0)
            x[4] = 3e38
        elif case == "backprop-overflow":  # logits +-2.3e38: the loss and fc1's G overflow
            w1.zero_(), b1.fill_(1.0), w2.zero_(), b2.zero_()
            w2[0, 0], w2[1, 0], y[4] = 3e38, -3e38, 1
        elif case == "positions-beyond-2^-128":  # 32 products of 3e38 * 1e38: beyond 2^-128
            w1.zero_(), b1.zero_(), b2.zero_(), w2.fill_(1e38)
            w2[1].fill_(-1e38)
            x[4] = 3e38
        elif case == "huge-parameters":
            w1.fill_(1e38)
            x.abs_()
        elif case == "model-nan":
            x[4] = -3.0
        elif case == "mixed":  # a weight-gradient entry 1e46 (row 1), an activation inf (row 4)
            w1[:, 1], w1[0, 0] = 0.0, 2.0  # no huge products that cancel (kernel-dependent)
            w2.mul_(1e10)
            x[1, 1], x[4, 0], y[1] = 1e36, 3e38, 0  # row 1's logits favour class 2
    return module, x, y


def _clipped_or_zero(module: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """The rule, from per-sample float32 autograd: each gradient (its loss scaled as DP-SGD
    scales it where an entry overflows) clipped in float64, the zero vector where it is
    still not finite; summed."""
    params = list(module.parameters())
    want = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(x.shape[0]):
        def gradient(scale: float | None = None, i: int = i) -> list[torch.Tensor]:
            loss = nn.functional.cross_entropy(module(x[i:i + 1]), y[i:i + 1])
            return list(torch.autograd.grad(loss if scale is None else loss * scale, params))

        pieces, scale = gradient(), 1.0
        if not all(bool(torch.isfinite(p).all()) for p in pieces):
            found = rescaled_gradient(gradient)
            if found is None:
                continue  # no direction: the zero vector
            pieces, scale = found
        grad = torch.cat([p.reshape(-1) for p in pieces]).double() / scale
        want += grad * min(1.0, clip / (float(grad.norm()) + 1e-6))
    return want


_EXTREME_CASES = [(engine, case) for case in (
    "activation-overflow", "backprop-overflow", "positions-beyond-2^-128", "huge-parameters",
    "model-nan", "mixed") for engine in ("linear", "vmap", "loop-fused", "loop-opacus")
    if engine != "linear" or case not in ("positions-beyond-2^-128", "model-nan")]


@pytest.mark.parametrize(("engine", "case"), _EXTREME_CASES)
def test_every_engine_treats_an_extreme_per_sample_gradient_by_one_rule(engine, case):
    """Before: a sample whose activations overflow float32 (or whose model gives NaN) made
    every engine's update non-finite (refused after the step had drawn its noise); a
    backpropagated value overflowing float32 was scaled away by Opacus and vmap but made the
    fused paths' update non-finite; a sum over positions beyond 2^-128 was refused by all.
    The rule, in every engine: a per-sample gradient is computed in float32, its loss scaled
    by the first power of two of LOSS_SCALES making it finite, and clipped to C in float64; one
    still not finite contributes the zero vector. The update is finite and equals that sum."""
    module, x, y = _extreme_case(case, engine)
    clip = 0.5
    want = -_clipped_or_zero(copy.deepcopy(module), x, y, clip) / 6  # lr 1, q * n = 6
    flat = FlatModel(module)
    start = torch.cat([p.detach().reshape(-1) for p in flat.params]).unsqueeze(0)
    theta = _one_dp_step(flat, clip, engine, x, y, start)
    assert bool(torch.isfinite(theta).all())
    # the reference step applied as the engines apply it (parameters of 1e38 do not move)
    expected = (start[0].double() + want).float()
    torch.testing.assert_close((theta[0] - start[0]).double(), (expected - start[0]).double(),
                               atol=1e-6, rtol=1e-5)


class _LogFeatures(nn.Module):
    """Reads each input as a log-feature, ``log(1 + x)``: NaN where one is below -1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)


def _log_model() -> FlatModel:
    torch.manual_seed(0)
    return FlatModel(nn.Sequential(nn.Flatten(), _LogFeatures(), nn.Linear(16, 3)))


def test_under_dp_the_engine_choice_reads_nothing_of_the_clients_rows():
    """Under DP the engines were probed on the first client's first 3 training rows, so
    whether a run was batched (results.json's training_engine) depended on private records:
    a log-feature model was batched on positive rows and sent to the loop when a probe row
    held a value below -1. The DP probe is now 3 synthetic rows of the data's shape and
    dtype: the same plan whatever the rows hold (the plain oracle still probes real rows)."""
    g = torch.Generator().manual_seed(0)
    positive = (torch.rand(5, 1, 4, 4, generator=g) + 0.1, torch.randint(0, 3, (5,), generator=g))
    negative = (positive[0][:4] - 3.0, positive[1][:4].flip(0))
    plans = []
    for x, y in (positive, negative):
        flat = _log_model()  # plans are cached per model
        oracle = DPGradient(flat.module, 1.0, 0.5, 4.0, ReproducibleNoise(0))
        probe = engine_probe([(x, y)], oracle)
        assert probe is not None
        px, py = probe
        assert px.shape == (3, 1, 4, 4) and px.dtype == x.dtype and py.shape == (3,)
        assert py.dtype == y.dtype
        assert not any(torch.equal(row, real) for row in px for real in x)
        plan = batched_plan(flat, oracle, px, py)
        plans.append((plan.engine, plan.reason))
    assert plans[0] == plans[1] and plans[0][0] == "vmap"
    empty = engine_probe([(positive[0][:0], positive[1][:0])], oracle)  # the shape suffices
    assert empty is not None and torch.equal(empty[0], px) and torch.equal(empty[1], py)
    assert engine_probe([], oracle) is None
    real = engine_probe([negative], PlainGradient(4))
    assert real is not None and torch.equal(real[0], negative[0][:3])
