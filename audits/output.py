"""Writing a user-named report file (``audit ... --json PATH``) without harming what is there.

The rule, for every command that writes a file the user names:

- PATH must not be a directory, a symbolic link or anything but a regular file, nor part of a
  run directory's record (its results.json, config.toml, anchor.json, rounds.csv, or a file
  under its ledgers/, keys/ or checkpoints/), even with ``--force``;
- an existing regular file is replaced only when it is a previous, unedited report of the
  same command written by this module, or when the user passed ``--force``. The writer seals
  every report: a JSON report carries ``"written_by": {"tool": "secure-fedora", "command":
  <command>, "sha256": <SHA-256 of the canonical JSON of every other key>}`` (:data:`SEAL_KEY`),
  the HTML report ends with a comment line holding the SHA-256 of everything before it. A file
  with a report's keys or header but without a matching seal (hand-made, edited, or written
  before the seal existed) is not recognised;
- the new content is written to a temporary file in PATH's folder and renamed over PATH, so
  PATH holds the old or the new report, never a mix, and a link put in PATH's place after the
  check is replaced, not followed. A replaced file keeps its permission bits; a new file gets
  0666 under the umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from secure_fedora.core.config import ConfigError, check_path_argument
from secure_fedora.core.files import atomic_write_with

__all__ = ["REPORT_KEYS", "SEAL_KEY", "check_output_file", "is_previous_report",
           "output_refusal", "seal_document", "seal_report", "write_output_file"]

#: Top-level keys by which each command's JSON report is recognised (the first ones of the
#: document it writes); canary, white-box and replay reports also carry ``"audit": <name>``.
REPORT_KEYS: Mapping[str, frozenset[str]] = {
    "verify": frozenset({"run_dir", "ok", "rel_tol", "independent_accountant", "allowlist",
                         "checks", "clients", "findings"}),
    "report": frozenset({"report_version", "identity", "verification", "empirical_audits"}),
    "leakage": frozenset({"q", "clip_norm", "noise_multiplier", "modes"}),
    "canary": frozenset({"audit", "claim_epsilon", "certifiable_max", "lower_bound", "verdict"}),
    "whitebox": frozenset({"audit", "claim_epsilon", "certifiable_max", "lower_bound",
                           "verdict"}),
    "replay": frozenset({"audit", "claim_epsilon", "certifiable_max", "lower_bound", "verdict",
                         "trials", "correct"}),
}

#: How ``audit report``'s report.html begins (``audits.report.render_html``).
HTML_REPORT_START = b'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">\n<title>Privacy' \
    b" compliance report: "

#: The top-level key of a JSON report that says this module wrote it (see the module docstring).
SEAL_KEY = "written_by"
SEAL_TOOL = "secure-fedora"
_HTML_SEAL_START = b"\n<!-- secure-fedora audit report sha256="
_HTML_SEAL_END = b" -->\n"

#: A previous report larger than this is not read to recognise it (``--force`` replaces it).
MAX_RECOGNISED_BYTES = 256 * 2**20


def _canonical_sha256(doc: Mapping[str, Any]) -> str:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_report(text: str, command: str) -> str:
    """``text`` (``command``'s report) with the writer's seal: for a JSON report the document
    with :data:`SEAL_KEY` added (SHA-256 of the canonical JSON of the rest; dumped with indent
    2), for ``"report.html"`` the text followed by a comment line holding the SHA-256 of the
    text. :func:`is_previous_report` recognises exactly such files. ValueError for a JSON report
    that is not a strict-JSON object or already has :data:`SEAL_KEY`."""
    if command == "report.html":
        digest = hashlib.sha256(text.encode()).hexdigest()
        return text + (_HTML_SEAL_START + digest.encode() + _HTML_SEAL_END).decode()
    return seal_document(json.loads(text), command)


def seal_document(doc: Any, command: str) -> str:
    """:func:`seal_report` of a JSON report given as the document ``json.loads`` returns for
    it (string keys, lists, no NaN or infinity), serialised once: equal to
    ``seal_report(json.dumps(doc), command)``, without parsing a text that was only dumped to
    be parsed again. ValueError as :func:`seal_report`'s."""
    if not isinstance(doc, dict) or SEAL_KEY in doc:
        raise ValueError(f"a {command} report must be a JSON object without {SEAL_KEY!r}")
    seal = {"tool": SEAL_TOOL, "command": command, "sha256": _canonical_sha256(doc)}
    return json.dumps({**doc, SEAL_KEY: seal}, indent=2, allow_nan=False)


def _sealed_html(data: bytes) -> bool:
    if not data.startswith(HTML_REPORT_START) or not data.endswith(_HTML_SEAL_END):
        return False
    body, sep, tail = data[:-len(_HTML_SEAL_END)].rpartition(_HTML_SEAL_START)
    return bool(sep) and tail == hashlib.sha256(body).hexdigest().encode()


def is_previous_report(path: Path, command: str) -> bool:
    """True when ``path`` is a regular file that :func:`seal_report` sealed as ``command``'s
    report and that was not edited since: a JSON object with the keys of ``command``'s report
    (:data:`REPORT_KEYS`) and a :data:`SEAL_KEY` naming ``command`` whose digest matches the
    rest, or for ``"report.html"`` an HTML report of ``audit report`` ending in its digest
    line. False for anything else, unreadable or not (never raises for the file's content)."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECOGNISED_BYTES:
            return False
        data = path.read_bytes()
        if command == "report.html":
            return _sealed_html(data)
        doc: Any = json.loads(data)
        if not isinstance(doc, dict) or not REPORT_KEYS[command] <= doc.keys():
            return False
        if command in ("canary", "whitebox", "replay") and doc.get("audit") != command:
            return False
        seal = doc.pop(SEAL_KEY, None)
        return isinstance(seal, dict) and seal.get("tool") == SEAL_TOOL \
            and seal.get("command") == command and seal.get("sha256") == _canonical_sha256(doc)
    except (OSError, ValueError, RecursionError):
        return False


#: A run directory's own files (``results.json`` and the rest), and its folders whose files
#: are the run's record; a folder holding one of :data:`_RUN_MARKERS` is a run directory.
_RUN_FILES = frozenset({"results.json", "config.toml", "anchor.json", "rounds.csv"})
_RUN_FOLDERS = frozenset({"ledgers", "keys", "checkpoints"})
_RUN_MARKERS = ("results.json", "anchor.json", "config.toml")


def _is_run_dir(folder: Path, but: str = "") -> bool:
    return any((folder / m).is_file() for m in _RUN_MARKERS if m != but) \
        or (folder / "ledgers").is_dir()


def _run_record(path: Path) -> Path | None:
    """The run directory whose record ``path`` would be (one of its own files beside another
    of them, or a file under its ``ledgers``, ``keys`` or ``checkpoints``), else None: a
    report written there would replace what an audit checks (``--force`` or not)."""
    path = path.absolute()
    if path.name in _RUN_FILES and _is_run_dir(path.parent, but=path.name):
        return path.parent
    for folder in path.parents:
        if folder.name in _RUN_FOLDERS and _is_run_dir(folder.parent):
            return folder.parent
    return None


def output_refusal(path: Path, flag: str, command: str, force: bool) -> str | None:
    """Why ``path`` (named by ``flag`` in the message) may not receive ``command``'s report
    by the module's rule, or None when it may."""
    record = _run_record(path)
    if record is not None:
        return (f"{flag} {path} is part of run directory {record}'s record (its results,"
                " config, anchor, ledgers, keys or checkpoints): a report never replaces it,"
                f" even with --force; name a file outside it or under {record / 'audit'}")
    try:
        info = path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # nothing there to harm; writing says why
        return None
    except OSError as err:
        return f"{flag} {path}: cannot be checked ({err.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return (f"{flag} {path} is a symbolic link: name the file itself (a report never "
                "replaces what a link points to)")
    if stat.S_ISDIR(info.st_mode):
        return f"{flag} {path} is a directory: name a file"
    if not stat.S_ISREG(info.st_mode):
        return f"{flag} {path} is not a regular file (a device, pipe or socket): name a file"
    if not force and not is_previous_report(path, command):
        what = "HTML report of `audit report`" if command == "report.html" else \
            f"`audit {command}` JSON report"
        return (f"{flag} {path} exists and is not a previous {what}: name another file, or "
                "pass --force to replace it")
    return None


def check_output_file(value: str, flag: str, command: str, force: bool = False) -> Path:
    """``value`` as the path of ``command``'s report, checked before anything runs.

    ConfigError naming ``flag`` when the path is empty, only spaces or holds NUL, its folder
    is not a directory, or it is refused by the module's rule (a directory, a link, a
    non-regular file, or without ``force`` an existing file that is not a previous report of
    ``command``)."""
    path = check_path_argument(value, flag, "file")
    if not path.absolute().parent.is_dir():
        raise ConfigError(f"{flag} {path}: its folder {path.absolute().parent} is not a "
                          "directory (create it first)")
    why = output_refusal(path, flag, command, force)
    if why is not None:
        raise ConfigError(why)
    return path


def _creation_mode() -> int:
    """0o666 under the process umask, read without changing it where the system shows it
    (Linux's /proc/self/status): setting the umask to read it would, for a moment, apply to
    files that other threads of the process create."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_output_file(path: Path, text: str | dict[str, Any], flag: str, command: str,
                      force: bool = False,
                      error: Callable[[str], Exception] = ConfigError) -> None:
    """Write ``text``, sealed by :func:`seal_report` (a JSON document given as a dict: by
    :func:`seal_document`), to ``path`` atomically (a temporary file in its folder, renamed
    over it), after checking ``path`` again by the module's rule: the file may have changed
    while the audit ran. A replaced file keeps its permission bits, a new one gets 0666 under
    the umask. ``error`` (ConfigError by default) when refused."""
    why = output_refusal(path, flag, command, force)
    if why is not None:
        raise error(why)
    sealed = (seal_document(text, command) if isinstance(text, dict)
              else seal_report(text, command)).encode()
    try:
        mode = stat.S_IMODE(path.lstat().st_mode)  # a regular file: output_refusal saw to it
    except FileNotFoundError:
        mode = _creation_mode()

    def write(fh: Any) -> None:
        os.fchmod(fh.fileno(), mode)
        fh.write(sealed)

    atomic_write_with(path, write)
