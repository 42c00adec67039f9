"""The Python API (secure_fedora.api): what Experiment accepts as its config, and the results
helpers."""

from __future__ import annotations

import pytest

from secure_fedora.api import Experiment, Results
from secure_fedora.core.config import ConfigError, parse_config


def _results(selection: str) -> Results:
    selected = {"mean": 0.5, "min": 0.25, "max": 0.75, "std": 0.25, "per_client": [0.25, 0.75],
                "round": 3}
    return Results({"name": "run", "metric": "accuracy",
                    "assumptions": {"model_selection": selection},
                    "methods": {"fedora": {"selected": selected},
                                "fedavg_ft": {"selected": {k: v for k, v in selected.items()
                                                           if k != "round"}}}})


def test_summary_names_how_the_reported_round_was_chosen():
    """Under DP with private validation data the final round is reported, but the summary
    said "at the best-validation round" for every run."""
    final = _results("final_round").summary()
    assert final.splitlines()[0] == "run: test accuracy at the final round"
    assert "best-validation" not in final
    best = _results("validation").summary()
    assert best.splitlines()[0] == "run: test accuracy at the best-validation round"
    assert best.splitlines()[2].split() == ["fedora", "0.5000", "0.2500", "0.7500", "0.2500", "3"]


def test_summary_names_a_client_whose_selected_metric_is_stale():
    """A Flower run's results name a client that missed the selected round's evaluation
    (selected.stale_clients); Results.summary() showed its older metric as that round's."""
    results = _results("validation")
    results["methods"]["fedora"]["selected"]["stale_clients"] = [
        {"client": 1, "round": 2}, {"client": 2, "round": None}]
    lines = results.summary().splitlines()
    assert lines[-2:] == ["fedora: client 1's metric is from round 2, not the selected round's",
                          "fedora: client 2's metric is a placeholder 0, not the selected "
                          "round's"]
    assert "client" not in _results("validation").summary()


def test_summary_names_the_rounds_selection_did_not_consider():
    """selected.unmeasured_rounds (some client had no measured metric yet) gets its line."""
    results = _results("validation")
    results["methods"]["fedora"]["selected"]["unmeasured_rounds"] = [1]
    assert results.summary().splitlines()[-1] == (
        "fedora: rounds [1] were not considered for selection (some client had no measured "
        "metric yet)")


def test_a_non_finite_figure_is_shown_not_a_type_error():
    """results.json writes a NaN or infinite figure as null and names it under
    non_finite_values; summary() and mean() raised a raw TypeError on it."""
    results = _results("validation")
    results["methods"]["fedora"]["selected"].update(mean=None, std=None)
    results["non_finite_values"] = {"/methods/fedora/selected/mean": "inf",
                                    "/methods/fedora/selected/std": "nan"}
    assert results.summary().splitlines()[2].split() == ["fedora", "n/a", "0.2500", "0.7500",
                                                         "n/a", "3"]
    assert results.mean("fedora") == float("inf")
    del results["non_finite_values"]
    assert results.mean("fedora") != results.mean("fedora")  # NaN: no record of the value
    assert results.mean("fedavg_ft") == 0.5


CONFIG = {"methods": ["fedora", "local"],
          "data": {"partition": "iid", "num_clients": 3, "train_per_client": 20,
                   "val_per_client": 5, "test_per_client": 5},
          "training": {"rounds": 2}}


