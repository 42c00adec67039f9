"""``secure-fedora audit ...``: verify a run's ledgers, write its compliance report, and run
the empirical privacy audits.

The main CLI calls :func:`register` with its subparsers; each command's handler returns the
process exit code.

- ``audit verify RUN_DIR``: exit 0 only when every check holds; 1 when verification found
  errors (each printed with client, entry, check and message; with ``--strict`` a warning
  that something was not checked is one); 3 when the run makes no
  differential-privacy claim and the checks that apply to it hold
  (:data:`audits.verdict.VERIFICATION_EXIT`); 2 when the run cannot be
  audited at all (missing directory, bad arguments): the error is raised to the entry point,
  which prints it as one line.
- ``audit report RUN_DIR``: writes ``report.json`` and ``report.html`` (default
  ``RUN_DIR/audit``); exit 0 when the report was written *and* verification passed, 1 when it
  was written but verification failed, 3 when it was written for a run that makes no DP
  claim, 2 when nothing could be written.
- ``audit canary CONFIG|RUN_DIR``: canary membership inference on the config's federation
  (given a run directory, its ``config.toml``; the result then goes to
  ``RUN_DIR/audit/canary.json``). ``audit whitebox RUN_DIR``: the one-run white-box DP-SGD
  audit of one client with the run's plan, written to ``RUN_DIR/audit/whitebox.json``. Both
  print the claim, the certifiable maximum, the measured lower bound and the verdict; exit
  0 when consistent, 1 when the claim is refuted, 3 when inconclusive (the design cannot
  certify epsilon above the claim, or there is no claim), 2 on bad input.
- ``audit leakage CONFIG``: the summary-leakage audit; prints its figures, can write JSON.
- ``audit replay RUN_DIR``: the config-known audit (replays reproducible noise); writes
  ``RUN_DIR/audit/replay.json`` and prints as canary and whitebox do; exit 0 when
  consistent, 1 when the claim is refuted, 3 when inconclusive (with the automatic trial
  count that cannot refute the claim: before any trial, nothing written) or when the run
  makes no differential-privacy claim (nothing written), 2 when the run cannot be audited.

Each command prints a ``written: PATH`` line for every file it wrote
(``RUN_DIR/audit/<audit>.json``, the ``--json`` file, report.json and report.html), and each
audit a ``warning: ...`` line on stderr for what its checks of the run could not check (also
recorded as ``unchecked`` in canary.json, whitebox.json, replay.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from audits.options import CLI_AUDIT_OPTIONS, DEFAULT_PLD_CHECKPOINTS, DEFAULT_REL_TOL
from audits.output import write_output_file
from audits.verdict import VERIFICATION_EXIT, audit_figures
from privacy.accounting import format_down, format_exact, format_spent, format_up
from secure_fedora.core.errors import one_line
from secure_fedora.core.files import finite_document

if TYPE_CHECKING:  # audits.verify imports torch: the handlers import it when they run
    from audits.verify import VerificationReport

__all__ = ["cmd_canary", "cmd_leakage", "cmd_replay", "cmd_report", "cmd_verify",
           "cmd_whitebox", "register"]


def _range(values: list[float | None], fmt: str = ".4g") -> str:
    """``lo..hi`` of the values in format ``fmt``; ``fmt = "up"``: four decimals rounded up
    (a recorded epsilon is never shown below its value)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    lo_s, hi_s = (format_up(v, 4) if fmt == "up" else f"{v:{fmt}}" for v in (lo, hi))
    return lo_s if lo == hi else f"{lo_s}..{hi_s}"


def verification_summary(report: VerificationReport) -> list[dict[str, Any]]:
    """One row per method: ledgers, entries, epsilon recorded vs independent (min/max), the
    other method's difference, refusals, errors and warnings."""
    rows: dict[str, dict[str, Any]] = {}
    for c in report.clients:
        key = c.method if c.method is not None else "-"
        row = rows.setdefault(key, {"method": key, "ledgers": 0, "entries": 0, "accountants": set(),
                                    "recorded": [], "independent": [], "pld": [], "cross": [],
                                    "cross_methods": set(), "refusals": 0, "errors": 0,
                                    "warnings": 0})
        row["ledgers"] += 1
        row["entries"] += c.entries
        row["accountants"].add(str(c.accountant))
        row["recorded"].append(c.final_epsilon)
        row["independent"].append(c.independent_final_epsilon)
        row["pld"].append(c.pld_final_epsilon)
        row["cross"].append(c.cross_difference)
        if c.cross_method:
            row["cross_methods"].add(c.cross_method)
        row["refusals"] += int(c.refused)
    for f in report.findings:
        key = f.method if f.method is not None else "-"
        if key in rows and f.client_id is not None:
            rows[key]["errors" if f.severity == "error" else "warnings"] += 1
    return list(rows.values())


