"""The first contact, the setup and finalize exchanges on Flower survive one lost reply: the client is asked once
more and answers from its saved state (under DP its summary is released, and accounted, once);
a client that misses both is a DeployError naming it and its last event, never the method's
error about a missing summary or a results list that silently lacks a client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import (
    MSG_EVALUATE,
    MSG_FINALIZE,
    MSG_HELLO,
    MSG_SETUP,
    DeployError,
    RunSettings,
)
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    audit_folder,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)


def _run(tmp_path: Path, cfg: Any, tamper: dict, **over: Any) -> tuple[InMemoryGrid, Any]:  # type: ignore[type-arg]
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": cfg.privacy.enabled,
                                      "round-timeout": 0.3, "connect-timeout": 0.3,
                                      "result-dir": str(tmp_path / "res"), **over})
    (tmp_path / "res").mkdir(exist_ok=True)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_reply=tamper)
    return grid, lambda: server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


def _lose(times: int, lost: list[Message]):  # type: ignore[no-untyped-def]
    """A reply hook that loses the first ``times`` replies (kept in ``lost``)."""
    def hook(_request: Message, reply: Message) -> Message | None:
        if len(lost) < times:
            lost.append(reply)
            return None
        return reply
    return hook


@pytest.mark.usefixtures("task_identity")
def test_a_lost_setup_reply_is_asked_again_and_the_summary_released_once(tmp_path: Path) -> None:
    """FEDORA's noised summary of client 1 is released, journaled and its reply lost: the
    setup exchange ended the run with a RelatednessError. Asked again, the client answers
    with the same bytes from its saved state; its ledger holds one summary release, the run
    equals one without the loss and its audit verifies."""
    from audits.verify import verify_run
    from privacy.ledger import read_ledger
    from secure_fedora.runtimes.flower.state import ReleaseJournal

    cfg = dp_config(rounds=1, noise="reproducible")
    replies: list[Message] = []

    def lose_first(_request: Message, reply: Message) -> Message | None:
        replies.append(reply)
        return None if len(replies) == 1 else reply

    grid, run = _run(tmp_path, cfg, {(1, 0, MSG_SETUP): lose_first})
    results = run()
    assert len(replies) == 2 and not grid.errors
    assert [e["event"] for e in results["events"]] == [
        "no reply in time: counts as not taking part in the setup exchange"]
    lost, resent = ({k: bytes(a.data) for k, a in r.content["payload"].items()} for r in replies)
    assert list(lost) == ["summary"] and resent == lost  # the saved release, not a second draw
    run_dir = tmp_path / "nodes" / "node-1" / "runs" / "42"
    ledger = read_ledger(run_dir / "fedora" / "client-001.jsonl")
    assert [e["mechanism"] for e in ledger].count("gaussian_summary") == 1
    assert [e["kind"] for e in ReleaseJournal(run_dir / "releases.jsonl").entries()].count(
        "fedora/setup") == 1
    _, reference = _run(tmp_path / "ref", cfg, {})
    expected = reference()
    for part in ("selected", "final"):
        assert results["methods"]["fedora"][part] == expected["methods"]["fedora"][part]
    audit = audit_folder(tmp_path)
    report = verify_run(audit, allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                        anchor=tmp_path / "res" / "anchor.json")
    assert report.errors == [], report.errors


@pytest.mark.usefixtures("task_identity")
def test_a_client_that_misses_the_setup_exchange_twice_stops_the_run_naming_it(
        tmp_path: Path) -> None:
    grid, run = _run(tmp_path, tiny_config(rounds=1), {(1, 0, MSG_SETUP): lambda q, r: None})
    with pytest.raises(DeployError, match=r"fedora: clients \[1\] gave no accepted setup reply "
                                          r"\(asked twice\).*last events: client 1: no reply in "
                                          r"time"):
        run()
    assert sum(m.metadata.message_type == MSG_SETUP for m in grid.sent) == 4
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_lost_finalize_reply_is_asked_again_and_every_client_is_reported(
        tmp_path: Path) -> None:
    """FedAvg's fine-tuned metrics were the replies' in client order: a lost reply left a
    list of two metrics for three clients (the last client's metric under the second's
    index). Asked again, client 1 answers from its saved state, without fine-tuning twice."""
    cfg = with_methods(tiny_config(rounds=1), "fedavg")
    finalize = (1, 2, MSG_FINALIZE)  # the finalize exchange's round is rounds + 1
    lost: list[Message] = []
    grid, run = _run(tmp_path, cfg, {finalize: _lose(1, lost)})
    results = run()
    assert len(lost) == 1 and not grid.errors
    _, reference = _run(tmp_path / "ref", cfg, {})
    tuned = results["methods"]["fedavg"]["extra"]["finetuned_test_accuracy"]
    assert len(tuned) == 3
    assert tuned == reference()["methods"]["fedavg"]["extra"]["finetuned_test_accuracy"]
    assert results["methods"]["fedavg_ft"] == json.loads(
        (tmp_path / "ref" / "res" / "results.json").read_text())["methods"]["fedavg_ft"]


@pytest.mark.usefixtures("task_identity")
def test_a_client_that_misses_the_finalize_exchange_twice_stops_the_run_naming_it(
        tmp_path: Path) -> None:
    cfg = with_methods(tiny_config(rounds=1), "fedavg")
    grid, run = _run(tmp_path, cfg, {(2, 2, MSG_FINALIZE): lambda q, r: None})
    with pytest.raises(DeployError, match=r"fedavg: clients \[2\] gave no accepted finalize "
                                          r"reply \(asked twice\).*last events: client 2: no "
                                          r"reply in time"):
        run()
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_lost_final_evaluation_reply_is_asked_again_without_dp(tmp_path: Path) -> None:
    """Only DP runs asked the final evaluation again: without DP one lost reply in the only
    evaluated round stopped the run ("never reported an evaluation"), and in a longer run the
    client's final metric was an earlier round's. Now every client that missed it is asked
    once more, and the run equals one without the loss."""
    cfg = tiny_config(rounds=1)
    lost: list[Message] = []
    grid, run = _run(tmp_path, cfg, {(1, 1, MSG_EVALUATE): _lose(1, lost)})
    results = run()
    assert len(lost) == 1 and not grid.errors
    _, reference = _run(tmp_path / "ref", cfg, {})
    expected = reference()
    for part in ("selected", "final"):
        assert results["methods"]["fedora"][part] == expected["methods"]["fedora"][part]


@pytest.mark.usefixtures("task_identity")
def test_a_client_that_misses_the_final_evaluation_twice_is_named_stale_in_the_results(
        tmp_path: Path) -> None:
    """Without DP a client that missed the final evaluation twice kept its round-1 metric
    as its final one and the run completed, only an event saying so, while the README said
    no client's final metric is an earlier round's. The results now name it under
    final.stale_clients (and selected.stale_clients when the selected round is the last) with
    the round its metric is from, and the printed summary says so; every other client's
    metric is its own final one."""
    from io import StringIO

    from rich.console import Console

    from secure_fedora.runtimes.summary import print_run_summary

    cfg = tiny_config(rounds=2)
    grid, run = _run(tmp_path, cfg, {(1, 2, MSG_EVALUATE): lambda q, r: None})
    results = run()
    body = results["methods"]["fedora"]
    assert body["final"]["stale_clients"] == [{"client": 1, "round": 1}]
    if body["selected"]["round"] == 2:
        assert body["selected"]["stale_clients"] == [{"client": 1, "round": 1}]
    else:  # round 1 selected: every client's metric is round 1's
        assert "stale_clients" not in body["selected"]
    stored = json.loads((tmp_path / "res" / "results.json").read_text())
    assert stored["methods"]["fedora"]["final"]["stale_clients"] == [{"client": 1, "round": 1}]
    out = StringIO()
    print_run_summary(Console(file=out, width=200), stored, tmp_path / "res")
    assert "fedora final: client 1's metric is from round 1, not round 2's" in out.getvalue()
    # an undisturbed run names no client
    _, reference = _run(tmp_path / "ref", cfg, {})
    expected = reference()["methods"]["fedora"]
    assert "stale_clients" not in expected["final"] and "stale_clients" not in expected["selected"]


def test_stale_clients_names_every_metric_not_from_the_reported_round() -> None:
    """An older metric names its round; a client with none yet (its figure the tracker's
    placeholder 0) is named with round None; none stale: no key."""
    assert server_app.stale_clients({0: 3, 1: 2}, 3, 3) == {
        "stale_clients": [{"client": 1, "round": 2}, {"client": 2, "round": None}]}
    assert server_app.stale_clients({0: 3, 1: 3}, 3, 2) == {}


@pytest.mark.usefixtures("task_identity")
def test_a_lost_hello_reply_is_asked_again_and_the_run_equals_an_undisturbed_one(
        tmp_path: Path) -> None:
    """The first contact had no retry: one lost hello reply stopped the run ("missing
    clients [1]"), naming no cause. The node is now asked once more, as in every other
    exchange, and the run (sizes, node map, results) equals one without the loss."""
    lost: list[Message] = []
    cfg = tiny_config(rounds=1)
    grid, run = _run(tmp_path, cfg, {(1, 0, MSG_HELLO): _lose(1, lost)})
    results = run()
    assert len(lost) == 1 and not grid.errors
    assert sum(m.metadata.message_type == MSG_HELLO for m in grid.sent) == 4
    assert [(e["method"], e["client"], e["node"], e["event"]) for e in results["events"]] == [
        (None, None, 1001, "no query.hello reply in time")]
    _, reference = _run(tmp_path / "ref", cfg, {})
    expected = reference()
    assert results["clients"] == expected["clients"]
    assert results["node_of_client"] == expected["node_of_client"]
    for part in ("selected", "final"):
        assert results["methods"]["fedora"][part] == expected["methods"]["fedora"][part]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("node", "grid_over", "last"), [
    (1001, {"tamper_reply": {(1, 0, MSG_HELLO): lambda q, r: None}},
     "no query.hello reply in time"),
    (1002, {"fail": {(2, 0): "node disk full"}}, "query.hello failed: 0: node disk full"),
])
def test_a_node_that_misses_the_first_contact_twice_stops_the_run_naming_it(
        tmp_path: Path, node: int, grid_over: dict, last: str) -> None:  # type: ignore[type-arg]
    rc = run_config(tiny_config(rounds=1), tmp_path, **{"round-timeout": 0.3,
                                                         "connect-timeout": 0.3,
                                                         "result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, **grid_over)
    with pytest.raises(DeployError, match=(
            rf"identification; missing clients \[{node - 1000}\] \(asked twice; nodes online: "
            rf"\[1000, 1001, 1002\]; no client identified at nodes \[{node}\]\); their last "
            rf"events: node {node}: {last}$")):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in grid.sent] == [1000, 1001, 1002, node]
    assert not (tmp_path / "res" / "results.json").exists()


def _dies_once_after_journaling(monkeypatch: pytest.MonkeyPatch,
                                then: Any = None) -> list[int]:
    """Client 1's ClientApp dies (an error reply: the server asks again) after its setup
    release was admitted, journaled and recorded in the node's release journal, before its
    state (the saved answer) is written; ``then(run_dir)`` runs just before it dies."""
    from secure_fedora.runtimes.flower.state import ClientRunState

    save = ClientRunState.save
    died: list[int] = []

    def dies_once(self: ClientRunState, path: Path) -> None:
        if self.client_id == 1 and self.answered.get("setup") == 0 and not died:
            died.append(1)
            if then is not None:
                then(path.parent.parent)
            raise SystemError("ClientApp killed")
        save(self, path)

    monkeypatch.setattr(ClientRunState, "save", dies_once)
    return died


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("noise", ["reproducible", "csprng"])
def test_a_setup_release_redone_after_its_client_app_died_unsaved_is_remade_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noise: str) -> None:
    """Client 1's ClientApp dies after its noised summary was admitted and journaled but
    before its state was written. Asked again, it re-makes the journaled release: the same
    noise (restored from its sealed journal record with CSPRNG noise, whose key is never
    saved elsewhere) gives the very bytes its node journaled before it died (a new draw would
    differ and be refused), and its ledger entry is consumed, not appended: the ledger,
    epsilon and audit equal an uninterrupted run's and no release is reported made twice."""
    from audits.report import build_report
    from audits.verify import verify_run
    from privacy.ledger import read_ledger
    from secure_fedora.runtimes.flower.state import ReleaseJournal

    died = _dies_once_after_journaling(monkeypatch)
    cfg = dp_config(rounds=1, noise=noise)
    over = {"reproducible-dp-noise": noise == "reproducible"}
    grid, run = _run(tmp_path, cfg, {}, **over)
    results = run()
    assert died == [1] and [(c, kind) for c, kind, _ in grid.errors] == [(1, MSG_SETUP)]
    monkeypatch.undo()
    _, reference = _run(tmp_path / "ref", cfg, {}, **over)
    expected = reference()
    run_dir = tmp_path / "nodes" / "node-1" / "runs" / "42"
    ledger = read_ledger(run_dir / "fedora" / "client-001.jsonl")
    once = read_ledger(tmp_path / "ref" / "nodes" / "node-1" / "runs" / "42" / "fedora"
                       / "client-001.jsonl")
    assert [e["mechanism"] for e in ledger] == [e["mechanism"] for e in once]
    assert [e["mechanism"] for e in ledger].count("gaussian_summary") == 1
    assert [e["epsilon_after"] for e in ledger] == [e["epsilon_after"] for e in once]
    assert [e["kind"] for e in ReleaseJournal(run_dir / "releases.jsonl").entries()].count(
        "fedora/setup") == 1
    spent = [c["epsilon_spent"] for c in results["privacy"]["fedora"]["clients"]]
    assert spent == [c["epsilon_spent"] for c in expected["privacy"]["fedora"]["clients"]]
    if noise == "reproducible":
        for part in ("selected", "final"):
            assert results["methods"]["fedora"][part] == expected["methods"]["fedora"][part]
    audit = audit_folder(tmp_path)
    allowlist = tmp_path / "ids" / "server" / "allowlist.json"
    report = verify_run(audit, allowlist=allowlist, anchor=tmp_path / "res" / "anchor.json")
    assert report.errors == [], report.errors
    assert build_report(audit, verification=report)["repeated_releases"] == []


@pytest.mark.usefixtures("task_identity")
def test_a_remade_setup_release_that_differs_from_the_journaled_one_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but the node's release journal is replaced, before the ClientApp dies, by
    one (a valid chain) whose summary entry holds other bytes: re-made from the journaled
    noise, the summary differs from what the node journaled, so the node refuses
    (NodeStateError, "resume diverged") rather than send it, and its ledger gains nothing."""
    import hashlib

    from secure_fedora.runtimes.flower.state import NodeStateError

    ledgers: list[bytes] = []

    def other_bytes(run_dir: Path) -> None:
        path = run_dir / "releases.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        body = {k: v for k, v in lines[-1].items() if k != "hash"}
        body["payload_sha256"] = hashlib.sha256(b"another summary").hexdigest()
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        lines[-1] = {**body, "hash": hashlib.sha256(canonical.encode()).hexdigest()}
        path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
                                for e in lines))
        ledgers.append((run_dir / "fedora" / "client-001.jsonl").read_bytes())

    died = _dies_once_after_journaling(monkeypatch, other_bytes)
    grid, run = _run(tmp_path, dp_config(rounds=1, noise="csprng"), {},
                     **{"reproducible-dp-noise": False})
    with pytest.raises(DeployError):
        run()
    assert died == [1]
    refused = [err for c, kind, err in grid.errors if (c, kind) == (1, MSG_SETUP)]
    assert [type(e) for e in refused] == [SystemError, NodeStateError], grid.errors
    assert "resume diverged" in str(refused[1])
    run_dir = tmp_path / "nodes" / "node-1" / "runs" / "42"
    assert (run_dir / "fedora" / "client-001.jsonl").read_bytes() == ledgers[0]


@pytest.mark.usefixtures("task_identity")
def test_a_round_release_left_unanswered_when_the_server_moved_on_stays_accounted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case that still over-counts, stated: client 1's ClientApp dies after its round-1
    release was admitted and journaled, before saving its answer, and the server does not ask
    round 1 again (the client counts as not taking part). Nothing past the saved state is
    this exchange's release when round 2 comes, so the round-1 entry stays accounted (a
    release that never left: an over-count, never an under-count) and round 2 is admitted
    after it; the node goes on (no refusal) and the collected ledgers verify."""
    from audits.verify import verify_run
    from privacy.ledger import read_ledger
    from secure_fedora.runtimes.flower.state import ClientRunState

    save = ClientRunState.save
    died: list[int] = []

    def dies_once(self: ClientRunState, path: Path) -> None:
        if self.client_id == 1 and self.answered.get("round") == 1 and not died:
            died.append(1)
            raise SystemError("ClientApp killed")
        save(self, path)

    monkeypatch.setattr(ClientRunState, "save", dies_once)
    cfg = with_methods(dp_config(rounds=2, noise="csprng"), "fedavg")
    grid, run = _run(tmp_path, cfg, {}, **{"reproducible-dp-noise": False})
    results = run()
    assert died == [1] and [(c, kind) for c, kind, _ in grid.errors] == [(1, "train.round")]
    ledger = read_ledger(tmp_path / "nodes" / "node-1" / "runs" / "42" / "fedavg"
                         / "client-001.jsonl")
    assert [(e["round"], e["mechanism"]) for e in ledger] == [(1, "dpsgd"), (2, "dpsgd"),
                                                              (2, "close")]
    rows = results["privacy"]["fedavg"]["clients"]
    # two releases accounted, as for a client that took part in both rounds; one left
    assert rows[1]["epsilon_spent"] == ledger[-1]["epsilon_after"] == rows[0]["epsilon_spent"]
    journal = (tmp_path / "nodes" / "node-1" / "runs" / "42" / "releases.jsonl").read_text()
    assert [json.loads(line)["round"] for line in journal.splitlines()][:2] == [1, 2]
    report = verify_run(audit_folder(tmp_path, "fedavg"),
                        allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                        anchor=tmp_path / "res" / "anchor.json")
    assert report.errors == [], report.errors
