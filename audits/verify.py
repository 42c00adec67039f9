"""Independent verification of a run's privacy ledgers.

``verify_run(run_dir)`` checks, for every ``ledgers/<client>.jsonl`` of a run directory:

1. **Integrity** (re-implemented here from the format documented in :mod:`privacy.ledger`,
   not by calling the writer's own verifier, so a bug shared by writer and verifier cannot
   hide a problem): each line is a JSON object in canonical form
   (``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True)``) with exactly
   the documented fields and types; ``index`` equals the line position; ``prev_hash`` equals
   the SHA-256 of the previous line (64 zeros first); the Ed25519 ``signature`` (lowercase
   hex) over the canonical JSON of the other fields verifies under the client's registered
   public key (the allowlist); every entry names the ledger's client; the last line ends in a
   newline.
2. **Accounting**, with an accountant independent of Opacus: Google's ``dp_accounting``. Each
   non-refusal entry's ``(noise_multiplier, sample_rate, steps)`` is a ``steps``-fold
   self-composition of a Poisson-subsampled Gaussian (a plain Gaussian when
   ``sample_rate == 1``). For ``accountant == "rdp"`` every entry's cumulative epsilon is
   recomputed with ``dp_accounting``'s RDP analysis (its default orders, a superset of
   the recorder's); for ``"prv"`` and ``"pld"`` with its PLD accountant (pessimistic estimate) at up to
   ``pld_checkpoints`` entries, always including the last (a PLD evaluation costs about a
   second, so intermediate PRV entries are otherwise checked for monotonicity only). Tolerance: the two libraries
   use different RDP order grids and numerics (a fractional order whose series
   ``dp_accounting`` cannot converge, which it drops, is evaluated here by numerical
   integration with scipy instead; Opacus's PRV and ``dp_accounting``'s PLD discretize
   differently), measured here to differ by at most about 0.8% (RDP) and 1.6% (PRV vs PLD)
   on typical DP-SGD histories. An entry is **under-reported** (an error) when
   ``recorded < independent * (1 - rel_tol)``, default ``rel_tol = 0.02`` (for a PLD or PRV
   ledger, ``independent`` is then recomputed at the finer ``PLD_RECHECK_DISCRETIZATIONS``
   and the smallest is used: at a tiny epsilon the PLD at 1e-3 overstates it); recorded values
   above ``independent * (1 + rel_tol)`` are conservative and reported as a warning.
   For every ledger, the whole history is also recomputed with both ``dp_accounting``
   methods: a recorded final epsilon below the pessimistic PLD value by more than
   ``rel_tol`` is an error (no valid accountant can be tighter than that), and the recorded
   value is compared with the method that is not the recorder's (PLD for ``"rdp"``, RDP for
   ``"pld"``/``"prv"``): ``cross_difference`` says by how much they differ. A plug-in
   accountant's ledger (any other registered name) is checked as a PRV one (PLD at
   checkpoints; under-reporting an error); where the accountant is registered in this process
   (``imports=``) every release entry's ``epsilon_after`` must also equal (within
   ``SPENT_TOL``) what it computes from the ledger's releases with the recorded
   ``accountant_params``, else an unchecked ``plug_in_accountant`` warning says it was not.
3. **Budgets**: every entry's ``epsilon_after <= budget_epsilon`` and the independent
   epsilon ``<= budget_epsilon * (1 + rel_tol)``; ``epsilon_after`` never decreases; a
   refusal spends nothing; ``budget_epsilon``, ``delta`` and ``accountant`` do not change
   within a ledger and, when the run's ``config.toml`` enables privacy, equal the configured
   budget of that client; Gaussian summary/lambda entries carry the sensitivity their clip
   parameters imply (``clip_norm^2 / n`` and ``clip / m``).
4. **Run identity**: ``config.toml`` hashes to ``results.json``'s ``config_hash``; each
   allowlisted key agrees with ``keys/<client>.ed25519.pub`` when that file exists; every
   client of a DP run has a ledger for every method that ran and, when ``config.toml`` enables
   privacy, for every configured method (with or without ``results.json``); the ledger's length (and,
   when recorded, its last-line hash ``ledger_head``) and final epsilon agree with the
   runtime's per-client summary in ``results.json`` (``privacy[<method>].clients``), and
   every release's noise multiplier (and DP-SGD's sample rate and steps) its plan (check
   ``results_plan``); each comparison row of ``accountant = "auto"``
   (``privacy[<method>].accountant_choice``) has both ``*_epsilon_of_plan`` recomputed
   from its ``plan_releases`` with dp_accounting (within ``rel_tol``; check
   ``accountant_choice``; rows written before they stated their releases: an unchecked
   warning); each plan row (``privacy[<method>].plan``) has ``planned_epsilon_rdp`` and
   ``planned_epsilon_pld`` recomputed from its ``releases`` the same way, and its
   ``planned_epsilon`` is the value of the accountant it names (RDP, PLD: that key's; PRV:
   not below the pessimistic PLD by more than ``rel_tol``; check ``plan_epsilon``; rows
   written before they stated these: an unchecked warning); every budget a client's ledger
   or results.json client row states has a plan row and, under ``"auto"``, a comparison row,
   and the plan rows' ``clients`` of each budget (stated by every row) add up to the clients
   holding it (check ``plan_coverage``; a DP method's section stating no plan: an unchecked
   warning); a plan row's ``accountant`` is its section's (``plan_epsilon``); a client row's
   ``epsilon_budget`` and ``delta`` are the ones its ledger records (``results_budget``); a
   DP-SGD entry (or refused DP-SGD record) whose signed ``params.method`` differs from the
   method of its ``ledgers/<method>/`` folder is an error (check ``method_folder``).
5. **Coverage** (a warning): ledgers of several methods spend the same clients' data. A
   staging folder ``ledgers/.<method>.creating-<8 hex>`` (a creation of a method's ledgers
   killed before its rename) is no method's ledgers: a warning when it holds only empty
   ledgers, an error when it holds anything a creation does not write.

6. **Close and anchor**: every ledger ends with exactly one signed ``close`` entry (a ledger
   without one is an error: its run did not finish, or its end was cut). The run's signed
   ``anchor.json`` -- or, stronger, a copy kept apart and passed as ``anchor=`` (CLI
   ``--anchor FILE``) -- is checked: its Ed25519 signature, by the run's signer party
   (``operator`` in process, ``server`` on Flower: any other party is an error) under that
   party's allowlisted key (an unregistered key is an error with an allowlist, a warning
   without one); every ledger it names exists, its line
   ``final_index`` hashes to the anchored head and is its last line, the anchored
   ``entries`` is ``final_index + 1`` and the anchored ``epsilon_spent`` is the ledger's
   final ``epsilon_after`` (within :data:`SPENT_TOL` x max(1, epsilon): the runtimes anchor
   that float64 value; older runs rounded it up to 6 decimals); no ledger it does not
   name; ``results.json`` and ``config.toml`` exist with the anchored SHA-256 digests; its
   ``run_name``, ``config_hash``, ``runtime`` and ``methods`` are those results.json and
   config.toml record (check ``anchor_identity``). Checked without a copy given, the run's
   own anchor gets an unchecked warning (``anchor_copy``): whoever holds its signer's key (in
   process the key store that also holds every client's ledger key) could re-sign it. A
   given copy that is no signed anchor (missing, unreadable, not JSON, malformed, its own
   signature failing) is bad input, raised before the run is read
   (:func:`load_given_anchor`), as a bad ``allowlist=`` is; the run's own anchor.json in
   that state is an error finding.
7. **Key location**: private key material inside the audited directory (a file named
   ``*.ed25519.key``/``*.x25519.key``, or holding a PEM private key block or a DER private
   key, found by :func:`private_key_files`) is an error, with or without an allowlist and
   whether the run claims DP or not (a no-claim run's own envelope keys in ``keys/`` alone:
   an unchecked warning): whoever receives the run receives the keys, and anyone
   holding a signing key can re-sign edited ledgers and anchor. With an allowlist given, the run's own ``keys/allowlist.json`` must agree with it: a party it
   lists that the given one does not register, or another key for a party, is an error (the
   directory misstates who could sign); parties registered but not published are not.
   :func:`check_anchor` and :func:`verified_ledger_entries` (``audit replay``) given an
   allowlist run the same check (:func:`given_allowlist_findings`); ``audit replay`` without
   one still refuses private key material inside the run.
8. **Files beside the ledgers**: ``keys/<party>.ed25519.pub`` and ``.x25519.pub`` equal the
   allowlisted keys (nothing in a run signs an X25519 key, so the allowlist in use is what
   they are held to; a missing file, or one of a party the allowlist does not name, is a
   warning; with an allowlist given, a run without ``keys/``, a Flower result directory
   aside, is an unchecked warning). ``ledgers/<method>/model.json`` (the model the releases come from) is intact (its
   fingerprint hashes its listing) and records the fingerprint results.json records in
   ``privacy[<method>].model_fingerprint`` (results.json's digest is in the signed anchor);
   missing where results.json records one is an error (on Flower, where each node keeps its
   own and the auditor collects one, a warning). Where nothing signed records it (no
   results.json, a run written before the key) a warning says it is unchecked.

A plug-in mechanism's recorded sensitivity is recomputed when its module is registered in
this process (``imports=``, CLI ``--import MODULE``: a module the auditor trusts, never one
inside the run directory); otherwise a warning says it was not. Such warnings, that a check was
not made, are ``Finding.unchecked``; ``strict=True`` (CLI ``--strict``) makes them errors.

Limits, stated: removing entries from the *end* of a ledger leaves a valid shorter chain; it
shows as a missing close entry, and with an anchor as a ledger behind its anchored head. An
attacker who can rewrite the run directory *and* holds the signing keys can forge all of it;
only an anchor kept apart (``--anchor``) and keys kept out of the directory (a key store,
``--allowlist``) rule that out. The allowlist is by default read from the run directory
itself; pass ``allowlist=`` (CLI ``--allowlist``) to verify against keys registered
independently of the run, otherwise a warning says the keys are only as trustworthy as the
directory.
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Literal

import dp_accounting
import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from dp_accounting import pld, rdp

from audits.arguments import MAX_COUNT
from audits.options import API_AUDIT_OPTIONS, DEFAULT_PLD_CHECKPOINTS, DEFAULT_REL_TOL
from privacy.accounting import (
    ACCOUNTANT_REGISTRY,
    MAX_NOISE_MULTIPLIER,
    MAX_STEPS,
    MIN_SAMPLE_RATE,
    Accountant,
    AccountingError,
    AccountingSizeError,
    PlannedRelease,
    _subsampled_gaussian_pld,
    check_pld_size,
    format_exact,
    format_ordered,
    format_spent,
    plan_epsilon,
    self_compose_pld,
)
from privacy.envelope import ledger_files, nonce_file_problem, nonce_files
from privacy.errors import ToolkitError
from privacy.identity import IdentityError, PublicIdentity, client_ids, load_allowlist
from privacy.mechanisms import MECHANISMS, MechanismError
from privacy.paths import (
    NotRegularFileError,
    check_given_file,
    check_path,
    open_regular,
    path_problem,
)
from secure_fedora.core.config import (
    ConfigError,
    ExperimentConfig,
    config_hash,
    load_run_config,
    unregistered_hint,
)
from secure_fedora.core.registry import load_contrib

__all__ = [
    "DEFAULT_PLD_CHECKPOINTS",
    "DEFAULT_REL_TOL",
    "AuditError",
    "ClientVerification",
    "EntryCheck",
    "Finding",
    "ImportedModule",
    "VerificationReport",
    "check_anchor",
    "check_ledger_lines",
    "checks_done",
    "dp_claim_basis",
    "dpsgd_claim_problem",
    "given_allowlist_findings",
    "import_trusted_modules",
    "imported_text",
    "independent_epsilons",
    "load_given_allowlist",
    "load_given_anchor",
    "mechanism_epsilon",
    "positive_number",
    "private_key_files",
    "refuse_private_keys",
    "tolerance_text",
    "verified_ledger_entries",
    "verify_run",
]

def tolerance_text(rel_tol: float) -> str:
    """A relative tolerance as a percentage, exactly (its shortest decimal form times 100):
    0.02 is "2%", 0.001 "0.1%" (``:.0%`` showed "0%", as if no difference were allowed)."""
    percent = (decimal.Decimal(repr(float(rel_tol))) * 100).normalize()
    return f"{percent:f}%"


#: How far a runtime's reported ``epsilon_spent`` (results.json's per-client summary, and the
#: signed anchor's per-ledger row) may lie from the ledger's final ``epsilon_after``, relative
#: to ``max(1, epsilon)``: both runtimes report the float64 value the client's accountant
#: holds, which the ledger records release by release (float rounding apart, equal); runs
#: made in process before it was exact state it rounded up to 6 decimals (at most 1e-6
#: above) and still verify.
SPENT_TOL = 1e-5
try:
    _DP_ACCOUNTING_VERSION = importlib.metadata.version("dp-accounting")
except importlib.metadata.PackageNotFoundError:  # an unusual install: still the same code
    _DP_ACCOUNTING_VERSION = "(version unknown)"
GENESIS_HASH = "0" * 64
REFUSAL = "refusal"
REPAIR = "repair"  # a torn final line quarantined on resume; spends nothing
CLOSE = "close"
ANCHOR_FILENAME = "anchor.json"
ANCHOR_DOMAIN = b"secure-fedora/anchor/v1\n"
#: The fields of one ledger's row in an anchor's ``ledgers`` (every one is checked).
ANCHOR_LEDGER_FIELDS: tuple[str, ...] = ("entries", "epsilon_spent", "final_index", "head")
ANCHORED_FILES: tuple[str, ...] = ("config.toml", "results.json")
#: Who signs a run's anchor, by runtime: the in-process runtime's key store operator, the
#: Flower ServerApp's server key.
ANCHOR_SIGNERS: dict[str, str] = {"in-process": "operator", "flower": "server"}
ENTRY_FIELDS: tuple[str, ...] = (
    "index", "client_id", "round", "mechanism", "params", "epsilon_after", "delta",
    "budget_epsilon", "accountant", "timestamp", "prev_hash", "signature",
)
ACCOUNTED_PARAMS: tuple[str, ...] = ("noise_multiplier", "sample_rate", "steps")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")
#: The independent method each recorder is compared with ("says by how much they differ").
CROSS_METHOD: dict[str, str] = {"rdp": "pld", "pld": "rdp", "prv": "rdp"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")

Severity = Literal["error", "warning"]


class AuditError(ToolkitError, ValueError):
    """A run directory or argument that cannot be audited at all (missing, unreadable)."""


@dataclass(frozen=True)
class Finding:
    """One verification result that is not clean: who, which entry, which check, what.

    ``severity == "error"`` makes the run fail verification; ``"warning"`` does not.
    ``entry`` is the 0-based line position in the client's ledger (None: the whole ledger
    or run); ``method`` names the method's ledger directory when the run has one per method;
    ``ledger`` is the ledger file a per-ledger finding is about, relative to the run directory
    (e.g. ``ledgers/fedora/client-001.jsonl``). ``unchecked``: a warning saying that a check
    was not made, or made only against the run's own files (an error under ``strict``).
    """

    severity: Severity
    check: str
    message: str
    client_id: str | None = None
    entry: int | None = None
    method: str | None = None
    ledger: str | None = None
    unchecked: bool = False

    def __str__(self) -> str:
        where = []
        if self.client_id is not None:
            where.append(f"client {self.client_id}")
        if self.method is not None:
            where.append(f"method {self.method}")
        if self.ledger is not None:
            where.append(f"ledger {self.ledger}")
        if self.entry is not None:
            where.append(f"entry {self.entry}")
        prefix = ", ".join(where) or "run"
        return f"{self.severity.upper()} {prefix}: [{self.check}] {self.message}"


@dataclass(frozen=True)
class EntryCheck:
    """One ledger entry as recorded, with the independent epsilon where it was computed."""

    index: int
    round: int | None
    mechanism: str | None
    recorded_epsilon: float | None
    independent_epsilon: float | None
    budget_epsilon: float | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientVerification:
    """Per-ledger outcome (one client, one method): its numbers and whether every check passed."""

    client_id: str
    method: str | None
    ledger: str
    entries: int
    accountant: str | None
    delta: float | None
    budget_epsilon: float | None
    final_epsilon: float
    independent_final_epsilon: float | None
    refused: bool
    mechanisms: dict[str, dict[str, Any]]
    series: list[EntryCheck]
    ok: bool = True
    #: dp_accounting's PLD (pessimistic) and RDP epsilon of the whole ledger.
    pld_final_epsilon: float | None = None
    rdp_final_epsilon: float | None = None
    #: The other method (PLD for an RDP ledger, RDP for PLD/PRV ledgers), its epsilon and the
    #: relative difference ``recorded / cross - 1`` (negative: the recorder is tighter).
    cross_method: str | None = None
    cross_final_epsilon: float | None = None
    cross_difference: float | None = None
    warned: bool = False
    #: The Ed25519 public key (hex) its entries' signatures were checked under: the
    #: client's key in the allowlist in use; None where that allowlist has none for it.
    signer_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class ImportedModule:
    """A module the auditor chose to trust and imported before verifying: its dotted name, the
    file its code came from and that file's SHA-256, and the mechanisms it registered."""

    module: str
    file: str | None
    sha256: str | None
    mechanisms: list[str]
    #: Per mechanism, where its sensitivity formula is defined (module, file, sha256): the
    #: code that recomputed it, which may be another module than the one imported.
    sensitivity_code: dict[str, dict[str, str | None]] = field(default_factory=dict)
    #: The config entries it registered (``"method 'name'"``, datasets, models, ...), whose
    #: own config checks then run.
    entries: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable dict of every field."""
        return asdict(self)


@dataclass
class VerificationReport:
    """Everything :func:`verify_run` found. ``ok`` is True only when there is no error."""

    run_dir: str
    clients: list[ClientVerification]
    findings: list[Finding]
    rel_tol: float
    independent_accountant: str
    allowlist: str
    checks: list[str]
    #: False when the run makes no differential-privacy claim (:func:`dp_claim_basis`).
    dp_claimed: bool = True
    #: What in the run claims DP (:func:`dp_claim_basis`); empty when it makes no claim.
    dp_claim_basis: list[str] = field(default_factory=list)
    #: The modules imported to recompute plug-in mechanisms (:func:`import_trusted_modules`).
    imported: list[ImportedModule] = field(default_factory=list)
    #: True when every warning that says a check was not made counts as an error.
    strict: bool = False
    #: Who signed the anchor checked (:func:`anchor_signer`); None without one whose
    #: signature verifies.
    anchor_signer: dict[str, Any] | None = None

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity ``"error"``."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """Findings of severity ``"warning"``."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True iff no error was found (warnings allowed); a run that makes no DP claim can
        be ok with nothing verified: :attr:`verdict` tells them apart."""
        return not self.errors

    @property
    def verdict(self) -> str:
        """``"passed"``, ``"failed"`` or ``"no_dp_claim"``
        (:func:`audits.verdict.verification_verdict`)."""
        from audits.verdict import verification_verdict

        return verification_verdict(self.ok, self.dp_claimed)

    @property
    def verdict_text(self) -> str:
        """The verdict line every command prints (and report.json records)."""
        from audits.verdict import verification_verdict_text

        return verification_verdict_text(self.verdict, len(self.clients), len(self.errors),
                                         len(self.warnings), len(self.checks), self.strict)

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable dict: verdict, settings, per-client results, findings."""
        return {
            "run_dir": self.run_dir,
            "ok": self.ok,
            "verdict": self.verdict,
            "verdict_text": self.verdict_text,
            "dp_claimed": self.dp_claimed,
            "dp_claim_basis": list(self.dp_claim_basis),
            "strict": self.strict,
            "imported": [m.to_json() for m in self.imported],
            "anchor_signer": self.anchor_signer,
            "rel_tol": self.rel_tol,
            "independent_accountant": self.independent_accountant,
            "allowlist": self.allowlist,
            "checks": list(self.checks),
            "clients": [c.to_json() for c in self.clients],
            "findings": [asdict(f) for f in self.findings],
        }


def checks_done(options: Mapping[str, str] = API_AUDIT_OPTIONS) -> list[str]:
    """What :func:`verify_run` checks, in words; the anchor and allowlist are named as
    ``options`` names them (the Python arguments by default, the CLI's flags with
    :data:`~audits.options.CLI_AUDIT_OPTIONS`)."""
    return [
        *_CHECKS_FIXED,
        f"anchor.json (or {options['anchor']}): signed; every ledger's final index, entry"
        " count, head and epsilon_spent, results.json and config.toml digests, no ledger"
        " missing or unnamed; its run_name, config_hash, runtime and methods equal"
        " results.json's and config.toml's",
        "no private key material inside the audited directory (found by file name and by"
        " content)",
        f"with {options['allowlist']}: keys/allowlist.json lists no party and no key that"
        " it does not register (audit replay and check_anchor check the same)",
        "keys/*.ed25519.pub and keys/*.x25519.pub equal the allowlisted keys",
        "ledgers/<method>/model.json intact and equal to results.json's (anchored) model"
        " fingerprint; a warning where nothing signed records it",
    ]


_CHECKS_FIXED = [
    "canonical JSON lines with the documented fields and types",
    "index equals line position; prev_hash chains every line (SHA-256)",
    "Ed25519 signature of every entry under the client's allowlisted key",
    "cumulative epsilon recomputed with dp_accounting (independent of Opacus)",
    "final epsilon not below dp_accounting's pessimistic PLD; compared with the other method",
    "epsilon_after never decreases; refusals spend nothing",
    "no entry above its client's budget (recorded and independent)",
    "budget, delta and accountant constant per client and equal to config.toml (the"
    " accountant: to results.json's without config.toml)",
    "Gaussian summary/lambda sensitivities match their clip parameters",
    "config.toml matches results.json config_hash",
    "ledger length and final epsilon equal results.json's per-client privacy summary",
    "each accountant comparison row of accountant \"auto\" (results.json's"
    " accountant_choice): both epsilons of its plan recomputed from its plan_releases, which"
    " carry the noise its calibrated candidate states; the chosen candidate's noise is the"
    " method's plan's; the chosen accountant is the one the rows choose",
    "each plan row of results.json: planned_epsilon_rdp and planned_epsilon_pld recomputed"
    " from its releases, planned_epsilon its accountant's, its accountant its method's; every"
    " budget a ledger or client row states has a plan row (and an accountant comparison row),"
    " whose clients counts add up to the clients holding it; a plan stated for every method",
    "each client row's epsilon_budget and delta in results.json equal its ledger's",
    "every DP-SGD entry's noise multiplier, sample rate and steps equal results.json's"
    " (the client's noise_multiplier, the method's sample_rate and steps_per_round); every"
    " summary, lambda or plug-in entry's noise multiplier and sample rate equal its"
    " mechanism's in results.json's exact plan row",
    "every client of a DP run has a ledger for every method that ran or config.toml lists",
    "every ledger ends with one signed close entry (final index, epsilon spent)",
    "every DP-SGD entry and refusal that records its method (params.method) is in that"
    " method's folder ledgers/<method>/",
    "every other entry of a round's model release (the lambda, a plug-in mechanism's) follows"
    " that release's DP-SGD entry (same round and params.release_kind)",
]


