"""The in-process runtime: rounds, baselines, partial participation, checkpoints, resume."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from secure_fedora.core.config import (
    ConfigError,
    config_hash,
    parse_config,
    participants_per_round,
)
from secure_fedora.runtimes.inprocess import (
    CheckpointError,
    Simulation,
    build_clients,
    load_checkpoint,
    sample_participants,
    save_checkpoint,
)


def tiny(**overrides):
    base = {
        "name": "tiny",
        "seed": 1,
        "methods": ["fedora", "local", "fedavg"],
        "data": {"num_clients": 5, "train_per_client": 32, "val_per_client": 16, "test_per_client": 32},
        "training": {"rounds": 3, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "fedavg": {"finetune_epochs": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return parse_config(base)


@pytest.fixture(scope="module")
def tiny_clients():
    return build_clients(tiny())


def test_run_writes_results_and_learns(tmp_path, tiny_clients):
    cfg = tiny(training={"rounds": 4, "local_epochs": 3, "lr": 0.1})
    sim = Simulation(cfg, tmp_path, clients=tiny_clients)
    results = sim.run()
    assert set(results["methods"]) == {"fedora", "local", "fedavg", "fedavg_ft"}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"]["fedora"]["selected"]["per_client"] == results["methods"]["fedora"]["selected"]["per_client"]
    for body in results["methods"].values():
        s = body["selected"]
        assert s["min"] <= s["mean"] <= s["max"]
        assert len(s["per_client"]) == 5
    assert results["methods"]["local"]["selected"]["mean"] > 0.3  # learns well beyond chance (0.1)
    rows = (tmp_path / "rounds.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 4
    assert results["assumptions"]["validation_data"] == "public"


def test_fedora_neighbours_follow_rotation():
    cfg = parse_config({"data": {"num_clients": 36, "train_per_client": 128, "val_per_client": 4,
                                 "test_per_client": 4}, "methods": ["fedora"]})
    sim = Simulation(cfg, "/nonexistent-unused", clients=build_clients(cfg))
    ctx = sim.context_factory(cfg, sim.clients)
    method = sim.method_factory("fedora", ctx, cfg)
    method.setup()
    graph = method.relatedness.graph
    # rotations by 10 degree steps: the top-2 neighbours are (almost always) within 20 degrees
    near = 0
    for i in range(36):
        neighbours = torch.nonzero(graph[i]).flatten().tolist()
        near += all(min((i - j) % 36, (j - i) % 36) <= 2 for j in neighbours)
    assert near >= 32


def test_resume_continues_to_identical_result(tmp_path, tiny_clients):
    cfg = tiny(training={"rounds": 4, "participation": 0.6})
    full = Simulation(cfg, tmp_path / "full", clients=tiny_clients).run()

    interrupted_cfg = tiny(training={"rounds": 4, "participation": 0.6})
    first = Simulation(interrupted_cfg, tmp_path / "cut", clients=tiny_clients)

    class Stop(Exception):
        pass

    def stop_after_two(method, rnd, total):
        if method == "local" and rnd == 2:
            raise Stop

    first.progress = stop_after_two
    with pytest.raises(Stop):
        first.run()
    resumed = Simulation(interrupted_cfg, tmp_path / "cut", clients=tiny_clients).run(resume=True)
    for name in full["methods"]:
        assert resumed["methods"][name]["selected"] == full["methods"][name]["selected"], name
    full_csv = (tmp_path / "full" / "rounds.csv").read_text()
    assert (tmp_path / "cut" / "rounds.csv").read_text() == full_csv


def test_a_resume_removes_interrupted_result_writes(tmp_path, tiny_clients):
    """A process killed while writing results.json, rounds.csv or a plot leaves a hidden partial
    copy beside it (atomic_write_text's temporary file); only Flower removed such copies, an
    in-process run or resume kept them for good. Now the run removes them and nothing else."""
    cfg = tiny(methods=["local"], training={"rounds": 1})
    run = tmp_path / "run"
    Simulation(cfg, run, clients=tiny_clients).run()
    leftovers = [run / ".results.json.k2x9_a", run / ".rounds.csv.7qpz1m",
                 run / "plots" / ".accuracy_per_round.png.a1b2c3"]
    kept = [run / ".notes.txt.a1b2c3", run / "plots" / "mine.png"]
    for path in leftovers + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("{\"partial")
    Simulation(cfg, run, clients=tiny_clients).run(resume=True)
    assert not any(path.exists() for path in leftovers)
    assert all(path.read_text() == "{\"partial" for path in kept)
    assert json.loads((run / "results.json").read_text())["methods"]["local"]


def test_partial_participation_leaves_others_untouched(tiny_clients):
    cfg = tiny(training={"rounds": 1, "participation": 0.4}, methods=["local"])
    sim = Simulation(cfg, "/nonexistent-unused", clients=tiny_clients)
    ctx = sim.context_factory(cfg, sim.clients)
    method = sim.method_factory("local", ctx, cfg)
    before = method.theta.clone()
    participants = sim._participants(torch.Generator().manual_seed(0), 5)
    assert len(participants) == 2
    method.train_round(1, participants)
    changed = [i for i in range(5) if not torch.equal(before[i], method.theta[i])]
    assert changed == participants


@pytest.mark.parametrize(("fraction", "n", "expected"),
                         [(0.07, 100, 7), (0.28, 25, 7), (0.55, 100, 55), (0.14, 50, 7),
                          (0.4, 5, 2), (0.41, 5, 3), (1e-9, 3, 1), (0.999, 3, 3), (1.0, 4, 4)])
def test_participants_per_round_is_the_ceiling_of_the_stated_fraction(fraction, n, expected):
    """ceil(participation * N) of the decimal the config states: 0.07 of 100 clients is 7,
    although the float product 0.07 * 100 is 7.000000000000001."""
    assert participants_per_round(fraction, n) == expected
    chosen = sample_participants(torch.Generator().manual_seed(0), n, fraction)
    assert len(chosen) == expected and chosen == sorted(set(chosen))


def test_corrupt_checkpoint_is_refused(tmp_path, tiny_clients):
    cfg = tiny(training={"rounds": 2}, methods=["local"])
    Simulation(cfg, tmp_path, clients=tiny_clients).run()
    ckpt = tmp_path / "checkpoints" / "local.pt"
    data = bytearray(ckpt.read_bytes())
    ckpt.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="corrupt"):
        Simulation(cfg, tmp_path, clients=tiny_clients).run(resume=True)


def test_checkpoint_from_other_config_is_refused(tmp_path, tiny_clients):
    Simulation(tiny(training={"rounds": 2}, methods=["local"]), tmp_path, clients=tiny_clients).run()
    other = tiny(training={"rounds": 2, "lr": 0.01}, methods=["local"])
    with pytest.raises(CheckpointError, match="config hash"):
        Simulation(other, tmp_path, clients=tiny_clients).run(resume=True)


def test_a_checkpoint_copied_to_another_methods_file_is_refused(tmp_path, tiny_clients):
    """Local resumed from FedAvg's checkpoint used to report FedAvg's accuracy as Local's."""
    cfg = tiny(training={"rounds": 2}, methods=["local", "fedavg"])
    Simulation(cfg, tmp_path, clients=tiny_clients).run()
    ckpt = tmp_path / "checkpoints"
    (ckpt / "local.pt").write_bytes((ckpt / "fedavg.pt").read_bytes())
    (tmp_path / "results.json").unlink()
    rounds = (tmp_path / "rounds.csv").read_text()
    with pytest.raises(CheckpointError, match="written by method 'fedavg', not 'local'"):
        Simulation(cfg, tmp_path, clients=tiny_clients).run(resume=True)
    assert (tmp_path / "rounds.csv").read_text() == rounds  # nothing rewritten


def test_checkpoint_with_nan_parameters_is_refused(tmp_path, tiny_clients):
    cfg = tiny(training={"rounds": 2}, methods=["local"])
    sim = Simulation(cfg, tmp_path, clients=tiny_clients)

    class Crash(Exception):
        pass

    def crash(method, rnd, total):
        raise Crash

    sim.progress = crash
    with pytest.raises(Crash):
        sim.run()
    ckpt = tmp_path / "checkpoints" / "local.pt"
    state = load_checkpoint(ckpt)
    state["method"]["theta"][0, 0] = float("nan")
    save_checkpoint(ckpt, state)  # re-sealed: the digest holds, the values are refused
    with pytest.raises(CheckpointError, match="non-finite"):
        Simulation(cfg, tmp_path, clients=tiny_clients).run(resume=True)


def test_power_propagation_gives_same_result_as_dense(tmp_path, tiny_clients):
    dense = Simulation(tiny(methods=["fedora"]), tmp_path / "d", clients=tiny_clients).run()
    power = Simulation(tiny(methods=["fedora"], fedora={"propagation": "power"}), tmp_path / "p",
                       clients=tiny_clients).run()
    a = dense["methods"]["fedora"]["selected"]["per_client"]
    b = power["methods"]["fedora"]["selected"]["per_client"]
    assert a == pytest.approx(b, abs=1e-6)


# --------------------------------------------------------------------------- checkpoint integrity
# Regression tests for issue 14 "Why" 6: flipped bytes and edited weights changed results silently.


def _finished_local_run(tmp_path, tiny_clients):
    cfg = tiny(training={"rounds": 2}, methods=["local"])
    results = Simulation(cfg, tmp_path, clients=tiny_clients).run()
    return cfg, tmp_path / "checkpoints" / "local.pt", results


def test_flipped_checkpoint_byte_is_refused_naming_the_file(tmp_path, tiny_clients):
    cfg, ckpt, _ = _finished_local_run(tmp_path, tiny_clients)
    data = bytearray(ckpt.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest") as err:
        Simulation(cfg, tmp_path, clients=tiny_clients).run(resume=True)
    assert str(ckpt) in str(err.value)


def test_edited_weights_without_a_new_digest_are_refused(tmp_path, tiny_clients):
    cfg, ckpt, _ = _finished_local_run(tmp_path, tiny_clients)
    raw = ckpt.read_bytes()
    header_end = raw.index(b"\n", len(b"SFCKPT2\n")) + 1
    state = load_checkpoint(ckpt)
    state["method"]["theta"][0] += 0.5  # a plausible, finite edit
    buf = io.BytesIO()
    torch.save(state, buf)
    ckpt.write_bytes(raw[:header_end] + buf.getvalue())
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)


def test_checkpoint_run_binding_is_checked(tmp_path, tiny_clients):
    cfg, ckpt, _ = _finished_local_run(tmp_path, tiny_clients)
    raw = ckpt.read_bytes()
    forged = raw.replace(config_hash(cfg).encode(), b"0" * 64, 1)
    assert forged != raw
    ckpt.write_bytes(forged)
    with pytest.raises(CheckpointError, match="run binding"):
        load_checkpoint(ckpt)


def test_checkpoint_without_digest_and_foreign_objects_are_refused_plainly(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"round": 1}, legacy)
    with pytest.raises(CheckpointError, match="without integrity digest"):
        load_checkpoint(legacy)
    # a sealed checkpoint holding an object weights_only refuses: no "weights_only=False" advice
    foreign = tmp_path / "foreign.pt"
    save_checkpoint(foreign, {"round": 1, "payload": _Foreign()})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(foreign)
    assert str(foreign) in str(err.value) and "weights_only" not in str(err.value)
    assert "never loaded" in str(err.value)


