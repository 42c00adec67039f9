"""Round cost vs number of clients: FEDORA and Local at N = 36, 100, 1,000 and 10,000.

Each (N, method) runs in its own subprocess (a fresh peak RSS) through the in-process runtime
(``Simulation``), rotated MNIST, MLP (118,282 parameters), 1 local epoch, evaluation and a
checkpoint every round (K = 1, so that every checkpoint is measured). Printed per round: seconds
of training (FEDORA: without its propagation; its lambda losses, a part of training, are also
shown alone), relatedness (setup: summaries, graph, propagation operator; round 1 only),
propagation, checkpoint and evaluation; the peak RSS; and the ratio FEDORA round / Local round.

Ratios are given two ways: with a checkpoint every round (as run), and with the default
``checkpoint_every = "auto"`` schedule, modelled from the measured checkpoint cost ``c`` and
checkpoint-free round ``r``: a checkpoint is written once the time since the last one reaches
10 c (``AUTO_CHECKPOINT_FACTOR``), i.e. every ``max(1, ceil(10 c / r))`` rounds, so a round
costs ``r + c / max(1, ceil(10 c / r))``. The "auto" ratio is the higher one whenever both
methods' checkpoints cost about the same: a large common term leaves numerator and denominator
alike, so removing most of it makes FEDORA's own extra time count against a smaller Local
round. The summary also splits what FEDORA adds to a Local round (under "auto") into lambda,
propagation, the rest of training, evaluation and checkpoint, each as a share of the Local
round; "propagation + checkpoint" is the server's steady-state part (relatedness is built once
per run and printed in seconds). With ``--checkpoint-every auto`` or K > 1 a checkpoint's cost
is the median of those written, and the ratio of the rounds as run is printed too. A watchdog
kills a child whose RSS exceeds --max-rss-gb. Writes scale.json, scale.csv
and scale.png (log-log round time vs N) into --out and reports the fitted slope of round time
vs N (meaningful for runs with the same rows per client: ``--per-client``).
``--participation F`` samples that fraction of clients per round (FEDORA then computes only
their phi rows, timed as propagation; evaluation still covers every client).
``--engine`` sets ``[training] engine`` of both methods (default ``loop``, the reference path);
each run records what trained its clients (``training_engine``: the resolved engine and its
passes, as results.json's ``methods.<name>.extra.training_engine``).
Usage: python benchmarks/scale.py [--n 36 100 1000] [--rounds 4] [--threads 1] [--participation 1]
                                  [--engine loop|batched|auto]
                                  [--propagation auto|dense|factored|sparse|power]
       python benchmarks/scale.py --n 10000 --rounds 3 --merge   (needs about 15 GB free)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(ROOT))

# train / val / test rows per client (test None: the MNIST test split divided evenly)
DATA = {36: (128, 64, None), 100: (128, 64, None), 1000: (48, 10, 10), 10000: (5, 1, 1)}


def data_for(n: int) -> tuple[int, int, int | None]:
    if n in DATA:
        return DATA[n]
    per = 60000 // n
    return max(1, per * 5 // 7), max(1, per // 7), max(1, 10000 // n)


def child(n: int, method: str, rounds: int, threads: int, tolerance: float,
          per_client: tuple[int, int, int | None] | None, checkpoint_every: int | str = 1,
          participation: float = 1.0, propagation: str = "auto", engine: str = "loop") -> dict:
    """Run one method at N clients; return its per-round wall and CPU seconds (subprocess)."""
    import torch

    import secure_fedora.runtimes.inprocess as runtime
    from secure_fedora.algorithms.methods import Fedora
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, make_method

    torch.set_num_threads(threads)
    train, val, test = per_client or data_for(n)
    cfg = parse_config({
        "name": f"scale-{n}", "seed": 0, "methods": [method],
        "data": {"num_clients": n, "train_per_client": train, "val_per_client": val,
                 "test_per_client": test},
        "training": {"rounds": rounds, "local_epochs": 1, "threads": threads,
                     "checkpoint_every": checkpoint_every, "participation": participation,
                     "engine": engine},
        "fedora": {"propagation": propagation, "propagation_tolerance": tolerance},
        "evaluation": {"every": 1},
    })
    rows: list[dict] = []

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            row = rows[-1] if rows else None
            if key == "relatedness":
                rows.append(_empty_row(1))
                row = rows[-1]
            row[key] += time.perf_counter() - w
            row[key + "_cpu"] += time.process_time() - c
            return out
        return wrapper

    def factory(name, ctx, config):
        m = make_method(name, ctx, config)
        m.setup = timed(m.setup, "relatedness")
        inner_round = m.train_round

        def train_round(rnd, participants, *admit):  # the runtime passes admit under DP
            if not rows or rows[-1]["round"] != rnd:
                rows.append(_empty_row(rnd))
            return timed(inner_round, "training")(rnd, participants, *admit)

        m.train_round = train_round
        if isinstance(m, Fedora):
            # a sparse operator's rows are computed when a round sends them (configure)
            m.propagate = timed(m.propagate, "propagation")
            m._current_phi = timed(m._current_phi, "propagation")
            m.regularizations = timed(m.regularizations, "lambda")
        return m

    runtime.save_checkpoint = timed(runtime.save_checkpoint, "checkpoint")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp:
        sim = Simulation(cfg, tmp, method_factory=factory)
        data_seconds = time.perf_counter() - t0
        sim._evaluate = timed(sim._evaluate, "evaluation")
        sim.run()
        ckpt_bytes = (Path(tmp) / "checkpoints" / f"{method}.pt").stat().st_size
    for row in rows:  # training excludes FEDORA's propagation (timed inside train_round)
        row["training"] -= row["propagation"]
        row["training_cpu"] -= row["propagation_cpu"]
    fed = sim.methods[method]
    extra = {"training_engine": fed.training_engine_results() or {"setting": "loop"}}
    if isinstance(fed, Fedora):
        op = fed.relatedness.operator
        extra.update(operator=op.kind, operator_nnz_per_row=op.nnz / n, error_bound=op.error_bound)
    return {"n": n, "method": method, "train_per_client": train, "val_per_client": val,
            "test_per_client": test, "threads": threads, "participation": participation,
            "checkpoint_every": checkpoint_every, "engine": engine,
            "data_seconds": data_seconds,
            "checkpoint_bytes": ckpt_bytes, "rounds": rows,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **extra}


PHASES = ("training", "relatedness", "propagation", "checkpoint", "evaluation")
# Timed inside a phase (FEDORA's lambda losses are part of its training), not added to the round.
PARTS = ("lambda",)


def _empty_row(rnd: int) -> dict:
    keys = PHASES + PARTS
    return {"round": rnd, **{k: 0.0 for k in keys}, **{k + "_cpu": 0.0 for k in keys}}


def rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_child(n: int, method: str, args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--child", str(n), method, str(out), "--rounds", str(args.rounds),
           "--threads", str(args.threads), "--tolerance", str(args.tolerance)]
    if args.per_client:
        cmd += ["--per-client", *map(str, args.per_client)]
    cmd += ["--checkpoint-every", str(args.checkpoint_every), "--participation", str(args.participation),
            "--propagation", args.propagation, "--engine", args.engine]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, rss_gb(proc.pid))
        if peak > args.max_rss_gb:
            proc.kill()
            proc.wait()
            return {"n": n, "method": method, "killed": f"RSS {peak:.1f} GB > {args.max_rss_gb} GB"}
        time.sleep(0.2)
    if proc.returncode != 0:
        return {"n": n, "method": method, "failed": proc.returncode}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def total(row: dict, suffix: str = "") -> float:
    return sum(row[k + suffix] for k in PHASES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[36, 100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="[fedora] propagation_tolerance (used by propagation = 'sparse' only)")
    parser.add_argument("--propagation", default="auto",
                        choices=["auto", "dense", "factored", "sparse", "power"],
                        help="[fedora] propagation (auto: dense up to 256 clients, factored above)")
    parser.add_argument("--engine", default="loop", choices=["loop", "batched", "auto"],
                        help="[training] engine of both methods (default: loop, the reference path)")
    parser.add_argument("--per-client", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        help="the same rows per client at every N (default: DATA per N)")
    parser.add_argument("--max-rss-gb", type=float, default=17.0)
    parser.add_argument("--methods", nargs="+", default=["local", "fedora"], choices=["local", "fedora"],
                        help="methods to run (ratios need both; with --merge the other one is kept)")
    parser.add_argument("--checkpoint-every", default="1",
                        help="[training] checkpoint_every of the runs: K (default 1: every checkpoint "
                             "measured) or 'auto' (the real schedule; see the share it reports)")
    parser.add_argument("--participation", type=float, default=1.0,
                        help="[training] participation: the fraction of clients in a round (FEDORA "
                             "computes only their phi rows; evaluation still covers every client)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale")
    parser.add_argument("--merge", action="store_true", help="add to the N already in --out/scale.json")
    parser.add_argument("--add-runs", type=Path, metavar="SCALE_JSON",
                        help="take the runs for --n from another scale.json instead of running them")
    parser.add_argument("--replot", action="store_true", help="only redraw scale.png from scale.json")
    parser.add_argument("--child", nargs=3, metavar=("N", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, method, out = args.child
        every = args.checkpoint_every if args.checkpoint_every == "auto" else int(args.checkpoint_every)
        Path(out).write_text(json.dumps(child(int(n), method, args.rounds, args.threads, args.tolerance,
                                             tuple(args.per_client) if args.per_client else None, every,
                                             args.participation, args.propagation, args.engine)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        plot(args.out / "scale.png", json.loads((args.out / "scale.json").read_text())["summary"])
        return
    results = []
    if args.merge and (args.out / "scale.json").exists():
        results = [r for r in json.loads((args.out / "scale.json").read_text())["runs"]
                   if r["n"] not in args.n or r["method"] not in args.methods]
    if args.add_runs:
        results += [r for r in json.loads(args.add_runs.read_text())["runs"] if r["n"] in args.n]
    for n in ([] if args.add_runs else args.n):
        for method in [m for m in ("local", "fedora") if m in args.methods]:
            r = run_child(n, method, args)
            results.append(r)
            if "rounds" not in r:
                print(f"N={n} {method}: {r}", flush=True)
                continue
            for row in r["rounds"]:
                print(f"N={n:>6} {method:>6} round {row['round']}: train {row['training']:.3f} s, "
                      f"relatedness {row['relatedness']:.3f} s, propagation {row['propagation']:.3f} s, "
                      f"checkpoint {row['checkpoint']:.3f} s, eval {row['evaluation']:.3f} s, "
                      f"total {total(row):.3f} s (CPU {total(row, '_cpu'):.3f} s)"
                      + (f"; lambda {row['lambda']:.3f} s of training" if method == "fedora" else ""),
                      flush=True)
            print(f"N={n:>6} {method:>6} peak RSS {r['peak_rss_gb']:.2f} GB, checkpoint "
                  f"{r['checkpoint_bytes'] / 2**20:.0f} MiB"
                  + (f", operator {r['operator']} ({r['operator_nnz_per_row']:.1f} nnz/row, "
                     f"error bound {r['error_bound']:.2g})" if "operator" in r else ""), flush=True)
        pair = {r["method"]: r for r in results if r["n"] == n and "rounds" in r}
        if len(pair) == 2:
            for fed, loc in zip(pair["fedora"]["rounds"], pair["local"]["rounds"], strict=False):
                print(f"N={n:>6} round {fed['round']}: FEDORA/Local {total(fed) / total(loc):.2f}x wall "
                      f"({total(fed, '_cpu') / total(loc, '_cpu'):.2f}x CPU), "
                      f"checkpoint_every = {args.checkpoint_every}", flush=True)
    for r in results:
        if "rounds" in r and r["rounds"]:
            spent = sum(total(row) for row in r["rounds"])
            ckpt = sum(row["checkpoint"] for row in r["rounds"])
            written = sum(1 for row in r["rounds"] if row["checkpoint"] > 0)
            print(f"N={r['n']:>6} {r['method']:>6}: checkpoints {ckpt:.2f} s of {spent:.2f} s "
                  f"({ckpt / spent:.0%}), {written} written in {len(r['rounds'])} rounds "
                  f"(checkpoint_every = {args.checkpoint_every}; the last round's is always written)")
    summary = summarize(results)
    for e in summary:
        print(f"N={e['n']:>6}: FEDORA/Local round {e['ratio']:.2f}x wall ({e['ratio_cpu']:.2f}x CPU) with "
              f"a checkpoint every round; {e['ratio_auto']:.2f}x wall ({e['ratio_auto_cpu']:.2f}x CPU) with "
              f"checkpoint_every = 'auto'; round 1 (with relatedness {e['relatedness']:.2f} s) "
              f"{e['ratio_first']:.2f}x; one checkpoint = {e['fedora_checkpoint'] / e['fedora_round']:.0%} "
              f"of a FEDORA round, {auto_share(e, 'fedora'):.0%} (FEDORA) / {auto_share(e, 'local'):.0%} "
              f"(Local) of a round under 'auto'; FEDORA lambda {e['fedora_lambda']:.3f} s")
        if e.get("ratio_measured") is not None:
            print(f"N={e['n']:>6}: rounds 2-{e['rounds']} as run (checkpoint_every = "
                  f"{e['checkpoint_every']}): FEDORA/Local {e['ratio_measured']:.2f}x wall")
        parts = ", ".join(f"{name} {share:+.0%}" for name, share in e["extra_shares"].items())
        print(f"N={e['n']:>6}: what FEDORA adds, as shares of a Local round under 'auto': {parts}; "
              f"propagation + checkpoint (relatedness is once per run: {e['relatedness']:.2f} s) "
              f"{e['server_share']:.0%}")
    slopes = {}
    for method in ("local", "fedora"):
        pts = [(e["n"], e[f"{method}_round_auto_cpu"]) for e in summary if e["n"] >= 100]
        if len(pts) >= 2:
            xs = [math.log(p[0]) for p in pts]
            ys = [math.log(p[1]) for p in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slopes[method] = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
            print(f"slope of log(CPU seconds per round) vs log(N), N >= 100, {method}: {slopes[method]:.2f}")
    doc = {"runs": results, "summary": summary, "slopes": slopes,
           "setting": "rotated MNIST, MLP 118,282 params, 1 local epoch, eval + checkpoint every round, "
                      f"{args.threads} thread(s), propagation {args.propagation} (tolerance "
                      f"{args.tolerance} if sparse), "
                      f"participation {args.participation}, engine {args.engine}"}
    (args.out / "scale.json").write_text(json.dumps(doc, indent=2))
    write_csv(args.out / "scale.csv", results)
    plot(args.out / "scale.png", summary)


def steady(rows: list[dict], key: str | None = None, suffix: str = "") -> float:
    """Median over the rounds after the first (the first also builds the relatedness)."""
    import statistics

    later = rows[1:] or rows
    return statistics.median(total(r, suffix) if key is None else r.get(key + suffix, 0.0) for r in later)


def one_checkpoint(rows: list[dict], suffix: str = "") -> float:
    """The median cost of the checkpoints written (rounds without one are skipped, so a run
    under "auto" or K > 1 measures the same per-checkpoint cost as one with K = 1)."""
    import statistics

    written = [r["checkpoint" + suffix] for r in rows if r["checkpoint"] > 0]
    return statistics.median(written) if written else 0.0


def auto_round(round_seconds: float, checkpoint_seconds: float) -> float:
    """A round's cost under ``checkpoint_every = "auto"``: a checkpoint of ``c`` seconds is
    written once ``AUTO_CHECKPOINT_FACTOR * c`` seconds passed since the last one, i.e. every
    ``max(1, ceil(10 c / r))`` rounds of ``r`` seconds; its cost is shared by those rounds."""
    from secure_fedora.runtimes.inprocess import AUTO_CHECKPOINT_FACTOR

    if checkpoint_seconds <= 0:
        return round_seconds
    every = max(1, math.ceil(AUTO_CHECKPOINT_FACTOR * checkpoint_seconds / round_seconds))
    return round_seconds + checkpoint_seconds / every


def summarize(results: list[dict]) -> list[dict]:
    """Per N: steady-round seconds per phase (wall and CPU) and the FEDORA / Local ratios."""
    by = {(r["n"], r["method"]): r for r in results if "rounds" in r}
    out = []
    for n in sorted({n for n, _ in by}):
        if (n, "fedora") not in by or (n, "local") not in by:
            continue
        rows = {"fedora": by[(n, "fedora")]["rounds"], "local": by[(n, "local")]["rounds"]}
        entry = {"n": n, "relatedness": rows["fedora"][0]["relatedness"],
                 "fedora_operator": by[(n, "fedora")].get("operator"),
                 "operator_nnz_per_row": by[(n, "fedora")].get("operator_nnz_per_row"),
                 "fedora_peak_rss_gb": by[(n, "fedora")]["peak_rss_gb"],
                 "local_peak_rss_gb": by[(n, "local")]["peak_rss_gb"],
                 "checkpoint_mib": by[(n, "fedora")]["checkpoint_bytes"] / 2**20}
        every = {by[(n, m)].get("checkpoint_every", 1) for m in rows}
        entry["checkpoint_every"] = every.pop() if len(every) == 1 else "mixed"
        entry["rounds"] = min(len(r) for r in rows.values())
        for m, r in rows.items():
            for suffix in ("", "_cpu"):
                for k in ("training", "propagation", "evaluation"):
                    entry[f"{m}_{k}{suffix}"] = steady(r, k, suffix)
                entry[f"{m}_checkpoint{suffix}"] = one_checkpoint(r, suffix)
                free = sum(entry[f"{m}_{k}{suffix}"] for k in ("training", "propagation", "evaluation"))
                # as run when every round wrote one; else modelled from the checkpoints written
                entry[f"{m}_round{suffix}"] = (steady(r, None, suffix) if entry["checkpoint_every"] == 1
                                               else free + entry[f"{m}_checkpoint{suffix}"])
                entry[f"{m}_round_auto{suffix}"] = auto_round(free, entry[f"{m}_checkpoint{suffix}"])
            entry[f"{m}_lambda"] = steady(r, "lambda")
            entry[f"{m}_first"] = total(r[0])
        for suffix in ("", "_cpu"):
            entry[f"ratio{suffix}"] = entry[f"fedora_round{suffix}"] / entry[f"local_round{suffix}"]
            entry[f"ratio_auto{suffix}"] = entry[f"fedora_round_auto{suffix}"] / entry[f"local_round_auto{suffix}"]
        entry["ratio_first"] = entry["fedora_first"] / entry["local_first"]
        # the real schedule's cost when the runs did not checkpoint every round
        entry["ratio_measured"] = (None if entry["checkpoint_every"] == 1 or entry["rounds"] < 2 else
                                   sum(total(x) for x in rows["fedora"][1:entry["rounds"]])
                                   / sum(total(x) for x in rows["local"][1:entry["rounds"]]))
        local_round = entry["local_round_auto"]
        entry["extra_shares"] = {
            "lambda": entry["fedora_lambda"] / local_round,
            "propagation": entry["fedora_propagation"] / local_round,
            "training without lambda": (entry["fedora_training"] - entry["fedora_lambda"]
                                        - entry["local_training"]) / local_round,
            "evaluation": (entry["fedora_evaluation"] - entry["local_evaluation"]) / local_round,
            "checkpoint": (auto_checkpoint(entry, "fedora") - auto_checkpoint(entry, "local")) / local_round,
        }
        entry["server_share"] = entry["extra_shares"]["propagation"] + entry["extra_shares"]["checkpoint"]
        out.append(entry)
    return out


def auto_checkpoint(entry: dict, method: str) -> float:
    """The checkpoint's seconds per round under "auto" (wall)."""
    free = sum(entry[f"{method}_{k}"] for k in ("training", "propagation", "evaluation"))
    return entry[f"{method}_round_auto"] - free


