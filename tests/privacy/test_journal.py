"""The release journal: sealed, ordered, durable records; torn tails quarantined."""

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy.journal import (
    JournalError,
    JournalRecord,
    ReleaseJournal,
    RoundMarks,
    marks_header,
    marks_written,
    payload_digest,
)
from tests.fifo_support import NOT_REGULAR_KINDS, not_a_regular_file
from tests.marks_support import mark_lines

KEY = X25519PrivateKey.generate()


def _record(rnd: int, kind: str = "model") -> JournalRecord:
    state = b"\x00\x01" * 50
    return JournalRecord(rnd, kind, rnd, payload_digest(b"payload %d" % rnd),
                         payload_digest(state), state)


def test_records_round_trip_and_are_sealed(tmp_path):
    path = tmp_path / "c1.journal"
    journal = ReleaseJournal(path, "c1", "fedora", KEY)
    assert journal.get(1, "model") is None
    written = journal.append(_record(1))
    journal.append(_record(2))
    assert path.stat().st_size == written + len(path.read_bytes().splitlines()[1]) + 1
    assert b"\x00\x01" * 50 not in path.read_bytes() and b"payload" not in path.read_bytes()
    again = ReleaseJournal(path, "c1", "fedora", KEY)
    assert len(again) == 2 and again.get(2, "model") == _record(2)
    with pytest.raises(JournalError, match="already holds"):
        again.append(_record(2))


def test_records_are_bound_to_client_scope_key_and_position(tmp_path):
    path = tmp_path / "c1.journal"
    journal = ReleaseJournal(path, "c1", "fedora", KEY)
    journal.append(_record(1))
    journal.append(_record(2))
    for client, scope, key in (("c2", "fedora", KEY), ("c1", "fedavg", KEY),
                               ("c1", "fedora", X25519PrivateKey.generate())):
        with pytest.raises(JournalError, match="line 0"):
            ReleaseJournal(path, client, scope, key)
    lines = path.read_bytes().splitlines()
    path.write_bytes(lines[1] + b"\n" + lines[0] + b"\n")  # reordered
    with pytest.raises(JournalError, match="unreadable"):
        ReleaseJournal(path, "c1", "fedora", KEY)


def test_torn_last_record_is_quarantined(tmp_path):
    path = tmp_path / "c1.journal"
    journal = ReleaseJournal(path, "c1", "fedora", KEY)
    journal.append(_record(1))
    intact = path.read_bytes()
    path.write_bytes(intact + b"U0ZTRUFMAQ")
    reopened = ReleaseJournal(path, "c1", "fedora", KEY)
    assert reopened.quarantined is not None and reopened.quarantined.read_bytes() == b"U0ZTRUFMAQ"
    assert path.read_bytes() == intact and len(reopened) == 1
    reopened.append(_record(2))
    assert len(ReleaseJournal(path, "c1", "fedora", KEY)) == 2


def test_digest_only_records_and_state_digest_mismatch(tmp_path):
    path = tmp_path / "c1.journal"
    journal = ReleaseJournal(path, "c1", "fedora", KEY)
    digest_only = JournalRecord(1, "model", 1, payload_digest(b"p"), payload_digest(b"state"))
    journal.append(digest_only)
    journal.append(JournalRecord(2, "model", 2, payload_digest(b"p"), payload_digest(b"other"),
                                 b"state"))  # the state does not match its digest
    with pytest.raises(JournalError, match="line 1"):
        ReleaseJournal(path, "c1", "fedora", KEY)
    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])
    assert ReleaseJournal(path, "c1", "fedora", KEY).get(1, "model") == digest_only


def test_a_torn_tail_is_moved_aside_only_once_the_journal_reads(tmp_path):
    """Opening moved a torn last line aside before reading the records, so a journal refused
    for a damaged record had been changed on disk all the same; skipped (quarantine=False),
    it was appended after. Now the tail is moved only once every record reads, appends wait
    for it, and quarantine_torn_tail moves it later."""
    path = tmp_path / "c1.journal"
    journal = ReleaseJournal(path, "c1", "fedora", KEY)
    journal.append(_record(1))
    journal.append(_record(2))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[1] + lines[0][:20])  # a record out of place, then a torn one
    before = path.read_bytes()
    with pytest.raises(JournalError, match="line 0"):
        ReleaseJournal(path, "c1", "fedora", KEY)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))
    path.write_bytes(lines[0] + lines[1][:20])
    skipped = ReleaseJournal(path, "c1", "fedora", KEY, quarantine=False)
    with pytest.raises(JournalError, match="torn line"):
        skipped.append(_record(3))
    assert path.read_bytes() == lines[0] + lines[1][:20]
    moved = skipped.quarantine_torn_tail()
    assert moved is not None and moved.read_bytes() == lines[1][:20]
    skipped.append(_record(3))
    assert [r.round for r in ReleaseJournal(path, "c1", "fedora", KEY)] == [1, 3]


