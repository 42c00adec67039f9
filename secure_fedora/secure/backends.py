"""The secure layer's implementations of the methods' injection points.

:class:`CkksBackend` implements :class:`secure_fedora.algorithms.encryption.EncryptionBackend`
with this layer's CKKS protocols: :func:`secure_fedora.secure.relatedness.encrypted_overlaps`
and :class:`secure_fedora.secure.encrypted_propagation.EncryptedPropagator`. The runtimes put
one into every :class:`~secure_fedora.algorithms.methods.MethodContext` they build; the
CKKS modules (and TenSEAL) are imported on first use, so a run that encrypts nothing does
not load them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from secure_fedora.algorithms.encryption import EncryptedOverlapsResult, EncryptedPropagation

__all__ = ["CkksBackend"]


class CkksBackend:
    """CKKS (TenSEAL) relatedness and propagation, as the methods' encryption backend."""

    name = "ckks"

    def encrypted_overlaps(self, summaries: Tensor, transport: Any = None,
                           releases: Any = None) -> EncryptedOverlapsResult:
        """The overlap blocks through :func:`~secure_fedora.secure.relatedness.encrypted_overlaps`
        (a fresh key ceremony, key holder client 0, symmetric client encryption); ``releases``:
        the clients' release pipelines, whose encrypt stage produces each upload."""
        from secure_fedora.secure.relatedness import encrypted_overlaps

        return encrypted_overlaps(summaries, transport=transport, releases=releases)

    def propagator(self, num_clients: int) -> EncryptedPropagation:
        """A new :class:`~secure_fedora.secure.encrypted_propagation.EncryptedPropagator`."""
        from secure_fedora.secure.encrypted_propagation import EncryptedPropagator

        return EncryptedPropagator(num_clients)

    def __repr__(self) -> str:
        return "CkksBackend()"
