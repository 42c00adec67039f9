"""Run directories that never mix two runs or lose one: checked before anything is written.

``secure-fedora run`` calls :func:`prepare_run_dir` before it writes a byte:

- a fresh run needs a directory that does not exist or is empty, or that holds only the
  config copy of this very configuration (a start killed before it wrote anything else but
  the record of the key store it extended, :data:`KEYSTORE_RECORD`); one
  that holds anything
  (another run's ledgers, results, checkpoints, or any other file) is refused; a fresh run
  that fails before writing anything but its config copy withdraws it
  (:func:`withdraw_unstarted_run`);
- ``--resume`` (and the Python API's ``Experiment.run(resume=True)``, whose non-private runs
  without envelopes hold no ``config.toml``; a private one writes it before its first ledger
  entry, one with envelopes before its envelope keys) needs the directory's ``config.toml`` to be the same configuration (same
  config hash) and a checkpoint to continue from: the configured methods' checkpoints must
  exist in order (a later method's checkpoint without an earlier method's is a gap), each
  readable, intact and written for this configuration; otherwise nothing is written. A run
  A config that differs from the run's only in an amendable key (:data:`AMENDABLE_KEYS`,
  ``fedora.max_pull``) resumes it: ``config.toml`` stays as written, the change is recorded in
  ``amendments.json`` (:func:`record_amendments`), and a later resume compares with the
  amended configuration. A run
  killed before its first checkpoint has none, but its first method's ledgers or release
  journals already record releases: it is resumed from the start (the journaled releases are
  re-made, not accounted again). A DP run killed before its first release (every ledger of
  its first method opened and empty, its public keys possibly published) is resumed from the
  start too, under the keys it published, and so is one killed before its first method's
  ledger folder was renamed into place (its config copy and the hidden folder of an
  interrupted creation, holding empty ledgers only), and a run without privacy that holds only
  what it writes before its first checkpoint (its config copy, envelope keys and message
  state, interrupted checkpoint writes); otherwise there is nothing to resume;
- the default directory ``runs/<name>-<timestamp>`` stays inside ``runs/`` (the config's
  ``name`` is restricted to safe characters, and the resolved path is checked again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from privacy.errors import ToolkitError
from privacy.paths import path_problem
from secure_fedora.core.config import (
    ConfigError,
    ExperimentConfig,
    config_document,
    config_hash,
    load_config,
)

__all__ = ["AMENDABLE_KEYS", "AMENDMENTS", "CONFIG_COPY", "KEYSTORE_RECORD", "RUNS_FOLDER",
           "RunDirError", "RunDirUnavailableError", "amended_config", "amended_value",
           "amendment_applies_to",
           "amendment_has_rounds",
           "amendment_readers", "amendment_round",
           "check_fresh_run_dir", "check_resumable", "config_changes", "config_value",
           "default_deploy_dir", "default_run_dir", "default_sweep_dir",
           "prepare_run_dir", "record_amendments", "record_stop", "recorded_amendments",
           "recorded_keystore_extension", "resume_binding",
           "withdraw_unstarted_run"]

RUNS_FOLDER = Path("runs")
CONFIG_COPY = "config.toml"
#: The parties a DP run added to its key store, written (atomically) into the run directory
#: when the store is extended, so that a run interrupted before its first results.json still
#: lists them (``keystore_extended``) once resumed.
KEYSTORE_RECORD = "keystore_extended.json"
#: The run directory's record of the config keys resumes changed (config.toml is never
#: rewritten): a JSON list of ``{"key", "from", "to", "method", "resumed_at_round",
#: "effective_from_round", "applies_to"}`` (``applies_to``: reading method -> first round).
AMENDMENTS = "amendments.json"
#: The keys a resume may change. ``fedora.max_pull`` only bounds the lambda a client computed
#: (exactly, or released noised and accounted): post-processing, so the plan, the accounting
#: and every ledger entry stay valid under the new value.
AMENDABLE_KEYS = ("fedora.max_pull",)
#: Where a private run records the round it stopped in before any of that round's uploads
#: left (a diverged client's training): ``{"method", "round"}``.
STOPPED = "stopped.json"


class RunDirError(ToolkitError, ValueError):
    """A run directory that cannot be used for this run; the message names the directory."""


class RunDirUnavailableError(RunDirError):
    """A run directory that cannot be used now whatever the run (another process holds it,
    or it cannot be opened): a caller's advice about its own arguments does not apply."""


