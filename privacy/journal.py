"""The release journal: what each accounted release was, sealed to its client, beside the ledger.

The ledger says *that* a release was accounted; the journal says *what* it was, so a resumed
run can re-send exactly that release instead of drawing new noise (and the budget gate does
not account it twice). One append-only file per client (``<client-id>.journal`` next to
``<client-id>.jsonl``); each line is the base64 of a sealed blob (:func:`privacy.sealing.seal`
to the client's own X25519 key), whose plaintext is the canonical JSON of a
:class:`JournalRecord`. The blob's associated data binds the scope (e.g. the method), the
client and the record's position, so records cannot be reordered or moved between clients or
methods without failing authentication.

Order for one release (write-ahead): ledger entries fsynced, then the journal record fsynced,
then the release leaves the client. A crash before the journal record is durable leaves an
accounted release that never left (the resume then makes it, once); a torn last journal line
is such a record (nothing was released): :class:`ReleaseJournal` quarantines it on open (with
``quarantine=True``, the default; a resume opens with ``quarantine=False`` and moves it aside
with :meth:`ReleaseJournal.quarantine_torn_tail` only once its checks passed).

The last release a ledger records may lack its record (the crash window above), so a cut
of a complete record would look the same; where several clients' releases of a round leave
together, :class:`RoundMarks` closes that gap: after the round's last journal record and
before any of its releases leaves, one fsynced line marks the round, so a record missing
from a marked round was cut, never left unwritten by a crash. Its file starts with a header
line naming the run and chains each mark to the line before it (format 2), so a mark taken
from another run or round is refused; a torn last mark shows its round's records were all
written, and an empty file that it was cut.

Entries that record no release (a refusal, a close, a repair) are journaled too, after they
are fsynced, with their whole signed line (:meth:`JournalRecord.for_entry`): a ledger cut
inside or after one of them is restored from the journal bit for bit, never "repaired" as a
write that did not complete.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy.durable import SyncBatch, append_durably, move_tail_aside
from privacy.errors import ToolkitError
from privacy.paths import read_regular_bytes
from privacy.sealing import SealingError, open_sealed, seal

__all__ = ["ADMITTING_NAME", "MARKS_NAME", "JournalError", "JournalRecord", "ReleaseJournal", "RoundMarks",
           "payload_digest"]

JOURNAL_VERSION = 1
_AAD_PREFIX = b"secure-fedora/release-journal/v1"
_KEY = tuple[int, str]


class JournalError(ToolkitError, ValueError):
    """A journal cannot be read, opened or appended to; the message names the file and line."""


def payload_digest(data: bytes) -> str:
    """SHA-256 hex of a release payload's bytes (what the record pins)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class JournalRecord:
    """One journaled release.

    ``ledger_index`` is the index of the release's last ledger entry; ``payload_sha256`` the
    digest of the payload the gate saw; ``noise_state_sha256`` the digest of the state of the
    client's randomness *before* the release's draws (e.g. a ``torch.Generator`` state), and
    ``noise_state`` that state itself, from which the release (and everything the client
    computes with the same draws) is reproduced. ``noise_state`` may be empty when the noise
    is reproducible from the run's checkpoint and seed (the digest then checks the re-run).
    ``ledger_entry_sha256`` is the hash of that ledger entry's line (empty in records written
    before it was kept): it binds the record to this run's ledger, whose lines are signed and
    timestamped, so a journal of another run of the same config and keys does not pass.
    ``ledger_line`` is set only in the record of an entry that records no release
    (:meth:`for_entry`): that entry's whole line, from which a cut ledger is restored.
    """

    round: int
    kind: str
    ledger_index: int
    payload_sha256: str
    noise_state_sha256: str
    noise_state: bytes = b""
    ledger_entry_sha256: str = ""
    ledger_line: str = ""

    @classmethod
    def for_entry(cls, line: str) -> JournalRecord:
        """The record of the ledger entry whose line (canonical JSON, no newline) is ``line``,
        for an entry that records no release: kind ``<mechanism>@<index>`` (unique per
        ledger), both digests over the line, the line itself kept."""
        entry = json.loads(line)
        digest = payload_digest(line.encode("utf-8"))
        return cls(entry["round"], f"{entry['mechanism']}@{entry['index']}", entry["index"],
                   digest, payload_digest(b""), b"", digest, line)

    def to_json(self) -> str:
        """The record as one canonical JSON line (what ``from_json`` reads back)."""
        doc = {"version": JOURNAL_VERSION, "round": self.round, "kind": self.kind,
               "ledger_index": self.ledger_index,
               "payload_sha256": self.payload_sha256,
               "noise_state_sha256": self.noise_state_sha256,
               "noise_state": base64.b64encode(self.noise_state).decode("ascii")}
        if self.ledger_entry_sha256:
            doc["ledger_entry_sha256"] = self.ledger_entry_sha256
        if self.ledger_line:
            doc["ledger_line"] = self.ledger_line
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: bytes) -> JournalRecord:
        """The record a ``to_json`` line holds; ValueError for anything else (another version, a
        field of the wrong type, a noise state or ledger line that does not match its digest)."""
        obj: Any = json.loads(text)
        if not isinstance(obj, dict) or obj.get("version") != JOURNAL_VERSION:
            raise ValueError(f"not a version-{JOURNAL_VERSION} journal record")
        rnd, kind, index = obj.get("round"), obj.get("kind"), obj.get("ledger_index")
        if not (isinstance(rnd, int) and not isinstance(rnd, bool) and rnd >= 0):
            raise ValueError(f"round must be an int >= 0, got {rnd!r}")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        if not (isinstance(index, int) and not isinstance(index, bool) and index >= 0):
            raise ValueError(f"ledger_index must be an int >= 0, got {index!r}")
        digests = [obj.get("payload_sha256"), obj.get("noise_state_sha256")]
        if not all(isinstance(d, str) and len(d) == 64 for d in digests):
            raise ValueError("payload_sha256 and noise_state_sha256 must be 64 hex characters")
        state = base64.b64decode(obj["noise_state"], validate=True)
        if state and payload_digest(state) != digests[1]:
            raise ValueError("noise_state does not match noise_state_sha256")
        entry = obj.get("ledger_entry_sha256", "")
        if not (isinstance(entry, str) and len(entry) in (0, 64)):
            raise ValueError("ledger_entry_sha256 must be 64 hex characters")
        line = obj.get("ledger_line", "")
        if not isinstance(line, str) or (line and payload_digest(line.encode("utf-8")) != entry):
            raise ValueError("ledger_line does not match ledger_entry_sha256")
        return cls(rnd, kind, index, digests[0], digests[1], state, entry, line)


