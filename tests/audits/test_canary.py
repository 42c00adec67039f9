"""Canary audit: Clopper-Pearson statistics, canaries, and the bound on real DP / non-DP runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from audits.canary import (
    CanaryAuditError,
    _ledger_claim,
    _mislabeled_pool,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lower_bound,
    insert_canaries,
    make_canaries,
    run_canary_audit,
    split_audit,
)
from secure_fedora.core.config import parse_config
from secure_fedora.data.partition import ClientData
from secure_fedora.runtimes.inprocess import build_clients
from tests.audits.conftest import CANARY_CONFIG, canary_run_dir


def test_clopper_pearson_closed_forms():
    # k = n: lower bound alpha^(1/n); k = 0: upper bound 1 - alpha^(1/n)
    assert clopper_pearson_lower(20, 20, 0.025) == pytest.approx(0.025 ** (1 / 20))
    assert clopper_pearson_upper(0, 20, 0.025) == pytest.approx(1 - 0.025 ** (1 / 20))
    assert clopper_pearson_lower(0, 20, 0.025) == 0.0
    assert clopper_pearson_upper(20, 20, 0.025) == 1.0
    lo, hi = clopper_pearson_lower(30, 100, 0.05), clopper_pearson_upper(30, 100, 0.05)
    assert lo < 0.3 < hi
    with pytest.raises(CanaryAuditError):
        clopper_pearson_lower(5, 4, 0.05)
    with pytest.raises(CanaryAuditError):
        clopper_pearson_upper(1, 4, 1.5)


def test_epsilon_lower_bound_values():
    perfect = epsilon_lower_bound(50, 50, 0, 50, delta=0.0, confidence=0.95)
    a = 0.025 ** (1 / 50)
    assert perfect.epsilon_lower_bound == pytest.approx(math.log(a / (1 - a)))
    assert perfect.direction in ("tpr/fpr", "tnr/fnr")
    chance = epsilon_lower_bound(25, 50, 25, 50, delta=1e-5)
    assert chance.epsilon_lower_bound == 0.0 and chance.direction == "none"
    # an attack that says "member" for almost nobody, but is right when it does
    few = epsilon_lower_bound(20, 100, 0, 100, delta=1e-5)
    assert few.direction == "tpr/fpr" and few.epsilon_lower_bound > 0
    # the mirror image is caught by the second inequality (TNR <= e^eps FNR + delta)
    mirror = epsilon_lower_bound(100, 100, 80, 100, delta=1e-5)
    assert mirror.direction == "tnr/fnr"
    assert mirror.epsilon_lower_bound == pytest.approx(few.epsilon_lower_bound, rel=1e-9)
    # more delta can only lower the bound
    assert epsilon_lower_bound(50, 50, 0, 50, delta=0.1).epsilon_lower_bound < \
        perfect.epsilon_lower_bound
    for bad in (dict(members=0), dict(delta=1.0), dict(confidence=1.0)):
        args = dict(true_positives=0, members=10, false_positives=0, non_members=10,
                    delta=1e-5, confidence=0.95)
        args.update(bad)
        with pytest.raises(CanaryAuditError):
            epsilon_lower_bound(**args)


def test_bound_holds_at_its_confidence_for_a_true_eps_dp_mechanism():
    """Randomized response is exactly eps-DP per canary: the bound must exceed eps in at most
    about 5% of audits at confidence 0.95 (we allow 8% for sampling error of 300 trials)."""
    eps = 1.0
    p_correct = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(0)
    violations = 0
    trials = 300
    for _ in range(trials):
        members = rng.random(400) < 0.5
        correct = rng.random(400) < p_correct
        guess = np.where(correct, members, ~members)
        tp = int((guess & members).sum())
        fp = int((guess & ~members).sum())
        b = epsilon_lower_bound(tp, int(members.sum()), fp, int((~members).sum()), 0.0, 0.95)
        violations += b.epsilon_lower_bound > eps
    assert violations / trials <= 0.08
    # and the audit is not vacuous: a leakier (eps = 3) mechanism is detected as such
    p3 = math.exp(3.0) / (1 + math.exp(3.0))
    members = rng.random(2000) < 0.5
    guess = np.where(rng.random(2000) < p3, members, ~members)
    b = epsilon_lower_bound(int((guess & members).sum()), int(members.sum()),
                            int((guess & ~members).sum()), int((~members).sum()), 0.0, 0.95)
    assert 1.5 < b.epsilon_lower_bound <= 3.0


def test_split_audit_uses_only_the_evaluation_half():
    gen = torch.Generator().manual_seed(3)
    member = torch.rand(200, generator=gen) < 0.5
    scores = member.double() * 5 + torch.randn(200, generator=gen, dtype=torch.float64)
    sa = split_audit(scores, member, delta=1e-5, confidence=0.95, seed=1)
    assert sa.calibration_size == 100 and sa.evaluation_size == 100
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    ev = perm[100:]
    guess = scores[ev] >= sa.bound.threshold
    assert sa.bound.true_positives == int((guess & member[ev]).sum())
    assert sa.bound.false_positives == int((guess & ~member[ev]).sum())
    assert sa.bound.members + sa.bound.non_members == 100
    assert sa.bound.epsilon_lower_bound > 1.0
    with pytest.raises(CanaryAuditError, match="no members"):
        split_audit(scores, torch.zeros(200, dtype=torch.bool), delta=1e-5)
    with pytest.raises(CanaryAuditError, match="bool"):
        split_audit(scores, member.long(), delta=1e-5)
    with pytest.raises(CanaryAuditError, match="NaN"):
        split_audit(scores * math.nan, member, delta=1e-5)


def _client(n: int = 10) -> ClientData:
    x = torch.rand(n, 1, 28, 28)
    y = torch.arange(n) % 10
    return ClientData(0, x, y, x[:4].clone(), y[:4].clone(), x[:3].clone(), y[:3].clone(),
                      {"label_histogram": torch.bincount(y, minlength=10).tolist()})


def test_canaries_are_deterministic_and_inserted_with_probability_half():
    a = make_canaries("noise", 400, seed=5)
    b = make_canaries("noise", 400, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.member, b.member)
    assert 150 < int(a.member.sum()) < 250
    pool = (torch.rand(50, 1, 28, 28), torch.arange(50) % 10)
    mis = make_canaries("mislabeled", 40, seed=1, pool=pool)
    assert torch.equal(mis.x, pool[0][:40]) and bool((mis.y != pool[1][:40]).all())
    client = _client()
    with_c = insert_canaries(client, a)
    assert with_c.num_train == client.num_train + int(a.member.sum())
    assert torch.equal(with_c.val_x, client.val_x) and torch.equal(with_c.test_y, client.test_y)
    assert sum(with_c.meta["label_histogram"]) == with_c.num_train
    assert with_c.meta["canaries_inserted"] == int(a.member.sum())
    with pytest.raises(CanaryAuditError, match="kind"):
        make_canaries("blue", 10, 0)
    with pytest.raises(CanaryAuditError, match="count"):
        make_canaries("noise", 2, 0)
    # unbounded before: 10**9 canaries grew past 4 GB and died in the allocator
    with pytest.raises(CanaryAuditError, match=r"\[4, 100,000\] \(the count= argument\)"):
        make_canaries("noise", 10**9, 0)
    with pytest.raises(CanaryAuditError, match=r"\[4, 100,000\] \(--canaries\)"):
        make_canaries("noise", 10**9, 0, count_option="--canaries")
    wide = (torch.zeros(2, 3, 512, 512), torch.zeros(2, dtype=torch.long))
    with pytest.raises(CanaryAuditError, match="limit 268,435,456"):
        make_canaries("noise", 1000, 0, like=wide)
    with pytest.raises(CanaryAuditError, match="pool"):
        make_canaries("mislabeled", 10, 0)
    small = make_canaries("noise", 8, 0)
    bad = type(small)(small.x[:, :, :14, :14].contiguous(), small.y, small.member, "noise")
    with pytest.raises(CanaryAuditError, match="do not match"):
        insert_canaries(client, bad)


def _cfg(private: bool, rounds: int, lr: float):
    d = {"methods": ["local"],
         "data": {"num_clients": 2, "train_per_client": 128, "val_per_client": 16,
                  "test_per_client": 16},
         "training": {"rounds": rounds, "local_epochs": 2, "batch_size": 32, "lr": lr}}
    if private:
        d["privacy"] = {"enabled": True, "epsilon": 1.0, "delta": 1e-5}
    return parse_config(d)


def test_bound_is_below_the_claim_on_dp_and_clearly_above_it_without_dp():
    dp = run_canary_audit(_cfg(True, rounds=5, lr=0.01), num_canaries=300)
    assert dp.private and dp.dp_source.startswith("ledger ledgers/local/client-000.jsonl")
    assert dp.claimed_epsilon == pytest.approx(1.0, rel=0.02)  # calibrated to the budget
    assert dp.epsilon_lower_bound < dp.claimed_epsilon and dp.consistent
    assert dp.rounds_scored == 5 and 1 <= dp.selected_round <= 5  # every round's release
    plain = run_canary_audit(_cfg(False, rounds=15, lr=0.05), num_canaries=300)
    assert not plain.private and math.isinf(plain.claimed_epsilon)
    # memorized canaries: members have far lower loss than non-members
    assert plain.member_mean_score > plain.non_member_mean_score + 1.0
    assert plain.epsilon_lower_bound > 2 * dp.claimed_epsilon
    doc = plain.to_json()
    assert doc["claimed_epsilon"] == "inf"
    json.dumps(doc, allow_nan=False)
    json.dumps(dp.to_json(), allow_nan=False)


def test_canary_audit_argument_errors():
    cfg = _cfg(False, rounds=1, lr=0.05)
    with pytest.raises(CanaryAuditError, match="not in the config's methods"):
        run_canary_audit(cfg, method="fedora")
    with pytest.raises(CanaryAuditError, match="client_index"):
        run_canary_audit(cfg, client_index=2)
    # torch's manual_seed raised a RuntimeError ('expected a long, but got NoneType')
    for seed in (None, 1.5, "0", True):
        with pytest.raises(CanaryAuditError, match="seed must be an integer"):
            run_canary_audit(cfg, seed=seed)
    # a Python caller is told its argument, not the CLI's flag (--canaries)
    with pytest.raises(CanaryAuditError, match=r"\(the num_canaries= argument\), got 2$"):
        run_canary_audit(cfg, num_canaries=2)


def test_cli_canary_errors_name_its_flags(tmp_path, capsys):
    from secure_fedora.cli import main

    run = canary_run_dir(tmp_path)
    assert main(["audit", "canary", str(run), "--canaries", "2"]) == 2
    assert "(--canaries), got 2" in capsys.readouterr().err


def test_a_bad_seed_names_its_flag_or_argument(tmp_path, capsys):
    """The seed error names --seed on the command line and seed= in Python, as whitebox's and
    replay's do."""
    from secure_fedora.cli import main

    run = canary_run_dir(tmp_path)
    assert main(["audit", "canary", str(run), "--seed", "-1"]) == 2
    assert "(--seed), got -1" in capsys.readouterr().err
    cfg = _cfg(False, rounds=1, lr=0.05)
    for call in (lambda: run_canary_audit(cfg, seed=-1),
                 lambda: make_canaries("noise", 10, -1),
                 lambda: split_audit(torch.randn(40), torch.arange(40) % 2 == 0, 1e-5, seed=-1)):
        with pytest.raises(CanaryAuditError, match=r"\(the seed= argument\), got -1$"):
            call()


