"""results.json ``compute`` of a Flower run: the device and torch threads the ClientApps
stated at first contact, never the ServerApp's own settings taken for theirs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE, MSG_ROUND, DeployError, RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)


def _config(device: str = "auto") -> Any:
    # what the tests read (compute statements, events, checkpoints) does not depend on how
    # long clients train: one local epoch, one fine-tuning epoch (the finalize exchange
    # still runs), half the training rows
    doc = json.loads(json.dumps(TINY))
    doc["methods"] = ["fedavg"]
    doc["data"]["train_per_client"] = 32
    doc["training"]["device"] = device
    doc["training"]["local_epochs"] = 1
    doc["fedavg"] = {"finetune_epochs": 1}
    return parse_config(doc)


def _client_states(monkeypatch: pytest.MonkeyPatch, client: int,
                   change: dict[str, Any], drop: tuple[str, ...] = (),
                   node: int | None = None) -> None:
    """Client ``client``'s ClientApp (at ``node``, default ``1000 + client``) states ``change``
    in its first-contact reply and leaves out ``drop`` (still signed: a node that runs
    otherwise, or an older ClientApp)."""
    honest = client_app._reply

    def stating(security: Any, message: Message, content: Any, rnd: int,
                release: Any = None) -> Message:
        if message.metadata.message_type == "query.hello" and "client" in content \
                and message.metadata.dst_node_id == (1000 + client if node is None else node):
            record = {k: v for k, v in content["client"].items() if k not in drop}
            content["client"] = ConfigRecord({**record, **change})
        return honest(security, message, content, rnd, release)

    monkeypatch.setattr(client_app, "_reply", stating)


class _MovingGrid(InMemoryGrid):
    """Client 2's SuperNode restarts as node 1005 (same state and keys) once it answered the
    evaluation of round 1."""

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = super().push_messages(messages)
        if 1002 in self.node_config and any(
                m.metadata.dst_node_id == 1002 and m.metadata.message_type == MSG_EVALUATE
                and m.metadata.group_id.endswith(":1") for m in messages):
            self.node_config[1005] = self.node_config.pop(1002)
        return ids


def _run(tmp_path: Path, threads: int = 2, grid_type: Any = InMemoryGrid) -> dict[str, Any]:
    # a short round timeout: a moved client's node is waited for that long
    rc = run_config(_config(), tmp_path, **{"result-dir": str(tmp_path / "res"),
                                            "num-threads": threads, "round-timeout": 0.5})
    grid = grid_type(tmp_path / "nodes", rc, 3)
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_compute_states_the_device_and_threads_every_client_stated(tmp_path: Path) -> None:
    """device = "auto" on a machine without a GPU: every ClientApp resolves "cpu" and runs on
    the run's 2 torch threads. results.json stated ``{"threads": 2, "device": "cpu"}`` from
    the ServerApp's own settings (a hard-coded "cpu"); it now states what each client said,
    the ServerApp's threads named as its own, and the summary keys as in process."""
    results = _run(tmp_path)
    clients = {str(c): {"device": "cpu", "threads": 2} for c in range(3)}
    assert results["compute"] == {"device": "cpu", "threads": 2, "server_threads": 2,
                                  "by_client": clients}
    written = json.loads((tmp_path / "res" / "results.json").read_text())
    assert written["compute"] == results["compute"]


