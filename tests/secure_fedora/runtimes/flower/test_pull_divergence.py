"""FEDORA's unstable pull making a client's training non-finite stops a Flower run, naming the
cause and its remedy (``fedora.max_pull`` on resume), as it stops an in-process run; a Flower
run went on with that client sitting each such round out, its error reply withheld."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audits.verify import verify_run
from secure_fedora.core.config import load_config, parse_config
from secure_fedora.learning.client import ClientUpdateError
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.client_app import CLIENT_ERRORS_LOG
from secure_fedora.runtimes.flower.protocol import (
    PULL_RESUME_COMMAND,
    WITHHELD_DETAILS,
    DeployError,
    RunSettings,
    client_error_text,
)
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    audit_folder,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)
from tests.secure_fedora.runtimes.test_amend_resume import write

# the in-process test's config: client 1's round-1 pull (lr * lambda about 2e6) overflows
AMENDMENT = {"key": "fedora.max_pull", "from": None, "to": 1.0, "method": "fedora",
             "resumed_at_round": 1, "effective_from_round": 2, "applies_to": {"fedora": 2}}


def test_a_withheld_error_text_names_a_pull_divergence_alone() -> None:
    pulled = ClientUpdateError("client 1: local training produced non-finite parameters; update "
                               "discarded (FEDORA's pull diverged: lr * lambda = 3 >= 2, ...)")
    other = ClientUpdateError("client 1: local training produced non-finite parameters; update "
                              "discarded (training diverged: lower training.lr)")
    assert client_error_text(pulled, "withheld") == \
        f"ClientUpdateError (FEDORA's pull diverged; {WITHHELD_DETAILS})"
    assert client_error_text(other, "withheld") == f"ClientUpdateError ({WITHHELD_DETAILS})"
    assert client_error_text(pulled, "full") == f"ClientUpdateError: {pulled}"


@pytest.mark.usefixtures("task_identity")
def test_a_diverged_pull_stops_a_flower_run_and_max_pull_resumes_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(write(tmp_path / "diverges.toml"))
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": True})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    # it went on: client 1 sat out rounds 1-3 (client 2 rounds 2-3), its ledger spending each
    # round's release, and results.json reported 0 unstable pulls
    with pytest.raises(DeployError, match=r"^fedora: client-001 \(node 1001\): FEDORA's pull "
                       r"diverged in round 1 .*set fedora.max_pull = 1 .*`secure-fedora deploy "
                       r"local --config CONFIG --workdir WORKDIR --resume` continues it, round 1 "
                       r"re-made as it was .* from round 2$"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert not (tmp_path / "res" / "results.json").exists()
    # the node's own record names the resume that works on Flower, not the in-process one
    node_log = (tmp_path / "nodes" / "node-1" / "runs" / "42" / CLIENT_ERRORS_LOG).read_text()
    assert f"`{PULL_RESUME_COMMAND}` continues it" in node_log
    assert "secure-fedora run" not in node_log
    logged = [r.getMessage() for r in caplog.records if "pull diverged" in r.getMessage()]
    assert logged and all("secure-fedora run" not in m and PULL_RESUME_COMMAND in m
                          for m in logged)

    # the remedy: round 1 is re-made as it was (client 1 sits it out), bounded from round 2
    resumed = {**rc, "resume": "42", "amendments": json.dumps([AMENDMENT])}
    grid = InMemoryGrid(tmp_path / "nodes", resumed, 3, run_id=777)
    results = server_app.run_federation(grid, RunSettings.from_run_config(resumed), 777)  # type: ignore[arg-type]
    assert results["config_amendments"] == [AMENDMENT]
    assert [(e["round"], e["client"]) for e in results["events"]] == [(1, 1)]
    assert "FEDORA's pull diverged" in results["events"][0]["event"]
    assert [r["replied"] for r in results["rounds"]] == [2, 3, 3]
    # client 1's pull was unstable in round 1 (it sat the round out): counted, as its event
    # says; the statistics of accepted replies alone stated 0
    assert [r["unstable_pulls"] for r in results["rounds"]] == [1.0, 0.0, 0.0]
    # its ledger keeps round 1's releases (written ahead: over-counted, never under-counted),
    # and results.json states what that ledger accounts to
    lines = (tmp_path / "nodes" / "node-1" / "runs" / "42" / "fedora" /
             "client-001.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["mechanism"], e["round"]) for e in entries if e["round"] == 1] == \
        [("dpsgd", 1), ("gaussian_lambda", 1)]
    rows = {r["client"]: r for r in results["privacy"]["fedora"]["clients"]}
    assert rows["client-001"]["epsilon_spent"] == entries[-1]["epsilon_after"] == \
        entries[-1]["params"]["epsilon_spent"]
    assert rows["client-001"]["ledger_entries"] == len(entries)
    assert rows["client-001"]["epsilon_spent"] == rows["client-000"]["epsilon_spent"]
    report = verify_run(audit_folder(tmp_path),
                        allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                        anchor=tmp_path / "res" / "anchor.json")
    assert report.ok, report.errors


@pytest.mark.usefixtures("task_identity")
def test_a_full_error_text_of_a_diverged_pull_names_the_flower_resume(tmp_path: Path) -> None:
    path = Path(write(tmp_path / "diverges.toml"))
    path.write_text(path.read_text() + '\n[security]\nclient_errors = "full"\n')
    cfg = load_config(str(path))
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": True})
    (tmp_path / "res").mkdir()
    full = dict.fromkeys(range(3), "full")
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=full)
    with pytest.raises(DeployError, match="FEDORA's pull diverged in round 1"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    resumed = {**rc, "resume": "42", "amendments": json.dumps([AMENDMENT])}
    grid = InMemoryGrid(tmp_path / "nodes", resumed, 3, run_id=777, node_errors=full)
    results = server_app.run_federation(grid, RunSettings.from_run_config(resumed), 777)  # type: ignore[arg-type]
    # the client's whole text, as the server records it: the in-process command was there
    [event] = results["events"]
    assert event["event"].startswith("error reply (2: ClientUpdateError: client 1: ")
    assert f"`{PULL_RESUME_COMMAND}` continues it" in event["event"]
    assert "secure-fedora run" not in event["event"]
    assert results["rounds"][0]["unstable_pulls"] == 1.0


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method, text", [
    # a method without FEDORA's pull: the withheld tag cannot be true of it
    ("fedavg", f"ClientUpdateError (FEDORA's pull diverged; {WITHHELD_DETAILS})"),
    # a full text that only mentions the phrase (a plug-in's own message)
    ("fedora", "PluginError: FEDORA's pull diverged is not what went wrong here"),
])
def test_an_error_reply_that_only_names_a_pull_divergence_does_not_stop_the_run(
        tmp_path: Path, method: str, text: str) -> None:
    # before: the run stopped, naming fedora.max_pull as the remedy, for any error reply
    # holding the phrase, fedavg's too
    cfg = parse_config({**TINY, "methods": [method],
                        "training": {**TINY["training"], "local_epochs": 1}})
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, fail={(1, 1): text})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [(e["round"], e["client"]) for e in results["events"]][:1] == [(1, 1)]
    assert results["rounds"][0]["replied"] == 2
    assert results["rounds"][0].get("unstable_pulls", 0.0) == 0.0


@pytest.mark.usefixtures("task_identity")
def test_the_method_decides_which_statistic_a_client_that_sat_out_affects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server added a diverged pull to FEDORA's ``unstable_pulls`` by that name itself;
    now it tells the method who sat the round out and why (``sat_out_statistics``), and the
    method's answer is what the row gets."""
    from secure_fedora.algorithms.contract import SAT_OUT_PULL_DIVERGED
    from secure_fedora.algorithms.methods import Fedora

    told: list = []

    def sat_out_statistics(self, rnd, reasons):
        told.append((rnd, dict(reasons)))
        return {"pulls_sat_out": 2.0}

    monkeypatch.setattr(Fedora, "sat_out_statistics", sat_out_statistics)
    cfg = load_config(write(tmp_path / "diverges.toml"))
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": True})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    with pytest.raises(DeployError, match="FEDORA's pull diverged in round 1"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert told == []  # the run stopped: nobody sat the round out
    resumed = {**rc, "resume": "42", "amendments": json.dumps([AMENDMENT])}
    grid = InMemoryGrid(tmp_path / "nodes", resumed, 3, run_id=777)
    results = server_app.run_federation(grid, RunSettings.from_run_config(resumed), 777)  # type: ignore[arg-type]
    assert told == [(1, {1: SAT_OUT_PULL_DIVERGED})]
    first = results["rounds"][0]
    # the accepted replies' own statistic, and the method's answer for the one that sat out
    assert (first["unstable_pulls"], first["pulls_sat_out"]) == (0.0, 2.0)
    assert [r.get("pulls_sat_out") for r in results["rounds"][1:]] == [None, None]
