"""Release pipeline: small stages, in order, that every data-dependent release passes.

A :class:`Release` is what a client is about to send: a payload (tensor, or bytes once an
encryption stage has run), the round, and the :class:`~privacy.accounting.MechanismRecord`\\ s
of every accounted mechanism the payload is the output of. Any object with
``process(release) -> Release`` is a stage. The order is

    clip -> noise -> (encrypt) -> gate + ledger -> journal -> (step check) -> (encrypt) -> sign

Stages before the gate transform the payload and may add records (:class:`ClipRows`,
:class:`ClampValues`, :class:`GaussianNoise`, :class:`Transform`, :class:`EncryptPayload`,
:class:`RecordParams`); :class:`BudgetGate` decides whether the release may leave the client
and writes the ledger before letting it through; the stages after it (:class:`AfterGate`:
:class:`JournalRelease`, :class:`CheckExecutedSteps`, :class:`SignEnvelope`) act on the
accounted release and never change what it accounts (the pipeline checks this).

A release whose mechanism runs *after* its accounting (DP-SGD: the gate admits the round's
step count before training, the steps run, then the model leaves) passes the same pipeline in
two calls: ``run(release, stop=k)`` up to the journal before the mechanism runs, and
``run(admitted, start=k)`` (the step check, the signature) before the payload leaves.
Write-ahead: the ledger entry and the journal record are on disk before any stage that
lets the payload leave (the signature) runs, so nothing is sent that the ledger does not
account. An encryption stage may also stand after the journal (the accounted plaintext is
journaled, its ciphertext is signed and sent); it changes no record there.

A release that no accountant covers (a run without DP) passes a pipeline without a gate
(``require_gate=False``), e.g. the signature alone: there is one path for every upload.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy
import torch
from torch import Tensor

from privacy.accounting import (
    Accountant,
    BudgetExceededError,
    MechanismRecord,
    PrivacyBudget,
)
from privacy.durable import SyncBatch
from privacy.errors import ToolkitError
from privacy.journal import JournalError, JournalRecord, ReleaseJournal, payload_digest
from privacy.ledger import (
    CLOSE,
    REFUSAL,
    REPAIR,
    LedgerError,
    LedgerWriter,
    canonical_json,
    replay_accountant,
)
from privacy.mechanisms import (
    GaussianMechanism,
    clip_rows,
    scalar_record,
    summary_record,
    top_eigenvectors,
)
from privacy.noise import NoiseSource, is_noise_source


class PipelineError(ToolkitError, ValueError):
    """A release or stage is malformed; the message names the stage/field."""


class StepCountMismatchError(PipelineError):
    """A client executed a different number of DP-SGD steps than its ledger accounted.

    Raised by :class:`CheckExecutedSteps` before the trained model is released; the release
    is refused in the ledger first (``refusal`` is the gate's BudgetExceededError).
    """

    def __init__(self, reason: str, refusal: BudgetExceededError | None = None) -> None:
        self.reason = reason
        self.refusal = refusal
        super().__init__(reason + "; the model release was refused")


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
        if not is_noise_source(noise):
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


class SymmetricGaussianNoise(GaussianNoise):
    """Gaussian mechanism on a square payload that is symmetric between neighbours (a second
    moment): symmetrizes it and adds symmetric noise drawn on its d(d+1)/2 independent
    entries (:meth:`privacy.mechanisms.GaussianMechanism.release_symmetric`), the output
    distributed exactly as :class:`GaussianNoise` followed by symmetrization. Same record."""

    def process(self, release: Release) -> Release:
        """Symmetric noised payload with one more record."""
        noised = self.mechanism_impl.release_symmetric(
            _tensor_payload("SymmetricGaussianNoise", release), self.noise)
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


class ClampValues:
    """Clamp each value of a 1-D tensor payload (one value per record) to ``[-clip, clip]``
    (no privacy cost by itself; bounds each record's contribution to a later sum)."""

    def __init__(self, clip: float) -> None:
        clip_rows(torch.zeros(1, 1), clip)  # validates clip (> 0, finite)
        self.clip = float(clip)

    def process(self, release: Release) -> Release:
        """Clamped payload (a new tensor)."""
        values = _tensor_payload("ClampValues", release)
        if values.ndim != 1:
            raise PipelineError(f"ClampValues needs a 1-D payload (one value per record), got"
                                f" shape {tuple(values.shape)}")
        return release.replace(payload=values.clamp(-self.clip, self.clip))


class RecordParams:
    """Add ``params`` to every record of the release (e.g. where its noise came from), so
    the ledger entries the gate writes state them (signed). Adds no record."""

    def __init__(self, params: dict[str, Any]) -> None:
        if not isinstance(params, dict):
            raise PipelineError(f"RecordParams needs a dict, got {type(params).__name__}")
        self.params = dict(params)

    def process(self, release: Release) -> Release:
        """The release with each record's params extended (records are replaced, not mutated)."""
        records = [dataclasses.replace(r, params={**r.params, **self.params})
                   for r in release.records]
        return release.replace(records=records)


class EncryptPayload:
    """Encryption stage: ``encrypt(tensor) -> bytes`` (e.g. CKKS under the key holder's
    public key). Post-processing of whatever precedes it, so it adds no record; stages after
    it see bytes (the gate, journal and signature accept bytes; noise stages do not).

    It may stand before the gate (the ciphertext is what the gate admits and the journal
    records) or after it (``may_follow_gate``: the accounted plaintext is journaled, the
    ciphertext leaves); after the gate the pipeline checks that it changes no record."""

    may_follow_gate = True

    def __init__(self, encrypt: Callable[[Tensor], bytes], scheme: str) -> None:
        if not callable(encrypt):
            raise PipelineError(f"EncryptPayload {scheme!r}: encrypt must be callable")
        self.encrypt = encrypt
        self.scheme = scheme

    def process(self, release: Release) -> Release:
        """The ciphertext as the payload; ``metadata["encryption"]`` names the scheme."""
        ciphertext = self.encrypt(_tensor_payload("EncryptPayload", release))
        if not isinstance(ciphertext, bytes):
            raise PipelineError(f"EncryptPayload {self.scheme!r} returned"
                                f" {type(ciphertext).__name__}, not bytes")
        return release.replace(payload=ciphertext,
                               metadata={**release.metadata, "encryption": self.scheme})


class BudgetGate:
    """Final stage: enforce the client's budget and write the ledger before releasing.

    For a release with records r_1..r_k it computes the cumulative epsilon after each (the
    accountant is not changed). If the final epsilon exceeds ``budget.epsilon``, it appends a
    ``"refusal"`` ledger entry (spending nothing), raises BudgetExceededError and closes: every
    later release through this gate is refused too (also after a restart: a refusal in the
    ledger closes the gate), because the refused output (e.g. further-trained weights) would
    otherwise leak through later releases unaccounted. Otherwise it appends one entry per
    record, all of the release's entries in one write and one fsync
    (:meth:`~privacy.ledger.LedgerWriter.append_many`), records them in the accountant, and
    returns the release with ``metadata["ledger_index"]``/``["ledger_head"]``. A release
    without records is rejected. The records are added to the accountant only after the
    whole batch is durable; if the write fails, none is recorded, the error propagates and
    the release is not returned (the writer refuses further appends until the ledger is
    reopened, verified and the accountant replayed from it, so they agree again).

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

    def replay_refusal(self, release: Release) -> BudgetExceededError | None:
        """While replaying: when the next recorded entry is a refusal of ``release`` (its round
        and kind) that the interrupted run wrote after admitting it (a refused step check),
        consume it, close the gate and return it as the BudgetExceededError it raised; else
        None. The resumed run then refuses that release again instead of releasing what the
        ledger says never left."""
        if not self._replay:
            return None
        entry = self._replay[0]
        p = entry["params"]
        if (entry["mechanism"] != REFUSAL or entry["round"] != release.round
                or p.get("release_kind") != release.kind):
            return None
        self._replay.pop(0)
        if self._closed_at is None:
            self._closed_at = release.round
        refused = p.get("refused") or []
        return BudgetExceededError(
            client_id=self.client_id, round=release.round,
            mechanism="+".join(str(r.get("mechanism")) for r in refused) or "(none)",
            epsilon_would_be=p["epsilon_would_be"], budget=self.budget, reason=p["reason"])

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
        indices: list[int] = []
        # every record is matched before any entry is consumed: a diverged release leaves the
        # cursor where it was
        for record in release.records:
            if consumed == len(self._replay):
                break
            entry = self._replay[consumed]
            expected = {"release_kind": release.kind, **record.ledger_params(),
                        "accountant_params": self.accountant.parameters}
            if (entry["round"] != release.round or entry["mechanism"] != record.mechanism
                    or canonical_json(entry["params"]) != canonical_json(expected)):
                recorded = entry["params"].get("accountant_params")
                if canonical_json({**entry["params"], "accountant_params": None}) == \
                        canonical_json({**expected, "accountant_params": None}) \
                        and entry["round"] == release.round \
                        and entry["mechanism"] == record.mechanism:
                    raise LedgerError(
                        f"client {self.client_id!r}: ledger entry {entry['index']} was accounted"
                        f" with accountant parameters {canonical_json(recorded)}, this run's"
                        f" accountant has {canonical_json(self.accountant.parameters)} (a"
                        " different version of the toolkit or of its accountant): refusing to"
                        " resume under another analysis; resume with the version that started"
                        " the run, or start a new run")
                raise self._diverged(release, entry, f"{release.kind!r} {record.mechanism!r}")
            consumed += 1
            last_entry = entry
            indices.append(int(entry["index"]))
        del self._replay[:consumed]
        # A release cut between two of its entries: the first entry proves the gate admitted
        # the whole release, so the rest is appended without a second budget decision.
        rest = release.records[consumed:]
        if rest:
            triples = [r.as_release() for r in rest]
            cumulative = [self.accountant.epsilon_after_releases(self.budget.delta, triples[:k])
                          for k in range(1, len(triples) + 1)]
            params = [{"release_kind": release.kind, **r.ledger_params(),
                       "accountant_params": self.accountant.parameters} for r in rest]
            written = self._append_release(release.replace(records=rest), params, cumulative)
            last_entry = written[-1]
            indices.extend(int(e["index"]) for e in written)
        count, head = self.ledger.head
        # the entries need not be adjacent: a torn tail's repair entry may sit between them
        return release.replace(metadata={**release.metadata, "ledger_index": last_entry["index"],
                                         "ledger_indices": indices,
                                         "ledger_head": head, "ledger_entries": count,
                                         "epsilon_after": last_entry["epsilon_after"],
                                         "replayed_entries": consumed})

    def _append_release(self, release: Release, all_params: list[dict[str, Any]],
                        cumulative: list[float]) -> list[dict[str, Any]]:
        """Write the ledger entries of ``release``'s records (``all_params``, cumulative
        epsilons) as one durable batch, then record them in the accountant; returns them."""
        running = self.ledger.last_epsilon
        batch = []
        for record, params, eps in zip(release.records, all_params, cumulative, strict=True):
            running = max(eps, running)
            batch.append({"round": release.round, "mechanism": record.mechanism,
                          "params": params, "epsilon_after": running,
                          "delta": self.budget.delta, "budget_epsilon": self.budget.epsilon,
                          "accountant": self.accountant.kind})
        written = self.ledger.append_many(batch)
        # Record only once the whole batch is durable: if the write fails nothing is
        # recorded and the error propagates (the writer is broken; a reopen verifies the
        # file and a replay rebuilds the accountant from what reached it), so the
        # accountant never counts an entry the ledger lacks; a crash inside the write
        # leaves a prefix of the lines, and no line of it was released.
        for record in release.records:
            self.accountant.record(*record.as_release())
        return written

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
        written = self._append_release(release, all_params, cumulative)
        last_entry = written[-1]
        indices = [int(e["index"]) for e in written]
        count, head = self.ledger.head
        return release.replace(metadata={**release.metadata, "ledger_index": last_entry["index"],
                                         "ledger_indices": indices,
                                         "ledger_head": head, "ledger_entries": count,
                                         "epsilon_after": eps_final})


def _release_entries(ledger: LedgerWriter, release: Release) -> list[dict[str, Any]]:
    """The ledger entries of a release the gate passed: those it names (``ledger_indices``),
    else the ``len(records)`` entries ending at ``ledger_index`` (the gate appends a release's
    entries together; only a resume across a torn tail separates them)."""
    indices = release.metadata.get("ledger_indices")
    if indices is not None:
        return [ledger.entries_between(int(k), int(k))[0] for k in indices]
    last = int(release.metadata["ledger_index"])
    return ledger.entries_between(last - len(release.records) + 1, last)


class AccountedWith:
    """Last stage of a release accounted in advance, as part of ``admitted`` (a release the
    gate passed, e.g. a round's model release whose records include the noised lambda that
    shapes it): each record of this release must be one of ``admitted``'s records and match
    one of its ledger entries not yet used by another such release (``used`` holds the ledger
    indices consumed so far; this stage adds to it). Otherwise PipelineError: the release
    would be computed from data without its accounting on the ledger.
    """

    def __init__(self, admitted: Release | None, ledger: LedgerWriter, used: set[int]) -> None:
        self.admitted = admitted
        self.ledger = ledger
        self.used = used

    def process(self, release: Release) -> Release:
        """The release unchanged, each of its records matched to an unused ledger entry. All
        or nothing: on a PipelineError no entry is marked used."""
        admitted = self._admitted(release.kind)
        if not release.records:
            raise PipelineError(f"release {release.kind!r} carries no mechanism record")
        matched: set[int] = set()
        for record in release.records:
            matched.add(self.unused_entry(release.kind, record, also_used=matched))
        self.used |= matched
        return release.replace(metadata={**release.metadata,
                                         "ledger_index": int(admitted.metadata["ledger_index"]),
                                         "accounted_with": admitted.kind})

    def _admitted(self, kind: str) -> Release:
        admitted = self.admitted
        if admitted is None or "ledger_index" not in admitted.metadata:
            raise PipelineError(f"release {kind!r}: no admitted release accounts it"
                                " (it must be admitted through the gate first)")
        return admitted

    def unused_entry(self, kind: str, record: MechanismRecord,
                     also_used: set[int] | frozenset[int] = frozenset()) -> int:
        """The ledger index of the admitted release's unused entry that accounts ``record``
        (not marked used, nor in ``also_used``); PipelineError when none does, so that a
        caller can refuse a release before drawing its noise. Marks nothing."""
        admitted = self._admitted(kind)
        last = int(admitted.metadata["ledger_index"])
        first = last - len(admitted.records) + 1
        params = record.ledger_params()
        match = next((e["index"] for e in _release_entries(self.ledger, admitted)
                      if e["index"] not in self.used and e["index"] not in also_used
                      and e["round"] == admitted.round
                      and e["mechanism"] == record.mechanism
                      and all(e["params"].get(k) == v for k, v in params.items())), None)
        if record not in admitted.records or match is None:
            raise PipelineError(
                f"release {kind!r} ({record.mechanism!r}, round {admitted.round}):"
                f" the admitted {admitted.kind!r} release (ledger entries {first}..{last})"
                " does not account it, or its entry was already used; refusing to"
                " release it unaccounted")
        return int(match)


def second_moment_stages(clip_norm: float, n: int, q: int, noise_multiplier: float,
                         noise: NoiseSource, mechanism: str = "gaussian_summary") -> list[Any]:
    """The stages of a noised second-moment summary of a 2-D payload ``Z``: clip each row to
    ``clip_norm``, ``M = Z^T Z / n`` (``n`` public), the Gaussian mechanism with sensitivity
    ``clip_norm^2 / n`` (record ``mechanism``) with symmetric noise, keep the top-``q``
    eigenvectors.
    The same computation, bit for bit, as :func:`privacy.mechanisms.noised_second_moment`
    followed by :func:`~privacy.mechanisms.top_eigenvectors` (and the same record as
    :func:`~privacy.mechanisms.summary_record`)."""
    record = summary_record(clip_norm, noise_multiplier, n, q, mechanism)  # validates all
    params = {k: v for k, v in record.params.items() if k != "sensitivity"}
    return [
        ClipRows(clip_norm),
        Transform(lambda z: (z.T @ z).div_(n), "second_moment"),
        SymmetricGaussianNoise(noise_multiplier, record.params["sensitivity"], noise, mechanism,
                               params),
        Transform(lambda m: top_eigenvectors(m, q), "top_eigenvectors"),
    ]


def noised_mean_stages(clip: float, m: int, noise_multiplier: float, noise: NoiseSource,
                       mechanism: str = "gaussian_lambda") -> list[Any]:
    """The stages of a noised mean of a 1-D payload (one value per record): clamp each value
    to ``[-clip, clip]``, sum / ``m`` (``m`` public), the Gaussian mechanism with sensitivity
    ``clip / m`` (record ``mechanism``). Bit for bit :func:`privacy.mechanisms.noised_scalar`
    (and the record of :func:`~privacy.mechanisms.scalar_record`)."""
    record = scalar_record(clip, noise_multiplier, m, mechanism)  # validates all
    params = {k: v for k, v in record.params.items() if k != "sensitivity"}
    return [
        ClampValues(clip),
        Transform(lambda v: v.sum() / m, "mean"),
        GaussianNoise(noise_multiplier, record.params["sensitivity"], noise, mechanism, params),
    ]


class AfterGate(ABC):
    """A stage that may follow the :class:`BudgetGate`: it acts on an accounted release
    (journals, checks or signs it) and never changes its records (the pipeline checks this).
    Such a stage only runs on a release the gate passed (it has ``ledger_index``).

    ``needs_gate`` False (the signature): the stage may also end a pipeline that has no gate
    at all (``require_gate=False``), for a release no accountant covers (a run without DP);
    where a gate is present it must still follow it."""

    needs_gate: bool = True

    def precheck(self, release: Release) -> None:
        """Raise to refuse ``release`` before any stage of the pipeline call that runs this
        one has run (no noise drawn, no ledger entry written): for a refusal that depends on
        the release's round and kind only, which no stage changes. The default checks
        nothing."""
        return None

    @abstractmethod
    def process(self, release: Release) -> Release:
        """Return the (possibly re-wrapped) release; raise to stop it leaving."""


def payload_bytes(payload: Tensor | bytes) -> bytes:
    """The bytes a release's payload digest is taken over (a tensor's raw values, C order)."""
    if isinstance(payload, bytes):
        return payload
    return payload.detach().contiguous().cpu().numpy().tobytes()


def release_digest(payload: Tensor | bytes) -> str:
    """SHA-256 hex of :func:`payload_bytes` of ``payload`` (what a journal record pins),
    hashed from the tensor's own memory: a contiguous CPU tensor's values are not copied."""
    if isinstance(payload, bytes):
        return payload_digest(payload)
    values = payload.detach().contiguous().cpu().numpy()
    # a C-contiguous array's buffer, as unsigned bytes, is exactly its tobytes()
    return hashlib.sha256(values.reshape(-1).view(numpy.uint8)).hexdigest()


#: Metadata key of the noise state a :class:`JournalRelease` journals; the stage removes it,
#: so the state (secret with CSPRNG noise) never travels further with the release.
NOISE_STATE = "journal_noise_state"


class JournalRelease(AfterGate):
    """Exactly-once record: journal the accounted release durably before it leaves.

    The record holds the release's last ledger entry, its payload digest and the state of the
    client's noise source before the release's draws (``metadata[NOISE_STATE]``, removed
    here; with ``keep_noise_state`` False, as for reproducible noise that checkpoint and seed
    re-create, only its digest). A resumed run (``resumed`` set) presenting a journaled
    release must present the very same one (same ledger entry, same payload digest), else
    LedgerError ("resume diverged"); a run that is not resumed finding a record refuses to
    release (JournalError: the journal belongs to an earlier run, or ``conflict``, the
    runtime's own reading of it).
    ``metadata["journal_bytes"]`` is what the append wrote (0 when matched).
    While ``syncs`` is set (an admission batch, :meth:`~secure_fedora.secure.private.
    FederationPrivacy.admission_batch`) the record is written and its fsync issued on it:
    the batch's owner waits for it before any release of the batch leaves.
    """

    #: What a record found where no resume re-makes the release means in a run directory
    #: that one process runs at a time (in process); a runtime that knows more passes its own.
    EARLIER_RUN = (" of an earlier run in this directory; resume that run or use a new"
                   " directory")

    def __init__(self, journal: ReleaseJournal, client_id: str, *,
                 keep_noise_state: bool, resumed: bool = False,
                 conflict: str = EARLIER_RUN) -> None:
        if not isinstance(journal, ReleaseJournal):
            raise PipelineError(f"JournalRelease needs a ReleaseJournal, got {type(journal).__name__}")
        self.journal = journal
        self.client_id = client_id
        self.keep_noise_state = keep_noise_state
        self.resumed = resumed
        self.conflict = conflict
        self.syncs: SyncBatch | None = None

    def precheck(self, release: Release) -> None:
        """JournalError when the journal already records this round's release of this kind
        and the run is not resumed: raised by the pipeline before its gate writes the
        ledger (or any noise is drawn), so the refusal leaves ledger, accountant, journal and
        noise source as they were."""
        rnd, kind = release.round, release.kind
        if not self.resumed and self.journal.get(rnd, kind) is not None:
            raise JournalError(
                f"journal {str(self.journal.path)!r} already records the round-{rnd} {kind!r}"
                f" release{self.conflict}"
            )

    def process(self, release: Release) -> Release:
        """The release with the journal record on disk (or matched), noise state removed."""
        self.precheck(release)
        metadata = dict(release.metadata)
        noise_state = metadata.pop(NOISE_STATE, b"")
        rnd, kind, ledger_index = release.round, release.kind, int(metadata["ledger_index"])
        digest = release_digest(release.payload)
        record = self.journal.get(rnd, kind)
        written = 0
        if record is None:
            kept = noise_state if self.keep_noise_state else b""
            # the gate's head is the line of the release's last entry when that entry ends the
            # ledger (always, as the gate has just written or completed the release)
            entry_hash = str(metadata.get("ledger_head", "")) \
                if metadata.get("ledger_entries") == ledger_index + 1 else ""
            written = self.journal.append(JournalRecord(
                rnd, kind, ledger_index, digest, payload_digest(noise_state), kept, entry_hash),
                self.syncs)
        elif record.ledger_index != ledger_index or record.payload_sha256 != digest:
            raise LedgerError(
                f"client {self.client_id!r}: resume diverged: the round-{rnd}"
                f" {kind!r} release differs from the journaled one (ledger entry"
                f" {ledger_index} vs {record.ledger_index}, payload digest"
                f" {'equal' if record.payload_sha256 == digest else 'different'})"
            )
        return release.replace(metadata={**metadata, "journal_bytes": written})


class StepCounter:
    """Counts the DP-SGD steps a client executes; :meth:`count` is the optimizer's step hook
    (called once per executed noised step, as Opacus's optimizer step hook)."""

    def __init__(self) -> None:
        self.executed = 0

    def count(self) -> None:
        """One more DP-SGD step executed."""
        self.executed += 1

    def reset(self) -> None:
        """Start counting a new admitted release."""
        self.executed = 0


class CheckExecutedSteps(AfterGate):
    """Before a DP-SGD model leaves: the steps the client executed (``counter``) must equal
    the steps the gate's ledger entries for this release account (read back from the ledger,
    ``mechanism`` entries of the release's round).

    On a mismatch (or a release the gate never admitted) the release is refused in the ledger
    (a refusal entry with the epsilon the executed steps would reach; the gate closes) and
    :class:`StepCountMismatchError` is raised, naming the client, both counts and the round.
    ``noise_multiplier``/``sample_rate`` are the client's DP-SGD parameters (to state the
    epsilon of steps executed beyond the accounted ones).
    """

    def __init__(self, gate: BudgetGate, counter: StepCounter, noise_multiplier: float,
                 sample_rate: float, mechanism: str = "dpsgd") -> None:
        if not isinstance(gate, BudgetGate):
            raise PipelineError(f"CheckExecutedSteps needs a BudgetGate, got {type(gate).__name__}")
        self.gate = gate
        self.counter = counter
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.mechanism = mechanism

    def accounted_steps(self, release: Release) -> int | None:
        """The steps the ledger entries of ``release`` account (None: the gate did not admit it)."""
        if "ledger_index" not in release.metadata:
            return None
        entries = _release_entries(self.gate.ledger, release)
        return sum(int(e["params"]["steps"]) for e in entries
                   if e["mechanism"] == self.mechanism and e["round"] == release.round)

    def process(self, release: Release) -> Release:
        """The release unchanged when the counts agree; otherwise refusal + error. A resumed
        run whose ledger already refuses this release raises that refusal again."""
        replayed = self.gate.replay_refusal(release)
        if replayed is not None:
            raise StepCountMismatchError(f"{replayed.reason} (recorded before the restart)",
                                         replayed)
        recorded = self.accounted_steps(release)
        executed = self.counter.executed
        if recorded is not None and executed == recorded:
            return release
        client_id, rnd = self.gate.client_id, release.round
        reason = (f"step count mismatch: client {client_id!r} executed {executed} DP-SGD"
                  f" steps in round {rnd}, its ledger accounted {recorded}")
        accountant, delta = self.gate.accountant, self.gate.budget.delta
        eps = accountant.epsilon(delta) if accountant.history else 0.0
        extra = executed - (recorded or 0)
        if extra > 0:
            eps = accountant.epsilon_after(delta, self.noise_multiplier, self.sample_rate, extra)
        try:
            self.gate.refuse(Release(release.kind, torch.empty(0), rnd), eps, reason)
        except BudgetExceededError as refusal:
            raise StepCountMismatchError(reason, refusal) from refusal
        raise StepCountMismatchError(reason)  # refuse() always raises; kept for type checkers


class SignEnvelope(AfterGate):
    """The last stage where envelopes are on: ``sign(release) -> bytes`` wraps the payload in
    the client's signed envelope (e.g. the signer of a
    :class:`secure_fedora.secure.transport.SecureTransport` upload), which becomes the
    payload; ``metadata["signed"]`` is True. The records are unchanged. In a pipeline
    without a gate (a release no accountant covers) it may be the only stage."""

    needs_gate = False

    def __init__(self, sign: Callable[[Release], bytes]) -> None:
        if not callable(sign):
            raise PipelineError("SignEnvelope: sign must be callable")
        self.sign = sign

    def process(self, release: Release) -> Release:
        """The release with its signed message as the payload."""
        message = self.sign(release)
        if not isinstance(message, bytes):
            raise PipelineError(f"SignEnvelope: sign returned {type(message).__name__}, not bytes")
        return release.replace(payload=message, metadata={**release.metadata, "signed": True})


def upload_stages(encrypt: EncryptPayload | None,
                  sign: Callable[[Release], bytes] | None) -> list[Postprocessor]:
    """The stages that let a release leave its client, in order: the encryption (if any),
    then the envelope signature (if envelopes are on)."""
    return [*([encrypt] if encrypt is not None else []),
            *([SignEnvelope(sign)] if sign is not None else [])]


def _may_follow_gate(stage: object) -> bool:
    """Whether ``stage`` may stand after the gate: an :class:`AfterGate` stage, or a
    post-processing stage that declares ``may_follow_gate`` (:class:`EncryptPayload`)."""
    return isinstance(stage, AfterGate) or bool(getattr(stage, "may_follow_gate", False))


class ReleasePipeline:
    """Runs stages in order. With ``require_gate`` (default) exactly one stage is a
    BudgetGate and every stage after it is an :class:`AfterGate` stage (journal, step check,
    signature), so nothing can leave through this pipeline unaccounted: the gate is the last
    stage that may change what a release accounts. Without ``require_gate`` (a release
    accounted elsewhere, or no release at all) the same order holds for any gate present.
    """

    def __init__(self, stages: Sequence[Postprocessor], *, require_gate: bool = True) -> None:
        stages = list(stages)
        for i, stage in enumerate(stages):
            if not callable(getattr(stage, "process", None)):
                raise PipelineError(f"stage {i} ({type(stage).__name__}) has no process() method")
        gates = [i for i, s in enumerate(stages) if isinstance(s, BudgetGate)]
        gate = gates[0] if len(gates) == 1 else None
        misplaced = [f"{i} ({type(s).__name__})" for i, s in enumerate(stages)
                     if gate is not None and i > gate and not _may_follow_gate(s)]
        ungated = not gates and not require_gate
        early = [f"{i} ({type(s).__name__})" for i, s in enumerate(stages)
                 if isinstance(s, AfterGate) and (gate is None or i < gate)
                 and not (ungated and not s.needs_gate)]
        if (require_gate and gate is None) or len(gates) > 1 or misplaced or early:
            raise PipelineError(
                "the BudgetGate must be the last stage that changes a release: one gate, and"
                " only after-gate stages (journal, step check, signature) after it"
                f" (gates at positions {gates} of {len(stages)}; other stages after the gate:"
                f" {misplaced}; after-gate stages without a gate before them: {early})"
            )
        self.stages = stages
        self.gate_position = gate

    def index(self, stage_type: type) -> int:
        """Position of the first stage of ``stage_type`` (PipelineError if there is none)."""
        for i, stage in enumerate(self.stages):
            if isinstance(stage, stage_type):
                return i
        raise PipelineError(f"the pipeline has no {stage_type.__name__} stage")

    def run(self, release: Release, *, start: int = 0, stop: int | None = None) -> Release:
        """The release after stages ``start`` to ``stop`` (default: all); exceptions from a
        stage propagate (nothing returned). Every after-gate stage of the call checks the
        release first (:meth:`AfterGate.precheck`), so such a refusal comes before any stage
        ran. Starting after the gate needs a release the gate passed; an after-gate stage
        that changes the records is an error."""
        if not isinstance(release, Release):
            raise PipelineError(f"run() needs a Release, got {type(release).__name__}")
        if (self.gate_position is not None and start > self.gate_position
                and "ledger_index" not in release.metadata):
            raise PipelineError(
                f"release {release.kind!r} (round {release.round}) did not pass this"
                f" pipeline's gate; stages after it cannot run on it")
        end = len(self.stages) if stop is None else stop
        for stage in self.stages[start:end]:  # refusals that need no stage to have run
            if isinstance(stage, AfterGate):
                stage.precheck(release)
        for position in range(start, end):
            stage = self.stages[position]
            out = stage.process(release)
            if not isinstance(out, Release):
                raise PipelineError(f"stage {type(stage).__name__} returned"
                                    f" {type(out).__name__}, not a Release")
            if (out.kind, out.round) != (release.kind, release.round):
                raise PipelineError(f"stage {type(stage).__name__} changed the release's kind"
                                    f" or round ({release.kind!r}, {release.round} to"
                                    f" {out.kind!r}, {out.round})")
            after_gate = self.gate_position is not None and position > self.gate_position
            if (isinstance(stage, AfterGate) or after_gate) and out.records != release.records:
                raise PipelineError(f"after-gate stage {type(stage).__name__} changed the"
                                    " release's records (only the gate's ledger accounts them)")
            release = out
        return release

    __call__ = run
