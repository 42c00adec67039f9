"""Flower's first contact (``query.hello``): a client's data checked against the run's model
before anything is opened or released."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import MODELS, PARTITIONERS
from secure_fedora.data.partition import iid_partition
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import DeployError, RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)


class _MixesLargeBatches(torch.nn.Module):
    """Treats every row alone in batches of up to 80 rows and subtracts the batch mean in
    larger ones: DP-SGD must refuse it for a client whose Poisson batches get that large."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        return out - out.mean(0, keepdim=True) if x.shape[0] > 80 else out


def _quantity_skew(dataset: Any, d: Any, seed: int) -> list[Any]:
    """Client i holds (i + 1) x train_per_client training rows."""
    return [dataclasses.replace(iid_partition(dataset, 1, d.train_per_client * (i + 1),
                                              d.val_per_client, d.test_per_client, seed + i)[0],
                                client_id=i) for i in range(d.num_clients)]


@pytest.fixture()
def skewed_plug_ins() -> Any:
    MODELS.register("test-mixes-large-batches", lambda input_shape, num_classes, device=None:
                    _MixesLargeBatches(math.prod(input_shape), num_classes))
    PARTITIONERS.register("test-quantity-skew", _quantity_skew)
    yield
    MODELS.unregister("test-mixes-large-batches")
    PARTITIONERS.unregister("test-quantity-skew")


@pytest.mark.usefixtures("task_identity", "skewed_plug_ins")
@pytest.mark.parametrize("relatedness", ["noised", "noised+encrypted"])
def test_a_client_whose_data_fails_the_model_checks_stops_the_run_before_any_release(
        tmp_path: Path, relatedness: str) -> None:
    """The client-side checks of build_context ran at a client's first method message: with
    clients 1 and 2's larger Poisson batches refused under DP, client 0 had already released
    its noised relatedness summary (a ledger entry, a journal line) and the key holder had made
    the CKKS keys when the run stopped. Now every client checks at first contact and the run
    stops there, naming the client and its reason; no ledger, journal or key exists."""
    data = json.loads(json.dumps(TINY))
    data["data"].update(validation="private", partition="test-quantity-skew")
    data["fedora"]["relatedness"] = relatedness
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible"}
    data["model"] = {"name": "test-mixes-large-batches"}
    # the refusal's whole text reaches the server (the run and the nodes allow it)
    data["security"] = {"client_errors": "full"}
    cfg = parse_config(data)
    result_dir = tmp_path / "res"
    result_dir.mkdir()
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True,
                                      "result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=dict.fromkeys(range(3), "full"))
    with pytest.raises(DeployError, match=r"^client 1 \(node 1001\) refused the run at first "
                       r"contact: DPSGDError: the model's outputs for rows of a batch of \d+ "
                       r"training rows change.*\(clients \[2\] refused too\); the run stops "
                       "before any method message or release") as err:
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    assert {m.metadata.message_type for m in grid.sent} == {"query.hello"}
    assert len(grid.sent) == 3  # a refusal is not asked again
    nodes = tmp_path / "nodes"
    assert not list(nodes.rglob("client-00?.jsonl")) and not list(nodes.rglob("releases.jsonl"))
    assert not list(nodes.rglob("ckks")) and not list(nodes.rglob("fedora"))
    assert list(result_dir.iterdir()) == []



class _RestartingGrid(InMemoryGrid):
    """Node 1002 stops while answering its first hello (an error reply) and its SuperNode
    comes back under node id 1005 (same partition, state and keys); a message to a node no
    longer registered is answered with an error, as the SuperLink does."""

    restarted = False

    def push_messages(self, messages: list[Message]) -> list[str]:
        if not self.restarted and any(m.metadata.dst_node_id == 1002 for m in messages):
            self.restarted = True
            self.node_config[1005] = self.node_config.pop(1002)
        return super().push_messages(messages)


@pytest.mark.usefixtures("task_identity")
def test_a_supernode_restarted_under_a_new_node_id_is_asked_there_at_first_contact(
        tmp_path: Path) -> None:
    """The hello retry waited for the old node id and asked it again, never the restarted
    SuperNode: the run stopped with "missing clients [2]" (naming node 1002 online). Now the
    retry asks every online node that holds no identified client, and client 2 (its reply
    signed with its key) runs at node 1005 like an undisturbed run."""
    cfg = parse_config({**TINY, "methods": ["local"], "training": {**TINY["training"],
                                                                   "rounds": 1}})
    rc = run_config(cfg, tmp_path, **{"round-timeout": 5.0})
    grid = _RestartingGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert results["node_of_client"] == {"0": "1000", "1": "1001", "2": "1005"}
    assert [m.metadata.dst_node_id for m in grid.sent
            if m.metadata.message_type == "query.hello"] == [1000, 1001, 1002, 1005]
    assert {m.metadata.dst_node_id for m in grid.sent
            if m.metadata.message_type != "query.hello"} == {1000, 1001, 1005}
    plain = run_config(cfg, tmp_path / "plain", **{"round-timeout": 5.0})
    undisturbed = server_app.run_federation(
        InMemoryGrid(tmp_path / "plain" / "nodes", plain, 3), RunSettings.from_run_config(plain), 42)  # type: ignore[arg-type]
    assert results["methods"]["local"]["selected"]["per_client"] == \
        undisturbed["methods"]["local"]["selected"]["per_client"]
