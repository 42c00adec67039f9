"""A plug-in Gaussian mechanism, registered and configured without editing the package, is
planned, admitted with the round's model release, drawn from the client's noise source,
ledgered with its params, accounted and audited; what is not declared, registered or
configured is refused with a message naming what to do."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from privacy.accounting import PlannedRelease, PrivacyBudget, plan_epsilon, round_up
from privacy.identity import client_ids, load_identity
from privacy.ledger import canonical_json, line_hash, read_ledger, signing_payload
from privacy.mechanisms import MECHANISMS, MechanismSpec
from privacy.pipeline import PipelineError
from secure_fedora.algorithms.contract import ROUND, SETUP, ReleaseSpec
from secure_fedora.algorithms.methods import FedAvg
from secure_fedora.cli import privacy_plan_table
from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.inprocess import Simulation
from secure_fedora.secure.private import (
    UndeclaredReleaseError,
    check_budget_plans,
    privacy_plan,
)
from tests.secure_fedora.runtimes.flower.deploy_support import TINY
from tests.secure_fedora.secure.mechanism_plugin import (
    ENTRY,
    MECHANISM,
    SETUP_KIND,
    LabelShareFedAvg,
    RawLabelShareFedAvg,
    RawSetupLabelShareFedAvg,
    SetupLabelShareFedAvg,
    label_share,
)

#: A second plug-in mechanism (same formula), for plans with two of them.
SECOND = "label_share_test_b"
if SECOND not in MECHANISMS:
    MECHANISMS.register(MechanismSpec(
        SECOND, "as label_share_test", {"clip": "number", "m": "count"},
        lambda p: float(p["clip"]) / p["m"],
        record_params=lambda cfg: {"clip": 1.0, "m": cfg.data.train_per_client}))


def _register(cls: type) -> Iterator[str]:
    name = f"mech_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, cls)
    try:
        yield name
    finally:
        METHODS.unregister(name)


@pytest.fixture
def method() -> Iterator[str]:
    yield from _register(LabelShareFedAvg)


def _config(method: str, rounds: int = 2, **mechanisms: dict[str, Any]) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["training"]["rounds"] = rounds
    data["data"]["validation"] = "private"
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible",
                       "mechanisms": mechanisms}
    return parse_config(data)


def _with_mechanisms(*extra: str) -> type:
    class Declares(LabelShareFedAvg):
        @classmethod
        def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
            return (ReleaseSpec("model", ("dpsgd", *extra), ROUND),)
    return Declares


def test_the_plan_calibrates_a_plug_in_mechanism_from_its_table(method: str) -> None:
    """budget_fraction: the mechanism's releases alone spend that share (as the built-ins'
    fractions); noise_multiplier: used as given; DP-SGD is calibrated for the whole plan."""
    budget = PrivacyBudget(8.0, 1e-3)
    plan = privacy_plan(_config(method, **{MECHANISM: {"budget_fraction": 0.1}}), method,
                        budget, "pld")
    sigma = plan.noise_for(MECHANISM)
    assert sigma is not None and plan.mechanism_noise == ((MECHANISM, sigma),)
    assert [(r.mechanism, r.steps) for r in plan.releases] == [("dpsgd", 24), (MECHANISM, 2)]
    alone = plan_epsilon([PlannedRelease(MECHANISM, 1.0, 2, sigma)], 1e-3, 1.0, "pld")
    assert 0.09 * 8.0 < alone <= 0.1 * 8.0
    assert plan_epsilon(plan.releases, 1e-3, plan.dpsgd_noise, "pld") <= 8.0
    fixed = privacy_plan(_config(method, **{MECHANISM: {"noise_multiplier": 7.5}}), method,
                         budget, "pld")
    assert fixed.noise_for(MECHANISM) == 7.5 and fixed.dpsgd_noise < plan.dpsgd_noise
    # the built-ins' fields and the generic accessor agree
    assert plan.summary_noise is plan.lambda_noise is plan.noise_for("gaussian_lambda") is None
    assert plan.noise_for("dpsgd") == plan.dpsgd_noise


def test_a_run_ledgers_accounts_and_audits_every_plug_in_release(method: str,
                                                                 tmp_path: Path) -> None:
    """Each round's ledger holds the model release's DP-SGD entry and the plug-in's entry
    (its params, sensitivity clip / m, the plan's noise); epsilon spent is the plan's; the
    released value is in the round statistics; audit verify passes."""
    from audits.verify import verify_run

    cfg = _config(method, **{MECHANISM: {"budget_fraction": 0.1, "params": {"clip": 1.0}}})
    sim = Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys")
    results = sim.run()
    section = results["privacy"][method]
    plan = section["plan"][0]
    assert plan["releases"][1].startswith(f"{MECHANISM} x2 (q=1.0, sigma=")
    assert plan["release_stages"][MECHANISM] == ["GaussianNoise", "RecordParams",
                                                 "AccountedWith"]
    sigma = float(plan["releases"][1].split("sigma=")[1].rstrip(")"))
    caption = str(privacy_plan_table(section["plan"]).caption)  # printed before training
    assert f"{MECHANISM} x2 (q=1.0, sigma={sigma!r})" in caption
    assert f"{MECHANISM} release: GaussianNoise -> RecordParams -> AccountedWith" in caption
    for row, cid in zip(section["clients"], client_ids(3), strict=True):
        # spent exactly as planned: the plan's epsilon is the same figure rounded up
        assert round_up(row["epsilon_spent"]) == plan["planned_epsilon"]
        entries = read_ledger(tmp_path / "run" / "ledgers" / method / f"{cid}.jsonl")
        assert [e["mechanism"] for e in entries] == ["dpsgd", MECHANISM] * 2 + ["close"]
        for e in entries[1:4:2]:
            p = e["params"]
            assert (p["clip"], p["m"], p["sensitivity"]) == (1.0, 64, 1.0 / 64)
            assert (p["noise_multiplier"], p["sample_rate"], p["steps"]) == (sigma, 1.0, 1)
            assert p["noise"] == "reproducible" and p["release_kind"] == "model"
    assert [r["round"] for r in sim.history if isinstance(r.get("label_share"), float)] == [1, 2]
    report = verify_run(tmp_path / "run")
    assert report.ok, report.errors
    assert not [w for w in report.warnings if w.check == "sensitivity"]
    # an auditor's process that did not import the plug-in is told, not silently passed
    spec = MECHANISMS._specs.pop(MECHANISM)
    try:
        unchecked = [w for w in verify_run(tmp_path / "run").warnings
                     if w.check == "sensitivity"]
    finally:
        MECHANISMS._specs[MECHANISM] = spec
    assert len(unchecked) == 3 and all(f"{MECHANISM!r} is not a registered mechanism"
                                       in w.message for w in unchecked)
    # the CLI's auditor is told how its process can know the plug-in
    assert all("secure_fedora/contrib/" in w.message and "audits.verify.verify_run" in w.message
               for w in unchecked)


def test_audit_verify_catches_an_edited_plug_in_sensitivity(method: str, tmp_path: Path) -> None:
    """A ledger re-signed by its client's own key whose plug-in entry claims a tenth of the
    sensitivity its params imply is a sensitivity error at that entry."""
    from audits.verify import verify_run

    cfg = _config(method, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
    Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run()
    cid = "client-001"
    path = tmp_path / "run" / "ledgers" / method / f"{cid}.jsonl"
    key = load_identity(tmp_path / "keys", cid).signing_key
    lines = path.read_text().splitlines()
    out: list[str] = [lines[0]]
    for line in lines[1:]:
        entry = json.loads(line)
        if entry["mechanism"] == MECHANISM:
            entry["params"]["sensitivity"] /= 10
        entry["prev_hash"] = line_hash(out[-1])
        entry.pop("signature")
        entry["signature"] = key.sign(signing_payload(entry)).hex()
        out.append(canonical_json(entry))
    path.write_text("\n".join(out) + "\n")
    report = verify_run(tmp_path / "run")
    assert ("sensitivity", 1) in {(f.check, f.entry) for f in report.errors
                                  if f.client_id == cid}


def test_a_declared_but_unregistered_mechanism_is_a_config_error() -> None:
    for name in _register(_with_mechanisms("no_such_mechanism")):
        with pytest.raises(ConfigError, match="'no_such_mechanism' is not registered; "
                                              "register a privacy.mechanisms.MechanismSpec"):
            check_budget_plans(_config(name), name, 3)


def test_a_registered_mechanism_without_record_params_cannot_be_planned() -> None:
    bare = f"bare_{uuid.uuid4().hex[:6]}"
    MECHANISMS.register(MechanismSpec(bare, "no record params", {"clip": "number"},
                                      lambda p: float(p["clip"])))
    for name in _register(_with_mechanisms(bare)):
        with pytest.raises(ConfigError, match="needs a sensitivity formula and record_params"):
            check_budget_plans(_config(name), name, 3)


def test_a_declared_mechanism_without_configured_noise_is_a_config_error(method: str) -> None:
    with pytest.raises(ConfigError, match=r"set \[privacy.mechanisms.label_share_test\] "
                                          "noise_multiplier"):
        check_budget_plans(_config(method), method, 3)
    with pytest.raises(ConfigError, match="not both"):
        _config(method, **{MECHANISM: {"noise_multiplier": 2.0, "budget_fraction": 0.1}})


def test_fractions_summing_to_one_leave_dp_sgd_nothing_and_are_refused() -> None:
    for name in _register(_with_mechanisms(MECHANISM, SECOND)):
        cfg = _config(name, **{MECHANISM: {"budget_fraction": 0.5},
                               SECOND: {"budget_fraction": 0.5}})
        with pytest.raises(ConfigError, match=r"privacy.mechanisms.label_share_test."
                                              r"budget_fraction \(0.5\) \+ privacy.mechanisms."
                                              r"label_share_test_b.budget_fraction \(0.5\) "
                                              "leave DP-SGD no share"):
            check_budget_plans(cfg, name, 3)
        # a fixed multiplier takes no share
        check_budget_plans(_config(name, **{MECHANISM: {"budget_fraction": 0.5},
                                            SECOND: {"noise_multiplier": 9.0}}), name, 3)


def test_an_undeclared_generic_release_from_client_code_is_refused(tmp_path: Path) -> None:
    """The client code asks for a release of a registered mechanism its method does not
    declare: refused by name before anything is drawn, and the run stops."""
    class Undeclared(LabelShareFedAvg):
        released = SECOND

    for name in _register(Undeclared):
        cfg = _config(name, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
        with pytest.raises(UndeclaredReleaseError, match="'label_share_test_b', which its "
                                                         "round release does not declare"):
            Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run()


def test_a_generic_release_outside_an_admitted_round_is_refused(method: str,
                                                                tmp_path: Path) -> None:
    from privacy.noise import ReproducibleNoise
    from secure_fedora.secure.private import FederationPrivacy

    cfg = _config(method, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
    privacy = FederationPrivacy.open(cfg, method, 3, tmp_path / "ledgers", tmp_path / "keys")
    try:
        noise = ReproducibleNoise(0)
        with pytest.raises(UndeclaredReleaseError, match="no admitted round release"):
            privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), noise)
        with pytest.raises(UndeclaredReleaseError, match="does not declare"):
            privacy.gaussian(0, "gaussian_lambda", torch.tensor(0.5, dtype=torch.float64), noise)
        assert privacy.admit(0, 1, torch.zeros(3), False, noise=noise)
        first = privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), noise)
        assert first.shape == () and float(first) != 0.5
        # its ledger entry is used: a second release in the round is not accounted
        with pytest.raises(Exception, match="does not account it, or its entry was already used"):
            privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), noise)
    finally:
        privacy.close()


def test_a_model_release_whose_signature_failed_leaves_the_round_open(method: str,
                                                                      tmp_path: Path) -> None:
    """A model release that passed the step check but whose envelope signature (or
    encryption) raised marked the round as checked: nothing had left, yet every later
    plug-in release of the round was refused as coming after its reply. It stays open; a
    release that left closes it."""
    from privacy.noise import ReproducibleNoise
    from secure_fedora.secure.private import FederationPrivacy

    def failing_sign(release: Any) -> bytes:
        raise OSError("signing device unavailable")

    cfg = _config(method, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
    privacy = FederationPrivacy.open(cfg, method, 3, tmp_path / "ledgers", tmp_path / "keys")
    try:
        noise = ReproducibleNoise(0)
        assert privacy.admit(0, 1, torch.zeros(3), False, noise=noise)
        for _ in range(privacy.steps):
            privacy.clients[0].step_counter.count()
        with pytest.raises(OSError, match="signing device unavailable"):
            privacy.release_model(0, 1, torch.arange(3.0), sign=failing_sign)
        privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), noise)
        privacy.release_model(0, 1, torch.arange(3.0))
        with pytest.raises(UndeclaredReleaseError, match="after its round-1 reply was checked"):
            privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), noise)
    finally:
        privacy.close()


def test_a_built_ins_noise_in_the_table_is_its_flat_key_and_both_are_refused() -> None:
    """[privacy.mechanisms.gaussian_lambda] sets privacy.lambda_noise_multiplier (one source
    of truth: the same config, hash and plan); setting both is refused naming both."""
    from secure_fedora.core.config import config_hash

    data = json.loads(json.dumps(TINY))
    data["data"]["validation"] = "private"
    data["fedora"]["relatedness"] = "noised"
    data["privacy"] = {"enabled": True, "lambda_noise_multiplier": 3.0,
                       "summary_budget_fraction": 0.3}
    flat = parse_config(data)
    data["privacy"] = {"enabled": True, "mechanisms": {
        "gaussian_lambda": {"noise_multiplier": 3.0},
        "gaussian_summary": {"budget_fraction": 0.3}}}
    table = parse_config(data)
    assert table == flat and config_hash(table) == config_hash(flat)
    assert table.privacy.mechanisms == {}
    data["privacy"]["lambda_noise_multiplier"] = 2.0
    with pytest.raises(ConfigError, match="privacy.mechanisms.gaussian_lambda.noise_multiplier "
                                          "and privacy.lambda_noise_multiplier both set"):
        parse_config(data)


def test_the_plug_in_entry_reaches_the_server_as_a_declared_reply_entry(method: str) -> None:
    from secure_fedora.algorithms.contract import declared_reply_entries

    cfg = _config(method, **{MECHANISM: {"noise_multiplier": 5.0}})
    assert declared_reply_entries(method, cfg)["round"][ENTRY]["built_in"] is False


def test_a_run_cut_after_a_plug_in_release_resumes_to_the_same_ledgers(method: str,
                                                                       tmp_path: Path) -> None:
    """Killed in round 2 after client 1 trained and released its label share: the resumed run
    consumes the round's admitted entries (no second accounting), re-makes the releases from
    the journaled noise, and ends with the ledgers and released values of an uninterrupted run."""
    from tests.secure_fedora.core.crash_support import crashes_at

    cfg = _config(method, **{MECHANISM: {"noise_multiplier": 4.0}})
    whole = Simulation(cfg, tmp_path / "whole", keystore=tmp_path / "keys")
    whole.run()
    with crashes_at("train@5"):
        Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys").run()
    cut = read_ledger(tmp_path / "cut" / "ledgers" / method / "client-001.jsonl")
    assert [(e["round"], e["mechanism"]) for e in cut] == [
        (1, "dpsgd"), (1, MECHANISM), (2, "dpsgd"), (2, MECHANISM)]  # round 2 admitted
    resumed = Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys")
    resumed.run(resume=True)
    assert [r["label_share"] for r in resumed.history] == \
        [r["label_share"] for r in whole.history]
    def stated(run: str, cid: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in ("timestamp", "signature", "prev_hash")}
                for e in read_ledger(tmp_path / run / "ledgers" / method / f"{cid}.jsonl")]

    for cid in client_ids(3):
        assert stated("cut", cid) == stated("whole", cid)


def test_a_method_declaring_a_plug_in_mechanism_runs_without_dp_unplanned(method: str,
                                                                          tmp_path: Path) -> None:
    """Without DP nothing is planned or accounted: the declaration is not read and the table
    need not exist."""
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["training"]["rounds"] = 1
    sim = Simulation(parse_config(data), tmp_path / "run")
    results = sim.run()
    assert results["privacy"] in ({}, None) or method not in results["privacy"]
    assert "label_share" not in sim.history[0]


def test_a_mechanism_table_the_run_cannot_read_is_refused_or_warned(
        method: str, caplog: pytest.LogCaptureFixture) -> None:
    """A misspelt table (here the built-in lambda's) would leave the noise it meant to set at
    its calibrated default: refused naming the likely name; a dpsgd table likewise (DP-SGD's
    noise is privacy.noise_multiplier); a registered plug-in's table no method of the run
    declares sets nothing: a warning, and the plan is as without it."""
    data = json.loads(json.dumps(TINY))
    data["data"]["validation"] = "private"
    data["fedora"]["relatedness"] = "noised"
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                       "mechanisms": {"gaussian_lamda": {"noise_multiplier": 50.0}}}
    with pytest.raises(ConfigError, match=r"\[privacy.mechanisms.gaussian_lamda\] names no "
                                          r"registered mechanism \(did you mean "
                                          r"'gaussian_lambda'\?\)"):
        check_budget_plans(parse_config(data), "fedora", 3)
    data["privacy"]["mechanisms"] = {"dpsgd": {"noise_multiplier": 50.0}}
    with pytest.raises(ConfigError, match="DP-SGD's noise is privacy.noise_multiplier"):
        check_budget_plans(parse_config(data), "fedora", 3)
    bare = f"bare_{uuid.uuid4().hex[:6]}"  # registered, but the plan cannot calibrate it
    MECHANISMS.register(MechanismSpec(bare, "no record params", {"clip": "number"},
                                      lambda p: float(p["clip"])))
    data["privacy"]["mechanisms"] = {bare: {"noise_multiplier": 5.0}}
    with pytest.raises(ConfigError, match="needs a sensitivity formula and record_params"):
        check_budget_plans(parse_config(data), "fedora", 3)
    declared = _config(method, **{MECHANISM: {"noise_multiplier": 5.0}})
    extra = _config(method, **{MECHANISM: {"noise_multiplier": 5.0},
                               SECOND: {"noise_multiplier": 5.0}})
    with caplog.at_level("WARNING", logger="secure_fedora.privacy"):
        _, plans = check_budget_plans(declared, method, 3)
        assert "[privacy.mechanisms]" not in caplog.text
        assert check_budget_plans(extra, method, 3)[1] == plans
    assert f"declares {SECOND!r}, so [privacy.mechanisms] sets nothing for it" in caplog.text


def test_a_generic_release_after_the_rounds_step_check_is_refused(tmp_path: Path) -> None:
    """The server half (here aggregate, in process) asking for client 0's release once its
    round's replies were checked: refused before anything is drawn, as on Flower where the
    server holds no client's noise; the release belongs in client_update."""
    class Late(LabelShareFedAvg):  # client_update leaves its admitted entry unused
        reply_entries = FedAvg.reply_entries
        client_update = FedAvg.client_update

        def aggregate(self, rnd: int, replies: Any) -> dict[str, float]:
            stats = super().aggregate(rnd, replies)
            noise = self.ctx.noise[0]
            before = noise.checkpoint_state().clone()
            try:
                self.ctx.privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64),
                                          noise)
            finally:
                assert torch.equal(noise.checkpoint_state(), before)  # nothing drawn
            return stats

    for name in _register(Late):
        cfg = _config(name, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
        with pytest.raises(UndeclaredReleaseError, match="client 0's 'label_share_test' release"
                                                         " comes after its round-1 reply was "
                                                         "checked"):
            Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run()


def test_the_plug_in_value_moves_by_at_most_its_recorded_sensitivity() -> None:
    """The example's value (as README's) is a sum over the public m = data.train_per_client
    (what its record states), not a mean over the client's own rows: a client with fewer rows
    than m (a registered partitioner may give it that) removing one row moves it by at most
    1 / m, the sensitivity its entry records."""
    from tests.secure_fedora.secure.mechanism_plugin import label_share

    m = 64
    y = torch.tensor([0] + [1] * 39)  # 40 rows, fewer than m
    for drop in range(y.numel()):
        rest = torch.cat([y[:drop], y[drop + 1:]])
        assert abs(float(label_share(y, m)) - float(label_share(rest, m))) <= 1.0 / m


def test_record_params_that_give_no_sensitivity_are_refused_before_the_run() -> None:
    """A plug-in whose record_params raise, or give a sensitivity of 0, is refused by the
    plan check (run, sweep and server start with it), naming the mechanism and where it
    raised, not at the first admission after the run's keys and ledgers are made."""
    name = f"rp_{uuid.uuid4().hex[:6]}"
    MECHANISMS.register(MechanismSpec(
        name, "clip from the table", {"clip": "number"}, lambda p: float(p["clip"]),
        record_params=lambda cfg: {"clip": cfg.privacy.mechanisms[name].params["clip"]}))
    for method in _register(_with_mechanisms(name)):
        with pytest.raises(ConfigError, match=f"mechanism '{name}': its record_params raised "
                                              r"KeyError: 'clip' \(at .*test_plug_in_mech"):
            check_budget_plans(_config(method, **{name: {"noise_multiplier": 3.0}}), method, 3)
        with pytest.raises(ConfigError, match=f"mechanism '{name}': its record params: .*"
                                              "sensitivity must be a finite number > 0.*; fix "
                                              "its MechanismSpec's sensitivity formula or "
                                              "record_params"):
            check_budget_plans(_config(method, **{name: {"noise_multiplier": 3.0,
                                                         "params": {"clip": 0.0}}}), method, 3)
        check_budget_plans(_config(method, **{name: {"noise_multiplier": 3.0,
                                                     "params": {"clip": 0.5}}}), method, 3)


def test_a_csprng_run_cut_after_a_plug_in_release_remakes_the_same_value(
        tmp_path: Path) -> None:
    """With CSPRNG noise (no seed re-creates it) a round cut after a client released its label
    share is re-made on resume from the journaled noise state: the same released value, not a
    second independent draw of the same data under one ledger entry."""
    from tests.secure_fedora.core.crash_support import crashes_at

    released: list[tuple[int, int, float]] = []

    class Recorded(LabelShareFedAvg):
        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            reply = super().client_update(i, rnd, message)
            released.append((rnd, i, float(reply[ENTRY])))
            return reply

    for name in _register(Recorded):
        data = json.loads(json.dumps(TINY))
        data["methods"] = [name]
        data["data"]["validation"] = "private"
        data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                           "mechanisms": {MECHANISM: {"noise_multiplier": 4.0}}}
        cfg = parse_config(data)
        with crashes_at("train@6"):
            Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys").run()
        before = {(r, i): v for r, i, v in released}
        assert (2, 1) in before and (2, 2) not in before  # cut in client 2's training
        released.clear()
        Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys").run(resume=True)
        again = {(r, i): v for r, i, v in released}
        assert again[(2, 1)] == before[(2, 1)]
        assert [e["mechanism"] for e in read_ledger(
            tmp_path / "cut" / "ledgers" / name / "client-001.jsonl")] == \
            ["dpsgd", MECHANISM] * 2 + ["close"]


