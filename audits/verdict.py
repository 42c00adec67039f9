"""The verdict and JSON document shared by the empirical audits (canary, white-box, replay).

Every audit measures a lower bound on epsilon that holds with probability at least
``confidence`` for a release that truly satisfies its claim, and knows its *certifiable
maximum*: the bound a perfect attacker (every guess right) would get with this design (this
many canaries, this confidence, this delta). That maximum decides what the audit can say:

- ``"refuted"``: the lower bound exceeds the claim (the claim is false, at ``confidence``);
- ``"inconclusive"``: the certifiable maximum is not above the claim, so no outcome of this
  audit could have refuted it (the text says "the audit cannot certify epsilon above X"),
  or there is no finite claim to test (a non-private run);
- ``"consistent"``: the audit could have refuted the claim and did not.

The document written to ``RUN_DIR/audit/<audit>.json`` is::

    {"audit": "canary" | "whitebox" | "replay", "claim_epsilon": float | null,
     "certifiable_max": float, "lower_bound": float,
     "verdict": "refuted" | "consistent" | "inconclusive", "verdict_text": str,
     "confidence": 0.95, "setup": {...}, ...audit-specific fields}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from audits.arguments import check_open_fraction
from privacy.accounting import format_against, format_down
from privacy.errors import ToolkitError
from privacy.paths import check_path

if TYPE_CHECKING:
    from secure_fedora.core.config import ExperimentConfig

__all__ = ["AUDIT_NAMES", "NO_DP_CLAIM_EXIT", "VERDICTS", "VERIFICATION_EXIT",
           "VERIFICATION_VERDICTS", "VerdictError", "audit_document", "audit_figures", "audit_verdict",
           "config_claim_problem", "config_rebuild_problem", "run_config_problem", "verdict_text",
           "verification_verdict", "verification_verdict_text", "write_audit_json"]

AUDIT_NAMES: tuple[str, ...] = ("canary", "whitebox", "replay")
VERDICTS: tuple[str, ...] = ("refuted", "consistent", "inconclusive")
Verdict = Literal["refuted", "consistent", "inconclusive"]


VERIFICATION_VERDICTS: tuple[str, ...] = ("passed", "failed", "no_dp_claim")
VerificationVerdict = Literal["passed", "failed", "no_dp_claim"]

#: Exit status of ``audit verify``/``audit report`` per verification verdict (2 is bad input).
#: A run that makes no differential-privacy claim exits 3, the status ``audit canary`` and
#: ``audit whitebox`` give when there is no claim to test: not a failure, and not a pass of a
#: claim nobody made. ``audit replay`` gives the same status for such a run.
VERIFICATION_EXIT: dict[str, int] = {"passed": 0, "failed": 1, "no_dp_claim": 3}
NO_DP_CLAIM_EXIT = VERIFICATION_EXIT["no_dp_claim"]


def verification_verdict(ok: bool, dp_claimed: bool) -> VerificationVerdict:
    """The verdict of a ledger verification: ``"failed"`` whenever a check found an error,
    else ``"no_dp_claim"`` when the run makes no differential-privacy claim (nothing to
    verify beyond the checks that apply to it), else ``"passed"``. The one place that decides
    it: ``audit verify``, ``audit report`` (text, HTML, ``--json``) all read it from here."""
    if not ok:
        return "failed"
    return "passed" if dp_claimed else "no_dp_claim"


def counted(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless ``n`` is 1 ("1 warning", "3 warnings")."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def verification_verdict_text(verdict: str, ledgers: int, errors: int, warnings: int,
                              checks: int = 1, strict: bool = False) -> str:
    """One line for people naming the verdict and its counts (``checks``: how many checks
    applied to a run that makes no DP claim); ``strict`` says "(strict)" after the verdict
    (a check not made counted as an error). VerdictError for an unknown ``verdict``."""
    counts = ", ".join(counted(n, word) for n, word in (
        (ledgers, "ledger"), (errors, "error"), (warnings, "warning")))
    mode = " (strict)" if strict else ""
    if verdict == "passed":
        return f"verification PASSED{mode}: {counts}"
    if verdict == "failed":
        return f"verification FAILED{mode}: {counts}"
    if verdict == "no_dp_claim":
        done = ("the checks that apply to a non-private run passed" if checks else
                "nothing else of the run could be checked")
        return f"no differential-privacy claim{mode}: nothing to verify ({counts}; {done})"
    raise VerdictError(f"verdict must be one of {VERIFICATION_VERDICTS}, got {verdict!r:.80}")


class VerdictError(ToolkitError, ValueError):
    """Bad input to the verdict or the audit document; the message names the argument."""


def _finite_or_none(claim: float | None) -> float | None:
    if claim is not None and (isinstance(claim, bool) or not isinstance(claim, int | float)):
        raise VerdictError(f"claim_epsilon must be a number >= 0 or None, got {claim!r:.80}")
    if claim is None or claim > sys.float_info.max:  # inf, or an int beyond float
        return None
    if not claim >= 0:  # NaN too
        raise VerdictError(f"claim_epsilon (a claimed epsilon) must be >= 0 or None, got"
                           f" {claim!r}")
    return float(claim)


def _check_bounds(certifiable_max: float, lower_bound: float) -> None:
    for name, value in (("certifiable_max", certifiable_max), ("lower_bound", lower_bound)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise VerdictError(f"{name} must be a number >= 0, got {value!r:.80}")


def audit_verdict(claim_epsilon: float | None, certifiable_max: float,
                  lower_bound: float) -> Verdict:
    """The verdict for a claim (None or inf: no claim) given the design's maximum and the bound.

    Guarantee: ``"consistent"`` only when ``certifiable_max > claim_epsilon >= lower_bound``;
    ``"refuted"`` exactly when ``lower_bound > claim_epsilon``.
    """
    _check_bounds(certifiable_max, lower_bound)
    claim = _finite_or_none(claim_epsilon)
    if claim is None:
        return "inconclusive"
    if lower_bound > claim:
        return "refuted"
    if certifiable_max <= claim:
        return "inconclusive"
    return "consistent"


def audit_figures(claim_epsilon: float | None, lower_bound: float, certifiable_max: float,
                  decimals: int = 4) -> tuple[str, tuple[str, str]]:
    """The claim, the lower bound and the certifiable maximum as a user reads them: the claim
    rounded up, the two bounds rounded down, at ``decimals`` decimals or as many more as keep
    each bound reading above the claim exactly when it is above (so the printed comparison is
    the verdict's: a lower bound 1.00004 over a claim 1.0 reads "1.00004" over "1.00000", not
    "1" beside "1.0000"). No finite claim: ``"none (non-private)"``."""
    claim = _finite_or_none(claim_epsilon)
    if claim is None:
        return "none (non-private)", (format_down(lower_bound, decimals),
                                      format_down(certifiable_max, decimals))
    claim_s, (lower_s, most_s) = format_against(claim, [lower_bound, certifiable_max], decimals)
    return claim_s, (lower_s, most_s)


def verdict_text(verdict: str, claim_epsilon: float | None, certifiable_max: float,
                 lower_bound: float) -> str:
    """One line for people: the verdict and the numbers behind it. VerdictError naming the
    argument for a number :func:`audit_verdict` refuses, or a ``verdict`` other than the one
    it gives for these numbers."""
    given = audit_verdict(claim_epsilon, certifiable_max, lower_bound)
    if verdict != given:
        raise VerdictError(f"verdict {verdict!r:.80} is not what these numbers give"
                           f" ({given!r})")
    # each figure as audit_figures shows it, so the comparison read is the verdict's
    claim_s, (lower, most) = audit_figures(claim_epsilon, lower_bound, certifiable_max)
    if verdict == "refuted":
        return f"refuted: the lower bound {lower} exceeds the claimed epsilon {claim_s}"
    if verdict == "consistent":
        return (f"consistent: lower bound {lower} <= claim {claim_s}, and the audit could certify"
                f" up to {most}")
    if _finite_or_none(claim_epsilon) is None:
        return (f"inconclusive: no finite privacy claim to test (non-private run); measured"
                f" lower bound {lower}, the audit cannot certify epsilon above {most}")
    return (f"inconclusive: the audit cannot certify epsilon above {most} (claim {claim_s};"
            f" measured lower bound {lower})")


def audit_document(audit: str, *, claim_epsilon: float | None, certifiable_max: float,
                   lower_bound: float, confidence: float, setup: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    """The common JSON document of one audit (strict JSON: no NaN or infinity in the schema keys).

    ``extra`` adds audit-specific fields; they must not reuse a schema key. VerdictError
    naming the argument for an unknown ``audit``, a number :func:`audit_verdict` refuses, a
    ``confidence`` outside (0, 1) or a ``setup`` that is not a mapping.
    """
    if audit not in AUDIT_NAMES:
        raise VerdictError(f"audit must be one of {AUDIT_NAMES}, got {audit!r:.80}")
    confidence = check_open_fraction(confidence, "confidence", VerdictError)
    if not isinstance(setup, Mapping):
        raise VerdictError(f"setup must be a mapping (a dict), got {type(setup).__name__}")
    verdict = audit_verdict(claim_epsilon, certifiable_max, lower_bound)
    claim = _finite_or_none(claim_epsilon)
    doc: dict[str, Any] = {
        "audit": audit, "claim_epsilon": claim, "certifiable_max": float(certifiable_max),
        "lower_bound": float(lower_bound), "verdict": verdict,
        "verdict_text": verdict_text(verdict, claim, certifiable_max, lower_bound),
        "confidence": float(confidence), "setup": dict(setup),
    }
    clash = set(doc) & set(extra)
    if clash:
        raise VerdictError(f"audit-specific fields reuse schema keys: {sorted(clash)}")
    doc.update(extra)
    return doc


def write_audit_json(run_dir: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` atomically to ``RUN_DIR/audit/<doc["audit"]>.json``; returns the path.

    Raises VerdictError when the document is not a dict, not strict JSON or names no known
    audit, AuditError
    when ``run_dir`` is empty (the current directory), only spaces or holds NUL, OSError when
    the directory cannot be written (nothing partial is left behind).
    """
    from audits.verify import AuditError

    run = check_path(run_dir, "run_dir", AuditError)
    if not isinstance(doc, dict) or doc.get("audit") not in AUDIT_NAMES:
        shown = doc.get("audit") if isinstance(doc, dict) else type(doc).__name__
        raise VerdictError(f"not an audit document: audit={shown!r:.80}")
    try:
        text = json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:  # a NaN, an infinity or an object JSON has not
        raise VerdictError(f"doc is not strict JSON ({err}); nothing written") from err
    from secure_fedora.core.files import atomic_write_text

    out = run / "audit"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['audit']}.json"
    atomic_write_text(path, text)
    return path