# --------------------------------------------------------------------------- integrity


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _sha256(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _number(v: Any) -> bool:
    """A finite int or float (not bool); an int too large for a float is not one."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def _schema(entry: dict[str, Any]) -> list[str]:
    out: list[str] = []
    missing = [f for f in ENTRY_FIELDS if f not in entry]
    extra = sorted(set(entry) - set(ENTRY_FIELDS))
    if missing:
        out.append(f"missing fields {missing}")
    if extra:
        out.append(f"unexpected fields {extra}")
    if missing:
        return out
    if not _int(entry["index"]):
        out.append(f"index must be an int, got {entry['index']!r}")
    if not isinstance(entry["client_id"], str) or not entry["client_id"]:
        out.append("client_id must be a non-empty string")
    if not _int(entry["round"]) or entry["round"] < 0:
        out.append(f"round must be an int >= 0, got {entry['round']!r}")
    if not isinstance(entry["mechanism"], str) or not entry["mechanism"]:
        out.append("mechanism must be a non-empty string")
    if not isinstance(entry["params"], dict):
        out.append("params must be an object")
    elif entry["mechanism"] not in (REFUSAL, REPAIR, CLOSE):
        out.extend(_release_problems(entry["params"]))
    if not _number(entry["epsilon_after"]) or entry["epsilon_after"] < 0:
        out.append(f"epsilon_after must be a finite number >= 0, got {entry['epsilon_after']!r}")
    if not _number(entry["delta"]) or not 0 < entry["delta"] < 1:
        out.append(f"delta must be in (0, 1), got {entry['delta']!r}")
    if not _number(entry["budget_epsilon"]) or entry["budget_epsilon"] <= 0:
        out.append(f"budget_epsilon must be a finite number > 0, got {entry['budget_epsilon']!r}")
    if not isinstance(entry["accountant"], str) or not entry["accountant"]:
        # a plug-in accountant's name too: _plug_in_accountant_findings checks it
        out.append(f"accountant must be a non-empty string, got {entry['accountant']!r:.80}")
    if not isinstance(entry["timestamp"], str):
        out.append("timestamp must be a string")
    if not isinstance(entry["prev_hash"], str) or not _HEX64.match(entry["prev_hash"]):
        out.append("prev_hash must be 64 lowercase hex digits")
    if not isinstance(entry["signature"], str) or not _HEX128.match(entry["signature"]):
        out.append("signature must be 128 lowercase hex digits")
    return out


def _release_problems(params: dict[str, Any]) -> list[str]:
    out = [f"params lacks {k!r}" for k in ACCOUNTED_PARAMS if k not in params]
    if out:
        return out
    nm, q, steps = params["noise_multiplier"], params["sample_rate"], params["steps"]
    if not _number(nm) or not 0 < nm <= MAX_NOISE_MULTIPLIER:
        out.append(f"params.noise_multiplier must be a finite number in (0,"
                   f" {MAX_NOISE_MULTIPLIER:g}], got {nm!r}")
    if not _number(q) or not 0 < q <= 1:
        out.append(f"params.sample_rate must be in (0, 1], got {q!r}")
    elif q < MIN_SAMPLE_RATE:
        out.append(f"params.sample_rate must be at least {format_exact(MIN_SAMPLE_RATE)} (a"
                   f" subnormal rate; no run samples at it), got {q!r}")
    if not _int(steps) or not 1 <= steps <= MAX_STEPS:
        shown = steps if not _int(steps) or steps.bit_length() < 64 else f"an int of {len(str(steps))} digits"
        out.append(f"params.steps must be an int in [1, {MAX_STEPS:g}], got {shown!r}")
    return out


def check_ledger_lines(lines: Sequence[str], public_key: Ed25519PublicKey | None,
                       client_id: str, torn: bool = False) -> tuple[list[dict[str, Any] | None],
                                                                     list[Finding]]:
    """Integrity checks of one ledger's raw lines (no accounting); returns entries and findings.

    ``entries[i]`` is the parsed object of line i, or None when it is not a JSON object.
    Every finding names ``client_id`` and the line position. With ``public_key=None`` every
    signature is reported unverifiable. ``torn`` marks a last line without newline.
    """
    findings: list[Finding] = []
    entries: list[dict[str, Any] | None] = []
    prev_hash = GENESIS_HASH

    def err(pos: int, check: str, message: str) -> None:
        findings.append(Finding("error", check, message, client_id, pos))

    for pos, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, or a 4,300+ digit integer
            err(pos, "json", f"line is not valid JSON ({exc})")
            entries.append(None)
            prev_hash = _sha256(line)
            continue
        if not isinstance(entry, dict):
            err(pos, "json", f"line is a JSON {type(entry).__name__}, not an object")
            entries.append(None)
            prev_hash = _sha256(line)
            continue
        entries.append(entry)
        try:
            canonical = _canonical(entry) == line
        except ValueError:
            canonical = False
        if not canonical:
            err(pos, "canonical", "line is not in canonical JSON form (it was edited)")
        problems = _schema(entry)
        for message in problems:
            err(pos, "fields", message)
        if any(f not in entry for f in ENTRY_FIELDS):
            prev_hash = _sha256(line)
            continue
        if entry["index"] != pos:
            err(pos, "index", f"index is {entry['index']!r} at line {pos}: an entry before it was"
                " removed, or entries were reordered")
        if entry["prev_hash"] != prev_hash:
            err(pos, "chain", "prev_hash is not the SHA-256 of the previous line: the previous"
                " entry was changed, removed or reordered")
        if entry["client_id"] != client_id:
            err(pos, "client_id", f"entry names client {entry['client_id']!r}, the ledger belongs"
                f" to {client_id!r}")
        if public_key is None:
            err(pos, "signature", "no registered public key to verify the signature")
        elif isinstance(entry["signature"], str) and _HEX128.match(entry["signature"]):
            payload = {k: v for k, v in entry.items() if k != "signature"}
            try:
                public_key.verify(bytes.fromhex(entry["signature"]),
                                  _canonical(payload).encode("utf-8"))
            except (InvalidSignature, ValueError):
                err(pos, "signature", "Ed25519 signature does not verify under the client's"
                    " registered key (forged, or the entry was changed)")
        prev_hash = _sha256(line)
    if torn and lines:
        err(len(lines) - 1, "truncated", "the last line has no newline (a write was interrupted"
            " or the file was cut)")
    return entries, findings


#: What a path of the run holding a FIFO, device or directory is (never opened: a FIFO would
#: stall the audit, a device such as /dev/zero would never end).
NOT_REGULAR = "not a regular file (a FIFO, device or directory in its place)"


def _absent(path: Path) -> str:
    """Why ``path``, for which ``path.is_file()`` is false, cannot be read, as the rest of a
    sentence naming it: "is missing", "is a link to nothing" or "is not a regular file (...)".
    Only ``stat``s it: a FIFO is not opened."""
    if path.is_symlink() and not path.exists():
        return "is a link to nothing"
    return f"is {NOT_REGULAR}" if path.exists() else "is missing"


def _read_lines(path: Path) -> tuple[list[str], bool]:
    # opened without blocking and checked before reading: a FIFO in a ledger's place would
    # stall the audit, a link to a device such as /dev/zero would never end
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise AuditError(f"cannot read ledger {path}: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AuditError(f"cannot read ledger {path}: {NOT_REGULAR}; restore the ledger")
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError as exc:
        raise AuditError(f"cannot read ledger {path}: {exc}") from exc
    finally:
        os.close(fd)
    if not data:
        return [], False
    torn = not data.endswith(b"\n")
    raw = data.split(b"\n")
    if not torn:
        raw = raw[:-1]
    return [chunk.decode("utf-8", errors="replace") for chunk in raw], torn


def positive_number(value: Any, where: str, error: type[Exception] = AuditError) -> float:
    """``value`` as a float when it is a finite number > 0 (not a bool); else ``error`` naming
    ``where``. The one check of a claim read from a ledger (audit replay, audit canary)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{where} must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out) or out <= 0:
        raise error(f"{where} must be a finite number > 0, got {value!r}")
    return out


def _raise_first(findings: Sequence[Finding], error: type[Exception], context: str) -> None:
    """Raise ``error`` naming the first error among ``findings`` (and how many more)."""
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        more = f" (+{len(errors) - 1} more; run `audit verify`)" if len(errors) > 1 else ""
        raise error(f"{context}: {errors[0].message}{more}")


_ANCHOR_KEPT_APART = " (give the anchor.json kept apart)"


def load_given_allowlist(allowlist: str | Path, error: type[Exception] = AuditError,
                         options: Mapping[str, str] = API_AUDIT_OPTIONS,
                         ) -> tuple[Path, dict[str, PublicIdentity]]:
    """The auditor's independently registered allowlist (``--allowlist``, ``allowlist=``):
    its path and keys. It is input to the audit, never evidence against the run: a path that
    is no text path, a missing file, a directory or a file that is no valid allowlist raises
    ``error`` with one line naming the argument (``options``), what is wrong and what to give.
    The one check of ``audit verify``, ``audit replay`` and their Python functions."""
    give = "; give the allowlist.json registered for the run's parties"
    path = check_given_file(allowlist, "allowlist", error, options["allowlist"], give)
    try:
        keys = load_allowlist(path)
    except IdentityError as exc:
        raise error(f"{options['allowlist']}: {exc}{give}") from None
    return path, keys


def _given_allowlist(allowlist: str | Path, keys: dict[str, PublicIdentity] | None,
                     error: type[Exception], options: Mapping[str, str],
                     ) -> tuple[Path, dict[str, PublicIdentity]]:
    """:func:`load_given_allowlist`'s result, loaded only when the caller did not hand the
    ``keys`` it loaded from ``allowlist`` on."""
    if keys is None:
        return load_given_allowlist(allowlist, error, options)
    return Path(allowlist), keys


def load_given_anchor(anchor: str | Path, error: type[Exception] = AuditError,
                      options: Mapping[str, str] = API_AUDIT_OPTIONS,
                      ) -> tuple[Path, dict[str, Any]]:
    """The auditor's anchor copy kept apart (``--anchor``, ``anchor=``): its path and document.
    It is input to the audit, as :func:`load_given_allowlist`'s file is: a path that is no
    text path, a missing file, a directory, or a file that is no signed version-1 anchor
    (unreadable, not JSON, of other fields or types, a signature that does not verify under
    its own signer key: :func:`_load_anchor`) raises ``error`` with one line naming the
    argument (``options``), what is wrong and what to give. Whether the anchor vouches for
    the run (its signer allowlisted, the run matching it) is the verification's finding.
    The one check of ``audit verify``, ``report``, ``replay`` and their Python functions."""
    path = check_given_file(anchor, "anchor", error, options["anchor"], _ANCHOR_KEPT_APART)
    doc, problems = _load_anchor(path)
    if doc is None:
        raise error(f"{options['anchor']}: {problems[0].message}{_ANCHOR_KEPT_APART}")
    return path, doc


def verified_ledger_entries(run_dir: str | Path, method: str, client_id: str, *,
                            error: type[Exception] = AuditError,
                            missing: str | None = None,
                            allowlist: str | Path | None = None,
                            options: Mapping[str, str] = API_AUDIT_OPTIONS,
                            warnings: list[str] | None = None,
                            run_checked: bool = False,
                            given_keys: dict[str, PublicIdentity] | None = None,
                            ) -> list[dict[str, Any]]:
    """The entries of ``RUN_DIR/ledgers/<method>/<client_id>.jsonl`` once it verifies.

    Guarantee: every line is a canonical JSON object with the documented fields and types,
    the hash chain is intact, every entry names ``client_id`` and its Ed25519 signature
    verifies under the key ``RUN_DIR/keys/allowlist.json`` registers for ``client_id``
    (:func:`check_ledger_lines`), and the ledger is not empty. Anything else (a missing,
    unreadable, binary, torn, edited or unsigned ledger, or no key to check it against)
    raises ``error`` with a one-line message, before any field is trusted. ``missing`` is
    the message for a ledger that does not exist (default: ``no ledger <path>``). Accounting
    is not recomputed (``audit verify`` does that).

    ``allowlist`` (CLI ``--allowlist``) is an independently registered allowlist.json whose
    key is used instead of the run's own: a ledger whose owner re-signed it with a new key
    (and swapped ``keys/allowlist.json``) then fails. As in ``audit verify --allowlist``
    (:func:`given_allowlist_findings`), private signing keys inside ``run_dir`` (they could
    re-sign it) and a published ``keys/allowlist.json`` that lists a party or a key
    ``allowlist`` does not register are then an error; an ``allowlist`` that is no valid
    allowlist is bad input (:func:`load_given_allowlist`, naming ``options``' argument).
    The warnings of those two checks (files that could not be read to look for keys, a
    missing published allowlist: what was not checked) are appended to ``warnings`` when
    it is given, for the caller to show. ``run_checked``: the caller has already held
    ``run_dir`` to those two checks with this ``allowlist`` (:func:`refuse_private_keys`
    with ``given``), so the run is not scanned again. ``given_keys``: the keys the caller
    loaded from ``allowlist`` (:func:`load_given_allowlist`), so it is not loaded again.
    """
    run_dir = check_path(run_dir, "run_dir", error)
    rel = f"ledgers/{method}/{client_id}.jsonl"
    path = run_dir / "ledgers" / method / f"{client_id}.jsonl"
    if allowlist is None:
        allow_path = run_dir / "keys" / "allowlist.json"
        allow_label = "keys/allowlist.json"
        if not path.exists():  # a FIFO or device in its place is named by _read_lines
            raise error(missing if missing is not None else f"no ledger {path}")
        if not (run_dir / "keys").exists() and not (run_dir / "keys").is_symlink():
            # A Flower run's collected folder holds no keys/ by design: say what to give.
            raise error(f"cannot verify {rel} before trusting its claim: {run_dir} holds no"
                        " keys/ (a Flower run's collected folder holds none): "
                        + _allowlist_to_give(options))
        try:
            keys = load_allowlist(allow_path)
        except IdentityError as err:  # the run's own file: a problem of the run
            raise error(f"cannot verify {rel} before trusting its claim: {err}") from None
    else:
        allow_path, keys = _given_allowlist(allowlist, given_keys, error, options)
        allow_label = f"allowlist {allow_path}"
        if not path.exists():
            raise error(missing if missing is not None else f"no ledger {path}")
    if allowlist is not None and not run_checked:
        findings = given_allowlist_findings(run_dir, allow_path, keys)
        _raise_first(findings, error, f"{rel} is not trusted")
        if warnings is not None:
            warnings.extend(f.message for f in findings)
    ident = keys.get(client_id)
    if ident is None:
        raise error(f"{allow_label} has no key for {client_id}: {rel} cannot"
                    " be verified before trusting its claim")
    try:
        lines, torn = _read_lines(path)
    except ToolkitError as err:
        raise error(str(err)) from None
    entries, findings = check_ledger_lines(lines, ident.verify_key, client_id, torn)
    if not lines:
        raise error(f"ledger {rel} is empty")
    if findings:
        first = findings[0]
        more = f" (+{len(findings) - 1} more; run `audit verify`)" if len(findings) > 1 else ""
        raise error(f"ledger {rel} fails verification, its claim is not"
                    f" trusted: entry {first.entry}: [{first.check}]"
                    f" {first.message}{more}")
    return [e for e in entries if e is not None]  # all of them, after a clean check


# --------------------------------------------------------------------------- accounting


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_saved_level = logging.NOTSET


@contextlib.contextmanager
def _quiet_dp_accounting() -> Iterator[None]:
    """dp_accounting logs (via absl) each RDP order it drops; keep the audit's output clean:
    the ``absl`` logger is at ERROR inside, its own level restored when the outermost of
    nested (or concurrent) uses ends. Only the outermost sets a level: ``Logger.setLevel``
    clears every logger's cache, which per ledger cost seconds at a thousand clients."""
    global _quiet_depth, _quiet_saved_level
    logger = logging.getLogger("absl")
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _quiet_saved_level = logger.level
            logger.setLevel(logging.ERROR)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logger.setLevel(_quiet_saved_level)


def _event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


_RDP_ORDERS = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """dp_accounting's one-step RDP curve over its default orders (cached, read-only); +inf
    at every order where sigma^2 underflows to 0 (dp_accounting divides by it), as the run's
    own accountant (``privacy.accounting``) does: the RDP of a vanishing noise is unbounded."""
    if noise_multiplier * noise_multiplier == 0.0:
        vec = np.full(_RDP_ORDERS.shape, np.inf)
        vec.setflags(write=False)
        return vec
    acc = rdp.RdpAccountant(list(_RDP_ORDERS))
    acc.compose(_event(noise_multiplier, sample_rate))
    vec = np.array(getattr(acc, "_rdp", None), dtype=np.float64)
    if vec.shape != _RDP_ORDERS.shape:
        raise AuditError("dp_accounting's RdpAccountant changed its internal layout;"
                         " this audit needs dp-accounting 0.6")
    if 0.0 < sample_rate < 1.0:
        # dp_accounting drops a fractional order whose series does not converge within its
        # 1,000 terms (inf); such an order can be the best one at small noise, and leaving it
        # out overstates epsilon (a correct ledger then reads as under-reported)
        for k, order in enumerate(_RDP_ORDERS):
            if math.isinf(vec[k]) and not float(order).is_integer():
                vec[k] = _rdp_by_integration(float(order), noise_multiplier, sample_rate)
    vec.setflags(write=False)
    return vec


def _log_integral(log_f: Callable[[float], float], lo: float, hi: float,
                  points: Sequence[float]) -> float:
    """log of the integral of ``exp(log_f)`` over [lo, hi], scaled by its largest value on a
    grid so that the quadrature never overflows; ValueError when the quadrature reports that
    it could not reach its accuracy (the caller then leaves the order out)."""
    import warnings

    from scipy import integrate

    peak = max(log_f(z) for z in np.linspace(lo, hi, 2001))
    with warnings.catch_warnings():
        warnings.simplefilter("error", integrate.IntegrationWarning)
        try:
            value, _ = integrate.quad(lambda z: math.exp(log_f(z) - peak), lo, hi,
                                      points=points, limit=1000, epsabs=0.0, epsrel=1e-10)
        except integrate.IntegrationWarning as warning:
            raise ValueError(str(warning)) from None
    return peak + math.log(value)


def _rdp_by_integration(order: float, noise_multiplier: float, sample_rate: float) -> float:
    """One step's RDP of the Poisson-subsampled Gaussian at ``order`` > 1 by numerical
    integration (scipy, independent of Opacus and dp_accounting): with ``mu0 = N(0, s^2)``,
    ``mu1 = N(1, s^2)`` and ``mu = (1 - q) mu0 + q mu1``, the larger of
    ``log E_mu0[(mu / mu0)^a] / (a - 1)`` and ``log E_mu[(mu0 / mu)^a] / (a - 1)``; inf where
    the integral cannot be evaluated. Both integrands are negligible beyond 40 s of their
    modes (near 0 and 1, and near ``a`` for the first)."""
    a, q, s2 = order, sample_rate, noise_multiplier * noise_multiplier
    log_q, log_1q = math.log(q), math.log1p(-q)
    log_norm = -0.5 * math.log(2.0 * math.pi * s2)

    def log_mu0(z: float) -> float:
        return log_norm - z * z / (2.0 * s2)

    def log_ratio(z: float) -> float:  # log(mu / mu0)
        return float(np.logaddexp(log_1q, log_q + (2.0 * z - 1.0) / (2.0 * s2)))

    width = 40.0 * noise_multiplier
    try:
        first = _log_integral(lambda z: log_mu0(z) + a * log_ratio(z), -width,
                              max(a, 1.0) + width, [0.0, 0.5, 1.0, a])
        second = _log_integral(lambda z: log_mu0(z) + (1.0 - a) * log_ratio(z), -width,
                               1.0 + width, [0.0, 0.5, 1.0])
    except (ValueError, OverflowError, ZeroDivisionError):
        return math.inf
    value = max(first, second) / (a - 1.0)
    return value if math.isfinite(value) else math.inf


def _rdp_epsilon(total: np.ndarray, delta: float) -> float:
    eps, _ = rdp.rdp_privacy_accountant.compute_epsilon(_RDP_ORDERS, total, delta)
    return float(eps)


#: PLD discretization of the loss values. Coarser than dp_accounting's default (1e-4) for a
#: 10x speed-up; the estimate stays pessimistic (an upper bound on epsilon), and on DP-SGD
#: histories measured here it differs from the 1e-4 result by under 0.02%.
PLD_VALUE_DISCRETIZATION = 1e-3


#: Finer pessimistic PLD discretizations tried, in order, before an entry of a PLD or PRV ledger
#: is called under-reported (or over its budget): at a tiny epsilon the PLD at
#: :data:`PLD_VALUE_DISCRETIZATION` overstates it by up to that interval per composition
#: (measured: noise 100, q 0.01, 1,000 steps: 0.02405 at 1e-3, 0.00812 at 1e-4), so a valid,
#: tighter accountant looked under-reported. A finer pessimistic PLD is still an upper bound
#: on the true epsilon; it is computed only where the first check fails.
PLD_RECHECK_DISCRETIZATIONS: tuple[float, ...] = (1e-4, 1e-5)


def _pld_epsilon(counts: dict[tuple[float, float], int], delta: float,
                 discretization: float = PLD_VALUE_DISCRETIZATION) -> float | None:
    return _pld_epsilon_cached(tuple(sorted(counts.items())), delta, discretization)


@functools.lru_cache(maxsize=512)
def _pld_epsilon_cached(counts: tuple[tuple[tuple[float, float], int], ...],
                        delta: float, discretization: float = PLD_VALUE_DISCRETIZATION
                        ) -> float | None:
    """None when the PLD would exceed the accounting layer's memory guard (only the size is
    taken from it; the epsilon is dp_accounting's own)."""
    try:
        check_pld_size([(nm, q, steps) for (nm, q), steps in counts], discretization)
    except AccountingSizeError:
        return None
    # PLDAccountant's composition step for step (identity, then each event's PLD, in this
    # order), with each subsampled Gaussian's single-release PLD built once per
    # (sigma, q, discretization) rather than once per call (it is most of the cost, and the
    # checkpoints, finer rechecks and plan rows compose the same one again) and its
    # self-composition made without dp_accounting's sparse size ** steps
    composed = pld.privacy_loss_distribution.identity(
        value_discretization_interval=discretization)
    for (nm, q), steps in counts:
        if q >= 1.0:
            part = pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=nm / math.sqrt(steps),
                value_discretization_interval=discretization,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        else:
            part = self_compose_pld(_subsampled_pld(nm, q, discretization), steps)
        composed = composed.compose(part)
    return float(composed.get_epsilon_for_delta(delta))


def _subsampled_pld(noise_multiplier: float, sample_rate: float, discretization: float) -> Any:
    """One Poisson-subsampled Gaussian release's PLD, as PLDAccountant builds it: the
    accounting layer's cached one, which :func:`check_pld_size` has just built (and bounded)
    for the same (sigma, q, discretization), so the audit never builds it a second time."""
    return _subsampled_gaussian_pld(noise_multiplier, sample_rate, discretization)