def test_an_experimentconfig_changed_by_model_copy_is_validated_again(tmp_path) -> None:
    """model_copy(update=...) skips pydantic's validators: Experiment took training.rounds = 0
    (and reported a selected accuracy of 0.0 for a run that never trained), fedora.k beyond
    the clients, a negative learning rate (a raw ValueError mid-run) and, under DP, the
    unaccounted 'plain' relatedness (a pydantic ValidationError). Each is now a ConfigError
    before anything is built or written."""
    cfg = parse_config(CONFIG)
    private = parse_config({**CONFIG, "fedora": {"relatedness": "noised"},
                            "privacy": {"enabled": True, "delta": 1e-3}})
    derived = {
        "training.rounds": cfg.model_copy(update={"training": cfg.training.model_copy(
            update={"rounds": 0})}),
        "fedora.k": cfg.model_copy(update={"fedora": cfg.fedora.model_copy(update={"k": 5})}),
        "training.lr": cfg.model_copy(update={"training": cfg.training.model_copy(
            update={"lr": -1.0})}),
        "relatedness 'plain'": private.model_copy(update={"fedora": private.fedora.model_copy(
            update={"relatedness": "plain"})}),
    }
    for key, bad in derived.items():
        with pytest.raises(ConfigError, match=f"(?s)invalid configuration \\(ExperimentConfig\\):.*{key}"):
            Experiment(bad, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    same = cfg.model_copy(update={"training": cfg.training.model_copy(update={"rounds": 3})})
    assert Experiment(same, run_dir=tmp_path / "run").config is same


@pytest.mark.parametrize(("run_dir", "problem"), [("", "run_dir is empty"),
                                                  ("runs/a\x00b", "run_dir .* NUL")])
def test_a_run_dir_the_cli_would_refuse_is_a_config_error(run_dir, problem) -> None:
    """An empty run_dir meant the current directory; one with a NUL character failed with a
    raw ValueError once the run made its directory."""
    with pytest.raises(ConfigError, match=problem):
        Experiment(CONFIG, run_dir=run_dir)


def test_results_load_refuses_a_missing_empty_or_corrupt_results_json(tmp_path):
    """Results.load of a directory without results.json raised a bare FileNotFoundError,
    of a NUL path a ValueError, of "" it read ./results.json, of a corrupt file a
    JSONDecodeError: now the toolkit's errors, naming the path."""
    from secure_fedora.runtimes.rundir import RunDirError

    with pytest.raises(RunDirError, match=r"cannot read .*missing/results.json"):
        Results.load(tmp_path / "missing")
    for bad in ("", "  ", "r\x00"):
        with pytest.raises(ConfigError, match="run_dir"):
            Results.load(bad)
    (tmp_path / "results.json").write_text('{"metric": ')
    with pytest.raises(RunDirError, match="is not valid JSON"):
        Results.load(tmp_path)
    (tmp_path / "results.json").write_text("[1]")
    with pytest.raises(RunDirError, match="holds no results document"):
        Results.load(tmp_path)
    (tmp_path / "results.json").write_text('{"metric": "auc"}')
    assert Results.load(str(tmp_path)).metric == "auc"


@pytest.mark.parametrize("progress", ["x", 1.5, True])
def test_a_progress_that_is_not_callable_is_refused_before_the_run(tmp_path, progress):
    """It was called after the first round: a TypeError ('str' object is not callable) left a
    half-run directory behind."""
    config = {"methods": ["local"], "training": {"rounds": 1},
              "data": {"num_clients": 2, "train_per_client": 20, "val_per_client": 8,
                       "test_per_client": 8, "groups": 2}}
    with pytest.raises(ConfigError, match="progress must be a callable"):
        Experiment(config, run_dir=tmp_path / "run").run(progress=progress)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["no", 1, None])
def test_resume_must_be_a_bool(tmp_path, bad) -> None:
    """run(resume="no") or resume=1 resumed (a truthy value), resume=None started afresh."""
    with pytest.raises(ConfigError, match="^resume must be True or False"):
        Experiment(CONFIG, run_dir=tmp_path / "run").run(resume=bad)
    assert not (tmp_path / "run").exists()


def test_results_refuses_a_run_dir_that_is_not_a_path() -> None:
    with pytest.raises(ConfigError, match="^run_dir must be a path"):
        Results({"methods": {}}, run_dir=5)


