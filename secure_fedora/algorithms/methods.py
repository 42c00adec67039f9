"""Federated methods over one shared state layout: FEDORA, Local and FedAvg.

Every method implements the contract of :mod:`secure_fedora.algorithms.contract` (a server
half and a client half that exchange :data:`~secure_fedora.algorithms.contract.Payload` s).
:class:`FederatedMethod` is the in-process base: all client parameters are rows of one
(N x P) matrix, so aggregation and propagation are single matrix products, and its
:meth:`FederatedMethod.train_round` runs one round generically::

    configure -> (downloads) -> client_update_many -> (uploads) -> aggregate

Message boundaries: without an ``exchange`` (the default) nothing is copied or changed. With
one (the runtime attaches a :class:`secure_fedora.secure.transport.SecureExchange` under
``[security] envelopes = true``) every message entry whose key is a kind the exchange knows
(:meth:`FederatedMethod.message_state`) is a signed, verified envelope: a rejected upload
is discarded by the server (it keeps its last accepted row) and the reply is absent from
``aggregate``'s ``replies`` (the client did not take part), while the client keeps what it
trained, as a Flower client does (see :meth:`FederatedMethod.train_round`). A client that
rejects a round download sits the round out, as a Flower client that refuses the message
does: it neither trains nor replies and, under DP, its round release is not admitted (the
downloads are verified before the runtime's ``admit`` is asked). A client that rejects its
finalize message is sent it once more, and one that rejects it again stops the run
(:class:`FinalizeRejectedError`), as on Flower. Kinds the exchange does not track are signed
too (each client's entry checked, no copy kept): a client that rejects one sits the round out.
Evaluation messages are signed as well (:meth:`FederatedMethod.evaluation_rows`): a client that
rejects its message is not evaluated and keeps its last metric, as on Flower.
Methods written before the contract may still override ``train_round`` and use
:meth:`FederatedMethod.upload_rows` / :meth:`FederatedMethod.download_rows` directly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from privacy.errors import ToolkitError
from secure_fedora.algorithms import fedora
from secure_fedora.algorithms.config_checks import (
    FedAvgChecks,
    FedoraChecks,
    LocalChecks,
    MethodChecks,
)
from secure_fedora.algorithms.contract import (
    EVALUATE,
    FINALIZE,
    NUM_EXAMPLES_REASON,
    REPLY_LAMBDA,
    REPLY_NUM_EXAMPLES,
    REPLY_STEPS,
    ROUND,
    SAT_OUT_PULL_DIVERGED,
    SETUP,
    ContractError,
    DataFacts,
    FederatedAlgorithm,
    Payload,
    ReleaseSpec,
    TensorSignature,
    check_client_state,
    check_eval_row,
    check_finalize_results,
    check_messages,
    check_setup_steps,
    client_half,
    no_reply_statistics,
    round_statistics_of,
    server_half,
)
from secure_fedora.algorithms.encryption import (
    EncryptionBackend,
    require_encryption,
)
from secure_fedora.algorithms.held import HeldRows, per_client
from secure_fedora.algorithms.messages import (
    KIND_EVALUATION_REPLY,
    KIND_GLOBAL,
    KIND_PHI,
    KIND_SUMMARY,
    KIND_THETA,
    ValueCheck,
)
from secure_fedora.algorithms.propagation import (
    PropagationOperator,
    build_operator,
    embed_operator,
    resolve_propagation,
)
from secure_fedora.core.config import model_selection, pull_limit_text, pull_stability_limit
from secure_fedora.core.crashpoints import crash_point
from secure_fedora.core.registry import METHODS
from secure_fedora.core.tensors import all_finite
from secure_fedora.data.partition import ClientData
from secure_fedora.learning.batched import (
    BatchedOutcome,
    batched_plan,
    engine_probe,
    train_participants,
)
from secure_fedora.learning.client import (
    DIVERGED_HINT,
    ClientUpdateError,
    FlatModel,
    GradientOracle,
    TrainConfig,
    Workspace,
    diverged_hint,
    evaluate,
    local_train,
)
from secure_fedora.learning.validation_losses import validation_losses

KEY_STEPS = REPLY_STEPS
"""Reply entry: the DP-SGD/SGD steps a client ran this round (a 0-d integer tensor)."""
KEY_NUM_EXAMPLES = REPLY_NUM_EXAMPLES
"""Reply entry: the client's number of training examples (FedAvg's aggregation weight)."""
KEY_LAMBDA = REPLY_LAMBDA

#: Why FEDORA's setup reply may carry the summary, per ``[fedora] relatedness`` (a DP run
#: admits only the noised modes; the others are a run without DP's).
SUMMARY_REASONS = {
    "noised": "noised: the 'summary' release",
    "noised+encrypted": "noised and encrypted: the 'summary' release, accounted on the noised"
                        " summary, uploaded CKKS-encrypted",
    "plain": "plain: in the clear, without DP",
    "encrypted": "encrypted: CKKS-encrypted, without DP",
}
"""Reply entry: FEDORA's regularization weight ``lambda_i`` of the round (0-d float64)."""

log = logging.getLogger("secure_fedora.algorithms.methods")

MessageState = tuple[dict[str, Tensor], dict[str, Tensor]]
"""(upload matrices by message kind, tracked download matrices by kind), each (N, ...)."""

__all__ = [
    "EvaluationRejectedError",
    "FedAvg",
    "Fedora",
    "FinalizeRejectedError",
    "FederatedMethod",
    "Local",
    "MethodContext",
    "Relatedness",
    "plain_overlaps",
]


class FinalizeRejectedError(ToolkitError, RuntimeError):
    """A client rejected its finalize message twice; the method's results need its reply."""


class SetupRejectedError(ToolkitError, RuntimeError):
    """A client's setup message or its signed setup reply was rejected in both tries; the
    method's setup needs every client's reply."""


class EvaluationRejectedError(ToolkitError, RuntimeError):
    """Clients' evaluation messages (or their signed replies) were rejected where a run cannot
    complete without their metrics: a client never evaluated in any round, or (under DP) one
    whose final evaluation was rejected in both tries, as the Flower server refuses such a
    run."""


@dataclass
class MethodContext:
    """What every method needs: the clients' data, the model layout and the local trainer."""

    clients: Sequence[ClientData]
    flat: FlatModel
    train: TrainConfig
    oracle: GradientOracle
    workspace: Workspace
    generators: list[torch.Generator]
    init: Tensor
    num_classes: int = 10
    privacy: Any = None  # secure_fedora.secure.private.FederationPrivacy when DP is on
    # With [security] envelopes: ``label -> SecureTransport`` for a method's own signed
    # exchanges beside the round exchange (e.g. FEDORA's summaries); None: no envelopes.
    transport_factory: Callable[[str], Any] | None = None
    # With [security] envelopes: ``label -> SecureExchange`` over a transport of its own (its
    # own nonce memory), tracking nothing, for the generic setup exchange, which runs before
    # the round exchange is attached; None: no envelopes.
    exchange_factory: Callable[[str], Any] | None = None
    # One privacy.noise.NoiseSource per client when DP is on: every mechanism's randomness
    # (DP-SGD noise and sampling, summary and lambda noise); ``generators`` is only the
    # non-private training order.
    noise: list[Any] = field(default_factory=list)
    # Encrypted computation the runtime offers (secure_fedora.secure.backends.CkksBackend in
    # both runtimes); None: a method configured for an encrypted mode refuses to be built.
    encryption: EncryptionBackend | None = None
    # How a round's participants train in process ([training] engine, resolved): "loop" (each
    # client in turn, the reference) or "batched" (all together, learning/batched.py), and
    # why ("" for the default loop); see FederatedMethod.client_update_many.
    engine: str = "loop"
    engine_choice: str = ""
    # The one client a process serves (a Flower ClientApp's context), None: every client (the
    # server, the in-process runtime). With it set, per-client state is allocated through
    # :meth:`per_client` as one held row (secure_fedora.algorithms.held), not N.
    held: int | None = None
    # The model's buffers as checked before training, and the clients' splits' version
    # counters (learning.models.BufferGuard): checked again before the clients' round and
    # finalize replies reach the server half, and by the runtime after each round; None: not
    # checked.
    buffers: Any = None

    @property
    def num_clients(self) -> int:
        """N, the federation's clients (every client, not only a round's participants)."""
        return len(self.clients)

    @property
    def envelopes(self) -> bool:
        """Whether the run signs its messages (``[security] envelopes``)."""
        return self.transport_factory is not None

    def per_client(self, row: Tensor) -> Tensor | HeldRows:
        """Per-client state starting at ``row`` for every client: an N x ... tensor, or in a
        process serving one client (``held``) that client's row alone (:class:`HeldRows`;
        any other row is a :class:`~secure_fedora.algorithms.held.DataAccessError`)."""
        return per_client(self.num_clients, self.held, row)

    def open_transport(self, label: str) -> Any:
        """A signed transport for the method's exchange ``label``, or None without envelopes."""
        return None if self.transport_factory is None else self.transport_factory(label)

    def open_exchange(self, label: str) -> Any:
        """A signed message exchange tracking nothing for the method's exchange ``label``
        (its own transport), or None without envelopes."""
        return None if self.exchange_factory is None else self.exchange_factory(label)

    def select(self, i: int) -> None:
        """Point a DP oracle at client ``i``'s noise multiplier and noise source."""
        if self.privacy is not None:
            self.oracle.select(self.privacy.clients[i].noise_multiplier, self.noise[i])
            self.privacy.select_client(i, self.oracle)

    def train_client(self, i: int, theta: Tensor, phi: Tensor | None = None, lam: float = 0.0) -> int:
        """Run client ``i``'s local training on ``theta`` in place; returns the step count."""
        c = self.clients[i]
        self.select(i)
        steps = local_train(
            self.flat, theta, c.train_x, c.train_y, self.train, self.oracle,
            self.generators[i], self.workspace, phi=phi, lam=lam, client=i,
        )
        crash_point("train")
        return steps


def _raw_similarity(sums: Tensor, tau: float) -> Tensor | None:
    """``exp(tau * sums)`` with a zero diagonal (``similarity_matrix``'s values), or ``None``
    where one overflows float64 (the graph is built from the sums and needs none)."""
    s = torch.exp(tau * sums)
    if not bool(torch.isfinite(s).all()):
        return None
    return s.fill_diagonal_(0.0)


@dataclass
class Relatedness:
    """The relatedness graph and propagation operator FEDORA uses (and reports).

    ``overlaps`` (N x N x q x q) and ``similarity`` (N x N) are ``None`` when the graph was
    built blockwise from plain summaries (sparse propagation at large N never holds N x N
    matrices); ``graph`` is then a sparse COO tensor. ``similarity`` is also ``None`` where
    ``exp(tau * sum of the cosines)`` overflows float64 (the graph is finite for any tau).
    """

    overlaps: Tensor | None
    similarity: Tensor | None
    graph: Tensor
    operator: PropagationOperator
    mode: str = "plain"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def propagation(self) -> Tensor | None:
        """``P`` as a dense (N x N) float64 matrix: exact for a dense operator (and, up to
        ``DENSE_VIEW_MAX_CLIENTS`` clients, a factored one), ``P~`` for a sparse one up to
        that size, ``None`` above (too large)."""
        if self.operator.kind == "dense" or self.operator.num_clients <= DENSE_VIEW_MAX_CLIENTS:
            return self.operator.to_dense()
        return None

    def neighbours(self) -> list[list[int]]:
        """Each client's graph neighbours (column indices of its non-zero graph entries)."""
        if self.graph.layout == torch.strided:
            return [torch.nonzero(row).flatten().tolist() for row in self.graph]
        g = self.graph.coalesce()
        rows, cols = g.indices()
        keep = g.values() != 0
        out: list[list[int]] = [[] for _ in range(g.shape[0])]
        for r, c in zip(rows[keep].tolist(), cols[keep].tolist(), strict=True):
            out[r].append(c)
        return out


DENSE_VIEW_MAX_CLIENTS = 4096


def plain_overlaps(clients: Sequence[ClientData], num_classes: int, q: int) -> tuple[Tensor, Tensor]:
    """Summaries (N x d x q) and their overlap blocks, computed in the clear (no privacy)."""
    summaries = torch.stack(
        [fedora.client_summary(c.train_x, c.train_y, num_classes, q, client=i)
         for i, c in enumerate(clients)]
    )
    return summaries, fedora.subspace_overlaps(summaries)


def _unbatched_override(cls: type) -> str | None:
    """Why the ``client_update_batched`` that ``cls`` inherits would not reproduce its client
    half: a subclass overriding ``client_update`` or ``client_update_loop`` below the class
    whose batched half it inherits (that half would silently skip the override). ``None`` when
    the nearest definition is a batched half, or a class declaring ``batched_client_half =
    True`` in its own body (its inherited batched half calls its hooks), or when only the
    default (no batched half: the loop runs anyway)."""
    if cls.client_update_batched is FederatedMethod.client_update_batched:
        return None
    for klass in cls.__mro__:
        own = vars(klass)
        if "client_update_batched" in own or own.get("batched_client_half") is True:
            return None
        hooks = [h for h in ("client_update", "client_update_loop") if h in own]
        if hooks:
            return (f"{klass.__name__} overrides {' and '.join(hooks)} but not "
                    "client_update_batched, so the batched half it inherits would not run it; "
                    "define client_update_batched (or set batched_client_half = True on "
                    f"{klass.__name__} if the inherited one reproduces it)")
    return None


def training_engine_entry(*, setting: str, choice: str, reason: str | None,
                          runs: Mapping[str, int], fallbacks: Mapping[str, int]
                          ) -> dict[str, Any]:
    """results.json's ``methods.<name>.extra.training_engine``, the same keys in both
    runtimes: the engine the setting resolved to (``setting``), what was asked and why it
    resolved so (``choice``), why the runtime trains with that engine whatever was asked
    (``reason``: Flower's, None in process), how many local-training passes (one a round in
    which some client trained) each engine ran (``runs``: "linear"/"vmap" batched, "loop" per
    client) and every reason a round fell back from the batched engine to the loop, with its
    count (``fallbacks``)."""
    return {"setting": setting, "choice": choice, "reason": reason,
            "runs": dict(sorted(runs.items())),
            "fallbacks": [{"reason": r, "count": n} for r, n in fallbacks.items()]}


def _model_signature(ctx: MethodContext) -> TensorSignature:
    """The dtype and shape of one model row of ``ctx``'s model (a flat parameter vector)."""
    return ctx.init.dtype, tuple(ctx.init.shape)