class _Foreign:
    pass


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_checkpoint_that_is_no_regular_file_is_refused_at_once(tmp_path, kind):
    """A checkpoint replaced by a FIFO blocked load_checkpoint, and so `run --resume`,
    forever (found by generated corruptions of a run's files); a link to /dev/zero was
    already refused, and both now name the file as unreadable."""
    import os

    path = tmp_path / "fedora.pt"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is unreadable: not a regular file"):
        load_checkpoint(path)


def test_resealed_checkpoint_resumes_to_the_same_result(tmp_path, tiny_clients):
    cfg, ckpt, results = _finished_local_run(tmp_path, tiny_clients)
    save_checkpoint(ckpt, load_checkpoint(ckpt))
    again = Simulation(cfg, tmp_path, clients=tiny_clients).run(resume=True)
    assert again["methods"] == results["methods"]


# VmHWM is this process's own peak (getrusage's maxrss also counts the parent's memory that a
# vfork + exec child inherits the high-water mark of).
_LOAD_PEAK = """
import sys
from pathlib import Path
from secure_fedora.runtimes.inprocess import load_checkpoint
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
before = status("VmRSS")
state = load_checkpoint(Path(sys.argv[1]))
print(status("VmHWM") - before, state["theta"].numel() * 4)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_loading_a_checkpoint_holds_its_state_once_not_also_the_file(tmp_path):
    """A resume at 10,000 clients loads a 4.5 GiB checkpoint: the digest is verified by
    streaming, and the state is read from the same open file, so the load costs about the
    state's size (reading the file whole first cost 2-3x)."""
    ckpt = tmp_path / "big.pt"
    save_checkpoint(ckpt, {"round": 1, "theta": torch.randn(256, 2**17)})  # 128 MiB
    out = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(ckpt)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[3])
    grown, state_bytes = map(int, out.stdout.split())
    assert grown < 1.4 * state_bytes, out.stdout


class _Interrupts:
    """Pickled inside a checkpoint's state: interrupts the write half-way (Ctrl-C)."""

    def __reduce__(self):
        raise KeyboardInterrupt


_KILLED_WHILE_WRITING = """
import os, sys, torch
from secure_fedora.runtimes.inprocess import save_checkpoint
class Killed:
    def __reduce__(self):
        os._exit(137)  # as SIGKILL: no cleanup, no flush
save_checkpoint(__import__("pathlib").Path(sys.argv[1]), {"round": 2, "theta": torch.ones(64, 300),
                                                          "killed": Killed()})
"""


def test_a_checkpoint_write_interrupted_or_killed_leaves_the_previous_one_whole(tmp_path):
    """Checkpoints stay atomic: a write interrupted half-way (an exception, or the process
    killed) leaves the previous checkpoint byte for byte, loadable, and nothing else but, after
    a kill, the temporary copy a resume removes."""
    ckpt = tmp_path / "checkpoints" / "fedora.pt"
    save_checkpoint(ckpt, {"round": 1, "theta": torch.zeros(64, 300)})
    before = ckpt.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, {"round": 2, "theta": torch.ones(64, 300), "stop": _Interrupts()})
    assert ckpt.read_bytes() == before and load_checkpoint(ckpt)["round"] == 1
    assert [p.name for p in ckpt.parent.iterdir()] == ["fedora.pt"]
    done = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(ckpt)],
                          cwd=Path(__file__).resolve().parents[3], capture_output=True)
    assert done.returncode == 137, done.stderr
    assert ckpt.read_bytes() == before and load_checkpoint(ckpt)["round"] == 1
    leftovers = [p for p in ckpt.parent.iterdir() if p != ckpt]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".fedora.pt.")


def test_a_changed_byte_deep_in_a_streamed_checkpoint_is_found(tmp_path, monkeypatch):
    import secure_fedora.runtimes.inprocess as runtime

    monkeypatch.setattr(runtime, "_DIGEST_CHUNK", 4096)  # the digest read in many chunks
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, {"round": 3, "theta": torch.randn(64, 300)})
    assert load_checkpoint(ckpt)["round"] == 3
    raw = bytearray(ckpt.read_bytes())
    raw[-5000] ^= 1
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(ckpt)
    raw[-5000] ^= 1
    ckpt.write_bytes(bytes(raw) + b"\0")
    with pytest.raises(CheckpointError, match="truncated or extended"):
        load_checkpoint(ckpt)


def test_an_unused_lambda_noise_is_said_not_ignored_silently(tmp_path, caplog):
    """privacy.lambda_noise_multiplier with public validation data was accepted and ignored
    without a word (it stays loadable: older runs' configs may carry it)."""
    import logging

    from secure_fedora.core.config import parse_config

    cfg = parse_config({"methods": ["local"], "data": {"num_clients": 2, "train_per_client": 20,
                        "val_per_client": 8, "test_per_client": 8, "groups": 2},
                        "training": {"rounds": 1},
                        "privacy": {"enabled": True, "epsilon": 4.0, "delta": 1e-3,
                                    "lambda_noise_multiplier": 2.0}})
    with caplog.at_level(logging.WARNING):
        Simulation(cfg, tmp_path / "run", keystore=tmp_path / "store").run()
    assert any("lambda_noise_multiplier = 2 is unused" in r.getMessage() for r in caplog.records)


