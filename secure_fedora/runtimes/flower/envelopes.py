"""Signed envelopes on every Flower message of the FEDORA runtime (on top of TLS and node auth).

Every message the ServerApp sends and every reply a ClientApp returns carries a
``ConfigRecord "envelope"`` that maps a recipient party id to the JSON header of a
:class:`privacy.envelope.Envelope` (sender, recipient, round, random nonce, kind, payload
SHA-256, Ed25519 signature by the sender's identity key).

What is signed: the *content digest* (:func:`content_digest`), a SHA-256 over a canonical,
length-prefixed encoding of every other record of the message -- each array's dtype, shape,
serialization type and bytes; each config and metric value with its type -- together with
the Flower run id, the experiment config hash and the message type. The signature therefore
covers everything the message carries, and binds it to one run and one config: a message
replayed into another run or another exchange fails the payload hash. Arrays travel once, in
their own dtype (float64 summaries stay float64, so results equal the in-process runtime's).

Kinds: a request's kind is its Flower message type (``train.fedora``); its reply's kind is the
message type plus ``.reply``. Rounds: 0 for the relatedness phase, ``r`` for training round
``r``.

First contact: before the first replies the server does not know which node holds which
client, so a first-contact request carries one envelope per client id (each with its own
nonce); a node verifies only the one addressed to its own client.

A receiver (:meth:`MessageSecurity.verify`) rejects, each with a distinct
:class:`~privacy.envelope.EnvelopeError` logged on the ``secure_fedora.security`` logger:
a missing or malformed envelope, an unknown sender, a bad signature, a wrong recipient, a
wrong kind, a payload whose digest differs (tampered content), a stale or future round, a
replayed nonce (the nonce memory is a file on the receiver's own disk, fsynced before a
message is accepted, so replays are caught across restarts), and a sender other than the
client whose slot the reply arrived in. Decoded arrays are checked by
:func:`checked_array` (dtype, shape, finite values).

A client's reply is signed by its release pipeline: :meth:`MessageSecurity.release_signer`
is the ``sign`` callable of the pipeline's :class:`~privacy.pipeline.SignEnvelope` stage
(``runtimes/flower/client_app.py`` runs the pipeline; under DP after the accounted release's
step check, for encrypted summaries after its :class:`~privacy.pipeline.EncryptPayload`).

Assumptions: signatures authenticate keys, so a party whose private key leaks can be
impersonated; payloads are authenticated here, confidentiality comes from TLS (and CKKS for
encrypted summaries).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from privacy.envelope import (
    Envelope,
    EnvelopeVerifier,
    MalformedEnvelopeError,
    check_tensor,
    make_envelope,
)
from privacy.identity import (
    ALLOWLIST_FILENAME,
    SERVER_ID,
    Identity,
    IdentityError,
    PublicIdentity,
    client_ids,
    load_allowlist,
    load_identity,
)
from privacy.pipeline import Release
from secure_fedora.runtimes.flower.protocol import DeployError
from secure_fedora.secure.transport import MalformedPayloadError, SenderMismatchError, log_rejection

__all__ = [
    "ENVELOPE_RECORD",
    "MessageSecurity",
    "checked_array",
    "content_digest",
    "reply_kind",
    "server_nonce_path",
]

#: Name of the record that holds the envelopes of a message.
ENVELOPE_RECORD = "envelope"
_DIGEST_DOMAIN = b"secure-fedora/flower-message/v1\x00"


def reply_kind(message_type: str) -> str:
    """The envelope kind of a reply to a ``message_type`` request."""
    return f"{message_type}.reply"


class _Feeder:
    """Length-prefixed, type-tagged encoding streamed into a hash (no ambiguity, no copies)."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256(_DIGEST_DOMAIN)

    def field(self, tag: bytes, data: bytes) -> None:
        self.hash.update(tag + struct.pack(">Q", len(data)))
        self.hash.update(data)

    def text(self, value: str) -> None:
        self.field(b"s", value.encode())

    def value(self, value: object, where: str) -> None:
        if isinstance(value, bool):
            self.field(b"?", b"\x01" if value else b"\x00")
        elif isinstance(value, int):
            self.field(b"i", str(value).encode())
        elif isinstance(value, float):
            self.field(b"f", value.hex().encode())
        elif isinstance(value, str):
            self.text(value)
        elif isinstance(value, bytes | bytearray | memoryview):
            self.field(b"b", bytes(value))
        elif isinstance(value, list):
            self.field(b"l", struct.pack(">Q", len(value)))
            for item in value:
                self.value(item, where)
        else:
            raise log_rejection(MalformedPayloadError(
                f"{where} holds a value of unsupported type {type(value).__name__}"))


