"""Durable writes: the primitives the ledger and the release journals build on."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = ["SyncBatch", "append_durably", "fsync_dir", "move_tail_aside",
           "truncate_and_fsync", "write_all_and_fsync"]


def write_all_and_fsync(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer) and fsync it:
    once this returns, the bytes are on stable storage."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created 0600 when absent) and fsync it, and its directory
    when the file was created: once this returns, the bytes and the file's name survive a
    crash. A crash inside the write leaves a prefix of ``data`` (a torn last line)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        write_all_and_fsync(fd, data)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


class SyncBatch:
    """Appends to several files whose fsyncs run concurrently and are awaited together.

    :meth:`append` writes like :func:`append_durably` and hands the fsync (and the
    directory's, for a file it created) to a small thread pool: ``os.fsync`` releases the
    GIL, so the fsyncs of different files overlap each other and the caller's work, and a
    journalling filesystem commits them together. The bytes are durable only once
    :meth:`wait` has returned; a caller must not let anything depend on them before that.
    """

    def __init__(self, workers: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsync")
        self._pending: list[tuple[Path, Future[None]]] = []

    def append(self, path: Path, data: bytes) -> None:
        """Append ``data`` to ``path`` (created 0600 when absent) and issue its fsync; a
        failed write raises here (nothing is issued), a failed fsync from :meth:`wait`."""
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            raise
        self._pending.append((path, self._pool.submit(_sync_and_close, fd, path, created)))

    def wait(self) -> list[tuple[Path, OSError]]:
        """Wait for every fsync issued so far; returns the files whose fsync failed (and
        why), empty when every appended byte is durable."""
        failed = []
        for path, future in self._pending:
            try:
                future.result()
            except OSError as err:
                failed.append((path, err))
        self._pending.clear()
        return failed

    def close(self) -> None:
        """Wait for the fsyncs issued and stop the pool."""
        self.wait()
        self._pool.shutdown(wait=True)


def _sync_and_close(fd: int, path: Path, created: bool) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


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
