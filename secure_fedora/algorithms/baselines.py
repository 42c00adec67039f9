"""Personalized-FL baselines sharing FEDORA's runtime, data layout and gradient oracle.

Every method here is a :class:`~secure_fedora.algorithms.methods.FederatedMethod`: client parameters are
rows of (N x P) matrices, cluster models rows of a (K x P) matrix, and every server step is a
matrix product. Local training always goes through ``ctx.train_client`` (that is, through
``ctx.oracle``), so a DP-SGD oracle makes every baseline private without change; the
regularizers the baselines add to the local objective are applied by thin oracle wrappers
(:class:`ProximalGradient`, :class:`MixtureGradient`) *after* the wrapped oracle has written
its (possibly clipped and noised) gradient. Those additions depend only on the current
parameters and on values the client already holds (a received model, its own local model),
never on a training batch, so they are post-processing and change no privacy guarantee.

Messages: each method calls :meth:`~secure_fedora.algorithms.methods.FederatedMethod.download_rows` for
what the server sends a participant (the global model, FedAMP's message ``u_i``, IFCA's K
cluster models) and :meth:`~secure_fedora.algorithms.methods.FederatedMethod.upload_rows` for what it
sends back (its model row; IFCA also its cluster index), and aggregates over the accepted
uploads only. Without an exchange these calls move and change nothing, so results are
identical with and without ``[security] envelopes`` unless a message is rejected.

Methods and their hyper-parameters (defaults in :data:`BASELINE_HYPERPARAMETERS`):

=========  ============================================================================
fedprox    ``mu``: proximal weight (FedProx, Li et al., MLSys 2020)
ditto      ``lam``: pull of the personalized model toward the global one (Li et al., ICML 2021)
apfl       ``alpha``, ``adaptive``, ``alpha_lr``: model mixing (Deng et al., 2020)
fedamp     ``sigma``, ``self_weight``, ``lam``: attentive message passing (Huang et al., AAAI 2021)
ifca       ``num_clusters``, ``selection_split``: clustered FL (Ghosh et al., NeurIPS 2020)
=========  ============================================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from privacy.errors import ToolkitError
from secure_fedora.algorithms.methods import FedAvg, FederatedMethod, MessageState, MethodContext
from secure_fedora.core.registry import METHODS
from secure_fedora.learning.client import GradientOracle, PlainGradient, evaluate
from secure_fedora.learning.models import init_parameters
from secure_fedora.secure.transport import (
    KIND_CLUSTER_CHOICE,
    KIND_CLUSTERS,
    KIND_GLOBAL,
    KIND_MESSAGE,
    KIND_THETA,
)

__all__ = [
    "APFL",
    "BASELINE_HYPERPARAMETERS",
    "BASELINE_NAMES",
    "BaselineConfigError",
    "ClientHeldGradient",
    "Ditto",
    "FedAMP",
    "FedProx",
    "IFCA",
    "MixtureGradient",
    "ProximalGradient",
    "attention_weights",
    "make_baseline",
    "personal_oracle",
]


class BaselineConfigError(ToolkitError, ValueError):
    """A baseline name or hyper-parameter that cannot be used; the message names it."""


# --------------------------------------------------------------------------- hyper-parameters


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FedProxParams(_Params):
    """FedProx: ``mu`` weighs the proximal term ``mu/2 ||w - w_global||^2``."""

    mu: Annotated[float, Field(ge=0)] = 0.01


class DittoParams(_Params):
    """Ditto: ``lam`` weighs ``lam/2 ||v_i - w_global||^2`` in the personalized objective."""

    lam: Annotated[float, Field(ge=0)] = 0.1


class APFLParams(_Params):
    """APFL: initial mixing weight ``alpha`` on the local model; ``adaptive`` updates it by
    gradient descent with step ``alpha_lr`` (``None``: the training learning rate)."""

    alpha: Annotated[float, Field(ge=0, le=1)] = 0.25
    adaptive: bool = True
    alpha_lr: Annotated[float, Field(gt=0)] | None = None


class FedAMPParams(_Params):
    """FedAMP (heuristic, cosine form): ``sigma`` scales the cosine similarities,
    ``self_weight`` is the weight ``xi_ii`` a client's own model keeps in its message ``u_i``,
    ``lam`` weighs the proximal term ``lam/2 ||w_i - u_i||^2`` (the paper's ``lambda/alpha_k``)."""

    sigma: Annotated[float, Field(gt=0)] = 10.0
    self_weight: Annotated[float, Field(ge=0, lt=1)] = 0.5
    lam: Annotated[float, Field(ge=0)] = 1.0


class IFCAParams(_Params):
    """IFCA: ``num_clusters`` cluster models; a client picks the one with the lowest loss on
    its ``selection_split`` ("train" as in the paper; "val" uses the validation split, which
    the config declares public)."""

    num_clusters: Annotated[int, Field(ge=1)] = 4
    selection_split: Literal["train", "val"] = "train"


_PARAMS: dict[str, type[_Params]] = {
    "fedprox": FedProxParams,
    "ditto": DittoParams,
    "apfl": APFLParams,
    "fedamp": FedAMPParams,
    "ifca": IFCAParams,
}

BASELINE_NAMES: tuple[str, ...] = tuple(_PARAMS)
"""The method names :func:`make_baseline` accepts."""

BASELINE_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    name: model().model_dump() for name, model in _PARAMS.items()
}
"""Default hyper-parameters of every baseline, ``{method: {key: default}}``."""


