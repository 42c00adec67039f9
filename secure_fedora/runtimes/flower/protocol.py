"""What the generic ServerApp and ClientApp exchange over Flower, and how it is encoded.

Every message below carries a signed envelope (:mod:`secure_fedora.runtimes.flower.envelopes`):
kind = message type (``.reply`` appended for replies); first-contact requests carry one envelope
per client id. Envelopes are verified in a *scope* (its own nonce memory and round floor):
``hello`` for the first contact, one scope per method. A method's envelope round is
:func:`wire_round`: 0 for its setup, ``r`` for round ``r`` and its evaluation,
``rounds + 1`` for its finalize exchange.

``query.hello`` (server -> every node; first contact)
    Envelope round: the exchange's *epoch*, one above the server's last (each hello exchange,
    retries and later searches for a moved client included, has its own); the reply is
    signed at that round, and a reply of an earlier epoch is refused as stale.
    content: ``ConfigRecord "run"`` with ``config-hash``.
    reply: ``ConfigRecord "client"`` with ``client-id``, ``config-hash``, ``input-shape``,
    ``num-classes``, ``multilabel``, the split sizes ``train``, ``val``, ``test`` and the
    partition facts ``meta-<key>`` a client may publish (rotation, group, classes).

Method exchanges (any method; the payloads are the method's :data:`Payload` s):

``query.setup`` / ``train.round`` / ``evaluate.round`` / ``query.finalize``
    content: ``ArrayRecord "payload"`` (the method's message to this client, every tensor in
    its own dtype) and ``ConfigRecord "run"`` with ``method``, ``stage`` (setup, round,
    evaluate, finalize), ``round``, ``has-payload`` and ``config-hash``.
    reply: ``ConfigRecord "run"`` (method, stage, round echoed), ``ArrayRecord "payload"``
    (the client half's reply; for ``evaluate.round`` empty), ``MetricRecord "metrics"``
    (timings; ``val-metric`` and ``test-metric`` for an evaluation; the client's
    ``epsilon-spent``, ``epsilon-budget`` and ``ledger-entries`` with DP), with DP
    ``ConfigRecord "ledger"`` (``entries``, ``head``: the SHA-256 of its last ledger line;
    the client's plan: ``noise-multiplier``, ``accountant`` and, where its method releases
    them, ``summary-noise`` and ``lambda-noise``; a record without ``noise-multiplier``, from
    an older ClientApp, is stated with the config's calibration; ``repeated = true`` when
    the round's or setup's release is one the node made before, sent again from its saved
    state or re-made from its journal record, which a resumed ServerApp records), and
    instead of a payload ``ConfigRecord "refusal"`` (``reason``) when the client refused the
    release under its budget.

FEDORA's encrypted relatedness (CKKS; the key holder is client ``key-holder`` of the run
config, default 0) adds its ceremony messages (:mod:`secure_fedora.runtimes.flower.ceremony`):

``query.ceremony`` (server -> every node)
    content: ``ConfigRecord "fedora"`` with ``config-hash`` and ``key-holder``.
    reply: ``ConfigRecord "client"`` (``client-id``, ``config-hash``); the key holder's reply
    also holds ``ConfigRecord "ceremony"``: ``public-context`` (no secret key),
    ``sealed-<client id>`` and the key holder's Ed25519 signature of it, ``signature-<client
    id>`` (:func:`secure_fedora.secure.relatedness.sign_sealed_keys`), for every client.
``query.encrypted_summary`` (server -> each client's node)
    content: ``ConfigRecord "fedora"`` (``config-hash``) and ``ConfigRecord "ckks"`` with
    ``sealed-context``, ``context-signature``, ``public-context-digest`` (SHA-256 hex of the
    public context the server computes with), ``num-vectors`` and ``dim``. reply: ``ConfigRecord "upload"`` with
    ``columns`` (q serialized :class:`privacy.ckks.InnerProductUpload`).
``query.decrypt_overlaps`` (server -> the key holder's node)
    content: ``ConfigRecord "rows"`` with ``rows``. reply: ``ArrayRecord "overlaps"``
    (N x N x q x q, float64), nothing else. After a RowValuesError the server asks again
    with ``isolated-rows`` too (each client's rows computed from its uploads alone); the
    reply is then ``ConfigRecord "blame"`` (``clients``, ``certain``), nothing decrypted.

The experiment configuration travels in the run config (key ``experiment``, the validated
config as JSON), so server and clients use one config; every message carries its hash and a
client refuses a message whose hash differs from the config it was given.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from privacy.errors import ToolkitError
from privacy.paths import NotRegularFileError
from secure_fedora.core.config import (
    MAX_THREADS,
    ConfigError,
    ExperimentConfig,
    config_hash,
    parse_config,
)

__all__ = [
    "DeployError",
    "PULL_RESUME_COMMAND",
    "apply_amendments",
    "parse_amendments",
    "resume_run_id",
    "MSG_CEREMONY",
    "MSG_DECRYPT",
    "MSG_ENCRYPTED_SUMMARY",
    "MSG_EVALUATE",
    "MSG_FINALIZE",
    "MSG_HELLO",
    "MSG_ROUND",
    "MSG_SETUP",
    "MSG_SUMMARY",
    "HELLO_SCOPE",
    "STAGE_OF",
    "wire_round",
    "NodeSettings",
    "RunSettings",
    "CLIENT_ERRORS_MODES",
    "WITHHELD_DETAILS",
    "array_record_to_tensor",
    "check_apps_know_entries",
    "client_error_text",
    "deterministic_class",
    "deterministic_client_error",
    "pull_diverged",
    "reports_pull_divergence",
    "effective_client_errors",
    "check_supported",
    "experiment_to_run_config",
    "make_run_config",
    "process_start_time",
    "tensor_to_array_record",
]

MSG_SUMMARY = "query.summary"
MSG_CEREMONY = "query.ceremony"
MSG_ENCRYPTED_SUMMARY = "query.encrypted_summary"
MSG_DECRYPT = "query.decrypt_overlaps"
MSG_HELLO = "query.hello"
MSG_SETUP = "query.setup"
MSG_ROUND = "train.round"
MSG_EVALUATE = "evaluate.round"
MSG_FINALIZE = "query.finalize"

#: Envelope scope of the first contact (each method has its own scope, named after it).
HELLO_SCOPE = "hello"
#: Prefix of a client's ledger-record keys that state a plug-in Gaussian mechanism's noise
#: multiplier (``mechanism-noise.<name>``), beside ``noise-multiplier`` and the built-ins'.
MECHANISM_NOISE_PREFIX = "mechanism-noise."
#: Message type -> the method exchange (stage) it carries.
STAGE_OF = {MSG_SETUP: "setup", MSG_ROUND: "round", MSG_EVALUATE: "evaluate",
            MSG_FINALIZE: "finalize"}


#: What begins each line the ServerApp writes to its log stream (``flwr log``).
LOG_PREFIX = "[secure-fedora] "
_ROUND_LINE = re.compile("^" + re.escape(LOG_PREFIX) + r"(\S+) round (\d+)/(\d+): ")


def round_line(method: str, rnd: int, rounds: int, detail: str) -> str:
    """What the ServerApp logs (after :data:`LOG_PREFIX`) once round ``rnd`` of ``rounds``
    of ``method`` is done (``detail``: what it says of the round); :func:`parse_round_line`
    reads the logged line back."""
    return f"{method} round {rnd}/{rounds}: {detail}"


def parse_round_line(line: str) -> tuple[str, int, int] | None:
    """``(method, round, rounds)`` of a logged :func:`round_line` (a line of the ServerApp's
    log stream, :data:`LOG_PREFIX` first); None for any other line."""
    found = _ROUND_LINE.match(line)
    if found is None:
        return None
    return found.group(1), int(found.group(2)), int(found.group(3))


def wire_round(stage: str, rnd: int, rounds: int) -> int:
    """The envelope round of a method's ``stage`` message of round ``rnd``: 0 for its setup,
    ``rnd`` for a round and its evaluation, ``rounds + 1`` for its finalize exchange (so the
    rounds a receiver accepts never go back within one method's scope)."""
    if stage == "setup":
        return 0
    if stage == "finalize":
        return rounds + 1
    if stage in ("round", "evaluate"):
        return rnd
    raise ValueError(f"unknown exchange {stage!r}")

#: Keys of ``[tool.flwr.app.config]`` (defaults live in ``flwr_app/pyproject.toml``).
RUN_CONFIG_KEYS = (
    "experiment",
    "result-dir",
    "connect-timeout",
    "round-timeout",
    "poll-interval",
    "num-threads",
    "reproducible-dp-noise",
    "compare-methods",
    "identity-dir",
    "server-state-dir",
    "key-holder",
    "max-in-flight",
    "resume",
    "amendments",
)


class DeployError(ToolkitError, RuntimeError):
    """A deployment-level failure: bad node or run config, missing nodes, failed run."""


#: What a client's error text sent to the server says in place of the error's message under
#: ``[security] client_errors = "withheld"``: fixed, whatever the error and the data.
WITHHELD_DETAILS = "details withheld; see the client's own log"

#: The resume a Flower node's error for a diverged FEDORA pull names in place of the in-process
#: :data:`~secure_fedora.learning.client.PULL_RESUME_COMMAND` (the node knows neither the
#: config's path nor the workdir; the server's stop message says from which round it applies).
PULL_RESUME_COMMAND = "secure-fedora deploy local --config CONFIG --workdir WORKDIR --resume"


#: The values of ``[security] client_errors`` and of a SuperNode's node-config key
#: ``client-errors`` (see :func:`effective_client_errors`).
CLIENT_ERRORS_MODES = ("withheld", "full")


def effective_client_errors(run_mode: str, node_mode: str) -> str:
    """What a client's error texts tell the server: ``"full"`` only when the run config asks
    for it (``[security] client_errors = "full"``) and the client's own node agrees (its
    node-config ``client-errors="full"``); ``"withheld"`` otherwise. A node's choice can only
    make the run's stricter: by default (no ``client-errors`` key) it withholds."""
    return "full" if run_mode == "full" and node_mode == "full" else "withheld"


def client_error_text(err: BaseException, mode: str) -> str:
    """The text of ``err`` that a client sends the server (a refusal's reason, an error
    reply's): with ``mode`` ``"full"`` its class name and message (``"DataError: ..."``);
    otherwise (``"withheld"``, the default) only its class name, that of its direct cause
    when it wraps one (a ClientHalfError around the plug-in's own error) and
    :data:`WITHHELD_DETAILS`, nothing that depends on the client's data beyond, for a
    non-finite training result of FEDORA's unstable pull (:func:`pull_diverged`),
    :data:`~secure_fedora.learning.client.PULL_DIVERGED`: that ``lr * lambda`` reached the
    stability limit, a fact of the lambda the client's reply carries (under private
    validation the noised, accounted one), which the server needs to stop the run; and, as the
    training error names the pull only then, that the loss and its gradient at the start of
    that training were finite on the client's first training examples (else it names their
    scale, and the text is the plain withheld one). In either mode the class names are
    followed by a fixed verdict tag where the error's own class name alone would misstate
    whether asking again can pass (:func:`deterministic_class`): ``[refuses again: <class>]``
    (one of :data:`DETERMINISTIC_CLIENT_ERRORS`) for an error of a subclass of one of them or
    wrapping one (a plug-in's), ``[may pass if asked again]`` for one of them that wraps a
    transient error (:data:`TRANSIENT_CLIENT_ERRORS`). The text is valid UTF-8 in either mode
    (a surrogate-escaped byte, e.g. of a file name, is written ``\\udcff``): Flower cannot
    send a reason or record that is not, and the reply would never leave. Raises nothing for
    an error whose own ``__str__`` raises: in full mode its text is then the withheld one (else
    Flower would send the text of the error ``__str__`` raised in its place)."""
    from secure_fedora.learning.client import PULL_DIVERGED

    name = type(err).__name__
    tag = _verdict_tag(err)
    if mode == "full":
        text = _own_text(err)
        if text is not None:
            return _sendable(f"{name}{tag}: {text}")
    cause = err.__cause__
    if cause is not None:
        name += f" (from {type(cause).__name__})"
    name += tag
    if pull_diverged(err):
        return _sendable(f"{name} ({PULL_DIVERGED}; {WITHHELD_DETAILS})")
    return _sendable(f"{name} ({WITHHELD_DETAILS})")


def _own_text(err: BaseException) -> str | None:
    """``str(err)``, or ``None`` where the error's own ``__str__`` raises."""
    try:
        return str(err)
    except Exception:  # a plug-in error's __str__: its failure must not replace the reply
        return None


def _sendable(text: str) -> str:
    """``text`` with every character UTF-8 cannot encode (a lone surrogate) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def pull_diverged(err: BaseException) -> bool:
    """Whether ``err`` (or its direct cause) is training's non-finite result of FEDORA's
    unstable pull: a :class:`~secure_fedora.learning.client.ClientUpdateError` whose cause the
    client's :func:`~secure_fedora.learning.client.diverged_hint` named as the pull."""
    from secure_fedora.learning.client import PULL_DIVERGED, ClientUpdateError

    return any(isinstance(e, ClientUpdateError) and f"({PULL_DIVERGED}: " in (_own_text(e) or "")
               for e in (err, err.__cause__))


def reports_pull_divergence(text: str) -> bool:
    """Whether a client's error text, as :func:`client_error_text` makes it in either mode,
    says FEDORA's pull diverged: the withheld form's fixed tag, or in full the parenthesised
    cause that :func:`~secure_fedora.learning.client.diverged_hint` begins with. A text that
    only mentions the phrase elsewhere (a plug-in's own message) does not."""
    from secure_fedora.learning.client import PULL_DIVERGED

    return f"({PULL_DIVERGED}; {WITHHELD_DETAILS})" in text or f"({PULL_DIVERGED}: " in text


#: The class names of the client errors that the same message raises again on every try:
#: its data (DataError), its relatedness summary (RelatednessError, e.g. training rows of rank
#: below ``fedora.q``), its config or its model fail a check. An exchange that gets one of them
#: as an error reply stops the run at once instead of asking that client again.
DETERMINISTIC_CLIENT_ERRORS = frozenset({"DataError", "RelatednessError", "ConfigError",
                                         "ModelError"})

#: What makes a client error one that asking again may pass, wherever it is in the error's
#: cause chain: the node's files or network (OSError: a timeout, a lost connection, a failed
#: read) or its memory; except an OSError of :data:`DETERMINISTIC_OS_ERRNOS` or
#: :data:`DETERMINISTIC_OS_ERRORS`.
TRANSIENT_CLIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, MemoryError)

