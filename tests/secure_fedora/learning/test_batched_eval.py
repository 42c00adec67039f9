"""Batched evaluation of many clients' rows equals the per-client evaluate()."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from secure_fedora.learning.batched_eval import (
    PackedSplits,
    evaluate_many,
    evaluate_many_sets,
    pack_split_sets,
    pack_splits,
    plan_evaluation,
    validation_losses_many,
)
from secure_fedora.learning.client import ClientUpdateError, FlatModel, evaluate
from secure_fedora.learning.models import build_user_model, make_model
from secure_fedora.learning.tasks import MetricError, resolve_task

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
LOSS_RTOL = 1e-5  # the documented tolerance (float32 rounding of bmm vs addmm, summation order)


def _rows(flat: FlatModel, count: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = flat.initial_vector()
    return base + scale * torch.randn(count, flat.num_params, generator=gen)


def _splits(sizes, shape, seed, classes=10, binary=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.rand(n, *shape, generator=gen)
        y = torch.randint(0, 2 if binary else classes, (n,), generator=gen)
        out.append((x, y))
    return out


def _assert_equal(many, flat, rows, splits):
    assert len(many) == len(splits)
    for k, (x, y) in enumerate(splits):
        expected = evaluate(flat, rows[k], x, y)
        got = many[k]
        assert got.loss == pytest.approx(expected.loss, rel=LOSS_RTOL), k
        assert got.accuracy == expected.accuracy, k
        assert got.metric == expected.metric, k


def test_mlp_unequal_splits_including_one_row_match_evaluate():
    flat = FlatModel(make_model("mlp", seed=0))
    sizes = [64, 1, 17, 64, 3, 40, 1, 9]
    splits = _splits(sizes, (1, 28, 28), seed=1)
    rows = _rows(flat, len(sizes), seed=2)
    assert plan_evaluation(flat, splits[0][0]).strategy == "linear"
    many = evaluate_many(flat, rows, splits)
    _assert_equal(many, flat, rows, splits)
    # a list of rows (e.g. eval_row(i) views) gives the same numbers as the matrix
    assert evaluate_many(flat, list(rows), splits) == many
    # forcing the reference loop is exactly evaluate()
    loop = evaluate_many(flat, rows, splits, strategy="loop")
    assert loop == [evaluate(flat, rows[k], *splits[k]) for k in range(len(sizes))]


def test_small_chunks_and_reused_packing_give_the_same_results():
    flat = FlatModel(make_model("mlp", seed=0))
    sizes = [5, 2, 5, 7, 1, 5]
    splits = _splits(sizes, (1, 28, 28), seed=3)
    rows = _rows(flat, len(sizes), seed=4)
    packed = pack_splits(flat, splits, chunk_bytes=1)  # one client per chunk
    assert len(packed.chunks) == len(sizes)
    one_chunk = pack_splits(flat, splits)
    assert len(one_chunk.chunks) == 1
    small = evaluate_many(flat, rows, packed)
    _assert_equal(small, flat, rows, splits)
    for a, b in zip(small, evaluate_many(flat, rows, one_chunk), strict=True):
        assert a.loss == pytest.approx(b.loss, rel=LOSS_RTOL) and a.accuracy == b.accuracy
    # the packed inputs are not modified by an evaluation
    before = one_chunk.chunks[0].x.clone()
    evaluate_many(flat, rows * 2, one_chunk)
    assert torch.equal(one_chunk.chunks[0].x, before)


def test_bce_task_auc_matches_evaluate():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import breast_cancer
    finally:
        sys.path.remove(str(EXAMPLES))
    task = resolve_task("bce", multilabel=False)
    flat = FlatModel(build_user_model(breast_cancer.mlp, (30,), 1, seed=0), task)
    gen = torch.Generator().manual_seed(5)
    sizes = [20, 6, 33, 2]
    splits = []
    for n in sizes:
        y = torch.arange(n) % 2  # both classes in every split (AUC defined)
        splits.append((torch.randn(n, 30, generator=gen), y[torch.randperm(n, generator=gen)]))
    rows = _rows(flat, len(sizes), seed=6, scale=0.3)
    assert plan_evaluation(flat, splits[0][0]).strategy == "linear"
    many = evaluate_many(flat, rows, splits)
    _assert_equal(many, flat, rows, splits)
    assert all(e.metric != e.accuracy for e in many[:3])  # the metric is the AUC, not accuracy
    # a single-class split: AUC undefined -> the same MetricError as evaluate, naming the split
    bad = [*splits, (torch.randn(3, 30, generator=gen), torch.ones(3, dtype=torch.long))]
    rows5 = _rows(flat, 5, seed=6, scale=0.3)
    with pytest.raises(MetricError):
        evaluate(flat, rows5[4], *bad[4])
    with pytest.raises(MetricError, match="split 4"):
        evaluate_many(flat, rows5, bad)
    # the lambda losses need no metric: they are computed for that split too
    losses = validation_losses_many(flat, rows5, rows5.flip(0), bad)
    assert losses.local[4] == pytest.approx(_loss_reference(flat, rows5[4], *bad[4]), rel=LOSS_RTOL)
    assert losses.received[4] == pytest.approx(_loss_reference(flat, rows5[0], *bad[4]), rel=LOSS_RTOL)


def _loss_reference(flat, row, x, y):
    with torch.no_grad():
        model = flat.bind(row)
        model.eval()
        return float(flat.task.sum_loss(model(x), y)) / x.shape[0]


def test_cnn_uses_vmap_and_matches_evaluate():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits
    finally:
        sys.path.remove(str(EXAMPLES))
    flat = FlatModel(build_user_model(digits.cnn, (1, 8, 8), 10, seed=0))
    sizes = [12, 1, 7, 12]
    splits = _splits(sizes, (1, 8, 8), seed=7)
    rows = _rows(flat, len(sizes), seed=8, scale=0.1)
    plan = plan_evaluation(flat, splits[0][0])
    assert plan.strategy == "vmap"
    assert "Conv2d" in plan.reason  # says why the Linear path does not apply
    _assert_equal(evaluate_many(flat, rows, splits), flat, rows, splits)
    with pytest.raises(ClientUpdateError, match="'linear' does not apply"):
        evaluate_many(flat, rows, splits, strategy="linear")


class _DataDependent(nn.Module):
    """A model vmap cannot run (data-dependent Python control flow): evaluated by the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if float(out.sum()) > 1e9:
            return out * 0
        return out


