"""Time per FEDORA round: Flower deployment (TLS, node auth, 127.0.0.1) vs the in-process runtime.

Both runtimes run the same config and seed (the reference setting from configs/reference.toml
unless --config is given; --clients and --rounds shrink it, and the printout says so). The
Flower side reports, per round, the server's wall time for the exchange and its breakdown,
averaged over the clients that replied (all clocks on this one host):

  deliver  push -> the client's ClientApp process exists (SuperNode pull interval + spawn)
  startup  ClientApp process start -> handler runs (Python, torch, flwr, app imports)
  compute  the handler: load state, lambda, local training, evaluation, atomic save, journal
  return   handler end -> the server saw the reply (reply push + the server's pull interval)

"Polling" is deliver + return: time spent waiting for Flower's pull-based transport; shares
are of one message's latency (deliver + startup + compute + return). CPU seconds during the
run are split into the per-message ClientApp processes, the SuperNode and SuperExec processes
themselves (their pulls and heartbeats), and the SuperLink with the ServerApp.

With ``--relatedness encrypted`` both runtimes compute relatedness under CKKS (Flower: the
key-holder client runs the ceremony and decrypts, the server holds the public context only);
the printout then splits the Flower relatedness phase into its exchanges.

Every Flower message carries a signed envelope (Ed25519 over a digest of its content); the
per-round numbers include signing and verification.

The ServerApp keeps at most --max-in-flight messages outstanding (default: twice the CPU
cores, as `secure-fedora deploy local`): every message starts a ClientApp process, and on one
host all of them share the cores and the memory.

Usage: python benchmarks/deploy_overhead.py [--clients 6] [--rounds 3] [--config PATH]
       [--relatedness plain|encrypted] [--max-in-flight N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from secure_fedora.core.config import load_config, parse_config
from secure_fedora.runtimes.flower.local import (
    LocalFederation,
    RunTimeouts,
    default_max_in_flight,
    with_num_clients,
)
from secure_fedora.runtimes.flower.processes import descendants
from secure_fedora.runtimes.inprocess import Simulation

ROOT = Path(__file__).resolve().parents[1]


def _in_process(cfg, workdir: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    sim = Simulation(cfg, workdir / "inproc")
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = sim.run_method("fedora")
    total = time.perf_counter() - t0
    rounds = cfg.training.rounds
    per_round = (outcome.seconds_training + outcome.seconds_evaluation) / rounds
    return {
        "data_build_s": build,
        "setup_and_rounds_s": total,
        "round_s": per_round,
        "train_per_round_s": outcome.seconds_training / rounds,
        "eval_per_round_s": outcome.seconds_evaluation / rounds,
        "selected_mean": outcome.selected["mean"],
    }


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds of the process tree at ``root``: (its live processes' own time, the time
    of their exited, reaped children). Linux /proc only; vanished processes count 0."""
    own = reaped = 0.0
    for pid in [root, *descendants(root)]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(f) / _CLOCK_TICKS for f in fields[11:15])
        own += utime + stime
        reaped += cutime + cstime
    return own, reaped


def _cpu_snapshot(fed: LocalFederation) -> dict[str, float]:
    """CPU seconds so far: SuperLink (with the ServerApp it runs), SuperNode + SuperExec
    processes themselves, and the per-message ClientApp processes they started and reaped."""
    link = next(p for p in fed.processes if p.name == "superlink")
    link_own, link_reaped = _tree_cpu(link.pid)
    node_own = clientapps = 0.0
    for node in fed.nodes:
        if node.process is not None and node.process.running():
            own, reaped = _tree_cpu(node.process.pid)
            node_own += own
            clientapps += reaped
    return {
        "superlink_serverapp": link_own + link_reaped,
        "supernodes": node_own,
        "clientapps": clientapps,
    }


