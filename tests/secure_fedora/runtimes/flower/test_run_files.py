"""The Flower ServerApp writes the run files the in-process runtime writes (rounds.csv, plots),
through the same writers, into its result directory."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import RunSettings
from secure_fedora.runtimes.inprocess import Simulation
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)

# Columns whose values both runtimes must give exactly (counts, identities, chosen rounds).
EXACT = {"method", "round", "participants", "replied", "steps", "unstable_pulls", "evaluated",
         "selected_round"}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.usefixtures("task_identity")
def test_flower_run_writes_the_in_process_rounds_csv_and_plots(tmp_path: Path) -> None:
    """The ServerApp wrote results.json only: no rounds.csv (the rounds' statistics, e.g.
    FEDORA's unstable_pulls, were in no file) and no plots. Its rounds.csv now has the
    in-process file's columns (no timings) and values, rounds between evaluations included,
    and its plots are the in-process run's PNGs."""
    base = with_methods(tiny_config(rounds=3, participation=0.5), "fedora")
    cfg = parse_config({**base.model_dump(mode="json", exclude_none=True),
                        "evaluation": {"every": 2}})
    result_dir = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == [] and results["events"] == []
    Simulation(cfg, tmp_path / "inproc").run()

    columns, ours = _rows(result_dir / "rounds.csv")
    theirs_columns, theirs = _rows(tmp_path / "inproc" / "rounds.csv")
    assert columns == theirs_columns
    assert {"replied", "unstable_pulls", "test_mean", "selected_round"} <= set(columns)
    assert not {"seconds", "timing"} & set(columns)  # timings differ from run to run
    assert [(r["round"], r["participants"], r["replied"]) for r in ours] == \
        [("1", "2", "2"), ("2", "2", "2"), ("3", "2", "2")]
    assert [r["test_mean"] != "" for r in ours] == [False, True, True]
    for mine, twin in zip(ours, theirs, strict=True):
        for key in columns:
            if key in EXACT or "" in (mine[key], twin[key]):
                assert mine[key] == twin[key], (mine["round"], key)
            else:
                assert float(mine[key]) == pytest.approx(float(twin[key]), abs=1e-4), key

    plots = sorted(p.name for p in (result_dir / "plots").iterdir())
    assert plots == ["accuracy_per_round.png", "per_client_accuracy.png", "relatedness.png"]
    for name in plots:
        assert (result_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("task_identity")
def test_flower_run_removes_the_partial_writes_of_a_killed_server_app(tmp_path: Path) -> None:
    """A ServerApp killed while writing a result file leaves its temporary copy (the
    atomic-write prefix) beside it: a partial results.json, rounds.csv or plot that nothing
    removed. The next run in that result-dir removes them before it writes (the ServerApp's
    checkpoint's too); other files stay."""
    cfg = with_methods(tiny_config(rounds=1), "local")
    result_dir = tmp_path / "res"
    (result_dir / "plots").mkdir(parents=True)
    (result_dir / "checkpoints").mkdir()
    leftovers = [result_dir / ".results.json.k1ll3d00", result_dir / ".rounds.csv.k1ll3d01",
                 result_dir / ".progress.json.k1ll3d02",
                 result_dir / "plots" / ".per_client_accuracy.png.k1ll3d03",
                 result_dir / "checkpoints" / ".flower-server.pt.k1ll3d04"]
    for path in leftovers:
        path.write_bytes(b'{"cut')
    (result_dir / "notes.txt").write_text("kept")
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                              RunSettings.from_run_config(rc), 42)
    assert not any(path.exists() for path in leftovers)
    assert sorted(p.name for p in result_dir.iterdir()) == \
        ["checkpoints", "notes.txt", "plots", "progress.json", "results.json", "rounds.csv"]
    assert [p.name for p in (result_dir / "checkpoints").iterdir()] == ["flower-server.pt"]
    assert sorted(p.name for p in (result_dir / "plots").iterdir()) == \
        ["accuracy_per_round.png", "per_client_accuracy.png"]


def _run_with_round_2_down(tmp_path: Path, method: str) -> Path:
    """A 3-round grid run of ``method`` on 3 clients whose every node is down in round 2 (no
    training reply that round); returns the result directory."""
    cfg = with_methods(tiny_config(rounds=3), method)
    result_dir = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    down = {(c, 2): "node down (test)" for c in range(3)}
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3, fail=down),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    assert [r["replied"] for r in results["rounds"]] == [3, 0, 3]
    return result_dir


@pytest.mark.usefixtures("task_identity")
def test_flower_round_without_replies_reports_no_method_statistics(tmp_path: Path) -> None:
    """A round whose every training reply failed had FEDORA's statistics over no replies
    written as measured values (mean_lambda 0.0, pulled_fraction 0.0) in its rounds.csv row,
    where the in-process runtime (a round nobody was admitted to) writes steps 0 and leaves
    them empty; the Flower row now does the same."""
    result_dir = _run_with_round_2_down(tmp_path, "fedora")
    _, rows = _rows(result_dir / "rounds.csv")
    assert [float(r["steps"]) > 0 for r in rows] == [True, False, True]
    assert [r["mean_lambda"] != "" for r in rows] == [True, False, True]
    assert rows[1]["pulled_fraction"] == rows[1]["unstable_pulls"] == ""


