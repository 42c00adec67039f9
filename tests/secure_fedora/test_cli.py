"""Smoke test of the command line: a real run from a TOML file to results, CSV and plots."""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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


def test_cli_reports_config_errors_with_the_key(tmp_path, capsys):
    # in-process: the tiny-noise tests below run `run` as a real process
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nrounds = -3\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "training.rounds" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def embedded_sigterm(monkeypatch) -> list:
    """Make SIGTERM look as it does where the toolkit runs inside an application that set its
    handler outside Python: ``signal.getsignal`` and ``signal.signal`` report the previous
    handler as None. Returns the handlers installed for SIGTERM (none reach the process)."""
    import signal

    real_signal, real_getsignal, installed = signal.signal, signal.getsignal, []

    def embedded_signal(signum, handler):
        if signum != signal.SIGTERM:
            return real_signal(signum, handler)
        if handler is None:  # what restoring the reported previous handler would do
            return real_signal(signum, handler)  # TypeError, as in the embedding
        installed.append(handler)
        return None

    monkeypatch.setattr(signal, "signal", embedded_signal)
    monkeypatch.setattr(signal, "getsignal",
                        lambda signum: None if signum == signal.SIGTERM else real_getsignal(signum))
    return installed


def test_a_run_leaves_a_sigterm_handler_set_outside_python_alone(tmp_path, monkeypatch):
    """Restoring SIGTERM's previous handler, None where it was set outside Python, raised
    TypeError after the run had finished; Python cannot put such a handler back, so the run
    now leaves it as it is."""
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\nmethods = ["local"]\n[data]\nnum_clients = 2\n'
                      "train_per_client = 20\nval_per_client = 10\ntest_per_client = 10\n"
                      "[training]\nrounds = 1\nbatch_size = 10\n")
    installed = embedded_sigterm(monkeypatch)
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert installed == [] and (out / "results.json").is_file()


