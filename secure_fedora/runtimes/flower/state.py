"""A SuperNode's durable state: its data partition, its models and its release journal.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, and a SuperNode may
crash or be restarted at any time, so everything a client needs between messages lives on
its local disk, under the ``state-dir`` given in its node config:

``partitions/<digest>.pt``
    The client's data partition (train / validation / test tensors), its client id, the
    digest of the data specification it was built from and a SHA-256 fingerprint of the
    tensors (checked on every load).
``runs/<run_id>/<method>/client.pt``
    The method's client state (:meth:`~secure_fedora.algorithms.contract.FederatedAlgorithm.
    client_state_dict`), the client's training-order RNG state (and, with reproducible DP
    noise only, its noise generator state), the last round answered per exchange and that
    answer (so a message delivered again is answered identically, without a second release),
    the heads of its ledger, the release journal and the method's envelope nonce memory
    (each must still be held at the next message), tagged with the run id, config hash and
    method (:class:`ClientRunState`).
``runs/<run_id>/<method>/<client id>.nonces.jsonl``
    The nonces of the server's messages this client accepted in that method's exchanges
    (:mod:`privacy.envelope`), fsynced before a message is acted on.
``runs/<run_id>/<method>/<client id>.jsonl``
    With DP, the client's signed privacy ledger for that method.
``runs/<run_id>/<method>/model.json``
    With DP, the fingerprint and architecture of the model the ledger's releases come from,
    written once the ledger is created (:func:`~secure_fedora.secure.private.create_ledgers_in`):
    with it present, a missing ledger was lost; missing beside a ledger with entries, it was.
``runs/<run_id>/<method>/<client id>.journal``
    With DP, sealed to the client (:mod:`privacy.journal`): each admitted release, after its
    ledger entries and before it is computed, with the state of the client's noise source
    before its draws (a CSPRNG's key and stream position; a reproducible generator's digest),
    so a release whose process died before saving its answer is re-made, not redrawn; and
    the ledger's refusal, close and repair entries, each whole (its signed line), so a ledger
    cut inside or after one is written back bit for bit.
``runs/<run_id>/releases.jsonl``
    An append-only, hash-chained journal: one JSON line per release (summary or model) with
    the SHA-256 of the released bytes, written and fsynced *before* the release is handed to
    Flower. A crash can leave a journal entry for a release that never left (over-counting),
    never a release without an entry. The journal is not signed: signatures and epsilon
    accounting belong to the privacy ledger (``privacy``), which the DP work plugs in here.

Every file is replaced atomically (temporary file, fsync, rename, directory fsync), so a
crash leaves either the old or the new version. Loads validate contents and raise
:class:`NodeStateError` naming the file on any inconsistency.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from privacy.durable import fsync_dir, move_tail_aside, write_all_and_fsync
from privacy.errors import ToolkitError
from secure_fedora.data.partition import ClientData
from secure_fedora.data.sources import fingerprint_client
from secure_fedora.runtimes.inprocess import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "ClientRunState",
    "JournalAppend",
    "NodeStateError",
    "ReleaseJournal",
    "load_partition",
    "save_partition",
]

_PARTITION_FORMAT = "secure-fedora/partition/v1"
_JOURNAL_GENESIS = "0" * 64


class NodeStateError(ToolkitError, RuntimeError):
    """A SuperNode's on-disk state is missing, corrupt, or belongs to another setup."""


def save_partition(path: Path, client: ClientData, data_digest: str) -> None:
    """Atomically write ``client``'s data with its fingerprint and data-spec digest."""
    state = {
        "round": 0,  # required by the checkpoint format; partitions have no rounds
        "format": _PARTITION_FORMAT,
        "client_id": int(client.client_id),
        "data_digest": data_digest,
        "fingerprint": fingerprint_client(client),
        "meta": json.dumps(client.meta, sort_keys=True, default=str),
        "tensors": {
            name: getattr(client, name)
            for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
        },
    }
    save_checkpoint(path, state)


