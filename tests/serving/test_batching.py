"""serving.batching.DynamicBatcher: coalescing, order, chunking, back-pressure, failures, cancellation, close.

The model is a plain function that can be held at a gate (a threading.Event), so that requests pile up
in the queue in a known way: no test depends on how fast anything runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from serving import batching
from serving.batching import BatcherClosed, DynamicBatcher, ItemBudget, QueueFull
from serving.preprocess import InputError, InputTooLarge

WAIT_S = 30.0  # generous bound on waiting for the worker; only reached when something hangs
LONG_DELAY_MS = 1000 * WAIT_S * 2  # a queue delay no test outlives: waiting it out fails the test


class GatedModel:
    """y = 2x, recording every batch; holds each run at the gate until the test opens it."""

    def __init__(self, gated: bool = False):
        self.started = 0  # runs that reached the gate
        self.batches: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.fail: Exception | None = None

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started += 1
        assert self.gate.wait(WAIT_S), "test never opened the gate"
        self.batches.append(inputs["x"].shape)
        if self.fail is not None:
            raise self.fail
        return {"y": inputs["x"] * 2}


class Recorder:
    """The observer hooks: each batch with the queue depth when it ended (the sum of the changes so far)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.queued_for: set[str] = set()
        self.depth = 0
        self.run_s: list[float] = []
        self.waits: list[float] = []

    def observe_batch(self, model: str, version: str, size: int, seconds: float, waits: Sequence[float]) -> None:
        self.calls.append((f"{model}/{version}", size, self.depth))
        self.run_s.append(seconds)
        self.waits += waits

    def queue_changed(self, model: str, version: str, items: int) -> None:
        self.queued_for.add(f"{model}/{version}")
        self.depth += items


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def x(*values: float, width: int = 3) -> dict[str, np.ndarray]:
    """A request of len(values) items; item i is a row filled with values[i]."""
    return {"x": np.repeat(np.array(values, dtype=np.float32)[:, None], width, axis=1)}


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def hold_first(batcher: DynamicBatcher, model: GatedModel, request: dict[str, np.ndarray]) -> asyncio.Task:
    """Submit one request and wait until it is running, held at the gate: what is submitted next queues."""
    task = asyncio.create_task(batcher.submit(request))
    await until(lambda: model.started == 1)
    return task


def test_concurrent_requests_form_batches_and_get_their_own_rows_back() -> None:
    model = GatedModel(gated=True)

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(model, max_batch_size=16, max_delay_ms=5, max_queue_items=1000, name="m")
        tasks = [await hold_first(batcher, model, x(0, 0.5))]
        tasks += [asyncio.create_task(batcher.submit(x(i, i + 0.5))) for i in range(1, 40)]
        await until(lambda: batcher.queue_depth == 78)
        model.gate.set()
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return results

    results = run(main())
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r["y"], x(i, i + 0.5)["x"] * 2)
    sizes = [shape[0] for shape in model.batches]
    assert sizes[0] == 2 and max(sizes) == 16 and sum(sizes) == 80
    assert all(s <= 16 for s in sizes)


def test_only_requests_of_the_same_shape_and_dtype_share_a_batch() -> None:
    model = GatedModel(gated=True)

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(model, max_batch_size=64, max_delay_ms=1, max_queue_items=1000)
        first = await hold_first(batcher, model, x(99))
        requests = [x(i, width=3 + i % 3) for i in range(12)]
        requests.append({"x": np.ones((1, 3), dtype=np.float64)})
        tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
        await until(lambda: batcher.queue_depth == 13)
        model.gate.set()
        await first
        return await asyncio.gather(*tasks)

    results = run(main())
    assert results[-1]["y"].dtype == np.float64
    for i, r in enumerate(results[:-1]):
        np.testing.assert_array_equal(r["y"], x(i, width=3 + i % 3)["x"] * 2)
    assert sorted(model.batches[1:]) == [(1, 3), (4, 3), (4, 4), (4, 5)]


