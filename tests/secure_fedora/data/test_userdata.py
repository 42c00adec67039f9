"""User data, models and losses named in the config (or given to the Python API): what runs,
and the clear error each bad plug-in gets before anything trains."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
import torch

from privacy.dpsgd import DPSGDError
from secure_fedora.algorithms import fedora
from secure_fedora.api import Experiment
from secure_fedora.core.config import ConfigError, load_config, parse_config
from secure_fedora.core.plugins import PluginError
from secure_fedora.data.sources import DataError
from secure_fedora.learning.models import ModelError

PLUGIN = textwrap.dedent('''
    import math
    import numpy as np
    import torch
    from torch import nn

    def _table(seed, n=240, d=6):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)
        return x, y

    def good(seed):
        x, y = _table(seed)
        return {"x_train": x[:180], "y_train": y[:180], "x_test": x[180:], "y_test": y[180:]}

    def multilabel(seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(240, 8)).astype(np.float32)
        y = (x[:, :5] + 0.3 * rng.normal(size=(240, 5)) > 0).astype(np.float32)
        return {"x_train": x[:180], "y_train": y[:180], "x_test": x[180:], "y_test": y[180:]}

    def federated(seed):
        x, y = _table(seed, n=300)
        sizes = [(30, 10, 10), (50, 10, 10), (40, 20, 20)]
        out, at = [], 0
        for tr, va, te in sizes:
            part = {}
            for split, k in (("train", tr), ("val", va), ("test", te)):
                part[split] = (torch.from_numpy(x[at:at + k]), torch.from_numpy(y[at:at + k]))
                at += k
            out.append(part)
        return out

    def mlp(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.ReLU(),
                             nn.Linear(16, num_classes))

    def per_sample_ce(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")
    per_sample_ce.metric = "accuracy"

    def mean_ce(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets)

    def ce_scored_by_auc(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")
    ce_scored_by_auc.metric = "auc"

    def focal(outputs, targets):
        p = torch.sigmoid(outputs[:, 0])
        t = targets.to(p.dtype)
        bce = nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], t, reduction="none")
        return (1 - (p * t + (1 - p) * (1 - t))) ** 2 * bce
    focal.metric = "auc"

    def binary(seed):
        x, y = _table(seed)
        y = (y % 2).astype(np.int64)
        return {"x_train": x[:180], "y_train": y[:180], "x_test": x[180:], "y_test": y[180:]}

    def int_loss(outputs, targets):
        return (outputs.argmax(dim=1) != targets).long()

    def writes_targets(outputs, targets):
        targets.clamp_(min=0)  # labels are >= 0: the same values, written
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    def writes_large_batches_targets(outputs, targets):
        if targets.shape[0] >= 4:  # the probes before training pass 2 rows
            targets.clamp_(min=0)
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    class _Detached(nn.Module):
        def __init__(self, width, num_classes):
            super().__init__()
            self.linear = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.linear(x.flatten(1)).detach()

    def detached(input_shape, num_classes):
        return _Detached(math.prod(input_shape), num_classes)

    def wrong_type(seed):
        return "not data"

    def row_mismatch(seed):
        d = good(seed)
        d["y_train"] = d["y_train"][:-1]
        return d

    def out_of_range(seed):
        d = good(seed)
        d["num_classes"] = 3
        return d

    def too_many_classes(seed):
        d = good(seed)
        d["num_classes"] = 10**9
        return d

    def labeled_too_many_classes(seed):
        from secure_fedora.data.partition import LabeledDataset
        d = good(seed)
        return LabeledDataset(torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"]),
                              torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"]),
                              10**9)

    def federated_too_many_classes(seed):
        from secure_fedora.data.userdata import FederatedData, as_federated
        return FederatedData(as_federated(federated(seed)).clients, 10**9)

    def labeled_out_of_range(seed):
        from secure_fedora.data.partition import LabeledDataset
        d = good(seed)
        return LabeledDataset(torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"]),
                              torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"]), 2)

    def with_nan(seed):
        d = good(seed)
        d["x_train"][5, 2] = float("nan")
        return d

    def narrow(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))

    def not_a_module(input_shape, num_classes):
        return "model"

    class TupleOut(nn.Module):
        def __init__(self, width, num_classes):
            super().__init__()
            self.linear = nn.Linear(width, num_classes)

        def forward(self, x):
            return (self.linear(x.flatten(1)),)

    def tuple_out(input_shape, num_classes):
        return TupleOut(math.prod(input_shape), num_classes)

    def batchnorm(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 8),
                             nn.BatchNorm1d(8), nn.Linear(8, num_classes))

    def sequences(seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(200, 5, 3)).astype(np.float32)
        y = (x[:, 0, 0] > 0).astype(np.int64)
        return {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}

    class _Recurrent(nn.Module):
        def __init__(self, features, num_classes):
            super().__init__()
            self.gru = nn.GRU(features, 4, batch_first=True)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    def recurrent(input_shape, num_classes):
        return _Recurrent(input_shape[-1], num_classes)

    def dp_recurrent(input_shape, num_classes):
        from opacus.layers import DPGRU
        model = _Recurrent(input_shape[-1], num_classes)
        model.gru = DPGRU(input_shape[-1], 4, batch_first=True)
        return model

    def one_class_test(seed):
        d = good(seed)
        d["y_train"] = (d["y_train"] > 1).astype("int64")
        d["y_test"] = d["y_test"] * 0
        return d
''')


@pytest.fixture
def plug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh plug-in module on sys.path; returns its name."""
    name = f"plug_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def config(plug: str, methods: tuple[str, ...] = ("local",), **sections: dict) -> dict:
    cfg = {
        "methods": list(methods),
        "data": {"source": f"{plug}:good", "partition": "iid", "num_clients": 3,
                 "train_per_client": 30, "val_per_client": 15, "test_per_client": 15},
        "model": {"factory": f"{plug}:mlp"},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 10, "lr": 0.05},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


# ----------------------------------------------------------------------------- what runs


def test_config_file_imports_from_its_folder_and_runs(tmp_path: Path) -> None:
    name = f"plug_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(config(name)))
    try:
        assert str(tmp_path) not in sys.path
        results = Experiment(load_config(path), run_dir=tmp_path / "run").run()
    finally:
        sys.modules.pop(name, None)
    assert results.metric == "accuracy" and results["loss"] == "cross_entropy"
    selected = results.selected("local")
    assert set(selected) >= {"mean", "min", "max", "std", "per_client", "round"}
    assert len(selected["per_client"]) == 3
    assert results["methods"]["local"]["metric"] == "accuracy"
    assert (tmp_path / "run" / "results.json").is_file()


def test_centralized_data_any_shape_and_class_count(plug: str) -> None:
    exp = Experiment(config(plug, data={"partition": "dirichlet", "dirichlet_alpha": 1.0}))
    clients = exp.clients
    assert [c.train_x.shape for c in clients] == [torch.Size([30, 6])] * 3
    assert all(c.meta["num_classes"] == 4 for c in clients)
    assert all(len(c.meta["label_histogram"]) == 4 for c in clients)
    ctx = exp.check().context_factory(exp.config, clients)
    assert ctx.num_classes == 4
    assert ctx.flat.module[-1].out_features == 4


def test_iid_partition_is_disjoint_and_sized(plug: str) -> None:
    clients = Experiment(config(plug)).clients
    train = [i for c in clients for i in c.meta["train_index"] + c.meta["val_index"]]
    test = [i for c in clients for i in c.meta["test_index"]]
    assert len(train) == len(set(train)) == 3 * 45 and len(test) == len(set(test)) == 45
    assert {c.meta["kind"] for c in clients} == {"iid"}


def test_user_model_is_seeded_and_leaves_global_rng(plug: str) -> None:
    exp = Experiment(config(plug))
    state = torch.random.get_rng_state()
    a = exp.context_factory(exp.config, exp.clients).init
    b = exp.context_factory(exp.config, exp.clients).init
    assert torch.equal(a, b)
    assert torch.equal(state, torch.random.get_rng_state())
    other = parse_config({**config(plug), "seed": 1})
    assert not torch.equal(a, Experiment(other).context_factory(other, exp.clients).init)


def test_federated_list_runs_with_unequal_clients(plug: str) -> None:
    cfg = config(plug, data={"source": f"{plug}:federated", "partition": "iid"})
    results = Experiment(cfg).run()
    assert [c["train"] for c in results["clients"]] == [30, 50, 40]


