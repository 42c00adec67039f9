"""Signed envelopes: a FEDORA round with every message enveloped vs the same round without.

Two FEDORA methods on the same clients (reference setting by default), one with a
:class:`~secure_fedora.secure.transport.SecureExchange` attached exactly as the runtime does for
``[security] envelopes = true``, one without. Rounds alternate between the two so background
load hits both alike. Also printed: the envelope work alone per round (36 uploads + 36
downloads: sign, verify, hash, nonce journal) and the fsyncs it issues.
Usage: python benchmarks/envelope_cost.py [--rounds 6] [--threads 1] [--config PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from secure_fedora.core.config import load_config
from secure_fedora.runtimes.inprocess import build_clients, build_context, make_method
from secure_fedora.secure.transport import SecureExchange, SecureTransport

ROOT = Path(__file__).resolve().parents[1]


class FsyncCounter:
    """Counts ``os.fsync`` calls and the seconds spent in them while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._real = os.fsync

    def __enter__(self) -> FsyncCounter:
        def counting(fd: int) -> None:
            t0 = time.perf_counter()
            self._real(fd)
            self.calls += 1
            self.seconds += time.perf_counter() - t0

        os.fsync = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "reference.toml"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    clients = build_clients(cfg)
    n = len(clients)
    plain = make_method("fedora", build_context(cfg, clients), cfg)
    enveloped = make_method("fedora", build_context(cfg, clients), cfg)
    plain.setup()
    enveloped.setup()
    with tempfile.TemporaryDirectory(prefix="envelope-cost-") as tmp:
        uploads, downloads = enveloped.message_state()
        transport = SecureTransport.for_simulation(tmp, n, "fedora")
        enveloped.exchange = SecureExchange(transport, uploads=uploads, downloads=downloads,
                                            last_round=0)
        everyone = list(range(n))
        with_env, without, env_only, env_cpu = [], [], [], []
        with FsyncCounter() as fsyncs:
            for rnd in range(1, args.rounds + 1):
                t0 = time.perf_counter()
                plain.train_round(rnd, everyone)
                without.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                enveloped.train_round(rnd, everyone)
                with_env.append(time.perf_counter() - t0)
            calls_in_rounds = fsyncs.calls
            # the envelope work alone, on the matrices the rounds left behind
            fsyncs.calls, fsyncs.seconds = 0, 0.0
            exchange = enveloped.exchange
            for rnd in range(args.rounds + 1, 2 * args.rounds + 1):
                w0, c0 = time.perf_counter(), time.process_time()
                exchange.upload_theta(rnd, enveloped.theta, everyone)
                exchange.download_phi(rnd, enveloped.phi)
                env_only.append(time.perf_counter() - w0)
                env_cpu.append(time.process_time() - c0)
        assert torch.equal(plain.theta, enveloped.theta), "envelopes changed the models"
        stats = enveloped.exchange.transport.stats.to_dict()
    a, b = statistics.median(with_env), statistics.median(without)
    params = plain.theta.shape[1]
    print(f"setup: {cfg.name}, {n} clients, {params:,} parameters, {args.rounds} alternating rounds, "
          f"{args.threads} thread(s); Ed25519 envelopes, float32 payloads, nonce journal on disk")
    print(f"FEDORA round with envelopes {a:.3f} s vs without {b:.3f} s: ratio {a / b:.2f}x")
    print(f"envelope work alone per round ({n} uploads + {n} downloads): wall "
          f"{statistics.median(env_only) * 1e3:.0f} ms, CPU {statistics.median(env_cpu) * 1e3:.0f} ms, "
          f"fsyncs {fsyncs.calls / args.rounds:.1f} ({fsyncs.seconds / args.rounds * 1e3:.1f} ms)")
    print(f"fsyncs per enveloped FEDORA round: {calls_in_rounds / args.rounds:.1f}; "
          f"models identical with and without envelopes: yes; transport totals: "
          + ", ".join(f"{k} {v:g}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