def test_large_client_batches_are_chunked_and_reassembled_in_order() -> None:
    model = GatedModel()

    async def main() -> dict[str, np.ndarray]:
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay_ms=0, max_queue_items=100)
        return await batcher.submit(x(*range(10)))

    out = run(main())
    np.testing.assert_array_equal(out["y"], x(*range(10))["x"] * 2)
    assert [s[0] for s in model.batches] == [4, 4, 2]


def test_a_chunk_larger_than_the_batch_limit_runs_whole_and_alone() -> None:
    """chunk_size (the server's request limit) splits client batches; max_batch_size only bounds merging:
    a 10-item request runs as chunks of 8 and 2, neither merged with the small requests queued beside it."""
    model = GatedModel(gated=True)

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay_ms=0, max_queue_items=100, chunk_size=8)
        first = await hold_first(batcher, model, x(100))
        rest = [asyncio.create_task(batcher.submit(r)) for r in (x(*range(10)), x(20), x(21))]
        await until(lambda: batcher.queue_depth == 12)
        model.gate.set()
        return [await first, *await asyncio.gather(*rest)]

    out = run(main())
    np.testing.assert_array_equal(out[1]["y"], x(*range(10))["x"] * 2)
    np.testing.assert_array_equal(out[2]["y"], x(20)["x"] * 2)
    np.testing.assert_array_equal(out[3]["y"], x(21)["x"] * 2)
    assert [s[0] for s in model.batches] == [1, 8, 4]  # the 2-item tail chunk merges with the two singles


async def full_queue(model: GatedModel) -> tuple[DynamicBatcher, asyncio.Task, list[asyncio.Task]]:
    """A batcher "tiny" whose queue of 4 items is full behind a first request held at the gate."""
    batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=0, max_queue_items=4, name="tiny")
    first = await hold_first(batcher, model, x(0))
    queued = [asyncio.create_task(batcher.submit(x(i, i))) for i in (1, 2)]
    await until(lambda: batcher.queue_depth == 4)
    return batcher, first, queued


@pytest.mark.parametrize("then", ["room", "close"])
def test_a_flow_controlled_submit_waits_for_room(then: str) -> None:
    """``wait_for_room`` (a stream's requests): a full queue makes it wait, not fail, until items leave the
    queue (it then runs) or the batcher closes (BatcherClosed)."""
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher, first, queued = await full_queue(model)
        waiting = asyncio.create_task(batcher.submit(x(9), wait_for_room=True))
        await asyncio.sleep(0.01)
        assert not waiting.done() and batcher.queue_depth == 4  # neither refused nor queued beyond the limit
        if then == "room":
            model.gate.set()
            np.testing.assert_array_equal((await waiting)["y"], x(9)["x"] * 2)
            await asyncio.gather(first, *queued)
        else:
            closing = asyncio.create_task(batcher.close())
            with pytest.raises(BatcherClosed):
                await waiting
            model.gate.set()
            await asyncio.gather(first, *queued, closing)

    run(main())


