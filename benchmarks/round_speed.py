"""FEDORA round time vs a plain loop doing the same local SGD steps (same process, same run).

The plain loop is what a straightforward implementation does without FEDORA: for each client,
an ``nn.Module`` with its own parameters, a fresh ``torch.optim.SGD`` (momentum 0.9, weight
decay), shuffled mini-batches, ``E`` local epochs. FEDORA's round adds the two validation
losses for lambda, the proximal pull after every step and the propagation ``phi = P @ theta``.
Rounds alternate between the two so background load hits both alike.
Usage: python benchmarks/round_speed.py [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from secure_fedora.core.config import load_config
from secure_fedora.learning.models import make_model
from secure_fedora.runtimes.inprocess import build_clients, build_context, make_method

ROOT = Path(__file__).resolve().parents[1]


def plain_round(models, clients, cfg, gens) -> None:
    t = cfg.training
    for model, c, gen in zip(models, clients, gens, strict=True):
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        for _ in range(t.local_epochs):
            for idx in torch.randperm(c.train_x.shape[0], generator=gen).split(t.batch_size):
                opt.zero_grad()
                nn.functional.cross_entropy(model(c.train_x[idx]), c.train_y[idx]).backward()
                opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "reference.toml")
    clients = build_clients(cfg)
    ctx = build_context(cfg, clients)
    fedora = make_method("fedora", ctx, cfg)
    fedora.setup()
    models = [make_model(cfg.model.name, 10, seed=cfg.seed) for _ in clients]
    gens = [torch.Generator().manual_seed(i) for i in range(len(clients))]
    everyone = list(range(len(clients)))
    # warm-up (allocations, lazy init), then rounds alternate between the two
    fedora.train_round(0, everyone)
    plain_round(models, clients, cfg, gens)
    t_fedora, t_plain = [], []
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        fedora.train_round(rnd, everyone)
        t_fedora.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain_round(models, clients, cfg, gens)
        t_plain.append(time.perf_counter() - t0)
    steps = len(clients) * cfg.training.local_epochs * -(-cfg.data.train_per_client // cfg.training.batch_size)
    f, p = statistics.median(t_fedora), statistics.median(t_plain)
    print(f"setup: reference setting, {len(clients)} clients, {steps} local SGD steps per round, "
          f"MLP {ctx.flat.num_params} params, batch {cfg.training.batch_size}, "
          f"{args.threads} thread(s), {args.rounds} timed rounds (median)")
    print(f"plain loop round:  {p:.3f} s")
    print(f"FEDORA round:      {f:.3f} s   (lambda evals + training + pull + propagation)")
    print(f"ratio FEDORA / plain: {f / p:.2f}x  (target <= 1.3x)")


if __name__ == "__main__":
    main()
