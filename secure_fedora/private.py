"""Client-side privacy for the federation: DP-SGD, budgets, noised releases, the ledger.

Every data-dependent release of a client goes through its own :class:`privacy.pipeline.BudgetGate`
(accountant + budget + write-ahead ledger) before it leaves the client:

- the model ``theta_i`` every round it participates: DP-SGD (Poisson sampling at rate q,
  per-sample clipping, Gaussian noise) for the round's ``ceil(E / q)`` steps; the gate is passed
  *before* local training starts (the step count is fixed in advance), so the ledger entry is
  on disk before the trained model can be sent;
- the relatedness summary, once (noised mode): Gaussian mechanism on the clipped second moment;
- with ``data.validation = "private"``, each round's ``lambda_i``: a clipped, noised mean of the
  per-example validation-loss differences (it shapes ``theta_i``, which is released).

A client whose release would exceed its budget is refused (ledger entry + error); it keeps its
personalized model and releases nothing more. The federation goes on with the others.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privacy.accounting import (
    Accountant,
    BudgetExceededError,
    CalibrationError,
    MechanismRecord,
    PlannedRelease,
    PrivacyBudget,
    calibrate_noise_multiplier,
    plan_epsilon,
)
from privacy.dpsgd import DPSGD, poisson_sample
from privacy.identity import client_ids, init_keys, load_identity
from privacy.journal import JournalError, JournalRecord, ReleaseJournal, payload_digest
from privacy.ledger import LedgerError, LedgerWriter, repair_torn_tail, replay_accountant
from privacy.mechanisms import (
    noised_scalar,
    noised_second_moment,
    scalar_record,
    summary_record,
    top_eigenvectors,
)
from privacy.pipeline import BudgetGate, Release
from secure_fedora import fedora
from secure_fedora.config import ConfigError, ExperimentConfig
from secure_fedora.crashpoints import crash_point
from secure_fedora.partition import ClientData

__all__ = ["ClientPrivacy", "DPGradient", "FederationPrivacy", "privacy_plan"]

log = logging.getLogger("secure_fedora.privacy")


def sample_rate_for(cfg: ExperimentConfig) -> float:
    """Poisson sampling rate: ``privacy.sample_rate``, else ``batch_size / train_per_client``."""
    p = cfg.privacy
    if p.sample_rate is not None:
        return p.sample_rate
    return min(1.0, cfg.training.batch_size / cfg.data.train_per_client)


def steps_per_round(cfg: ExperimentConfig) -> int:
    """DP-SGD steps of one local run: ``ceil(E / q)`` Poisson-sampled batches."""
    return math.ceil(cfg.training.local_epochs / sample_rate_for(cfg) - 1e-9)


@dataclass(frozen=True)
class ClientPlan:
    """A client's noise for every mechanism and the releases it plans over the whole run."""

    dpsgd_noise: float
    summary_noise: float | None
    lambda_noise: float | None
    releases: tuple[PlannedRelease, ...]


def _calibrate(target: float, delta: float, plan: list[PlannedRelease], accountant: str,
               what: str) -> float:
    try:
        return calibrate_noise_multiplier(target, delta, plan, accountant)
    except CalibrationError as err:
        raise ConfigError(f"privacy: cannot calibrate {what} for epsilon {target:g}: {err}") from None