def slow_batcher() -> DynamicBatcher:
    """A batcher of 1024 queued items in front of a model that takes 2 ms a batch of at most 64: it fills."""

    def slow(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        threading.Event().wait(0.002)
        return {"y": inputs["x"] * 2}

    return DynamicBatcher(slow, max_batch_size=64, max_delay_ms=0, max_queue_items=1024, name="m")


def test_requests_that_wait_hold_half_the_queue_and_take_room_in_turn() -> None:
    """Streams' requests hold at most half the queue between them, so a call that does not wait finds room;
    and they take room in the order they came: a 600-item request was passed over for ever by three streams of
    100-item ones, each of which fit into the half sooner (1,172 of them answered in 5 s while it waited)."""

    async def main() -> None:
        batcher = slow_batcher()
        answered, stop = [0], asyncio.Event()

        async def small_stream() -> None:
            while not stop.is_set():
                await batcher.submit({"x": np.ones((100, 4), np.float32)}, wait_for_room=True)
                answered[0] += 1

        streams = [asyncio.create_task(small_stream()) for _ in range(3)]
        await until(lambda: batcher.queue_depth > 0)
        assert batcher.queue_depth <= 512 + 100  # their half (and one request that came alone)
        await batcher.submit({"x": np.ones((1, 4), np.float32)})  # a unary call finds room
        before = answered[0]
        await batcher.submit({"x": np.ones((600, 4), np.float32)}, wait_for_room=True)
        assert answered[0] - before <= 3 * 8, answered[0] - before  # the ones queued ahead of it, not for ever
        stop.set()
        await asyncio.gather(*streams)
        await batcher.close()

    run(main())


def test_calls_that_retry_do_not_keep_a_waiting_request_out() -> None:
    """Calls that do not wait retried into every batch's worth of room as it freed, and a waiting request of
    more than a batch never got in (0 answered in 5 s against 24 callers of 64 items, 2,400 of theirs
    answered). The first waiting request keeps the room it needs within its half of the queue."""

    async def main() -> None:
        batcher = slow_batcher()
        answered, stop = [0], asyncio.Event()

        async def retrying_caller() -> None:
            while not stop.is_set():
                try:
                    await batcher.submit({"x": np.ones((64, 4), np.float32)})
                    answered[0] += 1
                except QueueFull:
                    await asyncio.sleep(0.001)

        callers = [asyncio.create_task(retrying_caller()) for _ in range(24)]
        await until(lambda: batcher.queue_depth > 1024 - 64)  # they keep the queue full
        before = answered[0]
        await batcher.submit({"x": np.ones((200, 4), np.float32)}, wait_for_room=True)
        assert answered[0] - before <= 1024 // 64 + 24, answered[0] - before  # the queue ahead of it, then it
        stop.set()
        await asyncio.gather(*callers)
        await batcher.close()

    run(main())


def test_batch_size_one_turns_coalescing_off() -> None:
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher = DynamicBatcher(model, max_batch_size=1, max_delay_ms=10, max_queue_items=100)
        tasks = [await hold_first(batcher, model, x(0))]
        tasks += [asyncio.create_task(batcher.submit(x(i))) for i in range(1, 5)]
        await until(lambda: batcher.queue_depth == 4)
        model.gate.set()
        await asyncio.gather(*tasks)

    run(main())
    assert [s[0] for s in model.batches] == [1] * 5


def test_a_full_queue_pushes_back() -> None:
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher, first, queued = await full_queue(model)
        with pytest.raises(QueueFull, match="model tiny: 4 items are queued"):
            await batcher.submit(x(9))
        model.gate.set()
        await asyncio.gather(first, *queued)
        with pytest.raises(InputTooLarge, match="5 items in one request: model tiny's queue holds at most 4"):
            await batcher.submit(x(*range(5)))  # can never fit: not a QueueFull, which clients retry
        await batcher.submit(x(3))  # room again

    run(main())


def test_a_failing_run_fails_every_request_of_its_batch_and_the_batcher_goes_on() -> None:
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=1, max_queue_items=100)
        tasks = [await hold_first(batcher, model, x(0))]
        tasks += [asyncio.create_task(batcher.submit(x(i))) for i in range(1, 6)]
        await until(lambda: batcher.queue_depth == 5)
        model.fail = RuntimeError("model exploded")
        model.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
        model.fail = None
        np.testing.assert_array_equal((await batcher.submit(x(7)))["y"], x(7)["x"] * 2)

    run(main())


def test_outputs_without_the_batch_rows_are_an_error_for_everyone() -> None:
    async def main() -> None:
        batcher = DynamicBatcher(lambda inputs: {"y": np.zeros(1)}, max_batch_size=8, max_delay_ms=0,
                                 max_queue_items=100)
        with pytest.raises(RuntimeError, match="do not have the batch's 2 rows"):
            await batcher.submit(x(1, 2))

    run(main())