@pytest.mark.parametrize("kwargs, match", [
    ({"confidence": 2.0}, "confidence must be in"), ({"confidence": None}, "confidence must be in"),
    ({"delta": ""}, "delta must be in"), ({"delta": [1e-5]}, "delta must be in"),
    ({"delta": 1.0}, "delta must be in")])
def test_a_bad_confidence_or_delta_is_refused_before_the_federation_trains(monkeypatch, kwargs,
                                                                           match):
    """They were checked only by the bound, after the whole federation had trained (delta ''
    of a non-private run: a bare ValueError there, 'could not convert string to float')."""
    import audits.canary as canary

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the federation was built before the arguments were checked")

    monkeypatch.setattr(canary, "build_clients", no_training)
    with pytest.raises(CanaryAuditError, match=match):
        run_canary_audit(_cfg(False, rounds=1, lr=0.05), **kwargs)


def test_ledger_claim_refuses_refused_clients_and_missing_ledgers(pristine_run):
    eps, delta, n = _ledger_claim(pristine_run, "fedora", "client-000")
    assert eps > 0 and delta == 1e-5 and n == 10  # 9 releases and the close entry
    with pytest.raises(CanaryAuditError, match="refused"):
        _ledger_claim(pristine_run, "fedora", "client-002")
    with pytest.raises(CanaryAuditError, match="no ledger"):
        _ledger_claim(pristine_run, "fedavg", "client-000")


