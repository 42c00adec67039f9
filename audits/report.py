"""Compliance report of a run: ``report.json`` plus a self-contained ``report.html``.

The HTML has inline CSS, plots embedded as base64 PNG ``data:`` URIs and no scripts or
external references, so it renders offline in any browser and can be archived as one file.
Sections: run identity; threat model and assumptions in force; per-client budget table;
epsilon over rounds per client against its budget (plot); under DP, what each method's
client replies carry beyond the accounted releases and why (declared, not verified; a
method's own claim marked as an assumption to review); mechanisms, and in words each
client's release made more often than the run's plan holds (a redone, twice-accounted
release); verification results
(from :func:`audits.verify.verify_run`); the empirical audits (canary, white-box, replay:
claim, certifiable maximum, measured lower bound and verdict from ``RUN_DIR/audit/*.json``,
"not run" when absent; a document whose verdict is not the one its own numbers give, with a
non-finite figure, naming another run or a claim other than a verified ledger's is shown
"invalid" or "unverified", never with its verdict); accuracy.

Everything is read from the run directory (``results.json``, ``config.toml``,
``ledgers/``, ``keys/``); nothing in the run is trusted without the verification section
saying whether it checked out.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from audits.options import (  # noqa: E402
    API_AUDIT_OPTIONS,
    DEFAULT_PLD_CHECKPOINTS,
    DEFAULT_REL_TOL,
)
from audits.output import write_output_file  # noqa: E402
from audits.verdict import (  # noqa: E402
    VerdictError,
    audit_figures,
    audit_verdict,
    counted,
    verdict_text,
)
from audits.verify import (  # noqa: E402
    AuditError,
    ClientVerification,
    VerificationReport,
    dpsgd_claim_problem,
    imported_text,
    tolerance_text,
    verify_run,
)
from privacy.accounting import (  # noqa: E402
    format_exact,
    format_ordered,
    format_share_up,
    format_spent,
    format_up,
)
from privacy.ckks import parameter_notes  # noqa: E402
from privacy.identity import client_ids  # noqa: E402
from privacy.paths import check_path, path_problem  # noqa: E402
from secure_fedora.algorithms.contract import (  # noqa: E402
    REPLY_LAMBDA,
    REPLY_NUM_EXAMPLES,
    REPLY_STEPS,
    ROUND,
    SETUP,
    reply_declarations,
)
from secure_fedora.algorithms.messages import KIND_SUMMARY, KIND_THETA  # noqa: E402
from secure_fedora.core.config import (  # noqa: E402
    ConfigError,
    ExperimentConfig,
    load_run_config,
    model_selection,
)
from secure_fedora.core.files import finite_document  # noqa: E402
from secure_fedora.runtimes.results import (  # noqa: E402
    config_assumptions,
    metric_label,
    uses_relatedness,
)
from secure_fedora.secure.private import (  # noqa: E402
    planned_release_counts,
    sample_rate_for,
    steps_per_round,
)

__all__ = ["ReportPaths", "build_report", "render_html", "write_report"]

REPORT_VERSION = 1

#: A plot of more clients than this draws their summary (epsilon: median, 5-95% band and
#: range per round; the metric: each method's values sorted) instead of a line or bar per
#: client; the tables and report.json keep every client.
PLOT_CLIENTS_MAX = 50

#: The threat model's statements beside what leaves a client (:func:`_leaves_client`).
THREAT_MODEL_SERVER = (
    "The server is honest-but-curious: it follows the protocol and tries to learn about client"
    " data from what it receives.")
THREAT_MODEL_BUDGETS = [
    "Each client enforces its own (epsilon, delta) budget and refuses any release that would"
    " exceed it; every release is written to its signed, hash-chained ledger before it is sent.",
    "Neighbouring relation: add/remove one training record (the relation of the accountants).",
]

#: The reply entries :func:`_leaves_client` names in words; any other a run's methods declare
#: is named as a further declared entry.
_NAMED_ENTRIES = frozenset({(SETUP, KIND_SUMMARY), (ROUND, KIND_THETA), (ROUND, REPLY_LAMBDA),
                            (ROUND, REPLY_STEPS), (ROUND, REPLY_NUM_EXAMPLES)})

#: Under the report's privacy plan: its planned epsilon (results.json ``planned_epsilon``) is
#: the plan rounded up, where the per-client budgets table shows each ledger's exact spend.
PLANNED_EPSILON_NOTE = ("planned \u03b5 is the plan's epsilon rounded up (results.json"
                        " planned_epsilon, 6 decimals); the recorded \u03b5 of the per-client"
                        " budgets is the ledger's exact epsilon (both shown rounded up)")


def _leaves_client(released: tuple[frozenset[tuple[str, str]], bool], dp: bool,
                   validation: Any = "private") -> str:
    """The threat model's sentence on what leaves client i, naming the relatedness summary,
    the model and FEDORA's lambda only where a method of the run declares that reply entry
    (``released``: :func:`_released_entries`), and every one where the declarations are not
    all known; other declared entries are named as such, never left out. Under DP the lambda
    is called noised only with ``validation`` (the run's ``validation_data``) "private": with
    public validation data it leaves in the clear and no ledger accounts it."""
    entries, complete = released

    def sends(stage: str, entry: str) -> bool:
        return (stage, entry) in entries or not complete

    summary, model, lam = (sends(SETUP, KIND_SUMMARY), sends(ROUND, KIND_THETA),
                           sends(ROUND, REPLY_LAMBDA))
    other = not complete or bool(entries - _NAMED_ENTRIES)
    parts = []
    if summary:
        parts.append("its relatedness summary (FEDORA, once"
                     + ("" if dp else "; plain, or encrypted where configured") + ")")
    if model:
        parts.append("its model (every round it takes part in)")
    lam_noised = dp and validation == "private"
    if lam:
        parts.append("FEDORA's lambda (every round it takes part in" + (
            "; noised with private validation data" if lam_noised
            else "; computed in the clear from validation data declared public, not accounted"
            if dp and validation == "public"
            else "; noised only where the validation data is private" if dp else "") + ")")
    if other:
        parts.append("the further entries its methods declare for their replies (reply_entries,"
                     " each with why it may leave)")
    parts.append(("its public" if dp else "its") + " training-set size and step count")
    leaves = "What leaves client i: " + (", ".join(parts[:-1]) + " and " + parts[-1]
                                         if len(parts) > 1 else parts[0])
    if not dp:
        return (leaves + ". Differential privacy is off: none of it is an accounted mechanism,"
                " no client has a budget and no ledger records the releases.")
    gaussian = [what for sent, what in ((summary, "noised summaries"),
                                        (lam and lam_noised, "noised lambda")) if sent]
    mechanisms = (["DP-SGD for models"] if model else []) + (
        ["the Gaussian mechanism for " + " and ".join(gaussian)] if gaussian else [])
    if mechanisms:
        dp_clause = ("with DP on, each data-dependent one is the output of an accounted"
                     f" mechanism ({', '.join(mechanisms)})"
                     + (" or leaves for its declared reason" if other else ""))
    elif other:
        dp_clause = "with DP on, each data-dependent one leaves for its declared reason"
    else:
        dp_clause = ("with DP on, nothing else leaves it (the sizes are public by the"
                     " neighbouring relation, the step count is fixed by the plan)")
    return (f"{leaves}; {dp_clause}. Published evaluation metrics, and on Flower the evaluation"
            " reports, are listed with the assumptions below.")


def _threat_model(assumptions: dict[str, Any],
                  released: tuple[frozenset[tuple[str, str]], bool]) -> list[str]:
    """The threat model for the run: the DP one, unless its results (or config) say that
    differential privacy was off, which claims no budget, ledger or accounted release. What
    leaves a client is what the run's methods declare (:func:`_leaves_client`)."""
    if assumptions.get("differential_privacy") is False:
        return [THREAT_MODEL_SERVER, _leaves_client(released, dp=False)]
    return [THREAT_MODEL_SERVER + " Clients do not trust it to enforce their budgets.",
            _leaves_client(released, dp=True, validation=assumptions.get("validation_data")),
            *THREAT_MODEL_BUDGETS]


def _released_entries(results: dict[str, Any] | None, cfg: ExperimentConfig | None
                      ) -> tuple[frozenset[tuple[str, str]], bool]:
    """Every ``(stage, entry)`` the run's methods' client replies may carry, and whether that
    is all of them: as results.json's ``privacy.<method>.reply_entries`` declare them (the
    contract both runtimes enforced) where it states them for every method of the run, else
    adding what the registered classes of config.toml's methods declare
    (:func:`~secure_fedora.algorithms.contract.reply_declarations`, the reader results.json's
    statements use). Not all (False) when
    neither tells of some method (no declarations, a method this process has not registered,
    a factory that names no class): the report then names every entry it may carry."""
    declared = _reply_entries(results)
    found = {(r["stage"], r["entry"]) for r in declared["entries"]}
    stated = (results or {}).get("privacy")
    if isinstance(stated, dict) and stated and not declared["not_stated"] \
            and (cfg is None or set(cfg.methods) <= set(stated)):
        return frozenset(found), True
    if cfg is None:
        return frozenset(found), False
    registered = reply_declarations(cfg.methods, cfg)
    return frozenset(found | registered.entries), registered.complete


class ReportError(AuditError):
    """The report cannot be produced (bad output directory, unreadable run files)."""


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` put the report, and the verification it reports."""

    html: Path
    json: Path
    #: The verification the report holds (the one given, or the one it ran).
    verification: VerificationReport


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON, a 4,300+ digit integer
        return None
    return doc if isinstance(doc, dict) else None


def _list(value: Any) -> list[Any]:
    """``value`` when results.json holds a list there, else nothing to show (verify reports
    a malformed results.json; the report still renders)."""
    return value if isinstance(value, list) else []


def _read_config(run_dir: Path) -> ExperimentConfig | None:
    path = run_dir / "config.toml"
    if not path.is_file():
        return None
    try:  # an entry the run's own process registered: verify's findings name it
        return load_run_config(path)[0]
    except ConfigError:
        return None


#: ``assumptions.beyond_config`` of a report of a run without results.json.
BEYOND_CONFIG_UNKNOWN = ("unknown: results.json missing (the assumptions above are those"
                         " config.toml implies; a run states there also what its methods derive"
                         " from their outcome and what its runtime adds)")


def _assumptions(results: dict[str, Any] | None, cfg: ExperimentConfig | None) -> dict[str, Any]:
    """results.json's assumptions; without results.json, every one config.toml implies
    (exactly as a run of it states them) and ``beyond_config`` saying the rest is unknown.
    ``relatedness`` and the notes on relatedness and ``lambda_i`` are FEDORA's: given only
    where the run states ``relatedness`` or config.toml lists a method that computes them
    (:func:`secure_fedora.runtimes.results.uses_relatedness`), never for a run of other
    methods only."""
    stated = results.get("assumptions") if results else None
    stated = stated if isinstance(stated, dict) else {}  # a malformed one: verify reports it
    if results is None and cfg is not None:
        try:
            implied = config_assumptions(cfg)
        except ValueError:  # two methods state one key differently: the run could not start
            implied = {}
        stated = {**implied, "beyond_config": BEYOND_CONFIG_UNKNOWN}
    out: dict[str, Any] = {
        "server": stated.get("server", "honest-but-curious"),
        "validation_data": stated.get("validation_data",
                                      cfg.data.validation if cfg else "unknown"),
        **({"relatedness": stated["relatedness"]} if "relatedness" in stated
           else {"relatedness": cfg.fedora.relatedness}
           if cfg is not None and uses_relatedness(cfg) else {}),
        "differential_privacy": stated.get("differential_privacy",
                                           cfg.privacy.enabled if cfg else "unknown"),
    }
    for key, value in stated.items():
        out.setdefault(key, value)
    notes: list[str] = []
    fedora = "relatedness" in out  # lambda_i and relatedness: a FEDORA method ran
    if fedora and out["validation_data"] == "public":
        notes.append("lambda_i is computed from the validation split in the clear: private only"
                     " if that split is public data (declared public in the config).")
    elif fedora and out["validation_data"] == "private":
        notes.append("lambda_i is released as a clipped, noised validation-loss difference and"
                     " accounted (mechanism gaussian_lambda).")
    rel = str(out.get("relatedness", ""))
    if rel == "plain":
        notes.append("relatedness: summaries are sent in the clear (no privacy for the summary).")
    if "noised" in rel:
        notes.append("relatedness: summaries are top eigenvectors of a Gaussian-noised clipped"
                     " second-moment matrix (accounted as gaussian_summary). DP bounds what a"
                     " summary reveals about any single record; a client's overall data"
                     " direction (mean image, label mix) can remain visible at moderate epsilon"
                     " (measure it with `secure-fedora audit leakage`).")
    if "encrypted" in rel:
        notes.append("relatedness: summaries are CKKS-encrypted; the server learns the q x q"
                     " overlap blocks U_i^T U_j (every inner product of the summary columns, not"
                     " only the similarities). Every client holds the secret key, so this assumes"
                     " the server colludes with no client, holds no secret key and cannot enrol"
                     " clients of its own.")
    if "ckks_parameters" in out or "ckks_keys" in out:  # a method of the run encrypted
        notes.extend(parameter_notes(out.get("ckks_parameters")))
    # without config.toml (a Flower result folder) results.json states the noise mode
    dp = cfg.privacy.enabled if cfg is not None else out["differential_privacy"] is True
    noise = cfg.privacy.noise if cfg is not None else stated.get("noise")
    if dp and noise in ("reproducible", "csprng"):
        if noise == "reproducible":
            notes.append("noise = reproducible: NOT private against anyone who knows the config"
                         " (generators seeded from the experiment seed; `secure-fedora audit"
                         " replay` demonstrates it).")
        else:
            notes.append("noise = csprng: ChaCha20 keystream, key from os.urandom, never stored;"
                         " Gaussians hardened against floating-point attacks (4-draw sum).")
    if out["differential_privacy"] is False:
        notes.append("differential privacy is OFF: releases carry no formal guarantee.")
    out["notes"] = notes
    return out


