"""Crash and resume under combinations test_crash_resume.py does not cover: the batched engine
under DP, partial participation with late joiners and checkpoints every 2 rounds, FEDORA with a
bounded pull (``fedora.max_pull``), CKKS relatedness, every baseline killed between a release's
journal record and its leaving, and a DP sweep interrupted between and inside cells. Each
resumed run ends as the uninterrupted one: results.json (less timing), rounds.csv, every ledger
entry (less clock fields) and the final checkpointed state, tensor for tensor."""

import json
from pathlib import Path

import pytest
import torch

from audits.verify import verify_run
from privacy.ledger import read_ledger
from secure_fedora.core.config import parse_config
from secure_fedora.experiments.sweep import run_sweep
from secure_fedora.runtimes.inprocess import Simulation, build_clients, load_checkpoint
from tests.secure_fedora.core.crash_support import crashes_at
from tests.secure_fedora.runtimes.test_crash_resume import (
    TIMING,
    _subprocess_run,
    assert_same_run,
    comparable_ledgers,
    config_dict,
    run_until_crash,
)

BASELINES = ["local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca"]


@pytest.fixture(scope="module")
def clients():
    return build_clients(parse_config(config_dict(["local"], False)))


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each method's checkpointed method state (theta and the like) after the run."""
    return {path.stem: load_checkpoint(path)["method"]
            for path in sorted((run_dir / "checkpoints").glob("*.pt"))}


def _assert_equal(got, want, where: str, approx: tuple[str, ...] = ()) -> None:
    loose = any(part in where for part in approx)
    if isinstance(want, torch.Tensor) and loose:
        assert torch.allclose(got, want, rtol=0, atol=1e-4), where
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_equal(got[key], want[key], f"{where}.{key}", approx)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_equal(a, b, f"{where}[{i}]", approx)
    elif not loose:
        assert got == want, where


def assert_same_state(run_dir: Path, ref_dir: Path, approx: tuple[str, ...] = ()) -> None:
    """The final checkpointed method state (theta and the like) is equal, tensor for tensor
    (tensors on a path containing a part in ``approx`` within 1e-4, other values there
    not compared)."""
    _assert_equal(final_state(run_dir), final_state(ref_dir), "checkpoint", approx)


