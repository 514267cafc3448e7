"""Ordered, bounded streaming: items -> batches -> worker processes -> engine threads -> rows, in input order.

Each stage keeps a fixed window of batches in flight (``ordered_map``), so memory stays constant however
many inputs there are, the workers decode the next batches while the engine classifies this one, and
results come out in input order (which makes the output stable and ``--resume`` a simple skip).
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from serving.batch.engines import Engine
from serving.batch.prepare import PreparedBatch, Preparer, in_input_terms
from serving.batch.types import BatchError, Failure, Item, Prediction
from serving.workers import spawn_pool

T = TypeVar("T")
R = TypeVar("R")
Outcome = Prediction | Failure


class Workers:
    """Processes that prepare (decode) batches, started at once so their start-up overlaps the model's loading."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pool = spawn_pool(n)

    def prepare(self, preparer: Preparer, batches: Iterable[list[Item]]) -> Iterator[tuple[list[Item], PreparedBatch]]:
        """(batch, prepared batch) in order, two batches queued per process."""
        try:
            yield from ordered_map(functools.partial(_prepare, preparer), batches, self.pool, window=2 * self.n)
        except BrokenProcessPool as e:
            raise BatchError("a worker process decoding images died (out of memory, or a crash in an image "
                             "decoder); --resume continues after the results so far, --workers 0 decodes "
                             "in-process") from e

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def run(items: Iterable[Item], engine: Engine, *, batch_size: int, workers: Workers | None,
        on_batch: Callable[[list[tuple[Item, Outcome]]], None]) -> None:
    """Classify every item, calling ``on_batch`` with each batch's (item, outcome) pairs in input order.

    With ``workers`` batches are prepared in those processes (image decoding is the costly part of a
    digits run); without, in this process, which is cheaper for text and CSV rows.
    """
    batches = _batched(items, batch_size)
    threads = ThreadPoolExecutor(engine.concurrency, thread_name_prefix="classify")
    try:
        prepared = (workers.prepare(engine.preparer, batches) if workers
                    else ((b, engine.preparer(b)) for b in batches))
        classified = ordered_map(lambda pair: _classify(engine, *pair), prepared, threads,
                                 window=engine.concurrency + 1)
        for _, pairs in classified:
            on_batch(pairs)
    finally:
        threads.shutdown(wait=False, cancel_futures=True)


def ordered_map(fn: Callable[[T], R], source: Iterable[T], executor: Executor, window: int) -> Iterator[tuple[T, R]]:
    """``(x, fn(x))`` for each x, in order, with at most ``window`` calls submitted and not yet consumed."""
    it = iter(source)
    pending: deque[tuple[T, Future[R]]] = deque()

    def refill() -> None:
        for x in itertools.islice(it, window - len(pending)):
            pending.append((x, executor.submit(fn, x)))

    refill()
    while pending:
        x, future = pending.popleft()
        result = future.result()
        refill()  # before yielding, so the executor works while the consumer handles this result
        yield x, result


def _classify(engine: Engine, items: list[Item], batch: PreparedBatch) -> list[tuple[Item, Outcome]]:
    """Each item with its answer, or its failure told in the item's terms (``in_input_terms``), whichever
    engine or preparer refused it."""
    answers = engine.classify(batch.inputs) if batch.ready else []
    if len(answers) != batch.ready:  # no answer may land on another item's row
        raise BatchError(f"the engine answered {len(answers)} of {batch.ready} inputs")
    answers = iter(answers)
    outcomes = (outcome or next(answers) for outcome in batch.outcomes)
    return [(item, in_input_terms(item, outcome) if isinstance(outcome, Failure) else outcome)
            for item, outcome in zip(items, outcomes, strict=True)]


def _batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _prepare(preparer: Preparer, items: list[Item]) -> PreparedBatch:
    return preparer(items)
