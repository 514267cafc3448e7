"""``serving.card.ModelCard``: a card that is valid JSON but not what serving reads is refused at load.

Loaded, such a card served until its first request and then failed it INTERNAL; ``"metrics": []`` also
failed every default-model choice of its task, other models' included, and the server's start-up banner.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import exports
from serving.card import CardError, ModelCard, version_dirs
from tests.conftest import edit_card
from training.evaluate import latest_version

EXPORTED = Path(__file__).resolve().parents[2] / "exported"


def shipped(name: str) -> dict[str, Any]:
    return json.loads(max((EXPORTED / name).glob("[0-9]*/model.json"), key=lambda p: int(p.parent.name)).read_text())


def test_every_shipped_card_loads() -> None:
    for path in EXPORTED.glob("*/[0-9]*/model.json"):
        ModelCard.from_json(json.loads(path.read_text()))


@pytest.mark.parametrize(("name", "change", "message"), [
    ("mnist_cnn", {"metrics": []}, "'metrics' is []: expected a JSON object"),
    ("mnist_cnn", {"version": True}, "'version' is true: expected a JSON string or number"),
    ("mnist_cnn", {"inputs": {}}, "'inputs' is {}: expected a JSON list"),
    ("names_gru", {"labels": ["English"] * 17}, "17 labels for output 'logits' of 18 values per item: expected 18"),
    ("diabetes_mlp", {"labels": ["0", "1", "2"]}, "3 labels for output 'probability' of 1 values per item: "
                                                  "expected 2"),
    ("mnist_cnn", {"labels": list(range(10))}, "labels must be strings"),
    ("names_gru", {"labels": []}, "a names card needs labels"),  # loaded, every call was INTERNAL (IndexError)
    ("names_gru", {"preprocessing": {}}, "a names card's preprocessing needs vocab_size"),
    ("mnist_cnn", {"preprocessing": {"height": 28}}, "preprocessing needs width, fit_box, mean, std, polarity"),
])
def test_a_card_serving_cannot_use_is_refused(name: str, change: dict[str, Any], message: str) -> None:
    with pytest.raises(CardError) as info:
        ModelCard.from_json({**shipped(name), **change})
    assert message in str(info.value)


def test_one_probability_is_named_by_two_labels() -> None:
    """A sigmoid's one value per item names both classes (diabetes, logistic regression)."""
    assert ModelCard.from_json(shipped("diabetes_mlp")).labels == ("0", "1")


def test_version_folders_are_numbers_in_ascii_digits_newest_first(tmp_path: Path) -> None:
    """One rule for the server, batch, eval, export and bench. Before, bench, eval and export took any
    ``str.isdigit`` name (``int("²")`` then raised) and the batch CLI any folder at all, sorted after numbers."""
    for name in ("1", "2", "10", "007", "0" + "9" * 200, ".2.staging", "²", "latest", "3a"):
        (tmp_path / name).mkdir()
    (tmp_path / "11").write_text("a file, not a version")
    assert [p.name for p in version_dirs(tmp_path)] == ["0" + "9" * 200, "10", "007", "2", "1"]
    assert version_dirs(tmp_path / "gone") == []


def test_the_newest_readable_version_is_the_one_benchmarked(tmp_path: Path) -> None:
    """As the server serves it: a newer version whose card is broken fails to load, the one before serves.
    The benchmarks stopped on the broken card instead, and eval reports it (it checks the newest)."""
    for version in ("1", "2"):
        folder = tmp_path / "mnist_cnn" / version
        shutil.copytree(EXPORTED / "mnist_cnn" / max(p.name for p in version_dirs(EXPORTED / "mnist_cnn")), folder)
        edit_card(folder, lambda card, version=version: card.update(version=version))
    (tmp_path / "mnist_cnn" / "2" / "model.json").write_text("{")
    assert exports.latest(tmp_path, "mnist_cnn").version == "1"  # type: ignore[union-attr]
    assert latest_version(tmp_path, "mnist_cnn").name == "2"
