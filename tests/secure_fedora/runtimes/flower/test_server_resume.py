"""A ServerApp killed mid-run is resumed (run config ``resume``) from its checkpoint in the
result-dir: the nodes answer the round in flight from their saved state (nothing trained or
released twice) and the results equal an uninterrupted run's; a resume into a result-dir of
another run, configuration or method list is refused before anything is written."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from flwr.app import Message

from secure_fedora.core import crashpoints
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.local import _resumed_run
from secure_fedora.runtimes.flower.protocol import MSG_ROUND, DeployError, RunSettings
from tests.secure_fedora.core.crash_support import crashes_at
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    file_tree,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_evaluation_every,
    with_methods,
)
from tests.secure_fedora.runtimes.flower.test_reply_mutations import task_identity_of_node_0


def _timed(key: str) -> bool:
    """What two runs of one config may differ in: wall-clock timings."""
    return "timing" in key or "seconds" in key or key.endswith("_s")


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not _timed(k)}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _federation(root: Path, cfg: Any, **over: Any) -> tuple[dict[str, Any], InMemoryGrid]:
    rc = run_config(cfg, root, **{"result-dir": str(root / "res"), "round-timeout": 5.0,
                                  **over})
    (root / "res").mkdir(exist_ok=True)
    return rc, InMemoryGrid(root / "nodes", rc, cfg.data.num_clients)


def _run(rc: dict[str, Any], grid: InMemoryGrid, run_id: int = 42) -> dict[str, Any]:
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), run_id)  # type: ignore[arg-type]


def _trained(root: Path) -> list[int]:
    """Each node's release journal length (one line per released payload)."""
    return [len((root / "nodes" / f"node-{c}" / "runs" / "42" / "releases.jsonl")
                .read_text().splitlines()) for c in range(3)]


def _crash_after_reply(client: int, rnd: int, nth: int = 1) -> dict[tuple[int, int, str], Any]:
    """The server dies (SIGKILL in a process; InjectedCrash here) right after ``client``'s
    reply of round ``rnd`` arrived (in the ``nth`` method that reaches it): its round is in
    flight, some nodes answered it."""
    seen = [0]

    def die(_request: Message, reply: Message) -> Message:
        seen[0] += 1
        if seen[0] == nth:
            raise crashpoints.InjectedCrash(f"server killed in round {rnd}")
        return reply
    return {(client, rnd, MSG_ROUND): die}


def _kill_and_resume(root: Path, cfg: Any, client: int, rnd: int, nth: int = 1,
                     **over: Any) -> tuple[dict[str, Any], InMemoryGrid]:
    rc, grid = _federation(root, cfg, **over)
    grid.tamper_reply = _crash_after_reply(client, rnd, nth)
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    assert not (root / "res" / "results.json").exists()
    rc = {**rc, "resume": "42"}
    # a new Flower run (another run id) and new node processes; the nodes keep their state
    grid = InMemoryGrid(root / "nodes", rc, cfg.data.num_clients, run_id=777)
    return _run(rc, grid, run_id=777), grid


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("methods", [("fedora", "fedavg"), ("apfl",), ("ditto",), ("fedamp",),
                                     ("fedprox",), ("ifca",), ("local",)])
def test_a_killed_serverapp_resumes_and_ends_as_an_uninterrupted_run(
        tmp_path: Path, methods: tuple[str, ...]) -> None:
    """Without a resume a ServerApp killed in round 3 of 4 lost the run (the nodes kept their
    state). Killed after client 1's round-3 reply (of the last method: FEDORA's outcome then
    comes from the checkpoint), resumed under the run's id by a new Flower run, it sends round
    3 again: client 1 answers from its saved state (no second release), the others train it,
    and results.json and rounds.csv equal an uninterrupted run's but for timings; a second
    resume of the finished run is refused."""
    cfg = with_methods(tiny_config(rounds=4), *methods)
    whole, grid = _federation(tmp_path / "whole", cfg)
    expected = _run(whole, grid)
    resumed, _ = _kill_and_resume(tmp_path / "cut", cfg, client=1, rnd=3, nth=len(methods))
    assert resumed["run_id"] == 42
    assert _untimed(resumed) == _untimed(expected)
    assert (tmp_path / "cut" / "res" / "rounds.csv").read_bytes() == \
        (tmp_path / "whole" / "res" / "rounds.csv").read_bytes()
    assert _trained(tmp_path / "cut") == _trained(tmp_path / "whole")
    rc = {**whole, "resume": 42}
    with pytest.raises(server_app.ResumeRefused, match="finished"):
        _run(rc, InMemoryGrid(tmp_path / "whole" / "nodes", rc, 3))


def _unstamped_ledgers(root: Path) -> list[list[dict[str, Any]]]:
    """Every node's ledger of FEDORA without what differs between any two runs: the entries'
    timestamps and so their hashes and signatures."""
    stamped = {"timestamp", "prev_hash", "signature"}
    return [[{k: v for k, v in json.loads(line).items() if k not in stamped}
             for line in (root / "nodes" / f"node-{c}" / "runs" / "42" / "fedora"
                          / f"client-{c:03d}.jsonl").read_text().splitlines()]
            for c in range(3)]


_DP_RESUMED = {"reproducible-dp-noise": True}