def test_a_generic_release_from_another_noise_source_is_refused(method: str,
                                                                tmp_path: Path) -> None:
    """Noise from a source other than the client's own (another client's, or a fresh one no
    journal holds: a resume would draw it anew, a second release under one ledger entry) is
    refused before anything is drawn; the client's own source releases."""
    from privacy.noise import ReproducibleNoise
    from secure_fedora.secure.private import FederationPrivacy

    cfg = _config(method, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
    privacy = FederationPrivacy.open(cfg, method, 3, tmp_path / "ledgers", tmp_path / "keys")
    try:
        own, other = ReproducibleNoise(0), ReproducibleNoise(1)
        assert privacy.admit(0, 1, torch.zeros(3), False, noise=own)
        state = other.checkpoint_state().clone()
        with pytest.raises(PipelineError, match="not client 0's noise source"):
            privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), other)
        assert torch.equal(other.checkpoint_state(), state)  # nothing drawn
        privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), own)
    finally:
        privacy.close()


def test_a_mechanism_table_beside_a_factory_naming_no_class_is_a_config_error(
        method: str) -> None:
    """The table check asks every method of the run what it declares: a factory that names
    no class (whose releases are unknown) raised a bare ValueError from inside the check of
    another, plannable, method."""
    def anonymous(ctx: Any, cfg: Any) -> Any:
        return FedAvg(ctx)

    name = f"anon_{uuid.uuid4().hex[:6]}"
    METHODS.register(name, anonymous)
    try:
        data = json.loads(json.dumps(_config(method, **{MECHANISM: {"noise_multiplier": 5.0}})
                                     .model_dump(mode="json")))
        data["methods"] = [method, name]
        with pytest.raises(ConfigError, match="does not name its algorithm class"):
            check_budget_plans(parse_config(data), method, 3)
    finally:
        METHODS.unregister(name)


