"""Durable file replacement: a crash leaves the old or the new content, never a mix."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_with",
           "remove_interrupted_writes"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: a 0600 temporary file in the same directory
    (mkstemp), fsynced, renamed over ``path``, then the directory fsynced. A crash leaves the
    old or the new content, never a mix."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old or the new content, never a mix."""
    atomic_write_bytes(path, text.encode())


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write_with(path: Path, write: Callable[[Any], None]) -> None:
    """As :func:`atomic_write_bytes`, with ``write(fh)`` streaming the content into the
    temporary file (no in-memory copy of a multi-GB checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_interrupted_writes(path: Path) -> list[Path]:
    """Delete the temporary files that atomic writes of ``path`` killed before their rename
    left beside it (a process killed while streaming a checkpoint leaves a partial copy, up to
    the checkpoint's size, that nothing reads); ``path`` itself is untouched. Call only while
    no other process writes ``path``. Returns the files removed."""
    if not path.parent.is_dir():
        return []
    removed = []
    for leftover in path.parent.glob(f"{glob_escape(_temporary_prefix(path))}*"):
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()
            removed.append(leftover)
    return removed
