"""A plug-in Gaussian mechanism runs on the Flower grid exactly as in process: the same plan,
the same released values (reproducible noise), the same ledgers' mechanisms and params, and
each client reports the plug-in's noise with its ledger record (checked by the server)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from privacy.identity import client_ids
from privacy.ledger import read_ledger
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.protocol import MECHANISM_NOISE_PREFIX, DeployError, RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    TINY,
    InMemoryGrid,
    in_process,
    run_config,
    task_identity,
)
from tests.secure_fedora.secure.mechanism_plugin import MECHANISM, LabelShareFedAvg

#: What a ledger entry states apart from when it was written and how it is chained/signed.
_VOLATILE = {"timestamp", "signature", "prev_hash"}


@pytest.fixture
def method() -> Iterator[str]:
    name = f"mech_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, LabelShareFedAvg)
    try:
        yield name
    finally:
        METHODS.unregister(name)


def _config(method: str) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["data"]["validation"] = "private"
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible",
                       "mechanisms": {MECHANISM: {"budget_fraction": 0.15}}}
    return parse_config(data)


def _grid_run(cfg: Any, tmp_path: Path) -> tuple[InMemoryGrid, dict[str, Any]]:
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True,
                                      "result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    return grid, server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


def _stopped_run(tmp_path: Path, name: str) -> InMemoryGrid:
    """The grid of a 3-node run of registered method ``name`` (reproducible noise) that
    stops with a node's error, which the grid keeps (``grid.errors``)."""
    rc = run_config(_config(name), tmp_path, **{"reproducible-dp-noise": True,
                                                 "result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    with pytest.raises(Exception):  # noqa: B017 - the run stops; the node's error says why
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    return grid


@pytest.mark.usefixtures("task_identity")
def test_a_plug_in_mechanism_runs_alike_on_the_grid_and_in_process(tmp_path: Path,
                                                                   method: str) -> None:
    name = method
    cfg = _config(name)
    grid, results = _grid_run(cfg, tmp_path)
    assert grid.errors == [] and results["events"] == []
    sim, _ = in_process(cfg, tmp_path, name)
    shares = [r["label_share"] for r in results["rounds"]]
    assert len(shares) == 2 and shares == [r["label_share"] for r in sim.history]
    mine, theirs = results["privacy"][name], sim.privacy[name]
    assert [{**r, "release_stages": None} for r in mine["plan"]] == \
        [{**r, "release_stages": None} for r in theirs["plan"]]
    assert any(r.startswith(f"{MECHANISM} x2") for r in mine["plan"][0]["releases"])
    # the accountant choice states the plug-in's noise under each candidate, alike
    assert mine["accountant_choice"] == theirs["accountant_choice"]
    (row,) = mine["accountant_choice"]["comparison"]
    assert [r["mechanism"] for r in row["plan_releases"]] == ["dpsgd", MECHANISM]
    assert row["pld_noise_by_mechanism"][MECHANISM] < row["rdp_noise_by_mechanism"][MECHANISM]
    for c, cid in enumerate(client_ids(3)):
        # the grid states the spend unrounded, in process rounded up to 6 decimals
        assert mine["clients"][c]["epsilon_spent"] == pytest.approx(
            theirs["clients"][c]["epsilon_spent"], abs=1e-6)
        grid_ledger = read_ledger(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / name
                                  / f"{cid}.jsonl")
        ours = read_ledger(tmp_path / "inproc" / "ledgers" / name / f"{cid}.jsonl")
        assert [e["mechanism"] for e in grid_ledger] == ["dpsgd", MECHANISM] * 2 + ["close"]
        assert [{k: v for k, v in e.items() if k not in _VOLATILE} for e in grid_ledger] == \
            [{k: v for k, v in e.items() if k not in _VOLATILE} for e in ours]


@pytest.mark.usefixtures("task_identity")
def test_a_client_reporting_other_plug_in_noise_stops_the_run_naming_it(
        tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1 states its plug-in mechanism's noise 1% off the config's calibration (its node
    runs another configuration): the server refuses it, naming both figures, before any
    results are written."""
    from flwr.app import ConfigRecord

    real = client_app._ledger_record
    key = f"{MECHANISM_NOISE_PREFIX}{MECHANISM}"

    def record(privacy: Any, **kwargs: Any) -> ConfigRecord | None:
        out = real(privacy, **kwargs)
        if out is None or privacy.sole.index != 1:
            return out
        assert key in out
        return ConfigRecord({**dict(out), key: float(out[key]) * 1.01})
    monkeypatch.setattr(client_app, "_ledger_record", record)
    with pytest.raises(DeployError, match=f"{MECHANISM} .*the config calibrates .*{MECHANISM}"):
        _grid_run(_config(method), tmp_path)
    assert not (tmp_path / "res" / "results.json").exists()


def test_a_nodes_plan_cache_keeps_the_plug_in_noise_and_an_older_cache_reads_without_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The plan a node calibrates once per run is read back with its plug-in noise (not
    recalibrated: the cache is whole); a cache written before the field reads as before."""
    from privacy.accounting import PlannedRelease, PrivacyBudget
    from secure_fedora.secure.private import ClientPlan

    budget = PrivacyBudget(8.0, 1e-3)
    plan = ClientPlan(1.5, None, None, (PlannedRelease("dpsgd", 0.25, 24),
                                        PlannedRelease(MECHANISM, 1.0, 2, 4.25)),
                      "pld", True, ((MECHANISM, 4.25),))
    path = tmp_path / "plan.json"
    assert client_app._cached_plan(path, "h", budget, lambda: plan) == plan

    def again() -> ClientPlan:
        raise AssertionError("calibrated again")
    assert client_app._cached_plan(path, "h", budget, again) == plan
    older = ClientPlan(1.5, 2.0, None, (PlannedRelease("dpsgd", 0.25, 24),), "pld", True)
    path.unlink()
    client_app._cached_plan(path, "h", budget, lambda: older)
    assert "mechanism_noise" not in json.loads(path.read_text())  # the document of before
    assert client_app._cached_plan(path, "h", budget, again) == older
    assert "damaged" not in caplog.text


@pytest.mark.usefixtures("task_identity")
def test_a_plug_in_setup_release_runs_alike_on_the_grid_and_in_process(tmp_path: Path) -> None:
    """A plug-in mechanism declared as the setup release: the same plan, the same released
    value bit for bit (reproducible noise), the same ledgers (the round-0 entry first); each
    client reports the plug-in's noise with its setup reply, checked by the server."""
    from tests.secure_fedora.secure.mechanism_plugin import SetupLabelShareFedAvg

    name = f"mech_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, SetupLabelShareFedAvg)
    try:
        cfg = _config(name)
        grid, results = _grid_run(cfg, tmp_path)
        assert grid.errors == [] and results["events"] == []
        sim, _ = in_process(cfg, tmp_path, name)
    finally:
        METHODS.unregister(name)
    shares = [r["setup_share"] for r in results["rounds"]]
    assert len(shares) == 2 and shares == [r["setup_share"] for r in sim.history]
    mine, theirs = results["privacy"][name], sim.privacy[name]
    assert [{**r, "release_stages": None} for r in mine["plan"]] == \
        [{**r, "release_stages": None} for r in theirs["plan"]]
    assert f"{MECHANISM} x1" in " ".join(mine["plan"][0]["releases"])
    for c, cid in enumerate(client_ids(3)):
        grid_ledger = read_ledger(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / name
                                  / f"{cid}.jsonl")
        ours = read_ledger(tmp_path / "inproc" / "ledgers" / name / f"{cid}.jsonl")
        assert [(e["round"], e["mechanism"]) for e in grid_ledger] == \
            [(0, MECHANISM), (1, "dpsgd"), (2, "dpsgd"), (2, "close")]
        assert [{k: v for k, v in e.items() if k not in _VOLATILE} for e in grid_ledger] == \
            [{k: v for k, v in e.items() if k not in _VOLATILE} for e in ours]


@pytest.mark.usefixtures("task_identity")
def test_a_client_reporting_other_setup_plug_in_noise_stops_the_run_at_setup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The setup reply's ledger record states the setup plug-in's noise: 1% off the config's
    calibration is refused at the setup, before any round, naming both figures."""
    from flwr.app import ConfigRecord

    from tests.secure_fedora.secure.mechanism_plugin import SetupLabelShareFedAvg

    real = client_app._ledger_record
    key = f"{MECHANISM_NOISE_PREFIX}{MECHANISM}"
    seen: list[int] = []

    def record(privacy: Any, **kwargs: Any) -> ConfigRecord | None:
        out = real(privacy, **kwargs)
        if out is None or privacy.sole.index != 1:
            return out
        seen.append(int(out["entries"]))
        return ConfigRecord({**dict(out), key: float(out[key]) * 1.01})
    monkeypatch.setattr(client_app, "_ledger_record", record)
    name = f"mech_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, SetupLabelShareFedAvg)
    try:
        with pytest.raises(DeployError, match=f"{MECHANISM} .*the config calibrates .*{MECHANISM}"):
            _grid_run(_config(name), tmp_path)
    finally:
        METHODS.unregister(name)
    assert seen == [1]  # its setup reply, holding the setup entry alone
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("point", ["gate@2", "release@2"])
def test_a_node_killed_in_its_plug_in_setup_release_remakes_it_on_resume(
        tmp_path: Path, point: str) -> None:
    """The ServerApp and client 1's node die in its setup release, after its ledger entry
    (gate: before the journal record; release: after it, before the reply left or was saved).
    The resumed run asks for the setup again; the node consumes its entry (not accounted
    twice) and re-makes the release: the run ends with an uninterrupted run's released values
    and ledgers (reproducible noise)."""
    from tests.secure_fedora.core.crash_support import crashes_at
    from tests.secure_fedora.runtimes.flower.test_server_resume import (
        _federation,
        _run,
    )
    from tests.secure_fedora.secure.mechanism_plugin import SetupLabelShareFedAvg

    name = f"mech_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, SetupLabelShareFedAvg)
    over = {"reproducible-dp-noise": True}
    try:
        cfg = _config(name)
        rc, grid = _federation(tmp_path / "whole", cfg, **over)
        whole = _run(rc, grid)
        rc, grid = _federation(tmp_path / "cut", cfg, **over)
        with crashes_at(point):
            _run(rc, grid)
        rc = {**rc, "resume": "42"}
        resumed = _run(rc, InMemoryGrid(tmp_path / "cut" / "nodes", rc, 3, run_id=777),
                       run_id=777)
    finally:
        METHODS.unregister(name)
    assert [r["setup_share"] for r in resumed["rounds"]] == \
        [r["setup_share"] for r in whole["rounds"]]
    def stated(root: str, c: int, cid: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in _VOLATILE} for e in read_ledger(
            tmp_path / root / "nodes" / f"node-{c}" / "runs" / "42" / name / f"{cid}.jsonl")]

    for c, cid in enumerate(client_ids(3)):
        assert stated("cut", c, cid) == stated("whole", c, cid)
        assert stated("cut", c, cid)[0]["mechanism"] == MECHANISM


@pytest.mark.usefixtures("task_identity")
def test_a_setup_release_asked_for_in_a_later_exchange_is_refused_on_the_node(
        tmp_path: Path) -> None:
    """A node's evaluate message opens a fresh privacy state holding no record of the setup
    release made earlier: the setup mechanism asked for there is refused before any draw
    (it would have been a second round-0 release under a second entry), and the node's
    ledger keeps its one setup entry."""
    from secure_fedora.secure.private import UndeclaredReleaseError
    from tests.secure_fedora.secure.mechanism_plugin import SetupLabelShareFedAvg, label_share

    class Again(SetupLabelShareFedAvg):
        def client_eval_row(self, i: int, message: Any) -> Any:
            value = label_share(self.ctx.clients[i].train_y, 64)
            self.ctx.privacy.gaussian(i, MECHANISM, value, self.ctx.noise[i])
            return super().client_eval_row(i, message)

    name = f"mech_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, Again)
    try:
        grid = _stopped_run(tmp_path, name)
    finally:
        METHODS.unregister(name)
    assert grid.errors and all(isinstance(err, UndeclaredReleaseError)
                               and "outside the setup exchange" in str(err)
                               for _, _, err in grid.errors)
    for c, cid in enumerate(client_ids(3)):
        ledger = read_ledger(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / name
                             / f"{cid}.jsonl")
        assert [e["round"] for e in ledger].count(0) == 1


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("stage", ["round", "setup"])
def test_a_plug_in_replying_its_raw_value_is_refused_on_the_node(tmp_path: Path,
                                                                  stage: str) -> None:
    """A plug-in whose client code calls gaussian but replies with the raw value (round or
    setup): each node refuses its reply before it leaves, naming method, client, entry and
    mechanism; the server sees no reply of that exchange and writes no results."""
    from secure_fedora.algorithms.contract import ContractError
    from tests.secure_fedora.secure.mechanism_plugin import (
        ENTRY,
        RawLabelShareFedAvg,
        RawSetupLabelShareFedAvg,
    )

    base = RawLabelShareFedAvg if stage == "round" else RawSetupLabelShareFedAvg

    class Raw(base):  # type: ignore[valid-type, misc]
        seen: list[Any] = []

    name = f"mech_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, Raw)
    try:
        grid = _stopped_run(tmp_path, name)
    finally:
        METHODS.unregister(name)
    assert grid.errors
    for c, kind, err in grid.errors:
        assert isinstance(err, ContractError), (c, kind, err)
        assert f"method {name!r}: client {c}'s {stage} reply entry {ENTRY!r} is not the " \
               f"{MECHANISM!r} release" in str(err)
    assert Raw.seen == [] and not (tmp_path / "res" / "results.json").exists()
