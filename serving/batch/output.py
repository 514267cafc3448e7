"""The results file: CSV or JSON Lines, written atomically, flushed per batch, resumable.

Rows go to ``<out>.partial`` and are flushed after every batch, so a crash or a kill keeps everything
classified so far; only a finished run renames the partial file over ``<out>`` (``os.replace``), so
``<out>`` is never half written. ``--resume`` continues the partial file of an interrupted run (or a
copy of a finished ``<out>``), skipping the ids already there.

The file is UTF-8 text, but a Linux file name is any bytes: a name that is not UTF-8 reaches Python with
its odd bytes as lone surrogates (``os.fsdecode``), which UTF-8 cannot hold. ``path_text`` writes each such
byte as ``\\xNN`` (``caf\\xe9.png``), the way Python's ``backslashreplace`` shows it, and a backslash that
would read as such an escape as ``\\x5c``: every path keeps its own row id and its bytes can be recovered.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from serving.batch.summary import Tally
from serving.batch.types import BatchError, Failure, Item, Prediction

BASE_COLUMNS = ("path", "prediction", "confidence", "error", "model", "model_version")
FORMATS = ("csv", "jsonl")
#: a byte of a file name that is not UTF-8, as ``os.fsdecode`` (surrogateescape) hands it over
_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")
#: a backslash in a name that would otherwise read as the escape of such a byte
_ESCAPE_LOOKALIKE = re.compile(r"\\(?=x[0-9a-fA-F]{2})")


class OutputError(BatchError):
    """The output cannot be written as asked (exists without ``--overwrite``, other columns on ``--resume``, a
    folder that cannot be made or written, a file to resume that this CLI did not write)."""


def columns(top_k: int, with_label: bool) -> list[str]:
    """The output's columns: the base ones, the input's truth ``label`` (a CSV's label column, for the kinds
    whose inputs may have one), then top-k pairs."""
    cols = list(BASE_COLUMNS) + (["label"] if with_label else [])
    for k in range(1, top_k + 1):
        cols += [f"top{k}", f"top{k}_score"]
    return cols


def path_text(item_id: str) -> str:
    """``item_id`` as the ``path`` column holds it, and as ``--resume`` matches it: unchanged, unless it has
    bytes that are not UTF-8 (each becomes ``\\xNN``) or a backslash that would read as one (``\\x5c``).
    Without this a name that is not UTF-8 stopped every run, ``--resume`` included, at that file."""
    if "\\" not in item_id and not _UNDECODED_BYTE.search(item_id):
        return item_id
    escaped = _ESCAPE_LOOKALIKE.sub(r"\\x5c", item_id)
    return _UNDECODED_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", escaped)


def make_row(item: Item, outcome: Prediction | Failure, cols: Sequence[str]) -> dict[str, Any]:
    """One output row; missing values are ``None`` (empty in CSV, null in JSON Lines)."""
    row: dict[str, Any] = dict.fromkeys(cols)
    row["path"] = path_text(item.id)
    if "label" in row:
        row["label"] = item.label
    if isinstance(outcome, Failure):
        row["error"] = str(outcome)
        return row
    row.update(prediction=outcome.label, confidence=round(outcome.confidence, 6), model=outcome.model,
               model_version=outcome.version)
    for k, (label, score) in enumerate(outcome.top, 1):
        if f"top{k}" in row:
            row[f"top{k}"], row[f"top{k}_score"] = label, round(score, 6)
    return row


@dataclass(frozen=True)
class RenderedRows:
    """A batch's rows as text of the results file, and what they add to the summary."""

    text: str
    count: int
    tally: Tally


@dataclass(frozen=True)
class RowFormat:
    """Turns a batch's (item, outcome) pairs into the results file's text; picklable, so that a worker process
    that classified a batch renders it too, and this process, which lists every input and writes every row,
    only writes: answering and rendering every row here made it the ceiling on many cores (25-27k images/s on
    16) and took a third of a core on 2."""

    fmt: str
    cols: tuple[str, ...]

    def render(self, pairs: Sequence[tuple[Item, Prediction | Failure]]) -> RenderedRows:
        tally = Tally()
        rows = []
        for item, outcome in pairs:
            rows.append(make_row(item, outcome, self.cols))
            tally.add(item, outcome)
        if self.fmt == "csv":
            text = io.StringIO()
            csv.writer(text).writerows(row.values() for row in rows)  # None is written as "", as DictWriter does
            return RenderedRows(text.getvalue(), len(rows), tally)
        return RenderedRows("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), len(rows), tally)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_target(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a folder as the results file, whatever the options (a run would classify everything, then fail
    to rename its partial file over the folder, again on every ``--resume``), and refuse to replace a
    results file, or an interrupted run's partial one, unless told how."""
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder: expected the path of the results file, such as "
                          f"{out / 'results.csv'}")
    if overwrite or resume:
        return
    for existing in (out, partial_path(out)):
        if existing.exists():
            what = "an interrupted run's partial results" if existing != out else "the output"
            raise OutputError(f"{existing} exists ({what}): pass --resume to continue it or --overwrite to start "
                              "over")


