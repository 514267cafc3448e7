"""Per-model dynamic batching: concurrent requests share one model execution.

A request is a dict of arrays with a leading batch axis of n >= 1 items. Requests wait in a bounded
queue; a worker task takes the oldest, adds queued requests of the same non-batch shapes and dtypes up
to ``max_batch_size`` items, waiting at most ``max_delay_ms`` for more, runs the batch in a thread (so the
event loop keeps serving) and hands each request its own rows back, in order. One execution per model
is in flight at a time: while it runs the next batch fills up, which is where batching pays.

A fixed delay costs a lone caller its whole length, and under load it is what pays: on a CPU shared with
the clients, replies that leave together wake a client once for several. An adaptive delay
(``adaptive``, the server's default) is like a preferred batch size that follows the load: a batch
waits, up to the delay, only until it holds as many requests as the last batch did, and once every
``PROBE_S`` one batch waits the whole delay to see how many come. A lone caller's batches hold one
request, so it waits only in a probe; 64 callers' hold several, and their batches wait for about as
many. ``adaptive=False`` always waits the delay out, as Triton's ``max_queue_delay_microseconds`` does.

``max_batch_size`` bounds what is merged; a client batch runs in chunks of ``chunk_size`` items (at least,
and by default, ``max_batch_size``), and a chunk larger than ``max_batch_size`` runs alone. The server chunks at its
request limit: one large request is one execution, which measured best on both devices (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.preprocess import InputError, InputTooLarge
from serving.statistics import InferenceStatistics

log = logging.getLogger("coursezoo.batching")

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Mapping[str, np.ndarray]]

#: With an adaptive delay, how often one batch waits the whole delay to learn how many requests come in it.
PROBE_S = 1.0
#: With an adaptive delay, the fewest requests worth waiting for: on 2 cores shared with the clients,
#: waiting for a second or third caller cost throughput (docs/performance.md), for 8 or more it paid.
MIN_EXPECTED = 4


class QueueFull(RuntimeError):
    """The model's queue is too full for this request now; later it will fit (maps to UNAVAILABLE, which
    clients retry, as Triton answers "exceeds maximum queue size")."""


class BatcherClosed(RuntimeError):
    """``submit`` after ``close``: the model is being unloaded or the server is stopping."""


#: The queue wait of a request run at once in its caller's task.
NO_WAIT = (0.0,)


class BatchObserver(Protocol):
    """Metrics hooks, called on the event loop: after every model execution, and whenever items enter or
    leave the queue (as changes, so that the batchers of a version and of the re-export replacing it add up in
    one gauge), each for the model's ``version`` the batcher runs."""

    def observe_batch(self, model: str, version: str, size: int, seconds: float, waits: Sequence[float]) -> None:
        """One execution of ``size`` items, which took ``seconds`` from its inputs' assembly to its outputs, and the
        seconds each of its requests waited in the queue before it (0 for a request run at once in its caller's
        task; none for the runs again of a merged batch's requests one by one, whose waits were told with it)."""

    def queue_changed(self, model: str, version: str, items: int) -> None: ...


@dataclass(eq=False)
class _Request:
    inputs: Arrays
    n: int
    key: tuple
    future: asyncio.Future[Arrays] = field(repr=False)
    queued: bool = True  # counted in queue_depth: waiting, neither taken into a batch nor dropped
    waited: bool = False  # submitted with wait_for_room (a stream's): counted in the streams' share too
    arrived_ns: int = field(default_factory=time.perf_counter_ns)


