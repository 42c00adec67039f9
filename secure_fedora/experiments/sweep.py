"""``secure-fedora sweep``: methods x epsilon x seeds, resumable, with tables and plots.

Every cell (one method, one epsilon, one seed) is an ordinary in-process
:class:`~secure_fedora.runtimes.inprocess.Simulation` run in its own directory
``OUT/cells/<method>/eps-<epsilon>/seed-<seed>/``. A cell is finished when its ``cell.json``
exists; that file is written atomically after the run, so a rerun of the same sweep skips
finished cells and resumes an interrupted one from its per-round checkpoint. A cell directory
written for another configuration, or a finished cell run on other data (its recorded data
fingerprint is not that of the data now), is refused, never silently reused or rerun.

Outputs in ``OUT``: ``sweep.csv`` and ``sweep.md`` (one row per method and epsilon: mean, min
and sample std over seeds of the client-mean accuracy, the mean over seeds of the worst
client's accuracy, and the mean over seeds of the number of clients below Local), and
``plots/accuracy_vs_epsilon.png`` and ``plots/per_client_eps-<epsilon>.png``.

Epsilon: ``None`` means non-private (``privacy.enabled = false``); a number sets
``privacy.enabled = true`` and ``privacy.epsilon`` for the cell. No fake epsilons: before any
training, a numeric epsilon is refused unless the runtime's context for that cell has a
private (non-plain) gradient oracle, and after each cell its results must report
differential privacy exactly when the cell's epsilon is a number.
Local is run at ``None`` only: a client that stays out of the federation releases nothing,
so it needs no noise, and it is the reference every "worse than Local" count uses. The same
threat model applies inside the baselines: Ditto's and APFL's personal models never leave the
client and train without noise; only what is sent is DP. Assumption: personalized models are
used inside their client, not published (publishing one would be a further release).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from privacy.accounting import format_exact, format_spent
from privacy.errors import ToolkitError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pydantic import BaseModel, ValidationError  # noqa: E402

from secure_fedora.algorithms.baselines import BaselineConfigError, unwrap_oracle  # noqa: E402
from secure_fedora.algorithms.contract import (  # noqa: E402
    check_data_facts,
    check_model_sizes,
    data_checked,
    method_class,
)
from secure_fedora.algorithms.methods import FederatedMethod, MethodContext  # noqa: E402
from secure_fedora.core.config import (  # noqa: E402
    ExperimentConfig,
    UnusedSetting,
    check_path_argument,
    config_document,
    config_hash,
    model_selection,
    unused_overrides_problem,
    unused_settings,
)
from secure_fedora.core.files import strict_json  # noqa: E402
from secure_fedora.core.plugins import derived_config, one_run  # noqa: E402
from secure_fedora.data.partition import ClientData  # noqa: E402
from secure_fedora.data.sources import fingerprint_clients, legacy_fingerprint_clients  # noqa: E402
from secure_fedora.experiments.sweep_cli import (  # noqa: E402,F401  (the command line's home)
    NON_PRIVATE_WORDS,
    _literal_methods,
    cmd_sweep,
    main,
    parse_epsilon,
    register,
)
from secure_fedora.learning.client import PlainGradient  # noqa: E402
from secure_fedora.runtimes.inprocess import (  # noqa: E402
    CheckpointError,
    Simulation,
    atomic_write_text,
    build_clients,
    build_context,
    data_facts,
    make_method,
)
from secure_fedora.runtimes.results import metric_label, stated_beyond_run  # noqa: E402
from secure_fedora.secure.keystore import CONFIG_KEYSTORE_OPTION  # noqa: E402

__all__ = [
    "Cell",
    "SweepError",
    "SweepResult",
    "SweepRow",
    "aggregate",
    "baseline_section",
    "cell_config",
    "check_sweep",
    "method_factory",
    "parse_epsilon",
    "plan_cells",
    "register",
    "run_sweep",
]


log = logging.getLogger(__name__)

CELL_FILE = "cell.json"
MANIFEST_FILE = "sweep.json"


class SweepError(ToolkitError, ValueError):
    """A sweep that cannot run or continue; the message names the cell, method or value."""


# --------------------------------------------------------------------------- methods


def baseline_section(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """The hyper-parameters of baseline ``name`` in ``cfg`` (``cfg.baselines.<name>``), or
    ``{}`` (all defaults) when the config has no such section."""
    section = getattr(cfg, "baselines", None)
    if section is None:
        return {}
    sub = section.get(name) if isinstance(section, Mapping) else getattr(section, name, None)
    if sub is None:
        return {}
    return sub.model_dump() if isinstance(sub, BaseModel) else dict(sub)


def method_factory(name: str, ctx: MethodContext, cfg: ExperimentConfig) -> FederatedMethod:
    """A cell's method, built from the registry (the runtime's ``make_method``)."""
    return make_method(name, ctx, cfg)


def sends_nothing(name: str) -> bool:
    """Whether registered method ``name`` keeps everything on its clients (its class says
    ``sends_messages = False``, as Local does): such a method is run non-private only and is
    the reference of the "worse than" counts."""
    return getattr(method_class(name), "sends_messages", True) is False


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One sweep cell: a method at one epsilon (``None``: non-private) and one seed."""

    method: str
    epsilon: float | None
    seed: int

    @property
    def epsilon_label(self) -> str:
        """``"none"`` or the epsilon's shortest decimal form (used in paths and tables)."""
        return epsilon_label(self.epsilon)

    @property
    def key(self) -> str:
        """``<method>/eps-<epsilon>/seed-<seed>``: the cell's name and its directory below
        ``OUT/cells``."""
        return f"{self.method}/eps-{self.epsilon_label}/seed-{self.seed}"


def epsilon_label(epsilon: float | None) -> str:
    """``"none"`` for non-private, else a decimal form that reads back as exactly ``epsilon``:
    the short ``g`` form where it does (``"0.5"``, ``"8"``), else Python's shortest round-trip
    form (``"1.0000001"``), so two epsilons never share a label (or a cell directory)."""
    return "none" if epsilon is None else format_exact(epsilon)




def _as_list(values: Any, name: str, example: str | None = None) -> list[Any]:
    """``values`` as a list; SweepError for a single value in its place (a string was taken
    letter by letter, a number raised a raw TypeError). None is an empty list."""
    if values is None:
        return []
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        example = example or repr([values])
        raise SweepError(f"{name} must be a list, got {type(values).__name__} {values!r} (one "
                         f"value is a list of one: {name}={example})")
    return list(values)


