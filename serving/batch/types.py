"""The values that flow through the batch pipeline, shared by every stage and engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class BatchError(Exception):
    """Nothing can run (bad arguments, no model, unwritable output, server gone): exit status 1 with the message."""


#: the kinds of input the batch CLI reads; each is also the task of the models that classify it
KINDS = ("digits", "diabetes", "names", "hello")


@dataclass(frozen=True)
class Item:
    """One input to classify: an image file, a CSV row or a line of text.

    ``id`` is what the output's ``path`` column holds and what ``--resume`` matches on: the file path
    for images (which the worker process reads), ``file:line`` for rows and lines (1-based, as editors
    number them).
    """

    id: str
    data: Any = None  # rows: the CSV fields (list[str]); lines: the text (str)
    label: str | None = None  # a truth label from the input (a CSV label column), for the summary
    failure: Failure | None = None  # a reading error already known (e.g. a line that is not UTF-8)
    # what the input calls each value of ``data`` ("column 3 (BMI)"), so an error names the value as the user
    # sees it; CSV records only
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    """Why one input could not be classified: ``reason`` groups failures in the summary, ``detail`` explains."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class Prediction:
    """One answer; model and version ride along per item because a server may swap versions mid-run."""

    label: str
    confidence: float
    model: str
    version: str
    top: tuple[tuple[str, float], ...] = field(default_factory=tuple)
