"""The course's data sets: where the files come from, how they are checked, and how they are loaded.

Files live under a data root (default ``data/``) laid out like the read-only mirror
(``mnist/*.gz``, ``diabetes/diabetes.csv.gz``, ``names/names_{train,test}.csv.gz``). A missing file is
copied from the mirror (``COURSEZOO_DATA_MIRROR`` / ``--data-mirror``), else downloaded (MNIST from
torchvision's standard mirrors; the course CSVs from ``COURSEZOO_DATA_BASE_URL`` when set), else the
loader stops with a message that names the files and where to put them.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import shutil
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets, transforms

from serving.card import sha256_file
from serving.preprocess import encode_hello, encode_names
from training.catalog import HELLO_VOCAB, MNIST_MEAN, MNIST_STD, NAMES_COUNTRIES

DEFAULT_ROOT = Path(os.environ.get("COURSEZOO_DATA_ROOT", "data"))

#: data set -> files (relative to the data root and to the mirror).
FILES: dict[str, tuple[str, ...]] = {
    "mnist": (
        "mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz",
        "mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz",
    ),
    "diabetes": ("diabetes/diabetes.csv.gz",),
    "names": ("names/names_train.csv.gz", "names/names_test.csv.gz"),
    "hello": (), "linear_points": (), "logistic_points": (),
}

#: IDX header checks: file -> (magic, item count); a truncated or foreign file fails here, clearly.
_IDX = {
    "train-images-idx3-ubyte": (2051, 60000), "train-labels-idx1-ubyte": (2049, 60000),
    "t10k-images-idx3-ubyte": (2051, 10000), "t10k-labels-idx1-ubyte": (2049, 10000),
}


class DataError(RuntimeError):
    """A data file is missing or corrupt; the message says which and what to do."""


@dataclass
class DataConfig:
    root: Path = DEFAULT_ROOT
    mirror: Path | None = None


    @classmethod
    def from_env(cls, root: str | Path | None = None, mirror: str | Path | None = None) -> DataConfig:
        mirror = mirror or os.environ.get("COURSEZOO_DATA_MIRROR") or None
        return cls(root=Path(root) if root else DEFAULT_ROOT, mirror=Path(mirror) if mirror else None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        return cls.from_env(args.data_root, args.data_mirror)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The data options every training command takes (train, export, eval)."""
        parser.add_argument("--data-root", default=None, help="where the data files live [COURSEZOO_DATA_ROOT, data/]")
        parser.add_argument("--data-mirror", default=None,
                            help="a folder laid out like ../shared/data to copy missing files from "
                                 "[COURSEZOO_DATA_MIRROR]")


def _download(rel: str, dest: Path) -> bool:
    base = os.environ.get("COURSEZOO_DATA_BASE_URL")
    if not base:
        return False
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(f"{base.rstrip('/')}/{rel}", timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    tmp.replace(dest)
    return True


def ensure_files(dataset: str, cfg: DataConfig) -> list[Path]:
    """Make the data set's files present under the root; return their paths."""
    paths, missing = [], []
    for rel in FILES[dataset]:
        dest = cfg.root / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = cfg.mirror / rel if cfg.mirror else None
            if src is not None and src.exists():
                shutil.copyfile(src, dest)
            elif not (dataset == "mnist" and _download_mnist(cfg)) and not _download(rel, dest):
                missing.append(rel)
                continue
        paths.append(dest)
    if missing:
        where = f"the mirror {cfg.mirror}" if cfg.mirror else "no mirror (set COURSEZOO_DATA_MIRROR)"
        raise DataError(
            f"{dataset}: missing {', '.join(missing)}. Looked in {cfg.root} and {where}; downloading "
            f"failed or is not configured. Put the files at {cfg.root}/<path> (or in a mirror folder laid "
            f"out the same way) and try again."
        )
    return paths


def _download_mnist(cfg: DataConfig) -> bool:
    """torchvision's standard MNIST mirrors, then gzip the raw files into our layout."""
    try:
        datasets.MNIST(str(cfg.root), train=True, download=True)
        datasets.MNIST(str(cfg.root), train=False, download=True)
    except Exception:  # noqa: BLE001 - any network failure means "not downloadable here"
        return False
    for rel in FILES["mnist"]:
        raw = cfg.root / "MNIST" / "raw" / Path(rel).stem
        with open(raw, "rb") as src, gzip.open(cfg.root / rel, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return True


def data_sha256(dataset: str, cfg: DataConfig) -> dict[str, str]:
    return {rel: sha256_file(cfg.root / rel) for rel in FILES[dataset]}


def _gunzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is corrupt ({e}); delete it and run again to fetch a fresh copy") from e


# --- MNIST (lectures 9-11) -------------------------------------------------------------------------

MNIST_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])