def test_readmes_plug_in_mechanism_example_runs_as_written(tmp_path: Path) -> None:
    """README's example, its Python block as written (its imports, the mechanism, the method
    declaring the release and its reply entry under DP only) and its
    [privacy.mechanisms.label_share] table, runs under DP (the plan lists one label_share
    release per client and round) and without DP (the method neither plans nor sends it); in
    a process of its own, as it registers its names."""
    import os
    import subprocess
    import sys

    import tomllib

    root = Path(__file__).resolve().parents[3]
    readme = (root / "README.md").read_text()
    at = readme.index("**A new privacy mechanism**")
    code = readme[readme.index("```python\n", at) + 10:]
    code = code[:code.index("```\n")]
    toml = readme[readme.index("```toml\n", at) + 8:]
    table = tomllib.loads(toml[:toml.index("```\n")])["privacy"]["mechanisms"]
    run = (
        "from secure_fedora import Experiment\n"
        "for dp in (True, False):\n"
        "    cfg = {'methods': ['label_share_fedavg'], 'data': {'num_clients': 2,\n"
        "           'train_per_client': 32, 'val_per_client': 16, 'test_per_client': 32},\n"
        "           'training': {'rounds': 1, 'local_epochs': 1, 'batch_size': 16},\n"
        f"           'privacy': {{'enabled': dp, **({{'delta': 1e-3, 'mechanisms': {table!r}}}"
        " if dp else {})}}\n"
        "    r = Experiment(cfg).run()\n"
        "    print(dp, r['privacy']['label_share_fedavg']['plan'][0]['releases'] if dp else '')\n")
    env = {**os.environ, "PYTHONPATH": str(root),
           "SECURE_FEDORA_KEYSTORE_HOME": str(tmp_path / "keys")}
    out = subprocess.run([sys.executable, "-c", code + run], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("True [") and "'label_share x1 (q=1.0, sigma=" in lines[-2]
    assert lines[-1].strip() == "False"


def test_a_second_release_or_a_bad_value_in_a_round_is_refused_before_any_draw(
        method: str, tmp_path: Path) -> None:
    """A value holding NaN, of an integer or 16-bit float dtype (its noise would be rounded to
    a grid that follows the value) or on the meta device, and a second call in
    the round (its entry is used) are refused naming the method, client and mechanism before
    anything is drawn from the client's noise (the second call drew, then refused)."""
    from privacy.mechanisms import MechanismError
    from privacy.noise import ReproducibleNoise
    from secure_fedora.secure.private import FederationPrivacy

    cfg = _config(method, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
    privacy = FederationPrivacy.open(cfg, method, 3, tmp_path / "ledgers", tmp_path / "keys")
    try:
        noise = ReproducibleNoise(0)
        assert privacy.admit(0, 1, torch.zeros(3), False, noise=noise)
        state = noise.checkpoint_state().clone()
        for bad, why in ((torch.tensor([0.5, float("nan")], dtype=torch.float64), "NaN"),
                         (torch.tensor([1, 2]), "floating-point"),
                         (torch.empty(2, dtype=torch.float64, device="meta"), "meta"),
                         (torch.tensor([0.5, 0.25], dtype=torch.float16), "float16"),
                         (torch.tensor([0.5], dtype=torch.bfloat16), "bfloat16")):
            with pytest.raises(MechanismError, match=f"method {method!r}: client 0's "
                                                     f"'{MECHANISM}' release: .*{why}.*nothing "
                                                     "was released"):
                privacy.gaussian(0, MECHANISM, bad, noise)
            assert torch.equal(noise.checkpoint_state(), state)
        privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), noise)
        state = noise.checkpoint_state().clone()
        with pytest.raises(PipelineError, match=f"client 0's '{MECHANISM}' release: .*its entry "
                                                "was already used.*one gaussian call per "
                                                "mechanism and round"):
            privacy.gaussian(0, MECHANISM, torch.tensor(0.5, dtype=torch.float64), noise)
        assert torch.equal(noise.checkpoint_state(), state)  # nothing drawn
    finally:
        privacy.close()


