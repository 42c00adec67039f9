"""Experiment configuration: TOML files validated by pydantic.

Unknown keys and bad values are rejected with the offending key named (``ConfigError``).
Every section forbids extra keys so that a typo never silently falls back to a default.
Types are strict (``rounds = true`` or ``lr = "0.1"`` is refused, never coerced) and every
float must be finite (``inf``/``nan`` are refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    format_at_least,
    format_exact,
    format_ordered,
)
from privacy.errors import ToolkitError
from privacy.paths import check_path, read_regular_file

__all__ = [
    "MAX_INT",
    "MAX_PLANNED_DPSGD_STEPS",
    "MAX_THREADS",
    "RUN_NAME_PATTERN",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FedoraConfig",
    "TrainingConfig",
    "check_flag_argument",
    "UnusedSetting",
    "check_settings_used",
    "unused_overrides_problem",
    "unused_settings",
    "with_written",
    "written_keys",
    "override_index_problem",
    "participants_per_round",
    "local_divergence_problem",
    "method_proximal_terms",
    "pull_limit_text",
    "pull_stability_limit",
    "check_path_argument",
    "classes_per_client_problem",
    "config_document",
    "config_from_bytes",
    "config_hash",
    "load_config",
    "load_run_config",
    "parse_config",
    "revalidate",
    "toml_key",
    "unregistered_hint",
]

log = logging.getLogger(__name__)

#: Largest learning rate, weight decay, clip norm and baseline weight (FedProx's ``mu``,
#: Ditto's and FedAMP's ``lam``, APFL's ``alpha_lr``): torch takes them as float32 scalars (a
#: finite float beyond float32's range raised a RuntimeError mid-training) and a summary's
#: sensitivity squares its clip (1e300 overflowed).
MAX_SCALE = 1e6

# ``[fedora] propagation = "auto"`` uses the exact dense operator up to this many clients and
# the sparse operator above (measured: at 1,000 clients the dense product is 8x slower).
AUTO_DENSE_MAX_CLIENTS = 256


def local_divergence_problem(lr: float, momentum: float, terms: dict[str, float]) -> str | None:
    """Why local SGD diverges for every data set, or None: ``terms`` maps config keys to the
    weights of quadratic terms ``w/2 ||theta - a||^2`` added to the gradient after any
    clipping and passed through momentum (``training.weight_decay``, FedProx's ``mu``, Ditto's
    and FedAMP's ``lam``). Their curvature ``c = sum(terms)`` is fixed by the config; the
    heavy-ball step :class:`secure_fedora.learning.client.MomentumSGD` (torch.optim.SGD, no
    dampening, no Nesterov) contracts it only while ``lr * c < 2 (1 + momentum)``
    (docs/design.md, "Local step stability"); from that product on, the returned message names
    the keys, the product and the bound."""
    curvature = sum(terms.values())
    bound = 2.0 * (1.0 + momentum)
    product = lr * curvature
    if product < bound:
        return None
    keys = " + ".join(terms)
    values = " + ".join(format_exact(v) for v in terms.values())
    change = " or ".join(["training.lr", *(k for k, v in terms.items() if v > 0)])
    # exact: the bound is the one to stay below, and a rounded product could read below it
    return (f"training.lr * ({keys}) = {format_exact(lr)} * ({values}) = {format_exact(product)}"
            " reaches the local step's stability bound 2 (1 + training.momentum) = "
            f"{format_exact(bound)}: from there the "
            "momentum SGD step no longer shrinks the parameters' distance to the term's anchor "
            "(spectral radius >= 1) whatever the data, and local training diverges (the term is "
            "added after gradient clipping, so neither training.clip_grad_norm nor DP clipping "
            f"bounds it); lower {change} until the product is below {format_exact(bound)}")


def pull_stability_limit(lr: float, momentum: float, weight_decay: float) -> float:
    """The per-step pull fraction ``p = lr * lambda`` from which FEDORA's pull diverges:
    ``2 - lr * weight_decay / (1 + momentum)`` (2 without weight decay). The pull acts outside
    the momentum (``theta <- theta - lr b_t - p (theta - phi)``), so on the weight decay alone
    the step is stable iff ``lr * weight_decay < (1 + momentum)(2 - p)`` (docs/design.md, "Local
    step stability"); from ``p`` equal to the limit on, ``theta - phi`` no longer shrinks
    whatever the data. Exact for any config :class:`TrainingConfig` accepts (there the limit
    is above 0); every check of the pull (``fedora.max_pull``, ``unstable_pulls``, the
    divergence message) compares ``p`` with it."""
    return 2.0 - lr * weight_decay / (1.0 + momentum)


def participants_per_round(participation: float, num_clients: int) -> int:
    """Clients per round for ``training.participation``: every client at 1, else
    ``ceil(participation * num_clients)`` of the decimal the config states, at least 1.

    The product is taken exactly on that decimal (the float's shortest repr, which is what a
    TOML or JSON value reads back as): 0.07 of 100 clients is 7, where the float product
    ``0.07 * 100 = 7.000000000000001`` would round up to 8."""
    if participation >= 1.0:
        return num_clients
    return max(1, math.ceil(Fraction(repr(float(participation))) * num_clients))


def pull_limit_text(lr: float, momentum: float, weight_decay: float) -> str:
    """:func:`pull_stability_limit` as a message writes it: ``2`` without weight decay, else
    the formula and its exact value (rounded, a limit just below 2 would read as 2)."""
    if weight_decay == 0.0:
        return "2"
    return (f"2 - training.lr * training.weight_decay / (1 + training.momentum) = "
            f"{pull_stability_limit(lr, momentum, weight_decay)!r}")


class ConfigError(ToolkitError, ValueError):
    """A configuration file that cannot be used; the message names the key and the problem."""


def check_path_argument(value: str | os.PathLike[str], name: str,
                        what: str = "directory") -> Path:
    """``value``, a path given in Python (a run directory, a key store), as a :class:`Path`;
    ConfigError naming ``name`` unless it is a string or path-like that is not empty or only
    spaces and holds no NUL character (the rules of the CLI's ``--out`` and ``--keystore`` and
    of ``security.keystore``: an empty path would mean the current directory, and the file
    system refuses NUL only once something is written). ``what`` the path names ("directory"
    or "file"), for the message."""
    return check_path(value, name, ConfigError, what)


def check_flag_argument(value: object, name: str) -> bool:
    """``value``, a yes/no argument given in Python (``resume=``), unless it is not a bool:
    then ConfigError naming ``name`` (a truthy ``"no"`` or ``1`` must not mean yes, nor ``None``
    or ``0`` no)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r:.80}")
    return value


def classes_per_client_problem(train_per_client: int, val_per_client: int,
                               classes_per_client: int) -> str | None:
    """Why a pathological partition of these sizes cannot be drawn, or None: every client's
    train and validation rows must hold each of its ``classes_per_client`` classes, so both
    sizes must be at least it. The one rule of ``[data]`` and of
    :func:`~secure_fedora.data.partition.pathological_partition`."""
    for key, size in (("train_per_client", train_per_client),
                      ("val_per_client", val_per_client)):
        if size < classes_per_client:
            return (f"data.{key} = {size} must be at least data.classes_per_client = "
                    f"{classes_per_client} (one row of each of a client's classes)")
    return None


def _registered(registry_name: str) -> AfterValidator:
    """A validator accepting the names in one of :mod:`secure_fedora.core.registry`'s registries
    (imported on use: the registries import the modules that register the built-ins)."""

    def check(value: str) -> str:
        from secure_fedora.core import registry
        return getattr(registry, registry_name).check(value)

    return AfterValidator(check)


def _import_spec(key: str) -> AfterValidator:
    def check(value: str) -> str:
        from secure_fedora.core.plugins import check_spec

        return check_spec(value, key)

    return AfterValidator(check)


def _loss_name(value: str) -> str:
    from secure_fedora.core.plugins import check_spec
    from secure_fedora.core.registry import LOSSES

    return check_spec(value, "training.loss") if ":" in value else LOSSES.check(value)


def _not_blank(value: str) -> str:
    """``value`` unless it is only spaces (a path of spaces is refused by
    :func:`check_path_argument` where given in Python or on the command line)."""
    if not value.strip():
        raise ValueError(f"is only spaces ({value!r:.40}): name a directory")
    return value


MethodName = Annotated[str, _registered("METHODS")]
"""A registered method (:data:`secure_fedora.core.registry.METHODS`): fedora, local, fedavg,
fedprox, ditto, apfl, fedamp, ifca, and any plug-in."""


# A DP-SGD plan above this many steps per client (rounds x ceil(local_epochs / sample_rate))
# is refused. At this maximum, calibrating the noise takes about 6 s with the RDP accountant and
# about 3 minutes with PRV (measured on the project's 2-core machine); training the steps takes
# far longer. A plan of billions of steps (sample_rate = 1e-9) would never finish.
MAX_PLANNED_DPSGD_STEPS = 1_000_000

# Run names become directory names under runs/: letters, digits, ".", "_" and "-", starting
# with a letter or digit, so that no name can leave the runs folder.
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class _Section(BaseModel):
    # strict: TOML values are never coerced (a bool is not an int, a string not a float);
    # allow_inf_nan=False: every float field must be finite.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


#: Largest integer a config value may be: counts reach torch and numpy as int64 (a larger
#: batch size overflowed mid-training) and the config's own checks as floats (a count above
#: float's range raised a raw OverflowError while validating).
MAX_INT = 2**63 - 1

PositiveInt = Annotated[int, Field(gt=0, le=MAX_INT)]

#: Most torch threads a process may ask for (``training.threads``, ``deploy local --threads``).
MAX_THREADS = 1024


#: Said where a partition asks for its keys: per-client data lists are not partitioned.
_UNPARTITIONED = "; data given as per-client lists is not partitioned: leave data.partition out"


class DataConfig(_Section):
    """Which data, how it is split among clients (docs/design.md section 2; reference: rotated MNIST)."""

    dataset: Annotated[str, _registered("DATASETS")] = "mnist"
    # User data instead of a registered dataset: "package.module:function", called with the
    # experiment seed; returns a centralized dataset (split by `partition`) or a list of
    # per-client dicts (already federated). See secure_fedora.data.userdata.
    source: Annotated[str, _import_spec("data.source")] | None = None
    partition: Annotated[str, _registered("PARTITIONERS")] = "rotation"
    num_clients: Annotated[int, Field(ge=2, le=MAX_INT)] = 36
    train_per_client: PositiveInt = 128
    val_per_client: PositiveInt = 64
    test_per_client: PositiveInt | None = None
    groups: PositiveInt | None = None
    dirichlet_alpha: Annotated[float, Field(gt=0)] | None = None
    classes_per_client: PositiveInt | None = None
    rotation_interpolation: Literal["bilinear", "nearest"] = "bilinear"
    # "public": lambda_i is computed from the validation split in the clear, which is private
    # only if that split is public data (declared in results and report). "private": lambda_i
    # comes from a clipped, noised validation-loss difference that is accounted.
    validation: Literal["public", "private"] = "public"

    @model_validator(mode="after")
    def _partition_keys(self) -> DataConfig:
        if self.source is not None and "dataset" in self.model_fields_set:
            raise ValueError("data.dataset and data.source exclude each other")
        if self.partition == "dirichlet" and self.dirichlet_alpha is None:
            raise ValueError(f"partition 'dirichlet' needs data.dirichlet_alpha{_UNPARTITIONED}")
        if self.partition == "pathological" and self.classes_per_client is None:
            raise ValueError(
                f"partition 'pathological' needs data.classes_per_client{_UNPARTITIONED}")
        if self.partition not in ("rotation", "iid") and self.test_per_client is None:
            raise ValueError(
                f"partition {self.partition!r} needs data.test_per_client (its test rows follow "
                f"each client's label mix, so the test split cannot simply be divided){_UNPARTITIONED}"
            )
        if self.partition != "rotation" and self.groups is not None:
            raise ValueError("data.groups applies only to partition 'rotation'")
        if self.partition != "dirichlet" and self.dirichlet_alpha is not None:
            raise ValueError("data.dirichlet_alpha applies only to partition 'dirichlet'")
        if self.partition != "pathological" and self.classes_per_client is not None:
            raise ValueError("data.classes_per_client applies only to partition 'pathological'")
        if self.classes_per_client is not None:
            problem = classes_per_client_problem(self.train_per_client, self.val_per_client,
                                                 self.classes_per_client)
            if problem is not None:
                raise ValueError(problem)
        if self.groups is not None and self.groups > self.num_clients:
            raise ValueError(f"data.groups = {self.groups} must not exceed data.num_clients = "
                             f"{self.num_clients}")
        # other data (data.source, the Python API's data=) has its own class count, known
        # once loaded: the partitioner checks it
        if "dataset" in self.model_fields_set and self.classes_per_client is not None \
                and self.classes_per_client > 10:
            raise ValueError("data.classes_per_client must be at most 10 (MNIST and "
                             "Fashion-MNIST have 10 classes)")
        return self


class ModelConfig(_Section):
    """A registered model (``name``) or user code (``factory = "package.module:function"``,
    called as ``function(input_shape, num_classes)`` and returning an ``nn.Module``)."""

    name: Annotated[str, _registered("MODELS")] = "mlp"
    factory: Annotated[str, _import_spec("model.factory")] | None = None

    @model_validator(mode="after")
    def _one_model(self) -> ModelConfig:
        if self.factory is not None and "name" in self.model_fields_set:
            raise ValueError("model.name and model.factory exclude each other")
        return self


class TrainingConfig(_Section):
    """Local optimisation (reference: SGD, momentum 0.9, lr 5e-3, wd 5e-5, batch 64, E 5)."""

    rounds: PositiveInt = 200
    local_epochs: PositiveInt = 5
    lr: Annotated[float, Field(gt=0, le=MAX_SCALE)] = 5e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=MAX_SCALE)] = 5e-5
    batch_size: PositiveInt = 64
    participation: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Non-private training only: rescale each mini-batch gradient to at most this L2 norm
    # (a stability knob, not a privacy mechanism; DP-SGD clips per sample with
    # privacy.max_grad_norm instead and ignores this).
    clip_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # "cross_entropy" (accuracy), "bce" (binary / multi-label, AUC) or
    # "package.module:function" returning per-sample losses; see secure_fedora.learning.tasks.
    loss: Annotated[str, AfterValidator(_loss_name)] = "cross_entropy"
    # Where all state, data and noise live: "cpu", "cuda" (refused when no GPU is visible) or
    # "auto" (cuda when available, else cpu).
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # torch intra-op threads (torch.set_num_threads); unset: torch's default. At most 1024
    # (OpenMP allocates per thread up front: 10**9 exhausted memory before anything ran).
    threads: Annotated[int, Field(ge=1, le=MAX_THREADS, strict=True)] | None = None
    # How the in-process runtime trains a round's participants: "loop" (each client in turn,
    # the reference path), "batched" (all participants together, secure_fedora.learning.batched;
    # equal to the loop within float rounding; a method, model or oracle it cannot reproduce
    # falls back to the loop, logged and recorded in results.json) or "auto" (batched on a GPU
    # and on the CPU with 2+ threads, where it was measured faster; the loop on one CPU thread:
    # see docs/notes/NOTES-j4-batched.md).
    engine: Literal["loop", "batched", "auto"] = "loop"
    # Write the resumable checkpoint every K rounds, or "auto": after the first round and then
    # whenever the time since the last checkpoint reaches 10x what that checkpoint took (so
    # checkpoints cost at most about 10% of the run). Always after the last round. A crash
    # between checkpoints repeats the rounds since the last one on resume, bit-identically
    # (under DP the repeated rounds' releases are re-made from the release journal and
    # matched to their ledger entries: accounted once).
    # Not part of the config hash: it does not change results, so a resume may change it.
    checkpoint_every: PositiveInt | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _stable_weight_decay(self) -> TrainingConfig:
        # weight decay is the one quadratic term every method's local step has
        problem = local_divergence_problem(self.lr, self.momentum,
                                           {"training.weight_decay": self.weight_decay})
        if problem is not None:
            raise ValueError(problem)
        return self

    @field_validator("checkpoint_every", mode="wrap")
    @classmethod
    def _one_line_checkpoint_every(cls, value: Any, handler: Any) -> Any:
        # one message for the union, not one per member
        try:
            return handler(value)
        except ValidationError:
            shown = ("an integer beyond that" if isinstance(value, int) and value > MAX_INT
                     else f"{value!r:.60}")  # repr() of a 4,301-digit int raises
            raise ValueError(f"must be \"auto\" or a number of rounds from 1 to {MAX_INT}, "
                             f"got {shown}") from None


