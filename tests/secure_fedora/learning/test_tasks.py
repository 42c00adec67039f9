"""Losses and metrics: AUC against scikit-learn, per-sample shapes, DP clipping of BCE."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privacy.dpsgd import DPSGD
from privacy.noise import ReproducibleNoise
from secure_fedora.learning.tasks import CROSS_ENTROPY, MetricError, auc, resolve_task
from secure_fedora.secure.private import check_per_sample_gradients

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_auc_matches_sklearn_with_ties() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (200,), generator=gen).float()  # many ties
    labels = (torch.rand(200, generator=gen) < 0.4).long()
    assert auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_multilabel_auc_is_micro_averaged() -> None:
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(50, 4, generator=gen)
    labels = (torch.rand(50, 4, generator=gen) < 0.3).float()
    expected = sklearn_metrics.roc_auc_score(labels.numpy(), scores.numpy(), average="micro")
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auc_undefined_with_one_class() -> None:
    with pytest.raises(MetricError, match="0 positive"):
        auc(torch.randn(5), torch.zeros(5))


def test_bce_tasks() -> None:
    binary = resolve_task("bce", multilabel=False)
    multi = resolve_task("bce", multilabel=True)
    assert binary.output_width(2, False) == 1 and multi.output_width(5, True) == 5
    assert binary.metric_name == multi.metric_name == "auc"
    out = torch.tensor([[2.0], [-1.0], [0.5]])
    y = torch.tensor([1, 0, 0])
    assert binary.checked(out, y).shape == (3,)
    assert binary.metric(out, y) == 1.0
    assert binary.correct(out, y) == 2.0
    expected = nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float())
    assert binary.mean_loss(out, y).item() == pytest.approx(expected.item())
    assert CROSS_ENTROPY.output_width(10, False) == 10


@pytest.mark.parametrize("multilabel", [False, True])
def test_dp_path_clips_per_sample_gradients_of_bce(multilabel: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3 if multilabel else 1))
    task = resolve_task("bce", multilabel)
    x = torch.randn(5, 6) * 10
    y = (torch.rand(5, 3) < 0.5).float() if multilabel else torch.tensor([0, 1, 1, 0, 1])
    dpsgd = DPSGD(model, 0.5, 1.0, 5.0, ReproducibleNoise(0))
    assert dpsgd.mode == "fused"
    check_per_sample_gradients(dpsgd, task.checked, x, y)  # raises if they differ
    conv = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                         nn.Linear(8, 3 if multilabel else 1))
    dpsgd = DPSGD(conv, 0.5, 1.0, 5.0, ReproducibleNoise(0))
    assert dpsgd.mode == "opacus"
    check_per_sample_gradients(dpsgd, task.checked, x, y)


def test_a_registered_loss_must_return_a_task_scored_by_accuracy_or_auc() -> None:
    """A LOSSES entry registered as a per-sample function (the form of a loss plug-in) was a
    raw TypeError, and a Task with metric 'f1' ran: results.json and the summary showed
    accuracy figures as 'f1'. Both are now PluginErrors naming the loss."""
    from secure_fedora.core.plugins import PluginError
    from secure_fedora.core.registry import LOSSES
    from secure_fedora.learning.tasks import Task

    def per_sample(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    LOSSES.register("test-per-sample-fn", per_sample)
    LOSSES.register("test-f1", lambda multilabel: Task("test-f1", per_sample, "f1"))
    LOSSES.register("test-ok", lambda multilabel: Task("test-ok", per_sample, "accuracy"))
    try:
        with pytest.raises(PluginError, match="'test-per-sample-fn': its LOSSES entry failed"):
            resolve_task("test-per-sample-fn", False)
        with pytest.raises(PluginError, match="'test-f1': its Task's metric must be"):
            resolve_task("test-f1", False)
        assert resolve_task("test-ok", False).metric_name == "accuracy"
    finally:
        for name in ("test-per-sample-fn", "test-f1", "test-ok"):
            LOSSES.unregister(name)
