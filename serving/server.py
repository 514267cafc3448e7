"""``coursezoo serve``: the gRPC inference server (domain API, KServe v2, health, reflection, metrics).

The serving loop in plain view:

  setup    ``ModelRepository.start()`` loads, verifies and warms up every export in ``--repo`` (or each model's
           ``--latest-versions`` newest);
  listen   ``build_grpc_server()`` binds the port and registers the services and interceptors;
  serve    handlers decode -> ``ServedModel.infer`` (dynamic batcher -> ONNX Runtime) -> encode;
  stop     SIGTERM/SIGINT/SIGHUP: health goes NOT_SERVING, new RPCs are refused, in-flight ones finish within
           ``--grace-s`` (open streams answer what they have read, then end UNAVAILABLE), the batchers drain,
           the process exits 0.

Every flag can also be set by an environment variable named ``COURSEZOO_`` + the flag in upper snake
case (``--metrics-port`` -> ``COURSEZOO_METRICS_PORT``); a flag beats its variable, which beats the
default. ``ServerSettings`` is the single list of those options; the parser is generated from it.
Security options (TLS, bearer token, model control) are resolved by ``serving.security``; see
docs/operations.md for how to run the server in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import math
import multiprocessing
import os
import resource
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coursezoo import logs
from serving.client import KEEPALIVE_S as CLIENT_KEEPALIVE_S
from serving.client import PING_TIMEOUT_S
from serving.decoding import MAX_AUTO_PROCESSES, POOL_MIN_IMAGES, ImageDecoder
from serving.heap import keep_freed_memory
from serving.metrics import Metrics
from serving.preprocess import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
from serving.protos import classifier_pb2, classifier_pb2_grpc, inference_pb2, inference_pb2_grpc
from serving.repository import MINIMUM, ModelRepository, ServingSettings
from serving.runtime import DEVICES, ProviderError
from serving.security import CONTROL_MODES, ConfigError, Security
from serving.services.base import RequestDecodeGuard
from serving.services.classifier import ClassifierService
from serving.services.health import HealthService
from serving.services.inference import InferenceService
from serving.services.plumbing import Refused, around, refusal
from serving.supervisor import METRICS_LINE, STOP_SIGNALS, supervise

log = logging.getLogger("coursezoo.serve")

ENV_PREFIX = "COURSEZOO_"


def _option(default: Any, help: str, *, secret: bool = False, **argparse_kwargs: Any) -> Any:
    """A settings field; ``secret`` ones stay out of ``repr`` and ``--help`` (their default may come from the env)."""
    return field(default=default, repr=not secret, metadata={"help": help, "secret": secret, **argparse_kwargs})


#: How models run and batch by default: the repository's settings, which these flags feed (one place per default).
_SERVING = ServingSettings()


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``coursezoo serve`` can be told; tests and benchmarks build it directly."""

    repo: Path = _option(Path("exported"), "model repository: <repo>/<name>/<version>/{model.onnx,model.json}")
    host: str = _option("0.0.0.0", "address to bind the gRPC port on")
    port: int = _option(50051, "gRPC port; 0 binds an ephemeral port (the bound one is printed)", minimum=0)
    device: str = _option(_SERVING.device, "ONNX Runtime device: auto tries CUDA and falls back to CPU",
                          choices=DEVICES)
    metrics_port: int = _option(8002, "Prometheus /metrics port; 0 = ephemeral (printed), -1 = off", minimum=-1)
    max_batch_size: int = _option(_SERVING.max_batch_size, "dynamic batching: most items merged from concurrent "
                                  "requests into one model execution (1 = no coalescing); one request runs whole")
    max_queue_delay_ms: float = _option(_SERVING.max_queue_delay_ms, "dynamic batching: longest wait for more items to "
                                        "join a batch; 0 = no waiting, but requests queued behind a running batch "
                                        "still join")
    adaptive_queue_delay: bool = _option(_SERVING.adaptive_queue_delay, "wait --max-queue-delay-ms out only until a "
                                         "batch holds as many requests as the last one (once a second, the whole "
                                         "delay, to see how many come): a lone caller does not wait; false = always, "
                                         "as Triton does")
    max_queue_items: int = _option(_SERVING.max_queue_items,
                                   "items a model's queue holds; beyond, UNAVAILABLE (retry later)")
    max_items_per_request: int = _option(_SERVING.max_items_per_request, "items (images, records, texts, rows) one "
                                         "request may carry")
    max_image_pixels: int = _option(DEFAULT_MAX_IMAGE_PIXELS, "largest image (width*height) before RESOURCE_EXHAUSTED",
                                    minimum=1)
    decode_processes: int = _option(-1, f"processes decoding the images of requests with {POOL_MIN_IMAGES} or more; "
                                    f"-1 = one per CPU core (at most {MAX_AUTO_PROCESSES}), 0 = decode in the "
                                    "server process", minimum=-1)
    max_message_mb: int = _option(64, "largest gRPC message, both directions, in MiB; also the most a request's "
                                  "inputs may be in shared memory and the message together", minimum=1)
    poll_interval_s: float = _option(_SERVING.poll_interval_s,
                                     "how often the repository looks for new versions; 0 = never")
    latest_versions: int = _option(_SERVING.latest_versions, "how many of each model's versions are loaded: the N "
                                   "newest that load (a newer one that fails to load does not push an older one out), "
                                   "as Triton's version_policy latest N; 0 = every version directory (policy all)")
    intra_op_threads: int = _option(_SERVING.intra_op_threads, "CPU threads one model run may use (a large batch is "
                                    "split across them); 0 = one per core")
    inline_run_ms: float = _option(_SERVING.inline_run_ms, "model runs measured to take less than this execute on the "
                                   "event loop, saving a thread hop (on a GPU, only a lone request's run; batches "
                                   "formed under load run in a thread); 0 = every run in a worker thread")
    grace_s: float = _option(10.0, "on SIGTERM/SIGINT/SIGHUP, how long in-flight RPCs may take to finish", minimum=0)
    tls_cert: str = _option("", "PEM certificate (chain) the port presents; with --tls-key the port speaks TLS only")
    tls_key: str = _option("", "PEM private key of --tls-cert")
    tls_client_ca: str = _option("", "PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
    auth_token: str = _option("", "bearer token required on every RPC but health checks (prefer the env variable "
                              "or --auth-token-file: a flag shows in ps)", secret=True)
    auth_token_file: str = _option("", "file holding the bearer token (e.g. a mounted secret)")
    auth_health: bool = _option(False, "require the token on health checks too (grpc.health.v1, ServerLive/Ready)")
    model_control: str = _option("auto", "RepositoryModelLoad/Unload and LogSettings changes: auto = on when a token "
                                 "is set or the host is loopback, off otherwise", choices=CONTROL_MODES)
    shared_memory: str = _option("auto", "Triton's system shared memory extension (tensors in the host's POSIX "
                                 "shared memory): auto = on when the host is loopback (a token is not enough: "
                                 "only clients on this host can use it), off otherwise", choices=CONTROL_MODES)
    workers: int = _option(1, "server processes sharing the port (SO_REUSEPORT), each with every model: one "
                           "process answers from one event loop, about one core's worth of requests; with more "
                           "than 1, model control and shared memory are off (serving/supervisor.py)", minimum=1)
    keep_heap: bool = _option(True, "keep freed memory for the next requests (glibc malloc: blocks up to 32 MiB from "
                              "the heap, up to 256 MiB of it kept free) instead of faulting it in anew for every "
                              "large request; false = glibc's defaults (serving/heap.py)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for secret options (a token from the environment would be printed)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.dest in _SECRETS else super()._get_help_string(action)


_SECRETS = {f.name for f in dataclasses.fields(ServerSettings) if f.metadata["secret"]}


def _boolean(text: str | bool) -> bool:
    """``--auth-health``, ``--auth-health false`` and ``COURSEZOO_AUTH_HEALTH=1`` alike."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return value in ("1", "true", "yes", "on")


def _checked(kind: Callable[[str], Any], env: str, choices: Sequence[Any] | None = None,
             least: float | None = None) -> Callable[[str], Any]:
    """``kind``, refusing values outside ``choices`` or below ``least``, in errors that name the variable too.

    argparse checks choices on flags only, never on a default (the variable): a mistyped ``COURSEZOO_DEVICE=gpu``
    must stop the start as the same flag would, not leave a server running with every model failing to load. A
    least value: ``--max-queue-items 0`` refused every request, a negative ``--grace-s`` ended the drain at once.
    """
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            why = str(e) if isinstance(e, argparse.ArgumentTypeError) else f"{text!r} is not a valid {kind.__name__}"
            raise argparse.ArgumentTypeError(f"{why} (from the flag, or else {env})") from e
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(map(str, choices))} "
                                             f"(from the flag, or else {env})")
        if isinstance(value, float) and not math.isfinite(value):  # NaN is never below the least: --grace-s nan
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (from the flag, or else {env})")
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"{text!r} is below {least}, the least this setting takes (from the "
                                             f"flag, or else {env})")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


#: the one setting that is no flag (``coursezoo.logs.setup`` reads it for every command, before the flags)
LOG_LEVEL_HELP = (f"Logs are JSON lines on stderr at the level COURSEZOO_LOG_LEVEL names: DEBUG, INFO, "
                  f"{logs.DEFAULT_LEVEL} (the default, also when the variable is empty), ERROR or CRITICAL, in any "
                  "case (any other value stops the command with a usage error). A running server's levels can be "
                  "changed by LogSettings (tritonclient's update_log_settings) where model control is on.")


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per ``ServerSettings`` field; its default comes from ``COURSEZOO_<FIELD>`` when set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter,
                                     epilog=LOG_LEVEL_HELP)
    for f in dataclasses.fields(ServerSettings):
        env = ENV_PREFIX + f.name.upper()
        kind: Any = type(f.default)
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "secret", "minimum")}
        if kind is bool:  # a bare flag means true
            kind, extra = _boolean, {"nargs": "?", "const": True, **extra}
        kind = _checked(kind, env, extra.get("choices"), f.metadata.get("minimum", MINIMUM.get(f.name)))
        # argparse runs `type` on string defaults, so an environment value is parsed like the flag.
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=os.environ.get(env, f.default),
                            help=f"{f.metadata['help']} [env {env}]", **extra)
    parser.add_argument("--no-model-control", dest="model_control", action="store_const", const="off",
                        default=argparse.SUPPRESS, help="same as --model-control off")
    return parser


class DrainGate(grpc.aio.ServerInterceptor):
    """Graceful shutdown's first step: refuse new calls with UNAVAILABLE while the calls in flight finish.

    Stopping the grpc server directly would also cancel the calls that have reached gRPC but no handler
    yet (under load, most of those in flight: the event loop picks them up one at a time), and a client
    cannot tell a CANCELLED call from one the server dropped mid-way; UNAVAILABLE says "not done, retry"
    (CourseZooClient's retry policy does, and a load balancer moves on). So the drain lasts until no call
    is in flight and none has arrived for ``QUIET_S``: by then gRPC holds no call that no handler has seen.
    """

    QUIET_S = 0.1
    #: Calls that last as long as their client wants (a health watch, told NOT_SERVING when the drain
    #: starts): not waited for, or every stop would take the whole grace period while a prober watches.
    UNBOUNDED = frozenset({"/grpc.health.v1.Health/Watch"})

    def __init__(self, on_refused: Refused) -> None:
        self.draining = False
        self.refused = 0  # calls refused while draining
        self._on_refused = on_refused
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_call = 0.0

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        self._last_call = asyncio.get_running_loop().time()
        if self.draining:
            self.refused += 1
            self._on_refused(handler_call_details.method, grpc.StatusCode.UNAVAILABLE.name)
            return refusal(handler, grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry the call")
        if handler_call_details.method in self.UNBOUNDED:
            return handler
        return around(handler, self._in_flight)

    @contextlib.asynccontextmanager
    async def _in_flight(self) -> AsyncIterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    @property
    def in_flight(self) -> int:
        """Calls a handler is running (health watches aside)."""
        return self._active

    async def drain(self, timeout: float) -> None:
        """Refuse from now on; return when no call is in flight and none came for QUIET_S, or after ``timeout``."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with contextlib.suppress(TimeoutError):
            while (quiet := loop.time() - self._last_call) < self.QUIET_S or not self._idle.is_set():
                await asyncio.wait_for(self._idle.wait(), deadline - loop.time())
                await asyncio.wait_for(asyncio.sleep(max(0.0, self.QUIET_S - quiet)), deadline - loop.time())


#: See ``build_grpc_server``: the least time between a client's pings that is not abuse (a third of
#: ``serving.client``'s interval, so that late timers never make its pings look too frequent), and how often
#: the server pings a connection with calls open and how long it waits for the answer.
MIN_CLIENT_PING_INTERVAL_S = CLIENT_KEEPALIVE_S / 3
KEEPALIVE_S = 60.0
#: How far gRPC reads ahead of a handler on each stream, with BDP probing off (see ``build_grpc_server``): more
#: than one 1024-image raw request (3.2 MB), so a lone large message still flows without waiting on the window.
STREAM_LOOKAHEAD_BYTES = 4 << 20
#: A connection with no call open for this long is closed (GOAWAY; clients reconnect on their next call), and
#: one that has not finished its handshake in HANDSHAKE_TIMEOUT_S: each holds a file descriptor, and idle ones
#: were never closed (1,100 of them took every descriptor a 1024-file limit allows).
MAX_CONNECTION_IDLE_S = 300.0
HANDSHAKE_TIMEOUT_S = 20.0


def build_grpc_server(settings: ServerSettings, classifier: ClassifierService, inference: InferenceService,
                      health: HealthService, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                      security: Security | None = None, reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    """Create the grpc.aio server with every service registered and bind its port; return (server, port).

    The one place that decides transport options: message limits (gRPC refuses a larger message from
    its length prefix with RESOURCE_EXHAUSTED, before a handler or the deserializer sees it), the
    interceptors (authentication first, then ``interceptors``) and how the port is bound (TLS when
    ``security`` has credentials). ``security`` defaults to the policy ``settings`` describe. ``reuse_port``
    is for the workers of ``--workers N``, which share the port their supervisor holds.
    """
    security = Security.from_settings(settings) if security is None else security
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Clients' keepalive pings (serving.client pings every 30 s while calls are open) are welcome this
        # often; gRPC's default, 5 minutes, counts faster pings on a quiet stream as abuse and ends the
        # connection (GOAWAY "too_many_pings"). The server pings its clients too, so a stream whose client
        # vanished without closing its connection is dropped in about a minute and a half, not two hours.
        ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_CLIENT_PING_INTERVAL_S * 1000)),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)), ("grpc.keepalive_timeout_ms", int(PING_TIMEOUT_S * 1000)),
        ("grpc.http2.ping_timeout_ms", int(PING_TIMEOUT_S * 1000)),
        # A second server on a busy port must fail, not share it silently; workers share their supervisor's.
        ("grpc.so_reuseport", int(reuse_port)),
        # gRPC sizes each stream's receive window from its bandwidth-delay probes and read far ahead of the
        # handlers: 16 streams of 3.2 MB requests to a slow model on one connection had 2,000 requests (7.2 GB)
        # read and waiting after 9 s, 61 answered. With a fixed window: 1.3 GB, bounded, and 163 answered in 12 s;
        # raw 1024-image ModelInfer on loopback unchanged (docs/operations.md).
        ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", STREAM_LOOKAHEAD_BYTES),
        ("grpc.max_connection_idle_ms", int(MAX_CONNECTION_IDLE_S * 1000)),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000)),
    ]
    refused = classifier.metrics.observe_refusal  # calls refused before a handler: counted, as handlers count theirs
    server = grpc.aio.server(interceptors=[*security.interceptors(refused), RequestDecodeGuard(refused), *interceptors],
                             options=options)
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
        if security.credentials is not None:
            port = server.add_secure_port(address, security.credentials)
        else:
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
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (), reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.security = Security.from_settings(settings)  # ConfigError now, before any model loads
        if not Path(settings.repo).is_dir():  # a typo would serve nothing, unhealthy for good, instead of failing
            raise ConfigError(f"the model repository {settings.repo} is not a directory: expected "
                              "<repo>/<name>/<version>/{model.onnx,model.json} (--repo, or COURSEZOO_REPO)")
        self.metrics = Metrics()
        # Model runs have threads of their own: on the loop's default executor, requests decoding large images
        # in threads held every thread, and another caller's 19 ms run waited 1.3 s for one.
        self._runs = _started_executor(RUN_THREADS)
        self.repository = ModelRepository(Path(settings.repo), settings, metrics=self.metrics, executor=self._runs)
        # a NOT_FOUND of health lists the model names only to callers that may list models anyway
        self.health = HealthService(self.repository,
                                    list_names=not self.security.token or self.security.protect_health)
        self.decoder = ImageDecoder(settings.decode_processes, settings.max_image_pixels,
                                    on_restart=self.metrics.decoders_restarted.inc)
        self.classifier = ClassifierService(self.repository, self.metrics, settings, self.decoder)
        self.inference = InferenceService(self.repository, self.metrics, settings, self.health,
                                          model_control=self.security.model_control,
                                          shared_memory=self.security.shared_memory)
        self._interceptors = interceptors
        self._gate: DrainGate | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        set_max_image_pixels(self.settings.max_image_pixels)  # process-wide: Pillow's own guard
        self.decoder.start()  # its processes start while the models load
        try:
            await self.repository.start()
        except BaseException:
            self.decoder.close()
            self._runs.shutdown(wait=False)
            raise
        self._gate = DrainGate(self.metrics.observe_refusal)  # created on the running loop, which its event belongs to
        try:
            self._grpc, self.port = build_grpc_server(self.settings, self.classifier, self.inference, self.health,
                                                      [self._gate, *self._interceptors], self.security,
                                                      self.reuse_port)
            if self.settings.metrics_port >= 0:  # before serving: a taken metrics port fails the start cleanly
                self._metrics_http = self.metrics.serve(self.settings.metrics_port, self.settings.host)
                self.metrics_port = self._metrics_http.server_port
        except OSError:
            await self.repository.stop()
            self.decoder.close()
            raise
        await self._grpc.start()
        await self.health.start()
        log.info("serving", extra={"host": self.settings.host, "port": self.port, "metrics_port": self.metrics_port})

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then drain the batchers."""
        grace = self.settings.grace_s if grace is None else grace
        started = asyncio.get_running_loop().time()
        deadline = started + grace
        log.info("stopping: new calls refused, those in flight finishing", extra={
            "grace_s": grace, "in_flight": self._gate.in_flight if self._gate is not None else 0})
        await self.health.stop()
        self.classifier.draining.set()  # open streams answer what they have read, then end UNAVAILABLE
        self.inference.draining.set()
        if self._gate is not None:
            await self._gate.drain(grace)
            if left := self._gate.in_flight:
                log.warning("the grace period (%g s) is over with %d calls in flight: they are cut off (CANCELLED); "
                            "a longer --grace-s lets them finish", grace, left, extra={"grace_s": grace,
                                                                                       "cut_off": left})
        if self._grpc is not None:
            # Once drained, only calls the gate does not wait for are left (health watches): they end here,
            # as does whatever still runs when the grace period is over.
            remaining = deadline - asyncio.get_running_loop().time()
            await self._grpc.stop(max(0.0, min(remaining, DrainGate.QUIET_S)))
        await self.repository.stop()
        self._runs.shutdown(wait=False)  # idle: every batcher has finished
        await asyncio.to_thread(self.decoder.close)  # waits for its processes to exit
        self.inference.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped", extra={"seconds": round(asyncio.get_running_loop().time() - started, 3),
                                   "refused_while_draining": self._gate.refused if self._gate is not None else 0})

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
            lines.append(f"{METRICS_LINE}http://{host}:{self.metrics_port}/metrics")
        lines.append(self.security.describe())
        rows = [("MODEL", "VERSION", "TASK", "PROVIDER", "METRIC")]
        rows += [(m.name, m.version, m.card.task, m.provider, str(m.card.metrics.get("verdict", "")))
                 for m in self.repository.models()]  # by name, then version
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        if len(rows) == 1:
            lines.append(f"(no model loaded from {self.settings.repo})")
        return "\n".join(lines)


#: Threads of the model runs' executor, and of the loop's default one: Python's default size for both.
RUN_THREADS = min(32, (os.cpu_count() or 1) + 4)


def _started_executor(workers: int) -> ThreadPoolExecutor:
    """A thread pool with all its threads running: ``ThreadPoolExecutor`` starts one per busy submit, so
    ``workers`` tasks that wait for each other start them all."""
    executor = ThreadPoolExecutor(workers, thread_name_prefix="coursezoo-worker")
    everyone = threading.Barrier(workers + 1)
    for _ in range(workers):
        executor.submit(everyone.wait)
    everyone.wait()
    return executor


async def serve(settings: ServerSettings, stop: asyncio.Event | None = None,
                ready: Callable[[str], None] | None = None, reuse_port: bool = False) -> None:
    """Run until ``stop`` is set or a stop signal (SIGTERM/SIGINT/SIGHUP) arrives, then shut down gracefully.

    The banner goes to ``ready`` when given (a worker reporting to its supervisor), else to stdout with
    the shutdown messages.
    """
    stop = stop or asyncio.Event()
    say = (lambda _: None) if ready else functools.partial(print, flush=True)
    if settings.keep_heap:
        keep_freed_memory()
    loop = asyncio.get_running_loop()
    # Loads, listings and the like go to the loop's default executor (model runs have their own, see
    # CourseZooServer); started at full size, its thread count is fixed from the first request on.
    loop.set_default_executor(_started_executor(RUN_THREADS))
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    async with CourseZooServer(settings, reuse_port=reuse_port) as server:
        # Everything alive now (modules, protobuf descriptors, cards, sessions) lives as long as the process;
        # frozen, the garbage collector stops re-scanning it in every full collection, which were the pauses
        # in the latency tail (64 clients, alternating runs: p99 36-51 ms before, 34-43 ms after).
        gc.freeze()
        (ready or say)(server.banner())
        await stop.wait()
        say(f"coursezoo shutting down (grace {settings.grace_s:g} s)")
    say("coursezoo stopped")


def run_worker(settings: ServerSettings, reports: Connection) -> int:
    """One worker of ``--workers N`` (serving.supervisor): serve on the shared port, send ("ready", banner)
    or ("error", reason) to the supervisor, and stop when it is gone, however it ended."""

    async def run() -> None:
        stop = asyncio.Event()
        parent = multiprocessing.parent_process()
        if parent is not None:  # the sentinel turns readable when the supervisor exits, and stays readable
            loop = asyncio.get_running_loop()

            def orphaned() -> None:
                loop.remove_reader(parent.sentinel)
                stop.set()

            loop.add_reader(parent.sentinel, orphaned)
        await serve(settings, stop, ready=lambda banner: reports.send(("ready", banner)), reuse_port=True)

    try:
        asyncio.run(run())
    except (OSError, ConfigError, ProviderError) as e:
        reports.send(("error", str(e)))
        return 1
    return 0


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as Go's runtime does for every program),
    and return it. Every connection is a descriptor: under systemd's default soft limit of 1024 (the hard one is
    524288) a thousand idle connections left none for new clients, the metrics port or model files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # a hard limit the kernel will not grant (RLIM_INFINITY)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: Fewer open files than this (after ``raise_open_files_limit``) is worth a warning at start: each connection, model
#: file and decoding process takes descriptors, and when they run out new clients time out and /metrics goes dark.
LOW_OPEN_FILES = 4096


def main(args: argparse.Namespace) -> int:
    if (open_files := raise_open_files_limit()) < LOW_OPEN_FILES:
        log.warning("this process may open only %d files: each connection takes one, and when they run out new "
                    "clients time out and /metrics does not answer; raise the hard limit (ulimit -n, compose's "
                    "ulimits: nofile)", open_files, extra={"open_files_limit": open_files})
    try:
        settings = ServerSettings.from_args(args)
        if settings.workers > 1:
            return supervise(settings)
        asyncio.run(serve(settings))
    except (OSError, ConfigError, ProviderError) as e:  # ProviderError: --device cuda, and no usable GPU
        print(f"coursezoo serve: {e}", file=sys.stderr)
        return 1
    return 0