def test_an_entry_journaled_whole_keeps_its_line(tmp_path):
    """A refusal, close or repair entry is journaled with its line, bound to its digest."""
    line = '{"index":4,"mechanism":"close","round":2}'
    record = JournalRecord.for_entry(line)
    assert (record.kind, record.round, record.ledger_index) == ("close@4", 2, 4)
    path = tmp_path / "c1.journal"
    ReleaseJournal(path, "c1", "fedora", KEY).append(record)
    assert ReleaseJournal(path, "c1", "fedora", KEY).get(2, "close@4").ledger_line == line
    with pytest.raises(ValueError, match="ledger_line"):
        JournalRecord.from_json(record.to_json().replace("close", "clos").encode())


def test_round_marks_are_durable_increasing_and_idempotent(tmp_path):
    path = tmp_path / "rounds.released"
    marks = RoundMarks(path)
    assert marks.last == -1 and not path.exists()
    assert marks.mark(0, range(3)) > 0 and marks.mark(2, [0, 1, 2]) > 0
    assert marks.mark(2, [0]) == 0 and marks.mark(1, [0]) == 0  # marked already: nothing written
    assert mark_lines(path) == ('{"round":0,"clients":[[0,2]]}\n'
                                '{"round":2,"clients":[[0,2]]}\n')
    reopened = RoundMarks(path)
    assert reopened.last == 2 and reopened.format == 2 and len(reopened) == 3  # with the header