@pytest.mark.usefixtures("task_identity")
def test_a_client_on_other_threads_or_device_makes_the_summary_mixed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1's node runs on 4 threads and states it: the summary ``threads`` is "mixed"
    (not the ServerApp's 2) and the per-client row says which client ran on what."""
    _client_states(monkeypatch, 1, {"threads": 4})
    compute = _run(tmp_path)["compute"]
    assert compute["threads"] == "mixed" and compute["device"] == "cpu"
    assert [compute["by_client"][str(c)]["threads"] for c in range(3)] == [2, 4, 2]
    assert compute["server_threads"] == 2


@pytest.mark.usefixtures("task_identity")
def test_a_client_on_cuda_is_stated_as_it_said(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that resolved "auto" to cuda (a GPU there) says so: results.json stated "cpu"."""
    _client_states(monkeypatch, 2, {"device": "cuda"})
    compute = _run(tmp_path)["compute"]
    assert compute["device"] == "mixed" and compute["by_client"]["2"]["device"] == "cuda"
    assert compute["by_client"]["0"] == {"device": "cpu", "threads": 2}


@pytest.mark.usefixtures("task_identity")
def test_a_client_whose_new_node_states_other_compute_is_mixed_and_an_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 2's SuperNode restarts mid-run as node 1005, which runs on 4 threads: its row
    states "mixed" (not the first node's 2 alone) and an event names both statements."""
    _client_states(monkeypatch, 2, {"threads": 4}, node=1005)
    results = _run(tmp_path, grid_type=_MovingGrid)
    assert results["node_of_client"]["2"] == "1005"
    compute = results["compute"]
    assert compute["by_client"]["2"] == {"device": "cpu", "threads": "mixed"}
    assert compute["threads"] == "mixed" and compute["by_client"]["1"]["threads"] == 2
    assert [(e["client"], e["node"], e["event"]) for e in results["events"]
            if "torch threads" in e["event"]] == [
        (2, 1005, "states device cpu with 4 torch threads (stated before: cpu with 2)")]


@pytest.mark.usefixtures("task_identity")
def test_a_hello_without_device_and_threads_stops_the_run_saying_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older ClientApp's reply states neither its device nor its threads: the run stops at
    first contact, naming it and the remedy, with nothing written (results.json would have to
    guess its compute)."""
    _client_states(monkeypatch, 1, {}, drop=("device", "threads"))
    result_dir = tmp_path / "res"
    result_dir.mkdir()
    rc = run_config(_config(), tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    with pytest.raises(DeployError, match=re.escape(
            "clients [1] (nodes [1001]) answered the first contact without device and threads: "
            "a ClientApp older than this server's protocol (the fields are missing; "
            "results.json cannot state the device and threads it trains on). Update "
            "secure-fedora on those SuperNodes")):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert list(result_dir.iterdir()) == []
    assert not [m for m in grid.sent if m.metadata.message_type != "query.hello"]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("change", "named"), [({"device": "gpu"}, "device 'gpu'"),
                                               ({"threads": 0}, "threads 0"),
                                               ({"threads": True}, "threads True")])
def test_a_hello_stating_an_unknown_device_or_thread_count_is_malformed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        change: dict[str, Any], named: str) -> None:
    """A statement results.json could not take as a device or a thread count is a malformed
    reply: the client is not identified, and the run stops without results."""
    _client_states(monkeypatch, 0, change)
    with pytest.raises(DeployError):
        _run(tmp_path)
    assert f"hello reply malformed ({named})" in capsys.readouterr().out
    assert not (tmp_path / "res" / "results.json").exists()


def _kill_in_round_2(tmp_path: Path) -> dict[str, Any]:
    """A ServerApp killed after client 0's round-2 reply (its round in flight); the run
    config to resume it with."""
    from secure_fedora.core import crashpoints

    def die(_request: Message, reply: Message) -> Message:
        raise crashpoints.InjectedCrash("server killed in round 2")

    rc = run_config(_config(), tmp_path, **{"result-dir": str(tmp_path / "res"),
                                            "num-threads": 2, "round-timeout": 5.0})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    grid.tamper_reply = {(0, 2, MSG_ROUND): die}
    with pytest.raises(crashpoints.InjectedCrash):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    return {**rc, "resume": "42"}


def _resume(tmp_path: Path, rc: dict[str, Any]) -> dict[str, Any]:
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777)
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 777)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_a_resume_states_the_compute_the_clients_stated_before_it_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1 trained rounds 1-2 on 4 threads; its node, restarted for the resume, states 2.
    The compute statements were not checkpointed, so results.json stated the resume's first
    contact alone ("threads": 2 for client 1, every client on 2 threads): they are now, and
    client 1's row is "mixed" with an event naming both, as for a node that took it over."""
    _client_states(monkeypatch, 1, {"threads": 4})
    rc = _kill_in_round_2(tmp_path)
    monkeypatch.undo()
    results = _resume(tmp_path, rc)
    compute = results["compute"]
    assert compute["by_client"]["1"] == {"device": "cpu", "threads": "mixed"}
    assert compute["by_client"]["0"] == {"device": "cpu", "threads": 2}
    assert compute["threads"] == "mixed" and "before_resume" not in compute
    assert [(e["client"], e["event"]) for e in results["events"] if "torch threads" in e["event"]] \
        == [(1, "states device cpu with 2 torch threads (stated before: cpu with 4)")]


@pytest.mark.usefixtures("task_identity")
def test_a_resume_whose_clients_state_the_same_compute_states_it_once(tmp_path: Path) -> None:
    """Every client states cpu with 2 threads before and after the resume: results.json
    states that, with no event and nothing unknown."""
    results = _resume(tmp_path, _kill_in_round_2(tmp_path))
    assert results["compute"] == {"device": "cpu", "threads": 2, "server_threads": 2,
                                  "by_client": {str(c): {"device": "cpu", "threads": 2}
                                                for c in range(3)}}
    assert not [e for e in results["events"] if "torch threads" in e["event"]]


@pytest.mark.usefixtures("task_identity")
def test_a_resume_of_a_checkpoint_without_the_compute_states_what_is_unknown(
        tmp_path: Path) -> None:
    """A checkpoint of an older ServerApp records no compute statements: the run resumes,
    and results.json states the resume's first contact with ``before_resume`` saying the
    compute before it is unknown (not the resume's taken for the whole run's), and its
    checkpoints keep that for a later resume. A malformed record is refused."""
    from secure_fedora.runtimes.inprocess import load_checkpoint, save_checkpoint

    rc = _kill_in_round_2(tmp_path)
    path = tmp_path / "res" / server_app.SERVER_CHECKPOINT
    state = load_checkpoint(path)
    assert state["client_compute"] == {c: [{"device": "cpu", "threads": 2}] for c in range(3)}
    save_checkpoint(path, {**state, "client_compute": {0: [{"device": "gpu", "threads": 2}]}})
    with pytest.raises(server_app.ResumeRefused, match="malformed client compute"):
        _resume(tmp_path, rc)
    old = {k: v for k, v in state.items()
           if k not in ("client_compute", "compute_before_resume_unknown")}
    save_checkpoint(path, old)
    compute = _resume(tmp_path, rc)["compute"]
    assert compute["by_client"]["1"] == {"device": "cpu", "threads": 2}
    assert compute["before_resume"].startswith("unknown: the checkpoint resumed")
    assert load_checkpoint(path)["compute_before_resume_unknown"] is True