def test_mislabeled_pool_uses_unused_test_images_rotated_like_the_client():
    cfg = parse_config({"data": {"num_clients": 4, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 2000}})
    clients = build_clients(cfg)
    x, y = _mislabeled_pool(cfg, clients, 1, 100)
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert clients[1].meta["rotation_degrees"] == 90.0
    # rotated by 90 degrees: the pooled images' mass sits where client 1's images have theirs
    own = clients[1].test_x.mean(dim=0).flatten()
    assert torch.nn.functional.cosine_similarity(x.mean(dim=0).flatten(), own, dim=0) > 0.9
    canaries = make_canaries("mislabeled", 100, seed=0, pool=(x, y))
    assert bool((canaries.y != y).all())
    with pytest.raises(CanaryAuditError, match="unused by the clients"):
        _mislabeled_pool(cfg, clients, 1, 2001)


def test_certifiable_maximum_is_the_perfect_attackers_bound_in_closed_form():
    from audits.canary import certifiable_maximum
    a = 0.05 / 2  # each one-sided interval at half the error
    closed = math.log((a ** (1 / 75) - 1e-5) / (1 - a ** (1 / 75)))
    assert certifiable_maximum(75, 75, 1e-5, 0.95) == pytest.approx(closed, rel=1e-9)
    assert 2.9 < closed < 3.1  # 300 canaries: the "about 3.0-3.1"
    values = [certifiable_maximum(n, n, 1e-5) for n in (10, 75, 500, 5000)]
    assert all(b > a_ for a_, b in zip(values, values[1:], strict=False))


