"""Durable writes: the primitives the ledger and the release journals build on."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "move_tail_aside", "truncate_and_fsync", "write_all_and_fsync"]


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


def move_tail_aside(path: Path, cut: int, tail: bytes, target: Path) -> Path:
    """Write ``tail`` (the bytes of ``path`` after offset ``cut``, e.g. a torn last line) to
    ``target`` (created 0600 and fsynced, with its directory entry), then truncate ``path`` to
    ``cut`` and fsync it: the bytes are durable beside the file before they leave it. An
    existing file is never replaced (an earlier tear at the same position keeps its bytes):
    the tail then goes to ``<target>.1``, ``<target>.2``, ..., unless one of them already
    holds exactly ``tail`` (a move interrupted before the cut), which is kept. Returns the
    file that holds ``tail``."""
    chosen, number = target, 0
    while True:
        try:
            fd = os.open(chosen, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            if chosen.read_bytes() == tail:
                truncate_and_fsync(path, cut)
                return chosen
            number += 1
            chosen = target.with_name(f"{target.name}.{number}")
    try:
        write_all_and_fsync(fd, tail)
    finally:
        os.close(fd)
    fsync_dir(chosen.parent)
    truncate_and_fsync(path, cut)
    return chosen


def truncate_and_fsync(path: Path, size: int) -> None:
    """Cut ``path`` to its first ``size`` bytes and fsync it."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