def test_a_declared_mechanism_without_a_table_is_not_called_over_budget(method: str) -> None:
    """The missing table is a config error saying what to set, not a budget refusal listing
    every client as 'over budget' (no budget was even planned)."""
    with pytest.raises(ConfigError) as err:
        check_budget_plans(_config(method), method, 3)
    assert "over budget" not in str(err.value)
    assert str(err.value).startswith("privacy: method ")


def test_a_sensitivity_formula_that_raises_is_named_by_the_plan_and_by_verify(
        method: str, tmp_path: Path) -> None:
    """A formula reading a param it does not declare raised a bare KeyError from the plan
    check (a traceback, naming no mechanism) and from audit verify; the plan refuses it as a
    ConfigError naming the mechanism, and verify reports it as a sensitivity error."""
    import dataclasses

    from audits.verify import verify_run

    name = f"rf_{uuid.uuid4().hex[:6]}"
    MECHANISMS.register(MechanismSpec(name, "formula reads an undeclared param", {"m": "count"},
                                      lambda p: 1.0 / p["clip"],
                                      record_params=lambda cfg: {"m": 64}))
    for m in _register(_with_mechanisms(name)):
        with pytest.raises(ConfigError, match=f"mechanism '{name}': its sensitivity formula raised "
                                              "KeyError: 'clip'.*fix its MechanismSpec"):
            check_budget_plans(_config(m, **{name: {"noise_multiplier": 3.0}}), m, 3)
    good = MECHANISMS._specs[MECHANISM]
    Simulation(_config(method, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}}),
               tmp_path / "run", keystore=tmp_path / "keys").run()
    MECHANISMS._specs[MECHANISM] = dataclasses.replace(good, sensitivity=lambda p: 1 / p["x"])
    try:
        report = verify_run(tmp_path / "run")
    finally:
        MECHANISMS._specs[MECHANISM] = good
    assert {(f.check, f.entry) for f in report.errors} == {("sensitivity", 1)}
    assert all("sensitivity formula raised KeyError" in f.message for f in report.errors)


