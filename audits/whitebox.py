"""White-box DP-SGD audit in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

What is attacked: one client's DP-SGD training as the run's plan sets it (noise multiplier,
Poisson sample rate, ``ceil(E / q)`` steps per round, every round), through the project's own
code path: :func:`secure_fedora.runtimes.inprocess.build_context` builds the model, the client's
generator and the :class:`secure_fedora.secure.private.DPGradient` oracle; training is
:func:`secure_fedora.learning.client.local_train` round after round (the Local method); clipping, noise
and Poisson sampling are :class:`privacy.dpsgd.DPSGD`'s.

Canaries (Dirac gradient canaries): ``m`` distinct parameter coordinates ``j_1..j_m``; canary
``i`` is a record whose per-sample gradient is ``C e_{j_i}`` (norm C, the clip norm). Each is
included in the client's dataset independently with probability 1/2. The included ones are
records of the Poisson-sampled dataset (``DPGradient.batches`` samples ``n + included``
indices; the ones past ``n`` are canaries) and their gradients enter the clipped sum through
``DPSGD.private_gradient(extra_gradients=...)``; the noise and the divisor are the run's.
The coordinates are the ``m`` quietest for the client's data: ranked by the summed absolute
gradient of its training data at the initial model (for the MLP on MNIST the first-layer
weights of the always-black pixels have exactly zero data gradient), ties broken at random.

Score of canary ``i``: the accumulated update on its coordinate, ``theta_0[j_i] - theta_T[j_i]``
(a member's gradient pushes it down). Guesses: "in" above one threshold, "out" below another,
abstain between, both chosen on a random calibration part of the canaries; the bound is the
one-run theorem on the evaluation part (:mod:`audits.onerun`), at the run's delta.

The claim is the epsilon of the attacked mechanism alone: the plan's DP-SGD releases
(``rounds * steps`` Poisson-subsampled Gaussian steps) under the run's accountant. For the
Local method that is the client's budget; for FEDORA (summary and lambda releases share the
budget) it is smaller, which makes the test stricter.

Non-private runs: training is the runtime's :class:`secure_fedora.learning.client.PlainGradient`
(mini-batches, mean loss); each member canary joins every step independently with
probability ``batch_size / n`` (how often a record is in a batch) with gradient ``C e_j``
weighted like one record of the batch (``1 / batch length``), added after the batch
gradient's stability clip. There is no claim; the bound shows what the attack extracts.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from audits.arguments import check_config, check_seed
from audits.onerun import OneRunAuditError, OneRunOutcome, split_indices, split_one_run_audit
from audits.options import API_AUDIT_OPTIONS
from audits.verdict import (
    audit_document,
    audit_verdict,
    config_claim_problem,
    config_rebuild_problem,
    run_config_problem,
    write_audit_json,
)
from audits.verify import (
    DEFAULT_REL_TOL,
    AuditError,
    check_anchor,
    dpsgd_claim_problem,
    import_trusted_modules,
    load_given_allowlist,
    load_given_anchor,
    positive_number,
    refuse_private_keys,
    verified_ledger_entries,
)
from privacy.accounting import PlannedRelease, format_exact, plan_epsilon
from privacy.errors import ToolkitError
from privacy.identity import client_ids
from privacy.paths import check_path, path_problem
from secure_fedora.core.config import (
    ConfigError,
    ExperimentConfig,
    load_run_config,
    unregistered_hint,
)
from secure_fedora.learning.client import ClientUpdateError, FlatModel, local_train
from secure_fedora.learning.devices import threads_applied
from secure_fedora.runtimes.inprocess import build_clients, build_context
from secure_fedora.secure.private import (
    DPGradient,
    choose_accountant,
    client_budget,
    privacy_plan,
    sample_rate_for,
    steps_per_round,
)

__all__ = [
    "DEFAULT_CANARIES",
    "DiracCanaryOracle",
    "WhiteboxAuditError",
    "WhiteboxAuditResult",
    "WhiteboxSetting",
    "audit_run_dir",
    "quiet_coordinates",
    "run_whitebox_audit",
    "whitebox_setting",
]

#: Enough that every evaluation canary guessed right certifies more than epsilon 8 at
#: delta 1e-5 and confidence 0.95 (16,000 evaluation canaries: 8.11).
DEFAULT_CANARIES = 20_000
DEFAULT_CALIBRATION_FRACTION = 0.2
_ACTIVITY_CHUNK = 100


class WhiteboxAuditError(ToolkitError, ValueError):
    """Bad input to the white-box audit, or a run it cannot audit; the message says why."""


@dataclass(frozen=True)
class WhiteboxSetting:
    """The audited client's DP-SGD setting as the run's plan fixes it."""

    method: str
    client_index: int
    client_id: str
    private: bool
    noise_multiplier: float | None
    sample_rate: float
    steps_per_round: int
    rounds: int
    clip_norm: float
    delta: float
    accountant: str
    budget_epsilon: float | None
    claim_epsilon: float | None
    plan_source: str
    #: ``noise_multiplier`` is the run's own exact figure (results.json's plan row), which
    #: the client's ledger must then record exactly
    noise_stated: bool = False

    @property
    def steps(self) -> int:
        """Planned DP-SGD steps of the run: steps per round times rounds."""
        return self.steps_per_round * self.rounds


def _recorded_noise(results: dict[str, Any] | None, method: str, epsilon: float,
                    delta: float) -> tuple[float, bool] | None:
    """The DP-SGD noise multiplier results.json's plan records for ``method`` at the budget
    ``(epsilon, delta)`` and whether the row states it exactly (``"figures": "exact"``; a run
    written before that key rounded it to 6 decimals); None only without ``results``.

    Raises WhiteboxAuditError for a malformed plan (not a list, a non-numeric noise
    multiplier) and when no plan row has this budget: results.json then records a plan for
    other budgets, so the config (its epsilon or delta) is not the run's.
    """
    if results is None:
        return None
    where = f"results.json privacy.{method}.plan"
    rows: Any = results
    for key in ("privacy", method, "plan"):  # results.json's privacy.<method>.plan, if well formed
        if not isinstance(rows, dict):
            raise WhiteboxAuditError(f"results.json is malformed: privacy.{method}.plan is not "
                                     "where the schema puts it (restore the run's results.json)")
        rows = rows.get(key) or ({} if key != "plan" else [])
    if not isinstance(rows, list):
        raise WhiteboxAuditError(f"results.json is malformed: privacy.{method}.plan is not a list")
    for i, row in enumerate(rows):
        if isinstance(row, dict) and row.get("epsilon_budget") == epsilon \
                and row.get("delta") == delta and "noise_multiplier" in row:
            return (positive_number(row["noise_multiplier"], f"{where}[{i}].noise_multiplier",
                                    WhiteboxAuditError), row.get("figures") == "exact")
    budgets = sorted({(r.get("epsilon_budget"), r.get("delta")) for r in rows
                      if isinstance(r, dict)}, key=repr)
    shown = ", ".join(f"epsilon {e!r} delta {d!r}" for e, d in budgets) or "no rows"
    raise WhiteboxAuditError(
        f"{where} has no row for epsilon {format_exact(epsilon)}, delta {format_exact(delta)}"
        " (config.toml's budget of"
        f" the client); it records {shown}: the config is not this run's")


def _plan_noise_mismatch(method: str, epsilon: float, recorded: float, calibrated: float,
                         ledger: float | None, exact: bool) -> str:
    """Why results.json's plan sigma ``recorded`` is not config.toml's calibration
    ``calibrated``, naming the figure the client's ledger records (``ledger``; None: not read)
    and which of the two files it sides with."""
    def same(a: float, b: float) -> bool:
        return a == b if exact else math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)

    stated = (f"results.json's plan states DP-SGD noise multiplier {recorded!r} for {method} at"
              f" epsilon {format_exact(epsilon)}, config.toml's calibration gives {calibrated!r}")
    if ledger is None:
        return (f"{stated}: the config is not this run's, or results.json's plan was changed"
                " (restore the run's config.toml or results.json)")
    if same(ledger, calibrated):
        return (f"{stated} and the client's ledger records {ledger!r}: results.json's plan was"
                " changed (restore the run's results.json)")
    if same(ledger, recorded):
        return f"{stated}, the client's ledger {ledger!r}: the config is not this run's"
    return (f"{stated} and the client's ledger records {ledger!r}: neither the config nor"
            " results.json is this run's")


def whitebox_setting(cfg: ExperimentConfig, method: str, client_index: int,
                     results: dict[str, Any] | None = None,
                     options: Mapping[str, str] = API_AUDIT_OPTIONS,
                     ledger_noise: float | None = None) -> WhiteboxSetting:
    """The plan's DP-SGD parameters and claim for ``client_index`` under ``method``.

    With ``results`` (a run's ``results.json``), the recorded plan must hold a row for the
    client's configured budget and its noise multiplier must match the one the config gives;
    otherwise :class:`WhiteboxAuditError` (the config is not the run's). A row stating its
    figures exactly (``"figures": "exact"``) must match to within float noise of the
    calibration (relative 1e-9), and its noise multiplier is then the setting's (the run's own
    figure, which :func:`check_setting_against_ledger` requires the ledger to hold exactly); a
    row of a run written before that key states it rounded to 6 decimals. Without ``results``
    nothing is cross-checked, and ``plan_source`` says so. ``ledger_noise``, the DP-SGD noise
    multiplier the client's ledger records, only sharpens the error for a mismatch: it names
    whether results.json's plan or the config differs from the ledger.
    """
    if method not in cfg.methods:
        raise WhiteboxAuditError(f"method {method!r} is not in the config's methods {cfg.methods}:"
                                 f" name one with {options['method']}")
    if isinstance(client_index, bool) or not isinstance(client_index, int) \
            or not 0 <= client_index < cfg.data.num_clients:
        raise WhiteboxAuditError(
            f"client index must be in [0, {cfg.data.num_clients}) ({options['client_index']}),"
            f" got {client_index!r}")
    cid = client_ids(cfg.data.num_clients)[client_index]
    q = sample_rate_for(cfg)
    spr = steps_per_round(cfg)
    p = cfg.privacy
    if not p.enabled:
        return WhiteboxSetting(method, client_index, cid, False, None,
                               min(1.0, cfg.training.batch_size / cfg.data.train_per_client),
                               math.ceil(cfg.data.train_per_client / cfg.training.batch_size)
                               * cfg.training.local_epochs,
                               cfg.training.rounds, p.max_grad_norm, p.delta, p.accountant,
                               None, None, "none (privacy disabled)")
    budget = client_budget(cfg, client_index)
    try:
        # the accountant the run chose (under "auto": over every client's budget, as it does)
        accountant = choose_accountant(
            cfg, method, [client_budget(cfg, i) for i in range(cfg.data.num_clients)]).name
        plan = privacy_plan(cfg, method, budget, accountant)
    except ConfigError as err:
        raise WhiteboxAuditError(f"the run's privacy plan cannot be built: {err}") from None
    sigma = plan.dpsgd_noise
    source = "plan recomputed from config.toml"
    if results is None:
        source += " (not cross-checked: no results.json)"
    stated = _recorded_noise(results, method, budget.epsilon, budget.delta)
    exact = False
    if stated is not None:
        recorded, exact = stated
        if not (math.isclose(recorded, sigma, rel_tol=1e-9, abs_tol=0.0) if exact
                else math.isclose(recorded, sigma, rel_tol=1e-5, abs_tol=1e-6)):
            raise WhiteboxAuditError(_plan_noise_mismatch(method, budget.epsilon, recorded,
                                                          sigma, ledger_noise, exact))
        if exact:
            sigma = recorded
            source += " (matches results.json, whose noise multiplier it uses)"
        else:
            source += " (matches results.json, which states the noise to 6 decimals)"
    claim = plan_epsilon([PlannedRelease("dpsgd", q, spr * cfg.training.rounds)], budget.delta,
                         sigma, accountant)
    return WhiteboxSetting(method, client_index, cid, True, float(sigma), q, spr,
                           cfg.training.rounds, p.max_grad_norm, budget.delta, accountant,
                           budget.epsilon, float(claim), source, exact)


def _audited_ledger(run_dir: Path | None, cfg: ExperimentConfig, method: str,
                    client_index: int, allowlist: Path | None,
                    options: Mapping[str, str], allow_keys: dict[str, Any] | None = None,
                    ) -> list[dict[str, Any]] | WhiteboxAuditError | None:
    """The audited client's ledger in ``run_dir``, read and verified once for the audit
    (under ``allowlist`` when given, which the caller has held the run to already:
    :func:`audits.verify.refuse_private_keys` with ``given``): its entries, or the error that
    refuses it, kept for :func:`_check_setting_against_entries` to raise after the setting's
    own checks. None when nothing is checked against a ledger (no run directory or no
    ``ledgers/`` folder, privacy off, a method or client index the setting refuses).
    ``allow_keys``: the keys the caller loaded from ``allowlist`` (not loaded again)."""
    if run_dir is None or not cfg.privacy.enabled or method not in cfg.methods \
            or isinstance(client_index, bool) or not isinstance(client_index, int) \
            or not 0 <= client_index < cfg.data.num_clients \
            or not (run_dir / "ledgers").is_dir():
        return None
    cid = client_ids(cfg.data.num_clients)[client_index]
    try:
        return verified_ledger_entries(run_dir, method, cid, error=WhiteboxAuditError,
                                       allowlist=allowlist, options=options, run_checked=True,
                                       given_keys=allow_keys)
    except WhiteboxAuditError as err:
        return err


def _ledger_noise(ledger: list[dict[str, Any]] | WhiteboxAuditError | None) -> float | None:
    """The DP-SGD noise multiplier of the first DP-SGD entry of the verified ``ledger``
    (:func:`_audited_ledger`); None when there is none to read (no ledger, or one that does
    not verify: refused by :func:`_check_setting_against_entries`)."""
    if not isinstance(ledger, list):
        return None
    for e in ledger:
        if e["mechanism"] == "dpsgd" and isinstance(e["params"], dict):
            noise = e["params"].get("noise_multiplier")
            return float(noise) if isinstance(noise, int | float) \
                and not isinstance(noise, bool) else None
    return None


def check_setting_against_ledger(setting: WhiteboxSetting, run_dir: Path,
                                 rel_tol: float = DEFAULT_REL_TOL, *,
                                 allowlist: Path | None = None,
                                 options: Mapping[str, str] = API_AUDIT_OPTIONS) -> list[str]:
    """Refuse (:class:`WhiteboxAuditError`) a DP setting that is not what the audited client's
    ledger ``run_dir/ledgers/<method>/<client>.jsonl`` records, once that ledger verifies
    (fields, chain, signatures): a DP-SGD noise multiplier (one results.json states exactly,
    ``noise_stated``: any other float), sample rate or delta other than its DP-SGD entries',
    or a claim that :func:`audits.verify.dpsgd_claim_problem` refuses (below the epsilon of
    those entries under the ledger's accountant, or above it though they hold every planned
    step; a client not drawn every round, or refused a release, holds fewer). A run without a
    ledger folder, or a non-private setting, is not checked.

    The ledger's signatures are checked under ``allowlist`` (an independently registered
    allowlist.json) when given, else under the run's ``keys/allowlist.json``. Before the
    ledger is trusted the run is scanned as :func:`run_whitebox_audit` scans it
    (:func:`audits.verify.refuse_private_keys`): private key material inside ``run_dir``
    (whoever holds a signing key could re-sign the ledger), or with ``allowlist`` a published
    ``keys/allowlist.json`` that disagrees with it, is an error. Returns the texts of that
    scan's unchecked warnings (files that could not be read to look for keys, with
    ``allowlist`` a missing published allowlist), for the caller to show. Errors name the
    arguments (``options``)."""
    if not setting.private or not (run_dir / "ledgers").is_dir():
        return []
    unchecked: list[str] = []
    if allowlist is None:  # with one, verified_ledger_entries makes the same scan
        unchecked = refuse_private_keys(run_dir, True, WhiteboxAuditError,
                                        f"run directory {run_dir} is not trusted")
    entries = verified_ledger_entries(run_dir, setting.method, setting.client_id,
                                      error=WhiteboxAuditError, allowlist=allowlist,
                                      options=options, warnings=unchecked)
    _check_setting_against_entries(setting, entries, rel_tol)
    return unchecked


def _check_setting_against_entries(setting: WhiteboxSetting,
                                   ledger: list[dict[str, Any]] | WhiteboxAuditError | None,
                                   rel_tol: float = DEFAULT_REL_TOL) -> None:
    """:func:`check_setting_against_ledger`'s checks of the setting against the audited
    client's ledger as :func:`_audited_ledger` read it (the run already scanned): raises the
    error that refused the ledger, or the first mismatch. No ledger (None), or a non-private
    setting, is not checked."""
    if not setting.private or ledger is None:
        return
    if isinstance(ledger, WhiteboxAuditError):
        raise ledger
    entries = ledger
    assert setting.noise_multiplier is not None and setting.claim_epsilon is not None
    where = f"ledgers/{setting.method}/{setting.client_id}.jsonl"
    dpsgd = [e for e in entries if e["mechanism"] == "dpsgd" and isinstance(e["params"], dict)]
    for e in dpsgd:
        for name, planned in (("noise_multiplier", setting.noise_multiplier),
                              ("sample_rate", setting.sample_rate), ("delta", setting.delta)):
            recorded = e["params"].get(name) if name != "delta" else e["delta"]
            if name == "noise_multiplier" and setting.noise_stated:
                if isinstance(recorded, bool) or recorded != planned:
                    raise WhiteboxAuditError(
                        f"{where} entry {e['index']} records DP-SGD noise_multiplier"
                        f" {recorded!r}, the plan from config.toml gives {planned!r} as"
                        " results.json states it: the config is not this run's")
                continue
            if not isinstance(recorded, int | float) \
                    or not math.isclose(recorded, planned, rel_tol=1e-5, abs_tol=1e-9):
                raise WhiteboxAuditError(
                    f"{where} entry {e['index']} records DP-SGD {name} {recorded!r}, the plan"
                    f" from config.toml gives {format_exact(planned)}: the config is not this"
                    " run's")
    accountant = dpsgd[0]["accountant"] if dpsgd else None
    problem = dpsgd_claim_problem(setting.claim_epsilon, entries, setting.delta, accountant,
                                  setting.steps, rel_tol)
    if problem is not None:
        raise WhiteboxAuditError(f"{where}: {problem} (the claim is the plan's DP-SGD releases):"
                                 " the config is not this run's")


def quiet_coordinates(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor, count: int,
                      generator: torch.Generator) -> tuple[Tensor, int]:
    """The ``count`` coordinates with the least data-gradient activity at ``theta``.

    Activity: the sum over chunks of the client's training data of the absolute gradient of
    the run's summed loss (``flat.task``: cross-entropy, BCE or a plug-in loss). Ties (e.g. the many exact zeros) are broken by a random permutation from
    ``generator``. Returns the coordinates (int64, distinct) and how many of them have zero
    activity.
    """
    if count > flat.num_params:
        raise WhiteboxAuditError(f"{count} canaries need {count} distinct coordinates; the model"
                                 f" has {flat.num_params} parameters")
    row = theta.clone()
    grad = torch.zeros_like(row)
    model = flat.bind(row, grad)
    was_training = model.training
    model.train()
    activity = torch.zeros_like(row, dtype=torch.float64)
    for chunk in torch.arange(x.shape[0]).split(_ACTIVITY_CHUNK):
        grad.zero_()
        with warnings.catch_warnings():
            # Opacus's hooks (a non-Linear model) fire on module outputs when the inputs need
            # no gradient (token ids), as in training, which silences the same warning
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            flat.task.sum_loss(model(x[chunk]), y[chunk]).backward()  # the run's own loss
        activity += grad.abs().to(torch.float64)
    model.train(was_training)
    perm = torch.randperm(flat.num_params, generator=generator)
    order = perm[torch.argsort(activity[perm], stable=True)]
    chosen = order[:count].clone()
    return chosen, int((activity[chosen] == 0).sum())


class DiracCanaryOracle:
    """A :class:`~secure_fedora.learning.client.GradientOracle` that adds Dirac gradient canaries.

    ``inner`` is the runtime's oracle. With a :class:`DPGradient` the member canaries are
    records ``n .. n + k - 1`` of the Poisson-sampled dataset (sampled by ``inner.batches``
    with the client's generator) and enter DP-SGD's clipped sum; otherwise (plain training)
    each joins a step with probability ``plain_rate`` drawn from ``canary_generator``.
    ``coordinates`` are the member canaries' coordinates (one per canary).
    """

    def __init__(self, inner: Any, coordinates: Tensor, clip_norm: float, num_params: int, *,
                 plain_rate: float, canary_generator: torch.Generator) -> None:
        self.inner = inner
        self.private = isinstance(inner, DPGradient)
        self.coordinates = coordinates.to(torch.int64)
        self.clip_norm = float(clip_norm)
        self.num_params = int(num_params)
        self.plain_rate = float(plain_rate)
        self.canary_generator = canary_generator
        self.inclusions = torch.zeros(self.coordinates.numel(), dtype=torch.int64)
        self._pending = torch.zeros(0, dtype=torch.int64)

    def select(self, noise_multiplier: float, generator: Any) -> None:
        """Forward to the DP oracle (the client's noise multiplier and generator)."""
        self.inner.select(noise_multiplier, generator)

    def batches(self, n: int, epochs: int, generator: Any) -> Iterator[Tensor]:
        """The real records' index sets; the canaries of each step are kept for :meth:`gradient`."""
        k = self.coordinates.numel()
        if self.private:
            for index in self.inner.batches(n + k, epochs, generator, divisor_records=n):
                self._pending = index[index >= n] - n
                yield index[index < n]
        else:
            for index in self.inner.batches(n, epochs, generator):
                self._pending = (torch.rand(k, generator=self.canary_generator)
                                 < self.plain_rate).nonzero().squeeze(1)
                yield index

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        """The step's gradient with the pending canaries' ``C e_j`` added the runtime's way."""
        pending = self._pending
        if self.private:
            k = int(pending.numel())
            indices = torch.stack([torch.arange(k), self.coordinates[pending]])
            extra = torch.sparse_coo_tensor(indices, torch.full((k,), self.clip_norm),
                                            (k, self.num_params), check_invariants=True)
            self.inner.gradient(model, x, y, grad, extra_gradients=extra)
        else:
            self.inner.gradient(model, x, y, grad)
            weight = self.clip_norm / max(1, int(x.shape[0]))
            grad.index_add_(0, self.coordinates[pending],
                            torch.full((int(pending.numel()),), weight, dtype=grad.dtype))
        # counted once the step's gradient is made: a refused step includes no canary
        self.inclusions[pending] += 1


@dataclass(frozen=True)
class WhiteboxAuditResult:
    """Outcome of :func:`run_whitebox_audit`."""

    setting: WhiteboxSetting
    num_canaries: int
    members: int
    zero_activity_coordinates: int
    calibration_fraction: float
    confidence: float
    seed: int
    outcome: OneRunOutcome
    member_mean_score: float
    non_member_mean_score: float
    mean_inclusions: float
    seconds: float
    config_name: str
    assumptions: list[str] = field(default_factory=list)
    #: The modules imported first (``imports=``, CLI ``--import``), each as
    #: :meth:`audits.verify.ImportedModule.to_json` gives it (name, file, SHA-256, what it
    #: registered): code from outside the toolkit that ran during the audit.
    imported: list[dict[str, Any]] = field(default_factory=list)
    #: What the checks of the run could not check (files that could not be read to look for
    #: private keys, a run without privacy keeping its envelope keys), each as ``audit
    #: verify`` words its warning; replay.json's ``unchecked`` alike.
    unchecked: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``refuted`` / ``consistent`` / ``inconclusive`` (see :mod:`audits.verdict`)."""
        return audit_verdict(self.setting.claim_epsilon, self.outcome.certifiable_max,
                             self.outcome.lower_bound)

    def to_json(self) -> dict[str, Any]:
        """The common audit document (``audit = "whitebox"``) plus the white-box figures."""
        s = self.setting
        o = self.outcome
        setup = {
            "config": self.config_name, "method": s.method, "client": s.client_id,
            "client_index": s.client_index, "private": s.private,
            "noise_multiplier": s.noise_multiplier, "sample_rate": s.sample_rate,
            "steps_per_round": s.steps_per_round, "rounds": s.rounds, "steps": s.steps,
            "clip_norm": s.clip_norm, "delta": s.delta, "accountant": s.accountant,
            "budget_epsilon": s.budget_epsilon, "plan_source": s.plan_source,
            "canaries": self.num_canaries, "canary_kind": "dirac gradient (C e_j)",
            "coordinates": "quietest by data-gradient activity at the initial model",
            "zero_activity_coordinates": self.zero_activity_coordinates,
            "calibration_fraction": self.calibration_fraction, "seed": self.seed,
        }
        return audit_document(
            "whitebox", claim_epsilon=s.claim_epsilon, certifiable_max=o.certifiable_max,
            lower_bound=o.lower_bound, confidence=self.confidence, setup=setup,
            delta=s.delta, members=self.members, calibration_size=o.calibration_size,
            evaluation_size=o.evaluation_size, guesses=o.guesses, correct_guesses=o.correct,
            threshold_in=_json_float(o.rule.threshold_in),
            threshold_out=_json_float(o.rule.threshold_out),
            calibration_pure_bound=o.calibration_pure_bound,
            member_mean_score=self.member_mean_score,
            non_member_mean_score=self.non_member_mean_score,
            mean_inclusions_per_member=self.mean_inclusions, seconds=round(self.seconds, 2),
            assumptions=list(self.assumptions), imported=list(self.imported),
            unchecked=list(self.unchecked),
        )


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _require_both_kinds_evaluated(member: Any, calibration_fraction: float, split_seed: int,
                                   options: Mapping[str, str] = API_AUDIT_OPTIONS) -> None:
    """Refuse (before training) a draw whose evaluation part lacks member or non-member
    canaries: the audit measures how well the two are told apart, so such a part measures
    nothing about the mechanism, and its bound and mean scores would be reported unmeasured."""
    try:
        _, ev = split_indices(member.size, calibration_fraction, split_seed)
    except OneRunAuditError as err:
        raise WhiteboxAuditError(str(err)) from None
    members = int(member[ev].sum())
    for count, kind in ((members, "member"), (ev.size - members, "non-member")):
        if count == 0:
            raise WhiteboxAuditError(
                f"not measurable: the evaluation part ({ev.size} of {member.size} canaries)"
                f" holds no {kind} canary, so nothing was measured; use more canaries"
                f" ({options['num_canaries']}) or another seed ({options['seed']})")


@dataclass(frozen=True)
class _GivenFiles:
    """The auditor's own files (``allowlist=``, ``anchor=``) once loaded and checked as bad
    input: :func:`audit_run_dir` loads them before it reads the run and hands them on, so
    the audit does not load them again."""

    allowlist: tuple[Path, dict[str, Any]] | None
    anchor: tuple[Path, dict[str, Any]] | None


def _load_given_files(allowlist: str | Path | None, anchor: str | Path | None,
                      options: Mapping[str, str]) -> _GivenFiles:
    """``allowlist`` (:func:`audits.verify.load_given_allowlist`) and ``anchor``
    (:func:`audits.verify.load_given_anchor`) when given: one that is unusable raises
    :class:`WhiteboxAuditError` with one line naming its argument (``options``)."""
    return _GivenFiles(
        None if allowlist is None else load_given_allowlist(allowlist, WhiteboxAuditError,
                                                            options),
        None if anchor is None else load_given_anchor(anchor, WhiteboxAuditError, options))


def run_whitebox_audit(cfg: ExperimentConfig, *, method: str | None = None, client_index: int = 0,
                       num_canaries: int | None = None,
                       calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
                       confidence: float = 0.95, seed: int = 0,
                       results: dict[str, Any] | None = None,
                       run_dir: str | Path | None = None,
                       allowlist: str | Path | None = None,
                       anchor: str | Path | None = None,
                       options: Mapping[str, str] = API_AUDIT_OPTIONS,
                       _given_files: _GivenFiles | None = None) -> WhiteboxAuditResult:
    """Train one client with Dirac canaries on the run's DP-SGD path; bound epsilon in one run.

    ``method`` defaults to ``"local"`` when the config has it, else its first method;
    ``num_canaries`` to ``DEFAULT_CANARIES``, or every parameter of a smaller model (each
    canary needs a coordinate of its own).
    Guarantee: if the audited DP-SGD is (claim, delta)-DP, the lower bound exceeds the claim
    with probability at most ``1 - confidence``. Raises :class:`WhiteboxAuditError` for bad
    arguments or a plan that cannot be built, and, with ``run_dir``, when ``cfg`` is not the
    run's config (:func:`audits.verdict.run_config_problem`: the ``config_hash`` results.json
    records, else config.toml's; checked before anything trains), when private key material
    lies inside it (:func:`audits.verify.refuse_private_keys`, as ``audit verify`` and ``audit
    replay`` refuse it; what it could not check is the result's ``unchecked``) or the
    audited client's ledger
    there records another plan (:func:`check_setting_against_ledger`), and, before training,
    when the evaluation part of
    the canaries holds no member or no non-member canary (not measurable); errors name the
    arguments (``options``; the CLI passes :data:`~audits.options.CLI_AUDIT_OPTIONS`, its flags).

    ``allowlist`` (CLI ``--allowlist``, with ``run_dir`` only): an independently registered
    allowlist.json, as ``audit replay --allowlist`` takes it: the ledger's signatures are
    checked under it instead of the run's ``keys/allowlist.json`` (a Flower run's collected
    folder holds none), and a ``keys/allowlist.json`` listing a party or key it does not
    register is an error (:func:`audits.verify.given_allowlist_findings`). One that is no
    valid allowlist is bad input, refused before the run is scanned or anything trains.

    ``anchor`` (CLI ``--anchor``, with ``run_dir`` only): a copy of the run's anchor.json
    kept apart, checked before anything trains as ``audit verify --anchor`` and ``audit
    replay --anchor`` check it (:func:`audits.verify.check_anchor`: its signature and signer,
    config.toml's and results.json's digests, run name, config hash, runtime and methods,
    every ledger's head and length); a run that does not match it is an error. One that is
    no signed anchor is bad input, refused as an unusable ``allowlist`` is.

    ``_given_files`` (internal): ``allowlist`` and ``anchor`` as :func:`audit_run_dir`
    already loaded them, so they are not loaded again.
    """
    t0 = time.perf_counter()
    check_config(cfg, WhiteboxAuditError)
    method = method or ("local" if "local" in cfg.methods else cfg.methods[0])
    if num_canaries is not None and (isinstance(num_canaries, bool)
                                     or not isinstance(num_canaries, int) or num_canaries < 10):
        raise WhiteboxAuditError(f"the number of canaries must be an int >= 10, got {num_canaries!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
            or not 0 < confidence < 1:
        raise WhiteboxAuditError(f"confidence must be in (0, 1) ({options['confidence']}), got"
                                 f" {confidence!r}")
    if isinstance(calibration_fraction, bool) or not isinstance(calibration_fraction, int | float) \
            or not 0 < calibration_fraction < 1:
        raise WhiteboxAuditError(f"calibration fraction must be in (0, 1)"
                                 f" ({options['calibration_fraction']}), got"
                                 f" {calibration_fraction!r}")
    check_seed(seed, WhiteboxAuditError, flag=options["seed"])
    run_path = None if run_dir is None else check_path(run_dir, "run_dir", WhiteboxAuditError)
    # the auditor's own files: bad input, before the run
    for key, value, what in (
            ("allowlist", allowlist, "checks the signatures of the run's ledger: it needs"
             " run_dir= (the run it was registered for)"),
            ("anchor", anchor, "checks the run's files and ledgers: it needs run_dir= (the"
             " run it anchors)")):
        if value is not None and run_path is None:
            raise WhiteboxAuditError(f"{options[key]} {what}")
    given_files = _given_files or _load_given_files(allowlist, anchor, options)
    given = given_files.allowlist
    unchecked: list[str] = []
    if run_path is not None:  # once per audit: each scan reads every file of the run
        unchecked = refuse_private_keys(run_path, bool(cfg.privacy.enabled), WhiteboxAuditError,
                                        f"run directory {run_path} is not trusted", given)
    allow_path, allow_keys = (None, None) if given is None else given
    if run_path is not None and given_files.anchor is not None:
        anchor_path, anchor_doc = given_files.anchor
        check_anchor(run_path, anchor_path, allowlist=allow_path,
                     error=WhiteboxAuditError, options=options, run_checked=True,
                     given_keys=allow_keys, anchor_doc=anchor_doc)
    ledger = _audited_ledger(run_path, cfg, method, client_index, allow_path, options,
                             allow_keys)
    setting = whitebox_setting(cfg, method, client_index, results, options,
                               _ledger_noise(ledger))
    if run_path is not None:
        _check_setting_against_entries(setting, ledger)
        # after the ledger check, whose refusal rests on signed entries and says more
        problem = run_config_problem(run_path, cfg)
        if problem is not None:
            raise WhiteboxAuditError(problem)
    # the run's thread count (training.threads, as its in-process training held it), the
    # process's own again after
    with threads_applied(cfg):
        clients = build_clients(cfg)
        client = clients[client_index]
        ctx = build_context(cfg, clients)
        if num_canaries is None:
            num_canaries = min(DEFAULT_CANARIES, ctx.flat.num_params)
            if num_canaries < 10:
                raise WhiteboxAuditError(f"the model has {num_canaries} parameters; the audit"
                                         " needs at least 10 (one canary coordinate each)")
        audit_gen = torch.Generator().manual_seed(seed)
        coords, zero_activity = quiet_coordinates(ctx.flat, ctx.init, client.train_x,
                                                  client.train_y, num_canaries, audit_gen)
        member = torch.rand(num_canaries, generator=audit_gen) < 0.5
        _require_both_kinds_evaluated(member.numpy(), calibration_fraction, seed + 1, options)
        oracle = DiracCanaryOracle(ctx.oracle, coords[member], setting.clip_norm,
                                   ctx.flat.num_params, plain_rate=setting.sample_rate,
                                   canary_generator=audit_gen)
        generator = ctx.generators[client_index]
        if setting.private:
            assert setting.noise_multiplier is not None
            oracle.select(setting.noise_multiplier, ctx.noise[client_index])
        theta = ctx.init.clone()
        try:
            for _ in range(setting.rounds):
                local_train(ctx.flat, theta, client.train_x, client.train_y, ctx.train, oracle,
                            generator, ctx.workspace)
        except ClientUpdateError as err:
            raise WhiteboxAuditError(f"training with canaries failed: {err}") from None
    scores = (ctx.init - theta)[coords].to(torch.float64).numpy()
    mem = member.numpy()
    try:
        outcome = split_one_run_audit(scores, mem, setting.delta, confidence,
                                      calibration_fraction, seed=seed + 1)
    except OneRunAuditError as err:
        raise WhiteboxAuditError(str(err)) from None
    assumptions = [
        "attacked: one client's DP-SGD steps of the plan (Local training, every round), the"
        " adversary sees the model before and after training",
        "canaries are Dirac gradient canaries on dedicated coordinates, each a record of the"
        " Poisson-sampled dataset (white-box: the adversary chooses the per-sample gradient)",
        "claim: epsilon of the plan's DP-SGD releases alone, under the run's accountant",
        "one-run theorem (Steinke, Nasr, Jagielski 2023), guess thresholds chosen on the"
        " calibration canaries only",
    ]
    if not setting.private:
        assumptions.append("non-private run: canaries join each plain mini-batch step with"
                           " probability batch_size / n")
    return WhiteboxAuditResult(
        setting=setting, num_canaries=num_canaries, members=int(mem.sum()),
        zero_activity_coordinates=zero_activity, calibration_fraction=float(calibration_fraction),
        confidence=float(confidence), seed=seed, outcome=outcome,
        member_mean_score=float(scores[mem].mean()) if mem.any() else math.nan,
        non_member_mean_score=float(scores[~mem].mean()) if (~mem).any() else math.nan,
        mean_inclusions=float(oracle.inclusions.double().mean()) if oracle.inclusions.numel()
        else 0.0,
        seconds=time.perf_counter() - t0, config_name=cfg.name, assumptions=assumptions,
        unchecked=list(unchecked),
    )


#: What the white-box audit's Python errors name: its arguments (``imports=`` is
#: :func:`audit_run_dir`'s own).
WHITEBOX_API_OPTIONS: Mapping[str, str] = {
    **API_AUDIT_OPTIONS, "imports": "the imports= argument of audits.whitebox.audit_run_dir"}


def audit_run_dir(run_dir: str | Path, *, imports: Sequence[str] = (),
                  options: Mapping[str, str] = WHITEBOX_API_OPTIONS,
                  **kwargs: Any) -> tuple[WhiteboxAuditResult, Path]:
    """Audit the run in ``run_dir`` (its ``config.toml``, and ``results.json`` when present).

    ``imports`` (CLI ``--import MODULE``): dotted names of modules the auditor trusts,
    imported first as ``audit verify --import`` imports them
    (:func:`audits.verify.import_trusted_modules`: from PYTHONPATH or the installed packages,
    never from ``run_dir``), so that a plug-in method, dataset or model they register can be
    rebuilt; the result names each (``imported``: file, SHA-256, what it registered).
    Writes ``RUN_DIR/audit/whitebox.json`` and returns the result and that path.
    Raises :class:`WhiteboxAuditError` when the directory or its config is missing or
    invalid, a module of ``imports`` cannot be imported (naming it), or the config names an
    entry this process has not registered (naming ``imports``); a given ``allowlist=`` or
    ``anchor=`` (:func:`run_whitebox_audit`'s) that is unusable is refused first.
    """
    run = check_path(run_dir, "run_dir", WhiteboxAuditError)
    # the auditor's input, before the run is read (and not loaded again by the audit)
    given_files = _load_given_files(kwargs.get("allowlist"), kwargs.get("anchor"), options)
    problem = path_problem(run)
    if problem is not None:
        raise WhiteboxAuditError(f"run directory {run} {problem}")
    cfg_path = run / "config.toml"
    if not cfg_path.is_file():
        raise WhiteboxAuditError(f"{cfg_path} is missing: the audit needs the run's config")
    if isinstance(imports, str):  # one name would be imported letter by letter
        raise WhiteboxAuditError(f"{options['imports']} takes a list of module names, got the"
                                 f" string {imports!r:.80}")
    try:  # before the config names plug-ins
        imported = import_trusted_modules(imports, run, options)
    except AuditError as err:
        raise WhiteboxAuditError(str(err)) from None
    try:
        cfg, unknown = load_run_config(cfg_path)
    except ConfigError as err:
        raise WhiteboxAuditError(f"{cfg_path}: {err}") from None
    if unknown:  # it trains the run's model on its data under its method's privacy plan
        raise WhiteboxAuditError(
            "the white-box audit rebuilds the run's data, model and privacy plan, and "
            f"{cfg_path} names " + unregistered_hint(*unknown[0], "audits.whitebox.audit_run_dir",
                                                     options["imports"]))
    problem = config_rebuild_problem(run, "whitebox") \
        or config_claim_problem(run, cfg.privacy.enabled, "whitebox")
    if problem is not None:
        raise WhiteboxAuditError(problem)
    results = None
    results_path = run / "results.json"
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise WhiteboxAuditError(f"{results_path} is unreadable: {err}") from None
    result = replace(run_whitebox_audit(cfg, results=results, run_dir=run, options=options,
                                        _given_files=given_files, **kwargs),
                     imported=[m.to_json() for m in imported])
    try:
        return result, write_audit_json(run, result.to_json())
    except OSError as err:
        raise WhiteboxAuditError(f"cannot write {run / 'audit' / 'whitebox.json'}: {err}") from None
