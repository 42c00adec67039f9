"""The FEDORA ServerApp: relatedness once, then rounds of personalized propagation.

The server never holds client data. It

1. waits (bounded by ``connect-timeout``) until one SuperNode per client is online, asks each
   for its summary ``U_i`` (replies bounded by the larger of ``connect-timeout`` and
   ``round-timeout``: first contact includes app installation and partition building) and
   learns which node holds which client (``client-id``);
2. builds the similarity matrix, the top-k graph and the propagation matrix ``P`` with
   :mod:`secure_fedora.fedora` (the same calls as the in-process ``Fedora`` method);
3. every round, samples participants exactly as the in-process runtime does (same seed,
   same generator), sends every reachable client *its own* ``phi_i`` (participants train and
   return ``theta_i``; the others only store ``phi_i`` and report their accuracy), waits for
   replies (bounded by ``round-timeout``), then sets ``phi = P @ theta``.

Partial participation, matching the in-process runtime: a client that is offline, replies
with an error, or does not reply within the round timeout simply keeps its last ``theta_i``
on the server (its last received model); it still receives its ``phi_i`` whenever it is
reachable, and propagation always uses every client's last known ``theta``. Each such event
is logged with the round, client and node. In an evaluated round, a client that did not
report counts with its last reported accuracy (the initial model's, reported with its
summary, if it never reported); model selection is the in-process runtime's ``Tracker``
(the round with the best mean validation accuracy).

Results (``results.json``, ``progress.json``) are written atomically to ``result-dir`` on the
SuperLink host when it is set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from secure_fedora import __version__, fedora
from secure_fedora.client import FlatModel
from secure_fedora.config import ExperimentConfig
from secure_fedora.deploy.protocol import (
    MSG_ROUND,
    MSG_SUMMARY,
    DeployError,
    RunSettings,
    array_record_to_tensor,
    check_supported,
    tensor_to_array_record,
)
from secure_fedora.models import make_model
from secure_fedora.runtime import (
    NUM_CLASSES,
    Tracker,
    atomic_write_text,
    summarize,
)
from secure_fedora.runtime import sample_participants as runtime_sample_participants

__all__ = ["ExchangeTiming", "app", "sample_participants"]

app = ServerApp()


def _say(message: str) -> None:
    """Log a line to the run's log stream (stdout of the ServerApp process)."""
    print(f"[secure-fedora] {message}", flush=True)


def sample_participants(cfg: ExperimentConfig, generator: torch.Generator, n: int) -> list[int]:
    """The round's participants, drawn by the in-process runtime's own sampler.

    Calls the runtime's :func:`~secure_fedora.runtime.sample_participants` so that both
    runtimes draw identical participant sets from identical generator states (the generator is
    seeded ``seed + 7919`` in both).
    """
    return runtime_sample_participants(generator, n, cfg.training.participation)