def _synthetic_result(claim: float, separation: float):
    from audits.canary import CanaryAuditResult
    gen = torch.Generator().manual_seed(0)
    member = torch.rand(300, generator=gen) < 0.5
    scores = member.double() * separation + torch.randn(300, generator=gen, dtype=torch.float64)
    sa = split_audit(scores, member, delta=1e-5, seed=1)
    return CanaryAuditResult(
        client_index=0, client_id="client-000", method="local", canary_kind="noise",
        num_canaries=300, members=int(member.sum()), private=math.isfinite(claim),
        claimed_epsilon=claim, delta=1e-5, confidence=0.95,
        epsilon_lower_bound=sa.bound.epsilon_lower_bound, bound=sa.bound,
        calibration_size=sa.calibration_size, evaluation_size=sa.evaluation_size,
        calibration_epsilon=sa.calibration_epsilon, member_mean_score=0.0,
        non_member_mean_score=0.0, dp_source="test", certifiable_max=sa.certifiable_max)


def test_verdicts_with_300_canaries():
    weak = _synthetic_result(8.0, 0.5)
    assert weak.certifiable_max < 3.2 and weak.verdict == "inconclusive" and not weak.consistent
    doc = weak.to_json()
    assert doc["audit"] == "canary" and doc["claim_epsilon"] == 8.0
    assert doc["verdict_text"].startswith("inconclusive: the audit cannot certify epsilon above")
    assert doc["certifiable_max"] == weak.certifiable_max and doc["setup"]["num_canaries"] == 300
    assert _synthetic_result(1.0, 0.5).verdict == "consistent"
    strong = _synthetic_result(0.5, 8.0)  # a release far leakier than claimed
    assert strong.refuted and strong.to_json()["verdict"] == "refuted"
    plain = _synthetic_result(math.inf, 8.0).to_json()
    assert plain["claim_epsilon"] is None and plain["claimed_epsilon"] == "inf"
    assert plain["verdict"] == "inconclusive"
    json.dumps(plain, allow_nan=False)


def test_round_selection_uses_only_the_calibration_half():
    from audits.canary import split_audit_rounds
    gen = torch.Generator().manual_seed(4)
    member = torch.rand(400, generator=gen) < 0.5
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(1))
    cal, ev = perm[:200], perm[200:]
    # round 0: informative on the evaluation half only; round 1: on the calibration half only
    leak_ev = torch.randn(400, generator=gen, dtype=torch.float64)
    leak_ev[ev] += 6.0 * member[ev].double()
    leak_cal = torch.randn(400, generator=gen, dtype=torch.float64)
    leak_cal[cal] += 6.0 * member[cal].double()
    sa, chosen = split_audit_rounds([leak_ev, leak_cal], member, 1e-5, seed=1)
    assert chosen == 1  # picked on calibration evidence, whatever the evaluation half says
    assert sa.bound == split_audit(leak_cal, member, 1e-5, seed=1).bound
    assert sa.bound.epsilon_lower_bound < 1.0
    with pytest.raises(CanaryAuditError, match="no scores"):
        split_audit_rounds([], member, 1e-5)


