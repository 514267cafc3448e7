"""Where the server decodes request images: on the event loop, in a thread, or in a pool of processes.

Decoding a digit is a PNG decoder (libspng for plain greyscale PNGs, else Pillow) plus a few numpy calls,
~12-20 µs for an MNIST-style PNG and ~40 µs for other files, mostly Python work that holds the GIL. One
image of a digit's size decodes faster than a hand-over to any other thread, so it stays on the event loop
(a large one, a photo say, goes to a thread: it takes milliseconds, during which the loop would serve no
one else). A batch decoded
in a thread competes with the event loop (gRPC, batching, replies) for that one GIL; in worker processes
a request's images decode on every core at once while the server process keeps serving: on 2 cores,
batches of 256 PNGs went from ~8,500 to ~18,000 images/s with Pillow decoding every file, and since
libspng took the MNIST-style ones, from ~25,000 to ~27,500 (docs/performance.md).
Requests of fewer than ``POOL_MIN_IMAGES`` images are not worth the inter-process hand-over (~0.3 ms)
and decode in a thread.

The decoding rules themselves are ``serving.preprocess.decode_digits``; this module only decides where
they run (the workers are ``serving.workers`` pools).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np

from serving.preprocess import InputError, decode_digits, header_pixels, png_pixels
from serving.workers import cores, end_pool, spawn_pool

log = logging.getLogger("coursezoo.decoding")
T = TypeVar("T")

#: Requests with at least this many images decode in the process pool.
POOL_MIN_IMAGES = 16
#: ``processes=-1`` (auto) uses one worker per core, at most this many.
MAX_AUTO_PROCESSES = 8
#: Threads decoding the requests that are not worth the pool (and all of them without one): one per core, at
#: most this many. The decoder's own, not the event loop's default executor, whose threads run the models: six
#: requests of 15 2000x2000 PNGs decoding there took another caller's model run (256 digits, ~19 ms alone) to
#: 94-127 ms (the reviewer saw 1.3 s); in 2 threads of its own, 41-46 ms, as with those images in the decoding
#: processes (37-42 ms), and the six requests took no longer (1.44-1.47 s).
MAX_DECODE_THREADS = 4
#: A lone image of at most this many pixels decodes on the event loop: 512x512 takes ~0.7-0.8 ms here,
#: about the batcher's default inline budget (``--inline-run-ms``); a 28x28 digit ~15-50 µs.
INLINE_MAX_PIXELS = 512 * 512
#: ...and of at most this many bytes, as decoding costs per byte too, whatever the header says: a 28x28 PNG
#: carrying a 60 MB ancillary chunk held every caller ~240 ms. A digit's PNG is ~250 bytes, a 512x512 drawing's
#: 1-5 KB; 64 KiB cost at most ~0.9 ms (5,000 empty chunks; 0.01 ms as one chunk), the pixel bound's own cost,
#: while larger files (a 512x512 photo: 135-243 KB, ~3 ms) go to a thread.
INLINE_MAX_BYTES = 64 << 10
#: A request is split over the workers in even parts of at least this many images...
MIN_PART_IMAGES = 32
#: ...more of them where needed to keep each within this many pixels (``_parts``); the pool holds only
#: ``processes`` parts at once (``ImageDecoder._part``), so a call that goes away (cancelled, its deadline passed)
#: leaves at most that many to finish. A 1024-image call of 600x600 PNGs, cancelled after 0.2 s, went on taking
#: 2.85 s of the decoders' CPU in one part per process, and another caller's 32 digits 1.23 s instead of 3 ms;
#: now 0.52 s and 73 ms. By pixels, not images: parts of 64 images made 1024-digit calls ~20% slower (28.5 -> 35
#: ms); digits now still go in one part per process (28-30 ms, 600x600 PNGs unchanged too). A PNG's size is in
#: its header (~0.2 ms for 1024 files, on the event loop); any other file counts as INLINE_MAX_PIXELS, as Pillow
#: would take 10-40 µs of the loop for each to tell.
MAX_PART_PIXELS = 64 * INLINE_MAX_PIXELS


class DecodersUnavailable(RuntimeError):
    """The decoding processes died twice in one request (maps to UNAVAILABLE: a client retries it later)."""


class ImageDecoder:
    """Decodes a request's images into the model's input tensor, choosing where by their number."""

    def __init__(self, processes: int, max_image_pixels: int, on_restart: Callable[[], None] = lambda: None) -> None:
        """``on_restart`` is told each time the processes are replaced after one died (a metric: a crash loop,
        an image that kills its decoder every time, shows there, not only in the log)."""
        self.processes = min(MAX_AUTO_PROCESSES, cores()) if processes < 0 else processes
        self.max_image_pixels = max_image_pixels
        self._on_restart = on_restart
        self._pool: ProcessPoolExecutor | None = None
        self._threads = ThreadPoolExecutor(min(MAX_DECODE_THREADS, cores()), thread_name_prefix="coursezoo-decode")
        self._places: asyncio.Semaphore | None = None
        self._places_loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the workers now, so that the first big request does not wait for them (~0.5 s each)."""
        if self.processes > 0:
            self._pool = spawn_pool(self.processes, self.max_image_pixels)

    def close(self) -> None:
        """Stop the decoding threads and processes and wait for them to exit. Waiting matters in a ``--workers``
        worker process: multiprocessing ends one by closing its queues before it joins its children, so a
        decoding process whose stop message was still queued would wait forever, and the worker with it."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    async def decode(self, images: Sequence[bytes], prep: Mapping[str, Any]) -> np.ndarray:
        """Image files -> float32 [n, 1, height, width]; InputError naming the first image that fails."""
        if len(images) == 1 and _inline(images[0]):
            digits, errors = decode_digits(images, prep)
        elif self._pool is None or len(images) < POOL_MIN_IMAGES:
            loop = asyncio.get_running_loop()
            digits, errors = await loop.run_in_executor(self._threads, decode_digits, images, prep)
        else:
            digits, errors = await self._in_pool(images, prep)
        if errors:
            first = min(errors)
            raise type(errors[first])(f"image {first}: {errors[first]}") from errors[first]
        return digits

    async def _in_pool(self, images: Sequence[bytes], prep: Mapping[str, Any]) \
            -> tuple[np.ndarray, dict[int, InputError]]:
        """Split over the workers; a pool whose worker died (killed for memory, say) is replaced and the
        request tried once more in the new one."""
        parts = _parts(images, self.processes)
        for attempt in (1, 2):
            pool = self._pool
            assert pool is not None
            try:
                decoded = await _all([self._part(pool, images[part], prep) for part in parts])
                break
            except BrokenProcessPool as e:
                if self._pool is pool:  # the first request to notice replaces it
                    log.warning("an image decoding process died (the coursezoo.workers line says which, and how); "
                                "starting new ones", extra={"request_attempt": attempt})
                    _end(pool)
                    self._pool = spawn_pool(self.processes, self.max_image_pixels)
                    self._on_restart()
                if attempt == 2:  # INTERNAL, with a traceback logged, was not retried by clients
                    raise DecodersUnavailable("the image decoding processes died twice while decoding this "
                                              "request's images; retry it") from e
        errors = {part.start + i: e for part, (_, part_errors) in zip(parts, decoded, strict=True)
                  for i, e in part_errors.items()}
        return np.concatenate([digits for digits, _ in decoded]), errors

    async def _part(self, pool: ProcessPoolExecutor, images: Sequence[bytes], prep: Mapping[str, Any]) \
            -> tuple[np.ndarray, dict[int, InputError]]:
        """``decode_digits`` in the pool once one of its places is free. A part waits for its place here, where a
        call that goes away drops it; inside the pool it would be decoded all the same (see ``MAX_PART_PIXELS``).

        The future inside the pool is never cancelled: a call that goes away leaves its part to finish and the
        result is dropped (``asyncio.shield``). ``run_in_executor`` would cancel it, and on Python 3.11 a worker
        dying while the pool holds a cancelled future kills the pool's manager thread (``set_exception`` on it
        raises InvalidStateError, CPython gh-107219, fixed in 3.12) before it fails the other futures and ends the
        other workers: every request in the pool then waited forever, and the leftover worker kept the server
        from exiting."""
        places = self._free_places()
        await places.acquire()
        try:
            decoding = asyncio.wrap_future(pool.submit(decode_digits, images, prep))
        except BaseException:
            places.release()
            raise
        decoding.add_done_callback(functools.partial(_done, places))  # when the worker is done, not the call
        return await asyncio.shield(decoding)

    def _free_places(self) -> asyncio.Semaphore:
        """The pool's ``processes`` places, counted on the running event loop (a semaphore serves one loop; the
        tests run one per ``asyncio.run``)."""
        loop = asyncio.get_running_loop()
        if self._places is None or self._places_loop is not loop:
            self._places, self._places_loop = asyncio.Semaphore(self.processes), loop
        return self._places


def _done(places: asyncio.Semaphore, decoding: asyncio.Future) -> None:
    """A part's place is free again. Its error is taken here too: when its call has gone away (cancelled, or a
    sibling part failed) no one else reads it, and asyncio logged each such error with a traceback."""
    places.release()
    if not decoding.cancelled():
        decoding.exception()


def _inline(data: bytes) -> bool:
    """Small enough, in bytes and in pixels by its header, to decode on the event loop; bytes first, which
    spares a large file Pillow's header parse there."""
    return len(data) <= INLINE_MAX_BYTES and header_pixels(data) <= INLINE_MAX_PIXELS


