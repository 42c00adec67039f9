"""A DP-FEDORA run stopped by a diverged pull resumes with ``fedora.max_pull`` set (the one
key a resume may change): its ledgers stay valid and results.json records the amendment."""

import json

import pytest

from audits.verify import verify_run
from secure_fedora.cli import main
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.rundir import (
    STOPPED,
    RunDirError,
    amended_value,
    amendment_round,
    config_changes,
    record_stop,
)

# 3 clients, 4 validation examples each and epsilon 0.1: the noised lambda's std is about 51
# nats on the loss difference, and with this seed client 1's round-1 pull (lr * lambda about
# 2e6, 16 steps) overflows: the run stops in round 1, before any upload
CONFIG = """
name = "pull-diverges"
seed = 5
methods = ["fedora"]

[data]
num_clients = 3
train_per_client = 32
val_per_client = 4
test_per_client = 16
groups = 3
validation = "private"

[training]
rounds = 3
local_epochs = 4
batch_size = 8
lr = {lr}
checkpoint_every = 1

[fedora]
k = 1
relatedness = "noised"
{max_pull}

[privacy]
enabled = true
epsilon = 0.1
delta = 1e-3
noise = "reproducible"
"""


def write(path, lr=0.05, max_pull=None):
    path.write_text(CONFIG.format(lr=lr, max_pull="" if max_pull is None
                                  else f"max_pull = {max_pull}"))
    return str(path)


