"""The write-ahead privacy ledger: one append-only, hash-chained, signed JSON-lines file per client.

Line format: each line is the canonical JSON (``json.dumps(entry, sort_keys=True,
separators=(",", ":"), ensure_ascii=True, allow_nan=False)``) of one entry, followed by
``"\\n"``. Entry fields (all required, no others):

- ``index``: 0, 1, 2, ... (the line's position);
- ``client_id``: the client that spent the budget;
- ``round``: the federation round of the release (int >= 0);
- ``mechanism``: e.g. ``"dpsgd"``, ``"gaussian_summary"``, ``"gaussian_lambda"``, ``"refusal"``,
  ``"close"``, ``"repair"`` (a torn final line was quarantined, see :func:`repair_torn_tail`);
- ``params``: dict; for every entry but a refusal, a close or a repair it holds ``noise_multiplier``,
  ``sample_rate`` and ``steps`` (what an independent accountant composes) plus
  mechanism-specific fields (``clip_norm``, ``sensitivity``, ...);
- ``epsilon_after``: the client's cumulative epsilon after this entry (a refusal or repair
  spends nothing, so its value equals the previous one);
- ``delta``, ``budget_epsilon``, ``accountant`` (a registered accountant's name: ``"rdp"``,
  ``"prv"``, ``"pld"`` or a plug-in's), ``timestamp`` (UTC,
  ISO 8601);
- ``prev_hash``: SHA-256 hex of the previous line's UTF-8 bytes without its newline
  (:data:`GENESIS_HASH`, 64 zeros, for the first entry);
- ``signature``: Ed25519 signature (hex) over the canonical JSON of all the other fields.

Write-ahead rule: :meth:`LedgerWriter.append` writes the line, flushes and ``os.fsync``\\ s the
file (and the directory when the file is created) before it returns; callers send a release
only after that. :meth:`LedgerWriter.append_many` does the same for all of one release's
entries with one write and one fsync (a crash inside it leaves a prefix of the lines, the
last one possibly torn, as a crash between or inside single appends would). A crash between append and send therefore over-counts spending, never
under-counts it.

Close entry: a finished run ends each ledger with one signed ``"close"`` entry
(:meth:`LedgerWriter.close_run`; ``params = {"final_index": <its own index>,
"epsilon_spent": <the final epsilon>}``, spending nothing). Nothing may follow it: the writer
refuses further appends and :func:`verify_ledger` reports any entry after it.

Limits (by construction of a hash chain): removing entries *from the end* of the file leaves
a valid shorter chain and cannot be detected from the file alone (a missing close entry
shows only that the run did not finish, or that its end was cut); anchor the head (index and
hash, see :attr:`LedgerWriter.head`) somewhere the client does not control — the run's
signed ``anchor.json`` copied apart, or the server's record of the heads clients report —
to detect that. Everything else (edits, deletions or reorderings before
the last entry, forged or replaced signatures, foreign entries) is detected by
:func:`verify_ledger`.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.accounting import (
    ACCOUNTANT_REGISTRY,
    Accountant,
    AccountingError,
    validate_release,
)
from privacy.durable import fsync_dir, truncate_and_fsync, write_all_and_fsync
from privacy.errors import ToolkitError
from privacy.paths import read_regular_bytes

GENESIS_HASH = "0" * 64
REFUSAL = "refusal"
CLOSE = "close"
REPAIR = "repair"
"""A signed entry recording that a torn final line was quarantined (spends nothing)."""
#: Mechanisms that release nothing and therefore spend nothing.
NON_RELEASES: tuple[str, ...] = (REFUSAL, CLOSE, REPAIR)
_UNACCOUNTED = NON_RELEASES
ENTRY_FIELDS: tuple[str, ...] = (
    "index", "client_id", "round", "mechanism", "params", "epsilon_after", "delta",
    "budget_epsilon", "accountant", "timestamp", "prev_hash", "signature",
)
ACCOUNTED_PARAMS: tuple[str, ...] = ("noise_multiplier", "sample_rate", "steps")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")


class LedgerError(ToolkitError, ValueError):
    """A ledger cannot be read, verified or appended to; the message says which file/entry."""


class LedgerCutError(LedgerError):
    """A ledger ends in a torn line at an entry known to have been complete once: it was cut or
    damaged since, not torn by a crash (see :func:`repair_torn_tail`)."""


@dataclass(frozen=True)
class LedgerProblem:
    """One verification finding: the entry position (0-based line), a short kind, a message."""

    index: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"entry {self.index}: [{self.kind}] {self.message}"


def canonical_json(obj: Any) -> str:
    """The canonical JSON text used for ledger lines and signatures (sorted keys, compact)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def line_hash(line: str) -> str:
    """SHA-256 hex of a ledger line's UTF-8 bytes (without the trailing newline)."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def signing_payload(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's signature covers: canonical JSON of every field except ``signature``."""
    return canonical_json({k: v for k, v in entry.items() if k != "signature"}).encode("utf-8")


