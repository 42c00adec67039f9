"""The contract a federated method implements once, and both runtimes run unchanged.

A method is split at the message boundary into a *server half* and a *client half*. A
runtime (in-process simulation or Flower) only moves :data:`Payload` s between them and
persists their state; it never branches on the method. One round is three calls::

    messages = algorithm.configure(rnd, participants)             # server
    replies  = algorithm.client_update_many(rnd, messages)        # each client i, alone
    stats    = algorithm.aggregate(rnd, replies)                  # server
                                   # (or round_discarded(rnd), no reply accepted)

with two optional exchanges around the rounds (``setup`` before round 1, e.g. FEDORA's
relatedness summaries; ``finalize`` after the last round, e.g. FedAvg's fine-tuning) and an
evaluation exchange whenever the runtime evaluates.

Rules every implementation keeps (the Flower runtime depends on them, and the in-memory
Flower tests check them by running each client half in a process that holds only that
client's data):

* The server half never reads client data (``ctx.clients``); it learns only what replies
  carry (e.g. a client's number of training examples).
* The client half of client ``i`` reads only ``ctx.clients[i]``, its own generator and noise
  source, the message it was sent and its own state (:meth:`client_state_dict`).
* Replies the server did not accept (rejected envelope, refused release, no reply) are
  simply absent from ``replies``; ``aggregate`` must treat absence as "did not take part".
* Every data-dependent value a client sends is covered by a :class:`ReleaseSpec` from
  :meth:`FederatedAlgorithm.releases`; the runtime accounts and records it (gate + ledger)
  before the client half runs, and checks the executed DP-SGD steps before the reply leaves.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from privacy.errors import ToolkitError
from secure_fedora.algorithms.messages import KIND_THETA
from secure_fedora.core.errors import TOOLKIT_PACKAGES, is_user_error
from secure_fedora.core.plugins import PluginError, method_hook, raised_at
from secure_fedora.core.tensors import all_finite

Payload = dict[str, Tensor]
"""A message: named tensors (scalars are 0-d tensors). The only thing runtimes move."""

__all__ = ["ALLOWED_DTYPES", "ClientHalfError", "ContractError", "FederatedAlgorithm", "MAX_DIMS", "MAX_ENTRIES", "Payload",
           "ENTRY_NAME", "ReleaseSpec", "ReplyRules", "plug_in_reply_entries", "plug_in_round_mechanisms", "plug_in_setup_mechanism", "BUILT_IN_GAUSSIAN_MECHANISMS", "ReplySchema", "entry_problem",
           "expected_round_reply", "max_payload_bytes", "payload_size_problem", "tensor_problem",
           "RUNTIME_ROUND_COLUMNS", "SETUP", "ROUND", "EVALUATE", "FINALIZE", "build_method",
           "check_messages", "check_message_entries", "check_model_sizes", "model_size_checked", "DataFacts",
           "check_data_facts", "data_checked", "method_hook", "server_half", "is_builtin_method", "named_class_declarations",
           "check_eval_row", "check_round_statistics", "check_finalize_results", "check_client_state", "RUNTIME_EXTRA_KEYS", "check_setup_steps", "client_half", "no_reply_statistics", "round_statistics_of", "method_class", "SAT_OUT_PULL_DIVERGED", "with_sat_out_statistics",
           "method_releases", "round_mechanisms", "REPLY_STAGES", "declared_reply_entries",
           "ReplyDeclarations", "reply_declarations"]

SETUP = "setup"
ROUND = "round"
#: The evaluation exchange (``evaluation_messages``; its reply is the client's metrics).
EVALUATE = "evaluate"
FINALIZE = "finalize"

#: Reply entry: the local steps a client ran in the round (one whole number).
REPLY_STEPS = "steps"
#: Reply entry: the client's number of training examples (an aggregation weight).
REPLY_NUM_EXAMPLES = "num_examples"
#: Reply entries that are counts, with their smallest valid value.
COUNT_ENTRIES = {REPLY_STEPS: 0, REPLY_NUM_EXAMPLES: 1}
#: Reply entry: FEDORA's regularization weight ``lambda_i`` of the round (0-d float64).
REPLY_LAMBDA = "lambda"
#: Why a reply may carry ``num_examples`` under DP (the methods that send it say so).
NUM_EXAMPLES_REASON = "the training-set size (dataset sizes are public by the run's assumptions)"

#: Columns of a round's history row (rounds.csv, results.json) that the runtimes write
#: themselves; a method's round statistics may not use these names.
RUNTIME_ROUND_COLUMNS = frozenset({
    "method", "round", "participants", "replied", "seconds", "timing", "test_mean", "test_min",
    "test_max", "test_std", "val_mean", "selected_mean", "selected_round", "evaluated",
    "evaluation_timing"})

#: Why a client sat a round out, as a runtime reports it to a method's
#: ``sat_out_statistics``: its training's non-finite result of FEDORA's unstable pull, which
#: its error reply names (on Flower, in a round a resume's ``fedora.max_pull`` amendment
#: re-makes as it was; in process such a pull stops the run instead).
SAT_OUT_PULL_DIVERGED = "pull_diverged"

#: Entries of a method's results.json ``extra`` that the in-process runtime writes itself
#: (the signed messages' record, the training engine's counts); ``server_finalize`` may not
#: return these names, in either runtime.
RUNTIME_EXTRA_KEYS = frozenset({"security", "training_engine"})

#: Tensor dtypes a payload may carry (what the methods send: parameter rows and matrices,
#: counts, flags, serialized ciphertext bytes). Not bfloat16: the Flower runtime moves
#: tensors as numpy arrays, which have no bfloat16.
ALLOWED_DTYPES = frozenset({
    torch.float16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
})
#: What a payload entry's name may be: a plain identifier of at most 64 characters.
ENTRY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
#: Most dimensions a payload tensor may have.
MAX_DIMS = 4
#: Most entries one payload may carry.
MAX_ENTRIES = 64

TensorSignature = tuple[torch.dtype, tuple[int, ...]]
"""A payload tensor's dtype and shape."""


class ContractError(ToolkitError, ValueError):
    """A method broke the contract (a message, reply or statistic it must not produce); the
    message names the method, the exchange and what is wrong. Raised before the offending
    value is used: nothing of it reaches the server, a file or another client."""


class ClientHalfError(ToolkitError, RuntimeError):
    """A method's client half raised an exception that is not a toolkit error (a bug in the
    method, or in what it calls): the message names the method, the client and the exception,
    which is kept as the cause (its traceback shown with ``--debug``)."""


@contextmanager
def client_half(method: str, what: str) -> Iterator[None]:
    """Run a method's client half (``what``: e.g. ``"client 2's client_update"``): an exception
    that is not a toolkit error (:func:`~secure_fedora.core.errors.is_user_error`) becomes a
    :class:`ClientHalfError` naming ``method`` and ``what``, with the original as its cause;
    toolkit errors (a refused release, a diverged client) pass unchanged."""
    try:
        yield
    except Exception as err:
        if is_user_error(err):
            raise
        raise ClientHalfError(f"method {method!r}: {what} failed: "
                              f"{type(err).__name__}: {err}{raised_at(err)}") from err


def is_builtin_method(algorithm: Any) -> bool:
    """Whether ``algorithm`` (a method instance or class) is one of the toolkit's own: its
    class is defined in the toolkit's packages, outside ``secure_fedora.contrib`` (where a
    user's methods go). A user's subclass of a built-in method is not built in."""
    cls = algorithm if isinstance(algorithm, type) else type(algorithm)
    module = cls.__module__ or ""
    if module == "secure_fedora.contrib" or module.startswith("secure_fedora.contrib."):
        return False
    return module.split(".")[0] in TOOLKIT_PACKAGES


