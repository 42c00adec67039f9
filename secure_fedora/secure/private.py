"""Client-side privacy for the federation: DP-SGD, budgets, noised releases, the ledger.

Every data-dependent release of a client goes through a :class:`privacy.pipeline.ReleasePipeline`
of that client, built from small stages in the order clip -> noise -> (encrypt) -> gate + ledger
(accountant + budget + write-ahead ledger) -> journal (exactly-once record) -> step check ->
(encrypt) -> sign; :meth:`FederationPrivacy.release_stages` lists them per release kind. Every
upload of a client leaves through :meth:`FederationPrivacy.release_upload`, the rest of the
pipeline of the release that accounts it (the transport of either runtime calls it, and its
SignEnvelope stage produces the upload's signature), so nothing is signed before it is
accounted and journaled:

- the model ``theta_i`` every round it participates (every method's upload): DP-SGD (Poisson
  sampling at rate q, per-sample clipping, Gaussian noise) for the round's ``ceil(E / q)``
  steps. The optimizer clips and noises each step; the gate is passed *before* local training
  starts (the step count is fixed in advance), so the ledger entry and the journal record are
  on disk before the trained model can be sent; every executed step is counted by the
  oracle's step hook, and the pipeline's step check compares the count with the ledger
  before the model leaves (:meth:`FederationPrivacy.confirm_steps`);
- the relatedness summary, once (noised mode): Gaussian mechanism on the clipped second moment;
- with ``data.validation = "private"``, each round's ``lambda_i``: a clipped, noised mean of the
  per-example validation-loss differences (it shapes ``theta_i``, which is released); it is
  accounted with the round's model release, and its pipeline ends by matching its record to
  that release's ledger entry.

A client whose release would exceed its budget is refused (ledger entry + error); it keeps its
personalized model and releases nothing more. The federation goes on with the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from privacy.accounting import (
    Accountant,
    AccountingError,
    AccountingSizeError,
    BudgetExceededError,
    CalibrationError,
    FixedEntriesOverTargetError,
    MechanismRecord,
    PlannedRelease,
    PrivacyBudget,
    UnreachableTargetError,
    calibrate_noise_multiplier,
    format_exact,
    format_spent,
    plan_epsilon,
    round_up,
    size_error_remedy,
)
from privacy.durable import SyncBatch, ensure_descriptors, fsync_dir, write_all_and_fsync
from privacy.identity import client_ids, load_identity
from privacy.journal import (
    ADMITTING_NAME,
    MARKS_FORMAT,
    MARKS_NAME,
    JournalError,
    JournalRecord,
    ReleaseJournal,
    RoundMarks,
    marks_header,
    marks_written,
    payload_digest,
)
from privacy.ledger import (
    CLOSE,
    GENESIS_HASH,
    NON_RELEASES,
    REFUSAL,
    REPAIR,
    LedgerError,
    LedgerWriter,
    TornTailRepair,
    canonical_json,
    entries_hold,
    line_hash,
    read_complete_entries,
    refuse_cut_tail,
    repair_torn_tail,
    replay_accountant,
    restore_cut_tail,
    verify_ledger,
)
from privacy.mechanisms import clip_rows, scalar_record
from privacy.noise import (
    REPRODUCIBLE_WARNING,
    CsprngNoise,
    NoiseSource,
    ReproducibleNoise,
    make_noise_source,
)
from privacy.pipeline import (
    NOISE_STATE,
    AccountedWith,
    AfterGate,
    BudgetGate,
    CheckExecutedSteps,
    EncryptPayload,
    GaussianNoise,
    JournalRelease,
    PipelineError,
    RecordParams,
    Release,
    ReleasePipeline,
    StepCounter,
    StepCountMismatchError,
    noised_mean_stages,
    second_moment_stages,
    upload_stages,
)
from secure_fedora.algorithms import fedora
from secure_fedora.algorithms.contract import plug_in_round_mechanisms, plug_in_setup_mechanism
from secure_fedora.algorithms.messages import KIND_RELATEDNESS_UPLOAD, KIND_SUMMARY
from secure_fedora.core.config import (
    ConfigError,
    ExperimentConfig,
    participants_per_round,
    pull_stability_limit,
    toml_key,
)
from secure_fedora.core.crashpoints import crash_point
from secure_fedora.core.files import atomic_write_bytes
from secure_fedora.data.partition import ClientData
from secure_fedora.learning.client import DIVERGED_HINT, ClientUpdateError
from secure_fedora.learning.dp import DPGradient, check_per_sample_gradients  # noqa: F401 (re-exported)
from secure_fedora.learning.tasks import CROSS_ENTROPY

__all__ = ["EPSILON_FIGURES", "ClientPrivacy", "DPGradient", "FederationPrivacy", "StepCountMismatchError",
           "UndeclaredReleaseError", "check_mechanism_tables", "plug_in_mechanism",
           "check_ledgers_present", "client_noise_sources", "create_ledger_dir",
           "create_ledgers_in", "interrupted_ledger_creations",
           "lambda_pull_risk", "noise_assumptions", "planned_release_counts", "pull_warning",
           "privacy_plan"]

log = logging.getLogger("secure_fedora.privacy")

#: A method's ledger folder is built in the hidden sibling ``.<method>.creating-<8 hex>``.
LEDGER_CREATING_INFIX = ".creating-"
_CREATING_SUFFIX = re.compile(r"[0-9a-f]{8}")


def interrupted_ledger_creations(ledger_root: Path, method: str | None = None) -> list[Path]:
    """The hidden folders under ``ledger_root`` that :func:`create_ledger_dir` of ``method``
    (or of any method) left when killed before its rename: ``.<method>.creating-<8 hex>``
    holding nothing but empty ``*.jsonl`` files and other files it was given (no ledger entry,
    no journal: a folder holding anything else is not listed). Reads only."""
    if not ledger_root.is_dir():
        return []
    found = []
    for path in sorted(ledger_root.iterdir()):
        name, infix, suffix = path.name.rpartition(LEDGER_CREATING_INFIX)
        if not (infix and name.startswith(".") and _CREATING_SUFFIX.fullmatch(suffix)
                and (method is None or name == f".{method}")) \
                or path.is_symlink() or not path.is_dir():
            continue
        held = list(path.iterdir())
        if all(p.is_file() and not p.is_symlink() and not p.name.endswith(".journal")
               and (p.suffix != ".jsonl" or p.stat().st_size == 0) for p in held):
            found.append(path)
    return found


def _create_empty_ledgers(folder: Path, ids: Sequence[str], *, keep: bool = False) -> None:
    """One empty ledger per client of ``ids`` in ``folder`` (0600, fsynced); ``keep``: one
    already there is kept as it is (else it is an error)."""
    flags = os.O_WRONLY | os.O_CREAT | (0 if keep else os.O_EXCL)
    for cid in ids:
        fd = os.open(folder / f"{cid}.jsonl", flags, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        crash_point("ledger_staged")
    fsync_dir(folder)


def create_ledger_dir(ledger_dir: Path, ids: Sequence[str],
                      with_files: Mapping[str, bytes] | None = None) -> None:
    """Create ``ledger_dir`` holding one empty ledger per client of ``ids`` (0600, fsynced)
    and ``with_files`` (name: bytes), all at once: the folder is built in a hidden sibling
    and renamed into place. A process killed meanwhile leaves no ``ledger_dir`` and a sibling
    holding no entry (removed here by the next creation of that folder), so an existing
    ledger folder always held every client's ledger: one missing from it was lost."""
    parent = ledger_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in interrupted_ledger_creations(parent, ledger_dir.name):
        shutil.rmtree(leftover)
        log.warning("removed %s, a creation of ledgers that was interrupted (empty ledgers)",
                    leftover)
    staging = parent / f".{ledger_dir.name}{LEDGER_CREATING_INFIX}{secrets.token_hex(4)}"
    staging.mkdir()
    for name, data in (with_files or {}).items():
        fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all_and_fsync(fd, data)
        finally:
            os.close(fd)
    _create_empty_ledgers(staging, ids)
    try:
        os.rename(staging, ledger_dir)
    except OSError as err:  # created meanwhile (another process): it keeps its own
        shutil.rmtree(staging, ignore_errors=True)
        raise LedgerError(f"cannot create the ledger folder {str(ledger_dir)!r}: {err}") from err
    fsync_dir(parent)
    crash_point("ledgers_created")


def create_ledgers_in(folder: Path, ids: Sequence[str], record: tuple[str, bytes]) -> None:
    """:func:`create_ledger_dir` for a ``folder`` that exists before its ledgers (a Flower
    node's method folder holds its envelope nonces first), so it cannot be renamed into
    place: one empty ledger per client of ``ids`` (0600, fsynced; one already there, left by
    a creation killed before its record, is kept as it is), then ``record`` (name, bytes),
    written atomically and last. A process killed meanwhile leaves no record and only
    ledgers a later call keeps, so once the record exists every client's ledger did: one
    missing was lost (:func:`check_ledgers_present`)."""
    folder.mkdir(parents=True, exist_ok=True)
    _create_empty_ledgers(folder, ids, keep=True)
    name, data = record
    atomic_write_bytes(folder / name, data)
    crash_point("ledgers_created")


def check_ledgers_present(ledger_dir: Path, ids: Sequence[str]) -> None:
    """Raise LedgerError naming the clients of ``ids`` whose ledger the existing, created
    ledger folder ``ledger_dir`` lacks: its ledgers were created together, so these were lost
    (recreating them empty would account fewer releases than were made). Reads only."""
    lost = [cid for cid in ids if not (ledger_dir / f"{cid}.jsonl").is_file()]
    if lost:
        shown = ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
        raise LedgerError(
            f"ledger folder {str(ledger_dir)!r} lacks the ledgers of {shown}: its ledgers are"
            " created together, so these were lost; restore them from a copy, or start a new"
            " run; nothing was written")


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
    accountant: str = ""  # the accountant the noise was calibrated under
    #: False: calibrated under PRV without its refining pass, for a run ledgered without it
    prv_refine: bool = True
    #: The noise of each plug-in Gaussian mechanism the plan holds (``[privacy.mechanisms]``),
    #: as ``(name, noise multiplier)`` pairs in declaration order.
    mechanism_noise: tuple[tuple[str, float], ...] = ()

    def noise_for(self, mechanism: str) -> float | None:
        """The planned noise multiplier of ``mechanism`` (a built-in or plug-in Gaussian
        mechanism, or ``"dpsgd"``); None when the plan holds no release of it."""
        if mechanism == "dpsgd":
            return self.dpsgd_noise
        if mechanism in FIXED_NOISE_MECHANISMS:
            return getattr(self, FIXED_NOISE_MECHANISMS[mechanism][2])
        return dict(self.mechanism_noise).get(mechanism)


class BudgetPlanError(ConfigError):
    """The planned releases of some clients cannot fit their budgets; nothing was trained.

    ``clients`` names every such client; the message says which budget, which plan and which
    key to change.
    """

    def __init__(self, message: str, clients: Sequence[str]) -> None:
        self.clients = list(clients)
        super().__init__(message)


def _calibrate(target: float, delta: float, plan: list[PlannedRelease], accountant: str,
               what: str, prv_refine: bool = True, fixed_by: Sequence[str] = (),
               share: tuple[str, float, float] | None = None,
               calibrated: Sequence[str] = (), to_set: Sequence[str] = ()) -> float:
    """The calibrated noise multiplier of ``what``; ConfigError naming it when none fits, and
    ``fixed_by`` (the fixed noise multipliers of the plan's other entries, ``"<key> <value>"``)
    when those entries alone already spend ``target``, with ``calibrated`` (the budget
    fractions of the calibrated ones, which lowering helps) beside them and ``to_set`` (the
    budget fraction keys, without a default, that calibrating a fixed one needs). ``share``
    (fraction key, fraction, budget epsilon) says where a target that is a share of the budget
    comes from."""
    source = "" if share is None else \
        f" ({share[0]} {format_exact(share[1])} of epsilon {format_exact(share[2])})"
    if not target > 0:  # a budget so small that its share rounds to 0.0 in floating point
        raise ConfigError(f"privacy: cannot calibrate {what}: its epsilon{source} is "
                          f"{target!r} in floating point; raise the budget")
    try:
        return calibrate_noise_multiplier(target, delta, plan, accountant, prv_refine=prv_refine)
    except CalibrationError as err:
        hint = ""
        if isinstance(err, FixedEntriesOverTargetError) and fixed_by:
            them = "it" if len(fixed_by) == 1 else "them"
            lower = "".join(f"lower {k}, " for k in calibrated)
            setting = f" and set {', '.join(to_set)}" if to_set else ""
            hint = (f" (set by {', '.join(fixed_by)}; raise {them}, unset {them}{setting} to"
                    f" calibrate, {lower}or raise the budget)")
        elif isinstance(err, UnreachableTargetError):
            hint = "; raise the budget" + (f" or {share[0]}" if share else "")
        raise ConfigError(f"privacy: cannot calibrate {what} for epsilon"
                          f" {format_exact(target)}{source} (accountant {accountant!r}):"
                          f" {err}{hint}") from None


#: Mechanisms with a fixed noise multiplier (calibrated to a fraction of the budget when
#: unset) that a method's releases may declare besides DP-SGD: the config keys of their noise
#: multiplier and budget fraction, and the ClientPlan field that carries the noise.
# Which declared mechanisms are plug-ins: pure functions of the release's mechanism names,
# kept in the contract (the layer below) so that its reply rules can read them too.
_plug_in_round_mechanisms = plug_in_round_mechanisms
_plug_in_setup_mechanism = plug_in_setup_mechanism

FIXED_NOISE_MECHANISMS: dict[str, tuple[str, str, str]] = {
    "gaussian_summary": ("summary_noise_multiplier", "summary_budget_fraction", "summary_noise"),
    "gaussian_lambda": ("lambda_noise_multiplier", "lambda_budget_fraction", "lambda_noise"),
}


#: The releases the runtimes can admit and record, by when: every round one "model" release
#: of DP-SGD, optionally with the noised lambda (admitted before training); once at setup,
#: at most one "summary" release of the Gaussian second-moment mechanism (the method makes it
#: through ``ctx.privacy.noised_summaries`` / ``noised_summary``, which admit and record it).
#: Beside these: plug-in Gaussian mechanisms after DP-SGD in the round release, or alone in
#: the one setup release (:func:`_plug_in_setup_mechanism`).
ADMITTED_RELEASES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "round": (("model", ("dpsgd",)), ("model", ("dpsgd", "gaussian_lambda"))),
    "setup": (("summary", ("gaussian_summary",)),),
}


class UndeclaredReleaseError(PipelineError):
    """A method's client code asked for a generic Gaussian release
    (:meth:`FederationPrivacy.gaussian`) of a mechanism its round release does not declare,
    or outside an admitted round; nothing was drawn or released."""


def plug_in_mechanism(mechanism: str) -> Any:
    """The :class:`~privacy.mechanisms.MechanismSpec` of plug-in Gaussian mechanism
    ``mechanism`` (registered, with a sensitivity formula and ``record_params``); ConfigError
    naming what is missing otherwise."""
    from privacy.mechanisms import MECHANISMS

    if mechanism not in MECHANISMS:
        raise ConfigError(
            f"privacy: mechanism {mechanism!r} is not registered; register a "
            "privacy.mechanisms.MechanismSpec in privacy.mechanisms.MECHANISMS (from the "
            f"plug-in module that defines it; registered: {list(MECHANISMS.names())})")
    spec = MECHANISMS.get(mechanism)
    if spec.sensitivity is None or spec.record_params is None:
        raise ConfigError(
            f"privacy: mechanism {mechanism!r} cannot be planned: its MechanismSpec needs a "
            "sensitivity formula and record_params (how its record params follow from the "
            "config)")
    return spec


#: The ``(tables, methods)`` whose undeclared ``[privacy.mechanisms]`` tables were warned of.
_WARNED_UNUSED_TABLES: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()


def check_mechanism_tables(cfg: ExperimentConfig) -> None:
    """Each ``[privacy.mechanisms.<name>]`` table of a DP run names a registered plug-in
    Gaussian mechanism: ConfigError otherwise (a misspelt name would leave the noise it was
    meant to set at its defaults, silently). A table no method of the run declares sets
    nothing: warned of (once per config), not refused."""
    from privacy.mechanisms import MECHANISMS

    tables = sorted(cfg.privacy.mechanisms)
    if not tables:
        return
    for name in tables:
        if name == "dpsgd":
            raise ConfigError("privacy: [privacy.mechanisms.dpsgd] sets nothing: DP-SGD's noise "
                              "is privacy.noise_multiplier (unset: calibrated); remove the table")
        if name not in MECHANISMS:
            known = [n for n in MECHANISMS.names() if n != "dpsgd"]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"privacy: [privacy.mechanisms.{toml_key(name)}] names no registered mechanism{hint}, so "
                f"it would set nothing; registered: {known}. Fix the name, import the plug-in "
                "module that registers it, or remove the table")
        plug_in_mechanism(name)  # registered, but not one the plan can calibrate
    declared: set[str] = set()
    for method in cfg.methods:
        try:
            declared.update(declared_plug_ins(method, cfg))
        except ValueError as err:  # a factory naming no class: refused as its own plan is
            raise ConfigError(f"privacy: {err}") from None
    unused = tuple(n for n in tables if n not in declared)
    key = (unused, tuple(cfg.methods))
    if unused and key not in _WARNED_UNUSED_TABLES:
        _WARNED_UNUSED_TABLES.add(key)
        log.warning("privacy: no method of this run (%s) declares %s, so [privacy.mechanisms] "
                    "sets nothing for %s", ", ".join(cfg.methods),
                    " or ".join(repr(n) for n in unused), "it" if len(unused) == 1 else "them")


