"""The FEDORA ClientApp: one SuperNode = one client, its state kept on the node's disk.

Each handler loads the client's partition and per-run state from ``state-dir``, does its
step with the shared algorithm core (``secure_fedora.fedora`` for the summary and the
selective-regularization weight, ``secure_fedora.client`` for evaluation and local training),
saves the state atomically, records the release in the node's journal (fsynced) and only
then returns the reply. A SuperNode that crashes and restarts resumes from the last saved
state; a round message that arrives again for a round already trained is answered with the
saved ``theta_i`` without training twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from secure_fedora import fedora
from secure_fedora.client import FlatModel, PlainGradient, Workspace, evaluate, local_train
from secure_fedora.config import ExperimentConfig
from secure_fedora.deploy.protocol import (
    DeployError,
    NodeSettings,
    RunSettings,
    array_record_to_tensor,
    check_supported,
    process_start_time,
    tensor_to_array_record,
)
from secure_fedora.deploy.state import (
    NodeState,
    ReleaseJournal,
    load_partition,
    save_partition,
)
from secure_fedora.models import make_model
from secure_fedora.partition import ClientData
from secure_fedora.runtime import NUM_CLASSES, build_clients, client_generator, train_config

__all__ = ["app", "data_digest", "ensure_partition", "run_paths"]

log = logging.getLogger("secure_fedora.deploy.client")

app = ClientApp()


def data_digest(cfg: ExperimentConfig) -> str:
    """Digest of everything a client's partition depends on (data section and seed)."""
    spec = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def ensure_partition(node: NodeSettings, cfg: ExperimentConfig) -> ClientData:
    """Load this node's partition from ``state-dir/partition.pt``, building it the first time.

    The partition is derived deterministically from the config (the same data the in-process
    runtime gives client ``partition-id``) and then kept on the node's disk; later loads verify
    its fingerprint and that it was built for this client and data specification.
    """
    path = node.state_dir / "partition.pt"
    digest = data_digest(cfg)
    if path.exists():
        return load_partition(path, node.partition_id, digest)
    clients = build_clients(cfg)
    client = clients[node.partition_id]
    if client.client_id != node.partition_id:
        raise DeployError(
            f"partitioner returned client {client.client_id} at index {node.partition_id}"
        )
    save_partition(path, client, digest)
    return client


def run_paths(node: NodeSettings, run_id: int) -> tuple[Path, ReleaseJournal]:
    """``(state file, release journal)`` of this node for Flower run ``run_id``."""
    run_dir = node.state_dir / "runs" / str(run_id)
    return run_dir / "state.pt", ReleaseJournal(run_dir / "releases.jsonl")


def _flat_model(cfg: ExperimentConfig) -> FlatModel:
    return FlatModel(make_model(cfg.model.name, NUM_CLASSES, seed=cfg.seed))


def _load_or_init_state(
    path: Path, node: NodeSettings, run_id: int, settings: RunSettings, flat: FlatModel
) -> NodeState:
    if path.exists():
        return NodeState.load(path, node.partition_id, run_id, settings.config_hash)
    init = flat.initial_vector()
    state = NodeState(
        client_id=node.partition_id,
        run_id=run_id,
        config_hash=settings.config_hash,
        theta=init,
        phi=init.clone(),
        generator_state=client_generator(settings.experiment.seed, node.partition_id).get_state(),
    )
    state.save(path)
    return state


def _setup(context: Context) -> tuple[RunSettings, NodeSettings, ClientData, FlatModel]:
    settings = RunSettings.from_run_config(context.run_config)
    torch.set_num_threads(settings.num_threads)
    node = NodeSettings.from_node_config(
        context.node_config, settings.experiment.data.num_clients
    )
    node.state_dir.mkdir(parents=True, exist_ok=True)
    client = ensure_partition(node, settings.experiment)
    return settings, node, client, _flat_model(settings.experiment)


def _check_hash(message: Message, record: str, settings: RunSettings) -> ConfigRecord:
    if record not in message.content:
        raise DeployError(f"message {message.metadata.message_type} lacks record {record!r}")
    conf = message.content[record]
    if not isinstance(conf, ConfigRecord):
        raise DeployError(f"record {record!r} is not a ConfigRecord")
    if conf.get("config-hash") != settings.config_hash:
        raise DeployError(
            "the server's config hash does not match the run config given to this client "
            f"({str(conf.get('config-hash'))[:12]} != {settings.config_hash[:12]})"
        )
    return conf


