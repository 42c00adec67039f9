"""Paths given as arguments: one check, one wording, for every package of the toolkit."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["check_path", "read_regular_file"]


def check_path(value: str | os.PathLike[str], name: str, error: type[Exception],
               what: str = "directory") -> Path:
    """``value`` as a :class:`Path`; ``error`` naming ``name`` unless it is a string or
    path-like that is not empty or only spaces and holds no NUL character (an empty path
    would mean the current directory, a path of spaces a directory nobody means to name, and
    the file system refuses NUL only once something is opened). ``what`` the path names
    ("directory" or "file"), for the message."""
    try:
        text = os.fspath(value)
    except TypeError:
        raise error(f"{name} must be a path (a str or os.PathLike), got "
                    f"{type(value).__name__}") from None
    if not isinstance(text, str):
        raise error(f"{name} must be a text path, got {type(text).__name__}")
    if not text.strip():
        raise error(f"{name} is empty: name a {what}")
    if "\x00" in text:
        raise error(f"{name} {text!r:.80} holds a NUL character, which no path may hold")
    return Path(text)


def read_regular_file(path: Path, name: str, error: type[Exception]) -> bytes:
    """The bytes of ``path``, never waiting on it: ``error`` ("cannot read ``name`` ``path``:
    why") for a missing or unreadable file, a directory, and anything but a regular file (a
    FIFO, device or socket is opened non-blocking: a FIFO would otherwise wait for a writer
    forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"cannot read {name} {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"cannot read {name} {path}: {os.strerror(errno.EISDIR)}")
        if not stat.S_ISREG(mode):
            raise error(f"cannot read {name} {path}: not a regular file (a FIFO, device or "
                        "socket); give a file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read {name} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