def test_a_fixed_noise_plug_in_over_budget_is_refused_naming_its_key(method: str) -> None:
    """A plug-in's ``[privacy.mechanisms.<name>] noise_multiplier`` too small for the budget
    was refused as DP-SGD's problem ("cannot calibrate privacy.noise_multiplier", or "raise
    it" of a fixed privacy.noise_multiplier), never naming the key to change. Both refusals
    name it now, with what to do: "unset it to calibrate" alone was refused in turn (a
    plug-in's table has no default budget_fraction), so its budget_fraction key is named."""
    key = f"privacy.mechanisms.{MECHANISM}"
    advice = (f"raise {key}.noise_multiplier, or unset it and set {key}.budget_fraction (the "
              "share of the budget it may spend; its noise is then calibrated)")
    cfg = _config(method, **{MECHANISM: {"noise_multiplier": 0.05}})
    with pytest.raises(ConfigError) as err:  # DP-SGD calibrated: no noise meets the budget
        check_budget_plans(cfg, method, 3)
    assert str(err.value).endswith(f"(set by {key}.noise_multiplier 0.05; raise it, unset it"
                                   f" and set {key}.budget_fraction to calibrate, or raise the"
                                   " budget)")
    # the advice followed: that table calibrated is no refusal of its noise
    followed = _config(method, **{MECHANISM: {"budget_fraction": 0.1}})
    check_budget_plans(followed, method, 3)
    fixed = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(
        update={"noise_multiplier": 1.0})})
    with pytest.raises(ConfigError) as err:  # DP-SGD fixed too: both keys named
        check_budget_plans(fixed, method, 3)
    assert (f"with the fixed privacy.noise_multiplier 1 and {key}.noise_multiplier = 0.05 "
            "(alone epsilon ") in str(err.value)
    assert str(err.value).endswith(f": raise privacy.noise_multiplier or unset it to "
                                   f"calibrate; {advice}")
    # over budget by DP-SGD: a fixed plug-in is still named, with what it spends (~0 here)
    plain = _config(method, **{MECHANISM: {"noise_multiplier": 1e6}})
    plain = plain.model_copy(update={"privacy": plain.privacy.model_copy(
        update={"noise_multiplier": 0.01})})
    with pytest.raises(ConfigError) as err:
        check_budget_plans(plain, method, 3)
    assert f"{key}.noise_multiplier = 1e+06 (alone epsilon 0.0" in str(err.value)