#: The errnos of an OSError that the same path raises again on every try: nothing there
#: (the data sources' own check of a missing file is a plain DataError, so the same file
#: missing at the read is not "may pass" either), no permission, or a path of the wrong kind.
#: Another errno (EIO, EAGAIN, a timeout, a lost connection), or none, may pass.
DETERMINISTIC_OS_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.ENAMETOOLONG,
    }
)

#: OSError subclasses without such an errno that mean the file's content or kind, which a
#: second read finds alike: a corrupt gzip stream, a FIFO or device where a file is read.
DETERMINISTIC_OS_ERRORS: tuple[type[OSError], ...] = (gzip.BadGzipFile, NotRegularFileError)

#: The verdict tags :func:`client_error_text` adds after the class names.
_REFUSES_AGAIN = "refuses again: "
_MAY_PASS = "may pass if asked again"

_ERROR_TEXT = re.compile(
    r"(?:-?\d+: )?(([A-Za-z_]\w*)(?: \(from [A-Za-z_]\w*\))?"
    rf"(?: \[(?:{_REFUSES_AGAIN}([A-Za-z_]\w*)|({_MAY_PASS}))\])?(?:: | \(|$).*)", re.DOTALL)


def _deterministic_classes() -> dict[str, type[BaseException]]:
    from secure_fedora.algorithms.fedora import RelatednessError
    from secure_fedora.core.config import ConfigError
    from secure_fedora.data.sources import DataError
    from secure_fedora.learning.models import ModelError

    classes = {"DataError": DataError, "RelatednessError": RelatednessError,
               "ConfigError": ConfigError, "ModelError": ModelError}
    assert set(classes) == DETERMINISTIC_CLIENT_ERRORS
    return classes