@pytest.fixture(scope="module")
def whole_dp_run(tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The uninterrupted run (its folder and results) of the 3-round DP federation the resume
    tests kill and resume: tests only read the folder, and get their own copy of the
    results."""
    root = tmp_path_factory.mktemp("whole-dp") / "whole"
    with task_identity_of_node_0():
        whole, grid = _federation(root, dp_config(rounds=3), **_DP_RESUMED)
        yield root, _run(whole, grid)


@pytest.mark.usefixtures("task_identity")
def test_a_dp_run_resumes_without_counting_a_release_twice(
        tmp_path: Path, whole_dp_run: tuple[Path, dict[str, Any]]) -> None:
    """DP with reproducible noise: killed in round 2 of 3 after client 0's reply, resumed,
    its results equal an uninterrupted run's (epsilon spent and ledger entries per client;
    the ledger heads differ as any two runs' do, by the entries' timestamps), every ledger
    holds the uninterrupted run's entries (client 0's no second round-2 release), and the
    anchor records the same entries and spending."""
    cfg = dp_config(rounds=3)
    whole_root, expected = whole_dp_run[0], copy.deepcopy(whole_dp_run[1])
    resumed, _ = _kill_and_resume(tmp_path / "cut", cfg, client=0, rnd=2, **_DP_RESUMED)

    def unheaded(results: dict[str, Any]) -> Any:
        results["privacy"]["fedora"].pop("resumes", None)  # the resume's own record of it
        for row in results["privacy"]["fedora"]["clients"]:
            assert len(row.pop("ledger_head")) == 64
        return _untimed(results)

    assert unheaded(resumed) == unheaded(expected)
    assert all(c["epsilon_spent"] > 0 and c["ledger_entries"] == 8
               for c in resumed["privacy"]["fedora"]["clients"])
    assert _unstamped_ledgers(tmp_path / "cut") == _unstamped_ledgers(whole_root)
    assert _trained(tmp_path / "cut") == _trained(whole_root)

    def anchored(root: Path) -> dict[str, Any]:
        doc = json.loads((root / "res" / "anchor.json").read_text())
        return {k: {f: v[f] for f in ("entries", "epsilon_spent")} for k, v in
                doc["ledgers"].items()}

    assert anchored(tmp_path / "cut") == anchored(whole_root)


@pytest.mark.usefixtures("task_identity")
def test_results_json_records_each_serverapp_resume_and_the_releases_made_before_it(
        tmp_path: Path, whole_dp_run: tuple[Path, dict[str, Any]]) -> None:
    """A resumed Flower run left no trace of its interruption in results.json (the in-process
    runtime lists each resume under ``privacy.<method>.resumes``). Killed after client 0's
    round-2 reply, resumed and killed again after client 1's round-3 reply, resumed again:
    each resume is listed with the checkpoint round it continued after and, for the round it
    sent again, the clients whose signed reply said the release was one their node made
    before (client 0 in round 2; clients 0 and 1 in round 3), kept through the later
    resume. An uninterrupted run has no ``resumes``."""
    cfg = dp_config(rounds=3)
    root = tmp_path / "cut"
    rc, grid = _federation(root, cfg, **_DP_RESUMED)
    grid.tamper_reply = _crash_after_reply(0, 2)
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    rc = {**rc, "resume": "42"}
    grid = InMemoryGrid(root / "nodes", rc, 3, run_id=777)
    grid.tamper_reply = _crash_after_reply(1, 3)
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid, run_id=777)
    results = _run(rc, InMemoryGrid(root / "nodes", rc, 3, run_id=778), run_id=778)
    assert results["privacy"]["fedora"]["resumes"] == [
        {"after_round": 1, "remade_from_journal": [{"round": 2, "clients": ["client-000"]}]},
        {"after_round": 2, "remade_from_journal": [
            {"round": 3, "clients": ["client-000", "client-001"]}]}]
    assert json.loads((root / "res" / "results.json").read_text())["privacy"]["fedora"][
        "resumes"] == results["privacy"]["fedora"]["resumes"]
    assert "resumes" not in whole_dp_run[1]["privacy"]["fedora"]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("other", ["config", "methods", "run"])
def test_a_resume_into_another_runs_result_dir_is_refused_before_writing(
        tmp_path: Path, other: str) -> None:
    """A resume whose config, method list or run id differs from the checkpoint's is refused
    naming the difference, and the result-dir is left byte for byte as it was."""
    cfg = tiny_config(rounds=3)
    rc, grid = _federation(tmp_path, cfg)
    grid.tamper_reply = _crash_after_reply(0, 2)
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    res = tmp_path / "res"
    before = {p: p.read_bytes() for p in sorted(res.rglob("*")) if p.is_file()}
    resume = 42
    if other == "config":
        rc = run_config(tiny_config(rounds=4), tmp_path, **{"result-dir": str(res)})
    elif other == "methods":
        rc = run_config(with_methods(cfg, "fedora", "fedavg"), tmp_path,
                        **{"result-dir": str(res)})
    else:
        resume = 43
    rc = {**rc, "resume": resume}
    match = {"config": "another configuration", "methods": "methods", "run": "of run 42"}[other]
    with pytest.raises(server_app.ResumeRefused, match=match):
        _run(rc, InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777), run_id=777)
    assert {p: p.read_bytes() for p in sorted(res.rglob("*")) if p.is_file()} == before


@pytest.mark.usefixtures("task_identity")
def test_a_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """A result-dir without a ServerApp checkpoint has nothing to resume: refused, nothing
    written."""
    cfg = tiny_config(rounds=2)
    rc, _ = _federation(tmp_path, cfg)
    rc = {**rc, "resume": 42}
    with pytest.raises(server_app.ResumeRefused, match="nothing to resume"):
        _run(rc, InMemoryGrid(tmp_path / "nodes", rc, 3))
    assert list((tmp_path / "res").iterdir()) == []


@pytest.mark.deploy
@pytest.mark.usefixtures("task_identity")
def test_deploy_local_resumes_a_serverapp_killed_with_sigkill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`deploy local`: the ServerApp process kills itself (SIGKILL) right after its round-1
    checkpoint of 2; the deployment fails, within seconds of the kill (not once Flower's
    ServerApp heartbeat ran out, about 60 s), naming the signal and the resume. `deploy local
    --resume` of another config is refused before any process starts; with the run's own
    config it starts the deployment again, continues the run under the killed run's id, and
    its per-client results and rounds equal an uninterrupted run's (the in-memory grid's,
    which equal a deployment's)."""
    import time

    from secure_fedora.runtimes.flower.local import RunTimeouts, deploy_local
    from secure_fedora.runtimes.flower.protocol import DeployError
    from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT

    # Each message starts a ClientApp process: two rounds, evaluated at the last only, keep
    # the messages few (CI time) while the kill still falls between rounds.
    cfg = with_evaluation_every(tiny_config(rounds=2), 2)
    work = tmp_path / "w"
    timeouts = RunTimeouts(startup=90.0, connect=120.0, round=240.0, run=420.0, poll=0.2)
    # checkpoints: first contact, setup, round 1 (the SuperNodes never reach one)
    monkeypatch.setenv(crashpoints.ENV_VAR, "checkpoint_written@3")
    with pytest.raises(DeployError, match="ended with status") as died:
        deploy_local(cfg, 3, work, timeouts=timeouts, max_in_flight=3)
    failed_at = time.time()
    monkeypatch.delenv(crashpoints.ENV_VAR)
    results = work / "results"
    # killed right after the checkpoint was written; the deployment's 5 s stop grace and three
    # flwr calls (slow on a loaded machine) included, well under Flower's 60 s heartbeat
    killed_at = (results / SERVER_CHECKPOINT).stat().st_mtime
    assert failed_at - killed_at < 40, failed_at - killed_at
    assert "its ServerApp process exited, killed by signal 9 (SIGKILL)" in str(died.value)
    assert "the same command with --resume continues the run" in str(died.value)
    killed = json.loads((results / "progress.json").read_text())
    assert killed["round"] == 1 and not (results / "results.json").exists()
    before = {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()
              and "logs" not in p.parts}
    other = with_evaluation_every(tiny_config(rounds=2, lr=0.05), 2)
    with pytest.raises(server_app.ResumeRefused, match="another configuration"):
        deploy_local(other, 3, work, timeouts=timeouts, resume=True)
    assert {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()
            and "logs" not in p.parts} == before
    result = deploy_local(cfg, 3, work, timeouts=timeouts, max_in_flight=3, resume=True)
    assert result.status == "finished:completed"
    assert result.results["run_id"] == killed["run_id"] == result.run_id

    rc, grid = _federation(tmp_path / "grid", cfg)
    expected = _run(rc, grid)
    for key in ("methods", "rounds", "clients", "privacy"):
        assert _untimed(result.results[key]) == _untimed(expected[key]), key


