"""The one ``results.json`` document both runtimes write.

:func:`build_results` is the only place that lays the document out; the in-process runtime
(:class:`~secure_fedora.runtimes.inprocess.Simulation`) and the Flower ServerApp both call it,
so a user's script and ``audits`` read one schema. Stable paths (users' scripts read them):

* ``methods.<name>.selected.{mean,min,max,std,per_client,round}`` -- each client's test metric
  at the round with the best mean validation metric (or the final round under
  ``model_selection = "final_round"``), and that round; ``selected.unmeasured_rounds``, only
  where some evaluated rounds were not considered as a client had no measured metric yet;
* ``methods.<name>.final.{mean,min,max,std,per_client}`` -- at the last evaluated round;
* a derived row (``methods.fedavg_ft``, see :func:`build_results`) holds only ``name``,
  ``metric`` and ``selected.{mean,min,max,std,per_client,round}`` (no ``final``): its
  metric is of the method's final model, so ``round`` is the method's last round; a client
  the method reports without a metric is ``null`` in ``per_client``, listed in
  ``selected.missing_clients`` and left out of the other figures;
* ``methods.<name>.{name,rounds,seconds_training,seconds_evaluation,metric}`` and the method's
  own results (:meth:`~secure_fedora.algorithms.contract.FederatedAlgorithm.server_finalize`);
* top level ``name, version, runtime, config_hash, metric, loss, assumptions, privacy,
  clients, methods, comparison`` (and ``compute``, ``data_fingerprint`` where the runtime
  knows them: a Flower server never sees the data, so its fingerprint is ``None``);
* ``privacy.<name>.reply_entries`` (a DP run only, as all of ``privacy``): what the method's
  client replies may carry in each exchange, ``setup``/``round``/``finalize`` -> entry ->
  ``{reason, built_in}`` (:func:`~secure_fedora.algorithms.contract.declared_reply_entries`:
  ``built_in`` false is the method's own claim, declared and not verified);
  ``privacy.<name>.epsilon_figures`` (each runtime's section,
  :data:`~secure_fedora.secure.private.EPSILON_FIGURES`): the plan rows' ``planned_epsilon``
  is rounded up, the clients' ``epsilon_spent`` exact;
* ``non_finite_values``, only where a figure was NaN or infinite: the document is strict JSON
  (no ``NaN``/``Infinity``), such a figure is ``null`` and this key maps its JSON Pointer
  (RFC 6901, :func:`~secure_fedora.core.files.json_pointer`) to the value it held
  (``{"/methods/m/extra/score": "nan"}``).

A runtime adds its own keys through ``runtime_keys`` (Flower: run id, node map, events,
security rejections, per-round timings); they never replace a key above.

``rounds.csv`` is the other file both runtimes write, through :func:`write_rounds_csv`: one
row per round of every method, in the columns of the rounds' history rows (``method, round,
participants, replied``, the method's round statistics, the evaluation columns and
``evaluated``, the clients whose test metric the round holds). Timings are
not in it (:data:`ROUNDS_CSV_OMITS`): they differ from run to run, and the file of a resumed
run equals the file of an uninterrupted one; Flower keeps its per-round seconds under
``results.json`` ``rounds``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from secure_fedora import __version__
from secure_fedora.algorithms.contract import (
    REPLY_LAMBDA,
    ROUND,
    FederatedAlgorithm,
    declared_reply_entries,
    method_class,
    method_hook,
    reply_declarations,
)
from secure_fedora.core.config import ConfigError, ExperimentConfig, model_selection
from secure_fedora.core.files import NON_FINITE_KEY, finite_document

__all__ = ["INPUTS_OUTSIDE_CONFIG", "METRIC_LABELS", "PROCESS_KEYS", "RESERVED_KEYS", "RESULT_FILES",
           "ROUNDS_CSV", "ROUNDS_CSV_OMITS", "TIMING_RECORDS", "build_results", "checkpoints_statement",
           "client_errors_statement", "client_rows", "config_assumptions", "releases_lambda",
           "inputs_outside_config", "inputs_outside_config_assumption", "kept_results",
           "method_entry", "metric_label", "remove_interrupted_result_writes", "rounds_csv_holds",
           "rounds_csv_text", "same_outcomes", "stated_beyond_run", "timing_statement", "uses_relatedness",
           "write_rounds_csv", "write_run_results"]

#: The files a runtime replaces atomically in its run directory (the in-process run
#: directory, Flower's ``result-dir``), besides ``plots/``.
RESULT_FILES = ("config.toml", "progress.json", "rounds.csv", "results.json", "anchor.json",
                "failure.json", "keystore_extended.json", "amendments.json", "stopped.json")

#: Top-level keys :func:`build_results` owns (runtime keys may not use them).
RESERVED_KEYS = frozenset({
    "name", "version", "runtime", "compute", "config_hash", "data_fingerprint", "metric", "loss",
    "assumptions", "privacy", "clients", "methods", "comparison", NON_FINITE_KEY,
})


#: The parts of results.json whose keys are a runtime's own, which the two runtimes need not
#: share (every other key path is written by both, through the shared builders: a key that one
#: runtime cannot know is written by the other too, null or empty with a stated meaning):
#: ``runtime_keys`` by runtime (top-level keys; ``config_amendments`` in either, where a
#: resume amended the config), the top-level sections holding each runtime's own statements
#: (its assumptions and compute), and the maps whose keys are values (the engines that trained).
RUNTIME_KEYS = {
    "in-process": frozenset({"keystore_extended", "config_amendments"}),
    "flower": frozenset({"run_id", "max_in_flight", "security", "node_of_client",
                         "relatedness_timing", "relatedness_details", "timings", "rounds",
                         "events", "seconds_total", "config_amendments"}),
}
RUNTIME_STATEMENTS = frozenset({"assumptions", "compute"})
VALUE_KEYED_PATHS = ("methods.*.extra.training_engine.runs",)


def shared_key_paths(doc: Mapping[str, Any]) -> set[str]:
    """Every key path of results.json ``doc`` that both runtimes write (dotted, ``[]`` for a
    list's items, ``*`` for a method's name under ``methods``/``privacy``), leaving out the
    runtime's own parts (:data:`RUNTIME_KEYS`, :data:`RUNTIME_STATEMENTS`) and the keys of
    :data:`VALUE_KEYED_PATHS`: two runs of one setting, one per runtime, give the same set."""
    out: set[str] = set()
    own = RUNTIME_KEYS.get(str(doc.get("runtime")), frozenset()) | RUNTIME_STATEMENTS

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            if path in VALUE_KEYED_PATHS:
                return
            for key, item in value.items():
                named = "*" if path in ("methods", "privacy") else str(key)
                sub = f"{path}.{named}" if path else named
                out.add(sub)
                walk(item, sub)
        elif isinstance(value, list):
            for item in value:
                walk(item, f"{path}[]")

    walk({k: v for k, v in doc.items() if k not in own}, "")
    return out


#: results.json ``metric`` -> (its name in prose and axis labels, its short column prefix).
METRIC_LABELS: dict[str, tuple[str, str]] = {"accuracy": ("accuracy", "acc"), "auc": ("ROC AUC", "AUC")}


def metric_label(metric: str | None, short: bool = False) -> str:
    """How tables and plots name a results.json ``metric`` ("accuracy" when absent, as in
    results written before the key existed; an unknown name is shown as it is)."""
    name, prefix = METRIC_LABELS.get(metric or "accuracy", (str(metric), str(metric)))
    return prefix if short else name


def method_entry(name: str, selected: Mapping[str, Any], final: Mapping[str, Any], rounds: int,
                 seconds_training: float, seconds_evaluation: float,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One method's outcome as ``methods.<name>`` holds it (without the metric name, which
    :func:`build_results` adds)."""
    return {"name": name, "selected": dict(selected), "final": dict(final), "rounds": int(rounds),
            "seconds_training": float(seconds_training),
            "seconds_evaluation": float(seconds_evaluation), "extra": dict(extra or {})}


