"""Every persistent nonce memory of the Flower runtime is either protected by a recorded head
or harmless to lose.

The ServerApp's nonce files (``server-state-dir/runs/<run>/<scope>/server.nonces.jsonl``, one
for the first contact and one per method) are recorded in its checkpoint: a resume whose
nonce file was deleted, cut or edited is refused naming it, before anything is written; a
crash between a reply's nonce and the checkpoint (nonce durable, checkpoint not) is
resumed, and a reply accepted before the crash and replayed after the resume is refused.

A node's first-contact and ceremony scopes (``runs/<run>/hello/`` and ``runs/<run>/``) record
no head: a hello replayed after its nonce file is lost is answered again, identically, and
writes nothing; the key ceremony, an encrypted summary and a decryption replayed so are
answered with what was answered (docs/design.md says why neither scope needs one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict

from privacy.envelope import EnvelopeError
from secure_fedora.core import crashpoints
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.protocol import (
    HELLO_SCOPE,
    MSG_CEREMONY,
    MSG_DECRYPT,
    MSG_ENCRYPTED_SUMMARY,
    MSG_HELLO,
    MSG_ROUND,
    RunSettings,
)
from secure_fedora.runtimes.flower.state import ReleaseJournal
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    damage_nonce_file,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)
from tests.secure_fedora.runtimes.flower.test_encrypted_flower import enc_config


def _federation(root: Path, cfg: Any, **grid: Any) -> tuple[dict[str, Any], InMemoryGrid]:
    rc = run_config(cfg, root, **{"result-dir": str(root / "res"), "round-timeout": 5.0})
    (root / "res").mkdir(exist_ok=True)
    return rc, InMemoryGrid(root / "nodes", rc, cfg.data.num_clients, **grid)


def _run(rc: dict[str, Any], grid: InMemoryGrid, run_id: int = 42) -> dict[str, Any]:
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), run_id)  # type: ignore[arg-type]


def _resume(root: Path, rc: dict[str, Any], num_clients: int, **grid: Any) -> dict[str, Any]:
    """A new Flower run (another run id) continuing run 42; the nodes keep their state."""
    rc = {**rc, "resume": "42"}
    return _run(rc, InMemoryGrid(root / "nodes", rc, num_clients, run_id=777, **grid), 777)


def _server_nonces(root: Path, scope: str) -> Path:
    return root / "server" / "runs" / "42" / scope / "server.nonces.jsonl"


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _killed_in_round_3(root: Path, cfg: Any) -> dict[str, Any]:
    """The ServerApp dies when client 1's round-3 reply arrives (before it verified any
    reply of round 3): its last checkpoint is round 2's."""
    def die(_request: Message, _reply: Message) -> Message:
        raise crashpoints.InjectedCrash("server killed in round 3")

    rc, grid = _federation(root, cfg, tamper_reply={(1, 3, MSG_ROUND): die})
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    return rc


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("scope", [HELLO_SCOPE, "fedavg"])
@pytest.mark.parametrize("damage", ["deleted", "cut", "edited"])
def test_a_resume_whose_server_nonce_memory_was_lost_is_refused_before_writing(
        tmp_path: Path, scope: str, damage: str) -> None:
    """The server's nonce file of the first contact or of the method in flight deleted, cut
    (its last recorded nonce gone) or edited after the ServerApp died: the resume would
    accept again the replies it had accepted. It is refused naming the file, and no file of
    the deployment (results, checkpoint, server and node state) changes."""
    cfg = with_methods(tiny_config(rounds=3), "fedavg")
    rc = _killed_in_round_3(tmp_path, cfg)
    nonces = _server_nonces(tmp_path, scope)
    damage_nonce_file(nonces, damage)
    before = _files(tmp_path)
    state = "is missing" if damage == "deleted" else "was cut or edited"
    with pytest.raises(server_app.ResumeRefused) as err:
        _resume(tmp_path, rc, 3)
    text = str(err.value)
    assert str(nonces) in text and state in text and "accepted again" in text
    assert "Restore the server-state-dir" in text and "nothing was written" in text
    assert _files(tmp_path) == before


@pytest.mark.usefixtures("task_identity")
def test_an_intact_server_nonce_memory_resumes_as_before(tmp_path: Path) -> None:
    """Control of the test above: the same kill, nothing damaged, the resume completes and
    records no rejection."""
    cfg = with_methods(tiny_config(rounds=3), "fedavg")
    rc = _killed_in_round_3(tmp_path, cfg)
    results = _resume(tmp_path, rc, 3)
    assert results["security"]["rejections"] == []
    assert (tmp_path / "res" / "results.json").exists()
    assert all(v is not None for v in results["methods"]["fedavg"]["final"]["per_client"])