def _transient(err: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(err, OSError) and (
        err.errno in DETERMINISTIC_OS_ERRNOS or isinstance(err, DETERMINISTIC_OS_ERRORS)
    ):
        return False
    return isinstance(err, TRANSIENT_CLIENT_ERRORS) or (oom is not None and isinstance(err, oom))


def deterministic_class(err: BaseException) -> str | None:
    """Which of :data:`DETERMINISTIC_CLIENT_ERRORS` makes ``err`` an error the same message
    raises again on every try, following its cause chain (``raise ... from``): the first
    error in it that is an instance of one of those classes (a subclass, e.g. a plug-in's own
    ``DataError``, or one a wrapper such as ``ClientHalfError`` or ``PluginError`` carries as
    its cause) names it. ``None`` when none is, or when any error in the chain is transient
    (:data:`TRANSIENT_CLIENT_ERRORS`, or torch's out-of-memory error): a ``ConfigError`` that
    reports a plug-in's timeout may pass if asked again, a ``DataError`` from an EIO read
    too; a ``DataError`` from a missing or unreadable file (:data:`DETERMINISTIC_OS_ERRNOS`)
    refuses again."""
    classes = _deterministic_classes()
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not e for e in chain) and len(chain) < 64:
        chain.append(current)
        current = current.__cause__
    if any(_transient(e) for e in chain):
        return None
    for e in chain:
        for name, cls in classes.items():
            if isinstance(e, cls):
                return name
    return None


