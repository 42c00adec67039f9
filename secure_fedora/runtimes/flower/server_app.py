"""The FEDORA ServerApp: relatedness once, then rounds of personalized propagation.

The server never holds client data. It

1. waits (bounded by ``connect-timeout``) until one SuperNode per client is online, then runs
   the relatedness phase in the configured mode (replies bounded by the larger of
   ``connect-timeout`` and ``round-timeout``: first contact includes app installation and
   partition building), learning which node holds which client (``client-id``):

   - plain / noised: every client sends its summary ``U_i`` (noised through its own budget
     gate in noised mode);
   - encrypted / noised+encrypted (CKKS, :mod:`secure_fedora.runtimes.flower.ceremony`): the key
     holder (run config ``key-holder``, a client) runs the key ceremony and returns the public
     context and the secret context sealed to every client; the server forwards each client
     its sealed context and receives ``Enc(U_i)``; it computes the encrypted Gram rows with
     the public context only (it refuses any context holding a secret key); the key holder
     decrypts and returns only the ``q x q`` overlap blocks;

2. builds the similarity matrix, the top-k graph and the propagation matrix ``P`` with
   :mod:`secure_fedora.algorithms.fedora` (the same calls as the in-process ``Fedora`` method);
3. every round, samples participants exactly as the in-process runtime does (same seed,
   same generator), sends every reachable client *its own* ``phi_i`` (participants train and
   return ``theta_i``; the others only store ``phi_i`` and report their accuracy), waits for
   replies (bounded by ``round-timeout``), then sets ``phi = P @ theta``.

Every message is signed and every reply verified (:mod:`secure_fedora.runtimes.flower.envelopes`),
with the server identity and allowlist of ``identity-dir`` and the nonce memory in
``server-state-dir/runs/<run_id>/``. A rejected reply (unknown sender, bad signature, tampered
content, replay, stale round, wrong shape, non-finite values, malformed content) is logged,
recorded in ``results["security"]["rejections"]``, and that client counts as not
participating in the round, exactly as an offline one. In the relatedness phase every client
is needed, so a rejected summary stops the run naming the client.

Partial participation, matching the in-process runtime: a client that is offline, replies
with an error, does not reply within the round timeout or whose reply is rejected simply
keeps its last ``theta_i`` on the server (its last accepted model); it still receives its
``phi_i`` whenever it is reachable, and propagation always uses every client's last known
``theta``. Each such event is logged with the round, client and node. In an evaluated round,
a client that did not report counts with its last reported accuracy (the initial model's,
reported with its summary, if it never reported); model selection is the in-process
runtime's ``Tracker`` (the round with the best mean validation accuracy).

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
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from privacy.ckks import InnerProductUpload
from privacy.envelope import Envelope, EnvelopeError
from privacy.identity import client_ids
from secure_fedora import __version__
from secure_fedora.algorithms import fedora
from secure_fedora.core.config import ExperimentConfig, model_selection
from secure_fedora.learning.client import FlatModel
from secure_fedora.learning.models import make_model
from secure_fedora.runtimes.flower.ceremony import layout_for
from secure_fedora.runtimes.flower.envelopes import MessageSecurity, checked_array
from secure_fedora.runtimes.flower.protocol import (
    MSG_CEREMONY,
    MSG_DECRYPT,
    MSG_ENCRYPTED_SUMMARY,
    MSG_ROUND,
    MSG_SUMMARY,
    SUMMARY_DIM,
    DeployError,
    RunSettings,
    check_supported,
    tensor_to_array_record,
)
from secure_fedora.runtimes.inprocess import (
    NUM_CLASSES,
    Tracker,
    atomic_write_text,
    summarize,
)
from secure_fedora.runtimes.inprocess import sample_participants as runtime_sample_participants
from secure_fedora.secure.private import noise_assumptions
from secure_fedora.secure.relatedness import (
    InvalidUploadsError,
    SecureRelatednessError,
    gram_rows,
    open_server_context,
    parse_upload,
)
from secure_fedora.secure.transport import MalformedPayloadError, SenderMismatchError, log_rejection

__all__ = ["ExchangeTiming", "app", "sample_participants"]

app = ServerApp()


def _say(message: str) -> None:
    """Log a line to the run's log stream (stdout of the ServerApp process)."""
    print(f"[secure-fedora] {message}", flush=True)


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
        metrics = reply.content.get("metrics")
        if metrics is None or "t-process-start" not in metrics:
            continue
        p0, h0, h1 = (float(metrics[k]) for k in ("t-process-start", "t-handler-start", "t-handler-end"))
        parts.append((max(p0 - pushed_at[node], 0.0), h0 - p0, h1 - h0, max(arrived[node] - h1, 0.0)))
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
    security: MessageSecurity
    node_of_client: dict[int, int] = field(default_factory=dict)
    theta: Tensor | None = None
    phi: Tensor | None = None
    prop: Tensor | None = None
    graph: Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    relatedness_timing: dict[str, Any] = field(default_factory=dict)
    relatedness_details: dict[str, Any] = field(default_factory=dict)
    privacy: dict[int, dict[str, Any]] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    ckks_context: Any = None  # the public CKKS context (encrypted modes); never a secret key

    @property
    def cfg(self) -> ExperimentConfig:
        """The run's experiment config."""
        return self.settings.experiment

    @property
    def client_ids(self) -> list[str]:
        """Party ids of the federation's clients, by client index."""
        return client_ids(self.cfg.data.num_clients)

    def event(self, rnd: int, client: int | None, node: int | None, what: str) -> None:
        """Record and log a partial-participation or failure event."""
        self.events.append({"round": rnd, "client": client, "node": node, "event": what})
        who = f"client {client} (node {node})" if client is not None else f"node {node}"
        _say(f"round {rnd}: {who}: {what}")

    def reject(
        self, rnd: int, client: int | None, node: int | None, error: EnvelopeError, then: str
    ) -> None:
        """Record a rejected message (already logged on the security logger) and log it."""
        self.rejections.append({
            "round": rnd, "client": client, "node": node, "reason": error.reason,
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
        then: str,
    ) -> Envelope | None:
        """Verify ``reply``'s envelope (from ``client``, or any allowlisted client when None);
        a rejection is recorded and logged and returns None."""
        expected = self.client_ids[client] if client is not None else None
        try:
            return self.security.verify(reply.content, message_type, reply=True,
                                        expected_round=rnd, expected_sender=expected)
        except EnvelopeError as err:
            self.reject(rnd, client, node, err, then)
            return None

    def write(self, name: str, doc: dict[str, Any]) -> None:
        """Atomically write ``doc`` as JSON to ``result-dir/name`` (if a result-dir is set)."""
        if self.settings.result_dir is not None:
            atomic_write_text(self.settings.result_dir / name, json.dumps(doc, indent=2))


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
    server: _Server, node: int, message_type: str, content: RecordDict, recipients: list[str]
) -> Message:
    return Message(
        server.sign(content, message_type, recipients, 0),
        dst_node_id=node,
        message_type=message_type,
        group_id="relatedness",
        ttl=_relatedness_wait(server) + 60.0,
    )


