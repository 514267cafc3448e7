"""An external load generator: nghttp2's ``h2load`` (C; Debian/Ubuntu package ``nghttp2-client``).

The Python load clients (grpc.aio, tritonclient) cost 0.2-0.3 ms of CPU per call, on the same 2 cores the
server needs; ``h2load`` costs ~0.04 ms, so its rows show what a server does when the client is cheap. It
speaks HTTP/2, and a unary gRPC call is one HTTP/2 POST: the path names the method, the body is the
message behind gRPC's 5-byte length prefix, the headers say ``application/grpc``. The same bytes go to
CourseZoo and to the PyTriton peer.

``h2load`` reads HTTP statuses only, and gRPC sends its status in the trailers (a failed call is still
HTTP 200), so the answers are checked another way: the load generator first sends the request once
through grpc (it must succeed; its reply's size is noted), then ``h2load`` sends a fixed number of
requests, and the reply bytes it received must be exactly that many full replies (a failed call carries
no message at all). The number comes from a warm-up run of the same load: its rate times the case's
seconds.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

MIN_REQUESTS = 100
_DONE = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded")
_RATE = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_DATA = re.compile(r"traffic: .*\((\d+)\) data")


@functools.cache
def find() -> tuple[str | None, str]:
    """The ``h2load`` executable and its version, or None and why its rows are skipped (looked up once)."""
    path = shutil.which("h2load")
    if path is None:
        return None, "h2load rows skipped: no h2load on PATH (apt-get install nghttp2-client)"
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return path, done.stdout.strip() or "h2load"


def grpc_frame(message: bytes) -> bytes:
    """A serialized message as the body of a unary gRPC request: not compressed, then its big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class H2Load:
    """``h2load`` sending one gRPC request over and over to ``target``'s ``method`` with ``concurrency``
    calls in flight (closed loop: each finished call is replaced at once) over ``connections`` HTTP/2
    connections (the load generator's rule for every client, ``bench.loadgen.connections``)."""

    def __init__(self, executable: str, target: str, method: str, request: bytes, concurrency: int,
                 connections: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="coursezoo-bench-h2load-")
        self.body = Path(self._tmp.name) / "request.bin"
        self.body.write_bytes(grpc_frame(request))
        self.log = Path(self._tmp.name) / "requests.log"
        # h2load runs -c x -m calls at once: the connections must divide the concurrency (20 connections for 64
        # callers ran 80; --workers 5 asks for 20), so the next count up that does
        connections = next(c for c in range(min(connections, concurrency), concurrency + 1) if concurrency % c == 0)
        self.connections = connections
        self.args = [executable, "-c", str(connections), "-m", str(concurrency // connections),
                     "-d", str(self.body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                     f"http://{target}{method}"]

    def close(self) -> None:
        self._tmp.cleanup()

    def rate(self, seconds: float) -> float:
        """Calls per second over ``seconds`` of load (the warm-up, and what sizes the timed run)."""
        out = self._run(["-D", f"{max(100, round(seconds * 1000))}ms"])
        return float(_match(_RATE, out).group(3))

    def timed(self, n: int, reply_bytes: int) -> tuple[list[float], float, float]:
        """Send ``n`` calls; return each call's latency (s), the wall time (s) and h2load's CPU seconds.

        Raises RuntimeError unless every call was answered with a full reply of ``reply_bytes``.
        """
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = self._run(["-n", str(n), "--log-file", str(self.log)])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = _match(_DONE, out)
        received, expected = int(_match(_DATA, out).group(1)), n * (reply_bytes + 5)
        if int(done.group(3)) != n or received != expected:
            raise RuntimeError(f"h2load: {done.group(3)} of {n} calls answered with HTTP 200 and {received} reply "
                               f"bytes, expected {expected} ({n} full replies): some calls failed")
        finished = _match(_RATE, out)
        seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
        # --log-file: one line per call: start time (µs since the epoch), HTTP status, duration (µs)
        latencies = [int(line.split()[2]) / 1e6 for line in self.log.read_text().splitlines()]
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return latencies, seconds, cpu

    def _run(self, extra: list[str]) -> str:
        done = subprocess.run([*self.args[:1], *extra, *self.args[1:]], capture_output=True, text=True,
                              check=False, env={**os.environ, "LC_ALL": "C"})
        if done.returncode != 0:
            raise RuntimeError(f"h2load exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
        return done.stdout


def _match(pattern: re.Pattern[str], text: str) -> re.Match[str]:
    m = pattern.search(text)
    if m is None:
        raise RuntimeError(f"h2load printed no line matching {pattern.pattern!r}:\n{text[-2000:]}")
    return m
