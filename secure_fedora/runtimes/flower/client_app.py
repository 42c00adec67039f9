"""The generic ClientApp: one SuperNode = one client, running its half of any method.

Each message starts a fresh ClientApp process (Flower 1.42), so everything a client needs
between messages lives on the node's disk (:mod:`secure_fedora.runtimes.flower.state`). A
method message (``query.setup``, ``train.round``, ``evaluate.round``, ``query.finalize``; see
:mod:`secure_fedora.runtimes.flower.protocol`) is handled in this order:

1. the server's signed envelope is verified against the allowlist in ``identity-dir`` before
   anything else is read (unknown signer, bad signature, tampered content, replayed nonce,
   stale round: the message is refused and Flower returns an error reply); the signed content
   must name this run's config hash, a configured method and the exchange and round the
   envelope was signed for; the payload is decoded with the checks of
   :mod:`secure_fedora.runtimes.flower.payloads`;
2. the method's algorithm object is rebuilt through the method registry with a context that
   holds only this client's data (:func:`~secure_fedora.runtimes.flower.contexts.client_context`),
   and its client state, training-order generator and (reproducible) noise state are restored
   from ``runs/<run_id>/<method>/client.pt``; a message this client already answered is
   answered again from that file, without training or releasing twice;
3. with ``privacy.enabled`` the client enforces its own budget with the in-process building
   blocks (:mod:`secure_fedora.secure.private`): its identity key, its signed write-ahead
   ledger (``runs/<run_id>/<method>/<client id>.jsonl``, reopened and verified by every
   message, so a restart never under-counts; its refusal, close and repair entries journaled
   whole beside it) and the calibrated plan. Every check that can refuse the message (the
   ledger's chain, signatures and a cut, its state against the saved state and the server's
   copy of its head) runs before anything is written, so a refused message changes no file;
   only then is a cut ledger restored from that journal or a torn last line repaired
   (:func:`~secure_fedora.secure.private.recover_ledger`). A round's release is
   admitted (accounted and written to the ledger, with what the method's
   :meth:`~secure_fedora.algorithms.contract.FederatedAlgorithm.releases` declares) and
   journaled with its noise state (``<client id>.journal``) *before* the client half runs (a
   release whose process died before saving its answer is re-made from that record, its
   ledger entries consumed, not appended: :func:`_open_privacy`), and the executed DP-SGD
   steps are checked against the ledger before the reply leaves; a refused release is answered with a ``refusal`` record and no payload,
   and from then on the client releases nothing;
4. the client half runs (``client_setup`` / ``client_update`` / ``client_eval_row`` and the
   evaluation on its validation and test data / ``client_finalize``), its reply is checked as
   the server checks it (``ReplyRules.check_received``: a malformed reply is an error naming
   the method, client, exchange and entry, and never leaves), its state is saved
   atomically, a released payload is recorded in the node's hash-chained release journal
   (fsynced) and only then the reply is signed with the client's identity key -- by the
   SignEnvelope stage of the client's release pipeline (under DP after the round release's
   step check; an encrypted summary after its EncryptPayload stage) -- and returned, with
   its ledger head when DP is on.

``query.hello`` is the first contact: the client checks its data against the run's model
(as the in-process runtime does before anything is written), then identifies itself and
reports its split sizes and data schema, or a signed refusal naming the problem. FEDORA's encrypted relatedness adds its CKKS ceremony handlers
(``query.ceremony``, ``query.encrypted_summary``, ``query.decrypt_overlaps``; key material in
``runs/<run_id>/ckks/``).

Every handler's errors, and the first contact's refusal, reach the server as ``[security]
client_errors`` says (:func:`_withholding`): by default only the error's class name and a fixed
sentence, the full text and traceback going to the node's log and ``runs/<run_id>/``
:data:`CLIENT_ERRORS_LOG`; a refused release's budget text (what the client's ledger records)
is sent whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from privacy.accounting import BudgetExceededError
from privacy.ckks import InnerProductLayout
from privacy.envelope import Envelope, NonceMemoryLostError
from privacy.errors import ToolkitError
from privacy.identity import (
    ALLOWLIST_FILENAME,
    SERVER_ID,
    Identity,
    IdentityError,
    PublicIdentity,
    client_ids,
    load_allowlist,
)
from privacy.noise import NoiseSource, make_noise_source
from privacy.pipeline import EncryptPayload, Release
from secure_fedora.algorithms.contract import (
    ContractError,
    Payload,
    ReplySchema,
    check_client_state,
    check_eval_row,
    check_message_entries,
    check_setup_steps,
    client_half,
    round_mechanisms,
)
from secure_fedora.core.config import ExperimentConfig, model_selection
from secure_fedora.core.crashpoints import InjectedCrash
from secure_fedora.core.files import remove_interrupted_writes
from secure_fedora.data.partition import ClientData
from secure_fedora.data.sources import fingerprint_client
from secure_fedora.learning.client import evaluate, name_resume_command
from secure_fedora.runtimes.flower.ceremony import (
    KeyHolderStore,
    layout_for,
    public_context_digest,
)
from secure_fedora.runtimes.flower.contexts import DataSchema, build_algorithm, client_context
from secure_fedora.runtimes.flower.envelopes import MessageSecurity, reply_kind
from secure_fedora.runtimes.flower.payloads import (
    PayloadLimits,
    payload_to_record,
    record_to_payload,
)
from secure_fedora.runtimes.flower.protocol import (
    HELLO_SCOPE,
    MECHANISM_NOISE_PREFIX,
    MSG_CEREMONY,
    MSG_DECRYPT,
    MSG_ENCRYPTED_SUMMARY,
    MSG_EVALUATE,
    MSG_FINALIZE,
    MSG_HELLO,
    MSG_ROUND,
    MSG_SETUP,
    PULL_RESUME_COMMAND,
    STAGE_OF,
    DeployError,
    NodeSettings,
    RunSettings,
    apply_amendments,
    check_supported,
    client_error_text,
    effective_client_errors,
    process_start_time,
    resume_run_id,
    tensor_to_array_record,
    wire_round,
)
from secure_fedora.runtimes.flower.state import (
    ClientRunState,
    JournalAppend,
    NodeStateError,
    ReleaseJournal,
    load_partition,
    save_partition,
)
from secure_fedora.runtimes.inprocess import (
    MODEL_RECORD,
    atomic_write_text,
    build_clients,
    client_generator,
    model_record,
    model_record_problem,
)
from secure_fedora.secure.private import (
    ClientPrivacy,
    FederationPrivacy,
    LedgerCheck,
    check_ledger,
    check_ledgers_present,
    create_ledgers_in,
    noise_is_reproducible,
    setup_plug_ins,
)
from secure_fedora.secure.relatedness import (
    RowValuesError,
    blame_uploads,
    decrypt_rows,
    open_signed_keys,
    overlaps_from_rows,
    sign_sealed_keys,
    summary_encryption,
    unpack_summary_upload,
)
from secure_fedora.secure.transport import (
    KIND_RELATEDNESS_UPLOAD,
    KIND_SUMMARY,
    ClientReleases,
    UnaccountedReleases,
)

__all__ = [
    "CLIENT_ERRORS_LOG",
    "HANDLERS",
    "WithheldError",
    "app",
    "ceremony",
    "data_digest",
    "decrypt_overlaps_handler",
    "encrypted_summary",
    "ensure_partition",
    "hello",
    "method_message",
    "run_paths",
]

app = ClientApp()
log = logging.getLogger("secure_fedora.runtimes.flower.client")

#: The node's own record of every error its ClientApp answered with (full text and
#: traceback), under ``<state-dir>/runs/<run id>/``: what a withheld error text leaves out.
CLIENT_ERRORS_LOG = "client-errors.log"


class WithheldError(ToolkitError, RuntimeError):
    """Raised by a ClientApp handler in place of an error it answered: its message is the text
    the server is sent (:func:`~secure_fedora.runtimes.flower.protocol.client_error_text`:
    the error's class name, then a fixed sentence or, where the run and the node both allow
    it, the error's own text); ``original`` is the error itself, in the node's log. The
    Flower ClientApp answers it with an error reply of that text alone."""

    def __init__(self, text: str, original: BaseException) -> None:
        super().__init__(text)
        self.original = original


def _run_id(context: Context) -> int:
    """The run id this node keys its state, envelopes and nonce memory by: the run config's
    ``resume`` (the run a resumed ServerApp continues, validated by
    :meth:`~secure_fedora.runtimes.flower.protocol.RunSettings.from_run_config` before any
    handler acts), else Flower's run id."""
    return resume_run_id(context.run_config.get("resume", "0")) or int(context.run_id)


def _client_errors_mode(context: Context) -> str:
    """What this client's error texts tell the server
    (:func:`~secure_fedora.runtimes.flower.protocol.effective_client_errors`): "full" only
    when the run's ``[security] client_errors`` and the node config's ``client-errors`` are
    both "full"; "withheld" otherwise, also when the run config cannot be read (the error may
    be that)."""
    node_mode = context.node_config.get("client-errors", "withheld")
    try:
        run_mode = RunSettings.from_run_config(
            context.run_config).experiment.security.client_errors
    except Exception:  # any unreadable run config withholds
        return "withheld"
    return effective_client_errors(run_mode, node_mode if isinstance(node_mode, str) else "")


def _record_client_error(context: Context, what: str, err: BaseException, sent: str) -> None:
    """Log ``err`` in full (with its traceback) on the node's logger and append it to the
    node's :data:`CLIENT_ERRORS_LOG`, with the text the server was sent (``sent``). Raises
    nothing: a text UTF-8 cannot encode (a surrogate-escaped byte) is written with that
    character escaped (``\\udcff``), and a log that cannot be written is a warning, so that
    the reply carries ``sent`` and nothing of the failure."""
    log.error("%s: %s: %s (the server was sent: %s)", what, type(err).__name__, err, sent,
              exc_info=err)
    state_dir = context.node_config.get("state-dir")
    if not isinstance(state_dir, str) or not state_dir.strip():
        return
    entry = "".join([
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {what} (sent to the server: {sent})\n",
        *traceback.format_exception(err), "\n"])
    try:
        folder = Path(state_dir) / "runs" / str(_run_id(context))
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / CLIENT_ERRORS_LOG, "a", encoding="utf-8",
                  errors="backslashreplace") as f:
            f.write(entry)
    except (OSError, ValueError) as io_err:  # the logger has it; the reply must still leave
        # (ValueError: e.g. a NUL in the node config's state-dir)
        log.warning("cannot append to %s in %s: %s: %s", CLIENT_ERRORS_LOG, state_dir,
                    type(io_err).__name__, io_err)