class ReleaseJournal:
    """One client's release journal (sealed records, fsynced appends).

    Opening reads and opens every record with ``agreement_key`` (the client's X25519 private
    key). A last line without its newline (an append that never completed) is moved to
    ``<journal>.torn-<position>`` and cut off; :attr:`quarantined` names it (with
    ``quarantine=False`` it is only skipped, and opening writes nothing, until
    :meth:`quarantine_torn_tail`; appending is refused meanwhile). Any other damage (a record
    that fails authentication, a duplicate (round, kind)) raises JournalError.
    """

    def __init__(self, path: str | os.PathLike[str], client_id: str, scope: str,
                 agreement_key: X25519PrivateKey, *, quarantine: bool = True) -> None:
        if not isinstance(agreement_key, X25519PrivateKey):
            raise JournalError(f"agreement_key must be an X25519PrivateKey, got"
                               f" {type(agreement_key).__name__}")
        self.path = Path(path)
        self.client_id = client_id
        self.scope = scope
        self._key = agreement_key
        self._public = agreement_key.public_key()
        self.quarantined: Path | None = None
        self._torn: tuple[bytes, int, int] | None = None
        self._broken = False
        self._records: dict[_KEY, JournalRecord] = {}
        self._count = 0
        self._load(quarantine)

    def _aad(self, position: int) -> bytes:
        return b"|".join([_AAD_PREFIX, self.scope.encode(), self.client_id.encode(),
                          str(position).encode()])

    def _load(self, quarantine: bool) -> None:
        lines, self._torn = _read_lines(self.path, "journal")
        for pos, line in enumerate(lines):
            where = f"journal {str(self.path)!r} line {pos}"
            try:
                blob = base64.b64decode(line, validate=True)
                record = JournalRecord.from_json(open_sealed(blob, self._key, self._aad(pos)))
            except (binascii.Error, SealingError, ValueError, KeyError) as exc:
                raise JournalError(f"{where}: unreadable record ({exc})") from None
            key = (record.round, record.kind)
            if key in self._records:
                raise JournalError(f"{where}: a second record for round {record.round}"
                                   f" {record.kind!r}")
            self._records[key] = record
        self._count = len(lines)
        if quarantine:  # only once every complete record has been read and checked
            self.quarantine_torn_tail()

    def quarantine_torn_tail(self) -> Path | None:
        """Move a torn last line skipped on open to ``<journal>.torn-<position>`` (fsynced;
        ``.torn-<position>.<n>`` when an earlier tear there holds that name) and cut it off;
        returns that file (:attr:`quarantined`), None when there was none."""
        if self._torn is None:
            return None
        torn, position, cut = self._torn
        target = move_tail_aside(self.path, cut, torn,
                                 self.path.with_name(f"{self.path.name}.torn-{position}"))
        self._torn = None
        self.quarantined = target
        return target

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[JournalRecord]:
        return iter(list(self._records.values()))

    def get(self, rnd: int, kind: str) -> JournalRecord | None:
        """The record of the round-``rnd`` release of ``kind``, or None if none was journaled."""
        return self._records.get((rnd, kind))

    def append(self, record: JournalRecord, syncs: SyncBatch | None = None) -> int:
        """Seal and durably append ``record`` (fsynced, the directory too on creation);
        returns the bytes written. Refuses a second record for the same (round, kind).
        With ``syncs`` the line is written and its fsync issued on that batch: it is durable
        once ``syncs.wait()`` has returned without naming this journal."""
        if self._torn is not None:
            raise JournalError(f"journal {str(self.path)!r} ends in a torn line; quarantine it"
                               " (quarantine_torn_tail) before appending")
        if self._broken:
            raise JournalError(f"journal {str(self.path)!r}: an earlier write failed; reopen"
                               " it to check the file before appending")
        key = (record.round, record.kind)
        if key in self._records:
            raise JournalError(f"journal {str(self.path)!r} already holds round {record.round}"
                               f" {record.kind!r}")
        blob = seal(record.to_json().encode(), self._public, self._aad(self._count))
        line = base64.b64encode(blob) + b"\n"
        try:
            if syncs is None:
                append_durably(self.path, line)
            else:
                syncs.append(self.path, line)
        except BaseException:
            self._broken = True  # a prefix of the line may be on disk: a reopen finds it
            raise
        self._records[key] = record
        self._count += 1
        return len(line)


