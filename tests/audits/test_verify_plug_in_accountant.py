"""A plug-in accountant (registered with :func:`privacy.accounting.register_accountant`,
outside the package) works end to end: a DP run under it records its name and parameters in
every ledger entry, spends and enforces the budget by its epsilons, replays its ledger with it
after a crash and resume, and ``audit verify`` recomputes its epsilons when its module is
imported (``imports=``, CLI ``--import``); without it, the audit says so by name in unchecked
warnings (errors with ``strict=True``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audits.verify import verify_run
from privacy.accounting import (
    Accountant,
    BudgetExceededError,
    MechanismRecord,
    PrivacyBudget,
)
from privacy.identity import load_identity
from privacy.ledger import (
    LedgerWriter,
    canonical_json,
    line_hash,
    read_ledger,
    replay_accountant,
    signing_payload,
)
from privacy.pipeline import BudgetGate, Release, ReleasePipeline
from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.runtimes.inprocess import Simulation
from tests.privacy import accountant_plugin
from tests.privacy.accountant_plugin import MARGIN, NAME
from tests.secure_fedora.core.crash_support import crashes_at
from tests.secure_fedora.runtimes.test_crash_resume import config_dict

MODULE = accountant_plugin.__name__
CLIENTS = ("client-000", "client-001", "client-002")


def _rdp_alone(entries: list[dict]) -> Accountant:
    """The built-in RDP accountant fed the ledger's releases (what the plug-in pads)."""
    acc = Accountant("rdp")
    for e in entries:
        if e["mechanism"] not in ("refusal", "repair", "close"):
            p = e["params"]
            acc.record(p["noise_multiplier"], p["sample_rate"], p["steps"])
    return acc


@pytest.fixture(scope="module")
def plug_in_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FedAvg with private DP-SGD under the plug-in accountant, 3 clients, 2 rounds: killed
    inside round 2 (after its first local steps) and resumed; its key store beside it."""
    base = tmp_path_factory.mktemp("plug_in_accountant")
    doc = config_dict(["fedavg"], True, rounds=2)
    doc["privacy"]["accountant"] = NAME
    cfg = parse_config(doc)
    with crashes_at("train@5"):
        Simulation(cfg, base / "run", keystore=base / "keys").run()
    before = accountant_plugin.CALLS[0]
    Simulation(cfg, base / "run", keystore=base / "keys").run(resume=True)
    assert (base / "run" / "results.json").exists()
    assert accountant_plugin.CALLS[0] >= before  # cached figures are the plug-in's too
    return base / "run"


@pytest.fixture
def run(plug_in_run: Path, tmp_path: Path) -> Path:
    """A copy of the plug-in run (its key store at ``tmp_path / "keys"``)."""
    shutil.copytree(plug_in_run, tmp_path / "run")
    shutil.copytree(plug_in_run.parent / "keys", tmp_path / "keys")
    shutil.copyfile(plug_in_run / "anchor.json", tmp_path / "anchor.json")  # kept apart
    return tmp_path / "run"


@pytest.fixture
def fresh_auditor() -> Iterator[None]:
    """This process as an auditor's that never imported the plug-in module: its accountant
    unregistered and the module unimported; both put back afterwards."""
    with accountant_plugin.unregistered():
        yield


def test_the_run_ledgers_spends_and_resumes_under_the_plug_in(plug_in_run: Path) -> None:
    """Every entry names the plug-in and records its parameters; each client's reported
    spend is its ledger replayed with the plug-in (the resume replayed it so), which is the
    padded RDP value, not the built-in's; the plan was calibrated with it, within budget."""
    results = json.loads((plug_in_run / "results.json").read_text())
    section = results["privacy"]["fedavg"]
    assert section["accountant"] == NAME
    for client in section["clients"]:
        entries = read_ledger(plug_in_run / "ledgers" / "fedavg" / f"{client['client']}.jsonl")
        assert {e["accountant"] for e in entries} == {NAME}
        params = {json.dumps(e["params"]["accountant_params"], sort_keys=True)
                  for e in entries if e["mechanism"] == "dpsgd"}
        assert [json.loads(p) for p in params] == [Accountant(NAME).parameters]
        assert json.loads(params.pop())["relative_margin"] == MARGIN
        replayed = replay_accountant(entries)
        assert replayed.kind == NAME
        spent = replayed.epsilon(client["delta"])
        assert spent == client["epsilon_spent"] == entries[-1]["epsilon_after"]
        rdp = _rdp_alone(entries).epsilon(client["delta"])
        assert spent == pytest.approx(rdp * (1 + MARGIN), rel=1e-12) and spent > rdp
        assert spent <= client["epsilon_budget"]
        assert len([e for e in entries if e["mechanism"] == "dpsgd"]) == 2  # both rounds


def test_the_gate_enforces_the_budget_by_the_plug_ins_epsilon(tmp_path: Path) -> None:
    """A release whose built-in RDP epsilon fits the budget but whose plug-in epsilon does
    not is refused, and the refusal is ledgered under the plug-in."""
    release = MechanismRecord("dpsgd", 1.0, 0.1, 20, {"clip_norm": 1.0})
    rdp = Accountant("rdp")
    rdp.record(1.0, 0.1, 20)
    budget = PrivacyBudget(rdp.epsilon(1e-5) * (1 + MARGIN / 2), 1e-5)
    ledger = LedgerWriter(tmp_path / "c1.jsonl", "c1", Ed25519PrivateKey.generate())
    pipe = ReleasePipeline([BudgetGate(Accountant(NAME), budget, ledger, "c1")])
    with pytest.raises(BudgetExceededError):
        pipe.run(Release("model", torch.zeros(2), 0, [release]))
    (refusal,) = read_ledger(tmp_path / "c1.jsonl")
    assert refusal["mechanism"] == "refusal" and refusal["accountant"] == NAME


