"""The generic ServerApp: the server half of any configured method, over Flower.

The server never holds client data. For a run it

1. waits (bounded by ``connect-timeout``) until one SuperNode per client is online and sends
   every node a first-contact ``query.hello``: each verified reply names the client the node
   holds (``client-id``), its split sizes and the data schema (input shape, classes), which
   every client must share; the server learns nothing else about the data (a client without
   an accepted reply is asked once more, at every online node that holds no identified
   client, so a SuperNode restarted under a new node id is found; one still without stops
   the run, naming it and its last event; a client whose data fails the checks against the run's model refuses, and
   the run stops naming it before any method message);
2. for each method of ``cfg.methods`` builds the method's algorithm object through the
   method registry with a context that holds no client data
   (:func:`~secure_fedora.runtimes.flower.contexts.server_context`) and drives the method
   contract (:mod:`secure_fedora.algorithms.contract`): the setup exchange
   (``setup_messages`` -> ``query.setup`` -> ``server_setup``), then every round samples the
   participants exactly as the in-process runtime does (same seed, same generator), sends
   ``configure``'s messages (``train.round``), hands the accepted replies to ``aggregate``
   (a round without an accepted reply is not aggregated, as in process), and,
   in evaluated rounds, sends every reachable client ``evaluation_messages``' payload
   (``evaluate.round``; the client evaluates its ``client_eval_row`` on its own validation and
   test data and reports the two metrics); after the last round the finalize exchange
   (``finalize_messages`` -> ``query.finalize`` -> ``server_finalize``). The setup and
   finalize exchanges hand the method every client's reply, as in process: a client that
   missed one is asked once more (it answers from its saved state, releasing nothing twice),
   and one still without an accepted reply stops the run (:func:`_every_reply`). Every stage
   finds a SuperNode that restarted under a new node id (its state directory kept): when a
   client's node is offline, and in every retry, the online nodes that hold no client are
   asked first which client they hold (a signed hello, :func:`_find_moved`); a reply
   authenticated as client ``c`` moves ``c`` to that node, an event of the method and round
   (the client's own checks of its node state still apply; two nodes answering as one client
   in one exchange stop the run);
3. writes one ``results.json`` (:func:`secure_fedora.runtimes.results.build_results`, the
   schema the in-process runtime writes, plus Flower's own keys), ``rounds.csv`` (after each
   method, :func:`secure_fedora.runtimes.results.write_rounds_csv`) and ``plots/*.png``
   (:func:`secure_fedora.runtimes.plots.write_plots`), the in-process runtime's writers,
   and, with DP, the signed ``anchor.json`` of the ledger heads the clients reported.

The runtime moves only payloads (``dict[str, Tensor]``, one ArrayRecord per message,
:mod:`secure_fedora.runtimes.flower.payloads`) and never branches on the method. A method
that needs a multi-step protocol instead of its setup exchange names it
(:meth:`~secure_fedora.algorithms.contract.FederatedAlgorithm.setup_ceremony`); the runtime
runs it from :data:`CEREMONIES` and hands the result to ``server_setup_from_ceremony``.
FEDORA's encrypted relatedness (``ckks_overlaps``: key ceremony at the key-holder client,
encrypted summaries, Gram rows on ciphertexts, decryption of the overlap blocks only) is one.

Every message is signed and every reply verified (:mod:`secure_fedora.runtimes.flower.envelopes`),
with the server identity and allowlist of ``identity-dir`` and the nonce memory in
``server-state-dir/runs/<run_id>/<scope>/`` (one scope for the first contact, one per
method: a method's envelope rounds are 0 for its setup, ``r`` for round ``r`` and its
evaluation, ``rounds + 1`` for its finalize exchange). The signed content names the method,
the exchange and the round, so no message is accepted in another method's or exchange's
place. A rejected reply (unknown sender, bad signature, tampered content, replay, stale
round, malformed or wrongly shaped payload, non-finite values) is logged, recorded in
``results["security"]["rejections"]``, and that client counts as not taking part, exactly as
an offline one, a client that replied with an error or not in time (``round-timeout``), or one
that refused a release under its privacy budget; each such event is logged with the method,
round, client and node and listed under ``results["events"]``. The method decides what an
absent reply means (its contract: "did not take part"); in an evaluated round a client that
did not report keeps its last reported metric (zero before its first), as the in-process
tracker does for model selection.

Results (``results.json``, ``rounds.csv``, ``plots/``, ``progress.json``) are written
atomically to ``result-dir`` on the SuperLink host when it is set; the temporary files of a
ServerApp killed while writing one of them are removed when the next run in that result-dir
starts (:func:`~secure_fedora.runtimes.results.remove_interrupted_result_writes`).

A ServerApp that dies is resumed (run config ``resume``: the id of the run to continue) from
its checkpoint ``result-dir/checkpoints/flower-server.pt`` (:data:`SERVER_CHECKPOINT`, written
after the first contact, each method's setup, each round and each method, with the head of
every scope's nonce memory): the checkpoint, and that each nonce file still holds the head it
recorded, are checked before anything is written (:func:`check_resumable`), the first contact is made
again, and the method in flight continues after its last checkpointed round, whose successor
is sent again; each node answers what it already answered from its saved state. A resume
after every method's outcome was checkpointed trains nothing: as in process
(:func:`~secure_fedora.runtimes.results.write_run_results`) it keeps ``results.json``,
``rounds.csv`` and ``anchor.json`` when they hold the run's outcome (the keys of
:data:`PROCESS_KEYS` aside) and writes a missing or damaged one again with a warning.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from privacy.accounting import format_exact
from privacy.ckks import InnerProductLayout, InnerProductUpload, context_parameters
from privacy.envelope import Envelope, EnvelopeError, EnvelopeStateError, check_nonce_memory
from privacy.identity import client_ids
from privacy.ledger import is_finite_number
from secure_fedora.algorithms.contract import (
    EVALUATE,
    FINALIZE,
    ROUND,
    SAT_OUT_PULL_DIVERGED,
    SETUP,
    DataFacts,
    Payload,
    ReplySchema,
    check_data_facts,
    check_finalize_results,
    check_messages,
    check_model_sizes,
    data_checked,
    method_class,
    model_size_checked,
    no_reply_statistics,
    round_statistics_of,
    server_half,
    with_sat_out_statistics,
)
from secure_fedora.core.config import MAX_THREADS, ExperimentConfig, model_selection
from secure_fedora.core.crashpoints import crash_point
from secure_fedora.core.files import strict_json
from secure_fedora.data.sources import combine_fingerprints
from secure_fedora.learning.client import PULL_DIVERGED, PULL_RESUME_HINT
from secure_fedora.learning.client import PULL_RESUME_COMMAND as IN_PROCESS_RESUME
from secure_fedora.learning.models import model_fingerprint
from secure_fedora.runtimes.flower.ceremony import (
    SealedContext,
    layout_for,
    public_context_digest,
)
from secure_fedora.runtimes.flower.contexts import DataSchema, build_algorithm, server_context
from secure_fedora.runtimes.flower.envelopes import (
    MessageSecurity,
    checked_array,
    server_nonce_path,
)
from secure_fedora.runtimes.flower.payloads import (
    PayloadLimits,
    payload_to_record,
    record_to_payload,
)
from secure_fedora.runtimes.flower.protocol import (
    CLIENT_ERRORS_MODES,
    HELLO_SCOPE,
    LOG_PREFIX,
    MECHANISM_NOISE_PREFIX,
    MSG_CEREMONY,
    MSG_DECRYPT,
    MSG_ENCRYPTED_SUMMARY,
    MSG_EVALUATE,
    MSG_FINALIZE,
    MSG_HELLO,
    MSG_ROUND,
    MSG_SETUP,
    PULL_RESUME_COMMAND,
    DeployError,
    RunSettings,
    apply_amendments,
    check_supported,
    deterministic_client_error,
    reports_pull_divergence,
    round_line,
    wire_round,
)
from secure_fedora.runtimes.flower.state import is_nonce_head
from secure_fedora.runtimes.inprocess import (
    CheckpointError,
    Tracker,
    atomic_write_text,
    load_checkpoint,
    metric_rounds,
    save_checkpoint,
    stale_clients,
    summarize,
    unmeasured_rounds,
    unrestorable,
)
from secure_fedora.runtimes.inprocess import sample_participants as runtime_sample_participants
from secure_fedora.runtimes.results import PROCESS_KEYS as _RUN_PROCESS_KEYS
from secure_fedora.runtimes.rundir import amendment_readers
from secure_fedora.secure.private import ledger_report_refusal as _ledger_report_refusal
from secure_fedora.secure.relatedness import (
    CorruptUploadsError,
    InvalidUploadsError,
    RowValuesError,
    SecureRelatednessError,
    check_sealed_signature,
    gram_rows,
    isolated_rows,
    open_server_context,
    parse_upload,
)
from secure_fedora.secure.transport import MalformedPayloadError, SenderMismatchError, log_rejection

__all__ = ["SERVER_CHECKPOINT", "ExchangeTiming", "ResumeRefused", "amendment_point", "app",
           "check_resumable", "evaluation_reports_statement", "new_amendments", "run_federation",
           "sample_participants"]

app = ServerApp()

#: How much of a client's refusal reason a DeployError repeats (one line).
MAX_REFUSAL_CHARS = 2000


def _say(message: str) -> None:
    """Log a line to the run's log stream (stdout of the ServerApp process)."""
    print(f"{LOG_PREFIX}{message}", flush=True)


