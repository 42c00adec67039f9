"""A SuperNode that restarts under a new node id mid-run (its state directory kept) is found
again: every stage asks the online nodes that hold no client which client they hold, and the
reply's signature, not the node id, says which. The client's own checks still refuse a node
state older than what the server last received from it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Error, Message

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import (
    MSG_CEREMONY,
    MSG_ENCRYPTED_SUMMARY,
    MSG_EVALUATE,
    MSG_FINALIZE,
    MSG_HELLO,
    MSG_ROUND,
    DeployError,
    RunSettings,
)
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)


class _MovingGrid(InMemoryGrid):
    """Node 1002 (client 2) handles the message of ``at`` (message type, round), then its
    SuperNode restarts as node 1005 with the same state, partition and keys; its reply to that
    message is lost unless ``keep_reply``. ``before_restart`` runs on client 2's node
    directory just before it comes back; ``twin`` starts a second node (1006) holding client 2
    too. A message to a node no longer registered is answered with an error, as the SuperLink
    does."""

    def __init__(self, *args: Any, at: tuple[str, int], keep_reply: bool = False,
                 before_restart: Callable[[Path], None] | None = None, twin: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.keep_reply, self.before_restart, self.twin = at, keep_reply, before_restart, twin
        self.moved = False

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            [mid] = super().push_messages([msg])  # "node offline" for a node gone
            ids.append(mid)
            last = msg.metadata.group_id.rsplit(":", 1)[-1]
            if node == 1002 and not self.moved and \
                    (msg.metadata.message_type, int(last) if last.isdigit() else 0) == self.at:
                self.moved = True
                if not self.keep_reply:
                    self.replies.pop(mid, None)
                conf = self.node_config.pop(1002)
                if self.before_restart is not None:
                    self.before_restart(Path(conf["state-dir"]))
                self.node_config[1005] = conf
                if self.twin:
                    self.node_config[1006] = dict(conf)
        return ids


def _run(root: Path, cfg: Any, grid_type: Any = InMemoryGrid, **grid_args: Any) -> Any:
    rc = run_config(cfg, root, **{"reproducible-dp-noise": cfg.privacy.enabled,
                                  "round-timeout": 0.3, "connect-timeout": 0.3})
    grid = grid_type(root / "nodes", rc, 3, **grid_args)
    return grid, server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


def _per_client(results: dict[str, Any], method: str) -> tuple[Any, Any]:
    entry = results["methods"][method]
    return entry["selected"]["per_client"], entry["final"]["per_client"]


def _moved_event(results: dict[str, Any], method: str, rnd: int) -> None:
    moved = [e for e in results["events"] if "now at node" in e["event"]]
    assert moved == [{"method": method, "round": rnd, "client": 2, "node": 1005,
                      "event": f"{MSG_HELLO}: client 2 now at node 1005 (was node 1002)"}]


@pytest.mark.usefixtures("task_identity")
def test_a_supernode_restarted_under_a_new_node_id_between_rounds_gets_the_later_rounds(
        tmp_path: Path) -> None:
    """Client 2's SuperNode restarts as node 1005 after answering round 1's evaluation: every
    later message went to node 1002 ("offline: no round message delivered"), so client 2
    reported its round-1 metrics as final and trained no more. Now its round-2 message finds
    it at node 1005 and the run equals an undisturbed one."""
    cfg = tiny_config(rounds=2)
    grid, results = _run(tmp_path / "moved", cfg, _MovingGrid, at=(MSG_EVALUATE, 1),
                         keep_reply=True)
    _, undisturbed = _run(tmp_path / "plain", cfg)
    assert _per_client(results, "fedora") == _per_client(undisturbed, "fedora")
    assert results["node_of_client"] == {"0": "1000", "1": "1001", "2": "1005"}
    _moved_event(results, "fedora", 2)
    assert not any("offline" in e["event"] for e in results["events"])
    assert {m.metadata.dst_node_id for m in grid.sent
            if m.metadata.message_type == MSG_ROUND and m.metadata.group_id.endswith(":2")} \
        == {1000, 1001, 1005}


@pytest.mark.usefixtures("task_identity")
def test_a_supernode_restarted_under_a_new_node_id_while_its_round_reply_was_lost(
        tmp_path: Path) -> None:
    """Client 2 trains in round 1, its reply is lost and its SuperNode restarts as node 1005:
    client 2 missed round 1's evaluation and every later message. Now the evaluation finds it
    at node 1005, and the run equals one where only that reply was lost."""
    cfg = tiny_config(rounds=2)
    _, results = _run(tmp_path / "moved", cfg, _MovingGrid, at=(MSG_ROUND, 1))
    _, lost_only = _run(tmp_path / "lost", cfg,
                        tamper_reply={(2, 1, MSG_ROUND): lambda _q, _r: None})
    assert _per_client(results, "fedora") == _per_client(lost_only, "fedora")
    assert [row["replied"] for row in results["rounds"]] == [2, 3]
    assert [row["evaluated"] for row in results["rounds"]] == [3, 3]
    _moved_event(results, "fedora", 1)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("method", "at"), [("fedora", (MSG_EVALUATE, 2)),
                                            ("fedavg", (MSG_FINALIZE, 3))])
def test_a_supernode_restarted_under_a_new_node_id_at_the_end_is_asked_there(
        tmp_path: Path, method: str, at: tuple[str, int]) -> None:
    """A restart during the final evaluation (where a DP client closes its ledger) or the
    finalize exchange stopped the run after the retry went to the old node id."""
    cfg = with_methods(dp_config(rounds=2, noise="reproducible"), method)
    _, results = _run(tmp_path / "moved", cfg, _MovingGrid, at=at)
    _, undisturbed = _run(tmp_path / "plain", cfg)
    assert _per_client(results, method) == _per_client(undisturbed, method)
    for key in ("ledger_entries", "epsilon_spent"):  # the client's ledger closed, as undisturbed
        assert results["privacy"][method]["clients"][2][key] == \
            undisturbed["privacy"][method]["clients"][2][key]
    _moved_event(results, method, at[1])


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("at", [(MSG_CEREMONY, 0), (MSG_ENCRYPTED_SUMMARY, 0)])
def test_a_supernode_restarted_under_a_new_node_id_in_the_ckks_ceremony_is_asked_there(
        tmp_path: Path, at: tuple[str, int]) -> None:
    """The key ceremony's retry went to the old node ids and the encrypted summary's to the
    client's old node: the run stopped naming client 2."""
    data = tiny_config(rounds=1).model_dump(mode="json", exclude_none=True)
    data["fedora"]["relatedness"] = "encrypted"
    cfg = parse_config(data)
    _, results = _run(tmp_path / "moved", cfg, _MovingGrid, at=at)
    _, undisturbed = _run(tmp_path / "plain", cfg)
    assert _per_client(results, "fedora") == _per_client(undisturbed, "fedora")
    assert results["node_of_client"]["2"] == "1005"
    assert [e["event"] for e in results["events"] if "now at node" in e["event"]] == [
        f"{at[0] if at[0] == MSG_CEREMONY else MSG_HELLO}: client 2 now at node 1005 "
        "(was node 1002)"]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("private", [True, False])