@pytest.mark.usefixtures("task_identity")
def test_flower_round_without_replies_is_not_aggregated(tmp_path: Path, monkeypatch) -> None:
    """A round whose every training reply failed still called the method's round_statistics
    and aggregate with no replies (a plug-in averaging them divides by zero, and any state
    aggregate advances moved on though nothing was trained); the in-process runtime runs no
    round for nobody. Neither is called now, and the row says steps 0 from 0 replies."""
    from secure_fedora.algorithms.methods import FedAvg

    calls: list[tuple[str, int, int]] = []
    aggregate, statistics = FedAvg.aggregate, FedAvg.round_statistics

    def recording_aggregate(self, rnd, replies):
        calls.append(("aggregate", rnd, len(replies)))
        return aggregate(self, rnd, replies)

    def recording_statistics(self, rnd, replies):
        calls.append(("round_statistics", rnd, len(replies)))
        return statistics(self, rnd, replies)

    monkeypatch.setattr(FedAvg, "aggregate", recording_aggregate)
    monkeypatch.setattr(FedAvg, "round_statistics", recording_statistics)
    result_dir = _run_with_round_2_down(tmp_path, "fedavg")
    assert [c for c in calls if c[1] == 2] == []
    assert sorted(c[1] for c in calls) == [1, 1, 3, 3] and all(c[2] == 3 for c in calls)
    _, rows = _rows(result_dir / "rounds.csv")
    assert [(r["participants"], r["replied"], float(r["steps"]) > 0) for r in rows] == \
        [("3", "3", True), ("3", "0", False), ("3", "3", True)]


@pytest.mark.usefixtures("task_identity")
def test_a_round_whose_uploads_are_all_rejected_is_not_aggregated_in_either_runtime(
        tmp_path: Path, monkeypatch) -> None:
    """In process, a round whose every admitted client's upload was rejected still called
    round_statistics and aggregate (with no reply) and its row said every admitted client
    replied, with FEDORA's statistics over no accepted reply; the Flower runtime aggregates no
    such round. Now neither calls them and both rows say 0 replied, steps 0, the rest empty."""
    from secure_fedora.algorithms.methods import Fedora
    from secure_fedora.secure import transport as transport_module

    calls: list[tuple[str, int]] = []
    aggregate, statistics = Fedora.aggregate, Fedora.round_statistics

    def recording_aggregate(self, rnd, replies):
        calls.append(("aggregate", rnd))
        return aggregate(self, rnd, replies)

    def recording_statistics(self, rnd, replies):
        calls.append(("round_statistics", rnd))
        return statistics(self, rnd, replies)

    monkeypatch.setattr(Fedora, "aggregate", recording_aggregate)
    monkeypatch.setattr(Fedora, "round_statistics", recording_statistics)
    real_init = transport_module.SecureExchange.__init__

    def tamper(kind, rnd, client, message):
        if kind == "theta" and rnd == 2:  # every upload of round 2 fails its payload hash
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):
        real_init(self, transport, **{**kwargs, "channel": tamper})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    base = with_methods(tiny_config(rounds=3), "fedora")
    cfg = parse_config({**base.model_dump(mode="json", exclude_none=True),
                        "security": {"envelopes": True}})
    sim = Simulation(cfg, tmp_path / "inproc")
    sim.run()
    assert {(r.round, r.direction) for r in sim.methods["fedora"].exchange.rejections} == \
        {(2, "upload")}
    assert sorted(calls) == [("aggregate", 1), ("aggregate", 3),
                             ("round_statistics", 1), ("round_statistics", 3)]
    calls.clear()
    flower_dir = _run_with_round_2_down(tmp_path / "flower", "fedora")
    assert sorted(c[1] for c in calls) == [1, 1, 3, 3]

    _, ours = _rows(tmp_path / "inproc" / "rounds.csv")
    _, theirs = _rows(flower_dir / "rounds.csv")
    same = ("participants", "replied", "steps", "mean_lambda", "pulled_fraction",
            "unstable_pulls")
    assert [r["replied"] for r in ours] == ["3", "0", "3"]
    assert {k: ours[1][k] for k in same} == {k: theirs[1][k] for k in same} == \
        {"participants": "3", "replied": "0", "steps": "0.0", "mean_lambda": "",
         "pulled_fraction": "", "unstable_pulls": ""}


