"""Runs never mix or lose data (issue 14 "Why" 3, 4 and 5): every refusal happens before a
byte is written, and the refused directory is left exactly as it was."""

import json
import re
import shutil
from pathlib import Path

import pytest
import tomli_w

from audits.cli import main as audit_main
from secure_fedora.api import Experiment
from secure_fedora.cli import main
from secure_fedora.runtimes.inprocess import CheckpointError
from secure_fedora.runtimes.rundir import RunDirError

TINY = {
    "name": "tiny-run",
    "seed": 0,
    "methods": ["local", "fedavg"],
    "data": {"num_clients": 3, "train_per_client": 40, "val_per_client": 10, "test_per_client": 10},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 20, "lr": 0.05},
    "fedavg": {"finetune_epochs": 0},
}
DP = {**TINY, "methods": ["local"], "privacy": {"enabled": True, "epsilon": 3.0, "delta": 1e-3}}


def write_config(path: Path, doc: dict) -> Path:
    path.write_text(tomli_w.dumps(doc))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (directories by name)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


def run(config: Path, out: Path, *extra: str) -> int:
    return main(["run", str(config), "--out", str(out), "--quiet", *extra])


def finished_run(tmp_path_factory, name: str, doc: dict) -> tuple[Path, Path]:
    """A CLI run of ``doc`` that finished: its config file and run directory, in a folder of
    their own (for module fixtures, which tests that change the run copy first)."""
    root = tmp_path_factory.mktemp(name)
    config = write_config(root / f"{name}.toml", doc)
    assert run(config, root / "run") == 0
    return config, root / "run"


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """A finished DP run (3 clients, 2 rounds), copied by each test that changes it."""
    return finished_run(tmp_path_factory, "dp", DP)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "plain", TINY)


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def test_resume_with_another_config_writes_nothing_and_the_run_still_verifies(dp_run, tmp_path, capsys):
    config, source = dp_run
    run_dir = copy_run(source, tmp_path)
    before = snapshot(run_dir)
    other = write_config(tmp_path / "eps8.toml", {**DP, "privacy": {**DP["privacy"], "epsilon": 8.0}})
    assert run(other, run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and str(run_dir) in err
    assert snapshot(run_dir) == before  # config.toml included: nothing was overwritten
    assert audit_main(["audit", "verify", str(run_dir)]) == 0
    assert run(config, run_dir, "--resume") == 0  # the original config still resumes


def test_a_refused_resume_names_the_keys_that_differ(dp_run, tmp_path, capsys):
    _, source = dp_run
    run_dir = copy_run(source, tmp_path)
    before = snapshot(run_dir)
    other = write_config(tmp_path / "eps8.toml", {**DP, "privacy": {**DP["privacy"], "epsilon": 8.0}})
    assert run(other, run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert "privacy.epsilon = 3.0 in the run, 8.0 given" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_config_copy_is_named_as_damaged_not_as_another_run(dp_run, tmp_path, capsys,
                                                                      damage):
    """The given config is the one results.json records: config.toml changed after the run
    (emptied, or cut to a shorter TOML that still parses) is what the refusal names."""
    config, source = dp_run
    run_dir = copy_run(source, tmp_path)
    stored = run_dir / "config.toml"
    lines = stored.read_text().splitlines(keepends=True)
    stored.write_text("" if damage == "empty" else "".join(lines[: len(lines) // 2]))
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert "config.toml was changed or damaged after the run" in err
    assert "restore it from a copy" in err and "another configuration" not in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(run_dir) == before


def test_a_new_run_into_another_runs_directory_is_refused(dp_run, tmp_path, capsys):
    _, source = dp_run
    run_dir = copy_run(source, tmp_path)
    before = snapshot(run_dir)
    other = write_config(tmp_path / "eps8.toml", {**DP, "privacy": {**DP["privacy"], "epsilon": 8.0}})
    assert run(other, run_dir) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "new or empty --out, and --resume continues" in err
    assert snapshot(run_dir) == before  # no ledger appended to, no results overwritten


@pytest.mark.parametrize("leftover", ["ledgers/local/client-000.jsonl", "results.json", "config.toml",
                                      "checkpoints/local.pt", "notes.txt"])
def test_any_leftover_of_another_run_refuses_a_fresh_run(tmp_path, leftover, capsys):
    config = write_config(tmp_path / "c.toml", TINY)
    run_dir = tmp_path / "run"
    (run_dir / leftover).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / leftover).write_bytes(b"something of another run\n")
    before = snapshot(run_dir)
    assert run(config, run_dir) == 2
    assert "not empty" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_resume_without_a_checkpoint_is_an_error_not_a_restart(plain_run, tmp_path, capsys):
    config, source = plain_run
    run_dir = copy_run(source, tmp_path)
    (run_dir / "checkpoints" / "local.pt").unlink()
    (run_dir / "checkpoints" / "fedavg.pt").unlink()
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    assert "nothing to resume from" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_resume_with_a_gap_in_the_method_checkpoints_is_an_error(plain_run, tmp_path, capsys):
    config, source = plain_run
    run_dir = copy_run(source, tmp_path)
    (run_dir / "checkpoints" / "local.pt").unlink()  # fedavg's (later) checkpoint remains
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    assert "['local'] missing" in capsys.readouterr().err
    assert snapshot(run_dir) == before


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory):
    """A finished DP run of two methods (their ledgers closed), copied by each test."""
    return finished_run(tmp_path_factory, "dp2", {**DP, "methods": ["local", "fedavg"]})


@pytest.mark.parametrize("lost", [["fedavg"], ["local", "fedavg"]])
def test_a_finished_methods_lost_checkpoint_is_refused_not_retrained(dp2_run, tmp_path, capsys,
                                                                     lost):
    """A method whose ledgers end with their close entry finished (its outcome checkpoint is
    written before them): its missing checkpoint was lost, not yet to be written. --resume
    trained it again from its journals and rewrote results.json and anchor.json, so a kept
    anchor copy no longer verified; it is refused, nothing written."""
    config, source = dp2_run
    run_dir = copy_run(source, tmp_path)
    for method in lost:
        (run_dir / "checkpoints" / f"{method}.pt").unlink()
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert f"checkpoint of {lost[0]!r}" in err and "closed" in err and err.count("\n") == 1
    assert snapshot(run_dir) == before


def test_a_finished_plain_methods_lost_checkpoint_is_retrained_with_a_warning(plain_run, tmp_path,
                                                                             caplog):
    """Without privacy nothing signed depends on a finished method's outcome (no ledger, no
    anchor: not with envelopes either), so --resume trains it again from the run's seed, as
    before, but no longer quietly: a warning names the lost checkpoint, says results.json
    recorded the method as finished and that it is retrained from scratch."""
    config, source = plain_run
    run_dir = copy_run(source, tmp_path)
    (run_dir / "checkpoints" / "fedavg.pt").unlink()
    before = json.loads((run_dir / "results.json").read_text())
    with caplog.at_level("WARNING", logger="secure_fedora.runtimes.inprocess"):
        assert run(config, run_dir, "--resume") == 0
    lost = [r.getMessage() for r in caplog.records if "is missing although" in r.getMessage()]
    assert len(lost) == 1 and "fedavg.pt" in lost[0] and "'fedavg' is trained again from " \
        "scratch" in lost[0] and "results.json records 'fedavg' as finished" in lost[0]
    after = json.loads((run_dir / "results.json").read_text())
    assert after["methods"]["fedavg"]["selected"] == before["methods"]["fedavg"]["selected"]
    assert (run_dir / "checkpoints" / "fedavg.pt").is_file()
    caplog.clear()
    with caplog.at_level("WARNING", logger="secure_fedora.runtimes.inprocess"):
        assert run(config, run_dir, "--resume") == 0  # nothing lost now: no warning
    assert "is missing although" not in caplog.text


def test_resume_checks_every_checkpoint_before_writing(plain_run, tmp_path, capsys):
    config, source = plain_run
    run_dir = copy_run(source, tmp_path)
    ckpt = run_dir / "checkpoints" / "fedavg.pt"
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "digest" in err
    assert snapshot(run_dir) == before


def test_resume_needs_the_directory_and_its_config(plain_run, tmp_path, capsys):
    config, source = plain_run
    assert main(["run", str(config), "--resume", "--quiet"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert run(config, tmp_path / "absent", "--resume") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()
    run_dir = copy_run(source, tmp_path)
    (run_dir / "config.toml").unlink()
    assert run(config, run_dir, "--resume") == 2
    assert "config.toml is missing" in capsys.readouterr().err


def test_resume_of_the_same_config_leaves_its_config_copy_alone(plain_run, tmp_path):
    config, source = plain_run
    run_dir = copy_run(source, tmp_path)
    reformatted = tmp_path / "same.toml"
    reformatted.write_text("# same settings, other layout\n" + config.read_text())
    stored = (run_dir / "config.toml").read_bytes()
    assert run(reformatted, run_dir, "--resume") == 0
    assert (run_dir / "config.toml").read_bytes() == stored


def test_names_cannot_escape_the_runs_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for name in ("../../..", "..", "a/../../b", "/etc"):
        config = write_config(tmp_path / "escape.toml", {**TINY, "name": name})
        assert main(["run", str(config), "--quiet"]) == 2
        assert "name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.toml", "work"]
    assert list((tmp_path / "work").iterdir()) == []
    config = write_config(tmp_path / "ok.toml", {**TINY, "name": "ok.run-1", "methods": ["local"]})
    assert main(["run", str(config), "--quiet"]) == 0
    [made] = (tmp_path / "work" / "runs").iterdir()
    assert made.name.startswith("ok.run-1-") and (made / "results.json").exists()


def test_sweep_refuses_a_directory_that_holds_something_else(plain_run, tmp_path, capsys):
    config, source = plain_run
    run_dir = copy_run(source, tmp_path)
    before = snapshot(run_dir)
    assert main(["sweep", str(config), "--out", str(run_dir), "--methods", "local", "--quiet"]) == 2
    assert "not a sweep directory" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_resume_of_a_dp_run_killed_before_its_first_checkpoint_continues_it(tmp_path, capsys):
    """No checkpoint yet, but the ledgers and journals record round 1's releases: --resume
    continues the run from the start (each release accounted once); with the ledgers and
    journals gone too there is nothing to resume from."""
    from privacy.ledger import read_ledger
    from tests.secure_fedora.core.crash_support import crashes_at
    config = write_config(tmp_path / "dp.toml", DP)
    run_dir = tmp_path / "run"
    with crashes_at("train@2"):  # round 1, after the first client trained
        run(config, run_dir)
    assert not list(run_dir.glob("checkpoints/*.pt"))
    assert list(run_dir.glob("ledgers/local/*.journal"))
    empty = copy_run(run_dir, tmp_path / "bare")
    shutil.rmtree(empty / "ledgers")
    before = snapshot(empty)
    assert run(config, empty, "--resume") == 2
    assert "nothing to resume from" in capsys.readouterr().err
    assert snapshot(empty) == before
    assert run(config, run_dir, "--resume") == 0
    for path in sorted(run_dir.glob("ledgers/local/*.jsonl")):
        assert [(e["round"], e["mechanism"]) for e in read_ledger(path)] == [
            (1, "dpsgd"), (2, "dpsgd"), (2, "close")]


def _killed_before_the_first_release(tmp_path):
    """A DP CLI run killed right after publishing its keys (its ledgers created, empty):
    returns its config file and run directory."""
    from tests.secure_fedora.core.crash_support import crashes_at

    config = write_config(tmp_path / "dp.toml", DP)
    run_dir = tmp_path / "run"
    with crashes_at("keys_published"):
        run(config, run_dir)
    return config, run_dir


def test_a_dp_run_killed_before_its_first_release_resumes(tmp_path, capsys):
    """Killed after its ledgers were opened and its public keys published, before any release:
    --resume said there was nothing to resume and a new run that the directory was not empty.
    Nothing was released (a ledger entry precedes every release), so --resume now starts it
    again under the keys it published; killed before the keys were published, likewise."""
    from privacy.ledger import read_ledger

    config, run_dir = _killed_before_the_first_release(tmp_path)
    published = (run_dir / "keys" / "allowlist.json").read_bytes()
    ledgers = sorted(run_dir.glob("ledgers/local/*.jsonl"))
    assert len(ledgers) == 3 and all(p.stat().st_size == 0 for p in ledgers)
    unpublished = copy_run(run_dir, tmp_path / "unpublished")
    shutil.rmtree(unpublished / "keys")  # as if killed between the ledgers and the keys
    assert run(config, run_dir, "--resume") == 0
    assert (run_dir / "keys" / "allowlist.json").read_bytes() == published
    for path in ledgers:
        assert [(e["round"], e["mechanism"]) for e in read_ledger(path)] == [
            (1, "dpsgd"), (2, "dpsgd"), (2, "close")]
    assert audit_main(["audit", "verify", str(run_dir)]) == 0
    assert run(config, unpublished, "--resume") == 0
    assert (unpublished / "keys" / "allowlist.json").read_bytes() == published
    capsys.readouterr()


@pytest.mark.parametrize("point", ["ledger_staged@2", "ledgers_created"])
def test_a_dp_run_killed_while_creating_its_ledgers_resumes_by_cli_and_api(tmp_path, capsys,
                                                                          point):
    """Killed inside the creation of its first method's ledgers (one client's created, the
    others not): refused both ways. Now --resume and the Python API's resume start it again
    (nothing was released), the interrupted creation's hidden folder is removed and the run
    verifies; so does an API run killed after its config copy, before its ledgers."""
    from privacy.ledger import read_ledger
    from tests.secure_fedora.core.crash_support import crashes_at

    config = write_config(tmp_path / "dp.toml", DP)
    run_dir = tmp_path / "run"
    with crashes_at(point):
        run(config, run_dir)
    api_dir = copy_run(run_dir, tmp_path / "api")
    bare = copy_run(run_dir, tmp_path / "bare")
    shutil.rmtree(bare / "ledgers")  # as if killed between the config copy and the ledgers
    assert run(config, run_dir, "--resume") == 0
    assert sorted(p.name for p in (run_dir / "ledgers").iterdir()) == ["local"]
    for path in sorted(run_dir.glob("ledgers/local/*.jsonl")):
        assert [(e["round"], e["mechanism"]) for e in read_ledger(path)] == [
            (1, "dpsgd"), (2, "dpsgd"), (2, "close")]
    assert audit_main(["audit", "verify", str(run_dir)]) == 0
    for folder in (api_dir, bare):
        Experiment(DP, run_dir=folder).run(resume=True)
        assert sorted(p.name for p in (folder / "ledgers").iterdir()) == ["local"]
        assert audit_main(["audit", "verify", str(folder)]) == 0
    capsys.readouterr()


def test_a_run_with_envelopes_killed_before_its_first_checkpoint_resumes(tmp_path, capsys):
    """Without privacy, a run with envelopes killed in round 1 held its config copy, keys and
    message state: --resume said there was nothing to resume and a new run that the directory
    was not empty. --resume now starts it again and ends as an uninterrupted run."""
    from tests.secure_fedora.core.crash_support import crashes_at
    doc = {**TINY, "methods": ["fedavg"], "security": {"envelopes": True},
           "training": {**TINY["training"], "checkpoint_every": 2}}
    config = write_config(tmp_path / "env.toml", doc)
    assert run(config, tmp_path / "ref") == 0
    run_dir = tmp_path / "run"
    with crashes_at("train@2"):
        run(config, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "keys", "transport"]
    assert run(config, run_dir, "--resume") == 0
    capsys.readouterr()
    assert (run_dir / "rounds.csv").read_text() == (tmp_path / "ref" / "rounds.csv").read_text()
    done, ref = (json.loads((d / "results.json").read_text())["methods"]["fedavg"]
                 for d in (run_dir, tmp_path / "ref"))
    assert done["selected"] == ref["selected"] and done["final"] == ref["final"]


def test_an_api_run_with_envelopes_killed_before_its_first_checkpoint_resumes(tmp_path):
    """The Python API's run without privacy wrote no config copy, so one with envelopes killed
    in round 1 held only its keys and message state: resume=True said there was nothing to
    resume from and a new run that run_dir was not empty. Its config copy is now written
    before its envelope keys: the resume starts it again and ends as an uninterrupted run."""
    from tests.secure_fedora.core.crash_support import crashes_at

    doc = {**TINY, "methods": ["fedavg"], "security": {"envelopes": True},
           "training": {**TINY["training"], "checkpoint_every": 2}}
    reference = Experiment(doc, run_dir=tmp_path / "ref").run()
    run_dir = tmp_path / "run"
    with crashes_at("train@2"):
        Experiment(doc, run_dir=run_dir).run()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "keys", "transport"]
    resumed = Experiment(doc, run_dir=run_dir).run(resume=True)
    assert (run_dir / "rounds.csv").read_text() == (tmp_path / "ref" / "rounds.csv").read_text()
    done, ref = (r["methods"]["fedavg"] for r in (resumed, reference))
    assert done["selected"] == ref["selected"] and done["final"] == ref["final"]


def test_a_dp_run_whose_empty_ledgers_are_lost_is_not_resumed(tmp_path, capsys):
    """Published keys without the ledgers prove nothing (they may have been deleted after
    releases): still nothing to resume from, and nothing is written."""
    config, run_dir = _killed_before_the_first_release(tmp_path)
    (run_dir / "ledgers" / "local" / "client-001.jsonl").unlink()
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    assert "nothing to resume from" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_a_start_killed_after_its_config_copy_can_start_again(tmp_path, capsys):
    """Killed right after its config copy was written: --resume said there was nothing to
    resume and a new run said the directory was not empty, each pointing at the other. A new
    run of the same configuration now starts there; another configuration is still refused."""
    config = write_config(tmp_path / "dp.toml", DP)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_bytes(config.read_bytes())
    other = write_config(tmp_path / "other.toml", {**DP, "seed": 7})
    assert run(other, run_dir) == 2
    assert "not empty" in capsys.readouterr().err
    assert run(config, run_dir) == 0
    assert (run_dir / "results.json").is_file()


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """A finished run of the Python API (which writes no config copy): FEDORA, 2 rounds."""
    root = tmp_path_factory.mktemp("api")
    doc = {**TINY, "methods": ["fedora"]}
    Experiment(doc, run_dir=root / "run").run()
    assert not (root / "run" / "config.toml").exists()
    return doc, root / "run"


@pytest.mark.parametrize(("methods", "message"), [
    (["local"], "no checkpoint of 'local'"),                   # none of its methods ran here
    (["local", "fedora"], r"checkpoint\(s\) of \['local'\] missing"),  # a gap before fedora
])
def test_api_resume_of_another_runs_directory_writes_nothing(api_run, tmp_path, methods, message):
    doc, source = api_run
    run_dir = copy_run(source, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(RunDirError, match=message) as err:
        Experiment({**doc, "seed": 7, "methods": methods}, run_dir=run_dir).run(resume=True)
    assert snapshot(run_dir) == before
    # the Python API's error names its own argument, not the CLI's --resume
    assert str(err.value).startswith("run(resume=True): ") and "--" not in str(err.value)


def test_api_resume_of_a_missing_directory_names_the_api_argument(tmp_path):
    with pytest.raises(RunDirError, match=r"^run\(resume=True\) needs an existing run directory"):
        Experiment({**TINY, "methods": ["local"]}, run_dir=tmp_path / "absent").run(resume=True)
    assert not (tmp_path / "absent").exists()


def test_api_resume_with_another_config_of_the_same_methods_writes_nothing(api_run, tmp_path):
    doc, source = api_run
    run_dir = copy_run(source, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="another configuration") as err:
        Experiment({**doc, "seed": 7}, run_dir=run_dir).run(resume=True)
    assert snapshot(run_dir) == before
    # without a config copy the key that changed cannot be named: the error says what to do
    assert str(err.value).endswith("refuse to resume (run(resume=True) needs the configuration "
                                   "the run was started with: resume with that one, or start a "
                                   "new run in a new directory)")


def test_api_resume_of_its_own_finished_run_changes_no_result(api_run, tmp_path):
    doc, source = api_run
    run_dir = copy_run(source, tmp_path)
    before = json.loads((run_dir / "results.json").read_text())["methods"]
    after = Experiment(doc, run_dir=run_dir).run(resume=True)
    assert after["methods"]["fedora"]["final"] == before["fedora"]["final"]


def test_a_checkpoint_whose_ledgers_are_not_held_is_refused_before_anything_runs(tmp_path, capsys):
    """A second method's checkpoint recording ledger entries its ledger no longer holds (cut,
    or the checkpoint copied from another run of the same config) was found only when that
    method started, after the first had been resumed (its files rewritten)."""
    config = write_config(tmp_path / "dp2.toml", {**DP, "methods": ["local", "fedavg"]})
    run_dir = tmp_path / "run"
    assert run(config, run_dir) == 0
    ledger = run_dir / "ledgers" / "fedavg" / "client-001.jsonl"
    ledger.write_text(ledger.read_text().splitlines(keepends=True)[0])  # cut to one entry
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "fedavg.pt records 2 ledger entries of client client-001" in err
    assert "client-001.jsonl does not hold" in err and "nothing was written" in err
    assert snapshot(run_dir) == before


def test_api_resume_of_a_dp_run_killed_before_its_first_checkpoint_checks_the_config(tmp_path):
    """A Python API run keeps no config copy and had no checkpoint yet: a resume with another
    configuration (here another learning rate) replayed the journaled releases and went on
    training under it, silently. A private run now writes its config.toml before its first
    ledger entry, so the resume is matched to its configuration."""
    from tests.secure_fedora.core.crash_support import crashes_at
    run_dir = tmp_path / "run"
    with crashes_at("train@2"):  # round 1, after the first client trained
        Experiment(DP, run_dir=run_dir).run()
    assert not list(run_dir.glob("checkpoints/*.pt"))
    before = snapshot(run_dir)
    other = {**DP, "training": {**DP["training"], "lr": 0.5}}
    with pytest.raises(RunDirError, match="another configuration"):
        Experiment(other, run_dir=run_dir).run(resume=True)
    assert snapshot(run_dir) == before
    Experiment(DP, run_dir=run_dir).run(resume=True)
    assert audit_main(["audit", "verify", str(run_dir)]) == 0


def test_resume_in_an_empty_directory_says_a_plain_run_may_start_there(tmp_path, capsys):
    """An API or CLI run killed before it wrote anything leaves an empty run directory: resume
    refuses it, and its advice is that a run without resume may start there."""
    config = write_config(tmp_path / "c.toml", TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run(config, run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert "it is empty: start the run again without --resume, here" in err
    assert run(config, run_dir) == 0  # the advice holds: a plain run starts there


def test_api_resume_of_an_empty_run_dir_says_a_plain_run_may_start_there(tmp_path):
    """The Python API's non-private runs hold no config copy: their refusal gives the same advice."""
    from secure_fedora.core.config import load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(write_config(tmp_path / "c.toml", TINY))
    with pytest.raises(RunDirError, match=re.escape("it is empty: start the run again without run(resume=True)")):
        Experiment(cfg, run_dir=run_dir).run(resume=True)


@pytest.mark.parametrize("blocked", ["rounds.csv", "plots", "checkpoints", "plots/relatedness.png"])
def test_resume_refuses_an_output_of_the_wrong_kind_before_training(tmp_path, capsys, blocked):
    """A killed DP run whose rounds.csv had become a directory (or plots a file) was resumed:
    its rounds were trained, released and accounted again, then the run stopped with
    "Is a directory" / "File exists" writing that output. Resume now refuses it first, with
    nothing written (found by the hunt of run-dir edits)."""
    from tests.secure_fedora.core.crash_support import crashes_at
    config = write_config(tmp_path / "dp.toml", DP)
    run_dir = tmp_path / "run"
    with crashes_at("checkpoint_written"):  # after round 1 of 2
        run(config, run_dir)
    if blocked in ("plots", "checkpoints"):
        # checkpoints/ a file: it was found only when the round trained again was saved
        shutil.rmtree(run_dir / blocked, ignore_errors=True)
        (run_dir / blocked).write_text("not a folder")
    else:
        # a plot a directory: the run was trained to its end, then stopped with "Is a
        # directory" naming a temporary file (found by generated corruptions)
        (run_dir / blocked).mkdir(parents=True)
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    kind = "a directory" if blocked in ("plots", "checkpoints") else "a regular file"
    assert f"{blocked} is not {kind}" in capsys.readouterr().err
    assert snapshot(run_dir) == before


# A CLI run of ``argv[1]`` into ``argv[2]`` that stops at the first hit of crash point
# ``argv[4]``: it creates ``argv[3]`` there and waits until that file is removed (or 60 s
# pass), then finishes.
PAUSED_RUN = """
import os, signal, sys, time
# Ctrl-C raises KeyboardInterrupt even where this process was started with SIGINT ignored
# (a background job of a non-interactive shell), as it does in a terminal
signal.signal(signal.SIGINT, signal.default_int_handler)
import secure_fedora.runtimes.inprocess as inprocess
from secure_fedora.cli import main
def pause(name):
    if name == sys.argv[4] and not os.environ.get("PAUSED"):
        os.environ["PAUSED"] = "1"
        open(sys.argv[3], "w").close()
        deadline = time.monotonic() + 60
        while os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
            time.sleep(0.02)
inprocess.crash_point = pause
sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2], "--quiet"]))
"""


def test_second_run_or_resume_of_a_busy_run_directory_is_refused(tmp_path, capsys):
    import subprocess
    import sys
    import time

    config = write_config(tmp_path / "plain.toml", TINY)
    out, marker = tmp_path / "run", tmp_path / "paused"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(config), str(out), str(marker),
                              "checkpoint"],
                             cwd=Path(__file__).resolve().parents[3], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the first run holds only config.toml of this very config: before, a second start
        # passed every check and trained beside it (a failure or Ctrl-C of the second then
        # withdrew the config.toml the first had written)
        held = snapshot(out)
        for extra in ((), ("--resume",)):
            capsys.readouterr()
            assert run(config, out, *extra) == 2
            assert "is in use by another process" in capsys.readouterr().err
        with pytest.raises(RunDirError, match=r"in use by another process"):
            Experiment(config, run_dir=out).run()
        assert snapshot(out) == held
    finally:
        marker.unlink(missing_ok=True)
        assert first.wait(120) == 0, first.stderr.read()
    assert (out / "results.json").is_file() and (out / "config.toml").is_file()
    # once the first has finished the directory is free again (for a resume)
    assert run(config, out, "--resume") == 0


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_interrupted_run_says_so_and_resumes_exactly(tmp_path, plain_run, signum):
    import signal
    import subprocess
    import sys
    import time

    config, reference = plain_run
    out, marker = tmp_path / "run", tmp_path / "paused"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(config), str(out), str(marker),
                              "checkpoint_written"],
                             cwd=Path(__file__).resolve().parents[3], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # a loaded machine starts the child slowly
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run did not reach round 1's checkpoint"
    first.send_signal(getattr(signal, signum))  # after round 1's checkpoint
    err = first.stderr.read()
    # before: Ctrl-C ended in KeyboardInterrupt's traceback, SIGTERM killed it without a word
    assert first.wait(60) == 130, err
    assert "Traceback" not in err
    assert f"interrupted; the run in {out} stopped and can be continued" in err
    assert f"--out {out} --resume" in err
    assert run(config, out, "--resume") == 0
    assert (out / "rounds.csv").read_text() == (reference / "rounds.csv").read_text()


PAUSED_PLOTS = """
import os, sys, time
import secure_fedora.runtimes.plots as plots
from secure_fedora.cli import main
def pause(*args, **kwargs):
    open(sys.argv[3], "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the signal arrives here
        time.sleep(0.02)
plots.write_plots = pause
sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2], "--quiet"]))
"""


def test_sigterm_while_the_plots_are_drawn_exits_as_interrupted_naming_the_finished_run(
        tmp_path):
    """SIGTERM's handler was restored when training ended, so a SIGTERM while the plots were
    drawn killed the process (exit 143, no word) although results.json, the ledgers and the
    anchor were complete. The handler now holds to the command's end: exit 130 with a message
    that the run finished and its plots were skipped; the run verifies, and --resume draws
    the plots."""
    import signal
    import subprocess
    import sys
    import time

    config = write_config(tmp_path / "dp.toml", {**DP, "name": "sigterm-at-plots"})
    out, marker = tmp_path / "run", tmp_path / "plotting"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_PLOTS, str(config), str(out),
                              str(marker)],
                             cwd=Path(__file__).resolve().parents[3], stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 600  # a loaded machine starts the child slowly
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run did not reach its plots"
    first.send_signal(signal.SIGTERM)
    err = first.stderr.read()
    assert first.wait(60) == 130, err  # before: -15 (killed by the signal, 143 in a shell)
    assert "Traceback" not in err
    assert (f"interrupted while drawing the plots; the run in {out} finished" in err
            and "its plots were skipped" in err and f"--out {out} --resume" in err), err
    assert not (out / "plots").exists()
    assert audit_main(["audit", "verify", str(out)]) == 0  # ledgers and anchor complete
    results = (out / "results.json").read_bytes()
    assert run(config, out, "--resume") == 0
    assert (out / "results.json").read_bytes() == results
    assert sorted(p.suffix for p in (out / "plots").iterdir()) == [".png", ".png"]


def test_disk_full_mid_run_names_the_resume_and_the_resume_is_exact(tmp_path, plain_run,
                                                                    monkeypatch, capsys):
    import errno
    import os

    config, reference = plain_run
    out = tmp_path / "run"
    fsync, calls = os.fsync, []

    def full(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 6:  # past config.toml and the first checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert run(config, out) == 2
    err = capsys.readouterr().err
    # before: only "error: No space left on device"
    assert err.startswith("error: No space left on device; the run in ")
    assert f"--out {out} --resume" in err
    monkeypatch.setattr(os, "fsync", fsync)
    assert run(config, out, "--resume") == 0
    assert (out / "rounds.csv").read_text() == (reference / "rounds.csv").read_text()


def test_run_directory_without_lock_support_still_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    config = write_config(tmp_path / "plain.toml", TINY)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        assert run(config, tmp_path / "run") == 0
    assert "cannot lock run directory" in caplog.text



def unreadable(monkeypatch, directory: Path) -> None:
    """Make ``directory`` writable but not readable (mode 0300); running as root, where the
    mode does not stop a read, opening it for reading fails with EACCES as it would."""
    import errno
    import os

    directory.chmod(0o300)
    if not os.access(directory, os.R_OK):
        return
    os_open, target = os.open, os.path.realpath(directory)

    def refusing_open(path, flags, *args, **kwargs):
        if os.path.realpath(os.fsdecode(path)) == target and not flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


def test_a_write_only_run_directory_is_one_line_and_loses_nothing(tmp_path, plain_run, capsys):
    config, reference = plain_run
    fresh, resumed = tmp_path / "fresh", copy_run(reference, tmp_path)
    fresh.mkdir()
    held = snapshot(resumed)
    for out, extra in ((fresh, ()), (resumed, ("--resume",))):
        with pytest.MonkeyPatch.context() as monkeypatch:
            unreadable(monkeypatch, out)
            capsys.readouterr()
            # before: "error: Permission denied: RUN" (and a bare PermissionError by the API)
            assert run(config, out, *extra) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"error: cannot open run directory {out} (Permission denied): a run "
                           f"needs a directory it can read as well as write (e.g. chmod u+rwx "
                           f"{out}), or choose another; nothing was written")
            with pytest.raises(RunDirError, match=r"cannot open run directory .*Permission denied"):
                Experiment(config, run_dir=out).run(resume=bool(extra))
        out.chmod(0o700)
    assert list(fresh.iterdir()) == []
    assert snapshot(resumed) == held


# bit-identical comparisons need noise a resume draws again
DP_REPRODUCIBLE = {**DP, "privacy": {**DP["privacy"], "noise": "reproducible"}}


@pytest.fixture(scope="module")
def dp_reproducible_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "dp-reproducible", DP_REPRODUCIBLE)


@pytest.mark.parametrize("failing, nth", [("write", 2), ("fsync", 4)])
def test_a_ledger_write_failing_mid_run_names_the_resume_and_the_resume_is_exact(
        tmp_path, dp_reproducible_run, monkeypatch, capsys, failing, nth):
    import errno
    import os

    import privacy.ledger

    config, reference = dp_reproducible_run
    out = tmp_path / "run"
    write, fsync, write_and_sync = os.write, os.fsync, privacy.ledger.write_all_and_fsync
    inside, calls = [], []

    def in_ledger(fd: int, data: bytes) -> None:
        inside.append(fd)
        try:
            write_and_sync(fd, data)
        finally:
            inside.pop()

    def failing_write(fd: int, data) -> int:
        if fd in inside and failing == "write":  # the ledger's, not a journal's fsync thread
            calls.append(fd)
            if len(calls) == nth:  # a torn line: half of it reached the file
                write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return write(fd, data)

    def failing_fsync(fd: int) -> None:
        if fd in inside and failing == "fsync":
            calls.append(fd)
            if len(calls) == nth:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    monkeypatch.setattr(privacy.ledger, "write_all_and_fsync", in_ledger)
    monkeypatch.setattr(os, "write", failing_write)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    capsys.readouterr()
    assert run(config, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the privacy plan
    # before: "error: writing ledger '...' failed: [Errno 5] Input/output error" and no more
    assert err.startswith("error: writing ledger ") and "[Errno 5] Input/output error" in err
    assert err.endswith(f"the run in {out} stopped and can be continued once that is fixed: "
                        f"secure-fedora run {config} --out {out} --resume")
    assert err.count("--resume") == 1
    monkeypatch.undo()
    assert run(config, out, "--resume") == 0
    assert (out / "rounds.csv").read_text() == (reference / "rounds.csv").read_text()
    assert audit_main(["audit", "verify", str(out)]) == 0


def refused_at_the_third_checkpoint(tmp_path: Path, monkeypatch, capsys, refuse) -> str:
    """Run TINY by the CLI with ``refuse(path)`` (which raises) called instead of its third
    checkpoint write; the exit code must be 2: returns what it printed on stderr."""
    from secure_fedora.runtimes import inprocess

    config = write_config(tmp_path / "plain.toml", TINY)
    save, calls = inprocess.save_checkpoint, []

    def refusing(path: Path, state: dict) -> None:
        calls.append(path)
        if len(calls) == 3:
            refuse(path)
        save(path, state)

    monkeypatch.setattr(inprocess, "save_checkpoint", refusing)
    capsys.readouterr()
    assert run(config, tmp_path / "run") == 2
    return capsys.readouterr().err.strip()


def test_a_refusal_mid_run_that_a_resume_would_repeat_names_no_resume(tmp_path, monkeypatch,
                                                                     capsys):
    """A budget found spent mid-run is not an I/O failure: the error is left as it is."""
    from privacy.accounting import BudgetExceededError, PrivacyBudget

    def refuse(path: Path) -> None:
        raise BudgetExceededError(client_id="client-000", round=1, mechanism="dpsgd",
                                  epsilon_would_be=3.5, budget=PrivacyBudget(3.0, 1e-3))

    err = refused_at_the_third_checkpoint(tmp_path, monkeypatch, capsys, refuse)
    assert err.startswith("error: client 'client-000' round 1: release 'dpsgd' refused")
    assert "resume" not in err and "\n" not in err


@pytest.mark.parametrize("raised_from, hint", [("none", False), ("err", True), ("context", True)])
def test_a_refusal_raised_from_none_while_handling_an_os_error_names_no_resume(
        tmp_path, monkeypatch, capsys, raised_from, hint):
    """A toolkit error raised ``from None`` while handling an OSError (a file found with other
    content: a refusal a resume would repeat) got the resume hint, as if the run had stopped
    for its environment; one raised from the OSError, or while handling it, still does."""
    from privacy.ledger import LedgerError

    def refuse(path: Path) -> None:
        try:
            raise FileExistsError(17, "File exists", str(path))
        except FileExistsError as err:
            refusal = LedgerError(f"quarantine file {str(path)!r} exists with other content")
            if raised_from == "none":
                raise refusal from None
            if raised_from == "err":
                raise refusal from err
            raise refusal  # noqa: B904 - the implicit context is what is tested

    err = refused_at_the_third_checkpoint(tmp_path, monkeypatch, capsys, refuse)
    assert err.startswith("error: quarantine file ") and "\n" not in err
    assert ("--resume" in err) is hint


def read_only(monkeypatch, root: Path) -> None:
    """Every write, create, rename or removal under ``root`` fails with EROFS, as on a file
    system mounted read-only (running as root, a chmod would not stop the writes)."""
    import builtins
    import errno
    import io
    import os

    top = os.path.realpath(root)

    def under(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        real = os.path.realpath(os.fsdecode(path))
        return real == top or real.startswith(top + os.sep)

    def refuse(path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    os_open, io_open, path_open = os.open, io.open, Path.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & writing and under(path):
            refuse(path)
        return os_open(path, flags, *args, **kwargs)

    def guarded_io_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return io_open(file, mode, *args, **kwargs)

    def guarded_path_open(self, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(self):
            refuse(self)
        return path_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(io, "open", guarded_io_open)
    monkeypatch.setattr(builtins, "open", guarded_io_open)
    monkeypatch.setattr(Path, "open", guarded_path_open)
    def guard(call):
        def guarded(path, *args, **kwargs):
            if under(path) or (args and under(args[0])):
                refuse(path)
            return call(path, *args, **kwargs)
        return guarded

    for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "truncate", "chmod"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def test_a_fresh_run_into_a_read_only_directory_is_one_line_naming_it(tmp_path, capsys):
    config = write_config(tmp_path / "plain.toml", TINY)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        read_only(monkeypatch, out)
        assert run(config, out) == 2
    err = capsys.readouterr().err.strip()
    # before: "error: Read-only file system: RUN/.config.toml.<random>" (a temporary name)
    assert err == (f"error: cannot write config.toml in run directory {out}: Read-only file "
                   "system; nothing of the run was written")
    assert list(out.iterdir()) == []
    assert run(config, out) == 0  # writable again: the run starts there


def test_a_resume_in_a_read_only_directory_is_one_line_and_loses_nothing(
        tmp_path, dp_reproducible_run, monkeypatch, capsys):
    from secure_fedora.runtimes import inprocess

    config, reference = dp_reproducible_run
    out = tmp_path / "run"
    save, calls = inprocess.save_checkpoint, []

    def stop(path: Path, state: dict) -> None:
        calls.append(path)
        if len(calls) == 2:  # after the first checkpoint
            raise KeyboardInterrupt
        save(path, state)

    monkeypatch.setattr(inprocess, "save_checkpoint", stop)
    assert run(config, out) == 130
    monkeypatch.undo()
    before = snapshot(out)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as read_only_mount:
        read_only(read_only_mount, out)
        assert run(config, out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: Read-only file system: ")
    assert err.endswith(f"secure-fedora run {config} --out {out} --resume")
    assert snapshot(out) == before
    assert run(config, out, "--resume") == 0
    assert (out / "rounds.csv").read_text() == (reference / "rounds.csv").read_text()
    assert audit_main(["audit", "verify", str(out)]) == 0


def test_ctrl_c_during_a_ledger_write_is_an_interruption(tmp_path, dp_reproducible_run,
                                                         monkeypatch, capsys):
    import privacy.ledger

    config, reference = dp_reproducible_run
    out = tmp_path / "run"
    write_and_sync, calls = privacy.ledger.write_all_and_fsync, []

    def interrupted(fd: int, data: bytes) -> None:
        calls.append(fd)
        if len(calls) == 4:
            raise KeyboardInterrupt
        write_and_sync(fd, data)

    monkeypatch.setattr(privacy.ledger, "write_all_and_fsync", interrupted)
    capsys.readouterr()
    # before: exit 2, "error: writing ledger '...' failed: " (the interrupt as a ledger error)
    assert run(config, out) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"interrupted; the run in {out} stopped and can be continued: "
                   f"secure-fedora run {config} --out {out} --resume")
    monkeypatch.undo()
    assert run(config, out, "--resume") == 0
    assert (out / "rounds.csv").read_text() == (reference / "rounds.csv").read_text()
    assert audit_main(["audit", "verify", str(out)]) == 0


def test_an_out_that_is_a_symbolic_link_loop_is_named_so_not_missing(tmp_path, capsys):
    """`run CONFIG --out LOOP --resume` said LOOP "does not exist" and a fresh run into
    LOOP/sub ended in the bare OSError text; both now say it is a symbolic link loop."""
    config = write_config(tmp_path / "c.toml", TINY)
    (tmp_path / "loop").symlink_to("loop")
    before = snapshot(tmp_path)
    for out, extra in ((tmp_path / "loop", ("--resume",)), (tmp_path / "loop" / "run", ("--resume",)),
                       (tmp_path / "loop" / "run", ()), (tmp_path / "loop", ())):
        assert run(config, out, *extra) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{out} is a symbolic link loop" in err and "does not exist" not in err, err
    assert snapshot(tmp_path) == before


_NONCES = '{"floor":1}\n{"n":"00ff","r":1,"s":"server"}\n'


def test_a_nonce_file_in_a_dp_ledger_folder_is_no_ledger_on_resume(tmp_path, capsys):
    """A Flower node's ``<client>.nonces.jsonl`` (replay-protection memory) copied into a DP
    run's ``ledgers/<method>/``, with no ledger beside it, was taken for a ledger holding
    releases: the resume went on, to be refused as if the ledgers' model record had been
    lost. It is not a ledger (as `audit verify` reads it): the resume is refused saying what
    the file is, and nothing is written or removed."""
    run_dir = tmp_path / "run"
    (run_dir / "ledgers" / "local").mkdir(parents=True)
    config = write_config(run_dir / "config.toml", DP)
    (run_dir / "ledgers" / "local" / "client-000.nonces.jsonl").write_text(_NONCES)
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "client-000.nonces.jsonl but no ledger" in err
    assert "is not a ledger and records no release" in err
    assert snapshot(run_dir) == before


def test_a_nonce_file_at_the_top_of_ledgers_is_named_when_nothing_can_be_resumed(tmp_path,
                                                                                    capsys):
    """With nothing to resume from, a ``*.nonces.jsonl`` among the ledgers is named as what
    it is (a replay-protection memory, no ledger) instead of passing in silence."""
    run_dir = tmp_path / "run"
    (run_dir / "ledgers").mkdir(parents=True)
    config = write_config(run_dir / "config.toml", DP)
    (run_dir / "ledgers" / "client-000.nonces.jsonl").write_text(_NONCES)
    before = snapshot(run_dir)
    assert run(config, run_dir, "--resume") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing to resume from" in err
    assert ("ledgers/client-000.nonces.jsonl is a nonce state file (a Flower node's"
            " replay-protection memory), not ledgers: they record no release") in err
    assert snapshot(run_dir) == before


def test_a_nonce_file_beside_a_runs_ledgers_does_not_stop_its_resume(plain_run, tmp_path):
    """A nonce state file in a method's ledger folder that holds no ``model.json`` was read as
    that method's ledgers, so the resume was refused as if the record of their model had been
    lost. It is not a ledger: the resume goes on and leaves the file as it was."""
    config, source = plain_run
    run_dir = copy_run(source, tmp_path)
    stray = run_dir / "ledgers" / "fedavg" / "client-000.nonces.jsonl"
    stray.parent.mkdir(parents=True)
    stray.write_text(_NONCES)
    assert run(config, run_dir, "--resume") == 0
    assert stray.read_text() == _NONCES