@contextmanager
def server_half(algorithm: Any, method: str, hook: str) -> Iterator[None]:
    """Run a hook of a method's server half (``hook``: e.g. ``"aggregate(rnd, replies) of
    round 2"``): for a plug-in method (not :func:`is_builtin_method`) an exception that is not
    a toolkit error (:func:`~secure_fedora.core.errors.is_user_error`) becomes a one-line
    :class:`~secure_fedora.core.plugins.PluginError` naming ``method``, ``hook`` and where it
    raised, with the original as its cause (its traceback shown with ``--debug``). A built-in
    method's exception passes unchanged: it is a bug of the toolkit, shown with its
    traceback. Toolkit errors pass unchanged either way."""
    try:
        yield
    except Exception as err:
        if is_user_error(err) or is_builtin_method(algorithm):
            raise
        raise PluginError(f"method {method!r}: its server half's {hook} raised "
                          f"{type(err).__name__}: {err}{raised_at(err)}") from err


@dataclass(frozen=True)
class ReleaseSpec:
    """One kind of data-dependent release a client makes, and how it is accounted.

    ``kind`` is the ledger's release kind (``"model"``, ``"summary"``, ...); ``mechanisms``
    names the accounted mechanisms of one such release, in ledger order (registry names in
    :mod:`privacy.mechanisms`, e.g. ``("dpsgd",)`` or ``("dpsgd", "gaussian_lambda")``);
    ``when`` is :data:`SETUP` (once, before round 1) or :data:`ROUND` (each round a client
    takes part in); ``encrypted``: the upload leaves encrypted (an ``EncryptPayload`` stage
    after the gate in the client's release pipeline; the ledger accounts the plaintext).
    """

    kind: str
    mechanisms: tuple[str, ...]
    when: str = ROUND
    encrypted: bool = False

    def __post_init__(self) -> None:
        if self.when not in (SETUP, ROUND):
            raise ValueError(f"release 'when' must be {SETUP!r} or {ROUND!r}, got {self.when!r}")
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"a release spec needs a kind (a non-empty string), got {self.kind!r}")
        if not isinstance(self.mechanisms, tuple | list) or not self.mechanisms or not all(
                isinstance(m, str) and m for m in self.mechanisms):
            raise ValueError("a release spec's mechanisms must be a tuple of mechanism names "
                             f"(e.g. ('dpsgd',)), got {self.mechanisms!r}")
        object.__setattr__(self, "mechanisms", tuple(self.mechanisms))
        if not isinstance(self.encrypted, bool):
            raise ValueError(f"a release spec's 'encrypted' must be a bool, got {self.encrypted!r}")


