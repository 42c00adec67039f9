"""Invariants of the deterministic partitioners (no overlap, sizes, determinism, skew)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secure_fedora.data.partition import (
    ClientData,
    dirichlet_partition,
    iid_partition,
    pathological_partition,
    rotation_partition,
)
from secure_fedora.data.sources import DataError, fingerprint_clients, load_dataset, rotate_images


def synthetic(per_class_train: int = 60, per_class_test: int = 20) -> dict:
    """Small labelled source with distinct random images (each row is identifiable)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        n = per_class * 10
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        labels = torch.arange(10).repeat_interleave(per_class)
        out[split] = (images, labels)
    return out


SOURCE = synthetic()
LARGE_SOURCE = synthetic(300, 60)


def assert_disjoint_and_faithful(clients: list[ClientData], source: dict) -> None:
    """No source row used twice; every row's label is its source label; sizes match meta."""
    train_rows: list[int] = []
    test_rows: list[int] = []
    for client in clients:
        for split, rows, pool in (
            ("train", client.meta["train_index"], "train"),
            ("val", client.meta["val_index"], "train"),
            ("test", client.meta["test_index"], "test"),
        ):
            y = getattr(client, f"{split}_y")
            assert len(rows) == y.shape[0] == getattr(client, f"{split}_x").shape[0]
            assert torch.equal(y, source[pool][1][torch.tensor(rows, dtype=torch.long)])
            (train_rows if pool == "train" else test_rows).extend(rows)
        assert (
            client.meta["label_histogram"] == torch.bincount(client.train_y, minlength=10).tolist()
        )
    assert len(train_rows) == len(set(train_rows))
    assert len(test_rows) == len(set(test_rows))


def rng_snapshot() -> tuple:
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy()


def assert_rng_untouched(before: tuple) -> None:
    after = rng_snapshot()
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])


# ----------------------------------------------------------------------------- rotation


