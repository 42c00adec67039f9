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
- it is bound to this transport's exchange (``context``, e.g. ``"<run>/<method>"``:
  :class:`~privacy.envelope.WrongContextError` for a message of another method's exchange);
- it is not larger than the cap (the exact size of the expected tensor plus the header cap,
  or ``max_message_bytes`` for opaque payloads: :class:`~privacy.envelope.MessageTooLargeError`,
  checked before anything is parsed or hashed); input that is not bytes is a rejection too;
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
(1 = float32, 2 = float64), the number of dimensions, a reserved zero byte, each dimension as a
big-endian u64, then the values little-endian. Model rows travel as float32 (tensors of
another precision are rounded to float32 before sending, so float32 matrices cross the wire
bit for bit); a receiver names the dtype it expects and rejects the other one.

Nonce persistence is batched: a batch receiver (:meth:`SecureTransport.server_receive`,
:meth:`SecureTransport.clients_receive`, ...) first verifies and decodes every message, then
makes the nonces of the accepted ones durable with one append and one fsync per receiving
party, and only then returns any payload (write-ahead: nothing is acted on before its nonce
is on disk). A message refused for any reason, its payload's included, records no nonce (its
receiver's state file is unchanged); decoding is a pure function of the signed bytes, so the
same message is refused again. A nonce repeated inside one batch is rejected as a replay.

Client uploads are signed by the client's release pipeline (:mod:`privacy.pipeline`): every
client-side send (:meth:`SecureTransport.client_release`, and the ``client_upload*``
wrappers) hands the payload to the pipeline attached with
:meth:`SecureTransport.attach_releases` (under DP the run's privacy state: the accounted
release's remaining stages, step check included, then encrypt and sign; otherwise encrypt ->
sign), and the message is what its :class:`~privacy.pipeline.SignEnvelope` stage produced.
The transport itself only verifies, records nonces and delivers.

:class:`SecureTransport` holds the identities of the parties a process acts as: all of them
in the in-process simulation, or just ``"server"`` / one client in a distributed runtime.
:class:`SecureExchange` adds the in-process round logic for any method: for each upload kind
it keeps the server's last accepted row of every client and puts it back into the method's
matrix for a rejected upload (that client counts as a non-participant of the round); for each
tracked download kind it keeps every client's last accepted row and hands it back when the
client rejects a download.

Assumptions: signatures authenticate keys, so a client whose private key leaks can be
impersonated; payloads are authenticated, not encrypted (use TLS in a deployment, or
:mod:`secure_fedora.secure.encrypted_propagation`); the state directory is trusted local storage
(an attacker who can rewrite it can reopen replays).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from privacy.envelope import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    SECURITY_LOGGER,
    Envelope,
    EnvelopeError,
    EnvelopeVerifier,
    NonceJournal,
    VerificationBatch,
    check_tensor,
    commit_batches,
    decode_message,
    encode_message,
    make_envelope,
)
from privacy.errors import ToolkitError
from privacy.identity import (
    ALLOWLIST_FILENAME,
    SERVER_ID,
    Identity,
    client_ids,
    init_keys,
    load_allowlist,
    load_identity,
    validate_party_id,
)
from privacy.pipeline import EncryptPayload, Release, ReleasePipeline, upload_stages

# The message kinds and value checks belong to the method contract (defined one layer down);
# re-exported here, where they were defined before, for existing code.
from secure_fedora.algorithms.messages import (  # noqa: F401 (re-exported)
    KIND_CLUSTER_CHOICE,
    KIND_CLUSTERS,
    KIND_ENC_PHI,
    KIND_ENC_THETA,
    KIND_EVALUATION_REPLY,
    KIND_GLOBAL,
    KIND_MESSAGE,
    KIND_PHI,
    KIND_RELATEDNESS_RELEASE,
    KIND_RELATEDNESS_ROWS,
    KIND_RELATEDNESS_UPLOAD,
    KIND_SUMMARY,
    KIND_THETA,
    ValueCheck,
)

__all__ = [
    "KIND_CLUSTERS",
    "KIND_CLUSTER_CHOICE",
    "KIND_ENC_PHI",
    "KIND_ENC_THETA",
    "KIND_EVALUATION_REPLY",
    "KIND_GLOBAL",
    "KIND_MESSAGE",
    "KIND_PHI",
    "KIND_RELATEDNESS_RELEASE",
    "KIND_RELATEDNESS_ROWS",
    "KIND_RELATEDNESS_UPLOAD",
    "KIND_SUMMARY",
    "KIND_THETA",
    "ClientReleases",
    "InvalidValueError",
    "MalformedPayloadError",
    "Rejection",
    "SecureExchange",
    "SecureTransport",
    "SenderMismatchError",
    "TransportError",
    "ValueCheck",
    "UnaccountedReleases",
    "decode_entry",
    "decode_tensor",
    "encode_entry",
    "encode_tensor",
    "log_rejection",
]

CLIENT_JOURNAL = "clients.nonces.jsonl"
_TENSOR_MAGIC = b"SFTR"
_TENSOR_VERSION = 1
_DTYPE_FLOAT32 = 1
_DTYPE_FLOAT64 = 2
_DTYPE_CODES = {torch.float32: _DTYPE_FLOAT32, torch.float64: _DTYPE_FLOAT64}
_CODE_DTYPES = {code: (dtype, np.dtype("<f4") if dtype == torch.float32 else np.dtype("<f8"))
                for dtype, code in _DTYPE_CODES.items()}
_MAX_NDIM = 8
_HEAD = struct.Struct(">4sBBBB")

logger = logging.getLogger(SECURITY_LOGGER)


class ClientReleases(Protocol):
    """Where a client's upload is released: its release pipeline (see
    :meth:`SecureTransport.client_release`)."""

    def release_upload(self, i: int, rnd: int, kind: str, payload: Tensor | bytes, *,
                       encrypt: EncryptPayload | None = None,
                       sign: Callable[[Release], bytes] | None = None) -> Release:
        """Client ``i``'s round-``rnd`` ``kind`` upload after its pipeline's last stages
        (``encrypt``, then ``sign``); raises when the release is refused."""
        ...


