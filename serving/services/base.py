"""What every handler shares: exception -> gRPC status mapping, per-RPC metrics, model lookup, limits.

Handlers raise the domain exceptions of the modules they call (``InputError`` from preprocessing,
``ModelNotFound`` from the repository, ``QueueFull`` from the batcher) and return an ``Answer``; the
``rpc`` decorator turns that into a reply or a status, and records the request once. The mapping
lives only here, so the domain API and the KServe API answer the same failure with the same code.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from coursezoo.logs import Throttle
from serving.batching import BatcherClosed, QueueFull
from serving.decoding import DecodersUnavailable
from serving.metrics import Metrics
from serving.preprocess import InputError, InputTooLarge
from serving.repository import ModelNotFound, ModelNotReady, ModelRepository, ServedModel
from serving.security import ModelControlOff, SharedMemoryOff
from serving.services.plumbing import Refused, kind_of
from serving.shared_memory import RegionExists, RegionNotFound, TooManyRegions

log = logging.getLogger("coursezoo.serve")
T = TypeVar("T")

class Unsupported(Exception):
    """The request asks for a feature of the protocol that this server does not have (maps to UNIMPLEMENTED)."""


class ShuttingDown(Exception):
    """The server is draining: a stream stops taking requests (maps to UNAVAILABLE: reopen it elsewhere)."""


#: First match wins, so subclasses come before their bases (InputTooLarge is an InputError).
ERROR_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InputTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (BatcherClosed, grpc.StatusCode.UNAVAILABLE),  # the model is unloading or the server stopping
    (QueueFull, grpc.StatusCode.UNAVAILABLE),  # overloaded for now: retry later (Triton's answer too)
    (DecodersUnavailable, grpc.StatusCode.UNAVAILABLE),  # decoding processes died: retry later
    (ModelControlOff, grpc.StatusCode.UNIMPLEMENTED),  # "not enabled in this service", in gRPC's words
    (SharedMemoryOff, grpc.StatusCode.UNIMPLEMENTED),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (RegionNotFound, grpc.StatusCode.NOT_FOUND),
    (RegionExists, grpc.StatusCode.ALREADY_EXISTS),
    (TooManyRegions, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


class UndecodableRequest(InputError):
    """The request bytes are not a valid message of the RPC's type (bad wire format, non-UTF-8 string)."""