def test_reference_rotation_setting_on_mnist() -> None:
    clients = rotation_partition("mnist", 36, 128, 64, None, None, seed=0)
    assert len(clients) == 36
    assert [c.client_id for c in clients] == list(range(36))
    for i, client in enumerate(clients):
        assert (client.num_train, client.num_val, client.num_test) == (128, 64, 277)
        assert client.meta["rotation_degrees"] == pytest.approx(10.0 * i)
        assert client.train_x.dtype == torch.float32
        assert client.train_x.shape == (128, 1, 28, 28)
        assert float(client.train_x.min()) >= 0.0 and float(client.train_x.max()) <= 1.0 + 1e-6
    train_src = load_dataset("mnist", "train")
    test_src = load_dataset("mnist", "test")
    assert_disjoint_and_faithful(clients, {"train": train_src, "test": test_src})
    # Client 0 holds the original pixels; client 9 the same source rows turned 90 degrees.
    rows0 = torch.tensor(clients[0].meta["train_index"])
    assert torch.equal(clients[0].train_x[:, 0], train_src[0][rows0].float() / 255.0)
    rows9 = torch.tensor(clients[9].meta["test_index"])
    expected = torch.rot90(test_src[0][rows9].float() / 255.0, 1, dims=(-2, -1))
    assert torch.allclose(clients[9].test_x[:, 0, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5)
    rows1 = torch.tensor(clients[1].meta["val_index"])
    expected1 = rotate_images(train_src[0][rows1].float().div(255.0).unsqueeze(1), 10.0)
    assert torch.equal(clients[1].val_x, expected1)


def test_dp_rotation_groups_setting_on_mnist() -> None:
    clients = rotation_partition("mnist", 40, 1000, 250, None, 4, seed=1)
    assert len(clients) == 40
    for i, client in enumerate(clients):
        assert (client.num_train, client.num_val, client.num_test) == (1000, 250, 250)
        assert client.meta["group"] == i % 4
        assert client.meta["rotation_degrees"] == pytest.approx(90.0 * (i % 4))
    rows = [r for c in clients for r in c.meta["train_index"] + c.meta["val_index"]]
    assert len(rows) == len(set(rows)) == 50000
    tests = [r for c in clients for r in c.meta["test_index"]]
    assert len(tests) == len(set(tests)) == 10000


def test_rotation_partition_is_deterministic_and_leaves_global_rng_alone() -> None:
    before = rng_snapshot()
    a = rotation_partition(SOURCE, 5, 20, 10, 8, None, seed=3)
    b = rotation_partition(SOURCE, 5, 20, 10, 8, None, seed=3)
    c = rotation_partition(SOURCE, 5, 20, 10, 8, None, seed=4)
    assert_rng_untouched(before)
    assert fingerprint_clients(a) == fingerprint_clients(b)
    assert fingerprint_clients(a) != fingerprint_clients(c)
    assert a[0].meta["train_index"] != c[0].meta["train_index"]
    assert_disjoint_and_faithful(a, SOURCE)
    assert [x.meta["rotation_degrees"] for x in a] == pytest.approx([0, 72, 144, 216, 288])


def test_rotation_test_split_divided_evenly_when_unspecified() -> None:
    clients = rotation_partition(SOURCE, 3, 10, 5, None, None, seed=0)
    assert [c.num_test for c in clients] == [66, 66, 66]  # 200 // 3, remainder unused
    assert_disjoint_and_faithful(clients, SOURCE)


def test_rotation_uses_nearest_interpolation_when_asked() -> None:
    clients = rotation_partition(SOURCE, 8, 10, 0, 5, None, seed=0, interpolation="nearest")
    src = SOURCE["train"][0].float() / 255.0
    values = set(src.unique().tolist()) | {0.0}
    assert set(clients[1].train_x.unique().tolist()) <= values  # nearest copies source pixels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 11, "train_per_client": 50, "val_per_client": 5}, "exceed the 600 rows"),
        ({"test_per_client": 41}, "exceed the 200 rows of the test split"),
        ({"groups": 6}, "data.groups = 6 must not exceed data.num_clients = 5"),
        ({"groups": 0}, "groups must be >= 1"),
        ({"num_clients": 0}, "num_clients must be >= 1"),
        ({"train_per_client": 0}, "train_per_client must be >= 1"),
        ({"val_per_client": -1}, "val_per_client must be >= 0"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"num_clients": True}, "num_clients must be an integer"),
    ],
)
def test_rotation_partition_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {
        "dataset": SOURCE,
        "num_clients": 5,
        "train_per_client": 20,
        "val_per_client": 10,
        "test_per_client": 8,
        "groups": None,
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        rotation_partition(**args)


def test_rotation_test_split_too_small_for_clients() -> None:
    tiny = {"train": SOURCE["train"], "test": (SOURCE["test"][0][:3], SOURCE["test"][1][:3])}
    with pytest.raises(DataError, match="the 3 rows of the test split cannot give each of "
                       "data.num_clients = 5 clients a test row"):
        rotation_partition(tiny, 5, 10, 0, None, None, seed=0)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("cifar10", "unknown dataset 'cifar10'"),
        (42, "dataset must be a dataset name or a mapping"),
        ({"train": SOURCE["train"]}, "no 'test' split"),
        ({"train": SOURCE["train"], "test": (SOURCE["test"][0],)}, r"an \(images, labels\) pair"),
        (
            {"train": (SOURCE["train"][0].float(), SOURCE["train"][1]), "test": SOURCE["test"]},
            "images must be a uint8 tensor",
        ),
        (
            {"train": (SOURCE["train"][0], SOURCE["train"][1].int()), "test": SOURCE["test"]},
            "labels must be an int64 tensor",
        ),
        (
            {"train": (SOURCE["train"][0][:5], SOURCE["train"][1]), "test": SOURCE["test"]},
            "has 5 images but 600 labels",
        ),
        (
            {"train": (SOURCE["train"][0], SOURCE["train"][1] + 1), "test": SOURCE["test"]},
            r"labels must lie in 0\.\.9",
        ),
        (
            {"train": SOURCE["train"], "test": (SOURCE["test"][0][:, :20], SOURCE["test"][1])},
            r"train images are \(28, 28\) but test images are \(20, 28\)",
        ),
    ],
)
def test_partition_rejects_bad_sources(dataset: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        rotation_partition(dataset, 2, 5, 5, 5, None, seed=0)  # type: ignore[arg-type]


def test_client_data_validates_its_tensors() -> None:
    x = torch.zeros(2, 1, 28, 28)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(DataError, match="client 4: val_x has 2 rows but val_y has 1"):
        ClientData(4, x, y, x, y[:1], x, y)
    with pytest.raises(DataError, match="client 4: test_y must be an int64 tensor"):
        ClientData(4, x, y, x, y, x, y.float())
    with pytest.raises(DataError, match="client 4: train_x must be a float32 tensor"):
        ClientData(4, x.double(), y, x, y, x, y)


# ----------------------------------------------------------------------------- Dirichlet


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_not() -> None:
    before = rng_snapshot()
    # E[max_k p_k] is about 0.66 under Dir(0.1 * 1_10) and about 0.12 under Dir(100 * 1_10).
    skewed = dirichlet_partition(LARGE_SOURCE, 20, 0.1, 40, 10, 10, seed=0)
    balanced = dirichlet_partition(LARGE_SOURCE, 20, 100.0, 40, 10, 10, seed=0)
    assert_rng_untouched(before)
    assert_disjoint_and_faithful(skewed, LARGE_SOURCE)
    assert_disjoint_and_faithful(balanced, LARGE_SOURCE)

    def top_share(c: ClientData) -> float:
        return max(c.meta["label_histogram"]) / c.num_train

    assert np.mean([top_share(c) for c in skewed]) > 0.5
    assert np.mean([top_share(c) for c in balanced]) < 0.3
    assert np.mean([np.count_nonzero(c.meta["label_histogram"]) for c in skewed]) < 4
    for c in skewed + balanced:
        assert (c.num_train, c.num_val, c.num_test) == (40, 10, 10)
        assert sum(c.meta["class_proportions"]) == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [1e307, 1e308, 1.7e308])
