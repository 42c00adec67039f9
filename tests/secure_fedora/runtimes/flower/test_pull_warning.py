"""The Flower ServerApp states the plan's pull warning (FEDORA's noised lambda expected to make
the pull unstable at least once) before the method's first release, as the in-process runtime
logs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from secure_fedora.core import crashpoints
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_SETUP, RunSettings
from secure_fedora.secure.private import check_budget_plans, client_budget, plan_table
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)


def _stopped_at_first_release(tmp_path: Path, cfg: Any) -> None:
    """Run ``cfg`` until the server asks client 0 for FEDORA's first release (its setup
    summary), where it is stopped: nothing was released."""
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True,
                                      "result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir()

    def stop(_request: Message) -> Message:
        raise crashpoints.InjectedCrash("stopped before the first release")

    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, tamper_request={(0, 0, MSG_SETUP): stop})
    with pytest.raises(crashpoints.InjectedCrash):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_a_plan_expecting_unstable_pulls_is_warned_before_the_first_release(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """epsilon 0.2, lr 0.5: about 1.14 of the run's lambda releases are expected to make the
    pull unstable. Flower recorded the figures in results.json but said nothing; the server
    now says the plan's warning (the in-process runtime's text) before the first release."""
    data = dp_config(rounds=2, epsilon=0.2).model_dump(mode="json", exclude_none=True)
    data["training"]["lr"] = 0.5
    cfg = parse_config(data)
    choice, plans = check_budget_plans(cfg, "fedora", 3)
    (row,) = plan_table(cfg, "fedora", [client_budget(cfg, c) for c in range(3)], plans,
                        choice.name, choice, {})
    assert row["lambda_pull"]["expected_unstable_pulls"] >= 1
    _stopped_at_first_release(tmp_path, cfg)
    said = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert said == [f"[secure-fedora] fedora: warning: {row['pull_warning']}"]
    assert "set fedora.max_pull = 1" in said[0]


@pytest.mark.usefixtures("task_identity")
def test_a_plan_without_unstable_pulls_says_no_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny DP config (epsilon 8): nothing to warn about, nothing said."""
    _stopped_at_first_release(tmp_path, dp_config(rounds=2))
    assert "warning" not in capsys.readouterr().out


@pytest.mark.usefixtures("task_identity")
def test_a_bounded_pull_keeps_the_plans_lambda_pull_figures_in_both_runtimes(
        tmp_path: Path) -> None:
    """With fedora.max_pull set, results.json of either runtime dropped the plan's
    lambda_pull figures; both now state them (those of the unbounded pull, with the bound)
    and warn of nothing."""
    import json

    from secure_fedora.runtimes.inprocess import Simulation

    data = dp_config(rounds=1).model_dump(mode="json", exclude_none=True)
    unbounded = parse_config(data)
    data["fedora"]["max_pull"] = 1.0
    cfg = parse_config(data)
    choice, plans = check_budget_plans(unbounded, "fedora", 3)
    (row,) = plan_table(unbounded, "fedora", [client_budget(unbounded, c) for c in range(3)],
                        plans, choice.name, choice, {})
    expected = {**row["lambda_pull"], "max_pull": 1.0}
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True,
                                      "result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    Simulation(cfg, tmp_path / "inproc", keystore=tmp_path / "keystore").run()
    for results in (tmp_path / "res" / "results.json", tmp_path / "inproc" / "results.json"):
        (stated,) = json.loads(results.read_text())["privacy"]["fedora"]["plan"]
        assert stated["lambda_pull"] == pytest.approx(expected, rel=1e-12), results
        assert "pull_warning" not in stated