def validate_hyperparameters(name: str, section: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full hyper-parameter dict of baseline ``name``: defaults overridden by ``section``.

    Raises :class:`BaselineConfigError` naming the method and key for an unknown method, an
    unknown key or a bad value.
    """
    if name not in _PARAMS:
        raise BaselineConfigError(f"unknown baseline {name!r}; expected one of {list(_PARAMS)}")
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise BaselineConfigError(
            f"hyper-parameters of {name!r} must be a mapping, got {type(section).__name__}"
        )
    try:
        return _PARAMS[name].model_validate(dict(section)).model_dump()
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(section)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"baselines.{name}.{key}: {msg}")
        raise BaselineConfigError("; ".join(problems)) from None


def make_baseline(
    name: str,
    ctx: MethodContext,
    cfg_section: Mapping[str, Any] | None = None,
    *,
    validation: str = "public",
) -> FederatedMethod:
    """Instantiate baseline ``name`` on ``ctx`` with hyper-parameters ``cfg_section``.

    ``cfg_section`` is that method's own mapping (e.g. ``{"mu": 0.1}`` for FedProx); missing
    keys take the defaults in :data:`BASELINE_HYPERPARAMETERS`. ``validation`` is the config's
    ``data.validation`` ("public" or "private"); only IFCA uses it (it refuses to pick
    clusters on private validation data). Raises :class:`BaselineConfigError` for an unknown
    name, an unknown key or a bad value.
    """
    params = validate_hyperparameters(name, cfg_section)
    if validation not in ("public", "private"):
        raise BaselineConfigError(f"validation must be 'public' or 'private'; got {validation!r}")
    if name == "ifca":
        return IFCA(ctx, **params, validation=validation)
    classes: dict[str, type[FederatedMethod]] = {
        "fedprox": FedProx, "ditto": Ditto, "apfl": APFL, "fedamp": FedAMP,
    }
    return classes[name](ctx, **params)


# --------------------------------------------------------------------------- oracle wrappers


class _WrappedOracle:
    """Delegates ``batches`` (and any other attribute) to the wrapped oracle."""

    def __init__(self, inner: GradientOracle) -> None:
        self.inner = inner

    def batches(self, n: int, epochs: int, generator: torch.Generator) -> Iterator[Tensor]:
        return self.inner.batches(n, epochs, generator)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)


def unwrap_oracle(oracle: GradientOracle) -> GradientOracle:
    """The innermost oracle below any baseline wrappers."""
    while isinstance(oracle, _WrappedOracle):
        oracle = oracle.inner
    return oracle


class ClientHeldGradient(PlainGradient):
    """Non-private gradients for a model that never leaves its client (Ditto's and APFL's
    personal model ``v_i``) in a private run.

    Threat model (the sweep's, stated in README): a value that is never sent to anyone is not
    a release, so, as for Local, it needs no noise; the client's released models stay DP-SGD.
    The batch gradient is clipped to the DP clip norm (a stability knob at DP learning rates,
    not a privacy mechanism). ``select`` is a no-op: there is no noise to select.
    Assumption: personal models are used inside the client only; publishing them would be a
    release this implementation does not account.
    """

    def select(self, noise_multiplier: float, noise: Any) -> None:
        """Nothing to select: no noise is added to a client-held model's training."""


def personal_oracle(ctx: MethodContext) -> GradientOracle:
    """The oracle for a model that stays on its client: ``ctx.oracle`` in a non-private run,
    else a :class:`ClientHeldGradient` at the configured batch size, clipped to the private
    oracle's ``max_grad_norm`` when it has one."""
    inner = unwrap_oracle(ctx.oracle)
    if isinstance(inner, PlainGradient):
        return ctx.oracle
    clip = getattr(inner, "max_grad_norm", None)
    return ClientHeldGradient(ctx.train.batch_size, None if clip is None else float(clip),
                              task=ctx.flat.task)


class ProximalGradient(_WrappedOracle):
    """Adds ``mu * (theta - anchor)``, the gradient of ``mu/2 ||theta - anchor||^2``, to the
    wrapped oracle's gradient at every step.

    ``theta`` must be the row being trained (the one ``local_train`` binds the model to) and is
    set with :meth:`target` before each local run. The term is added after the wrapped oracle
    wrote its gradient (clipped and noised under DP-SGD); it depends only on ``theta`` and the
    anchor, so under DP it is post-processing of released or client-held values.
    """

    def __init__(self, inner: GradientOracle, mu: float) -> None:
        super().__init__(inner)
        if mu < 0:
            raise BaselineConfigError(f"proximal weight mu must be >= 0; got {mu}")
        self.mu = float(mu)
        self._theta: Tensor | None = None
        self._anchor: Tensor | None = None

    def target(self, theta: Tensor, anchor: Tensor) -> None:
        """Set the row being trained and the parameters it is pulled toward."""
        if theta.shape != anchor.shape:
            raise BaselineConfigError(
                f"anchor has shape {tuple(anchor.shape)}, trained row {tuple(theta.shape)}"
            )
        self._theta, self._anchor = theta, anchor

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        """The wrapped gradient plus ``mu * (theta - anchor)``, written into ``grad``."""
        if self._theta is None or self._anchor is None:
            raise BaselineConfigError("ProximalGradient.target() must be called before training")
        self.inner.gradient(model, x, y, grad)
        if self.mu:
            grad.add_(self._theta, alpha=self.mu).sub_(self._anchor, alpha=self.mu)


class MixtureGradient(_WrappedOracle):
    """APFL's personal-model gradient: the gradient with respect to ``v`` of the loss at the
    mixture ``alpha * v + (1 - alpha) * w``, that is ``alpha * grad f(mixture)``.

    While the wrapped oracle computes its gradient, the trained row ``v`` temporarily holds the
    mixture (the model is bound to it); ``v`` is restored before the optimizer step. With
    ``adaptive``, ``alpha`` takes one projected gradient step per batch,
    ``alpha <- clip(alpha - alpha_lr * <v - w, grad f(mixture)>, 0, 1)`` (APFL eq. for
    ``alpha``); the step uses the wrapped oracle's (under DP: privatized) gradient, so it is
    post-processing too. ``alpha`` never leaves the client.
    """

    def __init__(self, inner: GradientOracle, num_params: int, adaptive: bool, alpha_lr: float) -> None:
        super().__init__(inner)
        self.adaptive = adaptive
        self.alpha_lr = float(alpha_lr)
        self.alpha = 0.0
        self._saved = torch.zeros(num_params)
        self._v: Tensor | None = None
        self._w: Tensor | None = None

    def target(self, v: Tensor, w: Tensor, alpha: float) -> None:
        """Set the personal row ``v`` being trained, the fixed model ``w`` and ``alpha``."""
        if not 0.0 <= alpha <= 1.0:
            raise BaselineConfigError(f"APFL alpha must lie in [0, 1]; got {alpha}")
        if v.shape != w.shape or v.shape != self._saved.shape:
            raise BaselineConfigError(
                f"APFL rows have shapes {tuple(v.shape)} and {tuple(w.shape)}, "
                f"expected ({self._saved.shape[0]},)"
            )
        self._v, self._w, self.alpha = v, w, float(alpha)

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, grad: Tensor) -> None:
        """Write ``alpha * grad f(alpha v + (1 - alpha) w)`` into ``grad``; update ``alpha``."""
        v, w = self._v, self._w
        if v is None or w is None:
            raise BaselineConfigError("MixtureGradient.target() must be called before training")
        a = self.alpha
        self._saved.copy_(v)
        v.mul_(a).add_(w, alpha=1.0 - a)
        try:
            self.inner.gradient(model, x, y, grad)
        finally:
            v.copy_(self._saved)
        if self.adaptive:
            step = float(torch.dot(v, grad) - torch.dot(w, grad))
            self.alpha = min(1.0, max(0.0, a - self.alpha_lr * step))
        grad.mul_(a)


def _train_with(ctx: MethodContext, oracle: GradientOracle, i: int, theta: Tensor) -> int:
    """``ctx.train_client(i, theta)`` with ``oracle`` (a wrapper of ``ctx.oracle``) in place of
    ``ctx.oracle`` for this one local run; the live context is used, so whatever the runtime
    attached to it (e.g. the client privacy state that selects the client's noise) applies."""
    saved = ctx.oracle
    ctx.oracle = oracle
    try:
        return ctx.train_client(i, theta)
    finally:
        ctx.oracle = saved


def _load_tensor(target: Tensor, value: Any, name: str) -> None:
    if not isinstance(value, Tensor) or value.shape != target.shape:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"checkpoint field {name!r} has shape {shape}, expected {tuple(target.shape)}")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"checkpoint field {name!r} contains non-finite values")
    target.copy_(value)