def test_dirichlet_alpha_so_large_the_gammas_sum_overflows_is_still_balanced(alpha: float) -> None:
    """Dir(alpha * 1_10) for a huge alpha is (almost) uniform: the ten gamma draws are each
    finite although their sum overflows float64, and no client's rows collapse into one class
    (an overflowed sum made every proportion 0, and the multinomial put every row in the last
    class)."""
    clients = dirichlet_partition(LARGE_SOURCE, 4, alpha, 40, 10, 10, seed=0)
    assert_disjoint_and_faithful(clients, LARGE_SOURCE)
    for c in clients:
        assert c.meta["class_proportions"] == pytest.approx([0.1] * 10, abs=1e-6)
        assert max(c.meta["label_histogram"]) / c.num_train < 0.5


def test_dirichlet_val_and_test_follow_train_proportions() -> None:
    clients = dirichlet_partition(SOURCE, 6, 0.5, 40, 20, 10, seed=2)
    for c in clients:
        train = np.bincount(c.train_y.numpy(), minlength=10)
        for y, size in ((c.val_y, 20), (c.test_y, 10)):
            counts = np.bincount(y.numpy(), minlength=10)
            assert np.all(np.abs(counts - train * size / 40) < 1.0)
            assert np.all(counts[train == 0] == 0)


def test_dirichlet_is_deterministic() -> None:
    a = dirichlet_partition(SOURCE, 4, 0.3, 30, 10, 10, seed=5)
    b = dirichlet_partition(SOURCE, 4, 0.3, 30, 10, 10, seed=5)
    c = dirichlet_partition(SOURCE, 4, 0.3, 30, 10, 10, seed=6)
    assert fingerprint_clients(a) == fingerprint_clients(b)
    assert fingerprint_clients(a) != fingerprint_clients(c)
    assert [x.meta for x in a] == [x.meta for x in b]


def test_dirichlet_infeasible_request_names_client() -> None:
    # Every source row has label 0, so a Dir(1) draw is feasible only if all 30 multinomial
    # train draws land on class 0 (probability E[p_0^30] = 1 / C(39, 9) < 1e-8 per draw).
    single_class = {
        "train": (SOURCE["train"][0], torch.zeros(600, dtype=torch.int64)),
        "test": (SOURCE["test"][0], torch.zeros(200, dtype=torch.int64)),
    }
    with pytest.raises(DataError, match=r"client 0: no feasible Dir\(data.dirichlet_alpha = 1\.0\) "
                       r"label proportions .* data.train_per_client = 30 \+ data.val_per_client "
                       r"= 5 \+ data.test_per_client = 1 rows.* \(data.num_clients = 2\)"):
        dirichlet_partition(single_class, 2, 1.0, 30, 5, 1, seed=0)


