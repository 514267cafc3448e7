"""The course's data sets: where the files come from, how they are checked, and how they are loaded.

Files live under a data root (default ``data/``) laid out like the read-only mirror
(``mnist/*.gz``, ``diabetes/diabetes.csv.gz``, ``names/names_{train,test}.csv.gz``). A missing file is
copied from the mirror (``COURSEZOO_DATA_MIRROR`` / ``--data-mirror``), else downloaded (MNIST from
torchvision's standard mirrors; the course CSVs from ``COURSEZOO_DATA_BASE_URL`` when set), else the
loader stops with a message that names the files and where to put them. A copy from a mirror that has a
``SHA256SUMS`` is checked against it, and a corrupt file is reported with advice that can work: a bad
file the mirror holds is named as the mirror's, to be fixed there (fetching it again copies the same bytes).
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import gzip
import io
import os
import shutil
import struct
import time
import urllib.request
import zlib
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
#: Images are 28x28, so the images' header goes on with (28, 28); see ``_idx_layout``.
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


def ensure_files(dataset: str, cfg: DataConfig, files: tuple[str, ...] | None = None) -> list[Path]:
    """Make the data set's files (or those of ``files`` only, one split's) present under the root; return
    their paths."""
    _refuse_mirror_root(cfg)
    paths, missing = [], []
    for rel in files or FILES[dataset]:
        dest = cfg.root / rel
        if not dest.exists():
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                if cfg.mirror is not None and (cfg.mirror / rel).exists():
                    _copy_from_mirror(cfg.mirror, rel, dest)
                elif not (dataset == "mnist" and _download_mnist(cfg)) and not _download(rel, dest):
                    missing.append(rel)
                    continue
            except OSError as e:
                raise _cannot_write(cfg, f"copy {rel} into it", e) from e
        paths.append(dest)
    if missing:
        if cfg.mirror is None:
            where = "no mirror (set COURSEZOO_DATA_MIRROR)"
        elif not cfg.mirror.is_dir():
            where = f"the mirror {cfg.mirror}, which is not a folder (check --data-mirror or COURSEZOO_DATA_MIRROR)"
        else:
            where = f"the mirror {cfg.mirror}"
        raise DataError(
            f"{dataset}: missing {', '.join(missing)}. Looked in {cfg.root} and {where}; downloading "
            f"failed or is not configured. Put the files at {cfg.root}/<path> (or in a mirror folder laid "
            f"out the same way) and try again."
        )
    return paths


def _cannot_write(cfg: DataConfig, what: str, e: OSError) -> DataError:
    """The error for a data root the loader cannot write: a traceback named neither the root nor the fix."""
    return DataError(f"cannot {what} ({e.strerror}: {e.filename}): the data root {cfg.root} must be writable, "
                     "missing files are copied there and MNIST's raw cache lives there (--data-root, "
                     "COURSEZOO_DATA_ROOT), and the mirror readable")


def _refuse_mirror_root(cfg: DataConfig) -> None:
    """Stop when the data root is the configured mirror.

    The loader writes into its root: copies of missing files and the 53 MB raw MNIST cache torchvision reads
    (``<root>/MNIST/raw``). A mirror is shared and meant to stay read-only, yet as root (or with write
    access) those writes would land in it. Refused rather than cached elsewhere: another place would hold
    53 MB nobody chose, while the fix here is one flag, which the message names. A folder is a mirror by
    configuration only: a copy of the mirror, SHA256SUMS and all, is a fine data root of one's own.
    """
    if not (cfg.mirror is not None and cfg.root.exists() and cfg.mirror.exists()
            and os.path.samefile(cfg.root, cfg.mirror)):
        return
    raise DataError(
        f"the data root {cfg.root} is the data mirror too; the loader writes into its data root (copies, the "
        f"MNIST cache) and must not write into a mirror. Use it as the mirror (--data-mirror {cfg.root} or "
        f"COURSEZOO_DATA_MIRROR) with a data root of your own (--data-root or COURSEZOO_DATA_ROOT, default data/)."
    )


def _copy_from_mirror(mirror: Path, rel: str, dest: Path) -> None:
    """Copy the mirror's ``rel`` to ``dest``, checked against the mirror's SHA256SUMS when it has one.

    The copy is hashed once as it arrives, so what lands in the root is what was checked, at one read per
    file and process. A mismatch names the mirror's file: deleting the local copy would only fetch the same
    bytes again. A partial or rejected copy never takes the file's name.
    """
    src, tmp = mirror / rel, dest.with_suffix(dest.suffix + ".part")
    shutil.copyfile(src, tmp)
    expected = _listed_sha256(mirror, rel)
    if expected is not None and (actual := sha256_file(tmp)) != expected:
        tmp.unlink()
        raise DataError(
            f"the mirror's copy {src} does not match its SHA256SUMS (sha256 {actual[:12]}…, listed "
            f"{expected[:12]}…): fix or replace it in the mirror (`sha256sum -c SHA256SUMS` there checks all)"
        )
    tmp.replace(dest)


def _listed_sha256(mirror: Path, rel: str) -> str | None:
    """The sha256 the mirror's SHA256SUMS lists for ``rel`` (``sha256sum`` lines, ``./`` or ``*`` before the
    name allowed); None without a SHA256SUMS or an entry: such a file goes unchecked, as before."""
    sums = mirror / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.partition(" ")
        if name.strip().lstrip("*").removeprefix("./") == rel:
            return digest.lower()
    return None


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


def data_differences(dataset: str, cfg: DataConfig, recorded: dict[str, str]) -> list[str]:
    """The data set's files under the root whose sha256 is not the one ``recorded`` (a run's report, a card):
    figures measured on them are not the recorded ones'. A file not under the root is not compared: evaluating
    needs the held-out split alone (see ``mnist_arrays``)."""
    return [rel for rel in FILES[dataset]
            if (cfg.root / rel).exists() and recorded.get(rel) != sha256_file(cfg.root / rel)]


def _clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: a wrong file's "bad value" can be the whole file (a 10 KB field)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _corrupt(path: Path, problem: str, cfg: DataConfig) -> DataError:
    """The error for a corrupt file under the root, with advice that can work: when the mirror holds the same
    bytes, deleting the file would only copy them again, so the mirror's file is named as the one to fix."""
    src = cfg.mirror / path.relative_to(cfg.root) if cfg.mirror else None
    if src is not None and src.is_file() and filecmp.cmp(path, src, shallow=False):
        advice = f"it is the mirror's copy {src}, which is corrupt too: fix or replace it in the mirror"
    else:
        advice = "delete it and run again to fetch a fresh copy"
    return DataError(f"{path} is corrupt: {problem}; {advice}")


