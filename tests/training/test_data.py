"""Real data sets load with the course's conventions; missing and corrupt files fail clearly."""

import gzip
import os
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
    assert "names/names_train.csv.gz" in msg and str(cfg.root) in msg  # the split asked for (the test one is not)
    assert f"the mirror {cfg.mirror}, which is not a folder (check --data-mirror" in msg  # a typo says so


def test_evaluation_needs_the_test_split_only(tmp_path: Path, data_cfg: data.DataConfig, monkeypatch) -> None:
    """torchvision's MNIST wants all four files, and the names loader both files: eval needed the training sets."""
    monkeypatch.delenv("COURSEZOO_DATA_BASE_URL", raising=False)
    root = tmp_path / "root"
    for rel in ("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz", "names/names_test.csv.gz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_cfg.mirror / rel, root / rel)
    cfg = data.DataConfig(root=root, mirror=None)
    x, y = data.mnist_arrays(train=False, cfg=cfg)
    assert x.shape == (10000, 1, 28, 28) and y[:3].tolist() == [7, 2, 1]
    reference = data.mnist(train=False, cfg=data_cfg)  # torchvision's reading, from the full data root
    np.testing.assert_array_equal(x, ((reference.data.unsqueeze(1).float() / 255.0 - data.MNIST_MEAN)
                                      / data.MNIST_STD).numpy())
    assert len(data.NamesDataset(False, cfg)) > 0


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


def _copy_files(src: Path, dest: Path, rels: tuple[str, ...]) -> None:
    """Private copies of real data files (from the read-only mirror) laid out under ``dest``."""
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)


@pytest.mark.parametrize("payload", [bytes(range(256)) * 40, b'"' + b"x" * 200_000, b""],
                         ids=["binary", "field-over-csv-limit", "empty"])
@pytest.mark.parametrize("rel", ["diabetes/diabetes.csv.gz", "names/names_test.csv.gz"])
def test_a_file_that_is_not_csv_text_is_a_clear_error(rel: str, payload: bytes, tmp_path: Path,
                                                      data_cfg: data.DataConfig) -> None:
    """Binary content (e.g. an MNIST file under the CSV's name) was a UnicodeDecodeError, a huge field a
    csv.Error, an empty names file an empty data set."""
    _copy_files(data_cfg.mirror, tmp_path, ("names/names_train.csv.gz",))
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(gzip.compress(payload))
    cfg = data.DataConfig(root=tmp_path)
    with pytest.raises(data.DataError, match="is corrupt") as e:
        data.diabetes_arrays(cfg) if rel.startswith("diabetes") else data.NamesDataset(False, cfg)
    assert str(tmp_path / rel) in str(e.value) and len(str(e.value)) < 600


@pytest.mark.parametrize("rel, text", [
    ("diabetes/diabetes.csv.gz", "x" * 10_000),
    ("names/names_test.csv.gz", '"Abl","' + "M" * 10_000 + '"'),
])
def test_a_long_bad_value_is_cut_in_the_message(rel: str, text: str, tmp_path: Path,
                                                data_cfg: data.DataConfig) -> None:
    _copy_files(data_cfg.mirror, tmp_path, ("names/names_train.csv.gz",))
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(gzip.compress(text.encode()))
    cfg = data.DataConfig(root=tmp_path)
    with pytest.raises(data.DataError, match="characters\\)") as e:
        data.diabetes_arrays(cfg) if rel.startswith("diabetes") else data.NamesDataset(False, cfg)
    assert len(str(e.value)) < 600