class FederatedMethod(MethodChecks, FederatedAlgorithm):
    """In-process base of every method: the contract plus the state layout (one (N x P)
    ``theta`` matrix of client parameters) and a generic round.

    A subclass implements the contract's halves (``configure``, ``client_update``,
    ``aggregate``, optionally the setup/finalize/evaluation exchanges); the runtime calls only
    :meth:`setup`, :meth:`train_round`, :meth:`eval_row`, :meth:`extra_results` and the
    checkpoint pair :meth:`state_dict` / :meth:`load_state_dict`, which this class implements
    on top of the contract. Registered in :data:`~secure_fedora.core.registry.METHODS` as a
    class, a method is built by :meth:`from_config`.
    """

    name = "method"
    #: False for a method whose clients never send anything (Local): experiments run it
    #: non-private only and use it as the reference of "worse than Local" counts.
    sends_messages: ClassVar[bool] = True
    #: The in-process checkpoint's own fields, written beside :meth:`server_state_dict`'s
    #: keys: a server state key among them would overwrite one or be overwritten (a wrong
    #: resume), so :meth:`state_dict` refuses it. A subclass that writes more extends it.
    checkpoint_fields: ClassVar[frozenset[str]] = frozenset({
        KIND_THETA, "client_states", "client_state_holders", "held_downloads", "server_rows",
        "message_security", "training_engine"})

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        # N x P; one held row on a client context (ctx.held), bit-identical training since
        # local_train trains any row off a 64-byte boundary as an aligned copy
        self.theta: Any = ctx.per_client(ctx.init)
        # The signed-message layer (a secure_fedora.secure.transport.SecureExchange), set by the
        # runtime with [security] envelopes = true; None: messages are not simulated.
        self.exchange: Any = None
        # The latest round trained (evaluation messages are for it).
        self.last_round = 0
        # The latest round whose uploads began to leave (0: none): a round that stopped
        # before it released nothing but its admitted (journaled) releases.
        self.uploads_begun = 0
        # The number of clients whose reply the latest train_round's update used (their
        # uploads accepted); None: not counted (a train_round written before the contract).
        self.round_replied: int | None = None
        # Clients' held downloads from a checkpoint, until an exchange is attached.
        self._held_downloads: dict[str, Tensor] | None = None
        # By upload kind: the clients whose row of that matrix (their own state) differs from
        # the server's last accepted row, since an upload was rejected or an accepted reply
        # was not the client's row (:meth:`server_view`).
        self._diverged: dict[str, set[int]] = {}
        # By upload kind, then client: the server's row of a diverged client where no exchange
        # holds it (no envelopes, a checkpoint's rows until an exchange is attached, or a
        # round's replies until the method's own upload path hands them to the exchange).
        self._server_rows: dict[str, dict[int, Tensor]] = {}
        # What trained the clients (batched engine or loop, with the reasons of fallbacks):
        # results.json's "training_engine" when the batched engine was asked for.
        self._engine_runs: dict[str, int] = {}
        self._engine_fallbacks: dict[str, int] = {}
        self._engine_logged: set[str] = set()  # reasons logged by this process
        # The signed-message record (rejections, traffic) of the rounds before the checkpoint
        # a resumed run started from: the new process's exchange records only the rest.
        self._earlier_security: dict[str, Any] = {}

    @classmethod
    def from_config(cls, ctx: MethodContext, cfg: Any) -> FederatedMethod:
        """Build the method from the run's context and the whole config (how the registry
        builds a method registered as a class). Default: ``cls(ctx)``."""
        return cls(ctx)

    # ------------------------------------------------------------------ contract defaults
    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Server: the round's messages. Default: an empty message to each participant."""
        return {i: {} for i in participants}

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Client ``i``: train on its own data and state from ``message`` and return its reply (read
        only client ``i``'s data, generator, noise source and state). A method overrides this or
        ``train_round``; the default raises NotImplementedError."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither client_update nor train_round")

    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """Server: combine the accepted replies. Default: nothing to combine."""
        return {}

    # ------------------------------------------------------------------ batched client halves
    def client_update_many(self, rnd: int, messages: Mapping[int, Payload]) -> dict[int, Payload]:
        """All of a round's client halves in one process. With ``ctx.engine == "batched"``,
        :meth:`client_update_batched` trains all participants together (replies equal to
        :meth:`client_update` per client within float rounding: each client's generator and
        noise source draw in the loop's order, and the DP step hooks count the same steps);
        where it cannot reproduce the method it returns ``None`` and the per-client loop runs,
        with the reason logged and recorded (:meth:`training_engine_results`)."""
        if self.ctx.engine == "batched" and messages:
            unbatched = _unbatched_override(type(self))
            replies = (self.batched_fallback(unbatched) if unbatched is not None else self.client_update_batched(rnd, messages))
            if replies is not None:
                return replies
        elif messages:
            self._engine_runs["loop"] = self._engine_runs.get("loop", 0) + 1
        return self.client_update_loop(rnd, messages)

    def client_update_loop(self, rnd: int, messages: Mapping[int, Payload]) -> dict[int, Payload]:
        """The per-client reference path of :meth:`client_update_many`: the same replies as
        :meth:`client_update` per client, in the given order. Default: exactly that loop."""
        return super().client_update_many(rnd, messages)

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """The batched client halves of the round, or ``None`` (after :meth:`batched_fallback`)
        when this method or its model/oracle cannot be trained batched. Default: ``None``."""
        return self.batched_fallback(f"method {self._label()!r} has no batched client half")

    def batched_fallback(self, reason: str) -> None:
        """Record (and log, once per reason) that a round falls back to the per-client loop."""
        if reason not in self._engine_logged:
            self._engine_logged.add(reason)
            log.warning("%s: training.engine = 'batched' falls back to the per-client loop: %s",
                        self._label(), reason)
        self._engine_fallbacks[reason] = self._engine_fallbacks.get(reason, 0) + 1
        self._engine_runs["loop"] = self._engine_runs.get("loop", 0) + 1
        return None

    def batched_unsupported(self, participants: Sequence[int],
                            oracles: Sequence[GradientOracle]) -> str | None:
        """Why the batched engine cannot train ``participants`` with each of ``oracles``
        exactly (``None``: it can). Probed on the first participant with training data."""
        ctx = self.ctx
        for oracle in oracles:
            probe = engine_probe(((ctx.clients[i].train_x, ctx.clients[i].train_y)
                                  for i in participants), oracle)
            if probe is None:
                return "no participant has training data to probe the model"
            plan = batched_plan(ctx.flat, oracle, *probe)
            if plan.engine == "loop":
                return plan.reason
        return None

    def train_batched(self, participants: Sequence[int], rows: Tensor, phi: Any = None,
                      lams: Sequence[float] | None = None, **kwargs: Any) -> BatchedOutcome:
        """Train ``rows[i]`` of every participant together (:func:`train_participants` with
        ``ctx``; ``kwargs``: ``anchor``, ``mu``, ``oracle``, the mixture), record what ran
        and pass the runtime's per-client crash point as the loop does."""
        outcome = train_participants(self.ctx, participants, rows, phi, lams, **kwargs)
        if outcome.engine == "loop":  # train_clients' own reference loop (reason recorded)
            self.batched_fallback(outcome.reason)
        else:
            self._engine_runs[outcome.engine] = self._engine_runs.get(outcome.engine, 0) + 1
        for _ in participants:
            crash_point("train")
        return outcome

    def training_engine_results(self) -> dict[str, Any]:
        """What trained the clients (:func:`training_engine_entry`; ``reason`` None: in
        process the engine the setting resolves to runs, or a fallback names its reason),
        over the whole run (the counts are checkpointed). ``{}`` for the default loop
        (nothing asked for, nothing to report)."""
        if self.ctx.engine == "loop" and not self.ctx.engine_choice:
            return {}
        return training_engine_entry(setting=self.ctx.engine, choice=self.ctx.engine_choice,
                                     reason=None, runs=self._engine_runs,
                                     fallbacks=self._engine_fallbacks)

    def client_eval_row(self, i: int, message: Payload | None = None) -> Tensor:
        """Client ``i`` is evaluated on its own row of ``theta`` (default)."""
        return self.theta[i]

    def server_state_dict(self) -> dict[str, Any]:
        """Server state a resume cannot recompute (default: none)."""
        return {}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`server_state_dict` (default: nothing to restore)."""

    def client_state_dict(self, i: int) -> Payload:
        """Client ``i``'s parameters (its row of ``theta``)."""
        return {KIND_THETA: self.theta[i]}

    def load_client_state_dict(self, i: int, state: Payload) -> None:
        """Restore client ``i``'s row of ``theta`` (shape and finiteness checked)."""
        _load_matrix(self.theta[i], state[KIND_THETA], f"theta[{i}]")

    # ------------------------------------------------------------------ in-process driver
    def client_setup_many(self, messages: Mapping[int, Payload]) -> dict[int, Payload]:
        """All setup client halves in one process. Default: :meth:`client_setup` per client
        (an exception that is not a toolkit error names the method and client)."""
        replies = {}
        for i, m in messages.items():
            with client_half(self._label(), f"client {i}'s client_setup"):
                replies[i] = self.client_setup(i, m)
        return replies

    def _label(self) -> str:
        """The method's registered name (its class's ``name`` when built otherwise)."""
        return self.reply_rules.method if self.reply_rules is not None else self.name

    def setup(self) -> None:
        """Run the setup exchange once before the first round (no-op without one); the
        messages (:func:`~secure_fedora.algorithms.contract.check_messages`) are checked
        before any client half runs, the replies against :attr:`reply_rules` before the
        server half sees them."""
        with server_half(self, self._label(), "setup_messages()"):
            setup = self.setup_messages()
        messages = check_messages(self._label(), SETUP, 0, setup,
                                  range(self.ctx.num_clients), self.ctx.flat.num_params)
        if messages:
            rules = self.reply_rules
            privacy = self.ctx.privacy
            if rules is not None and rules.private and rules.setup_kinds and privacy is not None:
                # in client order, as the release journals' resume checks read the ledgers
                messages = dict(sorted(messages.items()))
            exchange = self.ctx.open_exchange(SETUP) if self._setup_envelopes() else None
            asked: set[int] = set()
            if exchange is not None:
                messages, asked = self._send_stage_messages(exchange, SETUP, 0, messages)
            with privacy.setup_exchange() if privacy is not None else contextlib.nullcontext():
                replies = self.client_setup_many(messages)
            if self.ctx.privacy is not None:
                check_setup_steps(rules.method if rules is not None else self.name,
                                  self.ctx.privacy, list(messages))
            if rules is not None:
                replies = rules.check_replies(SETUP, 0, replies, messages, self.reply_schema)
                if rules.private and rules.setup_kinds and privacy is not None:
                    unrecorded = [i for i in replies if privacy.clients[i].summary_release is None]
                    if unrecorded:
                        raise ContractError(
                            f"method {rules.method!r} declares a setup release "
                            f"{list(rules.setup_kinds)}, but client(s) {unrecorded[:8]} replied "
                            "without it being admitted and recorded (make it through "
                            "ctx.privacy.noised_summaries, or ctx.privacy.gaussian for a "
                            "plug-in mechanism); nothing reached the server")
                    for i, reply in replies.items():  # what leaves is what was released
                        privacy.check_plug_in_reply(SETUP, i, 0, reply,
                                                    rules.plug_in_entries.get(SETUP, {}))
                    # every setup release journaled: marked before the first one leaves
                    privacy.mark_round(0, list(replies))
            if exchange is not None:
                replies = self._upload_stage_replies(exchange, SETUP, 0, messages, replies, asked)
                self._earlier_security = _merged_security(self._earlier_security, exchange)
            with server_half(self, self._label(), "server_setup(replies)"):
                self.server_setup(replies)

    def _setup_envelopes(self) -> bool:
        """Whether the generic setup exchange envelopes this method's setup messages and
        replies (a method that sends its setup replies its own way, e.g. FEDORA's signed
        summaries on their own transport, returns False)."""
        return True

    def _send_stage_messages(self, exchange: Any, stage: str, rnd: int,
                             messages: Mapping[int, Payload]
                             ) -> tuple[dict[int, Payload], set[int]]:
        """A setup exchange's messages as signed envelopes (each entry one of kind
        ``<stage>.<entry>``, an empty message one empty envelope of kind ``stage``), sent
        once more to a client that rejected its message; returns every client's message and
        the clients asked twice. A client that rejects it twice stops the run
        (:class:`SetupRejectedError`), as on Flower, where the setup needs every client."""
        return self._send_twice(
            stage, messages, SetupRejectedError,
            lambda some: _send_untracked(exchange, stage, rnd, some, list(some)))

    def _send_twice(self, stage: str, messages: Mapping[int, Payload],
                    error: type[ToolkitError],
                    send: Callable[[dict[int, Payload]], dict[int, Payload]]
                    ) -> tuple[dict[int, Payload], set[int]]:
        """``send`` (the clients that accepted their messages, with them) ``messages``, and
        once more the messages of the clients that rejected theirs; returns every client's
        message and the clients asked twice. A client that rejects it twice stops the run with
        ``error`` naming it, as on Flower, where the method's ``stage`` needs every client."""
        held = send(dict(messages))
        missed = {i: m for i, m in messages.items() if i not in held}
        if missed:
            held.update(send(missed))
        absent = sorted(set(messages) - set(held))
        if absent:
            raise error(
                f"method {self._label()!r}: client(s) {absent[:8]} rejected the {stage} message "
                f"(asked twice), and the method's {stage} needs every client's reply, so the "
                "run stops and no results are written; see the rejections logged by "
                "secure_fedora.security")
        return {i: held[i] for i in messages}, set(missed)

    def _upload_stage_replies(self, exchange: Any, stage: str, rnd: int,
                              messages: Mapping[int, Payload], replies: Mapping[int, Payload],
                              asked: set[int]) -> dict[int, Payload]:
        """Every setup or finalize reply travels as signed envelopes (each entry one of kind
        ``<stage>.<entry>``, an empty reply one empty envelope of kind ``stage``), as on
        Flower. A client whose reply is rejected after its first message is asked once more,
        as the Flower server asks again: its message (fresh envelopes), then the same reply
        (a Flower client answers a message it already answered from its saved state). A
        client without an accepted reply after two tries stops the run
        (:class:`SetupRejectedError` / :class:`FinalizeRejectedError`), since the method's
        exchange needs every client's reply. Returns the replies, as sent."""
        accounted = stage == SETUP and self.ctx.privacy is not None
        ok = _upload_untracked(exchange, stage, rnd, replies, list(replies), accounted)
        again = [i for i in replies if i not in ok and i not in asked]
        if again:
            if stage == SETUP:
                held = _send_untracked(exchange, stage, rnd, messages, again)
            else:
                held = self._exchange_downloads(rnd, {i: dict(messages[i]) for i in again}, stage)
            ok |= _upload_untracked(exchange, stage, rnd, replies, [i for i in again if i in held],
                                    False)
        absent = sorted(set(replies) - ok)
        if absent:
            error = SetupRejectedError if stage == SETUP else FinalizeRejectedError
            raise error(
                f"method {self._label()!r}: client(s) {absent[:8]} gave no accepted {stage} "
                f"reply (asked twice), and the method's {stage} needs every client's reply, so "
                "the run stops and no results are written; see the rejections logged by "
                "secure_fedora.security")
        return dict(replies)

    def round_statistics(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """What the round's clients did, from the replies its update used (the accepted
        ones, as on Flower: the server trusts only authenticated replies; never called with
        none): ``steps`` summed. Methods add their own entries."""
        return {"steps": float(sum(int(r[KEY_STEPS]) for r in replies.values() if KEY_STEPS in r))}

    def sat_out_statistics(self, rnd: int, reasons: Mapping[int, str]) -> dict[str, float]:
        """Round ``rnd``'s statistics owed to clients that sat it out, ``reasons`` mapping
        each to why, as its runtime learned it without an accepted reply (e.g.
        :data:`~secure_fedora.algorithms.contract.SAT_OUT_PULL_DIVERGED`, from its error
        reply): :meth:`round_statistics` sees accepted replies only. The runtime adds them to
        the round's statistics (summed with an entry of the same name). Default: none."""
        return {}

    def train_round(self, rnd: int, participants: Sequence[int],
                    admit: Callable[[int], bool] | None = None) -> dict[str, float]:
        """One generic round: :meth:`configure`, the downloads through the exchange,
        ``admit``, :meth:`client_update_many`, the uploads through the exchange,
        :meth:`aggregate`, in Flower's order (a ClientApp verifies the message, then admits
        its release, then trains). A participant that rejects a download takes no part: it
        neither trains nor releases, and ``admit`` is not asked for it. ``admit(i)`` (under
        DP: the runtime's admission of client ``i``'s round release, accounted before its
        training) is asked for every participant whose downloads were accepted; one it
        refuses takes no part either. Without ``admit`` every such participant trains (the
        caller admitted ``participants`` itself).
        Returns :meth:`round_statistics` of the accepted replies (a client whose upload was
        rejected trained, and its release is accounted, but the server counts nothing of it)
        merged with ``aggregate``'s statistics, and counts the accepted replies in
        :attr:`round_replied`. A round with no accepted upload (every download or upload
        rejected, nobody admitted) is not aggregated (as on Flower): neither
        :meth:`round_statistics` nor :meth:`aggregate` is called, :meth:`round_discarded` is,
        and its statistics are :func:`~secure_fedora.algorithms.contract.no_reply_statistics`.

        A rejected upload whose reply row is the client's own row of the upload matrix (e.g.
        FEDORA's and FedAvg's ``theta``) is the client's state as on Flower, where a ClientApp
        keeps what it trained whatever the server accepts: the server keeps its last accepted
        row (the exchange's copy) and the client its trained row, which it starts the next
        round from, is evaluated on and checkpoints. So is an accepted reply whose row is not
        the client's own row of a matrix that is its state and differs from it (a plug-in
        releasing a compressed or perturbed copy), with or without an exchange: the server's
        row is the reply, the client keeps its row. :meth:`aggregate` (and any server step
        run under :meth:`server_view`) sees the server's rows."""
        rules = self.reply_rules
        label = self._label()
        with server_half(self, label, f"configure(rnd, participants) of round {rnd}"):
            configured = self.configure(rnd, participants)
        messages = check_messages(label, ROUND, rnd, configured, participants,
                                  self.ctx.flat.num_params)
        messages = self._exchange_downloads(rnd, messages)
        if admit is not None:
            # under DP the admissions' journal fsyncs overlap; all are durable after the block
            batch = (self.ctx.privacy.admission_batch(rnd) if self.ctx.privacy is not None
                     else contextlib.nullcontext())
            with batch:
                messages = {i: m for i, m in messages.items() if admit(i)}
        replies: dict[int, Payload] = {}
        if messages:
            with client_half(label, f"the client halves of round {rnd} (client_update_many)"):
                replies = self.client_update_many(rnd, messages)
            if rules is not None:
                replies = rules.check_replies(ROUND, rnd, replies, messages, self.reply_schema)
                if self.ctx.privacy is not None and ROUND in rules.plug_in_entries:
                    for i, reply in replies.items():  # before any of them leaves
                        self.ctx.privacy.check_plug_in_reply(ROUND, i, rnd, reply,
                                                             rules.plug_in_entries[ROUND])
            if self.ctx.privacy is not None:  # executed == accounted DP-SGD steps, before any use
                self.ctx.privacy.confirm_steps(rnd, list(messages))
            self._check_buffers(f"in round {rnd}'s training")
        self.uploads_begun = rnd
        enveloped = self.exchange is not None and self._round_envelopes()
        accepted = (self._exchange_uploads(rnd, replies) if enveloped
                    else self._own_uploads(rnd, replies))
        self.last_round = rnd
        self.round_replied = len(accepted)
        if not accepted:
            with server_half(self, label, f"round_discarded(rnd) of round {rnd}"):
                self.round_discarded(rnd)
            return no_reply_statistics()
        with server_half(self, label, f"round_statistics(rnd, replies) of round {rnd}"):
            stats = self.round_statistics(rnd, accepted)
        with self.server_view(), server_half(self, label,
                                             f"aggregate(rnd, replies) of round {rnd}"):
            update = self.aggregate(rnd, accepted)
        return round_statistics_of(label, rnd, stats, update)

    def views_differ(self) -> bool:
        """Whether some client's own row of an upload matrix differs from the server's last
        accepted row (an upload was rejected since, or an accepted reply was not the client's
        row; :meth:`server_view` swaps them)."""
        return any(self._diverged.values())

    def _server_row(self, kind: str, i: int) -> Tensor:
        """The server's row of diverged client ``i`` in the upload matrix of ``kind``."""
        held = self._server_rows.get(kind)
        if held is not None and i in held:
            return held[i]
        return self.exchange.server_rows[kind][i]

    def _is_client_state(self, i: int, row: Tensor) -> bool:
        """Whether ``row`` (client ``i``'s row of an upload matrix) is part of the client's
        own state: an entry of :meth:`client_state_dict` is that row (FEDORA's and FedAvg's
        ``theta``), not a server-side copy (FedAMP's ``models``, Ditto's upload buffer)."""
        ptr = row.data_ptr()
        with client_half(self._label(), f"client {i}'s client_state_dict"):
            state = self.client_state_dict(i)
        return any(isinstance(v, Tensor) and v.data_ptr() == ptr for v in state.values())

    def _separate(self, i: int, row: Tensor, reply_row: Tensor) -> bool:
        """Whether client ``i``'s reply row is not its own row ``row`` of an upload matrix
        that is its state, and differs from it: then the server's row is the reply and the
        client keeps ``row`` (as a Flower ClientApp keeps what it trained). Free where the
        reply is the row (the same storage)."""
        return (reply_row.data_ptr() != row.data_ptr() and self._is_client_state(i, row)
                and not torch.equal(reply_row, row))

    def _own_uploads(self, rnd: int, replies: Mapping[int, Payload]) -> dict[int, Payload]:
        """The round's uploads where the generic exchange envelopes none (no exchange, or a
        method that sends its replies its own way: :meth:`_round_envelopes` False); returns
        the accepted replies. Default: every reply is accepted, and one whose row is not the
        client's own becomes the server's row (:meth:`_hold_server_rows`). An override that
        can reject a reply keeps the views as :meth:`_exchange_uploads` does: the client its
        row, the server its last accepted one (:attr:`_diverged`)."""
        accepted = dict(replies)
        self._hold_server_rows(accepted)
        return accepted

    def _hold_server_rows(self, replies: Mapping[int, Payload]) -> None:
        """Without the generic upload exchange: every accepted reply whose row is not the
        client's own (:meth:`_separate`) becomes the server's row of that client, held apart
        from the client's; a reply that is its own row ends a difference of views."""
        if not replies:
            return
        for kind, matrix in self.upload_state().items():
            diverged = self._diverged.get(kind)
            for i, reply in replies.items():
                if kind not in reply:
                    continue
                if self._separate(i, matrix[i], reply[kind]):
                    self._server_rows.setdefault(kind, {})[i] = reply[kind].detach().clone()
                    self._diverged.setdefault(kind, set()).add(i)
                elif diverged and i in diverged:
                    diverged.discard(i)
                    self._server_rows.get(kind, {}).pop(i, None)

    @contextlib.contextmanager
    def server_view(self) -> Iterator[None]:
        """Inside: every upload matrix holds the server's last accepted row of every client
        (the exchange's copy, or the row held apart) where the client's own row differs
        (:meth:`views_differ`); the clients' rows are put back on exit. Copies only those
        clients' rows."""
        if not self.views_differ():
            yield
            return
        uploads = self.upload_state()
        own: list[tuple[Tensor, Tensor]] = []
        for kind, clients in self._diverged.items():
            matrix = uploads[kind]
            for i in sorted(clients):
                own.append((matrix[i], matrix[i].clone()))
                matrix[i].copy_(self._server_row(kind, i))
        try:
            yield
        finally:
            for row, value in own:
                row.copy_(value)

    def eval_row(self, i: int) -> Tensor:
        """The parameters on which client ``i`` is evaluated (its personalized model):
        :meth:`eval_rows` of ``[i]``."""
        return self.eval_rows([i])[0]

    def eval_rows(self, clients: Sequence[int]) -> list[Tensor]:
        """The parameters on which each of ``clients`` (distinct) is evaluated (its personalized
        model), in order: :meth:`evaluation_rows`, with an :class:`EvaluationRejectedError`
        naming the clients that rejected their evaluation message (with envelopes)."""
        ids = list(clients)
        rows = self.evaluation_rows(ids)
        absent = [i for i in ids if i not in rows]
        if absent:
            raise EvaluationRejectedError(
                f"method {self._label()!r}: client(s) {absent[:8]} rejected their evaluation "
                f"message of round {self.last_round}")
        return [rows[i] for i in ids]

    def evaluation_rows(self, clients: Sequence[int], *, retry: bool = False) -> dict[int, Tensor]:
        """The parameters on which each of ``clients`` (distinct) that accepted its evaluation
        message is evaluated (its personalized model), by client, in the order given. One
        evaluation exchange for all of them, as on Flower: :meth:`evaluation_messages` is
        asked once for ``clients`` and its messages are checked (:func:`check_messages`)
        before any is sent; with an exchange every entry is a signed envelope
        (``evaluate.<entry>``), and a client that rejects its message is absent from the
        result (on Flower it refuses the message and reports no metrics); ``retry`` sends
        such a client its message once more (fresh envelopes), as the Flower server does for
        the final evaluation. Each row is checked
        (:func:`~secure_fedora.algorithms.contract.check_eval_row`: finite, of the model's
        size). A client's message is released once its row is built, so messages that are
        not the row itself are never all held at once."""
        return self._evaluation_rows(list(clients), retry, keep=False)[0]

    def evaluation_reports(
        self, clients: Sequence[int], measure: Callable[[dict[int, Tensor]], dict[int, Tensor]],
        *, retry: bool = False,
    ) -> dict[int, Tensor]:
        """One evaluation exchange, both ways, as on Flower: :meth:`evaluation_rows` of
        ``clients`` (the messages, ``retry`` as there), ``measure(rows)`` (client -> its
        metrics, a float64 vector, for exactly the clients of ``rows``), then each client's
        metrics travel back as its evaluation reply: with an exchange one envelope of kind
        ``evaluate.reply`` per client, signed by the client on the unaccounted path (metrics
        release nothing the accountant covers, as a Flower client's evaluation reply).
        Returns the metrics the server accepted, by client in the order given; a client whose
        message or reply was rejected is absent (it keeps its last metrics). With ``retry`` a
        client gets two tries, each its message then its reply: one whose reply was rejected
        after its first message is sent the message once more (fresh envelopes) and, if it
        accepts it, sends the same metrics again (a Flower client answers a message it
        already answered from its saved state); the messages are then held until the
        replies are in."""
        ids = list(clients)
        rows, messages, asked = self._evaluation_rows(ids, retry, keep=retry)
        metrics = measure(rows)
        if set(metrics) != set(rows):
            raise ContractError(f"method {self._label()!r}: measure returned metrics of clients "
                                f"{sorted(metrics)}, not of the evaluated clients {sorted(rows)}")
        del rows
        if self.exchange is None:
            return {i: metrics[i] for i in ids if i in metrics}
        rnd = self.last_round
        replied = set(self.exchange.upload_entries(rnd, metrics, kind=KIND_EVALUATION_REPLY,
                                                   accounted=False))
        again = [i for i in ids if i in metrics and i not in replied and i not in asked]
        if retry and again:
            held = self._exchange_evaluation(rnd, messages, again)
            replied.update(self.exchange.upload_entries(
                rnd, {i: metrics[i] for i in again if i in held}, kind=KIND_EVALUATION_REPLY,
                accounted=False))
        return {i: metrics[i] for i in ids if i in replied}

    def _evaluation_rows(self, ids: list[int], retry: bool, *, keep: bool
                         ) -> tuple[dict[int, Tensor], dict[int, Payload], set[int]]:
        """:meth:`evaluation_rows`, with the messages of the clients that accepted theirs when
        ``keep`` (else ``{}``) and the clients whose message was sent twice."""
        label, num_params = self._label(), self.ctx.flat.num_params
        with server_half(self, label, f"evaluation_messages(rnd, clients) of round "
                                      f"{self.last_round}"):
            evaluation = self.evaluation_messages(self.last_round, ids)
        messages = check_messages(label, EVALUATE, self.last_round, evaluation, ids, num_params)
        refused: set[int] = set()
        asked: set[int] = set()
        # every method's evaluation message is signed, also one that sends its round
        # messages its own way (FEDORA's encrypted propagation), as on Flower
        if self.exchange is not None:
            held = self._exchange_evaluation(self.last_round, messages, ids)
            missed = [i for i in ids if i not in held]
            if missed and retry:
                held.update(self._exchange_evaluation(self.last_round, messages, missed))
                asked.update(missed)
            refused = set(ids) - set(held)
            messages = {i: m for i, m in messages.items() if i in held}
        kept = dict(messages) if keep else {}
        rows: dict[int, Tensor] = {}
        for i in ids:
            if i in refused:
                continue
            message = messages.pop(i, None)
            with client_half(label, f"client {i}'s client_eval_row"):
                row = self.client_eval_row(i, message)
            rows[i] = check_eval_row(label, i, row, num_params)
        return rows, kept, asked

    def finalize(self) -> dict[str, Any]:
        """Run the finalize exchange (downloads through the exchange, for round
        ``last_round + 1``, as on Flower) and return :meth:`server_finalize`'s results (:func:`check_finalize_results`); the
        messages are checked
        (:func:`check_messages`) before any is sent. As on Flower, where the method's
        finalize needs every client's reply, a client that rejects its message is sent it
        once more (fresh envelopes); one that rejects it again stops the run with a
        :class:`FinalizeRejectedError` naming it, before any client half runs."""
        label = self._label()
        with server_half(self, label, "finalize_messages()"):
            final = self.finalize_messages()
        messages = check_messages(label, FINALIZE, self.last_round, final,
                                  range(self.ctx.num_clients), self.ctx.flat.num_params)
        # after every round, as on Flower (wire_round: rounds + 1): its envelopes, and any
        # rejection results.json records, are told apart from the last round's
        final_round = self.last_round + 1
        sent, asked = messages, set()
        if messages:
            messages, asked = self._send_twice(
                FINALIZE, messages, FinalizeRejectedError,
                lambda some: self._exchange_downloads(final_round, some, FINALIZE))
        replies = {}
        for i, m in messages.items():
            with client_half(self._label(), f"client {i}'s client_finalize"):
                replies[i] = self.client_finalize(i, m)
        if self.reply_rules is not None:
            replies = self.reply_rules.check_replies(FINALIZE, self.last_round, replies, messages,
                                                     self.reply_schema)
        if replies:
            self._check_buffers("in the clients' finalize")
        if replies and self.exchange is not None and self._round_envelopes():
            replies = self._upload_stage_replies(self.exchange, FINALIZE, final_round, sent,
                                                 replies, asked)
        with server_half(self, label, "server_finalize(replies)"):
            results = self.server_finalize(replies)
        return check_finalize_results(label, results)

    def _check_buffers(self, when: str) -> None:
        """ModelError when the model's buffers changed since they were checked
        (:attr:`MethodContext.buffers`), run after the client halves and before any of their
        replies reaches the server half: in process the clients share one module, so a buffer
        one client's forward wrote would carry its data into the others' releases."""
        if self.ctx.buffers is not None:
            self.ctx.buffers.check(f"{when}, before any client's reply left")

    def _round_envelopes(self) -> bool:
        """Whether the generic exchange envelopes this method's round and finalize messages
        and replies (a method that sends them its own way, e.g. as ciphertexts, returns
        False; its evaluation messages are signed all the same)."""
        return True

    def _exchange_downloads(self, rnd: int, messages: dict[int, Payload],
                            stage: str = ROUND) -> dict[int, Payload]:
        """Every message entry travels as a signed envelope (an entry of a kind the
        exchange tracks, or any other), and an empty message as one empty envelope of kind
        ``stage`` (Local's round message), as on Flower every message is signed. A client
        that rejects one is left out of the result (it neither trains nor releases, as a
        Flower ClientApp that refuses the message does)."""
        if self.exchange is None or not messages or not self._round_envelopes():
            return messages
        out = {i: dict(m) for i, m in messages.items()}
        refused: set[int] = set()
        bare = [i for i, m in messages.items() if not m]
        if bare:
            empty = torch.zeros(0, dtype=torch.uint8)  # one object: encoded once for all
            accepted = set(self.exchange.send_entries(rnd, dict.fromkeys(bare, empty),
                                                      kind=stage))
            refused.update(i for i in bare if i not in accepted)
        for kind in dict.fromkeys(k for m in messages.values() for k in m):
            rows = {i: m[kind] for i, m in out.items() if kind in m and i not in refused}
            if kind not in self.exchange.client_rows:  # signed too, no copy kept
                accepted = set(self.exchange.send_entries(rnd, rows, kind=kind))
                refused.update(i for i in rows if i not in accepted)
                continue
            seen = len(self.exchange.rejections)
            held = self.download_rows(rnd, rows, kind=kind)
            refused.update(r.client for r in self.exchange.rejections[seen:])
            for i in rows:
                out[i][kind] = held[i]
        return {i: m for i, m in out.items() if i not in refused}

    def _exchange_evaluation(self, rnd: int, messages: Mapping[int, Payload],
                             clients: Sequence[int]) -> dict[int, Payload]:
        """Each of ``clients`` receives its evaluation message as signed envelopes: every
        entry one of kind ``evaluate.<entry>`` (nothing tracked, nothing copied), an empty
        message (or none) one empty envelope of kind ``evaluate``, as on Flower every message
        is signed; the clients that accepted all of theirs, with their messages (``{}`` for
        none). A client that rejects one is left out (it does not evaluate, as a Flower
        ClientApp that refuses the message sends no metrics)."""
        assert self.exchange is not None
        refused: set[int] = set()
        bare = [i for i in clients if not messages.get(i)]
        if bare:
            empty = torch.zeros(0, dtype=torch.uint8)  # one object: encoded once for all
            accepted = set(self.exchange.send_entries(rnd, dict.fromkeys(bare, empty),
                                                      kind=EVALUATE))
            refused.update(i for i in bare if i not in accepted)
        sent = {i: messages[i] for i in clients if messages.get(i)}
        for key in dict.fromkeys(k for m in sent.values() for k in m):
            rows = {i: m[key] for i, m in sent.items() if key in m and i not in refused}
            accepted = set(self.exchange.send_entries(rnd, rows, kind=f"{EVALUATE}.{key}"))
            refused.update(i for i in rows if i not in accepted)
        return {i: messages.get(i, {}) for i in clients if i not in refused}

    def _exchange_uploads(self, rnd: int, replies: Mapping[int, Payload]) -> dict[int, Payload]:
        """Reply entries of the upload kinds :meth:`message_state` names travel as signed
        envelopes, and so does every entry of a reply that carries none of them (Local's step
        count: an envelope of kind ``round.<entry>``; an empty reply: one empty envelope of
        kind ``round``), as on Flower every reply is signed; a
        client with any rejected upload is absent from the result. A client whose reply row
        is its own row of the matrix keeps it when it is not accepted (the server keeps its
        last accepted row: :meth:`train_round`); one whose matrix row is its state but whose
        reply is another row (:meth:`_separate`) keeps its row whatever the server accepts."""
        if not replies:  # train_round calls it only with an exchange that envelopes rounds
            return {}
        uploads = self.upload_state()
        accepted = dict(replies)
        for kind, matrix in uploads.items():
            diverged = self._diverged.setdefault(kind, set())
            # the clients whose row of the matrix is their own state; those whose reply is
            # another row (a plug-in's release that is not its state) keep theirs: clients[i]
            own = {i for i, r in replies.items()
                   if kind in r and r[kind].data_ptr() == matrix[i].data_ptr()}
            clients = {i: matrix[i].clone() for i, r in replies.items()
                       if kind in r and i not in own and self._separate(i, matrix[i], r[kind])}
            # a client already left out by an earlier kind's rejection sends nothing of this one
            diverged.update(i for i in own | set(clients) if i not in accepted)
            senders = [i for i, r in accepted.items() if kind in r]
            if not senders:
                continue
            for i in senders:
                row = accepted[i][kind]
                if row.data_ptr() != matrix[i].data_ptr():
                    matrix[i].copy_(row)
            self.exchange.rejected_rows = {}  # an override may not call the exchange
            ok = set(self.upload_rows(rnd, matrix, senders, kind=kind))
            kept = self.exchange.rejected_rows
            for i in senders:
                if i in clients:  # the server holds the reply (or its last accepted row)
                    matrix[i].copy_(clients[i])
                    diverged.add(i)
                elif i in ok:
                    diverged.discard(i)
                elif i in own and i in kept:
                    matrix[i].copy_(kept[i])
                    diverged.add(i)
            accepted = {i: r for i, r in accepted.items() if kind not in r or i in ok}
        untracked = {i: r for i, r in accepted.items() if not any(k in r for k in uploads)}
        bare = [i for i, r in untracked.items() if not r]
        if bare:  # an empty reply is one empty envelope of the stage's kind, as on Flower
            empty = torch.zeros(0, dtype=torch.uint8)
            ok = set(self.exchange.upload_entries(rnd, dict.fromkeys(bare, empty), kind=ROUND))
            accepted = {i: r for i, r in accepted.items() if i not in bare or i in ok}
        for key in dict.fromkeys(k for r in untracked.values() for k in r):
            rows = {i: r[key] for i, r in untracked.items() if key in r and i in accepted}
            ok = set(self.exchange.upload_entries(rnd, rows, kind=f"{ROUND}.{key}"))
            accepted = {i: r for i, r in accepted.items() if i not in rows or i in ok}
        return accepted

    # ------------------------------------------------------------------ messages
    def message_state(self) -> MessageState | None:
        """What a message exchange must track for this method, read when it is attached
        (after setup or a checkpoint restore): the matrices whose rows clients upload, by
        kind, and the per-client copies of what they download, by kind (each client's last
        accepted row, which :meth:`download_rows` returns after a rejection; the generic
        round and finalize exchanges leave a rejecting client out instead). ``None`` (the
        default) and ``({}, {})`` alike: nothing is tracked, but with envelopes the method's
        messages and replies are signed and verified all the same (every entry, an empty
        message or reply as one empty envelope), as on Flower."""
        return None

    def upload_state(self) -> dict[str, Tensor]:
        """The upload part of :meth:`message_state` (the matrices whose rows clients upload,
        by kind), read after every round's training: an override must not compute what only
        the downloads need (e.g. rows that depend on the parameters before training)."""
        state = self.message_state()
        return state[0] if state is not None else {}

    def upload_rows(self, rnd: int, matrix: Tensor, participants: Sequence[int], *,
                    kind: str = KIND_THETA, check: ValueCheck | None = None) -> list[int]:
        """Participants upload their rows of ``matrix``; returns those the server accepted,
        in the given order. Without an exchange: all of them, nothing changes. With one, a
        rejected row is put back (in place) to the server's last accepted value."""
        if self.exchange is None:
            return list(participants)
        return self.exchange.upload_rows(rnd, matrix, participants, kind=kind, check=check)

    def download_rows(self, rnd: int, rows: Mapping[int, Tensor], *, kind: str) -> dict[int, Tensor]:
        """The server sends ``rows[i]`` to client ``i``; returns what each client holds
        afterwards. Without an exchange: ``rows`` itself (the same tensors, no copy). With
        one: the verified tensor, or after a rejection the client's last accepted copy
        (tracked kinds) -- or nothing for that client (untracked kinds)."""
        if self.exchange is None:
            return dict(rows)
        held, _ = self.exchange.download_rows(rnd, rows, kind=kind)
        return held

    def security_results(self) -> dict[str, Any]:
        """What the signed-message layer did: every rejection (a :class:`Rejection` dict)
        and the traffic; ``{}`` when the method ran without envelopes."""
        if self.exchange is None:
            return {}
        earlier = self._earlier_security
        transport = self.exchange.transport.stats.to_dict()
        for key, value in earlier.get("transport", {}).items():
            transport[key] = transport.get(key, 0) + value
        return {
            "rejections": [*earlier.get("rejections", []),
                           *(r.to_dict() for r in self.exchange.rejections)],
            "transport": transport,
        }

    def _with_security(self, extra: dict[str, Any]) -> dict[str, Any]:
        security = self.security_results()
        return {**extra, "security": security} if security else extra

    # ------------------------------------------------------------------ checkpoints
    def _client_state_fields(self) -> dict[str, dict[int, Tensor]]:
        """Every client's :meth:`client_state_dict` entries other than ``theta`` (its row of
        the matrix every checkpoint holds), by field, then by the clients holding it (a field
        may be held by some clients only, as a Flower node persists whatever its client's
        state has); ``{}`` for a method that keeps the default client state. A state that is
        not a mapping of names to finite tensors a checkpoint loads back (what a Flower node
        refuses to persist) is a :class:`ContractError` naming the method, the client and the
        field (:func:`~secure_fedora.algorithms.contract.check_client_state`)."""
        if type(self).client_state_dict is FederatedMethod.client_state_dict:
            return {}
        fields: dict[str, dict[int, Tensor]] = {}
        for i in range(self.ctx.num_clients):
            with server_half(self, self._label(), f"client_state_dict({i}) for the checkpoint"):
                own = self.client_state_dict(i)
            state = check_client_state(self._label(), i, own)
            for key, value in state.items():
                if key != KIND_THETA:
                    fields.setdefault(key, {})[i] = value.detach().clone()
        return fields

    def state_dict(self) -> dict[str, Any]:
        """The in-process checkpoint: every client's ``theta`` row, the rest of every
        client's :meth:`client_state_dict` (a method's client state beyond its row, e.g. a
        plug-in's, resumes as on Flower, whose nodes persist it), the server state and,
        with an exchange, every client's last accepted download of each tracked kind, the
        server's last accepted upload rows where a client's own row differs and the signed
        messages' record so far (rejections and traffic, which a resumed run continues). A
        server state key among :attr:`checkpoint_fields`, or a server state value the resume
        could not load (not a tensor or plain value), is a :class:`ContractError`."""
        with server_half(self, self._label(), "server_state_dict() for the checkpoint"):
            server = self.server_state_dict()
        clash = sorted(str(key) for key in server if key in self.checkpoint_fields)
        if clash:
            raise ContractError(f"method {self._label()!r}: server_state_dict key(s) {clash} are "
                                "fields the in-process checkpoint writes itself "
                                f"({sorted(self.checkpoint_fields)}); rename them")
        found = _unloadable(server, "server_state_dict()")
        if found is not None:
            raise ContractError(f"method {self._label()!r}: {found[0]} holds a {found[1]}, "
                                "which a checkpoint cannot load back (tensors and plain "
                                "values only)")
        state = {KIND_THETA: self.theta, **server}
        client_fields = self._client_state_fields()
        if client_fields:
            state["client_states"] = {key: list(rows.values())
                                      for key, rows in client_fields.items()}
            partial = {key: torch.tensor(list(rows), dtype=torch.int64)
                       for key, rows in client_fields.items() if len(rows) != self.ctx.num_clients}
            if partial:  # the clients holding each field only some clients' states have
                state["client_state_holders"] = partial
        if self.exchange is not None and self.exchange.client_rows:
            state["held_downloads"] = dict(self.exchange.client_rows)
        if self.views_differ():  # the server's rows where the clients' own rows differ
            state["server_rows"] = {
                kind: {"clients": torch.tensor(sorted(ids), dtype=torch.int64),
                       "rows": torch.stack([self._server_row(kind, i) for i in sorted(ids)])}
                for kind, ids in self._diverged.items() if ids}
        if self.exchange is not None:  # so a resumed run reports the whole run's record
            state["message_security"] = FederatedMethod.security_results(self)
        if self.training_engine_results():  # so a resumed run reports the whole run's counts
            state["training_engine"] = {"runs": dict(self._engine_runs),
                                        "fallbacks": dict(self._engine_fallbacks)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (shapes and finiteness checked); the clients' held
        downloads are restored by :meth:`attach_exchange`. A plug-in's state hook that raises
        (``load_server_state_dict``, ``client_state_dict``, ``load_client_state_dict``) is a
        :class:`~secure_fedora.core.plugins.PluginError` naming the method, the hook and where
        it raised (:func:`~secure_fedora.algorithms.contract.server_half`)."""
        _load_matrix(self.theta, state["theta"], "theta")
        with server_half(self, self._label(), "load_server_state_dict(state) for the resume"):
            self.load_server_state_dict(state)
        client_fields = state.get("client_states")
        if client_fields is not None:
            self._load_client_states(client_fields, state.get("client_state_holders", {}))
        self._held_downloads = state.get("held_downloads")
        self._load_server_rows(state.get("server_rows"))
        security = state.get("message_security", {})
        if not (isinstance(security, dict)
                and isinstance(security.get("rejections", []), list)
                and all(isinstance(r, dict) for r in security.get("rejections", []))
                and isinstance(security.get("transport", {}), dict)
                and all(isinstance(k, str) and isinstance(v, int | float)
                        for k, v in security.get("transport", {}).items())):
            raise ValueError("checkpoint field 'message_security' must hold the rejections and the "
                             "traffic counts of the signed messages")
        self._earlier_security = security
        engine = state.get("training_engine")
        if engine is not None:
            runs, fallbacks = engine.get("runs"), engine.get("fallbacks")
            if not all(isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, int)
                                                   and v >= 0 for k, v in d.items())
                       for d in (runs, fallbacks)):
                raise ValueError("checkpoint field 'training_engine' must hold counts by name")
            self._engine_runs, self._engine_fallbacks = dict(runs), dict(fallbacks)

    def _load_client_states(self, client_fields: Any, holders: Any) -> None:
        """Restore every client's checkpointed client state fields through
        :meth:`load_client_state_dict`; a client gets exactly the fields its state had (one
        that lacked a field gets none, as a Flower node restores what it persisted)."""
        n = self.ctx.num_clients
        bad = ValueError("checkpoint field 'client_states' must hold one tensor per client "
                         "of each client state field")
        if not isinstance(client_fields, dict) or not isinstance(holders, dict) \
                or not set(holders) <= set(client_fields):
            raise bad
        by_client: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for key, rows in client_fields.items():
            ids = holders.get(key)
            if ids is None:
                clients = list(range(n))
            elif isinstance(ids, Tensor) and ids.dim() == 1 and ids.dtype == torch.int64:
                clients = ids.tolist()
                if clients != sorted(set(clients)) or not all(0 <= i < n for i in clients):
                    raise bad
            else:
                raise bad
            if not isinstance(rows, list) or len(rows) != len(clients) \
                    or not all(isinstance(r, Tensor) for r in rows):
                raise bad
            for i, row in zip(clients, rows, strict=True):
                by_client[i][key] = row
        for i in range(n):
            # the fields the client's state has, its theta row as just restored
            with server_half(self, self._label(), f"client_state_dict({i}) for the resume"):
                own = self.client_state_dict(i)
            held = {k: v for k, v in own.items() if k not in client_fields}
            with server_half(self, self._label(), f"load_client_state_dict({i}, state) for the "
                                                  "resume"):
                self.load_client_state_dict(i, {**held, **by_client[i]})

    def attach_exchange(self, exchange: Any) -> None:
        """Use ``exchange`` (a :class:`~secure_fedora.secure.transport.SecureExchange` built
        from :meth:`message_state`) for the rounds; after a checkpoint restore each client
        again holds the downloads it had accepted (not the server's current values)."""
        held = getattr(self, "_held_downloads", None)
        if held is not None:
            if set(held) != set(exchange.client_rows):
                raise ValueError(f"checkpoint holds downloads of kinds {sorted(held)}, the "
                                 f"exchange tracks {sorted(exchange.client_rows)}")
            for kind, rows in held.items():
                _load_matrix(exchange.client_rows[kind], rows, f"held_downloads.{kind}")
            self._held_downloads = None
        for kind, rows in self._server_rows.items():
            store = exchange.server_rows.get(kind)
            if store is None:
                raise ValueError(f"checkpoint field 'server_rows.{kind}' names an upload kind "
                                 f"the exchange does not track ({sorted(exchange.server_rows)})")
            for i, row in rows.items():
                store[i].copy_(row)
        self._server_rows = {}
        self.exchange = exchange

    def _load_server_rows(self, entries: Any) -> None:
        """Restore :meth:`state_dict`'s ``server_rows`` (the server's rows of the diverged
        clients, by upload kind), held apart until an exchange is attached."""
        self._diverged, self._server_rows = {}, {}
        if entries is None:
            return
        if not isinstance(entries, dict):
            raise ValueError("checkpoint field 'server_rows' must map upload kinds to clients "
                             "and rows")
        uploads = self.upload_state()
        for kind, entry in entries.items():
            matrix = uploads.get(kind) if isinstance(kind, str) else None
            ids = entry.get("clients") if isinstance(entry, dict) else None
            if matrix is None or not isinstance(ids, Tensor) or ids.dim() != 1 \
                    or ids.dtype != torch.int64 or not all(0 <= i < matrix.shape[0]
                                                           for i in ids.tolist()):
                raise ValueError(f"checkpoint field 'server_rows.{kind}' does not name clients "
                                 "of an upload kind")
            rows = matrix[ids].clone()
            _load_matrix(rows, entry.get("rows"), f"server_rows.{kind}")
            self._server_rows[kind] = dict(zip(ids.tolist(), rows, strict=True))
            self._diverged[kind] = set(ids.tolist())

    def extra_results(self) -> dict[str, Any]:
        """Method-specific results added to results.json at the end of a run: the finalize
        exchange's results (:meth:`finalize`), with a ``"security"`` entry from
        :meth:`security_results` when envelopes were on."""
        extra = self._with_security(self.finalize())
        engine = self.training_engine_results()
        return {**extra, "training_engine": engine} if engine else extra


# What a checkpoint's safe loader (torch.load with weights_only) reads back: other values
# (a numpy array or scalar, a Path, a frozenset, a named tuple, ...) are written but refused
# on resume, so a run could not be resumed.
_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
                 torch.Size)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def _unloadable(value: Any, where: str) -> tuple[str, str] | None:
    """The first place in ``value`` (its path from ``where``, its type's name) that a
    checkpoint cannot load back; None when every part is a tensor or a plain value."""
    kind = type(value)
    if kind in (Tensor, torch.nn.Parameter) or kind in _PLAIN_LEAVES:
        return None
    if kind in _PLAIN_CONTAINERS:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            found = _unloadable(key, f"{where} (a key)") if isinstance(value, dict) else None
            if found is not None:
                return f"{where} (a key)", found[1]
            found = _unloadable(item, f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    return where, kind.__name__


def _send_untracked(exchange: Any, stage: str, rnd: int, messages: Mapping[int, Payload],
                    clients: Sequence[int]) -> dict[int, Payload]:
    """``clients``' messages of ``stage`` through ``exchange`` (nothing tracked): every entry
    an envelope of kind ``<stage>.<entry>``, an empty message one empty envelope of kind
    ``stage``; the clients that accepted all of theirs, with their messages."""
    refused: set[int] = set()
    bare = [i for i in clients if not messages[i]]
    if bare:
        empty = torch.zeros(0, dtype=torch.uint8)  # one object: encoded once for all
        accepted = set(exchange.send_entries(rnd, dict.fromkeys(bare, empty), kind=stage))
        refused.update(i for i in bare if i not in accepted)
    for key in dict.fromkeys(k for i in clients for k in messages[i]):
        rows = {i: messages[i][key] for i in clients if key in messages[i] and i not in refused}
        accepted = set(exchange.send_entries(rnd, rows, kind=f"{stage}.{key}"))
        refused.update(i for i in rows if i not in accepted)
    return {i: messages[i] for i in clients if i not in refused}


def _upload_untracked(exchange: Any, stage: str, rnd: int, replies: Mapping[int, Payload],
                      clients: Sequence[int], accounted: bool) -> set[int]:
    """``clients``' replies of ``stage`` through ``exchange``: every entry an envelope of kind
    ``<stage>.<entry>`` (under DP a setup reply's summary one of kind ``summary``, signed by
    the summary release's own pipeline when ``accounted``, as a Flower client signs a fresh
    one), an empty reply one empty envelope of kind ``stage``; the other entries go the
    unaccounted path (they release nothing the accountant covers). Returns the clients whose
    every entry was accepted."""
    ok = set(clients)
    bare = [i for i in clients if not replies[i]]
    if bare:
        empty = torch.zeros(0, dtype=torch.uint8)
        ok -= set(bare) - set(exchange.upload_entries(rnd, dict.fromkeys(bare, empty),
                                                      kind=stage, accounted=False))
    for key in dict.fromkeys(k for i in clients for k in replies[i]):
        rows = {i: replies[i][key] for i in clients if key in replies[i] and i in ok}
        if accounted and key == KIND_SUMMARY:  # continues its admitted summary release
            ok -= set(rows) - set(exchange.upload_released_rows(rnd, rows, kind=KIND_SUMMARY))
            continue
        ok -= set(rows) - set(exchange.upload_entries(rnd, rows, kind=f"{stage}.{key}",
                                                      accounted=False))
    return ok


def _merged_security(earlier: Mapping[str, Any], exchange: Any) -> dict[str, Any]:
    """``earlier`` (a :meth:`FederatedMethod.security_results` record) with ``exchange``'s
    rejections and traffic added."""
    transport = dict(earlier.get("transport", {}))
    for key, value in exchange.transport.stats.to_dict().items():
        transport[key] = transport.get(key, 0) + value
    return {"rejections": [*earlier.get("rejections", []),
                           *(r.to_dict() for r in exchange.rejections)],
            "transport": transport}


def _load_matrix(target: Tensor, value: Any, name: str) -> None:
    """Copy a checkpoint field into ``target``; a clear error (nothing copied) when it is not a
    tensor of ``target``'s shape or holds a non-finite value."""
    if not isinstance(value, Tensor) or value.shape != target.shape:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"checkpoint field {name!r} has shape {shape}, expected {tuple(target.shape)}")
    if not all_finite(value):
        raise ValueError(f"checkpoint field {name!r} contains non-finite values")
    target.copy_(value)


def _scalar(value: float | int) -> Tensor:
    """A reply scalar as a 0-d tensor (float64 for floats: a Python float round-trips)."""
    return torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)


@METHODS.register("local")
class Local(LocalChecks, FederatedMethod):
    """Local-only training: every client trains alone; no model is communicated (empty
    messages, and replies that carry only the step count). With envelopes those messages
    and replies are signed and checked, as on Flower, so a tampered one is refused alike."""

    name = "local"
    sends_messages = False

    def message_state(self) -> MessageState | None:
        """Nothing to track: the exchange only signs the empty messages and the step
        counts."""
        return {}, {}

    def message_entries(self, stage: str) -> dict[str, TensorSignature] | None:
        """Every message is empty: round messages carry nothing, evaluation messages carry
        nothing, and Local sends no setup or finalize message (one carrying an entry is
        refused)."""
        return {SETUP: {}, ROUND: {}, EVALUATE: {}, FINALIZE: {}}.get(stage)

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        """A round reply carries only the step count (the model never leaves)."""
        if stage == ROUND:
            return {KEY_STEPS: "the number of local steps (fixed by the plan, data-independent)"}
        return super().reply_entries(cfg, stage)

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Train client ``i``'s own row in place."""
        return {KEY_STEPS: _scalar(self.ctx.train_client(i, self.theta[i]))}

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """Every participant's own row, trained together."""
        participants = list(messages)
        reason = self.batched_unsupported(participants, [self.ctx.oracle])
        if reason is not None:
            return self.batched_fallback(reason)
        out = self.train_batched(participants, self.theta)
        return {i: {KEY_STEPS: _scalar(out.steps[i])} for i in participants}


NO_FINETUNED_METRIC = -1.0
"""A FedAvg finalize reply's ``finetuned_test_metric`` when the fine-tuned copy has no test
metric in [0, 1]: the server leaves that client out of the ``<name>_ft`` row."""


def _is_metric(value: float) -> bool:
    """Whether ``value`` is a metric: a number in [0, 1] (NaN is not)."""
    return 0.0 <= value <= 1.0


FINETUNING_UNDER_DP = (
    "FedAvg's fine-tuned copies stay on the client: their fine-tuning steps are outside the "
    "privacy plan and the ledgers, so the reported fedavg_ft test metric is not covered by the "
    "DP guarantee (with private validation data the last fine-tuning epoch is reported, none "
    "is chosen on validation data).")
"""results.json ``assumptions.fedavg_finetuning`` of a DP run that fine-tunes FedAvg."""


#: FedAvg's fine-tuning epochs when its constructor is not given them (the config's default).
DEFAULT_FINETUNE_EPOCHS = 5


@METHODS.register("fedavg")
class FedAvg(FedAvgChecks, FederatedMethod):
    """FedAvg (McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data"): participants start from the global model, train
    locally, and the server averages their models weighted by training-set size (which each
    reply carries as ``num_examples``).

    Evaluated both as the global model and after local fine-tuning of the final global model
    (``finetune_epochs`` epochs, best epoch chosen on each client's validation data, or the
    last epoch when ``select_on_validation`` is False, as under private validation with DP):
    the finalize exchange sends the final global model to every client, which replies with
    the test metric of its fine-tuned copy. A class built on FedAvg fine-tunes only where it
    declares ``finetunes = True`` (:meth:`FedAvgChecks.fine_tunes`): otherwise it is FedAvg
    without fine-tuning, and ``finetune_epochs`` above 0 is refused when it is built.
    """

    name = "fedavg"

    def __init__(self, ctx: MethodContext, finetune_epochs: int | None = None,
                 select_on_validation: bool = True) -> None:
        """``finetune_epochs``: unset, 5 for a class that fine-tunes and 0 for another."""
        if finetune_epochs is None:
            finetune_epochs = DEFAULT_FINETUNE_EPOCHS if type(self).fine_tunes() else 0
        if finetune_epochs > 0 and not type(self).fine_tunes():
            # its replies, results.json and the config follow the class's declaration
            raise ContractError(
                f"{type(self).__name__} is built on FedAvg with finetune_epochs = "
                f"{finetune_epochs} but does not declare that it fine-tunes: set "
                f"'finetunes = True' on {type(self).__name__} (FedAvg's fine-tuning is not "
                "inherited), or build it with finetune_epochs = 0")
        super().__init__(ctx)
        self.global_params = ctx.init.clone()
        self.finetune_epochs = finetune_epochs
        self.select_on_validation = select_on_validation

    @classmethod
    def from_config(cls, ctx: MethodContext, cfg: Any) -> FedAvg:
        """``[fedavg] finetune_epochs`` sets the fine-tuning epochs of a class that fine-tunes
        (:meth:`FedAvgChecks.fine_tunes`; none for another); the epoch is chosen on
        validation data exactly when rounds are (``model_selection``)."""
        return cls(ctx, finetune_epochs=cfg.fedavg.finetune_epochs if cls.fine_tunes() else 0,
                   select_on_validation=model_selection(cfg) == "validation")

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        """A round reply adds the training-set size (public by the run's assumptions); the
        finalize reply of a class that fine-tunes (:meth:`FedAvgChecks.fine_tunes`) is the
        fine-tuned copy's test metric (not covered by DP, as ``assumptions.fedavg_finetuning``
        says); another's finalize reply carries nothing."""
        if stage == ROUND:
            return {**super().reply_entries(cfg, stage),
                    KEY_NUM_EXAMPLES: NUM_EXAMPLES_REASON}
        if stage == FINALIZE and cls.fine_tunes():
            return {"finetuned_test_metric": "the fine-tuned copy's test metric: not covered by "
                                             "DP (assumptions.fedavg_finetuning)"}
        return super().reply_entries(cfg, stage)

    @classmethod
    def assumptions(cls, cfg: Any) -> dict[str, Any]:
        """Under DP with fine-tuning: what the reported ``fedavg_ft`` metric is not covered by
        (only when ``fedavg`` itself runs: a method registered on FedAvg states its own
        ``<name>_finetuning``, from what it fine-tuned, in :meth:`derived_assumptions`)."""
        # FedAvg.name, not cls.name: a subclass naming itself runs under its own name
        if cfg.privacy.enabled and cfg.fedavg.finetune_epochs > 0 and FedAvg.name in cfg.methods:
            return {"fedavg_finetuning": FINETUNING_UNDER_DP}
        return {}

    @property
    def weights(self) -> Tensor:
        """Every client's training-set size (float32). Client data: only for subclasses that
        still aggregate inside ``train_round``; FedAvg's server half uses the replies'
        ``num_examples`` instead."""
        return torch.tensor([float(c.train_x.shape[0]) for c in self.ctx.clients])

    def message_state(self) -> MessageState | None:
        """Uploads: ``theta`` rows; downloads: the global model (each client's copy)."""
        n = self.ctx.num_clients
        return {KIND_THETA: self.theta}, {KIND_GLOBAL: self.global_params.expand(n, -1)}

    def message_entries(self, stage: str) -> dict[str, TensorSignature] | None:
        """Every round, evaluation and finalize message carries the global model alone; no
        setup message is sent (one carrying an entry is refused)."""
        model = {KIND_GLOBAL: _model_signature(self.ctx)}
        return {SETUP: {}, ROUND: model, EVALUATE: model, FINALIZE: model}.get(stage)

    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Every participant receives the global model."""
        return {i: {KIND_GLOBAL: self.global_params} for i in participants}

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Start from the received global model, train; reply the model, the number of
        training examples and the steps."""
        self.theta[i].copy_(message[KIND_GLOBAL])
        steps = self.ctx.train_client(i, self.theta[i])
        return {KIND_THETA: self.theta[i],
                KEY_NUM_EXAMPLES: _scalar(int(self.ctx.clients[i].train_x.shape[0])),
                KEY_STEPS: _scalar(steps)}

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """Every participant starts from its received global model; trained together."""
        participants = list(messages)
        reason = self.batched_unsupported(participants, [self.ctx.oracle])
        if reason is not None:
            return self.batched_fallback(reason)
        for i in participants:
            self.theta[i].copy_(messages[i][KIND_GLOBAL])
        out = self.train_batched(participants, self.theta)
        return {i: {KIND_THETA: self.theta[i],
                    KEY_NUM_EXAMPLES: _scalar(int(self.ctx.clients[i].train_x.shape[0])),
                    KEY_STEPS: _scalar(out.steps[i])} for i in participants}

    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """The global model becomes the average of the accepted models, weighted by their
        ``num_examples`` (unchanged when no reply was accepted)."""
        if replies:
            ids = list(replies)
            w = torch.tensor([float(replies[i][KEY_NUM_EXAMPLES]) for i in ids])
            w = w / w.sum()
            rows = torch.stack([replies[i][KIND_THETA] for i in ids])
            self.global_params.copy_(w.to(rows.device) @ rows)
        return {}

    def evaluation_messages(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """Clients are evaluated on the global model."""
        return {i: {KIND_GLOBAL: self.global_params} for i in clients}

    def client_eval_row(self, i: int, message: Payload | None = None) -> Tensor:
        """The received global model."""
        assert message is not None, "FedAvg evaluates the global model it sends"
        return message[KIND_GLOBAL]

    def server_state_dict(self) -> dict[str, Any]:
        """The global model."""
        return {"global": self.global_params}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global model (shape and finiteness checked)."""
        _load_matrix(self.global_params, state["global"], "global")

    def finalize_messages(self) -> dict[int, Payload]:
        """With fine-tuning: the final global model to every client (a client that rejects
        it twice stops the run: :meth:`FederatedMethod.finalize`)."""
        if self.finetune_epochs == 0:
            return {}
        return {i: {KIND_GLOBAL: self.global_params} for i in range(self.ctx.num_clients)}

    def client_finalize(self, i: int, message: Payload) -> Payload:
        """Fine-tune the received model for ``finetune_epochs`` epochs, one at a time; reply
        the test metric at the epoch with the best validation metric (epoch 0 included), or
        at the last epoch without consulting validation data (``select_on_validation`` False).
        A validation metric that is no number in [0, 1] (NaN) is never chosen: any epoch with
        one beats it, and with none the reply is epoch 0's. A test metric that is no number in
        [0, 1] is replied as :data:`NO_FINETUNED_METRIC` (a NaN cannot travel in a reply),
        which the server leaves out of the ``<name>_ft`` row."""
        ctx = self.ctx
        c = ctx.clients[i]
        one_epoch = TrainConfig(**{**ctx.train.__dict__, "local_epochs": 1})
        row = message[KIND_GLOBAL].clone()
        ctx.select(i)
        if not self.select_on_validation:
            for _ in range(self.finetune_epochs):
                local_train(ctx.flat, row, c.train_x, c.train_y, one_epoch, ctx.oracle,
                            ctx.generators[i], ctx.workspace)
            last = evaluate(ctx.flat, row, c.test_x, c.test_y).metric
            return {"finetuned_test_metric": _scalar(self._finetuned_reply(i, last))}
        best_val = evaluate(ctx.flat, row, c.val_x, c.val_y).metric
        best_test = evaluate(ctx.flat, row, c.test_x, c.test_y).metric
        for _ in range(self.finetune_epochs):
            local_train(ctx.flat, row, c.train_x, c.train_y, one_epoch, ctx.oracle,
                        ctx.generators[i], ctx.workspace)
            val = evaluate(ctx.flat, row, c.val_x, c.val_y).metric
            if _is_metric(val) and (not _is_metric(best_val) or val > best_val):
                best_val = val
                best_test = evaluate(ctx.flat, row, c.test_x, c.test_y).metric
        return {"finetuned_test_metric": _scalar(self._finetuned_reply(i, best_test))}

    def _finetuned_reply(self, i: int, metric: float) -> float:
        """``metric`` as client ``i``'s reply: itself when a number in [0, 1], else
        :data:`NO_FINETUNED_METRIC` with a warning naming the client and the value."""
        if _is_metric(metric):
            return float(metric)
        log.warning("%s: client %d: fine-tuned test metric %r is no number in [0, 1]; replied "
                    "as missing (%r)", self._label(), i, metric, NO_FINETUNED_METRIC)
        return NO_FINETUNED_METRIC

    @classmethod
    def derived_rows(cls, name: str, outcome: Mapping[str, Any]
                     ) -> dict[str, list[float | None]]:
        """``methods.<name>_ft``: the fine-tuned test metric of every client, when the run
        fine-tuned (``finetuned_test_accuracy`` in the method's results; ``None`` for a client
        left out, see :meth:`server_finalize`)."""
        tuned = outcome.get("extra", {}).get("finetuned_test_accuracy")
        return {} if tuned is None else {f"{name}_ft": list(tuned)}

    @classmethod
    def derived_assumptions(cls, name: str, outcome: Mapping[str, Any],
                            cfg: Any) -> dict[str, Any]:
        """Under DP, a ``methods.<name>_ft`` row (whatever ``[fedavg]`` says: a method
        registered on FedAvg fine-tunes with its own settings) is stated as not covered:
        ``assumptions.fedavg_finetuning`` for ``fedavg``, ``<name>_finetuning`` otherwise."""
        if not cfg.privacy.enabled or not cls.derived_rows(name, outcome):
            return {}
        if name == FedAvg.name:
            return {"fedavg_finetuning": FINETUNING_UNDER_DP}
        return {f"{name}_finetuning": FINETUNING_UNDER_DP.replace(
            "FedAvg's", f"{name}'s (built on FedAvg)").replace("fedavg_ft", f"{name}_ft")}

    def server_finalize(self, replies: Mapping[int, Payload]) -> dict[str, Any]:
        """``finetuned_test_accuracy``: every client's fine-tuned test metric, in client order;
        one that is no number in [0, 1] (NaN, out of range, :data:`NO_FINETUNED_METRIC`) is
        left out, ``None`` there and listed in ``finetuned_left_out``, with a warning naming
        the client: it is never averaged into the ``<name>_ft`` row."""
        if not replies:
            return {}
        label = self._label()
        tuned: list[float | None] = []
        left_out = []
        for i in sorted(replies):
            value = float(replies[i]["finetuned_test_metric"])
            if _is_metric(value):
                tuned.append(value)
                continue
            log.warning("%s: client %d: fine-tuned test metric %r is no number in [0, 1]; left "
                        "out of %s_ft", label, i, value, label)
            tuned.append(None)
            left_out.append(i)
        return {"finetuned_test_accuracy": tuned,
                **({"finetuned_left_out": left_out} if left_out else {})}


CKKS_KEYS = (
    "every client holds the CKKS secret key (the key-holder client creates the keys, seals the "
    "secret context to each client's X25519 key and decrypts what is released); the server "
    "holds only the public and evaluation keys, so the ciphertexts are confidential only while "
    "the server colludes with no client and never forwards one client's ciphertext to another "
    "party")
"""results.json ``assumptions.ckks_keys`` of a run with encrypted relatedness or propagation."""

CKKS_RELATEDNESS_RELEASE = (
    "the server learns every overlap block U_i^T U_j, i.e. all inner products of the clients' "
    "summary columns (which fix the summaries up to one orthogonal transformation common to all "
    "of them), not only the similarities computed from them")
"""results.json ``assumptions.encrypted_relatedness`` of a run with encrypted relatedness."""


@METHODS.register("fedora")
class Fedora(FedoraChecks, FederatedMethod):
    """FEDORA (Wu, Bao, Ainsworth, He, KDD 2023, "Personalized Federated Learning with
    Parameter Propagation"): relatedness from data subspaces, a top-k graph, a personalized
    PageRank propagation matrix P; each client is pulled toward ``phi_i = sum_j P_ij theta_j``
    only when ``phi_i`` has lower validation loss than its own model.

    The contract: the setup exchange carries each client's relatedness summary (plain, DP-noised
    through ``ctx.privacy`` or, with envelopes, signed; with ``relatedness_mode`` containing
    "encrypted" the server combines them under CKKS); ``server_setup`` builds graph and
    operator. Each round's message is ``phi_i`` alone; the client computes ``lambda_i`` (exact,
    or with ``private_validation`` the accounted, noised one from ``ctx.privacy``) and trains;
    its reply is its ``theta`` row, ``lambda`` and ``steps``; ``aggregate`` propagates (in the
    clear, or through the CKKS propagator under ``propagation = "encrypted"``).

    ``relatedness_fn`` replaces the setup exchange by a function returning the overlap
    blocks and their details (tests, experiments).
    """

    name = "fedora"
    #: The config keys a resume may amend (rundir.AMENDABLE_KEYS) that this method reads: a
    #: resume records an amendment for, and applies it to, the methods that declare the key.
    amendable_keys: ClassVar[tuple[str, ...]] = ("fedora.max_pull",)

    def __init__(
        self,
        ctx: MethodContext,
        q: int = 1,
        tau: float = 10.0,
        k: int = 2,
        alpha: float = 0.8,
        propagation: str = "dense",
        relatedness_fn: Callable[[], tuple[Tensor, dict[str, Any]]] | None = None,
        relatedness_mode: str = "plain",
        private_validation: bool = False,
        propagation_tolerance: float = 1e-4,
        max_pull: float | None = None,
    ) -> None:
        super().__init__(ctx)
        self.q, self.tau, self.k, self.alpha = q, tau, k, alpha
        self.max_pull = max_pull
        self.propagation_requested = propagation
        self.propagation_mode = resolve_propagation(propagation, ctx.num_clients)
        self.propagation_tolerance = propagation_tolerance
        self._phi = self.theta.clone()
        # True while phi == P @ theta exactly as propagate() computes it: phi is then left out
        # of checkpoints and recomputed on restore (bit-identical, same operator and inputs).
        self._phi_is_propagated = False
        # With a sparse operator, propagate() only marks every row pending (as of theta's
        # version then); a row is computed when a round sends it (configure) or phi is read,
        # so a round costs the product over its participants' rows, not over all N.
        self._phi_pending: Tensor | None = None
        self._phi_theta_version = -1
        self.relatedness: Relatedness | None = None
        self._relatedness_fn = relatedness_fn
        self._relatedness_mode = relatedness_mode
        self.private_validation = private_validation
        # float64: lambda may exceed float32's range (it is exp of a loss difference)
        self.last_lambdas: Any = ctx.per_client(torch.zeros((), dtype=torch.float64))
        # The summaries' signed transport (opened in setup when the runtime offers envelopes).
        self.summary_transport: Any = None
        # CKKS propagation (an EncryptedPropagator) under propagation = "encrypted"; the signed
        # envelopes are the base class's ``exchange``.
        self.propagator: Any = None
        # phi from the round's ciphertext exchange (run with the uploads, before aggregate)
        self._exchanged_phi: Tensor | None = None
        # The encryption backend (ctx.encryption) when a mode asks for it; refused without one.
        self.encryption: EncryptionBackend | None = None
        wanted = {}
        if "encrypted" in relatedness_mode and relatedness_fn is None:
            wanted["fedora.relatedness"] = relatedness_mode
        if self.propagation_mode == "encrypted":
            wanted["fedora.propagation"] = "encrypted"
        if wanted:
            self.encryption = require_encryption(ctx.encryption, wanted)
        if self.propagation_mode == "encrypted":
            self.propagator = self.encryption.propagator(ctx.num_clients)

    @classmethod
    def from_config(cls, ctx: MethodContext, cfg: Any) -> Fedora:
        """The ``[fedora]`` section; private validation from ``data.validation``."""
        f = cfg.fedora
        return cls(ctx, q=f.q, tau=f.tau, k=f.k, alpha=f.alpha, propagation=f.propagation,
                   propagation_tolerance=f.propagation_tolerance, relatedness_mode=f.relatedness,
                   private_validation=cfg.data.validation == "private", max_pull=f.max_pull)

    @classmethod
    def assumptions(cls, cfg: Any) -> dict[str, Any]:
        """Encrypted modes: who holds the CKKS secret key, and what encrypted relatedness still
        lets the server learn."""
        out: dict[str, Any] = {}
        if "encrypted" in cfg.fedora.relatedness or cfg.fedora.propagation == "encrypted":
            out["ckks_keys"] = CKKS_KEYS
        if "encrypted" in cfg.fedora.relatedness:
            out["encrypted_relatedness"] = CKKS_RELATEDNESS_RELEASE
        return out

    @classmethod
    def check_data(cls, cfg: Any, facts: DataFacts) -> None:
        """``fedora.q`` at most the summary width (input features + classes: the columns of
        every client's summary rows) and, where a summary is the plain SVD of a client's
        training rows (``relatedness`` without "noised"), at most every client's number of
        training rows. ``q`` equal to the width with ``k < N - 1`` runs, with a warning: every
        summary is then the whole space, so the top-k neighbours are a tie-break."""
        q = cfg.fedora.q
        width = facts.input_size + facts.num_classes
        if q > width:
            raise ValueError(
                f"fedora.q = {q} is above the summary width {width} ({facts.input_size} input "
                f"features + {facts.num_classes} classes), the most summary directions a client "
                f"has; use fedora.q <= {width}")
        if "noised" not in cfg.fedora.relatedness and facts.train_sizes:
            fewest = min(facts.train_sizes)
            if q > fewest:
                client = facts.train_sizes.index(fewest)
                raise ValueError(
                    f"fedora.q = {q} is above client {client}'s {fewest} training rows (fedora."
                    f"relatedness {cfg.fedora.relatedness!r} takes a summary's directions from "
                    f"them); use fedora.q <= {fewest}")
        n = len(facts.train_sizes) or cfg.data.num_clients
        if q == width and cfg.fedora.k < n - 1:
            # Every summary then spans all of R^width: each cosine sum is width, every
            # similarity ties, and the top-k cut falls inside the tie.
            log.warning(
                "fedora.q = %d equals the summary width %d (%d input features + %d classes): "
                "every client's summary spans the whole space, so all similarities are equal "
                "and each client's fedora.k = %d neighbours among the other %d are picked by "
                "tie-breaking (or rounding), not by its data; use fedora.q < %d, or fedora.k "
                "= %d to keep every other client", q, width, facts.input_size,
                facts.num_classes, cfg.fedora.k, n - 1, width, n - 1)

    @classmethod
    def distributed_unsupported(cls, cfg: Any) -> str | None:
        """Encrypted propagation is simulated in process only; across processes the
        propagation runs in the clear over TLS."""
        if cfg.fedora.propagation == "encrypted":
            return ("fedora.propagation = 'encrypted' (the Flower runtime propagates in the clear"
                    " over TLS; use 'auto', 'dense', 'factored', 'sparse' or 'power', or the"
                    " in-process runtime for encrypted propagation)")
        return None

    @classmethod
    def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
        """A noised summary once (``relatedness`` "noised..."), then per round the DP-SGD
        model and, with private validation, the noised lambda. The summary upload is
        CKKS-encrypted under "noised+encrypted", the model under ``propagation =
        "encrypted"``."""
        specs = []
        if "noised" in cfg.fedora.relatedness:
            specs.append(ReleaseSpec("summary", ("gaussian_summary",), SETUP,
                                     encrypted="encrypted" in cfg.fedora.relatedness))
        round_mechanisms = ("dpsgd", "gaussian_lambda") if cfg.data.validation == "private" \
            else ("dpsgd",)
        specs.append(ReleaseSpec("model", round_mechanisms, ROUND,
                                 encrypted=cfg.fedora.propagation == "encrypted"))
        return tuple(specs)

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        """Setup: the summary, as ``[fedora] relatedness`` releases it (noised: the 'summary'
        release; noised+encrypted: that release, uploaded CKKS-encrypted). Round: the DP-SGD
        model, the step count and ``lambda`` (private validation: noised, in the 'model'
        release; public: computed on validation data the config declares public)."""
        if stage == SETUP:
            return {KIND_SUMMARY: f"the relatedness summary ({SUMMARY_REASONS[cfg.fedora.relatedness]})"}
        if stage == ROUND:
            why = ("noised, accounted in the 'model' release (gaussian_lambda)"
                   if cfg.data.validation == "private" else
                   "computed on validation data declared public (data.validation = 'public')")
            return {**super().reply_entries(cfg, stage), KEY_LAMBDA: f"lambda_i: {why}"}
        return super().reply_entries(cfg, stage)

    # ------------------------------------------------------------------ setup exchange
    def setup(self) -> None:
        """Build the relatedness once (kept when restored from a checkpoint)."""
        if self.private_validation and self.ctx.privacy is None:
            raise ValueError("private validation needs the client privacy state (ctx.privacy)")
        if self.relatedness is not None:
            return
        if self._relatedness_fn is not None:
            overlaps, details = self._relatedness_fn()
            self.relatedness = self._build_relatedness(overlaps, details)
            return
        if self.summary_transport is None:
            self.summary_transport = self.ctx.open_transport("summary")
        super().setup()

    def _setup_envelopes(self) -> bool:
        """FEDORA signs its summaries itself, on their own transport (``summary``)."""
        return False

    def message_entries(self, stage: str) -> dict[str, TensorSignature] | None:
        """The setup message is empty, a round message carries the client's ``phi_i`` alone,
        an evaluation message nothing (a client is evaluated on its own ``theta_i``); no
        finalize message is sent (one carrying an entry is refused)."""
        return {SETUP: {}, ROUND: {KIND_PHI: _model_signature(self.ctx)}, EVALUATE: {},
                FINALIZE: {}}.get(stage)

    def setup_messages(self) -> dict[int, Payload]:
        """Every client is asked for its summary (an empty message)."""
        return {i: {} for i in range(self.ctx.num_clients)}

    def client_setup(self, i: int, message: Payload) -> Payload:
        """Client ``i``'s summary ``U_i`` (d x q) of its training data, in the clear."""
        if "noised" in self._relatedness_mode:  # accounted through client i's own gate
            ctx = self.ctx
            return {KIND_SUMMARY: ctx.privacy.noised_summary(i, ctx.clients[i], self.q,
                                                             ctx.num_classes, ctx.noise[i])}
        c = self.ctx.clients[i]
        x, y = (c.train_x.cpu(), c.train_y.cpu()) if self._blockwise_plain() else (c.train_x, c.train_y)
        return {KIND_SUMMARY: fedora.client_summary(x, y, self.ctx.num_classes, self.q, client=i)}

    def client_setup_many(self, messages: Mapping[int, Payload]) -> dict[int, Payload]:
        """Every client's summary; noised: each client's accounted release through its gate
        (``ctx.privacy.noised_summaries``, all clients at once, in client order)."""
        if "noised" not in self._relatedness_mode:
            return super().client_setup_many(messages)
        ctx = self.ctx
        if list(messages) != list(range(ctx.num_clients)):
            raise ValueError("noised summaries are released by every client at once, in order")
        summaries = ctx.privacy.noised_summaries(ctx.clients, self.q, ctx.num_classes, ctx.noise)
        return {i: {KIND_SUMMARY: summaries[i]} for i in messages}

    def server_setup(self, replies: Mapping[int, Payload]) -> None:
        """Graph and operator from the summaries: blockwise (sparse, plain, no envelopes),
        through CKKS (``encrypted`` modes: the server sees only the q x q overlap blocks), or
        from the overlap blocks of the (signed) summaries. A client whose signed summary is
        rejected is excluded (it trains as Local would)."""
        n = self.ctx.num_clients
        if sorted(replies) != list(range(n)):
            raise fedora.RelatednessError(
                f"relatedness needs every client's summary; got {sorted(replies)} of {n}")
        summaries = torch.stack([replies[i][KIND_SUMMARY] for i in range(n)])
        if self._blockwise_plain():
            graph = fedora.topk_graph_from_summaries(summaries, self.tau, self.k)
            self.relatedness = Relatedness(None, None, graph, self._operator(graph),
                                           self._relatedness_mode, {})
            return
        transport = self.summary_transport
        if "encrypted" in self._relatedness_mode:
            assert self.encryption is not None  # required in __init__ for encrypted modes
            overlaps, details = encrypted_relatedness(self.encryption, summaries, transport,
                                                       self.ctx.privacy)
        else:
            details = {}
            if transport is not None:
                summaries, rejections = _enveloped_summaries(transport, summaries)
                excluded = sorted(r.client for r in rejections)
                details = _exclusion_details(excluded, rejections, transport)
            overlaps = fedora.subspace_overlaps(summaries)
        self.relatedness = self._build_relatedness(overlaps, details)

    #: Name of the deployment protocol that yields the overlap blocks under CKKS
    #: (``{"overlaps": (N, N, q, q) float64, "details": {...}}``; see setup_ceremony).
    CKKS_CEREMONY = "ckks_overlaps"

    def setup_ceremony(self) -> str | None:
        """Encrypted modes: the CKKS ceremony (a deployment never sends a summary in the
        clear; the server receives only the decrypted overlap blocks)."""
        return self.CKKS_CEREMONY if "encrypted" in self._relatedness_mode else None

    def server_setup_from_ceremony(self, name: str, result: Mapping[str, Any]) -> None:
        """Graph and operator from the ceremony's overlap blocks (as :meth:`server_setup`
        builds them from the in-process encrypted overlaps)."""
        if name != self.CKKS_CEREMONY:
            raise NotImplementedError(f"FEDORA runs no setup ceremony {name!r}")
        self.relatedness = self._build_relatedness(result["overlaps"],
                                                   dict(result.get("details", {})))

    def _blockwise_plain(self) -> bool:
        """Sparse propagation of plain relatedness without envelopes: the graph is built
        blockwise from the summaries, so no N x N matrix is ever held (the same graph the
        overlap blocks give, bit for bit)."""
        return (self.propagation_mode in ("sparse", "factored") and self._relatedness_mode == "plain"
                and not self.ctx.envelopes)

    def _operator(self, graph: Tensor) -> PropagationOperator:
        return build_operator(graph, self.alpha, self.propagation_mode, self.propagation_tolerance,
                              fallback=self.propagation_requested == "auto")

    def _build_relatedness(self, overlaps: Tensor, details: dict[str, Any]) -> Relatedness:
        """Graph and P from the overlap blocks. ``details["excluded"]`` (clients whose
        summary was rejected) builds them over the other clients only; each excluded client
        gets a self-loop in the graph and its unit vector as P row, and no other client puts
        weight on it, so it trains as Local would."""
        overlaps = overlaps.cpu()  # relatedness is computed in float64 on the CPU
        excluded = sorted(set(details.get("excluded") or ()))
        if excluded:
            return self._build_partial_relatedness(overlaps, details, excluded)
        sums = fedora.cosine_sums(overlaps)
        graph = fedora.topk_graph_from_cosine_sums(sums, self.tau, self.k)
        return Relatedness(overlaps, _raw_similarity(sums, self.tau), graph, self._operator(graph), self._relatedness_mode,
                           details)

    def _build_partial_relatedness(self, overlaps: Tensor, details: dict[str, Any],
                                   excluded: list[int]) -> Relatedness:
        n = self.ctx.num_clients
        if any(not isinstance(i, int) or not 0 <= i < n for i in excluded):
            raise fedora.RelatednessError(f"excluded clients {excluded} are not client indices in [0, {n})")
        members = [i for i in range(n) if i not in set(excluded)]
        if len(members) < 2:
            raise fedora.RelatednessError(
                f"relatedness needs at least two clients, but only {len(members)} remain after "
                f"excluding clients {excluded} (their summaries were rejected)")
        idx = torch.as_tensor(members)
        sub = overlaps[idx][:, idx]
        sums = fedora.cosine_sums(sub)
        graph = fedora.topk_graph_from_cosine_sums(sums, self.tau, self.k)
        similarity = _raw_similarity(sums, self.tau)
        return Relatedness(
            overlaps,
            None if similarity is None else fedora.embed_subproblem(similarity, members, n, 0.0),
            fedora.embed_subproblem(graph, members, n, 1.0),
            embed_operator(self._operator(graph), members, n),
            self._relatedness_mode,
            details,
        )

    def message_state(self) -> MessageState | None:
        """Uploads: ``theta`` rows; downloads: ``phi`` rows (also the encrypted propagator's
        bookkeeping of the last accepted rows)."""
        return self.upload_state(), {KIND_PHI: self.phi}

    def upload_state(self) -> dict[str, Tensor]:
        """``theta`` only: reading :attr:`phi` here would compute the rows still pending from
        the last propagation after training changed theta (refused by :meth:`_current_phi`)."""
        return {KIND_THETA: self.theta}

    @property
    def phi(self) -> Tensor:
        """``phi = P @ theta`` of the last propagation (N x P), every row current."""
        if self._phi_pending is not None:
            self._current_phi(self._phi_pending.nonzero().flatten())
        return self._phi

    def _current_phi(self, rows: Sequence[int] | Tensor) -> None:
        """Compute the pending rows among ``rows`` (sparse operator), from ``theta`` as it was
        at the last propagation: refused if theta has changed since (a pending row would
        then not be that round's ``P @ theta``)."""
        pending = self._phi_pending
        if pending is None:
            return
        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        need = index[pending[index]].unique()
        if need.numel() == 0:
            return
        if self.theta._version != self._phi_theta_version:
            raise RuntimeError("phi rows pending since the last propagation were requested after "
                               "theta changed; propagate() must run again first")
        assert self.relatedness is not None
        self.relatedness.operator.apply_rows(self.theta, need, out=self._phi)
        pending[need] = False
        if not bool(pending.any()):
            self._phi_pending = None

    def _round_envelopes(self) -> bool:
        """Plaintext rows travel in envelopes unless the CKKS propagator sends ciphertexts."""
        return self.propagator is None

    def _own_uploads(self, rnd: int, replies: Mapping[int, Payload]) -> dict[int, Payload]:
        """Encrypted propagation with envelopes: the round's ciphertext exchange runs here,
        with the uploads (as on Flower, before the server aggregates): the senders upload
        their reply rows, every other client's row is the server's. A client whose upload is
        rejected keeps its trained row and the server its last accepted one (the
        exchange's), as with plaintext envelopes; its reply is not accepted. Otherwise the
        base class's uploads (every reply accepted). No reply, no ciphertext round: the
        round is not aggregated (:meth:`round_discarded`)."""
        # an earlier round's combination, left by an aggregate that never propagated, is
        # not this round's
        self._exchanged_phi = None
        if self.propagator is None or self.exchange is None or not replies:
            return super()._own_uploads(rnd, replies)
        assert self.relatedness is not None
        senders = sorted(i for i, r in replies.items() if KIND_THETA in r)
        diverged = self._diverged.setdefault(KIND_THETA, set())
        # the propagator restores a rejected row in place: it gets a copy, the clients'
        # rows stay as trained
        view = self.theta.clone()
        for i in diverged - set(senders):
            view[i].copy_(self._server_row(KIND_THETA, i))
        for i in senders:
            view[i].copy_(replies[i][KIND_THETA])
        seen = len(self.exchange.rejections)
        self._exchanged_phi = self.propagator.propagate(
            self.relatedness.propagation, view, changed=senders, rnd=rnd, exchange=self.exchange)
        rejected = {r.client for r in self.exchange.rejections[seen:] if r.direction == "upload"}
        for i in senders:
            if i in rejected or self._separate(i, self.theta[i], replies[i][KIND_THETA]):
                diverged.add(i)
            else:
                diverged.discard(i)
        return {i: r for i, r in replies.items() if i not in rejected}

    # ------------------------------------------------------------------ rounds
    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Each participant receives its ``phi_i`` (and nothing else)."""
        assert self.relatedness is not None, "setup() must run before the first round"
        self._current_phi(list(participants))
        return {i: {KIND_PHI: self._phi[i]} for i in participants}

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """``lambda_i`` from the client's validation data, then local training pulled toward
        the received ``phi_i``; the reply: the ``theta`` row, ``lambda`` and ``steps``."""
        phi = message[KIND_PHI]
        return self._train_pulled(i, phi, self.regularizations([i], {i: phi})[i])

    def client_update_loop(self, rnd: int, messages: Mapping[int, Payload]) -> dict[int, Payload]:
        """Every participant's ``lambda`` in one :meth:`regularizations` call, then each one's
        training; the same replies as :meth:`client_update` per client, bit for bit (a
        client's ``lambda`` depends only on its own rows and data). With private validation
        each client's accounted ``lambda`` release stays right before its own training. For a
        subclass overriding ``client_update`` (reached directly or through its own loop's
        ``super()``), the per-client loop that calls the override, as the Flower client does."""
        if self.private_validation or type(self).client_update is not Fedora.client_update:
            return super().client_update_loop(rnd, messages)
        phis = {i: m[KIND_PHI] for i, m in messages.items()}
        lambdas = self.regularizations(list(phis), phis)
        return {i: self._train_pulled(i, phis[i], lambdas[i]) for i in messages}

    def _train_pulled(self, i: int, phi: Tensor, lam: float) -> Payload:
        """Client ``i``'s local training pulled toward ``phi`` with weight ``lam``; its reply."""
        self.last_lambdas[i] = lam
        steps = self.ctx.train_client(i, self.theta[i], phi, lam)
        return {KIND_THETA: self.theta[i], KEY_LAMBDA: _scalar(float(lam)), KEY_STEPS: _scalar(steps)}

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """Every participant's ``lambda_i`` (:meth:`regularizations`, one call; each client's
        lambda draws precede its training draws on its own noise source, as in
        :meth:`client_update`), then all of them trained together, each pulled toward its
        received ``phi_i``."""
        participants = list(messages)
        reason = self.batched_unsupported(participants, [self.ctx.oracle])
        if reason is not None:
            return self.batched_fallback(reason)
        phi = {i: messages[i][KIND_PHI] for i in participants}
        lambdas = self.regularizations(participants, phi)
        lams = []
        for i in participants:
            self.last_lambdas[i] = lambdas[i]
            lams.append(float(lambdas[i]))
        out = self.train_batched(participants, self.theta, phi, lams)
        return {i: {KIND_THETA: self.theta[i], KEY_LAMBDA: _scalar(lams[k]),
                    KEY_STEPS: _scalar(out.steps[i])} for k, i in enumerate(participants)}

    def round_statistics(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """Steps, the mean ``lambda``, the fraction of clients pulled toward ``phi`` and the
        number whose pull was unstable (``lr * lambda`` at or above
        :func:`~secure_fedora.core.config.pull_stability_limit`, 2 without weight decay: each
        step moved ``theta`` farther from ``phi``; logged as a warning naming them and
        ``fedora.max_pull``)."""
        lambdas = {i: float(r[KEY_LAMBDA]) for i, r in replies.items()}
        values = list(lambdas.values())
        t = self.ctx.train
        limit = pull_stability_limit(t.lr, t.momentum, t.weight_decay)
        unstable = sorted(i for i, v in lambdas.items() if t.lr * v >= limit)
        if unstable:
            log.warning("round %d: FEDORA's pull was unstable (lr * lambda >= %s, so it pushed "
                        "theta away from phi) for clients %s; set fedora.max_pull = 1 or lower "
                        "training.lr", rnd, pull_limit_text(t.lr, t.momentum, t.weight_decay),
                        unstable)
        return {
            **super().round_statistics(rnd, replies),
            "mean_lambda": float(sum(values) / max(len(values), 1)),
            "pulled_fraction": float(sum(1 for v in values if v > 0) / max(len(values), 1)),
            "unstable_pulls": float(len(unstable)),
        }

    def sat_out_statistics(self, rnd: int, reasons: Mapping[int, str]) -> dict[str, float]:
        """A client whose pull diverged (:data:`~secure_fedora.algorithms.contract.SAT_OUT_PULL_DIVERGED`)
        had an unstable pull this round, a fact of the ``lambda`` it released: counted in
        ``unstable_pulls``, which its accepted replies alone leave out."""
        diverged = sum(1 for why in reasons.values() if why == SAT_OUT_PULL_DIVERGED)
        return {"unstable_pulls": float(diverged)} if diverged else {}

    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """The accepted rows become the server's; then ``phi <- P theta`` (:meth:`propagate`)
        over the server's rows. While a client's own row differs from the server's (its
        upload was rejected, or its reply was not its row), every ``phi`` row is computed
        now, from the server's rows
        (:meth:`~FederatedMethod.server_view`), and ``phi`` is checkpointed."""
        _absorb(self.theta, replies, KIND_THETA)
        self.propagate(rnd, list(replies))
        self._phi_from_server_view()
        return {}

    def round_discarded(self, rnd: int) -> None:
        """No upload of the round was accepted, so the server's rows are those of the last
        propagation: the ``phi`` rows still pending are computed from them now (the clients'
        training changed ``theta`` since, and a rejected client keeps its own row). With
        encrypted propagation the clients received the combination of the server's last
        accepted ciphertexts: that is ``phi``."""
        if self._exchanged_phi is not None:
            self._phi.copy_(self._exchanged_phi)
            self._exchanged_phi = None
            self._phi_is_propagated = False
            return
        if self._phi_pending is None or self.theta._version == self._phi_theta_version:
            return
        with self.server_view():
            self._phi_theta_version = self.theta._version
            self._phi_from_server_view(every_row=True)

    def _phi_from_server_view(self, every_row: bool = False) -> None:
        """Inside :meth:`~FederatedMethod.server_view` (or without a difference of views):
        compute every pending ``phi`` row when the clients' rows will differ from the
        server's afterwards (or ``every_row``); ``phi`` is then not ``P @ theta``."""
        if not (every_row or self.views_differ()):
            return
        self.phi  # noqa: B018 - reading phi computes every pending row
        if self.views_differ():
            self._phi_is_propagated = False

    def regularization(self, i: int, phi: Tensor | None = None) -> float:
        """``lambda_i`` from client ``i``'s validation data (exact, or accounted and noised)
        for the received ``phi`` (default: the server's ``phi_i``)."""
        if phi is None:
            self._current_phi([i])
            phi = self._phi[i]
        return self.regularizations([i], {i: phi})[i]

    def regularizations(self, participants: Sequence[int],
                        phis: Mapping[int, Tensor] | None = None) -> dict[int, float]:
        """``lambda_i`` of every client in ``participants`` for its received ``phis[i]``
        (default: the server's ``phi_i``), from its own ``theta_i`` and validation data only.

        Exact: the two validation losses of every participant in one
        :func:`~secure_fedora.learning.validation_losses.validation_losses` call, each equal
        to ``evaluate(...).loss`` bit for bit whichever clients the call holds (so one client
        in a Flower ClientApp and all participants in process get the same ``lambda``).
        Private validation: each client's accounted, noised release
        (``ctx.privacy.private_lambda``), one client after the other, in the given order.
        With ``max_pull`` each value is then bounded by ``max_pull / lr`` (post-processing)."""
        ctx = self.ctx
        ids = list(participants)
        if phis is None:
            self._current_phi(ids)
        received = [self._phi[i] if phis is None else phis[i] for i in ids]
        if self.private_validation:
            return {i: self._bounded(self._private_lambda(i, phi))
                    for i, phi in zip(ids, received, strict=True)}
        clients = [ctx.clients[i] for i in ids]
        losses = validation_losses(ctx.flat, [self.theta[i] for i in ids], received,
                                   [(c.val_x, c.val_y) for c in clients])
        for i, local, rec in zip(ids, losses.local, losses.received, strict=True):
            if not (math.isfinite(local) and math.isfinite(rec)):
                raise ClientUpdateError(
                    f"client {i}: validation loss of its own model {local}, of the received "
                    f"parameters {rec} ({diverged_hint(ctx.train, float(self.last_lambdas[i]))})")
        return {i: self._bounded(fedora.regularization_weight(local, rec))
                for i, local, rec in zip(ids, losses.local, losses.received, strict=True)}

    def _private_lambda(self, i: int, phi: Tensor) -> float:
        """Client ``i``'s accounted, noised lambda (``ctx.privacy.private_lambda``). Its
        ``theta_i`` was trained under ``last_lambdas[i]``: when that pull was unstable, the
        error for non-finite validation losses names it and its remedy instead of the generic
        hint."""
        ctx = self.ctx
        try:
            return ctx.privacy.private_lambda(i, self.theta[i], phi, ctx.clients[i].val_x,
                                              ctx.clients[i].val_y, ctx.noise[i], ctx.flat.bind)
        except ClientUpdateError as err:
            hint = diverged_hint(ctx.train, float(self.last_lambdas[i]))
            if hint == DIVERGED_HINT or DIVERGED_HINT not in str(err):
                raise
            raise ClientUpdateError(str(err).replace(DIVERGED_HINT, hint)) from err

    def _bounded(self, lam: float) -> float:
        return fedora.bounded_regularization_weight(lam, self.ctx.train.lr, self.max_pull)

    def propagate(self, rnd: int = 0, participants: Sequence[int] | None = None) -> None:
        """Server step: ``phi_i <- sum_j P_ij theta_j`` for every client, with the operator
        built in setup: dense, one product over the N x P parameters, into ``phi``; sparse or
        factored, every row marked pending and computed when it is sent or read (the same values, bit
        for bit, as one product now); through CKKS ciphertexts with the encrypted propagator
        (``participants`` re-encrypt and upload)."""
        assert self.relatedness is not None
        self._phi_pending = None
        if self.propagator is not None:
            phi, self._exchanged_phi = self._exchanged_phi, None
            if phi is None:
                phi = self.propagator.propagate(self.relatedness.propagation, self.theta,
                                                changed=participants, rnd=rnd,
                                                exchange=self.exchange)
            self._phi.copy_(phi)
            self._phi_is_propagated = False
        elif self.relatedness.operator.kind in ("sparse", "factored"):
            self._phi_pending = torch.ones(self.ctx.num_clients, dtype=torch.bool)
            self._phi_theta_version = self.theta._version
            self._phi_is_propagated = True
        else:
            self.relatedness.operator.apply(self.theta, out=self._phi)
            self._phi_is_propagated = True

    def attach(self, new_summary_overlaps: Tensor) -> Tensor:
        """The parameters handed to a late-joining client: ``phi_new = w @ theta`` with
        ``w = s_new^T P`` (:func:`~secure_fedora.algorithms.fedora.attach_new_client`), through the
        cached operator; with a sparse operator ``w`` is within the operator's error bound
        (``s_new`` is a probability vector, so its deficit is at most the largest row's)."""
        assert self.relatedness is not None
        if new_summary_overlaps.shape[0] != self.ctx.num_clients:
            raise fedora.RelatednessError(
                f"{new_summary_overlaps.shape[0]} overlap blocks for {self.ctx.num_clients} clients")
        row = fedora.attach_row(new_summary_overlaps, self.tau, self.k)
        w = self.relatedness.operator.combine(row)
        with self.server_view():
            return w.to(self.theta.dtype).to(self.theta.device) @ self.theta

    # ------------------------------------------------------------------ state
    def server_state_dict(self) -> dict[str, Any]:
        """What a resume cannot recompute: the relatedness inputs (overlap blocks, or the
        sparse graph when it was built blockwise) and ``phi`` only when it is not ``P @ theta``
        (encrypted propagation, or before the first propagation). Similarity, graph and
        operator are rebuilt from the overlaps, deterministically."""
        assert self.relatedness is not None
        r = self.relatedness
        relatedness: dict[str, Any] = {"overlaps": r.overlaps, "mode": r.mode, "details": r.details}
        if r.overlaps is None:
            g = r.graph.coalesce()
            relatedness["graph_indices"] = g.indices()
            relatedness["graph_values"] = g.values()
        state: dict[str, Any] = {"relatedness": relatedness}
        if not self._phi_is_propagated:
            state["phi"] = self._phi
        return state

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`server_state_dict` (also checkpoints that hold phi and the dense
        matrices); ``theta`` must be restored first (``phi`` may be recomputed from it)."""
        r = state["relatedness"]
        if r.get("overlaps") is not None:
            rebuilt = self._build_relatedness(r["overlaps"], r["details"])
        else:
            n = self.ctx.num_clients
            indices, values = r["graph_indices"], r["graph_values"]
            if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != values.shape[0] \
                    or (indices.numel() and (indices.min() < 0 or indices.max() >= n)):
                raise ValueError("checkpoint field 'relatedness.graph' is not a graph over "
                                 f"{n} clients")
            graph = torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=True).coalesce()
            rebuilt = Relatedness(None, None, graph, self._operator(graph), r["mode"], r["details"])
        rebuilt.mode = r["mode"]
        self.relatedness = rebuilt
        self._phi_pending = None
        if "phi" in state:
            _load_matrix(self._phi, state["phi"], "phi")
            self._phi_is_propagated = False
        else:
            self.relatedness.operator.apply(self.theta, out=self._phi)
            self._phi_is_propagated = True

    # ------------------------------------------------------------------ results
    @classmethod
    def comparisons(cls, name: str, outcomes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """``<name>_below_<reference>`` (``fedora_below_local``): the number of clients whose
        selected metric is below a local-only reference's, for each method of the run whose
        class declares ``sends_messages = False`` (Local, or a plug-in training locally only;
        FEDORA's promise: personalization never hurts a client)."""
        from secure_fedora.algorithms.contract import method_class
        from secure_fedora.core.registry import METHODS

        mine = outcomes[name]["selected"]["per_client"]
        out = {}
        for ref, outcome in outcomes.items():
            if ref != name and ref in METHODS \
                    and getattr(method_class(ref), "sends_messages", True) is False:
                theirs = outcome["selected"]["per_client"]
                out[f"{name}_below_{ref}"] = sum(
                    1 for a, b in zip(mine, theirs, strict=True) if a < b)
        return out

    def security_results(self) -> dict[str, Any]:
        """The base record plus the relatedness summaries' rejections (listed first) and
        excluded clients, and the encrypted propagation's traffic."""
        assert self.relatedness is not None
        details = self.relatedness.details
        security = super().security_results()
        summary_rejections = list(details.get("rejections") or ())
        if summary_rejections or details.get("excluded"):
            security["rejections"] = summary_rejections + security.get("rejections", [])
            security["excluded_from_relatedness"] = sorted(details.get("excluded") or ())
        if "transport" in details:
            security["relatedness_transport"] = details["transport"]
        if self.propagator is not None:
            security["encrypted_propagation"] = self.propagator.stats.to_dict()
        return security

    def server_finalize(self, replies: Mapping[int, Payload]) -> dict[str, Any]:
        """The relatedness mode, every client's graph neighbours, the propagation operator
        used (``auto`` resolved; its error bound: 0 when exact), ``max_pull`` when the
        pull was bounded, a departure from the paper's rule, and with encrypted steps their
        ``ckks_parameters`` (:meth:`ckks_parameters`)."""
        assert self.relatedness is not None
        operator = self.relatedness.operator
        propagation: dict[str, Any] = {
            "requested": self.propagation_requested, "mode": self.propagation_mode,
            "operator": operator.kind,
            "error_bound": operator.error_bound,
            "nnz_per_row": operator.nnz / max(1, operator.num_clients)}
        if operator.kind == "sparse":
            propagation["tolerance"] = operator.tolerance
        out: dict[str, Any] = {
            "relatedness_mode": self.relatedness.mode,
            "graph_neighbours": self.relatedness.neighbours(),
            "propagation": propagation,
        }
        if self.max_pull is not None:
            out["max_pull"] = self.max_pull
        parameters = self.ckks_parameters()
        if parameters:
            out["ckks_parameters"] = parameters
        return out

    def ckks_parameters(self) -> dict[str, Any]:
        """The CKKS parameters of the contexts this run's encrypted steps were computed with,
        by step (``relatedness``, ``propagation``), as their backend reported them from the
        context it built (nothing for a step in the clear or a backend that reports none)."""
        out: dict[str, Any] = {}
        assert self.relatedness is not None
        if self.relatedness.details.get("ckks_parameters"):
            out["relatedness"] = dict(self.relatedness.details["ckks_parameters"])
        if getattr(self.propagator, "ckks_parameters", None):
            out["propagation"] = dict(self.propagator.ckks_parameters)
        return out

    @classmethod
    def derived_assumptions(cls, name: str, outcome: Mapping[str, Any],
                            cfg: Any) -> dict[str, Any]:
        """``ckks_parameters``: the parameters the run's encrypted steps used (the outcome's
        ``extra.ckks_parameters``, read from the contexts built), beside ``ckks_keys``."""
        extra = outcome.get("extra")
        parameters = extra.get("ckks_parameters") if isinstance(extra, Mapping) else None
        return {"ckks_parameters": parameters} if parameters else {}


def _absorb(matrix: Tensor, replies: Mapping[int, Payload], key: str) -> None:
    """Copy each reply's ``key`` row into ``matrix`` (skipped where the reply is that row)."""
    for i, reply in replies.items():
        row = reply[key]
        if row.data_ptr() != matrix[i].data_ptr():
            matrix[i].copy_(row)


def encrypted_relatedness(backend: EncryptionBackend, summaries: Tensor, transport: Any = None,
                          releases: Any = None) -> tuple[Tensor, dict[str, Any]]:
    """The overlap blocks through ``backend`` (in both runtimes CKKS,
    :func:`secure_fedora.secure.relatedness.encrypted_overlaps`: the server computes on
    ciphertexts and sees only the decrypted q x q blocks) and their details (traffic,
    timings; with a signed ``transport`` the excluded clients). Without a transport each
    client's encryption stage runs in ``releases``' pipeline (the clients' privacy state
    under DP). ``ckks_parameters``: those of the context the backend computed with, where it
    reports them (:func:`privacy.ckks.context_parameters`)."""
    result = backend.encrypted_overlaps(summaries, transport, releases)
    details: dict[str, Any] = {
        "client_bytes_sent": result.client_bytes_sent,
        "server_bytes_received": result.server_bytes_received,
        "released_bytes": result.released_bytes,
        "timings": result.timings,
    }
    parameters = getattr(result, "ckks_parameters", None)
    if parameters:
        details["ckks_parameters"] = dict(parameters)
    if transport is not None:
        details.update(_exclusion_details(result.excluded, result.rejections, transport))
    return result.overlaps, details


def _exclusion_details(excluded: Sequence[int], rejections: Sequence[Any], transport: Any) -> dict[str, Any]:
    """The relatedness details of an enveloped exchange (JSON-compatible, checkpointed)."""
    return {
        "excluded": list(excluded),
        "rejections": [r.to_dict() for r in rejections],
        "transport": transport.stats.to_dict(),
    }


def _enveloped_summaries(transport: Any, summaries: Tensor) -> tuple[Tensor, list[Any]]:
    """Every client sends its summary in a signed envelope (round 0, float64 on the wire,
    bit for bit, as a Flower client's setup reply carries it); the server verifies all (each
    rejection is logged by the transport).

    Returns the summaries the server holds (float64; the row of a rejected client is zero and
    must not be used) and the rejections. Fewer than two accepted summaries raise
    :class:`~secure_fedora.algorithms.fedora.RelatednessError` naming the rejected clients.
    """
    n = summaries.shape[0]
    messages = {i: transport.client_upload(0, i, summaries[i], kind=KIND_SUMMARY,
                                           dtype=torch.float64) for i in range(n)}
    accepted, rejections = transport.server_receive(0, messages, tuple(summaries.shape[1:]),
                                                    kind=KIND_SUMMARY, dtype=torch.float64)
    if len(accepted) < 2:
        named = ", ".join(f"client {r.client} ({r.reason})" for r in rejections)
        raise fedora.RelatednessError(
            f"summary uploads rejected: {named}; relatedness needs at least two clients, "
            f"{len(accepted)} remain")
    held = torch.zeros(summaries.shape, dtype=torch.float64)
    for i, row in accepted.items():
        held[i] = row.to(torch.float64)
    return held, rejections