@pytest.mark.parametrize("config", [5, None, ["fedora"], b"run.toml"])
def test_a_config_of_another_type_is_a_config_error(tmp_path, config) -> None:
    """Experiment(5) or run(None) raised a raw TypeError (a traceback from the CLI layer)."""
    with pytest.raises(ConfigError, match="^config must be an ExperimentConfig, a dict or a TOML "
                                          "path, got "):
        Experiment(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_configured_keystore_without_privacy_is_refused_before_the_run(tmp_path) -> None:
    """Experiment.run() with `[security] keystore` and privacy off ran and ignored the key
    store (such a run reads none): a ConfigError naming the key, nothing written."""
    run_dir = tmp_path / "run"
    exp = Experiment({"methods": ["local"], "security": {"keystore": str(tmp_path / "store")},
                      "data": {"num_clients": 2, "train_per_client": 8, "val_per_client": 4,
                               "test_per_client": 4}}, run_dir=run_dir)
    with pytest.raises(ConfigError, match=r"^\[security\] keystore = .* is unused: .*remove "
                                          r"the key, or enable \[privacy\]$"):
        exp.run()
    assert not run_dir.exists() and not (tmp_path / "store").exists()


def _federated(n: int = 16) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [{split: (rng.normal(size=(rows, 4)).astype("float32"), np.arange(rows) % 2)
             for split, rows in (("train", n), ("val", 8), ("test", 8))} for _ in range(2)]


def test_run_takes_the_key_store_as_the_cli_does(tmp_path, monkeypatch) -> None:
    """Experiment.run() had no key-store argument (the CLI has --keystore): a DP run now keeps
    its private keys in ``keystore=`` (before [security] keystore and the default), and the
    argument is refused, before anything is written, with privacy off or when empty."""
    from secure_fedora.api import run

    home = tmp_path / "home"
    monkeypatch.setenv("SECURE_FEDORA_KEYSTORE_HOME", str(home))
    dp = {"methods": ["local"], "training": {"rounds": 1, "batch_size": 8},
          "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8},
          "privacy": {"enabled": True, "delta": 1e-3},
          "security": {"keystore": str(tmp_path / "configured")}}
    store = tmp_path / "store"
    run(dp, data=_federated(), run_dir=tmp_path / "dp", keystore=store)
    assert (store / "allowlist.json").is_file() and (store / "operator.ed25519.key").is_file()
    assert not (tmp_path / "configured").exists() and not home.exists()
    assert not list((tmp_path / "dp").rglob("*.key"))
    plain = {**dp, "privacy": {"enabled": False}, "security": {}}
    for kwargs, problem in (({"config": plain, "keystore": store},
                             r"^the keystore= argument is unused: .*leave the keystore= argument "
                             r"out, or enable \[privacy\]$"),
                            ({"config": dp, "keystore": " "}, "keystore is empty")):
        with pytest.raises(ConfigError, match=problem):
            run(kwargs["config"], data=_federated(), run_dir=tmp_path / "no",
                keystore=kwargs["keystore"])
        assert not (tmp_path / "no").exists()


def test_an_experiment_without_run_dir_leaves_no_directory_it_did_not_write(tmp_path,
                                                                            monkeypatch) -> None:
    """Experiment() without run_dir made its temporary directory when constructed, so every
    experiment only checked, or whose run failed before writing anything, left an empty
    ``secure-fedora-NAME-*`` directory behind (the test suite alone left over a thousand)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    Experiment(CONFIG).check()
    assert made() == []

    def broken_model(shape: tuple[int, ...], classes: int) -> None:
        raise RuntimeError("this model cannot be built")

    exp = Experiment(CONFIG, model=broken_model)
    for _ in range(2):
        with pytest.raises(Exception, match="this model cannot be built"):
            exp.run()
        assert made() == []
    exp.model_factory = None
    results = exp.run()
    assert made() == [results.run_dir.name] and results.run_dir.name.startswith("secure-fedora-")
    assert (results.run_dir / "results.json").is_file()


def test_privacy_overrides_without_privacy_are_refused_before_the_run(tmp_path) -> None:
    """Experiment.run() with privacy.overrides and privacy off ran and ignored them (a bad
    client index included): a ConfigError naming the index, nothing written."""
    run_dir = tmp_path / "run"
    exp = Experiment({"methods": ["local"], "privacy": {"overrides": {"-1": {"epsilon": 1.0}}},
                      "data": {"num_clients": 2, "train_per_client": 8, "val_per_client": 4,
                               "test_per_client": 4}}, run_dir=run_dir)
    with pytest.raises(ConfigError, match=r"^privacy\.overrides\.-1: not a client index in "
                                          r"\[0, 2\); privacy\.overrides \(\"-1\"\) is unused: "
                                          r".*remove \[privacy\.overrides\], or enable "
                                          r"\[privacy\]$"):
        exp.run()
    assert not run_dir.exists()


def _user_data(seed: int = 0) -> dict:
    """A notebook's own float64 arrays: 4 classes of 6 features."""
    import numpy as np

    g = np.random.default_rng(seed)
    x, y = g.normal(size=(120, 6)), g.integers(0, 4, size=120)
    return {"x_train": x[:90], "y_train": y[:90], "x_test": x[90:], "y_test": y[90:]}


def _mlp(input_shape, num_classes):
    import math

    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.ReLU(),
                         nn.Linear(8, num_classes))