#: Release kinds of the built-in releases, which a plug-in setup release may not take.
BUILT_IN_RELEASE_KINDS: frozenset[str] = frozenset({"model", "summary", "lambda"})


def round_plug_ins(method: str, cfg: ExperimentConfig) -> tuple[str, ...]:
    """The plug-in Gaussian mechanisms registered method ``method``'s round model release
    declares under ``cfg`` (after DP-SGD and the lambda), in ledger order: each admitted with
    the round's model release and released by :meth:`FederationPrivacy.gaussian`. A factory
    naming no class raises ``ValueError`` (as :func:`method_releases` does)."""
    from secure_fedora.algorithms.contract import round_mechanisms

    return _plug_in_round_mechanisms(round_mechanisms(method, cfg)) or ()


def setup_plug_ins(method: str, cfg: ExperimentConfig) -> tuple[tuple[str, str], ...]:
    """``(release kind, mechanism)`` of the setup release of one plug-in Gaussian mechanism
    registered method ``method`` declares under ``cfg`` (at most one: :func:`admitted_releases`
    refuses more), admitted and released by :meth:`FederationPrivacy.gaussian` in
    ``client_setup``. A factory naming no class raises ``ValueError``."""
    from secure_fedora.algorithms.contract import SETUP, method_releases

    return tuple((spec.kind, mechanism) for spec in method_releases(method, cfg)
                 if spec.when == SETUP
                 and (mechanism := _plug_in_setup_mechanism(spec.mechanisms)) is not None)


def declared_plug_ins(method: str, cfg: ExperimentConfig) -> tuple[str, ...]:
    """Every plug-in Gaussian mechanism registered method ``method`` declares under ``cfg``:
    its setup release's (:func:`setup_plug_ins`), then its round release's
    (:func:`round_plug_ins`), for the table check and the budget check. A factory naming no
    class raises ``ValueError`` (as :func:`method_releases` does)."""
    return (*(m for _, m in setup_plug_ins(method, cfg)), *round_plug_ins(method, cfg))


def _same_bits(value: object, released: object) -> bool:
    """Whether ``value`` holds exactly ``released``'s elements in order: the same dtype, the
    same number of elements, the same bits (``-0.0`` is not ``0.0``); a reshape is the same."""
    if not (isinstance(value, Tensor) and isinstance(released, Tensor)
            and value.dtype == released.dtype and value.numel() == released.numel()):
        return False
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(value.element_size(), torch.uint8)
    a = value.detach().to("cpu").reshape(-1).contiguous().view(bits)
    return torch.equal(a, released.detach().to("cpu").reshape(-1).contiguous().view(bits))


def _check_plug_in_value(what: str, value: object) -> None:
    """MechanismError naming ``what`` unless ``value`` is a finite float32 or float64 tensor
    holding values (not on the meta device), before any noise is drawn for it."""
    from privacy.mechanisms import MechanismError, _check_float_tensor

    try:
        if isinstance(value, Tensor) and value.is_meta:
            raise MechanismError("value is a meta tensor, which holds no values")
        _check_float_tensor("value", value)
        if value.dtype not in (torch.float32, torch.float64):
            # noise added in a 16-bit float is rounded to a coarse grid whose spacing follows
            # the value: the rounding can reveal the value beside the noise
            raise MechanismError(f"value is {value.dtype}; a release is noised in float32 or "
                                 "float64 (convert it with .float())")
    except MechanismError as err:
        raise MechanismError(f"{what}: {err} (pass the finite floating-point tensor the "
                             "mechanism's sensitivity bounds); nothing was released") from None


def _round_record_params(cfg: ExperimentConfig, mechanism: str) -> dict[str, Any]:
    """The record params of one release of plug-in ``mechanism`` under ``cfg`` (from its
    ``record_params``); ConfigError when they do not give a finite sensitivity > 0, or when
    ``record_params`` (the plug-in's code) raises, naming where."""
    from privacy.mechanisms import MECHANISMS, MechanismError
    from secure_fedora.core.plugins import raised_at

    spec = plug_in_mechanism(mechanism)
    try:
        params = dict(spec.record_params(cfg))
    except Exception as err:  # user code: report whatever it raised
        raise ConfigError(f"privacy: mechanism {mechanism!r}: its record_params raised "
                          f"{type(err).__name__}: {err}{raised_at(err)}") from err
    try:
        MECHANISMS.gaussian_record(mechanism, 1.0, params)
    except (MechanismError, AccountingError) as err:
        raise ConfigError(f"privacy: mechanism {mechanism!r}: its record params: {err}; fix its "
                          "MechanismSpec's sensitivity formula or record_params (the L2 change "
                          "of the value when one record is added or removed, > 0)") from None
    return params


def admitted_releases(cfg: ExperimentConfig, method: str) -> tuple[Any, ...]:
    """Method ``method``'s declared releases (``releases(cfg)``), checked against what the
    runtimes admit and record (:data:`ADMITTED_RELEASES`): exactly one round release, at most
    one setup release. A declaration outside them raises :class:`ConfigError` naming the
    method and the release, before anything is planned or trained: planning a release the
    runtime would not record (or recording one that was not planned) would make the plan and
    the ledgers disagree."""
    from secure_fedora.algorithms.contract import ROUND, SETUP, method_releases

    try:
        specs = method_releases(method, cfg)
    except ValueError as err:
        raise ConfigError(f"privacy: {err}") from None
    allowed = "; ".join(f"{when}: " + ", ".join(f"{kind} {list(m)}" for kind, m in shapes)
                        for when, shapes in ADMITTED_RELEASES.items())
    for spec in specs:
        plug_ins = (_plug_in_round_mechanisms(spec.mechanisms)
                    if (spec.when, spec.kind) == (ROUND, "model") else None)
        if spec.when == SETUP and (spec.kind, tuple(spec.mechanisms)) \
                not in ADMITTED_RELEASES[SETUP]:
            setup = _plug_in_setup_mechanism(spec.mechanisms)
            plug_ins = (setup,) if setup is not None else None
            if setup is not None and spec.kind in BUILT_IN_RELEASE_KINDS:
                raise ConfigError(
                    f"privacy: method {method!r} declares a setup release {spec.kind!r} of "
                    f"[{setup!r}]: {spec.kind!r} is a built-in release's kind (its journal "
                    "record and upload would be taken for that release's); name the release "
                    f"after what it holds, e.g. ReleaseSpec({setup!r}, ({setup!r},), SETUP)")
            if setup is not None and spec.encrypted:
                raise ConfigError(
                    f"privacy: method {method!r} declares its setup release {spec.kind!r} of "
                    f"[{setup!r}] encrypted, but the runtimes send a plug-in's setup release as "
                    "a plain reply entry (its noise protects it); declare it with "
                    "encrypted=False")
        if plug_ins:
            for mechanism in plug_ins:
                try:
                    plug_in_mechanism(mechanism)
                except ConfigError as err:
                    raise ConfigError(
                        f"privacy: method {method!r} declares a {spec.when} release "
                        f"{spec.kind!r} of {list(spec.mechanisms)}, which the runtimes cannot "
                        f"admit and record: {str(err).removeprefix('privacy: ')}") from None
            continue
        if (spec.kind, tuple(spec.mechanisms)) not in ADMITTED_RELEASES[spec.when]:
            raise ConfigError(
                f"privacy: method {method!r} declares a {spec.when} release {spec.kind!r} of "
                f"{list(spec.mechanisms)}, which the runtimes cannot admit and record (they "
                f"do: {allowed}, a round model release of dpsgd followed by registered "
                "plug-in Gaussian mechanisms, and a setup release of one registered plug-in "
                "Gaussian mechanism); declare one of those or run the method without DP")
    rounds = [s for s in specs if s.when == ROUND]
    setups = [s for s in specs if s.when == SETUP]
    if len(rounds) != 1 or len(setups) > 1:
        raise ConfigError(
            f"privacy: method {method!r} declares {len(rounds)} round release(s) and "
            f"{len(setups)} setup release(s); the runtimes admit exactly one round release "
            "(the DP-SGD model) and at most one setup release (the noised summary or one "
            "plug-in Gaussian mechanism)")
    both = [m for m in (_plug_in_setup_mechanism(setups[0].mechanisms) if setups else None,)
            if m is not None and m in (_plug_in_round_mechanisms(rounds[0].mechanisms) or ())]
    if both:
        raise ConfigError(
            f"privacy: method {method!r} declares mechanism {both[0]!r} in its setup release "
            "and in its round release; ctx.privacy.gaussian could not tell which release a "
            "call makes. Declare it in one of them, or register a second mechanism name")
    return specs


def planned_release_counts(cfg: ExperimentConfig, method: str) -> dict[str, int]:
    """Per mechanism, what one client's plan of registered method ``method`` holds over the
    run: its DP-SGD steps (``"dpsgd"``) and how many times each fixed-noise mechanism is
    released (the steps of :func:`_plan_for`'s releases; the same for every budget, and no
    noise is calibrated). A client that ran every round releases no more than this unless a
    release was redone (and accounted again)."""
    from secure_fedora.algorithms.contract import SETUP

    counts: dict[str, int] = {}
    for spec in admitted_releases(cfg, method):
        times = 1 if spec.when == SETUP else cfg.training.rounds
        for mechanism in spec.mechanisms:
            each = steps_per_round(cfg) if mechanism == "dpsgd" else 1
            counts[mechanism] = counts.get(mechanism, 0) + times * each
    return counts


def _plan_for(cfg: ExperimentConfig, method: str, budget: PrivacyBudget,
              accountant: str, prv_refine: bool = True) -> ClientPlan:
    """The plan of registered method ``method``, built from its declared releases
    (``releases(cfg)`` of its class): DP-SGD steps per release (setup: one local run; round:
    every round), each fixed-noise mechanism once (setup) or every round, in declaration order."""
    from secure_fedora.algorithms.contract import SETUP

    p = cfg.privacy
    rounds = cfg.training.rounds
    eps, delta = budget.epsilon, budget.delta
    specs = admitted_releases(cfg, method)
    fixed: list[PlannedRelease] = []
    noise: dict[str, float] = {}
    shares: dict[str, float] = {}
    fixed_by: list[str] = []  # the fixed multipliers behind ``fixed``
    to_set: list[str] = []  # a fixed plug-in's fraction key: its table has no default one
    dpsgd_steps = 0
    for spec in specs:
        times = 1 if spec.when == SETUP else rounds
        for mechanism in spec.mechanisms:
            if mechanism == "dpsgd":
                dpsgd_steps += times * steps_per_round(cfg)
                continue
            fixed_noise, fraction, noise_key, fraction_key = _noise_keys(cfg, method, mechanism)
            sigma = fixed_noise or _calibrate(
                fraction * eps, delta, [PlannedRelease(mechanism, 1.0, times)],
                accountant, noise_key, prv_refine, share=(fraction_key, fraction, eps))
            noise[mechanism] = sigma
            fixed.append(PlannedRelease(mechanism, 1.0, times, sigma))
            if fixed_noise is None:
                shares[fraction_key] = fraction
            else:
                fixed_by.append(f"{noise_key} {format_exact(fixed_noise)}")
                if mechanism not in FIXED_NOISE_MECHANISMS:
                    to_set.append(fraction_key)
    if p.noise_multiplier is None and shares and sum(shares.values()) >= 1.0:
        named = " + ".join(f"{k} ({format_exact(v)})" for k, v in sorted(shares.items()))
        raise ConfigError(f"privacy: {named} leave DP-SGD no share of the budget; their sum "
                          "must be below 1")
    dpsgd = PlannedRelease("dpsgd", sample_rate_for(cfg), dpsgd_steps)
    plan = [dpsgd, *fixed]
    dpsgd_noise = p.noise_multiplier or _calibrate(
        eps, delta, plan, accountant, "privacy.noise_multiplier (DP-SGD)", prv_refine, fixed_by,
        calibrated=[f"{k} {format_exact(v)}" for k, v in sorted(shares.items())], to_set=to_set)
    plug_ins = tuple((m, sigma) for m, sigma in noise.items() if m not in FIXED_NOISE_MECHANISMS)
    return ClientPlan(dpsgd_noise, noise.get("gaussian_summary"), noise.get("gaussian_lambda"),
                      tuple(plan), accountant, prv_refine, plug_ins)


def _noise_keys(cfg: ExperimentConfig, method: str, mechanism: str
                ) -> tuple[float | None, float, str, str]:
    """Where ``mechanism``'s noise comes from: its fixed multiplier (None: calibrate), its
    budget fraction, and the config keys of both (as messages name them). A built-in reads
    its flat ``privacy.*`` keys; a plug-in its ``[privacy.mechanisms.<name>]`` table, which
    must set one of them (ConfigError naming the table otherwise)."""
    p = cfg.privacy
    if mechanism in FIXED_NOISE_MECHANISMS:
        noise_key, fraction_key, _ = FIXED_NOISE_MECHANISMS[mechanism]
        return (getattr(p, noise_key), getattr(p, fraction_key), f"privacy.{noise_key}",
                f"privacy.{fraction_key}")
    plug_in_mechanism(mechanism)
    table = p.mechanisms.get(mechanism)
    where = f"privacy.mechanisms.{toml_key(mechanism)}"
    if table is None or (table.noise_multiplier is None and table.budget_fraction is None):
        raise ConfigError(
            f"privacy: method {method!r} declares mechanism {mechanism!r}, whose noise is not "
            f"configured: set [{where}] noise_multiplier = ... (fixed) or budget_fraction = "
            "... (the share of each client's epsilon it may spend; calibrated)")
    return (table.noise_multiplier, table.budget_fraction or 0.0, f"{where}.noise_multiplier",
            f"{where}.budget_fraction")


def _fixed_noise_advice(cfg: ExperimentConfig, method: str, releases: Sequence[PlannedRelease],
                        budget: PrivacyBudget, accountant: str, prv_refine: bool
                        ) -> tuple[str, str]:
    """The fixed noise multipliers of ``method``'s plan ``releases`` besides DP-SGD's
    (built-in ``privacy.summary_noise_multiplier`` / ``lambda_noise_multiplier``, a plug-in's
    ``[privacy.mechanisms.<name>] noise_multiplier``), as an over-budget refusal names them:
    ``("k = 0.05 (alone epsilon 505.7)", "raise k, or unset it and set <fraction key> ...")``,
    or ``("", "")`` when there is none."""
    fixed = {mechanism: (noise_key, sigma, fraction_key)
             for mechanism, (sigma, _, noise_key, fraction_key) in _noise_settings(cfg, method)
             if sigma is not None}
    if not fixed:
        return "", ""
    alone = plan_epsilon([r for r in releases if r.mechanism in fixed], budget.delta, None,
                         accountant, prv_refine=prv_refine)
    named = " and ".join(f"{k} = {format_exact(v)}" for k, v, _ in fixed.values())
    advice = "; ".join(f"raise {k}, or unset it and set {f} (the share of the budget it may "
                       "spend; its noise is then calibrated)" for k, _, f in fixed.values())
    # max: an accountant's conversion can give a tiny negative epsilon for a huge noise
    return f"{named} (alone epsilon {format_spent(max(alone, 0.0), budget.epsilon)})", advice


