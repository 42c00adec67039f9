"""Every error the toolkit raises reaches the user as one line ``error: ...`` with exit code 2
(issue 14 "Why" 9); ``--debug`` shows the traceback; a bug keeps its traceback."""

import argparse
import importlib
import inspect
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from audits.cli import main as audit_main
from audits.verify import AuditError
from privacy.accounting import BudgetExceededError, PrivacyBudget
from privacy.envelope import BadSignatureError
from privacy.errors import ToolkitError
from privacy.identity import IdentityError
from privacy.ledger import LedgerError
from secure_fedora.algorithms.fedora import RelatednessError
from secure_fedora.cli import main
from secure_fedora.core.config import ConfigError
from secure_fedora.core.errors import is_user_error, one_line, run_command
from secure_fedora.data.sources import DataError
from secure_fedora.experiments.sweep import SweepError
from secure_fedora.runtimes.flower.protocol import DeployError
from secure_fedora.runtimes.inprocess import CheckpointError
from secure_fedora.secure.transport import TransportError

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "name": "tiny-errors",
    "methods": ["local"],
    "data": {"num_clients": 3, "train_per_client": 40, "val_per_client": 10, "test_per_client": 10},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 20, "lr": 0.05},
}


def write_config(path: Path, doc: dict) -> Path:
    path.write_text(tomli_w.dumps(doc))
    return path