def test_noise_canaries_take_the_shape_range_and_label_space_of_the_client():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 12, generator=g) * 2.0
    labels = torch.randint(0, 3, (50,), generator=g)
    c = make_canaries("noise", 64, seed=1, like=(table, labels), num_classes=3)
    assert c.x.shape == (64, 12) and c.y.dtype == torch.int64
    assert float(c.x.min()) >= float(table.min()) and float(c.x.max()) <= float(table.max())
    assert float(c.x.min()) < 0.0  # spread over the data's range, not [0, 1]
    assert set(c.y.tolist()) == {0, 1, 2}
    images = torch.rand(10, 1, 28, 28, generator=g)  # inputs in [0, 1]: the default canaries
    same = make_canaries("noise", 64, seed=1, like=(images, torch.zeros(10, dtype=torch.long)))
    assert torch.equal(same.x, make_canaries("noise", 64, seed=1).x)
    targets = (torch.rand(50, 4, generator=g) > 0.5).float()  # multi-label
    multi = make_canaries("noise", 64, seed=2, like=(table, targets), num_classes=4)
    assert multi.y.shape == (64, 4) and multi.y.dtype == torch.float32
    assert set(multi.y.unique().tolist()) == {0.0, 1.0}
    client = ClientData("client-000", table[:40], labels[:40], table[40:45], labels[40:45],
                        table[45:], labels[45:])
    with pytest.raises(CanaryAuditError, match="canary labels"):
        insert_canaries(client, multi)
    with pytest.raises(CanaryAuditError, match="num_classes"):
        make_canaries("noise", 8, seed=0, num_classes=1)


def test_canary_audit_on_tabular_data_from_a_source(tmp_path):
    """A data.source table and a binary BCE model: noise canaries shaped like its rows; the
    mislabeled kind (built-in images) is refused by name."""
    from secure_fedora.core.config import load_config

    (tmp_path / "canary_table.py").write_text(
        "import torch\n\n\n"
        "def load(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x = torch.randn(200, 6, generator=g)\n"
        "    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()\n"
        "    return {'x_train': x[:160], 'y_train': y[:160], 'x_test': x[160:], 'y_test': y[160:],\n"
        "            'num_classes': 2}\n"
        "\n\n"
        "def mlp(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))\n")
    (tmp_path / "table.toml").write_text(
        'name = "table"\nmethods = ["local"]\n'
        '[data]\nsource = "canary_table:load"\npartition = "iid"\nnum_clients = 2\n'
        'train_per_client = 48\nval_per_client = 16\ntest_per_client = 16\n'
        '[model]\nfactory = "canary_table:mlp"\n'
        '[training]\nloss = "bce"\nrounds = 2\nlocal_epochs = 2\nbatch_size = 16\nlr = 0.1\n')
    cfg = load_config(tmp_path / "table.toml")
    result = run_canary_audit(cfg, num_canaries=40)
    assert result.num_canaries == 40 and not result.private and result.rounds_scored == 2
    assert math.isfinite(result.member_mean_score) and math.isfinite(result.non_member_mean_score)
    with pytest.raises(CanaryAuditError, match="with data.source use kind 'noise'"):
        run_canary_audit(cfg, num_canaries=40, kind="mislabeled")


def _last_entry_with(path, **change) -> bytes:
    """The ledger's last line re-serialized canonically with ``change`` applied (None: the
    field removed): well-formed JSON whose signature no longer verifies."""
    last = json.loads(path.read_bytes().splitlines()[-1])
    for key, value in change.items():
        if value is None:
            last.pop(key)
        else:
            last[key] = value
    return json.dumps(last, sort_keys=True, separators=(",", ":")).encode()


_MALFORMED_LAST_LINES = {
    "not_json": lambda p: b"{not json",
    "array": lambda p: b"[1,2]",
    "binary": lambda p: b"\xff\xfe\x00\x81\x9cbinary",
    "missing_epsilon_after": lambda p: _last_entry_with(p, epsilon_after=None),
    "string_epsilon_after": lambda p: _last_entry_with(p, epsilon_after="1.5"),
    "string_delta": lambda p: _last_entry_with(p, delta="1e-5"),
    "nan_epsilon_after": lambda p: _last_entry_with(p, epsilon_after=math.nan),
    "forged_smaller_claim": lambda p: _last_entry_with(p, epsilon_after=0.01),
}