def test_federated_list_with_wrong_client_count(plug: str) -> None:
    with pytest.raises(DataError, match="lists 3 clients but data.num_clients = 4"):
        Experiment(config(plug, data={"source": f"{plug}:federated", "num_clients": 4})).check()


def test_federated_list_under_dp_needs_train_per_client_at_most_smallest(plug: str) -> None:
    cfg = config(plug, data={"source": f"{plug}:federated", "train_per_client": 40},
                 privacy={"enabled": True, "delta": 1e-3})
    with pytest.raises(DataError, match="client 0 has 30 training rows"):
        Experiment(cfg).check()


def test_multilabel_bce_under_dp_with_noised_fedora(plug: str) -> None:
    cfg = config(plug, ("fedora", "local"), data={"source": f"{plug}:multilabel"},
                 training={"loss": "bce"}, fedora={"relatedness": "noised"},
                 privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-3})
    exp = Experiment(cfg)
    ctx = exp.check().context_factory(exp.config, exp.clients)
    assert ctx.flat.module[-1].out_features == 5 and ctx.num_classes == 5
    c = exp.clients[0]
    assert fedora.summary_rows(c.train_x, c.train_y, 5).shape == (30, 8 + 5)
    results = exp.run()
    assert results.metric == "auc"
    for name in ("fedora", "local"):
        s = results.selected(name)
        assert 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 1.0
    spent = [c["epsilon_spent"] for c in results["privacy"]["fedora"]["clients"]]
    assert all(0 < e <= 8.0 for e in spent)


def test_binary_bce_has_one_output_and_auc(plug: str) -> None:
    cfg = config(plug, data={"source": f"{plug}:sequences"}, training={"loss": "bce"})
    exp = Experiment(cfg)
    ctx = exp.context_factory(exp.config, exp.clients)
    assert ctx.flat.module[-1].out_features == 1
    assert exp.run().metric == "auc"


@pytest.mark.parametrize("dp", [False, True])
def test_a_plugin_loss_scored_by_auc_on_binary_labels_has_one_output(plug: str, dp: bool) -> None:
    """A plug-in binary loss (a focal loss) scored by AUC could not run: the model was built
    with 2 outputs (num_classes), which AUC refused ("give the model one output"), and a
    factory giving one output was refused as not num_classes wide."""
    privacy = {"privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3},
               "fedora": {"relatedness": "noised"}} if dp else {}
    cfg = config(plug, methods=("fedora", "fedavg"), data={"source": f"{plug}:binary"},
                 training={"loss": f"{plug}:focal", "rounds": 1}, **privacy)
    exp = Experiment(cfg)
    assert exp.context_factory(exp.config, exp.clients).flat.module[-1].out_features == 1
    results = exp.run()
    assert results.metric == "auc"
    assert all(0.0 <= results.mean(m) <= 1.0 for m in ("fedora", "fedavg"))


def test_custom_loss_under_dp(plug: str) -> None:
    cfg = config(plug, training={"loss": f"{plug}:per_sample_ce"},
                 privacy={"enabled": True, "delta": 1e-3})
    results = Experiment(cfg).run()
    assert results.metric == "accuracy" and results["loss"] == f"{plug}:per_sample_ce"


# ----------------------------------------------------------------------------- bad plug-ins


def test_module_that_does_not_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_plugin_mod.py").write_text("import numpy\nraise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {"data": {"source": "broken_plugin_mod:load", "partition": "iid"}}
    with pytest.raises(PluginError, match="data.source.*does not import.*RuntimeError: boom") as err:
        Experiment(cfg).check()
    assert "PYTHONPATH" not in str(err.value)  # it was found; its own code failed
    with pytest.raises(PluginError, match="module 'no_such_module_xyz' does not import.*add its "
                                          "folder to PYTHONPATH"):
        Experiment({"data": {"source": "no_such_module_xyz:load"}}).check()


def test_a_plug_in_that_raises_is_named_with_where_it_raised(plug: str, tmp_path: Path) -> None:
    """A data function, model factory, forward or loss that raised in its own code was reported
    as the exception's type and message alone, with no file or line (the traceback showed
    only with --debug): the one-line error now ends with the innermost frame of the user's
    code. A module that is not found names no frame (the import system's is not the user's)."""
    name = f"raising_{uuid.uuid4().hex[:10]}"
    path = tmp_path / f"{name}.py"  # tmp_path is on sys.path (the plug fixture)
    path.write_text(textwrap.dedent("""\
        import math
        from torch import nn

        def inner(value):
            raise RuntimeError(f"cannot read {value}")

        def load(seed):
            return inner(seed)

        class Net(nn.Module):
            def __init__(self, width, k):
                super().__init__()
                self.fc = nn.Linear(width, k)
            def forward(self, x):
                return inner("rows")

        def factory(input_shape, num_classes):
            return inner("shape")

        def net(input_shape, num_classes):
            return Net(math.prod(input_shape), num_classes)

        def loss(outputs, targets):
            return inner("targets")
        """))
    at = f"(at {path}:5 in inner)"
    try:
        with pytest.raises(DataError, match="data.source .* raised RuntimeError: cannot read 0") as err:
            Experiment(config(plug, data={"source": f"{name}:load"})).run()
        assert str(err.value).endswith(at)
        with pytest.raises(ModelError, match="model.factory .* failed .* cannot read shape") as err:
            Experiment(config(plug, model={"factory": f"{name}:factory"})).run()
        assert str(err.value).endswith(at)
        with pytest.raises(ModelError, match="model.factory .* fails on inputs .* cannot read rows") as err:
            Experiment(config(plug, model={"factory": f"{name}:net"})).run()
        assert at in str(err.value)
        with pytest.raises(PluginError, match="training.loss .* cannot read targets") as err:
            Experiment(config(plug, training={"loss": f"{name}:loss"})).run()
        assert str(err.value).endswith(at)
    finally:
        sys.modules.pop(name, None)
    with pytest.raises(PluginError, match="module 'no_such_module_xyz' does not import") as err:
        Experiment({"data": {"source": "no_such_module_xyz:load"}}).check()
    assert "(at " not in str(err.value) and "<frozen" not in str(err.value)


def test_integer_inputs_float32_cannot_hold_are_refused() -> None:
    """Inputs are converted to float32, which changed token ids beyond 2**24 silently
    (16777217 became 16777216, so an nn.Embedding looked up another row): refused, naming
    the bound; ids up to 2**24 and uint8 images pass unchanged."""
    from secure_fedora.data.userdata import coerce_user_data

    y = np.array([0, 1] * 10)
    for dtype, big in [(np.int64, 2 ** 24 + 1), (np.int32, -(2 ** 24) - 1), (np.uint64, 2 ** 40),
                       (np.uint64, 2 ** 64 - 1), (np.int64, -(2 ** 63)), (np.uint32, 2 ** 32 - 1)]:
        x = np.full((20, 3), 7, dtype=dtype)
        x[4, 2] = big
        with pytest.raises(DataError, match=r"src\['x_train'/'y_train'\] inputs holds integer "
                                            r"inputs beyond 2\*\*24 = 16777216 \(largest magnitude "
                                            rf"{abs(big)}\).*map them to a smaller range"):
            coerce_user_data({"x_train": x, "y_train": y, "x_test": x[:4], "y_test": y[:4]}, "src")
    x = np.full((20, 3), 2 ** 24, dtype=np.int64)
    x[0] = -(2 ** 24)
    data = coerce_user_data({"x_train": x, "y_train": y, "x_test": x, "y_test": y}, "src")
    assert torch.equal(data.train_x.long(), torch.from_numpy(x))
    images = np.full((20, 2, 2), 255, dtype=np.uint8)
    assert coerce_user_data({"x_train": images, "y_train": y, "x_test": images, "y_test": y},
                            "src").train_x.max() == 255


def test_missing_function(plug: str) -> None:
    with pytest.raises(PluginError, match="has no attribute 'nope'"):
        Experiment(config(plug, data={"source": f"{plug}:nope"})).check()
    with pytest.raises(PluginError, match="model.factory.*has no attribute 'nope'"):
        Experiment(config(plug, model={"factory": f"{plug}:nope"})).check()


