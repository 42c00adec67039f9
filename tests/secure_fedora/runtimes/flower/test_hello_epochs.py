"""Every hello exchange of the ServerApp has an epoch of its own (the envelope round of its
requests and replies), which bounds the first contact's nonce memory without weakening its
replay protection: a reply replayed in its own exchange is refused as a replay, a reply of
an earlier exchange as stale, and the nonce file keeps one exchange's nonces at most, also
across a restart of the ServerApp."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.envelopes import SERVER_ID, MessageSecurity
from secure_fedora.runtimes.flower.protocol import HELLO_SCOPE, MSG_HELLO, RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)


def _server(root: Path) -> tuple[Any, list[MessageSecurity]]:
    """A ServerApp's state of run 42 in its first contact, and the three clients' securities."""
    cfg = tiny_config(rounds=1)
    rc = run_config(cfg, root)
    settings = RunSettings.from_run_config(rc)
    server = server_app._Server(settings, 42)
    server.scope = HELLO_SCOPE
    ids = Path(rc["identity-dir"]).parent
    clients = [MessageSecurity.for_client(ids / f"client-{c:03d}", root / f"node-{c}", 42,
                                          settings.config_hash, c, 3) for c in range(3)]
    return server, clients


def _hello_reply(client: MessageSecurity, rnd: int) -> Any:
    content = RecordDict({"client": ConfigRecord({"client-id": 0})})
    client.sign(content, MSG_HELLO, [SERVER_ID], rnd, reply=True)
    return SimpleNamespace(content=content)


def _accept(server: Any, reply: Any, epoch: int) -> bool:
    return server.accept(0, 1000, reply, MSG_HELLO, None, "not identified",
                         expected_round=epoch) is not None


def _nonce_lines(root: Path) -> int:
    path = root / "server" / "runs" / "42" / HELLO_SCOPE / "server.nonces.jsonl"
    return len(path.read_text().splitlines())


def test_a_hello_reply_replayed_in_its_exchange_is_refused_as_a_replay(tmp_path: Path) -> None:
    server, clients = _server(tmp_path)
    epoch = server_app._hello_epoch(server)
    reply = _hello_reply(clients[1], epoch)
    assert _accept(server, reply, epoch)
    assert not _accept(server, reply, epoch)
    assert [r["reason"] for r in server.rejections] == ["replayed_nonce"]


def test_a_hello_reply_of_an_earlier_exchange_is_refused_as_stale(tmp_path: Path) -> None:
    """Also one never accepted (answered late, or held back): its exchange is over."""
    server, clients = _server(tmp_path)
    first = server_app._hello_epoch(server)
    accepted, held_back = _hello_reply(clients[1], first), _hello_reply(clients[2], first)
    assert _accept(server, accepted, first)
    second = server_app._hello_epoch(server)
    assert second == first + 1
    assert not _accept(server, held_back, second)
    assert not _accept(server, accepted, second)
    rejected = server.rejections
    assert [r["reason"] for r in rejected] == ["stale_round", "stale_round"]
    assert f"round {first} is older than the oldest accepted round {second}" \
        in rejected[0]["detail"]


def test_the_hello_nonce_file_stays_bounded_and_epochs_survive_a_restart(
        tmp_path: Path) -> None:
    """200 hello exchanges, every client answering each: the file holds the floor line and
    the last exchange's three nonces. A ServerApp restarted on the same state goes on from
    the next epoch (a reply of the last one is stale), so no epoch is signed twice."""
    server, clients = _server(tmp_path)
    for _ in range(200):
        epoch = server_app._hello_epoch(server)
        assert all(_accept(server, _hello_reply(c, epoch), epoch) for c in clients)
        assert _nonce_lines(tmp_path) <= 4
    assert epoch == 200 and _nonce_lines(tmp_path) == 4
    last = _hello_reply(clients[0], epoch)
    restarted = server_app._Server(server.settings, 42)
    restarted.scope = HELLO_SCOPE
    assert server_app._hello_epoch(restarted) == 201
    assert not _accept(restarted, last, 201)
    assert [r["reason"] for r in restarted.rejections] == ["stale_round"]
    assert _nonce_lines(tmp_path) == 1


@pytest.mark.usefixtures("task_identity")
def test_a_late_hello_reply_delivered_in_the_retry_is_refused_as_stale(
        tmp_path: Path) -> None:
    """Client 1's reply to the first hello is held back and delivered in place of its answer
    to the retry's hello: it is refused as stale, so client 1 is not identified and the run
    stops at the first contact (before, the reply of the earlier exchange was accepted)."""
    cfg = with_methods(tiny_config(rounds=1), "fedavg")
    rc = run_config(cfg, tmp_path, **{"round-timeout": 1.0, "connect-timeout": 1.0})
    held: list[Message] = []

    def hold_or_replay(request: Message, reply: Message) -> Message | None:
        if not held:
            held.append(reply)
            return None
        return Message(held[0].content, reply_to=request)

    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_reply={(1, 0, MSG_HELLO): hold_or_replay})
    with pytest.raises(server_app.DeployError, match=r"missing clients \[1\].*stale_round"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    sent = [json.loads(m.content["envelope"]["client-001"])["round"] for m in grid.sent
            if m.metadata.message_type == MSG_HELLO and m.metadata.dst_node_id == 1001]
    assert sent == [1, 2]