class DynamicBatcher:
    """Coalesces ``submit`` calls into ``run`` calls; see the module docstring.

    ``max_batch_size <= 1`` turns coalescing off. ``max_delay_ms == 0`` never waits for more requests but
    still joins those already queued (as Triton does), which costs no latency. ``inline_budget_ms == 0``
    runs every batch in a thread. ``inline_batches=False`` keeps the batches the worker forms (requests that
    arrived while another ran) in a thread whatever their size, and lets only a lone request on an idle
    model run inline: for a GPU session, whose run is mostly waiting on the device, time the event loop
    spends better receiving the next requests (measured on an H100, docs/performance.md). ``adaptive``
    waits out ``max_delay_ms`` only until a batch holds as many requests as the last one (the module
    docstring).
    """

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue_items: int,
        name: str = "model",
        version: str = "",
        observer: BatchObserver | None = None,
        executor: Executor | None = None,
        inline_budget_ms: float = 0.0,
        inline_batches: bool = True,
        chunk_size: int | None = None,
        adaptive: bool = False,
    ):
        self.name = name
        self.version = version
        self.max_batch_size = max(1, max_batch_size)
        self.chunk_size = max(self.max_batch_size, chunk_size or 0)
        self.max_delay_s = max(0.0, max_delay_ms) / 1000
        self.max_queue_items = max_queue_items
        self._run = run
        self._observer = observer
        self.statistics = InferenceStatistics()  # its executions; the served model adds its requests
        self._executor = executor  # None: the event loop's default thread pool
        self.inline_budget_s = max(0.0, inline_budget_ms) / 1000
        self.inline_batches = inline_batches
        self.adaptive = adaptive
        self._expected = 1  # requests the last batch held: with an adaptive delay, what a batch waits for
        # time.monotonic() of the next batch that waits the whole delay: a new model serves its first
        # second without waiting, and probes from then on
        self._next_probe = time.monotonic() + PROBE_S
        # Measured seconds per item, smoothed, by size class (``_size_class``): per-item cost falls as
        # batches grow, so one figure for all sizes would mislead both ends; and an item of a sequence model
        # costs with its length, so a long one must not run inline on the strength of short ones.
        self._seconds_per_item: dict[tuple[int, int], float] = {}
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._waited_items = 0  # of them, those of requests that waited for room (streams')
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()  # set whenever items leave the queue, for submits waiting for room
        self._room_turn = asyncio.Lock()  # submits waiting for room take it in arrival order (a FIFO lock)
        self._reserved = 0  # items kept from calls that do not wait: the room the first waiting request needs
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._running = False  # a batch is executing (in a thread, or on the loop)
        self._collecting = False  # the worker is waiting for requests to join a batch

    @property
    def queue_depth(self) -> int:
        """Items waiting to run (a gauge for metrics)."""
        return self._queued_items

    async def submit(self, inputs: Mapping[str, np.ndarray], *, wait_for_room: bool = False) -> Arrays:
        """Run ``inputs`` (n >= 1 items along axis 0) as part of some batch; return its n rows of outputs.

        Raises QueueFull when the queue cannot take n more items now (``wait_for_room``: waits until it
        can, for callers that are flow-controlled anyway, such as a stream), InputTooLarge when it never
        could, BatcherClosed after close(), and whatever ``run`` raised for the batch this request was part of.

        Requests that wait for room hold at most half of the queue between them (one alone may hold more, to
        fit): one stream refilled the queue the moment room appeared, and every unary call to the model failed
        UNAVAILABLE for as long as it streamed. They take room in the order they came, so a large one is not
        passed over for ever by smaller ones that fit sooner. The first of them keeps the room it needs from calls
        that do not wait: those retried into every batch's worth of room as it freed, and a stream request of
        more than a batch never got in (0 in 5 s against 24 callers of 64 items).
        """
        n = _batch_size(inputs)
        if n > self.max_queue_items:
            raise InputTooLarge(f"{n} items in one request: model {self.name}'s queue holds at most "
                                f"{self.max_queue_items}; send fewer per request")
        if wait_for_room:
            async with self._room_turn:
                try:
                    while not self._closing and not self._room_for_waiting(n):
                        self._room.clear()
                        await self._room.wait()
                finally:
                    self._reserved = 0
        if self._closing:
            raise BatcherClosed(f"model {self.name} is shutting down")
        kept = 0 if wait_for_room else self._reserved
        if self._queued_items + n + kept > self.max_queue_items:
            raise QueueFull(
                f"model {self.name}: {self._queued_items} items are queued"
                f"{f' and {kept} kept for a stream' if kept else ''}, and {n} more do not fit "
                f"(limit {self.max_queue_items}); retry later or send fewer items"
            )
        if self._idle_for(n):
            size_class = _size_class(inputs, n)
            if self._runs_inline(size_class, n):
                return self._run_now(inputs, n, size_class)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")
        chunks = [self._enqueue({k: v[i : i + self.chunk_size] for k, v in inputs.items()}, waited=wait_for_room)
                  for i in range(0, n, self.chunk_size)]
        if len(chunks) == 1:
            return await chunks[0]
        parts = await asyncio.gather(*chunks)  # cancelling submit cancels the chunks not yet run
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _room_for_waiting(self, n: int) -> bool:
        """Whether the first request that waits for room fits now: in the waiting requests' half of the queue (or
        no other waiting request is queued), and in the queue. Within its half, it keeps the room it needs from
        calls that do not wait until it fits."""
        within_share = self._waited_items == 0 or self._waited_items + n <= self.max_queue_items // 2
        self._reserved = n if within_share else 0
        return within_share and self._queued_items + n <= self.max_queue_items

    def _idle_for(self, n: int) -> bool:
        """Whether ``n`` items may run at once in the caller's task, if the run fits the inline budget: nothing
        queued, forming or running, and no batching delay to wait out. That is the batch the worker would
        form, without the hand-over to it and back (two turns of the event loop)."""
        return (not self._queue and not self._running and not self._collecting and n <= self.chunk_size
                and not self._waits(1))

    def _waits(self, requests: int) -> bool:
        """Whether a batch of ``requests`` would wait for more: a delay is set and, if it adapts, the last
        batch held more requests (at least ``MIN_EXPECTED``) or a probe is due."""
        return self.max_delay_s > 0 and (not self.adaptive or self._expects_more(requests) or self._probe_due())

    def _expects_more(self, requests: int) -> bool:
        """Whether the last batch held more than ``requests`` requests, and enough to be worth waiting for."""
        return MIN_EXPECTED <= self._expected and requests < self._expected

    def _probe_due(self) -> bool:
        return time.monotonic() >= self._next_probe

    def _run_now(self, inputs: Mapping[str, np.ndarray], n: int, size_class: tuple[int, int]) -> Arrays:
        self._running = True
        start = time.perf_counter_ns()
        try:
            outputs, infer_ns = self._timed_run(dict(inputs), n, size_class)
        finally:
            self._running = False
            self._observe(n, start, NO_WAIT)
        _check_rows(outputs, n)
        self.statistics.executed(n, 1, 0, 0, infer_ns, 0)
        return dict(outputs)

    async def close(self) -> None:
        """Refuse new requests, run the queued ones, then stop the worker. The queued requests are run even when
        the caller of ``close`` goes away (an unload whose client gave up): their own callers still wait."""
        self._closing = True
        self._arrived.set()
        self._room.set()
        if self._worker is not None:
            await asyncio.shield(self._worker)

    def _enqueue(self, inputs: Arrays, *, waited: bool) -> asyncio.Future[Arrays]:
        n = len(next(iter(inputs.values())))  # submit checked that all tensors agree
        key = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items()))
        request = _Request(inputs, n, key, asyncio.get_running_loop().create_future(), waited=waited)
        request.future.add_done_callback(lambda _: self._forget(request))
        self._queue.append(request)
        self._queued_items += n
        self._waited_items += n if waited else 0
        self._notify("queue_changed", n)
        self._arrived.set()
        return request.future

    def _unqueue(self, request: _Request) -> None:
        if request.queued:
            request.queued = False
            self._queued_items -= request.n
            self._waited_items -= request.n if request.waited else 0
            self._notify("queue_changed", -request.n)
            self._room.set()

    def _forget(self, request: _Request) -> None:
        """A request cancelled while it waited (its client went away or its deadline passed) gives its queue
        space and memory back at once, instead of when the worker next looks at the queue."""
        if request.queued:
            self._unqueue(request)
            self._queue.remove(request)  # O(queue length), bounded by max_queue_items

    async def _work(self) -> None:
        batch: list[_Request] = []
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                batch = []
                self._collecting = True
                try:
                    await self._collect(batch)
                finally:
                    self._collecting = False
                if batch:
                    await self._execute(batch)
        except BaseException as e:  # cancelled, or a bug: nobody may wait forever on a worker that is gone
            for request in self._queue:
                self._unqueue(request)
            _fail([*batch, *self._queue], e)
            self._queue.clear()
            raise

    async def _collect(self, batch: list[_Request]) -> None:
        """Fill ``batch`` with the oldest live request plus compatible queued ones, waiting up to max_delay
        for more while more are expected (a probe: until the delay is over)."""
        size = 0
        deadline = asyncio.get_running_loop().time() + self.max_delay_s
        probe = self.adaptive and self.max_delay_s > 0 and self._probe_due()
        if probe:
            self._next_probe = time.monotonic() + PROBE_S
        while True:
            size = self._take(batch, size)
            remaining = deadline - asyncio.get_running_loop().time()
            if (not batch or size >= self.max_batch_size or self._closing or remaining <= 0
                    or (self.adaptive and not probe and not self._expects_more(len(batch)))):
                # A batch that ends short of the expectation (the delay is over) lowers it by one request at
                # a time: one lull under load does not send every batch after it out alone until the next probe.
                self._expected = max(1, len(batch), self._expected - 1)
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    def _take(self, batch: list[_Request], size: int) -> int:
        """Move queued requests that match the batch's shapes and fit into it; drop cancelled ones. The
        oldest live request always starts the batch, a chunk larger than ``max_batch_size`` too."""
        kept: deque[_Request] = deque()
        while self._queue:
            request = self._queue.popleft()
            if request.future.done():  # cancelled by its caller, its _forget callback not yet run
                self._unqueue(request)
            elif not batch or (request.key == batch[0].key and size + request.n <= self.max_batch_size):
                batch.append(request)
                size += request.n
                self._unqueue(request)
            else:
                kept.append(request)
        self._queue = kept
        return size

    async def _execute(self, batch: list[_Request]) -> None:
        """Run one batch and settle every request in it: its rows, or the exception the run raised.

        Requests cancelled while the batch was collecting (a deadline shorter than ``max_delay_ms``) are
        left out, and a batch left empty is not run: a client that gave up costs no model time. When the
        model refuses a merged batch's values (InputError: an index out of its range, say), that is one
        request's doing, so each request runs again on its own and only the culprit fails.
        """
        batch[:] = [r for r in batch if not r.future.done()]
        if not batch:
            return
        size = sum(r.n for r in batch)
        try:
            await self._run_batch(batch, size, waited=True)
        except InputError as e:
            if len(batch) == 1:
                _fail(batch, e)
            else:
                await self._run_each(batch)
        except Exception as e:
            _fail(batch, e)
        await asyncio.sleep(0)  # after an inline run: let the calls that arrived meanwhile in

    async def _run_each(self, batch: list[_Request]) -> None:
        """Run every request of ``batch`` on its own, each settled with its own rows or its own failure."""
        for request in batch:
            if request.future.done():
                continue
            try:
                await self._run_batch([request], request.n)
            except Exception as e:  # noqa: BLE001 - this request's own failure, for it alone
                _fail([request], e)

    async def _run_batch(self, batch: list[_Request], size: int, waited: bool = False) -> None:
        """Run the requests of ``batch`` (``size`` items) as one execution and hand each its rows; raises what
        the run raised. ``waited``: the requests' waits in the queue end here (not for the runs again one by one)."""
        started = time.perf_counter_ns()
        waits = [(started - r.arrived_ns) / 1e9 for r in batch] if waited else ()
        inputs = batch[0].inputs if len(batch) == 1 else {
            k: np.concatenate([r.inputs[k] for r in batch]) for k in batch[0].inputs
        }
        assembled = time.perf_counter_ns()
        size_class = _size_class(inputs, size)
        self._running = True
        try:
            if self.inline_batches and self._runs_inline(size_class, size):
                outputs, infer_ns = self._timed_run(inputs, size, size_class)
            else:
                outputs, infer_ns = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._timed_run, inputs, size, size_class)
        finally:
            self._running = False
            self._observe(size, assembled, waits)  # every run, at its size: a merged batch run again one by one too
        ran = time.perf_counter_ns()
        self._deliver(batch, outputs)
        self.statistics.executed(size, len(batch), sum(started - r.arrived_ns for r in batch),
                                 assembled - started, infer_ns, time.perf_counter_ns() - ran)

    def _runs_inline(self, size_class: tuple[int, int], size: int) -> bool:
        """Whether ``size`` items of ``size_class`` are expected to run within the inline budget; a size class
        not yet measured runs in a thread."""
        per_item = self._seconds_per_item.get(size_class)
        return per_item is not None and per_item * size <= self.inline_budget_s

    def _timed_run(self, inputs: Arrays, size: int, size_class: tuple[int, int]) \
            -> tuple[Mapping[str, np.ndarray], int]:
        """``run`` and its nanoseconds, learning its time per item for its size class (one slow run moves it a
        fifth of the way)."""
        start = time.perf_counter_ns()
        outputs = self._run(inputs)
        elapsed = time.perf_counter_ns() - start
        sample = elapsed / size / 1e9
        previous = self._seconds_per_item.get(size_class, sample)
        self._seconds_per_item[size_class] = previous + 0.2 * (sample - previous)
        return outputs, elapsed

    @staticmethod
    def _deliver(batch: list[_Request], outputs: Mapping[str, np.ndarray]) -> None:
        _check_rows(outputs, sum(r.n for r in batch))
        offset = 0
        for r in batch:
            if not r.future.done():
                r.future.set_result({k: v[offset : offset + r.n] for k, v in outputs.items()})
            offset += r.n

    def _observe(self, size: int, start_ns: int, waits: Sequence[float]) -> None:
        self._notify("observe_batch", size, (time.perf_counter_ns() - start_ns) / 1e9, waits)

    def _notify(self, hook: str, *args: object) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, hook)(self.name, self.version, *args)
        except Exception:  # noqa: BLE001 - metrics must never fail a request or stop the worker
            log.exception("batch observer failed", extra={"model": self.name, "version": self.version})


