"""Model outputs -> predictions, the one place each task's answer is computed.

The server's handlers and the batch CLI's local engine both call these, so a digit, a diabetes label or a
name's country is the same whichever way it was asked for. Inputs are the output tensors of one batch,
outputs are small dataclasses in batch order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.preprocess import InputError, decode_hello

#: ``top_k`` when a request leaves it unset (protobuf's 0).
DEFAULT_TOP_K = 3
#: A diabetes record is labelled 1 when the model's probability exceeds this.
DIABETES_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class DigitResult:
    digit: int
    confidence: float
    probabilities: tuple[float, ...]  # one per class, in label order


@dataclass(frozen=True, slots=True)
class DiabetesResult:
    label: int
    probability: float  # the model's P(label 1)


@dataclass(frozen=True, slots=True)
class SequenceResult:
    """A names answer (label = country) or a hello answer (label = the predicted output string)."""

    label: str
    confidence: float
    top: tuple[tuple[str, float], ...] = ()  # best labels first; empty for hello


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: subtracting the row maximum keeps exp() from overflowing."""
    z = np.asarray(logits, dtype=np.float32)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def digit_predictions(logits: np.ndarray) -> list[DigitResult]:
    """[N, 10] logits -> the most likely digit per image with its softmax probability."""
    probs = softmax(logits)
    # as lists: a numpy row and scalar per image cost more than the rest of the answer (7.5 -> ~4 µs an image)
    return [
        DigitResult(digit=d, confidence=p[d], probabilities=tuple(p))
        for d, p in zip(probs.argmax(axis=1).tolist(), probs.tolist(), strict=True)
    ]


def diabetes_predictions(probability: np.ndarray) -> list[DiabetesResult]:
    """[N, 1] (or [N]) sigmoid outputs -> label 1 where the probability exceeds ``DIABETES_THRESHOLD``."""
    p = np.asarray(probability, dtype=np.float32).reshape(-1)
    return [DiabetesResult(label=int(v > DIABETES_THRESHOLD), probability=float(v)) for v in p.tolist()]


def names_predictions(logits: np.ndarray, labels: Sequence[str], top_k: int = 0) -> list[SequenceResult]:
    """[N, C] logits -> each name's most likely country and its ``top_k`` best (0 = DEFAULT_TOP_K)."""
    if top_k < 0:
        raise InputError(f"top_k {top_k}: expected 0 (default {DEFAULT_TOP_K}) or a positive number")
    k = min(top_k or DEFAULT_TOP_K, len(labels))
    probs = softmax(logits)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    results = []
    for row, idx in zip(probs, order, strict=True):
        top = tuple((labels[i], float(row[i])) for i in idx.tolist())
        results.append(SequenceResult(label=top[0][0], confidence=top[0][1], top=top))
    return results


def hello_predictions(logits: np.ndarray, texts: Sequence[str], vocabulary: Sequence[str]) -> list[SequenceResult]:
    """[N, T, V] per-step logits -> each text's predicted output string ("hello" -> "ohlol").

    The confidence is the probability of the whole string: the product of each step's best probability
    (each step is its own classification given the input so far), over the text's own length only.
    """
    strings = decode_hello(logits, texts, vocabulary)
    best = softmax(logits).max(axis=-1)
    return [
        SequenceResult(label=s, confidence=float(np.prod(best[i, : len(t)], dtype=np.float64)))
        for i, (s, t) in enumerate(zip(strings, texts, strict=True))
    ]
