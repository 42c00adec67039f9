"""White-box one-run DP-SGD audit: real training path, power, and bounds below the claims."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomli_w
import torch

import audits.whitebox as whitebox
from audits.cli import main
from audits.onerun import certifiable_maximum
from audits.whitebox import (
    DiracCanaryOracle,
    WhiteboxAuditError,
    audit_run_dir,
    quiet_coordinates,
    run_whitebox_audit,
    whitebox_setting,
)
from privacy.accounting import PlannedRelease, plan_epsilon
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import build_clients, build_context
from secure_fedora.secure.private import DPGradient

CANARIES = 2000  # evaluation part 1600: certifiable maximum about 6.6 at delta 1e-5


def _cfg_dict(epsilon: float | None, **privacy) -> dict:
    d = {"name": "whitebox-test", "methods": ["local"], "seed": 0,
         "data": {"num_clients": 2, "train_per_client": 128, "val_per_client": 16,
                  "test_per_client": 16},
         "training": {"rounds": 4, "local_epochs": 1, "batch_size": 32, "lr": 0.1}}
    if epsilon is not None:
        d["privacy"] = {"enabled": True, "epsilon": epsilon, "delta": 1e-5, **privacy}
    return d


def test_nonprivate_gives_a_large_bound_and_dp_stays_below_its_claim():
    plain = run_whitebox_audit(parse_config(_cfg_dict(None)), num_canaries=CANARIES)
    top = certifiable_maximum(1600, 1e-5)
    assert plain.outcome.certifiable_max == pytest.approx(top)
    # memorized: almost every guess right (about 1% of members are never sampled in 16 steps
    # at rate 1/4 and look like non-members; those are the only mistakes)
    assert plain.outcome.correct / plain.outcome.guesses > 0.99
    assert plain.outcome.lower_bound > 0.8 * top
    assert plain.verdict == "inconclusive"  # no claim to test
    assert plain.to_json()["claim_epsilon"] is None
    assert plain.mean_inclusions == pytest.approx(16 * 32 / 128, rel=0.1)

    dp = run_whitebox_audit(parse_config(_cfg_dict(3.0)), num_canaries=CANARIES)
    s = dp.setting
    assert s.private and s.steps == 16 and s.sample_rate == 0.25
    assert s.claim_epsilon == pytest.approx(3.0, rel=0.02)  # Local: DP-SGD spends the budget
    assert dp.outcome.lower_bound <= s.claim_epsilon
    assert dp.verdict == "consistent" and dp.outcome.certifiable_max > s.claim_epsilon
    assert dp.mean_inclusions == pytest.approx(16 * 0.25, rel=0.1)  # Poisson at q per step
    doc = dp.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["audit"] == "whitebox" and doc["setup"]["noise_multiplier"] == s.noise_multiplier

    # the same small design cannot reach epsilon 8: it says so instead of "consistent"
    big = run_whitebox_audit(parse_config(_cfg_dict(8.0)), num_canaries=CANARIES)
    assert big.outcome.lower_bound <= big.setting.claim_epsilon
    assert big.verdict == "inconclusive"
    assert "cannot certify epsilon above" in big.to_json()["verdict_text"]


def test_refutes_an_accountant_that_under_reports(monkeypatch):
    # the noise is calibrated for epsilon 8, but a broken accountant claims 0.5
    monkeypatch.setattr(whitebox, "plan_epsilon", lambda *a, **k: 0.5)
    result = run_whitebox_audit(parse_config(_cfg_dict(8.0)), num_canaries=CANARIES)
    assert result.setting.claim_epsilon == 0.5
    assert result.outcome.lower_bound > 0.5 and result.verdict == "refuted"


def test_setting_follows_the_plan_and_checks_results_json():
    d = _cfg_dict(3.0)
    d["methods"] = ["fedora", "local"]
    d["data"]["validation"] = "private"
    d["fedora"] = {"relatedness": "noised", "k": 1}
    cfg = parse_config(d)
    fed = whitebox_setting(cfg, "fedora", 1)
    local = whitebox_setting(cfg, "local", 1)
    # FEDORA shares the budget with the summary and lambda: more noise, a smaller DP-SGD claim
    assert fed.noise_multiplier > local.noise_multiplier
    assert fed.claim_epsilon < local.claim_epsilon <= 3.0
    assert fed.claim_epsilon == pytest.approx(plan_epsilon(
        [PlannedRelease("dpsgd", 0.25, 16)], 1e-5, fed.noise_multiplier, fed.accountant))
    recorded = {"privacy": {"local": {"plan": [{"epsilon_budget": 3.0, "delta": 1e-5,
                                                 "noise_multiplier": round(local.noise_multiplier, 6)}]}}}
    assert "matches results.json" in whitebox_setting(cfg, "local", 0, recorded).plan_source
    recorded["privacy"]["local"]["plan"][0]["noise_multiplier"] = 0.5
    with pytest.raises(WhiteboxAuditError, match="not this run's"):
        whitebox_setting(cfg, "local", 0, recorded)
    with pytest.raises(WhiteboxAuditError, match="not in the config's methods"):
        whitebox_setting(cfg, "fedavg", 0)
    with pytest.raises(WhiteboxAuditError, match="client index"):
        whitebox_setting(cfg, "local", 2)


def test_quiet_coordinates_and_the_oracle_use_the_runtime_path():
    cfg = parse_config(_cfg_dict(3.0))
    clients = build_clients(cfg)
    ctx = build_context(cfg, clients)
    assert isinstance(ctx.oracle, DPGradient)
    coords, zero = quiet_coordinates(ctx.flat, ctx.init, clients[0].train_x, clients[0].train_y,
                                     500, torch.Generator().manual_seed(0))
    assert coords.unique().numel() == 500 and zero == 500  # always-black pixels: no gradient
    # every training record's own gradient is exactly zero there (checked one record at a time)
    row, grad = ctx.init.clone(), torch.zeros_like(ctx.init)
    model = ctx.flat.bind(row, grad)
    for i in range(128):
        grad.zero_()
        torch.nn.functional.cross_entropy(model(clients[0].train_x[i:i + 1]),
                                          clients[0].train_y[i:i + 1]).backward()
        assert float(grad[coords].abs().max()) == 0.0
    # most are first-layer weights (784 inputs per hidden unit) of pixels black in every image
    first = coords[coords < 784 * 128]
    black = clients[0].train_x.reshape(128, -1).abs().sum(dim=0)[first % 784] == 0
    assert int(black.sum()) > 250
    with pytest.raises(WhiteboxAuditError, match="distinct coordinates"):
        quiet_coordinates(ctx.flat, ctx.init, clients[0].train_x, clients[0].train_y,
                          ctx.flat.num_params + 1, torch.Generator())
    oracle = DiracCanaryOracle(ctx.oracle, coords[:100], 1.0, ctx.flat.num_params,
                               plain_rate=0.25, canary_generator=torch.Generator())
    oracle.select(1.0, ctx.noise[0])
    batches, pending = [], []
    for b in oracle.batches(128, 1, torch.Generator().manual_seed(3)):
        batches.append(b)
        pending.append(oracle._pending.clone())
    # the real records are a Poisson sample of the 128 rows; the canaries ride along
    assert len(batches) == 4 and all(bool((b < 128).all()) for b in batches)
    assert all(bool((p < 100).all()) for p in pending) and sum(p.numel() for p in pending) > 50
    # the steps divide by the client's own expected batch q * n, canaries not counted
    assert ctx.oracle.dpsgd.noise_std == pytest.approx(1.0 * 1.0 / (0.25 * 128))


def test_run_dir_and_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(tomli_w.dumps(_cfg_dict(3.0, noise="reproducible")))
    code = main(["audit", "whitebox", str(run), "--canaries", "500", "--json",
                 str(tmp_path / "copy.json")])
    out = capsys.readouterr().out
    doc = json.loads((run / "audit" / "whitebox.json").read_text())
    assert code == {"consistent": 0, "refuted": 1, "inconclusive": 3}[doc["verdict"]]
    assert doc["verdict"] == "consistent" and doc["setup"]["canaries"] == 500
    assert "certifiable maximum" in out and "verdict: consistent" in out
    assert out.endswith(f"  written: {run / 'audit' / 'whitebox.json'}\n"
                        f"  written: {tmp_path / 'copy.json'}\n")  # every file it wrote
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy.pop("written_by")["command"] == "whitebox" and copy == doc  # the --json seal
    result, path = audit_run_dir(run, num_canaries=500)
    assert path == run / "audit" / "whitebox.json" and result.to_json()["lower_bound"] == \
        doc["lower_bound"]  # deterministic in the seed with the experiment-seeded noise
    assert main(["audit", "whitebox", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["audit", "whitebox", str(tmp_path / "empty")]) == 2
    assert "config.toml is missing" in capsys.readouterr().err
    assert main(["audit", "whitebox", str(run), "--canaries", "5"]) == 2
    assert main(["audit", "whitebox", str(run), "--calibration-fraction", "1.5"]) == 2


def _table_module(tmp_path, monkeypatch, module: str, rows: int, train: int, extra: str = "",
                  tail: str = "") -> None:
    """An importable ``module.load(seed)``: ``rows`` random 5-feature rows labelled by the sign
    of the first, the first ``train`` for training (``extra`` adds dict entries, ``tail`` code)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{module}.py").write_text(
        "import torch\n\n\n"
        "def load(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        f"    x = torch.randn({rows}, 5, generator=g)\n"
        "    y = (x[:, 0] > 0).long()\n"
        f"    return {{'x_train': x[:{train}], 'y_train': y[:{train}], 'x_test': x[{train}:],\n"
        f"            'y_test': y[{train}:]{extra}}}\n" + tail)
    monkeypatch.syspath_prepend(str(folder))


