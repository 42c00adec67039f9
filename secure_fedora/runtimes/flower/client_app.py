"""The FEDORA ClientApp: one SuperNode = one client, its state kept on the node's disk.

Each handler loads the client's partition and per-run state from ``state-dir``, does its
step with the shared algorithm core (``secure_fedora.algorithms.fedora`` for the summary and the
selective-regularization weight, ``secure_fedora.learning.client`` for evaluation and local training),
saves the state atomically, records the release in the node's journal (fsynced) and only
then returns the reply. A SuperNode that crashes and restarts resumes from the last saved
state; a round message that arrives again for a round already trained is answered with the
saved ``theta_i`` without training twice.

With ``privacy.enabled`` the client is the one that enforces its budget, exactly as in the
in-process runtime and with the same building blocks (:mod:`secure_fedora.secure.private`): its
identity key (node config ``identity-dir``), its signed write-ahead ledger and accountant
(``runs/<run_id>/<client-id>.jsonl``, reopened and verified by every message, so a restart
never under-counts), the calibrated plan, the noised summary, the accounted ``lambda_i`` when
validation is private, and DP-SGD. A refused release is answered with a ``refusal`` record
and no model; from then on the client trains nothing and releases nothing.

Every message is authenticated (:mod:`secure_fedora.runtimes.flower.envelopes`): the handler verifies
the server's signed envelope against the allowlist in ``identity-dir`` before it reads
anything else (unknown signer, bad signature, tampered content, replayed nonce, stale round:
the message is refused and Flower returns an error reply), and signs its reply with the
client's own identity key. The nonce memory lives in ``runs/<run_id>/<client id>.nonces.jsonl``.

Encrypted relatedness modes: ``query.ceremony`` identifies the client and, on the key holder,
runs the CKKS key ceremony (:class:`~secure_fedora.runtimes.flower.ceremony.KeyHolderStore`, kept in
``runs/<run_id>/ckks/``); ``query.encrypted_summary`` opens the sealed secret context and
returns ``Enc(U_i)``; ``query.decrypt_overlaps`` (key holder only) returns the overlap blocks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privacy.accounting import BudgetExceededError
from privacy.envelope import Envelope
from privacy.identity import (
    ALLOWLIST_FILENAME,
    SERVER_ID,
    Identity,
    IdentityError,
    client_ids,
    load_allowlist,
)
from privacy.noise import NoiseSource, make_noise_source
from secure_fedora.algorithms import fedora
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.data.partition import ClientData
from secure_fedora.learning.client import (
    FlatModel,
    GradientOracle,
    PlainGradient,
    Workspace,
    evaluate,
    local_train,
)
from secure_fedora.learning.models import make_model
from secure_fedora.runtimes.flower.ceremony import KeyHolderStore, layout_for
from secure_fedora.runtimes.flower.envelopes import MessageSecurity, checked_array
from secure_fedora.runtimes.flower.protocol import (
    MSG_CEREMONY,
    MSG_DECRYPT,
    MSG_ENCRYPTED_SUMMARY,
    MSG_ROUND,
    MSG_SUMMARY,
    DeployError,
    NodeSettings,
    RunSettings,
    check_supported,
    process_start_time,
    tensor_to_array_record,
)
from secure_fedora.runtimes.flower.state import (
    NodeState,
    ReleaseJournal,
    load_partition,
    save_partition,
)
from secure_fedora.runtimes.inprocess import (
    NUM_CLASSES,
    atomic_write_text,
    build_clients,
    client_generator,
    train_config,
)
from secure_fedora.secure.private import FederationPrivacy
from secure_fedora.secure.relatedness import (
    decrypt_rows,
    encrypt_summary,
    open_keys,
    overlaps_from_rows,
)

__all__ = [
    "HANDLERS",
    "app",
    "ceremony",
    "data_digest",
    "decrypt_overlaps_handler",
    "encrypted_summary",
    "ensure_partition",
    "run_paths",
    "summary",
    "train_round",
]

app = ClientApp()


def data_digest(cfg: ExperimentConfig) -> str:
    """Digest of everything a client's partition depends on: the data section and the seed.

    ``data.validation`` is left out: it states an assumption about the validation split
    (public or private), not how the split is drawn.
    """
    data = cfg.data.model_dump(mode="json")
    data.pop("validation", None)
    spec = {"data": data, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def ensure_partition(node: NodeSettings, cfg: ExperimentConfig) -> ClientData:
    """Load this node's partition from ``state-dir/partitions/<digest>.pt``, building it once.

    The partition is derived deterministically from the config (the same data the in-process
    runtime gives client ``partition-id``) and then kept on the node's disk, one file per data
    specification; later loads verify its fingerprint and that it was built for this client
    and this data specification.
    """
    digest = data_digest(cfg)
    path = node.state_dir / "partitions" / f"{digest[:16]}.pt"
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
        # The client's training-order RNG (non-private batches), seeded as the in-process
        # runtime seeds it; its state is saved after every use, so a restart continues it.
        generator_state=client_generator(settings.experiment.seed, node.partition_id).get_state(),
        noise_state=_noise_source(settings.experiment, node.partition_id, None).checkpoint_state()
        if settings.experiment.privacy.enabled and settings.experiment.privacy.noise == "reproducible"
        else None,
    )
    state.save(path)
    return state


def _cached_plan(path: Path, cfg_hash: str, budget: Any, compute: Callable[[], Any]) -> Any:
    """The client's calibrated plan, computed once per run and kept in ``path``.

    Calibration takes seconds and every Flower message runs in a fresh process, so the plan is
    stored (atomically) with the config hash and budget it was calibrated for, and recomputed
    if either differs.
    """
    from privacy.accounting import PlannedRelease
    from secure_fedora.secure.private import ClientPlan

    key = {"config_hash": cfg_hash, "epsilon": budget.epsilon, "delta": budget.delta}
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("key") == key:
                return ClientPlan(
                    doc["dpsgd_noise"], doc["summary_noise"], doc["lambda_noise"],
                    tuple(PlannedRelease(**r) for r in doc["releases"]),
                    doc.get("accountant", ""),
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache: recalibrate below and overwrite it
    plan = compute()
    doc = {
        "key": key,
        "dpsgd_noise": plan.dpsgd_noise,
        "summary_noise": plan.summary_noise,
        "lambda_noise": plan.lambda_noise,
        "releases": [dict(r.__dict__) for r in plan.releases],
        "accountant": plan.accountant,
    }
    atomic_write_text(path, json.dumps(doc))
    return plan


def _open_privacy(
    settings: RunSettings, node: NodeSettings, run_id: int
) -> FederationPrivacy | None:
    """This client's budget gate, ledger and plan (None without ``privacy.enabled``).

    A one-client :class:`~secure_fedora.secure.private.FederationPrivacy` (index 0 is this client),
    opened the way ``FederationPrivacy.open`` opens each client: the plan is calibrated for
    the client's budget, the ledger is verified and the accountant replayed from it.
    """
    cfg = settings.experiment
    if not cfg.privacy.enabled:
        return None
    from privacy.accounting import Accountant
    from privacy.identity import client_ids, load_identity
    from privacy.ledger import LedgerWriter, replay_accountant
    from privacy.pipeline import BudgetGate
    from secure_fedora.secure.private import (
        ClientPrivacy,
        choose_accountant,
        client_budget,
        privacy_plan,
        sample_rate_for,
        steps_per_round,
    )

    if node.identity_dir is None:
        raise DeployError(
            "privacy.enabled needs the node config key identity-dir (a directory with this "
            "client's identity key, as written by `secure-fedora keys init`)"
        )
    cid = client_ids(cfg.data.num_clients)[node.partition_id]
    budget = client_budget(cfg, node.partition_id)
    ledger_dir = node.state_dir / "runs" / str(run_id)
    ledger_dir.mkdir(parents=True, exist_ok=True)
    plan = _cached_plan(ledger_dir / "plan.json", settings.config_hash, budget,
                        lambda: privacy_plan(cfg, "fedora", budget))
    ledger = LedgerWriter(ledger_dir / f"{cid}.jsonl", cid, load_identity(node.identity_dir, cid).signing_key)
    try:
        kind = plan.accountant or choose_accountant(cfg, "fedora", [budget]).name
        accountant = replay_accountant(ledger.entries, kind) if ledger.entries else Accountant(kind)
        gate = BudgetGate(accountant, budget, ledger, cid)
    except BaseException:
        ledger.close()
        raise
    client = ClientPrivacy(node.partition_id, cid, budget, plan, gate, ledger)
    if gate.closed:
        client.refused_at, client.refusal = -1, "refused before this message"
    return FederationPrivacy(cfg, "fedora", [client], sample_rate_for(cfg), steps_per_round(cfg))


def _privacy_metrics(privacy: FederationPrivacy | None) -> dict[str, float]:
    if privacy is None:
        return {}
    c = privacy.clients[0]
    return {
        "epsilon-spent": float(c.epsilon),
        "epsilon-budget": float(c.budget.epsilon),
        "ledger-entries": len(c.ledger.entries),
    }


def _ledger_record(privacy: FederationPrivacy | None) -> ConfigRecord | None:
    """This client's ledger head (entry count and SHA-256 of its last line), reported with
    each round reply (signed with it) so the server can anchor it outside the client."""
    if privacy is None:
        return None
    entries, head = privacy.clients[0].ledger.head
    return ConfigRecord({"entries": entries, "head": head})


def _open_request(
    message: Message, context: Context
) -> tuple[RunSettings, NodeSettings, MessageSecurity, Envelope]:
    """Validate the run and node config, then verify the server's signed envelope.

    Nothing else of the message is read before its envelope is verified; a rejection raises
    the (logged) :class:`~privacy.envelope.EnvelopeError` and Flower returns an error reply.
    """
    settings = RunSettings.from_run_config(context.run_config)
    torch.set_num_threads(settings.num_threads)
    cfg = settings.experiment
    node = NodeSettings.from_node_config(context.node_config, cfg.data.num_clients)
    node.state_dir.mkdir(parents=True, exist_ok=True)
    security = MessageSecurity.for_client(
        node.identity_dir, node.state_dir / "runs" / str(context.run_id), context.run_id,
        settings.config_hash, node.partition_id, cfg.data.num_clients,
    )
    envelope = security.verify(
        message.content, message.metadata.message_type, reply=False, expected_round=None,
        expected_sender=SERVER_ID,
    )
    return settings, node, security, envelope


def _load_client(settings: RunSettings, node: NodeSettings) -> tuple[ClientData, FlatModel]:
    return ensure_partition(node, settings.experiment), _flat_model(settings.experiment)


def _reply(
    security: MessageSecurity, message: Message, content: RecordDict, rnd: int
) -> Message:
    """The reply to ``message``, signed for the server (round ``rnd``)."""
    security.sign(content, message.metadata.message_type, [SERVER_ID], rnd, reply=True)
    return Message(content, reply_to=message)


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


def _noise_source(cfg: ExperimentConfig, partition_id: int, saved: torch.Tensor | None
                  ) -> NoiseSource:
    """This client's DP noise source for one message under ``privacy.noise``.

    Reproducible: the generator seeded as the in-process runtime seeds it, continued from the
    saved state. CSPRNG: a fresh key from ``os.urandom`` for every message -- nothing about it
    is ever saved (``NodeState.noise_state`` stays None), so a restart, like every message,
    draws fresh independent noise, which the ledger's accounting already covers.
    """
    noise = make_noise_source(cfg.privacy.noise, cfg.seed, partition_id)
    noise.restore_state(saved)
    return noise


def _train(
    cfg: ExperimentConfig,
    client: ClientData,
    flat: FlatModel,
    state: NodeState,
    phi: torch.Tensor,
    privacy: FederationPrivacy | None,
) -> tuple[float, int]:
    """``lambda_i`` then local training of ``state.theta`` (in place); returns (lambda, steps).

    The same sequence as ``Fedora.train_round`` for one client: the regularization weight
    (exact from public validation data, or the accounted noised one), then ``local_train``
    with plain SGD (training order from the client's generator) or DP-SGD (sampling and noise
    from the client's noise source).
    """
    generator = torch.Generator()
    generator.set_state(state.generator_state)
    noise = _noise_source(cfg, state.client_id, state.noise_state) if privacy is not None else None
    if privacy is not None and cfg.data.validation == "private":
        lam = privacy.private_lambda(
            0, state.theta, phi, client.val_x, client.val_y, noise, flat.bind
        )
    else:
        loss_local = evaluate(flat, state.theta, client.val_x, client.val_y).loss
        loss_received = evaluate(flat, phi, client.val_x, client.val_y).loss
        lam = fedora.regularization_weight(loss_local, loss_received)
    oracle: GradientOracle
    if privacy is not None:
        from secure_fedora.secure.private import DPGradient

        q = privacy.sample_rate
        dp = DPGradient(flat.module, cfg.privacy.max_grad_norm, q,
                        q * cfg.data.train_per_client, noise)
        dp.select(privacy.clients[0].noise_multiplier, noise)
        privacy.select_client(0, dp)  # count the DP-SGD steps this run executes
        oracle = dp
    else:
        oracle = PlainGradient(cfg.training.batch_size, cfg.training.clip_grad_norm)
    theta = state.theta.clone()
    steps = local_train(
        flat, theta, client.train_x, client.train_y, train_config(cfg), oracle, generator,
        Workspace.for_size(flat.num_params), phi=phi, lam=lam,
    )
    state.theta = theta
    state.generator_state = generator.get_state()
    if noise is not None:
        state.noise_state = noise.checkpoint_state()
    return lam, steps


def _release_summary(
    settings: RunSettings,
    node: NodeSettings,
    client: ClientData,
    state: NodeState,
    state_path: Path,
    privacy: FederationPrivacy | None,
) -> torch.Tensor:
    """The client's summary ``U_i`` (d x q, float64) as the configured mode releases it.

    Noised modes: the Gaussian mechanism on the clipped second moment, through the client's
    budget gate (the ledger entry is written before the summary leaves), drawing from the
    client's noise source as the in-process runtime does; plain and encrypted modes: the
    exact top-q subspace.
    """
    cfg = settings.experiment
    if "noised" not in cfg.fedora.relatedness:
        return fedora.client_summary(client.train_x, client.train_y, NUM_CLASSES, cfg.fedora.q)
    assert privacy is not None  # the config requires privacy.enabled for the noised modes
    noise = _noise_source(cfg, node.partition_id, state.noise_state)
    try:
        u = privacy.noised_summaries([client], cfg.fedora.q, NUM_CLASSES, [noise])[0]
    except BudgetExceededError as err:
        raise DeployError(f"client {node.partition_id} refused its summary: {err}") from err
    state.noise_state = noise.checkpoint_state()
    state.save(state_path)
    return u


def _initial_metrics(
    flat: FlatModel, state: NodeState, client: ClientData, privacy: FederationPrivacy | None
) -> dict[str, float]:
    return {
        "val-accuracy": evaluate(flat, state.theta, client.val_x, client.val_y).accuracy,
        "test-accuracy": evaluate(flat, state.theta, client.test_x, client.test_y).accuracy,
        **_privacy_metrics(privacy),
    }


def _summary_with_metrics(
    settings: RunSettings, node: NodeSettings, run_id: int
) -> tuple[torch.Tensor, dict[str, float], ReleaseJournal]:
    """This client's summary ``U_i`` (through its budget gate when noised), its initial
    metrics, and the run's release journal; the privacy state is closed before returning."""
    client, flat = _load_client(settings, node)
    state_path, journal = run_paths(node, run_id)
    state = _load_or_init_state(state_path, node, run_id, settings, flat)
    privacy = _open_privacy(settings, node, run_id)
    try:
        u = _release_summary(settings, node, client, state, state_path, privacy)
        metrics = _initial_metrics(flat, state, client, privacy)
    finally:
        if privacy is not None:
            privacy.close()
    return u, metrics, journal


@app.query("summary")
def summary(message: Message, context: Context) -> Message:
    """Release the client's summary ``U_i`` (plain or noised) and its initial accuracy."""
    started = time.time()
    settings, node, security, _ = _open_request(message, context)
    _check_hash(message, "fedora", settings)
    cfg = settings.experiment
    check_supported(cfg, settings.reproducible_dp_noise)
    if "encrypted" in cfg.fedora.relatedness:
        raise DeployError(
            f"fedora.relatedness = {cfg.fedora.relatedness!r}: the summary is released only "
            "encrypted (query.encrypted_summary), never in the clear"
        )
    u, metrics, journal = _summary_with_metrics(settings, node, context.run_id)
    journal.append(node.partition_id, 0, "summary", u.numpy().tobytes())
    content = RecordDict(
        {
            "summary": tensor_to_array_record("u", u),
            "client": ConfigRecord(
                {"client-id": node.partition_id, "config-hash": settings.config_hash}
            ),
            "metrics": MetricRecord({**metrics, **_timings(started)}),
        }
    )
    return _reply(security, message, content, 0)


def _key_holder_store(node: NodeSettings, run_id: int, identity: Identity) -> KeyHolderStore:
    return KeyHolderStore(node.state_dir / "runs" / str(run_id) / "ckks", identity)


def _encrypted_mode(settings: RunSettings, what: str) -> None:
    mode = settings.experiment.fedora.relatedness
    if "encrypted" not in mode:
        raise DeployError(f"{what} is part of the encrypted relatedness modes, not {mode!r}")


@app.query("ceremony")
def ceremony(message: Message, context: Context) -> Message:
    """First contact in the encrypted modes: identify this client; the key holder also runs
    the CKKS key ceremony (or repeats its stored result) and returns the public context and
    the secret context sealed to every client's X25519 key from the allowlist."""
    started = time.time()
    settings, node, security, _ = _open_request(message, context)
    conf = _check_hash(message, "fedora", settings)
    check_supported(settings.experiment, settings.reproducible_dp_noise)
    _encrypted_mode(settings, "the key ceremony")
    if conf.get("key-holder") != settings.key_holder:
        raise DeployError(
            f"the server names client {conf.get('key-holder')!r} as key holder, the run config "
            f"names client {settings.key_holder}"
        )
    content = RecordDict(
        {"client": ConfigRecord({"client-id": node.partition_id,
                                 "config-hash": settings.config_hash})}
    )
    if node.partition_id == settings.key_holder:
        parties = client_ids(settings.experiment.data.num_clients)
        try:
            allowlist = load_allowlist(node.identity_dir / ALLOWLIST_FILENAME)
        except IdentityError as err:
            raise DeployError(str(err)) from None
        missing = [p for p in parties if p not in allowlist]
        if missing:
            raise DeployError(f"the allowlist lacks the X25519 keys of {missing[:5]}")
        store = _key_holder_store(node, context.run_id, security.identity)
        public, sealed = store.ceremony({p: allowlist[p].agreement_key for p in parties})
        content["ceremony"] = ConfigRecord(
            {"public-context": public, **{f"sealed-{p}": sealed[p] for p in parties}}
        )
    content["metrics"] = MetricRecord(_timings(started))
    return _reply(security, message, content, 0)


@app.query("encrypted_summary")
def encrypted_summary(message: Message, context: Context) -> Message:
    """Release ``Enc(U_i)``: open the sealed CKKS context, compute the summary (noised through
    the budget gate in noised+encrypted mode), encrypt its q columns; plus initial accuracy."""
    started = time.time()
    settings, node, security, _ = _open_request(message, context)
    _check_hash(message, "fedora", settings)
    cfg = settings.experiment
    check_supported(cfg, settings.reproducible_dp_noise)
    _encrypted_mode(settings, "an encrypted summary")
    ckks = message.content["ckks"] if "ckks" in message.content else None
    if not isinstance(ckks, ConfigRecord) or not isinstance(ckks.get("sealed-context"), bytes):
        raise DeployError("encrypted summary request lacks ckks/sealed-context")
    layout = layout_for(cfg)
    if (ckks.get("num-vectors"), ckks.get("dim")) != (layout.num_vectors, layout.dim):
        raise DeployError(
            f"the server's layout ({ckks.get('num-vectors')}, {ckks.get('dim')}) differs from "
            f"this run's ({layout.num_vectors}, {layout.dim})"
        )
    ctx = open_keys(ckks["sealed-context"], security.identity)
    u, metrics, journal = _summary_with_metrics(settings, node, context.run_id)
    columns = encrypt_summary(ctx, layout, node.partition_id, u)
    journal.append(node.partition_id, 0, "summary", b"".join(columns))
    content = RecordDict(
        {
            "upload": ConfigRecord({"columns": columns}),
            "client": ConfigRecord(
                {"client-id": node.partition_id, "config-hash": settings.config_hash}
            ),
            "metrics": MetricRecord({**metrics, **_timings(started)}),
        }
    )
    return _reply(security, message, content, 0)


@app.query("decrypt_overlaps")
def decrypt_overlaps_handler(message: Message, context: Context) -> Message:
    """Key holder only: decrypt the server's encrypted Gram rows with the stored secret
    context and return the ``(N, N, q, q)`` overlap blocks, nothing else."""
    started = time.time()
    settings, node, security, _ = _open_request(message, context)
    _check_hash(message, "fedora", settings)
    cfg = settings.experiment
    _encrypted_mode(settings, "decrypting overlaps")
    if node.partition_id != settings.key_holder:
        raise DeployError(
            f"client {node.partition_id} is not the key holder (client {settings.key_holder})"
        )
    record = message.content["rows"] if "rows" in message.content else None
    rows = record.get("rows") if isinstance(record, ConfigRecord) else None
    store = _key_holder_store(node, context.run_id, security.identity)
    n, q = cfg.data.num_clients, cfg.fedora.q
    vectors = range(n * q)  # every row: the Flower runtime needs every client
    gram = decrypt_rows(store.secret_context(), layout_for(cfg), rows, vectors)
    overlaps = overlaps_from_rows(gram, vectors, n, q)
    _, journal = run_paths(node, context.run_id)
    # What the key holder releases (the overlaps of every pair) is journaled like a summary.
    journal.append(node.partition_id, 0, "overlaps", overlaps.numpy().tobytes())
    content = RecordDict(
        {
            "overlaps": tensor_to_array_record("overlaps", overlaps),
            "metrics": MetricRecord(_timings(started)),
        }
    )
    return _reply(security, message, content, 0)


@app.train("fedora")
def train_round(message: Message, context: Context) -> Message:
    """One FEDORA round on this client (docs/design.md section 2, a round), then evaluation.

    Participating: ``lambda_i`` from the validation losses of ``theta_i`` and the received
    ``phi_i``, local training with the proximal pull, release of ``theta_i``. Not
    participating: ``phi_i`` is stored, ``theta_i`` is unchanged and not released.
    """
    started = time.time()
    settings, node, security, envelope = _open_request(message, context)
    conf = _check_hash(message, "round", settings)
    cfg = settings.experiment
    rnd = conf.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        raise DeployError(f"round message carries an invalid round {rnd!r}")
    if rnd != envelope.round:
        raise DeployError(f"round message for round {rnd} is signed for round {envelope.round}")
    participate = bool(conf.get("participate"))
    do_eval = bool(conf.get("evaluate"))
    client, flat = _load_client(settings, node)
    state_path, journal = run_paths(node, context.run_id)
    state = _load_or_init_state(state_path, node, context.run_id, settings, flat)
    phi = checked_array(message.content, "phi", "phi", torch.float32,
                        tuple(state.theta.shape), envelope)
    if rnd < state.last_received_round:
        raise DeployError(
            f"stale round message: round {rnd} after round {state.last_received_round}"
        )
    state.phi = phi
    state.last_received_round = rnd
    lam = 0.0
    steps = 0
    trained_now = False
    privacy = _open_privacy(settings, node, context.run_id)
    try:
        if participate and rnd > state.last_trained_round:
            admitted = True
            if privacy is not None:
                # The round's DP-SGD steps (and the lambda release) are accounted and written
                # to the signed ledger before training; a refusal ends this client's releases.
                admitted = privacy.admit(
                    0, rnd, state.theta, with_lambda=cfg.data.validation == "private"
                )
            if admitted:
                lam, steps = _train(cfg, client, flat, state, phi, privacy)
                if privacy is not None:  # executed steps == ledger entry, or no release
                    privacy.confirm_steps(rnd, [0])
                state.last_trained_round = rnd
                trained_now = True
            elif state.refused_round == 0:
                state.refused_round = rnd
        if do_eval:
            state.last_val_accuracy = evaluate(flat, state.theta, client.val_x, client.val_y).accuracy
            state.last_test_accuracy = evaluate(
                flat, state.theta, client.test_x, client.test_y
            ).accuracy
            state.last_eval_round = rnd
        state.save(state_path)
        if privacy is not None and rnd == cfg.training.rounds:
            # The run's last round: the ledger is finished (its releases of this round are
            # already on it), so it ends with its signed close entry (idempotent on retries).
            privacy.close_ledgers(rnd)
        privacy_metrics = _privacy_metrics(privacy)
        ledger_head = _ledger_record(privacy)
        refusal = privacy.clients[0].refusal if privacy is not None else None
    finally:
        if privacy is not None:
            privacy.close()
    released = participate and state.refused_round == 0
    content = RecordDict()
    if released:
        journal.append(node.partition_id, rnd, "model", state.theta.numpy().tobytes())
        content["theta"] = tensor_to_array_record("theta", state.theta)
    elif participate and refusal:
        content["refusal"] = ConfigRecord({"reason": refusal})
    if ledger_head is not None:
        content["ledger"] = ledger_head
    content["metrics"] = MetricRecord(
        {
            **privacy_metrics,
            "round": rnd,
            "trained": int(released),
            "trained-now": int(trained_now),
            "lambda": float(lam),
            "steps": steps,
            "val-accuracy": float(state.last_val_accuracy),
            "test-accuracy": float(state.last_test_accuracy),
            "eval-round": state.last_eval_round,
            **_timings(started),
        }
    )
    return _reply(security, message, content, rnd)


#: Message type -> handler (what the ClientApp routes; tests call handlers directly).
HANDLERS = {
    MSG_SUMMARY: summary,
    MSG_CEREMONY: ceremony,
    MSG_ENCRYPTED_SUMMARY: encrypted_summary,
    MSG_DECRYPT: decrypt_overlaps_handler,
    MSG_ROUND: train_round,
}
