"""The Flower runtime's checks of the model as in process: the ServerApp records the model's
fingerprint in results.json (so `audit verify` holds each node's model.json to signed data),
and a node refuses an evaluation reply computed after its model's forward wrote a buffer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from audits.verify import verify_run
from privacy.identity import client_ids
from secure_fedora.core.config import ExperimentConfig, parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import DeployError, RunSettings
from secure_fedora.runtimes.inprocess import model_record
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    in_process,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
)


def _model_findings(audit: Path, allow: Path, anchor: Path) -> tuple[list[str], list[str]]:
    report = verify_run(audit, allowlist=allow, anchor=anchor)
    return ([f.message for f in report.errors if f.check == "model_record"],
            [f.message for f in report.warnings if f.check == "model_record"])


@pytest.mark.usefixtures("task_identity")
def test_a_flower_dp_runs_verify_checks_the_model_record_against_signed_data(tmp_path: Path) -> None:
    """results.json records `privacy.fedora.model_fingerprint`, the in-process runtime's value
    for the config; verify of the collected ledgers with a node's model.json finds nothing
    (it warned "checked against itself only" before), a model.json of another model is an
    error, and one not collected is a warning naming the node's file."""
    cfg = dp_config(noise="reproducible")
    result_dir = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True, "result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == []
    signed = results["privacy"]["fedora"]["model_fingerprint"]
    sim, _ = in_process(cfg, tmp_path)
    assert signed == sim.privacy["fedora"]["model_fingerprint"]
    nodes = {json.loads((tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora"
                         / "model.json").read_text())["model_fingerprint"] for c in range(3)}
    assert nodes == {signed}

    audit = tmp_path / "audit"
    folder = audit / "ledgers" / "fedora"
    folder.mkdir(parents=True)
    shutil.copyfile(result_dir / "results.json", audit / "results.json")
    node = tmp_path / "nodes" / "node-1" / "runs" / "42" / "fedora"
    for cid in client_ids(3):
        c = int(cid.rsplit("-", 1)[1])
        shutil.copyfile(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora" / f"{cid}.jsonl",
                        folder / f"{cid}.jsonl")
    shutil.copyfile(node / "model.json", folder / "model.json")
    allow = tmp_path / "ids" / "server" / "allowlist.json"
    anchor = result_dir / "anchor.json"
    assert _model_findings(audit, allow, anchor) == ([], [])

    other = model_record(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10)))
    (folder / "model.json").write_bytes(other)  # intact, of another model
    errors, _ = _model_findings(audit, allow, anchor)
    assert len(errors) == 1 and f"results.json (anchored) records {signed[:16]}" in errors[0]

    (folder / "model.json").unlink()
    errors, warnings = _model_findings(audit, allow, anchor)
    assert errors == [] and len(warnings) == 1
    assert "not collected" in warnings[0] and "runs/<run_id>/fedora/model.json" in warnings[0]


def _eval_writer_config() -> ExperimentConfig:
    data = tiny_config().model_dump(mode="json", exclude_none=True)
    data["methods"] = ["local"]
    data["model"] = {"name": "test-eval-writer"}
    data["security"] = {"client_errors": "full"}
    return parse_config(data)


@pytest.mark.usefixtures("task_identity")
def test_a_buffer_written_in_evaluation_stops_a_flower_client_before_its_reply(tmp_path: Path) -> None:
    """A model whose forward writes a buffer only when evaluating a whole test split (training
    and the checks before it never do): each node refuses to send the evaluation reply, naming
    the buffer, and the run writes no results (before, the metrics computed with the written
    buffer were reported and the run completed)."""
    from secure_fedora.core.registry import MODELS
    from tests.secure_fedora.runtimes.buffer_models import eval_writer

    MODELS.register("test-eval-writer",
                    lambda shape, num_classes, device=None: eval_writer(shape, num_classes))
    try:
        cfg = _eval_writer_config()
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=dict.fromkeys(range(3), "full"))
        with pytest.raises(DeployError, match=r"never reported an evaluation.*ModelError: model "
                           r"'test-eval-writer': a buffer \('offset'\) changed in client \d's "
                           r"evaluate exchange of round \d; .*only parameters are per client"):
            server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        assert not (tmp_path / "res" / "results.json").exists()
    finally:
        MODELS.unregister("test-eval-writer")