class ItemBudget:
    """Items that may be held at once, granted first come, first served (a weighted semaphore).

    For callers that wait for room rather than fail, streams: each prepares its items (decodes its images)
    before the queue has room for them, so without a bound every stream's window of requests sat decoded in
    memory, waiting (20 streams of 1024-image requests: 210 MiB to 983 MiB). In arrival order, so that a large
    request is not passed over for ever by smaller ones.
    """

    def __init__(self, items: int) -> None:
        self.items = items
        self._free = items
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        """Hold ``n`` items (at most the whole budget) while the block runs."""
        n = min(n, self.items)
        if self._waiters or self._free < n:
            granted = asyncio.get_running_loop().create_future()
            self._waiters.append((n, granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # granted as the caller went away: give it back
                    self._release(n)
                else:
                    with contextlib.suppress(ValueError):  # _grant may have dropped it already
                        self._waiters.remove((n, granted))
                    self._grant()  # it may have been first in line
                raise
        else:
            self._free -= n
        try:
            yield
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self._free += n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._free:
            n, granted = self._waiters.popleft()
            if not granted.cancelled():  # cancelled, its task not yet resumed: nothing to give it
                self._free -= n
                granted.set_result(None)


def _check_rows(outputs: Mapping[str, np.ndarray], total: int) -> None:
    wrong = {k: v.shape for k, v in outputs.items() if v.shape[:1] != (total,)}
    if wrong:
        raise RuntimeError(f"model outputs {wrong} do not have the batch's {total} rows on axis 0")


def _fail(requests: list[_Request], error: BaseException) -> None:
    for r in requests:
        if r.future.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            r.future.cancel()
        else:
            r.future.set_exception(error)


def _size_class(inputs: Mapping[str, np.ndarray], n: int) -> tuple[int, int]:
    """(elements per item, items) each rounded down to a power of two: 1, 2-3, 4-7, ..."""
    return (sum(v.size for v in inputs.values()) // n).bit_length(), n.bit_length()


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    """The common length of axis 0, which must be at least 1."""
    sizes = {k: v.shape[0] if v.ndim else 0 for k, v in inputs.items()}
    if not sizes or len(set(sizes.values())) != 1 or min(sizes.values()) < 1:
        raise InputError(f"inputs need one batch size >= 1 on axis 0 for every tensor; got {sizes or 'no tensors'}")
    return next(iter(sizes.values()))