def _corrupt_ledger(path, case: str) -> None:
    lines = path.read_bytes().splitlines()
    lines[-1] = _MALFORMED_LAST_LINES[case](path)
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("case", sorted(_MALFORMED_LAST_LINES))
def test_ledger_claim_trusts_only_a_verified_ledger(run_copy, case):
    """Malformed or edited ledgers were tracebacks (JSONDecodeError, AttributeError,
    UnicodeDecodeError, KeyError) or claims taken as read ("1.5", NaN, a forged 0.01)."""
    path = run_copy / "ledgers" / "fedora" / "client-000.jsonl"
    _corrupt_ledger(path, case)
    with pytest.raises(CanaryAuditError, match="fails verification") as info:
        _ledger_claim(run_copy, "fedora", "client-000")
    assert "\n" not in str(info.value)


def test_ledger_claim_needs_the_runs_keys_and_a_non_empty_ledger(run_copy):
    path = run_copy / "ledgers" / "fedora" / "client-000.jsonl"
    (run_copy / "keys" / "allowlist.json").write_text("{not json")
    with pytest.raises(CanaryAuditError, match="cannot verify"):
        _ledger_claim(run_copy, "fedora", "client-000")
    path.write_bytes(b"")
    with pytest.raises(CanaryAuditError):
        _ledger_claim(run_copy, "fedora", "client-000")


