"""User data from ``[data] source = "package.module:function"`` (or the Python API).

The function is called with the experiment seed and returns either

- a centralized labeled dataset ``{"x_train", "y_train", "x_test", "y_test"}`` (numpy arrays
  or tensors; inputs of any shape ``(n, ...)``; labels ``(n,)`` in ``0..C-1``, or multi-hot
  targets ``(n, C)`` for multi-label tasks; bool labels are read as 0/1 (a binary task, e.g.
  ``training.loss = "bce"``); optional ``"num_classes"``, else ``max label + 1``, and then
  every class of ``0..max label`` must have a row in some split: labels are never remapped),
  which the configured partitioner splits among the clients; or
- a list of per-client dicts ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` for data
  that is already federated (one dict per client, ``data.num_clients`` of them).

Everything is checked before training and a problem raises :class:`DataError` naming the
source, the key and the client: a non-array, mismatched row counts or input shapes, NaN or
infinite inputs, non-integer or out-of-range labels, empty splits. Inputs are converted to
float32 and used as given (scale them in the source function).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure_fedora.core.plugins import raised_at
from secure_fedora.data.partition import ClientData, LabeledDataset
from secure_fedora.data.sources import DataError

__all__ = [
    "CENTRALIZED_KEYS",
    "FederatedData",
    "as_federated",
    "as_labeled_dataset",
    "call_source",
    "coerce_user_data",
    "label_space",
    "load_source",
]

CENTRALIZED_KEYS = ("x_train", "y_train", "x_test", "y_test")

MAX_CLASSES = 1_000_000
"""The most classes a source may declare (per-class tables are allocated from the count)."""
SPLITS = ("train", "val", "test")

log = logging.getLogger("secure_fedora.data.userdata")


@dataclass(frozen=True)
class FederatedData:
    """Already-federated user data: the clients, their class count and label kind."""

    clients: list[ClientData]
    num_classes: int


def _tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise DataError(f"{where} is a tensor on the meta device (it holds no values)")
        if value.layout != torch.strided:
            raise DataError(f"{where} is a {value.layout} tensor; give a dense one (.to_dense())")
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(f"{where} is a numpy array of Python objects; expected numbers")
        if value.dtype.kind in "USV":
            raise DataError(f"{where} holds {value.dtype} values (text or bytes); expected numbers "
                            "(map class names to labels 0..C-1)")
        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as err:  # a numpy dtype torch has no tensor for
            raise DataError(f"{where} has numpy dtype {value.dtype}, which torch cannot hold: "
                            f"{err}") from None
    raise DataError(f"{where} is a {type(value).__name__}; expected a numpy array or a torch tensor")


def _check_input_shape(x: torch.Tensor, where: str) -> None:
    """Inputs are real numbers with a row axis and at least one feature per row."""
    if x.dim() < 2:
        raise DataError(f"{where} has shape {tuple(x.shape)}; inputs need a row axis and at least "
                        "one feature axis, (n, ...)")
    if x.dtype == torch.bool or torch.is_complex(x):
        raise DataError(f"{where} has dtype {x.dtype}; expected real numbers")
    if x.shape[0] and x[0].numel() == 0:
        raise DataError(f"{where} has shape {tuple(x.shape)}: each row holds no feature")


def _check_finite(x: torch.Tensor, where: str) -> None:
    """DataError naming the first row holding NaN or an infinite value."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).nonzero()[0, 0])
        raise DataError(f"{where} contains NaN or infinite values (first in row {bad})")


FLOAT32_EXACT_INTEGERS = 2 ** 24
"""float32 holds every integer up to this magnitude, and not every one above it."""


def _largest_magnitude(x: torch.Tensor) -> int:
    """The largest absolute value of the non-empty integer tensor ``x``, exact for every
    integer dtype, without a widened copy of ``x``."""
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return int(x.numpy().max())  # torch has no min/max for these; numpy's is exact
    lo, hi = torch.aminmax(x)
    return max(int(hi), -int(lo))


