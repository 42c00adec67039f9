"""The in-process simulation runtime: one machine, many clients, fast (the default runtime).

It builds the clients' data and a common initialization, runs every configured method round
by round, evaluates each client's personalized model, writes a crash-safe checkpoint every
``[training] checkpoint_every`` rounds and resumes from it to the identical result.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secure_fedora import __version__, fedora
from secure_fedora.client import (
    FlatModel,
    GradientOracle,
    PlainGradient,
    TrainConfig,
    Workspace,
    evaluate,
)
from secure_fedora.config import ExperimentConfig, config_hash
from secure_fedora.data import fingerprint_clients
from secure_fedora.methods import FedAvg, FederatedMethod, Fedora, Local, MethodContext
from secure_fedora.models import make_model
from secure_fedora.partition import (
    ClientData,
    dirichlet_partition,
    pathological_partition,
    rotation_partition,
)

__all__ = [
    "CheckpointError",
    "MethodOutcome",
    "Simulation",
    "atomic_write_bytes",
    "build_clients",
    "build_context",
    "client_generator",
    "make_method",
    "sample_participants",
    "summarize",
]

NUM_CLASSES = 10


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (corrupt, or from another config or data)."""


def build_clients(cfg: ExperimentConfig) -> list[ClientData]:
    """The federation's data, deterministic in ``cfg.seed`` and the data section."""
    d = cfg.data
    common = dict(
        dataset=d.dataset, num_clients=d.num_clients, train_per_client=d.train_per_client,
        val_per_client=d.val_per_client, test_per_client=d.test_per_client, seed=cfg.seed,
    )
    if d.partition == "rotation":
        return rotation_partition(groups=d.groups, interpolation=d.rotation_interpolation, **common)
    if d.partition == "dirichlet":
        return dirichlet_partition(alpha=d.dirichlet_alpha, **common)
    return pathological_partition(classes_per_client=d.classes_per_client, **common)