def test_rounds_csv_keeps_the_rounds_between_evaluations(tmp_path, tiny_clients):
    """With evaluation.every > 1 only evaluated rounds had a row, so the other rounds'
    statistics (FEDORA's unstable_pulls, mean_lambda, participants, steps) were not written
    anywhere; every round now has its row, the evaluation columns empty where not evaluated."""
    import csv

    cfg = tiny(methods=["fedora"], training={"rounds": 5}, evaluation={"every": 2})
    results = Simulation(cfg, tmp_path, clients=tiny_clients).run()
    with open(tmp_path / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert float(r["steps"]) > 0 and r["unstable_pulls"] != "" and r["participants"] == "5"
        assert (r["test_mean"] != "") == (int(r["round"]) in (2, 4, 5))
    assert results["methods"]["fedora"]["selected"]["round"] in (2, 4, 5)


def test_a_later_methods_plan_over_budget_refuses_the_run_before_any_method_trains(tmp_path):
    """With a fixed noise multiplier that fits Local's plan but not FEDORA's (its summary and
    lambda releases add to DP-SGD's), Simulation.run (the Python API's path) trained and
    ledgered Local, then refused FEDORA saying 'nothing was trained'; the CLI checked every
    plan first. Now the run is refused before anything is written."""
    from secure_fedora.secure.private import BudgetPlanError

    cfg = tiny(methods=["local", "fedora"], data={"num_clients": 3, "partition": "iid",
                                                  "train_per_client": 40, "val_per_client": 10,
                                                  "test_per_client": 10},
               training={"rounds": 5, "local_epochs": 1, "batch_size": 8},
               fedora={"relatedness": "noised"},
               privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible",
                        "noise_multiplier": 0.78})
    sim = Simulation(cfg, tmp_path / "run", keystore=tmp_path / "store")
    sim.budget_plans("local")  # Local alone fits
    with pytest.raises(BudgetPlanError, match="'fedora' over budget"):
        sim.run()
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_a_registered_datasets_data_gets_the_user_data_checks():
    """A dataset registered in DATASETS (an extension point, like data.source) skipped the
    checks of user data: NaN test inputs trained and reported accuracy from NaN outputs, and
    an exception of the dataset function was a raw traceback. Now both are DataErrors."""
    from secure_fedora.core.registry import DATASETS
    from secure_fedora.data.partition import LabeledDataset
    from secure_fedora.data.sources import DataError

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 4, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    test_x = x[150:].clone()
    test_x[7, 2] = float("nan")

    def nan_test(seed):
        return LabeledDataset(x[:150], y[:150], test_x, y[150:], 3)

    def failing(seed):
        raise OSError("no such file: data.npz")

    data = {"partition": "iid", "num_clients": 2, "train_per_client": 20, "val_per_client": 5,
            "test_per_client": 5}
    DATASETS.register("test-nan-inputs", nan_test)
    DATASETS.register("test-failing-source", failing)
    try:
        with pytest.raises(DataError, match="'test-nan-inputs' test_x contains NaN"):
            build_clients(tiny(data={**data, "dataset": "test-nan-inputs"}, methods=["local"]))
        with pytest.raises(DataError, match="'test-failing-source' raised OSError: no such file"):
            build_clients(tiny(data={**data, "dataset": "test-failing-source"}, methods=["local"]))
    finally:
        DATASETS.unregister("test-nan-inputs")
        DATASETS.unregister("test-failing-source")


def test_resuming_a_finished_method_with_another_model_is_a_checkpoint_error(tmp_path):
    """A run resumed through the Python API with a model of other parameter shapes failed with
    a raw ValueError from the finished method's checkpoint; now a CheckpointError naming the
    file, with the run directory unchanged."""
    from torch import nn

    from secure_fedora.api import Experiment
    from tests.secure_fedora.core.crash_support import crashes_at

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    data = {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}
    config = {"methods": ["local", "fedavg"], "training": {"rounds": 1, "batch_size": 8},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 20,
                       "val_per_client": 5, "test_per_client": 5}}

    def hidden(shape, k):
        return nn.Sequential(nn.Linear(shape[0], 8), nn.ReLU(), nn.Linear(8, k))

    def linear(shape, k):
        return nn.Sequential(nn.Linear(shape[0], k))

    run_dir = tmp_path / "run"
    with crashes_at("between_methods"):
        Experiment(config, data=data, model=hidden, run_dir=run_dir).run()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="local.pt was written for another model"):
        Experiment(config, data=data, model=linear, run_dir=run_dir).run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def _api_run_killed_after_a_checkpoint(run_dir, factory):
    """An API run of ``factory``'s model killed after local's round-1 checkpoint; returns its
    data and config."""
    from secure_fedora.api import Experiment
    from tests.secure_fedora.core.crash_support import crashes_at

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 4, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    data = {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}
    config = {"methods": ["local", "fedavg"],
              "training": {"rounds": 2, "batch_size": 8, "checkpoint_every": 1},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 20,
                       "val_per_client": 5, "test_per_client": 5}}
    with crashes_at("checkpoint_written"):
        Experiment(config, data=data, model=factory, run_dir=run_dir).run()
    return data, config


@pytest.mark.parametrize("swapped", ["activation", "order"])
def test_resuming_with_another_model_of_the_same_shapes_is_a_checkpoint_error(tmp_path, swapped):
    """A model given in Python could be swapped between a run and its resume for another of
    the same parameter shapes (ReLU for Tanh, or equal layers reordered) and the resume went on
    silently, mixing two architectures; the checkpoint now records the model's architecture
    and the resume is refused, naming the first differing module, with nothing written."""
    from torch import nn

    from secure_fedora.api import Experiment

    def first(shape, k):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, k))

    def second(shape, k):
        if swapped == "activation":
            return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                                 nn.Linear(4, k))
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, k))

    run_dir = tmp_path / "run"
    data, config = _api_run_killed_after_a_checkpoint(run_dir, first)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"local.pt was written for another model "
                                              r"\('1: torch.nn.modules.activation.ReLU\(\)' there and "
                                              r"'1: torch.nn.modules.activation.Tanh\(\)' here\)"):
        Experiment(config, data=data, model=second, run_dir=run_dir).run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    resumed = Experiment(config, data=data, model=first, run_dir=run_dir).run(resume=True)
    assert resumed.method_names == ["local", "fedavg", "fedavg_ft"]


@pytest.mark.parametrize("point", ["ledgers_created", "keys_published", "train@2"])
def test_a_dp_run_killed_before_its_first_checkpoint_refuses_a_swapped_model(tmp_path, point):
    """Under DP, killed before its first checkpoint (its ledgers created, possibly round 1's
    releases made): the model's fingerprint was only in checkpoints, so a same-shape model
    swapped in from Python resumed silently, releasing round 1 again from another model. The
    ledger folder records the model with its ledgers (model.json, before the first release):
    the resume is a CheckpointError naming it, with nothing written, and the run's own model
    resumes."""
    from torch import nn

    from secure_fedora.api import Experiment
    from tests.secure_fedora.core.crash_support import crashes_at

    def first(shape, k):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, k))

    def second(shape, k):
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, k))

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 4, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    data = {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}
    config = {"name": "swap", "methods": ["local"],
              "training": {"rounds": 2, "batch_size": 8, "checkpoint_every": 1},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 20,
                       "val_per_client": 5, "test_per_client": 5},
              "privacy": {"enabled": True, "epsilon": 4.0, "delta": 1e-3}}
    run_dir = tmp_path / "run"
    with crashes_at(point):
        Experiment(config, data=data, model=first, run_dir=run_dir).run()
    assert not (run_dir / "checkpoints" / "local.pt").exists()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"ledgers/local/model.json records another model"
                                              r" than this one \('1: torch.nn.modules.activation"
                                              r".ReLU\(\)' there and '1: torch.nn.modules"
                                              r".activation.Tanh\(\)' here\)"):
        Experiment(config, data=data, model=second, run_dir=run_dir).run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    resumed = Experiment(config, data=data, model=first, run_dir=run_dir).run(resume=True)
    assert resumed.method_names == ["local"]


def _killed_tiny_dp_run(tmp_path, name, crash_at):
    """A 2-client DP run of Local on 4-feature tabular data (an Experiment with a model given
    in Python), killed at crash point ``crash_at``: (a function making that Experiment again,
    its run directory)."""
    from torch import nn

    from secure_fedora.api import Experiment
    from tests.secure_fedora.core.crash_support import crashes_at

    def model(shape, k):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, k))

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 4, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    data = {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}
    config = {"name": name, "methods": ["local"],
              "training": {"rounds": 2, "batch_size": 8, "checkpoint_every": 1},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 20,
                       "val_per_client": 5, "test_per_client": 5},
              "privacy": {"enabled": True, "epsilon": 4.0, "delta": 1e-3}}
    run_dir = tmp_path / "run"

    def experiment():
        return Experiment(config, data=data, model=model, run_dir=run_dir)

    with crashes_at(crash_at):
        experiment().run()
    return experiment, run_dir


def test_a_dp_resume_refuses_a_damaged_model_record(tmp_path):
    """A byte changed in model.json's architecture listing (its fingerprint intact) was
    resumed from silently: only the fingerprint was compared. The record must be whole: the
    resume is a CheckpointError naming it, with nothing written (found by random damage of
    run directories)."""
    experiment, run_dir = _killed_tiny_dp_run(tmp_path, "damaged-record", "keys_published")
    record = run_dir / "ledgers" / "local" / "model.json"
    text = record.read_text()
    assert "ReLU()" in text
    record.write_text(text.replace("ReLU()", "ReLV()"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"ledgers/local/model.json is damaged"):
        experiment().run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_dp_resume_refuses_ledgers_whose_model_record_was_lost(tmp_path):
    """model.json deleted from a killed DP run's ledger folder was resumed from silently (a
    missing record was skipped), and the finished run then failed `audit verify` (results.json
    records the fingerprint, model.json missing). It is created with the ledgers, so ledgers
    without it mean it was lost: the resume is a CheckpointError naming it, with nothing
    written; the restored record resumes and verifies (found by the hunt of run-dir edits)."""
    from audits.verify import verify_run

    experiment, run_dir = _killed_tiny_dp_run(tmp_path, "lost-record", "checkpoint_written")
    record = run_dir / "ledgers" / "local" / "model.json"
    saved = record.read_bytes()
    record.unlink()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"ledgers/local/model.json is missing \(it is "
                                              r"created with the method's ledgers"):
        experiment().run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    record.write_bytes(saved)
    experiment().run(resume=True)
    assert verify_run(run_dir).ok