def auto_share(entry: dict, method: str) -> float:
    """The checkpoint's share of a round under "auto" (wall seconds)."""
    return auto_checkpoint(entry, method) / entry[f"{method}_round_auto"]


def write_csv(path: Path, results: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["n", "method", "round", "training_s", "relatedness_s", "propagation_s", "checkpoint_s",
                    "evaluation_s", "total_s", "total_cpu_s", "peak_rss_gb", "lambda_s"])
        for r in results:
            for row in r.get("rounds", []):
                w.writerow([r["n"], r["method"], row["round"], *(f"{row[k]:.4f}" for k in PHASES),
                            f"{total(row):.4f}", f"{total(row, '_cpu'):.4f}", f"{r['peak_rss_gb']:.3f}",
                            f"{row.get('lambda', 0.0):.4f}"])


def plot(path: Path, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ns = [e["n"] for e in summary]
    for m, label, marker, color in (("local", "Local", "o", "C0"), ("fedora", "FEDORA", "s", "C1")):
        ax.loglog(ns, [e[f"{m}_round_cpu"] for e in summary], marker + "-", color=color,
                  label=f"{label}, checkpoint every round")
        ax.loglog(ns, [e[f"{m}_round_auto_cpu"] for e in summary], marker + "--", color=color, alpha=0.6,
                  label=f"{label}, checkpoint_every = auto (default)")
    ax.set_xlabel("clients N")
    ax.set_ylabel("CPU seconds per round")
    ax.set_title("round cost vs N (1 local epoch, 1 thread)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
