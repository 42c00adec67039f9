"""Empirical privacy audit: canary membership inference turned into a lower bound on epsilon.

Procedure (Jagielski, Ullman, Oprea, NeurIPS 2020, "Auditing Differentially Private Machine
Learning: How Private is Private SGD?"; Nasr et al., IEEE S&P 2021):

1. Draw ``m`` canaries (records that the model would not fit without memorizing them:
   random-noise inputs shaped like the client's with random labels, or real images with a
   wrong label) and include each in one client's training data independently with
   probability 1/2.
2. Run the federation; take the audited client's released model.
3. Score each canary by its negative loss under the released model (higher: more likely a
   member) and split the canaries at random into a calibration half and an evaluation half.
   The calibration half picks the decision threshold; the evaluation half, which played no
   part in that choice, gives the true and false positive counts.
4. An (epsilon, delta)-DP release satisfies, for every test, ``TPR <= e^eps FPR + delta`` and
   ``TNR <= e^eps FNR + delta``. With one-sided Clopper-Pearson bounds ``TPR_lo`` and
   ``FPR_hi``, each at error ``(1 - confidence) / 2`` (a union bound, so both hold together
   with probability at least ``confidence``)::

       eps_lb = max( log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo)) )

   clamped at 0. If the release is (eps, delta)-DP, then ``eps_lb <= eps`` with probability at
   least ``confidence``.

Assumption in the confidence statement (stated, not hidden): the per-canary outcomes are
treated as independent Bernoulli trials with the test's TPR/FPR. That is exact when each
canary is audited in its own training run; with all canaries in one run (as here, to keep the
audit affordable) it is the standard approximation of the auditing literature. Steinke, Nasr
and Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run") prove that for
pure DP the number of correct guesses in one run is dominated by the corresponding binomial,
which is why the approximation is considered sound in practice. The audit gives a *lower*
bound: a small value does not prove privacy, it only fails to refute the claim.

Power: a perfect attacker (TPR 1, FPR 0 on the evaluation half) certifies at most
:func:`certifiable_maximum` (about 3.0 for 300 canaries at confidence 0.95); the audit calls a
claim "consistent" only when that maximum is above it, and "inconclusive: the audit cannot
certify epsilon above X" otherwise (:mod:`audits.verdict`). To test larger claims, use more
canaries or the white-box audit (:mod:`audits.whitebox`).

What is attacked is the audited client's final model ``theta_i`` (what it last released).
Training is the runtime's own (:class:`secure_fedora.runtimes.inprocess.Simulation`); with
``privacy.enabled`` every data-dependent input of that model is an accounted release (the
config schema refuses DP with un-noised relatedness), and the claim is the last
``epsilon_after`` in the client's ledger.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from scipy import stats
from torch import Tensor

from audits.arguments import check_config, check_count, check_open_fraction, check_seed
from audits.options import API_AUDIT_OPTIONS
from audits.verdict import audit_document, audit_verdict, run_config_problem
from privacy.accounting import format_exact
from privacy.errors import ToolkitError
from privacy.identity import client_ids
from privacy.paths import check_path
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.core.plugins import derived_config
from secure_fedora.data.partition import ClientData
from secure_fedora.data.sources import load_dataset, rotate_images, to_float_images
from secure_fedora.data.userdata import label_space
from secure_fedora.learning.client import FlatModel
from secure_fedora.learning.devices import threads_applied
from secure_fedora.runtimes.inprocess import Simulation, build_clients

__all__ = [
    "CanaryAuditError",
    "CanaryAuditResult",
    "CanarySet",
    "EpsilonLowerBound",
    "canary_scores",
    "certifiable_maximum",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "insert_canaries",
    "make_canaries",
    "run_canary_audit",
    "run_config_problem",
    "split_audit",
    "split_audit_rounds",
]

CanaryKind = Literal["noise", "mislabeled"]
CANARY_KINDS: tuple[str, ...] = ("noise", "mislabeled")
#: Most canaries one audit inserts (each is a training row of the audited client; the
#: certifiable bound grows only logarithmically beyond a few thousand).
MAX_CANARIES = 100_000
#: Most canary input values held at once (float32: 1 GiB).
MAX_CANARY_VALUES = 2**28
NUM_CLASSES = 10


class CanaryAuditError(ToolkitError, ValueError):
    """Bad input to the canary audit, or a run that cannot be audited; the message says why."""


# --------------------------------------------------------------------------- statistics


def _check_count(k: int, n: int, k_name: str = "k", n_name: str = "n") -> None:
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) \
            or not isinstance(n, int) or n < 0 or not 0 <= k <= n:
        raise CanaryAuditError(f"need integers 0 <= {k_name} <= {n_name}, got {k_name}={k!r:.80},"
                               f" {n_name}={n!r:.80}")
    check_count(n, n_name, CanaryAuditError)  # scipy refuses ints beyond int64


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise CanaryAuditError(f"error level alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided lower Clopper-Pearson bound: P(p >= bound) >= 1 - alpha for k of n successes.

    Returns 0.0 for ``k = 0`` (and for ``n = 0``: no information).
    """
    _check_count(k, n)
    alpha = _check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided upper Clopper-Pearson bound: P(p <= bound) >= 1 - alpha for k of n successes.

    Returns 1.0 for ``k = n`` (and for ``n = 0``).
    """
    _check_count(k, n)
    alpha = _check_alpha(alpha)
    if k == n:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, k + 1, n - k))


@dataclass(frozen=True)
class EpsilonLowerBound:
    """A lower bound on epsilon from one membership test at one threshold.

    ``epsilon_lower_bound`` holds with probability ``>= confidence`` for an (eps, delta)-DP
    release (see the module docstring for the independence assumption). ``direction`` names
    which inequality gave it: ``"tpr/fpr"`` or ``"tnr/fnr"`` (``"none"`` when it is 0).
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    threshold: float
    direction: str
    true_positives: int
    members: int
    false_positives: int
    non_members: int
    tpr: float
    fpr: float
    tpr_lower: float
    fpr_upper: float


