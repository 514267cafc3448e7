"""Inputs that are not regular files (a named pipe, a device, a link to one): an error row each, never opened.

Opening a named pipe waits for a writer: kind inference hung on one, and a decoding worker blocked in ``open()``
kept the run alive after Ctrl-C. A device reads without end (a link to ``/dev/zero`` ran out of memory); the
tests use ``/dev/null``, which is as much a device and reads nothing, so the old code fails them without harm.
Every call that could block runs under ``_within``, which fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from PIL import Image

from serving.batch import sources
from serving.batch.discover import infer_kind, iter_files
from serving.batch.items import iter_items
from serving.batch.prepare import Preparer
from serving.batch.types import Item

T = TypeVar("T")
#: seconds a call may take before it counts as blocked on the pipe; the calls take milliseconds
BLOCKED_AFTER = 5.0
NOT_REGULAR = {"pipe.png": "not a regular file: a named pipe; only regular files are read",
               "null.png": "not a regular file: a character device; only regular files are read"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """a.png, a named pipe, a link to /dev/null and a dangling link, all named like images."""
    root = tmp_path / "scans"
    root.mkdir()
    Image.new("L", (8, 8), 255).save(root / "a.png")
    os.mkfifo(root / "pipe.png")
    (root / "null.png").symlink_to("/dev/null")
    (root / "gone.png").symlink_to(root / "missing.png")
    return root


def _within(call: Callable[[], T], pipe: Path) -> T:
    """``call()``, failing the test if it is still running after ``BLOCKED_AFTER`` s: then the pipe is opened
    for writing until the blocked thread gets past it (each open of the pipe waits for a writer anew)."""
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BLOCKED_AFTER)
    if thread.is_alive():
        for _ in range(100):
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # fails while no reader waits
            except OSError:
                pass
            thread.join(0.05)
            if not thread.is_alive():
                break
        pytest.fail(f"blocked on the named pipe {pipe} for over {BLOCKED_AFTER} s")
    if errors:
        raise errors[0]
    return outcome[0]


def test_what_is_not_a_regular_file_is_an_error_row_and_never_opened(folder: Path) -> None:
    """Listing marks the pipe and the device; the digits items carry that failure, so the worker's read never
    opens them; a dangling link is still read, and fails saying why, as before."""
    entries = _within(lambda: list(iter_files([str(folder)], False)), folder / "pipe.png")
    assert {Path(e.path).name: str(e.failure) for e in entries if e.failure} == NOT_REGULAR
    items = list(iter_items(entries, "digits"))
    prepared = _within(lambda: Preparer("digits")(items), folder / "pipe.png")
    outcomes = {Path(i.id).name: str(o or "") for i, o in zip(items, prepared.outcomes, strict=True)}
    assert outcomes == {"a.png": "", "gone.png": "unreadable file: No such file or directory", **NOT_REGULAR}
    names = _within(lambda: list(iter_items(iter_files([str(folder / "pipe.png")], False), "names")),
                    folder / "pipe.png")
    assert [str(i.failure) for i in names] == [NOT_REGULAR["pipe.png"]]


def test_kind_inference_does_not_wait_on_a_named_pipe(folder: Path) -> None:
    assert _within(lambda: infer_kind([str(folder)], False), folder / "pipe.png") == "digits"


def test_opening_refuses_what_is_not_a_regular_file_without_blocking(folder: Path) -> None:
    """A path that became a pipe or a device after it was listed: the open neither waits nor reads."""
    for name, what in (("pipe.png", "a named pipe"), ("null.png", "a character device")):
        with pytest.raises(sources.NotRegularFile, match=f"not a regular file but {what}"):
            _within(lambda name=name: sources.open_file(str(folder / name)), folder / "pipe.png")
        prepared = _within(lambda name=name: Preparer("digits")([Item(str(folder / name))]), folder / "pipe.png")
        assert str(prepared.outcomes[0]) == f"unreadable file: not a regular file but {what}"
    with sources.open_file(str(folder / "a.png")) as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_read_file_reads_whole_files_up_to_the_limit(tmp_path: Path) -> None:
    """The images' read: a file of exactly ``limit`` bytes whole, one byte more refused before it is read with its
    size; a pseudo file that states no size (``/proc``) read to its end, and refused once past the limit."""
    data = os.urandom(3 * sources.READ_CHUNK + 5)
    (tmp_path / "big.bin").write_bytes(data)
    assert sources.read_file(str(tmp_path / "big.bin"), len(data)) == data
    with pytest.raises(sources.FileTooLarge) as refused:
        sources.read_file(str(tmp_path / "big.bin"), len(data) - 1)
    assert refused.value.size == len(data)
    maps = Path("/proc/self/maps")
    assert maps.stat().st_size == 0
    text = sources.read_file(str(maps), 1 << 24)
    assert text.endswith(b"\n") and b"python" in text
    with pytest.raises(sources.FileTooLarge):
        sources.read_file(str(maps), 100)
