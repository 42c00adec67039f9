"""FEDORA's validation losses for many clients: each client's pair equals evaluate() bit for
bit and does not depend on which other clients the call holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secure_fedora.learning.client import ClientUpdateError, FlatModel, evaluate
from secure_fedora.learning.models import make_model
from secure_fedora.learning.tasks import resolve_task
from secure_fedora.learning.validation_losses import direct_path, validation_losses


def _rows(flat: FlatModel, count: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return flat.initial_vector() + scale * torch.randn(count, flat.num_params, generator=gen)


def _splits(sizes: list[int], shape: tuple[int, ...], seed: int, classes: int = 10):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen))
            for n in sizes]


def _assert_bitwise_evaluate(flat, theta, phi, splits, got) -> None:
    for k, (x, y) in enumerate(splits):
        assert got.local[k] == evaluate(flat, theta[k], x, y).loss, k
        assert got.received[k] == evaluate(flat, phi[k], x, y).loss, k


def test_mlp_losses_equal_evaluate_bit_for_bit_and_do_not_depend_on_the_other_clients() -> None:
    flat = FlatModel(make_model("mlp", seed=0))
    assert direct_path(flat, torch.rand(2, 1, 28, 28))[0]
    sizes = [10, 1, 17, 64, 3, 10, 1, 40, 2, 5]
    splits = _splits(sizes, (1, 28, 28), seed=1)
    theta = _rows(flat, len(sizes), seed=2)
    # phi close to theta (the near-tie of early rounds) on half the clients
    phi = theta + torch.where(torch.arange(len(sizes)).unsqueeze(1) % 2 == 0,
                              1e-7 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(3)),
                              0.05 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(4)))
    before = (theta.clone(), phi.clone())
    everyone = validation_losses(flat, list(theta), list(phi), splits)
    _assert_bitwise_evaluate(flat, theta, phi, splits, everyone)
    # one client per call (a Flower ClientApp), subsets, another order: the same bits
    for k in range(len(sizes)):
        alone = validation_losses(flat, [theta[k]], [phi[k]], [splits[k]])
        assert (alone.local[0], alone.received[0]) == (everyone.local[k], everyone.received[k])
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        subset = torch.randperm(len(sizes), generator=gen)[:4].tolist()
        part = validation_losses(flat, [theta[k] for k in subset], [phi[k] for k in subset],
                                 [splits[k] for k in subset])
        assert part.local == [everyone.local[k] for k in subset]
        assert part.received == [everyone.received[k] for k in subset]
    # the rows are not changed, the model is left in its mode
    assert torch.equal(theta, before[0]) and torch.equal(phi, before[1]) and flat.module.training


def test_identical_rows_give_identical_losses_so_lambda_is_zero() -> None:
    from secure_fedora.algorithms.fedora import regularization_weight

    flat = FlatModel(make_model("mlp", seed=0))
    splits = _splits([7, 1, 33], (1, 28, 28), seed=6)
    theta = _rows(flat, 3, seed=7)
    got = validation_losses(flat, list(theta), list(theta.clone()), splits)
    assert got.local == got.received
    assert all(regularization_weight(a, b) == 0.0 for a, b in zip(got.local, got.received, strict=True))


def test_split_larger_than_one_forward_batch_is_summed_as_evaluate_does() -> None:
    flat = FlatModel(make_model("mlp", seed=0, input_shape=(8,)))
    splits = _splits([4097, 5], (8,), seed=8)
    theta, phi = _rows(flat, 2, seed=9), _rows(flat, 2, seed=10)
    got = validation_losses(flat, list(theta), list(phi), splits)
    _assert_bitwise_evaluate(flat, theta, phi, splits, got)


def test_cnn_uses_the_module_itself_and_still_equals_evaluate() -> None:
    flat = FlatModel(make_model("cnn", seed=0))
    direct, reason = direct_path(flat, torch.rand(2, 1, 28, 28))
    assert not direct and "Conv2d" in reason
    splits = _splits([3, 1, 6], (1, 28, 28), seed=11)
    theta, phi = _rows(flat, 3, seed=12), _rows(flat, 3, seed=13)
    got = validation_losses(flat, list(theta), list(phi), splits)
    _assert_bitwise_evaluate(flat, theta, phi, splits, got)
    alone = validation_losses(flat, [theta[2]], [phi[2]], [splits[2]])
    assert (alone.local[0], alone.received[0]) == (got.local[2], got.received[2])


def test_a_module_the_direct_path_would_not_reproduce_is_called_itself() -> None:
    class Doubling(nn.Sequential):  # a Sequential subclass whose forward is not the sequence
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    flat = FlatModel(nn.Sequential(nn.Flatten(), Doubling(nn.Linear(6, 4), nn.Tanh()), nn.Linear(4, 3)))
    assert not direct_path(flat, torch.rand(2, 6))[0]
    splits = _splits([5, 2], (6,), seed=14, classes=3)
    theta, phi = _rows(flat, 2, seed=15), _rows(flat, 2, seed=16)
    _assert_bitwise_evaluate(flat, theta, phi, splits, validation_losses(flat, list(theta), list(phi), splits))


def test_bce_task_losses_equal_evaluate() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    flat = FlatModel(module, resolve_task("bce", False, None))
    gen = torch.Generator().manual_seed(17)
    splits = [(torch.rand(n, 5, generator=gen), torch.randint(0, 2, (n,), generator=gen).float())
              for n in (4, 9)]
    splits[0] = (splits[0][0], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    splits[1] = (splits[1][0], torch.cat([torch.tensor([0.0, 1.0]), splits[1][1][2:]]))
    theta, phi = _rows(flat, 2, seed=18), _rows(flat, 2, seed=19)
    _assert_bitwise_evaluate(flat, theta, phi, splits, validation_losses(flat, list(theta), list(phi), splits))


def test_bad_inputs_are_refused_naming_the_problem() -> None:
    flat = FlatModel(make_model("mlp", seed=0))
    splits = _splits([3, 2], (1, 28, 28), seed=20)
    theta = _rows(flat, 2, seed=21)
    with pytest.raises(ClientUpdateError, match="1 theta rows and 2 phi rows for 2"):
        validation_losses(flat, [theta[0]], list(theta), splits)
    with pytest.raises(ClientUpdateError, match="phi row 1 has shape"):
        validation_losses(flat, list(theta), [theta[0], theta[1][:5]], splits)
    with pytest.raises(ClientUpdateError, match="split 1: cannot evaluate on an empty split"):
        validation_losses(flat, list(theta), list(theta), [splits[0], (splits[1][0][:0], splits[1][1][:0])])
    with pytest.raises(ClientUpdateError, match="split 0 has 3 inputs but 2 targets"):
        validation_losses(flat, list(theta), list(theta), [(splits[0][0], splits[0][1][:2]), splits[1]])
    assert validation_losses(flat, [], [], []) == ([], [])


def test_losses_depend_on_the_values_not_on_where_the_rows_are_stored() -> None:
    """At one validation row a forward rounds differently by address: rows of the in-process
    matrix (row k starts k * P * 4 bytes in) must give the losses of the same values in fresh
    tensors (a Flower ClientApp's), or FEDORA's gate could flip between the runtimes."""
    flat = FlatModel(make_model("mlp", seed=0))
    splits = _splits([1] * 24, (1, 28, 28), seed=1)
    theta, phi = _rows(flat, 24, seed=2), _rows(flat, 24, seed=3)
    stored = validation_losses(flat, list(theta), list(phi), splits)
    fresh = validation_losses(flat, [t.clone() for t in theta], [p.clone() for p in phi],
                              [(x.clone(), y.clone()) for x, y in splits])
    assert stored == fresh


def test_rows_at_every_offset_from_the_boundary_equal_evaluate_in_one_call() -> None:
    """Rows stored 0, 4, ..., 60 bytes off the 64-byte boundary, in one call and in an order
    that alternates them (each off-boundary row is computed on a copy that the next one
    overwrites), with a split of two forward batches on an off-boundary row: every loss equals
    evaluate()'s and that of the same values in a fresh tensor, and no row is changed."""
    flat = FlatModel(make_model("mlp", seed=0))
    p = flat.num_params
    count = 16
    storage = torch.zeros(count * p + count)  # the gaps compared too: no NaN garbage
    theta_src, phi_src = _rows(flat, count, seed=30), _rows(flat, count, seed=31)
    # row k starts k * (p + 1) floats in: every offset mod 16 floats occurs once
    theta = [storage[k * (p + 1): k * (p + 1) + p] for k in range(count)]
    phi_storage = torch.zeros(count * p + count)  # the gaps compared too: no NaN garbage
    phi = [phi_storage[k * (p + 1): k * (p + 1) + p] for k in range(count)]
    for k in range(count):
        theta[k].copy_(theta_src[k])
        phi[k].copy_(phi_src[(k + 5) % count] if k % 3 else theta_src[k])  # some phi == theta
    assert sorted(t.data_ptr() % 64 for t in theta) == list(range(0, 64, 4))
    sizes = [1, 10, 4097, 2, 10, 1, 7, 10, 3, 1, 10, 5, 1, 10, 2, 9]
    splits = _splits(sizes, (1, 28, 28), seed=32)
    assert theta[2].data_ptr() % 64 and sizes[2] > 4096
    before = (storage.clone(), phi_storage.clone())
    got = validation_losses(flat, theta, phi, splits)
    _assert_bitwise_evaluate(flat, theta, phi, splits, got)
    fresh = validation_losses(flat, [t.clone() for t in theta], [q.clone() for q in phi], splits)
    assert got == fresh
    for k in range(count):
        if k % 3 == 0:
            assert got.local[k] == got.received[k]
    reverse = validation_losses(flat, theta[::-1], phi[::-1], splits[::-1])
    assert reverse.local == got.local[::-1] and reverse.received == got.received[::-1]
    assert torch.equal(storage, before[0]) and torch.equal(phi_storage, before[1])