def one_error_line(stderr: str) -> str:
    """The single non-empty stderr line, which must be the error line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_every_exception_class_of_the_toolkit_is_a_toolkit_error():
    """A new error class that forgets the base would still be printed (it is defined in the
    toolkit), but it should say so explicitly: every one derives from ToolkitError."""
    # Not an error: the in-process stand-in for ``kill -9`` at a crash point (tests only). It
    # derives from BaseException alone so that no ``except Exception`` handler can catch it.
    not_errors = {"secure_fedora.core.crashpoints.InjectedCrash"}
    missing = []
    for package in ("privacy", "secure_fedora", "audits"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException)
                        and obj.__module__ == module.__name__ and not issubclass(obj, ToolkitError)
                        and f"{module.__name__}.{name}" not in not_errors):
                    missing.append(f"{module.__name__}.{name}")
    assert missing == []


@pytest.mark.parametrize("error", [
    ConfigError("training.rounds: bad"), DataError("/x/train-images.gz: file not found"),
    IdentityError("key file k.key is 0644"), LedgerError("ledger l.jsonl: line 3 is incomplete"),
    RelatednessError("summary uploads rejected"), CheckpointError("checkpoint c.pt is corrupt"),
    BadSignatureError("bad signature"), TransportError("transport"), AuditError("no run"),
    SweepError("cell x"), DeployError("deploy"), BudgetExceededError(
        client_id="client-000", round=3, mechanism="dpsgd", epsilon_would_be=3.2,
        budget=PrivacyBudget(3.0, 1e-5)),
    FileNotFoundError(2, "No such file or directory", "/nowhere/file.toml"),
    PermissionError(13, "Permission denied", "/root/x"),
])
def test_run_command_prints_each_toolkit_error_as_one_line(error, capsys):
    def handler(_args):
        raise error

    assert is_user_error(error)
    assert run_command(handler, argparse.Namespace()) == 2
    line = one_error_line(capsys.readouterr().err)
    if isinstance(error, OSError):
        assert line == f"error: {error.strerror}: {error.filename}"
    else:
        assert line == f"error: {error}"


def test_bugs_keep_their_traceback():
    def handler(_args):
        raise KeyError("a bug")

    assert not is_user_error(KeyError("a bug"))
    with pytest.raises(KeyError):
        run_command(handler, argparse.Namespace())


def test_multi_line_config_errors_become_one_line_naming_every_key(tmp_path, capsys):
    bad = write_config(tmp_path / "bad.toml", {"training": {"rounds": True, "lr": float("inf")}})
    assert main(["run", str(bad), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training.rounds" in line and "training.lr" in line and str(bad) in line
    assert one_line(ConfigError("invalid configuration x:\n  a: 1\n  b: 2")) == \
        "invalid configuration x: a: 1; b: 2"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"methods": ["local", "fedsgd"]},
     "methods.1: unknown method 'fedsgd'; available: apfl, ditto, fedamp, fedavg, "
     "fedora, fedprox, ifca, local"),
    ({"methods": ["fedprox"], "baselines": {"fedprox": {"mue": 0.1}}},
     "baselines.fedprox.mue: unknown key"),
    ({"baselines": {"fedsgd": {}}},
     "baselines.fedsgd: unknown baseline 'fedsgd'; expected one of "
     "['fedprox', 'ditto', 'apfl', 'fedamp', 'ifca']"),
])
def test_bad_method_names_and_hyperparameters_read_the_same_from_cli_api_and_core(
        tmp_path, capsys, overrides, message):
    """The config asks the method registry (it imports no method module); the CLI, the Python
    API and a bare ``load_config`` in a fresh process report the same error, in the check's
    own words (pydantic's "Value error," and a "(top level)" key, read before them, named
    nothing; the section was named twice)."""
    from secure_fedora.api import Experiment

    bad = write_config(tmp_path / "bad.toml", {**TINY, **overrides})
    assert main(["run", str(bad), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert f"bad.toml: {message}" in one_error_line(capsys.readouterr().err)
    with pytest.raises(ConfigError) as err:
        Experiment(bad)
    assert f"bad.toml:\n  {message}" in str(err.value)
    if "baselines" in overrides:  # core alone in a fresh process: nothing imported before it
        proc = subprocess.run(
            [sys.executable, "-c", "from secure_fedora.core.config import load_config\n"
             f"load_config({str(bad)!r})"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "r").exists()


def test_integers_beyond_int64_are_one_line_config_errors(tmp_path, capsys):
    """A DP config with local_epochs = 10**400 (TOML carries it) ended the run command with
    a raw OverflowError traceback from the config's DP step check."""
    huge = write_config(tmp_path / "huge.toml", {
        **TINY, "training": {**TINY["training"], "local_epochs": 10**400},
        "privacy": {"enabled": True, "delta": 1e-3}})
    assert main(["run", str(huge), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "training.local_epochs: Input should be less than or equal to 9223372036854775807" \
        in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_data_error_is_one_line(tmp_path, capsys):
    too_big = write_config(tmp_path / "big.toml", {**TINY, "data": {
        "num_clients": 100, "train_per_client": 1000, "val_per_client": 10, "test_per_client": 10}})
    assert main(["run", str(too_big), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "rows exceed" in one_error_line(capsys.readouterr().err)


def test_a_run_refused_before_it_starts_leaves_its_out_reusable(tmp_path, capsys):
    """A refusal while the run is set up (here: the data) withdraws the config copy, so the
    corrected config starts in the same --out; a directory that existed is kept."""
    too_big = write_config(tmp_path / "big.toml", {**TINY, "data": {
        "num_clients": 100, "train_per_client": 1000, "val_per_client": 10, "test_per_client": 10}})
    good = write_config(tmp_path / "good.toml", TINY)
    assert main(["run", str(too_big), "--out", str(tmp_path / "new"), "--quiet"]) == 2
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert main(["run", str(too_big), "--out", str(tmp_path / "kept"), "--quiet"]) == 2
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    capsys.readouterr()
    assert main(["run", str(good), "--out", str(tmp_path / "kept"), "--quiet"]) == 0
    assert (tmp_path / "kept" / "results.json").is_file()
    # a run that wrote more than its config copy is never withdrawn
    from secure_fedora.runtimes.rundir import withdraw_unstarted_run

    assert not withdraw_unstarted_run(tmp_path / "kept", created=True)
    assert (tmp_path / "kept" / "config.toml").is_file()


def test_a_dp_plan_over_budget_leaves_its_out_reusable(tmp_path, capsys):
    """A DP run refused by its privacy plan published its public keys first, so its --out held
    config.toml and keys/ and the corrected config was refused there ("not empty")."""
    private = {**TINY, "privacy": {"enabled": True, "epsilon": 1.0, "delta": 1e-3,
                                   "noise_multiplier": 0.3}}
    refused = write_config(tmp_path / "tiny.toml", private)
    good = write_config(tmp_path / "good.toml", {**private, "privacy": {
        "enabled": True, "epsilon": 8.0, "delta": 1e-3}})
    out = tmp_path / "out"
    keystore = tmp_path / "keystore"
    assert main(["run", str(refused), "--out", str(out), "--quiet",
                 "--keystore", str(keystore)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: ")
    assert "over budget" in err and not out.exists()
    assert not keystore.exists()  # refused before any key was made
    assert main(["run", str(good), "--out", str(out), "--quiet", "--keystore", str(keystore)]) == 0
    assert (out / "results.json").is_file()


def test_a_budget_whose_share_rounds_to_zero_names_the_share(tmp_path, capsys):
    """epsilon 5e-324 (the smallest float) times a budget fraction is 0.0: the accountant's
    "target_epsilon must be a finite number > 0, got 0.0" named no config key."""
    doc = {**TINY, "methods": ["fedora"], "fedora": {"relatedness": "noised"},
           "privacy": {"enabled": True, "epsilon": 5e-324, "delta": 1e-3}}
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path / "tiny.toml", doc)), "--out", str(out),
                 "--quiet", "--keystore", str(tmp_path / "keystore")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "privacy.summary_budget_fraction 0.2 of epsilon 5e-324" in line
    assert "is 0.0 in floating point; raise the budget" in line
    assert not out.exists()


def test_a_config_that_is_a_fifo_is_one_line_and_no_wait(tmp_path, capsys):
    """`secure-fedora run FIFO` waited for a writer forever (the command read it blocking)."""
    from tests.fifo_support import fifo_without_writer

    with fifo_without_writer(tmp_path / "config.toml") as fifo:
        assert main(["run", str(fifo), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a regular file (a FIFO, device or socket)" in line
    assert not (tmp_path / "out").exists()


def test_a_dp_run_its_data_or_model_refuses_makes_no_key_store(tmp_path, capsys):
    """The checks of the run's context (labels, output width, loss) ran only when the first
    method started, after the CLI had made (and announced) the key store: a DP run whose loss
    does not fit the data left a key store behind. They now run before it."""
    private = {**TINY, "training": {**TINY["training"], "loss": "bce"},
               "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3}}
    refused = write_config(tmp_path / "tiny.toml", private)
    out, keystore = tmp_path / "out", tmp_path / "keystore"
    assert main(["run", str(refused), "--out", str(out), "--quiet",
                 "--keystore", str(keystore)]) == 2
    err = capsys.readouterr().err
    assert "training.loss = 'bce' with single labels is binary" in one_error_line(err)
    assert not out.exists() and not keystore.exists()


def test_a_key_store_refused_at_set_up_leaves_its_out_reusable(tmp_path, capsys):
    """A private key readable by others was refused only after the run had published its
    public keys and created its ledgers: neither a corrected run (not empty) nor --resume (no
    checkpoint) could use that --out again."""
    import os

    private = write_config(tmp_path / "dp.toml", {**TINY, "privacy": {
        "enabled": True, "epsilon": 8.0, "delta": 1e-3}})
    keystore = tmp_path / "store"
    assert main(["keys", "init", str(keystore), "--clients", "3"]) == 0
    key = keystore / "client-001.ed25519.key"
    os.chmod(key, 0o644)
    out = tmp_path / "out"
    argv = ["run", str(private), "--out", str(out), "--quiet", "--keystore", str(keystore)]
    capsys.readouterr()
    assert main(argv) == 2
    assert "client-001" in capsys.readouterr().err and not out.exists()
    os.chmod(key, 0o600)
    assert main(argv) == 0 and (out / "results.json").is_file()


def test_identity_error_names_the_flag_not_the_python_argument(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert main(["keys", "init", str(keys), "--clients", "1"]) == 0
    capsys.readouterr()
    assert main(["keys", "init", str(keys), "--clients", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--force" in line and "allowlist.json" in line


def test_os_error_names_the_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = write_config(tmp_path / "c.toml", TINY)
    assert main(["run", str(config), "--out", str(blocker / "run"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(blocker) in line
    assert main(["run", str(tmp_path), "--quiet"]) == 2  # a directory given as the config
    assert str(tmp_path) in one_error_line(capsys.readouterr().err)


def test_corrupt_checkpoint_and_torn_ledger_are_one_line_errors(tmp_path, capsys):
    config = write_config(tmp_path / "dp.toml", {
        **TINY, "privacy": {"enabled": True, "epsilon": 3.0, "delta": 1e-3}})
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    torn = tmp_path / "torn"
    shutil.copytree(run_dir, torn)
    ledger = torn / "ledgers" / "local" / "client-001.jsonl"
    # a cut *final* line, the close entry, is recovered on resume: the close is journaled
    # whole, so it is written back bit for bit (nothing quarantined, no repair entry)
    damaged = torn.parent / "damaged"
    shutil.copytree(torn, damaged)
    original = ledger.read_bytes()
    ledger.write_bytes(original[:-25])
    assert main(["run", str(config), "--out", str(torn), "--quiet", "--resume"]) == 0
    capsys.readouterr()
    assert ledger.read_bytes() == original
    assert not list(ledger.parent.glob("client-001.jsonl.torn-*"))
    # a damaged line before the end is never repaired: one error line, nothing written
    ledger = damaged / "ledgers" / "local" / "client-001.jsonl"
    lines = ledger.read_bytes().split(b"\n")
    lines[0] = lines[0][:-25]
    ledger.write_bytes(b"\n".join(lines))
    assert main(["run", str(config), "--out", str(damaged), "--quiet", "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "client-001.jsonl" in line

    ckpt = run_dir / "checkpoints" / "local.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x10
    ckpt.write_bytes(bytes(data))
    assert main(["run", str(config), "--out", str(run_dir), "--quiet", "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(ckpt) in line and "weights_only" not in line


def test_debug_shows_the_traceback_anywhere_on_the_command_line(tmp_path, capsys):
    bad = write_config(tmp_path / "bad.toml", {"training": {"rounds": 0}})
    for argv in (["--debug", "run", str(bad)], ["run", str(bad), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "ConfigError" in err
        assert err.strip().splitlines()[-1].startswith("error: ")
    assert audit_main(["audit", "verify", str(tmp_path / "none"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "does not exist" in err.strip().splitlines()[-1]


def test_audit_entry_point_reports_one_line(tmp_path, capsys):
    assert audit_main(["audit", "verify", str(tmp_path / "none")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)


def test_console_script_exit_code_and_single_line(tmp_path):
    """End to end through a fresh interpreter, as the console script runs."""
    bad = write_config(tmp_path / "bad.toml", {"fedora": {"k": 5}, "data": {"num_clients": 4}})
    proc = subprocess.run([sys.executable, "-m", "secure_fedora.cli", "run", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "fedora.k" in one_error_line(proc.stderr)


def test_an_empty_out_is_an_error_not_the_default_directory(tmp_path, capsys, monkeypatch):
    """`run CONFIG --out ''` ran into runs/<name>-<timestamp>, as if --out were not given."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.toml", {"data": {"num_clients": 2}})
    for empty in ("", "  "):
        assert main(["run", str(config), "--out", empty, "--quiet"]) == 2
        assert "--out is empty" in one_error_line(capsys.readouterr().err)
        # sweep named the Python API's argument ('out is empty')
        assert main(["sweep", str(config), "--out", empty, "--quiet"]) == 2
        assert one_error_line(capsys.readouterr().err).startswith("error: --out is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


@pytest.mark.parametrize("config", ["", "  "])
def test_run_refuses_an_empty_config_path(tmp_path, capsys, monkeypatch, config):
    """`run ''` read the current directory ("cannot read config : Is a directory"), where
    load_config, sweep and deploy say the config path is empty."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", config, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert one_error_line(capsys.readouterr().err) == \
        "error: the config path is empty: name a file"
    assert list(tmp_path.iterdir()) == []


def test_key_store_errors_of_a_run_name_the_keystore_flag(tmp_path, capsys):
    """The CLI's key-store errors name its ``--keystore`` flag (the Python API's name its
    ``keystore=`` argument)."""
    private = write_config(tmp_path / "dp.toml", {**TINY, "privacy": {
        "enabled": True, "epsilon": 8.0, "delta": 1e-3}})
    out = tmp_path / "out"
    assert main(["run", str(private), "--out", str(out), "--quiet",
                 "--keystore", str(out / "ks")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "(--keystore) lies inside the run directory" in line and "keystore=" not in line
    assert main(["run", str(private), "--out", str(out), "--quiet",
                 "--keystore", str(tmp_path / "store")]) == 0
    capsys.readouterr()
    assert main(["run", str(private), "--out", str(out), "--quiet", "--resume",
                 "--keystore", str(tmp_path / "fresh")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "pass the run's key store (--keystore, or [security] keystore)" in line


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "-1"], "seeds must be non-negative integers"),
    (["--seeds", "1", "1"], "seeds lists a seed twice"),
    (["--epsilons", "1", "1"], "epsilons lists 1 twice"),
    (["--methods", "local", "local"], "methods lists a method twice"),
])
def test_sweep_refuses_bad_arguments_before_drawing_anything(tmp_path, capsys, flags, message):
    """`sweep --seeds -1` drew its progress bars ("cells", "rounds") before the error."""
    config = write_config(tmp_path / "c.toml", TINY)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--out", str(out), *flags]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("flags, flag", [
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "1", "1"], "--seeds"),
    (["--epsilons", "1", "1"], "--epsilons"),
    (["--epsilons", "none", "inf"], "--epsilons"),
    (["--methods", "local", "local"], "--methods"),
])
def test_a_bad_sweep_argument_is_named_by_its_flag(tmp_path, capsys, flags, flag):
    """README: a command's bad argument is named by its flag (`audit replay --trials 1`:
    "... (--trials)"); `sweep --seeds -1` said "seeds must be non-negative integers ...",
    naming no flag. Now the line ends with the flag, and nothing is drawn or written."""
    config = write_config(tmp_path / "c.toml", TINY)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--out", str(out), *flags]) == 2
    assert one_error_line(capsys.readouterr().err).endswith(f" ({flag})")
    assert not out.exists()
