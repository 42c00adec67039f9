"""Summary-leakage audit: what can an honest-but-curious server reconstruct from relatedness?

FEDORA's relatedness step (docs/design.md sections 2-3) sends the server, depending on the mode:

- ``plain``: each client's summary ``U_i`` (d x q), the top-q left singular vectors of
  ``Z_i^T`` with ``z = [flatten(x), onehot(y)]``;
- ``noised``: the top-q eigenvectors of a Gaussian-noised, row-clipped second-moment matrix
  ``clip(Z_i)^T clip(Z_i) / n_i`` (:func:`privacy.mechanisms.noised_second_moment`);
- ``encrypted``: no summary at all, only the decrypted q x q blocks ``U_i^T U_j`` and the
  similarity matrix derived from them.

The attack (for q >= 1 it uses the first column, the dominant direction): take
``u = U_i[:, 0]``, fix its sign so that the image part has a non-negative sum (pixels are
non-negative, so the true mean image has a positive sum), read the first ``image_dim``
coordinates as the client's "dominant image" and the last ``num_classes`` coordinates,
clamped at 0 and normalized, as its label histogram. Both are compared by cosine
similarity with the truth: the client's mean training image and its normalized training
label histogram.

Cosine similarity of non-negative vectors is never below 0 and is high even for an
uninformed guess, so every figure is reported next to the **prior baseline**: the guess an
attacker makes with no client-specific information, here the population mean image and
population label histogram over all clients (an attacker assumed to know the data
distribution; a stronger assumption than it usually has, so the baseline is generous). A
second figure is discriminative: **identification accuracy**, the fraction of clients whose
reconstruction is closer (by image cosine) to their own mean image than to any other
client's; chance is ``1/N``.

Encrypted mode: the similarity matrix holds only inner products between clients' subspaces;
it carries no coordinates in pixel or label space, so without auxiliary summaries of known
data the server's best per-client guess is the prior. This module reports exactly that
prior as the encrypted-mode reconstruction (identification at chance). Assumption, stated:
the server cannot enrol clients of its own (the allowlist of identity keys prevents it); a
server that could inject a client with a chosen summary would learn cosines between that
chosen direction and every client's summary, which is outside this audit's model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from audits.arguments import check_seed
from audits.options import API_AUDIT_OPTIONS
from privacy.accounting import MAX_NOISE_MULTIPLIER
from privacy.errors import ToolkitError
from privacy.mechanisms import noised_second_moment, top_eigenvectors
from privacy.noise import ReproducibleNoise
from secure_fedora.algorithms import fedora
from secure_fedora.core.config import MAX_SCALE
from secure_fedora.data.partition import ClientData

__all__ = [
    "IMAGE_DIM",
    "NUM_CLASSES",
    "ClientLeakage",
    "LeakageError",
    "ModeLeakage",
    "Reconstruction",
    "SummaryLeakageReport",
    "cosine",
    "leakage_from_similarity",
    "leakage_from_summaries",
    "noised_summaries",
    "plain_summaries",
    "population_prior",
    "reconstruct_from_summary",
    "run_summary_leakage_audit",
    "truth_of",
]

IMAGE_DIM = 784
NUM_CLASSES = 10
MODES = ("plain", "noised", "encrypted")


class LeakageError(ToolkitError, ValueError):
    """Bad input to the summary-leakage audit; the message names the argument or client."""


@dataclass(frozen=True)
class Reconstruction:
    """A guess (or the truth) of one client's data direction: mean image and label histogram."""

    image: Tensor
    label_histogram: Tensor


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two vectors (float64); 0.0 when either has zero norm."""
    a = a.reshape(-1).to(torch.float64)
    b = b.reshape(-1).to(torch.float64)
    if a.shape != b.shape:
        raise LeakageError(f"cosine of vectors of different lengths {a.numel()} and {b.numel()}")
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def _normalize_histogram(h: Tensor) -> Tensor:
    h = h.to(torch.float64).clamp(min=0.0)
    total = float(h.sum())
    if total <= 0.0:
        return torch.full_like(h, 1.0 / h.numel())
    return h / total


def _check_dim(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LeakageError(f"{name} must be an int >= 1, got {value!r:.80}")
    return value


def _client_labels(client: Any, num_classes: int, name: str = "client") -> Tensor:
    """The client's training labels, checked: ints in [0, num_classes)."""
    if not isinstance(client, ClientData):
        raise LeakageError(f"{name} must be ClientData, got {type(client).__name__}")
    y = client.train_y
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise LeakageError(f"client {client.client_id}: this audit needs integer class labels,"
                           f" got train_y of {y.dtype} and shape {tuple(y.shape)}")
    if y.numel() and not bool(((y >= 0) & (y < num_classes)).all()):
        raise LeakageError(f"client {client.client_id} has labels outside [0, {num_classes})")
    return y