def _verdict_tag(err: BaseException) -> str:
    """The verdict tag of ``err``'s text: empty where its own class name tells it."""
    verdict = deterministic_class(err)
    own = type(err).__name__ in DETERMINISTIC_CLIENT_ERRORS
    if verdict is not None and not own:
        return f" [{_REFUSES_AGAIN}{verdict}]"
    if verdict is None and own:
        return f" [{_MAY_PASS}]"
    return ""


def deterministic_client_error(reason: str) -> str | None:
    """The client's error text (:func:`client_error_text`, in either mode) of an error reply's
    ``reason`` as the server's exchange records it (``"<code>: <text>"``, or the text alone),
    when the client's verdict (:func:`deterministic_class`) is that the same message raises it
    again: its verdict tag ``[refuses again: <class>]`` names one of
    :data:`DETERMINISTIC_CLIENT_ERRORS`, or, without a tag, its leading class name (the
    error's own) is one of them. ``None`` otherwise (asking again may succeed), also for the
    tag ``[may pass if asked again]``."""
    found = _ERROR_TEXT.fullmatch(reason.strip())
    if found is None or found.group(4) is not None:
        return None
    named = found.group(3) if found.group(3) is not None else found.group(2)
    return found.group(1) if named in DETERMINISTIC_CLIENT_ERRORS else None