def test_a_node_restarted_under_a_new_id_with_an_older_state_is_refused(
        tmp_path: Path, private: bool) -> None:
    """Moving a client to another node does not skip its own checks: node 1005 comes back
    with client 2's state directory as it was after round 1, older than what the server last
    received from it (under DP its ledger head; with or without DP its round-2 training
    reply), and the run stops instead of accepting it (without DP it completed, client 2
    evaluated on its round-1 state)."""
    saved = tmp_path / "copy"

    def keep_copy(run_dir: Path) -> None:
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(run_dir, saved)

    def restore_copy(state_dir: Path) -> None:
        shutil.rmtree(state_dir)
        shutil.copytree(saved, state_dir)

    class _Snapshot(_MovingGrid):
        def push_messages(self, messages: list[Message]) -> list[str]:
            ids = super().push_messages(messages)
            if any(m.metadata.dst_node_id == 1002 and m.metadata.message_type == MSG_EVALUATE
                   and m.metadata.group_id.endswith(":1") for m in messages):
                keep_copy(Path(self.node_config[1002]["state-dir"]))
            return ids

    cfg = dp_config(rounds=2, noise="reproducible") if private else tiny_config(rounds=2)
    with pytest.raises(DeployError, match=r"client client-002 \(node 1005\) refuses to go on"):
        _run(tmp_path / "moved", cfg, _Snapshot, at=(MSG_EVALUATE, 2),
             before_restart=restore_copy)


@pytest.mark.usefixtures("task_identity")
def test_two_nodes_answering_as_one_moved_client_stop_the_run(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=r"nodes 1005 and 1006 both hold partition-id 2"):
        _run(tmp_path, tiny_config(rounds=2), _MovingGrid, at=(MSG_EVALUATE, 1),
             keep_reply=True, twin=True)