def _first_contact(
    grid: Grid, server: _Server, nodes: list[int], message_type: str, extra: dict[str, Any]
) -> tuple[dict[int, tuple[Message, Envelope]], ExchangeTiming]:
    """Send ``message_type`` to every node, learn which node holds which client.

    The request carries one envelope per client id (the server does not know yet who is
    where); each verified reply names its client, which must be the client that signed it.
    Returns the accepted replies and their envelopes by client index. Two nodes answering for
    one client stop the run (a misconfigured federation); rejected replies are logged and
    count as missing.
    """
    fedora_conf = ConfigRecord({"config-hash": server.settings.config_hash, **extra})
    messages = {
        node: _relatedness_message(
            server, node, message_type, RecordDict({"fedora": fedora_conf}), server.client_ids
        )
        for node in nodes
    }
    ex = _exchange(grid, messages, _relatedness_wait(server), server.settings.poll_interval,
                   server.settings.max_in_flight)
    for node, reason in ex.errors.items():
        server.event(0, None, node, f"{message_type} failed: {reason}")
    if ex.missing:
        server.event(0, None, None, f"no {message_type} reply from nodes {ex.missing} in time")
    n = server.cfg.data.num_clients
    accepted: dict[int, tuple[Message, Envelope]] = {}
    for node, reply in ex.replies.items():
        envelope = server.accept(0, node, reply, message_type, None, "no relatedness from it")
        if envelope is None:
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
                "no relatedness from it")
            continue
        if cid in server.node_of_client:
            raise DeployError(
                f"nodes {server.node_of_client[cid]} and {node} both hold partition-id {cid}"
            )
        server.node_of_client[cid] = node
        accepted[cid] = (reply, envelope)
    return accepted, ex.timing


