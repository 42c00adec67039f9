"""Memory of one Flower client's method context vs the number of clients N.

Each (method, N) runs in its own subprocess: it builds client 1's context
(``runtimes.flower.contexts.client_context``) and method (``build_algorithm``) on the MNIST MLP
(118,282 parameters) of the deploy tests' tiny config (CONFIG) with ``data.num_clients = N`` (the client's
data is the same for every N) and prints the bytes of every tensor storage and generator state
reachable from the method and context, the growth of peak RSS while building them, and the
build time. Usage: python benchmarks/client_memory.py [--n 36 1000 10000] [--methods local fedora]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(ROOT))

#: The deploy tests' tiny configuration (MNIST MLP, 118,282 parameters); the client's data is
#: built for 3 clients and reused for every N.
CONFIG: dict[str, Any] = {
    "name": "client-memory", "seed": 0, "methods": ["fedora"],
    "data": {"num_clients": 3, "train_per_client": 64, "val_per_client": 32, "test_per_client": 64},
    "training": {"rounds": 2, "local_epochs": 3, "lr": 0.1, "batch_size": 16},
    "fedora": {"k": 2},
}


def one(method: str, n: int) -> dict[str, float]:
    """Build client 1's context and method for ``n`` clients; what it holds."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.core.tensors import reachable_bytes
    from secure_fedora.runtimes.flower.contexts import build_algorithm, client_context
    from secure_fedora.runtimes.inprocess import build_clients

    client = build_clients(parse_config(CONFIG))[1]
    cfg = parse_config({**CONFIG, "methods": [method], "data": {**CONFIG["data"], "num_clients": n}})
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ctx = client_context(cfg, 1, client)
    algo = build_algorithm(method, ctx, cfg)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return {"method": method, "n": n, "held_mb": reachable_bytes(algo, ctx) / 1e6,
            "rss_growth_mb": rss / 1e3, "build_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[36, 1000, 10000])
    parser.add_argument("--methods", nargs="+",
                        default=["fedora", "local", "fedavg", "fedprox", "ditto", "apfl",
                                 "fedamp", "ifca"])
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    for n in args.n:
        for method in args.methods:
            out = subprocess.run([sys.executable, __file__, "--one", method, str(n)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{method} N={n}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{method:8s} N={n:6d} held {r['held_mb']:9.2f} MB  peak RSS +"
                  f"{r['rss_growth_mb']:9.2f} MB  build {r['build_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
