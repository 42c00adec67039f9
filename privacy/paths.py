"""Paths given as arguments: one check, one wording, for every package of the toolkit."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from privacy.errors import ToolkitError

__all__ = ["NotRegularFileError", "check_path", "read_regular_bytes", "read_regular_file"]


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


class NotRegularFileError(OSError, ToolkitError):
    """A path that names a FIFO, device or socket where a regular file is read."""


def read_regular_bytes(path: Path, limit: int = -1) -> bytes:
    """The bytes of ``path`` (at most ``limit``; all when negative), never waiting on it: a
    FIFO, device or socket is opened non-blocking (a FIFO would otherwise wait for a writer
    forever) and refused with :class:`NotRegularFileError`; a directory raises
    ``IsADirectoryError``; anything else that fails, the ``OSError`` of the system call."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        chunks = []
        left = limit
        while left != 0:
            chunk = os.read(fd, 1 << 20 if left < 0 else min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left = left - len(chunk) if left > 0 else left
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_regular_file(path: Path, name: str, error: type[Exception]) -> bytes:
    """The bytes of ``path``, never waiting on it (:func:`read_regular_bytes`): ``error``
    ("cannot read ``name`` ``path``: why") for a missing or unreadable file, a directory, and
    anything but a regular file."""
    try:
        return read_regular_bytes(path)
    except NotRegularFileError:
        raise error(f"cannot read {name} {path}: not a regular file (a FIFO, device or "
                    "socket); give a file") from None
    except OSError as exc:
        raise error(f"cannot read {name} {path}: {exc.strerror or exc}") from None
