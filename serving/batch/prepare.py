"""Items -> model inputs, one batch at a time; runs in worker processes, so it must stay picklable and light.

With a model card's ``preprocessing`` (the local engine) items become the exact tensors the server would
build, through the one shared ``serving.preprocess`` module, and every per-item rule is checked here so
that one bad input fails alone instead of failing its whole batch. Without one (the server engine)
items travel raw: the server owns the preprocessing of the model it serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import preprocess
from serving.batch import sources
from serving.batch.types import Failure, Item

#: files above this size are refused before reading: an image this big is a mistake or an attack, and a
#: server request must stay under gRPC's message size
MAX_FILE_BYTES = 32 << 20
#: the failure reason of an input that the model's preprocessing refuses, per kind (local or server)
INVALID = {"digits": "invalid image", "diabetes": "bad row", "names": "invalid name", "hello": "invalid text"}
TOO_LARGE = "image too large"
#: how ``serving.preprocess`` (here and on the server) names an input by its position in a request or check;
#: a failure that reaches a row is of a request or check of that one input, so the position is always 0
_ITEM_POSITION = re.compile(r"(?:image|name|text) 0: ")
_RECORD_POSITION = re.compile(r"record 0 (?:feature (\d+) )?")


@dataclass(frozen=True)
class PreparedBatch:
    """A batch after preparation: per item ``None`` (ready, its input is in ``inputs``) or a ``Failure``.

    The items themselves stay with the caller: only outcomes and inputs cross back from a worker.
    """

    outcomes: list[Failure | None]
    inputs: Any  # the ready items' inputs, collated for one model call; None when no item is ready

    @property
    def ready(self) -> int:
        return self.outcomes.count(None)


@dataclass(frozen=True)
class Preparer:
    """Turns a list of items into a ``PreparedBatch`` for one kind; called in worker processes."""

    kind: str
    preprocessing: dict[str, Any] | None = None  # a model card's; None: leave it to the server
    max_image_pixels: int = preprocess.DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, items: list[Item]) -> PreparedBatch:
        if self.kind == "digits":  # a process-wide Pillow setting: set where the decoding happens
            preprocess.set_max_image_pixels(self.max_image_pixels)
            values = self._digits(items)
        else:
            values = [item.failure or self._checked(item) for item in items]
        outcomes: list[Failure | None] = [v if isinstance(v, Failure) else None for v in values]
        inputs = [v for v in values if not isinstance(v, Failure)]
        if not inputs:
            return PreparedBatch(outcomes, None)
        return PreparedBatch(outcomes, self._collate(inputs))

    def _collate(self, inputs: list[Any]) -> Any:
        """Tensors are stacked into one array, which crosses the process boundary as a single buffer."""
        return np.stack(inputs) if isinstance(inputs[0], np.ndarray) else inputs

    def _digits(self, items: list[Item]) -> list[np.ndarray | bytes | Failure]:
        """Files -> image tensors, decoded together (``decode_digits``); without a card, the files' bytes."""
        values: list[Any] = [item.failure or _read_file(item.id) for item in items]
        if self.preprocessing is None:
            return values
        readable = [i for i, v in enumerate(values) if not isinstance(v, Failure)]
        digits, errors = preprocess.decode_digits([values[i] for i in readable], self.preprocessing)
        decoded = iter(digits)
        for j, i in enumerate(readable):
            error = errors.get(j)
            if error is None:
                values[i] = next(decoded)
            else:
                values[i] = Failure(TOO_LARGE if isinstance(error, preprocess.InputTooLarge) else INVALID["digits"],
                                    str(error))
        return values

    def _checked(self, item: Item) -> Any:
        """A record or text as it is, if the card's encoder for the kind (``preprocess.encode_items``, which the
        engine later runs on the whole batch) accepts it alone, else why not. Without a card the server judges."""
        if self.preprocessing is not None:
            try:
                preprocess.encode_items(self.kind, self.preprocessing, [item.data])
            except preprocess.InputError as e:
                return Failure(INVALID[self.kind], str(e))
        return item.data


def in_input_terms(item: Item, failure: Failure) -> Failure:
    """``failure`` as the row of ``item`` tells it, the same from --local and --server: the position of the one
    input in the request or check that refused it goes ("image 0: cannot decode ..." -> "cannot decode ..."),
    as the row's path says which input it is, and a record's feature is named by its column ("record 0 feature 1
    is 6" -> "column 2 (Glucose) is 6")."""
    detail = failure.detail
    if match := _ITEM_POSITION.match(detail):
        return Failure(failure.reason, detail[match.end():])
    if match := _RECORD_POSITION.match(detail):
        feature = match.group(1)
        subject = "the row" if feature is None else _column(item, int(feature))
        return Failure(failure.reason, f"{subject} {detail[match.end():]}")
    return failure


def _column(item: Item, feature: int) -> str:
    """The column the record's ``feature`` (counted from 0) came from; its number among the features for a
    record that was not read from a file."""
    return item.columns[feature] if feature < len(item.columns) else f"feature {feature + 1}"


def _read_file(path: str) -> bytes | Failure:
    try:
        data = sources.read_file(path, MAX_FILE_BYTES)
    except sources.FileTooLarge as e:
        return Failure(TOO_LARGE, f"{e.size:,} bytes: at most {MAX_FILE_BYTES:,} are read")
    except OSError as e:
        return Failure("unreadable file", e.strerror or str(e))
    return data if data else Failure("empty file", "the file has no content")
