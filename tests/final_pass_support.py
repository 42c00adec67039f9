"""A model that writes its input or a buffer only in FedAvg's finalize exchange (fine-tuning
and model selection), for tests of the checks made after the last round."""

from __future__ import annotations

import pytest
import torch

#: Set (through :func:`writes_only_in_fedavg_finalize`) while FedAvg's client_finalize runs.
FINAL = {"on": False}


class WritesInFinalize(torch.nn.Module):
    """A Linear model whose eval-mode forward, while ``FINAL["on"]``, writes its input in place
    (equal values; ``what = "input"``) or its buffer ``scale`` (``what = "buffer"``)."""

    def __init__(self, width: int, num_classes: int, what: str = "input") -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, num_classes)
        self.what = what
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FINAL["on"] and not self.training:
            if self.what == "input":
                x.mul_(1.0)
            else:
                self.scale.add_(1.0)
        return self.linear(x.flatten(1)) * self.scale


def writes_only_in_fedavg_finalize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make FedAvg's client_finalize set ``FINAL["on"]`` while it runs (undone with
    ``monkeypatch``)."""
    from secure_fedora.algorithms.methods import FedAvg

    original = FedAvg.client_finalize

    def in_final_pass(self: FedAvg, i: int, message: dict) -> dict:
        monkeypatch.setitem(FINAL, "on", True)
        try:
            return original(self, i, message)
        finally:
            monkeypatch.setitem(FINAL, "on", False)

    monkeypatch.setattr(FedAvg, "client_finalize", in_final_pass)
