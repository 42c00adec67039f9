"""A Flower DP-FEDORA run killed mid-run resumes with ``fedora.max_pull`` amended (the one
key a resume may change, as in process): the run keeps its original config hash (nodes'
state, plan caches, envelopes, ledgers), the server's signed messages carry the
amendments' digest, the amended value applies from the round after the one in flight, and
results.json and ``amendments.json`` record it; the results equal the in-process runtime's
resume under the same amendment."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from secure_fedora.core import crashpoints
from secure_fedora.core.config import config_hash, parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import DeployError, RunSettings
from tests.secure_fedora.core.crash_support import crashes_at
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    audit_folder,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)
from tests.secure_fedora.runtimes.flower.test_server_resume import _crash_after_reply

MAX_PULL = 0.01  # lr 0.1: lambda at most 0.1, below most of this run's noised lambdas


def _configs() -> tuple[Any, Any]:
    doc = dp_config(rounds=3, noise="reproducible").model_dump(mode="json", exclude_none=True)
    doc["training"]["checkpoint_every"] = 1
    amended = json.loads(json.dumps(doc))
    amended["fedora"]["max_pull"] = MAX_PULL
    return parse_config(doc), parse_config(amended)


AMENDMENT = {"key": "fedora.max_pull", "from": None, "to": MAX_PULL, "method": "fedora",
             "resumed_at_round": 1, "effective_from_round": 2, "applies_to": {"fedora": 2}}


def _killed(root: Path, cfg: Any, results: str = "res") -> dict[str, Any]:
    """A run of ``cfg`` whose ServerApp died after client 0's round-1 reply."""
    rc = run_config(cfg, root, **{"result-dir": str(root / results), "round-timeout": 5.0,
                                  "reproducible-dp-noise": True})
    (root / results).mkdir()
    grid = InMemoryGrid(root / "nodes", rc, 3, tamper_reply=_crash_after_reply(0, 1))
    with pytest.raises(crashpoints.InjectedCrash):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    return {**rc, "resume": "42"}


def _resume(root: Path, rc: dict[str, Any], client_rc: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    grid = InMemoryGrid(root / "nodes", client_rc or rc, 3, run_id=777)
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 777)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_a_killed_dp_run_resumes_with_max_pull_like_the_in_process_runtime(tmp_path: Path) -> None:
    from audits.verify import verify_run
    from secure_fedora.runtimes.inprocess import Simulation

    cfg, amended = _configs()
    root = tmp_path / "fl"
    rc = _killed(root, cfg)
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    # an amendment made anywhere but after the round in flight is refused, nothing written
    early = {**rc, "amendments": json.dumps([{**AMENDMENT, "effective_from_round": 1}])}
    with pytest.raises(server_app.ResumeRefused, match=r"applies from round 2 \(the "
                                                       "checkpoint's round in flight is re-made"):
        _resume(root, early)
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before
    wrong_reach = {**rc, "amendments": json.dumps([{**AMENDMENT, "applies_to": {"fedora": 1}}])}
    with pytest.raises(server_app.ResumeRefused, match="methods reading it from then"):
        _resume(root, wrong_reach)
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before
    results = _resume(root, {**rc, "amendments": json.dumps([AMENDMENT])})
    assert results["config_amendments"] == [AMENDMENT]
    assert json.loads((root / "res" / "amendments.json").read_text()) == [AMENDMENT]
    assert results["config_hash"] == config_hash(cfg)  # the run's binding is unchanged
    rows = {r["round"]: r for r in results["rounds"]}
    assert rows[1]["mean_lambda"] > 0.1 >= max(rows[2]["mean_lambda"], rows[3]["mean_lambda"])
    assert results["methods"]["fedora"]["extra"]["max_pull"] == MAX_PULL
    report = verify_run(audit_folder(root), allowlist=root / "ids" / "server" / "allowlist.json",
                        anchor=root / "res" / "anchor.json")
    assert report.ok, report.errors

    # in process: the same run killed after round 1's checkpoint, resumed with the amendment
    run_dir = tmp_path / "inproc"
    with crashes_at("checkpoint_written@1"):
        Simulation(cfg, run_dir, keystore=tmp_path / "keystore").run()
    expected = Simulation(amended, run_dir, keystore=tmp_path / "keystore").run(resume=True)
    # killed after round 1's checkpoint, it resumes at round 2; round 2 on, under the new value
    assert expected["config_amendments"] == [{**AMENDMENT, "resumed_at_round": 2}]
    for key in ("selected", "final"):
        assert results["methods"]["fedora"][key]["per_client"] == \
            expected["methods"]["fedora"][key]["per_client"], key
    def lambdas(path: Path) -> list[str]:
        return [row["mean_lambda"] for row in csv.DictReader(path.open())]

    assert lambdas(root / "res" / "rounds.csv") == lambdas(run_dir / "rounds.csv")