#: run directories this process holds (real path -> depth), so that the CLI and the
#: Simulation it starts share one lock: flock on a second descriptor would refuse its own process
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, create: bool = False) -> Iterator[None]:
    """Hold ``run_dir`` exclusively for this process (``flock`` on the directory itself, so no
    file is added) while the block runs: a second process that runs, resumes or sweeps into it
    meanwhile gets a RunDirError at once instead of writing beside this one. With ``create`` a
    missing directory is made first and removed again if it is still empty at the end. A path
    that is not a directory (or a missing one without ``create``) is not locked: the checks
    that follow refuse it with their own message. A directory that cannot be opened for
    reading (one the user may write but not read) is a RunDirError, nothing written.
    Re-entrant within one process."""
    made = False
    if create and not os.path.lexists(run_dir):
        try:
            run_dir.mkdir(parents=True)
            made = True
        except FileExistsError:  # another process made it first; the lock decides
            pass
        except OSError as err:  # a symbolic link loop, a file or a closed folder on its way
            why = path_problem(run_dir)
            if why in (None, "does not exist"):
                why = f"cannot be created ({err.strerror or err})"
            raise RunDirUnavailableError(f"run directory {run_dir} {why}; nothing was "
                                         "written") from None
    if not run_dir.is_dir():
        yield
        return
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:  # e.g. a directory one may write but not read (mode 0300)
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise RunDirUnavailableError(
            f"cannot open run directory {run_dir} ({err.strerror}): a run needs a directory it "
            f"can read as well as write (e.g. chmod u+rwx {run_dir}), or choose another; "
            "nothing was written") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if made:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise RunDirUnavailableError(
                f"run directory {run_dir} is in use by another process (a run or resume writing "
                "it); wait until it ends, or stop it, then try again") from None
        except OSError as err:  # a file system without directory locks (some NFS): run as before
            logging.getLogger(__name__).warning(
                "cannot lock run directory %s (%s): nothing stops another process from writing "
                "it at the same time", run_dir, err.strerror)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            if made:
                with contextlib.suppress(OSError):  # not empty: the run wrote something
                    run_dir.rmdir()
    finally:
        os.close(fd)


def default_run_dir(cfg: ExperimentConfig, runs: Path = RUNS_FOLDER) -> Path:
    """``runs/<name>-<timestamp>``; refuses a name that would resolve outside ``runs``."""
    return _inside_runs(cfg, f"-{time.strftime('%Y%m%d-%H%M%S')}", runs, "run")


def default_sweep_dir(cfg: ExperimentConfig, runs: Path = RUNS_FOLDER) -> Path:
    """``runs/<name>-sweep``: one directory per config name (no timestamp), so the same
    ``secure-fedora sweep CONFIG`` resumes it; refuses a name that would resolve outside
    ``runs``."""
    return _inside_runs(cfg, "-sweep", runs, "sweep")


def default_deploy_dir(cfg: ExperimentConfig, runs: Path = RUNS_FOLDER) -> Path:
    """``runs/<name>-deploy``: the workdir of ``deploy local`` without ``--workdir``, one per
    config name (no timestamp, so ``deploy local --resume`` finds it again); refuses a name
    that would resolve outside ``runs``."""
    return _inside_runs(cfg, "-deploy", runs, "deployment")


def _inside_runs(cfg: ExperimentConfig, suffix: str, runs: Path, what: str) -> Path:
    """``runs/<name><suffix>``; RunDirError naming the ``what`` when the config's name would
    resolve outside ``runs``."""
    path = runs / f"{cfg.name}{suffix}"
    if path.resolve().parent != runs.resolve():
        raise RunDirError(f"name {cfg.name!r} would place the {what} outside {runs}/")
    return path


def _names(cli: bool) -> tuple[str, str]:
    """How errors name the run directory and resuming to their caller: the CLI's ``--out`` and
    ``--resume``, or the Python API's ``run_dir`` and ``run(resume=True)``."""
    return ("--out", "--resume") if cli else ("run_dir", "run(resume=True)")


def _contents(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())


def prepare_run_dir(run_dir: Path, cfg: ExperimentConfig, config_bytes: bytes,
                    resume: bool) -> None:
    """Check ``run_dir`` for this run, then (fresh runs only) create it and write
    ``config.toml`` from ``config_bytes``. Raises :class:`RunDirError` (or ``ConfigError`` for
    an unreadable stored config) before writing anything when the directory holds another
    run, is not empty on a fresh start, or cannot be resumed."""
    from secure_fedora.core.files import atomic_write_bytes

    if resume:
        check_resumable(run_dir, cfg)
        return
    check_fresh_run_dir(run_dir, cfg)
    try:
        atomic_write_bytes(run_dir / CONFIG_COPY, config_bytes)
    except OSError as err:  # named for the run directory, not for the temporary file's name
        raise RunDirError(f"cannot write {CONFIG_COPY} in run directory {run_dir}: "
                          f"{err.strerror or err}; nothing of the run was written") from err


def check_fresh_run_dir(run_dir: Path, cfg: ExperimentConfig, cli: bool = True) -> None:
    """RunDirError unless ``run_dir`` can take a fresh run of ``cfg`` without overwriting
    anything: it does not exist, is empty, or holds only ``config.toml`` of this very
    configuration (what the CLI writes before the run starts), with at most the record of the
    key store that start extended (:data:`KEYSTORE_RECORD`). The message names the CLI's
    options, or with ``cli`` False the Python API's arguments."""
    problem = path_problem(run_dir)
    if problem == "is not a directory":
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    if problem is not None and problem != "does not exist":  # a loop, or out of reach
        out, _ = _names(cli)
        raise RunDirError(f"run directory {run_dir} {problem}; name another {out}")
    if problem is None:
        held = _contents(run_dir)
        # a start of this very run killed before it wrote anything else (but the record of
        # the key store it extended, which the run keeps)
        if CONFIG_COPY in held and set(held) <= {CONFIG_COPY, KEYSTORE_RECORD} \
                and (run_dir / CONFIG_COPY).is_file() and _same_config(run_dir / CONFIG_COPY, cfg):
            held = []
        if held:
            shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
            out, resume = _names(cli)
            raise RunDirError(
                f"run directory {run_dir} is not empty (holds {shown}); a new run needs a new "
                f"or empty {out}, and {resume} continues the run it holds"
            )