def test_a_failed_write_changes_no_mark_or_record_state_and_refuses_until_reopened(
        tmp_path, monkeypatch):
    """A first mark whose write failed (half of it on disk) had already switched the marks to
    format 2, so marking again wrote a line without its header after the torn half; a journal
    append after a failed write appended after the torn half too. Now the state is as it was,
    each refuses until reopened, and the reopened file, its tear moved aside, takes the mark
    or record an untouched one takes."""
    from privacy import journal as module

    real = module.append_durably

    def torn(path, data):
        real(path, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    marks, twin = RoundMarks(tmp_path / "rounds.released"), RoundMarks(tmp_path / "twin")
    records = ReleaseJournal(tmp_path / "c1.journal", "c1", "fedora", KEY)
    monkeypatch.setattr(module, "append_durably", torn)
    for failing in (lambda: marks.mark(1, [0]), lambda: records.append(_record(1))):
        with pytest.raises(OSError):
            failing()
    monkeypatch.setattr(module, "append_durably", real)
    assert (marks.format, marks.last, len(marks), len(records)) == (None, -1, 0, 0)
    after_failure = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(JournalError, match="an earlier write failed"):
        marks.mark(1, [0])
    with pytest.raises(JournalError, match="an earlier write failed"):
        records.append(_record(1))
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == after_failure
    marks = RoundMarks(tmp_path / "rounds.released")
    records = ReleaseJournal(tmp_path / "c1.journal", "c1", "fedora", KEY)
    marks.mark(1, [0])
    twin.mark(1, [0])
    records.append(_record(1))
    assert mark_lines(tmp_path / "rounds.released") == mark_lines(tmp_path / "twin")
    reopened = RoundMarks(tmp_path / "rounds.released")
    assert (reopened.format, reopened.last, len(reopened)) == (2, 1, 2)
    assert ReleaseJournal(tmp_path / "c1.journal", "c1", "fedora", KEY).get(1, "model") \
        == _record(1)


def test_a_mark_covers_the_clients_admitted_when_it_was_written_and_every_earlier_round(
        tmp_path):
    path = tmp_path / "rounds.released"
    RoundMarks(path).mark(3, [7, 0, 2, 1, 9, 8])
    assert b'"clients":[[0,2],[7,9]]' in path.read_bytes()  # merged index ranges
    marks = RoundMarks(path)
    assert [c for c in range(11) if marks.covers(3, c)] == [0, 1, 2, 7, 8, 9]
    assert all(marks.covers(2, c) for c in range(11))  # round 3's releases began after round 2
    assert not any(marks.covers(4, c) for c in range(11))
    # a line written before marks named their clients covers every client
    path.write_bytes(b'{"round":1}\n')
    assert RoundMarks(path).covers(1, 12345)


def test_a_torn_last_mark_marks_nothing_and_is_moved_aside_only_when_asked(tmp_path):
    path = tmp_path / "rounds.released"
    path.write_bytes(b'{"round":1}\n{"rou')
    marks = RoundMarks(path, quarantine=False)
    assert marks.last == 1 and path.read_bytes() == b'{"round":1}\n{"rou'  # nothing written
    with pytest.raises(JournalError, match="torn line"):
        marks.mark(2, [0])
    assert marks.torn == b'{"rou'
    moved = marks.quarantine_torn_tail()
    assert moved is not None and moved.read_bytes() == b'{"rou' and marks.torn is None
    assert marks.mark(2, [0]) > 0
    assert path.read_bytes() == b'{"round":1}\n{"round":2,"clients":[[0,0]]}\n'


@pytest.mark.parametrize("damage", [b'{"round":2}\n{"round":1}\n', b'{"round":2}\nxx\n',
                                    b'{"round":true}\n', b'{"round":1,"x":0}\n',
                                    b'{"round":1,"clients":[[2,1]]}\n',
                                    b'{"round":1,"clients":[[0,1],[2,3]]}\n',
                                    b'{"round":1,"clients":[[-1,0]]}\n',
                                    b'{"round":1,"clients":[[0,true]]}\n',
                                    b'{"round":1,"clients":7}\n'])
def test_damaged_round_marks_are_refused_naming_the_file_and_line(tmp_path, damage):
    path = tmp_path / "rounds.released"
    path.write_bytes(damage)
    with pytest.raises(JournalError, match=r"rounds\.released' line \d: not a mark"):
        RoundMarks(path)
    assert path.read_bytes() == damage


def _marked(path, *rounds):
    """A new format-2 marks file at ``path`` holding ``rounds`` as (round, clients) pairs."""
    path.write_bytes(marks_header())
    marks = RoundMarks(path)
    for rnd, clients in rounds:
        marks.mark(rnd, clients)
    return path.read_bytes().splitlines(keepends=True)


def test_a_mark_from_another_run_or_round_breaks_the_chain_and_is_refused(tmp_path):
    """Format 2 chains each mark to the line before it, back to a header naming the run: a
    mark of another run covering fewer clients (it would leave clients 1 and 2 unmarked, so
    their cut records would pass for the crash window), a mark moved from another round, or
    an earlier line changed, are refused naming the line; a format-1 file took any of them."""
    ours = _marked(tmp_path / "rounds.released", (1, [0, 1, 2]), (2, [0, 1, 2]))
    theirs = _marked(tmp_path / "other", (1, [0, 1, 2]), (2, [0]))
    third = _marked(tmp_path / "third", (1, [0, 1, 2]), (3, [0, 1, 2]))
    path = tmp_path / "rounds.released"
    for damaged, line in [(ours[:2] + theirs[2:], 2), (ours[:1] + theirs[1:], 1),
                          (ours[:2] + third[2:], 2),
                          ([ours[0], ours[1].replace(b"[[0,2]]", b"[[0,1]]"), ours[2]], 2)]:
        path.write_bytes(b"".join(damaged))
        with pytest.raises(JournalError, match=rf"rounds\.released' line {line}: .*not chained"
                           " to the line before it"):
            RoundMarks(path)
        assert path.read_bytes() == b"".join(damaged)  # nothing moved or written


@pytest.mark.parametrize("header", [b'{"round_marks":3,"run":"00"}\n',
                                    b'{"round_marks":2,"run":"xyz"}\n',
                                    b'{"round_marks":2}\n'])
def test_an_unknown_or_damaged_marks_header_is_refused(tmp_path, header):
    path = tmp_path / "rounds.released"
    path.write_bytes(header)
    with pytest.raises(JournalError, match=r"round-marks format 3, which this version does not"
                       r" read|line 0: not a round-marks header"):
        RoundMarks(path)


def test_format_1_marks_are_read_and_extended_in_format_1_and_an_empty_file_gets_a_header(
        tmp_path):
    """A run written before format 2 keeps its file's format (its lines carry no chain); an
    empty or missing file (a new run creates its file with the header) gets the header in
    the same write as its first mark."""
    old = tmp_path / "old"
    old.write_bytes(b'{"round":1,"clients":[[0,2]]}\n')
    marks = RoundMarks(old)
    assert marks.format == 1 and marks.mark(2, [0, 1]) > 0
    assert old.read_bytes() == b'{"round":1,"clients":[[0,2]]}\n{"round":2,"clients":[[0,1]]}\n'
    assert marks_written(old)
    for path in (tmp_path / "empty", tmp_path / "missing"):
        if path.name == "empty":
            path.write_bytes(b"")
        marks = RoundMarks(path)
        assert marks.format is None and not marks_written(path)
        marks.mark(0, [0])
        reopened = RoundMarks(path)
        assert (reopened.format, reopened.last, len(reopened)) == (2, 0, 2)
    fresh = tmp_path / "fresh"
    fresh.write_bytes(marks_header())
    assert RoundMarks(fresh).format == 2 and not marks_written(fresh)


@pytest.mark.parametrize("kind", NOT_REGULAR_KINDS)
def test_a_journal_or_marks_path_that_is_no_regular_file_is_refused(tmp_path, kind):
    """A journal or round-marks file replaced by a link to /dev/zero was read whole (out of
    memory), a FIFO waited on forever (found by generated corruptions of a run's files): each
    is now a JournalError naming the file, at once."""
    import re

    for name, opener in (("c1.journal", lambda p: ReleaseJournal(p, "c1", "fedora", KEY)),
                         ("rounds.released", RoundMarks)):
        with not_a_regular_file(tmp_path / name, kind) as path, \
                pytest.raises(JournalError, match=re.escape(str(path))):
            opener(path)