class UnaccountedReleases:
    """The release path of uploads no accountant covers (a run without DP): a pipeline
    without a gate, encrypt (optional) -> sign."""

    def release_upload(self, i: int, rnd: int, kind: str, payload: Tensor | bytes, *,
                       encrypt: EncryptPayload | None = None,
                       sign: Callable[[Release], bytes] | None = None) -> Release:
        """``payload`` through ``[encrypt] -> [SignEnvelope(sign)]``."""
        return ReleasePipeline(upload_stages(encrypt, sign), require_gate=False).run(
            Release(kind, payload, rnd))


class TransportError(ToolkitError):
    """The transport cannot be set up or used as asked (keys, state directory, arguments)."""


class SenderMismatchError(EnvelopeError):
    """An allowlisted party's message arrived in another client's slot (misrouted or spliced)."""

    reason = "sender_mismatch"


class MalformedPayloadError(EnvelopeError):
    """An authenticated payload is not a well-formed encoding (tensor, ciphertext, container)."""

    reason = "malformed_payload"


class InvalidValueError(EnvelopeError):
    """A well-formed, authenticated payload holds a value the receiver cannot accept
    (e.g. a cluster index outside the range of clusters)."""

    reason = "invalid_value"


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


def encode_tensor(tensor: Tensor, *, dtype: torch.dtype = torch.float32) -> bytes:
    """Serialize a real tensor as ``dtype`` (float32 by default, or float64) with a header and
    little-endian values; never pickles.

    Floating tensors of another precision are converted (rounded) to ``dtype``; integer,
    boolean and complex tensors raise :class:`TypeError`. Values are sent as they are (NaN
    included): judging them is the receiver's job.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"only real floating tensors can be sent, got dtype {tensor.dtype}")
    if tensor.dim() > _MAX_NDIM:
        raise TypeError(f"tensor has {tensor.dim()} dimensions; at most {_MAX_NDIM} are supported")
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        raise TypeError(f"wire dtype must be torch.float32 or torch.float64, got {dtype}")
    arr = tensor.detach().to("cpu", dtype).contiguous().numpy()
    head = _HEAD.pack(_TENSOR_MAGIC, _TENSOR_VERSION, code, arr.ndim, 0)
    dims = struct.pack(f">{arr.ndim}Q", *arr.shape)
    return head + dims + arr.astype(_CODE_DTYPES[code][1], copy=False).tobytes()


def decode_tensor(payload: bytes, *, sender: str | None = None, round: int | None = None,
                  kind: str | None = None, recipient: str | None = None,
                  dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Parse :func:`encode_tensor` output into a new tensor of the wire dtype.

    Raises (and logs) :class:`MalformedPayloadError` naming ``sender`` and ``round`` when the
    magic, version, dtype or dimension count is unknown, the wire dtype is not ``dtype``
    (``None``: float32 and float64 are both accepted), the non-zero sizes multiply to 2**63
    or more, or the length does not match the shape exactly.
    """
    ctx = {"sender": sender, "round": round, "kind": kind, "recipient": recipient}
    data = memoryview(payload)
    if len(data) < _HEAD.size:
        raise _log(MalformedPayloadError(f"tensor payload of {len(data)} bytes is too short", **ctx))
    magic, version, dtype_code, ndim, reserved = _HEAD.unpack_from(data, 0)
    if magic != _TENSOR_MAGIC or version != _TENSOR_VERSION or reserved != 0:
        raise _log(MalformedPayloadError("payload is not a version-1 tensor encoding", **ctx))
    if dtype_code not in _CODE_DTYPES:
        raise _log(MalformedPayloadError(f"unsupported tensor dtype code {dtype_code}", **ctx))
    wire_dtype, np_dtype = _CODE_DTYPES[dtype_code]
    if dtype is not None and wire_dtype != dtype:
        raise _log(MalformedPayloadError(
            f"tensor payload has dtype {wire_dtype}, the receiver expects {dtype}", **ctx))
    if ndim > _MAX_NDIM:
        raise _log(MalformedPayloadError(f"tensor has {ndim} dimensions (> {_MAX_NDIM})", **ctx))
    offset = _HEAD.size + 8 * ndim
    if len(data) < offset:
        raise _log(MalformedPayloadError("tensor payload truncated inside its shape", **ctx))
    shape = struct.unpack_from(f">{ndim}Q", data, _HEAD.size)
    # an empty tensor has no value bytes whatever its other sizes: torch's int64 sizes and
    # strides must hold them (the product of the non-zero sizes stays below 2**63)
    if math.prod(max(size, 1) for size in shape) >= 1 << 63:
        raise _log(MalformedPayloadError(f"tensor shape {tuple(shape)} is beyond 64-bit sizes"
                                         " (its non-zero sizes multiply to 2**63 or more)", **ctx))
    count = math.prod(shape)
    width = np_dtype.itemsize
    if len(data) - offset != width * count:
        raise _log(MalformedPayloadError(
            f"tensor of shape {tuple(shape)} needs {width * count} value bytes, payload has "
            f"{len(data) - offset}", **ctx))
    values = np.frombuffer(data, dtype=np_dtype, count=count, offset=offset)
    return torch.from_numpy(values.astype(np_dtype.newbyteorder("="))).reshape(shape)


_ENTRY_MAGIC = b"SFEN"
_ENTRY_VERSION = 1
# Every dtype a method's message entry may have (the contract's ALLOWED_DTYPES), sent as it is.
_ENTRY_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    1: (torch.float32, np.dtype("<f4")), 2: (torch.float64, np.dtype("<f8")),
    3: (torch.float16, np.dtype("<f2")), 4: (torch.int8, np.dtype("i1")),
    5: (torch.int16, np.dtype("<i2")), 6: (torch.int32, np.dtype("<i4")),
    7: (torch.int64, np.dtype("<i8")), 8: (torch.uint8, np.dtype("u1")),
    9: (torch.bool, np.dtype("?")),
}
_ENTRY_CODES = {dtype: code for code, (dtype, _) in _ENTRY_DTYPES.items()}