def _reported_head(reply: Message) -> dict[str, Any]:
    """The ledger head a client reported with its round reply (covered by the reply's
    signed envelope): ``{"ledger_head": hex}``; empty when it reported none. Raises
    ValueError for a malformed record (the reply is then rejected as malformed)."""
    if "ledger" not in reply.content:
        return {}
    record = reply.content["ledger"]
    head = record.get("head") if isinstance(record, ConfigRecord) else None
    entries = record.get("entries") if isinstance(record, ConfigRecord) else None
    if not isinstance(head, str) or len(head) != 64 or set(head) - set("0123456789abcdef") \
            or isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
        raise ValueError("ledger record must hold entries (int) and head (64 hex digits)")
    return {"ledger_head": head, "ledger_entries": entries}


def _require_all(server: _Server, have: Any, nodes: list[int], what: str) -> None:
    absent = [c for c in range(server.cfg.data.num_clients) if c not in have]
    if absent:
        raise DeployError(
            f"relatedness needs every client's {what}; missing clients {absent} "
            f"(nodes online: {nodes})"
        )


def _take_metrics(
    server: _Server, cid: int, reply: Message, envelope: Envelope, val0: Tensor, test0: Tensor
) -> bool:
    """Initial accuracies (and privacy state) from a summary reply; False if malformed."""
    metrics = reply.content["metrics"] if "metrics" in reply.content else None
    try:
        if not isinstance(metrics, MetricRecord):
            raise KeyError("metrics")
        val, test = float(metrics["val-accuracy"]), float(metrics["test-accuracy"])
        privacy = (
            {"epsilon_spent": float(metrics["epsilon-spent"]),
             "epsilon_budget": float(metrics["epsilon-budget"]),
             "ledger_entries": int(metrics["ledger-entries"])}
            if "epsilon-spent" in metrics else None
        )
    except (KeyError, TypeError, ValueError) as err:
        server.reject(0, cid, server.node_of_client.get(cid),
                      _malformed(envelope, f"summary reply lacks metrics ({err})"),
                      "no relatedness from it")
        return False
    val0[cid], test0[cid] = val, test
    if privacy is not None:
        server.privacy[cid] = privacy
    return True


def _plain_overlaps(
    grid: Grid, server: _Server, nodes: list[int], val0: Tensor, test0: Tensor
) -> Tensor:
    """Plain and noised modes: every client's summary ``U_i`` in the clear (signed)."""
    cfg = server.cfg
    replies, timing = _first_contact(grid, server, nodes, MSG_SUMMARY, {})
    summaries: dict[int, Tensor] = {}
    for cid, (reply, env) in replies.items():
        try:
            u = checked_array(reply.content, "summary", "u", torch.float64,
                              (SUMMARY_DIM, cfg.fedora.q), env)
        except EnvelopeError as err:
            server.reject(0, cid, server.node_of_client[cid], err, "no relatedness from it")
            continue
        if _take_metrics(server, cid, reply, env, val0, test0):
            summaries[cid] = u
    _require_all(server, summaries, nodes, "summary")
    server.relatedness_timing = timing.to_json()
    n = cfg.data.num_clients
    return fedora.subspace_overlaps(torch.stack([summaries[c] for c in range(n)]))


def _addressed(
    server: _Server, cid: int, message_type: str, content: RecordDict
) -> tuple[int, Message]:
    node = server.node_of_client[cid]
    content["fedora"] = ConfigRecord({"config-hash": server.settings.config_hash})
    return node, _relatedness_message(
        server, node, message_type, content, [server.client_ids[cid]]
    )


