"""A SuperNode whose durable state was lost or cut between messages: the client or the server
refuses to go on, instead of accounting fewer releases than were made.

Each scenario damages client 1's state dir just before its round-2 message is handled (the
in-memory grid's request hook), as a restart from a damaged or re-provisioned disk would.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import Message

from privacy.envelope import EnvelopeError
from privacy.ledger import read_ledger
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.client_app import CLIENT_ERRORS_LOG
from secure_fedora.runtimes.flower.protocol import (
    MSG_EVALUATE,
    MSG_ROUND,
    DeployError,
    NodeSettings,
    RunSettings,
)
from secure_fedora.runtimes.flower.state import NodeStateError
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    damage_nonce_file,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)


def _run_dir(tmp_path: Path, client: int) -> Path:
    return tmp_path / "nodes" / f"node-{client}" / "runs" / "42"


def _damage_before_round_2(tmp_path: Path, damage: Callable[[Path], None]):  # type: ignore[no-untyped-def]
    def hook(message: Message) -> Message:
        damage(_run_dir(tmp_path, 1))
        return message
    return {(1, 2, MSG_ROUND): hook}


def _run(tmp_path: Path, cfg, tamper):  # type: ignore[no-untyped-def]
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True, "round-timeout": 0.3,
                                      "result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir(exist_ok=True)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request=tamper)
    return grid, lambda: server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


def _cut_ledger(run: Path) -> None:
    ledger = run / "fedora" / "client-001.jsonl"
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n")  # the summary entry only


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("damage", ["cut", "deleted"])
def test_a_ledger_cut_or_deleted_on_a_node_stops_its_client(tmp_path: Path, damage: str) -> None:
    """Found by a crash hunt: the restarted client opened whatever ledger was on disk and
    reported epsilon 4.9 instead of 6.6, the server anchored the cut ledger and the audit
    passed."""
    def hit(run: Path) -> None:
        if damage == "cut":
            _cut_ledger(run)
        else:
            (run / "fedora" / "client-001.jsonl").unlink()

    grid, run = _run(tmp_path, dp_config(rounds=4, noise="reproducible"),
                     _damage_before_round_2(tmp_path, hit))
    # the client refuses; under DP the run stops there (it could never close that ledger)
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    # a cut is found by the sealed journal first: its record of a release the cut removed
    # names a ledger entry that is no longer there
    assert re.search(r"record names ledger entry \d+, which does not record that release"
                     if damage == "cut" else "lacks the ledgers of client-001", str(refusals[0]))
    assert not (tmp_path / "res" / "results.json").exists()
    assert not (tmp_path / "res" / "anchor.json").exists()
    # the other clients spent no more: nothing after round 2's exchange
    peer = _run_dir(tmp_path, 0) / "fedora" / "client-000.jsonl"
    assert max(e["round"] for e in read_ledger(peer)) == 2


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("before", [1, 2])
def test_a_wiped_node_is_caught(tmp_path: Path, before: int) -> None:
    """With the node's whole run state gone (a re-provisioned host) the node has nothing to
    compare; the server's signed request states the ledger it last received. Wiped right
    after setup, the fresh ledger's round-1 entries outnumbered the summary's one entry and
    the summary release dropped out of the accounting (the review found it)."""
    def wipe(message: Message) -> Message:
        shutil.rmtree(_run_dir(tmp_path, 1))
        return message

    grid, run = _run(tmp_path, dp_config(noise="reproducible"), {(1, before, MSG_ROUND): wipe})
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert "the server last received this client's ledger at" in str(refusals[0])
    assert not (tmp_path / "res" / "results.json").exists()


def test_the_server_also_refuses_a_reported_ledger_that_goes_back() -> None:
    """A second line behind the node's own check: the head a client reports must extend the
    one it reported before."""
    from secure_fedora.runtimes.flower.server_app import _ledger_report_refusal

    def _ledger_went_back(before, now):  # type: ignore[no-untyped-def]
        return _ledger_report_refusal(before, now, who="client-001", where="reply",
                                      went_back_remedy="restore the node's state-dir")

    before = {"ledger_entries": 5, "ledger_head": "a" * 64, "epsilon_spent": 6.5}
    assert _ledger_went_back(None, before) is None
    assert _ledger_went_back(before, {**before, "ledger_entries": 7, "epsilon_spent": 7.0}) is None
    assert _ledger_went_back(before, before) is None
    assert "3 entries after 5" in _ledger_went_back(before, {**before, "ledger_entries": 3})
    assert "another last line" in _ledger_went_back(before, {**before, "ledger_head": "b" * 64})
    assert "epsilon" in _ledger_went_back(before, {**before, "ledger_entries": 6,
                                                   "epsilon_spent": 4.1})


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("private", [True, False])
def test_a_lost_client_state_is_refused_not_restarted(tmp_path: Path, private: bool) -> None:
    """client.pt deleted while the node's ledger and journal show earlier releases: the
    client silently started over from a fresh model."""
    cfg = dp_config(noise="reproducible") if private else with_methods(tiny_config(), "fedavg")
    method = cfg.methods[0]
    grid, run = _run(tmp_path, cfg, _damage_before_round_2(
        tmp_path, lambda d: (d / method / "client.pt").unlink()))
    # the run stops: under DP that client's ledger could never close; without DP it would
    # take no part from then on (before, FedAvg's finalize stopped the run two exchanges later)
    with pytest.raises(DeployError, match="client client-001 .node 1001. refuses to go on"):
        run()
    assert {kind for client, kind, _ in grid.errors if client == 1} == {MSG_ROUND}
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert "(client.pt) is missing" in str(refusals[0])


@pytest.mark.usefixtures("task_identity")
def test_a_dp_client_that_misses_the_final_evaluation_fails_the_run(tmp_path: Path) -> None:
    """Its ledger never got its close entry; the run reported "completed" and its audit
    failed (not_closed) for good."""
    cfg = dp_config(noise="reproducible")
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True, "round-timeout": 0.3,
                                      "result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_request={(2, 2, MSG_EVALUATE): lambda m: None})
    with pytest.raises(DeployError, match=r"fedora: clients \[2\] did not answer the final "
                                          r"evaluation \(round 2\), asked twice, where a DP "
                                          r"client closes its ledger.*last events: client 2: no "
                                          r"reply in time"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_a_crash_in_the_first_release_is_not_taken_for_a_lost_state(tmp_path: Path) -> None:
    """The state file is written before the first release, so a crash between the first
    ledger entry and the first answer (here: client 1's round-1 process killed right after
    its entries are durable; the message is lost with it) leaves a state file, and the
    client goes on in round 2 with its entries counted."""
    from flwr.app import Context, RecordDict

    from secure_fedora.core import crashpoints
    from secure_fedora.runtimes.flower import client_app

    cfg = with_methods(dp_config(noise="reproducible"), "fedavg")
    holder: dict[str, InMemoryGrid] = {}

    def crash_after_admission(message: Message) -> None:
        grid = holder["grid"]
        ctx = Context(grid.run_id, 1001, dict(grid.node_config[1001]), RecordDict(),
                      dict(grid.run_config))
        crashpoints.arm("gate")
        try:
            client_app.HANDLERS[MSG_ROUND](message, ctx)
        except crashpoints.InjectedCrash:
            pass
        finally:
            crashpoints.disarm()
        return None  # the crashed process never answered

    grid, run = _run(tmp_path, cfg, {(1, 1, MSG_ROUND): crash_after_admission})
    holder["grid"] = grid
    results = run()
    assert not grid.errors
    row = results["privacy"]["fedavg"]["clients"][1]
    assert [r["replied"] for r in results["rounds"]] == [2, 3]
    peers = results["privacy"]["fedavg"]["clients"][0]
    assert row["ledger_entries"] == peers["ledger_entries"]  # round 1's entries counted


@pytest.mark.usefixtures("task_identity")
def test_a_missed_final_evaluation_is_asked_again_and_the_run_completes(tmp_path: Path) -> None:
    """A node that restarts while the final evaluation goes out (its first message lost) is
    asked once more: it closes its ledger and the run completes with its final metrics."""


    cfg = dp_config(noise="reproducible")
    lost: list[Message] = []

    def lose_first(message: Message) -> Message | None:
        if not lost:
            lost.append(message)
            return None
        return message

    grid, run = _run(tmp_path, cfg, {(2, 2, MSG_EVALUATE): lose_first})
    results = run()
    assert lost and not grid.errors
    ledger = _run_dir(tmp_path, 2) / "fedora" / "client-002.jsonl"
    assert read_ledger(ledger)[-1]["mechanism"] == "close"
    reference_grid, reference = _run(tmp_path / "ref", cfg, {})
    expected = reference()
    assert results["methods"]["fedora"]["final"]["per_client"] == \
        expected["methods"]["fedora"]["final"]["per_client"]


@pytest.mark.usefixtures("task_identity")
def test_a_stage_waits_for_another_process_of_the_same_client(tmp_path: Path) -> None:
    """A late ClientApp (a round answered after its timeout) and the next message's ClientApp
    of one client each loaded the state, and the one that saved last dropped the other's
    answer (under DP the second failed on the ledger lock instead). A stage now waits until
    the other process is done."""
    import threading
    import time

    from secure_fedora.runtimes.flower.client_app import _stage_lock

    cfg = with_methods(tiny_config(), "fedavg")
    released: list[float] = []
    held = threading.Event()

    def other_process() -> None:
        node = NodeSettings(1, tmp_path / "nodes" / "node-1", tmp_path / "ids")
        with _stage_lock(node, 42):
            held.set()
            time.sleep(0.5)
            released.append(time.time())

    def hold_lock(message: Message) -> Message:
        thread = threading.Thread(target=other_process)
        thread.start()
        held.wait()
        return message

    answered: list[float] = []

    def note_reply(_request: Message, reply: Message) -> Message:
        answered.append(time.time())
        return reply

    grid, run = _run(tmp_path, cfg, {(1, 2, MSG_ROUND): hold_lock})
    grid.tamper_reply[(1, 2, MSG_ROUND)] = note_reply
    results = run()
    assert not grid.errors and [r["replied"] for r in results["rounds"]] == [3, 3]
    assert answered[0] >= released[0]  # client 1's round 2 ran after the other process


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("torn", ["ledger", "journal"])
def test_a_torn_last_line_is_quarantined_and_the_client_goes_on(tmp_path: Path, torn: str) -> None:
    """A node killed mid-append leaves a last line without its newline; its release never left
    (lines are fsynced before a release). The client refused every later message (the ledger
    would not open, the journal would not verify); now the line is quarantined beside the file
    (the ledger also gets a signed repair entry) and the client goes on."""
    from privacy.identity import load_identity
    from privacy.ledger import verify_ledger_file

    def tear(run: Path) -> None:
        path = run / "fedora" / "client-001.jsonl" if torn == "ledger" else run / "releases.jsonl"
        with path.open("ab") as fh:
            fh.write(b'{"index": 99, "partial')

    grid, run = _run(tmp_path, dp_config(noise="reproducible"), _damage_before_round_2(tmp_path, tear))
    results = run()
    assert not grid.errors and [r["replied"] for r in results["rounds"]] == [3, 3]
    node = _run_dir(tmp_path, 1)
    if torn == "ledger":
        ledger = node / "fedora" / "client-001.jsonl"
        assert [e["mechanism"] for e in read_ledger(ledger)].count("repair") == 1
        key = load_identity(tmp_path / "ids" / "client-001", "client-001").signing_key
        assert verify_ledger_file(ledger, key.public_key()) == []
        assert len(list((node / "fedora").glob("client-001.jsonl.torn-*"))) == 1
    else:
        assert (node / "releases.jsonl.torn-2").read_bytes() == b'{"index": 99, "partial'


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("damage", "private"), [("cut", True), ("deleted", True),
                                                 ("deleted", False)])
def test_a_release_journal_cut_or_deleted_on_a_node_stops_its_client(
        tmp_path: Path, damage: str, private: bool) -> None:
    """Found by a damage hunt of Flower run directories: releases.jsonl (what left the node)
    cut to its first record, or deleted, between messages went unnoticed (its shorter chain
    verifies): the client went on, appended its next records after the cut or from seq 0, and
    the node's record lost the releases that had left. Its saved state now records the
    journal's head, which the journal must still hold."""
    cfg = dp_config(noise="reproducible") if private else with_methods(tiny_config(), "fedavg")

    def hit(run: Path) -> None:
        journal = run / "releases.jsonl"
        if damage == "cut":
            journal.write_text(journal.read_text().splitlines()[0] + "\n")
        else:
            journal.unlink()

    grid, run = _run(tmp_path, cfg, _damage_before_round_2(tmp_path, hit))
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert "releases.jsonl" in str(refusals[0]) and "records were lost" in str(refusals[0])
    assert not (tmp_path / "res" / "results.json").exists()
    journal = _run_dir(tmp_path, 1) / "releases.jsonl"
    if damage == "cut":  # the refusal wrote nothing there
        assert len(journal.read_text().splitlines()) == 1
    else:
        assert not journal.exists()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_damaged_plan_cache_is_not_used_for_the_clients_noise(tmp_path: Path,
                                                                 factor: float) -> None:
    """Found by a damage hunt of Flower run directories: plan.json (the calibrated plan a
    node keeps between messages) was used whenever its key matched, so an edited DP-SGD
    noise multiplier silently became the client's: halved, its round-2 release went over
    budget and the client refused it (the run completed without its training); doubled, it
    trained with twice the noise results.json stated. The cache now carries its digest and is
    recalibrated when it does not match."""
    def edit(run: Path) -> None:
        path = run / "fedora" / "plan.json"
        doc = json.loads(path.read_text())
        doc["dpsgd_noise"] *= factor
        path.write_text(json.dumps(doc))

    grid, run = _run(tmp_path, dp_config(noise="reproducible"),
                     _damage_before_round_2(tmp_path, edit))
    results = run()
    assert not grid.errors
    clients = results["privacy"]["fedora"]["clients"]
    assert not any(c["refused"] for c in clients)
    noise = [[e["params"]["noise_multiplier"] for e in read_ledger(
                 _run_dir(tmp_path, c) / "fedora" / f"client-00{c}.jsonl")
              if e["mechanism"] == "dpsgd"] for c in range(3)]
    assert noise[1] == noise[0] == noise[2] == [clients[1]["noise_multiplier"]] * 2


