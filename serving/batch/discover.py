"""INPUT arguments -> a lazy, ordered stream of files, and the ``--kind`` they imply.

Files are told apart by their content, not their extension (a scan saved as ``.dat`` is still an
image, a ``.csv`` of names is still text). Folders are listed one at a time, in name order, so a folder
of millions of files streams with constant memory and every run sees the same order and the same
(normalized) paths, which ``--resume`` relies on. Paths stay strings: a ``Path`` per file costs more
than everything else the main process does for an image. ``s3://`` and ``gs://`` prefixes are listed like
folders (``serving.batch.sources``); their files keep their URIs. What is not a regular file (a named
pipe, a device, a socket, a link to one) is an error entry and is never opened.
"""

from __future__ import annotations

import csv
import glob
import itertools
import logging
import operator
import os
import re
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from serving.batch import records, sources
from serving.batch.records import NUM_FEATURES
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
#: what may separate the numbers of a row that is data, not a name: a comma, the semicolon of spreadsheets
#: written where the decimal mark is a comma, tabs, spaces, a bar; quotes around a number
_NUMBER_SEPARATORS = re.compile(r'[\s,;|"]+')


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
    """Every file the INPUT arguments name, in argument order, folders in name order, each file once.

    A glob pattern is expanded (``**`` matches across folders) and sorted; a folder matched by a
    pattern is listed like a folder argument. A file that several arguments name (``digits digits/d0.png``,
    a link and its target) is given by the first of them only (``_files``). Hidden entries (``.name``)
    inside folders are skipped, and so are the ``exclude`` files (absolute paths: the run's own output,
    which may sit among its inputs).
    ``warn_skipped`` logs the subfolders left out without ``recursive`` once the listing ends: a run
    lists its inputs several times (the first files for its checks and kind inference, the work, the progress
    bar's count) and asks for the warning on one of them only.
    """
    names = tuple({os.path.basename(path) for path in exclude})
    for entry in _files(inputs, recursive, warn_skipped):
        # by name first: abspath for every file was a fifth of the listing's cost
        if not entry.path.endswith(names) or os.path.abspath(entry.path) not in exclude:
            yield entry


def _files(inputs: Sequence[str], recursive: bool, warn_skipped: bool) -> Iterator[FileEntry]:
    """The arguments' files, less those an earlier argument already gave (``digits digits/d0.png``: once).

    One argument gives each of its paths once by itself (``_expand``); across arguments files are told
    apart by what they are (``_identity``), which means remembering the files of every argument but the
    last: a lone folder argument, however large, still streams in constant memory.
    """
    skipped_dirs = 0
    earlier: set[tuple[int, int] | str] = set()  # the files the arguments before this one gave
    for n, arg in enumerate(inputs, 1):
        this: set[tuple[int, int] | str] = set()
        for entry in _list(arg, recursive) if sources.is_uri(arg) else _expand(arg, recursive):
            if entry is None:
                skipped_dirs += 1
                continue
            if len(inputs) > 1:
                key = _identity(entry.path)
                if key in earlier:
                    continue
                if n < len(inputs):
                    this.add(key)
            yield entry
        earlier |= this
    if skipped_dirs and warn_skipped:
        log.warning("skipped %d subfolders; pass --recursive to read them", skipped_dirs)


def _identity(path: str) -> tuple[int, int] | str:
    """What a path names, to tell whether two arguments give the same file: a local file's device and inode,
    as ``_walk`` tells folders apart (the same for a link and its target, ``./a.png`` and ``a.png``, and hard
    links); a URI, or a path that cannot be looked at, as written (normalized)."""
    if sources.is_uri(path):
        return path
    try:
        st = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return st.st_dev, st.st_ino


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
        for entry in _walk(path, recursive, walked) if os.path.isdir(path) else (_file(path),):
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
            entries = sorted((e for e in it if not e.name.startswith(".")), key=operator.attrgetter("name"))
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
            yield FileEntry(e.path) if e.is_file() else _file(e.path)  # is_file: no system call for a plain file


def _file(path: str) -> FileEntry:
    """A local file, or an error entry for one that is not a regular file (after links): never opened
    (``sources.special`` says why). A path that cannot be looked at (a dangling link) is left to its
    reader, which reports why it cannot be read, as for any unreadable file."""
    try:
        what = sources.special(os.stat(path).st_mode)
    except OSError:
        return FileEntry(path)
    if what is None:
        return FileEntry(path)
    return FileEntry(path, Failure("not a regular file", f"{what}; only regular files are read"))


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


def csv_row(line: str) -> list[str]:
    """One line's CSV fields (none for a blank line); raises ``csv.Error`` when the line is not a CSV row.

    Each line is a row of its own, for kind inference and reading alike: a quoted field cannot span lines
    (no diabetes record or names row needs one), so a stray quote is one bad row rather than the start of a
    field that swallows every line after it. Strict parsing makes a quote left open, or text after a closing
    quote (``"a"b``), an error instead of a guess.
    """
    return next(csv.reader((line,), strict=True), [])


