"""The load generator: a separate process that drives a server with pre-encoded requests.

Run as ``python -m bench.loadgen RESULTS.json < spec.json``; it writes one JSON list of results (to a
file, so nothing a client library prints can corrupt them). It runs in its own process so its CPU time is
not charged to the server, and so ``tritonclient``'s ``inference`` messages never meet the server's
identically named ones (protobuf keeps one global descriptor pool).

Three kinds of client, chosen by the case's ``client``:
  - ``raw``: grpc.aio with requests serialized once up front and responses left as bytes (checked once
    by parsing), so per request the client does little more than the socket work;
  - ``tritonclient-grpc`` / ``tritonclient-aio``: the real Triton client library (threads / asyncio),
    the same load client for CourseZoo's Open Inference Protocol endpoint and for the PyTriton peer;
  - ``h2load``: nghttp2's C load generator sending the same request bytes (``bench.h2load``), a client
    that costs the shared cores far less than any Python one.
Each case is a closed loop: ``concurrency`` callers each send the next request as soon as the previous
one answers, for ``seconds`` after ``warmup`` seconds of the same load. Every client spreads its callers over
the same number of TCP connections (``connections``), and each row records how many it really held open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import data
from bench.processes import group_members
from bench.stats import summarize

CLASSIFIER = "/coursezoo.v1.Classifier/"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: Every client (grpc.aio, tritonclient, h2load) opens one TCP connection per this many concurrent callers ...
CALLERS_PER_CONNECTION = 4
#: ... and, against a server of several processes (``--workers``), at least this many per process: SO_REUSEPORT
#: spreads connections, not calls, over the processes, and 4 connections landed 3:1 or 4:0 on 2 of them in 63%
#: of tries
CONNECTIONS_PER_PROCESS = 4
#: A channel argument that gives each channel a TCP connection of its own: gRPC otherwise shares one connection
#: among all the channels of a process whose arguments are identical, whatever their number
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
#: distinct requests cycled through, so no two consecutive requests are byte-identical
DISTINCT = data.DISTINCT
#: The region name a shared memory case registers its input block under.
SHM_REGION = "coursezoo-bench"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                   OWN_CONNECTION]
#: /proc/net/tcp's state of an established connection
TCP_ESTABLISHED = "01"


def connections(callers: int, processes: int = 1) -> int:
    """How many TCP connections ``callers`` concurrent callers spread over, against a server of ``processes``
    processes: one per ``CALLERS_PER_CONNECTION`` callers, at least ``CONNECTIONS_PER_PROCESS`` per process when
    there are several, never more than one per caller."""
    spread = CONNECTIONS_PER_PROCESS * processes if processes > 1 else 1
    return min(callers, max(-(-callers // CALLERS_PER_CONNECTION), spread))


def _connections(case: dict[str, Any]) -> int:
    return connections(case["concurrency"], case.get("processes", 1))


def open_connections(target: str) -> set[str]:
    """The established TCP connections this process holds to ``target``'s port (Linux /proc), by socket inode:
    what a client really opened, which the number of its channels does not tell (see ``OWN_CONNECTION``). A
    client counts those it added (``opened_since``): another channel of this process (the shared memory case's
    registration, a failed case's leftovers) is not its own."""
    port = int(target.rsplit(":", 1)[1])
    sockets = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            link = os.readlink(fd)
            if link.startswith("socket:["):
                sockets.add(link[len("socket:["):-1])
    established = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):  # no IPv6 in this kernel
            for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
                # sl, local address, remote address (hex ip:port), state, queues, timers, retransmits, uid, timeout,
                # inode (proc(5))
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[3] == TCP_ESTABLISHED and remote_port == port and fields[9] in sockets:
                    established.add(fields[9])
    return established


def opened_since(target: str, before: set[str]) -> int:
    """The connections to ``target`` this process opened since ``before`` (``open_connections``) and still holds."""
    return len(open_connections(target) - before)


