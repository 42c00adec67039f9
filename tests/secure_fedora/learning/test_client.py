"""The client update: flat-parameter binding, fused SGD, proximal pull, bad updates."""

import pytest
import torch
from torch import nn

from secure_fedora.core.config import local_divergence_problem, pull_stability_limit
from secure_fedora.learning.client import (
    ALIGNMENT_BYTES,
    ClientUpdateError,
    FlatModel,
    MomentumSGD,
    PlainGradient,
    TrainConfig,
    Workspace,
    client_randomness,
    diverged_hint,
    evaluate,
    local_train,
    proximal_pull_,
)
from secure_fedora.learning.models import make_model


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_fused_sgd_matches_torch_optim_sgd():
    x, y = _data()
    cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8, local_epochs=2)
    reference = make_model("mlp", seed=3)
    flat = FlatModel(make_model("mlp", seed=3))
    theta = flat.initial_vector()
    steps = local_train(flat, theta, x, y, cfg, PlainGradient(8), torch.Generator().manual_seed(5),
                        Workspace.for_size(flat.num_params))
    assert steps == 10
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        for idx in torch.randperm(40, generator=gen).split(8):
            opt.zero_grad()
            nn.functional.cross_entropy(reference(x[idx]), y[idx]).backward()
            opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.allclose(theta, expected, atol=1e-6)


def test_plain_gradient_clipping_bounds_the_batch_gradient_norm():
    x, y = _data()
    flat = FlatModel(make_model("mlp", seed=0))
    theta = flat.initial_vector()
    free, clipped = torch.zeros(flat.num_params), torch.zeros(flat.num_params)
    PlainGradient(8).gradient(flat.bind(theta, free), x * 50, y, free)
    PlainGradient(8, max_grad_norm=0.1).gradient(flat.bind(theta, clipped), x * 50, y, clipped)
    assert free.norm() > 0.1
    assert clipped.norm() == pytest.approx(0.1, rel=1e-5)
    # a rescaling, never a change of direction
    assert torch.allclose(clipped / clipped.norm(), free / free.norm(), atol=1e-6)
    loose = torch.zeros(flat.num_params)
    PlainGradient(8, max_grad_norm=1e9).gradient(flat.bind(theta, loose), x * 50, y, loose)
    assert torch.equal(loose, free)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_plain_gradient_refuses_bad_clip(bad):
    with pytest.raises(ClientUpdateError, match="max_grad_norm"):
        PlainGradient(8, max_grad_norm=bad)


def test_proximal_pull_moves_toward_phi():
    x, y = _data()
    cfg = TrainConfig(lr=0.01, batch_size=8, local_epochs=1)
    flat = FlatModel(make_model("mlp", seed=0))
    start = flat.initial_vector()
    phi = start.clone()  # pulling toward the start: a proximal term must keep theta closer to it
    free = start.clone()
    pulled = start.clone()
    ws = Workspace.for_size(flat.num_params)
    local_train(flat, free, x, y, cfg, PlainGradient(8), torch.Generator().manual_seed(1), ws)
    local_train(flat, pulled, x, y, cfg, PlainGradient(8), torch.Generator().manual_seed(1), ws,
                phi=phi, lam=5.0)
    assert (pulled - phi).norm() < (free - phi).norm()


def test_pulled_training_equals_steps_followed_by_proximal_pull_bit_for_bit():
    x, y = _data()
    cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8, local_epochs=2)
    flat = FlatModel(make_model("mlp", seed=3))
    start = flat.initial_vector()
    phi = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(2))
    theta = start.clone()
    local_train(flat, theta, x, y, cfg, PlainGradient(8), torch.Generator().manual_seed(5),
                Workspace.for_size(flat.num_params), phi=phi, lam=0.7)
    expected = start.clone()
    ws = Workspace.for_size(flat.num_params)
    model = flat.bind(expected, ws.grad)
    oracle = PlainGradient(8)
    for index in oracle.batches(40, 2, torch.Generator().manual_seed(5)):
        oracle.gradient(model, x[index], y[index], ws.grad)
        before = expected.clone()
        ws.optimizer.step(expected, ws.grad, cfg)
        proximal_pull_(expected, before, phi, cfg.lr, 0.7)
    assert torch.equal(theta, expected)
    assert not torch.equal(theta, start)