@pytest.mark.usefixtures("task_identity")
def test_a_crash_between_the_nonces_and_the_checkpoint_resumes_and_a_replay_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ServerApp dies after it accepted every round-2 reply (their nonces durable) and
    before its round-2 checkpoint: its nonce file holds more than the checkpoint recorded,
    which is no loss, so the resume goes on and sends round 2 again. Client 0's round-2
    reply of before the crash, replayed in place of its new answer, is refused as a replay
    (it is not taken from stored results: client 0 counts as not taking part in round 2)."""
    cfg = with_methods(tiny_config(rounds=3), "fedavg")
    old: list[Message] = []

    def keep(_request: Message, reply: Message) -> Message:
        old.append(reply)
        return reply

    save = server_app._save_server_checkpoint

    def killed_before_round_2s_checkpoint(server: Any, current: Any, finished: bool = False
                                          ) -> None:
        if current is not None and current["round"] == 2:
            raise crashpoints.InjectedCrash("server killed before its round-2 checkpoint")
        save(server, current, finished)

    rc, grid = _federation(tmp_path, cfg, tamper_reply={(0, 2, MSG_ROUND): keep})
    monkeypatch.setattr(server_app, "_save_server_checkpoint", killed_before_round_2s_checkpoint)
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    monkeypatch.setattr(server_app, "_save_server_checkpoint", save)
    nonces = [json.loads(line) for line in
              _server_nonces(tmp_path, "fedavg").read_text().splitlines()]
    assert len(old) == 1 and {"s": "client-000", "r": 2, "n": json.loads(
        old[0].content["envelope"]["server"])["nonce"]} in nonces

    def replay(request: Message, _reply: Message) -> Message:
        return Message(old[0].content, reply_to=request)

    results = _resume(tmp_path, rc, 3, tamper_reply={(0, 2, MSG_ROUND): replay})
    rejections = results["security"]["rejections"]
    assert [(r["method"], r["round"], r["client"], r["reason"]) for r in rejections] == \
        [("fedavg", 2, 0, "replayed_nonce")]


def _node_context(grid: InMemoryGrid, client: int) -> Context:
    node = 1000 + client
    return Context(grid.run_id, node, dict(grid.node_config[node]), RecordDict(),
                   dict(grid.run_config))


@pytest.mark.usefixtures("task_identity")
def test_a_hello_replayed_after_its_node_nonce_memory_is_lost_is_answered_again_identically(
        tmp_path: Path) -> None:
    """A node's first-contact nonce memory records no head. While it is intact, client 1's
    hello replayed after the run is refused; deleted, the replay is accepted and answered
    again with exactly the facts of the first answer, and no other file of the node changes
    (the first contact releases nothing and keeps no state)."""
    cfg = with_methods(tiny_config(rounds=1), "fedavg")
    requests: list[Message] = []
    replies: list[Message] = []

    def keep(request: Message, reply: Message) -> Message:
        requests.append(request)
        replies.append(reply)
        return reply

    rc, grid = _federation(tmp_path, cfg, tamper_reply={(1, 0, MSG_HELLO): keep})
    _run(rc, grid)
    assert len(requests) == 1
    with pytest.raises(client_app.WithheldError) as err:
        client_app.HANDLERS[MSG_HELLO](requests[0], _node_context(grid, 1))
    assert isinstance(err.value.original, EnvelopeError)
    assert err.value.original.reason == "replayed_nonce"
    node = tmp_path / "nodes" / "node-1"
    (node / "runs" / "42" / HELLO_SCOPE / "client-001.nonces.jsonl").unlink()
    before = {p: b for p, b in _files(node).items() if not p.name.endswith(".nonces.jsonl")}
    again = client_app.HANDLERS[MSG_HELLO](requests[0], _node_context(grid, 1))
    assert dict(again.content["client"]) == dict(replies[0].content["client"])
    assert "refusal" not in again.content
    assert {p: b for p, b in _files(node).items() if not p.name.endswith(".nonces.jsonl")} \
        == before


@pytest.mark.usefixtures("task_identity")
def test_ceremony_messages_replayed_after_the_node_nonce_memory_is_lost_repeat_their_answers(
        tmp_path: Path) -> None:
    """A node's ceremony scope (runs/<run>/<client>.nonces.jsonl) records no head. Intact, it
    refuses a replayed key ceremony, encrypted summary and decryption request; deleted, the
    replays are accepted and answered with what was answered: the key holder's stored public
    context, client 1's saved summary (encrypted again) and the same overlaps, each the
    release already journaled: no second journal record; the keys, the method state and
    every other file stay as they were, and no round is trained or released again."""
    assert TINY["data"]["num_clients"] == 3
    cfg = enc_config()
    kept: dict[str, tuple[Message, Message]] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(request: Message, reply: Message) -> Message:
            kept[name] = (request, reply)
            return reply
        return hook

    rc, grid = _federation(tmp_path, cfg, tamper_reply={
        (0, 0, MSG_CEREMONY): keep("ceremony"), (1, 0, MSG_ENCRYPTED_SUMMARY): keep("summary"),
        (0, 0, MSG_DECRYPT): keep("decrypt")})
    _run(rc, grid)
    assert set(kept) == {"ceremony", "summary", "decrypt"}
    handlers = {"ceremony": (0, client_app.HANDLERS[MSG_CEREMONY]),
                "summary": (1, client_app.HANDLERS[MSG_ENCRYPTED_SUMMARY]),
                "decrypt": (0, client_app.HANDLERS[MSG_DECRYPT])}
    for name, (client, handler) in handlers.items():
        with pytest.raises(client_app.WithheldError) as err:
            handler(kept[name][0], _node_context(grid, client))
        assert isinstance(err.value.original, EnvelopeError), name
        assert err.value.original.reason == "replayed_nonce"

    def run_dir(client: int) -> Path:
        return tmp_path / "nodes" / f"node-{client}" / "runs" / "42"

    def journal(client: int) -> list[str]:
        return [e["kind"] for e in ReleaseJournal(run_dir(client) / "releases.jsonl").entries()]

    def unchanged(client: int) -> dict[Path, bytes]:
        return {p: b for p, b in _files(tmp_path / "nodes" / f"node-{client}").items()
                if not p.name.endswith(".nonces.jsonl") and p.name != "releases.jsonl"}

    journals = {c: journal(c) for c in range(2)}
    before = {c: unchanged(c) for c in range(2)}
    for client in range(2):
        (run_dir(client) / f"client-{client:03d}.nonces.jsonl").unlink()
    answers = {name: handler(kept[name][0], _node_context(grid, client))
               for name, (client, handler) in handlers.items()}
    first = {name: reply for name, (_, reply) in kept.items()}
    assert dict(answers["ceremony"].content["ceremony"])["public-context"] == \
        dict(first["ceremony"].content["ceremony"])["public-context"]
    assert "refusal" not in answers["summary"].content
    assert len(answers["summary"].content["upload"]["columns"]) == \
        len(first["summary"].content["upload"]["columns"])
    assert answers["decrypt"].content["overlaps"]["overlaps"].numpy().tobytes() == \
        first["decrypt"].content["overlaps"]["overlaps"].numpy().tobytes()
    assert journal(0) == journals[0] and journals[0].count("overlaps") == 1
    assert journal(1) == journals[1] and journals[1].count("summary") == 1
    assert {c: unchanged(c) for c in range(2)} == before


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("heads", [{"../elsewhere": {"floor": 0, "nonces": []}},
                                   {"fedavg": {"floor": 0}}, []])
def test_a_checkpoint_with_malformed_nonce_heads_is_refused(tmp_path: Path, heads: Any) -> None:
    """A checkpoint whose recorded nonce memory names no scope of the run (a path outside
    the server-state-dir included) or is not (floor, nonces) is refused, nothing written."""
    from secure_fedora.runtimes.inprocess import load_checkpoint, save_checkpoint

    cfg = with_methods(tiny_config(rounds=3), "fedavg")
    rc = _killed_in_round_3(tmp_path, cfg)
    path = tmp_path / "res" / server_app.SERVER_CHECKPOINT
    state = load_checkpoint(path)
    assert set(state["nonce_heads"]) == {HELLO_SCOPE, "fedavg"}
    save_checkpoint(path, {**state, "nonce_heads": heads})
    before = _files(tmp_path)
    with pytest.raises(server_app.ResumeRefused, match="malformed nonce memory"):
        _resume(tmp_path, rc, 3)
    assert _files(tmp_path) == before


@pytest.mark.usefixtures("task_identity")
def test_deploy_local_resume_checks_the_server_nonce_memory_before_starting_anything(
        tmp_path: Path) -> None:
    """`deploy local --resume` checks the ServerApp's nonce files in WORKDIR/server against
    its checkpoint in WORKDIR/results before any process starts: one deleted is refused
    naming it, and no file of the workdir changes."""
    from secure_fedora.runtimes.flower.local import deploy_local

    cfg = with_methods(tiny_config(rounds=3), "fedavg")
    work = tmp_path / "w"
    rc = run_config(cfg, tmp_path, **{"result-dir": str(work / "results"),
                                      "server-state-dir": str(work / "server"),
                                      "round-timeout": 5.0})
    (work / "results").mkdir(parents=True)

    def die(_request: Message, _reply: Message) -> Message:
        raise crashpoints.InjectedCrash("server killed in round 2")

    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_reply={(1, 2, MSG_ROUND): die})
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    nonces = work / "server" / "runs" / "42" / "fedavg" / "server.nonces.jsonl"
    nonces.unlink()
    before = _files(work)
    with pytest.raises(server_app.ResumeRefused, match="is missing") as err:
        deploy_local(cfg, 3, work, resume=True)
    assert str(nonces) in str(err.value)
    assert _files(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["results", "server"]
