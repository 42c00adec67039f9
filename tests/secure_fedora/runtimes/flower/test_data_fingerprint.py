"""results.json's ``data_fingerprint`` on Flower: without DP the server combines the SHA-256
each client states of its own data at first contact into the value the in-process runtime
records for the same config and data; under DP no client sends one and results.json says so;
a client whose data changed within a run (a resume included) stops it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secure_fedora.data.sources import fingerprint_clients
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.client_app import data_digest
from secure_fedora.runtimes.flower.protocol import MSG_HELLO, MSG_ROUND, DeployError, RunSettings
from secure_fedora.runtimes.flower.state import load_partition, save_partition
from secure_fedora.runtimes.inprocess import build_clients
from secure_fedora.runtimes.results import FLOWER_FINGERPRINT_UNDER_DP
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    in_process,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)


def _run(cfg: Any, root: Path, tamper: Any = None) -> tuple[dict[str, Any], InMemoryGrid]:
    rc = run_config(cfg, root, **{"result-dir": str(root / "res")})
    (root / "res").mkdir(exist_ok=True)
    grid = InMemoryGrid(root / "nodes", rc, cfg.data.num_clients, tamper_reply=tamper)
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42), grid  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_both_runtimes_record_the_same_data_fingerprint(tmp_path: Path) -> None:
    cfg = with_methods(tiny_config(rounds=1), "fedavg")
    results, grid = _run(cfg, tmp_path / "flower")
    assert grid.errors == []
    sim, _ = in_process(cfg, tmp_path / "inproc", "fedavg")
    expected = fingerprint_clients(build_clients(cfg))
    assert results["data_fingerprint"] == sim.fingerprint == expected
    written = json.loads((tmp_path / "flower" / "res" / "results.json").read_text())
    assert written["data_fingerprint"] == expected
    assert "SHA-256" in written["assumptions"]["data"]
    # other data, another fingerprint: the value follows the clients' data
    other = with_methods(tiny_config(rounds=1), "fedavg").model_copy(update={"seed": 1})
    assert _run(other, tmp_path / "other")[0]["data_fingerprint"] != expected


@pytest.mark.usefixtures("task_identity")
def test_under_dp_no_client_sends_a_hash_of_its_data(tmp_path: Path) -> None:
    cfg = with_methods(dp_config(rounds=1), "fedavg")
    hellos: list[Any] = []

    def keep(_request: Any, reply: Any) -> Any:
        hellos.append(reply)
        return reply

    results, _ = _run(cfg, tmp_path, tamper={(c, 0, MSG_HELLO): keep for c in range(3)})
    assert len(hellos) == 3
    assert all("data-fingerprint" not in m.content["client"] for m in hellos)
    assert results["data_fingerprint"] is None
    assert results["assumptions"]["data_fingerprint"] == FLOWER_FINGERPRINT_UNDER_DP
    assert "SHA-256" not in results["assumptions"]["data"]


@pytest.mark.usefixtures("task_identity")
def test_a_resume_on_changed_client_data_is_refused(tmp_path: Path) -> None:
    from secure_fedora.core import crashpoints

    cfg = with_methods(tiny_config(rounds=2), "fedavg")

    def die(_request: Any, _reply: Any) -> Any:
        raise crashpoints.InjectedCrash("server killed in round 2")

    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    grid.tamper_reply = {(1, 2, MSG_ROUND): die}
    with pytest.raises(crashpoints.InjectedCrash):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    # node 1's partition now holds other data (a valid partition file of the same spec)
    digest = data_digest(cfg)
    [path] = (tmp_path / "nodes" / "node-1" / "partitions").glob("*.pt")
    client = load_partition(path, 1, digest)
    client.train_x[0] += 1.0
    save_partition(path, client, digest)
    rc = {**rc, "resume": "42"}
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777)
    with pytest.raises(DeployError, match=r"client 1 .*reports other data than before in this "
                                          r"run .*start a new run"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 777)  # type: ignore[arg-type]
