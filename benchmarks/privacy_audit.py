"""Privacy audits measured in one run: ledger verification cost, canary epsilon lower bounds
against the claimed epsilon, and summary leakage per relatedness mode.

    python benchmarks/privacy_audit.py            # full (several minutes on one core)
    python benchmarks/privacy_audit.py --quick    # smaller, about a minute

Part A runs a small DP federation (the cross-silo DP config, scaled down) with the in-process
runtime, then times ``verify_run`` and ``write_report`` on its run directory and prints the
largest relative gap between recorded and independently recomputed epsilon.

Part B runs the canary audit (method ``local``, noise canaries) without DP and with DP at
several budgets, printing the Clopper-Pearson lower bound next to the claimed epsilon.

Part C runs the summary-leakage attack on plain summaries, on noised summaries at the noise
the DP plan calibrates for each budget, and on the encrypted mode's similarity matrix.

Part D runs the white-box one-run DP-SGD audit (20,000 Dirac gradient canaries) on the main
job's setting (configs/dp_rotated_mnist.toml: client 0, 1,000 samples, MLP, 30 rounds x 1
epoch, q = 0.25) at epsilon 1, 3, 8 and without DP, for the plans of Local and FEDORA,
printing claim, certifiable maximum, measured lower bound and verdict, and the canary
audit's certifiable maximum at 300 canaries. ``--only-whitebox`` runs just part D.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audits.canary import run_canary_audit  # noqa: E402
from audits.report import write_report  # noqa: E402
from audits.summary_leakage import run_summary_leakage_audit  # noqa: E402
from audits.verdict import audit_figures  # noqa: E402
from audits.verify import verify_run  # noqa: E402
from privacy.accounting import PrivacyBudget, format_down  # noqa: E402
from secure_fedora.core.config import load_config, parse_config  # noqa: E402
from secure_fedora.runtimes.inprocess import Simulation, build_clients  # noqa: E402
from secure_fedora.secure.private import privacy_plan  # noqa: E402


def part_a(quick: bool) -> dict:
    base = load_config(ROOT / "configs" / "dp_rotated_mnist.toml").model_dump(mode="json")
    base["methods"] = ["fedora"]
    base["data"].update(num_clients=4 if quick else 8, train_per_client=300 if quick else 1000,
                        val_per_client=50)
    base["training"]["rounds"] = 3 if quick else 10
    cfg = parse_config(base)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        Simulation(cfg, run).run()
        t_run = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = verify_run(run)
        t_verify = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_report(run, verification=report)
        t_report = time.perf_counter() - t0
        gaps = [abs(e.recorded_epsilon / e.independent_epsilon - 1)
                for c in report.clients for e in c.series
                if e.independent_epsilon and e.recorded_epsilon is not None]
        entries = sum(c.entries for c in report.clients)
    row = {"clients": cfg.data.num_clients, "rounds": cfg.training.rounds, "ledger_entries": entries,
           "verified": report.ok, "errors": len(report.errors), "run_s": round(t_run, 2),
           "verify_s": round(t_verify, 3), "report_s": round(t_report, 3),
           "max_rel_gap_recorded_vs_independent": max(gaps) if gaps else None}
    print("\nA. verification of a real DP run (fedora, noised relatedness, private lambda)")
    for k, v in row.items():
        print(f"  {k:<38} {v}")
    return row


def _canary_cfg(epsilon: float | None, seed: int):
    d = {"methods": ["local"], "seed": seed,
         "data": {"num_clients": 2, "train_per_client": 128, "val_per_client": 16,
                  "test_per_client": 16},
         "training": {"rounds": 15, "local_epochs": 2, "batch_size": 32,
                      "lr": 0.05 if epsilon is None else 0.01}}
    if epsilon is not None:
        d["privacy"] = {"enabled": True, "epsilon": epsilon, "delta": 1e-5}
    return parse_config(d)


def part_b(quick: bool) -> list[dict]:
    rows = []
    canaries = 300
    seeds = [0] if quick else [0, 1, 2]
    print(f"\nB. canary audit: {canaries} noise canaries, each inserted w.p. 1/2, method local,"
          " 128 real training rows, 15 rounds x 2 epochs, confidence 0.95")
    print(f"  {'setting':<14} {'seed':>4} {'claimed eps':>11} {'eps lower bound':>16} {'TPR':>6}"
          f" {'FPR':>6} {'verdict':>12} {'seconds':>8}")
    for eps in (None, 8.0, 3.0, 1.0):
        for seed in seeds:
            t0 = time.perf_counter()
            r = run_canary_audit(_canary_cfg(eps, seed), num_canaries=canaries, seed=seed)
            dt = time.perf_counter() - t0
            name = "non-private" if eps is None else f"DP eps={eps:g}"
            # claim up, lower bound down, apart where they differ (audits.verdict.audit_figures)
            claim, (lower, _) = audit_figures(None if eps is None else r.claimed_epsilon,
                                              r.epsilon_lower_bound, r.epsilon_lower_bound, 3)
            claim = "inf" if eps is None else claim
            print(f"  {name:<14} {seed:>4} {claim:>11} {lower:>16}"
                  f" {r.bound.tpr:>6.3f} {r.bound.fpr:>6.3f} {r.verdict:>12} {dt:>8.1f}")
            rows.append({"setting": name, **r.to_json(), "seconds": round(dt, 1)})
    return rows


def part_c(quick: bool) -> list[dict]:
    out = []
    print("\nC. summary leakage (cosine to the truth; prior = uninformed guess;"
          " identification: own client closest, chance 1/N)")
    for partition in ("rotation", "dirichlet"):
        data = {"num_clients": 8, "train_per_client": 300 if quick else 1000,
                "val_per_client": 50, "test_per_client": 50, "partition": partition}
        if partition == "dirichlet":
            data["dirichlet_alpha"] = 0.3
        else:
            data["groups"] = 4
        base = {"data": data, "fedora": {"relatedness": "noised"},
                "privacy": {"enabled": True, "delta": 1e-5}}
        clients = build_clients(parse_config(base))
        print(f"  {partition}: {'mode':<22} {'image':>6} {'prior':>6} {'label':>6} {'prior':>6}"
              f" {'ident':>6}")
        settings: list[tuple[str, float | None, float | None]] = [("plain/encrypted", None, None)]
        for eps in (8.0, 3.0, 1.0):
            cfg = parse_config({**base, "privacy": {**base["privacy"], "epsilon": eps}})
            plan = privacy_plan(cfg, "fedora", PrivacyBudget(eps, 1e-5))
            settings.append((f"noised (eps={eps:g})", cfg.privacy.summary_clip,
                             plan.summary_noise))
        for label, clip, sigma in settings:
            rep = run_summary_leakage_audit(clients, clip_norm=clip, noise_multiplier=sigma)
            modes = ["plain", "encrypted"] if clip is None else ["noised"]
            for mode in modes:
                m = rep.modes[mode]
                name = mode if clip is None else f"{label} sigma={sigma:.3g}"
                print(f"  {'':<10} {name:<22} {m.mean_image_cosine:>6.3f}"
                      f" {m.mean_prior_image_cosine:>6.3f} {m.mean_label_cosine:>6.3f}"
                      f" {m.mean_prior_label_cosine:>6.3f} {m.identification_accuracy:>6.3f}")
                out.append({"partition": partition, "mode": name, **{
                    k: v for k, v in m.to_json().items() if k != "clients"}})
    return out


def _main_job_cfg(epsilon: float | None, method: str):
    d = load_config(ROOT / "configs" / "dp_rotated_mnist.toml").model_dump(mode="json")
    d["methods"] = [method]
    if epsilon is None:
        d["privacy"]["enabled"] = False
        d["fedora"]["relatedness"] = "plain"
        d["data"]["validation"] = "public"
    else:
        d["privacy"]["epsilon"] = epsilon
    return parse_config(d)


def part_d(quick: bool) -> dict:
    from audits.canary import certifiable_maximum as canary_max
    from audits.whitebox import DEFAULT_CANARIES, run_whitebox_audit

    seeds = [0] if quick else [0, 1, 2]
    print(f"\nD. white-box one-run DP-SGD audit: {DEFAULT_CANARIES} Dirac canaries (20% calibrate"
          " the guesses), client 0 of configs/dp_rotated_mnist.toml, confidence 0.95,"
          " delta 1e-5")
    print(f"  {'plan':<7} {'setting':<12} {'seed':>4} {'sigma':>7} {'claim':>6} {'cert. max':>9}"
          f" {'lower bound':>11} {'guesses':>7} {'correct':>7} {'verdict':<13} {'s':>5}")
    rows = []
    for method in ("local", "fedora"):
        for eps in (None, 8.0, 3.0, 1.0):
            if eps is None and method == "fedora":
                continue  # non-private training is the same for both plans
            for seed in seeds:
                r = run_whitebox_audit(_main_job_cfg(eps, method), method=method, seed=seed)
                doc = r.to_json()
                name = "non-private" if eps is None else f"eps={eps:g}"
                sigma = "-" if r.setting.noise_multiplier is None \
                    else format_down(r.setting.noise_multiplier, 3)
                claim, (lower, most) = audit_figures(doc["claim_epsilon"], doc["lower_bound"],
                                                     doc["certifiable_max"], 3)
                claim = "-" if doc["claim_epsilon"] is None else claim
                print(f"  {method:<7} {name:<12} {seed:>4} {sigma:>7} {claim:>6}"
                      f" {most:>9} {lower:>11}"
                      f" {doc['guesses']:>7} {doc['correct_guesses']:>7} {doc['verdict']:<13}"
                      f" {doc['seconds']:>5.1f}")
                if doc["claim_epsilon"] is not None:
                    assert doc["lower_bound"] <= doc["claim_epsilon"], "a DP run exceeded its claim"
                rows.append({"plan": method, "setting": name, **doc})
    cmax = canary_max(75, 75, 1e-5, 0.95)
    print(f"  canary audit (300 canaries, evaluation half ~75 + 75): certifiable maximum"
          f" {cmax:.3f}")
    return {"whitebox": rows, "canary_certifiable_max_300": cmax}


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only-whitebox", action="store_true", help="run part D only")
    parser.add_argument("--out", help="write all numbers to this JSON file")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.only_whitebox:
        result = {"D_whitebox": part_d(args.quick)}
    else:
        result = {"A_verification": part_a(args.quick), "B_canary": part_b(args.quick),
                  "C_leakage": part_c(args.quick), "D_whitebox": part_d(args.quick)}
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
