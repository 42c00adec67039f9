"""Deterministic federated partitions of a labeled dataset.

Four partitioners (registered in :data:`secure_fedora.core.registry.PARTITIONERS`), each a pure function of its arguments and ``seed`` (randomness comes from
a local ``numpy.random.Generator``; no global RNG state is read or changed):

- :func:`iid_partition`: rows drawn uniformly at random (no shift).
- :func:`rotation_partition`: feature shift; every client's images are rotated by its angle.
- :func:`dirichlet_partition`: label skew with per-client class proportions from Dir(alpha).
- :func:`pathological_partition`: every client sees exactly ``classes_per_client`` classes.

Guarantees shared by all three: no source row is used twice (across clients, and between a
client's train and validation rows, which both come from the dataset's train split; test rows
come from the test split), sizes are exactly as requested, and the source indices of every
row are recorded in ``meta`` (``train_index``, ``val_index``, ``test_index``) so the
guarantees can be checked. The built-in image datasets follow :mod:`secure_fedora.data.sources`'s
convention (float32 in ``[0, 1]``, shape ``(n, 1, 28, 28)``); a :class:`LabeledDataset` from
user code keeps its inputs (any shape, float32) and its class count. Labels are int64
``(n,)`` in ``0..C-1``, or float32 ``(n, C)`` multi-hot targets (``iid`` and ``rotation``
only: the label-skew partitioners need single labels).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch

from secure_fedora.core.config import classes_per_client_problem
from secure_fedora.core.registry import DATASETS, PARTITIONERS
from secure_fedora.data.sources import (
    NUM_CLASSES,
    DataError,
    DatasetName,
    _load_cached,
    rotate_images,
    to_float_images,
)

DatasetSplits = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""A custom source: ``{"train": (images, labels), "test": (images, labels)}`` with images uint8
``(n, H, W)`` and labels int64 ``(n,)`` in ``0..9``."""

_DIRICHLET_MAX_DRAWS = 100


@dataclass(frozen=True)
class LabeledDataset:
    """A centralized labeled dataset before partitioning.

    ``*_x``: uint8 images ``(n, H, W)`` (the built-in datasets; converted to ``x / 255`` per
    client) or float32 inputs of any shape ``(n, ...)`` (used as given). ``*_y``: int64
    ``(n,)`` in ``0..num_classes-1``, or float32 ``(n, num_classes)`` multi-hot targets.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def multilabel(self) -> bool:
        """True for multi-hot targets ``(n, C)``."""
        return self.train_y.dim() == 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input as the model sees it (images gain their channel axis)."""
        shape = tuple(int(d) for d in self.train_x.shape[1:])
        return (1, *shape) if self.train_x.dtype == torch.uint8 else shape


