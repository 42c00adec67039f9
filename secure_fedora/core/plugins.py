"""Loading user code named in a config: ``"package.module:function"``.

The module is imported from the config file's folder (when the config came from a file) or
from ``sys.path`` (``PYTHONPATH``). Every failure -- a malformed spec, a module that does not
import, a missing or non-callable attribute -- raises :class:`PluginError` naming the config
key, before anything is trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import site
import sys
import sysconfig
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from secure_fedora.core.config import ConfigError
from secure_fedora.core.errors import is_user_error

__all__ = ["PluginError", "config_dir", "derived_config", "import_object", "is_import_spec",
           "one_run", "raised_at", "remember_config_dir"]


class PluginError(ConfigError):
    """User code named in the config cannot be loaded or does not keep its contract."""


_CONFIG_DIRS: dict[int, tuple[weakref.ref, Path]] = {}


def _not_user_code() -> tuple[str, ...]:
    """Folders whose frames are not the user's: the toolkit's packages, the standard library
    and installed packages (torch, numpy, ...), also those of the user site and of a
    distribution's own folders (``pip install --user``; Debian's ``dist-packages``), which
    ``sysconfig``'s scheme does not name."""
    installed = [p for key in ("stdlib", "platstdlib", "purelib", "platlib")
                 if (p := sysconfig.get_paths().get(key))]
    installed += getattr(site, "getsitepackages", list)()
    if site.ENABLE_USER_SITE:
        installed.append(site.getusersitepackages())
    return tuple(dict.fromkeys(
        [str(Path(__file__).resolve().parents[2] / name) + os.sep
         for name in ("secure_fedora", "privacy", "audits")]
        + [str(Path(p).resolve()) + os.sep for p in installed]))


def raised_at(err: BaseException) -> str:
    """``" (at FILE:LINE in FUNCTION)"``: the innermost frame of ``err``'s traceback in the
    user's own code (``secure_fedora/contrib/`` included), so a one-line error about a
    plug-in that raised names where it raised; ``""`` when no frame is the user's (e.g. a
    missing module, raised by the import system)."""
    not_user = _not_user_code()
    # the folder where a user's methods go (the Flower apps import plug-ins only from there)
    contrib = str(Path(__file__).resolve().parents[1] / "contrib") + os.sep
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = frame.filename
        path = str(Path(name).resolve())
        if name.startswith("<") or (path.startswith(not_user) and not path.startswith(contrib)):
            continue
        return f" (at {name}:{frame.lineno} in {frame.name})"
    return ""


def remember_config_dir(cfg: Any, directory: str | Path) -> None:
    """Record the folder a config was read from (plug-in modules are imported from it)."""
    key = id(cfg)
    _CONFIG_DIRS[key] = (weakref.ref(cfg, lambda _: _CONFIG_DIRS.pop(key, None)),
                         Path(directory).resolve())


def config_dir(cfg: Any) -> Path | None:
    """The folder ``cfg`` was read from, or None (built from a dict)."""
    entry = _CONFIG_DIRS.get(id(cfg))
    if entry is None or entry[0]() is not cfg:
        return None
    return entry[1]


def derived_config(source: Any, derived: Any) -> Any:
    """``derived`` (e.g. ``source.model_copy(update=...)``) with ``source``'s folder
    remembered too, so its plug-ins are found as they were for ``source``; returns it."""
    directory = config_dir(source)
    if directory is not None:
        remember_config_dir(derived, directory)
    return derived


def is_import_spec(value: str) -> bool:
    """True for ``"package.module:attribute"`` (the form user plug-ins are named in)."""
    module, sep, attr = value.partition(":")
    return bool(sep) and bool(module) and bool(attr)


def check_spec(value: str, key: str) -> str:
    """``value`` if it has the form ``package.module:attribute``; ValueError naming ``key``."""
    if not is_import_spec(value) or value.count(":") != 1 or not all(
        part.isidentifier() for part in value.replace(":", ".").split(".")
    ):
        raise ValueError(f"{key} must have the form 'package.module:function', got {value!r}")
    return value