def content_digest(
    content: RecordDict, *, run_id: int, config_hash: str, message_type: str
) -> bytes:
    """SHA-256 (32 bytes) of every record of ``content`` except the envelope record.

    Deterministic for equal content (records and keys are visited in sorted order) and
    different for any change of a name, a type, a dtype, a shape or a byte; it also covers
    ``run_id``, ``config_hash`` and ``message_type``.
    """
    feed = _Feeder()
    feed.text(str(int(run_id)))
    feed.text(config_hash)
    feed.text(message_type)
    names = sorted(name for name in content.keys() if name != ENVELOPE_RECORD)
    feed.field(b"n", struct.pack(">Q", len(names)))
    for name in names:
        record = content[name]
        feed.text(name)
        if isinstance(record, ArrayRecord):
            keys = sorted(record.keys())
            feed.field(b"A", struct.pack(">Q", len(keys)))
            for key in keys:
                array = record[key]
                feed.text(key)
                feed.text(str(array.dtype))
                feed.text(json.dumps([int(s) for s in array.shape]))
                feed.text(str(array.stype))
                feed.field(b"b", bytes(array.data))
        elif isinstance(record, ConfigRecord | MetricRecord):
            tag = b"C" if isinstance(record, ConfigRecord) else b"M"
            keys = sorted(record.keys())
            feed.field(tag, struct.pack(">Q", len(keys)))
            for key in keys:
                feed.text(key)
                feed.value(record[key], f"record {name!r} key {key!r}")
        else:
            raise log_rejection(MalformedPayloadError(
                f"record {name!r} has unsupported type {type(record).__name__}"))
    return feed.hash.digest()


def checked_array(
    content: RecordDict,
    record: str,
    key: str,
    dtype: torch.dtype,
    shape: Sequence[int],
    envelope: Envelope,
) -> Tensor:
    """The array ``record[key]`` of an accepted message as a tensor, or a logged rejection.

    Raises :class:`~secure_fedora.secure.transport.MalformedPayloadError` for a missing record or key
    or another dtype, :class:`~privacy.envelope.TensorShapeError` for another shape and
    :class:`~privacy.envelope.NonFiniteTensorError` for NaN or infinite values, each naming
    the sender and round of ``envelope``.
    """
    ctx = {"sender": envelope.sender, "round": envelope.round, "kind": envelope.kind,
           "recipient": envelope.recipient}
    holder = content[record] if record in content else None
    if not isinstance(holder, ArrayRecord) or key not in holder:
        raise log_rejection(MalformedPayloadError(
            f"message lacks the array {record}/{key}", **ctx))
    array = holder[key].numpy()
    expected = np.dtype(str(dtype).removeprefix("torch."))
    if array.dtype != expected:
        raise log_rejection(MalformedPayloadError(
            f"array {record}/{key} is {array.dtype}, expected {expected}", **ctx))
    tensor = torch.from_numpy(np.array(array, copy=True))
    return check_tensor(tensor, shape, name=f"array {record}/{key}", **ctx)


def _other_identities(identity_dir: Path, party: str) -> list[str]:
    """The parties other than ``party`` whose private signing key ``identity_dir`` holds
    (sorted; empty when it holds ``party``'s or cannot be listed)."""
    suffix = ".ed25519.key"
    try:
        names = sorted(
            p.name[: -len(suffix)] for p in identity_dir.iterdir() if p.name.endswith(suffix)
        )
    except OSError:
        return []
    return [] if party in names else names


def server_nonce_path(state_dir: Path) -> Path:
    """The ServerApp's nonce memory file of the scope whose folder is ``state_dir``."""
    return state_dir / f"{SERVER_ID}.nonces.jsonl"