def _gunzip(path: Path, cfg: DataConfig) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # a damaged deflate stream is a zlib.error, not an OSError
        raise _corrupt(path, f"not a readable gzip ({e})", cfg) from e


# --- MNIST (lectures 9-11) -------------------------------------------------------------------------

MNIST_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])


def mnist(train: bool, cfg: DataConfig) -> Dataset:
    """torchvision's MNIST with the course transform, read from ``<root>/MNIST/raw`` (the checked .gz files,
    extracted again whenever the raw copy is not current; see ``_raw_is_current``)."""
    paths = ensure_files("mnist", cfg)
    raw_dir = cfg.root / "MNIST" / "raw"
    for gz in paths:
        raw = raw_dir / gz.stem
        if not _raw_is_current(raw, gz):
            data = _gunzip(gz, cfg)
            _check_idx(gz, data, cfg)
            tmp = raw.with_suffix(".part")
            try:
                raw_dir.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                os.utime(tmp, ns=(time.time_ns(), gz.stat().st_mtime_ns))  # the mark _raw_is_current looks for
                tmp.replace(raw)
            except OSError as e:
                raise _cannot_write(cfg, f"write MNIST's raw cache {raw}", e) from e
    return datasets.MNIST(str(cfg.root), train=train, download=False, transform=MNIST_TRANSFORM)


def _idx_layout(name: str) -> tuple[tuple[int, ...], int]:
    """The header fields an intact IDX file starts with (magic, items, then rows and columns for images) and
    its size in bytes."""
    magic, count = _IDX[name]
    header = (magic, count, 28, 28) if magic == 2051 else (magic, count)
    return header, 4 * len(header) + count * (28 * 28 if magic == 2051 else 1)


def _idx_header(data: bytes, fields: int) -> tuple[int, ...]:
    """The first ``fields`` big-endian uint32 of ``data``; () when it is too short to hold them."""
    return struct.unpack(f">{fields}I", data[: 4 * fields]) if len(data) >= 4 * fields else ()