@dataclass(frozen=True)
class AccountantChoice:
    """Which accountant a run uses and why (written to the plan and results.json).

    ``comparison`` holds, per distinct budget, the epsilon of the same plan under each
    candidate (``<name>_epsilon_of_plan``), the plan's releases (``plan_releases``: enough to
    recompute both), and the DP-SGD noise each candidate would calibrate
    (``<name>_noise_multiplier``) with every other noise of its plan
    (``<name>_noise_by_mechanism``), None where it cannot calibrate.
    """

    name: str
    reason: str
    comparison: tuple[dict[str, Any], ...] = ()
    #: Under ``"auto"``, per distinct budget ``(epsilon, delta)``: why each candidate that
    #: cannot calibrate it cannot (its ConfigError's text); not part of :meth:`to_json`.
    uncalibrated: Mapping[tuple[float, float], Mapping[str, str]] = field(
        default_factory=dict, compare=False)

    def no_candidate_calibrates(self, budget: PrivacyBudget) -> str | None:
        """Under ``"auto"``, when no candidate accountant calibrates ``budget``: a ConfigError
        text naming every candidate tried and each one's reason, which the chosen
        accountant's error alone would not say; else None."""
        reasons = self.uncalibrated.get((budget.epsilon, budget.delta), {})
        if not reasons or set(reasons) != set(AUTO_CANDIDATES):
            return None
        brief = [f"{name}: " + _brief(reasons[name], name) for name in AUTO_CANDIDATES]
        return (f"privacy: privacy.accountant = \"auto\" tried {len(AUTO_CANDIDATES)} candidate"
                f" accountants ({', '.join(AUTO_CANDIDATES)}) and none calibrates epsilon"
                f" {format_exact(budget.epsilon)} (delta {format_exact(budget.delta)}). "
                + ". ".join(brief))

    def refusal(self, budget: PrivacyBudget) -> str | None:
        """Under ``"auto"``, when the chosen accountant cannot calibrate ``budget``: a
        ConfigError text saying what auto tried for it, which the chosen accountant's error
        alone would not say (:meth:`no_candidate_calibrates` where no candidate calibrates
        it; else where the other candidate was ruled out, why, and the chosen one's reason);
        else None."""
        whole = self.no_candidate_calibrates(budget)
        reasons = self.uncalibrated.get((budget.epsilon, budget.delta), {})
        if whole is not None or self.name not in reasons:
            return whole
        others = [name for name in AUTO_CANDIDATES if name != self.name]
        ruled_out = "; ".join(filter(None, (self._ruled_out(name) for name in others)))
        return (f"privacy: privacy.accountant = \"auto\" tried {len(AUTO_CANDIDATES)} candidate"
                f" accountants ({', '.join(AUTO_CANDIDATES)}), and one accountant plans every"
                f" budget of the run. {ruled_out or ', '.join(others) + ' was ruled out'}."
                f" So {self.name} was chosen; it fails at epsilon {format_exact(budget.epsilon)}"
                f" (delta {format_exact(budget.delta)}), which {', '.join(others)} calibrates: "
                + _brief(reasons[self.name], self.name))

    def _ruled_out(self, name: str) -> str | None:
        """Where candidate ``name`` lost auto's choice (the first budget), and why."""
        for key, reasons in sorted(self.uncalibrated.items()):
            if name in reasons:
                return (f"{name} fails at epsilon {format_exact(key[0])} (delta "
                        f"{format_exact(key[1])}): {_brief(reasons[name], name)}")
        for row in self.comparison:
            mine = row.get(f"{name}_epsilon_of_plan")
            where = (f"epsilon {format_exact(row['epsilon_budget'])} (delta "
                     f"{format_exact(row['delta'])})")
            if "plan" in row and mine is None:
                return f"{name} cannot evaluate the plan at {where} (its memory guard)"
            theirs = [row.get(f"{other}_epsilon_of_plan") for other in AUTO_CANDIDATES
                      if other != name]
            if mine is not None and any(t is not None and mine > t for t in theirs):
                return f"{name} is looser at {where} (epsilon {mine} of the same plan)"
        return None

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {"accountant": self.name, "reason": self.reason,
                "comparison": [dict(c) for c in self.comparison]}


def _brief(reason: str, name: str) -> str:
    """A candidate's ConfigError text without its prefix and accountant (said around it)."""
    return reason.removeprefix("privacy: ").replace(f" (accountant {name!r})", "")


def _plan_epsilon_or_none(releases: Sequence[PlannedRelease], delta: float, noise: float,
                          accountant: str) -> float | None:
    """The plan's epsilon under ``accountant`` (rounded up), None where that accountant cannot
    evaluate it within its memory guard (it is then not the run's accountant)."""
    try:
        return round_up(plan_epsilon(releases, delta, noise, accountant))
    except AccountingSizeError:
        return None


def plan_noise_by_mechanism(plan: ClientPlan) -> dict[str, float]:
    """Every noise multiplier of ``plan``, by the mechanism name its ledger entries record
    (``"dpsgd"``, ``"gaussian_summary"``, ``"gaussian_lambda"``, each plug-in's), in the
    plan's release order: the figures an accountant comparison row states per candidate."""
    return {r.mechanism: plan.noise_for(r.mechanism) for r in plan.releases}  # type: ignore[misc]


def plan_release_rows(plan: ClientPlan) -> list[dict[str, Any]]:
    """``plan``'s releases as results.json states them in an accountant comparison row
    (``plan_releases``): per release, its mechanism, sample rate, steps (how many times it is
    released over the run) and noise multiplier, DP-SGD's filled in, each the exact float;
    composing them is exactly what both ``*_epsilon_of_plan`` of the row account."""
    return [{"mechanism": r.mechanism, "sample_rate": r.sample_rate, "steps": r.steps,
             "noise_multiplier": plan.dpsgd_noise if r.noise_multiplier is None
             else r.noise_multiplier} for r in plan.releases]


#: Candidates of ``privacy.accountant = "auto"``, in order of preference on a tie.
AUTO_CANDIDATES: tuple[str, ...] = ("pld", "rdp")


def choose_accountant(cfg: ExperimentConfig, method: str,
                      budgets: Sequence[PrivacyBudget]) -> AccountantChoice:
    """The accountant for ``method``'s run: the configured one, or under ``"auto"`` the
    tighter of PLD and RDP for this plan.

    "Tighter" is decided per distinct budget on one fixed plan (the RDP-calibrated one, or
    PLD's where RDP cannot calibrate): the candidate whose epsilon for that plan is lower
    wins (lower epsilon for the same noise means less noise for the same budget). PLD is
    chosen only if it is at least as tight for every budget; a candidate that cannot
    calibrate a budget at all loses. Both are valid upper bounds, so either choice is sound.
    """
    configured = cfg.privacy.accountant
    if configured != "auto":
        return AccountantChoice(configured, f"configured: privacy.accountant = {configured!r}")
    rows: list[dict[str, Any]] = []
    uncalibrated: dict[tuple[float, float], dict[str, str]] = {}
    pld_wins = True
    for budget in sorted({(b.epsilon, b.delta) for b in budgets}):
        b = PrivacyBudget(*budget)
        plans: dict[str, ClientPlan | None] = {}
        for name in AUTO_CANDIDATES:
            try:
                plans[name] = _plan_for(cfg, method, b, name)
            except ConfigError as err:
                plans[name] = None
                uncalibrated.setdefault(budget, {})[name] = str(err)
        row: dict[str, Any] = {"epsilon_budget": b.epsilon, "delta": b.delta}
        for name in AUTO_CANDIDATES:
            plan = plans[name]
            row[f"{name}_noise_multiplier"] = None if plan is None else plan.dpsgd_noise
            row[f"{name}_noise_by_mechanism"] = None if plan is None else \
                plan_noise_by_mechanism(plan)
        reference = plans["rdp"] or plans["pld"]
        if reference is not None:
            for name in AUTO_CANDIDATES:
                # a candidate that cannot evaluate the plan (None) loses
                row[f"{name}_epsilon_of_plan"] = _plan_epsilon_or_none(
                    reference.releases, b.delta, reference.dpsgd_noise, name)
            row["plan"] = "rdp-calibrated" if plans["rdp"] is not None else "pld-calibrated"
            row["plan_releases"] = plan_release_rows(reference)
        if plans["pld"] is None or row.get("pld_epsilon_of_plan") is None or (
                plans["rdp"] is not None
                and row["pld_epsilon_of_plan"] > row["rdp_epsilon_of_plan"]):
            pld_wins = False
        rows.append(row)
    name = "pld" if pld_wins else "rdp"
    first = rows[0] if rows else {}
    detail = ""
    if rows and "plan" not in first:
        detail = f"for the plan at epsilon {first.get('epsilon_budget')}: neither calibrates"
    elif rows:
        # both epsilons are of one plan (the RDP-calibrated one, or PLD's): each candidate's
        # own calibrated noise is quoted apart, so neither epsilon reads as the other's plan
        calibrated = "PLD" if first.get("plan") == "pld-calibrated" else "RDP"
        plan_noise = first.get(f"{calibrated.lower()}_noise_multiplier")
        detail = (f"for the plan at epsilon {first.get('epsilon_budget')} with the "
                  f"{calibrated}-calibrated DP-SGD noise {plan_noise}: PLD gives"
                  f" {first.get('pld_epsilon_of_plan')} vs RDP {first.get('rdp_epsilon_of_plan')}"
                  f" (each calibrated to the budget: DP-SGD noise PLD"
                  f" {first.get('pld_noise_multiplier')}, RDP {first.get('rdp_noise_multiplier')})")
    reason = (f"auto: {name} is tighter for every budget of the plan; " if pld_wins else
              "auto: PLD is not tighter for every budget (or cannot calibrate); ") + detail
    return AccountantChoice(name, reason, tuple(rows), uncalibrated)


def privacy_plan(cfg: ExperimentConfig, method: str, budget: PrivacyBudget,
                 accountant: str | None = None, *, prv_refine: bool = True) -> ClientPlan:
    """Every release a client of ``method`` may make over the run, with calibrated noise.

    The summary (once) and lambda (every round) use fixed noise multipliers or, when unset,
    ones calibrated so that each alone spends its configured fraction of the budget; DP-SGD's
    noise is then calibrated so that the whole plan spends at most ``budget.epsilon``, under
    ``accountant`` (default: :func:`choose_accountant` for this budget).
    Raises ConfigError (naming the key) when no noise can meet the budget, and
    :class:`BudgetPlanError` when fixed noise multipliers plan more than the budget.
    """
    choice = None
    if accountant is None:
        choice = choose_accountant(cfg, method, [budget])
        accountant = choice.name
    try:
        plan = _plan_for(cfg, method, budget, accountant, prv_refine)
    except ConfigError as err:  # under "auto", say that every candidate was tried
        problem = None if choice is None else choice.refusal(budget)
        if problem is None:
            raise
        raise ConfigError(problem) from err
    try:
        planned = plan_epsilon(plan.releases, budget.delta, plan.dpsgd_noise, accountant,
                               prv_refine=prv_refine)
    except AccountingSizeError as exc:
        if cfg.privacy.noise_multiplier is None:  # calibrated under this accountant: evaluable
            raise
        why = size_error_remedy(exc, plan.releases, budget.delta, plan.dpsgd_noise,
                                budget.epsilon)
        fixed = format_exact(plan.dpsgd_noise)
        raise BudgetPlanError(f"privacy: the plan of {method!r} with the fixed "
                              f"privacy.noise_multiplier {fixed}: {why}", []) from None
    if planned > budget.epsilon:
        named, advice = _fixed_noise_advice(cfg, method, plan.releases, budget, accountant,
                                            prv_refine)
        shares = {fraction_key: fraction
                  for _, (sigma, fraction, _, fraction_key) in _noise_settings(cfg, method)
                  if sigma is None}
        lower = ""
        if sum(shares.values()) >= 1.0:  # calibrating DP-SGD would be refused for them
            lower = (", or lower "
                     + " + ".join(f"{k} {format_exact(v)}" for k, v in shares.items())
                     + " (the calibrated shares; to calibrate DP-SGD their sum must be below 1)")
        raise BudgetPlanError(
            f"privacy: the plan of {method!r} spends epsilon {format_spent(planned, budget.epsilon)}"
            f" > budget {format_exact(budget.epsilon)} (delta {format_exact(budget.delta)},"
            f" accountant {accountant!r}) with the fixed privacy.noise_multiplier "
            f"{format_exact(plan.dpsgd_noise)}"
            + (f" and {named}: raise privacy.noise_multiplier or unset it to calibrate; {advice}"
               if named else "; raise it or unset it to calibrate") + lower, [])
    return plan


def _noise_settings(cfg: ExperimentConfig, method: str
                    ) -> Iterator[tuple[str, tuple[float | None, float, str, str]]]:
    """``(mechanism, _noise_keys(...))`` of each mechanism of ``method``'s releases other than
    DP-SGD (summary, lambda, plug-ins), in declaration order."""
    for spec in admitted_releases(cfg, method):
        for mechanism in spec.mechanisms:
            if mechanism != "dpsgd":
                yield mechanism, _noise_keys(cfg, method, mechanism)


def check_budget_plans(cfg: ExperimentConfig, method: str, num_clients: int, *,
                       prv_refine: bool = True
                       ) -> tuple[AccountantChoice, dict[tuple[float, float], ClientPlan]]:
    """Choose the accountant and calibrate every client's plan, before anything runs.

    Returns the choice and the plan per distinct ``(epsilon, delta)``. Raises
    :class:`BudgetPlanError` listing every client whose planned releases cannot fit its
    budget (a fixed noise multiplier too small, or no noise that can meet it).
    """
    admitted_releases(cfg, method)  # a declaration the runtimes cannot record is no budget problem
    check_mechanism_tables(cfg)
    for mechanism in declared_plug_ins(method, cfg):
        _noise_keys(cfg, method, mechanism)  # a missing table is no client's budget problem
        _round_record_params(cfg, mechanism)  # before anything is written, not at admission
    ids = client_ids(num_clients)
    budgets = [client_budget(cfg, i) for i in range(num_clients)]
    choice = choose_accountant(cfg, method, budgets)
    plans: dict[tuple[float, float], ClientPlan] = {}
    problems: dict[tuple[float, float], str] = {}
    for budget in budgets:
        key = (budget.epsilon, budget.delta)
        if key not in plans and key not in problems:
            try:
                plans[key] = privacy_plan(cfg, method, budget, choice.name,
                                          prv_refine=prv_refine)
            except ConfigError as err:  # BudgetPlanError included
                # under "auto", every candidate tried, not the chosen one alone
                problems[key] = choice.refusal(budget) or str(err)
    if problems:
        refused = [cid for cid, b in zip(ids, budgets, strict=True)
                   if (b.epsilon, b.delta) in problems]
        shown = ", ".join(refused[:8]) + (f" and {len(refused) - 8} more"
                                          if len(refused) > 8 else "")
        why = "; ".join(f"budget epsilon {format_exact(e)}: {msg}"
                        for (e, _), msg in problems.items())
        raise BudgetPlanError(
            f"privacy plan of {method!r} over budget for {len(refused)} client(s)"
            f" ({shown}); nothing was trained. {why}", refused)
    return choice, plans


def client_budget(cfg: ExperimentConfig, index: int) -> PrivacyBudget:
    """Client ``index``'s (epsilon, delta): the default, or its ``privacy.overrides`` entry."""
    p = cfg.privacy
    o = p.overrides.get(str(index))
    if o is None:
        return PrivacyBudget(p.epsilon, p.delta)
    return PrivacyBudget(o.epsilon, o.delta if o.delta is not None else p.delta)


#: Upload kinds that carry a client's relatedness summary (in the clear, or CKKS-encrypted):
#: under noised relatedness they continue the admitted summary release's pipeline.
SUMMARY_UPLOAD_KINDS: frozenset[str] = frozenset({KIND_SUMMARY, KIND_RELATEDNESS_UPLOAD})


def _listing_only(release: Release) -> bytes:
    raise PipelineError("this pipeline was built to list its stages; it signs nothing")


class _CrashPoint(AfterGate):
    """Test hook between the after-gate stages (:func:`secure_fedora.core.crashpoints.crash_point`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def process(self, release: Release) -> Release:
        """The release unchanged (the process may be killed here in crash tests)."""
        crash_point(self.name)
        return release


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
    refusal_error: BudgetExceededError | None = None
    #: DP-SGD steps executed since the last admitted model release (the oracle's step hook).
    step_counter: StepCounter = field(default_factory=StepCounter)
    #: The journal stage of this client's pipelines (None without a release journal).
    journal: JournalRelease | None = None
    #: The last model release the gate admitted (its later stages run before it leaves).
    admitted: Release | None = None
    #: Ledger indices already used by releases accounted with an admitted one (the lambda).
    used_entries: set[int] = field(default_factory=set)
    #: The admitted round's step check ran (its replies are checked and may leave): a plug-in
    #: release (:meth:`FederationPrivacy.gaussian`) of that round is refused from then on.
    checked: bool = False
    #: The noise source the admitted round's state was journaled from (its runtime's own):
    #: the one a plug-in release of that round must draw from.
    admitted_noise: NoiseSource | None = None
    #: The admitted (gated, journaled) setup release -- the summary or a plug-in mechanism's
    #: -- and the stages it passed, so that a summary's upload runs the rest of the same
    #: pipeline (encrypt, sign) on exactly that payload.
    summary_release: Release | None = None
    summary_stages: list[Any] = field(default_factory=list)
    #: The admitted round's plug-in releases (mechanism -> what ``gaussian`` returned): the
    #: reply entry carrying one must be that tensor (:meth:`FederationPrivacy.check_plug_in_reply`).
    plug_in_releases: dict[str, Release] = field(default_factory=dict)
    #: A Flower client's journal of its refusal, close and repair entries (the same file its
    #: journal stage writes to; kept for a client built without the stage).
    entry_journal: ReleaseJournal | None = None
    #: The private lambda's noise and record stages with what they were built for (clip,
    #: split size, sigma, assumptions, noise source): built once, reused while those hold
    #: (the stages keep no state between releases).
    lambda_stages: tuple[tuple[Any, ...], NoiseSource, list[Any]] | None = None

    @property
    def noise_multiplier(self) -> float:
        """DP-SGD noise multiplier."""
        return self.plan.dpsgd_noise

    def journal_non_releases(self) -> None:
        """Journal this client's refusal, close and repair entries that have no record yet
        (each after it was fsynced), so that a resume restores them if the ledger is cut."""
        journal = self.journal.journal if self.journal is not None else self.entry_journal
        if journal is not None:
            _journal_non_releases(self.ledger, journal)

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far at the client's delta, exactly as the accountant holds it (0
        before any release)."""
        return self.gate.accountant.epsilon(self.budget.delta) if self.gate.accountant.history else 0.0