def _same_config(stored: Path, cfg: ExperimentConfig) -> bool:
    """Whether ``stored`` is a valid config with ``cfg``'s config hash."""
    try:
        return config_hash(load_config(stored, plugins_from_folder=False)) == config_hash(cfg)
    except ConfigError:
        return False


def withdraw_unstarted_run(run_dir: Path, created: bool) -> bool:
    """Undo :func:`prepare_run_dir` for a fresh run that failed before it wrote anything but
    its ``config.toml`` (a refused device, data or model): remove the copy, the empty folders
    and, when ``created``, the directory itself, so that the corrected config can start in the
    same ``--out``. Anything else in the directory keeps all of it. Returns True if withdrawn."""
    if not run_dir.is_dir():
        return False
    entries = list(run_dir.rglob("*"))
    files = [e for e in entries if not e.is_dir()]
    if [f.relative_to(run_dir) for f in files] != [Path(CONFIG_COPY)]:
        return False
    files[0].unlink()
    for folder in sorted((e for e in entries if e.is_dir()), key=lambda e: len(e.parts), reverse=True):
        folder.rmdir()
    if created:
        run_dir.rmdir()
    return True


def config_value(cfg: ExperimentConfig, key: str) -> Any:
    """The value of the dotted config ``key`` (``"section.name"``) in ``cfg``."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _with_value(cfg: ExperimentConfig, key: str, value: Any) -> ExperimentConfig:
    section, name = key.split(".")
    part = getattr(cfg, section).model_copy(update={name: value})
    return cfg.model_copy(update={section: part})


def _read_record(path: Path, what: str, shape: Callable[[Any], str | None], remedy: str,
                 prefix: str = "") -> Any:
    """The JSON value of the run-directory record ``path`` (None when there is none); a
    record that cannot be read, is not JSON or whose value ``shape`` faults (it returns
    why, or None) is never read as absent: RunDirError naming the file, what it records
    (``what``) and ``remedy``, after ``prefix`` (how the caller resumes)."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except OSError as err:
        why = f"cannot be read ({err.strerror or err})"
    except ValueError as err:  # not JSON, or not UTF-8
        why = f"is not JSON ({err})"
    else:
        why = shape(doc)
        if why is None:
            return doc
    raise RunDirError(f"{prefix}{path} {why}, so {what} cannot be read; {remedy}")


def _amendments_shape(doc: Any) -> str | None:
    if isinstance(doc, list) and all(isinstance(a, dict) and a.get("key") in AMENDABLE_KEYS
                                     and "to" in a for a in doc):
        return None
    return f"is not a list of config amendments of {list(AMENDABLE_KEYS)}"


def recorded_amendments(run_dir: Path) -> list[dict[str, Any]]:
    """The amendments ``run_dir`` records (:data:`AMENDMENTS`), oldest first; [] when it has
    none. RunDirError for a record that is unreadable or names a key that is not amendable."""
    doc = _read_record(run_dir / AMENDMENTS, "the run's config amendments", _amendments_shape,
                       "restore it from a copy (config.toml holds the run's original config)")
    return [] if doc is None else doc


def amended_config(cfg: ExperimentConfig, amendments: list[dict[str, Any]]) -> ExperimentConfig:
    """``cfg`` (the run's ``config.toml``) with each recorded amendment's ``to`` applied in
    order: the configuration the run continues under."""
    for amendment in amendments:
        cfg = _with_value(cfg, amendment["key"], amendment["to"])
    return cfg


def config_changes(run_cfg: ExperimentConfig, cfg: ExperimentConfig) -> list[dict[str, Any]] | None:
    """How ``cfg`` differs from the run's configuration ``run_cfg``: [] when not at all (same
    config hash), ``{"key", "from", "to"}`` per changed key when only :data:`AMENDABLE_KEYS`
    differ, None when anything else does."""
    if config_hash(run_cfg) == config_hash(cfg):
        return []
    changes, probe = [], cfg
    for key in AMENDABLE_KEYS:
        old, new = config_value(run_cfg, key), config_value(cfg, key)
        if old != new:
            changes.append({"key": key, "from": old, "to": new})
            probe = _with_value(probe, key, old)
    return changes if config_hash(probe) == config_hash(run_cfg) else None


def resume_binding(run_dir: Path, cfg: ExperimentConfig, resume: str = "--resume"
                   ) -> tuple[str, list[dict[str, Any]]]:
    """The config hash that binds a resume of ``run_dir`` under ``cfg`` to the run (that of
    its ``config.toml``, which its checkpoints, results.json and anchor carry; ``cfg``'s own
    without a config copy) and the amendments this resume makes (:func:`config_changes` from
    the run's amended configuration). RunDirError when ``cfg`` changes anything else, or the
    stored configuration is unusable; reads only."""
    stored = run_dir / CONFIG_COPY
    if not stored.is_file():
        return config_hash(cfg), []
    try:
        stored_cfg = load_config(stored)
    except ConfigError as err:
        raise RunDirError(f"{resume}: the run's stored configuration is unusable: {err}") from None
    run_cfg = amended_config(stored_cfg, recorded_amendments(run_dir))
    changes = config_changes(run_cfg, cfg)
    if changes is None:
        out = "--out" if resume == "--resume" else "run_dir"
        if _results_config_hash(run_dir) == config_hash(cfg):
            raise RunDirError(
                f"{resume}: {stored} does not hold the run's configuration: the run's "
                f"results.json records the hash of the given config ({_differing_keys(run_cfg, cfg)} "
                "differ), so config.toml was changed or damaged after the run; restore it from a "
                "copy of the run directory; nothing was written")
        raise RunDirError(
            f"{resume}: {run_dir} holds a run of another configuration ({stored} differs from "
            f"the given config in more than {', '.join(AMENDABLE_KEYS)}, the only keys a resume "
            f"may change: {_differing_keys(run_cfg, cfg)}); resume with the config it was "
            f"started with, or use a new {out}"
        )
    return config_hash(stored_cfg), changes


