"""What the config asks the built-in methods when it reads a file, without torch.

Config validation calls a listed method's ``check_config(cfg)`` and a ``[baselines.<name>]``
section's ``check_hyperparameters(section)``. The built-in methods inherit these hooks from
the classes here (:class:`MethodChecks` and its subclasses), and
:data:`BUILTIN_DECLARATIONS` names the same classes per built-in method, so that
:meth:`secure_fedora.core.registry.Registry.declared` answers the config without importing
the methods' modules (they import torch, about 2 s). The baselines' hyper-parameters live
here for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privacy.accounting import format_exact
from privacy.errors import ToolkitError
from secure_fedora.core.config import (
    MAX_INT,
    MAX_SCALE,
    pull_limit_text,
    pull_stability_limit,
)

__all__ = [
    "APFLChecks",
    "BASELINE_HYPERPARAMETERS",
    "BASELINE_NAMES",
    "BUILTIN_DECLARATIONS",
    "FedAvgChecks",
    "CKKS_SUMMARY_VECTORS",
    "BaselineChecks",
    "BaselineConfigError",
    "DittoChecks",
    "FedAMPChecks",
    "FedProxChecks",
    "FedoraChecks",
    "IFCAChecks",
    "LocalChecks",
    "MAX_POWER_ITERATIONS",
    "MAX_SERIES_TERMS",
    "MethodChecks",
    "POWER_TOLERANCE",
    "PROXIMAL_WEIGHTS",
    "max_power_alpha",
    "power_iterations",
    "series_terms",
    "validate_hyperparameters",
]

#: How many summary columns (clients x fedora.q) CKKS relatedness packs: one slot lane each, of
#: the 4096 slots of ``privacy.ckks.DEFAULT_PARAMETERS`` (a number here, so that reading a
#: config does not load TenSEAL; a test keeps the two equal).
CKKS_SUMMARY_VECTORS = 4096


#: Most terms of the truncated propagation series a config may ask for (``propagation =
#: "sparse"``): each term is a sparse product that torch's CPU kernel does not give back
#: (measured: 20,000 terms held 0.7 GB), and past 10,000 terms building it takes minutes per
#: hundred clients, where the exact factored operator builds in about a second.
MAX_SERIES_TERMS = 16_384


def series_terms(alpha: float, tolerance: float) -> int:
    """Terms of the truncated series: its tail ``alpha^T <= tolerance / 4``."""
    return 1 if alpha == 0.0 else max(1, math.ceil(math.log(tolerance / 4.0) / math.log(alpha)))


#: Most iterations ``propagation_matrix_power`` (``propagation = "power"``) runs by default:
#: at least 10,000 and otherwise :func:`power_iterations` at :data:`POWER_TOLERANCE`, which
#: stays within this cap for any alpha below :func:`max_power_alpha` (about 0.999858).
MAX_POWER_ITERATIONS = 200_000

#: The largest entry change at which ``propagation_matrix_power`` stops (its default ``tol``).
POWER_TOLERANCE = 1e-12


def power_iterations(alpha: float, tol: float, row_sum: float = 1.0) -> int:
    """Iterations after which ``propagation_matrix_power`` has surely stopped: its change
    at iteration ``t`` (from 0) is ``alpha^(t+1) S^t (S - I)``, whose entries are at most
    ``2 (alpha r)^(t+1)`` for rows of ``S`` summing to at most ``r``. 0 where ``alpha r >= 1``
    or ``tol >= 2`` (no such bound, or none needed)."""
    rate = alpha * max(1.0, row_sum)
    if rate >= 1.0 or tol >= 2.0:
        return 0
    if rate == 0.0:
        return 2
    return math.floor(math.log(tol / 2.0) / math.log(rate)) + 2


def max_power_alpha(tol: float = POWER_TOLERANCE) -> float:
    """The largest alpha (to float rounding) at which :func:`power_iterations` (row sums 1)
    stays within :data:`MAX_POWER_ITERATIONS`: ``exp(log(tol / 2) / (MAX_POWER_ITERATIONS -
    1))``, 0.99985839 at :data:`POWER_TOLERANCE` (the config asks :func:`power_iterations`
    itself). Beyond it the power iteration converges only on a graph that mixes fast enough (a
    periodic one, such as two clients each other's only neighbour, never does), which the
    config cannot know before the clients' summaries are released."""
    return math.exp(math.log(tol / 2.0) / (MAX_POWER_ITERATIONS - 1))


class BaselineConfigError(ToolkitError, ValueError):
    """A baseline name or hyper-parameter that cannot be used; the message names it."""


# --------------------------------------------------------------------------- hyper-parameters


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FedProxParams(_Params):
    """FedProx: ``mu`` weighs the proximal term ``mu/2 ||w - w_global||^2``."""

    mu: Annotated[float, Field(ge=0, le=MAX_SCALE)] = 0.01


class DittoParams(_Params):
    """Ditto: ``lam`` weighs ``lam/2 ||v_i - w_global||^2`` in the personalized objective."""

    lam: Annotated[float, Field(ge=0, le=MAX_SCALE)] = 0.1


class APFLParams(_Params):
    """APFL: initial mixing weight ``alpha`` on the local model; ``adaptive`` updates it by
    gradient descent with step ``alpha_lr`` (``None``: the training learning rate)."""

    alpha: Annotated[float, Field(ge=0, le=1)] = 0.25
    adaptive: bool = True
    alpha_lr: Annotated[float, Field(gt=0, le=MAX_SCALE)] | None = None


class FedAMPParams(_Params):
    """FedAMP (heuristic, cosine form): ``sigma`` scales the cosine similarities,
    ``self_weight`` is the weight ``xi_ii`` a client's own model keeps in its message ``u_i``,
    ``lam`` weighs the proximal term ``lam/2 ||w_i - u_i||^2`` (the paper's ``lambda/alpha_k``)."""

    sigma: Annotated[float, Field(gt=0)] = 10.0
    self_weight: Annotated[float, Field(ge=0, lt=1)] = 0.5
    lam: Annotated[float, Field(ge=0, le=MAX_SCALE)] = 1.0


class IFCAParams(_Params):
    """IFCA: ``num_clusters`` cluster models; a client picks the one with the lowest loss on
    its ``selection_split`` ("train" as in the paper; "val" uses the validation split, which
    the config declares public)."""

    num_clusters: Annotated[int, Field(ge=1, le=MAX_INT)] = 4
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


def validate_hyperparameters(name: str, section: Mapping[str, Any] | None, *,
                             label: str | None = None) -> dict[str, Any]:
    """The full hyper-parameter dict of baseline ``name``: defaults overridden by ``section``
    (the config's ``[baselines.<label>]``, ``label`` defaulting to ``name``: a plug-in
    registered as a subclass of a baseline has its own section, with the baseline's keys).

    Raises :class:`BaselineConfigError` naming the section and key for an unknown method, an
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
            problems.append(f"baselines.{label or name}.{key}: {msg}")
        raise BaselineConfigError("; ".join(problems)) from None


def ifca_train_under_dp(section: str = "ifca") -> str:
    """The refusal of IFCA's cluster choice by training loss under DP, naming the method's
    ``[baselines.<section>]`` (a plug-in subclass's own) and the method to leave out."""
    return (
        f"baselines.{section}.selection_split='train' picks clusters by training loss, an "
        "unaccounted release under a private oracle; under DP use selection_split='val' with "
        "data.validation='public' (declaring the validation data public), or leave "
        f"{section!r} out of methods")


def ifca_val_private(section: str = "ifca") -> str:
    """The refusal of IFCA's cluster choice by private validation loss, naming the method's
    ``[baselines.<section>]`` and the method to leave out."""
    return (
        f"baselines.{section}.selection_split='val' picks clusters by validation loss, but "
        "data.validation is 'private'; no accounted cluster choice exists: set "
        "data.validation='public' (declaring the validation data public), or leave "
        f"{section!r} out of methods")


# --------------------------------------------------------------------------- config hooks


class MethodChecks:
    """The config hooks of every built-in method (a method class inherits them)."""

    #: Whether the in-process runtime may run this method on a CUDA device
    #: (``[training] device = "cuda"`` or ``"auto"``): its state and messages follow
    #: ``ctx.init``'s device and it draws nothing from a CPU-only source. Default: no (the
    #: run stays on, or is refused off, the CPU). A plug-in that is GPU-safe declares it.
    cuda_supported: ClassVar[bool] = False

    #: Whether this method computes FEDORA's relatedness (``[fedora] relatedness``) and its
    #: pull weight ``lambda_i`` from the validation split: results.json then states
    #: ``assumptions.relatedness``, and the audit report its relatedness and lambda notes.
    #: Default: no (a run of such methods only claims neither).
    uses_relatedness: ClassVar[bool] = False

    #: What its clients keep between rounds that DP does not cover, in words: state trained
    #: or learned without DP noise that never leaves the client (Ditto's personal models).
    #: In process the run directory's ``checkpoints/`` holds every client's state, so a DP
    #: run's results.json names it there (``assumptions.checkpoints``). Default: nothing
    #: (what its clients keep is trained with DP-SGD and accounted, or computed from what
    #: they released); a method keeping such state must declare it.
    unreleased_client_state: ClassVar[str] = ""

    #: The proximal weights its local objective adds (``w/2 ||theta - anchor||^2`` on the
    #: gradient after clipping, through momentum): the keys of its ``[baselines.<name>]``
    #: section holding each ``w``, or a function ``(cfg) -> {config key: w}``. The config
    #: refuses ``training.lr * (training.weight_decay + sum of w) >= 2 (1 +
    #: training.momentum)`` (``core.config.method_proximal_terms``). Default: none.
    proximal_weights: ClassVar[Any] = ()

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise ``ValueError`` (naming the key) when ``cfg`` cannot run this method; called
        by the config validation for every listed method. Default: every config is fine."""

    @classmethod
    def derived_row_names(cls, name: str, cfg: Any) -> tuple[str, ...]:
        """The ``methods.<row>`` entries of results.json that this method, registered as
        ``name``, may add beside its own under ``cfg`` (its ``derived_rows``): the config
        refuses a method list in which such a row is also a method's name. Default: none."""
        return ()


class FedAvgChecks(MethodChecks):
    """FedAvg's config hooks: its fine-tuned row."""

    #: Whether this class, built on FedAvg, fine-tunes after the last round (FedAvg's
    #: finalize exchange: its reply ``finetuned_test_metric``, its ``<name>_ft`` row). FedAvg
    #: itself does; a class built on it declares ``finetunes = True`` to do so (FedAvg's own
    #: fine-tuning is not inherited; a subclass of a declaring class inherits its declaration).
    #: Read through :meth:`fine_tunes`.
    finetunes: ClassVar[bool]

    @classmethod
    def fine_tunes(cls) -> bool:
        """Whether this class fine-tunes: FedAvg itself (and its config hooks, which answer
        for ``fedavg``) always; a class built on it only where it, or a class between it and
        FedAvg, declares ``finetunes = True``."""
        for klass in cls.__mro__:
            if klass is FedAvgChecks or vars(klass).get("name") == "fedavg":
                return klass is cls  # FedAvg's own fine-tuning is not inherited
            if "finetunes" in vars(klass):
                return bool(vars(klass)["finetunes"])
        return False

    @classmethod
    def derived_row_names(cls, name: str, cfg: Any) -> tuple[str, ...]:
        """``<name>_ft``, the fine-tuned test metric, of a class that fine-tunes
        (:meth:`fine_tunes`): for ``fedavg`` when ``[fedavg] finetune_epochs`` is positive,
        for another name always (a factory building FedAvg fine-tunes with settings of its
        own)."""
        if not cls.fine_tunes() or (name == "fedavg" and cfg.fedavg.finetune_epochs == 0):
            return ()
        return (f"{name}_ft",)


class LocalChecks(MethodChecks):
    """Local's config hooks: it runs on CUDA."""

    cuda_supported = True


class FedoraChecks(MethodChecks):
    """FEDORA's config hooks (it runs on CUDA, and computes relatedness and lambda_i)."""

    cuda_supported = True
    uses_relatedness = True

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """``fedora.k`` below the number of clients; under DP an accounted relatedness mode;
        encrypted relatedness only where CKKS can pack every summary column; a truncated
        series (``propagation = "sparse"``) of at most :data:`MAX_SERIES_TERMS` terms; a
        ``fedora.max_pull`` below the pull's stability limit
        (``core.config.pull_stability_limit``: 2 less ``lr * weight_decay / (1 + momentum)``)."""
        t, max_pull = cfg.training, cfg.fedora.max_pull
        if max_pull is not None and \
                max_pull >= pull_stability_limit(t.lr, t.momentum, t.weight_decay):
            raise ValueError(
                f"fedora.max_pull = {max_pull!r} reaches the pull's stability limit "
                f"{pull_limit_text(t.lr, t.momentum, t.weight_decay)} (training.lr = "
                f"{format_exact(t.lr)}, training.weight_decay = {format_exact(t.weight_decay)}, "
                f"training.momentum = {format_exact(t.momentum)}): a pull of that size moves theta "
                "away from phi whatever the data; use a max_pull below the limit (1: a pull "
                "stops at phi)")
        if cfg.fedora.k >= cfg.data.num_clients:
            raise ValueError(
                f"fedora.k = {cfg.fedora.k} must be smaller than data.num_clients = "
                f"{cfg.data.num_clients} (each client keeps at most N - 1 neighbours)")
        vectors = cfg.data.num_clients * cfg.fedora.q
        if "encrypted" in cfg.fedora.relatedness and vectors > CKKS_SUMMARY_VECTORS:
            # Found here, not after every client released (and, under DP, paid for) its summary.
            raise ValueError(
                f"fedora.relatedness {cfg.fedora.relatedness!r} packs data.num_clients x fedora.q "
                f"= {cfg.data.num_clients} x {cfg.fedora.q} = {vectors} summary columns, more "
                f"than the {CKKS_SUMMARY_VECTORS} CKKS slots; lower fedora.q or data.num_clients")
        f = cfg.fedora
        if f.propagation == "sparse" and series_terms(f.alpha, f.propagation_tolerance) \
                > MAX_SERIES_TERMS:
            # found here, not at round 1 after gigabytes were held building it
            raise ValueError(
                f"fedora.propagation 'sparse' at fedora.alpha = {format_exact(f.alpha)} and "
                f"fedora.propagation_tolerance = {format_exact(f.propagation_tolerance)} needs a "
                f"series of {series_terms(f.alpha, f.propagation_tolerance):,} terms, more than "
                f"{MAX_SERIES_TERMS:,}; use propagation 'factored' or 'dense' (exact), a "
                "smaller alpha or a larger tolerance")
        if f.propagation == "power" and \
                power_iterations(f.alpha, POWER_TOLERANCE) > MAX_POWER_ITERATIONS:
            # found here, not after the summaries were released and 200,000 iterations ran
            raise ValueError(
                f"fedora.propagation 'power' at fedora.alpha = {format_exact(f.alpha)} needs up to "
                f"{power_iterations(f.alpha, POWER_TOLERANCE):,} iterations, more than "
                f"{MAX_POWER_ITERATIONS:,}: it converges only on a graph that mixes fast, which "
                "is known only after the clients' summaries are released; use propagation "
                "'auto', 'factored' or 'dense' (exact, the same P), or a fedora.alpha of at most "
                f"{math.floor(max_power_alpha() * 1e6) / 1e6:.6f}")
        if cfg.privacy.enabled and "noised" not in cfg.fedora.relatedness:
            raise ValueError(
                f"fedora.relatedness {cfg.fedora.relatedness!r} releases summary information "
                "without an accounted mechanism; with privacy.enabled use 'noised' or "
                "'noised+encrypted'")


class BaselineChecks(MethodChecks):
    """The config hooks every baseline shares: ``[baselines.<section>]`` checked against it.

    A class registered under its own name (a plug-in deriving from a baseline) reads the
    section of that name (:meth:`config_section`), with the keys of the baseline it derives
    from (:meth:`baseline_kind`); the parent's section never applies to it."""

    name: ClassVar[str]

    #: Whether the method's constructor takes the config's ``data.validation`` ("public" or
    #: "private") as its ``validation`` keyword (:func:`~secure_fedora.algorithms.baselines.
    #: make_baseline` passes it only then): IFCA's does, to refuse a cluster choice on
    #: private validation data. A plug-in declaring it gets the same argument.
    takes_validation: ClassVar[bool] = False

    @classmethod
    def derived_row_names(cls, name: str, cfg: Any) -> tuple[str, ...]:
        """None: a baseline adds no ``methods.<row>`` entry (FedProx, built on FedAvg, never
        fine-tunes)."""
        return ()

    @classmethod
    def baseline_kind(cls) -> str:
        """The built-in baseline whose hyper-parameters this class takes: the nearest class
        of its MRO whose own ``name`` is a baseline's (its ``name`` otherwise)."""
        for klass in cls.__mro__:
            own = vars(klass).get("name")
            if isinstance(own, str) and own in _PARAMS:
                return own
        return cls.name

    @classmethod
    def config_section(cls) -> str:
        """The name of the ``[baselines.<name>]`` section this class reads: its own ``name``
        when that is a baseline's, else the one name it is registered under in the method
        registry (``cls.name`` when it is not registered). A class registered under several
        names is refused (:class:`BaselineConfigError`): which section applies would be a
        guess."""
        own = vars(cls).get("name")
        if isinstance(own, str) and own in _PARAMS:
            return own
        from secure_fedora.core.registry import METHODS

        names = METHODS.names_of(cls)
        if len(names) > 1:
            raise BaselineConfigError(
                f"{cls.__name__} is registered as {names}, so which [baselines.<name>] section "
                "it reads is ambiguous; register one subclass per name")
        return names[0] if names else cls.name

    @classmethod
    def hyperparameters(cls, cfg: Any) -> dict[str, Any]:
        """The validated hyper-parameters of :meth:`config_section` in ``cfg`` (defaults for
        missing keys)."""
        section = cls.config_section()
        return validate_hyperparameters(cls.baseline_kind(), cfg.baselines.get(section),
                                        label=section)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise :class:`BaselineConfigError` naming the key when the method's section
        (:meth:`config_section`) has an unknown key or a bad value. (Its proximal weight,
        :attr:`proximal_weights`, is checked by the config for every method.)"""
        cls.hyperparameters(cfg)

    @classmethod
    def check_hyperparameters(cls, section: Mapping[str, Any] | None) -> None:
        """Raise :class:`BaselineConfigError` naming the key when ``section`` (the config's
        ``[baselines.<name>]`` of this method) has an unknown key or a bad value (what the
        config asks the registered method when it reads the file)."""
        validate_hyperparameters(cls.baseline_kind(), section, label=cls.config_section())


class FedProxChecks(BaselineChecks):
    """FedProx's config hooks: ``mu`` weighs its proximal term."""

    name = "fedprox"
    proximal_weights = ("mu",)


class DittoChecks(BaselineChecks):
    """Ditto's config hooks: ``lam`` weighs the personalized model's proximal term; its
    personal models train without noise."""

    name = "ditto"
    proximal_weights = ("lam",)
    unreleased_client_state = "its personal models, trained without noise"


class APFLChecks(BaselineChecks):
    """APFL's config hooks: its personal models and mixing weights learn without noise."""

    name = "apfl"
    unreleased_client_state = "its personal models and mixing weights alpha, learned without noise"


class FedAMPChecks(BaselineChecks):
    """FedAMP's config hooks: ``lam`` weighs its proximal term."""

    name = "fedamp"
    proximal_weights = ("lam",)


class IFCAChecks(BaselineChecks):
    """IFCA's config hooks."""

    name = "ifca"
    takes_validation = True

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Also refuse the cluster choices no accountant covers: by training loss under DP,
        by validation loss when validation data is private."""
        params = cls.hyperparameters(cfg)
        if params["selection_split"] == "train" and cfg.privacy.enabled:
            raise BaselineConfigError(ifca_train_under_dp(cls.config_section()))
        if params["selection_split"] == "val" and cfg.data.validation != "public":
            raise BaselineConfigError(ifca_val_private(cls.config_section()))


BUILTIN_DECLARATIONS: dict[str, type[MethodChecks]] = {
    "local": LocalChecks,
    "fedavg": FedAvgChecks,
    "fedora": FedoraChecks,
    "fedprox": FedProxChecks,
    "ditto": DittoChecks,
    "apfl": APFLChecks,
    "fedamp": FedAMPChecks,
    "ifca": IFCAChecks,
}
"""The config hooks of each built-in method, for the registry to answer without importing the
method (a test keeps every hook the very function the registered class has)."""

PROXIMAL_WEIGHTS: dict[str, str] = {
    name: checks.proximal_weights[0] for name, checks in BUILTIN_DECLARATIONS.items()
    if len(checks.proximal_weights) == 1}
"""The built-in methods whose local objective adds a proximal term: the hyper-parameter
holding its weight (read from their classes' :attr:`MethodChecks.proximal_weights`; kept for
code that imported it)."""
