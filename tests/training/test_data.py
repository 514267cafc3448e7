"""Real data sets load with the course's conventions; missing and corrupt files fail clearly."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.catalog import NAMES_COUNTRIES


def test_mnist_test_split(data_cfg: data.DataConfig) -> None:
    x, y = data.mnist_arrays(train=False, cfg=data_cfg)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    # the course transform: background pixels map to -mean/std
    assert x.min() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    ds = data.mnist(train=False, cfg=data_cfg)
    np.testing.assert_allclose(ds[0][0].numpy(), x[0], atol=1e-6)


def test_diabetes_split_is_fixed(data_cfg: data.DataConfig) -> None:
    train, test = data.diabetes_splits(data_cfg)
    assert len(train) + len(test) == 759 and len(test) == 152
    again = data.diabetes_splits(data_cfg)[1]
    assert (test.tensors[0] == again.tensors[0]).all()
    x, _ = test.tensors
    assert x.shape[1] == 8 and float(x.abs().max()) <= 1.0


def test_names(data_cfg: data.DataConfig) -> None:
    train, test = data.NamesDataset(True, data_cfg), data.NamesDataset(False, data_cfg)
    assert (len(train), len(test)) == (13374, 6700)
    assert {c for _, c in train.items} == set(range(len(NAMES_COUNTRIES)))
    chars, lengths, labels = data.names_collate([train[0], train[1]])
    assert chars.shape == (2, int(lengths.max())) and labels.shape == (2,)
    assert chars[0, : lengths[0]].tolist() == [ord(c) for c in train[0][0]]


def test_hello_pair() -> None:
    x, y = data.hello_pair()
    assert x.tolist() == [[1, 0, 2, 2, 3]] and y.tolist() == [[3, 1, 2, 3, 2]]  # e,h,l,o indices


def test_missing_files_name_the_files_and_where_to_put_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("COURSEZOO_DATA_BASE_URL", raising=False)
    cfg = data.DataConfig(root=tmp_path / "root", mirror=tmp_path / "empty-mirror")
    with pytest.raises(data.DataError) as e:
        data.NamesDataset(True, cfg)
    msg = str(e.value)
    assert "names/names_train.csv.gz" in msg and "names/names_test.csv.gz" in msg and str(cfg.root) in msg


def test_files_are_taken_from_the_mirror(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    cfg = data.DataConfig(root=tmp_path / "root", mirror=data_cfg.mirror)
    assert len(data.diabetes_arrays(cfg)[0]) == 759
    assert (tmp_path / "root" / "diabetes" / "diabetes.csv.gz").exists()


def test_corrupt_gzip_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "diabetes").mkdir()
    (tmp_path / "diabetes" / "diabetes.csv.gz").write_bytes(b"this is not gzip")
    with pytest.raises(data.DataError, match="corrupt"):
        data.diabetes_arrays(data.DataConfig(root=tmp_path))


def test_non_numeric_csv_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "diabetes").mkdir()
    with gzip.open(tmp_path / "diabetes" / "diabetes.csv.gz", "wt") as f:
        f.write("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,1\n0.1,oops,0.3,0.4,0.5,0.6,0.7,0.8,0\n")
    with pytest.raises(data.DataError, match="expected 9 numbers"):
        data.diabetes_arrays(data.DataConfig(root=tmp_path))


def test_truncated_idx_is_a_clear_error(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    root = tmp_path / "root"
    (root / "mnist").mkdir(parents=True)
    for rel in data.FILES["mnist"]:
        shutil.copyfile(data_cfg.mirror / rel, root / rel)
    src = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    payload = gzip.decompress(src.read_bytes())
    src.write_bytes(gzip.compress(payload[: len(payload) // 2]))
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz is corrupt"):
        data.mnist(train=False, cfg=data.DataConfig(root=root))
