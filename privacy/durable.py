"""Durable writes: the two primitives the ledger and the release journal build on."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_all_and_fsync"]


def write_all_and_fsync(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer) and fsync it:
    once this returns, the bytes are on stable storage."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that a file created or renamed in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