def _train_weights(ctx: MethodContext) -> Tensor:
    return torch.tensor([float(c.train_x.shape[0]) for c in ctx.clients])


def _average(weights: Tensor, rows: Tensor, participants: Sequence[int]) -> Tensor:
    """Training-size weighted average of ``rows[participants]`` (one matrix product)."""
    idx = torch.as_tensor(list(participants), dtype=torch.long)
    w = weights[idx] / weights[idx].sum()
    return w.to(rows.dtype) @ rows[idx]


# --------------------------------------------------------------------------- FedProx


class FedProx(FedAvg):
    """FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020, "Federated
    Optimization in Heterogeneous Networks").

    As FedAvg, but each participant minimizes ``F_i(w) + mu/2 ||w - w_global||^2`` starting
    from the global model: the gradient term ``mu (w - w_global)`` is added to every local
    step (it then passes through momentum and weight decay like the data gradient). The server
    averages by training-set size. Evaluated as the global model (no fine-tuning).
    """

    name = "fedprox"

    def __init__(self, ctx: MethodContext, mu: float = 0.01) -> None:
        super().__init__(ctx, finetune_epochs=0)
        self.mu = mu
        self.prox = ProximalGradient(ctx.oracle, mu)

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        """Local proximal training from the (received) global model, then weighted averaging
        of the accepted uploads."""
        steps = 0
        held = self.download_rows(rnd, {i: self.global_params for i in participants}, kind=KIND_GLOBAL)
        for i in participants:
            self.theta[i].copy_(held[i])
            self.prox.target(self.theta[i], held[i])
            steps += _train_with(self.ctx, self.prox, i, self.theta[i])
        accepted = self.upload_rows(rnd, self.theta, participants)
        if accepted:
            self.global_params.copy_(_average(self.weights, self.theta, accepted))
        return {"steps": float(steps)}


