"""Experiment configuration: TOML files validated by pydantic.

Unknown keys and bad values are rejected with the offending key named (``ConfigError``).
Every section forbids extra keys so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FedoraConfig",
    "TrainingConfig",
    "config_hash",
    "load_config",
    "parse_config",
]

# ``[fedora] propagation = "auto"`` uses the exact dense operator up to this many clients and
# the sparse operator above (measured: at 1,000 clients the dense product is 8x slower).
AUTO_DENSE_MAX_CLIENTS = 256


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key and the problem."""


MethodName = Literal["fedora", "local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]


class DataConfig(_Section):
    """Which data, how it is split among clients (DESIGN.md 2; reference: rotated MNIST)."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"
    partition: Literal["rotation", "dirichlet", "pathological"] = "rotation"
    num_clients: Annotated[int, Field(ge=2)] = 36
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
        if self.partition == "dirichlet" and self.dirichlet_alpha is None:
            raise ValueError("partition 'dirichlet' needs data.dirichlet_alpha")
        if self.partition == "pathological" and self.classes_per_client is None:
            raise ValueError("partition 'pathological' needs data.classes_per_client")
        if self.partition != "rotation" and self.test_per_client is None:
            raise ValueError(
                f"partition {self.partition!r} needs data.test_per_client (its test rows follow "
                "each client's label mix, so the test split cannot simply be divided)"
            )
        if self.partition != "rotation" and self.groups is not None:
            raise ValueError("data.groups applies only to partition 'rotation'")
        if self.partition != "dirichlet" and self.dirichlet_alpha is not None:
            raise ValueError("data.dirichlet_alpha applies only to partition 'dirichlet'")
        if self.partition != "pathological" and self.classes_per_client is not None:
            raise ValueError("data.classes_per_client applies only to partition 'pathological'")
        return self


class ModelConfig(_Section):
    name: Literal["mlp", "cnn"] = "mlp"


class TrainingConfig(_Section):
    """Local optimisation (reference: SGD, momentum 0.9, lr 5e-3, wd 5e-5, batch 64, E 5)."""

    rounds: PositiveInt = 200
    local_epochs: PositiveInt = 5
    lr: Annotated[float, Field(gt=0)] = 5e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-5
    batch_size: PositiveInt = 64
    participation: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Non-private training only: rescale each mini-batch gradient to at most this L2 norm
    # (a stability knob, not a privacy mechanism; DP-SGD clips per sample with
    # privacy.max_grad_norm instead and ignores this).
    clip_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # Where all state, data and noise live: "cpu", "cuda" (refused when no GPU is visible) or
    # "auto" (cuda when available, else cpu).
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # torch intra-op threads (torch.set_num_threads); unset: torch's default.
    threads: PositiveInt | None = None
    # Write the resumable checkpoint every K rounds, or "auto": after the first round and then
    # whenever the time since the last checkpoint reaches 10x what that checkpoint took (so
    # checkpoints cost at most about 10% of the run). Always after the last round. A crash
    # between checkpoints repeats the rounds since the last one on resume, bit-identically
    # (under DP the repeated rounds are accounted again: over-counted, never under-counted).
    # Not part of the config hash: it does not change results, so a resume may change it.
    checkpoint_every: PositiveInt | Literal["auto"] = "auto"


class FedoraConfig(_Section):
    """Relatedness and propagation (reference: q 1, tau 10, k 2, alpha 0.8)."""

    q: PositiveInt = 1
    tau: Annotated[float, Field(gt=0)] = 10.0
    k: PositiveInt = 2
    alpha: Annotated[float, Field(ge=0, lt=1)] = 0.8
    # The operator P = (1 - alpha)(I - alpha S)^-1 is built once per graph; each round is one
    # product phi = P @ theta. dense: exact solve; sparse: truncated series on the sparse graph
    # with |phi - phi_exact| <= propagation_tolerance * max_j |theta_j| per coordinate; auto:
    # dense up to AUTO_DENSE_MAX_CLIENTS clients, sparse above; power: P by power iteration
    # (the reference); encrypted: clients send CKKS-encrypted theta, the server forms
    # sum_j P_ij Enc(theta_j) with the public context only, and each client decrypts its phi_i.
    propagation: Literal["auto", "dense", "sparse", "power", "encrypted"] = "auto"
    propagation_tolerance: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    # plain: summaries in the clear; noised: Gaussian mechanism on the clipped second moment
    # (needs [privacy]); encrypted: CKKS, the server computes on ciphertexts only;
    # noised+encrypted: both (defense in depth).
    relatedness: Literal["plain", "noised", "encrypted", "noised+encrypted"] = "plain"


class FedAvgConfig(_Section):
    finetune_epochs: Annotated[int, Field(ge=0)] = 5


class ClientBudgetConfig(_Section):
    epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None


class PrivacyConfig(_Section):
    """Differential privacy of everything a client releases (DESIGN.md 3).

    ``epsilon``/``delta`` are every client's budget (``overrides`` per client index). With
    ``noise_multiplier`` unset, DP-SGD's noise is calibrated up front so that the planned
    schedule (rounds x local steps, the summary release and the lambda releases) spends at most
    the client's epsilon. Each client refuses any release that would exceed its budget.
    """

    enabled: bool = False
    epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 8.0
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    sample_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    noise_multiplier: Annotated[float, Field(gt=0)] | None = None
    summary_clip: Annotated[float, Field(gt=0)] = 1.0
    # Noise of the one-off summary release and of the per-round lambda releases: fixed
    # multipliers, or (unset) calibrated so that each spends the given fraction of the
    # client's epsilon on its own; DP-SGD's noise is then calibrated for the whole plan.
    summary_noise_multiplier: Annotated[float, Field(gt=0)] | None = None
    summary_budget_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    lambda_clip: Annotated[float, Field(gt=0)] = 2.0
    lambda_noise_multiplier: Annotated[float, Field(gt=0)] | None = None
    lambda_budget_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # "experiment": noise from generators seeded by the experiment seed (reproducible; the
    # guarantee then holds only against a server that does not know the seed). "os_random":
    # generators seeded from os.urandom at start (not reproducible). Neither is a CSPRNG:
    # Opacus secure_mode needs torchcsprng, which is not available; the report says so.
    noise_seed: Literal["experiment", "os_random"] = "experiment"
    overrides: dict[str, ClientBudgetConfig] = Field(default_factory=dict)


class SecurityConfig(_Section):
    """Message security of the in-process runtime (FEDORA's messages).

    With ``envelopes``, every theta_i a client sends and every phi_i it receives travels in a
    signed envelope (sender, round, nonce, payload hash, Ed25519 signature); the receiver
    rejects unknown senders, bad signatures, replays, stale rounds, wrong shapes and
    non-finite values, logs the rejection and goes on with the other clients.
    """

    envelopes: bool = False


class EvaluationConfig(_Section):
    every: PositiveInt = 1


class ExperimentConfig(_Section):
    """A whole experiment: one data split, one model, several methods compared on it."""

    name: str = "experiment"
    seed: int = 0
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
    # secure_fedora.baselines.BASELINE_HYPERPARAMETERS).
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods lists a method twice")
        from secure_fedora.baselines import BaselineConfigError, validate_hyperparameters

        for name, section in self.baselines.items():
            try:
                validate_hyperparameters(name, section)
            except BaselineConfigError as err:
                raise ValueError(f"baselines.{name}: {err}") from None
        p, d = self.privacy, self.data
        if not p.enabled:
            if "noised" in self.fedora.relatedness:
                raise ValueError("fedora.relatedness 'noised' needs privacy.enabled = true")
            if d.validation == "private":
                raise ValueError("data.validation 'private' needs privacy.enabled = true")
            return self
        if "fedora" in self.methods and "noised" not in self.fedora.relatedness:
            raise ValueError(
                f"fedora.relatedness {self.fedora.relatedness!r} releases summary information "
                "without an accounted mechanism; with privacy.enabled use 'noised' or "
                "'noised+encrypted'"
            )
        for key, budget in p.overrides.items():
            if not key.isdigit() or int(key) >= d.num_clients:
                raise ValueError(f"privacy.overrides.{key}: not a client index in [0, {d.num_clients})")
            delta = budget.delta if budget.delta is not None else p.delta
            if delta >= 1.0 / d.train_per_client:
                raise ValueError(f"privacy.overrides.{key}.delta must be < 1/n = {1 / d.train_per_client:g}")
        if p.delta >= 1.0 / d.train_per_client:
            raise ValueError(
                f"privacy.delta must be < 1/n = {1 / d.train_per_client:g} "
                f"(n = data.train_per_client = {d.train_per_client})"
            )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return f"invalid configuration {source}:\n" + "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "(dict)") -> ExperimentConfig:
    """Validate a parsed TOML mapping; raises :class:`ConfigError` naming each bad key."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML config file; unreadable or malformed files raise ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config {path} is not valid TOML: {err}") from None
    return parse_config(data, str(path))


# Keys added after configs were first hashed, with the default that reproduces the behaviour
# from before they existed. At that default they are left out of the hash, so checkpoints and
# sweep cells written before the key existed stay valid; any other value changes the hash.
_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("training", "clip_grad_norm"): None,
    ("training", "device"): "cpu",
    ("training", "threads"): None,
    ("fedora", "propagation_tolerance"): 1e-4,
}


def config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 of the canonical JSON form of the validated config (defaults included, except
    later-added keys at their behaviour-preserving default: see ``_NEUTRAL_DEFAULTS``)."""
    doc = cfg.model_dump(mode="json")
    # "auto" that resolves to the exact dense operator behaves exactly as "dense" (the
    # default before "auto" existed), so both hash alike.
    if doc["fedora"]["propagation"] == "auto" and cfg.data.num_clients <= AUTO_DENSE_MAX_CLIENTS:
        doc["fedora"]["propagation"] = "dense"
    for (section, key), neutral in _NEUTRAL_DEFAULTS.items():
        if key in doc.get(section, {}) and doc[section][key] == neutral:
            del doc[section][key]
    doc["training"].pop("checkpoint_every", None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