def _flat_document(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg``'s values by dotted key (a table's keys below it; lists as one value)."""
    flat: dict[str, Any] = {}

    def walk(doc: Mapping[str, Any], prefix: str) -> None:
        for name, value in doc.items():
            if isinstance(value, Mapping) and value:
                walk(value, f"{prefix}{name}.")
            else:
                flat[f"{prefix}{name}"] = value
    walk(config_document(cfg), "")
    return flat


def _differing_keys(run_cfg: ExperimentConfig, cfg: ExperimentConfig, shown: int = 3) -> str:
    """The dotted keys where ``cfg`` differs from the run's ``run_cfg``, each with both values
    (the first ``shown``, then how many more), for a refused resume's message."""
    run_doc, doc = _flat_document(run_cfg), _flat_document(cfg)
    keys = [k for k in sorted(set(run_doc) | set(doc))
            if k not in AMENDABLE_KEYS and run_doc.get(k) != doc.get(k)]
    def shown_value(d: dict[str, Any], k: str) -> str:
        return repr(d[k]) if k in d else "unset"

    parts = [f"{k} = {shown_value(run_doc, k)} in the run, {shown_value(doc, k)} given"
             for k in keys[:shown]]
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return "; ".join(parts) + more if parts else "their values differ in type only"


def _results_config_hash(run_dir: Path) -> str | None:
    """The ``config_hash`` that ``run_dir``'s results.json records, or None where it has
    none or cannot be read (this only chooses a message: a refusal follows either way)."""
    try:
        doc = json.loads((run_dir / "results.json").read_bytes())
    except (OSError, ValueError):
        return None
    value = doc.get("config_hash") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _checkpointed_rounds(run_dir: Path, cfg: ExperimentConfig) -> dict[str, int | None]:
    """Each method's progress as its checkpoint in ``run_dir`` records it, every checkpoint
    read once: the last checkpointed round, 0 without a checkpoint, None once the checkpoint
    holds the method's outcome (finished: a resume trains it no more)."""
    from secure_fedora.runtimes.inprocess import load_checkpoint

    progress: dict[str, int | None] = {}
    for m in cfg.methods:
        path = run_dir / "checkpoints" / f"{m}.pt"
        if not path.is_file():
            progress[m] = 0
            continue
        state = load_checkpoint(path)
        progress[m] = None if state.get("outcome") is not None else int(state["round"])
    return progress


def amendment_readers(cfg: ExperimentConfig, key: str) -> list[str]:
    """The methods of ``cfg``, in order, that read the amendable ``key``: those whose class
    declares it in ``amendable_keys`` (FEDORA and its subclasses for ``fedora.max_pull``), and
    a method registered as a factory that names no class (it may read it)."""
    from secure_fedora.algorithms.contract import method_class

    readers = []
    for name in cfg.methods:
        cls = method_class(name)
        if cls is None or key in getattr(cls, "amendable_keys", ()):
            readers.append(name)
    return readers


def amendment_applies_to(cfg: ExperimentConfig, key: str, method: str,
                         effective: int) -> dict[str, int]:
    """Where an amendment of ``key`` made while ``method`` is in progress, applying from its
    round ``effective``, takes effect: each reader (:func:`amendment_readers`) from ``method``
    on, with its first round under the new value (``effective`` for ``method``, 1 for those
    after it); {} when no remaining method reads ``key``. Both runtimes record it."""
    methods = list(cfg.methods)
    return {m: effective if m == method else 1 for m in amendment_readers(cfg, key)
            if methods.index(m) >= methods.index(method)}


def amendment_has_rounds(cfg: ExperimentConfig, applies_to: Mapping[str, int]) -> bool:
    """Whether an amendment applying from ``applies_to`` (reading method -> first round under
    the new value, :func:`amendment_applies_to`) bounds any round of ``cfg``: one made in a
    method's last round (re-made under the old value) bounds none of it."""
    return any(r <= cfg.training.rounds for r in applies_to.values())


