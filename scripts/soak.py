#!/usr/bin/env python
"""Soak test: mixed RPCs at high concurrency against a server, watching its memory, file descriptors and threads.

    python scripts/soak.py --duration 600                  # starts its own server on exported/
    python scripts/soak.py --target host:50051 --pid 1234  # a running server (pid: to read /proc)

Workers (``--concurrency``, default 64) loop over a mix of calls, each with the status it must end with:
answers on both APIs (domain and KServe v2, unary and streaming), metadata and health calls, and calls
that must fail in a documented way (a malformed record: INVALID_ARGUMENT; an unknown model: NOT_FOUND; a
stream the client cancels: CANCELLED). Every few calls a worker opens a fresh connection, so leaked
sockets would show. The verdict, printed with the figures:

- no call ended with a status other than its expected one;
- RSS after warm-up grew by at most ``--max-rss-growth`` (median of the first vs the last seconds);
- no thread growth under load after warm-up, and no file-descriptor growth between the idle server before
  the load and after it. The thread check counts the server's own threads: gRPC core's EventEngine pool
  (threads named ``event_engine``) adds a thread by itself whenever its work queue stays backlogged, with
  no bound to set (grpc/grpc#37180), so it is reported beside them but not judged.

Runs in its own process (``tests/reliability/test_soak.py`` runs it with ``--duration 30``): it imports
the server's KServe messages, which cannot share a process with tritonclient's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serving.card import CardError, ModelCard  # noqa: E402 - after the path set-up that makes the script runnable anywhere
from serving.process import ServerProcess  # noqa: E402
from serving.protos import classifier_pb2 as pb  # noqa: E402
from serving.protos import classifier_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: E402

OK = grpc.StatusCode.OK
Call = Callable[["Stubs"], Awaitable[None]]
RECORD = pb.DiabetesRecord(features=[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8])
PIXELS = pb.Image(pixels=bytes(range(256)) * 3 + bytes(16))
NEW_CONNECTION_EVERY = 25  # calls per worker between fresh connections
SETTLE_S = 3.0  # seconds of samples averaged at the start and the end of the measured window


#: The name gRPC core gives the threads of its EventEngine pool, which grows under load on its own.
GRPC_POOL_THREAD = "event_engine"


@dataclass
class Sample:
    t: float
    rss_mb: float
    threads: int  # the server's own threads: all but gRPC's EventEngine pool
    grpc_pool_threads: int
    fds: int


def sample(pid: int, start: float) -> Sample:
    """RSS from /proc/<pid>/status, threads by name from /proc/<pid>/task, open descriptors from /proc/<pid>/fd."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append(task.joinpath("comm").read_text().strip())
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
    pool = names.count(GRPC_POOL_THREAD)
    return Sample(round(time.monotonic() - start, 1), int(fields["VmRSS"].split()[0]) / 1024,
                  len(names) - pool, pool, len(os.listdir(f"/proc/{pid}/fd")))


