"""``python -m bench.robustness``: each variant draws a real image file, and a small run on the real data and
export writes the promised JSON.

Only shapes and the control's accuracy are checked: the other variants' accuracies are what the benchmark is
there to measure (and change as the preprocessing improves), and timings depend on the machine.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import data, robustness
from tests.conftest import DATA_MIRROR, EXPORTED

#: what each variant's file is meant to be: format, Pillow mode, size
INTENDED = {
    "plain": ("PNG", "L", (28, 28)),
    "off_centre": ("PNG", "L", (28, 28)),
    "noisy_scan": ("JPEG", "L", (300, 300)),
    "keyed_palette": ("PNG", "P", (200, 200)),
    "gradient": ("JPEG", "L", (300, 300)),
    "dark_border": ("JPEG", "L", (300, 300)),
    "tilted_sheet": ("JPEG", "L", (300, 300)),
    "form_box": ("PNG", "L", (200, 200)),
    "ruled_line": ("PNG", "RGB", (200, 200)),
    "thin_pen": ("PNG", "L", (120, 120)),
    "phone_photo": ("JPEG", "L", (1600, 1200)),
}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """A handful of MNIST test digits, from the data mirror the tests use."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSEZOO_DATA_MIRROR", str(DATA_MIRROR))
        return data.mnist_test_images()[:6]


def test_every_variant_is_described() -> None:
    assert set(robustness.VARIANTS) == set(INTENDED)
    assert next(iter(robustness.VARIANTS)) == "plain"  # the control comes first in the table
    for name, draw in robustness.VARIANTS.items():
        assert draw.__doc__ and len(draw.__doc__.strip().splitlines()) == 1, name


@pytest.mark.parametrize("name", list(INTENDED))
def test_variant_draws_a_decodable_image(name: str, digits: np.ndarray) -> None:
    fmt, mode, size = INTENDED[name]
    rng = robustness.variant_rng(0, name)
    for digit in digits:
        with Image.open(io.BytesIO(robustness.VARIANTS[name](digit, rng))) as img:
            assert (img.format, img.mode, img.size) == (fmt, mode, size)
            img.load()
            if name == "keyed_palette":  # the paper's colour, keyed transparent, is white
                assert img.getpalette()[3 * img.info["transparency"]:][:3] == [255, 255, 255]
            grey = np.asarray(img.convert("L"))
            assert int(grey.max()) - int(grey.min()) > 100, "the digit must stand out"


def test_variants_are_reproducible(digits: np.ndarray) -> None:
    for name, draw in robustness.VARIANTS.items():
        first = [draw(d, robustness.variant_rng(3, name)) for d in digits[:2]]
        assert first == [draw(d, robustness.variant_rng(3, name)) for d in digits[:2]], name


def test_off_centre_keeps_the_digit_whole(digits: np.ndarray) -> None:
    """np.roll must never wrap a stroke round to the other edge: the shifted digit holds all its ink."""
    rng = robustness.variant_rng(0, "off_centre")
    for digit in digits:
        with Image.open(io.BytesIO(robustness.off_centre(digit, rng))) as img:
            moved = 255 - np.asarray(img).astype(np.int64)
        assert moved.sum() == digit.astype(np.int64).sum()
        assert not np.array_equal(moved, digit)


def test_small_run_writes_the_promised_json(tmp_path: Path, digits_model: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """100 digits through the repository's digits model (mnist_cnn, the default, when exported)."""
    out = tmp_path / "robustness.json"
    monkeypatch.setenv("COURSEZOO_DATA_MIRROR", str(DATA_MIRROR))  # restored after: --data-mirror sets it for good
    args = robustness.get_args_parser().parse_args(
        ["--count", "100", "--models", digits_model, "--repo", str(EXPORTED), "--data-mirror", str(DATA_MIRROR),
         "--json", str(out)])
    assert robustness.main(args) == 0
    report = json.loads(out.read_text())
    assert {"machine", "versions", "n", "seed", "settings", "variants", "results"} <= report.keys()
    assert (report["n"], report["seed"]) == (100, 0)
    assert len(report["settings"]["preprocess_sha256"]) == 64
    assert set(report["variants"]) == set(INTENDED)
    rows = report["results"][digits_model]
    assert set(rows) == set(INTENDED)
    for name, row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert isinstance(row["refused"], int) and 0 <= row["refused"] <= 100, name
        assert isinstance(row["read_right"], int) and row["read_right"] + row["refused"] <= 100, name
        assert isinstance(row["decode_us_per_image"], float), name
    assert rows["plain"]["accuracy"] >= 0.95, "MNIST's own test digits through the real model"