class FederatedAlgorithm(ABC):
    """Base class of every federated method (see the module docstring for the contract)."""

    name: ClassVar[str] = "algorithm"
    #: What this method's client replies may carry (set by :func:`build_method`; None for
    #: an instance built some other way, whose exchanges are then not checked).
    reply_rules: ReplyRules | None = None
    #: The dtype and shape of its replies' entries (set by :func:`build_method`; None for an
    #: instance built some other way).
    reply_schema: ReplySchema | None = None
    #: The proximal weights this method's local objective adds (``w/2 ||theta - anchor||^2``
    #: on the gradient after clipping, through momentum, as weight decay): keys of its
    #: ``[baselines.<name>]`` section (read with its ``params`` model) or a function
    #: ``(cfg) -> {config key: w}``. The config refuses ``training.lr *
    #: (training.weight_decay + sum of w) >= 2 (1 + training.momentum)``, naming the keys
    #: (every local run diverges there). Default: none, nothing checked.
    proximal_weights: ClassVar[Any] = ()

    # ------------------------------------------------------------------ declarations
    @classmethod
    def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
        """The releases a client of this method makes under ``cfg`` (what the privacy plan
        accounts). Default: one DP-SGD model release per round taken part in."""
        return (ReleaseSpec("model", ("dpsgd",), ROUND),)

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        """The entries a client's reply may carry in exchange ``stage`` (``"setup"``,
        ``"round"`` or ``"finalize"``) under ``cfg``, each with why it may leave the client
        of a differentially private run: covered by a declared release (:meth:`releases`), or
        data-independent, or public under an assumption the method states. Both runtimes
        refuse, in a DP run, a reply carrying any other entry (:class:`ReplyRules`), before it
        leaves. Default: a round reply carries the DP-SGD model and the step count."""
        if stage == ROUND:
            return {KIND_THETA: "the round's model, trained with DP-SGD (the 'model' release)",
                    REPLY_STEPS: "the number of local steps (fixed by the plan, "
                                 "data-independent)"}
        return {}

    @classmethod
    def assumptions(cls, cfg: Any) -> dict[str, Any]:
        """Entries this method adds to results.json's ``assumptions`` under ``cfg`` (what a
        reader must know to interpret its results, e.g. what DP does not cover). Default:
        none. Two methods may state the same key only with the same value."""
        return {}

    @classmethod
    def derived_rows(cls, name: str, outcome: Mapping[str, Any]
                     ) -> dict[str, list[float | None]]:
        """Extra ``methods.<row>`` entries derived from this method's own outcome (its
        ``methods.<name>`` entry, registered as ``name``): row name -> every client's metric
        (``None``: that client has none), which the runtime summarizes into
        ``methods.<row>.selected`` (``missing_clients`` lists the ``None`` ones). Default: none."""
        return {}

    @classmethod
    def derived_assumptions(cls, name: str, outcome: Mapping[str, Any],
                            cfg: Any) -> dict[str, Any]:
        """Entries of results.json's ``assumptions`` that this method's :meth:`derived_rows`
        of ``outcome`` (registered as ``name``) need under ``cfg``: stated from what the run
        produced, so a method built on this class (its own name, its own settings) states
        them too. Default: none."""
        return {}

    @classmethod
    def comparisons(cls, name: str, outcomes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Entries of results.json's ``comparison`` this method (registered as ``name``)
        derives from all methods' outcomes of the run (keyed by method name). Default: none."""
        return {}

    @classmethod
    def check_model_size(cls, cfg: Any, num_params: int, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` naming the config key when this method cannot run under
        ``cfg`` on a model of ``num_params`` parameters of ``dtype`` (e.g. a message it would
        send is over :func:`payload_size_problem`'s caps). Both runtimes call it
        (:func:`check_model_sizes`) once the model is built, before any method runs or
        anything is released. Default: every model is fine."""
        return None

    @classmethod
    def check_data(cls, cfg: Any, facts: DataFacts) -> None:
        """Raise ``ValueError`` naming the config key when this method cannot run under
        ``cfg`` on data of these shapes and split sizes (e.g. a summary rank above the data's
        width). Both runtimes call it (:func:`check_data_facts`) once the data's facts are
        known (in process: the partitioned clients; Flower: the first contact), before any
        method runs, ledger is opened or anything is released. Default: all data is fine."""
        return None

    @classmethod
    def distributed_unsupported(cls, cfg: Any) -> str | None:
        """Why this method cannot run under ``cfg`` as separate processes (a runtime that
        moves only messages, e.g. Flower), naming the config key; ``None``: it can."""
        return None

    def message_entries(self, stage: str) -> Mapping[str, TensorSignature] | None:
        """The entries (name -> dtype and shape) that every message of exchange ``stage``
        (setup, round, evaluate or finalize) from this method's server half to a client
        carries, exactly (``{}``: an empty message, or none). A Flower client checks a
        received message against it (:func:`check_message_entries`) before any budget is
        admitted or its client half runs. ``None`` (default): not declared, nothing checked
        (the client half receives whatever the signed message carries)."""
        return None

    # ------------------------------------------------------------------ setup exchange
    def setup_messages(self) -> dict[int, Payload]:
        """Server: what each client receives before round 1 (``{}``: no setup exchange)."""
        return {}

    def client_setup(self, i: int, message: Payload) -> Payload:
        """Client ``i``: its setup reply (called only for clients in ``setup_messages``)."""
        raise NotImplementedError(f"{type(self).__name__} has no setup exchange")

    def server_setup(self, replies: Mapping[int, Payload]) -> None:  # noqa: B027 (optional hook)
        """Server: build what the rounds need from the accepted setup replies."""
        return None

    # ------------------------------------------------------------------ setup ceremony
    def setup_ceremony(self) -> str | None:
        """The name of a multi-step protocol a *deployment* runs instead of the setup exchange
        when one request and one reply per client cannot keep what the method promises (e.g.
        FEDORA's encrypted relatedness: a CKKS key ceremony, encrypted uploads and a key
        holder's decryption, so that no summary is ever seen in the clear). ``None`` (default):
        the setup exchange. A runtime that does not know the named protocol refuses to run;
        the in-process runtime simulates it inside :meth:`server_setup`."""
        return None

    def server_setup_from_ceremony(self, name: str, result: Mapping[str, Any]) -> None:
        """Server: build what the rounds need from the result of the :meth:`setup_ceremony`
        protocol ``name`` (what that protocol's runtime implementation documents)."""
        raise NotImplementedError(f"{type(self).__name__} runs no setup ceremony {name!r}")

    # ------------------------------------------------------------------ rounds
    @abstractmethod
    def configure(self, rnd: int, participants: Sequence[int]) -> dict[int, Payload]:
        """Server: the message each participant receives in round ``rnd``."""

    @abstractmethod
    def client_update(self, i: int, rnd: int, message: Payload) -> Payload:
        """Client ``i``: train on its own data from ``message`` and its state; the reply."""

    def client_update_many(self, rnd: int, messages: Mapping[int, Payload]) -> dict[int, Payload]:
        """All of a round's client halves in one process (the in-process runtime). Default:
        :meth:`client_update` per client in the given order; a method may override it with a
        batched implementation that returns the same replies within float tolerance. An
        exception that is not a toolkit error is raised as a :class:`ClientHalfError` naming
        the method and the client (:func:`client_half`)."""
        method = self.reply_rules.method if self.reply_rules is not None else self.name
        replies = {}
        for i, m in messages.items():
            with client_half(method, f"client {i}'s client_update of round {rnd}"):
                replies[i] = self.client_update(i, rnd, m)
        return replies

    @abstractmethod
    def aggregate(self, rnd: int, replies: Mapping[int, Payload]) -> dict[str, float]:
        """Server: combine the accepted replies; returns the round's statistics."""

    def round_discarded(self, rnd: int) -> None:  # noqa: B027 (optional hook)
        """Server: called instead of :meth:`aggregate` when no reply of round ``rnd`` was
        accepted (every participant refused, failed, timed out or was rejected), by both
        runtimes: the server's state is what it was after the last aggregation (e.g. a value
        computed lazily from the rows must be computed from them now, before clients train
        again). Default: nothing to do."""

    # ------------------------------------------------------------------ evaluation
    def evaluation_messages(self, rnd: int, clients: Sequence[int]) -> dict[int, Payload]:
        """Server: what each evaluated client needs from it to evaluate (``{}``: nothing)."""
        return {}

    @abstractmethod
    def client_eval_row(self, i: int, message: Payload | None = None) -> Tensor:
        """Client ``i``: the parameter row it is evaluated on (its personalized model)."""

    # ------------------------------------------------------------------ finalize exchange
    def finalize_messages(self) -> dict[int, Payload]:
        """Server: what each client receives after the last round (``{}``: no exchange)."""
        return {}

    def client_finalize(self, i: int, message: Payload) -> Payload:
        """Client ``i``: its final reply (e.g. metrics after local fine-tuning)."""
        raise NotImplementedError(f"{type(self).__name__} has no finalize exchange")

    def server_finalize(self, replies: Mapping[int, Payload]) -> dict[str, Any]:
        """Server: method-specific results for ``results.json`` from the final replies."""
        return {}

    # ------------------------------------------------------------------ state
    @abstractmethod
    def server_state_dict(self) -> dict[str, Any]:
        """Server state a resume cannot recompute."""

    @abstractmethod
    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`server_state_dict` (validated: shapes, finiteness)."""

    @abstractmethod
    def client_state_dict(self, i: int) -> Payload:
        """Client ``i``'s own state between messages (what its process persists)."""

    @abstractmethod
    def load_client_state_dict(self, i: int, state: Payload) -> None:
        """Restore :meth:`client_state_dict` for client ``i`` (validated)."""


# ---------------------------------------------------------------------- registry helpers
# A method is registered in secure_fedora.core.registry.METHODS either as its class (a
# FederatedAlgorithm subclass with a ``from_config(ctx, cfg)`` classmethod) or as a factory
# ``(ctx, cfg) -> method``; a factory exposes its class as the attribute ``algorithm``.


def method_class(name: str) -> type[FederatedAlgorithm] | None:
    """The class of registered method ``name`` (what its releases and config checks come
    from), or ``None`` when it is a factory that does not name its class (``algorithm``
    attribute). Unknown names raise :class:`~secure_fedora.core.registry.RegistryError`."""
    from secure_fedora.core.registry import METHODS

    entry = METHODS.get(name)
    if isinstance(entry, type) and issubclass(entry, FederatedAlgorithm):
        return entry
    cls = getattr(entry, "algorithm", None)
    if isinstance(cls, type) and issubclass(cls, FederatedAlgorithm):
        return cls
    return None


def build_method(name: str, ctx: Any, cfg: Any) -> Any:
    """Instantiate registered method ``name``: ``cls.from_config(ctx, cfg)`` for a registered
    class, ``factory(ctx, cfg)`` for a registered factory. The result must be a
    :class:`FederatedAlgorithm`; it gets the :class:`ReplyRules` of ``name`` under ``cfg`` as
    its ``reply_rules`` attribute and its :class:`ReplySchema` as ``reply_schema`` (what the
    runtimes check every exchange against). A factory whose ``algorithm`` is not the class
    it built raises :class:`ContractError` when the built class declares anything of
    :func:`named_class_declarations` otherwise (releases and reply entries under DP only):
    the plan, the ledgers, the runtimes' checks, the config and results.json read the named
    class's (:func:`method_releases`, :func:`declared_reply_entries`, ...)."""
    from secure_fedora.core.registry import METHODS

    entry = METHODS.get(name)
    if isinstance(entry, type):
        from_config = getattr(entry, "from_config", None)
        if from_config is None:
            raise TypeError(f"method {name!r} is registered as class {entry.__name__}, which "
                            "has no from_config(ctx, cfg) classmethod")
        method = from_config(ctx, cfg)
    elif callable(entry):
        method = entry(ctx, cfg)
    else:
        raise ContractError(f"method {name!r} is registered as {type(entry).__name__} "
                            f"{entry!r}, neither a FederatedAlgorithm class nor a factory")
    if not isinstance(method, FederatedAlgorithm):
        raise ContractError(f"method {name!r}: building it returned {type(method).__name__}, "
                            "not a FederatedAlgorithm (from_config / the factory must return "
                            "the method)")
    _refuse_runtime_only_overrides(name, type(method))
    rules = ReplyRules.of(name, type(method), cfg)
    named = method_class(name)
    if named is not None and named is not type(method):
        # the plan, the accounting and results.json read the named class's declarations
        differs = _declarations_differ(name, named, type(method), cfg, rules.private)
        if differs:
            raise ContractError(
                f"method {name!r}: its factory names {named.__name__} as its algorithm but "
                f"built {type(method).__name__}, which declares other {'; other '.join(differs)}"
                f" (the run would be planned, accounted and reported as {named.__name__}); "
                f"set the factory's 'algorithm' attribute to {type(method).__name__}")
    method.reply_rules = rules
    method.reply_schema = ReplySchema.of(method)
    return method


#: Hooks of the in-process runtime's FederatedMethod that the Flower runtime never calls, with
#: the contract's hook that both runtimes call instead: a plug-in's override would make the
#: two runtimes report different results.
RUNTIME_ONLY_HOOKS = {"extra_results": "server_finalize(replies)",
                      "eval_row": "client_eval_row(i, message)",
                      "eval_rows": "client_eval_row(i, message)"}


def _defining_class(cls: type, attribute: str) -> type | None:
    """The nearest class in ``cls``'s method resolution order whose own body defines
    ``attribute`` (None where none does)."""
    return next((k for k in cls.__mro__ if attribute in vars(k)), None)


def _refuse_runtime_only_overrides(name: str, cls: type) -> None:
    """ContractError naming method ``name`` when its class, or a plug-in class it derives
    from, defines one of :data:`RUNTIME_ONLY_HOOKS` (the toolkit's own classes may)."""
    for hook, instead in RUNTIME_ONLY_HOOKS.items():
        owner = _defining_class(cls, hook)
        if owner is None or is_builtin_method(owner):
            continue
        raise ContractError(
            f"method {name!r}: {owner.__name__} overrides {hook}, which only the in-process "
            f"runtime calls (the Flower runtime would report other results); implement "
            f"{instead} instead, which both runtimes call")


#: Declarations the toolkit reads from a method's class beside :class:`FederatedAlgorithm`'s
#: class methods and the config hooks of
#: :class:`~secure_fedora.algorithms.config_checks.MethodChecks` (see
#: :func:`named_class_declarations`): read with ``getattr`` on :func:`method_class`...
OTHER_CLASS_DECLARATIONS = ("sends_messages", "amendable_keys")
#: ... and with ``METHODS.declared`` (from a factory itself when it has them, as the config
#: hooks of ``MethodChecks`` are).
OTHER_REGISTRY_DECLARATIONS = ("params", "check_hyperparameters", "fine_tunes", "config_section")
#: Declarations compared by what they state under the run's config rather than by their
#: definition (the others need a run's data or results to be asked).
_DECLARED_UNDER_CFG = ("releases", "reply_entries", "assumptions", "distributed_unsupported",
                       "derived_row_names")


def _registry_declarations() -> tuple[str, ...]:
    """The declarations ``METHODS.declared`` reads: from a factory itself when it has them,
    else from the class it names."""
    from secure_fedora.algorithms.config_checks import MethodChecks

    return (*(k for k in vars(MethodChecks) if not k.startswith("_")),
            *OTHER_REGISTRY_DECLARATIONS)


def named_class_declarations() -> tuple[str, ...]:
    """Every class attribute the toolkit reads from the class a method's registry entry names
    (:func:`method_class`, ``METHODS.declared``) rather than from the method it built: the
    class methods of :class:`FederatedAlgorithm`, the config hooks of
    :class:`~secure_fedora.algorithms.config_checks.MethodChecks`,
    :data:`OTHER_CLASS_DECLARATIONS` and :data:`OTHER_REGISTRY_DECLARATIONS`.
    :func:`build_method` compares each of them."""
    names = [k for k, v in vars(FederatedAlgorithm).items() if isinstance(v, classmethod)]
    return tuple(dict.fromkeys([*names, *OTHER_CLASS_DECLARATIONS, *_registry_declarations()]))


def _declarations_differ(name: str, named: type[FederatedAlgorithm],
                         built: type[FederatedAlgorithm], cfg: Any, private: bool) -> list[str]:
    """What ``built`` (registered as ``name``) declares differently from ``named`` under ``cfg``, each as
    ``"<what> (<named>: ..., <built>: ...)"``, over :func:`named_class_declarations`: its
    assumptions (stated in results.json), whether Flower can run it and the result rows it
    adds, compared by what they state under ``cfg``; in a private run also its releases (what
    the plan calibrates and the ledgers account) and its reply rules (stated in results.json,
    enforced on every reply); every other declaration (its data and model checks, derived
    rows and comparisons, config hooks, ...) by its definition. A declaration the registry
    reads from the factory itself is the factory's, not compared."""
    from secure_fedora.core.registry import METHODS

    def shown(value: Any) -> str:
        if callable(value) and hasattr(value, "__qualname__"):
            value = getattr(value, "__func__", value).__qualname__
        text = value if isinstance(value, str) else repr(value)
        return text if len(text) <= 200 else text[:197] + "..."

    def definition(cls: type, attribute: str) -> Any:
        value = getattr(cls, attribute, None)
        return getattr(value, "__func__", value)  # a class method: the function defining it

    entry = METHODS.get(name)
    pairs: list[tuple[str, Any, Any]] = []
    if private:
        def releases(cls: type[FederatedAlgorithm]) -> str:
            return "; ".join(f"{r.when} {r.kind} {list(r.mechanisms)}"
                             f"{' encrypted' * r.encrypted}" if isinstance(r, ReleaseSpec)
                             else repr(r) for r in cls.releases(cfg)) or "none"

        pairs.append(("releases", releases(named), releases(built)))
        a, b = ReplyRules.of(name, named, cfg), ReplyRules.of(name, built, cfg)
        pairs.append(("reply entries", a.entries, b.entries))

    def asked(cls: type, hook: str, signature: str, *args: Any) -> Any:
        with method_hook(name, f"{hook}{signature} ({cls.__name__})"):
            return getattr(cls, hook)(*args)

    for hook in ("assumptions", "distributed_unsupported"):
        pairs.append((hook, asked(named, hook, "(cfg)", cfg), asked(built, hook, "(cfg)", cfg)))

    def factory_declares(attribute: str) -> bool:  # METHODS.declared reads the factory's own
        return attribute in _registry_declarations() and entry is not named and \
            getattr(entry, attribute, None) is not None

    if not factory_declares("derived_row_names"):
        pairs.append(("derived_row_names", *(
            asked(cls, "derived_row_names", "(name, cfg)", name, cfg)
            if callable(getattr(cls, "derived_row_names", None)) else None
            for cls in (named, built))))
    for attribute in named_class_declarations():
        if attribute in _DECLARED_UNDER_CFG or factory_declares(attribute):
            continue
        pairs.append((attribute, definition(named, attribute), definition(built, attribute)))
    return [f"{what} ({named.__name__}: {shown(x)}, {built.__name__}: {shown(y)})"
            for what, x, y in pairs if x != y]


def model_size_checked(names: Sequence[str]) -> list[str]:
    """The registered methods of ``names`` whose class overrides
    :meth:`FederatedAlgorithm.check_model_size` (what a runtime must build the model for
    before any method runs)."""
    return _overriding(names, "check_model_size")


def _overriding(names: Sequence[str], hook: str) -> list[str]:
    """The registered methods of ``names`` whose class overrides the class method ``hook``
    of :class:`FederatedAlgorithm`, in the order given."""
    default = FederatedAlgorithm.__dict__[hook].__func__
    out = []
    for name in names:
        cls = method_class(name)
        if cls is not None and getattr(cls, hook).__func__ is not default:
            out.append(name)
    return out


def check_model_sizes(names: Sequence[str], cfg: Any, num_params: int,
                      dtype: torch.dtype) -> None:
    """Ask every registered method of ``names`` whether it can run under ``cfg`` on a model
    of ``num_params`` parameters of ``dtype`` (:meth:`FederatedAlgorithm.check_model_size`):
    a toolkit error it raises passes unchanged, any other ``ValueError`` becomes a
    :class:`~secure_fedora.core.config.ConfigError` naming the method."""
    from secure_fedora.core.config import ConfigError

    for name in model_size_checked(names):
        cls = method_class(name)
        assert cls is not None  # model_size_checked keeps only methods with a class
        try:
            with method_hook(name, "check_model_size(cfg, num_params, dtype)", (ValueError,)):
                cls.check_model_size(cfg, num_params, dtype)
        except ToolkitError:
            raise
        except ValueError as err:
            raise ConfigError(f"method {name!r} cannot run on a model of {num_params:,} "
                              f"parameters: {err}") from None


@dataclass(frozen=True)
class DataFacts:
    """What a runtime knows of the data before any method runs, and the server may know:
    the input shape of one example, the number of classes (or targets), whether labels are
    multi-label, and each client's split sizes (in client order)."""

    input_shape: tuple[int, ...]
    num_classes: int
    multilabel: bool
    train_sizes: tuple[int, ...]
    val_sizes: tuple[int, ...]
    test_sizes: tuple[int, ...]

    @property
    def input_size(self) -> int:
        """The number of input features of one example (its shape flattened)."""
        return math.prod(self.input_shape)


def data_checked(names: Sequence[str]) -> list[str]:
    """The registered methods of ``names`` whose class overrides
    :meth:`FederatedAlgorithm.check_data`."""
    return _overriding(names, "check_data")


def check_data_facts(names: Sequence[str], cfg: Any, facts: DataFacts) -> None:
    """Ask every registered method of ``names`` whether it can run under ``cfg`` on data of
    ``facts`` (:meth:`FederatedAlgorithm.check_data`): a
    :class:`~secure_fedora.core.config.ConfigError` passes unchanged, any other
    ``ValueError`` (a toolkit one included) becomes one naming the method."""
    from secure_fedora.core.config import ConfigError

    for name in data_checked(names):
        cls = method_class(name)
        assert cls is not None  # data_checked keeps only methods with a class
        try:
            with method_hook(name, "check_data(cfg, facts)", (ValueError,)):
                cls.check_data(cfg, facts)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"method {name!r} cannot run on this data: {err}") from None


def method_releases(name: str, cfg: Any) -> tuple[ReleaseSpec, ...]:
    """The releases registered method ``name`` declares under ``cfg``; a factory that does
    not name its class (``factory.algorithm``) is refused with a ``ValueError`` rather than
    planned with a guess."""
    cls = method_class(name)
    if cls is None:
        raise ValueError(
            f"method {name!r} is registered as a factory that does not name its algorithm "
            "class, so its releases are unknown; register the class (with a from_config "
            "classmethod) or set the factory's 'algorithm' attribute to it")
    with method_hook(name, "releases(cfg)"):
        specs = cls.releases(cfg)
    if not isinstance(specs, tuple | list) or not all(isinstance(s, ReleaseSpec) for s in specs):
        raise ValueError(f"method {name!r}: releases(cfg) must return a tuple of ReleaseSpec, "
                         f"got {specs!r}")
    return tuple(specs)


#: The exchanges whose replies :meth:`FederatedAlgorithm.reply_entries` declares, in order.
REPLY_STAGES = (SETUP, ROUND, FINALIZE)


def _builtin_reply_reasons(cfg: Any) -> set[tuple[str, str, str]]:
    """Every ``(stage, entry, reason)`` the toolkit's own methods (and the default of
    :meth:`FederatedAlgorithm.reply_entries`) declare under ``cfg``."""
    from secure_fedora.core.registry import METHODS

    classes = [FederatedAlgorithm, *(method_class(n) for n in METHODS.builtin_names())]
    return {(stage, entry, reason) for cls in classes if cls is not None
            for stage in REPLY_STAGES for entry, reason in cls.reply_entries(cfg, stage).items()}


def declared_reply_entries(name: str, cfg: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """What registered method ``name``'s client replies may carry under ``cfg`` (the
    :class:`ReplyRules` both runtimes enforce, from its class's
    :meth:`FederatedAlgorithm.reply_entries`): stage -> entry -> ``{"reason": why it may
    leave the client, "built_in": whether a method the toolkit ships declares that entry with
    that reason for that exchange under ``cfg``}``. ``built_in`` false marks the method's own
    claim (a plug-in's, or a built-in entry with another reason): declared, not verified.
    Every stage of :data:`REPLY_STAGES` is present (empty: that reply carries nothing).
    ``ValueError`` for a factory that does not name its class (as :func:`method_releases`)."""
    cls = method_class(name)
    if cls is None:
        raise ValueError(
            f"method {name!r} is registered as a factory that does not name its algorithm "
            "class, so what its replies carry is unknown; set the factory's 'algorithm' "
            "attribute to it")
    rules = ReplyRules.of(name, cls, cfg)
    builtin = _builtin_reply_reasons(cfg)
    return {stage: {entry: {"reason": reason, "built_in": (stage, entry, reason) in builtin}
                    for entry, reason in rules.entries[stage].items()}
            for stage in REPLY_STAGES}


@dataclass(frozen=True)
class ReplyDeclarations:
    """What the client replies of a run's methods may carry, as their classes declare it
    (:func:`reply_declarations`)."""

    #: Every ``(stage, entry)`` a method that declares its replies declares.
    entries: frozenset[tuple[str, str]]
    #: The methods whose declarations this process cannot read (a name it has not
    #: registered, a factory that names no class, a ``reply_entries`` that raised), in the
    #: run's order: their replies may carry any entry.
    undeclared: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Whether :attr:`entries` is every entry the replies may carry."""
        return not self.undeclared

    def may_carry(self, stage: str, entry: str) -> bool:
        """Whether a reply of ``stage`` may carry ``entry``: declared by a method, or not
        excluded because some method's declarations are unknown."""
        return (stage, entry) in self.entries or not self.complete


def reply_declarations(names: Sequence[str], cfg: Any) -> ReplyDeclarations:
    """The ``(stage, entry)`` pairs the client replies of methods ``names`` may carry under
    ``cfg`` (each method's :func:`declared_reply_entries`) and the methods whose declarations
    cannot be read here: the one reader of what leaves a client for results.json's
    statements and the audit report. Never raises for a method it cannot read; it names it
    in :attr:`ReplyDeclarations.undeclared` instead, so no statement reads "not carried"
    where it is unknown."""
    entries: set[tuple[str, str]] = set()
    undeclared: list[str] = []
    for name in dict.fromkeys(names):
        try:
            declared = declared_reply_entries(name, cfg)
        except (ToolkitError, ValueError):  # unknown here: named, not guessed
            undeclared.append(name)
            continue
        entries.update((stage, entry) for stage, stage_entries in declared.items()
                       for entry in stage_entries)
    return ReplyDeclarations(frozenset(entries), tuple(undeclared))


def round_mechanisms(name: str, cfg: Any) -> tuple[str, ...]:
    """The mechanisms of method ``name``'s per-round release (kind ``"model"``), in ledger
    order: what the runtime's admission records before a client trains."""
    for spec in method_releases(name, cfg):
        if spec.when == ROUND and spec.kind == "model":
            return spec.mechanisms
    return ()


# ---------------------------------------------------------------------- contract checks
# Both runtimes call these on what a method produces, before it is used: a method that
# breaks the contract stops the run with an error naming it, instead of sending more than
# its declared releases or writing over the runtime's own records.


def check_messages(method: str, stage: str, rnd: int, messages: Any,
                   participants: Sequence[int], num_params: int | None = None
                   ) -> dict[int, Payload]:
    """``messages`` (what the server half addresses to clients in exchange ``stage``: setup,
    round, evaluate or finalize) as a dict; :class:`ContractError` unless it maps only
    ``participants`` (the clients the runtime chose for the round, whose releases it admits
    under DP only after they accepted their messages; every client for setup and finalize;
    the evaluated ones) to dicts of tensors that are fit payload entries
    (:func:`entry_problem`), each message within :func:`payload_size_problem`'s caps for a
    model of ``num_params`` parameters. Both runtimes call it on every exchange's messages
    before any is sent. A client outside them would train and reply without an accounted release; an unfit
    entry is one the Flower runtime could not send."""
    exchange = f"round {rnd}'s {stage}" if stage in (ROUND, EVALUATE) else f"the {stage}"
    if not isinstance(messages, Mapping):
        raise ContractError(f"method {method!r}: {exchange} messages must be a dict client -> "
                            f"payload, got {type(messages).__name__}")
    allowed = set(participants)
    extra = sorted((i for i in messages if i not in allowed), key=repr)
    if extra:
        whom = "the round's participants" if stage == ROUND else f"the {stage} exchange's clients"
        raise ContractError(
            f"method {method!r}: {exchange} messages address client(s) "
            f"{extra[:8]} outside {whom} {sorted(allowed)[:8]}"
            f"{' ...' if len(allowed) > 8 else ''} (a client the runtime did not choose or "
            "admit must not train or reply)")
    for i, payload in messages.items():
        if not isinstance(payload, Mapping):
            raise ContractError(f"method {method!r}: its {stage} message to client {i} must be "
                                f"a dict of tensors, got {type(payload).__name__}")
        for key, value in payload.items():
            if not isinstance(key, str) or not isinstance(value, Tensor):
                raise ContractError(
                    f"method {method!r}: its {stage} message to client {i} must be a dict of "
                    f"tensors; entry {key!r} is a {type(value).__name__} (the Flower runtime "
                    "moves only tensors)")
            problem = entry_problem(key, value)
            if problem:
                raise ContractError(f"method {method!r}: its {stage} message to client {i}: "
                                    f"entry {key!r} {problem} (the Flower runtime could not "
                                    "send it)")
        problem = payload_size_problem(payload, num_params)
        if problem:
            raise ContractError(f"method {method!r}: its {stage} message to client {i} "
                                f"{problem} (the Flower runtime could not send it)")
    return dict(messages)


def check_message_entries(algorithm: Any, method: str, stage: str, i: int,
                          message: Mapping[str, Tensor] | None) -> None:
    """:class:`ContractError` naming ``method``, client ``i``, the exchange and the entry
    unless ``message`` (the verified ``stage`` message to client ``i``; None: it carries no
    payload, as ``{}``) carries exactly the entries :meth:`FederatedAlgorithm.message_entries`
    declares, each of its dtype and shape and fit (:func:`entry_problem`). Nothing is checked
    where the method declares nothing for ``stage``, nor where a plug-in method inherits a
    built-in's declaration without making its own (its server half may send other messages).
    A Flower client calls it before any budget is admitted: a refused message admits,
    journals and saves nothing."""
    cls = type(algorithm)
    owner = _defining_class(cls, "message_entries")
    if owner is None or not (is_builtin_method(cls) or owner is cls):
        return
    with client_half(method, f"client {i}'s message_entries({stage!r})"):
        declared = algorithm.message_entries(stage)
    if declared is None:
        return
    got = dict(message or {})
    where = f"method {method!r}: the {stage} message to client {i}"
    if set(got) != set(declared):
        raise ContractError(f"{where} carries {sorted(got)[:8]}, the method's {stage} messages "
                            f"carry {sorted(declared)}; refused before anything was admitted or "
                            "computed")
    for name, tensor in got.items():
        problem = entry_problem(name, tensor)
        dtype, shape = declared[name]
        if problem is None and (tensor.dtype, tuple(tensor.shape)) != (dtype, tuple(shape)):
            problem = (f"is {tensor.dtype} {tuple(tensor.shape)}, the method's {stage} "
                       f"messages carry {dtype} {tuple(shape)}")
        if problem is not None:
            raise ContractError(f"{where}: entry {name!r} {problem}; refused before anything "
                                "was admitted or computed")


def check_eval_row(method: str, i: int, row: Any, num_params: int) -> Tensor:
    """``row`` (what client ``i``'s ``client_eval_row`` returned); :class:`ContractError`
    naming the method and the client unless it is a floating tensor of ``num_params`` finite
    values. A non-finite row has no metric (its NaN logits would score as class 0): it is
    refused as the runtimes refuse non-finite parameters everywhere else, in both runtimes
    before anything is evaluated."""
    if not isinstance(row, Tensor) or not row.is_floating_point() \
            or tuple(row.shape) != (num_params,):
        got = (f"{row.dtype} {tuple(row.shape)}" if isinstance(row, Tensor)
               else type(row).__name__)
        raise ContractError(f"method {method!r}: client {i}'s client_eval_row must return its "
                            f"parameter row ({num_params} floating values), got {got}")
    if not all_finite(row):  # the count only for the message
        bad = int((~torch.isfinite(row)).sum())
        raise ContractError(f"method {method!r}: client {i}'s client_eval_row returned a row "
                            f"with {bad} non-finite value(s) of {num_params}; a model with "
                            "non-finite parameters has no metric, nothing was evaluated")
    return row


def check_client_state(method: str, i: int, state: Any) -> dict[str, Tensor]:
    """Client ``i``'s ``client_state_dict`` as a dict; :class:`ContractError` naming the
    method, the client and the field unless it maps names to finite tensors that a checkpoint
    loads back: a ``torch.Tensor`` or ``torch.nn.Parameter``, not another subclass (the safe
    loader refuses it, so the run could be written but never resumed). Both runtimes check it
    when they persist the state (the in-process checkpoint, a Flower node's run state)."""
    if not isinstance(state, Mapping):
        raise ContractError(f"method {method!r}: client {i}'s client_state_dict is a "
                            f"{type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if isinstance(key, str) and type(value) in (Tensor, torch.nn.Parameter) \
                and all_finite(value):
            continue
        if not isinstance(value, Tensor):
            what = f"a {type(value).__name__}, not a tensor"
        elif type(value) not in (Tensor, torch.nn.Parameter):
            what = (f"a {type(value).__name__} (a torch.Tensor subclass), which a checkpoint "
                    "cannot load back; return value.as_subclass(torch.Tensor)")
        else:
            what = "non-finite values" if isinstance(key, str) else "a tensor under a non-string name"
        raise ContractError(f"method {method!r}: client {i}'s client state field {key!r} holds "
                            f"{what}; a checkpoint (and a Flower node) keeps only finite tensors "
                            "by name")
    return dict(state)


def no_reply_statistics() -> dict[str, float]:
    """The statistics of a round whose update used no client (none admitted, or no reply
    accepted), in both runtimes: no step; a method's statistics over no replies (a mean of
    nothing) are not made up."""
    return {REPLY_STEPS: 0.0}


def round_statistics_of(method: str, rnd: int, replies_statistics: Mapping[str, Any],
                        aggregated: Any) -> dict[str, float]:
    """The round's statistics: what the replies tell (``round_statistics``) merged with what
    ``aggregate`` returned, through :func:`check_round_statistics`; :class:`ContractError`
    when ``aggregate`` did not return a dict."""
    if not isinstance(aggregated, Mapping):
        raise ContractError(f"method {method!r}: aggregate() must return the round's "
                            f"statistics as a dict, got {type(aggregated).__name__}")
    return check_round_statistics(method, rnd, {**replies_statistics, **aggregated})


def with_sat_out_statistics(method: str, rnd: int, stats: Mapping[str, float],
                            added: Any) -> dict[str, float]:
    """``stats`` with what the method's ``sat_out_statistics`` returned (``added``, checked
    as :func:`check_round_statistics` checks a round's statistics) added in: an entry of the
    same name is summed, a new one appended, so a runtime names no method's statistic."""
    out = dict(stats)
    for key, value in check_round_statistics(method, rnd, added).items():
        out[key] = out.get(key, 0.0) + value
    return out


def check_round_statistics(method: str, rnd: int, stats: Any) -> dict[str, float]:
    """A method's round statistics as ``{name: float}``; :class:`ContractError` unless it is
    a dict of string names outside :data:`RUNTIME_ROUND_COLUMNS` to finite real numbers (or
    one-element tensors of them)."""
    if not isinstance(stats, Mapping):
        raise ContractError(f"method {method!r}: round {rnd}'s statistics (aggregate's return) "
                            f"must be a dict name -> number, got {type(stats).__name__}")
    out: dict[str, float] = {}
    for key, value in stats.items():
        if not isinstance(key, str) or not key:
            raise ContractError(f"method {method!r}: round statistic names must be non-empty "
                                f"strings, got {key!r}")
        if key in RUNTIME_ROUND_COLUMNS:
            raise ContractError(f"method {method!r}: round statistic {key!r} would overwrite the "
                                "runtime's own column of that name; rename it")
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise ContractError(f"method {method!r}: round {rnd}'s statistic {key!r} must be a "
                                f"finite number, got {value!r}")
        out[key] = float(value)
    return out


def check_finalize_results(method: str, results: Any) -> dict[str, Any]:
    """``server_finalize``'s results (results.json's ``extra``) as a dict;
    :class:`ContractError` unless it is a dict whose keys avoid :data:`RUNTIME_EXTRA_KEYS`
    (in process such a key was replaced by the runtime's own entry, silently)."""
    if not isinstance(results, Mapping):
        raise ContractError(f"method {method!r}: server_finalize must return a dict of "
                            f"results, got {type(results).__name__}")
    clash = sorted(str(k) for k in results if k in RUNTIME_EXTRA_KEYS)
    if clash:
        raise ContractError(f"method {method!r}: server_finalize result(s) {clash} would "
                            "overwrite the runtime's own entries of those names; rename them")
    return dict(results)


def check_setup_steps(method: str, privacy: Any, clients: Sequence[int]) -> None:
    """:class:`ContractError` when any of ``clients`` executed a DP-SGD step in method
    ``method``'s setup exchange (``privacy``: the run's federation privacy, whose per-client
    step counters the DP oracle increments). The runtimes admit and record DP-SGD only as a
    round's model release: a setup run would spend privacy that no ledger entry, plan or
    audit claim accounts. Called after the setup client halves and before any reply is
    used, so nothing of such a run reaches the server."""
    stepped = {i: privacy.clients[i].step_counter.executed for i in clients}
    stepped = {i: n for i, n in stepped.items() if n}
    if stepped:
        shown = ", ".join(f"client {i}: {n}" for i, n in list(stepped.items())[:8])
        raise ContractError(
            f"method {method!r} executed DP-SGD steps in its setup exchange ({shown}), which "
            "no release accounts: the runtimes record DP-SGD only as a round's model release "
            "(train in client_update, or run the method without DP); nothing reached the server")


def entry_problem(name: Any, value: Any) -> str | None:
    """What makes ``value`` under ``name`` unfit to be a payload entry (a name that is not a
    plain identifier, :data:`ENTRY_NAME`; a value that is not a tensor, or a tensor
    :func:`tensor_problem` refuses), or ``None``: what both runtimes refuse in a message or
    reply, and what the Flower runtime could not move."""
    if not isinstance(name, str) or not ENTRY_NAME.match(name):
        return "has a name that is not a plain identifier (letters, digits, _ . -; at most 64)"
    if not isinstance(value, Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    return tensor_problem(value)


def tensor_problem(tensor: Tensor) -> str | None:
    """What makes ``tensor`` unfit to be a payload entry (a dtype outside
    :data:`ALLOWED_DTYPES`, more than :data:`MAX_DIMS` dimensions, a non-finite floating
    value), or ``None``. The Flower runtime refuses such a tensor on the wire; the in-process
    runtime refuses it in a reply."""
    if tensor.dtype not in ALLOWED_DTYPES:
        return f"has dtype {tensor.dtype}, not one of the allowed payload dtypes"
    if tensor.dim() > MAX_DIMS:
        return f"has {tensor.dim()} dimensions, at most {MAX_DIMS}"
    if not all_finite(tensor):
        return "contains non-finite values"
    return None


def max_payload_bytes(num_params: int) -> int:
    """The most bytes one payload of a run whose model has ``num_params`` parameters may
    carry: 16 parameter vectors of float64 plus 1 MiB, at least 16 MiB (what the Flower
    runtime sends and decodes)."""
    return max(16 * 1024 * 1024, 16 * 8 * int(num_params) + (1 << 20))


def payload_size_problem(payload: Mapping[str, Tensor], num_params: int | None) -> str | None:
    """What makes ``payload`` (a dict of tensors) too large for one message (more than
    :data:`MAX_ENTRIES` entries; with ``num_params``, more than :func:`max_payload_bytes`),
    or ``None``: what both runtimes refuse, and the Flower runtime could not move."""
    if len(payload) > MAX_ENTRIES:
        return f"holds {len(payload)} entries, at most {MAX_ENTRIES}"
    if num_params is not None:
        total = sum(t.numel() * t.element_size() for t in payload.values())
        cap = max_payload_bytes(num_params)
        if total > cap:
            return f"holds {total} bytes, at most {cap} for a model of {num_params} parameters"
    return None


def expected_round_reply(algorithm: Any) -> dict[str, TensorSignature]:
    """The round-reply entries whose dtype and shape the server half knows: each upload
    matrix's row (``upload_state``), the model row for ``theta`` when no upload matrix names
    it (a ``theta`` reply is the client's parameter row), and the 0-d counts and ``lambda``
    every built-in reply carries as :func:`torch.tensor` scalars (int64 counts, float64
    lambda)."""
    shapes: dict[str, TensorSignature] = {
        REPLY_STEPS: (torch.int64, ()), REPLY_NUM_EXAMPLES: (torch.int64, ()),
        REPLY_LAMBDA: (torch.float64, ())}
    init = getattr(getattr(algorithm, "ctx", None), "init", None)
    if isinstance(init, Tensor):
        shapes[KIND_THETA] = (init.dtype, tuple(init.shape))
    upload_state = getattr(algorithm, "upload_state", None)
    if upload_state is not None:
        for kind, matrix in upload_state().items():
            shapes[kind] = (matrix.dtype, tuple(matrix.shape[1:]))
    return shapes


@dataclass
class ReplySchema:
    """Dtype and shape of every reply entry, per exchange stage: set from what the server
    half knows (:meth:`expect`, :func:`expected_round_reply`), else pinned by the first
    accepted reply of the stage; a later reply with another dtype or shape for the same name
    is refused. One instance per method run, used by both runtimes' servers
    (:meth:`ReplyRules.check_received`)."""

    pins: dict[tuple[str, str], TensorSignature] = field(default_factory=dict)
    #: The model's size, which caps a reply's bytes (:func:`payload_size_problem`).
    num_params: int | None = None

    @classmethod
    def of(cls, algorithm: Any) -> ReplySchema:
        """The schema of ``algorithm``'s replies, its round replies expected as
        :func:`expected_round_reply` says, their size capped for its model."""
        num_params = getattr(getattr(getattr(algorithm, "ctx", None), "flat", None),
                             "num_params", None)
        schema = cls(num_params=num_params if isinstance(num_params, int) else None)
        schema.expect(ROUND, expected_round_reply(algorithm))
        return schema

    def expect(self, stage: str, shapes: Mapping[str, TensorSignature]) -> None:
        """Pin ``stage``'s entries to what the server half knows they must be, so that the
        first reply cannot set them."""
        for name, sig in shapes.items():
            self.pins[(stage, name)] = (sig[0], tuple(sig[1]))

    def check(self, method: str, stage: str, i: int, reply: Mapping[str, Tensor]) -> None:
        """:class:`ContractError` naming ``method``, client ``i`` and the entry when an entry
        of its ``stage`` reply (a dict of tensors) is unfit (:func:`tensor_problem`) or
        differs in dtype or shape from its pin, or the reply is over the size caps
        (:func:`payload_size_problem`); pins the new names only once the whole reply passed."""
        new = {}
        for name, tensor in reply.items():
            problem = entry_problem(name, tensor)
            if problem:
                raise ContractError(f"method {method!r}: client {i}'s {stage} reply entry "
                                    f"{name!r} {problem}")
            sig = (tensor.dtype, tuple(tensor.shape))
            pinned = self.pins.get((stage, name))
            if pinned is None:
                new[(stage, name)] = sig
            elif pinned != sig:
                raise ContractError(
                    f"method {method!r}: client {i}'s {stage} reply entry {name!r} is {sig[0]} "
                    f"{sig[1]}, the exchange carries {pinned[0]} {pinned[1]}")
        problem = payload_size_problem(reply, self.num_params)
        if problem:
            raise ContractError(f"method {method!r}: client {i}'s {stage} reply {problem}")
        self.pins.update(new)


#: The built-in Gaussian mechanisms besides DP-SGD (the noised summary and the private
#: lambda); every other declared Gaussian mechanism is a plug-in.
BUILT_IN_GAUSSIAN_MECHANISMS: frozenset[str] = frozenset({"gaussian_summary", "gaussian_lambda"})


def plug_in_round_mechanisms(mechanisms: Sequence[str]) -> tuple[str, ...] | None:
    """The plug-in mechanisms of a round model release of ``mechanisms`` (DP-SGD first, then
    each other mechanism once: the built-in lambda or plug-ins); None when that is not such a
    release."""
    if not mechanisms or mechanisms[0] != "dpsgd" or len(set(mechanisms)) != len(mechanisms):
        return None
    rest = [m for m in mechanisms[1:] if m != "gaussian_lambda"]
    if any(m == "gaussian_summary" for m in rest):
        return None
    return tuple(rest)


def plug_in_setup_mechanism(mechanisms: Sequence[str]) -> str | None:
    """The plug-in mechanism of a setup release of ``mechanisms`` (exactly one mechanism,
    neither DP-SGD nor a built-in Gaussian mechanism); None when that is not such a release."""
    if len(mechanisms) != 1 or mechanisms[0] == "dpsgd" \
            or mechanisms[0] in BUILT_IN_GAUSSIAN_MECHANISMS:
        return None
    return mechanisms[0]


def plug_in_reply_entries(method: str, algorithm: type, cfg: Any, specs: Sequence[Any],
                          entries: Mapping[str, Mapping[str, str]]
                          ) -> dict[str, dict[str, str]]:
    """Per exchange stage (setup, round), the reply entry carrying each plug-in Gaussian
    mechanism that stage's release declares (entry -> mechanism): the declared entry named as
    the mechanism; else, one such mechanism left, the one entry (not so named) the method
    declares beyond its nearest built-in ancestor's; none when it declares no such entry (no
    reply entry carries it). :class:`ContractError` naming what to do when several mechanisms
    or entries are left (which entry carries which is not declared)."""
    mechanisms: dict[str, list[str]] = {SETUP: [], ROUND: []}
    for spec in specs:
        if not isinstance(spec, ReleaseSpec):
            continue
        if spec.when == SETUP:
            mechanisms[SETUP].extend(m for m in [plug_in_setup_mechanism(spec.mechanisms)] if m)
        elif spec.when == ROUND and spec.kind == "model":
            mechanisms[ROUND].extend(plug_in_round_mechanisms(spec.mechanisms) or ())
    carried: dict[str, dict[str, str]] = {}
    if not any(mechanisms.values()):
        return carried
    base = next(c for c in algorithm.__mro__
                if isinstance(c, type) and issubclass(c, FederatedAlgorithm)
                and is_builtin_method(c))
    for stage, names in mechanisms.items():
        if not names:
            continue
        declared = entries.get(stage, {})
        with method_hook(method, f"{base.__name__}.reply_entries(cfg, {stage!r})"):
            added = sorted(set(declared) - set(base.reply_entries(cfg, stage)))
        links = {m: m for m in names if m in declared}
        rest = [m for m in names if m not in links]
        candidates = [e for e in added if e not in links]
        if rest and candidates:
            if len(rest) > 1 or len(candidates) > 1:
                raise ContractError(
                    f"method {method!r}: which {stage} reply entry carries plug-in "
                    f"mechanism(s) {rest} is not declared (entries added to "
                    f"{base.__name__}'s: {candidates}); in reply_entries(cfg, {stage!r}) name "
                    "the entry carrying a mechanism's release as the mechanism")
            links[candidates[0]] = rest[0]
        carried[stage] = links
    return carried


@dataclass(frozen=True)
class ReplyRules:
    """What method ``method``'s client replies may carry, per exchange stage
    (:meth:`FederatedAlgorithm.reply_entries`), and whether the run is private (only then
    are undeclared entries refused: without DP no release is claimed to be accounted).

    Checked in the client's process before a reply leaves (:meth:`check_reply`), and by the
    server of either runtime before any of a reply is used (:meth:`check_received`; the
    in-process driver through :meth:`check_replies` on a whole exchange)."""

    method: str
    private: bool
    entries: Mapping[str, Mapping[str, str]]
    #: Kinds of the setup releases the method declares (e.g. ``("summary",)``).
    setup_kinds: tuple[str, ...] = ()
    #: Per stage, the reply entry carrying each plug-in Gaussian mechanism's release in a
    #: private run (entry -> mechanism, :func:`plug_in_reply_entries`): before a reply leaves,
    #: that entry must be the tensor ``ctx.privacy.gaussian`` returned.
    plug_in_entries: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, method: str, algorithm: type, cfg: Any) -> ReplyRules:
        """The rules of registered method ``method`` (class ``algorithm``) under ``cfg``."""
        entries = {}
        for stage in (SETUP, ROUND, FINALIZE):
            with method_hook(method, f"reply_entries(cfg, {stage!r})"):
                declared = algorithm.reply_entries(cfg, stage)
            if not isinstance(declared, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in declared.items()):
                raise ContractError(f"method {method!r}: reply_entries(cfg, {stage!r}) must "
                                    f"return a dict entry -> reason, got {declared!r}")
            entries[stage] = dict(declared)
        privacy = getattr(cfg, "privacy", None)
        with method_hook(method, "releases(cfg)"):
            specs = algorithm.releases(cfg) if hasattr(algorithm, "releases") else ()
        setup_kinds = tuple(s.kind for s in specs if isinstance(s, ReleaseSpec) and s.when == SETUP)
        private = bool(getattr(privacy, "enabled", False))
        carried = plug_in_reply_entries(method, algorithm, cfg, specs, entries) if private else {}
        return cls(method, private, entries, setup_kinds, carried)

    def check_reply(self, stage: str, i: int, reply: Any, *, exact: bool = False) -> None:
        """:class:`ContractError` unless client ``i``'s ``stage`` reply is a dict of tensors
        whose counts (``steps`` >= 0, ``num_examples`` >= 1, if present) are one whole number
        each and, in a private run, whose every entry is declared for ``stage``. ``exact``
        (a server receiving replies, :meth:`check_received`): the entries must be exactly the
        declared ones, private run or not."""
        if not isinstance(reply, Mapping):
            raise ContractError(f"method {self.method!r}: client {i}'s {stage} reply must be a "
                                f"dict of tensors, got {type(reply).__name__}")
        for key, value in reply.items():
            if not isinstance(key, str) or not isinstance(value, Tensor):
                raise ContractError(
                    f"method {self.method!r}: client {i}'s {stage} reply entry {key!r} must be "
                    f"a tensor under a string name, got {type(value).__name__}")
        for name, least in COUNT_ENTRIES.items():
            count = reply.get(name)
            if count is not None and (count.numel() != 1 or count.dtype == torch.bool
                                      or count.is_floating_point() or count.is_complex()
                                      or int(count) < least):
                shown = count.tolist() if count.numel() <= 4 else tuple(count.shape)
                raise ContractError(f"method {self.method!r}: client {i}'s reply entry "
                                    f"{name!r} must be one integer >= {least} (an integer "
                                    f"tensor), got {shown} ({count.dtype})")
        if self.private:
            declared = self.entries.get(stage, {})
            undeclared = sorted(k for k in reply if k not in declared)
            if undeclared:
                raise ContractError(
                    f"method {self.method!r}: client {i}'s {stage} reply carries "
                    f"{undeclared}, which the method does not declare for that exchange "
                    f"(declared: {sorted(declared) or 'nothing'}); in a private run every "
                    "entry a client sends must be covered by a release or be data-independent "
                    "(FederatedAlgorithm.reply_entries). Nothing was sent.")
        if exact and set(reply) != set(self.entries.get(stage, {})):
            declared = sorted(self.entries.get(stage, {}))
            raise ContractError(f"method {self.method!r}: client {i}'s {stage} reply carries "
                                f"{sorted(reply)}, the method's {stage} replies carry {declared}")

    def check_received(self, stage: str, i: int, reply: Any, schema: ReplySchema) -> None:
        """What a server checks on client ``i``'s ``stage`` reply before any of it is used,
        in both runtimes: :meth:`check_reply` with exactly the declared entries, then every
        entry against ``schema`` (allowed dtype, finite values, the exchange's dtype and
        shape). :class:`ContractError` naming the method, the client and the entry."""
        self.check_reply(stage, i, reply, exact=True)
        schema.check(self.method, stage, i, reply)

    def check_replies(self, stage: str, rnd: int, replies: Any,
                      messages: Mapping[int, Any],
                      schema: ReplySchema | None = None) -> dict[int, Payload]:
        """``replies`` as a dict after :meth:`check_received` on each (:meth:`check_reply`
        without a ``schema``); :class:`ContractError` unless it answers exactly the clients
        ``messages`` addressed."""
        if not isinstance(replies, Mapping):
            raise ContractError(f"method {self.method!r}: round {rnd}'s {stage} replies must be "
                                f"a dict client -> payload, got {type(replies).__name__}")
        if set(replies) != set(messages):
            extra = sorted(set(replies) - set(messages), key=repr)
            missing = sorted(set(messages) - set(replies), key=repr)
            raise ContractError(
                f"method {self.method!r}: round {rnd}'s {stage} replies must answer exactly the "
                f"clients messaged; replies from unmessaged client(s) {extra[:8]}, no reply "
                f"from {missing[:8]}")
        for i, reply in replies.items():
            if schema is None:
                self.check_reply(stage, i, reply)
            else:
                self.check_received(stage, i, reply, schema)
        return dict(replies)