def lambda_pull_risk(cfg: ExperimentConfig, lambda_noise: float, clients: int) -> dict[str, Any]:
    """How often FEDORA's noised lambda alone makes the pull unstable, for ``clients`` clients
    whose lambda release has noise multiplier ``lambda_noise``. With ``fedora.max_pull`` set
    the figures are those of the unbounded pull and the bound is stated (``max_pull``): it
    holds ``lr * lambda`` below the limit, so those releases are bounded, not unstable.

    The released difference is ``d = D + N(0, s^2)`` with ``s = lambda_noise * lambda_clip /
    m`` (``m = data.val_per_client``, the noised mean's sensitivity ``lambda_clip / m``), and
    the pull is unstable when ``lr * exp(d / 2)`` reaches
    :func:`~secure_fedora.core.config.pull_stability_limit` ``L``, i.e. ``d >= t = 2 ln(L /
    lr)`` (``t`` at least 0: a lambda is 0 for ``d <= 0``). Even with a true difference ``D
    = 0`` a release does so with probability ``p = P(N(0, s^2) >= t) = erfc(t / (s sqrt 2)) /
    2`` (exact for the Gaussian noise; the clamp bounds only ``D``). Over the run the clients
    make ``clients * rounds * participants_per_round(participation, N) / N`` lambda releases, so ``p`` times
    that many are expected to be unstable."""
    t, p, d = cfg.training, cfg.privacy, cfg.data
    s = lambda_noise * p.lambda_clip / d.val_per_client
    limit = pull_stability_limit(t.lr, t.momentum, t.weight_decay)
    threshold = max(0.0, 2.0 * math.log(limit / t.lr))
    prob = 0.5 * math.erfc(threshold / (s * math.sqrt(2.0)))
    n = d.num_clients
    per_round = participants_per_round(t.participation, n)
    releases = clients * t.rounds * per_round / n
    bound = {} if cfg.fedora.max_pull is None else {"max_pull": cfg.fedora.max_pull}
    return {"lambda_noise_std": s, "pull_stability_limit": limit,
            "unstable_difference": threshold, "unstable_probability": prob,
            "lambda_releases": releases, "expected_unstable_pulls": prob * releases, **bound}


