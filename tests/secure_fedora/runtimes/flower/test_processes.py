"""Tests of the record of a deployment's processes (``processes.json``): what it names, how
it tells a live process from a pid given again, and how ``deploy local`` treats a workdir
whose record names processes still running (refused, or ``--stop-stale``)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from secure_fedora.core.errors import run_command
from secure_fedora.runtimes.flower import local as local_module
from secure_fedora.runtimes.flower.cli import register
from secure_fedora.runtimes.flower.local import PROCESS_RECORD, LocalFederation
from secure_fedora.runtimes.flower.processes import (
    ProcessRecordError,
    RecordedProcess,
    descendants,
    read_process_record,
    recorded,
    start_time,
    write_process_record,
)
from tests.secure_fedora.runtimes.flower.deploy_support import TINY, file_tree

# a child that says it is ready once it ignores SIGTERM, then sleeps
STUBBORN = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\ntime.sleep(120)\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-fedora")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; every one still there is killed and reaped afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _sleeper(children: list[subprocess.Popen[bytes]], stubborn: bool = False
             ) -> subprocess.Popen[bytes]:
    if stubborn:
        proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    else:
        proc = subprocess.Popen(["sleep", "120"])
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != b"sleep\x00120\x00":
            assert time.monotonic() < deadline, "sleep did not start"
            time.sleep(0.01)
    children.append(proc)
    return proc


def _dead_owner() -> RecordedProcess:
    """The owner of a record whose deployment was killed: a process that has ended."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return RecordedProcess("deploy", gone.pid, 1, ("secure-fedora", "deploy", "local"))


def _stale_workdir(tmp_path: Path, processes: list[RecordedProcess],
                   owner: RecordedProcess | None = None) -> Path:
    work = tmp_path / "w"
    work.mkdir()
    write_process_record(work / PROCESS_RECORD, owner or _dead_owner(), processes)
    return work


class Started(Exception):
    """Raised where the deployment would start its processes."""