def _strip_model_fingerprint(path):
    state = load_checkpoint(path)
    del state["model_fingerprint"], state["model_architecture"]
    save_checkpoint(path, state)


def test_a_checkpoint_without_model_fingerprint_resumes_a_built_in_model_only(tmp_path, tiny_clients):
    """A checkpoint written before checkpoints recorded the model's architecture: a model given
    in Python cannot be matched to it (refused, nothing written); a built-in [model] name,
    fixed by the config hash, resumes as before."""
    from torch import nn

    from secure_fedora.api import Experiment

    def factory(shape, k):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, k))

    run_dir = tmp_path / "api"
    data, config = _api_run_killed_after_a_checkpoint(run_dir, factory)
    _strip_model_fingerprint(run_dir / "checkpoints" / "local.pt")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="local.pt records no model architecture"):
        Experiment(config, data=data, model=factory, run_dir=run_dir).run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    cfg = tiny(methods=["local"], training={"rounds": 2, "checkpoint_every": 1})
    full = Simulation(cfg, tmp_path / "full", clients=tiny_clients).run()
    first = Simulation(cfg, tmp_path / "cut", clients=tiny_clients)

    class Stop(Exception):
        pass

    def stop(method, rnd, total):
        raise Stop

    first.progress = stop
    with pytest.raises(Stop):
        first.run()
    _strip_model_fingerprint(tmp_path / "cut" / "checkpoints" / "local.pt")
    resumed = Simulation(cfg, tmp_path / "cut", clients=tiny_clients).run(resume=True)
    assert resumed["methods"]["local"]["selected"] == full["methods"]["local"]["selected"]


def test_a_registered_partitioners_clients_get_the_federated_data_checks():
    """A partitioner registered in PARTITIONERS skipped the checks already-federated data
    gets: a client with 60 training rows ran under privacy.delta = 0.03, above its 1/n (a delta
    that may release a record outright), and a partitioner making fewer clients than
    data.num_clients ran with them silently. Both are now DataErrors before anything trains."""
    import dataclasses

    from secure_fedora.core.registry import PARTITIONERS
    from secure_fedora.data.partition import LabeledDataset, iid_partition
    from secure_fedora.data.sources import DataError

    def quantity_skew(dataset, d, seed):  # client i holds (i + 1) x train_per_client rows
        return [dataclasses.replace(iid_partition(dataset, 1, d.train_per_client * (i + 1),
                                                  d.val_per_client, d.test_per_client, seed + i)[0],
                                    client_id=i) for i in range(d.num_clients)]

    def one_short(dataset, d, seed):
        return iid_partition(dataset, d.num_clients - 1, d.train_per_client, d.val_per_client,
                             d.test_per_client, seed)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 4, generator=gen), torch.randint(0, 3, (400,), generator=gen)
    data = LabeledDataset(x[:300], y[:300], x[300:], y[300:], 3)
    PARTITIONERS.register("test-quantity-skew", quantity_skew)
    PARTITIONERS.register("test-one-short", one_short)
    try:
        private = {"enabled": True, "delta": 0.03, "noise": "reproducible"}
        sizes = {"num_clients": 3, "train_per_client": 30, "val_per_client": 10,
                 "test_per_client": 10}
        with pytest.raises(DataError, match="client 1 has 60 training rows, so its delta = 0.03"):
            build_clients(tiny(methods=["local"], privacy=private,
                               data={**sizes, "partition": "test-quantity-skew"}), data)
        with pytest.raises(DataError, match="'test-one-short' made 2 clients but data.num_clients = 3"):
            build_clients(tiny(methods=["local"], data={**sizes, "partition": "test-one-short"}), data)
        assert len(build_clients(tiny(methods=["local"], privacy=private,
                                      data={**sizes, "partition": "iid"}), data)) == 3
    finally:
        PARTITIONERS.unregister("test-quantity-skew")
        PARTITIONERS.unregister("test-one-short")



def test_a_registered_partitioners_clients_take_the_sources_classes_and_finite_inputs():
    """A partitioner returning ClientData without meta['num_classes'] (README does not ask
    for it) gave a 3-class dataset's model 10 outputs, and a label 7 in that 3-class data
    trained silently; NaN inputs reached the first release (an SVD error, or under DP the
    noised summary); an exception in the partitioner was a bare IndexError; a client without
    training rows stopped FedAvg after its first round (per-client data refuses an empty
    split). Each is now a
    DataError before anything trains, and a well-formed plug-in gets the source's classes."""
    from secure_fedora.core.registry import PARTITIONERS
    from secure_fedora.data.partition import ClientData, LabeledDataset
    from secure_fedora.data.sources import DataError
    from secure_fedora.data.userdata import label_space

    def by_hand(dataset, d, seed, label=None, value=None, row=None):
        clients = []
        for i in range(d.num_clients):
            tr = [row] if i == 0 and isinstance(row, int) else list(range(i * 40, i * 40 + 30))
            tr = [] if i == 1 and row == "none" else tr
            va, te = list(range(i * 40 + 30, i * 40 + 40)), list(range(i * 10, i * 10 + 10))
            x, y = dataset.train_x[tr].clone(), dataset.train_y[tr].clone()
            if i == 2 and label is not None:
                y[0] = label
            if i == 2 and value is not None:
                x[0, 0] = value
            clients.append(ClientData(i, x, y, dataset.train_x[va], dataset.train_y[va],
                                      dataset.test_x[te], dataset.test_y[te]))
        return clients

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 4, generator=gen), torch.randint(0, 3, (400,), generator=gen)
    data = LabeledDataset(x[:300], y[:300], x[300:], y[300:], 3)
    plugins = {"test-by-hand": by_hand,
               "test-label-7": lambda ds, d, s: by_hand(ds, d, s, label=7),
               "test-nan": lambda ds, d, s: by_hand(ds, d, s, value=float("nan")),
               "test-out-of-range": lambda ds, d, s: by_hand(ds, d, s, row=10_000),
               "test-no-rows": lambda ds, d, s: by_hand(ds, d, s, row="none")}
    for name, fn in plugins.items():
        PARTITIONERS.register(name, fn)
    sizes = {"num_clients": 3, "train_per_client": 30, "val_per_client": 10, "test_per_client": 10}
    try:
        def build(name):
            return build_clients(tiny(methods=["local"], data={**sizes, "partition": name}), data)

        assert label_space(build("test-by-hand")) == (3, False)
        with pytest.raises(DataError, match=r"client 2: train labels must lie in 0..2; found 0..7"):
            build("test-label-7")
        with pytest.raises(DataError, match="'test-nan': client 2 train inputs contains NaN"):
            build("test-nan")
        with pytest.raises(DataError, match="'test-out-of-range' raised IndexError: index 10000"):
            build("test-out-of-range")
        with pytest.raises(DataError, match="'test-no-rows': client 1's train split is empty"):
            build("test-no-rows")
        # a Flower node answers for its own rows: client 2's are its node's to refuse
        for name in ("test-label-7", "test-nan"):
            cfg = tiny(methods=["local"], data={**sizes, "partition": name})
            assert len(build_clients(cfg, data, own=0)) == 3
            with pytest.raises(DataError, match="client 2"):
                build_clients(cfg, data, own=2) if name == "test-nan" else label_space(
                    [build_clients(cfg, data, own=2)[2]])
    finally:
        for name in plugins:
            PARTITIONERS.unregister(name)


def test_a_registered_partitioner_that_relabels_keeps_its_declared_classes():
    """A partitioner relabelling MNIST-like data to parity (labels 0..1, meta['num_classes']
    = 2, as README allows: the source's count is used only where meta has none) built a
    2-output model before; the source's-classes check refused it ('is 2 but the dataset has
    3 classes')."""
    import dataclasses

    from secure_fedora.core.registry import PARTITIONERS
    from secure_fedora.data.partition import LabeledDataset, iid_partition
    from secure_fedora.data.userdata import label_space

    def parity(dataset, d, seed):
        return [dataclasses.replace(c, train_y=c.train_y % 2, val_y=c.val_y % 2,
                                    test_y=c.test_y % 2, meta={**c.meta, "num_classes": 2})
                for c in iid_partition(dataset, d.num_clients, d.train_per_client,
                                       d.val_per_client, d.test_per_client, seed)]

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 4, generator=gen), torch.randint(0, 3, (400,), generator=gen)
    data = LabeledDataset(x[:300], y[:300], x[300:], y[300:], 3)
    sizes = {"num_clients": 3, "train_per_client": 30, "val_per_client": 10, "test_per_client": 10}
    PARTITIONERS.register("test-parity", parity)
    try:
        clients = build_clients(tiny(methods=["local"], data={**sizes, "partition": "test-parity"}),
                                data)
        assert label_space(clients) == (2, False)
    finally:
        PARTITIONERS.unregister("test-parity")


