"""Smoke test of the command line: a real run from a TOML file to results, CSV and plots."""

import json
import subprocess
import sys
from pathlib import Path

from secure_fedora.cli import main

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.toml"


def test_cli_run_smoke(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"fedora", "local", "fedavg"} <= set(results["methods"])
    assert (out / "config.toml").read_text() == SMOKE.read_text()
    assert (out / "rounds.csv").exists()
    for png in ("accuracy_per_round.png", "per_client_accuracy.png", "relatedness.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing run is not silently overwritten; --resume continues it
    assert main(["run", str(SMOKE), "--out", str(out), "--quiet"]) == 2
    assert main(["run", str(SMOKE), "--out", str(out), "--quiet", "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_cli_reports_config_errors_with_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nrounds = -3\n')
    proc = subprocess.run([sys.executable, "-m", "secure_fedora.cli", "run", str(bad), "--out",
                           str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "training.rounds" in proc.stderr


def test_keys_init_writes_private_keys_0600_and_refuses_bad_input(tmp_path):
    keys = tmp_path / "keys"
    assert main(["keys", "init", str(keys), "--clients", "2"]) == 0
    for name in ("server", "client-000", "client-001"):
        assert (keys / f"{name}.ed25519.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "allowlist.json").exists()
    # existing keys are never overwritten silently; zero clients is refused
    assert main(["keys", "init", str(keys), "--clients", "2"]) == 2
    assert main(["keys", "init", str(tmp_path / "none"), "--clients", "0"]) == 2
    assert not (tmp_path / "none").exists()


def test_help_does_not_import_torch_or_the_subsystems():
    """``secure-fedora --help`` stays fast: torch and the heavy sub-systems load only when a
    command that needs them runs (checked by module, not by timing)."""
    import subprocess
    import sys

    code = ("import sys\nfrom secure_fedora.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'flwr', 'secure_fedora.sweep', "
            "'audits.cli', 'secure_fedora.deploy.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sweep" in out.stdout and "audit" in out.stdout and "deploy" in out.stdout  # listed
    assert out.stdout.strip().splitlines()[-1] == "[]"
    code_sweep = code.replace("['--help']", "['sweep', '--help']")
    out = subprocess.run([sys.executable, "-c", code_sweep], capture_output=True, text=True, timeout=60)
    assert "--seeds" in out.stdout and "secure_fedora.sweep" in out.stdout.splitlines()[-1]
