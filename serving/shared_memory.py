"""Triton's system shared memory extension: tensors in POSIX shared memory instead of the gRPC message.

A client on the same host creates a shared memory object (``shm_open``; Python's
``multiprocessing.shared_memory``, tritonclient's ``utils.shared_memory``), registers it under a region
name with ``SystemSharedMemoryRegister``, and then names the region, a byte size and an offset in an
input's or a requested output's parameters (``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``). The server opens the object once, reads inputs from it and writes outputs into
it; a 1024-image FP32 batch then no longer crosses gRPC as 3.2 MB.

Reads and writes go through the object's descriptor (``preadv``/``pwrite``), never through a mapping. A
mapped page past the object's end is SIGBUS, and a client that shrinks its object while a request reads
or writes it (between the size check and the access, or while the request waits in the queue and runs, if
inputs were read in place) killed the server; a read through the descriptor comes up short instead, and
is refused. Triton maps its regions, and the same client kills it. The price is one copy of each input.

Regions belong to one server process: with ``--workers N`` the extension is off (serving/supervisor.py),
as a region registered through one worker would be unknown to the others.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.preprocess import InputError, InputTooLarge

#: Where Linux keeps POSIX shared memory objects: ``shm_open("/name")`` is the file ``/dev/shm/name``.
SHM_DIR = Path("/dev/shm")
#: A POSIX shared memory name: one path component, optionally after a leading slash (never ``.``/``..``).
KEY_PATTERN = re.compile(r"/?(?!\.\.?$)[^/\x00]{1,255}")
#: Regions one server holds at once, each an open descriptor; fewer when the process may open few files (a quarter
#: of its soft limit), so that regions cannot take the descriptors that connections and model files need.
MAX_REGIONS = 1024
#: The parameters that place a tensor in a region (Triton's names).
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


class RegionNotFound(LookupError):
    """No region registered under that name, or no shared memory object under that key (NOT_FOUND)."""


class RegionExists(ValueError):
    """A region is already registered under that name (ALREADY_EXISTS, as in Triton)."""


class TooManyRegions(RuntimeError):
    """The server holds as many regions as it may, or is out of file descriptors (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` in the object ``key``, open as ``fd``.

    A request in flight holds the regions its outputs go to (``hold``), so an unregister meanwhile takes the
    name away at once but closes the descriptor only when the last request has written (as Triton defers it):
    the request still answers into the region it was given."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    _holders: int = field(default=0, repr=False)
    _unregistered: bool = field(default=False, repr=False)

    def span(self, offset: int, byte_size: int, tensor: str) -> int:
        """Where ``byte_size`` bytes at ``offset`` in the region start in the object; InputError unless they fit
        the region, and the object still holds the region (a client may shrink its object at any time)."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InputError(f"{tensor!r}: {byte_size} bytes at offset {offset} do not fit shared memory region "
                             f"{self.name!r} of {self.byte_size} bytes")
        if os.fstat(self.fd).st_size < self.offset + self.byte_size:
            raise self._shrunk()
        return self.offset + offset

    def read(self, offset: int, byte_size: int, tensor: str) -> np.ndarray:
        """A copy of ``byte_size`` bytes at ``offset`` (uint8): a short read means the object shrank meanwhile."""
        start, data = self.span(offset, byte_size, tensor), np.empty(byte_size, dtype=np.uint8)
        done = 0
        while done < byte_size:  # one read returns at most ~2 GiB
            got = os.preadv(self.fd, [data[done:]], start + done)
            if got == 0:
                raise self._shrunk()
            done += got
        return data

    def write(self, offset: int, data: bytes, tensor: str) -> None:
        """Put ``data`` at ``offset``. A write past an object shrunk meanwhile grows it again: no harm done here."""
        start, view = self.span(offset, len(data), tensor), memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, start)
            view, start = view[written:], start + written

    def hold(self) -> Region:
        self._holders += 1
        return self

    def let_go(self) -> None:
        self._holders -= 1
        self._close_when_free()

    def unregister(self) -> None:
        self._unregistered = True
        self._close_when_free()

    def _close_when_free(self) -> None:
        if self._unregistered and self._holders == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _shrunk(self) -> InputError:
        return InputError(f"shared memory region {self.name!r}: its object {self.key!r} was shrunk below the "
                          "registered size: register it again")


class SharedMemoryRegistry:
    """The regions of one server, by name. Only RPC handlers use it, all on the server's event loop, so it
    needs no lock."""

    def __init__(self, max_read_bytes: int) -> None:
        """``max_read_bytes``: the most a request's inputs may be together, as in a message (``--max-message-mb``;
        ``check_reads``)."""
        self._regions: dict[str, Region] = {}
        self.max_regions = min(MAX_REGIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self.max_read_bytes = max_read_bytes

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InputError("a shared memory region needs a name: expected a non-empty name")
        if not KEY_PATTERN.fullmatch(key):
            raise InputError(f"shared memory key {key!r}: expected a POSIX shared memory name such as "
                             "'/input0' (one path component, as shm_open takes it)")
        if byte_size <= 0:
            raise InputError(f"shared memory region {name!r}: byte_size {byte_size}, expected > 0")
        if name in self._regions:
            raise RegionExists(f"shared memory region {name!r} is already registered: unregister it first")
        if len(self._regions) >= self.max_regions:
            raise TooManyRegions(f"{len(self._regions)} shared memory regions are registered, as many as this server "
                                 "holds: unregister some first")
        self._regions[name] = Region(name, key, offset, byte_size, _open(name, key, offset, byte_size))

    def unregister(self, name: str = "") -> None:
        """Forget region ``name`` ("" = all). Unknown names are not an error (Triton answers OK too). A
        region a request in flight writes to is closed when that request is done with it."""
        for n in [name] if name else list(self._regions):
            if (region := self._regions.pop(n, None)) is not None:
                region.unregister()

    def status(self, name: str = "") -> list[Region]:
        """Region ``name``, or every region when ``name`` is empty."""
        if not name:
            return list(self._regions.values())
        if name not in self._regions:
            raise RegionNotFound(f"no shared memory region {name!r} is registered")
        return [self._regions[name]]

    def check_reads(self, reads: list[tuple[str, int, str]], in_message: int = 0) -> None:
        """Before a request's inputs are read: each ``(region name, byte size, tensor)`` names a registered
        region (NOT_FOUND), and together with the ``in_message`` bytes of its other inputs they are at most
        ``max_read_bytes`` (RESOURCE_EXHAUSTED), as a message's inputs are. A request naming 2 GB of a sparse
        object had the server allocate and read it (5 s in which the event loop served no one) before its size
        was found wrong; 60 inputs of the limit each, 60 times it; inputs in the message beside them, twice it."""
        for name, _, tensor in reads:
            self.region(name, tensor)
        shared = sum(byte_size for _, byte_size, _ in reads)
        if shared + in_message > self.max_read_bytes:
            beside = f" and {in_message} in the message" if in_message else ""
            raise InputTooLarge(f"{shared} bytes of inputs in shared memory{beside}: at most {self.max_read_bytes} "
                                "are read for one request, as in a message (--max-message-mb)")

    def region(self, name: str, tensor: str) -> Region:
        """The region registered as ``name``, which the input or output ``tensor`` names."""
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"{tensor!r} names shared memory region {name!r}, which is not registered: "
                                 "register it with SystemSharedMemoryRegister first")
        return region

    def close(self) -> None:
        self.unregister()


def _open(name: str, key: str, offset: int, byte_size: int) -> int:
    """Open the object ``key``, checked to be a shared memory object that holds the region."""
    path = SHM_DIR / key.lstrip("/")
    try:
        # No links: one planted in /dev/shm would make any file the server may write a region of a client.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RegionNotFound(f"shared memory region {name!r}: no shared memory object {key!r} on the server's "
                             "host: create it (shm_open) before registering it") from None
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise TooManyRegions(f"shared memory region {name!r}: the server is out of file descriptors: unregister "
                                 "regions first") from None
        if e.errno == errno.ELOOP:
            raise InputError(f"shared memory region {name!r}: {key!r} is a symbolic link: expected a shared memory "
                             "object made with shm_open") from None
        raise InputError(f"shared memory region {name!r}: cannot open {key!r}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"shared memory region {name!r}: {key!r} is not a shared memory object: expected one "
                             "made with shm_open")
        if offset < 0 or offset + byte_size > info.st_size:
            raise InputError(f"shared memory region {name!r}: {byte_size} bytes at offset {offset} do not fit "
                             f"object {key!r} of {info.st_size} bytes")
        return fd
    except BaseException:
        os.close(fd)
        raise
