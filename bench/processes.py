"""Processes the harness starts: a ``coursezoo serve`` on an ephemeral loopback port, and load generators.

The server runs exactly as users run it (``python -m coursezoo serve``), in its own process group so it
and anything it starts are stopped together; the bound port is read from its banner, never guessed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.data import REPO_ROOT

_LISTENING = re.compile(r"coursezoo serving on (\S+):(\d+)")


class Server:
    """``python -m coursezoo serve --host 127.0.0.1 --port 0 --repo REPO ARGS``; ``.target`` once ready."""

    def __init__(self, repo: Path, *args: str, timeout: float = 180.0) -> None:
        self.args = [sys.executable, "-m", "coursezoo", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                     "--port", "0", "--metrics-port", "-1", "--poll-interval-s", "0", *args]
        self.timeout = timeout
        self.lines: list[str] = []
        self.target = ""
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"coursezoo serve did not start:\n{''.join(self.lines)[-4000:]}")
        # the pid lets a profiler attach while the cases run: py-spy record -p PID (docs/performance.md)
        print(f"[bench] coursezoo serve pid {self.proc.pid} on {self.target}: {' '.join(self.args[3:])}",
              file=sys.stderr, flush=True)
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := _LISTENING.search(line):
                self.target = f"{m.group(1)}:{m.group(2)}"
            if self.target and line.startswith(("MODEL ", "(no model")):  # the model table follows the address
                self._ready.set()

    @property
    def pgid(self) -> int:
        """The server's process group (its pid: it starts a new session)."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=30.0)

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
