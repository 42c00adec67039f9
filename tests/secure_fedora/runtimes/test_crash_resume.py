"""Crash injection: a run killed at a named point and resumed ends exactly as an uninterrupted
run (results.json except timing, rounds.csv, every ledger entry), with and without DP, for
every method; each release is accounted once and re-made from its journal, never redrawn."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from audits.verify import verify_run
from privacy.accounting import ACCOUNTANT_REGISTRY, AccountingMethod, _epsilon
from privacy.journal import JournalError, RoundMarks
from privacy.ledger import LedgerError, read_ledger
from secure_fedora.core import crashpoints
from secure_fedora.core.config import load_config, parse_config
from secure_fedora.runtimes.inprocess import Simulation, build_clients
from secure_fedora.runtimes.rundir import RunDirError, check_resumable
from tests.marks_support import mark_lines

METHODS = ["fedora", "local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca"]
TIMING = ("seconds_training", "seconds_evaluation")
# ledger fields that depend on wall-clock time (the timestamp, and the hashes/signatures over it)
CLOCK_FIELDS = ("timestamp", "prev_hash", "signature")


def config_dict(methods, dp, **training):
    # a checkpoint after every round unless a test asks otherwise (the crash points name them)
    training = {"checkpoint_every": 1, **training}
    data = {
        "name": "crash", "seed": 2, "methods": list(methods),
        "data": {"num_clients": 3, "train_per_client": 32, "val_per_client": 16,
                 "test_per_client": 16, "groups": 3},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.05, **training},
        "fedora": {"k": 1},
        "fedavg": {"finetune_epochs": 1},
        "baselines": {"ifca": {"num_clusters": 2, "selection_split": "val"}},
    }
    if dp:
        data["fedora"]["relatedness"] = "noised"
        # bit-identical comparisons need noise a re-run draws again: reproducible noise
        data["privacy"] = {"enabled": True, "epsilon": 4.0, "delta": 1e-3,
                           "noise": "reproducible"}
    if dp == "lambda":  # private validation: each round also releases a noised lambda
        data["data"]["validation"] = "private"
        data["methods"] = [m for m in data["methods"] if m != "ifca"]
    return data


def config(methods, dp, **training):
    return parse_config(config_dict(methods, dp, **training))


@pytest.fixture(scope="module")
def clients():
    return build_clients(config(["local"], False))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, clients):
    """Uninterrupted runs, one per (methods, dp, rounds), made on first use."""
    cache = {}

    def get(methods, dp, rounds=2, checkpoint_every=1):
        key = (tuple(methods), dp, rounds, checkpoint_every)
        if key not in cache:
            run_dir = tmp_path_factory.mktemp("reference")
            Simulation(config(methods, dp, rounds=rounds, checkpoint_every=checkpoint_every),
                       run_dir, clients=clients).run()
            cache[key] = run_dir
        return cache[key]

    return get


def run_until_crash(cfg, run_dir, clients, point, resume=False):
    """Run with ``point`` armed; True if it crashed there."""
    crashpoints.arm(point)
    try:
        Simulation(cfg, run_dir, clients=clients).run(resume=resume)
    except crashpoints.InjectedCrash:
        return True
    finally:
        crashpoints.disarm()
    return False


def comparable_results(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    for body in results["methods"].values():
        for key in TIMING:
            body.pop(key, None)
    for spent in results["privacy"].values():
        spent.pop("resumes", None)  # what a resume re-made or trained again: its own record
        for client in spent["clients"]:
            client.pop("ledger_head")  # the hash of a timestamped line
    return results


def comparable_ledgers(run_dir):
    out = {}
    for path in sorted((run_dir / "ledgers").glob("*/*.jsonl")):
        out[str(path.relative_to(run_dir))] = [
            {k: v for k, v in e.items() if k not in CLOCK_FIELDS} for e in read_ledger(path)]
    return out


def assert_same_run(run_dir, ref_dir):
    assert comparable_results(run_dir) == comparable_results(ref_dir)
    assert (run_dir / "rounds.csv").read_text() == (ref_dir / "rounds.csv").read_text()
    assert comparable_ledgers(run_dir) == comparable_ledgers(ref_dir)
    assert not list(run_dir.glob("ledgers/*/*.torn-*"))


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
@pytest.mark.parametrize("method", METHODS)
def test_kill_mid_round_then_resume_is_exact(tmp_path, clients, reference, method, dp):
    # hit 4 of "train": round 2, after the first participant trained (3 clients)
    cfg = config([method], dp)
    assert run_until_crash(cfg, tmp_path, clients, "train@4")
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference([method], dp))


# summary: client 0 released; gate/release 2-3: the summaries of clients 1-2; gate 4: round 1,
# client 0 (gates 7-9 are round 2); then training, evaluation, checkpoint, methods, results.
FEDORA_POINTS = [
    "keys_published@1", "keys_published@2", "summary@1", "gate@2", "release@3", "gate@4", "train@2", "evaluate@2", "checkpoint@1",
    "checkpoint_written@1", "gate@8", "between_methods@1", "results@1",
]


@pytest.mark.parametrize("point", FEDORA_POINTS)
def test_kill_at_each_point_then_resume_is_exact(tmp_path, clients, reference, point):
    """FEDORA with noised summaries and private lambda (three mechanisms), then Local."""
    methods = ["fedora", "local"]
    cfg = config(methods, "lambda")
    assert run_until_crash(cfg, tmp_path, clients, point)
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(methods, "lambda"))


def test_a_kill_before_the_first_release_is_resumable_and_exact(tmp_path, clients, reference):
    """Killed once the first method's ledgers are open and the keys published, before its
    first release (the summaries): the directory is resumable and ends as an uninterrupted
    run, under the keys it published."""
    methods = ["fedora", "local"]
    cfg = config(methods, "lambda")
    assert run_until_crash(cfg, tmp_path, clients, "keys_published")
    published = (tmp_path / "keys" / "allowlist.json").read_bytes()
    check_resumable(tmp_path, cfg)
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(methods, "lambda"))
    assert (tmp_path / "keys" / "allowlist.json").read_bytes() == published


# kill points inside FederationPrivacy.open (3 clients): while the first method's ledgers are
# created in their hidden folder, once it is renamed, between two ledgers opened, and while
# the second method's ledgers are created
OPEN_POINTS = ["ledger_staged@1", "ledger_staged@3", "ledgers_created@1", "writer@2",
               "ledger_staged@5"]


@pytest.mark.parametrize("point", OPEN_POINTS)
def test_a_kill_inside_the_opening_of_the_ledgers_is_resumable_and_exact(tmp_path, clients,
                                                                         reference, monkeypatch,
                                                                         point):
    """Killed with some clients' ledgers created and others not: a resume said there was
    nothing to resume from (the first method's ledgers incomplete) and a new run that the
    directory was not empty. A method's ledgers are now created in a hidden folder renamed
    into place at once: every such run resumes (through the CLI's and the Python API's
    checks) and ends as an uninterrupted run, its leftover folder gone."""
    from secure_fedora.secure import private

    methods = ["local", "fedavg"]
    cfg = config(methods, True)
    if point == "writer@2":  # killed between the first and the second ledger opened
        opened = []

        def killed_at_the_second(*args, **kwargs):
            opened.append(args)
            if len(opened) == 2:
                raise crashpoints.InjectedCrash("killed")
            return writer(*args, **kwargs)

        writer = private.LedgerWriter
        with monkeypatch.context() as patch:
            patch.setattr(private, "LedgerWriter", killed_at_the_second)
            with pytest.raises(crashpoints.InjectedCrash):
                Simulation(cfg, tmp_path, clients=clients).run()
    else:
        assert run_until_crash(cfg, tmp_path, clients, point)
    check_resumable(tmp_path, cfg)
    check_resumable(tmp_path, cfg, config_copy_required=False)
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(methods, True))
    assert sorted(p.name for p in (tmp_path / "ledgers").iterdir()) == sorted(methods)


def test_a_ledger_lost_from_a_method_without_checkpoint_refuses_the_resume(tmp_path, clients):
    """The second method killed in its first round, after its releases, and one client's
    ledger and journal deleted: the resume created that ledger again, empty, and released
    round 1 again unaccounted (its recorded epsilon lowered). A ledger folder always holds
    every client's ledger, so one missing was lost: refused, nothing written."""
    cfg = config(["local", "fedavg"], True)
    assert run_until_crash(cfg, tmp_path, clients, "train@8")  # fedavg, round 1, client 1
    folder = tmp_path / "ledgers" / "fedavg"
    assert read_ledger(folder / "client-001.jsonl")
    (folder / "client-001.jsonl").unlink()
    (folder / "client-001.journal").unlink()
    before = _files(tmp_path)
    with pytest.raises(LedgerError, match="lacks the ledgers of client-001: .* lost"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_kill_twice_then_resume_is_exact(tmp_path, clients, reference, dp):
    cfg = config(["fedora", "fedavg"], dp)
    assert run_until_crash(cfg, tmp_path, clients, "gate@5" if dp else "train@2")
    assert run_until_crash(cfg, tmp_path, clients, "evaluate@4", resume=True)
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(["fedora", "fedavg"], dp))


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_a_model_with_dropout_resumes_exactly(tmp_path, clients, dp):
    """Dropout draws from torch's global generator; each local run seeds it from the client's
    own stream, so a resumed run repeats every mask, in the interrupted method and after it."""
    data = config_dict(["fedora", "local"], dp)
    data["model"] = {"factory": "tests.secure_fedora.runtimes.stochastic_model:dropout_mlp"}
    cfg = parse_config(data)
    Simulation(cfg, tmp_path / "reference", clients=clients).run()
    assert run_until_crash(cfg, tmp_path / "run", clients, "train@4")
    Simulation(cfg, tmp_path / "run", clients=clients).run(resume=True)
    assert_same_run(tmp_path / "run", tmp_path / "reference")


@pytest.mark.parametrize(("dp", "engine"), [(False, "loop"), (True, "batched")],
                         ids=["plain-loop", "dp-batched"])
def test_a_model_with_constant_buffers_resumes_exactly(tmp_path, clients, dp, engine):
    """Constant buffers (one drawn from the seed) are built again on resume, equal to the
    run's (their digest is in the checkpoint's model fingerprint): the resumed run is exact."""
    data = config_dict(["fedora", "local"], dp, engine=engine)
    data["model"] = {"factory": "tests.secure_fedora.runtimes.buffer_models:constant_buffers"}
    cfg = parse_config(data)
    Simulation(cfg, tmp_path / "reference", clients=clients).run()
    assert run_until_crash(cfg, tmp_path / "run", clients, "train@4")
    Simulation(cfg, tmp_path / "run", clients=clients).run(resume=True)
    assert_same_run(tmp_path / "run", tmp_path / "reference")


def test_resume_from_an_older_checkpoint_replays_journaled_rounds(tmp_path, clients, reference):
    """Checkpoints not written every round: the resume starts rounds back and re-makes the
    journaled releases of the rounds after the checkpoint (consumed from the ledger)."""
    cfg = config(["fedora"], True, rounds=3)
    checkpoint = tmp_path / "checkpoints" / "fedora.pt"
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint_written@1")
    saved = checkpoint.read_bytes()  # round 1
    assert run_until_crash(cfg, tmp_path, clients, "train@5", resume=True)  # round 3, client 1
    checkpoint.write_bytes(saved)
    entries_before = {p.name: len(read_ledger(p)) for p in tmp_path.glob("ledgers/*/*.jsonl")}
    assert all(n == 1 + 3 for n in entries_before.values())  # summary + rounds 1-3 accounted
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(["fedora"], True, rounds=3))


