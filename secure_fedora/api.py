"""Python API: build an experiment from a config, your data and your model; run it.

Example (a notebook)::

    from secure_fedora import Experiment
    exp = Experiment(
        {"methods": ["fedora", "local"], "data": {"partition": "iid", "num_clients": 4,
         "train_per_client": 64, "val_per_client": 32, "test_per_client": 32},
         "training": {"rounds": 5}},
        data={"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te},
        model=lambda input_shape, num_classes: torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), num_classes)),
    )
    results = exp.run()
    print(results.summary())
    results.selected("fedora")["mean"]

``config`` is an :class:`~secure_fedora.core.config.ExperimentConfig`, a dict with the TOML's
structure, or the path of a TOML file. ``data`` is what a ``[data] source`` function returns
(a centralized dataset dict, a list of per-client dicts) or such a function of the seed;
``model`` is a ``factory(input_shape, num_classes) -> nn.Module`` (a built module is a
ModelError naming ``model=``). Both default to the
config's keys. The CLI's ``run`` is a thin layer over :class:`Experiment`.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from secure_fedora.core.config import (
    ConfigError,
    ExperimentConfig,
    check_flag_argument,
    check_path_argument,
    check_settings_used,
    load_config,
    parse_config,
    revalidate,
)
from secure_fedora.data.partition import ClientData

__all__ = ["Experiment", "Results", "run"]

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]


class Results(dict):
    """The results document (the same dict as ``results.json``) with a few helpers."""

    def __init__(self, document: Mapping[str, Any], run_dir: str | Path | None = None) -> None:
        super().__init__(document)
        self.run_dir = check_path_argument(run_dir, "run_dir") if run_dir is not None else None

    @classmethod
    def load(cls, run_dir: str | Path) -> Results:
        """Read ``run_dir/results.json``: RunDirError when it is missing, unreadable or holds
        no JSON object (ConfigError for an empty ``run_dir``, or one of spaces or with NUL)."""
        from secure_fedora.runtimes.rundir import RunDirError

        run = check_path_argument(run_dir, "run_dir")
        path = run / "results.json"
        try:
            document = json.loads(path.read_bytes())
        except OSError as err:
            raise RunDirError(f"cannot read {path}: {err.strerror or err}") from None
        except ValueError as err:  # not JSON, or not UTF-8
            raise RunDirError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(document, dict):
            raise RunDirError(f"{path} holds no results document (a JSON object)")
        return cls(document, run)

    @property
    def metric(self) -> str:
        """What ``selected``/``final`` hold: "accuracy" or "auc"."""
        return str(self.get("metric", "accuracy"))

    @property
    def method_names(self) -> list[str]:
        """The methods with results, in run order (``fedavg_ft`` included when present)."""
        return list(self["methods"])

    def selected(self, method: str) -> dict[str, Any]:
        """``methods.<method>.selected``: mean/min/max/std/per_client of the test metric at
        the round with the best mean validation metric (and that ``round``)."""
        try:
            return self["methods"][method]["selected"]
        except KeyError:
            raise KeyError(f"no results for method {method!r}; have {self.method_names}") from None

    def mean(self, method: str) -> float:
        """The selected mean test metric of ``method``; NaN or infinite where the run's figure
        was (results.json holds ``null`` there and the value under ``non_finite_values``)."""
        value = self.selected(method)["mean"]
        if value is None:
            from secure_fedora.core.files import json_pointer

            held = (self.get("non_finite_values") or {}).get(
                json_pointer(["methods", method, "selected", "mean"]), "nan")
            return float(held)
        return float(value)

    def summary(self) -> str:
        """A plain-text table of every method's selected test metric (``n/a`` for a null,
        non-finite figure), headed by how its round was chosen (``assumptions.model_selection``: the best-validation or the final round),
        then a line for each client whose selected metric is from another round
        (``selected.stale_clients``: a client that missed that evaluation or rejected its
        evaluation message) and one naming the rounds selection did not consider
        (``selected.unmeasured_rounds``)."""
        assumptions = self.get("assumptions")
        selection = assumptions.get("model_selection") if isinstance(assumptions, dict) else None
        which = "the final round" if selection == "final_round" else "the best-validation round"
        lines = [f"{self.get('name', 'experiment')}: test {self.metric} at {which}",
                 f"{'method':<12} {'mean':>8} {'min':>8} {'max':>8} {'std':>8} {'round':>6}"]
        for name in self.method_names:
            s = self.selected(name)
            rnd = s.get("round", "")
            # a null figure (NaN or infinite, named under non_finite_values) is no number
            figures = " ".join(f"{s[k]:>8.4f}" if isinstance(s[k], int | float) else f"{'n/a':>8}"
                               for k in ("mean", "min", "max", "std"))
            lines.append(f"{name:<12} {figures} {rnd!s:>6}")
        for name in self.method_names:
            for stale in self.selected(name).get("stale_clients") or []:
                source = "a placeholder 0" if stale["round"] is None \
                    else f"from round {stale['round']}"
                lines.append(f"{name}: client {stale['client']}'s metric is {source}, not the "
                             "selected round's")
            skipped = self.selected(name).get("unmeasured_rounds")
            if skipped:
                lines.append(f"{name}: rounds {skipped} were not considered for selection "
                             "(some client had no measured metric yet)")
        return "\n".join(lines)


def _refuse_two_sources(cfg: ExperimentConfig, data: Any, model: Any) -> None:
    """ConfigError when ``data=`` or ``model=`` is given and the config names its own (one of
    the two would be ignored, and config.toml would describe data or a model the run never
    used)."""
    for argument, given, section, keys in (("data", data, cfg.data, ("source", "dataset")),
                                           ("model", model, cfg.model, ("factory", "name"))):
        if given is None:
            continue
        named = [f"{argument}.{key} = {getattr(section, key)!r}" for key in keys
                 if key in section.model_fields_set and getattr(section, key) is not None]
        if named:
            raise ConfigError(f"{argument}= was given and the config names {', '.join(named)}; "
                              f"give the {argument} one way (remove the key, or do not pass "
                              f"{argument}=)")


def _as_config(config: ExperimentConfig | Mapping[str, Any] | str | Path) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return revalidate(config)  # model_copy(update=...) skips the validators
    if isinstance(config, Mapping):
        return parse_config(dict(config), "(dict)")
    if isinstance(config, str | Path):
        return load_config(config)
    raise ConfigError(f"config must be an ExperimentConfig, a dict or a TOML path, got "
                      f"{type(config).__name__}")


class Experiment:
    """One experiment: a validated config, the federation's data and a model factory.

    Nothing trains until :meth:`run`; :meth:`check` builds the data and the model and runs
    every plug-in check (bad data, model, loss or DP support raise their named error).
    """

    def __init__(self, config: ExperimentConfig | Mapping[str, Any] | str | Path, *,
                 data: Any = None, model: ModelFactory | None = None,
                 run_dir: str | Path | None = None) -> None:
        self.config = _as_config(config)
        _refuse_two_sources(self.config, data, model)
        if model is not None:
            from secure_fedora.learning.models import check_factory

            check_factory(model, "model=")
        self.data = data
        self.model_factory = model
        self._run_dir = check_path_argument(run_dir, "run_dir") if run_dir is not None else None
        self._temporary = run_dir is None
        self._clients: list[ClientData] | None = None

    @property
    def run_dir(self) -> Path:
        """Where the run writes: the ``run_dir`` given, else a new temporary directory
        (``secure-fedora-NAME-*``) made on first use, so an experiment that only checks, or
        whose run fails before writing anything, leaves no directory behind."""
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix=f"secure-fedora-{self.config.name}-"))
        return self._run_dir

    @run_dir.setter
    def run_dir(self, value: str | Path) -> None:
        self._run_dir = check_path_argument(value, "run_dir")
        self._temporary = False

    @property
    def clients(self) -> list[ClientData]:
        """The federation's clients (built and checked once)."""
        if self._clients is None:
            from secure_fedora.runtimes.inprocess import build_clients

            self._clients = build_clients(self.config, self.data)
        return self._clients

    def context_factory(self, cfg: ExperimentConfig, clients: Any) -> Any:
        """``build_context`` with this experiment's model factory."""
        from secure_fedora.runtimes.inprocess import build_context

        return build_context(cfg, clients, model_factory=self.model_factory)

    def check(self) -> Experiment:
        """Build the data and the model and run the plug-in checks; returns ``self``."""
        self.context_factory(self.config, self.clients)
        return self

    def simulation(self, progress: Callable[[str, int, int], None] | None = None,
                   keystore: str | Path | None = None) -> Any:
        """The in-process :class:`~secure_fedora.runtimes.inprocess.Simulation` of this experiment
        (``keystore``: where the run's private keys live; default outside the run directory)."""
        from secure_fedora.runtimes.inprocess import Simulation

        return Simulation(self.config, self.run_dir, clients=self.clients, progress=progress,
                          context_factory=functools.partial(Experiment.context_factory, self),
                          keystore=keystore, inputs_outside_config=self.inputs_outside_config)

    @property
    def inputs_outside_config(self) -> tuple[str, ...]:
        """Which of ``("data", "model")`` this experiment was given in Python rather than by
        its config (recorded in results.json: the run's config.toml cannot rebuild them)."""
        return tuple(name for name, given in (("data", self.data), ("model", self.model_factory))
                     if given is not None)

    def run(self, resume: bool = False,
            progress: Callable[[str, int, int], None] | None = None,
            keystore: str | Path | None = None) -> Results:
        """Run every configured method; writes ``run_dir`` (results.json, rounds.csv,
        checkpoints) and returns the :class:`Results`. A fresh run (``resume`` False) needs an
        empty or new ``run_dir`` (RunDirError otherwise: it would overwrite another run's
        results); ``resume=True`` continues the run it holds, and only that: the directory must
        hold this configuration's checkpoints (``check_resumable``), checked before anything is
        written (RunDirError or CheckpointError otherwise). A ``resume`` that is not a bool
        is a ConfigError. ``keystore``: the key store of a DP run's private keys, as the CLI's
        ``--keystore`` (before ``[security] keystore`` and the default); a ConfigError, before
        anything is written, when it is empty or holds NUL, or when the config has privacy
        off (such a run reads no key store; so is ``[security] keystore`` there, except on a
        resume, which only warns: the run's checkpoints are bound to its config)."""
        from secure_fedora.runtimes.rundir import RunDirError, check_resumable, hold_run_dir
        from secure_fedora.secure.keystore import API_KEYSTORE_OPTION, check_keystore_used

        if keystore is not None:
            check_path_argument(keystore, "keystore")
        resuming = check_flag_argument(resume, "resume")
        check_keystore_used(self.config.privacy.enabled, self.config.security.keystore, keystore,
                            API_KEYSTORE_OPTION, resume=resuming)
        check_settings_used(self.config, resume=resuming)
        try:
            with hold_run_dir(self.run_dir, create=not resuming):  # another process's is refused
                if resuming:
                    check_resumable(self.run_dir, self.config, config_copy_required=False,
                                    cli=False)
                elif self.run_dir.is_dir() and any(self.run_dir.iterdir()):
                    raise RunDirError(f"run directory {self.run_dir} is not empty; a new run "
                                      "needs a new or empty run_dir, and run(resume=True) "
                                      "continues the run it holds")
                self.check()
                return Results(self.simulation(progress, keystore=keystore).run(resume=resume),
                               self.run_dir)
        except BaseException:
            self._drop_empty_temporary()
            raise

    def _drop_empty_temporary(self) -> None:
        """Remove the temporary run directory this experiment made when nothing was written
        in it (a run refused or failed before its first file); the next run makes a new one."""
        if self._temporary and self._run_dir is not None:
            try:
                self._run_dir.rmdir()  # only an empty directory
            except OSError:
                return
            self._run_dir = None


def run(config: ExperimentConfig | Mapping[str, Any] | str | Path, *, data: Any = None,
        model: ModelFactory | None = None, run_dir: str | Path | None = None,
        keystore: str | Path | None = None) -> Results:
    """``Experiment(config, data=..., model=..., run_dir=...).run(keystore=...)``."""
    return Experiment(config, data=data, model=model, run_dir=run_dir).run(keystore=keystore)