def check_amendable(run_dir: Path, cfg: ExperimentConfig, changes: list[dict[str, Any]],
                    cli: bool = True) -> None:
    """RunDirError, read-only, when a resume would amend (``changes``, from
    :func:`resume_binding`) a key whose every reader (:func:`amendment_readers`) has finished,
    or that no method of the run reads: no round is left for the new value to apply to, so
    recording it would only change results.json and the anchor."""
    if not changes:
        return
    out, resume = _names(cli)
    remedy = (f"a new run in a new {out} applies it (resuming with the run's own config "
              "writes any result it lacks); nothing was written")
    progress = _checkpointed_rounds(run_dir, cfg)
    if all(r is None for r in progress.values()):
        shown = ", ".join(f"{c['key']} = {c['to']} (the run has {c['from']})" for c in changes)
        raise RunDirError(
            f"{resume}: the run in {run_dir} has finished (every method's last round is "
            f"checkpointed), so {shown} has no round left to apply to; {remedy}")
    for c in changes:
        readers = amendment_readers(cfg, c["key"])
        shown = f"{c['key']} = {c['to']} (the run has {c['from']})"
        if not readers:
            raise RunDirError(
                f"{resume}: no method of the run in {run_dir} ({', '.join(cfg.methods)}) reads "
                f"{c['key']}, so {shown} has no round to apply to; resume with the run's own "
                "config; nothing was written")
        if all(progress[m] is None for m in readers):
            raise RunDirError(
                f"{resume}: {shown} applies only to {', '.join(readers)}, which "
                f"{'has' if len(readers) == 1 else 'have'} finished in the run in {run_dir} "
                "(last round checkpointed), so it has no round left to apply to; resume with "
                f"the run's own config to finish the run, or start a new run in a new {out} to "
                "apply it; nothing was written")
    # where the resume continues, as the in-process runtime resumes: the first method not
    # finished, from the round after its checkpoint's
    method = next(m for m in cfg.methods if progress[m] is not None)
    start = int(progress[method] or 0) + 1
    effective = amendment_round(run_dir, method, start, cfg.privacy.enabled, resume)
    for c in changes:
        if not amendment_has_rounds(cfg, amendment_applies_to(cfg, c["key"], method, effective)):
            raise RunDirError(
                f"{resume}: {c['key']} = {c['to']} (the run has {c['from']}) would apply from "
                f"round {effective} of {method!r}, after its last round "
                f"({cfg.training.rounds}): the rounds the run released in are re-made as they "
                "were, so no round is left to run under it; resume with the run's own config "
                f"to finish the run, or start a new run in a new {out} to apply it; nothing was "
                "written")



def record_amendments(run_dir: Path, changes: list[dict[str, Any]], method: str | None,
                      resumed_at_round: int | None, effective_from_round: int | None,
                      applies_to: dict[str, dict[str, int]] | None = None
                      ) -> list[dict[str, Any]]:
    """Append ``changes`` (:func:`config_changes`) to ``run_dir``'s :data:`AMENDMENTS`
    (written atomically, before anything runs under them), each with the method and round
    the resume continues from, the round of that method from which the new value applies
    (None: every method had finished) and, where given, ``applies_to[key]``: each method that
    reads the key and runs under the new value, with its first such round; returns the full
    record."""
    from secure_fedora.core.files import atomic_write_text

    record = recorded_amendments(run_dir) + [
        {**c, "method": method, "resumed_at_round": resumed_at_round,
         "effective_from_round": effective_from_round,
         **({"applies_to": applies_to[c["key"]]} if applies_to is not None else {})}
        for c in changes]
    atomic_write_text(run_dir / AMENDMENTS, json.dumps(record, indent=2) + "\n")
    return record


def record_stop(run_dir: Path, method: str, rnd: int) -> None:
    """Record (atomically) that ``method`` stopped in round ``rnd`` before any upload of the
    round left: only its admitted releases (ledger and journal) exist."""
    from secure_fedora.core.files import atomic_write_text

    atomic_write_text(run_dir / STOPPED, json.dumps({"method": method, "round": rnd}) + "\n")


def _last_admitted_round(run_dir: Path, method: str) -> int:
    """The latest round of any release entry in ``method``'s ledgers (0: none)."""
    from privacy.envelope import ledger_files
    from privacy.ledger import read_ledger

    rounds = [0]
    for ledger in ledger_files(run_dir / "ledgers" / method):
        rounds += [int(e["round"]) for e in read_ledger(ledger)
                   if isinstance(e.get("round"), int) and "mechanism" in e]
    return max(rounds)


def amendment_round(run_dir: Path, method: str, start_round: int, private: bool,
                    resume: str = "--resume") -> int:
    """The first round of ``method`` a resume from ``start_round`` may run under an amended
    value. Without privacy ``start_round``. Under DP every round the stopped run admitted
    releases in is re-made as it was (its journal pins them), so the new value applies after
    the last such round ``R``, or from ``R`` itself when the run recorded that it stopped in
    ``R`` before any of its uploads left (:func:`record_stop`): then nothing computed under
    the old value after the admission left, and ``R``'s admitted releases (the starting model
    and the noised lambda, which the amended key only post-processes) are re-made unchanged.
    A stop record that cannot be read is RunDirError (:func:`recorded_stop`), not absent."""
    if not private:
        return start_round
    last = _last_admitted_round(run_dir, method)
    stop = recorded_stop(run_dir, resume)
    stopped_here = stop is not None and stop["method"] == method and stop["round"] == last
    return max(start_round, last if stopped_here else last + 1)


def _stop_shape(doc: Any) -> str | None:
    if isinstance(doc, dict) and isinstance(doc.get("method"), str) \
            and type(doc.get("round")) is int:
        return None
    return 'is not a JSON object {"method": NAME, "round": N}'