def load_partition(path: Path, client_id: int, data_digest: str) -> ClientData:
    """Load and verify a partition written by :func:`save_partition`.

    Raises :class:`NodeStateError` if the file is unreadable, was built for another client or
    another data specification, or its tensors no longer match their fingerprint.
    """
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise NodeStateError(str(err)) from None
    if state.get("format") != _PARTITION_FORMAT:
        raise NodeStateError(f"{path} is not a secure-fedora partition file")
    if state.get("client_id") != client_id:
        raise NodeStateError(
            f"{path} holds client {state.get('client_id')}'s partition, but this node is "
            f"configured as partition-id {client_id}"
        )
    if state.get("data_digest") != data_digest:
        raise NodeStateError(
            f"{path} was built from another data specification (digest "
            f"{str(state.get('data_digest'))[:12]} != {data_digest[:12]}); use a fresh state-dir"
        )
    try:
        meta = json.loads(state.get("meta", "{}"))
        client = ClientData(client_id=client_id, meta=meta, **state["tensors"])
    except Exception as err:  # DataError or a wrong field set
        raise NodeStateError(f"{path} holds malformed tensors: {err}") from None
    if fingerprint_client(client) != state.get("fingerprint"):
        raise NodeStateError(f"{path}: tensors do not match their recorded fingerprint")
    return client


_RUN_STATE_FORMAT = "secure-fedora/client-run-state/v1"


def _check_payload(path: Path, name: str, value: Any) -> dict[str, Tensor]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()):
        raise NodeStateError(f"{path}: field {name} is not a mapping of names to tensors")
    for key, tensor in value.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NodeStateError(f"{path}: {name}[{key!r}] holds non-finite values")
    return value


@dataclass
class ClientRunState:
    """One client's state for one method of one Flower run (``runs/<run_id>/<method>/client.pt``).

    ``algorithm`` is the method's :meth:`client_state_dict` (empty before the first message),
    ``answered`` maps an exchange (setup, round, evaluate, finalize) to the last round this
    client answered in it, ``replies`` to that answer (payload tensors; ``metrics`` and
    ``refusals`` alongside), so a message delivered again (a restart, a retry) gets the same
    answer and nothing is trained or released twice. ``ledger_head`` (DP) is the ledger's
    head when the state was saved; ``journal_head`` the release journal's and ``nonce_head``
    the method's envelope nonce memory's (:meth:`privacy.envelope.EnvelopeVerifier.nonce_head`);
    ``ledger_journal_records`` (DP) the record count of the method's sealed journal.
    """

    client_id: int
    run_id: int
    config_hash: str
    method: str
    generator_state: Tensor
    algorithm: dict[str, Tensor] = field(default_factory=dict)
    noise_state: Tensor | None = None  # only with privacy.noise = "reproducible"
    answered: dict[str, int] = field(default_factory=dict)
    replies: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    # With DP: the method's ledger head (entries, hash of the last line) when this was saved;
    # the ledger must still hold it at the next message (else entries were lost or cut)
    ledger_head: tuple[int, str] | None = None
    # The node's release journal head (records, hash of the last) when this was saved; the
    # journal must still hold it at the next message (else records of releases were lost)
    journal_head: tuple[int, str] | None = None
    # The method scope's envelope nonce memory (privacy.envelope's nonce_head: oldest accepted
    # round and the nonces kept) once the message was accepted; the nonce file must still
    # hold it at the next message (else it was deleted, cut or edited: replays would pass)
    nonce_head: dict[str, Any] | None = None
    # With DP: how many records the method's sealed journal (<client id>.journal: each
    # admitted release with its noise state, and the ledger's refusal, close and repair
    # entries) held when this was saved; it must hold as many at the next message (records
    # are bound to their position, so fewer means it was cut or replaced)
    ledger_journal_records: int | None = None

    def save(self, path: Path) -> None:
        """Atomically replace ``path`` with this state (refusing non-finite tensors)."""
        _check_payload(path, "algorithm", self.algorithm)
        for stage, reply in self.replies.items():
            _check_payload(path, f"replies[{stage!r}]", reply)
        save_checkpoint(path, {"round": max(self.answered.values(), default=0),
                               "format": _RUN_STATE_FORMAT, **self.__dict__})

    @classmethod
    def load(cls, path: Path, client_id: int, run_id: int, config_hash: str,
             method: str) -> ClientRunState:
        """Load and verify ``path``; :class:`NodeStateError` if it belongs to another client,
        run, config or method, or is corrupt."""
        try:
            raw = load_checkpoint(path)
        except CheckpointError as err:
            raise NodeStateError(str(err)) from None
        if raw.get("format") != _RUN_STATE_FORMAT:
            raise NodeStateError(f"{path} is not a secure-fedora client run state file")
        for key, expected in (("client_id", client_id), ("run_id", run_id),
                              ("config_hash", config_hash), ("method", method)):
            if raw.get(key) != expected:
                raise NodeStateError(
                    f"{path} belongs to {key}={raw.get(key)!s:.16}, not {expected!s:.16}")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        try:
            state = cls(**fields)
        except TypeError as err:
            raise NodeStateError(f"{path} is missing fields: {err}") from None
        if not isinstance(state.generator_state, Tensor):
            raise NodeStateError(f"{path}: generator_state is not a tensor")
        head = state.journal_head
        if head is not None and not (
                isinstance(head, tuple | list) and len(head) == 2
                and isinstance(head[0], int) and not isinstance(head[0], bool) and head[0] >= 0
                and isinstance(head[1], str) and len(head[1]) == 64):
            raise NodeStateError(f"{path}: journal_head is not (records, hash): {head!r:.80}")
        records = state.ledger_journal_records
        if records is not None and not (isinstance(records, int)
                                        and not isinstance(records, bool) and records >= 0):
            raise NodeStateError(f"{path}: ledger_journal_records is not a count: {records!r:.80}")
        if state.nonce_head is not None and not is_nonce_head(state.nonce_head):
            raise NodeStateError(f"{path}: nonce_head is not (floor, nonces): "
                                 f"{state.nonce_head!r:.80}")
        _check_payload(path, "algorithm", state.algorithm)
        for stage, reply in state.replies.items():
            _check_payload(path, f"replies[{stage!r}]", reply)
        return state