def test_dirichlet_records_redraws_when_classes_run_short() -> None:
    # Dir(0.001) is one-hot in practice and a class (60 rows) serves one client of 35 rows:
    # once the classes fill up, later clients need redraws, and meta says how many.
    clients = dirichlet_partition(SOURCE, 10, 0.001, 30, 5, 1, seed=0)
    assert_disjoint_and_faithful(clients, SOURCE)
    assert sum(c.meta["dirichlet_redraws"] for c in clients) > 0
    assert sorted(int(np.argmax(c.meta["label_histogram"])) for c in clients) == list(range(10))


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (0.0, "alpha must be a positive finite"),
        (float("inf"), "alpha must be a positive finite"),
        ("1", "alpha must be a positive number"),
        (True, "alpha must be a positive number"),
    ],
)
def test_dirichlet_rejects_bad_alpha(alpha: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        dirichlet_partition(SOURCE, 2, alpha, 10, 5, 5, seed=0)  # type: ignore[arg-type]


def test_dirichlet_rejects_oversized_requests() -> None:
    with pytest.raises(DataError, match="exceed the 600 rows of the train split"):
        dirichlet_partition(SOURCE, 7, 1.0, 80, 10, 5, seed=0)
    with pytest.raises(DataError, match="exceed the 200 rows of the test split"):
        dirichlet_partition(SOURCE, 7, 1.0, 10, 10, 30, seed=0)


def test_dirichlet_needs_explicit_test_size() -> None:
    with pytest.raises(DataError, match="test_per_client must be an integer for the dirichlet"):
        dirichlet_partition(SOURCE, 2, 1.0, 10, 5, None, seed=0)  # type: ignore[arg-type]


def test_dirichlet_on_mnist() -> None:
    clients = dirichlet_partition("mnist", 20, 0.1, 128, 64, 64, seed=0)
    assert len(clients) == 20
    assert all((c.num_train, c.num_val, c.num_test) == (128, 64, 64) for c in clients)
    assert np.mean([max(c.meta["label_histogram"]) / 128 for c in clients]) > 0.5


# ----------------------------------------------------------------------------- pathological


@pytest.mark.parametrize("c", [1, 2, 3])
def test_pathological_exactly_c_classes(c: int) -> None:
    before = rng_snapshot()
    clients = pathological_partition(SOURCE, 7, c, 12, 6, 6, seed=1)
    assert_rng_untouched(before)
    assert_disjoint_and_faithful(clients, SOURCE)
    usage = np.zeros(10, dtype=int)
    for client in clients:
        classes = client.meta["classes"]
        assert len(classes) == c
        assert sorted(set(client.train_y.tolist())) == classes
        assert sorted(set(client.val_y.tolist())) == classes
        assert sorted(set(client.test_y.tolist())) == classes
        counts = np.bincount(client.train_y.numpy(), minlength=10)[classes]
        assert counts.max() - counts.min() <= 1
        usage[classes] += 1
    assert usage.max() - usage.min() <= 1


def test_pathological_is_deterministic() -> None:
    a = pathological_partition(SOURCE, 5, 2, 10, 4, 4, seed=9)
    b = pathological_partition(SOURCE, 5, 2, 10, 4, 4, seed=9)
    c = pathological_partition(SOURCE, 5, 2, 10, 4, 4, seed=10)
    assert fingerprint_clients(a) == fingerprint_clients(b)
    assert fingerprint_clients(a) != fingerprint_clients(c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes_per_client": 11}, "data.classes_per_client = 11 exceeds the 10 classes"),
        ({"classes_per_client": 0}, "classes_per_client must be >= 1"),
        ({"classes_per_client": 3, "train_per_client": 2},
         "data.train_per_client = 2 must be at least data.classes_per_client = 3"),
        ({"classes_per_client": 3, "val_per_client": 2},
         "data.val_per_client = 2 must be at least data.classes_per_client = 3"),
        # the config's rule: a client without validation rows of each of its classes
        ({"classes_per_client": 3, "val_per_client": 0},
         "data.val_per_client = 0 must be at least data.classes_per_client = 3"),
        # the totals fit, but 11 clients of one class each put two on one class
        ({"num_clients": 11, "classes_per_client": 1, "train_per_client": 30, "val_per_client": 5},
         r"class .* of the train split has 60 rows but the 2 clients holding it need 70 "
         r"\(data.train_per_client = 30 \+ data.val_per_client = 5 rows each, over "
         r"data.classes_per_client = 1 classes\); .* \(data.num_clients = 11\)"),
        ({"num_clients": 11, "classes_per_client": 1, "test_per_client": 11},
         r"class .* of the test split has 20 rows but the 2 clients holding it need 22 "
         r"\(data.test_per_client = 11 rows each"),
        ({"test_per_client": -1}, "test_per_client must be >= 0"),
        ({"test_per_client": None}, "test_per_client must be an integer for the pathological"),
    ],
)
def test_pathological_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {
        "dataset": SOURCE,
        "num_clients": 5,
        "classes_per_client": 2,
        "train_per_client": 10,
        "val_per_client": 4,
        "test_per_client": 4,
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        pathological_partition(**args)


def test_pathological_names_a_class_the_labels_skip_instead_of_asking_for_fewer_rows() -> None:
    """Labels {0, 5, 9} (10 classes, 7 without rows): a client dealt class 1 was told to
    request fewer rows per client or fewer clients, which cannot help (the class has none)."""
    images, labels = SOURCE["train"]
    keep = (labels == 0) | (labels == 5) | (labels == 9)
    test_images, test_labels = SOURCE["test"]
    source = {"train": (images[keep], labels[keep]), "test": (test_images, test_labels)}
    with pytest.raises(DataError, match=r"class [1-8] has no rows in the train split, and the "
                                        r"pathological partition deals every class 0\.\.9: "
                                        r"relabel the classes 0\.\.K-1 .* or use partition "
                                        r"'iid' or 'dirichlet'$"):
        pathological_partition(source, 3, 2, 10, 4, 4, seed=0)


@pytest.mark.parametrize(("partition", "extra", "sizes", "keys"), [
    ("iid", {}, (7, 80, 10, 5), ("data.num_clients = 7", "data.train_per_client = 80",
                                 "data.val_per_client = 10")),
    ("rotation", {}, (5, 10, 5, 50), ("data.num_clients = 5", "data.test_per_client = 50")),
    ("dirichlet", {"dirichlet_alpha": 1.0}, (7, 80, 10, 5),
     ("data.num_clients = 7", "data.train_per_client = 80", "data.val_per_client = 10")),
    ("pathological", {"classes_per_client": 1}, (20, 50, 10, 5),
     ("data.train_per_client", "data.val_per_client", "data.num_clients")),
])
def test_a_federation_larger_than_the_data_names_the_config_keys(tmp_path, partition, extra,
                                                                 sizes, keys) -> None:
    """A config whose clients need more rows than the data holds is refused (before the run
    directory is made) with the data keys to change; it said only '7 clients x (80 train +
    10 val) exceed ...' or 'request fewer rows per client or fewer clients'."""
    from secure_fedora.api import Experiment

    num_clients, train, val, test = sizes
    config = {"methods": ["local"], "training": {"rounds": 1},
              "data": {"partition": partition, "num_clients": num_clients,
                       "train_per_client": train, "val_per_client": val,
                       "test_per_client": test, **extra}}
    with pytest.raises(DataError) as err:
        Experiment(config, data={"x_train": SOURCE["train"][0], "y_train": SOURCE["train"][1],
                                 "x_test": SOURCE["test"][0], "y_test": SOURCE["test"][1]},
                   run_dir=tmp_path / "run").run()
    for key in keys:
        assert key in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("partition", ["rotation", "iid", "dirichlet", "pathological"])
@pytest.mark.parametrize(("sizes", "message"), [
    ((11, 50, 5, 5), "data.num_clients = 11 x (data.train_per_client = 50 + data.val_per_client "
                     "= 5) = 605 rows exceed the 600 rows of the train split"),
    ((7, 10, 10, 30), "data.num_clients = 7 x data.test_per_client = 30 = 210 rows exceed the "
                      "200 rows of the test split"),
])
def test_every_partitioner_refuses_a_federation_larger_than_the_data_alike(partition, sizes,
                                                                          message) -> None:
    """The wording differed by partitioner: dirichlet gave no total ('... exceed the 600 rows'),
    pathological only a per-class shortfall ('class 3 of the train split has 60 rows but 2
    clients need 110'). Each now names the config keys, their values and the total."""
    num_clients, train, val, test = sizes
    extra = {"rotation": {"groups": None}, "iid": {}, "dirichlet": {"alpha": 1.0},
             "pathological": {"classes_per_client": 1}}[partition]
    fn = {"rotation": rotation_partition, "iid": iid_partition, "dirichlet": dirichlet_partition,
          "pathological": pathological_partition}[partition]
    with pytest.raises(DataError) as err:
        fn(SOURCE, num_clients=num_clients, train_per_client=train, val_per_client=val,
           test_per_client=test, seed=0, **extra)
    assert str(err.value) == message


def test_a_registered_dataset_dict_takes_either_accepted_shape(tmp_path) -> None:
    """A registered dataset returning a dict with wrong keys was told "dataset mapping has no
    'train' split" only, and a centralized dict (x_train, y_train, x_test, y_test, as
    ``data.source`` returns) was refused the same way: it is accepted now, and the message
    for other keys names both shapes."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.core.registry import DATASETS
    from secure_fedora.runtimes.inprocess import Simulation

    rng = np.random.default_rng(0)
    central = {"x_train": rng.normal(size=(60, 5)).astype("float32"),
               "y_train": np.arange(60) % 2, "x_test": rng.normal(size=(20, 5)).astype("float32"),
               "y_test": np.arange(20) % 2}
    DATASETS.register("h-ks2-central", lambda seed: central)
    DATASETS.register("h-ks2-wrong", lambda seed: {"xtrain": central["x_train"]})
    try:
        def clients(name: str) -> list:
            cfg = parse_config({"methods": ["local"], "training": {"rounds": 1},
                                "data": {"dataset": name, "partition": "iid", "num_clients": 2,
                                         "train_per_client": 20, "val_per_client": 5,
                                         "test_per_client": 5}})
            return Simulation(cfg, tmp_path / "run").clients

        assert [int(c.train_x.shape[0]) for c in clients("h-ks2-central")] == [20, 20]
        with pytest.raises(DataError, match=r"no 'train' split \(its keys: 'xtrain'\); a dataset "
                                            r"mapping is either \{'train': .* or a centralized "
                                            r"dict with keys x_train, y_train, x_test, y_test"):
            clients("h-ks2-wrong")
    finally:
        DATASETS.unregister("h-ks2-central")
        DATASETS.unregister("h-ks2-wrong")


def test_a_plugin_that_edits_the_builtin_dataset_in_place_changes_no_later_run() -> None:
    """The built-in datasets handed out the process's cached tensors themselves: a plug-in
    partitioner (or a data plug-in wrapping ``DATASETS.get("mnist")``) that edited its input
    in place changed the data of every later run in the process (a sweep, a notebook, the
    tests). Such callers now get a copy; the built-in partitioners, which only read their
    source, still share the cache (no copy), and no client's data is a view of it."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.core.registry import DATASETS, PARTITIONERS
    from secure_fedora.data.sources import _load_cached, clear_dataset_cache
    from secure_fedora.runtimes.inprocess import build_clients

    doc = {"methods": ["local"], "data": {"partition": "iid", "num_clients": 2,
                                          "train_per_client": 12, "val_per_client": 4,
                                          "test_per_client": 4}}
    before = fingerprint_clients(build_clients(parse_config(doc)))

    def vandal(source, data_cfg, seed):
        source.train_x.zero_()
        source.test_y.fill_(1)
        return PARTITIONERS.get("iid")(source, data_cfg, seed)

    PARTITIONERS.register("vandal_iid_x", vandal)
    try:
        assert PARTITIONERS.is_builtin("iid") and not PARTITIONERS.is_builtin("vandal_iid_x")
        build_clients(parse_config({**doc, "data": {**doc["data"], "partition": "vandal_iid_x"}}))
        DATASETS.get("mnist")(0).train_y.zero_()  # a data plug-in editing the entry's data
        assert fingerprint_clients(build_clients(parse_config(doc))) == before
        cached = {t.untyped_storage().data_ptr()
                  for split in ("train", "test") for t in _load_cached("mnist", split)}
        for part, extra in (("iid", {}), ("rotation", {}), ("dirichlet", {"dirichlet_alpha": 0.5}),
                            ("pathological", {"classes_per_client": 2})):
            clients = build_clients(parse_config(
                {**doc, "data": {**doc["data"], "partition": part, **extra}}))
            assert not {getattr(c, f"{s}_{v}").untyped_storage().data_ptr()
                        for c in clients for s in ("train", "val", "test") for v in "xy"} & cached
    finally:
        PARTITIONERS.unregister("vandal_iid_x")
        clear_dataset_cache()  # whatever happened, later tests parse the files again