@pytest.mark.parametrize(("source", "message"), [
    ("wrong_type", "returned a str; expected a dict"),
    ("row_mismatch", "has 180 inputs but 179 labels"),
    ("out_of_range", r"labels reach 3 but num_classes = 3; labels must lie in 0\.\.2"),
    ("with_nan", r"NaN or infinite values \(first in row 5\)"),
    # it used to allocate per-class tables of 10**9 entries (15 GB, then a hang)
    ("too_many_classes", r"num_classes = 1000000000 is more than 1,000,000 \(the labels reach 3\)"),
    # a ready LabeledDataset / FederatedData skipped every check (10**9 classes: 8 GB tables)
    ("labeled_too_many_classes", r"num_classes = 1000000000 is more than 1,000,000"),
    ("federated_too_many_classes", r"num_classes = 1000000000 is more than 1,000,000"),
    ("labeled_out_of_range", r"labels reach 3 but num_classes = 2"),
])
def test_bad_data(plug: str, source: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Experiment(config(plug, data={"source": f"{plug}:{source}"})).check()


def test_text_labels_and_meta_tensors_are_clear_errors() -> None:
    """String labels and meta-device inputs were TypeError / NotImplementedError tracebacks."""
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    y = np.array(["cat", "dog"] * 30)
    data = {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}
    cfg = {"methods": ["local"], "data": {"partition": "iid", "num_clients": 2,
                                          "train_per_client": 10, "val_per_client": 5,
                                          "test_per_client": 5}}
    with pytest.raises(DataError, match=r"y_train.* holds <U3 values \(text or bytes\)"):
        Experiment(cfg, data=data).check()
    meta = {**data, "y_train": np.zeros(40, dtype=np.int64), "y_test": np.zeros(20, dtype=np.int64),
            "x_train": torch.empty(40, 4, device="meta")}
    with pytest.raises(DataError, match="meta device"):
        Experiment(cfg, data=meta).check()


def test_bad_data_from_the_python_api() -> None:
    x = torch.randn(50, 4)
    with pytest.raises(DataError, match="negative label -1"):
        Experiment({"data": {"partition": "iid"}},
                   data={"x_train": x, "y_train": -torch.ones(50, dtype=torch.long),
                         "x_test": x, "y_test": torch.zeros(50, dtype=torch.long)}).check()
    with pytest.raises(DataError, match="missing"):
        Experiment({"data": {"partition": "iid"}}, data={"x_train": x}).check()


@pytest.mark.parametrize(("factory", "error", "message"), [
    ("narrow", ModelError, r"outputs of shape \(2, 5\) for 2 inputs; expected \(2, 4\)"),
    ("not_a_module", ModelError, "returned a str, expected a torch.nn.Module"),
    ("tuple_out", ModelError, r"returns a tuple for 2 inputs, not a tensor; expected outputs of "
                              r"shape \(2, 4\)"),
    ("batchnorm", ModelError, "buffer '2.running_mean'"),
])
def test_bad_model(plug: str, factory: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Experiment(config(plug, model={"factory": f"{plug}:{factory}"})).check()


def test_python_api_model_factory_checked() -> None:
    x = torch.randn(60, 4)
    y = torch.arange(60) % 3
    data = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    cfg = {"data": {"partition": "iid", "num_clients": 3, "train_per_client": 10,
                    "val_per_client": 5, "test_per_client": 5}}
    with pytest.raises(ModelError, match=r"expected \(2, 3\)"):
        Experiment(cfg, data=data, model=lambda s, c: torch.nn.Linear(4, 2)).check()


def test_an_integer_input_layer_fed_float32_inputs_is_told_to_cast() -> None:
    """Arrays are converted to float32, so token ids reach an nn.Embedding as floats: the
    refusal says so and what to do (cast in forward), and the cast model then trains."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    x = (rng.integers(0, 20, (120, 6)) + 10 * y[:, None]).astype(np.int64)
    data = {"x_train": x[:90], "y_train": y[:90], "x_test": x[90:], "y_test": y[90:]}
    cfg = {"data": {"partition": "iid", "num_clients": 3, "train_per_client": 20,
                    "val_per_client": 10, "test_per_client": 10},
           "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8}}

    class Tokens(torch.nn.Module):
        def __init__(self, cast: bool) -> None:
            super().__init__()
            self.cast = cast
            self.embed = torch.nn.Embedding(30, 4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(x.long() if self.cast else x).mean(1))

    with pytest.raises(ModelError, match=r"inputs of shape \(2, 6\) and dtype torch.float32"
                                         r".*converted to float32.*x\.long\(\)"):
        Experiment(cfg, data=data, model=lambda s, c: Tokens(cast=False)).check()
    results = Experiment(cfg, data=data, model=lambda s, c: Tokens(cast=True)).run()
    assert len(results.selected("fedora")["per_client"]) == 3


def test_model_neither_dp_path_supports_is_refused_naming_the_layer(plug: str) -> None:
    cfg = config(plug, data={"source": f"{plug}:sequences"}, model={"factory": f"{plug}:recurrent"},
                 privacy={"enabled": True, "delta": 1e-3})
    with pytest.raises(DPSGDError, match=r"layer 'gru' \(GRU\)"):
        Experiment(cfg).check()
    # The refusal named no way forward for a recurrent layer: it names Opacus's drop-in, which
    # runs under DP.
    with pytest.raises(DPSGDError, match=r"for nn.GRU use Opacus's drop-in opacus.layers.DPGRU "
                                         r"\(same arguments\)"):
        Experiment(cfg).check()
    Experiment(config(plug, data={"source": f"{plug}:sequences"},
                      model={"factory": f"{plug}:dp_recurrent"},
                      privacy={"enabled": True, "delta": 1e-3})).run()
    # The same model trains without DP (the refusal is about per-sample gradients only).
    Experiment(config(plug, data={"source": f"{plug}:sequences"},
                      model={"factory": f"{plug}:recurrent"})).check()


def test_reduced_loss_is_refused(plug: str) -> None:
    with pytest.raises(PluginError, match=r"per-sample losses of shape \(2,\)"):
        Experiment(config(plug, training={"loss": f"{plug}:mean_ce"})).check()


def test_integer_losses_and_detached_outputs_are_refused_before_training(plug: str) -> None:
    """Both trained into a torch RuntimeError traceback (mean() of Long; element 0 does not
    require grad)."""
    with pytest.raises(PluginError, match="returns torch.int64 losses"):
        Experiment(config(plug, training={"loss": f"{plug}:int_loss"})).check()
    with pytest.raises(PluginError, match="carries no gradient .*detached"):
        Experiment(config(plug, model={"factory": f"{plug}:detached"})).check()


def test_auc_needs_both_classes_in_every_split(plug: str) -> None:
    cfg = config(plug, data={"source": f"{plug}:one_class_test"}, training={"loss": "bce"})
    with pytest.raises(DataError, match="client 0: the test split cannot be scored with AUC"):
        Experiment(cfg).check()


def test_rotation_needs_images_and_label_skew_needs_single_labels(plug: str) -> None:
    with pytest.raises(DataError, match="partition 'rotation' rotates images"):
        Experiment(config(plug, data={"partition": "rotation"})).check()
    cfg = config(plug, data={"source": f"{plug}:multilabel", "partition": "pathological",
                             "classes_per_client": 2}, training={"loss": "bce"})
    with pytest.raises(DataError, match="needs single labels"):
        Experiment(cfg).check()


def test_cross_entropy_refuses_multilabel_targets(plug: str) -> None:
    with pytest.raises(PluginError, match="multi-label targets"):
        Experiment(config(plug, data={"source": f"{plug}:multilabel"})).check()


@pytest.mark.parametrize(("section", "message"), [
    ({"data": {"source": "no_colon"}}, "data.source must have the form 'package.module:function'"),
    ({"data": {"source": "m:f", "dataset": "mnist"}}, "data.dataset and data.source exclude"),
    ({"model": {"factory": "m:f", "name": "cnn"}}, "model.name and model.factory exclude"),
    ({"training": {"loss": "hinge"}}, "unknown loss 'hinge'; available: bce, cross_entropy"),
])
def test_config_errors(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(section)


@pytest.mark.parametrize(("section", "key"), [
    ({"data": {"source": "m:f", "partition": "iid"}}, "data.source"),
    ({"model": {"factory": "m:f"}}, "model.factory"),
    ({"training": {"loss": "bce"}}, "training.loss"),
])
def test_flower_runtime_refuses_user_plugins(section: dict, key: str) -> None:
    from secure_fedora.runtimes.flower.protocol import DeployError, check_supported

    with pytest.raises(DeployError, match=f"{key} = .*run in process"):
        check_supported(parse_config({"methods": ["fedora"], **section}))


def test_federated_list_under_dp_checks_delta_against_every_clients_size(plug: str) -> None:
    """delta < 1/n was checked against train_per_client (the smallest client) only: a larger
    client got a delta above its own 1/n (sizes 30, 50, 40)."""
    data = {"source": f"{plug}:federated", "train_per_client": 30}
    ok = config(plug, data=data, privacy={"enabled": True, "delta": 0.019})
    Experiment(ok).check()
    loose = config(plug, data=data, privacy={"enabled": True, "delta": 0.025})
    with pytest.raises(DataError, match=r"client 1 has 50 training rows, so its delta = 0.025 is "
                                        r"not below 1/n = 0.02"):
        Experiment(loose).check()
    override = config(plug, data=data, privacy={"enabled": True, "delta": 0.001,
                                               "overrides": {"2": {"epsilon": 1.0, "delta": 0.03}}})
    with pytest.raises(DataError, match="client 2 has 40 training rows"):
        Experiment(override).check()


def test_binary_bce_refuses_more_than_two_classes(plug: str) -> None:
    """BCE on single labels 0..3 used to train one logit against targets 2 and 3 and report
    an AUC (rc 0)."""
    cfg = config(plug, data={"source": f"{plug}:good"}, training={"loss": "bce"})
    with pytest.raises(DataError, match="'bce' with single labels is binary .* 4 classes "
                                        r"\(labels 0..3.*\); use 'cross_entropy'"):
        Experiment(cfg).check()


def test_binary_bce_on_labels_1_and_2_says_where_the_third_class_comes_from() -> None:
    """Binary labels {1, 2} were refused as 'the data has 3 classes' while it holds two; the
    message names the range the count comes from and the relabelling that fixes it. (Labels
    1..C without a declared num_classes are refused before the loss is looked at: see
    test_labels_that_skip_a_class_are_refused_unless_num_classes_is_declared.) With
    num_classes = 3 declared, class 0 is the task's, and BCE's binary rule refuses it."""
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    y = np.array([1, 2] * 30)
    data = {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}
    cfg = {"methods": ["local"], "data": {"partition": "iid", "num_clients": 2,
                                          "train_per_client": 10, "val_per_client": 5,
                                          "test_per_client": 5},
           "training": {"loss": "bce"}}
    with pytest.raises(DataError, match=r"the labels run 1..2 and no row holds class 0, so they "
                                        r"would read as 3 classes \(the largest label \+ 1\).*"
                                        r"\(pass y - 1\)"):
        Experiment(cfg, data=data).check()
    with pytest.raises(DataError, match=r"3 classes \(labels 0..2: the largest label.*relabel a "
                                        r"binary task to 0 and 1"):
        Experiment(cfg, data={**data, "num_classes": 3}).check()


def test_python_api_refuses_to_overwrite_a_finished_run(plug: str, tmp_path: Path) -> None:
    """The CLI refused a second run into the same directory; the API silently overwrote its
    checkpoints and results.json."""
    from secure_fedora.runtimes.rundir import RunDirError

    cfg = config(plug, data={"source": f"{plug}:good"})
    first = Experiment(cfg, run_dir=tmp_path / "run").run()
    results = (tmp_path / "run" / "results.json").read_bytes()
    other = config(plug, data={"source": f"{plug}:good"}, training={"lr": 0.5})
    with pytest.raises(RunDirError, match="is not empty"):
        Experiment(other, run_dir=tmp_path / "run").run()
    assert (tmp_path / "run" / "results.json").read_bytes() == results
    again = Experiment(cfg, run_dir=tmp_path / "run").run(resume=True)
    assert again.mean("local") == first.mean("local")


def test_python_api_refuses_data_or_model_the_config_also_names(plug: str) -> None:
    """data= silently replaced the config's data.source (and model= its model.factory), and
    the run's config.toml then named data and a model the run never used."""
    x = torch.randn(60, 4)
    y = torch.arange(60) % 3
    data = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    with pytest.raises(ConfigError, match=r"data= was given and the config names data\.source"):
        Experiment(config(plug), data=data)
    with pytest.raises(ConfigError, match=r"data= was given and the config names data\.dataset"):
        Experiment({"data": {"dataset": "mnist"}}, data=data)
    with pytest.raises(ConfigError, match=r"model= was given and the config names model\.factory"):
        Experiment(config(plug), model=lambda shape, classes: torch.nn.Linear(4, classes))
    with pytest.raises(ConfigError, match=r"model\.name = 'mlp'"):
        Experiment({"model": {"name": "mlp"}}, model=lambda shape, classes: torch.nn.Linear(4, 3))


def test_a_run_from_python_api_inputs_says_so_and_audits_that_rebuild_it_refuse(
        plug: str, tmp_path: Path) -> None:
    """A DP run given data= and model= wrote a config.toml that rebuilds MNIST and the default
    MLP: `audit replay`, `whitebox` and `canary` then audited other data and another model
    without a word. results.json now names the inputs and the three audits refuse."""
    from audits.cli import main as audit_main
    from audits.replay import ReplayAuditError, run_replay_audit
    from audits.whitebox import WhiteboxAuditError, audit_run_dir

    module = sys.modules[plug] if plug in sys.modules else __import__(plug)
    cfg = config(plug, privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-3})
    del cfg["data"]["source"], cfg["model"]
    run = tmp_path / "run"
    results = Experiment(cfg, data=module.good, model=module.mlp, run_dir=run).run()
    given = results["assumptions"]["inputs_outside_config"]
    assert sorted(given) == ["data", "model"] and "Python API" in given["data"]
    assert (run / "config.toml").is_file()  # written for the anchor, without the API inputs
    with pytest.raises(ReplayAuditError, match="came from the Python API"):
        run_replay_audit(run)
    with pytest.raises(WhiteboxAuditError, match="came from the Python API"):
        audit_run_dir(run)
    assert audit_main(["audit", "canary", str(run)]) == 2
    assert not (run / "audit").exists()
    # a run the config describes records nothing of the kind
    plain = Experiment(config(plug), run_dir=tmp_path / "plain").run()
    assert "inputs_outside_config" not in plain["assumptions"]


def test_a_dp_run_of_a_data_source_and_model_factory_verifies(plug: str, tmp_path: Path) -> None:
    """The config.toml a run writes for its anchor (API runs, sweep cells) held the defaults
    data.dataset = "mnist" and model.name = "mlp" beside data.source and model.factory, so
    `audit verify` failed every such DP run ("not a valid config")."""
    from audits.verify import verify_run
    from secure_fedora.core.config import config_hash

    cfg = config(plug, privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-3})
    run = tmp_path / "run"
    Experiment(cfg, run_dir=run).run()
    written = load_config(run / "config.toml")
    assert config_hash(written) == config_hash(parse_config(cfg))
    report = verify_run(run)
    assert report.ok, [str(f) for f in report.errors]