@pytest.mark.usefixtures("task_identity")
def test_a_client_state_restored_from_an_older_copy_is_refused(tmp_path: Path) -> None:
    """client.pt replaced by its copy from an earlier round: its recorded ledger head is still
    held by the (longer) ledger, and the client silently dropped a round's update (the review
    found it). The server's request states what the client last reported, newer than the copy."""
    saved: dict[str, bytes] = {}

    def keep(message: Message) -> Message:
        saved["state"] = (_run_dir(tmp_path, 1) / "fedora" / "client.pt").read_bytes()
        return message

    def restore(message: Message) -> Message:
        (_run_dir(tmp_path, 1) / "fedora" / "client.pt").write_bytes(saved["state"])
        return message

    grid, run = _run(tmp_path, dp_config(rounds=3, noise="reproducible"),
                     {(1, 2, MSG_ROUND): keep, (1, 3, MSG_ROUND): restore})
    with pytest.raises(DeployError, match="refuses to go on"):
        run()
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert "client.pt was replaced by an older copy" in str(refusals[0])


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ["fedora", "fedavg"])
def test_without_dp_a_client_state_restored_from_an_older_copy_stops_the_run(
        tmp_path: Path, method: str) -> None:
    """Without DP there is no ledger head to compare: client 1's client.pt replaced by its
    copy from before round 2 trained round 3 from its round-1 state and the run completed,
    silently mixing rounds. The server's request states the last round of each exchange it
    accepted from the client; the client refuses a state that did not answer as far, and the
    run stops at that exchange, as under DP."""
    saved: dict[str, bytes] = {}

    def keep(message: Message) -> Message:
        saved["state"] = (_run_dir(tmp_path, 1) / method / "client.pt").read_bytes()
        return message

    def restore(message: Message) -> Message:
        (_run_dir(tmp_path, 1) / method / "client.pt").write_bytes(saved["state"])
        return message

    grid, run = _run(tmp_path, with_methods(tiny_config(rounds=3), method),
                     {(1, 2, MSG_ROUND): keep, (1, 3, MSG_ROUND): restore})
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    assert [(c, kind) for c, kind, _ in grid.errors] == [(1, MSG_ROUND)]
    [(_, _, refusal)] = grid.errors
    assert isinstance(refusal, NodeStateError)
    assert "was replaced by an older copy" in str(refusal)
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("method", "before"), [("fedora", 1), ("fedavg", 2)])
def test_without_dp_a_wiped_node_stops_the_run(tmp_path: Path, method: str, before: int) -> None:
    """Without DP a node whose whole run state was wiped (client.pt, journal) after FEDORA's
    setup exchange or FedAvg's first round started its client over from a fresh model, and
    the run completed. The server's record of the client's accepted replies catches it."""
    def wipe(message: Message) -> Message:
        shutil.rmtree(_run_dir(tmp_path, 1))
        return message

    grid, run = _run(tmp_path, with_methods(tiny_config(rounds=2), method),
                     {(1, before, MSG_ROUND): wipe})
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    [(_, _, refusal)] = grid.errors
    assert isinstance(refusal, NodeStateError) and "(client.pt) is missing" in str(refusal)