def test_a_model_smaller_than_the_default_canary_count_is_audited_on_all_its_coordinates(
        tmp_path, monkeypatch):
    """The default (20,000 canaries) used to be refused for any model with fewer parameters."""
    _table_module(tmp_path, monkeypatch, "whitebox_table", rows=400, train=300,
                  extra=", 'num_classes': 2")
    doc = _cfg_dict(3.0, noise="reproducible")
    doc["data"] = {"source": "whitebox_table:load", "partition": "iid", "num_clients": 2,
                   "train_per_client": 128, "val_per_client": 16, "test_per_client": 16}
    result = run_whitebox_audit(parse_config(doc))
    assert result.num_canaries == 17_538  # every parameter of the built-in MLP 5-128-128-2
    assert result.outcome.lower_bound <= result.setting.claim_epsilon


def test_a_malformed_results_json_is_a_clear_error(tmp_path, capsys):
    """``{"privacy": 5}`` in results.json was an AttributeError traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(tomli_w.dumps(_cfg_dict(3.0, noise="reproducible")))
    for doc in ({"privacy": 5}, {"privacy": {"local": {"plan": 7}}}):
        (run / "results.json").write_text(json.dumps(doc))
        assert main(["audit", "whitebox", str(run), "--canaries", "100"]) == 2
        assert "results.json is malformed: privacy.local.plan" in capsys.readouterr().err


@pytest.mark.parametrize("noise", ["abc", [1.2], None, True, float("nan")])
def test_a_non_numeric_recorded_noise_multiplier_is_a_clear_error(noise):
    """A plan row's noise_multiplier 'abc', a list or null raised ValueError/TypeError."""
    cfg = parse_config(_cfg_dict(3.0))
    recorded = {"privacy": {"local": {"plan": [{"epsilon_budget": 3.0, "delta": 1e-5,
                                                 "noise_multiplier": noise}]}}}
    with pytest.raises(WhiteboxAuditError,
                       match=r"results.json privacy.local.plan\[0\].noise_multiplier must be"):
        whitebox_setting(cfg, "local", 0, recorded)


