"""``serving.metrics.Metrics``: the series a version leaves behind."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from prometheus_client import generate_latest

from serving import metrics as metrics_module
from serving.metrics import METRICS_CONNECTIONS, Metrics, serve_registry


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


def _closed_by_the_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` within 5 s (it sent nothing: the request was never finished)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_the_metrics_endpoint_bounds_its_connections_and_their_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread serves each connection: with neither bound, 1,000 connections that sent half a request held
    1,000 threads of the server's process for good. Now one beyond the bound is closed at once, and a silent
    one after ``_QuietHandler.timeout`` (10 s when served; 0.5 s here)."""
    monkeypatch.setattr(metrics_module._QuietHandler, "timeout", 0.5)
    httpd = serve_registry(Metrics().registry, 0, "127.0.0.1")
    address = ("127.0.0.1", httpd.server_port)
    try:
        threads = threading.active_count()
        held = [socket.create_connection(address) for _ in range(METRICS_CONNECTIONS + 8)]
        for sock in held:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        assert all(_closed_by_the_server(sock) for sock in held[METRICS_CONNECTIONS:])
        assert threading.active_count() - threads <= METRICS_CONNECTIONS
        assert all(_closed_by_the_server(sock) for sock in held[:METRICS_CONNECTIONS])  # after the timeout
        for sock in held:
            sock.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_port}/metrics", timeout=10) as response:
            assert b"process_open_fds" in response.read()
    finally:
        httpd.shutdown()
        httpd.server_close()