@dataclass
class ExchangeTiming:
    """Wall-clock breakdown of one message exchange (all clocks on one host for local runs).

    ``deliver`` is push until the client's ClientApp process started (Flower's SuperNode pull
    interval plus process spawn), ``startup`` process start until the handler ran (imports),
    ``compute`` the handler itself, ``return_`` handler end until the server saw the reply
    (reply push plus the server's pull interval). Means over the clients that replied.
    """

    wall: float = 0.0
    deliver: float = 0.0
    startup: float = 0.0
    compute: float = 0.0
    return_: float = 0.0
    replies: int = 0

    def to_json(self) -> dict[str, float]:
        """Rounded seconds per component (``return_`` written as ``return``)."""
        return {k.rstrip("_"): round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class Exchange:
    """The outcome of sending one message to each of several nodes."""

    replies: dict[int, Message] = field(default_factory=dict)  # node id -> reply
    errors: dict[int, str] = field(default_factory=dict)  # node id -> reason
    missing: list[int] = field(default_factory=list)  # node ids without reply
    timing: ExchangeTiming = field(default_factory=ExchangeTiming)


def _exchange(
    grid: Grid, messages: dict[int, Message], timeout: float, poll: float
) -> Exchange:
    """Push ``messages`` (node id -> message) and pull replies until all came or time is up.

    Stops waiting for a node as soon as the SuperLink reports it offline (it returns an
    error reply for it). Never waits longer than ``timeout`` seconds.
    """
    result = Exchange()
    t_push = time.time()
    ids = list(grid.push_messages(list(messages.values())))
    node_of = dict(zip(ids, messages.keys(), strict=True))
    pending = set(ids)
    arrived: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            msg_id = reply.metadata.reply_to_message_id
            if msg_id not in pending:
                continue
            pending.discard(msg_id)
            node = node_of[msg_id]
            arrived[node] = time.time()
            if reply.has_error():
                result.errors[node] = f"{reply.error.code}: {reply.error.reason}"
            else:
                result.replies[node] = reply
        if pending:
            time.sleep(poll)
    result.missing = sorted(node_of[m] for m in pending)
    t = result.timing
    t.wall = time.time() - t_push
    parts = []
    for node, reply in result.replies.items():
        metrics = reply.content.get("metrics")
        if metrics is None or "t-process-start" not in metrics:
            continue
        p0, h0, h1 = (float(metrics[k]) for k in ("t-process-start", "t-handler-start", "t-handler-end"))
        parts.append((max(p0 - t_push, 0.0), h0 - p0, h1 - h0, max(arrived[node] - h1, 0.0)))
    if parts:
        t.replies = len(parts)
        t.deliver, t.startup, t.compute, t.return_ = (
            sum(col) / len(parts) for col in zip(*parts, strict=True)
        )
    return result


def _online(grid: Grid) -> set[int]:
    return set(grid.get_node_ids())


def _wait_for_nodes(grid: Grid, count: int, timeout: float, poll: float) -> list[int]:
    deadline = time.monotonic() + timeout
    nodes = _online(grid)
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(max(poll, 0.5))
        nodes = _online(grid)
    if len(nodes) < count:
        raise DeployError(
            f"only {len(nodes)} of {count} SuperNodes came online within {timeout:.0f} s"
        )
    return sorted(nodes)


@dataclass
class _Server:
    """Server-side FEDORA state for one run."""

    settings: RunSettings
    run_id: int
    node_of_client: dict[int, int] = field(default_factory=dict)
    theta: Tensor | None = None
    phi: Tensor | None = None
    prop: Tensor | None = None
    graph: Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    relatedness_timing: dict[str, float] = field(default_factory=dict)
    privacy: dict[int, dict[str, float]] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)

    @property
    def cfg(self) -> ExperimentConfig:
        """The run's experiment config."""
        return self.settings.experiment

    def event(self, rnd: int, client: int | None, node: int | None, what: str) -> None:
        """Record and log a partial-participation or failure event."""
        self.events.append({"round": rnd, "client": client, "node": node, "event": what})
        who = f"client {client} (node {node})" if client is not None else f"node {node}"
        _say(f"round {rnd}: {who}: {what}")

    def write(self, name: str, doc: dict[str, Any]) -> None:
        """Atomically write ``doc`` as JSON to ``result-dir/name`` (if a result-dir is set)."""
        if self.settings.result_dir is not None:
            atomic_write_text(self.settings.result_dir / name, json.dumps(doc, indent=2))


def _relatedness(grid: Grid, server: _Server, nodes: list[int]) -> tuple[Tensor, Tensor]:
    """Collect every client's summary; returns (initial val, initial test) accuracies."""
    cfg = server.cfg
    n = cfg.data.num_clients
    messages = {
        node: Message(
            RecordDict({"fedora": ConfigRecord({"config-hash": server.settings.config_hash})}),
            dst_node_id=node,
            message_type=MSG_SUMMARY,
            group_id="relatedness",
            ttl=max(server.settings.connect_timeout, server.settings.round_timeout) + 60.0,
        )
        for node in nodes
    }
    # The first contact is the slowest (each SuperNode installs the app, its ClientApp builds
    # the partition): it is bounded by the connect timeout rather than the round timeout.
    wait = max(server.settings.connect_timeout, server.settings.round_timeout)
    ex = _exchange(grid, messages, wait, server.settings.poll_interval)
    for node, reason in ex.errors.items():
        server.event(0, None, node, f"summary failed: {reason}")
    if ex.missing:
        server.event(0, None, None, f"no summary from nodes {ex.missing} in time")
    summaries: dict[int, Tensor] = {}
    val0 = torch.zeros(n)
    test0 = torch.zeros(n)
    d = 784 + NUM_CLASSES
    for node, reply in ex.replies.items():
        info = reply.content["client"]
        cid = info.get("client-id")
        if info.get("config-hash") != server.settings.config_hash:
            raise DeployError(f"node {node} answered for another config")
        if not isinstance(cid, int) or not 0 <= cid < n:
            raise DeployError(f"node {node} reported invalid client-id {cid!r}")
        if cid in server.node_of_client:
            raise DeployError(
                f"nodes {server.node_of_client[cid]} and {node} both hold partition-id {cid}"
            )
        server.node_of_client[cid] = node
        summaries[cid] = array_record_to_tensor(
            reply.content["summary"], "u", torch.float64, (d, cfg.fedora.q)
        )
        metrics = reply.content["metrics"]
        val0[cid] = float(metrics["val-accuracy"])
        test0[cid] = float(metrics["test-accuracy"])
        if "epsilon-spent" in metrics:
            server.privacy[cid] = {
                "epsilon_spent": float(metrics["epsilon-spent"]),
                "epsilon_budget": float(metrics["epsilon-budget"]),
                "ledger_entries": int(metrics["ledger-entries"]),
            }
    absent = [c for c in range(n) if c not in summaries]
    if absent:
        raise DeployError(
            f"relatedness needs every client's summary; missing clients {absent} "
            f"(nodes online: {nodes})"
        )
    overlaps = fedora.subspace_overlaps(torch.stack([summaries[c] for c in range(n)]))
    similarity = fedora.similarity_matrix(overlaps, cfg.fedora.tau)
    server.graph = fedora.topk_graph(similarity, cfg.fedora.k)
    if cfg.fedora.propagation == "power":
        server.prop = fedora.propagation_matrix_power(server.graph, cfg.fedora.alpha)
    else:
        server.prop = fedora.propagation_matrix(server.graph, cfg.fedora.alpha)
    server.relatedness_timing = ex.timing.to_json()
    _say(f"relatedness: graph over {n} clients built in {ex.timing.wall:.2f} s")
    return val0, test0