def _withholding(handler: Callable[[Message, Context], Message]
                 ) -> Callable[[Message, Context], Message]:
    """``handler`` whose errors reach the server as the run and the node allow
    (:func:`_client_errors_mode`): anything it raises is recorded in full on the node
    (:func:`_record_client_error`) and re-raised carrying only the text the server may be
    sent, the error's class name and a fixed sentence unless both allow "full" (then its class
    name and its text): a :class:`KeyboardInterrupt` or :class:`SystemExit` (e.g. a plug-in's)
    as a new one of that kind, so that it still stops the process; any other as
    :class:`WithheldError`."""

    @functools.wraps(handler)
    def handle(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except InjectedCrash:
            raise  # a test's stand-in for the process dying here: nothing is recorded or sent
        except BaseException as err:
            name_resume_command(err, PULL_RESUME_COMMAND)  # not the in-process `run --resume`
            sent = client_error_text(err, _client_errors_mode(context))
            _record_client_error(context, f"{message.metadata.message_type} failed", err, sent)
            # the node's log has the traceback; the wrapper adds no second copy of it
            if isinstance(err, SystemExit):
                raise SystemExit(sent) from None
            if isinstance(err, KeyboardInterrupt):
                raise KeyboardInterrupt(sent) from None
            raise WithheldError(sent, err) from None

    return handle


def _error_reply(handler: Callable[[Message, Context], Message]
                 ) -> Callable[[Message, Context], Message]:
    """``handler`` as the Flower ClientApp runs it: a :class:`WithheldError` is answered with
    an error reply whose reason is its text alone (starting with the original error's class
    name), not Flower's ``<class '...WithheldError'>:<'...'>``, and without Flower logging
    the wrapper's traceback again."""

    @functools.wraps(handler)
    def handle(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except WithheldError as err:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)),
                           reply_to=message)

    return handle


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
    clients = build_clients(cfg, own=node.partition_id)  # its own rows are its to answer for
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


def _cached_plan(path: Path, cfg_hash: str, budget: Any, compute: Callable[[], Any]) -> Any:
    """The client's calibrated plan, computed once per run and kept in ``path``.

    Calibration takes seconds and every Flower message runs in a fresh process, so the plan is
    stored (atomically) with the config hash and budget it was calibrated for and the SHA-256
    of its content, and recomputed (logged) if either differs or the digest does not match:
    a damaged copy is never used for the client's noise. ``compute`` must calibrate as the
    client's ledger was planned (PRV with or without its refining pass).
    """
    from privacy.accounting import PlannedRelease
    from secure_fedora.secure.private import ClientPlan

    key = {"config_hash": cfg_hash, "epsilon": budget.epsilon, "delta": budget.delta}
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("key") == key:
                if doc.get("sha256") != _plan_digest(doc):
                    raise ValueError("its content does not match its SHA-256")
                refine = doc.get("prv_refine", True)  # absent: written before the field
                if not isinstance(refine, bool):
                    raise ValueError(f"prv_refine is {refine!r}, not true or false")
                return ClientPlan(
                    doc["dpsgd_noise"], doc["summary_noise"], doc["lambda_noise"],
                    tuple(PlannedRelease(**r) for r in doc["releases"]),
                    doc.get("accountant", ""), refine,
                    # absent: written before plug-in mechanisms
                    tuple((str(m), float(v)) for m, v in doc.get("mechanism_noise", [])),
                )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("plan cache %s is damaged (%s): calibrating the plan again", path, err)
    plan = compute()
    doc = {
        "key": key,
        "dpsgd_noise": plan.dpsgd_noise,
        "summary_noise": plan.summary_noise,
        "lambda_noise": plan.lambda_noise,
        "releases": [dict(r.__dict__) for r in plan.releases],
        "accountant": plan.accountant,
        "prv_refine": plan.prv_refine,
    }
    if plan.mechanism_noise:  # absent otherwise: the document (and digest) of before
        doc["mechanism_noise"] = [list(pair) for pair in plan.mechanism_noise]
    doc["sha256"] = _plan_digest(doc)
    atomic_write_text(path, json.dumps(doc))
    return plan


def _plan_digest(doc: Mapping[str, Any]) -> str:
    """SHA-256 hex of a plan cache document's canonical JSON without its ``sha256`` field."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


@dataclasses.dataclass
class ClientSidePrivacy(FederationPrivacy):
    """A :class:`~secure_fedora.secure.private.FederationPrivacy` that holds one client: its
    :class:`ClientPrivacy` sits in the client's own slot (``clients[i]``, as the method's
    client half indexes it); any other slot raises."""

    sole: Any = None

    @property
    def accountant(self) -> str:
        """Name of the accountant this client records with."""
        return self.sole.gate.accountant.kind


class _OneSlot(list):  # type: ignore[type-arg]
    """``clients`` (or ``journals``) of a :class:`ClientSidePrivacy`: slot ``index`` of
    ``n``; iteration yields the one client's."""

    def __init__(self, n: int, index: int, client: Any) -> None:
        super().__init__([client])
        self.n, self.index = n, index

    def __getitem__(self, j: Any) -> Any:
        if j == self.index:
            return super().__getitem__(0)
        raise IndexError(f"client {self.index}'s process holds no privacy state of client {j}")


def _check_privacy(
    settings: RunSettings, node: NodeSettings, run_id: int, method: str,
    module: torch.nn.Module, reported: int = 0
) -> LedgerCheck | None:
    """The checks of this client's ledger of ``method`` and the journal of its refusal,
    close and repair entries that go before anything is written
    (:func:`~secure_fedora.secure.private.check_ledger`, as an in-process resume makes them),
    writing nothing; None without DP. Once the ledger's creation completed (its model record
    ``runs/<run_id>/<method>/model.json`` exists), a ledger missing was lost and a record of
    another model than ``module`` (this node's software builds another one for the run's
    config) means the run's releases came from another model: both are a NodeStateError; so
    is a missing record beside a ledger that holds anything (it was lost).
    ``reported`` is how many ledger entries this client
    already reported (its saved state's or the server's record): a torn last line below it
    was complete once, so the ledger was cut, and NodeStateError is raised unless the journal
    holds the lines cut off (:func:`_open_privacy` then writes them back bit for bit); a
    ledger or journal that fails its checks otherwise is a NodeStateError too."""
    cfg = settings.experiment
    if not cfg.privacy.enabled:
        return None
    from privacy.identity import load_identity
    from privacy.journal import JournalError
    from privacy.ledger import LedgerCutError, LedgerError, torn_line_index

    if node.identity_dir is None:
        raise DeployError(
            "privacy.enabled needs the node config key identity-dir (a directory with this "
            "client's identity key, as written by `secure-fedora keys init`)"
        )
    cid = client_ids(cfg.data.num_clients)[node.partition_id]
    identity = load_identity(node.identity_dir, cid)
    ledger_dir = _method_dir(node, run_id, method)
    record = ledger_dir / MODEL_RECORD
    if record.is_file():  # created: the ledger and the model it records are the run's
        try:
            check_ledgers_present(ledger_dir, [cid])
        except LedgerError as err:
            raise NodeStateError(f"{err} (in the node's state-dir)") from None
        problem = model_record_problem(record, module)
        if problem is not None:
            raise NodeStateError(f"{record} {problem}; refuse to go on (run the node with the"
                                 " run's secure-fedora version, or start a new run)")
    try:
        checked = check_ledger(ledger_dir / f"{cid}.jsonl", cid, method,
                               identity, reported=reported,
                               reported_by="this client already reported them")
    except LedgerCutError as err:
        raise NodeStateError(f"{err} (the node's state-dir), or start a new run") from None
    except (LedgerError, JournalError) as err:  # damaged: every later message is refused too
        raise NodeStateError(f"{err} (in the node's state-dir; restore it from a copy, or "
                             "start a new run)") from None
    if not record.is_file():
        # written before the ledger's first entry (only an empty ledger is the crash window
        # of its creation): writing it again would bind the releases on record to whatever
        # model this node builds now
        if (checked.head[0] or len(checked.journal)
                or torn_line_index(checked.ledger_path) is not None):
            raise NodeStateError(
                f"{record} is missing, but this client's ledger of {method!r} holds"
                f" {checked.head[0]} entries: the record of the model its releases come from,"
                " written before the first, was lost or deleted. Restore the node's state-dir"
                " from a copy, or start a new run")
    return checked


