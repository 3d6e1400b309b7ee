"""Datasets of ``normkit compare``: IDX parsing, missing files, loaders and determinism."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normkit.errors import ConfigError
from normkit.experiments.data import (
    DEBIAN_FASHION_MNIST_DIR,
    DataError,
    find_idx_files,
    load_dataset,
    read_idx,
)

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D, np.dtype(">i4"): 0x0C}


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` as an IDX file (big-endian), gzipped when ``gz``."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}i",
                                                                       *array.shape)
    raw = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist_dir(directory: Path, n_train: int = 20, n_test: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        ext = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}",
                  rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8), gz=gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}",
                  (np.arange(n) % 10).astype(np.uint8), gz=gz)
    return directory


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int32])
def test_read_idx_round_trip(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 4) * 3).reshape(2, 3, 4).astype(dtype)
    out = read_idx(write_idx(tmp_path / "x.idx", array.astype(np.dtype(dtype).newbyteorder(">")),
                             gz=gz))
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "page.gz"
    path.write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(DataError, match=r"not an IDX file: magic number 3c68746d"):
        read_idx(path)


def test_read_idx_truncated(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((4, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shape \(4, 3\).*truncated or corrupt"):
        read_idx(path)


def test_idx_dataset_from_dir(tmp_path):
    files = find_idx_files("mnist", write_mnist_dir(tmp_path))
    assert files["train-images"].name.endswith(".gz") and files["test-labels"].suffix != ".gz"
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.input_shape == (1, 6, 5) and ds.num_classes == 10
    assert len(ds.x_train) == 20 and len(ds.x_test) == 10
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 0.05


def test_idx_dataset_in_named_subdir(tmp_path):
    (tmp_path / "mnist").mkdir()
    write_mnist_dir(tmp_path / "mnist")
    assert len(load_dataset("mnist", data_dir=tmp_path).x_train) == 20


def test_missing_idx_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match=r"mnist data not found.*train-images-idx3-ubyte"
                                        r"\[\.gz\].*--data-dir"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_names_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr("normkit.experiments.data.DEBIAN_FASHION_MNIST_DIR", tmp_path / "none")
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_from_debian_package():
    if not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        msg = f"dataset-fashion-mnist is not installed ({DEBIAN_FASHION_MNIST_DIR})"
        if os.environ.get("CI"):  # .ci/run installs it: its absence there is a failure
            pytest.fail(msg)
        pytest.skip(msg)  # a developer machine without the Debian package
    ds = load_dataset("fashion-mnist", subset=100)
    print(f"Fashion-MNIST found in {ds.source}")
    assert ds.source == str(DEBIAN_FASHION_MNIST_DIR)
    assert ds.x_train.shape == (100, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    assert ds.num_classes == 10 and ds.x_train.dtype == torch.float32


@pytest.mark.parametrize("name, shape, n_train, n_test", [
    ("gaussian", (32,), 2000, 500),
    ("digits", (1, 8, 8), 1437, 360),
])
def test_small_datasets(name, shape, n_train, n_test):
    a, b = load_dataset(name), load_dataset(name)
    assert a.input_shape == shape and (len(a.x_train), len(a.x_test)) == (n_train, n_test)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-3
    assert not torch.equal(load_dataset(name, seed=1).y_train, a.y_train)


def test_subset_is_deterministic_and_bounded():
    a, b = load_dataset("gaussian", subset=50), load_dataset("gaussian", subset=50)
    assert len(a.x_train) == len(a.x_test) == 50
    assert torch.equal(a.x_train, b.x_train)


def test_mnist1d_generated_locally_and_deterministic(monkeypatch):
    monkeypatch.setattr("normkit.experiments.data.MNIST1D_SAMPLES", 1000)  # 10x faster
    state = np.random.get_state()[1].copy()
    a = load_dataset("mnist1d", subset=300)
    b = load_dataset("mnist1d", subset=300)
    assert a.input_shape == (40,) and a.num_classes == 10
    assert a.x_train.shape == (300, 40) and a.x_test.shape == (200, 40)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert np.array_equal(np.random.get_state()[1], state), "global numpy RNG was reseeded"


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "cifar"}, r"unknown dataset 'cifar'; choose one of mnist1d"),
    ({"name": "gaussian", "subset": 0}, r"subset must be a positive number.*got 0"),
])
def test_bad_dataset_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_dataset(**kwargs)