def _print_verification(report: VerificationReport, out: TextIO, verbose: bool = False) -> None:
    from audits.verify import imported_text

    for m in report.imported:  # which code recomputed what: the reviewer's own choice
        print(f"imported {imported_text(m.to_json())}", file=out)
    ledger_of = {(c.method, c.client_id): c for c in report.clients}
    shown = {k for k, c in ledger_of.items() if verbose or not c.ok or c.warned}
    for finding in report.findings:
        if finding.client_id is None or (finding.method, finding.client_id) in shown \
                or (finding.method, finding.client_id) not in ledger_of:
            print(str(finding), file=out)
    if not report.dp_claimed:
        for check in report.checks:
            print(f"checked: {check}", file=out)
        print(report.verdict_text, file=out)
        return
    # (heading, minimum width, left-aligned): each column as wide as its longest cell, so a
    # long plug-in method or accountant name, or a wide epsilon range, never shifts the rest
    columns = (("method", 10, True), ("ledgers", 7, False), ("entries", 7, False),
               ("acct", 5, True), ("eps recorded", 15, False), ("independent", 15, False),
               ("PLD (pess.)", 15, False), ("vs other", 16, False), ("refused", 7, False),
               ("errors", 6, False), ("warn", 5, False))
    table = [[name for name, _, _ in columns]]
    for row in verification_summary(report):
        cross = _range([None if d is None else 100 * d for d in row["cross"]], "+.1f")
        other = "/".join(sorted(row["cross_methods"])) or "-"
        table.append([str(row["method"]), str(row["ledgers"]), str(row["entries"]),
                      "/".join(sorted(row["accountants"])), _range(row["recorded"], "up"),
                      _range(row["independent"], "up"), _range(row["pld"], "up"),
                      (cross + "% " + other) if cross != "n/a" else "n/a",
                      str(row["refusals"]), str(row["errors"]), str(row["warnings"])])
    widths = [max([least] + [len(cells[k]) for cells in table])
              for k, (_, least, _) in enumerate(columns)]
    for cells in table:
        print(" ".join(cell.ljust(w) if left else cell.rjust(w) for cell, w, (_, _, left)
                       in zip(cells, widths, columns, strict=True)).rstrip(), file=out)
    listed = [c for c in report.clients if (c.method, c.client_id) in shown]
    if listed:
        print("ledgers" + ("" if verbose else " with errors or warnings") + ":", file=out)
    for c in listed:
        # every epsilon of the line at the budget's decimals too: it reads above the budget
        # (shown exactly) exactly when it is above
        ind = "n/a" if c.independent_final_epsilon is None \
            else format_spent(c.independent_final_epsilon, c.budget_epsilon)
        budget = "n/a" if c.budget_epsilon is None else format_exact(c.budget_epsilon)
        label = c.client_id if c.method is None else f"{c.method}/{c.client_id}"
        cross = "" if c.cross_difference is None else \
            (f"; {c.cross_method} {format_spent(c.cross_final_epsilon, c.budget_epsilon)}"
             f" ({100 * c.cross_difference:+.1f}%)")
        print(f"  {label}: {c.entries} entries, epsilon"
              f" {format_spent(c.final_epsilon, c.budget_epsilon)} (independent"
              f" {ind}{cross}) of budget {budget}{', refused' if c.refused else ''}"
              f" -> {'ok' if c.ok else 'FAILED'}", file=out)
    print(report.verdict_text, file=out)


def _json_option(args: argparse.Namespace, command: str) -> Path | None:
    """``--json``, checked before the audit runs (ConfigError naming it when empty, only
    spaces or holding NUL, when its folder is not a directory, or when the path is refused by
    :mod:`audits.output`'s rule: a directory, a link, a non-regular file, or without
    ``--force`` an existing file that is not a previous report of ``command``); ``--force``
    without ``--json`` is a ConfigError naming both (it would change nothing)."""
    from audits.output import check_output_file
    from secure_fedora.core.config import ConfigError

    if args.json is None:
        if args.force:  # it would replace nothing: no other file of the command takes it
            raise ConfigError(f"--force needs --json: it only lets `audit {command} --json FILE`"
                              " replace an existing file; pass --json FILE, or leave --force out")
        return None
    return check_output_file(args.json, "--json", command, force=args.force)


def cmd_verify(args: argparse.Namespace) -> int:
    """``audit verify``: print every finding; 0 iff all checks hold."""
    from audits.verify import verify_run

    json_path = _json_option(args, "verify")
    report = verify_run(args.run_dir, allowlist=args.allowlist, rel_tol=args.rel_tol,
                        pld_checkpoints=args.pld_checkpoints, anchor=args.anchor,
                        options=CLI_AUDIT_OPTIONS, imports=args.imports, strict=args.strict)
    _print_verification(report, sys.stdout, verbose=args.verbose)
    _write_json(json_path, report.to_json(), "verify", args.force)
    return VERIFICATION_EXIT[report.verdict]