class FedoraConfig(_Section):
    """Relatedness and propagation (reference: q 1, tau 10, k 2, alpha 0.8)."""

    q: PositiveInt = 1
    tau: Annotated[float, Field(gt=0)] = 10.0
    k: PositiveInt = 2
    alpha: Annotated[float, Field(ge=0, lt=1)] = 0.8
    # The operator P = (1 - alpha)(I - alpha S)^-1 is built once per graph; each round is one
    # product phi = P @ theta. dense: exact solve; factored: the exact P as a few sparse passes
    # (sparse LU of I - alpha S, inverse factors), no N x N matrix; sparse: truncated series on
    # the sparse graph with |phi - phi_exact| <= propagation_tolerance * max_j |theta_j| per
    # coordinate (the tolerance applies to this mode only: the others are exact); auto: dense
    # up to AUTO_DENSE_MAX_CLIENTS clients, factored above unless the graph's factors fill in
    # (long chains), then sparse when it is cheaper (results.json says which); power: P by power iteration
    # (the reference); encrypted: clients send CKKS-encrypted theta, the server forms
    # sum_j P_ij Enc(theta_j) with the public context only, and each client decrypts its phi_i.
    propagation: Literal["auto", "dense", "factored", "sparse", "power", "encrypted"] = "auto"
    propagation_tolerance: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    # plain: summaries in the clear; noised: Gaussian mechanism on the clipped second moment
    # (needs [privacy]); encrypted: CKKS, the server computes on ciphertexts only;
    # noised+encrypted: both (defense in depth).
    relatedness: Literal["plain", "noised", "encrypted", "noised+encrypted"] = "plain"
    # Bound on lr * lambda_i, the fraction of theta - phi_i the pull removes per step. None
    # (the paper): unbounded, and from lr * lambda_i >= pull_stability_limit (2 - lr * wd /
    # (1 + momentum); 2 without weight decay) on the pull diverges; 1: a step lands on phi_i
    # plus the SGD step. A max_pull at or above that limit is refused (FEDORA's check_config).
    max_pull: Annotated[float, Field(gt=0, lt=2)] | None = None


