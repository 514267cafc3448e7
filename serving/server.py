"""``coursezoo serve``: the gRPC inference server (domain API, KServe v2, health, reflection, metrics).

The serving loop in plain view:

  setup    ``ModelRepository.start()`` loads, verifies and warms up every export in ``--repo``;
  listen   ``build_grpc_server()`` binds the port and registers the services and interceptors;
  serve    handlers decode -> ``ServedModel.infer`` (dynamic batcher -> ONNX Runtime) -> encode;
  stop     SIGTERM/SIGINT: health goes NOT_SERVING, new RPCs are refused, in-flight ones finish within
           ``--grace-s``, the batchers drain, the process exits 0.

Every flag can also be set by an environment variable named ``COURSEZOO_`` + the flag in upper snake
case (``--metrics-port`` -> ``COURSEZOO_METRICS_PORT``); a flag beats its variable, which beats the
default. ``ServerSettings`` is the single list of those options; the parser is generated from it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.metrics import Metrics
from serving.preprocess import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
from serving.protos import classifier_pb2, classifier_pb2_grpc, inference_pb2, inference_pb2_grpc
from serving.repository import ModelRepository
from serving.services.classifier import ClassifierService
from serving.services.health import HealthService
from serving.services.inference import InferenceService

log = logging.getLogger("coursezoo.serve")

ENV_PREFIX = "COURSEZOO_"


def _option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``coursezoo serve`` can be told; tests and benchmarks build it directly."""

    repo: Path = _option(Path("exported"), "model repository: <repo>/<name>/<version>/{model.onnx,model.json}")
    host: str = _option("0.0.0.0", "address to bind the gRPC port on")
    port: int = _option(50051, "gRPC port; 0 binds an ephemeral port (the bound one is printed)")
    device: str = _option("auto", "ONNX Runtime device: auto tries CUDA and falls back to CPU",
                          choices=("auto", "cuda", "cpu"))
    metrics_port: int = _option(8002, "Prometheus /metrics port; 0 = ephemeral (printed), -1 = off")
    max_batch_size: int = _option(64, "dynamic batching: most items per model execution (1 = no coalescing)")
    max_queue_delay_ms: float = _option(0.0, "dynamic batching: longest wait for more items to join a batch; 0 "
                                        "= no waiting, but requests queued behind a running batch still join")
    max_queue_items: int = _option(4096, "items a model's queue holds before RESOURCE_EXHAUSTED")
    max_items_per_request: int = _option(1024, "items (images, records, texts, rows) one request may carry")
    max_image_pixels: int = _option(DEFAULT_MAX_IMAGE_PIXELS, "largest image (width*height) before RESOURCE_EXHAUSTED")
    max_message_mb: int = _option(64, "largest gRPC message, both directions, in MiB")
    poll_interval_s: float = _option(5.0, "how often the repository looks for new versions; 0 = never")
    intra_op_threads: int = _option(0, "ONNX Runtime threads per session; 0 = its default")
    grace_s: float = _option(10.0, "on SIGTERM/SIGINT, how long in-flight RPCs may take to finish")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per ``ServerSettings`` field; its default comes from ``COURSEZOO_<FIELD>`` when set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(ServerSettings):
        env = ENV_PREFIX + f.name.upper()
        kind = type(f.default)
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        # argparse runs `type` on string defaults, so an environment value is parsed like the flag.
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=os.environ.get(env, f.default),
                            help=f"{f.metadata['help']} [env {env}]", **extra)
    return parser


def build_grpc_server(settings: ServerSettings, classifier: ClassifierService, inference: InferenceService,
                      health: HealthService,
                      interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> tuple[grpc.aio.Server, int]:
    """Create the grpc.aio server with every service registered and bind its port; return (server, port).

    The one place that decides transport options: message limits, interceptors (auth and logging
    plug in here), and how the port is bound (TLS will replace ``add_insecure_port``).
    """
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it silently
    ]
    server = grpc.aio.server(interceptors=list(interceptors), options=options)
    classifier_pb2_grpc.add_ClassifierServicer_to_server(classifier, server)
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    services = (
        classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
        inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind {address}: {e}") from e
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port


class CourseZooServer:
    """The whole server in one object: ``async with CourseZooServer(settings) as s: ... s.port``.

    Used by ``coursezoo serve`` and by tests or benchmarks that want a server inside their own process.
    """

    def __init__(self, settings: ServerSettings,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.repository = ModelRepository(Path(settings.repo), settings, metrics=self.metrics)
        self.health = HealthService(self.repository)
        self.classifier = ClassifierService(self.repository, self.metrics, settings)
        self.inference = InferenceService(self.repository, self.metrics, settings, self.health)
        self._interceptors = interceptors
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        set_max_image_pixels(self.settings.max_image_pixels)  # process-wide: Pillow's own guard
        await self.repository.start()
        try:
            self._grpc, self.port = build_grpc_server(self.settings, self.classifier, self.inference, self.health,
                                                      self._interceptors)
        except OSError:
            await self.repository.stop()
            raise
        await self._grpc.start()
        await self.health.start()
        if self.settings.metrics_port >= 0:
            self._metrics_http, _ = self.metrics.serve(self.settings.metrics_port, self.settings.host)
            self.metrics_port = self._metrics_http.server_port
        log.info("serving", extra={"host": self.settings.host, "port": self.port, "metrics_port": self.metrics_port})

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then drain the batchers."""
        grace = self.settings.grace_s if grace is None else grace
        await self.health.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.repository.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def __aenter__(self) -> CourseZooServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def banner(self) -> str:
        """The address and a table of the loaded models, as ``coursezoo serve`` prints them."""
        host = self.settings.host
        lines = [f"coursezoo serving on {host}:{self.port} (domain API coursezoo.v1.Classifier, "
                 f"KServe v2 inference.GRPCInferenceService, grpc.health.v1, reflection)"]
        if self.metrics_port:
            lines.append(f"metrics on http://{host}:{self.metrics_port}/metrics")
        rows = [("MODEL", "VERSION", "TASK", "PROVIDER", "METRIC")]
        rows += [(m.name, m.version, m.card.task, m.provider, str(m.card.metrics.get("verdict", "")))
                 for m in sorted(self.repository.models(), key=lambda m: (m.name, int_or_str(m.version)))]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        if len(rows) == 1:
            lines.append(f"(no model loaded from {self.settings.repo})")
        return "\n".join(lines)


def int_or_str(version: str) -> tuple[int, str]:
    """Sort key that orders "2" before "10" and keeps non-numeric versions stable."""
    return (int(version), "") if version.isdigit() else (sys.maxsize, version)


async def serve(settings: ServerSettings, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with CourseZooServer(settings) as server:
        print(server.banner(), flush=True)
        await stop.wait()
        print(f"coursezoo shutting down (grace {settings.grace_s:g} s)", flush=True)
    print("coursezoo stopped", flush=True)


def main(args: argparse.Namespace) -> int:
    try:
        asyncio.run(serve(ServerSettings.from_args(args)))
    except OSError as e:
        print(f"coursezoo serve: {e}", file=sys.stderr)
        return 1
    return 0