def _propagate(server: _Server) -> None:
    assert server.theta is not None and server.phi is not None and server.prop is not None
    if server.cfg.fedora.propagation == "power":
        server.phi.copy_(fedora.propagate_power(server.graph, server.theta, server.cfg.fedora.alpha))
    else:
        server.phi.copy_(fedora.propagate(server.prop, server.theta))


def _round(
    grid: Grid, server: _Server, rnd: int, participants: Iterable[int], tracker: Tracker
) -> dict[str, Any]:
    cfg = server.cfg
    assert server.theta is not None and server.phi is not None
    rounds = cfg.training.rounds
    do_eval = rnd % cfg.evaluation.every == 0 or rnd == rounds
    chosen = set(participants)
    online = _online(grid)
    messages: dict[int, Message] = {}
    client_of: dict[int, int] = {}
    for cid, node in sorted(server.node_of_client.items()):
        if node not in online:
            server.event(rnd, cid, node, "offline: keeps its last theta, phi not delivered")
            continue
        client_of[node] = cid
        content = RecordDict(
            {
                "phi": tensor_to_array_record("phi", server.phi[cid]),
                "round": ConfigRecord(
                    {
                        "round": rnd,
                        "participate": cid in chosen,
                        "evaluate": do_eval,
                        "config-hash": server.settings.config_hash,
                    }
                ),
            }
        )
        messages[node] = Message(
            content, dst_node_id=node, message_type=MSG_ROUND, group_id=str(rnd),
            ttl=server.settings.round_timeout + 60.0,
        )
    t0 = time.perf_counter()
    ex = _exchange(grid, messages, server.settings.round_timeout, server.settings.poll_interval)
    trained = 0
    lambdas: list[float] = []
    steps = 0
    p = server.theta.shape[1]
    for node, reason in ex.errors.items():
        server.event(rnd, client_of[node], node, f"error reply ({reason}): keeps its last theta")
    for node in ex.missing:
        server.event(rnd, client_of[node], node, "no reply in time: keeps its last theta")
    for node, reply in ex.replies.items():
        cid = client_of[node]
        metrics = reply.content["metrics"]
        if int(metrics["round"]) != rnd:
            server.event(rnd, cid, node, f"reply for round {metrics['round']} ignored")
            continue
        if "epsilon-spent" in metrics:
            server.privacy[cid] = {
                "epsilon_spent": float(metrics["epsilon-spent"]),
                "epsilon_budget": float(metrics["epsilon-budget"]),
                "ledger_entries": int(metrics["ledger-entries"]),
            }
        if cid in chosen and "theta" in reply.content:
            server.theta[cid].copy_(
                array_record_to_tensor(reply.content["theta"], "theta", torch.float32, (p,))
            )
            trained += 1
            lambdas.append(float(metrics["lambda"]))
            steps += int(metrics["steps"])
        elif cid in chosen:
            refusal = reply.content.get("refusal")
            reason = str(refusal["reason"]) if refusal is not None else "no model released"
            server.event(rnd, cid, node, f"refused its release ({reason}): keeps its last theta")
            server.refused.add(cid)
        if do_eval and int(metrics["eval-round"]) == rnd:
            tracker.last_val[cid] = float(metrics["val-accuracy"])
            tracker.last_test[cid] = float(metrics["test-accuracy"])
    if do_eval:
        tracker.update(rnd)
    _propagate(server)
    row: dict[str, Any] = {
        "method": "fedora",
        "round": rnd,
        "participants": len(chosen),
        "replied": trained,
        "steps": float(steps),
        "mean_lambda": float(sum(lambdas) / max(len(lambdas), 1)),
        "seconds": round(time.perf_counter() - t0, 4),
        "timing": ex.timing.to_json(),
    }
    if do_eval:
        row.update(
            test_mean=float(tracker.last_test.mean()),
            test_min=float(tracker.last_test.min()),
            val_mean=float(tracker.last_val.mean()),
            selected_mean=float(tracker.test_at_best.mean()),
            selected_round=int(tracker.best_round),
        )
    return row