def reconstruct_from_summary(summary: Tensor, image_dim: int = IMAGE_DIM,
                             num_classes: int = NUM_CLASSES) -> Reconstruction:
    """The server's reconstruction from one received summary (d x q, or a d-vector).

    Uses the first column. Guarantee: the result does not depend on the column's sign (the
    sign is fixed so that the image part sums to a non-negative value).
    """
    if not isinstance(summary, Tensor):
        raise LeakageError(f"summary must be a torch.Tensor, got {type(summary).__name__}")
    _check_dim(image_dim, "image_dim")
    _check_dim(num_classes, "num_classes")
    u = summary if summary.dim() == 1 else summary[:, 0] if summary.dim() == 2 else None
    if u is None:
        raise LeakageError(f"summary must be (d,) or (d, q); got shape {tuple(summary.shape)}")
    if u.numel() != image_dim + num_classes:
        raise LeakageError(
            f"summary has {u.numel()} rows, expected image_dim + num_classes = "
            f"{image_dim + num_classes}"
        )
    if not bool(torch.isfinite(u).all()):
        raise LeakageError("summary contains NaN or infinite values")
    u = u.to(torch.float64)
    if float(u[:image_dim].sum()) < 0.0:
        u = -u
    return Reconstruction(u[:image_dim].clone(), _normalize_histogram(u[image_dim:]))


def truth_of(client: ClientData, num_classes: int = NUM_CLASSES) -> Reconstruction:
    """The client's true data direction: its mean training image and label histogram."""
    y = _client_labels(client, _check_dim(num_classes, "num_classes"))
    n = int(client.train_x.shape[0])
    if n == 0:
        raise LeakageError(f"client {client.client_id} has no training rows")
    x = client.train_x.reshape(n, -1).to(torch.float64)
    hist = torch.bincount(y, minlength=num_classes).to(torch.float64)
    return Reconstruction(x.mean(dim=0), hist / hist.sum())


def population_prior(clients: Sequence[ClientData],
                     num_classes: int = NUM_CLASSES) -> Reconstruction:
    """The attacker's uninformed guess: pooled mean image and pooled label histogram."""
    if isinstance(clients, ClientData | str | bytes) or not isinstance(clients, Sequence):
        raise LeakageError(f"clients must be a sequence of ClientData, got "
                           f"{type(clients).__name__}")
    if not clients:
        raise LeakageError("population_prior needs at least one client")
    _check_dim(num_classes, "num_classes")
    ys = torch.cat([_client_labels(c, num_classes, "clients") for c in clients])
    sizes = {c.train_x[0].numel() for c in clients if c.train_x.shape[0]}
    if len(sizes) > 1:
        raise LeakageError(f"clients' images differ in size ({sorted(sizes)} values)")
    if not ys.numel():
        raise LeakageError("population_prior needs a training row; the clients have none")
    xs = torch.cat([c.train_x.reshape(c.train_x.shape[0], -1).to(torch.float64) for c in clients
                    if c.train_x.shape[0]])
    hist = torch.bincount(ys, minlength=num_classes).to(torch.float64)
    return Reconstruction(xs.mean(dim=0), hist / hist.sum())