def test_training_rows_shared_by_a_partitioners_clients_are_said(caplog):
    """A plug-in partitioner giving every client the same training rows ran without a word,
    though each row was then released under three clients' budgets; it is now one warning
    counting the shared rows. The disjoint built-in partition says nothing."""
    import dataclasses

    from secure_fedora.core.registry import PARTITIONERS
    from secure_fedora.data.partition import LabeledDataset, iid_partition

    def same_rows(dataset, d, seed):  # client 0's split, three times
        first = iid_partition(dataset, 1, d.train_per_client, d.val_per_client,
                              d.test_per_client, seed)[0]
        return [dataclasses.replace(first, client_id=i) for i in range(d.num_clients)]

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 4, generator=gen), torch.randint(0, 3, (400,), generator=gen)
    data = LabeledDataset(x[:300], y[:300], x[300:], y[300:], 3)
    sizes = {"num_clients": 3, "train_per_client": 30, "val_per_client": 10, "test_per_client": 10}
    PARTITIONERS.register("test-same-rows", same_rows)
    try:
        with caplog.at_level("WARNING", logger="secure_fedora.data.userdata"):
            build_clients(tiny(methods=["local"], data={**sizes, "partition": "iid"}), data)
            assert "more than one client" not in caplog.text
            build_clients(tiny(methods=["local"], data={**sizes, "partition": "test-same-rows"}),
                          data)
        assert "'test-same-rows': 30 training row(s) are held by more than one client" \
            in caplog.text
    finally:
        PARTITIONERS.unregister("test-same-rows")


def test_the_data_is_built_on_training_threads():
    """The partition ran on torch's default thread count whatever ``training.threads`` said:
    at 10,000 rotated clients on a busy 2-core machine the rotations' thread fan-out cost ~4x
    the whole DP run's other setup. It now runs on ``training.threads`` (the process's count
    again after, also when the partitioner raises); the clients are the same either way."""
    from secure_fedora.core.registry import PARTITIONERS
    from secure_fedora.data.partition import LabeledDataset, rotation_partition

    seen = []

    def counting(dataset, d, seed):
        seen.append(torch.get_num_threads())
        return rotation_partition(dataset, d.num_clients, d.train_per_client, d.val_per_client,
                                  d.test_per_client, None, seed)

    def failing(dataset, d, seed):
        seen.append(torch.get_num_threads())
        raise RuntimeError("partitioner failed")

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (400, 28, 28), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 3, (400,), generator=gen)
    data = LabeledDataset(x[:300], y[:300], x[300:], y[300:], 3)
    sizes = {"num_clients": 3, "train_per_client": 30, "val_per_client": 10, "test_per_client": 10}
    before = torch.get_num_threads()
    PARTITIONERS.register("test-counting", counting)
    PARTITIONERS.register("test-failing", failing)
    try:
        torch.set_num_threads(2)
        one = build_clients(tiny(methods=["local"], data={**sizes, "partition": "test-counting"},
                                 training={"threads": 1}), data)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(Exception, match="partitioner failed"):
            build_clients(tiny(methods=["local"], data={**sizes, "partition": "test-failing"},
                               training={"threads": 1}), data)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        unset = build_clients(tiny(methods=["local"], data={**sizes, "partition": "test-counting"}),
                              data)
        assert seen == [1, 1, 2]
        for a, b in zip(one, unset, strict=True):
            for split in ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y"):
                assert torch.equal(getattr(a, split), getattr(b, split))
    finally:
        torch.set_num_threads(before)
        PARTITIONERS.unregister("test-counting")
        PARTITIONERS.unregister("test-failing")

def test_run_method_runs_on_training_threads_and_float32(tmp_path, tiny_clients):
    """``Simulation.run_method`` (which the canary audit and the Flower agreement tests call
    directly) ran on the caller's torch threads and default dtype, unlike ``run``: a plain
    FEDORA run's figures then depended on what the process had set before. It now runs on
    ``training.threads`` in float32, the caller's settings again after (also when it
    raises), with the figures of ``run``."""
    cfg = tiny(methods=["fedora"], training={"threads": 1})
    seen = []

    def progress(_name, _rnd, _total):
        seen.append((torch.get_num_threads(), torch.get_default_dtype()))

    reference = Simulation(cfg, tmp_path / "run", clients=tiny_clients).run()
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        torch.set_num_threads(2)
        torch.set_default_dtype(torch.float64)
        outcome = Simulation(cfg, tmp_path / "method", clients=tiny_clients,
                             progress=progress).run_method("fedora")
        assert seen == [(1, torch.float32)] * cfg.training.rounds
        assert (torch.get_num_threads(), torch.get_default_dtype()) == (2, torch.float64)
        assert outcome.to_json()["selected"] == reference["methods"]["fedora"]["selected"]

        def failing(_name, _rnd, _total):
            raise RuntimeError("progress failed")

        with pytest.raises(RuntimeError, match="progress failed"):
            Simulation(cfg, tmp_path / "failing", clients=tiny_clients,
                       progress=failing).run_method("fedora")
        assert (torch.get_num_threads(), torch.get_default_dtype()) == (2, torch.float64)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def test_experiment_check_builds_the_model_on_training_threads(tmp_path):
    """``Experiment.check`` (and every other caller of ``build_context``: the sweep's
    preflight, the Simulation's checks) built the model and ran its data checks on the
    caller's thread count; now on ``training.threads``, the caller's count again after."""
    from secure_fedora.api import Experiment
    from secure_fedora.learning.models import make_model

    seen = []

    def factory(input_shape, num_classes):
        seen.append(torch.get_num_threads())
        return make_model("mlp", num_classes, seed=0, input_shape=input_shape)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = tiny(methods=["local"], training={"threads": 1})
        Experiment(cfg, model=factory, run_dir=tmp_path / "run").check()
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _BatchCentered(torch.nn.Module):
    """Every output depends on the whole batch (the batch mean is subtracted): per-sample
    clipping bounds nothing, so DP-SGD must refuse it."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.first = torch.nn.Linear(int(torch.tensor(input_shape).prod()), 8)
        self.last = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.first(x.flatten(1))
        return self.last(h - h.mean(dim=0, keepdim=True))


class _MixesFrom(torch.nn.Module):
    """Subtracts the batch mean from batches of at least ``rows`` rows (in eval mode only
    with ``eval_only``): a model that treats rows alone in smaller batches."""

    def __init__(self, rows, eval_only=False):
        super().__init__()
        self.rows, self.eval_only = rows, eval_only

    def forward(self, h):
        if h.shape[0] < self.rows or (self.eval_only and self.training):
            return h
        return h - h.mean(dim=0, keepdim=True)


def _dp_federation(validation="public", methods=("fedavg",)):
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 6, generator=g), torch.arange(n) % 2

    data = [{"train": split(20), "val": split(6), "test": split(4)} for _ in range(3)]
    cfg = parse_config({"methods": list(methods), "training": {"rounds": 1, "batch_size": 4},
                        "data": {"num_clients": 3, "train_per_client": 20, "val_per_client": 6,
                                 "test_per_client": 4, "validation": validation},
                        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                                    "noise": "reproducible"},
                        "fedora": {"relatedness": "noised", "k": 1}})
    return cfg, build_clients(cfg, data=data)


@pytest.mark.parametrize("rows", [2, 3, 8])
def test_dp_refuses_a_model_that_mixes_rows_only_in_batches_of_three_or_more(rows):
    """The DP check probed batches of two rows, so a model mixing the rows of batches of three
    (or eight) or more passed, and its DP-SGD steps (Poisson batches of about 4, up to 20 rows)
    clipped per-sample norms that bound nothing. It now probes a batch as large as the
    training batches can plausibly be. A model mixing the rows of any batch (2) was refused by
    the per-sample gradient check first, as a "layer (no single layer identified)" that is
    "not supported": the row check now runs first and names the cause."""
    from torch import nn

    from privacy.dpsgd import DPSGDError
    from secure_fedora.runtimes.inprocess import build_context

    def factory(shape, k):
        return nn.Sequential(nn.Linear(6, 8), _MixesFrom(rows), nn.ReLU(), nn.Linear(8, k))

    def row_wise(shape, k):
        return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Dropout(0.5),
                             nn.Linear(8, k))

    cfg, clients = _dp_federation()
    with pytest.raises(DPSGDError, match="of a batch of 20 training rows change when the batch's "
                                         "other rows are replaced"):
        build_context(cfg, clients, model_factory=factory)
    build_context(cfg, clients, model_factory=row_wise)  # rows alone: accepted


def test_dp_refuses_a_loss_that_mixes_rows_only_in_batches_of_three_or_more(monkeypatch):
    """The loss check probed the gradient check's two rows only, so a loss centring the
    outputs of batches of three or more passed, and DP-SGD clipped per-sample gradients of
    losses that each depended on the whole batch. It now scores the largest Poisson batch's
    rows together and alone (no backward), as the model's row check does."""
    import sys
    import types

    import torch.nn.functional as F

    from privacy.dpsgd import DPSGDError
    from secure_fedora.runtimes.inprocess import build_context

    def mixing(out, target):
        if out.shape[0] >= 3:
            out = out - out.mean(0, keepdim=True)
        return F.cross_entropy(out, target, reduction="none")

    losses = types.ModuleType("h_ks2_losses")
    losses.mixing = mixing
    losses.per_row = lambda out, target: F.cross_entropy(out, target, reduction="none")
    monkeypatch.setitem(sys.modules, "h_ks2_losses", losses)
    cfg, clients = _dp_federation()
    with pytest.raises(DPSGDError, match=r"the loss's value for a row changes with the other "
                                         r"rows of its batch \(on 20 probe rows"):
        build_context(cfg.model_copy(update={"training": cfg.training.model_copy(
                      update={"loss": "h_ks2_losses:mixing"})}),
                      clients)
    build_context(cfg.model_copy(update={"training": cfg.training.model_copy(
                      update={"loss": "h_ks2_losses:per_row"})}),
                  clients)


