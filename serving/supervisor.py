"""``coursezoo serve --workers N``: N server processes answering on one port, for the cores one process
cannot use.

A server process runs every RPC's Python work (gRPC's handler plumbing, decoding one image, replies) on
one event loop, so one process tops out near one core's worth of requests (docs/performance.md: single
images at 64 calls in flight saturate its event loop while the second core stays half idle). Workers
are whole servers, each with its own models, batchers and decoding processes; the kernel spreads new
connections over them (``SO_REUSEPORT``), and a connection stays with the worker that accepted it, so a
client reaches them all only over several connections (``CourseZooClient(connections=N)``).

The supervisor (the process ``coursezoo serve`` starts as) holds the port from before the workers bind
it until the end, prints one banner once every worker serves, passes SIGTERM/SIGINT/SIGHUP on (each worker
drains as a single server does) and exits 0 once all have stopped. A worker that dies stops the others
and the supervisor exits 1: a restart policy (compose, Kubernetes) brings the whole server back, rather
than one that quietly serves with fewer workers.

The supervisor also serves the one ``/metrics`` on ``--metrics-port``, summed over the workers, so a
scrape sees the whole server's traffic as for one process (``WorkerMetrics``: prometheus-client's
multiprocess mode, the workers' values in files of a private directory); the workers serve none. It binds
that port before any worker starts, so a taken one fails the start as for one process.

What differs from one process: each worker has its own health state, and model control
(RepositoryModelLoad/Unload) and system shared memory are off, since a load, an unload or a registered region
would only reach the worker that received it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from serving.decoding import MAX_AUTO_PROCESSES
from serving.metrics import WorkerMetrics
from serving.security import ConfigError
from serving.workers import cores, start_resource_tracker

if TYPE_CHECKING:
    from serving.server import ServerSettings

#: How long the supervisor waits for a worker to load its models and report in.
START_TIMEOUT_S = 300.0
#: Beyond --grace-s: the batchers' drain and the process exit after the grace period.
STOP_MARGIN_S = 30.0
#: How a server's banner starts its metrics line.
METRICS_LINE = "metrics on "


def worker_settings(settings: ServerSettings, port: int, index: int) -> ServerSettings:
    """The settings of worker ``index``: the reserved port, no metrics port (the supervisor serves the
    workers' metrics together), model control and shared memory off (state one worker would hold and the
    others not) and, unless given, ONNX Runtime threads and decoding processes shared out, so N workers do
    not each start pools as large as the machine."""
    share = max(1, cores() // settings.workers)
    return dataclasses.replace(
        settings, port=port, model_control="off", shared_memory="off", workers=1, metrics_port=-1,
        intra_op_threads=settings.intra_op_threads or share,
        decode_processes=min(MAX_AUTO_PROCESSES, share) if settings.decode_processes < 0 else settings.decode_processes)


def reserve_port(host: str, port: int) -> socket.socket:
    """Fail like a single server when something holds ``host:port`` already, then hold it (``port`` 0: a free
    one) with ``SO_REUSEPORT`` so that the workers, binding it the same way, share it and nobody else can."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    # SO_REUSEADDR, as gRPC binds: connections of the previous run left in TIME_WAIT must not stop a
    # restart on the same port (a listener still fails the probe).
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise OSError(f"cannot bind {host}:{port}: {e.strerror}") from e
        address = (address[0], probe.getsockname()[1], *address[2:])
    held = socket.socket(family, kind, proto)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(address)
    return held


