"""The injection point for encrypted computation a method needs (e.g. FEDORA's CKKS modes).

Methods live below the secure layer, so they cannot import its CKKS code. Instead a method
asks its :class:`~secure_fedora.algorithms.methods.MethodContext` for an
:class:`EncryptionBackend` (``ctx.encryption``), an object the *runtime* puts there: both
runtimes fill it with the secure layer's implementation
(:class:`secure_fedora.secure.backends.CkksBackend`). The protocols below are all a method may
rely on. A method whose configuration asks for an encrypted mode calls
:func:`require_encryption` when it is built: without a backend it refuses with
:class:`EncryptionUnavailableError`, naming the config key; it never falls back to computing
in the clear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from privacy.errors import ToolkitError
from secure_fedora.algorithms.config_checks import CKKS_SUMMARY_VECTORS

__all__ = [
    "CKKS_SUMMARY_VECTORS",
    "EncryptedOverlapsResult",
    "EncryptedPropagation",
    "EncryptionBackend",
    "EncryptionUnavailableError",
    "require_encryption",
]




class EncryptionUnavailableError(ToolkitError, ValueError):
    """A configuration asks for encrypted computation, but no backend provides it."""


class EncryptedOverlapsResult(Protocol):
    """What :meth:`EncryptionBackend.encrypted_overlaps` returns: the decrypted ``(N, N, q, q)``
    overlap blocks (zero for excluded clients), the traffic and timings, and with a signed
    transport the excluded clients and the rejected uploads (objects with ``to_dict()``)."""

    overlaps: Tensor
    client_bytes_sent: list[int]
    server_bytes_received: int
    released_bytes: int
    timings: dict[str, float]
    rejections: Sequence[Any]

    @property
    def excluded(self) -> list[int]:
        """Clients whose uploads were rejected, excluded from relatedness (their blocks are
        zero)."""


class EncryptedPropagation(Protocol):
    """FEDORA's propagation ``phi = P @ theta`` computed on ciphertexts (the server never sees
    ``theta`` or ``phi`` in the clear); ``stats.to_dict()`` reports its traffic."""

    stats: Any

    def propagate(self, prop: Tensor, theta: Tensor, changed: Sequence[int] | None = None, *,
                  rnd: int | None = None, exchange: Any = None) -> Tensor:
        """``prop @ theta`` (N, P); only the ``changed`` clients re-encrypt and upload."""
        ...


@runtime_checkable
class EncryptionBackend(Protocol):
    """Encrypted computation a runtime offers to the methods (``MethodContext.encryption``)."""

    #: The scheme, for results and error messages (e.g. ``"ckks"``).
    name: str

    def encrypted_overlaps(self, summaries: Tensor, transport: Any = None,
                           releases: Any = None) -> EncryptedOverlapsResult:
        """All clients' overlap blocks ``U_i^T U_j`` from their ``(N, d, q)`` summaries, with
        the server computing on ciphertexts and seeing only the decrypted ``q x q`` blocks;
        with a signed ``transport`` every message is an envelope and a client whose upload
        is rejected is excluded; ``releases`` (the clients' release pipelines, or None) encrypt
        each client's upload in its pipeline's encrypt stage."""
        ...

    def propagator(self, num_clients: int) -> EncryptedPropagation:
        """A fresh encrypted propagator for ``num_clients`` clients (its key ceremony done)."""
        ...


def require_encryption(backend: EncryptionBackend | None, wanted: Mapping[str, str]) -> EncryptionBackend:
    """``backend`` when one is present; otherwise :class:`EncryptionUnavailableError` naming
    each config key and value in ``wanted`` (e.g. ``{"fedora.propagation": "encrypted"}``)
    that asks for encryption (there is no plaintext fallback)."""
    if backend is not None:
        return backend
    keys = ", ".join(f"{key} = {value!r}" for key, value in wanted.items())
    raise EncryptionUnavailableError(
        f"{keys} needs encrypted computation, but the method context has no encryption backend "
        "(MethodContext.encryption is None); nothing is computed in the clear instead. Run it "
        "through a runtime (both provide secure_fedora.secure.backends.CkksBackend) or set "
        "ctx.encryption to an EncryptionBackend")
