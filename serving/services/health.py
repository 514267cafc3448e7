"""grpc.health.v1 for the whole server ("") and for each model name, kept in step with the repository.

Kubernetes gRPC probes and ``grpc_health_probe`` ask for "" (the server) or a model name (is a version
of it ready?). The repository changes under us (polling picks up versions, RepositoryModelLoad and
Unload, a broken version), so the statuses are re-derived from ``repository.models()`` after every
repository RPC and on a short timer, instead of the repository knowing about health.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from serving.preprocess import quote
from serving.repository import ModelRepository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SYNC_INTERVAL_S = 1.0


#: The longest service name there can be: '' (the server) or a model name, which has at most 255 characters.
MAX_SERVICE_NAME = 255


class _Servicer(HealthServicer):
    """grpc_health's servicer, with a NOT_FOUND that says what was asked for and what may be (it had no message:
    a probe with a mistyped model name read "NOT_FOUND: " and nothing else). ``list_names``: whether that message
    lists the model names; not where callers without the token reach health, as they may not list models.

    Health is open to callers without the token (unless ``--auth-health``), so it must not hold what they send:
    a Watch of a name longer than any model name can be (255 characters) is refused at once (grpc_health waits
    on any name for ever, and keeps the request: eight 50 MiB names held 1 GB), and refusals set the status
    instead of raising (``fail``)."""

    def __init__(self, list_names: bool) -> None:
        super().__init__()
        self._list_names = list_names

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse | None:
        status = self._server_status.get(request.service)
        if status is None:
            self._not_found(request.service, context)
            return None
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if len(request.service) > MAX_SERVICE_NAME:
            self._not_found(request.service, context)
            return
        await super().Watch(request, context)

    def _not_found(self, service: str, context: grpc.aio.ServicerContext) -> None:
        expected = "'' (the server) or a model name"
        if self._list_names:
            names = sorted(self._server_status)
            expected += ": " + ", ".join(map(repr, names[:10])) + (f" and {len(names) - 10} more" if names[10:] else "")
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(f"no service {quote(service)}: expected {expected}")

    async def forget(self, service: str) -> None:
        """Drop a service whose model left the repository: Check answers NOT_FOUND as for a name never known,
        and watchers hear SERVICE_UNKNOWN (what grpc_health's Watch says of a service it does not have).
        Left NOT_SERVING, a model folder removed from a running server stayed in health until a restart."""
        self._server_status.pop(service, None)
        if (condition := self._server_watchers.get(service)) is not None:
            async with condition:
                condition.notify_all()


class HealthService:
    """Owns the grpc_health servicer and the task that keeps its statuses current."""

    def __init__(self, repository: ModelRepository, list_names: bool = True) -> None:
        self.repository = repository
        self.servicer = _Servicer(list_names)
        self._known: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.create_task(self._sync_forever(), name="health-sync")

    async def stop(self) -> None:
        """Every service goes NOT_SERVING first, so probes stop routing traffic before the port closes."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()

    async def sync(self) -> None:
        ready = {m.name for m in self.repository.models() if m.ready}
        names = {entry.name for entry in self.repository.index()}
        statuses = {name: SERVING if name in ready else NOT_SERVING for name in names}
        statuses[""] = SERVING if ready else NOT_SERVING
        for name in self._known.keys() - statuses.keys():  # its folder is gone (an unloaded model stays listed)
            await self.servicer.forget(name)
        for name, status in statuses.items():
            if self._known.get(name) != status:
                await self.servicer.set(name, status)
        self._known = statuses

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            await self.sync()
