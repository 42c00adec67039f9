"""Signed message envelopes and their verification.

Every message a party sends travels as an :class:`Envelope` (sender, recipient, round,
random nonce, kind, context, SHA-256 of the payload, Ed25519 signature over all of these)
plus the payload bytes. The *context* binds a message to one exchange -- e.g.
``"<run id>/<method>"`` -- so a message of one method's exchange cannot be replayed into
another's of the same round. The receiver's :class:`EnvelopeVerifier` accepts a message only if

- the sender is in its allowlist (:class:`UnknownSenderError` otherwise),
- the signature verifies under the sender's Ed25519 key (:class:`BadSignatureError`),
- it is addressed to this receiver (:class:`WrongRecipientError`),
- its context is the receiver's, when the receiver has one (:class:`WrongContextError`),
- it has an expected kind, when kinds are restricted (:class:`UnexpectedKindError`),
- the payload hashes to the signed digest (:class:`PayloadHashMismatchError`),
- its round is the expected one, or at most ``max_round_lag`` rounds older
  (:class:`StaleRoundError` / :class:`FutureRoundError`),
- its nonce was never accepted before from that sender (:class:`ReplayedNonceError`);
  the nonce memory can be persisted to a file so replays are caught across restarts.

Persistence is write-ahead: :meth:`EnvelopeVerifier.verify` appends and fsyncs the nonce
before it returns; :meth:`EnvelopeVerifier.batch` / :meth:`EnvelopeVerifier.verify_batch`
verify several messages and make all their nonces durable with one append and one fsync
before any of them is returned (a nonce repeated inside one batch is a replay too).
A message that passes these checks but that its receiver then refuses on its content (a
payload that does not decode, a tensor of the wrong shape) can be withdrawn from its batch
before the commit (:meth:`VerificationBatch.withdraw`): a refused message consumes nothing.

Bounds before any work: :func:`decode_message` rejects a message longer than ``max_bytes``
(default :data:`DEFAULT_MAX_MESSAGE_BYTES`) or whose header is longer than ``max_header_bytes``
(default :data:`DEFAULT_MAX_HEADER_BYTES`) before copying, parsing or hashing anything, and
rejects input that is not bytes; the header must be exactly the canonical encoding of the
envelope it parses to (so no two byte strings carry the same signed envelope); a verifier
with ``max_payload_bytes`` rejects a longer payload before hashing it.

Decoded tensors are checked with :meth:`EnvelopeVerifier.check_tensor` (wrong shape ->
:class:`TensorShapeError`, NaN/inf -> :class:`NonFiniteTensorError`).

Every rejection raises a distinct subclass of :class:`EnvelopeError` whose message names
the sender and round, and emits a WARNING record on the ``secure_fedora.security`` logger
with a structured ``security_event`` dict attribute (event, reason, sender, recipient,
round, kind, detail). A caller that catches the error can drop that client and continue.

Assumptions: signatures authenticate the *sender's key*, so a party whose private key
leaks can be impersonated; confidentiality of the payload is not provided here (use TLS
or :mod:`privacy.sealing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from privacy.errors import ToolkitError
from privacy.identity import Identity, IdentityError, PublicIdentity, validate_party_id

__all__ = [
    "BadSignatureError",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MessageTooLargeError",
    "ENVELOPE_VERSION",
    "Envelope",
    "EnvelopeError",
    "EnvelopeStateError",
    "EnvelopeVerifier",
    "FutureRoundError",
    "MalformedEnvelopeError",
    "NONCE_FILE_SUFFIX",
    "NonFiniteTensorError",
    "NonceJournal",
    "NonceMemoryLostError",
    "PayloadHashMismatchError",
    "ReplayedNonceError",
    "RoundError",
    "SECURITY_LOGGER",
    "StaleRoundError",
    "TensorShapeError",
    "UnexpectedKindError",
    "UnknownSenderError",
    "VerificationBatch",
    "WrongContextError",
    "WrongRecipientError",
    "check_nonce_memory",
    "check_tensor",
    "commit_batches",
    "decode_message",
    "encode_message",
    "ledger_files",
    "make_envelope",
    "nonce_file_problem",
    "nonce_files",
]

ENVELOPE_VERSION = 2
SECURITY_LOGGER = "secure_fedora.security"
_DOMAIN = b"secure-fedora/envelope/v2\n"
_NONCE_BYTES = 16
_MAX_KIND_LEN = 64
_MAX_CONTEXT_LEN = 128
#: Largest wire message :func:`decode_message` accepts by default (256 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: Largest envelope header :func:`decode_message` parses by default (a real one is < 1 KiB).
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
_WIRE_MAGIC = b"SFEN"

logger = logging.getLogger(SECURITY_LOGGER)


class EnvelopeError(ToolkitError):
    """Base class of every envelope rejection; carries who sent it and for which round."""

    reason = "envelope_error"

    def __init__(
        self,
        detail: str,
        *,
        sender: str | None = None,
        round: int | None = None,
        kind: str | None = None,
        recipient: str | None = None,
    ) -> None:
        self.detail = detail
        self.sender = sender
        self.round = round
        self.kind = kind
        self.recipient = recipient
        who = sender if sender is not None else "<unknown>"
        rnd = round if round is not None else "<unknown>"
        super().__init__(f"rejected message from {who!s} for round {rnd!s}: {detail}")

    def event(self) -> dict[str, Any]:
        """The structured record logged for this rejection."""
        return {
            "event": "message_rejected",
            "reason": self.reason,
            "sender": self.sender,
            "recipient": self.recipient,
            "round": self.round,
            "kind": self.kind,
            "detail": self.detail,
        }


class MalformedEnvelopeError(EnvelopeError):
    """The envelope's fields or wire encoding are invalid."""

    reason = "malformed_envelope"