def check_supported(cfg: ExperimentConfig, reproducible_dp_noise: bool = False,
                    compare_methods: bool = False) -> None:
    """Refuse, before anything starts, a config the Flower runtime cannot run as written.

    The Flower runtime runs every registered method that implements the method contract
    (:class:`~secure_fedora.algorithms.contract.FederatedAlgorithm`), with or without
    differential privacy (DP-SGD, budgets, signed ledgers, private validation); FEDORA with
    every relatedness mode (plain, noised, encrypted, noised+encrypted) and every propagation
    operator but the encrypted one (auto, dense, factored, sparse, power). It does not implement encrypted propagation (``fedora.propagation =
    "encrypted"``), nor user data, models or losses (the SuperNodes build the built-in ones);
    running such a config any other way would silently weaken or change what it asks for, so
    it is an error naming the setting.

    Reproducible DP noise (``privacy.noise = "reproducible"``, seeded from the experiment
    seed) is refused unless ``reproducible_dp_noise``: the server distributes the config, seed
    included, so it could regenerate every client's noise; the DP guarantee would not hold
    against the very party it is meant for. With the flag (test deployments, runtime
    comparisons; :func:`with_reproducible_noise` sets the mode from it) the results record
    that assumption.

    A DP config of several methods is refused unless ``compare_methods``: one deployment
    sends the server every method's releases of the same clients' data, so a client's privacy
    loss is the composition of all of them, which no single method's epsilon bounds. With the
    flag (a comparison of methods, not a deployment to keep) the results record that.
    """
    problems = []
    if cfg.privacy.enabled and len(cfg.methods) > 1 and not compare_methods:
        problems.append(
            f"privacy.enabled with {len(cfg.methods)} methods ({', '.join(cfg.methods)}): the "
            "server would receive every method's releases of the same clients' data, and each "
            "client's epsilon covers one method's; deploy one method per run, or, for a "
            "comparison deployment whose results record it, pass --compare-methods to "
            "`deploy local` (run config compare-methods=true under `flwr run`)"
        )
    if cfg.privacy.enabled and cfg.privacy.noise == "reproducible" and not reproducible_dp_noise:
        problems.append(
            "privacy.noise = 'reproducible' (the server knows the seed it distributes and "
            "could reproduce the DP noise; use 'csprng', or, for a test deployment without a "
            "DP guarantee against the server, pass --reproducible-dp-noise to `deploy local` "
            "(run config reproducible-dp-noise=true under `flwr run`))"
        )
    from secure_fedora.algorithms.contract import method_class, method_hook

    for name in cfg.methods:
        cls = method_class(name)
        if cls is None or not _implements_halves(cls):
            problems.append(
                f"method {name!r} does not implement the method contract "
                "(secure_fedora/algorithms/contract.py), which the Flower runtime drives")
            continue
        with method_hook(name, "distributed_unsupported(cfg)"):
            reason = cls.distributed_unsupported(cfg)
        if reason is not None:
            problems.append(reason)
    registered = ("the Flower apps build registered {} only: the built-in ones and those a "
                  "module in secure_fedora/contrib/ registers")
    for key, value, default, runs in (
            ("data.source", cfg.data.source, None, registered.format("datasets")),
            ("model.factory", cfg.model.factory, None, registered.format("models")),
            ("training.loss", cfg.training.loss, "cross_entropy",
             "the Flower apps train with cross_entropy only")):
        if value != default:
            problems.append(f"{key} = {value!r} (user data, models and losses run in process, "
                            f"`secure-fedora run` or the Python API; {runs})")
    if problems:
        raise DeployError("the Flower runtime cannot run this config: " + "; ".join(problems))


def _implements_halves(cls: type) -> bool:
    """Whether ``cls`` runs as separate server and client halves: it implements the
    contract's ``client_update`` (a method that still overrides only an in-process
    ``train_round``, with the in-process base's raising ``client_update``, cannot be split
    across processes)."""
    from secure_fedora.algorithms.methods import FederatedMethod

    owner = next((k for k in cls.__mro__ if "client_update" in vars(k)), None)
    return (owner is not None and owner is not FederatedMethod
            and not getattr(vars(owner)["client_update"], "__isabstractmethod__", False))


def check_apps_know_entries(cfg: ExperimentConfig) -> None:
    """Refuse a config naming a registry entry the Flower apps' own processes will not know.

    A ServerApp and each ClientApp parse the config in a process of their own, which
    registers the built-in datasets, partitioners, models, losses, methods and accountants and
    every module of ``secure_fedora/contrib/``, and nothing else. An entry this process registered from
    another module (a script's, a notebook's) would make every app fail on its first message,
    after the whole deployment started; :class:`DeployError` names each such setting first.
    """
    from privacy.accounting import ACCOUNTANT_REGISTRY
    from secure_fedora.core.registry import (
        DATASETS,
        LOSSES,
        METHODS,
        MODELS,
        PARTITIONERS,
        accountant_known_everywhere,
    )

    named = [("data.dataset", DATASETS, cfg.data.dataset),
             ("data.partition", PARTITIONERS, cfg.data.partition),
             ("model.name", MODELS, cfg.model.name)]
    if ":" not in cfg.training.loss:
        named.append(("training.loss", LOSSES, cfg.training.loss))
    named += [("methods", METHODS, name) for name in cfg.methods]
    problems = []
    for key, registry, name in named:
        if not registry.known_everywhere(name):
            problems.append(
                f"{key}: {registry.kind} {name!r} is registered by module "
                f"{registry.origin(name)!r} of this "
                "process only, and the Flower apps run in processes of their own that know the "
                "built-in entries and the modules of secure_fedora/contrib/ (add it there, or "
                "run it in process: `secure-fedora run` or the Python API)")
    accountant = cfg.privacy.accountant
    if cfg.privacy.enabled and accountant != "auto" and not accountant_known_everywhere(accountant):
        method = ACCOUNTANT_REGISTRY.get(accountant)
        where = (f"is registered by module {method.compute.__module__!r} of this process only"
                 if method is not None else "is not registered at all, in this process or another")
        problems.append(
            f"privacy.accountant: accountant {accountant!r} {where}, and the Flower apps run in"
            " processes of their own that know the built-in accountants and those the modules"
            " of secure_fedora/contrib/ register (add it there"
            + (", or run it in process: `secure-fedora run` or the Python API)"
               if method is not None else ")"))
    if problems:
        raise DeployError("the Flower runtime cannot run this config: " + "; ".join(problems))


def with_reproducible_noise(cfg: ExperimentConfig, reproducible_dp_noise: bool) -> ExperimentConfig:
    """``cfg`` with ``privacy.noise = "reproducible"`` when the reproducible-dp-noise flag is
    set and DP is on (the flag selects that mode); otherwise ``cfg`` unchanged."""
    if not (reproducible_dp_noise and cfg.privacy.enabled) or cfg.privacy.noise == "reproducible":
        return cfg
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"noise": "reproducible"})})