def test_sparse_tensors_huge_labels_and_a_raising_data_function_are_clear_errors() -> None:
    """Sparse tensors were NotImplementedError tracebacks, labels 1e20 or 2**63 (uint64)
    read as "the negative label -9223372036854775808", and an exception of a data= function
    escaped raw (a config's data.source wrapped it)."""
    x = torch.randn(60, 4)
    y = torch.arange(60) % 3
    cfg = {"data": {"partition": "iid", "num_clients": 3, "train_per_client": 10,
                    "val_per_client": 5, "test_per_client": 5}}
    cases = [
        ({"x_train": x.to_sparse(), "y_train": y, "x_test": x, "y_test": y}, "sparse_coo tensor"),
        ({"x_train": x, "y_train": y.to_sparse(), "x_test": x, "y_test": y}, "sparse_coo tensor"),
        ({"x_train": torch.zeros(60, 0), "y_train": y, "x_test": torch.zeros(60, 0),
          "y_test": y}, r"has shape \(60, 0\): each row holds no feature"),
        ({"x_train": x, "y_train": np.full(60, 1e20), "x_test": x, "y_test": y},
         "holds the label 1e\\+20"),
        ({"x_train": x, "y_train": np.full(60, 2**63, dtype=np.uint64), "x_test": x, "y_test": y},
         "holds the label 9.22337e\\+18"),
    ]
    for data, message in cases:
        with pytest.raises(DataError, match=message):
            Experiment(cfg, data=data).check()

    def broken(seed):
        return 1 / 0

    with pytest.raises(DataError, match="data= function raised ZeroDivisionError"):
        Experiment(cfg, data=broken).check()


