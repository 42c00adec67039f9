"""Does a client's batched-matmul result depend on the other clients in the batch?

Why FEDORA's lambda losses are not computed with ``torch.bmm`` (see
``secure_fedora/learning/validation_losses.py``): for the MNIST MLP's layer shapes and a few
rows per client, computes client k's output inside batches of 1, 8 and 300 clients with
``torch.baddbmm`` (h @ W^T + b) and ``torch.bmm`` (W @ h^T, the few-rows form) and counts the
clients whose result is not bit-identical across those batches, and against ``torch.addmm``
(what ``nn.Linear`` computes). Any non-zero count means a batched computation could flip a
near-tie of the selective gate between the in-process runtime and a Flower ClientApp.
Usage: python benchmarks/bmm_batch_dependence.py [--threads 1 2]
"""

from __future__ import annotations

import argparse

import torch


def mismatches(rows: int, out_features: int, in_features: int, batch: int = 300) -> tuple[int, int, int]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(batch, out_features, in_features, generator=gen) * 0.05
    h = torch.randn(batch, rows, in_features, generator=gen)
    b = torch.randn(batch, 1, out_features, generator=gen)
    full = torch.baddbmm(b, h, w.transpose(1, 2))
    full_t = torch.bmm(w, h.transpose(1, 2))
    bad = bad_t = bad_mm = 0
    for k in (0, 1, batch // 2, batch - 1):
        for lo, hi in ((k, k + 1), (max(0, k - 3), min(batch, k + 5))):
            bad += not torch.equal(torch.baddbmm(b[lo:hi], h[lo:hi], w[lo:hi].transpose(1, 2))[k - lo], full[k])
            bad_t += not torch.equal(torch.bmm(w[lo:hi], h[lo:hi].transpose(1, 2))[k - lo], full_t[k])
        bad_mm += not torch.equal(torch.addmm(b[k, 0], h[k], w[k].t()), full[k])
    return bad, bad_t, bad_mm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, MKL {torch.backends.mkl.is_available()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in (1, 5, 10, 64):
            for out_f, in_f in ((128, 784), (128, 128), (10, 128)):
                a, t, m = mismatches(rows, out_f, in_f)
                print(f"threads {threads}, {rows:>2} rows, {out_f}x{in_f}: baddbmm differs across batches "
                      f"{a}/8, bmm(W, h^T) {t}/8, addmm vs baddbmm {m}/4")


if __name__ == "__main__":
    main()
