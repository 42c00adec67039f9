"""The contract a federated method implements once, and both runtimes run unchanged.

A method is split at the message boundary into a *server half* and a *client half*. A
runtime (in-process simulation or Flower) only moves :data:`Payload` s between them and
persists their state; it never branches on the method. One round is three calls::

    messages = algorithm.configure(rnd, participants)             # server
    replies  = algorithm.client_update_many(rnd, messages)        # each client i, alone
    stats    = algorithm.aggregate(rnd, replies)                  # server

with two optional exchanges around the rounds (``setup`` before round 1, e.g. FEDORA's
relatedness summaries; ``finalize`` after the last round, e.g. FedAvg's fine-tuning) and an
evaluation exchange whenever the runtime evaluates.

Rules every implementation keeps (the Flower runtime depends on them, and the in-memory
Flower tests check them by running each client half in a process that holds only that
client's data):

* The server half never reads client data (``ctx.clients``); it learns only what replies
  carry (e.g. a client's number of training examples).
* The client half of client ``i`` reads only ``ctx.clients[i]``, its own generator and noise
  source, the message it was sent and its own state (:meth:`client_state_dict`).
* Replies the server did not accept (rejected envelope, refused release, no reply) are
  simply absent from ``replies``; ``aggregate`` must treat absence as "did not take part".
* Every data-dependent value a client sends is covered by a :class:`ReleaseSpec` from
  :meth:`FederatedAlgorithm.releases`; the runtime accounts and records it (gate + ledger)
  before the client half runs, and checks the executed DP-SGD steps before the reply leaves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

Payload = dict[str, Tensor]
"""A message: named tensors (scalars are 0-d tensors). The only thing runtimes move."""

__all__ = ["FederatedAlgorithm", "Payload", "ReleaseSpec", "SETUP", "ROUND", "build_method",
           "method_class", "method_releases", "round_mechanisms"]

SETUP = "setup"
ROUND = "round"


@dataclass(frozen=True)
class ReleaseSpec:
    """One kind of data-dependent release a client makes, and how it is accounted.

    ``kind`` is the ledger's release kind (``"model"``, ``"summary"``, ...); ``mechanisms``
    names the accounted mechanisms of one such release, in ledger order (registry names in
    :mod:`privacy.mechanisms`, e.g. ``("dpsgd",)`` or ``("dpsgd", "gaussian_lambda")``);
    ``when`` is :data:`SETUP` (once, before round 1) or :data:`ROUND` (each round a client
    takes part in); ``encrypted``: the upload leaves encrypted (an ``EncryptPayload`` stage
    after the gate in the client's release pipeline; the ledger accounts the plaintext).
    """

    kind: str
    mechanisms: tuple[str, ...]
    when: str = ROUND
    encrypted: bool = False

    def __post_init__(self) -> None:
        if self.when not in (SETUP, ROUND):
            raise ValueError(f"release 'when' must be {SETUP!r} or {ROUND!r}, got {self.when!r}")
        if not self.kind or not self.mechanisms:
            raise ValueError("a release spec needs a kind and at least one mechanism")


class FederatedAlgorithm(ABC):
    """Base class of every federated method (see the module docstring for the contract)."""

    name: ClassVar[str] = "algorithm"

    # ------------------------------------------------------------------ declarations
    @classmethod
    def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
        """The releases a client of this method makes under ``cfg`` (what the privacy plan
        accounts). Default: one DP-SGD model release per round taken part in."""
        return (ReleaseSpec("model", ("dpsgd",), ROUND),)

    @classmethod
    def assumptions(cls, cfg: Any) -> dict[str, Any]:
        """Entries this method adds to results.json's ``assumptions`` under ``cfg`` (what a
        reader must know to interpret its results, e.g. what DP does not cover). Default:
        none. Two methods may state the same key only with the same value."""
        return {}

    @classmethod
    def derived_rows(cls, name: str, outcome: Mapping[str, Any]) -> dict[str, list[float]]:
        """Extra ``methods.<row>`` entries derived from this method's own outcome (its
        ``methods.<name>`` entry, registered as ``name``): row name -> every client's metric,
        which the runtime summarizes into ``methods.<row>.selected``. Default: none."""
        return {}

    @classmethod
    def comparisons(cls, name: str, outcomes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Entries of results.json's ``comparison`` this method (registered as ``name``)
        derives from all methods' outcomes of the run (keyed by method name). Default: none."""
        return {}

    @classmethod
    def distributed_unsupported(cls, cfg: Any) -> str | None:
        """Why this method cannot run under ``cfg`` as separate processes (a runtime that
        moves only messages, e.g. Flower), naming the config key; ``None``: it can."""
        return None

    # ------------------------------------------------------------------ setup exchange
    def setup_messages(self) -> dict[int, Payload]:
        """Server: what each client receives before round 1 (``{}``: no setup exchange)."""
        return {}

    def client_setup(self, i: int, message: Payload) -> Payload:
        """Client ``i``: its setup reply (called only for clients in ``setup_messages``)."""
        raise NotImplementedError(f"{type(self).__name__} has no setup exchange")

    def server_setup(self, replies: Mapping[int, Payload]) -> None:  # noqa: B027 (optional hook)
        """Server: build what the rounds need from the accepted setup replies."""
        return None

    # ------------------------------------------------------------------ setup ceremony
    def setup_ceremony(self) -> str | None:
        """The name of a multi-step protocol a *deployment* runs instead of the setup exchange
        when one request and one reply per client cannot keep what the method promises (e.g.
        FEDORA's encrypted relatedness: a CKKS key ceremony, encrypted uploads and a key
        holder's decryption, so that no summary is ever seen in the clear). ``None`` (default):
        the setup exchange. A runtime that does not know the named protocol refuses to run;
        the in-process runtime simulates it inside :meth:`server_setup`."""
        return None

    def server_setup_from_ceremony(self, name: str, result: Mapping[str, Any]) -> None:
        """Server: build what the rounds need from the result of the :meth:`setup_ceremony`
        protocol ``name`` (what that protocol's runtime implementation documents)."""
        raise NotImplementedError(f"{type(self).__name__} runs no setup ceremony {name!r}")

    # ------------------------------------------------------------------ rounds
    @abstractmethod
    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Server: the message each participant receives in round ``rnd``."""

    @abstractmethod
    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Client ``i``: train on its own data from ``message`` and its state; the reply."""

    def client_update_many(self, rnd: int, messages: Mapping[int, Payload]) -> dict[int, Payload]:
        """All of a round's client halves in one process (the in-process runtime). Default:
        :meth:`client_update` per client in the given order; a method may override it with a
        batched implementation that returns the same replies within float tolerance."""
        return {i: self.client_update(i, rnd, m) for i, m in messages.items()}

    @abstractmethod
    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """Server: combine the accepted replies; returns the round's statistics."""

    # ------------------------------------------------------------------ evaluation
    def evaluation_messages(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """Server: what each evaluated client needs from it to evaluate (``{}``: nothing)."""
        return {}

    @abstractmethod
    def client_eval_row(self, i: int, message: Payload | None = None) -> Tensor:
        """Client ``i``: the parameter row it is evaluated on (its personalized model)."""

    # ------------------------------------------------------------------ finalize exchange
    def finalize_messages(self) -> dict[int, Payload]:
        """Server: what each client receives after the last round (``{}``: no exchange)."""
        return {}

    def client_finalize(self, i: int, message: Payload) -> Payload:
        """Client ``i``: its final reply (e.g. metrics after local fine-tuning)."""
        raise NotImplementedError(f"{type(self).__name__} has no finalize exchange")

    def server_finalize(self, replies: Mapping[int, Payload]) -> dict[str, Any]:
        """Server: method-specific results for ``results.json`` from the final replies."""
        return {}

    # ------------------------------------------------------------------ state
    @abstractmethod
    def server_state_dict(self) -> dict[str, Any]:
        """Server state a resume cannot recompute."""

    @abstractmethod
    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`server_state_dict` (validated: shapes, finiteness)."""

    @abstractmethod
    def client_state_dict(self, i: int) -> Payload:
        """Client ``i``'s own state between messages (what its process persists)."""

    @abstractmethod
    def load_client_state_dict(self, i: int, state: Payload) -> None:
        """Restore :meth:`client_state_dict` for client ``i`` (validated)."""


# ---------------------------------------------------------------------- registry helpers
# A method is registered in secure_fedora.core.registry.METHODS either as its class (a
# FederatedAlgorithm subclass with a ``from_config(ctx, cfg)`` classmethod) or as a factory
# ``(ctx, cfg) -> method``; a factory exposes its class as the attribute ``algorithm``.


def method_class(name: str) -> type[FederatedAlgorithm] | None:
    """The class of registered method ``name`` (what its releases and config checks come
    from), or ``None`` when it is a factory that does not name its class (``algorithm``
    attribute). Unknown names raise :class:`~secure_fedora.core.registry.RegistryError`."""
    from secure_fedora.core.registry import METHODS

    entry = METHODS.get(name)
    if isinstance(entry, type) and issubclass(entry, FederatedAlgorithm):
        return entry
    cls = getattr(entry, "algorithm", None)
    if isinstance(cls, type) and issubclass(cls, FederatedAlgorithm):
        return cls
    return None


def build_method(name: str, ctx: Any, cfg: Any) -> Any:
    """Instantiate registered method ``name``: ``cls.from_config(ctx, cfg)`` for a registered
    class, ``factory(ctx, cfg)`` for a registered factory."""
    from secure_fedora.core.registry import METHODS

    entry = METHODS.get(name)
    if isinstance(entry, type):
        from_config = getattr(entry, "from_config", None)
        if from_config is None:
            raise TypeError(f"method {name!r} is registered as class {entry.__name__}, which "
                            "has no from_config(ctx, cfg) classmethod")
        return from_config(ctx, cfg)
    return entry(ctx, cfg)


def method_releases(name: str, cfg: Any) -> tuple[ReleaseSpec, ...]:
    """The releases registered method ``name`` declares under ``cfg``; a factory that does
    not name its class (``factory.algorithm``) is refused with a ``ValueError`` rather than
    planned with a guess."""
    cls = method_class(name)
    if cls is None:
        raise ValueError(
            f"method {name!r} is registered as a factory that does not name its algorithm "
            "class, so its releases are unknown; register the class (with a from_config "
            "classmethod) or set the factory's 'algorithm' attribute to it")
    return tuple(cls.releases(cfg))


def round_mechanisms(name: str, cfg: Any) -> tuple[str, ...]:
    """The mechanisms of method ``name``'s per-round release (kind ``"model"``), in ledger
    order: what the runtime's admission records before a client trains."""
    for spec in method_releases(name, cfg):
        if spec.when == ROUND and spec.kind == "model":
            return spec.mechanisms
    return ()