#: A node's journal record of a release this message would make, found where the node is not
#: re-making it (:func:`_unanswered_release` found no such release past the saved state's
#: ledger head): the node's state dir is this run's, so it is not an earlier run's record.
FLOWER_JOURNAL_CONFLICT = (
    " of this client in this run, but the node's saved state does not show that release as"
    " unanswered (the ledger entries past the head it saved do not end with it): the saved"
    " state and the ledger disagree about this release, so it is neither re-made nor made"
    " twice; nothing was released (restore the node's state-dir from a copy, or start a new"
    " run)")


def _open_privacy(
    settings: RunSettings, node: NodeSettings, run_id: int, method: str, checked: LedgerCheck,
    module: torch.nn.Module, replay: int | None = None
) -> ClientSidePrivacy:
    """This client's budget gate, ledger and plan for ``method``, once its checks passed
    (``checked``, :func:`_check_privacy`).

    The ledger is created with the record of ``module`` (the model its releases come from),
    the record last (:func:`~secure_fedora.secure.private.create_ledgers_in`), so a process
    killed meanwhile leaves an empty ledger the next message keeps.

    Opened the way ``FederationPrivacy.open`` resumes each client: the plan is calibrated for
    the client's budget (and cached per run); ledger entries a cut removed are written back
    from the journal bit for bit and a torn last line (a dead writer's: called under the
    node's stage lock) is quarantined with a signed repair entry
    (:func:`~secure_fedora.secure.private.recover_ledger`), the journal's torn last record is
    moved aside, and the accountant is replayed from the ledger
    (``runs/<run_id>/<method>/<client id>.jsonl``); a closed gate (an earlier refusal) stays
    closed. Refusal, close and repair entries are journaled whole, each once it is fsynced.

    Every release the gate admits is journaled (``<client id>.journal``, sealed to the client)
    after its ledger entries and before the client half computes it, with the state of the
    client's noise source before its draws (with CSPRNG noise the key and stream position;
    with reproducible noise its digest), as in process. ``replay`` (the index of the first
    ledger entry of this exchange's release, written by a process of this client that died
    before saving its answer, :func:`_unanswered_release`): the gate consumes those entries
    instead of appending them again, and the release is re-made from its journal record
    (the same noise: restored with CSPRNG noise, checked with reproducible noise; a record
    that does not match is a "resume diverged" error), or, without a record (the process died
    before writing it, so the release never left), made once under the entries it consumes.
    """
    cfg = settings.experiment
    from privacy.accounting import Accountant
    from privacy.identity import load_identity
    from privacy.ledger import LedgerWriter, replay_accountant
    from privacy.pipeline import BudgetGate
    from secure_fedora.secure.private import (
        choose_accountant,
        client_budget,
        privacy_plan,
        recover_ledger,
        sample_rate_for,
        steps_per_round,
    )

    assert node.identity_dir is not None  # _check_privacy refused it
    i = node.partition_id
    cid = checked.client_id
    budget = client_budget(cfg, i)
    ledger_dir = _method_dir(node, run_id, method)
    ledger_dir.mkdir(parents=True, exist_ok=True)

    def run_accountant() -> str:
        # "auto" chooses over every client's budget, as the server's plan and the in-process
        # run do; a ledger already written keeps the accountant it names
        recorded = {e.get("accountant") for e in checked.entries}
        if len(recorded) == 1 and isinstance(kind := recorded.pop(), str):
            return kind
        budgets = [client_budget(cfg, c) for c in range(cfg.data.num_clients)]
        return choose_accountant(cfg, method, budgets).name

    def calibrate() -> Any:
        # as FederationPrivacy.open resumes: a PRV ledger written before PRV's refining pass
        # was planned without it, and its releases are accounted without it again
        kind = run_accountant()
        refine = not (kind == "prv" and checked.entries
                      and not replay_accountant(checked.entries, kind).prv_refine)
        return privacy_plan(cfg, method, budget, kind, prv_refine=refine)

    plan = _cached_plan(ledger_dir / "plan.json", settings.config_hash, budget, calibrate)
    if not (ledger_dir / MODEL_RECORD).is_file():
        create_ledgers_in(ledger_dir, [cid], (MODEL_RECORD, model_record(module)))
    signing_key = load_identity(node.identity_dir, cid).signing_key
    kind = plan.accountant or run_accountant()
    recover_ledger(checked, signing_key, budget, kind)
    moved = checked.journal.quarantine_torn_tail()
    if moved is not None:
        log.warning("journal %s: torn last record quarantined in %s (it recorded no release)",
                    checked.journal.path, moved.name)
    ledger = LedgerWriter(checked.ledger_path, cid, signing_key)
    try:
        accountant = replay_accountant(ledger.entries, kind) if ledger.entries else Accountant(kind)
        gate = BudgetGate(accountant, budget, ledger, cid)
        if replay is not None:
            gate.replay_from(replay)
        client = ClientPrivacy(i, cid, budget, plan, gate, ledger, entry_journal=checked.journal)
        client.journal_non_releases()
    except BaseException:
        ledger.close()
        raise
    if gate.closed:
        client.refused_at, client.refusal = -1, "refused before this message"
    return ClientSidePrivacy(cfg, method, _OneSlot(cfg.data.num_clients, i, client),
                             sample_rate_for(cfg), steps_per_round(cfg),
                             journals=_OneSlot(cfg.data.num_clients, i, checked.journal),
                             reproducible_noise=noise_is_reproducible(cfg),
                             _resumed=replay is not None, sole=client,
                             journal_conflict=FLOWER_JOURNAL_CONFLICT)


def _privacy_metrics(privacy: FederationPrivacy | None) -> dict[str, float]:
    if privacy is None:
        return {}
    c = privacy.sole
    return {
        "epsilon-spent": float(c.epsilon),
        "epsilon-budget": float(c.budget.epsilon),
        "ledger-entries": len(c.ledger.entries),
    }


def _ledger_record(privacy: FederationPrivacy | None, *,
                   repeated: bool = False) -> ConfigRecord | None:
    """This client's ledger head (entry count and SHA-256 of its last line) and the plan its
    releases use (``noise-multiplier``, ``accountant``, and ``summary-noise`` /
    ``lambda-noise`` where the method releases those), reported with each reply (signed with
    it) so the server can anchor the ledger outside the client and state the noise the client
    actually released with (a resumed run keeps its ledger's plan, which may differ from
    today's calibration of the config). ``repeated`` adds ``repeated = true``: the reply's
    release is one this node made before (accounted once), which a resumed server records."""
    if privacy is None:
        return None
    c = privacy.sole
    entries, head = c.ledger.head
    record: dict[str, Any] = {"entries": entries, "head": head,
                              "noise-multiplier": float(c.plan.dpsgd_noise),
                              "accountant": c.gate.accountant.kind}
    if c.plan.summary_noise is not None:
        record["summary-noise"] = float(c.plan.summary_noise)
    if c.plan.lambda_noise is not None:
        record["lambda-noise"] = float(c.plan.lambda_noise)
    for mechanism, sigma in c.plan.mechanism_noise:
        record[f"{MECHANISM_NOISE_PREFIX}{mechanism}"] = float(sigma)
    if repeated:
        record["repeated"] = True
    return ConfigRecord(record)


def _method_dir(node: NodeSettings, run_id: int, method: str) -> Path:
    return node.state_dir / "runs" / str(run_id) / method