def cmd_report(args: argparse.Namespace) -> int:
    """``audit report``: write report.html/report.json; 0 iff written and verified."""
    from audits.report import write_report
    from privacy.paths import path_problem
    from secure_fedora.core.config import ConfigError, check_path_argument

    if args.out is not None:  # an empty --out would be the current directory
        out = check_path_argument(args.out, "--out")
        problem = path_problem(out)  # checked before the verification runs
        if problem == "is not a directory":
            raise ConfigError(f"--out {out} exists and is not a directory: name a directory"
                              " (report.html and report.json are written into it)")
        if problem not in (None, "does not exist"):
            raise ConfigError(f"--out {out} {problem}: name a directory (report.html and "
                              "report.json are written into it)")
    # the Python function with the flags' values: one code path for both
    paths = write_report(args.run_dir, args.out, allowlist=args.allowlist, anchor=args.anchor,
                         rel_tol=args.rel_tol, pld_checkpoints=args.pld_checkpoints,
                         imports=args.imports, strict=args.strict, options=CLI_AUDIT_OPTIONS,
                         force=args.force)
    report = paths.verification
    _print_verification(report, sys.stdout)
    for path in (paths.json, paths.html):  # in the order written, as each audit names its files
        print(f"  written: {path}")
    return VERIFICATION_EXIT[report.verdict]


def _write_json(path: Path | None, doc: dict[str, Any], command: str, force: bool) -> None:
    """``doc`` (a document of JSON types: string keys; a NaN or infinity becomes null, named
    by :func:`finite_document`) to the ``--json`` file ``path``, if given, sealed and encoded
    once by :func:`write_output_file`; then a ``written: PATH`` line, as each audit prints
    the files it wrote."""
    if path is not None:
        write_output_file(path, finite_document(doc), "--json", command, force=force)
        print(f"  written: {path}")


#: Exit status of the canary and white-box audits per verdict (2 is bad input).
VERDICT_EXIT = {"consistent": 0, "refuted": 1, "inconclusive": 3}


def _print_imported(doc: dict[str, Any]) -> None:
    """One line per module the audit imported (``--import``), as ``audit verify`` prints them:
    which code from outside the toolkit ran during the audit."""
    from audits.verify import imported_text

    for m in doc.get("imported", []):
        print(f"imported {imported_text(m)}")


def _print_audit_summary(doc: dict[str, Any]) -> None:
    claim, (lower, most) = audit_figures(doc["claim_epsilon"], doc["lower_bound"],
                                         doc["certifiable_max"])
    print(f"  claimed epsilon {claim}; certifiable maximum {most}"
          f" (a perfect attacker, confidence {format_exact(doc['confidence'])});"
          f" measured lower bound {lower}")
    print(f"  verdict: {doc['verdict_text']}")


