"""A model plug-in with a random layer (dropout), for the resume and runtime tests."""

from __future__ import annotations

import math

from torch import nn


def dropout_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten, Linear(., 32), ReLU, Dropout(0.3), Linear(32, num_classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(32, num_classes))