def test_model_vmap_cannot_run_falls_back_to_the_stated_loop():
    flat = FlatModel(_DataDependent())
    splits = _splits([3, 1, 5], (4,), seed=9, classes=3)
    rows = _rows(flat, 3, seed=10)
    plan = plan_evaluation(flat, splits[0][0])
    assert plan.strategy == "loop"
    assert "vmap:" in plan.reason and "linear:" in plan.reason
    assert evaluate_many(flat, rows, splits) == [evaluate(flat, rows[k], *splits[k]) for k in range(3)]
    with pytest.raises(ClientUpdateError, match="'vmap' does not apply"):
        evaluate_many(flat, rows, splits, strategy="vmap")


def test_a_module_registered_twice_is_evaluated_by_the_loop_and_stays_bound():
    """torch.func.functional_call left its tensors in a module registered under two names, so
    every later forward pass (the per-client loop's too) failed with a raw functorch error."""
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.out = nn.Linear(4, 6), nn.Linear(6, 3)
            self.again = self.first_hidden = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.again(torch.tanh(self.first_hidden(self.first(x))))))

    flat = FlatModel(Twice())
    splits = _splits([3, 1, 5], (4,), seed=9, classes=3)
    rows = _rows(flat, 3, seed=10)
    plan = plan_evaluation(flat, splits[0][0])
    assert plan.strategy == "loop" and "module 'first_hidden' is module 'again'" in plan.reason
    assert evaluate_many(flat, rows, splits) == [evaluate(flat, rows[k], *splits[k]) for k in range(3)]
    assert list(flat.module.parameters()) == flat.params


def test_validation_losses_equal_the_two_evaluate_losses():
    flat = FlatModel(make_model("mlp", seed=0))
    sizes = [10, 1, 4, 10]
    splits = _splits(sizes, (1, 28, 28), seed=11)
    theta = _rows(flat, 4, seed=12)
    phi = _rows(flat, 4, seed=13)
    phi[2] = theta[2]  # a client whose received model equals its own
    packed = pack_splits(flat, splits)
    losses = validation_losses_many(flat, theta, phi, packed)
    for k, (x, y) in enumerate(splits):
        assert losses.local[k] == pytest.approx(evaluate(flat, theta[k], x, y).loss, rel=LOSS_RTOL)
        assert losses.received[k] == pytest.approx(evaluate(flat, phi[k], x, y).loss, rel=LOSS_RTOL)
    assert losses.local[2] == losses.received[2]  # bit-identical: lambda stays exactly 0
    loop = validation_losses_many(flat, theta, phi, splits, strategy="loop")
    assert loop.local == [evaluate(flat, theta[k], *splits[k]).loss for k in range(4)]
    assert loop.received == [evaluate(flat, phi[k], *splits[k]).loss for k in range(4)]