@dataclass(frozen=True)
class ClientLeakage:
    """Similarity of one client's reconstruction to its truth (and of the prior, for scale)."""

    client_id: int
    image_cosine: float
    label_cosine: float
    prior_image_cosine: float
    prior_label_cosine: float
    identified: float


@dataclass(frozen=True)
class ModeLeakage:
    """One relatedness mode's leakage over all clients (means of the per-client figures)."""

    mode: str
    clients: list[ClientLeakage]
    mean_image_cosine: float
    mean_label_cosine: float
    mean_prior_image_cosine: float
    mean_prior_label_cosine: float
    identification_accuracy: float
    chance_identification: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return asdict(self)


def _identified(recons: Sequence[Reconstruction], truths: Sequence[Reconstruction]) -> list[float]:
    """Per client: 1/t if its own truth is among the t truths closest to its reconstruction."""
    out = []
    for i, rec in enumerate(recons):
        sims = torch.tensor([cosine(rec.image, t.image) for t in truths], dtype=torch.float64)
        best = sims.max()
        tied = torch.isclose(sims, best, rtol=0.0, atol=1e-12)
        out.append(1.0 / int(tied.sum()) if bool(tied[i]) else 0.0)
    return out


def _mode_result(mode: str, clients: Sequence[ClientData], recons: Sequence[Reconstruction],
                 details: dict[str, Any]) -> ModeLeakage:
    truths = [truth_of(c) for c in clients]
    prior = population_prior(clients)
    ident = _identified(recons, truths)
    rows = [
        ClientLeakage(
            client_id=int(c.client_id),
            image_cosine=cosine(r.image, t.image),
            label_cosine=cosine(r.label_histogram, t.label_histogram),
            prior_image_cosine=cosine(prior.image, t.image),
            prior_label_cosine=cosine(prior.label_histogram, t.label_histogram),
            identified=ident[k],
        )
        for k, (c, r, t) in enumerate(zip(clients, recons, truths, strict=True))
    ]
    n = len(rows)
    return ModeLeakage(
        mode=mode,
        clients=rows,
        mean_image_cosine=sum(r.image_cosine for r in rows) / n,
        mean_label_cosine=sum(r.label_cosine for r in rows) / n,
        mean_prior_image_cosine=sum(r.prior_image_cosine for r in rows) / n,
        mean_prior_label_cosine=sum(r.prior_label_cosine for r in rows) / n,
        identification_accuracy=sum(ident) / n,
        chance_identification=1.0 / n,
        details=details,
    )


def _check_clients(clients: Sequence[ClientData]) -> list[ClientData]:
    if isinstance(clients, ClientData | str | bytes) or not isinstance(clients, Sequence):
        raise LeakageError(f"clients must be a sequence of ClientData, got "
                           f"{type(clients).__name__}")
    clients = list(clients)
    if len(clients) < 2:
        raise LeakageError(f"the leakage audit needs at least 2 clients, got {len(clients)}")
    for c in clients:
        _client_labels(c, NUM_CLASSES, "clients")
        if c.train_x.shape[0] == 0:
            raise LeakageError(f"client {c.client_id} has no training rows")
        d = c.train_x[0].numel()
        if d != IMAGE_DIM:
            raise LeakageError(
                f"client {c.client_id}: images have {d} pixels, this audit expects {IMAGE_DIM}"
            )
    return clients