@pytest.mark.parametrize("point", ["train@2", "train@8"], ids=["before-first", "after-round-2"])
def test_resume_with_checkpoints_every_k_rounds_is_exact(tmp_path, clients, reference, point):
    """``checkpoint_every = 2``: a kill in round 1 (no checkpoint yet, only ledgers and
    journals) resumes from the start; a kill in round 3 resumes from round 2's checkpoint.
    Either way the journaled releases are re-made and accounted once."""
    cfg = config(["fedora"], True, rounds=3, checkpoint_every=2)
    assert run_until_crash(cfg, tmp_path, clients, point)
    assert (tmp_path / "checkpoints" / "fedora.pt").exists() == (point == "train@8")
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(["fedora"], True, rounds=3, checkpoint_every=2))


def test_results_json_records_each_resume_and_the_rounds_it_remade_from_the_journals(
        tmp_path, clients, reference):
    """A resume re-made round 2 from the journals without a trace in results.json (the ledger
    has no second entry, the spend is right): a reviewer could not tell that the run was
    interrupted. ``privacy.<method>.resumes`` lists each resume, kept through later ones."""
    cfg = config(["fedora"], True, rounds=3)
    assert run_until_crash(cfg, tmp_path, clients, "train@5")  # round 2, after its releases
    # the resume continues after round 1 and is killed once it checkpointed round 2
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint_written@1", resume=True)
    results = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    everyone = ["client-000", "client-001", "client-002"]
    assert results["privacy"]["fedora"]["resumes"] == [
        {"after_round": 1, "remade_from_journal": [{"round": 2, "clients": everyone}]},
        {"after_round": 2, "remade_from_journal": []}]
    assert json.loads((tmp_path / "results.json").read_text())["privacy"]["fedora"][
        "resumes"] == results["privacy"]["fedora"]["resumes"]
    assert "resumes" not in json.loads(
        (reference(["fedora"], True, rounds=3) / "results.json").read_text())["privacy"]["fedora"]
    assert_same_run(tmp_path, reference(["fedora"], True, rounds=3))
    assert verify_run(tmp_path).ok


def test_a_method_the_interrupted_run_never_started_is_not_listed_as_resumed(tmp_path, clients):
    """Killed in FedAvg's round 2, before Local started: results.json listed Local under
    ``privacy.local.resumes`` too, and the audit report said "local: interrupted and resumed
    from the start", of a method that had released nothing. Only FedAvg's resume is listed."""
    cfg = config(["fedavg", "local"], True, rounds=2)
    assert run_until_crash(cfg, tmp_path, clients, "train@5")
    results = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert [r["after_round"] for r in results["privacy"]["fedavg"]["resumes"]] == [1]
    assert "resumes" not in results["privacy"]["local"]
    assert verify_run(tmp_path).ok


def test_a_release_ledgered_but_never_journaled_is_not_recorded_as_remade(tmp_path, clients):
    """Killed after client 1's round-2 ledger entries, before its journal record: the resume
    makes that release for the first time (it never left), so only client 0's is re-made."""
    cfg = config(["fedora"], True, rounds=3)
    assert run_until_crash(cfg, tmp_path, clients, "gate@8")
    results = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert results["privacy"]["fedora"]["resumes"] == [
        {"after_round": 1, "remade_from_journal": [{"round": 2, "clients": ["client-000"]}]}]


def test_resume_with_csprng_noise_resends_journaled_releases_and_counts_once(tmp_path, clients):
    """CSPRNG noise: the journaled releases are re-made from their sealed keystream state
    (the payload digest check in the journal would fail otherwise); epsilon is counted once."""
    data = config_dict(["fedora"], True, rounds=3)
    data["privacy"]["noise"] = "csprng"
    cfg = parse_config(data)
    checkpoint = tmp_path / "checkpoints" / "fedora.pt"
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint_written@1")
    saved = checkpoint.read_bytes()
    assert run_until_crash(cfg, tmp_path, clients, "release@5", resume=True)  # round 3
    checkpoint.write_bytes(saved)  # round 1: rounds 2 and 3 (part) are replayed
    results = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    for path in tmp_path.glob("ledgers/fedora/*.jsonl"):
        entries = read_ledger(path)
        assert [(e["round"], e["mechanism"]) for e in entries] == [
            (0, "gaussian_summary"), (1, "dpsgd"), (2, "dpsgd"), (3, "dpsgd"), (3, "close")]
    assert all(c["refused_at_round"] is None for c in results["privacy"]["fedora"]["clients"])


def test_resume_that_diverges_from_the_ledger_is_refused(tmp_path, clients):
    cfg = config(["fedora"], True)
    assert run_until_crash(cfg, tmp_path, clients, "train@4")
    other = config_dict(["fedora"], True)
    other["privacy"]["noise_multiplier"] = 3.0  # another release than the one accounted
    sim = Simulation(parse_config(other), tmp_path, clients=clients)
    sim.config_hash = Simulation(cfg, tmp_path, clients=clients).config_hash  # same identity
    sim._resume_bound = True  # as if config.toml named it too: the journal is the defence
    before = comparable_ledgers(tmp_path)
    with pytest.raises(LedgerError, match="resume diverged"):
        sim.run(resume=True)
    assert comparable_ledgers(tmp_path) == before  # nothing accounted again


def test_a_resume_that_changes_the_budget_of_a_client_yet_to_release_is_refused(tmp_path,
                                                                               clients):
    """Found by a hunt: Simulation.run(resume=True) after a kill in round 1 (no checkpoint)
    with another per-client budget for a client that had released nothing yet ran it under
    that budget: no journal record diverged, and results.json, the anchor and the ledger
    then disagreed with the run's config.toml. The CLI refused it; the API did not."""
    data = config_dict(["local"], True, participation=0.5)
    cfg = parse_config(data)
    assert run_until_crash(cfg, tmp_path, clients, "train@1")
    silent = [i for i in range(3)
              if not read_ledger(tmp_path / "ledgers" / "local" / f"client-00{i}.jsonl")]
    assert silent  # partial participation: a client had not released when the run was killed
    data["privacy"]["overrides"] = {str(silent[0]): {"epsilon": 8.0}}
    before = comparable_ledgers(tmp_path)
    with pytest.raises(RunDirError, match=r"run\(resume=True\): .* holds a run of another"
                       " configuration"):
        Simulation(parse_config(data), tmp_path, clients=clients).run(resume=True)
    assert comparable_ledgers(tmp_path) == before
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)  # its own config resumes
    assert verify_run(tmp_path).ok


