"""Run ``coursezoo serve`` as a child process on an ephemeral loopback port, ready once it has started.

Tests, the benchmarks and the deployment checks all need a real server over a real socket; this is the
one way they start it. The bound port (and metrics URL) are read from the server's banner, so nobody
guesses free ports, and the output is drained continuously so a chatty server never blocks on a pipe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"coursezoo serving on (\S+):(\d+)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")


class ChildServer:
    """A server command (``argv``, run with exactly ``env``) in a subprocess; ready once its banner is out.

    ``new_session`` starts it in its own process group (``.proc.pid`` is its id), so a caller can stop it
    together with anything it starts.
    """

    what = "server"  # in the error when it does not start

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path = REPO_ROOT, timeout: float = 120.0,
                 new_session: bool = False) -> None:
        self.args = argv
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        self.timeout = timeout
        self.new_session = new_session
        self.lines: list[str] = []
        self.target = ""
        self.metrics_url = ""  # the first
        self.metrics_urls: list[str] = []  # every one the banner names: one, with --workers N too
        self.proc: subprocess.Popen[str] | None = None
        self._banner = threading.Event()

    def start(self) -> ChildServer:
        """Start the command and wait for its banner. Without one it is stopped again, also when the wait is
        interrupted (Ctrl-C, or an exception from a SIGTERM handler): a child in its own session would
        outlive its caller."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, cwd=self.cwd, start_new_session=self.new_session)
        ready = False
        try:
            threading.Thread(target=self._drain, daemon=True).start()
            deadline = time.monotonic() + self.timeout
            while not (ready := self._ready(0.1)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
        finally:
            if not ready:
                self.stop()
        if not ready:
            raise RuntimeError(f"{self.what} did not start (exit {self.proc.returncode}):\n{self.output[-4000:]}")
        return self

    def _ready(self, wait: float) -> bool:
        """Whether the server is up, waiting up to ``wait`` seconds: here once its banner is out."""
        return self._banner.wait(wait)

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := _METRICS.search(line):
                self.metrics_urls.append(m.group(1))
                self.metrics_url = self.metrics_urls[0]
            if m := _LISTENING.search(line):  # a server bound to every interface is dialled on loopback
                host = "127.0.0.1" if m.group(1) in ("0.0.0.0", "[::]", "::") else m.group(1)
                self.target = f"{host}:{m.group(2)}"
            if self.target and line.startswith(("MODEL ", "(no model")):  # the table follows the address
                self._banner.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def metrics(self, url: str = "") -> str:
        """The text of ``url`` (default: the first metrics endpoint)."""
        with urllib.request.urlopen(url or self.metrics_url, timeout=10) as response:
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

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """``python -m coursezoo serve --repo REPO --host 127.0.0.1 --port 0 --metrics-port 0 ARGS``, with this
    process's environment plus ``env``."""

    def __init__(self, repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0,
                 new_session: bool = False) -> None:
        super().__init__([sys.executable, "-m", "coursezoo", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                          "--port", "0", "--metrics-port", "0", *args], env={**os.environ, **(env or {})},
                         timeout=timeout, new_session=new_session)
