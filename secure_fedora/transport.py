"""Authenticated model messages between the server and the clients of a federation.

Every model row a client uploads (``theta_i``) and every row the server sends back
(``phi_i``) travels as a signed envelope (:mod:`privacy.envelope`) around a small binary
tensor payload. The receiver accepts a message only if

- the sender is allowlisted (:class:`~privacy.envelope.UnknownSenderError`) and, on the
  server, is the client whose slot the message arrived in (:class:`SenderMismatchError`);
- the Ed25519 signature verifies (:class:`~privacy.envelope.BadSignatureError`; a tampered
  header, or a key that is not the allowlisted one);
- it is addressed to the receiver, has the expected kind, and the payload hashes to the
  signed digest (:class:`~privacy.envelope.PayloadHashMismatchError`: tampered payload);
- its round is the current one (stale / future round errors) and its nonce was never
  accepted before (:class:`~privacy.envelope.ReplayedNonceError`); the nonce memory of every
  receiving party is a file under ``state_dir``, so a replay is caught after a restart;
- the payload is a well-formed tensor (:class:`MalformedPayloadError`) of the expected shape
  (:class:`~privacy.envelope.TensorShapeError`) with finite values
  (:class:`~privacy.envelope.NonFiniteTensorError`).

A rejected message is dropped: the batch receivers return a :class:`Rejection` record for it
and the others are accepted, so the federation continues with the remaining clients. Every
rejection is logged once as a WARNING on the ``secure_fedora.security`` logger, with a
structured ``security_event`` attribute.

Payload format (no pickle, no ``torch.load``): ``b"SFTR"``, a version byte, a dtype byte
(1 = float32), the number of dimensions, a reserved zero byte, each dimension as a big-endian
u64, then the values as little-endian float32. Float tensors of another precision are rounded
to float32 before sending.

:class:`SecureTransport` holds the identities of the parties a process acts as: all of them
in the in-process simulation, or just ``"server"`` / one client in a distributed runtime.
:class:`SecureExchange` adds the in-process round logic: it keeps the server's last accepted
``theta`` rows and every client's last accepted ``phi`` row, and puts them back into the
method's matrices for rejected messages (a rejected client counts as a non-participant).

Assumptions: signatures authenticate keys, so a client whose private key leaks can be
impersonated; payloads are authenticated, not encrypted (use TLS in a deployment, or
:mod:`secure_fedora.encrypted_propagation`); the state directory is trusted local storage
(an attacker who can rewrite it can reopen replays).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privacy.envelope import (
    SECURITY_LOGGER,
    EnvelopeError,
    EnvelopeVerifier,
    check_tensor,
    decode_message,
    encode_message,
    make_envelope,
)
from privacy.identity import (
    ALLOWLIST_FILENAME,
    SERVER_ID,
    Identity,
    PublicIdentity,
    client_ids,
    init_keys,
    load_allowlist,
    load_identity,
    validate_party_id,
)

__all__ = [
    "KIND_ENC_PHI",
    "KIND_ENC_THETA",
    "KIND_PHI",
    "KIND_THETA",
    "MalformedPayloadError",
    "Rejection",
    "SecureExchange",
    "SecureTransport",
    "SenderMismatchError",
    "TransportError",
    "decode_tensor",
    "encode_tensor",
    "log_rejection",
]

KIND_THETA = "theta"
KIND_PHI = "phi"
KIND_ENC_THETA = "enc_theta"
KIND_ENC_PHI = "enc_phi"

_TENSOR_MAGIC = b"SFTR"
_TENSOR_VERSION = 1
_DTYPE_FLOAT32 = 1
_MAX_NDIM = 8
_HEAD = struct.Struct(">4sBBBB")

logger = logging.getLogger(SECURITY_LOGGER)


class TransportError(Exception):
    """The transport cannot be set up or used as asked (keys, state directory, arguments)."""


class SenderMismatchError(EnvelopeError):
    """An allowlisted party's message arrived in another client's slot (misrouted or spliced)."""

    reason = "sender_mismatch"


class MalformedPayloadError(EnvelopeError):
    """An authenticated payload is not a well-formed tensor encoding."""

    reason = "malformed_payload"


def log_rejection(error: EnvelopeError) -> EnvelopeError:
    """Log ``error`` once as a WARNING on ``secure_fedora.security`` (with its structured
    ``security_event``) and return it, for rejections raised outside :mod:`privacy.envelope`."""
    logger.warning("%s", error, extra={"security_event": error.event()})
    return error


_log = log_rejection


@dataclass(frozen=True)
class Rejection:
    """One dropped message: whose it was, which round, why (``reason``) and the error class."""

    client: int
    round: int
    reason: str
    error_type: str
    detail: str = ""
    direction: str = "upload"

    @classmethod
    def from_error(cls, client: int, rnd: int, error: EnvelopeError, direction: str) -> Rejection:
        """The record of ``error`` for client ``client`` in round ``rnd``."""
        return cls(client, rnd, error.reason, type(error).__name__, error.detail, direction)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (for results and logs)."""
        return asdict(self)