def test_an_edited_epsilon_is_not_this_runs_config(tmp_path, capsys):
    """config.toml's epsilon edited: no plan row has the new budget, the check "the config is
    not this run's" was skipped and a verdict written. Without results.json the setting says
    it was not cross-checked."""
    cfg = parse_config(_cfg_dict(3.0))
    sigma = whitebox_setting(cfg, "local", 0).noise_multiplier
    recorded = {"privacy": {"local": {"plan": [{"epsilon_budget": 3.0, "delta": 1e-5,
                                                 "noise_multiplier": round(sigma, 6)}]}}}
    edited = parse_config(_cfg_dict(8.0))
    with pytest.raises(WhiteboxAuditError, match=r"has no row for epsilon 8, delta 1e-05 .*"
                       r"records epsilon 3.0 delta 1e-05: the config is not this run's"):
        whitebox_setting(edited, "local", 0, recorded)
    with pytest.raises(WhiteboxAuditError, match="has no row for epsilon 8"):
        whitebox_setting(edited, "local", 0, {"privacy": {"local": {"plan": []}}})
    assert "not cross-checked: no results.json" in whitebox_setting(edited, "local", 0).plan_source
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(tomli_w.dumps(_cfg_dict(8.0, noise="reproducible")))
    (run / "results.json").write_text(json.dumps(recorded))
    assert main(["audit", "whitebox", str(run), "--canaries", "100"]) == 2
    assert "the config is not this run's" in capsys.readouterr().err
    assert not (run / "audit" / "whitebox.json").exists()


def test_a_binary_task_is_audited_with_its_own_loss(tmp_path, monkeypatch):
    """The quiet coordinates were chosen by cross-entropy whatever the run's loss: a
    ``training.loss = "bce"`` run (one logit) stopped with torch's IndexError traceback."""
    _table_module(tmp_path, monkeypatch, "whitebox_binary", rows=200, train=160, tail=(
        "\n\n\ndef mlp(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(16, num_classes))\n"))
    doc = _cfg_dict(3.0, noise="reproducible")
    doc["data"] = {"source": "whitebox_binary:load", "partition": "iid", "num_clients": 2,
                   "train_per_client": 64, "val_per_client": 8, "test_per_client": 16}
    doc["model"] = {"factory": "whitebox_binary:mlp"}
    doc["training"]["loss"] = "bce"
    cfg = parse_config(doc)
    clients = build_clients(cfg)
    ctx = build_context(cfg, clients)
    assert ctx.flat.task.name == "bce"
    coords, _ = quiet_coordinates(ctx.flat, ctx.init, clients[0].train_x, clients[0].train_y,
                                  50, torch.Generator().manual_seed(0))
    assert coords.unique().numel() == 50
    result = run_whitebox_audit(cfg, num_canaries=50)
    assert result.num_canaries == 50
    assert result.outcome.lower_bound <= result.setting.claim_epsilon


def test_a_model_whose_first_layer_is_an_embedding_is_audited_without_opacus_warnings(
        tmp_path, monkeypatch):
    """The quiet-coordinate pass ran the model under Opacus's hooks, whose backward over an
    nn.Embedding (inputs without gradient) printed torch's "Full backward hook is firing"
    UserWarning and its source line in the audit's output, which training itself silences."""
    import warnings

    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "whitebox_tokens.py").write_text(
        "import torch\n\n\n"
        "def load(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x = torch.randint(0, 20, (200, 6), generator=g)\n"
        "    y = (x == 7).any(dim=1).long()\n"
        "    return {'x_train': x[:160], 'y_train': y[:160], 'x_test': x[160:], 'y_test': y[160:]}\n"
        "\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, k):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(20, 4)\n"
        "        self.out = torch.nn.Linear(24, k)\n"
        "    def forward(self, x):\n"
        "        return self.out(self.emb(x.long()).flatten(1))\n"
        "\n\n"
        "def net(input_shape, num_classes):\n"
        "    return Net(num_classes)\n")
    monkeypatch.syspath_prepend(str(folder))
    doc = _cfg_dict(3.0, noise="reproducible")
    doc["data"] = {"source": "whitebox_tokens:load", "partition": "iid", "num_clients": 2,
                   "train_per_client": 64, "val_per_client": 8, "test_per_client": 16}
    doc["model"] = {"factory": "whitebox_tokens:net"}
    cfg = parse_config(doc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = run_whitebox_audit(cfg, num_canaries=30)
    assert result.num_canaries == 30
    assert result.outcome.lower_bound <= result.setting.claim_epsilon


def test_a_forged_fedora_claim_below_the_ledgers_dpsgd_epsilon_is_refused(tmp_path, capsys):
    """A finished DP FEDORA run whose config.toml and results.json were edited to a larger
    DP-SGD noise multiplier (so the white-box claim is below the DP-SGD epsilon the signed
    ledger records) was audited against that weaker claim and given a verdict; the audit now
    checks the plan against the client's verified ledger and refuses, naming the mismatch."""
    from secure_fedora.runtimes.inprocess import Simulation

    d = {"name": "whitebox-forged", "methods": ["fedora"], "seed": 0,
         "data": {"num_clients": 3, "train_per_client": 32, "val_per_client": 8,
                  "test_per_client": 8, "validation": "private"},
         "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16},
         "fedora": {"k": 1, "relatedness": "noised"},
         "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise_multiplier": 1.5,
                     "accountant": "rdp", "noise": "reproducible"}}
    cfg = parse_config(d)
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    setting = whitebox_setting(cfg, "fedora", 0)

    d["privacy"]["noise_multiplier"] = 3.0
    (run / "config.toml").write_text(tomli_w.dumps(d))
    original = (run / "results.json").read_text()
    results = json.loads(original)
    for row in results["privacy"]["fedora"]["plan"]:
        row["noise_multiplier"] = 3.0
    (run / "results.json").write_text(json.dumps(results))
    forged = whitebox_setting(parse_config(d), "fedora", 0, results)
    assert forged.claim_epsilon < 0.5 * setting.claim_epsilon
    assert main(["audit", "whitebox", str(run), "--method", "fedora", "--canaries", "100"]) == 2
    err = capsys.readouterr().err
    assert "ledgers/fedora/client-000.jsonl entry" in err
    assert "records DP-SGD noise_multiplier 1.5, the plan from config.toml gives 3" in err
    assert not (run / "audit" / "whitebox.json").exists()

    d["privacy"]["noise_multiplier"] = 1.5  # the noise as recorded, one round of two claimed
    d["training"]["rounds"] = 1
    (run / "config.toml").write_text(tomli_w.dumps(d))
    (run / "results.json").write_text(original)
    with pytest.raises(WhiteboxAuditError, match=r"ledgers/fedora/client-000.jsonl: the claim "
                       r"[0-9.]+ is below the epsilon [0-9.]+ of the DP-SGD releases it records"):
        audit_run_dir(run, method="fedora", num_canaries=100)
    whitebox.check_setting_against_ledger(setting, run)  # the run's own plan is its ledger's


