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
The server then checks a decoded reply as the in-process runtime checks a reply
(:meth:`~secure_fedora.algorithms.contract.ReplyRules.check_received`: exactly the declared
entries, each in the dtype and shape of its exchange, so one client cannot send a differently
shaped model than the others).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from privacy.envelope import Envelope, EnvelopeError
from secure_fedora.algorithms.contract import (
    ALLOWED_DTYPES,
    ENTRY_NAME,
    MAX_DIMS,
    MAX_ENTRIES,
    Payload,
    max_payload_bytes,
    tensor_problem,
)
from secure_fedora.secure.transport import MalformedPayloadError, log_rejection

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_DIMS",
    "PayloadLimits",
    "payload_to_record",
    "record_to_payload",
]


@dataclass(frozen=True)
class PayloadLimits:
    """Size caps of one decoded payload (defaults fit any built-in method's messages for a
    model of up to ``max_bytes / 16`` float32 parameters)."""

    max_tensors: int = MAX_ENTRIES
    max_bytes: int = 256 * 1024 * 1024

    @classmethod
    def for_model(cls, num_params: int) -> PayloadLimits:
        """Caps for a run whose model has ``num_params`` parameters: 16 parameter vectors of
        float64 (plus 1 MiB) per message, at least 16 MiB (the caps both runtimes' contract
        checks apply, :func:`~secure_fedora.algorithms.contract.payload_size_problem`)."""
        return cls(max_bytes=max_payload_bytes(num_params))


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
        if not isinstance(name, str) or not ENTRY_NAME.match(name):
            raise ValueError(f"payload tensor name {name!r} is not a plain identifier")
        if not isinstance(tensor, Tensor):
            raise ValueError(f"payload entry {name!r} is a {type(tensor).__name__}, not a tensor")
        problem = tensor_problem(tensor)
        if problem:
            raise ValueError(f"payload tensor {name!r} {problem}")
        t = tensor.detach().cpu().contiguous()
        total += t.numel() * t.element_size()
        arrays[name] = Array(t.numpy())
    if total > limits.max_bytes:
        raise ValueError(f"payload holds {total} bytes, at most {limits.max_bytes}")
    return ArrayRecord(arrays)


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
        if not ENTRY_NAME.match(name):
            raise refuse(f"tensor name {name!r} is not a plain identifier")
        try:
            array = record[name].numpy()
        except Exception as err:  # a malformed serialization: whatever numpy raised
            raise refuse(f"tensor {name!r} cannot be decoded ({type(err).__name__}: {err})") from None
        if array.dtype.kind not in "biuf" or array.dtype.byteorder == ">":
            raise refuse(f"tensor {name!r} has dtype {array.dtype}, not an allowed payload dtype")
        tensor = torch.from_numpy(np.array(array, copy=True))
        problem = tensor_problem(tensor)
        if problem:
            raise refuse(f"tensor {name!r} {problem}")
        payload[name] = tensor
    return payload