def test_the_audit_recomputes_the_plug_ins_epsilons_when_imported(
        run: Path, fresh_auditor: None) -> None:
    report = verify_run(run, allowlist=run.parent / "keys" / "allowlist.json",
                        anchor=run.parent / "anchor.json", imports=[MODULE], strict=True)
    assert report.ok, [str(f) for f in report.errors]
    assert not [f for f in report.findings if f.check == "plug_in_accountant"]
    (imported,) = report.imported
    assert imported.module == MODULE and f"accountant {NAME!r}" in imported.entries
    assert all(c.accountant == NAME and c.independent_final_epsilon is not None
               for c in report.clients)


def test_without_the_plug_in_the_audit_warns_naming_it_and_fails_strict(
        run: Path, fresh_auditor: None) -> None:
    """Not a silent pass and not a crash: as for a plug-in mechanism, the config names an
    accountant this process has not registered and each ledger says its epsilons were not
    recomputed with it (unchecked warnings; the independent PLD check ran); strict fails."""
    report = verify_run(run, allowlist=run.parent / "keys" / "allowlist.json")
    assert report.ok, [str(f) for f in report.errors]
    named = [f for f in report.findings if f.check == "config" and f"accountant {NAME!r}"
             in f.message]
    assert len(named) == 1 and named[0].unchecked and "imports=" in named[0].message
    unchecked = [f for f in report.findings if f.check == "plug_in_accountant"]
    assert sorted(f.client_id for f in unchecked) == list(CLIENTS)
    assert all(f.severity == "warning" and f.unchecked and NAME in f.message
               and "register_accountant" in f.message for f in unchecked)
    strict = verify_run(run, allowlist=run.parent / "keys" / "allowlist.json",
                        anchor=run.parent / "anchor.json", strict=True)
    assert not strict.ok
    assert {f.check for f in strict.errors} == {"config", "plug_in_accountant"}


def test_the_imported_plug_in_catches_a_resigned_epsilon(run: Path) -> None:
    """An epsilon_after raised by 0.05% and the ledger re-signed (its head then differs from
    results.json's, a separate error): it stays above the independent PLD, so only the
    plug-in's own recomputation sees it, an error at that entry."""
    cid = "client-001"
    path = run / "ledgers" / "fedavg" / f"{cid}.jsonl"
    key = load_identity(run.parent / "keys", cid).signing_key
    lines = path.read_text().splitlines()
    out: list[str] = []
    for pos, line in enumerate(lines):
        entry = json.loads(line)
        if pos == 0:
            entry["epsilon_after"] *= 1.0005
        entry["prev_hash"] = line_hash(out[-1]) if out else entry["prev_hash"]
        entry.pop("signature")
        entry["signature"] = key.sign(signing_payload(entry)).hex()
        out.append(canonical_json(entry))
    path.write_text("\n".join(out) + "\n")
    report = verify_run(run, imports=[MODULE])
    assert [(f.client_id, f.entry) for f in report.errors
            if f.check == "plug_in_accountant"] == [(cid, 0)]
    # the independent PLD check alone does not see it
    assert not [f for f in report.errors if f.check.startswith("epsilon")]


def test_a_run_config_naming_an_unregistered_accountant_is_refused_by_name(
        fresh_auditor: None) -> None:
    """Outside the audits' reading of a run's config.toml, an accountant this process has
    not registered is refused, naming it and how a plug-in registers one; nothing runs."""
    doc = config_dict(["fedavg"], True)
    doc["privacy"]["accountant"] = NAME
    with pytest.raises(ConfigError, match=rf"got '{NAME}' \(a plug-in accountant is registered"
                                          r" by importing the module that calls"
                                          r" privacy.accounting.register_accountant; the CLI"
                                          r" and the Flower apps.* secure_fedora/contrib/\)"):
        parse_config(doc)


def test_a_conservative_plug_in_draws_one_over_reported_warning_per_ledger(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The padded plug-in records more than the independent PLD at every entry: one
    ``epsilon_over_reported`` warning per ledger (not one per entry), at the entry of the
    largest gap, saying how many entries are above and by how much; the CLI's summary table
    keeps its columns aligned under the plug-in's long accountant name."""
    from audits.cli import main

    report = verify_run(run, imports=[MODULE])
    # the page's "Independent accountant" line names how the plug-in's ledgers were checked
    assert f"PLD at checkpoints ('prv', 'pld', {NAME!r} ledgers;" \
        in report.independent_accountant
    over = [f for f in report.warnings if f.check == "epsilon_over_reported"]
    assert sorted(f.client_id for f in over) == list(CLIENTS)
    for f in over:
        (checked,) = [c for c in report.clients if c.client_id == f.client_id]
        gaps = {e.index: e.recorded_epsilon / e.independent_epsilon
                for e in checked.series if e.independent_epsilon}
        worst = max(gaps, key=lambda i: (gaps[i], i))
        assert f.entry == worst
        assert f"{len(gaps)} of the {len(gaps)} entries compared" in f.message
        assert f"largest gap is at entry {worst}" in f.message
        assert f"(+{gaps[worst] - 1:.1%})" in f.message
    capsys.readouterr()
    assert main(["audit", "verify", str(run), "--import", MODULE]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method "))
    row = lines[header + 1]
    assert row.split()[3] == NAME
    for heading in ("eps recorded", "independent", "refused", "warn"):  # right-aligned
        end = lines[header].index(heading) + len(heading)
        assert row[end - 1] != " " and (end == len(row) or row[end] == " "), heading