def _malformed_hellos(monkeypatch: pytest.MonkeyPatch, nodes: set[int],
                      once: bool = False) -> list[int]:
    """Make the hello replies of ``nodes`` authentic but malformed (no train split size), the
    first one only when ``once``; returns the nodes spoiled so far."""
    from flwr.app import ConfigRecord

    from secure_fedora.runtimes.flower import client_app

    honest = client_app._reply
    spoiled: list[int] = []

    def malformed(security: Any, message: Message, content: Any, rnd: int,
                  release: Any = None) -> Message:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MSG_HELLO and node in nodes \
                and not (once and spoiled):
            spoiled.append(node)
            info = dict(content["client"])
            del info["train"]
            content["client"] = ConfigRecord(info)
        return honest(security, message, content, rnd, release)

    monkeypatch.setattr(client_app, "_reply", malformed)
    return spoiled


@pytest.mark.usefixtures("task_identity")
def test_a_moved_node_whose_hello_is_malformed_is_not_said_to_have_moved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 1005's first hello for client 2 is authentic but malformed (no split sizes): the
    server rejected it and kept client 2 at node 1002, yet results.json's events said
    "client 2 now at node 1005". Only the move taken (its next, well-formed hello, at round
    2's evaluation) is an event now."""
    spoiled = _malformed_hellos(monkeypatch, {1005}, once=True)
    _, results = _run(tmp_path, tiny_config(rounds=2), _MovingGrid, at=(MSG_EVALUATE, 1),
                      keep_reply=True)
    assert spoiled
    [rejected] = [e for e in results["security"]["rejections"] if e["node"] == 1005]
    assert "hello reply malformed" in rejected["detail"]
    _moved_event(results, "fedora", 2)
    assert results["node_of_client"]["2"] == "1005"


class _SpareGrid(InMemoryGrid):
    """A fourth registered SuperNode (1009) holds no client of the run (its partition-id is
    out of range, so it answers every message with an error)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_config[1009] = {**self.node_config[1002], "partition-id": 7}

    def hellos_to(self, node: int) -> int:
        return sum(m.metadata.dst_node_id == node and m.metadata.message_type == MSG_HELLO
                   for m in self.sent)


@pytest.mark.usefixtures("task_identity")
def test_a_spare_node_is_asked_once_while_a_client_is_offline(tmp_path: Path) -> None:
    """Client 1's node is offline for two rounds: every exchange meanwhile sent the spare
    node 1009 a hello (one signed envelope per client each) and listed its error reply as an
    event. A node whose first contact identified no client is remembered now: asked once."""
    cfg = tiny_config(rounds=4)
    grid, results = _run(tmp_path, cfg, _SpareGrid, offline={2: {1}, 3: {1}})
    assert any("offline" in e["event"] for e in results["events"])
    assert grid.hellos_to(1009) == 1
    assert sum(e["node"] == 1009 for e in results["events"]) == 1


class _ComingBackGrid(_SpareGrid):
    """Client 2's node is unreachable (the SuperLink answers 'node offline' and does not list
    it) for ``away`` seconds from its final evaluation message on, then back."""

    def __init__(self, *args: Any, at: tuple[str, int], away: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.away, self.back_at = at, away, None

    def get_node_ids(self) -> list[int]:
        gone = self.back_at is not None and time.monotonic() < self.back_at
        return [n for n in super().get_node_ids() if not (gone and n == 1002)]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            last = msg.metadata.group_id.rsplit(":", 1)[-1]
            if msg.metadata.dst_node_id == 1002 and self.back_at is None and \
                    (msg.metadata.message_type, int(last) if last.isdigit() else 0) == self.at:
                self.back_at = time.monotonic() + self.away
            if msg.metadata.dst_node_id == 1002 and self.back_at is not None \
                    and time.monotonic() < self.back_at:
                self.counter += 1
                mid = f"msg-{self.counter}"
                msg.metadata.__dict__["_message_id"] = mid
                self.sent.append(msg)
                self.replies[mid] = Message(Error(code=0, reason="node offline"), reply_to=msg)
                ids.append(mid)
                continue
            ids.extend(super().push_messages([msg]))
        return ids


@pytest.mark.usefixtures("task_identity")
def test_a_spare_node_does_not_cut_short_the_wait_for_a_restarting_one(tmp_path: Path) -> None:
    """The retry of the final evaluation waits until the missing client's node is back, or
    as many nodes holding no known client are online (one may be it, under a new node id).
    The spare node counted as such: the retry went out at once, client 2's node still away,
    and its final metric was round 1's. A node known to hold no client is not counted now."""
    cfg = tiny_config(rounds=2)
    rc = run_config(cfg, tmp_path, **{"round-timeout": 5.0, "connect-timeout": 0.3})
    grid = _ComingBackGrid(tmp_path / "nodes", rc, 3, at=(MSG_EVALUATE, 2), away=1.2)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    _, undisturbed = _run(tmp_path / "plain", cfg)
    assert "stale_clients" not in results["methods"]["fedora"]["final"]
    assert _per_client(results, "fedora") == _per_client(undisturbed, "fedora")


