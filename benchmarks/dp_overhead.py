"""DP-FEDORA round time over non-private FEDORA round time, measured in one run.

Both use the DP setting's data and model (configs/dp_rotated_mnist.toml); the private round
runs DP-SGD (Poisson sampling, fused per-sample clipping, Gaussian noise) and the private
lambda, the plain round the same number of local steps with plain mini-batch SGD (batch =
the expected Poisson batch). Rounds alternate so background load hits both alike.
``--engine batched`` trains both with ``[training] engine = "batched"`` (all clients together).
Usage: python benchmarks/dp_overhead.py [--rounds 5] [--clients 40] [--engine loop|batched]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from secure_fedora.core.config import load_config
from secure_fedora.runtimes.inprocess import build_clients, build_context, make_method
from secure_fedora.secure.private import FederationPrivacy, steps_per_round

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", choices=("loop", "batched"), default="loop",
                        help="[training] engine of both runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(ROOT / "configs" / "dp_rotated_mnist.toml")
    private = base.model_copy(update={
        "data": base.data.model_copy(update={"num_clients": args.clients}),
        "training": base.training.model_copy(update={"rounds": args.rounds + 1, "engine": args.engine}),
    })
    plain = private.model_copy(update={
        "privacy": private.privacy.model_copy(update={"enabled": False}),
        "fedora": private.fedora.model_copy(update={"relatedness": "plain"}),
        "data": private.data.model_copy(update={"validation": "public"}),
    })
    clients = build_clients(private)
    work = Path(tempfile.mkdtemp(prefix="dp-overhead-"))
    try:
        ctx_dp = build_context(private, clients)
        ctx_dp.privacy = FederationPrivacy.open(private, "fedora", len(clients), work / "ledgers",
                                                work / "keys")
        fed_dp = make_method("fedora", ctx_dp, private)
        fed_dp.setup()
        ctx_plain = build_context(plain, clients)
        fed_plain = make_method("fedora", ctx_plain, plain)
        fed_plain.setup()
        everyone = list(range(len(clients)))
        t_dp, t_plain = [], []
        for rnd in range(args.rounds + 1):  # round 0 is a warm-up
            t0 = time.perf_counter()
            with ctx_dp.privacy.admission_batch(rnd + 1):  # as the runtime's round admits
                admitted = [i for i in everyone
                            if ctx_dp.privacy.admit(i, rnd + 1, fed_dp.theta[i], True)]
            fed_dp.train_round(rnd + 1, admitted)
            t1 = time.perf_counter()
            fed_plain.train_round(rnd + 1, everyone)
            t2 = time.perf_counter()
            if rnd:
                t_dp.append(t1 - t0)
                t_plain.append(t2 - t1)
        ctx_dp.privacy.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    d, p = statistics.median(t_dp), statistics.median(t_plain)
    print(f"setup: DP setting, {len(clients)} clients x {private.data.train_per_client} train, MLP, "
          f"{steps_per_round(private)} local steps per round (Poisson q="
          f"{private.data and ctx_dp.privacy.sample_rate:.3f}), {args.threads} thread(s), "
          f"{args.rounds} timed rounds (median), engine {ctx_dp.engine!r}; DP round includes the gate "
          "(ledger fsync) and private lambda")
    print(f"non-private FEDORA round: {p:.3f} s")
    print(f"DP-FEDORA round:          {d:.3f} s")
    print(f"ratio DP / non-private: {d / p:.2f}x  (target <= 2x)")


if __name__ == "__main__":
    main()
