"""INPUT arguments -> a lazy, ordered stream of files, and the ``--kind`` they imply.

Files are told apart by their content, not their extension (a scan saved as ``.dat`` is still an
image, a ``.csv`` of names is still text). Folders are listed one at a time, in name order, so a folder
of millions of files streams with constant memory and every run sees the same order and the same
(normalized) paths, which ``--resume`` relies on. Paths stay strings: a ``Path`` per file costs more
than everything else the main process does for an image. ``s3://`` and ``gs://`` prefixes are listed like
folders (``serving.batch.sources``); their files keep their URIs.
"""

from __future__ import annotations

import csv
import glob
import itertools
import logging
import os
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from serving.batch import records, sources
from serving.batch.types import BatchError, Failure

log = logging.getLogger(__name__)

#: how many files kind inference looks at; enough to see a mix, few enough to start at once
SNIFF_FILES = 32
#: bytes read from a file to tell CSV from text, and text from binary
SNIFF_BYTES = 8192
#: data rows (after a header) of those bytes that vote on CSV or text; a few bad rows are outvoted
SNIFF_ROWS = 20
#: a file's content category (what ``sniff`` says) -> the kind that reads it
CATEGORY_KIND = {"image": "digits", "csv": "diabetes", "text": "names"}


class InputNotFound(BatchError):
    """An INPUT argument names no file, folder or glob match (a bad argument: exit status 1)."""


@dataclass(frozen=True)
class FileEntry:
    """One discovered file; ``failure`` is set when a folder could not be listed (the entry is the folder)."""

    path: str
    failure: Failure | None = None


def check_inputs(inputs: Sequence[str]) -> None:
    """Fail fast, before any work, on an INPUT that matches nothing."""
    for arg in inputs:
        if sources.is_uri(arg):
            try:
                found = sources.exists(arg)
            except OSError as e:
                raise InputNotFound(f"{arg}: {e}") from e
            if not found:
                raise InputNotFound(f"{arg}: no such object or prefix")
        elif not os.path.exists(arg) and not (glob.has_magic(arg) and next(glob.iglob(arg, recursive=True), None)):
            raise InputNotFound(f"{arg}: no such file, folder or glob match")


def iter_files(inputs: Sequence[str], recursive: bool, exclude: Collection[str] = (), *,
               warn_skipped: bool = False) -> Iterator[FileEntry]:
    """Every file the INPUT arguments name, in argument order, folders in name order, each file once per argument.

    A glob pattern is expanded (``**`` matches across folders) and sorted; a folder matched by a
    pattern is listed like a folder argument. Hidden entries (``.name``) inside folders are skipped, and
    so are the ``exclude`` files (absolute paths: the run's own output, which may sit among its inputs).
    ``warn_skipped`` logs the subfolders left out without ``recursive`` once the listing ends: a run
    lists its inputs several times (checks, kind inference, the work, the progress bar's count) and
    asks for the warning on one of them only.
    """
    for entry in _files(inputs, recursive, warn_skipped):
        if not exclude or os.path.abspath(entry.path) not in exclude:
            yield entry


def _files(inputs: Sequence[str], recursive: bool, warn_skipped: bool) -> Iterator[FileEntry]:
    skipped_dirs = 0
    for arg in inputs:
        for entry in _list(arg, recursive) if sources.is_uri(arg) else _expand(arg, recursive):
            if entry is None:
                skipped_dirs += 1
            else:
                yield entry
    if skipped_dirs and warn_skipped:
        log.warning("skipped %d subfolders; pass --recursive to read them", skipped_dirs)


def _expand(arg: str, recursive: bool) -> Iterator[FileEntry | None]:
    """A local INPUT's files, each once; ``None`` marks a subfolder left out without ``--recursive``.

    A glob's matches can overlap (``scans/**`` matches ``scans``, its subfolders and all their files):
    a matched file that a walked folder already gave is not given again, and a subfolder left out of
    a walk but matched itself is walked in its turn, so it is not reported as skipped.
    """
    paths = [arg] if os.path.exists(arg) else sorted(glob.iglob(arg, recursive=True))
    matched = set(map(os.path.normpath, paths))
    given: set[str] = set()  # the matched files given so far (bounded by the glob's own list)
    walked: set[tuple[int, int]] = set()
    for path in map(os.path.normpath, paths):
        for entry in _walk(path, recursive, walked) if os.path.isdir(path) else (FileEntry(path),):
            if isinstance(entry, str):
                if entry not in matched:
                    yield None
            elif entry.path not in matched:
                yield entry
            elif entry.path not in given:
                given.add(entry.path)
                yield entry


