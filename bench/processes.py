"""Processes the harness starts: a ``coursezoo serve`` on an ephemeral loopback port, and load generators.

The server runs exactly as users run it (``python -m coursezoo serve``), in its own process group so it
and anything it starts are stopped together; the bound port is read from its banner, never guessed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.data import REPO_ROOT
from serving.process import ServerProcess


class Server(ServerProcess):
    """The server as the harness runs it: its own process group, no metrics port, no polling, and its pid
    printed so a profiler can attach while the cases run (py-spy record -p PID, docs/performance.md)."""

    def __init__(self, repo: Path, *args: str, timeout: float = 180.0) -> None:
        super().__init__(repo, "--metrics-port", "-1", "--poll-interval-s", "0", *args, timeout=timeout,
                         new_session=True)

    def __enter__(self) -> Server:
        self.start()
        assert self.proc is not None
        print(f"[bench] coursezoo serve pid {self.proc.pid} on {self.target}: {' '.join(self.args[3:])}",
              file=sys.stderr, flush=True)
        return self

    @property
    def pgid(self) -> int:
        """The server's process group (its pid: it starts a new session)."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:  # type: ignore[override]
        if self.proc is not None:
            stop_group(self.proc, grace=30.0)


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``proc``'s process group, wait until every member is gone (SIGKILL after ``grace`` seconds).

    Waiting for the whole group, not just the leader, keeps a server that is still shutting down from
    stealing CPU from the next measurement.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _group_alive(proc):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.1)
    proc.wait()


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, so that a finished leader does not count as a live member
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def load(target: str, cases: list[dict[str, Any]], server_pgid: int | None = None,
         timeout: float = 900.0) -> list[dict[str, Any]]:
    """Run ``cases`` against ``target`` in a fresh ``bench.loadgen`` process and return its results.

    ``server_pgid`` (the server's process group) lets the load generator charge the server's CPU time
    per request for exactly the timed window of each case.
    """
    with tempfile.TemporaryDirectory(prefix="coursezoo-bench-load-") as tmp:
        out = Path(tmp) / "results.json"
        spec = json.dumps({"target": target, "cases": cases, "server_pgid": server_pgid})
        proc = subprocess.run([sys.executable, "-m", "bench.loadgen", str(out)], cwd=REPO_ROOT, timeout=timeout,
                              input=spec, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text(encoding="utf-8"))