def _refuse_another_folders_module(spec: str, key: str, top: str, base_dir: Path) -> None:
    """A module ``top`` imported earlier in this process from elsewhere would be reused from
    ``sys.modules`` although ``base_dir`` holds its own (two configs in two folders, each with
    a ``net.py``, run from one notebook): refused, rather than building the other's model."""
    loaded = sys.modules.get(top)
    if loaded is None:
        return
    # in the order Python takes them; a folder without __init__.py (say, one holding data)
    # loses to a module on sys.path
    own = [p for p in (base_dir / top / "__init__.py", base_dir / f"{top}.py") if p.exists()]
    file = getattr(loaded, "__file__", None)
    if not own:
        _refuse_module_only_importable_from(spec, key, top, base_dir, file)
        return
    if file and Path(file).resolve() == own[0].resolve():
        return
    raise PluginError(
        f"{key} = {spec!r}: module {top!r} is already imported in this process from "
        f"{file or 'no file (built in, or a namespace package)'}, not from the config's folder {base_dir}, "
        "which holds another one: give the modules different names, or run each config in its "
        "own process")


#: Per top-level module name: the config folder it was imported from (that folder was put on
#: sys.path for the import only).
_FOLDER_OF: dict[str, Path] = {}


def _refuse_module_only_importable_from(spec: str, key: str, top: str, base_dir: Path,
                                        file: str | None) -> None:
    """``base_dir`` holds no module ``top``, but this process imported one from another config's
    folder, which is not on sys.path: reusing it from ``sys.modules`` would build the other
    config's plug-in, where a fresh process would not find the module at all (a notebook that
    ran config A, then config B whose folder lacks A's ``net.py``): refused."""
    folder = _FOLDER_OF.get(top)
    if folder is None or folder == base_dir.resolve() or not file \
            or folder not in Path(file).resolve().parents:
        return
    if str(folder) in {str(Path(entry or ".").resolve()) for entry in sys.path}:
        return  # importable from sys.path anyway: a fresh process would find the same module
    raise PluginError(
        f"{key} = {spec!r}: module {top!r} is imported in this process only from another "
        f"config's folder ({file}); the config's folder {base_dir} holds no such module, so a "
        "fresh process would not find it: put the module beside this config, add its folder "
        "to PYTHONPATH, or run each config in its own process")


#: Per module name: the ``__spec__`` this process imported it with and the digest of its file
#: then.
_IMPORTED: dict[str, tuple[Any, bytes | None]] = {}


def _file_digest(module: Any) -> bytes | None:
    """The SHA-256 of the file ``module`` was imported from (None: no readable file)."""
    try:
        return hashlib.sha256(Path(module.__file__).read_bytes()).digest()
    except (AttributeError, TypeError, OSError):
        return None


#: Runs in progress (:func:`one_run`) and the modules checked in them.
_RUNS: list[set[str]] = []


@contextlib.contextmanager
def one_run() -> Iterator[None]:
    """While a run runs: a plug-in module it checked once (unedited since this process
    imported it) is not refused again when its file is edited meanwhile. The run keeps the
    code it started with, every method alike; the next run is refused as before."""
    _RUNS.append(set())
    try:
        yield
    finally:
        _RUNS.pop()


#: Per plug-in module name: the modules of the config's folder that importing it imported
#: (``layers.py`` beside a ``net.py`` that imports it), whose edits it would not see either,
#: each with the module object the plug-in's import bound (what its code still runs), and
#: the plug-in's ``__spec__`` then (a reload binds those of ``sys.modules`` anew).
_COMPANIONS: dict[str, tuple[Any, dict[str, Any]]] = {}


def _folder_modules(names: set[str], base_dir: Path) -> set[str]:
    """Those of the modules ``names`` (in ``sys.modules``) whose file lies in ``base_dir``,
    outside an installed packages folder (a virtual environment beside the config)."""
    out = set()
    for name in names:
        file = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(file, str) and base_dir in Path(file).parents \
                and not {"site-packages", "dist-packages"} & set(Path(file).parts):
            out.add(name)
    return out


def _refuse_edited_module(spec: str, key: str, module_name: str, module: Any,
                          importer: str | None = None) -> None:
    """A module whose file changed since this process imported it would run the code read
    then (a notebook: ``net.py`` edited, the config loaded again): refused, naming the ways
    to run the edited file. Records the module's file the first time it is seen, and again
    when it was imported anew (a reload, or a new import after ``del sys.modules[name]``,
    gives the module a new ``__spec__``). ``importer``: the plug-in module that imported
    this one from the config's folder (it holds the old code too, so both are named)."""
    seen = _IMPORTED.get(module_name)
    if _RUNS and module_name in _RUNS[0] and seen is not None and seen[0] is module.__spec__:
        return  # checked when this run started: edited since, it runs the code read then
    digest = _file_digest(module)
    if seen is None or seen[0] is not module.__spec__:
        _IMPORTED[module_name] = (module.__spec__, digest)
    elif seen[1] != digest:
        by = f" (imported by module {importer!r})" if importer else ""
        forget = (f"del sys.modules[{module_name!r}] first" if importer is None else
                  f"del sys.modules[{module_name!r}] and del sys.modules[{importer!r}] first")
        raise PluginError(
            f"{key} = {spec!r}: {module.__file__}{by} changed since this process imported "
            f"module {module_name!r}, which still runs the code read then: restart the process "
            f"(a notebook's kernel), or forget it with {forget}")
    if _RUNS:
        _RUNS[0].add(module_name)


