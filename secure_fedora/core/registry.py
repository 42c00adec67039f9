"""Name -> implementation registries for datasets, partitioners, models, losses and methods.

A registry replaces a closed ``Literal`` list plus an ``if name == ...`` chain: each
implementation registers itself where it is defined (``@METHODS.register("fedavg")``), the
config validates names against the registry (an unknown name gets an error listing what is
available) and the runtime looks implementations up by name.

Registries fill lazily: the first lookup imports the modules that define the built-in entries
and every module of the ``secure_fedora.contrib`` package, so a new method (or model, loss,
...) is one new module there that registers itself; nothing else needs editing. The built-in
names are also listed here, so that checking a name (what config validation does) imports
neither the built-in modules nor torch; only :meth:`Registry.get` needs the implementations.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from privacy.errors import ToolkitError

__all__ = [
    "DATASETS",
    "LOSSES",
    "METHODS",
    "MODELS",
    "PARTITIONERS",
    "Registry",
    "RegistryError",
    "accepting_unregistered",
    "accountant_known_everywhere",
    "declared",
    "declarer",
]

T = TypeVar("T")

#: Package whose modules are imported on the first lookup of any registry (drop-in plug-ins).
CONTRIB_PACKAGE = "secure_fedora.contrib"


#: What a registry name may look like: it becomes a directory or file name of a run
#: (``ledgers/<method>/``, ``<method>.pt``), so no path separators, no leading dot, no spaces.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


class RegistryError(ToolkitError, ValueError):
    """An unknown or duplicate registry name; the message lists the available names."""


#: Set inside :func:`accepting_unregistered`: the ``(kind, name)`` of each unknown name that
#: :meth:`Registry.check` accepted.
_ACCEPTED: ContextVar[list[tuple[str, str]] | None] = ContextVar("_ACCEPTED", default=None)


@contextmanager
def accepting_unregistered() -> Iterator[list[tuple[str, str]]]:
    """Within the block, :meth:`Registry.check` accepts a well-formed name that no registry
    of this process holds (as the audits read a run's config.toml: an entry the run's own
    script or notebook registered is unknown to another process), and such a name declares
    nothing (:meth:`Registry.declared` and :meth:`Registry.declarer` answer ``None``, so the
    config checks it would declare are not run). Yields the list of ``(kind, name)`` accepted
    so, in order, without repeats. :meth:`Registry.get` still refuses every unknown name."""
    accepted: list[tuple[str, str]] = []
    token = _ACCEPTED.set(accepted)
    try:
        yield accepted
    finally:
        _ACCEPTED.reset(token)


class Registry(Generic[T]):
    """A named collection of implementations of one kind (e.g. "method").

    ``modules`` are imported on the first lookup of an implementation (they register the
    built-in entries, which must be exactly ``builtins``), then every module of
    :data:`CONTRIB_PACKAGE`. Name checks (:meth:`check`, :meth:`names`, ``in``) answer from
    ``builtins`` without importing ``modules``, and :meth:`declared` from the module named by
    ``declarations`` (its ``BUILTIN_DECLARATIONS``: per built-in name, an object declaring
    the same attributes as the entry). Registering a name twice raises :class:`RegistryError`
    (a plug-in cannot silently replace a built-in).
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = (), builtins: tuple[str, ...] = (),
                 declarations: str | None = None) -> None:
        self.kind = kind
        self._modules = modules
        self._builtin_order = builtins
        self._builtins = frozenset(builtins)
        self._declarations = declarations
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        # names registered while the contrib package was imported, by whichever module (a
        # contrib module may import the package that registers its entries): every process
        # that loads contrib registers them too
        self._via_contrib: set[str] = set()
        self._loaded = False
        self._loading = False

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does.

        ``name`` must match :data:`NAME_PATTERN` (it names files and folders of a run) and
        differ, also in letter case, from every other entry's name; a built-in name is taken
        even before the registry's first lookup (the built-ins are loaded first). The module
        that calls ``register`` is recorded as the entry's :meth:`origin`."""
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            raise RegistryError(
                f"{self.kind} names must be 1-64 characters: a letter or digit, then letters, "
                f"digits, '_', '.', '+' or '-' (they name files of a run); got {name!r}")
        origin = str(sys._getframe(1).f_globals.get("__name__", ""))

        def add(value: T) -> T:
            self._load_builtins()
            if name in self._entries and self._entries[name] is not value:
                if name in self._builtins:
                    raise RegistryError(f"{self.kind} {name!r} is built in: it cannot be replaced; "
                                        "register yours under another name")
                raise RegistryError(f"{self.kind} {name!r} is already registered; to replace it "
                                    f"(e.g. a notebook cell run again), call unregister({name!r}) "
                                    "on its registry first")
            clash = next((n for n in self._entries if n != name and n.lower() == name.lower()), None)
            if clash is not None:
                raise RegistryError(f"{self.kind} {name!r} differs from the registered "
                                    f"{clash!r} only in letter case (they would share files)")
            self._entries[name] = value
            self._origins.setdefault(name, origin)
            if _importing_contrib:
                self._via_contrib.add(name)
            return value

        if obj is None:
            return add
        return add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and notebooks that re-register a plug-in); a name that is
        not registered is no error. A built-in entry is refused: its name would then label
        another implementation's results."""
        if name in self._builtins:
            raise RegistryError(f"{self.kind} {name!r} is built in: it cannot be removed")
        self._entries.pop(name, None)
        self._origins.pop(name, None)
        self._via_contrib.discard(name)

    def _load_builtins(self) -> None:
        """Import the modules that register the built-in entries (once they all imported;
        a failed import is retried by the next lookup instead of leaving half of them)."""
        if self._loaded or self._loading or any(
                getattr(getattr(sys.modules.get(m), "__spec__", None), "_initializing", False)
                for m in self._modules):
            return  # loading, or a built-in module registering its entries as it is imported
        self._loading = True
        try:
            for module in self._modules:
                importlib.import_module(module)
            missing = self._builtins.difference(self._entries)
            if missing:  # the names that checks answer from must all exist
                raise RegistryError(f"built-in {self.kind} {sorted(missing)} declared but not "
                                    f"registered by {', '.join(self._modules)}")
            self._loaded = True
        finally:
            self._loading = False

    def _load(self) -> None:
        self._load_builtins()
        load_contrib()

    def _known(self) -> set[str]:
        """Every name, the built-ins without importing them (plug-ins are imported)."""
        load_contrib()
        return set(self._entries) if self._loaded else self._builtins.union(self._entries)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._known())

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._known()
        except TypeError:  # unhashable: no name
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def builtin_names(self) -> tuple[str, ...]:
        """The built-in names, in their declared order (none can be replaced or removed)."""
        return self._builtin_order

    def in_registration_order(self) -> list[str]:
        """Every registered name in the order it was registered (the built-ins first)."""
        load_contrib()
        if self._loaded:
            return list(self._entries)
        return [*self._builtin_order, *(n for n in self._entries if n not in self._builtins)]

    def declared(self, name: str, attribute: str) -> Any:
        """What entry ``name`` declares as ``attribute`` (see :func:`declared`); a built-in
        answers from the registry's declarations without importing its implementation.
        :class:`RegistryError` for an unknown name."""
        return declared(self._declaring_entry(name), attribute)

    def declarer(self, name: str, attribute: str) -> Any:
        """The object that declares ``attribute`` for entry ``name``: the entry, else the
        class a factory names as ``factory.algorithm`` (as :meth:`declared` reads it), or
        ``None`` when neither has it; a built-in answers from the registry's declarations.
        Lets a check read the declaring class's other attributes (its hyper-parameters), not a
        factory's. :class:`RegistryError` for an unknown name."""
        return declarer(self._declaring_entry(name), attribute)

    def _declaring_entry(self, name: str) -> Any:
        if self.accepted_unregistered(name):
            return None
        if self._declarations is not None and not self._loaded and name in self._builtins:
            return importlib.import_module(self._declarations).BUILTIN_DECLARATIONS[name]
        return self.get(name)

    def origin(self, name: str) -> str:
        """The module that registered ``name`` (its ``__name__``; e.g.
        ``secure_fedora.contrib.fedavgm``, or ``__main__`` for a script's own entry), which
        tells whether another process that imports only this package knows the entry.
        :class:`RegistryError` for an unknown name."""
        self.get(name)
        return self._origins.get(name, "")

    def known_everywhere(self, name: str) -> bool:
        """Whether any process that looks ``name`` up knows it: registered by one of the
        built-in modules or a module of :data:`CONTRIB_PACKAGE` (each imported on a process's
        first lookup), or by any module while that package was imported (a contrib module that
        imports an installed package registering its entries), not by a module only this
        process imported. :class:`RegistryError` for an unknown name."""
        origin = self.origin(name)
        return name in self._via_contrib or origin in self._modules or (
            origin == CONTRIB_PACKAGE or origin.startswith(CONTRIB_PACKAGE + "."))

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is a built-in entry, registered by one of the built-in modules
        (not a ``contrib`` or user entry, nor one re-registered under a built-in's name).
        :class:`RegistryError` for an unknown name."""
        return self.origin(name) in self._modules and name in self._builtins

    def names_of(self, obj: Any) -> list[str]:
        """Every name ``obj`` itself is registered under, in registration order."""
        self._load()
        return [n for n, entry in self._entries.items() if entry is obj]

    def get(self, name: str) -> T:
        """The implementation registered as ``name``; :class:`RegistryError` listing the
        available names otherwise."""
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RegistryError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())} (a plug-in"
                " is known to the process that registers it: put its module in"
                f" {CONTRIB_PACKAGE.replace('.', '/')}/, which every process imports, or"
                " register it from Python before loading the config)"
            ) from None

    def check(self, name: str) -> str:
        """``name`` if registered, else :class:`RegistryError` listing the available names (for
        config validators: a built-in name is checked without importing its module). Inside
        :func:`accepting_unregistered`, an unknown name of :data:`NAME_PATTERN`'s form is
        returned too, and recorded there."""
        if name in self or self.accepted_unregistered(name):
            return name
        return self.get(name)  # raises: not registered

    def accepted_unregistered(self, name: object) -> bool:
        """Whether ``name`` is unknown here and accepted (and recorded) by an enclosing
        :func:`accepting_unregistered`; False outside one and for every registered name."""
        return name not in self and accept_unregistered(self.kind, name)


def accept_unregistered(kind: str, name: object) -> bool:
    """Whether ``name``, of a ``kind`` this process does not hold (a registry's, or
    ``"accountant"`` for :data:`privacy.accounting.ACCOUNTANT_REGISTRY`), is accepted (and
    recorded) by an enclosing :func:`accepting_unregistered`; False outside one and for a
    name not of :data:`NAME_PATTERN`."""
    accepted = _ACCEPTED.get()
    if accepted is None or not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        return False
    if (kind, name) not in accepted:
        accepted.append((kind, name))
    return True


def declared(entry: Any, attribute: str) -> Any:
    """What a registered implementation declares as ``attribute``: the attribute of the entry
    (a class or a factory), else of the class a factory names as ``factory.algorithm``;
    ``None`` when neither has it. Lets lower layers (the config) ask a method what it declares
    (its hyper-parameters, its config checks) without importing the package that defines it."""
    owner = declarer(entry, attribute)
    return None if owner is None else getattr(owner, attribute)


def declarer(entry: Any, attribute: str) -> Any:
    """Which object :func:`declared` reads ``attribute`` from: ``entry`` when its attribute is
    not ``None``, else ``entry.algorithm`` when that one's is not, else ``None``."""
    if getattr(entry, attribute, None) is not None:
        return entry
    algorithm = getattr(entry, "algorithm", None)
    if getattr(algorithm, attribute, None) is not None:
        return algorithm
    return None


_contrib_loaded = False
#: True while :func:`load_contrib` imports the contrib package: what registers then, from any
#: module, is registered in every process that looks a name up (:meth:`Registry.known_everywhere`).
_importing_contrib = False
#: Accountants registered while :func:`load_contrib` imported the contrib package.
_accountants_via_contrib: set[str] = set()


def load_contrib() -> None:
    """Import every module of :data:`CONTRIB_PACKAGE` once (each registers its entries)."""
    global _contrib_loaded, _importing_contrib
    if _contrib_loaded:
        return
    from privacy.accounting import ACCOUNTANT_REGISTRY

    _contrib_loaded = True
    _importing_contrib = True
    before = set(ACCOUNTANT_REGISTRY)
    try:
        package = importlib.import_module(CONTRIB_PACKAGE)
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{CONTRIB_PACKAGE}."):
            importlib.import_module(info.name)
    finally:
        _importing_contrib = False
        _accountants_via_contrib.update(set(ACCOUNTANT_REGISTRY) - before)


def accountant_known_everywhere(name: str) -> bool:
    """Whether every process that loads a config knows accountant ``name``
    (:data:`privacy.accounting.ACCOUNTANT_REGISTRY`): a built-in one, or one registered while
    :func:`load_contrib` imported the contrib package, as :meth:`Registry.known_everywhere`
    answers for the other registries; False for one only this process registered."""
    from privacy.accounting import ACCOUNTANT_KINDS, ACCOUNTANT_REGISTRY

    load_contrib()
    return name in ACCOUNTANT_KINDS or (name in _accountants_via_contrib
                                        and name in ACCOUNTANT_REGISTRY)


DatasetLoader = Callable[[int], Any]
Partitioner = Callable[..., Any]

DATASETS: Registry[DatasetLoader] = Registry(
    "dataset", ("secure_fedora.data.partition",), ("mnist", "fashion_mnist"))
"""Built-in datasets: ``loader(seed) -> LabeledDataset``."""
PARTITIONERS: Registry[Partitioner] = Registry(
    "partition", ("secure_fedora.data.partition",), ("iid", "rotation", "dirichlet", "pathological"))
"""Partitioners: ``split(dataset, data_config, seed) -> list[ClientData]``."""
MODELS: Registry[Callable[..., Any]] = Registry(
    "model", ("secure_fedora.learning.models",), ("mlp", "cnn"))
"""Built-in models: ``build(input_shape, num_classes, device) -> nn.Module``."""
LOSSES: Registry[Any] = Registry("loss", ("secure_fedora.learning.tasks",), ("cross_entropy", "bce"))
"""Losses with their metric: :class:`secure_fedora.learning.tasks.Task` factories."""
METHODS: Registry[Callable[..., Any]] = Registry(
    "method", ("secure_fedora.algorithms.methods", "secure_fedora.algorithms.baselines"),
    ("local", "fedavg", "fedora", "fedprox", "ditto", "apfl", "fedamp", "ifca"),
    "secure_fedora.algorithms.config_checks",
)
"""Federated methods: a ``FederatedAlgorithm`` class with ``from_config(ctx, cfg)``, or a
``factory(ctx, cfg) -> FederatedMethod`` (see :mod:`secure_fedora.algorithms.contract`)."""
