"""Shared test fixtures: a real ``coursezoo serve`` subprocess on an ephemeral loopback port, MNIST images.

Serving tests talk to a server in its own process, as a client would: over gRPC to 127.0.0.1 with the
shipped exports. One process also keeps the server's generated ``inference`` messages apart from
``tritonclient``'s identically named ones (protobuf has one global descriptor pool), so this module
and the serving tests never import ``serving.server`` or ``serving.services``.

``COURSEZOO_TEST_REPO`` points the shared server at another repository (e.g. one with a quickly
trained digits model while the shipped MNIST exports are being trained); the default is exported/.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORTED = Path(os.environ.get("COURSEZOO_TEST_REPO", REPO_ROOT / "exported"))
DATA_MIRROR = Path(os.environ.get("COURSEZOO_DATA_MIRROR", REPO_ROOT.parent / "shared" / "data"))

_LISTENING = re.compile(r"coursezoo serving on (\S+):(\d+)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")


class ServerProcess:
    """``python -m coursezoo serve --host 127.0.0.1 --port 0 ...`` in a subprocess, ready when started.

    Reads the bound port from the server's banner, so tests never guess free ports; keeps draining the
    output (``.output``) so a chatty server never blocks on a full pipe.
    """

    def __init__(self, repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        self.args = [sys.executable, "-m", "coursezoo", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                     "--port", "0", "--metrics-port", "0", *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.timeout = timeout
        self.lines: list[str] = []
        self.target = ""
        self.metrics_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._banner = threading.Event()

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, cwd=REPO_ROOT)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not self._banner.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start (exit {self.proc.returncode}):\n{self.output}")
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := _METRICS.search(line):
                self.metrics_url = m.group(1)
            if m := _LISTENING.search(line):
                self.target = f"{m.group(1)}:{m.group(2)}"
            if line.startswith(("MODEL ", "(no model")):  # the table follows the address and metrics lines
                self._banner.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code (the process is killed if it overstays ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def digits_models(repo: Path) -> list[str]:
    """Names of the digits models in ``repo`` (by their cards), to skip digits tests when there are none."""
    return sorted({p.parent.parent.name for p in repo.glob("*/*/model.json") if '"task": "digits"' in p.read_text()})


@pytest.fixture(scope="session")
def exported_repo() -> Path:
    """The model repository the serving tests read (exported/, or ``COURSEZOO_TEST_REPO``)."""
    return EXPORTED


@pytest.fixture(scope="module")
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Factory for extra servers (own repository or flags), each stopped when the test module ends."""
    started: list[ServerProcess] = []

    def start(repo: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        started.append(ServerProcess(repo, *args, env=env))
        return started[-1].start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The shared server on the shipped exports; small queue delay so concurrent tests form batches."""
    with ServerProcess(EXPORTED, "--max-queue-delay-ms", "2", "--poll-interval-s", "0") as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator:
    from serving.client import CourseZooClient

    with CourseZooClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def digits_model() -> str:
    """The repository's digits model the tests expect to answer (skips when none is exported yet)."""
    names = digits_models(EXPORTED)
    if not names:
        pytest.skip(f"no digits model in {EXPORTED} yet (the MNIST models are still training); rerun when exported")
    return names[0]


def _idx(path: Path) -> np.ndarray:
    """An MNIST IDX file (gzip) -> uint8 array; the header gives the number of dimensions and their sizes."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The first 200 MNIST test images (uint8 [N, 28, 28], white on black) and their labels."""
    images = DATA_MIRROR / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not images.exists():
        pytest.skip(f"no MNIST test set at {images} (set COURSEZOO_DATA_MIRROR)")
    return _idx(images)[:200], _idx(DATA_MIRROR / "mnist" / "t10k-labels-idx1-ubyte.gz")[:200]