def assert_exact(run_dir: Path, ref_dir: Path) -> None:
    assert_same_run(run_dir, ref_dir)
    assert_same_state(run_dir, ref_dir)
    assert verify_run(run_dir).ok


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted run of a config, made once per module and config (several tests kill
    one config at different points): ``references(data, clients)`` gives its folder, which
    tests only read."""
    made: dict[str, Path] = {}

    def reference(data: dict, clients) -> Path:
        key = json.dumps(data, sort_keys=True)
        if key not in made:
            ref = tmp_path_factory.mktemp("reference") / "reference"
            Simulation(parse_config(data), ref, clients=clients).run()
            made[key] = ref
        return made[key]
    return reference


def crash_and_resume(data: dict, tmp_path: Path, clients, point: str,
                     references=None) -> tuple[Path, Path]:
    """An uninterrupted run and one killed at ``point`` then resumed, of the same config (the
    uninterrupted one from ``references`` when given)."""
    cfg = parse_config(data)
    ref, run = tmp_path / "reference", tmp_path / "run"
    if references is None:
        Simulation(cfg, ref, clients=clients).run()
    else:
        ref = references(data, clients)
    assert run_until_crash(cfg, run, clients, point)
    Simulation(cfg, run, clients=clients).run(resume=True)
    return run, ref


# fedora (noised summaries: gates 1-3), rounds 1-2 gates 4-9; fedavg's rounds gates 10-15
@pytest.mark.parametrize("point", ["checkpoint_written@1", "gate@8", "release@9", "gate@14"],
                         ids=["between-rounds", "fedora-round2-ledgered", "fedora-round2-journaled",
                              "fedavg-round2-ledgered"])
def test_the_batched_engine_under_dp_resumes_exactly(tmp_path, clients, references, point):
    data = config_dict(["fedora", "fedavg"], True, engine="batched")
    run, ref = crash_and_resume(data, tmp_path, clients, point, references)
    assert_exact(run, ref)
    methods = json.loads((run / "results.json").read_text())["methods"]
    for name in ("fedora", "fedavg"):
        engine = methods[name]["extra"]["training_engine"]
        assert engine["runs"] == {"linear": 2} and engine["fallbacks"] == []  # batched throughout


def _releases_through(run_dir: Path, method: str, last_round: int) -> int:
    return sum(1 for path in (run_dir / "ledgers" / method).glob("*.jsonl")
               for e in read_ledger(path) if e["mechanism"] != "close" and e["round"] <= last_round)


def test_partial_participation_with_late_joiners_redoes_rounds_after_the_checkpoint(tmp_path,
                                                                                   clients):
    """participation 0.5 of 3 clients, checkpoints after rounds 2 and 4: a kill inside round 3
    resumes from round 2 and re-does round 3 with the same participants and noise; each of its
    releases is in the ledger once."""
    data = config_dict(["fedora"], True, rounds=4, participation=0.5, checkpoint_every=2)
    cfg = parse_config(data)
    ref, run = tmp_path / "reference", tmp_path / "run"
    Simulation(cfg, ref, clients=clients).run()
    first = {p.stem: min(e["round"] for e in read_ledger(p) if e["mechanism"] == "dpsgd")
             for p in (ref / "ledgers" / "fedora").glob("*.jsonl")}
    assert max(first.values()) > 1, first  # a client joins after round 1
    # the second release of round 3: one round-3 release ledgered, journaled and left
    point = f"gate@{_releases_through(ref, 'fedora', 2) + 2}"
    assert run_until_crash(cfg, run, clients, point)
    assert load_checkpoint(run / "checkpoints" / "fedora.pt")["round"] == 2
    assert _releases_through(run, "fedora", 3) == _releases_through(ref, "fedora", 2) + 2
    Simulation(cfg, run, clients=clients).run(resume=True)
    assert_exact(run, ref)


def test_partial_participation_killed_before_an_unwritten_checkpoint_resumes_exactly(tmp_path,
                                                                                    clients):
    data = config_dict(["fedora", "fedavg"], True, rounds=4, participation=0.5,
                       checkpoint_every=2)
    run, ref = crash_and_resume(data, tmp_path, clients, "checkpoint@3")
    assert_exact(run, ref)


# test_amend_resume's setting: with this seed client 1's round-1 pull overflows unbounded
PULL_DIVERGES = {
    "name": "pull-diverges", "seed": 5, "methods": ["fedora"],
    "data": {"num_clients": 3, "train_per_client": 32, "val_per_client": 4,
             "test_per_client": 16, "groups": 3, "validation": "private"},
    "training": {"rounds": 3, "local_epochs": 4, "batch_size": 8, "lr": 0.05,
                 "checkpoint_every": 1},
    "fedora": {"k": 1, "relatedness": "noised"},
    "privacy": {"enabled": True, "epsilon": 0.1, "delta": 1e-3, "noise": "reproducible"},
}


@pytest.mark.parametrize("point", ["checkpoint@1", "train@5", "gate@9"])
def test_a_pull_bounded_by_max_pull_resumes_exactly_after_a_kill(tmp_path, references, point):
    data = json.loads(json.dumps(PULL_DIVERGES))
    data["fedora"]["max_pull"] = 0.5
    clients = build_clients(parse_config(data))
    run, ref = crash_and_resume(data, tmp_path, clients, point, references)
    # round 1: client 1's lambda bounded to max_pull / lr = 10, the others' 0 (the run without
    # max_pull stops there, see test_amend_resume.py)
    first = (ref / "rounds.csv").read_text().splitlines()[1].split(",")
    assert float(first[5]) == pytest.approx(10 / 3) and first[7] == "0.0"
    assert_exact(run, ref)


def _without_ciphertext_sizes(run_dir: Path) -> dict:
    # CKKS ciphertexts are randomized: their serialized sizes differ between any two runs
    results = json.loads((run_dir / "results.json").read_text())
    for body in results["methods"].values():
        for key in TIMING:
            body.pop(key, None)
    for spent in results.get("privacy", {}).values():
        spent.pop("resumes", None)  # what a resume re-made or trained again: its own record
        for client in spent["clients"]:
            client.pop("ledger_head")

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if "bytes" not in k}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return strip(results)


# under DP: after client 1's summary left, before client 2's; without DP the summaries have no
# crash point (nothing of them is recorded): round 1, after client 1 trained
@pytest.mark.parametrize(("dp", "point"), [(False, "train@2"), (True, "summary@2")],
                         ids=["plain", "dp"])
def test_encrypted_relatedness_killed_in_round_1_resumes_exactly(tmp_path, clients, dp, point):
    data = config_dict(["fedora"], dp)
    data["fedora"]["relatedness"] = "noised+encrypted" if dp else "encrypted"
    run, ref = crash_and_resume(data, tmp_path, clients, point)
    if dp:  # the resume is recorded (results.json's privacy section), the uninterrupted run has none
        recorded = json.loads((run / "results.json").read_text())["privacy"]["fedora"]
        assert recorded["resumes"] and "resumes" not in json.loads(
            (ref / "results.json").read_text())["privacy"]["fedora"]
    assert _without_ciphertext_sizes(run) == _without_ciphertext_sizes(ref)
    assert (run / "rounds.csv").read_text() == (ref / "rounds.csv").read_text()
    assert comparable_ledgers(run) == comparable_ledgers(ref)
    # overlaps decrypted from CKKS carry its noise (two uninterrupted runs differ by ~1.5e-5)
    # and ciphertext sizes and timings vary; all are recomputed when the resume starts over;
    # everything derived from them is exact
    assert_same_state(run, ref, approx=(".relatedness.overlaps", "bytes", ".timings."))
    assert verify_run(run).ok


@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_under_dp_killed_before_a_journaled_release_leaves_resumes(tmp_path,
                                                                                 clients, method):
    # release 5: round 2, client 1's journal record durable, its update not yet sent
    run, ref = crash_and_resume(config_dict([method], True), tmp_path, clients, "release@5")
    assert_exact(run, ref)


def _cell_results(out: Path) -> dict:
    docs = {}
    for path in sorted(out.glob("cells/*/*/*/cell.json")):
        doc = json.loads(path.read_text())
        for body in doc["results"]["methods"].values():
            for key in TIMING:
                body.pop(key, None)
        for spent in doc["results"]["privacy"].values():
            spent.pop("resumes", None)  # an interrupted cell's own record of its resume
            for client in spent["clients"]:
                client.pop("ledger_head")
        docs[str(path.relative_to(out))] = (doc["entries"], doc["results"])
    return docs


class Stop(Exception):
    pass


def test_a_dp_sweep_interrupted_between_and_inside_cells_continues_exactly(tmp_path):
    cfg = parse_config(config_dict(["local"], True))
    methods, epsilons = ["local", "fedavg", "fedprox"], [4.0]
    order: list[str] = []
    run_sweep(cfg, tmp_path / "ref", methods, [0], epsilons,
              on_cell=lambda cell, index, total, skipped: order.append(cell.key))

    def stop_before_second(cell, index, total, skipped):
        if index == 1 and not skipped:
            raise Stop

    cut = tmp_path / "cut"
    with pytest.raises(Stop):  # between cells: the first finished, the second not started
        run_sweep(cfg, cut, methods, [0], epsilons, on_cell=stop_before_second)
    with crashes_at("release@5"):  # inside the second cell: round 2, a journaled release
        run_sweep(cfg, cut, methods, [0], epsilons)
    # the second cell finishes (its "results" is hit 1); the third trained, no results.json
    with crashes_at("results@2"):
        run_sweep(cfg, cut, methods, [0], epsilons)
    assert (cut / "cells" / order[1] / "cell.json").exists()
    assert not (cut / "cells" / order[2] / "results.json").exists()
    done = run_sweep(cfg, cut, methods, [0], epsilons)
    assert done.skipped == order[:2]
    assert (cut / "sweep.csv").read_text() == (tmp_path / "ref" / "sweep.csv").read_text()
    assert _cell_results(cut) == _cell_results(tmp_path / "ref")
    for cell in cut.glob("cells/*/*/*"):
        assert verify_run(cell).ok, cell
        assert comparable_ledgers(cell) == comparable_ledgers(
            tmp_path / "ref" / cell.relative_to(cut))


@pytest.mark.slow
def test_sigkill_of_a_batched_run_with_partial_participation_then_resume_is_exact(tmp_path):
    """The real kill -9 (no finally blocks, no lock release) under the batched engine with
    participation 0.5 and checkpoints every 2 rounds: killed in round 3 between a release's
    ledger entry and its journal record, resumed from round 2's checkpoint."""
    tomli_w = pytest.importorskip("tomli_w")
    cfg_path = tmp_path / "config.toml"
    data = config_dict(["fedora"], True, rounds=4, participation=0.5, checkpoint_every=2,
                       engine="batched")
    # fixed noise: each fresh process would otherwise calibrate the same plan again
    data["privacy"].update(noise_multiplier=2.0, summary_noise_multiplier=3.6)
    cfg_path.write_text(tomli_w.dumps(data))
    ref = tmp_path / "ref"
    Simulation(parse_config(data), ref).run()
    point = f"gate@{_releases_through(ref, 'fedora', 2) + 1}"
    killed = _subprocess_run(cfg_path, tmp_path / "cut", False, crash=point)
    assert killed.returncode == -9, killed.stderr
    resumed = _subprocess_run(cfg_path, tmp_path / "cut", True)
    assert resumed.returncode == 0, resumed.stderr
    assert_exact(tmp_path / "cut", ref)