class FedAvgConfig(_Section):
    finetune_epochs: Annotated[int, Field(ge=0, le=MAX_INT)] = 5


class ClientBudgetConfig(_Section):
    epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None


class MechanismNoiseConfig(_Section):
    """``[privacy.mechanisms.<name>]``: the noise of a registered Gaussian mechanism a method
    declares (:data:`privacy.mechanisms.MECHANISMS`): a fixed ``noise_multiplier``, or a
    ``budget_fraction`` of each client's epsilon that the mechanism's planned releases alone
    spend (the multiplier is then calibrated, as for the built-in summary and lambda);
    exactly one of them for a plug-in mechanism. ``params``: public numbers its
    ``record_params`` may read (e.g. its clip)."""

    noise_multiplier: Annotated[float, Field(gt=0, le=MAX_NOISE_MULTIPLIER)] | None = None
    budget_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    params: dict[str, Annotated[float, Field(allow_inf_nan=False)] | Annotated[
        int, Field(ge=-MAX_INT, le=MAX_INT)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> MechanismNoiseConfig:
        if self.noise_multiplier is not None and self.budget_fraction is not None:
            raise ValueError("set noise_multiplier or budget_fraction, not both (a fixed "
                             "multiplier leaves no fraction to calibrate)")
        return self


#: The built-in fixed-noise mechanisms' flat keys under ``[privacy]`` (noise multiplier,
#: budget fraction), which ``[privacy.mechanisms.<name>]`` may set instead.
BUILTIN_MECHANISM_KEYS: dict[str, tuple[str, str]] = {
    "gaussian_summary": ("summary_noise_multiplier", "summary_budget_fraction"),
    "gaussian_lambda": ("lambda_noise_multiplier", "lambda_budget_fraction"),
}


class PrivacyConfig(_Section):
    """Differential privacy of everything a client releases (docs/design.md section 3).

    ``epsilon``/``delta`` are every client's budget (``overrides`` per client index). With
    ``noise_multiplier`` unset, DP-SGD's noise is calibrated up front so that the planned
    schedule (rounds x local steps, the summary release and the lambda releases) spends at most
    the client's epsilon. Each client refuses any release that would exceed its budget.
    """

    enabled: bool = False
    epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 8.0
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    # "auto": compute the plan under PLD and RDP and use the tighter (recorded with the reason
    # in the plan and results.json); or a registered accountant: "rdp", "pld", "prv".
    accountant: str = "auto"
    max_grad_norm: Annotated[float, Field(gt=0, le=MAX_SCALE)] = 1.0
    sample_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    noise_multiplier: Annotated[float, Field(gt=0, le=MAX_NOISE_MULTIPLIER)] | None = None
    summary_clip: Annotated[float, Field(gt=0, le=MAX_SCALE)] = 1.0
    # Noise of the one-off summary release and of the per-round lambda releases: fixed
    # multipliers, or (unset) calibrated so that each spends the given fraction of the
    # client's epsilon on its own; DP-SGD's noise is then calibrated for the whole plan.
    summary_noise_multiplier: Annotated[float, Field(gt=0, le=MAX_NOISE_MULTIPLIER)] | None = None
    summary_budget_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    lambda_clip: Annotated[float, Field(gt=0, le=MAX_SCALE)] = 2.0
    lambda_noise_multiplier: Annotated[float, Field(gt=0, le=MAX_NOISE_MULTIPLIER)] | None = None
    lambda_budget_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # Where every mechanism's randomness (DP-SGD noise and Poisson sampling, summary and
    # lambda noise) comes from (privacy.noise): "csprng" (default): a ChaCha20 keystream under
    # a key from os.urandom per client, never stored; "reproducible": generators seeded from
    # the experiment seed, so two runs repeat exactly -- NOT private against anyone who knows
    # the config (flagged in the plan, results.json, the ledger header and the audit report).
    noise: Literal["csprng", "reproducible"] = "csprng"
    overrides: dict[str, ClientBudgetConfig] = Field(default_factory=dict)
    # Noise of registered plug-in Gaussian mechanisms, by name ([privacy.mechanisms.<name>]);
    # a built-in's table is read into its flat keys above (see _builtin_mechanism_tables).
    mechanisms: dict[str, MechanismNoiseConfig] = Field(default_factory=dict)
    # Which round's models are reported as "selected". "validation": the round with the best
    # mean validation accuracy; "final_round": the last round (data-independent). Unset: the
    # final round when data.validation = "private" (choosing a round by private validation
    # accuracy is itself an unaccounted release, so "validation" is refused there), else
    # "validation".
    model_selection: Literal["validation", "final_round"] | None = None

    @model_validator(mode="after")
    def _known_accountant(self) -> PrivacyConfig:
        from privacy.accounting import ACCOUNTANT_REGISTRY
        from secure_fedora.core.registry import accept_unregistered, load_contrib

        if self.accountant == "auto" or self.accountant in ACCOUNTANT_REGISTRY:
            return self
        # Only for a name not registered yet: the default instance built while this module
        # is imported must not import the drop-in modules, which may import this module.
        load_contrib()  # a drop-in module may register the accountant
        if self.accountant not in ACCOUNTANT_REGISTRY \
                and not accept_unregistered("accountant", self.accountant):
            raise ValueError(f"privacy.accountant must be 'auto' or one of"
                             f" {sorted(ACCOUNTANT_REGISTRY)}, got {self.accountant!r} (a"
                             " plug-in accountant is registered by importing the module that"
                             " calls privacy.accounting.register_accountant; the CLI and the"
                             " Flower apps, processes of their own, import those of"
                             " secure_fedora/contrib/)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _builtin_mechanism_tables(cls, data: Any) -> Any:
        """``[privacy.mechanisms.gaussian_summary]`` / ``gaussian_lambda`` set the built-in's
        flat keys (one source of truth: the flat key is what every reader uses); both set at
        once is refused."""
        tables = data.get("mechanisms") if isinstance(data, dict) else None
        if not isinstance(tables, dict) or not set(tables) & set(BUILTIN_MECHANISM_KEYS):
            return data
        data, tables = dict(data), dict(tables)
        for name, (noise_key, fraction_key) in BUILTIN_MECHANISM_KEYS.items():
            table = tables.pop(name, None)
            if table is None:
                continue
            if not isinstance(table, dict):
                raise ValueError(f"privacy.mechanisms.{name} must be a table")
            table = dict(table)
            if "noise_multiplier" in table and "budget_fraction" in table:
                raise ValueError(f"privacy.mechanisms.{name}: set noise_multiplier or "
                                 "budget_fraction, not both")
            for key, flat in (("noise_multiplier", noise_key), ("budget_fraction", fraction_key)):
                if key not in table:
                    continue
                if flat in data:
                    raise ValueError(
                        f"privacy.mechanisms.{name}.{key} and privacy.{flat} both set the "
                        f"built-in {name}'s {key.replace('_', ' ')}; keep one of them")
                data[flat] = table.pop(key)
            if table:
                raise ValueError(f"privacy.mechanisms.{name} may set only noise_multiplier or "
                                 f"budget_fraction (its params come from privacy.*), got "
                                 f"{sorted(table)}")
        data["mechanisms"] = tables
        return data

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "noise_seed" in data:
            raise ValueError(
                "privacy.noise_seed was removed: set privacy.noise = \"csprng\" (the default; "
                "unpredictable noise) or privacy.noise = \"reproducible\" (seeded from the "
                "experiment seed; not private against anyone who knows the config)"
            )
        return data


class SecurityConfig(_Section):
    """Message security of the in-process runtime (FEDORA's messages), and what a client's
    error texts tell the server.

    With ``envelopes``, every theta_i a client sends and every phi_i it receives travels in a
    signed envelope (sender, round, nonce, payload hash, Ed25519 signature); the receiver
    rejects unknown senders, bad signatures, replays, stale rounds, wrong shapes and
    non-finite values, logs the rejection and goes on with the other clients.

    ``client_errors`` chooses what a Flower client's error or refusal text sent to the server
    holds (such texts are not accounted releases and can name facts of its data):
    ``"withheld"`` (default) only the error's class name and a fixed sentence, the full text
    going to the client's own log; ``"full"`` the whole one-line text, from the clients whose
    SuperNode agrees (node config ``client-errors="full"``; the others withhold whatever this
    says). A budget refusal, which
    the client's ledger records, is sent whole either way. In process no client text leaves
    the process; ``results.json`` states the setting in both runtimes.
    """

    envelopes: bool = False
    client_errors: Literal["withheld", "full"] = "withheld"
    #: Key store of a DP run's private keys (see :mod:`secure_fedora.secure.keystore`); ``None``:
    #: the default store outside the run directory. A path is not empty or only spaces (as
    #: ``--keystore``) and holds no NUL character (TOML can write one; the file system refuses
    #: it).
    keystore: Annotated[str, Field(min_length=1, pattern=r"^[^\x00]*$"),
                        AfterValidator(_not_blank)] | None = None


class EvaluationConfig(_Section):
    every: PositiveInt = 1


def _declares_bound(field: Any, *names: str) -> bool:
    """Whether a pydantic field's constraints include one of ``names`` (``"le"``, ...)."""
    return any(getattr(m, n, None) is not None for m in getattr(field, "metadata", ())
               for n in names)


def _plugin_number_problem(value: Any, key: str, field: Any = None) -> str | None:
    """The first number of a plug-in method's validated parameters (``[baselines.<name>]``
    through its ``params`` model, which the config does not control) that breaks the rules of
    the built-in keys, as a message naming its key; None when all keep them. Integers are
    within int64 (torch and numpy take them as such); floats are finite and, on each side
    whose bound the plug-in's field does not declare itself (``le``/``lt`` above,
    ``ge``/``gt`` below), at most :data:`MAX_SCALE` in magnitude, as the built-in weights
    (torch takes them as float32 scalars)."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        for name in fields:
            problem = _plugin_number_problem(getattr(value, name), f"{key}.{name}", fields[name])
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        items = enumerate(value)
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int):
        if not -MAX_INT - 1 <= value <= MAX_INT:
            return f"{key}: integers must be within int64 ({-MAX_INT - 1} to {MAX_INT})"
        return None
    elif isinstance(value, float):
        if not math.isfinite(value):
            return f"{key}: floats must be finite, got {value}"
        if value > MAX_SCALE and not _declares_bound(field, "le", "lt"):
            return (f"{key}: {format_exact(value)} is above {MAX_SCALE:g}, the largest a "
                    "plug-in's float may be unless its params model declares an upper bound "
                    "(le/lt)")
        if value < -MAX_SCALE and not _declares_bound(field, "ge", "gt"):
            return (f"{key}: {format_exact(value)} is below {-MAX_SCALE:g}, the smallest a "
                    "plug-in's float may be unless its params model declares a lower bound "
                    "(ge/gt)")
        return None
    else:
        return None
    for index, item in items:
        problem = _plugin_number_problem(item, f"{key}.{index}")
        if problem is not None:
            return problem
    return None


def _check_method_section(name: str, section: Any) -> None:
    """Validate ``[baselines.<name>]`` against what method ``name`` declares in the method
    registry (the config never imports the methods): a pydantic model ``params`` (plug-ins),
    or a ``check_hyperparameters(section)`` classmethod (the built-in baselines). A name that
    declares neither is refused, listing the methods that take hyper-parameters. A ``params``
    model's numbers must also keep the built-in keys' bounds (:func:`_plugin_number_problem`)
    and, where a number was given, be given as one (a lax model would coerce ``true`` or
    ``"0.5"``)."""
    from secure_fedora.core.registry import METHODS

    known_name = name in METHODS
    if not known_name and METHODS.accepted_unregistered(name):
        return  # read by an audit: the run's own process registered it
    params = METHODS.declared(name, "params") if known_name else None
    if params is not None:
        try:
            validated = params.model_validate(section)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(section)'}: "
                f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in err.errors())
            raise ValueError(f"baselines.{name}: {problems}") from None
        if isinstance(validated, BaseModel):
            problem = _plugin_number_problem(validated, f"baselines.{name}")
            if problem is not None:
                raise ValueError(problem)
            for key, given in section.items() if isinstance(section, dict) else ():
                value = getattr(validated, key, None) if isinstance(key, str) else None
                # a lax params model coerces; the config's values never are (as built-ins')
                if isinstance(value, int | float) and not isinstance(value, bool) and (
                        isinstance(given, bool) or not isinstance(given, int | float)
                        or (isinstance(value, int) and isinstance(given, float))):
                    raise ValueError(f"baselines.{name}.{key}: {given!r:.60} is not "
                                     f"{'an integer' if isinstance(value, int) else 'a number'} "
                                     "(config values are never coerced)")
        return
    check = METHODS.declared(name, "check_hyperparameters") if known_name else None
    if check is not None:
        try:
            check(section)
        except ValueError as err:
            text = str(err)  # named once: a message naming the section's key keeps its own
            raise ValueError(text if text.startswith(f"baselines.{name}.")
                             else f"baselines.{name}: {text}") from None
        return
    known = [n for n in METHODS.in_registration_order()
             if METHODS.declared(n, "check_hyperparameters") is not None]
    raise ValueError(f"baselines.{name}: unknown baseline {name!r}; expected one of {known}")


def _proximal_declaration_problem(name: str, what: str) -> str:
    return (f"method {name!r} declares proximal_weights {what}; declare a tuple of keys of its "
            "[baselines.<name>] section (e.g. (\"mu\",)) or a function (cfg) -> {config key: "
            "weight}, each weight a finite number >= 0 (docs/design.md, \"Local step "
            "stability\")")


def _proximal_weight(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(_proximal_declaration_problem(
            name, f"whose weight {key} is {value!r:.60}, not a finite number >= 0"))
    return float(value)


def method_proximal_terms(name: str, cfg: Any) -> dict[str, float]:
    """The proximal weights registered method ``name`` declares under ``cfg``
    (``proximal_weights`` on its class, see
    :attr:`secure_fedora.algorithms.config_checks.MethodChecks.proximal_weights`): config key
    -> weight, ``{}`` when it declares none. Keys are read from the declaring class's
    hyper-parameters: a built-in baseline's (or its subclass's) own section, else its
    ``params`` model on ``[baselines.<name>]``. ``ValueError`` naming the method when the
    declaration is malformed: not keys or a function, a key its hyper-parameters lack, or a
    weight that is not a finite number >= 0."""
    from secure_fedora.core.registry import METHODS

    owner = METHODS.declarer(name, "proximal_weights")
    if owner is None:
        return {}
    declaration = owner.proximal_weights
    if callable(declaration):
        from secure_fedora.core.plugins import method_hook

        with method_hook(name, "proximal_weights(cfg)", (ValueError,)):
            terms = declaration(cfg)
        if not isinstance(terms, Mapping) or not all(isinstance(k, str) and k for k in terms):
            raise ValueError(_proximal_declaration_problem(
                name, f"as a function that returned {terms!r:.80}, not a dict of config keys"))
        return {key: _proximal_weight(name, key, value) for key, value in terms.items()}
    keys = (declaration,) if isinstance(declaration, str) else declaration
    if not isinstance(keys, tuple | list) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(_proximal_declaration_problem(name, f"= {declaration!r:.80}"))
    if not keys:
        return {}
    hyperparameters = getattr(owner, "hyperparameters", None)
    params = getattr(owner, "params", None)
    if callable(hyperparameters) and callable(getattr(owner, "config_section", None)):
        section, values = owner.config_section(), hyperparameters(cfg)
    elif isinstance(params, type) and issubclass(params, BaseModel):
        section = name
        try:
            values = params.model_validate(cfg.baselines.get(name, {})).model_dump()
        except ValidationError as err:
            raise ValueError(f"baselines.{name}: {err.errors()[0]['msg']}") from None
    else:
        raise ValueError(_proximal_declaration_problem(
            name, f"{tuple(keys)} but has no hyper-parameters (a pydantic 'params' model) "
                  "holding them"))
    unknown = [k for k in keys if k not in values]
    if unknown:
        raise ValueError(_proximal_declaration_problem(
            name, f"{tuple(keys)}, but [baselines.{section}] has no key {unknown[0]!r} (its keys: "
                  f"{sorted(values)})"))
    return {f"baselines.{section}.{k}": _proximal_weight(name, f"baselines.{section}.{k}",
                                                         values[k]) for k in keys}


class ExperimentConfig(_Section):
    """A whole experiment: one data split, one model, several methods compared on it."""

    name: Annotated[str, Field(pattern=RUN_NAME_PATTERN)] = "experiment"
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    methods: list[MethodName] = Field(
        default_factory=lambda: ["fedora", "local", "fedavg"], min_length=1
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    fedora: FedoraConfig = FedoraConfig()
    fedavg: FedAvgConfig = FedAvgConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    security: SecurityConfig = SecurityConfig()
    # Per-baseline hyper-parameters, e.g. [baselines.fedprox] mu = 0.01 (defaults and keys:
    # secure_fedora.algorithms.baselines.BASELINE_HYPERPARAMETERS).
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # The keys the user wrote, by table ("" the top level), as parse_config read them: kept
    # beside the config (not a field: no part of model_dump, equality or config_hash);
    # None for a config built in code. See written_keys.
    _written: dict[str, frozenset[str]] | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        # pydantic compares private attributes too: two configs of the same values are equal
        # however each was written
        if type(other) is type(self):
            return all(getattr(self, k) == getattr(other, k) for k in type(self).model_fields)
        return super().__eq__(other)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods lists a method twice")
        from secure_fedora.core.registry import METHODS

        for name, section in self.baselines.items():
            _check_method_section(name, section)
        from secure_fedora.core.plugins import method_hook

        p, d = self.privacy, self.data
        for name in self.methods:
            # each method checks the config it runs on (e.g. FEDORA: fedora.k < num_clients)
            check = METHODS.declared(name, "check_config")
            if check is not None:
                with method_hook(name, "check_config(cfg)", (ValueError,)):
                    check(self)
            terms = method_proximal_terms(name, self)
            if terms:  # a proximal term is a curvature fixed by the config, as weight decay
                t = self.training
                problem = local_divergence_problem(
                    t.lr, t.momentum, {"training.weight_decay": t.weight_decay, **terms})
                if problem is not None:
                    raise ValueError(problem)
        self._check_derived_rows()
        if not p.enabled:
            if "noised" in self.fedora.relatedness:
                raise ValueError("fedora.relatedness 'noised' needs privacy.enabled = true")
            if d.validation == "private":
                raise ValueError("data.validation 'private' needs privacy.enabled = true")
            return self
        for key in p.overrides:
            problem = override_index_problem(key, d.num_clients)
            if problem is not None:
                raise ValueError(problem)
        # privacy.delta first: an override without its own delta inherits it, so naming the
        # override's unset delta would point at a key the config does not have
        if p.delta >= 1.0 / d.train_per_client:
            raise ValueError(
                f"privacy.delta must be < 1/n = {format_exact(1 / d.train_per_client)} "
                f"(n = data.train_per_client = {d.train_per_client})"
            )
        for key, budget in p.overrides.items():
            if budget.delta is not None and budget.delta >= 1.0 / d.train_per_client:
                raise ValueError(f"privacy.overrides.{toml_key(key)}.delta must be < 1/n ="
                                 f" {format_exact(1 / d.train_per_client)}")
        if d.validation == "private" and p.model_selection == "validation":
            raise ValueError(
                "privacy.model_selection 'validation' picks the reported round by accuracy on "
                "private validation data, a release no accountant covers; with data.validation "
                "'private' use model_selection = 'final_round' (or leave it unset)"
            )
        self._check_dpsgd_plan()
        self._check_release_sensitivities()
        return self

    def _check_release_sensitivities(self) -> None:
        """Refuse a clip whose Gaussian mechanism's sensitivity (as
        :func:`privacy.mechanisms.second_moment_sensitivity` and ``scalar_record`` compute it,
        with the rows of a built-in dataset's client) is below the smallest normal float64:
        ``summary_clip = 1e-300`` gave sensitivity 0, refused mid-setup by the mechanism without
        naming the key; a subnormal one is not the exact scale the ledger records. Checked
        where the config asks for the release (``fedora.relatedness`` noised, ``data.validation``
        private), whichever methods are listed: a sweep's ``--methods`` may add FEDORA."""
        p, d = self.privacy, self.data
        releases = []
        if "noised" in self.fedora.relatedness:
            releases.append(("privacy.summary_clip", p.summary_clip, 2, "data.train_per_client",
                             d.train_per_client, "noised summary"))
        if d.validation == "private":
            releases.append(("privacy.lambda_clip", p.lambda_clip, 1, "data.val_per_client",
                             d.val_per_client, "noised lambda"))
        for key, clip, power, rows_key, rows, what in releases:
            sensitivity = clip**power / rows
            if sensitivity < sys.float_info.min:
                least = (sys.float_info.min * rows) ** (1 / power) * 1.001
                raise ValueError(
                    f"{key} = {format_exact(clip)}: the {what}'s sensitivity {key}"
                    f"{'^2' if power == 2 else ''} / {rows_key} = {format_exact(sensitivity)} is"
                    f" below the smallest normal float ({format_exact(sys.float_info.min)}), so"
                    " its Gaussian noise cannot be drawn at the recorded scale; raise"
                    f" {key} to at least {format_at_least(least, 3)}")

    def _check_derived_rows(self) -> None:
        """Refuse a listed method whose name is a results entry another listed method derives
        (``methods.fedavg_ft``): results.json could not hold both, found only after training."""
        from secure_fedora.core.plugins import method_hook
        from secure_fedora.core.registry import METHODS

        derived: dict[str, str] = {}
        for name in self.methods:
            row_names = METHODS.declared(name, "derived_row_names")
            with method_hook(name, "derived_row_names(name, cfg)"):
                rows = tuple(row_names(name, self)) if row_names is not None else ()
            for row in rows:
                if row in self.methods or row in derived:
                    whose = (f"the entry of the listed method {row!r}" if row in self.methods
                             else f"also added by {derived[row]!r}")
                    raise ValueError(
                        f"methods: {name!r} adds the results entry methods.{row}, {whose}; "
                        "results.json cannot hold both: register the plug-in method under "
                        "another name")
                derived[row] = name

    def _check_dpsgd_plan(self) -> None:
        """Refuse a sampling rate below one expected record per batch and a DP-SGD plan of
        more than :data:`MAX_PLANNED_DPSGD_STEPS` steps per client (same arithmetic as
        ``secure_fedora.secure.private.steps_per_round``)."""
        p, d, t = self.privacy, self.data, self.training
        n = d.train_per_client
        if p.sample_rate is not None and p.sample_rate * n < 1.0:
            least = 1 / n
            if least * n < 1.0:  # 1/49 * 49 is 0.9999999999999999 in floats
                least = math.nextafter(least, math.inf)
            expected, _ = format_ordered(p.sample_rate * n, 1.0, 3)  # never "1" when below
            raise ValueError(
                f"privacy.sample_rate = {format_exact(p.sample_rate)} expects {expected} records "
                f"per batch (data.train_per_client = {n}); use at least 1/n = "
                f"{format_at_least(least)}"
            )
        q = p.sample_rate if p.sample_rate is not None else min(1.0, t.batch_size / n)
        steps = t.rounds * math.ceil(t.local_epochs / q - 1e-9)
        if steps > MAX_PLANNED_DPSGD_STEPS:
            source = "privacy.sample_rate" if p.sample_rate is not None else \
                "training.batch_size / data.train_per_client"
            raise ValueError(
                f"the DP-SGD plan has {steps:,} steps per client (training.rounds = {t.rounds} x "
                f"ceil(training.local_epochs = {t.local_epochs} / q = {format_exact(q)}, from "
                f"{source})), "
                f"above the maximum of {MAX_PLANNED_DPSGD_STEPS:,}"
            )


def model_selection(cfg: ExperimentConfig) -> str:
    """How the reported round is chosen: ``"validation"`` (best mean validation accuracy) or
    ``"final_round"``; never ``"validation"`` on private validation data under DP."""
    p = cfg.privacy
    if p.model_selection is not None:
        return p.model_selection
    if p.enabled and cfg.data.validation == "private":
        return "final_round"
    return "validation"


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":  # a validator's own message, without pydantic's prefix
            msg = str(e.get("ctx", {}).get("error", msg.removeprefix("Value error, ")))
        # a check of the whole config names its keys itself
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return f"invalid configuration {source}:\n" + "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "(dict)") -> ExperimentConfig:
    """Validate a parsed TOML mapping; raises :class:`ConfigError` naming each bad key. The
    config keeps which keys ``data`` holds (:func:`written_keys`)."""
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    return with_written(cfg, _keys_of(data))


def _keys_of(data: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """The keys of each table of a validated mapping ("" the top level); a built-in
    mechanism's table (``[privacy.mechanisms.gaussian_summary]``) counts as the flat keys it
    sets."""
    keys: dict[str, frozenset[str]] = {"": frozenset(data)}
    for section, table in data.items():
        if not isinstance(table, Mapping):
            continue
        written = set(table)
        tables = table.get("mechanisms") if section == "privacy" else None
        for name, (noise_key, fraction_key) in BUILTIN_MECHANISM_KEYS.items():
            given = tables.get(name) if isinstance(tables, Mapping) else None
            if isinstance(given, Mapping):
                written |= {flat for key, flat in (("noise_multiplier", noise_key),
                                                   ("budget_fraction", fraction_key))
                            if key in given}
        if isinstance(tables, Mapping) and tables and set(tables) <= set(BUILTIN_MECHANISM_KEYS):
            written.discard("mechanisms")  # its tables were all read into the flat keys
        keys[section] = frozenset(written)
    return keys


def written_keys(cfg: ExperimentConfig) -> dict[str, frozenset[str]] | None:
    """The keys the user wrote for ``cfg``, by table (``""``: the top level; a section's
    table by its name, e.g. ``"privacy"``), as :func:`parse_config` (a TOML file, the dict
    given to the Python API) read them, a key written at its default included; None for a
    config built in code, whose record is pydantic's ``model_fields_set`` alone."""
    return cfg._written


def with_written(cfg: ExperimentConfig,
                 written: dict[str, frozenset[str]] | None) -> ExperimentConfig:
    """A copy of ``cfg`` holding ``written`` as the record of :func:`written_keys` (equal to
    ``cfg``: the record changes no value, dump or :func:`config_hash`). For a config rebuilt
    from another's document (e.g. with another ``data.num_clients``), which would otherwise
    read as written in full."""
    kept = cfg.model_copy()
    kept._written = written  # a private attribute: frozen=True guards the fields only
    return kept


def _first_difference(given: Any, valid: Any, key: str = "") -> tuple[str, Any] | None:
    """The first key (dotted) where ``given`` differs from ``valid`` in value or in type, with
    the given value; None when they are the same."""
    if isinstance(valid, BaseModel) and type(given) is type(valid):
        for name in type(valid).model_fields:
            found = _first_difference(getattr(given, name), getattr(valid, name),
                                      f"{key}.{name}" if key else name)
            if found is not None:
                return found
        return None
    if type(given) is not type(valid):
        return key or "(top level)", given
    if isinstance(valid, dict):
        if list(given) != list(valid):
            return key, given
        for name, value in valid.items():
            found = _first_difference(given[name], value, f"{key}.{name}")
            if found is not None:
                return found
        return None
    if isinstance(valid, list | tuple):
        if len(given) != len(valid):
            return key, given
        for i, (a, b) in enumerate(zip(given, valid, strict=True)):
            found = _first_difference(a, b, f"{key}.{i}")
            if found is not None:
                return found
        return None
    return None if given == valid else (key, given)


def toml_key(name: str) -> str:
    """``name`` as a TOML key in a table header or dotted key: bare when it is one (ASCII
    letters, digits, ``_`` and ``-``, not empty), else a quoted basic string, so that a
    message naming ``[privacy.mechanisms.<name>]`` names the table the config holds (an empty
    name reads ``""``, not nothing; ``my.mech`` stays one key)."""
    if name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
        return name
    # a JSON string is a TOML basic string but for DEL, which TOML needs escaped
    return json.dumps(name, ensure_ascii=False).replace("\x7f", "\\u007f")


def override_index_problem(key: str, num_clients: int) -> str | None:
    """Why the ``privacy.overrides`` key ``key`` does not name one of ``num_clients`` clients
    (not a decimal index in range, or written with leading zeros), or None."""
    # at most 19 digits: int() refuses 4,300, and no index reaches int64
    if not (key.isascii() and key.isdigit()) or len(key) > 19 or int(key) >= num_clients:
        return f"privacy.overrides.{toml_key(key)}: not a client index in [0, {num_clients})"
    if key != str(int(key)):  # "00" would name client 0 a second time
        return f"privacy.overrides.{toml_key(key)}: write the client index as {int(key)}"
    return None


def unused_overrides_problem(cfg: ExperimentConfig,
                             disabled: str = "the config has [privacy] enabled = false") -> str | None:
    """Why ``privacy.overrides`` of ``cfg`` are unused (``[privacy] enabled = false``, which
    ``disabled`` words), naming a key that is no client index first; None when privacy is on
    or there are no overrides. The one wording of :func:`unused_settings` and of a sweep's
    check of its cells."""
    p = cfg.privacy
    if p.enabled or not p.overrides:
        return None
    problems = [override_index_problem(key, cfg.data.num_clients) for key in p.overrides]
    bad = next((problem for problem in problems if problem is not None), None)
    keys = ", ".join(json.dumps(key) for key in p.overrides)
    why = (f"privacy.overrides ({keys}) is unused: {disabled}, and a run without privacy "
           "spends no budget")
    return why if bad is None else f"{bad}; {why}"


class UnusedSetting(BaseModel):
    """A key the user set that the run will not read: ``key`` (dotted), ``why`` (a sentence
    naming the key and the reason) and ``fix``. ``refused``: the run is refused over it;
    otherwise it is only warned about (a section of a method the run does not list, which
    scripts toggling methods keep; ``training.clip_grad_norm`` under DP, which a sweep's
    non-private cells read)."""

    model_config = ConfigDict(frozen=True)
    key: str
    why: str
    fix: str
    refused: bool


#: [privacy] keys read whether or not privacy is on.
_READ_WITHOUT_PRIVACY = frozenset({"enabled", "model_selection"})
_SUMMARY_KEYS = ("summary_clip", "summary_noise_multiplier", "summary_budget_fraction")
_LAMBDA_KEYS = ("lambda_clip", "lambda_noise_multiplier", "lambda_budget_fraction")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return format_exact(value) if isinstance(value, float) else repr(value)


def _sections_read(methods: list[str]) -> set[str]:
    """The method sections (``fedora``, ``fedavg``, ``baselines.<name>``) that some method
    of ``methods`` reads, from what each declares: ``uses_relatedness`` (FEDORA and classes
    built on it), ``fine_tunes()`` (FedAvg and classes built on it that fine-tune),
    ``config_section()`` (a baseline's section), and its own ``[baselines.<name>]``."""
    from secure_fedora.core.registry import METHODS

    read: set[str] = set()
    for name in methods:
        read.add(f"baselines.{name}")
        if name not in METHODS:  # an audit's unregistered method: assume it reads them all
            return {"fedora", "fedavg", "*"}
        if METHODS.declared(name, "uses_relatedness"):
            read.add("fedora")
        fine_tunes = METHODS.declared(name, "fine_tunes")
        if fine_tunes is not None and fine_tunes():
            read.add("fedavg")
        section = METHODS.declared(name, "config_section")
        if section is not None:
            read.add(f"baselines.{section()}")
    return read


def unused_settings(cfg: ExperimentConfig,
                    written: ExperimentConfig | None = None) -> list[UnusedSetting]:
    """Every setting of ``written`` (default ``cfg``) that the user set (pydantic's
    ``model_fields_set``: a TOML key or a Python keyword) to another value than its default
    and that a run of ``cfg`` will not read, in config order. A key at its default is named
    only where the user wrote it (:func:`written_keys`) and left the setting that makes it
    unread unwritten (``[privacy] epsilon = 8`` without ``enabled``; a lambda key without
    ``data.validation``): a config written out with every default (``model_dump``, the
    config.toml of a Python API run) writes those settings too, and stays usable. Named: any
    ``[privacy]`` key but ``enabled`` and ``model_selection`` with privacy off; the lambda's
    noise keys where ``data.validation`` is public, ``fedora.propagation_tolerance`` beside a
    propagation other than ``sparse`` or ``auto`` (all refused: privacy off, mode not
    chosen); keys of ``[fedora]``, ``[fedavg]`` or ``[baselines.<name>]`` that no listed
    method reads, the summary's noise keys where no listed method releases FEDORA's summary,
    and ``training.clip_grad_norm`` under DP (warned: method not run, DP-SGD clips per
    sample). ``written`` differs from ``cfg`` for a sweep's cell, derived from the user's
    config with ``model_copy``."""
    w = cfg if written is None else written
    p = cfg.privacy
    found: list[UnusedSetting] = []

    def add(section: str, key: str, why: str, fix: str, refused: bool = True) -> None:
        value = getattr(getattr(w, section), key)
        found.append(UnusedSetting(key=f"{section}.{key}", why=(
            f"{section}.{key} = {_shown(value)} is unused: {why}"), fix=fix, refused=refused))

    record = written_keys(w)

    def set_in(section: str, unless: tuple[str, str] | None = None) -> list[str]:
        # a key at its default counts where the record holds it and not ``unless``, the
        # (section, key) that would make it read: a dump writes both, a user's mistake one
        model = getattr(w, section)
        at_default_too = (record is not None and unless is not None
                          and unless[1] not in record.get(unless[0], ()))
        return [k for k, field in type(model).model_fields.items()
                if k in model.model_fields_set
                and (getattr(model, k) != field.get_default(call_default_factory=True)
                     or (at_default_too and k in record.get(section, ())))]

    read = _sections_read(list(cfg.methods))
    if not p.enabled:
        for key in set_in("privacy", unless=("privacy", "enabled")):
            if key == "overrides":
                why = unused_overrides_problem(cfg)
                if why is not None:
                    found.append(UnusedSetting(key="privacy.overrides", why=why, fix=(
                        "remove [privacy.overrides], or enable [privacy]"), refused=True))
            elif key not in _READ_WITHOUT_PRIVACY:
                add("privacy", key, "the config has [privacy] enabled = false, and a run "
                    "without privacy reads no privacy setting", "remove it, or enable [privacy]")
    else:
        fedora_runs = "fedora" in read
        for key in set_in("privacy"):
            # where FEDORA runs under DP its summary is noised (its check_config)
            if key in _SUMMARY_KEYS and not fedora_runs:
                add("privacy", key, f"no listed method ({', '.join(cfg.methods)}) releases "
                    "FEDORA's relatedness summary", "remove it, or list a method that "
                    "releases it", refused=False)
        for key in set_in("privacy", unless=("data", "validation")):
            if key in _LAMBDA_KEYS and cfg.data.validation == "public":
                add("privacy", key, "with data.validation = \"public\" FEDORA's lambda is "
                    "computed in the clear, without noise",
                    "remove it, or set data.validation = \"private\"")
        if "clip_grad_norm" in set_in("training"):
            add("training", "clip_grad_norm", "DP-SGD clips each sample's gradient to "
                "privacy.max_grad_norm instead", "remove it (a sweep's non-private cells read "
                "it)", refused=False)
    for section in ("fedora", "fedavg"):
        keys = set_in(section)
        if keys and section not in read:
            for key in keys:
                add(section, key, f"no listed method ({', '.join(cfg.methods)}) reads "
                    f"[{section}]", "remove it, or list a method that reads it", refused=False)
        elif section == "fedora" and "propagation_tolerance" in keys \
                and cfg.fedora.propagation not in ("sparse", "auto"):
            add(section, "propagation_tolerance", "it bounds the truncated series of "
                f"fedora.propagation = \"sparse\" only, and fedora.propagation = "
                f"{_shown(cfg.fedora.propagation)} is exact", "remove it, or use propagation "
                "\"sparse\" or \"auto\"")
    if "*" not in read:
        for name, section in w.baselines.items():
            if f"baselines.{name}" not in read:
                keys = ", ".join(section) or "(empty)"
                found.append(UnusedSetting(
                    key=f"baselines.{toml_key(name)}", why=(
                        f"[baselines.{toml_key(name)}] ({keys}) is unused: no listed method "
                        f"({', '.join(cfg.methods)}) reads it"),
                    fix="remove it, or list the method", refused=False))
    return found


def check_settings_used(cfg: ExperimentConfig, resume: bool = False) -> None:
    """ConfigError, before anything is built or written, listing every setting of ``cfg``
    that the run will not read and that :func:`unused_settings` refuses (each with why and
    what to do); a warning for each that it only warns about. A resume, or an audit of a run
    directory (``resume``), only warns: a run started before this check holds them in its
    config.toml, and removing them would change the config its checkpoints are bound to."""
    unused = unused_settings(cfg)
    refused = [u for u in unused if u.refused and not resume]
    for u in unused:
        if u not in refused:
            log.warning("%s", u.why if resume else f"{u.why}; {u.fix}")
    if len(refused) == 1:
        raise ConfigError(f"{refused[0].why}; {refused[0].fix}")
    if refused:
        raise ConfigError(f"{len(refused)} settings of the config are unused by this run:\n"
                          + "\n".join(f"  {u.why}; {u.fix}" for u in refused))


def revalidate(cfg: ExperimentConfig, source: str = "(ExperimentConfig)") -> ExperimentConfig:
    """``cfg`` itself if it validates again; ConfigError naming each bad key otherwise. A
    config derived with ``model_copy(update=...)`` (or ``model_construct``) skipped every
    validator, e.g. ``training.rounds = 0`` or ``fedora.relatedness = "plain"`` under DP. Its
    values themselves are validated (as Python objects: a value that only its JSON form makes
    valid, such as the client index ``0`` where ``privacy.overrides`` keys are the text
    ``"0"``, is refused), and so is the TOML document a run writes of it."""
    try:
        again = ExperimentConfig.model_validate(_document(cfg, "python"))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    changed = _first_difference(cfg, again)
    if changed is not None:
        key, value = changed
        raise ConfigError(f"invalid configuration {source}:\n  {key}: {value!r} was set without "
                          f"validation and is not what validating it gives")
    try:
        config_document(cfg)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    except ValueError as err:  # the document validated to another config
        raise ConfigError(f"invalid configuration {source}: {err}") from None
    return cfg


def load_config(path: str | Path, *, plugins_from_folder: bool = True) -> ExperimentConfig:
    """Read and validate a TOML config file; unreadable or malformed files raise ConfigError.

    Its plug-ins (``data.source``, ``model.factory``, ``training.loss``) are imported from the
    file's folder, then from ``PYTHONPATH``; ``plugins_from_folder=False`` (audits of a run
    directory) skips the folder, so a directory under review cannot supply code to run. A path that is empty, only spaces or
    holds NUL is a ConfigError too."""
    path = check_path(path, "the config path", ConfigError, "file")
    raw = read_regular_file(path, "config", ConfigError)
    return config_from_bytes(raw, str(path), plugins_from_folder=plugins_from_folder)


def load_run_config(path: str | Path) -> tuple[ExperimentConfig, list[tuple[str, str]]]:
    """A run directory's config.toml as the audits read it: no plug-in imported from its
    folder (as :func:`load_config` with ``plugins_from_folder=False``), and a dataset,
    partitioner, model, loss or method name that this process has not registered accepted as
    written instead of refused (the run's own script or notebook registered it; see
    :func:`secure_fedora.core.registry.accepting_unregistered`). Returns the config and the
    ``(kind, name)`` of each such entry, whose own config checks were not run; every other
    check is. :class:`ConfigError` as :func:`load_config`."""
    from secure_fedora.core.registry import accepting_unregistered

    with accepting_unregistered() as unknown:
        cfg = load_config(path, plugins_from_folder=False)
    return cfg, list(unknown)


def unregistered_hint(kind: str, name: str, call: str, imports: str | None = None) -> str:
    """What to do about registry entry ``name`` that this process lacks: where a process
    that did not run the registering script finds it, ``imports`` (the option of an audit
    that imports a module the user trusts first, e.g. ``--import MODULE``; None: it has
    none), or ``call`` (a Python function) to use from the process that registered it."""
    imported = "" if imports is None else (f", or import its module first with {imports} (one "
                                           "you trust, never one inside the run directory)")
    return (f"{kind} {name!r}, which this process has not registered (an entry that a script "
            "or notebook registers is known only to that process: put its module in "
            f"secure_fedora/contrib/, which every process imports{imported}, or call {call} "
            "from the process that registered it)")


def config_from_bytes(raw: bytes, source: str, *, plugins_from_folder: bool = True) -> ExperimentConfig:
    """Validate the bytes of a TOML config file (``source`` names it in errors; its folder is
    where plug-ins are imported from first, unless ``plugins_from_folder`` is False)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config {source} is not valid TOML: {err}") from None
    except ValueError as err:  # an integer of more digits than Python converts
        reason = str(err).partition("; use sys.set_int_max_str_digits")[0]
        raise ConfigError(f"config {source} is not valid TOML: {reason}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"config {source} is not valid TOML: arrays or inline tables nested "
                          "too deeply to parse: write them with fewer levels") from None
    cfg = parse_config(data, source)
    if plugins_from_folder:
        from secure_fedora.core.plugins import remember_config_dir

        remember_config_dir(cfg, Path(source).parent)
    return cfg


# Keys added after configs were first hashed, with the default that reproduces the behaviour
# from before they existed. At that default they are left out of the hash, so checkpoints and
# sweep cells written before the key existed stay valid; any other value changes the hash.
_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("training", "clip_grad_norm"): None,
    ("training", "loss"): "cross_entropy",
    ("data", "source"): None,
    ("model", "factory"): None,
    # Unset keeps every earlier behaviour except validation-selected rounds on private
    # validation data under DP, an unaccounted release that is no longer made.
    ("privacy", "model_selection"): None,
    ("security", "keystore"): None,
    # what a client's error texts tell the server: trains, accounts and resumes the same
    ("security", "client_errors"): "withheld",
    ("training", "device"): "cpu",
    ("training", "threads"): None,
    ("training", "engine"): "loop",
    ("fedora", "propagation_tolerance"): 1e-4,
    ("fedora", "max_pull"): None,
    # no plug-in mechanism configured: plans, accounts and resumes as before the key
    ("privacy", "mechanisms"): {},
}


def config_document(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every value of ``cfg`` as a TOML-ready mapping that validates to the same config (same
    :func:`config_hash`): defaults included, except a default beside the key that excludes it
    (``data.dataset`` beside ``data.source``, ``model.name`` beside ``model.factory``), which
    would make the document invalid, and those two when never set (a set ``data.dataset``
    enables checks of the built-in datasets, e.g. at most 10 classes per client, that the
    Python API's own data does not have). ValueError if the round trip changed the config."""
    doc = _document(cfg, "json")
    again = ExperimentConfig.model_validate(doc)
    if config_hash(again) != config_hash(cfg):
        raise ValueError("the config's document does not validate to the same config")
    return doc


def _document(cfg: ExperimentConfig, mode: Literal["json", "python"]) -> dict[str, Any]:
    """:func:`config_document`'s mapping before its round trip, of JSON values or (``mode``
    "python") of the config's own values, unconverted."""
    doc = cfg.model_dump(mode=mode, exclude_none=True, warnings=mode == "json")
    data, model = cfg.data, cfg.model
    if isinstance(data, DataConfig) and (data.source is not None
                                         or "dataset" not in data.model_fields_set):
        doc["data"].pop("dataset", None)
    if isinstance(model, ModelConfig) and (model.factory is not None
                                           or "name" not in model.model_fields_set):
        doc["model"].pop("name", None)
    return doc


def config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 of the canonical JSON form of the validated config (defaults included, except
    later-added keys at their behaviour-preserving default: see ``_NEUTRAL_DEFAULTS``)."""
    doc = cfg.model_dump(mode="json")
    if not cfg.privacy.enabled:
        # Without DP the noise source is never used: hash such configs as before the key
        # replaced privacy.noise_seed, so their checkpoints and sweep cells stay valid.
        del doc["privacy"]["noise"]
        doc["privacy"]["noise_seed"] = "experiment"
    if not cfg.privacy.enabled and doc["privacy"].get("accountant") == "auto":
        # Without DP no accountant runs: hash the default of earlier versions ("rdp"), so that
        # non-private checkpoints stay valid across the change of default to "auto".
        doc["privacy"]["accountant"] = "rdp"
    # "auto" up to AUTO_DENSE_MAX_CLIENTS clients behaves exactly as "dense" (the default
    # before "auto" existed), so both hash alike. Above, "auto" chooses between the factored
    # and the truncated operator by the graph; it hashes apart from what it meant before (the
    # truncated operator only), so such a checkpoint is not resumed with another operator.
    if doc["fedora"]["propagation"] == "auto":
        dense = cfg.data.num_clients <= AUTO_DENSE_MAX_CLIENTS
        doc["fedora"]["propagation"] = "dense" if dense else "auto (factored, else sparse)"
    for (section, key), neutral in _NEUTRAL_DEFAULTS.items():
        if key in doc.get(section, {}) and doc[section][key] == neutral:
            del doc[section][key]
    doc["training"].pop("checkpoint_every", None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
