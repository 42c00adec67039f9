"""Tabular data from scikit-learn (Wisconsin breast cancer: 569 rows, 30 features, 2 classes)
and a small MLP, for ``breast_cancer.toml`` and ``api_demo.py``.

``load(seed)`` is a ``[data] source``: it returns a centralized labeled dataset that the
configured partitioner splits among the clients. ``mlp(input_shape, num_classes)`` is a
``[model] factory``; with ``loss = "bce"`` on binary labels ``num_classes`` is 1 (one logit).
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn

TEST_ROWS = 113


def load(seed: int) -> dict[str, np.ndarray]:
    """Shuffle with ``seed``, hold out 113 test rows, standardize with the train statistics."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    x_train, x_test = x[TEST_ROWS:], x[:TEST_ROWS]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    return {"x_train": (x_train - mean) / std, "y_train": y[TEST_ROWS:],
            "x_test": (x_test - mean) / std, "y_test": y[:TEST_ROWS]}


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Linear(30, 32) - ReLU - Linear(32, num_classes): only nn.Linear layers, so DP-SGD
    uses the fused per-sample clipping."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(),
                         nn.Linear(32, num_classes))
