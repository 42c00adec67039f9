"""Durable file replacement: a crash leaves the old or the new content, never a mix."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

__all__ = ["NON_FINITE_KEY", "atomic_write_bytes", "atomic_write_text", "atomic_write_with",
           "finite_document", "json_pointer", "json_pointer_tokens", "remove_interrupted_writes",
           "strict_json"]

#: The top-level key under which :func:`finite_document` lists the values it replaced.
NON_FINITE_KEY = "non_finite_values"


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` durably: a 0600 temporary file in the same directory
    (mkstemp; ``mode``, when given, is set on it before anything is written, e.g. 0644 for a
    public file), fsynced, renamed over ``path``, then the directory fsynced. A crash leaves
    the old or the new content, never a mix."""
    atomic_write_with(path, lambda fh: fh.write(data), mode)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old or the new content, never a mix."""
    atomic_write_bytes(path, text.encode())


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write_with(path: Path, write: Callable[[Any], None], mode: int | None = None) -> None:
    """As :func:`atomic_write_bytes`, with ``write(fh)`` streaming the content into the
    temporary file (no in-memory copy of a multi-GB checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_interrupted_writes(path: Path) -> list[Path]:
    """Delete the temporary files that atomic writes of ``path`` killed before their rename
    left beside it (a process killed while streaming a checkpoint leaves a partial copy, up to
    the checkpoint's size, that nothing reads); ``path`` itself is untouched. Call only while
    no other process writes ``path``. Returns the files removed."""
    if not path.parent.is_dir():
        return []
    removed = []
    for leftover in path.parent.glob(f"{glob_escape(_temporary_prefix(path))}*"):
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()
            removed.append(leftover)
    return removed


def json_pointer(tokens: Sequence[str | int]) -> str:
    """The JSON Pointer (RFC 6901) of the value reached by ``tokens`` (keys and list indices)
    from the document's root: ``"/" + token`` for each, with ``~`` escaped as ``~0`` and ``/``
    as ``~1``, so a key holding ``.``, ``/`` or ``[0]`` is never read as nesting; ``""`` is the
    root."""
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


def json_pointer_tokens(pointer: str) -> list[str]:
    """The reference tokens of a JSON Pointer (inverse of :func:`json_pointer`; list indices
    come back as their decimal strings). Raises ValueError for a non-empty pointer that does
    not start with ``/``."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ValueError(f"not a JSON Pointer (RFC 6901): {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _replace_non_finite(value: Any, path: tuple[str | int, ...], found: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found[json_pointer(path)] = repr(value)  # "nan", "inf" or "-inf"
        return None
    if isinstance(value, dict):
        return {k: _replace_non_finite(v, (*path, str(k)), found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_non_finite(v, (*path, i), found) for i, v in enumerate(value)]
    return value


def finite_document(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every NaN or infinite float replaced by ``None`` (JSON ``null``), and,
    when any was replaced, ``doc[NON_FINITE_KEY]`` mapping each one's JSON Pointer
    (:func:`json_pointer`, e.g. ``/methods/m/extra/score``, ``/a/per_client/2``; a key
    ``"a.b"`` is ``/a.b``, distinct from ``/a/b``) to the value it held (``"nan"``,
    ``"inf"``, ``"-inf"``), so that a reader of the strict JSON knows why a figure is null.
    A document without such values is returned equal."""
    found: dict[str, str] = {}
    out = _replace_non_finite(doc, (), found)
    if found:
        out[NON_FINITE_KEY] = {**out.get(NON_FINITE_KEY, {}), **found} \
            if isinstance(out.get(NON_FINITE_KEY), dict) else found
    return out


def strict_json(doc: dict[str, Any], indent: int | None = 2) -> str:
    """``doc`` as strict JSON (no ``NaN``/``Infinity`` tokens, which most JSON readers refuse):
    :func:`finite_document` of it, dumped with ``allow_nan=False``."""
    return json.dumps(finite_document(doc), indent=indent, allow_nan=False)

