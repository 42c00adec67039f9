"""Real run directories for the audit tests: real keys, real ledgers, real accountants.

``build_run_dir`` writes what a DP run writes: ``config.toml``, ``results.json``,
``ledgers/<method>/model.json`` (the model record, its fingerprint also in results.json),
``keys/`` (public keys only, published from a key store *outside* the run directory, at
``keystore_of(run)``), ``ledgers/<client>.jsonl`` produced by the real release pipeline
(Accountant -> BudgetGate -> LedgerWriter, each ledger closed by its close entry), with
DP-SGD records taken from a real :class:`privacy.dpsgd.DPSGD` that trained a small model on
real steps, and the signed ``anchor.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import tomllib
import torch
import torch.nn.functional as F
from torch import nn

from privacy.accounting import (
    Accountant,
    BudgetExceededError,
    PlannedRelease,
    PrivacyBudget,
    plan_epsilon,
    round_up,
)
from privacy.dpsgd import DPSGD
from privacy.identity import client_ids, init_keys, load_identity
from privacy.ledger import LedgerWriter, line_hash
from privacy.mechanisms import scalar_record, summary_record
from privacy.noise import ReproducibleNoise
from privacy.pipeline import BudgetGate, Release
from secure_fedora.algorithms.contract import declared_reply_entries
from secure_fedora.core.config import config_hash, parse_config
from secure_fedora.learning.models import model_fingerprint
from secure_fedora.runtimes.inprocess import MODEL_RECORD, model_record
from secure_fedora.secure.anchor import build_anchor, write_anchor
from secure_fedora.secure.keystore import OPERATOR_ID, publish_public_keys, run_party_ids


def keystore_of(run: Path) -> Path:
    """The key store (private keys) of a run built by :func:`build_run_dir`: beside it."""
    return run.parent / f"{run.name}-keystore"


def copy_run(source: Path, dest: Path) -> Path:
    """A private, modifiable copy ``dest`` of the run ``source`` and of its key store."""
    shutil.copytree(source, dest)
    shutil.copytree(keystore_of(source), keystore_of(dest))
    return dest


def reanchor(run: Path) -> None:
    """Re-sign ``anchor.json`` for the run directory as it is now (as a forger holding the
    operator key would): current ledger heads and results/config digests; the run name and
    config hash results.json records and config.toml's methods, as the runtime anchors them."""
    doc = json.loads((run / "results.json").read_text())
    methods = tomllib.loads((run / "config.toml").read_text())["methods"]
    ledgers = {}
    for path in sorted((run / "ledgers").glob("*/*.jsonl")):
        lines = path.read_text().splitlines()
        ledgers[f"{path.parent.name}/{path.stem}"] = {
            "entries": len(lines), "head": line_hash(lines[-1]) if lines else "0" * 64,
            "epsilon_spent": max((json.loads(x)["epsilon_after"] for x in lines), default=0.0)}
    anchor = build_anchor(run, run_name=doc["name"], config_hash=doc["config_hash"],
                          methods=methods, ledgers=ledgers,
                          signer=load_identity(keystore_of(run), OPERATOR_ID))
    write_anchor(run, anchor)


def fixture_model() -> nn.Module:
    """The tiny model whose DP-SGD steps the fixture's ledgers record (its ``model.json``)."""
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))