# ---------------------------------------------------------------- a plug-in's setup release


@pytest.fixture
def setup_method() -> Iterator[str]:
    yield from _register(SetupLabelShareFedAvg)


def _setup_config(method: str, noise: str = "reproducible", **table: Any) -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = [method]
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": noise,
                       "mechanisms": {MECHANISM: {**({} if "noise_multiplier" in table
                                                         else {"budget_fraction": 0.1}), **table}}}
    return parse_config(data)


def _stated(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in ("timestamp", "signature", "prev_hash")}
            for e in read_ledger(path)]


def test_a_plug_in_setup_release_is_planned_ledgered_before_it_leaves_and_audited(
        setup_method: str, tmp_path: Path) -> None:
    """Declared alone in a SETUP ReleaseSpec: planned once (its budget_fraction calibrated
    for one release), ledgered as round 0 before the value reaches the server, released with
    ctx.privacy.gaussian in client_setup; epsilon spent is the plan's; audit verify passes
    and recomputes its sensitivity (an entry re-signed with a tenth of it is an error)."""
    from audits.verify import verify_run

    cfg = _setup_config(setup_method, params={"clip": 1.0})
    plan = privacy_plan(cfg, setup_method, PrivacyBudget(8.0, 1e-3), "pld")
    sigma = plan.noise_for(MECHANISM)
    assert sigma is not None and [(r.mechanism, r.steps) for r in plan.releases] == \
        [("dpsgd", 24), (MECHANISM, 1)]
    alone = plan_epsilon([PlannedRelease(MECHANISM, 1.0, 1, sigma)], 1e-3, 1.0, "pld")
    assert 0.09 * 8.0 < alone <= 0.1 * 8.0
    sim = Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys")
    results = sim.run()
    section = results["privacy"][setup_method]
    assert section["plan"][0]["release_stages"][SETUP_KIND] == [
        "GaussianNoise", "RecordParams", "BudgetGate", "JournalRelease"]
    for row, cid in zip(section["clients"], client_ids(3), strict=True):
        assert round_up(row["epsilon_spent"]) == section["plan"][0]["planned_epsilon"]
        entries = read_ledger(tmp_path / "run" / "ledgers" / setup_method / f"{cid}.jsonl")
        assert [(e["round"], e["mechanism"]) for e in entries] == [
            (0, MECHANISM), (1, "dpsgd"), (2, "dpsgd"), (2, "close")]
        p = entries[0]["params"]
        assert (p["clip"], p["m"], p["sensitivity"], p["noise_multiplier"]) == \
            (1.0, 64, 1.0 / 64, sigma)
        assert p["release_kind"] == SETUP_KIND and p["noise"] == "reproducible"
    shares = [r["setup_share"] for r in sim.history]
    assert len(shares) == 2 and shares[0] == shares[1]
    report = verify_run(tmp_path / "run")
    assert report.ok, report.errors
    assert not [w for w in report.warnings if w.check == "sensitivity"]
    cid = "client-002"
    path = tmp_path / "run" / "ledgers" / setup_method / f"{cid}.jsonl"
    key = load_identity(tmp_path / "keys", cid).signing_key
    out: list[str] = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["mechanism"] == MECHANISM:
            entry["params"]["sensitivity"] /= 10
        if out:
            entry["prev_hash"] = line_hash(out[-1])
        entry.pop("signature")
        entry["signature"] = key.sign(signing_payload(entry)).hex()
        out.append(canonical_json(entry))
    path.write_text("\n".join(out) + "\n")
    assert ("sensitivity", 0) in {(f.check, f.entry) for f in verify_run(tmp_path / "run").errors
                                  if f.client_id == cid}