def test_a_cancelled_request_does_not_disturb_the_others() -> None:
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=1, max_queue_items=100)
        tasks = [await hold_first(batcher, model, x(0))]
        tasks += [asyncio.create_task(batcher.submit(x(i))) for i in range(1, 5)]
        await until(lambda: batcher.queue_depth == 4)
        tasks[2].cancel()
        model.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        for i in (0, 1, 3, 4):
            np.testing.assert_array_equal(results[i]["y"], x(i)["x"] * 2)
        assert batcher.queue_depth == 0

    run(main())
    assert sum(s[0] for s in model.batches) == 4  # the cancelled item never ran


async def held_and_queued(batcher: DynamicBatcher, model: GatedModel) -> list[asyncio.Task]:
    """Five requests: x(0) running, held at the model's gate, and x(1)..x(4) queued behind it."""
    tasks = [await hold_first(batcher, model, x(0))]
    tasks += [asyncio.create_task(batcher.submit(x(i))) for i in range(1, 5)]
    await until(lambda: batcher.queue_depth == 4)
    return tasks


def test_close_finishes_queued_work_then_refuses_new_requests() -> None:
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=50, max_queue_items=100)
        tasks = await held_and_queued(batcher, model)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(BatcherClosed):
            await batcher.submit(x(1))
        model.gate.set()
        await closing
        assert all(t.done() and not t.exception() for t in tasks)

    run(main())
    assert sum(s[0] for s in model.batches) == 5


def test_a_close_whose_caller_goes_away_still_finishes_the_queued_work() -> None:
    """An unload whose client gave up (a deadline of 50 ms) cancelled its close, which cancelled the batcher's
    worker: every queued request, whose own callers were still waiting, got a CancelledError (clients saw
    "Stream removed"; a stream that got one hung)."""
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=0, max_queue_items=100)
        tasks = await held_and_queued(batcher, model)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        closing.cancel()
        await asyncio.wait([closing])
        model.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r["y"].tolist() for r in results] == [[[2.0 * i] * 3] for i in range(5)]
        await batcher.close()

    run(main())


def test_observer_sees_every_batch_and_the_queue_depth() -> None:
    model, recorder = GatedModel(gated=True), Recorder()

    async def main() -> None:
        batcher = DynamicBatcher(model, max_batch_size=3, max_delay_ms=0, max_queue_items=100, name="digits",
                                 version="3", observer=recorder)
        tasks = [await hold_first(batcher, model, x(0))]
        tasks += [asyncio.create_task(batcher.submit(x(i))) for i in range(1, 7)]
        await until(lambda: batcher.queue_depth == 6)
        assert recorder.depth == 6  # reported as they queue, not only when a batch ends
        await asyncio.sleep(0.05)  # the first run held at the gate, the others waiting in the queue
        model.gate.set()
        await asyncio.gather(*tasks)

    run(main())
    assert recorder.calls == [("digits/3", 1, 6), ("digits/3", 3, 3), ("digits/3", 3, 0)]
    assert recorder.depth == 0 and recorder.queued_for == {"digits/3"}  # each series its model version's
    # each request's wait, once (the first ran at once), and each execution's duration (the first held 50 ms)
    assert len(recorder.waits) == 7 and recorder.waits[0] < 0.05 <= min(recorder.waits[1:])
    assert len(recorder.run_s) == 3 and recorder.run_s[0] >= 0.05


def test_a_failing_observer_does_not_fail_requests() -> None:
    class Broken:
        def observe_batch(self, model: str, version: str, size: int, seconds: float, waits: Sequence[float]) -> None:
            raise ValueError("metrics down")

        def queue_changed(self, model: str, version: str, items: int) -> None:
            raise ValueError("metrics down")

    async def main() -> dict[str, np.ndarray]:
        batcher = DynamicBatcher(GatedModel(), max_batch_size=2, max_delay_ms=0, max_queue_items=10,
                                 observer=Broken())
        return await batcher.submit(x(1))

    np.testing.assert_array_equal(run(main())["y"], x(1)["x"] * 2)