class _EvalOnlyOnFewRows(torch.nn.Module):
    """A Linear model whose eval-mode forward raises on a batch of 8 rows or more (the probes
    before training run 1 and 2 rows), or, with ``write``, writes its input in place (equal
    values) once its weights left those of its first forward (the probes before training see
    no write)."""

    def __init__(self, width: int, num_classes: int, write: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, num_classes)
        self.write = write
        self.initial: torch.Tensor | None = None  # the weights at the first forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.initial is None:
            self.initial = self.linear.weight.detach().clone()
        if not self.training:
            if not self.write and x.shape[0] >= 8:
                raise ValueError("a batch of 8 rows or more")
            if self.write and not torch.equal(self.linear.weight, self.initial):
                x.mul_(1.0)
        return self.linear(x.flatten(1))


def _plug_in_run(tmp_path: Path, write: bool) -> None:
    """A run of FedAvg on the plug-in model "test-plug-in" (registered in this process, as a
    contrib/ module registers it in every process), every node sending its errors in full."""
    import math

    from secure_fedora.core.registry import MODELS

    MODELS.register("test-plug-in", lambda shape, num_classes, device=None:
                    _EvalOnlyOnFewRows(math.prod(shape), num_classes, write))
    try:
        data = tiny_config().model_dump(mode="json", exclude_none=True)
        data["methods"] = ["fedavg"]
        data["model"] = {"name": "test-plug-in"}
        data["security"] = {"client_errors": "full"}
        rc = run_config(parse_config(data), tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=dict.fromkeys(range(3), "full"))
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    finally:
        MODELS.unregister("test-plug-in")


@pytest.mark.usefixtures("task_identity")
def test_a_plug_in_model_failing_on_a_clients_split_is_refused_at_first_contact(
        tmp_path: Path) -> None:
    """A registered (contrib/) model is run on every client's splits at first contact, as a
    model factory is in process: one failing on a whole split stops the run there, named by
    the client's refusal (it passed the probes, trained a round and failed in the first
    evaluation)."""
    with pytest.raises(DeployError, match=r"^client 0 \(node \d+\) refused the run at first "
                       r"contact: ModelError: model 'test-plug-in' fails on client 0's train "
                       r"split \(rows 0\.\.63\): ValueError: a batch of 8 rows or more \(at "
                       r".*test_model_checks.py:\d+ in forward\)"):
        _plug_in_run(tmp_path, write=False)
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_plug_in_model_writing_its_inputs_in_evaluation_stops_a_flower_client(
        tmp_path: Path) -> None:
    """A model writing its input in place only once trained passes the probes; the first
    evaluation exchange that writes a client's split is refused on that node, naming the
    split, and the run writes no results (the metrics were reported, and each later
    evaluation ran on the split as the model left it)."""
    with pytest.raises(DeployError, match=r"never reported an evaluation.*ModelError: model "
                       r"'test-plug-in' wrote client \d's (val|test) split in place in client "
                       r"\d's evaluate exchange of round \d"):
        _plug_in_run(tmp_path, write=True)
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_model_writing_its_inputs_only_in_fedavgs_finetuning_stops_a_flower_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvg's fine-tuning and its model selection run in the finalize exchange, after the
    last evaluation exchange: a node whose split is written only there refuses to send its
    finalize reply, naming the split, and the run writes no results."""
    import math

    from secure_fedora.core.registry import MODELS
    from tests.final_pass_support import WritesInFinalize, writes_only_in_fedavg_finalize

    writes_only_in_fedavg_finalize(monkeypatch)
    MODELS.register("test-final-writer", lambda shape, num_classes, device=None:
                    WritesInFinalize(math.prod(shape), num_classes))
    try:
        data = tiny_config().model_dump(mode="json", exclude_none=True)
        data["methods"] = ["fedavg"]
        data["model"] = {"name": "test-final-writer"}
        data["fedavg"] = {**data.get("fedavg", {}), "finetune_epochs": 1}
        data["security"] = {"client_errors": "full"}
        rc = run_config(parse_config(data), tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=dict.fromkeys(range(3), "full"))
        with pytest.raises(DeployError, match=r"ModelError: model 'test-final-writer' wrote "
                           r"client \d's (train|val|test) split in place in client \d's finalize "
                           r"exchange of round \d"):
            server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    finally:
        MODELS.unregister("test-final-writer")
    assert not (tmp_path / "res" / "results.json").exists()
