"""The sweep: planning, resumption after interruption, tables, plots and the command line."""

import argparse
import csv
import io
import json
from pathlib import Path

import pytest
import tomllib

from secure_fedora.core.config import ConfigError, ExperimentConfig, load_config, parse_config
from secure_fedora.core.errors import run_command
from secure_fedora.experiments import sweep as sweep_mod
from secure_fedora.experiments.sweep import (
    Cell,
    SweepError,
    SweepRow,
    aggregate,
    cell_config,
    parse_epsilon,
    plan_cells,
    register,
    rows_to_csv,
    rows_to_markdown,
    run_sweep,
)
from secure_fedora.learning.client import PlainGradient
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context

NO_PRIVACY = "privacy" not in ExperimentConfig.model_fields


def tiny(**overrides):
    base = {
        "name": "tiny-sweep",
        "seed": 0,
        "data": {"num_clients": 5, "train_per_client": 32, "val_per_client": 16, "test_per_client": 32},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "fedavg": {"finetune_epochs": 1},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(base)


class Stop(Exception):
    pass


def counting_factory(calls):
    def factory(name, ctx, cfg):
        calls.append((name, cfg.seed))
        return sweep_mod.method_factory(name, ctx, cfg)
    return factory


def test_plan_orders_cells_and_runs_local_only_non_private():
    cells = plan_cells(["fedora", "local"], [None], [0, 1])
    assert [c.key for c in cells] == [
        "fedora/eps-none/seed-0", "local/eps-none/seed-0",
        "fedora/eps-none/seed-1", "local/eps-none/seed-1",
    ]


@pytest.mark.parametrize("methods, seeds, epsilons, match", [
    (["fedora", "fedsgd"], [0], [None], "unknown method 'fedsgd'"),
    (["fedora", "fedora"], [0], [None], "twice"),
    ([], [0], [None], "at least one method"),
    (["fedora"], [0, 0], [None], "seed twice"),
    (["fedora"], [-1], [None], "non-negative"),
    # the config's range: a larger seed failed every cell, the message blaming its method
    (["fedora", "local"], [2**32], [None], r"^seeds must be non-negative integers below 2\*\*32, "
                                           "got 4294967296$"),
    (["fedora"], [0], [], "at least one epsilon"),
    (["fedora"], [0], [-2.0], "positive finite"),
])
def test_plan_rejects_bad_input(methods, seeds, epsilons, match):
    with pytest.raises(SweepError, match=match):
        plan_cells(methods, epsilons, seeds)


@pytest.mark.parametrize("methods, seeds, epsilons, match", [
    # a string was taken letter by letter ("unknown method 'l'"), a number as no seed at all
    # ("needs at least one seed") or a raw TypeError ('float' object is not iterable)
    ("local", [0], [None], r"^methods must be a list, got str 'local' \(one value is a list of "
                           r"one: methods=\['local'\]\)$"),
    (["local"], 0, [None], r"^seeds must be a list, got int 0 \(.*: seeds=\[0\]\)$"),
    (["local"], [0], 1.0, r"^epsilons must be a list, got float 1.0 \(.*: epsilons=\[1.0\]\)$"),
    (["local"], [0], "none", r"^epsilons must be a list, got str 'none' \(.*: "
                             r"epsilons=\[1.0\] or \[None\]\)$"),
])
def test_plan_rejects_a_single_value_in_place_of_a_list(methods, seeds, epsilons, match):
    with pytest.raises(SweepError, match=match):
        plan_cells(methods, epsilons, seeds)


needs_privacy = pytest.mark.skipif(NO_PRIVACY, reason="this build has no privacy section")


@needs_privacy
def test_cell_config_sets_the_privacy_section():
    cfg = tiny()
    private = cell_config(cfg, Cell("fedprox", 2.0, 4))
    assert private.privacy.enabled and private.privacy.epsilon == 2.0
    assert private.methods == ["fedprox"] and private.seed == 4
    assert not cell_config(cfg, Cell("fedora", None, 0)).privacy.enabled
    with pytest.raises(SweepError, match="overrides"):
        cell_config(tiny(privacy={"overrides": {"1": {"epsilon": 1.0}}}), Cell("fedora", 2.0, 0))
    with pytest.raises(SweepError, match="noise_multiplier is fixed"):
        cell_config(tiny(privacy={"noise_multiplier": 1.1}), Cell("fedora", 2.0, 0))
    # epsilon switches every DP mechanism together
    noised = tiny(privacy={"enabled": True}, fedora={"relatedness": "noised+encrypted"},
                  data={"validation": "private"})
    off = cell_config(noised, Cell("fedora", None, 0))
    assert (off.fedora.relatedness, off.data.validation) == ("encrypted", "public")
    on = cell_config(noised, Cell("fedora", 1.0, 0))
    assert (on.fedora.relatedness, on.data.validation) == ("noised+encrypted", "private")
    assert cell_config(cfg, Cell("fedora", 1.0, 0)).fedora.relatedness == "noised"
    # a cell whose config is invalid is named: delta must be below 1/n once privacy is on
    loose = tiny(privacy={"delta": 0.1})
    with pytest.raises(SweepError, match=r"fedora/eps-1/seed-0: .*privacy.delta must be < 1/n"):
        cell_config(loose, Cell("fedora", 1.0, 0))


def test_a_refused_cell_says_that_sweep_methods_come_from_the_command_line():
    # the config lists no IFCA, but a sweep without --methods runs it; its refusal under DP
    # ("leave 'ifca' out of methods") must point at --methods, not at the config's methods
    cfg = tiny(methods=["fedora", "local"])
    with pytest.raises(SweepError, match=r"ifca/eps-1/seed-0: .*to skip 'ifca', pass --methods without it"):
        cell_config(cfg, Cell("ifca", 1.0, 0))


def plain_context(cfg, clients):
    return build_context(cfg, clients, oracle=PlainGradient(cfg.training.batch_size))


class PrivateLooking:
    """An oracle the sweep cannot tell from a DP one (anything but the plain oracle)."""

    def __init__(self, batch_size):
        self.inner = PlainGradient(batch_size)

    def batches(self, n, epochs, generator):
        return self.inner.batches(n, epochs, generator)

    def gradient(self, model, x, y, grad):
        self.inner.gradient(model, x, y, grad)

    def select(self, noise_multiplier, generator):
        pass


@needs_privacy
def test_numeric_epsilon_with_a_plain_oracle_is_refused_before_training(tmp_path):
    rounds: list = []
    with pytest.raises(SweepError, match="plain .non-private. one"):
        run_sweep(tiny(), tmp_path, ["fedavg"], [0], [None, 4.0], context_factory=plain_context,
                  on_round=lambda *a: rounds.append(a))
    assert rounds == [] and not (tmp_path / "cells").exists()


@needs_privacy
def test_cell_whose_results_deny_privacy_is_not_recorded(tmp_path, monkeypatch):
    class NoDP(Simulation):
        def results(self, outcomes):
            doc = super().results(outcomes)
            doc["assumptions"]["differential_privacy"] = False
            return doc

    monkeypatch.setattr(sweep_mod, "Simulation", NoDP)
    # PrivateLooking runs no DP-SGD step: the executed-steps check would (rightly) refuse the
    # first release; this test is about the sweep's check of the results, so skip it here.
    from secure_fedora.secure.private import FederationPrivacy

    monkeypatch.setattr(FederationPrivacy, "confirm_steps", lambda self, rnd, participants: None)

    def private_context(cfg, clients):
        return build_context(cfg, clients, oracle=PrivateLooking(cfg.training.batch_size))

    with pytest.raises(SweepError, match="fedavg/eps-4/seed-0: the run reports no differential"):
        run_sweep(tiny(), tmp_path, ["fedavg"], [0], [4.0], context_factory=private_context)
    assert not (tmp_path / "cells/fedavg/eps-4/seed-0/cell.json").exists()


def _dp_runtime() -> bool:
    try:
        import secure_fedora.secure.private  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(NO_PRIVACY or not _dp_runtime(), reason="this build has no DP runtime")
def test_numeric_epsilon_cell_runs_under_the_dp_runtime(tmp_path):
    result = run_sweep(tiny(), tmp_path, ["fedprox"], [0], [None, 4.0])
    assert result.ran == ["fedprox/eps-none/seed-0", "fedprox/eps-4/seed-0"]
    doc = json.loads((tmp_path / "cells/fedprox/eps-4/seed-0/cell.json").read_text())
    assert doc["results"]["assumptions"]["differential_privacy"] is True
    private = next(r for r in result.rows if r.epsilon == 4.0)
    assert private.epsilon_spent_max is not None and 0 < private.epsilon_spent_max <= 4.0
    assert next(r for r in result.rows if r.epsilon is None).epsilon_spent_max is None
    assert "| fedprox | 4 | 1 |" in (tmp_path / "sweep.md").read_text()


@needs_privacy
def test_ifca_training_loss_selection_under_privacy_fails_before_any_cell(tmp_path):
    def private_context(cfg, clients):  # private exactly when the cell enables privacy
        if not cfg.privacy.enabled:
            return plain_context(cfg, clients)
        return build_context(cfg, clients, oracle=PrivateLooking(cfg.training.batch_size))

    with pytest.raises(SweepError, match="ifca/eps-2/seed-0: .*selection_split='val'"):
        run_sweep(tiny(), tmp_path, ["fedora", "ifca"], [0], [None, 2.0],
                  context_factory=private_context)
    assert not (tmp_path / "cells").exists()
    # the failed attempt did not claim the directory: a corrected sweep may use it
    assert not (tmp_path / "sweep.json").exists()


def test_parse_epsilon():
    assert parse_epsilon("none") is None
    assert parse_epsilon("2.5") == 2.5
    # an infinite budget is non-private in each word for it ('inf' was, 'infinity'
    # was refused as not finite)
    for word in ("inf", "INF", "+inf", "infinity", "Non-Private", "nonprivate"):
        assert parse_epsilon(word) is None
    for bad in ("abc", "0", "-1", "nan", "-inf", "1e400"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_epsilon(bad)


def test_sweep_help_names_every_non_private_spelling():
    """--epsilons inf meant non-private while the help named only 'none'."""
    from secure_fedora.cli import build_parser

    sweep_parser = build_parser()._subparsers._group_actions[0].choices["sweep"]
    help_text = next(a.help for a in sweep_parser._actions if a.dest == "epsilons")
    assert "'none'" in help_text and "'inf'" in help_text and "non-private" in help_text



def test_the_sweep_module_still_offers_its_command_line(capsys):
    """The parser and handler moved to sweep_cli; sweep re-exported register and cmd_sweep but
    not main, its stand-alone entry point (``python -m secure_fedora.experiments.sweep``), so
    a script calling ``sweep.main(argv)`` failed with an ImportError."""
    from secure_fedora.experiments import sweep_cli

    assert sweep_mod.main is sweep_cli.main
    assert sweep_mod.register is sweep_cli.register and sweep_mod.cmd_sweep is sweep_cli.cmd_sweep
    with pytest.raises(SystemExit) as done:
        sweep_mod.main(["sweep", "--help"])
    assert done.value.code == 0 and "--epsilons" in capsys.readouterr().out

def test_epsilons_that_print_alike_get_distinct_cells():
    """1 and 1.0000001 shared the label "1" (6 significant digits): the second cell's training
    collided with the first's checkpoint in eps-1/. Labels now read back exactly; the usual
    short forms are unchanged."""
    cells = plan_cells(["fedavg"], [1.0, 1.0000001, 0.5, 8.0], [0])
    keys = [c.key for c in cells]
    assert keys == ["fedavg/eps-1/seed-0", "fedavg/eps-1.0000001/seed-0",
                    "fedavg/eps-0.5/seed-0", "fedavg/eps-8/seed-0"]
    assert [float(c.epsilon_label) for c in cells] == [1.0, 1.0000001, 0.5, 8.0]


def test_sweep_resumes_after_interruption_without_redoing_cells(tmp_path):
    cfg = tiny()
    methods, seeds = ["local", "fedavg", "ifca"], [0, 1]
    reference = run_sweep(cfg, tmp_path / "ref", methods, seeds)
    assert len(reference.ran) == 6 and not reference.skipped

    trained: list = []

    def interrupt(cell, rnd, total):
        trained.append((cell.key, rnd))
        if cell == Cell("ifca", None, 0) and rnd == 1:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(cfg, tmp_path / "cut", methods, seeds, on_round=interrupt)
    assert trained[-1] == ("ifca/eps-none/seed-0", 1)
    assert (tmp_path / "cut/cells/ifca/eps-none/seed-0/checkpoints/ifca.pt").exists()
    assert not (tmp_path / "cut/cells/ifca/eps-none/seed-0/cell.json").exists()

    trained.clear()
    seen = []
    resumed = run_sweep(cfg, tmp_path / "cut", methods, seeds,
                        on_round=lambda cell, rnd, total: trained.append((cell.key, rnd)),
                        on_cell=lambda cell, i, n, skipped: seen.append((cell.key, skipped)))
    # finished cells train no round again; the interrupted one resumes at round 2
    assert resumed.skipped == ["local/eps-none/seed-0", "fedavg/eps-none/seed-0"]
    assert trained == [("ifca/eps-none/seed-0", 2)] + [
        (f"{m}/eps-none/seed-1", r) for m in methods for r in (1, 2)]
    assert seen[0] == ("local/eps-none/seed-0", True) and seen[2] == ("ifca/eps-none/seed-0", False)
    assert (tmp_path / "cut/sweep.csv").read_text() == (tmp_path / "ref/sweep.csv").read_text()

    # a third run has nothing left to do and constructs no method at all
    calls: list = []
    again = run_sweep(cfg, tmp_path / "cut", methods, seeds, factory=counting_factory(calls))
    assert calls == [] and len(again.skipped) == 6


def test_tables_and_plots(tmp_path):
    cfg = tiny()
    result = run_sweep(cfg, tmp_path, ["fedora", "local", "fedavg"], [0, 1])
    rows = {r.method: r for r in result.rows}
    assert list(rows) == ["fedora", "local", "fedavg", "fedavg_ft"]
    with open(tmp_path / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["method"] for r in table] == list(rows)
    for line in table:
        row = rows[line["method"]]
        means = [sum(p) / len(p) for p in row.per_client]
        assert float(line["acc_mean"]) == pytest.approx(sum(means) / 2, abs=1e-6)
        assert float(line["acc_min"]) == pytest.approx(min(means), abs=1e-6)
        assert float(line["client_min_mean"]) == pytest.approx(
            sum(min(p) for p in row.per_client) / 2, abs=1e-6)
        assert line["epsilon"] == "none" and line["seeds"] == "2" and line["clients"] == "5"
    assert float(next(r for r in table if r["method"] == "local")["worse_than_local"]) == 0.0
    # worse-than-local counts follow the per-client comparison, seed by seed
    local = json.loads((tmp_path / "cells/local/eps-none/seed-1/cell.json").read_text())
    fed = json.loads((tmp_path / "cells/fedora/eps-none/seed-1/cell.json").read_text())
    below = sum(a < b for a, b in zip(fed["entries"]["fedora"], local["entries"]["local"], strict=True))
    assert rows["fedora"].worse_than_local[1] == below
    md = (tmp_path / "sweep.md").read_text()
    assert "| fedora | none | 2 |" in md and "clients below Local" in md
    assert "; privacy off" in md
    assert "| acc mean | acc min |" in md and "highest mean accuracy" in md
    for name in ("accuracy_vs_epsilon.png", "per_client_eps-none.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_worse_than_local_is_not_available_without_local(tmp_path):
    result = run_sweep(tiny(), tmp_path, ["fedavg"], [0])
    assert all(r.worse_than_local is None for r in result.rows)
    assert "n/a" in (tmp_path / "sweep.md").read_text()
    assert aggregate({}) == []


@pytest.mark.parametrize(("out", "problem"), [("", "out is empty"), ("sweep\x00", "out .* NUL")])
def test_an_out_directory_the_file_system_cannot_hold_is_a_config_error(tmp_path, monkeypatch,
                                                                         out, problem):
    """A NUL in ``out`` raised a raw 'ValueError: embedded null byte' from the Python API, and
    an empty one was taken for the current directory ('. is not a sweep directory')."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=problem):
        run_sweep(tiny(), out, ["local"], [0])
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_file_is_refused_as_a_file(tmp_path):
    """It was refused as a directory "that holds files but no sweep.json"."""
    out = tmp_path / "sweep.toml"
    out.write_text("x")
    with pytest.raises(SweepError, match=r"sweep.toml is a file, not a sweep directory"):
        run_sweep(tiny(), out, ["local"], [0])
    assert out.read_text() == "x"


def test_directory_of_another_config_is_refused(tmp_path):
    run_sweep(tiny(), tmp_path, ["local"], [0])
    other = tiny(training={"lr": 0.01})
    # named for the CLI and the Python API alike (it said only '--out')
    with pytest.raises(SweepError, match=r"another configuration.*\(--out, or run_sweep's out\)"):
        run_sweep(other, tmp_path, ["local"], [0])
    # without its manifest the directory is not taken for a sweep at all
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    (tmp_path / "sweep.json").unlink()
    with pytest.raises(SweepError, match="not a sweep directory"):
        run_sweep(other, tmp_path, ["local"], [0])
    # a cell directory whose cell.json belongs to another config is refused too (a manifest
    # edited to claim the other config)
    from secure_fedora.experiments.sweep import _base_hash

    manifest["base_config_hash"] = _base_hash(other)
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    with pytest.raises(SweepError, match="cell local/eps-none/seed-0"):
        run_sweep(other, tmp_path, ["local"], [0])


def test_corrupt_cell_file_is_refused(tmp_path):
    run_sweep(tiny(), tmp_path, ["local"], [0])
    (tmp_path / "cells/local/eps-none/seed-0/cell.json").write_text("{trunc")
    with pytest.raises(SweepError, match="unreadable"):
        run_sweep(tiny(), tmp_path, ["local"], [0])


def test_a_cell_file_without_per_client_figures_is_refused_and_nan_is_null(tmp_path):
    """A cell.json whose entries lacked the cell's method, or held a list or string among
    the figures, made aggregation raise a KeyError or TypeError; it is now refused in one
    line. A NaN token (a file written before strict JSON) is read as null, never as a figure."""
    run_sweep(tiny(), tmp_path, ["local"], [0])
    path = tmp_path / "cells/local/eps-none/seed-0/cell.json"
    good = json.loads(path.read_text())
    for entries, needle in (({"other": [0.5]}, "no entry for its method 'local'"),
                            ({"local": [0.5, [0.2]]}, "entries.local is not a list"),
                            ({"local": "0.5"}, "entries.local is not a list"),
                            ({"local": [True, 0.5]}, "entries.local is not a list")):
        path.write_text(json.dumps({**good, "entries": entries}))
        with pytest.raises(SweepError, match=needle) as err:
            run_sweep(tiny(), tmp_path, ["local"], [0])
        assert "\n" not in str(err.value) and "delete it to rerun the cell" in str(err.value)
    path.write_text(json.dumps({**good, "entries": {"local": [float("nan"), 0.5, 0.5, 0.5, 0.5]}}))
    row = run_sweep(tiny(), tmp_path, ["local"], [0]).rows[0]
    assert row.per_client == [[None, 0.5, 0.5, 0.5, 0.5]] and row.acc_mean is None


def test_command_line(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(
        'name = "cli-sweep"\nseed = 3\n'
        "[data]\nnum_clients = 5\ntrain_per_client = 32\nval_per_client = 16\ntest_per_client = 32\n"
        "[training]\nrounds = 2\nlocal_epochs = 1\nbatch_size = 16\nlr = 0.05\n"
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["sweep", str(cfg_path), "--out", str(out), "--methods", "local",
                              "ditto", "--quiet"])
    assert args.seeds is None and args.epsilons == [None]
    assert args.func(args) == 0
    assert (out / "cells/ditto/eps-none/seed-3/cell.json").exists()
    assert "cells run: 2" in capsys.readouterr().out
    assert args.func(args) == 0
    assert "skipped (already finished): 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", str(cfg_path), "--out", str(out), "--methods", "fedsgd"])
    bad = parser.parse_args(["sweep", str(cfg_path), "--out", str(tmp_path / "other"),
                             "--seeds", "1", "1", "--quiet"])
    assert run_command(bad.func, bad) == 2
    assert "seed twice" in capsys.readouterr().err


# --------------------------------------------------------------------------- shipped configs

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def shrunk(name):
    """A shipped config, validated as shipped, then shrunk to 6 small clients."""
    load_config(CONFIGS / name)
    raw = tomllib.loads((CONFIGS / name).read_text())
    raw["data"].update(num_clients=6, train_per_client=32, val_per_client=16)
    if raw["data"].get("test_per_client") is not None:
        raw["data"]["test_per_client"] = 32
    raw["training"].update(rounds=1, local_epochs=1)
    return parse_config(raw)


@pytest.mark.parametrize("name, partition", [
    ("dirichlet_0.1.toml", "dirichlet"), ("dirichlet_0.5.toml", "dirichlet"),
    ("pathological_2.toml", "pathological"),
])
def test_label_skew_configs_build_their_partitions(name, partition):
    cfg = shrunk(name)
    assert cfg.data.partition == partition and cfg.data.dataset == "mnist"
    clients = build_clients(cfg)
    assert len(clients) == 6 and all(c.num_test == 32 for c in clients)
    if partition == "pathological":
        assert all(len(set(c.train_y.tolist())) == 2 for c in clients)
    else:
        assert clients[0].meta["alpha"] == cfg.data.dirichlet_alpha


@pytest.mark.skipif(not FASHION_DIR.is_dir(),
                    reason=f"Fashion-MNIST is not installed ({FASHION_DIR} is absent; Debian "
                           "package dataset-fashion-mnist)")
def test_fashion_rotation_config_runs_a_sweep_cell(tmp_path):
    cfg = shrunk("fashion_rotation.toml")
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.partition == "rotation"
    result = run_sweep(cfg, tmp_path, ["fedora"], [0])
    assert result.ran == ["fedora/eps-none/seed-0"]


def test_each_epsilon_line_names_the_round_it_reports():
    """Under DP with private validation the report says the final round is shown (choosing a
    round on private validation data would be an unaccounted release); otherwise the best
    mean validation round."""
    private = tiny(privacy={"enabled": True, "epsilon": 3.0}, data={"validation": "private"},
                   fedora={"relatedness": "noised"})
    public = tiny()
    assert sweep_mod.privacy_settings(private).endswith("reported round: final round")
    assert sweep_mod.privacy_settings(public).endswith("reported round: best mean validation round")


PLUGIN = '''
import torch
from torch import nn


def load(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return {"x_train": x[:96], "y_train": y[:96], "x_test": x[96:], "y_test": y[96:]}


def mlp(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, num_classes))
'''


def _plugin_project(tmp_path, module: str, name: str, tail: str = "") -> Path:
    """A folder with PLUGIN as ``module`` and an ``exp.toml`` naming its source and model
    (3 clients, 1 round); ``tail`` ends the file (after ``[training]``). Returns the toml."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{module}.py").write_text(PLUGIN)
    (folder / "exp.toml").write_text(
        f'name = "{name}"\nseed = 0\nmethods = ["local"]\n'
        f'[data]\nsource = "{module}:load"\npartition = "iid"\nnum_clients = 3\n'
        'train_per_client = 24\nval_per_client = 8\ntest_per_client = 8\n'
        f'[model]\nfactory = "{module}:mlp"\n'
        '[training]\nrounds = 1\nlocal_epochs = 1\nbatch_size = 8\n' + tail)
    return folder / "exp.toml"


def test_a_config_with_plugins_sweeps_from_its_folder(tmp_path, monkeypatch):
    """data.source and model.factory, imported from the config file's folder, reach every
    cell (a cell's config is a copy); the defaults they replace are not taken as set."""
    path = _plugin_project(tmp_path, "sweep_plugin_data", "plugins", "[privacy]\ndelta = 1e-3\n")
    monkeypatch.chdir(tmp_path)  # the plug-in is found through the config's folder only
    cfg = load_config(path)
    result = run_sweep(cfg, tmp_path / "sweep", ["fedora", "local"], [0, 1], [None, 4.0])
    assert len(result.ran) == 6  # fedora x {none, 4} x 2 seeds, local (non-private) x 2 seeds
    setup = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()[2]
    assert "data.source sweep_plugin_data:load" in setup and "factory sweep_plugin_data:mlp" in setup


def test_private_cells_check_a_sources_own_clients_as_a_private_run_does(tmp_path):
    """Per-client data smaller than data.train_per_client runs non-private, and is refused
    for the private cells before anything trains (as ``secure-fedora run`` refuses it)."""
    from secure_fedora.data.sources import DataError

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "sweep_plugin_clients.py").write_text(
        "import torch\n\n\n"
        "def load(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    def split(n):\n"
        "        x = torch.randn(n, 6, generator=g)\n"
        "        return x, (x[:, 0] > 0).long()\n"
        "    return [{'train': split(n), 'val': split(8), 'test': split(8)} for n in (20, 24, 24)]\n"
        "\n\n"
        "def mlp(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, num_classes))\n")
    (folder / "exp.toml").write_text(
        'name = "sizes"\nseed = 0\nmethods = ["local"]\n'
        '[data]\nsource = "sweep_plugin_clients:load"\nnum_clients = 3\n'
        'train_per_client = 24\nval_per_client = 8\ntest_per_client = 8\n'
        '[model]\nfactory = "sweep_plugin_clients:mlp"\n'
        '[training]\nrounds = 1\nlocal_epochs = 1\nbatch_size = 8\n'
        '[privacy]\ndelta = 1e-3\n')
    cfg = load_config(folder / "exp.toml")
    assert len(run_sweep(cfg, tmp_path / "plain", ["fedavg"], [0], [None]).ran) == 1
    with pytest.raises(DataError, match="20 training rows but data.train_per_client = 24"):
        run_sweep(cfg, tmp_path / "private", ["fedavg"], [0], [None, 4.0])
    assert not (tmp_path / "private" / "cells").exists()


def test_a_binary_task_sweep_names_its_metric_roc_auc(tmp_path, monkeypatch):
    """training.loss = "bce" is scored by ROC AUC; the table, its prose and the run plots
    said "accuracy" for any metric."""
    cfg = load_config(_plugin_project(tmp_path, "sweep_plugin_auc", "auc", 'loss = "bce"\n'))
    result = run_sweep(cfg, tmp_path / "sweep", ["local"], [0])
    assert result.ran == ["local/eps-none/seed-0"]
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| AUC mean | AUC min | AUC std |" in md and "highest mean ROC AUC local" in md
    assert "ROC AUC is each client's test ROC AUC" in md and "accuracy" not in md


# --------------------------------------------------------------------------- regressions


@pytest.mark.skipif(NO_PRIVACY or not _dp_runtime(), reason="this build has no DP runtime")
def test_epsilon_lines_name_a_swept_method_not_the_configs_first(tmp_path):
    """sweep.md's settings line came from a cell of the config's first method (ifca, whose
    selection_split='train' is invalid under DP): every cell trained, then writing sweep.md
    failed naming a cell outside the sweep, and no table or plot was written."""
    cfg = tiny(methods=["ifca", "fedprox"])
    result = run_sweep(cfg, tmp_path, ["fedprox"], [0], [4.0])
    assert result.ran == ["fedprox/eps-4/seed-0"]
    md = (tmp_path / "sweep.md").read_text()
    assert "- epsilon 4: highest mean accuracy fedprox" in md and "privacy on, epsilon 4," in md
    assert (tmp_path / "plots" / "per_client_eps-4.png").exists()


@pytest.mark.skipif(NO_PRIVACY or not _dp_runtime(), reason="this build has no DP runtime")
def test_a_plan_over_budget_is_refused_before_any_cell_trains(tmp_path):
    """The budget plans were checked only when each cell started: eps-4 trained (and spent
    its budget) before eps 1e-06 failed with "over budget ... nothing was trained"."""
    rounds: list = []
    with pytest.raises(SweepError, match=r"fedprox/eps-1e-06/seed-0: .*over budget"):
        run_sweep(tiny(), tmp_path, ["fedprox"], [0], [4.0, 1e-6],
                  on_round=lambda *a: rounds.append(a))
    assert rounds == [] and not (tmp_path / "cells").exists()
    assert not (tmp_path / "sweep.json").exists()


CHANGING = '''
import os

import torch


def load(seed):
    g = torch.Generator().manual_seed(seed + int(os.environ.get("SWEEP_DATA_VERSION", "0")))
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return {"x_train": x[:96], "y_train": y[:96], "x_test": x[96:], "y_test": y[96:]}


def mlp(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, num_classes))
'''


def test_a_finished_cell_on_other_data_is_refused_not_mixed(tmp_path, monkeypatch):
    """Finished cells were reused when only the data changed (a data.source whose contents
    changed): old and new cells were averaged into one row. The cell's recorded data
    fingerprint is now checked; the cell is neither reused nor rerun."""
    path = _plugin_project(tmp_path, "sweep_plugin_changing", "changing")
    (path.parent / "sweep_plugin_changing.py").write_text(CHANGING)
    cfg = load_config(path)
    monkeypatch.setenv("SWEEP_DATA_VERSION", "0")
    run_sweep(cfg, tmp_path / "sweep", ["local"], [0])
    cell = tmp_path / "sweep/cells/local/eps-none/seed-0/cell.json"
    before = cell.read_text()
    again = run_sweep(cfg, tmp_path / "sweep", ["local"], [0, 1])  # same data: reused
    assert again.skipped == ["local/eps-none/seed-0"] and again.ran == ["local/eps-none/seed-1"]
    monkeypatch.setenv("SWEEP_DATA_VERSION", "1")
    with pytest.raises(SweepError, match="local/eps-none/seed-0 .* was run on other data"):
        run_sweep(cfg, tmp_path / "sweep", ["local"], [0, 1])
    assert cell.read_text() == before


def test_a_cell_with_the_earlier_single_hash_data_fingerprint_is_reused_on_the_same_data(
        tmp_path, monkeypatch):
    """A cell written when the data fingerprint was one hash over all clients' tensors (before
    it combined per-client digests) is reused on the same data, not refused as other data."""
    from secure_fedora.data.sources import legacy_fingerprint_clients

    path = _plugin_project(tmp_path, "sweep_plugin_legacy_fp", "changing")
    (path.parent / "sweep_plugin_legacy_fp.py").write_text(CHANGING)
    cfg = load_config(path)
    monkeypatch.setenv("SWEEP_DATA_VERSION", "0")
    run_sweep(cfg, tmp_path / "sweep", ["local"], [0])
    cell = tmp_path / "sweep/cells/local/eps-none/seed-0/cell.json"
    doc = json.loads(cell.read_text())
    legacy = legacy_fingerprint_clients(build_clients(cell_config(cfg, Cell("local", None, 0))))
    assert doc["data_fingerprint"] != legacy
    doc["data_fingerprint"] = legacy
    cell.write_text(json.dumps(doc))
    again = run_sweep(cfg, tmp_path / "sweep", ["local"], [0])
    assert again.skipped == ["local/eps-none/seed-0"] and again.ran == []
    monkeypatch.setenv("SWEEP_DATA_VERSION", "1")
    with pytest.raises(SweepError, match="local/eps-none/seed-0 .* was run on other data"):
        run_sweep(cfg, tmp_path / "sweep", ["local"], [0])


def test_a_non_private_cell_does_not_depend_on_the_configs_epsilon(tmp_path):
    """A non-private cell kept [privacy] epsilon in its config hash: changing only that
    epsilon refused the finished non-private cells ("another configuration"), although the
    sweep's manifest ignores it."""
    run_sweep(tiny(privacy={"epsilon": 2.0}), tmp_path, ["local"], [0])
    assert cell_config(tiny(privacy={"epsilon": 2.0}), Cell("local", None, 0)) == \
        cell_config(tiny(privacy={"epsilon": 5.0}), Cell("local", None, 0))
    again = run_sweep(tiny(privacy={"epsilon": 5.0}), tmp_path, ["local"], [0])
    assert again.skipped == ["local/eps-none/seed-0"] and again.ran == []


def _legacy_cell_config(cfg, cell):
    """cell_config as earlier versions built it: a non-private cell kept privacy.epsilon."""
    ccfg = cell_config(cfg, cell)
    if cell.epsilon is not None:
        return ccfg
    return ccfg.model_copy(update={"privacy": ccfg.privacy.model_copy(
        update={"epsilon": cfg.privacy.epsilon})})


def test_cells_of_an_earlier_version_stay_valid(tmp_path, monkeypatch):
    """Non-private cells written before the epsilon was normalised (their hash has the
    config's epsilon) are still reused, finished or interrupted, also once the config's
    epsilon changed (the manifest records the one they ran with)."""
    monkeypatch.setattr(sweep_mod, "cell_config", _legacy_cell_config)
    old = tiny(privacy={"epsilon": 2.0})
    run_sweep(old, tmp_path, ["local"], [0])

    def interrupt(cell, rnd, total):
        if rnd == 1:
            raise Stop

    with pytest.raises(Stop):
        run_sweep(old, tmp_path, ["local", "fedavg"], [0], on_round=interrupt)
    monkeypatch.setattr(sweep_mod, "cell_config", cell_config)
    trained: list = []
    new = run_sweep(tiny(privacy={"epsilon": 5.0}), tmp_path, ["local", "fedavg"], [0],
                    on_round=lambda cell, rnd, total: trained.append((cell.key, rnd)))
    assert new.skipped == ["local/eps-none/seed-0"]
    assert trained == [("fedavg/eps-none/seed-0", 2)]  # resumed from its checkpoint


def test_the_epsilon_spent_shown_is_rounded_up():
    """sweep.md (three decimals) and sweep.csv (four) rounded the largest epsilon spent to
    nearest, so 2.98341 read "2.983" and "2.9834", below what the accountant recorded."""
    row = SweepRow(method="fedavg", epsilon=3.0, seeds=[0], client_means=[0.5],
                   client_mins=[0.4], worse_than_local=None, per_client=[[0.4, 0.6]],
                   epsilon_spent=[2.98341])
    line = next(r for r in csv.DictReader(io.StringIO(rows_to_csv([row]))))
    assert line["epsilon_spent_max"] == "2.9835"
    md = rows_to_markdown(tiny(), [row], cell_configs={3.0: tiny()})
    assert "| n/a | 2.984 |" in md


def test_an_epsilon_spent_under_a_budget_of_more_decimals_is_not_shown_above_it():
    """A budget of more decimals than the column shows (0.0625; 0.03125 in sweep.csv): the
    spend under it, rounded up to three (four) decimals, read "0.063" ("0.0313"), above it."""
    rows = [SweepRow(method="fedavg", epsilon=eps, seeds=[0], client_means=[0.5],
                     client_mins=[0.4], worse_than_local=None, per_client=[[0.4, 0.6]],
                     epsilon_spent=[spent]) for eps, spent in ((0.0625, 0.0623), (0.03125, 0.03124))]
    lines = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert [r["epsilon_spent_max"] for r in lines] == ["0.0623", "0.03124"]
    md = rows_to_markdown(tiny(), rows[:1], cell_configs={0.0625: tiny()})
    assert "| n/a | 0.0623 |" in md


def test_the_settings_line_shows_the_budget_and_delta_exactly():
    """sweep.md's settings line showed epsilon and delta with :g (six significant digits,
    to nearest): a budget of 1.0000001 read "1", under the spend "1.0000001" its row showed
    (whose budget it is), and a delta of 1.2345678e-05 read as the larger 1.23457e-05."""
    def settings(epsilon: float, delta: float) -> str:
        return sweep_mod.privacy_settings(tiny(privacy={"enabled": True, "epsilon": epsilon,
                                                        "delta": delta},
                                               fedora={"relatedness": "noised"}))
    assert settings(1.0000001, 1.2345678e-5).startswith(
        "privacy on, epsilon 1.0000001, delta 1.2345678e-05;")
    assert settings(4.0, 1e-5).startswith("privacy on, epsilon 4, delta 1e-05;")


@pytest.mark.skipif(NO_PRIVACY or not _dp_runtime(), reason="this build has no DP runtime")
def test_sweep_md_states_what_its_epsilon_does_not_cover(tmp_path):
    """sweep.md listed the fedavg_ft row (fine-tuned outside the ledgers) with the cell's
    epsilon spent, and a reproducible-noise sweep as 'privacy on, epsilon 4', without what the
    cells' results.json state: their epsilon does not cover those results or that noise."""
    cfg = tiny(privacy={"noise": "reproducible"})
    run_sweep(cfg, tmp_path, ["fedavg"], [0], [4.0])
    md = (tmp_path / "sweep.md").read_text()
    results = json.loads((tmp_path / "cells/fedavg/eps-4/seed-0/cell.json").read_text())["results"]
    stated = results["assumptions"]["fedavg_finetuning"]
    assert f"  - stated by the results at epsilon 4 (fedavg_finetuning): {stated}" in md
    assert "| fedavg_ft | 4 |" in md
    assert "privacy on, epsilon 4, delta 1e-05 (noise reproducible: NOT private" in md


def test_sweep_md_does_not_call_an_encryption_assumption_an_epsilon_gap():
    """A FEDORA sweep over encrypted relatedness (noised+encrypted at a numeric epsilon) listed
    assumptions.ckks_keys and assumptions.encrypted_relatedness as 'not covered by epsilon 4',
    though the overlap blocks are computed from noised summaries (covered by that epsilon) and
    who holds the CKKS key is no part of the DP guarantee; each is shown as the results state it."""
    cfg = tiny(fedora={"relatedness": "encrypted"})
    cell = Cell("fedora", 4.0, 0)
    cell_cfg = cell_config(cfg, cell)
    assert cell_cfg.fedora.relatedness == "noised+encrypted"
    row = SweepRow(method="fedora", epsilon=4.0, seeds=[0], client_means=[0.5],
                   client_mins=[0.4], worse_than_local=None, per_client=[[0.4, 0.6]],
                   epsilon_spent=[3.9])
    from secure_fedora.runtimes.results import build_results

    results = build_results(cell_cfg, runtime="in-process", config_hash="h", metric="accuracy",
                            outcomes={}, privacy=None, clients=[])
    md = rows_to_markdown(cfg, [row], cell_configs={4.0: cell_cfg},
                          assumptions=sweep_mod._stated_assumptions({cell: {"results": results}},
                                                                    {cell: cell_cfg}))
    assert "not covered by epsilon" not in md
    assert "  - stated by the results at epsilon 4 (ckks_keys): every client holds" in md


def test_sweep_md_states_that_its_test_figures_are_outside_the_ledgers():
    """Every figure of sweep.md is a client's test metric, which a DP cell publishes outside
    its ledgers (its results.json ``assumptions.evaluation``: test splits treated as public).
    sweep.md listed only the assumptions beyond those every run states, so its per-client
    figures ("worst client", "clients below Local") at epsilon 4 read as covered by it; each
    numeric epsilon now lists the statement its cells' results make, and a non-private row
    none."""
    from secure_fedora.runtimes.results import EVALUATION_UNDER_DP, build_results

    cfg = tiny()
    cells = [Cell("fedavg", 4.0, 0), Cell("fedavg", None, 0)]
    docs, configs = {}, {}
    for cell in cells:
        configs[cell] = cell_config(cfg, cell)
        results = build_results(
            configs[cell],
            runtime="in-process",
            config_hash="h",
            metric="accuracy",
            outcomes={},
            privacy=None,
            clients=[],
        )
        docs[cell] = {"results": results}
    rows = [
        SweepRow(
            method="fedavg",
            epsilon=cell.epsilon,
            seeds=[0],
            client_means=[0.5],
            client_mins=[0.4],
            worse_than_local=None,
            per_client=[[0.4, 0.6]],
            epsilon_spent=[3.9 if cell.epsilon else None],
        )
        for cell in cells
    ]
    stated = sweep_mod._stated_assumptions(docs, configs)
    settings = {c.epsilon: configs[c] for c in cells}
    md = rows_to_markdown(cfg, rows, cell_configs=settings, assumptions=stated)
    assert docs[cells[0]]["results"]["assumptions"]["evaluation"] == EVALUATION_UNDER_DP
    assert md.count("(evaluation):") == 1
    assert f"  - stated by the results at epsilon 4 (evaluation): {EVALUATION_UNDER_DP}" in md


def test_sweep_md_words_the_ckks_parameters_as_the_report_does():
    """sweep.md printed assumptions.ckks_parameters as a raw Python dict ("{'relatedness':
    {'poly_modulus_degree': 8192, ...}}"); it now words them, with the security level the HE
    standard gives them, as the audit report does."""
    from privacy.ckks import parameter_notes
    from secure_fedora.runtimes.results import build_results

    cfg = tiny(fedora={"relatedness": "encrypted"})
    cell = Cell("fedora", 4.0, 0)
    cell_cfg = cell_config(cfg, cell)
    row = SweepRow(method="fedora", epsilon=4.0, seeds=[0], client_means=[0.5],
                   client_mins=[0.4], worse_than_local=None, per_client=[[0.4, 0.6]],
                   epsilon_spent=[3.9])
    results = build_results(cell_cfg, runtime="in-process", config_hash="h", metric="accuracy",
                            outcomes={}, privacy=None, clients=[])
    parameters = {"relatedness": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 60],
                                  "coeff_modulus_bits": 200, "global_scale": 2.0 ** 40,
                                  "global_scale_bits": 40.0, "security_level": "128-bit"}}
    results["assumptions"]["ckks_parameters"] = parameters
    md = rows_to_markdown(cfg, [row], cell_configs={4.0: cell_cfg},
                          assumptions=sweep_mod._stated_assumptions({cell: {"results": results}},
                                                                    {cell: cell_cfg}))
    [line] = [x for x in md.splitlines() if "(ckks_parameters)" in x]
    assert line == ("  - stated by the results at epsilon 4 (ckks_parameters): CKKS parameters "
                    "(relatedness): polynomial modulus degree 8192, coefficient modulus 60 + 40 + "
                    "40 + 60 = 200 bits, global scale 2^40: 128-bit security per the "
                    f"{parameter_notes(parameters)[0].split(' per the ')[1]}")
    assert "{" not in line