def test_the_resume_key_is_validated(tmp_path: Path) -> None:
    """``resume`` is 0 (a new run, also when the key is absent) or a run id, and needs a
    result-dir; a resumed run's apps work under that id, a new run's under Flower's."""
    from secure_fedora.runtimes.flower.protocol import DeployError

    cfg = tiny_config()
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    assert RunSettings.from_run_config(rc).run_id(777) == 777
    assert RunSettings.from_run_config({**rc, "resume": 42}).run_id(777) == 42
    big = 14486106764113678073  # a Flower run id above 2**63: a run-config integer cannot hold it
    assert RunSettings.from_run_config({**rc, "resume": str(big)}).run_id(777) == big
    del rc["resume"]
    assert RunSettings.from_run_config(rc).run_id(777) == 777
    for bad in (-1, True, "-42", "4.2", 4.2, 2**64):
        with pytest.raises(DeployError, match="'resume' must be 0"):
            RunSettings.from_run_config({**rc, "resume": bad})
    with pytest.raises(DeployError, match="needs 'result-dir'"):
        RunSettings.from_run_config({**rc, "result-dir": "", "resume": 42})


@pytest.mark.usefixtures("task_identity")
def test_deploy_local_resume_refuses_before_starting_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`deploy local --resume` in a workdir without a run, or whose ServerApp checkpoint is of
    another configuration, is refused before any process starts and changes no file."""
    import argparse

    from secure_fedora.runtimes.flower.cli import register
    from secure_fedora.runtimes.flower.local import deploy_local

    parser = argparse.ArgumentParser(prog="secure-fedora")
    register(parser.add_subparsers(dest="command", required=True))
    config = tmp_path / "tiny.toml"
    config.write_text('name = "t"\nmethods = ["fedora"]\n[data]\nnum_clients = 3\n')
    work = tmp_path / "w"
    args = parser.parse_args(["deploy", "local", "--config", str(config), "--workdir",
                              str(work), "--resume"])
    with pytest.raises(server_app.ResumeRefused, match="holds no run to resume"):
        args.func(args)
    assert not work.exists()
    # a run killed in round 2 whose result-dir is the workdir's results/
    cfg = tiny_config(rounds=3)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(work / "results"),
                                      "round-timeout": 5.0})
    (work / "results").mkdir(parents=True)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_reply=_crash_after_reply(0, 2))
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    before = {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
    with pytest.raises(server_app.ResumeRefused, match="another configuration"):
        deploy_local(tiny_config(rounds=3, lr=0.05), 3, work, resume=True)
    assert {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in work.iterdir()) == ["results"]  # no certificates, no logs


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("earlier", ["killed", "finished"])
def test_a_new_run_into_another_runs_result_dir_is_refused_before_writing(
        tmp_path: Path, earlier: str) -> None:
    """A new (not resumed) run whose result-dir held a killed run's checkpoint overwrote it
    (the killed run could no longer be resumed), and one into a finished run's result-dir
    replaced its results, rounds and anchor. Both are refused naming what is held and how to
    go on, and the result-dir is left byte for byte as it was; a result-dir holding only a
    failure.json (a run that failed before its first checkpoint) takes a new run."""
    cfg = dp_config(rounds=2)
    over = {"reproducible-dp-noise": True}
    rc, grid = _federation(tmp_path, cfg, **over)
    if earlier == "killed":
        grid.tamper_reply = _crash_after_reply(0, 2)
        with pytest.raises(crashpoints.InjectedCrash):
            _run(rc, grid)
        held = "checkpoints/flower-server.pt, progress.json; .*: resume that run"
    else:
        _run(rc, grid)
        held = "checkpoints/flower-server.pt, results.json, .*: choose another result-dir"
    res = tmp_path / "res"
    before = {p: p.read_bytes() for p in sorted(res.rglob("*")) if p.is_file()}
    with pytest.raises(server_app.ResultDirInUse,
                       match=f"holds another run's {held}"):
        _run(rc, InMemoryGrid(tmp_path / "nodes2", rc, 3, run_id=777), run_id=777)
    assert {p: p.read_bytes() for p in sorted(res.rglob("*")) if p.is_file()} == before
    if earlier == "killed":  # the killed run is still resumable, and ends as it would have
        rc = {**rc, "resume": "42"}
        resumed = _run(rc, InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777), run_id=777)
        assert resumed["run_id"] == 42

    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "failure.json").write_text('{"run_id": 5, "error": "DeployError: no nodes"}')
    rc = {**rc, "result-dir": str(failed), "resume": 0}
    _run(rc, InMemoryGrid(tmp_path / "nodes3", rc, 3, run_id=9), run_id=9)
    assert (failed / "results.json").is_file()


def _kill_in_release(root: Path, cfg: Any, at: str = "release@2", **over: Any
                     ) -> dict[str, Any]:
    """The ServerApp and client 1's node die together (FedAvg: ``release@2`` in round 1,
    ``release@5`` in round 2), after the node's release was admitted (ledger entry and
    journal record durable) and before it left or was saved. Returns the run config of the
    resume (a new Flower run)."""
    rc, grid = _federation(root, cfg, **over)
    with crashes_at(at):  # client 0's round-1 release, then client 1's, ...
        _run(rc, grid)
    return {**rc, "resume": "42"}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("noise", ["reproducible", "csprng"])
def test_a_node_killed_with_the_server_before_saving_its_answer_remakes_its_release(
        tmp_path: Path, noise: str) -> None:
    """The resumed run sends round 1 again and the node, which saved no answer, re-makes the
    journaled release (its ledger entry consumed, not appended): its ledger holds round 1's
    release once, its epsilon and entries equal the other clients', and the collected
    ledgers verify against the anchor. With reproducible noise the run ends exactly as an
    uninterrupted one (results and every ledger but for timestamps)."""
    from audits.verify import verify_run
    from tests.secure_fedora.runtimes.flower.deploy_support import audit_folder

    cfg = with_methods(dp_config(rounds=2, noise=noise), "fedavg")
    over = {"reproducible-dp-noise": True} if noise == "reproducible" else {}
    cut = tmp_path / "cut"
    rc = _kill_in_release(cut, cfg, **over)
    results = _run(rc, InMemoryGrid(cut / "nodes", rc, 3, run_id=777), run_id=777)
    run_dir = cut / "nodes" / "node-1" / "runs" / "42"
    ledger = [json.loads(line) for line in
              (run_dir / "fedavg" / "client-001.jsonl").read_text().splitlines()]
    assert sum(e["mechanism"] == "dpsgd" and e["round"] == 1 for e in ledger) == 1
    journal = (run_dir / "releases.jsonl").read_text()
    assert [json.loads(line)["round"] for line in journal.splitlines()].count(1) == 1
    # client 0 sends its saved answer again, client 1 re-makes its journaled release
    assert results["privacy"]["fedavg"]["resumes"] == [{"after_round": 0, "remade_from_journal": [
        {"round": 1, "clients": ["client-000", "client-001"]}]}]
    rows = results["privacy"]["fedavg"]["clients"]
    assert len({r["ledger_entries"] for r in rows}) == 1
    assert len({r["epsilon_spent"] for r in rows}) == 1 and 0 < rows[0]["epsilon_spent"] <= 8.0
    report = verify_run(audit_folder(cut, "fedavg"),
                        allowlist=cut / "ids" / "server" / "allowlist.json",
                        anchor=cut / "res" / "anchor.json")
    assert report.errors == [], report.errors
    if noise == "reproducible":
        whole, grid = _federation(tmp_path / "whole", cfg, **over)
        expected = _run(whole, grid)

        def unheaded(doc: dict[str, Any]) -> Any:
            doc["privacy"]["fedavg"].pop("resumes", None)  # the resume's own record of it
            for row in doc["privacy"]["fedavg"]["clients"]:
                row.pop("ledger_head")
            return _untimed({k: v for k, v in doc.items() if k != "run_id"})

        assert unheaded(results) == unheaded(expected)
        stamped = {"timestamp", "prev_hash", "signature"}
        for root in (cut, tmp_path / "whole"):
            assert (root / "nodes" / "node-1" / "runs" / "42" / "fedavg").is_dir()
        assert [[{k: v for k, v in json.loads(line).items() if k not in stamped}
                 for line in (cut / "nodes" / f"node-{c}" / "runs" / "42" / "fedavg"
                              / f"client-{c:03d}.jsonl").read_text().splitlines()]
                for c in range(3)] == \
            [[{k: v for k, v in json.loads(line).items() if k not in stamped}
              for line in (tmp_path / "whole" / "nodes" / f"node-{c}" / "runs" / "42"
                           / "fedavg" / f"client-{c:03d}.jsonl").read_text().splitlines()]
             for c in range(3)]


@pytest.mark.usefixtures("task_identity")
def test_a_resumed_node_whose_journal_lost_a_release_record_is_refused(tmp_path: Path) -> None:
    """The same crash in round 2, then client 1's sealed journal is cut before the resume:
    its round-1 record is gone while its ledger records that release (which left). The node
    refuses with NodeStateError (its error reply names it) instead of making anything again,
    and its ledger gains no entry."""
    cfg = with_methods(dp_config(rounds=3, noise="reproducible"), "fedavg")
    cut = tmp_path / "cut"
    rc = _kill_in_release(cut, cfg, "release@5", **{"reproducible-dp-noise": True})
    run_dir = cut / "nodes" / "node-1" / "runs" / "42"
    journal = run_dir / "fedavg" / "client-001.journal"
    assert len(journal.read_bytes().splitlines()) == 2  # round 1's and round 2's records
    journal.write_bytes(b"")
    ledger = (run_dir / "fedavg" / "client-001.jsonl").read_bytes()
    grid = InMemoryGrid(cut / "nodes", rc, 3, run_id=777)
    with pytest.raises(Exception):  # noqa: B017 - the run stops; what matters is the reason
        _run(rc, grid, run_id=777)
    assert [(c, type(err).__name__) for c, _, err in grid.errors] == [(1, "NodeStateError")]
    assert "sealed journal at" in str(grid.errors[0][2])
    assert (run_dir / "fedavg" / "client-001.jsonl").read_bytes() == ledger


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("older_state", [False, True])
def test_a_release_that_left_is_not_drawn_again_once_its_journal_record_is_cut(
        tmp_path: Path, older_state: bool) -> None:
    """The Flower side of the in-process marks files: client 1's round-2 reply left its node
    and the ServerApp died before taking it; then the node's last sealed journal record (that
    release's) is cut, with or without client.pt (and its nonce memory) put back to the copy
    from before round 2, so that the ledger's round-2 entries look like a ``gate`` crash.
    Its saved state's record count, or else the node's release journal holding the bytes that
    left, tells them apart: the resume refuses (NodeStateError naming the file) instead of
    drawing round 2 with fresh CSPRNG noise, and the ledger and release journal gain nothing."""
    import shutil

    from secure_fedora.runtimes.flower.state import NodeStateError

    cfg = with_methods(dp_config(rounds=2, noise="csprng"), "fedavg")
    cut = tmp_path / "cut"
    folder = cut / "nodes" / "node-1" / "runs" / "42" / "fedavg"
    kept = tmp_path / "kept"

    def keep_state(message: Message) -> Message:
        kept.mkdir()
        for name in ("client.pt", "client-001.nonces.jsonl"):
            shutil.copyfile(folder / name, kept / name)
        return message

    rc, grid = _federation(cut, cfg)
    grid.tamper_request = {(1, 2, MSG_ROUND): keep_state}
    grid.tamper_reply = _crash_after_reply(client=1, rnd=2)
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    journal = folder / "client-001.journal"
    records = journal.read_bytes().splitlines(keepends=True)
    assert len(records) == 2  # round 1's and round 2's, both released
    journal.write_bytes(records[0])
    if older_state:
        for name in ("client.pt", "client-001.nonces.jsonl"):
            shutil.copyfile(kept / name, folder / name)
    ledger = (folder / "client-001.jsonl").read_bytes()
    released = (folder.parent / "releases.jsonl").read_bytes()
    rc = {**rc, "resume": "42"}
    grid = InMemoryGrid(cut / "nodes", rc, 3, run_id=777)
    with pytest.raises(DeployError, match=r"client-001 \(node 1001\) refuses to go on"):
        _run(rc, grid, run_id=777)
    refusals = [err for c, _, err in grid.errors if c == 1]
    assert refusals and all(isinstance(e, NodeStateError) for e in refusals)
    assert ("releases.jsonl: resume diverged" if older_state else
            "client-001.journal: this client's saved state") in str(refusals[0])
    assert (folder / "client-001.jsonl").read_bytes() == ledger
    assert (folder.parent / "releases.jsonl").read_bytes() == released


@pytest.mark.usefixtures("task_identity")
def test_a_prv_run_ledgered_before_the_refining_pass_states_the_noise_its_clients_released(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PRV run ledgered by a version without PRV's refining pass, killed in round 2 and
    resumed by today's version: the clients keep releasing with the noise their ledgers' plan
    used, but the server's results.json stated the refined calibration, and ``audit verify``
    flagged the folder (``results_plan``). The server now states the noise each client reports
    in its signed reply: every client row and plan row states the ledgers' noise, and the
    folder verifies."""
    from audits.verify import verify_run
    from privacy.accounting import _epsilon
    from privacy.ledger import read_ledger
    from tests.secure_fedora.runtimes.flower.deploy_support import audit_folder
    from tests.secure_fedora.runtimes.test_crash_resume import _old_prv

    cfg = dp_config(rounds=3, accountant="prv", epsilon=0.5)
    over = {"reproducible-dp-noise": True}
    with monkeypatch.context() as patch:  # the first ServerApp and nodes: the old version
        _old_prv(patch)
        rc, grid = _federation(tmp_path, cfg, **over)
        grid.tamper_reply = _crash_after_reply(0, 2)
        with pytest.raises(crashpoints.InjectedCrash):
            _run(rc, grid)
    _epsilon.cache_clear()
    rc = {**rc, "resume": "42"}
    results = _run(rc, InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777), run_id=777)
    noise = {e["params"]["noise_multiplier"]
             for c in range(3)
             for e in read_ledger(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora"
                                  / f"client-00{c}.jsonl") if e["mechanism"] == "dpsgd"}
    assert len(noise) == 1
    section = results["privacy"]["fedora"]
    assert [row["noise_multiplier"] for row in section["clients"]] == [*noise] * 3
    assert [(row["noise_multiplier"], row["prv_refine"]) for row in section["plan"]] == \
        [(*noise, False)]  # exactly the ledgers' float (it was rounded to 6 decimals)
    assert all(row["plan_reported"] for row in section["clients"])
    report = verify_run(audit_folder(tmp_path),
                        allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                        anchor=tmp_path / "res" / "anchor.json")
    assert report.errors == [], report.errors