def _encrypted_overlaps(
    grid: Grid, server: _Server, nodes: list[int], val0: Tensor, test0: Tensor
) -> Tensor:
    """Encrypted modes: key ceremony, ``Enc(U_i)`` from every client, encrypted Gram rows on
    the server (public context only), decryption of the overlap blocks by the key holder."""
    cfg = server.cfg
    n, q = cfg.data.num_clients, cfg.fedora.q
    holder = server.settings.key_holder
    poll = server.settings.poll_interval
    details: dict[str, Any] = {"key_holder": holder}
    timing: dict[str, Any] = {}

    # (a) key ceremony at the key holder (every node identifies itself in the same exchange)
    replies, ceremony_timing = _first_contact(
        grid, server, nodes, MSG_CEREMONY, {"key-holder": holder}
    )
    timing["ceremony"] = ceremony_timing.to_json()
    _require_all(server, replies, nodes, "identification")
    reply, env = replies[holder]
    record = reply.content["ceremony"] if "ceremony" in reply.content else None
    public = record.get("public-context") if isinstance(record, ConfigRecord) else None
    if not isinstance(public, bytes):
        raise DeployError(f"the key holder (client {holder}) returned no public CKKS context")
    t0 = time.perf_counter()
    server.ckks_context = open_server_context(public)
    sealed: dict[int, bytes] = {}
    for cid, party in enumerate(server.client_ids):
        blob = record.get(f"sealed-{party}")
        if not isinstance(blob, bytes):
            raise DeployError(
                f"the key holder (client {holder}) sealed no CKKS context for {party}"
            )
        sealed[cid] = blob
    details["public_context_bytes"] = len(public)
    details["sealed_context_bytes"] = len(sealed[0])
    details["server_context_has_secret_key"] = bool(server.ckks_context.has_secret_key())

    # (b) every client's encrypted summary, its sealed context forwarded to it
    layout = layout_for(cfg)
    messages = dict(
        _addressed(server, cid, MSG_ENCRYPTED_SUMMARY, RecordDict({"ckks": ConfigRecord({
            "sealed-context": sealed[cid], "num-vectors": layout.num_vectors,
            "dim": layout.dim})}))
        for cid in range(n)
    )
    client_of = {node: cid for cid, node in server.node_of_client.items()}
    ex = _exchange(grid, messages, _relatedness_wait(server), poll,
                   server.settings.max_in_flight)
    timing["encrypted_summary"] = ex.timing.to_json()
    for node, reason in ex.errors.items():
        server.event(0, client_of[node], node, f"encrypted summary failed: {reason}")
    for node in ex.missing:
        server.event(0, client_of[node], node, "no encrypted summary in time")
    uploads: dict[int, list[InnerProductUpload]] = {}
    envelopes: dict[int, Envelope] = {}
    upload_bytes: dict[int, int] = {}
    for node, reply in ex.replies.items():
        cid = client_of[node]
        env = server.accept(0, node, reply, MSG_ENCRYPTED_SUMMARY, cid, "no relatedness from it")
        if env is None:
            continue
        record = reply.content["upload"] if "upload" in reply.content else None
        columns = record.get("columns") if isinstance(record, ConfigRecord) else None
        try:
            parsed = parse_upload(layout, cid, q, columns)
        except SecureRelatednessError as err:
            server.reject(0, cid, node, _malformed(env, str(err)), "no relatedness from it")
            continue
        if _take_metrics(server, cid, reply, env, val0, test0):
            uploads[cid], envelopes[cid] = parsed, env
            upload_bytes[cid] = sum(len(c) for c in columns)
    _require_all(server, uploads, nodes, "encrypted summary")
    details["upload_bytes_per_client"] = [upload_bytes[c] for c in range(n)]

    # (c) the encrypted Gram rows, computed with the public context only
    t1 = time.perf_counter()
    try:
        rows, _ = gram_rows(server.ckks_context, layout, n, q, uploads)
    except InvalidUploadsError as err:  # authentic but unusable ciphertexts: a malformed reply
        for cid, why in err.invalid.items():
            server.reject(0, cid, server.node_of_client[cid], _malformed(envelopes[cid], why),
                          "no relatedness from it")
            del uploads[cid]
        _require_all(server, uploads, nodes, "encrypted summary")  # raises, naming them
        raise
    timing["server_compute_s"] = round(time.perf_counter() - t1, 4)
    details["rows_bytes"] = sum(len(r) for r in rows)

    # (d) the key holder decrypts the q x q blocks, and only those
    node, message = _addressed(server, holder, MSG_DECRYPT,
                               RecordDict({"rows": ConfigRecord({"rows": rows})}))
    ex = _exchange(grid, {node: message}, _relatedness_wait(server), poll)
    timing["decrypt"] = ex.timing.to_json()
    problem = (ex.errors.get(node) or ("no reply in time" if ex.missing else None))
    overlaps: Tensor | None = None
    if problem is None:
        env = server.accept(0, node, ex.replies[node], MSG_DECRYPT, holder, "no overlaps")
        if env is None:
            problem = "its reply was rejected"
        else:
            try:
                overlaps = checked_array(ex.replies[node].content, "overlaps", "overlaps",
                                         torch.float64, (n, n, q, q), env)
            except EnvelopeError as err:
                server.reject(0, holder, node, err, "no overlaps")
                problem = f"its overlaps were refused ({err.reason})"
    if overlaps is None:
        raise DeployError(
            f"the key holder (client {holder}) did not return the overlaps: {problem}"
        )
    timing["wall_s"] = round(time.perf_counter() - t0, 4)
    server.relatedness_timing = timing
    server.relatedness_details = details
    return overlaps


