"""Throughput of the DP noise sources (privacy.noise), in million values per second.

CsprngNoise (ChaCha20 keystream, 4-draw hardened Gaussians) against ReproducibleNoise
(torch.Generator): Gaussians in float32 (DP-SGD gradients) and float64 (summary, lambda), and
the uniforms behind Poisson sampling. Each figure is the best of ``--repeats`` timings of one
request of ``--size`` values (default: the MLP's 118,282 parameters, one DP-SGD step). The
last row is the ChaCha20 keystream alone for a float32 request (24 bytes per value): the
rest of a float32 request's time is the Box-Muller arithmetic. The ``csprng-torch`` rows are
the device path of CsprngNoise (ChaCha20 in torch integer ops, then the sampler in torch) run
on the CPU: informational only, it is meant for a GPU and is much slower than OpenSSL here.
The closing line is the noised relatedness summary's noise on a ``--summary-d`` square
second moment (default 794, rotated MNIST's 784 pixels and 10 labels): symmetric noise drawn
on the d(d+1)/2 independent entries (``GaussianMechanism.release_symmetric``, what a release
does) against d*d i.i.d. values then symmetrized (the same distribution), as a ratio. After it,
the whole summary release of one client (``privacy.pipeline.second_moment_stages``: clip
``--summary-rows`` rows, second moment, symmetric noise, top-``--summary-q`` eigenvectors) with
each stage's CPU time, the median of ``--repeats`` releases.
Usage: python benchmarks/noise_throughput.py [--size 118282] [--repeats 30] [--threads 1]
       [--summary-d 794] [--summary-rows 48] [--summary-q 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privacy.mechanisms import GaussianMechanism
from privacy.noise import CsprngNoise, ReproducibleNoise, _chacha20_torch
from privacy.pipeline import Release, second_moment_stages


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=118_282)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary-d", type=int, default=794)
    parser.add_argument(
        "--summary-rows",
        type=int,
        default=48,
        help="rows of the summary release (48: a client at 1,000 clients)",
    )
    parser.add_argument("--summary-q", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.size
    print(f"{n} values per request, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'source':<14} {'what':<18} {'ms/request':>10} {'M values/s':>11}")
    for name, source in (("csprng", CsprngNoise()), ("reproducible", ReproducibleNoise(0))):
        for what, fn in (
            ("normal float32", lambda s=source: s.normal(n, 1.0, torch.float32)),
            ("normal float64", lambda s=source: s.normal(n, 1.0, torch.float64)),
            ("uniform float64", lambda s=source: s.uniform(n)),
        ):
            t = best_seconds(fn, args.repeats)
            print(f"{name:<14} {what:<18} {t * 1e3:>10.3f} {n / t / 1e6:>11.1f}")
    stream = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor()
    zeros, out = bytes(24 * n), bytearray(24 * n)
    t = best_seconds(lambda: stream.update_into(zeros, out), args.repeats)
    print(f"{'csprng':<14} {'keystream 24 B/v':<18} {t * 1e3:>10.3f} {n / t / 1e6:>11.1f}")
    # The device path on the CPU (torch keystream and sampler): fewer repeats, it is slow here.
    torch_source = CsprngNoise()
    torch_source._torch_keystream = True
    repeats = max(1, min(args.repeats, 3))
    t = best_seconds(lambda: torch_source.normal(n, 1.0, torch.float32), repeats)
    print(f"{'csprng-torch':<14} {'normal float32':<18} {t * 1e3:>10.3f} {n / t / 1e6:>11.1f}")
    keystream = torch.empty(24 * n, dtype=torch.uint8)
    t = best_seconds(lambda: _chacha20_torch(os.urandom(32), 0, 0, keystream), repeats)
    print(f"{'csprng-torch':<14} {'keystream 24 B/v':<18} {t * 1e3:>10.3f} {n / t / 1e6:>11.1f}"
          f"  (torch ChaCha20 on the CPU, best of {repeats}; the path a GPU takes)")
    summary_noise(args.summary_d, args.repeats)
    summary_release(args.summary_d, args.summary_rows, args.summary_q, args.repeats)


def summary_noise(d: int, repeats: int) -> None:
    """The summary's symmetric noise (d(d+1)/2 draws) against d*d draws symmetrized."""
    source = CsprngNoise()
    mech = GaussianMechanism(1.0, 1.0)
    value = torch.zeros(d, d, dtype=torch.float64)

    def full() -> torch.Tensor:
        noised = value + source.normal((d, d), mech.std, torch.float64)
        return (noised + noised.T) / 2

    t_full = best_seconds(full, repeats)
    t_sym = best_seconds(lambda: mech.release_symmetric(value, source), repeats)
    print(f"summary noise d = {d} float64 csprng: {d * (d + 1) // 2} symmetric draws"
          f" {t_sym * 1e3:.1f} ms against {d * d} draws symmetrized {t_full * 1e3:.1f} ms:"
          f" {t_sym / t_full:.2f}x")



def summary_release(d: int, rows: int, q: int, repeats: int) -> None:
    """One client's whole summary release, stage by stage (CPU time, median of ``repeats``):
    rows of uniform inputs and one-hot labels in ``d`` columns, as a client's summary rows."""
    gen = torch.Generator().manual_seed(0)
    labels = min(10, d)
    z = torch.cat(
        [
            torch.rand(rows, d - labels, generator=gen, dtype=torch.float64),
            torch.nn.functional.one_hot(
                torch.randint(0, labels, (rows,), generator=gen), labels
            ).to(torch.float64),
        ],
        dim=1,
    )
    source = CsprngNoise()
    stages = second_moment_stages(1.0, rows, q, 1.0, source)
    names = ["clip", "second moment", "symmetric noise", "top-q eigenvectors"]
    times: list[list[float]] = [[] for _ in stages]
    for k in range(repeats + 1):  # the first release warms up
        release = Release("summary", z, 0)
        for stage, spent in zip(stages, times, strict=True):
            t0 = time.process_time()
            release = stage.process(release)
            if k:
                spent.append(time.process_time() - t0)
    medians = [statistics.median(t) * 1e3 for t in times]
    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in zip(names, medians, strict=True))
    print(
        f"summary release d = {d}, {rows} rows, q = {q}, float64 csprng, CPU ms (median of"
        f" {repeats}): {parts}; total {sum(medians):.1f} ms"
    )


if __name__ == "__main__":
    main()