@pytest.mark.usefixtures("task_identity")
def test_a_client_whose_run_config_holds_other_amendments_refuses_the_servers_messages(
        tmp_path: Path) -> None:
    """A client computes with the values its own run config states: one whose amendments
    are not those the server's signed messages name refuses them (here every client at the
    first contact), so no round runs under values the server and a client disagree on."""
    cfg, _ = _configs()
    rc = {**_killed(tmp_path, cfg), "connect-timeout": 2.0}
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777)  # the clients' run config
    amended = {**rc, "amendments": json.dumps([AMENDMENT])}  # the server's
    with pytest.raises(DeployError):
        server_app.run_federation(grid, RunSettings.from_run_config(amended), 777)  # type: ignore[arg-type]
    refused = {c: str(e) for c, _w, e in grid.errors}
    assert sorted(refused) == [0, 1, 2] and all(
        "the server's config amendments do not match the run config given to this client" in e
        for e in refused.values()), refused
    assert not (tmp_path / "res" / "results.json").exists()
    assert not (tmp_path / "res" / "amendments.json").exists()


def test_run_config_amendments_are_validated(tmp_path: Path) -> None:
    cfg, _ = _configs()
    rc = run_config(cfg, tmp_path)
    assert RunSettings.from_run_config(rc).amendments == ()
    for bad, match in [("{}", "must be a JSON list"),
                       (json.dumps([{**AMENDMENT, "key": "training.lr"}]), "must be a JSON list"),
                       (json.dumps([{**AMENDMENT, "from": 2.0}]), "was None before"),
                       (json.dumps([{**AMENDMENT, "to": 5.0}]), "max_pull"),
                       (json.dumps([{k: v for k, v in AMENDMENT.items() if k != "applies_to"}]),
                        "must be a JSON list"),
                       (json.dumps([{**AMENDMENT, "applies_to": {"nope": 2}}]),
                        "must be a JSON list")]:
        with pytest.raises(DeployError, match=match):
            RunSettings.from_run_config({**rc, "amendments": bad})
    settings = RunSettings.from_run_config({**rc, "amendments": json.dumps([AMENDMENT])})
    assert [settings.amended_value("fedora.max_pull", "fedora", r) for r in (1, 2, 3)] == \
        [None, MAX_PULL, MAX_PULL]
    assert settings.config_hash == config_hash(cfg)


@pytest.mark.usefixtures("task_identity")
def test_deploy_local_resume_turns_a_max_pull_change_into_an_amendment(tmp_path: Path) -> None:
    """`deploy local --resume` with a config that differs from the run's only in
    fedora.max_pull submits the run's own config (work/run.toml's, which the checkpoint's
    config hash names) with the change as an amendment made after the round in flight; any
    other change is refused with the message it always had, before anything starts."""
    import tomli_w

    from secure_fedora.runtimes.flower.local import _resumed_run

    cfg, amended = _configs()
    work = tmp_path / "w"
    rc = _killed(work, cfg, "results")  # the layout of a deploy local workdir
    (work / "run.toml").write_text(tomli_w.dumps({**rc, "resume": "0"}))
    run_id, original, amendments = _resumed_run(work, amended)
    assert (run_id, config_hash(original), amendments) == (42, config_hash(cfg), [AMENDMENT])
    assert _resumed_run(work, cfg)[2] == []  # the run's own config: nothing amended
    other = parse_config({**amended.model_dump(mode="json", exclude_none=True),
                          "training": {**amended.training.model_dump(mode="json",
                                                                     exclude_none=True),
                                       "lr": 0.05}})
    with pytest.raises(server_app.ResumeRefused, match="another configuration"):
        _resumed_run(work, other)
    (work / "run.toml").unlink()  # without the run's config there is nothing to amend
    with pytest.raises(server_app.ResumeRefused, match="another configuration"):
        _resumed_run(work, amended)
    assert not (work / "results" / "amendments.json").exists()  # reads only


@pytest.mark.usefixtures("task_identity")
def test_an_amendment_made_during_a_method_that_does_not_read_it_is_said_where_it_applies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """[local, fedora] killed in local's last round: the amendment is made at local round 2,
    from its round 3, which does not exist and would not read max_pull; the log said "from
    round 3 of local". It names where the value applies (as in process): fedora's round 1."""
    from tests.secure_fedora.runtimes.flower.deploy_support import with_methods

    cfg = with_methods(_configs()[0], "local", "fedora")
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"), "round-timeout": 5.0,
                                      "reproducible-dp-noise": True, "compare-methods": True})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_reply=_crash_after_reply(0, 3))
    with pytest.raises(crashpoints.InjectedCrash):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    amendment = {**AMENDMENT, "method": "local", "resumed_at_round": 3,
                 "effective_from_round": 4, "applies_to": {"fedora": 1}}
    capsys.readouterr()
    results = _resume(tmp_path, {**rc, "resume": "42", "amendments": json.dumps([amendment])})
    said = [line for line in capsys.readouterr().out.splitlines() if "resumed with" in line]
    assert len(said) == 1 and "from round 1 of fedora:" in said[0], said
    assert results["config_amendments"] == [amendment]
    assert results["methods"]["fedora"]["extra"]["max_pull"] == MAX_PULL