def _label(method: str | None) -> str:
    return method if method is not None else "(all)"


def _refusal(c: ClientVerification) -> dict[str, Any] | None:
    """The ledger's first refusal: its round, the release kind refused, the epsilon that
    release would have brought the client to and the mechanisms it held, as signed; None
    without one (values not of the documented type are given as None)."""
    entry = next((e for e in c.series if e.mechanism == "refusal"), None)
    if entry is None:
        return None
    p = entry.params
    would = p.get("epsilon_would_be")
    refused = p.get("refused") if isinstance(p.get("refused"), list) else []
    return {"round": entry.round,
            "release_kind": p.get("release_kind") if isinstance(p.get("release_kind"), str)
            else None,
            "epsilon_would_be": _finite_or_none(would),
            "mechanisms": [r["mechanism"] for r in refused
                           if isinstance(r, dict) and isinstance(r.get("mechanism"), str)]}


def _budget_rows(verification: VerificationReport) -> list[dict[str, Any]]:
    """One row per ledger: its budget, recorded and independent epsilon, share used, and
    ``refusal`` (:func:`_refusal`): when and what its budget refused, None if nothing."""
    rows = []
    for c in verification.clients:
        used = (c.final_epsilon / c.budget_epsilon) if c.budget_epsilon else None
        rows.append({
            "method": _label(c.method), "client_id": c.client_id,
            "budget_epsilon": c.budget_epsilon, "delta": c.delta, "accountant": c.accountant,
            "recorded_epsilon": c.final_epsilon,
            "independent_epsilon": c.independent_final_epsilon, "budget_used": used,
            "entries": c.entries, "refused": c.refused, "refusal": _refusal(c),
            "verified": c.ok,
        })
    return rows


def _refused_text(row: dict[str, Any]) -> str:
    """The budget table's "refused" cell: no, or yes with the round, release and epsilon."""
    refusal = row.get("refusal")
    if not row.get("refused") or not isinstance(refusal, dict):
        return _fmt(row.get("refused"))
    what = ", ".join(refusal.get("mechanisms") or []) or refusal.get("release_kind") or "a release"
    would = refusal.get("epsilon_would_be")
    return _e(f"yes: round {refusal.get('round')} ({what}"
              + (f", would reach epsilon {format_up(would, 4)}" if would is not None else "")
              + ")")


def _epsilon_series(verification: VerificationReport) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per method, per client: the cumulative recorded epsilon at the end of each round."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for c in verification.clients:
        by_round: dict[int, dict[str, Any]] = {}
        for e in c.series:
            if e.round is None or e.recorded_epsilon is None:
                continue
            point = by_round.setdefault(e.round, {"round": e.round})
            point["epsilon"] = e.recorded_epsilon
            if e.independent_epsilon is not None:
                point["independent_epsilon"] = e.independent_epsilon
            point["budget"] = e.budget_epsilon
        out.setdefault(_label(c.method), {})[c.client_id] = [by_round[r] for r in sorted(by_round)]
    return out


def _mechanism_rows(verification: VerificationReport) -> list[dict[str, Any]]:
    agg: dict[tuple[str, str], dict[str, Any]] = {}
    for c in verification.clients:
        for name, m in c.mechanisms.items():
            key = (_label(c.method), name)
            row = agg.setdefault(key, {"method": key[0], "mechanism": name, "clients": 0,
                                       "entries": 0, "steps": 0, "noise_multipliers": set(),
                                       "sample_rates": set(), "clip_norms": set()})
            row["clients"] += 1
            row["entries"] += m["entries"]
            row["steps"] += m["steps"]
            row["noise_multipliers"].update(m["noise_multipliers"])
            row["sample_rates"].update(m["sample_rates"])
            row["clip_norms"].update(m["clip_norms"])
    return [{**agg[k], **{f: sorted(agg[k][f]) for f in
                          ("noise_multipliers", "sample_rates", "clip_norms")}}
            for k in sorted(agg)]


def _signers(verification: VerificationReport) -> list[dict[str, Any]]:
    """Who signed what, by key: one row per party whose key the verification checked a
    signature under (each client's ledgers, the anchor's signer), with its Ed25519 public key
    (hex; None where the allowlist in use holds none for a client), what it signed,
    ``verified``: every one of those signatures verifies under that key (no ``signature`` or
    ``key`` finding for the ledger; the anchor's own), and ``registered``: the allowlist in
    use registers that key for that party."""
    bad = {(f.method, f.client_id) for f in verification.findings
           if f.check in ("signature", "key") and f.client_id is not None}
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    for c in verification.clients:
        row = rows.setdefault((c.client_id, c.signer_key), {
            "party_id": c.client_id, "ed25519": c.signer_key, "signed": [],
            "verified": c.signer_key is not None, "registered": c.signer_key is not None})
        row["signed"].append(f"ledger {_label(c.method)}/{c.client_id}")
        row["verified"] = row["verified"] and (c.method, c.client_id) not in bad
    out = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] or ""))]
    signer = verification.anchor_signer
    if signer is not None:  # given only for an anchor whose signature verifies
        out.append({"party_id": signer["party_id"], "ed25519": signer["ed25519"],
                    "signed": [f"anchor {signer['file']}"], "verified": True,
                    "registered": signer["allowlisted"]})
    return out


