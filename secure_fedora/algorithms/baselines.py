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

Messages: every method implements the contract of :mod:`secure_fedora.algorithms.contract`
(server half: ``configure``, ``aggregate``, ``evaluation_messages``, ``finalize_messages``/
``server_finalize``, ``server_state_dict``; client half: ``client_update``,
``client_eval_row``, ``client_finalize``, ``client_state_dict``). The server half never
reads client data: it learns a client's training-set size from its reply's
``num_examples``. Client ``i``'s half reads only ``ctx.clients[i]``, its generator, noise
source, message and its own state, which is exactly ``client_state_dict(i)``:

=======  =====================  ==========================================  ==============================
method   server sends           client replies                              client state
=======  =====================  ==========================================  ==============================
fedprox  ``global``             ``theta``, ``num_examples``, ``steps``      ``theta`` (not used later)
ditto    ``global``             copy of w as ``theta``, size, steps         ``theta`` = ``v_i``
apfl     ``global``             copy of w as ``theta``, size, steps         ``theta`` = ``v_i``, ``alpha``
fedamp   ``message`` (u_i)      ``theta`` = ``w_i``, ``steps``              ``theta`` = ``w_i``
ifca     ``clusters``, version  ``theta``, ``cluster_choice``, size, steps  none
=======  =====================  ==========================================  ==============================