@pytest.mark.usefixtures("task_identity")
def test_a_partially_rejected_round_counts_only_the_accepted_replies_in_either_runtime(
        tmp_path: Path, monkeypatch) -> None:
    """In process, a round in which one client's signed upload was rejected reported its
    steps and FEDORA's statistics (mean_lambda, pulled_fraction) over every client that
    trained, the rejected one included; the Flower server computes them over the replies it
    accepted. Both now count only the accepted replies: the in-process row of a round whose
    client 1 upload is rejected equals the Flower row of a round whose client 1 reply failed."""
    from secure_fedora.secure import transport as transport_module

    real_init = transport_module.SecureExchange.__init__

    def tamper(kind, rnd, client, message):
        if kind == "theta" and rnd == 2 and client == 1:  # fails its payload hash
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):
        real_init(self, transport, **{**kwargs, "channel": tamper})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    base = with_methods(tiny_config(rounds=2), "fedora")
    cfg = parse_config({**base.model_dump(mode="json", exclude_none=True),
                        "security": {"envelopes": True}})
    sim = Simulation(cfg, tmp_path / "inproc")
    sim.run()
    assert [(r.client, r.round, r.direction)
            for r in sim.methods["fedora"].exchange.rejections] == [(1, 2, "upload")]

    result_dir = tmp_path / "flower" / "res"
    rc = run_config(base, tmp_path / "flower", **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "flower" / "nodes", rc, 3, fail={(1, 2): "node down (test)"})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [r["replied"] for r in results["rounds"]] == [3, 2]

    _, ours = _rows(tmp_path / "inproc" / "rounds.csv")
    _, theirs = _rows(result_dir / "rounds.csv")
    assert [r["replied"] for r in ours] == ["3", "2"]
    assert float(ours[1]["steps"]) == float(ours[0]["steps"]) * 2 / 3  # equal clients' steps
    for key in ("participants", "replied", "steps", "unstable_pulls", "pulled_fraction"):
        assert ours[1][key] == theirs[1][key], key
    assert float(ours[1]["mean_lambda"]) == pytest.approx(float(theirs[1]["mean_lambda"]),
                                                          abs=1e-4)


@pytest.mark.usefixtures("task_identity")
def test_a_rounds_means_cover_only_the_clients_evaluated_in_that_round(tmp_path: Path) -> None:
    """A Flower client that missed an evaluation kept its last metric (before its first, a
    placeholder 0), and rounds.csv's means, spread and val_mean of that round included it: a
    round-1 mean with a 0 in it, a round-2 mean with a round-1 metric. A round's row now
    summarizes only the clients whose metric is that round's, 'evaluated' counting them, as
    in process, where every client is evaluated and the files agree with Flower's."""
    from flwr.app import Message

    from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE

    cfg = tiny_config(rounds=3)
    result_dir = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir), "round-timeout": 0.3})

    def lose(_request: Message, _reply: Message) -> None:
        return None

    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_reply={(1, 1, MSG_EVALUATE): lose, (2, 2, MSG_EVALUATE): lose})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == []
    Simulation(cfg, tmp_path / "inproc").run()
    columns, ours = _rows(result_dir / "rounds.csv")
    theirs_columns, theirs = _rows(tmp_path / "inproc" / "rounds.csv")
    assert columns == theirs_columns
    assert [r["evaluated"] for r in ours] == ["2", "2", "3"]
    assert [r["evaluated"] for r in theirs] == ["3", "3", "3"]
    assert [r["evaluated"] for r in results["rounds"]] == [2, 2, 3]
    for rnd, kept in ((1, [0, 2]), (2, [0, 1])):
        # every client's round-rnd metric in process: a run of rnd rounds trains the same models
        outcome = Simulation(tiny_config(rounds=rnd), tmp_path / f"r{rnd}").run_method("fedora")
        test = torch.tensor(outcome.final["per_client"], dtype=torch.float64)[kept]
        row = {k: float(v) for k, v in ours[rnd - 1].items() if k.startswith("test_")}
        assert row == pytest.approx({"test_mean": float(test.mean()), "test_min": float(test.min()),
                                     "test_max": float(test.max()),
                                     "test_std": float(test.std(unbiased=False))}, abs=1e-4), rnd
    for key in columns:  # round 3: every client evaluated in both runtimes
        if key in EXACT:
            assert ours[2][key] == theirs[2][key], key
        elif "" not in (ours[2][key], theirs[2][key]):
            assert float(ours[2][key]) == pytest.approx(float(theirs[2][key]), abs=1e-4), key


def test_a_round_row_summarizes_the_given_clients() -> None:
    """Tracker.round_row over a subset: its test statistics and val_mean over those clients,
    None for none; the selection's fields over every client."""
    from secure_fedora.runtimes.inprocess import Tracker

    tracker = Tracker.empty(3)
    tracker.last_test.copy_(torch.tensor([0.5, 0.0, 0.9]))
    tracker.last_val.copy_(torch.tensor([0.4, 0.0, 0.8]))
    tracker.evaluated(1, [0, 1, 2])
    tracker.update(1)
    row = tracker.round_row([0, 2])
    assert row["test_mean"] == pytest.approx(0.7) and row["test_min"] == pytest.approx(0.5)
    assert row["test_std"] == pytest.approx(0.2) and row["val_mean"] == pytest.approx(0.6)
    assert row["selected_mean"] == pytest.approx(1.4 / 3) and row["selected_round"] == 1
    empty = tracker.round_row([])
    assert [empty[k] for k in ("test_mean", "test_min", "test_max", "test_std", "val_mean")] == \
        [None] * 5
    assert tracker.round_row() == {**tracker.round_row([0, 1, 2])}