def supervise(settings: ServerSettings) -> int:
    """Run ``settings.workers`` servers on one port until a stop signal; the exit code of ``coursezoo serve``."""
    per_process = (("--model-control", settings.model_control, "a RepositoryModelLoad/Unload would reach only the "
                                                                "worker that received it"),
                   ("--shared-memory", settings.shared_memory, "a region registered through one worker would be "
                                                                "unknown to the others"))
    for flag, mode, why in per_process:
        if mode == "on":
            raise ConfigError(f"{flag} on needs --workers 1: with {settings.workers} workers {why}")
    with contextlib.ExitStack() as held:  # the port and the metrics, released once every worker has stopped
        port = held.enter_context(reserve_port(settings.host, settings.port)).getsockname()[1]
        metrics: WorkerMetrics | None = None
        if settings.metrics_port >= 0:
            metrics = held.enter_context(contextlib.closing(WorkerMetrics(settings.metrics_port, settings.host)))
        stop = _StopSignal()
        ctx = multiprocessing.get_context("spawn")
        start_resource_tracker()
        workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
        served = False
        try:
            for index in range(settings.workers):
                reports, child_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(worker_settings(settings, port, index), child_end),
                                   name=f"coursezoo-worker-{index}")
                proc.start()
                child_end.close()
                workers.append((proc, reports))
            banners = [_await_report(proc, reports, index, stop) for index, (proc, reports) in enumerate(workers)]
            served = stop.signum is None
            if served:
                print(_banner(banners[0], settings, metrics), flush=True)
                failed = _wait(workers, stop)
            else:
                failed = None
        except _WorkerFailed as e:
            print(f"coursezoo serve: {e}", file=sys.stderr, flush=True)
            failed = e
        finally:
            print(f"coursezoo shutting down (grace {settings.grace_s:g} s)", flush=True)
            _stop_all(workers, settings.grace_s + STOP_MARGIN_S, metrics)
    print("coursezoo stopped", flush=True)
    if failed is not None:
        return 1
    if stop.signum is not None and not served:
        # Stopped while starting: a stop signal sent to the whole process group (Ctrl-C, systemd's
        # KillMode=control-group) reached workers still importing, which end by the signal, or with 1 from a
        # KeyboardInterrupt in multiprocessing's bootstrap. Nothing served: a clean stop, not a failure.
        return 0
    # A worker that had not installed its handlers yet ends by the signal the group got: a clean stop too.
    stopped = {0} | ({-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP} if stop.signum is not None else set())
    return 1 if any(proc.exitcode not in stopped for proc, _ in workers) else 0


#: What stops a server (one process or a supervisor) gracefully: SIGTERM (orchestrators), SIGINT (Ctrl-C) and
#: SIGHUP (its terminal closed, ``systemctl reload`` without a reload command), which killed it at once, calls
#: in flight with it, and left a supervisor's metrics directory behind.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _WorkerFailed(RuntimeError):
    pass


class _StopSignal:
    """A stop signal (``STOP_SIGNALS``) noted (not raised) while the supervisor waits on its workers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, _frame: object) -> None:
        self.signum = signum


def _await_report(proc: multiprocessing.process.BaseProcess, reports: multiprocessing.connection.Connection,
                  index: int, stop: _StopSignal) -> str:
    """Worker ``index``'s banner once it serves; _WorkerFailed with its reason if it cannot."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while stop.signum is None:
        if reports.poll(0.2):
            try:
                kind, text = reports.recv()
            except EOFError:
                kind, text = "error", f"exited with code {proc.exitcode} before serving"
            if kind == "error" and stop.signum is None:  # with a stop signal, a worker's end is the stop
                raise _WorkerFailed(f"worker {index}: {text}")
            return text
        if not proc.is_alive() and stop.signum is None:
            raise _WorkerFailed(f"worker {index} exited with code {proc.exitcode} before serving")
        if time.monotonic() > deadline:
            raise _WorkerFailed(f"worker {index} did not start within {START_TIMEOUT_S:g} s")
    return ""


def _wait(workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]],
          stop: _StopSignal) -> _WorkerFailed | None:
    """Until a stop signal (None) or a worker's end (the failure to report)."""
    sentinels = {proc.sentinel: (index, proc) for index, (proc, _) in enumerate(workers)}
    while stop.signum is None:
        for ready in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
            if stop.signum is not None:  # the group was signalled: a worker ending now is the stop, not a failure
                return None
            index, proc = sentinels[ready]  # type: ignore[index]
            proc.join()
            failure = _WorkerFailed(f"worker {index} (pid {proc.pid}) exited with code {proc.exitcode}; "
                                    "stopping the others")
            print(f"coursezoo serve: {failure}", file=sys.stderr, flush=True)
            return failure
    return None


def _stop_all(workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]],
              timeout: float, metrics: WorkerMetrics | None) -> None:
    """SIGTERM every live worker (each drains its calls), SIGKILL those still alive after ``timeout``; the
    gauges of each that has ended leave ``metrics``."""
    for proc, _ in workers:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc, _ in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
        if metrics is not None and proc.pid is not None:
            metrics.worker_ended(proc.pid)


def _banner(banner: str, settings: ServerSettings, metrics: WorkerMetrics | None) -> str:
    """Worker 0's banner (address, security, models) with a line on the workers and one on the metrics."""
    first, *rest = banner.splitlines()
    lines = [first, f"{settings.workers} worker processes share the port; model control off"]
    if metrics is not None:
        lines.append(f"{METRICS_LINE}http://{settings.host}:{metrics.port}/metrics (summed over the workers)")
    return "\n".join([*lines, *rest])


def _worker(settings: ServerSettings, reports: multiprocessing.connection.Connection) -> None:
    """A worker: the single-process server on the shared port, reporting its banner (or why it failed)."""
    from coursezoo import logs
    from serving.server import run_worker

    logs.setup()
    sys.exit(run_worker(settings, reports))