@dataclasses.dataclass
class Timed:
    """One case's timed window, as a client measured it."""

    latencies: list[float]  # seconds per call
    wall: float  # seconds
    connections: int  # TCP connections the client held open to the server at the window's end


class CpuMeter:
    """CPU seconds used during the timed window by the server's whole process group (all threads, and
    PyTriton's several processes) and by this load generator: the cost per request on each side, which
    stays meaningful when a shared machine makes throughput noisy, and shows whether the client keeps
    up. The server side needs Linux /proc and a process group id."""

    def __init__(self, pgid: int | None) -> None:
        self.pgid = pgid
        self.server_seconds: float | None = None
        self.client_seconds = 0.0
        self._server_start = 0.0
        self._client_start = 0.0

    def _group_cpu(self) -> float:
        assert self.pgid is not None
        return sum(m.cpu_ticks for m in group_members(self.pgid)) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._client_start = time.process_time()
        if self.pgid:
            self._server_start = self._group_cpu()

    def stop(self) -> None:
        self.client_seconds = time.process_time() - self._client_start
        if self.pgid:
            self.server_seconds = self._group_cpu() - self._server_start


# --- requests, encoded once ------------------------------------------------------------------------------

def _digits_requests(case: dict[str, Any]) -> tuple[str, list[bytes], Callable[[bytes], None]]:
    from serving.protos import classifier_pb2 as pb

    n, batch = DISTINCT, case["batch"]
    if case.get("encoding", "png") == "png":
        images = [pb.Image(encoded=b) for b in data.pngs(n * batch)]
    else:
        images = [pb.Image(pixels=p.tobytes()) for p in data.pixels(n * batch)]
    requests = [pb.ClassifyDigitsRequest(model=case["model"], images=images[i * batch:(i + 1) * batch],
                                         id=str(i)).SerializeToString() for i in range(n)]

    def check(reply: bytes) -> None:
        got = len(pb.ClassifyDigitsResponse.FromString(reply).predictions)
        if got != batch:
            raise RuntimeError(f"ClassifyDigits answered {got} predictions for {batch} images")

    return "ClassifyDigits", requests, check


def _diabetes_requests(case: dict[str, Any]) -> tuple[str, list[bytes], Callable[[bytes], None]]:
    from serving.protos import classifier_pb2 as pb

    rows = data.diabetes_records()
    batch = case["batch"]
    requests = []
    for i in range(DISTINCT):
        idx = (np.arange(batch) + i * batch) % len(rows)
        records = [pb.DiabetesRecord(features=r.tolist()) for r in rows[idx]]
        requests.append(pb.ClassifyDiabetesRequest(model=case["model"], records=records).SerializeToString())

    def check(reply: bytes) -> None:
        if len(pb.ClassifyDiabetesResponse.FromString(reply).predictions) != batch:
            raise RuntimeError("ClassifyDiabetes answered the wrong number of predictions")

    return "ClassifyDiabetes", requests, check


def _names_requests(case: dict[str, Any]) -> tuple[str, list[bytes], Callable[[bytes], None]]:
    from serving.protos import classifier_pb2 as pb

    names, batch = data.names(), case["batch"]
    requests = [pb.ClassifySequencesRequest(model=case["model"], texts=[names[(i * batch + j) % len(names)]
                                                                        for j in range(batch)]).SerializeToString()
                for i in range(DISTINCT)]

    def check(reply: bytes) -> None:
        if len(pb.ClassifySequencesResponse.FromString(reply).predictions) != batch:
            raise RuntimeError("ClassifySequences answered the wrong number of predictions")

    return "ClassifySequences", requests, check


def digit_batches(case: dict[str, Any]) -> list[np.ndarray]:
    """``DISTINCT`` normalized FP32 batches [batch, 1, 28, 28] of real test images."""
    x = data.digit_tensors(DISTINCT * case["batch"], case["mean"], case["std"])
    return [x[i * case["batch"]:(i + 1) * case["batch"]] for i in range(DISTINCT)]