def test_a_diverged_pull_is_resumed_with_max_pull_and_nothing_else(tmp_path, capsys, caplog):
    run, keys = tmp_path / "run", str(tmp_path / "keystore")
    diverges = write(tmp_path / "diverges.toml")
    assert main(["run", diverges, "--out", str(run), "--keystore", keys, "--quiet"]) == 2
    err = capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "expected to push a client" in r.getMessage()]
    assert len(warned) == 1 and "set fedora.max_pull = 1" in warned[0]  # the plan's warning
    assert "FEDORA's pull diverged" in err
    assert f"`secure-fedora run {diverges} --out {run} --resume` continues it" in err
    assert json.loads((run / STOPPED).read_text()) == {"method": "fedora", "round": 1}

    # any other change is still refused, and nothing is written
    other = write(tmp_path / "other.toml", lr=0.04, max_pull=1)
    assert main(["run", other, "--out", str(run), "--keystore", keys, "--resume"]) == 2
    assert "the only keys a resume may change" in capsys.readouterr().err
    assert not (run / "amendments.json").exists()

    fixed = write(tmp_path / "fixed.toml", max_pull=1)
    # a damaged stop record was read as absent (the amendment then applied a round later,
    # silently): the resume is refused, naming the file, before anything is written
    stopped = (run / STOPPED).read_bytes()
    (run / STOPPED).write_text('{"method": "fedora", "round": ')
    assert main(["run", fixed, "--out", str(run), "--keystore", keys, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: {run / STOPPED} is not JSON") and \
        "move it away" in err and err.count("\n") == 1
    assert not (run / "amendments.json").exists()
    (run / STOPPED).write_bytes(stopped)
    assert main(["run", fixed, "--out", str(run), "--keystore", keys, "--resume", "--quiet"]) == 0
    amendment = {"key": "fedora.max_pull", "from": None, "to": 1.0, "method": "fedora",
                 "resumed_at_round": 1, "effective_from_round": 1, "applies_to": {"fedora": 1}}
    assert json.loads((run / "amendments.json").read_text()) == [amendment]
    results = json.loads((run / "results.json").read_text())
    assert results["config_amendments"] == [amendment]
    assert "max_pull" not in (run / "config.toml").read_text()  # never rewritten
    assert not (run / STOPPED).exists()
    assert verify_run(run).ok  # the ledgers and the anchor, against config.toml's hash

    # a later resume compares with the amended configuration: the same config is accepted,
    # another change still refused
    assert main(["run", fixed, "--out", str(run), "--keystore", keys, "--resume", "--quiet"]) == 0
    assert json.loads((run / "amendments.json").read_text()) == [amendment]
    assert main(["run", other, "--out", str(run), "--keystore", keys, "--resume"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_config_changes_allow_max_pull_alone():
    base = parse_config({"name": "x", "methods": ["fedora"]})
    pulled = parse_config({"name": "x", "methods": ["fedora"], "fedora": {"max_pull": 1}})
    assert config_changes(base, base) == []
    assert config_changes(base, pulled) == [{"key": "fedora.max_pull", "from": None, "to": 1.0}]
    both = parse_config({"name": "x", "methods": ["fedora"], "fedora": {"max_pull": 1, "k": 3}})
    assert config_changes(base, both) is None


def test_amendment_applies_after_the_rounds_the_stopped_run_released(tmp_path):
    ledgers = tmp_path / "ledgers" / "fedora"
    ledgers.mkdir(parents=True)
    entry = {"mechanism": "dpsgd", "round": 4}
    (ledgers / "client-000.jsonl").write_text(json.dumps(entry) + "\n")
    # round 4 admitted: without a record that it stopped before its uploads, round 4 is
    # re-made under the old value (it may have left)
    assert amendment_round(tmp_path, "fedora", 3, private=True) == 5
    assert amendment_round(tmp_path, "fedora", 3, private=False) == 3
    record_stop(tmp_path, "fedora", 4)
    assert amendment_round(tmp_path, "fedora", 3, private=True) == 4
    record_stop(tmp_path, "fedora", 2)  # an older stop says nothing about round 4
    assert amendment_round(tmp_path, "fedora", 3, private=True) == 5
    amendments = [{"key": "fedora.max_pull", "from": None, "to": 1.0, "method": "fedora",
                   "resumed_at_round": 3, "effective_from_round": 5}]
    values = [amended_value(amendments, "fedora.max_pull", None, "fedora", ["fedora", "ditto"], r)
              for r in (3, 4, 5, 6)]
    assert values == [None, None, 1.0, 1.0]
    assert amended_value(amendments, "fedora.max_pull", None, "ditto", ["fedora", "ditto"], 1) == 1.0


def test_an_unreadable_amendment_record_is_refused(tmp_path):
    from secure_fedora.runtimes.rundir import recorded_amendments

    (tmp_path / "amendments.json").write_text('[{"key": "training.lr", "to": 1}]')
    with pytest.raises(RunDirError, match="not a list of config amendments"):
        recorded_amendments(tmp_path)


@pytest.mark.parametrize("damaged", ['{"method": "fedora", "round": ', "[]", '{"method": 1}',
                                     '{"method": "fedora", "round": true}', "\xff"])
def test_a_damaged_stop_record_is_an_error_not_absent(tmp_path, damaged):
    """amendment_round read a stopped.json it could not parse as no record: the amendment
    applied a round later, silently. Now RunDirError naming the file and what to do."""
    ledgers = tmp_path / "ledgers" / "fedora"
    ledgers.mkdir(parents=True)
    (ledgers / "client-000.jsonl").write_text(json.dumps({"mechanism": "dpsgd", "round": 4}) + "\n")
    (tmp_path / STOPPED).write_bytes(damaged.encode("latin-1"))
    with pytest.raises(RunDirError, match=f"^run\\(resume=True\\): {tmp_path / STOPPED} .*, so "
                                          "the round the run stopped in .* move it away"):
        amendment_round(tmp_path, "fedora", 3, private=True, resume="run(resume=True)")
    assert amendment_round(tmp_path, "fedora", 3, private=False) == 3  # not read without DP


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_finished_run_is_not_amended(tmp_path, capsys):
    """Resuming a finished run with only ``fedora.max_pull`` changed recorded an amendment
    whose round fields were all null: results.json (and under DP the anchor) changed though
    nothing retrained. Refused now, by the CLI and the Python API, before anything is written;
    the unchanged config still resumes it without rewriting a byte."""
    from secure_fedora.api import Experiment
    from secure_fedora.core.config import load_config
    from secure_fedora.runtimes.inprocess import Simulation

    base = tmp_path / "base.toml"
    base.write_text('name = "done"\nmethods = ["fedora"]\n[data]\nnum_clients = 3\n'
                    'train_per_client = 16\nval_per_client = 4\ntest_per_client = 8\n'
                    'groups = 3\n[training]\nrounds = 2\nbatch_size = 8\n')
    pulled = tmp_path / "pulled.toml"
    pulled.write_text(base.read_text().replace('[data]', '[fedora]\nmax_pull = 1\n[data]'))
    run = tmp_path / "run"
    assert main(["run", str(base), "--out", str(run), "--quiet"]) == 0
    before = _snapshot(run)
    assert main(["run", str(pulled), "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has finished" in err and "fedora.max_pull = 1.0" in err and "new --out" in err \
        and err.count("\n") == 1
    with pytest.raises(RunDirError, match="has finished.*new run_dir"):
        Experiment(load_config(pulled), run_dir=run).run(resume=True)
    with pytest.raises(RunDirError, match="has finished.*new run_dir"):
        Simulation(load_config(pulled), run).run(resume=True)
    assert _snapshot(run) == before
    assert main(["run", str(base), "--out", str(run), "--resume", "--quiet"]) == 0
    assert _snapshot(run) == before


TWO_METHODS = ('name = "two"\nmethods = [{methods}]\n[data]\nnum_clients = 3\n'
               'train_per_client = 16\nval_per_client = 4\ntest_per_client = 8\ngroups = 3\n'
               '[training]\nrounds = 2\nbatch_size = 8\ncheckpoint_every = 1\n')


def _stopped_in(tmp_path, methods, stop_in, monkeypatch):
    """Configs (the run's and one with ``fedora.max_pull = 1``) and a run of ``methods``
    stopped (Ctrl-C) in round 2 of ``stop_in``, its round-1 checkpoint written."""
    from secure_fedora.runtimes import inprocess

    base = tmp_path / "base.toml"
    base.write_text(TWO_METHODS.format(methods=", ".join(f'"{m}"' for m in methods)))
    pulled = tmp_path / "pulled.toml"
    pulled.write_text(base.read_text().replace("[data]", "[fedora]\nmax_pull = 1\n[data]"))
    run, save = tmp_path / "run", inprocess.save_checkpoint

    def stop(path, state):
        if path.stem == stop_in and state.get("round") == 2:
            raise KeyboardInterrupt
        save(path, state)

    with monkeypatch.context() as patch:
        patch.setattr(inprocess, "save_checkpoint", stop)
        assert main(["run", str(base), "--out", str(run), "--quiet"]) == 130
    return base, pulled, run


@pytest.mark.parametrize("methods, why", [
    (["fedora", "local"], "applies only to fedora, which has finished"),
    (["local", "fedavg"], "no method of the run"),
])
def test_an_amendment_no_remaining_round_reads_is_refused(tmp_path, capsys, monkeypatch,
                                                          methods, why):
    """FEDORA (the only method that reads fedora.max_pull) had finished and Local had not:
    the resume recorded the amendment against Local ("method": "local",
    "effective_from_round": 2), a round no pull happens in. Refused now, by the CLI and the
    Python API, before anything is written; the run's own config still resumes it."""
    from secure_fedora.api import Experiment
    from secure_fedora.core.config import load_config

    base, pulled, run = _stopped_in(tmp_path, methods, methods[1], monkeypatch)
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["run", str(pulled), "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert why in err and "fedora.max_pull = 1.0 (the run has None)" in err \
        and "nothing was written" in err and err.count("\n") == 1
    with pytest.raises(RunDirError, match=why):
        Experiment(load_config(pulled), run_dir=run).run(resume=True)
    assert _snapshot(run) == before
    assert main(["run", str(base), "--out", str(run), "--resume", "--quiet"]) == 0
    assert not (run / "amendments.json").exists()


def test_an_amendment_made_before_fedora_starts_names_the_rounds_it_applies_to(
        tmp_path, monkeypatch):
    base, pulled, run = _stopped_in(tmp_path, ["local", "fedora"], "local", monkeypatch)
    assert main(["run", str(pulled), "--out", str(run), "--resume", "--quiet"]) == 0
    # the resume continued Local from round 2; every round of FEDORA ran under the new value
    amendment = {"key": "fedora.max_pull", "from": None, "to": 1.0, "method": "local",
                 "resumed_at_round": 2, "effective_from_round": 2,
                 "applies_to": {"fedora": 1}}
    assert json.loads((run / "amendments.json").read_text()) == [amendment]
    results = json.loads((run / "results.json").read_text())
    assert results["config_amendments"] == [amendment]


def test_an_amendment_made_in_the_last_round_is_refused(tmp_path):
    """A DP run killed after its last round's releases were admitted (before that round's
    checkpoint) re-makes that round as it was, so an amended ``fedora.max_pull`` would apply
    from round 4 of a 3-round run: it was recorded (``effective_from_round`` 4) though it
    bounds no round. Refused now before anything is written; the run's own config finishes
    the run."""
    from secure_fedora.runtimes.inprocess import Simulation
    from tests.secure_fedora.core.crash_support import crashes_at
    from tests.secure_fedora.runtimes.flower.deploy_support import dp_config

    doc = dp_config(rounds=3, noise="reproducible").model_dump(mode="json", exclude_none=True)
    doc["training"]["checkpoint_every"] = 1
    cfg = parse_config(doc)
    amended = parse_config({**doc, "fedora": {**doc.get("fedora", {}), "max_pull": 0.01}})
    run, keys = tmp_path / "run", tmp_path / "ks"
    with crashes_at("checkpoint@3"):
        Simulation(cfg, run, keystore=keys).run()
    before = _snapshot(run)
    with pytest.raises(RunDirError, match="round 4 of 'fedora', after its last round"):
        Simulation(amended, run, keystore=keys).run(resume=True)
    assert _snapshot(run) == before
    out = Simulation(cfg, run, keystore=keys).run(resume=True)
    assert out.get("config_amendments") in (None, [])


def test_a_nonce_file_beside_the_ledgers_is_not_read_for_the_amended_round(tmp_path):
    """A node's nonce state file (its last line torn, as a crash leaves it) in the method's
    ledger folder was read as a ledger: the torn line stopped the resume with a ledger error.
    It records no release: only the ledgers decide the round."""
    ledgers = tmp_path / "ledgers" / "fedora"
    ledgers.mkdir(parents=True)
    (ledgers / "client-000.jsonl").write_text(json.dumps({"mechanism": "dpsgd", "round": 4}) + "\n")
    nonces = ledgers / "client-000.nonces.jsonl"
    nonces.write_text('{"floor":1}\n{"n":"00ff","r":9,"s":"serv')
    assert amendment_round(tmp_path, "fedora", 3, private=True) == 5
    assert nonces.read_text() == '{"floor":1}\n{"n":"00ff","r":9,"s":"serv'
