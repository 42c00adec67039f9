"""Start and stop the Flower processes of a local deployment, leaving nothing behind.

Every process is started in its own session (so it leads its own process group), with its
output appended to a log file. Stopping a process first records all its descendants (Flower's
SuperLink and SuperNode spawn ``flower-superexec``, which spawns ``flwr-serverapp`` /
``flwr-clientapp``; some of them in new sessions of their own), then sends SIGTERM to the
process group and to every recorded descendant, waits a bounded grace period, and finally
sends SIGKILL to whatever is still alive. :func:`stop_all` does this for all processes at
once: one grace period for all of them, not one each. Only processes started here, or descendants of
them, are ever signalled. Descendants are found through ``/proc`` (Linux).

A process that dies without stopping them (SIGKILL, out of memory) does not leave them
running: each one started from the main thread goes through :data:`_DIE_WITH_PARENT`, which has
Linux send it SIGTERM when that thread ends (``PR_SET_PDEATHSIG``, which follows the starting
thread, not its process: one started from another thread would be stopped when that thread
ends, so it gets no such signal). What such a signal does not reach (processes started in
sessions of their own under them) a process record names (:func:`write_process_record`: pid
and start time of each), so whoever finds the record later can tell whether each one still
runs (:func:`live_recorded`) and stop it (:func:`stop_recorded`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from privacy.errors import ToolkitError

__all__ = [
    "ManagedProcess",
    "ProcessError",
    "ProcessRecordError",
    "RecordedProcess",
    "descendants",
    "descendants_running",
    "describe_wait_status",
    "exit_status",
    "is_alive",
    "live_recorded",
    "read_process_record",
    "recorded",
    "start_time",
    "stop_recorded",
    "stop_all",
    "write_process_record",
]


class ProcessError(ToolkitError, RuntimeError):
    """A managed process failed to start, exited unexpectedly or did not become ready."""


# Runs (``python -I -c``) in front of every managed command, which then replaces it (same pid):
# prctl(PR_SET_PDEATHSIG, SIGTERM) survives the exec, so the command gets SIGTERM when its
# starter dies, even by SIGKILL; a starter already gone (the child was re-parented) ends it at
# once. Done in a launcher, not a preexec_fn, which may deadlock in a process with threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _children_map() -> dict[int, list[int]]:
    """Map parent pid -> child pids from /proc (processes that vanish mid-scan are skipped)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: parse after the last ')'.
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) < 2:
            continue
        children.setdefault(int(rest[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first), found by walking /proc's ppid links."""
    tree = _children_map()
    found: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop(0)
        if child in found:
            continue
        found.append(child)
        stack.extend(tree.get(child, []))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 on), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None
    if there is no such live process. With the pid it names one process: a pid the kernel
    gives again later comes with a later start time."""
    rest = _stat_fields(pid)
    if rest is None or len(rest) < 20 or rest[0] == "Z":
        return None
    try:
        return int(rest[19])
    except ValueError:
        return None


def _runs(pid: int, program: str) -> bool:
    """True if ``pid`` runs ``program``: its command name (/proc/<pid>/stat, the script's
    file name for a script started through its ``#!`` line, kept after it exits) or the file
    name of its command's first argument, or second after a Python interpreter."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if stat[stat.find("(") + 1 : stat.rfind(")")] == program[:15]:  # the kernel keeps 15
        return True
    names = [
        Path(part.decode("utf-8", errors="replace")).name for part in raw.split(b"\0")[:2] if part
    ]
    return bool(names) and (
        names[0] == program
        or (len(names) > 1 and names[0].startswith("python") and names[1] == program)
    )


def descendants_running(pid: int, program: str) -> dict[int, int]:
    """The descendants of ``pid`` that run ``program`` (:func:`_runs`), those that exited
    but are not yet reaped by their parent included: pid -> start time (clock ticks since
    boot; with the pid it names one process)."""
    found: dict[int, int] = {}
    for child in descendants(pid):
        rest = _stat_fields(child)
        if rest is None or len(rest) < 20 or not _runs(child, program):
            continue
        with contextlib.suppress(ValueError):
            found[child] = int(rest[19])
    return found


def exit_status(pid: int, began: int) -> int | None:
    """The wait status (as ``waitpid`` reports it) of ``pid`` when it is a process that
    started at ``began`` (clock ticks since boot, as :func:`start_time` gives) and has exited
    but is not yet reaped by its parent (a zombie: field 52 of /proc/<pid>/stat, Linux 3.5
    on); None while it runs, once it is reaped, or where /proc does not say."""
    rest = _stat_fields(pid)
    if rest is None or len(rest) < 50 or rest[0] != "Z":
        return None
    try:
        return int(rest[49]) if int(rest[19]) == began else None
    except ValueError:
        return None


def describe_wait_status(status: int | None) -> str:
    """A wait status in words: ``killed by signal 9 (SIGKILL)``, ``exited with code 1``;
    ``exit status unknown`` for None (the process was reaped before it was read)."""
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            return f"killed by signal {number}"
        return f"killed by signal {number} ({name})"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


def is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return False
    rest = stat[stat.rfind(")") + 2 :].split()
    return bool(rest) and rest[0] != "Z"


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class ManagedProcess:
    """One started process: its command, log file and ``Popen`` handle."""

    name: str
    command: list[str]
    log_path: Path
    env: Mapping[str, str]
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    # pid -> start time: a pid alone may name another process once this one has exited (the
    # kernel gives pids again), which a stop must not signal
    known_descendants: dict[int, int] = field(default_factory=dict)

    def start(self) -> ManagedProcess:
        """Start the process in a new session, appending stdout and stderr to ``log_path``;
        started from the main thread on Linux, it gets SIGTERM when this process ends, even
        by SIGKILL."""
        if self.popen is not None and self.popen.poll() is None:
            raise ProcessError(f"{self.name} is already running (pid {self.popen.pid})")
        command = list(self.command)
        if (
            sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
        ):
            # the launcher reports a missing command only in the log: refuse it here
            if shutil.which(command[0], path=self.env.get("PATH", os.defpath)) is None:
                raise ProcessError(f"cannot start {self.name} ({command[0]}): no such executable")
            command = [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.name}: {self.shell_line()}\n".encode())
            log.flush()
            try:
                self.popen = subprocess.Popen(  # noqa: S603 - fixed argument lists, no shell
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(self.env),
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as err:
                raise ProcessError(f"cannot start {self.name} ({self.command[0]}): {err}") from err
        self.known_descendants.clear()
        return self

    def shell_line(self) -> str:
        """The command as a POSIX shell takes it, preceded by the environment variables it
        sets or changes from this process's and, with a ``cwd``, a ``cd`` into it: pasted into
        a shell on this host it starts the same process (an operator restarting a SuperNode by
        hand copies it from the log)."""
        changed = sorted(k for k, v in self.env.items() if os.environ.get(k) != v)
        assignments = [f"{k}={shlex.quote(self.env[k])}" for k in changed]
        cd = [] if self.cwd is None else ["cd", shlex.quote(str(self.cwd)), "&&"]
        return " ".join([*cd, *assignments, shlex.join(self.command)])

    @property
    def pid(self) -> int:
        """The process id (ProcessError if never started)."""
        if self.popen is None:
            raise ProcessError(f"{self.name} was never started")
        return self.popen.pid

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        """Exit code, or None while running or if never started."""
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log (empty if there is none)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def refresh_descendants(self) -> list[int]:
        """Remember the current descendants, each by pid and start time, so they can be
        stopped even after re-parenting; returns them (none once the process has exited)."""
        if not self.running():
            return []
        found = descendants(self.pid)
        for pid in found:
            if pid not in self.known_descendants or not self._known_alive(pid):
                began = start_time(pid)
                if began is not None:
                    self.known_descendants[pid] = began
        return found

    def _known_alive(self, pid: int) -> bool:
        """True while the descendant remembered as ``pid`` runs (not a later process given
        the same pid)."""
        began = self.known_descendants.get(pid)
        return began is not None and start_time(pid) == began

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group, the process and every known descendant."""
        if self.popen is None:
            return
        self.refresh_descendants()
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, sig)
            _signal_pid(self.popen.pid, sig)
        for pid in sorted(self.known_descendants):
            if self._known_alive(pid):
                _signal_pid(pid, sig)

    def stop(self, grace: float = 5.0, hard: bool = False) -> None:
        """Stop the process and its descendants: SIGTERM, wait ``grace`` s, then SIGKILL.

        With ``hard=True`` SIGKILL is sent at once (a simulated crash). Always returns with
        the process reaped and every known descendant gone or signalled with SIGKILL.
        """
        _stop_together([self], 0.0 if hard else grace, signal.SIGKILL if hard else signal.SIGTERM)

    def _done(self) -> bool:
        """True once the process is reaped and no known descendant is alive."""
        return (self.popen is None or self.popen.poll() is not None) and not any(
            self._known_alive(p) for p in self.known_descendants
        )


#: How long, after SIGKILL, the processes are given to be gone (the kernel ends them at once;
#: this only bounds a wait on a process stuck in uninterruptible sleep).
KILL_WAIT = 5.0


def _stop_together(processes: Sequence[ManagedProcess], grace: float, first: int) -> None:
    """Send ``first`` to every process (in the order given) and its descendants, wait for all
    of them against one deadline ``grace`` s away, SIGKILL whatever is left, and reap: a stop
    takes at most one grace period (plus :data:`KILL_WAIT`), whatever the number of
    processes."""
    started = [proc for proc in processes if proc.popen is not None]
    for proc in started:
        proc.signal(first)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(proc._done() for proc in started):
        time.sleep(0.05)
    for proc in started:
        proc.signal(signal.SIGKILL)
    end = time.monotonic() + KILL_WAIT
    for proc in started:
        assert proc.popen is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=max(0.0, end - time.monotonic()))
    while time.monotonic() < end and not all(proc._done() for proc in started):
        time.sleep(0.05)


def stop_all(processes: Sequence[ManagedProcess], grace: float = 5.0) -> None:
    """Stop ``processes`` and their descendants together: SIGTERM to all, one shared grace
    period of ``grace`` s, then SIGKILL to what is left, every process reaped; a stop takes
    one grace period, not one per process. Never raises for an already-dead process."""
    for proc in processes:
        proc.refresh_descendants()
    # Signalled in reverse start order (SuperNodes, then the SuperLink and its ServerApp), as
    # they were stopped one by one before; the order is not needed for a clean state: the
    # signals go out within milliseconds of each other, and every file a party keeps (the
    # ServerApp's checkpoint, a node's release journal and ledger) is written atomically and
    # survives any of them being killed first (the crash-and-resume tests kill each alone).
    _stop_together(list(reversed(list(processes))), grace, signal.SIGTERM)


# -- the record of a deployment's processes ---------------------------------------------------
# A deployment whose starter died without stopping it (SIGKILL, out of memory) may leave
# processes that no death signal reaches (those its processes start in sessions of their
# own). The record names every process a deployment started or saw started under them, so the
# next deployment in the same place finds the ones still running.

#: The ``format`` of a process record file.
RECORD_FORMAT = "secure-fedora-processes/1"


class ProcessRecordError(ProcessError):
    """A process record file that cannot be read as one (it is left as it is)."""


@dataclass(frozen=True)
class RecordedProcess:
    """One process as a record names it: its pid and start time (which together name this
    process, not a later one the kernel gives the same pid), its role and its command."""

    name: str
    pid: int
    start_time: int
    command: tuple[str, ...]

    def alive(self) -> bool:
        """True while this very process runs: its pid is live with the recorded start time."""
        return start_time(self.pid) == self.start_time

    def to_json(self) -> dict[str, object]:
        """The record's entry for this process."""
        return {
            "name": self.name,
            "pid": self.pid,
            "start_time": self.start_time,
            "command": list(self.command),
        }


def recorded(name: str, pid: int, command: Sequence[str] | None = None) -> RecordedProcess | None:
    """``pid`` as a record names it now (``command``, else its /proc command line); None if
    there is no such live process."""
    began = start_time(pid)
    if began is None:
        return None
    if command is None:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        command = [part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part]
    return RecordedProcess(name, pid, began, tuple(command))


def write_process_record(
    path: Path, owner: RecordedProcess, processes: Sequence[RecordedProcess]
) -> None:
    """Write the record of ``owner`` (the process that started the others) and
    ``processes`` to ``path`` atomically: a reader finds the previous record or this one,
    never a part."""
    doc = {
        "format": RECORD_FORMAT,
        "owner": owner.to_json(),
        "processes": [proc.to_json() for proc in processes],
    }
    # one temporary name per process and thread: two writers never share one
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(doc, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _entry(value: object, where: str) -> RecordedProcess:
    if not isinstance(value, dict) or set(value) != {"name", "pid", "start_time", "command"}:
        raise ValueError(f"{where} is not an entry with name, pid, start_time and command")
    name, pid, began, command = (value["name"], value["pid"], value["start_time"], value["command"])
    if (
        not isinstance(name, str)
        or not isinstance(command, list)
        or not all(isinstance(part, str) for part in command)
    ):
        raise ValueError(f"{where} has a name or command that is not text")
    for key, number, least in (("pid", pid, 1), ("start_time", began, 0)):
        if isinstance(number, bool) or not isinstance(number, int) or number < least:
            raise ValueError(f"{where} has {key} {number!r}, not an integer >= {least}")
    return RecordedProcess(name, pid, began, tuple(command))


def read_process_record(path: Path) -> tuple[RecordedProcess, list[RecordedProcess]] | None:
    """The owner and processes the record at ``path`` names; None if there is no record.
    :class:`ProcessRecordError`, naming the file and leaving it as it is, if it is not a
    record this module wrote."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ProcessRecordError(f"the process record {path} cannot be read ({err})") from None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise ValueError(f'it has no "format": {json.dumps(RECORD_FORMAT)}')
        if not isinstance(doc.get("processes"), list):
            raise ValueError('its "processes" is not a list')
        owner = _entry(doc.get("owner"), "its owner")
        processes = [_entry(e, f"process entry {i}") for i, e in enumerate(doc["processes"])]
    except ValueError as err:  # json.JSONDecodeError is one
        raise ProcessRecordError(
            f"the process record {path} is not one this toolkit wrote ({err}); it was left as "
            "it is: check with `ps` that no process it names still runs, then delete it"
        ) from None
    return owner, processes


def live_recorded(processes: Sequence[RecordedProcess]) -> list[RecordedProcess]:
    """The recorded processes still running (same pid and start time) and every live
    descendant of them, each once."""
    live = [proc for proc in processes if proc.alive()]
    seen = {proc.pid for proc in live}
    for proc in list(live):
        for pid in descendants(proc.pid):
            child = recorded(f"{proc.name} child", pid)
            if pid not in seen and child is not None:
                seen.add(pid)
                live.append(child)
    return live


def stop_recorded(
    processes: Sequence[RecordedProcess], grace: float = 5.0
) -> list[RecordedProcess]:
    """Stop the recorded processes still running and their descendants: SIGTERM to each,
    one shared grace period of ``grace`` s, SIGKILL to what is left, then up to
    :data:`KILL_WAIT` s for them to be gone. A process is signalled only while its pid has
    the recorded start time (a pid given again to another process is left alone). Returns
    the ones still running afterwards (none but a process stuck in the kernel)."""
    targets = live_recorded(processes)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        for proc in targets:
            if proc.alive():
                _signal_pid(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(proc.alive() for proc in targets):
            time.sleep(0.05)
    return [proc for proc in targets if proc.alive()]
