"""Paths given as arguments: one check, one wording, for every package of the toolkit."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from privacy.errors import ToolkitError

__all__ = ["NotRegularFileError", "check_given_file", "check_path", "open_regular",
           "path_problem", "read_regular_bytes", "read_regular_file"]


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


def check_given_file(
    value: str | os.PathLike[str], name: str, error: type[Exception], option: str, give: str = ""
) -> Path:
    """``value``, a file the caller gave through ``option`` (a command's flag, or an
    argument's name in Python), as a :class:`Path` once it names a regular file; else
    ``error`` with one line that names ``option``, ``name``, the path and what is wrong
    (:func:`check_path`, then :func:`path_problem`'s words; a FIFO is never opened),
    followed by ``give`` (what to give instead). The one check of every file-taking flag."""
    path = check_path(value, name, error, "file")
    problem = path_problem(path, "file")
    if problem is not None:
        raise error(f"{option}: {name} {path} {problem}{give}")
    return path


def path_problem(path: str | os.PathLike[str], want: str = "directory", *,
                 missing_ok: bool = False) -> str | None:
    """Why ``path`` is not the ``want`` it should name ("directory", or "file": a regular
    file), as the words that follow the path in an error line, or None when it is one (and,
    with ``missing_ok``, when nothing is there: a caller that will create it asks only
    whether something else is in the way, never by comparing these words). The
    one wording of every command: ``does not exist`` only where the system says nothing is
    there; ``is a symbolic link loop ...`` where it or a folder on its way is a link that
    never ends (ELOOP); ``cannot be reached (<reason>)`` where the system cannot look (a
    folder on its way that is a file or may not be searched); ``is not a directory``, ``is a
    directory, not a file`` or ``is not a regular file (a FIFO, device or socket)`` for what
    is there but of another kind."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None if missing_ok else "does not exist"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (it or a folder on its way is a link that never resolves)"
        return f"cannot be reached ({exc.strerror or exc})"
    except ValueError as exc:  # a path the system cannot take (NUL, or not encodable)
        return f"cannot be reached ({exc})"
    if want == "directory":
        return None if stat.S_ISDIR(mode) else "is not a directory"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    return None if stat.S_ISREG(mode) else "is not a regular file (a FIFO, device or socket)"


class NotRegularFileError(OSError, ToolkitError):
    """A path that names a FIFO, device or socket where a regular file is read."""


def open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file ``path``, never waiting on it: a FIFO,
    device or socket is opened non-blocking (a FIFO would otherwise wait for a writer
    forever) and refused with :class:`NotRegularFileError`; a directory raises
    ``IsADirectoryError``; anything else that fails, the ``OSError`` of the system call. The
    caller closes the descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_bytes(path: Path, limit: int = -1) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``; all when negative), never
    waiting on it; what is not a regular file is refused as :func:`open_regular` refuses it."""
    fd = open_regular(path)
    try:
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