def plan_cells(methods: Sequence[str], epsilons: Sequence[float | None], seeds: Sequence[int]) -> list[Cell]:
    """The cells of a sweep, in run order (seed-major, so each seed's data is built once).

    Raises :class:`SweepError` for a single value in place of a list, an unknown or repeated
    method, a repeated seed or one outside ``0 .. 2**32 - 1``, a repeated or non-positive
    epsilon. A method that sends nothing (Local) gets only the
    ``None`` cell (see the module docstring).
    """
    methods = _as_list(methods, "methods")
    seeds = _as_list(seeds, "seeds")
    epsilons = _as_list(epsilons, "epsilons",
                        None if isinstance(epsilons, int | float) else "[1.0] or [None]")
    if not methods:
        raise SweepError("a sweep needs at least one method")
    known = _literal_methods()
    for m in methods:
        if m not in known:
            raise SweepError(f"unknown method {m!r}; expected some of {list(known)}")
    if len(set(methods)) != len(methods):
        raise SweepError(f"methods lists a method twice: {list(methods)}")
    if not seeds:
        raise SweepError("a sweep needs at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
            # the config's seed range: a larger one failed every cell's validation, and the
            # message blamed the first cell's method
            raise SweepError(f"seeds must be non-negative integers below 2**32, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"seeds lists a seed twice: {list(seeds)}")
    if not epsilons:
        raise SweepError("a sweep needs at least one epsilon ('none' for non-private)")
    for e in epsilons:
        if e is None:
            continue
        if isinstance(e, bool) or not isinstance(e, int | float) or not (math.isfinite(e) and e > 0):
            raise SweepError(f"epsilon must be None or a positive finite number, got {e!r}")
    if len(set(epsilons)) != len(epsilons):
        if list(epsilons).count(None) > 1:  # on the command line: 'none' beside 'inf', say
            raise SweepError(
                f"epsilons lists the non-private cell twice ({list(epsilons)}): "
                f"{', '.join(NON_PRIVATE_WORDS)} all mean non-private (an infinite budget, "
                "one cell); list one of them")
        twice = sorted({e for e in epsilons if list(epsilons).count(e) > 1})
        raise SweepError(f"epsilons lists {', '.join(epsilon_label(e) for e in twice)} twice "
                         f"({list(epsilons)}): each epsilon is one cell; list it once")
    standalone = [m for m in methods if sends_nothing(m)]
    cells = []
    for seed in seeds:
        for eps in epsilons:
            for m in methods:
                if m in standalone and eps is not None:
                    continue
                cells.append(Cell(m, eps, seed))
        if None not in epsilons:
            cells.extend(Cell(m, None, seed) for m in standalone)
    return cells


_NOISE_OFF = {"noised": "plain", "noised+encrypted": "encrypted"}
_NOISE_ON = {"plain": "noised", "encrypted": "noised+encrypted"}


def cell_config(cfg: ExperimentConfig, cell: Cell) -> ExperimentConfig:
    """``cfg`` with one method, the cell's seed and its epsilon, re-validated.

    The epsilon dimension switches every DP mechanism of the config on or off together:

    - ``None``: ``privacy.enabled = false``; relatedness ``noised`` becomes ``plain`` and
      ``noised+encrypted`` becomes ``encrypted``; ``data.validation = "private"`` becomes
      ``"public"`` (nothing is noised in a non-private run).
    - a number: ``privacy.enabled = true`` and ``privacy.epsilon`` (every client's budget;
      DP-SGD noise is calibrated to it); relatedness ``plain`` becomes ``noised`` and
      ``encrypted`` becomes ``noised+encrypted``; ``data.validation`` is kept as configured.

    Refused with :class:`SweepError`: a numeric epsilon when the config has per-client
    ``privacy.overrides`` or a fixed ``privacy.noise_multiplier`` (either would make the
    column's epsilon not the one applied), and a cell whose config fails validation.
    """
    update: dict[str, Any] = {"methods": [cell.method], "seed": cell.seed}
    p, rel, val = cfg.privacy, cfg.fedora.relatedness, cfg.data.validation
    if cell.epsilon is None:
        # privacy.epsilon is unused without DP: the default, so that a non-private cell's
        # config (and config_hash) does not follow the config's [privacy] epsilon, as the
        # manifest's _base_hash does not (cells of earlier versions: _legacy_hashes)
        update["privacy"] = p.model_copy(update={"enabled": False, "epsilon": type(p)().epsilon})
        rel = _NOISE_OFF.get(rel, rel)
        val = "public" if val == "private" else val
    else:
        if p.overrides:
            raise SweepError(
                f"cell {cell.key}: privacy.overrides sets per-client budgets, so the sweep's "
                "epsilon would not be every client's; remove the overrides to sweep epsilon"
            )
        if p.noise_multiplier is not None:
            raise SweepError(
                f"cell {cell.key}: privacy.noise_multiplier is fixed, so the noise would not "
                "follow epsilon; unset it to sweep epsilon"
            )
        update["privacy"] = p.model_copy(update={"enabled": True, "epsilon": float(cell.epsilon)})
        rel = _NOISE_ON.get(rel, rel)
    update["fedora"] = cfg.fedora.model_copy(update={"relatedness": rel})
    update["data"] = cfg.data.model_copy(update={"validation": val})
    new = derived_config(cfg, cfg.model_copy(update=update))
    try:
        # what was set, not the defaults: a default next to its alternative (data.dataset
        # beside data.source, model.name beside model.factory) would read as both being set
        ExperimentConfig.model_validate(new.model_dump(exclude_unset=True))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        # the config's "methods" does not choose a sweep's methods: its --methods does
        raise SweepError(f"cell {cell.key}: {problems} (a sweep runs the methods of its "
                         f"--methods, by default every registered one, whatever the config's "
                         f"methods lists: to skip {cell.method!r}, pass --methods without "
                         f"it)") from None
    return new


def _legacy_hashes(cfg: ExperimentConfig, cell: Cell, ccfg: ExperimentConfig,
                   epsilons: Iterable[float]) -> dict[str, ExperimentConfig]:
    """The config hashes (and configs) a non-private cell had before its ``privacy.epsilon``
    was normalised: earlier versions kept the config's ``[privacy] epsilon`` (unused without
    DP) in the cell's config, so a finished or interrupted non-private cell of such a sweep
    is bound to the hash with that epsilon. ``epsilons``: the candidates (the config's and the
    manifest's). Empty for a DP cell (its epsilon is the cell's, unchanged)."""
    if cell.epsilon is not None:
        return {}
    out: dict[str, ExperimentConfig] = {}
    for eps in dict.fromkeys(epsilons):
        legacy = derived_config(cfg, ccfg.model_copy(
            update={"privacy": ccfg.privacy.model_copy(update={"epsilon": eps})}))
        out.setdefault(config_hash(legacy), legacy)
    out.pop(config_hash(ccfg), None)
    return out


def _data_setup(cfg: ExperimentConfig) -> str:
    """The data part of sweep.md's setup line, naming a user's ``data.source`` as such."""
    d = cfg.data
    sizes = f"{d.num_clients} clients x {d.train_per_client} train / {d.val_per_client} val"
    if d.source is None:
        return f"{d.dataset}, {d.partition} partition, {sizes}"
    return (f"data.source {d.source} (centralized data: {d.partition} partition; per-client "
            f"data: its own split), {sizes} (config)")


def privacy_settings(cfg: ExperimentConfig) -> str:
    """One line naming the privacy-relevant settings a cell config runs with."""
    p = cfg.privacy
    head = (f"privacy on, epsilon {format_exact(p.epsilon)}, delta {format_exact(p.delta)}"
            if p.enabled else "privacy off")
    if p.enabled and p.noise == "reproducible":
        head += (" (noise reproducible: NOT private against anyone who knows the config, its "
                 "noise can be replayed)")
    selection = ("best mean validation round" if model_selection(cfg) == "validation"
                 else "final round")
    return (f"{head}; relatedness {cfg.fedora.relatedness}; validation {cfg.data.validation}; "
            f"reported round: {selection}")


def _base_hash(cfg: ExperimentConfig) -> str:
    """Hash of everything a sweep does not override (methods, seed and epsilon are per cell)."""
    # "fedora" is only the fixed stand-in of the per-cell methods list (earlier sweeps' hashes)
    update: dict[str, Any] = {"methods": ["fedora"], "seed": 0}
    update["privacy"] = cfg.privacy.model_copy(
        update={"enabled": False, "epsilon": type(cfg.privacy)().epsilon})
    return config_hash(cfg.model_copy(update=update))


def _is_private_oracle(ctx: MethodContext) -> bool:
    return not isinstance(unwrap_oracle(ctx.oracle), PlainGradient)


def _check_privacy(cell: Cell, ctx: MethodContext | None, results: dict[str, Any] | None) -> None:
    """Refuse a cell whose privacy is not what its epsilon column says (no fake epsilons)."""
    if ctx is not None and cell.epsilon is not None and not _is_private_oracle(ctx):
        raise SweepError(
            f"cell {cell.key}: the runtime's gradient oracle for privacy.enabled = true is the "
            "plain (non-private) one, so epsilon would not be applied; numeric epsilons need "
            "the DP runtime"
        )
    if results is not None:
        dp = results.get("assumptions", {}).get("differential_privacy")
        if cell.epsilon is not None and not dp:
            raise SweepError(f"cell {cell.key}: the run reports no differential privacy")
        if cell.epsilon is None and dp:
            raise SweepError(f"cell {cell.key}: epsilon none, but the run reports differential privacy")


# --------------------------------------------------------------------------- running


CellCallback = Callable[[Cell, int, int, bool], None]
"""``on_cell(cell, index, total, skipped)``: called before each cell runs (or is skipped)."""
RoundCallback = Callable[[Cell, int, int], None]
"""``on_round(cell, round, rounds)``: called after every round of a running cell."""
Factory = Callable[[str, MethodContext, ExperimentConfig], FederatedMethod]
ContextFactory = Callable[[ExperimentConfig, Sequence[ClientData]], MethodContext]


@dataclass
class SweepRow:
    """One row of the sweep table: a method (or ``fedavg_ft``) at one epsilon.

    A per-client figure a cell's results hold as ``null`` (a NaN or infinite figure, see
    results.json ``non_finite_values``) is ``None`` in ``per_client``; it is never read as a
    number: the seed's client mean and minimum are ``None``, and so is every statistic over
    seeds that would include them (``null_figures`` names each such figure)."""

    method: str
    epsilon: float | None
    seeds: list[int]
    client_means: list[float | None]
    client_mins: list[float | None]
    worse_than_local: list[int] | None
    per_client: list[list[float | None]] = field(default_factory=list)
    epsilon_spent: list[float | None] = field(default_factory=list)

    @property
    def null_figures(self) -> list[tuple[int, int]]:
        """``(seed, client index)`` of every per-client figure that is ``None``."""
        return [(seed, i) for seed, run in zip(self.seeds, self.per_client, strict=False)
                for i, a in enumerate(run) if a is None]

    def _defined_means(self) -> list[float] | None:
        return None if any(m is None for m in self.client_means) else \
            [float(m) for m in self.client_means if m is not None]

    @property
    def acc_mean(self) -> float | None:
        """Mean over seeds of the client-mean accuracy (``None``: some figure is null)."""
        means = self._defined_means()
        return None if means is None else statistics.fmean(means)

    @property
    def acc_min(self) -> float | None:
        """Lowest client-mean accuracy over seeds (``None``: some figure is null)."""
        means = self._defined_means()
        return None if means is None else min(means)

    @property
    def acc_std(self) -> float | None:
        """Sample standard deviation over seeds (``None`` with a single seed or a null figure)."""
        means = self._defined_means()
        return statistics.stdev(means) if means is not None and len(means) > 1 else None

    @property
    def client_min_mean(self) -> float | None:
        """Mean over seeds of the worst client's accuracy (``None``: some figure is null)."""
        if any(m is None for m in self.client_mins):
            return None
        return statistics.fmean([float(m) for m in self.client_mins if m is not None])

    @property
    def epsilon_spent_max(self) -> float | None:
        """The largest epsilon any client spent, over all seeds (``None``: not reported)."""
        spent = [e for e in self.epsilon_spent if e is not None]
        return max(spent) if spent and len(spent) == len(self.epsilon_spent) else None

    @property
    def worse_than_local_mean(self) -> float | None:
        """Mean over seeds of the number of clients below their Local accuracy (``None``: no
        Local reference for some seed)."""
        return None if self.worse_than_local is None else statistics.fmean(self.worse_than_local)


@dataclass
class SweepResult:
    """What a sweep produced: its rows, the cells run and skipped, and the files written."""

    rows: list[SweepRow]
    ran: list[str]
    skipped: list[str]
    files: list[Path]


def _cell_entries(results: dict[str, Any], method: str) -> dict[str, list[float | None]]:
    """The cell method's per-client accuracies, then those of every row its results derive
    from it (e.g. ``fedavg_ft``): a cell runs one method, so every entry is its own."""
    out = {method: results["methods"][method]["selected"]["per_client"]}
    for name, body in results["methods"].items():
        if name != method:
            out[name] = body["selected"]["per_client"]
    return out


def _figure(value: Any) -> float | None:
    """A per-client figure as aggregation reads it: a finite number, or None for null and
    for a NaN or infinity (what strict JSON writes as null)."""
    if value is None:
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond float range
        return None
    return number if math.isfinite(number) else None


def _entries_problem(entries: dict[str, Any], method: str) -> str | None:
    """Why a cell file's ``entries`` are not per-client figures of ``method`` (and of the
    rows derived from it): each a non-empty list of numbers or nulls; None when they are."""
    if method not in entries:
        return f"no entry for its method {method!r}"
    for name, figures in entries.items():
        if not isinstance(figures, list) or not figures or not all(
                a is None or (isinstance(a, int | float) and not isinstance(a, bool))
                for a in figures):
            return f"entries.{name} is not a list of per-client figures"
    return None


def _read_cell(path: Path, cell: Cell, expected_hashes: Iterable[str],
               fingerprint: Callable[[], str],
               legacy_fingerprint: Callable[[], str] | None = None) -> dict[str, Any]:
    """A finished cell's ``cell.json``, refused (SweepError) when unreadable, written for
    another configuration (its config hash is none of ``expected_hashes``) or on other data
    (its data fingerprint is not ``fingerprint()``, the fingerprint of the data the cell would
    be run on now, computed as the run computes it; nor ``legacy_fingerprint()``, that data's
    fingerprint as cells written before per-client digests were combined recorded it). A cell
    on other data is not run again: it
    was trained (and, with DP, spent its budget) on the data it records."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"cell {cell.key}: {path} is unreadable ({err}); delete it to rerun the cell") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict) \
            or not isinstance(doc.get("results"), dict):
        raise SweepError(f"cell {cell.key}: {path} does not hold a sweep cell result")
    problem = _entries_problem(doc["entries"], cell.method)
    if problem is not None:
        raise SweepError(f"cell {cell.key}: {path} does not hold a sweep cell result ({problem});"
                         " delete it to rerun the cell")
    doc["entries"] = {name: [_figure(a) for a in figures]
                      for name, figures in doc["entries"].items()}
    if doc.get("config_hash") not in set(expected_hashes):
        raise SweepError(
            f"cell {cell.key} in {path.parent} was run with another configuration; "
            "use a new sweep directory (--out, or run_sweep's out)"
        )
    current = fingerprint()
    recorded = doc.get("data_fingerprint")
    if recorded != current and (legacy_fingerprint is None or recorded != legacy_fingerprint()):
        raise SweepError(
            f"cell {cell.key} in {path.parent} was run on other data (data fingerprint "
            f"{recorded!s:.12} != {current:.12} of the data now): the data changed since the "
            "cell ran (e.g. a data.source whose contents changed); its results would be mixed "
            "with cells on the new data, and it is not rerun over its records (ledgers, spent "
            "budgets). Restore the data it ran on, or use a new sweep directory (--out, or run_sweep's out)"
        )
    return doc


def _manifest_epsilon(out: Path) -> float | None:
    """``privacy.epsilon`` of the config recorded in ``out``'s manifest (``None``: no
    readable manifest or value); the manifest's hash ignores it (see :func:`_base_hash`)."""
    try:
        value = json.loads((out / MANIFEST_FILE).read_text())["config"]["privacy"]["epsilon"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _resume_config(out: Path, cell: Cell, ccfg: ExperimentConfig,
                   legacy: Mapping[str, ExperimentConfig]) -> ExperimentConfig:
    """The config to continue an interrupted cell with: ``ccfg``, or the earlier version's
    config of the cell (``legacy``, see :func:`_legacy_hashes`) when the cell's checkpoint was
    written for it (same behaviour: only the unused ``privacy.epsilon`` differs)."""
    path = _cell_dir(out, cell) / "checkpoints" / f"{cell.method}.pt"
    if not legacy or not path.exists():
        return ccfg
    from secure_fedora.runtimes.inprocess import load_checkpoint

    try:
        written = load_checkpoint(path).get("config_hash")
    except CheckpointError:
        return ccfg  # the run refuses it, naming the problem
    return legacy.get(written, ccfg) if isinstance(written, str) else ccfg


def _check_manifest(out: Path, cfg: ExperimentConfig, write: bool) -> None:
    """Refuse ``out`` if it holds a sweep of another configuration or anything that is not a
    sweep; with ``write``, record this configuration when ``out`` holds none yet."""
    path = out / MANIFEST_FILE
    base = _base_hash(cfg)
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SweepError(f"{path} is unreadable ({err})") from None
        if doc.get("base_config_hash") != base:
            raise SweepError(
                f"{out} holds a sweep of another configuration ({doc.get('name')!r}); "
                "use a new sweep directory (--out, or run_sweep's out)"
            )
        return
    if out.exists() and not out.is_dir():
        raise SweepError(f"{out} is a file, not a sweep directory; use a new sweep directory "
                         "(--out, or run_sweep's out)")
    if out.exists() and any(out.iterdir()):
        raise SweepError(
            f"{out} is not a sweep directory (it holds files but no {MANIFEST_FILE}); "
            "use a new sweep directory (--out, or run_sweep's out)"
        )
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, strict_json({
        "name": cfg.name, "base_config_hash": base, "config": cfg.model_dump(mode="json"),
    }))


def _cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.method / f"eps-{cell.epsilon_label}" / f"seed-{cell.seed}"


def _preflight(
    out: Path,
    pending: Sequence[Cell],
    configs: Mapping[Cell, ExperimentConfig],
    clients_for: Callable[[Cell], list[ClientData]],
    factory: Factory,
    context_factory: ContextFactory,
) -> None:
    """Before any training, the refusals each pending cell's run makes when it starts, as
    SweepError naming the cell: every pending DP cell's privacy budget plan (a plan over
    budget), its config copy and its key store (:func:`_check_private_setup`); every
    pending cell's fit to its data (:func:`check_data_facts`); then every pending (method,
    epsilon) built once on the first pending seed's data: its fit to the model
    (:func:`check_model_sizes`), the method itself, and a private oracle for a numeric
    epsilon. Nothing is written."""
    for cell in pending:
        if configs[cell].privacy.enabled:
            _check_budget_plans(cell, configs[cell], len(clients_for(cell)))
            _check_private_setup(cell, configs[cell], _cell_dir(out, cell))
        try:
            check_data_facts(data_checked([cell.method]), configs[cell],
                             data_facts(clients_for(cell)))
        except ToolkitError as err:
            raise SweepError(f"cell {cell.key}: {err}") from None
    seen: set[tuple[str, float | None]] = set()
    for cell in pending:
        if (cell.method, cell.epsilon) in seen:
            continue
        seen.add((cell.method, cell.epsilon))
        ctx = context_factory(configs[cell], clients_for(cell))
        _check_privacy(cell, ctx, None)
        try:
            check_model_sizes([cell.method], configs[cell], ctx.flat.num_params, ctx.init.dtype)
        except ToolkitError as err:
            raise SweepError(f"cell {cell.key}: {err}") from None
        try:
            factory(cell.method, ctx, configs[cell])
        except (BaselineConfigError, ValueError) as err:
            raise SweepError(f"cell {cell.key}: {err}") from None


def _check_private_setup(cell: Cell, ccfg: ExperimentConfig, run_dir: Path) -> None:
    """What a DP cell's run refuses when it starts, after its budget plan, checked without
    writing: its config must round-trip to the ``config.toml`` its run writes
    (:func:`config_document`), and its key store (``[security] keystore``, else the default
    one of the config's name) must be usable from ``run_dir``
    (:func:`~secure_fedora.secure.keystore.check_keystore`: not inside the cell's directory,
    a directory of this user that group and others cannot write, a readable allowlist).
    SweepError naming the cell."""
    from privacy.identity import IdentityError
    from secure_fedora.secure.keystore import check_keystore, resolve_keystore

    try:
        config_document(ccfg)
        path, source = resolve_keystore(ccfg.name, ccfg.security.keystore)
        check_keystore(path, source, run_dir)
    except (IdentityError, ValueError) as err:
        raise SweepError(f"cell {cell.key}: {err}; nothing was run") from None


def _check_budget_plans(cell: Cell, ccfg: ExperimentConfig, num_clients: int) -> None:
    """The check :meth:`Simulation.budget_plans` makes when the cell starts, made before any
    cell of the sweep trains (SweepError naming the cell for a plan over budget)."""
    from secure_fedora.secure.private import BudgetPlanError, check_budget_plans

    try:
        check_budget_plans(ccfg, cell.method, num_clients)
    except BudgetPlanError as err:
        raise SweepError(f"cell {cell.key}: {err}") from None


def check_sweep(cfg: ExperimentConfig, out: str | Path, methods: Sequence[str],
                seeds: Sequence[int], epsilons: Sequence[float | None] = (None,),
                ) -> tuple[Path, list[Cell], dict[Cell, ExperimentConfig]]:
    """The checks of a sweep's own arguments, which build, train and write nothing: ``out``
    (not empty, no NUL; not a directory of another configuration's sweep), the plan
    (:func:`plan_cells`) and every cell's config (:func:`cell_config`; a new sweep whose
    epsilon-none cells would leave ``privacy.overrides`` unused is refused, as ``run`` refuses
    them, a started one warns in :func:`run_sweep`). Returns ``out`` as a
    Path, the cells and their configs; raises :class:`SweepError` (or ConfigError for
    ``out``) otherwise. :func:`run_sweep` starts with it; the CLI calls it before it draws
    anything."""
    out = check_path_argument(out, "out")  # not empty (the current directory), no NUL
    cells = plan_cells(methods, epsilons, seeds)
    configs = {cell: cell_config(cfg, cell) for cell in cells}  # every cell validated up front
    _check_manifest(out, cfg, write=False)
    unused = _unused_overrides(cells, configs)
    if unused is not None and not _resumed(out):  # a resumed sweep warns (run_sweep)
        raise SweepError(f"{unused}; remove [privacy.overrides] from the config: a sweep "
                         "cannot use them (a numeric epsilon refuses per-client budgets)")
    refused = [u for u in _unused_by_every_cell(cfg, cells, configs) if u.refused]
    if refused and not _resumed(out):  # a resumed sweep warns (run_sweep)
        raise SweepError("in every cell of this sweep, " + "; ".join(
            f"{u.why}; {u.fix}" for u in refused))
    return out, cells, configs


def _unused_by_every_cell(cfg: ExperimentConfig, cells: Sequence[Cell],
                          configs: Mapping[Cell, ExperimentConfig]) -> list[UnusedSetting]:
    """The settings of ``cfg`` that no cell reads (:func:`unused_settings` of each cell's
    config, with what ``cfg`` sets as written): a key one cell reads (a section of one cell's
    method, the summary's noise in a DP cell) is used. ``privacy.*`` of a cell without privacy
    is not counted unused: the epsilon column, not the config, turns privacy off there, and
    ``privacy.overrides`` have their own check (:func:`_unused_overrides`)."""
    common: dict[str, UnusedSetting] | None = None
    for cell in cells:
        ccfg = configs[cell]
        found = {u.key: u for u in unused_settings(ccfg, written=cfg)
                 if not (u.key.startswith("privacy.") and not ccfg.privacy.enabled)}
        common = found if common is None else {k: u for k, u in common.items() if k in found}
    return list((common or {}).values())


def _resumed(out: Path) -> bool:
    """Whether ``out`` holds a sweep that has started (its manifest is written before its
    first cell, once every check passed)."""
    return (out / MANIFEST_FILE).exists()


def _unused_overrides(cells: Sequence[Cell], configs: Mapping[Cell, ExperimentConfig]) -> str | None:
    """The cells whose config sets ``privacy.overrides`` with privacy off (epsilon none), as
    ``cell <key>[ and N more]: <why>`` (:func:`unused_overrides_problem`); None when none does."""
    disabled = "the cell runs with [privacy] enabled = false (epsilon none)"
    found = [(cell, why) for cell in cells
             if (why := unused_overrides_problem(configs[cell], disabled)) is not None]
    if not found:
        return None
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return f"cell {found[0][0].key}{more}: {found[0][1]}"


@one_run()  # every cell runs the plug-in code the sweep started with
def run_sweep(
    cfg: ExperimentConfig,
    out: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    epsilons: Sequence[float | None] = (None,),
    on_cell: CellCallback | None = None,
    on_round: RoundCallback | None = None,
    factory: Factory = method_factory,
    context_factory: ContextFactory = build_context,
) -> SweepResult:
    """Run (or continue) a sweep into ``out``; write ``sweep.csv``, ``sweep.md`` and plots.

    Finished cells are skipped; an interrupted cell resumes from its last checkpoint, giving
    the same numbers as an uninterrupted run. Before any training or write, every cell's
    config is validated and every pending cell gets the checks its run makes when it starts
    (:func:`_preflight`: data and model fit; for a DP cell its budget plan, config copy and
    key store), and every pending (method, epsilon) is constructed once. Raises
    :class:`SweepError` for a bad plan or cell config, a privacy plan over budget, a cell its
    data, model or key store refuses, a method that cannot be built, a numeric epsilon the
    runtime does not apply, a directory or cell written for another configuration, or a
    finished cell run on other data.
    """
    out, cells, configs = check_sweep(cfg, out, methods, seeds, epsilons)
    unused = _unused_overrides(cells, configs)
    if unused is not None:  # check_sweep refused them unless the sweep had started
        # a warning, as `run --resume` gives: removing them would make the directory's
        # manifest (and its cells) another configuration's
        log.warning("%s; this sweep started with them, so it continues", unused)
    resumed = _resumed(out)
    for setting in _unused_by_every_cell(cfg, cells, configs):
        if resumed or not setting.refused:  # check_sweep refused the others
            log.warning("in every cell of this sweep, %s; %s", setting.why, setting.fix)
    if cfg.security.keystore is not None and not any(c.privacy.enabled for c in configs.values()):
        # not an error: the same base config's DP cells use it
        log.warning("[security] keystore = %s is unused: this sweep runs no DP cell (only "
                    "epsilon none), and a run without privacy reads no key store; a sweep's "
                    "DP cells (a numeric epsilon) use it", json.dumps(cfg.security.keystore))
    data: dict[tuple[int, bool], list[ClientData]] = {}

    def clients_for(cell: Cell) -> list[ClientData]:
        # built once per seed and privacy setting: the same rows, but the checks a private
        # run makes on a data.source's own clients (their sizes) run for the private cells
        key = (cell.seed, configs[cell].privacy.enabled)
        if key not in data:
            data[key] = build_clients(configs[cell])
        return data[key]

    fingerprints: dict[tuple[int, bool], str] = {}

    def fingerprint_for(cell: Cell) -> str:
        # as the run computes it (Simulation.fingerprint) from the data the cell runs on
        key = (cell.seed, configs[cell].privacy.enabled)
        if key not in fingerprints:
            fingerprints[key] = fingerprint_clients(clients_for(cell))
        return fingerprints[key]

    legacy_epsilons = [cfg.privacy.epsilon]
    recorded_epsilon = _manifest_epsilon(out)
    if recorded_epsilon is not None:
        legacy_epsilons.append(recorded_epsilon)
    docs: dict[Cell, dict[str, Any]] = {}
    pending: list[Cell] = []
    for cell in cells:
        marker = _cell_dir(out, cell) / CELL_FILE
        legacy = _legacy_hashes(cfg, cell, configs[cell], legacy_epsilons)
        if marker.exists():
            docs[cell] = _read_cell(marker, cell, [config_hash(configs[cell]), *legacy],
                                    lambda cell=cell: fingerprint_for(cell),
                                    lambda cell=cell: legacy_fingerprint_clients(clients_for(cell)))
        else:
            configs[cell] = _resume_config(out, cell, configs[cell], legacy)
            pending.append(cell)
    _preflight(out, pending, configs, clients_for, factory, context_factory)
    _check_manifest(out, cfg, write=True)  # only a sweep that can start claims the directory
    ran: list[str] = []
    skipped: list[str] = []
    for index, cell in enumerate(cells):
        if cell in docs:
            skipped.append(cell.key)
            if on_cell:
                on_cell(cell, index, len(cells), True)
            continue
        if on_cell:
            on_cell(cell, index, len(cells), False)
        ccfg = configs[cell]
        progress = None
        if on_round is not None:
            def progress(_m: str, rnd: int, total: int, _cell: Cell = cell) -> None:
                on_round(_cell, rnd, total)
        sim = Simulation(ccfg, _cell_dir(out, cell), clients=clients_for(cell), progress=progress,
                         method_factory=factory, context_factory=context_factory)
        # a sweep takes no key-store argument: its messages name the config key only
        sim.keystore_option = CONFIG_KEYSTORE_OPTION
        try:
            results = sim.run(resume=True)
        except (CheckpointError, BaselineConfigError) as err:
            raise SweepError(f"cell {cell.key}: {err}") from None
        _check_privacy(cell, None, results)
        doc = {
            "method": cell.method, "epsilon": cell.epsilon, "seed": cell.seed,
            "config_hash": config_hash(ccfg), "data_fingerprint": results["data_fingerprint"],
            "entries": _cell_entries(results, cell.method), "results": results,
        }
        atomic_write_text(_cell_dir(out, cell) / CELL_FILE, strict_json(doc))
        docs[cell] = doc
        ran.append(cell.key)
    rows = aggregate(docs, methods)
    # each epsilon's settings line from a cell of the sweep (validated above), not from a
    # method of the config that the sweep may not run
    settings = {}
    for cell in cells:
        settings.setdefault(cell.epsilon, configs[cell])
    files = write_outputs(out, cfg, rows, sweep_metric(docs), settings,
                          _stated_assumptions(docs, configs))
    return SweepResult(rows, ran, skipped, files)


# --------------------------------------------------------------------------- aggregation


def _first_seen(docs: Mapping[Cell, dict[str, Any]], method: str) -> int:
    return next(i for i, c in enumerate(docs) if c.method == method)


def aggregate(docs: Mapping[Cell, dict[str, Any]],
              methods: Sequence[str] | None = None) -> list[SweepRow]:
    """Sweep rows from finished cells, ordered by method (``methods``' order, else the
    order the cells are given in; derived rows such as ``fedavg_ft`` after their method)
    then epsilon.

    "Worse than Local" compares each client's accuracy with the same client's in the Local
    cell of the same seed (Local is non-private); it is ``None`` for a row when some seed has
    no Local cell, or a null figure on either side. A null per-client figure makes its seed's
    client mean and minimum ``None`` (see :class:`SweepRow`), never 0 and never skipped.
    """
    local: dict[int, list[float | None]] = {
        c.seed: d["entries"][c.method] for c, d in docs.items() if sends_nothing(c.method)
    }
    # rows in the order of methods (as given, else as first seen), derived rows after theirs
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(
        [*(methods or ()), *sorted({c.method for c in docs}, key=lambda m: _first_seen(docs, m))]))}
    order: dict[str, tuple[int, int]] = {}
    grouped: dict[tuple[str, float | None],
                  list[tuple[int, list[float | None], float | None]]] = {}
    for cell, doc in docs.items():
        for j, name in enumerate(doc["entries"]):
            order.setdefault(name, (method_rank[cell.method], j))
        spent = _epsilon_spent(doc, cell.method)
        for name, per_client in doc["entries"].items():
            grouped.setdefault((name, cell.epsilon), []).append((cell.seed, per_client, spent))
    rows = []
    for (name, eps), runs in grouped.items():
        runs.sort(key=lambda run: run[0])
        worse: list[int] | None = []
        for seed, per_client, _ in runs:
            ref = local.get(seed)
            if ref is None or len(ref) != len(per_client) or worse is None \
                    or None in ref or None in per_client:
                worse = None
                continue
            worse.append(sum(1 for a, b in zip(per_client, ref, strict=True) if a < b))
        rows.append(SweepRow(
            method=name, epsilon=eps, seeds=[s for s, _, _ in runs],
            client_means=[None if None in p else statistics.fmean(p) for _, p, _ in runs],
            client_mins=[None if None in p else min(p) for _, p, _ in runs],
            worse_than_local=worse, per_client=[list(p) for _, p, _ in runs],
            epsilon_spent=[e for _, _, e in runs],
        ))
    rows.sort(key=lambda r: (order.get(r.method, (len(order), 0)), _eps_sort_key(r.epsilon)))
    return rows


