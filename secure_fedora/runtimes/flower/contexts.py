"""The method contexts the Flower apps build: the server's holds no client data, a client's
holds only its own.

Both build the configured method through :data:`secure_fedora.core.registry.METHODS`, exactly
as the in-process runtime does, so the same algorithm object runs on both runtimes. What
differs is ``ctx.clients``: on the server a :class:`ClientDataSlots` with no data at all, on
client ``i`` one with data in slot ``i`` only. Any other access raises
:class:`DataAccessError` naming the slot, so a method whose server half reads client data, or
whose client half reads another client's, fails loudly instead of silently reading data the
process must not have (the method contract, :mod:`secure_fedora.algorithms.contract`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from secure_fedora.algorithms.held import DataAccessError, HeldSlots, held_index
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.data.partition import ClientData

__all__ = [
    "ClientDataSlots",
    "DataAccessError",
    "DataSchema",
    "build_algorithm",
    "client_context",
    "server_context",
]


class ClientDataSlots(Sequence[ClientData]):
    """``num_clients`` slots of client data of which only ``held`` (or none) can be read."""

    def __init__(self, num_clients: int, held: int | None = None,
                 client: ClientData | None = None, party: str = "the server") -> None:
        self._n, self._held, self._client, self._party = num_clients, held, client, party

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> ClientData: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ClientData]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            raise DataAccessError(f"{self._party} cannot read a slice of the clients' data")
        held = self._held if self._client is not None else None
        held_index(index, self._n, held, self._party)
        return self._client

    def __iter__(self) -> Iterator[ClientData]:
        raise DataAccessError(f"{self._party} cannot iterate over every client's data")


@dataclass(frozen=True)
class DataSchema:
    """What the server learns about the data at first contact (no data itself): the input
    shape of one example, the number of classes (or targets) and whether labels are
    multi-label. Every client must report the same schema."""

    input_shape: tuple[int, ...]
    num_classes: int
    multilabel: bool

    @property
    def summary_width(self) -> int:
        """The rows of a FEDORA summary ``U_i`` on this data: input features + classes."""
        return math.prod(self.input_shape) + self.num_classes

    @classmethod
    def of(cls, client: ClientData) -> DataSchema:
        """The schema of one client's data (its class count from the partitioner's meta)."""
        from secure_fedora.data.userdata import label_space

        num_classes, multilabel = label_space([client])
        return cls(tuple(int(v) for v in client.train_x.shape[1:]), num_classes, multilabel)


def server_context(cfg: ExperimentConfig, schema: DataSchema) -> Any:
    """The server's method context: the configured model (built as the in-process runtime
    builds it, so the common initialization is identical), no client data, no generators."""
    from secure_fedora.algorithms.methods import MethodContext
    from secure_fedora.core.plugins import config_dir
    from secure_fedora.learning.client import FlatModel, PlainGradient, Workspace
    from secure_fedora.learning.models import make_model
    from secure_fedora.learning.tasks import resolve_task
    from secure_fedora.runtimes.inprocess import train_config
    from secure_fedora.secure.backends import CkksBackend

    task = resolve_task(cfg.training.loss, schema.multilabel, config_dir(cfg))
    width = task.output_width(schema.num_classes, schema.multilabel)
    module = make_model(cfg.model.name, width, seed=cfg.seed, input_shape=schema.input_shape)
    flat = FlatModel(module, task)
    n = cfg.data.num_clients
    return MethodContext(
        clients=ClientDataSlots(n),
        flat=flat,
        train=train_config(cfg),
        oracle=PlainGradient(cfg.training.batch_size, cfg.training.clip_grad_norm, task=task),
        workspace=Workspace.for_size(flat.num_params),
        generators=[],
        init=flat.initial_vector(),
        num_classes=schema.num_classes,
        encryption=CkksBackend(),
    )


def client_context(cfg: ExperimentConfig, index: int, client: ClientData) -> Any:
    """Client ``index``'s method context: built by the in-process runtime's
    :func:`~secure_fedora.runtimes.inprocess.build_context` from its data alone (same model,
    initialization, checks and DP oracle), with its data, generator and noise source in slot
    ``index`` of ``num_clients`` slots, and ``held = index``: a method built on it allocates
    its per-client state as that client's row only, so the context and method hold O(P)
    memory whatever the number of clients (any other slot or row raises DataAccessError)."""
    from secure_fedora.runtimes.inprocess import build_context, client_generator

    n = cfg.data.num_clients
    party = f"client {index}"
    ctx = build_context(cfg, [client])
    ctx.clients = ClientDataSlots(n, index, ctx.clients[0], party=party)
    ctx.generators = HeldSlots(n, index, client_generator(cfg.seed, index), party)  # type: ignore[assignment]
    if ctx.noise:
        from privacy.noise import make_noise_source

        ctx.noise = HeldSlots(n, index, make_noise_source(cfg.privacy.noise, cfg.seed, index), party)  # type: ignore[assignment]
    ctx.held = index
    return ctx


def build_algorithm(name: str, ctx: Any, cfg: ExperimentConfig) -> Any:
    """The configured method ``name`` over ``ctx`` (a registry lookup, as in process)."""
    from secure_fedora.runtimes.inprocess import make_method

    return make_method(name, ctx, cfg)