def pull_warning(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The warning for a plan (:func:`plan_table` rows) whose noised lambdas are expected to
    make FEDORA's pull unstable at least once over the run (``lambda_pull`` of the rows summed,
    >= 1); None otherwise, where no row has the figures (no private lambda) or where
    ``fedora.max_pull`` bounds the pull (the figures state ``max_pull``)."""
    risks = [r["lambda_pull"] for r in rows
             if r.get("lambda_pull") and "max_pull" not in r["lambda_pull"]]
    expected = sum(r["expected_unstable_pulls"] for r in risks)
    if not risks or expected < 1.0:
        return None
    worst = max(risks, key=lambda r: r["unstable_probability"])
    return (f"FEDORA's noised lambda (noise std {worst['lambda_noise_std']:.3g} nats on the "
            f"validation-loss difference) makes lr * lambda reach the pull's stability limit "
            f"{worst['pull_stability_limit']:g} with probability {worst['unstable_probability']:.3g}"
            f" per release even when the true difference is 0: about {expected:.3g} of the run's "
            f"{sum(r['lambda_releases'] for r in risks):g} lambda releases are expected to "
            "push a client away from phi, which can make its parameters non-finite and stop "
            "the run; set fedora.max_pull = 1 (post-processing: the privacy cost is unchanged)")


#: results.json ``privacy.<method>.epsilon_figures`` (both runtimes): why a plan row's
#: ``planned_epsilon`` and a client's ``epsilon_spent`` differ where they are "the same".
EPSILON_FIGURES = ("plan[].planned_epsilon is the plan's epsilon rounded up to 6 decimals "
                   "(never below it); clients[].epsilon_spent is the exact epsilon spent")


def plan_table(cfg: ExperimentConfig, method: str, budgets: Sequence[PrivacyBudget],
               plans: Mapping[tuple[float, float], ClientPlan], accountant: str,
               choice: AccountantChoice | None, stages: Mapping[str, list[str]]
               ) -> list[dict[str, Any]]:
    """One row per distinct ``(epsilon, delta)`` in ``budgets`` (clients in order), in order of
    first appearance: its calibrated noise, planned releases and planned epsilon under
    ``accountant`` and every automatic candidate, and how many clients hold it
    (``privacy.<method>.plan`` of results.json, identical in both runtimes: a function of the
    config and the calibration only).

    Every figure is the exact float the calibration gave and the ledgers record (release
    strings in the float's shortest round-trip form); ``"figures": "exact"`` marks such a row
    (a run written before the key rounded ``noise_multiplier`` to 6 decimals, which can state
    more noise than was drawn)."""
    sample_rate, steps = sample_rate_for(cfg), steps_per_round(cfg)
    rows: dict[tuple[float, float], dict[str, Any]] = {}
    for budget in budgets:
        key = (budget.epsilon, budget.delta)
        if key not in rows:
            plan = plans[key]
            noise = plan.dpsgd_noise
            rows[key] = {
                "method": method, "epsilon_budget": budget.epsilon, "delta": budget.delta,
                "noise_multiplier": noise, "sample_rate": sample_rate,
                "steps_per_round": steps, "rounds": cfg.training.rounds,
                "planned_epsilon": round_up(plan_epsilon(plan.releases, budget.delta, noise,
                                                         accountant,
                                                         prv_refine=plan.prv_refine)),
                **noise_assumptions(cfg),
                **{f"planned_epsilon_{name}": _plan_epsilon_or_none(
                    plan.releases, budget.delta, noise, name) for name in AUTO_CANDIDATES},
                "releases": [f"{r.mechanism} x{r.steps} (q={r.sample_rate!r}"
                             + (f", sigma={r.noise_multiplier!r})" if r.noise_multiplier else ")")
                             for r in plan.releases],
                "figures": "exact",
                "clients": 0,
            }
        rows[key]["clients"] += 1
    private_lambda = cfg.data.validation == "private"
    for key, row in rows.items():
        noise = plans[key].lambda_noise
        if private_lambda and noise is not None:
            row["lambda_pull"] = lambda_pull_risk(cfg, noise, row["clients"])
    out = list(rows.values())
    warning = pull_warning(out)
    for row in out:
        if warning is not None:
            row["pull_warning"] = warning
        row["release_stages"] = dict(stages)
        row["accountant"] = accountant
        if choice is not None:
            row["accountant_reason"] = choice.reason
    return out


@dataclass
class FederationPrivacy:
    """The privacy side of one method's run: one :class:`ClientPrivacy` per client.

    Ledgers live in ``ledger_dir/<client-id>.jsonl``; identities in the key store ``key_dir``
    (created, or extended by the parties it lacks, on first use; private keys 0600; see
    :mod:`secure_fedora.secure.keystore`). Reopening verifies each ledger and rebuilds each accountant
    from it, so a restart never under-counts what was released. :meth:`close_ledgers` ends
    every ledger of a finished method with its signed close entry.

    Exactly-once releases (``journals``, opened by :meth:`open`): every release passed by a
    gate is journaled in ``ledger_dir/<client-id>.journal`` (sealed to the client) after its
    ledger entries and before it leaves: the payload's digest and the state of the client's
    noise source before the release's draws (with reproducible noise, which the checkpoint and
    seed re-create, only that state's digest; with CSPRNG noise the key and stream position,
    only ever written sealed). After :meth:`resume_after`, releases the interrupted run
    already accounted are matched against the ledger (not accounted again) and re-made from
    the journaled noise state, so they are the very releases that may have left (with
    reproducible noise that state is checked; with CSPRNG noise it is restored, and the
    client continues under a fresh key after its last journaled release).
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
    #: Each resume that continued the run (:meth:`resume_after`): the round it continued
    #: after and the releases it re-made from the journals, by round (results.json's
    #: ``resumes``; kept in the checkpoints, so a later resume keeps the earlier ones).
    resumes: list[dict[str, Any]] = field(default_factory=list)
    _replayed: set[int] = field(default_factory=set)
    _resumed: bool = False
    #: Inside :meth:`setup_exchange` (the setup's client halves): the only place a plug-in
    #: setup release is made.
    _in_setup: bool = False
    #: The journal fsyncs of the admissions in progress (:meth:`admission_batch`).
    _syncs: SyncBatch | None = None
    #: The fsync pool of every admission batch: started by the first, stopped by :meth:`close`.
    _fsync_pool: SyncBatch | None = None
    #: The journal stages' reading of a record found where no resume re-makes the release
    #: (None: JournalRelease.EARLIER_RUN, an earlier run in this directory).
    journal_conflict: str | None = None
    # Per-sample loss of the private lambda release (the task's loss; set by the runtime).
    loss: Any = CROSS_ENTROPY.checked
    accountant_choice: AccountantChoice | None = None
    #: The federation's round marks (:class:`~privacy.journal.RoundMarks`): a round is marked
    #: after its last journal record, before its first release leaves (None: not kept, e.g.
    #: a Flower client, whose saved state plays that part).
    marks: RoundMarks | None = None
    #: The rounds admitted as one batch (:meth:`admission_batch`; None: no batches, e.g. a
    #: Flower client).
    admitting: RoundMarks | None = None

    def __post_init__(self) -> None:
        if self.journals is not None:
            for c, journal in zip(self.clients, self.journals, strict=True):
                # a view of some clients (noised_summary) keeps their journal stages
                if c.journal is None or c.journal.journal is not journal:
                    c.journal = JournalRelease(
                        journal, c.client_id, keep_noise_state=not self.reproducible_noise,
                        resumed=self._resumed,
                        conflict=self.journal_conflict or JournalRelease.EARLIER_RUN)

    @property
    def executed_steps(self) -> dict[int, int]:
        """DP-SGD steps executed per client since its last admission (the step hook's count)."""
        return {i: c.step_counter.executed for i, c in enumerate(self.clients)}

    @classmethod
    def open(cls, cfg: ExperimentConfig, method: str, num_clients: int, ledger_dir: Path,
             key_dir: Path, *, resume: bool = False,
             calibrated: tuple[AccountantChoice, dict[tuple[float, float], ClientPlan]] | None
             = None, with_files: Mapping[str, bytes] | None = None) -> FederationPrivacy:
        """Calibrate every client's plan (refusing over-budget plans), then open every
        client's ledger, gate and release journal.

        Raises :class:`BudgetPlanError` naming every client whose planned releases cannot fit
        its budget, before any file is written. With ``resume``, every client's ledger and
        journal are checked first, so a refusal for one client writes no other's ledger (a
        ledger whose complete lines fail verification is a LedgerError, a journal lacking a
        release its ledger records a JournalError, and a ledger cut inside an entry the
        journal records a :class:`~privacy.ledger.LedgerCutError`, unless the journal holds
        the lines cut off, which are then written back bit for bit); then a torn final ledger
        line is quarantined and a signed repair entry appended
        (:func:`privacy.ledger.repair_torn_tail`), logged and listed under ``recoveries`` (a
        torn final journal line waits for :meth:`resume_after`). Without ``resume``, journals
        holding releases of an earlier run are refused (JournalError) before anything is
        written. ``calibrated`` is :func:`check_budget_plans`' result for this config and
        method when the caller already has it (it calibrates before writing anything else).
        A resumed PRV run whose ledgers were written without PRV's refining pass
        (:meth:`~privacy.accounting.Accountant.reproducing`) is calibrated and accounted
        without it again, so it recomputes exactly what its ledgers record.

        A ``ledger_dir`` that does not exist is created with every client's empty ledger, the
        empty round mark files and ``with_files`` at once (:func:`create_ledger_dir`); one that exists must hold every
        client's ledger (LedgerError naming those lost otherwise, before anything is written).
        """
        ids = client_ids(num_clients)
        budgets = [client_budget(cfg, i) for i in range(num_clients)]
        # calibrate everything before any file is written
        choice, plans = calibrated if calibrated is not None else \
            check_budget_plans(cfg, method, num_clients)
        accountant = choice.name
        # every client's ledger stays open (and locked) until close: room for them first
        ensure_descriptors(num_clients, f"{num_clients} clients' ledgers")
        if not resume:
            earlier = [str(p) for p in (ledger_dir / f"{cid}.journal" for cid in ids)
                       if p.exists() and p.stat().st_size > 0]
            earlier += [str(p) for p in (ledger_dir / MARKS_NAME, ledger_dir / ADMITTING_NAME)
                        if marks_written(p)]
            if earlier:
                raise JournalError(
                    f"{earlier[0]} holds releases of an earlier run in this directory"
                    f" ({len(earlier)} journal(s)); resume that run or use a new directory"
                )
        from secure_fedora.secure.keystore import ensure_keystore, run_party_ids

        ensure_keystore(key_dir, run_party_ids(num_clients))
        identities = [load_identity(key_dir, cid) for cid in ids]
        if ledger_dir.is_dir():
            check_ledgers_present(ledger_dir, ids)
        else:
            # the mark files are created with the ledgers, so one gone from the folder was lost
            # each holding its header line, so an empty one was cut
            create_ledger_dir(ledger_dir, ids, {**(with_files or {}), MARKS_NAME: marks_header(),
                                                ADMITTING_NAME: marks_header()})
        checked: list[LedgerCheck] = []
        gone = [p for p in (ledger_dir / MARKS_NAME, ledger_dir / ADMITTING_NAME)
                if not p.exists()]
        # read before anything is written; a torn last mark waits for resume_after
        marks = RoundMarks(ledger_dir / MARKS_NAME, quarantine=not resume)
        admitting = RoundMarks(ledger_dir / ADMITTING_NAME, quarantine=not resume)
        if resume:  # every client's checks before anything is written: a refusal changes nothing
            checked = [_check_resumable(ledger_dir, cid, method, identity)
                       for cid, identity in zip(ids, identities, strict=True)]
            _check_unjournaled_tails(checked, marks, admitting, gone=gone)
            if accountant == "prv" and any(
                    not replay_accountant(c.entries, accountant).prv_refine for c in checked):
                # a run ledgered before PRV's refining pass: its noise was calibrated without
                # it, so the releases it computes again are the ones recorded
                choice, plans = check_budget_plans(cfg, method, num_clients, prv_refine=False)
        states = []
        journals = []
        recoveries: list[dict[str, Any]] = []
        for i, (cid, budget) in enumerate(zip(ids, budgets, strict=True)):
            identity = identities[i]
            signing_key = identity.signing_key
            ledger_path = ledger_dir / f"{cid}.jsonl"
            journal_path = ledger_dir / f"{cid}.journal"
            if resume:
                journal = checked[i].journal
                for repair in recover_ledger(checked[i], signing_key, budget, accountant):
                    recoveries.append({"client": cid, "ledger_repair": repair.entry["index"],
                                       "quarantine": repair.quarantine.name})
                ledger = LedgerWriter(ledger_path, cid, signing_key)
            else:
                ledger = LedgerWriter(ledger_path, cid, signing_key)
                journal = ReleaseJournal(journal_path, cid, method, identity.agreement_key)
                _check_records(journal, ledger.entries)
            journals.append(journal)
            acc = replay_accountant(ledger.entries, accountant) if ledger.entries \
                else Accountant(accountant)
            gate = BudgetGate(acc, budget, ledger, cid)
            state = ClientPrivacy(i, cid, budget, plans[(budget.epsilon, budget.delta)], gate, ledger)
            if gate.closed:
                state.refused_at = -1
                state.refusal = "refused before restart"
            states.append(state)
        return cls(cfg, method, states, sample_rate_for(cfg), steps_per_round(cfg),
                   journals=journals, reproducible_noise=noise_is_reproducible(cfg),
                   recoveries=recoveries, accountant_choice=choice, marks=marks,
                   admitting=admitting)

    def mark_round(self, rnd: int, clients: Iterable[int]) -> None:
        """Durably mark round ``rnd``'s releases of ``clients`` (indices) as all journaled
        (:attr:`marks`; nothing when the round is marked already or no marks are kept).
        Called after the round's last journal record and before its first release leaves: a
        resume then refuses a covered client whose record of a marked round is missing (cut
        after the release may have left) instead of drawing that release again."""
        if self._syncs is not None:
            raise PipelineError(
                f"round {rnd}: a release cannot leave inside an admission batch (its journal"
                " records are durable only once the batch ends)")
        if self.marks is not None:
            self.marks.mark(rnd, clients)

    def resume_after(self, last_round: int | None, saved: dict[str, Any] | None, *,
                     continues: bool = True) -> None:
        """Prepare a resumed run that continues after round ``last_round`` (None: from the
        start, relatedness summaries included) with ``saved`` (:meth:`checkpoint_state` of
        that round's checkpoint; None without one): ledger entries of later rounds are
        replayed by the gates (consumed, not appended), refusals and events are those of the
        checkpoint. A ledger that no longer holds what the checkpoint recorded of it (lost,
        truncated or replaced since) refuses the resume with :class:`LedgerError`: continuing
        would account fewer releases than were made; so does a journal lacking the record of
        a release its ledger records (JournalError). Only once these pass is a torn final
        journal line quarantined (logged, listed under ``recoveries``) and every refusal,
        close and repair entry journaled whole. A resume that ``continues`` (trains a round
        after ``last_round``; not one finding the method finished) is listed under
        :attr:`resumes` with the rounds whose recorded releases it re-makes from the journals;
        not one from the start of a method whose ledgers hold no entry (the interrupted run
        never reached its first release, e.g. killed during an earlier method): it runs as a
        fresh one would, and listing it would say a method was interrupted that never ran."""
        if saved is not None:
            self._check_ledgers_hold(saved, last_round)
        if self.journals is not None:
            for c, journal in zip(self.clients, self.journals, strict=True):
                _check_journal_covers(c.ledger.entries, journal, c.client_id)
            # every check passed: only now is a journal's torn tail moved aside
            for c, journal in zip(self.clients, self.journals, strict=True):
                moved = journal.quarantine_torn_tail()
                if moved is not None:
                    log.warning("journal %s: torn final record quarantined in %s (it was never"
                                " released)", journal.path, moved.name)
                    self.recoveries.append({"client": c.client_id,
                                            "journal_quarantine": moved.name})
                c.journal_non_releases()
        if self.admitting is not None:
            moved = self.admitting.quarantine_torn_tail()
            if moved is not None:
                log.warning("admission batches %s: torn last line quarantined in %s",
                            self.admitting.path, moved.name)
                self.recoveries.append({"marks_quarantine": moved.name})
        if self.marks is not None:
            moved = self.marks.quarantine_torn_tail()
            if moved is not None:
                log.warning("round marks %s: torn last mark quarantined in %s (it marked"
                            " nothing)", self.marks.path, moved.name)
                self.recoveries.append({"marks_quarantine": moved.name})
        remade: dict[int, list[str]] = {}
        for k, c in enumerate(self.clients):
            entries = c.ledger.entries
            start = 0 if last_round is None else next(
                (e["index"] for e in entries if e["round"] > last_round), len(entries))
            c.gate.replay_from(start)
            # a consumed release without its journal record never left: it is made anew
            journal = self.journals[k] if self.journals is not None else None
            for rnd in sorted({e["round"] for e in entries[start:]
                               if e["mechanism"] not in (REFUSAL, CLOSE, REPAIR)
                               and journal is not None and journal.get(
                                   e["round"], e["params"].get("release_kind")) is not None}):
                remade.setdefault(rnd, []).append(c.client_id)
            if saved is not None:
                c.refused_at = saved["clients"][k]["refused_at"]
                c.refusal = saved["clients"][k]["refusal"]
            elif last_round is None:
                c.refused_at = c.refusal = None
        self.events = list(saved["events"]) if saved is not None else []
        self.resumes = [dict(r) for r in (saved or {}).get("resumes", [])]
        if continues and (last_round is not None or any(c.ledger.entries for c in self.clients)):
            self.resumes.append({
                "after_round": last_round,  # None: from the start (no checkpoint)
                "remade_from_journal": [{"round": r, "clients": remade[r]}
                                        for r in sorted(remade)]})
        self._resumed = True
        for c in self.clients:
            if c.journal is not None:
                c.journal.resumed = True

    def checkpoint_state(self) -> dict[str, Any]:
        """What a round checkpoint must keep of the privacy side (refusals and events), so a
        resume reports them as an uninterrupted run does, and each ledger's head (entries,
        hash of the last line), so a resume notices a ledger lost or cut since."""
        return {"events": [dict(e) for e in self.events],
                "resumes": [dict(r) for r in self.resumes],
                "clients": [{"refused_at": c.refused_at, "refusal": c.refusal,
                             "ledger_head": list(c.ledger.head)} for c in self.clients]}

    def _check_ledgers_hold(self, saved: dict[str, Any], last_round: int | None) -> None:
        """Every ledger still holds the entries the checkpoint recorded (same count or more,
        the recorded last line still in the chain); checkpoints written before heads were
        recorded are not checked."""
        for k, c in enumerate(self.clients):
            recorded = saved["clients"][k].get("ledger_head")
            if recorded is None:
                continue
            count, head = int(recorded[0]), str(recorded[1])
            if c.ledger.holds(count, head):
                continue
            now = c.ledger.head[0]
            raise LedgerError(
                f"client {c.client_id!r}: its ledger holds {now} entries but the round-"
                f"{last_round} checkpoint recorded {count} (ending in {head[:12]}...): the ledger "
                "was lost, cut or replaced since; resuming would account fewer releases than "
                "were made. Restore the ledger and its journal from a copy, or start a new run")

    def _prepare(self, i: int, rnd: int, kind: str, noise: NoiseSource | None) -> bytes:
        """The noise state to journal for client ``i``'s round-``rnd`` ``kind`` release, read
        before its draws. A journaled release is re-made from its journaled state: checked
        against the noise source with reproducible noise (a mismatch means the resume
        diverged), restored into it with CSPRNG noise (the state is only ever written sealed),
        after which the client continues under a fresh key."""
        if noise is None or self.journals is None:
            return b""
        state = _journal_noise_state(noise)
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
                    f"client {self.clients[i].client_id!r}: resume diverged: the noise state"
                    f" before the round-{rnd} {kind!r} release differs from the journaled"
                    " one; refusing to release anything else"
                )
            if not self.reproducible_noise:
                if not isinstance(noise, CsprngNoise):
                    raise JournalError(f"cannot re-make a journaled release with {noise!r}")
                noise.restore_journal_state(record.noise_state)
                self._replayed.add(i)
            return state if self.reproducible_noise else record.noise_state
        if i in self._replayed:  # past the journaled releases: fresh randomness
            self._replayed.discard(i)
            assert isinstance(noise, CsprngNoise)
            noise.rekey()
            state = _journal_noise_state(noise)
        return state

    @property
    def accountant(self) -> str:
        """Name of the accountant every client of this run records with."""
        return self.clients[0].gate.accountant.kind if self.clients else self.cfg.privacy.accountant

    def select_client(self, i: int, oracle: Any) -> None:
        """Attribute the DP-SGD steps ``oracle`` executes from now on to client ``i``.

        ``oracle`` may be wrapped (baseline wrappers expose ``inner``); a non-DP oracle
        (a client-held personal model) executes no DP-SGD step and is left alone.
        """
        while not isinstance(oracle, DPGradient) and hasattr(oracle, "inner"):
            oracle = oracle.inner
        if isinstance(oracle, DPGradient):
            oracle.on_step = self.clients[i].step_counter.count

    def confirm_steps(self, rnd: int, participants: Sequence[int]) -> None:
        """Check, before round ``rnd``'s models are released, that each participant executed
        exactly the DP-SGD steps its ledger entry for the round records (the step-check stage
        of each participant's model pipeline).

        A mismatch appends a refusal to that client's ledger (its gate closes) and raises
        :class:`StepCountMismatchError` naming the client, both counts and the round.
        """
        for i in participants:
            self.release_model(i, rnd, None)

    def release_model(self, i: int, rnd: int, theta: Tensor | bytes | None,
                      sign: Callable[[Release], bytes] | None = None,
                      encrypt: EncryptPayload | None = None) -> Release:
        """The last stages of client ``i``'s round-``rnd`` model release, run when the trained
        ``theta`` (or any upload of that round, which is computed from it) is about to leave:
        the step check, then (with ``encrypt``) the encryption and (with ``sign``, where
        envelopes are on) the envelope signature, whose message becomes the payload. ``theta``
        None runs the step check alone (:meth:`confirm_steps`). Raises StepCountMismatchError
        (after a refusal ledger entry) when the executed steps differ from the accounted ones,
        or the round's model release was never admitted: nothing is then encrypted or signed."""
        # the generic round admits every participant (ledger, journal) before any model
        # release runs its last stages; the mark covers those admitted so far, so a method
        # that admits a client after another's release left leaves that client unmarked (its
        # crash window before the record stays resumable)
        self.mark_round(rnd, (k for k, other in enumerate(self.clients)
                              if other.admitted is not None and other.admitted.round == rnd))
        c = self.clients[i]
        pipeline = self.model_pipeline(i, sign, encrypt)
        check = pipeline.index(CheckExecutedSteps)
        admitted = c.admitted if c.admitted is not None and c.admitted.round == rnd else None
        try:
            if admitted is None:  # nothing admitted: any step it executed is unaccounted
                return pipeline.stages[check].process(Release("model", torch.empty(0), rnd))
            if theta is not None:
                admitted = admitted.replace(payload=theta)
            released = pipeline.run(admitted, start=check)
            # only a release that left closes the round to plug-in releases: one whose
            # encryption or signature failed sent nothing
            c.checked = True
            return released
        except StepCountMismatchError as err:
            c.journal_non_releases()
            if err.refusal is not None:
                c.refused_at, c.refusal, c.refusal_error = rnd, str(err.refusal), err.refusal
            self.events.append(refusal_event(rnd=rnd, client=c.client_id, detail=err.reason))
            raise

    @contextlib.contextmanager
    def admission_batch(self, rnd: int) -> Iterator[None]:
        """Inside, :meth:`admit` writes each client's journal record and issues its fsync on
        a small thread pool (started by the first batch, kept until :meth:`close`) instead of
        waiting for it, so the journal fsyncs of a round's
        admissions overlap each other and the next clients' admissions; on exit every record
        written inside is durable. Nothing may leave inside (admission only accounts): a
        round's releases leave after its admissions (:meth:`release_model`, which first marks
        the round). Each client's ledger entries are still written and fsynced before its
        accountant records them and before its journal record is written, so a crash (or a
        power loss) inside leaves each client before its ledger entry, between entry and
        record (the crash window a resume re-makes the release from), or after its record,
        as one admission at a time does. A client whose journal fsync failed is not admitted
        (its ``admitted`` is cleared) and the first such OSError is raised on exit once every
        fsync finished; an error inside is raised after the fsyncs issued finished.

        Round ``rnd`` is first marked as admitted in a batch (:attr:`admitting`, one fsynced
        line; once per round): a higher-indexed client's ledger entry of that round no longer
        proves that a lower-indexed client's record was written (a power loss may keep the
        one and lose the other), so a resume takes a missing record of the batch's round as
        the crash window unless the round's release mark covers it (written after the batch,
        before any of its releases leaves). Without marks (a Flower client) admissions run
        one at a time, as before."""
        if self._syncs is not None or self.journals is None or self.marks is None \
                or self.admitting is None:
            yield
            return
        self.admitting.mark(rnd, ())
        if self._fsync_pool is None:
            self._fsync_pool = SyncBatch()
        syncs = self._syncs = self._fsync_pool
        try:
            yield
        finally:
            self._syncs = None
            failed = syncs.wait()
        if failed:
            paths = {path for path, _ in failed}
            for c in self.clients:
                if c.journal is not None and c.journal.journal.path in paths:
                    c.admitted = None
            raise failed[0][1]

    def close(self) -> None:
        """Stop the admission batches' fsync pool (every fsync issued has finished) and
        release every ledger's lock (the ledgers stay open to a later run)."""
        pool, self._fsync_pool = self._fsync_pool, None
        try:
            if pool is not None:
                pool.close()
        finally:
            for c in self.clients:
                c.ledger.close()

    def close_ledgers(self, final_round: int) -> None:
        """The method finished: append each client's signed close entry (final index and
        epsilon spent; idempotent, so a resumed finished run adds nothing)."""
        for c in self.clients:
            c.ledger.close_run(round=final_round, delta=c.budget.delta,
                               budget_epsilon=c.budget.epsilon,
                               accountant=self.accountant)
            c.journal_non_releases()

    def planned_epsilon(self, i: int) -> float:
        """Epsilon client ``i`` reaches if it makes every planned release."""
        c = self.clients[i]
        return plan_epsilon(c.plan.releases, c.budget.delta, c.noise_multiplier, self.accountant,
                            prv_refine=c.plan.prv_refine)

    def plan_rows(self) -> list[dict[str, Any]]:
        """The plan per distinct budget, for printing before training and for results.json."""
        return plan_table(self.cfg, self.method, [c.budget for c in self.clients],
                          {(c.budget.epsilon, c.budget.delta): c.plan for c in self.clients},
                          self.accountant, self.accountant_choice, self.declared_release_stages())

    def _admission_stages(self, i: int) -> list[Any]:
        """The stages from the gate to the journal, shared by all of client ``i``'s releases:
        every ledger entry states where its noise came from (and, for reproducible noise,
        that it is not private against anyone who knows the config; the entry is signed),
        then gate + ledger, then the exactly-once journal record."""
        c = self.clients[i]
        journal = [c.journal] if c.journal is not None else []
        return [RecordParams(noise_assumptions(self.cfg)), c.gate, _CrashPoint("gate"),
                *journal, _CrashPoint("release")]

    def model_pipeline(self, i: int, sign: Callable[[Release], bytes] | None = None,
                       encrypt: EncryptPayload | None = None) -> ReleasePipeline:
        """Client ``i``'s model release: (DP-SGD clips and noises each step in the optimizer)
        -> gate + ledger -> journal, before training; step check -> (encrypt) -> (sign),
        before the model leaves."""
        c = self.clients[i]
        check = CheckExecutedSteps(c.gate, c.step_counter, c.noise_multiplier, self.sample_rate)
        return ReleasePipeline([*self._admission_stages(i), check,
                                *upload_stages(encrypt, sign)])

    def release_upload(self, i: int, rnd: int, kind: str, payload: Tensor | bytes, *,
                       encrypt: EncryptPayload | None = None,
                       sign: Callable[[Release], bytes] | None = None) -> Release:
        """Client ``i``'s upload of ``kind`` for round ``rnd`` through the rest of the
        pipeline of the release that accounts it (the one production path of an upload under
        DP; :class:`secure_fedora.secure.transport.SecureTransport` calls it for every client
        upload): encrypt (optional) -> sign (where envelopes are on).

        - Round ``r >= 1``, client admitted this round: every upload of the round is computed
          from the round's model release, so it passes that release's remaining stages
          (:meth:`release_model`: the step check first; a mismatch refuses it, nothing is
          encrypted or signed). Not admitted this round: the client did not train, so what it
          sends again is a row released (and accounted) earlier or the public
          initialization: encrypt -> sign (``metadata["resent"]``).
        - Round 0, a summary upload (:data:`SUMMARY_UPLOAD_KINDS`) of a client with an
          admitted summary (noised relatedness): the summary pipeline's remaining stages, on
          that very payload (PipelineError for any other payload).
        - Round 0 without an accounted setup release (the method declares none, e.g. plain or
          encrypted-only relatedness, or the key holder's release of the overlaps computed
          from the others' releases): the unaccounted path, encrypt -> sign.

        A client whose budget refused a release uploads nothing more (PipelineError).
        """
        c = self.clients[i]
        if c.refused_at is not None:
            raise PipelineError(
                f"client {c.client_id!r} was refused (round {c.refused_at}); its round-{rnd}"
                f" {kind!r} upload is not released")
        if rnd >= 1:
            if c.admitted is not None and c.admitted.round == rnd:
                return self.release_model(i, rnd, payload, sign, encrypt)
            # Not admitted this round, so not trained this round: the row it sends is the one
            # it released last (accounted then) or the public initialization, sent again
            # (e.g. encrypted propagation's first call, where every client uploads).
            return ReleasePipeline(upload_stages(encrypt, sign), require_gate=False).run(
                Release(kind, payload, rnd, metadata={"resent": True}))
        admitted = c.summary_release
        if admitted is None or kind not in SUMMARY_UPLOAD_KINDS:
            return ReleasePipeline(upload_stages(encrypt, sign), require_gate=False).run(
                Release(kind, payload, rnd))
        if not (isinstance(payload, Tensor) and isinstance(admitted.payload, Tensor)
                and payload.shape == admitted.payload.shape
                and torch.equal(payload.to(admitted.payload.dtype), admitted.payload)):
            raise PipelineError(
                f"client {c.client_id!r}: the round-0 {kind!r} upload is not the summary its"
                " gate admitted and its journal recorded; refusing to release it")
        stages = c.summary_stages
        pipeline = ReleasePipeline([*stages, *upload_stages(encrypt, sign)])
        return pipeline.run(admitted, start=len(stages))

    def release_stages(self, i: int, *, signed: bool | None = None,
                       encrypted: Sequence[str] | None = None) -> dict[str, list[str]]:
        """The stages of each kind of client ``i``'s releases, in order, as production builds
        them (``Transform`` stages by their name, crash-test hooks omitted), up to the
        upload: ``signed`` (default: ``security.envelopes``) ends the model and summary
        pipelines with the envelope signature; ``encrypted`` names the release kinds whose
        upload is encrypted (default: those the method declares encrypted under the config,
        :func:`encrypted_release_kinds`)."""
        c = self.clients[i]
        if signed is None:
            signed = self.cfg.security.envelopes
        if encrypted is None:
            encrypted = encrypted_release_kinds(self.cfg, self.method)
        placeholder = ReproducibleNoise(0)  # the noise stages need a source; nothing is drawn
        summary = second_moment_stages(1.0, 1, 1, c.noise_multiplier, placeholder)
        lam = noised_mean_stages(1.0, 1, c.noise_multiplier, placeholder)
        sign = _listing_only if signed else None

        def names(stages: list[Any]) -> list[str]:
            return [getattr(s, "name", type(s).__name__) for s in stages
                    if not isinstance(s, _CrashPoint)]

        def encrypt(kind: str) -> EncryptPayload | None:
            return EncryptPayload(_listing_only, "ckks") if kind in encrypted else None

        generic = [GaussianNoise(1.0, 1.0, placeholder), RecordParams({}),
                   AccountedWith(None, c.ledger, set())]
        return {
            "model": names(self.model_pipeline(i, sign, encrypt("model")).stages),
            "summary": names([*summary, *self._admission_stages(i),
                              *upload_stages(encrypt("summary"), sign)]),
            "lambda": names([*lam, RecordParams({}), AccountedWith(None, c.ledger, set())]),
            **{m: names(generic) for m in self.plug_in_round_mechanisms()},
            **{kind: names([GaussianNoise(1.0, 1.0, placeholder), *self._admission_stages(i),
                            *upload_stages(None, sign)])
               for kind, _ in setup_plug_ins(self.method, self.cfg)},
        }

    def declared_release_stages(self) -> dict[str, list[str]]:
        """:meth:`release_stages` of the kinds this method declares (``releases(cfg)``), as
        built for the first client (every client's pipelines have the same stages); shown in
        results.json as ``privacy.<method>.release_stages``."""
        if not self.clients:
            return {}
        index = next(iter(self.clients)).index
        built = self.release_stages(index)
        return {kind: built[kind] for kind in _declared_kinds(self.method, self.cfg)}

    def _release(self, i: int, release: Release, pipeline: ReleasePipeline,
                 stop: int | None = None) -> Release | None:
        """Run ``release`` through ``pipeline`` (up to ``stop``); None when the client is or
        becomes refused (the refusal is recorded; the federation goes on without it)."""
        c = self.clients[i]
        if c.refused_at is not None:
            return None
        try:
            released = pipeline.run(release, stop=stop)
        except BudgetExceededError as err:
            c.journal_non_releases()
            rnd = release.round
            c.refused_at, c.refusal, c.refusal_error = rnd, str(err), err
            self.events.append(refusal_event(rnd=rnd, client=c.client_id, detail=str(err)))
            log.warning("%s", err)
            return None
        return released

    def _noise_metadata(self, i: int, noise_state: bytes) -> dict[str, Any]:
        return {NOISE_STATE: noise_state} if self.clients[i].journal is not None else {}

    def admit(self, i: int, rnd: int, theta: Tensor, with_lambda: bool,
              noise: NoiseSource | None = None) -> bool:
        """Pass client ``i``'s round-``rnd`` model release through its pipeline up to the
        journal (gate + ledger first).

        Called before local training: the round's DP-SGD steps (and the lambda release, when
        validation is private) are accounted and written to the ledger, then training and the
        release follow (:meth:`confirm_steps` / :meth:`release_model` run the remaining
        stages). Returns False (and records why) when the client is refused.
        ``noise`` is the client's noise source (its state before the release's draws is
        journaled with the release).
        """
        c = self.clients[i]
        records = [MechanismRecord("dpsgd", c.noise_multiplier, self.sample_rate, self.steps,
                                   {"clip_norm": self.cfg.privacy.max_grad_norm,
                                    "sampling": "poisson", "method": self.method})]
        if with_lambda:
            if c.plan.lambda_noise is None:
                raise PipelineError(
                    f"method {self.method!r}: client {i}'s model release was asked to account a "
                    "lambda release its plan does not hold (declare ('dpsgd', "
                    "'gaussian_lambda') as the round release's mechanisms)")
            records.append(scalar_record(self.cfg.privacy.lambda_clip, c.plan.lambda_noise,
                                         self.cfg.data.val_per_client))
        records.extend(self._plug_in_record(i, m) for m in self.plug_in_round_mechanisms())
        if c.refused_at is not None:
            return False
        noise_state = self._prepare(i, rnd, "model", noise)
        pipeline = self.model_pipeline(i)
        release = Release("model", theta, rnd, records, self._noise_metadata(i, noise_state))
        if c.journal is not None:  # inside admission_batch: the record's fsync overlaps
            c.journal.syncs = self._syncs
        try:
            admitted = self._release(i, release, pipeline, stop=pipeline.index(CheckExecutedSteps))
        finally:
            if c.journal is not None:
                c.journal.syncs = None
        c.admitted = admitted
        c.checked, c.admitted_noise = False, noise
        c.plug_in_releases = {}
        if admitted is None:
            return False
        c.step_counter.reset()  # count this round's steps from here on
        return True

    def plug_in_round_mechanisms(self) -> tuple[str, ...]:
        """The plug-in Gaussian mechanisms this method's round model release declares (after
        DP-SGD and the lambda), in ledger order: each admitted with the round's model release
        and released by :meth:`gaussian`."""
        return round_plug_ins(self.method, self.cfg)

    def _plug_in_record(self, i: int, mechanism: str) -> MechanismRecord:
        """Client ``i``'s accounting record of one release of plug-in ``mechanism``: its
        planned noise and its record params under the config (sensitivity from its formula)."""
        from privacy.mechanisms import MECHANISMS

        sigma = self.clients[i].plan.noise_for(mechanism)
        if sigma is None:  # a plan from before the method declared it
            raise UndeclaredReleaseError(
                f"method {self.method!r}: client {i}'s plan holds no noise for mechanism "
                f"{mechanism!r}; nothing was released")
        return MECHANISMS.gaussian_record(mechanism, sigma,
                                          _round_record_params(self.cfg, mechanism))

    def gaussian(self, i: int, mechanism: str, value: Tensor, noise: NoiseSource) -> Tensor:
        """Client ``i``'s release of ``value`` under plug-in Gaussian mechanism ``mechanism``:
        ``value + N(0, (sigma * sensitivity)^2)`` per coordinate, ``sigma`` the plan's noise
        multiplier of it and ``sensitivity`` what its formula gives for its record params
        under the config, drawn from ``noise`` (the client's noise source), matched to the
        entry the round's admitted model release wrote for it on the ledger (once per round).
        A mechanism of the method's setup release is released as :meth:`_gaussian_setup` says
        (from ``client_setup``, once per run).

        ``value`` must be what the mechanism's sensitivity bounds (e.g. a clipped mean): the
        caller's claim, which nothing here can check. Raises :class:`UndeclaredReleaseError`
        before anything is drawn when the method's round release does not declare
        ``mechanism``, no round release of client ``i`` is admitted, or that round's step check
        already ran (the call is not from client_update); PipelineError, also before any
        draw, when ``noise`` is not the source client ``i``'s round was admitted with, and when
        the round's entry was used already; MechanismError, before any draw, when ``value`` is
        not a finite floating-point tensor."""
        c = self.clients[i]
        declared = self.plug_in_round_mechanisms()
        setup = {m: kind for kind, m in setup_plug_ins(self.method, self.cfg)}
        if mechanism in setup:
            return self._gaussian_setup(i, setup[mechanism], mechanism, value, noise)
        if mechanism not in declared:
            raise UndeclaredReleaseError(
                f"method {self.method!r}: client {i} asked for a Gaussian release of "
                f"{mechanism!r}, which its round release does not declare (declared plug-in "
                f"mechanisms: {list(declared)}; add it to the round ReleaseSpec('model', "
                "('dpsgd', ...)) of releases(cfg), or declare it alone in a SETUP ReleaseSpec "
                "for one release in client_setup); nothing was released")
        if c.admitted is None or c.refused_at is not None:
            raise UndeclaredReleaseError(
                f"method {self.method!r}: client {i}'s {mechanism!r} release has no admitted "
                "round release to be accounted with (make it from client_update); nothing "
                "was released")
        if c.checked:
            raise UndeclaredReleaseError(
                f"method {self.method!r}: client {i}'s {mechanism!r} release comes after its "
                f"round-{c.admitted.round} reply was checked (outside client_update, e.g. from "
                "the server half, which on Flower holds no client's noise); make it in "
                "client_update; nothing was released")
        if c.admitted_noise is not None and noise is not c.admitted_noise:
            # another source's draws are not in the round's journal: a resume would draw anew
            raise PipelineError(
                f"method {self.method!r}: client {i}'s {mechanism!r} release was given "
                f"{type(noise).__name__} that is not client {i}'s noise source (the one its "
                "round was admitted and journaled with); pass ctx.noise[i]; nothing was "
                "released")
        _check_plug_in_value(f"method {self.method!r}: client {i}'s {mechanism!r} release",
                             value)
        record = self._plug_in_record(i, mechanism)
        params = {k: v for k, v in record.params.items() if k != "sensitivity"}
        stated = RecordParams(noise_assumptions(self.cfg))
        accounted = AccountedWith(c.admitted, c.ledger, c.used_entries)
        try:  # a second call in the round is refused here, before its noise is drawn
            accounted.unused_entry(mechanism, dataclasses.replace(
                record, params={**record.params, **stated.params}))
        except PipelineError as err:
            raise PipelineError(f"method {self.method!r}: client {i}'s {mechanism!r} release: "
                                f"{err} (one gaussian call per mechanism and round: was it "
                                "called twice?); nothing was released") from None
        pipeline = ReleasePipeline([
            GaussianNoise(record.noise_multiplier, record.params["sensitivity"], noise,
                          mechanism, params),
            stated,
            accounted,
        ], require_gate=False)
        released = pipeline.run(Release(mechanism, value, c.admitted.round))
        assert isinstance(released.payload, Tensor)
        c.plug_in_releases[mechanism] = released
        return released.payload

    def check_plug_in_reply(self, stage: str, i: int, rnd: int, reply: Mapping[str, Any],
                            carried: Mapping[str, str]) -> None:
        """Before client ``i``'s ``stage`` reply of round ``rnd`` leaves (both runtimes):
        each entry of ``reply`` that ``carried`` (entry -> plug-in mechanism,
        :attr:`~secure_fedora.algorithms.contract.ReplyRules.plug_in_entries`) says carries a
        release must be the tensor :meth:`gaussian` returned for that client, stage and round
        -- the same dtype and bits (a reshape of it is the same release) -- so that what is
        sent is what the ledger and journal record as noised. :class:`ContractError` naming
        the method, client, entry and mechanism otherwise (nothing is sent)."""
        from secure_fedora.algorithms.contract import SETUP, ContractError

        c = self.clients[i]
        for entry, mechanism in carried.items():
            if entry not in reply:
                continue
            if stage == SETUP:
                made = c.summary_release
                kinds = {k for k, m in setup_plug_ins(self.method, self.cfg) if m == mechanism}
                released = made if made is not None and made.kind in kinds else None
            else:
                made = c.plug_in_releases.get(mechanism)
                released = made if made is not None and made.round == rnd else None
            value = reply[entry]
            if released is not None and _same_bits(value, released.payload):
                continue
            why = (f"is not the {mechanism!r} release ctx.privacy.gaussian returned (its dtype "
                   "and values; a reshape of it is the same release)" if released is not None
                   else f"carries no {mechanism!r} release: ctx.privacy.gaussian was not called")
            raise ContractError(
                f"method {self.method!r}: client {i}'s {stage} reply entry {entry!r} {why}; "
                f"the ledger records the {mechanism!r} release as noised, so reply with the "
                "tensor gaussian returned. Nothing was sent.")

    @contextlib.contextmanager
    def setup_exchange(self) -> Iterator[None]:
        """Run the setup exchange's client halves inside: a plug-in setup release
        (:meth:`_gaussian_setup`) is made only here, never from a later exchange (on Flower a
        later message's client state holds no record of the setup release made earlier)."""
        self._in_setup = True
        try:
            yield
        finally:
            self._in_setup = False

    def _gaussian_setup(self, i: int, kind: str, mechanism: str, value: Tensor,
                        noise: NoiseSource) -> Tensor:
        """Client ``i``'s setup release ``kind`` of plug-in ``mechanism`` (round 0, once per
        run): Gaussian noise from ``noise`` -> gate + ledger -> journal, as the built-in
        summary's; the release is kept (:attr:`ClientPrivacy.summary_release`), which the
        setup's check that every client made its declared release reads. Re-made from its
        journal record on a resume (the same value, no second draw, no second ledger entry).
        Raises, before any draw, :class:`UndeclaredReleaseError` outside
        :meth:`setup_exchange` (the call is not from ``client_setup``), PipelineError when the client was refused or already made
        the release, MechanismError when ``value`` is not a finite floating-point tensor; and
        BudgetExceededError when its budget refuses the release (the run stops: a setup
        needs every client's)."""
        c = self.clients[i]
        what = f"method {self.method!r}: client {i}'s setup release {kind!r} ({mechanism!r})"
        if not self._in_setup:
            raise UndeclaredReleaseError(
                f"{what} is asked for outside the setup exchange; it is declared as a setup "
                "release: make it in client_setup, before round 1; nothing was released")
        if c.refused_at is not None:
            raise PipelineError(f"{what}: client {c.client_id!r} was refused ({c.refusal}); "
                                "nothing was released")
        if c.summary_release is not None:
            raise PipelineError(f"{what} was made already (one gaussian call per setup "
                                "release: was it called twice?); nothing was released")
        _check_plug_in_value(what, value)
        record = self._plug_in_record(i, mechanism)
        params = {k: v for k, v in record.params.items() if k != "sensitivity"}
        noise_state = self._prepare(i, 0, kind, noise)
        stages = [GaussianNoise(record.noise_multiplier, record.params["sensitivity"], noise,
                                mechanism, params),
                  *self._admission_stages(i)]
        released = self._release(i, Release(kind, value, 0, [],
                                            self._noise_metadata(i, noise_state)),
                                 ReleasePipeline(stages))
        if released is None:
            err = c.refusal_error
            would_be = err.epsilon_would_be if err is not None and err.round == 0 else \
                c.gate.accountant.epsilon_after(c.budget.delta, record.noise_multiplier, 1.0, 1)
            raise BudgetExceededError(
                client_id=c.client_id, round=0, mechanism=mechanism, epsilon_would_be=would_be,
                budget=c.budget, reason=f"the setup release {kind!r} was refused (see the "
                "client's ledger); the setup needs every client's, so the run stops")
        assert isinstance(released.payload, Tensor)
        c.summary_release, c.summary_stages = released, stages
        return released.payload

    def noised_summary(self, i: int, data: ClientData, q: int, num_classes: int,
                       noise: NoiseSource) -> Tensor:
        """Client ``i``'s summary alone (:meth:`noised_summaries` for one client), for a
        process that holds only client ``i``'s data and privacy state (a Flower client)."""
        # no round mark: the view's last client is not the round's (the caller marks)
        view = dataclasses.replace(
            self, clients=[self.clients[i]], marks=None,
            journals=None if self.journals is None else [self.journals[i]])
        return view.noised_summaries([data], q, num_classes, [noise])[0]

    def noised_summaries(self, data: Sequence[ClientData], q: int, num_classes: int,
                         noise: Sequence[NoiseSource]) -> Tensor:
        """Each client's summary from its noised clipped second moment (round 0 release):
        clip rows -> second moment -> Gaussian noise -> top-q eigenvectors -> gate + ledger ->
        journal.

        Every client's input (planned noise, rows, ``q``) is checked before the first
        client's noise is drawn or ledger written: a refused call changes nothing. Raises
        BudgetExceededError if any client's budget cannot pay for its summary: without a
        summary the relatedness graph cannot be built, and no silent fallback exists.
        """
        p = self.cfg.privacy
        if len(data) > min(len(noise), len(self.clients)):
            raise PipelineError(f"{len(data)} clients' data, {len(noise)} noise sources and "
                                f"{len(self.clients)} clients; nothing was released")
        built = []
        for i, c in enumerate(data):
            sigma = self.clients[i].plan.summary_noise
            if sigma is None:
                raise PipelineError(
                    f"method {self.method!r}: client {i}'s noised summary has no planned noise: "
                    "the method does not declare the summary release (a ReleaseSpec('summary', "
                    "('gaussian_summary',), SETUP) in releases(cfg)); nothing was released")
            z = fedora.summary_rows(c.train_x, c.train_y, num_classes)
            if not 1 <= q <= z.shape[1]:
                raise fedora.RelatednessError(
                    f"fedora.q = {q}: q must lie in [1, {z.shape[1]}] (the number of summary "
                    "features); lower fedora.q")
            # the stages check clip, n, q, sigma and the noise source; clip_rows the rows
            noised = second_moment_stages(p.summary_clip, int(z.shape[0]), q, sigma, noise[i])
            clip_rows(z, p.summary_clip)
            built.append((sigma, noised))
        out = []
        for i, (c, (sigma, noised)) in enumerate(zip(data, built, strict=True)):
            # made again rather than kept from the check: one client's rows in memory at a time
            z = fedora.summary_rows(c.train_x, c.train_y, num_classes)
            noise_state = self._prepare(i, 0, "summary", noise[i])
            stages = [*noised, *self._admission_stages(i)]
            released = self._release(i, Release("summary", z, 0, [],
                                                self._noise_metadata(i, noise_state)),
                                     ReleasePipeline(stages))
            if released is None:
                state = self.clients[i]
                err = state.refusal_error
                would_be = err.epsilon_would_be if err is not None and err.round == 0 else \
                    state.gate.accountant.epsilon_after(state.budget.delta, float(sigma), 1.0, 1)
                raise BudgetExceededError(
                    client_id=state.client_id, round=0, mechanism="gaussian_summary",
                    epsilon_would_be=would_be, budget=state.budget,
                    reason="the summary release was refused (see the client's ledger);"
                    " relatedness cannot be estimated, so the run stops",
                )
            assert isinstance(released.payload, Tensor)
            self.clients[i].summary_release, self.clients[i].summary_stages = released, stages
            out.append(released.payload)
            if i == len(self.clients) - 1:  # the last summary record: mark before it leaves
                self.mark_round(0, range(len(self.clients)))
            crash_point("summary")
        return torch.stack(out)

    def private_lambda(self, i: int, theta: Tensor, phi: Tensor, val_x: Tensor, val_y: Tensor,
                       noise: NoiseSource, bind: Any) -> float:
        """``lambda_i`` from a clipped, noised mean of per-example loss differences (noise
        drawn from client ``i``'s ``noise`` source): clamp -> mean -> Gaussian noise -> matched
        to the record of the round's admitted model release on the ledger (PipelineError if
        no admitted release accounts it, or its entry was used already, or the method does not
        declare the lambda release; raised before the validation data is read)."""
        c = self.clients[i]
        sigma = c.plan.lambda_noise
        if sigma is None:
            raise PipelineError(
                f"method {self.method!r}: client {i}'s private lambda has no planned noise: the "
                "method does not declare the lambda release (its round ReleaseSpec 'model' must "
                "list ('dpsgd', 'gaussian_lambda') in releases(cfg)); nothing was released")
        m = int(val_x.shape[0])
        stages = self._lambda_stages(c, m, sigma, noise)
        accounted = AccountedWith(c.admitted, c.ledger, c.used_entries)
        # the record the stages will make, matched before the model runs or noise is drawn:
        # a refused lambda leaves the noise source and the used entries as they were
        record = scalar_record(self.cfg.privacy.lambda_clip, sigma, m)
        accounted.unused_entry("lambda", dataclasses.replace(
            record, params={**record.params, **noise_assumptions(self.cfg)}))
        model = bind(theta)
        was_training = isinstance(model, torch.nn.Module) and model.training
        if was_training:
            model.eval()  # as evaluate(): no dropout mask, no draw from torch's global generator
        try:
            with torch.no_grad():
                loss_local = self.loss(model(val_x), val_y)
                loss_received = self.loss(bind(phi)(val_x), val_y)
        finally:
            if was_training:
                model.train()
        if not (bool(torch.isfinite(loss_local).all()) and bool(torch.isfinite(loss_received).all())):
            raise ClientUpdateError(f"client {i}: non-finite validation losses, nothing released "
                                    f"({DIVERGED_HINT})")
        rnd = c.admitted.round if c.admitted is not None else 0
        pipeline = ReleasePipeline([*stages, accounted], require_gate=False)
        released = pipeline.run(Release("lambda", (loss_local - loss_received).double(), rnd))
        diff = float(released.payload)  # type: ignore[arg-type]
        # the paper's rule on the released difference (inf beyond float range, not OverflowError)
        return fedora.regularization_weight(diff, 0.0)

    def _lambda_stages(self, c: ClientPrivacy, m: int, sigma: float,
                       noise: NoiseSource) -> list[Any]:
        """Client ``c``'s lambda stages before its accounting check (clamp, mean, Gaussian
        noise from ``noise``, the noise assumptions), built on the first call and reused
        while clip, split size ``m``, ``sigma``, the assumptions and the noise source are
        the same: the same stages a fresh build gives, without re-validating them each round."""
        assumptions = noise_assumptions(self.cfg)
        key = (self.cfg.privacy.lambda_clip, m, sigma, assumptions)
        cached = c.lambda_stages
        if cached is not None and cached[0] == key and cached[1] is noise:
            return cached[2]
        stages = [*noised_mean_stages(key[0], m, sigma, noise), RecordParams(assumptions)]
        c.lambda_stages = (key, noise, stages)
        return stages

    def summary(self, *, model_fingerprint: str | None = None) -> dict[str, Any]:
        """``privacy.<method>`` of results.json (:func:`privacy_section`, the shape both
        runtimes write): per-client spending, the run's refusal events, its ledger recoveries
        and resumes. ``epsilon_spent`` is the accountant's epsilon exactly (the float64 value
        a Flower client reports and its ledger's close entry states): it is rounded, up, only
        where it is shown. ``model_fingerprint``: the fingerprint of the model the releases
        come from (the runtime gives it; None: not given)."""
        return privacy_section(
            method=self.method, noise=noise_assumptions(self.cfg), accountant=self.accountant,
            accountant_choice=None if self.accountant_choice is None
            else self.accountant_choice.to_json(),
            plan=self.plan_rows(), release_stages=self.declared_release_stages(),
            sample_rate=self.sample_rate, steps_per_round=self.steps,
            model_fingerprint=model_fingerprint, note=IN_PROCESS_PRIVACY_NOTE,
            clients=[client_row(
                client=c.client_id, index=c.index, epsilon_budget=c.budget.epsilon,
                delta=c.budget.delta, epsilon_spent=float(c.epsilon),
                noise_multiplier=c.noise_multiplier, accountant=self.accountant,
                summary_noise=c.plan.summary_noise, lambda_noise=c.plan.lambda_noise,
                mechanism_noise=dict(c.plan.mechanism_noise),
                # in process the server holds each client's own plan: never the config's stand-in
                plan_reported=True, refused_at_round=c.refused_at,
                ledger_entries=len(c.ledger.entries), ledger_head=c.ledger.head[1])
                for c in self.clients],
            events=self.events, recoveries=self.recoveries, resumes=self.resumes)


