"""A run whose ServerApp process exits without finishing it (SIGKILL, out of memory) is stopped
as soon as ``LocalFederation.follow`` sees the process gone, not once Flower's ServerApp
heartbeat runs out (about 60 s), and ``deploy local`` reports it naming the exit; a run whose
ServerApp exits after finishing it is returned with its own status.

Here the SuperLink is a stand-in that starts ``flwr-serverapp`` scripts under it (and, as
Flower's ``flower-superexec`` does, never reaps them), and the ``flwr`` CLI is stubbed: no
Flower process runs, so the tests take seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from secure_fedora.runtimes.flower import local as local_module
from secure_fedora.runtimes.flower.local import LocalFederation, ServerAppExited
from secure_fedora.runtimes.flower.processes import descendants_running, describe_wait_status
from secure_fedora.runtimes.flower.protocol import DeployError
from tests.secure_fedora.runtimes.flower.deploy_support import CheckpointedStandIn

# The stand-in SuperLink: starts one ServerApp per "<when>:<mode>" argument, "start" ones at
# once, "go" ones once the run is submitted (the file ``go`` exists) and "late" ones 3 s
# later; never reaps them.
SUPERLINK = """\
import pathlib, subprocess, sys, time
root = pathlib.Path(sys.argv[1])
specs = [a.split(":") for a in sys.argv[2:]]
def start(when):
    return [subprocess.Popen([str(root / "flwr-serverapp"), m]) for w, m in specs if w == when]
children = start("start")
while not (root / "go").exists():
    time.sleep(0.05)
children += start("go")
time.sleep(3.0)
children += start("late")
time.sleep(120)
"""

# The stand-in ServerApp: "kill" kills itself with SIGKILL, "exit0" exits 0 without finishing
# the run, "finish" marks the run finished (as a ServerApp reports its end) and exits 0;
# "old-kill" is an earlier run's ServerApp that dies once this run was submitted.
SERVERAPP = """\
import os, pathlib, signal, sys, time
root = pathlib.Path(__file__).parent
mode = sys.argv[1]
if mode == "old-kill":
    while not (root / "go").exists():
        time.sleep(0.05)
time.sleep(2.0 if mode == "finish-late" else 0.5)
if mode.endswith("kill"):
    os.kill(os.getpid(), signal.SIGKILL)
if mode.startswith("finish"):
    (root / "finished").write_text("")