def _read_lines(path: Path, what: str) -> tuple[list[bytes], tuple[bytes, int, int] | None]:
    """The complete lines of the append-only file ``path`` (none when it does not exist) and
    its torn tail, if any: the bytes after the last newline (a crash mid-append), their line
    number and offset. JournalError naming ``what`` when the file cannot be read or is no
    regular file (a link to a device would be read without end, a FIFO waited on)."""
    try:
        data = read_regular_bytes(path)
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        raise JournalError(f"cannot read {what} {str(path)!r}: {exc}") from exc
    cut = data.rfind(b"\n") + 1
    lines = data[:cut].split(b"\n")[:-1] if cut else []
    return lines, ((data[cut:], len(lines), cut) if data[cut:] else None)


#: File name of a federation's :class:`RoundMarks`, beside its ledgers and journals.
MARKS_NAME = "rounds.released"
#: A :class:`RoundMarks` file of the rounds whose admissions ran as one batch (their journal
#: fsyncs overlapping, every admission before any release of the round left): written before
#: the batch's first ledger entry; its lines cover no client.
ADMITTING_NAME = "rounds.admitting"


#: The round-marks file format this version writes (:class:`RoundMarks`).
MARKS_FORMAT = 2


def marks_header(run: str | None = None) -> bytes:
    """The first line of a new round-marks file (format :data:`MARKS_FORMAT`), naming ``run``
    (32 hex digits; a fresh random one when None): the start of the chain its marks extend,
    so a mark of another run cannot stand in for one of this run."""
    run = secrets.token_hex(16) if run is None else run
    return json.dumps({"round_marks": MARKS_FORMAT, "run": run},
                      separators=(",", ":")).encode() + b"\n"


