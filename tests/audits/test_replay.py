"""The config-known replay audit: reproducible noise is refuted, CSPRNG noise is not."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import tomli_w

from audits.cli import main
from audits.replay import (
    NoPrivacyClaimError,
    ReplayAuditError,
    certifiable_max,
    run_replay_audit,
    trials_for_claim,
)
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import Simulation
from tests.audits.conftest import bad_allowlists

BASE = {
    "seed": 5,
    "methods": ["local"],
    "data": {"num_clients": 2, "train_per_client": 100, "val_per_client": 20,
             "test_per_client": 20, "groups": 2},
    "training": {"rounds": 1, "local_epochs": 1, "batch_size": 25, "lr": 0.05},
    # Fixed noise (no calibration): one round of 4 steps at sigma 2 records epsilon ~0.99.
    "privacy": {"enabled": True, "epsilon": 50.0, "delta": 1e-3, "noise_multiplier": 2.0},
}


def _run(root: Path, doc: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(tomli_w.dumps(doc))
    Simulation(parse_config(doc), root).run()
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("replay")
    return {mode: _run(base / mode, {**BASE, "privacy": {**BASE["privacy"], "noise": mode}})
            for mode in ("reproducible", "csprng")}


def test_reproducible_run_is_refuted_and_csprng_run_is_not(runs, capsys):
    assert main(["audit", "replay", str(runs["reproducible"]), "--trials", "40"]) == 1
    doc = json.loads((runs["reproducible"] / "audit" / "replay.json").read_text())
    assert set(doc) == {"audit", "claim_epsilon", "certifiable_max", "lower_bound", "verdict",
                        "verdict_text", "trials", "correct", "confidence", "setup", "unchecked"}
    assert doc["unchecked"] == []
    assert doc["audit"] == "replay" and doc["confidence"] == 0.95 and doc["trials"] == 40
    assert 0.5 < doc["claim_epsilon"] < 1.5 < doc["certifiable_max"]
    assert doc["correct"] == 40  # every membership bit recovered by replaying the noise
    assert doc["lower_bound"] == doc["certifiable_max"] > doc["claim_epsilon"]
    assert doc["verdict"] == "refuted" and doc["setup"]["noise"] == "reproducible"
    assert "refuted" in capsys.readouterr().out

    assert main(["audit", "replay", str(runs["csprng"]), "--trials", "40"]) == 0
    doc = json.loads((runs["csprng"] / "audit" / "replay.json").read_text())
    assert doc["verdict"] == "consistent" and doc["setup"]["noise"] == "csprng"
    assert doc["lower_bound"] <= doc["claim_epsilon"]
    assert doc["correct"] < 35  # no better than a DP-bounded guess


def test_power_and_trial_choice():
    # 20 of 20 members found, 0 of 20 false positives: TPR_lo = 0.025^(1/20) = 0.8315,
    # FPR_hi = 1 - 0.8315, bound log((0.8315 - 0.001) / 0.1685) = 1.596.
    assert certifiable_max(40, 1e-3) == pytest.approx(1.596, abs=0.002)
    assert certifiable_max(4000, 1e-5) > certifiable_max(400, 1e-5) > certifiable_max(40, 1e-5)
    trials = trials_for_claim(3.0, 1e-5)
    assert certifiable_max(trials, 1e-5) > 3.3 and certifiable_max(trials - 200, 1e-5) < 3.3 * 1.05
    assert trials_for_claim(50.0, 1e-5, cap=1000) == 1000


def test_inconclusive_when_the_trials_cannot_reach_the_claim(runs):
    # 8 trials: even a perfect attacker certifies ~0, below the claim: never "consistent".
    result = run_replay_audit(runs["reproducible"], trials=8)
    assert result.correct == 8 and result.certifiable_max < result.claim_epsilon
    assert result.verdict == "inconclusive"


def test_replay_exits_and_words_its_verdict_as_canary_and_whitebox(runs, capsys):
    """`audit replay` exited 0 for an inconclusive audit (canary and whitebox exit 3: a
    design that could not refute the claim is no pass) and worded the same figures another
    way ("epsilon lower bound X (certifiable max Y) ... -> verdict", "written to"). It now
    exits 3 and prints the claim, certifiable maximum, lower bound and verdict text in the
    canary's and white-box's lines."""
    from audits.verdict import audit_figures, verdict_text

    run = runs["reproducible"]
    assert main(["audit", "replay", str(run), "--trials", "8"]) == 3
    out = capsys.readouterr().out
    doc = json.loads((run / "audit" / "replay.json").read_text())
    assert doc["verdict"] == "inconclusive"
    claim, (lower, most) = audit_figures(doc["claim_epsilon"], doc["lower_bound"],
                                         doc["certifiable_max"])
    assert (f"  claimed epsilon {claim}; certifiable maximum {most} (a perfect attacker,"
            f" confidence 0.95); measured lower bound {lower}\n") in out
    text = verdict_text("inconclusive", doc["claim_epsilon"], doc["certifiable_max"],
                        doc["lower_bound"])
    assert f"  verdict: {text}\n" in out and text.startswith("inconclusive: ")
    assert f"  written: {run / 'audit' / 'replay.json'}\n" in out


def test_runs_that_cannot_be_audited_are_refused(runs, tmp_path, capsys):
    with pytest.raises(ReplayAuditError, match="config.toml"):
        run_replay_audit(tmp_path)
    plain = {**BASE, "privacy": {"enabled": False}}
    (tmp_path / "config.toml").write_text(tomli_w.dumps(plain))
    with pytest.raises(ReplayAuditError, match="not differentially private"):
        run_replay_audit(tmp_path)
    with pytest.raises(ReplayAuditError, match="client"):
        run_replay_audit(runs["csprng"], client=2)
    with pytest.raises(ReplayAuditError, match="method"):
        run_replay_audit(runs["csprng"], method="fedavg")
    with pytest.raises(ReplayAuditError, match="trials"):
        run_replay_audit(runs["csprng"], trials=1)
    # a TypeError ('<' between int and NoneType) and torch's RuntimeError ('manual_seed
    # expected a long') before
    with pytest.raises(ReplayAuditError, match="confidence must be in"):
        run_replay_audit(runs["csprng"], confidence=None)
    for seed in (None, 1.5, "0", True, -1, 2**64):
        with pytest.raises(ReplayAuditError, match="seed must be an integer"):
            run_replay_audit(runs["csprng"], seed=seed)
    assert main(["audit", "replay", str(tmp_path)]) == 3  # no DP claim: as `audit verify`
    assert "no differential-privacy claim" in capsys.readouterr().out


@pytest.mark.parametrize("given, flag", [
    ({"trials": 1}, "--trials"), ({"confidence": 2.0}, "--confidence"), ({"seed": -1}, "--seed"),
    ({"client": 5}, "--client"), ({"records": 0}, "--records"),
])
def test_a_bad_argument_is_bad_input_also_for_a_run_without_a_dp_claim(tmp_path, capsys,
                                                                       given, flag):
    """A bad argument is exit 2 naming its flag whatever the run holds, as in `audit canary`
    and `whitebox`: a run without a DP claim does not answer it with exit 3."""
    plain = {**BASE, "privacy": {"enabled": False}}
    (tmp_path / "config.toml").write_text(tomli_w.dumps(plain))
    with pytest.raises(ReplayAuditError) as err:
        run_replay_audit(tmp_path, **given)
    assert not isinstance(err.value, NoPrivacyClaimError)
    argv = [a for key, value in given.items() for a in (f"--{key}", str(value))]
    assert main(["audit", "replay", str(tmp_path), *argv]) == 2
    assert flag in capsys.readouterr().err

def test_a_config_edited_to_disable_privacy_does_not_hide_a_dp_run(run_copy, capsys):
    """`audit replay` read privacy.enabled from config.toml alone: a DP run whose config was
    edited to disable privacy was 'not differentially private'. The signed anchor, ledgers/
    and results.json still claim DP: the edit is named and the run is not audited (exit 2)."""
    from tests.audits.test_verify import _stripped_of_dp

    _stripped_of_dp(run_copy)
    with pytest.raises(ReplayAuditError, match="config.toml was changed after the run") as err:
        run_replay_audit(run_copy)
    assert not isinstance(err.value, NoPrivacyClaimError)
    assert "anchor.json is present" in str(err.value)
    assert main(["audit", "replay", str(run_copy)]) == 2
    assert "claims differential privacy" in capsys.readouterr().err


def test_a_run_with_a_model_factory_replays_its_own_model(tmp_path, monkeypatch):
    """The replayed step runs the run's model and loss (here a model.factory, binary BCE on a
    table), not the registered MLP."""
    folder = tmp_path / "plug"
    folder.mkdir()
    (folder / "replay_table.py").write_text(
        "import torch\n\n\n"
        "def load(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x = torch.randn(300, 5, generator=g)\n"
        "    y = (x[:, 0] > 0).long()\n"
        "    return {'x_train': x[:240], 'y_train': y[:240], 'x_test': x[240:], 'y_test': y[240:],\n"
        "            'num_classes': 2}\n"
        "\n\n"
        "def linear(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))\n")
    monkeypatch.syspath_prepend(str(folder))  # a run directory's plug-ins come from PYTHONPATH
    doc = {**BASE, "data": {"source": "replay_table:load", "partition": "iid", "num_clients": 2,
                            "train_per_client": 100, "val_per_client": 10, "test_per_client": 10},
           "model": {"factory": "replay_table:linear"},
           "training": {**BASE["training"], "loss": "bce"},
           "privacy": {**BASE["privacy"], "noise": "reproducible"}}
    run = _run(tmp_path / "run", doc)
    result = run_replay_audit(run, trials=40, records=16)
    assert result.correct == 40 and result.verdict == "refuted"
    with pytest.raises(ReplayAuditError, match="records must be in"):
        run_replay_audit(run, trials=40, records=100)


def test_the_default_record_count_fits_a_client_smaller_than_it(tmp_path, capsys):
    """64 records besides the target by default, fewer for a client with fewer rows (the
    default used to be refused for any run with train_per_client <= 64)."""
    doc = {**BASE, "data": {**BASE["data"], "train_per_client": 30, "val_per_client": 10},
           "training": {**BASE["training"], "batch_size": 10},
           "privacy": {**BASE["privacy"], "noise": "reproducible"}}
    run = _run(tmp_path / "small", doc)
    assert main(["audit", "replay", str(run)]) == 1
    assert json.loads((run / "audit" / "replay.json").read_text())["verdict"] == "refuted"
    assert run_replay_audit(run, trials=20).correct == 20  # every membership bit recovered
    # the Python API names its argument, the CLI its flag
    with pytest.raises(ReplayAuditError,
                       match=r"records must be in \[1, 30\) \(the records= argument;"):
        run_replay_audit(run, trials=20, records=30)
    capsys.readouterr()
    assert main(["audit", "replay", str(run), "--records", "30"]) == 2
    assert "records must be in [1, 30) (--records;" in capsys.readouterr().err


def test_a_run_directory_cannot_supply_code_to_its_auditor(tmp_path, monkeypatch, capsys):
    """A module planted in the run directory under review is never imported by the audits
    that retrain (they take plug-ins from PYTHONPATH only); the error says where to look."""
    folder = tmp_path / "plug"
    folder.mkdir()
    source = ("import pathlib, torch\n"
              "pathlib.Path(__file__).with_name('IMPORTED').touch()\n\n\n"
              "def load(seed):\n"
              "    g = torch.Generator().manual_seed(seed)\n"
              "    x = torch.randn(300, 5, generator=g)\n"
              "    return {'x_train': x[:240], 'y_train': (x[:240, 0] > 0).long(),\n"
              "            'x_test': x[240:], 'y_test': (x[240:, 0] > 0).long(), 'num_classes': 2}\n")
    (folder / "planted_table.py").write_text(source)
    doc = {**BASE, "data": {"source": "planted_table:load", "partition": "iid", "num_clients": 2,
                            "train_per_client": 100, "val_per_client": 10, "test_per_client": 10},
           "privacy": {**BASE["privacy"], "noise": "reproducible"}}
    with monkeypatch.context() as m:
        m.syspath_prepend(str(folder))
        run = _run(tmp_path / "run", doc)
    del sys.modules["planted_table"]
    (folder / "IMPORTED").unlink()
    (run / "planted_table.py").write_text(source)  # the directory offers the module itself
    assert main(["audit", "replay", str(run), "--trials", "20"]) == 2
    err = capsys.readouterr().err
    assert "does not import (searched sys.path)" in err and "PYTHONPATH" in err
    assert not (run / "IMPORTED").exists()
    monkeypatch.syspath_prepend(str(folder))  # the auditor's own choice of code
    assert run_replay_audit(run, trials=20).correct == 20


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("audit"))  # no earlier result
    return dest


def _ledger(run: Path) -> Path:
    return run / "ledgers" / "local" / "client-000.jsonl"


@pytest.mark.parametrize("last", [
    '{not json', '[1,2]', "\x00\xff\xfe binary", "",
    lambda e: e.pop("epsilon_after"), lambda e: e["params"].pop("sample_rate"),
    lambda e: e.__setitem__("epsilon_after", "2.5"),
    lambda e: e["params"].__setitem__("noise_multiplier", "abc"),
    lambda e: e.__setitem__("params", "a string"),
    lambda e: e.__setitem__("epsilon_after", 0.001),  # an edited (lowered) claim
], ids=["not-json", "list", "binary", "empty", "no-epsilon", "no-sample-rate", "string-epsilon",
        "string-sigma", "params-string", "edited-claim"])
def test_a_malformed_or_edited_ledger_is_an_error_not_a_traceback(runs, tmp_path, capsys, last):
    """The claim was read with bare json.loads/float and no chain or signature check:
    tracebacks for malformed lines, and an edited claim gave a verdict."""
    run = _copy(runs["reproducible"], tmp_path / "run")
    lines = _ledger(run).read_text().splitlines()
    if callable(last):
        first = json.loads(lines[0])
        last(first)
        lines[0] = json.dumps(first, sort_keys=True, separators=(",", ":"))
    else:
        lines[0] = last
    _ledger(run).write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    assert main(["audit", "replay", str(run), "--trials", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ledger ledgers/local/client-000.jsonl fails verification")
    assert "Traceback" not in err and not (run / "audit" / "replay.json").exists()


def test_a_nan_figure_is_never_written_as_bare_nan(tmp_path):
    from audits.replay import ReplayAuditResult, write_replay_result

    result = ReplayAuditResult(claim_epsilon=float("nan"), certifiable_max=1.6, lower_bound=0.1,
                               verdict="consistent", trials=40, correct=20, confidence=0.95)
    with pytest.raises(ReplayAuditError, match="strict JSON"):
        write_replay_result(tmp_path, result)
    assert not (tmp_path / "audit" / "replay.json").exists()


def test_an_edited_noise_mode_in_config_toml_is_refused(runs, tmp_path, capsys):
    """noise = "csprng" written into a reproducible run's config.toml turned "refuted" into
    "consistent": the ledgers (signed) record the noise mode, anchor.json the config's digest."""
    run = _copy(runs["reproducible"], tmp_path / "run")
    cfg = run / "config.toml"
    cfg.write_text(cfg.read_text().replace('"reproducible"', '"csprng"'))
    assert main(["audit", "replay", str(run), "--trials", "20"]) == 2
    assert "config.toml is not the one anchor.json records" in capsys.readouterr().err
    (run / "anchor.json").unlink()  # the ledgers alone still say which noise the run drew
    assert main(["audit", "replay", str(run), "--trials", "20"]) == 2
    err = capsys.readouterr().err
    assert "records params.noise 'reproducible', config.toml gives privacy.noise = 'csprng'" in err


