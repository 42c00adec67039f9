"""privacy.noise in whole runs: CSPRNG runs differ, reproducible runs repeat, nothing leaks
the key, and reproducible noise is flagged wherever the run reports its privacy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from privacy.ledger import read_ledger
from privacy.noise import REPRODUCIBLE_WARNING, CsprngNoise
from secure_fedora.cli import privacy_plan_table
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import (
    Simulation,
    build_clients,
    build_context,
    load_checkpoint,
)

BASE = {
    "seed": 5,
    "methods": ["fedora"],
    "data": {"num_clients": 3, "train_per_client": 60, "val_per_client": 20,
             "test_per_client": 20, "groups": 3},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 20, "lr": 0.05},
    "fedora": {"relatedness": "noised"},
    # Fixed noise: no calibration search, so the runs are fast.
    "privacy": {"enabled": True, "epsilon": 50.0, "delta": 1e-3, "noise_multiplier": 1.0,
                "summary_noise_multiplier": 2.0},
}


def config(noise: str):
    return parse_config({**BASE, "privacy": {**BASE["privacy"], "noise": noise}})


@pytest.fixture(scope="module")
def clients():
    return build_clients(config("csprng"))


class _Crash(Exception):
    pass


def _run(cfg, run_dir: Path, clients, *, crash_after: int | None = None, resume: bool = False,
         sources: list | None = None):
    def context(cfg_, clients_):
        ctx = build_context(cfg_, clients_)
        if sources is not None:
            sources.extend(ctx.noise)
        return ctx

    sim = Simulation(cfg, run_dir, clients=clients, context_factory=context)
    if crash_after is not None:
        def progress(method, rnd, total):
            if rnd == crash_after:
                raise _Crash
        sim.progress = progress
    results = sim.run(resume=resume)
    return sim, results


def test_two_csprng_runs_differ_and_two_reproducible_runs_repeat(tmp_path, clients):
    thetas = {}
    for mode in ("csprng", "reproducible"):
        for k in range(2):
            sim, _ = _run(config(mode), tmp_path / f"{mode}-{k}", clients)
            thetas[mode, k] = sim.methods["fedora"].theta.clone()
    assert not torch.equal(thetas["csprng", 0], thetas["csprng", 1])
    assert torch.equal(thetas["reproducible", 0], thetas["reproducible", 1])


def test_no_csprng_key_in_any_file_of_the_run(tmp_path, clients):
    sources: list = []
    _run(config("csprng"), tmp_path, clients, sources=sources)
    keys = [s._key for s in sources]
    assert len(keys) == 3 and all(isinstance(s, CsprngNoise) for s in sources)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".jsonl" for p in files)
    for path in files:
        data = path.read_bytes()
        for key in keys:
            assert key not in data and key.hex().encode() not in data, path
    state = load_checkpoint(tmp_path / "checkpoints" / "fedora.pt")
    assert state["noise_states"] == [None, None, None]


def test_csprng_resume_continues_with_fresh_noise_and_stays_accounted(tmp_path, clients):
    cfg = config("csprng")
    with pytest.raises(_Crash):
        _run(cfg, tmp_path, clients, crash_after=1)
    sim, results = _run(cfg, tmp_path, clients, resume=True)
    for c in results["privacy"]["fedora"]["clients"]:
        entries = read_ledger(tmp_path / "ledgers" / "fedora" / f"{c['client']}.jsonl")
        assert [(e["round"], e["mechanism"]) for e in entries] == [
            (0, "gaussian_summary"), (1, "dpsgd"), (2, "dpsgd"), (2, "close")]


def test_reproducible_resume_equals_an_uninterrupted_run(tmp_path, clients):
    cfg = config("reproducible")
    whole, _ = _run(cfg, tmp_path / "whole", clients)
    with pytest.raises(_Crash):
        _run(cfg, tmp_path / "resumed", clients, crash_after=1)
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "fedora.pt")
    assert all(isinstance(s, torch.Tensor) for s in state["noise_states"])
    resumed, _ = _run(cfg, tmp_path / "resumed", clients, resume=True)
    assert torch.equal(resumed.methods["fedora"].theta, whole.methods["fedora"].theta)


def test_reproducible_noise_is_flagged_in_plan_results_and_ledger(tmp_path, clients):
    sim, results = _run(config("reproducible"), tmp_path, clients)
    section = results["privacy"]["fedora"]
    assert section["noise"] == "reproducible" and section["noise_warning"] == REPRODUCIBLE_WARNING
    assert "not private against anyone who knows the config" in REPRODUCIBLE_WARNING
    assert results["assumptions"]["noise_warning"] == REPRODUCIBLE_WARNING
    assert all(row["noise_warning"] == REPRODUCIBLE_WARNING for row in section["plan"])
    assert "WARNING: not private against anyone who knows the config" in \
        privacy_plan_table(section["plan"]).caption
    for c in section["clients"]:
        entries = read_ledger(tmp_path / "ledgers" / "fedora" / f"{c['client']}.jsonl")
        assert entries[-1]["mechanism"] == "close"  # releases nothing: no noise to describe
        for e in entries[:-1]:
            assert e["params"]["noise"] == "reproducible"
            assert e["params"]["noise_warning"] == REPRODUCIBLE_WARNING
    _, safe = _run(config("csprng"), tmp_path / "csprng", clients)
    assert safe["privacy"]["fedora"]["noise"] == "csprng"
    assert "noise_warning" not in safe["privacy"]["fedora"]
    assert "noise_warning" not in safe["assumptions"]
    assert "ChaCha20" in safe["assumptions"]["noise_source"]
