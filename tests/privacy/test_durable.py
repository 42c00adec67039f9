"""Durable writes: a torn tail moved aside never replaces bytes moved aside before."""

from pathlib import Path

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