def privacy_plan(cfg: ExperimentConfig, method: str, budget: PrivacyBudget) -> ClientPlan:
    """Every release a client of ``method`` may make over the run, with calibrated noise.

    The summary (once) and lambda (every round) use fixed noise multipliers or, when unset,
    ones calibrated so that each alone spends its configured fraction of the budget; DP-SGD's
    noise is then calibrated so that the whole plan spends at most ``budget.epsilon``.
    Raises ConfigError (naming the key) when no noise can meet the budget.
    """
    p = cfg.privacy
    rounds = cfg.training.rounds
    eps, delta = budget.epsilon, budget.delta
    fixed: list[PlannedRelease] = []
    summary_noise = lambda_noise = None
    if method == "fedora" and "noised" in cfg.fedora.relatedness:
        summary_noise = p.summary_noise_multiplier or _calibrate(
            p.summary_budget_fraction * eps, delta, [PlannedRelease("gaussian_summary", 1.0, 1)],
            p.accountant, "privacy.summary_noise_multiplier")
        fixed.append(PlannedRelease("gaussian_summary", 1.0, 1, summary_noise))
    if method == "fedora" and cfg.data.validation == "private":
        lambda_noise = p.lambda_noise_multiplier or _calibrate(
            p.lambda_budget_fraction * eps, delta, [PlannedRelease("gaussian_lambda", 1.0, rounds)],
            p.accountant, "privacy.lambda_noise_multiplier")
        fixed.append(PlannedRelease("gaussian_lambda", 1.0, rounds, lambda_noise))
    dpsgd = PlannedRelease("dpsgd", sample_rate_for(cfg), rounds * steps_per_round(cfg))
    plan = [dpsgd, *fixed]
    dpsgd_noise = p.noise_multiplier or _calibrate(eps, delta, plan, p.accountant,
                                                   "privacy.noise_multiplier (DP-SGD)")
    return ClientPlan(dpsgd_noise, summary_noise, lambda_noise, tuple(plan))


def client_budget(cfg: ExperimentConfig, index: int) -> PrivacyBudget:
    """Client ``index``'s (epsilon, delta): the default, or its ``privacy.overrides`` entry."""
    p = cfg.privacy
    o = p.overrides.get(str(index))
    if o is None:
        return PrivacyBudget(p.epsilon, p.delta)
    return PrivacyBudget(o.epsilon, o.delta if o.delta is not None else p.delta)


class DPGradient:
    """A :class:`~secure_fedora.client.GradientOracle` running DP-SGD for the selected client.

    One :class:`privacy.dpsgd.DPSGD` serves every client (the model's parameters are views of
    the selected client's row); :meth:`select` sets the client's noise multiplier. Batches are
    Poisson samples at rate ``q`` (``ceil(epochs / q)`` of them per local run), drawn from the
    client's generator, which also draws the noise.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float, sample_rate: float,
                 expected_batch_size: float, generator: torch.Generator) -> None:
        self.sample_rate = sample_rate
        self.dpsgd = DPSGD(module, max_grad_norm, 1.0, expected_batch_size, generator)
        self._loss = nn.CrossEntropyLoss(reduction="none")

    @property
    def max_grad_norm(self) -> float:
        """The per-sample clip norm C."""
        return self.dpsgd.max_grad_norm

    def select(self, noise_multiplier: float, generator: torch.Generator) -> None:
        self.dpsgd.noise_multiplier = float(noise_multiplier)
        self.dpsgd.generator = generator

    def batches(self, n: int, epochs: int, generator: torch.Generator) -> Iterator[Tensor]:
        """``ceil(epochs / q)`` Poisson samples (the count the gate accounted in advance)."""
        for _ in range(math.ceil(epochs / self.sample_rate - 1e-9)):
            yield poisson_sample(n, self.sample_rate, generator)

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        self.dpsgd.private_gradient(x, y, self._loss)


@dataclass
class ClientPrivacy:
    """One client's privacy state: budget, accountant, ledger, gate and calibrated noise."""

    index: int
    client_id: str
    budget: PrivacyBudget
    plan: ClientPlan
    gate: BudgetGate
    ledger: LedgerWriter
    refused_at: int | None = None
    refusal: str | None = None

    @property
    def noise_multiplier(self) -> float:
        """DP-SGD noise multiplier."""
        return self.plan.dpsgd_noise

    @property
    def epsilon(self) -> float:
        return self.gate.accountant.epsilon(self.budget.delta) if self.gate.accountant.history else 0.0


