"""Processes the harness starts: a ``coursezoo serve`` on an ephemeral loopback port, and load generators.

The server runs exactly as users run it (``python -m coursezoo serve``), in its own process group so it
and anything it starts are stopped together; the bound port is read from its banner, never guessed.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


#: How long a group may take to go after SIGKILL before ``stop_group`` gives up on it (a process in
#: uninterruptible sleep, on a hung device say, dies only once its I/O returns).
KILL_WAIT_S = 10.0


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``proc``'s process group, wait until every member is gone (SIGKILL after ``grace`` seconds, then
    at most ``KILL_WAIT_S`` more: a group that outlasts that is reported on stderr and left behind).

    Waiting for the whole group, not just the leader, keeps a server that is still shutting down from
    stealing CPU from the next measurement.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if _gone(proc, wait):
            proc.wait()  # the leader has exited, so this returns at once
            return
    left = ", ".join(f"{m.pid} ({m.state})" for m in group_members(proc.pid) if m.state != "Z")
    print(f"[bench] process group {proc.pid} still has members {KILL_WAIT_S:g} s after SIGKILL: {left}",
          file=sys.stderr, flush=True)


def _gone(proc: subprocess.Popen, seconds: float) -> bool:
    """Whether every member of ``proc``'s group has exited within ``seconds``.

    A zombie counts as gone: it has exited, and only its parent's ``wait`` removes it. Members orphaned by
    the leader's exit belong to PID 1 (or a subreaper) then, and in a container whose PID 1 is no init they
    stay zombies, still in the group, for good: ``killpg(pgid, 0)`` would call the group alive for ever.
    """
    deadline = time.monotonic() + seconds
    while True:
        proc.poll()  # reap the leader, our child
        if all(m.state == "Z" for m in group_members(proc.pid)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@dataclasses.dataclass(frozen=True)
class Member:
    """One process of a process group, as ``/proc/<pid>/stat`` describes it (Linux)."""

    pid: int
    state: str  # R running, S sleeping, D uninterruptible, Z zombie (exited, not yet reaped), ... (proc(5))
    cpu_ticks: int  # user + system CPU time, in clock ticks


def group_members(pgid: int) -> list[Member]:
    """Every process whose process group is ``pgid``: there is no system call that lists them."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the command name may hold spaces and parentheses: the fields start after its last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited since the listing
            continue
        if int(fields[2]) == pgid:  # fields from proc(5)'s 3rd: state, ppid, pgrp, ..., utime (14th), stime (15th)
            members.append(Member(int(stat.parent.name), fields[0], int(fields[11]) + int(fields[12])))
    return members


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