def test_a_malformed_answered_record_in_a_request_is_refused() -> None:
    from flwr.app import ConfigRecord

    from secure_fedora.runtimes.flower.client_app import _server_answered

    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(DeployError, match="answered-round is malformed"):
            _server_answered(ConfigRecord({"answered-round": bad}))
    assert _server_answered(ConfigRecord({})) == {}
    assert _server_answered(ConfigRecord({"answered-setup": 0, "answered-round": 3})) == \
        {"setup": 0, "round": 3}


@pytest.mark.parametrize("record", [
    {"ledger-entries": -1, "ledger-head": "a" * 64},
    {"ledger-entries": True, "ledger-head": "a" * 64},
    {"ledger-entries": 3, "ledger-head": "A" * 64},
    {"ledger-entries": 3, "ledger-head": "a" * 63},
    {"ledger-entries": 3},
    {"ledger-head": "a" * 64},
])
def test_a_malformed_ledger_state_in_a_request_is_refused(record: dict) -> None:  # type: ignore[type-arg]
    from flwr.app import ConfigRecord

    from secure_fedora.runtimes.flower.client_app import _server_saw

    with pytest.raises(DeployError, match="ledger-entries/ledger-head are malformed"):
        _server_saw(ConfigRecord(record))
    assert _server_saw(ConfigRecord({})) is None
    assert _server_saw(ConfigRecord({"ledger-entries": 3, "ledger-head": "a" * 64})) == (3, "a" * 64)