def finer_pld_epsilon(releases: Sequence[tuple[float, float, int] | None], delta: float,
                      independent: float, passes: Callable[[float], bool]) -> float:
    """The smallest pessimistic PLD epsilon of ``releases`` (None entries compose nothing)
    over ``independent`` (the one at :data:`PLD_VALUE_DISCRETIZATION`) and the finer
    :data:`PLD_RECHECK_DISCRETIZATIONS`, stopping at the first that ``passes``; every value is
    an upper bound on the true epsilon. A PLD beyond the memory guard is skipped."""
    counts: dict[tuple[float, float], int] = {}
    for release in releases:
        if release is not None:
            nm, q, steps = release
            counts[(float(nm), float(q))] = counts.get((float(nm), float(q)), 0) + int(steps)
    best = independent
    with _quiet_dp_accounting():
        for discretization in PLD_RECHECK_DISCRETIZATIONS:
            if passes(best) or not counts:
                break
            value = _pld_epsilon(counts, delta, discretization)
            if value is not None:
                best = min(best, value)
    return best


def _final_epsilons(releases: Sequence[tuple[float, float, int] | None],
                    delta: float) -> tuple[float | None, float | None]:
    """(PLD pessimistic, RDP) epsilon of all ``releases`` together, by dp_accounting."""
    real = [r for r in releases if r is not None]
    if not real:
        return None, None
    counts: dict[tuple[float, float], int] = {}
    total = np.zeros_like(_RDP_ORDERS)
    with _quiet_dp_accounting():
        for nm, q, steps in real:
            key = (float(nm), float(q))
            counts[key] = counts.get(key, 0) + int(steps)
            total = total + int(steps) * _rdp_curve(*key)
        return _pld_epsilon(counts, delta), _rdp_epsilon(total, delta)


def _check_pld_checkpoints(value: Any, name: str, option: str | None = None) -> None:
    # any count from the number of entries up checks every entry; beyond int64 is no count
    # the config would hold either
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < MAX_COUNT:
        raise AuditError(f"{name} must be an int in [1, 2**63)"
                         f"{f' ({option})' if option else ''}, got {value!r:.80}")


def independent_epsilons(releases: Sequence[tuple[float, float, int] | None], delta: float,
                         accountant: str,
                         checkpoints: int = DEFAULT_PLD_CHECKPOINTS) -> list[float | None]:
    """Cumulative epsilon after each release, by dp_accounting (independent of Opacus).

    ``releases[i]`` is ``(noise_multiplier, sample_rate, steps)`` or None (a refusal or an
    unparseable entry: composes nothing). ``accountant="rdp"``: RDP at every position.
    ``"prv"`` and ``"pld"``: PLD (pessimistic) at up to ``checkpoints`` positions (the last
    release always among them), None elsewhere. Positions with None releases get None.
    """
    if accountant not in ACCOUNTANTS:
        raise AuditError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if isinstance(releases, str | bytes) or not isinstance(releases, Sequence):
        raise AuditError("releases must be a sequence of (noise_multiplier, sample_rate, steps)"
                         f" or None, got {type(releases).__name__}")
    for i, release in enumerate(releases):
        if release is None:
            continue
        if isinstance(release, str | bytes) or not isinstance(release, Sequence) \
                or len(release) != len(ACCOUNTED_PARAMS):
            raise AuditError(f"releases[{i}] must be (noise_multiplier, sample_rate, steps) or"
                             f" None, got {release!r:.80}")
        problems = _release_problems(dict(zip(ACCOUNTED_PARAMS, release, strict=True)))
        if problems:
            raise AuditError(f"releases[{i}]: {'; '.join(problems)}")
    if not _number(delta) or not 0 < delta < 1:
        raise AuditError(f"delta must be in (0, 1), got {delta!r:.80}")
    _check_pld_checkpoints(checkpoints, "checkpoints")
    out: list[float | None] = [None] * len(releases)
    real = [i for i, r in enumerate(releases) if r is not None]
    if not real:
        return out
    with _quiet_dp_accounting():
        if accountant == "rdp":
            total = np.zeros_like(_RDP_ORDERS)
            for i in real:
                nm, q, steps = releases[i]  # type: ignore[misc]
                total = total + steps * _rdp_curve(float(nm), float(q))
                out[i] = _rdp_epsilon(total, delta)
            return out
        picks = {real[-1]}
        if checkpoints > 1:
            step = max(1, len(real) // checkpoints)
            picks.update(real[step - 1 :: step][: checkpoints - 1])
        counts: dict[tuple[float, float], int] = {}
        for i in real:
            nm, q, steps = releases[i]  # type: ignore[misc]
            key = (float(nm), float(q))
            counts[key] = counts.get(key, 0) + int(steps)
            if i in picks:
                out[i] = _pld_epsilon(counts, delta)
    return out


def _check_entries(entries: Any) -> None:
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence) \
            or not all(isinstance(e, dict) for e in entries):
        raise AuditError(f"entries must be a sequence of ledger entries (dicts), got"
                         f" {entries!r:.80}")


def mechanism_epsilon(entries: Sequence[dict[str, Any]], mechanism: str, delta: float,
                      accountant: str) -> float | None:
    """Epsilon of the ``mechanism`` releases among ledger ``entries`` (dicts with
    ``mechanism`` and ``params``) alone, composed by the ledger's own ``accountant``
    (:func:`privacy.accounting.plan_epsilon`, the code that calibrated and recorded them), so
    a claim about that mechanism computed from the run's plan (the white-box audit's DP-SGD
    claim) equals it; ``audit verify`` checks that accountant against dp_accounting. None
    when the entries hold no such release with well-formed accounting parameters; AuditError
    when ``entries`` is not a sequence of dicts."""
    _check_entries(entries)
    steps: dict[tuple[float, float], int] = {}
    for e in entries:
        p = e.get("params")
        if e.get("mechanism") == mechanism and isinstance(p, dict) and not _release_problems(p):
            key = (float(p["noise_multiplier"]), float(p["sample_rate"]))
            steps[key] = steps.get(key, 0) + int(p["steps"])
    if not steps:
        return None
    return plan_epsilon([PlannedRelease(mechanism, q, n, nm) for (nm, q), n in steps.items()],
                        delta, accountant=accountant)


def dpsgd_claim_problem(claim: float, entries: Sequence[dict[str, Any]], delta: float,
                        accountant: str | None, planned_steps: int | None,
                        rel_tol: float = DEFAULT_REL_TOL) -> str | None:
    """Why ``claim``, the epsilon of one client's planned DP-SGD releases (the white-box
    audit's claim), is not what that client's verified ledger ``entries`` record; None when
    it is. The claim is never allowed below the epsilon of the DP-SGD releases the ledger
    records (:func:`mechanism_epsilon` under the ledger's ``accountant`` and ``delta``; 0 for
    none); above
    it only while the ledger holds fewer DP-SGD steps than ``planned_steps`` (a client not
    drawn every round, a refused release), and then never above the epsilon of all
    ``planned_steps`` at the recorded noise and sample rate; a ledger holding every planned
    step, or any ledger when ``planned_steps`` is None (unknown), must give the claim within
    ``rel_tol``. AuditError naming the argument when ``claim`` is not a number >= 0,
    ``entries`` not a sequence of dicts, ``planned_steps`` neither None nor an int >= 0, or
    ``rel_tol`` not in [0, 1)."""
    if isinstance(claim, bool) or not isinstance(claim, int | float):
        raise AuditError(f"claim must be a number >= 0, got {claim!r:.80}")
    try:
        claim = float(claim)
    except OverflowError:  # an int beyond float's range
        claim = math.inf
    if not claim >= 0:  # NaN too
        raise AuditError(f"claim must be a number >= 0, got {claim!r:.80}")
    _check_entries(entries)
    if planned_steps is not None and (not _int(planned_steps) or planned_steps < 0):
        raise AuditError(f"planned_steps must be None or an int >= 0, got {planned_steps!r:.80}")
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, int | float) or not 0 <= rel_tol < 1:
        raise AuditError(f"rel_tol must be in [0, 1), got {rel_tol!r:.80}")
    dpsgd = [e for e in entries if e.get("mechanism") == "dpsgd"
             and isinstance(e.get("params"), dict) and not _release_problems(e["params"])]
    if dpsgd and accountant not in ACCOUNTANT_REGISTRY:
        return (f"it names no accountant registered in this process ({accountant!r}) to check"
                f" the claim {claim:.6g} with (a plug-in's registers when its module is imported)")
    recorded = mechanism_epsilon(dpsgd, "dpsgd", delta, accountant) if dpsgd else 0.0
    assert recorded is not None  # every entry passed _release_problems
    if claim < recorded * (1 - rel_tol):
        shown, by = format_ordered(claim, recorded)
        return f"the claim {shown} is below the epsilon {by} of the DP-SGD releases it records"
    steps = sum(int(e["params"]["steps"]) for e in dpsgd)
    if claim > recorded * (1 + rel_tol) and (planned_steps is None or steps >= planned_steps):
        held = "every planned step" if planned_steps is not None else "the steps it records"
        shown, by = format_ordered(claim, recorded)
        return (f"the claim {shown} exceeds the epsilon {by} of the DP-SGD"
                f" releases it records ({steps} steps: {held})")
    if claim > recorded * (1 + rel_tol) and dpsgd and planned_steps is not None:
        # the missing steps at the recorded noise and sample rate: the plan's epsilon
        missing: dict[str, Any] = {
            "mechanism": "dpsgd", "params": {**dpsgd[-1]["params"], "steps": planned_steps - steps}}
        ceiling = mechanism_epsilon([*dpsgd, missing], "dpsgd", delta, accountant or "")
        if ceiling is not None and claim > ceiling * (1 + rel_tol):
            shown, by = format_ordered(claim, ceiling)
            return (f"the claim {shown} exceeds the epsilon {by} of all"
                    f" {planned_steps} planned DP-SGD steps at the recorded noise and sample rate")
    return None


# --------------------------------------------------------------------------- run level


@dataclass
class _RunContext:
    run_dir: Path
    config: ExperimentConfig | None
    results: dict[str, Any] | None
    findings: list[Finding]
    options: Mapping[str, str]
    # results.json's per-client summary rows by method, indexed once (see summary_row)
    _rows: dict[str | None, dict[str, dict[str, Any]]] = field(default_factory=dict, repr=False)

    def summary_rows(self, method: str | None) -> dict[str, dict[str, Any]]:
        """results.json's summary rows of ``method`` by client (:func:`_anchor_rows`), indexed
        on the first call (one pass over them, not one per ledger)."""
        if method not in self._rows:
            self._rows[method] = _anchor_rows(self.results, method)
        return self._rows[method]

    def summary_row(self, method: str | None, client_id: str) -> dict[str, Any] | None:
        """The results.json summary row of ``client_id`` (:meth:`summary_rows`)."""
        return self.summary_rows(method).get(client_id)


def _load_results(run_dir: Path, findings: list[Finding]) -> dict[str, Any] | None:
    path = run_dir / "results.json"
    if not path.is_file() and (path.exists() or path.is_symlink()):
        findings.append(Finding("error", "results", f"{path} {_absent(path)}: the run's results"
                                " cannot be read; restore the file"))
        return None
    if not path.is_file():
        findings.append(Finding("warning", "results", f"{path} is missing; run identity,"
                                " anchors and accuracy cannot be checked", unchecked=True))
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # incl. JSONDecodeError, huge integers
        findings.append(Finding("error", "results", f"{path} is not readable JSON: {exc}"))
        return None
    if not isinstance(doc, dict):
        findings.append(Finding("error", "results", f"{path} is not a JSON object"))
        return None
    for key in ("methods", "privacy", "assumptions"):
        if key in doc and not isinstance(doc[key], dict):
            findings.append(Finding("error", "results", f"{path}: {key!r} must be an object, got"
                                    f" {type(doc[key]).__name__}"))
            doc = {k: v for k, v in doc.items() if k != key}
    return doc


def _load_config(run_dir: Path, results: dict[str, Any] | None,
                 findings: list[Finding], imports: str | None = None) -> ExperimentConfig | None:
    path = run_dir / "config.toml"
    if not path.is_file():
        findings.append(Finding("warning", "config", f"{path} {_absent(path)}; budgets cannot be"
                                " checked against the configuration", unchecked=True))
        return None
    try:
        cfg, unknown = load_run_config(path)
    except ConfigError as exc:
        findings.append(Finding("error", "config", f"{path} is not a valid config: {exc}"))
        return None
    for kind, name in unknown:  # the ledgers need names only; its checks need its module
        findings.append(Finding(
            "warning", "config", "config.toml names"
            f" {unregistered_hint(kind, name, 'audits.verify.verify_run', imports)}: the"
            " config checks it declares were not run; the ledgers, signatures and budgets are"
            " verified as for any run", unchecked=True))
    if results is not None and "config_hash" in results:
        actual = config_hash(cfg)
        if results["config_hash"] != actual:
            findings.append(Finding(
                "error", "config",
                f"config.toml hashes to {actual[:16]}... under this code, results.json names"
                f" {str(results['config_hash'])[:16]}...: config.toml was changed after the run,"
                f" or the config schema (its defaults) changed since the run's code version"
                f" {results.get('version', '(unknown)')!s}; audit with that version",
            ))
    return cfg


def _allowlist_to_give(options: Mapping[str, str]) -> str:
    """What to give where a run directory holds no ``keys/`` (a Flower run's collected folder),
    naming the caller's allowlist argument (``options``): one wording for verify's finding and
    the ledger-reading audits' error."""
    return ("give the allowlist registered for the run's parties (on Flower the copy of the"
            f" server's identities/server/allowlist.json) with {options['allowlist']}")


def _load_keys(run_dir: Path, allowlist: Path | None, findings: list[Finding],
               options: Mapping[str, str] = API_AUDIT_OPTIONS,
               given: dict[str, PublicIdentity] | None = None,
               publishes_keys: bool = True,
               ) -> tuple[dict[str, PublicIdentity], str]:
    """The allowlist in use (``allowlist`` when given, else the run's own) and its label;
    its findings, and those of the run's ``keys/`` held to it, go to ``findings``.
    ``publishes_keys``: the run's runtime writes ``keys/`` (the in-process one does, a Flower
    result directory holds none), so a missing ``keys/`` is a finding."""
    if allowlist is None and not publishes_keys and not (run_dir / "keys").exists():
        # A Flower result directory holds no keys/ by design: "keys taken from the run
        # directory" and "does not exist" misstated what is missing, and not what to give.
        path = run_dir / "keys" / "allowlist.json"
        findings.append(Finding(
            "error", "allowlist",
            f"no allowlist to check signatures under: a Flower result directory holds no keys/"
            f" ({path} does not exist); {_allowlist_to_give(options)}"))
        return {}, str(path)
    if allowlist is None:
        path = run_dir / "keys" / "allowlist.json"
        findings.append(Finding(
            "warning", "allowlist",
            f"public keys taken from the run directory itself ({path}); they are only as"
            " trustworthy as the directory (the keys/*.pub files, X25519 keys included, are"
            " then checked only against that file): pass an independently registered"
            f" allowlist ({options['allowlist']}) to rule out a re-signed ledger",
            unchecked=True))
    else:
        path = allowlist
    try:
        if given is None and not path.is_file() and path.exists():  # a FIFO would block
            raise IdentityError(f"allowlist file {path} {_absent(path)}")
        keys = given if given is not None else load_allowlist(path)
    except IdentityError as exc:  # the run's own keys/allowlist.json: a finding against it
        findings.append(Finding("error", "allowlist", str(exc)))
        return {}, str(path)
    keys_dir = run_dir / "keys"
    if allowlist is not None:  # private keys: _verify_dir, for every run
        findings.extend(_published_allowlist_findings(keys_dir, allowlist, keys,
                                                      publishes_keys))
    findings.extend(_public_key_file_findings(keys_dir, keys))
    return keys, str(path)


def given_allowlist_findings(run_dir: Path, given: Path,
                             keys: Mapping[str, PublicIdentity]) -> list[Finding]:
    """What an independently registered allowlist ``given`` (loaded as ``keys``) requires of
    ``run_dir`` in :func:`check_anchor` and :func:`verified_ledger_entries`: no private key
    inside the directory (:func:`_private_key_findings`) and a published
    ``keys/allowlist.json`` that agrees with ``given`` (:func:`_published_allowlist_findings`).
    :func:`verify_run` runs the same two checks, the first for every run."""
    return [*_private_key_findings(run_dir),
            *_published_allowlist_findings(run_dir / "keys", given, keys)]


def _published_allowlist_findings(keys_dir: Path, given: Path,
                                  keys: Mapping[str, PublicIdentity],
                                  publishes_keys: bool = False) -> list[Finding]:
    """The run's own ``keys/allowlist.json`` against the independently registered allowlist
    ``given`` (the trust root, already loaded as ``keys``). The run publishes the keys of its
    own parties, a subset of the key store's, so a registered party it does not list is no
    finding; a party it lists that ``given`` does not, a key (Ed25519 or X25519) other than
    the registered one, or an unreadable file is an error: the directory misstates who could
    sign its ledgers and anchor. No published file where ``keys/`` exists is a warning, and so
    is no ``keys/`` at all where the run's runtime writes one (``publishes_keys``; a Flower
    result directory holds none: no finding)."""
    own = keys_dir / "allowlist.json"
    if not own.is_file():
        if keys_dir.is_dir():
            return [Finding("warning", "allowlist", f"{own} {_absent(own)}: the run directory does"
                            f" not state who could sign it (checked against {given} alone)",
                            unchecked=True)]
        if publishes_keys:
            why = "is not a directory" if keys_dir.exists() else "is missing"
            return [Finding("warning", "key_file", f"{keys_dir} {why}: the run"
                            " directory publishes none of its public keys (keys/allowlist.json,"
                            " keys/<party>.ed25519.pub and .x25519.pub), so none was compared"
                            f" with {given}; the given allowlist's keys stand in for them",
                            unchecked=True)]
        return []
    try:
        published = load_allowlist(own)
    except IdentityError as exc:
        return [Finding("error", "allowlist", f"the run's published allowlist cannot be"
                        f" compared with {given}: {exc}")]
    added = sorted(p for p in published if p not in keys)
    replaced = sorted(p for p in published if p in keys and published[p] != keys[p])
    out = []
    if added:
        out.append(Finding("error", "allowlist", f"{own} lists {len(added)} parties the given"
                           f" allowlist {given} does not register ({', '.join(added[:5])}"
                           f"{' ...' if len(added) > 5 else ''}): the run directory claims"
                           " signers the trust root does not know"))
    for party in replaced:
        out.append(Finding("error", "allowlist", f"{own} lists other keys for {party!r} than"
                           f" the given allowlist {given}: the run directory's keys were"
                           " replaced (or it was made with another key store)", party))
    return out


@functools.lru_cache(maxsize=4)
def _client_indices(num_clients: int) -> Mapping[str, int]:
    """Each canonical client id of a ``num_clients``-client federation -> its index (built
    once per size: a verify asks for every ledger's)."""
    return MappingProxyType({cid: i for i, cid in enumerate(client_ids(num_clients))})


def _configured_budget(cfg: ExperimentConfig, client_id: str) -> tuple[float, float] | None:
    index = _client_indices(cfg.data.num_clients).get(client_id)
    if index is None:
        return None
    p = cfg.privacy
    override = p.overrides.get(str(index))
    eps = override.epsilon if override is not None else p.epsilon
    delta = override.delta if override is not None and override.delta is not None else p.delta
    return float(eps), float(delta)


def _chosen_accountant(results: dict[str, Any] | None, method: str | None) -> str | None:
    """The accountant results.json records for ``method`` (``privacy[<method>].accountant``)."""
    if not results or not isinstance(results.get("privacy"), dict):
        return None
    section = results["privacy"].get(method) if method is not None else results["privacy"]
    if isinstance(section, dict) and isinstance(section.get("accountant"), str):
        return section["accountant"]
    return None


def _results_section(results: dict[str, Any] | None,
                     method: str | None) -> dict[str, Any] | None:
    """results.json's privacy section for ``method`` (``privacy`` itself without a method)."""
    if not results or not isinstance(results.get("privacy"), dict):
        return None
    section = results["privacy"].get(method) if method is not None else results["privacy"]
    return section if isinstance(section, dict) else None


def _same_number(recorded: Any, ledger: Any, exact: bool) -> bool:
    """``recorded`` (results.json) states ``ledger``'s value: the same float where results.json
    states its figures ``exact`` (its plan rows say ``"figures": "exact"``); a run written
    before that (no such row) could round the per-client noise multiplier to 6 decimals."""
    if not _number(recorded) or not _number(ledger):
        return recorded == ledger
    if exact:
        return float(recorded) == float(ledger)
    return math.isclose(float(recorded), float(ledger), rel_tol=1e-9, abs_tol=0.0) \
        or float(recorded) == round(float(ledger), 6)


def _states_exact_figures(section: dict[str, Any] | None) -> bool:
    """Whether results.json's privacy section of a method states its figures exactly (a run
    written since plan rows carry ``"figures": "exact"``)."""
    rows = (section or {}).get("plan")
    return isinstance(rows, list) and any(isinstance(r, dict) and r.get("figures") == "exact"
                                          for r in rows)


def _plan_findings(entries: Sequence[dict[str, Any] | None], section: dict[str, Any] | None,
                   row: dict[str, Any] | None, client_id: str,
                   method: str | None) -> list[Finding]:
    """``results_plan`` errors: a DP-SGD ledger entry whose noise multiplier, sample rate or
    steps differ from what results.json states for the client (its ``noise_multiplier``)
    and the method (``sample_rate``, ``steps_per_round``); the first differing entry of
    each field is named."""
    stated = {"noise_multiplier": (row or {}).get("noise_multiplier", None),
              "sample_rate": (section or {}).get("sample_rate", None),
              "steps": (section or {}).get("steps_per_round", None)}
    names = {"noise_multiplier": "its noise_multiplier", "sample_rate": "sample_rate",
             "steps": "steps_per_round"}
    findings: list[Finding] = []
    exact = _states_exact_figures(section)
    for key, want in stated.items():
        if want is None:
            continue
        for i, e in enumerate(entries):
            if e is None or e.get("mechanism") != "dpsgd" or not isinstance(e.get("params"), dict):
                continue
            got = e["params"].get(key)
            if got is not None and not _same_number(want, got, exact):
                findings.append(Finding(
                    "error", "results_plan", f"the dpsgd release records {key} {got!r},"
                    f" results.json states {names[key]} {want!r}", client_id, i, method))
                break
    if exact:
        findings.extend(_plan_row_findings(entries, section, client_id, method))
    return findings