def client_generator(seed: int, client: int) -> torch.Generator:
    """Client ``client``'s private RNG stream, independent of participation and of the others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + client + 1)


def _client_generators(cfg: ExperimentConfig, n: int) -> list[torch.Generator]:
    if cfg.privacy.enabled and cfg.privacy.noise_seed == "os_random":
        from secure_fedora.private import noise_generator_seed

        return [torch.Generator().manual_seed(noise_generator_seed(cfg, i)) for i in range(n)]
    return [client_generator(cfg.seed, i) for i in range(n)]


def train_config(cfg: ExperimentConfig) -> TrainConfig:
    t = cfg.training
    return TrainConfig(t.lr, t.momentum, t.weight_decay, t.batch_size, t.local_epochs)


def build_context(
    cfg: ExperimentConfig, clients: Sequence[ClientData], oracle: GradientOracle | None = None
) -> MethodContext:
    """A fresh method context: common initialization, one RNG per client, shared buffers,
    all on ``[training] device`` (data, model, buffers; batch order from CPU generators)."""
    from secure_fedora.devices import clients_on, resolve_device

    device = resolve_device(cfg)
    clients = clients_on(clients, device)
    module = make_model(cfg.model.name, NUM_CLASSES, seed=cfg.seed).to(device)
    flat = FlatModel(module)
    generators = _client_generators(cfg, len(clients))
    if oracle is None and cfg.privacy.enabled:
        from secure_fedora.private import DPGradient, sample_rate_for

        q = sample_rate_for(cfg)
        oracle = DPGradient(module, cfg.privacy.max_grad_norm, q,
                            q * cfg.data.train_per_client, generators[0])
    return MethodContext(
        clients=clients,
        flat=flat,
        train=train_config(cfg),
        oracle=oracle or PlainGradient(cfg.training.batch_size, cfg.training.clip_grad_norm),
        workspace=Workspace.for_size(flat.num_params, device),
        generators=generators,
        init=flat.initial_vector(),
        num_classes=NUM_CLASSES,
    )


def make_method(name: str, ctx: MethodContext, cfg: ExperimentConfig) -> FederatedMethod:
    """Instantiate a configured method by name."""
    f = cfg.fedora
    if name == "fedora":
        return Fedora(ctx, q=f.q, tau=f.tau, k=f.k, alpha=f.alpha, propagation=f.propagation,
                      propagation_tolerance=f.propagation_tolerance,
                      relatedness_fn=relatedness_function(cfg, ctx),
                      relatedness_mode=f.relatedness,
                      private_validation=cfg.data.validation == "private")
    if name == "local":
        return Local(ctx)
    if name == "fedavg":
        return FedAvg(ctx, finetune_epochs=cfg.fedavg.finetune_epochs)
    from secure_fedora.baselines import make_baseline

    return make_baseline(name, ctx, cfg.baselines.get(name), validation=cfg.data.validation)


def relatedness_function(
    cfg: ExperimentConfig, ctx: MethodContext
) -> Callable[[], tuple[Tensor, dict[str, Any]]]:
    """How FEDORA gets its overlap blocks ``U_i^T U_j`` in the configured mode.

    plain: summaries in the clear. noised: each client releases the top eigenvectors of its
    noised clipped second moment through its budget gate. encrypted: CKKS; the server computes
    on ciphertexts and sees only the decrypted q x q blocks. noised+encrypted: both.

    With ``ctx.transport`` (``[security] envelopes = true``) every summary (plain or noised)
    or every message of the encrypted protocol is a signed envelope. A client whose upload is
    rejected is excluded: the details then list it under ``"excluded"`` with the
    ``"rejections"`` (FEDORA builds the graph over the other clients and the excluded one
    trains as Local would), and carry the summary transport's traffic under ``"transport"``.
    """
    mode = cfg.fedora.relatedness
    q = cfg.fedora.q

    def compute() -> tuple[Tensor, dict[str, Any]]:
        if "noised" in mode:
            summaries = ctx.privacy.noised_summaries(ctx.clients, q, ctx.num_classes, ctx.generators)
        else:
            summaries = torch.stack(
                [fedora.client_summary(c.train_x, c.train_y, ctx.num_classes, q) for c in ctx.clients]
            )
        security: dict[str, Any] = {}
        if "encrypted" in mode:
            from secure_fedora.secure_relatedness import encrypted_overlaps

            result = encrypted_overlaps(summaries, transport=ctx.transport)
            details: dict[str, Any] = {
                "client_bytes_sent": result.client_bytes_sent,
                "server_bytes_received": result.server_bytes_received,
                "released_bytes": result.released_bytes,
                "timings": result.timings,
            }
            if ctx.transport is not None:
                security = _exclusion_details(result.excluded, result.rejections, ctx.transport)
            return result.overlaps, {**details, **security}
        if ctx.transport is not None:
            summaries, rejections = _enveloped_summaries(ctx.transport, summaries)
            excluded = sorted(r.client for r in rejections)
            security = _exclusion_details(excluded, rejections, ctx.transport)
        return fedora.subspace_overlaps(summaries), security

    return compute


def _exclusion_details(excluded: Sequence[int], rejections: Sequence[Any], transport: Any) -> dict[str, Any]:
    """The relatedness details of an enveloped exchange (JSON-compatible, checkpointed)."""
    return {
        "excluded": list(excluded),
        "rejections": [r.to_dict() for r in rejections],
        "transport": transport.stats.to_dict(),
    }


def sample_participants(gen: torch.Generator, n: int, fraction: float) -> list[int]:
    """The round's participants: everyone at fraction 1, else ``ceil(fraction * n)`` clients
    drawn without replacement from ``gen`` (sorted). Shared by both runtimes."""
    if fraction >= 1.0:
        return list(range(n))
    m = max(1, math.ceil(fraction * n))
    return sorted(torch.randperm(n, generator=gen)[:m].tolist())


def _enveloped_summaries(transport: Any, summaries: Tensor) -> tuple[Tensor, list[Any]]:
    """Every client sends its summary in a signed envelope (round 0, float32 on the wire);
    the server verifies all (each rejection is logged by the transport).

    Returns the summaries the server holds (float64; the row of a rejected client is zero and
    must not be used) and the rejections. Fewer than two accepted summaries raise
    :class:`~secure_fedora.fedora.RelatednessError` naming the rejected clients.
    """
    from secure_fedora.transport import KIND_SUMMARY

    n = summaries.shape[0]
    messages = {i: transport.client_upload(0, i, summaries[i], kind=KIND_SUMMARY) for i in range(n)}
    accepted, rejections = transport.server_receive(0, messages, tuple(summaries.shape[1:]),
                                                    kind=KIND_SUMMARY)
    if len(accepted) < 2:
        named = ", ".join(f"client {r.client} ({r.reason})" for r in rejections)
        raise fedora.RelatednessError(
            f"summary uploads rejected: {named}; relatedness needs at least two clients, "
            f"{len(accepted)} remain")
    held = torch.zeros(summaries.shape, dtype=torch.float64)
    for i, row in accepted.items():
        held[i] = row.to(torch.float64)
    return held, rejections


@dataclass
class Tracker:
    """Model selection as in the reference: the round with the best mean validation accuracy
    across clients is selected, and every client's test accuracy at that round is reported."""

    best_val_mean: Tensor
    best_round: Tensor
    test_at_best: Tensor
    last_val: Tensor
    last_test: Tensor

    @classmethod
    def empty(cls, n: int) -> Tracker:
        return cls(torch.tensor(-1.0), torch.tensor(0), torch.zeros(n), torch.zeros(n), torch.zeros(n))

    def update(self, rnd: int) -> None:
        val_mean = self.last_val.mean()
        if val_mean > self.best_val_mean:
            self.best_val_mean.copy_(val_mean)
            self.best_round.fill_(rnd)
            self.test_at_best.copy_(self.last_test)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.__dict__)