# --------------------------------------------------------------------------- Ditto


class Ditto(FederatedMethod):
    """Ditto (Li, Hu, Beirami, Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning
    Through Personalization").

    The global model ``w`` is trained by FedAvg: each participant trains a copy of ``w`` on
    its data and the server averages the copies. Each participant also keeps a personalized
    model ``v_i`` that it trains on ``F_i(v) + lam/2 ||v - w||^2`` with ``w`` the global model
    it received this round. Only the copy of ``w`` is uploaded, and it does not depend on
    ``v_i``. Under DP the copy's local run is the round's model release (DP-SGD); ``v_i`` never
    leaves the client, so, like Local, it trains without noise (:func:`personal_oracle`).
    Evaluated on ``v_i``.
    """

    name = "ditto"

    def __init__(self, ctx: MethodContext, lam: float = 0.1) -> None:
        super().__init__(ctx)
        self.lam = lam
        self.global_params = ctx.init.clone()
        self.uploads = self.theta.clone()
        self.weights = _train_weights(ctx)
        self.prox = ProximalGradient(personal_oracle(ctx), lam)

    def message_state(self) -> MessageState | None:
        """Uploads: the trained copies of the global model; downloads: the global model."""
        n = self.ctx.num_clients
        return {KIND_THETA: self.uploads}, {KIND_GLOBAL: self.global_params.expand(n, -1)}

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        """Global copy trained plainly, personal model proximally toward the received global
        model; the server averages the accepted copies."""
        ctx = self.ctx
        steps = 0
        held = self.download_rows(rnd, {i: self.global_params for i in participants}, kind=KIND_GLOBAL)
        for i in participants:
            self.uploads[i].copy_(held[i])
            steps += ctx.train_client(i, self.uploads[i])
            self.prox.target(self.theta[i], held[i])
            steps += _train_with(ctx, self.prox, i, self.theta[i])
        accepted = self.upload_rows(rnd, self.uploads, participants)
        if accepted:
            self.global_params.copy_(_average(self.weights, self.uploads, accepted))
        return {"steps": float(steps)}

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "global": self.global_params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _load_tensor(self.global_params, state.get("global"), "global")