def _numbers(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    methods = {name: {k: v for k, v in body.items() if k not in TIMING}
               for name, body in results["methods"].items()}
    epsilons = {name: [c["epsilon_spent"] for c in spent["clients"]]
                for name, spent in results["privacy"].items()}
    return {"methods": methods, "epsilon": epsilons,
            "rounds": (run_dir / "rounds.csv").read_text()}


@pytest.mark.parametrize("point", ["train@5", "gate@9"])
def test_checkpoint_every_auto_killed_and_resumed_equals_every_round(tmp_path, clients, references,
                                                                    point):
    """``checkpoint_every`` only changes when checkpoints are written: a run under "auto"
    (checkpoints where the clock puts them) killed and resumed has the numbers, spending,
    ledger entries and final state of one checkpointed every round."""
    data = config_dict(["fedora", "fedavg"], True, rounds=3, participation=0.5,
                       checkpoint_every="auto")
    run, ref = crash_and_resume(data, tmp_path, clients, point, references)
    assert_exact(run, ref)
    every = references({**data, "training": {**data["training"], "checkpoint_every": 1}}, clients)
    assert _numbers(run) == _numbers(every)
    assert comparable_ledgers(run) == comparable_ledgers(every)
    assert_same_state(run, every)


@pytest.mark.parametrize("method", ["fedora", *BASELINES])
def test_every_method_batched_with_partial_participation_redoes_rounds_exactly(tmp_path, clients,
                                                                               method):
    """All at once: DP, the batched engine, participation 0.5, checkpoints every 2 rounds; a
    kill in round 3 after one of its releases left re-does round 3 from round 2's checkpoint."""
    data = config_dict([method], True, rounds=3, participation=0.5, checkpoint_every=2,
                       engine="batched")
    if method == "fedora":
        data["data"]["validation"] = "private"  # each round also releases a noised lambda
    cfg = parse_config(data)
    ref, run = tmp_path / "reference", tmp_path / "run"
    Simulation(cfg, ref, clients=clients).run()
    summaries = 3 if method == "fedora" else 0
    releases = sum(1 for path in (ref / "ledgers" / method).glob("*.jsonl")
                   for e in read_ledger(path) if e["mechanism"] == "dpsgd" and e["round"] <= 2)
    assert run_until_crash(cfg, run, clients, f"release@{summaries + releases + 1}")
    assert load_checkpoint(run / "checkpoints" / f"{method}.pt")["round"] == 2
    assert _releases_through(run, method, 3) > _releases_through(ref, method, 2)  # round 3's
    Simulation(cfg, run, clients=clients).run(resume=True)
    assert_exact(run, ref)


@pytest.mark.parametrize("second", ["release@1", "train@2", "checkpoint@1"])
def test_a_kill_while_re_doing_rounds_then_resume_is_exact(tmp_path, clients, second):
    """Killed in round 4 (checkpoint after round 2), then killed again while the resume re-does
    rounds 3-4 (replaying journaled releases), then resumed: still exact, each release once."""
    data = config_dict(["fedora", "fedavg"], True, rounds=4, participation=0.5,
                       checkpoint_every=2)
    cfg = parse_config(data)
    ref, run = tmp_path / "reference", tmp_path / "run"
    Simulation(cfg, ref, clients=clients).run()
    assert run_until_crash(cfg, run, clients, f"gate@{_releases_through(ref, 'fedora', 3) + 1}")
    assert load_checkpoint(run / "checkpoints" / "fedora.pt")["round"] == 2
    assert run_until_crash(cfg, run, clients, second, resume=True)
    Simulation(cfg, run, clients=clients).run(resume=True)
    assert_exact(run, ref)


@pytest.mark.parametrize("point", ["checkpoint_written@1", "train@5"])
def test_a_batched_run_that_falls_back_to_the_loop_resumes_with_the_same_record(tmp_path, clients,
                                                                                point):
    """A model the batched engine cannot reproduce (dropout) falls back to the loop; the
    resumed run records the same engine runs and fallbacks as the uninterrupted one."""
    data = config_dict(["fedora", "local"], True, engine="batched", participation=0.5)
    data["model"] = {"factory": "tests.secure_fedora.runtimes.stochastic_model:dropout_mlp"}
    run, ref = crash_and_resume(data, tmp_path, clients, point)
    assert_exact(run, ref)
    engine = json.loads((run / "results.json").read_text())["methods"]["fedora"]["extra"][
        "training_engine"]
    assert engine["fallbacks"], engine