def _inputs(value: Any, where: str) -> torch.Tensor:
    x = _tensor(value, where)
    _check_input_shape(x, where)
    if not torch.is_floating_point(x) and x.numel():
        # integer inputs (token ids) are converted to float32 too, which would change ids
        # beyond 2**24 silently (16777217 becomes 16777216)
        largest = _largest_magnitude(x)
        if largest > FLOAT32_EXACT_INTEGERS:
            raise DataError(
                f"{where} holds integer inputs beyond 2**24 = {FLOAT32_EXACT_INTEGERS} (largest "
                f"magnitude {largest}): inputs are converted to float32, which does not hold "
                "every integer there, so ids would change; map them to a smaller range (e.g. an "
                "index into a vocabulary), give a ready LabeledDataset, whose inputs keep their "
                "dtype, or, for numeric features that may round, convert them to floats first")
    if torch.is_floating_point(x):
        _check_finite(x, where)
    cast = x.to(torch.float32)
    # float64 values beyond float32's range become infinite in the cast
    if x.dtype == torch.float64 and not torch.isfinite(cast).all():
        bad = int((~torch.isfinite(cast)).reshape(x.shape[0], -1).any(dim=1).nonzero()[0, 0])
        largest = float(x.to(torch.float64).abs().max())
        raise DataError(
            f"{where} holds values beyond float32's range (largest magnitude {largest:.3g}, "
            f"first in row {bad}; float32 reaches {torch.finfo(torch.float32).max:.3g}): inputs "
            "are converted to float32, where they would be infinite; scale the features "
            "(e.g. standardize them)")
    return cast.contiguous()


def _labels(value: Any, where: str) -> torch.Tensor:
    y = _tensor(value, where)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() == 1:
        if torch.is_floating_point(y):
            if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
                bad = int((~torch.isfinite(y) | (y != y.round())).nonzero()[0, 0])
                raise DataError(f"{where} holds non-integer labels (first in row {bad}: "
                                f"{float(y[bad])!r}); class labels must be integers 0..C-1 "
                                "(tasks are classification, single- or multi-label: "
                                "regression targets are not supported)")
        elif y.dtype == torch.bool:  # a binary task's labels: False = 0, True = 1
            return y.to(torch.int64).contiguous()
        elif torch.is_complex(y):
            raise DataError(f"{where} has dtype {y.dtype}; expected integer labels 0..C-1")
        # compared in float64, which holds every integer dtype's range (uint64 has no max())
        largest = float(y.to(torch.float64).max()) if y.numel() else 0.0
        if largest > MAX_CLASSES - 1:
            raise DataError(f"{where} holds the label {largest:g}; labels must lie in 0..C-1 "
                            f"with at most {MAX_CLASSES:,} classes")
        y = y.to(torch.int64)
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"{where} holds the negative label {int(y.min())}; labels must lie in 0..C-1")
        return y.contiguous()
    if y.dim() == 2:
        y = y.to(torch.float32)
        if not bool(((y == 0) | (y == 1)).all()):
            raise DataError(f"{where} is a multi-label target (n, C) and must hold only 0 and 1")
        return y.contiguous()
    raise DataError(f"{where} has shape {tuple(y.shape)}; expected labels (n,) or multi-label "
                    "targets (n, C)")