def sample_participants(cfg: ExperimentConfig, generator: torch.Generator, n: int) -> list[int]:
    """The round's participants, drawn by the in-process runtime's own sampler.

    Calls the runtime's :func:`~secure_fedora.runtimes.inprocess.sample_participants` so that both
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


def _restamped(message: Message) -> Message:
    """``message`` with a fresh creation time, so its TTL counts from the push, not from when
    it was built (a message held back by the in-flight window would otherwise age)."""
    meta = message.metadata
    return Message(
        message.content,
        dst_node_id=meta.dst_node_id,
        message_type=meta.message_type,
        group_id=meta.group_id,
        ttl=meta.ttl,
    )


def _exchange(
    grid: Grid,
    messages: dict[int, Message],
    timeout: float,
    poll: float,
    max_in_flight: int = 0,
) -> Exchange:
    """Send ``messages`` (node id -> message), pull replies until all came or time is up.

    At most ``max_in_flight`` messages are outstanding at once (0: all are pushed at once);
    the next is pushed as soon as a reply (or an error, or a timeout) frees a slot, in node-id
    order. On a SuperNode every message starts its own ClientApp process, so the window bounds
    how many of those processes (each with torch loaded) run at the same time on a shared host.
    Each node gets ``timeout`` seconds from the push of its own message; the SuperLink's error
    reply for an offline node ends the wait for it at once.
    """
    result = Exchange()
    queue = sorted(messages.items())
    window = len(queue) if max_in_flight <= 0 else max_in_flight
    node_of: dict[str, int] = {}
    pushed_at: dict[int, float] = {}  # node -> wall clock of its push
    deadline: dict[str, float] = {}  # message id -> monotonic deadline
    arrived: dict[int, float] = {}
    pending: set[str] = set()
    t_start = time.time()

    def push_more() -> None:
        batch = queue[: max(window - len(pending), 0)]
        del queue[: len(batch)]
        if not batch:
            return
        now_wall, now_mono = time.time(), time.monotonic()
        ids = list(grid.push_messages([_restamped(msg) for _, msg in batch]))
        for msg_id, (node, _) in zip(ids, batch, strict=True):
            if not msg_id:  # Flower returns no id for a message the SuperLink did not take
                result.errors[node] = "the SuperLink did not accept the message"
                continue
            node_of[msg_id] = node
            pushed_at[node] = now_wall
            deadline[msg_id] = now_mono + timeout
            pending.add(msg_id)

    push_more()
    while pending or queue:
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
        now = time.monotonic()
        for msg_id in [m for m in pending if deadline[m] <= now]:
            pending.discard(msg_id)
            result.missing.append(node_of[msg_id])
        push_more()
        if pending:
            time.sleep(poll)
    result.missing.sort()
    t = result.timing
    t.wall = time.time() - t_start
    parts = []
    for node, reply in result.replies.items():
        stamps = _reply_timestamps(reply)
        if stamps is None:
            continue
        p0, h0, h1 = stamps
        parts.append((max(p0 - pushed_at[node], 0.0), h0 - p0, h1 - h0, max(arrived[node] - h1, 0.0)))
    if parts:
        t.replies = len(parts)
        t.deliver, t.startup, t.compute, t.return_ = (
            sum(col) / len(parts) for col in zip(*parts, strict=True)
        )
    return result


_TIMESTAMPS = ("t-process-start", "t-handler-start", "t-handler-end")


def _reply_timestamps(reply: Message) -> tuple[float, float, float] | None:
    """The ClientApp's process start, handler start and handler end a reply's metrics state
    (wall-clock seconds), or None when the reply does not state all three as finite numbers.

    Read before the reply's envelope is verified, so never trusted further than the timing
    breakdown: a reply with malformed timestamps is left out of it, and its content is then
    verified and checked like any other's (before, a missing key or a list value raised out of
    the exchange and stopped the ServerApp)."""
    metrics = reply.content.get("metrics")
    if not isinstance(metrics, MetricRecord) or "t-process-start" not in metrics:
        return None
    values = [metrics.get(k) for k in _TIMESTAMPS]
    if not all(is_finite_number(v) for v in values):
        return None
    p0, h0, h1 = (float(v) for v in values)
    return p0, h0, h1


def _online(grid: Grid) -> set[int]:
    return set(grid.get_node_ids())


def _await_clients(grid: Grid, server: _Server, clients: list[int]) -> None:
    """Wait up to the round timeout until the node of each of ``clients`` is online again or,
    for those still offline, as many online nodes hold no known client (a SuperNode
    restarting, perhaps under a new node id; a spare node, which identified no client, does
    not count), before a message is sent to them once more."""
    def ready() -> bool:
        online = _online(grid)
        away = sum(server.node_of_client[c] not in online for c in clients)
        return away <= len(online - set(server.node_of_client.values()) - server.spare)

    deadline = time.monotonic() + server.settings.round_timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(max(server.settings.poll_interval, 0.5))


def _find_moved(grid: Grid, server: _Server, rnd: int, spares_too: bool = False) -> None:
    """Ask every online node that holds no known client which client it holds (a signed
    first contact, ``query.hello``): a reply authenticated as client ``c`` (its signature, not
    the node id, says which) moves ``c`` to that node, an event of the current method and
    round ``rnd``. Its node state is the client's to check at the next message (a state
    older than what the server last received from it is refused and stops the run). A node
    reporting other data facts than the client's first contact stops the run; two nodes
    answering for one client in this exchange stop it too. A spare node (its first contact
    identified no client: an error, no reply in time or a rejected reply) is asked once per
    run, and again only when ``spares_too`` (a retry, the exchange's last chance)."""
    candidates = sorted(_online(grid) - set(server.node_of_client.values())
                        - (set() if spares_too else server.spare))
    if not candidates:
        return
    scope, before, sizes = server.scope, dict(server.node_of_client), dict(server.sizes)
    schemas: dict[int, DataSchema] = {}
    server.scope, server.event_at = HELLO_SCOPE, (scope, rnd)
    try:
        replies, _ = _first_contact(grid, server, candidates, MSG_HELLO, {}, record_moves=False)
        _take_hellos(server, replies, schemas)
        for cid in sorted(schemas):  # a malformed reply (a rejection) moves nothing
            if server.node_of_client[cid] != before[cid]:
                server.event(0, cid, server.node_of_client[cid],
                             _moved(MSG_HELLO, cid, server.node_of_client[cid], before[cid]))
    finally:
        server.scope, server.event_at = scope, None
    for cid in replies:
        if cid not in schemas:  # a malformed reply (a rejection): not moved
            server.node_of_client[cid] = before[cid]
            continue
        node, now = server.node_of_client[cid], server.sizes[cid]
        server.sizes[cid] = sizes[cid]
        if schemas[cid] != server.schema or now != sizes[cid]:
            raise DeployError(
                f"client {cid} answered from node {node} (was node {before[cid]}) with other "
                f"data facts ({schemas[cid]}, {now}) than at first contact ({server.schema}, "
                f"{sizes[cid]}): its data changed mid-run; the run stops")


def _await_unidentified(grid: Grid, server: _Server, identified: set[int],
                        count: int, until: float = 0.0) -> list[int]:
    """The online nodes but ``identified``, once ``count`` of them are not spare nodes (whose
    first contact just identified no client) or the round timeout passed (a SuperNode
    restarting, perhaps under a new node id), or ``until`` (a monotonic time) if later.
    Spare nodes are among the nodes returned (one may hold a client after all), but a spare
    does not end the wait."""
    def unidentified() -> list[int]:
        return sorted(_online(grid) - identified)

    deadline = max(time.monotonic() + server.settings.round_timeout, until)
    while len(set(unidentified()) - server.spare) < count and time.monotonic() < deadline:
        time.sleep(max(server.settings.poll_interval, 0.5))
    return unidentified()


def _wait_for_nodes(grid: Grid, count: int, timeout: float, poll: float) -> list[int]:
    """The online nodes, once ``count`` are online (DeployError after ``timeout`` seconds).
    A spare node (registered, holding no client of the run) counts here, as nothing tells it
    apart before its first contact: :func:`_hello` then waits for the clients' own nodes until
    the rest of the same connect timeout."""
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
    """Server-side state of one Flower run (every method)."""

    settings: RunSettings
    run_id: int
    history: list[dict[str, Any]] = field(default_factory=list)
    securities: dict[str, MessageSecurity] = field(default_factory=dict)
    scope: str = HELLO_SCOPE
    # the method scope and round a first contact sent mid-run records its events under
    # (_find_moved), while its envelopes are the first contact's
    event_at: tuple[str, int] | None = None
    node_of_client: dict[int, int] = field(default_factory=dict)
    nodes: list[int] = field(default_factory=list)  # the nodes online at the start
    asked: set[int] = field(default_factory=set)  # every node sent a first contact
    # the nodes whose first contact identified no client (an error, no reply in time or a
    # rejected reply): a registered SuperNode that holds no client of the run, asked again in
    # retries only
    spare: set[int] = field(default_factory=set)
    sizes: dict[int, dict[str, Any]] = field(default_factory=dict)
    # what each client's error texts tell this server, as its hello reply states it
    client_errors: dict[int, str] = field(default_factory=dict)
    # the device and torch threads each client trains on, as its hello replies state them
    # (each distinct statement once, in order: a node that took a client over mid-run may
    # state others)
    client_compute: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # a resume from a checkpoint that did not record ``client_compute`` (an older ServerApp's):
    # what the clients stated before it is unknown
    compute_before_resume_unknown: bool = False
    # without DP, each client's data fingerprint as its hello reply states it (results.json's
    # data_fingerprint combines them); a later statement must be the same
    data_fingerprints: dict[int, str] = field(default_factory=dict)
    schema: DataSchema | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    # per method, each client refused a release: the round of its first refusal (-1: refused
    # before a resume of a checkpoint that recorded no round)
    refused: dict[str, dict[int, int]] = field(default_factory=dict)
    # per method, every refused release as the client's signed refusal gave it: round, client
    # index and reason (results.json's privacy.<method>.events)
    refusals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # per method under DP: the accountant choice and plans, calibrated from the config as each
    # client calibrates its own (check_budget_plans), for results.json's privacy section
    plans: dict[str, Any] = field(default_factory=dict)
    # per PRV method, the plans without PRV's refining pass, once a client reported them
    unrefined_plans: dict[str, Any] = field(default_factory=dict)
    # per method, the fingerprint of the model this server builds for the run's config (as
    # the in-process runtime records it): results.json's privacy section holds it, under the
    # anchor's digest, so that an audit checks each node's model.json against signed data
    model_fingerprints: dict[str, str] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    # Kept for the encrypted relatedness ceremony (secure_fedora.runtimes.flower.ceremony).
    relatedness_timing: dict[str, Any] = field(default_factory=dict)
    relatedness_details: dict[str, Any] = field(default_factory=dict)
    ckks_context: Any = None  # the public CKKS context (encrypted modes); never a secret key
    # per method, the clients whose setup reply a setup ceremony accepted (an encrypted
    # summary): the method's run records them as answered-setup, as it does a setup exchange's
    ceremony_answered: dict[str, set[int]] = field(default_factory=dict)
    # the relatedness matrix the plots draw (the first method's that holds one, e.g. FEDORA's P)
    relatedness: Tensor | None = None
    # the finished methods' ``methods.<name>`` entries, and when the run started (wall clock;
    # a resumed run's counts the time before its checkpoint)
    outcomes: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    # per method under DP, each resume of the ServerApp that continued it (results.json's
    # ``privacy.<method>.resumes``, as in process; checkpointed, so later resumes keep them)
    resumes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # per scope, the nonce memory the checkpoint this run resumed from recorded: the scope's
    # nonce file must still hold it when it is opened (check_resumable checked them all)
    nonce_heads: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def cfg(self) -> ExperimentConfig:
        """The run's experiment config."""
        return self.settings.experiment

    @property
    def client_ids(self) -> list[str]:
        """Party ids of the federation's clients, by client index."""
        return client_ids(self.cfg.data.num_clients)

    @property
    def security(self) -> MessageSecurity:
        """The signing identity and nonce memory of the current scope (first contact or a
        method), opened on first use."""
        if self.scope not in self.securities:
            s = self.settings
            self.securities[self.scope] = MessageSecurity.for_server(
                s.identity_dir, _scope_dir(s.server_state_dir, self.run_id, self.scope),
                self.run_id, s.config_hash, self.cfg.data.num_clients,
                self.nonce_heads.get(self.scope))
        return self.securities[self.scope]

    def recorded_nonce_heads(self) -> dict[str, dict[str, Any]]:
        """Every scope's nonce memory as it is now (scopes not opened since the resume: as
        recorded), for the checkpoint."""
        return {**self.nonce_heads, **{scope: security.verifier.nonce_head()
                                       for scope, security in self.securities.items()}}

    def _where(self, rnd: int) -> tuple[str | None, int]:
        scope, rnd = self.event_at or (self.scope, rnd)
        return (None if scope == HELLO_SCOPE else scope), rnd

    def event(self, rnd: int, client: int | None, node: int | None, what: str) -> None:
        """Record and log a partial-participation or failure event."""
        method, rnd = self._where(rnd)
        self.events.append({"method": method, "round": rnd, "client": client, "node": node,
                            "event": what})
        who = f"client {client} (node {node})" if client is not None else f"node {node}"
        where = "" if method is None else f"{method} "
        _say(f"{where}round {rnd}: {who}: {what}")

    def refusal(self, rnd: int, client: int, node: int | None, reason: str, then: str) -> None:
        """Record (an event, and under the method's refusals) and log that ``client`` refused
        its release of round ``rnd`` for ``reason``; ``then``: what the run does about it."""
        method, at = self._where(rnd)
        self.event(rnd, client, node, f"refused its release ({reason}): {then}")
        if method is not None:
            self.refusals.setdefault(method, []).append(
                {"round": at, "client": client, "detail": reason})

    def reject(
        self, rnd: int, client: int | None, node: int | None, error: EnvelopeError, then: str
    ) -> None:
        """Record a rejected message (already logged on the security logger) and log it."""
        method, at = self._where(rnd)
        self.rejections.append({
            "method": method, "round": at, "client": client, "node": node, "reason": error.reason,
            "sender": error.sender, "detail": error.detail,
        })
        self.event(rnd, client, node, f"message rejected ({error.reason}: {error.detail}): {then}")

    def sign(
        self, content: RecordDict, message_type: str, recipients: list[str], rnd: int
    ) -> RecordDict:
        """Sign ``content`` for ``recipients`` (one envelope each)."""
        return self.security.sign(content, message_type, recipients, rnd, reply=False)

    def accept(
        self, rnd: int, node: int, reply: Message, message_type: str, client: int | None,
        then: str, *, expected_round: int | None = None,
    ) -> Envelope | None:
        """Verify ``reply``'s envelope (from ``client``, or any allowlisted client when None)
        for envelope round ``expected_round`` (default ``rnd``, the round events name); a
        rejection is recorded and logged and returns None."""
        expected = self.client_ids[client] if client is not None else None
        try:
            return self.security.verify(
                reply.content, message_type, reply=True,
                expected_round=rnd if expected_round is None else expected_round,
                expected_sender=expected)
        except EnvelopeError as err:
            self.reject(rnd, client, node, err, then)
            return None

    def write(self, name: str, doc: dict[str, Any]) -> None:
        """Atomically write ``doc`` as strict JSON (:func:`~secure_fedora.core.files.strict_json`:
        a NaN or infinity is null, named under ``non_finite_values``) to ``result-dir/name``
        (if a result-dir is set)."""
        if self.settings.result_dir is not None:
            atomic_write_text(self.settings.result_dir / name, strict_json(doc))


def _scope_dir(server_state_dir: Path, run_id: int, scope: str) -> Path:
    """The folder of the ServerApp's nonce memory of ``scope`` in run ``run_id``."""
    return server_state_dir / "runs" / str(run_id) / scope


def _malformed(envelope: Envelope, detail: str) -> EnvelopeError:
    """A logged rejection for an authenticated reply whose content is not what was asked for."""
    return log_rejection(MalformedPayloadError(
        detail, sender=envelope.sender, round=envelope.round, kind=envelope.kind,
        recipient=envelope.recipient))


def _relatedness_wait(server: _Server) -> float:
    # The first contact is the slowest (each SuperNode installs the app, its ClientApp builds
    # the partition): it is bounded by the connect timeout rather than the round timeout.
    return max(server.settings.connect_timeout, server.settings.round_timeout)


def _relatedness_message(
    server: _Server, node: int, message_type: str, content: RecordDict, recipients: list[str],
    rnd: int = 0,
) -> Message:
    return Message(
        server.sign(content, message_type, recipients, rnd),
        dst_node_id=node,
        message_type=message_type,
        group_id=f"{server.scope}:setup:0",
        ttl=_relatedness_wait(server) + 60.0,
    )


def _first_contact(
    grid: Grid, server: _Server, nodes: list[int], message_type: str, extra: dict[str, Any],
    record_moves: bool = True,
) -> tuple[dict[int, tuple[Message, Envelope]], ExchangeTiming]:
    """Send ``message_type`` to every node, learn (or confirm) which node holds which client.

    The request carries one envelope per client id (the server may not know yet who is
    where); each verified reply names its client, which must be the client that signed it.
    Returns the accepted replies and their envelopes by client index. Two nodes answering for
    one client stop the run (a misconfigured federation); rejected replies are logged and
    count as missing. A client answering from another node than the one it was known at is
    an event ("now at node X"), unless ``record_moves`` is False (the caller records the
    moves it takes once it checked the replies' content).

    Every hello exchange is signed at an epoch of its own (:func:`_hello_epoch`) and accepts
    only replies of that epoch, so a hello reply replayed from an earlier exchange is refused
    as stale and the first contact's nonce memory keeps one exchange's nonces at most.
    """
    conf = ConfigRecord({"config-hash": server.settings.config_hash,
                         **_amendments_field(server), **extra})
    record = "run" if message_type == MSG_HELLO else "fedora"
    rnd = _hello_epoch(server) if message_type == MSG_HELLO else 0
    messages = {
        node: _relatedness_message(
            server, node, message_type, RecordDict({record: conf}), server.client_ids, rnd
        )
        for node in nodes
    }
    ex = _exchange(grid, messages, _relatedness_wait(server), server.settings.poll_interval,
                   server.settings.max_in_flight)
    server.asked |= set(nodes)
    client_at = {node: cid for cid, node in server.node_of_client.items()}  # known before
    for node, reason in ex.errors.items():
        server.event(0, client_at.get(node), node, f"{message_type} failed: {reason}")
        server.spare.add(node)
    for node in ex.missing:
        server.event(0, client_at.get(node), node, f"no {message_type} reply in time")
        server.spare.add(node)
    n = server.cfg.data.num_clients
    accepted: dict[int, tuple[Message, Envelope]] = {}
    seen: dict[int, int] = {}
    for node, reply in sorted(ex.replies.items()):
        envelope = server.accept(0, node, reply, message_type, None, "not identified",
                                 expected_round=rnd)
        if envelope is None:
            server.spare.add(node)
            continue
        info = reply.content["client"] if "client" in reply.content else None
        cid = info.get("client-id") if isinstance(info, ConfigRecord) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid < n:
            raise DeployError(f"node {node} reported invalid client-id {cid!r}")
        if info.get("config-hash") != server.settings.config_hash:
            raise DeployError(f"node {node} answered for another config")
        if envelope.sender != server.client_ids[cid]:
            server.reject(0, cid, node, log_rejection(SenderMismatchError(
                f"reply for client {cid} is signed by {envelope.sender!r}",
                sender=envelope.sender, round=0, kind=envelope.kind, recipient="server")),
                "not identified")
            server.spare.add(node)
            continue
        if cid in seen:
            raise DeployError(f"nodes {seen[cid]} and {node} both hold partition-id {cid}")
        known = server.node_of_client.get(cid)
        if known is not None and known != node and record_moves:
            # the client's signature says who answers: its SuperNode restarted under a new
            # node id (two live nodes answering for one client in one exchange stop the run)
            server.event(0, cid, node, _moved(message_type, cid, node, known))
        seen[cid] = node
        server.spare.discard(node)
        server.node_of_client[cid] = node
        accepted[cid] = (reply, envelope)
    return accepted, ex.timing


def _hello_epoch(server: _Server) -> int:
    """The envelope round of a new hello exchange: one above the first contact's oldest
    accepted round, made that round durably (and the nonces of earlier exchanges dropped)
    before anything is signed, so no epoch is signed twice, also across a restart."""
    verifier = server.security.verifier
    epoch = verifier.round_floor + 1
    verifier.advance_floor(epoch)
    return epoch


def _moved(message_type: str, cid: int, node: int, was: int) -> str:
    return f"{message_type}: client {cid} now at node {node} (was node {was})"


def _reported_head(reply: Message) -> dict[str, Any]:
    """The ledger head a client reported with its reply (covered by the reply's signed
    envelope): ``{"ledger_head": hex, "ledger_entries": n}``; empty when it reported none.
    Raises ValueError for a malformed record (the reply is then rejected as malformed)."""
    if "ledger" not in reply.content:
        return {}
    record = reply.content["ledger"]
    head = record.get("head") if isinstance(record, ConfigRecord) else None
    entries = record.get("entries") if isinstance(record, ConfigRecord) else None
    if not isinstance(head, str) or len(head) != 64 or set(head) - set("0123456789abcdef") \
            or isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
        raise ValueError("ledger record must hold entries (int) and head (64 hex digits)")
    return {"ledger_head": head, "ledger_entries": entries}


def _reported_privacy(server: _Server, reply: Message, metrics: MetricRecord, client: int, *,
                      required: bool) -> dict[str, Any] | None:
    """The spending, ledger state and plan a client reported with ``reply`` (its signed
    ``metrics`` and ledger record), or None where it reported none and ``required`` is False.

    Raises ValueError (the reply is then rejected as malformed, nothing of it recorded) for a
    report in a run without DP (no client of such a run keeps a ledger), a reply of a DP run
    that lacks it where ``required`` (every reply of a DP method exchange carries it), an
    ``epsilon-spent`` that is not a finite number >= 0 or exceeds the budget, an
    ``epsilon-budget`` that is not a finite number > 0 or is not ``client``'s budget in the
    config, a ``ledger-entries`` that
    is not an integer >= 0 or not the ledger record's entry count, or a malformed ledger
    record (:func:`_reported_head`, :func:`_reported_plan`)."""
    from secure_fedora.secure.private import client_budget

    if not server.cfg.privacy.enabled:
        if "epsilon-spent" in metrics or "ledger" in reply.content:
            raise ValueError("reply reports a privacy ledger, but the run has no DP")
        return None
    if "epsilon-spent" not in metrics:
        if required:
            raise ValueError("reply of a DP run lacks its epsilon-spent report")
        return None
    spent, budget, entries = (metrics.get(k) for k in
                              ("epsilon-spent", "epsilon-budget", "ledger-entries"))
    if not is_finite_number(spent) or spent < 0:
        raise ValueError(f"epsilon-spent must be a finite number >= 0, not {spent!r}")
    if not is_finite_number(budget) or budget <= 0:
        raise ValueError(f"epsilon-budget must be a finite number > 0, not {budget!r}")
    entries = _count(entries, "ledger-entries", 0)
    configured = float(client_budget(server.cfg, client).epsilon)
    if float(budget) != configured:  # results.json would state it as the client's budget
        raise ValueError(f"epsilon-budget {budget!r} is not the client's configured budget "
                         f"{configured!r}")
    if float(spent) > configured:  # its gate refuses every release that would pass the budget
        raise ValueError(f"epsilon-spent {spent!r} exceeds the client's budget {configured!r}")
    head = _reported_head(reply)
    if head and head["ledger_entries"] != entries:  # the record's count would be recorded
        raise ValueError(f"ledger record's entries {head['ledger_entries']} differ from "
                         f"ledger-entries {entries}")
    return {"epsilon_spent": float(spent), "epsilon_budget": float(budget),
            "ledger_entries": entries, **head, **_reported_plan(reply)}


def _reported_repeat(reply: Message) -> bool:
    """Whether a client's ledger record (signed with its reply) says the reply's release is
    one its node made before: its answer sent again from the node's saved state, or re-made
    from its journal record (same noise, accounted once). False when the record says nothing
    (a fresh release, or a ClientApp older than the field); ValueError when malformed."""
    record = reply.content["ledger"] if "ledger" in reply.content else None
    if not isinstance(record, ConfigRecord) or "repeated" not in record:
        return False
    if record["repeated"] is not True:
        raise ValueError("ledger record's repeated must be true when present")
    return True


def _record_resume(server: _Server, current: Mapping[str, Any] | None) -> None:
    """List this resume under ``privacy.<method>.resumes`` of the method it continues (the
    checkpoint's method in flight, else the first unfinished one; none when every method
    finished): ``after_round`` is the round of the checkpoint it continues after (0: the
    method's setup; None: from the start, its setup not checkpointed). Clients that report a
    release of the first round it sends again as one made before are added to
    ``remade_from_journal`` as they answer (:func:`_record_repeat`)."""
    if current is not None:
        name, after = str(current["method"]), int(current["round"])
    else:
        name = next((m for m in server.cfg.methods if m not in server.outcomes), "")
        after = None
    if name:
        server.resumes.setdefault(name, []).append(
            {"after_round": after, "remade_from_journal": []})


def _record_repeat(server: _Server, name: str, rnd: int, cid: int) -> None:
    """Client ``cid`` reported its release of round ``rnd`` (0: the setup) of method
    ``name`` as one its node made before: recorded under the latest resume when ``rnd`` is
    the first round that resume sent again (the only one whose releases the interruption can
    have made; a repeat in a later round is a message delivered twice in a live run)."""
    rows = server.resumes.get(name)
    if not rows:
        return
    last = rows[-1]
    if rnd != (0 if last["after_round"] is None else last["after_round"] + 1):
        return
    remade = last["remade_from_journal"]
    entry = next((r for r in remade if r["round"] == rnd), None)
    if entry is None:
        entry = {"round": rnd, "clients": []}
        remade.append(entry)
    who = server.client_ids[cid]
    if who not in entry["clients"]:
        entry["clients"] = sorted([*entry["clients"], who], key=server.client_ids.index)


#: the plan fields a client reports in its signed ledger record, by results.json's name
_PLAN_FIELDS = {"noise-multiplier": "noise_multiplier", "summary-noise": "summary_noise",
                "lambda-noise": "lambda_noise"}


def _reported_plan(reply: Message) -> dict[str, Any]:
    """The plan a client reported with its ledger record (covered by the reply's signed
    envelope): ``{"noise_multiplier", "accountant"}`` and ``summary_noise`` / ``lambda_noise``
    where its method releases those; empty when it reported none (a ClientApp older than the
    field: results.json then states the config's calibration for it, marked
    ``plan_reported: false``). Raises ValueError for a malformed record."""
    if "ledger" not in reply.content:
        return {}
    record = reply.content["ledger"]
    if not isinstance(record, ConfigRecord):
        return {}
    if "noise-multiplier" not in record:
        stated = sorted(k for k in record.keys() if k in _PLAN_FIELDS or k == "accountant"
                        or k.startswith(MECHANISM_NOISE_PREFIX))
        if stated:  # part of a plan: neither the plan nor a record without one
            raise ValueError(f"ledger record states {stated} without noise-multiplier")
        return {}
    plan: dict[str, Any] = {}
    for key, name in _PLAN_FIELDS.items():
        if key in record:
            value = record[key]
            if not is_finite_number(value) or value <= 0:
                raise ValueError(f"ledger record's {key} must be a positive number")
            plan[name] = float(value)
    for key in record.keys():
        if key.startswith(MECHANISM_NOISE_PREFIX):
            value = record[key]
            if not is_finite_number(value) or value <= 0:
                raise ValueError(f"ledger record's {key} must be a positive number")
            plan.setdefault("mechanism_noise", {})[key[len(MECHANISM_NOISE_PREFIX):]] = \
                float(value)
    accountant = record.get("accountant")
    if not isinstance(accountant, str) or not accountant:
        raise ValueError("ledger record's accountant must be a non-empty string")
    plan["accountant"] = accountant
    return plan


def _config_plans(server: _Server, name: str) -> list[tuple[bool, Any]]:
    """The plans the config admits for method ``name``: ``(prv_refine, plans by budget)``,
    the run's calibration first and, under PRV, the calibration without PRV's refining pass
    (a run ledgered before it keeps that plan on resume; calibrated once, when needed)."""
    choice, plans = server.plans[name]
    out = [(True, plans)]
    if choice.name == "prv":
        if name not in server.unrefined_plans:
            from secure_fedora.secure.private import check_budget_plans

            server.unrefined_plans[name] = check_budget_plans(
                server.cfg, name, server.cfg.data.num_clients, prv_refine=False)[1]
        out.append((False, server.unrefined_plans[name]))
    return out


def _same_plan(plan: Any, reported: Mapping[str, Any]) -> bool:
    """Whether ``reported`` (a client's plan) states ``plan``'s noise for every mechanism, as
    the same floats: results.json's plan rows then state exactly what each ledger records."""
    def same(a: float | None, b: float | None) -> bool:
        return a is None and b is None or (a is not None and b is not None and a == b)
    return (same(plan.dpsgd_noise, reported.get("noise_multiplier"))
            and same(plan.summary_noise, reported.get("summary_noise"))
            and same(plan.lambda_noise, reported.get("lambda_noise"))
            and dict(plan.mechanism_noise) == reported.get("mechanism_noise", {}))


def _plan_used(server: _Server, name: str, cid: int, reported: Mapping[str, Any]) -> bool:
    """Which admitted plan client ``cid`` reported for method ``name``: True for the run's
    calibration (also when it reported none), False for PRV without its refining pass.

    A reported plan the config does not admit (another accountant or other noise: a node
    running another version or calibration) is refused with a DeployError and the run stops,
    rather than recorded: the release it came with has left, but results.json states one plan
    per budget (``plan``) and its planned epsilon, and a privacy auditor must be able to trust
    that every figure there is one the config implies and the clients used. A plan the config
    admits but the run did not calibrate (a PRV run ledgered before PRV's refining pass and
    resumed: its clients rightly keep their ledgers' plan) is recorded, per client, so that
    results.json never states noise the clients did not use."""
    from secure_fedora.secure.private import client_budget

    if "noise_multiplier" not in reported:  # none reported: the config's calibration
        return True
    choice, plans = server.plans[name]
    who = f"{name}: client {server.client_ids[cid]}"
    if reported["accountant"] != choice.name:
        raise DeployError(
            f"{who} reports its releases accounted under {reported['accountant']!r}, the run "
            f"plans {choice.name!r}: its node runs another version or configuration; the run "
            "stops (run every node and the server on one version)")
    budget = client_budget(server.cfg, cid)
    key = (budget.epsilon, budget.delta)
    if _same_plan(plans[key], reported):  # the common case: no second calibration
        return True
    options = _config_plans(server, name)
    for refine, admitted in options:
        if _same_plan(admitted[key], reported):
            return refine
    # each side states every mechanism's noise: a client differing in its summary or lambda
    # noise only would otherwise read as the same figure on both sides
    stated = " or ".join(_noise_text(admitted[key].dpsgd_noise, admitted[key].summary_noise,
                                     admitted[key].lambda_noise,
                                     dict(admitted[key].mechanism_noise))
                         for _, admitted in options)
    said = _noise_text(reported["noise_multiplier"], reported.get("summary_noise"),
                       reported.get("lambda_noise"), reported.get("mechanism_noise"))
    raise DeployError(
        f"{who} reports {said}, the config calibrates {stated} for its budget: its node runs "
        "another version or configuration; the run stops (run every node and the server on "
        "one version)")


def _take_ledger_report(server: _Server, name: str, cid: int, node: int,
                        privacy: dict[str, Any], reply: str) -> None:
    """Record ``privacy`` (the ledger state and plan client ``cid`` reported, signed, with
    its ``reply`` for method ``name``) as the last one seen from it, after the checks every
    reply carrying a ledger record gets: a ledger that went back from the one recorded
    (:func:`~secure_fedora.secure.private.ledger_went_back`) or a plan the config does not
    admit (:func:`_plan_used`) stops the run with a DeployError naming the client, as does
    another epsilon for the ledger state recorded
    (:func:`~secure_fedora.secure.private.ledger_spend_changed`), and nothing of the reply
    is recorded."""
    problem = _ledger_report_refusal(
        server.privacy.get(name, {}).get(cid), privacy,
        who=f"{name}: client {server.client_ids[cid]} (node {node})", where=reply,
        went_back_remedy="restore the node's state-dir, or start a new run",
        spend_remedy="run every node and the server on one version, or start a new run")
    if problem is not None:
        raise DeployError(problem)
    _plan_used(server, name, cid, privacy)
    server.privacy.setdefault(name, {})[cid] = privacy


def _noise_text(noise: float | None, summary: float | None, lam: float | None,
                plug_ins: Mapping[str, float] | None = None) -> str:
    extra = "".join(f", {m} {v!r}" for m, v in sorted((plug_ins or {}).items()))
    return f"noise multiplier {noise!r} (summary {summary!r}, lambda {lam!r}{extra})"


def _last_events(server: _Server, clients: list[int], nodes: list[int]) -> str:
    """The last event of the current scope (the first contact or a method) of each of
    ``clients``, then of each of ``nodes`` that holds no known client, as
    ``"client 1: ...; node 1002: ..."`` (empty when none has one)."""
    method = None if server.scope == HELLO_SCOPE else server.scope
    client_at = {node: cid for cid, node in server.node_of_client.items()}
    last: dict[int, str] = {}
    last_of_node: dict[int, str] = {}
    for e in server.events:
        if e.get("method") != method:
            continue
        cid = e.get("client")
        cid = client_at.get(e.get("node")) if cid is None else cid
        if cid is not None:
            last[cid] = e["event"]
        elif e.get("node") is not None:
            last_of_node[e["node"]] = e["event"]
    return "; ".join([f"client {c}: {last[c]}" for c in clients if c in last]
                     + [f"node {nd}: {last_of_node[nd]}" for nd in nodes
                        if nd in last_of_node and nd not in client_at])


def _require_all(server: _Server, have: Any, nodes: list[int], what: str,
                 asked_twice: bool = False) -> None:
    """Stop the run unless every client is in ``have``: a DeployError naming the missing
    clients, the nodes that never identified themselves and their last events."""
    absent = [c for c in range(server.cfg.data.num_clients) if c not in have]
    if absent:
        unknown = [nd for nd in nodes if nd not in server.node_of_client.values()]
        why = _last_events(server, absent, unknown)
        raise DeployError(
            f"the run needs every client's {what}; missing clients {absent} "
            f"({'asked twice; ' if asked_twice else ''}nodes online: {nodes}"
            + (f"; no client identified at nodes {unknown}" if unknown else "") + ")"
            + (f"; their last events: {why}" if why else "")
        )


def _take_metrics(
    server: _Server, cid: int, reply: Message, envelope: Envelope, val0: Tensor, test0: Tensor
) -> bool:
    """Initial metrics of a ceremony reply, when it carries them; False if malformed."""
    metrics = reply.content["metrics"] if "metrics" in reply.content else None
    try:
        if not isinstance(metrics, MetricRecord):
            raise KeyError("metrics")
        if "val-accuracy" in metrics:
            val0[cid], test0[cid] = float(metrics["val-accuracy"]), float(metrics["test-accuracy"])
    except (KeyError, TypeError, ValueError) as err:
        server.reject(0, cid, server.node_of_client.get(cid),
                      _malformed(envelope, f"reply lacks metrics ({err})"),
                      "no relatedness from it")
        return False
    return True


def _amendments_field(server: _Server) -> dict[str, str]:
    """What a signed message says of the run's config amendments: their digest
    (:meth:`RunSettings.amendments_digest`) where there are any, nothing otherwise (a run
    without amendments sends what it always sent); a client refuses a message whose digest is
    not that of the amendments its own run config holds."""
    digest = server.settings.amendments_digest()
    return {"amendments": digest} if digest else {}


def _addressed(
    server: _Server, cid: int, message_type: str, content: RecordDict
) -> tuple[int, Message]:
    node = server.node_of_client[cid]
    content["fedora"] = ConfigRecord({"config-hash": server.settings.config_hash,
                                      **_amendments_field(server)})
    return node, _relatedness_message(
        server, node, message_type, content, [server.client_ids[cid]]
    )


def _take_uploads(
    grid: Grid, server: _Server, sealed: dict[int, SealedContext], client_of: dict[int, int],
    uploads: dict[int, list[InnerProductUpload]], envelopes: dict[int, Envelope],
    upload_bytes: dict[int, int], val0: Tensor, test0: Tensor, timing: dict[str, Any],
    refused: set[int],
) -> None:
    """Ask the clients of ``sealed`` (client -> its sealed CKKS context, with the key holder's
    signature and the public context's digest, which the client checks) for ``Enc(U_i)``; add
    each accepted upload (and its envelope and size) to ``uploads`` and each client whose
    budget refused its summary (a signed refusal, its text an event) to ``refused``; the others
    are events or rejections. An error reply that the same message raises again on every try
    (its rows do not determine a summary, its data fails a check) stops the run at once
    (:func:`_stop_for_refusals`)."""
    cfg = server.cfg
    assert server.schema is not None  # known since the first contact
    layout, q = layout_for(cfg, server.schema), cfg.fedora.q
    messages = dict(
        _addressed(server, cid, MSG_ENCRYPTED_SUMMARY, RecordDict({"ckks": ConfigRecord({
            "sealed-context": given.blob, "context-signature": given.signature,
            "public-context-digest": given.public_digest, "num-vectors": layout.num_vectors,
            "dim": layout.dim})}))
        for cid, given in sealed.items()
    )
    ex = _exchange(grid, messages, _relatedness_wait(server), server.settings.poll_interval,
                   server.settings.max_in_flight)
    timing.setdefault("encrypted_summary", ex.timing.to_json())
    for node, reason in ex.errors.items():
        server.event(0, client_of[node], node, f"encrypted summary failed: {reason}")
    _stop_for_refusals(server, server.scope, "encrypted summary",
                       {client_of[node]: reason for node, reason in ex.errors.items()},
                       "relatedness needs every client's summary, so the run stops")
    for node in ex.missing:
        server.event(0, client_of[node], node, "no encrypted summary in time")
    for node, reply in ex.replies.items():
        cid = client_of[node]
        env = server.accept(0, node, reply, MSG_ENCRYPTED_SUMMARY, cid, "no relatedness from it")
        if env is None:
            continue
        if "refusal" in reply.content:
            refusal = reply.content["refusal"]
            reason = (refusal.get("reason") if isinstance(refusal, ConfigRecord) else None)
            server.refusal(0, cid, node, str(reason or "no release"), "no relatedness from it")
            refused.add(cid)
            continue
        record = reply.content["upload"] if "upload" in reply.content else None
        columns = record.get("columns") if isinstance(record, ConfigRecord) else None
        try:
            parsed = parse_upload(layout, cid, q, columns)
        except SecureRelatednessError as err:
            server.reject(0, cid, node, _malformed(env, str(err)), "no relatedness from it")
            continue
        if _take_metrics(server, cid, reply, env, val0, test0):
            metrics = reply.content["metrics"]
            if isinstance(metrics, MetricRecord) and (cfg.privacy.enabled
                                                      or "epsilon-spent" in metrics):
                try:  # the summary's ledger state, re-stated to the client in round 1; every
                    # DP client reports it (the reply of a DP run without it is malformed)
                    privacy = _reported_privacy(server, reply, metrics, cid, required=True)
                    assert privacy is not None  # a DP run's report, or ValueError
                except (KeyError, TypeError, ValueError) as err:
                    server.reject(0, cid, node, _malformed(env, f"ledger record ({err})"),
                                  "no relatedness from it")
                    continue
                _take_ledger_report(server, server.scope, cid, node, privacy,
                                    "encrypted summary reply")
            uploads[cid], envelopes[cid] = parsed, env
            upload_bytes[cid] = sum(len(c) for c in columns)
            # the client saved its setup state before it replied: round 1 re-states it
            server.ceremony_answered.setdefault(server.scope, set()).add(cid)


def _open_ceremony(
    server: _Server, holder: int, content: RecordDict, details: dict[str, Any]
) -> tuple[str, dict[int, SealedContext]]:
    """The key holder's accepted ceremony reply ``content``: set ``server.ckks_context`` from
    its public context, fill ``details``; return the context's digest and every client's
    sealed context with the key holder's signature. DeployError naming the key holder for a
    missing or unusable context (one holding a secret key, without evaluation keys, or with
    other parameters), a missing sealed context, or one its signature does not bind to this
    run, its client and this public context (every client checks it again)."""
    record = content["ceremony"] if "ceremony" in content else None
    public = record.get("public-context") if isinstance(record, ConfigRecord) else None
    if not isinstance(record, ConfigRecord) or not isinstance(public, bytes):
        raise DeployError(f"the key holder (client {holder}) returned no public CKKS context")
    try:
        context = open_server_context(public)
    except SecureRelatednessError as err:
        raise DeployError(
            f"the key holder (client {holder}) returned an unusable public CKKS context: {err}"
        ) from None
    digest = public_context_digest(public)
    signer = server.security.verifier.allowlist[server.client_ids[holder]]
    sealed: dict[int, SealedContext] = {}
    for cid, party in enumerate(server.client_ids):
        blob, signature = record.get(f"sealed-{party}"), record.get(f"signature-{party}")
        if not isinstance(blob, bytes):
            raise DeployError(
                f"the key holder (client {holder}) sealed no CKKS context for {party}"
            )
        try:
            check_sealed_signature(
                blob,
                signature,
                digest,
                party,
                signer,
                run_id=server.run_id,
                config_hash=server.settings.config_hash,
            )
        except SecureRelatednessError as err:
            raise DeployError(
                f"the key holder (client {holder}) returned a sealed CKKS context that fails "
                f"its signature check: {err}"
            ) from None
        assert isinstance(signature, bytes)
        sealed[cid] = SealedContext(blob, signature, digest)
    server.ckks_context = context
    details["public_context_bytes"] = len(public)
    details["sealed_context_bytes"] = len(sealed[0].blob)
    details["server_context_has_secret_key"] = bool(context.has_secret_key())
    details["ckks_parameters"] = context_parameters(context)
    # re-stated to the key holder when it decrypts
    return digest, sealed


def _server_rows(
    server: _Server,
    layout: InnerProductLayout,
    uploads: dict[int, list[InnerProductUpload]],
    envelopes: dict[int, Envelope],
    nodes: list[int],
) -> list[bytes]:
    """The encrypted Gram rows of every client's accepted ``uploads``, computed with the
    public context only. Authentic but unusable ciphertexts are a malformed reply: each such
    client is rejected (a recorded security event naming it) and dropped from ``uploads``,
    and the run stops naming them (relatedness needs every client). A failure no client's
    ciphertexts explain stops the run with a DeployError naming the key holder whose public
    context the rows were computed with and the clients whose uploads went in."""
    cfg = server.cfg
    try:
        rows, _ = gram_rows(
            server.ckks_context, layout, cfg.data.num_clients, cfg.fedora.q, uploads
        )
    except InvalidUploadsError as err:
        for cid, why in err.invalid.items():
            server.reject(0, cid, server.node_of_client[cid], _malformed(envelopes[cid], why),
                          "no relatedness from it")
            del uploads[cid]
        _require_all(server, uploads, nodes, "encrypted summary")  # raises, naming them
        raise
    except SecureRelatednessError as err:
        raise DeployError(
            f"the encrypted Gram rows of clients {sorted(uploads)} could not be computed under "
            f"the public CKKS context of the key holder (client {server.settings.key_holder}), "
            f"no client's ciphertexts explaining it: {err}; the run stops"
        ) from None
    return rows


def _blame_uploads(
    grid: Grid, server: _Server, layout: InnerProductLayout,
    uploads: dict[int, list[InnerProductUpload]], rows: list[bytes], answered: str, problem: str,
) -> DeployError:
    """The key holder refused the encrypted Gram rows' values (``problem``, its
    RowValuesError): each client's rows computed from its own uploads alone
    (:func:`~secure_fedora.secure.relatedness.isolated_rows`) go to the key holder, whose
    answer names the clients (:class:`~secure_fedora.secure.relatedness.CorruptUploadsError`,
    the in-process runtime's wording). The error to stop the run with; nothing is released."""
    cfg, holder = server.cfg, server.settings.key_holder
    n, q = cfg.data.num_clients, cfg.fedora.q
    refused = f"the key holder (client {holder}) refused the encrypted Gram rows ({problem})"
    alone, _ = isolated_rows(server.ckks_context, layout, n, q, uploads)
    node, message = _addressed(server, holder, MSG_DECRYPT, RecordDict({"rows": ConfigRecord(
        {"rows": rows, "isolated-rows": alone, "answered-ceremony": answered})}))
    ex = _exchange(grid, {node: message}, _relatedness_wait(server), server.settings.poll_interval)
    why = ex.errors.get(node) or ("no reply in time" if ex.missing else None)
    if why is None:
        env = server.accept(0, node, ex.replies[node], MSG_DECRYPT, holder, "no overlaps")
        record = ex.replies[node].content.get("blame") if env is not None else None
        clients = record.get("clients") if isinstance(record, ConfigRecord) else None
        certain = record.get("certain") if isinstance(record, ConfigRecord) else None
        if (isinstance(clients, list) and clients and isinstance(certain, bool)
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n
                        for c in clients) and len(set(clients)) == len(clients)):
            blame = CorruptUploadsError(clients, certain, "the values stay with the key holder")
            return DeployError(f"{refused}: {blame}; the run stops")
        why = "its answer was rejected" if env is None else f"its answer is malformed ({record!r})"
    return DeployError(f"{refused} and did not say whose encrypted summary made them wrong "
                       f"({why}); the run stops")