def sweep_metric(docs: Mapping[Cell, dict[str, Any]]) -> str:
    """The test metric every cell reports (results.json ``metric``: "accuracy" or "auc");
    SweepError if cells disagree (they share one config, so they never should)."""
    metrics = {str(d["results"].get("metric", "accuracy")) for d in docs.values()}
    if len(metrics) > 1:
        raise SweepError(f"the cells report different metrics {sorted(metrics)}")
    return metrics.pop() if metrics else "accuracy"


def _stated_assumptions(docs: Mapping[Cell, Mapping[str, Any]],
                        configs: Mapping[Cell, ExperimentConfig]) -> dict[float, dict[str, str]]:
    """Per numeric epsilon, the assumptions its cells' results.json state beyond those of
    every run (:func:`~secure_fedora.runtimes.results.stated_beyond_run`, read from each
    cell's results, not from the method's class): what that epsilon does not cover (e.g.
    ``fedavg_finetuning`` for the ``fedavg_ft`` row, ``<name>_finetuning`` for a method
    registered on FedAvg that fine-tuned, ``client_held_models`` for Ditto's and APFL's
    personal models), and assumptions of other kinds (e.g. FEDORA's ``ckks_keys``, which DP
    does not depend on; ``ckks_parameters`` in words, with their security level, as the audit
    report words them). Of those every DP run states, ``evaluation`` too: the sweep's every
    figure is a test metric, which that epsilon does not cover."""
    from privacy.ckks import parameter_notes

    out: dict[float, dict[str, str]] = {}
    for cell, doc in docs.items():
        if cell.epsilon is not None:
            results = doc.get("results", {})
            stated = stated_beyond_run(results, configs[cell])
            general = results.get("assumptions") if isinstance(results, Mapping) else None
            if isinstance(general, Mapping) and "evaluation" in general:
                stated = {"evaluation": general["evaluation"], **stated}
            # CKKS parameters in words, as the audit report gives them, not a raw dict
            out.setdefault(cell.epsilon, {}).update({
                k: "; ".join(parameter_notes(v)) if k == "ckks_parameters" else str(v)
                for k, v in stated.items()})
    return out