@pytest.mark.usefixtures("task_identity")
def test_a_partial_client_state_of_a_killed_write_is_removed(tmp_path: Path) -> None:
    """A ClientApp killed while saving client.pt left its temporary file (a copy of the
    client's state) beside it, kept for good as in process before its resume removed them;
    the next message of that client now removes it, and nothing else."""
    def leave_partial(run: Path) -> None:
        (run / "fedavg" / ".client.pt.k1ll3d_x").write_bytes(b"SFCKPT2\n" + b" " * 100)
        (run / "fedavg" / "notes.txt").write_text("kept")

    grid, run = _run(tmp_path, with_methods(tiny_config(), "fedavg"),
                     _damage_before_round_2(tmp_path, leave_partial))
    run()
    folder = _run_dir(tmp_path, 1) / "fedavg"
    assert not grid.errors
    assert not (folder / ".client.pt.k1ll3d_x").exists()
    assert (folder / "notes.txt").read_text() == "kept"


@pytest.mark.usefixtures("task_identity")
def test_a_ledger_cut_inside_a_reported_entry_is_refused_not_repaired(tmp_path: Path) -> None:
    """A node's ledger cut in the middle of an entry the client had reported (its saved state
    and the server hold the longer ledger) looked like a torn write: the ClientApp quarantined
    the bytes and appended a signed repair entry ("write never completed, nothing released")
    before its state check refused. Such a cut is refused now before anything is written."""
    kept: dict[str, bytes] = {}

    def cut_inside_last_entry(run: Path) -> None:
        ledger = run / "fedora" / "client-001.jsonl"
        data = ledger.read_bytes()
        ledger.write_bytes(data[:-40])
        kept["ledger"] = data[:-40]

    grid, run = _run(tmp_path, dp_config(noise="reproducible"),
                     _damage_before_round_2(tmp_path, cut_inside_last_entry))
    with pytest.raises(DeployError, match="refuses to go on"):
        run()
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert "cut or damaged since" in str(refusals[0])
    folder = _run_dir(tmp_path, 1) / "fedora"
    assert (folder / "client-001.jsonl").read_bytes() == kept["ledger"]
    assert not list(folder.glob("client-001.jsonl.torn-*"))


def _node_files(node: Path) -> dict[Path, bytes]:
    """Every file of a node's state dir but the envelopes' nonce memory (a verified request's
    nonce is recorded whatever the answer, so it cannot be replayed) and the node's record of
    the errors it answered with (the refusal itself is recorded there)."""
    return {p: p.read_bytes() for p in node.rglob("*")
            if p.is_file() and not p.name.endswith(".nonces.jsonl")
            and p.name != CLIENT_ERRORS_LOG}


def _state_lost(run: Path) -> None:
    (run / "fedora" / "client.pt").unlink()


def _ledger_forged(run: Path) -> None:
    ledger = run / "fedora" / "client-001.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["signature"] = ("0" if entry["signature"][0] != "0" else "1") + entry["signature"][1:]
    lines[0] = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
    ledger.write_bytes(b"".join(lines))