def _walk(folder: str, recursive: bool, walked: set[tuple[int, int]]) -> Iterator[FileEntry | str]:
    """Files under ``folder`` in name order, and the paths of the subfolders left out without ``--recursive``.

    Linked folders are followed, but a real folder (``st_dev``, ``st_ino``) already in ``walked`` is
    not listed again: a link back up would loop, and links between sibling folders would list their
    files once per link (7 folders linking to each other: 13,699 entries for 7 files).
    """
    try:
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in walked:
            return
        walked.add((stat.st_dev, stat.st_ino))
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        yield FileEntry(folder, Failure("unreadable folder", e.strerror or str(e)))
        return
    for e in entries:
        if e.is_dir():
            if recursive:
                yield from _walk(e.path, recursive, walked)
            else:
                yield e.path
        else:
            yield FileEntry(e.path)


def _list(uri: str, recursive: bool) -> Iterator[FileEntry | None]:
    """A URI's objects as ``_walk`` yields a folder's files (the URI itself when it names one object)."""
    try:
        if not sources.is_dir(uri):
            yield FileEntry(uri)
            return
        listing = list(sources.list_files(uri, recursive))
    except OSError as e:
        yield FileEntry(uri, Failure("unreadable folder", str(e)))
        return
    yield from (None if found is None else FileEntry(found) for found in listing)


def sniff(path: str) -> str:
    """A file's content category: "image" (anything Pillow opens), "csv" (rows of 8 or 9 numbers,
    header allowed), "text", "unclear" (rows of numbers, but not most of the rows), "binary" or
    "empty"/"unreadable".

    A CSV is told by most of its first rows, not all: one bad row near the top of a diabetes file
    must become its own error row, not send every record to the names model as a "name".
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with sources.open_file(path) as f, Image.open(f):
                return "image"
    except Image.DecompressionBombError:
        return "image"  # too large to classify, but an image: it becomes an error row of the digits run
    except (UnidentifiedImageError, ValueError):
        pass
    except OSError:
        return "unreadable"
    try:
        with sources.open_file(path) as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return "unreadable"
    if not head.strip():
        return "empty"
    if b"\0" in head:
        return "binary"
    rows = list(itertools.islice(csv.reader(records.sample_lines(head)), SNIFF_ROWS + 1))
    if rows and records.is_header(rows[0]):
        rows = rows[1:]
    rows = rows[:SNIFF_ROWS]
    found = sum(map(records.is_record, rows))
    if 2 * found > len(rows):
        return "csv"
    return "unclear" if found else "text"


def infer_kind(inputs: Sequence[str], recursive: bool, exclude: Collection[str] = ()) -> str:
    """The kind of the inputs, from the content of the first files; raise ``BatchError`` when ambiguous.

    Text is read as names: the hello models take words over four letters, which a user asks for with
    ``--kind hello``.
    """
    files = iter_files(inputs, recursive, exclude)
    sample = [e.path for e in itertools.islice(files, SNIFF_FILES) if e.failure is None]
    sniffed = {p: sniff(p) for p in sample}
    categories = Counter(sniffed.values())
    kinds = {CATEGORY_KIND[c] for c in categories if c in CATEGORY_KIND}
    unclear = next((p for p, c in sniffed.items() if c == "unclear"), None)
    if len(kinds) == 1 and unclear is None:
        return kinds.pop()
    seen = ", ".join(f"{n} {c}" for c, n in categories.most_common()) or "no files"
    if unclear is not None:
        why = (f"the first rows of {unclear} are partly 8 or 9 numbers, partly not (a diabetes CSV with bad "
               "rows, or text?)")
    else:
        why = "they mix kinds" if kinds else "none is an image, a CSV of 8 features or a text file"
    raise BatchError(f"cannot infer --kind from the first {len(sample)} files ({seen}): {why}; pass --kind")