@pytest.mark.usefixtures("task_identity")
def test_an_amendment_made_in_the_last_round_is_refused_as_it_bounds_no_round(
        tmp_path: Path) -> None:
    """Killed in round 3 of 3 (checkpointed after round 2): round 3 is re-made under the old
    value, so an amendment from round 4 bounds no round. It was accepted and recorded in
    results.json (``effective_from_round`` 4 of a 3-round run); in process such a resume is
    refused. Both `deploy local --resume` and the ServerApp refuse it, writing nothing."""
    import tomli_w

    from secure_fedora.runtimes.flower.local import _resumed_run

    cfg, amended = _configs()
    work = tmp_path / "w"
    rc = run_config(cfg, work, **{"result-dir": str(work / "results"), "round-timeout": 5.0,
                                  "reproducible-dp-noise": True})
    (work / "results").mkdir()
    grid = InMemoryGrid(work / "nodes", rc, 3, tamper_reply=_crash_after_reply(0, 3))
    with pytest.raises(crashpoints.InjectedCrash):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    (work / "run.toml").write_text(tomli_w.dumps({**rc, "resume": "0"}))
    before = {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
    with pytest.raises(server_app.ResumeRefused, match=r"no round of the run left from "
                                                       r"'fedora' round 4 on"):
        _resumed_run(work, amended)
    late = {**AMENDMENT, "resumed_at_round": 3, "effective_from_round": 4,
            "applies_to": {"fedora": 4}}
    with pytest.raises(server_app.ResumeRefused, match="no round is left to run under it"):
        _resume(work, {**rc, "resume": "42", "amendments": json.dumps([late])})
    assert {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()} == before
    assert _resumed_run(work, cfg)[2] == []  # the run's own config resumes it


@pytest.mark.usefixtures("task_identity")
def test_an_amendment_made_after_a_methods_last_checkpoint_is_recorded_as_in_process(
        tmp_path: Path) -> None:
    """[local, fedora] killed right after Local's last round was checkpointed: in process that
    checkpoint holds Local's outcome and the amendment is made at FEDORA's round 1; Flower
    recorded it at Local's round 4, from round 5, of a 3-round run (``applies_to`` equal).
    Flower now records FEDORA's round 1 too: no round of Local is left to run."""
    import tomli_w

    from secure_fedora.runtimes.flower.local import _resumed_run
    from secure_fedora.runtimes.inprocess import Simulation, load_checkpoint
    from tests.secure_fedora.runtimes.flower.deploy_support import with_methods

    cfg, amended = (with_methods(c, "local", "fedora") for c in _configs())
    work = tmp_path / "w"
    rc = run_config(cfg, work, **{"result-dir": str(work / "results"), "round-timeout": 5.0,
                                  "reproducible-dp-noise": True, "compare-methods": True})
    (work / "results").mkdir()
    grid = InMemoryGrid(work / "nodes", rc, 3)
    crashpoints.arm("checkpoint_written@5")  # first contact, Local's setup, its rounds 1 to 3
    try:
        with pytest.raises(crashpoints.InjectedCrash):
            server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    finally:
        crashpoints.disarm()
    current = load_checkpoint(work / "results" / server_app.SERVER_CHECKPOINT)["current"]
    assert (current["method"], current["round"]) == ("local", 3)
    (work / "run.toml").write_text(tomli_w.dumps({**rc, "resume": "0"}))
    flower = _resumed_run(work, amended)[2]

    run_dir = tmp_path / "inproc"
    crashpoints.arm("checkpoint_written@3")  # Local's rounds 1 and 2, then its last, with outcome
    try:
        with pytest.raises(crashpoints.InjectedCrash):
            Simulation(cfg, run_dir, keystore=tmp_path / "keystore").run()
    finally:
        crashpoints.disarm()
    expected = Simulation(amended, run_dir, keystore=tmp_path / "keystore").run(resume=True)
    assert flower == expected["config_amendments"] == [
        {**AMENDMENT, "resumed_at_round": 1, "effective_from_round": 1, "applies_to": {"fedora": 1}}]
    results = _resume(work, {**rc, "resume": "42", "amendments": json.dumps(flower)})
    assert results["config_amendments"] == flower
    assert results["methods"]["fedora"]["extra"]["max_pull"] == MAX_PULL
