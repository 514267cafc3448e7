"""The inputs every benchmark path is fed: real held-out data, read with gzip + numpy only.

Every path (in-process baselines, the server, the batch CLI, the PyTriton peer) measures the same images,
records and names, so their rows are comparable. This module imports neither torch nor the training
package: the load-generator processes import it too and must start fast.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Distinct batches every path cycles through, the load generator's requests and the in-process calls alike:
#: no two consecutive calls carry the same input, and every path sees the same items (a names batch of one
#: is a short or a long name, and the GRU's cost grows with its length)
DISTINCT = 16


#: The files read here, relative to a data root or mirror (laid out alike; see training/data.py).
MNIST_TEST = "mnist/t10k-images-idx3-ubyte.gz"
MNIST_TEST_LABELS = "mnist/t10k-labels-idx1-ubyte.gz"
DIABETES = "diabetes/diabetes.csv.gz"
NAMES_TEST = "names/names_test.csv.gz"
FILES = (MNIST_TEST, DIABETES, NAMES_TEST)


def places() -> tuple[Path, Path]:
    """Where the data files are looked for, in turn: the data root training uses (``$COURSEZOO_DATA_ROOT``, default
    ``data/``: ``coursezoo train`` copies or downloads the files there), then the read-only mirror
    (``$COURSEZOO_DATA_MIRROR``, else ``../shared/data`` beside the repo)."""
    mirror = os.environ.get("COURSEZOO_DATA_MIRROR")
    return (Path(os.environ.get("COURSEZOO_DATA_ROOT", "data")),
            Path(mirror) if mirror else REPO_ROOT.parent / "shared" / "data")


def add_place_options(parser: argparse.ArgumentParser, path: Callable[[str], Path] = Path) -> None:
    """``--data-root`` and ``--data-mirror``, as every benchmark and script takes them (``choose_places`` applies
    them); ``path`` turns the text into a path (the harness makes it absolute for the processes it starts)."""
    parser.add_argument("--data-root", type=path, default=None, help="where the data files are looked for first, "
                        "as train reads them [COURSEZOO_DATA_ROOT, data/]")
    parser.add_argument("--data-mirror", type=path, default=None, help="a folder laid out like ../shared/data, "
                        "looked in next [COURSEZOO_DATA_MIRROR, ../shared/data beside the repository]")


def choose_places(root: Path | None, mirror: Path | None) -> None:
    """Make the places given by options (``--data-root``, ``--data-mirror``) the ones ``places`` returns: through
    their environment variables, which the processes a run starts inherit."""
    for variable, given in (("COURSEZOO_DATA_ROOT", root), ("COURSEZOO_DATA_MIRROR", mirror)):
        if given is not None:
            os.environ[variable] = str(given)


def data_file(rel: str) -> Path:
    """The first of ``places()`` that holds ``rel``; FileNotFoundError naming both places otherwise."""
    for place in places():
        if (place / rel).is_file():
            return place / rel
    root, mirror = places()
    raise FileNotFoundError(f"no {rel} in the data root {root} (--data-root, COURSEZOO_DATA_ROOT) or the mirror "
                            f"{mirror} (--data-mirror, COURSEZOO_DATA_MIRROR); `coursezoo train` fetches the data "
                            "into the data root")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) -> uint8 array; the header gives the number of dimensions and their sizes."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_test_labels() -> np.ndarray:
    """The 10,000 MNIST test labels, uint8 [N] (scripts/mnist_pngs.py prints them beside its PNG files)."""
    return _idx(data_file(MNIST_TEST_LABELS))


@cache
def mnist_test_images() -> np.ndarray:
    """The 10,000 MNIST test images: uint8 [N, 28, 28], white digit on black."""
    return _idx(data_file(MNIST_TEST))


def digit_tensors(n: int, mean: float, std: float, start: int = 0) -> np.ndarray:
    """``n`` test images from the ``start``-th as float32 [n, 1, 28, 28], normalized as training does (cycling
    past 10,000)."""
    images = mnist_test_images()
    x = images[(np.arange(n) + start) % len(images)].astype(np.float32)[:, np.newaxis]
    x /= np.float32(255)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x


def pixels(n: int) -> np.ndarray:
    """``n`` test images as uint8 [n, 28, 28] (cycling), for raw-pixel requests and PNG encoding."""
    images = mnist_test_images()
    return images[np.arange(n) % len(images)]


def _png(image: np.ndarray) -> bytes:
    """One 28x28 uint8 image as a PNG file's bytes, as a client would upload it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def pngs(n: int) -> list[bytes]:
    """``n`` test images encoded as PNG (cycling through the test set)."""
    return [_png(img) for img in pixels(n)]


@cache
def diabetes_records() -> np.ndarray:
    """The course's Pima rows (8 scaled features each) as float32 [N, 8]; the label column is dropped."""
    with gzip.open(data_file(DIABETES), "rt", newline="") as f:
        rows = [r[:8] for r in csv.reader(f) if r]
    return np.asarray(rows, dtype=np.float32)


@cache
def names() -> list[str]:
    """The held-out surnames of the names data set, in file order."""
    with gzip.open(data_file(NAMES_TEST), "rt", newline="") as f:
        return [r[0] for r in csv.reader(f) if r]


def cycle(items: list, n: int, start: int = 0) -> list:
    """``n`` items of ``items`` from the ``start``-th, repeated as often as needed."""
    return [items[(start + i) % len(items)] for i in range(n)]