def _flower(cfg, workdir: Path, round_timeout: float, max_in_flight: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    timeouts = RunTimeouts(startup=120.0, connect=600.0, round=round_timeout, run=3600.0, poll=0.2)
    with LocalFederation(workdir / "flower", cfg.data.num_clients, timeouts=timeouts) as fed:
        cpu0 = _cpu_snapshot(fed)
        t0 = time.perf_counter()
        run_id = fed.submit(cfg, workdir / "flower-results", max_in_flight=max_in_flight)
        status = fed.follow(run_id)
        run_s = time.perf_counter() - t0
        cpu1 = _cpu_snapshot(fed)
        phases = dict(fed.phases)
    if status != "finished:completed":
        raise SystemExit(f"Flower run ended with {status}; see {workdir / 'flower' / 'logs'}")
    results = json.loads((workdir / "flower-results" / "results.json").read_text())
    rows = results["rounds"]
    timing = {k: statistics.mean(r["timing"][k] for r in rows)
              for k in ("wall", "deliver", "startup", "compute", "return")}
    return {
        "startup_phases_s": phases,
        "run_s": run_s,
        "run_cpu_s": {k: round(cpu1[k] - cpu0[k], 1) for k in cpu0},
        # plain/noised: FEDORA's setup exchange; encrypted: the CKKS ceremony's steps
        "relatedness": results["relatedness_timing"] or results["timings"]["fedora"].get("setup"),
        "relatedness_details": results.get("relatedness_details", {}),
        "round_s": statistics.mean(r["seconds"] for r in rows),
        "round_timing_s": timing,
        "events": results["events"],
        "selected_mean": results["methods"]["fedora"]["selected"]["mean"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "reference.toml"))
    parser.add_argument("--clients", type=int, default=6,
                        help="clients = SuperNodes (reference: 36; each SuperNode plus its "
                             "per-message ClientApp process needs ~0.5 GB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-timeout", type=float, default=900.0)
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="messages the ServerApp keeps outstanding (0: all at once; default: "
                             "twice the CPU cores, as `deploy local`)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--relatedness", choices=["plain", "encrypted"], default=None,
                        help="override fedora.relatedness (default: the config's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    window = default_max_in_flight() if args.max_in_flight is None else args.max_in_flight

    base = load_config(args.config)
    cfg = with_num_clients(base, args.clients)
    data = cfg.model_dump(mode="json")
    data["training"]["rounds"] = args.rounds
    data["methods"] = ["fedora"]
    if args.relatedness is not None:
        data["fedora"]["relatedness"] = args.relatedness
    cfg = parse_config(data, f"{args.config} (benchmark overrides)")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="deploy-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"setting: {args.config} with data.num_clients {base.data.num_clients} -> "
          f"{cfg.data.num_clients}, training.rounds {base.training.rounds} -> {cfg.training.rounds}, "
          f"methods -> ['fedora'], relatedness {cfg.fedora.relatedness}")
    print(f"  model {cfg.model.name}, {cfg.data.train_per_client} train / {cfg.data.val_per_client} val "
          f"per client, E={cfg.training.local_epochs}, batch {cfg.training.batch_size}; "
          f"1 torch thread per process; {os.cpu_count()} cores; ServerApp keeps "
          f"{window or 'all'} messages in flight; workdir {work}")
    inproc = _in_process(cfg, work)
    print(f"in-process: {inproc['round_s']:.3f} s/round "
          f"(train {inproc['train_per_round_s']:.3f}, eval {inproc['eval_per_round_s']:.3f})")
    flower = _flower(cfg, work, args.round_timeout, window)
    t = flower["round_timing_s"]
    assert isinstance(t, dict)
    # One message's latency, push -> reply seen; with a window, messages of a round overlap
    # only partly, so shares are of this latency rather than of the round's wall time.
    latency = t["deliver"] + t["startup"] + t["compute"] + t["return"]
    polling = t["deliver"] + t["return"]
    print(f"flower:     {flower['round_s']:.3f} s/round; per client (mean): deliver {t['deliver']:.2f} s, "
          f"process startup {t['startup']:.2f} s, compute {t['compute']:.2f} s, return {t['return']:.2f} s")
    rel = flower["relatedness"]
    assert isinstance(rel, dict)
    if "wall" in rel:  # plain / noised: one summary exchange
        rel_text = f"relatedness exchange {rel['wall']:.2f} s"
    else:  # encrypted: ceremony, encrypted summaries, server rows, key-holder decryption
        rel_text = (
            f"relatedness: ceremony {rel['ceremony']['wall']:.2f} s, encrypted summaries "
            f"{rel['encrypted_summary']['wall']:.2f} s, server rows {rel['server_compute_s']:.2f} s, "
            f"decrypt {rel['decrypt']['wall']:.2f} s"
        )
    print(f"  deployment start: {json.dumps({k: round(v, 2) for k, v in flower['startup_phases_s'].items()})}; "
          + rel_text)
    print(f"ratio flower / in-process per round: {flower['round_s'] / inproc['round_s']:.1f}x")
    print(f"share of a message's latency ({latency:.2f} s, push to reply) spent waiting in polling "
          f"(deliver + return): {polling / latency:.1%}; in ClientApp process startup: "
          f"{t['startup'] / latency:.1%}; in client compute: {t['compute'] / latency:.1%}")
    cpu = flower["run_cpu_s"]
    assert isinstance(cpu, dict)
    print(f"CPU seconds during the run ({os.cpu_count()} cores x {flower['run_s']:.0f} s wall): "
          f"ClientApp processes {cpu['clientapps']:.0f}, SuperNodes + SuperExecs "
          f"{cpu['supernodes']:.0f}, SuperLink + ServerApp {cpu['superlink_serverapp']:.0f}")
    print(f"selected mean test accuracy: in-process {inproc['selected_mean']:.4f}, "
          f"flower {flower['selected_mean']:.4f}")
    if flower["events"]:
        print(f"partial-participation events: {flower['events']}")
    print(json.dumps({"config": cfg.name, "clients": cfg.data.num_clients, "rounds": cfg.training.rounds,
                      "max_in_flight": window, "in_process": inproc, "flower": flower}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