def test_a_nan_claim_is_refused_not_consistent(runs, tmp_path, capsys):
    """A NaN last epsilon_after compared False both ways: the verdict was "consistent"."""
    run = _copy(runs["csprng"], tmp_path / "run")
    lines = _ledger(run).read_text().splitlines()
    close = json.loads(lines[-1])
    close["epsilon_after"] = float("nan")
    lines[-1] = json.dumps(close, sort_keys=True, separators=(",", ":"))
    _ledger(run).write_text("\n".join(lines) + "\n")
    assert main(["audit", "replay", str(run), "--trials", "20"]) == 2
    err = capsys.readouterr().err
    assert "fails verification, its claim is not trusted" in err
    assert not (run / "audit" / "replay.json").exists()


def _resign_with_a_foreign_key(run: Path, method: str = "local") -> None:
    """The run's owner re-signs client 0's ledger with a fresh key and swaps that key into the
    run's own keys/allowlist.json (removing the .pub file that would contradict it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.identity import client_ids
    from privacy.ledger import canonical_json, line_hash, signing_payload

    cid = client_ids(2)[0]
    forger = Ed25519PrivateKey.generate()
    path = run / "ledgers" / method / f"{cid}.jsonl"
    out, prev = [], "0" * 64
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        entry["prev_hash"] = prev
        entry.pop("signature")
        entry["signature"] = forger.sign(signing_payload(entry)).hex()
        out.append(canonical_json(entry))
        prev = line_hash(out[-1])
    path.write_text("\n".join(out) + "\n")
    allow = run / "keys" / "allowlist.json"
    doc = json.loads(allow.read_text())
    doc["parties"][cid]["ed25519"] = forger.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    allow.write_text(json.dumps(doc))
    (run / "keys" / f"{cid}.ed25519.pub").unlink(missing_ok=True)


def test_a_ledger_resigned_with_a_foreign_key_fails_the_independent_allowlist(runs, tmp_path,
                                                                              capsys):
    import shutil

    trusted = tmp_path / "trusted-allowlist.json"
    shutil.copyfile(runs["reproducible"] / "keys" / "allowlist.json", trusted)
    run = shutil.copytree(runs["reproducible"], tmp_path / "run")
    _resign_with_a_foreign_key(run)
    # the directory is self-consistent: its own allowlist vouches for the forger's key
    assert main(["audit", "replay", str(run), "--trials", "8"]) == 3  # inconclusive
    capsys.readouterr()
    assert main(["audit", "replay", str(run), "--trials", "8", "--allowlist", str(trusted)]) == 2
    err = capsys.readouterr().err
    # the swapped key in the run's own keys/allowlist.json is refused first
    assert err.count("\n") == 1 and err.startswith("error: ledgers/local/")
    assert "lists other keys for 'client-000' than the given allowlist" in err
    # with the run's allowlist left as it was, the forger's signatures are refused
    shutil.copyfile(trusted, run / "keys" / "allowlist.json")
    assert main(["audit", "replay", str(run), "--trials", "8", "--allowlist", str(trusted)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ledger ledgers/local/")
    assert "fails verification" in err and "signature" in err
    with pytest.raises(ReplayAuditError, match="allowlist .* does not exist"):
        run_replay_audit(run, trials=8, allowlist=tmp_path / "missing.json")


def test_a_valid_run_passes_with_the_allowlist_and_anchor_kept_apart(runs, tmp_path, capsys):
    import shutil

    trusted = tmp_path / "trusted-allowlist.json"
    kept = tmp_path / "anchor-copy.json"
    shutil.copyfile(runs["csprng"] / "keys" / "allowlist.json", trusted)
    shutil.copyfile(runs["csprng"] / "anchor.json", kept)
    assert main(["audit", "replay", str(runs["csprng"]), "--trials", "40",
                 "--allowlist", str(trusted), "--anchor", str(kept)]) == 0
    assert json.loads((runs["csprng"] / "audit" / "replay.json").read_text())["verdict"] \
        == "consistent"
    # the anchor copy is checked as `audit verify --anchor` checks it: a replaced anchor.json
    # in the run directory, or a missing copy, is refused
    run = shutil.copytree(runs["csprng"], tmp_path / "run")
    doc = json.loads((run / "anchor.json").read_text())
    doc["created"] = "forged"
    (run / "anchor.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["audit", "replay", str(run), "--trials", "8", "--anchor", str(kept)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from the given anchor" in err
    with pytest.raises(ReplayAuditError, match="anchor .* does not exist"):
        run_replay_audit(run, trials=8, anchor=tmp_path / "missing.json")


def _run_with_copies_kept_apart(source: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the run ``source`` (without its audit/ folder), and copies of its allowlist
    and anchor kept apart from it: (run, allowlist copy, anchor copy)."""
    import shutil

    run = shutil.copytree(source, tmp_path / "run")
    shutil.rmtree(run / "audit", ignore_errors=True)
    trusted = tmp_path / "trusted-allowlist.json"
    kept = tmp_path / "anchor-copy.json"
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    shutil.copyfile(run / "anchor.json", kept)
    return run, trusted, kept