def _raw_is_current(raw: Path, gz: Path) -> bool:
    """Whether the extracted ``raw`` can be read as it is: it still carries its .gz's exact mtime (given to it
    when extracted), and the IDX size and header.

    A write to either file since breaks the mtime match, so the cache is extracted again: before, a cache
    newer than its .gz was trusted, and truncated it reached torchvision as a shape error, rewritten with
    shuffled labels it was read as the data. Hashing 53 MB per run would cost more than a stat and 16 bytes.
    """
    try:
        st = raw.stat()
        with open(raw, "rb") as f:
            head = f.read(16)
    except (FileNotFoundError, NotADirectoryError):
        return False
    header, size = _idx_layout(raw.name)
    return (st.st_mtime_ns == gz.stat().st_mtime_ns and st.st_size == size
            and _idx_header(head, len(header)) == header)


def _check_idx(path: Path, data: bytes, cfg: DataConfig) -> None:
    header, size = _idx_layout(path.stem)
    got = _idx_header(data, len(header))
    if got != header or len(data) != size:
        raise _corrupt(path, f"IDX header {got or 'missing'} and {len(data)} bytes; expected IDX header {header} "
                             f"(magic, items[, rows, columns]) and {size} bytes", cfg)


def mnist_arrays(train: bool, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as normalized float32 [N,1,28,28] and int64 labels (for evaluation), read from that
    split's two files alone: torchvision's dataset wants all four, so eval needed the training set too."""
    images_gz, labels_gz = ensure_files("mnist", cfg, _mnist_split(train))
    arrays = []
    for gz in (images_gz, labels_gz):
        raw = _gunzip(gz, cfg)
        _check_idx(gz, raw, cfg)
        header, _ = _idx_layout(gz.stem)
        arrays.append(np.frombuffer(raw, dtype=np.uint8, offset=4 * len(header)))
    x = torch.from_numpy(arrays[0].reshape(-1, 1, 28, 28).copy()).float().div(255.0)  # frombuffer is read-only
    x = (x - MNIST_MEAN) / MNIST_STD  # identical arithmetic to ToTensor + Normalize
    return x.numpy().astype(np.float32), arrays[1].astype(np.int64)


def _mnist_split(train: bool) -> tuple[str, str]:
    """The images and labels files of one MNIST split."""
    prefix = "mnist/train-" if train else "mnist/t10k-"
    images, labels = (rel for rel in FILES["mnist"] if rel.startswith(prefix))
    return images, labels


# --- Diabetes (lectures 7-8) -----------------------------------------------------------------------

DIABETES_SPLIT_SEED = 2024
DIABETES_TEST_FRACTION = 0.2


def _read_csv_gz(path: Path, cfg: DataConfig) -> list[list[str]]:
    """The non-empty CSV rows of a gzipped UTF-8 file; a file that is not one (binary, a field over the csv
    module's limit, nothing in it) is a DataError by name."""
    data = _gunzip(path, cfg)
    try:
        rows = [row for row in csv.reader(io.StringIO(data.decode("utf-8", errors="strict"))) if row]
    except UnicodeDecodeError as e:
        raise _corrupt(path, f"not UTF-8 text ({e.reason} at byte {e.start})", cfg) from e
    except csv.Error as e:
        raise _corrupt(path, f"not CSV ({e})", cfg) from e
    if not rows:
        raise _corrupt(path, "no CSV rows", cfg)
    return rows


def diabetes_arrays(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """All rows: float32 features [N,8] and float32 labels [N,1]."""
    (path,) = ensure_files("diabetes", cfg)
    rows = _read_csv_gz(path, cfg)
    try:
        table = np.array([[float(v) for v in row] for row in rows], dtype=np.float32)
    except ValueError as e:
        raise _corrupt(path, f"{_clip(str(e))}; expected 9 numbers per row", cfg) from e
    if table.ndim != 2 or table.shape[1] != 9 or not np.isfinite(table).all():
        raise _corrupt(path, f"expected rows of 8 features and a label, got shape {table.shape}", cfg)
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
        (path,) = ensure_files("names", cfg, (FILES["names"][0 if train else 1],))
        rows = _read_csv_gz(path, cfg)
        index = {c: i for i, c in enumerate(NAMES_COUNTRIES)}
        try:
            self.items = [(name, index[country]) for name, country in rows]
        except (KeyError, ValueError) as e:
            raise _corrupt(path, f"bad row {_clip(str(e))}; expected \"name\",\"country\" lines", cfg) from e

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
