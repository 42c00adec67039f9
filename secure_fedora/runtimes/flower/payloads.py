"""Method payloads (``dict[str, Tensor]``) as Flower ArrayRecords, checked on the way in.

The generic Flower runtime moves only :data:`~secure_fedora.algorithms.contract.Payload` s
between a method's server half and its client halves. On the wire a payload is one
``ArrayRecord`` (each tensor one ``Array`` in its own dtype, bytes copied once), inside a
message whose signed envelope covers every byte (:mod:`secure_fedora.runtimes.flower.envelopes`).

Decoding never trusts the sender, even an authenticated one: :func:`record_to_payload` refuses
(with a logged :class:`~secure_fedora.secure.transport.MalformedPayloadError` naming the sender,
round and tensor) a record that is not an ArrayRecord, a name that is not a plain identifier,
a dtype outside :data:`ALLOWED_DTYPES`, more than :data:`MAX_DIMS` dimensions, non-finite
floating values, more than ``max_tensors`` tensors or more than ``max_bytes`` bytes in all.
:class:`ShapePins` then holds every tensor name to the dtype and shape it first had in an
accepted message of the same exchange, so one client cannot send a differently shaped model
than the others (a method's own validation is the second line).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from privacy.envelope import Envelope, EnvelopeError
from secure_fedora.algorithms.contract import REPLY_NUM_EXAMPLES, REPLY_STEPS, Payload
from secure_fedora.algorithms.methods import KEY_LAMBDA
from secure_fedora.secure.transport import MalformedPayloadError, log_rejection

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_DIMS",
    "PayloadLimits",
    "ShapePins",
    "payload_to_record",
    "record_to_payload",
]

#: Tensor dtypes a payload may carry (what the methods send: parameter rows and matrices,
#: counts, flags, serialized ciphertext bytes).
ALLOWED_DTYPES = frozenset({
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
})
#: Most dimensions a payload tensor may have.
MAX_DIMS = 4
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class PayloadLimits:
    """Size caps of one decoded payload (defaults fit any built-in method's messages for a
    model of up to ``max_bytes / 16`` float32 parameters)."""

    max_tensors: int = 64
    max_bytes: int = 256 * 1024 * 1024

    @classmethod
    def for_model(cls, num_params: int) -> PayloadLimits:
        """Caps for a run whose model has ``num_params`` parameters: 16 parameter vectors of
        float64 (plus 1 MiB) per message, at least 16 MiB."""
        return cls(max_bytes=max(16 * 1024 * 1024, 16 * 8 * int(num_params) + (1 << 20)))


def payload_to_record(payload: Mapping[str, Tensor], limits: PayloadLimits | None = None
                      ) -> ArrayRecord:
    """``payload`` as one ArrayRecord (dtype and shape kept, CPU copies).

    Raises ``ValueError`` naming the tensor for a payload this side would itself refuse to
    decode (bad name or dtype, too many dimensions, non-finite values, over the caps): a
    runtime never sends what it would not accept.
    """
    limits = limits or PayloadLimits()
    if len(payload) > limits.max_tensors:
        raise ValueError(f"payload holds {len(payload)} tensors, at most {limits.max_tensors}")
    arrays: dict[str, Array] = {}
    total = 0
    for name, tensor in payload.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"payload tensor name {name!r} is not a plain identifier")
        if not isinstance(tensor, Tensor):
            raise ValueError(f"payload entry {name!r} is a {type(tensor).__name__}, not a tensor")
        problem = _problem(tensor)
        if problem:
            raise ValueError(f"payload tensor {name!r} {problem}")
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            raise ValueError(f"payload tensor {name!r} is bfloat16, which numpy cannot carry")
        total += t.numel() * t.element_size()
        arrays[name] = Array(t.numpy())
    if total > limits.max_bytes:
        raise ValueError(f"payload holds {total} bytes, at most {limits.max_bytes}")
    return ArrayRecord(arrays)


def _problem(tensor: Tensor) -> str | None:
    if tensor.dtype not in ALLOWED_DTYPES:
        return f"has dtype {tensor.dtype}, not one of the allowed payload dtypes"
    if tensor.dim() > MAX_DIMS:
        return f"has {tensor.dim()} dimensions, at most {MAX_DIMS}"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        return "contains non-finite values"
    return None


def record_to_payload(record: object, envelope: Envelope, what: str,
                      limits: PayloadLimits | None = None) -> Payload:
    """The payload carried by ``record`` of an authenticated message, checked.

    ``what`` names the record in errors. Raises (and logs) a
    :class:`~secure_fedora.secure.transport.MalformedPayloadError` with the sender, round and
    kind of ``envelope`` for anything :func:`payload_to_record` would not have produced.
    """
    limits = limits or PayloadLimits()
    ctx = {"sender": envelope.sender, "round": envelope.round, "kind": envelope.kind,
           "recipient": envelope.recipient}

    def refuse(detail: str) -> EnvelopeError:
        return log_rejection(MalformedPayloadError(f"{what}: {detail}", **ctx))

    if not isinstance(record, ArrayRecord):
        raise refuse(f"is a {type(record).__name__}, not an ArrayRecord")
    if len(record) > limits.max_tensors:
        raise refuse(f"holds {len(record)} tensors, at most {limits.max_tensors}")
    total = 0
    for name in record:
        array = record[name]
        total += len(array.data)
        if total > limits.max_bytes:
            raise refuse(f"holds more than {limits.max_bytes} bytes")
    payload: Payload = {}
    for name in record:
        if not _NAME.match(name):
            raise refuse(f"tensor name {name!r} is not a plain identifier")
        try:
            array = record[name].numpy()
        except Exception as err:  # a malformed serialization: whatever numpy raised
            raise refuse(f"tensor {name!r} cannot be decoded ({type(err).__name__}: {err})") from None
        if array.dtype.kind not in "biuf" or array.dtype.byteorder == ">":
            raise refuse(f"tensor {name!r} has dtype {array.dtype}, not an allowed payload dtype")
        tensor = torch.from_numpy(np.array(array, copy=True))
        problem = _problem(tensor)
        if problem:
            raise refuse(f"tensor {name!r} {problem}")
        payload[name] = tensor
    return payload


@dataclass
class ShapePins:
    """Dtype and shape of every payload tensor: set from what the server half knows
    (:meth:`expect`), else pinned by the first accepted message of an exchange (``stage``); a
    later message with another dtype or shape for the same name is refused."""

    pins: dict[tuple[str, str], tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)

    def expect(self, stage: str, shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        """Pin ``stage``'s entries to what the server half knows they must be (its upload
        matrices' rows, the 0-d counts), so the first reply cannot set them."""
        for name, sig in shapes.items():
            self.pins[(stage, name)] = (sig[0], tuple(sig[1]))

    def check(self, stage: str, payload: Payload, envelope: Envelope) -> None:
        """Refuse (logged :class:`MalformedPayloadError`) a tensor whose dtype or shape
        differs from its pin; pin the new names only once the whole payload passed."""
        new = {}
        for name, tensor in payload.items():
            sig = (tensor.dtype, tuple(tensor.shape))
            pinned = self.pins.get((stage, name))
            if pinned is None:
                new[(stage, name)] = sig
            elif pinned != sig:
                raise log_rejection(MalformedPayloadError(
                    f"{stage} payload tensor {name!r} is {sig[0]} {sig[1]}, the exchange "
                    f"carries {pinned[0]} {pinned[1]}", sender=envelope.sender,
                    round=envelope.round, kind=envelope.kind, recipient=envelope.recipient))
        self.pins.update(new)


def expected_round_reply(algorithm: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The round-reply entries whose dtype and shape the server half knows: each upload
    matrix's row (``upload_state``), and the 0-d counts and ``lambda`` every built-in reply
    carries as :func:`torch.tensor` scalars (int64 counts, float64 lambda)."""
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        REPLY_STEPS: (torch.int64, ()), REPLY_NUM_EXAMPLES: (torch.int64, ()),
        KEY_LAMBDA: (torch.float64, ())}
    upload_state = getattr(algorithm, "upload_state", None)
    if upload_state is not None:
        for kind, matrix in upload_state().items():
            shapes[kind] = (matrix.dtype, tuple(matrix.shape[1:]))
    return shapes
