"""Per-round evaluation time: batched (``evaluate_many`` / ``validation_losses_many``) vs the
per-client ``evaluate`` loop, at N = 36, 1,000 and 10,000 clients (MNIST-sized MLP, 118,282
parameters).

One round's evaluation work, as the in-process runtime and FEDORA do it today:
- ``eval``: every client's validation and test metric (``Simulation._evaluate``);
- ``lambda``: every participant's two validation losses, of ``theta_i`` and ``phi_i``
  (FEDORA's exact regularization weight; full participation).

Rows per client (val / test): N = 36: 64 / 277 (MNIST's 10,000 test rows divided evenly;
the 128 training rows are not evaluated), N = 1,000: 10 / 10, N = 10,000: 1 / 1, as in
``benchmarks/scale.py``. Inputs are random 1x28x28 images (the cost does not depend on the
values). The packed splits are built once (as a run would, its splits being fixed); the
packing time is printed separately. Every timing is repeated ``--repeats`` times; min and
median are printed (the machine is shared).

Memory: for N = 10,000 the (10,000 x 118,282) float32 matrices would be 4.7 GB each; the
benchmark holds theta and phi rows for ``--chunk-clients`` clients only (default 1,000) and
evaluates the 10,000 clients chunk by chunk with those rows (each chunk its own clients'
data), so every client is evaluated and timed, but the row values repeat across chunks (the
cost does not depend on them). Nothing is extrapolated.
Usage: python benchmarks/batched_eval.py [--n 36 1000 10000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from secure_fedora.learning.batched_eval import (  # noqa: E402
    evaluate_many,
    evaluate_many_sets,
    pack_split_sets,
    pack_splits,
    plan_evaluation,
    validation_losses_many,
)
from secure_fedora.learning.client import FlatModel, evaluate  # noqa: E402
from secure_fedora.learning.models import make_model  # noqa: E402

ROWS = {36: (64, 277), 1000: (10, 10), 10000: (1, 1)}  # val, test rows per client


def _splits(count: int, rows: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.rand(count * rows, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (count * rows,), generator=gen)
    return list(zip(x.split(rows), y.split(rows), strict=True))


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(n: int, repeats: int, chunk_clients: int) -> dict:
    """Times (lists of seconds per repeat) for one N; see the module docstring."""
    flat = FlatModel(make_model("mlp", seed=0))
    gen = torch.Generator().manual_seed(n)
    val_rows, test_rows = ROWS[n]
    block = min(n, chunk_clients)
    theta = flat.initial_vector() + 0.05 * torch.randn(block, flat.num_params, generator=gen)
    phi = theta + 0.01 * torch.randn(block, flat.num_params, generator=gen)
    blocks = []  # per block of clients: raw and packed val/test splits
    pack_seconds = 0.0
    for _ in range(0, n, block):
        val, test = _splits(block, val_rows, gen), _splits(block, test_rows, gen)
        start = time.perf_counter()
        packed = (pack_splits(flat, val), pack_splits(flat, test), pack_split_sets(flat, [val, test]))
        pack_seconds += time.perf_counter() - start
        blocks.append((val, test, *packed))
    plan = plan_evaluation(flat, blocks[0][0][0][0])

    def loop_eval() -> None:
        for val, test, *_ in blocks:
            for k in range(block):
                evaluate(flat, theta[k], *val[k])
                evaluate(flat, theta[k], *test[k])

    def loop_lambda() -> None:
        fedora_losses: list[float] = []
        for val, *_ in blocks:
            for k in range(block):
                fedora_losses.append(evaluate(flat, theta[k], *val[k]).loss)
                fedora_losses.append(evaluate(flat, phi[k], *val[k]).loss)

    def batched_eval() -> None:
        for _, _, packed_val, packed_test, _ in blocks:
            evaluate_many(flat, theta, packed_val)
            evaluate_many(flat, theta, packed_test)

    def fused_eval() -> None:
        for *_, packed_both in blocks:
            evaluate_many_sets(flat, theta, packed_both)

    def batched_lambda() -> None:
        for _, _, packed_val, _, _ in blocks:
            validation_losses_many(flat, theta, phi, packed_val)

    # equality check on the first block before timing
    got = evaluate_many(flat, theta, blocks[0][2])
    ref = [evaluate(flat, theta[k], *blocks[0][0][k]) for k in range(block)]
    worst = max(abs(a.loss - b.loss) / abs(b.loss) for a, b in zip(got, ref, strict=True))
    same_acc = all(a.accuracy == b.accuracy for a, b in zip(got, ref, strict=True))
    return {
        "n": n, "val_rows": val_rows, "test_rows": test_rows, "plan": plan.strategy,
        "rows_held": block, "pack_seconds": pack_seconds,
        "max_loss_rel_diff": worst, "accuracy_equal": same_acc,
        "loop_eval": _timed(loop_eval, repeats), "batched_eval": _timed(batched_eval, repeats),
        "batched_eval_fused": _timed(fused_eval, repeats),
        "loop_lambda": _timed(loop_lambda, repeats), "batched_lambda": _timed(batched_lambda, repeats),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[36, 1000, 10000], choices=sorted(ROWS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-clients", type=int, default=1000,
                        help="clients whose theta/phi rows are held at once (memory bound)")
    parser.add_argument("--json", type=Path, help="also write the raw timings here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print(f"threads={args.threads} repeats={args.repeats} torch={torch.__version__}")
    print(f"{'N':>6} {'phase':<7} {'loop min':>9} {'loop med':>9} {'batch min':>9} {'batch med':>9} "
          f"{'speedup(med)':>12}")
    for n in args.n:
        r = measure(n, args.repeats, args.chunk_clients)
        results.append(r)
        for phase, key in (("eval", "eval"), ("eval1p", "eval_fused"), ("lambda", "lambda")):
            loop, batched = r[f"loop_{phase if phase != 'eval1p' else 'eval'}"], r[f"batched_{key}"]
            print(f"{n:>6} {phase:<7} {min(loop):>9.4f} {statistics.median(loop):>9.4f} "
                  f"{min(batched):>9.4f} {statistics.median(batched):>9.4f} "
                  f"{statistics.median(loop) / statistics.median(batched):>11.1f}x")
        print(f"{'':>6} plan={r['plan']} rows held={r['rows_held']} clients, packing once "
              f"{r['pack_seconds']:.3f} s, max loss rel diff {r['max_loss_rel_diff']:.1e}, "
              f"accuracy equal: {r['accuracy_equal']}, peak RSS {r['peak_rss_gb']:.2f} GB")
    print("eval: val + test metric of every client (batched: two evaluate_many calls); eval1p: the "
          "same in one pass (pack_split_sets + evaluate_many_sets); lambda: theta and phi "
          "validation losses of every client (validation_losses_many)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
