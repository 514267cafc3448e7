"""Where inputs live: local paths, or ``s3://`` and ``gs://`` URIs read through pyarrow file systems.

One place answers "does this INPUT exist, which files are under it, open this file" for both, so
discovery, item reading and decoding (in worker processes and Ray tasks too) treat a bucket like a
folder. A URI's files keep their URIs as ids (``s3://bucket/scans/00001.png``). Each bucket's file
system is opened once per process (``pyarrow.fs.FileSystem.from_uri``, configured by the usual
``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for an S3-compatible store, or Google's defaults); the Ray
engine ships the driver's to its tasks (pyarrow file systems pickle, without their credentials).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from pyarrow import fs as pafs

#: URI schemes read through pyarrow; anything else is a local path
SCHEMES = ("s3://", "gs://", "gcs://")

_opened: dict[str, pafs.FileSystem] = {}  # "s3://bucket" -> its file system, in this process


def is_uri(path: str) -> bool:
    return path.startswith(SCHEMES)


class NotRegularFile(OSError):
    """A local path that is a named pipe, a device, a socket or a folder, which ``open_file`` refuses."""


def special(mode: int) -> str | None:
    """What a file that is not a regular file is ("a named pipe"...), from its ``st_mode``; None for a regular file.

    Only regular files are inputs: opening a named pipe waits for a writer (forever, in a worker that Ctrl-C
    cannot reach), a device such as ``/dev/zero`` reads without end, and opening some devices acts on them.
    """
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "a special file")


def open_file(path: str) -> BinaryIO:
    """A local file or a URI's object, as a buffered binary file (seekable; lines iterate).

    Discovery already turns what is not a regular file into an error row without opening it; this check
    covers a path replaced after it was listed. The file is opened without blocking (a named pipe's open
    would wait for a writer) and checked before anything is read; raises ``NotRegularFile`` if it is not one.
    """
    if not is_uri(path):
        fd, _ = _open_regular(path)
        try:
            os.set_blocking(fd, True)  # the flag was for the open: reads stay ordinary blocking reads
            return open(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
    filesystem, key = _resolve(path)
    return io.BufferedReader(filesystem.open_input_file(key))  # type: ignore[arg-type]


#: the least ``read_file`` asks of one read
READ_CHUNK = 1 << 16


class FileTooLarge(Exception):
    """A file over the size ``read_file`` was given: ``size`` bytes, or more (one that grew while read)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size:,} bytes")
        self.size = size


def read_file(path: str, limit: int) -> bytes:
    """A whole file or object of at most ``limit`` bytes, checked before it is read (``FileTooLarge``).

    An image is read whole, so a local one goes straight through system calls: open, fstat, read to the
    end, close, ~11 µs for an MNIST PNG where a buffered file object (``open_file``, which adds a fcntl
    pair, a second fstat and two seeks) took ~28 on a 2-core host, a sixth of all the work per image.
    ``O_NONBLOCK`` stays set: reads of a regular file never block anyway, and nothing else is read.
    """
    if is_uri(path):
        with open_file(path) as f:
            size = f.seek(0, os.SEEK_END)
            if size > limit:
                raise FileTooLarge(size)
            f.seek(0)
            return f.read()
    fd, size = _open_regular(path)
    try:
        if size > limit:
            raise FileTooLarge(size)
        chunks, total = [], 0
        # the rest and one byte more: a read and the read that finds the end (a pseudo file that tells no size:
        # 64 KiB at a time)
        while chunk := os.read(fd, max(size - total + 1, READ_CHUNK)):
            total += len(chunk)
            if total > limit:  # the file grew since fstat, or it is a pseudo file that tells no size
                raise FileTooLarge(total)
            chunks.append(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]
    finally:
        os.close(fd)


def _open_regular(path: str) -> tuple[int, int]:
    """A local regular file's descriptor (opened without blocking: a named pipe's open would wait for a
    writer) and its size; raises ``NotRegularFile`` for anything else, checked before a byte is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        what = special(st.st_mode)
        if what:
            raise NotRegularFile(f"not a regular file but {what}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def exists(uri: str) -> bool:
    """Whether the URI names an object or a prefix holding some."""
    filesystem, key = _resolve(uri)
    return filesystem.get_file_info(key).type != _pafs().FileType.NotFound


def is_dir(uri: str) -> bool:
    filesystem, key = _resolve(uri)
    return filesystem.get_file_info(key).type == _pafs().FileType.Directory


def list_files(uri: str, recursive: bool) -> Iterator[str | None]:
    """URIs of the objects under a prefix, ordered as a folder walk is; ``None`` marks a sub-prefix left
    out without ``recursive``. Hidden entries (a ``.name`` anywhere below ``uri``) are skipped. Raises
    ``OSError`` when the prefix cannot be listed."""
    filesystem, key = _resolve(uri)
    scheme = uri.split("://", 1)[0]
    entries = []
    for info in filesystem.get_file_info(_pafs().FileSelector(key, recursive=recursive)):
        parts = info.path[len(key):].strip("/").split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if info.type == _pafs().FileType.Directory:
            if not recursive:
                entries.append((parts, None))
        else:
            entries.append((parts, f"{scheme}://{info.path}"))
    yield from (entry for _, entry in sorted(entries, key=lambda e: e[0]))  # per folder by name, as _walk


def opened() -> dict[str, pafs.FileSystem]:
    """The file systems this process opened, to hand to Ray tasks (which may lack the driver's settings)."""
    return dict(_opened)


def adopt(filesystems: Mapping[str, pafs.FileSystem]) -> None:
    """Use the driver's file systems (its endpoint and options) for the buckets they serve."""
    for root, filesystem in filesystems.items():
        _opened.setdefault(root, filesystem)


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The bucket's file system (opened on first use) and the object key or prefix as pyarrow names it."""
    scheme, rest = uri.split("://", 1)
    key = rest.rstrip("/")
    root = f"{scheme}://{key.split('/', 1)[0]}"
    if root not in _opened:
        try:
            _opened[root] = _pafs().FileSystem.from_uri(root)[0]
        except ValueError as e:  # pyarrow.ArrowInvalid: a malformed URI, or a pyarrow built without it
            raise OSError(f"cannot open {root}: {e}") from e
    return _opened[root], key


def _pafs() -> ModuleType:
    """``pyarrow.fs``, imported for the first URI only: local inputs need no pyarrow, and the server image,
    which also runs the compose batch job, has none (it comes with the ``ray`` extra)."""
    try:
        from pyarrow import fs
    except ImportError as e:
        raise OSError(f"reading {'/'.join(SCHEMES)} URIs needs pyarrow, which is not installed here "
                      "(pip install 'coursezoo[ray]')") from e
    return fs