sys.exit(0)
"""


class Stand:
    """A LocalFederation whose SuperLink is the stand-in and whose ``flwr`` calls are stubbed:
    ``flwr run`` submits run 7 (the SuperLink then starts its ServerApp), ``flwr ls`` says
    ``running`` until the file ``finished`` exists, ``flwr stop`` stops an unfinished run
    (else fails, as Flower's does for a finished run); ``flwr log --stream`` ends
    ``stream_delay`` s after the run finished."""

    def __init__(
        self,
        root: Path,
        monkeypatch: pytest.MonkeyPatch,
        *specs: str,
        stream_delay: float = 0.0,
        finish_on_stop: bool = False,
    ) -> None:
        self.root = root
        self.calls: list[tuple[str, ...]] = []
        self.finish_on_stop = finish_on_stop
        root.mkdir()
        for name, body in (("superlink.py", SUPERLINK), ("flwr-serverapp", SERVERAPP)):
            (root / name).write_text(f"#!{sys.executable}\n{body}")
            (root / name).chmod(0o755)
        stream = root / "flwr"
        stream.write_text(
            f"#!/bin/sh\nwhile [ ! -e '{root}/finished' ] && "
            f"[ ! -e '{root}/stopped' ]; do sleep 0.05; done\n"
            f"sleep {stream_delay}\n"
        )
        stream.chmod(0o755)
        monkeypatch.setattr(local_module, "_flower_bin", lambda name: str(stream))
        self.fed = LocalFederation(root / "w", 3)
        monkeypatch.setattr(self.fed, "flwr", self.flwr)
        monkeypatch.setattr(self.fed, "write_run_config", lambda *a, **k: root / "run.toml")
        self.fed.superlink = self.fed._spawn(
            "superlink",
            [sys.executable, str(root / "superlink.py"), str(root), *specs],
            root / "w" / "flwr" / "superlink",
        )
        early = sum(spec.startswith("start:") for spec in specs)
        deadline = time.monotonic() + 30
        while len(descendants_running(self.fed.superlink.pid, "flwr-serverapp")) < early:
            assert time.monotonic() < deadline, "the stand-in SuperLink started no ServerApp"
            time.sleep(0.05)

    def status(self) -> str:
        if (self.root / "stopped").exists():
            return "finished:stopped"
        return "finished:completed" if (self.root / "finished").exists() else "running"

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        out: dict[str, Any] = {"success": True}
        code = 0
        if args[0] == "run":
            (self.root / "go").write_text("")
            out["run-id"] = 7
        elif args[0] == "ls":
            out["runs"] = [{"status": self.status()}]
        elif args[0] == "stop":
            if self.finish_on_stop:  # the run finished on its own just before
                (self.root / "finished").write_text("")
            if self.status() == "running":
                (self.root / "stopped").write_text("")
            else:
                out, code = {"success": False}, 1
        return subprocess.CompletedProcess(list(args), code, json.dumps(out), "")

    def stops(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] == "stop"]


def _follow(stand: Stand) -> tuple[str | ServerAppExited, float]:
    """Submit run 7 and follow it: its status (or the ServerAppExited raised) and the seconds
    it took."""
    started = time.monotonic()
    try:
        run_id = stand.fed.submit(None, stand.root / "res")  # type: ignore[arg-type]
        try:
            return stand.fed.follow(run_id, timeout=60), time.monotonic() - started
        except ServerAppExited as err:
            return err, time.monotonic() - started
    finally:
        stand.fed.stop()


def test_a_run_whose_serverapp_was_killed_is_stopped_at_once_naming_the_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp kills itself with SIGKILL 0.5 s into the run: ``follow`` waited for the
    run's end (Flower marks it failed once the ServerApp's heartbeat runs out, ~60 s; here
    never, so until the timeout); it now stops the run (``flwr stop``) within seconds and
    raises ServerAppExited naming the signal and the run's status."""
    stand = Stand(tmp_path / "s", monkeypatch, "go:kill")
    result, seconds = _follow(stand)
    assert isinstance(result, ServerAppExited), result
    assert seconds < 15, seconds
    assert stand.stops() == [("stop", "7", local_module.CONNECTION_NAME)]
    assert (result.run_id, result.status, result.how) == (
        7,
        "finished:stopped",
        "killed by signal 9 (SIGKILL)",
    )
    assert str(result) == (
        "the ServerApp process of run 7 exited (killed by signal 9 "
        "(SIGKILL)) while the run was unfinished; the run was stopped "
        "(status 'finished:stopped')"
    )


def test_a_serverapp_that_exits_after_finishing_its_run_is_not_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ServerApp exits at the end of a successful run too; whether its log stream ends at
    once or only seconds later, the run's own status is returned and the run is not
    stopped."""
    for delay in (0.0, 4.0):
        stand = Stand(tmp_path / f"s{delay}", monkeypatch, "go:finish", stream_delay=delay)
        assert _follow(stand)[0] == "finished:completed"
        assert stand.stops() == []


def test_a_run_that_finishes_while_its_dead_serverapp_is_being_stopped_keeps_its_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp exited, the run still read ``running``, and it finished on its own
    before ``flwr stop`` (which then fails): its true status is returned, nothing raised."""
    stand = Stand(tmp_path / "s", monkeypatch, "go:exit0", finish_on_stop=True)
    assert _follow(stand)[0] == "finished:completed"
    assert len(stand.stops()) == 1


def test_an_earlier_runs_serverapp_dying_does_not_end_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ServerApp that ran before the run was submitted (an earlier run's, still exiting)
    dies during the run, before the run's own ServerApp started: the run is not stopped."""
    stand = Stand(tmp_path / "s", monkeypatch, "start:old-kill", "late:finish-late")
    assert _follow(stand)[0] == "finished:completed"
    assert stand.stops() == []


def test_describe_wait_status() -> None:
    assert describe_wait_status(9) == "killed by signal 9 (SIGKILL)"
    assert describe_wait_status(1 << 8) == "exited with code 1"
    assert describe_wait_status(None) == "exit status unknown"


def test_deploy_local_reports_a_serverapp_that_exited_with_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``deploy local`` reports a run stopped because its ServerApp exited as a run that
    ended without a failure record, naming the exit and the resume, in one DeployError."""
    from secure_fedora.runtimes.flower.cli import default_config_path
    from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT

    class ExitedFederation(CheckpointedStandIn):
        outcome = ServerAppExited(7, "finished:stopped", "killed by signal 9 (SIGKILL)")

    monkeypatch.setattr(local_module, "LocalFederation", ExitedFederation)
    work = tmp_path / "w"
    with pytest.raises(DeployError) as err:
        local_module.deploy_local(default_config_path(), 3, work)
    assert not isinstance(err.value, ServerAppExited)
    assert str(err.value) == (
        "run 7 ended with status 'finished:stopped' without a failure record (its ServerApp "
        "process exited, killed by signal 9 (SIGKILL), while the run was unfinished; the run "
        "was stopped at once); the same command with --resume continues the run from its "
        f"checkpoint {work.resolve() / 'results' / SERVER_CHECKPOINT}; see "
        f"{work.resolve() / 'logs'}"
    )