@pytest.mark.parametrize("point", ["gate@2", "release@2"])
def test_a_run_killed_in_a_plug_in_setup_release_resumes_without_a_second_draw(
        setup_method: str, tmp_path: Path, point: str) -> None:
    """Killed in client 1's setup release after its ledger entry (gate: before its journal
    record; release: after it, before the value left): the resume consumes the entry (not
    accounted twice, epsilon not lower) and ends with an uninterrupted run's ledgers and
    released values."""
    from tests.secure_fedora.core.crash_support import crashes_at

    cfg = _setup_config(setup_method, noise_multiplier=4.0)
    whole = Simulation(cfg, tmp_path / "whole", keystore=tmp_path / "keys")
    whole_results = whole.run()
    with crashes_at(point):
        Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys").run()
    ledgers = tmp_path / "cut" / "ledgers" / setup_method
    assert [e["mechanism"] for e in read_ledger(ledgers / "client-001.jsonl")] == [MECHANISM]
    assert read_ledger(ledgers / "client-002.jsonl") == []
    resumed = Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys")
    results = resumed.run(resume=True)
    assert [r["setup_share"] for r in resumed.history] == \
        [r["setup_share"] for r in whole.history]
    for cid in client_ids(3):
        assert _stated(ledgers / f"{cid}.jsonl") == \
            _stated(tmp_path / "whole" / "ledgers" / setup_method / f"{cid}.jsonl")
    assert [c["epsilon_spent"] for c in results["privacy"][setup_method]["clients"]] == \
        [c["epsilon_spent"] for c in whole_results["privacy"][setup_method]["clients"]]


def test_a_csprng_run_killed_after_a_setup_release_was_journaled_remakes_the_same_value(
        tmp_path: Path) -> None:
    """With CSPRNG noise no seed re-creates the draw: the resume restores the journaled noise
    state and releases the very value the killed run may have sent, not a second draw."""
    from tests.secure_fedora.core.crash_support import crashes_at

    released: list[tuple[int, float]] = []

    class Recorded(SetupLabelShareFedAvg):
        def client_setup(self, i: int, message: Any) -> Any:
            reply = super().client_setup(i, message)
            released.append((i, float(reply[ENTRY])))
            return reply

    for name in _register(Recorded):
        cfg = _setup_config(name, noise="csprng", noise_multiplier=4.0)
        with crashes_at("release@2"):
            Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys").run()
        before = dict(released)
        assert set(before) == {0}  # client 1 was cut after its journal record
        released.clear()
        Simulation(cfg, tmp_path / "cut", keystore=tmp_path / "keys").run(resume=True)
        again = dict(released)
        assert again[0] == before[0] and set(again) == {0, 1, 2}
        assert [e["mechanism"] for e in read_ledger(
            tmp_path / "cut" / "ledgers" / name / "client-001.jsonl")] == \
            [MECHANISM, "dpsgd", "dpsgd", "close"]


def test_setup_and_round_fractions_are_checked_together() -> None:
    """The setup release's budget_fraction counts with the round releases': together at
    least 1 leave DP-SGD nothing and are refused, naming both keys."""
    class Both(SetupLabelShareFedAvg):
        @classmethod
        def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
            return (ReleaseSpec(SETUP_KIND, (MECHANISM,), SETUP),
                    ReleaseSpec("model", ("dpsgd", SECOND), ROUND))

    for name in _register(Both):
        cfg = _setup_config(name)
        data = json.loads(json.dumps(TINY))
        data["methods"] = [name]
        data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                           "mechanisms": {MECHANISM: {"budget_fraction": 0.6},
                                          SECOND: {"budget_fraction": 0.4}}}
        with pytest.raises(ConfigError, match=rf"{MECHANISM}.budget_fraction \(0.6\) \+ "
                                              rf".*{SECOND}.budget_fraction \(0.4\)"):
            check_budget_plans(parse_config(data), name, 3)
        data["privacy"]["mechanisms"][SECOND]["budget_fraction"] = 0.2
        _, plans = check_budget_plans(parse_config(data), name, 3)
        assert [(r.mechanism, r.steps) for r in next(iter(plans.values())).releases] == \
            [("dpsgd", 24), (MECHANISM, 1), (SECOND, 2)]
        assert cfg.privacy.mechanisms[MECHANISM].budget_fraction == 0.1


@pytest.mark.parametrize("releases, match", [
    ((ReleaseSpec("summary", (MECHANISM,), SETUP), ReleaseSpec("model", ("dpsgd",), ROUND)),
     "'summary' is a built-in release's kind"),
    ((ReleaseSpec(SETUP_KIND, (MECHANISM,), SETUP),
      ReleaseSpec("model", ("dpsgd", MECHANISM), ROUND)),
     "in its setup release and in its round release"),
    ((ReleaseSpec(SETUP_KIND, (MECHANISM, SECOND), SETUP),
      ReleaseSpec("model", ("dpsgd",), ROUND)),
     "setup release of one registered plug-in Gaussian mechanism"),
    ((ReleaseSpec(SETUP_KIND, (MECHANISM,), SETUP, encrypted=True),
      ReleaseSpec("model", ("dpsgd",), ROUND)),
     "declare it with encrypted=False"),
])
def test_a_setup_release_the_runtimes_cannot_record_is_refused_naming_what_to_do(
        releases: tuple[ReleaseSpec, ...], match: str) -> None:
    class Declares(SetupLabelShareFedAvg):
        @classmethod
        def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
            return releases

    for name in _register(Declares):
        with pytest.raises(ConfigError, match=match):
            check_budget_plans(_setup_config(name), name, 3)


def test_a_setup_release_asked_for_in_a_round_or_never_made_is_refused(tmp_path: Path) -> None:
    """The setup mechanism called from client_update is refused before any draw; a
    client_setup that never makes its declared release stops the run before the server sees
    a reply."""
    from secure_fedora.algorithms.contract import ContractError

    class Late(SetupLabelShareFedAvg):
        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            value = label_share(self.ctx.clients[i].train_y, 64)
            self.ctx.privacy.gaussian(i, MECHANISM, value, self.ctx.noise[i])
            raise AssertionError("released")

    for name in _register(Late):
        with pytest.raises(UndeclaredReleaseError, match="outside the setup exchange.*make "
                                                         "it in client_setup"):
            Simulation(_setup_config(name), tmp_path / "late", keystore=tmp_path / "keys").run()

    class Never(SetupLabelShareFedAvg):
        def client_setup(self, i: int, message: Any) -> Any:
            return {ENTRY: torch.zeros(1, dtype=torch.float64)}

    for name in _register(Never):
        with pytest.raises(ContractError, match=r"without it being admitted and recorded"):
            Simulation(_setup_config(name), tmp_path / "never", keystore=tmp_path / "keys").run()