def test_dp_with_private_validation_refuses_a_model_mixing_validation_rows():
    """A private lambda clips each validation row's loss, computed on the whole split in eval
    mode: a model mixing the rows of a batch in eval mode only passed every check, and the
    lambda's sensitivity bound held for nothing. Public validation releases no lambda."""
    from torch import nn

    from privacy.dpsgd import DPSGDError
    from secure_fedora.runtimes.inprocess import build_context

    def factory(shape, k):
        return nn.Sequential(nn.Linear(6, 8), _MixesFrom(2, eval_only=True), nn.ReLU(),
                             nn.Linear(8, k))

    cfg, clients = _dp_federation("private", methods=("fedora",))
    with pytest.raises(DPSGDError, match="a batch of 6 eval-mode training rows"):
        build_context(cfg, clients, model_factory=factory)
    cfg, clients = _dp_federation("public", methods=("fedora",))
    build_context(cfg, clients, model_factory=factory)


def test_dp_with_private_validation_accepts_a_single_class_validation_split_under_auc(tmp_path):
    """Under DP with private validation the validation splits are never scored (the final
    round is reported, FedAvg's fine-tuning keeps its last epoch, the private lambda uses
    losses), but a single-class validation split under AUC was refused as unscorable; it now
    runs. With public validation it is scored, and still refused."""
    from secure_fedora.data.sources import DataError
    from secure_fedora.runtimes.inprocess import build_context

    def federation(validation):
        g = torch.Generator().manual_seed(0)

        def split(n, one_class=False):
            x = torch.randn(n, 6, generator=g)
            return x, torch.zeros(n, dtype=torch.long) if one_class else torch.arange(n) % 2

        data = [{"train": split(20), "val": split(6, one_class=i == 1), "test": split(6)}
                for i in range(3)]
        cfg = parse_config({"methods": ["fedora", "fedavg"],
                            "training": {"rounds": 1, "batch_size": 20, "loss": "bce"},
                            "data": {"num_clients": 3, "train_per_client": 20, "val_per_client": 6,
                                     "test_per_client": 6, "validation": validation},
                            "fedavg": {"finetune_epochs": 1},
                            "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                                        "noise": "reproducible"},
                            "fedora": {"relatedness": "noised", "k": 1}})
        return cfg, build_clients(cfg, data=data)

    cfg, clients = federation("public")
    with pytest.raises(DataError, match="client 1: the val split cannot be scored with AUC"):
        build_context(cfg, clients)
    cfg, clients = federation("private")
    results = Simulation(cfg, tmp_path, clients=clients, keystore=tmp_path.parent / "keys").run()
    assert results["metric"] == "auc"
    assert set(results["methods"]) == {"fedora", "fedavg", "fedavg_ft"}


def test_dp_refuses_a_batch_mixing_model_when_the_first_client_has_one_training_row():
    """The DP per-sample check ran on client 0's first two training rows only: with one row,
    a batch of one cannot mix, so the model was accepted and the other clients' DP-SGD steps
    clipped per-sample norms that bound nothing."""
    from privacy.dpsgd import DPSGDError
    from secure_fedora.runtimes.inprocess import build_context

    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 6, generator=g), torch.arange(n) % 2

    data = [{"train": split(n), "val": split(4), "test": split(4)} for n in (1, 10, 10)]
    cfg = parse_config({"methods": ["fedavg"], "training": {"rounds": 1, "batch_size": 1},
                        "data": {"num_clients": 3, "train_per_client": 1, "val_per_client": 4,
                                 "test_per_client": 4},
                        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3,
                                    "noise": "reproducible"}})
    with pytest.raises(DPSGDError, match="change when the batch's other rows are replaced"):
        build_context(cfg, build_clients(cfg, data=data), model_factory=_BatchCentered)


def test_a_dp_run_whose_method_reports_nan_writes_strict_json_and_its_anchor(tmp_path):
    """results.json was written with NaN/Infinity tokens (invalid JSON for most readers)
    when a method reported a non-finite figure, after every ledger entry was spent; it is now
    strict JSON (the figure null, named under non_finite_values) and the anchor is written."""
    from secure_fedora.algorithms.methods import Local
    from secure_fedora.core.registry import METHODS

    class NanLocal(Local):
        def server_finalize(self, replies):
            return {"score": float("nan"), "spread": float("-inf")}

    METHODS.register("nan_local", NanLocal)
    try:
        cfg = tiny(methods=["nan_local"], data={"num_clients": 2, "validation": "private"},
                   training={"rounds": 1},
                   privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-3})
        results = Simulation(cfg, tmp_path, clients=build_clients(cfg)).run()
    finally:
        METHODS.unregister("nan_local")

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    on_disk = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert on_disk == results
    assert on_disk["methods"]["nan_local"]["extra"] == {"score": None, "spread": None}
    assert on_disk["non_finite_values"] == {"/methods/nan_local/extra/score": "nan",
                                            "/methods/nan_local/extra/spread": "-inf"}
    assert (tmp_path / "anchor.json").is_file()


def test_a_round_nobody_was_admitted_to_is_evaluated_as_that_round(tmp_path, monkeypatch):
    """With DP, a round whose every sampled client was refused runs no train_round, so the
    method's last_round stayed at the round before and its evaluation asked
    evaluation_messages for that earlier round (Flower asks for the round evaluated). Both
    now name the round being evaluated."""
    from secure_fedora.algorithms.messages import KIND_GLOBAL
    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.registry import METHODS
    from secure_fedora.secure.private import FederationPrivacy

    asked: list[int] = []

    class Recording(FedAvg):
        def evaluation_messages(self, rnd, clients):
            asked.append(rnd)
            return {i: {KIND_GLOBAL: self.global_params} for i in clients}

    original = FederationPrivacy.admit

    def admit(self, i, rnd, theta, with_lambda, noise=None):
        if rnd == 2:  # what the gate does on a refusal
            self.clients[i].refused_at, self.clients[i].refusal = rnd, "budget exhausted (test)"
            return False
        return original(self, i, rnd, theta, with_lambda, noise=noise)

    monkeypatch.setattr(FederationPrivacy, "admit", admit)
    name = "recording_rounds_x"
    METHODS.register(name, Recording)
    try:
        cfg = tiny(methods=[name], training={"rounds": 2},
                   privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-3})
        sim = Simulation(cfg, tmp_path / "run", keystore=tmp_path / "keystore")
        sim.run()
    finally:
        METHODS.unregister(name)
    rows = (tmp_path / "run" / "rounds.csv").read_text().splitlines()
    replied = rows[0].split(",").index("replied")
    assert [r.split(",")[replied] for r in rows[1:]] == ["5", "0"]
    assert asked == [1, 2]


def test_simulation_validates_what_python_hands_it_like_the_cli(tmp_path, tiny_clients):
    """Simulation is the Python API under Experiment and the CLI: a key store path with a NUL
    character was a raw 'ValueError: embedded null byte' at the first method's ledgers (after
    the run directory was made), an empty one meant the current directory, and a config
    changed by model_copy (training.lr = -1) ran. Each is a ConfigError naming the argument
    or key before anything is written."""
    cfg = tiny(methods=["local"], privacy={"enabled": True, "epsilon": 50.0, "delta": 1e-3,
                                           "noise_multiplier": 1.0, "noise": "reproducible"})
    run = tmp_path / "run"
    bad_lr = cfg.model_copy(update={"training": cfg.training.model_copy(update={"lr": -1.0})})
    for kwargs, problem in (({"keystore": str(tmp_path / "keys\x00")}, "keystore .* NUL"),
                            ({"keystore": " "}, "keystore is empty"),
                            ({"run_dir": str(run) + "\x00"}, "run_dir .* NUL"),
                            ({"run_dir": ""}, "run_dir is empty"),
                            ({"cfg": bad_lr}, "training.lr")):
        arguments = {"cfg": cfg, "run_dir": run, "clients": tiny_clients, **kwargs}
        with pytest.raises(ConfigError, match=problem):
            Simulation(**arguments).run()
        assert not run.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_fresh_simulation_never_overwrites_another_run(tmp_path, tiny_clients):
    """Simulation.run() (resume False) into a directory holding a finished run replaced its
    results.json, rounds.csv and checkpoints with another configuration's without a word
    (Experiment and the CLI check the directory; Simulation, under both, did not)."""
    from secure_fedora.runtimes.rundir import RunDirError

    run = tmp_path / "run"
    Simulation(tiny(methods=["local"], training={"rounds": 1}), run, clients=tiny_clients).run()
    before = {p.name: p.read_bytes() for p in [run / "results.json", run / "rounds.csv",
                                                run / "checkpoints" / "local.pt"]}
    other = tiny(methods=["local"], training={"rounds": 1, "lr": 0.01})
    with pytest.raises(RunDirError, match="is not empty") as err:
        Simulation(other, run, clients=tiny_clients).run()
    # named for the Python caller, not as the CLI's --out and --resume
    assert "new or empty run_dir, and run(resume=True) continues" in str(err.value)
    assert "--" not in str(err.value)
    assert {p.name: p.read_bytes() for p in [run / "results.json", run / "rounds.csv",
                                              run / "checkpoints" / "local.pt"]} == before


