"""``secure-fedora audit ...`` through audits.cli.register (exit codes and printed failures)."""

from __future__ import annotations

import argparse
import json

import pytest

from audits.cli import main, register
from secure_fedora.cli import main as secure_fedora_main
from tests.audits.conftest import canary_run_dir


def test_register_adds_audit_subcommands():
    parser = argparse.ArgumentParser(prog="secure-fedora")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    for argv in (["audit", "verify", "RUN"], ["audit", "report", "RUN"],
                 ["audit", "canary", "CFG"], ["audit", "leakage", "CFG"]):
        args = parser.parse_args(argv)
        assert callable(args.func)


def test_verify_exit_zero_on_clean_run(pristine_run, capsys, tmp_path):
    out_json = tmp_path / "v.json"
    assert main(["audit", "verify", str(pristine_run), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "verification PASSED" in out
    assert "fedora/client-002" not in out  # clean ledgers are summarized, not listed
    assert json.loads(out_json.read_text())["ok"] is True
    assert main(["audit", "verify", str(pristine_run), "--verbose"]) == 0
    assert "fedora/client-002" in capsys.readouterr().out


def test_verify_never_prints_an_epsilon_below_the_one_it_computed(pristine_run, capsys):
    # every epsilon the listing shows (recorded, independent, the other accountant's) and the
    # summary's independent and PLD ranges are rounded up, never to nearest
    from audits.verify import verify_run

    report = verify_run(pristine_run)
    assert main(["audit", "verify", str(pristine_run), "--verbose"]) == 0
    out = capsys.readouterr().out
    below = []
    for c in report.clients:
        label = f"{c.method}/{c.client_id}"
        line = next(x for x in out.splitlines() if x.strip().startswith(label + ":"))
        independent = float(line.split("(independent ")[1].split(";")[0].split(")")[0])
        if independent < c.independent_final_epsilon:
            below.append((label, "independent", independent, c.independent_final_epsilon))
        if c.cross_final_epsilon is not None:
            cross = float(line.split(f"; {c.cross_method} ")[1].split(" ")[0])
            if cross < c.cross_final_epsilon:
                below.append((label, c.cross_method, cross, c.cross_final_epsilon))
    for row in out.splitlines():
        cells = row.split()
        if cells and cells[0] in {c.method for c in report.clients}:
            highest = max(c.independent_final_epsilon for c in report.clients
                          if c.method == cells[0])
            shown = float(cells[5].split("..")[-1])  # the independent column's upper end
            if shown < highest:
                below.append((cells[0], "summary", shown, highest))
    assert below == []


def test_verify_prints_a_summary_per_method_and_only_failing_ledgers(run_copy, capsys):
    path = run_copy / "ledgers" / "local" / "client-000.jsonl"
    lines = path.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("".join(line + "\n" for line in lines))
    assert main(["audit", "verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    for column in ("ledgers", "entries", "eps recorded", "independent", "refused", "errors"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("fedora", "local")}
    assert set(rows) == {"fedora", "local"}
    assert rows["local"][-2] != "0" and rows["fedora"][-2] == "0"  # errors per method
    assert "local/client-000" in out and "local/client-001" not in out


def test_verify_exit_nonzero_and_prints_failures(run_copy, capsys):
    path = run_copy / "ledgers" / "local" / "client-000.jsonl"
    lines = path.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("".join(line + "\n" for line in lines))
    assert main(["audit", "verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert "verification FAILED" in out
    assert ("ERROR client client-000, method local, ledger ledgers/local/client-000.jsonl,"
            " entry 0: [index]") in out


def test_verify_bad_run_dir_exit_two(tmp_path, capsys):
    assert main(["audit", "verify", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_writes_files(pristine_run, tmp_path, capsys):
    """`audit report` named its files in a `report:` block of its own, while canary,
    whitebox, leakage and replay print a `written: PATH` line for each file they write; it
    now prints one for each of its two files, in the order written."""
    out = tmp_path / "rep"
    assert main(["audit", "report", str(pristine_run), "--out", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "report.json").is_file()
    printed = capsys.readouterr().out
    assert printed.endswith(f"  written: {out / 'report.json'}\n"
                            f"  written: {out / 'report.html'}\n")
    assert printed.count("written:") == 2 and "report:" not in printed


def test_verify_says_which_file_it_wrote(pristine_run, tmp_path, capsys):
    """`audit verify --json FILE` wrote FILE without a word, while the audits print a
    `written: PATH` line for each file they write; it now prints one too (none without
    --json, which writes nothing)."""
    out_json = tmp_path / "v.json"
    assert main(["audit", "verify", str(pristine_run), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith(f"  written: {out_json}\n") and printed.count("written:") == 1
    assert json.loads(out_json.read_text())["ok"] is True
    assert main(["audit", "verify", str(pristine_run)]) == 0
    assert "written:" not in capsys.readouterr().out


def test_canary_and_leakage_report_bad_configs(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('methods = ["local"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                   'val_per_client = 8\ntest_per_client = 8\n')
    assert main(["audit", "canary", str(cfg), "--method", "fedora"]) == 2
    assert "not in the config's methods" in capsys.readouterr().err
    assert main(["audit", "canary", str(tmp_path / "missing.toml")]) == 2
    assert main(["audit", "leakage", str(tmp_path / "missing.toml")]) == 2
    assert main(["audit", "leakage", str(cfg), "--clip-norm", "1.0"]) == 2
    assert "--clip-norm needs --noise-multiplier" in capsys.readouterr().err


def test_leakage_never_shows_a_noise_multiplier_above_the_planned_one(tmp_path, capsys):
    # the planned summary noise is shown rounded down: 1.23456789 as 1.2345, never 1.235
    cfg = tmp_path / "c.toml"
    cfg.write_text('methods = ["fedora"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                   'val_per_client = 8\ntest_per_client = 8\n[fedora]\nk = 1\n'
                   'relatedness = "noised"\n[privacy]\nenabled = true\nepsilon = 8.0\n'
                   'summary_noise_multiplier = 1.23456789\n')
    assert main(["audit", "leakage", str(cfg)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("noised mode"))
    assert "noise multiplier 1.2345 (privacy.summary_noise_multiplier)" in line


def test_leakage_shows_a_tiny_noise_multiplier_readably_and_never_above_the_planned_one(
        tmp_path, capsys):
    """A summary noise multiplier below 5e-5 was shown as "0.0000"; it is now shown in
    scientific notation, still rounded down."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('methods = ["fedora"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                   'val_per_client = 8\ntest_per_client = 8\n[fedora]\nk = 1\n'
                   'relatedness = "noised"\n[privacy]\nenabled = true\nepsilon = 8.0\n'
                   'summary_noise_multiplier = 4.21789e-05\n')
    assert main(["audit", "leakage", str(cfg)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("noised mode"))
    assert "noise multiplier 4.2178e-5 (privacy.summary_noise_multiplier)" in line


def test_leakage_names_the_missing_or_bad_noised_mode_flag(tmp_path, capsys):
    """`audit leakage --noise-multiplier X` on a non-private config failed with "noised mode
    needs both clip_norm and noise_multiplier", the Python arguments, after building the
    clients' data; a bad value was refused as clip_norm/noise_multiplier too."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('methods = ["local"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                   'val_per_client = 8\ntest_per_client = 8\n')
    cases = [(["--noise-multiplier", "1.0"], "error: --noise-multiplier needs --clip-norm"),
             (["--clip-norm", "1.0"], "error: --clip-norm needs --noise-multiplier"),
             (["--clip-norm", "-1", "--noise-multiplier", "1"], "error: --clip-norm must be in"),
             (["--clip-norm", "1", "--noise-multiplier", "nan"],
              "error: --noise-multiplier must be in"),
             (["--clip-norm", "1", "--noise-multiplier", "0"],
              "error: --noise-multiplier must be in")]
    for flags, message in cases:
        assert main(["audit", "leakage", str(cfg), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message), (flags, err)
    assert main(["audit", "leakage", str(cfg), "--clip-norm", "1", "--noise-multiplier",
                 "1"]) == 0
    assert "noised" in capsys.readouterr().out


def test_canary_keystore_flag_chooses_the_key_store(tmp_path, capsys, monkeypatch):
    """`audit canary` of a DP config made its key store in the default home location and had
    no --keystore flag (the run commands have one)."""
    home = tmp_path / "home"
    monkeypatch.setenv("SECURE_FEDORA_KEYSTORE_HOME", str(home))
    run = canary_run_dir(tmp_path)
    store = tmp_path / "store"
    assert main(["audit", "canary", str(run), "--canaries", "40", "--keystore", ""]) == 2
    assert "--keystore is empty" in capsys.readouterr().err
    assert main(["audit", "canary", str(run), "--canaries", "40", "--keystore", str(store)]) == 3
    assert (store / "allowlist.json").is_file() and (store / "client-001.ed25519.key").is_file()
    assert not home.exists()
    # its key-store errors name the flag and the CLI's remedy, as the run's do
    stray = tmp_path / "stray"
    stray.mkdir(mode=0o700)
    (stray / "client-000.ed25519.key").write_text("x")
    capsys.readouterr()
    assert main(["audit", "canary", str(run), "--canaries", "40", "--keystore", str(stray)]) == 2
    err = capsys.readouterr().err
    assert "or --keystore)" in err and "secure-fedora keys init" in err and "keystore=" not in err


@pytest.mark.parametrize("argv", [["audit"], ["audit", "verify"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_canary_on_a_run_dir_writes_the_common_document(tmp_path, capsys):
    run = canary_run_dir(tmp_path)
    code = main(["audit", "canary", str(run), "--canaries", "40"])
    out = capsys.readouterr().out
    doc = json.loads((run / "audit" / "canary.json").read_text())
    # 40 canaries certify far less than 8: the audit says so and exits 3
    assert doc["verdict"] == "inconclusive" and code == 3
    assert doc["certifiable_max"] < 8.0 and doc["claim_epsilon"] == pytest.approx(8.0, rel=0.02)
    assert "certifiable maximum" in out and "cannot certify epsilon above" in out


def test_report_refuses_an_empty_out(pristine_run, tmp_path, monkeypatch, capsys):
    """`audit report RUN --out ''` wrote report.html and report.json into the current
    directory, where the run commands refuse an empty --out."""
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "report", str(pristine_run), "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", ["", "  "])
def test_canary_refuses_an_empty_config_path(tmp_path, monkeypatch, capsys, config):
    """`audit canary ''` took the current directory for the run directory (then "cannot read
    config config.toml"), where every other command refuses an empty config path."""
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "canary", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the config path is empty: name a config file or run "
                          "directory") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_verify_and_report_refuse_a_directory_that_is_not_a_run(tmp_path, capsys):
    """An empty directory was verified as "not differentially private" (rc 1), and the report
    wrote audit/ into it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audit", "verify", str(empty)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["audit", "report", str(empty)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert not any(empty.iterdir())


def noised_fedora_config(path, privacy: str):
    """A 3-client FEDORA config with noised relatedness and DP; ``privacy`` completes its
    [privacy] table."""
    path.write_text(
        'methods = ["fedora"]\n[data]\nnum_clients = 3\ntrain_per_client = 24\n'
        'val_per_client = 8\ntest_per_client = 8\ngroups = 2\n[training]\nrounds = 2\n'
        'batch_size = 12\n[fedora]\nk = 1\nrelatedness = "noised"\n'
        '[privacy]\nenabled = true\n' + privacy)
    return path


def test_leakage_on_a_dp_config_uses_each_clients_planned_summary_noise(tmp_path, capsys):
    """With the summary noise calibrated from the budget (the default), the audit failed with
    "noised mode needs both clip_norm and noise_multiplier" on every DP config."""
    from secure_fedora.core.config import load_config
    from secure_fedora.secure.private import client_budget, privacy_plan

    cfg_path = noised_fedora_config(tmp_path / "dp.toml", 'epsilon = 3.0\ndelta = 1e-3\n'
                                    '[privacy.overrides.1]\nepsilon = 1.0\n')
    out_json = tmp_path / "leak.json"
    assert main(["audit", "leakage", str(cfg_path), "--json", str(out_json)]) == 0
    cfg = load_config(cfg_path)
    planned = [privacy_plan(cfg, "fedora", client_budget(cfg, i)).summary_noise for i in range(3)]
    assert planned[0] == planned[2] and planned[1] > planned[0]
    doc = json.loads(out_json.read_text())
    assert doc["noise_multiplier"] == pytest.approx(planned)
    assert doc["clip_norm"] == cfg.privacy.summary_clip
    assert "noised" in doc["modes"]
    assert "calibrated: privacy.summary_budget_fraction 0.2" in capsys.readouterr().out
    # a flag still overrides the plan, for every client
    assert main(["audit", "leakage", str(cfg_path), "--noise-multiplier", "2.5",
                 "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["noise_multiplier"] == 2.5


def test_leakage_says_which_file_it_wrote(tmp_path, capsys):
    """`audit leakage --json FILE` wrote FILE without a word, while canary, whitebox and replay
    print a `written: PATH` line for each file they write; it now prints one too."""
    cfg_path = noised_fedora_config(tmp_path / "dp.toml", "epsilon = 3.0\ndelta = 1e-3\n")
    out_json = tmp_path / "leak.json"
    assert main(["audit", "leakage", str(cfg_path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"  written: {out_json}\n") and out.count("written:") == 1
    assert json.loads(out_json.read_text())["modes"]
    assert main(["audit", "leakage", str(cfg_path)]) == 0  # without --json nothing is written
    assert "written:" not in capsys.readouterr().out


def test_leakage_on_an_over_budget_dp_config_says_the_run_would_be_refused(tmp_path, capsys):
    """The plan's own error said "nothing was trained", which reads as a report on a run."""
    cfg_path = noised_fedora_config(tmp_path / "over.toml",
                                    'epsilon = 1.0\ndelta = 1e-3\nnoise_multiplier = 0.3\n')
    out_json = tmp_path / "leak.json"
    assert main(["audit", "leakage", str(cfg_path), "--json", str(out_json)]) == 2
    err = capsys.readouterr().err
    assert "no planned summary noise to audit" in err and "would be refused" in err
    assert "--noise-multiplier" in err and not out_json.exists()
    # an explicit noise level audits the same config
    assert main(["audit", "leakage", str(cfg_path), "--noise-multiplier", "2.0",
                 "--json", str(out_json)]) == 0


def test_the_recorded_epsilon_is_printed_rounded_up():
    """`audit verify` printed recorded epsilons to four significant digits rounded to
    nearest (2.98341 as 2.983, below the ledger's value)."""
    from audits.cli import _range

    assert _range([2.98341], "up") == "2.9835"
    assert _range([2.98341, 1.2], "up") == "1.2000..2.9835"
    assert _range([2.98341]) == "2.983" and _range([None]) == "n/a"


@pytest.mark.parametrize("command", ["verify", "canary", "whitebox", "leakage", "replay"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_json_option_is_refused_before_the_audit(pristine_run, tmp_path, monkeypatch,
                                                          capsys, command, value):
    """`audit verify RUN --json ''` ran the verification, then failed with an OSError ("Is a
    directory: '.'"); canary, whitebox and leakage wrote no file at all for '' (and one named
    by spaces for '  '). --json is now checked first, like --out."""
    monkeypatch.chdir(tmp_path)
    target = str(pristine_run) if command in ("verify", "whitebox", "replay") \
        else "missing.toml"
    assert main(["audit", command, target, "--json", value]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --json is empty: name a file\n" and captured.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, why", [("missing/v.json", "is not a directory"),
                                        (".", "is a directory")])
def test_a_json_option_that_cannot_be_written_is_refused_before_the_audit(
        pristine_run, tmp_path, monkeypatch, capsys, where, why):
    """An --json in a folder that does not exist failed (OSError) only after the audit had run."""
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "verify", str(pristine_run), "--json", where]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --json ") and why in captured.err
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_a_run_without_a_dp_claim_is_not_reported_as_failed(tmp_path, capsys):
    """`audit verify` and `audit report` on a finished non-DP run printed 'verification
    FAILED' and exited 1; verify, report (text, HTML, JSON) and replay now all say the run
    makes no DP claim and exit 3, the status canary and whitebox give when there is no claim."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    cfg = parse_config({"name": "plain-cli", "methods": ["local"],
                        "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 8},
                        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8}})
    run = tmp_path / "a run"  # a path with a space
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    out_json = tmp_path / "v.json"
    assert main(["audit", "verify", str(run), "--json", str(out_json)]) == 3
    out = capsys.readouterr().out
    assert "no differential-privacy claim: nothing to verify" in out and "FAILED" not in out
    doc = json.loads(out_json.read_text())
    assert doc["verdict"] == "no_dp_claim" and doc["dp_claimed"] is False and doc["ok"] is True
    assert main(["audit", "report", str(run), "--out", str(tmp_path / "out")]) == 3
    assert "no differential-privacy claim" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["verdict"] == "no_dp_claim"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Verification: no differential-privacy claim" in page and "FAILED" not in page
    assert main(["audit", "replay", str(run)]) == 3
    assert "no differential-privacy claim" in capsys.readouterr().out
    assert not (run / "audit" / "replay.json").exists()


def test_a_dp_run_without_ledgers_fails_verify_and_report(run_copy, tmp_path, capsys):
    """The other side: a run that claims DP but lost its ledgers still fails (exit 1)."""
    import shutil

    shutil.rmtree(run_copy / "ledgers")
    out_json = tmp_path / "v.json"
    assert main(["audit", "verify", str(run_copy), "--json", str(out_json)]) == 1
    assert "verification FAILED" in capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    assert doc["verdict"] == "failed" and doc["dp_claimed"] is True and doc["ok"] is False
    assert "anchor.json is present (signed; only a DP run is anchored)" in doc["dp_claim_basis"]
    assert main(["audit", "report", str(run_copy), "--out", str(tmp_path / "out")]) == 1
    assert "Verification: FAILED" in (tmp_path / "out" / "report.html").read_text()


def test_whitebox_and_canary_do_not_take_an_edited_config_as_no_claim(run_copy, capsys):
    """`audit whitebox RUN` and `audit canary RUN` on a DP run whose config.toml was edited to
    disable privacy audited it as a non-private run ('no finite privacy claim', exit 3) and
    wrote whitebox.json/canary.json; the run's anchor, ledgers and results.json claim DP, so
    both now refuse it (exit 2) naming the edit, as `audit replay` does, and write nothing."""
    from tests.audits.test_verify import _stripped_of_dp

    _stripped_of_dp(run_copy)
    for argv in (["audit", "whitebox", str(run_copy), "--canaries", "20"],
                 ["audit", "canary", str(run_copy), "--canaries", "20"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "config.toml was changed after the run" in err and "anchor.json is present" in err
    assert not (run_copy / "audit").exists()


@pytest.mark.parametrize("command", ["whitebox", "replay"])
def test_whitebox_and_replay_print_a_config_error_on_one_line(run_copy, capsys, command):
    """`audit whitebox` and `audit replay` printed the error of an invalid config.toml with
    its newline ("error: invalid configuration ...:" then the key on a line of its own),
    where every other command prints one line (found by the hunt of edited run dirs)."""
    config = run_copy / "config.toml"
    config.write_text(config.read_text() + "\n[extra]\nfoo = 1\n")
    assert main(["audit", command, str(run_copy)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "config.toml: extra: unknown key" in lines[0]


@pytest.mark.parametrize("command, flags, message", [
    ("canary", ["--client", "9"], "client_index must be in [0, 2) (--client), got 9"),
    ("canary", ["--confidence", "2"], "confidence must be in (0, 1) (--confidence)"),
    ("canary", ["--delta", "2"], "delta must be in [0, 1) (--delta)"),
    ("whitebox", ["--client", "9"], "client index must be in [0, 3) (--client)"),
    ("whitebox", ["--confidence", "0"], "confidence must be in (0, 1) (--confidence)"),
    ("whitebox", ["--calibration-fraction", "2"], "(0, 1) (--calibration-fraction)"),
    ("replay", ["--client", "9"], "client must be an index in [0, 3) (--client)"),
    ("replay", ["--confidence", "1"], "confidence must be in (0, 1) (--confidence)"),
    ("replay", ["--trials", "1"], "trials must be an int in [2, 1,000,000] (--trials)"),
    ("verify", ["--rel-tol", "-1"], "rel_tol must be in [0, 1) (--rel-tol)"),
    ("verify", ["--pld-checkpoints", "0"], "[1, 2**63) (--pld-checkpoints)"),
])
def test_audit_argument_errors_name_the_flag(pristine_run, tmp_path, capsys, command, flags,
                                             message):
    """`audit canary --client 9` said "client_index must be in [0, 2)", the Python argument;
    so did the other audits' range errors (confidence, delta, trials, rel_tol, ...)."""
    target = pristine_run
    if command == "canary":
        target = tmp_path / "c.toml"
        target.write_text('methods = ["local"]\n[data]\nnum_clients = 2\n'
                          'train_per_client = 16\nval_per_client = 8\ntest_per_client = 8\n')
    assert main(["audit", command, str(target), *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["verify", "canary", "whitebox", "leakage"])
def test_force_without_json_is_refused_before_the_audit(pristine_run, tmp_path, monkeypatch,
                                                        capsys, command):
    """`audit verify RUN --force` (canary, whitebox, leakage likewise) ran the audit and
    ignored --force: it only lets --json replace a file, and there was none to replace."""
    monkeypatch.chdir(tmp_path)
    target = str(pristine_run) if command in ("verify", "whitebox") else "missing.toml"
    assert main(["audit", command, target, "--force"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --force needs --json") and captured.out == ""
    assert "\n" not in captured.err.rstrip("\n") and list(tmp_path.iterdir()) == []
    assert "only with --json" in " ".join(
        _subparser(command).format_help().split())


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-fedora")
    register(parser.add_subparsers(dest="command"))
    audit = parser._subparsers._group_actions[0].choices["audit"]
    return audit._subparsers._group_actions[0].choices[command]


def test_canary_keystore_on_a_config_without_privacy_is_refused(tmp_path, capsys, monkeypatch):
    """`audit canary CFG --keystore DIR` of a config with [privacy] enabled = false ran and
    ignored the key store (such a run reads none): an error now, before anything is built."""
    monkeypatch.setenv("SECURE_FEDORA_KEYSTORE_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "c.toml"
    cfg.write_text('methods = ["local"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                   'val_per_client = 8\ntest_per_client = 8\n')
    store = tmp_path / "store"
    assert main(["audit", "canary", str(cfg), "--canaries", "20", "--keystore", str(store)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert captured.err.startswith("error: --keystore is unused") and \
        "[privacy] enabled = false" in captured.err
    assert not store.exists() and not (tmp_path / "home").exists()


def test_canary_of_a_run_holding_an_unused_configured_keystore_runs(tmp_path, capsys,
                                                                    monkeypatch, caplog):
    """`audit canary RUN` of a run without privacy whose config.toml names [security] keystore
    (accepted before that was refused; such a run still resumes) audited it; it was refused,
    telling the user to edit the run's own config.toml: a warning now, as on resume."""
    import secure_fedora.secure.keystore as keystore

    monkeypatch.setenv("SECURE_FEDORA_KEYSTORE_HOME", str(tmp_path / "home"))
    store, run = tmp_path / "store", tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('methods = ["local"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                   'val_per_client = 8\ntest_per_client = 8\n[training]\nrounds = 1\n'
                   f'[security]\nkeystore = "{store}"\n')
    with monkeypatch.context() as m:  # the run as an earlier version started it
        m.setattr(keystore, "check_keystore_used", lambda *a, **k: None)
        assert secure_fedora_main(["run", str(cfg), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["audit", "canary", str(run), "--canaries", "20"]) == 3
    assert (run / "audit" / "canary.json").is_file() and not store.exists()
    assert any("[security] keystore" in r.getMessage() and "is unused" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    # a config given as a file is still refused: it can be fixed
    assert main(["audit", "canary", str(cfg), "--canaries", "20"]) == 2
    assert "remove the key, or enable [privacy]" in capsys.readouterr().err


def test_an_audits_claimed_epsilon_is_printed_rounded_up(capsys):
    """The summary line of audit canary / whitebox printed the claimed epsilon with 4
    significant digits rounded to nearest (2.81249 as 2.812, below the claim)."""
    from audits.cli import _print_audit_summary

    _print_audit_summary({"claim_epsilon": 2.81249, "certifiable_max": 3.9, "confidence": 0.95,
                          "lower_bound": 0.5, "verdict_text": "consistent"})
    assert "claimed epsilon 2.8125;" in capsys.readouterr().out


def test_an_audit_summary_reads_the_claim_and_its_bounds_as_the_verdict_compares_them(capsys):
    """The claim was printed rounded up at four decimals, the lower bound and the certifiable
    maximum at four significant digits to nearest: a lower bound 1.00004 over a claim 1.0
    (refuted) read "1" beside "1.0000", and a certifiable maximum 1.00003 over it
    (consistent) read "1", at the claim."""
    from audits.cli import _print_audit_summary
    from audits.verdict import verdict_text

    text = verdict_text("refuted", 1.0, 8.1, 1.00004)
    _print_audit_summary({"claim_epsilon": 1.0, "certifiable_max": 8.1, "confidence": 0.95,
                          "lower_bound": 1.00004, "verdict_text": text})
    out = capsys.readouterr().out
    assert "claimed epsilon 1.00000; certifiable maximum 8.10000" in out
    assert "measured lower bound 1.00004" in out
    assert "refuted: the lower bound 1.00004 exceeds the claimed epsilon 1.00000" in out
    _print_audit_summary({"claim_epsilon": 1.0, "certifiable_max": 1.00003, "confidence": 0.95,
                          "lower_bound": 0.99996, "verdict_text": "consistent"})
    out = capsys.readouterr().out
    assert "claimed epsilon 1.00000; certifiable maximum 1.00003" in out
    assert "measured lower bound 0.99996" in out
    # figures apart at four decimals keep them, bounds rounded down
    _print_audit_summary({"claim_epsilon": 2.0, "certifiable_max": 6.61234, "confidence": 0.95,
                          "lower_bound": 0.51237, "verdict_text": "consistent"})
    out = capsys.readouterr().out
    assert "claimed epsilon 2.0000; certifiable maximum 6.6123" in out
    assert "measured lower bound 0.5123" in out


def test_audit_verify_lists_an_epsilon_beside_its_budget_on_the_right_side_of_it(capsys):
    """The ledger listing printed the budget with :g (1.00000004 as "1") and each epsilon
    rounded up at four decimals: a spend of 0.03124 under a budget of 0.03125 read "0.0313",
    above it, and a spend of 1.00000003 under the budget 1.00000004 read above "1"."""
    import io

    from audits.cli import _print_verification
    from audits.verify import ClientVerification, VerificationReport

    def ledger(cid: str, budget: float, spent: float) -> ClientVerification:
        return ClientVerification(client_id=cid, method="fedora", ledger=f"{cid}.jsonl",
                                  entries=3, accountant="rdp", delta=1e-5, budget_epsilon=budget,
                                  final_epsilon=spent, independent_final_epsilon=spent,
                                  refused=False, mechanisms={}, series=[])

    report = VerificationReport(run_dir="run", clients=[
        ledger("client-000", 0.03125, 0.03124), ledger("client-001", 1.00000004, 1.00000003),
        ledger("client-002", 3.0, 2.98341)], findings=[], rel_tol=0.01,
        independent_accountant="rdp", allowlist="", checks=[])
    out = io.StringIO()
    _print_verification(report, out, verbose=True)
    text = out.getvalue()
    assert "epsilon 0.03124 (independent 0.03124) of budget 0.03125" in text
    assert "epsilon 1.00000003 (independent 1.00000003) of budget 1.00000004" in text
    assert "epsilon 2.9835 (independent 2.9835) of budget 3 ->" in text


def test_a_symbolic_link_loop_given_to_audit_is_named_so_not_missing(pristine_run, tmp_path,
                                                                     capsys):
    """A run directory, --anchor or --allowlist that was a symbolic link loop was said not to
    exist (or the report's output check said "cannot be checked"); each now says it is a loop,
    and nothing is written."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    cases = [(["audit", "verify", str(loop)], f"run directory {loop}"),
             (["audit", "report", str(loop / "run")], f"run directory {loop / 'run'}"),
             (["audit", "report", str(pristine_run), "--out", str(loop)], f"--out {loop}"),
             (["audit", "verify", str(pristine_run), "--anchor", str(loop)], f"anchor {loop}"),
             (["audit", "verify", str(pristine_run), "--allowlist", str(loop)],
              f"allowlist {loop}")]
    for argv, named in cases:
        assert main(argv) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{named} is a symbolic link loop" in err and "does not exist" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


def test_verify_json_is_encoded_once_and_reads_as_before(pristine_run, tmp_path, monkeypatch):
    """`audit verify --json` dumped the report to text, which the writer parsed back to seal
    and dumped again; the document is now sealed and encoded once, the file's bytes unchanged
    (those of the text path, which the seal's check still recognises)."""
    import audits.output as output
    import audits.verify as verify
    from secure_fedora.core.files import strict_json

    report = verify.verify_run(pristine_run)
    monkeypatch.setattr(verify, "verify_run", lambda *args, **kwargs: report)

    def no_parse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the report's JSON text was parsed back")

    monkeypatch.setattr(output.json, "loads", no_parse)
    out_json = tmp_path / "v.json"
    assert main(["audit", "verify", str(pristine_run), "--json", str(out_json)]) == 0
    monkeypatch.undo()
    expected = output.seal_report(strict_json(report.to_json()), "verify")
    assert out_json.read_text() == expected
    assert output.is_previous_report(out_json, "verify")


def _old_json_bytes(doc: dict, command: str) -> str:
    """What `--json` wrote before the document was sealed once: dumped (anything not JSON as
    its str), parsed back, made strict and sealed from that text."""
    from audits.output import seal_report
    from secure_fedora.core.files import strict_json

    return seal_report(strict_json(json.loads(json.dumps(doc, default=str))), command)


@pytest.mark.parametrize("command", ["whitebox", "leakage", "canary"])
def test_whitebox_leakage_and_canary_json_are_encoded_once_and_read_as_before(
        command, tmp_path, monkeypatch, capsys):
    """`audit whitebox --json`, `audit leakage --json` and `audit canary --json` dumped their
    document to text, which the writer parsed back to seal and dumped again (as `audit
    verify --json` did); each document is now sealed and encoded once, the file's bytes those
    of the old path on a real document, recognised as a previous report."""
    import tomli_w

    import audits.canary as canary
    import audits.output as output
    import audits.summary_leakage as summary_leakage
    import audits.whitebox as whitebox
    from secure_fedora.core.config import load_config
    from secure_fedora.runtimes.inprocess import build_clients

    if command == "whitebox":
        target = tmp_path / "run"
        target.mkdir()
        (target / "config.toml").write_text(tomli_w.dumps({
            "methods": ["local"], "data": {"num_clients": 2, "train_per_client": 64,
                                           "val_per_client": 8, "test_per_client": 8},
            "training": {"rounds": 1, "batch_size": 16},
            "privacy": {"enabled": True, "epsilon": 3.0, "noise": "reproducible"}}))
        real = whitebox.audit_run_dir(target, num_canaries=100)
        doc = real[0].to_json()
        monkeypatch.setattr(whitebox, "audit_run_dir", lambda *args, **kwargs: real)
        flags = ["--canaries", "100"]
    elif command == "leakage":
        target = noised_fedora_config(tmp_path / "dp.toml", "epsilon = 3.0\n")
        cfg = load_config(target)
        real = summary_leakage.run_summary_leakage_audit(
            build_clients(cfg), q=cfg.fedora.q, clip_norm=cfg.privacy.summary_clip,
            noise_multiplier=[1.5, 2.0, 1.5], tau=cfg.fedora.tau, seed=cfg.seed)
        doc = real.to_json()
        monkeypatch.setattr(summary_leakage, "run_summary_leakage_audit",
                            lambda *args, **kwargs: real)
        flags = []
    else:
        from tests.audits.conftest import CANARY_CONFIG

        target = tmp_path / "c.toml"
        target.write_text(CANARY_CONFIG.replace("[privacy]\nenabled = true\nepsilon = 8.0\n",
                                                ""))
        real = canary.run_canary_audit(load_config(target), num_canaries=40)
        doc = real.to_json()
        monkeypatch.setattr(canary, "run_canary_audit", lambda *args, **kwargs: real)
        flags = ["--canaries", "40"]

    def no_parse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the document's JSON text was parsed back")

    out_json = tmp_path / "out.json"
    monkeypatch.setattr(output.json, "loads", no_parse)
    try:
        code = main(["audit", command, str(target), *flags, "--json", str(out_json)])
    finally:
        monkeypatch.undo()
    assert code in (0, 1, 3), capsys.readouterr().err
    assert out_json.read_text() == _old_json_bytes(doc, command)
    assert output.is_previous_report(out_json, command)


@pytest.mark.parametrize("command, codes", [
    ("verify", ["exit 0: every check holds", "1: verification failed", "3: the run makes no"]),
    ("report", ["exit 0: written and verification passed", "1: written, verification failed",
                "3: written for a run without"]),
    ("canary", ["exit 0: consistent", "1: refuted", "3: inconclusive", "2: bad input"]),
    ("whitebox", ["exit 0: consistent", "1: refuted", "3: inconclusive", "2: bad input"]),
    ("replay", ["exit 0: consistent", "1: refuted", "3: inconclusive", "no differential-privacy"
                " claim (nothing written)", "2: the run cannot be audited"]),
    ("leakage", ["exit 0: the figures were computed (no verdict)", "2: bad input"])])
def test_every_audit_help_states_its_exit_codes_and_every_option(command, codes):
    """A reviewer reading `audit <command> --help` found no exit codes (only the README had
    them), `--confidence`, `--seed` and `--kind` said nothing, and `audit replay --allowlist`
    said private keys inside RUN_DIR were an error "then" (with the flag), though replay
    refuses them with it or without, as `audit verify --allowlist` says."""
    parser = _subparser(command)
    text = " ".join(parser.format_help().split())
    for code in codes:
        assert code in text, (code, text)
    for action in parser._actions:
        assert action.help, f"audit {command} {action.option_strings or action.dest}"
    if command in ("verify", "replay"):
        assert "private keys inside RUN_DIR are an error with it or without" in text


def test_each_audit_states_its_own_method_default_and_a_wrong_method_names_the_flag(
        pristine_run, tmp_path, capsys):
    """canary, whitebox and replay each pick the attacked method their own way (canary:
    local; whitebox: local when the config has it, else its first; replay: fedora when its
    ledgers exist, else the first with ledgers); each `--help` states its own, and a method
    the config lacks (canary's default local included) was refused without naming --method."""
    helps = {command: " ".join(_subparser(command).format_help().split())
             for command in ("canary", "whitebox", "replay")}
    assert ("--method METHOD method to train, one of the config's (default local, which the"
            " config must run: give --method for a config without it)") in helps["canary"]
    assert ("--method METHOD whose plan to audit (default: local when the config has it, else"
            " its first method)") in helps["whitebox"]
    assert ("(default: fedora when RUN_DIR has its ledgers, else the config's first method"
            " that has ledgers)") in helps["replay"]
    cfg = tmp_path / "fedavg.toml"
    cfg.write_text('methods = ["fedavg"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                   'val_per_client = 8\ntest_per_client = 8\n[training]\nrounds = 1\n')
    assert main(["audit", "canary", str(cfg), "--canaries", "20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method 'local' is not in the config's methods" \
        " ['fedavg']: name one with --method" in err, err
    for command in ("whitebox", "replay"):
        assert main(["audit", command, str(pristine_run), "--method", "nope"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "method 'nope' is not in the" in err
        assert err.endswith(": name one with --method\n"), err


@pytest.mark.parametrize("command", ["verify", "report", "replay", "whitebox"])
def test_a_missing_anchor_or_allowlist_file_names_its_flag_and_path(command, tmp_path, capsys):
    """`audit verify|report|replay --anchor FILE` with FILE missing said "anchor FILE does not
    exist" (replay: a complaint about the run instead): one line naming the flag and the path,
    exit 2 (bad input), as --allowlist does; nothing is written into the run. `audit
    whitebox` takes both flags alike."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    missing = tmp_path / "kept" / "anchor.json"
    for flag in ("--anchor", "--allowlist"):
        assert main(["audit", command, str(run), flag, str(missing)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"{flag}: " in err[0] and f"{missing} does not exist" in err[0]
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]


@pytest.mark.parametrize("content", [b"", b"[]", b"\x00\xff\xfe\x80 binary",
                                     b'{"format": "secure-fedora-anchor"}'])
def test_an_unusable_anchor_copy_is_bad_input_in_every_command(run_copy, tmp_path, capsys,
                                                               content):
    """An --anchor file that is empty, ``[]``, binary bytes or no anchor failed `audit verify`
    and `audit report` as a verification failure (exit 1, report written), while the same
    input to --allowlist is bad input (exit 2): the file is the auditor's argument, not
    evidence about the run. Now it is bad input (exit 2, one line naming --anchor, nothing
    written) in verify, report, replay and whitebox alike; the run's own anchor.json in that
    state stays a finding (exit 1)."""
    bad = tmp_path / "anchor-copy.json"
    bad.write_bytes(content)
    out = tmp_path / "report"
    for argv in (["verify", str(run_copy)], ["report", str(run_copy), "--out", str(out)],
                 ["replay", str(run_copy), "--trials", "4"],
                 ["whitebox", str(run_copy), "--canaries", "100"]):
        assert main(["audit", *argv, "--anchor", str(bad)]) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "--anchor: " in err and "(give the anchor.json kept apart)" in err, argv
        assert "\n" not in err and "verification" not in captured.out
    assert not out.exists() and not (run_copy / "audit" / "replay.json").exists()
    assert not (run_copy / "audit" / "whitebox.json").exists()
    (run_copy / "anchor.json").write_bytes(content)  # the run's own: a finding
    assert main(["audit", "verify", str(run_copy)]) == 1
    capsys.readouterr()
