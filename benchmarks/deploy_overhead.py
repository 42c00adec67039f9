"""Time per FEDORA round: Flower deployment (TLS, node auth, 127.0.0.1) vs the in-process runtime.

Both runtimes run the same config and seed (the reference setting from configs/reference.toml
unless --config is given; --clients and --rounds shrink it, and the printout says so). The
Flower side reports, per round, the server's wall time for the exchange and its breakdown,
averaged over the clients that replied (all clocks on this one host):

  deliver  push -> the client's ClientApp process exists (SuperNode pull interval + spawn)
  startup  ClientApp process start -> handler runs (Python, torch, flwr, app imports)
  compute  the handler: load state, lambda, local training, evaluation, atomic save, journal
  return   handler end -> the server saw the reply (reply push + the server's pull interval)

"Polling" is deliver + return: time spent waiting for Flower's pull-based transport.

With ``--relatedness encrypted`` both runtimes compute relatedness under CKKS (Flower: the
key-holder client runs the ceremony and decrypts, the server holds the public context only);
the printout then splits the Flower relatedness phase into its exchanges.

Every Flower message carries a signed envelope (Ed25519 over a digest of its content); the
per-round numbers include signing and verification.

Usage: python benchmarks/deploy_overhead.py [--clients 6] [--rounds 3] [--config PATH]
       [--relatedness plain|encrypted]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from secure_fedora.config import load_config, parse_config
from secure_fedora.deploy.local import LocalFederation, RunTimeouts, with_num_clients
from secure_fedora.runtime import Simulation

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


def _flower(cfg, workdir: Path, round_timeout: float) -> dict[str, object]:  # type: ignore[no-untyped-def]
    timeouts = RunTimeouts(startup=120.0, connect=600.0, round=round_timeout, run=3600.0, poll=0.2)
    with LocalFederation(workdir / "flower", cfg.data.num_clients, timeouts=timeouts) as fed:
        t0 = time.perf_counter()
        run_id = fed.submit(cfg, workdir / "flower-results")
        status = fed.follow(run_id)
        run_s = time.perf_counter() - t0
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
        "relatedness": results["relatedness_timing"],
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
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--relatedness", choices=["plain", "encrypted"], default=None,
                        help="override fedora.relatedness (default: the config's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

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
          f"1 torch thread per process; workdir {work}")
    inproc = _in_process(cfg, work)
    print(f"in-process: {inproc['round_s']:.3f} s/round "
          f"(train {inproc['train_per_round_s']:.3f}, eval {inproc['eval_per_round_s']:.3f})")
    flower = _flower(cfg, work, args.round_timeout)
    t = flower["round_timing_s"]
    assert isinstance(t, dict)
    wall = t["wall"]
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
    print(f"share of a Flower round spent waiting in polling (deliver + return): {polling / wall:.1%}; "
          f"in ClientApp process startup: {t['startup'] / wall:.1%}; in client compute: "
          f"{t['compute'] / wall:.1%}")
    print(f"selected mean test accuracy: in-process {inproc['selected_mean']:.4f}, "
          f"flower {flower['selected_mean']:.4f}")
    if flower["events"]:
        print(f"partial-participation events: {flower['events']}")
    print(json.dumps({"config": cfg.name, "clients": cfg.data.num_clients, "rounds": cfg.training.rounds,
                      "in_process": inproc, "flower": flower}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