def _parts(images: Sequence[bytes], processes: int) -> list[slice]:
    """Where a request is cut: into parts of even pixel counts, as many as the processes (parts of at least
    MIN_PART_IMAGES images), or a multiple of that as many as keep each within MAX_PART_PIXELS; even, so that
    the workers finish together. An image weighs at most one part: a header is the client's word, and 16 PNG
    headers claiming 2^24 x 2^24 pixels made millions of parts (seconds of the event loop, gigabytes); such an
    image is refused by its decoder anyway."""
    sizes = np.cumsum([min(png_pixels(data) or INLINE_MAX_PIXELS, MAX_PART_PIXELS) for data in images])
    spread = max(1, min(processes, len(images) // MIN_PART_IMAGES))
    count = spread * math.ceil(sizes[-1] / (spread * MAX_PART_PIXELS))
    ends = np.searchsorted(sizes, sizes[-1] * np.arange(1, count) / count) + 1
    bounds = [0, *np.unique(ends[ends < len(images)]).tolist(), len(images)]
    return [slice(start, end) for start, end in itertools.pairwise(bounds)]


async def _all(parts: list[Coroutine[Any, Any, T]]) -> list[T]:
    """``asyncio.gather``, and when one part fails the others are cancelled: those still waiting for a place in
    a broken pool would take it from the retry, then fail with no one to hear it."""
    tasks = [asyncio.ensure_future(part) for part in parts]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _end(pool: ProcessPoolExecutor) -> None:
    """End a broken pool's workers (``serving.workers.end_pool``: its manager thread may have died, see
    ``ImageDecoder._part``), then shut it down; it has failed every future it held already."""
    end_pool(pool)
    pool.shutdown(wait=False)
