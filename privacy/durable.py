"""Durable writes: the primitives the ledger and the release journals build on."""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = [
    "DESCRIPTOR_HEADROOM",
    "SyncBatch",
    "append_durably",
    "ensure_descriptors",
    "fsync_dir",
    "move_tail_aside",
    "truncate_and_fsync",
    "write_all_and_fsync",
]

#: Descriptors :func:`ensure_descriptors` keeps free beyond those asked for: the process's
#: other files (a checkpoint, a plot, a journal append, a directory fsync, a SyncBatch's).
DESCRIPTOR_HEADROOM = 128


def _open_descriptors() -> int | None:
    """How many file descriptors this process holds now (None where it cannot tell)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(listing))
        except OSError:
            continue
    return None


def ensure_descriptors(count: int, what: str) -> None:
    """Make room for ``count`` more open files than this process holds now (plus
    :data:`DESCRIPTOR_HEADROOM`) before any of them is opened: the soft ``RLIMIT_NOFILE`` is
    raised up to the hard limit when it is lower; when the hard limit is lower too, an
    ``OSError`` (EMFILE) naming ``what``, the number needed and the limit is raised and
    nothing is changed. Where the limit or the count cannot be read, nothing is done."""
    try:
        import resource
    except ImportError:  # not POSIX: no such limit to read
        return
    held = _open_descriptors()
    if held is None:
        return
    needed = held + count + DESCRIPTOR_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise OSError(
            errno.EMFILE,
            f"{what} need {needed} open files ({held} open now, {count} for them,"
            f" {DESCRIPTOR_HEADROOM} spare), above this process's hard limit of {hard}"
            " (RLIMIT_NOFILE): raise it (ulimit -Hn and ulimit -n, or the service's"
            " LimitNOFILE) and run again",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


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
    At most ``max_open`` files wait for their fsync at a time (each holds a descriptor until
    its fsync is done): :meth:`append` waits for one to finish before opening another.
    """

    def __init__(self, workers: int = 8, max_open: int = 32) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open!r}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsync")
        self._pending: list[tuple[Path, Future[None]]] = []
        self._slots = threading.BoundedSemaphore(max_open)

    def append(self, path: Path, data: bytes) -> None:
        """Append ``data`` to ``path`` (created 0600 when absent) and issue its fsync; a
        failed write raises here (nothing is issued), a failed fsync from :meth:`wait`."""
        self._slots.acquire()
        try:
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except BaseException:
            self._slots.release()
            raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            self._slots.release()
            raise
        try:
            future = self._pool.submit(_sync_and_close, fd, path, created, self._slots)
        except BaseException:
            os.close(fd)
            self._slots.release()
            raise
        self._pending.append((path, future))

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


def _sync_and_close(fd: int, path: Path, created: bool, slots: threading.BoundedSemaphore) -> None:
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)
    finally:
        slots.release()


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