def client_rows(sizes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``clients`` list: id, split sizes and the partition facts a client may publish
    (rotation, group, classes), from one mapping per client."""
    keep = ("rotation_degrees", "group", "classes")
    return [{"id": int(s["id"]), "train": int(s["train"]), "val": int(s["val"]),
             "test": int(s["test"]), **{k: s[k] for k in keep if k in s}} for s in sizes]


def _assumptions(cfg: ExperimentConfig) -> dict[str, Any]:
    return {**_run_assumptions(cfg), **_method_assumptions(cfg)}


def config_assumptions(cfg: ExperimentConfig) -> dict[str, Any]:
    """The ``assumptions`` every results.json of a run of ``cfg`` states, exactly as the run
    states them (the run's own and its methods' declared ones): what a reader can know from
    config.toml alone. A run's document may hold more (what its methods derive from their
    outcome, what its runtime adds). Raises ValueError where two methods state one key
    differently (as the run would)."""
    return _assumptions(cfg)


def uses_relatedness(cfg: ExperimentConfig) -> bool:
    """Whether a method of ``cfg`` computes FEDORA's relatedness and ``lambda_i`` (its class
    declares ``uses_relatedness``: FEDORA, or a method built on it); a name this process has
    not registered declares nothing."""
    from secure_fedora.core.registry import METHODS

    return any(name in METHODS and METHODS.declared(name, "uses_relatedness")
               for name in cfg.methods)


def _run_assumptions(cfg: ExperimentConfig) -> dict[str, Any]:
    """The assumptions every run of ``cfg`` states, whatever its methods; ``relatedness``
    only where a method computes it (:func:`uses_relatedness`)."""
    from secure_fedora.runtimes.inprocess import NOISE_SOURCE_DESCRIPTIONS
    from secure_fedora.secure.private import noise_assumptions

    dp = cfg.privacy.enabled
    return {
        "validation_data": cfg.data.validation,
        "model_selection": model_selection(cfg),
        **({"relatedness": cfg.fedora.relatedness} if uses_relatedness(cfg) else {}),
        "server": "honest-but-curious",
        "differential_privacy": dp,
        **({"noise_source": NOISE_SOURCE_DESCRIPTIONS[cfg.privacy.noise],
            **noise_assumptions(cfg),
            "neighbouring_relation": "add/remove one record; dataset sizes public",
            "accountant": cfg.privacy.accountant,
            "evaluation": EVALUATION_UNDER_DP,
            "data_fingerprint": FINGERPRINT_UNDER_DP}
           if dp else {}),
        **({"methods_compared": METHODS_COMPARED} if dp and len(cfg.methods) > 1 else {}),
        "client_errors": client_errors_statement(cfg),
    }


def stated_beyond_run(results: Mapping[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    """The assumptions a results document of a run of ``cfg`` states beyond those every run
    of ``cfg`` states (validation, noise, accountant, evaluation, ...): what its methods
    declared, what they derived from what the run produced (``<name>_finetuning`` of a method
    registered on FedAvg that fine-tuned) and what the runtime added. Read from the document,
    so it is what the run wrote; a malformed ``assumptions`` gives ``{}``."""
    stated = results.get("assumptions") if isinstance(results, Mapping) else None
    if not isinstance(stated, Mapping):
        return {}
    general = _run_assumptions(cfg)
    return {k: v for k, v in stated.items() if k not in general}


EVALUATION_UNDER_DP = (
    "each client's test split is treated as public: the per-client test metric of every "
    "reported model is published (results.json, rounds.csv, plots) outside the ledgers; "
    "validation metrics are computed only when they choose the reported round "
    "(model_selection = 'validation', i.e. public or non-DP validation data)")
"""results.json ``assumptions.evaluation`` of a DP run."""

FINGERPRINT_UNDER_DP = (
    "data_fingerprint is a SHA-256 of every client's data (it binds checkpoints and results "
    "to it): it identifies the exact datasets and is not differentially private; share "
    "results.json only with those who may know which data was used")
"""results.json ``assumptions.data_fingerprint`` of a DP run."""

FLOWER_FINGERPRINT_UNDER_DP = (
    "data_fingerprint is null: under DP no client sends the server a hash of its data (it "
    "would let the server confirm a guess of that data, outside the ledgers); each node's "
    "partition file (state-dir/partitions) holds its own client's SHA-256")
"""results.json ``assumptions.data_fingerprint`` of a Flower DP run."""

METHODS_COMPARED = (
    "each method is a separate experiment on the same clients' data: its epsilon holds for its "
    "own releases alone; deploying several of them against one server composes their budgets")
"""results.json ``assumptions.methods_compared`` of a DP run of more than one method."""

#: What a DP run's timings reveal (both runtimes: a client's training time depends on the
#: batch sizes its Poisson sampling draws, which DP-SGD's accounting keeps hidden).
_TIMING_DEPENDS = (
    "a client's times can depend on its data through the batch sizes its Poisson sampling "
    "draws (which DP-SGD's accounting treats as hidden); no ledger accounts them")
_TIMING_UNDER_DP = {
    "flower": (
        "timing is outside the ledgers: every reply a client sends carries its ClientApp "
        "process's start time and its handler's start and end times (t-process-start, "
        "t-handler-start, t-handler-end), and the server sees when each reply arrives; "
        "results.json and progress.json hold their averages over the replying clients per "
        "exchange (timing, evaluation_timing{in_results}) and each round's seconds; "
        "results.json also holds each method's "
        "seconds_training and seconds_evaluation and the run's seconds_total; the ServerApp "
        "checkpoint (checkpoints/flower-server.pt) holds them too: {in_checkpoint}"
        "every round's row (history: its seconds, timing, "
        "evaluation_timing), each finished method's outcome with its seconds, the method in "
        "flight's seconds and the run's elapsed time; every ledger entry carries its UTC "
        "time. " + _TIMING_DEPENDS),
    "in-process": (
        "timing is outside the ledgers: results.json holds each method's seconds_training and "
        "seconds_evaluation (every client's together), each method's checkpoint in "
        "checkpoints/ holds them too (timing: its training and evaluation seconds so far, "
        "beside its history of rounds and, once it finished, its outcome) and every ledger "
        "entry carries its UTC time. " + _TIMING_DEPENDS),
}

TIMING_RECORDS: dict[str, tuple[str, ...]] = {
    "flower": ("timings", "relatedness_timing"),
    "in-process": (),
}
"""The run-level timing records each runtime writes into results.json (beside its
``runtime_keys``) and its checkpoint, which hold something only in some runs (Flower's
``relatedness_timing``: only an encrypted relatedness ceremony's); :func:`timing_statement`
names those a run's hold something."""


def timing_statement(runtime: str, records: Mapping[str, Any] | None = None) -> str:
    """results.json ``assumptions.timing`` of a DP run on ``runtime`` (``"flower"`` or
    ``"in-process"``; both runtimes call it): the times a run sends and writes (results.json,
    progress.json, the checkpoints), which it keeps (they are how a run's cost is read, and a
    resume goes on from them) and no ledger accounts. Of the runtime's run-level timing
    records (:data:`TIMING_RECORDS`; ``records``: name -> what the run writes under it) it
    names exactly those that hold something, so a run of methods without an encrypted
    relatedness ceremony names no ``relatedness_timing``. ``ValueError`` for another runtime,
    a record the runtime does not write or one it writes left out of ``records``."""
    if runtime not in _TIMING_UNDER_DP:
        raise ValueError(f"no timing statement for runtime {runtime!r} (one of "
                         f"{', '.join(sorted(_TIMING_UNDER_DP))})")
    given = dict(records or {})
    if set(given) != set(TIMING_RECORDS[runtime]):
        raise ValueError(f"the {runtime} runtime's timing statement needs its timing records "
                         f"{list(TIMING_RECORDS[runtime])}, got {sorted(given)}")
    held = [name for name in TIMING_RECORDS[runtime] if given[name]]
    return _TIMING_UNDER_DP[runtime].format(
        in_results=f"; in results.json also {' and '.join(held)}" if held else "",
        in_checkpoint=f"the {', '.join(held)}, " if held else "")


def checkpoints_statement(cfg: ExperimentConfig) -> str:
    """results.json ``assumptions.checkpoints`` of an in-process DP run of ``cfg``: its
    ``checkpoints/`` hold every client's state, as the process does, and the statement names
    each method of the run that keeps client state DP does not cover, with what it keeps (its
    class's :attr:`~secure_fedora.algorithms.config_checks.MethodChecks.unreleased_client_state`);
    a run of methods declaring none says what the checkpoints hold instead. (A Flower
    ServerApp's checkpoint holds only the server's state: a Flower run states none.)"""
    from secure_fedora.core.registry import METHODS

    kept = {name: METHODS.declared(name, "unreleased_client_state") for name in cfg.methods
            if name in METHODS}
    unreleased = {name: text for name, text in kept.items() if text}
    head = "in process checkpoints/ holds every client's own state between rounds, as the process does"
    if not unreleased:
        return (f"{head}: the models its clients trained with DP-SGD (accounted by their ledgers, "
                "as their releases are) and what the server computed from the releases, beside "
                "the test metrics and times results.json holds (assumptions.evaluation, "
                f"assumptions.timing); no method of the run ({', '.join(cfg.methods)}) declares "
                "client state kept without DP noise (unreleased_client_state)")
    named = "; ".join(f"{name}: {text}" for name, text in unreleased.items())
    others = [name for name in cfg.methods if name not in unreleased]
    rest = (f"; the other methods' ({', '.join(others)}) client state is trained with DP-SGD "
            "and accounted" if others else "")
    return (f"{head}, among it state kept without DP noise ({named}): it is the clients' data, "
            f"not a release, and DP does not cover it{rest}; hand others the run without "
            "checkpoints/, which no audit reads")


CLIENT_ERRORS = {
    "withheld": (
        "withheld ([security] client_errors): an error or refusal text a client sends the "
        "server names only the error's class (and its direct cause's), with the fixed sentence "
        "\"details withheld; see the client's own log\"; its full text stays in the client's "
        "own log. Where the class names alone would misstate whether asking the client "
        "again can pass, the text adds the fixed tag \"[refuses again: <class>]\" (an error "
        "of a subclass of, or wrapping, a data, relatedness, config or model error) or "
        "\"[may pass if asked again]\" (one of those wrapping a file, network or memory "
        "error, but not a missing, unreadable or corrupt file).{pull} Whether a client "
        "errs or refuses, and with which class, can depend on its data and is outside the "
        "ledgers. A refused release's budget text (what its ledger records) is sent whole. In "
        "process no client's text leaves the process"),
    "full": (
        "full ([security] client_errors): on Flower the error and refusal texts of a client "
        "whose node agrees (node config client-errors = \"full\") reach the server whole (with "
        "the withheld text's verdict tag, where one applies); they "
        "are not accounted releases and can name facts of its data (a label value, a split "
        "size, a loss at some step); every other node sends the withheld text (the error's "
        "class, a fixed sentence{pull}). In process "
        "no client's text leaves the process"),
}
"""results.json ``assumptions.client_errors``: what ``[security] client_errors`` lets a
client's error texts tell the server (the same statement in both runtimes; on Flower
``assumptions.client_errors_by_client`` says what each client's node did); ``{pull}`` is
where :data:`CLIENT_ERRORS_PULL` goes (:func:`client_errors_statement`)."""

CLIENT_ERRORS_PULL = {
    "withheld": (
        " For a non-finite result of FEDORA's unstable pull the text adds the fixed "
        "tag \"FEDORA's pull diverged\": lr * lambda reached the pull's stability limit (a "
        "fact of the lambda a round reply carries) and the loss and its gradient at the start "
        "of that training were finite on the client's first training examples."),
    "full": " and, for a diverged pull, its fixed tag",
}
"""What :data:`CLIENT_ERRORS` adds for a run of a method whose round reply carries FEDORA's
``lambda`` (:func:`releases_lambda`): only its pull can diverge and so tag an error text."""

CLIENT_ERRORS_PULL_UNDECLARED = {
    "withheld": (
        " What the replies of {methods} carry is not declared where this statement is made (a "
        "method registered as a factory that names no class, or one this process has not "
        "registered): they may carry FEDORA's lambda, and the text its pull's tag."
        + CLIENT_ERRORS_PULL["withheld"]),
    "full": (CLIENT_ERRORS_PULL["full"] + ", possible as the replies of {methods} are not "
             "declared and may carry FEDORA's lambda"),
}
"""What :data:`CLIENT_ERRORS` adds where no method of the run declares ``lambda`` but some
method's reply entries cannot be read (:func:`releases_lambda` is ``None``): the pull's tag
is named as possible, with the methods whose replies are not declared (``{methods}``)."""


def releases_lambda(cfg: ExperimentConfig) -> bool | None:
    """Whether a method of ``cfg`` declares FEDORA's ``lambda`` among its round reply's entries
    (:meth:`FederatedAlgorithm.reply_entries`, the contract both runtimes enforce: FEDORA or a
    method built on it), read by :func:`~secure_fedora.algorithms.contract.reply_declarations`:
    ``True`` where one declares it, ``False`` where every method declares its replies and none
    carries it, ``None`` (unknown) where none declares it and some method's declarations
    cannot be read (a factory that names no class, a name this process has not registered)."""
    declared = reply_declarations(cfg.methods, cfg)
    if (ROUND, REPLY_LAMBDA) in declared.entries:
        return True
    return False if declared.complete else None


def client_errors_statement(cfg: ExperimentConfig) -> str:
    """results.json ``assumptions.client_errors`` of a run of ``cfg`` (both runtimes): its
    :data:`CLIENT_ERRORS` text, naming FEDORA's pull-divergence tag and the lambda it
    reveals where a method of the run releases lambdas (:func:`releases_lambda`), and as
    possible, naming the methods whose replies are not declared, where that is unknown
    (:data:`CLIENT_ERRORS_PULL_UNDECLARED`); never silent about a tag a reply may carry."""
    mode = cfg.security.client_errors
    lam = releases_lambda(cfg)
    if lam is None:
        undeclared = reply_declarations(cfg.methods, cfg).undeclared
        pull = CLIENT_ERRORS_PULL_UNDECLARED[mode].format(methods=", ".join(undeclared))
    else:
        pull = CLIENT_ERRORS_PULL[mode] if lam else ""
    return CLIENT_ERRORS[mode].format(pull=pull)


INPUTS_OUTSIDE_CONFIG = {
    "data": "given through the Python API (Experiment(data=...)), not by config.toml",
    "model": "given through the Python API (Experiment(model=...)), not by config.toml",
}
"""results.json ``assumptions.inputs_outside_config``: what the run's config cannot rebuild
(audits that rebuild the run from config.toml refuse such a run)."""


def inputs_outside_config_assumption(inputs: Sequence[str]) -> dict[str, Any]:
    """``{"inputs_outside_config": {name: why}}`` for the inputs given outside the config
    (``"data"``, ``"model"``); empty when the config describes the whole run."""
    if not inputs:
        return {}
    return {"inputs_outside_config": {name: INPUTS_OUTSIDE_CONFIG[name] for name in inputs}}


def inputs_outside_config(results: Mapping[str, Any] | None) -> list[str]:
    """The names under ``assumptions.inputs_outside_config`` of a results document (any
    malformed value counts as every input: nothing is rebuilt from a config it may not
    describe)."""
    if not isinstance(results, Mapping):
        return []
    assumptions = results.get("assumptions")
    if not isinstance(assumptions, Mapping) or "inputs_outside_config" not in assumptions:
        return []
    given = assumptions["inputs_outside_config"]
    if isinstance(given, Mapping) and all(k in INPUTS_OUTSIDE_CONFIG for k in given):
        return sorted(given)
    return sorted(INPUTS_OUTSIDE_CONFIG)


def _declaring_classes(names: Iterable[str]) -> list[tuple[str, type[FederatedAlgorithm]]]:
    """``(name, class)`` of each method in ``names`` whose registry entry names its class
    (a factory without ``algorithm`` declares nothing)."""
    out = []
    for name in names:
        cls = method_class(name)
        if cls is not None:
            out.append((name, cls))
    return out


def _method_assumptions(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the configured methods declare (:meth:`FederatedAlgorithm.assumptions`), in
    method order; two methods stating one key differently is a :class:`ConfigError` naming
    both and the key (results.json has one value per key: the run cannot state both)."""
    merged: dict[str, Any] = {}
    stated_by: dict[str, str] = {}
    for name, cls in _declaring_classes(cfg.methods):
        with method_hook(name, "assumptions(cfg)"):
            declared = cls.assumptions(cfg)
        for key, value in declared.items():
            if key in merged and merged[key] != value:
                raise ConfigError(
                    f"methods {stated_by[key]!r} and {name!r} state results.json assumption "
                    f"{key!r} differently ({merged[key]!r} vs {value!r}); results.json holds one "
                    "value per key: run them in separate runs, or make one of them state "
                    "another key")
            merged[key] = value
            stated_by.setdefault(key, name)
    return merged


def check_method_assumptions(cfg: ExperimentConfig) -> None:
    """Ask every method of ``cfg`` its assumptions as results.json will: a method whose
    ``assumptions`` raises (a :class:`~secure_fedora.core.plugins.PluginError`), or two
    methods stating one key differently (a :class:`ConfigError`), stop a run before it
    trains rather than when its results are written (both runtimes ask it first)."""
    _method_assumptions(cfg)


def _add_once(target: dict[str, Any], key: str, value: Any, path: str) -> None:
    if key in target:
        raise ValueError(f"results.json path {path} is produced twice (a derived entry may not "
                         "replace a method's own or another derived one)")
    target[key] = value


def build_results(
    cfg: ExperimentConfig,
    *,
    runtime: str,
    config_hash: str,
    metric: str,
    outcomes: Mapping[str, Mapping[str, Any]],
    privacy: Mapping[str, Any] | None,
    clients: Sequence[Mapping[str, Any]],
    compute: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
    assumptions: Mapping[str, Any] | None = None,
    runtime_keys: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results document.

    ``outcomes`` maps each method run to its :func:`method_entry`-shaped dict (the
    in-process ``MethodOutcome.to_json()``); ``privacy`` maps a method to its privacy summary
    (or is empty/None without DP), to which this adds the method's ``reply_entries``; ``clients`` is :func:`client_rows`' list; ``assumptions``
    adds runtime-specific assumptions (transport, key holder); ``runtime_keys`` adds
    runtime-specific top-level keys, none of which may be one of :data:`RESERVED_KEYS`.
    The document holds no NaN or infinity (:func:`~secure_fedora.core.files.finite_document`):
    written with ``allow_nan=False`` it is strict JSON, whatever a method reported.
    Derived entries are declared by the methods (no method name here):
    :meth:`~secure_fedora.algorithms.contract.FederatedAlgorithm.derived_rows` adds rows after
    the methods' own (FedAvg: ``methods.fedavg_ft``, the fine-tuned test metric) and
    :meth:`~secure_fedora.algorithms.contract.FederatedAlgorithm.comparisons` fills
    ``comparison`` (FEDORA: ``comparison.fedora_below_local``, the clients where its selected
    metric is below Local's, when both ran).
    """
    clash = RESERVED_KEYS & set(runtime_keys or {})
    if clash:
        raise ValueError(f"runtime keys {sorted(clash)} would replace shared results keys")
    methods = {name: {**o, "metric": metric} for name, o in outcomes.items()}
    comparison: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    stated = {**_assumptions(cfg), **(assumptions or {})}
    for name, cls in _declaring_classes(outcomes):
        with method_hook(name, "comparisons(name, outcomes)"):
            compared = cls.comparisons(name, outcomes)
        for key, value in compared.items():
            _add_once(comparison, key, value, f"comparison.{key}")
        with method_hook(name, "derived_assumptions(name, outcome, cfg)"):
            derived_stated = cls.derived_assumptions(name, outcomes[name], cfg)
        for key, value in derived_stated.items():
            if stated.setdefault(key, value) != value:
                raise ValueError(f"method {name!r} states assumption {key!r} differently from "
                                 "another method of the run")
        with method_hook(name, "derived_rows(name, outcome)"):
            rows = cls.derived_rows(name, outcomes[name])
        for row, per_client in rows.items():
            # the row's metric is of the method's final model: its round is the method's last
            selected = {**_summarize_measured(per_client), "round": int(outcomes[name]["rounds"])}
            _add_once(derived, row, {"name": row, "selected": selected, "metric": metric},
                      f"methods.{row}")
    for row, entry in derived.items():
        _add_once(methods, row, entry, f"methods.{row}")
    doc: dict[str, Any] = {
        "name": cfg.name,
        "version": __version__,
        "runtime": runtime,
    }
    if compute is not None:
        doc["compute"] = dict(compute)
    doc.update({
        "config_hash": config_hash,
        "data_fingerprint": data_fingerprint,
        # What methods.<name>.selected/final hold: "accuracy" or "auc" (follows the loss).
        "metric": metric,
        "loss": cfg.training.loss,
        "assumptions": stated,
        # what leaves a client beyond the accounted releases, and why (declared, both runtimes)
        "privacy": {name: {**body, "reply_entries": declared_reply_entries(name, cfg)}
                    for name, body in (privacy or {}).items()},
        "clients": list(clients),
        "methods": methods,
        "comparison": comparison,
    })
    doc.update(runtime_keys or {})
    return finite_document(doc)


def _summarize_measured(values: Sequence[float | None]) -> dict[str, Any]:
    """A derived row's summary of ``values`` (client order; ``None``: the client has no
    metric): mean, min, max and std of the others (``None`` when no client has one),
    ``per_client`` with ``null`` where one is missing, and ``missing_clients`` listing those."""
    from secure_fedora.runtimes.inprocess import summarize

    missing = [i for i, v in enumerate(values) if v is None]
    measured = [float(v) for v in values if v is not None]
    stats = summarize(measured) if measured else dict.fromkeys(("mean", "min", "max", "std"))
    if not missing:
        return stats
    return {**stats, "per_client": [None if v is None else round(float(v), 6) for v in values],
            "missing_clients": missing}


#: The per-round file of a run directory (both runtimes).
ROUNDS_CSV = "rounds.csv"

#: History-row fields that ``rounds.csv`` leaves out: wall-clock timings (Flower's round
#: seconds and its per-exchange breakdown), which results.json keeps.
ROUNDS_CSV_OMITS = frozenset({"seconds", "timing", "evaluation_timing"})


def rounds_csv_text(history: Sequence[Mapping[str, Any]]) -> str:
    """``rounds.csv``'s content for ``history`` (one row per round, in order): the columns are
    every field the rows hold but :data:`ROUNDS_CSV_OMITS`, in order of first appearance; a
    field a row lacks (the evaluation columns of a round that was not evaluated, a statistic of
    another method) and a ``None`` value are empty cells."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys and k not in ROUNDS_CSV_OMITS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def _same_cell(held: str, made: str) -> bool:
    if held == made:
        return True
    try:
        return float(held) == float(made)
    except ValueError:
        return False


def rounds_csv_holds(path: Path, history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``path`` is a readable ``rounds.csv`` holding the rows :func:`rounds_csv_text`
    makes of ``history``: the same cells, a number written with other digits for the same
    float counting as the same (False for a missing, unreadable, cut or edited file)."""
    try:
        held = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    made = list(csv.reader(io.StringIO(rounds_csv_text(history), newline="")))
    return len(held) == len(made) and all(
        len(a) == len(b) and all(_same_cell(x, y) for x, y in zip(a, b, strict=True))
        for a, b in zip(held, made, strict=True))


def write_rounds_csv(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> Path | None:
    """Replace ``run_dir/rounds.csv`` atomically with :func:`rounds_csv_text` of ``history``
    (the old content or the new one, never a mix); nothing is written for an empty history.
    Returns the path written, or None."""
    from secure_fedora.core.files import atomic_write_text

    if not history:
        return None
    path = Path(run_dir) / ROUNDS_CSV
    atomic_write_text(path, rounds_csv_text(history))
    return path


def remove_interrupted_result_writes(run_dir: Path) -> list[Path]:
    """Delete the partial copies that a process killed while writing one of its result files
    (:data:`RESULT_FILES`, the plots) left beside it in ``run_dir`` (the files themselves,
    replaced atomically, are whole and untouched). Call only while no other process writes
    them. Returns the files removed."""
    from secure_fedora.core.files import remove_interrupted_writes
    from secure_fedora.runtimes.plots import PLOT_FILES, PLOTS_FOLDER

    paths = [run_dir / name for name in RESULT_FILES]
    paths += [run_dir / PLOTS_FOLDER / name for name in PLOT_FILES]
    return [leftover for path in paths for leftover in remove_interrupted_writes(path)]


#: The results.json keys that state the process that wrote the document rather than the run
#: (the code's version, the compute it ran on): a resume that trains nothing keeps a document
#: that differs from its own only there. A runtime adds its own (Flower: its timings, node map,
#: events).
PROCESS_KEYS: frozenset[str] = frozenset({"version", "compute"})


def same_outcomes(held: Mapping[str, Any], made: Mapping[str, Any]) -> bool:
    """Whether the results document ``held`` states the run facts ``made`` (built from the
    run's checkpoints and records) states: run name, config hash, key-store extension, config
    amendments, and each configured method's selected and final figures."""
    keys = ("name", "config_hash", "keystore_extended", "config_amendments")
    if any(held.get(k) != made.get(k) for k in keys):
        return False
    mine, theirs = made.get("methods"), held.get("methods")
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return False
    # the methods' own rows (a derived row, e.g. fedavg_ft, has no "final"): a document an
    # older version wrote may lay derived rows out otherwise
    return all(isinstance(theirs.get(m), dict)
               and all(theirs[m].get(part) == body.get(part) for part in ("selected", "final"))
               for m, body in mine.items() if isinstance(body, dict) and "final" in body)


def _cut_to(made: dict[str, Any], appended: Mapping[tuple[str, ...], int]) -> dict[str, Any]:
    """``made`` with the list at each key path of ``appended`` cut to the length given there
    (the run's own record, as its checkpoint held it: what a resume appended is no difference,
    an edited, added or removed entry of the held document's record still is one)."""
    cut = json.loads(json.dumps(made))
    for (*parents, last), length in appended.items():
        mine = cut
        for key in parents:
            mine = mine.get(key) if isinstance(mine, dict) else None
        if isinstance(mine, dict) and isinstance(mine.get(last), list):
            mine[last] = mine[last][:length]
    return cut


def kept_results(path: Path, results: dict[str, Any], *, anchored: Callable[[], bool] | None,
                 warn: Callable[[str], None],
                 process_keys: Collection[str] = PROCESS_KEYS,
                 appended: Mapping[tuple[str, ...], int] | None = None) -> dict[str, Any] | None:
    """The results.json document at ``path`` when a resume that trained nothing keeps it as it
    is: without DP (``anchored`` None) a JSON object holding ``results`` but for
    ``process_keys`` and for what the resume appended to the records of ``appended`` (key
    path -> the record's length in the checkpoint it resumed, e.g. Flower's events); under DP
    ``anchored()`` says that the run's anchor.json (signed, the
    runtime checks it) anchors its bytes and the run as it stands, and it states the outcomes
    of ``results`` (:func:`same_outcomes`: a document an older version laid out otherwise is
    kept). None, with a ``warn`` naming why, when it is to be written again."""
    from secure_fedora.core.files import strict_json

    if not path.exists():
        warn(f"{path} was missing: written from the run's checkpoints")
        return None
    try:
        held = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        warn(f"{path} could not be read ({err}): written again from the run's checkpoints")
        return None
    made = json.loads(strict_json(results))
    if isinstance(held, dict):
        def ours(doc: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in doc.items() if k not in process_keys}

        # under DP the anchor alone vouches for the file: an edited compute or version
        # is not signed again
        if anchored is None and ours(held) == ours(_cut_to(made, appended or {})):
            return held
        if anchored is not None and anchored() and same_outcomes(held, made):
            return held
    warn(f"{path} does not state what the run's checkpoints and ledgers hold"
         f"{', and its anchor.json does not vouch for it' if anchored is not None else ''}: "
         "written again from them")
    return None


def write_run_results(run_dir: Path, results: dict[str, Any],
                      history: Sequence[Mapping[str, Any]], *, trained_nothing: bool,
                      anchor: Callable[[], bool] | None, anchored: Callable[[], bool] | None,
                      warn: Callable[[str], None],
                      process_keys: Collection[str] = PROCESS_KEYS,
                      appended: Mapping[tuple[str, ...], int] | None = None) -> dict[str, Any]:
    """Write a finished run's results.json (``results``, strict JSON, atomically) and, under
    DP, its anchor (``anchor()`` signs and writes it, True when it replaced anchor.json; see
    :func:`~secure_fedora.secure.anchor.write_anchor`); returns the results document the run
    states. A resume that ``trained_nothing`` (both runtimes' algorithm) keeps the run's files
    whole, so that an anchor.json copy kept apart still verifies: rounds.csv when it holds
    ``history`` (:func:`rounds_csv_holds`), results.json when :func:`kept_results` keeps it
    (then returned), anchor.json when it anchors the run as it stands (under DP, a kept
    results.json is one whose anchor ``anchored()`` vouched for: ``anchor()`` is not called
    again); it writes again, with a ``warn``, only one that is missing or damaged (e.g. after
    a kill between the last checkpoint and results.json)."""
    from secure_fedora.core.files import atomic_write_text, strict_json
    from secure_fedora.secure.anchor import ANCHOR_FILENAME

    if trained_nothing and not rounds_csv_holds(run_dir / ROUNDS_CSV, history):
        warn(f"{run_dir / ROUNDS_CSV} was missing or did not hold the run's rounds: written "
             "again from its checkpoints")
        write_rounds_csv(run_dir, history)
    kept = kept_results(run_dir / "results.json", results, anchored=anchored, warn=warn,
                        process_keys=process_keys, appended=appended) if trained_nothing else None
    if kept is None:
        atomic_write_text(run_dir / "results.json", strict_json(results))
    else:
        results = kept
    # under DP a kept results.json is one ``anchored()`` found anchored as the run stands: the
    # anchor is kept too, without building and signing its document a second time
    if anchor is not None and (kept is None or anchored is None) and anchor() and trained_nothing:
        warn(f"{run_dir / ANCHOR_FILENAME} was missing or did not anchor the run as it stands: "
             "signed again (a copy of the earlier one kept apart no longer verifies the run)")
    return results