def cmd_canary(args: argparse.Namespace) -> int:
    """``audit canary``: canary membership inference -> epsilon lower bound and verdict."""
    from audits.canary import run_canary_audit
    from audits.verdict import config_claim_problem, config_rebuild_problem, write_audit_json
    from audits.verify import import_trusted_modules
    from secure_fedora.cli import keystore_flag
    from secure_fedora.core.config import (
        check_path_argument,
        check_settings_used,
        load_config,
        load_run_config,
        unregistered_hint,
    )
    from secure_fedora.secure.keystore import check_keystore_used

    json_path = _json_option(args, "canary")
    keystore = keystore_flag(args.keystore)
    # an empty path would name the current directory as the run directory
    target = check_path_argument(args.config, "the config path", "config file or run directory")
    run_dir = target if target.is_dir() else None
    problem = None if run_dir is None else config_rebuild_problem(run_dir, "canary")
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # trusted modules first, before the config names plug-ins (never one inside RUN_DIR)
    imported = import_trusted_modules(args.imports, target, CLI_AUDIT_OPTIONS)
    if run_dir is None:
        cfg = load_config(target)
    else:  # a run directory's config: plug-ins from PYTHONPATH only (never its own files)
        cfg, unknown = load_run_config(target / "config.toml")
        if unknown:
            print("error: the canary audit trains the run's model on its data under its "
                  f"method, and {target / 'config.toml'} names "
                  + unregistered_hint(*unknown[0], "audits.canary.run_canary_audit",
                                      CLI_AUDIT_OPTIONS["imports"]),
                  file=sys.stderr)
            return 2
    problem = None if run_dir is None else \
        config_claim_problem(run_dir, cfg.privacy.enabled, "canary")
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # a run directory's config.toml is the run's record, bound to its checkpoints: its unused
    # [security] keystore only warns, as on resume (a config file given is refused)
    check_keystore_used(cfg.privacy.enabled, cfg.security.keystore, keystore,
                        resume=run_dir is not None)
    check_settings_used(cfg, resume=run_dir is not None)
    result = run_canary_audit(cfg, client_index=args.client, num_canaries=args.canaries,
                              kind=args.kind, method=args.method,
                              confidence=args.confidence, delta=args.delta, seed=args.seed,
                              keystore=keystore, run_dir=run_dir, options=CLI_AUDIT_OPTIONS)
    for note in result.unchecked:  # the key scan's, as whitebox and replay show it
        print(f"warning: {note}", file=sys.stderr)
    result = dataclasses.replace(result, imported=[m.to_json() for m in imported])
    b = result.bound
    doc = result.to_json()
    try:  # checked before anything is printed or written
        json.dumps(doc, allow_nan=False)
    except ValueError as err:  # a NaN or infinity: canary.json and --json stay strict JSON
        print(f"error: the canary audit's result is not strict JSON ({err}); nothing written",
              file=sys.stderr)
        return 2
    _print_imported(doc)
    print(f"client {result.client_id}, method {result.method}: {result.num_canaries}"
          f" {result.canary_kind} canaries ({result.members} inserted)")
    if result.rounds_scored > 1:
        print(f"  scored after each of {result.rounds_scored} rounds; round"
              f" {result.selected_round} chosen on the calibration half")
    print(f"  evaluation half: TPR {b.tpr:.3f} (lower {b.tpr_lower:.3f}), FPR {b.fpr:.3f}"
          f" (upper {b.fpr_upper:.3f}) at threshold {b.threshold:.4g}, delta"
          f" {format_exact(result.delta)}")
    _print_audit_summary(doc)
    if run_dir is not None:
        try:
            print(f"  written: {write_audit_json(run_dir, doc)}")
        except OSError as err:
            print(f"error: cannot write {run_dir / 'audit' / 'canary.json'}: {err}",
                  file=sys.stderr)
            return 2
    _write_json(json_path, doc, "canary", args.force)
    return VERDICT_EXIT[doc["verdict"]]


def cmd_whitebox(args: argparse.Namespace) -> int:
    """``audit whitebox``: one-run white-box DP-SGD audit with Dirac gradient canaries."""
    from audits.whitebox import WhiteboxAuditError, audit_run_dir

    json_path = _json_option(args, "whitebox")
    try:
        result, path = audit_run_dir(
            args.run_dir, method=args.method, client_index=args.client,
            num_canaries=args.canaries, calibration_fraction=args.calibration_fraction,
            confidence=args.confidence, seed=args.seed, imports=args.imports,
            allowlist=args.allowlist, anchor=args.anchor, options=CLI_AUDIT_OPTIONS)
    except WhiteboxAuditError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    for note in result.unchecked:  # what was not checked, as canary and replay show it
        print(f"warning: {note}", file=sys.stderr)
    doc = result.to_json()
    _print_imported(doc)
    s = result.setting
    # the audited setting exactly: rounding could show more noise, a smaller q or delta
    sigma = "none (non-private)" if s.noise_multiplier is None else repr(s.noise_multiplier)
    print(f"client {s.client_id}, method {s.method}: DP-SGD sigma {sigma}, q {s.sample_rate!r},"
          f" {s.steps} steps, clip {format_exact(s.clip_norm)}; {result.num_canaries} Dirac"
          " canaries"
          f" ({result.members} inserted), {doc['evaluation_size']} evaluated")
    print(f"  guesses {doc['guesses']}, correct {doc['correct_guesses']}, delta {s.delta!r}")
    if "not cross-checked" in s.plan_source:
        print(f"  warning: {s.plan_source}: the claim rests on config.toml alone")
    _print_audit_summary(doc)
    print(f"  written: {path}")
    _write_json(json_path, doc, "whitebox", args.force)
    return VERDICT_EXIT[doc["verdict"]]


