"""Where the in-process runtime computes: ``[training] device`` and ``[training] threads``.

``cpu`` is the reference. ``cuda`` puts the client data, the model, every parameter matrix
(theta, phi, the methods' state) and the training buffers on the GPU; batch order comes from
the same per-client CPU generators as on the CPU, so it is reproducible and identical across
devices. A configuration the GPU path does not cover is refused with :class:`DeviceError`
before anything runs (never a silent move back to the CPU): differential privacy (its
mechanisms can draw their noise on the GPU, see :mod:`privacy.noise`, but DP training on
CUDA has never run on a GPU), message envelopes, encrypted
propagation or relatedness, and methods whose class does not declare ``cuda_supported`` (of
the built-ins, FEDORA and Local declare it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch

from privacy.errors import ToolkitError
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.data.partition import ClientData

__all__ = ["DeviceError", "clients_on", "float32_default", "resolve_device",
           "resolve_engine", "threads_applied"]

class DeviceError(ToolkitError, ValueError):
    """A device setting that cannot be honoured on this machine or for this configuration."""


def _cuda_blockers(cfg: ExperimentConfig) -> list[str]:
    blockers = []
    if cfg.privacy.enabled:
        blockers.append("privacy.enabled (DP training on CUDA has not been tested on a GPU)")
    if cfg.security.envelopes:
        blockers.append("security.envelopes")
    if "encrypted" in cfg.fedora.relatedness or cfg.fedora.propagation == "encrypted":
        blockers.append("encrypted relatedness or propagation (CKKS runs on the CPU)")
    from secure_fedora.core.registry import METHODS

    other = sorted(m for m in cfg.methods if not METHODS.declared(m, "cuda_supported"))
    if other:
        covered = [m for m in METHODS.in_registration_order()
                   if METHODS.declared(m, "cuda_supported")]
        blockers.append(f"methods {other} (the GPU path covers the methods declaring "
                        f"cuda_supported: {covered})")
    return blockers


def resolve_device(cfg: ExperimentConfig, cuda_available: bool | None = None) -> torch.device:
    """The device of a run: ``cpu``; ``cuda`` (raises :class:`DeviceError` when no GPU is
    visible or the configuration is not covered); ``auto``: cuda when a GPU is visible and
    the configuration is covered, else cpu."""
    setting = cfg.training.device
    if setting == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    blockers = _cuda_blockers(cfg)
    if setting == "auto":
        return torch.device("cuda") if available and not blockers else torch.device("cpu")
    if not available:
        raise DeviceError("training.device = 'cuda' but no CUDA device is visible "
                          "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
    if blockers:
        raise DeviceError("training.device = 'cuda' does not support: " + "; ".join(blockers)
                          + ". Use device = 'cpu'")
    return torch.device("cuda")


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """torch's default dtype is float32 inside the block and the caller's again after it,
    also when the block raises: models are built and trained as in a fresh process (the
    federation's rows are float32) whatever ``torch.set_default_dtype`` the caller chose."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def threads_applied(cfg: ExperimentConfig, default: int | None = None) -> Iterator[None]:
    """torch's thread count is ``training.threads`` inside the block (when set; otherwise
    ``default``, and when that is None too left as it is) and its default dtype float32
    (:func:`float32_default`); the process's own settings again after it, also when the block
    raises: an in-process run leaves the process's torch as it found it."""
    threads = cfg.training.threads if cfg.training.threads is not None else default
    with float32_default():
        if threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def clients_on(clients: Sequence[ClientData], device: torch.device) -> list[ClientData]:
    """The clients with their tensors on ``device`` (the same objects on the CPU: no copy)."""
    if device.type == "cpu":
        return list(clients)
    fields = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return [dataclasses.replace(c, **{f: getattr(c, f).to(device) for f in fields}) for c in clients]


def resolve_engine(cfg: ExperimentConfig, device: torch.device,
                   threads: int | None = None) -> tuple[str, str]:
    """``[training] engine`` resolved for ``device``: ``("loop" | "batched", why)``.

    ``"loop"`` and ``"batched"`` are taken as set (why: ``""`` for the default loop). ``"auto"``
    picks what was measured faster (docs/notes/NOTES-j4-batched.md, reference setting): on a
    GPU the batched engine; on the CPU the batched engine from
    :data:`AUTO_BATCHED_MIN_THREADS` torch threads on (2 threads: FEDORA round 0.82x of the
    loop's), else the loop (1 thread: the batched round is within a few percent of the loop's,
    so the reference path is kept). ``threads``: default ``training.threads``, else torch's.
    """
    setting = cfg.training.engine
    if setting == "loop":
        return "loop", ""
    if setting == "batched":
        return "batched", "training.engine = 'batched'"
    if device.type != "cpu":
        return "batched", f"training.engine = 'auto' on {device.type}: batched"
    if threads is None:
        threads = cfg.training.threads or torch.get_num_threads()
    if threads >= AUTO_BATCHED_MIN_THREADS:
        return "batched", (f"training.engine = 'auto' on cpu with {threads} threads: batched "
                           "(measured faster than the per-client loop from "
                           f"{AUTO_BATCHED_MIN_THREADS} threads)")
    return "loop", (f"training.engine = 'auto' on cpu with {threads} thread: the per-client loop "
                    "(the batched engine is not measurably faster on one thread)")


#: From this many torch threads on, ``engine = "auto"`` trains batched on the CPU.
AUTO_BATCHED_MIN_THREADS = 2