@pytest.mark.usefixtures("task_identity")
def test_a_serverapp_killed_after_its_last_method_resumes_to_write_the_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ServerApp killed after its checkpoint recorded every method's outcome, before
    results.json, is resumed to write it (nothing left to train): the resume's amendment
    check looked for a next method to amend from and stopped with a bare StopIteration."""
    cfg = with_methods(tiny_config(rounds=2), "local")
    rc, grid = _federation(tmp_path, cfg, **{"result-dir": str(tmp_path / "results")})
    with monkeypatch.context() as m:
        def killed(*_a: Any, **_k: Any) -> Any:
            raise crashpoints.InjectedCrash("server killed before results.json")
        m.setattr("secure_fedora.runtimes.results.build_results", killed)
        with pytest.raises(crashpoints.InjectedCrash):
            _run(rc, grid)
    assert not (tmp_path / "results" / "results.json").exists()
    assert _resumed_run(tmp_path, cfg) == (42, cfg, [])  # deploy local --resume's check
    (tmp_path / "run.toml").write_text(tomli_w.dumps(rc))  # as deploy local submits it
    amended = cfg.model_copy(update={"fedora": cfg.fedora.model_copy(update={"max_pull": 0.5})})
    with pytest.raises(server_app.ResumeRefused, match="every method of the run has finished"):
        _resumed_run(tmp_path, amended)
    rc = {**rc, "resume": "42"}
    resumed = _run(rc, InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777), run_id=777)
    assert resumed["run_id"] == 42 and (tmp_path / "results" / "results.json").is_file()


def _killed_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfg: Any,
                       before: str, **over: Any) -> dict[str, Any]:
    """Run ``cfg`` into ``tmp_path/res``, the ServerApp killed at its end ``before``: its
    finished checkpoint ("finished"), its anchor ("anchor") or its results.json ("results",
    after the checkpoint of every method's outcome). Returns the resume's run config."""
    rc, grid = _federation(tmp_path, cfg, **over)

    def killed(*_a: Any, **_k: Any) -> Any:
        raise crashpoints.InjectedCrash(f"server killed before its {before}")

    with monkeypatch.context() as m:
        if before == "finished":
            save = server_app._save_server_checkpoint

            def checkpoint(server: Any, current: Any, finished: bool = False) -> None:
                if finished:
                    killed()
                save(server, current, finished)
            m.setattr(server_app, "_save_server_checkpoint", checkpoint)
        elif before == "anchor":
            m.setattr(server_app, "_write_server_anchor", killed)
        else:
            m.setattr("secure_fedora.runtimes.results.build_results", killed)
        with pytest.raises(crashpoints.InjectedCrash):
            _run(rc, grid)
    return {**rc, "resume": "42"}


def _resume(tmp_path: Path, rc: dict[str, Any]) -> dict[str, Any]:
    return _run(rc, InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777), run_id=777)


def _end_files(res: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(res.iterdir())
            if p.name in ("results.json", "anchor.json", "rounds.csv")}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("dp", [True, False])
def test_a_serverapp_killed_before_its_finished_checkpoint_keeps_its_results_and_anchor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        dp: bool) -> None:
    """A ServerApp killed after results.json (and under DP anchor.json) but before its
    finished checkpoint was resumed as unfinished: it wrote results.json again (its timings,
    events and nodes are the resumed process's) and signed the anchor again, so the copy an
    auditor kept apart failed `audit verify --anchor`. The resume now writes only what is left
    (the finished checkpoint, the plots) and keeps the run's files byte for byte, building
    the anchor document once (it was built to check the kept anchor, then again to keep it)."""
    from audits.verify import verify_run
    from tests.secure_fedora.runtimes.flower.deploy_support import audit_folder

    cfg = dp_config(rounds=2) if dp else tiny_config(rounds=2)
    rc = _killed_at_the_end(tmp_path, monkeypatch, cfg, "finished",
                            **({"reproducible-dp-noise": True} if dp else {}))
    before = _end_files(tmp_path / "res")
    assert set(before) == ({"results.json", "anchor.json", "rounds.csv"} if dp
                           else {"results.json", "rounds.csv"})
    kept = tmp_path / "anchor-kept.json"
    if dp:
        kept.write_bytes(before["anchor.json"])
    capsys.readouterr()
    built = []
    anchor_doc = server_app._server_anchor_doc
    monkeypatch.setattr(server_app, "_server_anchor_doc",
                        lambda server: built.append(1) or anchor_doc(server))
    resumed = _resume(tmp_path, rc)
    assert len(built) == (1 if dp else 0)
    assert _end_files(tmp_path / "res") == before
    assert resumed == json.loads(before["results.json"])
    assert "warning" not in capsys.readouterr().out
    if dp:
        report = verify_run(audit_folder(tmp_path),
                            allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                            anchor=kept)
        assert report.errors == [], report.errors
    with pytest.raises(server_app.ResumeRefused, match="finished"):  # the checkpoint is written
        _resume(tmp_path, rc)


@pytest.mark.usefixtures("task_identity")
def test_a_finished_dp_run_of_a_version_without_declared_reply_entries_resumes_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DP results.json written before ``privacy.<method>.reply_entries`` existed, anchored
    as it was: a resume that trains nothing keeps it and its anchor byte for byte (it states
    the run's outcomes; the anchor vouches for its bytes), as in process."""
    from secure_fedora.runtimes import results as results_module

    build = results_module.build_results

    def older(*args: Any, **kwargs: Any) -> dict[str, Any]:
        doc = build(*args, **kwargs)
        for body in doc["privacy"].values():
            del body["reply_entries"]
        return doc

    with monkeypatch.context() as m:
        m.setattr(results_module, "build_results", older)
        rc = _killed_at_the_end(tmp_path, monkeypatch, dp_config(rounds=1), "finished",
                                **{"reproducible-dp-noise": True})
    before = _end_files(tmp_path / "res")
    assert "reply_entries" not in before["results.json"].decode()
    resumed = _resume(tmp_path, rc)
    assert _end_files(tmp_path / "res") == before
    assert resumed == json.loads(before["results.json"])


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("before, dp", [("results", True), ("results", False), ("anchor", True)])
def test_a_serverapp_killed_before_its_results_or_anchor_writes_them_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        before: str, dp: bool) -> None:
    """Killed after the checkpoint of every method's outcome but before results.json, or
    after results.json but before the anchor, the resume wrote the missing files as a new run
    would, saying nothing. As in process it now says which file it wrote again and why (under
    DP a results.json that no anchor vouches for is written again), keeps rounds.csv, and the
    folder verifies against the anchor it signed."""
    from audits.verify import verify_run
    from tests.secure_fedora.runtimes.flower.deploy_support import audit_folder

    cfg = dp_config(rounds=2) if dp else tiny_config(rounds=2)
    rc = _killed_at_the_end(tmp_path, monkeypatch, cfg, before,
                            **({"reproducible-dp-noise": True} if dp else {}))
    res = tmp_path / "res"
    assert (res / "results.json").exists() == (before == "anchor")
    assert not (res / "anchor.json").exists()
    csv = (res / "rounds.csv").read_bytes()
    capsys.readouterr()
    resumed = _resume(tmp_path, rc)
    said = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    why = "was missing" if before == "results" else "anchor.json does not vouch for it"
    assert any(f"{res / 'results.json'} " in line and why in line for line in said), said
    assert any(f"{res / 'anchor.json'} was missing" in line for line in said) == dp, said
    assert len(said) == 1 + dp, said
    assert json.loads((res / "results.json").read_text()) == resumed
    assert (res / "rounds.csv").read_bytes() == csv
    if dp:
        report = verify_run(audit_folder(tmp_path),
                            allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                            anchor=res / "anchor.json")
        assert report.errors == [], report.errors
    with pytest.raises(server_app.ResumeRefused, match="finished"):
        _resume(tmp_path, rc)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("damage", ["rounds.csv", "results.json"])
def test_a_serverapp_killed_before_its_finished_checkpoint_writes_a_damaged_file_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        damage: str) -> None:
    """The same kill under DP, then rounds.csv deleted or results.json's outcome edited: the
    resume left a missing rounds.csv missing (it rewrote it only after a method it ran) and
    signed whatever results.json it built without a word. It now writes the damaged file again
    from the checkpoint, with a warning naming it: rounds.csv with the run's bytes (the anchor
    then kept), results.json stating the run's outcome and anchored again."""
    from audits.verify import verify_run
    from tests.secure_fedora.runtimes.flower.deploy_support import audit_folder

    rc = _killed_at_the_end(tmp_path, monkeypatch, dp_config(rounds=2), "finished",
                            **{"reproducible-dp-noise": True})
    res = tmp_path / "res"
    before = _end_files(res)
    if damage == "rounds.csv":
        (res / "rounds.csv").unlink()
    else:
        doc = json.loads(before["results.json"])
        doc["methods"]["fedora"]["final"]["mean"] = 0.99
        (res / "results.json").write_text(json.dumps(doc, indent=2))
    capsys.readouterr()
    resumed = _resume(tmp_path, rc)
    said = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert any(f"{res / damage} " in line and "written" in line for line in said), said
    after = _end_files(res)
    if damage == "rounds.csv":
        assert after == before and len(said) == 1, said
    else:
        assert after["rounds.csv"] == before["rounds.csv"]
        assert resumed["methods"] == json.loads(before["results.json"])["methods"]
        assert any(f"{res / 'anchor.json'} " in line for line in said), said
    report = verify_run(audit_folder(tmp_path),
                        allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                        anchor=res / "anchor.json")
    assert report.errors == [], report.errors


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("record", ["events", "rejections"])
def test_a_no_op_resume_without_dp_writes_again_a_results_json_whose_run_records_were_edited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        record: str) -> None:
    """Without DP nothing but this comparison vouches for a kept results.json. The run's
    ``events`` and ``security.rejections`` were left out of it as if the resumed ServerApp
    stated them, so an event or rejection added to (or removed from) the file was kept without
    a word; they are the run's records, restored from its checkpoint, which the resume's first
    contact can only append to: an edited one is now written again, with a warning."""
    rc = _killed_at_the_end(tmp_path, monkeypatch, tiny_config(rounds=2), "finished")
    res = tmp_path / "res"
    made = json.loads((res / "results.json").read_text())
    doc = json.loads(json.dumps(made))
    fake = {"method": "fedora", "round": 1, "client": 0, "node": 5, "event": "dropped"}
    if record == "events":
        doc["events"].append(fake)
    else:
        doc["security"]["rejections"].append({"round": 1, "node": 5, "reason": "forged"})
    (res / "results.json").write_text(json.dumps(doc, indent=2))
    capsys.readouterr()
    resumed = _resume(tmp_path, rc)
    said = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert any(f"{res / 'results.json'} does not state" in line for line in said), said
    assert json.loads((res / "results.json").read_text()) == resumed
    assert resumed["events"] == made["events"] and resumed["security"] == made["security"]



