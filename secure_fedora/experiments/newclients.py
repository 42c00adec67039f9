"""New-client generalization: how well does a client that joins a trained federation do?

``held_out`` clients of the partition are kept out while FEDORA and FedAvg train on the
others: the last ones (``selection="last"``; with the rotation partition, a contiguous range
of angles no trained client covers) or ones spread evenly over the client order
(``selection="spread"``; every newcomer's rotation lies between trained ones). Each newcomer then joins:

- FEDORA: it sends its summary; the server extends the relatedness graph by the newcomer's
  row only (:meth:`~secure_fedora.algorithms.methods.Fedora.attach`) and hands it
  ``phi_new = sum_j P_new,j theta_j``. Nobody else retrains. The newcomer then runs FEDORA's
  client update (selective pull toward ``phi_new``, which stays fixed) for a few epochs.
- FedAvg + fine-tuning: it receives the final global model and fine-tunes it.
- Local: it starts from the common initialization and trains alone.

Each newcomer's test accuracy is reported after 0 local epochs (what it received) and after
each requested number of epochs, using exactly the parameters at that epoch (no model
selection). Every local epoch runs through the context's gradient oracle; all three methods
start each newcomer from the same private RNG stream, so they see the same batches.

Relatedness is computed in the clear (``fedora.relatedness = "plain"``): the newcomer's
summary and the trained clients' summaries are built here from their training rows.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from privacy.errors import ToolkitError
from secure_fedora.algorithms import fedora
from secure_fedora.algorithms.methods import FedAvg, Fedora, Local, MethodContext, plain_overlaps
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.core.plugins import derived_config
from secure_fedora.data.partition import ClientData
from secure_fedora.learning.client import evaluate, local_train
from secure_fedora.learning.devices import threads_applied
from secure_fedora.runtimes.inprocess import (
    CheckpointError,
    ProgressFn,
    Simulation,
    build_clients,
    build_context,
    client_generator,
    make_method,
)
from secure_fedora.runtimes.rundir import RunDirError, RunDirUnavailableError

__all__ = [
    "NEWCOMER_METHODS",
    "NewClientError",
    "NewClientReport",
    "format_table",
    "run_new_client_experiment",
    "newcomer_indices",
    "split_newcomers",
]

# The experiment compares these three by definition (their classes name them).
NEWCOMER_METHODS: tuple[str, ...] = (Fedora.name, f"{FedAvg.name}_ft", Local.name)


class NewClientError(ToolkitError, ValueError):
    """A new-client experiment that cannot run; the message names the bad argument."""


@dataclass
class NewClientReport:
    """Per-newcomer test accuracy after each number of local epochs, for each method.

    ``accuracy[method][epochs]`` lists the newcomers' accuracies in ``newcomers`` order;
    ``neighbours[k]`` are the client ids of the trained clients FEDORA's graph links newcomer
    ``k`` to (its top-k by similarity); ``federation`` summarizes the trained clients' own
    accuracies.
    """

    name: str
    newcomers: list[int]
    trained: int
    rounds: int
    epochs: list[int]
    accuracy: dict[str, dict[int, list[float]]]
    neighbours: list[list[int]]
    federation: dict[str, dict[str, float]] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)

    def mean(self, method: str, epochs: int) -> float:
        """Mean accuracy of the newcomers under ``method`` after ``epochs`` local epochs."""
        return statistics.fmean(self.accuracy[method][epochs])

    def minimum(self, method: str, epochs: int) -> float:
        """Lowest newcomer accuracy under ``method`` after ``epochs`` local epochs."""
        return min(self.accuracy[method][epochs])

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of the whole report (epoch keys become strings)."""
        return {**dataclasses.asdict(self),
                "accuracy": {m: {str(e): v for e, v in by.items()} for m, by in self.accuracy.items()}}


Selection = Literal["last", "spread"]


def newcomer_indices(n: int, held_out: int, selection: Selection = "last") -> list[int]:
    """Positions of the ``held_out`` newcomers among ``n`` clients.

    "last": ``n - held_out .. n - 1``. "spread": ``round((k + 1) * n / held_out) - 1`` for
    ``k = 0 .. held_out - 1`` (for 36 and 6: 5, 11, 17, 23, 29, 35). Raises
    :class:`NewClientError` unless ``1 <= held_out <= n - 2`` (a relatedness graph needs two
    trained clients) and ``selection`` is known.
    """
    if isinstance(held_out, bool) or not isinstance(held_out, int):
        raise NewClientError(f"held_out must be an integer, got {held_out!r}")
    if n < 3:
        raise NewClientError(f"a late-joiner experiment needs at least 3 clients (two train, one "
                             f"joins late); this one has {n}: raise num_clients")
    if not 1 <= held_out <= n - 2:
        raise NewClientError(
            f"held_out must lie in [1, {n - 2}] for {n} clients (at least two must train); got {held_out}"
        )
    if selection == "last":
        return list(range(n - held_out, n))
    if selection == "spread":
        return [round((k + 1) * n / held_out) - 1 for k in range(held_out)]
    raise NewClientError(f"selection must be 'last' or 'spread', got {selection!r}")


