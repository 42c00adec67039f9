"""DP-FEDORA vs DP-Local vs DP-FedAvg at each epsilon (and non-private) in the DP setting.

Setting: configs/dp_rotated_mnist.toml (40 clients x 1,000 samples, 4 rotation groups,
delta 1e-5). For each epsilon every client has that budget; DP-SGD noise is calibrated for the
whole plan (DP-SGD steps, FEDORA's noised summary and private lambdas). The non-private row
uses plain relatedness and plain SGD with the same schedule.
Usage: python benchmarks/accuracy_vs_epsilon.py [--epsilons 1 3 8 inf] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from secure_fedora.core.config import load_config
from secure_fedora.runtimes.inprocess import Simulation

ROOT = Path(__file__).resolve().parents[1]


def config_for(epsilon: float, rounds: int | None):
    cfg = load_config(ROOT / "configs" / "dp_rotated_mnist.toml")
    if rounds:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"rounds": rounds})})
    if math.isinf(epsilon):
        return cfg.model_copy(update={
            "privacy": cfg.privacy.model_copy(update={"enabled": False}),
            "fedora": cfg.fedora.model_copy(update={"relatedness": "plain"}),
            "data": cfg.data.model_copy(update={"validation": "public"}),
        })
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"epsilon": epsilon})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-epsilon")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for eps in args.epsilons:
        cfg = config_for(eps, args.rounds)
        out = Path(args.out) / (f"eps{eps:g}" if math.isfinite(eps) else "nonprivate")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        results = Simulation(cfg, out).run()
        for name, body in results["methods"].items():
            s = body["selected"]
            rows.append({"epsilon": eps, "method": name, "mean": s["mean"], "min": s["min"],
                         "std": s["std"], "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-4:]), flush=True)
    cfg = config_for(args.epsilons[0], args.rounds)
    print(f"setup: rotated MNIST, {cfg.data.num_clients} clients x {cfg.data.train_per_client} train, "
          f"{cfg.data.groups} rotation groups, MLP, {cfg.training.rounds} rounds x "
          f"{cfg.training.local_epochs} epoch, delta {cfg.privacy.delta:g}, validation private "
          f"(DP rows), clip {cfg.privacy.max_grad_norm}, seed {cfg.seed}")
    print(f"{'epsilon':>8} {'method':<10} {'mean':>7} {'min':>7} {'std':>7}")
    for r in rows:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        print(f"{eps:>8} {r['method']:<10} {r['mean']:7.4f} {r['min']:7.4f} {r['std']:7.4f}")


if __name__ == "__main__":
    main()