@pytest.mark.skipif(NO_PRIVACY or not _dp_runtime(), reason="this build has no DP runtime")
def test_sweep_md_lists_the_fine_tuning_a_method_registered_on_fedavg_states(tmp_path):
    """sweep.md read each method's class-level assumptions, so a method registered on FedAvg
    with its own finetune_epochs (README's fedavgm), whose DP cell's results.json states
    assumptions.<name>_finetuning for its <name>_ft row, was listed without it; sweep.md now
    lists what each cell's results state."""
    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.registry import METHODS

    def build(ctx, cfg):
        return FedAvg(ctx, finetune_epochs=1)

    build.algorithm = FedAvg
    METHODS.register("fedavg_sw", build)
    try:
        cfg = tiny(fedavg={"finetune_epochs": 0},
                   data={"num_clients": 3, "train_per_client": 16, "test_per_client": 16},
                   training={"rounds": 1})
        run_sweep(cfg, tmp_path, ["fedavg_sw"], [0], [4.0])
    finally:
        METHODS.unregister("fedavg_sw")
    md = (tmp_path / "sweep.md").read_text()
    cell = json.loads((tmp_path / "cells/fedavg_sw/eps-4/seed-0/cell.json").read_text())
    stated = cell["results"]["assumptions"]["fedavg_sw_finetuning"]
    assert "| fedavg_sw_ft | 4 |" in md
    assert f"  - stated by the results at epsilon 4 (fedavg_sw_finetuning): {stated}" in md
    assert "(fedavg_finetuning)" not in md


