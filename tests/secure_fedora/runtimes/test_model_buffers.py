"""A model with constant buffers (forward only reads them) trains in process on both engines,
with and without DP, binds its checkpoints to the buffers' values, and a buffer that forward
starts writing during training stops the run before that round's replies leave."""

from __future__ import annotations

import math
import time

import pytest
import torch

from secure_fedora.api import Experiment
from secure_fedora.learning.models import BufferGuard, ModelError
from secure_fedora.runtimes.inprocess import CheckpointError
from tests.secure_fedora.runtimes.buffer_models import (
    ConstantBuffers,
    constant_buffers,
    eval_writer,
    late_writer,
)


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(240, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return {"x_train": x[:180], "y_train": y[:180], "x_test": x[180:], "y_test": y[180:]}


def _config(engine: str, dp: bool, **training) -> dict:
    cfg = {"methods": ["fedora", "local"],
           "data": {"partition": "iid", "num_clients": 3, "train_per_client": 30,
                    "val_per_client": 15, "test_per_client": 15},
           "training": {"rounds": 2, "local_epochs": 1, "batch_size": 10, "lr": 0.05,
                        "engine": engine, **training}}
    if dp:
        cfg["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible"}
        cfg["fedora"] = {"relatedness": "noised"}
    return cfg


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_a_constant_buffer_model_trains_on_both_engines(dp) -> None:
    """Refused before ("buffer 'scale' would be shared by every client"); now the loop and the
    batched engine (vmap, no fallback) train it, with equal results without DP."""
    results = {}
    for engine in ("loop", "batched"):
        r = Experiment(_config(engine, dp), data=_data(), model=constant_buffers).run()
        for name in ("fedora", "local"):
            assert 0.0 <= r.mean(name) <= 1.0
        if engine == "batched":
            used = r["methods"]["fedora"]["extra"]["training_engine"]
            assert used["fallbacks"] == [] and set(used["runs"]) == {"vmap"}
        if dp:
            spent = [c["epsilon_spent"] for c in r["privacy"]["fedora"]["clients"]]
            assert all(0 < e <= 8.0 for e in spent)
        results[engine] = r
    if not dp:
        for name in ("fedora", "local"):
            assert results["loop"].selected(name)["per_client"] == \
                pytest.approx(results["batched"].selected(name)["per_client"], abs=1e-6)


@pytest.mark.parametrize(("engine", "message"), [
    ("loop", r"buffer \('offset'\) changed in round 1's training, before any client's reply left; "),
    # the batched engine's vmapped training pass writes it under vmap, where torch's in-place
    # shape error stopped the run; the pass names the buffer instead
    ("batched", r"buffer 'offset' changed in a training step \(forward writes it\); ")])
def test_a_buffer_forward_starts_writing_stops_the_run_before_that_rounds_replies_leave(
        engine, message) -> None:
    """The checks before training see a constant buffer; forward writes it from its 21st call
    on (in round 1's training): in process the clients share one module. On the loop engine
    the clients trained after the write used it; the run stops with a ModelError after the
    round's training and before any of its replies reaches the server half (it was checked
    only after the round, when the server had aggregated them). On the batched engine the
    write happens inside a vmapped pass over all clients, which fails at once: the run stops
    with the ModelError that names the buffer (it stopped with torch's in-place shape error,
    "output with shape [6] doesn't match the broadcast shape [3, 6]")."""
    with pytest.raises(ModelError, match=message + ".*per client"):
        Experiment(_config(engine, False), data=_data(), model=late_writer).run()


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_buffer_written_only_while_evaluating_is_named_in_process(engine) -> None:
    """A forward that writes its buffer only when evaluating 8 rows or more: the in-process
    evaluation runs all clients under vmap, where the write failed with torch's in-place
    shape error ("output with shape [6] doesn't match the broadcast shape [3, 6]"); it is now
    the ModelError that names the buffer, as a Flower client's."""
    cfg = {**_config(engine, False), "methods": ["local"]}  # FEDORA's lambda evaluates in training
    with pytest.raises(ModelError, match=r"buffer 'offset' changed in an evaluation"):
        Experiment(cfg, data=_data(), model=eval_writer).run()


def test_resuming_with_other_buffer_values_is_a_checkpoint_error(tmp_path) -> None:
    """The buffers' values are part of the model's fingerprint: a resume whose factory builds
    another projection (same architecture otherwise) is refused, nothing written; the same
    factory resumes."""
    from tests.secure_fedora.runtimes.test_inprocess import _api_run_killed_after_a_checkpoint

    def other(shape, k):
        model = constant_buffers(shape, k)
        model.projection.mul_(-1.0)
        return model

    run_dir = tmp_path / "run"
    data, config = _api_run_killed_after_a_checkpoint(run_dir, constant_buffers)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="buffer values sha256"):
        Experiment(config, data=data, model=other, run_dir=run_dir).run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    resumed = Experiment(config, data=data, model=constant_buffers, run_dir=run_dir).run(resume=True)
    assert resumed.method_names == ["local", "fedavg", "fedavg_ft"]


def test_the_buffer_guard_costs_milliseconds() -> None:
    """The per-round check digests every buffer: a 1M-float buffer (4 MB) in well under 100 ms."""
    model = ConstantBuffers(1024, 2)
    model.register_buffer("bank", torch.randn(1024, 1024))
    guard = BufferGuard(model, "model")
    t0 = time.perf_counter()
    guard.check("now")
    assert time.perf_counter() - t0 < 0.1
    model.bank[3, 4] += 1.0
    with pytest.raises(ModelError, match="changed now"):
        guard.check("now")
    assert math.isfinite(float(model.bank.sum()))