@pytest.mark.usefixtures("task_identity")
def test_deploy_local_resume_never_makes_new_identities(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`deploy local --resume` in a workdir whose identities/ was moved away made new party
    keys and went on, while the run's envelopes and ledgers are signed with the old ones:
    refused, naming the directory and the remedy, before any process starts, with the
    workdir byte for byte as it was; with the identities restored it resumes, keeping them."""
    from secure_fedora.runtimes.flower.local import deploy_local
    from tests.secure_fedora.runtimes.flower.test_print_commands import (
        _record_instead_of_running,
    )

    # a run killed in round 2 in the layout of a workdir: results/, server/, nodes/, identities/
    cfg = tiny_config(rounds=3)
    work = tmp_path / "w"
    rc = run_config(cfg, work, **{"result-dir": str(work / "results"), "round-timeout": 5.0})
    (work / "results").mkdir(parents=True)
    grid = InMemoryGrid(work / "nodes", rc, 3, tamper_reply=_crash_after_reply(0, 2))
    with pytest.raises(crashpoints.InjectedCrash):
        _run(rc, grid)
    kept = tmp_path / "backup"
    (work / "ids").rename(kept)
    ran: list[str] = []  # processes and flwr calls: recorded, none started
    _record_instead_of_running(monkeypatch, ran)

    before = file_tree(work)
    with pytest.raises(DeployError, match=r"--resume: the run's identities under .*identities "
                                          r"are missing .*does not exist.*restore the directory "
                                          r"from a backup .*without --resume"):
        deploy_local(cfg, 3, work, resume=True)
    assert file_tree(work) == before
    assert ran == []

    kept.rename(work / "identities")
    identities = file_tree(work / "identities")
    result = deploy_local(cfg, 3, work, resume=True)
    assert result.run_id == 42 and ran
    assert file_tree(work / "identities") == identities