def leakage_from_summaries(clients: Sequence[ClientData], summaries: Tensor, mode: str,
                           details: dict[str, Any] | None = None) -> ModeLeakage:
    """Leakage when the server received one summary per client (``summaries``: N x d x q)."""
    clients = _check_clients(clients)
    if mode not in ("plain", "noised"):
        raise LeakageError(f"summaries are received only in modes plain/noised, not {mode!r}")
    if not isinstance(summaries, Tensor) or summaries.dim() != 3 \
            or summaries.shape[0] != len(clients):
        shape = tuple(summaries.shape) if isinstance(summaries, Tensor) else type(summaries)
        raise LeakageError(f"summaries must be (N={len(clients)}, d, q); got {shape}")
    recons = [reconstruct_from_summary(summaries[i]) for i in range(len(clients))]
    return _mode_result(mode, clients, recons, dict(details or {}))


def leakage_from_similarity(clients: Sequence[ClientData], similarity: Tensor,
                            details: dict[str, Any] | None = None) -> ModeLeakage:
    """Leakage in encrypted mode: the server holds only the N x N similarity matrix.

    The matrix has no coordinates in pixel or label space, so every client's reconstruction
    is the population prior (see the module docstring for the assumption this rests on).
    The matrix is validated (square, N x N, finite) so that the audit is run on what the
    server really holds.
    """
    clients = _check_clients(clients)
    n = len(clients)
    if not isinstance(similarity, Tensor) or similarity.shape != (n, n):
        shape = tuple(similarity.shape) if isinstance(similarity, Tensor) else type(similarity)
        raise LeakageError(f"similarity must be ({n}, {n}); got {shape}")
    if not bool(torch.isfinite(similarity).all()):
        raise LeakageError("similarity contains NaN or infinite values")
    prior = population_prior(clients)
    recons = [prior] * n
    return _mode_result("encrypted", clients, recons,
                        {"reconstruction": "population prior (no pixel/label coordinates held)",
                         **(details or {})})


def plain_summaries(clients: Sequence[ClientData], q: int = 1) -> Tensor:
    """The summaries the server receives in plain mode (N x d x q), as FEDORA computes them."""
    return torch.stack([fedora.client_summary(c.train_x, c.train_y, NUM_CLASSES, q)
                        for c in clients])


def noised_summaries(clients: Sequence[ClientData], clip_norm: float,
                     noise_multiplier: float | Sequence[float], q: int = 1, seed: int = 0) -> Tensor:
    """The summaries the server receives in noised mode (N x d x q).

    Each is :func:`privacy.mechanisms.top_eigenvectors` of
    :func:`privacy.mechanisms.noised_second_moment` over the client's rows
    ``[flatten(x), onehot(y)]``, with ``n`` = its number of training rows (public).
    ``noise_multiplier`` is one value for every client or one per client (clients with their
    own budgets have their own calibrated noise).
    """
    _check_clip_norm(clip_norm)
    sigmas = _per_client(noise_multiplier, len(clients))
    out = []
    for c, sigma in zip(clients, sigmas, strict=True):
        z = fedora.summary_rows(c.train_x, c.train_y, NUM_CLASSES)
        # A seeded source: the audit itself must be repeatable (it simulates the releases).
        noise = ReproducibleNoise(seed * 1_000_003 + int(c.client_id) + 1)
        m = noised_second_moment(z, clip_norm, sigma, noise)
        out.append(top_eigenvectors(m, q))
    return torch.stack(out)


def _check_clip_norm(clip_norm: Any) -> None:
    # the config's cap on privacy.summary_clip: the sensitivity squares the clip
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, int | float) \
            or not 0 < clip_norm <= MAX_SCALE:
        raise LeakageError(f"clip_norm must be a number in (0, {MAX_SCALE:g}] (as"
                           f" privacy.summary_clip), got {clip_norm!r:.80}")