def experiment_to_run_config(cfg: ExperimentConfig) -> str:
    """The run-config value that carries ``cfg`` (canonical JSON of the validated model).

    ``security.keystore`` is left out when unset: the in-process key store is a local
    setting that the Flower parties (each with its own identity directory) never use, and an
    unset value does not enter the config hash either."""
    doc = cfg.model_dump(mode="json")
    if doc.get("security", {}).get("keystore") is None:
        doc.get("security", {}).pop("keystore", None)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def make_run_config(
    cfg: ExperimentConfig,
    result_dir: Path | None,
    *,
    identity_dir: Path,
    server_state_dir: Path,
    key_holder: int = 0,
    connect_timeout: float = 300.0,
    round_timeout: float = 600.0,
    poll_interval: float = 0.2,
    num_threads: int = 1,
    reproducible_dp_noise: bool = False,
    max_in_flight: int = 0,
    compare_methods: bool = False,
    resume: int = 0,
    amendments: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The run-config overrides for one FEDORA run (the keys of ``RUN_CONFIG_KEYS``).

    ``identity_dir`` is the server's identity directory on the SuperLink host (its ``server``
    keys and the federation's ``allowlist.json``), ``server_state_dir`` where the ServerApp
    keeps its envelope nonce memory, ``key_holder`` the client index that runs the CKKS key
    ceremony in the encrypted relatedness modes, ``max_in_flight`` how many messages of one
    exchange the ServerApp keeps outstanding at once (0: all). ``reproducible_dp_noise``
    runs a DP config with ``privacy.noise = "reproducible"`` (:func:`with_reproducible_noise`);
    ``compare_methods`` lets a DP config of several methods run (:func:`check_supported`).
    ``resume`` (0: a new run) is the id of the run this one continues from the ServerApp's
    checkpoint in ``result_dir``: every app then works under that run id
    (:meth:`RunSettings.run_id`), so the nodes answer from that run's saved state.
    ``amendments`` are the config amendments of a resumed run (:func:`parse_amendments`);
    ``cfg`` is then the run's original configuration.
    """
    return {
        "experiment": experiment_to_run_config(with_reproducible_noise(cfg, reproducible_dp_noise)),
        "result-dir": str(result_dir.resolve()) if result_dir is not None else "",
        "connect-timeout": float(connect_timeout),
        "round-timeout": float(round_timeout),
        "poll-interval": float(poll_interval),
        "num-threads": int(num_threads),
        "reproducible-dp-noise": bool(reproducible_dp_noise),
        "compare-methods": bool(compare_methods),
        "identity-dir": str(Path(identity_dir).resolve()),
        "server-state-dir": str(Path(server_state_dir).resolve()),
        "key-holder": int(key_holder),
        "max-in-flight": int(max_in_flight),
        # a string: Flower's run ids use all 64 bits, a run-config integer only 63
        "resume": str(int(resume)),
        "amendments": json.dumps([dict(a) for a in amendments], sort_keys=True),
    }


_AMENDMENT_FIELDS = {"key", "from", "to", "method", "resumed_at_round", "effective_from_round",
                     "applies_to"}


def parse_amendments(cfg: ExperimentConfig, raw: object) -> tuple[dict[str, Any], ...]:
    """The run config's ``amendments`` (JSON: a list of ``{"key", "from", "to", "method",
    "resumed_at_round", "effective_from_round", "applies_to"}`` of ``rundir.AMENDABLE_KEYS``;
    ``applies_to``: each method reading the key -> its first round under the new value, as
    in process) for the run's
    original configuration ``cfg``: each ``from`` the value before it, the amended
    configuration valid as a config file would be. DeployError naming the key otherwise."""
    from secure_fedora.runtimes.rundir import AMENDABLE_KEYS, amended_config, config_value

    bad = ("run config key 'amendments' must be a JSON list of amendments of "
           f"{list(AMENDABLE_KEYS)} ({sorted(_AMENDMENT_FIELDS)})")
    try:
        doc = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, list) or not all(
            isinstance(a, dict) and set(a) == _AMENDMENT_FIELDS and a["key"] in AMENDABLE_KEYS
            and a["method"] in cfg.methods
            and all(type(a[k]) is int and a[k] >= 1
                    for k in ("resumed_at_round", "effective_from_round"))
            and isinstance(a["applies_to"], dict) and a["applies_to"]
            and all(m in cfg.methods and type(r) is int and r >= 1
                    for m, r in a["applies_to"].items()) for a in doc):
        raise DeployError(f"{bad}; got {raw!r}")
    current = cfg
    for a in doc:
        if config_value(current, a["key"]) != a["from"]:
            raise DeployError(f"{bad}: {a['key']} was {config_value(current, a['key'])!r} "
                              f"before this amendment, not {a['from']!r}")
        try:  # validated as the amended config file would be
            current = parse_config(amended_config(current, [a]).model_dump(mode="json"),
                                   "(run config 'amendments')")
        except ConfigError as err:
            raise DeployError(f"run config key 'amendments': {err}") from None
    return tuple(doc)


def apply_amendments(settings: RunSettings, method: str, algorithm: Any, rnd: int) -> None:
    """Set ``algorithm``'s attributes of amended keys (the in-process runtime's
    ``AMENDED_ATTRIBUTES``) to their value for round ``rnd`` of ``method``
    (:meth:`RunSettings.amended_value`); nothing without amendments."""
    from secure_fedora.runtimes.inprocess import AMENDED_ATTRIBUTES

    for key in {a["key"] for a in settings.amendments}:
        attribute = AMENDED_ATTRIBUTES.get(key)
        if attribute is not None and hasattr(algorithm, attribute):
            setattr(algorithm, attribute, settings.amended_value(key, method, rnd))


def resume_run_id(value: object) -> int | None:
    """The run config's ``resume`` as a run id (0: a new run), or None when it is not one: a
    decimal string (Flower's run ids use all 64 bits, a run-config integer only 63) or an int,
    in [0, 2^64)."""
    if isinstance(value, str) and value.isascii() and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        return None
    return value


@dataclass(frozen=True)
class RunSettings:
    """The run config as the apps use it (validated)."""

    experiment: ExperimentConfig
    config_hash: str
    result_dir: Path | None
    connect_timeout: float
    round_timeout: float
    poll_interval: float
    num_threads: int  # [training] threads when the experiment sets it, else run config 'num-threads'
    reproducible_dp_noise: bool
    compare_methods: bool
    identity_dir: Path
    server_state_dir: Path
    key_holder: int
    max_in_flight: int  # outstanding messages per exchange; 0: all at once
    # the run continued from the ServerApp's checkpoint (its run id), or 0 for a new run
    resume: int = 0
    # the config amendments resumes made (rundir.AMENDABLE_KEYS), oldest first; ``experiment``
    # and ``config_hash`` stay the run's original configuration, which binds its state
    amendments: tuple[dict[str, Any], ...] = ()

    def amended_value(self, key: str, method: str, rnd: int) -> Any:
        """The value of ``key`` under which ``method`` runs round ``rnd``: the experiment's,
        with each amendment applied from its ``effective_from_round`` (from round 1 in a
        method after the one it was made in), as in process (``rundir.amended_value``)."""
        from secure_fedora.runtimes.rundir import amended_value, config_value

        return amended_value(list(self.amendments), key, config_value(self.experiment, key),
                             method, list(self.experiment.methods), rnd)

    def amendments_digest(self) -> str:
        """SHA-256 of the amendments' canonical JSON ("" without any): what the server's
        signed messages carry, so that every client runs under the same amendments."""
        if not self.amendments:
            return ""
        return hashlib.sha256(json.dumps(list(self.amendments), sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()

    def run_id(self, flower_run_id: int) -> int:
        """The run id every app works under: the resumed run's (``resume``), else Flower's.
        Node state, envelopes and nonce memory are keyed by it, so a resumed run (a new
        Flower run) reaches the state its nodes saved for the run it continues."""
        return self.resume or int(flower_run_id)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Validate a Flower run config; :class:`DeployError` names the bad key."""
        # ``resume`` is optional: a run config written before it existed starts a new run
        missing = [k for k in RUN_CONFIG_KEYS if k not in run_config
                   and k not in ("resume", "amendments")]
        if missing:
            raise DeployError(f"run config is missing keys {missing}")
        raw = run_config["experiment"]
        if not isinstance(raw, str) or not raw.strip():
            raise DeployError("run config key 'experiment' must hold the experiment config as JSON")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DeployError(f"run config key 'experiment' is not JSON: {err}") from None
        try:
            cfg = parse_config(data, "(run config 'experiment')")
        except ConfigError as err:
            raise DeployError(str(err)) from None
        result_dir = str(run_config["result-dir"])
        if result_dir and not os.path.isabs(result_dir):
            raise DeployError(f"run config key 'result-dir' must be absolute; got {result_dir!r}")
        values: dict[str, float] = {}
        for key in ("connect-timeout", "round-timeout", "poll-interval"):
            value = run_config[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise DeployError(f"run config key {key!r} must be a positive number; got {value!r}")
            values[key] = float(value)
        threads = run_config["num-threads"]
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise DeployError(f"run config key 'num-threads' must be an integer from 1 to "
                              f"{MAX_THREADS} (as training.threads); got {threads!r:.40}")
        reproducible = run_config["reproducible-dp-noise"]
        if not isinstance(reproducible, bool):
            raise DeployError(
                f"run config key 'reproducible-dp-noise' must be true or false; got {reproducible!r}"
            )
        cfg = with_reproducible_noise(cfg, reproducible)  # the flag selects the mode
        compare = run_config["compare-methods"]
        if not isinstance(compare, bool):
            raise DeployError(
                f"run config key 'compare-methods' must be true or false; got {compare!r}")
        dirs: dict[str, Path] = {}
        for key in ("identity-dir", "server-state-dir"):
            value = run_config[key]
            if not isinstance(value, str) or not os.path.isabs(value):
                raise DeployError(
                    f"run config key {key!r} must be an absolute path on the SuperLink host "
                    f"(identity-dir: the server's keys and allowlist.json); got {value!r}"
                )
            dirs[key] = Path(value)
        holder = run_config["key-holder"]
        n = cfg.data.num_clients
        if isinstance(holder, bool) or not isinstance(holder, int) or not 0 <= holder < n:
            raise DeployError(
                f"run config key 'key-holder' must be a client index in [0, {n}); got {holder!r}"
            )
        window = run_config["max-in-flight"]
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise DeployError(
                "run config key 'max-in-flight' must be a non-negative integer (0: send every "
                f"message of an exchange at once); got {window!r}"
            )
        resume = resume_run_id(run_config.get("resume", "0"))
        if resume is None:
            raise DeployError(
                "run config key 'resume' must be 0 (a new run) or the id of the run to continue "
                f"from its checkpoint in result-dir; got {run_config.get('resume')!r}")
        if resume and not result_dir:
            raise DeployError("run config key 'resume' needs 'result-dir', where the ServerApp "
                              "keeps its checkpoint")
        amendments = parse_amendments(cfg, run_config.get("amendments", "[]"))
        return cls(
            experiment=cfg,
            config_hash=config_hash(cfg),
            result_dir=Path(result_dir) if result_dir else None,
            connect_timeout=values["connect-timeout"],
            round_timeout=values["round-timeout"],
            poll_interval=values["poll-interval"],
            # the experiment's [training] threads, when set, is every app's thread count, as
            # in process: a client's float results (its lambda gate included) depend on it
            num_threads=cfg.training.threads if cfg.training.threads is not None else threads,
            reproducible_dp_noise=reproducible,
            compare_methods=compare,
            identity_dir=dirs["identity-dir"],
            server_state_dir=dirs["server-state-dir"],
            key_holder=holder,
            max_in_flight=window,
            resume=resume,
            amendments=amendments,
        )


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's node config: which partition it holds, where its state and keys live."""

    partition_id: int
    state_dir: Path
    identity_dir: Path
    #: ``client-errors``: "full" lets this client's error texts reach the server whole when
    #: the run asks for it too; "withheld" (default) withholds them whatever the run says.
    client_errors: str = "withheld"

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], num_clients: int) -> NodeSettings:
        """Validate ``partition-id`` (0 <= id < num_clients), ``state-dir`` (absolute) and
        ``identity-dir`` (absolute: this client's identity keys and the federation's
        ``allowlist.json``; every message is signed and verified with them), and the optional
        ``client-errors`` ("withheld", the default, or "full": see
        :func:`effective_client_errors`)."""
        required = ("partition-id", "state-dir", "identity-dir")
        if any(key not in node_config for key in required):
            raise DeployError(
                "node config must set partition-id, state-dir and identity-dir "
                "(flower-supernode --node-config 'partition-id=0 state-dir=\"/abs/dir\" "
                f"identity-dir=\"/abs/keys\"'); got keys {sorted(node_config)}"
            )
        pid = node_config["partition-id"]
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < num_clients:
            raise DeployError(
                f"node config partition-id must be an integer in [0, {num_clients}); got {pid!r}"
            )
        state_dir = node_config["state-dir"]
        if not isinstance(state_dir, str) or not os.path.isabs(state_dir):
            raise DeployError(f"node config state-dir must be an absolute path; got {state_dir!r}")
        identity = node_config["identity-dir"]
        if not isinstance(identity, str) or not os.path.isabs(identity):
            raise DeployError(f"node config identity-dir must be an absolute path; got {identity!r}")
        errors = node_config.get("client-errors", "withheld")
        if errors not in CLIENT_ERRORS_MODES:
            raise DeployError(
                f"node config client-errors must be one of {list(CLIENT_ERRORS_MODES)}; "
                f"got {errors!r}")
        return cls(partition_id=pid, state_dir=Path(state_dir), identity_dir=Path(identity),
                   client_errors=errors)