# --------------------------------------------------------------------------- APFL


class APFL(FederatedMethod):
    """APFL (Deng, Kamani, Mahdavi, 2020, "Adaptive Personalized Federated Learning",
    arXiv:2003.13461).

    Each client keeps a local model ``v_i`` and a mixing weight ``alpha_i``; its personalized
    model is ``alpha_i v_i + (1 - alpha_i) w`` with ``w`` the global model. Per round a
    participant (1) trains a copy of ``w`` on its data (uploaded; the server averages the
    copies, FedAvg), and (2) trains ``v_i`` on the loss of the mixture with the ``w`` it
    received, ``alpha_i`` following its own gradient when ``adaptive`` (projected to [0, 1]).
    The two local runs happen one after the other rather than interleaved step by step as in
    the paper's Algorithm 1, so the uploaded copy is one ordinary oracle run that does not
    depend on ``v_i`` (under DP: the round's model release, DP-SGD); ``v_i`` and ``alpha_i``
    never leave the client, so, like Local, ``v_i`` trains without noise
    (:func:`personal_oracle`). Evaluated on the mixture with the current global model.
    """

    name = "apfl"

    def __init__(self, ctx: MethodContext, alpha: float = 0.25, adaptive: bool = True,
                 alpha_lr: float | None = None) -> None:
        super().__init__(ctx)
        if not 0.0 <= alpha <= 1.0:
            raise BaselineConfigError(f"baselines.apfl.alpha must lie in [0, 1]; got {alpha}")
        self.global_params = ctx.init.clone()
        self.uploads = self.theta.clone()
        self.alpha = torch.full((ctx.num_clients,), float(alpha), dtype=torch.float64)
        self.weights = _train_weights(ctx)
        lr = ctx.train.lr if alpha_lr is None else alpha_lr
        self.mix = MixtureGradient(personal_oracle(ctx), ctx.flat.num_params, adaptive, lr)
        self.mixed = torch.empty_like(self.theta)
        self._refresh_mixture()

    def _refresh_mixture(self) -> None:
        a = self.alpha.to(self.theta.dtype)
        self.mixed.copy_(self.theta).mul_(a.unsqueeze(1))
        self.mixed.addr_(1.0 - a, self.global_params)

    def message_state(self) -> MessageState | None:
        """Uploads: the trained copies of the global model; downloads: the global model."""
        n = self.ctx.num_clients
        return {KIND_THETA: self.uploads}, {KIND_GLOBAL: self.global_params.expand(n, -1)}

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        """Global copy trained plainly, local model through the mixture with the received
        global model; the server averages the accepted copies."""
        ctx = self.ctx
        steps = 0
        held = self.download_rows(rnd, {i: self.global_params for i in participants}, kind=KIND_GLOBAL)
        for i in participants:
            self.uploads[i].copy_(held[i])
            steps += ctx.train_client(i, self.uploads[i])
            self.mix.target(self.theta[i], held[i], float(self.alpha[i]))
            steps += _train_with(ctx, self.mix, i, self.theta[i])
            self.alpha[i] = self.mix.alpha
        accepted = self.upload_rows(rnd, self.uploads, participants)
        if accepted:
            self.global_params.copy_(_average(self.weights, self.uploads, accepted))
        self._refresh_mixture()
        return {"steps": float(steps), "mean_alpha": float(self.alpha.mean())}

    def eval_row(self, i: int) -> Tensor:
        """Client ``i``'s personalized model: ``alpha_i v_i + (1 - alpha_i) w``."""
        return self.mixed[i]

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "global": self.global_params, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _load_tensor(self.global_params, state.get("global"), "global")
        _load_tensor(self.alpha, state.get("alpha"), "alpha")
        if ((self.alpha < 0) | (self.alpha > 1)).any():
            raise ValueError("checkpoint field 'alpha' has values outside [0, 1]")
        self._refresh_mixture()

    def extra_results(self) -> dict[str, Any]:
        return self._with_security({"alpha": [round(float(a), 6) for a in self.alpha]})