def test_client_randomness_depends_on_the_client_stream_only_and_restores_the_global_one():
    dropout = nn.Dropout(0.5)
    x = torch.ones(64)
    client = torch.Generator().manual_seed(7)
    state = client.get_state()
    masks = []
    for earlier_draws in (0, 5):
        torch.manual_seed(123)
        torch.rand(earlier_draws)  # what other clients or methods drew before
        before = torch.get_rng_state()
        with client_randomness(client, torch.device("cpu")):
            masks.append(dropout(x))
        assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
        assert torch.equal(client.get_state(), state)  # the client's stream is not drawn
    assert torch.equal(masks[0], masks[1])
    client.manual_seed(8)
    with client_randomness(client, torch.device("cpu")):
        assert not torch.equal(dropout(x), masks[0])  # another stream state, other masks


def test_rows_are_trained_in_place_and_evaluate_does_not_modify():
    x, y = _data()
    flat = FlatModel(make_model("mlp", seed=0))
    matrix = flat.initial_vector().repeat(3, 1)
    before = matrix.clone()
    local_train(flat, matrix[1], x, y, TrainConfig(batch_size=8, local_epochs=1), PlainGradient(8),
                torch.Generator().manual_seed(0), Workspace.for_size(flat.num_params))
    assert torch.equal(matrix[0], before[0]) and torch.equal(matrix[2], before[2])
    assert not torch.equal(matrix[1], before[1])
    snapshot = matrix.clone()
    ev = evaluate(flat, matrix[1], x, y)
    assert 0.0 <= ev.accuracy <= 1.0 and ev.loss > 0
    assert torch.equal(matrix, snapshot)


def test_a_metric_that_is_no_number_is_reported_as_such_not_as_the_accuracy():
    """A task's metric that came out NaN (a plug-in scorer's) was replaced by the accuracy:
    the runtimes then reported accuracy under the metric's name. It stays NaN, so the
    runtimes' [0, 1] check leaves it out."""
    import math
    from dataclasses import dataclass

    from secure_fedora.learning.tasks import CROSS_ENTROPY, Task

    @dataclass(frozen=True)
    class NanScored(Task):
        def metric(self, outputs, targets):
            return math.nan

    x, y = _data()
    flat = FlatModel(make_model("mlp", seed=0),
                     NanScored("nan_scored", CROSS_ENTROPY.per_sample, "nan_score"))
    ev = evaluate(flat, flat.initial_vector(), x, y)
    assert 0.0 <= ev.accuracy <= 1.0
    assert math.isnan(ev.metric)


def test_non_finite_training_is_rejected_and_rolled_back():
    x, y = _data()
    flat = FlatModel(make_model("mlp", seed=0))
    theta = flat.initial_vector()
    start = theta.clone()
    with pytest.raises(ClientUpdateError, match="non-finite"):
        local_train(flat, theta, x, y, TrainConfig(lr=1e30, batch_size=8, local_epochs=3),
                    PlainGradient(8), torch.Generator().manual_seed(0), Workspace.for_size(flat.num_params))
    assert torch.equal(theta, start)


def test_bad_rows_and_regularization_are_rejected():
    flat = FlatModel(make_model("mlp", seed=0))
    with pytest.raises(ClientUpdateError, match="shape"):
        flat.bind(torch.zeros(10))
    x, y = _data()
    with pytest.raises(ClientUpdateError, match="regularization"):
        local_train(flat, flat.initial_vector(), x, y, TrainConfig(), PlainGradient(8),
                    torch.Generator(), Workspace.for_size(flat.num_params), phi=None, lam=1.0)
    with pytest.raises(ClientUpdateError, match="empty"):
        evaluate(flat, flat.initial_vector(), x[:0], y[:0])


