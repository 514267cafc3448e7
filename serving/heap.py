"""Keep freed memory in the server process for the next request, instead of glibc giving it back each time.

A raw ``ModelInfer`` batch of 1024 images is a 3.2 MB message, and the server holds several copies of it at
once (gRPC's receive buffer, the message's bytes, protobuf's parse, the tensor). glibc's malloc by default
serves blocks that large from the heap only after it has seen one freed (its "dynamic mmap threshold"), and
then gives the top of the heap back to the kernel whenever more than twice that block is free there: after
every such request. The next request faults the same memory in again, 4 KiB page by 4 KiB page, each one
zeroed by the kernel. Measured on 2 cores with a bare ``grpc.aio`` server parsing the request into
``ModelInferRequest``: 5.6-5.8 ms per 3.2 MB call with glibc's defaults, 2.5-2.8 ms with the settings below;
the parse alone 1.3-1.6 ms against 0.2 ms (docs/performance.md).

The settings are glibc's own (``mallopt``), the same an operator could give as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_``: blocks up to 32 MiB (glibc's largest allowed threshold) always come from the
heap, and up to 256 MiB of free heap (about the copies of one largest request: messages are at most 64 MiB
by default) stay with the process. The cost is that the process keeps the memory its busiest moment
needed, as servers with their own allocators (jemalloc, tcmalloc) do. An operator's own glibc malloc
variables win: the process then keeps them. Other C libraries (musl) have no such settings, and nothing is
changed there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("coursezoo.heap")

#: mallopt() parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more than this on 64-bit hosts
TRIM_THRESHOLD = 256 << 20
#: glibc's environment variables for the same settings: when an operator set one, theirs stand
OPERATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; True when they took effect, False where they do not apply
    (not glibc, or the operator's own malloc settings in the environment)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    if any(v in os.environ for v in OPERATOR_VARIABLES) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        log.info("malloc settings left as the environment gives them")
        return False
    mallopt = ctypes.CDLL(None).mallopt  # this process's own C library
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not applied:  # glibc returns 0 for a value it refuses; what did take effect is still glibc's own kind
        log.warning("glibc refused the malloc settings; large requests fault their memory in anew each time")
    return applied