def test_pathological_partition_of_user_data_with_more_than_ten_classes() -> None:
    """classes_per_client was capped at 10 for any data ("MNIST and Fashion-MNIST have 10
    classes"), also for 20-class user data; the partitioner checks the real count."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 5)).astype(np.float32)
    y = rng.integers(0, 20, 800)
    data = {"x_train": x[:600], "y_train": y[:600], "x_test": x[600:], "y_test": y[600:]}
    cfg = {"methods": ["local"],
           "data": {"partition": "pathological", "classes_per_client": 12, "num_clients": 3,
                    "train_per_client": 24, "val_per_client": 12, "test_per_client": 12}}
    clients = Experiment(cfg, data=data).clients
    assert all(len(set(c.train_y.tolist())) == 12 for c in clients)
    too_many = {**cfg, "data": {**cfg["data"], "classes_per_client": 21, "val_per_client": 24}}
    with pytest.raises(DataError, match="data.classes_per_client = 21 exceeds the 20 classes"):
        Experiment(too_many, data=data).check()


def test_a_dp_api_run_with_more_than_ten_classes_per_client_writes_its_anchor(
        tmp_path: Path) -> None:
    """The anchor's config.toml kept the default data.dataset = "mnist", which re-validated with
    the built-in datasets' 10-class cap: the run failed after results.json, without an anchor
    (and the check now runs before training)."""
    from audits.verify import verify_run

    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 5)).astype(np.float32)
    y = rng.integers(0, 20, 800)
    data = {"x_train": x[:600], "y_train": y[:600], "x_test": x[600:], "y_test": y[600:]}
    cfg = {"methods": ["local"], "training": {"rounds": 1, "batch_size": 8},
           "data": {"partition": "pathological", "classes_per_client": 12, "num_clients": 3,
                    "train_per_client": 24, "val_per_client": 12, "test_per_client": 12},
           "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3}}
    run = tmp_path / "run"
    Experiment(cfg, data=data, run_dir=run).run()
    assert (run / "anchor.json").is_file() and (run / "config.toml").is_file()
    report = verify_run(run)
    assert report.ok, [str(f) for f in report.errors]


def _small_data() -> dict[str, Any]:
    g = np.random.default_rng(0)
    y = g.integers(0, 3, 120)
    x = (g.normal(size=(120, 5)) + y[:, None]).astype(np.float32)
    return {"x_train": x[:80], "y_train": y[:80], "x_test": x[80:], "y_test": y[80:]}


SMALL = {"methods": ["local"], "data": {"partition": "iid", "num_clients": 3,
                                         "train_per_client": 20, "val_per_client": 6,
                                         "test_per_client": 6}, "training": {"threads": 1}}


def test_a_data_function_returning_nothing_is_an_error_not_the_default_dataset() -> None:
    """A data= function without its return trained on the built-in MNIST, silently."""
    def forgot_return(seed: int) -> None:
        _small_data()

    with pytest.raises(DataError, match="data= function returned a NoneType.*missing return"):
        Experiment(SMALL, data=forgot_return).check()


def test_a_frozen_parameter_is_refused_naming_it() -> None:
    """Frozen parameters were trained anyway (weight decay moved them; under DP they were
    noised; FEDORA propagates them)."""
    def frozen(shape: tuple[int, ...], classes: int) -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, classes))
        model[1].requires_grad_(False)
        return model

    with pytest.raises(ModelError, match=r"parameter '1.weight' is frozen \(requires_grad=False\)"):
        Experiment(SMALL, data=_small_data(), model=frozen).check()


def test_an_integer_parameter_is_refused_naming_its_dtype_not_as_frozen() -> None:
    """An int64 nn.Parameter (which cannot require a gradient) was refused as "frozen ...
    unfreeze it", which cannot be done for an integer tensor."""
    class Counted(torch.nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(5, classes)
            self.steps = torch.nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.flatten(1))

    with pytest.raises(ModelError, match=r"parameter 'steps' is torch.int64, which cannot be "
                                         r"trained.*register_buffer") as err:
        Experiment(SMALL, data=_small_data(), model=lambda s, c: Counted(c)).check()
    assert "frozen" not in str(err.value)


def test_a_model_whose_outputs_change_shape_for_one_input_is_refused() -> None:
    """`.squeeze()` passed the two-row probe, then crashed with raw tracebacks on a batch of
    one (training, a one-row validation split, the DP per-sample check)."""
    class Squeezy(torch.nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(5, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.flatten(1)).squeeze()

    with pytest.raises(ModelError, match=r"outputs of shape \(3,\) for 1 inputs; expected \(1, 3\)"):
        Experiment(SMALL, data=_small_data(), model=lambda s, c: Squeezy(c)).check()


def test_a_model_failing_only_on_one_row_is_told_so_not_to_cast_its_inputs() -> None:
    """BatchNorm1d without running statistics (what the BatchNorm refusal suggests) runs on
    a batch of rows and fails on one row; the refusal said to cast inputs for nn.Embedding."""
    def norm(s: tuple[int, ...], c: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 8),
                                   torch.nn.BatchNorm1d(8, track_running_stats=False),
                                   torch.nn.Linear(8, c))

    with pytest.raises(ModelError, match=r"fails on a batch of one row \(inputs of shape "
                                         r"\(1, 5\)\), which it runs on a batch of 2 rows: a "
                                         r"batch of one arises at a split's or an epoch's end") as err:
        Experiment(SMALL, data=_small_data(), model=norm).check()
    assert "nn.Embedding" not in str(err.value)


def test_a_model_writing_its_inputs_in_place_is_refused_before_the_data_changes() -> None:
    """A forward doing x.mul_(1.5) ran: every evaluation multiplied the clients' whole
    validation and test splits by 1.5 (2.25 after two rounds), so later rounds and methods were
    scored on other data. Writing a training batch (a copy) in place is harmless and runs."""
    class Scales(torch.nn.Module):
        def __init__(self, c: int, only_training: bool) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(5, c)
            self.only_training = only_training

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training or not self.only_training:
                x.mul_(1.5)
            return self.linear(x)

    exp = Experiment({**SMALL, "training": {"threads": 1, "rounds": 2}}, data=_small_data(),
                     model=lambda s, c: Scales(c, only_training=False))
    held = [c.val_x.clone() for c in exp.clients]
    with pytest.raises(ModelError, match=r"writes its inputs in place in eval mode .* the data "
                                         r"itself would change with every evaluation"):
        exp.run()
    assert all(torch.equal(c.val_x, v) for c, v in zip(exp.clients, held, strict=True))
    Experiment(SMALL, data=_small_data(), model=lambda s, c: Scales(c, only_training=True)).run()


class _WritesEqualValues(torch.nn.Module):
    """Writes its input in place without changing a value: always (``clamp``), only where a
    value is beyond 1e6 (``mask``, no row here), or only once its weights left their initial
    values (``trained``: the probe before training cannot see it)."""

    def __init__(self, c: int, write: str) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, c)
        self.write = write
        self.initial = self.linear.weight.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write == "clamp":
            x.clamp_(min=-1e9)
        elif self.write == "mask":
            x[x > 1e6] = 0
        elif self.write == "trained" and not self.training \
                and not torch.equal(self.linear.weight, self.initial):
            x.mul_(1.0)
        return self.linear(x)


@pytest.mark.parametrize(("write", "op"), [("clamp", "aten::clamp_"), ("mask", "aten::index_put_")])
def test_a_model_writing_its_inputs_without_changing_them_is_refused_before_anything_runs(
        write: str, op: str) -> None:
    """The check compared the values before and after a probe forward: a write of equal
    values, or one matching no probe row, passed, and the same forward wrote the clients'
    splits at every evaluation."""
    exp = Experiment({**SMALL, "training": {"threads": 1, "rounds": 1}}, data=_small_data(),
                     model=lambda s, c: _WritesEqualValues(c, write))
    versions = [c.val_x._version for c in exp.clients]
    with pytest.raises(ModelError, match=rf"^the model factory writes its inputs in place in "
                                         rf"eval mode \({op} at .*test_userdata.py:\d+ in "
                                         r"forward\); any in-place write counts"):
        exp.run()
    assert [c.val_x._version for c in exp.clients] == versions