def _pair(x: Any, y: Any, where: str, empty_hint: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = _inputs(x, f"{where} inputs"), _labels(y, f"{where} labels")
    if xs.shape[0] != ys.shape[0]:
        raise DataError(f"{where} has {xs.shape[0]} inputs but {ys.shape[0]} labels")
    if xs.shape[0] == 0:
        raise DataError(f"{where} is empty{empty_hint}")
    return xs, ys


def _num_classes(labels: Sequence[torch.Tensor], declared: Any, where: str) -> int:
    multilabel = labels[0].dim() == 2
    if any((y.dim() == 2) != multilabel for y in labels):
        raise DataError(f"{where}: some splits hold class labels (n,) and others multi-label "
                        "targets (n, C)")
    if multilabel:
        widths = {int(y.shape[1]) for y in labels}
        if len(widths) != 1:
            raise DataError(f"{where}: multi-label targets have different widths {sorted(widths)}")
        found = widths.pop()
    else:
        found = max(int(y.max()) for y in labels) + 1
    if declared is None:
        if found < 2 and not multilabel:
            raise DataError(f"{where}: every label is 0; a classifier needs at least two classes "
                            "(declare 'num_classes' if some classes are absent)")
        if not multilabel:
            _refuse_unheld_classes(labels, found, where)
        return found
    if isinstance(declared, bool) or not isinstance(declared, int | np.integer) or declared < 1:
        raise DataError(f"{where}: num_classes must be a positive integer, got {declared!r}")
    if int(declared) > MAX_CLASSES:
        raise DataError(f"{where}: num_classes = {declared} is more than {MAX_CLASSES:,} (the "
                        f"labels reach {found - 1}); declare the classes the task has")
    if found > int(declared):
        kind = "multi-label targets have" if multilabel else "labels reach"
        raise DataError(f"{where}: {kind} {found - (0 if multilabel else 1)} but num_classes = "
                        f"{declared}; labels must lie in 0..{int(declared) - 1}")
    return int(declared)


def _held_classes(labels: Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Which of the classes ``0..num_classes-1`` some row of ``labels`` holds (a bool mask)."""
    held = torch.zeros(num_classes, dtype=torch.bool)
    for y in labels:
        if y.numel():
            held[torch.unique(y)] = True
    return held


def _shown_classes(classes: Sequence[int]) -> str:
    """The first ten of ``classes``, comma-separated, `` ...`` when there are more."""
    return ", ".join(map(str, classes[:10])) + (" ..." if len(classes) > 10 else "")


def _refuse_unheld_classes(labels: Sequence[torch.Tensor], found: int, where: str) -> None:
    """Refuse class labels whose count is inferred (the largest label + 1) while a class of
    ``0..found-1`` has no row in any split: labels 1..C, or a class a filter dropped, would give
    the model an output, and the run a class, that no client holds. Labels are used as given,
    never remapped, so the fix is the caller's: relabel, or declare ``num_classes``."""
    unheld = [int(c) for c in torch.nonzero(~_held_classes(labels, found)).flatten()]
    if not unheld:
        return
    if unheld == [0]:
        raise DataError(
            f"{where}: the labels run 1..{found - 1} and no row holds class 0, so they would "
            f"read as {found} classes (the largest label + 1), one of which no client holds: "
            f"class labels are 0..C-1 (pass y - 1), or declare num_classes = {found} if class 0 "
            "belongs to the task though this data has none")
    shown = _shown_classes(unheld)
    raise DataError(
        f"{where}: no row of any split holds class {shown} of 0..{found - 1} (the class count "
        f"is the largest label + 1, {found}), so the run would count classes no client holds: "
        "relabel the classes 0..K-1 (numpy.unique(y, return_inverse=True) maps K distinct "
        f"labels), or declare num_classes = {found} if those classes belong to the task though "
        "this data has none")


def warn_untrained_classes(train_labels: Sequence[torch.Tensor], num_classes: int,
                           where: str) -> list[int]:
    """The classes in ``0..num_classes-1`` that no training row holds (class labels only;
    [] for multi-label targets), logged as one warning when there are any. Such a gap is
    legitimate (a declared class absent from this sample) and so is not refused, but the model
    then has outputs nothing trains, and a gap is also what mislabelled data looks like (a
    class dropped from the training split): it is said, never accepted silently. Out-of-range
    labels, and an inferred class count over a class no split holds (labels 1..C), are a
    DataError before this is reached."""
    if not train_labels or any(y.dim() != 1 for y in train_labels):
        return []
    counts = sum(torch.bincount(y, minlength=num_classes)[:num_classes] for y in train_labels)
    absent = [int(c) for c in torch.nonzero(counts == 0).flatten()]
    if absent:
        shown = _shown_classes(absent)
        log.warning("%s: %d of its %d classes have no training row (class %s): the model has "
                    "an output for each that nothing trains; if that is not intended, relabel "
                    "the classes 0..K-1 or declare the num_classes the task has",
                    where, len(absent), num_classes, shown)
    return absent


def warn_unlearnable_rows(clients: Sequence[ClientData], num_classes: int) -> dict[str, int]:
    """The validation and test rows of the federation as built (after partitioning) whose
    class no client's training rows hold, counted per split (``{"val": ..., "test": ...}``,
    empty when there are none or the targets are multi-label), logged as one warning naming
    the classes. Such rows count in every method's accuracy as any other row (a test row in
    the reported accuracy, a validation row in model selection and FEDORA's lambda), though
    no method can learn their class: its output is never trained up, so they are errors
    unless that output wins by chance, for every method alike. The check on the data
    as given (:func:`warn_untrained_classes`) misses a class that the given training rows hold
    but no client draws."""
    if not clients or any(c.train_y.dim() != 1 for c in clients):
        return {}
    trained = _held_classes([c.train_y for c in clients], num_classes)
    rows: dict[str, int] = {}
    unlearned: set[int] = set()
    for split in ("val", "test"):
        for c in clients:
            y = getattr(c, f"{split}_y")
            hit = ~trained[y] if y.numel() else torch.zeros(0, dtype=torch.bool)
            if bool(hit.any()):
                rows[split] = rows.get(split, 0) + int(hit.sum())
                unlearned.update(int(v) for v in torch.unique(y[hit]))
    if rows:
        shown = _shown_classes(sorted(unlearned))
        held = " and ".join(f"{n} {split} row{'s' if n != 1 else ''}"
                            for split, n in rows.items())
        log.warning("no client's training rows hold class %s, but %s do: they count in every "
                    "method's accuracy (validation rows also in model selection and FEDORA's "
                    "lambda), as errors unless an output nothing trained wins by chance; if "
                    "that is not intended, give some client training rows of that class or "
                    "leave those rows out", shown, held)
    return rows


def _ready_labels(y: Any, where: str) -> torch.Tensor:
    """Labels of an already built dataset: int64 ``(n,)`` or float32 ``(n, C)``, non-negative."""
    single = isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.dim() == 1
    multi = isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.dim() == 2
    if not (single or multi):
        hint = ""
        if isinstance(y, torch.Tensor) and y.dtype == torch.bool:
            # a ready dataset is used as given, so its labels are not converted here
            hint = ("; bool labels are accepted from a dict or a per-client list (as 0/1), in "
                    "a ready dataset convert them: y.long() for (n,), y.float() for (n, C)")
        raise DataError(f"{where} must be an int64 tensor (n,) or a float32 tensor (n, C), got "
                        f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}"
                        f"{hint}")
    if y.numel() == 0:
        raise DataError(f"{where} is empty")
    if single and int(y.min()) < 0:
        raise DataError(f"{where} holds the negative label {int(y.min())}; labels must lie in 0..C-1")
    return y


def _ready_inputs(x: Any, labels: torch.Tensor, where: str) -> None:
    """Inputs of an already built dataset: a real tensor ``(n, ...)`` with one row per label
    and, when floating point, finite values (their dtype is kept: e.g. uint8 images)."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where} is a {type(x).__name__}; expected a torch tensor")
    _check_input_shape(x, where)
    if x.shape[0] != labels.shape[0]:
        raise DataError(f"{where} has {x.shape[0]} inputs but {labels.shape[0]} labels")
    if torch.is_floating_point(x):
        _check_finite(x, where)


def as_labeled_dataset(obj: Mapping[str, Any], where: str = "data") -> LabeledDataset:
    """Check and convert a centralized dataset dict (see the module docstring)."""
    missing = [k for k in CENTRALIZED_KEYS if k not in obj]
    if missing:
        raise DataError(f"{where} is missing {missing}; a centralized dataset has keys "
                        f"{list(CENTRALIZED_KEYS)} (and optionally 'num_classes')")
    unknown = sorted(set(obj) - {*CENTRALIZED_KEYS, "num_classes"})
    if unknown:
        raise DataError(f"{where} has unknown keys {unknown}")
    train_x, train_y = _pair(obj["x_train"], obj["y_train"], f"{where}['x_train'/'y_train']")
    test_x, test_y = _pair(obj["x_test"], obj["y_test"], f"{where}['x_test'/'y_test']")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{where}: train inputs are {tuple(train_x.shape[1:])} per row but test "
                        f"inputs are {tuple(test_x.shape[1:])}")
    _bool_labels_binary([obj["y_train"], obj["y_test"]], obj.get("num_classes"), where)
    num_classes = _num_classes([train_y, test_y], obj.get("num_classes"), where)
    warn_untrained_classes([train_y], num_classes, where)
    return LabeledDataset(train_x, train_y, test_x, test_y, num_classes)


def _bool_labels_binary(raw: Sequence[Any], declared: Any, where: str) -> None:
    """Bool class labels ``(n,)`` are a binary task's (0/1): refuse a declared ``num_classes``
    above 2, which they cannot reach."""
    single_bool = any(getattr(y, "dtype", None) in (torch.bool, np.bool_)
                      and len(getattr(y, "shape", ())) == 1 for y in raw)
    if single_bool and isinstance(declared, int | np.integer) and not isinstance(declared, bool) \
            and int(declared) > 2:
        raise DataError(f"{where}: bool labels are binary (False = 0, True = 1) but num_classes = "
                        f"{declared}; give integer labels 0..{int(declared) - 1}, or drop "
                        "num_classes for a binary task")


def as_federated(items: Sequence[Any], where: str = "data",
                 num_classes: int | None = None) -> FederatedData:
    """Check and convert a list of per-client ``{"train", "val", "test"}`` dicts."""
    if len(items) < 2:
        raise DataError(f"{where} lists {len(items)} client(s); a federation needs at least two")
    parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or set(item) != set(SPLITS):
            got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise DataError(f"{where}[{i}] must be a dict with keys {list(SPLITS)}, got {got}")
        client = {}
        for split in SPLITS:
            pair = item[split]
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise DataError(f"{where}[{i}]['{split}'] must be an (x, y) pair")
            # as for a partitioner's clients: FedAvg's weights, a summary and a score need rows
            client[split] = _pair(pair[0], pair[1], f"{where}[{i}]['{split}']",
                                  "; give every client at least one row in each split (or "
                                  "leave the client out and lower data.num_clients)")
        parts.append(client)
    shape = parts[0]["train"][0].shape[1:]
    for i, client in enumerate(parts):
        for split, (x, _) in client.items():
            if x.shape[1:] != shape:
                raise DataError(f"{where}[{i}]['{split}'] inputs are {tuple(x.shape[1:])} per row; "
                                f"client 0's are {tuple(shape)}")
    _bool_labels_binary([pair[1] for item in items for pair in item.values()], num_classes, where)
    classes = _num_classes([y for c in parts for _, y in c.values()], num_classes, where)
    warn_untrained_classes([c["train"][1] for c in parts], classes, where)
    clients = [
        ClientData(client_id=i, train_x=c["train"][0], train_y=c["train"][1], val_x=c["val"][0],
                   val_y=c["val"][1], test_x=c["test"][0], test_y=c["test"][1],
                   meta={"kind": "federated", "num_classes": classes})
        for i, c in enumerate(parts)
    ]
    return FederatedData(clients, classes)


def coerce_user_data(obj: Any, where: str = "data") -> LabeledDataset | FederatedData:
    """A centralized dataset or federated data from what user code returned; a ready
    :class:`LabeledDataset` or :class:`FederatedData` gets the same label, class-count, row-count
    and finite-input checks as a dict (its inputs keep their dtype, e.g. uint8 images)."""
    if isinstance(obj, LabeledDataset):
        labels = []
        for split in ("train", "test"):
            y = _ready_labels(getattr(obj, f"{split}_y"), f"{where} {split}_y")
            _ready_inputs(getattr(obj, f"{split}_x"), y, f"{where} {split}_x")
            labels.append(y)
        _num_classes(labels, obj.num_classes, where)
        warn_untrained_classes(labels[:1], obj.num_classes, where)
        return obj
    if isinstance(obj, FederatedData):
        if not obj.clients:
            raise DataError(f"{where} holds no clients")
        labels = []
        for c in obj.clients:
            for split in SPLITS:
                name = f"{where} client {c.client_id} {split}"
                y = _ready_labels(getattr(c, f"{split}_y"), f"{name}_y")
                _ready_inputs(getattr(c, f"{split}_x"), y, f"{name}_x")
                labels.append(y)
        _num_classes(labels, obj.num_classes, where)
        warn_untrained_classes(labels[::len(SPLITS)], obj.num_classes, where)
        return obj
    if isinstance(obj, Mapping):
        return as_labeled_dataset(obj, where)
    if isinstance(obj, list | tuple):
        return as_federated(obj, where)
    raise DataError(f"{where} returned a {type(obj).__name__}; expected a dict with keys "
                    f"{list(CENTRALIZED_KEYS)} or a list of per-client dicts "
                    f"{{'train': (x, y), 'val': (x, y), 'test': (x, y)}}")


def load_source(spec: str, seed: int, base_dir: Any = None) -> LabeledDataset | FederatedData:
    """Import ``[data] source``, call it with ``seed`` and check what it returns."""
    from secure_fedora.core.plugins import import_object

    fn = import_object(spec, "data.source", base_dir)
    where = f"data.source {spec!r}"
    return coerce_user_data(call_source(fn, seed, where), where)


def call_source(fn: Any, seed: int, where: str) -> Any:
    """``fn(seed)``, a user's data function; whatever it raises becomes a DataError naming
    ``where`` (its DataErrors pass unchanged)."""
    try:
        return fn(seed)
    except DataError:
        raise
    except Exception as err:  # user code: report whatever it raised
        raise DataError(f"{where} raised {type(err).__name__}: {err}{raised_at(err)}") from err


def call_partitioner(fn: Any, source: Any, data_config: Any, seed: int, where: str,
                     num_classes: int | None, own: int | None = None) -> list[ClientData]:
    """``fn(source, data_config, seed)``, a partitioner, with what it returns checked: a list
    of :class:`ClientData` with rows in every split, finite inputs and labels in range of
    ``meta["num_classes"]``, which is set to the source's ``num_classes`` where the partitioner
    left it out (so the model gets the source's output width, not :func:`label_space`'s
    default of 10; one the partitioner declares, e.g. after relabelling, is kept). Whatever a
    partitioner raises becomes a DataError naming ``where`` (its DataErrors pass unchanged).
    ``own`` (a Flower node's client): the rows of that client alone are checked, as a node
    answers for its own data only; its labels are checked at first contact, against the run's
    model, and the other clients' rows are their nodes' to refuse."""
    try:
        clients = fn(source, data_config, seed)
    except DataError:
        raise
    except Exception as err:  # user code: report whatever it raised
        raise DataError(f"{where} raised {type(err).__name__}: {err}{raised_at(err)}") from err
    if not isinstance(clients, list | tuple) or not all(isinstance(c, ClientData)
                                                         for c in clients):
        raise DataError(f"{where} returned {type(clients).__name__}; expected a list of "
                        "secure_fedora.data.partition.ClientData")
    for c in clients:
        if num_classes is not None:
            c.meta.setdefault("num_classes", num_classes)
    for c in clients if own is None else [c for c in clients if c.client_id == own]:
        for split in SPLITS:
            if getattr(c, f"{split}_x").shape[0] == 0:
                # as for per-client data: FedAvg's weights, a summary and a score need rows
                raise DataError(f"{where}: client {c.client_id}'s {split} split is empty; give "
                                "every client at least one row in each split (or leave the "
                                "client out and lower data.num_clients)")
            _check_finite(getattr(c, f"{split}_x"), f"{where}: client {c.client_id} {split} inputs")
    if clients and own is None:
        label_space(clients)  # every label in 0..num_classes-1
        warn_shared_training_rows(clients, where)
    return list(clients)


def warn_shared_training_rows(clients: Sequence[ClientData], where: str) -> int:
    """The number of source training rows that more than one client trains on (by the
    clients' ``meta["train_index"]``, where every client states it), logged as one warning
    when there are any: each client's budget covers its own records, so a record two clients
    hold is released under both budgets (up to the sum of their epsilons)."""
    indexes = [c.meta.get("train_index") for c in clients]
    if any(not isinstance(index, list | tuple) for index in indexes):
        return 0
    seen: dict[int, int] = {}
    for index in indexes:
        for row in set(index):
            seen[row] = seen.get(row, 0) + 1
    shared = sum(1 for count in seen.values() if count > 1)
    if shared:
        log.warning("%s: %d training row(s) are held by more than one client (meta "
                    "'train_index'); under DP each client's budget covers its own records, so "
                    "a record that k clients hold is released under k budgets (up to the sum "
                    "of their epsilons): make the clients' rows disjoint unless that is meant",
                    where, shared)
    return shared


def label_space(clients: Sequence[ClientData]) -> tuple[int, bool]:
    """``(num_classes, multilabel)`` of a federation, checking every label against it.

    The class count comes from the clients' ``meta["num_classes"]`` (set by the partitioners
    and by :func:`as_federated`), else 10 (clients built by hand for MNIST); multi-label
    targets give their width.
    """
    if not clients:
        raise DataError("the federation has no clients")
    multilabel = clients[0].train_y.dim() == 2
    num_classes = (int(clients[0].train_y.shape[1]) if multilabel
                   else int(clients[0].meta.get("num_classes", 10)))
    for c in clients:
        for split in SPLITS:
            y = getattr(c, f"{split}_y")
            if (y.dim() == 2) != multilabel:
                raise DataError(f"client {c.client_id}: {split} labels mix class labels and "
                                "multi-label targets")
            if multilabel and y.shape[1] != num_classes:
                raise DataError(f"client {c.client_id}: {split} targets have width {y.shape[1]}, "
                                f"expected {num_classes}")
            if not multilabel and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise DataError(f"client {c.client_id}: {split} labels must lie in "
                                f"0..{num_classes - 1}; found {int(y.min())}..{int(y.max())}")
    return num_classes, multilabel