def test_a_cut_setup_record_of_a_release_that_left_refuses_the_resume(tmp_path: Path) -> None:
    """Killed once every setup release reached the server: the last client's journal record
    cut, nothing written after it proves it existed but round 0's mark, made before the
    first setup reply left. The resume is refused (CSPRNG noise would draw that release
    again under its one ledger entry) and changes no file."""
    from privacy.journal import JournalError
    from secure_fedora.core.crashpoints import InjectedCrash

    class Killed(SetupLabelShareFedAvg):
        def server_setup(self, replies: Any) -> None:
            raise InjectedCrash("killed after the setup replies left")

    for name in _register(Killed):
        cfg = _setup_config(name, noise="csprng", noise_multiplier=4.0)
        with pytest.raises(InjectedCrash):
            Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run()
        folder = tmp_path / "run" / "ledgers" / name
        journal = folder / "client-002.journal"
        assert len(journal.read_bytes().splitlines()) == 1
        journal.write_bytes(b"")
        before = {p: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        with pytest.raises(JournalError, match=r"client-002\.journal'.* marks this client's "
                                               "releases of rounds up to 0"):
            Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run(resume=True)
        assert {p: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} == before


# ------------------------------------------------- what leaves is what gaussian returned


@pytest.mark.parametrize("tamper", ["raw", "float32"])
def test_a_round_reply_that_is_not_the_plug_in_release_is_refused_before_it_leaves(
        tamper: str, tmp_path: Path) -> None:
    """client_update calls gaussian (the ledger records the noised value) but replies with
    the raw value, or the release cast to float32: refused naming method, client, entry and
    mechanism, before the server sees any reply."""
    from secure_fedora.algorithms.contract import ContractError

    class Raw(RawLabelShareFedAvg):
        seen: list[Any] = []
    Raw.tamper = tamper
    for name in _register(Raw):
        cfg = _config(name, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
        with pytest.raises(ContractError, match=rf"method '{name}': client 0's round reply "
                                                rf"entry '{ENTRY}' is not the '{MECHANISM}' "
                                                r"release ctx.privacy.gaussian returned.*"
                                                "Nothing was sent"):
            Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run()
    assert Raw.seen == []


def test_a_round_reply_entry_without_a_gaussian_call_is_refused(tmp_path: Path) -> None:
    """The plug-in entry carries a value gaussian never released (its entry on the ledger is
    unused): refused before it leaves."""
    from secure_fedora.algorithms.contract import ContractError

    class Skips(LabelShareFedAvg):
        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            return {**FedAvg.client_update(self, i, rnd, message),
                    ENTRY: label_share(self.ctx.clients[i].train_y, 64).reshape(1)}

    for name in _register(Skips):
        cfg = _config(name, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
        with pytest.raises(ContractError, match=rf"client 0's round reply entry '{ENTRY}' "
                                                rf"carries no '{MECHANISM}' release"):
            Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run()


def test_a_setup_reply_that_is_not_the_plug_in_release_is_refused_before_it_leaves(
        tmp_path: Path) -> None:
    """client_setup calls gaussian but replies with the raw value: refused before
    server_setup sees any reply."""
    from secure_fedora.algorithms.contract import ContractError

    class Raw(RawSetupLabelShareFedAvg):
        seen: list[Any] = []
    for name in _register(Raw):
        with pytest.raises(ContractError, match=rf"method '{name}': client 0's setup reply "
                                                rf"entry '{ENTRY}' is not the '{MECHANISM}' "
                                                "release"):
            Simulation(_setup_config(name), tmp_path / "run", keystore=tmp_path / "keys").run()
    assert Raw.seen == []


def test_a_reshaped_release_is_the_release_and_runs(tmp_path: Path) -> None:
    """The tensor gaussian returned, in another shape (the same dtype and bits), is sent."""
    class Reshaped(RawLabelShareFedAvg):
        tamper = "reshaped"
        seen: list[Any] = []
    for name in _register(Reshaped):
        cfg = _config(name, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
        Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keys").run()
    assert len(Reshaped.seen) == 3


def test_the_reply_entry_carrying_each_plug_in_mechanism_is_linked_or_refused() -> None:
    """The entry named as the mechanism carries it; else the one entry added to the
    built-in ancestor's carries the one mechanism; two mechanisms and one added entry do
    not say which: refused naming what to do. Without DP nothing is linked."""
    from secure_fedora.algorithms.contract import ContractError, ReplyRules

    for name in _register(LabelShareFedAvg):
        cfg = _config(name, **{MECHANISM: {"noise_multiplier": 5.0}})
        assert ReplyRules.of(name, LabelShareFedAvg, cfg).plug_in_entries == {
            ROUND: {ENTRY: MECHANISM}}
        plain = parse_config({**json.loads(json.dumps(TINY)), "methods": [name]})
        assert ReplyRules.of(name, LabelShareFedAvg, plain).plug_in_entries == {}
    for name in _register(SetupLabelShareFedAvg):
        assert ReplyRules.of(name, SetupLabelShareFedAvg, _setup_config(name)).plug_in_entries \
            == {SETUP: {ENTRY: MECHANISM}}

    class Named(_with_mechanisms(MECHANISM, SECOND)):  # type: ignore[misc]
        @classmethod
        def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
            entries = super().reply_entries(cfg, stage)
            return {**entries, SECOND: "noised"} if stage == ROUND else entries

    both = {MECHANISM: {"noise_multiplier": 5.0}, SECOND: {"noise_multiplier": 5.0}}
    for name in _register(Named):
        assert ReplyRules.of(name, Named, _config(name, **both)).plug_in_entries == {
            ROUND: {SECOND: SECOND, ENTRY: MECHANISM}}
    two = _with_mechanisms(MECHANISM, SECOND)
    for name in _register(two):
        with pytest.raises(ContractError, match=r"which round reply entry carries plug-in "
                                                r"mechanism\(s\).*name the entry carrying"):
            ReplyRules.of(name, two, _config(name, **both))


def test_the_contract_and_the_plan_agree_on_the_built_in_gaussian_mechanisms() -> None:
    """The contract tells plug-in mechanisms from built-in ones by name (its reply rules
    cannot import the plan's layer); both must name the same built-ins."""
    from secure_fedora.algorithms.contract import BUILT_IN_GAUSSIAN_MECHANISMS
    from secure_fedora.secure.private import FIXED_NOISE_MECHANISMS

    assert set(FIXED_NOISE_MECHANISMS) == BUILT_IN_GAUSSIAN_MECHANISMS