@pytest.mark.parametrize("inputs", [{}, {"x": np.zeros((0, 3))}, {"x": np.zeros((2, 3)), "z": np.zeros(3)}])
def test_inputs_need_one_batch_size_of_at_least_one(inputs: dict[str, np.ndarray]) -> None:
    async def main() -> None:
        batcher = DynamicBatcher(GatedModel(), max_batch_size=2, max_delay_ms=0, max_queue_items=10)
        with pytest.raises(InputError, match="one batch size >= 1"):
            await batcher.submit(inputs)

    run(main())


def test_requests_never_outlive_their_worker() -> None:
    """If the worker task ends abnormally (here: cancelled, as at loop shutdown), its waiters are told at
    once instead of hanging, and the next request starts a new worker."""
    model = GatedModel(gated=True)

    async def main() -> None:
        batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=0, max_queue_items=100)
        tasks = [await hold_first(batcher, model, x(0))]
        tasks += [asyncio.create_task(batcher.submit(x(i))) for i in range(1, 4)]
        await until(lambda: batcher.queue_depth == 3)
        batcher._worker.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert batcher.queue_depth == 0
        model.gate.set()
        np.testing.assert_array_equal((await batcher.submit(x(5)))["y"], x(5)["x"] * 2)

    run(main())


class ThreadRecorder:
    """y = 2x, noting which thread ran each batch and taking ``seconds`` per run."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.threads: list[tuple[int, int]] = []  # (batch size, thread id)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append((len(inputs["x"]), threading.get_ident()))
        if self.seconds:
            threading.Event().wait(self.seconds)
        return {"y": inputs["x"] * 2}


@pytest.mark.parametrize("delay_ms", [0, 1])  # 0: an idle model runs it in the caller's task; 1: the worker does
def test_fast_runs_move_onto_the_event_loop_once_measured(delay_ms: float) -> None:
    """The first run of a size class goes to a thread and is timed; once a size is known to fit the inline
    budget, it runs on the loop's own thread. A new size class is measured in a thread first."""
    model, recorder = ThreadRecorder(), Recorder()

    async def main() -> int:
        batcher = DynamicBatcher(model, max_batch_size=64, max_delay_ms=delay_ms, max_queue_items=1000,
                                 inline_budget_ms=1000, observer=recorder)
        for request in (x(1), x(2), x(3), x(*range(40)), x(*range(40))):
            np.testing.assert_array_equal((await batcher.submit(request))["y"], request["x"] * 2)
        return threading.get_ident()

    loop_thread = run(main())
    assert [(size, thread == loop_thread) for size, thread in model.threads] == [
        (1, False), (1, True), (1, True), (40, False), (40, True)]
    assert [size for _, size, _ in recorder.calls] == [1, 1, 1, 40, 40]  # every run is in the metrics


def test_longer_items_are_measured_in_a_thread_before_they_run_inline() -> None:
    """An item of a sequence model costs with its length: one 100 times longer than those measured is a
    new size class, timed in a thread first, as a new batch size is (else one long sequence would hold
    the event loop, and every call on it, for as long as it runs)."""
    model = ThreadRecorder()

    async def main() -> int:
        batcher = DynamicBatcher(model, max_batch_size=64, max_delay_ms=0, max_queue_items=1000,
                                 inline_budget_ms=1000)
        for request in (x(1), x(1), x(1, width=300), x(1, width=300), x(1, width=2)):
            np.testing.assert_array_equal((await batcher.submit(request))["y"], request["x"] * 2)
        return threading.get_ident()

    loop_thread = run(main())
    # width 2 is in width 3's class (2-3 elements): measured already
    assert [thread == loop_thread for _, thread in model.threads] == [False, True, False, True, True]


