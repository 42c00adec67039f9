"""New-client generalization at the reference rotated-MNIST setting (docs/design.md section 2, new clients).

``--held-out`` of the 36 rotated clients are kept out while FEDORA and FedAvg train on the
others for ``--rounds`` rounds: with ``--selection last`` the last ones (rotations 300..350
degrees, a range no trained client covers), with ``--selection spread`` every sixth client
(rotations 50, 110, ..., 350: each lies 10 degrees from trained ones). Each newcomer
then joins: FEDORA hands it ``phi_new`` from its relatedness row alone (nobody retrains),
FedAvg hands it the global model (then fine-tuning), Local starts from the initialization.
Prints the newcomers' test accuracy after 0 and after a few local epochs.

Usage: python benchmarks/new_clients.py [--rounds 100] [--held-out 6] [--epochs 0 1 5]
       [--selection last|spread]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _reference import fresh_directory, reference_config

from secure_fedora.experiments.newclients import (
    NEWCOMER_METHODS,
    format_table,
    run_new_client_experiment,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--epochs", type=int, nargs="+", default=[0, 1, 5])
    parser.add_argument("--selection", choices=["last", "spread"], default="last")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-new-clients")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = reference_config(args.seed, args.rounds)
    out = fresh_directory(args.out)
    start = time.perf_counter()
    report = run_new_client_experiment(cfg, out, held_out=args.held_out, epochs=args.epochs,
                                       selection=args.selection)
    wall = time.perf_counter() - start
    d, t = cfg.data, cfg.training
    angles = [m["rotation_degrees"] for m in report.setup["newcomer_meta"]]
    print(f"setup: rotated MNIST, {d.num_clients} clients x {d.train_per_client} train / "
          f"{d.val_per_client} val, MLP; federation of {report.trained} clients trained "
          f"{t.rounds} rounds x {t.local_epochs} epochs (FEDORA q={cfg.fedora.q} tau={cfg.fedora.tau:g} "
          f"k={cfg.fedora.k} alpha={cfg.fedora.alpha:g}); newcomers ({args.selection}) {report.newcomers} "
          f"(rotations {angles}); seed {args.seed}; {args.threads} thread(s); wall {wall:.0f} s")
    print("newcomer accuracy = test accuracy of the parameters after that many local epochs "
          "(no model selection); lr, batch and momentum as in training")
    print(format_table(report))
    for k, cid in enumerate(report.newcomers):
        row = ", ".join(
            f"{m} " + "/".join(f"{report.accuracy[m][e][k]:.3f}" for e in report.epochs)
            for m in NEWCOMER_METHODS
        )
        print(f"  newcomer {cid} ({angles[k]:g} deg): FEDORA neighbours {report.neighbours[k]}; {row}")
    fed = report.federation
    print("trained clients (best-validation round): "
          + ", ".join(f"{m} mean {v['mean']:.4f} min {v['min']:.4f}" for m, v in fed.items()))
    (out / "new_clients.json").write_text(json.dumps(report.to_json(), indent=2))
    print(f"report: {out / 'new_clients.json'}")


if __name__ == "__main__":
    main()
