"""Config-known audit: replay a run's noise from its config and infer membership.

Threat: an attacker who knows the run's config (experiment seed, client index, model, DP
parameters) and the code. With ``[privacy] noise = "reproducible"`` every noise draw is a
function of that config, so the attacker can regenerate it; with ``"csprng"`` the key comes
from ``os.urandom`` and the config says nothing about the noise.

The game (the standard DP distinguishing game, all but one bit known to the attacker):

1. The target client's release is one DP-SGD step, computed by the project's own code path
   (:func:`privacy.dpsgd.poisson_sample` and :class:`privacy.dpsgd.DPSGD`, the pieces the
   runtime's DP oracle is built from) with the run's clip norm, sampling rate and DP-SGD noise
   multiplier (read from the client's ledger), on the initial model of the config (public: it
   is seeded by the experiment seed), and on ``records`` of the client's own training records
   with or without one target record (add/remove neighbours).
2. Each trial flips a secret fair coin (the auditor's generator, never the attacker's): heads,
   the target is in; then the release is made with the run's noise mode exactly as the run
   makes it -- ``"reproducible"``: the client's generator seeded from the config; ``"csprng"``:
   a fresh :class:`privacy.noise.CsprngNoise` (a new key, as in every run or restart).
3. The attacker replays the config-seeded stream for both hypotheses (the Poisson sample and
   the noise) and guesses the hypothesis whose replayed release is nearest (L2) to the
   observed one.

Correct guesses over the trials become an epsilon lower bound with
:func:`audits.canary.epsilon_lower_bound` (one-sided Clopper-Pearson, union bound): with
probability >= ``confidence`` it is below the epsilon of any (epsilon, delta)-DP release. One
step of the run is a marginal of everything the client released, so the client's recorded
epsilon (its ledger's last ``epsilon_after``) is a valid claim for it. The claim is trusted
only after the ledger's chain, fields and signatures verify under the run's allowlist (or an
independently registered one, ``--allowlist``), and the noise mode is the config's only when
every DP-SGD entry records that mode (and anchor.json, when present, or the copy kept apart,
``--anchor``, records config.toml's digest): an edited ledger or config is an error. Trials are independent
(a fresh coin each, and under CSPRNG a fresh key each), so no independence assumption is
needed beyond that. ``certifiable_max`` is the bound a perfect attacker would get with the
same counts; when it is not above the claim the audit cannot refute it ("inconclusive").

Verdicts: ``"refuted"`` (lower bound above the claim: the release is not private against a
config-knowing attacker), ``"consistent"`` (not refuted, and the audit had the power to),
``"inconclusive"`` (too few trials to refute the claim even with perfect guesses).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from audits.arguments import check_count, check_seed
from audits.canary import CanaryAuditError, epsilon_lower_bound
from audits.options import API_AUDIT_OPTIONS
from audits.verdict import (
    VerdictError,
    audit_document,
    audit_figures,
    audit_verdict,
    config_claim_problem,
    config_rebuild_problem,
    run_config_problem,
)
from privacy.dpsgd import DPSGD, poisson_sample
from privacy.errors import ToolkitError
from privacy.identity import PublicIdentity, client_ids
from privacy.ledger import NON_RELEASES
from privacy.noise import NoiseSource, make_noise_source
from privacy.paths import check_path
from secure_fedora.core.config import (
    ConfigError,
    ExperimentConfig,
    load_run_config,
    unregistered_hint,
)
from secure_fedora.data.partition import ClientData

__all__ = ["AutomaticTrialsCannotRefuteError", "ReplayAuditError", "ReplayAuditResult",
           "certifiable_max", "run_replay_audit", "trials_for_claim", "write_replay_result"]

#: Largest trial count the automatic choice goes to (about 80 s of CPU for the MLP).
MAX_AUTO_TRIALS = 20_000
#: Most trials one audit runs (each is one DP-SGD step; about an hour for the MLP): the
#: certifiable bound grows only logarithmically, and torch cannot draw the coins of 2**63.
MAX_TRIALS = 1_000_000
DEFAULT_RECORDS = 64
"""Records of the audited step besides the target (fewer when the client has fewer)."""
#: Trials timed before the replay's whole time is estimated (``progress``).
ESTIMATE_AFTER = 20


class ReplayAuditError(ToolkitError, ValueError):
    """A run that cannot be audited this way, or bad arguments; the message says why."""


class NoPrivacyClaimError(ReplayAuditError):
    """The run makes no differential-privacy claim (:func:`audits.verify.dp_claim_basis`
    finds none): there is no noise to replay and no claim to test. Not a failure: the CLI
    exits with :data:`audits.verdict.NO_DP_CLAIM_EXIT`, as ``audit verify`` does."""


class AutomaticTrialsCannotRefuteError(ReplayAuditError):
    """The automatic trial count stops at :data:`MAX_AUTO_TRIALS`, and even a perfect
    attacker could not certify an epsilon above the claim with that many trials: the verdict
    could only be inconclusive, so no trial is run. ``trials``: the capped count; ``needed``:
    about how many trials could refute the claim (None when not even :data:`MAX_TRIALS`
    could). Not a failure of the run: the CLI exits 3 (inconclusive), writing nothing; an
    explicit ``trials`` runs as asked."""

    def __init__(self, message: str, trials: int, needed: int | None) -> None:
        super().__init__(message)
        self.trials = trials
        self.needed = needed


@dataclass
class ReplayAuditResult:
    """The audit's outcome, serialized as ``RUN_DIR/audit/replay.json``."""

    claim_epsilon: float | None
    certifiable_max: float
    lower_bound: float
    verdict: str
    trials: int
    correct: int
    confidence: float
    setup: dict[str, Any] = field(default_factory=dict)
    #: What the checks of the run could not check (a method config.toml names that this
    #: process has not registered, whose config checks were not run; files that could not be
    #: read to look for private keys, ...), each as ``audit verify`` words its unchecked warning.
    unchecked: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The replay.json document: the common audit document (:func:`audits.verdict.
        audit_document`: ``"audit": "replay"`` first, and ``verdict_text`` worded as the CLI
        prints it) with every field of this result.
        VerdictError (a ValueError) for a figure the verdict refuses (NaN, negative) or a
        ``verdict`` other than the one the figures give."""
        d = asdict(self)
        common = {k: d.pop(k) for k in ("claim_epsilon", "certifiable_max", "lower_bound",
                                        "confidence", "setup")}
        recorded = d.pop("verdict")
        doc = audit_document("replay", **common, **d)  # its verdict, from the figures
        if doc["verdict"] != recorded:
            raise VerdictError(f"verdict {recorded!r:.80} is not what the result's figures give"
                               f" ({doc['verdict']!r})")
        return doc


def certifiable_max(trials: int, delta: float, confidence: float = 0.95) -> float:
    """The lower bound a perfect attacker gets from ``trials`` balanced trials (no errors);
    ReplayAuditError unless ``trials`` is an int >= 0."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ReplayAuditError(f"trials must be an int >= 0, got {trials!r:.80}")
    check_count(trials, "trials", ReplayAuditError)
    members = trials // 2
    non_members = trials - members
    try:
        if members < 1 or non_members < 1:  # still check delta and confidence
            epsilon_lower_bound(0, 1, 0, 1, delta, confidence)
            return 0.0
        return epsilon_lower_bound(members, members, 0, non_members, delta,
                                   confidence).epsilon_lower_bound
    except CanaryAuditError as err:  # delta or confidence, named there
        raise ReplayAuditError(str(err)) from None