@pytest.fixture
def no_federation(monkeypatch: pytest.MonkeyPatch) -> None:
    """`deploy local` stops where it would start the Flower processes (raises Started)."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise Started

    monkeypatch.setattr(local_module, "LocalFederation", refuse)


def _deploy_args(tmp_path: Path, work: Path, *flags: str) -> argparse.Namespace:
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(TINY))
    return _parser().parse_args(["deploy", "local", "--config", str(config), "--workdir",
                                 str(work), "--quiet", *flags])


# --------------------------------------------------------------------------- the record


def test_start_time_tells_a_process_from_a_later_one_with_its_pid(
        children: list[subprocess.Popen[bytes]]) -> None:
    proc = _sleeper(children)
    began = start_time(proc.pid)
    assert began is not None and began == start_time(proc.pid)
    entry = recorded("sleeper", proc.pid)
    assert entry is not None and entry.alive() and entry.command == ("sleep", "120")
    # the same pid with another start time: a process the kernel gave the pid to later
    assert not RecordedProcess("sleeper", proc.pid, began + 1, ("sleep",)).alive()
    proc.kill()
    proc.wait()
    assert start_time(proc.pid) is None and not entry.alive()


def test_a_record_reads_back_what_was_written_and_leaves_no_temporary_file(
        tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    owner = recorded("deploy", os.getpid())
    entry = recorded("superlink", _sleeper(children).pid, ["flower-superlink", "--port", "1"])
    assert owner is not None and entry is not None
    path = tmp_path / PROCESS_RECORD
    write_process_record(path, owner, [entry])
    assert read_process_record(path) == (owner, [entry])
    write_process_record(path, owner, [])  # replaced whole
    assert read_process_record(path) == (owner, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROCESS_RECORD]
    assert read_process_record(tmp_path / "none.json") is None


@pytest.mark.parametrize("text", [
    "{not json", "[]", '{"format": "other", "owner": {}, "processes": []}',
    '{"format": "secure-fedora-processes/1", "owner": {"name": "d", "pid": 5, "start_time": 1, '
    '"command": []}, "processes": [{"name": "s", "pid": -3, "start_time": 1, "command": []}]}',
    '{"format": "secure-fedora-processes/1", "owner": {"name": "d", "pid": 5, "start_time": 1, '
    '"command": []}, "processes": [{"name": "s", "pid": true, "start_time": 1, "command": []}]}',
])
def test_a_corrupt_record_is_refused_by_name(tmp_path: Path, text: str) -> None:
    path = tmp_path / PROCESS_RECORD
    path.write_text(text)
    with pytest.raises(ProcessRecordError, match="is not one this toolkit wrote.*delete it"):
        read_process_record(path)
    assert path.read_text() == text


def test_a_federation_records_its_processes_and_their_children_and_removes_the_record(
        tmp_path: Path) -> None:
    """While a deployment runs, WORKDIR/processes.json names every process it started and
    the ones seen started under them (as the SuperLink's ServerApp), with their start
    times; a clean stop removes it."""
    fed = LocalFederation(tmp_path / "w", 1)
    parent = ("import subprocess, time\n"
              "subprocess.Popen(['sleep', '120'], start_new_session=True)\n"
              "print('rea' + 'dy', flush=True)\ntime.sleep(120)\n")
    try:
        proc = fed._spawn("superlink", [sys.executable, "-c", parent], tmp_path / "home")
        owner, named = read_process_record(fed.record_path) or (None, [])
        assert owner == recorded("deploy", os.getpid())
        assert [(p.name, p.pid, p.start_time, p.command) for p in named] == [
            ("superlink", proc.pid, start_time(proc.pid), tuple(proc.command))]
        deadline = time.monotonic() + 20
        while "ready" not in proc.log_path.read_text():
            assert time.monotonic() < deadline, "the stub did not start its child"
            time.sleep(0.05)
        fed.refresh()
        _, named = read_process_record(fed.record_path) or (None, [])
        [child] = [p for p in named if p.name == "superlink child"]
        assert child.command == ("sleep", "120") and child.alive()
    finally:
        fed.stop()
    assert not child.alive()
    assert not fed.record_path.exists()


# --------------------------------------------------------------------------- deploy local


@pytest.mark.parametrize("flags", [[], ["--resume"]], ids=["new", "resume"])
def test_deploy_local_refuses_a_workdir_whose_processes_still_run(
        tmp_path: Path, children: list[subprocess.Popen[bytes]], no_federation: None,
        capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    """`deploy local` killed with SIGKILL left its ServerApp running (the SuperLink started
    it, out of reach of the death signal), and the next `deploy local` (a --resume too) in
    the workdir ran a second federation beside it. The record names it: the next deploy is
    refused before anything is written (a resume before its checkpoint is read), naming the
    pid and how to stop it; the process is left alone."""
    server = _sleeper(children)
    entry = recorded("superlink child", server.pid)
    assert entry is not None
    work = _stale_workdir(tmp_path, [entry])
    before = file_tree(work)
    args = _deploy_args(tmp_path, work, *flags)
    assert run_command(args.func, args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has processes of an earlier deployment still running" in err, err
    assert f"superlink child (pid {server.pid}: sleep)" in err and f"`kill {server.pid}`" in err
    assert "--stop-stale" in err and "nothing was written" in err
    assert file_tree(work) == before
    assert server.poll() is None


def test_stop_stale_stops_the_recorded_processes_and_their_children_then_goes_on(
        tmp_path: Path, children: list[subprocess.Popen[bytes]], no_federation: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With --stop-stale the recorded processes still running are stopped (SIGTERM; SIGKILL
    for one that ignores it, after the grace period), with a child of theirs the record
    does not name, the record is removed, and the deployment goes on."""
    monkeypatch.setattr(local_module, "STALE_GRACE", 0.5)
    polite, stubborn = _sleeper(children), _sleeper(children, stubborn=True)
    entries = [recorded("superlink child", p.pid) for p in (polite, stubborn)]
    assert None not in entries
    # a child of a recorded process, started after the record was last written
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess; subprocess.run(['sleep', '120'])"])
    children.append(parent)
    deadline = time.monotonic() + 20
    while not (kids := descendants(parent.pid)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    parent_entry = recorded("supernode-0", parent.pid)
    assert parent_entry is not None
    grandchild = recorded("sleep", kids[0])
    assert grandchild is not None
    work = _stale_workdir(tmp_path, [*entries, parent_entry])  # type: ignore[list-item]
    args = _deploy_args(tmp_path, work, "--stop-stale")
    with pytest.raises(Started):
        args.func(args)
    assert polite.wait(timeout=10) == -signal.SIGTERM
    assert stubborn.wait(timeout=10) == -signal.SIGKILL
    assert parent.wait(timeout=10) == -signal.SIGTERM
    assert not grandchild.alive()
    assert not (work / PROCESS_RECORD).exists()
    err = " ".join(capsys.readouterr().err.split())
    assert f"stopping the earlier deployment's processes still running: superlink child " \
        f"(pid {polite.pid}: sleep)" in err, err


def test_a_pid_given_again_is_not_taken_for_the_recorded_process(
        tmp_path: Path, children: list[subprocess.Popen[bytes]], no_federation: None) -> None:
    """A recorded pid the kernel gave to another process (another start time) is not the
    deployment's: neither refused nor stopped, even with --stop-stale."""
    other = _sleeper(children)
    began = start_time(other.pid)
    assert began is not None
    work = _stale_workdir(tmp_path, [RecordedProcess("superlink child", other.pid, began - 1,
                                                     ("flwr-serverapp",))])
    for flags in ([], ["--stop-stale"]):
        args = _deploy_args(tmp_path, work, *flags)
        with pytest.raises(Started):
            args.func(args)
    assert other.poll() is None


def test_a_stop_never_signals_a_process_given_a_remembered_descendants_pid(
        tmp_path: Path, children: list[subprocess.Popen[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A managed process remembers its descendants (each ClientApp a SuperNode ran) to stop
    them after re-parenting. It remembered pids only, and a stop sent SIGKILL to whatever
    process ran under such a pid by then: on a host that gives pids again (pid_max 32768) a
    long deployment's stop, or a SuperNode's crash test, could kill an unrelated process. A
    remembered pid now names the process with its start time; a later one is left alone."""
    from secure_fedora.runtimes.flower import processes

    other = _sleeper(children)  # never under the managed process
    managed = processes.ManagedProcess("node", ["sleep", "120"], tmp_path / "node.log",
                                       dict(os.environ)).start()
    real_start_time = processes.start_time

    def earlier(pid: int) -> int | None:
        began = real_start_time(pid)
        return began - 1 if pid == other.pid and began is not None else began

    # the managed process once had a descendant with other's pid, started before other
    monkeypatch.setattr(processes, "descendants", lambda pid: [other.pid])
    monkeypatch.setattr(processes, "start_time", earlier)
    assert managed.refresh_descendants() == [other.pid]
    monkeypatch.undo()
    managed.stop(hard=True)
    assert not managed.running()
    assert other.poll() is None, "a stop killed a process that only had a remembered pid"


def test_a_deployment_still_running_is_refused_even_with_stop_stale(
        tmp_path: Path, children: list[subprocess.Popen[bytes]], no_federation: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A record whose `deploy local` still runs is not a leftover: refused, naming it, with
    or without --stop-stale; nothing is signalled."""
    deployer, server = _sleeper(children), _sleeper(children)
    owner, entry = recorded("deploy", deployer.pid), recorded("superlink child", server.pid)
    assert owner is not None and entry is not None
    work = _stale_workdir(tmp_path, [entry], owner=owner)
    for flags in ([], ["--stop-stale"]):
        args = _deploy_args(tmp_path, work, *flags)
        assert run_command(args.func, args) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"is in use by a running deployment (pid {deployer.pid}" in err, err
    assert deployer.poll() is None and server.poll() is None
    assert (work / PROCESS_RECORD).exists()


def test_a_corrupt_record_refuses_the_deployment_and_is_kept(
        tmp_path: Path, no_federation: None, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / PROCESS_RECORD).write_text('{"format": "secure-fedora-processes/1", "own')
    before = file_tree(work)
    for flags in ([], ["--stop-stale"], ["--resume"]):
        args = _deploy_args(tmp_path, work, *flags)
        assert run_command(args.func, args) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"the process record {work / PROCESS_RECORD} is not one this toolkit wrote" \
            in err, err
    assert file_tree(work) == before