def split_newcomers(
    clients: Sequence[ClientData], held_out: int, selection: Selection = "last"
) -> tuple[list[ClientData], list[ClientData]]:
    """The trained clients and the newcomers (:func:`newcomer_indices`), each in order."""
    n = len(clients)
    chosen = set(newcomer_indices(n, held_out, selection))
    return ([c for k, c in enumerate(clients) if k not in chosen],
            [c for k, c in enumerate(clients) if k in chosen])


def _check_epochs(epochs: Sequence[int]) -> list[int]:
    if not epochs:
        raise NewClientError("epochs must list at least one number of local epochs")
    for e in epochs:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise NewClientError(f"epochs must be non-negative integers, got {e!r}")
    return sorted(set(epochs))


def _accuracies_along(
    ctx: MethodContext, client: ClientData, start: Tensor, epochs: list[int], seed: int,
    stream: int, phi: Tensor | None = None, max_pull: float | None = None,
) -> dict[int, float]:
    """Train a copy of ``start`` one epoch at a time; test accuracy at each listed epoch.

    With ``phi`` given, every epoch is FEDORA's client update: the selective weight
    ``lambda`` from the validation losses of the current model and of ``phi``, then local
    training with the proximal pull toward ``phi``.
    """
    row = start.clone()
    one_epoch = dataclasses.replace(ctx.train, local_epochs=1)
    gen = client_generator(seed, stream)  # a fresh copy: the same batches for every method
    out: dict[int, float] = {}
    for e in range(max(epochs) + 1):
        if e > 0:
            lam = 0.0
            if phi is not None:
                lam = fedora.bounded_regularization_weight(fedora.regularization_weight(
                    evaluate(ctx.flat, row, client.val_x, client.val_y).loss,
                    evaluate(ctx.flat, phi, client.val_x, client.val_y).loss,
                ), one_epoch.lr, max_pull)
            local_train(ctx.flat, row, client.train_x, client.train_y, one_epoch, ctx.oracle,
                        gen, ctx.workspace, phi=phi, lam=lam)
        if e in epochs:
            out[e] = evaluate(ctx.flat, row, client.test_x, client.test_y).accuracy
    return out