def _log_ratio(num: float, den: float) -> float:
    if num <= 0.0:
        return 0.0
    if den <= 0.0:
        return math.inf
    return max(0.0, math.log(num / den))


def epsilon_lower_bound(true_positives: int, members: int, false_positives: int,
                        non_members: int, delta: float, confidence: float = 0.95,
                        threshold: float = math.nan) -> EpsilonLowerBound:
    """Epsilon lower bound from TP of ``members`` and FP of ``non_members`` at one threshold.

    Guarantee: for an (eps, delta)-DP mechanism, with probability ``>= confidence`` the
    returned bound is ``<= eps`` (Clopper-Pearson, union bound over the two one-sided
    intervals). Never negative; finite whenever both counts are positive.
    """
    _check_count(true_positives, members, "true_positives", "members")
    _check_count(false_positives, non_members, "false_positives", "non_members")
    if members == 0 or non_members == 0:
        raise CanaryAuditError(
            f"need at least one member and one non-member, got {members} and {non_members}"
        )
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        raise CanaryAuditError(f"delta must be in [0, 1), got {delta!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
            or not 0 < confidence < 1:
        raise CanaryAuditError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = (1.0 - confidence) / 2.0
    tpr_lo = clopper_pearson_lower(true_positives, members, alpha)
    fpr_hi = clopper_pearson_upper(false_positives, non_members, alpha)
    forward = _log_ratio(tpr_lo - delta, fpr_hi)
    backward = _log_ratio(1.0 - fpr_hi - delta, 1.0 - tpr_lo)
    eps = max(forward, backward)
    direction = "none" if eps == 0.0 else ("tpr/fpr" if forward >= backward else "tnr/fnr")
    return EpsilonLowerBound(
        epsilon_lower_bound=eps, confidence=float(confidence), delta=float(delta),
        threshold=float(threshold), direction=direction,
        true_positives=true_positives, members=members,
        false_positives=false_positives, non_members=non_members,
        tpr=true_positives / members, fpr=false_positives / non_members,
        tpr_lower=tpr_lo, fpr_upper=fpr_hi,
    )


def _bound_at(scores: Tensor, member: Tensor, threshold: float, delta: float,
              confidence: float) -> EpsilonLowerBound:
    guess = scores >= threshold
    tp = int((guess & member).sum())
    fp = int((guess & ~member).sum())
    return epsilon_lower_bound(tp, int(member.sum()), fp, int((~member).sum()), delta,
                               confidence, threshold)


def _candidate_thresholds(scores: Tensor) -> list[float]:
    values = torch.unique(scores).tolist()
    return [*values, math.inf]


def certifiable_maximum(members: int, non_members: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The bound a perfect attacker gets on ``members`` + ``non_members`` evaluation canaries.

    Every member guessed in and every non-member out (TPR 1, FPR 0):
    ``log(((alpha/2)^(1/members) - delta) / (1 - (alpha/2)^(1/non_members)))`` with
    ``alpha = 1 - confidence``. No outcome of the audit can certify more; a claim at or above
    it cannot be refuted. (300 canaries, halves of about 75 + 75: about 3.0.)
    """
    return epsilon_lower_bound(members, members, 0, non_members, delta,
                               confidence).epsilon_lower_bound


@dataclass(frozen=True)
class SplitAudit:
    """Result of :func:`split_audit`: the bound on the evaluation half, and the split sizes."""

    bound: EpsilonLowerBound
    calibration_size: int
    evaluation_size: int
    calibration_epsilon: float

    @property
    def certifiable_max(self) -> float:
        """:func:`certifiable_maximum` for this evaluation part's members and non-members."""
        b = self.bound
        return certifiable_maximum(b.members, b.non_members, b.delta, b.confidence)


def split_audit(scores: Tensor, member: Tensor, delta: float, confidence: float = 0.95,
                seed: int = 0, calibration_fraction: float = 0.5) -> SplitAudit:
    """Pick the threshold on a random calibration part, bound epsilon on the rest.

    Guarantee: the threshold is a function of the calibration canaries only, so the
    Clopper-Pearson statement on the evaluation canaries is valid at ``confidence``.
    ``calibration_epsilon`` is the best bound on the calibration part itself; it is
    optimistically biased (the threshold was tuned on it) and is reported for diagnosis only.
    """
    if not isinstance(scores, Tensor) or not isinstance(member, Tensor) \
            or scores.dim() != 1 or scores.shape != member.shape:
        raise CanaryAuditError("scores and member must be 1-D tensors of equal length")
    if member.dtype != torch.bool:
        raise CanaryAuditError(f"member must be a bool tensor, got {member.dtype}")
    if not bool(torch.isfinite(scores).all()):
        raise CanaryAuditError("scores contain NaN or infinite values")
    check_open_fraction(calibration_fraction, "calibration_fraction", CanaryAuditError)
    check_seed(seed, CanaryAuditError, flag=API_AUDIT_OPTIONS["seed"])
    m = scores.shape[0]
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    n_cal = int(round(calibration_fraction * m))
    cal, ev = perm[:n_cal], perm[n_cal:]
    for name, idx in (("calibration", cal), ("evaluation", ev)):
        if int(member[idx].sum()) == 0 or int((~member[idx]).sum()) == 0:
            raise CanaryAuditError(
                f"the {name} part of the {m} canaries has no members or no non-members;"
                " use more canaries"
            )
    cal_scores, cal_member = scores[cal], member[cal]
    best: EpsilonLowerBound | None = None
    for t in _candidate_thresholds(cal_scores):
        b = _bound_at(cal_scores, cal_member, t, delta, confidence)
        if best is None or b.epsilon_lower_bound > best.epsilon_lower_bound:
            best = b
    assert best is not None
    final = _bound_at(scores[ev], member[ev], best.threshold, delta, confidence)
    return SplitAudit(final, int(cal.numel()), int(ev.numel()), best.epsilon_lower_bound)


def split_audit_rounds(scores_by_round: Sequence[Tensor], member: Tensor, delta: float,
                       confidence: float = 0.95, seed: int = 0,
                       calibration_fraction: float = 0.5) -> tuple[SplitAudit, int]:
    """:func:`split_audit` on the scores of several released models; returns the audit of the
    one whose *calibration* bound is best (the latest on ties) and its index.

    Guarantee: every candidate uses the same random split, and the choice depends on the
    calibration canaries only, so the evaluation bound of the chosen model holds at
    ``confidence`` without a multiple-testing correction.
    """
    if isinstance(scores_by_round, str | bytes) or not isinstance(scores_by_round, Sequence):
        # a Tensor or array is not one: its truth value raised torch's or numpy's error
        raise CanaryAuditError("scores_by_round must be a sequence (a list) of score tensors, one"
                               f" per released model, got {type(scores_by_round).__name__}")
    if not scores_by_round:
        raise CanaryAuditError("no scores to audit")
    audits = [split_audit(s, member, delta, confidence, seed, calibration_fraction)
              for s in scores_by_round]
    best = max(range(len(audits)), key=lambda k: (audits[k].calibration_epsilon, k))
    return audits[best], best


# --------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class CanarySet:
    """``m`` canary records and which of them were inserted (``member``, each w.p. 1/2)."""

    x: Tensor
    y: Tensor
    member: Tensor
    kind: str

    def __post_init__(self) -> None:
        m = self.x.shape[0]
        if self.x.dtype != torch.float32 or self.x.dim() < 2:
            raise CanaryAuditError(f"canary x must be float32 (m, ...), got {self.x.dtype} "
                                   f"{tuple(self.x.shape)}")
        labels = self.y.shape == (m,) and self.y.dtype == torch.int64
        targets = self.y.dim() == 2 and self.y.shape[0] == m and self.y.is_floating_point()
        if not (labels or targets):
            raise CanaryAuditError("canary y must be int64 labels (m,) or float multi-label "
                                   "targets (m, C)")
        if self.member.shape != (m,) or self.member.dtype != torch.bool:
            raise CanaryAuditError("canary member must be bool (m,)")


def make_canaries(kind: str, count: int, seed: int, *,
                  pool: tuple[Tensor, Tensor] | None = None,
                  like: tuple[Tensor, Tensor] | None = None,
                  num_classes: int = NUM_CLASSES,
                  count_option: str = "the count= argument") -> CanarySet:
    """Draw ``count`` canaries and include each independently with probability 1/2.

    ``"noise"``: inputs of i.i.d. uniform values with uniform random labels (out of
    distribution), shaped like ``like``'s inputs (the audited client's training split;
    default: MNIST's 1 x 28 x 28), in [0, 1] when those inputs lie in [0, 1] (images), else
    in their [min, max]; labels uniform over ``num_classes``, or uniform 0/1 vectors when
    ``like``'s targets are multi-label (n, C). ``"mislabeled"``: the first ``count`` images of
    ``pool`` (float32 (n, 1, 28, 28), int64 labels) each given a uniformly random *wrong*
    label. Deterministic in ``seed``. Errors name ``count`` as ``count_option``.
    """
    if kind not in CANARY_KINDS:
        raise CanaryAuditError(f"canary kind must be one of {CANARY_KINDS}, got {kind!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 4 <= count <= MAX_CANARIES:
        raise CanaryAuditError(f"canary count must be an int in [4, {MAX_CANARIES:,}]"
                               f" ({count_option}), got {count!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise CanaryAuditError(f"num_classes must be an int >= 2, got {num_classes!r}")
    gen = torch.Generator().manual_seed(
        check_seed(seed, CanaryAuditError, flag=API_AUDIT_OPTIONS["seed"])
    )
    if kind == "noise":
        shape = (1, 28, 28) if like is None else tuple(like[0].shape[1:])
        if count * math.prod(shape) > MAX_CANARY_VALUES:
            raise CanaryAuditError(
                f"{count:,} canaries of shape {shape} are {count * math.prod(shape):,} values"
                f" (limit {MAX_CANARY_VALUES:,}, 1 GiB); use fewer canaries ({count_option})")
        x = torch.rand((count, *shape), generator=gen)
        if like is not None and like[0].numel():
            low, high = float(like[0].min()), float(like[0].max())
            if low < 0.0 or high > 1.0:
                x = low + (high - low) * x
        if like is not None and like[1].dim() == 2:
            y = torch.randint(0, 2, (count, int(like[1].shape[1])), generator=gen).to(like[1].dtype)
        else:
            y = torch.randint(0, num_classes, (count,), generator=gen)
    else:
        if pool is None:
            raise CanaryAuditError("canary kind 'mislabeled' needs a pool of (images, labels)")
        px, py = pool
        if px.shape[0] < count:
            raise CanaryAuditError(f"the canary pool has {px.shape[0]} images, need {count}")
        x = px[:count].to(torch.float32).clone()
        shift = torch.randint(1, NUM_CLASSES, (count,), generator=gen)
        y = (py[:count].to(torch.int64) + shift) % NUM_CLASSES
    member = torch.rand(count, generator=gen) < 0.5
    return CanarySet(x.contiguous(), y, member, kind)


def insert_canaries(client: ClientData, canaries: CanarySet) -> ClientData:
    """A copy of ``client`` whose training split also holds the member canaries.

    The canaries are appended at random positions (training order is drawn by the oracle
    anyway); ``meta`` gains ``canaries_inserted``. The validation and test splits are unchanged.
    """
    if canaries.x.shape[1:] != client.train_x.shape[1:]:
        raise CanaryAuditError(
            f"canary inputs {tuple(canaries.x.shape[1:])} do not match client "
            f"{client.client_id}'s inputs {tuple(client.train_x.shape[1:])}"
        )
    if canaries.y.shape[1:] != client.train_y.shape[1:]:
        raise CanaryAuditError(
            f"canary labels {tuple(canaries.y.shape[1:])} do not match client "
            f"{client.client_id}'s labels {tuple(client.train_y.shape[1:])}"
        )
    idx = canaries.member.nonzero().squeeze(1)
    x = torch.cat([client.train_x, canaries.x[idx]])
    y = torch.cat([client.train_y, canaries.y[idx]])
    meta = {**client.meta, "canaries_inserted": int(idx.numel())}
    if y.dim() == 1:
        meta["label_histogram"] = torch.bincount(
            y, minlength=int(client.meta.get("num_classes", NUM_CLASSES))).tolist()
    return replace(client, train_x=x.contiguous(), train_y=y, meta=meta)


@torch.no_grad()
def canary_scores(flat: FlatModel, row: Tensor, canaries: CanarySet) -> Tensor:
    """Membership score of each canary: minus its loss (the task's per-sample loss, e.g.
    cross-entropy) under ``row`` (float64)."""
    model = flat.bind(row)
    was_training = model.training
    model.eval()
    losses = flat.task.checked(model(canaries.x), canaries.y)
    model.train(was_training)
    return (-losses).to(torch.float64)


# --------------------------------------------------------------------------- the audit


@dataclass(frozen=True)
class CanaryAuditResult:
    """Outcome of :func:`run_canary_audit`."""

    client_index: int
    client_id: str
    method: str
    canary_kind: str
    num_canaries: int
    members: int
    private: bool
    claimed_epsilon: float
    delta: float
    confidence: float
    epsilon_lower_bound: float
    bound: EpsilonLowerBound
    calibration_size: int
    evaluation_size: int
    calibration_epsilon: float
    member_mean_score: float
    non_member_mean_score: float
    dp_source: str
    certifiable_max: float = math.nan
    assumptions: list[str] = field(default_factory=list)
    selected_round: int | None = None
    rounds_scored: int = 1
    #: The modules ``audit canary --import`` imported first, each as
    #: :meth:`audits.verify.ImportedModule.to_json` gives it (name, file, SHA-256, what it
    #: registered): code from outside the toolkit that ran during the audit.
    imported: list[dict[str, Any]] = field(default_factory=list)
    #: What the key scan of ``run_dir`` (``audit canary RUN_DIR``) could not check (files
    #: that could not be read to look for private keys, a run without privacy keeping its
    #: envelope keys), each as ``audit verify`` words its warning; replay.json's alike.
    unchecked: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``refuted`` / ``consistent`` / ``inconclusive`` (see :mod:`audits.verdict`).

        ``consistent`` needs a design that could have refuted the claim: a certifiable
        maximum above it. An infinite claim (non-private run) is ``inconclusive``.
        """
        return audit_verdict(self.claimed_epsilon, self.certifiable_max,
                             self.epsilon_lower_bound)

    @property
    def consistent(self) -> bool:
        """True only when the audit could have refuted the claim and did not."""
        return self.verdict == "consistent"

    @property
    def refuted(self) -> bool:
        """True when the empirical bound exceeds the claim."""
        return self.verdict == "refuted"

    def to_json(self) -> dict[str, Any]:
        """The common audit document (``audit = "canary"``, see :mod:`audits.verdict`) plus
        every field of this result (an infinite claim or threshold written as ``"inf"``)."""
        d = asdict(self)
        d["consistent"] = self.consistent
        if math.isinf(self.claimed_epsilon):
            d["claimed_epsilon"] = "inf"
        if math.isinf(self.bound.threshold):
            d["bound"]["threshold"] = "inf"
        confidence = d.pop("confidence")
        setup = {k: d[k] for k in ("client_index", "client_id", "method", "canary_kind",
                                   "num_canaries", "private", "delta", "dp_source")}
        setup["calibration_size"] = self.calibration_size
        setup["evaluation_size"] = self.evaluation_size
        setup["attacked"] = (
            f"model theta_i after each of {self.rounds_scored} rounds (loss of each canary);"
            f" round {self.selected_round} chosen on the calibration half"
            if self.rounds_scored > 1 else "final model theta_i (loss of each canary)")
        d.pop("certifiable_max")
        return audit_document(
            "canary", claim_epsilon=self.claimed_epsilon, certifiable_max=self.certifiable_max,
            lower_bound=self.epsilon_lower_bound, confidence=confidence, setup=setup, **d)


def _mislabeled_pool(cfg: ExperimentConfig, clients: Sequence[ClientData], client_index: int,
                     count: int) -> tuple[Tensor, Tensor]:
    """Images of the test split used by no client, rotated like the audited client."""
    images, labels = load_dataset(cfg.data.dataset, "test")
    used: set[int] = set()
    for c in clients:
        used.update(int(i) for i in c.meta.get("test_index", []))
    free = [i for i in range(images.shape[0]) if i not in used]
    if len(free) < count:
        raise CanaryAuditError(
            f"only {len(free)} test images are unused by the clients; {count} mislabeled canaries"
            " need that many (lower data.test_per_client or use canary kind 'noise')"
        )
    gen = torch.Generator().manual_seed(cfg.seed + 104729)
    pick = torch.tensor(free)[torch.randperm(len(free), generator=gen)[:count]]
    x = to_float_images(images[pick])
    degrees = float(clients[client_index].meta.get("rotation_degrees", 0.0))
    if degrees:
        x = rotate_images(x, degrees, mode=cfg.data.rotation_interpolation)
    return x.contiguous(), labels[pick]


def _ledger_claim(run_dir: Path, method: str, client_id: str) -> tuple[float, float, int]:
    """Last ``epsilon_after``, ``delta`` and entry count of a client's ledger for ``method``.

    Guarantee: the claim is read only from a ledger that verifies (fields, chain and Ed25519
    signatures of :func:`audits.verify.check_ledger_lines`, under ``keys/allowlist.json`` of
    ``run_dir``), as a finite number > 0, with a finite delta > 0; a client refused a release
    is refused. Anything else (a missing, empty, binary, edited or unsigned ledger, a claim
    that is not a finite positive number) raises CanaryAuditError.
    """
    from audits.verify import positive_number, verified_ledger_entries

    rel = f"ledgers/{method}/{client_id}.jsonl"
    entries = verified_ledger_entries(
        run_dir, method, client_id, error=CanaryAuditError,
        missing=f"privacy.enabled is set but the run wrote no ledger {run_dir / rel}")
    if any(e["mechanism"] == "refusal" for e in entries):
        raise CanaryAuditError(
            f"client {client_id} was refused a release (ledger {rel}); its final model was not"
            " released, so the audit would attack an unreleased model: raise the budget"
        )
    claim = positive_number(entries[-1]["epsilon_after"], f"{rel} last epsilon_after (the claim)",
                            CanaryAuditError)
    delta = positive_number(entries[-1]["delta"], f"{rel} last delta", CanaryAuditError)
    return claim, delta, len(entries)


def run_canary_audit(cfg: ExperimentConfig, *, client_index: int = 0, num_canaries: int = 300,
                     kind: str = "noise", method: str = "local", confidence: float = 0.95,
                     delta: float = 1e-5, seed: int = 0,
                     work_dir: str | Path | None = None,
                     every_round: bool = True,
                     keystore: str | Path | None = None,
                     run_dir: str | Path | None = None,
                     options: Mapping[str, str] = API_AUDIT_OPTIONS) -> CanaryAuditResult:
    """Insert canaries into one client, run the federation, bound epsilon from membership inference.

    Training is the runtime's own: :class:`secure_fedora.runtimes.inprocess.Simulation` with ``cfg``
    (one ``method``). With ``privacy.enabled`` every client trains with the runtime's DP-SGD
    oracle behind its budget gate, and the claim is the audited client's last
    ``epsilon_after`` in ``ledgers/<method>/<client>.jsonl`` (at the ledger's delta);
    otherwise training is non-private, the claim is infinite and ``delta`` is used in the
    bound. FedAvg's evaluation-only fine-tuning is switched off.

    With ``every_round`` (default) the client's model is scored after every round (each is a
    release); the calibration half picks the round as well as the threshold
    (:func:`split_audit_rounds`), so no multiple-testing correction is needed and the
    certifiable maximum is unchanged. Otherwise only the final model is scored.

    With ``privacy.enabled`` the federation signs its ledgers with keys from a key store, as
    a run does (:mod:`secure_fedora.secure.keystore`): ``keystore`` if given, else the
    config's ``[security] keystore``, else the default one of the config's name.

    ``run_dir`` (``audit canary RUN_DIR``): the run directory whose config.toml ``cfg`` is;
    a ``cfg`` that is not its config (:func:`run_config_problem`: the ``config_hash``
    results.json records, else config.toml's) is a CanaryAuditError saying so, before
    anything trains. Before anything trains it is also scanned once for private key material
    (:func:`audits.verify.refuse_private_keys`, judged under ``cfg``'s privacy as ``audit
    verify`` judges it): a key inside it is a CanaryAuditError naming the file, and what the
    scan could not check is the result's ``unchecked``. It is only read: the federation
    trains in ``work_dir`` or a temporary directory.

    Guarantee: with probability ``>= confidence`` (under the independence assumption stated
    in the module docstring) a truly (claim, delta)-DP release yields
    ``epsilon_lower_bound <= claimed_epsilon``. Raises :class:`CanaryAuditError` for a bad
    argument (naming it as ``options`` says; the CLI passes
    :data:`~audits.options.CLI_AUDIT_OPTIONS`, its flags), or when the audited client was
    refused a release (its final model would then not be a release), or when ``run_dir``
    holds private key material.
    """
    check_config(cfg, CanaryAuditError)
    if method not in cfg.methods:
        raise CanaryAuditError(f"method {method!r} is not in the config's methods {cfg.methods}:"
                               f" name one with {options['method']}")
    if isinstance(client_index, bool) or not isinstance(client_index, int) \
            or not 0 <= client_index < cfg.data.num_clients:
        raise CanaryAuditError(
            f"client_index must be in [0, {cfg.data.num_clients}) ({options['client_index']}),"
            f" got {client_index!r}")
    check_seed(seed, CanaryAuditError, flag=options["seed"])
    # checked again by the bound after training: a bad one must not cost the federation's run
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) \
            or not 0 < confidence < 1:
        raise CanaryAuditError(f"confidence must be in (0, 1) ({options['confidence']}), got"
                               f" {confidence!r}")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < 1:
        raise CanaryAuditError(f"delta must be in [0, 1) ({options['delta']}), got {delta!r}")
    if not isinstance(every_round, bool):  # a truthy "no" must not mean yes
        raise CanaryAuditError(f"every_round must be True or False, got {every_round!r:.80}")
    if work_dir is not None:
        work_dir = check_path(work_dir, "work_dir", CanaryAuditError)
    if keystore is not None:  # before the federation is built
        keystore = check_path(keystore, "keystore", CanaryAuditError)
    private = bool(cfg.privacy.enabled)
    unchecked: list[str] = []
    if run_dir is not None:  # once per audit (each scan reads every file), before training
        from audits.verify import refuse_private_keys

        run_path = check_path(run_dir, "run_dir", CanaryAuditError)
        problem = run_config_problem(run_path, cfg)
        if problem is not None:
            raise CanaryAuditError(problem)
        unchecked = refuse_private_keys(run_path, private, CanaryAuditError,
                                        f"run directory {run_path} is not trusted")
    if kind == "mislabeled" and cfg.data.source is not None:
        raise CanaryAuditError("canary kind 'mislabeled' takes images of the built-in dataset's "
                               "test split; with data.source use kind 'noise'")
    clients = build_clients(cfg)
    pool = _mislabeled_pool(cfg, clients, client_index, num_canaries) if kind == "mislabeled" \
        else None
    audited = clients[client_index]
    num_classes, _ = label_space(clients)
    canaries = make_canaries(kind, num_canaries, seed, pool=pool,
                             like=(audited.train_x, audited.train_y), num_classes=num_classes,
                             count_option=options["num_canaries"])
    clients[client_index] = insert_canaries(clients[client_index], canaries)
    if private:
        n = clients[client_index].num_train
        if cfg.privacy.delta >= 1.0 / n:
            raise CanaryAuditError(f"privacy.delta {cfg.privacy.delta} must be < 1/n = {format_exact(1 / n)}"
                                   f" for the audited client's {n} training rows")
    audit_cfg = derived_config(cfg, cfg.model_copy(update={
        "methods": [method],
        "fedavg": cfg.fedavg.model_copy(update={"finetune_epochs": 0}),
    }))
    cid = client_ids(cfg.data.num_clients)[client_index]
    # run_method trains on these threads itself; the scores made after it, too
    with tempfile.TemporaryDirectory(prefix="canary-audit-") as tmp, threads_applied(audit_cfg):
        run_dir = Path(work_dir) if work_dir is not None else Path(tmp)
        round_scores: list[Tensor] = []

        def score_round(_name: str, _rnd: int, _rounds: int) -> None:
            fm = sim.methods[method]
            round_scores.append(canary_scores(fm.ctx.flat, fm.theta[client_index].clone(),
                                              canaries))

        sim = Simulation(audit_cfg, run_dir, clients=clients,
                         progress=score_round if every_round else None, keystore=keystore)
        sim.keystore_option = options["keystore"]  # key-store errors name the caller's choice
        sim.run_method(method)
        if not every_round:
            score_round(method, cfg.training.rounds, cfg.training.rounds)
        if private:
            claim, audit_delta, entries = _ledger_claim(run_dir, method, cid)
            source = f"ledger ledgers/{method}/{cid}.jsonl ({entries} entries)"
        else:
            claim, audit_delta, source = math.inf, float(delta), "none (non-private run)"
    sa, chosen = split_audit_rounds(round_scores, canaries.member, audit_delta, confidence,
                                    seed=seed + 1)
    scores = round_scores[chosen]
    selected_round = cfg.training.rounds - len(round_scores) + chosen + 1
    member = canaries.member
    assumptions = [
        "per-canary outcomes treated as independent trials (one training run)",
        "round and threshold chosen on the calibration half only",
        "attacked release: the audited client's model theta_i after each round (every one"
        " is released; the ledger's final epsilon covers them all)" if every_round else
        "attacked release: the audited client's final model theta_i",
    ]
    return CanaryAuditResult(
        client_index=client_index, client_id=cid, method=method, canary_kind=kind,
        num_canaries=num_canaries, members=int(member.sum()), private=private,
        claimed_epsilon=float(claim), delta=float(audit_delta), confidence=float(confidence),
        epsilon_lower_bound=sa.bound.epsilon_lower_bound, bound=sa.bound,
        calibration_size=sa.calibration_size, evaluation_size=sa.evaluation_size,
        calibration_epsilon=sa.calibration_epsilon,
        member_mean_score=float(scores[member].mean()),
        non_member_mean_score=float(scores[~member].mean()),
        dp_source=source, certifiable_max=sa.certifiable_max, assumptions=assumptions,
        selected_round=selected_round, rounds_scored=len(round_scores), unchecked=unchecked,
    )