Evaluation messages carry the global model (FedProx; APFL's mixture) or the K cluster
models (IFCA); Ditto and FedAMP clients are evaluated on their own state. Finalize
exchanges report APFL's ``alpha_i`` and IFCA's final choices. With ``[security] envelopes``
the in-process runtime signs every entry whose key is a message kind
(:meth:`~secure_fedora.algorithms.methods.FederatedMethod.message_state`), so results are
identical with and without envelopes unless a message is rejected; a rejected upload is an
absent reply (the server keeps its last accepted row).

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
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from privacy.accounting import format_exact
from secure_fedora.algorithms.config_checks import (
    BASELINE_HYPERPARAMETERS,
    BASELINE_NAMES,
    APFLChecks,
    BaselineChecks,
    BaselineConfigError,
    DittoChecks,
    FedAMPChecks,
    FedProxChecks,
    IFCAChecks,
    ifca_train_under_dp,
    ifca_val_private,
    validate_hyperparameters,
)
from secure_fedora.algorithms.contract import (
    EVALUATE,
    FINALIZE,
    NUM_EXAMPLES_REASON,
    ROUND,
    SETUP,
    Payload,
    TensorSignature,
    payload_size_problem,
)
from secure_fedora.algorithms.held import HeldRows
from secure_fedora.algorithms.messages import (
    KIND_CLUSTER_CHOICE,
    KIND_CLUSTERS,
    KIND_GLOBAL,
    KIND_MESSAGE,
    KIND_THETA,
    ValueCheck,
)
from secure_fedora.algorithms.methods import (
    KEY_NUM_EXAMPLES,
    KEY_STEPS,
    FedAvg,
    FederatedMethod,
    MessageState,
    MethodContext,
    _load_matrix,
    _model_signature,
    _scalar,
)
from secure_fedora.core.registry import METHODS
from secure_fedora.learning.client import (
    ClientUpdateError,
    GradientOracle,
    PlainGradient,
    aligned,
    evaluate_loss,
    retarget,
    same_row,
)
from secure_fedora.learning.models import init_parameters

log = logging.getLogger("secure_fedora.algorithms.baselines")

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


def make_baseline(
    name: str,
    ctx: MethodContext,
    cfg_section: Mapping[str, Any] | None = None,
    *,
    validation: str = "public",
    cls: type[FederatedMethod] | None = None,
    label: str | None = None,
) -> FederatedMethod:
    """Instantiate baseline ``name`` (as ``cls``, default the built-in class of that name: a
    subclass, e.g. a plug-in deriving from the baseline, keeps its overrides) on ``ctx`` with
    hyper-parameters ``cfg_section``.

    ``cfg_section`` is that method's own mapping (e.g. ``{"mu": 0.1}`` for FedProx); missing
    keys take the defaults in :data:`BASELINE_HYPERPARAMETERS`. ``validation`` is the config's
    ``data.validation`` ("public" or "private"); it is passed to the constructor of a class
    declaring ``takes_validation`` (IFCA: it refuses to pick clusters on private validation
    data, and so does a subclass or a plug-in declaring it). ``label`` names the section in
    errors (default ``name``). Raises :class:`BaselineConfigError` for an unknown name, an
    unknown key or a bad value.
    """
    params = validate_hyperparameters(name, cfg_section, label=label)
    if validation not in ("public", "private"):
        raise BaselineConfigError(f"validation must be 'public' or 'private'; got {validation!r}")
    klass = cls or _BUILTIN_CLASSES[name]
    if getattr(klass, "takes_validation", False):
        params["validation"] = validation
    return klass(ctx, **params)


# --------------------------------------------------------------------------- oracle wrappers


class _WrappedOracle:
    """Delegates ``batches`` (and any other attribute) to the wrapped oracle."""

    def __init__(self, inner: GradientOracle) -> None:
        self.inner = inner

    def batches(self, n: int, epochs: int, generator: torch.Generator) -> Iterator[Tensor]:
        return self.inner.batches(n, epochs, generator)

    def retarget(self, old: Tensor, new: Tensor) -> None:
        """Pass :func:`~secure_fedora.learning.client.retarget` on to the wrapped oracle."""
        retarget(self.inner, old, new)

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

    def retarget(self, old: Tensor, new: Tensor) -> None:
        """The trained row moved from ``old`` to ``new`` (an aligned copy; see ``local_train``)."""
        super().retarget(old, new)
        if same_row(self._theta, old):
            self._theta = new

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

    def retarget(self, old: Tensor, new: Tensor) -> None:
        """The trained row moved from ``old`` to ``new`` (an aligned copy; see ``local_train``)."""
        super().retarget(old, new)
        if same_row(self._v, old):
            self._v = new

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
            step = float(torch.dot(v, grad) - torch.dot(aligned(w), grad))  # dot rounds by address
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


def _num_examples(ctx: MethodContext, i: int) -> Tensor:
    """Client ``i``'s reply entry ``num_examples``: its training-set size (its FedAvg weight)."""
    return _scalar(int(ctx.clients[i].train_x.shape[0]))


def weighted_average(replies: Mapping[int, Payload], key: str = KIND_THETA) -> Tensor:
    """The ``num_examples``-weighted average of the replies' ``key`` rows, in reply order
    (one matrix product; the weights are float32 as the training-set sizes always were)."""
    ids = list(replies)
    w = torch.tensor([float(replies[i][KEY_NUM_EXAMPLES]) for i in ids])
    w = w / w.sum()
    rows = torch.stack([replies[i][key] for i in ids])
    return w.to(device=rows.device, dtype=rows.dtype) @ rows


class _Baseline(BaselineChecks):
    """What every baseline shares: built from ``[baselines.<name>]`` and checked against it
    (the checks: :class:`~secure_fedora.algorithms.config_checks.BaselineChecks`)."""

    name: str

    #: The ``[baselines.<name>]`` section the method was built from (:meth:`from_config`).
    hyperparameters_section: str | None = None

    @classmethod
    def from_config(cls, ctx: MethodContext, cfg: Any) -> FederatedMethod:
        """This class (a subclass keeps its overrides) with the hyper-parameters of its own
        ``[baselines.<name>]`` section (:meth:`config_section`: a subclass registered under
        its own name reads that name's section, never its parent's; defaults for missing
        keys) and ``data.validation``."""
        section = cls.config_section()
        method = make_baseline(cls.baseline_kind(), ctx, cfg.baselines.get(section),
                               validation=cfg.data.validation, cls=cls, label=section)
        method.hyperparameters_section = section  # type: ignore[attr-defined]
        return method

    def server_finalize(self, replies: Mapping[int, Payload]) -> dict[str, Any]:
        """The parent's results; a method whose section is not its baseline's (a subclass
        registered under its own name) adds ``hyperparameters_section``, the section it read."""
        out = super().server_finalize(replies)  # type: ignore[misc]
        section = self.hyperparameters_section
        if section is not None and section != self.baseline_kind():
            out = {**out, "hyperparameters_section": f"baselines.{section}"}
        return out


# --------------------------------------------------------------------------- FedProx


class FedProx(FedProxChecks, _Baseline, FedAvg):
    """FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020, "Federated
    Optimization in Heterogeneous Networks").

    As FedAvg, but each participant minimizes ``F_i(w) + mu/2 ||w - w_global||^2`` starting
    from the global model: the gradient term ``mu (w - w_global)`` is added to every local
    step (it then passes through momentum and weight decay like the data gradient). The server
    averages by training-set size (each reply's ``num_examples``). Evaluated as the global
    model (no fine-tuning). Server half: FedAvg's; client state: its row of ``theta``.
    """

    name = "fedprox"

    @classmethod
    def assumptions(cls, cfg: Any) -> dict[str, Any]:
        """None: FedProx never fine-tunes, so FedAvg's ``fedavg_finetuning`` (which follows
        ``[fedavg] finetune_epochs``) does not apply to it."""
        return {}

    def __init__(self, ctx: MethodContext, mu: float = 0.01) -> None:
        super().__init__(ctx, finetune_epochs=0)
        self.mu = mu
        self.prox = ProximalGradient(ctx.oracle, mu)

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Proximal local training from the received global model; reply the model, the
        training-set size and the steps."""
        w = message[KIND_GLOBAL]
        self.theta[i].copy_(w)
        self.prox.target(self.theta[i], w)
        steps = _train_with(self.ctx, self.prox, i, self.theta[i])
        return {KIND_THETA: self.theta[i], KEY_NUM_EXAMPLES: _num_examples(self.ctx, i),
                KEY_STEPS: _scalar(steps)}

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """Every participant trains proximally from its received global model, together."""
        participants = list(messages)
        reason = self.batched_unsupported(participants, [self.prox.inner])
        if reason is not None:
            return self.batched_fallback(reason)
        anchors = {i: messages[i][KIND_GLOBAL] for i in participants}
        for i in participants:
            self.theta[i].copy_(anchors[i])
        out = self.train_batched(participants, self.theta, anchor=anchors, mu=self.mu,
                                 oracle=self.prox.inner)
        return {i: {KIND_THETA: self.theta[i], KEY_NUM_EXAMPLES: _num_examples(self.ctx, i),
                    KEY_STEPS: _scalar(out.steps[i])} for i in participants}


# --------------------------------------------------------------------------- Ditto and APFL


class _GlobalModelMethod(_Baseline, FederatedMethod):
    """The server half Ditto and APFL share with FedAvg: the server holds the global model
    ``w``, sends it to each participant, and replaces it by the ``num_examples``-weighted
    average of the accepted uploaded copies (unchanged when none was accepted).

    Client side (in process): ``theta[i]`` is client ``i``'s personal model and ``uploads[i]``
    its buffer for the trained copy of ``w`` it sends (not state: rewritten every round).
    """

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        """A round reply: the trained copy of ``w`` (DP-SGD), the training-set size (public
        by the run's assumptions) and the steps; the personal model never leaves."""
        if stage == ROUND:
            return {**super().reply_entries(cfg, stage),
                    KEY_NUM_EXAMPLES: NUM_EXAMPLES_REASON}
        return super().reply_entries(cfg, stage)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.global_params = ctx.init.clone()
        self.uploads = self.theta.clone()

    def message_state(self) -> MessageState | None:
        """Uploads: the trained copies of the global model; downloads: the global model."""
        n = self.ctx.num_clients
        return {KIND_THETA: self.uploads}, {KIND_GLOBAL: self.global_params.expand(n, -1)}

    def message_entries(self, stage: str) -> dict[str, TensorSignature] | None:
        """Round and evaluation messages carry the global model alone; no setup message is
        sent, and a finalize message (APFL's, without DP) is empty."""
        model = {KIND_GLOBAL: _model_signature(self.ctx)}
        return {SETUP: {}, ROUND: model, EVALUATE: model, FINALIZE: {}}.get(stage)

    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Every participant receives the global model."""
        return {i: {KIND_GLOBAL: self.global_params} for i in participants}

    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """The global model becomes the weighted average of the accepted copies."""
        if replies:
            self.global_params.copy_(weighted_average(replies))
        return {}

    def evaluation_messages(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """Each evaluated client receives the current global model."""
        return {i: {KIND_GLOBAL: self.global_params} for i in clients}

    def server_state_dict(self) -> dict[str, Any]:
        """The global model."""
        return {"global": self.global_params}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global model (shape and finiteness checked)."""
        _load_matrix(self.global_params, state.get("global"), "global")

    def _train_global_copy(self, i: int, w: Tensor) -> int:
        """Client ``i`` trains a copy of the received ``w`` into ``uploads[i]`` with the
        context's oracle (under DP: the round's DP-SGD model release)."""
        self.uploads[i].copy_(w)
        return self.ctx.train_client(i, self.uploads[i])

    def _reply(self, i: int, steps: int) -> Payload:
        return {KIND_THETA: self.uploads[i], KEY_NUM_EXAMPLES: _num_examples(self.ctx, i),
                KEY_STEPS: _scalar(steps)}

    def _train_global_copies(self, participants: Sequence[int],
                             received: Mapping[int, Tensor]) -> dict[int, int]:
        """Batched :meth:`_train_global_copy` of every participant; the steps per client."""
        for i in participants:
            self.uploads[i].copy_(received[i])
        return self.train_batched(participants, self.uploads).steps

    def _personal_oracle(self) -> GradientOracle:
        """The oracle the personal model's local run uses, below the method's wrapper (each
        subclass names its own: Ditto's proximal, APFL's mixture wrapper's inner oracle)."""
        raise NotImplementedError(f"{type(self).__name__} must name its personal model's oracle")

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """Both local runs of every participant, each run batched over the participants (a
        client's two runs keep their order, so its generator and noise draw as in the loop)."""
        participants = list(messages)
        reason = self.batched_unsupported(participants, [self.ctx.oracle, self._personal_oracle()])
        if reason is not None:
            return self.batched_fallback(reason)
        received = {i: messages[i][KIND_GLOBAL] for i in participants}
        steps = self._train_global_copies(participants, received)
        personal = self._train_personal(participants, received)
        return {i: self._reply(i, steps[i] + personal[i]) for i in participants}

    def _train_personal(self, participants: Sequence[int],
                        received: Mapping[int, Tensor]) -> dict[int, int]:
        """Batched second local run (the personal models, each toward its received ``w``);
        the steps per client. Each subclass implements its own objective."""
        raise NotImplementedError(f"{type(self).__name__} must train its personal models")


CLIENT_HELD_MODELS = (
    "Ditto's and APFL's personal models never leave the client and train without noise; DP "
    "covers what is sent (the global-model copies). Publishing a personal model would be an "
    "unaccounted release, and their reported test metrics (evaluations of these models) are "
    "not covered by the DP guarantee.")
"""results.json ``assumptions.client_held_models`` of a DP run with Ditto or APFL."""


def _client_held_models(cfg: Any) -> dict[str, Any]:
    return {"client_held_models": CLIENT_HELD_MODELS} if cfg.privacy.enabled else {}


class Ditto(DittoChecks, _GlobalModelMethod):
    """Ditto (Li, Hu, Beirami, Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning
    Through Personalization").

    The global model ``w`` is trained by FedAvg: each participant trains a copy of ``w`` on
    its data and the server averages the copies. Each participant also keeps a personalized
    model ``v_i`` that it trains on ``F_i(v) + lam/2 ||v - w||^2`` with ``w`` the global model
    it received this round. Only the copy of ``w`` is uploaded, and it does not depend on
    ``v_i``. Under DP the copy's local run is the round's model release (DP-SGD); ``v_i`` never
    leaves the client, so, like Local, it trains without noise (:func:`personal_oracle`).
    Evaluated on ``v_i``. Client state: ``v_i`` (its row of ``theta``); server state: ``w``.
    """

    name = "ditto"
    batched_client_half = True  # _GlobalModelMethod's, training through _train_personal

    @classmethod
    def assumptions(cls, cfg: Any) -> dict[str, Any]:
        """Under DP: the personal model never leaves the client and is not noised."""
        return _client_held_models(cfg)

    def __init__(self, ctx: MethodContext, lam: float = 0.1) -> None:
        super().__init__(ctx)
        self.lam = lam
        self.prox = ProximalGradient(personal_oracle(ctx), lam)

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Train a copy of the received global model (the upload), then the personal model
        proximally toward the received global model."""
        w = message[KIND_GLOBAL]
        steps = self._train_global_copy(i, w)
        self.prox.target(self.theta[i], w)
        steps += _train_with(self.ctx, self.prox, i, self.theta[i])
        return self._reply(i, steps)

    def _personal_oracle(self) -> GradientOracle:
        return self.prox.inner

    def _train_personal(self, participants: Sequence[int],
                        received: Mapping[int, Tensor]) -> dict[int, int]:
        """The personal models, proximally toward the received global model, together."""
        return self.train_batched(participants, self.theta, anchor=received, mu=self.lam,
                                  oracle=self.prox.inner).steps

    def evaluation_messages(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """Nothing: a client is evaluated on its personal model ``v_i``."""
        return {}

    def message_entries(self, stage: str) -> dict[str, TensorSignature] | None:
        """As :class:`_GlobalModelMethod`'s, but an evaluation message carries nothing
        (:meth:`evaluation_messages`)."""
        return {} if stage == EVALUATE else super().message_entries(stage)


class APFL(APFLChecks, _GlobalModelMethod):
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
    never leave the client during training, so, like Local, ``v_i`` trains without noise
    (:func:`personal_oracle`). Evaluated on the mixture with the current global model (the
    evaluation message). Client state: ``v_i`` and ``alpha_i``; server state: ``w``. The
    finalize exchange reports every ``alpha_i`` (results ``alpha``, as before the contract).
    """

    name = "apfl"
    batched_client_half = True  # _GlobalModelMethod's, training through _train_personal
    checkpoint_fields = FederatedMethod.checkpoint_fields | {"alpha"}

    @classmethod
    def assumptions(cls, cfg: Any) -> dict[str, Any]:
        """Under DP: the personal model never leaves the client and is not noised."""
        return _client_held_models(cfg)

    def __init__(self, ctx: MethodContext, alpha: float = 0.25, adaptive: bool = True,
                 alpha_lr: float | None = None) -> None:
        super().__init__(ctx)
        if not 0.0 <= alpha <= 1.0:
            raise BaselineConfigError(f"baselines.apfl.alpha must lie in [0, 1]; got {alpha}")
        # client side: alpha_i of every client (in process), float64 as always
        self.alpha: Any = ctx.per_client(torch.tensor(float(alpha), dtype=torch.float64))
        lr = ctx.train.lr if alpha_lr is None else alpha_lr
        self.mix = MixtureGradient(personal_oracle(ctx), ctx.flat.num_params, adaptive, lr)

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Train a copy of the received global model (the upload), then ``v_i`` through the
        mixture with it, updating ``alpha_i``."""
        w = message[KIND_GLOBAL]
        steps = self._train_global_copy(i, w)
        self.mix.target(self.theta[i], w, float(self.alpha[i]))
        steps += _train_with(self.ctx, self.mix, i, self.theta[i])
        self.alpha[i] = self.mix.alpha
        return self._reply(i, steps)

    def _personal_oracle(self) -> GradientOracle:
        return self.mix.inner

    def _train_personal(self, participants: Sequence[int],
                        received: Mapping[int, Tensor]) -> dict[int, int]:
        """Every ``v_i`` through its mixture with the received global model, together, each
        ``alpha_i`` updated as :class:`MixtureGradient` does."""
        out = self.train_batched(participants, self.theta, oracle=self.mix.inner,
                                 mix_with=received,
                                 mix_alphas=[float(self.alpha[i]) for i in participants],
                                 mix_adaptive=self.mix.adaptive, mix_lr=self.mix.alpha_lr)
        for i in participants:
            self.alpha[i] = out.alphas[i]
        return out.steps

    def client_eval_row(self, i: int, message: Payload | None = None) -> Tensor:
        """Client ``i``'s personalized model ``alpha_i v_i + (1 - alpha_i) w`` with the
        received global model ``w`` (a new tensor)."""
        if message is None or KIND_GLOBAL not in message:
            raise BaselineConfigError("APFL evaluates the mixture with the global model; the "
                                      "evaluation message must carry it")
        a = self.alpha[i:i + 1].to(self.theta.dtype)
        row = self.theta[i:i + 1].clone().mul_(a.unsqueeze(1))
        row.addr_(1.0 - a, message[KIND_GLOBAL])
        return row[0]

    def client_state_dict(self, i: int) -> Payload:
        """``v_i`` (``theta``) and ``alpha_i`` (a float64 scalar)."""
        return {KIND_THETA: self.theta[i], "alpha": self.alpha[i]}

    def load_client_state_dict(self, i: int, state: Payload) -> None:
        """Restore ``v_i`` and ``alpha_i`` (shape, finiteness and ``alpha`` in [0, 1] checked)."""
        alpha = state.get("alpha")
        if not isinstance(alpha, Tensor) or alpha.numel() != 1 or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"client state field 'alpha' of client {i} must be a scalar in [0, 1]")
        super().load_client_state_dict(i, state)
        self.alpha[i] = float(alpha)

    def state_dict(self) -> dict[str, Any]:
        """The in-process checkpoint: ``theta``, ``global`` and every ``alpha_i``."""
        return {**super().state_dict(), "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``alpha`` outside [0, 1] is refused)."""
        super().load_state_dict(state)
        alpha = self.alpha.clone()
        _load_matrix(alpha, state.get("alpha"), "alpha")
        if ((alpha < 0) | (alpha > 1)).any():
            raise ValueError("checkpoint field 'alpha' has values outside [0, 1]")
        self.alpha.copy_(alpha)

    #: Whether clients report ``alpha_i`` at the end. ``alpha_i`` is learned from gradients
    #: that carry no DP noise, so under DP it is not released (no unaccounted release).
    report_alpha: bool = True

    @classmethod
    def from_config(cls, ctx: MethodContext, cfg: Any) -> FederatedMethod:
        """As every baseline; under DP the mixing weights stay on the clients."""
        method = super().from_config(ctx, cfg)
        assert isinstance(method, APFL)
        method.report_alpha = not cfg.privacy.enabled
        return method

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        """As Ditto's, and without DP the finalize reply ``alpha`` (under DP it is not sent)."""
        if stage == FINALIZE and not cfg.privacy.enabled:
            return {"alpha": "the mixing weight, reported only by non-private runs"}
        return super().reply_entries(cfg, stage)

    def finalize_messages(self) -> dict[int, Payload]:
        """Every client is asked for its mixing weight (an empty message); nobody under DP."""
        if not self.report_alpha:
            return {}
        return {i: {} for i in range(self.ctx.num_clients)}

    def client_finalize(self, i: int, message: Payload) -> Payload:
        """Client ``i``'s ``alpha_i``."""
        return {"alpha": self.alpha[i].clone()}

    def server_finalize(self, replies: Mapping[int, Payload]) -> dict[str, Any]:
        """``alpha``: the clients' mixing weights in client order (6 decimals)."""
        base = super().server_finalize(replies)
        if not self.report_alpha:
            return {**base,
                    "alpha": "not released: learned without DP noise, it stays on the clients"}
        return {**base, "alpha": [round(float(replies[i]["alpha"]), 6) for i in sorted(replies)]}


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


class FedAMP(FedAMPChecks, _Baseline, FederatedMethod):
    """FedAMP (Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, AAAI 2021, "Personalized Cross-Silo
    Federated Learning on Non-IID Data"), in its heuristic form (HeurFedAMP) with cosine
    similarity.

    The server holds every client's last accepted uploaded model ``w_j`` (``models``; the
    initialization before a client's first upload) and sends client ``i`` its message
    ``u_i = sum_j xi_ij w_j`` (:func:`attention_weights`: clients with more similar parameters
    weigh more). Each participant trains its own ``w_i`` on ``F_i(w) + lam/2 ||w - u_i||^2``
    (``lam`` is the paper's ``lambda / alpha_k``) and uploads it. Evaluated on ``w_i``.
    Client state: ``w_i`` (its row of ``theta``); server state: ``models``. A rejected upload
    leaves the server's row unchanged; the client keeps the model it trained.
    """

    name = "fedamp"

    def __init__(self, ctx: MethodContext, sigma: float = 10.0, self_weight: float = 0.5,
                 lam: float = 1.0) -> None:
        super().__init__(ctx)
        if ctx.num_clients < 2:
            raise BaselineConfigError("FedAMP needs at least two clients")
        self.sigma, self.self_weight, self.lam = sigma, self_weight, lam
        self.models = self.theta.clone()  # server: each client's last accepted upload
        self.messages = self.theta.clone()  # server: u = xi @ models
        self.xi: Any = (torch.eye(ctx.num_clients, dtype=torch.float64) if ctx.held is None else
                        HeldRows(ctx.num_clients, ctx.held, torch.nn.functional.one_hot(
                            torch.tensor(ctx.held), ctx.num_clients).to(torch.float64)))
        self.prox = ProximalGradient(ctx.oracle, lam)

    def compute_messages(self) -> None:
        """Server step: ``xi`` from the held uploads and ``u = xi @ w`` (one product)."""
        self.xi = attention_weights(self.models, self.sigma, self.self_weight)
        torch.matmul(self.xi.to(self.models.dtype), self.models, out=self.messages)

    def message_state(self) -> MessageState | None:
        """Uploads: the server's copies ``w_i``; downloads: the messages ``u_i``."""
        return {KIND_THETA: self.models}, {KIND_MESSAGE: self.messages}

    def message_entries(self, stage: str) -> dict[str, TensorSignature] | None:
        """A round message carries the client's own aggregate ``u_i`` alone (one model row);
        evaluation messages are empty, and no setup or finalize message is sent."""
        return {
            SETUP: {},
            ROUND: {KIND_MESSAGE: _model_signature(self.ctx)},
            EVALUATE: {},
            FINALIZE: {},
        }.get(stage)

    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Messages from the last accepted uploads; participant ``i`` receives ``u_i``."""
        self.compute_messages()
        return {i: {KIND_MESSAGE: self.messages[i]} for i in participants}

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Proximal local training of ``w_i`` toward the received message; reply ``w_i``."""
        self.prox.target(self.theta[i], message[KIND_MESSAGE])
        steps = _train_with(self.ctx, self.prox, i, self.theta[i])
        return {KIND_THETA: self.theta[i], KEY_STEPS: _scalar(steps)}

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """Every participant's ``w_i``, proximally toward its received message, together."""
        participants = list(messages)
        reason = self.batched_unsupported(participants, [self.prox.inner])
        if reason is not None:
            return self.batched_fallback(reason)
        anchors = {i: messages[i][KIND_MESSAGE] for i in participants}
        out = self.train_batched(participants, self.theta, anchor=anchors, mu=self.lam,
                                 oracle=self.prox.inner)
        return {i: {KIND_THETA: self.theta[i], KEY_STEPS: _scalar(out.steps[i])}
                for i in participants}

    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """The accepted uploads replace the server's copies; reports the largest weight a
        client's message put on another client."""
        for i, reply in replies.items():
            self.models[i].copy_(reply[KIND_THETA])
        off = self.xi.clone().fill_diagonal_(0.0)
        return {"max_neighbour_weight": float(off.max())}

    def server_state_dict(self) -> dict[str, Any]:
        """The server's copies of the uploaded models."""
        return {"models": self.models}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the server's copies (shape and finiteness checked)."""
        _load_matrix(self.models, state.get("models"), "models")


# --------------------------------------------------------------------------- IFCA


def _check_cluster_count(k: int, num_params: int, dtype: torch.dtype,
                         section: str = "ifca") -> None:
    """BaselineConfigError when IFCA's messages of ``k`` cluster models of ``num_params``
    parameters of ``dtype`` would be over the payload caps (naming ``[baselines.<section>]``)."""
    largest = IFCA.largest_cluster_count(num_params, dtype)
    if k > largest:
        raise BaselineConfigError(
            f"baselines.{section}.num_clusters = {k}: every IFCA message carries all cluster models, "
            f"and one message holds at most {largest} models of {num_params:,} parameters "
            f"({str(dtype).removeprefix('torch.')}); use at most {largest} clusters")


class IFCA(IFCAChecks, _Baseline, FederatedMethod):
    """IFCA (Ghosh, Chung, Yin, Ramchandran, NeurIPS 2020, "An Efficient Framework for
    Clustered Federated Learning").

    The server keeps ``K`` cluster models (rows of a K x P matrix; model 0 is the common
    initialization, models 1..K-1 fresh default initializations drawn from a seed derived
    from it, so they change with the experiment seed) and sends all of them to each
    participant. The client picks the cluster model with the lowest loss on its
    ``selection_split`` (ties: lowest index), trains it locally and replies the model with its
    cluster index; the server replaces each cluster model by the ``num_examples``-weighted
    average of the accepted uploads assigned to it (clusters nobody picked are unchanged).
    Evaluated on the cluster model the client picks from the current ones (the evaluation
    message carries them); the finalize exchange reports every client's final choice
    (results ``assignment``). A client holds no state between messages.

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
        section = self.config_section()  # a plug-in subclass's own section
        if num_clusters < 1:
            raise BaselineConfigError(
                f"baselines.{section}.num_clusters must be >= 1; got {num_clusters}")
        if selection_split not in ("train", "val"):
            raise BaselineConfigError(
                f"baselines.{section}.selection_split must be 'train' or 'val'; got "
                f"{selection_split!r}")
        if selection_split == "train" and not isinstance(unwrap_oracle(ctx.oracle), PlainGradient):
            raise BaselineConfigError(ifca_train_under_dp(section))
        if selection_split == "val" and validation != "public":
            raise BaselineConfigError(ifca_val_private(section))
        # before the K x P cluster matrix is allocated
        _check_cluster_count(num_clusters, ctx.flat.num_params, ctx.init.dtype, section)
        self.num_clusters = num_clusters
        self.selection_split = selection_split
        self.clusters = self._initial_clusters(num_clusters)
        # server: the cluster each client chose in its latest accepted reply (-1: none yet)
        self.assignment: Any = ctx.per_client(torch.tensor(-1, dtype=torch.long))
        # server: how many times the cluster models changed (sent with them, so a client can
        # reuse the choice it made against the same models)
        self.version = 0
        # client side: the buffers of the choice uploads, (N, 1) floats as on the wire, and a
        # cache {client: (version, choice)} -- an optimisation only, not state: a miss
        # recomputes the same choice
        self.choices: Any = ctx.per_client(torch.zeros(1, dtype=self.theta.dtype))
        self._choice_cache: dict[int, tuple[int, int]] = {}

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        """Round: the trained cluster model copy (DP-SGD), its cluster index, the
        training-set size and the steps; finalize: the final cluster index. A DP run picks
        the cluster on validation data declared public (check_config refuses the rest)."""
        choice = ("the cluster index, picked on validation data declared public "
                  "(data.validation = 'public')")
        if stage == ROUND:
            return {**super().reply_entries(cfg, stage), KIND_CLUSTER_CHOICE: choice,
                    KEY_NUM_EXAMPLES: NUM_EXAMPLES_REASON}
        if stage == FINALIZE:
            return {KIND_CLUSTER_CHOICE: choice}
        return super().reply_entries(cfg, stage)

    def _initial_clusters(self, k: int) -> Tensor:
        ctx = self.ctx
        clusters = ctx.init.unsqueeze(0).repeat(k, 1)
        digest = hashlib.sha256(ctx.init.cpu().numpy().tobytes()).digest()
        base = int.from_bytes(digest[:7], "big")
        for c in range(1, k):
            module = ctx.flat.bind(clusters[c])
            init_parameters(module, torch.Generator().manual_seed(base + c))
        return clusters

    # -- client half
    def choose(self, i: int, clusters: Tensor) -> int:
        """Client ``i``: the index of the cluster model in ``clusters`` (K x P) with the lowest
        loss on its selection split (ties: the lowest index)."""
        if clusters.dim() != 2 or clusters.shape[0] != self.num_clusters:
            raise BaselineConfigError(
                f"IFCA expects {self.num_clusters} cluster models, got shape {tuple(clusters.shape)}")
        c = self.ctx.clients[i]
        x, y = (c.train_x, c.train_y) if self.selection_split == "train" else (c.val_x, c.val_y)
        if x.shape[0] == 0:
            raise ClientUpdateError(
                f"IFCA: client {i} has an empty {self.selection_split} split, so it cannot choose a "
                f"cluster ([baselines.{self.config_section()}] selection_split names the split "
                "it chooses on)")
        losses = torch.tensor(
            [evaluate_loss(self.ctx.flat, clusters[k], x, y) for k in range(self.num_clusters)]
        )
        return int(torch.argmin(losses))

    def _choice_for(self, i: int, message: Payload) -> int:
        """Client ``i``'s choice among the message's cluster models: :meth:`choose`, or the
        choice it made against the same models version (no new loss evaluations)."""
        clusters = message[KIND_CLUSTERS]
        version = message.get(KEY_CLUSTERS_VERSION)
        if version is not None:
            cached = self._choice_cache.get(i)
            if cached is not None and cached[0] == int(version):
                return cached[1]
        k = self.choose(i, clusters)
        if version is not None:
            self._choice_cache[i] = (int(version), k)
        return k

    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Pick a cluster model from the received ones, train a copy; reply it with the
        cluster index, the training-set size and the steps."""
        clusters = message[KIND_CLUSTERS]
        k = self._choice_for(i, message)
        self.theta[i].copy_(clusters[k])
        steps = self.ctx.train_client(i, self.theta[i])
        self.choices[i, 0] = k
        return {KIND_THETA: self.theta[i], KIND_CLUSTER_CHOICE: self.choices[i],
                KEY_NUM_EXAMPLES: _num_examples(self.ctx, i), KEY_STEPS: _scalar(steps)}

    def client_update_batched(self, rnd: int, messages: Mapping[int, Payload]
                              ) -> dict[int, Payload] | None:
        """Every participant's cluster choice (per client, in order), then copies of the
        chosen models trained together."""
        participants = list(messages)
        reason = self.batched_unsupported(participants, [self.ctx.oracle])
        if reason is not None:
            return self.batched_fallback(reason)
        for i in participants:
            k = self._choice_for(i, messages[i])
            self.theta[i].copy_(messages[i][KIND_CLUSTERS][k])
            self.choices[i, 0] = k
        out = self.train_batched(participants, self.theta)
        return {i: {KIND_THETA: self.theta[i], KIND_CLUSTER_CHOICE: self.choices[i],
                    KEY_NUM_EXAMPLES: _num_examples(self.ctx, i), KEY_STEPS: _scalar(out.steps[i])}
                for i in participants}

    def client_eval_row(self, i: int, message: Payload | None = None) -> Tensor:
        """The received cluster model client ``i`` picks."""
        if message is None or KIND_CLUSTERS not in message:
            raise BaselineConfigError("IFCA evaluates a client on the cluster model it picks; "
                                      "the evaluation message must carry the cluster models")
        return message[KIND_CLUSTERS][self._choice_for(i, message)]

    def client_finalize(self, i: int, message: Payload) -> Payload:
        """Client ``i``'s choice among the final cluster models."""
        return {KIND_CLUSTER_CHOICE: torch.tensor([float(self._choice_for(i, message))],
                                                  dtype=self.theta.dtype)}

    def client_state_dict(self, i: int) -> Payload:
        """Nothing: a client's choice and trained copy are recomputed from each message (the
        choice cache only saves work)."""
        return {}

    def load_client_state_dict(self, i: int, state: Payload) -> None:
        """An IFCA client has no state; anything else is refused."""
        if state:
            raise ValueError(f"IFCA client state must be empty, got fields {sorted(state)}")

    # -- server half
    @staticmethod
    def _clusters_payload(clusters: Tensor, version: int) -> Payload:
        """What every round, evaluation and finalize message carries."""
        return {KIND_CLUSTERS: clusters, KEY_CLUSTERS_VERSION: _scalar(version)}

    def _clusters_message(self) -> Payload:
        return self._clusters_payload(self.clusters, self.version)

    def message_entries(self, stage: str) -> dict[str, TensorSignature] | None:
        """Every round, evaluation and finalize message carries all ``K`` cluster models (one
        K x P matrix of the model's dtype) and their version (a 0-d int64); no setup message
        is sent."""
        dtype, shape = _model_signature(self.ctx)
        models = {
            KIND_CLUSTERS: (dtype, (self.num_clusters, *shape)),
            KEY_CLUSTERS_VERSION: (torch.int64, ()),
        }
        return {SETUP: {}, ROUND: models, EVALUATE: models, FINALIZE: models}.get(stage)

    @classmethod
    def largest_cluster_count(cls, num_params: int, dtype: torch.dtype) -> int:
        """The most cluster models of ``num_params`` parameters of ``dtype`` one message can
        carry under :func:`~secure_fedora.algorithms.contract.payload_size_problem`'s caps
        (measured on that rule with shape-only tensors, nothing allocated; 0 when even one
        does not fit)."""

        def fits(k: int) -> bool:
            clusters = torch.empty((k, num_params), dtype=dtype, device="meta")
            return payload_size_problem(cls._clusters_payload(clusters, 0), num_params) is None

        low, high = 0, 1
        while high < 2**62 and fits(high):  # the message grows with k: double, then bisect
            low, high = high, 2 * high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    @classmethod
    def check_model_size(cls, cfg: Any, num_params: int, dtype: torch.dtype) -> None:
        """Refuse more clusters than one message can carry: every message holds all the
        cluster models (:meth:`largest_cluster_count`)."""
        k = cls.hyperparameters(cfg)["num_clusters"]
        _check_cluster_count(k, num_params, dtype, cls.config_section())

    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Every participant receives the K cluster models (and their version)."""
        return {i: self._clusters_message() for i in participants}

    def evaluation_messages(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """Each evaluated client receives the K cluster models (and their version)."""
        return {i: self._clusters_message() for i in clients}

    def finalize_messages(self) -> dict[int, Payload]:
        """Every client receives the final cluster models, to report its choice."""
        return {i: self._clusters_message() for i in range(self.ctx.num_clients)}

    def _check_choice(self, value: Tensor) -> str | None:
        if not isinstance(value, Tensor) or value.numel() != 1:
            return "a cluster choice must be one number"
        k = float(value.reshape(-1)[0])
        if k != int(k) or not 0 <= k < self.num_clusters:
            return f"cluster index {format_exact(k)} is not an integer in [0, {self.num_clusters})"
        return None

    def _valid_choices(self, replies: Mapping[int, Payload]) -> dict[int, int]:
        """The replies' cluster indices; a reply without a valid one is left out (logged)."""
        out = {}
        for i, reply in replies.items():
            problem = self._check_choice(reply.get(KIND_CLUSTER_CHOICE))
            if problem is None:
                out[i] = int(float(reply[KIND_CLUSTER_CHOICE].reshape(-1)[0]))
            else:
                log.warning("ifca: reply of client %d left out: %s", i, problem)
        return out

    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """Each cluster model becomes the weighted average of the accepted uploads that chose
        it (clusters nobody chose are unchanged); reports how many clusters were chosen."""
        choices = self._valid_choices(replies)
        if choices:
            ids = list(choices)
            chosen = torch.as_tensor([choices[i] for i in ids], dtype=torch.long)
            weights = torch.tensor([float(replies[i][KEY_NUM_EXAMPLES]) for i in ids])
            rows = torch.stack([replies[i][KIND_THETA] for i in ids])
            member = torch.zeros(self.num_clusters, len(ids), dtype=rows.dtype)
            member[chosen, torch.arange(len(ids))] = weights.to(rows.dtype)
            totals = member.sum(dim=1)
            used = totals > 0
            self.clusters[used] = (member[used] / totals[used].unsqueeze(1)).to(rows.device) @ rows
            self.version += 1
            self.assignment[torch.as_tensor(ids, dtype=torch.long)] = chosen
        return {"clusters_used": float(len(set(choices.values())))}

    def server_finalize(self, replies: Mapping[int, Payload]) -> dict[str, Any]:
        """``assignment``: every client's final choice, in client order. Both runtimes hand
        over every client's reply (or stop the run); a reply whose cluster index is not an
        integer in ``[0, K)`` is left out (logged), and that client keeps the choice of its
        latest accepted round reply (-1 if none)."""
        for i, k in self._valid_choices(replies).items():
            self.assignment[i] = k
        return {**super().server_finalize(replies), "assignment": self.assignment.tolist()}

    def message_state(self) -> MessageState | None:
        """Uploads: model rows and cluster choices (an (N, 1) float matrix); the K cluster
        models a participant downloads (and their version) are signed but not tracked: no
        client keeps a copy of them (K x P per client), so one that rejects them sits the
        round out (or is sent its finalize message again) rather than keep K stale models."""
        return {KIND_THETA: self.theta, KIND_CLUSTER_CHOICE: self.choices}, {}

    def upload_rows(self, rnd: int, matrix: Tensor, participants: Sequence[int], *,
                    kind: str = KIND_THETA, check: ValueCheck | None = None) -> list[int]:
        """The base exchange, with every cluster-choice upload checked to be an index in
        ``[0, K)`` (an invalid one is a rejected upload)."""
        if kind == KIND_CLUSTER_CHOICE and check is None:
            check = self._check_choice
        return super().upload_rows(rnd, matrix, participants, kind=kind, check=check)

    def server_state_dict(self) -> dict[str, Any]:
        """The cluster models, their version and the clients' latest reported choices."""
        return {"clusters": self.clusters, "clusters_version": torch.tensor(self.version),
                "assignment": self.assignment}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`server_state_dict` (choices outside -1..K-1 are refused)."""
        _load_matrix(self.clusters, state.get("clusters"), "clusters")
        assignment = state.get("assignment")
        if isinstance(assignment, Tensor) and (
                (assignment < -1) | (assignment >= self.num_clusters)).any():
            raise ValueError(
                f"checkpoint field 'assignment' has clusters outside -1..{self.num_clusters - 1}")
        _load_matrix(self.assignment, assignment, "assignment")
        version = state.get("clusters_version")
        if not isinstance(version, Tensor) or version.numel() != 1 or version.is_floating_point() \
                or int(version) < 0:
            raise ValueError("checkpoint field 'clusters_version' must be a non-negative integer")
        self.version = int(version)
        self._choice_cache.clear()


KEY_CLUSTERS_VERSION = "clusters_version"
"""IFCA message entry: the version of the cluster models it carries (0-d integer tensor)."""

# --------------------------------------------------------------------------- registry


_BUILTIN_CLASSES: dict[str, type[FederatedMethod]] = {
    c.name: c for c in (FedProx, Ditto, APFL, FedAMP, IFCA)}
"""The built-in class of each baseline name (what :func:`make_baseline` builds without ``cls``)."""

# registered as classes: the registry builds them with from_config(ctx, cfg), and the privacy
# plan and config checks read releases(cfg) / check_config(cfg) from them
for _cls in _BUILTIN_CLASSES.values():
    METHODS.register(_cls.name, _cls)