def _relatedness(grid: Grid, server: _Server, nodes: list[int]) -> tuple[Tensor, Tensor]:
    """Overlaps in the configured mode, then the graph and ``P`` exactly as the in-process
    ``Fedora`` builds them; returns the initial (validation, test) accuracies."""
    cfg = server.cfg
    n = cfg.data.num_clients
    val0 = torch.zeros(n)
    test0 = torch.zeros(n)
    t0 = time.perf_counter()
    if "encrypted" in cfg.fedora.relatedness:
        overlaps = _encrypted_overlaps(grid, server, nodes, val0, test0)
    else:
        overlaps = _plain_overlaps(grid, server, nodes, val0, test0)
    similarity = fedora.similarity_matrix(overlaps, cfg.fedora.tau)
    server.graph = fedora.topk_graph(similarity, cfg.fedora.k)
    if cfg.fedora.propagation == "power":
        server.prop = fedora.propagation_matrix_power(server.graph, cfg.fedora.alpha)
    else:
        server.prop = fedora.propagation_matrix(server.graph, cfg.fedora.alpha)
    _say(f"relatedness ({cfg.fedora.relatedness}): graph over {n} clients built in "
         f"{time.perf_counter() - t0:.2f} s")
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
            server.sign(content, MSG_ROUND, [server.client_ids[cid]], rnd),
            dst_node_id=node, message_type=MSG_ROUND, group_id=str(rnd),
            ttl=server.settings.round_timeout + 60.0,
        )
    t0 = time.perf_counter()
    ex = _exchange(grid, messages, server.settings.round_timeout, server.settings.poll_interval,
                   server.settings.max_in_flight)
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
        then = "counts as not participating, keeps its last theta"
        envelope = server.accept(rnd, node, reply, MSG_ROUND, cid, then)
        if envelope is None:
            continue
        try:
            metrics = reply.content["metrics"]
            if not isinstance(metrics, MetricRecord):
                raise TypeError("metrics is not a MetricRecord")
            reply_round = int(metrics["round"])
            theta = (
                checked_array(reply.content, "theta", "theta", torch.float32, (p,), envelope)
                if cid in chosen and "theta" in reply.content else None
            )
            lam = float(metrics["lambda"]) if theta is not None else 0.0
            done = int(metrics["steps"]) if theta is not None else 0
            evaluated = do_eval and int(metrics["eval-round"]) == rnd
            accuracies = (
                (float(metrics["val-accuracy"]), float(metrics["test-accuracy"]))
                if evaluated else None
            )
            privacy = (
                {"epsilon_spent": float(metrics["epsilon-spent"]),
                 "epsilon_budget": float(metrics["epsilon-budget"]),
                 "ledger_entries": int(metrics["ledger-entries"]),
                 **_reported_head(reply)}
                if "epsilon-spent" in metrics else None
            )
        except EnvelopeError as err:
            server.reject(rnd, cid, node, err, then)
            continue
        except (KeyError, TypeError, ValueError) as err:
            server.reject(rnd, cid, node, _malformed(envelope, f"round reply malformed ({err})"),
                          then)
            continue
        if reply_round != rnd:
            server.event(rnd, cid, node, f"reply for round {reply_round} ignored")
            continue
        if privacy is not None:
            server.privacy[cid] = privacy
        if theta is not None:
            server.theta[cid].copy_(theta)
            trained += 1
            lambdas.append(lam)
            steps += done
        elif cid in chosen:
            refusal = reply.content.get("refusal") if "refusal" in reply.content else None
            reason = (
                str(refusal["reason"])
                if isinstance(refusal, ConfigRecord) and "reason" in refusal
                else "no model released"
            )
            server.event(rnd, cid, node, f"refused its release ({reason}): keeps its last theta")
            server.refused.add(cid)
        if accuracies is not None:
            tracker.last_val[cid], tracker.last_test[cid] = accuracies
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
            val_mean=None if bool(tracker.select_final) else float(tracker.last_val.mean()),
            selected_mean=float(tracker.test_at_best.mean()),
            selected_round=int(tracker.best_round),
        )
    return row