def mnist(train: bool, cfg: DataConfig) -> Dataset:
    """torchvision's MNIST with the course transform, read from ``<root>/MNIST/raw``."""
    raw_dir = cfg.root / "MNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for gz in ensure_files("mnist", cfg):
        raw = raw_dir / gz.stem
        if not raw.exists() or raw.stat().st_mtime < gz.stat().st_mtime:
            data = _gunzip(gz)
            _check_idx(gz, data)
            tmp = raw.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(raw)
    return datasets.MNIST(str(cfg.root), train=train, download=False, transform=MNIST_TRANSFORM)


def _check_idx(path: Path, data: bytes) -> None:
    magic, count = _IDX[path.stem]
    if len(data) < 8:
        raise DataError(f"{path} is corrupt: {len(data)} bytes, too short for an IDX header")
    got_magic, got_count = struct.unpack(">II", data[:8])
    item = 28 * 28 if magic == 2051 else 1
    header = 16 if magic == 2051 else 8
    if (got_magic, got_count) != (magic, count) or len(data) != header + count * item:
        raise DataError(
            f"{path} is corrupt: IDX magic {got_magic}, {got_count} items, {len(data)} bytes; expected magic "
            f"{magic} and {count} items ({header + count * item} bytes). Delete it and run again."
        )


def mnist_arrays(train: bool, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as normalized float32 [N,1,28,28] and int64 labels (for evaluation)."""
    ds = mnist(train, cfg)
    x = ds.data.unsqueeze(1).float().div(255.0)
    x = (x - MNIST_MEAN) / MNIST_STD  # identical arithmetic to ToTensor + Normalize
    return x.numpy().astype(np.float32), ds.targets.numpy().astype(np.int64)


# --- Diabetes (lectures 7-8) -----------------------------------------------------------------------

DIABETES_SPLIT_SEED = 2024
DIABETES_TEST_FRACTION = 0.2


def _read_csv_gz(path: Path) -> list[list[str]]:
    text = _gunzip(path).decode("utf-8", errors="strict")
    return [row for row in csv.reader(io.StringIO(text)) if row]


def diabetes_arrays(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """All rows: float32 features [N,8] and float32 labels [N,1]."""
    (path,) = ensure_files("diabetes", cfg)
    rows = _read_csv_gz(path)
    try:
        table = np.array([[float(v) for v in row] for row in rows], dtype=np.float32)
    except ValueError as e:
        raise DataError(f"{path} is corrupt: {e}; expected 9 numbers per row") from e
    if table.ndim != 2 or table.shape[1] != 9 or not np.isfinite(table).all():
        raise DataError(f"{path} is corrupt: expected rows of 8 features and a label, got shape {table.shape}")
    return table[:, :-1], table[:, -1:]


def diabetes_splits(cfg: DataConfig) -> tuple[TensorDataset, TensorDataset]:
    """Fixed-seed 80/20 train/test split of the course file."""
    x, y = diabetes_arrays(cfg)
    order = np.random.default_rng(DIABETES_SPLIT_SEED).permutation(len(x))
    n_test = int(round(len(x) * DIABETES_TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    as_ds = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return as_ds(train), as_ds(test)


# --- Names (lecture 13) ----------------------------------------------------------------------------

class NamesDataset(Dataset):
    """(name, country index) pairs; batches are padded by ``names_collate``."""

    def __init__(self, train: bool, cfg: DataConfig) -> None:
        path = ensure_files("names", cfg)[0 if train else 1]
        rows = _read_csv_gz(path)
        index = {c: i for i, c in enumerate(NAMES_COUNTRIES)}
        try:
            self.items = [(name, index[country]) for name, country in rows]
        except (KeyError, ValueError) as e:
            raise DataError(f"{path} is corrupt: bad row {e}; expected \"name\",\"country\" lines") from e

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.items[i]


def names_collate(batch: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chars, lengths = encode_names([name for name, _ in batch])
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return torch.from_numpy(chars), torch.from_numpy(lengths), labels


# --- Toy data (lectures 5, 6, 12) ------------------------------------------------------------------

def linear_points() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[2.0], [4.0], [6.0]])


def logistic_points() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[0.0], [0.0], [1.0]])


def hello_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """"hello" -> "ohlol" as vocabulary indices, shapes [1, 5] each."""
    x = encode_hello(["hello"], HELLO_VOCAB)
    y = encode_hello(["ohlol"], HELLO_VOCAB)
    return torch.from_numpy(x), torch.from_numpy(y)
