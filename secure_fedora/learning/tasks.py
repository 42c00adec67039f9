"""What a model is trained for: its loss (per sample) and the metric it is selected on.

``[training] loss`` names a :class:`Task`:

- ``"cross_entropy"`` (default): single-label classification; the model outputs ``C`` logits;
  metric: accuracy.
- ``"bce"``: binary (labels 0/1 of shape ``(n,)``, the model outputs one logit) or multi-label
  (targets of shape ``(n, C)`` in {0, 1}, as a recommender scoring ``C`` items; ``C`` logits),
  binary cross-entropy on sigmoid outputs; metric: ROC AUC (micro-averaged over all
  label entries for multi-label).
- ``"package.module:function"``: ``function(outputs, targets)`` returns the per-sample losses
  (shape ``(B,)``, i.e. ``reduction="none"``); the metric is ``function.metric`` ("accuracy"
  or "auc") when set, else accuracy for single labels and AUC for multi-label targets. An
  AUC-scored loss on single labels is binary, as ``"bce"``: labels 0/1, one logit. It must
  not write ``targets`` in place: evaluation passes views of a client's stored labels.

Every loss is per sample, so DP-SGD clips per-sample gradients of whichever loss is used.
Metrics are "higher is better"; model selection takes the round with the best mean
validation metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from privacy.errors import ToolkitError
from secure_fedora.core.registry import LOSSES

__all__ = ["CROSS_ENTROPY", "MetricError", "Task", "auc", "resolve_task"]

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


class MetricError(ToolkitError, ValueError):
    """A metric that is undefined on the given split (e.g. AUC with one class only)."""


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (same shape, flattened; ties count half).

    Mann-Whitney form with average ranks. Raises :class:`MetricError` when the labels hold
    only positives or only negatives (AUC is undefined).
    """
    s = scores.detach().reshape(-1).to(torch.float64)
    positive = labels.detach().reshape(-1) > 0.5
    n_pos = int(positive.sum())
    n_neg = int(positive.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"AUC needs positive and negative labels; got {n_pos} positive, {n_neg} negative")
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    upper = counts.cumsum(0).to(torch.float64)
    average_rank = upper - (counts.to(torch.float64) - 1.0) / 2.0  # 1-based ranks
    rank_sum = float(average_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@dataclass(frozen=True)
class Task:
    """A loss and its metric. ``per_sample(outputs, targets)`` returns shape ``(B,)``."""

    name: str
    per_sample: PerSampleLoss
    metric_name: str  # "accuracy" or "auc"

    def mean_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mini-batch loss of non-private training (mean over the batch)."""
        if self.name == "cross_entropy":
            return F.cross_entropy(outputs, targets)
        return self.checked(outputs, targets).mean()

    def sum_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed loss of a batch (evaluation)."""
        if self.name == "cross_entropy":
            return F.cross_entropy(outputs, targets, reduction="sum")
        return self.checked(outputs, targets).sum()

    def checked(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample losses, verified to have shape ``(B,)``."""
        losses = self.per_sample(outputs, targets)
        batch = int(outputs.shape[0])
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"loss {self.name!r} must return per-sample losses of shape ({batch},), got "
                f"{shape} (use reduction='none')"
            )
        return losses

    def correct(self, outputs: Tensor, targets: Tensor) -> float:
        """Number of correct predictions (label entries for multi-label) in the batch."""
        return float(self.correct_per_sample(outputs, targets).sum())

    def correct_per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per sample (float64, shape ``(B,)``): 1/0 for a correct/wrong prediction, or the
        fraction of correct label entries for multi-label; :meth:`correct` is its sum."""
        if targets.dim() == 2:
            return ((outputs > 0) == (targets > 0.5)).to(torch.float64).mean(dim=1)
        if outputs.dim() == 2 and outputs.shape[1] == 1:
            return ((outputs[:, 0] > 0).long() == targets).to(torch.float64)
        return (outputs.argmax(dim=1) == targets).to(torch.float64)

    def scores(self, outputs: Tensor) -> Tensor:
        """What AUC ranks: the logit for a binary output, all logits for multi-label."""
        return outputs[:, 0] if outputs.dim() == 2 and outputs.shape[1] == 1 else outputs

    def metric(self, outputs: Tensor, targets: Tensor) -> float:
        """The task's metric over a whole split (accuracy or AUC)."""
        if self.metric_name == "auc":
            scores = self.scores(outputs)
            if targets.dim() == 1 and scores.dim() == 2:
                raise MetricError(
                    f"AUC needs one score per label; got outputs {tuple(outputs.shape)} for "
                    "single labels (give the model one output for binary labels)"
                )
            return auc(scores, targets)
        return self.correct(outputs, targets) / max(1, int(targets.shape[0]))

    def output_width(self, num_classes: int, multilabel: bool) -> int:
        """The model's output width for data with ``num_classes`` classes (or labels): one
        logit for an AUC-scored task on single labels (binary: AUC ranks one score per label,
        for ``bce`` and a plug-in loss alike), else ``num_classes``."""
        if self.metric_name == "auc" and not multilabel:
            return 1
        return num_classes


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _bce(outputs: Tensor, targets: Tensor) -> Tensor:
    if targets.dim() == 1:
        return F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.to(outputs.dtype),
                                                  reduction="none")
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype),
                                              reduction="none").mean(dim=1)