def test_a_model_writing_its_inputs_only_once_trained_stops_the_run_at_that_evaluation() -> None:
    """A write that depends on the trained weights passes the probe before training; the
    first evaluation that writes a client's split stops the run, naming the split and the
    round, instead of scoring later rounds on changed data. A model reading its input runs."""
    cfg = {**SMALL, "training": {"threads": 1, "rounds": 2}}
    exp = Experiment(cfg, data=_small_data(), model=lambda s, c: _WritesEqualValues(c, "trained"))
    with pytest.raises(ModelError, match=r"^the model factory wrote client 0's (train|val|test) "
                                         r"split in place in round 1 .* the run stops here"):
        exp.run()
    Experiment(cfg, data=_small_data(), model=lambda s, c: _WritesEqualValues(c, "none")).run()




def test_a_plugin_loss_writing_its_targets_in_place_is_refused_before_anything_runs(
        plug: str) -> None:
    """The loss gets views of a client's stored labels in evaluation: one writing its targets
    in place (even equal values) changed them with every evaluation, unnoticed; it is refused
    by the probe before training, naming the loss, and the labels are left as they were."""
    exp = Experiment({**SMALL, "training": {"threads": 1, "rounds": 1,
                                            "loss": f"{plug}:writes_targets"}},
                     data=_small_data())
    versions = [c.val_y._version for c in exp.clients]
    with pytest.raises(PluginError, match=rf"^training.loss '{plug}:writes_targets' writes its "
                                          r"targets in place .* compute on new tensors"):
        exp.run()
    assert [c.val_y._version for c in exp.clients] == versions


def test_a_plugin_loss_writing_its_targets_only_on_larger_batches_stops_the_run(
        plug: str) -> None:
    """A loss writing its targets only on batches the probes did not show (4 rows or more)
    passes the check before training; FedAvg's fine-tuning selection evaluates on views of a
    client's stored labels, and the pass that writes them stops the run there, naming the
    labels and the loss (the run completed, on labels the loss had written)."""
    loss = f"{plug}:writes_large_batches_targets"
    exp = Experiment({**SMALL, "methods": ["fedavg"], "fedavg": {"finetune_epochs": 1},
                      "training": {"threads": 1, "rounds": 1, "loss": loss}},
                     data=_small_data())
    with pytest.raises(ModelError, match=rf"^client 0's (val|test) labels were written in place "
                                         rf"in the clients' finalize, before any client's reply "
                                         rf"left: training.loss '{loss}' receives them as its "
                                         r"targets .* the run stops here"):
        exp.run()

@pytest.mark.parametrize(("what", "written"), [
    ("input", r" wrote client 0's (train|val|test) split in place"),
    ("buffer", r": a buffer \('scale'\) changed")])
def test_a_model_writing_only_in_fedavgs_finetuning_selection_stops_the_run(
        monkeypatch: pytest.MonkeyPatch, what: str, written: str) -> None:
    """FedAvg's fine-tuning and its model selection (validation and test evaluations) run
    after the last round's check: a split or buffer written only there stops the run at the
    finalize exchange, before any reply reaches the server."""
    from tests.final_pass_support import WritesInFinalize, writes_only_in_fedavg_finalize

    writes_only_in_fedavg_finalize(monkeypatch)
    cfg = {**SMALL, "methods": ["fedavg"], "training": {"threads": 1, "rounds": 1},
           "fedavg": {"finetune_epochs": 1}}
    exp = Experiment(cfg, data=_small_data(), model=lambda s, c: WritesInFinalize(5, c, what))
    with pytest.raises(ModelError, match=rf"^the model factory{written} in the clients' "
                                         r"finalize, before any client's reply left"):
        exp.run()

class _Ids(torch.nn.Module):
    """Token ids in an embedding of 8; in eval mode, raises once its head left its initial
    values (``fail_once_trained``)."""

    def __init__(self, c: int, fail_once_trained: bool = False) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(8, 3)
        self.head = torch.nn.Linear(15, c)
        self.initial = None if not fail_once_trained else self.head.weight.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.initial is not None and not self.training
                and not torch.equal(self.head.weight, self.initial)):
            raise ValueError("trained weights")
        return self.head(self.embedding(x.long()).flatten(1))


def _ids_data(test_id: int = 7) -> dict[str, Any]:
    g = np.random.default_rng(0)
    y = g.integers(0, 3, 120)
    x = g.integers(0, 8, (120, 5))
    x[80:, 0] = test_id
    return {"x_train": x[:80], "y_train": y[:80], "x_test": x[80:], "y_test": y[80:]}


def test_a_model_failing_on_a_test_split_is_named_before_anything_trains() -> None:
    """An embedding id beyond the table, held only by test rows, passed every check on training
    rows and stopped the first evaluation (under DP after a round's release) with a bare
    IndexError naming no method, client or line."""
    with pytest.raises(ModelError, match=r"the model factory fails on client 0's test split "
                                         r"\(rows 0..\d+\): IndexError: .*"
                                         r"\(at .*test_userdata.py:\d+ in forward\)"):
        Experiment(SMALL, data=_ids_data(test_id=11), model=lambda s, c: _Ids(c)).check()


def test_a_model_failing_in_an_evaluation_names_the_method_round_and_split() -> None:
    """A model raising only on its trained weights stopped the evaluation with the bare error."""
    with pytest.raises(ModelError, match=r"method 'local': the model fails on client 0's val "
                                         r"split in the evaluation of round 1: ValueError: "
                                         r"trained weights \(at .*test_userdata.py:\d+ in forward\)"):
        Experiment({**SMALL, "training": {"threads": 1, "rounds": 1}}, data=_ids_data(),
                   model=lambda s, c: _Ids(c, fail_once_trained=True)).run()


def test_regression_targets_are_refused_as_such() -> None:
    """Real-valued targets (a regression task) were refused as "non-integer labels" without
    saying that no task of the toolkit is a regression."""
    d = _small_data()
    d["y_train"] = d["x_train"][:, 0] * 2.5
    with pytest.raises(DataError, match=r"non-integer labels .* regression targets are not "
                                        r"supported"):
        Experiment(SMALL, data=d).check()


def test_auc_on_single_labels_needs_one_output_before_anything_is_released(
        plug: str, tmp_path: Path) -> None:
    """A loss declaring AUC on 4-class labels (a model of 4 outputs) passed every check; the
    first evaluation failed after a DP run had spent budget (summary + a round in the ledgers)."""
    cfg = config(plug, methods=("fedora",), training={"loss": f"{plug}:ce_scored_by_auc"},
                 fedora={"relatedness": "noised", "k": 1},
                 privacy={"enabled": True, "epsilon": 8.0, "delta": 1e-3})
    with pytest.raises(DataError, match=r"ce_scored_by_auc', scored by AUC, with single labels is "
                                        r"binary .* 4 classes"):
        Experiment(cfg, run_dir=tmp_path / "run").run()
    assert not (tmp_path / "run" / "ledgers").exists()


def test_a_ready_dataset_gets_the_input_checks_of_a_dict() -> None:
    """A LabeledDataset or FederatedData given ready skipped the input checks: NaN test inputs
    trained and reported accuracy from NaN outputs; 397 labels for 400 inputs ran."""
    from secure_fedora.data.partition import LabeledDataset
    from secure_fedora.data.userdata import FederatedData, as_federated

    d = _small_data()
    x, y = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    xt, yt = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
    with pytest.raises(DataError, match="data test_x contains NaN or infinite values"):
        Experiment(SMALL, data=LabeledDataset(x, y, torch.full_like(xt, float("nan")), yt, 3)).check()
    with pytest.raises(DataError, match="data train_x has 80 inputs but 77 labels"):
        Experiment(SMALL, data=LabeledDataset(x, y[:77], xt, yt, 3)).check()
    parts = [{"train": (x[i * 20:(i + 1) * 20], y[i * 20:(i + 1) * 20]), "val": (xt[:6], yt[:6]),
              "test": (xt[6:12], yt[6:12])} for i in range(3)]
    ready = as_federated(parts)
    broken = ready.clients[0]
    ready.clients[0] = type(broken)(**{**vars(broken), "test_x": torch.full_like(broken.test_x, float("nan"))})
    with pytest.raises(DataError, match="client 0 test_x contains NaN"):
        Experiment(SMALL, data=FederatedData(ready.clients, 3)).check()
    Experiment(SMALL, data=LabeledDataset(x, y, xt, yt, 3)).check()  # the clean one passes


