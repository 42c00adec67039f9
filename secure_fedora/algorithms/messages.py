"""Message kinds and value checks: the vocabulary of the method contract's payloads.

A message kind names one entry of a :data:`~secure_fedora.algorithms.contract.Payload` (and,
with ``[security] envelopes``, the ``kind`` field a signed envelope is bound to): a method
declares which kinds it uploads and downloads, and the secure layer
(:mod:`secure_fedora.secure.transport`) signs and verifies messages of those kinds. The kinds
belong to the contract, so they live here, below the secure layer that transports them; the
names stay importable from :mod:`secure_fedora.secure.transport` for existing code.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

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
    "ValueCheck",
]

KIND_THETA = "theta"
KIND_PHI = "phi"
KIND_ENC_THETA = "enc_theta"
KIND_ENC_PHI = "enc_phi"
KIND_SUMMARY = "summary"
KIND_RELATEDNESS_UPLOAD = "enc_summary"
KIND_RELATEDNESS_ROWS = "enc_gram_rows"
KIND_RELATEDNESS_RELEASE = "gram_release"
KIND_GLOBAL = "global"
KIND_MESSAGE = "message"
KIND_CLUSTERS = "clusters"
KIND_CLUSTER_CHOICE = "cluster_choice"
# A client's evaluation reply (its metrics), as one envelope per client and evaluated round.
KIND_EVALUATION_REPLY = "evaluate.reply"

ValueCheck = Callable[[Tensor], "str | None"]
"""``check(tensor) -> None`` if a decoded payload is acceptable, else a description of the
problem (the transport then rejects the message with its ``InvalidValueError``)."""
