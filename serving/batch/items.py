"""Files -> items: one per image file, per CSV record, per line of text; reading problems become failed items.

Only what can be said without a model is checked here (a CSV row's shape and numbers, an empty or
undecodable line); what a model's card decides (pixel limits, vocabularies, feature counts) is left to
``prepare``. Files are read as streams, so one huge CSV costs no more memory than a small one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator

from serving.batch import sources
from serving.batch.discover import SNIFF_BYTES, FileEntry
from serving.batch.types import Failure, Item

#: header names taken for the truth-label column of a CSV (case-insensitive)
LABEL_COLUMNS = {"label", "labels", "outcome", "class", "target", "y", "diabetes"}
#: feature columns of a diabetes record, as in the course file
NUM_FEATURES = 8


def iter_items(files: Iterable[FileEntry], kind: str) -> Iterator[Item]:
    """The items of every file, in file order then row/line order."""
    read = _read_image if kind == "digits" else _read_records if kind == "diabetes" else _read_lines
    for entry in files:
        if entry.failure is not None:
            yield Item(entry.path, failure=entry.failure)
        else:
            yield from read(entry.path)


def _read_image(path: str) -> Iterator[Item]:
    """Images are read and decoded later, in a worker process: here only the path (the id) travels."""
    yield Item(path)


def _open_text(path: str) -> tuple[bytes | None, Failure | None]:
    """The file's first bytes, or why it cannot be read as text (so a stray binary file is one error row)."""
    try:
        with sources.open_file(path) as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return None, Failure("unreadable file", e.strerror or str(e))
    if not head:
        return None, Failure("empty file", "the file has no content")
    if b"\0" in head:
        return None, Failure("not a text file", "the file holds binary data, not text lines or CSV rows")
    return head, None


def _read_lines(path: str) -> Iterator[Item]:
    """One item per line; empty and non-UTF-8 lines are failed items, a final newline adds none."""
    _, failure = _open_text(path)
    if failure:
        yield Item(path, failure=failure)
        return
    try:
        with sources.open_file(path) as f:
            for number, raw in enumerate(f, 1):
                item_id = f"{path}:{number}"
                try:
                    text = raw.decode("utf-8").removeprefix("\ufeff").strip()
                except UnicodeDecodeError as e:
                    yield Item(item_id, failure=Failure("bad line", f"not valid UTF-8 ({e.reason})"))
                    continue
                if text:
                    yield Item(item_id, data=text)
                else:
                    yield Item(item_id, failure=Failure("empty line", "expected one item per line"))
    except OSError as e:
        yield Item(path, failure=Failure("unreadable file", e.strerror or str(e)))


def _read_records(path: str) -> Iterator[Item]:
    """One item per CSV record with ``NUM_FEATURES`` numbers, plus an optional label column.

    A header is recognised by a first row that is not all numbers; its label column is the one named
    like ``Outcome`` or ``label``. Without a header a ninth column is the label, as in the course file.
    Blank lines are not records and are skipped.
    """
    _, failure = _open_text(path)
    if failure:
        yield Item(path, failure=failure)
        return
    try:
        with io.TextIOWrapper(sources.open_file(path), encoding="utf-8-sig", errors="replace", newline="") as f:
            reader = csv.reader(f)
            layout: tuple[int, int | None] | None = None  # (columns, label column)
            for row in reader:
                if not row or not any(x.strip() for x in row):
                    continue
                if layout is None:
                    columns, label, is_header = _layout(row)
                    layout = (columns, label)
                    if is_header:
                        continue
                yield _record(f"{path}:{reader.line_num}", row, *layout)
    except (OSError, csv.Error) as e:
        yield Item(path, failure=Failure("unreadable file", str(e)))


def _layout(first: list[str]) -> tuple[int, int | None, bool]:
    """(columns, label column, whether the row is a header) from a file's first row."""
    is_header = _floats(first) is None
    names = [x.strip().lower() for x in first] if is_header else []
    label = next((i for i, n in enumerate(names) if n in LABEL_COLUMNS), None)
    if label is None and len(first) == NUM_FEATURES + 1:
        label = NUM_FEATURES
    return len(first), label, is_header


def _record(item_id: str, row: list[str], columns: int, label: int | None) -> Item:
    if len(row) != columns:
        return Item(item_id, failure=Failure("bad row", f"{len(row)} fields where the file's rows have {columns}"))
    label_text = row[label].strip() if label is not None else None
    fields = [x for i, x in enumerate(row) if i != label]
    if len(fields) != NUM_FEATURES:
        return Item(item_id, failure=Failure(
            "bad row", f"{len(fields)} feature columns: expected {NUM_FEATURES} (and optionally a label column)"))
    values = _floats(fields)
    if values is None:
        bad = next(x for x in fields if _floats([x]) is None)
        return Item(item_id, failure=Failure("bad row", f"{bad!r} is not a number"))
    return Item(item_id, data=values, label=_normalize_label(label_text))


def _floats(fields: list[str]) -> list[float] | None:
    try:
        return [float(x) for x in fields]
    except ValueError:
        return None


def _normalize_label(text: str | None) -> str | None:
    """"1", "1.0" and " 1 " are the same class; labels that are not numbers are kept as written."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text