@pytest.mark.parametrize("directory", ["", "  "])
def test_keys_init_refuses_an_empty_directory(tmp_path, monkeypatch, capsys, directory):
    """keys init "" wrote every private key into the current directory (and "  " into a
    directory of spaces), while --out and --keystore refuse such a path."""
    monkeypatch.chdir(tmp_path)
    assert main(["keys", "init", directory, "--clients", "2"]) == 2
    assert "the key directory is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_keys_init_refuses_a_run_directory(tmp_path, capsys):
    """keys init into a run's directory wrote private keys beside that run's record (the
    directory auditors receive), as ``--keystore`` did before it was refused there."""
    run = tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(run), "--quiet"]) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["keys", "init", str(run), "--clients", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds a run's record" in err and "directory of its own" in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_keys_init_writes_private_keys_0600_and_refuses_bad_input(tmp_path):
    keys = tmp_path / "keys"
    assert main(["keys", "init", str(keys), "--clients", "2"]) == 0
    for name in ("server", "client-000", "client-001"):
        assert (keys / f"{name}.ed25519.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "allowlist.json").exists()
    # existing keys are never overwritten silently; zero clients is refused
    assert main(["keys", "init", str(keys), "--clients", "2"]) == 2
    assert main(["keys", "init", str(tmp_path / "none"), "--clients", "0"]) == 2
    # a count past the limit is refused at once (it grew memory until killed)
    assert main(["keys", "init", str(tmp_path / "none"), "--clients", "99999999999999999999"]) == 2
    assert not (tmp_path / "none").exists()
    # a private key file that is a directory is named, not "Is a directory: 3"
    (keys / "client-001.ed25519.key").unlink()
    (keys / "client-001.ed25519.key").mkdir()
    from privacy.identity import IdentityError, load_identity

    with pytest.raises(IdentityError, match=r"client-001.ed25519.key is not a regular file"):
        load_identity(keys, "client-001")


def test_an_empty_keystore_option_is_refused(tmp_path, monkeypatch, capsys):
    """``--keystore ""`` wrote the private keys into the current directory."""
    config = tmp_path / "dp.toml"
    config.write_text(DP_TINY)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--keystore", "", "--quiet"]) == 2
    assert "--keystore is empty" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.key")) and not (tmp_path / "run").exists()


def test_keystore_on_a_config_without_privacy_is_refused(tmp_path, monkeypatch, capsys):
    """`run CONFIG --keystore DIR` with [privacy] enabled = false ran and ignored the flag (a
    run without privacy reads no key store): now one error line before anything is written."""
    monkeypatch.chdir(tmp_path)
    store, out = tmp_path / "store", tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(out), "--keystore", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --keystore is unused") and err.count("\n") == 1
    assert "[privacy] enabled = false" in err
    assert not out.exists() and not store.exists()



@pytest.mark.parametrize("command", [["run"], ["audit", "canary"]])
def test_keystore_help_names_every_default_location_in_order(command, tmp_path, monkeypatch):
    """``--keystore``'s help said the default was ``~/.local/share/...`` after ``[security]
    keystore``, which is wrong where ``$SECURE_FEDORA_KEYSTORE_HOME`` or ``$XDG_DATA_HOME``
    is set (README and ``default_keystore_home`` take those first)."""
    import argparse

    from secure_fedora.cli import build_parser
    from secure_fedora.secure.keystore import default_keystore_home

    parser = build_parser(command)
    for word in command:
        parser = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction)).choices[word]
    text = next(a.help for a in parser._actions if "--keystore" in a.option_strings)
    names = ["[security] keystore", "$SECURE_FEDORA_KEYSTORE_HOME",
             "$XDG_DATA_HOME/secure-fedora/keystore", "~/.local/share/secure-fedora/keystore"]
    assert all(n in text for n in names), text
    assert [text.index(n) for n in names] == sorted(text.index(n) for n in names)
    # the order stated is the order the default store is resolved in
    monkeypatch.setenv("SECURE_FEDORA_KEYSTORE_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "b"))
    assert default_keystore_home() == tmp_path / "a"
    monkeypatch.delenv("SECURE_FEDORA_KEYSTORE_HOME")
    assert default_keystore_home() == tmp_path / "b" / "secure-fedora" / "keystore"


def test_a_configured_keystore_on_a_config_without_privacy_is_refused(tmp_path, monkeypatch,
                                                                     capsys):
    """`[security] keystore = "DIR"` with [privacy] enabled = false was silently ignored (the
    --keystore flag is refused there): one error line naming the key, before anything is
    written."""
    monkeypatch.chdir(tmp_path)
    store, out = tmp_path / "store", tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text(SMOKE.read_text() + f'\n[security]\nkeystore = "{store}"\n')
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: [security] keystore = "{store}" is unused') and \
        err.count("\n") == 1
    assert "[privacy] enabled = false" in err and "remove the key, or enable [privacy]" in err
    assert not out.exists() and not store.exists()


def test_a_run_holding_an_unused_configured_keystore_still_resumes(tmp_path, monkeypatch, caplog):
    """A run without privacy whose config names ``[security] keystore`` (accepted before that
    was refused) resumes with a warning: its checkpoints are bound to that config, so refusing
    it would leave no way to finish the run."""
    import secure_fedora.secure.keystore as keystore

    monkeypatch.chdir(tmp_path)
    store, out = tmp_path / "store", tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text(SMOKE.read_text() + f'\n[security]\nkeystore = "{store}"\n')
    with monkeypatch.context() as m:  # the run as an earlier version started it
        m.setattr(keystore, "check_keystore_used", lambda *a, **k: None)
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(config), "--out", str(out), "--resume", "--quiet"]) == 0
    assert any("[security] keystore" in r.getMessage() and "is unused" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    assert main(["run", str(config), "--out", str(tmp_path / "fresh"), "--quiet"]) == 2
    assert not store.exists()


DP_TINY = """
name = "dp-tiny"
seed = 1
methods = ["fedora", "local"]

[data]
num_clients = 3
train_per_client = 48
val_per_client = 16
test_per_client = 16
groups = 3

[model]
name = "mlp"

[training]
rounds = 2
batch_size = 16

[fedora]
relatedness = "noised"
k = 1

[privacy]
enabled = true
epsilon = 4.0
delta = 1e-3
"""


LOCAL_DP = DP_TINY.replace('methods = ["fedora", "local"]', 'methods = ["local"]')


def test_a_store_from_keys_init_for_fewer_clients_is_extended_visibly_and_recorded(
        tmp_path, caplog):
    """`keys init --clients 2` then a run of 3 clients added client-002 to the store and its
    allowlist without a word, and nothing in the run said so."""
    config = tmp_path / "dp.toml"
    config.write_text(LOCAL_DP)
    store = tmp_path / "store"
    assert main(["keys", "init", str(store), "--clients", "2"]) == 0
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="secure_fedora.secure.keystore"):
        assert main(["run", str(config), "--out", str(out), "--quiet",
                     "--keystore", str(store)]) == 0
    notices = [r.getMessage() for r in caplog.records if "extended the key store" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert f"{store} (--keystore) with 1 identity (client-002)" in notices[0]
    assert json.loads((out / "results.json").read_text())["keystore_extended"] == ["client-002"]
    assert "client-002" in json.loads((store / "allowlist.json").read_text())["parties"]
    # a resume of the finished run keeps the record; a run the store covers makes none
    assert main(["run", str(config), "--out", str(out), "--quiet", "--resume",
                 "--keystore", str(store)]) == 0
    assert json.loads((out / "results.json").read_text())["keystore_extended"] == ["client-002"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="secure_fedora.secure.keystore"):
        assert main(["run", str(config), "--out", str(tmp_path / "again"), "--quiet",
                     "--keystore", str(store)]) == 0
    assert not any("extended" in r.getMessage() for r in caplog.records)
    assert "keystore_extended" not in json.loads((tmp_path / "again" / "results.json").read_text())


@pytest.mark.parametrize("point", ["ledger_staged@2", "keys_published", "train@2", "results"])
def test_a_store_extension_is_recorded_by_a_run_interrupted_before_its_results(
        tmp_path, capsys, point):
    """results.json listed keystore_extended only when the process that extended the store
    wrote it: a run killed after the extension, before its first results.json, was resumed
    with a store that lacked nothing, and its results.json said nothing of the extension."""
    from tests.secure_fedora.core.crash_support import crashes_at

    config = tmp_path / "dp.toml"
    config.write_text(LOCAL_DP)
    store, out = tmp_path / "store", tmp_path / "run"
    assert main(["keys", "init", str(store), "--clients", "2"]) == 0
    argv = ["run", str(config), "--out", str(out), "--quiet", "--keystore", str(store)]
    with crashes_at(point):
        main(argv)
    assert not (out / "results.json").exists()
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "results.json").read_text()).get("keystore_extended") == \
        ["client-002"]
    # the record made at the extension, in the run directory
    record = json.loads((out / "keystore_extended.json").read_text())
    assert record == {"keystore_extended": ["client-002"]}
    capsys.readouterr()