def test_a_float64_default_dtype_runs_as_float32_and_is_left_as_it_was(tmp_path) -> None:
    """A notebook with torch.set_default_dtype(torch.float64): the factory's model was refused
    as float64 ('the federation stores parameters as float32'), and one made float32 with
    .float() failed in round 1 with a raw RuntimeError (a float64 gradient for a float32
    tensor). The run is now the one a float32 process makes, and the default is restored."""
    import torch

    config = {**CONFIG, "methods": ["fedora", "local", "fedavg"]}
    reference = Experiment(config, data=_user_data(), model=_mlp, run_dir=tmp_path / "a").run()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for name, factory in (("b", _mlp), ("c", lambda s, c: _mlp(s, c).float())):
            results = Experiment(config, data=_user_data(), model=factory,
                                 run_dir=tmp_path / name).run()
            assert torch.get_default_dtype() == torch.float64
            assert {m: results.selected(m) for m in results.method_names} == \
                {m: reference.selected(m) for m in reference.method_names}
    finally:
        torch.set_default_dtype(before)


def test_a_built_model_instead_of_a_factory_is_refused_naming_the_argument(tmp_path) -> None:
    """model=MyNet(...) (a built module, which is callable) was called as a factory and failed
    with 'Sequential.forward() takes 2 positional arguments but 3 were given'; a model.factory
    naming a module object failed alike. Both now say that a factory is needed, before
    anything runs."""
    from secure_fedora.learning.models import ModelError, build_user_model

    built = _mlp((6,), 4)
    with pytest.raises(ModelError, match=r"^model= is a built Sequential, not a factory: pass "
                                         r"a function\(input_shape, num_classes\)"):
        Experiment(CONFIG, data=_user_data(), model=built, run_dir=tmp_path / "run")
    with pytest.raises(ModelError, match=r"^model= is a int, not a factory"):
        Experiment(CONFIG, data=_user_data(), model=5, run_dir=tmp_path / "run")
    with pytest.raises(ModelError, match=r"^model.factory 'net:model' is a built Sequential, "
                                         r"not a factory"):
        build_user_model(built, (6,), 4, 0, "model.factory 'net:model'")
    assert not (tmp_path / "run").exists()


def test_a_client_whose_rows_span_fewer_than_q_directions_is_refused_by_name(tmp_path) -> None:
    """fedora.q above the rank of a client's summary rows (here 16 copies of one row) was
    accepted: the summary's extra directions were whichever null-space vectors LAPACK
    returned, so the similarities, the graph and every FEDORA model depended on them. Such a
    client is now refused, named, before any model trains; full-rank data is unchanged."""
    from secure_fedora.algorithms.fedora import RelatednessError

    data = _federated()
    x, y = data[1]["train"]
    data[1]["train"] = (x[:1].repeat(16, axis=0), y[:1].repeat(16))
    config = {"methods": ["fedora"], "training": {"rounds": 1, "batch_size": 8},
              "data": {"num_clients": 2}, "fedora": {"q": 2, "k": 1}}
    with pytest.raises(RelatednessError, match=r"^fedora\.q = 2: client 1's summary rows .* "
                                               r"span only 1 direction .* use fedora\.q <= 1$"):
        Experiment(config, data=data, model=_mlp, run_dir=tmp_path / "q2").run()
    assert not (tmp_path / "q2" / "results.json").exists()
    results = Experiment({**config, "fedora": {"q": 1, "k": 1}}, data=data, model=_mlp,
                         run_dir=tmp_path / "q1").run()
    assert results.selected("fedora")["mean"] is not None
    Experiment(config, data=_federated(), model=_mlp,
               run_dir=tmp_path / "full").run()


@pytest.mark.parametrize(("engine", "named"), [
    ("loop", r"^local round 1: client 0: local training produced non-finite parameters"),
    ("batched", r"^local round \d: local training produced non-finite parameters for clients"),
])
def test_a_diverged_client_update_names_the_method_and_round(tmp_path, engine, named) -> None:
    """A learning rate that makes training non-finite stopped the in-process run with "client
    0: local training produced non-finite parameters" (the batched engine: "... for clients
    [0, 1]"), naming neither the method nor the round (the Flower server's message names the
    round); it now names both, keeping the error's type and its failed clients."""
    from secure_fedora.learning.batched import BatchedTrainingError
    from secure_fedora.learning.client import ClientUpdateError

    config = {"methods": ["local"], "data": {"num_clients": 2},
              "training": {"rounds": 2, "batch_size": 8, "lr": 1e5, "weight_decay": 0.0,
                           "engine": engine}}
    with pytest.raises(ClientUpdateError, match=named) as err:
        Experiment(config, data=_federated(), model=_mlp, run_dir=tmp_path / "run").run()
    if engine == "batched":
        assert isinstance(err.value, BatchedTrainingError) and err.value.failed
