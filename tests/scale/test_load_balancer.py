"""deploy/lb/nginx.conf in front of three real ``coursezoo serve`` replicas on loopback, without Docker.

The config is the one docker compose mounts, with only its TEST-marked lines replaced: the replica
addresses (for Docker's DNS name), the listening port and the log path. Each replica's own
``coursezoo_requests_total`` tells which replica answered, so the tests see the balancer's choices.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving.client import CourseZooClient
from tests.conftest import EXPORTED, REPO_ROOT, ServerProcess
from tests.scale.conftest import free_port, wait_for_port

CONFIG = REPO_ROOT / "deploy" / "lb" / "nginx.conf"
MODEL = "mnist_cnn"
REPLICAS = 3


def render(config: str, replicas: list[str], port: int, folder: Path) -> str:
    """The shipped config for loopback; each TEST line is replaced exactly once, so a reshaped config fails here."""
    def swap(pattern: str, new: str, text: str) -> str:
        text, count = re.subn(pattern, lambda _: new, text, flags=re.M)
        assert count == 1, f"{CONFIG} has no single line matching {pattern!r}"
        return text

    upstream = re.search(r"^\s*server server:\d+ resolve (.*);", config, re.M)
    assert upstream, f"{CONFIG}: no `server server:PORT resolve ...;` line in its upstream block"
    config = swap(r"^\s*server server:\d+ resolve .*$",
                  "\n".join(f"        server {target} {upstream.group(1)};" for target in replicas), config)
    config = swap(r"^\s*listen \d+ http2;.*$", f"        listen 127.0.0.1:{port} http2;", config)
    config = swap(r"^\s*access_log \S+ grpc;.*$", f"    access_log {folder}/access.log grpc;", config)
    # The compiled-in temporary folders belong to the system's nginx; this one keeps its own.
    temp = "\n".join(f"    {kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                             "scgi"))
    return swap(r"^http \{$", "http {\n" + temp, config)


def classify_calls(replica: ServerProcess) -> int:
    """ClassifyDigits calls this replica has received, from its Prometheus metrics."""
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in replica.metrics().splitlines()
                     if line.startswith("coursezoo_requests_total{") and "ClassifyDigits" in line))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of one small digits model, so three replicas start quickly."""
    if not (EXPORTED / MODEL).is_dir():
        pytest.skip(f"no {MODEL} in {EXPORTED}")
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(EXPORTED / MODEL, root / MODEL)
    return root


@pytest.fixture
def replicas(repo: Path) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(repo, "--poll-interval-s", "0", "--grace-s", "2") for _ in range(REPLICAS)]
    try:
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(ServerProcess.start, servers))
        yield servers
    finally:
        for server in servers:
            if server.proc is not None:
                server.stop()


@pytest.fixture
def balancer(nginx: str, replicas: list[ServerProcess], tmp_path: Path) -> Iterator[str]:
    """nginx with the rendered config, in the foreground, on a free loopback port; its address."""
    port, folder = free_port(), tmp_path / "nginx"
    folder.mkdir()
    (folder / "nginx.conf").write_text(render(CONFIG.read_text(), [r.target for r in replicas], port, folder))
    proc = subprocess.Popen([nginx, "-p", f"{folder}/", "-c", str(folder / "nginx.conf"), "-e",
                             str(folder / "error.log"), "-g", f"daemon off; pid {folder}/nginx.pid;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, "nginx", log=folder / "error.log")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def digits(mnist_test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return mnist_test[0]


def test_one_connection_reaches_every_replica(balancer: str, replicas: list[ServerProcess],
                                              digits: np.ndarray) -> None:
    """Balancing per call: one client, one HTTP/2 connection, and still every replica answers its share."""
    calls = 10 * REPLICAS
    with CourseZooClient(balancer, timeout=30) as client:
        expected = [p.digit for p in client.classify_digits(list(digits[:calls]), MODEL).predictions]
        answers = [client.classify_digits([digits[i]], MODEL).predictions[0].digit for i in range(calls)]
    assert answers == expected
    counts = [classify_calls(r) for r in replicas]
    assert sum(counts) == calls + 1 and min(counts) >= calls // REPLICAS - 1, counts  # round robin


def test_stopping_a_replica_mid_run_loses_no_call(balancer: str, replicas: list[ServerProcess],
                                                  digits: np.ndarray) -> None:
    """A replica is stopped (SIGTERM, graceful) while calls flow: every call still gets its answer.

    The client retries UNAVAILABLE and CANCELLED (its service config does: gRPC cancels the calls a stopping
    server holds but has not handed to a handler yet, grpc/grpc#41785); nginx moves calls the stopped replica
    refuses at connect time to the next one, and the drain answers in-flight calls before the exit.
    Calls go on, eight in flight, from before the stop until 100 were sent after the replica exited.
    """
    with CourseZooClient(replicas[1].target, timeout=30) as direct:
        expected = [p.digit for p in direct.classify_digits(list(digits), MODEL).predictions]
    stop_code: list[int] = []
    stopper = threading.Thread(target=lambda: stop_code.append(replicas[0].stop()))
    with CourseZooClient(balancer, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        def call(i: int) -> int:
            return client.classify_digits([digits[i % len(digits)]], MODEL).predictions[0].digit

        pending: deque[tuple[int, Future[int]]] = deque()
        sent = after_stop = 0
        while after_stop < 100:
            if sent == 100:
                assert classify_calls(replicas[0]) > 0, "the replica to stop had no calls yet"
                before = [classify_calls(r) for r in replicas[1:]]
                stopper.start()
            after_stop += stopper.ident is not None and not stopper.is_alive()
            pending.append((sent, pool.submit(call, sent)))
            sent += 1
            while len(pending) >= 8 or (pending and after_stop >= 100):
                i, future = pending.popleft()
                assert future.result() == expected[i % len(digits)], i  # a lost call raises its RpcError here
    assert stop_code == [0], replicas[0].output
    after = [classify_calls(r) for r in replicas[1:]]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # the others took over
