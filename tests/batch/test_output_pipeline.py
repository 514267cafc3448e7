"""The results file (atomic commit, refusal to overwrite, resume after a torn write) and the ordered,
bounded streaming of the pipeline."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serving.batch import pipeline
from serving.batch.output import OutputError, ResultWriter, columns, partial_path
from serving.batch.prepare import PreparedBatch, Preparer
from serving.batch.types import BatchError, Failure, Item, Prediction
from tests.batch.conftest import read_rows

COLS = columns(top_k=1, with_label=False)


def _write(writer: ResultWriter, *ids: str) -> None:
    writer.write(writer.format.render([(Item(i), Prediction("7", 0.5, "m", "1", (("7", 0.5),)) if i != "bad"
                                        else Failure("x", "y")) for i in ids]))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_appear_only_on_commit_and_resume_continues_a_torn_partial(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"results.{fmt}"
    writer = ResultWriter(out, fmt, COLS, overwrite=False, resume=False)
    _write(writer, "a", "bad")
    writer.close()  # a crash: nothing committed, the partial file keeps the rows
    assert not out.exists()
    partial = partial_path(out)
    with open(partial, "ab") as f:
        f.write(b"c,7,0.5")  # a kill in the middle of a row
    with pytest.raises(OutputError, match="--resume"):
        ResultWriter(out, fmt, COLS, overwrite=False, resume=False)
    resumed = ResultWriter(out, fmt, COLS, overwrite=False, resume=True)
    assert resumed.done == {"a", "bad"} and resumed.done_failed == 1
    _write(resumed, "c")
    resumed.commit()
    assert not partial.exists()
    rows = read_rows(out)
    assert [r["path"] for r in rows] == ["a", "bad", "c"]
    assert rows[0]["top1"] == "7" and rows[1]["error"] == "x: y"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_of_a_finished_file_and_of_other_columns(tmp_path: Path, fmt: str) -> None:
    """A run with other columns (say --top-k 2) must not append its rows to a file written without them:
    a CSV's header and a JSON Lines file's first keys are checked alike."""
    out = tmp_path / f"results.{fmt}"
    writer = ResultWriter(out, fmt, COLS, overwrite=False, resume=False)
    _write(writer, "a")
    writer.commit()
    before = out.read_bytes()
    with pytest.raises(OutputError, match=f"{out} has the columns .*top1_score, this run writes .*top2_score"):
        ResultWriter(out, fmt, columns(top_k=2, with_label=False), overwrite=False, resume=True)
    assert out.read_bytes() == before and not partial_path(out).exists()  # a refused resume changes nothing
    again = ResultWriter(out, fmt, COLS, overwrite=False, resume=True)
    assert again.done == {"a"}
    _write(again, "b")
    again.commit()
    assert [r["path"] for r in read_rows(out)] == ["a", "b"]
    fresh = ResultWriter(out, fmt, COLS, overwrite=True, resume=False)
    assert out.read_bytes().count(b"\n") == 2 + (fmt == "csv")  # --overwrite replaces the file only on commit
    _write(fresh, "z")
    fresh.commit()
    assert [r["path"] for r in read_rows(out)] == ["z"]


def test_ordered_map_keeps_order_and_a_bounded_window() -> None:
    """However slow the consumer, at most ``window`` items are taken from the source ahead of it."""
    taken = 0
    lock = threading.Lock()

    def source() -> Any:
        nonlocal taken
        for i in range(100):
            with lock:
                taken += 1
            yield i

    with ThreadPoolExecutor(4) as pool:
        for consumed, (x, y) in enumerate(pipeline.ordered_map(lambda v: v * v, source(), pool, window=3), 1):
            assert y == x * x and x == consumed - 1
            assert taken - consumed <= 3


def _echo(inputs: list[str]) -> list[Prediction | Failure]:
    """A fake model: the label of an input is its text, "x" is refused."""
    return [Failure("refused", t) if t == "x" else Prediction(t, 1.0, "echo", "1") for t in inputs]


def _where(pairs: list[tuple[Item, Any]]) -> tuple[int, list[tuple[Item, Any]]]:
    """A ``finish`` that tells which process classified the batch."""
    return os.getpid(), pairs


@dataclass
class _Echo:
    """A fake engine; with ``worker_classify`` a worker process classifies and finishes its batches."""

    worker_classify: Any = None
    kind, labels, description, concurrency = "names", (), "echo", 2
    preparer = Preparer("names")

    def classify(self, inputs: list[str]) -> list[Prediction | Failure]:
        return _echo(inputs)

    def close(self) -> None: ...


@pytest.mark.parametrize(("workers", "in_workers"), [(0, False), (2, False), (2, True), (0, True)])
def test_pipeline_answers_every_item_once_in_order(workers: int, in_workers: bool) -> None:
    """The same answers, in order, wherever the batches are prepared and classified; an engine that can classify
    in the workers does so there, ``finish`` included, and in this process when there are none."""
    items = [Item(f"f:{i}", data=str(i % 7) if i % 11 else "x", failure=Failure("empty line", "") if i % 13 == 0
                  else None) for i in range(1, 300)]
    seen: list[tuple[Item, Any]] = []
    pids: set[int] = set()

    def on_batch(result: tuple[int, list[tuple[Item, Any]]]) -> None:
        pids.add(result[0])
        seen.extend(result[1])

    pool = pipeline.Workers(workers) if workers else None
    try:
        pipeline.run(iter(items), _Echo(_echo if in_workers else None), batch_size=16, workers=pool, finish=_where,
                     on_batch=on_batch)
    finally:
        if pool:
            pool.close()
    assert [item for item, _ in seen] == items
    for item, outcome in seen:
        if item.failure:
            assert outcome == item.failure
        elif item.data == "x":
            assert outcome == Failure("refused", "x")
        else:
            assert isinstance(outcome, Prediction) and outcome.label == item.data
    assert os.getpid() not in pids if workers and in_workers else pids == {os.getpid()}


def test_output_that_cannot_be_written_or_resumed_is_an_output_error(tmp_path: Path) -> None:
    """Not a traceback: a file where the output's folder should be, and a results file with a line that is
    not JSON, are refused with the file (and line) named."""
    (tmp_path / "d.csv").write_text("a file, not a folder\n")
    with pytest.raises(OutputError, match=r"d\.csv/x\.csv\.partial \(.*d\.csv: "):
        ResultWriter(tmp_path / "d.csv" / "x.csv", "csv", COLS, overwrite=False, resume=False)
    out = tmp_path / "results.jsonl"
    writer = ResultWriter(out, "jsonl", COLS, overwrite=False, resume=False)
    _write(writer, "a")
    writer.commit()
    good = out.read_bytes()
    for line, error in ((b"not json\n", "is not JSON"), (b"[1]\n", "is not a results row")):
        out.write_bytes(good + line)
        with pytest.raises(OutputError, match=rf"{out}:2 {error}"):
            ResultWriter(out, "jsonl", COLS, overwrite=False, resume=True)
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00path\n")
    with pytest.raises(OutputError, match="binary.csv is not UTF-8 text"):
        ResultWriter(tmp_path / "binary.csv", "csv", COLS, overwrite=False, resume=True)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_paths_that_are_not_utf8_are_written_losslessly_and_resumed(tmp_path: Path, fmt: str) -> None:
    """The documented escape (output.py): undecodable bytes as \\xNN, a backslash that would read as one as
    \\x5c. Reading the escapes back gives every path's bytes, and distinct paths stay distinct rows."""
    odd, lookalike, accented = os.fsdecode(b"d/caf\xe9.png"), "d/caf\\xe9.png", "d/caf\u00e9 \\n.png"
    out = tmp_path / f"results.{fmt}"
    writer = ResultWriter(out, fmt, COLS, overwrite=False, resume=False)
    _write(writer, odd, lookalike, accented)
    writer.commit()
    paths = [r["path"] for r in read_rows(out)]
    assert paths == ["d/caf\\xe9.png", "d/caf\\x5cxe9.png", "d/caf\u00e9 \\n.png"]

    def unescape(text: str) -> bytes:
        return re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), text.encode())

    assert [unescape(p) for p in paths] == [os.fsencode(p) for p in (odd, lookalike, accented)]
    resumed = ResultWriter(out, fmt, COLS, overwrite=False, resume=True)
    assert all(resumed.has(p) for p in (odd, lookalike, accented)) and not resumed.has("d/caf.png")
    assert resumed.kept == 3


def test_an_engine_answering_another_number_of_inputs_stops_the_batch() -> None:
    """Each answer goes to the next ready item's row: one answer too few raised StopIteration inside a generator
    (a RuntimeError traceback, no rows), one too many was dropped unseen. Any engine, whatever it checked."""

    def short(inputs: list[str]) -> list[Prediction]:
        return [Prediction("7", 0.5, "m", "1", ()) for _ in inputs[1:]]

    items = [Item("a"), Item("b"), Item("c")]
    batch = PreparedBatch([None, Failure("x", "y"), None], ["a", "c"])
    with pytest.raises(BatchError, match="answered 1 of 2 inputs"):
        pipeline._classify(short, items, batch)
