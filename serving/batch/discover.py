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

from serving.batch import sources
from serving.batch.types import BatchError, Failure

log = logging.getLogger(__name__)

#: how many files kind inference looks at; enough to see a mix, few enough to start at once
SNIFF_FILES = 32
#: bytes read from a file to tell CSV from text, and text from binary
SNIFF_BYTES = 8192
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


def iter_files(inputs: Sequence[str], recursive: bool, exclude: Collection[str] = ()) -> Iterator[FileEntry]:
    """Every file the INPUT arguments name, in argument order, folders in name order, each file once per argument.

    A glob pattern is expanded (``**`` matches across folders) and sorted; a folder matched by a
    pattern is listed like a folder argument. Hidden entries (``.name``) inside folders are skipped, and
    so are the ``exclude`` files (absolute paths: the run's own output, which may sit among its inputs).
    """
    for entry in _files(inputs, recursive):
        if not exclude or os.path.abspath(entry.path) not in exclude:
            yield entry


def _files(inputs: Sequence[str], recursive: bool) -> Iterator[FileEntry]:
    skipped_dirs = 0
    for arg in inputs:
        if sources.is_uri(arg):
            for entry in _list(arg, recursive):
                if entry is None:
                    skipped_dirs += 1
                else:
                    yield entry
            continue
        paths = [arg] if os.path.exists(arg) else sorted(glob.iglob(arg, recursive=True))
        for path in map(os.path.normpath, paths):
            if os.path.isdir(path):
                for entry in _walk(path, recursive, frozenset()):
                    if entry is None:
                        skipped_dirs += 1
                    else:
                        yield entry
            else:
                yield FileEntry(path)
    if skipped_dirs:
        log.warning("skipped %d subfolders; pass --recursive to read them", skipped_dirs)


def _walk(folder: str, recursive: bool, above: frozenset[str]) -> Iterator[FileEntry | None]:
    """Files under ``folder`` in name order; ``None`` marks a subfolder left out without ``--recursive``.

    Linked folders are followed, except a link back to a folder being walked (``above``), which would loop.
    """
    real = os.path.realpath(folder)
    if real in above:
        return
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        yield FileEntry(folder, Failure("unreadable folder", e.strerror or str(e)))
        return
    for e in entries:
        if e.is_dir():
            if recursive:
                yield from _walk(e.path, recursive, above | {real})
            else:
                yield None
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
    header allowed), "text", "binary" or "empty"/"unreadable"."""
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
    lines = head.decode("utf-8", errors="replace").splitlines()
    rows = [r for r in csv.reader(lines[:-1] if len(lines) > 1 else lines) if r][:5]
    if rows and all(len(r) in (8, 9) for r in rows) and all(map(_is_numeric_row, rows[1:] or rows)):
        return "csv"
    return "text"


def _is_numeric_row(row: list[str]) -> bool:
    try:
        [float(x) for x in row]
    except ValueError:
        return False
    return True


def infer_kind(inputs: Sequence[str], recursive: bool, exclude: Collection[str] = ()) -> str:
    """The kind of the inputs, from the content of the first files; raise ``BatchError`` when ambiguous.

    Text is read as names: the hello models take words over four letters, which a user asks for with
    ``--kind hello``.
    """
    files = iter_files(inputs, recursive, exclude)
    sample = [e.path for e in itertools.islice(files, SNIFF_FILES) if e.failure is None]
    categories = Counter(sniff(p) for p in sample)
    kinds = {CATEGORY_KIND[c] for c in categories if c in CATEGORY_KIND}
    if len(kinds) == 1:
        return kinds.pop()
    seen = ", ".join(f"{n} {c}" for c, n in categories.most_common()) or "no files"
    why = "they mix kinds" if kinds else "none is an image, a CSV of 8 features or a text file"
    raise BatchError(f"cannot infer --kind from the first {len(sample)} files ({seen}): {why}; pass --kind")
