"""Model architectures shared by every client: an MLP and a small CNN for 1x28x28 inputs.

Both are plain ``nn.Sequential`` stacks of Linear / Conv2d / ReLU / MaxPool2d / Flatten with
no normalization layers, so they are valid for Opacus DP-SGD (per-sample gradients) as is.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, get_args

import torch
from torch import nn

from privacy.errors import ToolkitError

ModelName = Literal["mlp", "cnn"]


class ModelError(ToolkitError, ValueError):
    """An unknown architecture or invalid model argument."""


def _mlp(num_classes: int, device: torch.device | str | None) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128, device=device),
        nn.ReLU(),
        nn.Linear(128, 128, device=device),
        nn.ReLU(),
        nn.Linear(128, num_classes, device=device),
    )


def _cnn(num_classes: int, device: torch.device | str | None) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=5, device=device),  # 16 x 24 x 24
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 12 x 12
        nn.Conv2d(16, 32, kernel_size=5, device=device),  # 32 x 8 x 8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 4 x 4
        nn.Flatten(),
        nn.Linear(512, 64, device=device),
        nn.ReLU(),
        nn.Linear(64, num_classes, device=device),
    )


_BUILDERS = {"mlp": _mlp, "cnn": _cnn}


@torch.no_grad()
def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear / Conv2d initialization, drawn from ``generator``."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def make_model(name: ModelName, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """Build a fresh model for inputs of shape ``(n, 1, 28, 28)``, returning logits ``(n, C)``.

    ``"mlp"``: Flatten, Linear(784, 128), ReLU, Linear(128, 128), ReLU, Linear(128, C)
    (118,282 parameters for C = 10). ``"cnn"``: Conv(1, 16, 5), ReLU, MaxPool(2),
    Conv(16, 32, 5), ReLU, MaxPool(2), Flatten, Linear(512, 64), ReLU, Linear(64, C)
    (46,730 parameters for C = 10).

    With ``seed`` given, parameters follow PyTorch's default initialization drawn from a local
    ``torch.Generator`` seeded with it: equal seeds give bit-identical parameters and the global
    RNG state is neither read nor advanced. With ``seed=None`` the layers initialize from the
    global RNG, as plain PyTorch modules do.
    """
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; expected one of {list(get_args(ModelName))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ModelError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    builder = _BUILDERS[name]
    if seed is None:
        return builder(int(num_classes), None)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ModelError(f"seed must be a non-negative integer or None, got {seed!r}")
    # Built on the meta device so construction consumes no random numbers, then materialized.
    model = builder(int(num_classes), "meta").to_empty(device="cpu")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    init_parameters(model, generator)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