def trials_for_claim(claim: float, delta: float, confidence: float = 0.95,
                     cap: int = MAX_AUTO_TRIALS) -> int:
    """Fewest trials (even, >= 40) whose certifiable maximum exceeds ``claim`` by 10%, or ``cap``;
    ReplayAuditError unless ``claim`` is a number >= 0 and ``cap`` an int."""
    if isinstance(claim, bool) or not isinstance(claim, int | float) or not claim >= 0:
        raise ReplayAuditError(f"claim must be a number >= 0, got {claim!r:.80}")
    if isinstance(cap, bool) or not isinstance(cap, int):
        raise ReplayAuditError(f"cap must be an int, got {cap!r:.80}")
    if claim > sys.float_info.max:  # an int beyond float: an infinite claim
        claim = math.inf
    trials = 40
    while trials < cap and certifiable_max(trials, delta, confidence) <= 1.1 * claim:
        trials = min(cap, int(trials * 1.25) // 2 * 2 + 2)
    return trials


def _ledger_claim(run_dir: Path, method: str, client_id: str, noise: str,
                  allowlist: Path | None = None,
                  options: Mapping[str, str] = API_AUDIT_OPTIONS,
                  scanned: list[str] | None = None,
                  allow_keys: dict[str, PublicIdentity] | None = None,
                  ) -> tuple[float, float, dict[str, Any], list[str], list[str]]:
    """(last epsilon_after, delta, params of the first DP-SGD entry, the mechanisms its
    releases used in ledger order, the texts of the warnings saying what the checks of the
    run could not check, as ``audit verify`` words them: files that could not be read to
    look for private keys, with ``allowlist`` a missing published allowlist) of the client's
    ledger. The claim spans every release, a
    plug-in mechanism's too: its entries verify with the ledger without its code, which only
    ``audit verify --import`` needs (to recompute their sensitivities).

    Guarantee: the ledger is intact and signed (the chain, fields and Ed25519 signatures of
    :func:`audits.verify.check_ledger_lines`, under ``allowlist``, else the run's
    ``keys/allowlist.json``), no private key material lies inside ``run_dir`` (whoever holds
    a signing key could have re-signed the ledger; with or without ``allowlist``), the
    claim and delta are finite and positive, and every DP-SGD entry records the noise mode
    ``noise`` (the config's): an edited ledger or config raises ReplayAuditError.
    ``scanned``: the caller has already held the run to ``allowlist`` (the check of
    :func:`audits.verify.check_anchor` with it), whose unchecked warnings these are: the run
    is not scanned again. ``allow_keys``: the keys the caller loaded from ``allowlist``.
    """
    from audits.verify import positive_number, refuse_private_keys, verified_ledger_entries

    rel = f"ledgers/{method}/{client_id}.jsonl"
    unchecked: list[str] = [] if scanned is None else list(scanned)
    valid = verified_ledger_entries(
        run_dir, method, client_id, error=ReplayAuditError,
        missing=f"no ledger {run_dir / rel}: was {method!r} run with privacy enabled?",
        allowlist=allowlist, options=options, warnings=unchecked,
        run_checked=scanned is not None, given_keys=allow_keys)
    if allowlist is None:  # with one, verified_ledger_entries looked (given_allowlist_findings)
        # a replay needs a DP claim, so no key file is excepted (as audit verify, for a DP run)
        unchecked = refuse_private_keys(run_dir, True, ReplayAuditError, f"{rel} is not trusted")
    dpsgd = [e for e in valid if e.get("mechanism") == "dpsgd"]
    if not dpsgd:
        raise ReplayAuditError(f"ledger {rel} has no DP-SGD entry to replay")
    for e in dpsgd:
        recorded = e["params"].get("noise")
        if recorded != noise:
            raise ReplayAuditError(
                f"{rel} entry {e['index']} records params.noise {recorded!r}, config.toml"
                f" gives privacy.noise = {noise!r}: the config is not this run's (restore"
                " the run's config.toml)")
    claim = positive_number(valid[-1]["epsilon_after"], f"{rel} last epsilon_after (the claim)",
                            ReplayAuditError)
    delta = positive_number(valid[-1]["delta"], f"{rel} last delta", ReplayAuditError)
    params = dpsgd[0]["params"]
    mechanisms = list(dict.fromkeys(e["mechanism"] for e in valid
                                    if e["mechanism"] not in NON_RELEASES))
    for key in ("noise_multiplier", "sample_rate"):
        positive_number(params.get(key), f"{rel} entry {dpsgd[0]['index']} params.{key}",
                        ReplayAuditError)
    if "clip_norm" in params:
        positive_number(params["clip_norm"], f"{rel} entry {dpsgd[0]['index']} params.clip_norm",
                        ReplayAuditError)
    return claim, delta, params, mechanisms, unchecked


def _anchored_config_problem(run_dir: Path) -> str | None:
    """Why config.toml is not the one the run's signed anchor.json records (None: it is, or
    the run has no anchor, whose absence `audit verify` reports)."""
    import hashlib

    from audits.verify import ANCHOR_FILENAME, _load_anchor

    path = run_dir / ANCHOR_FILENAME
    if not path.is_file():
        return None
    doc, problems = _load_anchor(path)
    if doc is None:
        return f"{path} does not verify ({problems[0].message}); run `audit verify`"
    expected = doc["files"].get("config.toml")
    actual = hashlib.sha256((run_dir / "config.toml").read_bytes()).hexdigest()
    if expected is not None and expected != actual:
        return ("config.toml is not the one anchor.json records (its SHA-256 differs): it was"
                " changed after the run; restore the run's config.toml")
    return None


def _raise_claim_problem(run_dir: Path, anchor_given: bool, cfg_enabled: bool | None) -> None:
    """For a run whose config.toml disables privacy (``cfg_enabled`` False) or is missing
    (None): NoPrivacyClaimError when nothing in the run claims DP, as ``audit verify``
    decides (:func:`audits.verify.dp_claim_basis`). A disabling config.toml in a run that
    claims DP is a ReplayAuditError naming the contradiction (config.toml was edited after a
    DP run). Returns (missing config.toml, a DP claim: the caller's error applies)."""
    from audits.verify import dp_claim_basis

    try:
        results = json.loads((run_dir / "results.json").read_text())
    except FileNotFoundError:
        results = None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ReplayAuditError(f"{run_dir / 'results.json'} is not readable JSON ({err}):"
                               " run `audit verify`") from None
    basis = dp_claim_basis(run_dir, cfg_enabled, results if isinstance(results, dict) else None,
                           anchor_given)
    if not basis:
        raise NoPrivacyClaimError("no differential-privacy claim: the run is not"
                                  " differentially private, so there is no noise to replay"
                                  " and no claim to test")
    if cfg_enabled is False:
        raise ReplayAuditError(config_claim_problem(run_dir, False, "replay") or (
            "config.toml disables privacy, but an anchor copy was given (only a DP run is"
            " anchored): config.toml was changed after the run, or the anchor is another"
            " run's; restore the run's config.toml, and run `audit verify`"))


def _choose_method(run_dir: Path, cfg: ExperimentConfig, method: str | None,
                   options: Mapping[str, str] = API_AUDIT_OPTIONS) -> str:
    """``method`` when the run's config has it, else (None) fedora when ``run_dir`` holds its
    ledgers, else the config's first method that has ledgers; ReplayAuditError otherwise."""
    if method is not None:
        if method not in cfg.methods:
            raise ReplayAuditError(f"method {method!r} is not in the run's methods {cfg.methods}:"
                                   f" name one with {options['method']}")
        return method
    for name in ("fedora", *cfg.methods):
        if (run_dir / "ledgers" / name).is_dir():
            return name
    raise ReplayAuditError(f"{run_dir} holds no ledgers/: run it first")


class _Step:
    """One DP-SGD step of the project's code on a fixed initial model (rebuilt per call)."""

    def __init__(self, cfg: ExperimentConfig, clients: Sequence[ClientData], clip: float,
                 sigma: float, rate: float, expected_batch: float) -> None:
        from secure_fedora.learning.client import PlainGradient
        from secure_fedora.runtimes.inprocess import build_context

        # the run's own initial model and loss (registered model or model.factory); a plain
        # oracle, so that the context hooks no DP-SGD of its own onto the module
        ctx = build_context(cfg, clients, oracle=PlainGradient(cfg.training.batch_size))
        self.module = ctx.flat.module
        self.loss = ctx.flat.task.checked
        self.init = [p.detach().clone() for p in self.module.parameters()]
        self.rate = rate
        self.dp = DPSGD(self.module, clip, sigma, expected_batch, make_noise_source(
            "reproducible", 0, 0))

    def release(self, x: Tensor, y: Tensor, noise: NoiseSource) -> Tensor:
        """The flat DP-SGD gradient of one Poisson-sampled step drawn from ``noise``."""
        with torch.no_grad():
            for p, p0 in zip(self.module.parameters(), self.init, strict=True):
                p.copy_(p0)
        self.dp.noise = noise
        index = poisson_sample(int(x.shape[0]), self.rate, noise)
        self.dp.private_gradient(x[index], y[index], self.loss)
        return torch.cat([p.grad.reshape(-1) for p in self.module.parameters()]).clone()


def _duration(seconds: float) -> str:
    """``seconds`` for people: seconds, minutes or hours, rounded."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _fewest_trials_above(claim: float, delta: float, confidence: float) -> int | None:
    """The fewest even trial count whose :func:`certifiable_max` exceeds ``claim``, or None
    when :data:`MAX_TRIALS` does not (the bound grows with the count: a bisection)."""
    if certifiable_max(MAX_TRIALS, delta, confidence) <= claim:
        return None
    low, high = 0, MAX_TRIALS // 2  # in pairs of trials: low's bound is not above, high's is
    while high - low > 1:
        mid = (low + high) // 2
        if certifiable_max(2 * mid, delta, confidence) > claim:
            high = mid
        else:
            low = mid
    return 2 * high


def _perfect_bound(trials: int, members: int, delta: float, confidence: float) -> float:
    """The bound a perfect attacker certifies from ``trials`` of which ``members`` are heads
    (both kinds present)."""
    return epsilon_lower_bound(members, members, 0, trials - members, delta,
                               confidence).epsilon_lower_bound


def _ask_for(count: int, options: Mapping[str, str]) -> str:
    """How the caller asks for ``count`` trials: ``--trials N`` on the command line,
    ``trials=N`` in Python."""
    flag = options["trials"]
    return f"{flag} {count}" if flag.startswith("--") else f"trials={count}"


def _trials_plan(trials: int, members: int, automatic: bool, claim: float, delta: float,
                 confidence: float, options: Mapping[str, str]) -> str:
    """The line said before the trials: how many, why, and whether they can refute the claim
    (``members``: the coins' heads, which the certifiable maximum is computed from)."""
    why = (f"automatic: the fewest whose certifiable max exceeds 1.1 x the claim, at most"
           f" {MAX_AUTO_TRIALS:,}; {options['trials']} sets it") if automatic \
        else options["trials"]
    line = f"replaying {trials:,} trials ({why})"
    if not 0 < members < trials:
        return line  # the coins fell one way: the replay is refused after the data is built
    best = _perfect_bound(trials, members, delta, confidence)
    if best <= claim:
        claim_s, (_, best_s) = audit_figures(claim, 0.0, best)
        line += (f"; even a perfect attacker certifies at most {best_s} with them, not above"
                 f" the claim {claim_s}, so the verdict can only be inconclusive")
        needed = _fewest_trials_above(claim, delta, confidence)
        if needed is not None:
            line += f"; about {needed:,} trials could refute it ({options['trials']})"
    return line


def _refuse_capped_trials(trials: int, members: int, claim: float, delta: float,
                          confidence: float, options: Mapping[str, str]) -> None:
    """AutomaticTrialsCannotRefuteError when the automatic count ``trials`` is the cap and
    even a perfect attacker could not certify above ``claim`` with it (``members`` heads):
    running them would take long and could only end inconclusive."""
    if trials < MAX_AUTO_TRIALS or not 0 < members < trials:
        return
    best = _perfect_bound(trials, members, delta, confidence)
    if best > claim:
        return
    claim_s, (_, best_s) = audit_figures(claim, 0.0, best)
    needed = _fewest_trials_above(claim, delta, confidence)
    text = (f"the automatic trial count stops at {MAX_AUTO_TRIALS:,}, and even a perfect"
            f" attacker certifies at most {best_s} with {trials:,} trials, not above the claim"
            f" {claim_s}: the verdict could only be inconclusive, so no trial was run; ")
    if needed is None:
        text += (f"not even {MAX_TRIALS:,} trials (the most one replay runs) could refute it,"
                 " so this audit cannot test the claim")
    else:
        text += (f"about {needed:,} trials could refute it (each one DP-SGD step): ask for"
                 f" them with {_ask_for(needed, options)}")
    raise AutomaticTrialsCannotRefuteError(text, trials, needed)


def _check_trials(trials: Any, options: Mapping[str, str]) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or not 2 <= trials <= MAX_TRIALS:
        raise ReplayAuditError(f"trials must be an int in [2, {MAX_TRIALS:,}]"
                               f" ({options['trials']}), got {trials!r:.80}")


def run_replay_audit(run_dir: str | Path, *, client: int = 0, method: str | None = None,
                     trials: int | None = None, records: int | None = None, confidence: float = 0.95,
                     seed: int = 0, allowlist: str | Path | None = None,
                     anchor: str | Path | None = None,
                     options: Mapping[str, str] = API_AUDIT_OPTIONS,
                     progress: Callable[[str], None] | None = None) -> ReplayAuditResult:
    """Replay the run's noise from its config and bound epsilon from membership guesses.

    ``run_dir`` must hold ``config.toml`` and the ledgers of a DP run. ``trials`` defaults to
    :func:`trials_for_claim` of the client's recorded epsilon; ``records`` to
    ``DEFAULT_RECORDS``, or ``data.train_per_client - 1`` when that is fewer. Raises ReplayAuditError for a
    run that is not private, a missing ledger, bad arguments, a ledger that fails its integrity
    check (fields, chain, signature) or records a claim that is not a finite positive number,
    and a config.toml that is not the run's (its noise mode differs from the one every DP-SGD
    entry records, anchor.json records another digest, or its config hash is not the
    ``config_hash`` results.json records: :func:`audits.verdict.run_config_problem`). Does not
    write anything.
    With the automatic count, when it stops at :data:`MAX_AUTO_TRIALS` and even a perfect
    attacker could not certify above the claim with that many, no trial is run:
    :class:`AutomaticTrialsCannotRefuteError` (a ReplayAuditError) says how many trials could
    refute it; an explicit ``trials`` runs as asked, whatever it can certify. What the checks
    could not check is the result's ``unchecked`` (a method config.toml names that this
    process has not registered, whose config checks were not run; a file the key scan could
    not read), worded as ``audit verify`` words it.

    ``allowlist`` (CLI ``--allowlist``): an independently registered allowlist.json; the
    ledger's signatures are checked under it instead of the run's ``keys/allowlist.json``
    (a ``keys/allowlist.json`` listing a party or key it does not register is then an error:
    :func:`audits.verify.given_allowlist_findings`), so a ledger its owner re-signed with a
    new key is refused. Private key material inside the run is an error with or without it. ``anchor`` (CLI ``--anchor``): a
    copy of the run's anchor.json kept apart, checked as ``audit verify --anchor`` checks it
    (:func:`audits.verify.check_anchor`: signature and signer, config.toml and results.json
    digests, run name, config hash, runtime and methods, every ledger's head and length)
    instead of the run's own anchor.json. Without them the run's own files are used.
    Errors name the arguments (``options``; the CLI passes :data:`~audits.options.CLI_AUDIT_OPTIONS`, its flags).

    ``progress`` (the CLI prints it to stderr): called before the first trial with a line
    saying how many trials run and why (and, when even a perfect attacker could not refute
    the claim with that many, that the verdict can only be inconclusive), and, for more than
    :data:`ESTIMATE_AFTER` trials, once after that many with the estimated time of them all.
    The steps run on ``training.threads`` torch threads when the config sets it, else on one
    (the step's batch is a few dozen rows; more threads only wait on each other).
    """
    run_dir = check_path(run_dir, "run_dir", ReplayAuditError)
    # the arguments are bad input whatever the run holds (one without a DP claim included):
    # checked before it is read
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
            or not 0 < confidence < 1:
        raise ReplayAuditError(f"confidence must be in (0, 1) ({options['confidence']}), got"
                               f" {confidence!r}")
    check_seed(seed, ReplayAuditError, flag=options["seed"])
    if trials is not None:
        _check_trials(trials, options)
    from audits.verify import load_given_allowlist, load_given_anchor

    # the auditor's own registration: bad input to the audit, checked before the run is read
    allow_path, allow_keys = load_given_allowlist(allowlist, ReplayAuditError, options) \
        if allowlist is not None else (None, None)
    # the same: an unusable anchor copy is bad input, before the run
    anchor_path, anchor_doc = load_given_anchor(anchor, ReplayAuditError, options) \
        if anchor is not None else (None, None)
    if not (run_dir / "config.toml").is_file():
        _raise_claim_problem(run_dir, anchor is not None, None)
        raise ReplayAuditError(f"{run_dir} has no config.toml (the run's config)")
    try:
        cfg, unknown = load_run_config(run_dir / "config.toml")
    except ConfigError as err:
        raise ReplayAuditError(str(err)) from None
    # the replay rebuilds the client's data and model; a method is only a ledger folder here
    for kind, name in unknown:
        if kind != "method":
            raise ReplayAuditError(
                "the replay rebuilds the run's data and model, and its config.toml names "
                + unregistered_hint(kind, name, "audits.replay.run_replay_audit"))
    # accepted, never silently (as audit verify warns): what was not checked, as the key
    # scan's notes are (the result's ``unchecked``, printed by the CLI as a warning line)
    not_run = [f"config.toml names "
               f"{unregistered_hint('method', name, 'audits.replay.run_replay_audit')}: the"
               " config checks it declares were not run; the replay reads its ledger only"
               for _kind, name in unknown]
    problem = config_rebuild_problem(run_dir, "replay")
    if problem is not None:
        raise ReplayAuditError(problem)
    n_clients = cfg.data.num_clients
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < n_clients:
        raise ReplayAuditError(f"client must be an index in [0, {n_clients})"
                               f" ({options['client']}), got {client!r}")
    if records is None:
        records = min(DEFAULT_RECORDS, cfg.data.train_per_client - 1)
    if isinstance(records, bool) or not isinstance(records, int) \
            or not 1 <= records < cfg.data.train_per_client:
        raise ReplayAuditError(
            f"records must be in [1, {cfg.data.train_per_client}) ({options['records']}; this run's "
            f"data.train_per_client = {cfg.data.train_per_client}), got {records!r}")
    if not cfg.privacy.enabled:
        _raise_claim_problem(run_dir, anchor is not None, False)
        raise AssertionError("unreachable: _raise_claim_problem always raises here")
    method = _choose_method(run_dir, cfg, method, options)
    cid = client_ids(n_clients)[client]
    scanned: list[str] | None = None  # with both, one scan of the run: check_anchor's
    if anchor_path is not None:
        from audits.verify import check_anchor

        scanned = [] if allow_path is not None else None
        check_anchor(run_dir, anchor_path, allowlist=allow_path, error=ReplayAuditError,
                     options=options, warnings=scanned, given_keys=allow_keys,
                     anchor_doc=anchor_doc)
    else:
        problem = _anchored_config_problem(run_dir)
        if problem is not None:
            raise ReplayAuditError(problem)
    claim, delta, params, mechanisms, unchecked = _ledger_claim(
        run_dir, method, cid, cfg.privacy.noise, allow_path, options, scanned, allow_keys)
    # an anchor pins config.toml's bytes; without one, results.json's config_hash does
    problem = run_config_problem(run_dir, cfg)
    if problem is not None:
        raise ReplayAuditError(problem)
    automatic = trials is None
    if trials is None:
        trials = trials_for_claim(claim, delta, confidence)
    _check_trials(trials, options)
    coins = torch.rand(trials, generator=torch.Generator().manual_seed(seed)) < 0.5
    if automatic:  # before any trial, and before the data is built
        _refuse_capped_trials(trials, int(coins.sum()), claim, delta, float(confidence),
                              options)
    if progress is not None:
        progress(_trials_plan(trials, int(coins.sum()), automatic, claim, delta,
                              float(confidence), options))

    from secure_fedora.learning.devices import threads_applied
    from secure_fedora.runtimes.inprocess import build_clients

    # the run's thread count (training.threads, as its in-process training held it), else one
    # (torch's default of every core made each tiny step wait on descheduled workers: 10-30x
    # slower on a loaded 2-core machine); the process's own again after
    with threads_applied(cfg, default=1):
        clients = build_clients(cfg)
        data = clients[client]
        if records >= data.num_train:
            raise ReplayAuditError(f"records must be below client {cid}'s {data.num_train} "
                                   f"training rows ({options['records']}), got {records}")
        # target: the last one
        x_in, y_in = data.train_x[:records + 1], data.train_y[:records + 1]
        x_out, y_out = x_in[:records], y_in[:records]
        rate = float(params["sample_rate"])  # checked finite and positive by _ledger_claim
        step = _Step(cfg, clients, float(params.get("clip_norm", cfg.privacy.max_grad_norm)),
                     float(params["noise_multiplier"]), rate, rate * (records + 1))

        def replayed() -> NoiseSource:  # what the attacker derives from the config
            return make_noise_source("reproducible", cfg.seed, client)

        def victim() -> NoiseSource:  # what the run's noise mode gives the client
            return make_noise_source(cfg.privacy.noise, cfg.seed, client)

        # Under replay both candidates are deterministic, so the attacker computes them once.
        candidate_out = step.release(x_out, y_out, replayed())
        candidate_in = step.release(x_in, y_in, replayed())
        guesses = torch.zeros(trials, dtype=torch.bool)
        start = time.perf_counter()
        for t in range(trials):
            if progress is not None and t == ESTIMATE_AFTER < trials:
                per_trial = (time.perf_counter() - start) / t
                progress(f"  about {_duration(per_trial * trials)} for the {trials:,} trials"
                         f" ({per_trial * 1e3:.1f} ms a trial over the first {t})")
            member = bool(coins[t])
            observed = step.release(x_in, y_in, victim()) if member \
                else step.release(x_out, y_out, victim())
            guesses[t] = float(torch.linalg.vector_norm(observed - candidate_in)) \
                < float(torch.linalg.vector_norm(observed - candidate_out))
        step.dp.close()
    members = int(coins.sum())
    if members == 0 or members == trials:
        raise ReplayAuditError(f"all {trials} coins fell one way: use more trials")
    tp = int((guesses & coins).sum())
    fp = int((guesses & ~coins).sum())
    bound = epsilon_lower_bound(tp, members, fp, trials - members, delta, confidence)
    best = _perfect_bound(trials, members, delta, confidence)
    lower = bound.epsilon_lower_bound
    verdict = audit_verdict(claim, best, lower)
    correct = int((guesses == coins).sum())
    setup = {
        "run_dir": str(run_dir), "method": method, "client": cid, "noise": cfg.privacy.noise,
        "experiment_seed": cfg.seed,
        "release": "one DP-SGD step (privacy.dpsgd: Poisson sampling, clipping, Gaussian noise)"
                   " on the config's initial model",
        "attacker": "knows the config and code; replays the config-seeded noise stream for "
                    "both hypotheses and picks the nearest",
        "records": records, "target": f"training record {records} of {cid}",
        "noise_multiplier": float(params["noise_multiplier"]), "sample_rate": rate,
        "clip_norm": step.dp.max_grad_norm, "delta": delta,
        "members": members, "true_positives": tp, "false_positives": fp,
        "accuracy": correct / trials,
        "claim_source": f"ledgers/{method}/{cid}.jsonl last epsilon_after",
        # the claim is the whole ledger's spend; only the DP-SGD step is replayed
        "claim_mechanisms": mechanisms,
        "auditor_seed": seed,
    }
    return ReplayAuditResult(claim_epsilon=claim, certifiable_max=best, lower_bound=lower,
                             verdict=verdict, trials=trials, correct=correct,
                             confidence=float(confidence), setup=setup,
                             unchecked=[*not_run, *unchecked])


def write_replay_result(run_dir: str | Path, result: ReplayAuditResult) -> Path:
    """Write ``RUN_DIR/audit/replay.json`` (atomically, strict JSON); returns its path.

    Raises ReplayAuditError, writing nothing, when a figure is NaN or infinite, the verdict
    is not the one the figures give (:meth:`ReplayAuditResult.to_json`), or ``run_dir``
    is empty (the current directory), only spaces or holds NUL."""
    from secure_fedora.core.files import atomic_write_text

    path = check_path(run_dir, "run_dir", ReplayAuditError) / "audit" / "replay.json"
    try:
        text = json.dumps(result.to_json(), indent=2, allow_nan=False)
    except ValueError as err:  # a NaN or infinity, or a verdict its figures do not give
        raise ReplayAuditError(f"replay.json would not be strict JSON with the verdict its"
                               f" figures give: {err}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