@dataclass
class ClientData:
    """One client's data: ``*_x`` float32 ``(n, ...)`` (``(n, 1, H, W)`` in ``[0, 1]`` for the
    built-in images), ``*_y`` int64 ``(n,)`` class labels or float32 ``(n, C)`` multi-hot targets.

    ``meta`` holds bookkeeping: ``kind`` (partitioner), ``train_index`` / ``val_index`` (rows of
    the source train split) and ``test_index`` (rows of the source test split) as lists of
    ints, ``label_histogram`` (train label counts, length 10), and partitioner-specific keys
    (``rotation_degrees`` and ``group``; ``class_proportions``; ``classes``).
    """

    client_id: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x = getattr(self, f"{split}_x")
            y = getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 2:
                raise DataError(
                    f"client {self.client_id}: {split}_x must be a float32 tensor (n, ...), "
                    f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
                )
            single = isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.dim() == 1
            multi = isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.dim() == 2
            if not (single or multi):
                raise DataError(
                    f"client {self.client_id}: {split}_y must be an int64 tensor (n,) or a "
                    f"float32 multi-label tensor (n, C), got "
                    f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}"
                )
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"client {self.client_id}: {split}_x has {x.shape[0]} rows but {split}_y "
                    f"has {y.shape[0]}"
                )

    @property
    def num_train(self) -> int:
        """Number of training rows."""
        return int(self.train_y.shape[0])

    @property
    def num_val(self) -> int:
        """Number of validation rows."""
        return int(self.val_y.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test rows."""
        return int(self.test_y.shape[0])


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sizes(
    num_clients: object, train_per_client: object, val_per_client: object, seed: object
) -> tuple[int, int, int, int]:
    return (
        _check_int("num_clients", num_clients, 1),
        _check_int("train_per_client", train_per_client, 1),
        _check_int("val_per_client", val_per_client, 0),
        _check_int("seed", seed, 0),
    )


def _check_totals(source: LabeledDataset, num_clients: int, train_per_client: int,
                  val_per_client: int, test_per_client: int | None) -> None:
    """DataError, in one wording for every partitioner, naming the config keys and the
    numbers, when the clients need more rows than a split holds (``test_per_client`` None:
    the test split is divided, see :func:`rotation_partition`)."""
    n_train, n_test = int(source.train_y.shape[0]), int(source.test_y.shape[0])
    need = num_clients * (train_per_client + val_per_client)
    if need > n_train:
        raise DataError(
            f"data.num_clients = {num_clients} x (data.train_per_client = {train_per_client} + "
            f"data.val_per_client = {val_per_client}) = {need} rows exceed the {n_train} rows of "
            "the train split"
        )
    if test_per_client is None:
        if n_test < num_clients:
            raise DataError(
                f"the {n_test} rows of the test split cannot give each of data.num_clients = "
                f"{num_clients} clients a test row (data.test_per_client unset divides them)"
            )
    elif num_clients * test_per_client > n_test:
        raise DataError(
            f"data.num_clients = {num_clients} x data.test_per_client = {test_per_client} = "
            f"{num_clients * test_per_client} rows exceed the {n_test} rows of the test split"
        )


def _check_test_size(test_per_client: object, kind: str) -> int:
    if test_per_client is None:
        raise DataError(
            f"test_per_client must be an integer for the {kind} partition: its test rows follow "
            "each client's label distribution, so the test split cannot simply be divided "
            "(None is accepted only by the rotation partition)"
        )
    return _check_int("test_per_client", test_per_client, 0)


def shared_builtin_dataset(name: DatasetName) -> LabeledDataset:
    """Built-in dataset ``name`` as this process parsed it once: its cached tensors
    themselves, for the built-in partitioners only, which read their source and copy every
    row they hand out (no client's data is a view of the cache). Anyone who may edit the
    tensors takes the registered entry's copy (``DATASETS.get(name)(seed)``)."""
    train_x, train_y = _load_cached(name, "train")
    test_x, test_y = _load_cached(name, "test")
    return LabeledDataset(train_x, train_y, test_x, test_y, NUM_CLASSES)


def _builtin_dataset(name: DatasetName) -> LabeledDataset:
    """A fresh copy of built-in dataset ``name``: its caller (a plug-in partitioner, a data
    plug-in wrapping it) may edit it in place without changing any later run's data."""
    shared = shared_builtin_dataset(name)
    return LabeledDataset(shared.train_x.clone(), shared.train_y.clone(), shared.test_x.clone(),
                          shared.test_y.clone(), shared.num_classes)


for _name in get_args(DatasetName):
    DATASETS.register(_name, lambda seed, _name=_name: _builtin_dataset(_name))


def _source(dataset: DatasetName | DatasetSplits | LabeledDataset) -> LabeledDataset:
    """Resolve ``dataset`` (a registered name, a mapping of uint8 image splits, a centralized
    dict (``userdata.CENTRALIZED_KEYS``) or a :class:`LabeledDataset`) to a
    :class:`LabeledDataset`."""
    if isinstance(dataset, LabeledDataset):
        return dataset
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise DataError(
                f"unknown dataset {dataset!r}; expected one of {DATASETS.names()} "
                "or a mapping {'train': (images, labels), 'test': (images, labels)}"
            )
        if DATASETS.is_builtin(dataset):  # read by a built-in partitioner: no copy needed
            return shared_builtin_dataset(dataset)  # type: ignore[arg-type]
        return DATASETS.get(dataset)(0)
    if not isinstance(dataset, Mapping):
        raise DataError(
            f"dataset must be a dataset name or a mapping of splits, got {type(dataset).__name__}"
        )
    from secure_fedora.data.userdata import CENTRALIZED_KEYS, as_labeled_dataset

    if not {"train", "test"} & set(dataset) and set(CENTRALIZED_KEYS) & set(dataset):
        return as_labeled_dataset(dataset, "dataset")  # a centralized dict, as data.source's
    out: list[torch.Tensor] = []
    for split in ("train", "test"):
        if split not in dataset:
            shown = ", ".join(repr(k) for k in list(dataset)[:6])
            raise DataError(
                f"dataset mapping has no {split!r} split (its keys: {shown or 'none'}); a "
                "dataset mapping is either {'train': (images, labels), 'test': (images, "
                "labels)} (uint8 images (n, H, W), int64 labels) or a centralized dict with "
                f"keys {', '.join(CENTRALIZED_KEYS)} (and optionally num_classes)")
        pair = dataset[split]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise DataError(f"dataset[{split!r}] must be an (images, labels) pair")
        images, labels = pair
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 3:
            raise DataError(
                f"dataset[{split!r}] images must be a uint8 tensor (n, H, W), got "
                f"{getattr(images, 'dtype', type(images).__name__)} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise DataError(f"dataset[{split!r}] labels must be an int64 tensor (n,)")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"dataset[{split!r}] has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
            raise DataError(f"dataset[{split!r}] labels must lie in 0..{NUM_CLASSES - 1}")
        out.extend((images, labels))
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(
            f"train images are {tuple(out[0].shape[1:])} but test images are "
            f"{tuple(out[2].shape[1:])}"
        )
    return LabeledDataset(out[0], out[1], out[2], out[3], NUM_CLASSES)


def _histogram(labels: torch.Tensor, num_classes: int) -> list[int]:
    if labels.dim() == 2:  # multi-label: how often each label is on
        return [int(c) for c in (labels > 0.5).sum(dim=0).tolist()]
    return [int(c) for c in torch.bincount(labels, minlength=num_classes).tolist()]


def _single_labels(source: LabeledDataset, kind: str) -> None:
    if source.multilabel:
        raise DataError(
            f"partition {kind!r} draws rows by class and needs single labels (n,); multi-label "
            "targets (n, C) can use partition 'iid' or 'rotation'"
        )


def _make_client(
    client_id: int,
    source: LabeledDataset,
    train_index: np.ndarray,
    val_index: np.ndarray,
    test_index: np.ndarray,
    meta: dict[str, Any],
    degrees: float = 0.0,
    interpolation: Literal["bilinear", "nearest"] = "bilinear",
) -> ClientData:
    train_x, train_y, test_x, test_y = source.train_x, source.train_y, source.test_x, source.test_y
    parts: dict[str, torch.Tensor] = {}
    for split, images, labels, index in (
        ("train", train_x, train_y, train_index),
        ("val", train_x, train_y, val_index),
        ("test", test_x, test_y, test_index),
    ):
        rows = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        x = to_float_images(images[rows]) if images.dtype == torch.uint8 else images[rows].clone()
        if degrees:
            x = rotate_images(x, degrees, mode=interpolation)
        parts[f"{split}_x"] = x.contiguous()
        parts[f"{split}_y"] = labels[rows].clone()
    full_meta: dict[str, Any] = {
        **meta,
        "train_index": [int(i) for i in train_index],
        "val_index": [int(i) for i in val_index],
        "test_index": [int(i) for i in test_index],
        "label_histogram": _histogram(parts["train_y"], source.num_classes),
        "num_classes": int(source.num_classes),
    }
    return ClientData(client_id=client_id, meta=full_meta, **parts)


# --------------------------------------------------------------------------- rotation


def rotation_partition(
    dataset: DatasetName | DatasetSplits | LabeledDataset,
    num_clients: int,
    train_per_client: int,
    val_per_client: int,
    test_per_client: int | None,
    groups: int | None,
    seed: int,
    interpolation: Literal["bilinear", "nearest"] = "bilinear",
) -> list[ClientData]:
    """Rotated-images partition (feature shift, identical label distribution in expectation).

    Train and validation rows are drawn uniformly without replacement from the train split,
    disjoint across clients and between train and validation. The test split is shuffled and
    divided among clients without overlap; ``test_per_client=None`` divides all of it evenly
    (``n_test // num_clients`` each, the remainder unused). With ``groups=None`` client ``i`` is
    rotated counter-clockwise by ``i * 360 / num_clients`` degrees; with ``groups=G`` it belongs
    to group ``i % G`` and is rotated by ``group * 360 / G`` degrees. All three of a client's
    splits are rotated by its angle. Inputs must be images, ``(n, H, W)`` or ``(n, C, H, W)``.
    Raises :class:`DataError` if the requested sizes exceed a split or an argument is invalid.
    """
    num_clients, train_per_client, val_per_client, seed = _check_sizes(
        num_clients, train_per_client, val_per_client, seed
    )
    if groups is not None:
        groups = _check_int("groups", groups, 1)
        if groups > num_clients:
            raise DataError(f"data.groups = {groups} must not exceed data.num_clients = "
                            f"{num_clients}")
    source = _source(dataset)
    if source.train_x.dtype != torch.uint8 and source.train_x.dim() not in (3, 4):
        raise DataError(
            f"partition 'rotation' rotates images (n, H, W) or (n, C, H, W); the inputs have "
            f"shape {tuple(source.train_x.shape)}: use partition 'iid', 'dirichlet' or 'pathological'"
        )

    def angle(i: int) -> tuple[float, dict[str, Any]]:
        group = i if groups is None else i % groups
        degrees = group * 360.0 / (num_clients if groups is None else groups)
        return degrees, {"kind": "rotation", "rotation_degrees": degrees, "group": group}

    return _uniform_partition(source, num_clients, train_per_client, val_per_client,
                              test_per_client, seed, angle, interpolation)


def iid_partition(
    dataset: DatasetName | DatasetSplits | LabeledDataset,
    num_clients: int,
    train_per_client: int,
    val_per_client: int,
    test_per_client: int | None,
    seed: int,
) -> list[ClientData]:
    """IID partition: rows drawn uniformly at random without replacement, as
    :func:`rotation_partition` draws them but with no rotation (any input shape).
    ``test_per_client=None`` divides the test split evenly."""
    num_clients, train_per_client, val_per_client, seed = _check_sizes(
        num_clients, train_per_client, val_per_client, seed
    )
    return _uniform_partition(_source(dataset), num_clients, train_per_client, val_per_client,
                              test_per_client, seed, lambda i: (0.0, {"kind": "iid"}), "bilinear")


def _uniform_partition(
    source: LabeledDataset,
    num_clients: int,
    train_per_client: int,
    val_per_client: int,
    test_per_client: int | None,
    seed: int,
    angle: Any,
    interpolation: Literal["bilinear", "nearest"],
) -> list[ClientData]:
    n_train, n_test = int(source.train_y.shape[0]), int(source.test_y.shape[0])
    if test_per_client is not None:
        test_per_client = _check_int("test_per_client", test_per_client, 0)
    _check_totals(source, num_clients, train_per_client, val_per_client, test_per_client)
    if test_per_client is None:
        test_per_client = n_test // num_clients
    rng = np.random.default_rng(seed)
    train_perm = rng.permutation(n_train)
    test_perm = rng.permutation(n_test)
    val_offset = num_clients * train_per_client
    clients = []
    for i in range(num_clients):
        degrees, meta = angle(i)
        clients.append(
            _make_client(
                i,
                source,
                train_perm[i * train_per_client : (i + 1) * train_per_client],
                train_perm[val_offset + i * val_per_client : val_offset + (i + 1) * val_per_client],
                test_perm[i * test_per_client : (i + 1) * test_per_client],
                meta,
                degrees=degrees,
                interpolation=interpolation,
            )
        )
    return clients


# --------------------------------------------------------------------------- label skew


def _proportional_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``weights`` (largest remainder,
    ties broken by the lower class index); zero weight gives zero count."""
    weights = np.asarray(weights, dtype=np.float64)
    if total == 0:
        return np.zeros(weights.shape, dtype=np.int64)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    short = total - int(counts.sum())
    order = np.lexsort((np.arange(len(weights)), -remainder))
    counts[order[:short]] += 1
    return counts


class _ClassPools:
    """Per-class queues of shuffled source rows, consumed without replacement."""

    def __init__(self, labels: torch.Tensor, rng: np.random.Generator, split: str,
                 num_classes: int) -> None:
        y = labels.numpy()
        self.split = split
        self.pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
        self.used = np.zeros(num_classes, dtype=np.int64)

    def remaining(self) -> np.ndarray:
        return np.array([len(p) for p in self.pools], dtype=np.int64) - self.used

    def take(self, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        parts = []
        for c, k in enumerate(counts):
            k = int(k)
            if k > self.remaining()[c]:
                raise DataError(
                    f"class {c} of the {self.split} split has {self.remaining()[c]} unused rows, "
                    f"{k} requested"
                )
            parts.append(self.pools[c][self.used[c] : self.used[c] + k])
            self.used[c] += k
        rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return rng.permutation(rows)


def _normalized_gammas(gammas: np.ndarray) -> np.ndarray | None:
    """``gammas / gammas.sum()``: a Dirichlet draw from its (finite) gamma components; None
    when every component underflowed to 0. A sum that overflows float64 (alpha above about
    1.8e307 for ten classes, each draw finite) is taken over the components divided by the
    largest one first: the same ratios, where the overflowed sum made every proportion 0."""
    with np.errstate(over="ignore"):  # an overflowed sum takes the scaled path below
        total = gammas.sum()
    if not total > 0:
        return None
    if math.isfinite(total):
        return gammas / total
    scaled = gammas / gammas.max()
    return scaled / scaled.sum()


def dirichlet_partition(
    dataset: DatasetName | DatasetSplits | LabeledDataset,
    num_clients: int,
    alpha: float,
    train_per_client: int,
    val_per_client: int,
    test_per_client: int,
    seed: int,
) -> list[ClientData]:
    """Label-skew partition with class proportions ``p_i ~ Dir(alpha * 1_10)`` per client.

    A client's train label counts are ``Multinomial(train_per_client, p_i)``; its validation and
    test label counts are the train counts scaled to ``val_per_client`` / ``test_per_client``
    (largest-remainder rounding), so all three splits share its label proportions up to
    rounding. Rows are drawn without replacement (train and validation from the train split,
    test from the test split), disjoint across clients and splits. Clients are filled in order;
    when a draw for client ``i`` asks for more rows of a class than remain unused, ``p_i`` is
    redrawn, so proportions are Dirichlet draws *conditioned on feasibility* (the number of
    redraws is recorded in ``meta["dirichlet_redraws"]``; after 100 infeasible draws a
    :class:`DataError` names the client). ``meta["class_proportions"]`` holds the accepted
    ``p_i``.
    """
    num_clients, train_per_client, val_per_client, seed = _check_sizes(
        num_clients, train_per_client, val_per_client, seed
    )
    test_per_client = _check_test_size(test_per_client, "dirichlet")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise DataError(f"alpha must be a positive number, got {alpha!r}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a positive finite number, got {alpha}")
    source = _source(dataset)
    _single_labels(source, "dirichlet")
    num_classes = source.num_classes
    _check_totals(source, num_clients, train_per_client, val_per_client, test_per_client)
    rng = np.random.default_rng(seed)
    train_pools = _ClassPools(source.train_y, rng, "train", num_classes)
    test_pools = _ClassPools(source.test_y, rng, "test", num_classes)
    clients = []
    for i in range(num_clients):
        redraws = 0
        for attempt in range(_DIRICHLET_MAX_DRAWS):
            # Gamma-normalized draw; a tiny alpha can underflow every component to 0, in which
            # case the draw is degenerate and is redrawn like an infeasible one.
            gammas = rng.standard_gamma(alpha, num_classes)
            p = _normalized_gammas(gammas)
            if p is None:
                continue
            train_counts = rng.multinomial(train_per_client, p)
            val_counts = _proportional_counts(train_counts, val_per_client)
            test_counts = _proportional_counts(train_counts, test_per_client)
            if np.all(train_counts + val_counts <= train_pools.remaining()) and np.all(
                test_counts <= test_pools.remaining()
            ):
                redraws = attempt
                break
        else:
            raise DataError(
                f"client {i}: no feasible Dir(data.dirichlet_alpha = {alpha}) label proportions "
                f"in {_DIRICHLET_MAX_DRAWS} draws; the remaining rows per class cannot supply "
                f"data.train_per_client = {train_per_client} + data.val_per_client = "
                f"{val_per_client} + data.test_per_client = {test_per_client} rows. Request "
                f"fewer rows per client, fewer clients (data.num_clients = {num_clients}) or a "
                "larger data.dirichlet_alpha"
            )
        clients.append(
            _make_client(
                i,
                source,
                train_pools.take(train_counts, rng),
                train_pools.take(val_counts, rng),
                test_pools.take(test_counts, rng),
                {
                    "kind": "dirichlet",
                    "alpha": alpha,
                    "class_proportions": [float(v) for v in p],
                    "dirichlet_redraws": redraws,
                },
            )
        )
    return clients


def pathological_partition(
    dataset: DatasetName | DatasetSplits | LabeledDataset,
    num_clients: int,
    classes_per_client: int,
    train_per_client: int,
    val_per_client: int,
    test_per_client: int,
    seed: int,
) -> list[ClientData]:
    """Pathological label skew: every client holds exactly ``classes_per_client`` classes.

    Classes are assigned greedily in client order: each client takes the ``c`` classes used by
    the fewest earlier clients (ties broken at random), so every class serves the same number
    of clients up to one. Within a client each split is divided as evenly as possible over its
    ``c`` classes (one shard per class; sizes differ by at most one), so each split contains
    all ``c`` classes whenever its size is at least ``c``. Train and validation sizes must be
    at least ``c`` (:func:`~secure_fedora.core.config.classes_per_client_problem`, the config's
    rule). Rows are drawn without replacement, disjoint across clients and splits.
    ``meta["classes"]`` lists the client's classes. Raises :class:`DataError` if a class runs
    out of rows.
    """
    num_clients, train_per_client, val_per_client, seed = _check_sizes(
        num_clients, train_per_client, val_per_client, seed
    )
    test_per_client = _check_test_size(test_per_client, "pathological")
    c = _check_int("classes_per_client", classes_per_client, 1)
    source = _source(dataset)
    _single_labels(source, "pathological")
    num_classes = source.num_classes
    if c > num_classes:
        raise DataError(f"data.classes_per_client = {c} exceeds the {num_classes} classes of "
                        "the data")
    problem = classes_per_client_problem(train_per_client, val_per_client, c)
    if problem is not None:
        raise DataError(problem)
    _check_totals(source, num_clients, train_per_client, val_per_client, test_per_client)
    rng = np.random.default_rng(seed)
    usage = np.zeros(num_classes, dtype=np.int64)
    assignments = []
    for _ in range(num_clients):
        order = np.lexsort((rng.random(num_classes), usage))
        chosen = np.sort(order[:c])
        usage[chosen] += 1
        assignments.append(chosen)

    def split_counts(classes: np.ndarray, total: int) -> np.ndarray:
        counts = np.zeros(num_classes, dtype=np.int64)
        base, extra = divmod(total, c)
        counts[classes] = base
        counts[rng.permutation(classes)[:extra]] += 1
        return counts

    plans = []
    for classes in assignments:
        plans.append(
            (
                split_counts(classes, train_per_client),
                split_counts(classes, val_per_client),
                split_counts(classes, test_per_client),
            )
        )
    train_demand = sum(t + v for t, v, _ in plans)
    test_demand = sum(s for _, _, s in plans)
    train_pools = _ClassPools(source.train_y, rng, "train", num_classes)
    test_pools = _ClassPools(source.test_y, rng, "test", num_classes)
    for pools, demand in ((train_pools, train_demand), (test_pools, test_demand)):
        short = np.flatnonzero(demand > pools.remaining())
        if short.size:
            k = int(short[0])
            if pools.remaining()[k] == 0:  # fewer rows or clients cannot help: the labels skip k
                raise DataError(
                    f"class {k} has no rows in the {pools.split} split, and the pathological "
                    f"partition deals every class 0..{num_classes - 1}: relabel the classes "
                    "0..K-1 (each with rows in both splits) or use partition 'iid' or 'dirichlet'")
            per_client = (f"data.train_per_client = {train_per_client} + data.val_per_client = "
                           f"{val_per_client}" if pools.split == "train" else
                           f"data.test_per_client = {test_per_client}")
            raise DataError(
                f"class {k} of the {pools.split} split has {pools.remaining()[k]} rows but the "
                f"{int(usage[k])} clients holding it need {int(demand[k])} ({per_client} rows "
                f"each, over data.classes_per_client = {c} classes); request fewer rows per "
                f"client or fewer clients (data.num_clients = {num_clients})"
            )
    clients = []
    for i, (classes, (train_counts, val_counts, test_counts)) in enumerate(
        zip(assignments, plans, strict=True)
    ):
        clients.append(
            _make_client(
                i,
                source,
                train_pools.take(train_counts, rng),
                train_pools.take(val_counts, rng),
                test_pools.take(test_counts, rng),
                {"kind": "pathological", "classes": [int(k) for k in classes]},
            )
        )
    return clients


# --------------------------------------------------------------------------- registry


def _common(d: Any, seed: int) -> dict[str, Any]:
    return dict(num_clients=d.num_clients, train_per_client=d.train_per_client,
                val_per_client=d.val_per_client, test_per_client=d.test_per_client, seed=seed)


@PARTITIONERS.register("iid")
def _split_iid(dataset: LabeledDataset, d: Any, seed: int) -> list[ClientData]:
    return iid_partition(dataset, **_common(d, seed))


@PARTITIONERS.register("rotation")
def _split_rotation(dataset: LabeledDataset, d: Any, seed: int) -> list[ClientData]:
    return rotation_partition(dataset, groups=d.groups, interpolation=d.rotation_interpolation,
                              **_common(d, seed))


@PARTITIONERS.register("dirichlet")
def _split_dirichlet(dataset: LabeledDataset, d: Any, seed: int) -> list[ClientData]:
    return dirichlet_partition(dataset, alpha=d.dirichlet_alpha, **_common(d, seed))


@PARTITIONERS.register("pathological")
def _split_pathological(dataset: LabeledDataset, d: Any, seed: int) -> list[ClientData]:
    return pathological_partition(dataset, classes_per_client=d.classes_per_client,
                                  **_common(d, seed))