def _model_infer_requests(case: dict[str, Any]) -> tuple[str, list[bytes], Callable[[bytes], None]]:
    """KServe v2 ModelInfer with the tensor in ``raw_input_contents`` (the fast, documented form), or, for a
    ``shared_memory`` case, in the region ``_shared_inputs`` registered (batch i at offset i * its size)."""
    from tritonclient.grpc import service_pb2 as v2

    requests = []
    for i, x in enumerate(digit_batches(case)):
        req = v2.ModelInferRequest(model_name=case["model"])
        tensor = req.inputs.add(name=case["input"], datatype="FP32")
        tensor.shape.extend(x.shape)
        if case.get("shared_memory"):
            tensor.parameters["shared_memory_region"].string_param = SHM_REGION
            tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes
            tensor.parameters["shared_memory_offset"].int64_param = i * x.nbytes
        else:
            req.raw_input_contents.append(x.tobytes())
        requests.append(req.SerializeToString())
    expected = case["batch"] * 10 * 4

    def check(reply: bytes) -> None:
        got = sum(len(r) for r in v2.ModelInferResponse.FromString(reply).raw_output_contents)
        if got != expected:
            raise RuntimeError(f"ModelInfer answered {got} output bytes, expected {expected}")

    return MODEL_INFER, requests, check


@contextlib.contextmanager
def _shared_inputs(target: str, case: dict[str, Any]) -> Iterator[None]:
    """The case's ``DISTINCT`` batches in one POSIX shared memory block, registered with the server as
    ``SHM_REGION`` for the length of the case (Triton's system shared memory extension)."""
    from multiprocessing import shared_memory

    import grpc
    from tritonclient.grpc import service_pb2 as v2

    batches = digit_batches(case)
    size = sum(x.nbytes for x in batches)
    block = shared_memory.SharedMemory(create=True, size=size)
    try:
        for i, x in enumerate(batches):
            block.buf[i * x.nbytes:(i + 1) * x.nbytes] = x.tobytes()
        with grpc.insecure_channel(target) as channel:
            call = "/inference.GRPCInferenceService/SystemSharedMemory"
            channel.unary_unary(call + "Register")(v2.SystemSharedMemoryRegisterRequest(
                name=SHM_REGION, key="/" + block.name, byte_size=size).SerializeToString(), timeout=60)
            try:
                yield
            finally:
                channel.unary_unary(call + "Unregister")(
                    v2.SystemSharedMemoryUnregisterRequest(name=SHM_REGION).SerializeToString(), timeout=60)
    finally:
        block.close()
        block.unlink()


REQUESTS = {"digits": _digits_requests, "diabetes": _diabetes_requests, "names": _names_requests,
            "model_infer": _model_infer_requests}


# --- closed loops ----------------------------------------------------------------------------------------