class Stubs:
    """The stubs of one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.classifier = classifier_pb2_grpc.ClassifierStub(channel)
        self.kserve = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


def call_mix(repo: Path, timeout: float) -> list[tuple[str, grpc.StatusCode, Call]]:
    """(name, expected status, call) for every kind of call the repository's models allow."""
    tasks = {}
    for path in sorted(repo.glob("*/*/model.json")):
        try:
            card = ModelCard.load(path.parent)
        except CardError:  # a broken version: the server does not serve it either
            continue
        tasks[card.task] = card
    mix: list[tuple[str, grpc.StatusCode, Call]] = []

    def add(name: str, expected: grpc.StatusCode, call: Call) -> None:
        mix.append((name, expected, call))

    async def stream(s: Stubs, model: str, n: int) -> None:
        replies = [r async for r in s.classifier.StreamClassifyDigits(
            (pb.ClassifyDigitsRequest(model=model, images=[PIXELS], id=str(i)) for i in range(n)), timeout=timeout)]
        assert [r.id for r in replies] == [str(i) for i in range(n)], "stream answers out of order"

    async def cancelled_stream(s: Stubs, model: str) -> None:
        """The client gives up after the first answer; the server must clean up after it."""
        call = s.classifier.StreamClassifyDigits(
            (pb.ClassifyDigitsRequest(model=model, images=[PIXELS]) for _ in range(1000)), timeout=timeout)
        await call.read()
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED, "the stream did not end as cancelled"

    if "diabetes" in tasks:
        model = tasks["diabetes"].name
        add("ClassifyDiabetes", OK, lambda s: s.classifier.ClassifyDiabetes(
            pb.ClassifyDiabetesRequest(model=model, records=[RECORD] * random.randint(1, 8)), timeout=timeout))
        add("ClassifyDiabetes (7 features)", grpc.StatusCode.INVALID_ARGUMENT, lambda s: s.classifier.ClassifyDiabetes(
            pb.ClassifyDiabetesRequest(model=model, records=[pb.DiabetesRecord(features=[0.1] * 7)]), timeout=timeout))
    if "names" in tasks:
        add("ClassifySequences names", OK, lambda s: s.classifier.ClassifySequences(
            pb.ClassifySequencesRequest(texts=random.sample(["Rossi", "Nakamura", "Schmidt", "Dubois"], 2), top_k=3),
            timeout=timeout))
    if "hello" in tasks:
        model_h = tasks["hello"].name
        add("ClassifySequences hello", OK, lambda s: s.classifier.ClassifySequences(
            pb.ClassifySequencesRequest(model=model_h, texts=["hello", "ohlol"]), timeout=timeout))
    if "digits" in tasks:
        model_d = tasks["digits"].name
        add("ClassifyDigits", OK, lambda s: s.classifier.ClassifyDigits(
            pb.ClassifyDigitsRequest(model=model_d, images=[PIXELS] * random.randint(1, 4)), timeout=timeout))
        add("StreamClassifyDigits", OK, lambda s: stream(s, model_d, 3))
        add("StreamClassifyDigits (cancelled)", OK, lambda s: cancelled_stream(s, model_d))
    if "regression" in tasks:
        card = tasks["regression"]
        tensor = card.inputs[0]
        add("ModelInfer", OK, lambda s: s.kserve.ModelInfer(inference_pb2.ModelInferRequest(
            model_name=card.name, inputs=[inference_pb2.ModelInferRequest.InferInputTensor(
                name=tensor.name, datatype=tensor.datatype, shape=[2, 1])],
            raw_input_contents=[np.array([[1.0], [4.0]], np.float32).tobytes()]), timeout=timeout))
        add("ModelMetadata", OK, lambda s: s.kserve.ModelMetadata(
            inference_pb2.ModelMetadataRequest(name=card.name), timeout=timeout))
    add("ModelInfer (unknown model)", grpc.StatusCode.NOT_FOUND, lambda s: s.kserve.ModelInfer(
        inference_pb2.ModelInferRequest(model_name="no_such_model"), timeout=timeout))
    add("ServerReady", OK, lambda s: s.kserve.ServerReady(inference_pb2.ServerReadyRequest(), timeout=timeout))
    add("ListModels", OK, lambda s: s.classifier.ListModels(pb.ListModelsRequest(), timeout=timeout))
    add("Health", OK, lambda s: s.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout))
    return mix


@dataclass
class Report:
    duration_s: float
    concurrency: int
    calls: int = 0
    calls_per_s: float = 0.0
    by_call: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    unexpected_examples: list[str] = field(default_factory=list)
    idle_before: Sample | None = None
    idle_after: Sample | None = None
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_growth: float = 0.0
    threads_start: int = 0
    threads_end: int = 0
    grpc_pool_threads_start: int = 0
    grpc_pool_threads_end: int = 0
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def load(target: str, pid: int, mix: list[tuple[str, grpc.StatusCode, Call]], args: argparse.Namespace,
               report: Report) -> None:
    start = time.monotonic()
    stop_at = start + args.duration
    shared = grpc.aio.insecure_channel(target)
    counts: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()

    async def one(stubs: Stubs, name: str, expected: grpc.StatusCode, call: Call) -> None:
        try:
            await call(stubs)
            code, detail = OK, ""
        except grpc.RpcError as e:  # grpc.aio.AioRpcError
            code, detail = e.code(), e.details() or ""
        except AssertionError as e:  # a wrong answer
            code, detail = grpc.StatusCode.UNKNOWN, f"client-side check: {e}"
        counts[name] += 1
        if code != expected:
            unexpected[f"{name}: {code.name}"] += 1
            if len(report.unexpected_examples) < 10:
                report.unexpected_examples.append(f"{name}: expected {expected.name}, got {code.name}: {detail}")

    async def worker(i: int) -> None:
        rng = random.Random(i)
        n = 0
        while time.monotonic() < stop_at:
            name, expected, call = rng.choice(mix)
            if n % NEW_CONNECTION_EVERY == NEW_CONNECTION_EVERY - 1:
                # Its own subchannel pool, or gRPC would hand it the shared channel's connection.
                async with grpc.aio.insecure_channel(target, [("grpc.use_local_subchannel_pool", 1)]) as fresh:
                    await one(Stubs(fresh), name, expected, call)
            else:
                await one(Stubs(shared), name, expected, call)
            n += 1

    async def watch() -> None:
        while time.monotonic() < stop_at:
            report.samples.append(sample(pid, start))
            await asyncio.sleep(1.0)

    await asyncio.gather(watch(), *(worker(i) for i in range(args.concurrency)))
    await shared.close()
    report.calls = sum(counts.values())
    report.calls_per_s = round(report.calls / args.duration, 1)
    report.by_call = dict(sorted(counts.items()))
    report.unexpected = dict(unexpected)