def run_new_client_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    held_out: int,
    epochs: Sequence[int] = (0, 1, 5),
    selection: Selection = "last",
    clients: Sequence[ClientData] | None = None,
    progress: ProgressFn | None = None,
    context_factory: Callable[[ExperimentConfig, Sequence[ClientData]], MethodContext] = build_context,
) -> NewClientReport:
    """Train FEDORA and FedAvg without ``held_out`` clients, attach them, report.

    Newcomer ``k`` trains with the private RNG stream of index ``len(trained) + k``, which no
    trained client uses (the federation's clients use streams ``0 .. len(trained) - 1``).

    The federation's runs live in ``run_dir`` (checkpointed every round; rerunning with the
    same arguments resumes or reuses them). The trained clients' parameters are not changed
    by attaching newcomers. Raises :class:`NewClientError` for bad arguments, a ``fedora.k``
    not below the number of trained clients, or a config whose relatedness is not plain, whose propagation is encrypted, that enables DP or that asks for
    envelopes; CheckpointError or RunDirError (saying to pass another ``run_dir``) for a
    ``run_dir`` that holds a federation trained with other arguments; RunDirUnavailableError,
    as the run gives it, for one another process holds or that cannot be opened; ModelError
    (:class:`~secure_fedora.learning.models.BufferGuard`), before a newcomer's accuracies are
    kept, when its training or evaluations wrote a buffer or a client's split in place.
    """
    if cfg.fedora.relatedness != "plain":
        raise NewClientError(
            f"fedora.relatedness {cfg.fedora.relatedness!r}: this experiment computes summaries "
            "in the clear and supports only 'plain'"
        )
    if cfg.privacy.enabled:
        raise NewClientError(
            "privacy.enabled = true: this experiment computes every summary and the newcomers' "
            "lambda in the clear and trains the newcomers outside any privacy plan, so it would "
            "run weaker than configured; run it with privacy.enabled = false"
        )
    if cfg.fedora.propagation == "encrypted":
        raise NewClientError(
            "fedora.propagation = 'encrypted': the newcomers' phi rows are computed from every "
            "trained client's parameters in the clear, so this experiment would silently run "
            "weaker than configured; use another propagation for it")
    if cfg.security.envelopes:
        raise NewClientError(
            "security.envelopes = true: the newcomers' summaries and phi rows are computed "
            "in-process without envelopes, so this experiment would silently run weaker than "
            "configured; set security.envelopes = false for it"
        )
    epoch_list = _check_epochs(epochs)
    all_clients = list(clients) if clients is not None else build_clients(cfg)
    trained, newcomers = split_newcomers(all_clients, held_out, selection)
    if cfg.fedora.k >= len(trained):
        # The config checks k against data.num_clients; the federation trains fewer clients.
        raise NewClientError(
            f"fedora.k = {cfg.fedora.k} must be smaller than the {len(trained)} clients the "
            f"federation trains ({len(all_clients)} clients less held_out = {held_out}; each client keeps at most N - 1 neighbours, as a run refuses k >= "
            "data.num_clients): lower fedora.k or held_out")
    fed_cfg = derived_config(cfg, cfg.model_copy(update={"methods": [Fedora.name, FedAvg.name]}))
    # the newcomers train and are evaluated on the federation's threads, as its run does
    with threads_applied(fed_cfg):
        sim = Simulation(fed_cfg, run_dir, clients=trained, progress=progress,
                         method_factory=make_method, context_factory=context_factory)
        try:
            results = sim.run(resume=True)
        except RunDirUnavailableError:  # busy or unreadable: other arguments would not help
            raise
        except (CheckpointError, RunDirError) as err:  # the resume's message has no next step here
            raise type(err)(
                f"{err}; this experiment reuses the federation in {run_dir} only when rerun with the "
                "config, data, held_out and selection that trained it: pass another run_dir for "
                "these arguments") from None
        fed = sim.methods[Fedora.name]
        avg = sim.methods[FedAvg.name]
        if not isinstance(fed, Fedora) or not isinstance(avg, FedAvg):
            raise NewClientError("the federation did not produce FEDORA and FedAvg models")
        before = fed.theta.clone()

        ctx = context_factory(cfg, all_clients)
        summaries = plain_overlaps(trained, ctx.num_classes, cfg.fedora.q)[0]
        accuracy: dict[str, dict[int, list[float]]] = {
            m: {e: [] for e in epoch_list} for m in NEWCOMER_METHODS
        }
        neighbours = []
        for slot, c in enumerate(newcomers):
            stream = len(trained) + slot
            u_new = fedora.client_summary(c.train_x, c.train_y, ctx.num_classes, cfg.fedora.q,
                                          client=stream)
            overlaps = fedora.joiner_overlaps(u_new, summaries)
            phi_new = fed.attach(overlaps)
            chosen = fedora.attach_neighbours(overlaps, cfg.fedora.tau, cfg.fedora.k)
            neighbours.append(sorted(trained[j].client_id for j in chosen))
            runs = {
                Fedora.name: _accuracies_along(ctx, c, phi_new, epoch_list, cfg.seed, stream, phi=phi_new,
                                               max_pull=cfg.fedora.max_pull),
                f"{FedAvg.name}_ft": _accuracies_along(ctx, c, avg.global_params, epoch_list, cfg.seed,
                                                       stream),
                Local.name: _accuracies_along(ctx, c, ctx.init, epoch_list, cfg.seed, stream),
            }
            if ctx.buffers is not None:  # as a run checks after its evaluations
                ctx.buffers.check(f"in newcomer client {c.client_id}'s training and evaluation")
            for m, by_epoch in runs.items():
                for e, acc in by_epoch.items():
                    accuracy[m][e].append(acc)
        if not torch.equal(before, fed.theta):
            raise NewClientError("attaching newcomers changed the trained clients' parameters")
        federation = {
            name: {"mean": body["selected"]["mean"], "min": body["selected"]["min"]}
            for name, body in results["methods"].items()
        }
        d, t = cfg.data, cfg.training
        return NewClientReport(
            name=cfg.name,
            newcomers=[c.client_id for c in newcomers],
            trained=len(trained),
            rounds=t.rounds,
            epochs=epoch_list,
            accuracy=accuracy,
            neighbours=neighbours,
            federation=federation,
            setup={
                "dataset": d.dataset, "partition": d.partition, "clients": len(all_clients),
                "train_per_client": d.train_per_client, "val_per_client": d.val_per_client,
                "local_epochs_per_round": t.local_epochs, "model": cfg.model.name, "seed": cfg.seed,
                "selection": selection,
                "newcomer_meta": [
                    {k: v for k, v in c.meta.items() if k in ("rotation_degrees", "group", "classes")}
                    for c in newcomers
                ],
            },
        )


def format_table(report: NewClientReport) -> str:
    """A Markdown table: newcomers' mean / min test accuracy per method and epoch count."""
    head = "| method | " + " | ".join(f"{e} ep mean | {e} ep min" for e in report.epochs) + " |"
    sep = "|---|" + "---|---|" * len(report.epochs)
    lines = [head, sep]
    for m in NEWCOMER_METHODS:
        cells = " | ".join(f"{report.mean(m, e):.4f} | {report.minimum(m, e):.4f}" for e in report.epochs)
        lines.append(f"| {m} | {cells} |")
    return "\n".join(lines)