def _ready_client(client_id: int, rows: int, width: int = 5) -> Any:
    from secure_fedora.data.partition import ClientData

    g = torch.Generator().manual_seed(client_id)
    x = torch.randn(rows + 12, width, generator=g)
    y = torch.randint(0, 3, (rows + 12,), generator=g)
    return ClientData(client_id, x[:rows], y[:rows], x[rows:rows + 6], y[rows:rows + 6],
                      x[rows + 6:], y[rows + 6:])


def test_ready_federated_clients_must_be_numbered_by_position() -> None:
    """Budgets, overrides and ledgers go by position, the DP delta check went by client_id:
    clients listed as ids [1, 0] gave override "1" (epsilon 20, delta 0.1) to the client with
    id 0, whose 40 rows make delta 0.1 >= 1/n, unchecked."""
    from secure_fedora.data.userdata import FederatedData

    cfg = {"methods": ["local"], "data": {"num_clients": 2, "train_per_client": 8,
                                          "val_per_client": 6, "test_per_client": 6},
           "privacy": {"enabled": True, "epsilon": 5.0, "delta": 1e-3,
                       "overrides": {"1": {"epsilon": 20.0, "delta": 0.1}}}}
    swapped = FederatedData([_ready_client(1, 8), _ready_client(0, 40)], 3)
    with pytest.raises(DataError, match=r"client id 1 at position 0; client ids must be 0..N-1"):
        Experiment(cfg, data=swapped).check()
    with pytest.raises(DataError, match=r"client id 5 at position 0"):
        Experiment(SMALL | {"data": {**SMALL["data"], "num_clients": 2}},
                   data=FederatedData([_ready_client(5, 20), _ready_client(7, 20)], 3)).check()


def test_ready_federated_clients_with_other_input_shapes_are_a_data_error() -> None:
    """A per-client list is refused when client inputs differ in shape; a ready FederatedData
    was not, and failed in the first forward pass with a raw RuntimeError."""
    from secure_fedora.data.userdata import FederatedData

    cfg = SMALL | {"data": {**SMALL["data"], "num_clients": 2}}
    mixed = FederatedData([_ready_client(0, 20), _ready_client(1, 20, width=6)], 3)
    with pytest.raises(DataError, match=r"client 1 with train inputs of \(6,\) per row; client "
                                        r"0's train inputs are \(5,\)"):
        Experiment(cfg, data=mixed).check()


def test_bool_labels_are_a_binary_tasks_0_and_1() -> None:
    """Bool labels were refused ("expected integer labels") even for binary BCE; they are now
    read as 0/1: BCE trains one output scored by AUC. Where they cannot be used (a declared
    num_classes above 2, a ready dataset used as given) the error says what to do."""
    from secure_fedora.data.partition import LabeledDataset

    gen = np.random.default_rng(0)
    x = gen.normal(size=(200, 4)).astype(np.float32)
    y = x[:, 0] > 0
    data = {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}
    cfg = {"methods": ["local"], "training": {"loss": "bce", "rounds": 1, "batch_size": 10},
           "data": {"partition": "iid", "num_clients": 2, "train_per_client": 40,
                    "val_per_client": 20, "test_per_client": 20}}
    exp = Experiment(cfg, data=data)
    clients = exp.clients
    assert all(c.train_y.dtype == torch.int64 for c in clients)
    assert torch.equal(torch.cat([c.test_y for c in clients]).unique(), torch.tensor([0, 1]))
    assert exp.context_factory(exp.config, clients).flat.module(clients[0].train_x).shape[1] == 1
    assert exp.run().metric == "auc"
    with pytest.raises(DataError, match=r"bool labels are binary .* num_classes = 3; give "
                                        r"integer labels 0..2, or drop num_classes"):
        Experiment(cfg, data={**data, "num_classes": 3}).check()
    ready = LabeledDataset(torch.from_numpy(x[:150]), torch.from_numpy(y[:150]),
                           torch.from_numpy(x[150:]), torch.from_numpy(y[150:]), 2)
    with pytest.raises(DataError, match=r"in a ready dataset convert them: y.long\(\)"):
        Experiment(cfg, data=ready).check()


def test_a_label_gap_is_said_and_out_of_range_labels_are_refused(caplog) -> None:
    """Labels {0, 1, 3} with num_classes 4 (or undeclared: max + 1) were accepted without a
    word, though class 2 then has an output nothing trains (or labels are off by one). A gap
    is legitimate, so it is a warning naming the classes; a label outside 0..C-1 is a
    DataError."""
    from secure_fedora.data.userdata import coerce_user_data

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype("float32")
    gap = np.array([0, 1, 3] * 4)
    for declared in ({"num_classes": 4}, {}):
        caplog.clear()
        with caplog.at_level("WARNING", logger="secure_fedora.data.userdata"):
            data = coerce_user_data({"x_train": x, "y_train": gap, "x_test": x[:4],
                                     "y_test": np.arange(4), **declared}, "data")
        assert data.num_classes == 4
        [warning] = [r.getMessage() for r in caplog.records]
        assert warning.startswith("data: 1 of its 4 classes have no training row (class 2)")
    clients = [{"train": (x, gap), "val": (x[:4], np.arange(4)), "test": (x[:4], np.arange(4))}
               for _ in range(2)]
    caplog.clear()
    with caplog.at_level("WARNING", logger="secure_fedora.data.userdata"):
        coerce_user_data(clients, "data")
    assert "(class 2)" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="secure_fedora.data.userdata"):
        coerce_user_data({"x_train": x, "y_train": np.arange(12) % 4, "x_test": x[:4],
                          "y_test": np.arange(4), "num_classes": 4}, "data")
    assert not caplog.records  # every class trained: nothing to say
    for labels, problem in ((np.array([0, 1, 4] * 4), "labels reach 4 but num_classes = 4"),
                            (np.array([0, -1, 3] * 4), "negative label -1")):
        with pytest.raises(DataError, match=problem):
            coerce_user_data({"x_train": x, "y_train": labels, "x_test": x[:4],
                              "y_test": np.arange(4), "num_classes": 4}, "data")


def test_per_client_lists_say_which_data_keys_they_leave_unused(caplog) -> None:
    """Per-client data lists of 20 and 30 training rows ran with data.train_per_client = 64
    (and a partition) without a word, config.toml stating 64; under DP the key is the smallest
    client's size, without DP nothing reads it. Now one warning names the unused keys. A
    partition that needs keys said so without saying that lists are not partitioned."""
    from secure_fedora.runtimes.inprocess import build_clients

    rng = np.random.default_rng(0)

    def client(n: int) -> dict:
        return {s: (rng.normal(size=(m, 4)).astype("float32"), np.arange(m) % 2)
                for s, m in (("train", n), ("val", 8), ("test", 8))}

    data = [client(20), client(30)]
    logger = "secure_fedora.runtimes.inprocess"
    cases = (({"partition": "iid", "train_per_client": 64}, {},
              "data.partition = 'iid', data.train_per_client = 64 are unused: the data lists "
              "each client's rows"),
             ({"train_per_client": 16}, {"enabled": True, "delta": 1e-3}, None),  # read by DP
             ({}, {}, None))
    for sizes, privacy, warned in cases:
        cfg = parse_config({"methods": ["local"], "data": {"num_clients": 2, **sizes},
                            "privacy": privacy})
        caplog.clear()
        with caplog.at_level("WARNING", logger=logger):
            assert [c.num_train for c in build_clients(cfg, data)] == [20, 30]
        said = [r.getMessage() for r in caplog.records if r.name == logger]
        assert (said[0].startswith(warned) and len(said) == 1) if warned else said == []
    with pytest.raises(ConfigError, match="needs data.dirichlet_alpha; data given as per-client "
                                          "lists is not partitioned: leave data.partition out"):
        parse_config({"data": {"partition": "dirichlet"}})