def _planned_summary_noise(cfg: Any) -> tuple[list[float], str]:
    """Each client's summary noise multiplier as a FEDORA run of ``cfg`` would use it: the
    fixed ``privacy.summary_noise_multiplier``, else the one calibrated from the client's
    budget (``privacy.summary_budget_fraction`` of its epsilon), and where it came from."""
    from secure_fedora.core.config import ConfigError
    from secure_fedora.secure.private import BudgetPlanError, check_budget_plans, client_budget

    p = cfg.privacy
    n = cfg.data.num_clients
    if p.summary_noise_multiplier is not None:
        return [p.summary_noise_multiplier] * n, "privacy.summary_noise_multiplier"
    try:
        _, plans = check_budget_plans(cfg, "fedora", n)
    except BudgetPlanError as err:
        raise ConfigError(
            f"no planned summary noise to audit: a FEDORA run of this config would be refused "
            f"before releasing anything ({err}). Fix the budget, or pass --noise-multiplier "
            "(and --clip-norm) to audit a noise level of your choice") from err
    sigmas = []
    for i in range(n):
        b = client_budget(cfg, i)
        sigma = plans[(b.epsilon, b.delta)].summary_noise
        if sigma is None:
            raise ConfigError(
                f"fedora.relatedness = {cfg.fedora.relatedness!r} releases no noised summary, so "
                "there is no planned summary noise; pass --noise-multiplier (and --clip-norm)")
        sigmas.append(sigma)
    return sigmas, (f"calibrated: privacy.summary_budget_fraction "
                    f"{format_exact(p.summary_budget_fraction)} "
                    "of each client's epsilon, as the run's privacy plan")


def _check_noised_flags(args: argparse.Namespace, private: bool) -> None:
    """ConfigError naming the flag, before anything is built: ``--clip-norm`` or
    ``--noise-multiplier`` out of range (the config's caps on ``privacy.summary_clip`` and
    ``privacy.summary_noise_multiplier``), or one of them without the other when the config
    has privacy off (it then supplies neither default)."""
    from privacy.accounting import MAX_NOISE_MULTIPLIER
    from secure_fedora.core.config import MAX_SCALE, ConfigError

    for flag, value, cap, key in (
            ("--clip-norm", args.clip_norm, MAX_SCALE, "summary_clip"),
            ("--noise-multiplier", args.noise_multiplier, MAX_NOISE_MULTIPLIER,
             "summary_noise_multiplier")):
        if value is not None and not 0 < value <= cap:  # NaN fails too
            raise ConfigError(f"{flag} must be in (0, {cap:g}] (as privacy.{key}), got {value}")
    if private:
        return
    given = [f for f, v in (("--clip-norm", args.clip_norm),
                            ("--noise-multiplier", args.noise_multiplier)) if v is not None]
    if len(given) == 1:
        other = "--noise-multiplier" if given[0] == "--clip-norm" else "--clip-norm"
        raise ConfigError(f"{given[0]} needs {other}: the noised mode takes both, and with "
                          f"privacy off the config supplies no default for {other}; pass "
                          "both, or neither for the plain and encrypted modes only")