# --------------------------------------------------------------------------- FedAMP


def attention_weights(theta: Tensor, sigma: float, self_weight: float) -> Tensor:
    """FedAMP's message-passing weights ``xi`` (N x N, float64, rows sum to 1).

    ``xi_ii = self_weight``; for ``j != i``,
    ``xi_ij = (1 - self_weight) * exp(sigma * cos(w_i, w_j)) / sum_{h != i} exp(sigma * cos(w_i, w_h))``
    with ``cos`` the cosine similarity of the flattened parameter rows (one Gram matrix).
    """
    n = theta.shape[0]
    if theta.dim() != 2 or n < 2:
        raise BaselineConfigError(f"FedAMP needs an (N x P) matrix with N >= 2; got {tuple(theta.shape)}")
    if not 0.0 <= self_weight < 1.0:
        raise BaselineConfigError(f"baselines.fedamp.self_weight must lie in [0, 1); got {self_weight}")
    if sigma <= 0:
        raise BaselineConfigError(f"baselines.fedamp.sigma must be positive; got {sigma}")
    gram = (theta @ theta.T).to(torch.float64)
    norms = gram.diagonal().clamp_min(1e-24).sqrt()
    cos = gram / norms.unsqueeze(1) / norms.unsqueeze(0)
    logits = sigma * cos
    logits.fill_diagonal_(-torch.inf)
    xi = torch.softmax(logits, dim=1) * (1.0 - self_weight)
    xi.fill_diagonal_(self_weight)
    return xi


class FedAMP(FederatedMethod):
    """FedAMP (Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, AAAI 2021, "Personalized Cross-Silo
    Federated Learning on Non-IID Data"), in its heuristic form (HeurFedAMP) with cosine
    similarity.

    The server holds every client's last uploaded model ``w_j`` and sends client ``i`` its
    message ``u_i = sum_j xi_ij w_j`` (:func:`attention_weights`: clients with more similar
    parameters weigh more). Each participant trains its own ``w_i`` on
    ``F_i(w) + lam/2 ||w - u_i||^2`` (``lam`` is the paper's ``lambda / alpha_k``) and uploads
    it. Evaluated on ``w_i``.
    """

    name = "fedamp"

    def __init__(self, ctx: MethodContext, sigma: float = 10.0, self_weight: float = 0.5,
                 lam: float = 1.0) -> None:
        super().__init__(ctx)
        if ctx.num_clients < 2:
            raise BaselineConfigError("FedAMP needs at least two clients")
        self.sigma, self.self_weight, self.lam = sigma, self_weight, lam
        self.messages = self.theta.clone()
        self.xi = torch.eye(ctx.num_clients, dtype=torch.float64)
        self.prox = ProximalGradient(ctx.oracle, lam)

    def compute_messages(self) -> None:
        """Server step: ``xi`` from the current uploads and ``u = xi @ w`` (one product)."""
        self.xi = attention_weights(self.theta, self.sigma, self.self_weight)
        torch.matmul(self.xi.to(self.theta.dtype), self.theta, out=self.messages)

    def message_state(self) -> MessageState | None:
        """Uploads: the models ``w_i``; downloads: the messages ``u_i``."""
        return {KIND_THETA: self.theta}, {KIND_MESSAGE: self.messages}

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        """Messages from the last accepted uploads, sent to the participants; proximal local
        training toward the received message; the participants upload their models."""
        self.compute_messages()
        steps = 0
        held = self.download_rows(rnd, {i: self.messages[i] for i in participants}, kind=KIND_MESSAGE)
        for i in participants:
            self.prox.target(self.theta[i], held[i])
            steps += _train_with(self.ctx, self.prox, i, self.theta[i])
        self.upload_rows(rnd, self.theta, participants)
        off = self.xi.clone().fill_diagonal_(0.0)
        return {"steps": float(steps), "max_neighbour_weight": float(off.max())}