def test_a_damaged_deflate_stream_is_a_clear_error(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    """A valid gzip header over damaged compressed data raises zlib.error, which is not an OSError."""
    rel = "diabetes/diabetes.csv.gz"
    _copy_files(data_cfg.mirror, tmp_path, (rel,))
    blob = bytearray((tmp_path / rel).read_bytes())
    blob[100:400] = bytes(b ^ 0x5A for b in blob[100:400])
    (tmp_path / rel).write_bytes(bytes(blob))
    with pytest.raises(data.DataError, match="diabetes.csv.gz is corrupt: not a readable gzip"):
        data.diabetes_arrays(data.DataConfig(root=tmp_path))


def test_a_bad_raw_mnist_cache_is_extracted_again(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    """The raw cache newer than its .gz was trusted: truncated, it ended as torchvision's shape error; rewritten
    with shuffled labels (the .gz touched older), it was read as the data."""
    _copy_files(data_cfg.mirror, tmp_path, data.FILES["mnist"])
    cfg = data.DataConfig(root=tmp_path)
    expected = data.mnist(train=False, cfg=cfg).targets.clone()
    raw = tmp_path / "MNIST" / "raw"
    labels, images = raw / "t10k-labels-idx1-ubyte", raw / "t10k-images-idx3-ubyte"
    labels.write_bytes(labels.read_bytes()[:5000])  # truncated, as by a full disk
    blob = bytearray(images.read_bytes())
    blob[4:8] = (9999).to_bytes(4, "big")  # same size, header off
    images.write_bytes(bytes(blob))
    ds = data.mnist(train=False, cfg=cfg)
    assert len(ds) == 10000 and bool((ds.targets == expected).all())
    assert images.read_bytes()[4:8] == (10000).to_bytes(4, "big")

    blob = bytearray(labels.read_bytes())
    blob[8:] = bytes(np.random.default_rng(0).permutation(np.frombuffer(bytes(blob[8:]), np.uint8)))
    labels.write_bytes(bytes(blob))  # same size, valid header, wrong labels
    os.utime(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", (978307200, 978307200))  # the .gz now older
    assert bool((data.mnist(train=False, cfg=cfg).targets == expected).all())


def test_a_mirror_file_that_does_not_match_its_sha256sums_is_named(tmp_path: Path,
                                                                    data_cfg: data.DataConfig) -> None:
    """A mirror file that parses fine but differs from SHA256SUMS (here: one label flipped) is not copied, and the
    message names the mirror's file, since deleting the local copy would fetch the same bytes again."""
    rel, mirror, root = "diabetes/diabetes.csv.gz", tmp_path / "mirror", tmp_path / "root"
    _copy_files(data_cfg.mirror, mirror, (rel, "SHA256SUMS"))
    text = gzip.decompress((mirror / rel).read_bytes()).decode()
    first, rest = text.split("\n", 1)
    flipped = first[:-1] + ("0" if first.endswith("1") else "1")
    (mirror / rel).write_bytes(gzip.compress(f"{flipped}\n{rest}".encode()))
    with pytest.raises(data.DataError) as e:
        data.diabetes_arrays(data.DataConfig(root=root, mirror=mirror))
    msg = str(e.value)
    assert f"the mirror's copy {mirror / rel} does not match its SHA256SUMS" in msg and "in the mirror" in msg
    assert not list((root / "diabetes").iterdir())  # neither the file nor a .part left behind


def test_a_corrupt_file_the_mirror_holds_is_reported_as_the_mirrors(tmp_path: Path) -> None:
    """Without SHA256SUMS the copy is not checked, but the advice must still work: not "delete it and run again"
    (that copies the same bad file), but fix it in the mirror."""
    mirror, root = tmp_path / "mirror", tmp_path / "root"
    (mirror / "diabetes").mkdir(parents=True)
    (mirror / "diabetes" / "diabetes.csv.gz").write_bytes(b"not gzip\n")
    with pytest.raises(data.DataError) as e:
        data.diabetes_arrays(data.DataConfig(root=root, mirror=mirror))
    msg = str(e.value)
    assert f"the mirror's copy {mirror / 'diabetes' / 'diabetes.csv.gz'}" in msg
    assert "fix or replace it in the mirror" in msg and "delete it" not in msg


def test_a_data_root_that_is_the_mirror_is_refused(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    """Nothing is written into a mirror: the MNIST raw cache alone is 53 MB. A copy of the mirror (its
    SHA256SUMS too) is a data root of one's own, though."""
    mirror = tmp_path / "mirror"
    _copy_files(data_cfg.mirror, mirror, data.FILES["mnist"] + ("SHA256SUMS",))
    with pytest.raises(data.DataError, match="is the data mirror too; .*--data-mirror"):
        data.mnist(train=False, cfg=data.DataConfig(root=mirror, mirror=mirror))
    assert not (mirror / "MNIST").exists()
    assert len(data.mnist(train=False, cfg=data.DataConfig(root=mirror, mirror=None))) == 10_000


@pytest.mark.parametrize("blocked", ["diabetes", "MNIST"])
def test_a_data_root_that_cannot_be_written_is_a_clear_error(blocked: str, tmp_path: Path,
                                                             data_cfg: data.DataConfig) -> None:
    """Copying a missing file in, or writing MNIST's raw cache, was an OSError traceback naming neither the root
    nor the fix (a read-only root; here a file stands where a folder must be, which refuses root too)."""
    if data_cfg.mirror is None:
        pytest.skip("needs the data mirror (COURSEZOO_DATA_MIRROR)")
    cfg = data.DataConfig(root=tmp_path / "root", mirror=data_cfg.mirror)
    cfg.root.mkdir()
    (cfg.root / blocked).write_text("not a folder")
    what = "copy diabetes/diabetes.csv.gz into it" if blocked == "diabetes" else "write MNIST's raw cache"
    with pytest.raises(data.DataError, match=rf"cannot {what}.*the data root {cfg.root} must be writable"):
        data.diabetes_arrays(cfg) if blocked == "diabetes" else data.mnist(train=False, cfg=cfg)