def test_a_new_run_into_a_directory_with_journaled_releases_is_refused(tmp_path, clients):
    cfg = config(["local"], True)
    assert run_until_crash(cfg, tmp_path, clients, "train@2")
    before = comparable_ledgers(tmp_path)
    with pytest.raises(RunDirError, match="is not empty"):
        Simulation(cfg, tmp_path, clients=clients).run()  # not a resume
    with pytest.raises(JournalError, match="earlier run"):  # below the directory check
        Simulation(cfg, tmp_path, clients=clients).run_method("local")
    assert comparable_ledgers(tmp_path) == before  # refused before anything was written


def test_torn_final_ledger_line_is_quarantined_and_the_run_resumes(tmp_path, clients, reference):
    cfg = config(["fedora"], True)
    assert run_until_crash(cfg, tmp_path, clients, "train@4")
    ledger = tmp_path / "ledgers" / "fedora" / "client-001.jsonl"
    torn = b'{"accountant":"rdp","client_id":"client-001","delta":0.0'
    with open(ledger, "ab") as fh:
        fh.write(torn)
    results = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    quarantined = list(ledger.parent.glob("client-001.jsonl.torn-*"))
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == torn
    repairs = [e for e in read_ledger(ledger) if e["mechanism"] == "repair"]
    assert len(repairs) == 1 and repairs[0]["params"]["quarantine"] == quarantined[0].name
    assert results["privacy"]["fedora"]["recoveries"][0]["client"] == "client-001"
    report = verify_run(tmp_path)  # the independent audit accepts the signed repair
    assert report.ok, [str(f) for f in report.findings if f.severity == "error"]
    # apart from the repair entry, the ledger is the uninterrupted run's
    ref = comparable_ledgers(reference(["fedora"], True))
    got = comparable_ledgers(tmp_path)
    key = "ledgers/fedora/client-001.jsonl"
    assert [(e["round"], e["mechanism"], e["epsilon_after"]) for e in got[key]
            if e["mechanism"] != "repair"] == [(e["round"], e["mechanism"], e["epsilon_after"])
                                               for e in ref[key]]


