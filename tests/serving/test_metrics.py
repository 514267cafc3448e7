"""``serving.metrics.Metrics``: the series a version leaves behind."""

from __future__ import annotations

from prometheus_client import generate_latest

from serving.metrics import Metrics


def test_a_gone_versions_series_leaves_the_metrics() -> None:
    metrics = Metrics()
    metrics.set_model_ready("m", "1", True)
    metrics.set_model_ready("m", "2", False)
    metrics.set_model_ready("m", "1", None)
    metrics.set_model_ready("m", "3", None)  # never set (it failed before its gauge existed): nothing to remove
    lines = generate_latest(metrics.registry).decode().splitlines()
    assert [line for line in lines if line.startswith("coursezoo_model_ready{")] == [
        'coursezoo_model_ready{model="m",version="2"} 0.0']


def test_the_process_is_described_too() -> None:
    """Memory, descriptors, CPU and start time (restarts): what an operator watches for leaks."""
    text = generate_latest(Metrics().registry).decode()
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
                 "python_gc_collections_total"):
        assert f"\n{name}" in text, name