def _key_holder_overlaps(
    grid: Grid, server: _Server, layout: InnerProductLayout,
    uploads: dict[int, list[InnerProductUpload]], rows: list[bytes], answered: str,
    timing: dict[str, Any],
) -> Tensor:
    """The key holder's (N, N, q, q) overlaps of the encrypted Gram ``rows``, asked once more
    (the same rows) when its answer is missing or refused. Stops the run (DeployError) when
    it refuses the rows' values, naming the clients whose uploads made them wrong
    (:func:`_blame_uploads`), when its store is not the ceremony's, or when it answers
    nothing usable twice."""
    cfg, holder, poll = server.cfg, server.settings.key_holder, server.settings.poll_interval
    n, q = cfg.data.num_clients, cfg.fedora.q
    overlaps: Tensor | None = None
    problem: str | None = None
    for attempt in range(2):
        if attempt:
            server.event(0, holder, server.node_of_client[holder], f"no overlaps: {problem}")
            _await_clients(grid, server, [holder])
            _find_moved(grid, server, 0, spares_too=True)
            _say(f"{server.scope}: decryption asked again of the key holder")
        node, message = _addressed(server, holder, MSG_DECRYPT, RecordDict({"rows": ConfigRecord(
            {"rows": rows, "answered-ceremony": answered})}))
        ex = _exchange(grid, {node: message}, _relatedness_wait(server), poll)
        timing.setdefault("decrypt", ex.timing.to_json())
        problem = (ex.errors.get(node) or ("no reply in time" if ex.missing else None))
        if problem is not None and RowValuesError.__name__ in problem:
            # the same rows are refused again: ask instead whose upload made them wrong
            raise _blame_uploads(grid, server, layout, uploads, rows, answered, problem)
        if problem is not None and "NodeStateError" in problem:
            # its store is not the one whose ceremony was accepted: it refuses again
            raise DeployError(
                f"the key holder (client {holder}, node {node}) refuses to decrypt, its node's "
                f"CKKS store being lost or replaced since the key ceremony ({problem}); the "
                "run stops")
        if problem is None:
            env = server.accept(0, node, ex.replies[node], MSG_DECRYPT, holder, "no overlaps")
            if env is None:
                problem = "its reply was rejected"
            else:
                try:
                    overlaps = checked_array(ex.replies[node].content, "overlaps", "overlaps",
                                             torch.float64, (n, n, q, q), env)
                    break
                except EnvelopeError as err:
                    server.reject(0, holder, node, err, "no overlaps")
                    problem = f"its overlaps were refused ({err.reason})"
    if overlaps is None:
        raise DeployError(
            f"the key holder (client {holder}) did not return the overlaps, asked twice: "
            f"{problem}"
        )
    return overlaps