def is_nonce_head(head: object) -> bool:
    """True for a well-formed :meth:`privacy.envelope.EnvelopeVerifier.nonce_head` (a floor
    and a list of ``[sender, nonce, round]``)."""
    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return (isinstance(head, dict) and set(head) == {"floor", "nonces"} and count(head["floor"])
            and isinstance(head["nonces"], list)
            and all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                    and isinstance(e[1], str) and count(e[2]) for e in head["nonces"]))


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


class ReleaseJournal:
    """Append-only, hash-chained record of what left this node (one JSON object per line).

    Each entry holds ``seq``, ``client``, ``round``, ``kind``, ``payload_sha256``,
    ``payload_bytes``, ``time``, ``prev`` (hash of the previous entry, zeros for the first)
    and ``hash`` (SHA-256 of the entry without ``hash``). Appends are flushed and fsynced
    before returning, so callers append *before* releasing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, *, torn_tail: bool = False) -> list[dict[str, Any]]:
        """All entries after verifying the chain; :class:`NodeStateError` on any break.

        A final line without a newline (a write torn by a crash) is reported as an error too
        (appends are fsynced before a release, so a torn line means the release did not
        leave), unless ``torn_tail``: then it is left out (:meth:`repair_torn_tail` moves it
        aside). Reads only.
        """
        if not self.path.exists():
            return []
        return self._verified(self.path.read_bytes(), torn_tail=torn_tail)

    def _verified(self, data: bytes, *, torn_tail: bool = False) -> list[dict[str, Any]]:
        if data and not data.endswith(b"\n"):
            if not torn_tail:
                raise NodeStateError(f"{self.path}: last entry is incomplete (torn write)")
            data = data[:data.rfind(b"\n") + 1]
        entries: list[dict[str, Any]] = []
        prev = _JOURNAL_GENESIS
        for number, line in enumerate(data.splitlines(), start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise NodeStateError(f"{self.path}:{number}: not JSON ({err})") from None
            if not isinstance(entry, dict) or "hash" not in entry:
                raise NodeStateError(f"{self.path}:{number}: not a journal entry")
            body = {k: v for k, v in entry.items() if k != "hash"}
            if entry.get("prev") != prev:
                raise NodeStateError(f"{self.path}:{number}: chain broken (prev hash mismatch)")
            if hashlib.sha256(_canonical(body)).hexdigest() != entry["hash"]:
                raise NodeStateError(f"{self.path}:{number}: entry hash mismatch (edited?)")
            if entry.get("seq") != number - 1:
                raise NodeStateError(f"{self.path}:{number}: sequence number {entry.get('seq')}")
            prev = entry["hash"]
            entries.append(entry)
        return entries

    def head(self) -> tuple[int, str]:
        """``(records, hash of the last)`` of the verified journal (a torn last line left
        out); ``(0, zeros)`` when it is empty or absent."""
        entries = self.entries(torn_tail=True)
        return len(entries), entries[-1]["hash"] if entries else _JOURNAL_GENESIS

    def holds(self, head: tuple[int, str]) -> bool:
        """Whether the verified journal still holds ``head`` (see :meth:`head`): at least that
        many records, the last of them with that hash (later appends extend it)."""
        with self.reading() as verified:
            return verified.holds(head)

    def repair_torn_tail(self) -> Path | None:
        """Move a torn last line (no newline: an append killed mid-write, whose release never
        left) to ``releases.jsonl.torn-<seq>`` beside the journal (fsynced; ``.torn-<seq>.<n>``
        when an earlier tear there holds that name), cut it off, and return that file; None
        when the journal ends in a complete line. The complete lines
        must verify first (any other damage stays a :class:`NodeStateError`, nothing moved).
        Call it only while no other process can append (the node's stage lock)."""
        with self.reading() as verified:
            return verified.repair_torn_tail()

    def append(self, client: int, rnd: int, kind: str, payload: bytes) -> dict[str, Any]:
        """Verify the chain, append one entry for ``payload`` and fsync; returns the entry."""
        with self.appending() as journal:
            return journal.append(client, rnd, kind, payload)

    @contextlib.contextmanager
    def appending(self) -> Iterator[JournalAppend]:
        """Open the journal once, read and verify it (:meth:`entries`, a torn last line an
        error), and yield a :class:`JournalAppend` holding those entries: the caller
        inspects them and appends through it, with no second read. The append refuses
        (:class:`NodeStateError`, nothing written) a file that changed since it was verified
        (another size, modification time or file, or created meanwhile)."""
        with self._opened(torn_tail=False) as verified:
            yield verified

    @contextlib.contextmanager
    def reading(self) -> Iterator[JournalAppend]:
        """As :meth:`appending`, for all of one message's journal work with one read: the
        complete lines verified (any damage a :class:`NodeStateError`, as :meth:`entries`
        raises it), a torn last line left out of ``entries`` and kept for
        :meth:`JournalAppend.repair_torn_tail`, which must move it aside before an append."""
        with self._opened(torn_tail=True) as verified:
            yield verified

    @contextlib.contextmanager
    def _opened(self, *, torn_tail: bool) -> Iterator[JournalAppend]:
        try:
            fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            fd = None  # created by the first append (O_EXCL: one made meanwhile is refused)
        appender = JournalAppend(self, fd)
        try:
            data = b""
            if fd is not None:
                size = appender._seen.st_size
                chunks = []
                while chunk := os.read(fd, max(size, 1 << 16)):
                    chunks.append(chunk)
                data = b"".join(chunks)
                if len(data) != size:
                    raise NodeStateError(f"{self.path}: changed while it was read")
            appender.entries = self._verified(data, torn_tail=torn_tail)
            appender.torn = data[data.rfind(b"\n") + 1:]
            yield appender
        finally:
            appender.close()


class JournalAppend:
    """A :class:`ReleaseJournal` read and verified once (:meth:`ReleaseJournal.appending` or
    :meth:`ReleaseJournal.reading`): ``entries`` as verified, ``torn`` a torn last line left
    out (reading only), and :meth:`append` for the next entry."""

    def __init__(self, journal: ReleaseJournal, fd: int | None) -> None:
        self.journal = journal
        self.entries: list[dict[str, Any]] = []
        self.torn = b""  # a torn last line (ReleaseJournal.reading), not yet moved aside
        self._fd = fd
        self._seen = os.fstat(fd) if fd is not None else None

    def head(self) -> tuple[int, str]:
        """``(records, hash of the last)``, as :meth:`ReleaseJournal.head` reads it now."""
        return len(self.entries), self.entries[-1]["hash"] if self.entries else _JOURNAL_GENESIS

    def holds(self, head: tuple[int, str]) -> bool:
        """Whether the verified entries still hold ``head``, as :meth:`ReleaseJournal.holds`."""
        count, last = head
        if count == 0:
            return last == _JOURNAL_GENESIS
        return len(self.entries) >= count and self.entries[count - 1]["hash"] == last

    def repair_torn_tail(self) -> Path | None:
        """:meth:`ReleaseJournal.repair_torn_tail` on the bytes read: move the torn last line
        aside (``releases.jsonl.torn-<seq>``) and cut it off, returning that file; None when
        there is none. :class:`NodeStateError`, nothing moved, when the file is no longer the
        one verified. Only under the node's stage lock."""
        if not self.torn:
            return None
        path = self.journal.path
        self._check_unchanged("its torn last line was not moved")
        assert self._fd is not None and self._seen is not None  # a torn line was read from it
        moved = move_tail_aside(path, self._seen.st_size - len(self.torn), self.torn,
                                path.with_name(f"{path.name}.torn-{len(self.entries)}"))
        self._seen = os.fstat(self._fd)
        self.torn = b""
        return moved

    def _changed(self, undone: str = "nothing was appended") -> NodeStateError:
        return NodeStateError(
            f"{self.journal.path}: changed since it was verified (written, replaced or removed"
            f" by another process); {undone}. Stop any other process using this node's"
            " state-dir and retry")

    def _check_unchanged(self, undone: str = "nothing was appended") -> None:
        assert self._fd is not None
        was, now = self._seen, os.fstat(self._fd)
        try:
            named = os.stat(self.journal.path)
        except FileNotFoundError:
            raise self._changed(undone) from None
        if was is None or (now.st_size, now.st_mtime_ns) != (was.st_size, was.st_mtime_ns) \
                or (named.st_dev, named.st_ino) != (was.st_dev, was.st_ino):
            raise self._changed(undone)

    def append(self, client: int, rnd: int, kind: str, payload: bytes) -> dict[str, Any]:
        """Append one entry for ``payload`` after the verified ones and fsync it; returns the
        entry. :class:`NodeStateError`, nothing written, when the file is no longer the one
        verified (its size, modification time or inode changed, or it was created or removed
        since: written or replaced by another process)."""
        path = self.journal.path
        if self.torn:
            raise NodeStateError(f"{path}: last entry is incomplete (torn write)")
        body = {
            "seq": len(self.entries),
            "client": client,
            "round": rnd,
            "kind": kind,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_bytes": len(payload),
            "time": round(time.time(), 6),
            "prev": self.entries[-1]["hash"] if self.entries else _JOURNAL_GENESIS,
        }
        entry = {**body, "hash": hashlib.sha256(_canonical(body)).hexdigest()}
        line = _canonical(entry) + b"\n"
        if self._fd is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise self._changed() from None
            write_all_and_fsync(self._fd, line)
            fsync_dir(path.parent)
        else:
            self._check_unchanged()
            write_all_and_fsync(self._fd, line)
        self._seen = os.fstat(self._fd)
        self.entries.append(entry)
        return entry

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