def judge(report: Report, args: argparse.Namespace) -> None:
    """Fill in the figures and the failures from the samples."""
    window = [s for s in report.samples if s.t >= args.warmup]
    if len(window) < 2 * SETTLE_S:
        report.failures.append(f"too few samples after warm-up ({len(window)}): run longer than --warmup + 6 s")
        return
    first = [s for s in window if s.t < window[0].t + SETTLE_S]
    last = [s for s in window if s.t > window[-1].t - SETTLE_S]
    report.rss_start_mb = round(statistics.median(s.rss_mb for s in first), 1)
    report.rss_end_mb = round(statistics.median(s.rss_mb for s in last), 1)
    report.rss_peak_mb = round(max(s.rss_mb for s in window), 1)
    report.rss_growth = round(report.rss_end_mb / report.rss_start_mb - 1, 4)
    report.threads_start, report.threads_end = max(s.threads for s in first), max(s.threads for s in last)
    report.grpc_pool_threads_start = max(s.grpc_pool_threads for s in first)
    report.grpc_pool_threads_end = max(s.grpc_pool_threads for s in last)
    if report.unexpected:
        report.failures.append(f"unexpected statuses: {report.unexpected}")
    if report.rss_growth > args.max_rss_growth:
        report.failures.append(f"RSS grew by {report.rss_growth:.1%} after warm-up (limit {args.max_rss_growth:.0%})")
    if report.threads_end > report.threads_start:
        report.failures.append(f"threads grew from {report.threads_start} to {report.threads_end}")
    if report.idle_before and report.idle_after and report.idle_after.fds > report.idle_before.fds:
        report.failures.append(f"open file descriptors grew from {report.idle_before.fds} to {report.idle_after.fds}")


def print_report(report: Report) -> None:
    print(f"soak: {report.calls} calls in {report.duration_s:g} s at concurrency {report.concurrency} "
          f"({report.calls_per_s}/s); unexpected statuses: {sum(report.unexpected.values())}")
    for name, n in report.by_call.items():
        print(f"  {n:7d}  {name}")
    for example in report.unexpected_examples:
        print(f"  unexpected: {example}")
    if report.idle_before and report.idle_after:
        before, after = report.idle_before, report.idle_after
        print(f"idle server before -> after: RSS {before.rss_mb:.1f} -> {after.rss_mb:.1f} MiB, "
              f"threads {before.threads} -> {after.threads}, fds {before.fds} -> {after.fds}")
    print(f"under load after warm-up: RSS {report.rss_start_mb} -> {report.rss_end_mb} MiB ({report.rss_growth:+.1%}, "
          f"peak {report.rss_peak_mb}), threads {report.threads_start} -> {report.threads_end} "
          f"(gRPC's pool beside them: {report.grpc_pool_threads_start} -> {report.grpc_pool_threads_end})")
    print("verdict: " + ("PASS" if not report.failures else "FAIL: " + "; ".join(report.failures)))


async def main_async(args: argparse.Namespace) -> Report:
    proc = None
    if args.target:
        target, pid = args.target, args.pid
    else:
        # as the tests start it: on an ephemeral loopback port, output drained, a timeout if it never serves
        server = ServerProcess(args.repo, "--metrics-port", "-1", "--poll-interval-s", "0").start()
        proc = server.proc
        assert proc is not None
        target, pid = server.target, proc.pid
    report = Report(duration_s=args.duration, concurrency=args.concurrency)
    try:
        async with grpc.aio.insecure_channel(target) as channel:  # ready, then measured idle
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        report.idle_before = sample(pid, 0)
        await load(target, pid, call_mix(args.repo, args.timeout), args, report)
        await asyncio.sleep(1.0)  # let the server close the last connections
        report.idle_after = sample(pid, 0)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 60)
            if code != 0:
                report.failures.append(f"the server exited with {code} after SIGTERM")
    judge(report, args)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT / "exported",
                        help="model repository (the server's, or the one to start a server on)")
    parser.add_argument("--target", default="", help="a running server's address; default: start one")
    parser.add_argument("--pid", type=int, default=0, help="the running server's process id (with --target)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the measured window")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    parser.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth after warm-up")
    parser.add_argument("--json", type=Path, help="also write the report here")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.target and not args.pid:
        raise SystemExit("--target needs --pid: the figures are read from /proc/<pid>")
    report = asyncio.run(main_async(args))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
