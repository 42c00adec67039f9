"""Model plug-ins with buffers, for the buffer checks and the resume tests: constant buffers
that forward only reads (accepted) and buffers that forward writes (refused)."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConstantBuffers(nn.Module):
    """Inputs scaled by a fixed vector, projected by a seed-drawn matrix (both buffers that
    forward only reads), then Linear, ReLU, Linear."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))
        self.register_buffer("projection", torch.randn(width, 12) / math.sqrt(width))
        self.hidden = nn.Linear(12, 16)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden((x.flatten(1) * self.scale) @ self.projection)))


def constant_buffers(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """:class:`ConstantBuffers` for flattened inputs."""
    return ConstantBuffers(math.prod(input_shape), num_classes)


class Counter(nn.Module):
    """A Linear model that counts its forward calls in an integer buffer."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x.flatten(1))


def counter(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """:class:`Counter` for flattened inputs."""
    return Counter(math.prod(input_shape), num_classes)


class LateWriter(nn.Module):
    """A constant offset buffer that forward starts writing after its 20th call (a Python
    counter, not a buffer): the checks before training see a constant buffer."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(width))
        self.linear = nn.Linear(width, num_classes)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        if self.seen > 20:
            with torch.no_grad():
                self.offset.add_(x.flatten(1).mean(0))
        return self.linear(x.flatten(1) + self.offset)


def late_writer(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """:class:`LateWriter` for flattened inputs."""
    return LateWriter(math.prod(input_shape), num_classes)


class LargeBatchWriter(LateWriter):
    """As :class:`LateWriter`, writing its buffer on batches of 8 rows or more (the checks
    before training, without DP, run batches of 1 and 2 rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= 8:
            with torch.no_grad():
                self.offset.add_(x.flatten(1).mean(0))
        return self.linear(x.flatten(1) + self.offset)


def large_batch_writer(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """:class:`LargeBatchWriter` for flattened inputs."""
    return LargeBatchWriter(math.prod(input_shape), num_classes)


class EvalWriter(LateWriter):
    """As :class:`LateWriter`, writing its buffer only in eval mode on batches of 8 rows or
    more: training never writes it and the checks before training (eval batches of 1 and 2
    rows) see a constant buffer; an evaluation of a client's test split does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and x.shape[0] >= 8:
            with torch.no_grad():
                self.offset.add_(x.mean())
        return self.linear(x.flatten(1) + self.offset)


def eval_writer(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """:class:`EvalWriter` for flattened inputs."""
    return EvalWriter(math.prod(input_shape), num_classes)