def recorded_stop(run_dir: Path, resume: str = "--resume") -> dict[str, Any] | None:
    """The method and round :data:`STOPPED` records (:func:`record_stop`), None when the run
    recorded no stop. Reads only. A record that cannot be read is not read as absent:
    RunDirError naming the file (``resume`` names how the caller resumes)."""
    return _read_record(
        run_dir / STOPPED, "the round the run stopped in before its uploads left", _stop_shape,
        "move it away (the amended value then applies from the round after the last one the "
        "run released in, the conservative choice), then resume", f"{resume}: ")


def amended_value(amendments: list[dict[str, Any]], key: str, base: Any, method: str,
                  methods: list[str], rnd: int) -> Any:
    """The value of ``key`` under which ``method`` runs round ``rnd``: ``base`` (config.toml's)
    with each amendment applied from its ``effective_from_round`` where it was made while
    ``method`` was in progress, from round 1 where ``method`` started after it."""
    value = base
    for a in amendments:
        if a["key"] != key or a.get("method") not in methods or method not in methods:
            continue
        if a["method"] == method:
            if rnd >= int(a.get("effective_from_round") or a.get("resumed_at_round") or 1):
                value = a["to"]
        elif methods.index(a["method"]) < methods.index(method):
            value = a["to"]
    return value


def _records_releases(run_dir: Path, method: str) -> bool:
    """True when ``method``'s ledgers or release journals in ``run_dir`` hold any bytes (a
    nonce state file, ``*.nonces.jsonl``, is no ledger and records no release)."""
    from privacy.envelope import ledger_files

    folder = run_dir / "ledgers" / method
    if not folder.is_dir():
        return False
    return any(p.is_file() and p.stat().st_size > 0
               for p in [*ledger_files(folder), *folder.glob("*.journal")])


def _closed_ledgers(run_dir: Path, method: str) -> bool:
    """True when a ledger of ``method`` in ``run_dir`` ends with its close entry: the method
    finished, and its outcome checkpoint (written before the close entries) existed."""
    from privacy.envelope import ledger_files
    from privacy.ledger import CLOSE, LedgerError, read_ledger

    for ledger in ledger_files(run_dir / "ledgers" / method):
        try:
            entries = read_ledger(ledger)
        except LedgerError:
            continue  # damaged ledgers are refused where they are read
        if entries and entries[-1].get("mechanism") == CLOSE:
            return True
    return False


def recorded_as_finished(run_dir: Path, method: str) -> bool:
    """True when ``run_dir``'s results.json (written once every method finished) records
    ``method``'s outcome; reads only, and a results.json that cannot be read records
    nothing."""
    try:
        doc = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("methods"), dict) \
        and method in doc["methods"]