@pytest.mark.parametrize("inline_batches", [True, False])
def test_inline_batches_decides_where_a_measured_worker_batch_runs(inline_batches: bool) -> None:
    """A GPU session's batcher (``inline_batches=False``) keeps the worker's batches in threads even when
    measured fast; a lone request on an idle model still runs on the loop either way."""
    model = ThreadRecorder(seconds=0.05)  # well within the 1 s budget: every size counts as fast

    async def main() -> int:
        batcher = DynamicBatcher(model, max_batch_size=64, max_delay_ms=0, max_queue_items=1000,
                                 inline_budget_ms=1000, inline_batches=inline_batches)
        for request in (x(1), x(1), x(*range(5))):  # sizes 1 and 5 measured; 1 then runs inline
            await batcher.submit(request)
        # a new size (3) runs in a thread; five singles arrive meanwhile and run next as one batch of 5
        first = asyncio.create_task(batcher.submit(x(0, 1, 2)))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, *(batcher.submit(x(i)) for i in range(5)))
        return threading.get_ident()

    loop_thread = run(main())
    assert [(size, thread == loop_thread) for size, thread in model.threads] == [
        (1, False), (1, True), (5, False), (3, False), (5, inline_batches)]


def test_slow_runs_and_a_zero_budget_stay_in_worker_threads() -> None:
    for model, budget in ((ThreadRecorder(seconds=0.02), 5.0), (ThreadRecorder(), 0.0)):
        async def main(model: ThreadRecorder = model, budget: float = budget) -> int:
            batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=0, max_queue_items=100,
                                     inline_budget_ms=budget)
            for i in range(4):
                await batcher.submit(x(i))
            return threading.get_ident()

        loop_thread = run(main())
        assert len(model.threads) == 4 and all(thread != loop_thread for _, thread in model.threads)


def test_an_adaptive_delay_lets_a_lone_caller_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last batch held one request, so no batch waits for company (no probe is due): with a delay
    longer than the test may take, every lone request still runs, on the loop once its size is measured."""
    monkeypatch.setattr(batching, "PROBE_S", 3600.0)
    model, recorder = ThreadRecorder(), Recorder()

    async def main() -> int:
        batcher = DynamicBatcher(model, max_batch_size=64, max_delay_ms=LONG_DELAY_MS, max_queue_items=100,
                                 inline_budget_ms=1000, observer=recorder, adaptive=True)
        for i in range(4):
            np.testing.assert_array_equal((await batcher.submit(x(i)))["y"], x(i)["x"] * 2)
        return threading.get_ident()

    loop_thread = run(main())
    assert [(size, thread == loop_thread) for size, thread in model.threads] == [
        (1, False), (1, True), (1, True), (1, True)]


def test_a_probe_waits_the_whole_delay_and_later_batches_wait_for_as_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe waits until the delay is over or the batch is full (five requests of two items); the next
    batch then waits, however long the delay, until it holds five requests too (five items), no longer."""
    model = GatedModel()

    async def main() -> None:
        monkeypatch.setattr(batching, "PROBE_S", 0.0)  # a probe is due from the start...
        batcher = DynamicBatcher(model, max_batch_size=10, max_delay_ms=LONG_DELAY_MS, max_queue_items=100,
                                 adaptive=True)
        monkeypatch.setattr(batching, "PROBE_S", 3600.0)  # ...and, once taken, not again in this test
        probe = [asyncio.create_task(batcher.submit(x(i, i))) for i in range(4)]
        await asyncio.sleep(0.05)  # time for the worker to take them (were it not to wait, to run them)
        assert model.started == 0
        probe.append(asyncio.create_task(batcher.submit(x(4, 4))))  # 10 items: the batch is full
        await asyncio.gather(*probe)

        later = [asyncio.create_task(batcher.submit(x(i))) for i in range(4)]
        await asyncio.sleep(0.05)
        assert model.started == 1  # four requests wait for a fifth
        later.append(asyncio.create_task(batcher.submit(x(4))))
        for i, result in enumerate(await asyncio.gather(*later)):
            np.testing.assert_array_equal(result["y"], x(i)["x"] * 2)
        await batcher.close()

    run(main())
    assert [shape[0] for shape in model.batches] == [10, 5]