#: A release of ``privacy.<method>.plan[].releases``: "<mechanism> x<steps> (...)".
_PLANNED_RELEASE = re.compile(r"(\S+) x(\d+) \(")


def _planned_counts(method: str, cfg: ExperimentConfig | None,
                    results: dict[str, Any] | None) -> dict[str, int] | None:
    """Per mechanism, a client's planned steps or releases of ``method``: from config.toml,
    else from the plan results.json records (None when neither gives one plan)."""
    if cfg is not None:
        try:
            return planned_release_counts(cfg, method)
        except (ConfigError, ValueError, KeyError):  # a method this config cannot plan
            return None
    body = ((results or {}).get("privacy") or {}).get(method)
    plans = []
    for row in _list(body.get("plan") if isinstance(body, dict) else None):
        releases = _list(row.get("releases")) if isinstance(row, dict) else []
        found: dict[str, int] = {}
        for text in releases:
            match = _PLANNED_RELEASE.match(text) if isinstance(text, str) else None
            if match is None:
                return None
            found[match[1]] = found.get(match[1], 0) + int(match[2])
        plans.append(found)
    if not plans or any(p != plans[0] for p in plans):
        return None
    return plans[0]


def _repeated_releases(verification: VerificationReport, cfg: ExperimentConfig | None,
                       results: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per client ledger and mechanism whose ledger records more of it than the run's
    plan holds for a client (config.toml's methods and rounds,
    :func:`secure_fedora.secure.private.planned_release_counts`): a release redone after a
    crash (e.g. a noised summary drawn again on Flower) is accounted twice, and ``text`` says
    so in words. Without config.toml (an audit folder of a Flower run) the plan is the one
    results.json records (``privacy.<method>.plan``'s releases). Nothing for a ledger whose
    method has neither."""
    counts: dict[str, dict[str, int] | None] = {}
    rows = []
    for c in verification.clients:
        method = c.method
        if method is None and cfg is not None and len(cfg.methods) == 1:
            method = cfg.methods[0]
        if method is None:
            continue
        if method not in counts:
            counts[method] = _planned_counts(method, cfg, results)
        planned = counts[method]
        if planned is None:
            continue
        for mechanism, m in sorted(c.mechanisms.items()):
            done, plan = int(m["steps"]), planned.get(mechanism, 0)
            if done <= plan:
                continue
            unit = "steps" if mechanism == "dpsgd" else "times"
            what = (f"took {done} DP-SGD steps in {m['entries']} releases" if unit == "steps"
                    else f"released {done} times")
            accounted = ((("both" if done == 2 else "all") + " accounted in its epsilon")
                         if c.ok else "its ledger failed verification")
            rows.append({"method": method, "client_id": c.client_id, "mechanism": mechanism,
                         "released": done, "planned": plan, "unit": unit, "verified": c.ok,
                         "text": f"{method}: {c.client_id}: {mechanism} {what} (plan: {plan}),"
                                 f" {accounted}"})
    return rows


def _accuracy(results: dict[str, Any] | None) -> dict[str, Any]:
    """The selected test metric per method and client ("metric": accuracy or auc).

    Guarantee: every figure is a finite float or None (a non-numeric value in results.json
    is shown as missing, never passed to the plot); ``stale`` lists each client whose
    selected metric is from an earlier round than the selected one (``selected.stale_clients``)
    and ``final_stale`` each client whose final metric is from an earlier round than the
    method's last (``final.stale_clients``); ``unmeasured`` the evaluated rounds each method's
    model selection did not consider, as some client had no measured metric yet
    (``selected.unmeasured_rounds``)."""
    metric = str(results.get("metric", "accuracy")) if isinstance(results, dict) else "accuracy"
    if not results or not isinstance(results.get("methods"), dict):
        return {"metric": metric, "methods": [], "per_client": [], "stale": [],
                "final_stale": [], "unmeasured": []}
    methods = []
    unmeasured: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    final_stale: list[dict[str, Any]] = []
    per_client: dict[int, dict[str, Any]] = {}
    for name, body in results["methods"].items():
        sel = body.get("selected") if isinstance(body, dict) else None
        if not isinstance(sel, dict):
            continue
        methods.append({"method": name, **{k: _finite_or_none(sel.get(k)) for k in
                                           ("mean", "min", "max", "std", "round")}})
        for i, acc in enumerate(_list(sel.get("per_client"))):
            # a dict, list or string there is no figure (verify flags the file): shown as "-"
            per_client.setdefault(i, {"client": i})[name] = _finite_or_none(acc)
        stale.extend({"method": name, "client": e.get("client"), "round": e.get("round"),
                      "selected_round": sel.get("round")}
                     for e in _list(sel.get("stale_clients")) if isinstance(e, dict))
        skipped = [r for r in _list(sel.get("unmeasured_rounds")) if isinstance(r, int)]
        if skipped:
            unmeasured.append({"method": name, "rounds": skipped})
        final = body.get("final")
        if isinstance(final, dict):
            final_stale.extend({"method": name, "client": e.get("client"),
                                "round": e.get("round"), "final_round": body.get("rounds")}
                               for e in _list(final.get("stale_clients")) if isinstance(e, dict))
    ids = client_ids(len(per_client))
    rows = [{**per_client[i], "client_id": ids[i]} for i in sorted(per_client)]
    return {"metric": metric, "methods": methods, "per_client": rows, "stale": stale,
            "final_stale": final_stale, "unmeasured": unmeasured}


def _privacy_plan(results: dict[str, Any] | None) -> dict[str, Any]:
    """The runtime's DP plan rows and budget events per method, as recorded in results.json.

    Guarantee: ``events`` holds every event results.json records, once: each method's refused
    releases (``privacy.<method>.events``, both runtimes) and a runtime's run-level ones
    (``events``: on Flower an error reply, a missed exchange, a refused release, each naming
    its method; a refusal that its method's events list already is not repeated);
    ``note`` (:data:`PLANNED_EPSILON_NOTE`) where there is a plan row."""
    plan: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    listed: set[tuple[str, int, int] | None] = set()  # each refusal's _refusal_key
    privacy = (results or {}).get("privacy")
    if isinstance(privacy, dict):
        for method, body in privacy.items():
            if not isinstance(body, dict):
                continue
            for row in _list(body.get("plan")):
                if isinstance(row, dict):
                    plan.append({"method": method, **row})
            index = {row.get("client"): row.get("index") for row in _list(body.get("clients"))
                     if isinstance(row, dict) and isinstance(row.get("client"), str)}
            for ev in _list(body.get("events")):
                if isinstance(ev, dict):
                    events.append({"method": method, **ev})
                    if ev.get("event") == "refused" and isinstance(ev.get("client"), str):
                        listed.add(_refusal_key(method, ev.get("round"), index.get(ev["client"])))
    listed.discard(None)
    events.extend(ev for ev in _list((results or {}).get("events")) if isinstance(ev, dict)
                  and not (str(ev.get("event", "")).startswith(RUN_LEVEL_REFUSAL)
                           and _refusal_key(ev.get("method"), ev.get("round"), ev.get("client"))
                           in listed))
    return {"plan": plan, "events": events, **({"note": PLANNED_EPSILON_NOTE} if plan else {})}


#: How a Flower run's run-level event of a refused release begins.
RUN_LEVEL_REFUSAL = "refused its release ("


def _refusal_key(method: Any, rnd: Any, client: Any) -> tuple[str, int, int] | None:
    """``(method, round, client index)`` of a refusal, None where one is not of those types."""
    if isinstance(method, str) and all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in (rnd, client)):
        return method, rnd, client
    return None


def _resumes(results: dict[str, Any] | None,
             cfg: ExperimentConfig | None) -> list[dict[str, Any]]:
    """Each resume of an interrupted run that results.json records (``privacy.<method>.
    resumes``, anchored with it): the round it continued after (None: from the start), the
    rounds whose recorded releases it re-made from the release journals (with the clients:
    every other release was made anew), the rounds from there to the configured last with no
    re-made release, trained anew (round 0, the summaries, when it resumed from the start;
    None without config.toml), and a ``text`` in words. Malformed records are skipped."""
    out: list[dict[str, Any]] = []
    privacy = (results or {}).get("privacy")
    last = cfg.training.rounds if cfg is not None else None
    for method, body in (privacy.items() if isinstance(privacy, dict) else []):
        for r in _list(body.get("resumes") if isinstance(body, dict) else None):
            after = r.get("after_round") if isinstance(r, dict) else -1
            if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
                continue
            remade = [{"round": x["round"], "clients": [str(c) for c in _list(x.get("clients"))]}
                      for x in _list(r.get("remade_from_journal")) if isinstance(x, dict)
                      and isinstance(x.get("round"), int) and not isinstance(x["round"], bool)]
            first = 0 if after is None else after + 1
            anew = None if last is None else [
                n for n in range(first, last + 1) if n not in {x["round"] for x in remade}]
            start = "from the start (no checkpoint)" if after is None \
                else f"after round {after}'s checkpoint"
            said = "; ".join(f"round {x['round']} ({', '.join(x['clients'])})" for x in remade)
            text = (f"{method}: interrupted and resumed {start}; releases re-made from the"
                    " release journals (recorded before the interruption, accounted once): "
                    + (said or "none"))
            text += f"; every other release from round {first} on was made anew (fresh noise)"
            if anew:
                text += (", round" if len(anew) == 1 else ", rounds") + " " \
                    + ", ".join(str(n) for n in anew) + " entirely"
            out.append({"method": method, "after_round": after, "remade_from_journal": remade,
                        "trained_anew": anew, "text": text})
    return out


#: What the report says of the methods' declared reply entries (report.json and the page).
REPLY_ENTRIES_NOTE = (
    "Declared, not verified: each method declares (reply_entries) every entry its clients' "
    "replies may carry beyond the accounted releases, with why it may leave the client; both "
    "runtimes refuse a reply carrying anything else, but audit verify does not check these "
    "reasons (they are claims, not figures). An entry no built-in method declares with that "
    "reason is the method's own claim: an assumption to review.")


def _reply_entries(results: dict[str, Any] | None) -> dict[str, Any]:
    """The entries each method's client replies may carry, per exchange, with their reasons,
    as results.json's ``privacy.<method>.reply_entries`` states them (a DP run).

    Guarantee: every stated entry is a row, ``review`` true unless results.json marks it
    ``built_in`` (the method's own claim); a DP method whose results.json states none (an
    older version's, or malformed) is listed under ``not_stated``, never shown as empty."""
    rows: list[dict[str, Any]] = []
    not_stated: list[str] = []
    privacy = (results or {}).get("privacy")
    for method, body in (privacy.items() if isinstance(privacy, dict) else ()):
        declared = body.get("reply_entries") if isinstance(body, dict) else None
        if not isinstance(declared, dict) or not all(isinstance(e, dict)
                                                     for e in declared.values()):
            not_stated.append(str(method))
            continue
        for stage, entries in declared.items():
            for entry, about in entries.items():
                about = about if isinstance(about, dict) else {}
                built_in = about.get("built_in") is True
                rows.append({"method": method, "stage": stage, "entry": entry,
                             "reason": about.get("reason"), "built_in": built_in,
                             "review": not built_in})
    return {"status": "declared, not verified", "note": REPLY_ENTRIES_NOTE, "entries": rows,
            "not_stated": not_stated}


#: The empirical audits the report shows, with the command that produces each one's JSON.
EMPIRICAL_AUDITS: tuple[tuple[str, str, str], ...] = (
    ("canary", "canary membership inference (black-box, the client's released models)",
     "secure-fedora audit canary RUN_DIR"),
    ("whitebox", "white-box DP-SGD, one run (Dirac gradient canaries)",
     "secure-fedora audit whitebox RUN_DIR"),
    ("replay", "config-known noise replay", "secure-fedora audit replay RUN_DIR"),
)


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond float range: no finite figure
        return math.inf if value > 0 else -math.inf


def _finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    number = _number_or_none(value)
    return number if number is not None and math.isfinite(number) else None


def _audit_number_problems(doc: dict[str, Any]) -> list[str]:
    """What is wrong with the figures of an audit document (NaN, infinity, not numbers)."""
    out = []
    for key in ("certifiable_max", "lower_bound", "confidence", "claim_epsilon"):
        value = doc.get(key)
        if key == "claim_epsilon" and value is None:
            continue  # no claim: a non-private run
        number = _finite_or_none(value)
        if number is None:
            out.append(f"{key} is {value!r}, not a finite number")
        elif key == "confidence" and not 0 < number < 1:
            out.append(f"confidence {number!r} is not in (0, 1)")
        elif number < 0:
            out.append(f"{key} {number!r} is negative")
    return out


def _same_dir(named: Any, run: Path) -> bool:
    """False only when ``named`` is an existing directory other than ``run`` (a run that was
    moved since its audit names a path that no longer exists: not evidence of another run)."""
    if not isinstance(named, str):
        return False
    path = Path(named)
    try:
        return not path.is_dir() or path.samefile(run)
    except OSError:
        return True


def _planned_dpsgd_steps(cfg: ExperimentConfig | None) -> int | None:
    """A client's planned DP-SGD steps over the run (every round), from the run's config;
    None without a config or one that cannot give it."""
    if cfg is None:
        return None
    try:
        return steps_per_round(cfg) * cfg.training.rounds
    except (ValueError, ZeroDivisionError, ConfigError):
        return None


def _audit_claim_problems(name: str, doc: dict[str, Any], run: Path,
                          cfg: ExperimentConfig | None,
                          verification: VerificationReport) -> tuple[str, list[str]]:
    """("invalid" | "unverified" | "run", problems) of an audit document measured against
    the verified run: it must name this run, and its claim must be that of a verified ledger
    (replay, canary: the ledger's final epsilon; white-box: the epsilon of the DP-SGD
    releases the ledger records, :func:`audits.verify.dpsgd_claim_problem`), within the
    verifier's rel_tol. A white-box ``setup.steps`` other than None or a non-negative
    integer (a bool, a float, a string), or other than the steps config.toml plans, makes
    the document invalid."""
    setup = doc.get("setup") if isinstance(doc.get("setup"), dict) else {}
    invalid: list[str] = []
    if "run_dir" in setup and not _same_dir(setup["run_dir"], run):
        invalid.append(f"setup.run_dir names another run ({setup['run_dir']!r})")
    if name == "whitebox" and cfg is not None and "config" in setup \
            and setup["config"] != cfg.name:
        invalid.append(f"setup.config names config {setup['config']!r}, this run's is"
                       f" {cfg.name!r}")
    claim = doc.get("claim_epsilon")
    if not verification.clients:
        if claim is not None:
            return "unverified", [*invalid, f"claims epsilon {claim!r} but the run has no"
                                  " verified ledger"]
        return ("invalid", invalid) if invalid else ("run", [])
    method, client = setup.get("method"), setup.get("client", setup.get("client_id"))
    where = f"{method}/{client}"
    if claim is None:
        return "invalid", [*invalid, f"claims no epsilon, but {where} of this DP run has ledgers"]
    ledger = next((c for c in verification.clients
                   if c.method == method and c.client_id == client), None)
    if ledger is None:
        return "unverified", [*invalid, f"setup names no ledger of this run ({where})"]
    if not ledger.ok:
        return "unverified", [*invalid, f"ledger {where} failed verification: its epsilon is"
                              " not a verified claim"]
    spent, tol = ledger.final_epsilon, verification.rel_tol
    if name == "whitebox":
        # the claim is the plan's DP-SGD releases' epsilon: the ledger's DP-SGD entries must
        # give it (fewer of them only for a client not drawn every round or refused a release)
        steps = setup.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 0):
            # a bool is an int to Python: True would pass as a plan of 1 step
            return "invalid", [*invalid, f"setup.steps is {steps!r}, not a step count"]
        planned = _planned_dpsgd_steps(cfg)
        if steps is not None and planned is not None and steps != planned:
            # a larger count would let a claim above the ledger's DP-SGD epsilon pass
            return "invalid", [*invalid, f"setup.steps {steps} is not the {planned} DP-SGD"
                               " steps config.toml plans"]
        problem = None if ledger.delta is None else dpsgd_claim_problem(
            claim, [{"mechanism": e.mechanism, "params": e.params} for e in ledger.series],
            ledger.delta, ledger.accountant, steps, tol)
        if ledger.delta is None or problem is not None:
            invalid.append(f"ledger {where}: {problem or 'it records no delta'}")
    elif abs(claim - spent) > tol * spent:
        shown, verified = format_ordered(claim, spent)
        invalid.append(f"claim {shown} differs from the verified epsilon {verified} of"
                       f" ledger {where}")
    return ("invalid", invalid) if invalid else ("run", [])


def _empirical_audits(run: Path, cfg: ExperimentConfig | None,
                      verification: VerificationReport) -> list[dict[str, Any]]:
    """One row per audit from ``RUN_DIR/audit/<name>.json``: ``"not run"`` when the file is
    absent, ``"unreadable"`` when it is not that audit's document; ``attacked``: the
    ``method/client`` whose claim the document tested (each audit picks its own), else None.

    Guarantee: ``status == "run"`` (a verdict shown as the audit's) only when every figure is
    finite, the recorded verdict is the one :func:`audits.verdict.audit_verdict` gives for the
    document's own numbers, and the document names this run and a verified ledger's claim
    (see :func:`_audit_claim_problems`); otherwise ``"invalid"`` or ``"unverified"`` with the
    reasons in ``problems``, ``verdict`` None and the document's in ``recorded_verdict``."""
    rows = []
    for name, title, command in EMPIRICAL_AUDITS:
        row: dict[str, Any] = {"audit": name, "title": title, "command": command,
                               "status": "not run", "claim_epsilon": None,
                               "certifiable_max": None, "lower_bound": None, "verdict": None,
                               "verdict_text": None, "confidence": None,
                               "recorded_verdict": None, "problems": [], "attacked": None}
        path = run / "audit" / f"{name}.json"
        if path.exists():
            doc = _read_json(path)
            if doc is None or doc.get("audit") != name \
                    or doc.get("verdict") not in ("refuted", "consistent", "inconclusive"):
                row["status"] = "unreadable"
                row["verdict_text"] = f"{path.name} is not a valid {name} audit document"
                rows.append(row)
                continue
            row["recorded_verdict"] = doc["verdict"]
            setup = doc.get("setup") if isinstance(doc.get("setup"), dict) else {}
            method, client = setup.get("method"), setup.get("client", setup.get("client_id"))
            if isinstance(method, str) and isinstance(client, str):
                row["attacked"] = f"{method}/{client}"  # whose claim: each audit picks its own
            for key in ("claim_epsilon", "certifiable_max", "lower_bound", "confidence"):
                row[key] = _finite_or_none(doc.get(key))
            problems = _audit_number_problems(doc)
            status = "invalid" if problems else "run"
            if not problems:
                recomputed = audit_verdict(row["claim_epsilon"], row["certifiable_max"],
                                           row["lower_bound"])
                if recomputed != doc["verdict"]:
                    status = "invalid"
                    problems.append(f"records verdict {doc['verdict']!r}, its own numbers give"
                                    f" {recomputed!r}")
                else:
                    status, more = _audit_claim_problems(name, doc, run, cfg, verification)
                    problems.extend(more)
            row["status"], row["problems"] = status, problems
            if status == "run":
                row.update(verdict=doc["verdict"], verdict_text=verdict_text(
                    doc["verdict"], row["claim_epsilon"], row["certifiable_max"],
                    row["lower_bound"]))
            else:
                row["verdict_text"] = (f"{path.name} is not a valid {name} result for this run:"
                                       f" {'; '.join(problems)} (it records verdict"
                                       f" {doc['verdict']!r})")
        rows.append(row)
    return rows


#: ``privacy_config`` value of a noise multiplier config.toml leaves unset in a DP run: the
#: run calibrates it per budget (the report's privacy plan states each).
CALIBRATED = "calibrated"
#: Keys of ``[privacy]`` that config.toml may leave unset (None), each then resolved by the run.
_RESOLVED_KEYS = ("sample_rate", "noise_multiplier", "summary_noise_multiplier",
                  "lambda_noise_multiplier", "model_selection")


def _privacy_config(cfg: ExperimentConfig | None) -> dict[str, Any] | None:
    """config.toml's ``[privacy]`` with the values the run used: each per-client override with
    the delta that applies to it (an override without one has the default ``privacy.delta``,
    not none), and each key config.toml leaves unset resolved as the run resolves it, its name
    listed in ``defaults``: ``model_selection`` (:func:`secure_fedora.core.config.model_selection`)
    and, with privacy on, ``sample_rate`` (:func:`secure_fedora.secure.private.sample_rate_for`)
    and the noise multipliers (:data:`CALIBRATED`: per budget, as the privacy plan states).
    With privacy off the sample rate and noise multipliers are unused and stay None. A
    plug-in mechanism's table keeps the one of ``noise_multiplier`` and ``budget_fraction``
    it sets."""
    if cfg is None:
        return None
    p = cfg.privacy
    out = p.model_dump(mode="json")
    for override in out.get("overrides", {}).values():
        if override.get("delta") is None:
            override["delta"] = p.delta
    for table in out.get("mechanisms", {}).values():
        for key in ("noise_multiplier", "budget_fraction"):
            if table.get(key) is None:  # exactly one of the two is set (config check)
                table.pop(key, None)
    resolved = {"model_selection": model_selection(cfg)}
    if p.enabled:
        resolved |= {"sample_rate": sample_rate_for(cfg), "noise_multiplier": CALIBRATED,
                     "summary_noise_multiplier": CALIBRATED,
                     "lambda_noise_multiplier": CALIBRATED}
    defaults = [k for k in _RESOLVED_KEYS if out.get(k) is None and k in resolved]
    for key in defaults:
        out[key] = resolved[key]
    out["defaults"] = defaults
    return out


def _privacy_config_value(key: str, value: Any, defaults: Sequence[str]) -> str:
    """One ``key=value`` of the privacy configuration line: a key config.toml leaves unset as
    ``default (<what the run used>)``, never "None" for a value the run had."""
    if key not in defaults:
        return f"{key}=" + ("unset (unused: privacy off)" if value is None else str(value))
    if value == CALIBRATED:
        return f"{key}=default (calibrated per budget: see the privacy plan)"
    return f"{key}=default ({value})"


def _verification(run_dir: str | Path, verification: VerificationReport | None, *,
                  allowlist: str | Path | None, anchor: str | Path | None, rel_tol: float,
                  pld_checkpoints: int, imports: Sequence[str], strict: bool,
                  options: Mapping[str, str]) -> VerificationReport:
    """``verification``, else :func:`audits.verify.verify_run` of ``run_dir`` with the other
    arguments (the call ``audit verify`` makes). ReportError for a missing run directory or
    allowlist, and for ``verification`` given together with any verification argument."""
    run = check_path(run_dir, "run_dir", ReportError)
    if verification is not None:
        given = [name for name, differs in (
            ("allowlist", allowlist is not None), ("anchor", anchor is not None),
            ("rel_tol", rel_tol is not DEFAULT_REL_TOL and rel_tol != DEFAULT_REL_TOL),
            ("pld_checkpoints", pld_checkpoints is not DEFAULT_PLD_CHECKPOINTS
             and pld_checkpoints != DEFAULT_PLD_CHECKPOINTS),
            ("imports", isinstance(imports, str) or bool(imports)), ("strict", strict is not False),
            ("options", options is not API_AUDIT_OPTIONS)) if differs]
        if given:
            raise ReportError(f"verification= was given together with {'=, '.join(given)}=:"
                              " those apply only when the report runs the verification; pass"
                              " them to audits.verify.verify_run, or leave out verification=")
    if allowlist is not None:
        check_path(allowlist, "allowlist", ReportError, "file")
    problem = path_problem(run)
    if problem is not None:
        raise ReportError(f"run directory {run} {problem}")
    if verification is not None:
        return verification
    return verify_run(run, allowlist=allowlist, anchor=anchor, rel_tol=rel_tol,
                      pld_checkpoints=pld_checkpoints, imports=imports, strict=strict,
                      options=options)


def build_report(run_dir: str | Path, *, verification: VerificationReport | None = None,
                 allowlist: str | Path | None = None, anchor: str | Path | None = None,
                 rel_tol: float = DEFAULT_REL_TOL,
                 pld_checkpoints: int = DEFAULT_PLD_CHECKPOINTS,
                 imports: Sequence[str] = (), strict: bool = False,
                 options: Mapping[str, str] = API_AUDIT_OPTIONS) -> dict[str, Any]:
    """The report document (what ``report.json`` holds) for ``run_dir``.

    Runs :func:`audits.verify.verify_run` with ``allowlist``, ``anchor``, ``rel_tol``,
    ``pld_checkpoints``, ``imports`` (trusted modules, never one inside ``run_dir``),
    ``strict`` and ``options`` unless ``verification`` is given: exactly what ``audit verify``
    and ``audit report`` with the same flags check. Given a ``verification``, passing any of
    those as well is a :class:`ReportError` (they would be silently ignored; pass them to
    ``verify_run``). Guarantee: every client with a ledger appears in the budget table and the
    epsilon series.
    """
    verification = _verification(run_dir, verification, allowlist=allowlist, anchor=anchor,
                                  rel_tol=rel_tol, pld_checkpoints=pld_checkpoints,
                                  imports=imports, strict=strict, options=options)
    run = check_path(run_dir, "run_dir", ReportError)
    results = _read_json(run / "results.json")
    cfg = _read_config(run)
    identity = {
        "name": (results or {}).get("name", cfg.name if cfg else None),
        "config_hash": (results or {}).get("config_hash"),
        "code_version": (results or {}).get("version"),
        "data_fingerprint": (results or {}).get("data_fingerprint"),
        "run_dir": str(run.resolve()),
        # config.toml's methods, else those with ledgers (a Flower audit folder has no config)
        "methods": list(cfg.methods) if cfg is not None else sorted(
            {c.method for c in verification.clients if c.method is not None}) or None,
        "runtime": (results or {}).get("runtime"),
    }
    privacy_cfg = _privacy_config(cfg)
    assumptions = _assumptions(results, cfg)
    return {
        "report_version": REPORT_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "identity": identity,
        "threat_model": _threat_model(assumptions, _released_entries(results, cfg)),
        "assumptions": assumptions,
        "privacy_config": privacy_cfg,
        "budgets": _budget_rows(verification),
        "epsilon_series": _epsilon_series(verification),
        "mechanisms": _mechanism_rows(verification),
        "repeated_releases": _repeated_releases(verification, cfg, results),
        "verification": verification.to_json(),
        "signers": _signers(verification),
        "privacy_plan": _privacy_plan(results),
        "resumes": _resumes(results, cfg),
        "reply_entries": _reply_entries(results),
        "accuracy": _accuracy(results),
        "empirical_audits": _empirical_audits(run, cfg, verification),
    }


# --------------------------------------------------------------------------- plots


def _png_base64(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plotted_series(series: dict[str, dict[str, list[dict[str, Any]]]]
                    ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Each method's clients that have a point to plot, methods without any left out."""
    out = {m: {cid: pts for cid, pts in series[m].items() if pts} for m in sorted(series)}
    return {m: clients for m, clients in out.items() if clients}


def _summarised(count: int) -> bool:
    return count > PLOT_CLIENTS_MAX


def _epsilon_bands(clients: dict[str, list[dict[str, Any]]]
                   ) -> tuple[list[int], dict[str, list[float]]]:
    """Per round, over the clients that have released by then, the min, 5th percentile,
    median, 95th percentile and max of their cumulative epsilon (a client's last value up
    to that round: one that sat a round out has spent what it had)."""
    rounds = sorted({p["round"] for pts in clients.values() for p in pts})
    at = {r: k for k, r in enumerate(rounds)}
    spent = np.full((len(clients), len(rounds)), np.nan)
    for row, pts in enumerate(clients.values()):
        for p in pts:
            spent[row, at[p["round"]]] = p["epsilon"]
        seen = ~np.isnan(spent[row])
        first = int(np.argmax(seen))
        # carry each value forward to the rounds after it without a point
        idx = np.where(seen, np.arange(len(rounds)), 0)
        np.maximum.accumulate(idx, out=idx)
        spent[row, first:] = spent[row, idx[first:]]
    stats: dict[str, list[float]] = {n: [] for n in ("min", "p5", "median", "p95", "max")}
    for k in range(len(rounds)):
        col = spent[:, k][~np.isnan(spent[:, k])]
        for name, q in (("min", 0), ("p5", 5), ("median", 50), ("p95", 95), ("max", 100)):
            stats[name].append(float(np.percentile(col, q)))
    return rounds, stats


def _budget_lines(ax: Any, budgets: Sequence[dict[str, Any]], method: str) -> None:
    seen: set[float] = set()
    for row in budgets:
        b = row["budget_epsilon"]
        if row["method"] != method or b is None or b in seen:
            continue
        seen.add(b)
        ax.axhline(b, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"budget {format_exact(b)}", xy=(0.0, b),
                    xycoords=("axes fraction", "data"),
                    xytext=(3, 3), textcoords="offset points", fontsize=8)


def _epsilon_plot(series: dict[str, dict[str, list[dict[str, Any]]]],
                  budgets: Sequence[dict[str, Any]]) -> str | None:
    plotted = _plotted_series(series)
    if not plotted:
        return None
    methods = list(plotted)
    fig, axes = plt.subplots(len(methods), 1, figsize=(8, 3.6 * len(methods)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, method in zip(axes[:, 0], methods, strict=True):
        clients = plotted[method]
        if _summarised(len(clients)):
            rounds, st = _epsilon_bands(clients)
            ax.fill_between(rounds, st["min"], st["max"], color="tab:blue", alpha=0.15,
                            linewidth=0, label="min to max")
            ax.fill_between(rounds, st["p5"], st["p95"], color="tab:blue", alpha=0.3,
                            linewidth=0, label="5% to 95%")
            ax.plot(rounds, st["median"], marker="o", markersize=3, color="tab:blue",
                    label="median")
            ax.set_title(f"{method}: privacy spent by its {len(clients)} clients against"
                         " their budgets (summary)")
            ax.legend(fontsize=7, loc="best")
        else:
            for k, (cid, points) in enumerate(sorted(series[method].items())):
                if points:
                    ax.plot([p["round"] for p in points], [p["epsilon"] for p in points],
                            marker="o", markersize=3, color=cmap(k % 20), label=cid)
            ax.set_title(f"{method}: privacy spent per client against its budget")
            if len(series[method]) <= 20:
                ax.legend(fontsize=7, ncol=2, loc="lower right")
        _budget_lines(ax, budgets, method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative epsilon")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_base64(fig)


def _accuracy_plot(accuracy: dict[str, Any]) -> str | None:
    rows = accuracy["per_client"]
    if not rows:
        return None
    methods = [m["method"] for m in accuracy["methods"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    name = metric_label(accuracy.get("metric"))
    if _summarised(len(rows)):
        for method in methods:
            ys = sorted(r[method] for r in rows if r.get(method) is not None)
            if ys:  # each client's rank among those measured, as a share of them
                xs = [(k + 0.5) / len(ys) for k in range(len(ys))]
                ax.plot(xs, ys, label=f"{method} ({len(ys)} clients)")
        ax.set_xlabel("share of clients (sorted by their figure)")
        ax.set_xlim(0, 1)
        ax.set_title(f"Personalized test {name} of {len(rows)} clients, sorted")
        ax.grid(alpha=0.3)
    else:
        width = 0.8 / max(len(methods), 1)
        for k, method in enumerate(methods):
            xs = [r["client"] + k * width for r in rows if r.get(method) is not None]
            ys = [r[method] for r in rows if r.get(method) is not None]
            ax.bar(xs, ys, width=width, label=method)
        ax.set_xlabel("client")
        ax.set_title(f"Personalized test {name} per client")
        ax.grid(alpha=0.3, axis="y")
    ax.set_ylabel(f"test {name} (selected)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _png_base64(fig)


def _epsilon_caption(series: dict[str, dict[str, list[dict[str, Any]]]]) -> str | None:
    """What the epsilon plot summarises, where it summarises; None where it draws every client."""
    counts = {m: len(c) for m, c in _plotted_series(series).items() if _summarised(len(c))}
    if not counts:
        return None
    each = "; ".join(f"{_e(m)}: {n:,} clients" for m, n in counts.items())
    return (f"Summary of many clients ({each}): per round, the median of the clients' "
            "cumulative recorded \u03b5 (a client's last value up to that round, among those"
            " that have released), the band from the 5th to the 95th percentile and the range"
            f" from the least to the most; a method of at most {PLOT_CLIENTS_MAX} clients has a"
            " line per client. The budget table above lists every client.")


def _accuracy_caption(accuracy: dict[str, Any], metric_name: str) -> str | None:
    rows = accuracy["per_client"]
    if not rows or not _summarised(len(rows)):
        return None
    return (f"Summary of {len(rows):,} clients: each method's {_e(metric_name)} values,"
            " sorted from the lowest to the highest (the x-axis is the share of the clients"
            " with a figure); the table above lists every client.")


# --------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#1d2330;padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:2px solid #dde3ea;
padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #cfd6df;padding:.3em .6em;text-align:right}
th{background:#eef2f6}td.l,th.l{text-align:left}
.ok{color:#0a7a2f;font-weight:bold}.bad{color:#b00020;font-weight:bold}.warn{color:#a15c00}
.verdict{font-size:1.3em;padding:.5em 1em;border-radius:6px;display:inline-block;margin:.5em 0}
.verdict.ok{background:#e3f5e9}.verdict.bad{background:#fde7ea}.verdict.warn{background:#fff4e0}
code{background:#f3f5f8;padding:0 .25em;border-radius:3px;font-size:.92em}
img{max-width:100%;border:1px solid #e2e6eb}
.muted{color:#5a6472;font-size:.9em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _identity_value(report: dict, key: str, code: bool = False) -> str:
    """The run identity's ``key`` as an HTML cell: its value, or, where results.json records
    none, why (never the text "None", which read as a recorded value)."""
    value = (report.get("identity") or {}).get(key)
    if value is not None:
        return f"<code>{_e(value)}</code>" if code else _e(value)
    if key == "data_fingerprint" and "data_fingerprint" in (report.get("assumptions") or {}):
        return "not recorded (see the data_fingerprint assumption below)"
    return "not recorded in results.json"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "&ndash;"
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return _e(", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value))
    return _e(value)


def _fmt_exact(value: Any) -> str:
    """A parameter of the privacy claim (a budget, delta, noise multiplier, sample rate or
    clip norm, or a list of them) exactly as the ledger or results.json holds it (the float's
    shortest round-trip form): rounding either way can state a stronger claim than recorded
    (a smaller delta or sample rate, a larger noise multiplier)."""
    if isinstance(value, list):
        return _e(", ".join(repr(v) if isinstance(v, float) else str(v) for v in value))
    if isinstance(value, float) and not math.isnan(value):
        return _e(repr(value))
    return _fmt(value)


def _fmt_up(value: Any, decimals: int = 4) -> str:
    """An epsilon (or a share of a budget) rounded up, never shown below the recorded value;
    anything that is not a finite number as :func:`_fmt` shows it."""
    number = _finite_or_none(value)
    return _fmt(value) if number is None else format_up(number, decimals)


def _fmt_spent(value: Any, budget: Any) -> str:
    """An epsilon shown beside its ``budget``: rounded up at four decimals or the budget's own
    (:func:`privacy.accounting.format_spent`), so it reads above the budget exactly when it
    is; anything that is not a finite number as :func:`_fmt` shows it."""
    number = _finite_or_none(value)
    return _fmt(value) if number is None else format_spent(number, _finite_or_none(budget))


def _audit_figures(row: dict[str, Any]) -> tuple[str, tuple[str, str]] | None:
    """An audit row's claim, lower bound and certifiable maximum as the audit commands print
    them (:func:`audits.verdict.audit_figures`: each bound reads above the claim exactly when
    it is); None where they are not numbers it takes (shown as :func:`_fmt` shows them)."""
    lower, most = _finite_or_none(row["lower_bound"]), _finite_or_none(row["certifiable_max"])
    claim = row["claim_epsilon"]
    if lower is None or most is None or (claim is not None and _finite_or_none(claim) is None):
        return None
    try:
        return audit_figures(claim, lower, most)
    except VerdictError:  # a negative bound: not a figure of a valid document
        return None


def _share_up(spent: Any, budget: Any, used: Any) -> str:
    """The share of the budget spent, in percent to one decimal, rounded up from the recorded
    epsilon and budget (:func:`privacy.accounting.format_share_up`: an exactly spent 70% is
    "70.0%"); from the report's ``budget_used`` where either is not a finite number."""
    spent, budget = _finite_or_none(spent), _finite_or_none(budget)
    if spent is not None and budget is not None and budget > 0:
        return f"{format_share_up(spent, budget, 1)}%"
    if used is None:
        return "&ndash;"
    fraction = _finite_or_none(used)
    # the fraction's share as the pair's is shown: 0.0004 reads "0.1%", not "4.0e-2%"
    return f"{_fmt(used) if fraction is None else format_share_up(fraction, 1.0, 1)}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]],
           left: Sequence[int] = (0,)) -> str:
    head = "".join(f"<th class=\"{'l' if i in left else ''}\">{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td class=\"{'l' if i in left else ''}\">{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_list(intro: str, items: Sequence[str], css: str | None = "warn") -> str:
    """A paragraph ``intro`` (HTML) and a list of ``items`` (text, escaped), each of class
    ``css`` (None: none)."""
    cls = "" if css is None else f" class=\"{css}\""
    return f"<p>{intro}</p><ul>" + "".join(f"<li{cls}>{_e(t)}</li>" for t in items) + "</ul>"


def render_html(report: dict[str, Any], plots: dict[str, str | None]) -> str:
    """The self-contained HTML page for ``report`` (plots: name -> base64 PNG or None).

    Guarantee: the page references no external resource (no ``src``/``href`` other than
    ``data:`` URIs and in-page anchors) and every value taken from the run is HTML-escaped.
    """
    ident = report["identity"]
    ver = report["verification"]
    verdict = ver["verdict"]
    ver_class = {"passed": "ok", "failed": "bad", "no_dp_claim": "warn"}[verdict]
    shown_verdict = {"passed": "PASSED", "failed": "FAILED",
                     "no_dp_claim": "no differential-privacy claim, nothing to verify"}[verdict]
    parts: list[str] = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>Privacy compliance report: {_e(ident.get('name'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Privacy compliance report: {_e(ident.get('name'))}</h1>",
        f"<p class=\"muted\">generated {_e(report['generated'])} by secure-fedora audits"
        f" (report format {report['report_version']})</p>",
        f"<div class=\"verdict {ver_class}\" id=\"verdict\">Verification"
        f"{' (strict)' if ver.get('strict') else ''}: "
        f"{shown_verdict} &mdash; {counted(len(report['budgets']), 'client ledger')}, "
        f"{counted(sum(1 for f in ver['findings'] if f['severity'] == 'error'), 'error')}, "
        f"{counted(sum(1 for f in ver['findings'] if f['severity'] == 'warning'), 'warning')}"
        "</div>",
        "<h2 id=\"identity\">Run identity</h2>",
        _table(["field", "value"], [
            ["run directory", f"<code>{_e(ident.get('run_dir'))}</code>"],
            ["config hash (SHA-256)", _identity_value(report, "config_hash", code=True)],
            ["code version", _identity_value(report, "code_version")],
            ["data fingerprint (SHA-256)", _identity_value(report, "data_fingerprint", code=True)],
            ["methods", _e(", ".join(ident.get("methods") or ["unknown"]))],
            ["runtime", _e(ident.get("runtime") or "unknown")],
        ], left=(0, 1)),
        "<h2 id=\"threat-model\">Threat model and assumptions in force</h2><ul>",
        *(f"<li>{_e(line)}</li>" for line in report["threat_model"]),
        "</ul>",
    ]
    a = report["assumptions"]
    parts.append(_table(["assumption", "in force"], [
        [_e(k), _e("; ".join(parameter_notes(v)) if k == "ckks_parameters" else v)]
        for k, v in a.items() if k != "notes"
    ], left=(0, 1)))
    if a.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in a["notes"]) + "</ul>")
    pc = report.get("privacy_config")
    if pc:
        parts.append("<p class=\"muted\">privacy configuration: " + _e(", ".join(
            _privacy_config_value(k, v, pc.get("defaults", ()))
            for k, v in pc.items() if k not in ("overrides", "defaults"))) +
            (f"; per-client overrides: {_e(pc['overrides'])}" if pc.get("overrides") else "")
            + "</p>")

    parts.append("<h2 id=\"budgets\">Per-client budgets</h2>")
    parts.append(_table(
        ["method", "client", "budget \u03b5", "\u03b4", "accountant", "recorded \u03b5",
         "independent \u03b5", "budget used", "entries", "refused", "verified"],
        [[_e(r["method"]), _e(r["client_id"]), _fmt_exact(r["budget_epsilon"]),
          _fmt_exact(r["delta"]),
          _fmt(r["accountant"]), _fmt_spent(r["recorded_epsilon"], r["budget_epsilon"]),
          _fmt_spent(r["independent_epsilon"], r["budget_epsilon"]),
          _share_up(r["recorded_epsilon"], r["budget_epsilon"], r["budget_used"]),
          str(r["entries"]), _refused_text(r),
          f"<span class=\"{'ok' if r['verified'] else 'bad'}\">"
          f"{'ok' if r['verified'] else 'FAILED'}</span>"]
         for r in report["budgets"]],
        left=(0, 1),
    ))
    if plots.get("epsilon"):
        parts.append("<h2 id=\"epsilon\">Epsilon over rounds</h2>")
        caption = _epsilon_caption(report["epsilon_series"])
        alt = "summary of the clients' epsilon over rounds against their budgets" if caption \
            else "epsilon over rounds per client against its budget"
        parts.append(f"<img alt=\"{alt}\" "
                     f"src=\"data:image/png;base64,{plots['epsilon']}\">")
        if caption:
            parts.append(f"<p class=\"muted\">{caption}</p>")

    plan = report["privacy_plan"]
    if plan["plan"]:
        parts.append("<h2 id=\"plan\">Privacy plan (calibrated before training)</h2>")
        parts.append(_table(
            ["method", "clients", "budget \u03b5", "\u03b4", "DP-SGD \u03c3", "sample rate",
             "steps/round", "rounds", "planned \u03b5", "releases"],
            [[_e(r.get("method")), _fmt(r.get("clients")), _fmt_exact(r.get("epsilon_budget")),
              _fmt_exact(r.get("delta")), _fmt_exact(r.get("noise_multiplier")),
              _fmt_exact(r.get("sample_rate")),
              _fmt(r.get("steps_per_round")), _fmt(r.get("rounds")),
              _fmt_spent(r.get("planned_epsilon"), r.get("epsilon_budget")), _e("; ".join(map(str, _list(r.get("releases")))))]
             for r in plan["plan"]],
            left=(0, 9),
        ))
        parts.append(f"<p class=\"muted\">{_e(PLANNED_EPSILON_NOTE)}</p>")
    if plan["events"]:
        parts.append("<p>Budget and participation events:</p>" + _table(
            ["method", "round", "client", "event", "detail"],
            [[_e(ev.get("method")), _fmt(ev.get("round")), _e(ev.get("client")),
              _e(ev.get("event")), _e(ev.get("detail"))] for ev in plan["events"]],
            left=(0, 2, 3, 4),
        ))

    declared = report.get("reply_entries") or {}
    if declared.get("entries") or declared.get("not_stated"):
        parts.append("<h2 id=\"reply-entries\">What leaves each client, and why "
                     "(declared, not verified)</h2>")
        parts.append(f"<p>{_e(declared.get('note'))}</p>")
        methods = list(dict.fromkeys(r["method"] for r in declared.get("entries", [])))
        for method in methods:
            parts.append(f"<h3>{_e(method)}</h3>" + _table(
                ["exchange", "entry", "why it may leave the client", "basis"],
                [[_e(r["stage"]), f"<code>{_e(r['entry'])}</code>", _e(r["reason"]),
                  "<span class=\"warn\">assumption to review (the method's own claim)</span>"
                  if r["review"] else "built-in"]
                 for r in declared["entries"] if r["method"] == method],
                left=(0, 1, 2, 3)))
        for method in declared.get("not_stated", []):
            parts.append(f"<p class=\"warn\">{_e(method)}: results.json does not state what "
                         "its replies carry (an older version wrote it, or it was edited).</p>")

    parts.append("<h2 id=\"mechanisms\">Mechanisms (from the ledgers)</h2>")
    parts.append(_table(
        ["method", "mechanism", "clients", "entries", "total steps", "noise multipliers",
         "sample rates", "clip norms"],
        [[_e(m["method"]), _e(m["mechanism"]), str(m["clients"]), str(m["entries"]), str(m["steps"]),
          _fmt_exact(m["noise_multipliers"]), _fmt_exact(m["sample_rates"]),
          _fmt_exact(m["clip_norms"])]
         for m in report["mechanisms"]],
        left=(0, 1),
    ))
    resumes = report.get("resumes", [])
    if resumes:
        parts.append(_html_list("Interruptions (results.json, anchored): the run was resumed; a"
                                " round re-made from the journals repeats the releases its"
                                " ledgers record:", [r["text"] for r in resumes]))
    repeated = report.get("repeated_releases", [])
    if repeated:
        parts.append(_html_list("Releases beyond the run's plan (a release redone after a crash"
                                " is accounted again, never dropped):",
                                [r["text"] for r in repeated]))

    parts.append("<h2 id=\"verification\">Verification</h2>")
    parts.append(f"<p>Independent accountant: {_e(ver['independent_accountant'])}; relative"
                 f" tolerance {tolerance_text(ver['rel_tol'])} (under-reporting beyond it is an error)."
                 f" Public keys: <code>{_e(ver['allowlist'])}</code>.</p>")
    if ver.get("strict"):
        parts.append("<p>Strict: every warning saying that a check was not made is an"
                     " error.</p>")
    imported = ver.get("imported", [])
    if imported:  # which code recomputed the plug-in mechanisms' sensitivities
        parts.append(_html_list("Modules the auditor imported to recompute plug-in mechanisms:",
                                [imported_text(m) for m in imported], None))
    parts.append("<ul>" + "".join(f"<li>{_e(c)}</li>" for c in ver["checks"]) + "</ul>")
    signers = report.get("signers", [])
    if signers:
        parts.append("<p>Who signed what (each client's ledgers checked under its key in the"
                     " allowlist in use; the anchor under the key it names):</p>")
        parts.append(_table(
            ["party", "Ed25519 public key", "signed", "signatures verify",
             "key in the allowlist"],
            [[_e(r["party_id"]), f"<code>{_e(r['ed25519'] or 'none in the allowlist')}</code>",
              _e("; ".join(r["signed"])), *(
                  "<span class=\"ok\">yes</span>" if r[k] else "<span class=\"bad\">no</span>"
                  for k in ("verified", "registered"))] for r in signers],
            left=(0, 1, 2)))
    if ver["findings"]:
        parts.append(_table(
            ["severity", "method", "client", "ledger", "entry", "check", "message"],
            [[f"<span class=\"{'bad' if f['severity'] == 'error' else 'warn'}\">"
              f"{_e(f['severity'])}</span>", _fmt(f["method"]), _fmt(f["client_id"]),
              _fmt(f.get("ledger")), _fmt(f["entry"]), _e(f["check"]), _e(f["message"])]
             for f in sorted(ver["findings"], key=lambda f: f["severity"] != "error")],
            left=(0, 1, 2, 3, 5, 6),
        ))
    else:
        parts.append("<p class=\"ok\">No findings.</p>")

    parts.append("<h2 id=\"empirical-audits\">Empirical privacy audits</h2>")
    parts.append("<p>Each audit gives a lower bound on epsilon that a release meeting its claim"
                 " exceeds with probability at most 1 &minus; confidence. The certifiable"
                 " maximum is what a perfect attacker would certify with that design; a claim"
                 " at or above it cannot be refuted, so the audit says"
                 " &ldquo;inconclusive&rdquo; rather than &ldquo;consistent&rdquo;.</p>")
    verdict_class = {"refuted": "bad", "consistent": "ok", "inconclusive": "warn"}
    audit_rows = []
    for a in report.get("empirical_audits", []):
        if a["status"] == "run":
            verdict = (f"<span class=\"{verdict_class[a['verdict']]}\">{_e(a['verdict'])}"
                       f"</span>: {_e(a['verdict_text'])}")
            claim = "none (non-private)" if a["claim_epsilon"] is None \
                else _fmt_up(a["claim_epsilon"])
        elif a["status"] in ("unreadable", "invalid", "unverified"):
            # never the document's own verdict: it is not a valid result for this run
            verdict = f"<span class=\"bad\">{_e(a['status'])}</span>: {_e(a['verdict_text'])}"
            claim = "&ndash;" if a["claim_epsilon"] is None else _fmt_up(a["claim_epsilon"])
        else:
            verdict = f"not run (<code>{_e(a['command'])}</code>)"
            claim = "&ndash;"
        most, lower = _fmt(a["certifiable_max"]), _fmt(a["lower_bound"])
        figures = _audit_figures(a)
        if figures is not None:
            shown_claim, (lower, most) = figures
            claim = claim if a["claim_epsilon"] is None else shown_claim
        audit_rows.append([_e(a["audit"]), _e(a["title"]), _e(a.get("attacked") or "\u2013"),
                           claim, most, lower, _fmt(a["confidence"]), verdict])
    parts.append(_table(["audit", "what", "attacked (method/client)", "claimed \u03b5",
                         "certifiable max", "measured lower bound", "confidence", "verdict"],
                        audit_rows, left=(0, 1, 2, 7)))

    acc = report["accuracy"]
    metric_name = metric_label(acc.get("metric"))
    parts.append(f"<h2 id=\"accuracy\">{_e(metric_name[0].upper() + metric_name[1:])}</h2>")
    if acc["methods"]:
        parts.append(_table(
            ["method", "mean", "min", "max", "std", "selected round"],
            [[_e(m["method"]), _fmt(m["mean"]), _fmt(m["min"]), _fmt(m["max"]),
              _fmt(m["std"]), _fmt(m["round"])] for m in acc["methods"]],
        ))
        names = [m["method"] for m in acc["methods"]]
        parts.append(_table(
            ["client", *names],
            [[_e(r["client_id"]), *(_fmt(r.get(n)) for n in names)] for r in acc["per_client"]],
        ))
        for key, what, reported, round_key in (
                ("stale", "", "the selected round", "selected_round"),
                ("final_stale", "final ", "the last round", "final_round")):
            for st in acc.get(key, []):
                source = ("is a placeholder 0 (no figure yet)" if st["round"] is None
                          else f"is from round {_e(st['round'])}")
                parts.append(f"<p class=\"warn\">{_e(st['method'])}: client "
                             f"{_e(st['client'])}'s {what}{_e(metric_name)} {source}, not "
                             f"{reported} {_e(st[round_key])}'s (it missed that round's "
                             "evaluation).</p>")
        for um in acc.get("unmeasured", []):
            listed = ", ".join(_e(r) for r in um["rounds"])
            parts.append(f"<p class=\"warn\">{_e(um['method'])}: rounds {listed} were not "
                         "considered for selection: some client had no measured "
                         f"{_e(metric_name)} yet (only a placeholder 0).</p>")
        if plots.get("accuracy"):
            caption = _accuracy_caption(acc, metric_name)
            what = "sorted" if caption else "per-client"
            parts.append(f"<img alt=\"{what} {_e(metric_name)}\" "
                         f"src=\"data:image/png;base64,{plots['accuracy']}\">")
            if caption:
                parts.append(f"<p class=\"muted\">{caption}</p>")
    else:
        parts.append(f"<p class=\"warn\">results.json holds no {_e(metric_name)} figures.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _check_report_files(html_path: Path, json_path: Path, force: bool) -> None:
    from audits.output import output_refusal

    for path, kind in ((json_path, "report"), (html_path, "report.html")):
        why = output_refusal(path, "output file", kind, force)
        if why is not None:
            raise ReportError(why)


def _out_dir_problem(run: Path, out: Path, option: str) -> str | None:
    """Why ``out`` may not take the report of the run in ``run``, or None: inside the run
    directory only ``audit/`` (the default) may; everything else there is what the run wrote
    and an audit reads or a resume rewrites, and the report would sit among it (on real
    paths, so that a link cannot lead around the rule)."""
    run_real = Path(os.path.realpath(run))
    out_real = Path(os.path.realpath(out))
    if out_real != run_real and run_real not in out_real.parents:
        return None
    if out_real == run_real / "audit" or run_real / "audit" in out_real.parents:
        return None
    where = (f"the audited run directory {run} itself" if out_real == run_real
             else f"inside the audited run directory {run}")
    return (f"{option} {out} is {where}, whose files are the run's record: give a directory "
            f"outside it, or leave {option} out for {run / 'audit'}")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *,
                 allowlist: str | Path | None = None,
                 verification: VerificationReport | None = None,
                 force: bool = False, anchor: str | Path | None = None,
                 rel_tol: float = DEFAULT_REL_TOL,
                 pld_checkpoints: int = DEFAULT_PLD_CHECKPOINTS,
                 imports: Sequence[str] = (), strict: bool = False,
                 options: Mapping[str, str] = API_AUDIT_OPTIONS) -> ReportPaths:
    """Verify ``run_dir`` and write ``report.json`` and ``report.html`` (default: ``<run>/audit``).

    The verification is :func:`build_report`'s: ``verification`` if given, else
    :func:`audits.verify.verify_run` with ``allowlist``, ``anchor``, ``rel_tol``,
    ``pld_checkpoints``, ``imports``, ``strict`` and ``options`` (what ``audit report`` runs
    with the same flags). Both files are replaced atomically. Returns their paths and that
    verification. Raises :class:`ReportError` when
    the run directory is missing or the output directory cannot be created, and before
    anything is read when either is empty (the current directory), only spaces or holds NUL,
    when ``out_dir`` is the run directory or inside it but not under its ``audit/``, or
    when either file is refused by :mod:`audits.output`'s rule (a directory, a link, a
    non-regular file, or unless ``force`` an existing file that is not a previous report's),
    checked again just before writing.
    """
    run = check_path(run_dir, "run_dir", ReportError)
    out = check_path(out_dir, "out_dir", ReportError) if out_dir is not None else run / "audit"
    if not isinstance(force, bool):  # a truthy "no" must not mean yes
        raise ReportError(f"force must be True or False, got {force!r:.80}")
    html_path, json_path = out / "report.html", out / "report.json"
    problem = path_problem(run)  # before its audit/ folder is checked as the output
    if problem is not None:
        raise ReportError(f"run directory {run} {problem}")
    problem = _out_dir_problem(run, out, options.get("out_dir", "out_dir"))
    if problem is not None:
        raise ReportError(problem)
    _check_report_files(html_path, json_path, force)
    verification = _verification(run, verification, allowlist=allowlist, anchor=anchor,
                                  rel_tol=rel_tol, pld_checkpoints=pld_checkpoints,
                                  imports=imports, strict=strict, options=options)
    report = build_report(run, verification=verification)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create report directory {out}: {exc}") from exc
    plots = {
        "epsilon": _epsilon_plot(report["epsilon_series"], report["budgets"]),
        "accuracy": _accuracy_plot(report["accuracy"]),
    }
    _check_report_files(html_path, json_path, force)
    # the document as report.json's reader gets it (strings for what JSON cannot hold),
    # dumped with the indent once, by the seal: at thousands of clients each indented dump
    # of it takes seconds
    document = finite_document(json.loads(json.dumps(report, default=str)))
    write_output_file(json_path, document, "output file", "report", force, ReportError)
    write_output_file(html_path, render_html(report, plots), "output file", "report.html",
                      force, ReportError)
    return ReportPaths(html=html_path, json=json_path, verification=verification)