def _journal_edited(run: Path) -> None:
    journal = run / "releases.jsonl"
    journal.write_bytes(journal.read_bytes().replace(b'"round":1', b'"round":7', 1))
    (run / "fedora" / ".client.pt.k1ll3d_x").write_bytes(b"SFCKPT2\n" + b" " * 100)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("refused", [_state_lost, _ledger_forged, _journal_edited],
                         ids=["state-lost", "forged", "journal-edited"])
def test_a_refused_message_changes_no_file_on_the_node(tmp_path: Path, refused) -> None:  # type: ignore[no-untyped-def]
    """A message refused by the node's checks (client.pt lost; a ledger line forged; a
    release journal record edited, found only when the release was journaled, after its
    admission) had already moved the journal's torn last record aside and repaired the
    ledger's torn last line (a .torn file each, a signed repair entry), and removed a partial
    state write: the checks run first now, reading only, so the node's files are byte for
    byte what they were."""
    before: dict[Path, bytes] = {}

    def damage(run: Path) -> None:
        for path in (run / "fedora" / "client-001.jsonl", run / "releases.jsonl"):
            with path.open("ab") as fh:
                fh.write(b'{"index": 99, "partial')
        refused(run)
        before.update(_node_files(run.parent.parent))

    grid, run = _run(tmp_path, dp_config(noise="reproducible"),
                     _damage_before_round_2(tmp_path, damage))
    # the node's state is damaged: the run stops there (a forged line, a LedgerError, did not)
    with pytest.raises(DeployError, match="refuses to go on"):
        run()
    assert grid.errors and all(c == 1 and isinstance(e, NodeStateError) for c, _, e in grid.errors)
    assert _node_files(tmp_path / "nodes" / "node-1") == before
    assert "NodeStateError" in (_run_dir(tmp_path, 1) / CLIENT_ERRORS_LOG).read_text()


def _comparable(results: dict) -> dict:  # type: ignore[type-arg]
    return {"metrics": {m: {k: r[k]["per_client"] for k in ("final", "selected") if k in r}
                        for m, r in results["methods"].items()},
            "replied": [r["replied"] for r in results["rounds"]],
            "privacy": {m: [{k: c[k] for k in ("epsilon_spent", "ledger_entries")}
                            for c in p["clients"]] for m, p in results["privacy"].items()}}


@pytest.mark.usefixtures("task_identity")
def test_a_ledger_cut_inside_its_close_entry_is_restored_bit_for_bit(tmp_path: Path) -> None:
    """A node's ledger cut inside its close entry (after the final evaluation, whose reply was
    lost, so the server asks again) was refused as cut for good: the run could not finish.
    The close entry is journaled whole now and written back bit for bit; the run ends as an
    uninterrupted one."""
    from privacy.identity import load_identity
    from privacy.ledger import verify_ledger_file

    cfg = with_methods(dp_config(noise="reproducible"), "fedavg")
    ledger = _run_dir(tmp_path, 1) / "fedavg" / "client-001.jsonl"
    intact: dict[str, bytes] = {}

    def cut_close_lose_reply(_request: Message, reply: Message) -> Message | None:
        if intact:
            return reply
        data = ledger.read_bytes()
        close = data.splitlines(keepends=True)[-1]
        assert json.loads(close)["mechanism"] == "close"
        intact["ledger"] = data
        ledger.write_bytes(data[:len(data) - len(close) + 57])
        return None

    grid, run = _run(tmp_path, cfg, {})
    grid.tamper_reply[(1, 2, MSG_EVALUATE)] = cut_close_lose_reply
    results = run()
    assert intact and not grid.errors
    assert ledger.read_bytes() == intact["ledger"]
    assert not list(ledger.parent.glob("*.torn-*"))
    key = load_identity(tmp_path / "ids" / "client-001", "client-001").signing_key
    assert verify_ledger_file(ledger, key.public_key()) == []
    _, reference = _run(tmp_path / "ref", cfg, {})
    assert _comparable(results) == _comparable(reference())


