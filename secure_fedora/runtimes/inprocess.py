"""The in-process simulation runtime: one machine, many clients, fast (the default runtime).

It builds the clients' data and a common initialization, runs every configured method round
by round, evaluates each client's personalized model, writes a crash-safe checkpoint every
``[training] checkpoint_every`` rounds and resumes from it to the identical result.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from privacy.accounting import format_exact
from privacy.durable import ensure_descriptors
from privacy.envelope import ledger_files
from privacy.errors import ToolkitError
from privacy.paths import check_path, open_regular
from secure_fedora import __version__
from secure_fedora.algorithms.contract import (
    DataFacts,
    check_data_facts,
    check_model_sizes,
    check_round_statistics,
    data_checked,
    model_size_checked,
    no_reply_statistics,
    round_mechanisms,
)
from secure_fedora.algorithms.methods import FederatedMethod, MethodContext
from secure_fedora.core.config import (
    ConfigError,
    ExperimentConfig,
    check_flag_argument,
    check_path_argument,
    config_hash,
    load_config,
    model_selection,
    participants_per_round,
    revalidate,
)
from secure_fedora.core.crashpoints import crash_point
from secure_fedora.core.files import (
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_with,
    remove_interrupted_writes,
    strict_json,
)
from secure_fedora.core.registry import DATASETS, MODELS, PARTITIONERS
from secure_fedora.data.partition import ClientData, LabeledDataset
from secure_fedora.data.sources import fingerprint_clients, legacy_fingerprint_clients
from secure_fedora.learning.client import (
    ClientUpdateError,
    FlatModel,
    GradientOracle,
    PlainGradient,
    TrainConfig,
    Workspace,
)
from secure_fedora.learning.models import (
    architecture_difference,
    make_model,
    model_architecture,
    model_fingerprint,
)
from secure_fedora.secure.backends import CkksBackend
from secure_fedora.secure.keystore import API_KEYSTORE_OPTION

__all__ = [
    "CheckpointError",
    "unrestorable",
    "MethodOutcome",
    "Simulation",
    "atomic_write_bytes",
    "build_clients",
    "build_context",
    "client_generator",
    "make_method",
    "model_record",
    "model_record_problem",
    "sample_participants",
    "summarize",
]

NUM_CLASSES = 10

log = logging.getLogger("secure_fedora.runtimes.inprocess")


class CheckpointError(ToolkitError, RuntimeError):
    """A checkpoint that cannot be resumed from (corrupt, or from another config or data)."""


def unrestorable(what: str, err: Exception) -> CheckpointError:
    """The :class:`CheckpointError` to raise when restoring ``what`` (e.g. ``"checkpoint
    PATH"``) failed with ``err``: its message is ``err``'s; a plug-in's state hook that raised
    (a :class:`~secure_fedora.core.plugins.PluginError` naming the method, the hook and where)
    is kept as the cause, so ``--debug`` shows the plug-in's traceback."""
    from secure_fedora.core.plugins import PluginError

    failure = CheckpointError(f"{what} cannot be restored: {err}")
    failure.__cause__ = err if isinstance(err, PluginError) else None
    failure.__suppress_context__ = True
    return failure


#: Beside a DP method's ledgers: the architecture of the model its releases come from.
MODEL_RECORD = "model.json"


def model_record(module: torch.nn.Module) -> bytes:
    """The :data:`MODEL_RECORD` of ``module``: its fingerprint and architecture listing."""
    return json.dumps({"model_fingerprint": model_fingerprint(module),
                       "model_architecture": model_architecture(module)}, indent=1).encode()


def model_record_problem(path: Path, module: torch.nn.Module) -> str | None:
    """Why the :data:`MODEL_RECORD` ``path`` does not record ``module``'s architecture (it
    is unreadable, damaged, or records another model: the first line where they differ), as
    the end of a sentence starting with the path; None when it records it. Reads only."""
    current = model_fingerprint(module)
    try:
        recorded = json.loads(path.read_bytes())
        fingerprint = recorded["model_fingerprint"]
        architecture = list(recorded["model_architecture"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"is unreadable ({err})"
    if fingerprint == current:
        if architecture == model_architecture(module):
            return None
        # the fingerprint is the listing's hash: a listing that differs is a changed file
        return ("is damaged (its model_architecture listing does not match its"
                " model_fingerprint): the run's record of its model cannot be trusted")
    what = architecture_difference(architecture, model_architecture(module)) \
        or f"fingerprint {fingerprint!s:.12} != {current:.12}"
    return f"records another model than this one ({what}): the run's releases were made with it"


def build_clients(cfg: ExperimentConfig, data: Any = None,
                  own: int | None = None) -> list[ClientData]:
    """The federation's data, deterministic in ``cfg.seed`` and the data section, built on
    ``training.threads`` torch threads (when set; the process's own count again after it).

    ``data`` (Python API) overrides the config's ``data.dataset`` / ``data.source``: a
    centralized dataset dict or :class:`~secure_fedora.data.partition.LabeledDataset` (split by
    the configured partitioner), a list of per-client dicts (already federated) or a function
    of the seed returning either. User data, and a registered dataset's
    :class:`~secure_fedora.data.partition.LabeledDataset` or federated data, is checked first
    (:mod:`secure_fedora.data.userdata`); a problem raises :class:`~secure_fedora.data.sources.DataError` before anything trains.
    ``own`` (a Flower node's client): a registered partitioner's rows are checked for that
    client only (:func:`~secure_fedora.data.userdata.call_partitioner`).
    """
    from secure_fedora.learning.devices import threads_applied

    # Many small tensor ops per client (a rotation per split): on a busy machine each one
    # that fans out to more threads than the run asked for costs far more than it computes.
    with threads_applied(cfg):
        return _build_clients(cfg, data, own)


def _build_clients(cfg: ExperimentConfig, data: Any, own: int | None) -> list[ClientData]:
    from secure_fedora.core.plugins import config_dir
    from secure_fedora.data.userdata import (
        FederatedData,
        call_partitioner,
        call_source,
        coerce_user_data,
        label_space,
        load_source,
        warn_unlearnable_rows,
    )

    d = cfg.data
    if data is not None and callable(data):
        data = call_source(data, cfg.seed, "data= function")
        if data is None:  # not the default dataset: the function was given and returned nothing
            from secure_fedora.data.sources import DataError

            raise DataError("data= function returned a NoneType; expected a dict with keys "
                            "x_train, y_train (and x_test, y_test), a LabeledDataset or a list "
                            "of per-client dicts (a missing return?)")
    if data is not None:
        source = coerce_user_data(data, "data")
    elif d.source is not None:
        source = load_source(d.source, cfg.seed, config_dir(cfg))
    else:
        where = f"data.dataset {d.dataset!r}"
        if DATASETS.is_builtin(d.dataset) and PARTITIONERS.is_builtin(d.partition):
            # the built-in partitioners only read their source: the process's cached tensors,
            # uncopied; any other partitioner gets the registered entry's copy
            from secure_fedora.data.partition import shared_builtin_dataset

            source = shared_builtin_dataset(d.dataset)  # type: ignore[arg-type]
        else:
            source = call_source(DATASETS.get(d.dataset), cfg.seed, where)
        if isinstance(source, LabeledDataset | FederatedData):
            # a registered dataset gets the checks of user data (a mapping of uint8 image
            # splits is checked by the partitioner)
            source = coerce_user_data(source, where)
    if isinstance(source, FederatedData):
        _warn_unused_sizes(cfg)
        clients = _federated_clients(cfg, source.clients, "the data lists")
    else:
        # a registered partitioner's clients get the same checks (the built-in ones pass them)
        classes = source.num_classes if isinstance(source, LabeledDataset) else None
        made = call_partitioner(PARTITIONERS.get(d.partition), source, d, cfg.seed,
                                f"data.partition {d.partition!r}", classes, own)
        clients = _federated_clients(cfg, made, f"data.partition {d.partition!r} made")
    if own is None:  # a Flower node builds its own client's data only: it cannot tell
        warn_unlearnable_rows(clients, label_space(clients)[0])
    return clients


#: The data keys that only shape a partition: unused by per-client data lists.
_PARTITION_KEYS = ("partition", "test_per_client", "groups", "dirichlet_alpha",
                   "classes_per_client", "rotation_interpolation")


def _warn_unused_sizes(cfg: ExperimentConfig) -> list[str]:
    """The data keys the config sets that per-client data lists leave unused, logged as one
    warning (as other unused keys are): the lists give each client's rows, so no partition
    runs, and ``train_per_client`` / ``val_per_client`` only state, under DP, the smallest
    client's training rows and (private validation) every client's validation rows; results.json
    lists each client's actual sizes (``clients``). A key at its default value is not named:
    the config.toml a Python API run writes (where the run directory has none; the CLI copies
    the user's file) states every default, so a run reading it back would otherwise name keys
    its author never wrote."""
    d, p = cfg.data, cfg.privacy

    def written(key: str) -> bool:
        return key in d.model_fields_set and getattr(d, key) != type(d).model_fields[key].default

    unused = [k for k in _PARTITION_KEYS if written(k)]
    if not p.enabled and written("train_per_client"):
        unused.append("train_per_client")
    if not (p.enabled and d.validation == "private") and written("val_per_client"):
        unused.append("val_per_client")
    if unused:
        log.warning("%s %s unused: the data lists each client's rows (no partition runs; "
                    "results.json's clients give their sizes)%s", ", ".join(
                        f"data.{k} = {getattr(d, k)!r}" for k in unused),
                    "is" if len(unused) == 1 else "are",
                    "; train_per_client applies under DP only (the smallest client's "
                    "training rows)" if "train_per_client" in unused else "")
    return unused


def _federated_clients(cfg: ExperimentConfig, clients: list[ClientData],
                       made: str) -> list[ClientData]:
    """Clients checked against the config's sizes where privacy uses them (``made`` says
    where they came from, in errors): client ``i`` has id ``i`` (budgets, overrides, ledgers
    and results are per position) and every split's inputs have client 0's row shape."""
    from secure_fedora.data.sources import DataError

    d = cfg.data
    if len(clients) != d.num_clients:
        raise DataError(f"{made} {len(clients)} clients but data.num_clients = "
                        f"{d.num_clients}; set data.num_clients = {len(clients)}")
    for i, c in enumerate(clients):
        if c.client_id != i:
            raise DataError(f"{made} client id {c.client_id!r} at position {i}; client ids must "
                            "be 0..N-1 in list order (privacy.overrides, ledgers and results "
                            "name clients by position)")
    shape = tuple(clients[0].train_x.shape[1:])
    for c in clients:
        for split in ("train", "val", "test"):
            if tuple(getattr(c, f"{split}_x").shape[1:]) != shape:
                raise DataError(f"{made} client {c.client_id} with {split} inputs of "
                                f"{tuple(getattr(c, f'{split}_x').shape[1:])} per row; client "
                                f"0's train inputs are {shape}")
    if cfg.privacy.enabled:
        for c in clients:
            if c.num_train < d.train_per_client:
                raise DataError(
                    f"client {c.client_id} has {c.num_train} training rows but "
                    f"data.train_per_client = {d.train_per_client}; with privacy on, set it to "
                    "the smallest client's size (it bounds delta < 1/n and sets the sample rate q; "
                    "each client's DP-SGD step then averages over its own expected batch q * n_i)")
            override = cfg.privacy.overrides.get(str(c.client_id))
            delta = override.delta if override is not None and override.delta is not None \
                else cfg.privacy.delta
            if delta >= 1.0 / c.num_train:
                raise DataError(
                    f"client {c.client_id} has {c.num_train} training rows, so its delta = "
                    f"{format_exact(delta)} is not below 1/n = {format_exact(1 / c.num_train)} (a delta"
                    " that large may "
                    "release a record outright); lower privacy.delta (or its override)")
            if d.validation == "private" and c.num_val != d.val_per_client:
                raise DataError(
                    f"client {c.client_id} has {c.num_val} validation rows but "
                    f"data.val_per_client = {d.val_per_client}; the private lambda release is "
                    "accounted for exactly that many rows")
    return clients


def client_generator(seed: int, client: int) -> torch.Generator:
    """Client ``client``'s private RNG stream, independent of participation and of the others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + client + 1)


#: results.json ``assumptions.noise_source`` per ``[privacy] noise``.
NOISE_SOURCE_DESCRIPTIONS = {
    "csprng": "ChaCha20 keystream (cryptography/OpenSSL), a fresh 256-bit key from os.urandom "
              "per client and process, never stored; Gaussians as the sum of 4 Box-Muller "
              "draws / 2 (floating-point hardening as in Opacus secure_mode)",
    "reproducible": "torch.Generator seeded from the experiment seed and client index "
                    "(statistical PRNG; repeatable)",
}


def _client_generators(cfg: ExperimentConfig, n: int) -> list[torch.Generator]:
    return [client_generator(cfg.seed, i) for i in range(n)]


def data_facts(clients: Sequence[ClientData]) -> DataFacts:
    """The facts of a federation's data its methods are checked against before any runs
    (:meth:`~secure_fedora.algorithms.contract.FederatedAlgorithm.check_data`)."""
    from secure_fedora.data.userdata import label_space

    num_classes, multilabel = label_space(clients)
    return DataFacts(
        input_shape=tuple(int(v) for v in clients[0].train_x.shape[1:]),
        num_classes=num_classes, multilabel=multilabel,
        train_sizes=tuple(len(c.train_y) for c in clients),
        val_sizes=tuple(len(c.val_y) for c in clients),
        test_sizes=tuple(len(c.test_y) for c in clients))


def train_config(cfg: ExperimentConfig) -> TrainConfig:
    """The local trainer's settings (lr, momentum, weight decay, batch size, local epochs) from
    ``[training]``."""
    t = cfg.training
    return TrainConfig(t.lr, t.momentum, t.weight_decay, t.batch_size, t.local_epochs)


def build_context(
    cfg: ExperimentConfig, clients: Sequence[ClientData], oracle: GradientOracle | None = None,
    model_factory: Callable[..., Any] | None = None,
) -> MethodContext:
    """A fresh method context: common initialization, one RNG per client, shared buffers,
    all on ``[training] device`` (data, model, buffers; batch order from CPU generators).

    The model is ``model_factory(input_shape, num_classes)`` (Python API), else
    ``[model] factory``, else the registered ``[model] name``, built for the clients' input
    shape and the loss's output width. Before anything trains, it checks the labels, the
    model's output width, the loss's per-sample shape, AUC's need for both classes (in the
    splits that are scored: not private validation splits under DP), that an eval-mode
    forward writes no input in place, that a user's or plug-in's model (not a built-in) runs
    on every client's train, val and test rows (not private validation splits) and,
    under DP, that the DP path computes the model's per-sample gradients exactly (errors:
    DataError, ModelError, PluginError, DPSGDError, each naming the problem). Built on
    ``training.threads`` torch threads (when set) with float32 as torch's default dtype; the
    process's own settings again after it.
    """
    from secure_fedora.learning.devices import threads_applied

    # its checks compute on the clients' rows: on the run's threads, as the run does
    with threads_applied(cfg):
        return _build_context(cfg, clients, oracle, model_factory)


def _build_context(cfg: ExperimentConfig, clients: Sequence[ClientData],
                   oracle: GradientOracle | None,
                   model_factory: Callable[..., Any] | None) -> MethodContext:
    from secure_fedora.core.plugins import config_dir, import_object
    from secure_fedora.data.userdata import label_space
    from secure_fedora.learning.devices import clients_on, resolve_device, resolve_engine
    from secure_fedora.learning.models import (
        BufferGuard,
        build_user_model,
        check_buffers_constant,
        check_inputs_unchanged,
        check_output_width,
    )
    from secure_fedora.learning.tasks import resolve_task

    device = resolve_device(cfg)
    engine, engine_choice = resolve_engine(cfg, device)
    clients = clients_on(clients, device)

    num_classes, multilabel = label_space(clients)
    task = resolve_task(cfg.training.loss, multilabel, config_dir(cfg))
    width = task.output_width(num_classes, multilabel)
    if task.metric_name == "auc" and not multilabel and num_classes > 2:
        from secure_fedora.data.sources import DataError

        # the count is the largest label + 1 (or a declared num_classes), not the labels seen:
        # labels {1, 2} or {0, 2} are 3 classes, which a binary task must relabel to 0/1
        scored = "" if task.name == "bce" else ", scored by AUC,"
        raise DataError(f"training.loss = {task.name!r}{scored} with single labels is binary (labels "
                        f"0 and 1, one output), but the data has {num_classes} classes (labels "
                        f"0..{num_classes - 1}: the largest label, or a declared num_classes, sets "
                        "the count); use 'cross_entropy', relabel a binary task to 0 and 1, or "
                        "give multi-hot (n, C) targets for multi-label")
    input_shape = tuple(int(v) for v in clients[0].train_x.shape[1:])
    source = "the model factory"
    if model_factory is None and cfg.model.factory is not None:
        model_factory = import_object(cfg.model.factory, "model.factory", config_dir(cfg))
        source = f"model.factory {cfg.model.factory!r}"
    if model_factory is not None:
        module = build_user_model(model_factory, input_shape, width, cfg.seed, source)
    else:
        module = make_model(cfg.model.name, width, seed=cfg.seed, input_shape=input_shape)
        source = f"model {cfg.model.name!r}"
    module = module.to(device)
    probe_x, probe_y = _probe_rows(clients)
    check_output_width(module, probe_x, width, source)
    check_buffers_constant(module, probe_x, source)
    check_inputs_unchanged(module, probe_x, source)
    # under DP, private validation splits are never scored (the final round is reported, and
    # only their losses are used, by the private lambda): AUC need not be defined on them
    scored = ("test",) if cfg.privacy.enabled and cfg.data.validation == "private" \
        else ("val", "test")
    _check_task(task, module, clients, probe_x, probe_y, scored)
    if model_factory is not None or not MODELS.is_builtin(cfg.model.name):
        # a user's or plug-in's model (one a contrib/ module registers runs on Flower clients
        # too, where this runs before a client answers its first contact) may fail on rows the
        # probes above never showed it (an embedding id beyond its table in one test split):
        # found before anything trains or is released
        private_val = cfg.privacy.enabled and cfg.data.validation == "private"
        _check_model_runs_on_splits(module, clients, ("train", "test") if private_val
                                    else ("train", "val", "test"), source)
    flat = FlatModel(module, task)
    generators = _client_generators(cfg, len(clients))
    noise: list[Any] = []
    if cfg.privacy.enabled:
        from secure_fedora.secure.private import DPGradient, client_noise_sources, sample_rate_for

        noise = client_noise_sources(cfg, len(clients))
        if oracle is None:
            from secure_fedora.learning.dp import check_rows_independent, largest_poisson_batch

            q = sample_rate_for(cfg)
            # DP-SGD's Poisson batches (the same q for every client: the largest client's are
            # the largest) and a private lambda's validation split, each run whole; before the
            # gradient check, whose refusal of a model mixing rows would blame a layer
            largest = max(int(c.train_x.shape[0]) for c in clients)
            # a user's loss too: one that mixes a batch's rows only in larger batches passes
            # the gradient check's few rows (the built-in losses are row-wise by construction)
            from secure_fedora.learning.tasks import ROW_WISE_LOSSES

            probed_loss = None if task.per_sample in ROW_WISE_LOSSES else task.checked
            batch_x, batch_y = _probe_rows(clients, largest_poisson_batch(q, largest))
            check_rows_independent(module, batch_x, training=True, rows="training",
                                   loss=probed_loss, y=batch_y)
            if cfg.data.validation == "private":
                # a private lambda's clipped losses: a batch of a whole validation split in
                # eval mode, probed on training rows (only accounted releases read private
                # validation data)
                size = max(int(c.val_x.shape[0]) for c in clients)
                eval_x, eval_y = _probe_rows(clients, size)
                check_rows_independent(module, eval_x, training=False,
                                       rows="eval-mode training", loss=probed_loss, y=eval_y)
            oracle = DPGradient(module, cfg.privacy.max_grad_norm, q,
                                q * cfg.data.train_per_client, noise[0], task=task)
            oracle.check_model(probe_x, probe_y)
    return MethodContext(
        clients=clients,
        flat=flat,
        train=train_config(cfg),
        oracle=oracle or PlainGradient(cfg.training.batch_size, cfg.training.clip_grad_norm,
                                       task=task),
        workspace=Workspace.for_size(flat.num_params, device),
        generators=generators,
        init=flat.initial_vector(),
        num_classes=num_classes,
        noise=noise,
        encryption=CkksBackend(),
        engine=engine,
        engine_choice=engine_choice,
        # an evaluation feeds the model views of the stored splits (a copy per pass would
        # cost a split's size in memory traffic): a write the probes missed stops the run
        buffers=BufferGuard(module, source, [
            (f"client {c.client_id}'s {split} split", getattr(c, f"{split}_x"))
            for c in clients for split in ("train", "val", "test")], [
            (f"client {c.client_id}'s {split} labels", getattr(c, f"{split}_y"))
            for c in clients for split in ("train", "val", "test")],
            f"training.loss {task.name!r}"),
    )


@torch.no_grad()
def _check_model_runs_on_splits(module: torch.nn.Module, clients: Sequence[ClientData],
                                splits: Sequence[str], source: str, chunk: int = 4096) -> None:
    """ModelError naming the first client split whose rows the initial model cannot run on in
    eval mode (what evaluation and the training batches feed it), with where it raised.
    Private validation splits are left out by the caller: only accounted releases read them.
    Torch's global generator and the model's modes are left as they were."""
    from secure_fedora.core.plugins import raised_at
    from secure_fedora.learning.models import ModelError

    modes = {m: m.training for m in module.modules()}
    module.eval()
    devices = [d.index or 0 for d in {c.train_x.device for c in clients} if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices):
            for c in clients:
                for split in splits:
                    x = getattr(c, f"{split}_x")
                    for start in range(0, int(x.shape[0]), chunk):
                        try:
                            module(x[start:start + chunk].clone())  # the data stays intact
                        except Exception as err:  # the user's model code
                            raise ModelError(
                                f"{source} fails on client {c.client_id}'s {split} split (rows "
                                f"{start}..{min(start + chunk, int(x.shape[0])) - 1}): "
                                f"{type(err).__name__}: {err}{raised_at(err)}") from err
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _evaluation_failure(method: FederatedMethod, rnd: int, rows: dict[int, Tensor],
                        select_final: bool, err: Exception) -> Exception:
    """The ModelError for a model (or loss) raising while the clients' splits are evaluated,
    naming the method, the round and the first client split that fails alone (e.g. an
    embedding id beyond its table held only by a test split), with where the code raised."""
    from secure_fedora.core.plugins import raised_at
    from secure_fedora.learning.client import evaluate
    from secure_fedora.learning.models import ModelError

    where = "the clients' validation and test splits"
    splits = ("test",) if select_final else ("val", "test")
    for i, row in rows.items():
        c = method.ctx.clients[i]
        for split in splits:
            try:
                evaluate(method.ctx.flat, row, getattr(c, f"{split}_x"), getattr(c, f"{split}_y"))
            except Exception:  # the user's code again: only where it fails is wanted
                where = f"client {i}'s {split} split"
                break
        else:
            continue
        break
    return ModelError(f"method {method._label()!r}: the model fails on {where} in the "
                      f"evaluation of round {rnd}: {type(err).__name__}: {err}{raised_at(err)}")


def _probe_rows(clients: Sequence[ClientData], rows: int = 2) -> tuple[Tensor, Tensor]:
    """The federation's first ``rows`` training rows, taken across clients where the first
    holds fewer: the model checks compare a batch with its rows one by one (DP's per-sample
    check), which a model mixing the samples of a batch passes on a batch of one."""
    xs, ys, held = [], [], 0
    for c in clients:
        if held >= rows:
            break
        take = min(rows - held, int(c.train_x.shape[0]))
        if take:
            xs.append(c.train_x[:take])
            ys.append(c.train_y[:take])
            held += take
    if not xs:
        return clients[0].train_x[:rows], clients[0].train_y[:rows]
    return torch.cat(xs), torch.cat(ys)


def _check_task(task: Any, module: torch.nn.Module, clients: Sequence[ClientData],
                probe_x: Tensor, probe_y: Tensor,
                scored: Sequence[str] = ("val", "test")) -> None:
    """The loss returns finite per-sample values on the model's outputs, and the metric is
    defined on every client's ``scored`` splits (AUC needs both classes)."""
    from secure_fedora.core.plugins import PluginError, raised_at
    from secure_fedora.data.sources import DataError
    from secure_fedora.learning.tasks import MetricError

    targets = probe_y.clone()  # probed on a copy: a loss writing its targets changes only it
    version = targets._version
    with torch.no_grad():
        try:
            outputs = module(probe_x)
            losses = task.checked(outputs, targets)
        except Exception as err:  # user loss code: report whatever it raised
            raise PluginError(f"training.loss {task.name!r} fails on the model's outputs: "
                              f"{type(err).__name__}: {err}{raised_at(err)}") from err
    if not losses.is_floating_point():
        raise PluginError(f"training.loss {task.name!r} returns {losses.dtype} losses; per-sample "
                          "losses must be floating point (differentiable)")
    if not torch.isfinite(losses).all():
        raise PluginError(f"training.loss {task.name!r} returns non-finite losses at initialization")
    modes = {m: m.training for m in module.modules()}
    module.eval()  # no dropout draw: the probe leaves every random stream as it was
    try:
        with torch.enable_grad():
            if not task.checked(module(probe_x), targets).requires_grad:
                raise PluginError(
                    f"the loss of the model's outputs carries no gradient (training.loss "
                    f"{task.name!r}): is the model's output or the loss detached from the "
                    "parameters (.detach(), torch.no_grad, .item())?")
    finally:
        for m, mode in modes.items():
            m.train(mode)
    if targets._version != version or not torch.equal(targets, probe_y):
        raise PluginError(
            f"training.loss {task.name!r} writes its targets in place (targets.mul_(...), "
            "targets[mask] = ..., any in-place write, even of equal values): evaluation passes "
            "it a client's stored validation and test labels, which would change with every "
            "evaluation; compute on new tensors (t = targets.float(), or targets.clone() first)")
    if task.metric_name == "auc":
        width = int(outputs.shape[1]) if outputs.dim() == 2 else 1
        for c in clients:
            for split in scored:
                y = getattr(c, f"{split}_y")
                try:  # outputs of the model's width: AUC on single labels needs one output
                    task.metric(torch.zeros(y.shape if y.dim() == 2 else (y.shape[0], width)), y)
                except MetricError as err:
                    raise DataError(f"client {c.client_id}: the {split} split cannot be scored "
                                    f"with AUC: {err}") from None


def make_method(name: str, ctx: MethodContext, cfg: ExperimentConfig) -> FederatedMethod:
    """Instantiate a configured method by name (a lookup in
    :data:`secure_fedora.core.registry.METHODS`; unknown names raise ``RegistryError``)."""
    from secure_fedora.algorithms.contract import ContractError, build_method

    method = build_method(name, ctx, cfg)
    if not isinstance(method, FederatedMethod):
        raise ContractError(
            f"method {name!r} is a {type(method).__name__}, a FederatedAlgorithm but not a "
            "FederatedMethod: both runtimes drive a method through FederatedMethod's generic "
            "setup, round, evaluation and checkpoint (secure_fedora.algorithms.methods); "
            "subclass FederatedMethod and implement the contract's halves")
    if cfg.privacy.enabled:
        bypass = [hook for hook in ("train_round", "finalize")
                  if getattr(type(method), hook, None) is not getattr(FederatedMethod, hook)]
        if bypass:
            raise ContractError(
                f"method {name!r} overrides {' and '.join(bypass)}: its exchanges would bypass "
                "the contract checks that keep every value a client sends accounted; with "
                "privacy.enabled implement configure / client_update / aggregate (and the "
                "finalize halves) instead")
    return method


#: The method attribute that carries each amendable config key (rundir.AMENDABLE_KEYS).
AMENDED_ATTRIBUTES = {"fedora.max_pull": "max_pull"}


def sample_participants(gen: torch.Generator, n: int, fraction: float) -> list[int]:
    """The round's participants: everyone at fraction 1, else
    :func:`~secure_fedora.core.config.participants_per_round` clients (``ceil(fraction * n)``
    of the stated decimal) drawn without replacement from ``gen`` (sorted). Shared by both
    runtimes."""
    if fraction >= 1.0:
        return list(range(n))
    m = participants_per_round(fraction, n)
    return sorted(torch.randperm(n, generator=gen)[:m].tolist())


@dataclass
class Tracker:
    """Model selection as in the reference: the round with the best mean validation accuracy
    across clients is selected, and every client's test accuracy at that round is reported.

    Both runtimes select through this class, so they select alike. Only measured metrics
    count: an evaluated round is eligible for selection only once every client has reported a
    metric (that round's, or an earlier one kept by a client that missed its evaluation,
    named under ``stale_clients``); a round in which some client still holds the placeholder 0
    (never evaluated yet: a Flower node not yet answering, a rejected evaluation message) is
    never selected, also under ``model_selection = "final_round"``, and its history row's
    ``selected_mean``/``selected_round`` are None while no round was eligible yet.
    ``eligible_from`` is the first eligible round (-1: none yet); results.json names the
    evaluated rounds before it under ``selected.unmeasured_rounds``
    (:func:`unmeasured_rounds`)."""

    best_val_mean: Tensor
    best_round: Tensor
    test_at_best: Tensor
    last_val: Tensor
    last_test: Tensor
    # True: the latest eligible round is always selected (``model_selection = "final_round"``;
    # validation accuracy is then not consulted, nor reported).
    select_final: Tensor = field(default_factory=lambda: torch.tensor(False))
    # The round each client's metrics are from (-1: none yet, a placeholder 0; a client that
    # missed or rejected its evaluation keeps older ones), and the same at the selected round
    # (results' stale_clients, in both runtimes).
    metric_round: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    selected_metric_round: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    eligible_from: Tensor = field(default_factory=lambda: torch.tensor(-1))

    @classmethod
    def empty(cls, n: int, select_final: bool = False) -> Tracker:
        """The state of ``n`` clients before any evaluation: nothing measured, no round selected."""
        return cls(torch.tensor(-1.0), torch.tensor(0), torch.zeros(n), torch.zeros(n), torch.zeros(n),
                   torch.tensor(bool(select_final)), torch.full((n,), -1, dtype=torch.int64),
                   torch.full((n,), -1, dtype=torch.int64), torch.tensor(-1))

    def evaluated(self, rnd: int, clients: Sequence[int]) -> None:
        """Record that ``clients`` reported their metrics of round ``rnd`` (before
        :meth:`update` of that round)."""
        if clients:
            self.metric_round[torch.as_tensor(list(clients), dtype=torch.long)] = rnd

    def update(self, rnd: int) -> None:
        """Select round ``rnd`` (after :meth:`evaluated`) if it is eligible (every client has a
        measured metric) and its mean validation metric beats the selected one's (or the
        final round is selected)."""
        if bool((self.metric_round < 0).any()):
            return  # a placeholder 0 is no measurement: not compared, not selected
        if int(self.eligible_from) < 0:
            self.eligible_from.fill_(rnd)
        val_mean = self.last_val.mean()
        if bool(self.select_final) or val_mean > self.best_val_mean:
            self.best_val_mean.copy_(val_mean)
            self.best_round.fill_(rnd)
            self.test_at_best.copy_(self.last_test)
            self.selected_metric_round.copy_(self.metric_round)

    def round_row(self, clients: Sequence[int] | None = None) -> dict[str, Any]:
        """The evaluated round's history fields (both runtimes report exactly these): the
        test statistics and ``val_mean`` over ``clients`` (default every client), the clients
        whose metrics are this round's (None when there are none); the selection's over every
        client; None while no round was eligible)."""
        test = self.last_test if clients is None else self.last_test[list(clients)]
        val = self.last_val if clients is None else self.last_val[list(clients)]
        some = test.numel() > 0
        chosen = int(self.eligible_from) >= 0
        return {
            "test_mean": float(test.mean()) if some else None,
            "test_min": float(test.min()) if some else None,
            "test_max": float(test.max()) if some else None,
            "test_std": float(test.std(unbiased=False)) if some else None,
            # Validation metrics on private data are not reported (it would be a release).
            "val_mean": None if bool(self.select_final) or not some else float(val.mean()),
            "selected_mean": float(self.test_at_best.mean()) if chosen else None,
            "selected_round": int(self.best_round) if chosen else None,
        }

    def state_dict(self) -> dict[str, Tensor]:
        """The tracker's tensors by field name, for the checkpoint."""
        return dict(self.__dict__)


def stale_clients(metric_round: Mapping[int, int], reported: int, n: int) -> dict[str, Any]:
    """``{"stale_clients": [{"client": index, "round": r}, ...]}`` for the clients whose
    metric is from an earlier round ``r`` than the ``reported`` one (they missed its
    evaluation, asked twice for the final one, and kept their latest accepted metrics; ``r``
    None: none yet, the figure is a placeholder 0); empty when every client's metric is that
    round's, so that results never pass an older metric off as the reported round's. Both
    runtimes report them."""
    stale = [{"client": c, "round": metric_round.get(c)} for c in range(n)
             if metric_round.get(c) != reported]
    return {"stale_clients": stale} if stale else {}


def unmeasured_rounds(history: Sequence[Mapping[str, Any]], eligible_from: int) -> dict[str, Any]:
    """``{"unmeasured_rounds": [r, ...]}``: the evaluated rounds of one method's ``history``
    that model selection did not consider because some client had no measured metric yet
    (before ``eligible_from``, :attr:`Tracker.eligible_from`; -1: none was eligible); empty
    when every evaluated round was eligible. Both runtimes report them under ``selected``."""
    skipped = [int(row["round"]) for row in history if "evaluated" in row
               and (eligible_from < 0 or int(row["round"]) < eligible_from)]
    return {"unmeasured_rounds": skipped} if skipped else {}


def metric_rounds(rounds: Tensor) -> dict[int, int]:
    """A tracker's metric rounds as :func:`stale_clients` reads them (no entry: none yet);
    both runtimes report from them."""
    return {c: r for c, r in enumerate(rounds.tolist()) if r >= 0}


def summarize(values: Sequence[float] | Tensor) -> dict[str, Any]:
    """Mean, min, max, population std and the per-client list of accuracies."""
    t = torch.as_tensor(values, dtype=torch.float64)
    return {
        "mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()),
        "std": float(t.std(unbiased=False)), "per_client": [round(float(v), 6) for v in t],
    }


@dataclass
class MethodOutcome:
    """What one method's run produced (the body of its entry in results.json)."""

    name: str
    selected: dict[str, Any]
    final: dict[str, Any]
    rounds: int
    seconds_training: float
    seconds_evaluation: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The outcome's fields as a dict (the checkpoint's record of a finished method)."""
        return dict(self.__dict__)


# A checkpoint file: CHECKPOINT_MAGIC, one JSON header line (padded with spaces to a fixed
# size so that it can be written after the payload was streamed), then the torch.save payload.
# The header holds the payload's SHA-256 and length and the run binding (the state's
# identity fields); load_checkpoint verifies all three before unpickling anything.
CHECKPOINT_MAGIC = b"SFCKPT2\n"
_CHECKPOINT_FORMAT = "secure-fedora/checkpoint/v2"
_MAX_HEADER_BYTES = 64 * 1024
_RESERVED_HEADER_BYTES = 4096
# State fields that bind a checkpoint to its run, when the state has them (the in-process
# runtime writes config_hash, data_fingerprint and model_fingerprint; a SuperNode's state adds
# run_id and client_id; a partition file its data digest).
_BINDING_KEYS = ("config_hash", "data_fingerprint", "model_fingerprint", "run_id", "client_id",
                 "data_digest", "format")


def _binding(state: dict[str, Any]) -> dict[str, Any]:
    return {k: state[k] for k in _BINDING_KEYS
            if isinstance(state.get(k), (str, int)) and not isinstance(state.get(k), bool)}


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _ledger_record(value: Any, n: int) -> dict[int, dict[str, Any]]:
    """The checkpoint's ``ledger_reports`` (``[[client, report], ...]``, each report as
    :func:`~secure_fedora.secure.private.read_ledger_report` makes it) by client; ValueError
    for anything else. A checkpoint from before the record holds none: the check starts
    afresh, as it did."""
    fields = {"epsilon_spent": float, "epsilon_budget": float, "ledger_entries": int,
              "ledger_head": str}
    record: dict[int, dict[str, Any]] = {}
    bad = ValueError("checkpoint field 'ledger_reports' must list [client, report] pairs of "
                     "distinct clients, each report its epsilon spent and budget, ledger "
                     "entries and head")
    if not isinstance(value, list):
        raise bad
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int
                and 0 <= pair[0] < n and pair[0] not in record and isinstance(pair[1], dict)
                and set(pair[1]) == set(fields)
                and all(isinstance(pair[1][k], t) and type(pair[1][k]) is not bool
                        for k, t in fields.items())):
            raise bad
        record[pair[0]] = dict(pair[1])
    return record


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint (stream to a temp file, fsync, rename; no in-memory copy
    of the state) that carries the SHA-256 of its payload and its run binding (config hash,
    data fingerprint, run id where present), so that :func:`load_checkpoint` detects any
    changed byte and any edited identity field.

    The digest is not keyed: it detects corruption and naive edits, not a writer who
    recomputes it."""

    def write(fh: Any) -> None:
        fh.write(CHECKPOINT_MAGIC + b" " * _RESERVED_HEADER_BYTES)
        hashing = _HashingWriter(fh)
        torch.save(state, hashing)
        header = json.dumps({
            "format": _CHECKPOINT_FORMAT,
            "sha256": hashing.sha.hexdigest(),
            "payload_bytes": hashing.size,
            "binding": _binding(state),
        }, sort_keys=True, separators=(",", ":")).encode()
        if len(header) >= _RESERVED_HEADER_BYTES:
            raise CheckpointError(f"checkpoint {path}: run binding too large for the header")
        fh.seek(len(CHECKPOINT_MAGIC))
        fh.write(header.ljust(_RESERVED_HEADER_BYTES - 1) + b"\n")

    atomic_write_with(path, write)


