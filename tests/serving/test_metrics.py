"""``serving.metrics.Metrics``: the series a version leaves behind."""

from __future__ import annotations

import socket
import struct
import threading
import urllib.request

import pytest
from prometheus_client import generate_latest

from serving import metrics as metrics_module
from serving.metrics import METRICS_CONNECTIONS, Metrics, serve_registry
from tests.conftest import wait_for


def test_a_gone_versions_series_leaves_the_metrics() -> None:
    metrics = Metrics()
    metrics.set_model_ready("m", "1", True)
    metrics.set_model_ready("m", "2", False)
    metrics.set_model_ready("m", "1", None)
    metrics.set_model_ready("m", "3", None)  # never set (it failed before its gauge existed): nothing to remove
    lines = generate_latest(metrics.registry).decode().splitlines()
    assert [line for line in lines if line.startswith("coursezoo_model_ready{")] == [
        'coursezoo_model_ready{model="m",version="2"} 0.0']


def test_a_gone_version_takes_every_series_with_it() -> None:
    """Each series of a version goes with it (a server that takes a new export every night would otherwise keep a
    year of versions' series), the others stay, a late reply of the gone version brings none back, and a version
    whose folder comes back is counted afresh."""
    metrics = Metrics()
    for version in ("1", "2"):
        metrics.set_model_ready("m", version, True)
        metrics.observe_request("m", version, "ClassifyDigits", 0.001, 3)
        metrics.observe_request("m", version, "ModelInfer", 0.001, 0, "INTERNAL")
        metrics.observe_batch("m", version, 3, 0.001, [0.0])
        metrics.queue_changed("m", version, 1)
    metrics.observe_request("", "", "ServerReady", 0.001, 0)

    def series(version: str) -> list[str]:
        return [line for line in generate_latest(metrics.registry).decode().splitlines()
                if line.startswith("coursezoo_") and f'version="{version}"' in line]

    kept, no_version = series("2"), series("")
    metrics.set_model_ready("m", "1", None)
    assert series("1") == [] and series("2") == kept and series("") == no_version
    # a reply still on its way out, and a batch's last hooks, after the version left: they brought it back
    metrics.observe_request("m", "1", "ClassifyDigits", 0.001, 3)
    metrics.observe_request("m", "1", "ModelInfer", 0.001, 0, "INTERNAL")
    metrics.observe_batch("m", "1", 3, 0.001, [0.0])
    metrics.queue_changed("m", "1", -1)
    assert series("1") == []
    metrics.set_model_ready("m", "1", True)
    metrics.observe_request("m", "1", "ClassifyDigits", 0.001, 5)
    assert 'coursezoo_items_total{model="m",rpc="ClassifyDigits",version="1"} 5.0' in series("1")


def test_the_process_is_described_too() -> None:
    """Memory, descriptors, CPU and start time (restarts): what an operator watches for leaks."""
    text = generate_latest(Metrics().registry).decode()
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
                 "python_gc_collections_total"):
        assert f"\n{name}" in text, name


def _closed_by_the_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closed ``sock`` within ``within`` seconds (it never got a whole request)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_the_metrics_endpoint_serves_a_bounded_number_of_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread serves each connection: unbounded, 1,000 connections that sent half a request held 1,000 threads
    of the server's process for good. Now one beyond the bound is closed at once, and once the others go a
    scrape is served again."""
    monkeypatch.setattr(metrics_module, "METRICS_TIMEOUT_S", 60.0)  # none of them ends by its deadline here
    httpd = serve_registry(Metrics().registry, 0, "127.0.0.1")
    address = ("127.0.0.1", httpd.server_port)
    try:
        threads = threading.active_count()
        held = [socket.create_connection(address) for _ in range(METRICS_CONNECTIONS)]
        for sock in held:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        beyond = [socket.create_connection(address) for _ in range(8)]
        assert all(_closed_by_the_server(sock, 10) for sock in beyond)
        assert not any(_closed_by_the_server(sock, 0.1) for sock in held)
        assert threading.active_count() - threads <= 2 * METRICS_CONNECTIONS  # a handler and its deadline each
        for sock in held + beyond:
            sock.close()
        wait_for(lambda: _scrape(httpd.server_port), "a scrape once the connections are gone")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_metrics_connection_ends_by_its_deadline_however_slowly_it_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket timeout bounds each read only: a client sending a byte every 9 s held its connection for days."""
    monkeypatch.setattr(metrics_module, "METRICS_TIMEOUT_S", 1.0)
    httpd = serve_registry(Metrics().registry, 0, "127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_port)) as sock:
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"x" * 100:  # one byte every 0.2 s, 20 s in all
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # cut off
                    break
                if _closed_by_the_server(sock, 0.2):
                    break
            else:
                pytest.fail("the connection outlived its deadline by 19 s")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_connection_whose_thread_cannot_start_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of threads for a while (a container's pids limit, say), the endpoint must serve again afterwards; each
    failed start kept its slot, and 16 of them refused every later scrape."""
    httpd = serve_registry(Metrics().registry, 0, "127.0.0.1")
    start = threading.Thread.start
    refused = []

    def no_handler_thread(thread: threading.Thread) -> None:
        if getattr(getattr(thread, "_target", None), "__name__", "") == "process_request_thread":
            refused.append(thread)
            raise RuntimeError("can't start new thread")
        start(thread)

    try:
        monkeypatch.setattr(threading.Thread, "start", no_handler_thread)
        for _ in range(METRICS_CONNECTIONS + 4):
            with socket.create_connection(("127.0.0.1", httpd.server_port)) as sock:
                assert _closed_by_the_server(sock, 10)
        assert len(refused) == METRICS_CONNECTIONS + 4
        monkeypatch.undo()
        assert _scrape(httpd.server_port)
    finally:
        monkeypatch.undo()
        httpd.shutdown()
        httpd.server_close()


def test_clients_that_reset_their_connections_print_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """Anyone who reaches the port can reset a connection mid-request: each printed a traceback on stderr, which
    broke the server's one JSON line per log entry."""
    httpd = serve_registry(Metrics().registry, 0, "127.0.0.1")
    try:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", httpd.server_port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            sock.close()
        wait_for(lambda: _scrape(httpd.server_port), "a scrape after the resets")
        assert capfd.readouterr().err == ""
    finally:
        httpd.shutdown()
        httpd.server_close()


def _scrape(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return b"process_open_fds" in response.read()
    except OSError:
        return False