class MessageSecurity:
    """One party's signing identity and its envelope verifier for one Flower run.

    ``peers`` are the parties it accepts messages from (the server accepts the federation's
    clients; a client accepts the server only). The verifier's nonce memory is persisted in
    ``nonce_path`` (0600, fsynced before a message is accepted); with ``expect_nonces`` (a
    :meth:`~privacy.envelope.EnvelopeVerifier.nonce_head` the owner recorded) the file must
    still hold it (:class:`~privacy.envelope.NonceMemoryLostError` otherwise, nothing written).
    """

    def __init__(
        self,
        identity: Identity,
        peers: Mapping[str, PublicIdentity],
        nonce_path: Path,
        run_id: int,
        config_hash: str,
        expect_nonces: Mapping[str, Any] | None = None,
    ) -> None:
        self.identity = identity
        self.run_id = int(run_id)
        self.config_hash = config_hash
        self.verifier = EnvelopeVerifier(peers, identity.party_id, state_path=nonce_path,
                                         expect_nonces=expect_nonces)

    @property
    def party_id(self) -> str:
        """The party this process acts as (``server`` or ``client-XYZ``)."""
        return self.identity.party_id

    @staticmethod
    def _allowlist(identity_dir: Path, parties: Sequence[str]) -> dict[str, PublicIdentity]:
        try:
            allowlist = load_allowlist(identity_dir / ALLOWLIST_FILENAME)
        except IdentityError as err:
            raise DeployError(str(err)) from None
        missing = [p for p in parties if p not in allowlist]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DeployError(
                f"allowlist {identity_dir / ALLOWLIST_FILENAME} lacks parties of this federation: "
                f"{shown}"
            )
        return allowlist

    @staticmethod
    def _check_own_entry(identity_dir: Path, allowlist: Mapping[str, PublicIdentity],
                         identity: Identity) -> None:
        """DeployError when the allowlist lists other public keys for this party than its
        identity holds: the peers would reject every message it signs."""
        listed = allowlist.get(identity.party_id)
        if listed is not None and listed != identity.public:
            raise DeployError(
                f"allowlist {identity_dir / ALLOWLIST_FILENAME} lists other public keys for "
                f"{identity.party_id} than its identity directory holds (assembled from another "
                f"{identity.party_id}.public.json, or the keys were replaced): the other "
                "parties would reject its messages; assemble the allowlist from this party's "
                "current public key file and install it again")

    @classmethod
    def for_server(
        cls, identity_dir: Path, state_dir: Path, run_id: int, config_hash: str, num_clients: int,
        expect_nonces: Mapping[str, Any] | None = None,
    ) -> MessageSecurity:
        """The ServerApp's security: its ``server`` identity from ``identity_dir``, accepting the
        ``num_clients`` allowlisted clients; nonces in ``state_dir/server.nonces.jsonl``, which
        must hold ``expect_nonces`` when given."""
        clients = client_ids(num_clients)
        allowlist = cls._allowlist(identity_dir, clients)
        try:
            identity = load_identity(identity_dir, SERVER_ID)
        except IdentityError as err:
            raise DeployError(f"the server identity cannot be loaded: {err}") from None
        cls._check_own_entry(identity_dir, allowlist, identity)
        peers = {p: allowlist[p] for p in clients}
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(identity, peers, server_nonce_path(state_dir), run_id, config_hash,
                   expect_nonces)

    @classmethod
    def for_client(
        cls,
        identity_dir: Path,
        run_dir: Path,
        run_id: int,
        config_hash: str,
        client_index: int,
        num_clients: int,
        expect_nonces: Mapping[str, Any] | None = None,
    ) -> MessageSecurity:
        """Client ``client_index``'s security: its identity from ``identity_dir``, accepting the
        allowlisted server only; nonces in ``run_dir/<client id>.nonces.jsonl``, which must
        hold ``expect_nonces`` when given."""
        party = client_ids(num_clients)[client_index]
        allowlist = cls._allowlist(identity_dir, [SERVER_ID])
        try:
            identity = load_identity(identity_dir, party)
        except IdentityError as err:
            others = _other_identities(identity_dir, party)
            if others:
                # a node started with another party's identity directory (a pasted command)
                raise DeployError(
                    f"identity-dir {str(identity_dir)!r} holds the identity of "
                    f"{', '.join(others)}, not of {party} (partition-id={client_index}): point "
                    f"identity-dir at {party}'s own identity directory"
                ) from None
            raise DeployError(f"the identity of {party} cannot be loaded: {err}") from None
        cls._check_own_entry(identity_dir, allowlist, identity)
        peers = {SERVER_ID: allowlist[SERVER_ID]}
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(identity, peers, run_dir / f"{party}.nonces.jsonl", run_id, config_hash,
                   expect_nonces)

    def digest(self, content: RecordDict, message_type: str) -> bytes:
        """:func:`content_digest` of ``content`` for this run and config."""
        return content_digest(content, run_id=self.run_id, config_hash=self.config_hash,
                              message_type=message_type)

    def sign(
        self,
        content: RecordDict,
        message_type: str,
        recipients: Sequence[str],
        rnd: int,
        *,
        reply: bool,
    ) -> RecordDict:
        """Add the envelope record to ``content`` (in place; returned): one signed envelope per
        recipient over the digest of everything else in ``content``."""
        if not recipients:
            raise DeployError("a signed message needs at least one recipient")
        payload = self.digest(content, message_type)
        kind = reply_kind(message_type) if reply else message_type
        headers = {
            recipient: json.dumps(
                make_envelope(self.identity, recipient, rnd, kind, payload).to_dict(),
                sort_keys=True, separators=(",", ":"),
            )
            for recipient in recipients
        }
        content[ENVELOPE_RECORD] = ConfigRecord(headers)
        return content

    def release_signer(
        self,
        content: RecordDict,
        message_type: str,
        recipients: Sequence[str],
        rnd: int,
        *,
        reply: bool,
        prepare: Callable[[Release], None] | None = None,
    ) -> Callable[[Release], bytes]:
        """The ``sign`` callable of a :class:`privacy.pipeline.SignEnvelope` stage that signs
        ``content`` (:meth:`sign`) when the release pipeline reaches it, so the signature on
        a client's reply is produced by that client's pipeline. ``prepare(release)`` first
        puts what the pipeline produced into ``content`` (e.g. the ciphertext of an
        :class:`~privacy.pipeline.EncryptPayload` stage). Returns the signed envelope
        headers (canonical JSON bytes)."""

        def sign(release: Release) -> bytes:
            if prepare is not None:
                prepare(release)
            self.sign(content, message_type, recipients, rnd, reply=reply)
            headers = content[ENVELOPE_RECORD]
            return json.dumps({r: headers[r] for r in recipients}, sort_keys=True,
                              separators=(",", ":")).encode()

        return sign

    def verify(
        self,
        content: RecordDict,
        message_type: str,
        *,
        reply: bool,
        expected_round: int | None,
        expected_sender: str | None,
    ) -> Envelope:
        """Accept the envelope addressed to this party or raise the matching (logged)
        :class:`~privacy.envelope.EnvelopeError`.

        ``expected_round`` None (a client, which learns the round from the server) takes the
        envelope's own signed round; the verifier's round floor still rejects anything older
        than a round already accepted. ``expected_sender`` None accepts any allowlisted peer.
        The nonce is recorded (durably) before returning, so the same message is a replay
        next time -- also when the caller then refuses the message on its content or on its
        own state: deliberately, since the handlers act on a message as they read it and a
        refusal that depends on the receiver's state must not be retried with the same signed
        bytes once that state changed (the server signs every request, retries included,
        with a fresh nonce). A message this method rejects records nothing.
        """
        me = self.party_id
        kind = reply_kind(message_type) if reply else message_type
        record = content[ENVELOPE_RECORD] if ENVELOPE_RECORD in content else None
        if not isinstance(record, ConfigRecord):
            raise log_rejection(MalformedEnvelopeError(
                f"{kind} message carries no envelope record", kind=kind, recipient=me))
        header = record.get(me)
        if not isinstance(header, str):
            raise log_rejection(MalformedEnvelopeError(
                f"{kind} message carries no envelope addressed to {me!r}", kind=kind,
                recipient=me))
        try:
            fields = json.loads(header)
        except json.JSONDecodeError as err:
            raise log_rejection(MalformedEnvelopeError(
                f"envelope header is not JSON: {err}", kind=kind, recipient=me)) from None
        envelope = Envelope.from_dict(fields)  # raises (and logs) MalformedEnvelopeError
        if (expected_sender is not None and envelope.sender != expected_sender
                and envelope.sender in self.verifier.allowlist):
            raise log_rejection(SenderMismatchError(
                f"message signed by {envelope.sender!r} arrived in the slot of {expected_sender!r}",
                sender=envelope.sender, round=envelope.round, kind=envelope.kind, recipient=me))
        rnd = envelope.round if expected_round is None else expected_round
        self.verifier.verify(envelope, self.digest(content, message_type), rnd, expected_kind=kind)
        return envelope

