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
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.process import ServerProcess

__all__ = ["DATA_MIRROR", "EXPORTED", "REPO_ROOT", "ServerProcess", "digits_models", "edit_card", "require_tool",
           "wait_for"]

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORTED = Path(os.environ.get("COURSEZOO_TEST_REPO", REPO_ROOT / "exported"))
DATA_MIRROR = Path(os.environ.get("COURSEZOO_DATA_MIRROR", REPO_ROOT.parent / "shared" / "data"))


def edit_card(directory: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """``change`` the model.json in ``directory`` as plain JSON: unlike ``ModelCard.load``/``save`` this can also
    make a card that the card class would refuse (a wrong sha256, another name), as the tests that break one do."""
    path = directory / "model.json"
    card = json.loads(path.read_text())
    change(card)
    path.write_text(json.dumps(card))


def digits_models(repo: Path) -> list[str]:
    """Names of the digits models in ``repo`` (by their cards), to skip digits tests when there are none."""
    return sorted({p.parent.parent.name for p in repo.glob("*/*/model.json") if '"task": "digits"' in p.read_text()})


def require_tool(found: object, what: str, install: str) -> None:
    """Skip without ``found`` locally (say how to install it); fail under CI, which must install it."""
    if found:
        return
    message = f"{what} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: CI must install it")
    pytest.skip(message)


def _stat(pid_dir: Path) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from the state on (the command name before them may hold spaces and
    parentheses), or None for a process gone meanwhile."""
    try:
        return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc), zombies included."""
    return [int(d.name) for d in Path("/proc").glob("[0-9]*") if (fields := _stat(d)) and int(fields[1]) == pid]


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs: one that has exited and waits to be reaped (a zombie) does not."""
    fields = _stat(Path(f"/proc/{pid}"))
    return fields is not None and fields[0] != "Z"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` every 0.1 s until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


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
    """The shared server on the shipped exports; a small (adaptive) queue delay, so that concurrent calls, once
    a probe has seen them come together, share batches."""
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
