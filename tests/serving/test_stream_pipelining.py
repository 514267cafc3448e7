"""``serving.services.base.in_order``: how both streams (StreamClassifyDigits, ModelStreamInfer) pipeline.

The handler here is a coroutine the test controls, so what runs when is decided by the test, not by timing:
at most ``window`` requests are handled at once, answers come in request order, and a stream that ends
early (its client cancelled) leaves nothing running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.services.base import ShuttingDown, in_order

WAIT_S = 30.0


class Handler:
    """Answers ``n`` with ``n * 10`` once the gate opens; records which calls ran, finished or were cancelled."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []

    async def __call__(self, n: int) -> int:
        self.started.append(n)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(n)
            raise
        if n < 0:
            raise ValueError(f"refused {n}")
        self.finished.append(n)
        return n * 10


async def numbers(values: list[int]) -> AsyncIterator[int]:
    for value in values:
        yield value


async def settle() -> None:
    for _ in range(20):  # enough loop turns for the reader to start all it may
        await asyncio.sleep(0)


def test_at_most_window_requests_run_and_answers_come_in_order() -> None:
    async def main() -> tuple[list[int], Handler]:
        handler = Handler()
        stream = in_order(numbers(list(range(20))), handler, window=4)
        first = asyncio.ensure_future(anext(stream))
        await settle()
        assert handler.started == [0, 1, 2, 3]  # the fifth waits for a slot
        handler.gate.set()
        answers = [(await first).result()]
        answers += [task.result() async for task in stream]
        return answers, handler

    answers, handler = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert answers == [n * 10 for n in range(20)]


def test_a_failed_request_is_answered_in_its_place() -> None:
    async def main() -> list[int | str]:
        handler = Handler()
        handler.gate.set()
        return [str(task.exception()) if task.exception() else task.result()
                async for task in in_order(numbers([1, -2, 3]), handler)]

    assert asyncio.run(asyncio.wait_for(main(), WAIT_S)) == [10, "refused -2", 30]


def test_a_stream_that_ends_early_leaves_nothing_running() -> None:
    """The client cancelled while its first answer was being worked out: every request in hand is cancelled,
    the one being waited on included, and none runs to its end afterwards."""
    async def main() -> Handler:
        handler = Handler()
        stream = in_order(numbers(list(range(20))), handler, window=4)
        first = asyncio.ensure_future(anext(stream))
        await settle()
        first.cancel()  # as grpc.aio cancels the handler of a cancelled call
        with pytest.raises(asyncio.CancelledError):
            await first
        await stream.aclose()
        handler.gate.set()
        await settle()
        return handler

    handler = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert handler.started == [0, 1, 2, 3]
    assert sorted(handler.cancelled) == [0, 1, 2, 3] and handler.finished == []


def test_a_request_that_cannot_be_read_ends_the_stream_after_the_answers_before_it() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("not a message")

    async def main() -> list[int]:
        handler = Handler()
        handler.gate.set()
        answers = []
        with pytest.raises(ValueError, match="not a message"):
            async for task in in_order(broken(), handler):
                answers.append(task.result())
        return answers

    assert asyncio.run(asyncio.wait_for(main(), WAIT_S)) == [10, 20]


def test_a_drain_ends_the_stream_after_answering_what_it_read() -> None:
    """The server is stopping: no request is read after that, each one read is answered, and the stream ends
    with ShuttingDown (UNAVAILABLE). It kept reading until the grace period ran out, and was then cut off."""
    async def endless() -> AsyncIterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    async def main() -> tuple[list[int], Handler]:
        handler, draining = Handler(), asyncio.Event()
        stream = in_order(endless(), handler, window=4, draining=draining)
        first = asyncio.ensure_future(anext(stream))
        await settle()
        draining.set()
        await settle()
        handler.gate.set()
        answers = [(await first).result()]
        with pytest.raises(ShuttingDown, match="send the rest on a new stream"):
            async for task in stream:
                answers.append(task.result())
        return answers, handler

    answers, handler = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert handler.started == [0, 1, 2, 3] and answers == [0, 10, 20, 30]