def _encrypted_overlaps(
    grid: Grid, server: _Server, nodes: list[int], val0: Tensor, test0: Tensor
) -> Tensor:
    """Encrypted modes: key ceremony, ``Enc(U_i)`` from every client, encrypted Gram rows on
    the server (public context only), decryption of the overlap blocks by the key holder."""
    cfg = server.cfg
    n = cfg.data.num_clients
    holder = server.settings.key_holder
    details: dict[str, Any] = {"key_holder": holder}
    timing: dict[str, Any] = {}

    # (a) key ceremony at the key holder (every node identifies itself in the same exchange;
    # the key holder repeats its stored result to a second request)
    replies, ceremony_timing = _first_contact(
        grid, server, nodes, MSG_CEREMONY, {"key-holder": holder}
    )
    timing["ceremony"] = ceremony_timing.to_json()
    # a client without an accepted reply is asked once more, at every online node that holds
    # no identified client (its SuperNode may have restarted under a new node id)
    answered = {server.node_of_client[cid] for cid in replies}
    asked = list(nodes)
    missing = n - len(replies)
    if missing:
        missed = _await_unidentified(grid, server, answered, missing)
        _say(f"{server.scope}: key ceremony sent again to nodes {missed}")
        asked = sorted(set(asked) | set(missed))
        replies.update(_first_contact(grid, server, missed, MSG_CEREMONY,
                                      {"key-holder": holder})[0])
    _require_all(server, replies, asked, "identification", asked_twice=bool(missing))
    server.nodes = sorted(server.node_of_client[cid] for cid in range(n))
    reply, env = replies[holder]
    t0 = time.perf_counter()
    answered, sealed = _open_ceremony(server, holder, reply.content, details)

    # (b) every client's encrypted summary, its sealed context forwarded to it; a client
    # without an accepted upload is asked once more (it re-encrypts its saved summary: under
    # DP nothing is drawn or accounted twice)
    assert server.schema is not None  # known since the first contact
    layout = layout_for(cfg, server.schema)
    client_of = {node: cid for cid, node in server.node_of_client.items()}
    uploads: dict[int, list[InnerProductUpload]] = {}
    envelopes: dict[int, Envelope] = {}
    upload_bytes: dict[int, int] = {}
    refused: set[int] = set()  # a refused summary is not asked again (refused again)
    asked_twice = False
    for attempt in range(2):
        wanted = [cid for cid in range(n) if cid not in uploads and cid not in refused]
        if not wanted:
            break
        asked_twice = bool(attempt)
        if attempt:
            _await_clients(grid, server, wanted)
            _find_moved(grid, server, 0, spares_too=True)
            client_of = {node: cid for cid, node in server.node_of_client.items()}
            _say(f"{server.scope}: encrypted summary asked again of clients {wanted}")
        _take_uploads(grid, server, {cid: sealed[cid] for cid in wanted}, client_of, uploads,
                      envelopes, upload_bytes, val0, test0, timing, refused)
    _require_all(server, uploads, nodes, "encrypted summary", asked_twice=asked_twice)
    details["upload_bytes_per_client"] = [upload_bytes[c] for c in range(n)]

    # (c) the encrypted Gram rows, computed with the public context only
    t1 = time.perf_counter()
    rows = _server_rows(server, layout, uploads, envelopes, nodes)
    timing["server_compute_s"] = round(time.perf_counter() - t1, 4)
    details["rows_bytes"] = sum(len(r) for r in rows)

    # (d) the key holder decrypts the q x q blocks, and only those (asked once more, the same
    # rows, when its answer is missing or refused)
    overlaps = _key_holder_overlaps(grid, server, layout, uploads, rows, answered, timing)
    timing["wall_s"] = round(time.perf_counter() - t0, 4)
    server.relatedness_timing = timing
    server.relatedness_details = details
    return overlaps


def _ckks_overlaps(grid: Grid, server: _Server) -> dict[str, Any]:
    """The ``ckks_overlaps`` ceremony (FEDORA's encrypted relatedness): key ceremony at the
    key holder, ``Enc(U_i)`` from every client, Gram rows on ciphertexts, decryption of the
    overlap blocks by the key holder. Result: ``{"overlaps": (N, N, q, q), "details": ...}``."""
    n = server.cfg.data.num_clients
    overlaps = _encrypted_overlaps(grid, server, server.nodes, torch.zeros(n), torch.zeros(n))
    return {"overlaps": overlaps,
            "details": {"ckks_parameters": server.relatedness_details["ckks_parameters"]}}


#: Setup ceremonies the Flower runtime implements, by the name a method's
#: ``setup_ceremony()`` returns (see secure_fedora.algorithms.contract).
CEREMONIES: dict[str, Any] = {"ckks_overlaps": _ckks_overlaps}


# --------------------------------------------------------------------------- generic driver


@dataclass
class _MethodRun:
    """One method's server half and what the runtime tracks around it."""

    name: str
    algorithm: Any
    limits: PayloadLimits
    tracker: Tracker
    schema: ReplySchema = field(default_factory=ReplySchema)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"training": 0.0, "evaluation": 0.0})
    evaluated: set[int] = field(default_factory=set)  # clients that ever reported metrics
    answered_last: set[int] = field(default_factory=set)  # replied to the final evaluation
    # per client, the last round of each exchange whose reply the server accepted: the client
    # saved its state before replying, so a state that did not answer as far is a rolled-back
    # (restored, wiped) one, which it refuses with or without DP
    answered: dict[int, dict[str, int]] = field(default_factory=dict)
    # the tracker's state before the final evaluation, kept while some client has not
    # answered it: a resume asks those again and makes the round's selection again from it
    before_final: dict[str, Any] | None = None


@dataclass
class _Replies:
    """The accepted replies of one exchange: payload and metrics by client index."""

    payloads: dict[int, Payload] = field(default_factory=dict)
    metrics: dict[int, MetricRecord] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)  # clients that refused their release
    #: clients that sat the exchange out for a reason the method is told of
    #: (``sat_out_statistics``), by client index: e.g. an error reply saying FEDORA's pull
    #: diverged (a resume's amendment let them sit the round out instead of stopping the run)
    sat_out: dict[int, str] = field(default_factory=dict)
    #: each error reply's reason (``"<code>: <client's error text>"``), by client index
    errors: dict[int, str] = field(default_factory=dict)
    #: clients that were offline or sent no reply in time (asking again may reach them)
    unanswered: set[int] = field(default_factory=set)
    timing: ExchangeTiming = field(default_factory=ExchangeTiming)


def _hello(grid: Grid, server: _Server, nodes: list[int], until: float = 0.0) -> None:
    """First contact: which node holds which client, its split sizes and the data schema.

    A client without an accepted reply is asked once more, at every node online by then that
    holds no identified client: a SuperNode that restarted meanwhile under a new node id is
    asked there (the reply's signature, not the node id, says which client it holds), and
    ``server.nodes`` becomes the nodes that hold the clients. That retry waits for as many
    such nodes (spare nodes, which just identified no client, not counted) as clients are
    missing, for the round timeout or until ``until`` (a monotonic time: the end of the
    connect timeout, so a spare node counted among the nodes that came online does not cut
    short the wait for a client's node that is still starting)."""
    server.scope = HELLO_SCOPE
    n = server.cfg.data.num_clients
    schemas: dict[int, DataSchema] = {}
    timing: ExchangeTiming | None = None
    asked = list(nodes)
    for attempt in range(2):  # a node without an accepted reply is asked once more
        if len(schemas) == n:
            break
        wanted = list(nodes)
        if attempt:
            identified = {server.node_of_client[cid] for cid in schemas}
            wanted = _await_unidentified(grid, server, identified, n - len(schemas), until)
            if not wanted:
                break
            _say(f"first contact sent again to nodes {wanted}")
            asked = sorted(set(asked) | set(wanted))
        before = dict(server.node_of_client)
        replies, hello_timing = _first_contact(grid, server, wanted, MSG_HELLO, {},
                                               record_moves=False)
        timing = timing or hello_timing
        _take_hellos(server, replies, schemas)
        for cid in sorted(set(replies) & set(schemas)):  # a malformed reply claims no move
            node, was = server.node_of_client[cid], before.get(cid)
            if was is not None and was != node:
                server.event(0, cid, node, _moved(MSG_HELLO, cid, node, was))
    _require_all(server, schemas, asked, "identification", asked_twice=True)
    server.nodes = sorted(server.node_of_client[cid] for cid in range(n))
    distinct = set(schemas.values())
    if len(distinct) > 1:
        raise DeployError(f"the clients report different data schemas: {sorted(map(str, distinct))}")
    server.schema = distinct.pop()
    assert timing is not None
    server.timings["hello"] = timing.to_json()


def _client_errors_statement(modes: Mapping[int, str], n: int) -> str:
    """results.json ``assumptions.client_errors_by_client``: which clients' error texts reached
    this server whole and which were withheld, as each client's hello reply stated it (the
    stricter of the run's ``[security] client_errors`` and its node config's
    ``client-errors``)."""
    by_mode = {mode: [c for c in range(n) if modes.get(c, "withheld") == mode]
               for mode in CLIENT_ERRORS_MODES}
    return ("as each client's node allowed (node config client-errors, which can only make "
            "[security] client_errors stricter): " + "; ".join(
                f"{mode}: clients {clients}" for mode, clients in by_mode.items() if clients))


def evaluation_reports_statement(outcomes: Mapping[str, Mapping[str, Any]]) -> str:
    """results.json ``assumptions.evaluation_reports`` of a Flower run whose methods ended
    with ``outcomes`` (name -> its ``methods.<name>`` entry): what every client reported for
    evaluation, naming a method's fine-tuned test metric only where that method (FedAvg, or
    one registered on FedAvg) fine-tuned in the run (its ``<name>_ft`` row)."""
    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.plugins import method_hook

    tuned = []
    for name, outcome in outcomes.items():
        cls = method_class(name)
        if cls is None or not issubclass(cls, FedAvg):
            continue
        with method_hook(name, "derived_rows(name, outcome)"):
            rows = cls.derived_rows(name, outcome)
        if rows:
            tuned.append("FedAvg's" if name == FedAvg.name else f"{name}'s (built on FedAvg)")
    return ("after each evaluated round every client sends the server its test metric (and "
            "its validation metric only when that chooses the reported round)"
            + (f", and {' and '.join(tuned)} fine-tuned test metric"
               f"{'s' if len(tuned) > 1 else ''} at the end" if tuned else "")
            + "; these reports are outside the ledgers")


def _data_facts(schema: DataSchema, sizes: Mapping[int, Mapping[str, Any]], n: int) -> DataFacts:
    """The data's facts as the clients reported them at first contact (schema, split sizes)."""
    return DataFacts(schema.input_shape, schema.num_classes, schema.multilabel,
                     *(tuple(int(sizes[c][split]) for c in range(n))
                       for split in ("train", "val", "test")))


#: Why a first-contact reply lacks ``client-errors``: the field every current ClientApp sends.
_OUTDATED = ("a ClientApp older than this server's protocol (the field is missing; its error "
             "texts cannot be taken for withheld)")
#: Why a first-contact reply lacks ``device`` and ``threads``: fields every current ClientApp sends.
_OUTDATED_COMPUTE = ("a ClientApp older than this server's protocol (the fields are missing; "
                     "results.json cannot state the device and threads it trains on)")
#: The devices a ClientApp may state (``resolve_device``'s).
_DEVICES = ("cpu", "cuda")


def _compute_problem(device: Any, threads: Any) -> str | None:
    """What is wrong with a client's stated compute (its device and torch thread count, from
    its hello or a checkpoint's record of it), or None."""
    if device not in _DEVICES:
        return f"device {device!r}"
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        return f"threads {threads!r}"
    return None