@pytest.mark.parametrize("case", ["not_json", "nan_epsilon_after"])
def test_cli_canary_on_a_malformed_ledger_is_one_error_line(tmp_path, monkeypatch, capsys, case):
    """``audit canary`` reads the ledger its own run wrote: an unverifiable one is exit 2 with
    one ``error:`` line, no verdict and no canary.json."""
    import audits.canary as canary
    from secure_fedora.cli import main

    class CorruptingSimulation(canary.Simulation):
        def run_method(self, name):
            out = super().run_method(name)
            _corrupt_ledger(self.run_dir / "ledgers" / name / "client-000.jsonl", case)
            return out

    monkeypatch.setattr(canary, "Simulation", CorruptingSimulation)
    run = canary_run_dir(tmp_path)
    assert main(["audit", "canary", str(run), "--canaries", "40"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "fails verification" in err[0]
    assert "Traceback" not in captured.err and "verdict" not in captured.out
    assert not (run / "audit" / "canary.json").exists()


@pytest.mark.parametrize("bad", [3, b"work", "", "a\x00b"])
def test_a_work_dir_that_is_not_a_text_path_is_refused_before_training(bad):
    with pytest.raises(CanaryAuditError, match="^work_dir "):
        run_canary_audit(_cfg(False, rounds=1, lr=0.1), num_canaries=10, work_dir=bad)


@pytest.mark.parametrize("bad", ["no", 1, 0, None])
def test_every_round_must_be_a_bool(bad):
    with pytest.raises(CanaryAuditError, match="^every_round must be True or False"):
        run_canary_audit(_cfg(False, rounds=1, lr=0.1), num_canaries=10, every_round=bad)


def test_wrong_argument_types_are_canary_audit_errors_naming_them():
    """A dict config raised AttributeError ('dict' object has no attribute 'methods'), a seed
    that is not an int torch's RuntimeError, a str calibration fraction a '<' TypeError; a
    negative seed was taken."""
    with pytest.raises(CanaryAuditError, match="^cfg must be an ExperimentConfig"):
        run_canary_audit({"methods": ["local"]})
    for seed in ("0", None, 1.5, -1, 2**64):
        with pytest.raises(CanaryAuditError, match="^seed must be an integer"):
            make_canaries("noise", 10, seed)
        with pytest.raises(CanaryAuditError, match="^seed must be an integer"):
            run_canary_audit(_cfg(False, rounds=1, lr=0.1), seed=seed)
    scores, member = torch.randn(40), torch.arange(40) % 2 == 0
    with pytest.raises(CanaryAuditError, match="^seed must be an integer"):
        split_audit(scores, member, 1e-5, seed="0")
    for fraction in ("0.5", None, math.nan):
        with pytest.raises(CanaryAuditError, match="^calibration_fraction must be in"):
            split_audit(scores, member, 1e-5, calibration_fraction=fraction)


def test_counts_beyond_int64_are_canary_audit_errors_naming_them():
    """Python ints beyond int64 (1e30 canaries) raised scipy's "ufunc '_beta_ppf' not
    supported" TypeError; int64's largest count still works."""
    from audits.canary import certifiable_maximum

    big = 10**30
    for call, name in ((lambda: clopper_pearson_lower(big // 2, big, 0.05), "n"),
                       (lambda: clopper_pearson_upper(big // 2, big, 0.05), "n"),
                       (lambda: certifiable_maximum(big, 10, 1e-5), "members"),
                       (lambda: epsilon_lower_bound(5, 10, 0, big, 1e-5), "non_members")):
        with pytest.raises(CanaryAuditError, match=f"^{name} must be an integer in \\[0, 2\\*\\*63\\)"):
            call()
    with pytest.raises(CanaryAuditError, match="^need integers 0 <= false_positives <= non_members"):
        epsilon_lower_bound(5, 10, 11, 10, 1e-5)
    assert 0.49 < clopper_pearson_lower(2**62, 2**63 - 1, 0.05) < 0.5


@pytest.mark.parametrize("rounds", [torch.randn(2, 40), torch.randn(0, 40),
                                    np.random.default_rng(0).normal(size=(2, 40)), "scores"])
def test_split_audit_rounds_refuses_scores_that_are_not_a_sequence(rounds):
    """A (rounds x canaries) tensor or array raised torch's/numpy's "Boolean value of Tensor
    with more than one value is ambiguous" from `if not scores_by_round`."""
    from audits.canary import CanaryAuditError, split_audit_rounds

    member = torch.arange(40) % 2 == 0
    with pytest.raises(CanaryAuditError, match="^scores_by_round must be a sequence"):
        split_audit_rounds(rounds, member, 1e-5)


def test_the_canary_audit_trains_on_training_threads_and_restores_the_process_s(monkeypatch):
    """The audit trains through ``Simulation.run_method``, not ``run``: once the run stopped
    setting torch's threads when built, the audit trained on the process's own count instead
    of ``training.threads``."""
    import audits.canary as canary

    seen: list[int] = []
    real = canary.canary_scores

    def scores(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(canary, "canary_scores", scores)
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    d = {"methods": ["local"],
         "data": {"num_clients": 2, "train_per_client": 32, "val_per_client": 16,
                  "test_per_client": 16},
         "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "threads": wanted}}
    run_canary_audit(parse_config(d), num_canaries=20)
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == before


def test_cli_canary_refuses_private_keys_inside_the_run_before_training(tmp_path, capsys,
                                                                        monkeypatch):
    """`audit verify` and `audit replay` refuse a run holding private key material (whoever
    holds a signing key can re-sign its records); `audit canary RUN_DIR` audited it and
    wrote into it without looking. It now refuses it alike, before anything trains."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import audits.canary as canary
    from secure_fedora.cli import main

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the federation was built before the keys were looked for")

    monkeypatch.setattr(canary, "build_clients", no_training)
    run = canary_run_dir(tmp_path)
    (run / "keys").mkdir()
    (run / "keys" / "operator.ed25519.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert main(["audit", "canary", str(run), "--canaries", "40"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: run directory {run} is not trusted:"
                                                   " 1 file holds private key material")
    assert "(keys/operator.ed25519.pem)" in err
    assert not (run / "audit").exists()


def test_cli_canary_prints_and_records_what_the_key_scan_could_not_check(tmp_path, capsys):
    """`audit canary RUN_DIR` printed the key scan's warnings (a run without privacy keeping
    its envelope keys) but canary.json did not record them, as replay.json records them
    (`unchecked`); canary.json now lists each, worded as the printed `warning:` line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from secure_fedora.cli import main

    run = canary_run_dir(tmp_path)
    (run / "config.toml").write_text(CANARY_CONFIG.replace(
        "[privacy]\nenabled = true\nepsilon = 8.0\n", ""))
    (run / "keys").mkdir()
    (run / "keys" / "client-000.ed25519.key").write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    assert main(["audit", "canary", str(run), "--canaries", "40"]) == 3  # no claim
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "keys/client-000.ed25519.key" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), err
    doc = json.loads((run / "audit" / "canary.json").read_text())
    assert doc["unchecked"] == [warnings[0].removeprefix("warning: ")]
    (run / "keys" / "client-000.ed25519.key").unlink()
    assert main(["audit", "canary", str(run), "--canaries", "40"]) == 3
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((run / "audit" / "canary.json").read_text())["unchecked"] == []


def test_the_python_canary_audit_of_a_run_directory_scans_it_for_private_keys(
        tmp_path, capsys, monkeypatch):
    """`audit canary RUN_DIR` refused a run holding private key material and recorded what
    its key scan could not check, but the scan was the CLI's own: ``run_canary_audit`` (as
    whitebox's and replay's Python functions do) never looked. Given ``run_dir`` it now
    refuses it before anything trains and records the scan's warnings in ``unchecked``; the
    CLI makes that one scan, not a second."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import audits.canary as canary
    import audits.verify as verify
    from secure_fedora.cli import main
    from secure_fedora.core.config import load_config

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    run = canary_run_dir(tmp_path)
    (run / "keys").mkdir()
    (run / "keys" / "operator.ed25519.pem").write_bytes(pem)
    real_build = canary.build_clients

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the federation was built before the keys were looked for")

    monkeypatch.setattr(canary, "build_clients", no_training)
    with pytest.raises(CanaryAuditError, match=rf"^run directory {run} is not trusted: 1 file"
                       r" holds private key material .*\(keys/operator\.ed25519\.pem\)"):
        run_canary_audit(load_config(run / "config.toml"), num_canaries=40, run_dir=run,
                         keystore=tmp_path / "keystore")
    monkeypatch.setattr(canary, "build_clients", real_build)

    # a run without privacy keeping its envelope keys: audited, the scan's warning recorded
    (run / "keys" / "operator.ed25519.pem").unlink()
    (run / "config.toml").write_text(CANARY_CONFIG.replace(
        "[privacy]\nenabled = true\nepsilon = 8.0\n", ""))
    (run / "keys" / "client-000.ed25519.key").write_bytes(pem)
    cfg = load_config(run / "config.toml")
    (note,) = run_canary_audit(cfg, num_canaries=40, run_dir=run).unchecked
    assert "keys/client-000.ed25519.key" in note
    assert run_canary_audit(cfg, num_canaries=40).unchecked == []  # no run directory: no scan

    scans: list[object] = []
    real_scan = verify._private_key_findings

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        scans.append(args[0])
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(verify, "_private_key_findings", counted)
    capsys.readouterr()
    assert main(["audit", "canary", str(run), "--canaries", "40"]) == 3  # no claim
    assert len(scans) == 1  # the CLI's audit scans the run once
    assert capsys.readouterr().err.splitlines().count(f"warning: {note}") == 1
    assert json.loads((run / "audit" / "canary.json").read_text())["unchecked"] == [note]


def test_a_config_that_is_not_the_run_s_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """``run_canary_audit(cfg, run_dir=RUN)`` trusted that ``cfg`` was RUN's config: another
    config (another run's, or config.toml edited after the run) was audited as RUN, its
    claim and key scan attributed to it. ``cfg`` must now hash to the ``config_hash`` RUN's
    results.json records (else to RUN's config.toml); a mismatch is a CanaryAuditError before
    anything trains, and `audit canary RUN` refuses an edited config.toml the same way."""
    import audits.canary as canary
    from secure_fedora.cli import main
    from secure_fedora.core.config import config_hash, load_config

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("reached training")

    monkeypatch.setattr(canary, "build_clients", no_training)
    run = canary_run_dir(tmp_path)
    own = load_config(run / "config.toml")
    other = parse_config({**own.model_dump(mode="json"), "seed": own.seed + 1})
    # without results.json: config.toml is the run's record
    with pytest.raises(CanaryAuditError, match=r"^the config is not .*config\.toml \(their"
                       r" config hashes differ\)"):
        run_canary_audit(other, num_canaries=40, run_dir=run)
    with pytest.raises(AssertionError, match="reached training"):  # its own config passes
        run_canary_audit(own, num_canaries=40, run_dir=run)
    # results.json's config_hash decides where it is recorded
    (run / "results.json").write_text(json.dumps({"config_hash": config_hash(own)}))
    with pytest.raises(CanaryAuditError, match=r"records config_hash [0-9a-f]{16}\.\.\.: it is"
                       r" not the config this run ran"):
        run_canary_audit(other, num_canaries=40, run_dir=run)
    with pytest.raises(AssertionError, match="reached training"):
        run_canary_audit(own, num_canaries=40, run_dir=run)
    (run / "config.toml").write_text("seed = 9\n" + CANARY_CONFIG)  # edited after the run
    capsys.readouterr()
    assert main(["audit", "canary", str(run), "--canaries", "40"]) == 2
    assert "it is not the config this run ran" in capsys.readouterr().err
    # a directory that records no config at all cannot show that cfg is its config
    (run / "results.json").unlink()
    (run / "config.toml").unlink()
    (run / "ledgers").mkdir()
    with pytest.raises(CanaryAuditError, match="holds no results.json recording a config_hash"
                       " and no config.toml"):
        run_canary_audit(own, num_canaries=40, run_dir=run)