def cmd_leakage(args: argparse.Namespace) -> int:
    """``audit leakage``: reconstruct clients' data directions from relatedness messages."""
    from audits.summary_leakage import run_summary_leakage_audit
    from secure_fedora.core.config import load_config
    from secure_fedora.learning.devices import threads_applied
    from secure_fedora.runtimes.inprocess import build_clients

    json_path = _json_option(args, "leakage")
    cfg = load_config(args.config)
    _check_noised_flags(args, cfg.privacy.enabled)  # before the clients' data is built
    clip = args.clip_norm if args.clip_norm is not None else (
        cfg.privacy.summary_clip if cfg.privacy.enabled else None)
    nm: float | list[float] | None = args.noise_multiplier
    if nm is None and cfg.privacy.enabled:
        nm, source = _planned_summary_noise(cfg)
        # rounded down: a shown noise multiplier is never above the one planned
        shown = format_down(nm[0], 4) if len(set(nm)) == 1 \
            else f"{format_down(min(nm), 4)} to {format_down(max(nm), 4)}"
        print(f"noised mode: clip {format_exact(clip)}, noise multiplier {shown} ({source})")
    # the summaries a run of this config computes: on its threads, in float32
    with threads_applied(cfg):
        report = run_summary_leakage_audit(build_clients(cfg), q=cfg.fedora.q, clip_norm=clip,
                                           noise_multiplier=nm, tau=cfg.fedora.tau, seed=cfg.seed)
    print(f"{'mode':<10} {'image cos':>10} {'prior':>7} {'label cos':>10} {'prior':>7}"
          f" {'identified':>11} {'chance':>7}")
    for row in report.summary_rows():
        print(f"{row['mode']:<10} {row['image_cosine']:>10.3f} {row['prior_image_cosine']:>7.3f}"
              f" {row['label_cosine']:>10.3f} {row['prior_label_cosine']:>7.3f}"
              f" {row['identification']:>11.3f} {row['chance']:>7.3f}")
    _write_json(json_path, report.to_json(), "leakage", args.force)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``audit replay``: config-known membership inference; exit as canary and whitebox (0
    consistent, 1 refuted, 3 inconclusive), 3 too for a run without a DP claim and when the
    automatic trial count cannot refute the claim (nothing run or written), 2 when the run
    cannot be audited."""
    from audits.replay import (
        AutomaticTrialsCannotRefuteError,
        NoPrivacyClaimError,
        ReplayAuditError,
        run_replay_audit,
        write_replay_result,
    )
    from audits.verdict import NO_DP_CLAIM_EXIT

    json_path = _json_option(args, "replay")
    try:
        result = run_replay_audit(args.run_dir, client=args.client, method=args.method,
                                  trials=args.trials, records=args.records,
                                  confidence=args.confidence, seed=args.seed,
                                  allowlist=args.allowlist, anchor=args.anchor,
                                  options=CLI_AUDIT_OPTIONS,
                                  progress=lambda line: print(line, file=sys.stderr, flush=True))
        doc = result.to_json()
        path = write_replay_result(args.run_dir, result)
    except NoPrivacyClaimError as err:
        print(str(err))
        return NO_DP_CLAIM_EXIT
    except AutomaticTrialsCannotRefuteError as err:
        print(f"  verdict: inconclusive: {one_line(err)}; nothing written")
        return VERDICT_EXIT["inconclusive"]
    except ReplayAuditError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    for note in result.unchecked:  # what was not checked, as audit canary shows it
        print(f"warning: {note}", file=sys.stderr)
    s = result.setup
    print(f"replay audit of {s['method']}/{s['client']} (noise = {s['noise']}): {result.trials}"
          f" trials, {result.correct} correct guesses")
    _print_audit_summary(doc)  # the figures and verdict worded as canary and whitebox word them
    others = [m for m in s.get("claim_mechanisms", []) if m != "dpsgd"]
    if others:  # the claim is the ledger's whole spend, the replay one DP-SGD step of it
        print(f"  the claim also spans the ledger's {', '.join(others)} releases (signed entries,"
              " not replayed)")
    print(f"  written: {path}")
    _write_json(json_path, doc, "replay", args.force)
    return VERDICT_EXIT[result.verdict]


def _import_flag(p: argparse.ArgumentParser, effect: str) -> None:
    """``--import MODULE`` (repeatable), as every audit command that takes it reads it
    (:func:`audits.verify.import_trusted_modules`); ``effect``: what importing it does there."""
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="dotted name of a module you trust (from PYTHONPATH or the installed"
                   f" packages, never from RUN_DIR) to import first: {effect} (repeatable)")


def _ledger_allowlist_flag(p: argparse.ArgumentParser) -> None:
    """``--allowlist FILE`` of the audits that trust a claim only from the run's verified
    ledger (replay, whitebox): :func:`audits.verify.verified_ledger_entries` checks it under
    the file given."""
    p.add_argument("--allowlist", help="independently registered allowlist.json to check"
                   " the ledger's signatures against (default: RUN_DIR/keys/allowlist.json,"
                   " which a run re-signed with new keys also replaces; a Flower run's"
                   " collected folder holds none: give the copy of the server's"
                   " identities/server/allowlist.json); private keys inside RUN_DIR are an"
                   " error with it or without")


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (holds ledgers/, keys/, results.json)")
    p.add_argument("--allowlist", help="independently registered allowlist.json to verify"
                   " signatures against (default: RUN_DIR/keys/allowlist.json, with a warning);"
                   " private keys inside RUN_DIR are an error with it or without")
    p.add_argument("--anchor", help="a copy of the run's anchor.json kept apart: any ledger"
                   " behind it, missing or unnamed, or a changed results.json/config.toml, fails"
                   " (default: check RUN_DIR/anchor.json if present); a file that is no signed"
                   " anchor is bad input (exit 2)")
    p.add_argument("--rel-tol", type=float, default=DEFAULT_REL_TOL,
                   help="relative tolerance between recorded and independent epsilon"
                   " (default %(default)s)")
    p.add_argument("--pld-checkpoints", type=int, default=DEFAULT_PLD_CHECKPOINTS,
                   help="entries per PRV ledger recomputed with the PLD accountant"
                   " (default %(default)s)")
    _import_flag(p, "the plug-in mechanisms it registers have their recorded sensitivities"
                 " recomputed")
    p.add_argument("--strict", action="store_true", help="every warning saying that a check"
                   " was not made (an unregistered plug-in mechanism, a missing results.json,"
                   " config.toml or anchor, keys taken from RUN_DIR, ...) is an error")


#: The exit codes each audit command's --help states (:data:`VERDICT_EXIT`,
#: :data:`audits.verdict.VERIFICATION_EXIT`).
VERIFY_EXIT_HELP = ("exit 0: every check holds; 1: verification failed (an error, or with"
                    " --strict a warning that something was not checked); 3: the run makes no"
                    " differential-privacy claim and the checks that apply to it hold; 2: the run"
                    " cannot be audited (bad input)")
REPORT_EXIT_HELP = ("exit 0: written and verification passed; 1: written, verification failed;"
                    " 3: written for a run without a differential-privacy claim; 2: nothing"
                    " written (bad input)")
AUDIT_EXIT_HELP = ("exit 0: consistent (the audit could have refuted the claim and did not);"
                   " 1: refuted (the measured lower bound exceeds the claimed epsilon);"
                   " 3: inconclusive (the design cannot certify epsilon above the claim, or"
                   " there is no claim); 2: bad input")
REPLAY_EXIT_HELP = ("exit 0: consistent (the audit could have refuted the claim and did not);"
                    " 1: refuted (the measured lower bound exceeds the claimed epsilon);"
                    " 3: inconclusive (the design cannot certify epsilon above the claim; when"
                    " the automatic trial count cannot, no trial runs and nothing is written),"
                    " or the run makes no differential-privacy claim (nothing written); 2: the"
                    " run cannot be audited (bad input)")
LEAKAGE_EXIT_HELP = "exit 0: the figures were computed (no verdict); 2: bad input"

FORCE_HELP = ("replace an existing output file that is not a previous report of this command"
              " (a directory, a link or a non-regular file is never replaced)")
JSON_FORCE_HELP = FORCE_HELP + "; only with --json (an error without it)"


def _json_flags(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--json", help=help_text + " (written atomically; an existing file is"
                   " replaced only when it is a previous report of this command, or with --force)")
    p.add_argument("--force", action="store_true", help=JSON_FORCE_HELP)


def register(subparsers: Any) -> None:
    """Add the ``audit`` command (verify, report, canary, whitebox, leakage, replay) to
    ``subparsers``."""
    from secure_fedora.cli import add_keystore_flag

    audit = subparsers.add_parser("audit", help="verify ledgers, write compliance reports,"
                                  " run empirical privacy audits")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    verify = sub.add_parser("verify", help="check ledgers: chain, signatures, independent"
                            " epsilon, budgets (exit 0 only if all hold)",
                            epilog=VERIFY_EXIT_HELP)
    _verify_options(verify)
    _json_flags(verify, "also write the verification result to this file")
    verify.add_argument("--verbose", action="store_true",
                        help="list every ledger (default: only those with errors or warnings)")
    verify.set_defaults(func=cmd_verify)

    report = sub.add_parser("report", help="write a self-contained HTML report and report.json",
                            epilog=REPORT_EXIT_HELP)
    _verify_options(report)
    report.add_argument("--out", help="output directory (default: RUN_DIR/audit); its"
                        " report.json and report.html are replaced only when they are a previous"
                        " report's, or with --force")
    report.add_argument("--force", action="store_true", help=FORCE_HELP)
    report.set_defaults(func=cmd_report)

    canary = sub.add_parser("canary", help="canary membership inference: a lower bound on"
                            " epsilon (Clopper-Pearson); DP per the config's [privacy]",
                            epilog=AUDIT_EXIT_HELP)
    canary.add_argument("config", help="experiment TOML config, or a run directory (its"
                        " config.toml; the result is then written to RUN_DIR/audit/canary.json)")
    canary.add_argument("--client", type=int, default=0,
                        help="index of the audited client (default %(default)s)")
    canary.add_argument("--canaries", type=int, default=300,
                        help="number of canaries (default %(default)s)")
    canary.add_argument("--kind", choices=("noise", "mislabeled"), default="noise",
                        help="noise: uniform random inputs shaped like the client's, random labels;"
                        " mislabeled: the built-in image dataset's test images, each given a"
                        " wrong label (default %(default)s)")
    canary.add_argument("--method", default="local",
                        help="method to train, one of the config's (default %(default)s, which"
                        " the config must run: give --method for a config without it)")
    canary.add_argument("--confidence", type=float, default=0.95,
                        help="confidence of the lower bound (default %(default)s)")
    canary.add_argument("--delta", type=float, default=1e-5,
                        help="delta of the bound for a non-private run (DP runs use the ledger's;"
                        " default %(default)s)")
    canary.add_argument("--seed", type=int, default=0,
                        help="seed of the canaries and of the audit's draws (default %(default)s)")
    _import_flag(canary, "the plug-in methods, datasets and models it registers can be"
                 " trained (a run directory's config.toml names only what this process knows)")
    add_keystore_flag(canary)
    _json_flags(canary, "write the result to this file")
    canary.set_defaults(func=cmd_canary)

    whitebox = sub.add_parser("whitebox", help="one-run white-box DP-SGD audit (Dirac gradient"
                              " canaries, Steinke-Nasr-Jagielski 2023) of one client with the"
                              " run's plan; writes RUN_DIR/audit/whitebox.json",
                              epilog=AUDIT_EXIT_HELP)
    whitebox.add_argument("run_dir", help="run directory (its config.toml; results.json is"
                          " checked against the plan when present)")
    whitebox.add_argument("--client", type=int, default=0,
                          help="index of the audited client (default %(default)s)")
    whitebox.add_argument("--method", default=None, help="whose plan to audit (default: local"
                          " when the config has it, else its first method)")
    whitebox.add_argument("--canaries", type=int,
                          help="number of Dirac canaries (distinct coordinates; default 20000,"
                          " or the model's parameter count when smaller)")
    whitebox.add_argument("--calibration-fraction", type=float, default=0.2,
                          help="share of the canaries used to choose the guess thresholds"
                          " (default %(default)s)")
    whitebox.add_argument("--confidence", type=float, default=0.95,
                          help="confidence of the lower bound (default %(default)s)")
    whitebox.add_argument("--seed", type=int, default=0,
                          help="seed of the canaries and of the audit's draws"
                          " (default %(default)s)")
    _ledger_allowlist_flag(whitebox)
    whitebox.add_argument("--anchor", help="a copy of the run's anchor.json kept apart, checked"
                          " as `audit verify --anchor` does before anything trains: a changed"
                          " config.toml or results.json, or a ledger off its anchored head or"
                          " length, is an error (default: none is checked; `audit verify`"
                          " checks RUN_DIR/anchor.json); a file that is no signed anchor is"
                          " bad input (exit 2)")
    _import_flag(whitebox, "the plug-in methods, datasets and models it registers can be"
                 " rebuilt (config.toml names only what this process knows)")
    _json_flags(whitebox, "also write the result to this file")
    whitebox.set_defaults(func=cmd_whitebox)

    leakage = sub.add_parser("leakage", help="summary-leakage audit for plain, noised and"
                             " encrypted relatedness",
                             description="With [privacy] enabled = false the noised mode runs"
                             " only when both --clip-norm and --noise-multiplier are given.",
                             epilog=LEAKAGE_EXIT_HELP)
    leakage.add_argument("config", help="experiment TOML config")
    leakage.add_argument("--clip-norm", type=float, help="noised mode: row clip norm"
                         " (default: privacy.summary_clip when privacy is enabled)")
    leakage.add_argument("--noise-multiplier", type=float, help="noised mode: noise multiplier"
                         " (default when privacy is enabled: privacy.summary_noise_multiplier,"
                         " else each client's summary noise calibrated by the privacy plan)")
    _json_flags(leakage, "write the result to this file")
    leakage.set_defaults(func=cmd_leakage)

    replay = sub.add_parser("replay", help="config-known audit: replay the run's noise from its"
                            " config and infer membership (refutes reproducible-noise runs);"
                            " writes RUN_DIR/audit/replay.json", epilog=REPLAY_EXIT_HELP)
    replay.add_argument("run_dir", help="run directory (config.toml and ledgers/ of a DP run)")
    replay.add_argument("--client", type=int, default=0,
                        help="index of the audited client (default %(default)s)")
    replay.add_argument("--method", help="method whose ledger gives the DP-SGD parameters and"
                        " the claim (default: fedora when RUN_DIR has its ledgers, else the"
                        " config's first method that has ledgers)")
    replay.add_argument("--trials", type=int, help="membership trials (default: the fewest for"
                        " a perfect attacker to exceed 1.1 x the claim, capped at 20000; when"
                        " 20000 cannot refute the claim, none runs (exit 3) and the count that"
                        " could is named; at most 1000000 when given, run as asked)")
    replay.add_argument("--records", type=int,
                        help="client records in the audited step besides the target (default:"
                        " 64, or data.train_per_client - 1 when that is fewer)")
    replay.add_argument("--confidence", type=float, default=0.95,
                        help="confidence of the lower bound (default %(default)s)")
    replay.add_argument("--seed", type=int, default=0,
                        help="seed of the auditor's coin flips (default %(default)s)")
    _ledger_allowlist_flag(replay)
    replay.add_argument("--anchor", help="a copy of the run's anchor.json kept apart, checked as"
                        " `audit verify --anchor` does: a changed config.toml or results.json,"
                        " or a ledger off its anchored head or length, is an error (default:"
                        " check config.toml against RUN_DIR/anchor.json if present); a file"
                        " that is no signed anchor is bad input (exit 2)")
    _json_flags(replay, "also write the result to this file (default: none; the same"
                " document as RUN_DIR/audit/replay.json, which is always written)")
    replay.set_defaults(func=cmd_replay)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m audits.cli audit verify RUN_DIR``); errors are
    reported as by the main CLI (one line, exit code 2, ``--debug`` for the traceback)."""
    from secure_fedora.core.errors import run_standalone

    return run_standalone(register, argv)


if __name__ == "__main__":
    sys.exit(main())