def _rows_off_the_alignment(flat: FlatModel, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rows of one (count x P) matrix, as the in-process runtime holds them (row k starts
    k * P * 4 bytes in), rows starting 4 bytes off a boundary, and fresh copies of the same
    values (as a Flower node holds its own row)."""
    gen = torch.Generator().manual_seed(7)
    matrix = flat.initial_vector() + 0.05 * torch.randn(count, flat.num_params, generator=gen)
    odd = torch.empty(count * (flat.num_params + 1))
    stored = list(matrix) + [odd[k * (flat.num_params + 1) + 1: (k + 1) * (flat.num_params + 1)].copy_(matrix[k])
                             for k in range(count)]
    assert any(r.data_ptr() % ALIGNMENT_BYTES for r in stored)
    return stored, [r.clone() for r in stored]


def test_evaluate_depends_on_the_values_not_on_where_the_row_is_stored():
    """One-sample forwards round differently by address (the matmul kernels pick their path
    by it): a client's row inside the in-process matrix must evaluate to the same bits as the
    same values in a Flower node's own tensor (FEDORA's gate, IFCA's choice)."""
    flat = FlatModel(make_model("mlp", seed=0))
    stored, fresh = _rows_off_the_alignment(flat, 16)
    x, y = _data(n=1, seed=3)
    for row, copy in zip(stored, fresh, strict=True):
        assert evaluate(flat, row, x, y) == evaluate(flat, copy, x, y)


def test_a_row_off_the_alignment_is_rolled_back_when_training_diverges():
    flat = FlatModel(make_model("mlp", seed=0))
    matrix = flat.initial_vector().repeat(3, 1)
    assert matrix[1].data_ptr() % ALIGNMENT_BYTES
    before = matrix.clone()
    x, y = _data(n=16)
    with pytest.raises(ClientUpdateError, match="non-finite"):
        local_train(flat, matrix[1], x, y, TrainConfig(lr=1e30, batch_size=8, local_epochs=3),
                    PlainGradient(8), torch.Generator().manual_seed(0), Workspace.for_size(flat.num_params))
    assert torch.equal(matrix, before)


@pytest.mark.parametrize("num_classes", [10, 9])  # 9: an odd parameter count (118,153)
def test_training_depends_on_the_values_not_on_where_the_row_is_stored(num_classes):
    """A batch of one trains to different bits by the row's address (the matmul kernels pick
    their path by it): a client's row inside the in-process matrix, or one at a 4-byte offset
    (a matrix of a model with an odd parameter count), must train to the same bits as the same
    values in a Flower node's own tensor."""
    flat = FlatModel(make_model("mlp", num_classes=num_classes, seed=0))
    stored, fresh = _rows_off_the_alignment(flat, 6)
    x, y = _data(n=3, seed=3)
    y = y % num_classes
    phi = flat.initial_vector()
    cfg = TrainConfig(lr=0.05, batch_size=1, local_epochs=1)
    workspace = Workspace.for_size(flat.num_params)
    for k, (row, copy) in enumerate(zip(stored, fresh, strict=True)):
        for theta in (row, copy):
            local_train(flat, theta, x, y, cfg, PlainGradient(1), torch.Generator().manual_seed(k),
                        workspace, phi=phi, lam=0.5)
        assert torch.equal(row, copy), f"row {k} (offset {row.data_ptr() % ALIGNMENT_BYTES} bytes)"


class _RowHoldingGradient(PlainGradient):
    """An oracle that reads the trained row (as a proximal term does), without ``retarget``."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__(1)
        self.theta = theta

    def gradient(self, model, x, y, grad):
        super().gradient(model, x, y, grad)
        grad.add_(self.theta, alpha=0.1)


def test_an_oracle_holding_a_row_off_the_alignment_without_retarget_is_refused():
    """Trained as an aligned copy, such a row would be read stale by the oracle: refused
    before training, with what to add, and the row is untouched."""
    flat = FlatModel(make_model("mlp", seed=0))
    matrix = flat.initial_vector().repeat(3, 1)
    before = matrix.clone()
    x, y = _data(n=4)
    cfg = TrainConfig(batch_size=1, local_epochs=1)
    with pytest.raises(ClientUpdateError, match=r"_RowHoldingGradient.theta.*retarget\(old, new\)"):
        local_train(flat, matrix[1], x, y, cfg, _RowHoldingGradient(matrix[1]),
                    torch.Generator().manual_seed(0), Workspace.for_size(flat.num_params))
    assert torch.equal(matrix, before)
    # an aligned row is trained in place, so the same oracle reads it as it changes
    row = matrix[0]
    local_train(flat, row, x, y, cfg, _RowHoldingGradient(row), torch.Generator().manual_seed(0),
                Workspace.for_size(flat.num_params))
    assert not torch.equal(row, before[0])


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("fraction", [0.99, 1.0, 1.01])
def test_the_configs_local_step_bound_is_where_the_optimizer_stops_contracting(momentum, fraction):
    """The bound the config refuses at (core.config.local_divergence_problem) is the one of the
    update local_train runs: with weight decay alone (no data gradient), MomentumSGD shrinks
    theta below the bound and does not at or above it (there it settles at or grows from a
    multiple of its start)."""
    lr = 0.5  # a power of two: lr * weight_decay is fraction * bound exactly
    cfg = TrainConfig(lr=lr, momentum=momentum, weight_decay=fraction * 2 * (1 + momentum) / lr)
    theta = torch.ones(4, dtype=torch.float64)
    opt = MomentumSGD(4)
    opt.buffer = opt.buffer.double()
    for _ in range(300):
        opt.step(theta, torch.zeros(4, dtype=torch.float64), cfg)
    refused = local_divergence_problem(cfg.lr, cfg.momentum,
                                       {"training.weight_decay": cfg.weight_decay}) is not None
    assert refused == (fraction >= 1.0)
    assert (float(theta.abs().max()) < 1e-2) == (not refused)


@pytest.mark.parametrize(("lr", "weight_decay", "momentum"),
                         [(0.1, 3.0, 0.9), (0.1, 3.0, 0.0), (0.05, 10.0, 0.5), (0.1, 0.0, 0.9)])
def test_the_pull_stability_limit_is_the_one_of_the_local_step(lr, weight_decay, momentum):
    """FEDORA's pull acts outside the momentum, so with weight decay it diverges below
    lr * lambda = 2: at 2 - lr * wd / (1 + momentum) (1.842 at lr 0.1, wd 3, momentum 0.9).
    The local step (MomentumSGD then the pull, on the weight decay alone) shrinks theta - phi
    just below pull_stability_limit and grows it by orders of magnitude just above."""
    limit = pull_stability_limit(lr, momentum, weight_decay)
    assert limit == 2.0 - lr * weight_decay / (1.0 + momentum)
    assert (limit == 2.0) == (weight_decay == 0.0)
    cfg = TrainConfig(lr=lr, momentum=momentum, weight_decay=weight_decay)
    sizes = {}
    for pull in (limit - 0.01, limit + 0.01):
        phi = torch.zeros(4, dtype=torch.float64)  # the decay's anchor: theta - phi is theta
        theta = torch.ones(4, dtype=torch.float64)
        opt = MomentumSGD(4)
        opt.buffer = opt.buffer.double()
        for _ in range(2000):
            before = theta.clone()
            opt.step(theta, torch.zeros(4, dtype=torch.float64), cfg)
            proximal_pull_(theta, before, phi, lr, pull / lr)
        sizes[pull] = float(theta.abs().max())
    assert sizes[limit - 0.01] < 1e-3 and sizes[limit + 0.01] > 1e6, sizes


def test_the_divergence_message_names_a_pull_beyond_the_weight_decay_limit():
    """lr * lambda = 1.9 is below 2 but above the limit 1.842 of lr 0.1, weight decay 3,
    momentum 0.9: the pull is the cause (it said 'lower training.lr' only); without weight
    decay the limit is 2 and the message is as before."""
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=3.0)
    hint = diverged_hint(cfg, 19.0)
    assert hint.startswith("FEDORA's pull diverged: lr * lambda = 1.9 >= 2 - training.lr * "
                           "training.weight_decay / (1 + training.momentum) = "
                           f"{2 - 0.1 * 3.0 / 1.9!r}")
    assert "fedora.max_pull = 1" in hint
    assert "pull" not in diverged_hint(cfg, 18.0)  # 1.8: below the limit
    plain = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0)
    assert "pull" not in diverged_hint(plain, 19.0)
    assert diverged_hint(plain, 20.0).startswith("FEDORA's pull diverged: lr * lambda = 2 >= 2, ")


def test_an_infinite_lambda_names_the_validation_losses_not_the_lr():
    """lambda = inf (validation losses over 1,419 nats apart, e.g. DP training data x1e15) was
    reported as "lr * lambda = inf ... or lower training.lr", which no lr fixes: it now names
    the losses' gap and the inputs' scale, and keeps max_pull = 1 as the remedy."""
    hint = diverged_hint(TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0), float("inf"))
    assert hint.startswith("FEDORA's pull diverged: lambda = inf (the client's validation "
                           "losses differ by more than 1,419 nats")
    assert "fedora.max_pull = 1" in hint and "scale the features" in hint
    assert "lower training.lr" not in hint


def test_the_start_scale_diagnosis_leaves_the_training_split_as_it_was():
    """Its train-mode forward ran on a view of the client's stored training rows: a model
    writing its (train-mode) batch in place, accepted because training batches are copies,
    changed the stored data while the failure was being explained."""
    from secure_fedora.learning.client import start_scale_problem

    class ScalesWhenTraining(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                x.mul_(2.0)
            return self.linear(x)

    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3
    held, version = x.clone(), x._version
    flat = FlatModel(ScalesWhenTraining())
    assert start_scale_problem(flat, flat.initial_vector(), x, y) is None
    assert torch.equal(x, held) and x._version == version