def _line_digest(line: bytes) -> str:
    """What the next mark names as its ``prev``: the SHA-256 of ``line`` with its newline."""
    return hashlib.sha256(line + b"\n").hexdigest()


class RoundMarks:
    """The rounds whose releases were all journaled before any of them left (append-only,
    each line fsynced).

    Format 2 (what this version creates): a header line ``{"round_marks": 2, "run": <32 hex
    digits>}``, then one line ``{"round": r, "clients": [[first, last], ...], "prev": <hex>}``
    per round, rounds increasing; ``clients`` lists, as inclusive index ranges, the clients
    whose records the mark covers, and ``prev`` is the SHA-256 of the line before it (newline
    included), so a line taken from another run or round breaks the chain. Format 1 (runs
    written before it): no header and no ``prev``, a line without ``clients`` covering every
    client; it is read and extended in its own format (:attr:`format`).

    :meth:`mark` is called after a round's last journal record and before the round's first
    release leaves, so a covered client's release of a marked round has a complete record
    unless it was lost or cut afterwards (:meth:`covers`); an unmarked round's last records,
    and those of a client admitted after its round was marked (a method that releases one
    client before admitting the next), may be missing because of a crash (that release had
    not left). A torn last line (a crash mid-append) marks nothing: it is skipped on open
    (kept in :attr:`torn`) and moved to ``<file>.torn-<position>`` by
    :meth:`quarantine_torn_tail` (with ``quarantine=True`` on open); marking is refused
    meanwhile. Any other damage raises JournalError naming the file and line."""

    def __init__(self, path: str | os.PathLike[str], *, quarantine: bool = True) -> None:
        self.path = Path(path)
        self.last = -1
        #: The clients the last mark covers, as sorted inclusive index ranges (None: every
        #: client).
        self.last_clients: tuple[tuple[int, int], ...] | None = None
        #: 2 for a file with its header line, 1 for marks without one (an earlier version's
        #: file), None for an empty or missing file.
        self.format: int | None = None
        self._count = 0
        self._prev = ""
        self._broken = False
        lines, self._torn = _read_lines(self.path, "round marks")
        #: The bytes after the last newline found on open (a mark whose write began and did
        #: not complete), until they are moved aside; None when the file ends in a newline.
        self.torn: bytes | None = None if self._torn is None else self._torn[0]
        for pos, line in enumerate(lines):
            self._read_line(pos, line)
        self._count = len(lines)
        if quarantine:
            self.quarantine_torn_tail()

    def _read_line(self, pos: int, line: bytes) -> None:
        """Take line ``pos`` of the file, or raise JournalError naming it."""
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            obj = None
        if pos == 0 and isinstance(obj, dict) and "round_marks" in obj:
            version = obj["round_marks"]
            if version != MARKS_FORMAT:
                raise JournalError(
                    f"round marks {str(self.path)!r}: round-marks format {version!r}, which this"
                    f" version does not read (it reads formats 1 and {MARKS_FORMAT}); resume"
                    " with the version that wrote it")
            run = obj.get("run")
            if set(obj) != {"round_marks", "run"} or not (
                    isinstance(run, str) and len(run) == 32
                    and all(ch in "0123456789abcdef" for ch in run)):
                raise JournalError(
                    f"round marks {str(self.path)!r} line 0: not a round-marks header"
                    f" ({line[:60]!r}); the file was damaged: restore it from a copy, or start"
                    " a new run")
            self.format, self._prev = MARKS_FORMAT, _line_digest(line)
            return
        if self.format is None:
            self.format = 1
        keys = {"round", "clients", "prev"} if self.format == MARKS_FORMAT \
            else ({"round"}, {"round", "clients"})
        rnd = None
        if isinstance(obj, dict) and (set(obj) == keys if isinstance(keys, set)
                                      else set(obj) in keys):
            rnd = obj["round"]
            clients = _clients_of(obj["clients"]) if "clients" in obj else None
            if "clients" in obj and clients is None:
                rnd = None  # not a mark's index ranges
        if not (isinstance(rnd, int) and not isinstance(rnd, bool) and rnd > self.last):
            raise JournalError(
                f"round marks {str(self.path)!r} line {pos}: not a mark of a round after"
                f" round {self.last} in round-marks format {self.format} ({line[:60]!r}); the"
                " file was damaged: restore it from a copy, or start a new run")
        if self.format == MARKS_FORMAT:
            if obj["prev"] != self._prev:
                raise JournalError(
                    f"round marks {str(self.path)!r} line {pos}: the mark of round {rnd} is not"
                    " chained to the line before it (taken from another run or round, or an"
                    " earlier line was changed); the file was damaged: restore it from a copy,"
                    " or start a new run")
            self._prev = _line_digest(line)
        self.last, self.last_clients = rnd, clients

    def __len__(self) -> int:
        return self._count

    def quarantine_torn_tail(self) -> Path | None:
        """Move a torn last line skipped on open aside (as
        :meth:`ReleaseJournal.quarantine_torn_tail`); returns that file, None if none."""
        if self._torn is None:
            return None
        torn, position, cut = self._torn
        self._torn = self.torn = None
        return move_tail_aside(self.path, cut, torn,
                               self.path.with_name(f"{self.path.name}.torn-{position}"))

    def covers(self, rnd: int, client: int) -> bool:
        """Whether client ``client``'s round-``rnd`` records were all written before a release
        left: a later round is marked (rounds run one after another), or round ``rnd`` is
        marked and the mark covers the client."""
        if rnd != self.last:
            return rnd < self.last
        ranges = self.last_clients
        if ranges is None:
            return True
        k = bisect.bisect_right(ranges, (client, math.inf)) - 1
        return k >= 0 and ranges[k][0] <= client <= ranges[k][1]

    def mark(self, rnd: int, clients: Iterable[int]) -> int:
        """Durably mark round ``rnd`` as journaled for ``clients`` (indices; fsynced, the
        directory too on creation) unless it or a later round is marked already; returns the
        bytes written (0 when already marked). A file in format 1 gets a format-1 line; an
        empty or missing one its header first, in the same write."""
        if rnd <= self.last:
            return 0
        if self._torn is not None:
            raise JournalError(f"round marks {str(self.path)!r} end in a torn line; quarantine"
                               " it (quarantine_torn_tail) before marking")
        if self._broken:
            raise JournalError(f"round marks {str(self.path)!r}: an earlier write failed;"
                               " reopen the file to check it before marking")
        covered = _ranges_of(clients)
        head, fmt, prev = b"", self.format, self._prev
        if fmt is None:
            head = marks_header()
            fmt, prev = MARKS_FORMAT, _line_digest(head[:-1])
        body: dict[str, Any] = {"round": rnd, "clients": covered}
        if fmt == MARKS_FORMAT:
            body["prev"] = prev
        line = json.dumps(body, separators=(",", ":")).encode()
        try:
            append_durably(self.path, head + line + b"\n")
        except BaseException:
            self._broken = True  # a prefix of the bytes may be on disk: a reopen finds it
            raise
        self.format = fmt
        if fmt == MARKS_FORMAT:
            self._prev = _line_digest(line)
        self.last, self.last_clients = rnd, covered
        self._count += 1 + bool(head)
        return len(head) + len(line) + 1


def marks_written(path: Path) -> bool:
    """Whether the round-marks file ``path`` holds anything beyond its header line (the
    marks of a run; a file of a new run holds its header only)."""
    try:
        data = read_regular_bytes(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise JournalError(f"cannot read round marks {str(path)!r}: {exc}") from exc
    if data.startswith(b'{"round_marks":'):
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    return bool(data)


def _ranges_of(clients: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """``clients`` as sorted, merged inclusive ``(first, last)`` index ranges (one range for a
    round every client took part in, whatever the number of clients)."""
    out: list[list[int]] = []
    for c in sorted({int(c) for c in clients}):
        if c < 0:
            raise ValueError(f"client index {c} is negative")
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return tuple((a, b) for a, b in out)


def _clients_of(ranges: object) -> tuple[tuple[int, int], ...] | None:
    """A mark's ``clients`` as :func:`_ranges_of` writes them; None when they are not sorted,
    merged, inclusive ranges of non-negative integers (the line is then damaged)."""
    if not isinstance(ranges, list):
        return None
    end = -2
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                and end + 1 < r[0] <= r[1]):
            return None
        end = r[1]
    return tuple((a, b) for a, b in ranges)