def test_replay_with_the_allowlist_and_anchor_kept_apart_scans_the_run_once(runs, tmp_path,
                                                                            monkeypatch):
    """`audit replay --allowlist --anchor` scanned the run for keys twice (the anchor's check
    with the allowlist, then the ledger's): each scan reads every file of the run. It is now
    scanned once, and what that scan could not check (here: no published allowlist) is
    still the result's ``unchecked``."""
    import audits.verify as verify

    run, trusted, kept = _run_with_copies_kept_apart(runs["csprng"], tmp_path)
    (run / "keys" / "allowlist.json").unlink()  # checked against the given one alone
    scans = []
    scan = verify.private_key_files
    monkeypatch.setattr(verify, "private_key_files", lambda d: scans.append(d) or scan(d))
    result = run_replay_audit(run, trials=8, allowlist=trusted, anchor=kept)
    assert scans == [run]
    (note,) = result.unchecked
    assert "does not state who could sign it" in note and str(trusted) in note



def test_replay_loads_the_allowlist_and_anchor_kept_apart_once(runs, tmp_path, monkeypatch):
    """`audit replay --allowlist --anchor` loaded the anchor copy up front, again in the
    anchor's check and once more in its comparison with the run, and the allowlist up
    front, again in the anchor's check and again for the ledger. Each is now loaded once
    (the same checks: a run that does not match the anchor is still refused)."""
    import audits.verify as verify

    run, trusted, kept = _run_with_copies_kept_apart(runs["csprng"], tmp_path)
    loads: list[Path] = []
    load_allowlist, load_anchor = verify.load_allowlist, verify._load_anchor
    monkeypatch.setattr(verify, "load_allowlist",
                        lambda p: loads.append(Path(p)) or load_allowlist(p))
    monkeypatch.setattr(verify, "_load_anchor", lambda p: loads.append(Path(p)) or load_anchor(p))
    run_replay_audit(run, trials=8, allowlist=trusted, anchor=kept)
    assert loads.count(trusted) == 1 and loads.count(kept) == 1, loads
    results = json.loads((run / "results.json").read_text())
    results["note"] = "edited after the run"
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(ReplayAuditError, match=r"the run does not match the anchor .*results"):
        run_replay_audit(run, trials=8, allowlist=trusted, anchor=kept)

