"""The in-process runtime with ``[training] engine = "batched"`` against the Flower runtime
(whose ClientApps train one client each, by the per-client loop): equal within 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ["local", "fedprox", "apfl"])
def test_one_sample_batches_train_to_the_same_bits_in_both_runtimes(tmp_path: Path, method: str) -> None:
    """With a batch of one the matmul kernels round by the parameter row's address; a client's
    row inside the in-process matrix and the Flower node's own tensor must still train to
    the same bits (the loop engine on both sides)."""
    from secure_fedora.core.config import config_hash
    from secure_fedora.runtimes.flower.state import ClientRunState
    from tests.secure_fedora.runtimes.flower.deploy_support import with_methods

    cfg = with_methods(tiny_config(rounds=1, local_epochs=1, batch_size=1), method)
    _grid(cfg, tmp_path)
    sim, _ = in_process(cfg, tmp_path, method)
    reference = sim.methods[method]
    for c in range(3):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / method
                                    / "client.pt", c, 42, config_hash(cfg), method)
        for key, value in reference.client_state_dict(c).items():
            assert torch.equal(state.algorithm[key], value.cpu()), (c, key)


@pytest.mark.usefixtures("task_identity")
def test_a_constant_buffer_model_trains_on_the_grid_as_in_process(tmp_path: Path) -> None:
    """A registered model with constant buffers (one drawn from the seed): every node builds
    it from the seed, so the grid's clients (each on its own node) train exactly what the
    in-process runtime's batched engine trains (vmap) and each node's model record holds the
    same fingerprint (which includes the buffers' values)."""
    import json

    from secure_fedora.core.registry import MODELS
    from tests.secure_fedora.runtimes.buffer_models import constant_buffers

    MODELS.register("test-constant-buffers",
                    lambda shape, num_classes, device=None: constant_buffers(shape, num_classes))
    try:
        data = _batched(dp_config(noise="reproducible"), "fedora").model_dump(
            mode="json", exclude_none=True)
        data["model"] = {"name": "test-constant-buffers"}
        cfg = parse_config(data)
        results = _grid(cfg, tmp_path, **{"reproducible-dp-noise": True})
        sim, outcome = in_process(cfg, tmp_path, "fedora")
    finally:
        MODELS.unregister("test-constant-buffers")
    assert set(outcome.extra["training_engine"]["runs"]) == {"vmap"}
    assert np.allclose(results["methods"]["fedora"]["selected"]["per_client"],
                       outcome.selected["per_client"], atol=1e-4, rtol=0)
    records = {json.loads(p.read_text())["model_fingerprint"]
               for p in (tmp_path / "nodes").rglob("model.json")}
    assert len(records) == 1 and records == {sim.privacy["fedora"]["model_fingerprint"]}


@pytest.mark.usefixtures("task_identity")
def test_a_buffer_forward_starts_writing_stops_a_flower_client_before_its_reply(tmp_path: Path) -> None:
    """A node's model whose forward writes a buffer only on batches of 8 rows or more
    (training batches and the test split; the checks before training run smaller ones): each
    node refuses to send the round's reply and the evaluation's, naming the buffer, and the run
    stops with nothing trained and no metric reported."""
    from secure_fedora.core.registry import MODELS
    from secure_fedora.learning.models import ModelError
    from secure_fedora.runtimes.flower.protocol import DeployError
    from tests.secure_fedora.runtimes.buffer_models import large_batch_writer

    MODELS.register("test-buffer-writer",
                    lambda shape, num_classes, device=None: large_batch_writer(shape, num_classes))
    try:
        data = tiny_config().model_dump(mode="json", exclude_none=True)
        data["methods"] = ["local"]
        data["model"] = {"name": "test-buffer-writer"}
        data["security"] = {"client_errors": "full"}
        cfg = parse_config(data)
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=dict.fromkeys(range(3), "full"))
        with pytest.raises(DeployError, match=r"never reported an evaluation.*ModelError: "
                           r"model 'test-buffer-writer': a buffer \('offset'\) changed in client 2's "
                           r"evaluate exchange of round 2; .*only parameters are per client"):
            server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        refused = {(c, kind) for c, kind, err in grid.errors if isinstance(err, ModelError)
                   and "a buffer ('offset') changed" in str(err)}
        assert refused == {(c, kind) for c in range(3) for kind in ("train.round", "evaluate.round")}
    finally:
        MODELS.unregister("test-buffer-writer")