def _subprocess_run(cfg_path, run_dir, resume, crash=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(crashpoints.ENV_VAR, None)
    if crash:
        env[crashpoints.ENV_VAR] = crash
    script = ("import sys, torch; torch.set_num_threads(1);"
              "from secure_fedora.core.config import load_config;"
              "from secure_fedora.runtimes.inprocess import Simulation;"
              "Simulation(load_config(sys.argv[1]), sys.argv[2]).run(resume=sys.argv[3] == '1')")
    return subprocess.run([sys.executable, "-c", script, str(cfg_path), str(run_dir),
                           "1" if resume else "0"], env=env, cwd=Path(__file__).parents[3],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_between_ledger_and_journal_then_resume_is_exact(tmp_path):
    """The real thing: the process SIGKILLs itself (no finally blocks, no lock release) after
    a round-1 ledger entry is fsynced and before its journal record; the in-process grid
    above covers the other points."""
    point = "gate@5"
    tomli_w = pytest.importorskip("tomli_w")
    cfg_path = tmp_path / "config.toml"
    data = config_dict(["fedora"], True)
    # fixed noise: each fresh process would otherwise calibrate the same plan again
    data["privacy"].update(noise_multiplier=1.25, summary_noise_multiplier=3.6)
    cfg_path.write_text(tomli_w.dumps(data))
    Simulation(load_config(cfg_path), tmp_path / "ref").run()
    killed = _subprocess_run(cfg_path, tmp_path / "cut", False, crash=point)
    assert killed.returncode == -9, killed.stderr
    resumed = _subprocess_run(cfg_path, tmp_path / "cut", True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "cut", tmp_path / "ref")


@pytest.mark.parametrize("damage", ["lost", "cut"])
@pytest.mark.parametrize("finished", [False, True], ids=["crashed", "finished"])
def test_a_ledger_lost_or_cut_since_the_checkpoint_refuses_the_resume(tmp_path, clients, damage,
                                                                      finished):
    """A resume used to re-create a lost ledger folder (epsilon 0 from the checkpoint's round
    on) or continue a cut one (ledger and journal shortened together): either under-counts
    what was released. The checkpoint now records every ledger's head."""
    cfg = config(["fedora"], True)
    if finished:
        Simulation(cfg, tmp_path, clients=clients).run()
    else:
        assert run_until_crash(cfg, tmp_path, clients, "train@4")  # round 2, after round 1's checkpoint
    folder = tmp_path / "ledgers" / "fedora"
    if damage == "lost":
        shutil.rmtree(folder)
    else:
        ledger = folder / "client-001.jsonl"
        lines = ledger.read_text().splitlines(keepends=True)
        ledger.write_text("".join(lines[:-2]))
        # one record per entry here: cut the journal with it, or its own check refuses first
        journal = folder / "client-001.journal"
        journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[
            :len(lines) - 2]))
    left = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(LedgerError, match="the ledger was lost, cut or replaced since"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == left or damage == "lost"


@pytest.mark.parametrize("tail", ["second_torn", "second_lost", "first_torn"])
def test_a_release_torn_between_its_two_ledger_entries_resumes(tmp_path, clients, reference,
                                                               tail):
    """With private validation a model release writes two entries (DP-SGD, then lambda) in
    one write; the process died inside it, leaving a prefix: the second line torn (its torn
    line was quarantined and a repair appended, then the resume was refused twice over: the
    step check read the entries next to the last one ([repair, lambda], no DP-SGD step: a
    permanent refusal entry), and the journal check did not see that the cut release ends
    the ledger), the second line missing, or the first line torn. Each resumes exactly."""
    cfg = config(["fedora"], "lambda")
    run = tmp_path / "run"
    assert run_until_crash(cfg, run, clients, "gate@4")  # client-000's round-1 model release
    ledger = run / "ledgers" / "fedora" / "client-000.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["mechanism"] for line in lines[-2:]] == ["dpsgd", "gaussian_lambda"]
    kept = {"second_torn": lines[:-1] + [lines[-1][:60]], "second_lost": lines[:-1],
            "first_torn": lines[:-2] + [lines[-2][:60]]}[tail]
    ledger.write_bytes(b"".join(kept))
    Simulation(cfg, run, clients=clients).run(resume=True)
    entries = read_ledger(ledger)
    assert "refusal" not in [e["mechanism"] for e in entries]
    assert verify_run(run).ok
    ref = comparable_ledgers(reference(["fedora"], "lambda"))["ledgers/fedora/client-000.jsonl"]
    got = comparable_ledgers(run)["ledgers/fedora/client-000.jsonl"]
    assert [(e["round"], e["mechanism"], e["epsilon_after"]) for e in got
            if e["mechanism"] != "repair"] == [(e["round"], e["mechanism"], e["epsilon_after"])
                                               for e in ref]
    assert len(got) == len(ref) + (tail != "second_lost")


def test_a_resume_after_losing_the_journals_is_refused_even_for_one_replayed_release(tmp_path,
                                                                                     clients):
    """With a checkpoint every round only the last release is replayed, and it was exempt as
    the possible crash window: deleting every journal went unnoticed and round 2 was made again
    with new noise. Every earlier ledger release must have its record too (the journal is
    append-only for the run)."""
    data = config_dict(["local"], True)
    data["privacy"]["noise"] = "csprng"
    data["training"]["rounds"] = 3
    cfg = parse_config(data)
    run = tmp_path / "run"
    assert run_until_crash(cfg, run, clients, "release@6")  # round 2, every client journaled
    for journal in (run / "ledgers" / "local").glob("*.journal"):
        journal.unlink()
    with pytest.raises(JournalError, match="has no record of it"):
        Simulation(cfg, run, clients=clients).run(resume=True)


def test_a_resume_replaying_two_rounds_with_envelopes_is_exact(tmp_path, clients):
    """With envelopes, a resume that replays two or more rounds (a checkpoint every 2 rounds,
    killed in round 4) was refused as "resume diverged": the parties' nonce memories kept the
    crashed process's round floor and rejected the replayed round-3 messages as stale. Each
    process now keeps its own memory (its envelopes carry its own run nonce, so an earlier
    process's messages are rejected by context anyway)."""
    data = config_dict(["fedavg"], True, rounds=4, checkpoint_every=2)
    data["security"] = {"envelopes": True}
    cfg = parse_config(data)
    reference = tmp_path / "reference"
    Simulation(cfg, reference, clients=clients).run()
    run = tmp_path / "run"
    assert run_until_crash(cfg, run, clients, "train@10")  # round 4; checkpoint of round 2
    Simulation(cfg, run, clients=clients).run(resume=True)
    resumed, uninterrupted = comparable_results(run), comparable_results(reference)
    for doc in (resumed, uninterrupted):  # the timings of the signed messages
        for body in doc["methods"].values():
            if "extra" in body:  # not a derived row (fedavg_ft)
                transport = body["extra"]["security"]["transport"]
                for key in ("send_seconds", "receive_seconds"):
                    transport.pop(key)
    assert resumed == uninterrupted  # with the whole run's message counts
    assert comparable_ledgers(run) == comparable_ledgers(reference)
    assert verify_run(run).ok


def test_resuming_a_finished_run_keeps_the_anchor_an_auditor_copied(tmp_path, clients,
                                                                    monkeypatch):
    """A finished DP run resumed again re-signed anchor.json with a new timestamp, so the copy
    an auditor kept apart failed verification ("it was replaced") though nothing had changed.
    The anchor of the same run state is now kept byte for byte, its document built once (it
    was built to check the kept anchor, then again to keep it)."""
    cfg = config(["local"], True)
    Simulation(cfg, tmp_path, clients=clients).run()
    kept = tmp_path.parent / "anchor-kept.json"
    kept.write_bytes((tmp_path / "anchor.json").read_bytes())
    built = []
    anchor_doc = Simulation._anchor_doc
    monkeypatch.setattr(Simulation, "_anchor_doc", lambda sim: built.append(1) or anchor_doc(sim))
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert len(built) == 1
    assert (tmp_path / "anchor.json").read_bytes() == kept.read_bytes()
    report = verify_run(tmp_path, anchor=kept)
    assert report.ok, [str(f) for f in report.findings if f.severity == "error"]


def _result_files(run_dir):
    return {n: (run_dir / n).read_bytes() for n in ("results.json", "anchor.json", "rounds.csv")}


def test_resuming_a_finished_run_of_an_older_version_keeps_its_results_and_anchor(tmp_path,
                                                                                  clients):
    """A DP run finished by an older version (plan rows without the "figures" mark, sigma and
    q at 6 decimals, anchored by the run's operator key), resumed by this one: results.json
    was rewritten in the new layout and anchor.json signed again, so the copy an operator kept
    apart failed `audit verify` ("results.json changed", "anchor.json replaced"). A resume that
    trains nothing now keeps the whole, anchored files byte for byte."""
    cfg = config(["local"], True)
    sim = Simulation(cfg, tmp_path, clients=clients)
    sim.run()
    path = tmp_path / "results.json"
    doc = json.loads(path.read_text())
    for row in doc["privacy"]["local"]["plan"]:  # as the older version stated the plan
        assert row.pop("figures") == "exact"
        row["noise_multiplier"] = round(row["noise_multiplier"], 6)
    path.write_text(json.dumps(doc, indent=2))
    sim.write_anchor()  # the older version's anchor: over its results.json, operator-signed
    kept = tmp_path.parent / "anchor-kept.json"
    kept.write_bytes((tmp_path / "anchor.json").read_bytes())
    before = _result_files(tmp_path)
    again = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _result_files(tmp_path) == before
    assert again == doc  # the results stated are the run's own
    report = verify_run(tmp_path, anchor=kept)
    assert report.ok, [str(f) for f in report.findings if f.severity == "error"]


def test_resuming_a_finished_run_without_declared_reply_entries_keeps_it(tmp_path, clients):
    """An older version's DP results.json states no ``privacy.<method>.reply_entries``; a
    resume that trains nothing keeps that anchored file and its anchor byte for byte (the
    anchor digests the whole file, the new field with it: removing it from a file anchored
    with it fails ``audit verify``)."""
    cfg = config(["local"], True)
    sim = Simulation(cfg, tmp_path, clients=clients)
    sim.run()
    path = tmp_path / "results.json"
    doc = json.loads(path.read_text())
    assert doc["privacy"]["local"]["reply_entries"]["round"]["steps"]["built_in"] is True
    del doc["privacy"]["local"]["reply_entries"]
    path.write_text(json.dumps(doc, indent=2))
    assert not verify_run(tmp_path).ok  # the anchor covers the field
    sim.write_anchor()  # the older version's anchor, over its results.json
    before = _result_files(tmp_path)
    assert Simulation(cfg, tmp_path, clients=clients).run(resume=True) == doc
    assert _result_files(tmp_path) == before
    assert verify_run(tmp_path).ok


def test_resuming_a_finished_run_whose_derived_row_has_no_round_keeps_it(tmp_path, clients):
    """An older version wrote methods.fedavg_ft.selected without "round"; a resume that trains
    nothing keeps that anchored results.json as it is (the derived row is not one of the
    outcomes the anchor's run state is compared on)."""
    cfg = config(["fedavg"], True)
    sim = Simulation(cfg, tmp_path, clients=clients)
    sim.run()
    path = tmp_path / "results.json"
    doc = json.loads(path.read_text())
    assert doc["methods"]["fedavg_ft"]["selected"].pop("round") == cfg.training.rounds
    path.write_text(json.dumps(doc, indent=2))
    sim.write_anchor()
    before = _result_files(tmp_path)
    assert Simulation(cfg, tmp_path, clients=clients).run(resume=True) == doc
    assert _result_files(tmp_path) == before


@pytest.mark.parametrize("damage, dp", [("missing", True), ("edited", True), ("cut", False)])
def test_resuming_a_finished_run_writes_a_missing_or_damaged_results_json_again(
        tmp_path, clients, damage, dp, caplog):
    """A resume that trains nothing keeps whole files, and writes again the results.json that
    is missing (killed after the last checkpoint), edited (its anchor no longer vouches for
    it) or, without DP, cut (a DP resume refuses it: its key-store record cannot be read): the
    same bytes as the run wrote, so the kept anchor verifies again."""
    cfg = config(["local"], dp)
    Simulation(cfg, tmp_path, clients=clients).run()
    kept = tmp_path.parent / "anchor-kept.json"
    if dp:
        kept.write_bytes((tmp_path / "anchor.json").read_bytes())
    names = ("results.json", "anchor.json", "rounds.csv") if dp else ("results.json", "rounds.csv")
    before = {n: (tmp_path / n).read_bytes() for n in names}
    path = tmp_path / "results.json"
    if damage == "missing":
        path.unlink()
    elif damage == "cut":
        path.write_bytes(before["results.json"][:100])
    else:
        doc = json.loads(before["results.json"])
        doc["methods"]["local"]["final"]["mean"] = 0.99
        path.write_text(json.dumps(doc, indent=2))
    with caplog.at_level("WARNING", logger="secure_fedora.runtimes.inprocess"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert {n: (tmp_path / n).read_bytes() for n in names} == before
    assert any(f"{path} " in r.getMessage() and "written" in r.getMessage()
               for r in caplog.records)
    assert not dp or verify_run(tmp_path, anchor=kept).ok


def test_resuming_a_finished_run_keeps_rounds_csv_and_writes_a_missing_one(tmp_path, clients):
    """rounds.csv with other digits for the same figures (an older writer's) is kept as it is;
    a missing one is written again."""
    cfg = config(["local"], False)
    Simulation(cfg, tmp_path, clients=clients).run()
    path = tmp_path / "rounds.csv"
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    older = lines[0] + b"".join(line.replace(b",2,", b",2.0,", 1) for line in lines[1:])
    assert older != original
    path.write_bytes(older)
    results = (tmp_path / "results.json").read_bytes()
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert path.read_bytes() == older and (tmp_path / "results.json").read_bytes() == results
    path.unlink()
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert path.read_bytes() == original


def test_resuming_a_finished_run_elsewhere_keeps_the_compute_it_ran_on(tmp_path, clients):
    """results.json's ``compute`` and ``version`` describe the machine and code that ran the
    run: a resume that trains nothing on another machine (here other threads) or version
    rewrote them, though the run had not changed."""
    cfg = config(["local"], False)
    Simulation(cfg, tmp_path, clients=clients).run()
    path = tmp_path / "results.json"
    doc = json.loads(path.read_text())
    doc["compute"]["threads"] += 7
    doc["version"] = "0.0.1"
    path.write_text(json.dumps(doc, indent=2))
    held = path.read_bytes()
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert path.read_bytes() == held


def test_a_ledger_cut_inside_a_journaled_entry_is_refused_not_repaired(tmp_path, clients):
    """A ledger cut in the middle of an entry its journal records looked like a torn write:
    the resume quarantined the bytes, appended a signed repair entry ("write never completed,
    nothing released") and only then refused on the journal. The journal is written after the
    entry is fsynced, so that entry was complete: refused now before anything is written."""
    cfg = config(["local"], True, rounds=3)
    assert run_until_crash(cfg, tmp_path, clients, "train@5")  # round 2, two clients trained
    ledger = tmp_path / "ledgers" / "local" / "client-000.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["round"] for line in lines] == [1, 2]  # both journaled
    ledger.write_bytes(lines[0] + lines[1][:40])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(LedgerError, match="cut or damaged since"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _run_refused_in_round_2(run_dir, clients, monkeypatch):
    """A 3-round DP Local run whose step check refuses client 1's round-2 release (one DP-SGD
    step more than planned); returns its config, with the honest sampler back in place."""
    from secure_fedora.secure.private import DPGradient, StepCountMismatchError

    honest = DPGradient.batches
    calls = []

    def one_extra_in_round_2(self, n, epochs, generator):
        calls.append(1)
        yield from honest(self, n, epochs, generator)
        if len(calls) == 5:  # client 1, round 2 (3 clients)
            yield from list(honest(self, n, epochs, generator))[:1]

    cfg = config(["local"], True, rounds=3)
    monkeypatch.setattr(DPGradient, "batches", one_extra_in_round_2)
    with pytest.raises(StepCountMismatchError, match="in round 2"):
        Simulation(cfg, run_dir, clients=clients).run()
    monkeypatch.setattr(DPGradient, "batches", honest)
    return cfg


def test_a_resume_after_a_refused_step_check_refuses_that_release_again(tmp_path, clients,
                                                                       monkeypatch):
    """A run stopped by a step-count refusal (client 1, round 2) was resumed from round 1's
    checkpoint: the re-run's step check passed, the refusal entry was never matched, and the
    resume failed as 'diverged' after appending other clients' round-3 entries; a second
    resume then released the refused model. The recorded refusal is now raised again, before
    anything is written."""
    from secure_fedora.secure.private import StepCountMismatchError

    cfg = _run_refused_in_round_2(tmp_path, clients, monkeypatch)
    before = {p: p.read_bytes() for p in tmp_path.glob("ledgers/*/*")}
    with pytest.raises(StepCountMismatchError, match="recorded before the restart"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert {p: p.read_bytes() for p in tmp_path.glob("ledgers/*/*")} == before


@pytest.mark.parametrize("entry", ["run", "run_method"])
def test_a_resume_removes_the_partial_checkpoint_of_a_write_that_was_killed(tmp_path, clients,
                                                                           reference, entry):
    """A process killed while streaming a checkpoint leaves its temporary file (as large as a
    checkpoint: GBs at scale) beside it; every later resume kept it, so each such crash cost
    that much disk for good. The resume now removes it, and nothing else (``run`` once every
    method ran, ``run_method`` alone once its checks passed)."""
    cfg = config(["local"], False)
    assert run_until_crash(cfg, tmp_path, clients, "train@4")  # round 1's checkpoint written
    folder = tmp_path / "checkpoints"
    partial = folder / ".local.pt.k1ll3d_x"  # named as atomic_write_with's mkstemp names it
    partial.write_bytes(b"SFCKPT2\n" + b" " * 100)
    other = folder / "notes.txt"
    other.write_text("kept")
    if entry == "run_method":
        Simulation(cfg, tmp_path, clients=clients).run_method("local", resume=True)
        assert not partial.exists() and other.read_text() == "kept"
        return
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert not partial.exists() and other.read_text() == "kept"
    assert comparable_results(tmp_path) == comparable_results(reference(["local"], False))


def test_a_journal_swapped_in_from_another_run_of_the_same_config_is_refused(tmp_path, clients):
    """Two runs of one config share its key store, so a journal of the other run opened and
    matched this ledger's rounds and kinds: the resume re-made the other run's summaries (its
    noise) under this run's ledger entries, a second noised release accounted once, and
    verify passed. Each record now carries the hash of the ledger line it follows."""
    data = config_dict(["fedora"], True)
    data["privacy"]["noise"] = "csprng"
    cfg = parse_config(data)
    for name in ("a", "b"):
        assert run_until_crash(cfg, tmp_path / name, clients, "train@2")  # round 1
    journal = Path("ledgers") / "fedora" / "client-000.journal"
    (tmp_path / "a" / journal).write_bytes((tmp_path / "b" / journal).read_bytes())
    before = comparable_ledgers(tmp_path / "a")
    with pytest.raises(JournalError, match="another run's"):
        Simulation(cfg, tmp_path / "a", clients=clients).run(resume=True)
    assert comparable_ledgers(tmp_path / "a") == before


def _files(run_dir):
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_ledger_cut_inside_its_close_entry_is_restored_not_repaired(tmp_path, clients):
    """Close entries were not journaled: a finished run's ledger cut inside (or right before)
    its close entry was 'repaired' on a resume through the Python API, a signed entry claiming
    a write that never completed, and a second close appended. The close entry is journaled
    whole now and written back bit for bit; the run ends as it was."""
    cfg = config(["local"], True)
    Simulation(cfg, tmp_path / "ref", clients=clients).run()
    ledger = Path("ledgers") / "local" / "client-001.jsonl"
    intact = (tmp_path / "ref" / ledger).read_bytes()
    close = intact.splitlines(keepends=True)[-1]
    assert json.loads(close)["mechanism"] == "close"
    for keep in (0, 1, 57, len(close) - 1):
        run = tmp_path / f"cut-{keep}"
        shutil.copytree(tmp_path / "ref", run)
        (run / ledger).write_bytes(intact[:len(intact) - len(close) + keep])
        Simulation(cfg, run, clients=clients).run(resume=True)
        assert (run / ledger).read_bytes() == intact
        assert _files(run).keys() == {run / p.relative_to(tmp_path / "ref")
                                      for p in _files(tmp_path / "ref")}
        assert comparable_results(run) == comparable_results(tmp_path / "ref")
        assert verify_run(run, anchor=tmp_path / "ref" / "anchor.json").ok


def test_a_ledger_cut_inside_a_refusal_is_restored_and_the_refusal_stands(tmp_path, clients,
                                                                         monkeypatch):
    """Refusal entries were not journaled either: a ledger cut inside the refusal of a step
    check (client 1, round 2) was 'repaired' as a write that never completed, and the resume
    from round 1's checkpoint then trained and released the very model the run had refused.
    The refusal is restored from the journal, and raised again."""
    from secure_fedora.secure.private import StepCountMismatchError

    cfg = _run_refused_in_round_2(tmp_path, clients, monkeypatch)
    ledger = tmp_path / "ledgers" / "local" / "client-001.jsonl"
    intact = ledger.read_bytes()
    refusal = intact.splitlines(keepends=True)[-1]
    assert json.loads(refusal)["mechanism"] == "refusal"
    ledger.write_bytes(intact[:-len(refusal) // 2])
    with pytest.raises(StepCountMismatchError, match="recorded before the restart"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert ledger.read_bytes() == intact
    assert not list(ledger.parent.glob("*.torn-*"))


def test_a_resume_refused_for_a_cut_journal_changes_no_file(tmp_path, clients):
    """A journal cut inside an earlier record (the later ones lost) refuses the resume, but
    its torn tail had already been moved aside (a .torn file made, the journal truncated).
    Every check runs first now: the run directory is byte for byte what it was."""
    cfg = config(["local"], True, rounds=3)
    assert run_until_crash(cfg, tmp_path, clients, "train@8")  # round 3, two rounds journaled
    journal = tmp_path / "ledgers" / "local" / "client-000.journal"
    first = journal.read_bytes().splitlines(keepends=True)[0]
    journal.write_bytes(first[:len(first) // 2])
    before = _files(tmp_path)
    with pytest.raises(JournalError, match="has no record of it"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before



def _cut_journal_0_tear_ledger_2(ledgers):
    journal = ledgers / "client-000.journal"
    journal.write_bytes(journal.read_bytes().splitlines(keepends=True)[0])
    with (ledgers / "client-002.jsonl").open("ab") as f:
        f.write(b'{"accountant":"rdp","budg')
    return JournalError, "has no record of it"


def _tear_ledger_0_forge_ledger_2(ledgers):
    with (ledgers / "client-000.jsonl").open("ab") as f:
        f.write(b'{"accountant":"rdp","budg')
    ledger = ledgers / "client-002.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["signature"] = ("0" if entry["signature"][0] != "0" else "1") + entry["signature"][1:]
    lines[1] = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
    ledger.write_bytes(b"".join(lines))
    return LedgerError, "failed verification"


@pytest.mark.parametrize("damage", [_cut_journal_0_tear_ledger_2, _tear_ledger_0_forge_ledger_2],
                         ids=["cut-journal", "forged-ledger"])
def test_a_resume_refused_for_one_client_repairs_no_other_clients_ledger(tmp_path, clients,
                                                                         damage):
    """One client's journal cut (its coverage check fails) or ledger forged, another's ledger
    torn by a crash: those checks ran only after every ledger had been restored and repaired,
    so the refused resume had already appended a signed repair entry to the torn ledger and
    made a .torn file. Every client's checks run before any ledger is written now."""
    cfg = config(["local"], True, rounds=3)
    assert run_until_crash(cfg, tmp_path, clients, "train@8")  # round 3, two rounds journaled
    error, message = damage(tmp_path / "ledgers" / "local")
    before = _files(tmp_path)
    with pytest.raises(error, match=message):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


def _csprng_local(rounds=2):
    data = config_dict(["local"], True, rounds=rounds)
    data["privacy"]["noise"] = "csprng"
    return parse_config(data)


@pytest.mark.parametrize("cut", ["whole-record", "inside-record"])
def test_a_cut_last_journal_record_of_a_release_that_left_refuses_the_resume(tmp_path, clients,
                                                                             cut):
    """The last release a ledger records may lack its journal record (a crash between the
    two writes: it never left), so a cut removing that record, whole or all but a torn
    prefix, went unnoticed: killed after round 2 had left (before its checkpoint) and with
    client-000's round-2 record cut, the resume drew client-000's round-2 model again with
    fresh CSPRNG noise (its theta 0.043 away from the released one) while its ledger entry
    was consumed: two releases accounted once. Clients admit in order, so client-001's
    round-2 entry shows client-000's record had been written: a JournalError, nothing
    written."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@2")  # round 2 left, unsaved
    journal = tmp_path / "ledgers" / "local" / "client-000.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2  # rounds 1 and 2
    kept = lines[0] + (lines[1][:len(lines[1]) // 2] if cut == "inside-record" else b"")
    journal.write_bytes(kept)
    before = _files(tmp_path)
    # round 2 was admitted as a batch: its mark (not client-001's entry) shows the record
    with pytest.raises(JournalError, match=r"client-000\.journal'.*rounds\.released' marks"
                       " this client's releases of rounds up to 2"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


def test_a_crash_between_ledger_and_journal_still_resumes_with_csprng_noise(tmp_path, clients):
    """The crash window the refusal above must not close: killed after client-001's round-1
    ledger entry and before its journal record (client-002 not admitted yet, client-000
    journaled), the resume makes that release once and the run verifies."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "gate@2")
    folder = tmp_path / "ledgers" / "local"
    assert [len(read_ledger(folder / f"client-00{k}.jsonl")) for k in range(3)] == [1, 1, 0]
    assert not (folder / "client-001.journal").exists() or \
        not (folder / "client-001.journal").read_bytes()
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert [[(e["round"], e["mechanism"]) for e in read_ledger(folder / f"client-00{k}.jsonl")]
            for k in range(3)] == [[(1, "dpsgd"), (2, "dpsgd"), (2, "close")]] * 3
    report = verify_run(tmp_path)
    assert report.ok, [str(f) for f in report.findings if f.severity == "error"]



@pytest.mark.parametrize("cut", ["whole-record", "inside-record"])
def test_a_cut_journal_record_of_the_last_client_admitted_in_a_round_refuses_the_resume(
        tmp_path, clients, cut):
    """The last client admitted in a round has nothing of another client written after its
    journal record, so a cut of that record after the round's releases left looked like a
    crash before its journal write: killed after round 2 had left (before its checkpoint)
    and with client-002's round-2 record cut, the resume drew client-002's round-2 model
    again with fresh CSPRNG noise under the ledger entry it consumed. The round's releases
    leave only after a per-round mark (fsynced after the round's last journal record), which
    the resume reads: a JournalError naming the journal and the mark, nothing written."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@2")  # round 2 left, unsaved
    folder = tmp_path / "ledgers" / "local"
    journal = folder / "client-002.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2  # rounds 1 and 2
    kept = lines[0] + (lines[1][:len(lines[1]) // 2] if cut == "inside-record" else b"")
    journal.write_bytes(kept)
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal'.*rounds\.released' marks this client's"
                       " releases of rounds up to 2"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("damage", ["lost", "emptied"])
def test_lost_round_marks_refuse_the_resume_of_a_cut_last_client_record(tmp_path, clients,
                                                                        damage):
    """With ``rounds.released`` lost (or emptied) as well, the cut above passed for the crash
    window: the resume drew client-002's round-2 model again with fresh CSPRNG noise under the
    ledger entry it consumed. ``rounds.admitting`` names round 2, admitted only after round
    1's releases left, after round 1 was marked: marks that end before it were lost or cut,
    and the unjournaled release is refused. Lost marks alone (every record kept) resume."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@2")  # round 2 left, unsaved
    folder = tmp_path / "ledgers" / "local"
    journal = folder / "client-002.journal"
    journal.write_bytes(journal.read_bytes().splitlines(keepends=True)[0])
    marks = folder / "rounds.released"
    if damage == "lost":
        marks.unlink()
    else:
        marks.write_bytes(b"")
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal' has no complete record of it,"
                       r" and '.*rounds\.released', which marks rounds up to -1 only, was lost"
                       r" or cut: '.*rounds\.admitting' shows round 2 was admitted"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("damage", ["lost", "emptied"])
def test_both_lost_mark_files_refuse_the_resume_of_a_cut_last_client_record(tmp_path, clients,
                                                                           damage):
    """With ``rounds.admitting`` lost (or emptied) together with ``rounds.released``, the cut
    above passed for the crash window again: the resume drew client-002's round-2 model with
    fresh CSPRNG noise under the ledger entry it consumed. The signed ledgers record round-2
    releases, admitted only after round 1's releases left, after round 1 was marked: marks
    ending before round 1 were lost, and the unjournaled release is refused."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@2")  # round 2 left, unsaved
    folder = tmp_path / "ledgers" / "local"
    journal = folder / "client-002.journal"
    journal.write_bytes(journal.read_bytes().splitlines(keepends=True)[0])
    for name in ("rounds.released", "rounds.admitting"):
        if damage == "lost":
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(b"")
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal' has no complete record of it,"
                       r" and '.*rounds\.released', which marks rounds up to -1 only, was lost"
                       r" or cut: the ledgers record round-2 releases, admitted only after"
                       r" round 1 was marked"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(("method", "point", "lost"), [
    ("local", "checkpoint@1", ("rounds.released", "rounds.admitting")),
    ("fedora", "summary@3", ("rounds.released",))])
def test_lost_mark_files_refuse_the_cut_last_record_of_a_first_round(tmp_path, clients, method,
                                                                     point, lost):
    """In a method's first releasing round no earlier round's mark shows the mark files were
    lost: killed once round 1's models (or FEDORA's round-0 summaries) had left, client-002's
    record cut and the mark files deleted, the resume drew that release again with fresh
    CSPRNG noise. The mark files are created with the ledgers, so gone they show the loss."""
    data = config_dict([method], True)
    data["privacy"]["noise"] = "csprng"
    cfg = parse_config(data)
    assert run_until_crash(cfg, tmp_path, clients, point)
    folder = tmp_path / "ledgers" / method
    journal = folder / "client-002.journal"
    assert len(journal.read_bytes().splitlines()) == 1
    journal.write_bytes(b"")
    for name in lost:
        (folder / name).unlink()
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal' has no complete record of it,"
                       r" and '.*rounds\.released'.*, created with the ledgers, (is|are) gone"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("lost", [("rounds.released",), ("rounds.released", "rounds.admitting")])
def test_lost_round_marks_alone_resume(tmp_path, clients, lost):
    """Lost marks (one mark file or both) with every journal record kept hide nothing: the
    resume goes on (each release it re-makes is journaled) and the run verifies."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@2")  # round 2 left, unsaved
    for name in lost:
        (tmp_path / "ledgers" / "local" / name).unlink()
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    report = verify_run(tmp_path)
    assert report.ok, [str(f) for f in report.findings if f.severity == "error"]


@pytest.mark.parametrize("cut", ["one-byte", "mid-line", "to-one-byte"])
def test_a_round_mark_cut_short_refuses_the_resume_of_a_cut_last_client_record(tmp_path,
                                                                              clients, cut):
    """Round 2's mark cut short (its newline, half of it, all but its first byte) with
    client-002's round-2 record cut: the torn mark was skipped as a crash inside its write and
    the resume drew that release again with fresh CSPRNG noise. A mark is written only after
    every record of its round, so any byte of it shows the record was written: refused,
    nothing written."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@2")  # round 2 left, unsaved
    folder = tmp_path / "ledgers" / "local"
    journal = folder / "client-002.journal"
    journal.write_bytes(journal.read_bytes().splitlines(keepends=True)[0])
    marks = folder / "rounds.released"
    data = marks.read_bytes()
    last = data[:-1].rfind(b"\n") + 1  # where round 2's mark begins
    keep = {"one-byte": len(data) - 1, "mid-line": (last + len(data)) // 2,
            "to-one-byte": last + 1}[cut]
    marks.write_bytes(data[:keep])
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal' has no complete record of it,"
                       r" though '.*rounds\.released' ends in a torn mark"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(("method", "point"), [("local", "checkpoint@1"),
                                               ("fedora", "summary@3")])
def test_an_emptied_round_marks_file_refuses_the_cut_last_record_of_a_first_round(
        tmp_path, clients, method, point):
    """In a method's first releasing round no earlier mark shows a loss: ``rounds.released``
    emptied (not deleted) with client-002's record cut passed for the crash window and the
    resume drew that release again with fresh CSPRNG noise. The file is created holding its
    header line, so an empty one was cut: refused, nothing written."""
    data = config_dict([method], True)
    data["privacy"]["noise"] = "csprng"
    cfg = parse_config(data)
    assert run_until_crash(cfg, tmp_path, clients, point)
    folder = tmp_path / "ledgers" / method
    (folder / "client-002.journal").write_bytes(b"")
    (folder / "rounds.released").write_bytes(b"")
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal' has no complete record of it,"
                       r" though '.*rounds\.released' is empty.*round-marks format 2"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


def test_a_round_mark_swapped_in_from_another_run_refuses_the_resume(tmp_path, clients):
    """Each mark is chained to the line before it, back to the file's header, which names
    its run: round 2's mark of another run of the same config, put in place of this run's,
    is refused as damage before anything is written."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path / "a", clients, "checkpoint@2")
    assert run_until_crash(cfg, tmp_path / "b", clients, "checkpoint@2")
    theirs, ours = (tmp_path / run / "ledgers" / "local" / "rounds.released" for run in "ab")
    lines = ours.read_bytes().splitlines(keepends=True)
    ours.write_bytes(b"".join(lines[:-1]) + theirs.read_bytes().splitlines(keepends=True)[-1])
    before = _files(tmp_path / "b")
    with pytest.raises(JournalError, match=rf"rounds\.released' line {len(lines) - 1}: .*not"
                       " chained to the line before it"):
        Simulation(cfg, tmp_path / "b", clients=clients).run(resume=True)
    assert _files(tmp_path / "b") == before


def _as_format_1(folder):
    """Rewrite the round-marks files in ``folder`` as a version before format 2 wrote them."""
    for name in ("rounds.released", "rounds.admitting"):
        (folder / name).write_text(mark_lines(folder / name))


def test_round_marks_of_format_1_resume_as_before(tmp_path, clients):
    """A run written before format 2 (no header, no chain) resumes under the same rules: killed
    after round 2 left, it re-makes that round from the journals, its file extended in
    format 1, and verifies."""
    cfg = _csprng_local(rounds=3)
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@2")
    folder = tmp_path / "ledgers" / "local"
    _as_format_1(folder)
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    marks = RoundMarks(folder / "rounds.released")
    assert (marks.format, marks.last) == (1, 3)
    assert mark_lines(folder / "rounds.released") == (folder / "rounds.released").read_text()
    report = verify_run(tmp_path)
    assert report.ok, [str(f) for f in report.findings if f.severity == "error"]


def test_an_empty_round_marks_file_of_format_1_refuses_a_release_lacking_its_record(tmp_path,
                                                                                  clients):
    """An empty file of an earlier version cannot tell a crash before the last client's
    record from a cut of its only mark: with a release lacking its record the resume is
    refused naming format 1, nothing written (in format 2 it resumes: the crash windows'
    test above)."""
    data = config_dict(["fedora"], True)
    data["privacy"]["noise"] = "csprng"
    cfg = parse_config(data)
    assert run_until_crash(cfg, tmp_path, clients, "gate@3")  # client-002's summary entry
    folder = tmp_path / "ledgers" / "fedora"
    _as_format_1(folder)
    assert (folder / "rounds.released").read_bytes() == b""
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal' has no complete record of it,"
                       r" though '.*rounds\.released' is empty.*round-marks format 1"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


def test_a_refused_resume_keeps_an_interrupted_result_write(tmp_path, clients):
    """A run killed while drawing a plot leaves its partial temporary copy; a resume refused
    for a damaged journal used to delete it first: a refused resume now changes no file."""
    cfg = config(["local"], True)
    assert run_until_crash(cfg, tmp_path, clients, "results@1")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / ".accuracy_per_round.png.k1ll3d").write_bytes(b"\x89PNG partial")
    journal = tmp_path / "ledgers" / "local" / "client-002.journal"
    journal.write_bytes(journal.read_bytes() + journal.read_bytes().splitlines(keepends=True)[-1])
    before = _files(tmp_path)
    with pytest.raises(JournalError, match="unreadable record"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


def test_a_refused_resume_keeps_an_earlier_methods_interrupted_checkpoint_write(tmp_path,
                                                                                clients):
    """A partial checkpoint copy of the first method (a process killed while writing it) was
    deleted when that method resumed, before the second method's resume checks refused a
    damaged journal: the refused resume had changed the run directory. Partial checkpoint
    copies are removed only once every method ran."""
    cfg = config(["local", "fedavg"], True)
    assert run_until_crash(cfg, tmp_path, clients, "checkpoint@3")  # fedavg's round 1
    (tmp_path / "checkpoints" / ".local.pt.k1ll3d").write_bytes(b"partial checkpoint")
    journal = tmp_path / "ledgers" / "fedavg" / "client-002.journal"
    journal.write_bytes(journal.read_bytes() + journal.read_bytes().splitlines(keepends=True)[-1])
    before = _files(tmp_path)
    with pytest.raises(JournalError, match="unreadable record"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:-1]))
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)  # repaired: it resumes
    assert not (tmp_path / "checkpoints" / ".local.pt.k1ll3d").exists()


def test_a_cut_summary_record_of_the_last_client_refuses_the_resume(tmp_path, clients):
    """Round 0: each noised summary leaves before the next client's is admitted, so the last
    client's had nothing written after it either: killed once it had left, its record cut,
    the resume drew that summary again with fresh noise. Round 0 is marked after the last
    summary record, before it leaves."""
    data = config_dict(["fedora"], True)
    data["privacy"]["noise"] = "csprng"
    cfg = parse_config(data)
    assert run_until_crash(cfg, tmp_path, clients, "summary@3")  # the last summary left
    journal = tmp_path / "ledgers" / "fedora" / "client-002.journal"
    assert len(journal.read_bytes().splitlines()) == 1
    journal.write_bytes(b"")
    before = _files(tmp_path)
    with pytest.raises(JournalError, match=r"client-002\.journal'.*rounds\.released' marks this"
                       " client's releases of rounds up to 0"):
        Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(("method", "point"), [
    ("local", "gate@3"), ("local", "gate@6"), ("local", "release@6"), ("local", "train@6"),
    ("fedora", "gate@3"), ("fedora", "gate@9")])
def test_the_last_clients_crash_windows_still_resume_with_csprng_noise(tmp_path, clients,
                                                                       method, point):
    """The windows the round marks must leave open: killed after the last client's ledger
    entry and before its journal record (gate), after its record but before the round's
    mark (release, train), for a round's model and (FEDORA) the summaries; the resume makes
    or re-makes each release once, marks the round, and the run verifies."""
    data = config_dict([method], True)
    data["privacy"]["noise"] = "csprng"
    cfg = parse_config(data)
    assert run_until_crash(cfg, tmp_path, clients, point)
    folder = tmp_path / "ledgers" / method
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    setup = [(0, "gaussian_summary")] if method == "fedora" else []
    assert [[(e["round"], e["mechanism"]) for e in read_ledger(folder / f"client-00{k}.jsonl")]
            for k in range(3)] == [[*setup, (1, "dpsgd"), (2, "dpsgd"), (2, "close")]] * 3
    marked = [0, 1, 2] if method == "fedora" else [1, 2]
    assert mark_lines(folder / "rounds.released") == "".join(
        f'{{"round":{r},"clients":[[0,2]]}}\n' for r in marked)
    assert RoundMarks(folder / "rounds.released").format == 2  # chained from its header
    report = verify_run(tmp_path)
    assert report.ok, [str(f) for f in report.findings if f.severity == "error"]


def test_a_torn_round_mark_is_moved_aside_and_the_round_marked_again(tmp_path, clients):
    """A process killed inside a round's mark write (no release of the round had left): the
    resume moves the torn line aside (listed under recoveries), re-makes the round and marks
    it; nothing was refused."""
    cfg = _csprng_local()
    assert run_until_crash(cfg, tmp_path, clients, "train@6")  # round 2 admitted, unmarked
    marks = tmp_path / "ledgers" / "local" / "rounds.released"
    assert mark_lines(marks) == '{"round":1,"clients":[[0,2]]}\n'
    with marks.open("ab") as f:
        f.write(b'{"rou')
    results = Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert mark_lines(marks) == '{"round":1,"clients":[[0,2]]}\n{"round":2,"clients":[[0,2]]}\n'
    assert RoundMarks(marks).last == 2  # the chain holds
    assert (marks.parent / "rounds.released.torn-2").read_bytes() == b'{"rou'
    assert {"marks_quarantine": "rounds.released.torn-2"} in \
        results["privacy"]["local"]["recoveries"]


def test_a_power_loss_inside_an_admission_batch_resumes_exactly(tmp_path, clients, reference):
    """A round's admissions run as one batch whose journal fsyncs overlap: a power loss may
    keep client-002's round-1 ledger entry (fsynced) and lose the round-1 records of
    clients 0 and 1 (written, fsync pending). Read the old way (a higher-indexed client's
    entry of the round proves the record was written) the resume was refused as a cut
    journal; the round's admission line says it was a batch and no mark covers it, so the
    releases never left: the resume re-makes them and ends as an uninterrupted run."""
    cfg = config(["local"], True)
    assert run_until_crash(cfg, tmp_path, clients, "gate@3")  # round 1, client 2's entry
    folder = tmp_path / "ledgers" / "local"
    assert [len(read_ledger(folder / f"client-00{k}.jsonl")) for k in range(3)] == [1, 1, 1]
    assert mark_lines(folder / "rounds.admitting") == '{"round":1,"clients":[]}\n'
    assert mark_lines(folder / "rounds.released") == ""  # created with the ledgers
    for k in (0, 1):  # the records a power loss may drop
        assert len((folder / f"client-00{k}.journal").read_bytes().splitlines()) == 1
        (folder / f"client-00{k}.journal").write_bytes(b"")
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(["local"], True))


def test_an_admission_batch_makes_every_record_durable_before_the_round_is_marked(
        tmp_path, clients, reference, monkeypatch):
    """The journal fsyncs of a round's admissions overlap (they ran one at a time, each
    ~4 ms under load), yet each client's ledger entry is fsynced before its record is
    written, and every record of the round before the round's mark: the write-ahead order.
    The run ends as an uninterrupted one."""
    import threading
    import time

    real, lock = os.fsync, threading.Lock()
    events, state = [], {"now": 0, "most": 0}

    def slow_fsync(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.02)
            real(fd)
        finally:
            with lock:
                state["now"] -= 1
                events.append(name)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    cfg = config(["local"], True)
    Simulation(cfg, tmp_path, clients=clients).run()
    monkeypatch.undo()
    assert state["most"] >= 2
    # the first: its creation (empty) with the ledgers; then the marks of rounds 1 and 2
    marks = [i for i, name in enumerate(events) if name == "rounds.released"][1:]
    assert len(marks) == 2
    for rnd, at in enumerate(marks, start=1):
        synced = [name for name in events[:at] if name.endswith(".journal")]
        assert sorted(set(synced)) == [f"client-00{k}.journal" for k in range(3)]
        assert len(synced) == 3 * rnd
    for k in range(3):  # ledger entry durable before the record is written
        first_ledger = events.index(f"client-00{k}.jsonl")
        first_record = events.index(f"client-00{k}.journal")
        assert first_ledger < first_record
    assert_same_run(tmp_path, reference(["local"], True))


def test_a_failed_journal_fsync_in_a_batch_loses_nothing(tmp_path, clients, reference,
                                                       monkeypatch):
    """client-001's round-1 journal fsync fails inside the round's admission batch: the run
    stops with that OSError before any release of the round left (no mark), the other
    clients' records are durable, and a resume ends as an uninterrupted run."""
    real = os.fsync
    failures = []

    def failing_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("client-001.journal") and not failures:
            failures.append(fd)
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    cfg = config(["local"], True)
    with pytest.raises(OSError, match="Input/output error"):
        Simulation(cfg, tmp_path, clients=clients).run()
    monkeypatch.undo()
    folder = tmp_path / "ledgers" / "local"
    assert mark_lines(folder / "rounds.released") == ""  # nothing marked
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(["local"], True))


def _prv_before_refinement(h, delta, options):
    """PRV as toolkit versions before its refining pass computed it: Opacus's bound at the
    configured eps_error, once."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [tuple(r) for r in h]
    return float(acc.get_epsilon(delta, eps_error=options["prv_eps_error"],
                                 delta_error=delta / 1000))


OLD_PRV = AccountingMethod(
    "prv", "privacy random variables (Opacus's PRVAccountant, upper bound)",
    _prv_before_refinement,
    lambda o: {"library": "opacus", "eps_error": o["prv_eps_error"], "delta_error": "delta/1000"})


def _old_prv(patch):
    """Make the accountant compute and record PRV as those versions did."""
    patch.setitem(ACCOUNTANT_REGISTRY, "prv", OLD_PRV)
    _epsilon.cache_clear()


@pytest.mark.parametrize("budget", [4.0, 0.5])
def test_a_prv_run_ledgered_before_the_refined_pass_resumes_under_its_parameters(
        tmp_path, clients, monkeypatch, budget):
    """A PRV run interrupted under a version whose ledger entries lack refined_eps_error
    resumes: its accountant keeps Opacus's single pass, so every entry (replayed or new)
    records the epsilon and parameters the old version would have; audit verify accepts it."""
    data = config_dict(["local"], True)
    data["privacy"].update(accountant="prv", epsilon=budget)
    cfg = parse_config(data)
    with monkeypatch.context() as patch:  # the uninterrupted run, all under the old version
        _old_prv(patch)
        Simulation(cfg, tmp_path / "ref", clients=clients).run()
        assert run_until_crash(cfg, tmp_path / "run", clients, "train@4")  # round 2
    _epsilon.cache_clear()
    Simulation(cfg, tmp_path / "run", clients=clients).run(resume=True)
    resumed, reference = comparable_ledgers(tmp_path / "run"), comparable_ledgers(tmp_path / "ref")
    assert resumed == reference  # epsilons and parameters as the old version recorded them
    assert comparable_results(tmp_path / "run") == comparable_results(tmp_path / "ref")
    releases = [e for entries in resumed.values() for e in entries if e["mechanism"] == "dpsgd"]
    assert len(releases) == 6
    assert all("refined_eps_error" not in e["params"]["accountant_params"] for e in releases)
    report = verify_run(tmp_path / "run")
    assert report.ok, report.findings


def test_resuming_a_finished_dp_run_does_not_anchor_an_edited_compute_or_version(tmp_path,
                                                                                 clients):
    """Under DP only anchor.json vouches for results.json: one whose ``compute`` or
    ``version`` was edited after the run (its anchor no longer vouching for it) was kept by a
    resume that trained nothing, since those fields are ignored in the comparison, and the
    anchor was signed again over the edit. It is written again from the run, as any other
    edit, so the anchor copy kept apart verifies."""
    cfg = config(["local"], True)
    Simulation(cfg, tmp_path, clients=clients).run()
    kept = tmp_path.parent / "anchor-kept.json"
    kept.write_bytes((tmp_path / "anchor.json").read_bytes())
    before = _result_files(tmp_path)
    path = tmp_path / "results.json"
    doc = json.loads(before["results.json"])
    doc["compute"]["device"] = "cuda"
    doc["version"] = "9.9.9"
    path.write_text(json.dumps(doc, indent=2))
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert _result_files(tmp_path) == before
    assert verify_run(tmp_path, anchor=kept).ok


@pytest.mark.parametrize(("dp", "envelopes"), [(False, False), (False, True), (True, False)],
                         ids=["plain", "envelopes", "dp"])
def test_a_reply_that_is_not_the_clients_row_resumes_mid_run_exactly(tmp_path, clients, dp,
                                                                      envelopes):
    """A FEDORA subclass releasing half of its trained row: the server's rows (the replies)
    are held apart from the clients' rows, written to the checkpoint (with or without
    envelopes) and restored, so a run killed in round 3 and resumed from round 2's checkpoint
    ends exactly as the uninterrupted run."""
    import torch

    from secure_fedora.algorithms.methods import Fedora
    from secure_fedora.core.registry import METHODS as REGISTRY
    from secure_fedora.runtimes.inprocess import load_checkpoint

    class ReleasingHalf(Fedora):
        def client_update(self, i, rnd, message):
            reply = super().client_update(i, rnd, message)
            return {**reply, "theta": reply["theta"] * 0.5}

    name = "half_fedora_resume_x"
    REGISTRY.register(name, ReleasingHalf)
    try:
        data = config_dict([name], dp, rounds=3)
        data["security"] = {"envelopes": envelopes}
        cfg = parse_config(data)
        Simulation(cfg, tmp_path / "ref", clients=clients).run()
        run_dir = tmp_path / "run"
        assert run_until_crash(cfg, run_dir, clients, "train@7")  # round 3, first client
        sim = Simulation(cfg, run_dir, clients=clients)
        state = load_checkpoint(sim.checkpoint_path(name))["method"]
        assert sorted(state["server_rows"]["theta"]["clients"].tolist()) == [0, 1, 2]
        assert torch.equal(state["server_rows"]["theta"]["rows"], state["theta"] * 0.5)
        sim.run(resume=True)
    finally:
        REGISTRY.unregister(name)
    for run in (run_dir, tmp_path / "ref"):  # the envelopes' timings differ from run to run
        results = json.loads((run / "results.json").read_text())
        security = results["methods"][name]["extra"].get("security", {})
        for traffic in ("transport", "relatedness_transport"):
            for key in [k for k in security.get(traffic, {}) if k.endswith("_seconds")]:
                del security[traffic][key]
        (run / "results.json").write_text(json.dumps(results))
    assert_same_run(run_dir, tmp_path / "ref")


def test_a_run_stopped_at_one_clients_lambda_resumes_as_if_never_stopped(tmp_path, clients,
                                                                          reference,
                                                                          monkeypatch):
    """Private lambdas are released one client at a time: a refusal at client 2's round-2
    lambda stops the run after clients 0 and 1 drew and used theirs (each accounted by its
    own admitted model release; none left, as uploads follow every client's training).
    The stop writes no ledger or journal line, and a resume re-makes those lambdas from the
    journaled noise states: the run ends as an uninterrupted one, each release accounted
    once, at the same epsilon."""
    from secure_fedora.learning.client import ClientUpdateError
    from secure_fedora.secure.private import FederationPrivacy

    real = FederationPrivacy.private_lambda
    drawn = []

    def refused_at_client_2_in_round_2(self, i, *args, **kwargs):
        rnd = self.clients[i].admitted.round
        if (rnd, i) == (2, 2):
            raise ClientUpdateError(f"client {i}: lambda refused (test)")
        drawn.append((rnd, i))
        return real(self, i, *args, **kwargs)

    cfg = config(["fedora"], "lambda")
    monkeypatch.setattr(FederationPrivacy, "private_lambda", refused_at_client_2_in_round_2)
    files = {}

    def stopped_files():
        return {p: p.read_bytes() for p in tmp_path.glob("ledgers/fedora/*")
                if p.suffix in (".jsonl", ".journal")}

    real_admit = FederationPrivacy.admit

    def admit(self, i, rnd, *args, **kwargs):
        admitted = real_admit(self, i, rnd, *args, **kwargs)
        if (rnd, i) == (2, 2):
            files.update(stopped_files())  # the last admission: what the stop may not change
        return admitted

    monkeypatch.setattr(FederationPrivacy, "admit", admit)
    with pytest.raises(ClientUpdateError, match="fedora round 2: client 2: lambda refused"):
        Simulation(cfg, tmp_path, clients=clients).run()
    assert drawn[-2:] == [(2, 0), (2, 1)] and stopped_files() == files
    monkeypatch.setattr(FederationPrivacy, "private_lambda", real)
    monkeypatch.setattr(FederationPrivacy, "admit", real_admit)
    Simulation(cfg, tmp_path, clients=clients).run(resume=True)
    assert_same_run(tmp_path, reference(["fedora"], "lambda"))
