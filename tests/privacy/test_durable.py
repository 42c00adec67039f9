"""Durable writes: a torn tail moved aside never replaces bytes moved aside before."""

from pathlib import Path

import pytest

from privacy.durable import append_durably, move_tail_aside
from privacy.journal import ReleaseJournal
from secure_fedora.runtimes.flower.state import ReleaseJournal as NodeReleaseJournal
from tests.privacy.test_journal import KEY, _record


def test_a_second_tear_at_the_same_position_keeps_the_first(tmp_path: Path) -> None:
    """Two tears at one position (in different sessions) wrote the same ``.torn-<position>``:
    the second replaced the first's bytes."""
    path = tmp_path / "log"
    target = tmp_path / "log.torn-1"
    for torn in (b"first", b"second", b"third"):
        path.write_bytes(b"line\n" + torn)
        move_tail_aside(path, 5, torn, target)
        assert path.read_bytes() == b"line\n"
    assert [p.read_bytes() for p in sorted(tmp_path.glob("log.torn-1*"))] == \
        [b"first", b"second", b"third"]
    assert (tmp_path / "log.torn-1.2").read_bytes() == b"third"
    # a move killed before its cut, done again: the file holding the same bytes is kept
    path.write_bytes(b"line\nthird")
    assert move_tail_aside(path, 5, b"third", target) == tmp_path / "log.torn-1.2"
    assert len(list(tmp_path.glob("log.torn-1*"))) == 3 and path.read_bytes() == b"line\n"


def test_the_journals_keep_every_torn_record(tmp_path: Path) -> None:
    path = tmp_path / "c1.journal"
    ReleaseJournal(path, "c1", "fedora", KEY).append(_record(1))
    intact = path.read_bytes()
    moved = []
    for torn in (b"U0ZTRUFMAQ", b"U0ZTRUFMAg"):
        path.write_bytes(intact + torn)
        moved.append(ReleaseJournal(path, "c1", "fedora", KEY).quarantined)
    assert moved[0] != moved[1]
    assert [m.read_bytes() for m in moved] == [b"U0ZTRUFMAQ", b"U0ZTRUFMAg"]

    node = NodeReleaseJournal(tmp_path / "releases.jsonl")
    node.append(0, 1, "fedora/round", b"payload")
    intact = node.path.read_bytes()
    held = []
    for torn in (b'{"seq": 1', b'{"seq": 1, "cl'):
        node.path.write_bytes(intact + torn)
        held.append(node.repair_torn_tail())
    assert [h.read_bytes() for h in held] == [b'{"seq": 1', b'{"seq": 1, "cl']
    assert node.path.read_bytes() == intact



def test_append_durably_creates_a_private_file_and_only_appends(tmp_path: Path) -> None:
    path = tmp_path / "log"
    append_durably(path, b"one\n")
    append_durably(path, b"two\n")
    assert path.read_bytes() == b"one\ntwo\n"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_sync_batch_overlaps_its_fsyncs_and_reports_the_failed_ones(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """SyncBatch writes at once, fsyncs on its pool (several at a time) and names, from
    wait(), every file whose fsync failed; the others are durable."""
    import os
    import threading
    import time

    from privacy.durable import SyncBatch

    real, lock, state = os.fsync, threading.Lock(), {"now": 0, "most": 0}
    bad = tmp_path / "c1.journal"

    def slow_fsync(fd: int) -> None:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.05)
            if os.readlink(f"/proc/self/fd/{fd}") == str(bad):
                raise OSError(5, "Input/output error")
            real(fd)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(os, "fsync", slow_fsync)
    batch = SyncBatch()
    paths = [tmp_path / f"c{k}.journal" for k in range(4)]
    for k, path in enumerate(paths):
        batch.append(path, b"record %d\n" % k)
        assert path.read_bytes() == b"record %d\n" % k  # written at once, synced later
    failed = batch.wait()
    batch.close()
    assert [(p, e.errno) for p, e in failed] == [(bad, 5)]
    assert state["most"] >= 2  # one at a time before
    assert batch.wait() == []


def _open_under(directory: Path) -> int:
    """How many of this process's descriptors point into ``directory``."""
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory)):
                count += 1
        except OSError:
            continue
    return count


def test_a_sync_batch_holds_a_bounded_number_of_files_open(tmp_path: Path, monkeypatch) -> None:
    """Each append held its file open until its fsync ran: appends faster than the fsyncs
    (10,000 clients' journal records in one admission batch) held one descriptor per record,
    up to the process's limit. At most ``max_open`` wait now; every record is still durable."""
    import os
    import time

    from privacy.durable import SyncBatch

    real = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.01)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    batch = SyncBatch(workers=2, max_open=4)
    paths = [tmp_path / f"c{k}.journal" for k in range(40)]
    most = 0
    for k, path in enumerate(paths):
        batch.append(path, b"record %d\n" % k)
        most = max(most, _open_under(tmp_path))
    assert batch.wait() == []
    batch.close()
    assert most <= 4
    assert [p.read_bytes() for p in paths] == [b"record %d\n" % k for k in range(40)]
    assert _open_under(tmp_path) == 0


def test_ensure_descriptors_raises_the_soft_limit_or_refuses_naming_the_hard_one() -> None:
    """Room for ``count`` more files: the soft limit goes up to what is needed when the hard
    limit allows it; otherwise a one-line EMFILE error names both numbers and nothing changes
    (run in a child process: it lowers its own limits)."""
    import resource
    import subprocess
    import sys

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit on open files is {hard}: the child cannot raise it to 4096")
    script = """
import errno, resource
from privacy.durable import DESCRIPTOR_HEADROOM, ensure_descriptors
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))
ensure_descriptors(1000, "1000 clients' ledgers")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
assert 1000 + DESCRIPTOR_HEADROOM < soft <= hard == 4096, (soft, hard)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 512))
try:
    ensure_descriptors(1000, "1000 clients' ledgers")
except OSError as err:
    assert err.errno == errno.EMFILE and "1000 clients' ledgers need" in str(err)
    assert "hard limit of 512" in str(err), err
else:
    raise AssertionError("no error")
assert resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 512)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