def summarize(values: Sequence[float] | Tensor) -> dict[str, Any]:
    """Mean, min, max, population std and the per-client list of accuracies."""
    t = torch.as_tensor(values, dtype=torch.float64)
    return {
        "mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()),
        "std": float(t.std(unbiased=False)), "per_client": [round(float(v), 6) for v in t],
    }


@dataclass
class MethodOutcome:
    """What one method's run produced (the body of its entry in results.json)."""

    name: str
    selected: dict[str, Any]
    final: dict[str, Any]
    rounds: int
    seconds_training: float
    seconds_evaluation: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: a 0600 temporary file in the same directory
    (mkstemp), fsynced, renamed over ``path``, then the directory fsynced. A crash leaves the
    old or the new content, never a mix."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old or the new content, never a mix."""
    atomic_write_bytes(path, text.encode())


def atomic_write_with(path: Path, write: Callable[[Any], None]) -> None:
    """As :func:`atomic_write_bytes`, with ``write(fh)`` streaming the content into the
    temporary file (no in-memory copy of a multi-GB checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint (stream to a temp file, fsync, rename); no in-memory
    copy of the state. :func:`load_checkpoint` maps every tensor to the CPU."""
    atomic_write_with(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; a truncated or corrupt file raises :class:`CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {err}") from None
    if not isinstance(state, dict) or "round" not in state:
        raise CheckpointError(f"checkpoint {path} does not hold a secure-fedora round state")
    return state


ProgressFn = Callable[[str, int, int], None]

# Under checkpoint_every = "auto" a checkpoint is written once the time since the last one
# reaches this multiple of what the last one took (checkpoints then cost <= ~1/10 of the run).
AUTO_CHECKPOINT_FACTOR = 10.0


class _CheckpointSchedule:
    """Whether round ``rnd`` ends with a checkpoint: every K rounds, or by time ("auto")."""

    def __init__(self, every: int | str) -> None:
        self.every = every
        self.last_cost: float | None = None
        self.last_end = time.perf_counter()

    def __call__(self, rnd: int) -> bool:
        if self.every != "auto":
            return rnd % int(self.every) == 0
        if self.last_cost is None:
            return True
        return time.perf_counter() - self.last_end >= AUTO_CHECKPOINT_FACTOR * self.last_cost

    def written(self, seconds: float) -> None:
        self.last_cost, self.last_end = seconds, time.perf_counter()


class Simulation:
    """Runs the configured methods in process, writing everything into ``run_dir``.

    Layout of ``run_dir``: ``config.toml`` (a copy), ``checkpoints/<method>.pt``,
    ``rounds.csv``, ``results.json`` and ``plots/*.png`` (written by the CLI).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        clients: Sequence[ClientData] | None = None,
        progress: ProgressFn | None = None,
        method_factory: Callable[[str, MethodContext, ExperimentConfig], FederatedMethod] = make_method,
        context_factory: Callable[[ExperimentConfig, Sequence[ClientData]], MethodContext] = build_context,
    ) -> None:
        from secure_fedora.devices import apply_threads, resolve_device

        self.cfg = cfg
        self.device = resolve_device(cfg)  # refuses an unusable device before any work
        apply_threads(cfg)
        self.run_dir = Path(run_dir)
        self.clients = list(clients) if clients is not None else build_clients(cfg)
        self.fingerprint = fingerprint_clients(self.clients)
        self.config_hash = config_hash(cfg)
        self.progress = progress
        self.method_factory = method_factory
        self.context_factory = context_factory
        self.history: list[dict[str, Any]] = []
        self.methods: dict[str, FederatedMethod] = {}
        self.privacy: dict[str, dict[str, Any]] = {}
        self.on_privacy_plan: Callable[[list[dict[str, Any]]], None] | None = None
        # Seconds per round of this process (not persisted): training (FEDORA's includes its
        # propagation), evaluation, checkpoint; and of each method's setup (relatedness).
        self.round_timings: dict[str, list[dict[str, float]]] = {}
        self.setup_seconds: dict[str, float] = {}

    # -- checkpoints --------------------------------------------------------------------
    def checkpoint_path(self, method: str) -> Path:
        return self.run_dir / "checkpoints" / f"{method}.pt"

    def _identity(self) -> dict[str, str]:
        return {"config_hash": self.config_hash, "data_fingerprint": self.fingerprint}

    def _check_identity(self, state: dict[str, Any], path: Path) -> None:
        for key, expected in self._identity().items():
            if state.get(key) != expected:
                raise CheckpointError(
                    f"checkpoint {path} was written for another {key.replace('_', ' ')} "
                    f"({state.get(key)!s:.12} != {expected:.12}); refuse to resume"
                )

    # -- one method ---------------------------------------------------------------------
    def run_method(self, name: str, resume: bool = False) -> MethodOutcome:
        """Run (or resume) one method to the configured number of rounds."""
        cfg = self.cfg
        ctx = self.context_factory(cfg, self.clients)
        privacy = self._open_privacy(name)
        ctx.privacy = privacy
        try:
            return self._run_method(name, ctx, privacy, resume)
        finally:
            if privacy is not None:
                self.privacy[name] = privacy.summary()
                privacy.close()

    def _open_privacy(self, name: str) -> Any:
        if not self.cfg.privacy.enabled:
            return None
        from secure_fedora.private import FederationPrivacy

        privacy = FederationPrivacy.open(self.cfg, name, len(self.clients),
                                         self.run_dir / "ledgers" / name, self.run_dir / "keys")
        if self.on_privacy_plan:
            self.on_privacy_plan(privacy.plan_rows())
        return privacy

    def _run_method(self, name: str, ctx: MethodContext, privacy: Any, resume: bool) -> MethodOutcome:
        cfg = self.cfg
        if cfg.security.envelopes and name == "fedora":
            from secure_fedora.transport import SecureTransport

            ctx.transport = SecureTransport.for_simulation(self.run_dir, len(self.clients),
                                                           f"{name}-summary")
        method = self.method_factory(name, ctx, cfg)
        self.methods[name] = method
        n = len(self.clients)
        tracker = Tracker.empty(n)
        round_gen = torch.Generator().manual_seed(cfg.seed + 7919)
        start_round = 1
        history: list[dict[str, Any]] = []
        timing = {"training": 0.0, "evaluation": 0.0}
        self.round_timings[name] = []
        path = self.checkpoint_path(name)
        if resume and path.exists():
            state = load_checkpoint(path)
            self._check_identity(state, path)
            if state.get("outcome") is not None:
                method.load_state_dict(state["method"])
                self.history.extend(state["history"])
                return MethodOutcome(**state["outcome"])
            self._restore(state, method, tracker, round_gen, ctx, path)
            start_round = int(state["round"]) + 1
            history = list(state["history"])
            timing = dict(state["timing"])
        else:
            t0 = time.perf_counter()
            method.setup()
            self.setup_seconds[name] = time.perf_counter() - t0
        self._attach_security(name, method, start_round - 1)
        rounds = cfg.training.rounds
        due = _CheckpointSchedule(cfg.training.checkpoint_every)
        for rnd in range(start_round, rounds + 1):
            participants = self._participants(round_gen, n)
            if privacy is not None:
                with_lambda = name == "fedora" and cfg.data.validation == "private"
                participants = [i for i in participants
                                if privacy.admit(i, rnd, method.theta[i], with_lambda)]
            t0 = time.perf_counter()
            stats = method.train_round(rnd, participants) if participants else {"steps": 0.0}
            seconds = {"round": rnd, "training": time.perf_counter() - t0,
                       "evaluation": 0.0, "checkpoint": 0.0}
            timing["training"] += seconds["training"]
            if rnd % cfg.evaluation.every == 0 or rnd == rounds:
                t0 = time.perf_counter()
                row = self._evaluate(rnd, method, tracker)
                seconds["evaluation"] = time.perf_counter() - t0
                timing["evaluation"] += seconds["evaluation"]
                history.append({"method": name, "round": rnd, "participants": len(participants),
                                **stats, **row})
            # The last round's state is written below, with the outcome.
            if rnd < rounds and due(rnd):
                t0 = time.perf_counter()
                save_checkpoint(path, self._state(rnd, method, tracker, round_gen, ctx, history, timing))
                seconds["checkpoint"] = time.perf_counter() - t0
                due.written(seconds["checkpoint"])
            self.round_timings[name].append(seconds)
            if self.progress:
                self.progress(name, rnd, rounds)
        outcome = MethodOutcome(
            name=name,
            selected={**summarize(tracker.test_at_best), "round": int(tracker.best_round)},
            final=summarize(tracker.last_test),
            rounds=rounds,
            seconds_training=round(timing["training"], 3),
            seconds_evaluation=round(timing["evaluation"], 3),
            extra=method.extra_results(),
        )
        state = self._state(rounds, method, tracker, round_gen, ctx, history, timing)
        state["outcome"] = outcome.to_json()
        t0 = time.perf_counter()
        save_checkpoint(path, state)
        if self.round_timings[name]:
            self.round_timings[name][-1]["checkpoint"] = time.perf_counter() - t0
        self.history.extend(history)
        return outcome

    def _attach_security(self, name: str, method: FederatedMethod, last_round: int) -> None:
        """Encrypted propagation for FEDORA and, with ``[security] envelopes``, a signed
        message exchange for every method that sends messages (all but Local), tracking what
        :meth:`~secure_fedora.methods.FederatedMethod.message_state` names. ``last_round`` is
        the last round already done (0 on a fresh start)."""
        n = len(self.clients)
        if isinstance(method, Fedora) and self.cfg.fedora.propagation == "encrypted":
            from secure_fedora.encrypted_propagation import EncryptedPropagator

            method.propagator = EncryptedPropagator(n)
        if not self.cfg.security.envelopes:
            return
        state = method.message_state()
        if state is None:
            return
        from secure_fedora.transport import SecureExchange, SecureTransport

        uploads, downloads = state
        transport = SecureTransport.for_simulation(self.run_dir, n, name)
        method.exchange = SecureExchange(transport, uploads=uploads, downloads=downloads,
                                         last_round=last_round)

    def _participants(self, gen: torch.Generator, n: int) -> list[int]:
        return sample_participants(gen, n, self.cfg.training.participation)

    def _evaluate(self, rnd: int, method: FederatedMethod, tracker: Tracker) -> dict[str, float]:
        flat = method.ctx.flat
        for i, c in enumerate(method.ctx.clients):  # on the run's device
            row = method.eval_row(i)
            val = evaluate(flat, row, c.val_x, c.val_y).accuracy
            test = evaluate(flat, row, c.test_x, c.test_y).accuracy
            tracker.last_val[i] = val
            tracker.last_test[i] = test
        tracker.update(rnd)
        return {
            "test_mean": float(tracker.last_test.mean()),
            "test_min": float(tracker.last_test.min()),
            "test_max": float(tracker.last_test.max()),
            "test_std": float(tracker.last_test.std(unbiased=False)),
            "val_mean": float(tracker.last_val.mean()),
            "selected_mean": float(tracker.test_at_best.mean()),
            "selected_round": int(tracker.best_round),
        }

    def _state(self, rnd: int, method: FederatedMethod, tracker: Tracker, round_gen: torch.Generator,
               ctx: MethodContext, history: list[dict[str, Any]], timing: dict[str, float]) -> dict[str, Any]:
        return {
            "round": rnd,
            "version": __version__,
            **self._identity(),
            "method": method.state_dict(),
            "tracker": tracker.state_dict(),
            "round_generator": round_gen.get_state(),
            "client_generators": [g.get_state() for g in ctx.generators],
            "history": history,
            "timing": timing,
            "outcome": None,
        }

    def _restore(self, state: dict[str, Any], method: FederatedMethod, tracker: Tracker,
                 round_gen: torch.Generator, ctx: MethodContext, path: Path) -> None:
        try:
            method.load_state_dict(state["method"])
            for key, value in state["tracker"].items():
                getattr(tracker, key).copy_(value)
            round_gen.set_state(state["round_generator"])
            gens = state["client_generators"]
            if len(gens) != len(ctx.generators):
                raise ValueError(f"{len(gens)} client generators for {len(ctx.generators)} clients")
            for g, s in zip(ctx.generators, gens, strict=True):
                g.set_state(s)
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path} cannot be restored: {err}") from None

    # -- the whole experiment -----------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run every configured method; write rounds.csv and results.json; return the results."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        outcomes = {}
        for name in self.cfg.methods:
            outcomes[name] = self.run_method(name, resume=resume)
            self.write_rounds_csv()
        results = self.results(outcomes)
        atomic_write_text(self.run_dir / "results.json", json.dumps(results, indent=2))
        return results

    def results(self, outcomes: dict[str, MethodOutcome]) -> dict[str, Any]:
        """The results document: run identity, per-method summaries and comparisons."""
        methods = {name: o.to_json() for name, o in outcomes.items()}
        comparison: dict[str, Any] = {}
        if "fedora" in outcomes and "local" in outcomes:
            f = outcomes["fedora"].selected["per_client"]
            loc = outcomes["local"].selected["per_client"]
            comparison["fedora_below_local"] = sum(1 for a, b in zip(f, loc, strict=True) if a < b)
        if "fedavg" in outcomes and "finetuned_test_accuracy" in outcomes["fedavg"].extra:
            methods["fedavg_ft"] = {
                "name": "fedavg_ft",
                "selected": summarize(outcomes["fedavg"].extra["finetuned_test_accuracy"]),
            }
        return {
            "name": self.cfg.name,
            "version": __version__,
            "compute": {"device": str(self.device), "threads": torch.get_num_threads()},
            "config_hash": self.config_hash,
            "data_fingerprint": self.fingerprint,
            "assumptions": {
                "validation_data": self.cfg.data.validation,
                "relatedness": self.cfg.fedora.relatedness,
                "server": "honest-but-curious",
                "differential_privacy": self.cfg.privacy.enabled,
                **({"noise_source": f"torch.Generator seeded by {self.cfg.privacy.noise_seed!r} "
                                    "(statistical PRNG, not a CSPRNG; Opacus secure_mode unavailable)",
                    "neighbouring_relation": "add/remove one record; dataset sizes public",
                    "accountant": self.cfg.privacy.accountant}
                   if self.cfg.privacy.enabled else {}),
                **({"client_held_models": "Ditto's and APFL's personal models never leave the "
                                          "client and train without noise; DP covers what is sent "
                                          "(the global-model copies). Publishing a personal model "
                                          "would be an unaccounted release."}
                   if self.cfg.privacy.enabled and {"ditto", "apfl"} & set(self.cfg.methods)
                   else {}),
            },
            "privacy": self.privacy,
            "clients": [
                {"id": c.client_id, "train": int(c.train_x.shape[0]), "val": int(c.val_x.shape[0]),
                 "test": int(c.test_x.shape[0]),
                 **{k: v for k, v in c.meta.items() if k in ("rotation_degrees", "group", "classes")}}
                for c in self.clients
            ],
            "methods": methods,
            "comparison": comparison,
        }

    def write_rounds_csv(self) -> None:
        """Per-round metrics of every method run so far (rewritten atomically)."""
        if not self.history:
            return
        keys: list[str] = []
        for row in self.history:
            keys.extend(k for k in row if k not in keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run_dir / "rounds.csv", buf.getvalue())
