"""Per model version counts and durations since it loaded: what Triton's statistics extension reports.

``ModelStatistics`` (tritonclient's ``get_inference_statistics``, perf_analyzer) reads them; they are
counted where they happen. The served model counts requests: answered or failed, and their time from
reaching the model to the answer. Its batcher counts executions: each request's wait in the queue, the
batch's assembly (concatenating its requests' inputs), the run, and the split back into replies.

As in Triton, a request in a batch of k requests is charged the whole batch's assembly, run and split
(``compute_*`` count requests), and the per batch size figures count executions. Everything is updated
on the event loop (a run in a thread reports its duration back there), so plain integers need no lock,
and a request costs a few additions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchDurations:
    """The executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class InferenceStatistics:
    """One model version's figures; field names follow Triton's ``ModelStatistics`` message."""

    inference_count: int = 0  # items (batch rows) answered
    execution_count: int = 0  # model runs
    last_inference_ms: int = 0  # time.time() of the last request's end, in ms since the epoch
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def answered(self, items: int, start_ns: int) -> None:
        """A request of ``items`` rows, which reached the model at ``start_ns`` (``time.perf_counter_ns()``), got
        its answer."""
        self.success.add(time.perf_counter_ns() - start_ns)
        self.inference_count += items
        self.last_inference_ms = time.time_ns() // 1_000_000

    def failed(self, start_ns: int) -> None:
        """A request that reached the model at ``start_ns`` failed there (refused, cancelled, or its run failed)."""
        self.fail.add(time.perf_counter_ns() - start_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def executed(self, size: int, requests: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One successful run of ``size`` items for ``requests`` requests, which waited ``queue_ns`` in all."""
        self.execution_count += 1
        self.queue.add(queue_ns, requests)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        batch = self.batches.get(size)
        if batch is None:
            batch = self.batches[size] = BatchDurations()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