@pytest.mark.usefixtures("task_identity")
def test_a_ledger_cut_inside_a_refusal_is_restored_and_the_refusal_stands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step check refused client 1's round-2 model (one DP-SGD step more than accounted);
    its ledger then cut inside that refusal entry (written after the state the client last
    reported) was 'repaired' as a write that never completed: a signed false claim, the
    refusal gone. The refusal is journaled whole now and written back bit for bit."""
    from secure_fedora.learning.dp import DPGradient

    honest = DPGradient.batches
    extra: list[bool] = []

    def one_extra(self, n, epochs, generator, **kw):  # type: ignore[no-untyped-def]
        yield from honest(self, n, epochs, generator, **kw)
        if extra:
            extra.clear()
            yield from list(honest(self, n, epochs, generator, **kw))[:1]

    monkeypatch.setattr(DPGradient, "batches", one_extra)
    cfg = with_methods(dp_config(noise="reproducible"), "fedavg")
    ledger = _run_dir(tmp_path, 1) / "fedavg" / "client-001.jsonl"
    intact: dict[str, bytes] = {}

    def refuse_round_2(message: Message) -> Message:
        extra.append(True)
        return message

    def cut_refusal(message: Message) -> Message:
        data = ledger.read_bytes()
        refusal = data.splitlines(keepends=True)[-1]
        assert json.loads(refusal)["mechanism"] == "refusal"
        intact["ledger"] = data
        ledger.write_bytes(data[:-len(refusal) // 2])
        return message

    grid, run = _run(tmp_path, cfg, {(1, 2, MSG_ROUND): refuse_round_2,
                                     (1, 2, MSG_EVALUATE): cut_refusal})
    results = run()
    assert intact
    lines = ledger.read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:-1]) == intact["ledger"]
    assert [json.loads(line)["mechanism"] for line in lines[-2:]] == ["refusal", "close"]
    assert not list(ledger.parent.glob("*.torn-*"))
    _, reference = _run(tmp_path / "ref", cfg, {(1, 2, MSG_ROUND): refuse_round_2})
    assert _comparable(results) == _comparable(reference())


def _crashing(holder: dict[str, InMemoryGrid], point: str,
              seen: list[dict[str, bool]]):  # type: ignore[no-untyped-def]
    """Client 1's round ClientApp killed at crash point ``point`` (its message lost with it);
    ``seen`` gets what its method folder held then."""
    from flwr.app import Context, RecordDict

    from secure_fedora.core import crashpoints
    from secure_fedora.runtimes.flower import client_app

    def crash(message: Message) -> None:
        grid = holder["grid"]
        ctx = Context(grid.run_id, 1001, dict(grid.node_config[1001]), RecordDict(),
                      dict(grid.run_config))
        crashpoints.arm(point)
        try:
            client_app.HANDLERS[MSG_ROUND](message, ctx)
        except crashpoints.InjectedCrash:
            folder = _run_dir(holder["root"], 1) / "fedavg"
            seen.append({"ledger": (folder / "client-001.jsonl").is_file(),
                         "record": (folder / "model.json").is_file()})
        finally:
            crashpoints.disarm()
        return None  # the killed process never answered
    return crash


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("point", ["ledger_staged", "ledgers_created"])
def test_a_node_killed_while_creating_its_ledger_resumes(tmp_path: Path, point: str) -> None:
    """A node's ledger was created without its model record, outside the creation's crash
    points; killed between the ledger and its record, the next message keeps the empty
    ledger and completes the creation, and the run completes."""
    cfg = with_methods(dp_config(noise="reproducible"), "fedavg")
    holder: dict = {"root": tmp_path}
    seen: list[dict[str, bool]] = []
    grid, run = _run(tmp_path, cfg, {(1, 1, MSG_ROUND): _crashing(holder, point, seen)})
    holder["grid"] = grid
    results = run()
    assert seen == [{"ledger": True, "record": point == "ledgers_created"}]
    assert not grid.errors and [r["replied"] for r in results["rounds"]] == [2, 3]
    folder = _run_dir(tmp_path, 1) / "fedavg"
    assert json.loads((folder / "model.json").read_text())["model_fingerprint"]
    assert read_ledger(folder / "client-001.jsonl")[-1]["mechanism"] == "close"


@pytest.mark.usefixtures("task_identity")
def test_a_model_record_deleted_beside_a_ledger_with_entries_is_refused_as_lost(
        tmp_path: Path) -> None:
    """Found by a kill-and-corrupt hunt: a node's model.json deleted after its ledger recorded
    releases was written again from whatever model the node built then (a node upgraded to
    software building another model would go on unnoticed). The record is written before the
    ledger's first entry, so it is refused as lost, naming the file, and nothing is written."""
    cfg = with_methods(dp_config(noise="reproducible"), "fedavg")
    record = _run_dir(tmp_path, 1) / "fedavg" / "model.json"

    def delete(message: Message) -> Message:
        record.unlink()
        return message

    grid, run = _run(tmp_path, cfg, {(1, 2, MSG_ROUND): delete})
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert f"{record} is missing" in str(refusals[0])
    assert not record.exists()


@pytest.mark.usefixtures("task_identity")
def test_a_ledger_deleted_before_its_first_answer_is_refused_as_lost(tmp_path: Path) -> None:
    """Client 1 killed after its first release was admitted (the release never left), so its
    state still recorded an empty ledger and the server had seen none, then its ledger
    deleted: the next message recreated the ledger empty, and the admitted entry vanished
    unnoticed."""
    cfg = with_methods(dp_config(noise="reproducible"), "fedavg")
    holder: dict = {"root": tmp_path}
    seen: list[dict[str, bool]] = []

    def delete(message: Message) -> Message:
        (_run_dir(tmp_path, 1) / "fedavg" / "client-001.jsonl").unlink()
        return message

    grid, run = _run(tmp_path, cfg, {(1, 1, MSG_ROUND): _crashing(holder, "gate", seen),
                                     (1, 1, MSG_EVALUATE): delete})
    holder["grid"] = grid
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    assert seen == [{"ledger": True, "record": True}]
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert "lacks the ledgers of client-001" in str(refusals[0])
    assert not (_run_dir(tmp_path, 1) / "fedavg" / "client-001.jsonl").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_node_building_another_model_is_refused(tmp_path: Path) -> None:
    """The model record written with a node's ledger binds the run's releases to the model
    they came from: a node whose software builds another model for the run's config (here:
    a record of another architecture) refuses to go on."""
    import torch

    from secure_fedora.runtimes.inprocess import model_record

    other = model_record(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10)))

    def swap(run: Path) -> None:
        (run / "fedora" / "model.json").write_bytes(other)

    grid, run = _run(tmp_path, dp_config(noise="reproducible"),
                     _damage_before_round_2(tmp_path, swap))
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert "records another model than this one" in str(refusals[0])


def _node_context(grid: InMemoryGrid, client: int):  # type: ignore[no-untyped-def]
    from flwr.app import Context, RecordDict

    node = 1000 + client
    return Context(grid.run_id, node, dict(grid.node_config[node]), RecordDict(),
                   dict(grid.run_config))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("damage", ["deleted", "cut", "edited"])