async def _closed_loop(send: Callable[[int], Awaitable[object]], concurrency: int, seconds: float) -> \
        tuple[list[float], float]:
    """``concurrency`` callers, each sending request i, i + concurrency, ... until the deadline."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await send(i)
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return latencies, time.perf_counter() - start


async def _timed_closed_loop(send: Callable[[int], Awaitable[object]], case: dict[str, Any], meter: CpuMeter,
                             target: str, before: set[str]) -> Timed:
    """The case's warm-up, then its metered window, of ``_closed_loop``; the connections the client opened
    since ``before`` are counted after the window, outside the meter."""
    await _closed_loop(send, case["concurrency"], case["warmup"])
    meter.start()
    latencies, wall = await _closed_loop(send, case["concurrency"], case["seconds"])
    meter.stop()
    return Timed(latencies, wall, opened_since(target, before))


async def _raw_unary(target: str, case: dict[str, Any], meter: CpuMeter) -> Timed:
    import grpc

    method, requests, check = REQUESTS[case["kind"]](case)
    path = method if method.startswith("/") else CLASSIFIER + method
    before = open_connections(target)
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(_connections(case))]
    try:
        calls = [ch.unary_unary(path) for ch in channels]  # no (de)serializers: bytes in, bytes out
        check(await calls[0](requests[0], timeout=60))

        async def send(i: int) -> bytes:
            return await calls[i % len(calls)](requests[i % len(requests)], timeout=60)

        return await _timed_closed_loop(send, case, meter, target, before)
    finally:
        for ch in channels:
            await ch.close()


async def _raw_stream(target: str, case: dict[str, Any], meter: CpuMeter) -> Timed:
    """One StreamClassifyDigits stream with ``concurrency`` messages in flight (answers come in order)."""
    import grpc

    _, requests, check = _digits_requests(case)
    before = open_connections(target)
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stream = channel.stream_stream(CLASSIFIER + "StreamClassifyDigits")

        async def run(seconds: float) -> tuple[list[float], float]:
            call = stream()
            window = asyncio.Semaphore(case["concurrency"])
            sent: deque[float] = deque()
            latencies: list[float] = []
            deadline = time.perf_counter() + seconds

            async def writer() -> None:
                i = 0
                while time.perf_counter() < deadline:
                    await window.acquire()
                    sent.append(time.perf_counter())
                    await call.write(requests[i % len(requests)])
                    i += 1
                await call.done_writing()

            async def reader() -> None:
                async for reply in call:
                    latencies.append(time.perf_counter() - sent.popleft())
                    if len(latencies) == 1:
                        check(reply)
                    window.release()

            start = time.perf_counter()
            await asyncio.gather(writer(), reader())
            return latencies, time.perf_counter() - start

        await run(case["warmup"])
        meter.start()
        latencies, wall = await run(case["seconds"])
        meter.stop()
        return Timed(latencies, wall, opened_since(target, before))


def _triton_inputs(case: dict[str, Any], module: Any) -> list[list[Any]]:
    inputs = []
    for x in digit_batches(case):
        tensor = module.InferInput(case["input"], list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        inputs.append([tensor])
    return inputs


def triton_channel_args(module: Any) -> list[tuple[str, Any]]:
    """The channel arguments ``module``'s (``tritonclient.grpc`` or ``.aio``) ``InferenceServerClient`` uses when
    given none, plus ``OWN_CONNECTION``: with its own arguments every client of a process shares one TCP
    connection, so all of a row's callers went over one, whatever the number of clients."""
    keepalive = module.KeepAliveOptions()
    return [("grpc.max_send_message_length", module.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", module.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            OWN_CONNECTION]


def _triton_clients(target: str, case: dict[str, Any], module: Any) -> list[Any]:
    """One ``InferenceServerClient`` per connection the case's callers spread over."""
    args = triton_channel_args(module)
    return [module.InferenceServerClient(target, channel_args=args) for _ in range(_connections(case))]


async def _triton_aio(target: str, case: dict[str, Any], meter: CpuMeter) -> Timed:
    import tritonclient.grpc.aio as tc

    before = open_connections(target)
    clients = _triton_clients(target, case, tc)
    try:
        inputs = _triton_inputs(case, tc)
        reply = await clients[0].infer(case["model"], inputs[0])
        if reply.as_numpy(case["output"]).shape[0] != case["batch"]:
            raise RuntimeError("the Triton client got a reply of the wrong batch size")

        async def send(i: int) -> object:
            return await clients[i % len(clients)].infer(case["model"], inputs[i % len(inputs)])

        return await _timed_closed_loop(send, case, meter, target, before)
    finally:
        for c in clients:
            await c.close()


def _triton_threads(target: str, case: dict[str, Any], meter: CpuMeter) -> Timed:
    """The blocking tritonclient.grpc client, one thread per concurrent caller (how it is used in practice).

    A call that fails ends every caller and fails the case, as in the asyncio loops: a thread's exception
    would otherwise end only that thread, and the row would pass for a slower one."""
    import tritonclient.grpc as tc

    before = open_connections(target)
    clients = _triton_clients(target, case, tc)
    try:
        return _triton_threads_timed(target, case, meter, clients, before, tc)
    finally:
        for c in clients:
            c.close()


def _triton_threads_timed(target: str, case: dict[str, Any], meter: CpuMeter, clients: list[Any], before: set[str],
                          tc: Any) -> Timed:
    inputs = _triton_inputs(case, tc)
    clients[0].infer(case["model"], inputs[0])
    latencies: list[float] = []
    failures: list[Exception] = []
    lock = threading.Lock()

    def loop(i: int, seconds: float, record: bool) -> None:
        deadline = time.perf_counter() + seconds
        mine = []
        try:
            while time.perf_counter() < deadline and not failures:
                t0 = time.perf_counter()
                clients[i % len(clients)].infer(case["model"], inputs[i % len(inputs)])
                mine.append(time.perf_counter() - t0)
                i += case["concurrency"]
        except Exception as e:  # noqa: BLE001 - raised again in the caller, after the join
            failures.append(e)
        if record:
            with lock:
                latencies.extend(mine)

    wall = 0.0
    for seconds, record in ((case["warmup"], False), (case["seconds"], True)):
        threads = [threading.Thread(target=loop, args=(i, seconds, record)) for i in range(case["concurrency"])]
        if record:
            meter.start()
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if failures:
            raise failures[0]
    meter.stop()
    return Timed(latencies, wall, opened_since(target, before))


def _h2load(target: str, case: dict[str, Any], meter: CpuMeter) -> Timed:
    """The external client (``bench.h2load``) sending the first of the case's requests over and over; the
    client CPU is h2load's own, and its connections are the ones it was told to open (another process's)."""
    import grpc

    from bench import h2load

    executable, why = h2load.find()
    if executable is None:
        raise RuntimeError(why)
    method, requests, check = REQUESTS[case["kind"]](case)
    path = method if method.startswith("/") else CLASSIFIER + method
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        reply = channel.unary_unary(path)(requests[0], timeout=60)
    check(reply)
    load = h2load.H2Load(executable, target, path, requests[0], case["concurrency"], _connections(case))
    try:
        calls = max(h2load.MIN_REQUESTS, round(load.rate(case["warmup"]) * case["seconds"]))
        meter.start()
        latencies, wall, client_seconds = load.timed(calls, len(reply))
        meter.stop()
    finally:
        load.close()
    meter.client_seconds = client_seconds
    return Timed(latencies, wall, load.connections)


def run_case(target: str, case: dict[str, Any], server_pgid: int | None) -> dict[str, Any]:
    client = case.get("client", "raw")
    meter = CpuMeter(server_pgid)
    if client == "h2load":
        timed = _h2load(target, case, meter)
    elif client == "tritonclient-grpc":
        timed = _triton_threads(target, case, meter)
    elif client == "tritonclient-aio":
        timed = asyncio.run(_triton_aio(target, case, meter))
    elif case["kind"] == "stream":
        timed = asyncio.run(_raw_stream(target, case, meter))
    else:
        with _shared_inputs(target, case) if case.get("shared_memory") else contextlib.nullcontext():
            timed = asyncio.run(_raw_unary(target, case, meter))
    latencies, n = timed.latencies, timed.connections
    note = "; ".join(filter(None, (case.get("note", ""), f"{n} TCP connection{'s' * (n != 1)}")))
    result = summarize(case["key"], case["group"], case["case"], case["model"], batch=case["batch"],
                       concurrency=case["concurrency"], items=len(latencies) * case["batch"], seconds=timed.wall,
                       latencies_s=latencies, note=note)
    result.connections = n
    if latencies:
        result.client_cpu_ms = meter.client_seconds * 1e3 / len(latencies)
        if meter.server_seconds is not None:
            result.model_cpu_ms = meter.server_seconds * 1e3 / len(latencies)
    return result.to_json()


def main() -> int:
    spec = json.load(sys.stdin)
    out = []
    for case in spec["cases"]:
        try:
            out.append(run_case(spec["target"], case, spec.get("server_pgid")))
        except Exception as e:  # noqa: BLE001 - one failing case is reported as such; the others still run
            out.append({"key": case["key"], "error": f"{type(e).__name__}: {e}"})
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