# --------------------------------------------------------------------------------------
# Tensor payloads
# --------------------------------------------------------------------------------------


def encode_tensor(tensor: Tensor) -> bytes:
    """Serialize a real tensor as float32 (header + little-endian values); never pickles.

    Floating tensors of other precisions are rounded to float32; integer, boolean and
    complex tensors raise :class:`TypeError`. Values are sent as they are (NaN included):
    judging them is the receiver's job.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"only real floating tensors can be sent, got dtype {tensor.dtype}")
    if tensor.dim() > _MAX_NDIM:
        raise TypeError(f"tensor has {tensor.dim()} dimensions; at most {_MAX_NDIM} are supported")
    arr = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    head = _HEAD.pack(_TENSOR_MAGIC, _TENSOR_VERSION, _DTYPE_FLOAT32, arr.ndim, 0)
    dims = struct.pack(f">{arr.ndim}Q", *arr.shape)
    return head + dims + arr.astype("<f4", copy=False).tobytes()


def decode_tensor(payload: bytes, *, sender: str | None = None, round: int | None = None,
                  kind: str | None = None, recipient: str | None = None) -> Tensor:
    """Parse :func:`encode_tensor` output into a new float32 tensor.

    Raises (and logs) :class:`MalformedPayloadError` naming ``sender`` and ``round`` when the
    magic, version, dtype or dimension count is unknown, or the length does not match the
    shape exactly.
    """
    ctx = {"sender": sender, "round": round, "kind": kind, "recipient": recipient}
    data = memoryview(payload)
    if len(data) < _HEAD.size:
        raise _log(MalformedPayloadError(f"tensor payload of {len(data)} bytes is too short", **ctx))
    magic, version, dtype, ndim, reserved = _HEAD.unpack_from(data, 0)
    if magic != _TENSOR_MAGIC or version != _TENSOR_VERSION or reserved != 0:
        raise _log(MalformedPayloadError("payload is not a version-1 tensor encoding", **ctx))
    if dtype != _DTYPE_FLOAT32:
        raise _log(MalformedPayloadError(f"unsupported tensor dtype code {dtype}", **ctx))
    if ndim > _MAX_NDIM:
        raise _log(MalformedPayloadError(f"tensor has {ndim} dimensions (> {_MAX_NDIM})", **ctx))
    offset = _HEAD.size + 8 * ndim
    if len(data) < offset:
        raise _log(MalformedPayloadError("tensor payload truncated inside its shape", **ctx))
    shape = struct.unpack_from(f">{ndim}Q", data, _HEAD.size)
    count = math.prod(shape)
    if len(data) - offset != 4 * count:
        raise _log(MalformedPayloadError(
            f"tensor of shape {tuple(shape)} needs {4 * count} value bytes, payload has "
            f"{len(data) - offset}", **ctx))
    values = np.frombuffer(data, dtype="<f4", count=count, offset=offset)
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


# --------------------------------------------------------------------------------------
# The transport
# --------------------------------------------------------------------------------------


@dataclass
class TransportStats:
    """Traffic and time of the messages this transport signed and verified (cumulative)."""

    messages_sent: int = 0
    messages_accepted: int = 0
    messages_rejected: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_seconds: float = 0.0
    receive_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """JSON-compatible form."""
        return asdict(self)


def _check_int(value: object, name: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
        high is not None and value >= high
    ):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise TransportError(f"{name} must be an integer in {bound}, got {value!r}")
    return value


class SecureTransport:
    """Signs and verifies the model messages of one federation (see the module docstring).

    ``key_dir`` holds the :func:`privacy.identity.init_keys` layout (``allowlist.json`` and
    the private keys of the parties this process acts as); it must list ``"server"`` and
    ``client-000`` ... for ``num_clients`` clients. ``parties`` names the parties this
    process acts as (default: all of them, for the in-process simulation); only their
    private keys are loaded. Each acting party's nonce memory is persisted in
    ``state_dir/<party>.nonces.jsonl`` (fsync-ed before a message is accepted).
    ``max_round_lag`` lets messages up to that many rounds old through (default 0: only the
    current round).
    """

    def __init__(
        self,
        key_dir: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
        num_clients: int,
        *,
        parties: Iterable[str] | None = None,
        max_round_lag: int = 0,
    ) -> None:
        self.num_clients = _check_int(num_clients, "num_clients", 1)
        self.client_ids = client_ids(num_clients)
        key_dir = Path(key_dir)
        allowlist = load_allowlist(key_dir / ALLOWLIST_FILENAME)
        missing = [p for p in (SERVER_ID, *self.client_ids) if p not in allowlist]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TransportError(
                f"allowlist {key_dir / ALLOWLIST_FILENAME} lacks {len(missing)} part"
                f"{'y' if len(missing) == 1 else 'ies'} of a {num_clients}-client federation: {shown}"
            )
        acting = list(parties) if parties is not None else [SERVER_ID, *self.client_ids]
        unknown = [p for p in acting if p != SERVER_ID and p not in self.client_ids]
        if unknown:
            raise TransportError(f"parties {unknown} are not part of this federation")
        self.state_dir = Path(state_dir)
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise TransportError(f"transport state directory {self.state_dir} is not a directory")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.identities: dict[str, Identity] = {p: load_identity(key_dir, p) for p in acting}
        clients_only = {c: allowlist[c] for c in self.client_ids}
        server_only = {SERVER_ID: allowlist[SERVER_ID]}
        self._verifiers: dict[str, EnvelopeVerifier] = {}
        for party in acting:
            allowed: Mapping[str, PublicIdentity] = clients_only if party == SERVER_ID else server_only
            self._verifiers[party] = EnvelopeVerifier(
                allowed, party, max_round_lag=max_round_lag,
                state_path=self.state_dir / f"{party}.nonces.jsonl",
            )
        self.stats = TransportStats()

    @classmethod
    def for_simulation(cls, run_dir: str | os.PathLike[str], num_clients: int, method: str,
                       *, max_round_lag: int = 0) -> SecureTransport:
        """The in-process transport of one method's run: keys in ``run_dir/keys`` (created with
        every party's keys, 0600, if there is no allowlist yet -- the layout the privacy ledgers
        use) and nonce state in ``run_dir/transport/<method>`` (each method numbers its rounds
        from 1, so each needs its own replay window)."""
        validate_party_id(method)
        run_dir = Path(run_dir)
        key_dir = run_dir / "keys"
        if not (key_dir / ALLOWLIST_FILENAME).exists():
            init_keys(key_dir, [SERVER_ID, *client_ids(num_clients)])
        return cls(key_dir, run_dir / "transport" / method, num_clients,
                   max_round_lag=max_round_lag)

    # -- helpers -------------------------------------------------------------------------
    def client_id(self, client: int) -> str:
        """The party id of client index ``client``."""
        return self.client_ids[_check_int(client, "client", 0, self.num_clients)]

    def _identity(self, party: str) -> Identity:
        ident = self.identities.get(party)
        if ident is None:
            raise TransportError(f"this transport does not act as {party!r} (no private key loaded)")
        return ident

    def _verifier(self, party: str) -> EnvelopeVerifier:
        if party not in self._verifiers:
            raise TransportError(f"this transport does not act as {party!r} (cannot receive for it)")
        return self._verifiers[party]

    def _send(self, rnd: int, sender: str, recipient: str, kind: str, payload: bytes) -> bytes:
        _check_int(rnd, "round")
        start = time.perf_counter()
        envelope = make_envelope(self._identity(sender), recipient, rnd, kind, payload)
        message = encode_message(envelope, payload)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(message)
        self.stats.send_seconds += time.perf_counter() - start
        return message

    def _open(self, rnd: int, receiver: str, message: bytes, kind: str,
              expected_sender: str | None) -> tuple[str, bytes]:
        """Verify one message for ``receiver``; returns (sender, payload) or raises EnvelopeError."""
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise TypeError(f"messages must be bytes, got {type(message).__name__}")
        verifier = self._verifier(receiver)
        envelope, payload = decode_message(message)
        if (expected_sender is not None and envelope.sender != expected_sender
                and envelope.sender in verifier.allowlist):
            raise _log(SenderMismatchError(
                f"message claims to be from {envelope.sender!r} but arrived in the slot of "
                f"{expected_sender!r}", sender=envelope.sender, round=envelope.round,
                kind=envelope.kind, recipient=receiver))
        verifier.verify(envelope, payload, rnd, expected_kind=kind)
        return envelope.sender, payload

    def _receive_batch(
        self, rnd: int, receiver_of: Callable[[int], str], messages: Mapping[int, bytes],
        kind: str, sender_of: Callable[[int], str], direction: str,
        decode: Callable[[int, str, bytes], Any],
    ) -> tuple[dict[int, Any], list[Rejection], list[EnvelopeError]]:
        _check_int(rnd, "round")
        start = time.perf_counter()
        accepted: dict[int, Any] = {}
        rejections: list[Rejection] = []
        errors: list[EnvelopeError] = []
        for client in sorted(messages):
            _check_int(client, "client index", 0, self.num_clients)
            message = messages[client]
            try:
                sender, payload = self._open(rnd, receiver_of(client), message, kind,
                                             sender_of(client))
                accepted[client] = decode(client, sender, payload)
            except EnvelopeError as err:
                rejections.append(Rejection.from_error(client, rnd, err, direction))
                errors.append(err)
            self.stats.bytes_received += len(message)
        self.stats.messages_accepted += len(accepted)
        self.stats.messages_rejected += len(rejections)
        self.stats.receive_seconds += time.perf_counter() - start
        return accepted, rejections, errors

    @staticmethod
    def _tensor_decoder(rnd: int, receiver_of: Callable[[int], str], kind: str,
                        expected_shape: Sequence[int]) -> Callable[[int, str, bytes], Tensor]:
        def decode(client: int, sender: str, payload: bytes) -> Tensor:
            receiver = receiver_of(client)
            tensor = decode_tensor(payload, sender=sender, round=rnd, kind=kind, recipient=receiver)
            return check_tensor(tensor, expected_shape, sender=sender, round=rnd,
                                name=f"{kind} row of client {client}", kind=kind,
                                recipient=receiver)
        return decode

    @staticmethod
    def _raw(_client: int, _sender: str, payload: bytes) -> bytes:
        return payload

    @staticmethod
    def _server(_client: int) -> str:
        return SERVER_ID

    # -- client -> server ----------------------------------------------------------------
    def client_upload(self, rnd: int, client: int, row: Tensor, kind: str = KIND_THETA) -> bytes:
        """Client side: ``row`` as float32 in an envelope signed by the client, to the server."""
        return self._send(rnd, self.client_id(client), SERVER_ID, kind, encode_tensor(row))

    def client_upload_bytes(self, rnd: int, client: int, payload: bytes, kind: str) -> bytes:
        """Client side: an opaque payload (e.g. a ciphertext) in a signed envelope to the server."""
        return self._send(rnd, self.client_id(client), SERVER_ID, kind, bytes(payload))

    def server_receive(
        self, rnd: int, messages: Mapping[int, bytes], expected_shape: Sequence[int],
        *, kind: str = KIND_THETA,
    ) -> tuple[dict[int, Tensor], list[Rejection]]:
        """Server side: verify and decode each client's upload for round ``rnd``.

        ``messages`` maps the client index whose channel delivered a message to the message.
        Returns the accepted tensors (float32, ``expected_shape``; ``-1`` matches any size)
        by client index, and one :class:`Rejection` per dropped message (each also logged).
        """
        accepted, rejections, _ = self._receive_batch(
            rnd, self._server, messages, kind, self.client_id, "upload",
            self._tensor_decoder(rnd, self._server, kind, expected_shape))
        return accepted, rejections

    def server_receive_bytes(
        self, rnd: int, messages: Mapping[int, bytes], kind: str
    ) -> tuple[dict[int, bytes], list[Rejection]]:
        """Server side: like :meth:`server_receive` for opaque payloads (returned unparsed)."""
        accepted, rejections, _ = self._receive_batch(
            rnd, self._server, messages, kind, self.client_id, "upload", self._raw)
        return accepted, rejections

    # -- server -> client ----------------------------------------------------------------
    def server_send(self, rnd: int, client: int, phi_row: Tensor, kind: str = KIND_PHI) -> bytes:
        """Server side: ``phi_row`` as float32 in an envelope signed by the server, to ``client``."""
        return self._send(rnd, SERVER_ID, self.client_id(client), kind, encode_tensor(phi_row))

    def server_send_bytes(self, rnd: int, client: int, payload: bytes, kind: str) -> bytes:
        """Server side: an opaque payload in a signed envelope to ``client``."""
        return self._send(rnd, SERVER_ID, self.client_id(client), kind, bytes(payload))

    def client_receive(
        self, rnd: int, client: int, message: bytes, expected_shape: Sequence[int],
        *, kind: str = KIND_PHI,
    ) -> Tensor:
        """Client side: verify and decode the server's message; raises the matching
        :class:`~privacy.envelope.EnvelopeError` (already logged) if it must be dropped."""
        accepted, _, errors = self._receive_batch(
            rnd, self.client_id, {client: message}, kind, self._server_sender, "download",
            self._tensor_decoder(rnd, self.client_id, kind, expected_shape))
        if errors:
            raise errors[0]
        return accepted[client]

    def client_receive_bytes(self, rnd: int, client: int, message: bytes, kind: str) -> bytes:
        """Client side: verify an opaque payload from the server (raises EnvelopeError)."""
        accepted, _, errors = self._receive_batch(
            rnd, self.client_id, {client: message}, kind, self._server_sender, "download",
            self._raw)
        if errors:
            raise errors[0]
        return accepted[client]

    def clients_receive(
        self, rnd: int, messages: Mapping[int, bytes], expected_shape: Sequence[int],
        *, kind: str = KIND_PHI,
    ) -> tuple[dict[int, Tensor], list[Rejection]]:
        """Each addressed client verifies and decodes its message (batch form of
        :meth:`client_receive`): accepted tensors by client index, and the rejections."""
        accepted, rejections, _ = self._receive_batch(
            rnd, self.client_id, messages, kind, self._server_sender, "download",
            self._tensor_decoder(rnd, self.client_id, kind, expected_shape))
        return accepted, rejections

    @staticmethod
    def _server_sender(_client: int) -> str:
        return SERVER_ID


# --------------------------------------------------------------------------------------
# In-process round exchange
# --------------------------------------------------------------------------------------

Channel = Callable[[str, int, int, bytes], bytes]
"""``channel(kind, round, client, message) -> message``: what the network does to a message
(identity by default; tests and fault injection use it to tamper, replay or swap)."""


@dataclass
class SecureExchange:
    """The in-process runtime's message rounds over a :class:`SecureTransport`.

    Keeps ``server_theta`` (the server's last accepted row of every client) and
    ``client_phi`` (every client's last accepted ``phi`` row). Invariant after each call,
    provided only the participants' rows of ``theta`` changed since the previous call:
    ``server_theta == theta`` and ``client_phi == phi`` for the matrices passed in, so a run
    resumed from a checkpoint simply builds a new exchange from the restored matrices.
    Memory: two extra (N, P) float32 copies. With encrypted propagation
    (:meth:`secure_fedora.encrypted_propagation.EncryptedPropagator.propagate` given this
    exchange) the copies are simulation bookkeeping only -- the plaintext that the server's
    last accepted ciphertext encrypts -- and are never sent; do not call :meth:`upload_theta`
    or :meth:`download_phi` in that mode.
    Every rejection of the run is appended to ``rejections``.
    """

    transport: SecureTransport
    server_theta: Tensor
    client_phi: Tensor
    channel: Channel | None = None
    rejections: list[Rejection] = field(default_factory=list)

    @classmethod
    def start(cls, transport: SecureTransport, theta: Tensor, phi: Tensor | None = None,
              channel: Channel | None = None) -> SecureExchange:
        """Begin from the current ``theta`` (N, P) and ``phi`` (default: a copy of ``theta``)."""
        if not isinstance(theta, Tensor) or theta.dim() != 2:
            raise TransportError(f"theta must be an (N, P) tensor, got {_shape(theta)}")
        if theta.shape[0] != transport.num_clients:
            raise TransportError(
                f"theta has {theta.shape[0]} rows for {transport.num_clients} clients")
        if phi is not None and (not isinstance(phi, Tensor) or phi.shape != theta.shape):
            raise TransportError(f"phi must have theta's shape {tuple(theta.shape)}, got {_shape(phi)}")
        base = theta if phi is None else phi
        return cls(transport, theta.detach().clone(), base.detach().clone(), channel)

    def deliver(self, kind: str, rnd: int, messages: dict[int, bytes]) -> dict[int, bytes]:
        """Pass ``messages`` through the ``channel`` (unchanged when there is none)."""
        if self.channel is None:
            return messages
        return {i: self.channel(kind, rnd, i, m) for i, m in messages.items()}

    def upload_theta(self, rnd: int, theta: Tensor, participants: Sequence[int]) -> list[int]:
        """Participants sign and send their rows of ``theta``; the server verifies them.

        Accepted rows become the server's copy. The row of every rejected participant is
        restored in ``theta`` (in place) to the server's last accepted value, i.e. that client
        counts as a non-participant of round ``rnd``. Returns the accepted participants.
        """
        self._check(theta, "theta")
        messages = {i: self.transport.client_upload(rnd, i, theta[i]) for i in participants}
        rows, rejections = self.transport.server_receive(
            rnd, self.deliver(KIND_THETA, rnd, messages), (theta.shape[1],))
        for i, row in rows.items():
            self.server_theta[i].copy_(row)
            theta[i].copy_(row)
        for r in rejections:
            theta[r.client].copy_(self.server_theta[r.client])
        self.rejections.extend(rejections)
        return sorted(rows)

    def download_phi(self, rnd: int, phi: Tensor, recipients: Sequence[int] | None = None) -> list[int]:
        """The server signs and sends ``phi[i]`` to each recipient (default: every client).

        A client that rejects its message keeps its last accepted ``phi`` row: it is restored
        in ``phi`` in place. Returns the clients that accepted.
        """
        self._check(phi, "phi")
        targets = range(self.transport.num_clients) if recipients is None else recipients
        messages = {i: self.transport.server_send(rnd, i, phi[i]) for i in targets}
        rows, rejections = self.transport.clients_receive(
            rnd, self.deliver(KIND_PHI, rnd, messages), (phi.shape[1],))
        for i, row in rows.items():
            self.client_phi[i].copy_(row)
            phi[i].copy_(row)
        for r in rejections:
            phi[r.client].copy_(self.client_phi[r.client])
        self.rejections.extend(rejections)
        return sorted(rows)

    def _check(self, matrix: Tensor, name: str) -> None:
        if not isinstance(matrix, Tensor) or matrix.shape != self.server_theta.shape:
            raise TransportError(
                f"{name} must have shape {tuple(self.server_theta.shape)}, got {_shape(matrix)}")


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