def _read_bytes(path: Path) -> bytes | None:
    """The ledger file's bytes; None when it does not exist, LedgerError when it cannot be read
    or is no regular file (a link to a device would be read without end, a FIFO waited on)."""
    try:
        return read_regular_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"cannot read ledger file {str(path)!r}: {exc}") from exc


def _read_raw(path: Path) -> tuple[list[str], bool]:
    """Lines of the file (no newlines) and whether the last one lacks its newline (torn)."""
    data = _read_bytes(path)
    if data is None:
        raise LedgerError(f"ledger file {str(path)!r} does not exist")
    return _split_lines(data)


def _split_lines(data: bytes) -> tuple[list[str], bool]:
    if not data:
        return [], False
    torn = not data.endswith(b"\n")
    raw = data.split(b"\n")
    if not torn:
        raw = raw[:-1]
    # Undecodable bytes become U+FFFD; such a line then fails the canonical-form, hash or
    # signature check, so the damage is reported rather than hidden.
    return [chunk.decode("utf-8", errors="replace") for chunk in raw], torn


def read_ledger(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse a ledger file into entries (no cryptographic checks; use verify_ledger for that).

    Raises LedgerError naming the line for a line that is not a JSON object or for an
    incomplete last line (a write interrupted by a crash).
    """
    path = Path(path)
    lines, torn = _read_raw(path)
    if torn:
        raise LedgerError(
            f"ledger {str(path)!r}: line {len(lines) - 1} is incomplete (no newline; a write was"
            " interrupted)"
        )
    entries = []
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as exc:  # incl. JSONDecodeError, huge integers
            raise LedgerError(f"ledger {str(path)!r}: line {i} is not valid JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise LedgerError(f"ledger {str(path)!r}: line {i} is not a JSON object")
        entries.append(entry)
    return entries


def read_complete_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of the ledger's complete lines, a torn last line left out (none when the
    file does not exist); LedgerError naming the line for one that is not canonical JSON or
    lacks a field's form. Chain and signatures are not checked (:class:`LedgerWriter` checks
    them when it opens the ledger). Reads only."""
    path = Path(path)
    data = _read_bytes(path)
    if data is None:
        return []
    lines, _ = _split_lines(data[:data.rfind(b"\n") + 1])
    entries = []
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise LedgerError(f"ledger {str(path)!r}: line {i} is not valid JSON ({exc})") from None
        problems = _field_problems(entry) if isinstance(entry, dict) else ["not a JSON object"]
        try:
            if not problems and canonical_json(entry) != line:
                problems = ["not in canonical JSON form"]
        except ValueError as exc:
            problems = [f"cannot be re-serialized ({exc})"]
        if problems:
            raise LedgerError(f"ledger {str(path)!r}: line {i}: " + "; ".join(problems))
        entries.append(entry)
    return entries


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (a bool is not one, nor an int too large for
    a float): the test every reported or ledgered number passes."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _field_problems(entry: dict[str, Any]) -> list[str]:
    """Schema checks of one entry; returns messages (empty when the entry is well-formed)."""
    out: list[str] = []
    missing = [f for f in ENTRY_FIELDS if f not in entry]
    extra = sorted(set(entry) - set(ENTRY_FIELDS))
    if missing:
        out.append(f"missing fields {missing}")
    if extra:
        out.append(f"unexpected fields {extra}")
    if missing:
        return out
    if isinstance(entry["index"], bool) or not isinstance(entry["index"], int):
        out.append(f"index must be an int, got {entry['index']!r}")
    if not isinstance(entry["client_id"], str) or not entry["client_id"]:
        out.append("client_id must be a non-empty string")
    if isinstance(entry["round"], bool) or not isinstance(entry["round"], int) \
            or entry["round"] < 0:
        out.append(f"round must be an int >= 0, got {entry['round']!r}")
    if not isinstance(entry["mechanism"], str) or not entry["mechanism"]:
        out.append("mechanism must be a non-empty string")
    if not isinstance(entry["params"], dict):
        out.append("params must be an object")
    elif entry["mechanism"] not in NON_RELEASES:
        p = entry["params"]
        for key in ACCOUNTED_PARAMS:
            if key not in p:
                out.append(f"params lacks {key!r}")
        if all(k in p for k in ACCOUNTED_PARAMS):
            try:
                validate_release(p["noise_multiplier"], p["sample_rate"], p["steps"])
            except AccountingError as exc:
                out.append(f"params: {exc}")
    if not is_finite_number(entry["epsilon_after"]) or entry["epsilon_after"] < 0:
        out.append(f"epsilon_after must be a finite number >= 0, got {entry['epsilon_after']!r}")
    if not is_finite_number(entry["delta"]) or not (0 < entry["delta"] < 1):
        out.append(f"delta must be in (0, 1), got {entry['delta']!r}")
    if not is_finite_number(entry["budget_epsilon"]) or entry["budget_epsilon"] <= 0:
        out.append(f"budget_epsilon must be a number > 0, got {entry['budget_epsilon']!r}")
    if not isinstance(entry["accountant"], str) or entry["accountant"] not in ACCOUNTANT_REGISTRY:
        # looked up now, not at import: a plug-in registers its accountant after this module
        out.append(f"accountant must be a registered accountant {tuple(ACCOUNTANT_REGISTRY)}"
                   f" (a plug-in's registers when its module is imported),"
                   f" got {entry['accountant']!r:.80}")
    if not isinstance(entry["timestamp"], str):
        out.append("timestamp must be a string")
    if not isinstance(entry["prev_hash"], str) or not _HEX64.match(entry["prev_hash"]):
        out.append("prev_hash must be 64 lowercase hex digits")
    if not isinstance(entry["signature"], str) or not _HEX128.match(entry["signature"]):
        out.append("signature must be 128 lowercase hex digits")
    return out


def verify_ledger(entries: Sequence[dict[str, Any] | str], public_key: Ed25519PublicKey, *,
                  client_id: str | None = None) -> list[LedgerProblem]:
    """Check a whole ledger; return every problem found (empty list: the ledger is intact).

    ``entries`` are raw lines (as in the file, without newlines) or parsed dicts; for dicts the
    line is taken to be their canonical JSON. Checked per entry: JSON object, canonical form,
    schema, ``index`` equal to the position, ``prev_hash`` equal to the hash of the previous
    line, Ed25519 signature under ``public_key``, ``client_id`` (equal to ``client_id`` if
    given, else to the first entry's), ``epsilon_after`` non-decreasing, refusals spending
    nothing, and a close entry that spends nothing, states its own index and the final
    epsilon, and is followed by nothing. Cannot detect entries removed from the end (see the
    module docstring).
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise LedgerError(
            f"public_key must be an Ed25519PublicKey, got {type(public_key).__name__}"
        )
    problems: list[LedgerProblem] = []
    prev_hash = GENESIS_HASH
    prev_eps: float | None = None
    expected_client = client_id
    closed_at: int | None = None
    for pos, item in enumerate(entries):
        def problem(kind: str, message: str, _pos: int = pos) -> None:
            problems.append(LedgerProblem(_pos, kind, message))

        if isinstance(item, str):
            line = item
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError) as exc:
                problem("bad_json", f"not valid JSON ({exc})")
                prev_hash = line_hash(line)
                continue
            if not isinstance(entry, dict):
                problem("bad_json", "not a JSON object")
                prev_hash = line_hash(line)
                continue
            try:
                if canonical_json(entry) != line:
                    problem("not_canonical", "line is not in canonical JSON form")
            except ValueError as exc:
                problem("not_canonical", f"line cannot be re-serialized ({exc})")
        elif isinstance(item, dict):
            entry = item
            try:
                line = canonical_json(entry)
            except (TypeError, ValueError) as exc:
                problem("bad_entry", f"entry is not JSON-serializable ({exc})")
                prev_hash = "!"  # nothing can chain to it
                continue
        else:
            problem("bad_entry", f"entry must be a str or dict, got {type(item).__name__}")
            prev_hash = "!"
            continue

        schema = _field_problems(entry)
        for message in schema:
            problem("bad_fields", message)
        if schema and any(f not in entry for f in ENTRY_FIELDS):
            prev_hash = line_hash(line)
            continue

        if entry["index"] != pos:
            problem("bad_index", f"index is {entry['index']!r}, expected {pos} (entries must be"
                    " numbered 0, 1, 2, ... with none missing or reordered)")
        if entry["prev_hash"] != prev_hash:
            problem("broken_chain", "prev_hash does not match the hash of the previous entry"
                    " (an entry before it was changed, removed or reordered)")
        signature_ok = False
        if isinstance(entry["signature"], str) and _HEX128.match(entry["signature"]):
            try:
                public_key.verify(bytes.fromhex(entry["signature"]), signing_payload(entry))
                signature_ok = True
            except (InvalidSignature, ValueError, TypeError):
                signature_ok = False
        if not signature_ok:
            problem("bad_signature", "Ed25519 signature does not verify under the client's key")
        if expected_client is None and isinstance(entry["client_id"], str):
            expected_client = entry["client_id"]
        if entry["client_id"] != expected_client:
            problem("wrong_client", f"client_id is {entry['client_id']!r}, expected"
                    f" {expected_client!r}")
        eps = entry["epsilon_after"]
        eps_before = prev_eps if prev_eps is not None else 0.0
        if is_finite_number(eps):
            if prev_eps is not None and eps < prev_eps:
                problem("epsilon_decreased", f"epsilon_after {eps!r} is below the previous"
                        f" entry's {prev_eps!r}")
            if entry["mechanism"] == REPAIR and eps != (prev_eps if prev_eps is not None else 0.0):
                problem("repair_spent", f"a repair entry must spend nothing, but epsilon_after"
                        f" {eps!r} differs from the previous {prev_eps!r}")
            if entry["mechanism"] == REFUSAL and prev_eps is not None and eps != prev_eps:
                problem("refusal_spent", f"a refusal must spend nothing, but epsilon_after"
                        f" {eps!r} differs from the previous {prev_eps!r}")
            if entry["mechanism"] == REFUSAL and prev_eps is None and eps != 0:
                problem("refusal_spent", f"a first-entry refusal must have epsilon_after 0,"
                        f" got {eps!r}")
            prev_eps = eps if prev_eps is None else max(prev_eps, eps)
        for kind, message in _close_problems(entry, pos, closed_at, eps_before):
            problem(kind, message)
        if entry["mechanism"] == CLOSE and closed_at is None:
            closed_at = pos
        prev_hash = line_hash(line)
    return problems


def _close_problems(entry: dict[str, Any], pos: int, closed_at: int | None,
                    epsilon: float) -> list[tuple[str, str]]:
    """What is wrong with ``entry`` at ``pos`` regarding the close entry: anything after a
    close (at ``closed_at``), or a close that spends something or whose params do not state
    its own index and the ledger's final ``epsilon`` (the largest epsilon_after before it)."""
    out: list[tuple[str, str]] = []
    if closed_at is not None:
        out.append(("after_close", f"entry follows the close entry at {closed_at}; a closed"
                    " ledger takes no further entries"))
    if entry["mechanism"] != CLOSE:
        return out
    params = entry["params"] if isinstance(entry["params"], dict) else {}
    if set(params) != {"final_index", "epsilon_spent"}:
        out.append(("bad_close", f"close params must be exactly final_index and epsilon_spent,"
                    f" got {sorted(params)}"))
        return out
    if params["final_index"] != pos:
        out.append(("bad_close", f"close states final_index {params['final_index']!r} at"
                    f" position {pos}"))
    spent = params["epsilon_spent"]
    if not is_finite_number(spent) or spent != epsilon or entry["epsilon_after"] != epsilon:
        out.append(("bad_close", f"close states epsilon_spent {spent!r}, the ledger's final"
                    f" epsilon is {epsilon!r}"))
    return out


def verify_ledger_file(path: str | os.PathLike[str], public_key: Ed25519PublicKey, *,
                       client_id: str | None = None) -> list[LedgerProblem]:
    """:func:`verify_ledger` on a file's raw lines; an incomplete last line is a problem too."""
    path = Path(path)
    lines, torn = _read_raw(path)
    problems = verify_ledger(lines, public_key, client_id=client_id)
    if torn:
        problems.append(LedgerProblem(len(lines) - 1, "torn_line",
                                      "last line has no newline (a write was interrupted)"))
    return problems


def accounted_releases(entries: Sequence[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """The (noise_multiplier, sample_rate, steps) triples of all non-refusal entries, in order."""
    out = []
    for pos, entry in enumerate(entries):
        if entry.get("mechanism") in NON_RELEASES:
            continue
        params = entry.get("params")
        if not isinstance(params, dict) or any(k not in params for k in ACCOUNTED_PARAMS):
            raise LedgerError(f"entry {pos} has no accountable params {ACCOUNTED_PARAMS}")
        out.append((params["noise_multiplier"], params["sample_rate"], params["steps"]))
    return out


def replay_accountant(entries: Sequence[dict[str, Any]], kind: str | None = None, *,
                      prv_eps_error: float = 0.01) -> Accountant:
    """Rebuild an Accountant from ledger entries (every non-refusal entry, in order).

    ``kind`` defaults to the entries' ``accountant`` field (which must agree). Use after a
    restart: the ledger is written before each release, so the replayed accountant never
    under-counts what was released. Verify the ledger first; this function trusts it.

    When every release entry records the same ``accountant_params`` and an accountant of
    ``kind`` reproduces them (:meth:`~privacy.accounting.Accountant.reproducing`: a PRV ledger
    written before PRV's refining pass existed), the replayed accountant computes with those
    parameters, so the run it resumes recomputes each recorded epsilon exactly and records the
    parameters it uses; otherwise it has today's parameters (a resume then names the
    difference instead of accounting under another analysis).
    """
    kinds = {e.get("accountant") for e in entries}
    if kind is None:
        if len(kinds) > 1:
            raise LedgerError(f"ledger entries name several accountants {sorted(map(str, kinds))}")
        kind = kinds.pop() if kinds else "rdp"
    recorded = {canonical_json(e["params"].get("accountant_params")) for e in entries
                if e.get("mechanism") not in NON_RELEASES and isinstance(e.get("params"), dict)}
    acc = None
    if len(recorded) == 1:
        acc = Accountant.reproducing(json.loads(recorded.pop()), kind, prv_eps_error=prv_eps_error)
    if acc is None:
        acc = Accountant(kind, prv_eps_error=prv_eps_error)
    for pos, (nm, q, steps) in enumerate(accounted_releases(entries)):
        try:
            acc.record(nm, q, steps)
        except AccountingError as exc:
            raise LedgerError(f"ledger release {pos}: {exc}") from exc
    return acc


def entries_hold(entries: Sequence[dict[str, Any]], last_hash: str, count: int,
                 head: str) -> bool:
    """True when a ledger of ``entries`` whose last line hashes to ``last_hash`` still holds
    an earlier state of itself: ``count`` entries ending in the line hashed ``head`` (equal,
    or extended after it; :meth:`LedgerWriter.holds`). Reads only."""
    if len(entries) == count:
        return last_hash == head
    return len(entries) > count >= 0 and entries[count]["prev_hash"] == head


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LedgerWriter:
    """Appends signed, chained entries to one client's ledger file, durably.

    Opening verifies the existing file (chain, signatures under ``signing_key``'s public key,
    client id, schema) and raises LedgerError if anything is wrong, including an incomplete
    last line; it never appends to a corrupt or forged ledger. The file is locked
    (``fcntl.flock``, exclusive) while the writer is open, so two writers cannot interleave.
    POSIX only.
    """

    def __init__(self, path: str | os.PathLike[str], client_id: str,
                 signing_key: Ed25519PrivateKey) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise LedgerError(f"client_id must be a non-empty string, got {client_id!r}")
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise LedgerError(
                f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}"
            )
        self.path = Path(path)
        self.client_id = client_id
        self._key = signing_key
        self.public_key = signing_key.public_key()
        self._broken = False
        if not self.path.parent.is_dir():
            raise LedgerError(f"ledger directory {str(self.path.parent)!r} does not exist")
        created = False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._fd: int | None = fd
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerError(
                    f"ledger {str(self.path)!r} is locked by another writer"
                ) from None
            if created:
                os.fsync(fd)
                fsync_dir(self.path.parent)
            lines, torn = self._read_all()
            if torn:
                raise LedgerError(
                    f"ledger {str(self.path)!r}: line {len(lines) - 1} is incomplete (no newline;"
                    " a write was interrupted); refusing to append"
                )
            problems = verify_ledger(lines, self.public_key, client_id=client_id)
            if problems:
                shown = "; ".join(str(p) for p in problems[:5])
                more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
                raise LedgerError(
                    f"ledger {str(self.path)!r} failed verification, refusing to append: "
                    f"{shown}{more}"
                )
        except BaseException:
            os.close(fd)
            self._fd = None
            raise
        self._entries: list[dict[str, Any]] = [json.loads(line) for line in lines]
        self._head = line_hash(lines[-1]) if lines else GENESIS_HASH

    def _read_all(self) -> tuple[list[str], bool]:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(self._fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return _split_lines(b"".join(chunks))

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Copies of all entries in the file, oldest first."""
        return [json.loads(canonical_json(e)) for e in self._entries]

    def entries_between(self, first: int, last: int) -> list[dict[str, Any]]:
        """Copies of the entries with index ``first`` to ``last`` (inclusive; clipped to the
        ledger), without copying the whole ledger."""
        return [json.loads(canonical_json(e)) for e in self._entries[max(first, 0): last + 1]]

    @property
    def head(self) -> tuple[int, str]:
        """(number of entries, hash of the last line) — anchor this outside the client."""
        return len(self._entries), self._head

    def holds(self, count: int, head: str) -> bool:
        """True when this ledger still holds an earlier state of itself: ``count`` entries
        ending in the line hashed ``head`` (equal, or extended after it). False means entries
        recorded earlier were lost, cut or replaced since."""
        return entries_hold(self._entries, self._head, count, head)

    @property
    def is_closed(self) -> bool:
        """True when the ledger ends with its close entry (a finished run)."""
        return bool(self._entries) and self._entries[-1]["mechanism"] == CLOSE

    def close_run(self, *, round: int, delta: float, budget_epsilon: float,
                  accountant: str) -> dict[str, Any]:
        """Append the signed close entry of a finished run (idempotent) and return it.

        The entry spends nothing; its params state its own index (``final_index``) and the
        final epsilon (``epsilon_spent``). Once it is written, :meth:`append` refuses every
        further entry. If the ledger is already closed, its close entry is returned unchanged.
        """
        if self.is_closed:
            return self.entries[-1]
        last = self.last_epsilon
        return self._append(round=round, mechanism=CLOSE,
                            params={"final_index": len(self._entries), "epsilon_spent": last},
                            epsilon_after=last, delta=delta, budget_epsilon=budget_epsilon,
                            accountant=accountant)

    @property
    def last_epsilon(self) -> float:
        """epsilon_after of the last entry (0.0 for an empty ledger)."""
        return float(self._entries[-1]["epsilon_after"]) if self._entries else 0.0

    def append(self, *, round: int, mechanism: str, params: dict[str, Any],
               epsilon_after: float, delta: float, budget_epsilon: float,
               accountant: str) -> dict[str, Any]:
        """Sign and durably append one entry; returns it. Fsynced before this returns.

        Refuses (LedgerError) an ``epsilon_after`` below the last entry's, a refusal whose
        ``epsilon_after`` differs from the last entry's, a non-refusal without
        noise_multiplier/sample_rate/steps in ``params``, any entry once the ledger is closed
        (use :meth:`close_run` for the close entry), and any write failure (after which the
        writer refuses further appends).
        """
        if mechanism == CLOSE:
            raise LedgerError("the close entry is written by close_run(), not append()")
        return self._append(round=round, mechanism=mechanism, params=params,
                            epsilon_after=epsilon_after, delta=delta,
                            budget_epsilon=budget_epsilon, accountant=accountant)

    def append_many(self, entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Sign and durably append several entries (one release's) with one write and one
        fsync; returns them. Each mapping holds :meth:`append`'s keyword arguments.

        The lines are exactly those consecutive :meth:`append` calls would write (same
        chain, same signatures), and every entry is checked as :meth:`append` checks it
        before anything is written: one bad entry writes none. Once this returns, all of
        them are on stable storage; on a write failure (LedgerError) none is recorded here,
        the writer refuses further appends, and a crash inside the write leaves at most a
        prefix of the lines (a torn last line that :func:`repair_torn_tail` quarantines).
        """
        if not entries:
            raise LedgerError("append_many needs at least one entry")
        self._check_writable()
        built: list[tuple[dict[str, Any], str]] = []
        head, last = self._head, self.last_epsilon
        for fields in entries:
            if fields.get("mechanism") == CLOSE:
                raise LedgerError("the close entry is written by close_run(), not append_many()")
            entry, line = self._signed(len(self._entries) + len(built), head, last, **fields)
            built.append((entry, line))
            head, last = line_hash(line), float(entry["epsilon_after"])
        return self._write(built)

    def _check_writable(self) -> None:
        if self._fd is None:
            raise LedgerError(f"ledger writer for {str(self.path)!r} is closed")
        if self._broken:
            raise LedgerError(
                f"ledger {str(self.path)!r}: an earlier write failed; reopen to verify the file"
            )
        if self.is_closed:
            raise LedgerError(f"ledger {str(self.path)!r} is closed (its run finished); refusing"
                              " to append")

    def _append(self, *, round: int, mechanism: str, params: dict[str, Any],
                epsilon_after: float, delta: float, budget_epsilon: float,
                accountant: str) -> dict[str, Any]:
        self._check_writable()
        built = self._signed(len(self._entries), self._head, self.last_epsilon, round=round,
                             mechanism=mechanism, params=params, epsilon_after=epsilon_after,
                             delta=delta, budget_epsilon=budget_epsilon, accountant=accountant)
        return self._write([built])[0]

    def _signed(self, index: int, prev_hash: str, last: float, *, round: int, mechanism: str,
                params: dict[str, Any], epsilon_after: float, delta: float,
                budget_epsilon: float, accountant: str) -> tuple[dict[str, Any], str]:
        """The signed entry at ``index`` after a line hashed ``prev_hash`` whose epsilon was
        ``last``, and its line; LedgerError for an entry :meth:`append` refuses."""
        if isinstance(epsilon_after, bool) or not isinstance(epsilon_after, int | float):
            raise LedgerError(f"epsilon_after must be a number, got {epsilon_after!r}")
        entry: dict[str, Any] = {
            "index": index,
            "client_id": self.client_id,
            "round": round,
            "mechanism": mechanism,
            "params": params,
            "epsilon_after": float(epsilon_after),
            "delta": float(delta) if is_finite_number(delta) else delta,
            "budget_epsilon": float(budget_epsilon) if is_finite_number(budget_epsilon)
            else budget_epsilon,
            "accountant": accountant,
            "timestamp": _utc_now(),
            "prev_hash": prev_hash,
            "signature": "0" * 128,
        }
        problems = _field_problems(entry)
        if problems:
            raise LedgerError(f"ledger entry for round {round!r} {mechanism!r}: "
                              + "; ".join(problems))
        if entry["epsilon_after"] < last:
            raise LedgerError(
                f"epsilon_after {epsilon_after!r} is below the ledger's last {last!r}"
            )
        if mechanism in NON_RELEASES and entry["epsilon_after"] != last:
            raise LedgerError(
                f"a {mechanism} spends nothing: epsilon_after must be {last!r}, got {epsilon_after!r}"
            )
        try:
            del entry["signature"]
            payload = canonical_json(entry)
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"params of {mechanism!r} are not JSON-serializable: {exc}") from exc
        entry["signature"] = self._key.sign(payload.encode("utf-8")).hex()
        return entry, canonical_json(entry)

    def _write(self, built: Sequence[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
        """Write the lines of ``built`` with one write loop and one fsync; only then are the
        entries this writer's (a failure marks the writer broken and records none)."""
        data = "".join(line + "\n" for _, line in built).encode("utf-8")
        try:
            write_all_and_fsync(self._fd, data)
        except BaseException as exc:
            self._broken = True
            if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM, exit: a stop, not a failure
                raise
            raise LedgerError(f"writing ledger {str(self.path)!r} failed: {exc}") from exc
        for entry, line in built:
            self._entries.append(entry)
            self._head = line_hash(line)
        return [json.loads(line) for _, line in built]

    def close(self) -> None:
        """Release the lock and close the file (idempotent)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


# --------------------------------------------------------------------------- torn-tail repair

QUARANTINE_INFIX = ".torn-"


@dataclass(frozen=True)
class TornTailRepair:
    """What :func:`repair_torn_tail` did: the quarantine file and the signed repair entry."""

    quarantine: Path
    torn_bytes: int
    torn_sha256: str
    entry: dict[str, Any]


def _write_quarantine(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` durably; an existing file must hold the same bytes."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.read_bytes() != data:
            raise LedgerError(f"quarantine file {str(path)!r} exists with other content") from None
        return
    try:
        write_all_and_fsync(fd, data)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _unrecorded_quarantines(path: Path, entries: Sequence[dict[str, Any]]) -> list[Path]:
    recorded = {e["params"].get("quarantine") for e in entries if e["mechanism"] == REPAIR}
    return sorted(q for q in path.parent.glob(path.name + QUARANTINE_INFIX + "*")
                  if q.name not in recorded)


def torn_line_index(path: str | os.PathLike[str]) -> int | None:
    """The entry index of the ledger's torn final line (the number of complete lines before
    it), or ``None`` when the ledger ends in a newline or cannot be read (the callers that
    repair or open it name that). Reads only."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    cut = data.rfind(b"\n") + 1
    return data[:cut].count(b"\n") if data[cut:] else None


def refuse_cut_tail(path: str | os.PathLike[str], complete: int, *, known_by: str = "") -> None:
    """:class:`LedgerCutError` when the ledger ends in a torn line at an index below
    ``complete``, the number of entries known to have been complete once (``known_by`` says
    how, for the message); reads only. Such a line was complete once, so the ledger was cut
    or damaged since, and repairing it would sign a false claim that its write never
    completed. :func:`repair_torn_tail` checks this itself; a caller that recovers several
    ledgers calls it for each first, so that none is written when one is refused."""
    torn = torn_line_index(path)
    if torn is not None and torn < complete:
        how = f" ({known_by})" if known_by else ""
        raise LedgerCutError(
            f"ledger {str(path)!r} ends in a torn line at entry {torn}, but {complete} entries"
            f" were complete once{how}: the ledger was cut or damaged since (not torn by a"
            " crash); nothing was repaired or written. Restore the ledger from a copy")


def restore_cut_tail(path: str | os.PathLike[str], client_id: str, public_key: Ed25519PublicKey,
                     lines: Mapping[int, str], *, write: bool = True) -> list[int]:
    """Write back the entries a cut removed from the end of a ledger, from a durable copy of
    their lines (``lines``: index -> line without its newline, e.g. from the release journal).

    Restores only when ``lines`` holds every entry from the first one missing (the ledger's
    complete lines are kept; a torn last line must be the start of the first line restored)
    up to its highest index, and the result verifies (chain, signatures, ``client_id``); the
    missing bytes are then appended (fsynced), so the ledger is bit for bit what it was.
    Returns the indices restored (with ``write`` False: that would be restored, writing
    nothing); empty when ``lines`` cannot restore the ledger or nothing is missing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return []
    cut = data.rfind(b"\n") + 1
    complete, _ = _split_lines(data[:cut])
    start, torn = len(complete), data[cut:]
    wanted = range(start, max(lines, default=-1) + 1)
    if not wanted or any(k not in lines for k in wanted):
        return []
    missing = [lines[k] for k in wanted]
    if not missing[0].encode("utf-8").startswith(torn):
        return []
    if verify_ledger([*complete, *missing], public_key, client_id=client_id):
        return []
    if write:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            write_all_and_fsync(fd, "".join(line + "\n" for line in missing).encode("utf-8")[
                len(torn):])
        finally:
            os.close(fd)
    return list(wanted)


def repair_torn_tail(path: str | os.PathLike[str], client_id: str,
                     signing_key: Ed25519PrivateKey, *, delta: float, budget_epsilon: float,
                     accountant: str, complete: int = 0,
                     known_by: str = "") -> list[TornTailRepair]:
    """Recover a ledger whose final line is torn (a write that never completed).

    ``LedgerWriter.append`` returns, and a caller releases, only after the whole line and its
    newline are fsynced, so a final line without a newline records nothing that was released.
    This moves those bytes to ``<ledger>.torn-<index>-<sha256[:12]>`` beside the ledger
    (fsynced), truncates the ledger to its last complete line, and appends a signed
    ``"repair"`` entry (spending nothing) naming the quarantine file, its size and SHA-256.
    A quarantine file left without its repair entry (a crash during an earlier repair) gets
    its entry now, so a repair is never silent. Everything before the torn line must verify
    (a damaged line in the middle stays a :class:`LedgerError`). ``complete`` is the number
    of entries known to have been complete once (``known_by``: from where, e.g. the release
    journal, the client's saved state or the server): a torn line at an index below it was
    cut, not torn by a crash, and :class:`LedgerCutError` is raised before anything is
    written (:func:`refuse_cut_tail`). Returns the repairs made (empty when the ledger was
    not torn and no repair was pending).
    """
    path = Path(path)
    refuse_cut_tail(path, complete, known_by=known_by)
    data = _read_bytes(path)
    if data is None:
        return []
    cut = data.rfind(b"\n") + 1
    torn = data[cut:]
    pending: list[tuple[Path, bytes]] = []
    if torn:
        lines, _ = _split_lines(data[:cut])
        problems = verify_ledger(lines, signing_key.public_key(), client_id=client_id)
        if problems:
            shown = "; ".join(str(p) for p in problems[:3])
            raise LedgerError(f"ledger {str(path)!r} has a torn last line and fails verification"
                              f" before it ({shown}); not repairing")
        digest = hashlib.sha256(torn).hexdigest()
        quarantine = path.with_name(f"{path.name}{QUARANTINE_INFIX}{len(lines)}-{digest[:12]}")
        _write_quarantine(quarantine, torn)
        truncate_and_fsync(path, cut)
    repairs = []
    with LedgerWriter(path, client_id, signing_key) as writer:
        for quarantine in _unrecorded_quarantines(path, writer.entries):
            pending.append((quarantine, quarantine.read_bytes()))
        for quarantine, torn_bytes in pending:
            entry = writer.append(
                round=writer.entries[-1]["round"] if writer.entries else 0,
                mechanism=REPAIR,
                params={"quarantine": quarantine.name, "torn_bytes": len(torn_bytes),
                        "torn_sha256": hashlib.sha256(torn_bytes).hexdigest(),
                        "reason": "final line torn (write never completed, nothing released);"
                                  " bytes quarantined"},
                epsilon_after=writer.last_epsilon,
                delta=writer.entries[-1]["delta"] if writer.entries else delta,
                budget_epsilon=(writer.entries[-1]["budget_epsilon"] if writer.entries
                                else budget_epsilon),
                accountant=writer.entries[-1]["accountant"] if writer.entries else accountant,
            )
            repairs.append(TornTailRepair(quarantine, len(torn_bytes),
                                          entry["params"]["torn_sha256"], entry))
    return repairs
