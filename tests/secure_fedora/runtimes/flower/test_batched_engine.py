"""The in-process runtime with ``[training] engine = "batched"`` against the Flower runtime
(whose ClientApps train one client each, by the per-client loop): equal within 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    assert_client_states_match,
    dp_config,
    in_process,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
)

ALL_METHODS = ("fedora", "local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca")


def _batched(cfg, *methods: str):
    data = cfg.model_dump(mode="json", exclude_none=True)
    data["methods"] = list(methods)
    data["training"]["engine"] = "batched"
    return parse_config(data)


def _grid(cfg, tmp_path: Path, **extra):
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"), **extra})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == [] and results["events"] == []
    return results


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_batched_in_process_equals_the_flower_grid(tmp_path: Path, method: str) -> None:
    cfg = _batched(tiny_config(rounds=3, participation=0.5), method)
    results = _grid(cfg, tmp_path)
    sim, outcome = in_process(cfg, tmp_path, method)
    assert set(outcome.extra["training_engine"]["runs"]) == {"linear"}
    ours = results["methods"][method]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], outcome.to_json()[part]["per_client"],
                           atol=1e-4, rtol=0), part
    assert_client_states_match(tmp_path, cfg, sim, method)


@pytest.mark.usefixtures("task_identity")
def test_batched_dp_in_process_equals_the_flower_grid(tmp_path: Path) -> None:
    methods = ("fedora", "ditto")
    cfg = _batched(dp_config(noise="reproducible"), *methods)
    results = _grid(cfg, tmp_path, **{"reproducible-dp-noise": True, "compare-methods": True})
    for method in methods:
        sim, outcome = in_process(cfg, tmp_path / method, method)
        assert set(outcome.extra["training_engine"]["runs"]) == {"linear"}
        ours = results["methods"][method]
        assert np.allclose(ours["selected"]["per_client"], outcome.selected["per_client"],
                           atol=1e-4, rtol=0)
        spent = {r["client"]: r["epsilon_spent"] for r in sim.privacy[method]["clients"]}
        for row in results["privacy"][method]["clients"]:
            assert row["epsilon_spent"] == pytest.approx(spent[row["client"]], abs=1e-6)