def status_of(exc: BaseException) -> grpc.StatusCode:
    return next((code for kind, code in ERROR_STATUS if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


class Answer(NamedTuple):
    """A handler's result: the reply, and the model, item count and version the request is counted under
    (the version that answered; "" for a call that no version answers)."""

    message: Message
    model: str
    items: int
    version: str = ""


class Settings(Protocol):
    max_items_per_request: int
    max_queue_items: int
    max_message_bytes: int


class Handler:
    """Base of the servicers: the repository to answer from, metrics to record into, request limits."""

    def __init__(self, repository: ModelRepository, metrics: Metrics, settings: Settings) -> None:
        self.repository = repository
        self.metrics = metrics
        self.max_items = settings.max_items_per_request
        self.draining = asyncio.Event()  # set when the server starts its graceful stop: streams end (in_order)

    def model(self, name: str, version: str, tasks: tuple[str, ...], rpc: str) -> ServedModel:
        """The model that answers: ``name`` ("" = the default model of ``tasks[0]``) at ``version`` ("" = newest).

        A model of another task is refused with a message naming the tasks the RPC accepts.
        """
        served = self.repository.get(name or self.repository.default_model(tasks[0]), version or None)
        if served.card.task not in tasks:
            raise InputError(f"model {served.name!r} is a {served.card.task} model; {rpc} needs a "
                             f"{' or '.join(tasks)} model")
        return self.chose(served)

    @staticmethod
    def chose(served: ServedModel) -> ServedModel:
        """Note ``served`` as the version this call runs on: a failure from here on counts under it (``answer``),
        the default model's too for a call that named none."""
        _CHOSEN.set(served)
        return served

    async def infer(self, served: ServedModel, inputs: Mapping[str, np.ndarray], *, pinned: bool,
                    wait_for_room: bool = False) -> tuple[ServedModel, dict[str, np.ndarray]]:
        """``served.infer``, and the version that answered. When ``served`` was retired after the call chose it
        (a new version swapped in, a rollback) an unpinned call is answered by the version serving now, if that
        takes the same inputs: before, a call that chose a version and then waited (its images decoding, room
        in the queue) failed UNAVAILABLE, and a stream with it, where the docs promise a swap without loss."""
        try:
            return served, await served.infer(inputs, wait_for_room=wait_for_room)
        except ModelNotReady:
            if pinned or served.ready:
                raise
            now = self.repository.get(served.name)  # NOT_FOUND or UNAVAILABLE when none serves any more
            if now is served or (now.card.inputs, now.card.preprocessing) != (served.card.inputs,
                                                                             served.card.preprocessing):
                raise
            return now, await self.chose(now).infer(inputs, wait_for_room=wait_for_room)

    def check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise InputError(f"no {what} given: expected at least one")
        if n > self.max_items:
            raise InputTooLarge(f"{n} {what} in one request: at most {self.max_items} are accepted; "
                                f"split them over several requests")


UnaryMethod = Callable[[Any, Any], Awaitable[Answer]]

#: The model version the call being answered runs on (``Handler.chose``); each call, a stream's requests too, runs
#: in a task of its own, with its own value.
_CHOSEN: ContextVar[ServedModel | None] = ContextVar("coursezoo_chosen_version", default=None)


async def answer(handler: Handler, rpc_name: str, method: UnaryMethod, request: Any, model_field: str = "model", *,
                 context: grpc.aio.ServicerContext) -> Answer:
    """Run ``method(handler, request)`` and record it in the metrics; exceptions propagate unchanged.

    A failure is counted under the model version its handler had chosen (``Handler.chose``) when it failed; one
    that failed before (no such model or version, none serving) under the requested model name, if the
    repository knows that name, and version "": any other name or version a client sends (a typo, or a flood of
    random ones) would become a metrics series of its own for the life of the process. ``context`` is the call's
    (a stream's, for a request read from one): it tells a deadline that passed from a client that cancelled.
    """
    start = time.perf_counter()
    chosen = _CHOSEN.set(None)
    try:
        result = await method(handler, request)
    except asyncio.CancelledError:  # the client cancelled or its deadline passed: counted, not logged
        handler.metrics.observe_request(*_counted(handler, request, model_field), rpc_name,
                                        time.perf_counter() - start, 0, _cancelled_code(context).name)
        raise
    except Exception as exc:
        code = status_of(exc)
        model, version = _counted(handler, request, model_field)
        handler.metrics.observe_request(model, version, rpc_name, time.perf_counter() - start, 0, code.name)
        if code is grpc.StatusCode.INTERNAL:  # the version that failed, else (none chosen yet) the one asked for
            INTERNAL_ERRORS.log(exc, rpc=rpc_name, model=model, version=version or _version_asked(request),
                                peer=context.peer())
        raise
    finally:
        _CHOSEN.reset(chosen)
    handler.metrics.observe_request(result.model, result.version, rpc_name, time.perf_counter() - start,
                                    result.items)
    return result


class InternalErrors:
    """Logs the server's own failures (INTERNAL), one traceback per kind per ``every_s`` (``coursezoo.logs.Throttle``).

    A kind is the RPC, the model and the exception's type. A broken model version fails every request the same
    way: 258 failed calls logged 258 tracebacks (687 KB in 0.3 s), burying everything else. The others of a kind
    are counted (and in the metrics as ever), and the next line logged says how many there were. Kinds are
    bounded: a model name is one the repository knows, or "".
    """

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._throttle = Throttle(every_s, clock)

    def log(self, exc: BaseException, *, rpc: str, model: str, version: str, peer: str) -> None:
        unlogged = self._throttle.due((rpc, model, type(exc).__name__))
        if unlogged is not None:
            log.error("internal error", exc_info=exc, extra={"rpc": rpc, "model": model, "version": version,
                                                             "peer": peer, "unlogged_since_last": unlogged})


INTERNAL_ERRORS = InternalErrors()


def _version_asked(request: Any) -> str:
    """The version a request named ("" for the newest): the domain API's ``version``, KServe's ``model_version``."""
    return str(getattr(request, "version", "") or getattr(request, "model_version", "") or "")


#: A call cancelled this close to its deadline counts as DEADLINE_EXCEEDED. The client's own timer usually fires
#: first and cancels the call: the server's copy of the deadline starts when the request arrives, so it ends
#: later by the request's transit (7 ms was seen on loopback), and the server never sees its own expire.
DEADLINE_SLACK_S = 0.1


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call's deadline has (all but) passed, else CANCELLED (the client gave up, or
    its connection went): operators tell timeouts too short for the load from clients going away by it."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining < DEADLINE_SLACK_S else \
        grpc.StatusCode.CANCELLED


def _known(handler: Handler, request: Any, model_field: str) -> str:
    """The request's model name if the repository knows it, else ""."""
    name = getattr(request, model_field, "")
    return name if handler.repository.knows(name) else ""


def _counted(handler: Handler, request: Any, model_field: str) -> tuple[str, str]:
    """The model and version a failed call counts under (``answer``)."""
    chosen = _CHOSEN.get()
    if chosen is not None:
        return chosen.name, chosen.version
    return _known(handler, request, model_field), ""


#: The most UTF-8 bytes of a status message sent. It travels in a trailer, percent-encoded (each byte beyond
#: ASCII takes 3), and gRPC clients refuse metadata over 16 KiB by default: a message that echoed a huge field
#: the client sent (a tensor name of 20,000 CJK characters, say) reached it as RESOURCE_EXHAUSTED instead.
MAX_MESSAGE_BYTES = 2000


def message_of(exc: BaseException) -> str:
    """What a client is told about ``exc``: its message, except that internal errors do not leak their details."""
    if status_of(exc) is grpc.StatusCode.INTERNAL:
        return f"internal error ({type(exc).__name__}); the server log has the details"
    message = str(exc)
    encoded = message.encode("utf-8", "replace")
    if len(encoded) > MAX_MESSAGE_BYTES:
        kept = encoded[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")  # a character cut in two is left out
        return f"{kept}... (cut from {len(message)} characters)"
    return message


def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Set the status ``exc`` maps to; the handler then returns (a unary one None), and gRPC ends the RPC with it.

    Not ``context.abort``: the AbortError it raises joins a reference cycle inside grpc.aio's handling that holds
    the call's request until the garbage collector runs. A client sending refused 32 MB requests one after
    another held 1.2 GB that way (30 of them); now they go when answered."""
    context.set_code(status_of(exc))
    context.set_details(message_of(exc))


#: Requests of one stream handled at once: enough to keep a model's batcher fed while replies travel back.
STREAM_WINDOW = 8


async def in_order(requests: AsyncIterator[Any], handle: Callable[[Any], Awaitable[T]],
                   window: int = STREAM_WINDOW, draining: asyncio.Event | None = None) \
        -> AsyncIterator[asyncio.Future[T]]:
    """Pipeline a stream: ``handle`` up to ``window`` requests concurrently, and yield their finished tasks
    in request order (the caller takes the answer, or the exception, from each).

    A failure reading the requests (an undecodable message) is raised in its place, after the tasks of
    the requests before it. Whatever ends the iteration early (the client cancelled, the caller stopped)
    cancels the reader and every task started: a stream that is gone costs no more model time. Once
    ``draining`` is set (the server is stopping) no more requests are read: the ones read are answered, then
    ``ShuttingDown`` is raised in place of the next answer. Before, a stream kept taking requests until the
    grace period ran out, and was then cut off with its requests in flight unanswered.
    """
    slots = asyncio.Semaphore(window)  # a slot per request handled and not yet taken by the caller
    started: asyncio.Queue[asyncio.Future[T] | Exception | None] = asyncio.Queue()
    running: set[asyncio.Future[T]] = set()

    async def read() -> None:
        iterator = aiter(requests)
        try:
            while True:
                await slots.acquire()  # before reading: a request read is never dropped for want of a slot
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                task = asyncio.ensure_future(handle(request))
                running.add(task)
                started.put_nowait(task)
        except asyncio.CancelledError:
            if draining is None or not draining.is_set():
                raise
            started.put_nowait(ShuttingDown("the server is shutting down: this stream's requests before this point "
                                            "are answered; send the rest on a new stream (to another server)"))
        except Exception as exc:  # noqa: BLE001 - raised in its place, after the answers before it
            started.put_nowait(exc)
        else:
            started.put_nowait(None)

    reader = asyncio.create_task(read())
    watcher = asyncio.create_task(draining.wait()) if draining is not None else None
    if watcher is not None:
        watcher.add_done_callback(lambda _: reader.cancel())  # a reader done already ignores it
    try:
        while (item := await started.get()) is not None:
            if isinstance(item, Exception):
                raise item
            await asyncio.wait([item])
            yield item
            running.discard(item)
            slots.release()
    finally:
        reader.cancel()
        if watcher is not None:
            watcher.cancel()
        for task in running:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: asyncio would log an answer nobody takes as "never retrieved"


def rpc(name: str, model_field: str = "model") -> Callable[[UnaryMethod], Callable[..., Awaitable[Message]]]:
    """Make ``async def handler(self, request) -> Answer`` a grpc.aio unary method with status and metrics."""

    def decorate(method: UnaryMethod) -> Callable[..., Awaitable[Message]]:
        @functools.wraps(method)
        async def handler(self: Handler, request: Any, context: grpc.aio.ServicerContext) -> Message:
            try:
                return (await answer(self, name, method, request, model_field, context=context)).message
            except Exception as exc:  # every failure becomes a status; the server keeps serving
                fail(context, exc)
                return None

        return handler

    return decorate


class _Undecodable(NamedTuple):
    """What the guarded deserializer returns instead of raising: gRPC would answer UNKNOWN and log a traceback."""

    error: UndecodableRequest


class RequestDecodeGuard(grpc.aio.ServerInterceptor):
    """Answer requests that do not parse as their message type with INVALID_ARGUMENT.

    grpc.aio deserializes before the handler runs and reports a parse failure as UNKNOWN with protobuf's
    internals (and an ERROR traceback in the log per request, which a hostile client could use to flood
    it). This wraps each method's deserializer so the failure reaches the handler as a value, and the
    handler's wrapper turns it into a status that says what was expected. ``on_refused(method, code)``
    counts each such call (the handler, which counts calls, never runs).
    """

    def __init__(self, on_refused: Refused) -> None:
        self._on_refused = on_refused

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize, method = handler.request_deserializer, handler_call_details.method

        def guarded(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as e:  # noqa: BLE001 - any parse failure is the client's malformed message
                reason = "a string field is not valid UTF-8" if "UTF-8" in str(e) else "its wire format is corrupt"
                return _Undecodable(UndecodableRequest(
                    f"the request is not a valid message for {method}: {reason}; expected the message of the "
                    f"RPC's .proto definition, serialized by a protobuf library"))

        def refused() -> None:
            self._on_refused(method, grpc.StatusCode.INVALID_ARGUMENT.name)

        kind = kind_of(handler)
        guard = _guard_stream if handler.request_streaming else _guard_unary
        return handler._replace(request_deserializer=guarded, **{kind: guard(getattr(handler, kind), refused)})


def _guard_unary(behavior: Callable[..., Any], refused: Callable[[], None]) -> Callable[..., Any]:
    """The wrapper keeps the behavior's style: grpc.aio tells generator handlers from ``context.write`` ones."""
    if inspect.isasyncgenfunction(behavior):
        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                refused()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
            async for reply in behavior(request, context):
                yield reply

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            refused()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
        return await behavior(request, context)

    return coroutine


def _guard_stream(behavior: Callable[..., Any], refused: Callable[[], None]) -> Callable[..., Any]:
    """A client stream's bad message ends the call with INVALID_ARGUMENT, after the replies already sent."""

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                refused()
                raise request.error
            yield request

    if inspect.isasyncgenfunction(behavior):
        async def generator(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for reply in behavior(checked(requests), context):
                    yield reply
            except UndecodableRequest as e:  # handlers that do not map errors themselves (reflection)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        return generator

    async def coroutine(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(checked(requests), context)
        except UndecodableRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return coroutine