def sniff(path: str) -> str:
    """A file's content category: "image" (anything Pillow opens), "csv" (rows of 8 or 9 numbers,
    header allowed, or a header of that width alone), "text", "unclear" (rows of numbers, but not most of
    them records), "binary" or "empty"/"unreadable".

    A CSV is told by most of its first rows, not all: one bad row near the top of a diabetes file
    must become its own error row, not send every record to the names model as a "name". Rows of numbers
    are never names, but when they are not records (an index column as pandas writes, ``;`` separators,
    another data set) the file is "unclear" rather than diabetes with every row bad: the model could not
    classify one of them, and asking for ``--kind`` says so once, naming the file, instead of once per row.
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
    lines = records.sample_lines(head)[:SNIFF_ROWS + 1]
    rows = list(map(_row_or_none, lines))
    header = rows[0] if rows and rows[0] is not None and records.is_header(rows[0]) else None
    if header is not None:
        if len(lines) == 1:  # a header alone: a diabetes file without records when it is that wide
            return "csv" if len(header) in (NUM_FEATURES, NUM_FEATURES + 1) else "text"
        lines, rows = lines[1:], rows[1:]
    lines, rows = lines[:SNIFF_ROWS], rows[:SNIFF_ROWS]
    found = sum(row is not None and records.is_record(row) for row in rows)
    if 2 * found > len(rows):
        return "csv"
    numbers = sum(map(_is_numbers, lines))
    return "unclear" if found or 2 * numbers > len(rows) else "text"


def _row_or_none(line: str) -> list[str] | None:
    """A sampled line's fields; None for a line that is not a CSV row, which votes for no kind."""
    try:
        return csv_row(line)
    except csv.Error:
        return None


def _is_numbers(line: str) -> bool:
    """Whether a line holds numbers only, however many and however separated: data, never a name."""
    fields = [x for x in _NUMBER_SEPARATORS.split(line) if x]
    return bool(fields) and all(map(records.is_number, fields)) and any(map(str.isdigit, line))


def first_files(inputs: Sequence[str], recursive: bool, exclude: Collection[str] = ()) -> list[FileEntry]:
    """The first ``SNIFF_FILES`` files of the inputs, which kind inference reads; none: the inputs hold no file."""
    return list(itertools.islice(iter_files(inputs, recursive, exclude), SNIFF_FILES))


def infer_kind(inputs: Sequence[str], recursive: bool, exclude: Collection[str] = (),
               sample: Sequence[FileEntry] | None = None) -> str:
    """The kind of the inputs, from the content of the first files (``first_files``, or ``sample`` when the
    caller listed them already: a listing sorts each whole folder first, seconds for a million files) and of
    the files named beyond them (``named_files``); raise ``BatchError`` when ambiguous, as when they mix kinds.

    Text is read as names: the hello models take words over four letters, which a user asks for with
    ``--kind hello``.
    """
    if sample is None:
        sample = first_files(inputs, recursive, exclude)
    first = [e.path for e in sample if e.failure is None]
    named = named_files(inputs, first, exclude)
    sniffed = {p: sniff(p) for p in first + named}
    categories = Counter(sniffed.values())
    kinds = {CATEGORY_KIND[c] for c in categories if c in CATEGORY_KIND}
    unclear = next((p for p, c in sniffed.items() if c == "unclear"), None)
    if len(kinds) == 1 and unclear is None:
        return kinds.pop()
    examples = {c: next(p for p, x in sniffed.items() if x == c) for c in categories}
    seen = "; ".join(f"{n} {c}, {'e.g. ' if n > 1 else ''}{examples[c]}" for c, n in categories.most_common())
    looked = f"the first {len(first)} files" + (f" and {len(named)} named after them" if named else "")
    advice = "pass --kind"
    if unclear is not None:
        why = (f"the first rows of {unclear} are numbers, all or some, but mostly not records of 8 numbers and "
               "an optional label (a diabetes CSV with bad rows or an index column, separators other than commas, "
               "or text?)")
    elif kinds:
        why = "they mix kinds, and a run classifies one kind"
        advice = "run each kind on its own, or pass --kind KIND to read them all as KIND"
    else:
        why = "none is an image, a CSV of 8 features or a text file"
    raise BatchError(f"cannot infer --kind from {looked} ({seen or 'no files'}): {why}; {advice}")


def named_files(inputs: Sequence[str], sample: Sequence[str], exclude: Collection[str] = ()) -> list[str]:
    """The files INPUT arguments name themselves (not through a folder or a glob) that kind inference must
    look at beyond its ``sample`` of the first files: one per file suffix that neither the sample nor a file
    named before it shows.

    A file named on the command line is meant to be classified in this run, so wherever it stands it counts:
    ``scans names.txt`` mixes kinds as ``names.txt scans`` does, instead of making ``names.txt`` an "invalid
    image" row. Content still decides each file's kind; the suffix only spares reads, so that a shell-expanded
    ``scans/*.png`` of 100,000 files is not read twice.
    """
    suffixes = {_suffix(path) for path in sample}
    named = []
    for arg in inputs:
        path = arg if sources.is_uri(arg) else os.path.normpath(arg)
        if _suffix(path) not in suffixes and os.path.abspath(path) not in exclude and _is_one_file(path):
            suffixes.add(_suffix(path))
            named.append(path)
    return named


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _is_one_file(arg: str) -> bool:
    """Whether an INPUT names one regular file (a local file or a bucket's object), not a folder, a prefix or
    a glob; a named pipe or a device is never one (it is not opened)."""
    if not sources.is_uri(arg):
        return os.path.isfile(arg)
    try:
        return not sources.is_dir(arg)
    except OSError:  # listing the inputs reports it as an unreadable folder
        return False