def _per_client(noise_multiplier: float | Sequence[float], count: int) -> list[float]:
    values = [noise_multiplier] if isinstance(noise_multiplier, int | float) else noise_multiplier
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or any(
            isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise LeakageError(f"noise_multiplier must be a number or one number per client, got "
                           f"{noise_multiplier!r:.80}")
    if any(not 0 < v <= MAX_NOISE_MULTIPLIER for v in values):
        raise LeakageError(f"noise_multiplier must be in (0, {MAX_NOISE_MULTIPLIER:g}] (as"
                           f" privacy.summary_noise_multiplier), got {noise_multiplier!r:.80}")
    if isinstance(noise_multiplier, int | float):
        return [float(noise_multiplier)] * count
    sigmas = [float(v) for v in noise_multiplier]
    if len(sigmas) != count:
        raise LeakageError(f"{len(sigmas)} noise multipliers for {count} clients")
    return sigmas


@dataclass(frozen=True)
class SummaryLeakageReport:
    """Leakage per relatedness mode, with the parameters of the noised mode."""

    modes: dict[str, ModeLeakage]
    clip_norm: float | None
    noise_multiplier: float | list[float] | None  # a list when clients' noise differs
    q: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict: parameters and one entry per mode."""
        return {
            "q": self.q,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "modes": {name: m.to_json() for name, m in self.modes.items()},
        }

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per mode: mean cosines, prior cosines and identification accuracy."""
        return [
            {
                "mode": name,
                "image_cosine": m.mean_image_cosine,
                "prior_image_cosine": m.mean_prior_image_cosine,
                "label_cosine": m.mean_label_cosine,
                "prior_label_cosine": m.mean_prior_label_cosine,
                "identification": m.identification_accuracy,
                "chance": m.chance_identification,
            }
            for name, m in self.modes.items()
        ]


def run_summary_leakage_audit(clients: Sequence[ClientData], *, q: int = 1,
                              clip_norm: float | None = None,
                              noise_multiplier: float | Sequence[float] | None = None,
                              tau: float = 10.0, seed: int = 0) -> SummaryLeakageReport:
    """Run the attack on plain summaries, noised summaries (when ``clip_norm`` and
    ``noise_multiplier`` are given; one multiplier, or one per client) and the encrypted-mode
    similarity matrix.

    Guarantee: each mode sees exactly what the server receives in it (summaries computed
    with the same functions FEDORA and :mod:`privacy.mechanisms` use).
    """
    clients = _check_clients(clients)
    if (clip_norm is None) != (noise_multiplier is None):
        raise LeakageError("noised mode needs both clip_norm and noise_multiplier (or neither)")
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise LeakageError(f"q must be an int >= 1, got {q!r}")
    if isinstance(tau, bool) or not isinstance(tau, int | float) \
            or not 0 < tau <= sys.float_info.max:  # an int beyond float overflowed
        raise LeakageError(f"tau must be a finite number > 0 (fedora.tau), got {tau!r:.80}")
    tau = float(tau)
    check_seed(seed, LeakageError, flag=API_AUDIT_OPTIONS["seed"])
    plain = plain_summaries(clients, q)
    modes = {"plain": leakage_from_summaries(clients, plain, "plain")}
    shown: float | list[float] | None = None
    if clip_norm is not None and noise_multiplier is not None:
        _check_clip_norm(clip_norm)
        sigmas = _per_client(noise_multiplier, len(clients))
        noised = noised_summaries(clients, clip_norm, sigmas, q, seed)
        shown = sigmas[0] if len(set(sigmas)) == 1 else sigmas
        modes["noised"] = leakage_from_summaries(
            clients, noised, "noised",
            {"clip_norm": float(clip_norm), "noise_multiplier": shown},
        )
    # the similarities up to one common factor exp(tau * max): the same information, finite
    # for any tau (the raw values overflow float64 beyond about exp(709))
    sums = fedora.cosine_sums(fedora.subspace_overlaps(plain))
    similarity = torch.exp(tau * (sums - sums.max())).fill_diagonal_(0.0)
    modes["encrypted"] = leakage_from_similarity(clients, similarity)
    return SummaryLeakageReport(
        modes=modes,
        clip_norm=None if clip_norm is None else float(clip_norm),
        noise_multiplier=shown,
        q=q,
    )