def config_rebuild_problem(run_dir: str | Path, audit: str) -> str | None:
    """Why ``audit`` cannot rebuild the run in ``run_dir`` from its config.toml: its data or
    model was given through the Python API (results.json ``assumptions.inputs_outside_config``),
    so the config would rebuild other data or another model; None when the config describes
    the run (or results.json is absent or unreadable: the audit's own checks handle that).
    AuditError when ``run_dir`` is not a path (see :func:`privacy.paths.check_path`)."""
    from audits.verify import AuditError
    from secure_fedora.runtimes.results import inputs_outside_config

    path = check_path(run_dir, "run_dir", AuditError) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    given = inputs_outside_config(results)
    if not given:
        return None
    return (f"this run's {' and '.join(given)} came from the Python API, not from its"
            f" config.toml (results.json assumptions.inputs_outside_config); `audit {audit}`"
            " rebuilds the run from config.toml and would audit other data or another model:"
            " audit such a run through the Python API or describe its data and model in the"
            " config ([data] source, [model] factory)")


def config_claim_problem(run_dir: str | Path, privacy_enabled: bool, audit: str) -> str | None:
    """Why ``audit`` must not take a run's config.toml at its word: it disables privacy
    (``privacy_enabled`` False) while the run claims differential privacy
    (:func:`audits.verify.dp_claim_basis`: a signed anchor, ledgers/, results.json recording
    DP), so config.toml was edited after a DP run and auditing it as non-private would hide
    the claim. None when config.toml enables privacy or nothing in the run claims DP.
    AuditError when ``run_dir`` is not a path."""
    from audits.verify import AuditError, dp_claim_basis

    if privacy_enabled:
        return None
    run = check_path(run_dir, "run_dir", AuditError)
    try:
        results = json.loads((run / "results.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        results = None  # the audit's own checks, and `audit verify`, report it
    basis = dp_claim_basis(run, False, results if isinstance(results, dict) else None)
    if not basis:
        return None
    return (f"config.toml disables privacy, but the run claims differential privacy"
            f" ({'; '.join(basis)}): config.toml was changed after the run; restore the run's"
            f" config.toml (`audit {audit}` would audit it as a non-private run), and run"
            " `audit verify`")


def run_config_problem(run_dir: Path, cfg: ExperimentConfig) -> str | None:
    """Why ``cfg`` is not the config of the run in ``run_dir`` (None: it is): its
    :func:`~secure_fedora.core.config.config_hash` must be the ``config_hash`` the run's
    results.json records, or, without a readable one, that of the run's config.toml. A run
    directory holding neither cannot show which config it ran, which is a problem too. The
    canary, white-box and replay audits refuse a ``run_dir`` with such a ``cfg`` (their
    Python functions and CLI alike) before anything trains. Reads only."""
    from secure_fedora.core.config import ConfigError, config_hash, load_run_config

    actual = config_hash(cfg)
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        results = None
    recorded = results.get("config_hash") if isinstance(results, dict) else None
    if isinstance(recorded, str):
        if recorded == actual:
            return None
        return (f"the config hashes to {actual[:16]}..., but {run_dir / 'results.json'} records"
                f" config_hash {recorded[:16]}...: it is not the config this run ran (another"
                " run's, or config.toml changed after the run); audit the run with its own,"
                " unchanged config.toml")
    path = run_dir / "config.toml"
    if not path.is_file():
        return (f"{run_dir} holds no results.json recording a config_hash and no config.toml:"
                " the config cannot be checked to be this run's; give the run's own directory")
    try:
        own, _ = load_run_config(path)
    except ConfigError as err:
        return f"{path} is not a valid config ({err}), so the config cannot be checked against it"
    if config_hash(own) != actual:
        return (f"the config is not {path} (their config hashes differ): audit the run with its"
                " own config.toml")
    return None
