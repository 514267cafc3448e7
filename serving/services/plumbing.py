"""gRPC method-handler plumbing for the server's interceptors: refuse a call, or run code around a handler.

grpc.aio tells handler kinds apart (unary or streaming requests and responses) and, for streaming
responses, async-generator handlers from ones that ``await context.write``; these helpers keep both,
so an interceptor can act on any RPC (ours, health, reflection) without knowing which it is.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

#: An interceptor's report of a call it refused: (method path, status code name); ``Metrics.observe_refusal``.
Refused = Callable[[str, str], None]


def kind_of(handler: grpc.RpcMethodHandler) -> str:
    """The handler's behavior attribute: ``unary_unary``, ``unary_stream``, ``stream_unary`` or ``stream_stream``."""
    requests = "stream" if handler.request_streaming else "unary"
    return f"{requests}_{'stream' if handler.response_streaming else 'unary'}"


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
            on_call: Callable[[grpc.aio.ServicerContext], None] | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends every call with ``code``; ``on_call`` sees the call's
    context first (its peer: an interceptor knows only the method and the metadata).

    It has no request deserializer: the refused request's bytes are never parsed.
    """
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        if on_call is not None:
            on_call(context)
        await context.abort(code, message)

    factory = getattr(grpc, f"{kind_of(handler)}_rpc_method_handler")
    return factory(refuse)


def around(handler: grpc.RpcMethodHandler,
           context_manager: Callable[[], AbstractAsyncContextManager[Any]]) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior run inside ``context_manager()``, a streamed reply's whole life included."""
    kind = kind_of(handler)
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):
        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with context_manager():
                async for reply in behavior(request, context):
                    yield reply

        return handler._replace(**{kind: generator})

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with context_manager():
            return await behavior(request, context)

    return handler._replace(**{kind: coroutine})
