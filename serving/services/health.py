"""grpc.health.v1 for the whole server ("") and for each model name, kept in step with the repository.

Kubernetes gRPC probes and ``grpc_health_probe`` ask for "" (the server) or a model name (is a version
of it ready?). The repository changes under us (polling picks up versions, RepositoryModelLoad and
Unload, a broken version), so the statuses are re-derived from ``repository.models()`` after every
repository RPC and on a short timer, instead of the repository knowing about health.
"""

from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from serving.repository import ModelRepository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SYNC_INTERVAL_S = 1.0


class HealthService:
    """Owns the grpc_health servicer and the task that keeps its statuses current."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.servicer = HealthServicer()
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
        statuses.update({name: NOT_SERVING for name in self._known.keys() - statuses.keys()})
        statuses[""] = SERVING if ready else NOT_SERVING
        for name, status in statuses.items():
            if self._known.get(name) != status:
                await self.servicer.set(name, status)
        self._known = statuses

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            await self.sync()