@pytest.mark.parametrize("bad", [1.5, b"ckpt.pt", None, "", "  ", "ckpt\x00.pt"])
def test_load_checkpoint_refuses_what_is_not_a_text_path(bad):
    with pytest.raises(CheckpointError, match=r"^path "):
        load_checkpoint(bad)


def test_load_checkpoint_refuses_a_file_descriptor(tmp_path):
    # open() takes an int as a file descriptor: the checkpoint behind it was read unnamed
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, {"round": 1})
    with ckpt.open("rb") as fh, pytest.raises(CheckpointError, match="path must be a path.*int"):
        load_checkpoint(fh.fileno())


@pytest.mark.parametrize("bad", ["no", 1, None])
def test_simulation_resume_must_be_a_bool(tmp_path, tiny_clients, bad):
    sim = Simulation(tiny(training={"rounds": 1}), tmp_path / "run", clients=tiny_clients)
    for call in (lambda: sim.run(resume=bad), lambda: sim.run_method("local", resume=bad)):
        with pytest.raises(ConfigError, match="^resume must be True or False"):
            call()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("select_final", [False, True])
def test_a_placeholder_metric_never_counts_in_model_selection(select_final: bool) -> None:
    """Client 1 has no metric in round 1 (a placeholder 0): round 1 is not eligible, though the
    mean over every slot (0.6) beats round 2's measured 0.5; the selection starts at round 2,
    and round 1 is named as not considered."""
    from secure_fedora.runtimes.inprocess import Tracker, unmeasured_rounds

    tracker = Tracker.empty(3, select_final=select_final)
    history = []
    for rnd, clients, val in ((1, [0, 2], [0.9, 0.0, 0.9]), (2, [0, 1, 2], [0.5] * 3),
                              (3, [0, 1, 2], [0.4] * 3)):
        tracker.last_val.copy_(torch.tensor(val))
        tracker.last_test.copy_(torch.tensor(val))
        tracker.evaluated(rnd, clients)
        tracker.update(rnd)
        history.append({"round": rnd, **tracker.round_row(), "evaluated": len(clients)})
    assert (history[0]["selected_mean"], history[0]["selected_round"]) == (None, None)
    assert [r["selected_round"] for r in history[1:]] == ([2, 3] if select_final else [2, 2])
    assert int(tracker.eligible_from) == 2
    assert unmeasured_rounds(history, int(tracker.eligible_from)) == {"unmeasured_rounds": [1]}
    assert unmeasured_rounds(history[1:], 2) == {}


@pytest.mark.parametrize("dp", [True, False])
def test_fedora_runs_with_a_tau_whose_similarities_overflow_float64(tmp_path, dp):
    """tau = 1000 passed the config check, then every client released its summary (under DP a
    spent gaussian_summary ledger entry each) and the run stopped: exp(tau * sum of the
    cosines) overflows float64. The graph needs only each row's normalized top-k
    similarities, which are finite for any tau: the run completes, and its ledgers verify."""
    from audits.verify import verify_run
    from secure_fedora.algorithms import fedora

    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 6, generator=g), torch.arange(n) % 2

    data = [{"train": split(20), "val": split(6), "test": split(4)} for _ in range(3)]
    doc = {"methods": ["fedora"], "training": {"rounds": 1, "batch_size": 4},
           "data": {"num_clients": 3, "train_per_client": 20, "val_per_client": 6,
                    "test_per_client": 4},
           "fedora": {"k": 1, "tau": 1000.0, "relatedness": "noised" if dp else "plain"}}
    if dp:
        doc["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible"}
    cfg = parse_config(doc)
    sim = Simulation(cfg, tmp_path, clients=build_clients(cfg, data=data))
    results = sim.run()
    assert len(results["methods"]["fedora"]["selected"]["per_client"]) == 3
    r = sim.methods["fedora"].relatedness
    assert r.similarity is None  # the raw similarities overflow; the graph does not
    with pytest.raises(fedora.RelatednessError, match="overflows float64"):
        fedora.similarity_matrix(r.overlaps, cfg.fedora.tau)
    assert torch.equal(r.graph.sum(1), torch.ones(3, dtype=torch.float64))
    assert (r.graph > 0).sum(1).tolist() == [1, 1, 1]
    if dp:
        assert verify_run(tmp_path).ok


