"""Files -> items: one per image file, per CSV record or names row, per line of text; reading problems become
failed items.

Only what can be said without a model is checked here (a CSV row's shape and numbers, an empty or
undecodable line); what a model's card decides (pixel limits, vocabularies, feature counts) is left to
``prepare``. Files are read as streams, so one huge CSV costs no more memory than a small one.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable, Iterable, Iterator

from serving.batch import records, sources
from serving.batch.discover import SNIFF_BYTES, FileEntry, csv_row
from serving.batch.records import NUM_FEATURES
from serving.batch.types import Failure, Item

#: kinds whose inputs may carry the expected class (a CSV's label column), which the output then shows
LABELLED_KINDS = ("diabetes", "names")

#: a CSV row as the readers get it: (item id, its fields, or why its line is not a CSV row)
Row = tuple[str, list[str] | Failure]


def iter_items(files: Iterable[FileEntry], kind: str) -> Iterator[Item]:
    """The items of every file, in file order then row/line order."""
    read = {"digits": _read_image, "diabetes": _read_records, "names": _read_names}.get(kind, _read_lines)
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


def _read_names(path: str) -> Iterator[Item]:
    """The course's names CSV (``"Abl","Czech"``) by rows: the name, and the country as the expected label
    (so a run over the course's test file reports its accuracy); any other text by lines."""
    head, failure = _open_text(path)
    if failure:
        yield Item(path, failure=failure)
    elif records.is_names_csv(path, head or b""):
        yield from _read_csv(path, _name_rows)
    else:
        yield from _lines(path)


def _name_rows(rows: Iterator[Row]) -> Iterator[Item]:
    for item_id, row in rows:
        if isinstance(row, Failure):
            yield Item(item_id, failure=row)
        elif len(row) != 2:
            yield Item(item_id, failure=Failure("bad row", f"{len(row)} fields: expected 2, a name and its country"))
        elif row[0].strip():  # the name as the file spells it: the course's test file has "Jung " (Korean)
            yield Item(item_id, data=row[0], label=row[1].strip() or None)
        else:
            yield Item(item_id, failure=Failure("bad row", "the name (column 1) is empty"))


def _read_lines(path: str) -> Iterator[Item]:
    """One item per line that holds one; non-UTF-8 lines are failed items (see ``_lines``)."""
    _, failure = _open_text(path)
    if failure:
        yield Item(path, failure=failure)
    else:
        yield from _lines(path)


#: Taken off both ends of a text line: its ending, and whitespace other than the space.
LINE_CONTROLS = "\t\n\v\f\r"


def _lines(path: str) -> Iterator[Item]:
    """Items numbered by their line. A line is the text as written, less its line ending (LF or CRLF), a
    byte-order mark at its start and tabs (or other control whitespace) around it, which no model reads (a list
    pasted from a spreadsheet: "Smith\t"): spaces around it are kept, as the server takes a name as sent and the
    course data has names with a trailing space ("Jung " is Korean, "Jung" German). Blank lines (nothing but
    whitespace) are not inputs, as in a CSV: a blank line at the end of a list (or between its parts) was an
    error row that made the whole run exit 2. A file of blank lines only is one "empty file" row, as an
    empty file is."""
    empty = True
    try:
        with sources.open_file(path) as f:
            for number, raw in enumerate(f, 1):
                item_id = f"{path}:{number}"
                try:
                    text = raw.decode("utf-8").removeprefix("\ufeff").strip(LINE_CONTROLS)
                except UnicodeDecodeError as e:
                    empty = False
                    yield Item(item_id, failure=Failure("bad line", f"not valid UTF-8 ({e.reason})"))
                    continue
                if text.strip():
                    empty = False
                    yield Item(item_id, data=text)
    except OSError as e:
        yield Item(path, failure=Failure("unreadable file", e.strerror or str(e)))
        return
    if empty:
        yield Item(path, failure=Failure("empty file", "no lines, only blank ones"))


def _read_records(path: str) -> Iterator[Item]:
    """One item per CSV record with ``NUM_FEATURES`` numbers, plus an optional label column."""
    _, failure = _open_text(path)
    if failure:
        yield Item(path, failure=failure)
    else:
        yield from _read_csv(path, _records)


def _read_csv(path: str, read: Callable[[Iterator[Row]], Iterator[Item]]) -> Iterator[Item]:
    """``read`` turns the file's rows into items; blank lines are not rows and are skipped. A file without
    items (a header alone, blank lines) is one "empty file" item, as an empty file is: it is an input too.
    A file that breaks off (an I/O error) ends with an error item.

    Lines are parsed one at a time (``discover.csv_row``): a line that is not a CSV row (a quote left open,
    a field over the csv module's 131,072 characters) is one bad row numbered as editors number it, and
    the lines after it are still read. A quoted field cannot span lines, as no diabetes record or names
    row needs one: read as one, a single stray quote swallowed every row after it.
    """
    try:
        with io.TextIOWrapper(sources.open_file(path), encoding="utf-8-sig", errors="replace", newline="") as f:
            empty = True
            for item in read(_rows(path, f)):
                empty = False
                yield item
            if empty:
                yield Item(path, failure=Failure("empty file", "no rows, only a header or blank lines"))
    except OSError as e:
        yield Item(path, failure=Failure("unreadable file", str(e)))


def _rows(path: str, lines: Iterable[str]) -> Iterator[Row]:
    """Each line's fields, or why it is not a CSV row, numbered as editors number lines; blank lines left out."""
    for number, line in enumerate(lines, 1):
        try:
            row = csv_row(line)
        except csv.Error as e:
            # "unexpected end of data" is how the csv module says a quote was opened and not closed
            why = "a quote is opened and not closed on the line" if str(e) == "unexpected end of data" else str(e)
            yield f"{path}:{number}", Failure("bad row", f"not a CSV row: {why}")
            continue
        if any(x.strip() for x in row):
            yield f"{path}:{number}", row


def _records(rows: Iterator[Row]) -> Iterator[Item]:
    """Diabetes records; a first row that names a label column or holds no number is a header
    (``records.is_header``), any other first row is data, and fails alone if bad (a line that is not a CSV
    row too).

    The label column is the one a header names like ``Outcome`` or ``label``, else a ninth column, as
    in the course file. How many fields a row must have is the course file's (``records.NUM_FEATURES``, one
    more with a label), never the first row's, so one bad first row cannot fail every good row after it.
    """
    first = next(rows, None)
    if first is None:
        return
    if isinstance(first[1], Failure) or not records.is_header(first[1]):
        columns = _columns(None)  # the label, if any, is last: the features are columns 1..8 either way
        for item_id, row in itertools.chain([first], rows):
            label = NUM_FEATURES if isinstance(row, list) and len(row) == NUM_FEATURES + 1 else None
            yield _record(item_id, row, label, columns,
                          f"{NUM_FEATURES} numbers, or {NUM_FEATURES + 1} with a label last")
        return
    header = [x.strip() for x in first[1]]
    label = next((i for i, n in enumerate(header) if n.lower() in records.LABEL_COLUMNS),
                 NUM_FEATURES if len(header) == NUM_FEATURES + 1 else None)
    expected = (f"{NUM_FEATURES + 1}, as the header has a label column" if label is not None
                else f"{NUM_FEATURES}, as the header has no label column")
    columns = _columns(label, header)
    for item_id, row in rows:
        yield _record(item_id, row, label, columns, expected)


def _columns(label: int | None, header: list[str] | None = None) -> tuple[str, ...]:
    """What a file calls each feature of its records: its column, counted from 1 as spreadsheets do, with the
    header's name for it when the header has one per field ("column 2 (Glucose)")."""
    width = NUM_FEATURES + (label is not None)
    names = header if header is not None and len(header) == width else [""] * width
    return tuple(f"column {i + 1} ({name})" if name else f"column {i + 1}"
                 for i, name in enumerate(names) if i != label)


def _record(item_id: str, row: list[str] | Failure, label: int | None, columns: tuple[str, ...],
            expected: str) -> Item:
    if isinstance(row, Failure):
        return Item(item_id, failure=row)
    if len(row) != NUM_FEATURES + (label is not None):
        return Item(item_id, failure=Failure("bad row", f"{len(row)} fields: expected {expected}"))
    fields = [x for i, x in enumerate(row) if i != label]
    values = _floats(fields)
    if values is None:
        bad = next(i for i, x in enumerate(fields) if not records.is_number(x))
        return Item(item_id, failure=Failure("bad row", f"{columns[bad]} is {fields[bad]!r}: expected a number"))
    return Item(item_id, data=values, label=_normalize_label(row[label].strip() if label is not None else None),
                columns=columns)


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
