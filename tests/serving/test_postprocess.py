"""serving.postprocess: output tensors -> the predictions every front end returns."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from serving.postprocess import (
    DEFAULT_TOP_K,
    DiabetesResult,
    DigitResult,
    SequenceResult,
    diabetes_predictions,
    digit_predictions,
    hello_predictions,
    names_predictions,
    softmax,
)
from serving.preprocess import InputError

COUNTRIES = ("Arabic", "Chinese", "Czech", "Dutch", "English")


@given(arrays(np.float32, (3, 10), elements=st.floats(-(2.0**100), 2.0**100, width=32)))
def test_softmax_is_a_distribution_even_for_huge_logits(logits: np.ndarray) -> None:
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.take_along_axis(p, logits.argmax(axis=1)[:, None], 1)[:, 0], p.max(axis=1))


def test_softmax_matches_the_definition_on_small_logits() -> None:
    z = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(softmax(z), np.exp(z) / np.exp(z).sum(), rtol=1e-6)


def test_digit_predictions_in_batch_order() -> None:
    logits = np.full((3, 10), -5.0, dtype=np.float32)
    logits[0, 7] = logits[1, 0] = logits[2, 3] = 5.0
    results = digit_predictions(logits)
    assert [r.digit for r in results] == [7, 0, 3]
    for r in results:
        assert isinstance(r, DigitResult) and len(r.probabilities) == 10
        assert r.confidence == max(r.probabilities) and r.confidence > 0.99
        assert abs(sum(r.probabilities) - 1) < 1e-5


def test_diabetes_label_is_probability_above_one_half() -> None:
    results = diabetes_predictions(np.array([[0.2], [0.5], [0.51], [0.99]], dtype=np.float32))
    assert [r.label for r in results] == [0, 0, 1, 1]
    assert results[2] == DiabetesResult(label=1, probability=pytest.approx(0.51))
    assert [r.label for r in diabetes_predictions(np.array([0.7, 0.1]))] == [1, 0]


def test_names_top_k_best_first() -> None:
    logits = np.log(np.array([[0.1, 0.5, 0.05, 0.3, 0.05]], dtype=np.float32))
    (r,) = names_predictions(logits, COUNTRIES, top_k=2)
    assert isinstance(r, SequenceResult)
    assert r.label == "Chinese" and r.confidence == pytest.approx(0.5)
    assert [label for label, _ in r.top] == ["Chinese", "Dutch"]
    assert [s for _, s in r.top] == pytest.approx([0.5, 0.3])


def test_names_top_k_default_and_clipping() -> None:
    logits = np.zeros((2, len(COUNTRIES)), dtype=np.float32)
    assert all(len(r.top) == DEFAULT_TOP_K for r in names_predictions(logits, COUNTRIES))
    assert all(len(r.top) == len(COUNTRIES) for r in names_predictions(logits, COUNTRIES, top_k=50))
    with pytest.raises(InputError, match="top_k -1"):
        names_predictions(logits, COUNTRIES, top_k=-1)


def test_hello_prediction_is_the_argmax_string_with_its_probability() -> None:
    vocab = ("e", "h", "l", "o")
    target = [3, 1, 2, 3, 2]  # "ohlol"
    logits = np.full((2, 5, 4), -10.0, dtype=np.float32)
    logits[0, np.arange(5), target] = 10.0
    logits[1, np.arange(5), [1, 0, 0, 0, 0]] = 10.0  # second text is "he": only 2 steps count
    results = hello_predictions(logits, ["hello", "he"], vocab)
    assert [r.label for r in results] == ["ohlol", "he"]
    step = softmax(logits[0, 0]).max()
    assert results[0].confidence == pytest.approx(step**5, rel=1e-5)
    assert results[1].confidence == pytest.approx(step**2, rel=1e-5)
    assert results[0].top == ()