class _StaleIdGrid(_MovingGrid):
    """As _MovingGrid, but the SuperLink still lists node 1002 after the restart, and a
    message to it is never answered (its SuperNode is gone)."""

    def get_node_ids(self) -> list[int]:
        return sorted({*super().get_node_ids(), *([1002] if self.moved else [])})

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            if self.moved and msg.metadata.dst_node_id == 1002:
                self.counter += 1
                mid = f"msg-{self.counter}"
                msg.metadata.__dict__["_message_id"] = mid
                self.sent.append(msg)
                ids.append(mid)
                continue
            ids.extend(super().push_messages([msg]))
        return ids


@pytest.mark.usefixtures("task_identity")
def test_a_new_node_id_is_asked_before_a_stale_one_listed_online(tmp_path: Path) -> None:
    """Client 2's SuperNode restarts as node 1005 while the SuperLink still lists node 1002:
    round 2's training message went to node 1002 and waited the round timeout for nothing,
    and client 2 missed the round. A node id not seen before is asked which client it holds
    before the exchange now, and the run equals an undisturbed one."""
    cfg = tiny_config(rounds=2)
    grid, results = _run(tmp_path, cfg, _StaleIdGrid, at=(MSG_EVALUATE, 1), keep_reply=True)
    _, undisturbed = _run(tmp_path / "plain", cfg)
    assert _per_client(results, "fedora") == _per_client(undisturbed, "fedora")
    assert not any("no reply in time" in e["event"] for e in results["events"])
    _moved_event(results, "fedora", 2)
    assert not [m for m in grid.sent if m.metadata.dst_node_id == 1002
                and m.metadata.group_id.endswith(":2")]


def _silent_spare(grid: InMemoryGrid) -> None:
    """Node 1009 (_SpareGrid's spare, partition-id 7) never answers a message."""
    grid.drop |= {(7, rnd) for rnd in range(20)}


@pytest.mark.usefixtures("task_identity")
def test_a_silent_spare_node_is_asked_once_while_a_client_is_offline(tmp_path: Path) -> None:
    """A spare node that never answers was not remembered (only an error or a rejected reply
    marked a node as spare): while client 1's node was offline every exchange sent it a hello
    and waited the first-contact timeout for it (5 hellos here; max(connect, round) timeout,
    600 s by default, each). Left unanswered, a first contact identifies no client either."""
    cfg = tiny_config(rounds=4)
    rc = run_config(cfg, tmp_path, **{"round-timeout": 0.3, "connect-timeout": 0.3})
    grid = _SpareGrid(tmp_path / "nodes", rc, 3, offline={2: {1}, 3: {1}})
    _silent_spare(grid)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert any("offline" in e["event"] for e in results["events"])
    assert grid.hellos_to(1009) == 1
    assert sum(e["node"] == 1009 for e in results["events"]) == 1


