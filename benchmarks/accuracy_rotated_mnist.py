"""FEDORA vs Local vs FedAvg at the reference rotated-MNIST setting (docs/design.md section 2).

Prints each method's mean / min test accuracy (best-mean-validation round, as the reference
implementation selects) and the count of clients where FEDORA is below Local.
``--engine batched`` trains with the batched engine (``[training] engine``), to check that
the accuracy holds with it too.
Usage: python benchmarks/accuracy_rotated_mnist.py [--rounds 200] [--out runs/bench-accuracy]
[--threads 1] [--engine loop|batched|auto]
"""

from __future__ import annotations

import argparse
import time

import torch
from _reference import fresh_directory, reference_config

from secure_fedora.runtimes.inprocess import Simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-accuracy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", choices=["loop", "batched", "auto"], default=None,
                        help="[training] engine (default: the config's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = reference_config(args.seed, args.rounds)
    if args.engine is not None:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
            update={"engine": args.engine})})
    out = fresh_directory(args.out)
    start = time.perf_counter()
    results = Simulation(cfg, out).run()
    wall = time.perf_counter() - start
    print(f"setup: rotated MNIST, {cfg.data.num_clients} clients x {cfg.data.train_per_client} train / "
          f"{cfg.data.val_per_client} val, MLP, {args.rounds} rounds x {cfg.training.local_epochs} epochs, "
          f"seed {args.seed}, {args.threads} thread(s), engine {cfg.training.engine}, wall {wall:.0f} s")
    print(f"{'method':<10} {'mean':>7} {'min':>7} {'max':>7} {'std':>7} {'round':>6}")
    for name, body in results["methods"].items():
        s = body["selected"]
        print(f"{name:<10} {s['mean']:7.4f} {s['min']:7.4f} {s['max']:7.4f} {s['std']:7.4f} "
              f"{s.get('round', '-')!s:>6}")
    print(f"clients where FEDORA is below Local: {results['comparison'].get('fedora_below_local')}")
    for name, body in results["methods"].items():
        engine = body.get("extra", {}).get("training_engine")
        if engine:
            print(f"{name}: trained by {engine['runs']} (local-training passes per engine)")


if __name__ == "__main__":
    main()
