"""Regression fixtures of the baselines: what each one produced before the contract port.

:func:`fingerprint` runs one baseline in the in-process simulation under one variant (plain,
DP, signed envelopes, both) and returns what a faithful port must reproduce: every client's
selected and final accuracy, the per-round history (without timing), the method's extra
results, the privacy accounting and, per client, the SHA-256 of its final evaluated
parameter row plus float64 summaries of that row (to compare within a tolerance where float
summation order may legitimately change). ``data/baseline_fixtures.json`` holds the values
recorded before the port (``python -m tests.secure_fedora.algorithms.baseline_regression``
rewrites it; only do that on purpose).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import Simulation, build_clients

FIXTURES = Path(__file__).parent / "data" / "baseline_fixtures.json"
METHODS = ("fedprox", "ditto", "apfl", "fedamp", "ifca")
VARIANTS = ("plain", "dp", "envelopes", "dp_envelopes")
_TIMING = ("seconds_training", "seconds_evaluation")


def config(name: str, variant: str) -> Any:
    """A tiny experiment: 5 clients, 3 rounds at participation 0.6, ``variant`` switched on."""
    dp = variant.startswith("dp")
    data: dict[str, Any] = {
        "name": "regression", "seed": 3, "methods": [name],
        "data": {"num_clients": 5, "train_per_client": 32, "val_per_client": 16,
                 "test_per_client": 32, "groups": 2},
        "training": {"rounds": 3, "local_epochs": 2, "batch_size": 16, "lr": 0.2,
                     "participation": 0.6},
        "baselines": {"ifca": {"num_clusters": 3, "selection_split": "val" if dp else "train"},
                      "apfl": {"alpha": 0.4, "adaptive": True}},
        "security": {"envelopes": variant.endswith("envelopes")},
    }
    if dp:
        data["privacy"] = {"enabled": True, "epsilon": 4.0, "delta": 1e-3, "noise": "reproducible"}
    return parse_config(data)


def _projection(p: int) -> torch.Tensor:
    return torch.randn(p, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)


def row_summary(row: torch.Tensor) -> dict[str, Any]:
    """The row's SHA-256 (float32 bytes) and float64 sum, norm and a fixed random projection."""
    r = row.detach().to(torch.float32).contiguous().cpu()
    r64 = r.to(torch.float64)
    return {"sha256": hashlib.sha256(r.numpy().tobytes()).hexdigest(),
            "sum": float(r64.sum()), "norm": float(r64.norm()),
            "projection": float(r64 @ _projection(r.numel()))}


def eval_rows(method: Any) -> list[torch.Tensor]:
    """Each client's evaluated parameter row, through whichever API the method offers."""
    n = method.ctx.num_clients
    if hasattr(method, "evaluation_messages") and hasattr(method, "client_eval_row"):
        messages = method.evaluation_messages(0, list(range(n)))
        return [method.client_eval_row(i, messages.get(i)).clone() for i in range(n)]
    return [method.eval_row(i).clone() for i in range(n)]


def _without_clock(value: Any) -> Any:
    """``value`` without wall-clock fields (keys ending in ``seconds``), recursively."""
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def fingerprint(name: str, variant: str, run_dir: Path, clients: Any = None) -> dict[str, Any]:
    """Run ``name`` under ``variant`` in ``run_dir``; the JSON-compatible fingerprint."""
    cfg = config(name, variant)
    sim = Simulation(cfg, run_dir, clients=clients if clients is not None else build_clients(cfg))
    results = sim.run()
    body = dict(results["methods"][name])
    for key in _TIMING:
        body.pop(key, None)
    privacy = json.loads(json.dumps(results.get("privacy") or {}))
    for spent in privacy.values():
        for client in spent.get("clients", []):
            client.pop("ledger_head", None)
        # the stage listing and the model fingerprint are descriptive (added after the
        # fixtures were recorded); the accounting compared below is what a port must reproduce
        spent.pop("release_stages", None)
        spent.pop("model_fingerprint", None)
        for row in spent.get("plan", []):
            row.pop("release_stages", None)
    history = [{k: v for k, v in row.items()} for row in sim.history]
    return {
        "selected": body["selected"], "final": body["final"], "extra": _without_clock(body["extra"]),
        "history": history, "privacy": privacy,
        "rows": [row_summary(r) for r in eval_rows(sim.methods[name])],
    }


def record(out: Path = FIXTURES) -> None:
    """Record every (method, variant) fingerprint into ``out``."""
    import tempfile

    torch.set_num_threads(1)
    fixtures: dict[str, Any] = {}
    clients = build_clients(config("fedprox", "plain"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS:
            for variant in VARIANTS:
                fixtures[f"{name}/{variant}"] = fingerprint(name, variant, Path(tmp) / name / variant,
                                                            clients)
                print(name, variant, fixtures[f"{name}/{variant}"]["selected"]["mean"], flush=True)
    out.write_text(json.dumps(fixtures, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES)
