"""8x8 handwritten digits from scikit-learn (1,797 images, 10 classes) and a small CNN,
for ``digits.toml`` and ``api_demo.py``.

``load(seed)`` returns images of shape ``(n, 1, 8, 8)`` in ``[0, 1]``, so the ``rotation``
partition can rotate each client's images; ``cnn(input_shape, num_classes)`` is a
``[model] factory`` sized for them (the built-in ``cnn`` needs at least 16x16).
"""

from __future__ import annotations

import numpy as np
from torch import nn

TEST_ROWS = 360


def load(seed: int) -> dict[str, np.ndarray]:
    """Shuffle with ``seed`` and hold out 360 test images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    x = (digits.images[order] / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target[order].astype(np.int64)
    return {"x_train": x[TEST_ROWS:], "y_train": y[TEST_ROWS:],
            "x_test": x[:TEST_ROWS], "y_test": y[:TEST_ROWS], "num_classes": 10}


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 convolutions with 2x2 pooling (8x8 -> 4x4 -> 2x2), then a linear layer."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), num_classes),
    )
