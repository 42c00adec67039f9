"""What exactly-once releases cost: release-journal time and bytes per round in the DP setting.

Runs FEDORA with configs/dp_rotated_mnist.toml (noised summary, DP-SGD, private lambda) for a
few rounds in process and times the journal's work (reading the generator state before the
draws, sealing and fsyncing one record per release) next to the ledger's (the gate: accounting,
signing and fsyncing the entries) and the whole round. Bytes: the journal files' size.
With reproducible noise (the default here) a record keeps only the digest of the generator
state (the checkpoint and seed re-create it); ``--fresh-noise`` (``[privacy] noise =
"csprng"``) measures records that keep the sealed keystream state (key and position) itself.
Usage: python benchmarks/journal_overhead.py [--rounds 3] [--clients 40] [--fresh-noise]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from pathlib import Path

import torch

from privacy.durable import SyncBatch
from privacy.pipeline import BudgetGate, JournalRelease
from secure_fedora.core.config import load_config
from secure_fedora.runtimes.inprocess import Simulation, build_clients
from secure_fedora.secure.private import FederationPrivacy

ROOT = Path(__file__).resolve().parents[1]


def _timed(totals: dict[str, float], key: str, fn):  # type: ignore[no-untyped-def]
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--fresh-noise", action="store_true",
                        help="CSPRNG noise: records keep the sealed keystream state")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_config(ROOT / "configs" / "dp_rotated_mnist.toml")
    cfg = base.model_copy(update={
        "methods": ["fedora"],
        "data": base.data.model_copy(update={"num_clients": args.clients}),
        "training": base.training.model_copy(update={"rounds": args.rounds}),
        "privacy": base.privacy.model_copy(
            update={"noise": "csprng" if args.fresh_noise else "reproducible"}),
    })
    totals = {"journal": 0.0, "prepare": 0.0, "gate": 0.0}
    # The release pipeline's stages: the journal record (written, its fsync issued), the
    # wait for a round's journal fsyncs, the noise state read before the draws, the gate.
    JournalRelease.process = _timed(totals, "journal", JournalRelease.process)
    SyncBatch.wait = _timed(totals, "journal", SyncBatch.wait)
    FederationPrivacy._prepare = _timed(totals, "prepare", FederationPrivacy._prepare)
    BudgetGate.process = _timed(totals, "gate", BudgetGate.process)
    clients = build_clients(cfg)
    work = Path(tempfile.mkdtemp(prefix="journal-overhead-"))
    try:
        t0 = time.perf_counter()
        Simulation(cfg, work, clients=clients).run()
        wall = time.perf_counter() - t0
        journal_files = sorted((work / "ledgers" / "fedora").glob("*.journal"))
        ledger_files = sorted((work / "ledgers" / "fedora").glob("*.jsonl"))
        journal_bytes = sum(p.stat().st_size for p in journal_files)
        ledger_bytes = sum(p.stat().st_size for p in ledger_files)
        records = sum(len(p.read_bytes().splitlines()) for p in journal_files)
    finally:
        shutil.rmtree(work)
    releases = args.clients * (args.rounds + 1)  # one summary + one model release per round
    entries = records - releases  # close (and any refusal) entries are journaled whole too
    journal_s = totals["journal"] + totals["prepare"]
    gate_s = totals["gate"]
    print(f"FEDORA, {args.clients} clients, {args.rounds} rounds + summary, {records} journal"
          f" records ({releases} releases, {entries} close or refusal entries),"
          f" noise={cfg.privacy.noise!r}")
    print(f"run wall time            {wall:8.2f} s ({wall / args.rounds * 1e3:.0f} ms/round"
          " incl. setup and evaluation)")
    print(f"journal (state + seal + fsync)  {journal_s * 1e3:8.1f} ms total,"
          f" {journal_s / (args.rounds + 1) * 1e3:6.1f} ms/round,"
          f" {journal_s / records * 1e3:5.2f} ms/record ({journal_s / wall:.1%} of the run)")
    print(f"ledger gate (account + sign + fsync) {gate_s * 1e3:8.1f} ms total,"
          f" {gate_s / (args.rounds + 1) * 1e3:6.1f} ms/round")
    print(f"journal bytes            {journal_bytes} total, {journal_bytes / (args.rounds + 1):.0f}"
          f" per round, {journal_bytes / records:.0f} per record"
          f" (ledger: {ledger_bytes / (args.rounds + 1):.0f} per round)")


if __name__ == "__main__":
    main()
