"""Checkpoint integrity cost: ``save_checkpoint``/``load_checkpoint`` (SHA-256 digest and run
binding) against the plain format they replaced (``torch.save`` + atomic write / ``torch.load``).

The state is the size of a FEDORA checkpoint in the reference setting: three N x P float32
tensors (theta, phi, momentum) for N clients of the MLP. Saves and loads alternate between the
two formats so background load hits both alike; medians are printed.
Usage: python benchmarks/checkpoint_cost.py [--clients 36] [--repeats 7]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from secure_fedora.learning.models import make_model
from secure_fedora.runtimes.inprocess import atomic_write_bytes, load_checkpoint, save_checkpoint


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = sum(p.numel() for p in make_model("mlp", 10, seed=0).parameters())
    gen = torch.Generator().manual_seed(0)
    state = {"round": 1, "config_hash": "a" * 64, "data_fingerprint": "b" * 64,
             "method": {k: torch.randn(args.clients, params, generator=gen)
                        for k in ("theta", "phi", "momentum")}}
    with tempfile.TemporaryDirectory() as tmp:
        new_path, old_path = Path(tmp) / "new.pt", Path(tmp) / "old.pt"

        def old_save() -> None:
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(old_path, buf.getvalue())

        times: dict[str, list[float]] = {k: [] for k in ("old save", "new save", "old load", "new load")}
        for _ in range(args.repeats):
            times["old save"].append(_seconds(old_save))
            times["new save"].append(_seconds(lambda: save_checkpoint(new_path, state)))
            times["old load"].append(_seconds(
                lambda: torch.load(old_path, map_location="cpu", weights_only=True)))
            times["new load"].append(_seconds(lambda: load_checkpoint(new_path)))
        size = new_path.stat().st_size / 1e6
    print(f"{args.clients} clients x P = {params:,}: checkpoint {size:.1f} MB")
    for name, values in times.items():
        print(f"  {name}: median {statistics.median(values) * 1e3:.0f} ms over {args.repeats}")


if __name__ == "__main__":
    main()
