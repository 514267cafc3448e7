"""Real input files for the batch CLI, made from the real test sets: MNIST digits in many forms, diabetes
records and names, plus the broken inputs a real folder holds (corrupt, empty, huge, stray files)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coursezoo import cli
from tests.conftest import DATA_MIRROR, EXPORTED, digits_models

#: how each MNIST digit is saved, in turn: (sub-folder, extension, what is done to it)
FORMS = ("png", "jpeg", "bmp", "rgb", "inverted", "margins")
#: broken files in the digits folder and the failure reason the CLI must report for each
BROKEN_DIGITS = {"corrupt.png": "invalid image", "empty.png": "empty file", "notes.txt": "invalid image",
                 "huge.png": "image too large"}


@dataclass(frozen=True)
class Run:
    """One ``coursezoo batch`` run: its exit status, printed summary and the rows of its results file."""

    code: int
    out: str
    err: str
    rows: list[dict[str, str]]

    def by_id(self) -> dict[str, dict[str, str]]:
        return {row["path"]: row for row in self.rows}


def read_rows(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def batch(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run ``coursezoo batch ARGS`` in this process, through the real console-script entry point."""

    def run(*args: str | Path, out: Path) -> Run:
        try:
            code = cli.main(["batch", *map(str, args), "--out", str(out)])
        except SystemExit as e:  # argparse refusing the arguments
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err, read_rows(out) if out.exists() else [])

    return run


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


def _form(pixels: np.ndarray, form: str, seed: int) -> tuple[Image.Image, str, str]:
    """(image, Pillow format, extension) of one MNIST digit saved as ``form``."""
    if form == "rgb":  # coloured ink on black, three channels
        tint = np.stack([pixels, pixels * 0.8, pixels * 0.6], axis=-1).astype(np.uint8)
        return Image.fromarray(tint, "RGB"), "PNG", "png"
    if form == "inverted":  # dark ink on white paper
        return Image.fromarray(255 - pixels), "PNG", "png"
    if form == "margins":  # a 5x scan, dark on light, off-centre on a wide page
        rng = np.random.default_rng(seed)
        page = Image.new("L", (320, 220), 235)
        digit = Image.fromarray(255 - pixels).resize((140, 140), Image.Resampling.LANCZOS)
        page.paste(digit, (int(rng.integers(0, 180)), int(rng.integers(0, 80))))
        return page, "PNG", "png"
    fmt = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP"}[form]
    return Image.fromarray(pixels), fmt, form


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory, mnist_test: tuple[np.ndarray, np.ndarray]) -> Path:
    """200 MNIST test digits, each in one of ``FORMS`` under ``<form>/NNNNN_<label>.<ext>``, plus the
    ``BROKEN_DIGITS`` files at the top level."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = mnist_test
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        form = FORMS[i % len(FORMS)]
        image, fmt, ext = _form(pixels, form, seed=i)
        _save(image, root / form / f"{i:05d}_{label}.{ext}", fmt)
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    (root / "corrupt.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])  # truncated mid-stream
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("scanned on Tuesday\n")
    Image.new("L", (6000, 5000)).save(root / "huge.png")  # 30 Mpx, over the default 24 Mpx limit
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: never an input
    return root


def digit_label(path: str) -> str:
    """The true digit of a file made by ``digits_dir``, from its name."""
    return Path(path).stem.rsplit("_", 1)[1]


@pytest.fixture(scope="session")
def best_digits_repo() -> Path:
    """The repository whose best digits model the accuracy tests use (skips until one is exported)."""
    if not digits_models(EXPORTED):
        pytest.skip(f"no digits model in {EXPORTED} yet (the MNIST models are still training); rerun when exported")
    return EXPORTED


@pytest.fixture(scope="session")
def diabetes_rows() -> list[list[str]]:
    """The course's diabetes file: 759 rows of 8 scaled features and a 0/1 label."""
    path = DATA_MIRROR / "diabetes" / "diabetes.csv.gz"
    if not path.exists():
        pytest.skip(f"no diabetes data at {path} (set COURSEZOO_DATA_MIRROR)")
    return [row for row in csv.reader(io.StringIO(gzip.decompress(path.read_bytes()).decode())) if row]


@pytest.fixture(scope="session")
def names_rows() -> list[tuple[str, str]]:
    """The names test set: 6,700 (name, country) pairs."""
    path = DATA_MIRROR / "names" / "names_test.csv.gz"
    if not path.exists():
        pytest.skip(f"no names data at {path} (set COURSEZOO_DATA_MIRROR)")
    return [(r[0], r[1]) for r in csv.reader(io.StringIO(gzip.decompress(path.read_bytes()).decode())) if r]
