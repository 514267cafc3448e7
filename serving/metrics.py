"""Prometheus metrics of the server, all prefixed ``coursezoo_``, served on ``--metrics-port``.

One ``Metrics`` object per server owns its own registry, so tests can run several servers (or build
one twice) in a process without prometheus-client's duplicate-name errors. Label children are cached
per (model, version, rpc): ``Counter.labels`` takes a lock and builds a tuple on every call, and this sits
on the per-request path.

Every per-model series carries the version too, as Triton's do: while a new version serves beside the old
one (a canary, a rollback), its errors and latency must not hide in the model's sums. A version that leaves
the repository takes its series with it (``set_model_ready(..., None)``): a server that takes a new export
every night would otherwise keep a year of versions' series.

With ``--workers N`` the server is N processes, and a scrape of one would see a share of the traffic.
``WorkerMetrics`` (the supervisor's) uses prometheus-client's multiprocess mode, as gunicorn setups do:
each worker, started with ``PROMETHEUS_MULTIPROC_DIR`` in its environment, keeps its values in files of
that directory (prometheus-client chooses where values live when it is imported), and the supervisor's
one ``/metrics`` sums them. One process (``--workers 1``) keeps its values in memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
    multiprocess,
)

# No ``*_created`` twin of every counter and histogram series: Prometheus 3 does not need them (it ingests
# created timestamps another way, if asked) and they doubled the series an operator scrolls through.
disable_created_metrics()

#: Request latency buckets (seconds): sub-millisecond unary calls up to multi-second bulk batches.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Items per model execution: single requests merged up to --max-batch-size, or one client batch up to the
#: request limit (1024 by default), which runs whole.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Queue waits and model executions: from a CNN's 25 µs run of one image (and a lone request's zero wait) up.
DURATION_BUCKETS = (0.0001, 0.00025, *LATENCY_BUCKETS)
#: The labels of a model version's series, and of a call's (which RPC asked it).
PER_VERSION = ["model", "version"]
PER_CALL = [*PER_VERSION, "rpc"]


class _BatchChildren(NamedTuple):
    """A model's batcher-side series, looked up once (see the module's docstring)."""

    batch_size: Callable[[float], None]
    queue_depth: Callable[[float], None]
    compute: Callable[[float], None]
    queue: Callable[[float], None]


def _uncounted(_: float) -> None:
    """A hook of a version that has left the repository: nothing is counted."""


_UNCOUNTED = _BatchChildren(_uncounted, _uncounted, _uncounted, _uncounted)


class Metrics:
    """The server's counters, histograms and gauges, and the hooks that update them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        # The process's memory, CPU, open files and start time (restarts), and Python's collections: what an
        # operator watches for leaks and restarts (the soak test measures RSS and descriptors the same way).
        # (Not under --workers N: the supervisor's /metrics sums the workers' value files, which hold none.)
        for collector in (ProcessCollector, GCCollector, PlatformCollector):
            collector(registry=reg)
        # A stream's messages count one by one: each is a request with its own answer or error.
        self.requests = Counter("coursezoo_requests", "Requests (unary calls, and each message of a stream), per "
                                "model version and RPC", PER_CALL, registry=reg)
        self.failures = Counter("coursezoo_request_failures", "Requests answered with an error status (a stream's "
                                "failed message too, in place or ending the stream)", [*PER_CALL, "code"],
                                registry=reg)
        self.items = Counter("coursezoo_items", "Items (images, records, texts, batch rows) answered",
                             PER_CALL, registry=reg)
        self.latency = Histogram("coursezoo_request_latency_seconds", "Time from request to response",
                                 PER_CALL, buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram("coursezoo_batch_size", "Items per model execution (dynamic batching)",
                                    PER_VERSION, buckets=BATCH_BUCKETS, registry=reg)
        self.decoders_restarted = Counter("coursezoo_decoder_restarts", "Times the image decoding processes were "
                                          "replaced after one of them died (out of memory, or a crash in a "
                                          "decoder)", registry=reg)
        # Where a request's time goes, as Triton's queue and compute durations: waiting for its batch, or the run.
        self.queue_duration = Histogram("coursezoo_queue_duration_seconds", "Time each request waited in its "
                                        "model's queue before its batch ran", PER_VERSION,
                                        buckets=DURATION_BUCKETS, registry=reg)
        self.compute_duration = Histogram("coursezoo_compute_duration_seconds", "Time each model execution took, "
                                          "from its batch's inputs being ready to its outputs (a wait for a free "
                                          "run thread included)", PER_VERSION, buckets=DURATION_BUCKETS,
                                          registry=reg)
        # multiprocess_mode applies only with --workers N (values in files, summed by WorkerMetrics); "live":
        # a worker that has ended no longer counts. Queue depth: the items waiting in all workers.
        self.queue_depth = Gauge("coursezoo_queue_depth", "Items waiting in a model version's batching queue "
                                 "(sum by model for the model's)", PER_VERSION, registry=reg,
                                 multiprocess_mode="livesum")
        # Model ready: the smallest over the workers, so it stays 0 or 1 as for one process and turns 0 as soon
        # as one worker has retired the version (the calls that reach that worker fail), not once all have. A
        # worker that could not load a version sets nothing for it: 1 = every worker that loaded it serves it.
        self.model_ready = Gauge("coursezoo_model_ready", "1 while a model version serves", PER_VERSION,
                                 registry=reg, multiprocess_mode="livemin")
        self._children: dict[tuple[str, str, str], tuple[Callable[[], None], Callable[[float], None],
                                                           Callable[[float], None]]] = {}
        self._batch_children: dict[tuple[str, str], _BatchChildren] = {}
        self._failure_labels: set[tuple[str, str, str, str]] = set()  # (model, version, rpc, code) counted
        self._gone: set[tuple[str, str]] = set()  # versions that left the repository (``_forget``), not back since
        self._lock = threading.Lock()

    def observe_request(self, model: str, version: str, rpc: str, seconds: float, items: int,
                        code: str | None = None) -> None:
        """Count one finished RPC of ``model`` at ``version`` ("" for a call of no model or version, such as
        ServerReady or RepositoryIndex); ``code`` is the gRPC status name when it failed."""
        key = (model, version, rpc)
        children = self._children.get(key)
        if children is None:
            if (model, version) in self._gone:  # a reply that left after its version did: no series comes back
                return
            children = (self.requests.labels(*key).inc, self.latency.labels(*key).observe, self.items.labels(*key).inc)
            self._children[key] = children
        inc_requests, observe_latency, inc_items = children
        inc_requests()
        observe_latency(seconds)
        if code is None:
            inc_items(items)
        else:
            self._failure_labels.add((*key, code))
            self.failures.labels(*key, code).inc()

    def observe_refusal(self, method: str, code: str) -> None:
        """Count an RPC refused before its handler ran: no or a wrong token, bytes that are not its message, a
        server shutting down. A failed request of no model or version (``""``) and no latency (nothing was served).
        ``method`` is a served method's path (``/pkg.Service/Name``): a made-up one is UNIMPLEMENTED by gRPC
        before this, so the ``rpc`` label stays bounded."""
        rpc = method.rsplit("/", 1)[-1]
        self.requests.labels("", "", rpc).inc()
        self.failures.labels("", "", rpc, code).inc()

    def observe_batch(self, model: str, version: str, size: int, seconds: float, waits: Sequence[float]) -> None:
        """Batcher hook: one model execution of ``size`` items that took ``seconds``, and its requests' waits."""
        hooks = self._batch_hooks(model, version)
        hooks.batch_size(size)
        hooks.compute(seconds)
        for wait in waits:
            hooks.queue(wait)

    def queue_changed(self, model: str, version: str, items: int) -> None:
        """Batcher hook: ``items`` entered (> 0) or left (< 0) the queue of the model's ``version``."""
        self._batch_hooks(model, version).queue_depth(items)

    def _batch_hooks(self, model: str, version: str) -> _BatchChildren:
        key = (model, version)
        children = self._batch_children.get(key)
        if children is None:
            if key in self._gone:
                return _UNCOUNTED
            with self._lock:
                children = _BatchChildren(self.batch_size.labels(*key).observe, self.queue_depth.labels(*key).inc,
                                          self.compute_duration.labels(*key).observe,
                                          self.queue_duration.labels(*key).observe)
                self._batch_children[key] = children
        return children

    def set_model_ready(self, model: str, version: str, ready: bool | None) -> None:
        """1 while the version serves, 0 while it does not (unloaded, failed to load); ``None``: the version
        is gone from the repository or held back by ``latest_versions``, and every series of it goes with it
        (``_forget``). Left at 0, every version ever retired fired an alert on ``coursezoo_model_ready == 0`` for
        good. With ``--workers N`` a series stays at its last value until the server restarts:
        prometheus-client's multiprocess files keep what a worker removes."""
        if ready is None:
            self._forget(model, version)
        else:
            self._gone.discard((model, version))  # its folder came back
            self.model_ready.labels(model, version).set(1 if ready else 0)

    def _forget(self, model: str, version: str) -> None:
        """Remove the series of a version that has left the repository, and their cached children: a version
        whose folder comes back (a rollback undone) is counted afresh. The repository retires a version (its
        queue drained) before this; a reply still on its way out is not counted, or it would bring a series of
        the version back for good (``_gone``, one entry per version retired)."""
        with self._lock:
            self._gone.add((model, version))
            removals: list[tuple[Any, tuple[str, ...]]] = [(self.model_ready, (model, version))]
            if self._batch_children.pop((model, version), None) is not None:
                removals += [(metric, (model, version)) for metric in (self.batch_size, self.queue_depth,
                                                                       self.compute_duration, self.queue_duration)]
            for key in [key for key in self._children if key[:2] == (model, version)]:
                del self._children[key]
                removals += [(metric, key) for metric in (self.requests, self.latency, self.items)]
            for labels in [labels for labels in self._failure_labels if labels[:2] == (model, version)]:
                self._failure_labels.discard(labels)
                removals.append((self.failures, labels))
            for metric, labels in removals:
                with contextlib.suppress(KeyError):  # never set: it failed to load, or was unloaded before
                    metric.remove(*labels)

    def serve(self, port: int, host: str) -> WSGIServer:
        """Start the ``/metrics`` HTTP endpoint in a daemon thread; port 0 binds an ephemeral port."""
        return serve_registry(self.registry, port, host)


#: Connections the metrics endpoint serves at once (a thread each; one more is closed at once), and how long one
#: may last in all. prometheus-client's own server bounds neither: 1,000 connections that sent half a request
#: held 1,000 threads of the server's process for good. Prometheus scrapes one at a time, within 10 s.
METRICS_CONNECTIONS = 16
METRICS_TIMEOUT_S = 10.0


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``METRICS_CONNECTIONS`` of them."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: connections beyond the bound are accepted, then closed at once

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (none left, say): the slot is not taken
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client cut off or gone is no server error: anyone can cause one, so not a traceback each."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    """Each connection ends within ``METRICS_TIMEOUT_S``, however slowly its client sends: a socket timeout
    alone bounds each read, and a byte every 9 s held a connection for days."""

    def setup(self) -> None:
        super().setup()
        # The lock orders the cut-off before finish(): a shutdown after the socket's close could hit another
        # connection that took its descriptor number meanwhile.
        self._open = threading.Lock()
        self._finished = False
        self._deadline = threading.Timer(METRICS_TIMEOUT_S, self._cut_off)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut_off(self) -> None:
        with self._open, contextlib.suppress(OSError):  # the client went already
            if not self._finished:
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._open:
            self._finished = True
        self._deadline.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged (prometheus-client's handler is silent too)."""


def serve_registry(registry: CollectorRegistry, port: int, host: str) -> WSGIServer:
    """``registry`` on ``http://host:port/metrics`` from a daemon thread; a port that cannot be bound is an
    OSError that says so in one line (the server and the supervisor check it before serving)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})  # IPv6 hosts too
        httpd = make_server(address[0], port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port} (--metrics-port): {e.strerror or e}") from e
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


class WorkerMetrics:
    """One ``/metrics`` for the worker processes of ``--workers N``, summed over them (counters, histograms,
    queue depth) by prometheus-client's ``MultiProcessCollector``.

    Created before the workers start: it binds ``host:port`` (OSError if taken, before any worker loads a
    model) and puts a fresh private directory in ``PROMETHEUS_MULTIPROC_DIR``, which the workers inherit.
    Fresh, because values left by an earlier run would be summed in. ``close`` (once every worker has
    stopped) stops the endpoint and removes the directory.
    """

    ENV = "PROMETHEUS_MULTIPROC_DIR"

    def __init__(self, port: int, host: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="coursezoo-metrics-")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)
        try:
            self._http = serve_registry(registry, port, host)
        except BaseException:
            shutil.rmtree(self.directory)
            raise
        self.port = self._http.server_port
        os.environ[self.ENV] = self.directory

    def worker_ended(self, pid: int) -> None:
        """Drop the gauges of a worker that has ended (the "live" modes); its counts stay in the sums."""
        multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        os.environ.pop(self.ENV, None)
        shutil.rmtree(self.directory, ignore_errors=True)