def test_the_claim_of_a_client_not_drawn_every_round_matches_its_ledger(tmp_path):
    """The claim is the plan's worst case (drawn every round); with participation below 1 a
    client's ledger holds fewer DP-SGD releases, and the ledger check refused such honest runs
    as "the config is not this run's". It now refuses a claim above the ledger's epsilon only
    when the ledger holds every planned step, and never one below it."""
    from secure_fedora.runtimes.inprocess import Simulation

    d = {"name": "whitebox-partial", "methods": ["local"], "seed": 0,
         "data": {"num_clients": 4, "train_per_client": 32, "val_per_client": 8,
                  "test_per_client": 8},
         "training": {"rounds": 4, "local_epochs": 1, "batch_size": 16, "participation": 0.5},
         "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise_multiplier": 1.5,
                     "accountant": "rdp", "noise": "reproducible"}}
    cfg = parse_config(d)
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    drawn = []
    for i in range(4):
        setting = whitebox_setting(cfg, "local", i)
        entries = [json.loads(line) for line in
                   (run / "ledgers" / "local" / f"{setting.client_id}.jsonl").read_text().splitlines()]
        drawn.append(sum(e["mechanism"] == "dpsgd" for e in entries))
        whitebox.check_setting_against_ledger(setting, run)
    assert min(drawn) < 4  # some client was not drawn every round


