"""FEDORA's accuracy at scale vs the propagation operator: exact (dense, factored) and sparse at
several tolerances, against Local, on the same clients (rotated MNIST, MLP), in one process.

The sparse operator's error is bounded (``|phi - phi_exact| <= tolerance * max_j |theta_j|``
per coordinate); this measures what the bound costs in accuracy and what it saves in time.
Printed per variant: the selected round's mean / min test accuracy (the round with the best mean
validation accuracy), the final round's mean, the non-zeros per row of the operator and the
wall seconds per round (the relatedness setup included). Writes ``propagation_accuracy.json`` into
--out when given.
Usage: python benchmarks/propagation_accuracy.py [--n 1000] [--rounds 40]
       [--tolerances 1e-2 1e-3 1e-4] [--dense] [--factored] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--per-client", type=int, nargs=3, default=[48, 10, 10],
                        metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--tolerances", type=float, nargs="*", default=[1e-2, 1e-3, 1e-4],
                        help="truncated-series tolerances to run (none: no truncated variant)")
    parser.add_argument("--dense", action="store_true", help="also the exact dense operator")
    parser.add_argument("--factored", action="store_true",
                        help="also the exact factored operator (the default above 256 clients)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, val, test = args.per_client

    def config(method: str, propagation: str = "sparse", tolerance: float = 1e-4):
        return parse_config({
            "name": "propagation-accuracy", "seed": 0, "methods": [method],
            "data": {"dataset": "mnist", "partition": "rotation", "num_clients": args.n,
                     "train_per_client": train, "val_per_client": val, "test_per_client": test},
            "training": {"rounds": args.rounds, "local_epochs": args.local_epochs, "lr": args.lr,
                         "momentum": 0.9, "weight_decay": 5e-5, "batch_size": args.batch_size,
                         "checkpoint_every": args.rounds},
            "fedora": {"propagation": propagation, "propagation_tolerance": tolerance},
            "evaluation": {"every": args.eval_every}})

    variants = [("local", config("local"))]
    if args.dense:
        variants.append(("fedora dense (exact)", config("fedora", "dense")))
    if args.factored:
        variants.append(("fedora factored (exact)", config("fedora", "factored")))
    variants += [(f"fedora sparse {tol:g}", config("fedora", "sparse", tol)) for tol in args.tolerances]
    clients = build_clients(variants[0][1])
    print(f"N = {args.n} clients ({train}/{val}/{test} rows), rotated MNIST, MLP, {args.rounds} rounds x "
          f"{args.local_epochs} local epochs (batch {args.batch_size}, lr {args.lr}), evaluation every "
          f"{args.eval_every} rounds, {args.threads} thread(s)")
    rows = []
    for label, cfg in variants:
        method = cfg.methods[0]
        with tempfile.TemporaryDirectory() as tmp:
            sim = Simulation(cfg, Path(tmp), clients=clients)
            t0 = time.perf_counter()
            outcome = sim.run_method(method).to_json()
            wall = time.perf_counter() - t0
            fedora = sim.methods[method] if method == "fedora" else None
        row = {
            "variant": label,
            "selected_round": outcome["selected"]["round"],
            "selected_mean": outcome["selected"]["mean"],
            "selected_min": outcome["selected"]["min"],
            "final_mean": outcome["final"]["mean"],
            "wall_s": wall,
            "nnz_per_row": (fedora.relatedness.operator.nnz / args.n) if fedora is not None else None,
        }
        rows.append(row)
        nnz = f", {row['nnz_per_row']:.1f} nnz/row" if row["nnz_per_row"] is not None else ""
        print(f"{label:>22}: selected round {row['selected_round']}: mean {row['selected_mean']:.4f}, "
              f"min {row['selected_min']:.4f}; final mean {row['final_mean']:.4f}; "
              f"{wall / args.rounds:.2f} s/round (setup included){nnz}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "propagation_accuracy.json").write_text(json.dumps(
            {"n": args.n, "per_client": args.per_client, "rounds": args.rounds,
             "local_epochs": args.local_epochs, "batch_size": args.batch_size, "lr": args.lr,
             "eval_every": args.eval_every, "threads": args.threads, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