def test_a_plug_in_file_edited_while_the_run_runs_does_not_stop_it(tmp_path, monkeypatch):
    """A [model] factory whose file was edited while a run ran (after its first method was
    built) stopped the run before its next method ('changed since this process imported
    module'), though every method runs the code the run started with; the run now finishes,
    and the next run in the process is refused as before."""
    import sys

    from secure_fedora.core.plugins import PluginError

    module = tmp_path / "edited_mid_run_x.py"
    module.write_text(
        "import pathlib\n"
        "import torch\n"
        "def make(input_shape, num_classes):\n"
        "    path = pathlib.Path(__file__)\n"
        "    if not path.read_text().endswith('# edited\\n'):\n"
        "        path.write_text(path.read_text() + '# edited\\n')  # as an editor would\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(int(torch.tensor(input_shape).prod()),"
        " num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited_mid_run_x", raising=False)
    cfg = tiny(methods=["local", "fedavg"], model={"factory": "edited_mid_run_x:make"},
               training={"rounds": 1, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
               fedavg={"finetune_epochs": 0})
    clients = build_clients(cfg)
    try:
        results = Simulation(cfg, tmp_path / "run", clients=clients).run()
        assert set(results["methods"]) >= {"local", "fedavg"}
        with pytest.raises(PluginError, match="changed since this process imported"):
            Simulation(cfg, tmp_path / "again", clients=clients).run()
    finally:
        sys.modules.pop("edited_mid_run_x", None)


def test_a_resume_on_data_its_source_drew_anew_says_the_source_must_repeat_it(tmp_path):
    """A data function that draws from numpy's global generator instead of the seed it is
    given returns other data at a resume, which was refused only as "another data fingerprint
    ... refuse to resume", naming neither the cause nor what to do."""
    import numpy as np

    from secure_fedora.api import Experiment
    from tests.secure_fedora.core.crash_support import crashes_at

    def unseeded(seed):
        x = np.random.normal(size=(60, 4)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}

    config = {"methods": ["local"], "training": {"rounds": 2, "batch_size": 8, "checkpoint_every": 1},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 12,
                       "val_per_client": 4, "test_per_client": 5}}
    run_dir = tmp_path / "run"
    with crashes_at("checkpoint_written"):
        Experiment(config, data=unseeded(0), run_dir=run_dir).run()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"local.pt was written for another data fingerprint "
                                              r"\(\w+ != \w+\): the data changed since the run "
                                              r"started \(a data source must return the same data "
                                              r"for the same seed.*start a new run"):
        Experiment(config, data=unseeded(0), run_dir=run_dir).run(resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_dp_run_states_that_its_checkpoints_hold_what_no_ledger_accounts(tmp_path, tiny_clients):
    """In process a method's checkpoint holds every client's own state: Ditto's personal models,
    trained without noise, which its results.json said "never leave the client" (publishing
    one is an unaccounted release) while the run directory held them all. A DP run now states
    it (``assumptions.checkpoints``); a run without DP claims nothing to state it against."""
    privacy = {"enabled": True, "epsilon": 8.0, "delta": 1e-3}
    cfg = tiny(methods=["ditto"], training={"rounds": 1}, privacy=privacy)
    sim = Simulation(cfg, tmp_path / "dp", clients=tiny_clients, keystore=tmp_path / "keys")
    results = sim.run()
    on_disk = json.loads((tmp_path / "dp" / "results.json").read_text())
    stated = results["assumptions"].get("checkpoints", "")
    assert "checkpoints/" in stated and "personal models" in stated
    assert "DP does not cover it" in stated
    assert on_disk["assumptions"]["checkpoints"] == stated
    # what it states: the personal models themselves, not the uploaded global-model copies
    held = load_checkpoint(tmp_path / "dp" / "checkpoints" / "ditto.pt")["method"]["theta"]
    assert torch.equal(held, sim.methods["ditto"].theta)
    assert not torch.equal(held[0], held[1])
    plain = Simulation(tiny(methods=["ditto"], training={"rounds": 1}), tmp_path / "plain",
                       clients=tiny_clients).run()
    assert "checkpoints" not in plain["assumptions"]


def test_a_dp_run_without_ditto_or_apfl_states_what_its_checkpoints_hold(tmp_path, tiny_clients):
    """A DP run of FedAvg stated that its checkpoints/ held "Ditto's and APFL's personal models
    and APFL's alpha, trained without noise", which it never had. It states what they hold:
    the models its clients trained with DP-SGD, and that no method of it keeps state without
    noise; the checkpoint holds exactly the rows the clients trained and uploaded."""
    privacy = {"enabled": True, "epsilon": 8.0, "delta": 1e-3}
    cfg = tiny(methods=["fedavg"], training={"rounds": 1}, privacy=privacy,
               fedavg={"finetune_epochs": 0})
    sim = Simulation(cfg, tmp_path / "dp", clients=tiny_clients, keystore=tmp_path / "keys")
    stated = sim.run()["assumptions"]["checkpoints"]
    assert "personal" not in stated and "Ditto" not in stated and "APFL" not in stated
    assert "the models its clients trained with DP-SGD" in stated
    assert "no method of the run (fedavg) declares client state kept without DP noise" in stated
    held = load_checkpoint(tmp_path / "dp" / "checkpoints" / "fedavg.pt")["method"]
    assert set(held) >= {"theta", "global"} and "client_states" not in held


def test_a_dp_run_states_that_its_timings_are_outside_the_ledgers(tmp_path, tiny_clients):
    """A DP run writes how long each method trained and evaluated (results.json) and when each
    release was ledgered (every entry's timestamp): times that can depend on the data through
    the Poisson-sampled batch sizes, which no ledger accounts, and the run said nothing of
    them. It now states it (``assumptions.timing``), naming what it writes, the checkpoints'
    copy of the seconds too; the times stay."""
    privacy = {"enabled": True, "epsilon": 8.0, "delta": 1e-3}
    cfg = tiny(methods=["fedavg"], training={"rounds": 1}, privacy=privacy)
    results = Simulation(cfg, tmp_path / "dp", clients=tiny_clients,
                         keystore=tmp_path / "keys").run()
    stated = results["assumptions"].get("timing", "")
    assert stated.startswith("timing is outside the ledgers")
    assert "Poisson sampling" in stated and "no ledger accounts them" in stated
    on_disk = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert on_disk["assumptions"]["timing"] == stated
    # what it names is what the run wrote: the seconds in results.json, the ledgers' times
    for key in ("seconds_training", "seconds_evaluation"):
        assert key in stated and key in on_disk["methods"]["fedavg"]
    ledger = next((tmp_path / "dp").rglob("client-000.jsonl"))
    assert "UTC time" in stated and '"timestamp"' in ledger.read_text()
    # the method's checkpoint keeps the same seconds, and the statement said nothing of it
    held = load_checkpoint(tmp_path / "dp" / "checkpoints" / "fedavg.pt")
    assert "checkpoints/" in stated
    for key in ("timing", "history", "outcome"):
        assert f"{key}" in stated and held[key]
    assert set(held["timing"]) >= {"training", "evaluation"}
    assert held["outcome"]["seconds_training"] == on_disk["methods"]["fedavg"]["seconds_training"]
    # it names no timing record the run does not write (Flower's relatedness_timing)
    assert "relatedness_timing" not in stated and "relatedness_timing" not in on_disk
    plain = Simulation(tiny(methods=["fedavg"], training={"rounds": 1}), tmp_path / "plain",
                       clients=tiny_clients).run()
    assert "timing" not in plain["assumptions"]


def test_results_state_the_exact_epsilon_spent_as_flower_does(tmp_path):
    """results.json's ``epsilon_spent`` in process was the accountant's epsilon rounded up to
    6 decimals, while a Flower server states the float64 value its client reported: the same
    field meant two things. Both now state the exact value, the one each client's ledger
    closes with and reports (:func:`~secure_fedora.secure.private.ledger_report`)."""
    from torch import nn

    from secure_fedora.api import Experiment

    def model(shape, k):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, k))

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 4, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    data = {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}
    config = {"name": "exact-spent", "methods": ["local"],
              "training": {"rounds": 2, "batch_size": 8},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 20,
                       "val_per_client": 5, "test_per_client": 5},
              "privacy": {"enabled": True, "epsilon": 4.0, "delta": 1e-3}}
    run_dir = tmp_path / "run"
    results = Experiment(config, data=data, model=model, run_dir=run_dir).run()
    on_disk = json.loads((run_dir / "results.json").read_text())["privacy"]["local"]["clients"]
    anchored = json.loads((run_dir / "anchor.json").read_text())["ledgers"]
    for row in on_disk:
        lines = (run_dir / "ledgers" / "local" / f"{row['client']}.jsonl").read_text().splitlines()
        close = json.loads(lines[-1])
        assert close["mechanism"] == "close"
        spent = close["params"]["epsilon_spent"]
        assert round(spent, 6) != spent  # else the rounding would not show
        assert row["epsilon_spent"] == spent == anchored[f"local/{row['client']}"]["epsilon_spent"]
    assert [r["epsilon_spent"] for r in results["privacy"]["local"]["clients"]] == \
        [r["epsilon_spent"] for r in on_disk]


def test_a_checkpoint_with_the_earlier_single_hash_data_fingerprint_resumes_on_the_same_data(
        tmp_path):
    """The data fingerprint combines per-client digests (so a Flower server can make it from
    what its clients report); a checkpoint written when it was one hash over all clients'
    tensors resumes on the same data, and is still refused on other data."""
    import numpy as np

    from secure_fedora.api import Experiment
    from secure_fedora.data.sources import fingerprint_clients, legacy_fingerprint_clients
    from secure_fedora.runtimes.inprocess import build_clients, load_checkpoint, save_checkpoint
    from tests.secure_fedora.core.crash_support import crashes_at

    def seeded(seed, shift=0.0):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(60, 4)).astype(np.float32) + np.float32(shift)
        y = (x[:, 0] > shift).astype(np.int64)
        return {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}

    config = {"methods": ["local"], "training": {"rounds": 2, "batch_size": 8, "checkpoint_every": 1},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 12,
                       "val_per_client": 4, "test_per_client": 5}}
    run_dir = tmp_path / "run"
    with crashes_at("checkpoint_written"):
        Experiment(config, data=seeded(0), run_dir=run_dir).run()
    path = run_dir / "checkpoints" / "local.pt"
    state = load_checkpoint(path)
    clients = build_clients(Experiment(config, data=seeded(0), run_dir=tmp_path / "x").config,
                            seeded(0))
    assert state["data_fingerprint"] == fingerprint_clients(clients)
    state["data_fingerprint"] = legacy_fingerprint_clients(clients)
    assert state["data_fingerprint"] != fingerprint_clients(clients)
    save_checkpoint(path, state)
    kept = path.read_bytes()
    with pytest.raises(CheckpointError, match="another data fingerprint"):
        Experiment(config, data=seeded(0, shift=0.5), run_dir=run_dir).run(resume=True)
    assert path.read_bytes() == kept
    results = Experiment(config, data=seeded(0), run_dir=run_dir).run(resume=True)
    assert results["data_fingerprint"] == fingerprint_clients(clients)


def test_a_metric_that_is_no_number_in_0_1_is_left_out_as_on_flower(tmp_path, tiny_clients,
                                                                      monkeypatch, caplog):
    """A client's final evaluation metric that is infinite (or NaN, or outside [0, 1]) was
    recorded as the client's final metric (results.json: null, under non_finite_values). As
    the Flower server does, the metric is now left out with a warning naming the client and
    round, the client keeps its last metrics (listed as stale) and, under DP, counts as having
    answered its final evaluation (its ledger report was taken), so the run completes."""
    from secure_fedora.learning import batched_eval
    from secure_fedora.learning.client import Evaluation

    real = batched_eval.evaluate_many_sets
    calls = []

    def nan_for_client_1_in_round_2(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            for evaluations in out:
                e = evaluations[1]
                evaluations[1] = Evaluation(e.loss, e.accuracy, float("inf"))
        return out

    monkeypatch.setattr(batched_eval, "evaluate_many_sets", nan_for_client_1_in_round_2)
    cfg = tiny(methods=["fedavg"], training={"rounds": 2},
               privacy={"enabled": True, "epsilon": 4.0, "delta": 1e-3, "noise": "reproducible"},
               security={"envelopes": False})
    with caplog.at_level("WARNING", logger="secure_fedora.runtimes.inprocess"):
        results = Simulation(cfg, tmp_path, clients=tiny_clients).run()
    assert "round 2: client 1: evaluation reply with a metric outside [0, 1] (test inf" \
        in caplog.text
    final = results["methods"]["fedavg"]["final"]
    assert final["stale_clients"] == [{"client": 1, "round": 1}]
    assert all(0.0 <= v <= 1.0 for v in final["per_client"])
    assert "non_finite_values" not in results
    import csv

    rows = list(csv.DictReader(io.StringIO((tmp_path / "rounds.csv").read_text())))
    assert [r["evaluated"] for r in rows if r["method"] == "fedavg"] == ["5", "4"]
