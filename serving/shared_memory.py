"""Triton's system shared memory extension: tensors in POSIX shared memory instead of the gRPC message.

A client on the same host creates a shared memory object (``shm_open``; Python's
``multiprocessing.shared_memory``, tritonclient's ``utils.shared_memory``), registers it under a region
name with ``SystemSharedMemoryRegister``, and then names the region, a byte size and an offset in an
input's or a requested output's parameters (``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``). The server maps the object once and reads inputs from it without a copy,
and writes outputs into it; a 1024-image FP32 batch then no longer crosses gRPC as 3.2 MB.

Regions belong to one server process: with ``--workers N`` the extension is off (serving/supervisor.py),
as a region registered through one worker would be unknown to the others.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from serving.preprocess import InputError

#: Where Linux keeps POSIX shared memory objects: ``shm_open("/name")`` is the file ``/dev/shm/name``.
SHM_DIR = Path("/dev/shm")
#: A POSIX shared memory name: one path component, optionally after a leading slash (never ``.``/``..``).
KEY_PATTERN = re.compile(r"/?(?!\.\.?$)[^/\x00]{1,255}")
#: Regions one server keeps mapped at once; each mapping is address space, not memory, but not endless.
MAX_REGIONS = 1024
#: The parameters that place a tensor in a region (Triton's names).
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


class RegionNotFound(LookupError):
    """No region registered under that name, or no shared memory object under that key (NOT_FOUND)."""


class RegionExists(ValueError):
    """A region is already registered under that name (ALREADY_EXISTS, as in Triton)."""


class TooManyRegions(RuntimeError):
    """MAX_REGIONS are registered (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` in the object ``key``, mapped once; ``fd``
    stays open so each use can check the object still holds the region."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    mapping: mmap.mmap

    def release(self) -> None:
        os.close(self.fd)
        try:
            self.mapping.close()
        except BufferError:
            pass  # a request still holds a view; the mapping goes with the last view


class SharedMemoryRegistry:
    """The regions of one server, by name. Only RPC handlers use it, all on the server's event loop, so it
    needs no lock."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}

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
        if len(self._regions) >= MAX_REGIONS:
            raise TooManyRegions(f"{MAX_REGIONS} shared memory regions are registered: unregister some first")
        self._regions[name] = Region(name, key, offset, byte_size, *_map(name, key, offset, byte_size))

    def unregister(self, name: str = "") -> None:
        """Forget region ``name`` ("" = all). Unknown names are not an error (Triton answers OK too). A
        mapping still read by a request in flight is unmapped when that request lets go of it."""
        for n in [name] if name else list(self._regions):
            if (region := self._regions.pop(n, None)) is not None:
                region.release()

    def status(self, name: str = "") -> list[Region]:
        """Region ``name``, or every region when ``name`` is empty."""
        if not name:
            return list(self._regions.values())
        if name not in self._regions:
            raise RegionNotFound(f"no shared memory region {name!r} is registered")
        return [self._regions[name]]

    def view(self, name: str, offset: int, byte_size: int, tensor: str) -> memoryview:
        """``byte_size`` bytes at ``offset`` in region ``name``, for the input or output ``tensor``."""
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"{tensor!r} names shared memory region {name!r}, which is not registered: "
                                 "register it with SystemSharedMemoryRegister first")
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise InputError(f"{tensor!r}: {byte_size} bytes at offset {offset} do not fit shared memory region "
                             f"{name!r} of {region.byte_size} bytes")
        # Touching a mapped page past the object's end kills the process (SIGBUS): refuse an object that was
        # shrunk since it was registered. (One shrunk between this check and the read is not caught.)
        if os.fstat(region.fd).st_size < region.offset + region.byte_size:
            raise InputError(f"shared memory region {name!r}: its object {region.key!r} was shrunk below the "
                             "registered size: register it again")
        start = region.offset + offset
        return memoryview(region.mapping)[start : start + byte_size]

    def close(self) -> None:
        self.unregister()


def _map(name: str, key: str, offset: int, byte_size: int) -> tuple[int, mmap.mmap]:
    """Open the object ``key`` and map it from its start to the region's end (mmap offsets must be
    page-aligned); the descriptor is returned open."""
    path = SHM_DIR / key.lstrip("/")
    try:
        # No links: one planted in /dev/shm would make any file the server may write a region of a client.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RegionNotFound(f"shared memory region {name!r}: no shared memory object {key!r} on the server's "
                             "host: create it (shm_open) before registering it") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"shared memory region {name!r}: {key!r} is a symbolic link: expected a shared memory "
                             "object made with shm_open") from None
        raise InputError(f"shared memory region {name!r}: cannot open {key!r}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"shared memory region {name!r}: {key!r} is not a shared memory object: expected one "
                             "made with shm_open")
        size = info.st_size
        if offset < 0 or offset + byte_size > size:
            raise InputError(f"shared memory region {name!r}: {byte_size} bytes at offset {offset} do not fit "
                             f"object {key!r} of {size} bytes")
        return fd, mmap.mmap(fd, offset + byte_size)
    except BaseException:
        os.close(fd)
        raise