class _PayloadView(io.RawIOBase):
    """Read-only, seekable view of ``size`` bytes of an open file from ``offset`` (what
    ``torch.load`` reads a checkpoint's payload through, without a copy of the file)."""

    def __init__(self, fh: Any, offset: int, size: int) -> None:
        super().__init__()
        self._fh, self._offset, self._size, self._pos = fh, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        self._fh.seek(self._offset + self._pos)
        got = self._fh.readinto(view[:want])
        self._pos += got
        return got


def _parse_header(head: bytes, path: Path) -> tuple[str, int, dict[str, Any], int]:
    """A checkpoint's header from its first bytes: payload digest and size, run binding and
    the payload's offset (CheckpointError naming ``path`` if it is not one)."""
    if not head.startswith(CHECKPOINT_MAGIC):
        hint = (" (a checkpoint without integrity digest, written by an older version; "
                "it cannot be verified)" if head.startswith(b"PK") else "")
        raise CheckpointError(f"checkpoint {path} is corrupt or not a secure-fedora "
                              f"checkpoint{hint}")
    end = head.find(b"\n", len(CHECKPOINT_MAGIC), len(CHECKPOINT_MAGIC) + _MAX_HEADER_BYTES)
    try:
        if end < 0:
            raise ValueError("no header line")
        header = json.loads(head[len(CHECKPOINT_MAGIC):end])
        digest, size, binding = header["sha256"], header["payload_bytes"], header["binding"]
        if header.get("format") != _CHECKPOINT_FORMAT or not isinstance(binding, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: its header is unreadable") from None
    return digest, size, binding, end + 1


def checkpoint_binding(path: Path) -> dict[str, Any]:
    """The run binding a checkpoint's header records, read without the payload (its digest is
    not verified: :func:`load_checkpoint` does that, and refuses a state other than the
    header's binding)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(CHECKPOINT_MAGIC) + _MAX_HEADER_BYTES)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: {err.strerror}") from err
    return _parse_header(head, path)[2]


#: Bytes hashed per read when a checkpoint's digest is verified (the file is never read whole).
_DIGEST_CHUNK = 16 * 2**20


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raises :class:`CheckpointError`
    naming the file if it is unreadable, truncated, corrupt (digest mismatch), bound to
    other identity fields than the state it holds, or holds anything but tensors and plain
    values (nothing else is unpickled).

    The payload's digest is verified by streaming the file before anything is unpickled, and
    the state is then read from the same open file: a resume holds the loaded state once, not
    also the file's bytes (at 10,000 clients a checkpoint is 4.5 GiB). A ``path`` that is
    not a text path (an int would open that file descriptor), is empty or holds NUL raises
    CheckpointError naming it."""
    path = check_path(path, "path", CheckpointError, "file")
    try:
        # a FIFO would block the open until a writer came: refused, as a device is
        fh = os.fdopen(open_regular(path), "rb")  # noqa: SIM115 - closed below, after the state is read
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: {err.strerror}") from err
    with fh:
        try:
            head = fh.read(len(CHECKPOINT_MAGIC) + _MAX_HEADER_BYTES)
            file_size = os.fstat(fh.fileno()).st_size
        except OSError as err:
            raise CheckpointError(f"checkpoint {path} is unreadable: {err.strerror}") from err
        digest, size, binding, offset = _parse_header(head, path)
        if file_size - offset != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: truncated or extended "
                                  f"({file_size - offset} payload bytes, header says {size})")
        sha = hashlib.sha256()
        try:
            fh.seek(offset)
            remaining = size
            while remaining > 0:
                chunk = fh.read(min(_DIGEST_CHUNK, remaining))
                if not chunk:
                    break
                sha.update(chunk)
                remaining -= len(chunk)
        except OSError as err:
            raise CheckpointError(f"checkpoint {path} is unreadable: {err.strerror}") from err
        if remaining != 0 or sha.hexdigest() != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 digest does not "
                                  "match its contents (changed on disk); refuse to resume from it")
        try:
            state = torch.load(io.BufferedReader(_PayloadView(fh, offset, size)),
                               map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged or foreign pickles
            # torch's own message advises weights_only=False, which would run arbitrary code
            # from the file: it is never shown.
            text = str(err).strip()
            detail = "" if "weights_only" in text or "Weights only" in text or not text \
                else f" ({text.splitlines()[0][:200]})"
            raise CheckpointError(
                f"checkpoint {path} is corrupt or holds objects other than tensors and plain "
                f"values, which are never loaded{detail}") from None
    if not isinstance(state, dict) or "round" not in state:
        raise CheckpointError(f"checkpoint {path} does not hold a secure-fedora round state")
    if _binding(state) != binding:
        raise CheckpointError(f"checkpoint {path} is corrupt: its run binding {binding} does not "
                              "match the state it holds")
    return state


ProgressFn = Callable[[str, int, int], None]

# Under checkpoint_every = "auto" a checkpoint is written once the time since the last one
# reaches this multiple of what the last one took (checkpoints then cost <= ~1/10 of the run).
AUTO_CHECKPOINT_FACTOR = 10.0


class _CheckpointSchedule:
    """Whether round ``rnd`` ends with a checkpoint: every K rounds, or by time ("auto")."""

    def __init__(self, every: int | str) -> None:
        self.every = every
        self.last_cost: float | None = None
        self.last_end = time.perf_counter()

    def __call__(self, rnd: int) -> bool:
        if self.every != "auto":
            return rnd % int(self.every) == 0
        if self.last_cost is None:
            return True
        return time.perf_counter() - self.last_end >= AUTO_CHECKPOINT_FACTOR * self.last_cost

    def written(self, seconds: float) -> None:
        self.last_cost, self.last_end = seconds, time.perf_counter()


class Simulation:
    """Runs the configured methods in process, writing everything into ``run_dir``.

    Layout of ``run_dir``: ``config.toml`` (a copy), ``checkpoints/<method>.pt``,
    ``rounds.csv``, ``results.json`` and ``plots/*.png`` (written by the CLI). With privacy
    enabled also ``ledgers/<method>/<client>.jsonl`` (each closed by a signed close entry when
    its method finished), ``keys/`` (public keys only: the private keys stay in the key store,
    see :mod:`secure_fedora.secure.keystore`) and, once every method finished, the signed
    ``anchor.json`` (:mod:`secure_fedora.secure.anchor`).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        clients: Sequence[ClientData] | None = None,
        progress: ProgressFn | None = None,
        method_factory: Callable[[str, MethodContext, ExperimentConfig], FederatedMethod] = make_method,
        context_factory: Callable[[ExperimentConfig, Sequence[ClientData]], MethodContext] = build_context,
        keystore: str | os.PathLike[str] | None = None,
        inputs_outside_config: Sequence[str] = (),
    ) -> None:
        from secure_fedora.learning.devices import resolve_device

        # what the CLI and Experiment validate: a config derived with model_copy skipped it
        self.cfg = cfg = revalidate(cfg)
        self.run_dir = check_path_argument(run_dir, "run_dir")
        self.keystore_override = (None if keystore is None
                                  else check_path_argument(keystore, "keystore"))
        if progress is not None and not callable(progress):  # called after the first round
            raise ConfigError(f"progress must be a callable (method, round, total) or None, got "
                              f"{type(progress).__name__}")
        self.device = resolve_device(cfg)  # refuses an unusable device before any work
        unknown = sorted(set(inputs_outside_config) - {"data", "model"})
        if unknown:
            raise ValueError(f"inputs_outside_config may name 'data' and 'model', got {unknown}")
        self.inputs_outside_config = tuple(inputs_outside_config)
        self._key_dir: Path | None = None
        self._budget_plans: dict[str, Any] = {}
        self._sizes_checked = False
        self._data_checked = False
        self._context_checked = False
        self.keystore_created: bool = False
        #: Parties whose keys this run added to an existing key store that lacked them (a
        #: store made by ``keys init`` for fewer clients); recorded in results.json.
        self.keystore_extended: tuple[str, ...] = ()
        #: How key-store errors name ``keystore`` (the CLI sets its ``--keystore`` flag).
        self.keystore_option: str = API_KEYSTORE_OPTION
        self._extension_recorded = False  # keystore_extended.json written by this process
        # Binds every in-process envelope to this run and its method (messages never outlive
        # the process, so a fresh random id per Simulation is enough).
        self.run_nonce = secrets.token_hex(8)
        self.clients = list(clients) if clients is not None else build_clients(cfg)
        self.fingerprint = fingerprint_clients(self.clients)
        #: The hash that binds this run's checkpoints, results.json and anchor: ``cfg``'s, or
        #: on resume that of the run's config.toml (``cfg`` may amend ``fedora.max_pull``).
        self.config_hash = config_hash(cfg)
        #: On resume, the amendments ``cfg`` makes to the run's configuration, recorded when
        #: the first unfinished method continues (None: not resumed, or recorded).
        self._pending_amendments: list[dict[str, Any]] | None = None
        self._resume_bound = False
        self._model_checked = False  # a resume's checkpoints were matched to the model
        self.progress = progress
        self.method_factory = method_factory
        self.context_factory = context_factory
        self.history: list[dict[str, Any]] = []
        self.methods: dict[str, FederatedMethod] = {}
        self.privacy: dict[str, dict[str, Any]] = {}
        self.on_privacy_plan: Callable[[list[dict[str, Any]]], None] | None = None
        # Seconds per round of this process (not persisted): training (FEDORA's includes its
        # propagation), evaluation, checkpoint; and of each method's setup (relatedness).
        self.round_timings: dict[str, list[dict[str, float]]] = {}
        self._eval_packed: dict[int, Any] = {}  # packed val/test splits of the method being run
        # the clients whose final-evaluation reply was accepted with a metric left out (not a
        # number in [0, 1]), by method: they answered (a DP client's report was taken)
        self._answered_invalid: dict[str, set[int]] = {}
        # By method: each DP client's latest ledger report the server accepted (its
        # evaluation replies'), which the next must extend, as on Flower
        self._ledger_reports: dict[str, dict[int, dict[str, Any]]] = {}
        self.setup_seconds: dict[str, float] = {}
        # the methods this run's resume found finished in their checkpoints (trained nothing)
        self._found_finished: set[str] = set()
        # run() removes the methods' partial checkpoint copies once every method ran (a
        # later method's resume checks may still refuse the resume); run_method alone does
        # it once its own checks passed
        self._keep_interrupted_checkpoints = False

    # -- checkpoints --------------------------------------------------------------------
    def checkpoint_path(self, method: str) -> Path:
        """``RUN/checkpoints/<method>.pt``, the method's checkpoint file."""
        return self.run_dir / "checkpoints" / f"{method}.pt"

    def _identity(self) -> dict[str, str]:
        return {"config_hash": self.config_hash, "data_fingerprint": self.fingerprint}

    def _check_identity(self, state: dict[str, Any], path: Path) -> None:
        for key, expected in self._identity().items():
            if key == "data_fingerprint" and state.get(key) != expected and \
                    state.get(key) == legacy_fingerprint_clients(self.clients):
                continue  # written before per-client digests were combined: the same data
            if state.get(key) != expected:
                # the config is hashed as written; the data is what its source returned now
                why = (": the data changed since the run started (a data source must return the "
                       "same data for the same seed: draw from the seed it is given, not from a "
                       "global generator, and keep its files unchanged); restore that data, or "
                       "start a new run in another directory" if key == "data_fingerprint" else "")
                raise CheckpointError(
                    f"checkpoint {path} was written for another {key.replace('_', ' ')} "
                    f"({state.get(key)!s:.12} != {expected:.12}){why}; refuse to resume"
                )

    def _check_model(self, module: torch.nn.Module) -> None:
        """Refuse (CheckpointError, before anything is written) a resume with a model of
        another architecture than the one the run's checkpoints, or its DP ledger folders'
        ``model.json`` (written with the ledgers, before the first release), record
        (:func:`~secure_fedora.learning.models.model_fingerprint`): a model given in Python,
        or a factory whose code changed, may have the run's parameter shapes and still be
        another model. A checkpoint that records none (written before the fingerprint) is
        accepted for a built-in ``[model] name`` only."""
        current = model_fingerprint(module)
        for name in self.cfg.methods:
            path = self.run_dir / "ledgers" / name / MODEL_RECORD
            if not path.is_file():
                # the record is created with the ledgers (one rename): ledgers without it
                # mean it was lost, and a run resumed without it fails `audit verify`
                if path.parent.is_dir() and ledger_files(path.parent):
                    raise CheckpointError(
                        f"{path} is missing (it is created with the method's ledgers, which "
                        "are there): the record of the model the ledgers' releases come from "
                        "was lost; refuse to resume (restore model.json from a copy of the run "
                        "directory, or start a new run)")
                continue
            problem = model_record_problem(path, module)
            if problem is not None:
                raise CheckpointError(f"{path} {problem}; refuse to resume"
                                      + (" (resume with the run's model, or start a new run)"
                                         if "another model" in problem else ""))
        built_in = self.cfg.model.factory is None and "model" not in self.inputs_outside_config
        for name in self.cfg.methods:
            path = self.checkpoint_path(name)
            if not path.is_file():
                continue
            recorded = checkpoint_binding(path).get("model_fingerprint")
            if recorded == current or (recorded is None and built_in):
                continue
            if recorded is None:
                raise CheckpointError(
                    f"checkpoint {path} records no model architecture (written by an earlier "
                    "version), so the model given in Python or by model.factory cannot be "
                    "matched to the run's; refuse to resume (start a new run)")
            state = load_checkpoint(path)
            difference = architecture_difference(state.get("model_architecture") or [],
                                                 model_architecture(module))
            what = difference or f"fingerprint {recorded!s:.12} != {current:.12}"
            raise CheckpointError(f"checkpoint {path} was written for another model ({what}); "
                                  "refuse to resume (resume with the run's model, or start a "
                                  "new run)")

    # -- one method ---------------------------------------------------------------------
    @property
    def key_dir(self) -> Path:
        """Where this run's private keys live: the key store of a DP run (outside the run
        directory; resolved as :mod:`secure_fedora.secure.keystore` describes and created on first
        use), ``run_dir/keys`` for a run without privacy."""
        if self._key_dir is None:
            if not self.cfg.privacy.enabled:
                self._key_dir = self.run_dir / "keys"
            else:
                from secure_fedora.secure.keystore import (
                    check_keystore,
                    creation_notice,
                    ensure_keystore,
                    extension_notice,
                    keystore_choices,
                    resolve_keystore,
                    run_party_ids,
                )

                path, source = resolve_keystore(self.cfg.name, self.cfg.security.keystore,
                                                self.keystore_override, self.keystore_option)
                # the checks a sweep makes for its DP cells before any cell runs
                check_keystore(path, source, self.run_dir)
                published = self.run_dir / "keys" / "allowlist.json"
                if published.exists() and not path.exists():
                    from privacy.identity import IdentityError

                    # a run that already published its keys continues only with the store
                    # that holds them: a fresh store could not, so none is created
                    raise IdentityError(
                        f"key store {path} ({source}) does not exist, but this run's ledgers are "
                        f"signed by the keys published in {published}; pass the run's key store "
                        f"({keystore_choices(self.keystore_option, ', or ')}); nothing was "
                        "written")
                store = ensure_keystore(path, run_party_ids(len(self.clients)), source,
                                        self.keystore_option)
                self.keystore_created = store.created
                self.keystore_extended = store.added
                # recorded now in a run directory bound to this run (the CLI's); else once
                # _open_privacy has written its config copy
                if (self.run_dir / "config.toml").is_file():
                    self._record_extension()
                if store.created:
                    log.warning(creation_notice(path, source, self.keystore_option))
                elif store.added:
                    log.warning(extension_notice(path, source, store.added))
                self._key_dir = path
        return self._key_dir

    def budget_plans(self, name: str) -> Any:
        """``check_budget_plans`` of method ``name`` (accountant choice and calibrated plans),
        computed once per run: raises ``BudgetPlanError`` for a plan over budget. Call it before
        :attr:`key_dir` so that a refused run makes no key."""
        if name not in self._budget_plans:
            from secure_fedora.secure.private import check_budget_plans

            self._budget_plans[name] = check_budget_plans(self.cfg, name, len(self.clients))
        return self._budget_plans[name]

    def check_model_sizes(self) -> None:
        """Refuse (before anything is written or released) a configured method that cannot
        run on the run's model (:func:`~secure_fedora.algorithms.contract.check_model_sizes`,
        e.g. more IFCA clusters than a message can carry); builds the model only when a
        configured method checks it. Call it before :attr:`key_dir`."""
        if self._sizes_checked:
            return
        names = model_size_checked(self.cfg.methods)
        if names:
            ctx = self.context_factory(self.cfg, self.clients)
            check_model_sizes(names, self.cfg, ctx.flat.num_params, ctx.init.dtype)
        self._sizes_checked = True

    def check_data(self) -> None:
        """Refuse (before anything is written or released) a configured method that cannot
        run on the run's data (:func:`~secure_fedora.algorithms.contract.check_data_facts`,
        e.g. FEDORA's ``q`` above the summary width): a ConfigError naming the key. Call it
        before :attr:`key_dir`."""
        if self._data_checked:
            return
        names = data_checked(self.cfg.methods)
        if names:
            check_data_facts(names, self.cfg, data_facts(self.clients))
        self._data_checked = True

    def check_context(self) -> None:
        """Build the run's method context once, for its checks alone (labels, the model's
        output width, the loss, AUC's classes and, under DP, exact per-sample gradients:
        :func:`build_context`), so that a run they refuse fails before :attr:`key_dir` makes
        a key store; each method still builds its own fresh context."""
        if not self._context_checked:
            self.context_factory(self.cfg, self.clients)
            self._context_checked = True

    def run_method(self, name: str, resume: bool = False) -> MethodOutcome:
        """Run (or resume) one method to the configured number of rounds; with privacy, a
        finished method's ledgers end with their signed close entry. A ``resume`` that is
        not a bool is a ConfigError. As in :meth:`run`, torch runs on ``training.threads``
        (when set) with float32 as its default dtype while the method runs, and the
        process's own settings are set back after it (also when it raises): the figures do
        not depend on what the caller's process had set."""
        from secure_fedora.learning.devices import threads_applied

        check_flag_argument(resume, "resume")
        with threads_applied(self.cfg):
            return self._one_method(name, resume)

    def _one_method(self, name: str, resume: bool) -> MethodOutcome:
        if resume:
            self._bind_resume()
        cfg = self.cfg
        # check_data() already asked every configured method (its warnings said once)
        if data_checked([name]) and not (self._data_checked and name in cfg.methods):
            check_data_facts([name], cfg, data_facts(self.clients))
        ctx = self.context_factory(cfg, self.clients)
        check_model_sizes([name], cfg, ctx.flat.num_params, ctx.init.dtype)
        if resume and not self._model_checked:
            self._check_model(ctx.flat.module)  # every method's checkpoint, before any write
            self._model_checked = True
        privacy = self._open_privacy(name, resume, ctx.flat.module)
        ctx.privacy = privacy
        if privacy is not None:
            privacy.loss = ctx.flat.task.checked
        try:
            outcome = self._run_method(name, ctx, privacy, resume)
            if privacy is not None:
                privacy.close_ledgers(cfg.training.rounds)
            return outcome
        finally:
            if privacy is not None:
                # the fingerprint model.json records, here under the anchor's digest of
                # results.json, so that an audit can check that file against signed data
                self.privacy[name] = privacy.summary(
                    model_fingerprint=model_fingerprint(ctx.flat.module))
                privacy.close()

    def _bind_resume(self) -> None:
        """Bind a resume to the run directory's configuration (once): checkpoints and results
        carry its config.toml's hash, and a ``cfg`` that differs from the run's (amended)
        configuration only in ``fedora.max_pull`` is noted for :meth:`_record_amendments`.
        A config that differs in anything else is refused (RunDirError, before anything is
        written), as ``rundir.check_resumable`` refuses it before the CLI or
        ``Experiment.run`` starts: the journal alone does not refuse it for a client that had
        released nothing when the run was killed, which would then run under another budget
        than its config.toml states."""
        from secure_fedora.runtimes.rundir import check_amendable, resume_binding

        if not self._resume_bound:
            self.config_hash, changes = resume_binding(self.run_dir, self.cfg, "run(resume=True)")
            check_amendable(self.run_dir, self.cfg, changes, cli=False)
            self._resume_bound = True
            self._pending_amendments = changes or None

    def _record_amendments(self, method: str | None, start_round: int | None,
                           private: bool = False) -> None:
        """Write the resume's amendments to the run directory (before ``method`` continues
        from ``start_round``), each with the round from which it applies
        (:func:`~secure_fedora.runtimes.rundir.amendment_round`), and say so."""
        from secure_fedora.runtimes.rundir import (
            AMENDMENTS,
            STOPPED,
            amendment_applies_to,
            amendment_round,
            record_amendments,
        )

        if self._pending_amendments:
            effective = None if method is None or start_round is None else \
                amendment_round(self.run_dir, method, start_round, private, self._resume_name())
            applies_to = None
            if method is not None and effective is not None:
                # (readers before ``method`` have finished: check_amendable refused a change
                # none of the others reads)
                applies_to = {c["key"]: amendment_applies_to(self.cfg, c["key"], method, effective)
                              for c in self._pending_amendments}
            record_amendments(self.run_dir, self._pending_amendments, method, start_round,
                              effective, applies_to)
            for c in self._pending_amendments:
                shown = ", ".join(f"round {r} of {m}" for m, r in applies_to[c["key"]].items()) \
                    if applies_to else f"round {effective} of {method}"
                log.warning("resumed with %s = %s (the run had %s) from %s: recorded in %s",
                            c["key"], c["to"], c["from"], shown, self.run_dir / AMENDMENTS)
        self._pending_amendments = None
        if method is not None:
            (self.run_dir / STOPPED).unlink(missing_ok=True)  # read only by the line above

    def _amended_attributes(self, name: str, method: Any) -> Callable[[int], None]:
        """Sets, before each round, the method attributes of amended keys
        (:data:`AMENDED_ATTRIBUTES`) to their value for that round: a round the stopped run
        released is re-made under the value it ran with."""
        from secure_fedora.runtimes.rundir import (
            CONFIG_COPY,
            amended_value,
            config_value,
            recorded_amendments,
        )

        amendments = recorded_amendments(self.run_dir) if self._resume_bound else []
        keys = {a["key"] for a in amendments if AMENDED_ATTRIBUTES.get(a["key"]) is not None
                and hasattr(method, AMENDED_ATTRIBUTES[a["key"]])}
        if not keys:
            return lambda rnd: None
        base = load_config(self.run_dir / CONFIG_COPY)
        methods = list(self.cfg.methods)

        def apply(rnd: int) -> None:
            for key in keys:
                value = amended_value(amendments, key, config_value(base, key), name, methods, rnd)
                setattr(method, AMENDED_ATTRIBUTES[key], value)

        return apply

    def _open_privacy(self, name: str, resume: bool = False,
                      module: torch.nn.Module | None = None) -> Any:
        if not self.cfg.privacy.enabled:
            return None
        from secure_fedora.secure.keystore import (
            check_public_keys,
            publish_public_keys,
            run_party_ids,
        )
        from secure_fedora.secure.private import FederationPrivacy

        # calibrate first: a plan over budget refuses the run before its keys are published
        calibrated = self.budget_plans(name)
        # FederationPrivacy.open holds every client's ledger open: too few descriptors
        # refuse the run here, before its first privacy record is written
        ensure_descriptors(len(self.clients), f"{len(self.clients)} clients' ledgers")
        key_dir = self.key_dir
        parties = run_party_ids(len(self.clients))
        # the run's first privacy record binds the directory to this config: a resume before
        # the first checkpoint (the Python API's runs have no other copy) is checked against it
        self._write_config_copy()
        self._record_extension()
        # another store: nothing written
        check_public_keys(key_dir, self.run_dir / "keys", parties, self.keystore_option)
        # the model these ledgers' releases come from is recorded with them (the same
        # rename), so a resume before the first checkpoint is matched to it too
        record = None if module is None else {MODEL_RECORD: model_record(module)}
        privacy = FederationPrivacy.open(self.cfg, name, len(self.clients),
                                         self.run_dir / "ledgers" / name, key_dir,
                                         resume=resume, calibrated=calibrated, with_files=record)
        # Published once every ledger file exists (empty until the first release): a run
        # killed before its first release is resumed from the start (rundir.check_resumable
        # reads those empty ledgers as "nothing released"), while published keys without
        # ledgers mean the ledgers were lost.
        try:
            publish_public_keys(key_dir, self.run_dir / "keys", parties, self.keystore_option)
        except BaseException:
            privacy.close()
            raise
        crash_point("keys_published")
        rows = privacy.plan_rows()
        if self.on_privacy_plan:
            self.on_privacy_plan(rows)
        if rows and rows[0].get("pull_warning"):
            log.warning("%s: %s", name, rows[0]["pull_warning"])
        return privacy

    def _run_method(self, name: str, ctx: MethodContext, privacy: Any, resume: bool) -> MethodOutcome:
        cfg = self.cfg
        if cfg.security.envelopes:
            # before its envelope keys: a run killed before its first checkpoint is bound to
            # this configuration, so it is resumed (rundir.check_resumable), also from Python
            self._write_config_copy()
            ctx.transport_factory = self._transport_factory(name, privacy)
            ctx.exchange_factory = self._exchange_factory(name, ctx.transport_factory)
        method = self.method_factory(name, ctx, cfg)
        self.methods[name] = method
        self._answered_invalid[name] = set()
        n = len(self.clients)
        tracker = Tracker.empty(n, select_final=model_selection(cfg) == "final_round")
        round_gen = torch.Generator().manual_seed(cfg.seed + 7919)
        start_round = 1
        history: list[dict[str, Any]] = []
        timing = {"training": 0.0, "evaluation": 0.0}
        self.round_timings[name] = []
        path = self.checkpoint_path(name)
        # run_method alone: its partial checkpoint copies go once its resume checks passed
        tidy = resume and not self._keep_interrupted_checkpoints
        if resume and path.exists():
            state = load_checkpoint(path)
            self._check_identity(state, path)
            if state.get("method_name", name) != name:
                raise CheckpointError(
                    f"checkpoint {path} was written by method {state['method_name']!r}, not "
                    f"{name!r}; refuse to resume (restore {path.name} or start a new run)")
            if state.get("outcome") is not None:
                try:  # e.g. a model given in Python whose parameters differ from the run's
                    method.load_state_dict(state["method"])
                except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
                    raise unrestorable(f"checkpoint {path}", err)  # noqa: B904 (its cause set)
                if privacy is not None:
                    privacy.resume_after(int(state["round"]), state.get("privacy"),
                                         continues=False)
                self.history.extend(state["history"])
                self._found_finished.add(name)
                if tidy:
                    self._remove_interrupted_checkpoints([name])
                return MethodOutcome(**state["outcome"])
            self._restore(state, method, tracker, round_gen, ctx, path)
            if privacy is not None:
                # rounds after the checkpoint are computed again; their ledger entries are
                # consumed, not appended, and journaled releases re-made, not redrawn
                privacy.resume_after(int(state["round"]), state.get("privacy"))
            start_round = int(state["round"]) + 1
            method.last_round = start_round - 1
            history = list(state["history"])
            timing = dict(state["timing"])
            del state  # its tensors are copied into the method: not held through the run
        else:
            from secure_fedora.runtimes.rundir import recorded_as_finished

            if resume and recorded_as_finished(self.run_dir, name):
                # under DP refused before (rundir: its ledgers are closed); without, nothing
                # signed depends on it, but the user must know it is not a no-op
                log.warning(
                    "checkpoint %s is missing although results.json records %r as finished: "
                    "its outcome was lost, so %r is trained again from scratch (from the "
                    "run's seed), and rounds.csv and results.json are rewritten; restore the "
                    "checkpoint from a copy of the run directory to keep them", path, name,
                    name)
            if resume and privacy is not None:
                privacy.resume_after(None, None)
            t0 = time.perf_counter()
            method.setup()
            self.setup_seconds[name] = time.perf_counter() - t0
        if tidy:
            self._remove_interrupted_checkpoints([name])
        self._record_amendments(name, start_round, privacy is not None)
        amend = self._amended_attributes(name, method)
        self._attach_security(name, method, start_round - 1, privacy)
        rounds = cfg.training.rounds
        due = _CheckpointSchedule(cfg.training.checkpoint_every)
        # the declared round release, checked by admitted_releases when privacy was opened
        with_lambda = privacy is not None and "gaussian_lambda" in round_mechanisms(name, cfg)
        for rnd in range(start_round, rounds + 1):
            participants = self._participants(round_gen, n)
            sampled = len(participants)
            admit = None
            if privacy is not None:
                # asked by train_round after the client verified its downloads, as a Flower
                # ClientApp admits its release only for a message it accepted
                def admit(i: int, rnd: int = rnd) -> bool:
                    return privacy.admit(i, rnd, method.theta[i], with_lambda, noise=ctx.noise[i])
            t0 = time.perf_counter()
            method.round_replied = None
            amend(rnd)
            # under DP, FederatedMethod.train_round (which make_method keeps) checks every
            # admitted participant's executed steps before aggregate sees a reply
            try:
                stats = check_round_statistics(
                    name, rnd, (method.train_round(rnd, participants, admit) if admit is not None
                                else method.train_round(rnd, participants)) if participants
                    else no_reply_statistics())
            except ToolkitError as err:
                if privacy is not None and participants \
                        and getattr(method, "uploads_begun", None) not in (None, rnd):
                    from secure_fedora.runtimes.rundir import record_stop

                    record_stop(self.run_dir, name, rnd)  # a resume may amend from this round
                if isinstance(err, ClientUpdateError) and not str(err).startswith(f"{name} round "):
                    # a client's diverged update names its client; the run names where, as
                    # the Flower server's message does (the same type and attributes, such
                    # as a BatchedTrainingError's failed clients)
                    named = type(err).__new__(type(err))
                    named.__dict__.update(err.__dict__)
                    named.args = (f"{name} round {rnd}: {err}",)
                    raise named from err
                raise
            if not participants:  # nobody sampled: the evaluation is still round rnd's
                method.last_round = rnd
            replied = method.round_replied  # set just above, so always present
            seconds = {"round": rnd, "training": time.perf_counter() - t0,
                       "evaluation": 0.0, "checkpoint": 0.0}
            timing["training"] += seconds["training"]
            # every round's row (its statistics, e.g. unstable_pulls, are not kept elsewhere);
            # the evaluation columns only in evaluated rounds, as on Flower. participants: the
            # round's draw; replied: those whose update the round used (the admitted ones
            # whose uploads were accepted; every admitted one where the method does not count)
            row: dict[str, Any] = {"method": name, "round": rnd, "participants": sampled,
                                   "replied": len(participants) if replied is None or
                                   not participants else replied, **stats}
            if rnd % cfg.evaluation.every == 0 or rnd == rounds:
                t0 = time.perf_counter()
                row.update(self._evaluate(rnd, name, method, tracker))
                seconds["evaluation"] = time.perf_counter() - t0
                timing["evaluation"] += seconds["evaluation"]
            if ctx.buffers is not None:  # before this round's state is kept
                ctx.buffers.check(f"in round {rnd}")
            history.append(row)
            # The last round's state is written below, with the outcome.
            if rnd < rounds and due(rnd):
                crash_point("checkpoint")
                t0 = time.perf_counter()
                save_checkpoint(path, self._state(rnd, method, tracker, round_gen, ctx, history, timing))
                seconds["checkpoint"] = time.perf_counter() - t0
                due.written(seconds["checkpoint"])
                crash_point("checkpoint_written")
            self.round_timings[name].append(seconds)
            if self.progress:
                self.progress(name, rnd, rounds)
        self._check_evaluated(name, tracker, privacy is not None)
        outcome = MethodOutcome(
            name=name,
            selected={**summarize(tracker.test_at_best), "round": int(tracker.best_round),
                      **stale_clients(metric_rounds(tracker.selected_metric_round),
                                      int(tracker.best_round), n),
                      **unmeasured_rounds(history, int(tracker.eligible_from))},
            final={**summarize(tracker.last_test),
                   **stale_clients(metric_rounds(tracker.metric_round), rounds, n)},
            rounds=rounds,
            seconds_training=round(timing["training"], 3),
            seconds_evaluation=round(timing["evaluation"], 3),
            extra=method.extra_results(),
        )
        state = self._state(rounds, method, tracker, round_gen, ctx, history, timing)
        state["outcome"] = outcome.to_json()
        crash_point("checkpoint")
        t0 = time.perf_counter()
        save_checkpoint(path, state)
        crash_point("checkpoint_written")
        if self.round_timings[name]:
            self.round_timings[name][-1]["checkpoint"] = time.perf_counter() - t0
        self.history.extend(history)
        return outcome

    def _remove_interrupted_checkpoints(self, names: Sequence[str]) -> None:
        """Delete the partial checkpoint copies of methods ``names`` that a process killed
        while writing one left (as large as a checkpoint each); called while this process
        holds the run directory, once the resume's checks that could refuse it passed."""
        for name in names:
            for leftover in remove_interrupted_writes(self.checkpoint_path(name)):
                log.warning("removed %s, a checkpoint write that was interrupted", leftover)

    def _check_evaluated(self, name: str, tracker: Tracker, private: bool) -> None:
        """Refuse to complete a run whose results would rest on metrics no client reported,
        as the Flower server does: a client never evaluated (every evaluation message it was
        sent, or every reply of its metrics, rejected: its figure would be a placeholder 0) or,
        under DP, one whose final evaluation was rejected in both tries (message or reply; on
        Flower the server would not have its closing report)."""
        from secure_fedora.algorithms.methods import EvaluationRejectedError

        rounds = self.cfg.training.rounds
        metric_round = tracker.metric_round.tolist()
        silent = [c for c, r in enumerate(metric_round) if r < 0]
        if silent:
            raise EvaluationRejectedError(
                f"{name}: clients {silent[:8]} never reported an evaluation (every evaluation "
                "message or reply of theirs was rejected), so their metrics are unknown and no "
                "results are written; see the rejections logged by secure_fedora.security")
        answered = self._answered_invalid.get(name, set())
        unanswered = [c for c, r in enumerate(metric_round)
                      if r != rounds and c not in answered] if private else []
        if unanswered:
            raise EvaluationRejectedError(
                f"{name}: clients {unanswered[:8]} rejected the final evaluation, or their "
                f"reply to it was rejected (round {rounds}, asked twice), which a DP client "
                "answers as it closes its ledger on Flower, so the run stops and no results are "
                "written, as there; see the rejections logged by secure_fedora.security")

    def _transport_factory(self, name: str, privacy: Any = None) -> Callable[[str], Any]:
        """``label -> SecureTransport`` for method ``name``'s own signed exchanges (nonce state
        in ``transport/<name>-<label>``, envelopes bound to this run and that exchange); with
        DP its client uploads are released through ``privacy``'s pipelines."""
        from secure_fedora.secure.transport import SecureTransport

        def open_transport(label: str) -> Any:
            transport = SecureTransport.for_simulation(
                self.run_dir, len(self.clients), f"{name}-{label}", key_dir=self.key_dir,
                context=f"{self.run_nonce}/{name}-{label}")
            if privacy is not None:
                transport.attach_releases(privacy)
            return transport

        return open_transport

    def _exchange_factory(self, name: str, open_transport: Callable[[str], Any]
                          ) -> Callable[[str], Any]:
        """``label -> SecureExchange`` tracking nothing, over a transport of its own
        (:meth:`_transport_factory`'s), for method ``name``'s generic setup exchange, which
        runs before the round exchange is attached. Its nonce memory starts afresh, as the
        round exchange's does: a setup runs again only when no checkpoint holds its result."""
        from secure_fedora.secure.transport import SecureExchange

        def open_exchange(label: str) -> Any:
            shutil.rmtree(self.run_dir / "transport" / f"{name}-{label}", ignore_errors=True)
            return SecureExchange(open_transport(label))

        return open_exchange

    def _attach_security(self, name: str, method: FederatedMethod, last_round: int,
                         privacy: Any = None) -> None:
        """With ``[security] envelopes``, a signed message exchange for every method (Local's
        empty messages and step counts, and a plug-in's whose ``message_state`` is None, too), tracking what
        :meth:`~secure_fedora.algorithms.methods.FederatedMethod.message_state` names. ``last_round`` is
        the last round already done (0 on a fresh start). Every client upload is signed by
        the client's release pipeline: ``privacy``'s under DP (step check before the
        signature), the unaccounted one (the signature alone) otherwise."""
        n = len(self.clients)
        if not self.cfg.security.envelopes:
            return
        from secure_fedora.secure.transport import SecureExchange, SecureTransport

        # None (the default a plug-in inherits) tracks nothing; its messages are signed all
        # the same, as a Flower run signs every message of every method
        uploads, downloads = method.message_state() or ({}, {})
        # Envelopes are bound to this process's run nonce, so a message of an earlier process
        # (a run resumed after a crash) is rejected by its context whatever the nonce memory
        # holds; that memory's round floor, though, would reject the rounds the resume replays
        # (older than the crashed process's last round). Each process starts its own memory.
        shutil.rmtree(self.run_dir / "transport" / name, ignore_errors=True)
        transport = SecureTransport.for_simulation(self.run_dir, n, name, key_dir=self.key_dir,
                                                   context=f"{self.run_nonce}/{name}")
        if privacy is not None:
            transport.attach_releases(privacy)
        method.attach_exchange(SecureExchange(transport, uploads=uploads, downloads=downloads,
                                              last_round=last_round))

    def _participants(self, gen: torch.Generator, n: int) -> list[int]:
        return sample_participants(gen, n, self.cfg.training.participation)

    def _evaluate(self, rnd: int, name: str, method: FederatedMethod, tracker: Tracker
                  ) -> dict[str, float]:
        from secure_fedora.learning.batched_eval import evaluate_many_sets, pack_split_sets
        from secure_fedora.secure.private import ledger_report

        flat = method.ctx.flat
        clients = method.ctx.clients  # on the run's device
        # With the final round selected (private validation data under DP) the validation
        # splits are not evaluated at all: nothing computed from them is kept or checkpointed.
        select_final = bool(tracker.select_final)
        packed = self._eval_packed.get(id(method))
        if packed is None:  # once per method run: every client's validation and test splits
            sets = [] if select_final else [[(c.val_x, c.val_y) for c in clients]]
            packed = pack_split_sets(flat, [*sets, [(c.test_x, c.test_y) for c in clients]])
            self._eval_packed = {id(method): packed}
        # All clients' rows at once (views, no copy), equal to ``evaluate`` per client within
        # float rounding of the loss; accuracy and AUC come from the same logits. One
        # evaluation_messages call for every client, as on Flower.
        # With envelopes a client that rejects its evaluation message, or whose signed
        # evaluation reply (its metrics) the server rejects, reports nothing and keeps its
        # last metrics, as on Flower (two tries in the final round); a slot without a row is
        # evaluated on another client's row (a view) and discarded.
        privacy = method.ctx.privacy

        def measure(rows: dict[int, Tensor]) -> dict[int, Tensor]:
            if not rows:
                return {}
            stand_in = next(iter(rows.values()))
            try:
                *val, test = evaluate_many_sets(flat, [rows.get(i, stand_in)
                                                       for i in range(len(clients))], packed)
            except Exception as err:
                from secure_fedora.core.plugins import raised_at

                # the user's model or loss raised (a frame of their code): name where; else a
                # toolkit error, or a toolkit bug keeping its traceback
                if isinstance(err, ToolkitError) or not raised_at(err):
                    raise
                raise _evaluation_failure(method, rnd, rows, select_final, err) from err
            # as a Flower client's reply: the validation metric only where it selects; under
            # DP its epsilon and ledger head after them
            return {i: torch.tensor(
                [test[i].metric, *([] if select_final else [val[0][i].metric]),
                 *([] if privacy is None else ledger_report(privacy.clients[i]))],
                dtype=torch.float64) for i in rows}

        accepted = method.evaluation_reports(range(len(clients)), measure,
                                             retry=rnd == self.cfg.training.rounds)
        if privacy is not None:
            self._check_ledger_reports(method, rnd, accepted, 1 if select_final else 2)
        fresh: list[int] = []
        invalid = self._answered_invalid.setdefault(name, set())
        for i, metrics in accepted.items():
            test, val = float(metrics[0]), 0.0 if select_final else float(metrics[1])
            if not all(0.0 <= v <= 1.0 for v in (test, val)):  # NaN fails too
                # as the Flower server takes such a reply: its ledger report (checked above)
                # counts, the metric is left out and the client keeps its last metrics
                log.warning("round %d: client %d: evaluation reply with a metric outside [0, 1]"
                            " (test %r, validation %r): keeps its last metrics", rnd, i, test, val)
                if rnd == self.cfg.training.rounds:
                    invalid.add(i)
                continue
            tracker.last_test[i], tracker.last_val[i] = test, val
            fresh.append(i)
            crash_point("evaluate")
        tracker.evaluated(rnd, fresh)
        tracker.update(rnd)
        # a round's statistics cover the clients whose metrics are this round's, as on Flower
        reported = None if len(fresh) == len(clients) else fresh
        return {**tracker.round_row(reported), "evaluated": len(fresh)}

    def _check_ledger_reports(self, method: FederatedMethod, rnd: int,
                              accepted: Mapping[int, Tensor], offset: int) -> None:
        """The server's check of the ledger state each DP client reported with its accepted
        evaluation reply (the values after ``offset`` metrics), as the Flower server checks
        every reply's: a report that does not extend the client's previous one (fewer
        entries, another last line at the same count, a lower epsilon) or states another
        epsilon for the same entries and last line stops the run with a LedgerError naming
        the client; otherwise it becomes the client's latest report."""
        from privacy.ledger import LedgerError
        from secure_fedora.secure.private import ledger_report_refusal, read_ledger_report

        label = next(n for n, m in self.methods.items() if m is method)
        seen = self._ledger_reports.setdefault(label, {})
        for i, values in accepted.items():
            report = read_ledger_report(values[offset:].tolist())
            problem = ledger_report_refusal(
                seen.get(i), report, who=f"{label}: client {i}",
                where=f"evaluation reply of round {rnd}",
                went_back_remedy="restore the ledger from a copy, or start a new run")
            if problem is not None:
                raise LedgerError(problem)
            seen[i] = report

    def _state(self, rnd: int, method: FederatedMethod, tracker: Tracker, round_gen: torch.Generator,
               ctx: MethodContext, history: list[dict[str, Any]], timing: dict[str, float]) -> dict[str, Any]:
        return {
            "round": rnd,
            "version": __version__,
            **self._identity(),
            "model_fingerprint": model_fingerprint(ctx.flat.module),
            "model_architecture": model_architecture(ctx.flat.module),
            # the registered name it runs under: a checkpoint copied to another method's file
            # is refused on resume
            "method_name": next(n for n, m in self.methods.items() if m is method),
            "method": method.state_dict(),
            "tracker": tracker.state_dict(),
            "round_generator": round_gen.get_state(),
            "client_generators": [g.get_state() for g in ctx.generators],
            "privacy": ctx.privacy.checkpoint_state() if ctx.privacy is not None else None,
            # the server's record of each DP client's last accepted ledger report, so that a
            # resumed run goes on checking that every report extends it
            "ledger_reports": [[i, dict(r)] for i, r in sorted(self._ledger_reports.get(
                next(n for n, m in self.methods.items() if m is method), {}).items())],
            # Reproducible noise: the generator states (derivable from the config anyway).
            # CSPRNG noise: None per client -- no key or stream state is ever written; a resume
            # draws fresh keys, and the ledger already accounts every release on both sides.
            "noise_states": [s.checkpoint_state() for s in ctx.noise],
            "history": history,
            "timing": timing,
            "outcome": None,
        }

    def _restore(self, state: dict[str, Any], method: FederatedMethod, tracker: Tracker,
                 round_gen: torch.Generator, ctx: MethodContext, path: Path) -> None:
        try:
            method.load_state_dict(state["method"])
            for key, value in state["tracker"].items():
                getattr(tracker, key).copy_(value)
            if "metric_round" not in state["tracker"]:
                # a checkpoint from before envelopes covered evaluation: every client reported
                # in every evaluated round
                last = max((int(r["round"]) for r in state["history"] if "test_mean" in r),
                           default=-1)
                tracker.metric_round.fill_(last)
                tracker.selected_metric_round.fill_(int(tracker.best_round) if last >= 0 else -1)
            if "eligible_from" not in state["tracker"]:
                # a checkpoint from before the rule: every evaluated round counted
                tracker.eligible_from.fill_(min(
                    (int(r["round"]) for r in state["history"] if "test_mean" in r), default=-1))
            round_gen.set_state(state["round_generator"])
            label = next(n for n, m in self.methods.items() if m is method)
            self._ledger_reports[label] = _ledger_record(state.get("ledger_reports", []),
                                                         len(ctx.clients))
            gens = state["client_generators"]
            if len(gens) != len(ctx.generators):
                raise ValueError(f"{len(gens)} client generators for {len(ctx.generators)} clients")
            for g, s in zip(ctx.generators, gens, strict=True):
                g.set_state(s)
            noise_states = state.get("noise_states", [])
            if len(noise_states) != len(ctx.noise):
                raise ValueError(f"{len(noise_states)} noise states for {len(ctx.noise)} noise sources")
            for source, s in zip(ctx.noise, noise_states, strict=True):
                source.restore_state(s)
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
            raise unrestorable(f"checkpoint {path}", err)  # noqa: B904 (its cause set)

    # -- the whole experiment -----------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run every configured method; write rounds.csv and results.json; return the results.
        Under DP every method's budget plan is checked first: a plan over budget refuses the
        run before any method trains (as the CLI does); so is every method's fit to the model
        (:meth:`check_model_sizes`) and to the data (:meth:`check_data`). Partial copies of the run's result files
        that a process killed while writing one left in the run directory are removed first.
        A fresh run (``resume`` False) needs a new or empty ``run_dir`` (or one holding only
        this configuration's ``config.toml``): RunDirError otherwise, before anything is
        written. A ``resume`` that is not a bool is a ConfigError. The run directory is held
        (:func:`~secure_fedora.runtimes.rundir.hold_run_dir`) until the run ends: another
        process running or resuming in it meanwhile is a RunDirError. torch runs on
        ``training.threads`` (when set) while the run runs; the process's own thread count
        is set back after it."""
        from secure_fedora.core.plugins import one_run
        from secure_fedora.learning.devices import threads_applied
        from secure_fedora.runtimes.rundir import hold_run_dir

        fresh = not check_flag_argument(resume, "resume")
        with hold_run_dir(self.run_dir, create=fresh), threads_applied(self.cfg), one_run():
            return self._run(resume, fresh)

    def _run(self, resume: bool, fresh: bool) -> dict[str, Any]:
        from secure_fedora.runtimes.results import (
            check_method_assumptions,
            remove_interrupted_result_writes,
            write_run_results,
        )
        from secure_fedora.runtimes.rundir import check_fresh_run_dir

        if fresh:  # another run's results, checkpoints or ledgers are never overwritten
            check_fresh_run_dir(self.run_dir, self.cfg, cli=False)
        p = self.cfg.privacy
        if p.enabled:
            if resume:  # a damaged key-store record is refused before anything is written
                self._recorded_extension()
            for name in self.cfg.methods:
                self.budget_plans(name)
        self.check_model_sizes()  # every method before the first runs
        self.check_data()
        check_method_assumptions(self.cfg)  # results.json states them: asked before training
        if p.enabled and self.cfg.data.validation == "public" and p.lambda_noise_multiplier:
            # not refused by the config: runs that set it before stay loadable for audits
            log.warning("privacy.lambda_noise_multiplier = %g is unused: with public validation "
                        "data (data.validation = 'public') FEDORA's lambda is released without "
                        "noise", p.lambda_noise_multiplier)
        if (self.cfg.privacy.enabled or self.cfg.security.envelopes) \
                and not (self.run_dir / "config.toml").is_file():
            from secure_fedora.core.config import config_document

            # written before the first ledger or envelope key (and by the anchor): fail now
            config_document(self.cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        outcomes = {}
        self._found_finished = set()
        self._keep_interrupted_checkpoints = True
        try:
            for name in self.cfg.methods:
                outcomes[name] = self.run_method(name, resume=resume)
                if name not in self._found_finished:  # a finished one's rows: checked below
                    self.write_rounds_csv()
                crash_point("between_methods")
        finally:
            self._keep_interrupted_checkpoints = False
        self._record_amendments(None, None)  # every method had finished
        # a resume of a finished run trains nothing: it keeps the run's result files whole
        # (an anchor.json copy kept apart still verifies) and writes only one that is
        # missing or damaged, e.g. after a kill between the last checkpoint and results.json
        trained_nothing = resume and self._found_finished == set(self.cfg.methods)
        # partial copies of results.json, rounds.csv or a plot that a process killed while
        # writing one left beside it (the files themselves are replaced atomically); removed
        # only once every method's resume checks passed, so a refused resume changes no file
        for leftover in remove_interrupted_result_writes(self.run_dir):
            log.warning("removed %s, a result write that was interrupted", leftover)
        if resume:  # the same for partial checkpoint copies
            self._remove_interrupted_checkpoints(self.cfg.methods)
        results = self.results(outcomes)
        crash_point("results")
        dp = self.cfg.privacy.enabled
        return write_run_results(self.run_dir, results, self.history,
                                 trained_nothing=trained_nothing,
                                 anchor=self.write_anchor if dp else None,
                                 anchored=self._anchor_kept if dp else None, warn=log.warning)

    def _anchor_kept(self) -> bool:
        """Whether the run's anchor.json anchors the run as it stands (its results.json and
        config.toml bytes, every ledger's head), signed by the run's operator key:
        :meth:`write_anchor` then keeps it byte for byte."""
        if not (self.run_dir / "results.json").is_file() \
                or not (self.run_dir / "config.toml").is_file():
            return False
        from secure_fedora.secure.anchor import ANCHOR_FILENAME, anchors_the_same

        return anchors_the_same(self.run_dir / ANCHOR_FILENAME, self._anchor_doc())

    def _write_config_copy(self) -> None:
        """Write ``config.toml`` from the validated config unless the run directory has one
        (the CLI writes the user's file before the run starts)."""
        if not (self.run_dir / "config.toml").is_file():
            import tomli_w

            from secure_fedora.core.config import config_document

            atomic_write_text(self.run_dir / "config.toml", tomli_w.dumps(config_document(self.cfg)))

    def write_anchor(self) -> bool:
        """Sign (operator key, from the key store) and write ``anchor.json``: every ledger's
        final index and head, the digests of results.json and config.toml, the methods.
        Call after results.json is written; a config.toml missing from the run directory is
        written first from the validated config. False when the anchor there already anchors
        the run as it stands and is kept byte for byte."""
        from secure_fedora.secure.anchor import write_anchor

        self._write_config_copy()
        return write_anchor(self.run_dir, self._anchor_doc())

    def _anchor_doc(self) -> dict[str, Any]:
        """The signed anchor document of the run as it stands (see :meth:`write_anchor`)."""
        from privacy.identity import load_identity
        from secure_fedora.secure.anchor import build_anchor
        from secure_fedora.secure.keystore import OPERATOR_ID

        ledgers = {}
        for method, summary in self.privacy.items():
            for row in summary["clients"]:
                ledgers[f"{method}/{row['client']}"] = {
                    "entries": row["ledger_entries"], "head": row["ledger_head"],
                    "epsilon_spent": row["epsilon_spent"]}
        return build_anchor(self.run_dir, run_name=self.cfg.name, config_hash=self.config_hash,
                            methods=list(self.cfg.methods), ledgers=ledgers,
                            signer=load_identity(self.key_dir, OPERATOR_ID))

    def results(self, outcomes: dict[str, MethodOutcome]) -> dict[str, Any]:
        """The results document (:func:`secure_fedora.runtimes.results.build_results`, the
        schema both runtimes share): run identity, per-method summaries and comparisons."""
        from secure_fedora.runtimes.results import (
            build_results,
            checkpoints_statement,
            client_rows,
            inputs_outside_config_assumption,
            timing_statement,
        )
        from secure_fedora.runtimes.rundir import recorded_amendments

        extended = self._recorded_extension() if self.cfg.privacy.enabled else []
        runtime_keys: dict[str, Any] = {"keystore_extended": extended} if extended else {}
        amendments = recorded_amendments(self.run_dir)
        if amendments:
            runtime_keys["config_amendments"] = amendments
        return build_results(
            self.cfg, runtime="in-process", config_hash=self.config_hash,
            metric=self.metric_name(), outcomes={n: o.to_json() for n, o in outcomes.items()},
            privacy=self.privacy, data_fingerprint=self.fingerprint,
            compute={"device": str(self.device), "threads": torch.get_num_threads()},
            assumptions={
                **inputs_outside_config_assumption(self.inputs_outside_config),
                **({"checkpoints": checkpoints_statement(self.cfg),
                    "timing": timing_statement("in-process")}
                   if self.cfg.privacy.enabled else {})},
            runtime_keys=runtime_keys or None,
            clients=client_rows([{"id": c.client_id, "train": c.train_x.shape[0],
                                  "val": c.val_x.shape[0], "test": c.test_x.shape[0], **c.meta}
                                 for c in self.clients]))

    def _record_extension(self) -> None:
        """Write the parties this process added to the key store into the run directory's
        ``keystore_extended.json`` (atomically, with those it already lists), so that a run
        interrupted before results.json still lists them once resumed; once per process."""
        from secure_fedora.runtimes.rundir import KEYSTORE_RECORD, recorded_keystore_extension

        if not self.keystore_extended or self._extension_recorded:
            return
        parties = recorded_keystore_extension(self.run_dir, self._resume_name())
        parties += [p for p in self.keystore_extended if p not in parties]
        atomic_write_text(self.run_dir / KEYSTORE_RECORD,
                          strict_json({"keystore_extended": parties}))
        self._extension_recorded = True

    def _resume_name(self) -> str:
        """How errors name resuming: the CLI's ``--resume`` (whose key-store errors name its
        flag), else the Python API's."""
        from secure_fedora.secure.keystore import CLI_KEYSTORE_OPTION

        return "--resume" if self.keystore_option == CLI_KEYSTORE_OPTION else "run(resume=True)"

    def _recorded_extension(self) -> list[str]:
        """The parties this run added to its key store, in any of its processes: those its
        ``keystore_extended.json`` and results.json record, then this process's. A record that
        cannot be read is a RunDirError naming the file (as a resume refuses it), never
        dropped."""
        from secure_fedora.runtimes.rundir import recorded_keystore_extension

        parties = recorded_keystore_extension(self.run_dir, self._resume_name())
        return parties + [p for p in self.keystore_extended if p not in parties]

    def metric_name(self) -> str:
        """The metric model selection and results use: "accuracy" or "auc"."""
        if self.methods:
            return next(iter(self.methods.values())).ctx.flat.task.metric_name
        from secure_fedora.core.plugins import config_dir
        from secure_fedora.data.userdata import label_space
        from secure_fedora.learning.tasks import resolve_task

        return resolve_task(self.cfg.training.loss, label_space(self.clients)[1],
                            config_dir(self.cfg)).metric_name

    def write_rounds_csv(self) -> None:
        """Per-round metrics of every method run so far (rewritten atomically): one row per
        round, the test and validation columns empty in rounds that were not evaluated
        (``evaluation.every``); :func:`~secure_fedora.runtimes.results.write_rounds_csv`, the
        writer both runtimes use."""
        from secure_fedora.runtimes.results import write_rounds_csv

        write_rounds_csv(self.run_dir, self.history)