class UnknownSenderError(EnvelopeError):
    """The sender is not in the receiver's allowlist."""

    reason = "unknown_sender"


class BadSignatureError(EnvelopeError):
    """The Ed25519 signature does not verify under the sender's allowlisted key."""

    reason = "bad_signature"


class WrongRecipientError(EnvelopeError):
    """The envelope is addressed to another party."""

    reason = "wrong_recipient"


class WrongContextError(EnvelopeError):
    """The envelope is bound to another exchange (another run or method) than the receiver's."""

    reason = "wrong_context"


class MessageTooLargeError(EnvelopeError):
    """The message, its header or its payload exceeds the receiver's size cap (rejected
    before it is parsed or hashed)."""

    reason = "message_too_large"


class UnexpectedKindError(EnvelopeError):
    """The message kind is not one this receiver expects here."""

    reason = "unexpected_kind"


class PayloadHashMismatchError(EnvelopeError):
    """The payload's SHA-256 differs from the signed digest (payload tampered or swapped)."""

    reason = "payload_hash_mismatch"


class RoundError(EnvelopeError):
    """The envelope's round is outside the accepted window."""

    reason = "round_mismatch"


class StaleRoundError(RoundError):
    """The envelope is for a round older than the accepted window."""

    reason = "stale_round"


class FutureRoundError(RoundError):
    """The envelope is for a round later than the expected round."""

    reason = "future_round"


class ReplayedNonceError(EnvelopeError):
    """The sender's nonce was already accepted once (a replayed message)."""

    reason = "replayed_nonce"


class TensorShapeError(EnvelopeError):
    """A decoded payload tensor is not a tensor or has the wrong shape."""

    reason = "wrong_shape"


class NonFiniteTensorError(EnvelopeError):
    """A decoded payload tensor holds NaN or infinite values."""

    reason = "non_finite_values"


class EnvelopeStateError(ToolkitError):
    """The persisted nonce state file is unreadable or corrupt (not a message rejection)."""


class NonceMemoryLostError(EnvelopeStateError):
    """The persisted nonce memory no longer holds a state its owner recorded it held
    (:meth:`EnvelopeVerifier.nonce_head`): the file was deleted, cut or edited since."""


def check_nonce_memory(state_path: str | os.PathLike[str], expect: Mapping[str, Any]) -> None:
    """Raise :class:`NonceMemoryLostError` (naming the file) unless the nonce state file
    ``state_path`` still holds ``expect``, a :meth:`EnvelopeVerifier.nonce_head` recorded
    earlier (nonces accepted after the recording are allowed); :class:`EnvelopeStateError`
    for an unreadable or corrupt file. Reads only: an owner checks every file it recorded
    before it opens (and so compacts) any of them."""
    _NonceMemory.load(Path(state_path), expect)


def _reject(error: EnvelopeError) -> EnvelopeError:
    logger.warning("%s", error, extra={"security_event": error.event()})
    return error