def test_a_malformed_given_allowlist_is_named_as_bad_input_not_as_a_ledger_problem(
        runs, tmp_path, capsys):
    """`audit replay --allowlist FILE` with FILE not an allowlist said "cannot verify
    ledgers/local/client-000.jsonl before trusting its claim: ..." (with --anchor: "cannot
    check the anchor ..."), which reads as a problem of the run. Now the message `audit verify`
    gives for the same input: the flag, what is wrong with FILE, what to give instead."""
    run = runs["csprng"]
    kept = tmp_path / "anchor-copy.json"
    kept.write_bytes((run / "anchor.json").read_bytes())
    for bad in bad_allowlists(run, tmp_path).values():
        for anchor in ([], ["--anchor", str(kept)]):
            capsys.readouterr()
            assert main(["audit", "replay", str(run), "--trials", "8", "--allowlist", str(bad),
                         *anchor]) == 2
            captured = capsys.readouterr()
            assert captured.out == "" and captured.err.count("\n") == 1
            assert captured.err.startswith(
                f"error: --allowlist: allowlist {'file ' if 'not-JSON' in bad.name else ''}{bad}")
            assert captured.err.endswith("; give the allowlist.json registered for the run's "
                                         "parties\n")
        with pytest.raises(ReplayAuditError, match=r"^the allowlist= argument: allowlist .*; give "
                                                   r"the allowlist.json registered for the run's "
                                                   r"parties$"):
            run_replay_audit(run, trials=8, allowlist=bad)


