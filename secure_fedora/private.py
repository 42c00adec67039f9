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
from privacy.ledger import LedgerWriter, replay_accountant
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

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor, *,
                 extra_gradients: Tensor | None = None) -> None:
        """One DP-SGD step's gradient; ``extra_gradients``: see ``DPSGD.private_gradient`` (audits)."""
        self.dpsgd.private_gradient(x, y, self._loss, extra_gradients=extra_gradients)


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
    """

    cfg: ExperimentConfig
    method: str
    clients: list[ClientPrivacy]
    sample_rate: float
    steps: int
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, cfg: ExperimentConfig, method: str, num_clients: int, ledger_dir: Path,
             key_dir: Path) -> FederationPrivacy:
        ids = client_ids(num_clients)
        plans: dict[tuple[float, float], ClientPlan] = {}
        budgets = [client_budget(cfg, i) for i in range(num_clients)]
        for budget in budgets:  # calibrate everything before any file is written
            key = (budget.epsilon, budget.delta)
            if key not in plans:
                plans[key] = privacy_plan(cfg, method, budget)
        if not (key_dir / "allowlist.json").exists():
            init_keys(key_dir, ["server", *ids])
        ledger_dir.mkdir(parents=True, exist_ok=True)
        states = []
        for i, (cid, budget) in enumerate(zip(ids, budgets, strict=True)):
            signing_key = load_identity(key_dir, cid).signing_key
            ledger = LedgerWriter(ledger_dir / f"{cid}.jsonl", cid, signing_key)
            accountant = replay_accountant(ledger.entries, cfg.privacy.accountant) if ledger.entries \
                else Accountant(cfg.privacy.accountant)
            gate = BudgetGate(accountant, budget, ledger, cid)
            state = ClientPrivacy(i, cid, budget, plans[(budget.epsilon, budget.delta)], gate, ledger)
            if gate.closed:
                state.refused_at = -1
                state.refusal = "refused before restart"
            states.append(state)
        return cls(cfg, method, states, sample_rate_for(cfg), steps_per_round(cfg))

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
              records: list[MechanismRecord]) -> bool:
        c = self.clients[i]
        if c.refused_at is not None:
            return False
        try:
            c.gate.process(Release(kind, payload, rnd, records))
        except BudgetExceededError as err:
            c.refused_at, c.refusal = rnd, str(err)
            self.events.append({"round": rnd, "client": c.client_id, "event": "refused", "detail": str(err)})
            log.warning("%s", err)
            return False
        return True

    def admit(self, i: int, rnd: int, theta: Tensor, with_lambda: bool) -> bool:
        """Pass client ``i``'s round-``rnd`` model release through its gate (ledger first).

        Called before local training: the round's DP-SGD steps (and the lambda release, when
        validation is private) are accounted and written to the ledger, then training and the
        release follow. Returns False (and records why) when the client is refused.
        """
        c = self.clients[i]
        records = [MechanismRecord("dpsgd", c.noise_multiplier, self.sample_rate, self.steps,
                                   {"clip_norm": self.cfg.privacy.max_grad_norm,
                                    "sampling": "poisson", "method": self.method})]
        if with_lambda:
            assert c.plan.lambda_noise is not None
            records.append(scalar_record(self.cfg.privacy.lambda_clip, c.plan.lambda_noise,
                                         self.cfg.data.val_per_client))
        return self._gate(i, rnd, "model", theta, records)

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
            noised = noised_second_moment(z, p.summary_clip, sigma, generators[i], n=n)
            summary = top_eigenvectors(noised, q)
            record = summary_record(p.summary_clip, sigma, n, q)
            if not self._gate(i, 0, "summary", summary, [record]):
                raise BudgetExceededError(
                    client_id=self.clients[i].client_id, round=0, mechanism="gaussian_summary",
                    epsilon_would_be=float("nan"), budget=self.clients[i].budget,
                    reason="the summary release was refused; relatedness cannot be estimated",
                )
            out.append(summary)
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
        }


def noise_generator_seed(cfg: ExperimentConfig, client: int) -> int:
    """Seed of client ``client``'s generator (sampling and noise) under ``privacy.noise_seed``."""
    if cfg.privacy.enabled and cfg.privacy.noise_seed == "os_random":
        return int.from_bytes(os.urandom(8), "little")
    return cfg.seed * 1_000_003 + client + 1