def test_a_runs_config_copy_does_not_name_data_keys_its_author_never_wrote(tmp_path,
                                                                            caplog) -> None:
    """A run's config.toml states every default; an audit reading it back (audit replay of a
    DP run on per-client lists) warned "data.partition = 'rotation', data.rotation_interpolation
    = 'bilinear' are unused", keys the config never set. Only keys off their default are named."""
    from secure_fedora.core.config import config_document, load_run_config
    from secure_fedora.runtimes.inprocess import build_clients

    rng = np.random.default_rng(0)
    data = [{s: (rng.normal(size=(m, 4)).astype("float32"), np.arange(m) % 2)
             for s, m in (("train", 16), ("val", 8), ("test", 8))} for _ in range(2)]
    logger = "secure_fedora.runtimes.inprocess"
    for written, named in (({"num_clients": 2, "train_per_client": 16}, None),
                           ({"num_clients": 2, "train_per_client": 16, "partition": "iid",
                             "val_per_client": 8},
                            "data.partition = 'iid', data.val_per_client = 8 are unused")):
        cfg = parse_config({"methods": ["local"], "data": written,
                            "privacy": {"enabled": True, "delta": 1e-3}})
        path = tmp_path / f"{len(written)}.toml"
        path.write_text(tomli_w.dumps(config_document(cfg)), encoding="utf-8")
        for read in (cfg, load_run_config(path)[0]):  # the author's config, the run's copy
            caplog.clear()
            with caplog.at_level("WARNING", logger=logger):
                build_clients(read, data)
            said = [r.getMessage() for r in caplog.records if r.name == logger]
            assert (len(said) == 1 and said[0].startswith(named)) if named else said == []


def test_a_per_client_split_without_rows_says_what_to_do() -> None:
    """A client with no validation rows in a per-client list was refused as "data[1]['val'] is
    empty", without saying what the run needs (the partitioner's refusal said it)."""
    rng = np.random.default_rng(0)
    clients = [{split: (rng.normal(size=(rows, 3)), np.arange(rows) % 2)
                for split, rows in (("train", 8), ("val", 4), ("test", 4))} for _ in range(2)]
    clients[1]["val"] = (np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    cfg = {"methods": ["local"], "data": {"num_clients": 2}, "training": {"rounds": 1}}
    with pytest.raises(DataError, match=r"^data\[1\]\['val'\] is empty; give every client at "
                                        r"least one row in each split \(or leave the client out "
                                        r"and lower data.num_clients\)$"):
        Experiment(cfg, data=clients).check()


def test_labels_that_skip_a_class_are_refused_unless_num_classes_is_declared(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Labels 1..C given to the Python API were read as C + 1 classes (the largest label + 1)
    with only a logged warning: the model had an output, and the run a class, that no client
    holds. Labels are used as given (text labels are refused, never mapped), so a class count
    inferred over a class no row of any split holds is now refused, saying what to pass;
    declaring num_classes keeps an absent class legitimate (with the warning), and a class held
    only by test rows is still accepted with it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.array([1, 2, 3] * 20)
    cfg = {"methods": ["local"], "data": {"partition": "iid", "num_clients": 2,
                                          "train_per_client": 10, "val_per_client": 5,
                                          "test_per_client": 5}}
    data = {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=r"^data: the labels run 1..3 and no row holds class 0, "
                                        r"so they would read as 4 classes .*\(pass y - 1\), or "
                                        r"declare num_classes = 4 if class 0 belongs"):
        Experiment(cfg, data=data, run_dir=run_dir).run()
    assert not run_dir.exists() or not any(run_dir.iterdir())
    clients = [{"train": (x[:20], y[:20]), "val": (x[20:25], y[20:25]),
                "test": (x[25:30], y[25:30])} for _ in range(2)]
    with pytest.raises(DataError, match=r"the labels run 1..3 and no row holds class 0"):
        Experiment(cfg, data=clients).check()
    gap = np.array([0, 1, 3] * 20)  # class 2 filtered out of every split
    with pytest.raises(DataError, match=r"no row of any split holds class 2 of 0..3 \(the class "
                                        r"count is the largest label \+ 1, 4\).*relabel the "
                                        r"classes 0..K-1"):
        Experiment(cfg, data={**data, "y_train": gap[:40], "y_test": gap[40:]}).check()
    results = Experiment(cfg, data=[{k: (a, b - 1) for k, (a, b) in c.items()} for c in clients],
                         run_dir=tmp_path / "shifted").run()
    assert len(results["clients"]) == 2  # y - 1, as the message says, runs
    caplog.clear()
    with caplog.at_level("WARNING", logger="secure_fedora.data.userdata"):
        Experiment(cfg, data={**data, "num_classes": 4}).check()
    assert "1 of its 4 classes have no training row (class 0)" in caplog.text
    only_in_test = {**data, "y_train": gap[:40], "y_test": np.array([2] * 20)}
    Experiment(cfg, data=only_in_test).check()


def test_non_integer_labels_and_float64_overflow_name_their_row() -> None:
    """A NaN, infinite or fractional label was refused without saying which row held it, and
    finite float64 inputs beyond float32's range were called "NaN or infinite values" (they
    became infinite only in the cast to float32). Both now name the first row and what it
    holds; NaN inputs keep their message."""
    from secure_fedora.data.userdata import coerce_user_data

    x = np.random.default_rng(0).normal(size=(20, 3))
    y = np.array([0.0, 1.0] * 10)
    for bad in (np.nan, np.inf, 1.5):
        labels = y.copy()
        labels[7] = bad
        with pytest.raises(DataError, match=rf"src\['x_train'/'y_train'\] labels holds non-integer "
                                            rf"labels \(first in row 7: {bad!r}\)"):
            coerce_user_data({"x_train": x, "y_train": labels, "x_test": x, "y_test": y}, "src")
    huge = x.copy()
    huge[5, 1] = 1e39
    with pytest.raises(DataError, match=r"src\['x_test'/'y_test'\] inputs holds values beyond "
                                        r"float32's range \(largest magnitude 1e\+39, first in "
                                        r"row 5; .*scale the features"):
        coerce_user_data({"x_train": x, "y_train": y, "x_test": huge, "y_test": y}, "src")
    for not_finite in (np.nan, -np.inf):
        for dtype in (np.float32, np.float64):
            bad_x = x.astype(dtype)
            bad_x[5, 1] = not_finite
            with pytest.raises(DataError, match=r"NaN or infinite values \(first in row 5\)"):
                coerce_user_data({"x_train": bad_x, "y_train": y, "x_test": x, "y_test": y}, "src")


def test_held_out_rows_of_a_class_no_client_trains_on_are_said_to_count(
        caplog: pytest.LogCaptureFixture) -> None:
    """The given training rows hold class 3 once, but the partition draws that row into no
    client's training rows, while test rows of class 3 are drawn: every method's accuracy
    counted those rows (as errors: nothing trains that output) and nothing was said, the
    check on the given data seeing class 3 trained. A warning now names the class and the
    held-out rows holding it, counted per split, on the federation as built."""
    from secure_fedora.runtimes.inprocess import build_clients

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    y = np.array([0, 1, 2] * 20 + [0, 1, 2, 3] * 5)
    y[59] = 3  # the train pool's only class-3 row
    data = {"x_train": x[:60], "y_train": y[:60], "x_test": x[60:], "y_test": y[60:]}
    cfg = parse_config({"methods": ["local"], "data": {
        "partition": "iid", "num_clients": 2, "train_per_client": 10, "val_per_client": 5,
        "test_per_client": 10}})
    with caplog.at_level("WARNING", logger="secure_fedora.data.userdata"):
        clients = build_clients(cfg, data)
    assert not any(bool((c.train_y == 3).any()) for c in clients)  # the case this tests
    test_rows = sum(int((c.test_y == 3).sum()) for c in clients)
    val_rows = sum(int((c.val_y == 3).sum()) for c in clients)
    assert test_rows > 0
    held = f"{val_rows} val row" + ("s" if val_rows != 1 else "") + " and " if val_rows else ""
    held += f"{test_rows} test row" + ("s" if test_rows != 1 else "")
    assert [r.getMessage() for r in caplog.records] == [
        f"no client's training rows hold class 3, but {held} do: they count in every method's "
        "accuracy (validation rows also in model selection and FEDORA's lambda), as errors "
        "unless an output nothing trained wins by chance; if that is not intended, give some "
        "client training rows of that class or leave those rows out"]
    caplog.clear()
    every = {**data, "y_train": np.array([0, 1, 2, 3] * 15)}
    with caplog.at_level("WARNING", logger="secure_fedora.data.userdata"):
        build_clients(cfg, every)
    assert not caplog.records  # every class trained by some client: nothing to say