def run_fedora(grid: Grid, settings: RunSettings, run_id: int) -> dict[str, Any]:
    """Run FEDORA over the grid; returns (and writes) the results document."""
    cfg = settings.experiment
    check_supported(cfg, settings.reproducible_dp_noise)
    if cfg.privacy.enabled:  # a plan over any client's budget stops here, before any message
        from secure_fedora.secure.private import check_budget_plans

        check_budget_plans(cfg, "fedora", cfg.data.num_clients)
    torch.set_num_threads(settings.num_threads)
    n = cfg.data.num_clients
    security = MessageSecurity.for_server(
        settings.identity_dir, settings.server_state_dir / "runs" / str(run_id), run_id,
        settings.config_hash, n,
    )
    server = _Server(settings=settings, run_id=run_id, security=security)
    started = time.time()
    _say(f"run {run_id}: waiting for {n} SuperNodes (config {settings.config_hash[:12]})")
    nodes = _wait_for_nodes(grid, n, settings.connect_timeout, settings.poll_interval)
    val0, test0 = _relatedness(grid, server, nodes)
    init = FlatModel(make_model(cfg.model.name, NUM_CLASSES, seed=cfg.seed)).initial_vector()
    server.theta = init.unsqueeze(0).repeat(n, 1)
    server.phi = server.theta.clone()
    tracker = Tracker.empty(n, select_final=model_selection(cfg) == "final_round")
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
        "max_in_flight": settings.max_in_flight,
        "assumptions": {
            "validation_data": cfg.data.validation,
            "relatedness": cfg.fedora.relatedness,
            "server": "honest-but-curious",
            "differential_privacy": cfg.privacy.enabled,
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
            "key_holder": (
                f"client {settings.key_holder} holds the CKKS secret key and sees the overlaps"
                if "encrypted" in cfg.fedora.relatedness else None
            ),
        },
        "security": {"rejections": server.rejections},
        "privacy": (
            {
                "clients": [
                    {"client": c, **server.privacy.get(c, {}), "refused": c in server.refused}
                    for c in range(n)
                ],
                "note": "as last reported by each client; its signed ledger is the record",
                **noise_assumptions(cfg),
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
        "relatedness_details": server.relatedness_details,
        "rounds": server.history,
        "events": server.events,
        "seconds_total": round(time.time() - started, 3),
    }
    server.write("results.json", results)
    if cfg.privacy.enabled and server.settings.result_dir is not None:
        _write_server_anchor(server, results)
    return results


def _write_server_anchor(server: _Server, results: dict[str, Any]) -> None:
    """Sign (server key) and write ``result-dir/anchor.json``: the ledger heads the clients
    reported with their round replies, and the digest of results.json. A client that never
    reported a head is left out (its ledger then fails an anchored audit)."""
    from secure_fedora.secure.anchor import build_anchor, write_anchor

    ledgers = {
        f"fedora/{server.client_ids[c]}": {
            "entries": row["ledger_entries"], "head": row["ledger_head"],
            "epsilon_spent": row["epsilon_spent"]}
        for c, row in sorted(server.privacy.items()) if "ledger_head" in row
    }
    assert server.settings.result_dir is not None
    doc = build_anchor(server.settings.result_dir, run_name=server.cfg.name,
                       config_hash=server.settings.config_hash, methods=["fedora"],
                       ledgers=ledgers, signer=server.security.identity, runtime="flower",
                       files=("results.json",))
    write_anchor(server.settings.result_dir, doc)


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
