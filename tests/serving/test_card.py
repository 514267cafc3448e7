"""``serving.card.ModelCard``: a card that is valid JSON but not what serving reads is refused at load.

Loaded, such a card served until its first request and then failed it INTERNAL; ``"metrics": []`` also
failed every default-model choice of its task, other models' included, and the server's start-up banner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serving.card import CardError, ModelCard

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
