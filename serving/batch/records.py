"""The CSV layouts the batch CLI reads, in one place, so that kind inference (``discover``) and reading
(``items``) agree on what a header, a diabetes record and a names row are.

Diabetes records are ``NUM_FEATURES`` numbers plus an optional label column, with an optional header.
The course's names file is quoted two-column rows, ``"Abl","Czech"``: a name and its country.
"""

from __future__ import annotations

import csv

#: header names taken for the truth-label column of a CSV (case-insensitive)
LABEL_COLUMNS = {"label", "labels", "outcome", "class", "target", "y", "diabetes"}
#: feature columns of a diabetes record, as in the course file
NUM_FEATURES = 8


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def is_header(row: list[str]) -> bool:
    """Whether a CSV's first row names its columns: it names a label column, or holds no number at all.

    A first row that is bad data (a missing value written ``NA``, a field too few) is not a header: it is
    a record, and fails alone.
    """
    return any(x.strip().lower() in LABEL_COLUMNS for x in row) or not any(map(is_number, row))


def is_record(row: list[str]) -> bool:
    """A well-formed diabetes record: ``NUM_FEATURES`` numbers, or one more for the label."""
    return len(row) in (NUM_FEATURES, NUM_FEATURES + 1) and all(map(is_number, row))


def sample_lines(head: bytes) -> list[str]:
    """The non-blank lines of a file's first bytes, less a last line that may be cut mid-way."""
    lines = head.decode("utf-8", errors="replace").removeprefix("\ufeff").splitlines()
    if len(lines) > 1 and not head.endswith((b"\n", b"\r")):
        lines.pop()
    return [line for line in lines if line.strip()]


def is_names_csv(path: str, head: bytes) -> bool:
    """Whether a file is in the course's names layout: a ``.csv`` file whose lines are mostly two quoted
    fields, name then country.

    Both the suffix and the quotes are asked for: a plain list of names may hold commas (``O'Neill, Jr``
    is one name), and content alone cannot tell that from a name and a country.
    """
    if not path.lower().endswith(".csv"):
        return False
    lines = sample_lines(head)
    quoted = sum(line.lstrip().startswith('"') and len(next(csv.reader([line]))) == 2 for line in lines)
    return 2 * quoted > len(lines)