def encode_entry(tensor: Tensor) -> bytes:
    """Serialize a message entry in its own dtype (any of :data:`_ENTRY_DTYPES`: floating,
    integer or boolean) with a header and little-endian values, so that it decodes bit for bit
    (:func:`decode_entry`); never pickles. Raises :class:`TypeError` for another dtype."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    code = _ENTRY_CODES.get(tensor.dtype)
    if code is None:
        raise TypeError(f"a message entry of dtype {tensor.dtype} cannot be sent")
    if tensor.dim() > _MAX_NDIM:
        raise TypeError(f"tensor has {tensor.dim()} dimensions; at most {_MAX_NDIM} are supported")
    arr = tensor.detach().to("cpu").contiguous().numpy()
    head = _HEAD.pack(_ENTRY_MAGIC, _ENTRY_VERSION, code, arr.ndim, 0)
    dims = struct.pack(f">{arr.ndim}Q", *arr.shape)
    return head + dims + arr.astype(_ENTRY_DTYPES[code][1], copy=False).tobytes()


def decode_entry(payload: bytes, dtype: torch.dtype, shape: Sequence[int], *,
                 sender: str | None = None, round: int | None = None, kind: str | None = None,
                 recipient: str | None = None) -> Tensor:
    """Parse :func:`encode_entry` output into a new tensor, which must have ``dtype`` and
    ``shape`` (finite values for a floating one); raises (and logs)
    :class:`MalformedPayloadError` otherwise."""
    ctx = {"sender": sender, "round": round, "kind": kind, "recipient": recipient}
    data = memoryview(payload)
    if len(data) < _HEAD.size:
        raise _log(MalformedPayloadError(f"entry payload of {len(data)} bytes is too short", **ctx))
    magic, version, code, ndim, reserved = _HEAD.unpack_from(data, 0)
    if magic != _ENTRY_MAGIC or version != _ENTRY_VERSION or reserved != 0 \
            or code not in _ENTRY_DTYPES or ndim != len(shape):
        raise _log(MalformedPayloadError("payload is not a version-1 entry encoding of "
                                         f"{len(shape)} dimensions", **ctx))
    wire_dtype, np_dtype = _ENTRY_DTYPES[code]
    offset = _HEAD.size + 8 * ndim
    got = tuple(struct.unpack_from(f">{ndim}Q", data, _HEAD.size)) if len(data) >= offset else None
    if wire_dtype != dtype or got != tuple(shape):
        raise _log(MalformedPayloadError(
            f"entry is {wire_dtype} {got}, the receiver expects {dtype} {tuple(shape)}", **ctx))
    count = math.prod(got)
    if len(data) - offset != np_dtype.itemsize * count:
        raise _log(MalformedPayloadError(f"entry of shape {got} needs {np_dtype.itemsize * count}"
                                         f" value bytes, payload has {len(data) - offset}", **ctx))
    values = np.frombuffer(data, dtype=np_dtype, count=count, offset=offset)
    tensor = torch.from_numpy(values.astype(np_dtype.newbyteorder("="))).reshape(got)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise _log(MalformedPayloadError("entry holds non-finite values", **ctx))
    return tensor


def _entry_message_cap(tensor: Tensor) -> int:
    """The largest wire message that can hold :func:`encode_entry` of ``tensor``."""
    return (8 + DEFAULT_MAX_HEADER_BYTES + _HEAD.size + 8 * tensor.dim()
            + tensor.element_size() * tensor.numel())


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


def _tensor_message_cap(expected_shape: Sequence[int], dtype: torch.dtype | None) -> int | None:
    """The largest wire message that can hold a tensor of ``expected_shape`` and ``dtype``
    (header cap + tensor encoding); None when a dimension is open (``-1``) or the dtype is."""
    shape = [int(d) for d in expected_shape]
    if dtype not in _DTYPE_CODES or any(d < 0 for d in shape):
        return None
    width = _CODE_DTYPES[_DTYPE_CODES[dtype]][1].itemsize
    return 8 + DEFAULT_MAX_HEADER_BYTES + _HEAD.size + 8 * len(shape) + width * math.prod(shape)


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
    private keys are loaded. The server's nonce memory is persisted in
    ``state_dir/server.nonces.jsonl`` and every acting client's in the shared journal
    ``state_dir/clients.nonces.jsonl`` (lines tagged by client; per-client files of the
    older layout are merged in on opening); both are fsync-ed before a message is accepted,
    once per batch. One process at a time may use a state directory.
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
        context: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.num_clients = _check_int(num_clients, "num_clients", 1)
        self.context = context
        self.max_message_bytes = _check_int(max_message_bytes, "max_message_bytes", 1)
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
        acting_clients = [p for p in acting if p != SERVER_ID]
        journal = NonceJournal(
            self.state_dir / CLIENT_JOURNAL,
            legacy={p: self.state_dir / f"{p}.nonces.jsonl" for p in acting_clients},
        ) if acting_clients else None
        for party in acting:
            if party == SERVER_ID:
                self._verifiers[party] = EnvelopeVerifier(
                    clients_only, party, max_round_lag=max_round_lag,
                    state_path=self.state_dir / f"{party}.nonces.jsonl", context=context,
                )
            else:
                self._verifiers[party] = EnvelopeVerifier(
                    server_only, party, max_round_lag=max_round_lag, journal=journal,
                    context=context)
        self.stats = TransportStats()
        #: The release path of every client upload (:meth:`attach_releases`).
        self.releases: ClientReleases = UnaccountedReleases()

    @classmethod
    def for_simulation(cls, run_dir: str | os.PathLike[str], num_clients: int, method: str,
                       *, max_round_lag: int = 0, key_dir: str | os.PathLike[str] | None = None,
                       context: str | None = None) -> SecureTransport:
        """The in-process transport of one method's run: keys in ``key_dir`` (default
        ``run_dir/keys``; created with every party's keys, 0600, if there is no allowlist yet
        -- a DP run passes its key store, which holds the ledger keys) and nonce state in
        ``run_dir/transport/<method>`` (each method numbers its rounds from 1, so each needs
        its own replay window). Envelopes are bound to ``context`` (default: ``method``), so a
        message of one method's exchange is rejected by another's."""
        validate_party_id(method)
        run_dir = Path(run_dir)
        keys = Path(key_dir) if key_dir is not None else run_dir / "keys"
        if not (keys / ALLOWLIST_FILENAME).exists():
            init_keys(keys, [SERVER_ID, *client_ids(num_clients)])
        return cls(keys, run_dir / "transport" / method, num_clients,
                   max_round_lag=max_round_lag, context=method if context is None else context)

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

    def _send(self, rnd: int, sender: str, recipient: str, kind: str, payload: bytes,
              digest: str | None = None) -> bytes:
        _check_int(rnd, "round")
        start = time.perf_counter()
        envelope = make_envelope(self._identity(sender), recipient, rnd, kind, payload,
                                 context=self.context, payload_sha256=digest)
        message = encode_message(envelope, payload)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(message)
        self.stats.send_seconds += time.perf_counter() - start
        return message

    def _open(self, rnd: int, receiver: str, message: bytes, kind: str,
              expected_sender: str | None, batch: VerificationBatch,
              max_bytes: int | None = None) -> tuple[Envelope, bytes]:
        """Verify one message for ``receiver`` inside ``batch`` (its nonce stays pending until
        the batch commits); returns (envelope, payload) or raises EnvelopeError. A message
        over ``max_bytes`` (and the transport's cap) or not bytes is rejected unparsed."""
        verifier = self._verifier(receiver)
        cap = self.max_message_bytes if max_bytes is None else min(max_bytes, self.max_message_bytes)
        envelope, payload = decode_message(message, max_bytes=cap)
        if (expected_sender is not None and envelope.sender != expected_sender
                and envelope.sender in verifier.allowlist):
            raise _log(SenderMismatchError(
                f"message claims to be from {envelope.sender!r} but arrived in the slot of "
                f"{expected_sender!r}", sender=envelope.sender, round=envelope.round,
                kind=envelope.kind, recipient=receiver))
        batch.verify(envelope, payload, rnd, expected_kind=kind)
        return envelope, payload

    def _receive_batch(
        self, rnd: int, receiver_of: Callable[[int], str], messages: Mapping[int, bytes],
        kind: str, sender_of: Callable[[int], str], direction: str,
        decode: Callable[[int, str, bytes], Any], max_bytes: int | None = None,
    ) -> tuple[dict[int, Any], list[Rejection], list[EnvelopeError]]:
        """Verify and decode all ``messages``, make the nonces of the accepted ones durable
        (one append + fsync per state file), then return the decoded payloads. A message
        refused on its payload (``decode``) is withdrawn from its batch: like one refused by
        the envelope checks, it leaves no nonce. Rejections come back sorted by client
        index. ``max_bytes`` caps each message (e.g. the exact size of the expected tensor
        plus the header cap)."""
        _check_int(rnd, "round")
        start = time.perf_counter()
        for client in messages:
            _check_int(client, "client index", 0, self.num_clients)
        accepted: dict[int, Any] = {}
        failed: dict[int, EnvelopeError] = {}
        batches: dict[str, VerificationBatch] = {}
        try:
            for client in sorted(messages):
                message = messages[client]
                receiver = receiver_of(client)
                batch = batches.get(receiver)
                if batch is None:
                    batch = batches[receiver] = self._verifier(receiver).batch()
                try:
                    envelope, payload = self._open(rnd, receiver, message, kind,
                                                   sender_of(client), batch, max_bytes)
                    try:  # decoding only reads: nothing is acted on before the commit
                        accepted[client] = decode(client, envelope.sender, payload)
                    except EnvelopeError:
                        batch.withdraw(envelope)
                        raise
                except EnvelopeError as err:
                    failed[client] = err
                if isinstance(message, (bytes, bytearray, memoryview)):
                    self.stats.bytes_received += memoryview(message).nbytes
            # write-ahead: every accepted nonce durable (one fsync per state file) before any
            # payload is returned
            commit_batches(list(batches.values()))
        finally:
            for batch in batches.values():
                batch.discard()
        rejections = [Rejection.from_error(c, rnd, failed[c], direction) for c in sorted(failed)]
        errors = [failed[c] for c in sorted(failed)]
        self.stats.messages_accepted += len(accepted)
        self.stats.messages_rejected += len(rejections)
        self.stats.receive_seconds += time.perf_counter() - start
        return accepted, rejections, errors

    @staticmethod
    def _tensor_decoder(rnd: int, receiver_of: Callable[[int], str], kind: str,
                        expected_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                        check: ValueCheck | None = None) -> Callable[[int, str, bytes], Tensor]:
        def decode(client: int, sender: str, payload: bytes) -> Tensor:
            receiver = receiver_of(client)
            tensor = decode_tensor(payload, sender=sender, round=rnd, kind=kind,
                                   recipient=receiver, dtype=dtype)
            tensor = check_tensor(tensor, expected_shape, sender=sender, round=rnd,
                                  name=f"{kind} row of client {client}", kind=kind,
                                  recipient=receiver)
            problem = check(tensor) if check is not None else None
            if problem is not None:
                raise _log(InvalidValueError(f"{kind} of client {client}: {problem}",
                                             sender=sender, round=rnd, kind=kind,
                                             recipient=receiver))
            return tensor
        return decode

    @staticmethod
    def _raw(_client: int, _sender: str, payload: bytes) -> bytes:
        return payload

    @staticmethod
    def _server(_client: int) -> str:
        return SERVER_ID

    # -- client -> server ----------------------------------------------------------------
    def attach_releases(self, releases: ClientReleases) -> None:
        """Route every client upload of this transport through ``releases`` (e.g. the run's
        :class:`~secure_fedora.secure.private.FederationPrivacy`, whose pipelines account,
        journal and step-check before the sign stage runs)."""
        if not callable(getattr(releases, "release_upload", None)):
            raise TransportError(f"releases must have release_upload(), got {type(releases).__name__}")
        self.releases = releases

    def client_release(self, rnd: int, client: int, kind: str, payload: Tensor | bytes, *,
                       dtype: torch.dtype = torch.float32,
                       encrypt: EncryptPayload | None = None,
                       releases: ClientReleases | None = None) -> bytes:
        """Client side, the one path of an upload: ``payload`` passes client ``client``'s
        release pipeline (:attr:`releases`: the accounted release's remaining stages under
        DP, or encrypt -> sign where nothing is accounted; ``releases`` given: that path, e.g.
        :class:`UnaccountedReleases` for a reply that releases nothing accounted), whose
        :class:`SignEnvelope` stage signs it (a tensor as ``dtype`` on the wire, bytes as
        they are) for the server. Returns the signed message; a release the pipeline refuses
        raises, nothing signed."""
        cid = self.client_id(client)
        _check_int(rnd, "round")

        def sign(release: Release) -> bytes:
            if release.round != rnd:
                raise TransportError(f"{cid}: the pipeline presents a round-{release.round}"
                                     f" {release.kind!r} release for a round-{rnd} {kind!r} upload")
            body = (release.payload if isinstance(release.payload, bytes)
                    else encode_tensor(release.payload, dtype=dtype))
            return self._send(rnd, cid, SERVER_ID, kind, body)

        path = self.releases if releases is None else releases
        released = path.release_upload(client, rnd, kind, payload, encrypt=encrypt, sign=sign)
        if not released.metadata.get("signed") or not isinstance(released.payload, bytes):
            raise TransportError(f"{cid}: the round-{rnd} {kind!r} upload left its release"
                                 " pipeline unsigned")
        return released.payload

    def client_upload(self, rnd: int, client: int, row: Tensor, kind: str = KIND_THETA,
                      *, dtype: torch.dtype = torch.float32) -> bytes:
        """Client side: ``row`` as ``dtype`` (default float32) in an envelope signed by the
        client's release pipeline (:meth:`client_release`), to the server."""
        if not isinstance(row, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(row).__name__}")
        return self.client_release(rnd, client, kind, row, dtype=dtype)

    def client_upload_entry(self, rnd: int, client: int, entry: Tensor, kind: str, *,
                            releases: ClientReleases | None = None) -> bytes:
        """Client side: a reply entry in its own dtype (:func:`encode_entry`) in an envelope
        signed by the client's release pipeline (:meth:`client_release`; ``releases``: that
        path instead), to the server."""
        return self.client_release(rnd, client, kind, encode_entry(entry), releases=releases)

    def client_upload_bytes(self, rnd: int, client: int, payload: bytes, kind: str) -> bytes:
        """Client side: an opaque payload (e.g. a ciphertext) in a signed envelope to the
        server, through the client's release pipeline (:meth:`client_release`)."""
        return self.client_release(rnd, client, kind, bytes(payload))

    def server_receive(
        self, rnd: int, messages: Mapping[int, bytes], expected_shape: Sequence[int],
        *, kind: str = KIND_THETA, dtype: torch.dtype = torch.float32,
        check: ValueCheck | None = None,
    ) -> tuple[dict[int, Tensor], list[Rejection]]:
        """Server side: verify and decode each client's upload for round ``rnd``.

        ``messages`` maps the client index whose channel delivered a message to the message.
        Returns the accepted tensors (``dtype``, ``expected_shape``; ``-1`` matches any size)
        by client index, and one :class:`Rejection` per dropped message (each also logged).
        ``check(tensor)`` may return a problem description, which rejects that message with
        :class:`InvalidValueError`. All nonces of the batch are persisted with one fsync.
        """
        accepted, rejections, _ = self._receive_batch(
            rnd, self._server, messages, kind, self.client_id, "upload",
            self._tensor_decoder(rnd, self._server, kind, expected_shape, dtype, check),
            _tensor_message_cap(expected_shape, dtype))
        return accepted, rejections

    def server_receive_bytes(
        self, rnd: int, messages: Mapping[int, bytes], kind: str,
        *, parse: Callable[[int, bytes], Any] | None = None,
    ) -> tuple[dict[int, Any], list[Rejection]]:
        """Server side: like :meth:`server_receive` for opaque payloads (returned unparsed,
        or as ``parse(client, payload)`` returns them). ``parse`` only reads: an
        :class:`~privacy.envelope.EnvelopeError` it raises rejects that message, which then
        records no nonce."""
        accepted, rejections, _ = self._receive_batch(
            rnd, self._server, messages, kind, self.client_id, "upload",
            self._raw if parse is None else lambda client, _sender, payload: parse(client, payload))
        return accepted, rejections

    def server_receive_entries(
        self, rnd: int, messages: Mapping[int, bytes], kind: str,
        sent: Mapping[int, Tensor],
    ) -> tuple[dict[int, Tensor], list[Rejection]]:
        """Server side: verify each client's :meth:`client_upload_entry` message (one nonce
        commit per batch): the accepted entries by client index, and the rejections.
        ``sent[i]`` is the entry client ``i`` signed; a verified payload is decoded with its
        dtype and shape expected (:func:`decode_entry`), each message capped at that entry's
        size."""
        def decode(client: int, sender: str, payload: bytes) -> Tensor:
            entry = sent[client]
            return decode_entry(payload, entry.dtype, tuple(entry.shape), sender=sender,
                                round=rnd, kind=kind, recipient=SERVER_ID)

        caps = [_entry_message_cap(sent[i]) for i in messages]
        accepted, rejections, _ = self._receive_batch(
            rnd, self._server, messages, kind, self.client_id, "upload", decode,
            max(caps, default=None))
        return accepted, rejections

    # -- server -> client ----------------------------------------------------------------
    def server_send(self, rnd: int, client: int, phi_row: Tensor, kind: str = KIND_PHI) -> bytes:
        """Server side: ``phi_row`` as float32 in an envelope signed by the server, to ``client``."""
        return self._send(rnd, SERVER_ID, self.client_id(client), kind, encode_tensor(phi_row))

    def server_send_bytes(self, rnd: int, client: int, payload: bytes, kind: str, *,
                          digest: str | None = None) -> bytes:
        """Server side: an opaque payload in a signed envelope to ``client`` (``digest``: its
        SHA-256 hex digest, when the caller computed it for a payload sent to many clients)."""
        return self._send(rnd, SERVER_ID, self.client_id(client), kind, bytes(payload), digest)

    def client_receive(
        self, rnd: int, client: int, message: bytes, expected_shape: Sequence[int],
        *, kind: str = KIND_PHI,
    ) -> Tensor:
        """Client side: verify and decode the server's message; raises the matching
        :class:`~privacy.envelope.EnvelopeError` (already logged) if it must be dropped."""
        accepted, _, errors = self._receive_batch(
            rnd, self.client_id, {client: message}, kind, self._server_sender, "download",
            self._tensor_decoder(rnd, self.client_id, kind, expected_shape),
            _tensor_message_cap(expected_shape, torch.float32))
        if errors:
            raise errors[0]
        return accepted[client]

    def client_receive_bytes(self, rnd: int, client: int, message: bytes, kind: str,
                             *, parse: Callable[[int, bytes], Any] | None = None) -> Any:
        """Client side: verify an opaque payload from the server (raises EnvelopeError);
        ``parse`` as in :meth:`server_receive_bytes`."""
        accepted, _, errors = self._receive_batch(
            rnd, self.client_id, {client: message}, kind, self._server_sender, "download",
            self._raw if parse is None else lambda client, _sender, payload: parse(client, payload))
        if errors:
            raise errors[0]
        return accepted[client]

    def clients_receive(
        self, rnd: int, messages: Mapping[int, bytes], expected_shape: Sequence[int],
        *, kind: str = KIND_PHI, dtype: torch.dtype = torch.float32,
    ) -> tuple[dict[int, Tensor], list[Rejection]]:
        """Each addressed client verifies and decodes its message (batch form of
        :meth:`client_receive`): accepted tensors by client index, and the rejections.
        Each receiving client persists its new nonce (one append + fsync per client) before
        any payload is decoded."""
        accepted, rejections, _ = self._receive_batch(
            rnd, self.client_id, messages, kind, self._server_sender, "download",
            self._tensor_decoder(rnd, self.client_id, kind, expected_shape, dtype),
            _tensor_message_cap(expected_shape, dtype))
        return accepted, rejections

    def server_send_entry(self, rnd: int, client: int, entry: Tensor, kind: str,
                          body: tuple[bytes, str] | None = None) -> bytes:
        """Server side: a message entry in its own dtype (:func:`encode_entry`) in an envelope
        signed by the server. ``body``: that encoding and its SHA-256 hex digest, when the
        caller made them already (an entry sent to many clients is encoded and hashed once)."""
        if body is None:
            payload = encode_entry(entry)
            body = (payload, hashlib.sha256(payload).hexdigest())
        return self._send(rnd, SERVER_ID, self.client_id(client), kind, *body)

    def clients_receive_entries(
        self, rnd: int, messages: Mapping[int, bytes], kind: str,
        sent: Mapping[int, tuple[bytes, Tensor]],
    ) -> tuple[dict[int, Tensor], list[Rejection]]:
        """Each addressed client verifies its :meth:`server_send_entry` message (batch form,
        one nonce commit per batch): the accepted entries by client index, and the
        rejections. ``sent[i]`` is what the server sent client ``i`` (its encoding and the
        entry): a verified payload equal to that encoding decodes to the entry bit for bit,
        so the entry itself is handed over (no copy); any other verified payload is decoded
        (:func:`decode_entry`, the entry's dtype and shape expected)."""
        def decode(client: int, sender: str, payload: bytes) -> Tensor:
            body, entry = sent[client]
            if payload == body:
                return entry
            return decode_entry(payload, entry.dtype, tuple(entry.shape), sender=sender,
                                round=rnd, kind=kind, recipient=self.client_id(client))

        caps = [_entry_message_cap(sent[i][1]) for i in messages]
        accepted, rejections, _ = self._receive_batch(
            rnd, self.client_id, messages, kind, self._server_sender, "download", decode,
            max(caps, default=None))
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


class SecureExchange:
    """The in-process runtime's message rounds over a :class:`SecureTransport`, for any method.

    Upload kinds (``server_rows[kind]``, an (N, ...) matrix): the server's last accepted row
    of every client. :meth:`upload_rows` sends the participants' rows of a method matrix,
    copies accepted rows into the server's copy and puts the server's copy back into the
    matrix (in place) for every rejected upload: that client counts as a non-participant of
    the round (the server discards its update; a method whose matrix is also the clients' own
    state gives the client its row back from :attr:`rejected_rows`, as a Flower client keeps
    its own state: :class:`~secure_fedora.algorithms.methods.FederatedMethod`).

    Download kinds: :meth:`download_rows` sends one tensor to each recipient. For a *tracked*
    kind (``client_rows[kind]``) each client remembers its last accepted row and falls back to
    it when it rejects a download; for an untracked kind a rejecting client simply has nothing
    (the caller treats it as a non-participant).

    ``theta``/``phi`` (FEDORA's kinds) are available as :attr:`server_theta` and
    :attr:`client_phi`. Invariant after each call, provided only the participants' rows of an
    uploaded matrix changed since the previous call: the server's copy equals the matrix, so a
    run resumed from a checkpoint simply builds a new exchange from the restored matrices
    (each client's last accepted download is then taken to be the restored server value).
    Memory: one extra copy of every tracked matrix. With encrypted propagation
    (:meth:`secure_fedora.secure.encrypted_propagation.EncryptedPropagator.propagate` given this
    exchange) the ``theta``/``phi`` copies are simulation bookkeeping only -- the plaintext
    that the server's last accepted ciphertext encrypts -- and are never sent; do not call
    :meth:`upload_theta` or :meth:`download_phi` in that mode.
    Every rejection of the run is appended to ``rejections``; ``last_round`` is the latest
    round a message was exchanged for (or the round the exchange was opened after).
    :meth:`send_entries` signs any other message entry (an untracked kind, an evaluation
    message's entries) without keeping a copy of it, and :meth:`upload_entries` any reply
    entry no matrix tracks (e.g. Local's step count).
    """

    #: About how many entry bytes one :meth:`send_entries` batch signs and verifies together.
    BATCH_BYTES: ClassVar[int] = 64 * 1024 * 1024

    def __init__(
        self,
        transport: SecureTransport,
        *,
        uploads: Mapping[str, Tensor] | None = None,
        downloads: Mapping[str, Tensor] | None = None,
        channel: Channel | None = None,
        last_round: int = 0,
    ) -> None:
        if not isinstance(transport, SecureTransport):
            raise TransportError(f"transport must be a SecureTransport, got {type(transport).__name__}")
        self.transport = transport
        self.channel = channel
        self.rejections: list[Rejection] = []
        self.last_round = _check_int(last_round, "last_round")
        self.server_rows: dict[str, Tensor] = {}
        self.client_rows: dict[str, Tensor] = {}
        # The rows the rejected participants of the latest upload_rows call sent (copies,
        # theirs only), before the server's copy was put back into the matrix.
        self.rejected_rows: dict[int, Tensor] = {}
        for kind, matrix in (uploads or {}).items():
            self.server_rows[kind] = self._snapshot(kind, matrix)
        for kind, matrix in (downloads or {}).items():
            self.client_rows[kind] = self._snapshot(kind, matrix)

    @classmethod
    def start(cls, transport: SecureTransport, theta: Tensor, phi: Tensor | None = None,
              channel: Channel | None = None) -> SecureExchange:
        """FEDORA's exchange: ``theta`` (N, P) uploads and ``phi`` downloads (default: a copy
        of ``theta``)."""
        if not isinstance(theta, Tensor) or theta.dim() != 2:
            raise TransportError(f"theta must be an (N, P) tensor, got {_shape(theta)}")
        if phi is not None and (not isinstance(phi, Tensor) or phi.shape != theta.shape):
            raise TransportError(f"phi must have theta's shape {tuple(theta.shape)}, got {_shape(phi)}")
        base = theta if phi is None else phi
        return cls(transport, uploads={KIND_THETA: theta}, downloads={KIND_PHI: base},
                   channel=channel)

    def _snapshot(self, kind: str, matrix: Tensor) -> Tensor:
        if not isinstance(kind, str) or not kind:
            raise TransportError(f"message kinds must be non-empty strings, got {kind!r}")
        if not isinstance(matrix, Tensor) or matrix.dim() < 1 or not matrix.is_floating_point():
            raise TransportError(f"{kind}: expected a floating (N, ...) tensor, got {_shape(matrix)}")
        if matrix.shape[0] != self.transport.num_clients:
            raise TransportError(
                f"{kind} has {matrix.shape[0]} rows for {self.transport.num_clients} clients")
        return matrix.detach().clone()

    @property
    def server_theta(self) -> Tensor:
        """The server's last accepted ``theta`` row of every client."""
        return self._store(self.server_rows, KIND_THETA, "upload")

    @property
    def client_phi(self) -> Tensor:
        """Every client's last accepted ``phi`` row."""
        return self._store(self.client_rows, KIND_PHI, "download")

    @staticmethod
    def _store(stores: Mapping[str, Tensor], kind: str, what: str) -> Tensor:
        store = stores.get(kind)
        if store is None:
            raise TransportError(f"this exchange does not track {what}s of kind {kind!r}")
        return store

    def deliver(self, kind: str, rnd: int, messages: dict[int, bytes]) -> dict[int, bytes]:
        """Pass ``messages`` through the ``channel`` (unchanged when there is none)."""
        if self.channel is None:
            return messages
        return {i: self.channel(kind, rnd, i, m) for i, m in messages.items()}

    def _saw(self, rnd: int) -> None:
        self.last_round = max(self.last_round, rnd)

    def upload_rows(
        self, rnd: int, matrix: Tensor, participants: Sequence[int], *, kind: str = KIND_THETA,
        check: ValueCheck | None = None,
    ) -> list[int]:
        """Participants sign and send their rows of ``matrix`` (kind ``kind``, float32 on the
        wire); the server verifies them (all nonces with one fsync).

        Accepted rows become the server's copy. The row of every rejected participant is
        restored in ``matrix`` (in place) to the server's last accepted value: that client
        counts as a non-participant of round ``rnd``; the row it sent is kept (a copy, of the
        rejected rows only) in :attr:`rejected_rows` until the next call, for a caller whose
        matrix is also the clients' own state. ``check`` may reject decoded values
        (:class:`InvalidValueError`). Returns the accepted participants, in the order given.
        """
        store = self._store(self.server_rows, kind, "upload")
        self._check(matrix, store, kind)
        order = list(dict.fromkeys(participants))
        messages = {i: self.transport.client_upload(rnd, i, matrix[i], kind=kind) for i in order}
        rows, rejections = self.transport.server_receive(
            rnd, self.deliver(kind, rnd, messages), tuple(matrix.shape[1:]), kind=kind, check=check)
        for i, row in rows.items():
            store[i].copy_(row)
            matrix[i].copy_(row)
        self.rejected_rows = {r.client: matrix[r.client].clone() for r in rejections}
        for r in rejections:
            matrix[r.client].copy_(store[r.client])
        self.rejections.extend(rejections)
        self._saw(rnd)
        return [i for i in order if i in rows]

    def download_rows(
        self, rnd: int, rows: Mapping[int, Tensor], *, kind: str,
    ) -> tuple[dict[int, Tensor], list[int]]:
        """The server signs and sends ``rows[i]`` to each recipient ``i`` (float32 on the wire;
        every row must have the same shape); each recipient verifies its message.

        Returns ``(held, accepted)``: ``held[i]`` is what client ``i`` now holds -- the row it
        accepted or, for a tracked kind, a copy of its last accepted row (an untracked kind
        leaves a rejecting client out of ``held``) -- and ``accepted`` the recipients that
        accepted, in the order given.
        """
        store = self.client_rows.get(kind)
        order = list(rows)
        shapes = {tuple(rows[i].shape) for i in order if isinstance(rows[i], Tensor)}
        if len(shapes) > 1 or any(not isinstance(rows[i], Tensor) for i in order):
            raise TransportError(f"{kind}: every downloaded row must be a tensor of one shape")
        if not order:
            return {}, []
        shape = shapes.pop()
        if store is not None and tuple(store.shape[1:]) != shape:
            raise TransportError(
                f"{kind} rows have shape {shape}, the tracked copies {tuple(store.shape[1:])}")
        messages: dict[int, bytes] = {}
        bodies: dict[int, tuple[bytes, str]] = {}  # a row sent to many clients: encoded once
        for i in order:
            body = bodies.get(id(rows[i]))
            if body is None:
                payload = encode_tensor(rows[i])
                body = bodies[id(rows[i])] = (payload, hashlib.sha256(payload).hexdigest())
            messages[i] = self.transport.server_send_bytes(rnd, i, body[0], kind, digest=body[1])
        del bodies
        received, rejections = self.transport.clients_receive(
            rnd, self.deliver(kind, rnd, messages), shape, kind=kind)
        held: dict[int, Tensor] = {}
        for i in order:
            if i in received:
                held[i] = received[i]
                if store is not None:
                    store[i].copy_(received[i])
            elif store is not None:
                held[i] = store[i].clone()
        self.rejections.extend(rejections)
        self._saw(rnd)
        return held, [i for i in order if i in received]

    def send_entries(self, rnd: int, entries: Mapping[int, Tensor], *, kind: str) -> list[int]:
        """The server signs and sends ``entries[i]`` (any message entry, in its own dtype) to
        each recipient ``i``, which verifies it; returns the recipients that accepted, in the
        order given. Nothing is tracked: a recipient that accepted holds exactly ``entries[i]``
        (the verified bytes are its encoding), one that rejected holds nothing of it.
        Messages are made and verified in batches of about :attr:`BATCH_BYTES`, and an entry
        sent to many recipients (a broadcast) is encoded once, so the messages of all
        recipients are never held at once."""
        order = list(entries)
        accepted: list[int] = []
        bodies: dict[int, tuple[bytes, str]] = {}  # id(entry) -> encoding, digest (a batch's)
        start = 0
        while start < len(order):
            batch: list[int] = []
            size = 0
            while start < len(order) and (not batch or size < self.BATCH_BYTES):
                entry = entries[order[start]]
                size += entry.element_size() * entry.numel()
                batch.append(order[start])
                start += 1
            sent: dict[int, tuple[bytes, Tensor]] = {}
            messages: dict[int, bytes] = {}
            for i in batch:
                entry = entries[i]
                body = bodies.get(id(entry))
                if body is None:
                    payload = encode_entry(entry)
                    body = bodies[id(entry)] = (payload, hashlib.sha256(payload).hexdigest())
                sent[i] = (body[0], entry)
                messages[i] = self.transport.server_send_entry(rnd, i, entry, kind, body)
            received, rejections = self.transport.clients_receive_entries(
                rnd, self.deliver(kind, rnd, messages), kind, sent)
            del messages
            bodies.clear()
            self.rejections.extend(rejections)
            accepted.extend(i for i in batch if i in received)
        self._saw(rnd)
        return accepted

    def upload_entries(self, rnd: int, entries: Mapping[int, Tensor], *, kind: str,
                       accounted: bool = True) -> list[int]:
        """Each client ``i`` signs ``entries[i]`` (a reply entry no matrix tracks, in its own
        dtype) through its release pipeline and sends it; the server verifies them (one nonce
        commit). Returns the senders whose entry was accepted, in the order given; nothing
        is tracked or copied (a rejected entry is simply not received). ``accounted`` False:
        a reply that releases nothing the accountant covers (an evaluation's metrics, as a
        Flower client signs its evaluation reply) goes the unaccounted path, encrypt -> sign,
        also under DP and after a budget refusal."""
        order = list(entries)
        path = None if accounted else UnaccountedReleases()
        messages = {i: self.transport.client_upload_entry(rnd, i, entries[i], kind, releases=path)
                    for i in order}
        received, rejections = self.transport.server_receive_entries(
            rnd, self.deliver(kind, rnd, messages), kind, entries)
        self.rejections.extend(rejections)
        self._saw(rnd)
        return [i for i in order if i in received]

    def upload_released_rows(self, rnd: int, rows: Mapping[int, Tensor], *, kind: str) -> list[int]:
        """Each client ``i`` sends ``rows[i]`` (all of one shape and dtype, sent in that dtype)
        through its release pipeline as a tensor, so that a release the pipeline admitted
        earlier (under DP a noised summary, round 0) continues on that very payload, its
        equality checked (:meth:`client_release`); the server verifies them. Returns the
        senders whose row was accepted, in the order given; nothing is tracked."""
        order = list(rows)
        if not order:
            return []
        first = rows[order[0]]
        messages = {i: self.transport.client_upload(rnd, i, rows[i], kind=kind, dtype=first.dtype)
                    for i in order}
        received, rejections = self.transport.server_receive(
            rnd, self.deliver(kind, rnd, messages), tuple(first.shape), kind=kind,
            dtype=first.dtype)
        self.rejections.extend(rejections)
        self._saw(rnd)
        return [i for i in order if i in received]

    def upload_theta(self, rnd: int, theta: Tensor, participants: Sequence[int]) -> list[int]:
        """FEDORA: :meth:`upload_rows` of ``theta``; returns the accepted participants, sorted."""
        return sorted(self.upload_rows(rnd, theta, participants, kind=KIND_THETA))

    def download_phi(self, rnd: int, phi: Tensor, recipients: Sequence[int] | None = None) -> list[int]:
        """The server signs and sends ``phi[i]`` to each recipient (default: every client).

        A client that rejects its message keeps its last accepted ``phi`` row: it is restored
        in ``phi`` in place. Returns the clients that accepted (sorted).
        """
        self._check(phi, self.client_phi, KIND_PHI)
        targets = range(self.transport.num_clients) if recipients is None else recipients
        held, accepted = self.download_rows(rnd, {i: phi[i] for i in targets}, kind=KIND_PHI)
        for i, row in held.items():
            phi[i].copy_(row)
        return sorted(accepted)

    @staticmethod
    def _check(matrix: Tensor, store: Tensor, name: str) -> None:
        if not isinstance(matrix, Tensor) or matrix.shape != store.shape:
            raise TransportError(
                f"{name} must have shape {tuple(store.shape)}, got {_shape(matrix)}")


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
