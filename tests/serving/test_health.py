"""serving.services.health: per-model grpc.health.v1 statuses follow the repository, over a real gRPC port."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.repository import ModelRepository
from serving.services.health import HealthService
from tests.serving.test_repository import CPU_SETTINGS, add_version

SERVING, UNKNOWN = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_a_model_whose_folder_is_removed_leaves_health(tmp_path: Path) -> None:
    """It stayed NOT_SERVING until a restart; now it is NOT_FOUND, as a name never known, and a watcher hears
    SERVICE_UNKNOWN."""
    add_version(tmp_path, "diabetes_mlp", "1")
    add_version(tmp_path, "diabetes_copy", "1")

    async def main() -> None:
        repository = ModelRepository(tmp_path, CPU_SETTINGS)
        await repository.start()
        health = HealthService(repository)
        await health.start()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                check = health_pb2.HealthCheckRequest(service="diabetes_copy")
                assert (await stub.Check(check)).status == SERVING
                watch = stub.Watch(check)
                assert (await watch.read()).status == SERVING
                shutil.rmtree(tmp_path / "diabetes_copy")
                await repository._scan_all()
                await health.sync()
                assert (await watch.read()).status == UNKNOWN
                watch.cancel()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Check(check)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                assert (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status == SERVING
        finally:
            await server.stop(None)
            await health.stop()
            await repository.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