#: ``privacy.<method>.note`` of an in-process run: where its figures come from.
IN_PROCESS_PRIVACY_NOTE = ("budgets, plan, each client's noise and spending as the run's own "
                           "accountants hold them (the in-process server holds every client's "
                           "plan: plan_reported true); each client's signed ledger is the record")

#: The keys of ``privacy.<method>`` of results.json, in order, written alike by both runtimes
#: (:func:`privacy_section`); ``noise_warning`` only with reproducible noise
#: (:func:`noise_assumptions`), ``resumes`` only in a run that was resumed, and
#: ``reply_entries`` added by the results builder.
PRIVACY_SECTION_KEYS = ("method", "noise", "noise_warning", "accountant", "accountant_choice",
                        "plan", "epsilon_figures", "release_stages", "sample_rate",
                        "steps_per_round", "model_fingerprint", "note", "clients", "events",
                        "recoveries", "resumes")


def privacy_section(*, method: str, noise: Mapping[str, str], accountant: str,
                    accountant_choice: Mapping[str, Any] | None,
                    plan: Sequence[Mapping[str, Any]], release_stages: Mapping[str, list[str]],
                    sample_rate: float, steps_per_round: int, model_fingerprint: str | None,
                    note: str,
                    clients: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]],
                    recoveries: Sequence[Mapping[str, Any]] | None,
                    resumes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``privacy.<method>`` of results.json, the same keys (:data:`PRIVACY_SECTION_KEYS`) in
    both runtimes: the noise mode (:func:`noise_assumptions`), accountant, plan rows,
    :data:`EPSILON_FIGURES`, the release stages, the model's fingerprint, ``note`` (where the
    runtime's figures come from), the :func:`client_row` rows, ``events`` (every refused
    release, :func:`refusal_event`), ``recoveries`` (the torn ledger or journal tails a resume
    repaired or quarantined; None where the runtime does not see them: on Flower each
    SuperNode repairs its own and logs it) and ``resumes`` (only when the run was resumed)."""
    return {
        "method": method,
        **noise,
        "accountant": accountant,
        "accountant_choice": None if accountant_choice is None else dict(accountant_choice),
        "plan": [dict(row) for row in plan],
        "epsilon_figures": EPSILON_FIGURES,
        "release_stages": dict(release_stages),
        "sample_rate": sample_rate,
        "steps_per_round": steps_per_round,
        "model_fingerprint": model_fingerprint,
        "note": note,
        "clients": [dict(row) for row in clients],
        "events": [dict(e) for e in events],
        "recoveries": None if recoveries is None else [dict(r) for r in recoveries],
        **({"resumes": [dict(r) for r in resumes]} if resumes else {}),
    }


def refusal_event(*, rnd: int, client: str, detail: str) -> dict[str, Any]:
    """One ``privacy.<method>.events`` row of results.json, alike in both runtimes: client
    ``client`` (its id) refused its release of round ``rnd`` (0: the setup's), ``detail``
    saying why (in process the refusal's error; on Flower the reason the client's signed
    refusal gave)."""
    return {"round": rnd, "client": client, "event": "refused", "detail": detail}


#: The keys of each ``privacy.<method>.clients[]`` row of results.json, in order, written
#: alike by both runtimes (:func:`client_row`).
CLIENT_ROW_KEYS = ("client", "index", "epsilon_budget", "delta", "epsilon_spent",
                   "noise_multiplier", "accountant", "summary_noise", "lambda_noise",
                   "mechanism_noise", "plan_reported", "refused", "refused_at_round",
                   "ledger_entries", "ledger_head")


def client_row(*, client: str, index: int, epsilon_budget: float, delta: float,
               epsilon_spent: float | None, noise_multiplier: float, accountant: str,
               summary_noise: float | None, lambda_noise: float | None,
               mechanism_noise: Mapping[str, float], plan_reported: bool,
               refused_at_round: int | None, ledger_entries: int | None,
               ledger_head: str | None) -> dict[str, Any]:
    """One client's ``privacy.<method>.clients[]`` row of results.json, the same keys
    (:data:`CLIENT_ROW_KEYS`) in both runtimes: its budget and exact epsilon spent, the noise
    of each mechanism it releases under (None for a mechanism its method does not release;
    ``mechanism_noise``: plug-in Gaussian mechanisms by name), ``plan_reported`` (False only
    for a Flower client that reported no plan: the config's calibration stands for it), and
    ``refused`` with ``refused_at_round``, the round of its first refused release (-1: refused
    before a restart, round not recorded; None: never refused)."""
    return {"client": client, "index": index, "epsilon_budget": epsilon_budget,
            "delta": delta, "epsilon_spent": epsilon_spent, "noise_multiplier": noise_multiplier,
            "accountant": accountant, "summary_noise": summary_noise,
            "lambda_noise": lambda_noise, "mechanism_noise": dict(mechanism_noise),
            "plan_reported": plan_reported, "refused": refused_at_round is not None,
            "refused_at_round": refused_at_round, "ledger_entries": ledger_entries,
            "ledger_head": ledger_head}


def ledger_went_back(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> str | None:
    """How a client's newly reported ledger state (``epsilon_spent``, ``ledger_entries``,
    ``ledger_head``) fails to extend the one it reported before (fewer entries, the same count
    with another head, or a lower epsilon); None when it extends it or there is nothing to
    compare. The server-side check of both runtimes: a report that went back stops the run."""
    if before is None:
        return None
    if "ledger_entries" in before and "ledger_head" in before:
        if now.get("ledger_entries", -1) < before["ledger_entries"]:
            return f"{now.get('ledger_entries')} entries after {before['ledger_entries']}"
        if now.get("ledger_entries") == before["ledger_entries"] \
                and now.get("ledger_head") != before["ledger_head"]:
            return f"{before['ledger_entries']} entries with another last line"
    if now["epsilon_spent"] < before["epsilon_spent"] * (1.0 - 1e-12):
        # exactly: at six digits a spend that went back by under 1e-6 read "2.5 after 2.5"
        return (f"epsilon {format_exact(now['epsilon_spent'])} after"
                f" {format_exact(before['epsilon_spent'])}")
    return None


def ledger_spend_changed(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> str | None:
    """How a client's newly reported ledger state states another spend for the ledger it
    reported before: the same ``ledger_entries`` and ``ledger_head`` with an
    ``epsilon_spent`` of another value (a client's epsilon is its accountant replayed
    from those entries, bit for bit under every accountant, so a second figure for one ledger
    is not that ledger's spend); None otherwise, or when either report lacks its ledger
    state. The server-side check of both runtimes, beside :func:`ledger_went_back`: such a
    report stops the run. Figures within a relative 1e-12 are the same spend, as
    :func:`ledger_went_back` reads them: a node resumed on another CPU model may replay its
    accountant with numpy's other vector code, whose last bits can differ."""
    if before is None or any(k not in r for r in (before, now)
                             for k in ("ledger_entries", "ledger_head")):
        return None
    if (now["ledger_entries"], now["ledger_head"]) != (before["ledger_entries"],
                                                       before["ledger_head"]):
        return None
    now_spent, before_spent = float(now["epsilon_spent"]), float(before["epsilon_spent"])
    if abs(now_spent - before_spent) <= 1e-12 * max(abs(now_spent), abs(before_spent)):
        return None
    return (f"epsilon {format_exact(now['epsilon_spent'])} for the {before['ledger_entries']}"
            f" entries it had reported with epsilon {format_exact(before['epsilon_spent'])}")


def ledger_report_refusal(before: Mapping[str, Any] | None, now: Mapping[str, Any], *,
                          who: str, where: str, went_back_remedy: str,
                          spend_remedy: str | None = None) -> str | None:
    """Why the server must stop the run on a client's newly reported ledger state ``now``
    (from ``who``, in its ``where``), after ``before``: it went back
    (:func:`ledger_went_back`; entries lost, cut or replaced) or states another spend for the
    same ledger (:func:`ledger_spend_changed`), each text ending in its runtime's remedy;
    None when ``now`` may become the client's latest report. The one check both runtimes
    make, each raising its own error with the text."""
    went_back = ledger_went_back(before, now)
    if went_back is not None:
        return (f"{who} reported a ledger that went back ({went_back}) in its {where}: entries "
                "it had reported were lost, cut or replaced, so its accounting would record "
                f"fewer releases than it made; the run stops ({went_back_remedy})")
    changed = ledger_spend_changed(before, now)
    if changed is not None:
        return (f"{who} reported another spend for the same ledger ({changed}) in its {where}:"
                " its epsilon is computed from its ledger alone, so one of the two figures is "
                "not its ledger's spend; the run stops"
                + (f" ({spend_remedy})" if spend_remedy else ""))
    return None


#: The fields a DP client's evaluation reply reports after its metrics, in process (the
#: float64 vector of kind ``evaluate.reply``): epsilon spent and budget, the ledger's entry
#: count, then its head (SHA-256 of the last line) as 8 words of 32 bits, each exact in float64.
LEDGER_REPORT_SIZE = 3 + 8


def ledger_report(client: ClientPrivacy) -> list[float]:
    """What ``client`` reports of its ledger with an evaluation reply (as a Flower client's
    ``epsilon-spent``, ``epsilon-budget``, ``ledger-entries`` metrics and ``ledger`` record),
    :data:`LEDGER_REPORT_SIZE` float64-exact values; :func:`read_ledger_report` reads it."""
    entries, head = client.ledger.head
    words = [float(int(head[k:k + 8], 16)) for k in range(0, 64, 8)]
    return [float(client.epsilon), float(client.budget.epsilon), float(entries), *words]


def read_ledger_report(values: Sequence[float]) -> dict[str, Any]:
    """The report :func:`ledger_report` made, as the Flower server reads a reply's
    (``epsilon_spent``, ``epsilon_budget``, ``ledger_entries``, ``ledger_head``); ValueError
    for values no client reports (a count or head word that is not a whole number in range)."""
    if len(values) != LEDGER_REPORT_SIZE:
        raise ValueError(f"a ledger report holds {LEDGER_REPORT_SIZE} values, got {len(values)}")
    spent, budget, entries, *words = (float(v) for v in values)
    if not all(w.is_integer() and 0 <= w < 2 ** 32 for w in words) \
            or not (entries.is_integer() and entries >= 0):
        raise ValueError("ledger report: entry count and head must be whole numbers in range")
    return {"epsilon_spent": spent, "epsilon_budget": budget, "ledger_entries": int(entries),
            "ledger_head": "".join(f"{int(w):08x}" for w in words)}


def _journal_noise_state(noise: NoiseSource) -> bytes:
    """The bytes that let a journaled release be re-made: a reproducible generator's state
    (only its digest is journaled), or a CSPRNG's key and stream position (journaled sealed)."""
    if isinstance(noise, ReproducibleNoise):
        return bytes(noise.checkpoint_state().numpy().tobytes())
    if isinstance(noise, CsprngNoise):
        return noise.journal_state()
    raise JournalError(f"noise source {type(noise).__name__} cannot be journaled")


def encrypted_release_kinds(cfg: ExperimentConfig, method: str) -> tuple[str, ...]:
    """The release kinds ``method`` declares encrypted under ``cfg`` (``ReleaseSpec.encrypted``:
    an :class:`~privacy.pipeline.EncryptPayload` stage in that release's pipeline)."""
    from secure_fedora.algorithms.contract import method_releases

    return tuple(spec.kind for spec in method_releases(method, cfg) if spec.encrypted)


def release_stage_names(cfg: ExperimentConfig, method: str, *, signed: bool,
                        journaled: bool = True) -> dict[str, list[str]]:
    """The stages each release a client of ``method`` declares (``releases(cfg)``) passes in
    production under DP, in order, up to the upload, for a process that holds no client
    state (the Flower server's results): ``signed`` where envelopes are on (always on
    Flower), ``journaled`` where the pipeline has the journal stage (both runtimes; False
    lists a pipeline built without it).
    Equal to :meth:`FederationPrivacy.release_stages` for the kinds declared (tested)."""
    encrypted = encrypted_release_kinds(cfg, method)
    admission = ["RecordParams", "BudgetGate", *(["JournalRelease"] if journaled else [])]

    def leave(kind: str) -> list[str]:
        return [*(["EncryptPayload"] if kind in encrypted else []),
                *(["SignEnvelope"] if signed else [])]

    built = {
        "model": [*admission, "CheckExecutedSteps", *leave("model")],
        "summary": ["ClipRows", "second_moment", "SymmetricGaussianNoise",
                    "top_eigenvectors", *admission, *leave("summary")],
        "lambda": ["ClampValues", "mean", "GaussianNoise", "RecordParams", "AccountedWith"],
    }
    plug_in = ["GaussianNoise", "RecordParams", "AccountedWith"]  # FederationPrivacy.gaussian
    return {kind: built.get(kind, plug_in) for kind in _declared_kinds(method, cfg)}


def _declared_kinds(method: str, cfg: ExperimentConfig) -> list[str]:
    """The release kinds ``method`` declares under ``cfg`` (``lambda`` for a round release
    that includes ``gaussian_lambda``), in the order model, summary, lambda."""
    from secure_fedora.algorithms.contract import method_releases

    kinds = set()
    plug_ins: list[str] = []
    for spec in method_releases(method, cfg):
        kinds.add(spec.kind)
        if "gaussian_lambda" in spec.mechanisms:
            kinds.add("lambda")
        if spec.kind == "model":
            plug_ins += _plug_in_round_mechanisms(spec.mechanisms) or ()
    setup = [kind for kind, _ in setup_plug_ins(method, cfg)]
    return [k for k in ("model", "summary", "lambda") if k in kinds] + plug_ins + setup


def noise_is_reproducible(cfg: ExperimentConfig) -> bool:
    """True when a re-run draws the clients' noise again identically (``[privacy] noise =
    "reproducible"``)."""
    return cfg.privacy.noise == "reproducible"


def _check_journal_covers(entries: list[dict[str, Any]], journal: ReleaseJournal,
                          client_id: str) -> None:
    """JournalError unless every release the ledger records has its journal record (the
    journal is append-only for the whole run): a replayed release without one would be re-made
    with fresh noise while its ledger entry is consumed, i.e. a second release accounted once,
    and a lost record of an earlier release shows the journal was lost or cut. Only the
    release whose entries end the ledger may lack it (the run stopped after the ledger was
    written and before its journal record, so it never left). Refusals record no release."""
    last = _last_release(entries)
    exempt = None if last is None else (last["round"], last["params"]["release_kind"])
    for entry in entries:
        if entry["mechanism"] in (REFUSAL, CLOSE, REPAIR):
            continue
        params = entry.get("params")
        kind = params.get("release_kind") if isinstance(params, dict) else None
        if kind is None or (entry["round"], kind) == exempt:
            continue
        if journal.get(entry["round"], kind) is None:
            raise JournalError(
                f"client {client_id!r}: ledger entry {entry['index']} records its round-"
                f"{entry['round']} {kind!r} release, but the journal {str(journal.path)!r} has no"
                " record of it (lost or cut): resuming would make that release again with new"
                " noise, accounted once. Restore the journal from a copy, or start a new run")


def _last_release(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last entry that records something, when it names a release kind (a torn tail's
    repair entry may follow it): the one release that may lack its journal record."""
    last = next((e for e in reversed(entries) if e["mechanism"] != REPAIR), None)
    if last is not None and isinstance(last.get("params"), dict) \
            and last["params"].get("release_kind"):
        return last
    return None


def _lost_marks(checks: Sequence[LedgerCheck], marks: RoundMarks,
                admitting: RoundMarks | None) -> str | None:
    """Why ``marks`` cannot be trusted, or None: the admissions of a round ``A`` start only
    after every earlier round's releases left, each after its round's mark, so marks ending
    before a round that the ledgers record releases of and that precedes ``A`` were lost or
    cut (``rounds.released`` deleted or emptied). ``A`` is the later of the last round
    ``admitting`` names (a batch's round is named before its first ledger entry) and the last
    round any client's ledger records a release of (signed entries, so this holds when both
    mark files were lost)."""
    entries = [e for check in checks for e in check.entries if e["mechanism"] not in NON_RELEASES]
    batched = admitting.last if admitting is not None else -1
    latest = max([batched, *(e["round"] for e in entries)])
    released = [e["round"] for e in entries if e["round"] < latest]
    if not released or marks.last >= max(released):
        return None
    shown = (f"{str(admitting.path)!r} shows round {latest} was admitted, which happens"
             if admitting is not None and batched == latest
             else f"the ledgers record round-{latest} releases, admitted")
    return (f"and {str(marks.path)!r}, which marks rounds up to {marks.last} only, was lost"
            f" or cut: {shown} only after round {max(released)} was marked")


def _check_unjournaled_tails(checks: Sequence[LedgerCheck], marks: RoundMarks,
                             admitting: RoundMarks | None = None, *,
                             gone: Sequence[Path] = ()) -> None:
    """JournalError when a client's last release lacks its journal record although the run
    went past that release's journal write: ``marks`` marks its round (a round is marked
    after its last journal record, before any of its releases leaves), or another client's
    ledger shows it (in process the clients are admitted one after another in index order
    within a round (gate, ledger, journal), so a release or refusal entry of a later round,
    or of the same round by a client with a higher index, was written after this client's
    record). The record was then lost or cut (a torn record included), not missing because
    of a crash, and the release may have left: re-making it would draw new noise under the
    ledger entry it consumes. A last release of an unmarked round that nothing came after
    stays exempt (:func:`_check_journal_covers`): the crash window, before it left. A round
    ``admitting`` names last was admitted as one batch (journal fsyncs overlapping, no
    release leaving before the batch ended and the round was marked): there a same-round
    entry of a higher-indexed client proves nothing, and only the mark does. Marks that
    ``admitting`` or the ledgers show were lost or cut (:func:`_lost_marks`), or mark files
    ``gone`` from a ledger folder created with them, prove nothing either way: an unjournaled
    last release is then refused too. So is one when ``marks`` ends in a torn mark (a mark's
    write begins only after every record of its round) or is empty (format 2 creates it
    holding its header, so it was cut; a format-1 file cannot tell)."""
    batched = admitting.last if admitting is not None else None
    lost_marks = _lost_marks(checks, marks, admitting)
    if gone and lost_marks is None:
        lost_marks = (f"and {', '.join(repr(str(p)) for p in gone)}, created with the ledgers,"
                      f" {'is' if len(gone) == 1 else 'are'} gone (lost)")
    for k, check in enumerate(checks):
        last = _last_release(check.entries)
        if last is None or check.journal.get(last["round"],
                                             last["params"]["release_kind"]) is not None:
            continue
        what = (f"client {check.client_id!r}: ledger entry {last['index']} records its"
                f" round-{last['round']} {last['params']['release_kind']!r} release, but the"
                f" journal {str(check.journal.path)!r} has no complete record of it,")
        consequence = (": the record was written and then lost or cut, and the release may"
                       " have left, so resuming would make it again with new noise, accounted"
                       " once. Nothing was written. Restore the journal from a copy, or start"
                       " a new run")
        for j, other in enumerate(checks):
            later = next((e for e in other.entries if e["mechanism"] not in (REPAIR, CLOSE)
                          and (e["round"] > last["round"]
                               or (e["round"] == last["round"] and j > k
                                   and last["round"] != batched))), None)
            if j != k and later is not None:
                raise JournalError(
                    f"{what} though client {other.client_id!r} released after it (its ledger"
                    f" entry {later['index']}, round {later['round']}){consequence}")
        if marks.covers(last["round"], k):
            raise JournalError(
                f"{what} though {str(marks.path)!r} marks this client's releases of rounds up"
                f" to {last['round']} as journaled before any left{consequence}")
        if lost_marks is not None:
            raise JournalError(
                f"{what} {lost_marks}: the release may have left, so resuming would make it"
                " again with new noise, accounted once. Nothing was written. Restore the"
                " journal and the marks from a copy, or start a new run")
        if marks.torn is not None:
            raise JournalError(
                f"{what} though {str(marks.path)!r} ends in a torn mark ({len(marks.torn)}"
                " bytes after its last complete line), and a mark is written only after every"
                f" record of its round{consequence}")
        if marks.format is None:
            raise JournalError(
                f"{what} though {str(marks.path)!r} is empty: it is created holding a header"
                f" line (round-marks format {MARKS_FORMAT}), so it was cut and may have marked"
                " this release (an empty file of an earlier version, round-marks format 1,"
                " cannot tell this crash window from such a cut either)"
                f"{consequence}")


def _journaled_lines(journal: ReleaseJournal) -> dict[int, str]:
    """Index -> line of the ledger entries the journal holds whole (those recording no
    release: refusals, closes, repairs)."""
    return {r.ledger_index: r.ledger_line for r in journal if r.ledger_line}


@dataclass(frozen=True)
class LedgerCheck:
    """What :func:`check_ledger` found of one client's ledger and journal, writing nothing.

    ``journal`` is opened with a torn last record skipped, not yet moved aside; ``restore``
    the indices of the entries a cut removed that the journal holds whole (written back by
    :func:`recover_ledger`); ``complete`` how many entries were complete once (a torn line
    below it was cut, not torn by a crash); ``entries`` the verified entries the ledger holds
    once restored (before a torn last line's repair, which only appends)."""

    ledger_path: Path
    client_id: str
    journal: ReleaseJournal
    restore: list[int]
    complete: int
    complete_by: str
    entries: list[dict[str, Any]]

    @property
    def head(self) -> tuple[int, str]:
        """(entries, hash of the last line) of the ledger once restored."""
        last = line_hash(canonical_json(self.entries[-1])) if self.entries else GENESIS_HASH
        return len(self.entries), last

    def holds(self, count: int, head: str) -> bool:
        """:meth:`~privacy.ledger.LedgerWriter.holds` of the ledger once restored."""
        return entries_hold(self.entries, self.head[1], count, head)


def check_ledger(ledger_path: Path, client_id: str, scope: str, identity: Any, *,
                 reported: int = 0, reported_by: str = "") -> LedgerCheck:
    """The checks of a client's ledger and its journal (``<client id>.journal`` beside it,
    opened for ``scope``, the method) that go before its ledger is restored or repaired,
    writing nothing (the one implementation of both runtimes).

    ``reported`` is how many entries are known complete once from elsewhere (``reported_by``:
    from where, e.g. a Flower client's saved state or the server); the journal shows too,
    as a record is written only after its ledger entry is fsynced. Raises
    :class:`~privacy.ledger.LedgerCutError` for a ledger cut inside an entry complete once
    that the journal cannot restore, LedgerError for complete lines that fail verification
    (chain, signatures, client id), and JournalError for an unreadable journal or records
    that do not match the ledger."""
    journal = ReleaseJournal(ledger_path.with_name(f"{client_id}.journal"), client_id, scope,
                             identity.agreement_key, quarantine=False)
    journaled = max((r.ledger_index for r in journal), default=-1) + 1
    complete, known_by = ((reported, reported_by) if reported > journaled
                          else (journaled, f"journal {str(journal.path)!r}"))
    lines = _journaled_lines(journal)
    restore = restore_cut_tail(ledger_path, client_id, identity.signing_key.public_key(), lines,
                               write=False)
    if not restore:
        refuse_cut_tail(ledger_path, complete, known_by=known_by)
    entries = [*read_complete_entries(ledger_path), *(json.loads(lines[k]) for k in restore)]
    problems = verify_ledger(entries, identity.signing_key.public_key(), client_id=client_id)
    if problems:
        shown = "; ".join(str(p) for p in problems[:3])
        raise LedgerError(f"ledger {str(ledger_path)!r} failed verification ({shown}); nothing"
                          " was restored, repaired or written. Restore the ledger from a copy")
    _check_records(journal, entries)
    return LedgerCheck(ledger_path, client_id, journal, restore, complete, known_by, entries)


def recover_ledger(check: LedgerCheck, signing_key: Any, budget: PrivacyBudget,
                   accountant: str) -> list[TornTailRepair]:
    """Once every check passed (:func:`check_ledger`): write back the entries a cut removed
    from the journal, bit for bit, then quarantine a torn last line with a signed repair entry
    (:func:`privacy.ledger.repair_torn_tail`), each logged; returns the repairs made."""
    path = check.ledger_path
    if check.restore:
        restore_cut_tail(path, check.client_id, signing_key.public_key(),
                         _journaled_lines(check.journal))
        log.warning("ledger %s: entries %s, cut off since they were written, restored from"
                    " journal %s", path, check.restore, check.journal.path.name)
    repairs = repair_torn_tail(path, check.client_id, signing_key, delta=budget.delta,
                               budget_epsilon=budget.epsilon, accountant=accountant,
                               complete=check.complete, known_by=check.complete_by)
    for repair in repairs:
        log.warning("ledger %s: torn final line (%d bytes) quarantined in %s; repair entry %d"
                    " appended", path, repair.torn_bytes, repair.quarantine.name,
                    repair.entry["index"])
    return repairs


def _check_resumable(ledger_dir: Path, client_id: str, method: str,
                     identity: Any) -> LedgerCheck:
    """:func:`check_ledger` of a client of an in-process resume, which also checks that the
    journal holds a record of every release the ledger records (:func:`_check_journal_covers`;
    a JournalError); the torn last record of its journal waits for
    :meth:`FederationPrivacy.resume_after`, which moves it aside once every check passed."""
    check = check_ledger(ledger_dir / f"{client_id}.jsonl", client_id, method, identity)
    # a repair entry appended later records nothing, so these entries decide it already
    _check_journal_covers(check.entries, check.journal, client_id)
    return check


def _journal_non_releases(ledger: LedgerWriter, journal: ReleaseJournal) -> None:
    """Journal, whole, every entry of ``ledger`` that records no release (refusal, close,
    repair) and has no record yet, so that a ledger cut inside or after it is restored on
    resume instead of repaired as a write that never completed."""
    for entry in ledger.entries:
        if entry["mechanism"] in NON_RELEASES and journal.get(
                entry["round"], f"{entry['mechanism']}@{entry['index']}") is None:
            journal.append(JournalRecord.for_entry(canonical_json(entry)))


def _check_records(journal: ReleaseJournal, entries: list[dict[str, Any]]) -> None:
    """JournalError unless each record of ``journal`` names an existing ledger entry of the
    same round and release kind (or, for an entry journaled whole, that very line): the
    journal is written after the ledger."""
    for record in journal:
        index = record.ledger_index
        entry = entries[index] if index < len(entries) else None
        kind = (None if entry is None else f"{entry['mechanism']}@{index}" if record.ledger_line
                else entry["params"].get("release_kind"))
        if entry is None or entry["round"] != record.round or kind != record.kind:
            raise JournalError(
                f"journal {str(journal.path)!r}: the round-{record.round} {record.kind!r} record"
                f" names ledger entry {index}, which does not record that release"
            )
        if record.ledger_entry_sha256 and record.ledger_entry_sha256 != line_hash(
                canonical_json(entry)):
            raise JournalError(
                f"journal {str(journal.path)!r}: the round-{record.round} {record.kind!r} record"
                f" was written beside another ledger (its entry {index} differs): the journal is"
                " another run's; restore this run's journal, or start a new run")


def client_noise_sources(cfg: ExperimentConfig, n: int) -> list[NoiseSource]:
    """One noise source per client under ``privacy.noise``: a fresh CSPRNG key each (never
    stored), or generators seeded from the experiment seed and the client index."""
    return [make_noise_source(cfg.privacy.noise, cfg.seed, i) for i in range(n)]


def noise_assumptions(cfg: ExperimentConfig) -> dict[str, str]:
    """``{"noise": mode}`` plus, for reproducible noise, ``"noise_warning"`` (empty without DP).

    Shown in the printed plan and results.json, and written (signed) into the params of every
    release's ledger entry (a close entry, which releases nothing, has none).
    """
    if not cfg.privacy.enabled:
        return {}
    if cfg.privacy.noise == "reproducible":
        return {"noise": "reproducible", "noise_warning": REPRODUCIBLE_WARNING}
    return {"noise": "csprng"}
