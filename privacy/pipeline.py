"""Release pipeline: an ordered list of postprocessors ending in a budget gate.

A :class:`Release` is what a client is about to send: a payload (tensor, or bytes once an
encryption stage has run), the round, and the :class:`~privacy.accounting.MechanismRecord`\\ s
of every accounted mechanism the payload is the output of. Stages transform a release and
may add records (:class:`GaussianNoise`); the last stage, :class:`BudgetGate`, decides
whether it may leave the client, and writes the ledger before letting it through.

Any object with ``process(release) -> Release`` is a stage (e.g. a CKKS encryption stage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from privacy.accounting import (
    Accountant,
    BudgetExceededError,
    MechanismRecord,
    PrivacyBudget,
)
from privacy.errors import ToolkitError
from privacy.ledger import (
    CLOSE,
    REFUSAL,
    REPAIR,
    LedgerError,
    LedgerWriter,
    canonical_json,
    replay_accountant,
)
from privacy.mechanisms import GaussianMechanism, clip_rows
from privacy.noise import NoiseSource


class PipelineError(ToolkitError, ValueError):
    """A release or stage is malformed; the message names the stage/field."""


@dataclass(frozen=True)
class Release:
    """A candidate release. Stages return new Release objects; they never mutate one.

    ``metadata`` carries non-private bookkeeping (e.g. the gate adds ``ledger_index`` and
    ``ledger_head`` — send them with the release so the receiver can anchor the ledger).
    """

    kind: str
    payload: Tensor | bytes
    round: int
    records: list[MechanismRecord] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise PipelineError(f"release kind must be a non-empty string, got {self.kind!r}")
        if not isinstance(self.payload, Tensor | bytes):
            raise PipelineError(
                f"release payload must be a Tensor or bytes, got {type(self.payload).__name__}"
            )
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise PipelineError(f"release round must be an int >= 0, got {self.round!r}")
        for r in self.records:
            if not isinstance(r, MechanismRecord):
                raise PipelineError(f"release records must be MechanismRecord, got {type(r).__name__}")
        object.__setattr__(self, "records", list(self.records))
        object.__setattr__(self, "metadata", dict(self.metadata))

    def replace(self, **changes: Any) -> Release:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@runtime_checkable
class Postprocessor(Protocol):
    """A pipeline stage."""

    def process(self, release: Release) -> Release:
        """Return the transformed release (a new object)."""
        ...


def _tensor_payload(stage: str, release: Release) -> Tensor:
    if not isinstance(release.payload, Tensor):
        raise PipelineError(f"{stage} needs a Tensor payload; release {release.kind!r} carries"
                            f" {type(release.payload).__name__} (put it before encryption)")
    return release.payload


class ClipRows:
    """Clip each row of a 2-D tensor payload to L2 norm ``max_norm`` (no privacy cost by itself)."""

    def __init__(self, max_norm: float) -> None:
        clip_rows(torch.zeros(1, 1), max_norm)  # validates max_norm
        self.max_norm = float(max_norm)

    def process(self, release: Release) -> Release:
        """Clipped payload; adds ``metadata["row_clip_norm"]``."""
        z = clip_rows(_tensor_payload("ClipRows", release), self.max_norm)
        return release.replace(payload=z, metadata={**release.metadata,
                                                     "row_clip_norm": self.max_norm})


class GaussianNoise:
    """Gaussian mechanism on a tensor payload; appends its MechanismRecord to the release.

    ``sensitivity`` is the caller's claim about the payload arriving at this stage (L2, under
    add/remove-one-record); this stage cannot check it. The noise is drawn from ``noise``
    (a :class:`privacy.noise.NoiseSource`).
    """

    def __init__(self, noise_multiplier: float, sensitivity: float, noise: NoiseSource,
                 mechanism: str = "gaussian", params: dict[str, Any] | None = None) -> None:
        self.mechanism_impl = GaussianMechanism(noise_multiplier, sensitivity)
        if not isinstance(noise, NoiseSource):
            raise PipelineError(f"GaussianNoise needs a privacy.noise.NoiseSource, got"
                                f" {type(noise).__name__}")
        self.noise = noise
        self.mechanism = mechanism
        self.params = dict(params or {})
        self.mechanism_impl.record(mechanism, **self.params)  # validates name and params

    def process(self, release: Release) -> Release:
        """Noised payload with one more record."""
        noised = self.mechanism_impl.release(_tensor_payload("GaussianNoise", release),
                                             self.noise)
        record = self.mechanism_impl.record(self.mechanism, **self.params)
        return release.replace(payload=noised, records=[*release.records, record])


class Transform:
    """Data-independent post-processing of the payload (e.g. top eigenvectors); no record.

    Placing a transform *before* a noise stage changes what the noise stage's sensitivity
    must cover; that is the caller's responsibility.
    """

    def __init__(self, fn: Callable[[Tensor | bytes], Tensor | bytes], name: str) -> None:
        if not callable(fn):
            raise PipelineError(f"Transform {name!r}: fn must be callable")
        self.fn = fn
        self.name = name

    def process(self, release: Release) -> Release:
        """Payload replaced by ``fn(payload)``."""
        return release.replace(payload=self.fn(release.payload))


class BudgetGate:
    """Final stage: enforce the client's budget and write the ledger before releasing.

    For a release with records r_1..r_k it computes the cumulative epsilon after each (the
    accountant is not changed). If the final epsilon exceeds ``budget.epsilon``, it appends a
    ``"refusal"`` ledger entry (spending nothing), raises BudgetExceededError and closes: every
    later release through this gate is refused too (also after a restart: a refusal in the
    ledger closes the gate), because the refused output (e.g. further-trained weights) would
    otherwise leak through later releases unaccounted. Otherwise it appends one entry per
    record (each fsynced), records them in the accountant, and returns the release with
    ``metadata["ledger_index"]``/``["ledger_head"]``. A release without records is rejected.
    Each record is added to the accountant right after its ledger entry is fsynced, so if a
    later entry of the same release fails, accountant and ledger still agree (the release is
    not returned; the unreleased records stay counted).

    On construction the accountant's history must equal the ledger's accounted entries
    (rebuild it with :func:`privacy.ledger.replay_accountant` after a crash), so the gate can
    never start from an under-counting accountant.
    """

    def __init__(self, accountant: Accountant, budget: PrivacyBudget, ledger: LedgerWriter,
                 client_id: str) -> None:
        if not isinstance(accountant, Accountant):
            raise PipelineError(f"accountant must be an Accountant, got {type(accountant).__name__}")
        if not isinstance(budget, PrivacyBudget):
            raise PipelineError(f"budget must be a PrivacyBudget, got {type(budget).__name__}")
        if not isinstance(ledger, LedgerWriter):
            raise PipelineError(f"ledger must be a LedgerWriter, got {type(ledger).__name__}")
        if ledger.client_id != client_id:
            raise PipelineError(
                f"ledger belongs to client {ledger.client_id!r}, gate is for {client_id!r}"
            )
        entries = ledger.entries
        kinds = {e["accountant"] for e in entries}
        if kinds and kinds != {accountant.kind}:
            raise LedgerError(
                f"client {client_id!r}: ledger was written with accountant {sorted(kinds)},"
                f" the accountant given is {accountant.kind!r}"
            )
        replayed = replay_accountant(entries, accountant.kind,
                                     prv_eps_error=accountant.prv_eps_error)
        if replayed.history != accountant.history:
            raise LedgerError(
                f"client {client_id!r}: accountant history ({accountant.total_steps} steps) does"
                f" not match the ledger ({replayed.total_steps} steps); rebuild the accountant"
                " with privacy.ledger.replay_accountant(ledger.entries)"
            )
        self.accountant = accountant
        self.budget = budget
        self.ledger = ledger
        self.client_id = client_id
        refusals = [e for e in entries if e["mechanism"] == REFUSAL]
        self._closed_at: int | None = refusals[0]["round"] if refusals else None
        self._replay: list[dict[str, Any]] = []

    def replay_from(self, index: int) -> None:
        """Resume: the ledger entries from ``index`` on (written by an interrupted run, for
        rounds the resumed run computes again) are *consumed* by the matching releases instead
        of being appended again, so each release is accounted once.

        Each later :meth:`process` call must present the release the entry at the cursor
        records (round, kind, mechanism, params), else LedgerError ("resume diverged"); a
        recorded refusal is raised again as the same BudgetExceededError. Past the last
        entry the gate appends as usual. The gate is closed iff a refusal precedes ``index``.
        Repair and close entries are skipped (they record no release; a close written by the
        interrupted run stays the ledger's last entry, and closing again is idempotent).
        """
        entries = self.ledger.entries
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(entries):
            raise PipelineError(f"replay index must be an int in [0, {len(entries)}], got {index!r}")
        self._replay = [e for e in entries[index:] if e["mechanism"] not in (REPAIR, CLOSE)]
        refusals = [e for e in entries[:index] if e["mechanism"] == REFUSAL]
        self._closed_at = refusals[0]["round"] if refusals else None

    @property
    def replaying(self) -> int:
        """How many recorded entries the resumed run has yet to consume (0: appending)."""
        return len(self._replay)

    def _diverged(self, release: Release, entry: dict[str, Any], what: str) -> LedgerError:
        return LedgerError(
            f"client {self.client_id!r}: resume diverged from the ledger: the re-run presents"
            f" round {release.round} {what}, but ledger entry {entry['index']} records round"
            f" {entry['round']} {entry['mechanism']!r} ({canonical_json(entry['params'])});"
            " refusing to account it again or differently"
        )

    def _replay_release(self, release: Release) -> Release:
        entry = self._replay[0]
        if entry["mechanism"] == REFUSAL:
            refused = [{"mechanism": r.mechanism, **r.ledger_params()} for r in release.records]
            p = entry["params"]
            if (entry["round"] != release.round or p.get("release_kind") != release.kind
                    or canonical_json(p.get("refused")) != canonical_json(refused)):
                raise self._diverged(release, entry, f"release {release.kind!r}")
            self._replay.pop(0)
            if self._closed_at is None:
                self._closed_at = release.round
            raise BudgetExceededError(client_id=self.client_id, round=release.round,
                                      mechanism="+".join(r.mechanism for r in release.records),
                                      epsilon_would_be=p["epsilon_would_be"],
                                      budget=self.budget, reason=p["reason"])
        consumed = 0
        last_entry = entry
        for record in release.records:
            if not self._replay:
                break
            entry = self._replay[0]
            expected = {"release_kind": release.kind, **record.ledger_params(),
                        "accountant_params": self.accountant.parameters}
            if (entry["round"] != release.round or entry["mechanism"] != record.mechanism
                    or canonical_json(entry["params"]) != canonical_json(expected)):
                raise self._diverged(release, entry, f"{release.kind!r} {record.mechanism!r}")
            self._replay.pop(0)
            consumed += 1
            last_entry = entry
        # A release cut between two of its entries: the first entry proves the gate admitted
        # the whole release, so the rest is appended without a second budget decision.
        delta = self.budget.delta
        rest = release.records[consumed:]
        for record in rest:
            eps = self.accountant.epsilon_after_releases(delta, [record.as_release()])
            last_entry = self.ledger.append(
                round=release.round, mechanism=record.mechanism,
                params={"release_kind": release.kind, **record.ledger_params(),
                        "accountant_params": self.accountant.parameters},
                epsilon_after=max(eps, self.ledger.last_epsilon), delta=delta,
                budget_epsilon=self.budget.epsilon, accountant=self.accountant.kind)
            self.accountant.record(*record.as_release())
        count, head = self.ledger.head
        return release.replace(metadata={**release.metadata, "ledger_index": last_entry["index"],
                                         "ledger_head": head, "ledger_entries": count,
                                         "epsilon_after": last_entry["epsilon_after"],
                                         "replayed_entries": consumed})

    @property
    def closed(self) -> bool:
        """True once a release was refused; nothing passes afterwards."""
        return self._closed_at is not None

    def _refuse(self, release: Release, epsilon_would_be: float, reason: str) -> None:
        now = self.accountant.epsilon(self.budget.delta)
        # The refusal entry must not claim a lower spend than the ledger already shows.
        now = max(now, self.ledger.last_epsilon)
        names = "+".join(r.mechanism for r in release.records) or "(none)"
        self.ledger.append(
            round=release.round,
            mechanism=REFUSAL,
            params={
                "release_kind": release.kind,
                "refused": [{"mechanism": r.mechanism, **r.ledger_params()}
                            for r in release.records],
                "epsilon_would_be": float(epsilon_would_be),
                "reason": reason,
            },
            epsilon_after=now,
            delta=self.budget.delta,
            budget_epsilon=self.budget.epsilon,
            accountant=self.accountant.kind,
        )
        if self._closed_at is None:
            self._closed_at = release.round
        raise BudgetExceededError(client_id=self.client_id, round=release.round,
                                  mechanism=names, epsilon_would_be=epsilon_would_be,
                                  budget=self.budget, reason=reason)

    def refuse(self, release: Release, epsilon_would_be: float, reason: str) -> None:
        """Refuse ``release`` for a reason other than its budget (e.g. its accounting does not
        match what was executed): a refusal ledger entry, the gate closes, and
        BudgetExceededError (carrying ``reason``) is raised. Nothing is spent."""
        self._refuse(release, epsilon_would_be, reason)

    def process(self, release: Release) -> Release:
        """Ledger-then-release, or refusal (ledger entry + BudgetExceededError)."""
        if not release.records:
            raise PipelineError(
                f"release {release.kind!r} (round {release.round}) carries no mechanism record;"
                " the gate passes only accounted releases"
            )
        if self._replay:
            return self._replay_release(release)
        delta = self.budget.delta
        triples = [r.as_release() for r in release.records]
        eps_final = self.accountant.epsilon_after_releases(delta, triples)
        if self._closed_at is not None:
            self._refuse(release, eps_final,
                         f"an earlier release was refused (round {self._closed_at});"
                         " this client releases nothing more")
        if eps_final > self.budget.epsilon:
            self._refuse(release, eps_final, "over budget")
        cumulative = [self.accountant.epsilon_after_releases(delta, triples[:k])
                      for k in range(1, len(triples))] + [eps_final]
        # The accountant and its parameters go with every entry, so that an auditor can redo
        # the computation from the ledger alone.
        accountant_params = self.accountant.parameters
        all_params = [{"release_kind": release.kind, **r.ledger_params(),
                       "accountant_params": accountant_params} for r in release.records]
        last_entry: dict[str, Any] = {}
        for record, params, eps in zip(release.records, all_params, cumulative, strict=True):
            last_entry = self.ledger.append(
                round=release.round,
                mechanism=record.mechanism,
                params=params,
                epsilon_after=max(eps, self.ledger.last_epsilon),
                delta=delta,
                budget_epsilon=self.budget.epsilon,
                accountant=self.accountant.kind,
            )
            # Record right after its entry is durable: if a later append fails, the accountant
            # still matches the ledger (over-counting the unreleased part, never under-counting).
            self.accountant.record(*record.as_release())
        count, head = self.ledger.head
        return release.replace(metadata={**release.metadata, "ledger_index": last_entry["index"],
                                         "ledger_head": head, "ledger_entries": count,
                                         "epsilon_after": eps_final})


class ReleasePipeline:
    """Runs stages in order. With ``require_gate`` (default) the last stage must be a BudgetGate
    and no other stage may be one, so nothing can leave through this pipeline unaccounted.
    """

    def __init__(self, stages: Sequence[Postprocessor], *, require_gate: bool = True) -> None:
        stages = list(stages)
        for i, stage in enumerate(stages):
            if not callable(getattr(stage, "process", None)):
                raise PipelineError(f"stage {i} ({type(stage).__name__}) has no process() method")
        gates = [i for i, s in enumerate(stages) if isinstance(s, BudgetGate)]
        if require_gate and (not stages or gates != [len(stages) - 1]):
            raise PipelineError(
                "the last stage, and only the last, must be a BudgetGate"
                f" (gates at positions {gates} of {len(stages)})"
            )
        if not require_gate and gates and gates != [len(stages) - 1]:
            raise PipelineError(f"a BudgetGate must be the last stage (found at {gates})")
        self.stages = stages

    def run(self, release: Release) -> Release:
        """The release after every stage; exceptions from a stage propagate (nothing returned)."""
        if not isinstance(release, Release):
            raise PipelineError(f"run() needs a Release, got {type(release).__name__}")
        for stage in self.stages:
            out = stage.process(release)
            if not isinstance(out, Release):
                raise PipelineError(f"stage {type(stage).__name__} returned"
                                    f" {type(out).__name__}, not a Release")
            release = out
        return release

    __call__ = run
