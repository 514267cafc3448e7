"""One measured case and how it is measured: throughput plus latency percentiles, the same way everywhere.

Every row of the report, whether timed in this process or in a load-generator process, is a ``Result``
built by ``summarize``, so "items/s" and "p99" mean the same thing in every group of the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class Result:
    """One row: ``key`` is unique in a run and is what ratios refer to."""

    key: str
    group: str  # in-process | server | batch-cli | oip | peer
    case: str  # what was called, e.g. "ORT CPU" or "ClassifyDigits PNG"
    model: str
    batch: int  # items per call or request
    concurrency: int  # calls in flight at once
    items: int  # items completed in the timed window
    calls: int  # timed calls (or requests), the percentiles' sample
    seconds: float
    throughput: float  # items per second
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    note: str = ""
    # CPU per call on the side that runs the model (the server's whole process group, or this process for
    # in-process rows) and in the load generator: robust where a shared machine makes wall time noisy
    model_cpu_ms: float | None = None
    client_cpu_ms: float | None = None
    # TCP connections the load client held open to the server (counted by it; None in-process): gRPC can put
    # many channels on one, and SO_REUSEPORT spreads connections, not calls, over --workers processes
    connections: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: The fewest calls each latency percentile is reported from: some calls must lie beyond it, or p99 is just the
#: slowest call (--quick times a slow in-process path 2-3 times).
PERCENTILE_MIN_CALLS = {50: 1, 90: 10, 99: 100}


def summarize(key: str, group: str, case: str, model: str, *, batch: int, concurrency: int, items: int,
              seconds: float, latencies_s: list[float] | np.ndarray, note: str = "",
              model_cpu_s: float | None = None) -> Result:
    """A row from raw measurements: per-call latencies in seconds, items finished in ``seconds`` of wall time;
    each percentile left out (None) below its ``PERCENTILE_MIN_CALLS``."""
    lat = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(np.percentile(lat, q)) if lat.size >= n else None for q, n in PERCENTILE_MIN_CALLS.items())
    return Result(key=key, group=group, case=case, model=model, batch=batch, concurrency=concurrency, items=items,
                  calls=lat.size, seconds=round(seconds, 4), throughput=items / seconds if seconds > 0 else 0.0,
                  p50_ms=p50, p90_ms=p90, p99_ms=p99, note=note,
                  model_cpu_ms=model_cpu_s * 1e3 / lat.size if model_cpu_s is not None and lat.size else None)


@dataclass
class Timing:
    latencies: list[float]  # seconds per call
    wall: float  # seconds for all timed calls
    cpu: float  # CPU seconds of this process (all its threads) during the timed calls


def time_calls(call: Callable[[], object], *, seconds: float, warmup: int = 3, min_calls: int = 5,
               max_calls: int = 1_000_000) -> Timing:
    """Call ``call`` back to back for about ``seconds`` (after ``warmup`` untimed calls).

    At least ``min_calls`` are timed even when one call takes longer than ``seconds``, so slow paths
    still get percentiles.
    """
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    cpu_start = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while len(latencies) < max_calls and (now < deadline or len(latencies) < min_calls):
        t0 = now
        call()
        now = time.perf_counter()
        latencies.append(now - t0)
    return Timing(latencies, now - start, time.process_time() - cpu_start)