@pytest.mark.parametrize("seed, absent", [(1105, "member"), (575, "member"), (386, "non-member")])
def test_an_evaluation_part_without_members_or_non_members_is_not_measurable(tmp_path, capsys,
                                                                             seed, absent):
    # 10 canaries at these seeds: 1105 draws no member at all (the member mean was NaN and
    # writing whitebox.json raised), 575 none in the evaluation part, 386 only members
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(tomli_w.dumps(_cfg_dict(3.0, noise="reproducible")))
    assert main(["audit", "whitebox", str(run), "--canaries", "10", "--seed", str(seed)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not measurable") and f"no {absent} canary" in err
    assert "\n" not in err and not (run / "audit" / "whitebox.json").exists()
    assert err.endswith("use more canaries (--canaries) or another seed (--seed)")
    # the Python API names its arguments
    with pytest.raises(WhiteboxAuditError, match=r"use more canaries \(the num_canaries= "
                                                 r"argument\) or another seed \(the seed= "
                                                 r"argument\)$"):
        whitebox.audit_run_dir(run, num_canaries=10, seed=seed)


@pytest.mark.parametrize("seed", [None, 1.5, "0", True])
def test_a_seed_that_is_not_an_integer_is_a_clear_error(seed):
    """torch's manual_seed raised a RuntimeError ('expected a long, but got NoneType')."""
    with pytest.raises(WhiteboxAuditError, match="seed must be an integer"):
        run_whitebox_audit(parse_config(_cfg_dict(3.0)), seed=seed)


@pytest.mark.parametrize("bad", [3, b"run", "", "a\x00b"])
def test_audit_run_dir_refuses_what_is_not_a_text_path(bad):
    with pytest.raises(WhiteboxAuditError, match="^run_dir "):
        audit_run_dir(bad)


def test_a_config_that_is_not_an_experimentconfig_or_an_out_of_range_seed_is_named():
    with pytest.raises(WhiteboxAuditError, match="^cfg must be an ExperimentConfig"):
        run_whitebox_audit(_cfg_dict(3.0))
    for seed in (-1, 2**64):
        with pytest.raises(WhiteboxAuditError, match="^seed must be an integer"):
            run_whitebox_audit(parse_config(_cfg_dict(3.0)), seed=seed)


def _two_client_local_dp_run(tmp_path, name: str) -> tuple[object, object, dict]:
    """A one-round DP run of Local on 2 clients (rdp, reproducible noise) in ``tmp_path/run``:
    its parsed config, run directory and results."""
    from secure_fedora.runtimes.inprocess import Simulation

    d = {"name": name, "methods": ["local"], "seed": 0,
         "data": {"num_clients": 2, "train_per_client": 32, "val_per_client": 8,
                  "test_per_client": 8},
         "training": {"rounds": 1, "local_epochs": 1, "batch_size": 16},
         "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "accountant": "rdp",
                     "noise": "reproducible"}}
    cfg = parse_config(d)
    run = tmp_path / "run"
    return cfg, run, Simulation(cfg, run, clients=build_clients(cfg)).run()


def test_a_run_states_its_noise_exactly_and_the_ledger_must_hold_that_float(tmp_path, capsys):
    """results.json's plan rounded the noise multiplier to 6 decimals and the audit matched
    it to the config and the ledger within 1e-5: a stated sigma other than the one drawn
    passed. A row marked ``"figures": "exact"`` must now be the ledger's float; a run written
    before the mark (6 decimals, no mark) is still audited."""

    cfg, run, results = _two_client_local_dp_run(tmp_path, "whitebox-exact")
    (row,) = results["privacy"]["local"]["plan"]
    ledger = [json.loads(line) for line in
              (run / "ledgers" / "local" / "client-000.jsonl").read_text().splitlines()]
    drawn = next(e["params"]["noise_multiplier"] for e in ledger if e["mechanism"] == "dpsgd")
    assert row["figures"] == "exact" and row["noise_multiplier"] == drawn
    assert round(drawn, 6) != drawn
    setting = whitebox_setting(cfg, "local", 0, results)
    assert setting.noise_stated and setting.noise_multiplier == drawn
    whitebox.check_setting_against_ledger(setting, run)

    old = {**row, "noise_multiplier": round(drawn, 6)}
    del old["figures"]  # a run written before the exact figures
    older = whitebox_setting(cfg, "local", 0, {"privacy": {"local": {"plan": [old]}}})
    assert not older.noise_stated and "6 decimals" in older.plan_source
    whitebox.check_setting_against_ledger(older, run)

    rounded = {"privacy": {"local": {"plan": [{**row, "noise_multiplier": round(drawn, 6)}]}}}
    with pytest.raises(WhiteboxAuditError, match="the config is not this run's"):
        whitebox_setting(cfg, "local", 0, rounded)
    off = math.nextafter(drawn, math.inf)
    nudged = whitebox_setting(cfg, "local", 0,
                              {"privacy": {"local": {"plan": [{**row, "noise_multiplier": off}]}}})
    with pytest.raises(WhiteboxAuditError, match=rf"records DP-SGD noise_multiplier {drawn!r},"
                       rf" the plan from config.toml gives {off!r} as results.json states it"):
        whitebox.check_setting_against_ledger(nudged, run)
    # the command line states the audited sigma exactly (it showed 4 significant digits)
    main(["audit", "whitebox", str(run), "--method", "local", "--canaries", "100"])
    assert f"DP-SGD sigma {drawn!r}, q 0.5," in capsys.readouterr().out



def _run_of_unregistered_method(tmp_path: Path, method: str) -> Path:
    """A run directory whose config.toml names ``method``, which no module has registered."""
    from tests.audits.conftest import CANARY_CONFIG

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(CANARY_CONFIG.replace('["local"]', f'["{method}"]'))
    return run

def test_an_entry_registered_by_the_runs_own_process_is_refused_saying_what_to_do(
        tmp_path, capsys):
    """The white-box and canary audits of a run directory build the run's data, model and
    privacy plan, so a method the run's own script registered (unknown to the audit's process)
    cannot be audited there; both said only "unknown method". They now name the entry and
    what to do (a module in secure_fedora/contrib/, or the audit's Python function called from
    the registering process), in one line, exit 2."""
    run = _run_of_unregistered_method(tmp_path, "byo_local_w")
    with pytest.raises(WhiteboxAuditError, match=r"names method 'byo_local_w', which this "
                       r"process has not registered .*secure_fedora/contrib/.*"
                       r"audits\.whitebox\.audit_run_dir"):
        audit_run_dir(run)
    for audit, call in (("whitebox", "audits.whitebox.audit_run_dir"),
                        ("canary", "audits.canary.run_canary_audit")):
        capsys.readouterr()
        assert main(["audit", audit, str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "method 'byo_local_w'" in err and call in err
    assert not (run / "audit").exists()


def test_a_bumped_plan_sigma_is_named_against_the_config_and_the_ledger(tmp_path, capsys):
    """results.json's plan row with its sigma bumped was refused as "the config is not this
    run's", though config.toml and the ledger agree: the message now names the three figures
    and the file that differs."""
    from secure_fedora.runtimes.inprocess import Simulation

    d = {"name": "whitebox-bumped", "methods": ["local"], "seed": 0,
         "data": {"num_clients": 2, "train_per_client": 32, "val_per_client": 8,
                  "test_per_client": 8},
         "training": {"rounds": 1, "local_epochs": 1, "batch_size": 16},
         "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "accountant": "rdp"}}
    cfg = parse_config(d)
    run = tmp_path / "run"
    results = Simulation(cfg, run, clients=build_clients(cfg)).run()
    (row,) = results["privacy"]["local"]["plan"]
    drawn = row["noise_multiplier"]
    row["noise_multiplier"] = bumped = drawn * 1.5
    (run / "results.json").write_text(json.dumps(results))
    assert main(["audit", "whitebox", str(run), "--method", "local", "--canaries", "100"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"results.json's plan states DP-SGD noise multiplier {bumped!r} for local at epsilon"
            f" 8, config.toml's calibration gives {drawn!r} and the client's ledger records"
            f" {drawn!r}: results.json's plan was changed") in err
    with pytest.raises(WhiteboxAuditError, match="the config is not this run's, or results.json's"
                                                 " plan was changed"):
        whitebox_setting(cfg, "local", 0, results)  # no ledger read: either may differ


def test_the_whitebox_audit_trains_on_training_threads_and_restores_the_process_s(monkeypatch):
    """The audit trained on the process's own torch thread count, not the run's
    ``training.threads`` (which in-process runs, sweeps and the canary audit hold)."""
    import torch

    import audits.whitebox as whitebox

    seen: list[int] = []
    real = whitebox.local_train

    def train(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(whitebox, "local_train", train)
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    doc = _cfg_dict(3.0)
    doc["training"] = {**doc["training"], "rounds": 2, "threads": wanted}
    run_whitebox_audit(parse_config(doc), num_canaries=100)
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == before


def _pem_private_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def test_private_keys_inside_the_run_are_refused_once_per_audit(tmp_path, capsys, monkeypatch):
    """`audit verify` and `audit replay` refuse a run holding private key material (whoever
    holds a signing key can re-sign its ledgers); `audit whitebox` checked the plan against
    that run's ledger without looking. It now refuses it alike, with one scan of the run per
    audit; a run without privacy whose only keys are its own envelope keys is audited with
    a warning, as `audit verify` warns."""
    import audits.verify as verify
    from secure_fedora.runtimes.inprocess import Simulation

    cfg = parse_config(_cfg_dict(3.0, noise="reproducible"))
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    scans = []
    scan = verify.private_key_files
    monkeypatch.setattr(verify, "private_key_files", lambda d: scans.append(d) or scan(d))
    audit_run_dir(run, num_canaries=100)  # its ledger verified, the plan checked against it
    assert scans == [run]
    (run / "audit" / "whitebox.json").unlink()

    (run / "notes").mkdir()
    (run / "notes" / "backup.txt").write_bytes(_pem_private_key())
    with pytest.raises(WhiteboxAuditError, match=r"^run directory .* is not trusted: 1 file"
                       r" holds private key material inside the audited directory"
                       r" \(notes/backup.txt\)"):
        audit_run_dir(run, num_canaries=100)
    capsys.readouterr()
    assert main(["audit", "whitebox", str(run), "--canaries", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes/backup.txt" in err
    assert not (run / "audit" / "whitebox.json").exists()

    plain = tmp_path / "plain"
    (plain / "keys").mkdir(parents=True)
    (plain / "config.toml").write_text(tomli_w.dumps(_cfg_dict(None)))
    (plain / "keys" / "client-000.ed25519.key").write_bytes(_pem_private_key())
    (note,) = audit_run_dir(plain, num_canaries=100)[0].unchecked
    assert "keys/client-000.ed25519.key" in note and "delete keys/*.key before sharing it" in note


def test_the_key_scans_warnings_are_printed_and_recorded_as_replay_does(tmp_path, capsys):
    """`audit whitebox` sent what the key scan could not check (a run without privacy keeping
    its envelope keys) through logging, without the `warning:` prefix with which `audit
    verify`, `canary` and `replay` print it, and whitebox.json did not record it. It is now a
    `warning:` line on stderr and whitebox.json's `unchecked`, as replay.json's."""
    plain = tmp_path / "plain"
    (plain / "keys").mkdir(parents=True)
    (plain / "config.toml").write_text(tomli_w.dumps(_cfg_dict(None)))
    (plain / "keys" / "client-000.ed25519.key").write_bytes(_pem_private_key())
    assert main(["audit", "whitebox", str(plain), "--canaries", "100"]) == 3  # no claim
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "keys/client-000.ed25519.key" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), err
    assert "delete keys/*.key before sharing it" in warnings[0]
    doc = json.loads((plain / "audit" / "whitebox.json").read_text())
    assert doc["unchecked"] == [warnings[0].removeprefix("warning: ")]
    # a run whose scan found nothing records that nothing was left unchecked
    (plain / "keys" / "client-000.ed25519.key").unlink()
    assert main(["audit", "whitebox", str(plain), "--canaries", "100"]) == 3
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((plain / "audit" / "whitebox.json").read_text())["unchecked"] == []


def test_import_registers_a_plug_in_method_before_the_config_is_read(tmp_path, capsys,
                                                                     monkeypatch):
    """`audit verify` and `audit report` take --import MODULE (a module the auditor trusts,
    imported first); `audit whitebox` and `audit canary` had no such option, so a run of a
    plug-in method could not be audited from the command line at all. They now take it,
    with the same name and semantics, and the refusal of an unknown method names it."""
    import sys

    from secure_fedora.core.registry import METHODS
    run = _run_of_unregistered_method(tmp_path, "byo_local_i")
    with pytest.raises(WhiteboxAuditError, match=r"method 'byo_local_i', which this process has"
                       r" not registered .*import its module first with the imports= argument"
                       r" of audits\.whitebox\.audit_run_dir"):
        audit_run_dir(run)
    for audit in ("whitebox", "canary"):
        capsys.readouterr()
        assert main(["audit", audit, str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "import its module first with --import" in err
        with pytest.raises(SystemExit):
            main(["audit", audit, "--help"])
        assert "--import MODULE" in capsys.readouterr().out
    assert main(["audit", "whitebox", str(run), "--import", "no_such_plugin_module"]) == 2
    assert "--import no_such_plugin_module: no module" in capsys.readouterr().err

    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "byo_local_i_module.py").write_text(
        "from secure_fedora.core.registry import METHODS\n"
        "METHODS.register('byo_local_i', METHODS.get('local'))\n")
    monkeypatch.syspath_prepend(str(trusted))
    try:
        code = main(["audit", "whitebox", str(run), "--import", "byo_local_i_module",
                     "--canaries", "100"])
        assert code in (0, 1, 3), capsys.readouterr().err
        assert json.loads((run / "audit" / "whitebox.json").read_text())["setup"]["method"] \
            == "byo_local_i"
        code = main(["audit", "canary", str(run), "--import", "byo_local_i_module",
                     "--method", "byo_local_i", "--canaries", "40"])
        assert code in (0, 1, 3), capsys.readouterr().err
        assert json.loads((run / "audit" / "canary.json").read_text())["setup"]["method"] \
            == "byo_local_i"
    finally:
        METHODS.unregister("byo_local_i")
        sys.modules.pop("byo_local_i_module", None)


def test_whitebox_and_canary_name_the_modules_they_imported(tmp_path, capsys, monkeypatch):
    """`audit verify --import` prints each module it imported (file, SHA-256, what it
    registered) and records it in its report; `audit whitebox` and `audit canary` imported
    them silently, so nothing showed that code from outside the toolkit ran during the audit.
    They now print the same line and record the same entry: whitebox.json (and its --json
    copy), canary.json and canary's --json."""
    import hashlib
    import sys

    from secure_fedora.core.registry import METHODS
    from tests.audits.conftest import CANARY_CONFIG

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(CANARY_CONFIG.replace('["local"]', '["byo_local_n"]'))
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    module_file = trusted / "byo_local_n_module.py"
    module_file.write_text("from secure_fedora.core.registry import METHODS\n"
                           "METHODS.register('byo_local_n', METHODS.get('local'))\n")
    digest = hashlib.sha256(module_file.read_bytes()).hexdigest()
    monkeypatch.syspath_prepend(str(trusted))
    line = (f"imported byo_local_n_module ({module_file}, sha256 {digest}): mechanisms none;"
            " config entries method 'byo_local_n'")
    try:
        for audit, flags in (("whitebox", ["--canaries", "100"]),
                             ("canary", ["--method", "byo_local_n", "--canaries", "40"])):
            capsys.readouterr()
            copy = tmp_path / f"{audit}-copy.json"
            code = main(["audit", audit, str(run), "--import", "byo_local_n_module", *flags,
                         "--json", str(copy)])
            out, err = capsys.readouterr()
            assert code in (0, 1, 3), err
            assert out.splitlines()[0] == line, out
            for path in (run / "audit" / f"{audit}.json", copy):
                (entry,) = json.loads(path.read_text())["imported"]
                assert entry["module"] == "byo_local_n_module" and entry["sha256"] == digest
                assert entry["file"] == str(module_file)
                assert entry["entries"] == ["method 'byo_local_n'"]
    finally:
        METHODS.unregister("byo_local_n")
        sys.modules.pop("byo_local_n_module", None)
    # without --import nothing is named, and the record says so
    capsys.readouterr()
    (run / "config.toml").write_text(CANARY_CONFIG)
    assert main(["audit", "whitebox", str(run), "--canaries", "100"]) in (0, 1, 3)
    assert "imported" not in capsys.readouterr().out
    assert json.loads((run / "audit" / "whitebox.json").read_text())["imported"] == []


def test_a_config_that_is_not_the_runs_is_refused_before_anything_trains(tmp_path, monkeypatch):
    """``run_whitebox_audit(cfg, run_dir=RUN)`` with another config than RUN's trained and
    bounded the wrong setting (the canary audit already refused it). It now refuses a config
    whose hash is not the ``config_hash`` RUN's results.json records (else config.toml's),
    as the canary audit does, before any data is built."""
    from secure_fedora.core.config import config_hash

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(tomli_w.dumps(_cfg_dict(3.0)))
    (run / "results.json").write_text(json.dumps(
        {"config_hash": config_hash(parse_config(_cfg_dict(3.0)))}))

    def no_training(*_args, **_kwargs):
        raise AssertionError("the audit built the data of a config that is not the run's")

    monkeypatch.setattr(whitebox, "build_clients", no_training)
    other = parse_config({**_cfg_dict(3.0), "seed": 7})
    with pytest.raises(WhiteboxAuditError, match=r"records config_hash .*: it is not the config"
                                                 r" this run ran"):
        run_whitebox_audit(other, run_dir=run, num_canaries=100)
    (run / "results.json").unlink()  # without results.json, config.toml decides
    with pytest.raises(WhiteboxAuditError, match=r"the config is not .*config.toml"):
        run_whitebox_audit(other, run_dir=run, num_canaries=100)
    assert not (run / "audit").exists()


def test_the_allowlist_of_a_folder_without_keys_is_given_with_allowlist(tmp_path, capsys):
    """`audit whitebox` had no --allowlist, while `audit replay` and `audit verify` have it: a
    Flower run's collected folder (no keys/ by design) could be audited only after copying
    the allowlist into it as keys/allowlist.json. It now takes --allowlist FILE (allowlist=
    in Python), checked as replay checks it: the ledger's signatures under that file, a
    published keys/allowlist.json that disagrees with it refused, a file that is no
    allowlist bad input (exit 2, nothing written)."""
    import shutil

    from privacy.identity import Identity, allowlist_bytes, load_allowlist

    cfg, run, _ = _two_client_local_dp_run(tmp_path, "whitebox-allowlist")
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    keys = load_allowlist(trusted)
    # the run's published allowlist naming another key for the audited client: refused
    (run / "keys" / "allowlist.json").write_bytes(allowlist_bytes(
        {**keys, "client-000": Identity.generate("client-000").public}))
    assert main(["audit", "whitebox", str(run), "--canaries", "100",
                 "--allowlist", str(trusted)]) == 2
    err = capsys.readouterr().err
    assert "lists other keys for 'client-000' than the given allowlist" in err
    shutil.rmtree(run / "keys")  # as a Flower run's collected folder
    assert main(["audit", "whitebox", str(run), "--canaries", "100"]) == 2
    err = capsys.readouterr().err
    assert "holds no keys/" in err and "with --allowlist" in err
    assert "keys/allowlist.json of that folder" not in err  # every command now takes the flag
    for bad in (b"", b"[]", b"\x00\xff\xfe binary"):
        (tmp_path / "bad.json").write_bytes(bad)
        assert main(["audit", "whitebox", str(run), "--allowlist",
                     str(tmp_path / "bad.json")]) == 2
        assert capsys.readouterr().err.startswith("error: --allowlist: ")
    other = tmp_path / "other.json"  # a valid allowlist registering other keys
    other.write_bytes(allowlist_bytes({p: Identity.generate(p).public for p in keys}))
    assert main(["audit", "whitebox", str(run), "--canaries", "100",
                 "--allowlist", str(other)]) == 2
    assert "fails verification" in capsys.readouterr().err
    assert not (run / "audit" / "whitebox.json").exists()
    code = main(["audit", "whitebox", str(run), "--canaries", "100", "--allowlist", str(trusted)])
    assert code in (0, 3)  # audited: the claim read from the ledger verified under the copy
    assert (run / "audit" / "whitebox.json").is_file()
    capsys.readouterr()
    result = run_whitebox_audit(cfg, num_canaries=100, run_dir=run, allowlist=trusted)
    assert result.setting.claim_epsilon is not None
    with pytest.raises(WhiteboxAuditError, match=r"the allowlist= argument checks .* run_dir="):
        run_whitebox_audit(cfg, num_canaries=100, allowlist=trusted)


def test_an_anchor_kept_apart_is_checked_as_verify_and_replay_check_it(tmp_path, capsys,
                                                                       monkeypatch):
    """`audit verify`, `report` and `replay` take --anchor FILE (a copy of the run's
    anchor.json kept apart); `audit whitebox` had no such flag, so a run edited after its
    anchor was audited. It now takes it (anchor= in Python), checked as replay checks it
    before anything trains: a run that does not match it is refused (exit 2, nothing
    written); a file that is no signed anchor is bad input, one line naming --anchor. With
    --allowlist too the run is scanned for keys once."""
    import shutil

    import audits.verify as verify

    cfg, run, _ = _two_client_local_dp_run(tmp_path, "whitebox-anchor")
    kept = tmp_path / "anchor-copy.json"
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run / "anchor.json", kept)
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    scans = []
    scan = verify.private_key_files
    monkeypatch.setattr(verify, "private_key_files", lambda d: scans.append(d) or scan(d))
    assert main(["audit", "whitebox", str(run), "--canaries", "100", "--anchor", str(kept),
                 "--allowlist", str(trusted)]) in (0, 3)
    assert scans == [run]  # one scan, whose check check_anchor would otherwise repeat
    assert (run / "audit" / "whitebox.json").is_file()
    (run / "audit" / "whitebox.json").unlink()
    capsys.readouterr()

    unsigned = json.loads(kept.read_text())
    unsigned["signature"] = "00" * 64
    bad_copies = {"missing": tmp_path / "absent.json", "empty": b"", "list": b"[]",
                  "binary": b"\x00\xff\xfe\x80 binary", "unsigned": json.dumps(unsigned).encode()}
    for name, content in bad_copies.items():
        bad = content if isinstance(content, Path) else tmp_path / f"{name}.json"
        if not isinstance(content, Path):
            bad.write_bytes(content)
        assert main(["audit", "whitebox", str(run), "--canaries", "100",
                     "--anchor", str(bad)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --anchor: anchor {bad}"), err
        assert err.endswith("(give the anchor.json kept apart)\n"), err
        with pytest.raises(WhiteboxAuditError, match=r"^the anchor= argument: "):
            audit_run_dir(run, num_canaries=100, anchor=bad)
    assert not (run / "audit" / "whitebox.json").exists()

    results = json.loads((run / "results.json").read_text())
    results["note"] = "edited after the run"  # config_hash unchanged: only the anchor tells
    (run / "results.json").write_text(json.dumps(results))
    assert main(["audit", "whitebox", str(run), "--canaries", "100"]) in (0, 3)
    (run / "audit" / "whitebox.json").unlink()
    capsys.readouterr()
    assert main(["audit", "whitebox", str(run), "--canaries", "100", "--anchor", str(kept)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the run does not match the anchor {kept}" in err
    assert "results.json" in err
    assert not (run / "audit" / "whitebox.json").exists()
    with pytest.raises(WhiteboxAuditError, match="the run does not match the anchor"):
        run_whitebox_audit(cfg, num_canaries=100, run_dir=run, anchor=kept)
    with pytest.raises(WhiteboxAuditError, match=r"the anchor= argument checks .* run_dir="):
        run_whitebox_audit(cfg, num_canaries=100, anchor=kept)


def test_the_audited_ledger_and_the_given_allowlist_are_read_once(tmp_path, monkeypatch):
    """The white-box audit read and verified the audited client's ledger twice (once for the
    noise it records, once to check the plan against it), and `audit_run_dir(allowlist=)`
    loaded the given allowlist twice (before reading the run, and again in the audit). Each
    is now done once, with the same checks."""
    import shutil

    cfg, run, _ = _two_client_local_dp_run(tmp_path, "whitebox-once")
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    reads, loads = [], []
    read, load = whitebox.verified_ledger_entries, whitebox.load_given_allowlist
    monkeypatch.setattr(whitebox, "verified_ledger_entries",
                        lambda *a, **k: reads.append(a) or read(*a, **k))
    monkeypatch.setattr(whitebox, "load_given_allowlist",
                        lambda *a, **k: loads.append(a) or load(*a, **k))
    result, _ = audit_run_dir(run, num_canaries=100, allowlist=trusted)
    assert result.setting.noise_stated
    assert len(reads) == 1 and len(loads) == 1
    reads.clear()
    run_whitebox_audit(cfg, num_canaries=100, run_dir=run)
    assert len(reads) == 1



def test_whitebox_loads_the_allowlist_and_anchor_kept_apart_once(tmp_path, monkeypatch):
    """`audit whitebox --allowlist --anchor` loaded the anchor copy before reading the run,
    again in the anchor's check and once more in its comparison with the run, and the
    allowlist before reading the run, again in the anchor's check and again for the ledger.
    Each is now loaded once."""
    import shutil

    import audits.verify as verify

    _, run, _ = _two_client_local_dp_run(tmp_path, "whitebox-load-once")
    kept = tmp_path / "anchor-copy.json"
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run / "anchor.json", kept)
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    loads: list[Path] = []
    load_allowlist, load_anchor = verify.load_allowlist, verify._load_anchor
    monkeypatch.setattr(verify, "load_allowlist",
                        lambda p: loads.append(Path(p)) or load_allowlist(p))
    monkeypatch.setattr(verify, "_load_anchor", lambda p: loads.append(Path(p)) or load_anchor(p))
    result, _ = audit_run_dir(run, num_canaries=100, allowlist=trusted, anchor=kept)
    assert result.setting.noise_stated
    assert loads.count(trusted) == 1 and loads.count(kept) == 1, loads

def test_check_setting_against_ledger_scans_the_run_itself(tmp_path):
    """`check_setting_against_ledger` trusted its caller to have scanned the run for private
    keys (with allowlist= it skipped the scan; without, it never made one): a direct call
    trusted a ledger that a key lying inside the run could have re-signed. It now refuses
    such a run by itself, with allowlist= and without; the audit still scans once."""
    import shutil

    cfg, run, results = _two_client_local_dp_run(tmp_path, "whitebox-public")
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    setting = whitebox_setting(cfg, "local", 0, results)
    (run / "notes").mkdir()
    (run / "notes" / "backup.txt").write_bytes(_pem_private_key())
    for allowlist in (None, trusted):
        with pytest.raises(WhiteboxAuditError, match=r"is not trusted: 1 file holds private"
                           r" key material inside the audited directory \(notes/backup.txt\)"):
            whitebox.check_setting_against_ledger(setting, run, allowlist=allowlist)
    (run / "notes" / "backup.txt").unlink()
    # nothing left unchecked: the scan's warnings are returned for the caller to show
    assert whitebox.check_setting_against_ledger(setting, run) == []
    assert whitebox.check_setting_against_ledger(setting, run, allowlist=trusted) == []


def test_a_refused_canary_step_counts_no_inclusion():
    """The canaries of a step count as included only once its gradient is made: a step the
    DP-SGD oracle refuses leaves the inclusion counts as they were."""
    from privacy.dpsgd import DPSGDError
    from privacy.noise import ReproducibleNoise

    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    inner = DPGradient(model, 1.0, 1.0, 4.0, ReproducibleNoise(0))
    oracle = DiracCanaryOracle(inner, torch.tensor([0, 5]), 1.0, 21, plain_rate=0.5,
                               canary_generator=torch.Generator())
    x, y = torch.zeros(4, 6), torch.zeros(4, dtype=torch.int64)
    index = next(iter(oracle.batches(4, 1, torch.Generator())))  # rate 1: both canaries
    with pytest.raises(DPSGDError, match="samples"):
        oracle.gradient(model, x[index], y[:1], torch.zeros(21))
    assert oracle.inclusions.tolist() == [0, 0]
    oracle.gradient(model, x[index], y[index], torch.zeros(21))
    assert oracle.inclusions.tolist() == [1, 1]
