"""Sparse propagation operator vs its tolerance: non-zeros per row, build time, apply time,
error bound; and the exact factored operator's (the default above 256 clients) and the dense
operator's, on the real relatedness graph of N clients. ``--rows K`` also times computing K
random rows only (``apply_rows``: a round's participants under partial participation), min of
three.
Usage: python benchmarks/propagation_tolerance.py [--n 1000] [--per-client 5 1 1] [--rows 100]
"""

from __future__ import annotations

import argparse
import time

import torch

from secure_fedora.algorithms.propagation import build_operator
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import build_clients, build_context, make_method


def cpu_seconds(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--per-client", type=int, nargs=3, default=[5, 1, 1])
    parser.add_argument("--tolerances", type=float, nargs="*", default=[1e-2, 1e-3, 1e-4, 1e-6])
    parser.add_argument("--rows", type=int, default=0,
                        help="also time apply_rows for this many random clients")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, val, test = args.per_client
    cfg = parse_config({"methods": ["fedora"], "fedora": {"propagation": "sparse"},
                        "data": {"num_clients": args.n, "train_per_client": train,
                                 "val_per_client": val, "test_per_client": test}})
    method = make_method("fedora", build_context(cfg, build_clients(cfg)), cfg)
    method.setup()
    graph = method.relatedness.graph
    theta = torch.randn(args.n, method.ctx.flat.num_params, generator=torch.Generator().manual_seed(0))
    phi = torch.empty_like(theta)
    print(f"N = {args.n}, {train}/{val}/{test} rows per client, P = {theta.shape[1]}, 1 thread (CPU seconds)")
    rows = torch.randperm(args.n, generator=torch.Generator().manual_seed(1))[:args.rows].sort().values

    def subset(op) -> str:
        if not args.rows:
            return ""
        best = min(cpu_seconds(lambda: op.apply_rows(theta, rows, phi)) for _ in range(3))
        return f", {rows.numel()} rows {best:.3f} s"
    for tol in args.tolerances:
        t0 = time.process_time()
        op = build_operator(graph, cfg.fedora.alpha, "sparse", tol)
        build = time.process_time() - t0
        op.apply(theta, out=phi)  # warm-up (the cached float32 CSR matrix)
        apply = cpu_seconds(lambda op=op: op.apply(theta, out=phi))
        print(f"tolerance {tol:g}: {op.nnz / args.n:.1f} nnz/row, error bound {op.error_bound:.2g}, "
              f"build {build:.2f} s, apply {apply:.3f} s{subset(op)}")
    t0 = time.process_time()
    factored = build_operator(graph, cfg.fedora.alpha, "factored")
    build = time.process_time() - t0
    factored.apply(theta, out=phi)
    assert factored.factors is not None
    print(f"factored (exact): {factored.nnz / args.n:.1f} nnz/row in {factored.factors.passes} passes, "
          f"residual {factored.factors.residual:.2g}, build {build:.2f} s, "
          f"apply {cpu_seconds(lambda: factored.apply(theta, out=phi)):.3f} s{subset(factored)}")
    if args.n <= 2000:
        dense = build_operator(graph.to_dense(), cfg.fedora.alpha, "dense")
        dense.apply(theta, out=phi)
        print(f"dense: apply {cpu_seconds(lambda: dense.apply(theta, out=phi)):.3f} s")


if __name__ == "__main__":
    main()
