"""A FIFO for tests of code that must never wait on one."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def _open_for_writing(fifo: Path) -> None:
    """Open ``fifo`` for writing and close it: a reader waiting on it reads end of file."""
    with contextlib.suppress(OSError):  # nobody reading it: nothing to release
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@contextlib.contextmanager
def fifo_without_writer(path: Path, release_after: float = 20.0) -> Iterator[Path]:
    """A FIFO made at ``path``: code that waited on it for a writer (a regression) gets one
    after ``release_after`` seconds, so the test fails rather than hangs; the writer is
    cancelled on leaving."""
    os.mkfifo(path)
    writer = threading.Timer(release_after, _open_for_writing, [path])
    writer.daemon = True
    writer.start()
    try:
        yield path
    finally:
        writer.cancel()


#: The kinds of :func:`not_a_regular_file`.
NOT_REGULAR_KINDS = ("device", "fifo", "directory")


@contextlib.contextmanager
def not_a_regular_file(path: Path, kind: str, release_after: float = 20.0) -> Iterator[Path]:
    """``path`` made as something a reader must refuse as a file: ``"device"`` a link to
    /dev/zero (read whole, it has no end), ``"fifo"`` a FIFO without a writer
    (:func:`fifo_without_writer`: a reader waiting on it fails rather than hangs), or
    ``"directory"``."""
    if kind == "fifo":
        with fifo_without_writer(path, release_after):
            yield path
        return
    if kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {NOT_REGULAR_KINDS}")
    yield path