# --------------------------------------------------------------------------- IFCA


class IFCA(FederatedMethod):
    """IFCA (Ghosh, Chung, Yin, Ramchandran, NeurIPS 2020, "An Efficient Framework for
    Clustered Federated Learning").

    The server keeps ``K`` cluster models (rows of a K x P matrix; model 0 is the common
    initialization, models 1..K-1 fresh default initializations drawn from a seed derived
    from it, so they change with the experiment seed). Each client picks the cluster model
    with the lowest loss on its ``selection_split`` (ties: lowest index), trains it locally and
    uploads it; the server replaces each cluster model by the training-size weighted average
    of the uploads assigned to it (clusters nobody picked are unchanged). Evaluated on the
    cluster model the client would pick now (choices are refreshed after every round).

    The cluster choice is a release (the server learns it) computed from the selection split,
    and no accountant covers it. So ``selection_split="train"`` is refused with a non-plain
    (e.g. DP) oracle, and ``selection_split="val"`` is refused when ``validation`` is
    "private"; with ``"val"`` and public validation data (the config's assumption, stated in
    every results file) the choice costs no privacy.
    """

    name = "ifca"

    def __init__(self, ctx: MethodContext, num_clusters: int = 4,
                 selection_split: str = "train", validation: str = "public") -> None:
        super().__init__(ctx)
        if num_clusters < 1:
            raise BaselineConfigError(f"baselines.ifca.num_clusters must be >= 1; got {num_clusters}")
        if selection_split not in ("train", "val"):
            raise BaselineConfigError(
                f"baselines.ifca.selection_split must be 'train' or 'val'; got {selection_split!r}"
            )
        if selection_split == "train" and not isinstance(unwrap_oracle(ctx.oracle), PlainGradient):
            raise BaselineConfigError(
                "baselines.ifca.selection_split='train' picks clusters by training loss, an "
                "unaccounted release under a private oracle; use selection_split='val' "
                "(validation data is declared public)"
            )
        if selection_split == "val" and validation != "public":
            raise BaselineConfigError(
                "baselines.ifca.selection_split='val' picks clusters by validation loss, but "
                "data.validation is 'private'; no accounted cluster choice exists"
            )
        self.num_clusters = num_clusters
        self.selection_split = selection_split
        self.clusters = self._initial_clusters(num_clusters)
        self.assignment = torch.full((ctx.num_clients,), -1, dtype=torch.long)
        self.weights = _train_weights(ctx)

    def _initial_clusters(self, k: int) -> Tensor:
        ctx = self.ctx
        clusters = ctx.init.unsqueeze(0).repeat(k, 1)
        digest = hashlib.sha256(ctx.init.numpy().tobytes()).digest()
        base = int.from_bytes(digest[:7], "big")
        for c in range(1, k):
            module = ctx.flat.bind(clusters[c])
            init_parameters(module, torch.Generator().manual_seed(base + c))
        return clusters

    def setup(self) -> None:
        if (self.assignment < 0).any():
            self.assign_all()

    def select(self, i: int) -> int:
        """The cluster with the lowest loss on client ``i``'s selection split."""
        c = self.ctx.clients[i]
        x, y = (c.train_x, c.train_y) if self.selection_split == "train" else (c.val_x, c.val_y)
        losses = torch.tensor(
            [evaluate(self.ctx.flat, self.clusters[k], x, y).loss for k in range(self.num_clusters)]
        )
        return int(torch.argmin(losses))

    def assign_all(self) -> None:
        """Refresh every client's cluster choice against the current cluster models."""
        for i in range(self.ctx.num_clients):
            self.assignment[i] = self.select(i)

    def message_state(self) -> MessageState | None:
        """Uploads: model rows and cluster choices (as an (N, 1) float matrix); the K cluster
        models a participant downloads are not tracked (a client that rejects them sits the
        round out rather than keep K stale models)."""
        return {KIND_THETA: self.theta, KIND_CLUSTER_CHOICE: self._choices()}, {}

    def _choices(self) -> Tensor:
        return self.assignment.to(self.theta.dtype).unsqueeze(1)

    def _check_choice(self, value: Tensor) -> str | None:
        k = float(value.reshape(-1)[0])
        if k != int(k) or not 0 <= k < self.num_clusters:
            return f"cluster index {k:g} is not an integer in [0, {self.num_clusters})"
        return None

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        """Participants receive the K cluster models, train the one they chose and upload it
        with their cluster index; the server averages the accepted uploads cluster by cluster
        (using the received indices). A participant that rejects the cluster models, or
        whose model or index upload is rejected, is left out of the round's averages."""
        if (self.assignment < 0).any():
            raise BaselineConfigError("IFCA.setup() must run before the first round")
        steps = 0
        held = self.download_rows(rnd, {i: self.clusters for i in participants}, kind=KIND_CLUSTERS)
        active = [i for i in participants if i in held]
        for i in active:
            # the choice assign_all made against these very cluster models
            self.theta[i].copy_(held[i][int(self.assignment[i])])
            steps += self.ctx.train_client(i, self.theta[i])
        del held
        choices = self._choices()
        with_model = set(self.upload_rows(rnd, self.theta, active))
        with_choice = set(self.upload_rows(rnd, choices, active, kind=KIND_CLUSTER_CHOICE,
                                           check=self._check_choice))
        accepted = [i for i in active if i in with_model and i in with_choice]
        if accepted:
            idx = torch.as_tensor(accepted, dtype=torch.long)
            member = torch.zeros(self.num_clusters, len(idx), dtype=self.theta.dtype)
            member[choices[idx, 0].long(), torch.arange(len(idx))] = self.weights[idx]
            totals = member.sum(dim=1)
            used = totals > 0
            self.clusters[used] = (member[used] / totals[used].unsqueeze(1)) @ self.theta[idx]
        self.assign_all()
        sizes = torch.bincount(self.assignment, minlength=self.num_clusters)
        return {"steps": float(steps), "clusters_used": float((sizes > 0).sum())}

    def eval_row(self, i: int) -> Tensor:
        """The cluster model client ``i`` currently picks."""
        return self.clusters[int(self.assignment[i])]

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "clusters": self.clusters, "assignment": self.assignment}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _load_tensor(self.clusters, state.get("clusters"), "clusters")
        assignment = state.get("assignment")
        _load_tensor(self.assignment, assignment, "assignment")
        if ((self.assignment < 0) | (self.assignment >= self.num_clusters)).any():
            raise ValueError(f"checkpoint field 'assignment' has clusters outside 0..{self.num_clusters - 1}")

    def extra_results(self) -> dict[str, Any]:
        return self._with_security({"assignment": self.assignment.tolist()})


# --------------------------------------------------------------------------- registry


def _register(name: str) -> None:
    def build(ctx: MethodContext, cfg: Any) -> FederatedMethod:
        return make_baseline(name, ctx, cfg.baselines.get(name), validation=cfg.data.validation)

    # the class whose releases(cfg) the privacy plan reads (see algorithms/contract.py)
    build.algorithm = {"fedprox": FedProx, "ditto": Ditto, "apfl": APFL,  # type: ignore[attr-defined]
                       "fedamp": FedAMP, "ifca": IFCA}[name]
    METHODS.register(name, build)


for _name in BASELINE_NAMES:
    _register(_name)