def _dpsgd_record(noise_multiplier: float, sample_rate: float, steps: int):
    """Train a tiny model for ``steps`` real DP-SGD steps and return DPSGD's own record."""
    gen = torch.Generator().manual_seed(0)
    model = fixture_model()
    x = torch.randn(64, 8, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = ReproducibleNoise(0)
    with DPSGD(model, 1.0, noise_multiplier, 64 * sample_rate, noise) as dp:
        for _ in range(steps):
            idx = dp.sample_batch(64, sample_rate, noise)
            opt.zero_grad()
            dp.private_gradient(x[idx], y[idx], lambda o, t: F.cross_entropy(o, t, reduction="none"))
            opt.step()
        return dp.record(sample_rate)


def _plan_rows(method: str, budgets: list[PrivacyBudget], accountant: str,
               noise_multiplier: float, sample_rate: float, steps_per_round: int,
               rounds: int) -> list[dict[str, Any]]:
    """``privacy.<method>.plan`` as the runtime states it, for the releases the fixture's
    ledgers record (FEDORA: one summary, per round DP-SGD steps and a lambda; Local: DP-SGD
    only), every epsilon computed by the real :func:`privacy.accounting.plan_epsilon`."""
    releases = [PlannedRelease("dpsgd", sample_rate, rounds * steps_per_round)]
    if method == "fedora":
        releases = [PlannedRelease("gaussian_summary", 1.0, 1, 5.0), *releases,
                    PlannedRelease("gaussian_lambda", 1.0, rounds, 5.0)]
    rows: dict[tuple[float, float], dict[str, Any]] = {}
    for budget in budgets:
        key = (budget.epsilon, budget.delta)
        if key not in rows:
            eps = {name: round_up(plan_epsilon(releases, budget.delta, noise_multiplier, name))
                   for name in ("rdp", "pld", accountant)}
            rows[key] = {
                "method": method, "epsilon_budget": budget.epsilon, "delta": budget.delta,
                "noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                "steps_per_round": steps_per_round, "rounds": rounds,
                "planned_epsilon": eps[accountant], "planned_epsilon_rdp": eps["rdp"],
                "planned_epsilon_pld": eps["pld"],
                "releases": [f"{r.mechanism} x{r.steps} (q={r.sample_rate!r}"
                             + (f", sigma={r.noise_multiplier!r})" if r.noise_multiplier
                                else ")") for r in releases],
                "figures": "exact", "clients": 0, "accountant": accountant,
            }
        rows[key]["clients"] += 1
    return list(rows.values())


def build_run_dir(root: Path, *, num_clients: int = 3, rounds: int = 4,
                  accountant: str = "rdp", epsilon: float = 8.0, delta: float = 1e-5,
                  overrides: dict[str, float] | None = None, noise_multiplier: float = 1.2,
                  sample_rate: float = 0.1, steps_per_round: int = 5,
                  methods: tuple[str, ...] = ("fedora", "local"),
                  record_method: bool = False, plan: bool = True) -> Path:
    """Write a complete DP run directory under ``root`` in the runtime's layout; return it.

    Layout as written by :class:`secure_fedora.runtimes.inprocess.Simulation` with privacy enabled:
    ``ledgers/<method>/<client>.jsonl`` (closed), ``keys/`` (allowlist + public keys; the
    private keys are in ``keystore_of(root)``), ``config.toml``, ``results.json`` with
    ``privacy[<method>]["clients"]`` summaries and ``anchor.json``. FEDORA clients release
    a noised summary (round 0), then per round DP-SGD steps and a noised lambda; Local
    clients release DP-SGD steps only. ``record_method``: each DP-SGD record also states its
    method (``params.method``), as both runtimes' clients record it. ``plan``: each method's
    section states its accountant and plan rows (``privacy.<method>.plan``), as runs do;
    False writes a section of a run from before the plan was recorded.
    """
    root.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    cfg_dict: dict[str, Any] = {
        "name": "audit-fixture",
        "seed": 3,
        "methods": list(methods),
        "data": {"num_clients": num_clients, "train_per_client": 128, "val_per_client": 16,
                 "test_per_client": 16, "validation": "private"},
        "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 16},
        "fedora": {"relatedness": "noised", "k": min(2, num_clients - 1)},  # k < N
        "privacy": {"enabled": True, "epsilon": epsilon, "delta": delta,
                    "accountant": accountant, "noise_multiplier": noise_multiplier,
                    "sample_rate": sample_rate,
                    "overrides": {k: {"epsilon": v} for k, v in overrides.items()}},
    }
    cfg = parse_config(cfg_dict)
    (root / "config.toml").write_text(tomli_w.dumps(cfg_dict))
    keys_dir = keystore_of(root)
    ids = client_ids(num_clients)
    init_keys(keys_dir, run_party_ids(num_clients))
    publish_public_keys(keys_dir, root / "keys", run_party_ids(num_clients))
    record = _dpsgd_record(noise_multiplier, sample_rate, steps_per_round)
    privacy: dict[str, Any] = {}
    for method in methods:
        (root / "ledgers" / method).mkdir(parents=True)
        (root / "ledgers" / method / MODEL_RECORD).write_bytes(model_record(fixture_model()))
        per_client = []
        for index, cid in enumerate(ids):
            budget = PrivacyBudget(overrides.get(str(index), epsilon), delta)
            acc = Accountant(accountant)
            ident = load_identity(keys_dir, cid)
            path = root / "ledgers" / method / f"{cid}.jsonl"
            with LedgerWriter(path, cid, ident.signing_key) as ledger:
                gate = BudgetGate(acc, budget, ledger, cid)
                if method == "fedora":
                    summary = summary_record(clip_norm=1.0, noise_multiplier=5.0, n=128, q=1)
                    gate.process(Release("summary", torch.zeros(3), 0, [summary]))
                for rnd in range(1, rounds + 1):
                    records = [dataclasses.replace(record, params={**record.params,
                                                                   "method": method})
                               if record_method else record]
                    if method == "fedora":
                        records.append(scalar_record(clip=2.0, noise_multiplier=5.0, m=16))
                    try:
                        gate.process(Release("model", torch.zeros(3), rnd, records))
                    except BudgetExceededError:
                        break
                ledger.close_run(round=rounds, delta=budget.delta,
                                 budget_epsilon=budget.epsilon, accountant=accountant)
                per_client.append({
                    "client": cid, "epsilon_budget": budget.epsilon, "delta": budget.delta,
                    "epsilon_spent": round(ledger.last_epsilon, 6),
                    "noise_multiplier": noise_multiplier,
                    "refused_at_round": rnd if gate.closed else None,
                    "ledger_entries": ledger.head[0],
                    "ledger_head": ledger.head[1],
                })
        budgets = [PrivacyBudget(overrides.get(str(i), epsilon), delta)
                   for i in range(num_clients)]
        privacy[method] = {"method": method, "sample_rate": sample_rate,
                           **({"accountant": accountant,
                               "plan": _plan_rows(method, budgets, accountant,
                                                  noise_multiplier, sample_rate,
                                                  steps_per_round, rounds)} if plan else {}),
                           "steps_per_round": steps_per_round, "clients": per_client,
                           "events": [],
                           "model_fingerprint": model_fingerprint(fixture_model()),
                           "reply_entries": declared_reply_entries(method, cfg)}
    accuracy = [0.8 + 0.01 * i for i in range(num_clients)]
    results = {
        "name": cfg.name,
        "version": "0.1.0",
        "config_hash": config_hash(cfg),
        "data_fingerprint": "ab" * 32,
        # relatedness: stated only for a run of a method that computes it, as runs state it
        "assumptions": {"validation_data": "private",
                        **({"relatedness": "noised"} if "fedora" in methods else {}),
                        "server": "honest-but-curious", "differential_privacy": True,
                        "accountant": accountant},
        "privacy": privacy,
        "clients": [{"id": i, "train": 128, "val": 16, "test": 16} for i in range(num_clients)],
        "methods": {
            m: {"name": m, "rounds": rounds, "selected": {
                "mean": sum(accuracy) / num_clients - 0.05 * k, "min": min(accuracy) - 0.05 * k,
                "max": max(accuracy) - 0.05 * k, "std": 0.01,
                "per_client": [a - 0.05 * k for a in accuracy], "round": rounds}}
            for k, m in enumerate(methods)
        },
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    reanchor(root)
    return root


@pytest.fixture(scope="session")
def pristine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-client, 2-method RDP run; client 2 has a small budget and is refused in round 3."""
    return build_run_dir(tmp_path_factory.mktemp("pristine") / "run", overrides={"2": 3.0})


@pytest.fixture()
def run_copy(pristine_run: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of the pristine run (and of its key store)."""
    return copy_run(pristine_run, tmp_path / "run")


#: A tiny private config for ``audit canary RUN_DIR`` tests (2 clients, 1 round, Local).
CANARY_CONFIG = ('methods = ["local"]\n[data]\nnum_clients = 2\ntrain_per_client = 32\n'
                 'val_per_client = 8\ntest_per_client = 8\n[training]\nrounds = 1\n'
                 'batch_size = 16\n[privacy]\nenabled = true\nepsilon = 8.0\n')


def canary_run_dir(tmp_path: Path) -> Path:
    """A run directory holding only :data:`CANARY_CONFIG` (what ``audit canary`` reads)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(CANARY_CONFIG)
    return run


def bad_allowlists(run: Path, tmp_path: Path) -> dict[str, Path]:
    """Given allowlists that are not one: not JSON, of another version, and with an invalid
    party id (built from ``run``'s own keys/allowlist.json)."""
    doc = json.loads((run / "keys" / "allowlist.json").read_text())
    first = next(iter(doc["parties"]))
    files = {"not JSON": "{bad", "version": json.dumps({**doc, "version": 99}),
             "party id": json.dumps({**doc, "parties": {**doc["parties"],
                                                        "bad id!": doc["parties"][first]}})}
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / f"{name.replace(' ', '-')}.json"
        out[name].write_text(text)
    return out