def test_statistics_count_executions_and_charge_each_request_its_batch() -> None:
    """Triton's statistics: a request waits in the queue for its own time and is charged its whole batch's
    run; per batch size the executions are counted once. A lone request on an idle model (inline) did not wait."""
    model = GatedModel(gated=True)

    async def main() -> DynamicBatcher:
        batcher = DynamicBatcher(model, max_batch_size=16, max_delay_ms=0, max_queue_items=100,
                                 inline_budget_ms=1000)
        first = await hold_first(batcher, model, x(0))
        queued = [asyncio.create_task(batcher.submit(x(i, i))) for i in range(1, 4)]
        await until(lambda: batcher.queue_depth == 6)
        await asyncio.sleep(0.05)  # the three queued requests wait at least this long
        model.gate.set()
        await asyncio.gather(first, *queued)
        await batcher.submit(x(9))  # idle, and a measured size class: runs inline in this task
        return batcher

    stats = run(main()).statistics
    assert model.batches == [(1, 3), (6, 3), (1, 3)]
    assert stats.execution_count == 3
    assert sorted(stats.batches) == [1, 6]
    assert (stats.batches[1].compute_infer.count, stats.batches[6].compute_infer.count) == (2, 1)
    assert stats.queue.count == stats.compute_infer.count == stats.compute_input.count == 1 + 3 + 1
    assert stats.queue.ns >= 3 * 50_000_000  # the three that waited behind the first run
    # the batch of 6 ran once, and each of its three requests is charged that run
    sixes = stats.batches[6].compute_infer.ns
    assert stats.compute_infer.ns == stats.batches[1].compute_infer.ns + 3 * sixes
    assert stats.inference_count == 0  # requests answered are the served model's count (serving.repository)


def test_values_the_model_refuses_fail_only_the_request_that_sent_them() -> None:
    """A merged batch refused for one request's values (the runtime's InputError: an index out of the model's
    range) is run again request by request: the others get their answers."""
    model = GatedModel(gated=True)

    def refuses_negatives(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] < 0).any():
            raise InputError("index out of range")
        return model(inputs)

    recorder = Recorder()
    batcher = DynamicBatcher(refuses_negatives, max_batch_size=16, max_delay_ms=0, max_queue_items=100,
                             observer=recorder)

    async def main() -> list[Any]:
        first = await hold_first(batcher, model, x(0))
        queued = [asyncio.create_task(batcher.submit(x(v))) for v in (1, -2, 3)]
        await until(lambda: batcher.queue_depth == 3)
        model.gate.set()
        return await asyncio.gather(first, *queued, return_exceptions=True)

    first, one, refused, three = run(main())
    assert isinstance(refused, InputError)
    for result, value in ((first, 0), (one, 1), (three, 3)):
        np.testing.assert_array_equal(result["y"], x(value)["x"] * 2)
    assert [shape[0] for shape in model.batches] == [1, 1, 1]  # the merged batch of 3 never reached the model
    # every run observed at its size, the refused one too; statistics count the runs that answered
    assert [size for _, size, _ in recorder.calls] == [1, 3, 1, 1, 1]
    assert batcher.statistics.execution_count == 3


def test_an_item_budget_grants_in_arrival_order_and_never_beyond_its_size() -> None:
    """Streams hold their decoded items within it: a large request is not passed over by smaller ones behind it,
    a cancelled waiter takes nothing, and all is given back."""
    async def main() -> None:
        budget = ItemBudget(10)
        order: list[str] = []
        release = asyncio.Event()

        async def take(name: str, n: int) -> None:
            async with budget.hold(n):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(take("first 6", 6))
        await asyncio.sleep(0)
        large = asyncio.create_task(take("large 8", 8))
        small = asyncio.create_task(take("small 2", 2))  # would fit now, but waits its turn behind the large one
        gone = asyncio.create_task(take("gone 1", 1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["first 6"] and budget._free == 4
        gone.cancel()
        release.set()
        await asyncio.gather(first, large, small)
        assert order == ["first 6", "large 8", "small 2"]
        assert gone.cancelled() and budget._free == 10 and not budget._waiters
        async with budget.hold(50):  # more than the whole budget: takes all of it
            assert budget._free == 0

    asyncio.run(asyncio.wait_for(main(), 10))