def test_a_store_extension_is_recorded_by_an_api_run_interrupted_before_its_results(tmp_path):
    """The Python API's run writes its config copy only as its first method opens its
    privacy: the extension made just before is recorded then, and a resume lists it."""
    from secure_fedora.core.config import load_config
    from secure_fedora.runtimes.inprocess import Simulation
    from tests.secure_fedora.core.crash_support import crashes_at

    config = tmp_path / "dp.toml"
    config.write_text(LOCAL_DP)
    cfg = load_config(config)
    store, out = tmp_path / "store", tmp_path / "run"
    assert main(["keys", "init", str(store), "--clients", "2"]) == 0
    with crashes_at("train@2"):
        Simulation(cfg, out, keystore=store).run()
    results = Simulation(cfg, out, keystore=store).run(resume=True)
    assert results["keystore_extended"] == ["client-002"]
    assert json.loads((out / "results.json").read_text())["keystore_extended"] == ["client-002"]


@pytest.mark.parametrize("name, damage", [
    ("results.json", b'{"keystore_extended": ["client-0'),
    ("results.json", b'["client-002"]'),
    ("results.json", b'{"keystore_extended": "client-002"}'),
    ("keystore_extended.json", b"\xff not json"),
    ("keystore_extended.json", b'{"keystore_extended": [2]}'),
])
def test_a_damaged_key_store_record_is_refused_by_a_resume(tmp_path, capsys, name, damage):
    """A results.json whose keystore_extended could not be read (not JSON, not an object, not
    a list of names) was dropped without a word and the resumed run rewrote results.json
    without it. A resume now refuses it as it refuses other damaged run files: one line naming
    the file, nothing written; the Python API's resume likewise."""
    import shutil

    from secure_fedora.api import Experiment
    from secure_fedora.runtimes.inprocess import Simulation
    from secure_fedora.runtimes.rundir import RunDirError

    config = tmp_path / "dp.toml"
    config.write_text(LOCAL_DP)
    store, out = tmp_path / "store", tmp_path / "run"
    assert main(["keys", "init", str(store), "--clients", "2"]) == 0
    argv = ["run", str(config), "--out", str(out), "--quiet", "--keystore", str(store)]
    assert main(argv) == 0
    (out / name).write_bytes(damage)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --resume: {out / name} ")
    assert "keystore_extended" in err and "nothing was written" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    from secure_fedora.core.config import load_config

    cfg = load_config(config)
    with pytest.raises(RunDirError, match=r"^run\(resume=True\): .*keystore_extended"):
        Experiment(cfg, run_dir=out).run(resume=True)
    with pytest.raises(RunDirError, match=r"^run\(resume=True\): .*keystore_extended"):
        Simulation(cfg, out, keystore=store).run(resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    shutil.rmtree(out)


def test_resume_of_a_finished_run_reprints_its_results_and_trains_nothing(tmp_path, capsys):
    """What README says of `run --resume` on a finished run: no round is trained and no
    ledger entry added; the results are printed again and results.json, rounds.csv and
    anchor.json stay byte for byte (the anchor copy kept apart verifies)."""
    config = tmp_path / "dp.toml"
    config.write_text(LOCAL_DP)
    out, store = tmp_path / "run", tmp_path / "store"
    argv = ["run", str(config), "--out", str(out), "--quiet", "--keystore", str(store)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    ledgers = {p: p.read_bytes() for p in (out / "ledgers").rglob("*") if p.is_file()}
    kept = {n: (out / n).read_bytes() for n in ("rounds.csv", "results.json", "anchor.json")}
    (tmp_path / "anchor-copy.json").write_bytes(kept["anchor.json"])
    assert main([*argv, "--resume"]) == 0
    again = capsys.readouterr().out
    assert "personalized test accuracy" in again and again == first
    assert {p: p.read_bytes() for p in (out / "ledgers").rglob("*") if p.is_file()} == ledgers
    assert {n: (out / n).read_bytes() for n in kept} == kept
    assert main(["audit", "verify", str(out), "--allowlist", str(store / "allowlist.json"),
                 "--anchor", str(tmp_path / "anchor-copy.json")]) == 0


def test_dp_run_keeps_keys_outside_and_its_anchor_refuses_a_cut_ledger(tmp_path, capsys, caplog):
    """Issue 14, "Why" 1 and 2 end to end: the default key store is created outside the
    run (with a note); the run holds public keys only; `audit verify --anchor --allowlist`
    passes, and fails once the last round is cut from the ledgers and results.json patched."""
    import os
    import shutil

    config = tmp_path / "dp.toml"
    config.write_text(DP_TINY)
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    for row in json.loads((out / "results.json").read_text())["privacy"]["fedora"]["clients"]:
        last = (out / "ledgers" / "fedora" / f"{row['client']}.jsonl").read_text().splitlines()[-1]
        accounted = json.loads(last)["epsilon_after"]  # results.json never shows less
        assert accounted <= row["epsilon_spent"] <= accounted + 1e-6
    store = Path(os.environ["SECURE_FEDORA_KEYSTORE_HOME"]) / "dp-tiny"
    # the note is a log line (stderr outside pytest); the console wraps long lines
    said = " ".join([*capsys.readouterr().err.split(), *caplog.messages])
    # printed as written: "[security]" was taken for markup and dropped
    assert "created the key store" in said and "--keystore or [security] keystore" in said
    # said once: the CLI's note and the runtime's log line told the same thing twice
    assert len(re.findall(r"created (the )?key store", said)) == 1, said
    assert (store / "operator.ed25519.key").stat().st_mode & 0o777 == 0o600
    assert store.stat().st_mode & 0o777 == 0o700
    assert not list(out.rglob("*.key")) and (out / "keys" / "allowlist.json").exists()
    kept = tmp_path / "anchor.json"
    shutil.copyfile(out / "anchor.json", kept)
    allow = store / "allowlist.json"
    argv = ["audit", "verify", str(out), "--anchor", str(kept), "--allowlist", str(allow)]
    assert main(argv) == 0
    # A named key store (keys init) is used as given; a second run does not recreate it.
    named = tmp_path / "store"
    assert main(["keys", "init", str(named), "--clients", "3"]) == 0
    assert (named / "operator.ed25519.pub").exists()
    out2 = tmp_path / "run2"
    caplog.clear()
    assert main(["run", str(config), "--out", str(out2), "--quiet", "--keystore", str(named)]) == 0
    assert "created the key store" not in " ".join([capsys.readouterr().err, *caplog.messages])
    assert main(["audit", "verify", str(out2), "--allowlist", str(named / "allowlist.json")]) == 0
    # Keys copied into the run directory make the allowlisted audit fail (not warn).
    shutil.copyfile(named / "client-000.ed25519.key", out2 / "client-000.ed25519.key")
    assert main(["audit", "verify", str(out2), "--allowlist", str(named / "allowlist.json")]) == 1
    # Cut the last round and the close entry from every FEDORA ledger, patch results.json.
    for ledger in (out / "ledgers" / "fedora").glob("*.jsonl"):
        lines = ledger.read_text().splitlines()
        last = max(json.loads(x)["round"] for x in lines[:-1])
        ledger.write_text("".join(x + "\n" for x in lines[:-1] if json.loads(x)["round"] != last))
    results = json.loads((out / "results.json").read_text())
    for row in results["privacy"]["fedora"]["clients"]:
        lines = (out / "ledgers" / "fedora" / f"{row['client']}.jsonl").read_text().splitlines()
        row["ledger_entries"] = len(lines)
        row.pop("ledger_head")
        row["epsilon_spent"] = json.loads(lines[-1])["epsilon_after"]
    (out / "results.json").write_text(json.dumps(results))
    assert main(argv) == 1
    (out / "anchor.json").unlink()
    (out / "results.json").unlink()
    assert main(["audit", "verify", str(out)]) == 1  # no close entries: not a finished run


def test_help_does_not_import_torch_or_the_subsystems():
    """``secure-fedora --help`` stays fast: torch and the heavy sub-systems load only when a
    command that needs them runs (checked by module, not by timing)."""
    import subprocess
    import sys

    code = ("import sys\nfrom secure_fedora.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'flwr', 'secure_fedora.experiments.sweep', "
            "'audits.cli', 'secure_fedora.runtimes.flower.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sweep" in out.stdout and "audit" in out.stdout and "deploy" in out.stdout  # listed
    assert out.stdout.strip().splitlines()[-1] == "[]"


HELP_COMMANDS = [["sweep"], ["audit"], ["audit", "verify"], ["audit", "report"],
                 ["audit", "canary"], ["audit", "whitebox"], ["audit", "leakage"],
                 ["audit", "replay"], ["deploy"], ["deploy", "local"], ["keys", "init"]]


def test_every_commands_help_imports_no_torch():
    """A sub-command's ``--help`` lists its flags without loading torch, matplotlib or flwr
    (``sweep --help`` and every ``audit ... --help`` loaded torch, 2-8 s on a busy machine).
    One fresh interpreter prints every command's help in turn, checking the loaded modules
    after each: a help that loads one is named (a module an earlier help imported stays
    loaded, so whichever help imports a heavy module first is the one named)."""
    import subprocess
    import sys

    code = ("import contextlib, io, json, sys\nfrom secure_fedora.cli import main\n"
            f"for command in {HELP_COMMANDS!r}:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n            main(command + ['--help'])\n"
            "        except SystemExit:\n            pass\n"
            "    print(json.dumps([command, out.getvalue(), sorted(m for m in"
            " ('torch', 'matplotlib', 'flwr') if m in sys.modules)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [command for command, _, _ in rows] == HELP_COMMANDS
    for command, text, heavy in rows:
        assert "--help" in text, command  # the command's own help was printed
        assert heavy == [], command


def test_the_planned_epsilon_is_printed_rounded_up():
    """The printed privacy plan rounded the planned epsilon to nearest (2.98341 as 2.9834)."""
    from rich.console import Console

    from secure_fedora.cli import privacy_plan_table

    row = {"method": "fedavg", "clients": 4, "epsilon_budget": 3.0, "delta": 1e-5,
           "noise_multiplier": 1.1, "sample_rate": 0.25, "steps_per_round": 4, "rounds": 3,
           "planned_epsilon": 2.98341, "releases": ["dpsgd x12 (q=0.25)"]}
    console = Console(width=200, record=True)
    console.print(privacy_plan_table([row]))
    text = console.export_text()
    assert "2.9835" in text and "2.9834" not in text


def test_the_printed_planned_epsilon_reads_under_a_budget_of_more_decimals_it_stays_under():
    """The planned epsilon was rounded up at four decimals beside a budget of five: 0.03124
    planned of a budget of 0.03125 read "0.0313", above the budget."""
    from rich.console import Console

    from secure_fedora.cli import privacy_plan_table

    row = {"method": "fedavg", "clients": 4, "epsilon_budget": 0.03125, "delta": 1e-5,
           "noise_multiplier": 1.1, "sample_rate": 0.25, "steps_per_round": 4, "rounds": 3,
           "planned_epsilon": 0.03124, "releases": ["dpsgd x12 (q=0.25)"]}
    console = Console(width=200, record=True)
    console.print(privacy_plan_table([row]))
    text = console.export_text()
    assert "0.03124" in text and "0.0313" not in text


def test_the_printed_plan_never_shows_more_noise_or_a_smaller_delta_or_rate_than_planned():
    """The printed plan rounded sigma 1.3284739842813091 to "1.3285" (more noise than drawn)
    and the sample rate and delta to nearest (a smaller q or delta: a stronger claim)."""
    from rich.console import Console

    from secure_fedora.cli import privacy_plan_table

    row = {"method": "fedavg", "clients": 4, "epsilon_budget": 3.0, "delta": 1.2345649e-05,
           "noise_multiplier": 1.3284739842813091, "sample_rate": 0.012345649,
           "steps_per_round": 4, "rounds": 3, "planned_epsilon": 2.98341,
           "releases": ["dpsgd x12 (q=0.012345649, sigma=1.3284739842813091)"]}
    console = Console(width=250, record=True)
    console.print(privacy_plan_table([row]))
    text = console.export_text()
    assert "1.3284 " in text and "1.3285" not in text
    assert "1.2345649e-05" in text and "0.012345649 " in text
    assert "sigma=1.3284739842813091" in text


def test_the_printed_plan_names_each_budgets_releases_in_its_rows_order():
    """With per-client budgets the caption listed the rows' release strings sorted as text,
    unlabelled: a plan whose first row is client 0's override of 0.5 showed the summary and
    lambda sigmas of the 8.0 budget first, as if they were that client's."""
    from secure_fedora.cli import privacy_plan_table

    def row(epsilon: float, delta: float, clients: int, sigma: str) -> dict[str, Any]:
        return {"method": "fedora", "clients": clients, "epsilon_budget": epsilon,
                "delta": delta, "noise_multiplier": 1.0, "sample_rate": 0.5,
                "steps_per_round": 2, "rounds": 1, "planned_epsilon": epsilon * 0.99,
                "releases": ["dpsgd x2 (q=0.5)", f"gaussian_summary x1 (q=1.0, sigma={sigma})"]}

    rows = [row(0.5, 1e-07, 1, "41.53406580153875"), row(8.0, 1e-05, 3, "2.4479371224673034")]
    lines = str(privacy_plan_table(rows).caption).splitlines()
    small = next(i for i, line in enumerate(lines) if "epsilon 0.5, delta 1e-07" in line)
    large = next(i for i, line in enumerate(lines) if "epsilon 8.0, delta 1e-05" in line)
    assert small < large  # in the rows' order
    assert "sigma=41.53406580153875" in lines[small] and "sigma=2.4479" not in lines[small]
    assert "sigma=2.4479371224673034" in lines[large]
    # one budget, or budgets whose releases are the same: one unlabelled line as before
    same = privacy_plan_table([row(0.5, 1e-07, 1, "3.0"), row(8.0, 1e-05, 3, "3.0")])
    assert str(same.caption).splitlines()[0] == ("releases per client: dpsgd x2 (q=0.5); "
                                                  "gaussian_summary x1 (q=1.0, sigma=3.0)")


@pytest.mark.parametrize("key, named", [
    ("8", "privacy.overrides.8: not a client index in [0, 8)"),
    ("-1", "privacy.overrides.-1: not a client index in [0, 8)"),
    ("00", "privacy.overrides.00: write the client index as 0"),
    ("3", None),
])
def test_privacy_overrides_on_a_config_without_privacy_are_refused(tmp_path, monkeypatch, capsys,
                                                                  key, named):
    """`[privacy.overrides]` with [privacy] enabled = false were silently ignored, bad client
    indices included (checked only with privacy on): one error line naming the bad index, or
    the unused overrides, before anything is written."""
    monkeypatch.chdir(tmp_path)
    out, config = tmp_path / "run", tmp_path / "c.toml"
    config.write_text(SMOKE.read_text() + f'\n[privacy.overrides."{key}"]\nepsilon = 1.0\n')
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    assert err.startswith(f"error: {named};" if named else "error: privacy.overrides (")
    assert f'privacy.overrides ("{key}") is unused: the config has [privacy] enabled = false' in err
    assert err.endswith("remove [privacy.overrides], or enable [privacy]\n")


def test_privacy_settings_on_a_config_without_privacy_are_refused(tmp_path, monkeypatch,
                                                                   capsys):
    """`[privacy] epsilon = 3` without `enabled = true` ran a non-private experiment without a
    word: one error naming the key and why, before anything is written."""
    monkeypatch.chdir(tmp_path)
    out, config = tmp_path / "run", tmp_path / "c.toml"
    config.write_text(SMOKE.read_text() + "\n[privacy]\nepsilon = 3.0\n")
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "error: privacy.epsilon = 3 is unused: the config has [privacy] enabled = false, and a "
        "run without privacy reads no privacy setting; remove it, or enable [privacy]\n")
    assert not out.exists()


def test_a_run_holding_unused_privacy_overrides_still_resumes(tmp_path, monkeypatch, caplog):
    """A run without privacy whose config sets privacy.overrides (accepted before that was
    refused, an index out of range included) resumes with a warning naming them: its
    checkpoints are bound to that config."""
    import secure_fedora.cli as cli

    monkeypatch.chdir(tmp_path)
    out, config = tmp_path / "run", tmp_path / "c.toml"
    config.write_text(SMOKE.read_text() + '\n[privacy.overrides."9"]\nepsilon = 1.0\n')
    with monkeypatch.context() as m:  # the run as an earlier version started it
        m.setattr(cli, "check_settings_used", lambda *a, **k: None)
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(config), "--out", str(out), "--resume", "--quiet"]) == 0
    assert any(r.getMessage().startswith("privacy.overrides.9: not a client index in [0, 8); "
                                         'privacy.overrides ("9") is unused')
               for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize("key", ["noise_multiplier", "summary_noise_multiplier"])
@pytest.mark.parametrize("value", ["1e-9", "1e-300"])
def test_a_tiny_fixed_noise_multiplier_is_one_error_line_without_a_remedy_that_cannot_work(
        tmp_path, key, value):
    """privacy.summary_noise_multiplier = 1e-9 under accountant = "auto" ended in "use
    accountant='rdp' or more noise" (RDP gives epsilon 5.5e17 > 4 for it), and Opacus and
    dp_accounting printed warnings before the error line: now stderr is the one line, exit 2."""
    config = tmp_path / "c.toml"
    config.write_text(DP_TINY + f"{key} = {value}\n")
    proc = subprocess.run([sys.executable, "-m", "secure_fedora.cli", "run", str(config),
                           "--out", str(tmp_path / "run"), "--quiet",
                           "--keystore", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: privacy plan of 'fedora' over budget") and \
        proc.stderr.count("\n") == 1, proc.stderr
    assert "accountant='rdp'" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    """README's "Two commands" section holds exactly two set-up commands (the main job, the
    tests), the main job runs `secure-fedora run`, and `.ci/run` runs the test command as
    written there."""
    root = SMOKE.parents[1]
    section = (root / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n```", 1)[0].strip() for b in section.split("```bash\n")[1:]]
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    main_job, tests = blocks
    assert "secure-fedora run configs/" in main_job and "pytest" in tests
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert tests in ci


@pytest.mark.parametrize("name, header", [
    ('""', '[privacy.mechanisms.""]'),
    ('"my.mech"', '[privacy.mechanisms."my.mech"]'),
    ('"a b"', '[privacy.mechanisms."a b"]'),
])
def test_a_mechanism_table_whose_name_is_no_bare_key_is_named_as_toml_writes_it(
        tmp_path, capsys, name, header):
    """`[privacy.mechanisms.""]` was named `[privacy.mechanisms.]` (and "my.mech" as two keys);
    the error now names the table as the config must write it."""
    out, config = tmp_path / "run", tmp_path / "c.toml"
    doc = SMOKE.read_text().replace("[fedora]\n", '[fedora]\nrelatedness = "noised"\n')
    config.write_text(doc + "\n[privacy]\nenabled = true\nepsilon = 3.0\ndelta = 1e-5\n"
                      f"\n[privacy.mechanisms.{name}]\nnoise_multiplier = 1.0\n")
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{header} names no registered mechanism" in err and not out.exists()


def test_an_override_key_that_is_no_bare_key_is_named_quoted(tmp_path, capsys):
    """`[privacy.overrides.""]` was named `privacy.overrides.:`; it is now quoted."""
    out, config = tmp_path / "run", tmp_path / "c.toml"
    doc = SMOKE.read_text().replace("[fedora]\n", '[fedora]\nrelatedness = "noised"\n')
    config.write_text(doc + "\n[privacy]\nenabled = true\nepsilon = 3.0\ndelta = 1e-5\n"
                      '\n[privacy.overrides.""]\nepsilon = 1.0\n')
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    assert 'privacy.overrides."": not a client index in [0, 8)' in capsys.readouterr().err


def test_the_printed_plan_says_its_planned_epsilon_is_rounded_up_and_the_spend_exact():
    """The printed plan showed "planned eps" rounded up, and results.json then the exact
    epsilon_spent: two numbers for "the same" figure. The caption's last line says which is
    which (the releases line stays first)."""
    from secure_fedora.cli import PLANNED_EPS_NOTE, privacy_plan_table

    row = {"method": "fedavg", "clients": 4, "epsilon_budget": 3.0, "delta": 1e-5,
           "noise_multiplier": 1.1, "sample_rate": 0.25, "steps_per_round": 4, "rounds": 3,
           "planned_epsilon": 2.98341, "releases": ["dpsgd x12 (q=0.25)"]}
    lines = str(privacy_plan_table([row]).caption).splitlines()
    assert lines[0] == "releases per client: dpsgd x12 (q=0.25)"
    assert lines[-1] == PLANNED_EPS_NOTE == (
        "planned eps: the plan's epsilon rounded up; the epsilon a client spends (results.json"
        " epsilon_spent, its ledger) is exact")
