"""`audit verify` reads every file a DP run writes beside its ledgers: ``ledgers/<method>/
model.json`` against the fingerprint results.json records (results.json's digest is in the
signed anchor), and ``keys/<party>.x25519.pub`` (as ``.ed25519.pub``) against the allowlist.
Before, both files were never read: a flipped byte, another run's file or a deletion verified
clean. Damages are made on copies of real runs (the audit fixture and a real in-process run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tomli_w

from audits.cli import main
from audits.report import build_report
from audits.verify import verify_run
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import Simulation
from tests.audits.conftest import reanchor

REAL = {
    "seed": 2,
    "methods": ["local"],
    "data": {"num_clients": 2, "train_per_client": 32, "val_per_client": 8,
             "test_per_client": 8},
    "training": {"rounds": 1, "local_epochs": 1, "batch_size": 16},
    "privacy": {"enabled": True, "epsilon": 8.0},
}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-client DP run of the in-process runtime (MNIST MLP: another model than
    the audit fixture's)."""
    root = tmp_path_factory.mktemp("real") / "run"
    root.mkdir()
    (root / "config.toml").write_text(tomli_w.dumps(REAL))
    Simulation(parse_config(REAL), root).run()
    return root


def _errors(run: Path, check: str) -> list[str]:
    report = verify_run(run)
    return [f.message for f in report.errors if f.check == check]


def _warnings(run: Path, check: str) -> list[str]:
    return [f.message for f in verify_run(run).warnings if f.check == check]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_runtime_records_the_model_fingerprint_under_the_anchor(real_run):
    record = json.loads((real_run / "ledgers" / "local" / "model.json").read_text())
    results = json.loads((real_run / "results.json").read_text())
    assert results["privacy"]["local"]["model_fingerprint"] == record["model_fingerprint"]
    report = verify_run(real_run)
    assert report.ok
    assert not [f for f in report.findings if f.check in ("model_record", "key_file", "key")]


@pytest.mark.parametrize("damage", ["flip_listing", "flip_first_byte", "other_run", "delete"])
def test_a_damaged_model_record_fails_verify_and_the_report(run_copy, real_run, damage, capsys):
    path = run_copy / "ledgers" / "fedora" / "model.json"
    if damage == "flip_listing":
        _flip(path, path.read_bytes().index(b"ReLU") + 1)
    elif damage == "flip_first_byte":
        _flip(path, 0)
    elif damage == "other_run":
        shutil.copyfile(real_run / "ledgers" / "local" / "model.json", path)
    else:
        path.unlink()
    expected = {"flip_listing": "is damaged: its model_architecture listing does not hash",
                "flip_first_byte": "is not readable JSON",
                "other_run": "records the model",
                "delete": "is missing; results.json (anchored) records the fingerprint"}[damage]
    errors = _errors(run_copy, "model_record")
    assert len(errors) == 1 and expected in errors[0] and str(path) in errors[0]
    assert main(["audit", "verify", str(run_copy)]) == 1
    assert expected in capsys.readouterr().out
    ver = build_report(run_copy)["verification"]
    assert ver["ok"] is False
    assert any(f["check"] == "model_record" and expected in f["message"]
               for f in ver["findings"])


def test_a_model_record_nothing_signed_records_is_named_unchecked(run_copy, real_run):
    """A run whose results.json records no fingerprint (written before it did): verify says
    model.json is checked against itself only, and a missing one leaves the model unchecked."""
    doc = json.loads((run_copy / "results.json").read_text())
    for method in ("fedora", "local"):
        del doc["privacy"][method]["model_fingerprint"]
    (run_copy / "results.json").write_text(json.dumps(doc, indent=2))
    reanchor(run_copy)
    (run_copy / "ledgers" / "local" / "model.json").unlink()
    fedora = run_copy / "ledgers" / "fedora" / "model.json"
    shutil.copyfile(real_run / "ledgers" / "local" / "model.json", fedora)
    report = verify_run(run_copy)
    assert report.ok  # nothing signed to hold them to: warnings, not errors
    warned = {f.method: f.message for f in report.warnings if f.check == "model_record"}
    assert "checked against itself only" in warned["fedora"] \
        and "another run's model.json put in its place is not detected" in warned["fedora"]
    assert "is missing" in warned["local"] and "unchecked" in warned["local"]
    _flip(fedora, fedora.read_bytes().index(b"Linear") + 2)  # still intact-checked
    assert any("is damaged" in m for m in _errors(run_copy, "model_record"))


@pytest.mark.parametrize("damage", ["flip", "other_party", "other_run", "delete"])
def test_a_damaged_x25519_key_file_is_reported(run_copy, real_run, damage, capsys):
    path = run_copy / "keys" / "client-000.x25519.pub"
    if damage == "flip":
        _flip(path, len(b"-----BEGIN PUBLIC KEY-----\n") + 20)
    elif damage == "other_party":
        shutil.copyfile(run_copy / "keys" / "client-001.x25519.pub", path)
    elif damage == "other_run":
        shutil.copyfile(real_run / "keys" / "client-000.x25519.pub", path)
    else:
        path.unlink()
    report = verify_run(run_copy)
    if damage == "delete":
        assert report.ok
        warned = [f for f in report.warnings if f.check == "key_file"]
        assert len(warned) == 1 and str(path) in warned[0].message \
            and "is missing" in warned[0].message and warned[0].client_id == "client-000"
        assert any(f["check"] == "key_file" and str(path) in f["message"]
                   for f in build_report(run_copy)["verification"]["findings"])
        return
    errors = [f for f in report.errors if f.check == "key"]
    assert len(errors) == 1 and str(path) in errors[0].message
    assert "X25519" in errors[0].message or "not a valid PEM" in errors[0].message
    assert main(["audit", "verify", str(run_copy)]) == 1
    assert str(path) in capsys.readouterr().out
    assert build_report(run_copy)["verification"]["ok"] is False


def test_key_files_the_allowlist_does_not_cover_are_named(run_copy):
    (run_copy / "keys" / "server.ed25519.pub").unlink()
    shutil.copyfile(run_copy / "keys" / "client-000.x25519.pub",
                    run_copy / "keys" / "intruder.x25519.pub")
    warned = _warnings(run_copy, "key_file")
    assert any("server.ed25519.pub is missing" in m for m in warned)
    assert any("intruder.x25519.pub belongs to 'intruder'" in m and "not checked" in m
               for m in warned)