@dataclasses.dataclass
class _SavedState:
    """A method's saved state (client.pt) as read before its message was verified, so that
    the stage reuses it instead of reading the file again while the file is unchanged."""

    method: str
    state: ClientRunState | None = None
    key: tuple[int, int, int] | None = None

    @staticmethod
    def _key(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read(self, path: Path, load: Callable[[], ClientRunState]) -> ClientRunState | None:
        """Load ``path`` (None when absent) and remember it with the file's identity."""
        self.key = self._key(path)
        self.state = load() if self.key is not None else None
        return self.state

    def take(self, path: Path) -> ClientRunState | None:
        """The state read earlier if ``path`` is still that file (every save replaces it by
        a new file), else None; once only."""
        state, self.state = self.state, None
        return state if state is not None and self._key(path) == self.key else None


def _open_request(
    message: Message, context: Context, scope: str | None = None, *,
    saved: _SavedState | None = None,
) -> tuple[RunSettings, NodeSettings, MessageSecurity, Envelope]:
    """Validate the run and node config, then verify the server's signed envelope in
    ``scope`` (its nonce memory and round floor; None: the run's ceremony scope).

    Nothing else of the message is read before its envelope is verified; a rejection raises
    the (logged) :class:`~privacy.envelope.EnvelopeError` and Flower returns an error reply.
    ``saved`` (a method's scope, ``scope`` itself): under the node's stage lock, the nonce
    memory must still hold the one the method's saved state recorded
    (:attr:`ClientRunState.nonce_head`), else NodeStateError and nothing is written; the
    state read is kept in ``saved`` for the stage.
    """
    settings = RunSettings.from_run_config(context.run_config)
    torch.set_num_threads(settings.num_threads)
    cfg = settings.experiment
    node = NodeSettings.from_node_config(context.node_config, cfg.data.num_clients)
    if node.state_dir.exists() and not node.state_dir.is_dir():
        raise DeployError(f"node config state-dir {str(node.state_dir)!r} exists and is not a "
                          "directory; point state-dir at this node's directory")
    node.state_dir.mkdir(parents=True, exist_ok=True)
    run_dir = node.state_dir / "runs" / str(_run_id(context))

    def verify(expect: Mapping[str, Any] | None) -> tuple[MessageSecurity, Envelope]:
        try:
            security = MessageSecurity.for_client(
                node.identity_dir, run_dir / scope if scope else run_dir, _run_id(context),
                settings.config_hash, node.partition_id, cfg.data.num_clients, expect,
            )
        except NonceMemoryLostError as err:
            raise NodeStateError(
                f"{err} (this client's saved state of {scope!r} records them). Restore the "
                "node's state-dir from a copy, or start a new run") from None
        envelope = security.verify(
            message.content, message.metadata.message_type, reply=False, expected_round=None,
            expected_sender=SERVER_ID,
        )
        return security, envelope

    if saved is None:
        security, envelope = verify(None)
    else:
        # under the lock: another process of this client appends to (or compacts) the same
        # nonce file only between its own lock and release, never beside this check
        method = saved.method
        path = _method_dir(node, _run_id(context), method) / "client.pt"
        with _stage_lock(node, _run_id(context)):
            state = saved.read(path, lambda: ClientRunState.load(
                path, node.partition_id, _run_id(context), settings.config_hash, method))
            security, envelope = verify(state.nonce_head if state is not None else None)
    return settings, node, security, envelope


@dataclasses.dataclass(frozen=True)
class ReplyRelease:
    """Which release pipeline signs a reply, and what it releases: ``releases`` (the
    client's privacy state under DP, whose pipeline continues the accounted release -- the
    round's model after its step check, the admitted summary on its very payload -- or the
    unaccounted path), client index, release round and kind, the payload the pipeline sees
    (None: the reply's content digest), an optional encryption stage, and ``prepare``, which
    puts what the pipeline produced (e.g. a ciphertext) into the reply before it is signed."""

    releases: ClientReleases
    client: int
    round: int
    kind: str
    payload: torch.Tensor | bytes | None = None
    encrypt: EncryptPayload | None = None
    prepare: Callable[[Release], None] | None = None
    fresh: bool = True
    """False for a reply sent again from the saved state (a release already made)."""
    journal: JournalAppend | None = None
    """The node's release journal as this message read and verified it (:func:`run_stage`)."""


def _reply(
    security: MessageSecurity, message: Message, content: RecordDict, rnd: int,
    release: ReplyRelease | None = None,
) -> Message:
    """The reply to ``message``, signed for the server (round ``rnd``) by the SignEnvelope
    stage of the client's release pipeline (``release``; default: the unaccounted path, a
    reply that releases nothing accounted). A release the pipeline refuses raises: nothing
    is signed or sent."""
    message_type = message.metadata.message_type
    if release is None:
        release = ReplyRelease(UnaccountedReleases(), -1, rnd, reply_kind(message_type))
    payload = (release.payload if release.payload is not None
               else security.digest(content, message_type))
    sign = security.release_signer(content, message_type, [SERVER_ID], rnd, reply=True,
                                   prepare=release.prepare)
    released = release.releases.release_upload(release.client, release.round, release.kind,
                                               payload, encrypt=release.encrypt, sign=sign)
    if not released.metadata.get("signed"):
        raise DeployError(f"the {message_type} reply left its release pipeline unsigned")
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
    # the amendments a resume made: the server signs their digest, so it and this client run
    # every round under the same values, from the same round
    if conf.get("amendments", "") != settings.amendments_digest():
        raise DeployError(
            "the server's config amendments do not match the run config given to this client "
            f"(digest {str(conf.get('amendments', ''))[:12] or 'none'} != "
            f"{settings.amendments_digest()[:12] or 'none'})")
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
    is ever saved (``ClientRunState.noise_state`` stays None), so a restart, like every message,
    draws fresh independent noise, which the ledger's accounting already covers.
    """
    noise = make_noise_source(cfg.privacy.noise, cfg.seed, partition_id)
    noise.restore_state(saved)
    return noise


def _release_encrypted_summary(
    settings: RunSettings, node: NodeSettings, run_id: int,
    respond: Callable[[torch.Tensor, dict[str, float], JournalAppend, ReplyRelease,
                       ConfigRecord | None], Message],
    refuse: Callable[[StageResult], Message],
) -> Message:
    """This client's summary ``U_i`` for the ``ckks_overlaps`` ceremony: FEDORA's client half
    of the setup exchange (:func:`run_stage`, so noised modes release through the client's
    budget gate and ledger, and the noise source continues into the rounds exactly as in
    process); ``respond(summary, metrics, journal, release)`` encrypts and signs it through
    ``release`` (the summary pipeline) while the privacy state is open. A summary its budget
    refuses is answered by ``refuse(result)`` (a signed refusal with the budget's text, as the
    plain and noised modes answer it)."""

    def reply(result: StageResult, release: ReplyRelease) -> Message:
        if result.refusal is not None:
            return refuse(result)
        assert release.journal is not None  # run_stage's read of the node's release journal
        return respond(result.payload[KIND_SUMMARY], result.metrics, release.journal, release,
                       result.ledger_head)

    return run_stage(settings, node, run_id, "fedora", "setup", 0, lambda _limits: {},
                     journal_release=False, respond=reply).response


def _key_holder_store(node: NodeSettings, run_id: int, identity: Identity) -> KeyHolderStore:
    return KeyHolderStore(node.state_dir / "runs" / str(run_id) / "ckks", identity)


def _key_holder_identity(settings: RunSettings, node: NodeSettings) -> PublicIdentity:
    """The key holder's public identity from this node's allowlist (the federation's keys,
    installed with this client's identity): the key its sealed CKKS contexts must be signed
    with. DeployError naming the key holder when the allowlist does not list it."""
    holder = client_ids(settings.experiment.data.num_clients)[settings.key_holder]
    try:
        allowlist = load_allowlist(node.identity_dir / ALLOWLIST_FILENAME)
    except IdentityError as err:
        raise DeployError(str(err)) from None
    if holder not in allowlist:
        raise DeployError(
            f"allowlist {node.identity_dir / ALLOWLIST_FILENAME} lacks the key holder {holder}: "
            "this client cannot check that its CKKS context was made by the key holder; "
            "install the federation's allowlist"
        )
    return allowlist[holder]


def _encrypted_mode(settings: RunSettings, what: str) -> None:
    mode = settings.experiment.fedora.relatedness
    if "encrypted" not in mode:
        raise DeployError(f"{what} is part of the encrypted relatedness modes, not {mode!r}")


def ceremony(message: Message, context: Context) -> Message:
    """First contact in the encrypted modes: identify this client (DeployError naming the key
    holder when this node's allowlist does not list it); the key holder also runs
    the CKKS key ceremony (or repeats its stored result) and returns the public context and
    the secret context sealed to every client's X25519 key from the allowlist, each signed
    with its identity key for this run, its recipient and the public context."""
    started = time.time()
    settings, node, security, _ = _open_request(message, context)
    conf = _check_hash(message, "fedora", settings)
    check_supported(settings.experiment, settings.reproducible_dp_noise,
                    settings.compare_methods)
    _encrypted_mode(settings, "the key ceremony")
    if conf.get("key-holder") != settings.key_holder:
        raise DeployError(
            f"the server names client {conf.get('key-holder')!r} as key holder, the run config "
            f"names client {settings.key_holder}"
        )
    # at first contact, not once the key holder has made its keys: a node that could not
    # check its sealed context's signature stops the run now
    _key_holder_identity(settings, node)
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
        store = _key_holder_store(node, _run_id(context), security.identity)
        public, sealed = store.ceremony({p: allowlist[p].agreement_key for p in parties})
        # each blob signed for this run, its recipient and this public context: a client opens
        # no context that the key holder did not make for it (the server forwards them)
        signed = sign_sealed_keys(
            security.identity,
            sealed,
            public_context_digest(public),
            run_id=_run_id(context),
            config_hash=settings.config_hash,
        )
        content["ceremony"] = ConfigRecord(
            {
                "public-context": public,
                **{f"sealed-{p}": sealed[p] for p in parties},
                **{f"signature-{p}": signed[p] for p in parties},
            }
        )
    content["metrics"] = MetricRecord(_timings(started))
    return _reply(security, message, content, 0)


def encrypted_summary(message: Message, context: Context) -> Message:
    """Release ``Enc(U_i)``: open the sealed CKKS context (only one the key holder, as this
    node's allowlist lists it, signed for this run, this client and the public context the
    server states: else SecureRelatednessError naming the key holder, before the summary is
    computed, encrypted or journaled), compute the summary (noised through
    the budget gate in noised+encrypted mode), encrypt its q columns; plus initial accuracy.
    A summary the budget refuses is answered with a signed ``refusal`` record holding the
    budget's text (no upload)."""
    started = time.time()
    settings, node, security, _ = _open_request(message, context)
    _check_hash(message, "fedora", settings)
    cfg = settings.experiment
    check_supported(cfg, settings.reproducible_dp_noise, settings.compare_methods)
    _encrypted_mode(settings, "an encrypted summary")
    ckks = message.content["ckks"] if "ckks" in message.content else None
    if not isinstance(ckks, ConfigRecord) or not isinstance(ckks.get("sealed-context"), bytes):
        raise DeployError("encrypted summary request lacks ckks/sealed-context")
    holder = _key_holder_identity(settings, node)
    layout = layout_for(cfg, DataSchema.of(ensure_partition(node, cfg)))
    if (ckks.get("num-vectors"), ckks.get("dim")) != (layout.num_vectors, layout.dim):
        raise DeployError(
            f"the server's layout ({ckks.get('num-vectors')}, {ckks.get('dim')}) differs from "
            f"this run's ({layout.num_vectors}, {layout.dim})"
        )
    # before anything is computed, encrypted or journaled
    ctx = open_signed_keys(
        ckks["sealed-context"],
        ckks.get("context-signature"),
        ckks.get("public-context-digest"),
        security.identity,
        holder,
        run_id=_run_id(context),
        config_hash=settings.config_hash,
    )
    i = node.partition_id

    def respond(u: torch.Tensor, metrics: dict[str, float], verified: JournalAppend,
                release: ReplyRelease, ledger: ConfigRecord | None) -> Message:
        content = RecordDict(
            {
                "client": ConfigRecord({"client-id": i, "config-hash": settings.config_hash}),
                "metrics": MetricRecord({**metrics, **_timings(started)}),
            }
        )
        if ledger is not None:  # signed with the reply: the server anchors and re-states it
            content["ledger"] = ledger

        def prepare(encrypted: Release) -> None:
            # the EncryptPayload stage's ciphertexts, journaled before they are signed; a
            # summary sent again from the saved state is the same release (the same plaintext
            # under fresh CKKS randomness): journaled once, unless its record was never made
            assert isinstance(encrypted.payload, bytes)
            columns = unpack_summary_upload(encrypted.payload)
            if release.fresh or not _journaled(verified, i, "summary"):
                verified.append(i, 0, "summary", b"".join(columns))
            content["upload"] = ConfigRecord({"columns": columns})

        # summary pipeline (gate + ledger under DP already passed) -> encrypt -> sign
        return _reply(security, message, content, 0, dataclasses.replace(
            release, kind=KIND_RELATEDNESS_UPLOAD, payload=u,
            encrypt=summary_encryption(ctx, layout, i), prepare=prepare))

    def refuse(result: StageResult) -> Message:
        assert result.refusal is not None
        content = RecordDict({
            "client": ConfigRecord({"client-id": i, "config-hash": settings.config_hash}),
            "refusal": ConfigRecord({"reason": result.refusal}),  # as its ledger records it
            "metrics": MetricRecord({**result.metrics, **_timings(started)})})
        if result.ledger_head is not None:
            content["ledger"] = result.ledger_head
        return _reply(security, message, content, 0)

    return _release_encrypted_summary(settings, node, _run_id(context), respond, refuse)


def decrypt_overlaps_handler(message: Message, context: Context) -> Message:
    """Key holder only: decrypt the server's encrypted Gram rows with the stored secret
    context and return the ``(N, N, q, q)`` overlap blocks, nothing else. The request's
    ``answered-ceremony`` (the digest of the public context the server accepted) must match
    the stored keys, else NodeStateError (a wiped, older or other store)."""
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
    answered = record.get("answered-ceremony") if isinstance(record, ConfigRecord) else None
    if not isinstance(answered, str) or len(answered) != 64:
        raise DeployError(f"the decryption request's answered-ceremony is malformed: {answered!r}")
    store = _key_holder_store(node, _run_id(context), security.identity)
    store.check_answered(answered)  # before the store decrypts anything
    n, q = cfg.data.num_clients, cfg.fedora.q
    vectors = range(n * q)  # every row: the Flower runtime needs every client
    layout = layout_for(cfg, DataSchema.of(ensure_partition(node, cfg)))
    alone = record.get("isolated-rows") if isinstance(record, ConfigRecord) else None
    if alone is not None:
        return _blame_reply(message, security, store, layout, rows, alone, n, q, started)
    gram = decrypt_rows(store.secret_context(), layout, rows, vectors)
    overlaps = overlaps_from_rows(gram, vectors, n, q)
    _, journal = run_paths(node, _run_id(context))
    # What the key holder releases (the overlaps of every pair) is journaled like a summary;
    # the same overlaps decrypted again (a request repeated) are the same release: one record
    blob = overlaps.numpy().tobytes()
    with _stage_lock(node, _run_id(context)), journal.reading() as verified:
        _repair_journal(verified)
        if not _journaled(verified, node.partition_id, "overlaps",
                          hashlib.sha256(blob).hexdigest()):
            verified.append(node.partition_id, 0, "overlaps", blob)
    content = RecordDict(
        {
            "overlaps": tensor_to_array_record("overlaps", overlaps),
            "metrics": MetricRecord(_timings(started)),
        }
    )
    return _reply(security, message, content, 0)




def _blame_reply(message: Message, security: MessageSecurity, store: Any,
                 layout: InnerProductLayout, rows: object, alone: object, n: int, q: int,
                 started: float) -> Message:
    """Key holder, asked whose upload made the rows wrong (the request's ``isolated-rows``,
    the server's :func:`~secure_fedora.secure.relatedness.isolated_rows` after a
    :class:`~secure_fedora.secure.relatedness.RowValuesError`): the joint ``rows`` must be
    refused again, then the reply names the clients (``ConfigRecord "blame"``: ``clients``,
    ``certain``), nothing decrypted; the values stay in this node's log. Nothing is
    journaled: nothing is released."""
    vectors = range(n * q)
    try:
        decrypt_rows(store.secret_context(), layout, rows, vectors)
    except RowValuesError as err:
        refused = str(err)
    else:
        raise DeployError("asked whose encrypted summary made the Gram rows wrong, but the rows "
                          "decrypt to values that pass; refusing to answer")
    blame = blame_uploads(store.secret_context(), layout, alone, vectors, q, refused)
    log.warning("key holder: %s", blame)
    content = RecordDict({
        "blame": ConfigRecord({"clients": blame.clients, "certain": blame.certain}),
        "metrics": MetricRecord(_timings(started)),
    })
    return _reply(security, message, content, 0)


def _journaled(verified: JournalAppend, client: int, kind: str, digest: str | None = None) -> bool:
    """Whether the verified release journal holds a round-0 ``kind`` record of ``client``
    (with ``digest``: of those very bytes)."""
    return any((e.get("client"), e.get("round"), e.get("kind")) == (client, 0, kind)
               and (digest is None or e.get("payload_sha256") == digest)
               for e in verified.entries)


def hello(message: Message, context: Context) -> Message:
    """First contact: identify this client; report its split sizes and data schema (input
    shape, classes) and the partition facts a client may publish. No data leaves.

    Before it answers, the client checks its data against the run's model as the in-process
    runtime checks every client's before any key store or ledger
    (:func:`~secure_fedora.runtimes.inprocess.build_context`: labels, the model's output
    width, the loss, under DP exact per-sample gradients on its own batch sizes). A problem
    with the input (a toolkit ``ValueError``: DataError, ModelError, DPSGDError, ...) is
    answered with a signed ``refusal`` record naming it instead of the data facts, so that
    the server stops the run before any method message, ceremony, ledger or release. The
    refusal's reason is the error's class name and, only where the run's ``[security]
    client_errors`` and the node config's ``client-errors`` are both "full", its message (which
    can name facts of the data); the full text is in the node's own log either way
    (:data:`CLIENT_ERRORS_LOG`). The reply, a refusal too, states which of the two this
    client's error texts are (``client-errors``), so that the run's results and a stop at
    first contact can say it per client. An accepted reply states the device this client
    resolved (``device``: ``[training] device``, "auto" resolved on this node) and the torch
    thread count it runs on (``threads``), which results.json's ``compute`` records; without
    DP it also states its data's SHA-256 (``data-fingerprint``,
    :func:`~secure_fedora.data.sources.fingerprint_client`), of which the server makes
    results.json's ``data_fingerprint``; under DP it states none."""
    started = time.time()
    # the reply carries the hello's epoch (its envelope round): the server accepts no other
    settings, node, security, request = _open_request(message, context, HELLO_SCOPE)
    _check_hash(message, "run", settings)
    check_supported(settings.experiment, settings.reproducible_dp_noise,
                    settings.compare_methods)
    try:
        client = ensure_partition(node, settings.experiment)
        schema = DataSchema.of(client)
        # its checks alone, and the device it resolved (training.device) for every stage
        device = client_context(settings.experiment, node.partition_id, client).init.device
    except ToolkitError as err:
        if not isinstance(err, ValueError):  # a node's state or deployment: not the input
            raise
        mode = _client_errors_mode(context)
        reason = client_error_text(err, mode)
        _record_client_error(context, f"client {node.partition_id} refuses the run", err,
                             reason)
        refusal = RecordDict({
            "client": ConfigRecord({"client-id": node.partition_id,
                                    "config-hash": settings.config_hash}),
            "refusal": ConfigRecord({"reason": reason, "client-errors": mode}),
            "metrics": MetricRecord(_timings(started))})
        return _reply(security, message, refusal, request.round)
    info: dict[str, Any] = {
        "client-id": node.partition_id, "config-hash": settings.config_hash,
        "input-shape": list(schema.input_shape), "num-classes": schema.num_classes,
        "multilabel": schema.multilabel, "train": int(client.train_x.shape[0]),
        "val": int(client.val_x.shape[0]), "test": int(client.test_x.shape[0]),
        "client-errors": _client_errors_mode(context),
        "device": device.type, "threads": torch.get_num_threads(),
    }
    if not settings.experiment.privacy.enabled:
        # without DP the server records the data fingerprint (results.json) from these;
        # under DP a hash of the data would let the server confirm a guess of it, outside
        # the ledgers, so none is sent
        info["data-fingerprint"] = fingerprint_client(client)
    for key in ("rotation_degrees", "group", "classes"):
        value = client.meta.get(key)
        if isinstance(value, bool | int | float | str) or (
                isinstance(value, list) and all(isinstance(v, int) for v in value)):
            info[f"meta-{key}"] = value
    content = RecordDict({"client": ConfigRecord(info),
                          "metrics": MetricRecord(_timings(started))})
    return _reply(security, message, content, request.round)


def _claimed_method(message: Message, settings: RunSettings) -> str:
    """The method a method message names (read before verification only to pick the
    envelope scope; the signature then covers it). Must be one of the configured methods."""
    conf = message.content["run"] if "run" in message.content else None
    method = conf.get("method") if isinstance(conf, ConfigRecord) else None
    if not isinstance(method, str) or method not in settings.experiment.methods:
        raise DeployError(
            f"message {message.metadata.message_type} names method {method!r}, not one of the "
            f"configured methods {list(settings.experiment.methods)}")
    return method


def _admit(privacy: ClientSidePrivacy, method: str, cfg: ExperimentConfig, i: int, rnd: int,
           noise: NoiseSource | None) -> bool:
    """Account client ``i``'s round-``rnd`` model release (the mechanisms the method declares,
    :func:`~secure_fedora.algorithms.contract.round_mechanisms`) in its ledger before the
    client half runs; False when its budget refuses it."""
    with_lambda = "gaussian_lambda" in round_mechanisms(method, cfg)
    return privacy.admit(i, rnd, torch.empty(0), with_lambda, noise=noise)


def _saved_reply(state: ClientRunState, stage: str) -> tuple[Payload, dict[str, float], str | None]:
    return (dict(state.replies.get(stage, {})), dict(state.metrics.get(stage, {})),
            state.refusals.get(stage))


def method_message(message: Message, context: Context) -> Message:
    """Client half of one method exchange (setup, round, evaluate or finalize): see the
    module docstring for the order of checks, admission, computation and persistence."""
    started = time.time()
    message_type = message.metadata.message_type
    stage = STAGE_OF[message_type]
    method = _claimed_method(message, RunSettings.from_run_config(context.run_config))
    saved = _SavedState(method)
    settings, node, security, envelope = _open_request(message, context, method, saved=saved)
    conf = _check_hash(message, "run", settings)
    cfg = settings.experiment
    check_supported(cfg, settings.reproducible_dp_noise, settings.compare_methods)
    rnd = conf.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise DeployError(f"{message_type} message carries an invalid round {rnd!r}")
    if conf.get("stage") != stage or conf.get("method") != method:
        raise DeployError(f"{message_type} message names exchange {conf.get('stage')!r}")
    wire = wire_round(stage, rnd, cfg.training.rounds)
    if wire != envelope.round:
        raise DeployError(f"{stage} message for round {rnd} is signed for round {envelope.round}")

    def incoming(limits: PayloadLimits) -> Payload | None:
        if not conf.get("has-payload"):
            return None
        record = message.content["payload"] if "payload" in message.content else None
        return record_to_payload(record, envelope, f"{stage} message", limits)

    def respond(result: StageResult, release: ReplyRelease) -> Message:
        content = RecordDict()
        if result.refusal is not None:  # the budget gate's text, as its ledger records it
            content["refusal"] = ConfigRecord({"reason": result.refusal})
        else:
            content["payload"] = payload_to_record(result.payload, result.limits)
        if result.ledger_head is not None:
            content["ledger"] = result.ledger_head
        content["run"] = ConfigRecord({"method": method, "stage": stage, "round": rnd})
        content["metrics"] = MetricRecord({**result.metrics, **_timings(started)})
        return _reply(security, message, content, wire, release)

    return run_stage(settings, node, _run_id(context), method, stage, rnd, incoming,
                     respond=respond, server_saw=_server_saw(conf),
                     server_answered=_server_answered(conf),
                     nonce_head=security.verifier.nonce_head(), prior=saved).response


def _server_saw(conf: ConfigRecord) -> tuple[int, str] | None:
    """The ledger state (entries, hash of the last line) the server last received from this
    client for the method, as its signed request states it; None before the first."""
    entries, head = conf.get("ledger-entries"), conf.get("ledger-head")
    if entries is None and head is None:
        return None
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 0 \
            or not isinstance(head, str) or len(head) != 64 or set(head) - set("0123456789abcdef"):
        raise DeployError("the request's ledger-entries/ledger-head are malformed")
    return entries, head


def _server_answered(conf: ConfigRecord) -> dict[str, int]:
    """The last round of each exchange whose reply from this client the server accepted for
    the method (``answered-<exchange>`` in its signed request; with or without DP), which
    this client's saved state must have answered too. Malformed: DeployError."""
    answered: dict[str, int] = {}
    for stage in STAGE_OF.values():
        rnd = conf.get(f"answered-{stage}")
        if rnd is None:
            continue
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise DeployError(f"the request's answered-{stage} is malformed: {rnd!r}")
        answered[stage] = rnd
    return answered


@dataclasses.dataclass
class StageResult:
    """What one exchange of a method's client half produced (see :func:`run_stage`)."""

    payload: Payload
    metrics: dict[str, float]  # the stage's metrics and, with DP, the client's spending
    refusal: str | None
    ledger_head: ConfigRecord | None
    limits: PayloadLimits
    response: Any = None  # what run_stage's ``respond`` returned (the signed reply)


def _reply_release(privacy: ClientSidePrivacy | None, i: int, stage: str, rnd: int,
                   result: StageResult, *, fresh: bool) -> ReplyRelease:
    """The pipeline that signs client ``i``'s reply to ``stage`` of round ``rnd``: under DP a
    freshly computed round release continues the round's model pipeline (step check, then
    the signature) and a freshly released summary the summary pipeline (on that payload);
    anything else (no DP, a refusal, evaluation and finalize replies, a reply sent again
    from the saved state) the unaccounted path."""
    if privacy is not None and fresh and result.refusal is None and result.payload:
        if stage == "round":
            return ReplyRelease(privacy, i, rnd, "model")
        summary = result.payload.get(KIND_SUMMARY)
        if stage == "setup" and privacy.sole.summary_release is not None and summary is not None:
            return ReplyRelease(privacy, i, 0, KIND_SUMMARY, payload=summary)
    return ReplyRelease(UnaccountedReleases(), i, rnd, f"{stage}.reply", fresh=fresh)


def run_stage(
    settings: RunSettings, node: NodeSettings, run_id: int, method: str, stage: str, rnd: int,
    incoming: Callable[[PayloadLimits], Payload | None], *, journal_release: bool = True,
    respond: Callable[[StageResult, ReplyRelease], Any] | None = None,
    server_saw: tuple[int, str] | None = None,
    server_answered: Mapping[str, int] | None = None,
    nonce_head: Mapping[str, Any] | None = None,
    prior: _SavedState | None = None,
) -> StageResult:
    """Run this client's half of ``method`` for ``stage`` of round ``rnd`` (the verified
    message's payload from ``incoming``): rebuild the algorithm with only this client's data,
    restore its state, admit (DP) and compute, take the method's client state, journal a
    released payload, save the state (a failure before the journal leaves no reply on it).

    A stage this client already answered for ``rnd`` is answered again from its saved state,
    with nothing computed, accounted or released twice; an older round is refused.
    ``journal_release`` False: the caller releases (and journals) something else instead of
    the payload (the CKKS ceremony sends the encrypted summary, never the summary itself).
    ``respond(result, release)`` builds and signs the reply while the client's privacy state
    is open (``release``: the pipeline that must sign it, :class:`ReplyRelease`); its value
    is ``result.response``. ``server_saw`` is the ledger state the server last received from
    this client: the node's ledger and saved state must hold it (else NodeStateError).
    ``server_answered`` is the last round of each exchange whose reply the server accepted
    from this client: its saved state must have answered as far (else NodeStateError, with
    or without DP). ``nonce_head`` is the method scope's nonce memory once the message was
    accepted: every state saved here records it (checked at the next message); ``prior``
    the state as read then, reused while client.pt is that file.
    """
    cfg = settings.experiment
    i = node.partition_id
    client = ensure_partition(node, cfg)
    ctx = client_context(cfg, i, client)
    algorithm = build_algorithm(method, ctx, cfg)
    apply_amendments(settings, method, algorithm, rnd)
    limits = PayloadLimits.for_model(ctx.flat.num_params)
    message = incoming(limits)
    # before any state, ledger or journal is opened: a message the method's code cannot use
    # admits no budget and journals nothing
    check_message_entries(algorithm, method, stage, i, message)
    # one stage at a time per client: a late process (a round answered after its timeout) and
    # the next message's would otherwise each save a state the other missed; under the lock a
    # torn last line of the ledger or journal is a dead writer's, never a live append
    with _stage_lock(node, run_id), contextlib.ExitStack() as reading:
        state_path = _method_dir(node, run_id, method) / "client.pt"
        loaded = prior.take(state_path) if prior is not None else None
        saved = loaded is not None or state_path.exists()
        state = (loaded if loaded is not None else
                 ClientRunState.load(state_path, i, run_id, settings.config_hash, method)
                 if saved else
                 ClientRunState(i, run_id, settings.config_hash, method,
                                client_generator(cfg.seed, i).get_state()))
        if nonce_head is not None:
            state.nonce_head = dict(nonce_head)
        _, journal = run_paths(node, run_id)
        done = state.answered.get(stage)
        if done is not None and done > rnd:
            raise DeployError(f"stale {stage} message: round {rnd} after round {done}")
        # every check that can refuse the message first, reading only: a refusal changes no
        # file (but the verified request's nonce, recorded on purpose: MessageSecurity.verify)
        # read once for the whole message: its complete lines must verify (else NodeStateError);
        # the checks, the repair of a torn last line and the append all use this read
        verified = reading.enter_context(journal.reading())
        heads = [state.ledger_head if saved else None, server_saw]
        checked = _check_privacy(settings, node, run_id, method, ctx.flat.module,
                                 max((int(h[0]) for h in heads if h is not None), default=0))
        _check_state_holds(state, saved, checked, verified, method, server_saw,
                           server_answered)
        # a process killed while saving its state left a partial copy beside it (as in process)
        for leftover in remove_interrupted_writes(state_path):
            log.warning("removed %s, a client state write that was interrupted", leftover)
        _repair_journal(verified)
        replay = (_unanswered_release(checked, state, stage, rnd)
                  if saved and done != rnd else None)
        privacy = (_open_privacy(settings, node, run_id, method, checked, ctx.flat.module,
                                 replay) if checked is not None else None)
        try:
            if not saved:
                # saved before the first release, so that a missing state file with releases on
                # record always means a lost one (never the crash window of the first release)
                state.ledger_head = privacy.sole.ledger.head if privacy is not None else None
                state.ledger_journal_records = (len(checked.journal) if checked is not None
                                                else None)
                state.journal_head = verified.head()
                state.save(state_path)
            if done == rnd:  # delivered again: the same answer, nothing computed or released twice
                payload, metrics, refusal = _saved_reply(state, stage)
            else:
                payload, metrics, refusal = _run_client_half(
                    method, algorithm, ctx, cfg, state, privacy, stage, rnd, message, client)
                # the method's state before the reply is journaled: a plug-in whose
                # client_state_dict raises (or returns what check_client_state refuses) fails
                # the message with no reply journaled, as the reply is never sent; delivered
                # again, the exchange is re-made (under DP from its ledger entries and sealed
                # journal record, as after a process that died before saving its answer)
                with client_half(method, f"client {i}'s client_state_dict after its {stage} "
                                         f"exchange of round {rnd}"):
                    own = algorithm.client_state_dict(i)
                own = check_client_state(method, i, own)
                if refusal is None and payload and journal_release:
                    # Journaled (fsynced) before the state that marks it answered, and before it
                    # leaves: a crash in between leaves it journaled, never released unjournaled
                    # (the same bytes made again are not journaled twice).
                    blob = b"".join(t.detach().cpu().contiguous().numpy().tobytes()
                                    for t in payload.values())
                    _journal_reply(
                        verified, state.journal_head if saved else None, i,
                        wire_round(stage, rnd, cfg.training.rounds), f"{method}/{stage}", blob,
                        remade=replay is not None)
                state.algorithm = own
                state.generator_state = ctx.generators[i].get_state()
                if ctx.noise and cfg.privacy.noise == "reproducible":
                    state.noise_state = ctx.noise[i].checkpoint_state()
                state.answered[stage] = rnd
                state.replies[stage] = payload
                if privacy is not None:
                    state.ledger_head = privacy.sole.ledger.head
                    state.ledger_journal_records = len(privacy.journals[i])
                state.metrics[stage] = metrics
                state.journal_head = verified.head()
                if refusal is not None:
                    state.refusals[stage] = refusal
                else:
                    state.refusals.pop(stage, None)
                state.save(state_path)
            if privacy is not None and stage == "evaluate" and rnd == cfg.training.rounds:
                # The method's last round is evaluated: its ledger is finished, so it ends with
                # its signed close entry (idempotent on a message delivered again).
                privacy.close_ledgers(rnd)
                if state.ledger_head != privacy.sole.ledger.head:  # the reply reports it
                    state.ledger_head = privacy.sole.ledger.head
                    state.ledger_journal_records = len(privacy.journals[i])
                    state.save(state_path)
            # a release this node made before (its saved answer sent again, or re-made from
            # its journal record): the server lists it under the resume it answers
            repeated = (refusal is None and bool(payload) and stage in ("round", "setup")
                        and (done == rnd or replay is not None))
            result = StageResult(payload, {**metrics, **_privacy_metrics(privacy)}, refusal,
                                 _ledger_record(privacy, repeated=repeated), limits)
            if respond is not None:
                result.response = respond(result, dataclasses.replace(
                    _reply_release(privacy, i, stage, rnd, result, fresh=done != rnd),
                    journal=verified))
            return result
        finally:
            if privacy is not None:
                privacy.close()


def _unanswered_release(checked: LedgerCheck | None, state: ClientRunState, stage: str,
                        rnd: int) -> int | None:
    """The index of the first ledger entry of this exchange's release (the round's model,
    or the setup's summary or plug-in release) when the ledger's entries past the head the
    saved state recorded end with that release's (repair and close entries aside): a process
    of this client admitted it and died before saving its answer (so it never left). None
    otherwise (no DP, nothing past the saved head, or entries of another release last: those
    stay accounted, an over-count of a release that never left)."""
    from privacy.ledger import CLOSE, REPAIR

    if checked is None or state.ledger_head is None or stage not in ("round", "setup"):
        return None
    # round 0 holds only the setup release (the summary or a plug-in mechanism's)
    kind, at = ("model", rnd) if stage == "round" else (None, 0)
    start: int | None = None
    for entry in checked.entries[int(state.ledger_head[0]):]:
        if entry["mechanism"] in (REPAIR, CLOSE):
            continue
        params = entry.get("params")
        mine = (entry["round"] == at and isinstance(params, dict)
                and (kind is None or params.get("release_kind") == kind))
        if not mine:
            start = None
        elif start is None:
            start = int(entry["index"])
    return start


def _journal_reply(verified: JournalAppend, saved_head: tuple[int, str] | None, client: int,
                   wire: int, kind: str, blob: bytes, *, remade: bool) -> tuple[int, str]:
    """Append ``blob`` (this client's ``kind`` reply of wire round ``wire``) to the node's
    release journal unless the records past the saved state's head (``saved_head``: those of
    a process that died before saving its answer) hold these very bytes for it already. A
    re-made DP release (``remade``) whose bytes differ from the ones journaled for it is a
    NodeStateError ("resume diverged"): the same noise on the same state must make the same
    release, so the inputs or the node's state changed since; nothing is journaled or sent.
    Both use the journal as ``verified`` read it (:meth:`ReleaseJournal.reading`, once per
    message). Returns the journal's head afterwards (:meth:`JournalAppend.head`)."""
    if saved_head is not None:
        digest = hashlib.sha256(blob).hexdigest()
        earlier = [e for e in verified.entries[int(saved_head[0]):]
                   if (e.get("client"), e.get("round"), e.get("kind")) == (client, wire, kind)]
        if any(e.get("payload_sha256") == digest for e in earlier):
            return verified.head()
        if earlier and remade:
            raise NodeStateError(
                f"{verified.journal.path}: resume diverged: this client's {kind} reply of round"
                f" {wire}, re-made from its journaled noise, differs from the one journaled before"
                f" its process died ({earlier[-1].get('payload_sha256', '')[:12]}... vs"
                f" {digest[:12]}...): the round's input or the node's state changed since."
                " Nothing was sent. Restore the node's state-dir from a copy, or start a new"
                " run")
    verified.append(client, wire, kind, blob)
    return verified.head()


@contextlib.contextmanager
def _stage_lock(node: NodeSettings, run_id: int) -> Iterator[None]:
    """Hold this node's exclusive lock for run ``run_id`` (blocking; a process that dies
    releases it): every write to the node's run state, ledgers and journal happens under it."""
    directory = node.state_dir / "runs" / str(run_id)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".stage.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _repair_journal(verified: JournalAppend) -> None:
    """Quarantine a torn last journal line (a process killed mid-append: the line is fsynced
    before its release leaves, so that release never left), logged, never silent."""
    moved = verified.repair_torn_tail()
    if moved is not None:
        log.warning("release journal %s: torn last line quarantined in %s (its release never "
                    "left)", verified.journal.path, moved.name)


def _check_state_holds(state: ClientRunState, saved: bool, checked: LedgerCheck | None,
                       verified: JournalAppend, method: str,
                       server_saw: tuple[int, str] | None = None,
                       server_answered: Mapping[str, int] | None = None) -> None:
    """Refuse (NodeStateError) to go on when this client's durable record of ``method`` was
    lost, cut or rolled back since its last message: the ledger (``checked``, as it is once
    entries a cut removed are restored from its journal) does not hold the state the server
    last received from it (``server_saw``) or the head its saved state recorded; the saved
    state is older than what the client last reported (a copy restored: its ledger head, or
    with or without DP an exchange's round before the last one whose reply the server
    accepted, ``server_answered``); or the state is gone while the server accepted a reply
    from it, or the ledger or the journal's records of this method's exchanges show releases;
    or the method's sealed journal holds fewer records than the saved state recorded (cut or
    replaced: a release it records could not be re-made with its own noise).
    Going on would account fewer releases than were made (a lower epsilon, an audit that
    passes) or silently restart the client's model. Every reply leaves after the state
    recording its head is saved, so none of these holds after a crash. ``verified`` is the
    node's release journal as this message read it (:meth:`ReleaseJournal.reading`). Reads
    only."""
    from privacy.ledger import torn_line_index

    recorded = state.ledger_head if saved else None
    if checked is not None:
        for who, held in (("the server last received", server_saw),
                          ("its saved state recorded", recorded)):
            if held is not None and not checked.holds(int(held[0]), str(held[1])):
                raise NodeStateError(
                    f"{checked.ledger_path}: {who} this client's ledger at {held[0]} entries "
                    f"ending in {str(held[1])[:12]}..., and the node's ledger "
                    f"({checked.head[0]} entries) does not hold that: entries were lost, cut or "
                    "replaced (a wiped or restored node); going on would account fewer releases "
                    "than were made. Restore the node's state-dir from a copy, or start a new run")
        if server_saw is not None and recorded is not None and int(recorded[0]) < server_saw[0]:
            raise NodeStateError(
                f"this client's saved state of {method!r} recorded its ledger at "
                f"{recorded[0]} entries, older than the {server_saw[0]} it last reported: "
                "client.pt was replaced by an older copy; going on would drop the client's "
                "later updates. Restore the node's state-dir, or start a new run")
    for stage, rnd in sorted((server_answered or {}).items()):
        have = state.answered.get(stage) if saved else None
        if have is None or have < rnd:
            held = ("is missing" if not saved else
                    f"was replaced by an older copy (its last {stage} answer: "
                    + ("none" if have is None else f"round {have}") + ")")
            raise NodeStateError(
                f"the server accepted this client's {stage} reply of round {rnd} for "
                f"{method!r}, but its state (client.pt) {held}: going on would mix the "
                "rounds of an older state into the run (or restart the client's model). "
                "Restore the node's state-dir, or start a new run")
    if saved:
        kept = state.ledger_journal_records
        if checked is not None and kept is not None and len(checked.journal) < kept:
            raise NodeStateError(
                f"{checked.journal.path}: this client's saved state of {method!r} recorded its"
                f" sealed journal at {kept} records, and it holds {len(checked.journal)}:"
                " records were cut or the journal was replaced, and a release they record"
                " could no longer be re-made with its own noise. Restore the node's state-dir"
                " from a copy, or start a new run")
        if state.journal_head is not None and not verified.holds(state.journal_head):
            count, last = state.journal_head
            raise NodeStateError(
                f"{verified.journal.path}: this client's saved state of {method!r} recorded the "
                f"node's release journal at {count} records ending in {last[:12]}..., and the "
                f"journal ({verified.head()[0]} records) does not hold that: records were lost, cut or "
                "replaced, and going on would leave releases that left this node off its "
                "record. Restore the node's state-dir from a copy, or start a new run")
        return
    earlier = [e for e in verified.entries
               if str(e.get("kind", "")).startswith(f"{method}/")]
    # a torn last line counts: the state is saved before the first ledger write
    entries = (checked.head[0] + (torn_line_index(checked.ledger_path) is not None)
               if checked is not None else 0)
    if earlier or entries:
        what = (f"{len(earlier)} release(s) in {verified.journal.path}" if earlier
                else f"{entries} ledger entries")
        raise NodeStateError(
            f"this client's state of {method!r} (client.pt) is missing, but its node records "
            f"{what} of this run: the state was lost or deleted, and a fresh one would restart "
            "the client's model silently. Restore the node's state-dir from a copy, or start "
            "a new run")


def _run_client_half(
    method: str,
    algorithm: Any, ctx: Any, cfg: ExperimentConfig, state: ClientRunState,
    privacy: ClientSidePrivacy | None, stage: str, rnd: int, incoming: Payload | None,
    client: ClientData,
) -> tuple[Payload, dict[str, float], str | None]:
    """Restore the method's client state, then run its client half for ``stage``; returns
    (reply payload, metrics, refusal reason or None).

    The reply is checked here as the server will check it (``ReplyRules.check_received``:
    exactly the declared entries, counts, allowed dtypes, finite values, and the dtype and
    shape of every entry the method's server half fixes), so a malformed reply fails in this
    process with a :class:`~secure_fedora.algorithms.contract.ContractError` naming the
    method, the client, the exchange and the entry (the server sees an error reply), before
    it is journaled as a release, saved as answered or signed. The server still checks every
    reply it receives (a node may run other code)."""
    i = client.client_id
    if state.algorithm:
        with client_half(method, f"client {i}'s load_client_state_dict"):
            algorithm.load_client_state_dict(i, state.algorithm)
    ctx.generators[i].set_state(state.generator_state)
    if ctx.noise:
        ctx.noise[i] = _noise_source(cfg, i, state.noise_state)
    if privacy is not None:
        privacy.loss = ctx.flat.task.checked
        ctx.privacy = privacy
    message = incoming if incoming is not None else {}
    rules = algorithm.reply_rules
    if stage == "evaluate":
        with client_half(method, f"client {i}'s client_eval_row"):
            row = algorithm.client_eval_row(i, incoming)
        row = check_eval_row(method, i, row, ctx.flat.num_params)  # as in process
        c = ctx.clients[i]
        metrics = {"test-metric": float(evaluate(ctx.flat, row, c.test_x, c.test_y).metric)}
        if model_selection(cfg) == "validation":  # private validation under DP never leaves
            metrics["val-metric"] = float(evaluate(ctx.flat, row, c.val_x, c.val_y).metric)
        if ctx.buffers is not None:  # metrics computed with a written buffer would leave
            ctx.buffers.check(f"in client {i}'s evaluate exchange of round {rnd}")
        return {}, metrics, None
    if stage == "setup":
        try:
            with client_half(method, f"client {i}'s client_setup"), \
                    privacy.setup_exchange() if privacy is not None else contextlib.nullcontext():
                reply = algorithm.client_setup(i, message)
        except BudgetExceededError as err:
            return {}, {}, str(err)
        if privacy is not None:
            check_setup_steps(method, privacy, [i])
            if setup_plug_ins(method, cfg) and privacy.sole.summary_release is None:
                raise ContractError(  # as in process: its plan and ledger would disagree
                    f"method {method!r} declares the setup release "
                    f"{[k for k, _ in setup_plug_ins(method, cfg)]}, but client {i} replied "
                    "without making it (ctx.privacy.gaussian in client_setup); nothing was sent")
    elif stage == "round":
        if privacy is not None and not _admit(privacy, method, cfg, i, rnd,
                                              ctx.noise[i] if ctx.noise else None):
            return {}, {}, privacy.sole.refusal or "the release was refused"
        with client_half(method, f"client {i}'s client_update of round {rnd}"):
            reply = algorithm.client_update(i, rnd, message)
    elif stage == "finalize":
        with client_half(method, f"client {i}'s client_finalize"):
            reply = algorithm.client_finalize(i, message)
    else:
        raise DeployError(f"unknown exchange {stage!r}")
    if ctx.buffers is not None:  # a buffer forward wrote would leave with this reply
        ctx.buffers.check(f"in client {i}'s {stage} exchange of round {rnd}")
    if rules is not None:  # before it leaves: what the server would refuse, refused here
        rules.check_received(stage, i, reply, algorithm.reply_schema or ReplySchema.of(algorithm))
        if privacy is not None and stage in rules.plug_in_entries:  # as in process
            privacy.check_plug_in_reply(stage, i, rnd, reply, rules.plug_in_entries[stage])
    if stage == "round" and privacy is not None:  # executed DP-SGD steps == the ledger's
        privacy.confirm_steps(rnd, [i])
    return reply, {}, None




#: Message type -> handler as the ClientApp routes it: behind :func:`_withholding`, so that
#: an error's text reaches the server as ``[security] client_errors`` says (the in-memory test
#: grid calls these; tests of one handler call the undecorated functions above).
HANDLERS: dict[str, Callable[[Message, Context], Message]] = {
    message_type: _withholding(handler) for message_type, handler in {
        MSG_HELLO: hello,
        MSG_SETUP: method_message,
        MSG_ROUND: method_message,
        MSG_EVALUATE: method_message,
        MSG_FINALIZE: method_message,
        MSG_CEREMONY: ceremony,
        MSG_ENCRYPTED_SUMMARY: encrypted_summary,
        MSG_DECRYPT: decrypt_overlaps_handler,
    }.items()
}

for _message_type, _handler in HANDLERS.items():  # e.g. app.query("hello")(...)
    _category, _action = _message_type.split(".")
    getattr(app, _category)(_action)(_error_reply(_handler))
