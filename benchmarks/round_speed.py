"""FEDORA round time vs a plain loop doing the same local SGD steps (same process, same run).

The plain loop is what a straightforward implementation does without FEDORA: for each client,
an ``nn.Module`` with its own parameters, a fresh ``torch.optim.SGD`` (momentum 0.9, weight
decay), shuffled mini-batches, ``E`` local epochs. FEDORA's round adds the two validation
losses for lambda, the proximal pull after every step and the propagation ``phi = P @ theta``.
Rounds alternate between the two so background load hits both alike.

``--batched`` adds the batched trainer (secure_fedora.learning.batched), for every thread count
given (``--threads 1 2``: each measured in the same run): FEDORA rounds with
``[training] engine = "batched"`` (the method's own batched client half: per-client lambda,
then all clients trained together, then propagation), the same with the lambda losses batched
too (``evaluate_losses``), the batched training alone (no pull, as Local), the largest row
difference from the per-client loop on the same inputs, and the hardware floor: the round's
FLOPs over the sustained GFLOP/s of a large matmul measured in the same run at that thread
count. Min and median are printed; the plain loop is the same at every thread count.
Usage: python benchmarks/round_speed.py [--rounds 10] [--threads 1 [2]] [--batched]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from secure_fedora.algorithms.fedora import regularization_weight
from secure_fedora.core.config import load_config
from secure_fedora.learning.batched import evaluate_losses, train_participants
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


def batched_fedora_round(fedora, rnd: int, participants: list[int]) -> None:
    """Fedora.train_round (no exchange, plain validation) with the batched trainer and the
    batched validation losses for lambda. Not a path of either runtime (a client's batched
    loss changes with the batch's other clients, so its lambda could differ from the one it
    computes alone in a Flower ClientApp); timed to show what the exact lambda costs."""
    ctx = fedora.ctx
    val_x = [ctx.clients[i].val_x for i in participants]
    val_y = [ctx.clients[i].val_y for i in participants]
    local = evaluate_losses(ctx.flat, fedora.theta, participants, val_x, val_y)
    received = evaluate_losses(ctx.flat, fedora.phi, participants, val_x, val_y)
    lams = [regularization_weight(a, b) for a, b in zip(local, received, strict=True)]
    for i, lam in zip(participants, lams, strict=True):
        fedora.last_lambdas[i] = lam
    train_participants(fedora.ctx, participants, fedora.theta, fedora.phi, lams)
    fedora.propagate(rnd, participants)


def round_flops(ctx, cfg, clients, with_lambda_evals: bool) -> float:
    """Multiply-adds x 2 of one round's training (forward, weight gradients, input gradients
    of every Linear but the first) plus, for FEDORA, the two validation forwards per client."""
    linears = [m for m in ctx.flat.module.modules() if isinstance(m, nn.Linear)]
    fwd = sum(2 * m.in_features * m.out_features for m in linears)
    bwd = fwd + sum(2 * m.in_features * m.out_features for m in linears[1:])
    samples = sum(c.train_x.shape[0] for c in clients) * cfg.training.local_epochs
    total = samples * (fwd + bwd)
    if with_lambda_evals:
        total += 2 * sum(c.val_x.shape[0] for c in clients) * fwd
    return float(total)


def sustained_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a (size x size) @ (size x size) float32 matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def batched_difference(fedora, participants: list[int]) -> float:
    """Largest |row difference| between the per-client loop and the batched trainer on the
    same rows, pulls and generator states (state restored afterwards)."""
    ctx = fedora.ctx
    states = [g.get_state() for g in ctx.generators]
    lams = [fedora.regularization(i) for i in participants]
    loop = fedora.theta.clone()
    for i, lam in zip(participants, lams, strict=True):
        ctx.train_client(i, loop[i], fedora.phi[i], lam)
    for g, s in zip(ctx.generators, states, strict=True):
        g.set_state(s)
    batched = fedora.theta.clone()
    train_participants(ctx, participants, batched, fedora.phi, lams)
    for g, s in zip(ctx.generators, states, strict=True):
        g.set_state(s)
    return float((loop - batched).abs().max())


def summary(name: str, times: list[float]) -> str:
    return f"{name} min {min(times):.3f} s, median {statistics.median(times):.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch thread counts to measure, each in this run (e.g. 1 2)")
    parser.add_argument("--batched", action="store_true",
                        help="also time the batched trainer and print the hardware floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads[0])
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
          f"{args.threads[0]} thread(s), {args.rounds} timed rounds (median)")
    print(f"plain loop round:  {p:.3f} s")
    print(f"FEDORA round:      {f:.3f} s   (lambda evals + training + pull + propagation)")
    print(f"ratio FEDORA / plain: {f / p:.2f}x  (target <= 1.3x)")
    if args.batched:
        print(f"batched vs per-client loop, largest row difference after one local run: "
              f"{batched_difference(fedora, everyone):.2e}")
        medians: dict[int, tuple[float, float, float]] = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            medians[threads] = run_batched(fedora, ctx, cfg, clients, models, gens, everyone,
                                           args.rounds, threads)
        print_best_against_best(medians)


def print_best_against_best(medians: dict[int, tuple[float, float, float]]) -> None:
    """Compare each path at its own fastest thread count, measured in this run.

    A per-thread ratio flatters the batched engine where more threads slow the plain loop's
    small kernels down; this line takes the plain loop at its best thread count instead, and
    states the smallest ratio the hardware floor leaves (floor / best plain loop).
    """
    plain_threads = min(medians, key=lambda t: medians[t][0])
    batched_threads = min(medians, key=lambda t: medians[t][1])
    plain, batched = medians[plain_threads][0], medians[batched_threads][1]
    floor = medians[batched_threads][2]
    print(f"--- best against best: plain loop {plain:.3f} s ({plain_threads} thread(s)), FEDORA "
          f"batched {batched:.3f} s ({batched_threads} thread(s)): {batched / plain:.2f}x "
          f"(target <= 0.5x); the floor alone would be {floor / plain:.2f}x, so 0.5x asks for "
          f"the batched round within {0.5 * plain / floor:.2f}x of its floor")


def engine_round(fedora, rnd: int, everyone: list[int], engine: str) -> None:
    """``Fedora.train_round`` with ``[training] engine`` = ``engine`` (the wired path)."""
    fedora.ctx.engine = engine
    try:
        fedora.train_round(rnd, everyone)
    finally:
        fedora.ctx.engine = "loop"


def run_batched(fedora, ctx, cfg, clients, models, gens, everyone, rounds: int,
                threads: int) -> tuple[float, float, float]:
    """Alternate plain loop / FEDORA (loop) / FEDORA (engine batched) / FEDORA (engine batched,
    batched lambda losses) / batched training alone, at ``threads`` torch threads.

    Returns the medians of the plain loop round and the batched FEDORA round, and the FEDORA
    round's hardware floor, in seconds.
    """
    theta_local = fedora.theta.clone()
    engine_round(fedora, 0, everyone, "batched")  # warm-up
    batched_fedora_round(fedora, 0, everyone)
    train_participants(ctx, everyone, theta_local)
    plain_round(models, clients, cfg, gens)
    names = ("plain", "fedora", "fedora_batched", "fedora_batched_lambda", "batched")
    times: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(1, rounds + 1):
        for name, fn in (("plain", lambda: plain_round(models, clients, cfg, gens)),
                         ("fedora", lambda rnd=rnd: engine_round(fedora, rnd, everyone, "loop")),
                         ("fedora_batched", lambda rnd=rnd: engine_round(fedora, rnd, everyone, "batched")),
                         ("fedora_batched_lambda", lambda rnd=rnd: batched_fedora_round(fedora, rnd, everyone)),
                         ("batched", lambda: train_participants(ctx, everyone, theta_local))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    gflops = sustained_gflops()
    train_flops = round_flops(ctx, cfg, clients, with_lambda_evals=False)
    fedora_flops = round_flops(ctx, cfg, clients, with_lambda_evals=True)
    p_min, p_med = min(times["plain"]), statistics.median(times["plain"])
    print(f"--- {threads} thread(s): batched trainer, {rounds} rounds alternating (min / median)")
    print(summary("plain loop round:                           ", times["plain"]))
    print(summary("FEDORA round, engine loop:                  ", times["fedora"]))
    print(summary("FEDORA round, engine batched:               ", times["fedora_batched"]))
    print(summary("FEDORA round, engine batched + batched lambda:", times["fedora_batched_lambda"])
          + "  (not a runtime path: bmm lambdas depend on the batch; the price of exact lambda)")
    print(summary("batched training alone (no pull):          ", times["batched"]))
    for name in names[1:]:
        t = times[name]
        print(f"ratio {name} / plain: min {min(t) / p_min:.2f}x, median "
              f"{statistics.median(t) / p_med:.2f}x" + ("  (target <= 0.5x)" if name == "fedora_batched" else ""))
    floor_train, floor_fedora = train_flops / gflops / 1e9, fedora_flops / gflops / 1e9
    print(f"hardware floor ({threads} thread(s)): large matmul sustains {gflops:.1f} GFLOP/s; training"
          f" {train_flops / 1e9:.2f} GFLOP -> {floor_train:.3f} s, FEDORA round {fedora_flops / 1e9:.2f}"
          f" GFLOP -> {floor_fedora:.3f} s")
    for name, floor in (("fedora_batched", floor_fedora), ("fedora_batched_lambda", floor_fedora),
                        ("batched", floor_train), ("plain", floor_train)):
        t = times[name]
        print(f"{name} / floor: min {min(t) / floor:.2f}x, median {statistics.median(t) / floor:.2f}x"
              + ("  (aim <= 2x)" if name == "fedora_batched" else ""))
    return p_med, statistics.median(times["fedora_batched"]), floor_fedora


if __name__ == "__main__":
    main()