class ResultWriter:
    """Appends rows to ``<out>.partial``; ``commit()`` renames it to ``<out>``.

    After construction ``done`` holds the ids already in the output (``--resume``, as ``path_text`` wrote
    them: ask ``has``), ``kept`` how many rows that output holds and ``done_failed`` how many of those are
    failures, so the summary and the exit status cover the whole file. Rows, not ids: a file may hold an id
    twice (written from overlapping arguments, or two files joined).
    """

    def __init__(self, out: Path, fmt: str, cols: Sequence[str], *, overwrite: bool, resume: bool) -> None:
        self.out, self.fmt, self.cols = Path(out), fmt, list(cols)
        self.partial = partial_path(self.out)
        self.done: set[str] = set()
        self.kept = 0
        self.done_failed = 0
        self._written = 0
        check_target(self.out, overwrite=overwrite, resume=resume)
        try:
            if resume and self.partial.exists():
                _drop_torn_tail(self.partial)
                self._read_done(self.partial)
            elif resume and self.out.exists():
                self._read_done(self.out)  # checked before copying, so a refused resume leaves no partial file
                shutil.copyfile(self.out, self.partial)
            fresh = not (resume and self.partial.exists() and self.partial.stat().st_size)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = open(self.partial, "w" if fresh else "a", newline="", encoding="utf-8")
        except OSError as e:  # a file where a folder should be, a read-only or pseudo file system
            where = f"{e.filename}: " if e.filename and str(e.filename) != str(self.partial) else ""
            raise OutputError(f"cannot write the results to {self.partial} ({where}{e.strerror or e}): expected a "
                              "path in a folder that exists or can be made, writable by this user") from e
        self.format = RowFormat(fmt, tuple(self.cols))
        if fresh and fmt == "csv":
            csv.writer(self._file).writerow(self.cols)
            self._file.flush()

    def _read_done(self, path: Path) -> None:
        with open(path, newline="", encoding="utf-8") as f:
            try:
                for row in self._csv_rows(path, f) if self.fmt == "csv" else self._json_rows(path, f):
                    self.done.add(row["path"])
                    self.kept += 1
                    self.done_failed += bool(row.get("error"))
            except UnicodeDecodeError as e:
                raise OutputError(f"{path} is not UTF-8 text ({e.reason}): expected the results this command "
                                  "writes; resume only its own output, or --overwrite") from e

    def _csv_rows(self, path: Path, f: IO[str]) -> Iterator[dict[str, Any]]:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None:
            self._check_columns(path, reader.fieldnames)
        yield from reader

    def _json_rows(self, path: Path, f: IO[str]) -> Iterator[dict[str, Any]]:
        """The rows of a JSON Lines file; the first one's keys must be this run's columns, as a CSV's header."""
        first = True
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise OutputError(f"{path}:{number} is not JSON ({e.msg}): expected one results row per line, "
                                  "as this command writes; resume only its own output, or --overwrite") from e
            if not isinstance(row, dict) or "path" not in row:
                raise OutputError(f"{path}:{number} is not a results row: expected a JSON object with a \"path\" "
                                  "key, as this command writes; resume only its own output, or --overwrite")
            if first:
                self._check_columns(path, list(row))
                first = False
            yield row

    def _check_columns(self, path: Path, found: Sequence[str]) -> None:
        if list(found) != self.cols:
            raise OutputError(f"{path} has the columns {','.join(found)}, this run writes {','.join(self.cols)}: "
                              "resume with the same options, or --overwrite")

    def has(self, item_id: str) -> bool:
        """Whether the output already holds a row for ``item_id`` (``--resume`` skips it)."""
        return bool(self.done) and path_text(item_id) in self.done

    @property
    def rows(self) -> int:
        """Rows in the output so far: those found by ``--resume`` and those written since."""
        return self.kept + self._written

    def write(self, rows: RenderedRows) -> None:
        """Append a batch of rows (``format.render``) and flush them to the OS, so a crash after this call keeps
        them."""
        try:
            self._file.write(rows.text)
            self._file.flush()
        except OSError as e:  # a full disk, a quota: the rows flushed before stay, resumable
            raise OutputError(f"cannot write results to {self.partial}: {e.strerror or e}") from e
        self._written += rows.count

    def commit(self) -> None:
        """Make the results durable and visible under ``<out>`` in one atomic step."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.partial, self.out)
            dir_fd = os.open(self.out.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise OutputError(f"cannot finish {self.out}: {e.strerror or e}") from e

    def close(self) -> None:
        """Stop without committing: the partial file keeps what was written, for ``--resume``; a partial file
        with no rows at all is removed, so a run that failed at once does not block the next one."""
        if not self._file.closed:
            with contextlib.suppress(OSError):  # rows a full disk refused were never counted as written
                self._file.close()
            if not self.rows:
                self.partial.unlink(missing_ok=True)


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill interrupted mid-write; that row is simply classified again."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)