def import_object(spec: str, key: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Import ``package.module:attribute`` and return the attribute, which must be callable.

    ``base_dir`` (the config's folder) is searched before ``sys.path``. Raises
    :class:`PluginError` naming ``key`` and the cause.
    """
    try:
        check_spec(spec, key)
    except ValueError as err:
        raise PluginError(str(err)) from None
    module_name, _, attr = spec.partition(":")
    top = module_name.partition(".")[0]
    if base_dir is not None:
        _refuse_another_folders_module(spec, key, top, Path(base_dir))
    fresh = top not in sys.modules
    # what importing the module anew imports from the config's folder (none when imported)
    before = set(sys.modules) if base_dir is not None and module_name not in sys.modules \
        else None
    added = base_dir is not None and str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any error raised while importing user code
        where = f" (searched {base_dir} and sys.path)" if base_dir is not None else " (searched sys.path)"
        at = raised_at(err)
        missing = isinstance(err, ModuleNotFoundError) and err.name is not None and \
            (module_name == err.name or module_name.startswith(err.name + "."))
        hint = ("; add its folder to PYTHONPATH (audits of a run directory import plug-ins from "
                "PYTHONPATH only, never from the directory under review)") if missing else ""
        raise PluginError(
            f"{key} = {spec!r}: module {module_name!r} does not import{where}: "
            f"{type(err).__name__}: {err}{at}{hint}"
        ) from err
    finally:
        if added:
            sys.path.remove(str(base_dir))
    if fresh:
        loaded_file = getattr(sys.modules.get(top), "__file__", None)
        folder = Path(base_dir).resolve() if base_dir is not None else None
        if loaded_file and folder is not None and folder in Path(loaded_file).resolve().parents:
            _FOLDER_OF[top] = folder
        else:
            _FOLDER_OF.pop(top, None)
    recorded = _COMPANIONS.get(module_name)
    if before is not None or (recorded is not None and recorded[0] is not module.__spec__):
        # imported anew or reloaded: it bound the companions of sys.modules now
        names = set(recorded[1] if recorded is not None else ())
        if before is not None:
            names |= _folder_modules(set(sys.modules) - before - {module_name}, Path(base_dir))
        _COMPANIONS[module_name] = (module.__spec__, {name: sys.modules[name] for name in names
                                                      if name in sys.modules})
    _refuse_edited_module(spec, key, module_name, module)
    for name, bound in sorted(_COMPANIONS.get(module_name, (None, {}))[1].items()):
        companion = sys.modules.get(name)
        if companion is not bound:
            # forgotten (or imported anew) alone: the plug-in still runs the module it bound
            raise PluginError(
                f"{key} = {spec!r}: module {module_name!r} still runs module {name!r} "
                f"({bound.__file__}) as this process first imported it, since forgotten or "
                f"imported anew: restart the process (a notebook's kernel), or forget "
                f"{module_name!r} too with del sys.modules[{module_name!r}] first")
        _refuse_edited_module(spec, key, name, companion, importer=module_name)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise PluginError(
            f"{key} = {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
            f"has no attribute {attr!r}"
        ) from None
    if not callable(obj):
        raise PluginError(f"{key} = {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


@contextlib.contextmanager
def method_hook(method: str, hook: str,
                passes: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Ask a method's class a declaration (``hook``: e.g. ``"assumptions(cfg)"``): an exception
    that is neither a toolkit error (:func:`~secure_fedora.core.errors.is_user_error`) nor one
    of ``passes`` (the hook's own way to refuse, e.g. ``ValueError`` for ``check_data``)
    becomes a one-line :class:`PluginError` naming ``method``,
    ``hook`` and where it raised, with the original as its cause."""
    try:
        yield
    except Exception as err:
        if is_user_error(err) or isinstance(err, passes):
            raise
        raise PluginError(f"method {method!r}: its {hook} raised {type(err).__name__}: "
                          f"{err}{raised_at(err)}") from err