def test_replay_with_an_allowlist_compares_the_published_allowlist(runs, tmp_path, capsys):
    """`audit replay --allowlist` (with and without --anchor) trusted a run whose
    keys/allowlist.json lists a party the given allowlist does not register: only
    `audit verify` compared them."""
    import shutil

    from privacy.identity import Identity, allowlist_bytes, load_allowlist

    run = shutil.copytree(runs["csprng"], tmp_path / "run")
    trusted = tmp_path / "trusted-allowlist.json"
    kept = tmp_path / "anchor-copy.json"
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    shutil.copyfile(run / "anchor.json", kept)
    published = run / "keys" / "allowlist.json"
    keys = load_allowlist(published)
    published.write_bytes(allowlist_bytes({**keys, "auditor": Identity.generate("auditor").public}))
    # nothing to compare with (inconclusive: 8 trials cannot certify the claim)
    assert main(["audit", "replay", str(run), "--trials", "8"]) == 3
    for extra in ([], ["--anchor", str(kept)]):
        capsys.readouterr()
        assert main(["audit", "replay", str(run), "--trials", "8", "--allowlist", str(trusted),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "lists 1 parties the given allowlist" in err
        assert "(auditor)" in err


def test_replay_without_an_allowlist_refuses_private_keys_inside_the_run(runs, tmp_path,
                                                                        capsys):
    """`audit verify` and `audit report` fail a run holding private key material (whoever
    holds a signing key can re-sign its ledgers), `audit replay --allowlist` refuses it, but
    `audit replay` without --allowlist trusted the ledger. Now it refuses it alike: a key
    in keys/ under its own name (a DP run's own keys are no exception) or renamed elsewhere."""
    import shutil

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    for where in ("keys/client-000.ed25519.key", "notes/backup.txt"):
        run = shutil.copytree(runs["csprng"], tmp_path / where.replace("/", "-"))
        shutil.rmtree(run / "audit", ignore_errors=True)  # another test's replay.json
        (run / where).parent.mkdir(exist_ok=True)
        (run / where).write_bytes(pem)
        capsys.readouterr()
        assert main(["audit", "replay", str(run), "--trials", "8"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ledgers/local/client-000.jsonl is"
                                                       " not trusted: 1 file holds private key")
        assert f"inside the audited directory ({where})" in err
        assert not (run / "audit" / "replay.json").exists()
        with pytest.raises(ReplayAuditError, match=re.escape(where)):
            run_replay_audit(run, trials=8)


@pytest.mark.parametrize("run_dir", ["", "  ", "r\x00"])
def test_write_replay_result_refuses_an_empty_or_blank_run_directory(tmp_path, monkeypatch,
                                                                     run_dir):
    """An empty ``run_dir`` wrote ``audit/replay.json`` into the current directory."""
    from audits.replay import ReplayAuditResult, write_replay_result

    monkeypatch.chdir(tmp_path)
    result = ReplayAuditResult(claim_epsilon=1.0, certifiable_max=1.6, lower_bound=0.1,
                               verdict="consistent", trials=40, correct=20, confidence=0.95)
    with pytest.raises(ReplayAuditError, match="run_dir .*(is empty|NUL)"):
        write_replay_result(run_dir, result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [3, b"run", ["run"], "", "a\x00b"])
def test_path_arguments_that_are_not_text_paths_are_named(tmp_path, bad):
    for name, kwargs in (("run_dir", {"run_dir": bad}),
                         ("allowlist", {"run_dir": tmp_path, "allowlist": bad}),
                         ("anchor", {"run_dir": tmp_path, "anchor": bad})):
        with pytest.raises(ReplayAuditError, match=f"^{name} "):
            run_replay_audit(**kwargs)


def test_trial_helpers_name_a_wrong_argument():
    """'unsupported operand type(s) for //' or '<' TypeErrors came out before."""
    for bad in ("40", None, 1.5):
        with pytest.raises(ReplayAuditError, match="^trials must be an int"):
            certifiable_max(bad, 1e-5)
        with pytest.raises(ReplayAuditError, match="^cap must be an int"):
            trials_for_claim(1.0, 1e-5, cap=bad)
    for bad in ("1.0", None, float("nan"), -1.0):
        with pytest.raises(ReplayAuditError, match="^claim must be a number"):
            trials_for_claim(bad, 1e-5)


def test_statistics_arguments_are_replay_audit_errors_naming_them():
    """trials beyond int64 raised scipy's TypeError (then the canary module's error), a bad
    delta or confidence the canary module's CanaryAuditError, or nothing at all for fewer
    than two trials; a claim beyond float's range math's OverflowError."""
    with pytest.raises(ReplayAuditError, match=r"^trials must be an integer in \[0, 2\*\*63\)"):
        certifiable_max(10**30, 1e-5)
    for trials in (1, 40):
        with pytest.raises(ReplayAuditError, match="^delta must be in"):
            certifiable_max(trials, "1e-5")
        with pytest.raises(ReplayAuditError, match="^confidence must be in"):
            certifiable_max(trials, 1e-5, 2.0)
    assert trials_for_claim(10**400, 1e-5, cap=100) == trials_for_claim(float("inf"), 1e-5,
                                                                       cap=100) == 100


def test_trials_beyond_the_maximum_are_refused_before_the_replay(runs, capsys):
    """--trials 99999999999999999999 raised torch's TypeError ('Overflow when unpacking long
    long') as a traceback after the clients were built, 2**63 - 1 a RuntimeError on the coins'
    storage, and a billion was taken (a billion DP-SGD step pairs)."""
    from audits.replay import MAX_TRIALS

    for trials in (10**20, 2**63 - 1, 10**9, MAX_TRIALS + 1):
        with pytest.raises(ReplayAuditError, match=r"^trials must be an int in \[2, 1,000,000\]"):
            run_replay_audit(runs["csprng"], trials=trials)
    assert main(["audit", "replay", str(runs["csprng"]), "--trials", "99999999999999999999"]) == 2
    assert "trials must be an int in [2, 1,000,000]" in capsys.readouterr().err


def test_a_method_its_own_process_registered_is_replayed_in_another(tmp_path, capsys):
    """`audit replay` of a run whose method a user's script registered (not a module of
    secure_fedora/contrib/) failed in a new process with "unknown method" and no hint,
    although the replay rebuilds only the client's data and model (the method names a ledger
    folder). Now it replays; a dataset (or model) that process lacks is refused naming what to
    do, since the replay cannot rebuild the data without it."""
    from secure_fedora.core.registry import METHODS

    METHODS.register("byo_local_r", METHODS.get("local"))
    try:
        run = _run(tmp_path / "run", {**BASE, "methods": ["byo_local_r"],
                                      "privacy": {**BASE["privacy"], "noise": "csprng"}})
    finally:
        METHODS.unregister("byo_local_r")  # now as in a new process
    result = run_replay_audit(run, trials=8)
    assert result.verdict == "inconclusive" and result.trials == 8

    doc = {**BASE, "data": {**BASE["data"], "dataset": "byo-data-r"}}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.toml").write_text(tomli_w.dumps(doc))
    with pytest.raises(ReplayAuditError, match=r"rebuilds the run's data and model, and its "
                       r"config.toml names dataset 'byo-data-r', which this process has not "
                       r"registered .*secure_fedora/contrib/.*audits\.replay\.run_replay_audit"):
        run_replay_audit(tmp_path / "other")
    assert main(["audit", "replay", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_method_this_process_lacks_is_replayed_with_a_warning(tmp_path, capsys):
    """The replay accepts a method its process has not registered (a tampered config.toml may
    name any well-formed method) and said nothing of it, where `audit verify` warns that its
    config checks were not run; then it warned through logging only (no `warning:` line,
    nothing in replay.json). It is now recorded in `unchecked` and printed as the key scan's
    warnings are, naming the method."""
    from secure_fedora.core.registry import METHODS

    METHODS.register("byo_local_w", METHODS.get("local"))
    try:
        run = _run(tmp_path / "run", {**BASE, "methods": ["byo_local_w"],
                                      "privacy": {**BASE["privacy"], "noise": "csprng"}})
    finally:
        METHODS.unregister("byo_local_w")
    (note,) = run_replay_audit(run, trials=8).unchecked
    assert "method 'byo_local_w', which this process has not registered" in note
    assert "config checks it declares were not run" in note
    capsys.readouterr()
    assert main(["audit", "replay", str(run), "--trials", "8"]) == 3  # inconclusive
    err = capsys.readouterr().err
    assert err.splitlines().count(f"warning: {note}") == 1, err
    assert json.loads((run / "audit" / "replay.json").read_text())["unchecked"] == [note]


def test_replay_json_words_its_verdict_as_the_cli_prints_it(runs, capsys):
    """canary.json and whitebox.json carry `verdict_text`, the line the CLI prints after
    `verdict:`; replay.json did not. It now does, its other keys kept."""
    from audits.replay import ReplayAuditResult, write_replay_result
    from audits.verdict import VerdictError, verdict_text

    run = runs["csprng"]
    assert main(["audit", "replay", str(run), "--trials", "40"]) == 0
    out = capsys.readouterr().out
    doc = json.loads((run / "audit" / "replay.json").read_text())
    assert doc["verdict_text"] == verdict_text("consistent", doc["claim_epsilon"],
                                               doc["certifiable_max"], doc["lower_bound"])
    assert f"  verdict: {doc['verdict_text']}\n" in out
    assert set(doc) == {"audit", "claim_epsilon", "certifiable_max", "lower_bound", "verdict",
                        "verdict_text", "trials", "correct", "confidence", "setup",
                        "unchecked"}
    # a verdict the figures do not give is refused, not worded
    wrong = ReplayAuditResult(claim_epsilon=1.0, certifiable_max=1.6, lower_bound=0.1,
                              verdict="refuted", trials=40, correct=20, confidence=0.95)
    with pytest.raises(VerdictError, match="'refuted' is not what"):
        wrong.to_json()
    with pytest.raises(ReplayAuditError, match="'refuted' is not what"):
        write_replay_result(run / "elsewhere", wrong)
    assert not (run / "elsewhere").exists()


def _threads_of_each_step(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets torch's thread count at each DP-SGD step the replay makes."""
    import torch

    import audits.replay as replay

    seen: list[int] = []
    real = replay._Step.release

    def release(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(replay._Step, "release", release)
    return seen

def test_the_replay_audit_trains_on_training_threads_and_restores_the_process_s(
        tmp_path, monkeypatch):
    """The replay's DP-SGD steps ran on the process's own torch thread count, not the run's
    ``training.threads`` (which in-process runs, sweeps and the canary audit hold)."""
    import torch

    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    doc = {**BASE, "data": {**BASE["data"], "train_per_client": 30, "val_per_client": 10},
           "training": {**BASE["training"], "batch_size": 10, "threads": wanted},
           "privacy": {**BASE["privacy"], "noise": "reproducible"}}
    run = _run(tmp_path / "threads", doc)
    assert torch.get_num_threads() == before
    seen = _threads_of_each_step(monkeypatch)
    assert run_replay_audit(run, trials=20).correct == 20
    assert len(seen) == 22 and set(seen) == {wanted}
    assert torch.get_num_threads() == before


def test_files_the_key_scan_could_not_read_are_shown_not_dropped(runs, tmp_path, capsys):
    """`audit verify` reports a file of the run that could not be read to look for private
    keys as an unchecked warning; `audit replay` made the same scan and dropped it silently
    (with --allowlist and without). It now prints it as `audit canary` prints the scan's
    warnings and records it in replay.json's `unchecked`, worded as `audit verify` words it."""
    import os
    import shutil

    if not os.access("/proc/self/mem", os.F_OK):
        pytest.skip("needs /proc/self/mem (a regular file whose first bytes cannot be read)")
    run = shutil.copytree(runs["csprng"], tmp_path / "run")
    shutil.rmtree(run / "audit", ignore_errors=True)
    (run / "notes").mkdir()
    # a link to a file that is regular but cannot be read from its start, even by root
    (run / "notes" / "mem").symlink_to("/proc/self/mem")
    text = ("1 file inside the audited directory could not be read to look for private keys"
            " (notes/mem)")
    capsys.readouterr()
    main(["audit", "verify", str(run)])
    assert f"WARNING run: [private_keys] {text}" in capsys.readouterr().out
    trusted = tmp_path / "trusted-allowlist.json"
    shutil.copyfile(run / "keys" / "allowlist.json", trusted)
    for extra in ([], ["--allowlist", str(trusted)]):
        assert main(["audit", "replay", str(run), "--trials", "8", *extra]) == 3  # inconclusive
        captured = capsys.readouterr()
        assert captured.err.splitlines().count(f"warning: {text}") == 1, captured.err
        assert json.loads((run / "audit" / "replay.json").read_text())["unchecked"] == [text]
    assert run_replay_audit(run, trials=8).unchecked == [text]


def test_the_replay_audit_runs_on_one_thread_when_the_config_sets_none(runs, monkeypatch):
    """Without ``training.threads`` the replay's steps ran on torch's default thread count:
    each step is a few dozen rows, so on a loaded 2-core machine the second thread's waits
    made a trial 10-30x slower (20,000 automatic trials took hours); they now run on one
    thread, and the process's own count is back after."""
    import torch

    before = torch.get_num_threads()
    seen = _threads_of_each_step(monkeypatch)
    torch.set_num_threads(2)  # tests/conftest.py runs each test process on one thread
    try:
        assert run_replay_audit(runs["reproducible"], trials=10).correct == 10
        assert len(seen) == 12 and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_replay_says_how_many_trials_and_how_long_before_running_them(runs, monkeypatch,
                                                                          capsys):
    """The automatic trial count ran for as long as it took without a word (20,000 trials at
    an epsilon-8 claim); the replay now says up front how many trials it runs and why, and
    after the first few how long all of them should take."""
    import audits.replay as replay

    said: list[str] = []
    real = replay._Step.release

    def release(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        said.append("step")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(replay._Step, "release", release)
    result = run_replay_audit(runs["reproducible"], progress=said.append)
    assert result.trials == 40 and result.verdict == "refuted"
    plan, estimate = [line for line in said if line != "step"]
    assert said.index(plan) == 0  # before the first step
    assert plan == ("replaying 40 trials (automatic: the fewest whose certifiable max exceeds"
                    " 1.1 x the claim, at most 20,000; the trials= argument sets it)")
    # after ESTIMATE_AFTER trials (and the 2 candidates), before the rest
    assert said.index(estimate) == 2 + replay.ESTIMATE_AFTER + 1
    assert re.fullmatch(r"  about \d+ (s|min) for the 40 trials \(\d+\.\d ms a trial over the"
                        r" first 20\)", estimate)

    # too few trials to refute the claim: said before they run, with the count that could
    assert main(["audit", "replay", str(runs["reproducible"]), "--trials", "8"]) == 3  # inconclusive
    err = capsys.readouterr().err
    needed = int(re.search(r"about ([\d,]+) trials could", err)[1].replace(",", ""))
    assert re.fullmatch(r"replaying 8 trials \(--trials\); even a perfect attacker certifies at"
                        r" most 0\.0000 with them, not above the claim 0\.\d{4}, so the verdict"
                        r" can only be inconclusive; about [\d,]+ trials could refute it"
                        r" \(--trials\)\n", err)
    claim = json.loads((runs["reproducible"] / "audit" / "replay.json").read_text())[
        "claim_epsilon"]
    assert certifiable_max(needed, 1e-3) > claim >= certifiable_max(needed - 2, 1e-3)
    assert err.count("\n") == 1  # 8 trials: no estimate


def _no_trial_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test at the first DP-SGD step or data build of a replay."""
    import audits.replay as replay

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a trial (or the data it needs) was built")

    monkeypatch.setattr(replay._Step, "release", refuse)
    monkeypatch.setattr("secure_fedora.runtimes.inprocess.build_clients", refuse)


@pytest.mark.parametrize("sigma, refutable", [(0.5, True), (0.4, False)])
def test_an_automatic_count_capped_below_refuting_runs_no_trial(tmp_path, monkeypatch, capsys,
                                                               sigma, refutable):
    """The automatic trial count stopped at its 20,000 cap even after saying that those trials
    could not refute the claim, then ran them all (minutes; epsilon 9 or 14 here). It now
    stops before any trial: exit 3 (inconclusive), nothing written, saying how many trials
    could refute the claim and how to ask for them (`--trials N`), or that none could. An
    explicit count still runs as asked."""
    import audits.replay as replay

    doc = {**BASE, "privacy": {**BASE["privacy"], "noise": "csprng", "noise_multiplier": sigma}}
    run = _run(tmp_path / "run", doc)
    out_json = tmp_path / "copy.json"
    with monkeypatch.context() as m:
        _no_trial_may_run(m)
        assert main(["audit", "replay", str(run)]) == 3
        out, err = capsys.readouterr()
        assert main(["audit", "replay", str(run), "--json", str(out_json)]) == 3
        assert capsys.readouterr() == (out, err)
        with pytest.raises(replay.AutomaticTrialsCannotRefuteError) as caught:
            run_replay_audit(run)
    assert not (run / "audit").exists() and not out_json.exists()
    assert err == ""  # no "replaying 20,000 trials" plan
    assert out.startswith("  verdict: inconclusive: the automatic trial count stops at 20,000,"
                          " and even a perfect attacker certifies at most ") and out.count("\n") == 1
    assert out.endswith("; nothing written\n") and "no trial was run" in out
    assert caught.value.trials == replay.MAX_AUTO_TRIALS
    claim = json.loads((run / "ledgers" / "local" / "client-000.jsonl").read_text()
                       .splitlines()[-1])["epsilon_after"]
    assert certifiable_max(replay.MAX_AUTO_TRIALS, 1e-3) < claim
    if refutable:
        needed = caught.value.needed
        assert certifiable_max(needed, 1e-3) > claim >= certifiable_max(needed - 2, 1e-3)
        assert f"about {needed:,} trials could refute it" in out
        assert f"ask for them with --trials {needed}\n" in out.replace("; nothing written", "")
        assert str(caught.value).endswith(f"ask for them with trials={needed}")
    else:
        assert caught.value.needed is None and certifiable_max(replay.MAX_TRIALS, 1e-3) < claim
        assert "not even 1,000,000 trials (the most one replay runs) could refute it" in out
    # an explicit count runs as asked, however little it can certify
    assert main(["audit", "replay", str(run), "--trials", "8"]) == 3
    out, err = capsys.readouterr()
    assert err.startswith("replaying 8 trials (--trials)") and "8 trials, " in out
    assert json.loads((run / "audit" / "replay.json").read_text())["trials"] == 8


def test_replay_writes_json_as_the_other_audits_do(runs, tmp_path, monkeypatch, capsys):
    """`audit replay` had no `--json`, while canary, whitebox, leakage and verify have one.
    It now writes replay.json's document to the file it names, sealed and encoded once
    (:mod:`audits.output`), replacing only its own previous report without `--force`, and
    says it wrote it."""
    import audits.output as output
    from audits.output import is_previous_report, seal_document

    run = runs["reproducible"]
    out_json = tmp_path / "copy.json"

    def no_parse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the document was dumped to text to be parsed back and sealed")

    with monkeypatch.context() as m:
        m.setattr(output, "seal_report", no_parse)
        assert main(["audit", "replay", str(run), "--trials", "40", "--json", str(out_json)]) == 1
    out = capsys.readouterr().out
    assert out.endswith(f"  written: {run / 'audit' / 'replay.json'}\n  written: {out_json}\n")
    doc = json.loads((run / "audit" / "replay.json").read_text())
    assert out_json.read_text() == seal_document(doc, "replay")
    assert is_previous_report(out_json, "replay") and not is_previous_report(out_json, "canary")
    # its own previous report is replaced without --force
    assert main(["audit", "replay", str(run), "--trials", "40", "--json", str(out_json)]) == 1
    capsys.readouterr()
    # another file is kept, refused before the replay runs
    other = tmp_path / "notes.json"
    other.write_text("{}\n")
    assert main(["audit", "replay", str(run), "--trials", "40", "--json", str(other)]) == 2
    captured = capsys.readouterr()
    assert "not a previous `audit replay` JSON report" in captured.err and captured.out == ""
    assert other.read_text() == "{}\n"
    assert main(["audit", "replay", str(run), "--trials", "40", "--force"]) == 2
    assert "--force needs --json" in capsys.readouterr().err
    # a run without a DP claim: nothing written there either
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.toml").write_text(tomli_w.dumps({**BASE, "privacy": {"enabled": False}}))
    assert main(["audit", "replay", str(plain), "--json", str(tmp_path / "p.json")]) == 3
    assert not (tmp_path / "p.json").exists()


def test_a_config_toml_that_is_not_the_runs_is_refused_without_an_anchor(runs, tmp_path):
    """Without anchor.json nothing tied config.toml to the run: one edited after the run (its
    seed, from which the replay derives the noise) was replayed as the run's. Its config hash
    must be the ``config_hash`` results.json records, as the canary audit requires."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["reproducible"], run)
    shutil.rmtree(run / "audit", ignore_errors=True)  # another test's audit of the run
    (run / "anchor.json").unlink()
    (run / "config.toml").write_text(tomli_w.dumps({**BASE, "seed": 6,
                                                    "privacy": {**BASE["privacy"],
                                                                "noise": "reproducible"}}))
    with pytest.raises(ReplayAuditError, match=r"records config_hash .*: it is not the config"
                                               r" this run ran"):
        run_replay_audit(run, trials=8)
    assert not (run / "audit").exists()