def test_sweep_md_explains_a_fine_tuned_row_only_when_the_table_has_one():
    """sweep.md's footer defined fedavg_ft ("the final global model fine-tuned per client")
    in every sweep, also in one of FEDORA and Local, whose table has no such row; it now
    defines each fine-tuned row the table holds, and none otherwise."""
    def row(method: str) -> SweepRow:
        return SweepRow(method=method, epsilon=None, seeds=[0], client_means=[0.5],
                        client_mins=[0.4], worse_than_local=None, per_client=[[0.4, 0.6]])

    defined = "the final global model fine-tuned per client"
    for methods in (["fedora", "local"], ["fedavg"], ["fedora", "ditto"]):
        md = rows_to_markdown(tiny(), [row(m) for m in methods])
        assert "_ft" not in md and defined not in md
        assert "would be an unaccounted release. *acc mean / min / std*" in md
    md = rows_to_markdown(tiny(), [row(m) for m in ("fedora", "fedavg", "fedavg_ft")])
    assert f"would be an unaccounted release (fedavg_ft: {defined}, its epoch chosen" in md


def test_a_null_per_client_figure_is_named_not_read_as_a_number(tmp_path):
    """A cell whose results hold a null per-client figure (strict JSON's NaN or infinity)
    made aggregation raise a TypeError; it is now no number: that row's statistics are n/a,
    sweep.md names the figure, and the other rows are unchanged."""
    cfg = tiny()
    run_sweep(cfg, tmp_path, ["local", "fedavg"], [0])
    path = tmp_path / "cells/fedavg/eps-none/seed-0/cell.json"
    doc = json.loads(path.read_text())
    doc["entries"]["fedavg"][2] = None
    doc["results"]["methods"]["fedavg"]["selected"]["per_client"][2] = None
    path.write_text(json.dumps(doc))
    result = run_sweep(cfg, tmp_path, ["local", "fedavg"], [0])
    assert result.ran == []
    rows = {r.method: r for r in result.rows}
    fedavg, ft = rows["fedavg"], rows["fedavg_ft"]
    assert fedavg.acc_mean is None and fedavg.acc_min is None and fedavg.client_min_mean is None
    assert fedavg.worse_than_local is None and fedavg.null_figures == [(0, 2)]
    assert ft.acc_mean == pytest.approx(sum(ft.per_client[0]) / 5) and not ft.null_figures
    table = {r["method"]: r for r in csv.DictReader(io.StringIO((tmp_path / "sweep.csv").read_text()))}
    assert table["fedavg"]["acc_mean"] == "" and table["fedavg"]["clients"] == "5"
    md = (tmp_path / "sweep.md").read_text()
    assert "| fedavg | none | 1 | n/a | n/a | n/a | n/a | n/a | - |" in md
    assert "- fedavg at epsilon none: null accuracy" in md and "seed 0 client 2" in md
    assert "(n/a: fedavg)" in md
    assert (tmp_path / "plots/per_client_eps-none.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("words, match", [
    (["none", "inf"], r"lists the non-private cell twice .*none, nonprivate, non-private, inf, "
                      r"\+inf, infinity, \+infinity all mean non-private"),
    (["infinity", "Non-Private"], "lists the non-private cell twice"),
    (["1", "1.0", "3"], r"lists 1 twice \(\[1\.0, 1\.0, 3\.0\]\): each epsilon is one cell"),
])
def test_sweep_says_why_two_epsilons_are_one(tmp_path, capsys, words, match):
    """`sweep --epsilons none inf` said 'epsilons lists a value twice: [None, None]': two words
    the user typed differently, and nothing said that both mean non-private (one cell)."""
    import re

    from secure_fedora.cli import main

    config = tmp_path / "c.toml"
    config.write_text('methods = ["local"]\n[data]\nnum_clients = 2\ntrain_per_client = 16\n'
                      'val_per_client = 8\ntest_per_client = 8\n')
    assert main(["sweep", str(config), "--out", str(tmp_path / "out"), "--quiet",
                 "--epsilons", *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(match, err) and not (tmp_path / "out").exists()


@pytest.mark.skipif(NO_PRIVACY or not _dp_runtime(), reason="this build has no DP runtime")
@pytest.mark.parametrize("kind", ["file", "open", "inside"])
def test_a_dp_cells_unusable_key_store_is_refused_before_any_cell_runs(tmp_path, kind):
    """`sweep --epsilons none 4` with a key store the DP cell's run refuses trained (and
    wrote) the non-private cell first; the refusal came only when the DP cell started."""
    out = tmp_path / "sweep"
    store = tmp_path / "store"
    if kind == "file":
        store.write_text("")
        match = "exists and is not a directory"
    elif kind == "open":
        store.mkdir()
        store.chmod(0o777)
        match = "permissions 0777: group or others could replace"
    else:
        store = out / "cells" / "fedprox" / "eps-4" / "seed-0" / "keys"
        match = "lies inside the run directory"
    rounds: list = []
    with pytest.raises(SweepError, match=f"^cell fedprox/eps-4/seed-0: key .*{match}"):
        run_sweep(tiny(security={"keystore": str(store)}), out, ["fedprox"], [0], [None, 4.0],
                  on_round=lambda *a: rounds.append(a))
    assert rounds == [] and not out.exists()


def test_a_cells_data_check_is_made_before_any_cell_runs(tmp_path):
    """fedora.q = 40 above the 32 training rows is refused for the non-private cell (plain
    relatedness), not for the DP one (noised): the DP cell trained first, then the other
    failed when it started."""
    rounds: list = []
    with pytest.raises(SweepError, match="^cell fedora/eps-none/seed-0: .*fedora.q = 40"):
        run_sweep(tiny(fedora={"q": 40}, training={"rounds": 1}), tmp_path / "sweep",
                  ["fedora"], [0], [4.0, None], on_round=lambda *a: rounds.append(a))
    assert rounds == [] and not (tmp_path / "sweep").exists()


def test_a_cell_that_fails_while_it_runs_is_named_and_the_finished_cells_kept(tmp_path, capsys,
                                                                            monkeypatch):
    """A run's own error in a cell (here FEDORA's power iteration, given 10,000 iterations
    where two clients each other's only neighbour need 56,640 at alpha 0.9995) was printed as
    'error: power iteration did not converge ...': which of the sweep's cells failed was not
    said, nor that the cells before it were kept. (The config refuses an alpha whose bound
    exceeds the cap, so the run's cap is lowered here instead.)"""
    from secure_fedora.algorithms import fedora as fedora_math
    from secure_fedora.cli import main

    monkeypatch.setattr(fedora_math, "MAX_POWER_ITERATIONS", 10_000)

    config = tmp_path / "c.toml"
    config.write_text('methods = ["local", "fedora"]\n[data]\nnum_clients = 3\n'
                      'train_per_client = 16\nval_per_client = 8\ntest_per_client = 8\n'
                      '[training]\nrounds = 1\nlocal_epochs = 1\nbatch_size = 8\n'
                      '[fedora]\nk = 1\npropagation = "power"\nalpha = 0.9995\n')
    out = tmp_path / "out"
    argv = ["sweep", str(config), "--out", str(out), "--quiet", "--methods", "local", "fedora"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("error: cell fedora/eps-none/seed-0: power iteration did not converge")
    assert "finished cells are kept" in err
    assert (out / "cells/local/eps-none/seed-0/cell.json").exists()


def test_a_key_store_no_cell_reads_is_warned_about_once(tmp_path, caplog):
    """`sweep --epsilons none` whose base config names [security] keystore ignored the key
    silently (a run without privacy reads no key store; `run` refuses it there). It is not
    refused (the same base config's DP cells use it), but warned about once; a sweep with a
    DP cell does not warn."""
    import logging

    cfg = tiny(security={"keystore": str(tmp_path / "store")}, training={"rounds": 1})
    with caplog.at_level(logging.WARNING):
        run_sweep(cfg, tmp_path / "sweep", ["fedavg"], [0, 1], [None])
    warned = [r.getMessage() for r in caplog.records if "keystore" in r.getMessage()]
    assert warned == [f'[security] keystore = "{tmp_path / "store"}" is unused: this sweep runs '
                      "no DP cell (only epsilon none), and a run without privacy reads no key "
                      "store; a sweep's DP cells (a numeric epsilon) use it"]
    assert not (tmp_path / "store").exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_sweep(cfg, tmp_path / "dp", ["fedavg"], [0], [None, 4.0])
    assert not [r for r in caplog.records if "is unused" in r.getMessage()]
    assert (tmp_path / "store" / "allowlist.json").exists()


@needs_privacy
@pytest.mark.parametrize("enabled, key, named", [
    ("false", "1", None),
    ("true", "1", None),
    ("false", "7", "privacy.overrides.7: not a client index in [0, 5)"),
])
def test_a_sweep_whose_cells_leave_privacy_overrides_unused_is_refused(tmp_path, capsys, enabled,
                                                                       key, named):
    """`run` refuses privacy.overrides with privacy off; a sweep ran its epsilon-none cells
    (privacy off) with them, ignored. Now one error line naming the cell, before anything is
    built or written."""
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        'name = "overrides-sweep"\nseed = 0\n'
        "[data]\nnum_clients = 5\ntrain_per_client = 32\nval_per_client = 16\ntest_per_client = 32\n"
        "[training]\nrounds = 1\nlocal_epochs = 1\nbatch_size = 16\nlr = 0.05\n"
        f'[privacy]\nenabled = {enabled}\n[privacy.overrides."{key}"]\nepsilon = 1.0\n'
        + ('[fedora]\nrelatedness = "noised"\n' if enabled == "true" else "")
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["sweep", str(cfg_path), "--out", str(out), "--methods", "fedavg",
                              "local", "--quiet"])
    assert run_command(args.func, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    assert err.startswith(f"error: cell fedavg/eps-none/seed-0 and 1 more: {named + '; ' if named else ''}"
                          f'privacy.overrides ("{key}") is unused: the cell runs with [privacy] '
                          "enabled = false (epsilon none), and a run without privacy spends no "
                          "budget; remove [privacy.overrides] from the config")


@needs_privacy
def test_a_sweep_started_with_unused_privacy_overrides_still_resumes(tmp_path, monkeypatch,
                                                                     caplog):
    """A sweep started (by an earlier version) with privacy.overrides its cells leave unused
    continues with one warning: removing them would make its directory another
    configuration's. Its finished cells are kept; a new sweep directory refuses them."""
    import logging

    cfg = tiny(privacy={"overrides": {"1": {"epsilon": 1.0}}}, training={"rounds": 1})
    with monkeypatch.context() as m:  # the sweep as an earlier version started it
        m.setattr(sweep_mod, "_unused_overrides", lambda *a: None)
        run_sweep(cfg, tmp_path / "sweep", ["fedavg"], [0])
    with caplog.at_level(logging.WARNING):
        again = run_sweep(cfg, tmp_path / "sweep", ["fedavg"], [0, 1])
    assert again.skipped == ["fedavg/eps-none/seed-0"] and again.ran == ["fedavg/eps-none/seed-1"]
    warned = [r.getMessage() for r in caplog.records if "privacy.overrides" in r.getMessage()]
    assert warned == ['cell fedavg/eps-none/seed-0 and 1 more: privacy.overrides ("1") is unused: '
                      "the cell runs with [privacy] enabled = false (epsilon none), and a run "
                      "without privacy spends no budget; this sweep started with them, so it "
                      "continues"]
    with pytest.raises(SweepError, match=r"^cell fedavg/eps-none/seed-0: privacy.overrides"):
        run_sweep(cfg, tmp_path / "new", ["fedavg"], [0])
    assert not (tmp_path / "new").exists()


@needs_privacy
def test_a_sweep_refuses_only_the_settings_no_cell_reads(tmp_path):
    """A sweep's cells are the user's config with one method each and privacy on or off by
    the epsilon column (``model_copy``, which marks privacy.epsilon as set): a key is unused
    only where no cell reads it. [baselines.fedprox] (the fedprox cell), the summary's noise
    (the DP FEDORA cell), privacy.epsilon and training.clip_grad_norm (the non-private cells)
    are read; fedora.propagation_tolerance beside an exact propagation is refused, named."""
    keys = dict(baselines={"fedprox": {"mu": 0.1}}, training={"clip_grad_norm": 1.0},
                privacy={"enabled": True, "epsilon": 3.0, "delta": 1e-3, "summary_clip": 2.0},
                fedora={"relatedness": "noised", "tau": 5.0})
    out, cells, _ = sweep_mod.check_sweep(tiny(**keys), tmp_path / "a",
                                          ["fedora", "fedprox", "fedavg"], [0], [None, 1.0])
    assert len(cells) == 6 and not out.exists()
    exact = tiny(**{**keys, "fedora": {"relatedness": "noised", "propagation": "dense",
                                       "propagation_tolerance": 1e-3}})
    with pytest.raises(SweepError, match=r"^in every cell of this sweep, fedora\.propagation_"
                                         r"tolerance = 0\.001 is unused: it bounds the truncated"):
        sweep_mod.check_sweep(exact, tmp_path / "b", ["fedora"], [0], [None, 1.0])
    assert not (tmp_path / "b").exists()


def test_sweep_config_alone_writes_to_a_default_directory_and_resumes_there(tmp_path, monkeypatch,
                                                                            capsys):
    """The issue's command is `secure-fedora sweep CONFIG`: without --out the sweep goes to
    runs/<name>-sweep (one directory per config name, so the same command resumes it)."""
    from secure_fedora.cli import main

    config = tmp_path / "c.toml"
    config.write_text('name = "bare"\nmethods = ["local"]\n[data]\nnum_clients = 2\n'
                      'train_per_client = 16\nval_per_client = 8\ntest_per_client = 8\n'
                      '[training]\nrounds = 1\nlocal_epochs = 1\n')
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(config), "--methods", "local", "--quiet"]) == 0
    out = tmp_path / "runs" / "bare-sweep"
    assert (out / "sweep.md").is_file() and (out / "sweep.csv").is_file()
    assert "cells run: 1, skipped (already finished): 0" in capsys.readouterr().out
    assert main(["sweep", str(config), "--methods", "local", "--quiet"]) == 0
    assert "cells run: 0, skipped (already finished): 1" in capsys.readouterr().out
    assert main(["sweep", str(config), "--out", "", "--methods", "local", "--quiet"]) == 2


def test_a_sweep_that_creates_its_key_store_names_only_the_config_key_to_choose_another(
        tmp_path, monkeypatch, caplog):
    """A sweep's DP cell that created the default key store said "choose another with the
    keystore= argument or [security] keystore", but neither `secure-fedora sweep` nor
    run_sweep takes such an argument: the config key is a sweep's only way."""
    import logging

    monkeypatch.setenv("SECURE_FEDORA_KEYSTORE_HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.WARNING):
        run_sweep(tiny(training={"rounds": 1}), tmp_path / "sweep", ["fedavg"], [0], [4.0])
    notes = [r.getMessage() for r in caplog.records if "created the key store" in r.getMessage()]
    assert len(notes) == 1 and str(tmp_path / "home") in notes[0]
    assert notes[0].endswith("choose another with [security] keystore")
    assert "keystore= argument" not in notes[0] and "--keystore" not in notes[0]