def test_a_nonce_memory_lost_on_a_node_stops_its_client(tmp_path: Path, damage: str) -> None:
    """A node's envelope nonce memory (runs/<run>/<method>/<client>.nonces.jsonl) deleted, cut
    or edited between messages went unnoticed: the node accepted again a message it had
    accepted (here client 1's round-1 evaluation request, replayed before round 2) and went
    on. Its saved state now records the nonce memory, which the file must still hold: the
    replay and the next message are refused with NodeStateError, the file left as it was."""
    from secure_fedora.runtimes.flower import client_app

    cfg = with_methods(tiny_config(), "fedavg")
    captured: list[Message] = []
    replayed: list[object] = []
    holder: dict[str, InMemoryGrid] = {}
    nonces = _run_dir(tmp_path, 1) / "fedavg" / "client-001.nonces.jsonl"
    damaged: list[bytes | None] = []

    def capture(message: Message) -> Message:
        captured.append(message)
        return message

    def damage_then_replay(message: Message) -> Message:
        if not damaged:
            damage_nonce_file(nonces, damage)
            damaged.append(nonces.read_bytes() if nonces.exists() else None)
            try:
                replayed.append(client_app.HANDLERS[MSG_EVALUATE](
                    captured[0], _node_context(holder["grid"], 1)))
            except client_app.WithheldError as err:
                replayed.append(err.original)
        return message

    grid, run = _run(tmp_path, cfg, {(1, 1, MSG_EVALUATE): capture,
                                     (1, 2, MSG_ROUND): damage_then_replay})
    holder["grid"] = grid
    with pytest.raises(DeployError, match=r"client client-001 \(node 1001\) refuses to go on"):
        run()
    assert len(replayed) == 1 and isinstance(replayed[0], NodeStateError)  # not a reply
    refusals = [err for client, _, err in grid.errors if client == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    text = str(refusals[0])
    assert "client-001.nonces.jsonl" in text and "accepted again" in text
    assert ("is missing" if damage == "deleted" else "was cut or edited") in text
    assert "Restore the node's state-dir" in text
    assert not (tmp_path / "res" / "results.json").exists()
    assert (nonces.read_bytes() if nonces.exists() else None) == damaged[0]


@pytest.mark.usefixtures("task_identity")
def test_a_crash_between_the_nonce_and_the_saved_state_is_not_taken_for_a_lost_memory(
        tmp_path: Path) -> None:
    """The nonce is durable before the message is acted on, the state recording it is saved
    after: a process killed in between (here client 1's final evaluation, its state save
    never done; the message lost with it) leaves a nonce memory holding more than recorded,
    in the same round. The server asks again and the run completes, the crashed request
    still a replay."""
    from secure_fedora.core import crashpoints
    from secure_fedora.runtimes.flower import client_app
    from secure_fedora.runtimes.flower.state import ClientRunState

    cfg = with_methods(dp_config(noise="reproducible"), "fedavg")
    holder: dict[str, InMemoryGrid] = {}
    crashed: list[Message] = []
    asked_again: list[Message] = []

    def killed_before_the_state_is_saved(message: Message) -> Message | None:
        if crashed:
            asked_again.append(message)
            return message
        crashed.append(message)
        save = ClientRunState.save

        def crash(self: ClientRunState, path: Path) -> None:
            raise crashpoints.InjectedCrash("killed before the state recording the nonce")

        ClientRunState.save = crash  # type: ignore[method-assign]
        try:
            with pytest.raises(crashpoints.InjectedCrash):
                client_app.HANDLERS[MSG_EVALUATE](message, _node_context(holder["grid"], 1))
        finally:
            ClientRunState.save = save  # type: ignore[method-assign]
        return None  # the killed process never answered

    grid, run = _run(tmp_path, cfg, {(1, 2, MSG_EVALUATE): killed_before_the_state_is_saved})
    holder["grid"] = grid
    results = run()
    assert len(crashed) == 1 and len(asked_again) == 1 and not grid.errors
    assert results["methods"]["fedavg"]["final"]["per_client"][1] is not None
    ledger = _run_dir(tmp_path, 1) / "fedavg" / "client-001.jsonl"
    assert read_ledger(ledger)[-1]["mechanism"] == "close"
    with pytest.raises(client_app.WithheldError) as err:  # a replay (finalize moved its round)
        client_app.HANDLERS[MSG_EVALUATE](crashed[0], _node_context(grid, 1))
    assert isinstance(err.value.original, EnvelopeError)


@pytest.mark.parametrize("head", [{"floor": -1, "nonces": []}, {"floor": 1},
                                  {"floor": 1, "nonces": [["server", "ab"]]},
                                  {"floor": 1, "nonces": [], "extra": 0}])
def test_a_malformed_nonce_head_in_a_client_state_is_refused(tmp_path: Path, head: dict) -> None:  # type: ignore[type-arg]
    """A client.pt whose recorded nonce memory is not (floor, [sender, nonce, round] ...) is
    refused on load, naming the file, rather than compared field by field."""
    import torch

    from secure_fedora.runtimes.flower.state import ClientRunState

    path = tmp_path / "client.pt"
    ClientRunState(1, 42, "h" * 64, "fedavg", torch.Generator().get_state(),
                   nonce_head=head).save(path)
    with pytest.raises(NodeStateError, match=r"client\.pt: nonce_head is not"):
        ClientRunState.load(path, 1, 42, "h" * 64, "fedavg")
    ClientRunState(1, 42, "h" * 64, "fedavg", torch.Generator().get_state(),
                   nonce_head={"floor": 1, "nonces": [["server", "a" * 32, 1]]}).save(path)
    assert ClientRunState.load(path, 1, 42, "h" * 64, "fedavg").nonce_head["floor"] == 1


@pytest.mark.usefixtures("task_identity")
def test_a_journaled_release_a_node_is_not_remaking_is_not_called_an_earlier_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Flower node, a journal record for a release the node was not re-making (its saved
    state does not show it unanswered) was refused as "a release of an earlier run in this
    directory": a node's state dir is its run's, so that misled; the refusal now says the
    saved state and the ledger disagree about this release, and nothing is released."""
    import torch

    from privacy.journal import JournalError
    from privacy.pipeline import Release
    from secure_fedora.runtimes.flower import client_app

    opened: list[tuple[int, object]] = []
    real = client_app._open_privacy

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        privacy = real(*args, **kwargs)
        opened.append((args[1].partition_id, privacy))
        return privacy

    monkeypatch.setattr(client_app, "_open_privacy", recording)
    grid, run = _run(tmp_path, dp_config(noise="reproducible"), {})
    run()
    assert not grid.errors
    # the last message client 1's node handled: its stage is not re-making a release
    privacy = [p for client, p in opened if client == 1][-1]
    stage = privacy.sole.journal  # type: ignore[attr-defined]
    assert not stage.resumed and stage.journal.get(1, "model") is not None
    before = stage.journal.path.read_bytes()
    again = Release("model", torch.zeros(3), 1, metadata={"ledger_index": 0})
    with pytest.raises(JournalError) as err:
        stage.process(again)
    message = str(err.value)
    assert "already records the round-1 'model' release of this client in this run, but the " \
           "node's saved state does not show that release as unanswered" in message
    assert "saved state and the ledger disagree" in message and "earlier run" not in message
    assert stage.journal.path.read_bytes() == before


@pytest.mark.usefixtures("task_identity")
def test_a_damaged_plan_cache_of_a_run_ledgered_before_prvs_refining_pass_is_recalibrated_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PRV run whose round-1 ledger entries were written by a version without PRV's
    refining pass (no accountant_params.refined_eps_error), continued by today's version
    with client 1's plan.json damaged: its plan was calibrated again with the refining pass,
    so its round-2 release differed from the one its ledger's accountant plans (as in process,
    the recalibration now follows the ledger's recorded parameters). The run completes and
    client 1's noise is the other clients', every round."""
    from privacy.accounting import ACCOUNTANT_REGISTRY, _epsilon
    from tests.secure_fedora.runtimes.test_crash_resume import _old_prv

    today = ACCOUNTANT_REGISTRY["prv"]
    _old_prv(monkeypatch)

    def upgrade_and_damage(run: Path) -> None:
        monkeypatch.setitem(ACCOUNTANT_REGISTRY, "prv", today)
        _epsilon.cache_clear()
        path = run / "fedora" / "plan.json"
        doc = json.loads(path.read_text())
        doc["dpsgd_noise"] *= 2
        path.write_text(json.dumps(doc))

    grid, run = _run(tmp_path, dp_config(noise="reproducible", accountant="prv", epsilon=0.5),
                     _damage_before_round_2(tmp_path, upgrade_and_damage))
    results = run()
    assert not grid.errors
    clients = results["privacy"]["fedora"]["clients"]
    assert not any(c["refused"] for c in clients)
    entries = [[e for e in read_ledger(_run_dir(tmp_path, c) / "fedora" / f"client-00{c}.jsonl")
                if e["mechanism"] == "dpsgd"] for c in range(3)]
    assert all("refined_eps_error" not in e["params"]["accountant_params"]
               for c in entries for e in c)
    noise = [[e["params"]["noise_multiplier"] for e in c] for c in entries]
    assert noise[1] == noise[0] == noise[2] and len(noise[1]) == 2
    plan = json.loads((_run_dir(tmp_path, 1) / "fedora" / "plan.json").read_text())
    assert plan["prv_refine"] is False  # kept, so the next message plans the same


@pytest.mark.usefixtures("task_identity")
def test_a_damaged_plan_cache_is_recalibrated_under_the_accountant_its_ledger_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose ledgers were written under "auto"'s PLD, continued where "auto" now
    chooses RDP (a version that chose per client's budget only, or another choice rule), with
    client 1's plan.json damaged: the recalibration keeps the accountant the ledger names, so
    the client's releases stay under one accountant and the other clients' noise."""
    from secure_fedora.secure import private
    from secure_fedora.secure.private import AccountantChoice

    def damage_and_rechoose(run: Path) -> None:
        monkeypatch.setattr(private, "choose_accountant",
                            lambda *_: AccountantChoice("rdp", "another choice"))
        (run / "fedora" / "plan.json").write_text("{}")

    grid, run = _run(tmp_path, dp_config(noise="reproducible"),
                     _damage_before_round_2(tmp_path, damage_and_rechoose))
    results = run()
    assert not grid.errors and results["privacy"]["fedora"]["accountant"] == "pld"
    entries = [read_ledger(_run_dir(tmp_path, c) / "fedora" / f"client-00{c}.jsonl")
               for c in range(3)]
    assert {e["accountant"] for c in entries for e in c} == {"pld"}
    noise = [[e["params"]["noise_multiplier"] for e in c if e["mechanism"] == "dpsgd"]
             for c in entries]
    assert noise[1] == noise[0] == noise[2] and len(noise[1]) == 2