#: The built-in per-sample losses: each row's value depends on that row alone by construction
#: (DP's probe of a loss mixing rows is skipped for them).
ROW_WISE_LOSSES: frozenset[PerSampleLoss] = frozenset({_cross_entropy, _bce})

CROSS_ENTROPY = Task("cross_entropy", _cross_entropy, "accuracy")
LOSSES.register("cross_entropy", lambda multilabel: CROSS_ENTROPY)
LOSSES.register("bce", lambda multilabel: Task("bce", _bce, "auc"))


def resolve_task(spec: str, multilabel: bool, base_dir: Path | None = None) -> Task:
    """The :class:`Task` named by ``[training] loss`` for single- or multi-label targets."""
    from secure_fedora.core.plugins import PluginError, import_object, is_import_spec

    if not is_import_spec(spec):
        if spec == "cross_entropy" and multilabel:
            raise PluginError("training.loss 'cross_entropy' needs single integer labels; "
                              "multi-label targets (n, C) need loss = 'bce'")
        return _registered_task(spec, multilabel)
    fn = import_object(spec, "training.loss", base_dir)
    metric = getattr(fn, "metric", "auc" if multilabel else "accuracy")
    if metric not in ("accuracy", "auc"):
        raise PluginError(f"training.loss = {spec!r}: its 'metric' attribute must be 'accuracy' "
                          f"or 'auc', got {metric!r}")
    return Task(spec, fn, metric)


def _registered_task(name: str, multilabel: bool) -> Task:
    """The :class:`Task` a LOSSES entry (a ``function(multilabel) -> Task``) returns for
    ``name``; PluginError when it fails, returns something else or a metric other than
    "accuracy" or "auc" (any other name was shown over accuracy figures)."""
    from secure_fedora.core.plugins import PluginError

    entry = LOSSES.get(name)
    try:
        task = entry(multilabel)
    except Exception as err:  # a registered plug-in: report whatever it raised
        raise PluginError(f"training.loss {name!r}: its LOSSES entry failed ({type(err).__name__}: "
                          f"{err}); an entry is a function(multilabel) returning a Task") from err
    if not isinstance(task, Task):
        raise PluginError(f"training.loss {name!r}: its LOSSES entry returned a "
                          f"{type(task).__name__}; an entry is a function(multilabel) returning a Task")
    if task.metric_name not in ("accuracy", "auc"):
        raise PluginError(f"training.loss {name!r}: its Task's metric must be 'accuracy' or 'auc', "
                          f"got {task.metric_name!r}")
    return task