def tensor_to_array_record(name: str, tensor: Tensor) -> ArrayRecord:
    """One tensor as an ArrayRecord (dtype and shape preserved, bytes copied)."""
    return ArrayRecord({name: Array(tensor.detach().cpu().contiguous().numpy())})


def array_record_to_tensor(
    record: ArrayRecord, name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> Tensor:
    """The tensor ``name`` of ``record``; :class:`DeployError` on a wrong key, dtype or shape."""
    if name not in record:
        raise DeployError(f"array record lacks {name!r}; has {sorted(record.keys())}")
    array = record[name].numpy()
    expected = np.dtype(str(dtype).removeprefix("torch."))
    if array.dtype != expected or tuple(array.shape) != tuple(shape):
        raise DeployError(
            f"array {name!r} is {array.dtype} {tuple(array.shape)}, expected {expected} {tuple(shape)}"
        )
    tensor = torch.from_numpy(np.array(array, copy=True))
    if not torch.isfinite(tensor).all():
        raise DeployError(f"array {name!r} contains non-finite values")
    return tensor


def process_start_time() -> float:
    """Wall-clock time at which the current process started (Linux /proc; else now)."""
    try:
        with open("/proc/self/stat", encoding="utf-8") as handle:
            stat = handle.read()
        ticks = int(stat[stat.rfind(")") + 2 :].split()[19])
        with open("/proc/uptime", encoding="utf-8") as handle:
            uptime = float(handle.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
