"""Writing a user-named report file (``audit ... --json PATH``) without harming what is there.

The rule, for every command that writes a file the user names:

- PATH must not be a directory, a symbolic link or anything but a regular file;
- an existing regular file is replaced only when it is a previous JSON report of the same
  command (the same top-level keys, and for the canary and white-box audits the same
  ``"audit"``), or when the user passed ``--force``;
- the new content is written to a temporary file in PATH's folder and renamed over PATH, so
  PATH holds the old or the new report, never a mix, and a link put in PATH's place after the
  check is replaced, not followed.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_fedora.core.config import ConfigError, check_path_argument
from secure_fedora.core.files import atomic_write_with

__all__ = ["REPORT_KEYS", "check_output_file", "is_previous_report", "output_refusal",
           "write_output_file"]

#: Top-level keys by which each command's JSON report is recognised (the first ones of the
#: document it writes); canary and white-box reports also carry ``"audit": <name>``.
REPORT_KEYS: Mapping[str, frozenset[str]] = {
    "verify": frozenset({"run_dir", "ok", "rel_tol", "independent_accountant", "allowlist",
                         "checks", "clients", "findings"}),
    "report": frozenset({"report_version", "identity", "verification", "empirical_audits"}),
    "leakage": frozenset({"q", "clip_norm", "noise_multiplier", "modes"}),
    "canary": frozenset({"audit", "claim_epsilon", "certifiable_max", "lower_bound", "verdict"}),
    "whitebox": frozenset({"audit", "claim_epsilon", "certifiable_max", "lower_bound",
                           "verdict"}),
}

#: How ``audit report``'s report.html begins (``audits.report.render_html``).
HTML_REPORT_START = b'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">\n<title>Privacy' \
    b" compliance report: "

#: A previous report larger than this is not read to recognise it (``--force`` replaces it).
MAX_RECOGNISED_BYTES = 256 * 2**20


def is_previous_report(path: Path, command: str) -> bool:
    """True when ``path`` is a regular file holding a JSON object with the keys of
    ``command``'s report (see :data:`REPORT_KEYS`), or for ``"report.html"`` an HTML report of
    ``audit report``; False for anything else, unreadable or not (never raises for the
    file's content)."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECOGNISED_BYTES:
            return False
        if command == "report.html":
            with path.open("rb") as fh:
                return fh.read(len(HTML_REPORT_START)) == HTML_REPORT_START
        doc: Any = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    keys = REPORT_KEYS[command]
    if not isinstance(doc, dict) or not keys <= doc.keys():
        return False
    return command not in ("canary", "whitebox") or doc.get("audit") == command


def output_refusal(path: Path, flag: str, command: str, force: bool) -> str | None:
    """Why ``path`` (named by ``flag`` in the message) may not receive ``command``'s report
    by the module's rule, or None when it may."""
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


def write_output_file(path: Path, text: str, flag: str, command: str,
                      force: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in its folder, renamed over
    it; mode as a new file under the umask), after checking ``path`` again by the module's
    rule: the file may have changed while the audit ran. ConfigError when it is refused."""
    why = output_refusal(path, flag, command, force)
    if why is not None:
        raise ConfigError(why)
    mode = _creation_mode()

    def write(fh: Any) -> None:
        os.fchmod(fh.fileno(), mode)
        fh.write(text.encode())

    atomic_write_with(path, write)
