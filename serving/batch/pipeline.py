"""Ordered, bounded streaming: items -> batches -> worker processes -> engine threads -> rows, in input order.

Each stage keeps a fixed window of batches in flight (``ordered_map``), so memory stays constant however
many inputs there are, the workers decode the next batches while the engine classifies this one, and
results come out in input order (which makes the output stable and ``--resume`` a simple skip).

An engine that can classify in a worker process (``Engine.worker_classify``: the local engine's CPU model)
gets the whole batch done there, rows included (``finish``): the worker prepares, classifies and renders,
and this process lists the inputs and writes what comes back.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from serving.batch.engines import Engine
from serving.batch.prepare import PreparedBatch, Preparer, in_input_terms
from serving.batch.types import BatchError, Failure, Item, Prediction
from serving.workers import spawn_pool

T = TypeVar("T")
R = TypeVar("R")
Outcome = Prediction | Failure
#: what becomes of a batch's (item, outcome) pairs where they were classified (rendered rows, for the CLI)
Finish = Callable[[list[tuple[Item, Outcome]]], R]


class Workers:
    """Processes that prepare (decode) batches, started at once so their start-up overlaps the model's loading."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pool = spawn_pool(n)

    def map(self, fn: Callable[[list[Item]], R], batches: Iterable[list[Item]]) -> Iterator[tuple[list[Item], R]]:
        """(batch, fn(batch)) in order, ``fn`` run in the processes, two batches queued per process."""
        try:
            yield from ordered_map(fn, batches, self.pool, window=2 * self.n)
        except BrokenProcessPool as e:
            raise BatchError("a worker process decoding images died (out of memory, or a crash in an image "
                             "decoder); --resume continues after the results so far, --workers 0 decodes "
                             "in-process") from e

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def run(items: Iterable[Item], engine: Engine, *, batch_size: int, workers: Workers | None, finish: Finish[R],
        on_batch: Callable[[R], None]) -> None:
    """Classify every item: each batch's (item, outcome) pairs, in input order, go through ``finish`` where the
    batch was classified, and what it makes goes to ``on_batch``, batch after batch in input order.

    With ``workers`` batches are prepared in those processes (image decoding is the costly part of a
    digits run), and classified and finished there too when the engine can (``worker_classify``); without,
    they are prepared in this process, which is cheaper for text and CSV rows. ``finish`` must pickle.
    """
    batches = _batched(items, batch_size)
    if workers and engine.worker_classify:
        done = functools.partial(_prepared_classified, engine.preparer, engine.worker_classify, finish)
        for _, result in workers.map(done, batches):
            on_batch(result)
        return
    threads = ThreadPoolExecutor(engine.concurrency, thread_name_prefix="classify")
    try:
        prepared = (workers.map(engine.preparer, batches) if workers
                    else ((b, engine.preparer(b)) for b in batches))
        classified = ordered_map(lambda pair: finish(_classify(engine.classify, *pair)), prepared, threads,
                                 window=engine.concurrency + 1)
        for _, result in classified:
            on_batch(result)
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


def _classify(classify: Callable[[Any], list[Outcome]], items: list[Item],
              batch: PreparedBatch) -> list[tuple[Item, Outcome]]:
    """Each item with its answer (``classify``, an engine's), or its failure told in the item's terms
    (``in_input_terms``), whichever engine or preparer refused it."""
    answers = classify(batch.inputs) if batch.ready else []
    if len(answers) != batch.ready:  # no answer may land on another item's row
        raise BatchError(f"the engine answered {len(answers)} of {batch.ready} inputs")
    answers = iter(answers)
    outcomes = (outcome or next(answers) for outcome in batch.outcomes)
    return [(item, in_input_terms(item, outcome) if isinstance(outcome, Failure) else outcome)
            for item, outcome in zip(items, outcomes, strict=True)]


def _prepared_classified(preparer: Preparer, classify: Callable[[Any], list[Outcome]], finish: Finish[R],
                         items: list[Item]) -> R:
    """A whole batch in a worker process: prepared, classified, finished."""
    return finish(_classify(classify, items, preparer(items)))


def _batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