@dataclass(frozen=True)
class Envelope:
    """Signed header of one message. The payload travels next to it, bound by ``payload_sha256``."""

    sender: str
    recipient: str
    round: int
    nonce: str
    kind: str
    payload_sha256: str
    signature: bytes
    version: int = ENVELOPE_VERSION
    context: str = ""

    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers (every field but the signature)."""
        return signed_bytes(
            self.sender, self.recipient, self.round, self.nonce, self.kind, self.payload_sha256,
            self.version, self.context,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (signature as hex)."""
        return {
            "version": self.version,
            "sender": self.sender,
            "recipient": self.recipient,
            "round": self.round,
            "nonce": self.nonce,
            "kind": self.kind,
            "context": self.context,
            "payload_sha256": self.payload_sha256,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Envelope:
        """Parse and validate the fields of :meth:`to_dict`; raise :class:`MalformedEnvelopeError`."""
        if not isinstance(data, Mapping):
            raise _reject(MalformedEnvelopeError("envelope header is not an object"))
        sender = data.get("sender")
        rnd = data.get("round")
        kind = data.get("kind")
        sender_s = sender if isinstance(sender, str) else None
        round_i = rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None
        ctx = {"sender": sender_s, "round": round_i, "kind": kind if isinstance(kind, str) else None}

        def bad(detail: str) -> EnvelopeError:
            return _reject(MalformedEnvelopeError(detail, **ctx))

        expected = {"version", "sender", "recipient", "round", "nonce", "kind", "context",
                    "payload_sha256", "signature"}
        missing = sorted(expected - set(data))
        if missing:
            raise bad(f"missing envelope fields: {', '.join(missing)}")
        extra = sorted(set(data) - expected)
        if extra:
            raise bad(f"unexpected envelope fields: {', '.join(extra)}")
        if data["version"] != ENVELOPE_VERSION:
            raise bad(f"unsupported envelope version {data['version']!r}")
        for name in ("sender", "recipient"):
            try:
                validate_party_id(data[name])
            except IdentityError as exc:
                raise bad(f"invalid {name}: {exc}") from None
        if round_i is None or round_i < 0:
            raise bad(f"round must be a non-negative integer, got {rnd!r}")
        if not isinstance(kind, str) or not kind or len(kind) > _MAX_KIND_LEN:
            raise bad(f"kind must be a non-empty string of at most {_MAX_KIND_LEN} characters")
        if not _valid_context(data["context"]):
            raise bad(f"context must be a printable ASCII string of at most {_MAX_CONTEXT_LEN}"
                      " characters")
        if not _is_hex(data["nonce"], 2 * _NONCE_BYTES):
            raise bad(f"nonce must be {2 * _NONCE_BYTES} hex characters")
        if not _is_hex(data["payload_sha256"], 64):
            raise bad("payload_sha256 must be 64 hex characters")
        if not _is_hex(data["signature"], 128):
            raise bad("signature must be 128 hex characters (64 bytes)")
        return cls(
            sender=data["sender"],
            recipient=data["recipient"],
            round=round_i,
            nonce=data["nonce"],
            kind=kind,
            payload_sha256=data["payload_sha256"],
            signature=bytes.fromhex(data["signature"]),
            version=ENVELOPE_VERSION,
            context=data["context"],
        )


_LOWER_HEX = frozenset("0123456789abcdef")


def _is_hex(value: object, length: int) -> bool:
    """True for a string of exactly ``length`` lowercase hex digits (one spelling per value)."""
    return isinstance(value, str) and len(value) == length and set(value) <= _LOWER_HEX


def _valid_context(value: object) -> bool:
    return (isinstance(value, str) and len(value) <= _MAX_CONTEXT_LEN
            and all(" " <= ch <= "~" for ch in value))


def signed_bytes(
    sender: str,
    recipient: str,
    round: int,
    nonce: str,
    kind: str,
    payload_sha256: str,
    version: int = ENVELOPE_VERSION,
    context: str = "",
) -> bytes:
    """Domain-separated canonical JSON of the signed envelope fields."""
    body = {
        "version": version,
        "sender": sender,
        "recipient": recipient,
        "round": round,
        "nonce": nonce,
        "kind": kind,
        "context": context,
        "payload_sha256": payload_sha256,
    }
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def make_envelope(
    identity: Identity, recipient: str, round: int, kind: str, payload: bytes,
    *, context: str = "", payload_sha256: str | None = None,
) -> Envelope:
    """Sign a fresh envelope for ``payload`` from ``identity`` to ``recipient`` for ``round``,
    bound to ``context`` (the exchange it belongs to; ``""``: unbound). ``payload_sha256``:
    the payload's SHA-256 hex digest where the sender computed it already (one payload sent
    to many recipients); a wrong one only makes every receiver reject the message.

    A 128-bit random nonce makes every envelope unique, so a receiver can detect replays.
    """
    validate_party_id(recipient)
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
    if not isinstance(kind, str) or not kind or len(kind) > _MAX_KIND_LEN:
        raise ValueError(f"kind must be a non-empty string of at most {_MAX_KIND_LEN} characters")
    if not _valid_context(context):
        raise ValueError(f"context must be a printable ASCII string of at most {_MAX_CONTEXT_LEN}"
                         " characters")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    nonce = secrets.token_hex(_NONCE_BYTES)
    digest = hashlib.sha256(payload).hexdigest() if payload_sha256 is None else payload_sha256
    msg = signed_bytes(identity.party_id, recipient, round, nonce, kind, digest,
                       ENVELOPE_VERSION, context)
    return Envelope(
        sender=identity.party_id,
        recipient=recipient,
        round=round,
        nonce=nonce,
        kind=kind,
        payload_sha256=digest,
        signature=identity.sign(msg),
        context=context,
    )


def _header_bytes(envelope: Envelope) -> bytes:
    return json.dumps(envelope.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def encode_message(envelope: Envelope, payload: bytes) -> bytes:
    """Wire encoding: ``b"SFEN" | u32 header length | JSON header | payload``."""
    header = _header_bytes(envelope)
    return _WIRE_MAGIC + struct.pack(">I", len(header)) + header + bytes(payload)


def decode_message(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> tuple[Envelope, bytes]:
    """Parse :func:`encode_message` output; raise (and log) :class:`MalformedEnvelopeError`
    if malformed or not bytes, :class:`MessageTooLargeError` if the message exceeds
    ``max_bytes`` or its header ``max_header_bytes``.

    Size caps are checked on the lengths alone, before anything is copied, parsed or
    hashed. The header must be the canonical encoding of the envelope it holds. This only
    parses; call :meth:`EnvelopeVerifier.verify` before trusting anything.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _reject(MalformedEnvelopeError(f"message must be bytes, got {type(data).__name__}"))
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(view) > max_bytes:
        raise _reject(MessageTooLargeError(
            f"message of {len(view)} bytes exceeds the cap of {max_bytes} bytes"))
    if len(view) < 8 or bytes(view[:4]) != _WIRE_MAGIC:
        raise _reject(MalformedEnvelopeError("message does not start with the envelope magic"))
    (hlen,) = struct.unpack(">I", view[4:8])
    if hlen > max_header_bytes:
        raise _reject(MessageTooLargeError(
            f"envelope header of {hlen} bytes exceeds the cap of {max_header_bytes} bytes"))
    if len(view) < 8 + hlen:
        raise _reject(MalformedEnvelopeError("message truncated inside the envelope header"))
    raw_header = bytes(view[8 : 8 + hlen])
    try:
        header = json.loads(raw_header.decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise _reject(MalformedEnvelopeError(f"envelope header is not JSON: {exc}")) from None
    envelope = Envelope.from_dict(header)
    if _header_bytes(envelope) != raw_header:
        raise _reject(MalformedEnvelopeError(
            "envelope header is not in canonical form", sender=envelope.sender,
            round=envelope.round, kind=envelope.kind, recipient=envelope.recipient))
    return envelope, bytes(view[8 + hlen :])


#: How a nonce state file is named: ``<party>.nonces.jsonl`` (one receiver's) or
#: ``clients.nonces.jsonl`` (a shared :class:`NonceJournal`).
NONCE_FILE_SUFFIX = ".nonces.jsonl"
_NONCE_KEYS = frozenset({"floor", "s", "r", "n", "to"})


def nonce_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The nonce state files (``*`` + :data:`NONCE_FILE_SUFFIX`) directly in ``folder``,
    sorted: a party's replay-protection memory, which a Flower node keeps beside its ledger
    and which records no release. Reads only; [] for a folder that does not exist."""
    return [p for p in sorted(Path(folder).glob("*.jsonl")) if p.name.endswith(NONCE_FILE_SUFFIX)]


def ledger_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ledgers directly in ``folder`` (``ledgers/`` or ``ledgers/<method>/``), sorted: its
    ``*.jsonl`` files but the nonce state files (:func:`nonce_files`), which are never
    ledgers. Reads only; [] for a folder that does not exist."""
    return [p for p in sorted(Path(folder).glob("*.jsonl"))
            if not p.name.endswith(NONCE_FILE_SUFFIX)]


def _nonce_record(line: str) -> dict[str, Any]:
    """One parsed nonce state line (``json``/``KeyError``/``TypeError``/``ValueError`` when
    it is not one)."""
    rec = json.loads(line)
    if not isinstance(rec, dict):
        raise TypeError("a record must be a JSON object")
    if "floor" in rec:
        rec["floor"] = int(rec["floor"])
    else:
        rec["s"], rec["n"], rec["r"] = str(rec["s"]), str(rec["n"]), int(rec["r"])
    if "to" in rec and not isinstance(rec["to"], str):
        raise TypeError("'to' must be a party id")
    return rec


def nonce_file_problem(lines: Sequence[str]) -> str | None:
    """Why ``lines`` (a file's lines, without their newlines) are not the content of a nonce
    state file (a receiver's replay-protection memory: ``{"floor": round}`` and
    ``{"s": sender, "r": round, "n": nonce}`` records, optionally tagged ``"to"``); None when
    every non-blank line is such a record and holds no other field. Reads nothing itself."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = _nonce_record(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
            return f"line {number} is not a nonce record ({type(exc).__name__}: {exc})"
        extra = sorted(set(rec) - _NONCE_KEYS)
        if extra:
            return f"line {number} has fields {extra} that no nonce record holds"
    return None


class _NonceFile:
    """An append-only JSON-lines file of nonce records; each append is one write + one fsync.

    Lines: ``{"s": sender, "r": round, "n": nonce}`` for an accepted nonce and
    ``{"floor": round}`` when the oldest acceptable round moves up; in a shared
    :class:`NonceJournal` every line also names its receiving party (``"to"``). A final line
    without a newline (torn by a crash during the write) is dropped: its messages were never
    accepted, because nonces are written and fsync-ed before a verifier returns them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """The complete records of the file (none if it does not exist)."""
        path = self.path
        if not path.exists():
            return []
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise EnvelopeStateError(f"cannot read nonce state {path}: {exc}") from exc
        lines = text.split("\n")
        complete, torn = lines[:-1], lines[-1]
        if torn:
            logger.warning(
                "dropping torn last line of nonce state %s", path,
                extra={"security_event": {"event": "nonce_state_torn_line", "path": str(path)}},
            )
        records = []
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                records.append(_nonce_record(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise EnvelopeStateError(f"corrupt nonce state {path} line {number}: {exc}") from exc
        return records

    def rewrite(self, records: Sequence[dict[str, Any]]) -> None:
        """Atomically replace the file by ``records`` (temp file, fsync, rename)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(json.dumps(rec) + "\n" for rec in records))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` with one write and one fsync."""
        if not records:
            return
        text = "".join(json.dumps(record) + "\n" for record in records)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


class _NonceMemory:
    """One receiver's accepted nonces per sender and oldest acceptable round, optionally
    backed by a :class:`_NonceFile` of its own or by a shared journal (``tag`` = receiver)."""

    def __init__(self, file: _NonceFile | None = None, tag: str | None = None) -> None:
        self.file = file
        self.tag = tag
        self.floor = 0
        self.seen: dict[str, dict[str, int]] = {}

    @classmethod
    def open(cls, path: Path | None, expect: Mapping[str, Any] | None = None) -> _NonceMemory:
        """Load a private state file (if any) and compact it. With ``expect`` (a
        :meth:`head` recorded earlier) the loaded memory must hold it, else
        :class:`NonceMemoryLostError` is raised before the file is rewritten."""
        if path is None:
            return cls()
        memory = cls.load(path, expect)
        memory.file.rewrite(memory.snapshot())  # type: ignore[union-attr]
        return memory

    @classmethod
    def load(cls, path: Path, expect: Mapping[str, Any] | None = None) -> _NonceMemory:
        """Read a private state file without writing it; with ``expect`` it must hold that
        :meth:`head` (:class:`NonceMemoryLostError` naming the file otherwise)."""
        memory = cls(_NonceFile(path))
        for rec in memory.file.read():  # type: ignore[union-attr]
            memory.apply(rec)
        if expect is not None:
            problem = memory.lost(expect)
            if problem is not None:
                state = "is missing" if not path.exists() else "was cut or edited"
                raise NonceMemoryLostError(
                    f"nonce memory {path} {state}: {problem}; messages it had accepted would "
                    "be accepted again")
        return memory

    def head(self) -> dict[str, Any]:
        """The memory as it is now (oldest acceptable round and every nonce kept), to be
        recorded by the owner and checked with :meth:`lost` at the next open."""
        return {"floor": self.floor,
                "nonces": [[s, n, r] for s, nonces in sorted(self.seen.items())
                           for n, r in sorted(nonces.items())]}

    def lost(self, head: Mapping[str, Any]) -> str | None:
        """What of the recorded ``head`` this memory no longer holds (None: it holds it).
        Holding means: an oldest acceptable round at least as high, and every recorded
        nonce of a round still accepted. Nonces accepted after ``head`` was recorded (a
        crash before the owner recorded them) are extra, never missing."""
        floor = int(head["floor"])
        if self.floor < floor:
            return (f"its oldest accepted round is {self.floor}, but round {floor} was "
                    "recorded")
        missing = [str(n) for s, n, r in head["nonces"]
                   if int(r) >= self.floor and not self.contains(str(s), str(n))]
        if missing:
            return (f"{len(missing)} of the {len(head['nonces'])} recorded nonces are gone "
                    f"(first {missing[0][:12]}...)")
        return None

    def apply(self, rec: Mapping[str, Any]) -> None:
        """Replay one parsed record into memory."""
        if "floor" in rec:
            self.floor = max(self.floor, int(rec["floor"]))
        else:
            self.seen.setdefault(str(rec["s"]), {})[str(rec["n"])] = int(rec["r"])

    def _tagged(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {"to": self.tag, **rec} if self.tag is not None else rec

    def snapshot(self) -> list[dict[str, Any]]:
        """Compacted records of the current state (pruned below the floor)."""
        self.update(self.floor, ())
        records = [self._tagged({"floor": self.floor})]
        for sender, nonces in sorted(self.seen.items()):
            for nonce, rnd in sorted(nonces.items()):
                records.append(self._tagged({"s": sender, "r": rnd, "n": nonce}))
        return records

    def contains(self, sender: str, nonce: str) -> bool:
        return nonce in self.seen.get(sender, {})

    def records(self, floor: int, accepted: Sequence[tuple[str, str, int]]) -> list[dict[str, Any]]:
        """The lines that make ``floor`` and the ``(sender, nonce, round)`` triples durable."""
        out = [self._tagged({"floor": floor})] if floor > self.floor else []
        out.extend(self._tagged({"s": s, "r": r, "n": n}) for s, n, r in accepted)
        return out

    def update(self, floor: int, accepted: Iterable[tuple[str, str, int]]) -> None:
        """In memory only: raise the floor, prune, record ``accepted`` (call after they are durable)."""
        self.floor = max(self.floor, floor)
        for sender in list(self.seen):
            kept = {n: r for n, r in self.seen[sender].items() if r >= self.floor}
            if kept:
                self.seen[sender] = kept
            else:
                del self.seen[sender]
        for sender, nonce, rnd in accepted:
            self.seen.setdefault(sender, {})[nonce] = rnd


class NonceJournal:
    """One nonce state file shared by several receiving parties of one process.

    The in-process simulation acts as every client, and each client's verifier must persist
    the nonce of the message it accepts; with one shared journal, a batch of downloads to
    many clients is made durable with a single append and fsync instead of one per client.
    Every line names its receiver (``"to"``), so each party's replay memory stays separate.
    On opening, the file is compacted; ``legacy`` maps parties to per-party state files of
    the older layout, whose records are merged in (and the files removed after the compacted
    journal is durable). One process at a time may hold a journal for a given path.
    """

    def __init__(self, path: str | os.PathLike[str],
                 legacy: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
        self.file = _NonceFile(Path(path))
        self._memories: dict[str, _NonceMemory] = {}
        for rec in self.file.read():
            tag = rec.pop("to", None)
            if tag is None:
                raise EnvelopeStateError(f"nonce journal {self.file.path} has a line without 'to'")
            self._memory(tag).apply(rec)
        merged = []
        for tag, legacy_path in (legacy or {}).items():
            old = _NonceFile(Path(legacy_path))
            if old.path.exists():
                for rec in old.read():
                    self._memory(tag).apply(rec)
                merged.append(old.path)
        self.file.rewrite([rec for tag in sorted(self._memories)
                           for rec in self._memories[tag].snapshot()])
        for old_path in merged:
            old_path.unlink()

    @property
    def path(self) -> Path:
        """The journal file."""
        return self.file.path

    def _memory(self, tag: str) -> _NonceMemory:
        memory = self._memories.get(tag)
        if memory is None:
            memory = self._memories[tag] = _NonceMemory(self.file, tag)
        return memory


def commit_batches(batches: Sequence[VerificationBatch]) -> None:
    """Commit several open batches (e.g. of different receivers) with one append + fsync per
    state file: batches whose verifiers share a :class:`NonceJournal` cost one fsync in all.
    Nothing is recorded in memory before every file write has returned; every batch is
    closed afterwards, committed or (if a write failed) discarded. A batch that accepted no
    message writes nothing (a refused message leaves its receiver's state file as it was)."""
    try:
        writes: dict[int, tuple[_NonceFile, list[dict[str, Any]]]] = {}
        updates = []
        for batch in batches:
            memory, floor, accepted = batch._staged()
            if not accepted:  # every message withdrawn: nothing written, the floor stays put
                floor = memory.floor
            if memory.file is not None:
                _, records = writes.setdefault(id(memory.file), (memory.file, []))
                records.extend(memory.records(floor, accepted))
            updates.append((batch, memory, floor, accepted))
        for file, records in writes.values():
            file.append(records)
        for batch, memory, floor, accepted in updates:
            memory.update(floor, accepted)
            batch._accepted(accepted)
    finally:
        for batch in batches:
            batch.discard()


class VerificationBatch:
    """Messages verified together whose nonces become durable with one append + one fsync.

    Obtain one from :meth:`EnvelopeVerifier.batch`. :meth:`verify` runs every check of
    :meth:`EnvelopeVerifier.verify` (a nonce already accepted earlier, *or earlier in this
    batch*, is a :class:`ReplayedNonceError`) but only remembers the nonce as pending.
    :meth:`commit` writes the pending nonces (and the new oldest round) in one append and one
    fsync, and only then records them in memory. Write-ahead rule for callers: act on no
    payload of the batch before :meth:`commit` has returned. :meth:`discard` (or leaving a
    ``with`` block by an exception) drops the pending nonces: those messages count as never
    accepted. A verifier has at most one open batch at a time.
    """

    def __init__(self, verifier: EnvelopeVerifier) -> None:
        self._verifier = verifier
        self._floor = verifier.round_floor
        self._pending: dict[tuple[str, str], int] = {}
        self._open = True

    def __enter__(self) -> VerificationBatch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._open:
            return
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    @property
    def pending(self) -> int:
        """Number of messages verified in this batch and not yet committed."""
        return len(self._pending)

    def verify(
        self,
        envelope: Envelope,
        payload: bytes,
        expected_round: int,
        *,
        expected_kind: str | Collection[str] | None = None,
    ) -> Envelope:
        """Check one message (raising the matching, logged :class:`EnvelopeError`); on
        success its nonce is pending until :meth:`commit`. Returns the envelope."""
        if not self._open:
            raise EnvelopeStateError("this verification batch is already committed or discarded")
        self._floor = self._verifier._check(envelope, payload, expected_round, expected_kind,
                                            self._floor, self._pending)
        self._pending[(envelope.sender, envelope.nonce)] = envelope.round
        return envelope

    def withdraw(self, envelope: Envelope) -> None:
        """Drop ``envelope``'s pending nonce: a message that a check after :meth:`verify`
        refused (e.g. its payload does not decode) counts as never accepted, and its nonce
        is not written at :meth:`commit`. Only for a message nothing was acted on."""
        if not self._open:
            raise EnvelopeStateError("this verification batch is already committed or discarded")
        self._pending.pop((envelope.sender, envelope.nonce), None)

    def commit(self) -> None:
        """Persist every pending nonce with one append + fsync, then record them in memory."""
        commit_batches([self])

    def _staged(self) -> tuple[_NonceMemory, int, list[tuple[str, str, int]]]:
        if not self._open:
            raise EnvelopeStateError("this verification batch is already committed or discarded")
        return (self._verifier._nonces, self._floor,
                [(s, n, r) for (s, n), r in self._pending.items()])

    def _accepted(self, accepted: Sequence[tuple[str, str, int]]) -> None:
        for sender, nonce, rnd in accepted:
            logger.debug(
                "accepted message %s from %s for round %d", nonce, sender, rnd,
                extra={"security_event": {"event": "message_accepted", "sender": sender,
                                          "round": rnd, "recipient": self._verifier.recipient}},
            )

    def discard(self) -> None:
        """Drop the pending nonces (their messages count as not accepted)."""
        if self._open:
            self._close()

    def _close(self) -> None:
        self._open = False
        self._pending = {}
        self._verifier._batch_open = False


class EnvelopeVerifier:
    """Verifies envelopes addressed to ``recipient`` against an allowlist of public identities.

    ``max_round_lag`` (default 0) lets messages from up to that many rounds before the
    expected round through (e.g. for asynchronous clients); anything older is stale. The
    oldest acceptable round never moves backwards, even if a later call passes a smaller
    ``expected_round``, so pruned nonces cannot be replayed. With ``context`` only envelopes
    bound to exactly that context are accepted (:class:`WrongContextError`); with
    ``max_payload_bytes`` a longer payload is rejected before it is hashed
    (:class:`MessageTooLargeError`). With ``state_path`` (a file of its own;
    ``expect_nonces``: a :meth:`nonce_head` it must still hold) or ``journal`` (a
    :class:`NonceJournal` shared with other receivers) the nonce memory is persisted
    (append-only, fsync-ed before a message is accepted; one fsync per :meth:`verify` call,
    or per :class:`VerificationBatch`).
    """

    def __init__(
        self,
        allowlist: Mapping[str, PublicIdentity],
        recipient: str,
        *,
        max_round_lag: int = 0,
        state_path: str | os.PathLike[str] | None = None,
        allowed_kinds: Collection[str] | None = None,
        journal: NonceJournal | None = None,
        context: str | None = None,
        max_payload_bytes: int | None = None,
        expect_nonces: Mapping[str, Any] | None = None,
    ) -> None:
        validate_party_id(recipient)
        if context is not None and not _valid_context(context):
            raise ValueError(f"context must be a printable ASCII string of at most"
                             f" {_MAX_CONTEXT_LEN} characters, got {context!r}")
        if max_payload_bytes is not None and (not isinstance(max_payload_bytes, int)
                                              or isinstance(max_payload_bytes, bool)
                                              or max_payload_bytes < 0):
            raise ValueError(f"max_payload_bytes must be a non-negative integer, got"
                             f" {max_payload_bytes!r}")
        self.context = context
        self.max_payload_bytes = max_payload_bytes
        if not isinstance(max_round_lag, int) or max_round_lag < 0:
            raise ValueError(f"max_round_lag must be a non-negative integer, got {max_round_lag!r}")
        for party_id, pub in allowlist.items():
            if not isinstance(pub, PublicIdentity) or pub.party_id != party_id:
                raise ValueError(f"allowlist entry {party_id!r} is not that party's PublicIdentity")
        self.allowlist = dict(allowlist)
        self.recipient = recipient
        self.max_round_lag = max_round_lag
        self.allowed_kinds = frozenset(allowed_kinds) if allowed_kinds is not None else None
        if journal is not None and state_path is not None:
            raise ValueError("give either state_path or journal, not both")
        if expect_nonces is not None and state_path is None:
            raise ValueError("expect_nonces needs a state_path of this verifier's own")
        if journal is not None:
            if not isinstance(journal, NonceJournal):
                raise ValueError(f"journal must be a NonceJournal, got {type(journal).__name__}")
            self._nonces = journal._memory(recipient)
        else:
            self._nonces = _NonceMemory.open(Path(state_path) if state_path is not None else None,
                                             expect_nonces)
        self._batch_open = False

    @property
    def round_floor(self) -> int:
        """The oldest round still accepted."""
        return self._nonces.floor

    def nonce_head(self) -> dict[str, Any]:
        """The nonce memory as it is now (JSON-compatible: ``floor`` and ``nonces``, a list
        of ``[sender, nonce, round]``). An owner that records it after accepting a message
        and passes it back as ``expect_nonces`` when it reopens ``state_path`` is told
        (:class:`NonceMemoryLostError`, the file left as it was) when the file was deleted,
        cut or edited in between; nonces accepted after the recording are allowed."""
        return self._nonces.head()

    def advance_floor(self, floor: int) -> None:
        """Make ``floor`` the oldest accepted round (never lower than it is) and drop every
        nonce of an older round, durably: a private state file is atomically rewritten to
        exactly what is kept (so it stays as small as the memory), a shared journal gets a
        floor line. Messages of older rounds are refused as stale from then on, so the
        dropped nonces cannot be replayed."""
        if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
            raise ValueError(f"floor must be a non-negative integer, got {floor!r}")
        if self._batch_open:
            raise EnvelopeStateError(f"verifier of {self.recipient!r} has an open batch")
        memory = self._nonces
        if memory.file is not None and memory.tag is None:
            memory.update(floor, ())
            memory.file.rewrite(memory.snapshot())
        else:
            if memory.file is not None and floor > memory.floor:
                memory.file.append(memory.records(floor, ()))
            memory.update(floor, ())

    def batch(self) -> VerificationBatch:
        """Start a :class:`VerificationBatch`: verify several messages, persist their nonces
        with one append + one fsync at :meth:`VerificationBatch.commit`."""
        if self._batch_open:
            raise EnvelopeStateError(f"verifier of {self.recipient!r} already has an open batch")
        self._batch_open = True
        return VerificationBatch(self)

    def verify(
        self,
        envelope: Envelope,
        payload: bytes,
        expected_round: int,
        *,
        expected_kind: str | Collection[str] | None = None,
    ) -> Envelope:
        """Accept ``envelope`` + ``payload`` or raise the matching :class:`EnvelopeError`.

        On success the nonce is recorded (and persisted with its own append + fsync when
        configured) *before* returning, so the same message is rejected as a replay next
        time. Returns the envelope.
        """
        with self.batch() as batch:
            batch.verify(envelope, payload, expected_round, expected_kind=expected_kind)
        return envelope

    def verify_batch(
        self,
        items: Sequence[tuple[Envelope, bytes]],
        expected_round: int,
        *,
        expected_kind: str | Collection[str] | None = None,
    ) -> list[Envelope | EnvelopeError]:
        """Verify every ``(envelope, payload)``; persist the accepted nonces with one append +
        one fsync before returning. Item ``k`` of the result is the envelope (accepted) or
        the :class:`EnvelopeError` that rejected it (already logged); a nonce seen twice in
        ``items`` is accepted once and rejected as a replay the second time."""
        results: list[Envelope | EnvelopeError] = []
        with self.batch() as batch:
            for envelope, payload in items:
                try:
                    results.append(batch.verify(envelope, payload, expected_round,
                                                expected_kind=expected_kind))
                except EnvelopeError as err:
                    results.append(err)
        return results

    def _check(
        self,
        envelope: Envelope,
        payload: bytes,
        expected_round: int,
        expected_kind: str | Collection[str] | None,
        pending_floor: int,
        pending: Mapping[tuple[str, str], int],
    ) -> int:
        """Every check of :meth:`verify` (raising the logged error); returns the oldest
        acceptable round. ``pending``: (sender, nonce) pairs accepted earlier in the batch."""
        if not isinstance(envelope, Envelope):
            raise _reject(MalformedEnvelopeError(f"expected an Envelope, got {type(envelope).__name__}"))
        if not isinstance(expected_round, int) or expected_round < 0:
            raise ValueError(f"expected_round must be a non-negative integer, got {expected_round!r}")
        ctx = {
            "sender": envelope.sender,
            "round": envelope.round,
            "kind": envelope.kind,
            "recipient": envelope.recipient,
        }
        pub = self.allowlist.get(envelope.sender)
        if pub is None:
            raise _reject(UnknownSenderError(f"sender {envelope.sender!r} is not in the allowlist", **ctx))
        if not pub.verify(envelope.signature, envelope.signed_bytes()):
            raise _reject(BadSignatureError("signature does not verify under the sender's key", **ctx))
        if envelope.recipient != self.recipient:
            raise _reject(
                WrongRecipientError(
                    f"addressed to {envelope.recipient!r}, this receiver is {self.recipient!r}", **ctx
                )
            )
        if self.context is not None and envelope.context != self.context:
            raise _reject(WrongContextError(
                f"bound to exchange {envelope.context!r}, this receiver is {self.context!r}",
                **ctx))
        kinds = _kinds(expected_kind)
        if kinds is None:
            kinds = self.allowed_kinds
        if kinds is not None and envelope.kind not in kinds:
            raise _reject(
                UnexpectedKindError(
                    f"kind {envelope.kind!r} not among expected kinds {sorted(kinds)}", **ctx
                )
            )
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise _reject(MalformedEnvelopeError(f"payload must be bytes, got {type(payload).__name__}", **ctx))
        size = memoryview(payload).nbytes
        if self.max_payload_bytes is not None and size > self.max_payload_bytes:
            raise _reject(MessageTooLargeError(
                f"payload of {size} bytes exceeds the cap of {self.max_payload_bytes} bytes", **ctx))
        digest = hashlib.sha256(payload).hexdigest()
        if digest != envelope.payload_sha256:
            raise _reject(
                PayloadHashMismatchError(
                    f"payload SHA-256 {digest[:16]}... differs from signed {envelope.payload_sha256[:16]}...",
                    **ctx,
                )
            )
        floor = max(self._nonces.floor, pending_floor, expected_round - self.max_round_lag)
        if envelope.round > expected_round:
            raise _reject(FutureRoundError(f"round {envelope.round} is after expected round {expected_round}", **ctx))
        if envelope.round < floor:
            raise _reject(
                StaleRoundError(
                    f"round {envelope.round} is older than the oldest accepted round {floor} "
                    f"(expected {expected_round}, lag {self.max_round_lag})",
                    **ctx,
                )
            )
        if self._nonces.contains(envelope.sender, envelope.nonce):
            raise _reject(ReplayedNonceError(f"nonce {envelope.nonce} was already accepted", **ctx))
        if (envelope.sender, envelope.nonce) in pending:
            raise _reject(ReplayedNonceError(
                f"nonce {envelope.nonce} appears twice in one batch (replayed)", **ctx))
        return floor

    def verify_message(
        self,
        message: bytes,
        expected_round: int,
        *,
        expected_kind: str | Collection[str] | None = None,
    ) -> tuple[Envelope, bytes]:
        """Decode a wire message (:func:`encode_message`, capped at ``max_payload_bytes`` plus
        the header caps when set) and :meth:`verify` it."""
        cap = DEFAULT_MAX_MESSAGE_BYTES if self.max_payload_bytes is None \
            else 8 + DEFAULT_MAX_HEADER_BYTES + self.max_payload_bytes
        envelope, payload = decode_message(message, max_bytes=cap)
        self.verify(envelope, payload, expected_round, expected_kind=expected_kind)
        return envelope, payload

    def check_tensor(
        self,
        tensor: object,
        expected_shape: Sequence[int],
        envelope: Envelope,
        *,
        name: str = "payload",
    ) -> Tensor:
        """:func:`check_tensor` with the sender and round taken from ``envelope``."""
        return check_tensor(
            tensor, expected_shape, sender=envelope.sender, round=envelope.round,
            name=name, kind=envelope.kind, recipient=self.recipient,
        )


def _kinds(expected: str | Collection[str] | None) -> frozenset[str] | None:
    if expected is None:
        return None
    if isinstance(expected, str):
        return frozenset({expected})
    return frozenset(expected)


def check_tensor(
    tensor: object,
    expected_shape: Sequence[int],
    *,
    sender: str,
    round: int,
    name: str = "payload",
    kind: str | None = None,
    recipient: str | None = None,
) -> Tensor:
    """Return ``tensor`` if it is a floating/integer tensor of ``expected_shape`` with finite values.

    Raises :class:`TensorShapeError` (not a tensor, or another shape; ``-1`` in
    ``expected_shape`` matches any size) or :class:`NonFiniteTensorError` (NaN or inf),
    naming ``sender``, ``round`` and ``name``, and logs the rejection.
    """
    ctx = {"sender": sender, "round": round, "kind": kind, "recipient": recipient}
    if not isinstance(tensor, Tensor):
        raise _reject(TensorShapeError(f"{name} is a {type(tensor).__name__}, not a tensor", **ctx))
    shape = tuple(tensor.shape)
    want = tuple(int(s) for s in expected_shape)
    if len(shape) != len(want) or any(w != -1 and w != s for s, w in zip(shape, want, strict=True)):
        raise _reject(TensorShapeError(f"{name} has shape {shape}, expected {want}", **ctx))
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise _reject(
                NonFiniteTensorError(f"{name} holds {bad} non-finite value(s) (NaN or inf)", **ctx)
            )
    return tensor