class _LateNodeGrid(_SpareGrid):
    """Client ``late``'s SuperNode registers ``after`` seconds after the first hello went
    out (the spare node 1009 is online from the start)."""

    def __init__(self, *args: Any, late: int, after: float, silent: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.late, self.after, self.up_at = 1000 + late, after, None
        if silent:
            _silent_spare(self)

    def get_node_ids(self) -> list[int]:
        up = self.up_at is not None and time.monotonic() >= self.up_at
        return [n for n in super().get_node_ids() if up or n != self.late]

    def push_messages(self, messages: list[Message]) -> list[str]:
        if self.up_at is None:
            self.up_at = time.monotonic() + self.after
        return super().push_messages(messages)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("silent", [False, True])
@pytest.mark.parametrize("relatedness", ["plain", "encrypted"])
def test_a_spare_node_does_not_cut_short_the_first_contact_wait(
        tmp_path: Path, silent: bool, relatedness: str) -> None:
    """Three nodes online (two clients' and a spare) started the first contact; client 2's
    SuperNode registered a second later. The retry waits for as many unidentified nodes as
    clients are missing, and counted the spare, whose hello had just failed (or gone
    unanswered): the retry went to the spare alone at once and the run stopped, 'missing
    clients [2]'. A spare is not counted now (it is still asked again)."""
    data = tiny_config(rounds=1).model_dump(mode="json", exclude_none=True)
    data["fedora"]["relatedness"] = relatedness
    cfg = parse_config(data)
    rc = run_config(cfg, tmp_path, **{"round-timeout": 2.0, "connect-timeout": 0.3})
    # a silent spare's hello is awaited for the round timeout: the node registers after that
    grid = _LateNodeGrid(tmp_path / "nodes", rc, 3, late=2, after=2.5 if silent else 1.0,
                         silent=silent)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert results["node_of_client"] == {"0": "1000", "1": "1001", "2": "1002"}
    assert [row["evaluated"] for row in results["rounds"]] == [3]


@pytest.mark.usefixtures("task_identity")
def test_a_spare_node_does_not_cut_short_the_connect_timeout(tmp_path: Path) -> None:
    """The run waits for as many SuperNodes as clients, up to the connect timeout (6 s here),
    and counted the spare node 1009 among them: the first contact went out with client 2's
    node still starting (up after 3 s), its retry waited the round timeout (0.3 s) alone and
    the run stopped, 'missing clients [2]'. The retry now waits for the clients' nodes until
    the connect timeout ends, as the wait would without the spare."""
    cfg = tiny_config(rounds=1)
    rc = run_config(cfg, tmp_path, **{"round-timeout": 0.3, "connect-timeout": 6.0})
    grid = _LateNodeGrid(tmp_path / "nodes", rc, 3, late=2, after=3.0, silent=False)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert results["node_of_client"] == {"0": "1000", "1": "1001", "2": "1002"}
    assert [row["evaluated"] for row in results["rounds"]] == [3]


@pytest.mark.usefixtures("task_identity")
def test_a_client_node_that_never_comes_stops_the_run_at_the_connect_timeout(
        tmp_path: Path) -> None:
    """The counterpart: client 2's node never registers; the run stops naming it once the
    connect timeout has passed, not before."""
    cfg = tiny_config(rounds=1)
    rc = run_config(cfg, tmp_path, **{"round-timeout": 0.3, "connect-timeout": 1.5})
    grid = _LateNodeGrid(tmp_path / "nodes", rc, 3, late=2, after=1e9, silent=False)
    started = time.monotonic()
    with pytest.raises(DeployError, match=r"missing clients \[2\]"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 1.5


@pytest.mark.usefixtures("task_identity")
def test_a_malformed_hello_in_the_first_contact_retry_claims_no_move(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Client 2's first hello (node 1002) is malformed, its SuperNode restarts as node 1005
    and the retry's hello there is malformed too: the run stops, but the move was recorded
    (logged, an event) before the reply's content was checked, as _find_moved did before.
    The first contact's retry records only the moves it takes now."""
    _malformed_hellos(monkeypatch, {1002, 1005})
    with pytest.raises(DeployError, match=r"missing clients \[2\]"):
        _run(tmp_path, tiny_config(rounds=1), _MovingGrid, at=(MSG_HELLO, 0), keep_reply=True)
    out = capsys.readouterr().out
    assert out.count("hello reply malformed") == 2
    assert "now at node" not in out


@pytest.mark.usefixtures("task_identity")
def test_a_well_formed_hello_in_the_first_contact_retry_records_the_move(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counterpart: client 2's malformed first hello (node 1002), then a well-formed one
    from node 1005 in the retry, is a move taken and recorded once."""
    _malformed_hellos(monkeypatch, {1002})
    _, results = _run(tmp_path, tiny_config(rounds=1), _MovingGrid, at=(MSG_HELLO, 0),
                      keep_reply=True)
    assert [e for e in results["events"] if "now at node" in e["event"]] == [
        {"method": None, "round": 0, "client": 2, "node": 1005,
         "event": f"{MSG_HELLO}: client 2 now at node 1005 (was node 1002)"}]
    assert results["node_of_client"]["2"] == "1005"