@dataclass
class FederationPrivacy:
    """The privacy side of one method's run: one :class:`ClientPrivacy` per client.

    Ledgers live in ``ledger_dir/<client-id>.jsonl``; identities in ``key_dir`` (created on
    first use; private keys 0600). Reopening verifies each ledger and rebuilds each accountant
    from it, so a restart never under-counts what was released.

    Exactly-once releases (``journals``, opened by :meth:`open`): every release passed by a
    gate is journaled in ``ledger_dir/<client-id>.journal`` (sealed to the client) after its
    ledger entries and before it leaves: the payload's digest and the state of the client's
    generator before the release's draws (with reproducible noise, which the checkpoint and
    seed re-create, only that state's digest). After :meth:`resume_after`, releases the
    interrupted run already accounted are matched against the ledger (not accounted again)
    and re-made from the journaled generator state, so they are the very releases that may
    have left (with reproducible noise that state is checked; otherwise it is restored, and
    the client continues with fresh randomness after its last journaled release).
    """

    cfg: ExperimentConfig
    method: str
    clients: list[ClientPrivacy]
    sample_rate: float
    steps: int
    events: list[dict[str, Any]] = field(default_factory=list)
    journals: list[ReleaseJournal] | None = None
    reproducible_noise: bool = True
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    journal_bytes: int = 0
    _replayed: set[int] = field(default_factory=set)
    _resumed: bool = False

    @classmethod
    def open(cls, cfg: ExperimentConfig, method: str, num_clients: int, ledger_dir: Path,
             key_dir: Path, *, resume: bool = False) -> FederationPrivacy:
        """Open every client's ledger, gate and release journal.

        With ``resume``, a torn final ledger line is first quarantined and a signed repair
        entry appended (:func:`privacy.ledger.repair_torn_tail`), and a torn final journal
        line quarantined; each recovery is logged and listed under ``recoveries``. Without
        ``resume``, journals holding releases of an earlier run are refused (JournalError)
        before anything is written.
        """
        ids = client_ids(num_clients)
        plans: dict[tuple[float, float], ClientPlan] = {}
        budgets = [client_budget(cfg, i) for i in range(num_clients)]
        for budget in budgets:  # calibrate everything before any file is written
            key = (budget.epsilon, budget.delta)
            if key not in plans:
                plans[key] = privacy_plan(cfg, method, budget)
        if not (key_dir / "allowlist.json").exists():
            init_keys(key_dir, ["server", *ids])
        if not resume:
            earlier = [str(ledger_dir / f"{cid}.journal") for cid in ids
                       if (ledger_dir / f"{cid}.journal").exists()
                       and (ledger_dir / f"{cid}.journal").stat().st_size > 0]
            if earlier:
                raise JournalError(
                    f"{earlier[0]} holds releases of an earlier run in this directory"
                    f" ({len(earlier)} journal(s)); resume that run or use a new directory"
                )
        ledger_dir.mkdir(parents=True, exist_ok=True)
        states = []
        journals = []
        recoveries: list[dict[str, Any]] = []
        for i, (cid, budget) in enumerate(zip(ids, budgets, strict=True)):
            identity = load_identity(key_dir, cid)
            signing_key = identity.signing_key
            ledger_path = ledger_dir / f"{cid}.jsonl"
            if resume:
                for repair in repair_torn_tail(ledger_path, cid, signing_key, delta=budget.delta,
                                               budget_epsilon=budget.epsilon,
                                               accountant=cfg.privacy.accountant):
                    log.warning("ledger %s: torn final line (%d bytes) quarantined in %s;"
                                " repair entry %d appended", ledger_path, repair.torn_bytes,
                                repair.quarantine.name, repair.entry["index"])
                    recoveries.append({"client": cid, "ledger_repair": repair.entry["index"],
                                       "quarantine": repair.quarantine.name})
            ledger = LedgerWriter(ledger_path, cid, signing_key)
            journal = _open_journal(ledger_dir / f"{cid}.journal", cid, method,
                                    identity.agreement_key, ledger)
            if journal.quarantined is not None:
                log.warning("journal %s: torn final record quarantined in %s (it was never"
                            " released)", journal.path, journal.quarantined.name)
                recoveries.append({"client": cid, "journal_quarantine": journal.quarantined.name})
            journals.append(journal)
            accountant = replay_accountant(ledger.entries, cfg.privacy.accountant) if ledger.entries \
                else Accountant(cfg.privacy.accountant)
            gate = BudgetGate(accountant, budget, ledger, cid)
            state = ClientPrivacy(i, cid, budget, plans[(budget.epsilon, budget.delta)], gate, ledger)
            if gate.closed:
                state.refused_at = -1
                state.refusal = "refused before restart"
            states.append(state)
        return cls(cfg, method, states, sample_rate_for(cfg), steps_per_round(cfg),
                   journals=journals, reproducible_noise=noise_is_reproducible(cfg),
                   recoveries=recoveries)

    def resume_after(self, last_round: int | None, saved: dict[str, Any] | None) -> None:
        """Prepare a resumed run that continues after round ``last_round`` (None: from the
        start, relatedness summaries included) with ``saved`` (:meth:`checkpoint_state` of
        that round's checkpoint; None without one): ledger entries of later rounds are
        replayed by the gates (consumed, not appended), refusals and events are those of the
        checkpoint."""
        for k, c in enumerate(self.clients):
            entries = c.ledger.entries
            start = 0 if last_round is None else next(
                (e["index"] for e in entries if e["round"] > last_round), len(entries))
            c.gate.replay_from(start)
            if saved is not None:
                c.refused_at = saved["clients"][k]["refused_at"]
                c.refusal = saved["clients"][k]["refusal"]
            elif last_round is None:
                c.refused_at = c.refusal = None
        self.events = list(saved["events"]) if saved is not None else []
        self._resumed = True

    def checkpoint_state(self) -> dict[str, Any]:
        """What a round checkpoint must keep of the privacy side (refusals and events), so a
        resume reports them as an uninterrupted run does."""
        return {"events": [dict(e) for e in self.events],
                "clients": [{"refused_at": c.refused_at, "refusal": c.refusal}
                            for c in self.clients]}

    def _prepare(self, i: int, rnd: int, kind: str, generator: torch.Generator | None) -> bytes:
        """The noise state to journal for client ``i``'s round-``rnd`` ``kind`` release, read
        before its draws. A journaled release is re-made from its journaled state: checked
        against the generator with reproducible noise (a mismatch means the resume diverged),
        restored into it otherwise."""
        if generator is None:
            return b""
        state = bytes(generator.get_state().numpy().tobytes())
        record = (self.journals[i].get(rnd, kind)
                  if self.journals is not None and self._resumed else None)
        if record is not None:
            if not self.reproducible_noise and not record.noise_state:
                raise JournalError(
                    f"client {self.clients[i].client_id!r}: the round-{rnd} {kind!r} journal"
                    " record holds no noise state (it was written with reproducible noise);"
                    " it cannot be re-made with this noise source"
                )
            if self.reproducible_noise and record.noise_state_sha256 != payload_digest(state):
                raise LedgerError(
                    f"client {self.clients[i].client_id!r}: resume diverged: the generator"
                    f" state before the round-{rnd} {kind!r} release differs from the journaled"
                    " one; refusing to release anything else"
                )
            if not self.reproducible_noise:
                generator.set_state(torch.frombuffer(bytearray(record.noise_state),
                                                     dtype=torch.uint8))
                self._replayed.add(i)
            return state if self.reproducible_noise else record.noise_state
        if i in self._replayed:  # past the journaled releases: fresh randomness
            self._replayed.discard(i)
            generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
            state = bytes(generator.get_state().numpy().tobytes())
        return state

    def close(self) -> None:
        for c in self.clients:
            c.ledger.close()

    def planned_epsilon(self, i: int) -> float:
        """Epsilon client ``i`` reaches if it makes every planned release."""
        c = self.clients[i]
        return plan_epsilon(c.plan.releases, c.budget.delta, c.noise_multiplier,
                            self.cfg.privacy.accountant)

    def plan_rows(self) -> list[dict[str, Any]]:
        """The plan per distinct budget, for printing before training and for results.json."""
        rows = {}
        for c in self.clients:
            key = (c.budget.epsilon, c.budget.delta)
            if key not in rows:
                rows[key] = {
                    "method": self.method, "epsilon_budget": c.budget.epsilon, "delta": c.budget.delta,
                    "noise_multiplier": round(c.noise_multiplier, 6), "sample_rate": self.sample_rate,
                    "steps_per_round": self.steps, "rounds": self.cfg.training.rounds,
                    "planned_epsilon": round(self.planned_epsilon(c.index), 6),
                    "releases": [f"{r.mechanism} x{r.steps} (q={r.sample_rate:g}"
                                 + (f", sigma={r.noise_multiplier:g})" if r.noise_multiplier else ")")
                                 for r in c.plan.releases],
                    "clients": 0,
                }
            rows[key]["clients"] += 1
        return list(rows.values())

    def _gate(self, i: int, rnd: int, kind: str, payload: Tensor,
              records: list[MechanismRecord], noise_state: bytes = b"") -> bool:
        c = self.clients[i]
        if c.refused_at is not None:
            return False
        try:
            out = c.gate.process(Release(kind, payload, rnd, records))
        except BudgetExceededError as err:
            c.refused_at, c.refusal = rnd, str(err)
            self.events.append({"round": rnd, "client": c.client_id, "event": "refused", "detail": str(err)})
            log.warning("%s", err)
            return False
        crash_point("gate")
        if self.journals is not None:
            self._journal(i, rnd, kind, payload, out.metadata["ledger_index"], noise_state)
        crash_point("release")
        return True

    def _journal(self, i: int, rnd: int, kind: str, payload: Tensor, ledger_index: int,
                 noise_state: bytes) -> None:
        """Journal a release durably before it leaves; a re-made release must equal the
        journaled one (same ledger entry, same payload digest)."""
        assert self.journals is not None
        journal = self.journals[i]
        digest = payload_digest(payload.detach().contiguous().cpu().numpy().tobytes())
        record = journal.get(rnd, kind)
        if record is not None and not self._resumed:
            raise JournalError(
                f"journal {str(journal.path)!r} already records the round-{rnd} {kind!r} release"
                " of an earlier run in this directory; resume that run or use a new directory"
            )
        if record is None:
            # Reproducible noise is re-drawn from the checkpoint and seed: its digest suffices
            # to check the re-run; any other source needs the state itself (sealed).
            kept = b"" if self.reproducible_noise else noise_state
            self.journal_bytes += journal.append(JournalRecord(
                rnd, kind, ledger_index, digest, payload_digest(noise_state), kept))
        elif record.ledger_index != ledger_index or record.payload_sha256 != digest:
            raise LedgerError(
                f"client {self.clients[i].client_id!r}: resume diverged: the round-{rnd}"
                f" {kind!r} release differs from the journaled one (ledger entry"
                f" {ledger_index} vs {record.ledger_index}, payload digest"
                f" {'equal' if record.payload_sha256 == digest else 'different'})"
            )

    def admit(self, i: int, rnd: int, theta: Tensor, with_lambda: bool,
              generator: torch.Generator | None = None) -> bool:
        """Pass client ``i``'s round-``rnd`` model release through its gate (ledger first).

        Called before local training: the round's DP-SGD steps (and the lambda release, when
        validation is private) are accounted and written to the ledger, then training and the
        release follow. Returns False (and records why) when the client is refused.
        ``generator`` is the client's generator (its state is journaled with the release).
        """
        c = self.clients[i]
        records = [MechanismRecord("dpsgd", c.noise_multiplier, self.sample_rate, self.steps,
                                   {"clip_norm": self.cfg.privacy.max_grad_norm,
                                    "sampling": "poisson", "method": self.method})]
        if with_lambda:
            assert c.plan.lambda_noise is not None
            records.append(scalar_record(self.cfg.privacy.lambda_clip, c.plan.lambda_noise,
                                         self.cfg.data.val_per_client))
        if c.refused_at is not None:
            return False
        noise_state = self._prepare(i, rnd, "model", generator)
        return self._gate(i, rnd, "model", theta, records, noise_state)

    def noised_summaries(self, data: Sequence[ClientData], q: int, num_classes: int,
                         generators: Sequence[torch.Generator]) -> Tensor:
        """Each client's summary from its noised clipped second moment (round 0 release).

        Raises BudgetExceededError if any client's budget cannot pay for its summary: without
        a summary the relatedness graph cannot be built, and no silent fallback exists.
        """
        p = self.cfg.privacy
        out = []
        for i, c in enumerate(data):
            sigma = self.clients[i].plan.summary_noise
            assert sigma is not None
            z = fedora.summary_rows(c.train_x, c.train_y, num_classes)
            n = int(z.shape[0])
            noise_state = self._prepare(i, 0, "summary", generators[i])
            noised = noised_second_moment(z, p.summary_clip, sigma, generators[i], n=n)
            summary = top_eigenvectors(noised, q)
            record = summary_record(p.summary_clip, sigma, n, q)
            if not self._gate(i, 0, "summary", summary, [record], noise_state):
                raise BudgetExceededError(
                    client_id=self.clients[i].client_id, round=0, mechanism="gaussian_summary",
                    epsilon_would_be=float("nan"), budget=self.clients[i].budget,
                    reason="the summary release was refused; relatedness cannot be estimated",
                )
            out.append(summary)
            crash_point("summary")
        return torch.stack(out)

    def private_lambda(self, i: int, theta: Tensor, phi: Tensor, val_x: Tensor, val_y: Tensor,
                       generator: torch.Generator, bind: Any) -> float:
        """``lambda_i`` from a clipped, noised mean of per-example loss differences."""
        p = self.cfg.privacy
        with torch.no_grad():
            loss_local = F.cross_entropy(bind(theta)(val_x), val_y, reduction="none")
            loss_received = F.cross_entropy(bind(phi)(val_x), val_y, reduction="none")
        sigma = self.clients[i].plan.lambda_noise
        assert sigma is not None
        diff = float(noised_scalar((loss_local - loss_received).double(), p.lambda_clip,
                                   sigma, generator, m=int(val_x.shape[0])))
        return math.exp(diff / 2.0) if diff > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Per-client spending for results.json."""
        return {
            "method": self.method,
            "plan": self.plan_rows(),
            "sample_rate": self.sample_rate,
            "steps_per_round": self.steps,
            "clients": [
                {"client": c.client_id, "epsilon_budget": c.budget.epsilon, "delta": c.budget.delta,
                 "epsilon_spent": round(c.epsilon, 6), "noise_multiplier": c.noise_multiplier,
                 "refused_at_round": c.refused_at, "ledger_entries": len(c.ledger.entries),
                 "ledger_head": c.ledger.head[1]}
                for c in self.clients
            ],
            "events": self.events,
            **({"recoveries": self.recoveries} if self.recoveries else {}),
        }


def noise_is_reproducible(cfg: ExperimentConfig) -> bool:
    """True when a re-run draws the clients' noise again identically: ``[privacy] noise =
    "reproducible"`` (before that key existed: ``noise_seed = "experiment"``)."""
    mode = getattr(cfg.privacy, "noise", None)
    if mode is not None:
        return mode == "reproducible"
    return cfg.privacy.noise_seed == "experiment"


def _open_journal(path: Path, client_id: str, method: str, agreement_key: Any,
                  ledger: LedgerWriter) -> ReleaseJournal:
    """A client's journal, checked against its ledger: each record must name an existing
    ledger entry of the same round and release kind (the journal is written after it)."""
    journal = ReleaseJournal(path, client_id, method, agreement_key)
    entries = ledger.entries
    for record in journal:
        entry = entries[record.ledger_index] if record.ledger_index < len(entries) else None
        if (entry is None or entry["round"] != record.round
                or entry["params"].get("release_kind") != record.kind):
            raise JournalError(
                f"journal {str(path)!r}: the round-{record.round} {record.kind!r} record names"
                f" ledger entry {record.ledger_index}, which does not record that release"
            )
    return journal


def noise_generator_seed(cfg: ExperimentConfig, client: int) -> int:
    """Seed of client ``client``'s generator (sampling and noise) under ``privacy.noise_seed``."""
    if cfg.privacy.enabled and cfg.privacy.noise_seed == "os_random":
        return int.from_bytes(os.urandom(8), "little")
    return cfg.seed * 1_000_003 + client + 1