def _timings(started: float) -> dict[str, float]:
    return {
        "t-process-start": process_start_time(),
        "t-handler-start": started,
        "t-handler-end": time.time(),
    }


@app.query("summary")
def summary(message: Message, context: Context) -> Message:
    """Release the client's relatedness summary ``U_i`` (plain mode) and its initial accuracy."""
    started = time.time()
    settings, node, client, flat = _setup(context)
    _check_hash(message, "fedora", settings)
    cfg = settings.experiment
    check_supported(cfg)
    state_path, journal = run_paths(node, context.run_id)
    state = _load_or_init_state(state_path, node, context.run_id, settings, flat)
    u = fedora.client_summary(client.train_x, client.train_y, NUM_CLASSES, cfg.fedora.q)
    val = evaluate(flat, state.theta, client.val_x, client.val_y).accuracy
    test = evaluate(flat, state.theta, client.test_x, client.test_y).accuracy
    journal.append(node.partition_id, 0, "summary", u.numpy().tobytes())
    return Message(
        RecordDict(
            {
                "summary": tensor_to_array_record("u", u),
                "client": ConfigRecord(
                    {"client-id": node.partition_id, "config-hash": settings.config_hash}
                ),
                "metrics": MetricRecord(
                    {"val-accuracy": val, "test-accuracy": test, **_timings(started)}
                ),
            }
        ),
        reply_to=message,
    )


@app.train("fedora")
def train_round(message: Message, context: Context) -> Message:
    """One FEDORA round on this client (DESIGN.md 2, steps 1-3), then evaluation.

    Participating: ``lambda_i`` from the validation losses of ``theta_i`` and the received
    ``phi_i``, local training with the proximal pull, release of ``theta_i``. Not
    participating: ``phi_i`` is stored, ``theta_i`` is unchanged and not released.
    """
    started = time.time()
    settings, node, client, flat = _setup(context)
    conf = _check_hash(message, "round", settings)
    cfg = settings.experiment
    rnd = conf.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        raise DeployError(f"round message carries an invalid round {rnd!r}")
    participate = bool(conf.get("participate"))
    do_eval = bool(conf.get("evaluate"))
    if "phi" not in message.content:
        raise DeployError("round message lacks the 'phi' array record")
    state_path, journal = run_paths(node, context.run_id)
    state = _load_or_init_state(state_path, node, context.run_id, settings, flat)
    phi = array_record_to_tensor(message.content["phi"], "phi", torch.float32, tuple(state.theta.shape))
    if rnd < state.last_received_round:
        raise DeployError(
            f"stale round message: round {rnd} after round {state.last_received_round}"
        )
    state.phi = phi
    state.last_received_round = rnd
    lam = 0.0
    steps = 0
    trained_now = False
    if participate and rnd > state.last_trained_round:
        loss_local = evaluate(flat, state.theta, client.val_x, client.val_y).loss
        loss_received = evaluate(flat, phi, client.val_x, client.val_y).loss
        lam = fedora.regularization_weight(loss_local, loss_received)
        generator = torch.Generator()
        generator.set_state(state.generator_state)
        theta = state.theta.clone()
        steps = local_train(
            flat, theta, client.train_x, client.train_y, train_config(cfg),
            PlainGradient(cfg.training.batch_size), generator,
            Workspace.for_size(flat.num_params), phi=phi, lam=lam,
        )
        state.theta = theta
        state.generator_state = generator.get_state()
        state.last_trained_round = rnd
        trained_now = True
    if do_eval:
        state.last_val_accuracy = evaluate(flat, state.theta, client.val_x, client.val_y).accuracy
        state.last_test_accuracy = evaluate(flat, state.theta, client.test_x, client.test_y).accuracy
        state.last_eval_round = rnd
    state.save(state_path)
    content = RecordDict()
    if participate:
        journal.append(node.partition_id, rnd, "model", state.theta.numpy().tobytes())
        content["theta"] = tensor_to_array_record("theta", state.theta)
    content["metrics"] = MetricRecord(
        {
            "round": rnd,
            "trained": int(participate),
            "trained-now": int(trained_now),
            "lambda": float(lam),
            "steps": steps,
            "val-accuracy": float(state.last_val_accuracy),
            "test-accuracy": float(state.last_test_accuracy),
            "eval-round": state.last_eval_round,
            **_timings(started),
        }
    )
    return Message(content, reply_to=message)