def _count(value: object, name: str, least: int) -> int:
    """``value`` (a hello reply's ``name``) as an int of at least ``least``; ValueError for
    anything else (a float, a bool, a smaller number), so that the reply is rejected as
    malformed rather than truncated, recorded negative or raised past the check."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, not {value!r}")
    return value


#: The partition facts a hello reply may state as ``meta-<key>`` (results.json's client rows).
_META_FACTS = ("rotation_degrees", "group", "classes")
#: The longest text a hello reply may state as a partition fact.
MAX_META_CHARS = 200


def _meta_facts(info: ConfigRecord, num_classes: int) -> dict[str, Any]:
    """The partition facts of a hello reply's ``info`` (its ``meta-<key>`` entries, by key),
    as a client publishes them: a bool, an int, a finite float or a text of at most
    :data:`MAX_META_CHARS` characters; ``classes`` a list of class indices below
    ``num_classes``. ValueError for another key or value, so that the reply is rejected as
    malformed rather than a fact overwriting a checked split size or reaching results.json
    as NaN."""
    facts: dict[str, Any] = {}
    for key in info.keys():
        if not key.startswith("meta-"):
            continue
        name, value = key.removeprefix("meta-"), info[key]
        if name not in _META_FACTS:
            raise ValueError(f"{key[:40]!r} is not a partition fact ({', '.join(_META_FACTS)})")
        if name == "classes":
            ok = isinstance(value, list) and len(value) <= num_classes and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_classes
                for v in value)
        else:
            ok = (isinstance(value, bool | int) or isinstance(value, float) and math.isfinite(value)
                  or isinstance(value, str) and len(value) <= MAX_META_CHARS)
        if not ok:
            raise ValueError(f"{key} {str(value)[:40]!r}")
        facts[name] = value
    return facts


def _take_hellos(server: _Server, replies: dict[int, tuple[Message, Envelope]],
                 schemas: dict[int, DataSchema]) -> None:
    """Add each accepted hello reply's data schema to ``schemas`` and its split sizes to
    ``server.sizes``; a malformed one is a rejection. A client that refused the run (its data
    or node fails the checks against the run's model and settings, as in process before
    anything is written) stops it here, before any method message: a DeployError naming the client and its
    reason (and any other client that refused). The stop message states the refusing
    client's ``client-errors`` (what its error texts tell this server), as its refusal states
    it. A reply without ``client-errors`` (a ClientApp older than this server's protocol) stops
    the run with a DeployError saying so: its error texts would be taken for withheld, which
    the server cannot tell. So does one without ``device`` and ``threads`` (results.json
    states the compute the clients stated, never a guess); each accepted reply's pair is
    recorded in ``server.client_compute``, and a client stating another pair than before (a
    node that took it over mid-run) is an event. Without DP each reply states its data's
    SHA-256 (``data-fingerprint``; one without it stops the run as outdated); a client stating
    another than before in the run (this first contact or one before a resume) stops it, its
    data having changed. Under DP a reply that states one is malformed: the client must not
    send a hash of its data to this server."""
    dp = server.cfg.privacy.enabled
    refused: dict[int, str] = {}
    outdated: list[int] = []
    outdated_compute: list[int] = []
    outdated_fingerprint: list[int] = []
    changed: dict[int, tuple[str, str]] = {}
    for cid, (reply, env) in sorted(replies.items()):
        if "refusal" in reply.content:
            record = reply.content["refusal"]
            reason = record.get("reason") if isinstance(record, ConfigRecord) else None
            errors = record.get("client-errors") if isinstance(record, ConfigRecord) else None
            if isinstance(reason, str) and reason.strip() and \
                    (errors is None or errors in CLIENT_ERRORS_MODES):
                refused[cid] = " ".join(reason.split())[:MAX_REFUSAL_CHARS] + (
                    f" [client-errors: {errors}]" if errors is not None
                    else f" [client-errors: not stated; {_OUTDATED}]")
                continue
            server.reject(0, cid, server.node_of_client.get(cid), _malformed(
                env, "hello refusal without a reason" if errors is None or errors
                in CLIENT_ERRORS_MODES else f"hello refusal with client-errors {errors!r}"),
                "not identified")
            continue
        info = reply.content["client"]
        if isinstance(info, ConfigRecord) and "client-errors" not in info:
            outdated.append(cid)
            continue
        if isinstance(info, ConfigRecord) and not {"device", "threads"} <= set(info.keys()):
            outdated_compute.append(cid)
            continue
        if isinstance(info, ConfigRecord) and not dp and "data-fingerprint" not in info:
            outdated_fingerprint.append(cid)
            continue
        try:
            shape = info["input-shape"]
            if not isinstance(shape, list) or not all(isinstance(v, int) and v > 0 for v in shape):
                raise ValueError(f"input-shape {shape!r}")
            schema = DataSchema(tuple(int(v) for v in shape),
                                _count(info["num-classes"], "num-classes", 1),
                                info["multilabel"])
            if not isinstance(schema.multilabel, bool):
                raise ValueError(f"multilabel must be true or false, not {schema.multilabel!r:.40}")
            sizes = {"id": cid, **{k: _count(info[k], k, 0) for k in ("train", "val", "test")},
                     **_meta_facts(info, schema.num_classes)}
            errors = info["client-errors"]
            if errors not in CLIENT_ERRORS_MODES:
                raise ValueError(f"client-errors {errors!r}")
            device, threads = info["device"], info["threads"]
            problem = _compute_problem(device, threads)
            if problem is not None:
                raise ValueError(problem)
            fingerprint = None
            if dp and "data-fingerprint" in info:
                raise ValueError("data-fingerprint under DP (a hash of the client's data, "
                                 "which it must not send)")
            if not dp:
                fingerprint = info["data-fingerprint"]
                combine_fingerprints([(cid, fingerprint)])  # a SHA-256 hex digest, or DataError
        except (KeyError, TypeError, ValueError) as err:
            server.reject(0, cid, server.node_of_client.get(cid),
                          _malformed(env, f"hello reply malformed ({err})"), "not identified")
            continue
        if fingerprint is not None:
            before = server.data_fingerprints.setdefault(cid, fingerprint)
            if before != fingerprint:
                changed[cid] = (before, fingerprint)
                continue
        schemas[cid] = schema
        server.sizes[cid] = sizes
        server.client_errors[cid] = str(errors)
        stated = server.client_compute.setdefault(cid, [])
        if {"device": device, "threads": threads} not in stated:
            if stated:
                server.event(0, cid, server.node_of_client.get(cid),
                             f"states device {device} with {threads} torch threads (stated "
                             f"before: {', '.join(_compute_text(c) for c in stated)})")
            stated.append({"device": str(device), "threads": int(threads)})
    if refused:
        first = min(refused)
        others = sorted(set(refused) - {first})
        raise DeployError(
            f"client {first} (node {server.node_of_client.get(first)}) refused the run at first "
            f"contact: {refused[first]}" + (f" (clients {others} refused too)" if others else "")
            + "; the run stops before any method message or release")
    if outdated:
        raise DeployError(
            f"clients {outdated} (nodes {[server.node_of_client.get(c) for c in outdated]}) "
            f"answered the first contact without client-errors: {_OUTDATED}. Update "
            "secure-fedora on those SuperNodes and start the run again; the run stops before "
            "any method message or release")
    if outdated_compute:
        raise DeployError(
            f"clients {outdated_compute} (nodes "
            f"{[server.node_of_client.get(c) for c in outdated_compute]}) answered the first "
            f"contact without device and threads: {_OUTDATED_COMPUTE}. Update secure-fedora on "
            "those SuperNodes and start the run again; the run stops before any method message "
            "or release")
    if outdated_fingerprint:
        raise DeployError(
            f"clients {outdated_fingerprint} (nodes "
            f"{[server.node_of_client.get(c) for c in outdated_fingerprint]}) answered the "
            "first contact without data-fingerprint: a ClientApp older than this server's "
            "protocol (results.json cannot state the data fingerprint). Update secure-fedora on "
            "those SuperNodes and start the run again; the run stops before any further message")
    if changed:
        first = min(changed)
        before, now = changed[first]
        raise DeployError(
            f"client {first} (node {server.node_of_client.get(first)}) reports other data than "
            f"before in this run (data fingerprint {now:.12} != {before:.12})"
            + (f" (clients {sorted(set(changed) - {first})} too)" if len(changed) > 1 else "")
            + ": its data changed, so the run cannot continue on it; restore that data, or "
            "start a new run")


def _compute_text(stated: Mapping[str, Any]) -> str:
    return f"{stated['device']} with {stated['threads']}"


def _compute_statement(stated: Mapping[int, Sequence[Mapping[str, Any]]], n: int,
                       before_resume_unknown: bool = False) -> dict[str, Any]:
    """results.json ``compute`` of a Flower run: what the clients trained on, as their hello
    replies stated it over the whole run (a resume's with the checkpointed ones of the run it
    continues; from a checkpoint that did not record them, ``before_resume_unknown``, the
    resume's alone, and ``before_resume`` says so). ``device`` and
    ``threads`` are the one device and the one torch thread count every client stated (as in
    process, where the one process trains), else "mixed"; ``by_client`` each client's (a
    value a client stated differently over the run, from a node that took it over: "mixed";
    the events name both); ``server_threads`` the ServerApp's own torch threads."""
    def one(values: Sequence[Any]) -> Any:
        return values[0] if len(set(values)) == 1 else "mixed"

    by_client = {str(c): {key: one([s[key] for s in stated[c]]) for key in ("device", "threads")}
                 for c in range(n)}
    return {key: one([row[key] for row in by_client.values()]) for key in ("device", "threads")} \
        | {"server_threads": torch.get_num_threads(), "by_client": by_client} \
        | ({"before_resume": "unknown: the checkpoint resumed (an older secure-fedora's) did not"
                             " record what the clients stated before it"}
           if before_resume_unknown else {})


def _stop_for_pull(server: _Server, run: _MethodRun, rnd: int, client: int, node: int) -> None:
    """Stop the run (DeployError naming the remedy) for client ``client``'s training that
    FEDORA's unstable pull made non-finite in round ``rnd``, as the in-process runtime stops:
    going on would leave the client out of every round its pull diverges in, results the
    algorithm does not define. Not when a resume's amendment already bounds the pull (``fedora.max_pull``) from
    a later round: round ``rnd`` is then re-made as it was, and the client sits it out."""
    rounds = server.cfg.training.rounds
    if server.settings.amended_value("fedora.max_pull", run.name, rounds) is not None:
        return
    who = f"{server.client_ids[client]} (node {node})"
    if rnd < rounds:
        hint = PULL_RESUME_HINT.replace(IN_PROCESS_RESUME, PULL_RESUME_COMMAND)
        remedy = (f"{hint}, round {rnd} re-made as it was ({who} sits it out) and the bound "
                  f"applied from round {rnd + 1}")
    else:
        remedy = (f"round {rnd} is the last, which a resume re-makes as it was, so run it again "
                  "with fedora.max_pull = 1 set")
    raise DeployError(
        f"{run.name}: {who}: {PULL_DIVERGED} in round {rnd} (lr * lambda at or above the pull's "
        f"stability limit made its training non-finite; its update was discarded); the run "
        f"stops, as in process, rather than go on without it: set fedora.max_pull = 1 (a pull "
        f"then stops at phi) or lower training.lr; {remedy}")


def _exchange_payloads(
    grid: Grid, server: _Server, run: _MethodRun, stage: str, rnd: int,
    payloads: Mapping[int, Payload | None], timeout: float, find_moved: bool = False,
) -> _Replies:
    """Send each client its payload (``None``: the message carries none) for ``stage`` of round
    ``rnd``; return the accepted replies. Offline clients, error replies, missing replies,
    rejected replies and refusals are events; such clients are absent from the result.

    When a client's node is offline, a node id not seen before is online (the SuperLink may
    still list a restarted SuperNode's old one), or ``find_moved`` (a retry), the online
    nodes that hold no known client are asked first which client they hold
    (:func:`_find_moved`), so a SuperNode restarted under a new node id gets its client's
    message there."""
    message_type = {"setup": MSG_SETUP, "round": MSG_ROUND, "evaluate": MSG_EVALUATE,
                    "finalize": MSG_FINALIZE}[stage]
    wrnd = wire_round(stage, rnd, server.cfg.training.rounds)
    online = _online(grid)
    if find_moved or any(server.node_of_client[c] not in online for c in payloads) \
            or online - set(server.node_of_client.values()) - server.asked:
        _find_moved(grid, server, rnd, spares_too=find_moved)
        online = _online(grid)
    messages: dict[int, Message] = {}
    client_of: dict[int, int] = {}
    offline: set[int] = set()
    for cid, payload in sorted(payloads.items()):
        node = server.node_of_client[cid]
        if node not in online:
            server.event(rnd, cid, node, f"offline: no {stage} message delivered")
            offline.add(cid)
            continue
        saw = server.privacy.get(run.name, {}).get(cid, {})
        seen = ({"ledger-entries": saw["ledger_entries"], "ledger-head": saw["ledger_head"]}
                if "ledger_head" in saw else {})
        seen.update({f"answered-{s}": r for s, r in run.answered.get(cid, {}).items()})
        content = RecordDict({
            "payload": payload_to_record(payload or {}, run.limits),
            # the client checks its node still holds the ledger and state it last reported
            "run": ConfigRecord({"method": run.name, "stage": stage, "round": rnd,
                                 "has-payload": payload is not None,
                                 "config-hash": server.settings.config_hash,
                                 **_amendments_field(server), **seen}),
        })
        client_of[node] = cid
        messages[node] = Message(
            server.sign(content, message_type, [server.client_ids[cid]], wrnd),
            dst_node_id=node, message_type=message_type, group_id=f"{run.name}:{stage}:{rnd}",
            ttl=timeout + 60.0,
        )
    ex = _exchange(grid, messages, timeout, server.settings.poll_interval,
                   server.settings.max_in_flight)
    out = _Replies(timing=ex.timing, unanswered=offline | {client_of[nd] for nd in ex.missing})
    then = f"counts as not taking part in the {stage} exchange"
    # only a method that pulls (one that reads fedora.max_pull) trains under FEDORA's pull:
    # another's error reply naming it is an error reply like any other
    pulls = stage == "round" and run.name in amendment_readers(server.cfg, "fedora.max_pull")
    for node, reason in sorted(ex.errors.items()):
        server.event(rnd, client_of[node], node, f"error reply ({reason}): {then}")
        out.errors[client_of[node]] = reason
        if "NodeStateError" in reason:
            # that client refuses every later message: under DP the run cannot finish (its
            # ledger never closes), and going on would spend the other clients' budgets;
            # without DP the run would go on without it and report its older metrics
            raise DeployError(
                f"{run.name}: client {server.client_ids[client_of[node]]} (node {node}) refuses "
                f"to go on, its node's state being lost or damaged ({reason}); the run stops")
        if pulls and reports_pull_divergence(reason):
            _stop_for_pull(server, run, rnd, client_of[node], node)
            out.sat_out[client_of[node]] = SAT_OUT_PULL_DIVERGED
    for node in ex.missing:
        server.event(rnd, client_of[node], node, f"no reply in time: {then}")
    for node, reply in sorted(ex.replies.items()):
        cid = client_of[node]
        envelope = server.accept(wrnd, node, reply, message_type, cid, then)
        if envelope is None:
            continue
        try:
            conf = reply.content["run"]
            if not isinstance(conf, ConfigRecord):
                raise TypeError("run is not a ConfigRecord")
            said = (conf.get("method"), conf.get("stage"), conf.get("round"))
            if said != (run.name, stage, rnd):
                raise ValueError(f"reply is for {said}, not {(run.name, stage, rnd)}")
            metrics = reply.content["metrics"]
            if not isinstance(metrics, MetricRecord):
                raise TypeError("metrics is not a MetricRecord")
            privacy = _reported_privacy(server, reply, metrics, cid, required=True)
            refusal = reply.content["refusal"] if "refusal" in reply.content else None
            repeated = (privacy is not None and refusal is None and stage in ("round", "setup")
                        and _reported_repeat(reply))
            payload = None
            if refusal is None:
                payload = record_to_payload(reply.content["payload"], envelope,
                                            f"{stage} reply of client {cid}", run.limits)
                rules = run.algorithm.reply_rules
                if stage == "evaluate" and payload:
                    # an evaluation reply states its metrics only (no method declares
                    # evaluation reply entries): an entry would otherwise pin the stage's
                    # schema and be taken unread, outside any ledger under DP
                    raise ValueError(f"evaluation reply carries entries {sorted(payload)[:8]}; "
                                     "an evaluation reply carries its metrics only")
                if rules is not None and stage in rules.entries:
                    rules.check_received(stage, cid, payload, run.schema)  # as in process
                else:
                    run.schema.check(run.name, stage, cid, payload)
        except EnvelopeError as err:
            server.reject(rnd, cid, node, err, then)
            continue
        except (KeyError, TypeError, ValueError) as err:
            server.reject(rnd, cid, node, _malformed(envelope, f"{stage} reply malformed ({err})"),
                          then)
            continue
        if privacy is not None:
            _take_ledger_report(server, run.name, cid, node, privacy,
                                f"{stage} reply of round {rnd}")
            if repeated:
                _record_repeat(server, run.name, 0 if stage == "setup" else rnd, cid)
        run.answered.setdefault(cid, {})[stage] = rnd
        if refusal is not None:
            reason = (str(refusal["reason"]) if isinstance(refusal, ConfigRecord)
                      and "reason" in refusal else "no release")
            server.refusal(rnd, cid, node, reason, then)
            server.refused.setdefault(run.name, {}).setdefault(cid, rnd)
            out.refused.add(cid)
            continue
        assert payload is not None
        out.payloads[cid] = payload
        out.metrics[cid] = metrics
    return out


def _evaluate(grid: Grid, server: _Server, run: _MethodRun, rnd: int) -> dict[str, Any]:
    """The evaluation exchange of round ``rnd``; updates the tracker as in process."""
    n = server.cfg.data.num_clients
    clients = list(range(n))
    with server_half(run.algorithm, run.name,
                     f"evaluation_messages(rnd, clients) of round {rnd}"):
        evaluation = run.algorithm.evaluation_messages(rnd, clients)
    messages = check_messages(run.name, EVALUATE, rnd,  # as in process, before any is sent
                              evaluation, clients, run.algorithm.ctx.flat.num_params)
    replies = _exchange_payloads(grid, server, run, "evaluate", rnd,
                                 {c: messages.get(c) for c in clients},
                                 server.settings.round_timeout)
    if rnd == server.cfg.training.rounds:
        _ask_missed_again(grid, server, run, rnd, messages, clients, replies)
        run.answered_last = set(replies.metrics)
    fresh = _take_evaluation_metrics(server, run, rnd, replies.metrics)
    tracker = run.tracker
    tracker.evaluated(rnd, fresh)  # the round each client's latest accepted metrics are from
    tracker.update(rnd)
    # the round's statistics over its own metrics, as in process (where every client is
    # evaluated): a client that missed it keeps an older metric, or none, for selection only
    return {
        **tracker.round_row(sorted(fresh)),
        "evaluated": len(fresh),
        "evaluation_timing": replies.timing.to_json(),
    }


def _ask_missed_again(grid: Grid, server: _Server, run: _MethodRun, rnd: int,
                      messages: Mapping[int, Payload], asked: Sequence[int],
                      replies: _Replies) -> None:
    """Ask the clients of ``asked`` without metrics in ``replies`` (the final evaluation of
    round ``rnd``) once more, adding their metrics to ``replies``. One that missed it (a node
    restarting) answers then (answering is idempotent): a DP client closes its ledger there,
    and any client would otherwise keep an earlier round's metric as its final one (or have
    none: the run fails)."""
    missed = [c for c in asked if c not in replies.metrics]
    if missed:
        again = _retry_exchange(grid, server, run, "evaluate", rnd,
                                {c: messages.get(c) for c in missed})
        replies.metrics.update(again.metrics)


def _take_evaluation_metrics(server: _Server, run: _MethodRun, rnd: int,
                             replies: Mapping[int, MetricRecord]) -> list[int]:
    """Put the evaluation metrics of round ``rnd`` into the tracker's last metrics; returns
    the clients whose metrics were taken (a reply without valid metrics is an event and the
    client keeps its last ones). The caller records the round (``Tracker.evaluated``)."""
    tracker = run.tracker
    select_final = bool(tracker.select_final)  # clients then send no validation metric
    fresh: list[int] = []  # the clients whose metrics are this round's
    for cid, metrics in replies.items():
        try:
            test = float(metrics["test-metric"])
            val = 0.0 if select_final else float(metrics["val-metric"])
        except (KeyError, TypeError, ValueError):
            server.event(rnd, cid, server.node_of_client[cid],
                         "evaluation reply without metrics: keeps its last metrics")
            continue
        if not all(0.0 <= v <= 1.0 for v in (test, val)):  # NaN fails too
            server.event(rnd, cid, server.node_of_client[cid],
                         f"evaluation reply with a metric outside [0, 1] (test {test!r}, "
                         f"validation {val!r}): keeps its last metrics")
            continue
        tracker.last_val[cid], tracker.last_test[cid] = val, test
        run.evaluated.add(cid)
        fresh.append(cid)
    return fresh


def _finish_final_evaluation(grid: Grid, server: _Server, run: _MethodRun, rounds: int,
                             before: Mapping[str, Any] | None) -> None:
    """A resume after the last round of a run whose final evaluation some clients did not
    answer (the run failed there, or, without DP, went on with their older metrics): ask
    those clients (not in ``run.answered_last``) again, twice at most; each answers from its
    saved state or evaluates its saved model, and a DP client closes its ledger (nothing is
    released or accounted again). The round's selection and history row are then made again
    from the tracker as it was before that evaluation (``before``, the checkpoint's) with
    every metric of the round, as an uninterrupted run makes them."""
    n = server.cfg.data.num_clients
    missing = sorted(set(range(n)) - run.answered_last)
    tracker = run.tracker
    fresh = [c for c in range(n) if int(tracker.metric_round[c]) == rounds]
    val, test = tracker.last_val.clone(), tracker.last_test.clone()
    if before is None:
        # a checkpoint of an older secure-fedora: the round's selection can be made again
        # where the partial evaluation changed none of it, or where the final round is
        # selected whatever the metrics (its update then overwrites all of it)
        if not bool(tracker.select_final) and int(tracker.best_round) == rounds:
            raise DeployError(
                f"{run.name}: resume: clients {missing} did not answer the final evaluation "
                f"(round {rounds}), and the checkpoint (written by an older secure-fedora) does "
                "not hold the model selection from before that evaluation, which selected round "
                f"{rounds} without them; the run cannot be finished exactly: start a new run")
    else:
        for key, value in before.items():
            getattr(tracker, key).copy_(value)
        tracker.last_val[fresh], tracker.last_test[fresh] = val[fresh], test[fresh]
    clients = list(range(n))
    with server_half(run.algorithm, run.name,
                     f"evaluation_messages(rnd, clients) of round {rounds}"):
        evaluation = run.algorithm.evaluation_messages(rounds, clients)
    messages = check_messages(run.name, EVALUATE, rounds,  # as the round sent them
                              evaluation, clients, run.algorithm.ctx.flat.num_params)
    _say(f"{run.name} round {rounds}: final evaluation sent again to clients {missing}, which "
         "had not answered it")
    t0 = time.perf_counter()
    replies = _exchange_payloads(grid, server, run, "evaluate", rounds,
                                 {c: messages.get(c) for c in missing},
                                 server.settings.round_timeout)
    _ask_missed_again(grid, server, run, rounds, messages, missing, replies)
    run.answered_last |= set(replies.metrics)
    fresh = sorted(set(fresh)
                   | set(_take_evaluation_metrics(server, run, rounds, replies.metrics)))
    tracker.evaluated(rounds, fresh)
    tracker.update(rounds)
    run.seconds["evaluation"] += time.perf_counter() - t0
    run.history[-1].update({**tracker.round_row(fresh), "evaluated": len(fresh),
                            "evaluation_timing": replies.timing.to_json()})


def _retry_exchange(grid: Grid, server: _Server, run: _MethodRun, stage: str, rnd: int,
                    payloads: Mapping[int, Payload | None],
                    timeout: float | None = None) -> _Replies:
    """Send ``stage`` of round ``rnd`` once more to the clients of ``payloads``, after waiting
    up to the round timeout for their nodes to be online again; each reply is awaited up to
    ``timeout`` (default: the round timeout)."""
    _await_clients(grid, server, list(payloads))
    _say(f"{run.name} round {rnd}: {stage} sent again to clients {sorted(payloads)}")
    return _exchange_payloads(grid, server, run, stage, rnd, payloads,
                              server.settings.round_timeout if timeout is None else timeout,
                              find_moved=True)


def _every_reply(grid: Grid, server: _Server, run: _MethodRun, stage: str, rnd: int,
                 payloads: Mapping[int, Payload | None], timeout: float) -> _Replies:
    """The ``stage`` exchange of round ``rnd`` (setup or finalize) with an accepted reply from
    every client of ``payloads``, as the in-process runtime hands the method every client's.

    A client without one (offline, no reply in time, an error reply, a rejected reply) is
    asked once more with the same payload; a client answers a message it already answered
    from its saved state, so nothing is computed, drawn or released twice (under DP its
    ledger keeps one release; a ClientApp killed before it saved its answer re-makes it from
    its journal record, with the same noise, consuming its ledger entry). A client still
    without an accepted reply, or one that refused
    its release, stops the run with a DeployError naming the clients and their last events:
    the method would otherwise build its state (FEDORA's relatedness) or its results (a list
    per client) from part of the federation. An error reply that the same message raises
    again on every try (:func:`_stop_for_refusals`) stops it at once, that client not asked
    again; the advice to raise the timeouts is given only where a client was offline or sent
    no reply in time."""
    replies = _exchange_payloads(grid, server, run, stage, rnd, payloads, timeout)
    stops = f"{stage} needs every client's, so the run stops and no results are written"
    _stop_for_refusals(server, run.name, f"{stage} reply", replies.errors, stops)
    missed = [c for c in payloads if c not in replies.payloads and c not in replies.refused]
    unanswered = replies.unanswered
    if missed:
        again = _retry_exchange(grid, server, run, stage, rnd, {c: payloads[c] for c in missed},
                                timeout)
        _stop_for_refusals(server, run.name, f"{stage} reply", again.errors, stops)
        replies.payloads.update(again.payloads)
        replies.metrics.update(again.metrics)
        replies.refused |= again.refused
        unanswered = again.unanswered
    absent = sorted(set(payloads) - set(replies.payloads))
    if absent:
        last = {e["client"]: e["event"] for e in server.events
                if e.get("client") in absent and e.get("method") == run.name}
        why = "; ".join(f"client {c}: {last[c]}" for c in absent if c in last)
        asked = "asked twice" if missed else "asked once"
        raise DeployError(
            f"{run.name}: clients {absent} gave no accepted {stage} reply ({asked}), and the "
            f"method's {stops}; check those SuperNodes' logs"
            + (" or raise the timeouts" if unanswered & set(absent) else "")
            + (f" (last events: {why})" if why else ""))
    return replies


def _stop_for_refusals(server: _Server, scope: str, what: str, errors: Mapping[int, str],
                       stops: str) -> None:
    """Stop the run if an error reply of ``errors`` (client index -> its reason) is one the
    same message raises again on every try (:func:`deterministic_client_error`: the client's
    data, relatedness summary, config or model failed a check): a DeployError naming the
    first such client, its node, its error text as its ``client-errors`` lets it tell this
    server (withheld: the class name and a fixed sentence) and the other refusing clients,
    ending with ``stops`` (why the run cannot go on without it). Returns otherwise."""
    refusing = {c: " ".join(text.split())[:MAX_REFUSAL_CHARS] for c, reason in errors.items()
                if (text := deterministic_client_error(reason)) is not None}
    if not refusing:
        return
    first = min(refusing)
    others = sorted(set(refusing) - {first})
    mode = server.client_errors.get(first)
    raise DeployError(
        f"{scope}: client {first} (node {server.node_of_client.get(first)}) refused its {what}: "
        f"{refusing[first]}" + (f" [client-errors: {mode}]" if mode else "")
        + (f" (clients {others} refused too)" if others else "")
        + f"; asked again it would refuse again, so it is not asked again; the {stops}")


#: The ServerApp's checkpoint, in ``result-dir``: written atomically (SHA-256 checked, bound to
#: the run id and config hash) after the first contact, each method's setup, each round and
#: each method, so that ``resume`` continues the run from it.
SERVER_CHECKPOINT = Path("checkpoints") / "flower-server.pt"
_SERVER_FORMAT = "secure-fedora/flower-server/v1"

#: The results.json keys that state the ServerApp process that wrote it rather than the run:
#: a resume that trains nothing (its first contact made again, maybe with SuperNodes under new
#: node ids) keeps a document that differs from its own only there, and in what that first
#: contact appended to the run's ``events`` and ``security.rejections`` (restored from the
#: checkpoint: an edited, added or removed entry of the run's own is still a difference).
PROCESS_KEYS = _RUN_PROCESS_KEYS | {"seconds_total", "timings", "node_of_client", "max_in_flight"}


class ResumeRefused(DeployError):
    """A resume the ServerApp refuses before it writes anything (no checkpoint, or one of
    another run, configuration or method list, or of a finished run)."""


class ResultDirInUse(DeployError):
    """A new run the ServerApp refuses, before it writes anything, because its result-dir
    holds another run's checkpoint or results."""


#: What a run leaves in its result-dir that a new run there would overwrite (``failure.json``
#: alone is not one: a run that failed before its first checkpoint left nothing to keep).
_RUN_RECORD = (SERVER_CHECKPOINT, Path("results.json"), Path("anchor.json"), Path("rounds.csv"),
               Path("progress.json"))


def check_new_result_dir(result_dir: Path) -> None:
    """A new (not resumed) run may write into ``result_dir``: it holds no earlier run's
    ServerApp checkpoint or results, which the run would otherwise overwrite (the checkpoint
    that a resume needs, the results that the run's ledgers are anchored to); raises
    :class:`ResultDirInUse` naming them otherwise. Reads only."""
    held = [str(name) for name in _RUN_RECORD if (result_dir / name).exists()]
    if held:
        go_on = ("choose another result-dir (that run finished)"
                 if (result_dir / "results.json").exists() else
                 "resume that run (run config resume = <its run id>, `deploy local --resume`) "
                 "or choose another result-dir")
        raise ResultDirInUse(
            f"the result-dir {result_dir} holds another run's {', '.join(held)}; a new run "
            f"there would overwrite them: {go_on}; nothing was written")


def check_resumable(result_dir: Path, run_id: int, cfg: ExperimentConfig,
                    config_hash: str, server_state_dir: Path | None = None,
                    amendments: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The ServerApp checkpoint in ``result_dir`` that run ``run_id`` of ``cfg`` continues
    from, verified (digest, format, run id, config hash, method list, not finished; with
    ``server_state_dir``, every scope's nonce file still holds the nonce memory the
    checkpoint recorded; the config ``amendments``, :func:`new_amendments`); raises
    :class:`ResumeRefused` naming what differs otherwise. Reads only."""
    path = result_dir / SERVER_CHECKPOINT
    if not path.is_file():
        raise ResumeRefused(
            f"resume: {result_dir} holds no ServerApp checkpoint ({SERVER_CHECKPOINT}), so there "
            "is nothing to resume; start a new run (in a new result-dir)")
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ResumeRefused(f"resume: {err}; nothing was written") from None
    if state.get("format") != _SERVER_FORMAT:
        raise ResumeRefused(f"resume: {path} is not a ServerApp checkpoint "
                            f"(format {state.get('format')!r}); nothing was written")
    if state.get("run_id") != run_id:
        raise ResumeRefused(
            f"resume: {path} is the checkpoint of run {state.get('run_id')}, not of run "
            f"{run_id}; resume that run (resume = {state.get('run_id')}) or use a new "
            "result-dir; nothing was written")
    if state.get("methods") != list(cfg.methods):
        raise ResumeRefused(
            f"resume: {path} was written for the methods {state.get('methods')}, not "
            f"{list(cfg.methods)}; resume with the run's own config or use a new result-dir; "
            "nothing was written")
    if state.get("config_hash") != config_hash:
        raise ResumeRefused(
            f"resume: {path} was written for another configuration (config hash "
            f"{str(state.get('config_hash'))[:12]}..., this one {config_hash[:12]}...); resume "
            "with the run's own config or use a new result-dir; nothing was written (a Flower "
            "resume accepts no config change but one of fedora.max_pull alone, which "
            "`deploy local --resume` makes as an amendment)")
    if state.get("finished"):
        raise ResumeRefused(f"resume: run {run_id} in {result_dir} finished (its results are "
                            "written); there is nothing to resume")
    heads = state.get("nonce_heads", {})  # none in a checkpoint older than the field
    if not isinstance(heads, dict) or not all(
            scope in (HELLO_SCOPE, *cfg.methods) and is_nonce_head(head)
            for scope, head in heads.items()):
        raise ResumeRefused(f"resume: {path} records a malformed nonce memory; nothing was "
                            "written")
    compute = state.get("client_compute", {})  # none in a checkpoint older than the field
    if not isinstance(compute, dict) or not all(
            isinstance(c, int) and isinstance(stated, list) and all(
                isinstance(s, dict) and set(s) == {"device", "threads"}
                and _compute_problem(s["device"], s["threads"]) is None for s in stated)
            for c, stated in compute.items()):
        raise ResumeRefused(f"resume: {path} records a malformed client compute; nothing was "
                            "written")
    for scope, head in sorted(heads.items()) if server_state_dir is not None else ():
        nonces = server_nonce_path(_scope_dir(server_state_dir, run_id, scope))
        try:
            check_nonce_memory(nonces, head)
        except EnvelopeStateError as err:
            raise ResumeRefused(
                f"resume: {err} (the ServerApp checkpoint {path} records them). Restore the "
                "server-state-dir from a copy, or start a new run; nothing was written"
            ) from None
    new_amendments(result_dir, state, cfg, amendments)
    return state


def amendment_point(state: Mapping[str, Any], cfg: ExperimentConfig) -> tuple[str, int, int]:
    """Where a resume from the ServerApp checkpoint ``state`` makes a config amendment: the
    method it continues, the round it resumes at and the round from which the amended value
    applies. For a method in flight checkpointed after round ``C`` that is ``C + 2``: round
    ``C + 1`` may have been sent before the ServerApp died, and it is sent again and re-made
    as it was (a node that answered it answers from its saved state, one that admitted its
    release re-makes it from its journal: "resume diverged" if anything changed), with or
    without DP; the server cannot see the nodes' journals, so it never amends that round.
    Between methods (or before the first), the next method's round 1; so also after a method
    in flight whose last round is checkpointed, when a method follows it (only its finalize
    is sent again: the in-process runtime's checkpoint of that round holds the method's
    outcome, and it records the same point). ResumeRefused when every method has finished
    (only the results are left to write): no round is left to amend."""
    current = state.get("current")
    outcomes = state.get("outcomes", {})
    if current is not None:
        done = int(current["round"])
        after = cfg.methods[cfg.methods.index(str(current["method"])) + 1:]
        if done < cfg.training.rounds or not after:
            return str(current["method"]), done + 1, done + 2
        return after[0], 1, 1
    left = [m for m in cfg.methods if m not in outcomes]
    if not left:
        raise ResumeRefused(
            "resume: every method of the run has finished (only its results are left to "
            "write), so a config amendment has no round to apply to; resume with the run's own "
            "config; nothing was written")
    return left[0], 1, 1


def new_amendments(result_dir: Path, state: Mapping[str, Any], cfg: ExperimentConfig,
                   amendments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The amendments of ``amendments`` (the run config's, ``cfg`` the run's original config)
    this resume makes: those after the ones ``result_dir``'s ``amendments.json`` records,
    which they must begin with, each made at :func:`amendment_point` of ``state``.
    ResumeRefused naming what differs otherwise. Reads only."""
    from secure_fedora.runtimes.rundir import (
        AMENDMENTS,
        RunDirError,
        amendment_applies_to,
        amendment_has_rounds,
        recorded_amendments,
    )

    try:
        recorded = recorded_amendments(result_dir)
    except RunDirError as err:
        raise ResumeRefused(f"resume: {err}; nothing was written") from None
    given = [dict(a) for a in amendments]
    if given[:len(recorded)] != recorded:
        raise ResumeRefused(
            f"resume: the run config's amendments {given} do not begin with those "
            f"{result_dir / AMENDMENTS} records ({recorded}); nothing was written")
    new = given[len(recorded):]
    if not new:  # nothing to place (a run whose methods all finished has no amendment point)
        return new
    method, resumed, effective = amendment_point(state, cfg)
    for a in new:
        if (a["method"], a["resumed_at_round"], a["effective_from_round"], a["applies_to"]) != \
                (method, resumed, effective,
                 amendment_applies_to(cfg, a["key"], method, effective)):
            raise ResumeRefused(
                f"resume: the amendment of {a['key']} is made at {method!r} round {resumed} "
                f"and applies from round {effective} (the checkpoint's round in flight is re-made "
                f"as it was), not at {a['method']!r} round {a['resumed_at_round']} from round "
                f"{a['effective_from_round']} (methods reading it from then: "
                f"{amendment_applies_to(cfg, a['key'], method, effective)}, given "
                f"{a['applies_to']}); nothing was written")
        if not amendment_has_rounds(cfg, a["applies_to"]):
            raise ResumeRefused(
                f"resume: the amendment of {a['key']} applies from {a['applies_to']}, after the "
                f"run's last round ({cfg.training.rounds}): no round is left to run under it; "
                "resume with the run's own config (a new run applies the value); nothing was "
                "written")
    return new


def _record_amendments(server: _Server, state: Mapping[str, Any]) -> None:
    """Write the amendments this resume makes to ``result-dir/amendments.json`` (atomically,
    before anything runs under them) and say so."""
    from secure_fedora.runtimes.rundir import AMENDMENTS

    assert server.settings.result_dir is not None  # a resume has one
    result_dir = server.settings.result_dir
    new = new_amendments(result_dir, state, server.cfg, server.settings.amendments)
    if not new:
        return
    atomic_write_text(result_dir / AMENDMENTS,
                      json.dumps(list(server.settings.amendments), indent=2) + "\n")
    for a in new:
        # where it applies (as in process): made during a method that does not read the key,
        # the amendment's own round is none that runs under it
        shown = ", ".join(f"round {r} of {m}" for m, r in a["applies_to"].items())
        _say(f"resumed with {a['key']} = {a['to']} (the run had {a['from']}) from {shown}: "
             f"recorded in {result_dir / AMENDMENTS}")


def _algorithm_state(algorithm: Any, name: str) -> dict[str, Any]:
    """The server half's state: its server state dict and, for a method of client rows, the
    rows as the server last received them (which a method's server state may be computed
    from). The clients' own state lives on their nodes."""
    with server_half(algorithm, name, "server_state_dict() for the checkpoint"):
        server = algorithm.server_state_dict()
    state: dict[str, Any] = {"server": server}
    theta = getattr(algorithm, "theta", None)
    if isinstance(theta, Tensor):
        state["theta"] = theta
    return state


def _load_algorithm_state(algorithm: Any, name: str, state: Mapping[str, Any]) -> None:
    """Restore :func:`_algorithm_state` (the rows first: a server state may need them); a
    plug-in's ``load_server_state_dict`` that raises is a PluginError naming it
    (:func:`server_half`)."""
    if "theta" in state:
        theta = state["theta"]
        if not isinstance(theta, Tensor) or theta.shape != algorithm.theta.shape:
            raise ValueError(f"the rows are not a {tuple(algorithm.theta.shape)} tensor")
        algorithm.theta.copy_(theta)
    with server_half(algorithm, name, "load_server_state_dict(state) for the resume"):
        algorithm.load_server_state_dict(state["server"])


def _save_server_checkpoint(server: _Server, current: dict[str, Any] | None,
                            finished: bool = False) -> None:
    """Write the ServerApp checkpoint (nothing without a result-dir): what it cannot
    recompute. The first contact, the models' and data checks and the privacy plans are
    done again by a resume; the nodes keep their own state."""
    if server.settings.result_dir is None:
        return
    crash_point("checkpoint")
    assert server.schema is not None
    state = {
        "round": int(current["round"]) if current is not None else 0,
        "format": _SERVER_FORMAT,
        "run_id": int(server.run_id),
        "config_hash": server.settings.config_hash,
        "methods": list(server.cfg.methods),
        "finished": finished,
        "elapsed": time.time() - server.started,
        "schema": [list(server.schema.input_shape), server.schema.num_classes,
                   server.schema.multilabel],
        "sizes": {c: dict(v) for c, v in server.sizes.items()},
        "client_errors": dict(server.client_errors),
        "client_compute": {c: [dict(s) for s in v] for c, v in server.client_compute.items()},
        "compute_before_resume_unknown": server.compute_before_resume_unknown,
        "data_fingerprints": dict(server.data_fingerprints),
        "events": server.events,
        "rejections": server.rejections,
        "privacy": server.privacy,
        "refused": {name: dict(sorted(at.items())) for name, at in server.refused.items()},
        "refusals": server.refusals,
        "timings": server.timings,
        "relatedness_timing": server.relatedness_timing,
        "relatedness_details": server.relatedness_details,
        "relatedness": server.relatedness,
        "history": server.history,
        "outcomes": server.outcomes,
        "resumes": server.resumes,
        "current": current,
        "nonce_heads": server.recorded_nonce_heads(),
    }
    save_checkpoint(server.settings.result_dir / SERVER_CHECKPOINT, state)
    crash_point("checkpoint_written")


def _restore_server(server: _Server, state: Mapping[str, Any]) -> None:
    """Take the checkpoint's record of the run (events, rejections, reported ledger heads,
    refusals, timings, finished methods) into ``server``."""
    server.started = time.time() - float(state["elapsed"])
    server.client_errors = {int(c): str(v) for c, v in state["client_errors"].items()}
    # what the clients stated before: the resume's first contact adds to it (a change is an
    # event); a checkpoint without it (an older ServerApp's) leaves it unknown, and so stated
    compute = state.get("client_compute")
    server.client_compute = {c: [dict(s) for s in stated] for c, stated in (compute or {}).items()}
    server.compute_before_resume_unknown = compute is None or bool(
        state.get("compute_before_resume_unknown", False))
    # what the clients' hellos stated before (absent: an older checkpoint, nothing to compare)
    server.data_fingerprints = {int(c): str(v) for c, v in
                                state.get("data_fingerprints", {}).items()}
    server.events = list(state["events"])
    server.rejections = list(state["rejections"])
    server.privacy = {name: dict(rows) for name, rows in state["privacy"].items()}
    # an older checkpoint lists the refused clients without their round: -1, as in process
    # for a client refused before a restart
    server.refused = {name: ({int(c): int(r) for c, r in at.items()} if isinstance(at, Mapping)
                             else dict.fromkeys((int(c) for c in at), -1))
                      for name, at in state["refused"].items()}
    recorded = state.get("refusals")  # absent: an older checkpoint, whose events name them
    server.refusals = ({name: [dict(r) for r in rows] for name, rows in recorded.items()}
                       if isinstance(recorded, Mapping) else _refusals_of(server.events))
    server.timings = dict(state["timings"])
    server.relatedness_timing = dict(state["relatedness_timing"])
    server.relatedness_details = dict(state["relatedness_details"])
    server.relatedness = state["relatedness"]
    server.history = list(state["history"])
    server.outcomes = dict(state["outcomes"])
    server.resumes = {name: [dict(r) for r in rows]  # absent: an older checkpoint
                      for name, rows in state.get("resumes", {}).items()}
    server.nonce_heads = {scope: dict(head) for scope, head in
                          state.get("nonce_heads", {}).items()}


#: How a refused release's run-level event begins (:meth:`_Server.refusal`).
_REFUSAL_EVENT = "refused its release ("


def _refusals_of(events: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every method's refused releases as the run-level ``events`` an older checkpoint
    recorded state them (:meth:`_Server.refusal`'s text; what follows the reason, the
    server's own words, holds no "): ")."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        text = str(e.get("event", ""))
        if e.get("method") is None or e.get("client") is None or not text.startswith(
                _REFUSAL_EVENT) or "): " not in text:
            continue
        reason = text[len(_REFUSAL_EVENT):].rpartition("): ")[0]
        out.setdefault(str(e["method"]), []).append(
            {"round": int(e["round"]), "client": int(e["client"]), "detail": reason})
    return out


def _check_same_clients(server: _Server, state: Mapping[str, Any]) -> None:
    """The clients a resume found report the data facts of the run it continues."""
    assert server.schema is not None
    shape, classes, multilabel = state["schema"]
    before = DataSchema(tuple(int(v) for v in shape), int(classes), bool(multilabel))
    sizes = {int(c): dict(v) for c, v in state["sizes"].items()}
    if before != server.schema or sizes != server.sizes:
        raise DeployError(
            f"resume: the clients report other data facts ({server.schema}, {server.sizes}) "
            f"than in the run it continues ({before}, {sizes}); their data changed, so the run "
            "cannot continue (start a new run)")


def _round_statistics(algorithm: Any, name: str, rnd: int,
                      replies: Mapping[int, Payload]) -> dict[str, Any]:
    """What the round's clients did, as the in-process round reports it (the algorithm's
    ``round_statistics`` over the accepted replies, where it defines one)."""
    statistics = getattr(algorithm, "round_statistics", None)
    if statistics is None:
        return {}
    with server_half(algorithm, name, f"round_statistics(rnd, replies) of round {rnd}"):
        return dict(statistics(rnd, replies))


def _sat_out_statistics(algorithm: Any, name: str, rnd: int, reasons: Mapping[int, str]) -> Any:
    """The algorithm's ``sat_out_statistics`` for the clients that sat round ``rnd`` out,
    where it defines one (as :func:`_round_statistics`)."""
    statistics = getattr(algorithm, "sat_out_statistics", None)
    if statistics is None:
        return {}
    with server_half(algorithm, name, f"sat_out_statistics(rnd, reasons) of round {rnd}"):
        return statistics(rnd, dict(reasons))


def _method_state(run: _MethodRun, rnd: int, round_gen: torch.Generator,
                  failed_replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint's ``current``: method ``run`` after round ``rnd`` (0: its setup)."""
    return {
        "method": run.name,
        "round": rnd,
        "algorithm": _algorithm_state(run.algorithm, run.name),
        "tracker": run.tracker.state_dict(),
        "round_generator": round_gen.get_state(),
        "history": run.history,
        "seconds": run.seconds,
        "evaluated": sorted(run.evaluated),
        "answered_last": sorted(run.answered_last),
        "answered": run.answered,
        "failed_replies": failed_replies,
        "tracker_before_final": run.before_final,
    }


def _restore_method(run: _MethodRun, state: Mapping[str, Any], round_gen: torch.Generator,
                    failed_replies: list[dict[str, Any]]) -> int:
    """Restore :func:`_method_state` into ``run``; returns the round it was written after."""
    try:
        _load_algorithm_state(run.algorithm, run.name, state["algorithm"])
        for key, value in state["tracker"].items():
            getattr(run.tracker, key).copy_(value)
        round_gen.set_state(state["round_generator"])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
        raise unrestorable(f"the ServerApp checkpoint of {run.name!r}", err)  # noqa: B904
    run.history = list(state["history"])
    run.seconds = dict(state["seconds"])
    run.evaluated = set(state["evaluated"])
    run.answered_last = set(state["answered_last"])
    run.answered = {int(c): dict(v) for c, v in state["answered"].items()}
    run.before_final = state.get("tracker_before_final")  # absent: an older checkpoint
    failed_replies.extend(state["failed_replies"])
    return int(state["round"])


def _setup_method(grid: Grid, server: _Server, run: _MethodRun, ceremony: str | None) -> None:
    """Method ``run``'s setup: its ceremony, or its setup exchange when it has messages."""
    name, algorithm = run.name, run.algorithm
    n, num_params = server.cfg.data.num_clients, algorithm.ctx.flat.num_params
    setup: dict[int, Payload] = {}
    if ceremony is None:
        with server_half(algorithm, name, "setup_messages()"):
            messages = algorithm.setup_messages()
        setup = check_messages(name, SETUP, 0, messages, range(n), num_params)
    t0 = time.perf_counter()
    if ceremony is not None:
        protocol = CEREMONIES.get(ceremony)
        if protocol is None:
            raise DeployError(f"method {name!r} needs the setup ceremony {ceremony!r}, which the "
                              f"Flower runtime does not implement (it knows {sorted(CEREMONIES)})")
        result = protocol(grid, server)
        with server_half(algorithm, name, f"server_setup_from_ceremony({ceremony!r}, result)"):
            algorithm.server_setup_from_ceremony(ceremony, result)
        for cid in server.ceremony_answered.pop(name, set()):  # its setup replies, accepted
            run.answered.setdefault(cid, {})["setup"] = 0
    elif setup:
        replies = _every_reply(grid, server, run, "setup", 0, setup, _relatedness_wait(server))
        with server_half(algorithm, name, "server_setup(replies)"):
            algorithm.server_setup(replies.payloads)
        server.timings.setdefault(name, {})["setup"] = replies.timing.to_json()
    server.timings.setdefault(name, {})["setup_s"] = round(time.perf_counter() - t0, 4)
    if ceremony is not None or setup:
        how = f"ceremony {ceremony}" if ceremony is not None else "exchange"
        _say(f"{name}: setup {how} done in {time.perf_counter() - t0:.2f} s")


def _pull_warning(server: _Server, name: str) -> str | None:
    """The plan's warning that FEDORA's noised lambda is expected to make the pull unstable
    at least once (:func:`~secure_fedora.secure.private.pull_warning`, the in-process
    runtime's), or None (no DP, or nothing to warn about)."""
    from secure_fedora.secure.private import client_budget, plan_table

    if name not in server.plans:
        return None
    choice, plans = server.plans[name]
    budgets = [client_budget(server.cfg, c) for c in range(server.cfg.data.num_clients)]
    rows = plan_table(server.cfg, name, budgets, plans, choice.name, choice, {})
    return rows[0].get("pull_warning") if rows else None


def _run_method(grid: Grid, server: _Server, name: str,
                resumed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Drive method ``name``'s server half through the contract; its ``methods.<name>``.
    ``resumed`` (a checkpoint's ``current``) continues it after the round it was written
    after, its setup done; the round in flight then is sent again (each node answers what it
    saved from its saved state; under DP one killed before saving its answer re-makes the
    round's release from its journal record, same noise, accounted once)."""
    from secure_fedora.runtimes.plots import relatedness_matrix
    from secure_fedora.runtimes.results import method_entry

    cfg = server.cfg
    n = cfg.data.num_clients
    server.scope = name
    assert server.schema is not None
    algorithm = build_algorithm(name, server_context(cfg, server.schema), cfg)
    server.model_fingerprints[name] = model_fingerprint(algorithm.ctx.flat.module)
    run = _MethodRun(name, algorithm, PayloadLimits.for_model(algorithm.ctx.flat.num_params),
                     Tracker.empty(n, select_final=model_selection(cfg) == "final_round"))
    run.schema = algorithm.reply_schema or ReplySchema.of(algorithm)
    with server_half(algorithm, name, "setup_ceremony()"):
        ceremony = algorithm.setup_ceremony()
    num_params = algorithm.ctx.flat.num_params
    rounds = cfg.training.rounds
    round_gen = torch.Generator().manual_seed(cfg.seed + 7919)
    failed_replies: list[dict[str, Any]] = []  # training replies that errored or were rejected
    warning = _pull_warning(server, name)
    if warning is not None:  # as in process: before the method's first release
        _say(f"{name}: warning: {warning}")
    if resumed is not None:
        first = _restore_method(run, resumed, round_gen, failed_replies) + 1
        _say(f"{name}: resumed after round {first - 1}")
    else:
        _setup_method(grid, server, run, ceremony)
        first = 1
        server.write("progress.json", {"run_id": server.run_id, "method": name, "round": 0,
                                       "rows": run.history})
        _save_server_checkpoint(server, _method_state(run, 0, round_gen, failed_replies))
    for rnd in range(first, rounds + 1):
        participants = sample_participants(cfg, round_gen, n)
        t0 = time.perf_counter()
        apply_amendments(server.settings, name, algorithm, rnd)
        with server_half(algorithm, name, f"configure(rnd, participants) of round {rnd}"):
            configured = algorithm.configure(rnd, participants)
        messages = check_messages(name, ROUND, rnd, configured, participants, num_params)
        seen = len(server.events)
        replies = _exchange_payloads(grid, server, run, "round", rnd, messages,
                                     server.settings.round_timeout)
        failed_replies.extend(e for e in server.events[seen:]
                              if str(e["event"]).startswith(("error reply", "message rejected")))
        if replies.payloads:
            stats = _round_statistics(algorithm, name, rnd, replies.payloads)
            with server_half(algorithm, name, f"aggregate(rnd, replies) of round {rnd}"):
                update = algorithm.aggregate(rnd, replies.payloads)
            stats = round_statistics_of(name, rnd, stats, update)
        else:  # as in process for a round with no accepted reply: no update, no statistic
            with server_half(algorithm, name, f"round_discarded(rnd) of round {rnd}"):
                algorithm.round_discarded(rnd)
            stats = no_reply_statistics()
        if replies.sat_out:
            # statistics over accepted replies leave out what those clients' error replies
            # say (e.g. an unstable pull): the method says which statistic that affects
            stats = with_sat_out_statistics(
                name, rnd, stats, _sat_out_statistics(algorithm, name, rnd, replies.sat_out))
        seconds = time.perf_counter() - t0
        run.seconds["training"] += seconds
        row: dict[str, Any] = {"method": name, "round": rnd, "participants": len(participants),
                               "replied": len(replies.payloads), **stats,
                               "seconds": round(seconds, 4), "timing": replies.timing.to_json()}
        if rnd % cfg.evaluation.every == 0 or rnd == rounds:
            t0 = time.perf_counter()
            before = ({k: v.clone() for k, v in run.tracker.state_dict().items()}
                      if rnd == rounds else None)
            row.update(_evaluate(grid, server, run, rnd))
            if rnd == rounds and len(run.answered_last) < n:
                run.before_final = before
            run.seconds["evaluation"] += time.perf_counter() - t0
        run.history.append(row)
        _say(round_line(name, rnd, rounds, f"{row['replied']}/{row['participants']} replied, "
                        f"{row['seconds']:.2f} s"
                        + (f", mean test metric {row['test_mean']:.4f}"
                           if row.get("test_mean") is not None else "")))
        server.write("progress.json", {"run_id": server.run_id, "method": name, "round": rnd,
                                       "rows": run.history})
        _save_server_checkpoint(server, _method_state(run, rnd, round_gen, failed_replies))
    if first > rounds >= 1 and len(run.answered_last) < n:
        # resumed after the last round, whose final evaluation some clients did not answer
        # (its checkpoint is written before the checks below fail the run)
        apply_amendments(server.settings, name, algorithm, rounds)  # as the round had them
        _finish_final_evaluation(grid, server, run, rounds, run.before_final)
        if len(run.answered_last) == n:
            run.before_final = None
        server.write("progress.json", {"run_id": server.run_id, "method": name,
                                       "round": rounds, "rows": run.history})
        _save_server_checkpoint(server, _method_state(run, rounds, round_gen, failed_replies))
    again = ("; once their nodes are fixed, resuming the run (`deploy local --resume`, run "
             f"config resume = {server.run_id}) asks them again"
             if server.settings.result_dir is not None else "")
    silent = sorted(set(range(n)) - run.evaluated)
    if silent:
        # their metrics would be the tracker's zero placeholders: made-up results
        last = {e["client"]: e["event"] for e in server.events
                if e.get("client") in silent and e.get("method") == name}
        why = "; ".join(f"client {c}: {last[c]}" for c in silent if c in last)
        raise DeployError(
            f"{name}: clients {silent} never reported an evaluation, so their metrics are"
            " unknown and no results are written"
            + (f"; their last events: {why}" if why else
               " (no reply within the round timeout of"
               f" {format_exact(server.settings.round_timeout)} s in"
               " any evaluated round; raise the round timeout, a ClientApp process takes"
               " seconds to start, or check those SuperNodes' logs)")
            # a resume asks again the clients it records as not answering the final evaluation
            + (again if not set(silent) & run.answered_last else ""))
    if rounds and failed_replies and not any(row["replied"] for row in run.history):
        # every training reply failed or was rejected in every round: nothing was trained
        last = failed_replies[-1]
        raise DeployError(
            f"{name}: no client's training reply was accepted in any of the {rounds} rounds "
            f"and {len(failed_replies)} failed or were rejected (last: client "
            f"{last.get('client')}: {last.get('event')}); the model was never trained, so no "
            "results are written")
    unclosed = sorted(set(range(n)) - run.answered_last) if cfg.privacy.enabled else []
    if unclosed:
        # a DP client closes its ledger when it answers the final evaluation: without the
        # close entry its ledger fails every audit, so a "completed" run would be unverifiable
        last = {e["client"]: e["event"] for e in server.events
                if e.get("client") in unclosed and e.get("method") == name}
        why = "; ".join(f"client {c}: {last[c]}" for c in unclosed if c in last)
        raise DeployError(
            f"{name}: clients {unclosed} did not answer the final evaluation (round {rounds}), "
            "asked twice, where a DP client closes its ledger (or their answers were lost); "
            "their ledgers may stay open and the run could not be verified, so no results are "
            "written; check those SuperNodes' logs or raise the round timeout"
            + (f" (last events: {why})" if why else "") + again)
    apply_amendments(server.settings, name, algorithm, rounds)  # as in process after its last round
    with server_half(algorithm, name, "finalize_messages()"):
        finalize = algorithm.finalize_messages()
    final = check_messages(name, FINALIZE, rounds, finalize, range(n), num_params)
    final_payloads: dict[int, Payload] = {}
    if final:
        replies = _every_reply(grid, server, run, "finalize", rounds + 1, final,
                               server.settings.round_timeout)
        final_payloads = replies.payloads
        server.timings.setdefault(name, {})["finalize"] = replies.timing.to_json()
    with server_half(algorithm, name, "server_finalize(replies)"):
        results = algorithm.server_finalize(final_payloads)
    extra = check_finalize_results(name, results)
    engine = flower_training_engine(cfg, run.history)
    if engine:  # as in process, only where an engine other than the default loop was asked for
        extra["training_engine"] = engine
    server.history.extend(run.history)
    if server.relatedness is None:
        server.relatedness = relatedness_matrix([algorithm])
    t = run.tracker
    selected = {**summarize(t.test_at_best), "round": int(t.best_round),
                **stale_clients(metric_rounds(t.selected_metric_round), int(t.best_round), n),
                **unmeasured_rounds(run.history, int(t.eligible_from))}
    final = {**summarize(t.last_test), **stale_clients(metric_rounds(t.metric_round), rounds, n)}
    return method_entry(name, selected, final, rounds, round(run.seconds["training"], 3),
                        round(run.seconds["evaluation"], 3), extra)


#: Why a Flower run trains with the per-client loop whatever ``[training] engine`` asks.
FLOWER_ENGINE_REASON = ("a Flower ClientApp trains its one client with the per-client loop; the "
                        "batched engine trains a round's participants together in one process, "
                        "which only the in-process runtime does")


def flower_training_engine(cfg: ExperimentConfig,
                           history: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """results.json's ``methods.<name>.extra.training_engine`` on Flower
    (:func:`~secure_fedora.algorithms.methods.training_engine_entry`, the in-process shape):
    ``{}`` for the default loop (as in process), else the engine that trained (``setting``:
    always ``"loop"``), what was asked (``choice``) and why the loop trained (``reason``), so
    a run asking for the batched engine is told it did not get it; ``runs``: the loop's
    passes, one per round of the method's ``history`` with an accepted training reply (a
    reply the server rejected is not seen as trained); ``fallbacks`` empty (the loop is what
    the setting resolves to on Flower, not a fallback from it)."""
    from secure_fedora.algorithms.methods import training_engine_entry

    asked = cfg.training.engine
    if asked == "loop":
        return {}
    trained = sum(1 for row in history if row.get("replied"))
    return training_engine_entry(
        setting="loop", choice=f"training.engine = {asked!r} on Flower: the per-client loop",
        reason=FLOWER_ENGINE_REASON, runs={"loop": trained} if trained else {}, fallbacks={})


def _model_fingerprint(server: _Server, name: str) -> str:
    """The fingerprint of the model this server builds for method ``name`` (recorded when the
    method ran; a method a resumed ServerApp took finished from its checkpoint builds it
    again: the same config and schema give the same model)."""
    if name not in server.model_fingerprints:
        assert server.schema is not None
        algorithm = build_algorithm(name, server_context(server.cfg, server.schema), server.cfg)
        server.model_fingerprints[name] = model_fingerprint(algorithm.ctx.flat.module)
    return server.model_fingerprints[name]


def _privacy_section(server: _Server, name: str) -> dict[str, Any]:
    """``privacy.<name>``: each client's spending as it last reported it (signed), and the
    stages each of its releases passes on its node (every reply signed by its pipeline)."""
    from secure_fedora.secure.private import (
        client_budget,
        client_row,
        noise_assumptions,
        plan_table,
        privacy_section,
        refusal_event,
        release_stage_names,
        sample_rate_for,
        steps_per_round,
    )

    cfg = server.cfg
    reported = server.privacy.get(name, {})
    refused = server.refused.get(name, {})
    choice, plans = server.plans[name]
    stages = release_stage_names(cfg, name, signed=True)
    budgets = [client_budget(cfg, c) for c in range(cfg.data.num_clients)]

    # each client's plan as it reported it (a resumed PRV run ledgered before PRV's refining
    # pass keeps that plan); the plan table has one set of rows per plan the clients used
    used = {c: _plan_used(server, name, c, reported.get(c, {})) for c in range(len(budgets))}
    admitted = dict(_config_plans(server, name)) if not all(used.values()) else {True: plans}
    table = []
    for refine in (True, False):
        group = [budgets[c] for c in range(len(budgets)) if used[c] is refine]
        if group:
            rows = plan_table(cfg, name, group, admitted[refine], choice.name, choice, stages)
            table += [row if refine else {**row, "prv_refine": False} for row in rows]

    def row(c: int) -> dict[str, Any]:
        # the client's own report where it made one (the budget it enforces included),
        # else the config's calibration for it
        budget = budgets[c]
        plan = admitted[used[c]][(budget.epsilon, budget.delta)]
        said = reported.get(c, {})
        own = "noise_multiplier" in said
        return client_row(
            client=server.client_ids[c], index=c,
            epsilon_budget=said.get("epsilon_budget", budget.epsilon),
            delta=budget.delta, epsilon_spent=said.get("epsilon_spent"),
            noise_multiplier=said["noise_multiplier"] if own else plan.dpsgd_noise,
            accountant=said["accountant"] if own else choice.name,
            summary_noise=said.get("summary_noise") if own else plan.summary_noise,
            lambda_noise=said.get("lambda_noise") if own else plan.lambda_noise,
            mechanism_noise=said.get("mechanism_noise", {}) if own
            else dict(plan.mechanism_noise),
            plan_reported=own, refused_at_round=refused.get(c),
            ledger_entries=said.get("ledger_entries"), ledger_head=said.get("ledger_head"))

    return privacy_section(
        method=name, noise=noise_assumptions(cfg), accountant=choice.name,
        accountant_choice=choice.to_json(), plan=table, release_stages=stages,
        sample_rate=sample_rate_for(cfg), steps_per_round=steps_per_round(cfg),
        model_fingerprint=_model_fingerprint(server, name), note=FLOWER_PRIVACY_NOTE,
        clients=[row(c) for c in range(cfg.data.num_clients)],
        events=[refusal_event(rnd=int(r["round"]), client=server.client_ids[int(r["client"])],
                              detail=str(r["detail"])) for r in server.refusals.get(name, [])],
        # each SuperNode repairs its own ledger and journal and logs it: not the server's to see
        recoveries=None, resumes=server.resumes.get(name, []))


#: ``privacy.<method>.note`` of a Flower run: where its figures come from.
FLOWER_PRIVACY_NOTE = (
    "budgets and plan as calibrated from the config (every client calibrates its own the same "
    "way; a resumed PRV run ledgered before PRV's refining pass keeps its ledgers' plan: "
    "prv_refine false); each client's noise and spending as last reported by it in a signed "
    "reply (plan_reported false: a client that reported no plan, an older ClientApp, is stated "
    "with the config's calibration); its signed ledger is the record")


def run_federation(grid: Grid, settings: RunSettings, run_id: int) -> dict[str, Any]:
    """Run every configured method over the grid; returns (and writes) the results document.

    With ``settings.resume`` the run continues run ``resume`` from its ServerApp checkpoint
    in the result-dir (:func:`check_resumable`, before anything is written; Flower's
    ``run_id`` is then not used): the first contact is made again, then the finished methods
    are taken from the checkpoint and the method in flight goes on after its last
    checkpointed round."""
    from secure_fedora.runtimes.plots import write_plots
    from secure_fedora.runtimes.results import (
        FLOWER_FINGERPRINT_UNDER_DP,
        build_results,
        check_method_assumptions,
        client_rows,
        remove_interrupted_result_writes,
        timing_statement,
        write_rounds_csv,
        write_run_results,
    )
    from secure_fedora.secure.private import noise_assumptions

    cfg = settings.experiment
    check_supported(cfg, settings.reproducible_dp_noise, settings.compare_methods)
    check_method_assumptions(cfg)  # results.json states them: asked before any message, as in process
    plans = {}
    if cfg.privacy.enabled:  # a plan over any client's budget stops here, before any message
        from secure_fedora.secure.private import check_budget_plans

        plans = {name: check_budget_plans(cfg, name, cfg.data.num_clients) for name in cfg.methods}
    run_id = settings.run_id(run_id)
    resumed = None
    if settings.resume:
        assert settings.result_dir is not None  # RunSettings requires it
        resumed = check_resumable(settings.result_dir, run_id, cfg, settings.config_hash,
                                  settings.server_state_dir, settings.amendments)
    elif settings.amendments:
        raise ResumeRefused("run config key 'amendments' amends a resumed run's config; a new "
                            "run takes its config as given: leave it out (or empty)")
    elif settings.result_dir is not None:
        check_new_result_dir(settings.result_dir)
    torch.set_num_threads(settings.num_threads)
    if settings.result_dir is not None:
        from secure_fedora.core.files import remove_interrupted_writes

        for leftover in [*remove_interrupted_result_writes(settings.result_dir),
                         *remove_interrupted_writes(settings.result_dir / SERVER_CHECKPOINT)]:
            _say(f"removed {leftover}, a result write of an earlier ServerApp that was interrupted")
    n = cfg.data.num_clients
    server = _Server(settings=settings, run_id=run_id, plans=plans)
    restored: dict[tuple[str, ...], int] = {}
    if resumed is not None:
        _restore_server(server, resumed)
        # the run's records as checkpointed: a resume's first contact may append to them
        restored = {("events",): len(server.events),
                    ("security", "rejections"): len(server.rejections)}
        _say(f"run {run_id}: resuming from {settings.result_dir / SERVER_CHECKPOINT} "
             f"({sorted(server.outcomes)} finished)")
    engine = flower_training_engine(cfg)
    if engine:  # told, never silently: results.json states it per method too
        _say(f"warning: {engine['choice']} ({engine['reason']})")
    _say(f"run {run_id}: waiting for {n} SuperNodes (config {settings.config_hash[:12]})")
    connected_by = time.monotonic() + settings.connect_timeout
    nodes = _wait_for_nodes(grid, n, settings.connect_timeout, settings.poll_interval)
    server.nodes = nodes
    _hello(grid, server, nodes, until=connected_by)
    checked = model_size_checked(cfg.methods)
    if checked:  # the model's size is known from the schema: refuse before any method runs
        assert server.schema is not None
        ctx = server_context(cfg, server.schema)
        check_model_sizes(checked, cfg, ctx.flat.num_params, ctx.init.dtype)
    checked = data_checked(cfg.methods)
    if checked:  # so are the data's shapes and split sizes (what every client reported)
        assert server.schema is not None
        check_data_facts(checked, cfg, _data_facts(server.schema, server.sizes, n))
    current = None
    # a resume of a ServerApp killed after its last method's checkpoint (before results.json,
    # the anchor or its finished checkpoint) trains nothing: as in process, it keeps the run's
    # files whole and writes only what is left, a missing or damaged file with a warning
    trained_nothing = resumed is not None and set(cfg.methods) <= set(server.outcomes)
    if resumed is not None:
        _check_same_clients(server, resumed)
        current = resumed["current"]
        _record_amendments(server, resumed)
        if cfg.privacy.enabled and not trained_nothing:
            _record_resume(server, current)
    else:
        _save_server_checkpoint(server, None)
    for name in cfg.methods:
        if name in server.outcomes:  # finished before the checkpoint
            continue
        at = current if current is not None and current["method"] == name else None
        server.outcomes[name] = _run_method(grid, server, name, at)
        if settings.result_dir is not None:  # as in process: rewritten after each method
            write_rounds_csv(settings.result_dir, server.history)
        _save_server_checkpoint(server, None)
    outcomes = {name: server.outcomes[name] for name in cfg.methods}
    server.scope = HELLO_SCOPE
    assert server.schema is not None
    metric = server_context(cfg, server.schema).flat.task.metric_name
    assumptions = {
        "dp_noise": (
            None if not cfg.privacy.enabled
            else "csprng: each client draws a fresh ChaCha20 key from os.urandom per message "
            "(never stored); Gaussians hardened against floating-point attacks"
            if cfg.privacy.noise == "csprng"
            else "reproducible: seeded from the experiment seed, which the server knows: no DP "
            "guarantee against the server (reproducible-dp-noise test deployment)"
        ),
        **noise_assumptions(cfg),
        "transport": "TLS; node authentication is a SuperLink setting",
        "envelopes": (
            "every message signed (Ed25519, privacy.envelope) over a digest of its whole "
            "content, run id and config hash; verified against the allowlist, nonces "
            "remembered on disk"
        ),
        "data": "the server holds no client data; clients report split sizes and the data "
                "schema at first contact" + (
                    "" if cfg.privacy.enabled else ", and each its data's SHA-256, of which "
                    "data_fingerprint is made"),
        "evaluation_reports": evaluation_reports_statement(outcomes),
    }
    if cfg.privacy.enabled:
        assumptions["timing"] = timing_statement("flower", {
            "timings": server.timings, "relatedness_timing": server.relatedness_timing})
        assumptions["data_fingerprint"] = FLOWER_FINGERPRINT_UNDER_DP
    if cfg.privacy.enabled and len(cfg.methods) > 1:  # allowed only with compare-methods
        assumptions["methods_on_one_server"] = (
            "a comparison deployment (compare-methods): the server received every method's "
            "releases of the same clients' data; each method's epsilon covers its own releases, "
            "and a client's privacy loss to this server is their composition")
    assumptions["client_errors_by_client"] = _client_errors_statement(server.client_errors, n)
    if server.relatedness_details:
        holder = server.relatedness_details.get("key_holder", settings.key_holder)
        assumptions["key_holder"] = (f"client {holder} created the CKKS keys and decrypts the "
                                     "overlaps (every client holds the secret key)")
    results = build_results(
        cfg, runtime="flower", config_hash=settings.config_hash, metric=metric,
        outcomes=outcomes,
        privacy={name: _privacy_section(server, name) for name in cfg.methods}
        if cfg.privacy.enabled else None,
        clients=client_rows([server.sizes[c] for c in range(n)]),
        data_fingerprint=None if cfg.privacy.enabled else combine_fingerprints(
            [(c, server.data_fingerprints[c]) for c in range(n)]),
        compute=_compute_statement(server.client_compute, n,
                                   server.compute_before_resume_unknown),
        assumptions=assumptions,
        runtime_keys={
            "run_id": run_id,
            "max_in_flight": settings.max_in_flight,
            "security": {"rejections": server.rejections},
            "node_of_client": {str(c): str(nd) for c, nd in sorted(server.node_of_client.items())},
            "relatedness_timing": server.relatedness_timing,
            "relatedness_details": server.relatedness_details,
            "timings": server.timings,
            "rounds": server.history,
            "events": server.events,
            "seconds_total": round(time.time() - server.started, 3),
            **({"config_amendments": list(settings.amendments)} if settings.amendments
               else {}),
        },
    )
    if settings.result_dir is not None:
        dp = cfg.privacy.enabled
        results = write_run_results(
            settings.result_dir, results, server.history, trained_nothing=trained_nothing,
            anchor=(lambda: _write_server_anchor(server)) if dp else None,
            anchored=(lambda: _server_anchor_kept(server)) if dp else None,
            warn=lambda message: _say(f"warning: {message}"), process_keys=PROCESS_KEYS,
            appended=restored if trained_nothing else None)
        write_plots(settings.result_dir, server.history, results, server.relatedness)
    _save_server_checkpoint(server, None, finished=True)
    return results


def _write_server_anchor(server: _Server) -> bool:
    """Sign (server key) and write ``result-dir/anchor.json``: the ledger heads the clients
    reported with their replies, per method, and the digest of results.json. A client that
    never reported a head is left out (its ledger then fails an anchored audit). False when
    the anchor there already anchors the run as it stands and is kept byte for byte."""
    from secure_fedora.secure.anchor import write_anchor

    assert server.settings.result_dir is not None
    return write_anchor(server.settings.result_dir, _server_anchor_doc(server))


def _server_anchor_kept(server: _Server) -> bool:
    """Whether ``result-dir/anchor.json`` anchors the run as it stands (the results.json
    bytes, every reported ledger head), signed by the server key: :func:`_write_server_anchor`
    then keeps it byte for byte."""
    from secure_fedora.secure.anchor import ANCHOR_FILENAME, anchors_the_same

    assert server.settings.result_dir is not None
    if not (server.settings.result_dir / "results.json").is_file():
        return False
    return anchors_the_same(server.settings.result_dir / ANCHOR_FILENAME,
                            _server_anchor_doc(server))


def _server_anchor_doc(server: _Server) -> dict[str, Any]:
    """The signed anchor document of the run as it stands (see :func:`_write_server_anchor`)."""
    from secure_fedora.secure.anchor import build_anchor

    ledgers = {
        f"{name}/{server.client_ids[c]}": {
            "entries": row["ledger_entries"], "head": row["ledger_head"],
            "epsilon_spent": row["epsilon_spent"]}
        for name in server.cfg.methods
        for c, row in sorted(server.privacy.get(name, {}).items()) if "ledger_head" in row
    }
    assert server.settings.result_dir is not None
    return build_anchor(server.settings.result_dir, run_name=server.cfg.name,
                        config_hash=server.settings.config_hash,
                        methods=list(server.cfg.methods), ledgers=ledgers,
                        signer=server.securities[HELLO_SCOPE].identity, runtime="flower",
                        files=("results.json",))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: validate the run config and run every configured method."""
    settings = RunSettings.from_run_config(context.run_config)
    run_id = settings.run_id(context.run_id)
    try:
        results = run_federation(grid, settings, run_id)
    except (ResumeRefused, ResultDirInUse) as err:  # refused before anything was written:
        # nor is failure.json
        _say(f"run failed: {type(err).__name__}: {err}")
        raise
    except Exception as err:
        if settings.result_dir is not None:
            atomic_write_text(
                settings.result_dir / "failure.json",
                json.dumps({"run_id": run_id, "error": f"{type(err).__name__}: {err}"}),
            )
        _say(f"run failed: {type(err).__name__}: {err}")
        raise
    for name, entry in results["methods"].items():
        _say(f"run {run_id} {name}: selected mean test {results['metric']} "
             f"{entry['selected']['mean']:.4f}")