def _opened_unreleased(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """True when a DP run's first method opened its ledgers (every client's file exists) and
    none holds a byte: it was killed before its first release. A ledger entry is fsynced
    before anything of its release leaves (the write-ahead order of ``privacy.pipeline``), so
    nothing was released; ledgers that are missing (lost) prove nothing and do not count."""
    if not cfg.privacy.enabled:
        return False
    from privacy.identity import client_ids

    folder = run_dir / "ledgers" / cfg.methods[0]
    ledgers = [folder / f"{cid}.jsonl" for cid in client_ids(cfg.data.num_clients)]
    return all(p.is_file() and p.stat().st_size == 0 for p in ledgers)


# what a run without privacy writes before its first checkpoint: its config copy, its
# envelope keys and message state (reset by every process), interrupted checkpoint writes
_BEFORE_FIRST_CHECKPOINT = frozenset({CONFIG_COPY, AMENDMENTS, STOPPED, "keys", "transport",
                                      "checkpoints"})


def _plain_unstarted(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """True when a run without privacy, bound to this configuration by its config copy, holds
    nothing but what it writes before its first checkpoint: it is started again (nothing of it
    is reused but its envelope keys)."""
    return not cfg.privacy.enabled and {p.name for p in run_dir.iterdir()} <= _BEFORE_FIRST_CHECKPOINT


def _private_unstarted(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """True when a DP run, bound to this configuration by its config copy, holds nothing but
    it, the record of the key store it extended and the hidden folders of ledger creations
    that were interrupted (empty ledgers): it was killed before its first method's ledger
    folder was renamed into place, so before any release (its keys are published after it)
    and it is started again."""
    if not cfg.privacy.enabled or not {p.name for p in run_dir.iterdir()} <= \
            {CONFIG_COPY, KEYSTORE_RECORD, AMENDMENTS, STOPPED, "ledgers"}:
        return False
    from secure_fedora.secure.private import interrupted_ledger_creations

    ledgers = run_dir / "ledgers"
    if not ledgers.exists():
        return True
    return ledgers.is_dir() and not ledgers.is_symlink() and \
        sorted(ledgers.iterdir()) == interrupted_ledger_creations(ledgers)


# the run's outputs (name -> whether it is a directory), written as it goes and at its end
_RUN_OUTPUTS = {"results.json": False, "rounds.csv": False, "plots": True, "checkpoints": True}
#: The folder of a CLI run's plots and the files drawn there (defined here, not in ``plots``,
#: so that checking a run directory imports no matplotlib).
PLOTS_FOLDER = "plots"
PLOT_FILES = ("accuracy_per_round.png", "per_client_accuracy.png", "relatedness.png")


def _nonce_note(run_dir: Path) -> str:
    """A sentence naming the nonce state files in ``ledgers/`` and ``ledgers/<method>/`` (""
    when there are none), which are not ledgers and record no release."""
    from privacy.envelope import nonce_files

    root = run_dir / "ledgers"
    if not root.is_dir() or root.is_symlink():
        return ""
    found = [*nonce_files(root), *(p for sub in sorted(root.iterdir()) if sub.is_dir()
                                   for p in nonce_files(sub))]
    if not found:
        return ""
    shown = ", ".join(p.relative_to(run_dir).as_posix() for p in found[:3])
    return (f"; {shown}{' and more' if len(found) > 3 else ''}"
            f" {'is a nonce state file' if len(found) == 1 else 'are nonce state files'} (a"
            " Flower node's replay-protection memory), not ledgers: they record no release")


def _refuse_nonce_only_folders(run_dir: Path, cfg: ExperimentConfig, resume: str) -> None:
    """RunDirError for a configured method's ledger folder that holds nonce state files
    (``*.nonces.jsonl``) but no ledger: a DP run creates a method's folder holding every
    client's ledger, so its ledgers were lost or the folder is not this run's, and the nonce
    files (which record no release) cannot stand in for them. Reads only."""
    from privacy.envelope import ledger_files, nonce_files

    for method in cfg.methods:
        folder = run_dir / "ledgers" / method
        if not folder.is_dir() or ledger_files(folder):
            continue
        found = nonce_files(folder)
        if found:
            raise RunDirError(
                f"{resume}: {folder} holds {', '.join(p.name for p in found[:3])}"
                f"{' and more' if len(found) > 3 else ''} but no ledger: a nonce state file"
                " (*.nonces.jsonl, a Flower node's replay-protection memory) is not a ledger"
                " and records no release, and this run creates a method's ledger folder with"
                " every client's ledger, so its ledgers were lost or the folder is not this"
                " run's; restore the ledgers from a copy, or move the folder away, then"
                " resume; nothing was written")


def _start_again(run_dir: Path, resume: str) -> str:
    """What to do instead of resuming a directory with nothing to resume from: a directory that
    that is empty (a run killed before it wrote anything) may take a run without ``resume``."""
    if not any(run_dir.iterdir()):
        return f"it is empty: start the run again without {resume}, here or in a new directory"
    return "start a new run in a new directory"


def check_resumable(run_dir: Path, cfg: ExperimentConfig, config_copy_required: bool = True,
                    cli: bool = True) -> None:
    """Raise :class:`RunDirError` unless ``run_dir`` holds this configuration's run with a
    checkpoint to continue from (see the module docstring) and its outputs (results.json,
    rounds.csv, plots/, checkpoints/) of a kind it can write; reads only. The Python API's
    non-private runs without envelopes hold no config copy (``config_copy_required=False``): their checkpoints' config hashes and
    order are checked all the same, and a config copy that is there must match. A DP run's
    record of the parties it added to its key store that cannot be read is refused
    (:func:`recorded_keystore_extension`), and so is, when the resume amends the config, its
    record of the round it stopped in (:func:`recorded_stop`), and an amendment of a run that
    has finished (:func:`check_amendable`). Messages name
    the CLI's options, or with ``cli`` False the Python API's arguments."""
    out, resume = _names(cli)
    problem = path_problem(run_dir)
    if problem is not None:
        raise RunDirError(f"{resume} needs an existing run directory; {run_dir} {problem}")
    # outputs written as the run goes and at its end: one of the wrong kind was found only
    # after rounds were trained again (under DP, released and accounted)
    for name, want_dir in _RUN_OUTPUTS.items():
        path = run_dir / name
        if path.exists() and path.is_dir() != want_dir:
            kind = "a directory" if want_dir else "a regular file"
            raise RunDirError(f"{resume}: {path} is not {kind}, so the run could not write it; "
                              "move it away, then resume")
    # the CLI draws the plots: one that is a directory was found once the run had trained to
    # its end
    for name in PLOT_FILES if cli else ():
        path = run_dir / PLOTS_FOLDER / name
        if path.is_dir():
            raise RunDirError(f"{resume}: {path} is not a regular file, so the run could not "
                              "write it; move it away, then resume")
    if cfg.privacy.enabled:  # only a DP run uses a key store: its damaged record is refused
        recorded_keystore_extension(run_dir, resume)
        _refuse_nonce_only_folders(run_dir, cfg, resume)
    stored = run_dir / CONFIG_COPY
    if not stored.is_file():
        if config_copy_required:
            raise RunDirError(f"{resume}: {stored} is missing, so {run_dir} cannot be matched "
                              f"to this configuration ({_start_again(run_dir, resume)})")
        _check_checkpoints(run_dir, cfg, resume=resume)
        return
    binding, changes = resume_binding(run_dir, cfg, resume)
    if changes and cfg.privacy.enabled:  # where an amendment applies from reads the record
        recorded_stop(run_dir, resume)
    _check_checkpoints(run_dir, cfg, bound=True, resume=resume, expected=binding)
    check_amendable(run_dir, cfg, changes, cli)


def _extension_shape(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"is not a JSON object (a {type(doc).__name__})"
    recorded = doc.get("keystore_extended", [])
    if isinstance(recorded, list) and all(isinstance(p, str) for p in recorded):
        return None
    return "holds a keystore_extended that is not a list of party names"


def _read_extension(path: Path, resume: str) -> list[str]:
    """The ``keystore_extended`` list of the JSON object in ``path`` ([] when the file or the
    key is absent); RunDirError naming the file when it cannot be read or parsed, is not an
    object, or the value is not a list of party names."""
    doc = _read_record(
        path, "the parties this run added to its key store (keystore_extended)",
        _extension_shape, "restore the file from a copy of the run directory, or move it away "
        "(its record is then lost), then resume; nothing was written", f"{resume}: ")
    return [] if doc is None else doc.get("keystore_extended", [])


def recorded_keystore_extension(run_dir: Path, resume: str = "--resume") -> list[str]:
    """The parties an earlier process of the run in ``run_dir`` added to its key store, as its
    :data:`KEYSTORE_RECORD` and its results.json (``keystore_extended``) list them, in that
    order without repeats; [] when neither records any. Reads only. A record that cannot be
    read is never dropped: RunDirError naming the file (``resume`` names how the caller
    resumes)."""
    parties: list[str] = []
    for name in (KEYSTORE_RECORD, "results.json"):
        path = run_dir / name
        if name == "results.json" and path.is_dir():
            continue  # refused by check_resumable as an output of the wrong kind
        parties += [p for p in _read_extension(path, resume) if p not in parties]
    return parties


def _check_recorded_ledgers(folder: Path, saved: dict[str, Any], checkpoint: Path,
                            resume: str = "--resume") -> None:
    """Every client's ledger in ``folder`` still holds the entries ``checkpoint`` recorded
    (its privacy state: entry count and hash of the last line); reads only. Checked before a
    resume writes anything: a checkpoint copied from another run of the same config, or a
    ledger lost or cut since, would otherwise be found only when that method starts, after the
    methods before it had run again."""
    from privacy.identity import client_ids
    from privacy.ledger import line_hash

    rows = saved.get("clients")
    if not isinstance(rows, list):
        return
    for cid, row in zip(client_ids(len(rows)), rows, strict=True):
        recorded = row.get("ledger_head") if isinstance(row, dict) else None
        if not recorded or int(recorded[0]) <= 0:
            continue
        count, head = int(recorded[0]), str(recorded[1])
        ledger = folder / f"{cid}.jsonl"
        try:
            lines = ledger.read_text(encoding="utf-8").splitlines() if ledger.is_file() else []
        except (OSError, UnicodeDecodeError) as err:
            raise RunDirError(f"{resume}: cannot read {ledger}: {err}") from None
        if len(lines) < count or line_hash(lines[count - 1]) != head:
            raise RunDirError(
                f"{resume}: checkpoint {checkpoint} records {count} ledger entries of client {cid}"
                f" (ending in {head[:12]}...), which {ledger} does not hold: the ledger was lost,"
                " cut or replaced since, or the checkpoint is another run's; nothing was written"
                " (restore the ledger, or start a new run)")


def _check_checkpoints(run_dir: Path, cfg: ExperimentConfig, bound: bool = False,
                       resume: str = "--resume", expected: str | None = None) -> None:
    """The checkpoint half of :func:`check_resumable`: this configuration's methods'
    checkpoints exist in order, each written for the config hash ``expected`` (default
    ``cfg``'s; or the first method's releases are recorded, or it released nothing yet:
    killed before its first checkpoint). ``bound``: the directory's config copy is this
    configuration (up to amendments)."""
    from secure_fedora.runtimes.inprocess import CheckpointError, load_checkpoint

    expected = config_hash(cfg) if expected is None else expected
    present = [m for m in cfg.methods if (run_dir / "checkpoints" / f"{m}.pt").exists()]
    lost = [m for m in cfg.methods if m not in present and _closed_ledgers(run_dir, m)]
    if lost:
        raise RunDirError(
            f"{resume}: the checkpoint of {lost[0]!r} is missing from {run_dir / 'checkpoints'}"
            " while its ledgers are closed (the method finished): its outcome was lost; restore"
            " the checkpoint from a copy of the run directory, or start a new run; nothing was"
            " written")
    if not present and (_records_releases(run_dir, cfg.methods[0])
                        or _opened_unreleased(run_dir, cfg)
                        or (bound and (_plain_unstarted(run_dir, cfg)
                                       or _private_unstarted(run_dir, cfg)))):
        return  # killed before its first checkpoint: resumed from the start
    if not present:
        raise RunDirError(
            f"{resume}: {run_dir / 'checkpoints'} holds no checkpoint of {cfg.methods[0]!r}; "
            f"there is nothing to resume from ({_start_again(run_dir, resume)})"
            f"{_nonce_note(run_dir)}"
        )
    expected_order = list(cfg.methods[: len(present)])
    if present != expected_order:
        missing = [m for m in expected_order if m not in present]
        raise RunDirError(
            f"{resume}: checkpoint(s) of {missing} missing from {run_dir / 'checkpoints'} while "
            "a later method's checkpoint exists; refusing to restart them silently"
        )
    for method in present:
        path = run_dir / "checkpoints" / f"{method}.pt"
        state = load_checkpoint(path)
        if state.get("config_hash") != expected:
            raise CheckpointError(f"checkpoint {path} was written for another configuration; "
                                  f"refuse to resume ({resume} needs the configuration the run "
                                  "was started with: resume with that one, or start a new run "
                                  "in a new directory)")
        if isinstance(state.get("privacy"), dict):
            _check_recorded_ledgers(run_dir / "ledgers" / method, state["privacy"], path, resume)
