"""A Flower node's release journal (``runs/<run>/releases.jsonl``) is read and verified once
per reply: the check for bytes already journaled and the append share that read, and every
check still holds (a journal damaged before, or changed between the read and the append, is
refused and nothing is written)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.client_app import _journal_reply
from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE, MSG_ROUND, RunSettings
from secure_fedora.runtimes.flower.state import NodeStateError, ReleaseJournal
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)


def _reply(journal: ReleaseJournal, saved: tuple[int, str] | None, client: int, wire: int,
           kind: str, blob: bytes, *, remade: bool) -> tuple[int, str]:
    with journal.reading() as verified:  # a message's one read
        return _journal_reply(verified, saved, client, wire, kind, blob, remade=remade)


def _journal(tmp_path: Path, lines: int = 5) -> ReleaseJournal:
    journal = ReleaseJournal(tmp_path / "releases.jsonl")
    for k in range(lines):
        journal.append(k % 2, k, "fedavg/round", bytes([k]) * 16)
    return journal


def test_a_reply_is_journaled_once_and_its_head_returned(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    saved = journal.head()
    head = _reply(journal, saved, 1, 9, "fedavg/round", b"reply", remade=False)
    assert head == journal.head() and head[0] == 6
    assert journal.entries()[-1]["payload_sha256"] == hashlib.sha256(b"reply").hexdigest()
    # the same bytes made again past the saved head are not journaled twice
    assert _reply(journal, saved, 1, 9, "fedavg/round", b"reply", remade=True) == head
    assert len(journal.entries()) == 6
    with pytest.raises(NodeStateError, match="resume diverged"):
        _reply(journal, saved, 1, 9, "fedavg/round", b"other", remade=True)
    assert len(journal.entries()) == 6


def test_a_first_reply_creates_the_journal(tmp_path: Path) -> None:
    journal = ReleaseJournal(tmp_path / "runs" / "7" / "releases.jsonl")
    head = _reply(journal, None, 0, 0, "fedora/setup", b"summary", remade=False)
    assert head == journal.head() and head[0] == 1
    assert oct(journal.path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("damage", ["edited", "torn"])
def test_a_damaged_journal_is_refused_before_a_reply_is_journaled(tmp_path: Path,
                                                                  damage: str) -> None:
    journal = _journal(tmp_path)
    saved = journal.head()
    lines = journal.path.read_bytes().splitlines(keepends=True)
    if damage == "edited":
        entry = json.loads(lines[2])
        entry["payload_bytes"] += 1
        lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    else:
        lines.append(b'{"seq":5,')
    journal.path.write_bytes(b"".join(lines))
    before = journal.path.read_bytes()
    with pytest.raises(NodeStateError, match="hash mismatch" if damage == "edited" else "torn"):
        _reply(journal, saved, 1, 9, "fedavg/round", b"reply", remade=False)
    assert journal.path.read_bytes() == before


def _other_writer_appends(journal: ReleaseJournal) -> None:
    with open(journal.path, "ab") as f:
        f.write(b'{"written":"by another process"}\n')


def _other_writer_replaces(journal: ReleaseJournal) -> None:
    copy = journal.path.with_suffix(".copy")
    copy.write_bytes(journal.path.read_bytes())
    os.replace(copy, journal.path)


def _other_writer_edits_in_place(journal: ReleaseJournal) -> None:
    data = bytearray(journal.path.read_bytes())
    data[data.index(b'"client":0') + 10] = ord("1")  # same size
    journal.path.write_bytes(bytes(data))
    st = journal.path.stat()
    os.utime(journal.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize("change", [_other_writer_appends, _other_writer_replaces,
                                    _other_writer_edits_in_place, lambda j: j.path.unlink()])
def test_a_journal_changed_between_its_read_and_the_append_is_refused(tmp_path: Path,
                                                                      change) -> None:  # type: ignore[no-untyped-def]
    journal = _journal(tmp_path)
    with journal.appending() as verified:
        assert len(verified.entries) == 5
        change(journal)
        after = journal.path.read_bytes() if journal.path.exists() else None
        with pytest.raises(NodeStateError, match="changed since it was verified"):
            verified.append(1, 9, "fedavg/round", b"reply")
    assert (journal.path.read_bytes() if journal.path.exists() else None) == after


def test_a_journal_created_between_its_read_and_the_first_append_is_refused(
        tmp_path: Path) -> None:
    journal = ReleaseJournal(tmp_path / "releases.jsonl")
    with journal.appending() as verified:
        assert verified.entries == []
        _journal(tmp_path, 1)
        with pytest.raises(NodeStateError, match="changed since it was verified"):
            verified.append(1, 9, "fedavg/round", b"reply")
    assert len(journal.entries()) == 1


def test_appends_through_one_read_chain_like_separate_appends(tmp_path: Path) -> None:
    journal = _journal(tmp_path, 0)
    with journal.appending() as verified:
        verified.append(0, 0, "summary", b"a")
        verified.append(0, 1, "model", b"b")
        assert verified.head() == journal.head()
    journal.append(0, 2, "model", b"c")
    assert [e["seq"] for e in journal.entries()] == [0, 1, 2]


def test_a_torn_line_is_repaired_from_the_read_and_must_be_before_an_append(
        tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    with journal.path.open("ab") as fh:
        fh.write(b'{"seq":5,')
    with journal.reading() as verified:
        assert len(verified.entries) == 5 and verified.holds(journal.head())
        with pytest.raises(NodeStateError, match="incomplete .torn write"):
            verified.append(1, 9, "fedavg/round", b"reply")
        moved = verified.repair_torn_tail()
        assert moved == tmp_path / "releases.jsonl.torn-5"
        assert moved.read_bytes() == b'{"seq":5,'
        verified.append(1, 9, "fedavg/round", b"reply")
    assert verified.head() == journal.head() and journal.head()[0] == 6


@pytest.mark.parametrize("change", [_other_writer_appends, _other_writer_replaces,
                                    lambda j: j.path.unlink()])
def test_a_journal_changed_between_its_read_and_the_repair_is_refused(tmp_path: Path,
                                                                      change) -> None:  # type: ignore[no-untyped-def]
    """The torn line is cut off as the message read it: a file changed since is not cut."""
    journal = _journal(tmp_path)
    with journal.path.open("ab") as fh:
        fh.write(b'{"seq":5,')
    with journal.reading() as verified:
        change(journal)
        after = journal.path.read_bytes() if journal.path.exists() else None
        with pytest.raises(NodeStateError, match="changed since it was verified.*torn last"
                                                 " line was not moved"):
            verified.repair_torn_tail()
    assert (journal.path.read_bytes() if journal.path.exists() else None) == after
    assert not list(tmp_path.glob("releases.jsonl.torn-*"))


@pytest.mark.usefixtures("task_identity")
def test_a_message_opens_the_node_journal_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each message read and verified releases.jsonl three or four times (its cost grows with
    the run); now once, for the checks, the repair and the append together."""
    journal = tmp_path / "nodes" / "node-1" / "runs" / "42" / "releases.jsonl"
    counting: list[int] = []  # opens of client 1's journal in the message being handled
    reads: dict[str, int] = {}
    real_open, real_read_bytes = os.open, Path.read_bytes

    def counted_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if counting and Path(path) == journal:
            counting[0] += 1
        return real_open(path, *args, **kwargs)

    def counted_read_bytes(self: Path) -> bytes:
        if counting and self == journal:
            counting[0] += 1
        return real_read_bytes(self)

    monkeypatch.setattr(os, "open", counted_open)
    monkeypatch.setattr(Path, "read_bytes", counted_read_bytes)

    def start(message):  # type: ignore[no-untyped-def]
        counting[:] = [0]
        return message

    def stop(kind: str):  # type: ignore[no-untyped-def]
        def note(_request, reply):  # type: ignore[no-untyped-def]
            reads[kind] = counting.pop()
            return reply
        return note

    cfg = with_methods(tiny_config(), "fedavg")
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir(exist_ok=True)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_request={(1, 2, k): start for k in (MSG_ROUND, MSG_EVALUATE)},
                        tamper_reply={(1, 2, k): stop(k) for k in (MSG_ROUND, MSG_EVALUATE)})
    server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert not grid.errors
    assert reads == {MSG_ROUND: 1, MSG_EVALUATE: 1}