def _epsilon_spent(doc: dict[str, Any], method: str) -> float | None:
    """The largest ``epsilon_spent`` over the cell's clients, as its results report it."""
    try:
        clients = doc["results"]["privacy"][method]["clients"]
        return max(float(c["epsilon_spent"]) for c in clients)
    except (KeyError, TypeError, ValueError):
        return None


def _eps_sort_key(eps: float | None) -> float:
    return math.inf if eps is None else eps


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


CSV_COLUMNS = ("method", "epsilon", "seeds", "clients", "acc_mean", "acc_min", "acc_std",
               "client_min_mean", "worse_than_local", "epsilon_spent_max")


def rows_to_csv(rows: Iterable[SweepRow]) -> str:
    """CSV text with :data:`CSV_COLUMNS`; empty fields where a value is undefined."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([
            r.method, epsilon_label(r.epsilon), len(r.seeds), len(r.per_client[0]),
            _fmt(r.acc_mean, 6), _fmt(r.acc_min, 6), _fmt(r.acc_std, 6),
            _fmt(r.client_min_mean, 6), _fmt(r.worse_than_local_mean, 2),
            "" if r.epsilon_spent_max is None
            else format_spent(r.epsilon_spent_max, r.epsilon, 4),
        ])
    return buf.getvalue()


def _spent_label(row: SweepRow) -> str:
    if row.epsilon is None:
        return "-"
    spent = row.epsilon_spent_max
    return "not reported" if spent is None else format_spent(spent, row.epsilon, 3)


def rows_to_markdown(cfg: ExperimentConfig, rows: Sequence[SweepRow], metric: str = "accuracy",
                     cell_configs: Mapping[float | None, ExperimentConfig] | None = None,
                     assumptions: Mapping[float, Mapping[str, str]] | None = None) -> str:
    """The sweep table with its setup and the definitions of its columns, named after the
    task's test ``metric`` ("accuracy" or "auc"). Under each epsilon's line, the assumptions
    its cells' results state (``assumptions[epsilon]``, see :func:`_stated_assumptions`), so
    no row is read as covered by a guarantee its cells' results disclaim; each is shown as
    stated, not as a gap of that epsilon (an encryption assumption is none).

    Each epsilon's line names the privacy settings of ``cell_configs[epsilon]`` (the config
    of a cell of the sweep at that epsilon); an epsilon missing there gets the config of a
    cell of the first row's method that is a registered method (a swept one, never merely
    the config's first method)."""
    name, short = metric_label(metric), metric_label(metric, short=True)
    t = cfg.training
    seeds = sorted({s for r in rows for s in r.seeds})
    lines = [
        f"# Sweep: {cfg.name}",
        "",
        f"Setup: {_data_setup(cfg)}, model "
        f"{cfg.model.name if cfg.model.factory is None else 'factory ' + cfg.model.factory}, "
        f"{t.rounds} rounds x {t.local_epochs} local epochs, participation {t.participation}, "
        f"seeds {seeds}.",
        "",
        f"| method | epsilon | seeds | {short} mean | {short} min | {short} std | worst client (mean) "
        "| clients below Local | epsilon spent (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        worse = r.worse_than_local_mean
        lines.append(
            f"| {r.method} | {epsilon_label(r.epsilon)} | {len(r.seeds)} | "
            f"{_fmt(r.acc_mean) or 'n/a'} | {_fmt(r.acc_min) or 'n/a'} | "
            f"{_fmt(r.acc_std) or ('n/a' if r.null_figures else '-')} | "
            f"{_fmt(r.client_min_mean) or 'n/a'} | "
            f"{'n/a' if worse is None else f'{worse:.2f}'} | "
            f"{_spent_label(r)} |"
        )
    lines += [""]
    for r in rows:
        if r.null_figures:
            shown = ", ".join(f"seed {seed} client {i}" for seed, i in r.null_figures)
            lines.append(f"- {r.method} at epsilon {epsilon_label(r.epsilon)}: null {name} "
                         f"(not finite; the cell's results.json non_finite_values) for {shown}:"
                         " the row's statistics over seeds are n/a, not computed without it.")
    for eps in sorted({r.epsilon for r in rows}, key=_eps_sort_key):
        at = [r for r in rows if r.epsilon == eps]
        defined = [r for r in at if r.acc_mean is not None]
        settings = privacy_settings(_settings_config(cfg, at, eps, seeds[0], cell_configs))
        if defined:
            best = max(defined, key=lambda r: r.acc_mean or 0.0)
            highest = f"highest mean {name} {best.method} ({best.acc_mean:.4f})"
            if len(defined) < len(at):
                highest += " of those defined (n/a: " + ", ".join(
                    r.method for r in at if r.acc_mean is None) + ")"
        else:
            highest = f"no method has a defined mean {name}"
        lines.append(f"- epsilon {epsilon_label(eps)}: {highest}; {settings}.")
        stated = (assumptions or {}).get(eps, {}) if eps is not None else {}
        for key, text in sorted(stated.items()):
            lines.append(f"  - stated by the results at epsilon {epsilon_label(eps)} ({key}):"
                         f" {text}")
    lines += [
        "",
        f"{name[0].upper() + name[1:]} is each client's test {name} at the reported round named "
        f"on each epsilon's line: the round with the best mean validation {name}, or the final "
        "round where choosing on private validation data would be an unaccounted release"
        f"{_fine_tuned_rows_note(rows)}. "
        f"*{short} mean / min / std*: mean, minimum and sample "
        f"standard deviation over seeds of the client-mean {name}. *worst client*: mean over "
        f"seeds of the lowest client {name}. *clients below Local*: mean over seeds of the "
        f"number of clients whose {name} is below their own in the Local run of the same seed; Local runs "
        "non-private only (a client that stays out releases nothing). *epsilon spent*: the "
        "largest epsilon any client's accountant reports after the run, over all seeds "
        "(rounded up). "
        "epsilon none: non-private.",
        "",
    ]
    return "\n".join(lines)


def _fine_tuned_rows(rows: Sequence[SweepRow]) -> list[str]:
    """The rows of the table that are a method's fine-tuned metric: ``<name>_ft`` beside a
    row ``<name>`` of a registered method that fine-tunes after its last round (FedAvg, or a
    class built on it declaring ``finetunes``; its ``derived_rows``), in table order."""
    from secure_fedora.algorithms.config_checks import FedAvgChecks
    from secure_fedora.core.registry import METHODS

    names = {r.method for r in rows}
    out = []
    for r in rows:
        base = r.method.removesuffix("_ft")
        if base == r.method or base not in names or base not in METHODS or r.method in out:
            continue
        cls = method_class(base)
        if cls is not None and issubclass(cls, FedAvgChecks) and cls.fine_tunes():
            out.append(r.method)
    return out


def _fine_tuned_rows_note(rows: Sequence[SweepRow]) -> str:
    """What the table's fine-tuned rows (:func:`_fine_tuned_rows`) report, as a parenthesis
    after the reported round's definition; ``""`` for a table without one."""
    tuned = _fine_tuned_rows(rows)
    if not tuned:
        return ""
    return (f" ({', '.join(tuned)}: the final global model fine-tuned per client, its epoch "
            "chosen on the client's validation data where the round is, else its last "
            "fine-tuning epoch)")


def _settings_config(cfg: ExperimentConfig, at: Sequence[SweepRow], eps: float | None, seed: int,
                     cell_configs: Mapping[float | None, ExperimentConfig] | None) -> ExperimentConfig:
    if cell_configs is not None and eps in cell_configs:
        return cell_configs[eps]
    known = _literal_methods()
    method = next((r.method for r in at if r.method in known), cfg.methods[0])
    return cell_config(cfg, Cell(method, eps, seed))


def plot_accuracy_vs_epsilon(rows: Sequence[SweepRow], path: Path, metric: str = "accuracy") -> Path:
    """Client-mean test ``metric`` (mean over seeds, bars: min-max over seeds) per method vs
    epsilon; non-private sits at the right end, labelled "none"."""
    name = metric_label(metric)
    eps_values = sorted({r.epsilon for r in rows}, key=_eps_sort_key)
    pos = {e: i for i, e in enumerate(eps_values)}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in dict.fromkeys(r.method for r in rows):
        # a row with a null figure has no mean to draw (sweep.md names its figures)
        mine = sorted((r for r in rows if r.method == method and r.acc_mean is not None),
                      key=lambda r: _eps_sort_key(r.epsilon))
        x = [pos[r.epsilon] for r in mine]
        y = [r.acc_mean for r in mine]
        lo = [r.acc_mean - r.acc_min for r in mine]  # type: ignore[operator]
        hi = [max(m for m in r.client_means if m is not None) - r.acc_mean  # type: ignore[operator]
              for r in mine]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=method)
    ax.set_xticks(range(len(eps_values)), [epsilon_label(e) for e in eps_values])
    ax.set_xlabel("epsilon (none: non-private)")
    ax.set_ylabel(f"client-mean test {name} (bars: min-max over seeds)")
    ax.set_title(f"{name[0].upper() + name[1:]} vs privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_client_distribution(rows: Sequence[SweepRow], epsilon: float | None, path: Path,
                                 metric: str = "accuracy") -> Path:
    """Box plots of per-client test ``metric`` (all clients of all seeds) per method at
    ``epsilon``."""
    name = metric_label(metric)
    at = [r for r in rows if r.epsilon == epsilon]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(at) + 2), 4.2))
    ax.boxplot([[a for run in r.per_client for a in run if a is not None] for r in at],
               showmeans=True)
    ax.set_xticks(range(1, len(at) + 1), [r.method for r in at], rotation=30)
    ax.set_ylabel(f"per-client test {name} (all seeds)")
    ax.set_title(f"Per-client {name}, epsilon {epsilon_label(epsilon)}")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, cfg: ExperimentConfig, rows: Sequence[SweepRow],
                  metric: str = "accuracy",
                  cell_configs: Mapping[float | None, ExperimentConfig] | None = None,
                  assumptions: Mapping[float, Mapping[str, str]] | None = None) -> list[Path]:
    """Write ``sweep.csv``, ``sweep.md`` and the plots (atomically for the text files), named
    after the task's test ``metric`` (the CSV keeps its ``acc_*`` columns for any metric);
    ``cell_configs`` and ``assumptions``: see :func:`rows_to_markdown`."""
    atomic_write_text(out / "sweep.csv", rows_to_csv(rows))
    atomic_write_text(out / "sweep.md", rows_to_markdown(cfg, rows, metric, cell_configs,
                                                         assumptions))
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    files = [out / "sweep.csv", out / "sweep.md",
             plot_accuracy_vs_epsilon(rows, plots / "accuracy_vs_epsilon.png", metric)]
    for eps in sorted({r.epsilon for r in rows}, key=_eps_sort_key):
        files.append(plot_per_client_distribution(
            rows, eps, plots / f"per_client_eps-{epsilon_label(eps)}.png", metric))
    return files


if __name__ == "__main__":
    raise SystemExit(main())