def test_nan_row_behaves_as_evaluate_and_does_not_touch_the_others():
    flat = FlatModel(make_model("mlp", seed=0))
    splits = _splits([6, 6, 6], (1, 28, 28), seed=14)
    rows = _rows(flat, 3, seed=15)
    rows[1, 5] = math.nan
    many = evaluate_many(flat, rows, splits)
    reference = evaluate(flat, rows[1], *splits[1])
    assert math.isnan(reference.loss) and math.isnan(many[1].loss)
    assert many[1].accuracy == reference.accuracy
    _assert_equal([many[0], many[2]], flat, rows[[0, 2]], [splits[0], splits[2]])


def test_bad_inputs_are_refused_with_clear_errors():
    flat = FlatModel(make_model("mlp", seed=0))
    splits = _splits([4, 4], (1, 28, 28), seed=16)
    rows = _rows(flat, 2, seed=17)
    with pytest.raises(ClientUpdateError, match="empty split"):
        evaluate(flat, rows[0], splits[0][0][:0], splits[0][1][:0])
    with pytest.raises(ClientUpdateError, match="split 1: cannot evaluate on an empty split"):
        evaluate_many(flat, rows, [splits[0], (splits[1][0][:0], splits[1][1][:0])])
    with pytest.raises(ClientUpdateError, match="3 rows for 2 splits"):
        evaluate_many(flat, _rows(flat, 3, seed=0), splits)
    with pytest.raises(ClientUpdateError, match="expected"):
        evaluate_many(flat, rows[:, :-1], splits)
    with pytest.raises(ClientUpdateError, match="4 inputs but 3 targets"):
        evaluate_many(flat, rows, [splits[0], (splits[1][0], splits[1][1][:3])])
    with pytest.raises(ClientUpdateError, match="float32"):
        evaluate_many(flat, rows.double(), splits)
    with pytest.raises(ClientUpdateError, match="unknown evaluation strategy"):
        evaluate_many(flat, rows, splits, strategy="fast")
    other = FlatModel(make_model("mlp", seed=0, num_classes=3))
    with pytest.raises(ClientUpdateError, match="packed for"):
        evaluate_many(other, _rows(other, 2, seed=0), pack_splits(flat, splits))
    assert evaluate_many(flat, rows[:0], []) == []
    assert isinstance(pack_splits(flat, []), PackedSplits)


def test_validation_and_test_sets_in_one_pass_match_evaluate():
    flat = FlatModel(make_model("mlp", seed=0))
    val = _splits([4, 1, 9, 4, 2], (1, 28, 28), seed=18)
    test = _splits([7, 3, 1, 7, 12], (1, 28, 28), seed=19)
    rows = _rows(flat, 5, seed=20)
    packed = pack_split_sets(flat, [val, test], chunk_bytes=3 * 4 * flat.num_params)  # several chunks
    assert packed.num_sets == 2 and len(packed) == 5 and len(packed.chunks) > 1
    got_val, got_test = evaluate_many_sets(flat, rows, packed)
    _assert_equal(got_val, flat, rows, val)
    _assert_equal(got_test, flat, rows, test)
    with pytest.raises(ClientUpdateError, match="different numbers of clients"):
        pack_split_sets(flat, [val, test[:4]])
    with pytest.raises(ClientUpdateError, match="set 1 split 2: cannot evaluate on an empty split"):
        pack_split_sets(flat, [val, [*test[:2], (test[2][0][:0], test[2][1][:0]), *test[3:]]])
    with pytest.raises(ClientUpdateError, match="evaluate_many_sets"):
        evaluate_many(flat, rows, packed)
    with pytest.raises(ClientUpdateError, match="pack one set"):
        validation_losses_many(flat, rows, rows, packed)


def test_row_sequences_views_shared_row_and_copies_give_the_same_results():
    flat = FlatModel(make_model("mlp", seed=0))
    splits = _splits([3, 3, 3, 3], (1, 28, 28), seed=21)
    rows = _rows(flat, 4, seed=22)
    expected = evaluate_many(flat, rows, splits)
    assert evaluate_many(flat, [rows[k] for k in range(4)], splits) == expected  # views: no copy
    assert evaluate_many(flat, [rows[k].clone() for k in range(4)], splits) == expected  # stacked
    reversed_views = [rows[3 - k] for k in range(4)]  # negative spacing: stacked, still right
    _assert_equal(evaluate_many(flat, reversed_views, splits[::-1]), flat, reversed_views, splits[::-1])
    shared = rows[1]  # e.g. FedAvg: every client is evaluated on the global row
    _assert_equal(evaluate_many(flat, [shared] * 4, splits), flat, [shared] * 4, splits)
    _assert_equal(evaluate_many(flat, shared.expand(4, -1), splits), flat, [shared] * 4, splits)