def run_fedora(grid: Grid, settings: RunSettings, run_id: int) -> dict[str, Any]:
    """Run FEDORA over the grid; returns (and writes) the results document."""
    cfg = settings.experiment
    check_supported(cfg, settings.reproducible_dp_noise)
    torch.set_num_threads(settings.num_threads)
    n = cfg.data.num_clients
    server = _Server(settings=settings, run_id=run_id)
    started = time.time()
    _say(f"run {run_id}: waiting for {n} SuperNodes (config {settings.config_hash[:12]})")
    nodes = _wait_for_nodes(grid, n, settings.connect_timeout, settings.poll_interval)
    val0, test0 = _relatedness(grid, server, nodes)
    init = FlatModel(make_model(cfg.model.name, NUM_CLASSES, seed=cfg.seed)).initial_vector()
    server.theta = init.unsqueeze(0).repeat(n, 1)
    server.phi = server.theta.clone()
    tracker = Tracker.empty(n)
    tracker.last_val.copy_(val0)
    tracker.last_test.copy_(test0)
    round_gen = torch.Generator().manual_seed(cfg.seed + 7919)
    server.write("progress.json", {"run_id": run_id, "round": 0, "rows": []})
    for rnd in range(1, cfg.training.rounds + 1):
        participants = sample_participants(cfg, round_gen, n)
        row = _round(grid, server, rnd, participants, tracker)
        server.history.append(row)
        _say(
            f"round {rnd}/{cfg.training.rounds}: {row['replied']}/{row['participants']} "
            f"trained, {row['seconds']:.2f} s"
            + (f", mean test accuracy {row['test_mean']:.4f}" if "test_mean" in row else "")
        )
        server.write("progress.json", {"run_id": run_id, "round": rnd, "rows": server.history})
    results = {
        "name": cfg.name,
        "version": __version__,
        "runtime": "flower",
        "run_id": run_id,
        "config_hash": settings.config_hash,
        "assumptions": {
            "validation_data": cfg.data.validation,
            "relatedness": cfg.fedora.relatedness,
            "server": "honest-but-curious",
            "differential_privacy": cfg.privacy.enabled,
            "dp_noise": (
                None if not cfg.privacy.enabled
                else "os_random: each client seeds its generator from os.urandom (not a CSPRNG)"
                if cfg.privacy.noise_seed == "os_random"
                else "seeded from the experiment seed, which the server knows: no DP guarantee "
                "against the server (reproducible-dp-noise test deployment)"
            ),
            "transport": "TLS; node authentication is a SuperLink setting",
        },
        "privacy": (
            {
                "clients": [
                    {"client": c, **server.privacy.get(c, {}), "refused": c in server.refused}
                    for c in range(n)
                ],
                "note": "as last reported by each client; its signed ledger is the record",
            }
            if cfg.privacy.enabled
            else None
        ),
        "node_of_client": {str(c): str(nd) for c, nd in sorted(server.node_of_client.items())},
        "graph_neighbours": [torch.nonzero(r).flatten().tolist() for r in server.graph],
        "methods": {
            "fedora": {
                "name": "fedora",
                "selected": {
                    **summarize(tracker.test_at_best), "round": int(tracker.best_round)
                },
                "final": summarize(tracker.last_test),
                "rounds": cfg.training.rounds,
            }
        },
        "relatedness_timing": server.relatedness_timing,
        "rounds": server.history,
        "events": server.events,
        "seconds_total": round(time.time() - started, 3),
    }
    server.write("results.json", results)
    return results


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: validate the run config and run FEDORA."""
    settings = RunSettings.from_run_config(context.run_config)
    try:
        results = run_fedora(grid, settings, context.run_id)
    except Exception as err:
        if settings.result_dir is not None:
            atomic_write_text(
                settings.result_dir / "failure.json",
                json.dumps({"run_id": context.run_id, "error": f"{type(err).__name__}: {err}"}),
            )
        _say(f"run failed: {type(err).__name__}: {err}")
        raise
    mean = results["methods"]["fedora"]["selected"]["mean"]
    _say(f"run {context.run_id} finished: selected mean test accuracy {mean:.4f}")