def _budget_rows(rows: Sequence[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan rows of the budget (epsilon and delta) a ledger entry records."""
    return [row for row in rows if row.get("epsilon_budget") == entry.get("budget_epsilon")
            and row.get("delta") == entry.get("delta")]


def _plan_row_findings(entries: Sequence[dict[str, Any] | None], section: dict[str, Any] | None,
                       client_id: str, method: str | None) -> list[Finding]:
    """``results_plan`` error: a plan row stating its figures exactly (``"figures": "exact"``)
    for the budget (epsilon and delta) of the client's DP-SGD releases whose noise multiplier
    is not the float they record (the first such entry is named). The plan row is what a
    report shows as the run's DP-SGD noise; a run written before the mark is not held to it."""
    plan = (section or {}).get("plan")
    rows = [r for r in (plan if isinstance(plan, list) else [])
            if isinstance(r, dict) and r.get("figures") == "exact"]
    for i, e in enumerate(entries):
        if e is None or e.get("mechanism") != "dpsgd" or not isinstance(e.get("params"), dict):
            continue
        got = e["params"].get("noise_multiplier")
        for row in _budget_rows(rows, e):
            if "noise_multiplier" not in row:
                continue
            if got is not None and not _same_number(row["noise_multiplier"], got, True):
                return [Finding(
                    "error", "results_plan", f"the dpsgd release records noise_multiplier"
                    f" {got!r}, results.json's plan for its budget (epsilon"
                    f" {row['epsilon_budget']!r}, delta {row['delta']!r}) states"
                    f" {row['noise_multiplier']!r}", client_id, i, method)]
    return _planned_fixed_noise_findings(entries, rows, client_id, method)


#: One release line of an exact plan row (``privacy.<method>.plan[].releases``), as
#: :func:`secure_fedora.secure.private.plan_table` writes it: ``"<mechanism> x<steps>
#: (q=<sample rate>[, sigma=<noise multiplier>])"``, each float in its round-trip form.
_PLAN_RELEASE_LINE = re.compile(
    r"(?P<mech>\S+) x(?P<steps>\d+) \(q=(?P<q>[^,()]+)(?:, sigma=(?P<sigma>[^,()]+))?\)"
)


def _planned_fixed_noise(row: dict[str, Any]) -> dict[str, tuple[float, float]] | None:
    """Per mechanism, the ``(sample_rate, noise_multiplier)`` an exact plan row states for a
    release of fixed (calibrated) noise: the noised summary, the lambda, a plug-in's; None
    when its releases list is not the documented one (no figure is then compared)."""
    lines = row.get("releases")
    if not isinstance(lines, list):
        return None
    out: dict[str, tuple[float, float]] = {}
    for line in lines:
        match = _PLAN_RELEASE_LINE.fullmatch(line) if isinstance(line, str) else None
        if match is None:
            return None
        if match["sigma"] is None:  # DP-SGD: its noise is the row's noise_multiplier
            continue
        try:
            out[match["mech"]] = (float(match["q"]), float(match["sigma"]))
        except ValueError:
            return None
    return out


def _planned_fixed_noise_findings(entries: Sequence[dict[str, Any] | None],
                                  rows: Sequence[dict[str, Any]], client_id: str,
                                  method: str | None) -> list[Finding]:
    """``results_plan`` errors: an entry of a fixed-noise mechanism (``gaussian_summary``,
    ``gaussian_lambda``, a plug-in's) whose noise multiplier or sample rate is not the float
    the exact plan row of its budget states for that mechanism (``releases``: ``sigma=``,
    ``q=``); the first such entry of each mechanism is named. The plan row is what a report
    shows as the run's noise for these releases."""
    findings: list[Finding] = []
    named: set[str] = set()
    for i, e in enumerate(entries):
        if e is None or not isinstance(e.get("params"), dict):
            continue
        mech = e.get("mechanism")
        # a mechanism that is no string (the schema check names it) would not even hash
        if not isinstance(mech, str) or mech in ("dpsgd", REFUSAL, REPAIR, CLOSE) or mech in named:
            continue
        for row in _budget_rows(rows, e):
            planned = _planned_fixed_noise(row)
            if planned is None or mech not in planned:
                continue
            rate, sigma = planned[mech]
            got = {"noise_multiplier": e["params"].get("noise_multiplier"),
                   "sample_rate": e["params"].get("sample_rate")}
            want = {"noise_multiplier": sigma, "sample_rate": rate}
            wrong = [k for k in want if got[k] is not None and not _same_number(want[k], got[k],
                                                                                 True)]
            if wrong:
                named.add(mech)
                findings.append(Finding(
                    "error", "results_plan", f"the {mech} release records "
                    + ", ".join(f"{k} {got[k]!r}" for k in wrong)
                    + f", results.json's plan for its budget (epsilon {row['epsilon_budget']!r},"
                    f" delta {row['delta']!r}) states "
                    + ", ".join(f"{k} {want[k]!r}" for k in wrong), client_id, i, method))
                break
    return findings


#: The candidates of ``privacy.accountant = "auto"`` whose epsilons a comparison row states
#: (``<name>_epsilon_of_plan``), and the ``plan`` value naming each one's calibrated plan.
CHOICE_CANDIDATES: dict[str, str] = {"rdp-calibrated": "rdp", "pld-calibrated": "pld"}
#: What a recorded ``*_epsilon_of_plan`` may exceed its recomputation by beyond ``rel_tol``:
#: the runtime rounds it up to 6 decimals.
_CHOICE_ROUNDING = 1e-6


def _choice_row_releases(row: dict[str, Any]
                         ) -> tuple[list[tuple[float, float, int]], str | None]:
    """The ``(noise_multiplier, sample_rate, steps)`` of each release a comparison row's
    ``plan_releases`` states, or a problem with them (then no release)."""
    lines = row.get("plan_releases")
    if not isinstance(lines, list) or not lines:
        return [], f"plan_releases must be a non-empty list, got {lines!r:.80}"
    out: list[tuple[float, float, int]] = []
    for k, line in enumerate(lines):
        if not isinstance(line, dict) or not isinstance(line.get("mechanism"), str):
            return [], f"plan_releases[{k}] must be an object naming its mechanism, got {line!r:.80}"
        problems = _release_problems(line)
        if problems:
            return [], f"plan_releases[{k}] ({line['mechanism']}): " + "; ".join(
                p.replace("params.", "").replace("params lacks", "lacks") for p in problems)
        out.append((float(line["noise_multiplier"]), float(line["sample_rate"]),
                    int(line["steps"])))
    return out, None


def _choice_row_noise_problem(row: dict[str, Any]) -> str | None:
    """Where a comparison row's ``plan_releases`` do not carry the noise its own candidate
    states for the plan it names (``plan``: ``<name>_noise_by_mechanism``, DP-SGD's also
    ``<name>_noise_multiplier``): the plan both epsilons are of must be that candidate's."""
    name = CHOICE_CANDIDATES.get(row.get("plan"))  # type: ignore[arg-type]
    if name is None:
        return f"plan must be one of {sorted(CHOICE_CANDIDATES)}, got {row.get('plan')!r:.80}"
    stated = row.get(f"{name}_noise_by_mechanism")
    if not isinstance(stated, dict):
        return f"{name}_noise_by_mechanism must be an object, got {stated!r:.80}"
    for line in row["plan_releases"]:
        mech, sigma = line["mechanism"], line["noise_multiplier"]
        want = stated.get(mech)
        if mech == "dpsgd" and row.get(f"{name}_noise_multiplier") != want:
            return (f"{name}_noise_multiplier {row.get(f'{name}_noise_multiplier')!r} is not"
                    f" {name}_noise_by_mechanism's dpsgd {want!r}")
        if not _number(want) or float(want) != float(sigma):
            return (f"plan_releases' {mech} noise_multiplier {sigma!r} is not the"
                    f" {name}-calibrated plan's ({name}_noise_by_mechanism: {want!r})")
    return None


def _choice_row_plan_problem(row: dict[str, Any], chosen: Any,
                             section: dict[str, Any] | None) -> str | None:
    """Where the noise a comparison row states for the chosen accountant's plan
    (``<chosen>_noise_by_mechanism``) is not what the method's exact plan row of that budget
    states (``noise_multiplier``, each release line's ``sigma=``): that plan row is held to
    the ledgers (``results_plan``), so the chosen candidate's row must be the run's plan."""
    stated = row.get(f"{chosen}_noise_by_mechanism") if chosen in ("rdp", "pld") else None
    if not isinstance(stated, dict) or not _states_exact_figures(section):
        return None
    plan = [r for r in (section or {}).get("plan", []) if isinstance(r, dict)
            and r.get("figures") == "exact" and r.get("prv_refine", True) is True]
    for plan_row in _budget_rows(plan, {"budget_epsilon": row.get("epsilon_budget"),
                                        "delta": row.get("delta")}):
        want = {**(_planned_fixed_noise(plan_row) or {}),
                "dpsgd": (None, plan_row.get("noise_multiplier"))}
        for mech, sigma in stated.items():
            if mech in want and not _same_number(want[mech][1], sigma, True):
                return (f"{chosen}_noise_by_mechanism states {mech} noise {sigma!r}, the"
                        f" method's plan for this budget (the {chosen} plan the run used)"
                        f" {want[mech][1]!r}")
    return None


def _chosen_by_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The accountant ``privacy.accountant = "auto"`` takes for these comparison rows: PLD
    when it calibrates every budget and its epsilon of each row's plan is at most RDP's
    (where RDP calibrates), else RDP (:func:`secure_fedora.secure.private.choose_accountant`)."""
    for row in rows:
        pld_eps, rdp_eps = row.get("pld_epsilon_of_plan"), row.get("rdp_epsilon_of_plan")
        if row.get("pld_noise_multiplier") is None or not _number(pld_eps) or (
                row.get("rdp_noise_multiplier") is not None
                and (not _number(rdp_eps) or pld_eps > rdp_eps)):
            return "rdp"
    return "pld"


def _stated_epsilon_problem(
    key: str,
    recorded: Any,
    name: str,
    independent: float | None,
    releases: Sequence[tuple[float, float, int]],
    delta: float,
    rel_tol: float,
    source: str,
    upper: bool = True,
) -> str | None:
    """Why ``recorded`` (results.json's ``key``, rounded up to 6 decimals) is not the epsilon
    of ``releases`` at ``delta`` under ``name`` ("rdp", or "pld": pessimistic, rechecked at
    finer discretizations before failing) that dp_accounting gives (``independent``), within
    ``rel_tol`` plus the rounding (``upper`` False: only a value below it is one); None where
    it is, and where either is None (beyond the discretized accountant's memory guard: neither
    evaluates it)."""
    if recorded is None or independent is None:
        return None
    if not _number(recorded):
        return f"{key} must be a number or null, got {recorded!r:.80}"

    def agrees(value: float, recorded: float = float(recorded)) -> bool:
        return value * (1 - rel_tol) <= recorded and (
            not upper or recorded <= value * (1 + rel_tol) + _CHOICE_ROUNDING
        )

    if name == "pld" and not agrees(independent):
        independent = finer_pld_epsilon(releases, delta, independent, agrees)
    if agrees(independent):
        return None
    shown, by = format_ordered(float(recorded), independent)
    return (
        f"{key} is {shown}, but {source} compose to epsilon {by} ({name.upper()},"
        f" dp_accounting), off by more than {tolerance_text(rel_tol)}"
    )


def _accountant_choice_findings(section: dict[str, Any] | None, method: str | None,
                                rel_tol: float) -> list[Finding]:
    """``accountant_choice`` findings for a method's results.json privacy section: each
    comparison row of ``privacy.accountant = "auto"`` that states its plan's releases
    (``plan_releases``) has both ``*_epsilon_of_plan`` recomputed from them with
    dp_accounting (RDP; PLD pessimistic, rechecked at finer discretizations before failing),
    and an error names the row and key that is off by more than ``rel_tol`` (plus the
    runtime's rounding up to 6 decimals), releases that are not the noise its calibrated
    candidate states, or a chosen accountant the rows do not choose. A row written before
    rows stated their releases gets one unchecked warning; a None epsilon (beyond the
    discretized accountant's memory guard) is not recomputed."""
    choice = (section or {}).get("accountant_choice")
    if not isinstance(choice, dict) or not choice.get("comparison"):
        return []  # a configured accountant: nothing was compared
    rows = choice["comparison"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return [Finding("error", "accountant_choice", "results.json's accountant_choice."
                        f"comparison must be a list of objects, got {rows!r:.80}", None, None,
                        method)]
    findings: list[Finding] = []

    def err(i: int, message: str) -> None:
        row = rows[i]
        findings.append(Finding(
            "error", "accountant_choice", f"accountant_choice.comparison[{i}] (epsilon"
            f" {row.get('epsilon_budget')!r}, delta {row.get('delta')!r}): {message}",
            None, None, method))

    old = [i for i, row in enumerate(rows) if "plan_releases" not in row and "plan" in row]
    for i, row in enumerate(rows):
        if "plan_releases" not in row:
            continue
        delta = row.get("delta")
        if not _number(delta) or not 0 < delta < 1:
            err(i, f"delta must be in (0, 1), got {delta!r:.80}")
            continue
        releases, problem = _choice_row_releases(row)
        problem = problem or _choice_row_noise_problem(row)
        if problem is not None:
            err(i, problem)
            continue
        problem = _choice_row_plan_problem(row, choice.get("accountant"), section)
        if problem is not None:
            err(i, problem)
        pld_eps, rdp_eps = _final_epsilons(releases, float(delta))
        for name, independent in (("rdp", rdp_eps), ("pld", pld_eps)):
            key = f"{name}_epsilon_of_plan"
            problem = _stated_epsilon_problem(
                key,
                row.get(key),
                name,
                independent,
                releases,
                float(delta),
                rel_tol,
                "its plan_releases",
            )
            if problem is not None:
                err(i, problem)
    if old:
        findings.append(Finding(
            "warning", "accountant_choice", f"accountant_choice.comparison row(s)"
            f" {', '.join(map(str, old))} state no plan_releases (a run written before they"
            " were recorded): their *_epsilon_of_plan were not recomputed", None, None,
            method, unchecked=True))
    chosen = choice.get("accountant")
    if not any(f.severity == "error" for f in findings) \
            and all(r.get("plan") in CHOICE_CANDIDATES for r in rows) \
            and chosen != _chosen_by_rows(rows):
        findings.append(Finding(
            "error", "accountant_choice", f"accountant_choice names {chosen!r}, but its"
            f" comparison rows choose {_chosen_by_rows(rows)!r} (PLD only where it is at"
            " least as tight for every budget)", None, None, method))
    return findings


#: What a plan row (``privacy.<method>.plan[]``) must state for its planned epsilons to be
#: recomputed; a row written before one of them has its epsilons unchecked.
_PLAN_EPSILON_FIELDS: tuple[str, ...] = (
    "delta",
    "noise_multiplier",
    "releases",
    "accountant",
    "planned_epsilon",
    "planned_epsilon_rdp",
    "planned_epsilon_pld",
)


def _plan_row_releases(row: dict[str, Any]) -> tuple[list[tuple[float, float, int]], str | None]:
    """The ``(noise_multiplier, sample_rate, steps)`` of each release line of a plan row
    (``"<mechanism> x<steps> (q=<rate>[, sigma=<noise>])"``, DP-SGD's noise the row's
    ``noise_multiplier``), or a problem with them (then no release)."""
    lines = row["releases"]
    if not isinstance(lines, list) or not lines:
        return [], f"releases must be a non-empty list of release lines, got {lines!r:.80}"
    out: list[tuple[float, float, int]] = []
    for k, line in enumerate(lines):
        match = _PLAN_RELEASE_LINE.fullmatch(line) if isinstance(line, str) else None
        if match is None:
            return [], (
                f"releases[{k}] must read '<mechanism> x<steps> (q=<sample rate>[,"
                f" sigma=<noise multiplier>])', got {line!r:.80}"
            )
        try:
            params = {
                "sample_rate": float(match["q"]),
                "steps": int(match["steps"]),
                "noise_multiplier": row["noise_multiplier"]
                if match["sigma"] is None
                else float(match["sigma"]),
            }
        except ValueError:
            return [], f"releases[{k}] states a q or sigma that is no number, got {line!r:.80}"
        problems = _release_problems(params)
        if problems:  # DP-SGD's noise_multiplier is the row's
            return [], f"releases[{k}] ({match['mech']}): " + "; ".join(
                p.replace("params.", "") for p in problems
            )
        out.append(
            (float(params["noise_multiplier"]), float(params["sample_rate"]), int(params["steps"]))
        )
    return out, None


def _plan_epsilon_findings(
    section: dict[str, Any] | None, method: str | None, rel_tol: float
) -> list[Finding]:
    """``plan_epsilon`` findings for a method's results.json plan rows
    (``privacy.<method>.plan``): each row's ``planned_epsilon_rdp`` and
    ``planned_epsilon_pld`` are recomputed from its ``releases`` (DP-SGD's noise its
    ``noise_multiplier``) at its ``delta`` with dp_accounting, within ``rel_tol`` plus the
    runtime's rounding up to 6 decimals (as :func:`_accountant_choice_findings`), and its
    ``planned_epsilon`` must be the value of the accountant it names (``accountant``): that
    key's exactly for RDP and PLD, and for PRV not below the pessimistic PLD by more than
    ``rel_tol``; a row's ``accountant`` must be the one its section states (the method ran
    under). An error names the row and key; rows written before they stated every field
    (:data:`_PLAN_EPSILON_FIELDS`) get one unchecked warning."""
    plan = (section or {}).get("plan")
    if plan is None:
        return []
    if not isinstance(plan, list) or not all(isinstance(r, dict) for r in plan):
        return [
            Finding(
                "error",
                "plan_epsilon",
                f"results.json's plan must be a list of objects, got {plan!r:.80}",
                None,
                None,
                method,
            )
        ]
    findings: list[Finding] = []

    def err(i: int, message: str) -> None:
        row = plan[i]
        findings.append(
            Finding(
                "error",
                "plan_epsilon",
                f"plan[{i}] (epsilon {row.get('epsilon_budget')!r},"
                f" delta {row.get('delta')!r}): {message}",
                None,
                None,
                method,
            )
        )

    ran_under = (section or {}).get("accountant")
    old: dict[int, list[str]] = {}
    for i, row in enumerate(plan):
        if "accountant" in row and row["accountant"] != ran_under:
            where = f"privacy.{method}" if method is not None else "privacy"
            err(
                i,
                f"accountant is {row['accountant']!r:.80}, but results.json's {where} states"
                f" accountant {ran_under!r:.80} (the one the method ran under)",
            )
        missing = [k for k in _PLAN_EPSILON_FIELDS if k not in row]
        if missing:
            old[i] = missing
            continue
        delta = row["delta"]
        if not _number(delta) or not 0 < delta < 1:
            err(i, f"delta must be in (0, 1), got {delta!r:.80}")
            continue
        releases, problem = _plan_row_releases(row)
        if problem is not None:
            err(i, problem)
            continue
        pld_eps, rdp_eps = _final_epsilons(releases, float(delta))
        independent = {"rdp": rdp_eps, "pld": pld_eps}

        def stated_problem(key: str, value: Any, name: str, upper: bool = True,
                           independent: dict[str, float | None] = independent,
                           releases: Sequence[tuple[float, float, int]] = releases,
                           delta: float = float(delta)) -> str | None:
            """The problem of this row's stated ``key`` against ``name``'s recomputed value."""
            return _stated_epsilon_problem(key, value, name, independent[name], releases, delta,
                                           rel_tol, "its releases", upper=upper)

        for name in ("rdp", "pld"):
            key = f"planned_epsilon_{name}"
            problem = stated_problem(key, row[key], name)
            if problem is not None:
                err(i, problem)
        chosen, stated = row["accountant"], row["planned_epsilon"]
        if not isinstance(chosen, str) or not chosen:
            err(i, f"accountant must be a non-empty string, got {chosen!r:.80}")
        elif not _number(stated):
            err(i, f"planned_epsilon must be a number, got {stated!r:.80}")
        elif chosen in ("rdp", "pld") and _number(row[f"planned_epsilon_{chosen}"]):
            if float(stated) != float(row[f"planned_epsilon_{chosen}"]):
                err(
                    i,
                    f"planned_epsilon is {stated!r}, but the plan's accountant {chosen!r}"
                    f" gives planned_epsilon_{chosen} {row[f'planned_epsilon_{chosen}']!r}",
                )
        else:  # PRV or a plug-in (dp_accounting has neither: its PLD bounds them), or null
            name = chosen if chosen in ("rdp", "pld") else "pld"
            # PRV's bound adds its discretization error (absolute: 0.01 for a run ledgered
            # before PRV refined it), and a plug-in's may be looser still, so only a value
            # below the pessimistic PLD is wrong
            problem = stated_problem("planned_epsilon", stated, name,
                                     upper=chosen in ("rdp", "pld"))
            if problem is not None:
                err(i, f"{problem} (its accountant: {chosen!r})")
    if old:
        fields = sorted({k for missing in old.values() for k in missing})
        findings.append(
            Finding(
                "warning",
                "plan_epsilon",
                f"plan row(s) {', '.join(map(str, old))} state no"
                f" {', '.join(fields)} (a run written before they were recorded): their planned"
                " epsilons were not recomputed",
                None,
                None,
                method,
                unchecked=True,
            )
        )
    return findings


def _plan_coverage_findings(
    section: dict[str, Any] | None,
    method: str | None,
    budgets: Mapping[str, Mapping[tuple[Any, Any], str]],
    held: Mapping[str, tuple[Any, Any]],
) -> list[Finding]:
    """``plan_coverage`` findings. Errors: a client of ``method`` whose budget
    ``(epsilon, delta)`` (``budgets``: client id -> each budget -> where it is stated) no row
    of results.json's plan states, or, where the accountant was chosen
    (``accountant_choice.comparison``), no comparison row: its noise and planned epsilon are
    then stated nowhere; a plan row stating no valid ``clients`` count; and a budget whose plan
    rows state ``clients`` counts that do not add up to the number of clients holding it
    (``held``: client id -> the budget its ledger records, else its results.json row states).
    A privacy section stating no plan at all (a
    run written before it, or a plan removed) gets an unchecked warning: none of the plan's
    checks could be made."""
    where = f"privacy.{method}" if method is not None else "privacy"
    plan = (section or {}).get("plan")
    if isinstance(section, dict) and plan is None:
        return [
            Finding(
                "warning",
                "plan_coverage",
                f"results.json's {where} states no plan (a run written before it was recorded,"
                " or a plan removed): the planned noise and epsilons, and their coverage of"
                " every client's budget, were not checked",
                None,
                None,
                method,
                unchecked=True,
            )
        ]
    tables: list[tuple[str, list[Any]]] = []
    if isinstance(plan, list):
        tables.append((f"{where}.plan", plan))
    choice = (section or {}).get("accountant_choice")
    if (
        isinstance(choice, dict)
        and isinstance(choice.get("comparison"), list)
        and choice["comparison"]
    ):
        tables.append(("accountant_choice.comparison", choice["comparison"]))
    findings: list[Finding] = []
    for table, rows in tables:
        covered = {
            (r["epsilon_budget"], r["delta"])
            for r in rows
            if isinstance(r, dict) and _number(r.get("epsilon_budget")) and _number(r.get("delta"))
        }
        for client_id in sorted(budgets):
            for (eps, delta), source in budgets[client_id].items():
                if (eps, delta) not in covered:
                    findings.append(
                        Finding(
                            "error",
                            "plan_coverage",
                            f"no row of results.json's {table} states"
                            f" the client's budget (epsilon {eps!r}, delta {delta!r}; {source}):"
                            " its planned noise and epsilon are stated nowhere",
                            client_id,
                            None,
                            method,
                        )
                    )
    if isinstance(plan, list):
        findings.extend(_plan_clients_findings(plan, where, method, held))
    return findings


def _plan_clients_findings(
    plan: Sequence[Any], where: str, method: str | None, held: Mapping[str, tuple[Any, Any]]
) -> list[Finding]:
    """``plan_coverage`` errors: per budget, the ``clients`` its plan rows state (a runtime
    can split one budget's clients over rows, e.g. by PRV refinement) must add up to the
    number of clients in ``held`` holding that budget. A row stating no ``clients`` (every
    runtime's plan rows have stated it since plans were written) or one that is no
    non-negative integer is named, and its budget's sum is then not checked."""
    findings: list[Finding] = []
    stated: dict[tuple[Any, Any], list[int]] = {}
    counts: dict[tuple[Any, Any], int] = {}
    uncounted: set[tuple[Any, Any]] = set()
    for i, row in enumerate(plan):
        if not isinstance(row, dict):
            continue
        if not (_number(row.get("epsilon_budget")) and _number(row.get("delta"))):
            continue  # no budget to count: plan_epsilon names the row
        key = (row["epsilon_budget"], row["delta"])
        head = f"{where}.plan[{i}] (epsilon {key[0]!r}, delta {key[1]!r})"
        if "clients" not in row:
            uncounted.add(key)
            findings.append(
                Finding(
                    "error",
                    "plan_coverage",
                    f"{head} states no clients: how many clients hold"
                    " its budget was not stated, so the plan's coverage could not be counted",
                    None,
                    None,
                    method,
                )
            )
            continue
        n = row["clients"]
        if not _int(n) or n < 0:
            uncounted.add(key)
            findings.append(
                Finding(
                    "error",
                    "plan_coverage",
                    f"{head} states clients {n!r:.80}: it must be a non-negative integer",
                    None,
                    None,
                    method,
                )
            )
            continue
        stated.setdefault(key, []).append(i)
        counts[key] = counts.get(key, 0) + n
    for key, rows in stated.items():
        if key in uncounted:  # a sum missing a row's count would be a second, false error
            continue
        holders = sorted(cid for cid, b in held.items() if b == key)
        if counts[key] != len(holders):
            eps, delta = key
            row_text = ", ".join(f"[{i}]" for i in rows)
            findings.append(Finding(
                "error", "plan_coverage", f"{where}.plan{row_text} (epsilon {eps!r}, delta"
                f" {delta!r}) state{'s' if len(rows) == 1 else ''} {counts[key]} client(s),"
                f" but {len(holders)} hold that budget"
                + (f" ({', '.join(holders)})" if holders else "")
                + " (as their ledgers record it, else results.json's client rows state it)",
                None, None, method))
    return findings


def _anchor_rows(results: dict[str, Any] | None, method: str | None) -> dict[str, dict[str, Any]]:
    """The runtime's per-client privacy summaries in results.json, if it wrote them:
    client id -> the first row naming it.

    Layout written by the in-process runtime: ``privacy[<method>]["clients"]`` is a list of
    ``{"client", "ledger_entries", "epsilon_spent", ...}`` (optionally ``"ledger_head"``, the
    SHA-256 of the last line); for a ledger directory without method level,
    ``privacy["clients"]``.
    """
    if not results or not isinstance(results.get("privacy"), dict):
        return {}
    section = results["privacy"].get(method) if method is not None else results["privacy"]
    if not isinstance(section, dict) or not isinstance(section.get("clients"), list):
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for row in section["clients"]:
        if isinstance(row, dict) and isinstance(row.get("client"), str):
            rows.setdefault(row["client"], row)
    return rows


def _results_budget_findings(row: Mapping[str, Any], budget: Any, delta: Any, client_id: str,
                             method: str | None) -> list[Finding]:
    """``results_budget`` errors: results.json's client row states an ``epsilon_budget`` or
    ``delta`` that is not the budget the client's ledger records (``budget_epsilon``,
    ``delta``; the same float, as both are written from one budget). A key the row does not
    state, or a ledger recording no usable budget (reported by its own checks), is not
    compared."""
    findings: list[Finding] = []
    for key, ledger_key, recorded in (("epsilon_budget", "budget_epsilon", budget),
                                      ("delta", "delta", delta)):
        if key not in row or not _number(recorded):
            continue
        stated = row[key]
        if not _number(stated) or float(stated) != float(recorded):
            findings.append(Finding(
                "error", "results_budget", f"results.json's client row of {client_id} states"
                f" {key} {stated!r:.80}, its ledger records {ledger_key} {recorded!r}",
                client_id, None, method))
    return findings


def _check_sensitivity(entry: dict[str, Any], client_id: str, pos: int,
                       method: str | None) -> list[Finding]:
    p = entry["params"]
    mech = entry["mechanism"]
    # The mechanism registry knows which params each mechanism's sensitivity follows from.
    try:
        expected = MECHANISMS.expected_sensitivity(mech, p) if "sensitivity" in p else None
    except MechanismError as err:  # the plug-in's formula raised on the recorded params
        return [Finding("error", "sensitivity", str(err), client_id, pos, method)]
    if expected is None:
        return []
    got = p["sensitivity"]
    if not _number(got) or not math.isclose(float(got), expected, rel_tol=1e-9, abs_tol=0.0):
        return [Finding("error", "sensitivity",
                        f"{mech} records sensitivity {got!r}, its clip parameters imply"
                        f" {expected!r}", client_id, pos, method)]
    return []


#: The mechanism whose ledger params record the method that released it (``params.method``,
#: written by the clients of both runtimes and signed by them); other mechanisms' params,
#: a plug-in's included, may use the name for something else.
_METHOD_RECORDING = "dpsgd"


def _recorded_methods(entry: dict[str, Any]) -> list[Any]:
    """The methods ``entry`` records: a DP-SGD entry's ``params.method``, or each refused
    DP-SGD record's ``method`` in a refusal's ``params.refused``; none for other entries."""
    params = entry.get("params")
    if not isinstance(params, dict):
        return []
    if entry.get("mechanism") == _METHOD_RECORDING:
        return [params["method"]] if "method" in params else []
    if entry.get("mechanism") == REFUSAL and isinstance(params.get("refused"), list):
        return [r["method"] for r in params["refused"] if isinstance(r, dict)
                and r.get("mechanism") == _METHOD_RECORDING and "method" in r]
    return []


def _method_findings(entries: Sequence[dict[str, Any] | None], method: str | None,
                     client_id: str) -> list[Finding]:
    """An error for each entry recording a method other than the one whose folder
    (``ledgers/<method>/``) holds the ledger: a client signs the field, so a swap of two
    methods' ledger folders shows even where their releases are otherwise alike."""
    if method is None:  # ledgers/<client>.jsonl: no folder names a method
        return []
    out = []
    for i, e in enumerate(entries):
        if e is None:
            continue
        for recorded in dict.fromkeys(repr(m) for m in _recorded_methods(e)):
            if recorded != repr(method):
                what = "refusal" if e.get("mechanism") == REFUSAL else f"{e['mechanism']} entry"
                out.append(Finding(
                    "error", "method_folder",
                    f"the {what} records method {recorded}, but the ledger is in the folder of"
                    f" method {method!r} (ledgers/{method}/): ledgers of different methods were"
                    " swapped or misplaced", client_id, i, method))
    return out


#: The release kind whose first entry is DP-SGD's and whose other entries (the lambda, a
#: plug-in mechanism's) are released within it (``ReleaseSpec("model", ("dpsgd", ...))``).
_MODEL_RELEASE = "model"


def _nested_release_problem(mechanism: str, release: tuple[Any, Any],
                            previous: tuple[Any, Any] | None) -> str | None:
    """Why an entry of ``mechanism`` recorded as part of ``release`` (its round and
    ``params.release_kind``) is not linked to the DP-SGD entry of that release: an entry of the
    model release other than DP-SGD's is written in one batch after it, so the release entry
    before it (a repair entry may sit between) must be of the same round and release."""
    rnd, kind = release
    if kind != _MODEL_RELEASE or mechanism == _METHOD_RECORDING:
        return None
    if previous == release:
        return None
    after = ("no release entry" if previous is None else
             f"an entry of round {previous[0]!r} release {previous[1]!r}")
    return (f"the {mechanism!r} entry is part of the {kind!r} release of round {rnd!r}, which"
            f" starts with its dpsgd entry, but follows {after}: it is not linked to the"
            " release it was accounted in")


def _plug_in_accountant_findings(entries: Sequence[dict[str, Any] | None], accountant: Any,
                                 delta: Any, client_id: str, method: str | None,
                                 imports_flag: str) -> list[Finding]:
    """Findings on a ledger kept by a plug-in accountant (a name other than the built-ins'):
    where it is registered in this process (``imports=``), every release entry's
    ``epsilon_after`` must be what it computes again from the ledger's releases up to that
    entry, with the ``accountant_params`` the ledger records (an error otherwise); where it
    is not, an unchecked warning says its figures were not recomputed (the independent PLD
    check of every entry runs either way). Nothing for a built-in accountant."""
    if not isinstance(accountant, str) or not accountant or accountant in ACCOUNTANTS \
            or not _number(delta) or not 0 < delta < 1:
        return []

    def finding(severity: Severity, pos: int | None, message: str,
                unchecked: bool = False) -> Finding:
        return Finding(severity, "plug_in_accountant", message, client_id, pos, method,
                       unchecked=unchecked)

    if accountant not in ACCOUNTANT_REGISTRY:
        return [finding("warning", None, f"accountant {accountant!r} is not registered in this"
                        " process, so the epsilons it recorded were not recomputed with it (the"
                        " independent PLD check ran); import a module you trust that registers"
                        f" it with privacy.accounting.register_accountant ({imports_flag}: its"
                        " dotted name on PYTHONPATH, never a file of the run under review) and"
                        " verify again", unchecked=True)]
    releases = [(i, e) for i, e in enumerate(entries) if e is not None
                and e.get("mechanism") not in (REFUSAL, REPAIR, CLOSE)]
    recorded = {json.dumps(e["params"].get("accountant_params"), sort_keys=True)
                for _, e in releases if isinstance(e.get("params"), dict)}
    acc = Accountant.reproducing(json.loads(recorded.pop()), accountant) \
        if len(recorded) == 1 else None
    if acc is None:
        return [finding("error", None, f"the ledger's accountant_params ({len(recorded)}"
                        f" distinct) are not those of the accountant {accountant!r} registered"
                        f" in this process ({Accountant(accountant).parameters}): its epsilons"
                        " cannot be recomputed")]
    out: list[Finding] = []
    for i, e in releases:
        p = e.get("params")
        if not isinstance(p, dict) or _release_problems(p):
            break  # reported by the entry checks; what follows cannot be composed
        try:
            acc.record(p["noise_multiplier"], p["sample_rate"], p["steps"])
            again = acc.epsilon(float(delta))
        except AccountingError as exc:
            out.append(finding("error", i, f"accountant {accountant!r} cannot recompute the"
                               f" epsilon after this entry: {exc}"))
            break
        rec = e.get("epsilon_after")
        if not _number(rec) or abs(rec - again) > SPENT_TOL * max(1.0, again):
            out.append(finding("error", i, f"recorded epsilon_after {rec!r:.40} is not the"
                               f" epsilon {again!r} that accountant {accountant!r} computes"
                               " from the ledger's releases up to this entry"))
    return out


def _verify_client(path: Path, method: str | None, client_id: str,
                   key: Ed25519PublicKey | None, ctx: _RunContext, rel_tol: float,
                   pld_checkpoints: int) -> ClientVerification:
    lines, torn = _read_lines(path)
    entries, integrity = check_ledger_lines(lines, key, client_id, torn)
    findings = [replace(f, method=method) for f in integrity]
    if not lines:
        findings.append(Finding("error", "empty", "the ledger has no entries", client_id,
                                None, method))

    def err(pos: int | None, check: str, message: str) -> None:
        findings.append(Finding("error", check, message, client_id, pos, method))

    def warn(pos: int | None, check: str, message: str, unchecked: bool = False) -> None:
        findings.append(Finding("warning", check, message, client_id, pos, method,
                                unchecked=unchecked))

    good = [(i, e) for i, e in enumerate(entries) if e is not None
            and all(f in e for f in ENTRY_FIELDS)]
    constants: dict[str, Any] = {}
    for name in ("accountant", "delta", "budget_epsilon"):
        for i, e in good:
            if name not in constants:
                constants[name] = e[name]
            elif e[name] != constants[name]:
                err(i, f"{name}_changed", f"{name} is {e[name]!r}, earlier entries have"
                    f" {constants[name]!r}")
    accountant = constants.get("accountant")
    delta = constants.get("delta")
    budget = constants.get("budget_epsilon")
    if ctx.config is not None and ctx.config.privacy.enabled:
        configured = _configured_budget(ctx.config, client_id)
        if configured is None:
            err(None, "config", f"client {client_id!r} is not a client of the configured"
                f" {ctx.config.data.num_clients}-client federation")
        else:
            c_eps, c_delta = configured
            if _number(budget) and not math.isclose(budget, c_eps, rel_tol=1e-12):
                err(None, "config", f"ledger budget_epsilon {budget!r} differs from the"
                    f" configured {c_eps!r}")
            if _number(delta) and not math.isclose(delta, c_delta, rel_tol=1e-12):
                err(None, "config", f"ledger delta {delta!r} differs from the configured"
                    f" {c_delta!r}")
            configured_acc = ctx.config.privacy.accountant
            chosen = _chosen_accountant(ctx.results, method)
            if configured_acc == "auto":
                if accountant is not None and accountant not in ("rdp", "pld"):
                    err(None, "config", f"ledger accountant {accountant!r} is not one that"
                        " privacy.accountant = 'auto' chooses (rdp, pld)")
                elif accountant is not None and chosen is not None and accountant != chosen:
                    err(None, "config", f"ledger accountant {accountant!r} differs from the"
                        f" one results.json says 'auto' chose ({chosen!r})")
            elif accountant is not None and accountant != configured_acc:
                err(None, "config", f"ledger accountant {accountant!r} differs from the"
                    f" configured {configured_acc!r}")
    else:  # without config.toml, results.json still says which accountant the run used
        chosen = _chosen_accountant(ctx.results, method)
        if isinstance(accountant, str) and chosen is not None and accountant != chosen:
            err(None, "results_accountant", f"ledger accountant {accountant!r} differs from"
                f" the one results.json says the run used ({chosen!r})")

    prev_eps: float | None = None
    releases: list[tuple[float, float, int] | None] = []
    mechanisms: dict[str, dict[str, Any]] = {}
    refused = False
    previous_release: tuple[Any, Any] | None = None  # (round, release_kind) of the last release
    for i, e in enumerate(entries):
        if e is None or any(f not in e for f in ENTRY_FIELDS):
            releases.append(None)
            continue
        eps = e["epsilon_after"]
        mech = e["mechanism"]
        if not isinstance(mech, str):  # reported by the schema check; nothing to account
            releases.append(None)
            continue
        if _number(eps):
            if prev_eps is not None and eps < prev_eps:
                err(i, "epsilon_decreased", f"epsilon_after {eps!r} is below the previous"
                    f" {prev_eps!r}")
            if mech == REPAIR and eps != (prev_eps if prev_eps is not None else 0.0):
                err(i, "repair_spent", f"a repair entry spends nothing, but epsilon_after is"
                    f" {eps!r} after {prev_eps if prev_eps is not None else 0.0!r}")
            if mech == REFUSAL and eps != (prev_eps if prev_eps is not None else 0.0):
                err(i, "refusal_spent", f"a refusal spends nothing, but epsilon_after is"
                    f" {eps!r} after {prev_eps if prev_eps is not None else 0.0!r}")
            if _number(e["budget_epsilon"]) and eps > e["budget_epsilon"]:
                err(i, "budget_exceeded", f"recorded epsilon_after {eps!r} exceeds the budget"
                    f" {e['budget_epsilon']!r}")
            prev_eps = eps if prev_eps is None else max(prev_eps, eps)
        if mech in (REPAIR, CLOSE):  # spend nothing; a close is checked by _close_findings
            releases.append(None)
            continue
        if mech == REFUSAL:
            refused = True
            previous_release = None
            releases.append(None)
            continue
        if refused:
            err(i, "after_refusal", f"a {mech!r} release follows a refusal; a client releases"
                " nothing after its first refusal")
        p = e["params"] if isinstance(e["params"], dict) else {}
        release = (e["round"], p.get("release_kind"))
        problem = _nested_release_problem(mech, release, previous_release)
        if problem:
            err(i, "nested_release", problem)
        previous_release = release
        if _release_problems(p):
            releases.append(None)
            continue
        releases.append((float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["steps"])))
        findings.extend(_check_sensitivity(e, client_id, i, method))
        m = mechanisms.setdefault(mech, {"entries": 0, "steps": 0, "noise_multipliers": [],
                                         "sample_rates": [], "clip_norms": []})
        m["entries"] += 1
        m["steps"] += int(p["steps"])
        for field_name, key_name in (("noise_multipliers", "noise_multiplier"),
                                     ("sample_rates", "sample_rate")):
            if p[key_name] not in m[field_name]:
                m[field_name].append(p[key_name])
        clip = p.get("clip_norm", p.get("clip"))
        # only a number is a clip norm (the report sorts them; a list would not even hash)
        if _number(clip) and clip not in m["clip_norms"]:
            m["clip_norms"].append(clip)

    unknown = sorted(m for m in mechanisms if m not in MECHANISMS and any(
        e is not None and e.get("mechanism") == m and isinstance(e.get("params"), dict)
        and "sensitivity" in e["params"] for e in entries))
    for mech in unknown:  # a plug-in's mechanism: its formula lives in the plug-in module
        warn(None, "sensitivity", f"{mech!r} is not a registered mechanism in this process, so"
             " its recorded sensitivities were not recomputed; import a module you trust that"
             f" registers it in privacy.mechanisms.MECHANISMS ({ctx.options['imports']}: its"
             " dotted name on PYTHONPATH, never a file of the run under review; or a module in"
             " secure_fedora/contrib/, which every process imports) and verify again",
             unchecked=True)
    real_releases = [r for r in releases if r is not None]
    if real_releases and _number(delta) and 0 < delta < 1:
        try:
            check_pld_size(real_releases, PLD_VALUE_DISCRETIZATION)
        except AccountingSizeError as exc:
            if accountant == "rdp":
                warn(None, "pld_too_large", f"the PLD cross-check was not computed: {exc}; the"
                     " independent RDP check of every entry ran", unchecked=True)
            else:
                err(None, "pld_too_large", f"epsilon cannot be verified independently: {exc}")
    # a plug-in accountant (any other name) is held to dp_accounting's PLD, as PRV is: no
    # valid accountant is tighter than it; its own figures are recomputed just below
    checked_as = (accountant if accountant in ACCOUNTANTS else "pld") \
        if isinstance(accountant, str) and accountant else None
    findings.extend(_plug_in_accountant_findings(entries, accountant, delta, client_id, method,
                                                 ctx.options["imports"]))
    independent: list[float | None] = [None] * len(entries)
    if checked_as is not None and _number(delta) and 0 < delta < 1:
        independent = independent_epsilons(releases, float(delta), checked_as, pld_checkpoints)
    series: list[EntryCheck] = []
    over: list[tuple[float, int, float, float]] = []  # (ratio, entry, recorded, independent)
    compared = 0
    for i, e in enumerate(entries):
        ind = independent[i]
        if e is None or any(f not in e for f in ENTRY_FIELDS):
            series.append(EntryCheck(i, None, None, None, None, None))
            continue
        rec = e["epsilon_after"] if _number(e["epsilon_after"]) else None
        coarse = ind
        if ind is not None and rec is not None and accountant != "rdp":
            # under-reported and over-budget are judged against the tightest PLD; a value
            # between it and the first PLD is consistent with both (neither under nor over)
            budget_i = e["budget_epsilon"] if _number(e["budget_epsilon"]) else math.inf
            ind = finer_pld_epsilon(
                releases[: i + 1], float(delta), ind,
                lambda v, r=rec, b=budget_i: r >= v * (1.0 - rel_tol) and v <= b * (1.0 + rel_tol))
        if ind is not None and coarse is not None and rec is not None:
            compared += 1
            if rec < ind * (1.0 - rel_tol):
                shown, by = format_ordered(rec, ind)
                err(i, "epsilon_under_reported",
                    f"recorded epsilon_after {shown} is below the independent"
                    f" dp_accounting value {by} by more than {tolerance_text(rel_tol)}")
            elif rec > coarse * (1.0 + rel_tol):
                over.append((rec / coarse if coarse > 0 else math.inf, i, rec, coarse))
            if _number(e["budget_epsilon"]) and ind > e["budget_epsilon"] * (1.0 + rel_tol):
                # rounded up at the budget's decimals: it reads above the budget (shown exactly)
                err(i, "budget_exceeded", f"independent epsilon"
                    f" {format_spent(ind, e['budget_epsilon'])} exceeds the budget"
                    f" {e['budget_epsilon']!r}")
        params = e["params"] if isinstance(e["params"], dict) else {}
        series.append(EntryCheck(i, e["round"] if _int(e["round"]) else None, e["mechanism"],
                                 rec, ind, e["budget_epsilon"]
                                 if _number(e["budget_epsilon"]) else None, dict(params)))

    if over:
        # one finding per ledger: a conservative accountant (a plug-in's padding) is above
        # the independent value at every entry, and a reviewer needs the count and the worst
        _, i, rec, coarse = max(over)
        shown, by = format_ordered(rec, coarse)
        gap = f"+{rec / coarse - 1.0:.1%}" if coarse > 0 else "above 0"
        warn(i, "epsilon_over_reported",
             f"{len(over)} of the {compared} entries compared record an epsilon_after above the"
             f" independent value by more than {tolerance_text(rel_tol)} (conservative); the"
             f" largest gap is at entry {i}: recorded {shown}, independent {by} ({gap})")
    final = max((c.recorded_epsilon for c in series if c.recorded_epsilon is not None),
                default=0.0)
    anchor = ctx.summary_row(method, client_id)
    findings.extend(_plan_findings(entries, _results_section(ctx.results, method), anchor,
                                   client_id, method))
    last = len(lines) - 1 if lines else None
    if anchor is None:
        warn(None, "results_ledger", "results.json holds no ledger length for this client: entries"
             " removed from the end of the ledger cannot be detected", unchecked=True)
    else:
        findings.extend(_results_budget_findings(anchor, budget, delta, client_id, method))
        n_anchor = anchor.get("ledger_entries")
        if n_anchor != len(lines):
            err(last, "results_ledger", f"the ledger has {len(lines)} entries, results.json recorded"
                f" {n_anchor!r}: entries were removed from (or added to) the end")
        head = anchor.get("ledger_head")
        if head is not None and lines and head != _sha256(lines[-1]):
            err(last, "results_ledger", f"the last line hashes to {_sha256(lines[-1])[:16]}...,"
                f" results.json recorded the head {str(head)[:16]}...")
        spent = anchor.get("epsilon_spent")
        if spent is not None and (not _number(spent)
                                  or abs(spent - final) > SPENT_TOL * max(1, final)):
            err(None, "results_epsilon", f"results.json reports epsilon_spent {spent!r}, the"
                f" ledger's last epsilon_after is {final!r}")

    ind_final = next((c.independent_epsilon for c in reversed(series)
                      if c.independent_epsilon is not None), None)
    pld_final = rdp_final = cross = diff = None
    cross_method = CROSS_METHOD.get(accountant) if isinstance(accountant, str) else None
    if _number(delta) and 0 < delta < 1:
        pld_final, rdp_final = _final_epsilons(releases, float(delta))
    recorded_final = next((c.recorded_epsilon for c in reversed(series)
                           if c.recorded_epsilon is not None and c.mechanism != REFUSAL), None)
    if cross_method is not None:
        cross = pld_final if cross_method == "pld" else rdp_final
        if cross is not None and recorded_final is not None and cross > 0:
            diff = recorded_final / cross - 1.0
    if pld_final is not None and recorded_final is not None \
            and recorded_final < pld_final * (1.0 - rel_tol):
        pld_final = finer_pld_epsilon(releases, float(delta), pld_final,
                                      lambda v: recorded_final >= v * (1.0 - rel_tol))
    if pld_final is not None and recorded_final is not None \
            and recorded_final < pld_final * (1.0 - rel_tol) \
            and not any(f.check == "epsilon_under_reported" for f in findings):
        shown, by = format_ordered(recorded_final, pld_final)
        err(last, "epsilon_under_reported",
            f"recorded final epsilon {shown} is below the independent pessimistic"
            f" PLD value {by} (dp_accounting) by more than {tolerance_text(rel_tol)}")
    findings.extend(_method_findings(entries, method, client_id))
    ctx.findings.extend(findings)
    return ClientVerification(
        client_id=client_id, method=method, ledger=str(path), entries=len(lines),
        accountant=accountant, delta=delta if _number(delta) else None,
        budget_epsilon=budget if _number(budget) else None, final_epsilon=float(final),
        independent_final_epsilon=ind_final, refused=refused, mechanisms=mechanisms,
        series=series, ok=not any(f.severity == "error" for f in findings),
        pld_final_epsilon=pld_final, rdp_final_epsilon=rdp_final, cross_method=cross_method,
        cross_final_epsilon=cross, cross_difference=diff,
        warned=any(f.severity == "warning" for f in findings),
    )


#: Each party's public key files beside the run's allowlist: suffix, key type, and how the
#: allowlist's entry gives the raw key.
_PUBLIC_KEY_FILES: tuple[tuple[str, type, str], ...] = (
    ("ed25519.pub", Ed25519PublicKey, "verify_key_hex"),
    ("x25519.pub", X25519PublicKey, "agreement_key_hex"),
)


def _public_key_file_findings(keys_dir: Path, keys: Mapping[str, PublicIdentity]
                              ) -> list[Finding]:
    """``keys/<party>.ed25519.pub`` and ``.x25519.pub`` against the allowlist in use (nothing
    else in a run signs or records an X25519 key): an unreadable file or one holding another
    key is an error; a missing one, where the run published its keys (``keys/allowlist.json``
    is there), and a key file of a party the allowlist does not name are warnings (verify
    itself uses only the allowlist's Ed25519 keys)."""
    out: list[Finding] = []
    published = (keys_dir / "allowlist.json").is_file()
    for party, ident in keys.items():
        for suffix, kind, raw_of in _PUBLIC_KEY_FILES:
            label = kind.__name__.removesuffix("PublicKey")
            pub = keys_dir / f"{party}.{suffix}"
            if not pub.is_file():
                if published:
                    out.append(Finding("warning", "key_file", f"{pub} {_absent(pub)}: a run"
                                       " publishes every party's public keys beside"
                                       " keys/allowlist.json; the allowlisted key stands in"
                                       " for it, but the run directory is not as written",
                                       party))
                continue
            try:
                loaded = serialization.load_pem_public_key(pub.read_bytes())
            except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
                out.append(Finding("error", "key", f"{pub} is not a valid PEM public key:"
                                   f" {exc}", party))
                continue
            raw = loaded.public_bytes(serialization.Encoding.Raw,
                                      serialization.PublicFormat.Raw) \
                if isinstance(loaded, kind) else b""
            if raw.hex() != getattr(ident, raw_of)():
                out.append(Finding("error", "key", f"{pub} differs from the allowlisted"
                                   f" {label} key (replaced or damaged)", party))
    if keys_dir.is_dir():
        for pub in sorted(keys_dir.glob("*.pub")):
            party, _, suffix = pub.name.partition(".")
            if party not in keys and suffix in {s for s, _, _ in _PUBLIC_KEY_FILES}:
                out.append(Finding("warning", "key_file", f"{pub} belongs to {party!r}, whom"
                                   " the allowlist does not name: it is not checked", party,
                                   unchecked=True))
    return out


#: Beside a DP method's ledgers (``ledgers/<method>/model.json``): the fingerprint and
#: architecture listing of the model its releases come from (the runtime's format).
MODEL_RECORD = "model.json"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _model_record_problem(path: Path) -> tuple[str | None, str | None]:
    """(fingerprint, None) when ``path`` is a model record whose ``model_fingerprint`` is the
    SHA-256 of its ``model_architecture`` lines joined by newlines (how the runtime computes
    it), else (None, what is wrong)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"is not readable JSON ({exc})"
    if not isinstance(doc, dict) or not isinstance(doc.get("model_fingerprint"), str) \
            or not isinstance(doc.get("model_architecture"), list) \
            or not all(isinstance(x, str) for x in doc["model_architecture"]):
        return None, ("is not a model record (an object with a model_fingerprint string and a"
                      " model_architecture list of strings)")
    listing = "\n".join(doc["model_architecture"]).encode()
    if hashlib.sha256(listing).hexdigest() != doc["model_fingerprint"]:
        return None, ("is damaged: its model_architecture listing does not hash to its"
                      " model_fingerprint")
    return doc["model_fingerprint"], None


def _model_record_findings(run: Path, found: Sequence[tuple[str | None, Path]],
                           results: dict[str, Any] | None) -> list[Finding]:
    """Each method folder's ``model.json`` (:data:`MODEL_RECORD`): it must be intact (its
    fingerprint is the hash of its listing) and record the fingerprint that results.json --
    whose digest the signed anchor holds -- records in ``privacy[<method>].model_fingerprint``;
    missing where results.json records one is an error (a warning on Flower, where each node
    keeps its own and the auditor collects one). Where nothing signed records the fingerprint
    (no results.json, a Flower run written before the server recorded it, a run written before
    the key), a warning says the file is unchecked (or, missing, that which model the releases
    came from is)."""
    out: list[Finding] = []
    privacy = results.get("privacy") if results is not None else None
    runtime = results.get("runtime") if results is not None else None
    for method in sorted({m for m, _ in found if m is not None}):
        path = run / "ledgers" / method / MODEL_RECORD
        summary = privacy.get(method) if isinstance(privacy, dict) else None
        signed = summary.get("model_fingerprint") if isinstance(summary, dict) else None

        def add(severity: Severity, message: str, method: str = method) -> None:
            # each of its warnings says what was left unchecked
            out.append(Finding(severity, "model_record", message, None, None, method,
                               unchecked=severity == "warning"))

        if signed is not None and not (isinstance(signed, str) and _SHA256_HEX.fullmatch(signed)):
            add("error", f"results.json privacy[{method!r}].model_fingerprint is not a SHA-256"
                         " hex digest")
            signed = None
        why = ("results.json is missing" if results is None else
               "a Flower run written before the server recorded it" if runtime == "flower" else
               f"results.json records no privacy[{method!r}].model_fingerprint (a run written"
               " before it did)")
        if not path.is_file():
            absent = _absent(path)
            if signed is not None and runtime == "flower":  # each node keeps its own
                shown = absent + (" (not collected)" if absent == "is missing" else "")
                add("warning", f"{path} {shown}: results.json (anchored)"
                               f" records the fingerprint {signed[:16]}... of the model the"
                               " ledgers' releases come from, and each node keeps its record"
                               f" in runs/<run_id>/{method}/model.json; copy one here to have"
                               " it checked")
            elif signed is not None:
                add("error", f"{path} {absent}; results.json (anchored) records the"
                             f" fingerprint {signed[:16]}... of the model the ledgers'"
                             " releases come from")
            elif runtime != "flower":  # on Flower each node keeps its own, not collected
                add("warning", f"{path} {absent} and {why}: which model the releases came"
                               " from is unchecked")
            continue
        fingerprint, problem = _model_record_problem(path)
        if problem is not None:
            add("error", f"{path} {problem}")
        elif signed is None:
            add("warning", f"{path} is checked against itself only (intact), not against"
                           f" signed data: {why}, so another run's model.json put in its"
                           " place is not detected")
        elif fingerprint != signed:
            add("error", f"{path} records the model {str(fingerprint)[:16]}..., results.json"
                         f" (anchored) records {signed[:16]}...: it was replaced (another"
                         " run's?) or the ledgers' releases came from another model")
    return out


# --------------------------------------------------------------------------- anchoring


#: File names that hold private key material as the toolkit writes it
#: (:func:`privacy.identity.init_keys`, key stores, ``keys party`` identity directories).
PRIVATE_KEY_SUFFIXES = (".ed25519.key", ".x25519.key")
#: A PEM private key block's first line (PKCS#8, encrypted PKCS#8, RSA/EC/DSA, OpenSSH).
_PEM_PRIVATE = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
#: Bytes kept across chunk boundaries so that a header split between two reads is found.
_PEM_OVERLAP = 64
#: Files up to this size are also tried as a DER private key (a 48-byte PKCS#8 Ed25519 key
#: has no PEM header).
_DER_MAX = 16384
_SCAN_CHUNK = 1 << 20
#: How a serialized TenSEAL context begins: protobuf field 1 (the encryption parameters),
#: its varint length, then SEAL's serialization header (magic 0xA15E, header size 16).
_TENSEAL_CONTEXT = re.compile(rb"\x0a[\x80-\xff]{0,4}[\x00-\x7f]\x5e\xa1\x10", re.DOTALL)
#: The protobuf field of a serialized TenSEAL context that holds its secret key (field 1: the
#: encryption parameters, 2: the public context with its public, relinearization and Galois
#: keys, 3: the secret key; a public context has no field 3).
_CONTEXT_SECRET_FIELD = 3
#: A TenSEAL context has three top-level fields; a walk that meets more is not one.
_CONTEXT_FIELDS_MAX = 8


def _read_varint(fh: BinaryIO) -> int | None:
    """The protobuf varint at ``fh``'s position (None at end of file or past 64 bits)."""
    value = 0
    for shift in range(0, 64, 7):
        byte = fh.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    return None


def _holds_secret_context(fh: BinaryIO, size: int) -> bool:
    """True when the file ``fh`` (``size`` bytes, beginning as :data:`_TENSEAL_CONTEXT`) is a
    serialized TenSEAL context holding a secret key: its top-level protobuf fields, walked in
    Python without loading them, cover the file exactly and include a non-empty
    :data:`_CONTEXT_SECRET_FIELD`. Nothing of an untrusted file reaches TenSEAL's or SEAL's
    deserializers, and a context of any size is checked."""
    fh.seek(0)
    secret = False
    for _ in range(_CONTEXT_FIELDS_MAX):
        if fh.tell() == size:
            return secret
        key = _read_varint(fh)
        if key is None or key & 7 != 2:  # every field of a context is length-delimited
            return False
        length = _read_varint(fh)
        if length is None or fh.tell() + length > size:
            return False
        secret = secret or (key >> 3 == _CONTEXT_SECRET_FIELD and length > 0)
        fh.seek(length, os.SEEK_CUR)
    return fh.tell() == size and secret


def _holds_private_key(path: Path) -> bool | None:
    """True when the regular file ``path`` (links followed) holds a PEM private key block, is
    a DER private key or a TenSEAL context holding a secret key (:data:`_TENSEAL_CONTEXT`,
    :func:`_holds_secret_context`), False when it does not, None when it cannot be read or
    checked. Only what kind of content it is leaves here, never the content."""
    try:
        fd = open_regular(path)  # a FIFO swapped in must not block
    except (NotRegularFileError, IsADirectoryError):
        return False
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            head = b""
            first = b""
            while chunk := fh.read(_SCAN_CHUNK):
                if not first:
                    first = chunk[:_DER_MAX + 1]
                if _PEM_PRIVATE.search(head + chunk):
                    return True
                head = chunk[-_PEM_OVERLAP:]
            if _TENSEAL_CONTEXT.match(first):
                return _holds_secret_context(fh, fh.tell())
        except OSError:
            return None
    if 0 < len(first) <= _DER_MAX:
        try:
            serialization.load_der_private_key(first, password=None)
        except TypeError:  # "private key is encrypted": a private key all the same
            return True
        except (ValueError, UnsupportedAlgorithm):
            return False
        return True
    return False


def private_key_files(run_dir: Path) -> tuple[list[str], list[str]]:
    """Files under ``run_dir`` that hold private key material, as sorted relative paths, and
    the files that could not be read to find out. A file is one by its name
    (:data:`PRIVATE_KEY_SUFFIXES`: whatever it holds now) or by its content (a PEM private key
    block anywhere in it, a DER private key, or a serialized TenSEAL context holding a secret
    key, whose protobuf fields are walked, never loaded), so a renamed key is found too. A raw key (32 bytes of an Ed25519 seed or X25519 scalar) is found by its name
    only: its bytes look like any random 32 bytes. Links to regular files are read (a copy
    that follows links carries what they point to); linked directories, FIFOs and devices are
    not entered or read."""
    found: list[str] = []
    unreadable: list[str] = []
    for folder, _dirs, files in os.walk(run_dir, followlinks=False):
        for name in files:
            path = Path(folder, name)
            rel = path.relative_to(run_dir).as_posix()
            if name.endswith(PRIVATE_KEY_SUFFIXES):
                found.append(rel)
                continue
            held = _holds_private_key(path)
            if held:
                found.append(rel)
            elif held is None and path.is_file():  # a dangling link holds nothing
                unreadable.append(rel)
    return sorted(found), sorted(unreadable)


def _shown(paths: Sequence[str], limit: int = 10) -> str:
    """``paths`` joined, the first ``limit`` of them, then how many more and in which folders."""
    if len(paths) <= limit:
        return ", ".join(paths)
    rest = sorted({str(Path(p).parent) + "/" for p in paths[limit:]})
    return (", ".join(paths[:limit]) + f" (+{len(paths) - limit} more in"
            f" {', '.join(rest[:limit])}{', ...' if len(rest) > limit else ''})")


def _private_key_findings(run_dir: Path, dp_claimed: bool = True) -> list[Finding]:
    """Private key material anywhere under the audited directory (:func:`private_key_files`):
    an error, with or without an allowlist. Whoever receives the run for audit receives the
    keys, and its signatures (ledgers, anchor, envelopes) prove nothing to someone who holds a
    signing key: they can re-sign edited records. One exception, a warning that ``--strict``
    makes an error: a run without a DP claim (``dp_claimed`` False) whose only key files are
    its own envelope keys in ``keys/``, where the toolkit keeps them for a resume (such a run
    claims nothing the keys could forge). Files that could not be read to look are an
    unchecked warning."""
    found, unreadable = private_key_files(run_dir)
    out = []
    if found:
        own_only = not dp_claimed and all(
            re.fullmatch(r"keys/[^/]+\.(?:ed25519|x25519)\.key", p) for p in found)
        text = (f"{len(found)} {'file holds' if len(found) == 1 else 'files hold'} private key"
                f" material inside the audited directory ({_shown(found)}): whoever receives"
                " the run receives the keys, and its signatures (ledgers, anchor, envelopes)"
                " prove nothing to someone who holds the signing key, who can re-sign edited"
                " records")
        if own_only:
            out.append(Finding(
                "warning", "private_keys",
                text + "; a run without privacy keeps its envelope keys in keys/ (for a"
                " resume): delete keys/*.key before sharing it, the .pub files and"
                " allowlist.json stay", unchecked=True))
        else:
            out.append(Finding(
                "error", "private_keys",
                text + "; remove the keys before sharing a run (a DP run keeps them in a key"
                " store outside it: `secure-fedora keys init`, `[security] keystore`)"))
    if unreadable:
        out.append(Finding(
            "warning", "private_keys",
            f"{len(unreadable)} {'file' if len(unreadable) == 1 else 'files'} inside the audited"
            f" directory could not be read to look for private keys ({_shown(unreadable)})",
            unchecked=True))
    return out


def refuse_private_keys(run_dir: Path, dp_claimed: bool, error: type[Exception],
                        context: str,
                        given: tuple[Path, Mapping[str, PublicIdentity]] | None = None,
                        ) -> list[str]:
    """One scan of ``run_dir`` for private key material, judged as :func:`verify_run` judges
    it (:func:`_private_key_findings`): raises ``error`` with ``context: <first error>`` (the
    wording of ``audit replay``'s refusal) when a key lies inside, so that an audit that
    reads the run's files refuses a run whose signatures its holder could re-sign. With
    ``given`` (an independently registered allowlist's path and keys,
    :func:`load_given_allowlist`), the run's published ``keys/allowlist.json`` must also
    agree with it, as :func:`given_allowlist_findings` requires (a caller that made this
    check passes ``run_checked=True`` to :func:`verified_ledger_entries`: one scan per
    audit). Returns the texts of the unchecked warnings (a run without a DP claim,
    ``dp_claimed`` False, whose only key files are its own envelope keys in ``keys/``; files
    that could not be read; a missing published allowlist), for the caller to show."""
    findings = _private_key_findings(run_dir, dp_claimed)
    if given is not None:
        findings += _published_allowlist_findings(run_dir / "keys", *given)
    _raise_first(findings, error, context)
    return [f.message for f in findings]


def _close_findings(path: Path, method: str | None, client_id: str) -> list[Finding]:
    """The ledger of a finished run ends with exactly one close entry that spends nothing and
    states its own index and the final epsilon; nothing follows it. A ledger without a close
    entry is an error: its run did not finish, or entries were cut from its end (a cut that
    a hash chain alone cannot show)."""
    lines, _ = _read_lines(path)
    out: list[Finding] = []

    def err(pos: int | None, message: str, check: str = "close") -> None:
        out.append(Finding("error", check, message, client_id, pos, method))

    entries: list[dict[str, Any] | None] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        entries.append(entry if isinstance(entry, dict) else None)
    closes = [i for i, e in enumerate(entries) if e is not None and e.get("mechanism") == CLOSE]
    if not closes:
        if lines:
            err(len(lines) - 1, "the ledger has no close entry: its run did not finish, or"
                " entries were removed from its end", "not_closed")
        return out
    for i in closes:
        if i != len(lines) - 1:
            err(i, f"a close entry at {i} is followed by {len(lines) - 1 - i} more entries")
        e = entries[i]
        assert e is not None
        before = [x.get("epsilon_after") for x in entries[:i] if x is not None]
        prior = max((v for v in before if _number(v)), default=0.0)
        params = e.get("params")
        if not isinstance(params, dict) or set(params) != {"final_index", "epsilon_spent"}:
            err(i, "close params must be exactly final_index and epsilon_spent")
            continue
        if params["final_index"] != i:
            err(i, f"close states final_index {params['final_index']!r} at line {i}")
        if params["epsilon_spent"] != prior or e.get("epsilon_after") != prior:
            err(i, f"close states epsilon_spent {params['epsilon_spent']!r} (epsilon_after"
                f" {e.get('epsilon_after')!r}); the ledger's final epsilon before it is"
                f" {prior!r}")
    return out


def _load_anchor(path: Path) -> tuple[dict[str, Any] | None, list[Finding]]:
    """Read and signature-check an anchor file (format in :mod:`secure_fedora.secure.anchor`,
    re-implemented here): canonical JSON object, expected fields, Ed25519 signature over the
    domain and the canonical JSON of the other fields under the embedded signer key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, [Finding("error", "anchor", f"cannot read anchor {path}: {exc}")]
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        return None, [Finding("error", "anchor", f"anchor {path} is not JSON: {exc}")]
    fields = {"format", "version", "run_name", "config_hash", "created", "runtime", "methods",
              "files", "ledgers", "signer", "signature"}
    if not isinstance(doc, dict) or set(doc) != fields or doc.get("format") != \
            "secure-fedora-anchor" or not _int(doc.get("version")) or doc.get("version") != 1:
        return None, [Finding("error", "anchor", f"anchor {path} is not a version-1"
                              f" secure-fedora anchor with fields {sorted(fields)}")]
    problems = []
    signer = doc["signer"]
    ledgers = doc["ledgers"]
    if not isinstance(signer, dict) or not isinstance(signer.get("ed25519"), str) \
            or not isinstance(signer.get("party_id"), str):
        problems.append("signer must name party_id and its ed25519 key")
    if not isinstance(doc["runtime"], str) or doc["runtime"] not in ANCHOR_SIGNERS:
        # a list or object here is unhashable: checked as a string first, not a TypeError
        problems.append(f"runtime must be one of {sorted(ANCHOR_SIGNERS)}, got"
                        f" {type(doc['runtime']).__name__ if not isinstance(doc['runtime'], str) else repr(doc['runtime'])}")
    if not isinstance(doc["files"], dict) or not isinstance(doc["methods"], list) \
            or not all(isinstance(m, str) for m in doc["methods"]) \
            or not all(isinstance(v, str) for v in doc["files"].values()) \
            or not isinstance(ledgers, dict) or not all(
                isinstance(r, dict) and set(r) == set(ANCHOR_LEDGER_FIELDS)
                and _int(r.get("final_index")) and r["final_index"] >= 0
                and _int(r.get("entries")) and isinstance(r.get("head"), str)
                and _number(r.get("epsilon_spent")) and r["epsilon_spent"] >= 0
                for r in ledgers.values()):
        problems.append("files, methods or ledgers are malformed (every ledger row holds"
                        f" exactly {', '.join(ANCHOR_LEDGER_FIELDS)}; epsilon_spent a finite"
                        " number >= 0)")
    if problems:
        return None, [Finding("error", "anchor", f"anchor {path}: {'; '.join(problems)}")]
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer["ed25519"]))
        body = {k: v for k, v in doc.items() if k != "signature"}
        key.verify(bytes.fromhex(str(doc["signature"])),
                   ANCHOR_DOMAIN + _canonical(body).encode("utf-8"))
    except (ValueError, InvalidSignature):
        return None, [Finding("error", "anchor_signature", f"anchor {path}: the signature does"
                              " not verify under its signer key (the anchor was edited)")]
    return doc, []


def _anchor_findings(run: Path, doc: dict[str, Any], label: str,
                     found: Sequence[tuple[str | None, Path]],
                     keys: dict[str, PublicIdentity], allowlist_given: bool) -> list[Finding]:
    """Compare the run directory with a verified anchor: every anchored ledger exists and
    its line ``final_index`` hashes to ``head`` and is its last line (a shorter ledger, a
    different head or a longer one is an error), its row's ``entries`` is ``final_index + 1``
    and its ``epsilon_spent`` the ledger's final epsilon (within :data:`SPENT_TOL`, relative
    to max(1, epsilon)); no ledger exists that the anchor does not
    name; config.toml and results.json exist with the anchored digests; the signer is the
    runtime's signer party (:data:`ANCHOR_SIGNERS`) with its allowlisted key."""
    out: list[Finding] = []
    signer = doc["signer"]
    required = ANCHOR_SIGNERS[doc["runtime"]]
    if signer["party_id"] != required:
        # a client's or another party's key, even an allowlisted one, cannot vouch for a run
        out.append(Finding("error", "anchor_signature", f"{label} is signed by"
                           f" {signer['party_id']!r}; the anchor of {_article(doc['runtime'])} {doc['runtime']} run is"
                           f" signed by the {required!r} key"))
        return out
    registered = keys.get(signer["party_id"])
    if registered is not None and registered.verify_key_hex() != signer["ed25519"]:
        out.append(Finding("error", "anchor_signature", f"{label} is signed by a key that is"
                           f" not the allowlisted key of {signer['party_id']!r}"))
    elif registered is None:
        out.append(Finding("error" if allowlist_given else "warning", "anchor_signature",
                           f"{label} signer {signer['party_id']!r} is not in the allowlist: its"
                           " signature shows integrity, not who wrote it", unchecked=True))
    if doc["runtime"] == "in-process":
        for name in ANCHORED_FILES:
            if name not in doc["files"]:
                out.append(Finding("error", "anchor_file", f"{label} records no digest of"
                                   f" {name}"))
    for name, expected in sorted(doc["files"].items()):
        if name not in ANCHORED_FILES:
            out.append(Finding("error", "anchor_file", f"{label} names an unknown file {name!r}"))
            continue
        path = run / name
        if not path.is_file():
            out.append(Finding("error", "anchor_file", f"{name} {_absent(path)}; {label} records"
                               " its digest"))
            continue
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            out.append(Finding("error", "anchor_file", f"{name} hashes to {actual[:16]}...,"
                               f" {label} records {str(expected)[:16]}...: it was changed"))
    present = {(f"{m}/{p.stem}" if m is not None else p.stem): (m, p) for m, p in found}
    for name, row in sorted(doc["ledgers"].items()):
        method, _, cid = name.rpartition("/")
        if name not in present:
            out.append(Finding("error", "anchor_missing_ledger", f"ledger {name}.jsonl is"
                               f" missing; {label} names it", cid, None, method or None))
            continue
        lines, _ = _read_lines(present[name][1])
        final = row["final_index"]
        if row["entries"] != final + 1:
            out.append(Finding("error", "anchor_entries", f"{label} records {row['entries']}"
                               f" entries but final index {final} for ledger {name}.jsonl"
                               f" (entries is final_index + 1): the anchor is inconsistent;"
                               f" the ledger has {len(lines)} entries", cid, None,
                               method or None))
        spent = _final_epsilon(lines)
        if spent is not None and abs(row["epsilon_spent"] - spent) > SPENT_TOL * max(1, spent):
            out.append(Finding("error", "anchor_epsilon", f"{label} records epsilon_spent"
                               f" {row['epsilon_spent']!r} for ledger {name}.jsonl, whose final"
                               f" epsilon_after is {spent!r} (tolerance {SPENT_TOL:g} x"
                               " max(1, epsilon))", cid, None, method or None))
        if len(lines) <= final:
            out.append(Finding("error", "anchor_behind", f"the ledger has {len(lines)} entries,"
                               f" {label} records {final + 1}: entries were removed from its"
                               " end", cid, len(lines) - 1 if lines else None, method or None))
        elif _sha256(lines[final]) != row["head"]:
            out.append(Finding("error", "anchor_head", f"line {final} hashes to"
                               f" {_sha256(lines[final])[:16]}..., {label} records the head"
                               f" {row['head'][:16]}...", cid, final, method or None))
        elif len(lines) != final + 1:
            out.append(Finding("error", "anchor_ahead", f"the ledger has {len(lines)} entries,"
                               f" {label} records {final + 1}: entries were added after the"
                               " run finished", cid, final + 1, method or None))
    for name, (method, _) in sorted(present.items(), key=lambda kv: kv[0]):
        if name not in doc["ledgers"]:
            out.append(Finding("error", "anchor_unknown_ledger", f"ledger {name}.jsonl is not"
                               f" named in {label}", name.rpartition("/")[2], None, method))
    anchored_methods = {n.rpartition("/")[0] for n in doc["ledgers"]}
    for method in doc["methods"]:
        if method not in anchored_methods:
            out.append(Finding("error", "anchor_missing_ledger", f"{label} lists method"
                               f" {method!r} but names none of its ledgers", None, None, method))
    return out


def _final_epsilon(lines: Sequence[str]) -> float | None:
    """The largest ``epsilon_after`` of a ledger's lines (what its close entry states, the
    final epsilon); 0.0 for a ledger of no entry, None when no line records a number
    (nothing to compare: the ledger's own checks report its lines)."""
    values = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict) and _number(entry.get("epsilon_after")):
            values.append(float(entry["epsilon_after"]))
    if not lines:
        return 0.0
    return max(values) if values else None


def _anchor_identity_findings(doc: Mapping[str, Any], label: str,
                              results: Mapping[str, Any] | None,
                              cfg: ExperimentConfig | None) -> list[Finding]:
    """The anchor's run identity against the run's files: ``run_name`` is results.json's
    ``name`` and config.toml's ``name``, ``config_hash`` results.json's ``config_hash`` (which
    config.toml must hash to: :func:`_load_config`), ``runtime`` results.json's ``runtime``,
    and ``methods`` config.toml's ``methods`` (in order; without config.toml, a Flower result
    directory, each anchored method must be one results.json reports). A field the file does
    not hold is not compared (its own checks report that file)."""
    out: list[Finding] = []

    def differ(field: str, source: str, value: Any) -> None:
        out.append(Finding("error", "anchor_identity", f"{label} records {field}"
                           f" {doc[field]!r:.120}, {source} {value!r:.120}: the anchor is not"
                           " this run's (or it was re-signed over other values); restore the"
                           " run's anchor.json or audit the run it belongs to"))

    if results is not None:
        for field, key in (("run_name", "name"), ("config_hash", "config_hash"),
                           ("runtime", "runtime")):
            if key in results and results[key] != doc[field]:
                differ(field, f"results.json records {key}", results[key])
    if cfg is not None:
        if cfg.name != doc["run_name"]:
            differ("run_name", "config.toml gives name", cfg.name)
        if list(cfg.methods) != doc["methods"]:
            differ("methods", "config.toml gives methods", list(cfg.methods))
    elif results is not None and isinstance(results.get("methods"), dict):
        unreported = [m for m in doc["methods"] if m not in results["methods"]]
        if unreported:
            differ("methods", "results.json reports methods", sorted(results["methods"]))
    return out


def _unanchored_completeness(run: Path, cfg: ExperimentConfig | None,
                             options: Mapping[str, str]) -> Finding:
    """The warning of a run verified without any anchor (no results.json either, else that is
    an error): which ledgers it should hold is bound by nothing signed, so a ledger deleted
    from it, or every ledger of a method, is detected only as far as an unsigned config.toml
    names them, and without one (a Flower result folder) not at all."""
    if cfg is None:
        expected = (f"nothing in {run} names the run's methods and clients (no anchor.json,"
                    " results.json or config.toml), so a deleted ledger, or every ledger of a"
                    " method deleted, is not detected")
    else:
        expected = ("the ledgers expected are those config.toml names, and nothing signed"
                    " binds config.toml, so it may have been edited to match deleted ledgers")
    return Finding("warning", "completeness", f"the folder's completeness is unanchored:"
                   f" {expected}; pass the run's anchor.json kept apart ({options['anchor']})"
                   " to prove that no ledger is missing", unchecked=True)


def _anchor_check(run: Path, anchor: Path | None, found: Sequence[tuple[str | None, Path]],
                  keys: dict[str, PublicIdentity], allowlist_given: bool, *,
                  results: Mapping[str, Any] | None, cfg: ExperimentConfig | None,
                  options: Mapping[str, str] = API_AUDIT_OPTIONS,
                  anchor_doc: dict[str, Any] | None = None) -> list[Finding]:
    """Check the given anchor (``--anchor``), else the run's own ``anchor.json`` if present
    (:func:`_anchor_findings`, and its identity against ``results`` and ``cfg``, the run's
    parsed results.json and config.toml: :func:`_anchor_identity_findings`).
    With both, the run's copy must equal the given one (a missing copy is a warning). A run
    with results.json but no anchor at all is an error: both runtimes write the anchor right
    after results.json, and without it results.json and the ledgers' tails are unprotected.
    ``anchor_doc``: the given anchor's document as :func:`load_given_anchor` loaded it (not
    read again)."""
    own = run / ANCHOR_FILENAME
    out: list[Finding] = []
    if anchor is None:
        if not own.is_file() and (run / "results.json").is_file():
            return [Finding("error", "anchor", f"{own} {_absent(own)} although results.json is"
                            " there: a finished DP run writes its anchor right after results.json,"
                            " which is otherwise unprotected (it may have been edited); restore"
                            f" anchor.json or pass the copy kept apart ({options['anchor']}; a run that"
                            " stopped between the two files is finished by `run --resume`)")]
        if not own.is_file():
            return [Finding("warning", "anchor", f"{own} {_absent(own)}: without an anchor,"
                            " entries removed from the end of a ledger (close entry included)"
                            " are shown only by the missing close entry; copy anchor.json apart"
                            f" after a run and pass it ({options['anchor']})", unchecked=True),
                    _unanchored_completeness(run, cfg, options)]
        path, label = own, "the run's anchor.json"
    else:
        path, label = anchor, f"the anchor {anchor}"
        if not own.is_file():
            absent = _absent(own)
            absent += " from the run directory" if absent == "is missing" else ""
            out.append(Finding("warning", "anchor", f"{own} {absent}; checking against the"
                               " given anchor alone"))
        elif own.read_bytes() != anchor.read_bytes():
            out.append(Finding("error", "anchor", f"{own} differs from the given anchor"
                               f" {anchor}: it was replaced"))
    if anchor is not None and anchor_doc is not None:
        doc: dict[str, Any] | None = anchor_doc
    else:
        doc, problems = _load_anchor(path)
        out.extend(problems)
    if doc is not None:
        out.extend(_anchor_findings(run, doc, label, found, keys, allowlist_given))
        out.extend(_anchor_identity_findings(doc, label, results, cfg))
        if anchor is None:
            out.append(_own_anchor_only(doc, options))
    return out


def _own_anchor_only(doc: Mapping[str, Any], options: Mapping[str, str]) -> Finding:
    """The warning of a run checked against its own anchor.json alone (no copy given): the
    anchor proves only that whoever holds its signer's key signed this directory as it is,
    and that is the party whose run is audited (in process its key store also holds every
    client's ledger key), so a consistent re-signed edit of the run passes unnoticed."""
    runtime = doc["runtime"]
    signer = ANCHOR_SIGNERS.get(runtime, "operator")
    files = sorted(doc["files"]) or ["results.json"]
    held = (f"the {signer!r} key store, which in process also holds every client's ledger"
            f" key, so its holder can re-sign shortened or edited ledgers, {', '.join(files)}"
            " and the anchor consistently" if runtime == "in-process" else
            f"the {signer!r} key, so its holder can re-sign the anchor over an edited"
            f" {' or '.join(files)} (the ledgers stay signed by each client's own key)")
    return Finding("warning", "anchor_copy", "checked against the run's own anchor.json, not"
                   f" a copy kept apart: it is only as trustworthy as {held}, and such a"
                   " forgery passes; pass the anchor.json kept apart since the run"
                   f" ({options['anchor']}) to rule it out", unchecked=True)


def check_anchor(run_dir: str | Path, anchor: str | Path, *,
                 allowlist: str | Path | None = None,
                 error: type[Exception] = AuditError,
                 options: Mapping[str, str] = API_AUDIT_OPTIONS,
                 warnings: list[str] | None = None,
                 run_checked: bool = False,
                 given_keys: dict[str, PublicIdentity] | None = None,
                 anchor_doc: dict[str, Any] | None = None) -> None:
    """Check ``run_dir`` against an anchor copy kept apart, as ``audit verify --anchor`` does.

    Guarantee (:func:`_anchor_check`, the very check of :func:`verify_run`): the anchor's
    signature verifies under its signer key, the signer is the runtime's signer party with
    its key in the allowlist (``allowlist``, else the run's ``keys/allowlist.json``; an
    unregistered signer is an error only with ``allowlist``), the run's own anchor.json, if
    present, equals it, config.toml and results.json have the anchored digests, its
    run_name, config_hash, runtime and methods are those results.json and config.toml
    record, and every ledger ends at its anchored head and length with its anchored
    epsilon_spent, none missing and none unnamed. With ``allowlist``, the run also passes
    :func:`given_allowlist_findings` (no private key inside it; its published
    ``keys/allowlist.json`` agrees with ``allowlist``), as in :func:`verify_run`. Anything else
    raises ``error`` with a one-line message (the first problem, and how many more), naming
    the arguments (``options``; the CLI passes :data:`~audits.options.CLI_AUDIT_OPTIONS`, its flags).
    The warnings of the allowlist's checks (what they could not check) are appended to
    ``warnings`` when it is given, as :func:`verified_ledger_entries` appends them.
    ``run_checked``: the caller has already held ``run_dir`` to those checks with this
    ``allowlist`` (:func:`refuse_private_keys` with ``given``), so the run is not scanned again.
    ``given_keys`` and ``anchor_doc``: what the caller loaded from ``allowlist``
    (:func:`load_given_allowlist`) and ``anchor`` (:func:`load_given_anchor`), so neither
    is loaded again.
    """
    run = check_path(run_dir, "run_dir", error)
    anchor_path = Path(anchor) if anchor_doc is not None \
        else load_given_anchor(anchor, error, options)[0]
    if allowlist is None:
        allow_path = run / "keys" / "allowlist.json"
        try:
            keys = load_allowlist(allow_path)
        except IdentityError as err:
            raise error(f"cannot check the anchor {anchor_path}: {err}") from None
    else:
        allow_path, keys = _given_allowlist(allowlist, given_keys, error, options)
    # results.json and config.toml are compared with the anchor only; what reading them
    # reports is verify_run's (their anchored digests are checked here)
    results = _load_results(run, [])
    cfg = _load_config(run, results, [])
    if allowlist is not None and not run_checked:
        findings = given_allowlist_findings(run, allow_path, keys)
        _raise_first(findings, error,
                     f"the run cannot be checked against the allowlist {allow_path}")
        if warnings is not None:
            warnings.extend(f.message for f in findings)
    problems = [f for f in _anchor_check(run, anchor_path, _discover(run / "ledgers"), keys,
                                         allowlist is not None, results=results, cfg=cfg,
                                         options=options, anchor_doc=anchor_doc)
                if f.severity == "error"]
    if problems:
        first = problems[0]
        where = "/".join(x for x in (first.method, first.client_id) if x)
        more = (f" (+{len(problems) - 1} more; {options['verify_anchor']})"
                if len(problems) > 1 else "")
        where = f" ({where})" if where else ""
        raise error(f"the run does not match the anchor {anchor_path}{where}:"
                    f" [{first.check}] {first.message}{more}")


#: The runtime builds a method's ledger folder in ``ledgers/.<method>.creating-<8 hex>`` and
#: renames it into place: a process killed before the rename leaves that folder behind.
_CREATING = re.compile(r"\.(?P<method>.+)\.creating-[0-9a-f]{8}")


def _discover(ledger_dir: Path) -> list[tuple[str | None, Path]]:
    """``(method, path)`` for ``ledgers/<client>.jsonl`` and ``ledgers/<method>/<client>.jsonl``
    (a creation's staging folder, ``.<method>.creating-<8 hex>``, is no method's ledgers:
    :func:`_interrupted_creations`)."""
    if not ledger_dir.is_dir():
        return []
    found: list[tuple[str | None, Path]] = [(None, p) for p in ledger_files(ledger_dir)]
    for sub in sorted(p for p in ledger_dir.iterdir()
                      if p.is_dir() and not _CREATING.fullmatch(p.name)):
        found.extend((sub.name, p) for p in ledger_files(sub))
    return found


def _nonce_file_findings(ledger_dir: Path) -> list[Finding]:
    """One finding per ``*.nonces.jsonl`` in ``ledgers/`` or ``ledgers/<method>/`` (not
    verified as a ledger): a warning for a nonce state file (a receiver's replay-protection
    memory, which a Flower node keeps beside its ledger; it records no release, so nothing
    in it bears on the privacy claim), an error for a file so named that holds anything
    else, which nothing writes there."""
    if not ledger_dir.is_dir():
        return []
    folders = [ledger_dir] + sorted(p for p in ledger_dir.iterdir()
                                    if p.is_dir() and not _CREATING.fullmatch(p.name))
    out = []
    for folder in folders:
        method = None if folder == ledger_dir else folder.name
        for path in nonce_files(folder):
            rel = path.relative_to(ledger_dir.parent).as_posix()
            try:
                lines, torn = _read_lines(path)
            except AuditError as exc:
                problem: str | None = str(exc)
            else:  # a torn last line is dropped, as the node that wrote it drops it
                problem = nonce_file_problem(lines[:-1] if torn else lines)
            if problem is None:
                out.append(Finding(
                    "warning", "nonce_file",
                    f"{rel} is a nonce state file (the replay-protection memory of the"
                    f" messages a party accepted, kept beside a Flower node's ledger), not a"
                    " privacy ledger: it records no release, so it is not verified and"
                    " changes no epsilon; it does not belong in ledgers/ (copy only"
                    " <client>.jsonl there)", None, None, method))
            else:
                out.append(Finding(
                    "error", "nonce_file",
                    f"{rel} is named as a nonce state file (a party's replay-protection"
                    f" memory), but {problem}: it is neither that nor verified as a ledger;"
                    " find out what wrote it (a ledger is <client>.jsonl)",
                    None, None, method))
    return out


def _interrupted_creations(ledger_dir: Path) -> list[Finding]:
    """One finding per staging folder ``ledgers/.<method>.creating-<8 hex>`` (left by a
    creation of a method's ledgers killed before its rename; not verified as ledgers): a
    warning when it holds only empty ledgers and plain files (nothing was ever written to
    them), an error when it holds anything else (ledger entries, a journal, a folder), which
    no creation writes."""
    if not ledger_dir.is_dir():
        return []
    out = []
    for sub in sorted(p for p in ledger_dir.iterdir()
                      if p.is_dir() and _CREATING.fullmatch(p.name)):
        method = _CREATING.fullmatch(sub.name)["method"]  # type: ignore[index]
        held = sorted(sub.iterdir())
        other = [p.name for p in held
                 if p.is_symlink() or not p.is_file() or p.name.endswith(".journal")
                 or (p.suffix == ".jsonl" and p.stat().st_size > 0)]
        if other:
            out.append(Finding(
                "error", "interrupted_creation",
                f"ledgers/{sub.name}, named as the staging folder of a creation of the ledgers"
                f" of method {method!r}, holds {', '.join(other[:5])}"
                f"{' and more' if len(other) > 5 else ''}, which no creation writes (a"
                " creation holds only empty ledgers): not verified; find out what wrote it",
                None, None, method))
        else:
            out.append(Finding(
                "warning", "interrupted_creation",
                f"ledgers/{sub.name} is what a creation of the ledgers of method {method!r} left when"
                f" it was killed before its rename: {len(held)} file(s), only empty ledgers"
                " (nothing was released under them); not verified as ledgers",
                None, None, method))
    return out


def _coverage(ctx: _RunContext, methods: Sequence[str | None]) -> None:
    """A warning when ledgers of several methods spend the same clients' data.

    (A DP config whose relatedness is not noised is rejected by the config schema itself, so
    a summary released outside the ledger shows up as an invalid ``config.toml``.)
    """
    named = sorted({m for m in methods if m is not None})
    if len(named) > 1:
        ctx.findings.append(Finding(
            "warning", "coverage",
            f"ledgers of {len(named)} methods ({', '.join(named)}) spend the same clients'"
            " data: each method's epsilon holds for that method's releases alone (alternative"
            " deployments compared in one run), not for all of them together"))


RUN_MARKERS = ("config.toml", "results.json", "ledgers", "anchor.json", "keys")
"""What a run directory holds; a directory with none of them is refused as bad input."""


def dp_claim_basis(run: Path, cfg_enabled: bool | None, results: Mapping[str, Any] | None,
                   anchor_given: bool = False) -> list[str]:
    """What in ``run`` claims differential privacy, signed facts first: an ``anchor.json``
    (signed; only a DP run is anchored) or an anchor copy given (``anchor_given``), a
    ``ledgers/`` folder, results.json's ``assumptions.differential_privacy`` or a non-empty
    ``privacy`` section (results.json's digest is what the anchor signs), config.toml's
    ``privacy.enabled`` (``cfg_enabled``; None when config.toml is missing or invalid).

    Also a claim: neither config.toml nor results.json saying that DP was off (no run file
    states that the run made no claim). An empty list means the run states that it made no
    DP claim and holds nothing a DP run writes; nothing signs that statement (a non-private
    run writes no anchor), which :func:`verify_run` says in its finding."""
    basis = []
    if anchor_given:
        basis.append("an anchor copy was given (only a DP run is anchored)")
    if (run / ANCHOR_FILENAME).exists() or (run / ANCHOR_FILENAME).is_symlink():
        basis.append(f"{ANCHOR_FILENAME} is present (signed; only a DP run is anchored)")
    if (run / "ledgers").exists() or (run / "ledgers").is_symlink():
        basis.append("ledgers/ is present")
    assumptions = results.get("assumptions") if results is not None else None
    says_off = isinstance(assumptions, dict) and assumptions.get("differential_privacy") is False
    if isinstance(assumptions, dict) and assumptions.get("differential_privacy") not in \
            (None, False):
        basis.append("results.json assumptions.differential_privacy is"
                     f" {assumptions.get('differential_privacy')!r:.40}")
    privacy = results.get("privacy") if results is not None else None
    if privacy:
        basis.append("results.json has a privacy section")
    if cfg_enabled:
        basis.append("config.toml enables privacy")
    if not basis and not says_off and cfg_enabled is None:
        basis.append("neither config.toml nor results.json says that DP was off")
    return basis


def _no_claim_report(run: Path, cfg: ExperimentConfig | None, results: dict[str, Any] | None,
                     findings: list[Finding], allowlist: Path | None, rel_tol: float,
                     options: Mapping[str, str] = API_AUDIT_OPTIONS) -> VerificationReport:
    """The report of a run that makes no DP claim (:func:`dp_claim_basis` empty): config.toml
    against results.json's config hash (already in ``findings``), and where keys/ exists (the
    envelope keys of a run with ``[security] envelopes``) its .pub files against its
    allowlist, and that allowlist against ``allowlist`` when given; without ``allowlist`` an
    unchecked warning says the keys were held to the run's own file only (as for a DP run)."""
    # without budgets, a missing config.toml (the API writes none) is no warning
    missing_config = f"{run / 'config.toml'} is missing"
    findings[:] = [f for f in findings if not f.message.startswith(missing_config)]
    checks = []
    if cfg is not None and results is not None and "config_hash" in results:
        checks.append("config.toml hashes to results.json's config_hash")
    keys_dir = run / "keys"
    allow_used = "none (the run is not differentially private)"
    if not keys_dir.is_dir() and allowlist is not None:
        allow_used = f"{allowlist} (nothing held to it: the run has no keys/)"
    elif keys_dir.is_dir():
        path = allowlist if allowlist is not None else keys_dir / "allowlist.json"
        try:
            keys = load_allowlist(path)
        except IdentityError as exc:
            findings.append(Finding("error", "allowlist", str(exc)))
        else:
            allow_used = str(path)
            if allowlist is not None:
                findings.extend(_published_allowlist_findings(keys_dir, allowlist, keys))
            else:
                findings.append(Finding(
                    "warning", "allowlist",
                    f"the envelope keys in {keys_dir} were checked only against the run's own"
                    f" {path}: they are only as trustworthy as the directory (keys replaced"
                    " together with it read the same); pass an independently registered"
                    f" allowlist ({options['allowlist']}) to check them", unchecked=True))
            findings.extend(_public_key_file_findings(keys_dir, keys))
            checks.append("keys/*.ed25519.pub and keys/*.x25519.pub (the envelope keys) equal"
                          + (" the given allowlist, and keys/allowlist.json lists no party or"
                             " key it does not register" if allowlist is not None
                             else " keys/allowlist.json"))
    files = [name for name, present in (("config.toml", cfg is not None),
                                        ("results.json", results is not None)) if present]
    absent = "ledgers or" if keys_dir.exists() else "ledgers, keys or"
    findings.append(Finding(
        "warning", "no_ledgers",
        f"the run makes no differential-privacy claim ({' and '.join(files)}"
        f" {'say' if len(files) > 1 else 'says'} that it is not differentially private): it"
        f" has no privacy {absent} anchor.json, so there is no privacy claim to verify."
        f" Nothing signs its {' or '.join(files)}: a DP run stripped of its ledgers and"
        " anchor.json and edited to say so would read the same; a copy of a DP run's"
        " anchor.json kept apart (--anchor) rules that out"))
    return VerificationReport(
        run_dir=str(run), clients=[], findings=findings, rel_tol=float(rel_tol),
        independent_accountant="none (the run is not differentially private)",
        allowlist=allow_used, checks=checks, dp_claimed=False)


def _inside(path: str | None, run: Path) -> bool:
    """True when ``path`` (a module's file or package folder) lies in ``run``, links resolved."""
    return path is not None and Path(path).resolve().is_relative_to(run.resolve())


def _defined_in(spec: Any, module: str) -> bool:
    return any(getattr(fn, "__module__", None) == module
               for fn in (spec.sensitivity, spec.record_params) if fn is not None)


#: The mechanisms each module imported by :func:`import_trusted_modules` registered on its
#: first import in this process.
_REGISTERED_BY: dict[str, list[str]] = {}
#: The config entries each such module registered on its first import in this process.
_ENTRIES_BY: dict[str, list[str]] = {}


@contextlib.contextmanager
def _run_off_sys_path(run: Path) -> Iterator[list[str]]:
    """Within it, no ``sys.path`` entry lies inside ``run`` (``""``, the working directory,
    included): a module the imported one imports in turn is never found there. Yields the
    entries taken off; each is put back at its place afterwards. An entry that names nothing
    on disk (a path hook's marker) finds no file there and stays."""
    removed = [(i, p) for i, p in enumerate(sys.path)
               if isinstance(p, str) and (p == "" or os.path.exists(p))
               and _inside(p or os.getcwd(), run)]
    for i, _ in reversed(removed):
        del sys.path[i]
    try:
        yield [p for _, p in removed]
    finally:
        for i, p in removed:
            sys.path.insert(i, p)


def import_trusted_modules(names: Sequence[str], run: Path,
                           options: Mapping[str, str] = API_AUDIT_OPTIONS
                           ) -> list[ImportedModule]:
    """Import each dotted module name from ``sys.path`` (PYTHONPATH, installed packages), so
    that the plug-in mechanisms it registers in :data:`privacy.mechanisms.MECHANISMS` have
    their sensitivities recomputed. Guarantee: no code inside ``run`` is executed by it -- a
    module, or a package on its dotted path, that resolves inside ``run`` is refused before it
    is imported; ``sys.path`` entries inside ``run`` are taken off while it is imported, so
    what it imports in turn is not found there; and a module of ``run`` it still imported (a
    path it added itself) fails the audit. AuditError naming the module for a name that is no
    dotted module name, one that is not found, resolves inside ``run``, or raises while it is
    imported."""
    flag = options["imports"]
    out: list[ImportedModule] = []
    if not names:  # sys.path is left alone
        return out
    with _run_off_sys_path(run) as off:
        for name in names:
            out.append(_import_trusted(name, run, flag, off))
    return out


def _import_trusted(name: str, run: Path, flag: str, off: Sequence[str]) -> ImportedModule:
    """:func:`import_trusted_modules` of one module ``name`` (``off``: the sys.path entries
    inside ``run`` taken off)."""
    if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
        raise AuditError(f"{flag}: {name!r:.80} is not a dotted module name"
                         " (e.g. mypackage.mechanisms)")
    parts = name.split(".")
    # before find_spec, which runs each parent package's __init__ (what it imports and
    # registers counts)
    loaded, before, entries = set(sys.modules), set(MECHANISMS.names()), _registry_entries()
    for depth in range(1, len(parts) + 1):  # each package before it runs, then the module
        prefix = ".".join(parts[:depth])
        try:
            spec = importlib.util.find_spec(prefix)
        except Exception as exc:  # a parent package that raised while it was imported
            raise AuditError(f"{flag} {name}: importing {prefix} raised"
                             f" {type(exc).__name__}: {exc}{_off_path_note(exc, off)}") from exc
        if spec is None and depth == 1 and off:  # found only in the run (looked up, not run)
            spec = importlib.machinery.PathFinder.find_spec(prefix, list(off))
        if spec is None:
            raise AuditError(f"{flag} {name}: no module {prefix!r} on PYTHONPATH or among"
                             " the installed packages (give the dotted name of a module you"
                             " trust, with its folder on PYTHONPATH)")
        where = [spec.origin, *(spec.submodule_search_locations or [])]
        if any(_inside(w, run) for w in where if w not in (None, "built-in", "frozen")):
            raise AuditError(f"{flag} {name}: {prefix} resolves inside the run directory"
                             f" {run.resolve()} under review, whose code is never run by an audit;"
                             " import a copy you reviewed from a folder outside it")
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        raise AuditError(f"{flag} {name}: importing it raised {type(exc).__name__}:"
                         f" {exc}{_off_path_note(exc, off)}") from exc
    # what it imported in turn cannot be checked before it runs; a module of the run's
    # found all the same (a path into the run it added itself) still fails the audit
    pulled = sorted(m for m in set(sys.modules) - loaded
                    if _inside(getattr(sys.modules[m], "__file__", None), run))
    if pulled:
        # and forgotten, so that a second audit in this process imports them again, not
        # takes them as imported (their registrations stay, and refuse a second one)
        for m in [*pulled, *(n for n in set(sys.modules) - loaded if n == parts[0]
                             or n.startswith(f"{parts[0]}."))]:
            sys.modules.pop(m, None)
        raise AuditError(f"{flag} {name}: it imported {', '.join(pulled)} from inside the"
                         f" run directory {run.resolve()} under review (a path into it that"
                         " the module or its package put on sys.path?); import a module that"
                         " imports no code of the run")
    file = getattr(module, "__file__", None)
    # a module imported before (a second audit in this process) registers nothing anew
    registered = [m for m in MECHANISMS.names()
                  if m not in before or _defined_in(MECHANISMS.get(m), module.__name__)
                  or m in _REGISTERED_BY.get(name, ())]
    _REGISTERED_BY.setdefault(name, registered)
    _ENTRIES_BY.setdefault(name, sorted(_registry_entries() - entries))
    return ImportedModule(name, file, _file_sha256(file), registered,
                          {m: _sensitivity_code(MECHANISMS.get(m)) for m in registered},
                          _ENTRIES_BY[name])


def _registry_entries() -> set[str]:
    """``"<kind> '<name>'"`` of every dataset, partitioner, model, loss and method registered,
    and ``"accountant '<name>'"`` of every plug-in accountant."""
    from secure_fedora.core.registry import DATASETS, LOSSES, METHODS, MODELS, PARTITIONERS

    return {f"{r.kind} {n!r}" for r in (DATASETS, PARTITIONERS, MODELS, LOSSES, METHODS)
            for n in r.names()} | {f"accountant {n!r}" for n in ACCOUNTANT_REGISTRY
                                   if n not in ACCOUNTANTS}


def _off_path_note(exc: BaseException, off: Sequence[str]) -> str:
    """Why a module may not have been found: the run directory was taken off sys.path."""
    if not isinstance(exc, ModuleNotFoundError) or not off:
        return ""
    return (f" (sys.path's {', '.join(map(repr, off))}, inside the run directory, is taken off"
            " while it is imported: a module of the run under review never runs)")


def _file_sha256(file: str | None) -> str | None:
    """SHA-256 of ``file``'s bytes; None without a file or when it cannot be read."""
    if file is None:
        return None
    try:
        return hashlib.sha256(Path(file).read_bytes()).hexdigest()
    except OSError:
        return None


def _sensitivity_code(spec: Any) -> dict[str, str | None]:
    """Where mechanism ``spec``'s sensitivity formula is defined: its module, the file of its
    code and that file's SHA-256 (None each where Python does not know it)."""
    fn = spec.sensitivity
    while isinstance(fn, functools.partial):
        fn = fn.func
    if fn is None:
        return {"module": None, "file": None, "sha256": None}
    file = None
    for target in (fn, type(fn)):  # a function, else a callable object's class
        with contextlib.suppress(TypeError):
            file = inspect.getsourcefile(target)
            break
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return {"module": module, "file": file, "sha256": _file_sha256(file)}


def imported_text(m: Mapping[str, Any]) -> str:
    """One line naming the imported module ``m`` (:meth:`ImportedModule.to_json`), its file
    and SHA-256, the mechanisms it registered and, where another file defines a mechanism's
    sensitivity formula, that file and its SHA-256: which code recomputed what."""
    named = []
    for mech in m["mechanisms"]:
        code = m.get("sensitivity_code", {}).get(mech) or {}
        if code.get("file") is not None and code["file"] != m["file"]:
            mech += f" (sensitivity in {code['module']}: {code['file']}, sha256 {code['sha256']})"
        elif code.get("module") is not None and code.get("file") is None:
            mech += f" (sensitivity in {code['module']}, whose file Python does not know)"
        named.append(mech)
    entries = m.get("entries") or []
    return (f"{m['module']} ({m['file']}, sha256 {m['sha256']}): mechanisms"
            f" {', '.join(named) or 'none'}" + (f"; config entries {', '.join(entries)}"
                                                if entries else ""))


def _import_findings(imported: Sequence[ImportedModule], clients: Sequence[ClientVerification],
                     options: Mapping[str, str]) -> list[Finding]:
    """A warning for each imported module that registered no mechanism the ledgers record and
    no config entry (an import the reviewer thought needed; it does not weaken any check)."""
    used = {m for c in clients for m in c.mechanisms}
    return [Finding("warning", "import", f"{options['imports']} {m.module} ({m.file})"
                    " registered no mechanism these ledgers record (it registered"
                    f" {', '.join(map(repr, m.mechanisms)) or 'none'}) and no config entry;"
                    " nothing was recomputed with it")
            for m in imported if not used & set(m.mechanisms) and not m.entries]


def _strict_findings(findings: list[Finding], clients: Sequence[ClientVerification],
                     options: Mapping[str, str]) -> None:
    """Under ``strict``: every ``unchecked`` warning becomes an error (in place), and the
    ledger it is about fails."""
    failed = set()
    for i, f in enumerate(findings):
        if f.unchecked and f.severity == "warning":
            findings[i] = replace(f, severity="error", message=f.message + f" ({options['strict']}"
                                  ": what was not checked is an error)")
            failed.add((f.method, f.client_id))
    for c in clients:
        if (c.method, c.client_id) in failed:
            c.ok = False
            c.warned = any(f.severity == "warning" for f in findings
                           if (f.method, f.client_id) == (c.method, c.client_id))


def verify_run(run_dir: str | Path, *, allowlist: str | Path | None = None,
               rel_tol: float = DEFAULT_REL_TOL,
               pld_checkpoints: int = DEFAULT_PLD_CHECKPOINTS,
               anchor: str | Path | None = None,
               options: Mapping[str, str] = API_AUDIT_OPTIONS,
               imports: Sequence[str] = (), strict: bool = False) -> VerificationReport:
    """Verify every ledger of ``run_dir`` (see the module docstring for each check).

    ``imports``: dotted names of modules the auditor trusts, imported first
    (:func:`import_trusted_modules`: never from inside ``run_dir``) so that the plug-in
    mechanisms they register have their sensitivities recomputed; the report names each
    module's file and SHA-256. ``strict``: every warning saying that a check was not made
    (``Finding.unchecked``: an unregistered plug-in mechanism, a missing results.json,
    config.toml or anchor, keys taken from the run directory, ...) is an error.

    Ledgers are ``ledgers/<method>/<client>.jsonl`` (the in-process runtime's layout, one
    directory per compared method) or ``ledgers/<client>.jsonl``. Guarantee: ``report.ok``
    is True only if every ledger is intact, signed by its client's allowlisted key, never
    under-reports epsilon by more than ``rel_tol`` against dp_accounting, and stays within
    its budget. Every error names the client, the method, the entry (line position) where
    applicable, the check and what is wrong. Raises :class:`AuditError` only when
    ``run_dir`` itself is missing, holds none of :data:`RUN_MARKERS`, or an argument is invalid
    (an ``allowlist`` that is missing or no valid allowlist included: the auditor's input; the
    run's own damaged ``keys/allowlist.json`` is an error finding).
    """
    run = check_path(run_dir, "run_dir", AuditError)
    problem = path_problem(run)
    if problem is not None:
        raise AuditError(f"run directory {run} {problem}")
    if not any((run / name).exists() for name in RUN_MARKERS):
        raise AuditError(f"{run} is not a run directory: it holds none of "
                         f"{', '.join(RUN_MARKERS)}")
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, int | float) or not 0 <= rel_tol < 1:
        raise AuditError(f"rel_tol must be in [0, 1) ({options['rel_tol']}), got {rel_tol!r}")
    _check_pld_checkpoints(pld_checkpoints, "pld_checkpoints", options["pld_checkpoints"])
    allow_path, given_keys = load_given_allowlist(allowlist, AuditError, options) \
        if allowlist is not None else (None, None)
    anchor_path, anchor_doc = load_given_anchor(anchor, AuditError, options) \
        if anchor is not None else (None, None)
    if not isinstance(strict, bool):  # a truthy "no" must not mean yes
        raise AuditError(f"strict must be True or False, got {strict!r:.80}")
    if isinstance(imports, str):  # one name would be imported letter by letter
        raise AuditError(f"{options['imports']} takes a list of module names, got the string"
                         f" {imports!r:.80}")
    # secure_fedora/contrib/'s mechanisms are every process's, also where no config.toml
    # is read (no registry lookup), and never counted as the trusted imports' below
    load_contrib()
    imported = import_trusted_modules(imports, run, options)  # before the config names plug-ins
    with _quiet_dp_accounting():  # once for every ledger's accounting
        report = _verify_dir(run, allow_path, given_keys, anchor_path, float(rel_tol),
                             pld_checkpoints, options, imported, anchor_doc)
    if strict:  # the one place: every exit of _verify_dir comes through here
        _strict_findings(report.findings, report.clients, options)
    report.imported, report.strict = imported, strict
    return report


def _verify_dir(run: Path, allow_path: Path | None, given_keys: dict[str, PublicIdentity] | None,
                anchor_path: Path | None, rel_tol: float, pld_checkpoints: int,
                options: Mapping[str, str],
                imported: Sequence[ImportedModule],
                anchor_doc: dict[str, Any] | None = None) -> VerificationReport:
    """:func:`verify_run`'s checks of ``run`` once its arguments are checked and the trusted
    modules imported, before ``strict`` is applied (``anchor_doc``: the given anchor as
    :func:`load_given_anchor` loaded it)."""
    findings: list[Finding] = []
    results = _load_results(run, findings)
    cfg = _load_config(run, results, findings, options["imports"])
    ctx = _RunContext(run, cfg, results, findings, options)
    ledger_dir = run / "ledgers"
    found = _discover(ledger_dir)
    findings.extend(_interrupted_creations(ledger_dir))
    findings.extend(_nonce_file_findings(ledger_dir))
    claim_basis = dp_claim_basis(run, cfg.privacy.enabled if cfg is not None else None,
                                 results, anchor_path is not None)
    findings.extend(_private_key_findings(run, bool(claim_basis)))  # with a claim or without
    if not claim_basis:
        return _no_claim_report(run, cfg, results, findings, allow_path, rel_tol, options)
    keys, allow_used = _load_keys(run, allow_path, findings, options, given_keys,
                                  publishes_keys=results is None
                                  or results.get("runtime") != "flower")
    if not found:
        where = ""
        if results is not None and results.get("runtime") == "flower":
            # a Flower result directory: each node keeps its own ledger, none is here
            where = (f"; a Flower run's ledgers stay on its nodes (nodes/node-<i>/runs/"
                     f"{results.get('run_id', '<run_id>')}/<method>/client-<i>.jsonl, not the"
                     " .nonces.jsonl beside them): copy them into ledgers/<method>/ of a folder"
                     " holding this results.json and verify that, with --anchor and --allowlist")
        findings.append(Finding(
            "error", "no_ledgers",
            f"no ledgers in {ledger_dir}, but the run claims differential privacy:"
            f" {'; '.join(claim_basis)}{where}"))
    _coverage(ctx, sorted({m for m, _ in found}, key=str))
    clients: list[ClientVerification] = []
    ledger_at = {(m, p.stem): p.relative_to(run).as_posix() for m, p in found}
    for method, path in found:
        start = len(findings)  # this ledger's findings, which then name its file
        client_id = path.stem
        ident = keys.get(client_id)
        if ident is None and keys:
            findings.append(Finding("error", "key", f"client {client_id!r} is not in the"
                                    f" allowlist {allow_used}", client_id, None, method))
        clients.append(_verify_client(path, method, client_id,
                                      ident.verify_key if ident is not None else None,
                                      ctx, float(rel_tol), pld_checkpoints))
        clients[-1].signer_key = ident.verify_key_hex() if ident is not None else None
        closing = _close_findings(path, method, client_id)
        findings.extend(closing)
        if any(f.severity == "error" for f in closing):
            clients[-1].ok = False
        findings[start:] = [replace(f, ledger=ledger_at[method, client_id])
                            for f in findings[start:]]
    findings.extend(replace(f, ledger=ledger_at.get((f.method, f.client_id)))
                    if f.client_id is not None else f
                    for f in _anchor_check(run, anchor_path, found, keys, allow_path is not None,
                                           results=results, cfg=cfg, options=options,
                                           anchor_doc=anchor_doc))
    findings.extend(_model_record_findings(run, found, results))
    for method in sorted({m for m, _ in found} | set((results or {}).get("privacy") or {}),
                         key=str):
        section = _results_section(results, method)
        findings.extend(_accountant_choice_findings(section, method, rel_tol))
        findings.extend(_plan_epsilon_findings(section, method, rel_tol))
        budgets: dict[str, dict[tuple[Any, Any], str]] = {}
        for c in clients:
            if c.method == method and _number(c.budget_epsilon) and _number(c.delta):
                budgets.setdefault(c.client_id, {})[(c.budget_epsilon, c.delta)] = (
                    "its ledger records it"
                )
        for cid, row in ctx.summary_rows(method).items():
            if _number(row.get("epsilon_budget")) and _number(row.get("delta")):
                budgets.setdefault(cid, {}).setdefault(
                    (row["epsilon_budget"], row["delta"]), "results.json's client row states it"
                )
        # the budget each client holds: the first stated, its ledger's (added first), else
        # its results.json row's
        held = {cid: next(iter(stated)) for cid, stated in budgets.items()}
        findings.extend(
            replace(f, ledger=ledger_at.get((f.method, f.client_id)))
            for f in _plan_coverage_findings(section, method, budgets, held)
        )
    if cfg is not None and cfg.privacy.enabled:
        dirs = sorted({m for m, _ in found if m is not None})
        finished = [m for m in cfg.methods
                    if results is not None and m in results.get("methods", {})]
        if results is not None and results.get("runtime") == "in-process":
            for m in cfg.methods:  # the in-process runtime reports every configured method
                if m not in finished:
                    findings.append(Finding("error", "results", f"config.toml lists method {m!r}"
                                            " but results.json reports nothing of it", None, None, m))
        expected: set[str] = set(dirs) | set(finished)
        if not any(m is None for m, _ in found):
            # Both runtimes keep ledgers for every configured method of a DP run (Local's
            # DP-SGD releases too), so config.toml names them even without results.json: a
            # whole method's ledger folder deleted with results.json and anchor.json is missing.
            expected |= set(cfg.methods)
        expected_methods: list[str | None] = sorted(expected) if expected else [None]
        have = {(m, p.stem) for m, p in found}
        for method in expected_methods:
            for cid in _client_indices(cfg.data.num_clients):
                if (method, cid) not in have:
                    where = ledger_dir / method if method is not None else ledger_dir
                    findings.append(Finding("error", "missing_ledger", f"DP is enabled but"
                                            f" there is no ledger {where / (cid + '.jsonl')}",
                                            cid, None, method))
    findings.extend(_import_findings(imported, clients, options))
    # a plug-in accountant's ledgers are checked as PLD ones: say so, naming it
    plug_ins = sorted({c.accountant for c in clients if isinstance(c.accountant, str)
                       and c.accountant and c.accountant not in ACCOUNTANTS})
    pld_ledgers = "'prv', 'pld'" + "".join(f", {a!r}" for a in plug_ins) + " ledgers" + (
        f"; {'a plug-in accountant is' if len(plug_ins) == 1 else 'plug-in accountants are'}"
        " held to PLD as PRV is" if plug_ins else "")
    return VerificationReport(
        run_dir=str(run), clients=clients, findings=findings, rel_tol=float(rel_tol),
        independent_accountant=(f"dp_accounting {_DP_ACCOUNTING_VERSION}: RDP at every entry"
                                f" ('rdp' ledgers), PLD at checkpoints ({pld_ledgers});"
                                " PLD (pessimistic) and RDP of every whole ledger"),
        allowlist=allow_used, checks=checks_done(options), dp_claimed=True,
        dp_claim_basis=claim_basis, anchor_signer=anchor_signer(run, anchor_path, keys),
    )


def anchor_signer(run: Path, anchor: Path | None,
                  keys: Mapping[str, PublicIdentity]) -> dict[str, Any] | None:
    """Who signed the anchor a verification checks (``anchor``, the copy kept apart, else the
    run's own anchor.json): ``{"file", "party_id", "ed25519", "allowlisted"}``, the key in
    hex and whether ``keys`` (the allowlist in use) registers that key for that party. None
    when there is no such file or its signature does not verify (a finding says why)."""
    path = anchor if anchor is not None else run / ANCHOR_FILENAME
    if not path.is_file():
        return None
    doc, _ = _load_anchor(path)
    if doc is None:
        return None
    party, key = doc["signer"]["party_id"], doc["signer"]["ed25519"]
    registered = keys.get(party)
    return {"file": str(path), "party_id": party, "ed25519": key,
            "allowlisted": registered is not None and registered.verify_key_hex() == key}
