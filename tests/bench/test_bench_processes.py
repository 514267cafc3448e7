"""The processes the harness starts are stopped whatever ends the run, and a failing load client fails its row.

Every case starts real processes: servers, a stand-in that never prints a banner, a whole ``coursezoo
bench``. A hang shows up as a subprocess timeout, never as an assertion on wall-clock time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

from bench import exports, server_load
from bench.processes import Server, group_members, load
from tests.conftest import DATA_MIRROR, EXPORTED, REPO_ROOT, alive, children, wait_for

#: a stand-in server: it starts a child in its group and never prints a banner
SILENT_SERVER = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"


def live(pgid: int) -> list[int]:
    """The members of process group ``pgid`` that have not exited (a zombie waits only for its parent)."""
    return [m.pid for m in group_members(pgid) if m.state != "Z"]


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return ""


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` by parent pid, whatever its session."""
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found += below
        todo += below
    return [p for p in found if alive(p)]


@contextlib.contextmanager
def killed_at_end(pgids: list[int]) -> Iterator[None]:
    """SIGKILL whatever is left of ``pgids`` (groups the test started) when it ends, passed or failed."""
    try:
        yield
    finally:
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def test_stop_group_counts_zombies_as_gone() -> None:
    """Under a parent that never reaps (here a subreaper; in a container, a PID 1 that is no init) a member
    that exits after the group's leader stays in the group as a zombie for good: stop_group must return."""
    script = """
        import ctypes, subprocess, time
        from bench.processes import group_members, stop_group

        PR_SET_CHILD_SUBREAPER = 36
        assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        # the leader dies at SIGTERM; the subshell ignores it and exits a second later, re-parented to us
        proc = subprocess.Popen(["sh", "-c", "(trap '' TERM; sleep 1) & exec sleep 600"], start_new_session=True)
        time.sleep(0.5)
        stop_group(proc, grace=3.0)
        print(sorted(m.state for m in group_members(proc.pid)))
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['Z']"  # the zombie is still in the group, and stop_group returned


def test_ctrl_c_while_waiting_for_the_banner_stops_the_group() -> None:
    """A server that has not printed its banner yet runs, with all it started, in a session of its own:
    Ctrl-C in the harness must not leave them running."""
    script = f"""
        import sys, threading
        from pathlib import Path
        from bench.processes import Server

        server = Server(Path("."))
        server.args = [sys.executable, "-c", {SILENT_SERVER!r}]
        threading.Timer(0.5, lambda: print(server.proc.pid, flush=True)).start()
        server.start()
    """
    harness = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO_ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert harness.stdout is not None
    pgid = int(harness.stdout.readline())
    with killed_at_end([pgid]):
        wait_for(lambda: len(live(pgid)) == 2, "the stand-in server and its child")
        harness.send_signal(signal.SIGINT)
        _, err = harness.communicate(timeout=60)
        assert "KeyboardInterrupt" in err
        assert live(pgid) == []


def test_sigterm_to_the_bench_stops_its_servers_and_load_generator(digits_model: str, tmp_path: Path) -> None:
    """``timeout 180 coursezoo bench``, a cancelled CI job: the servers run in sessions of their own, which the
    signal does not reach, so the harness must stop them (and the load generator) itself."""
    env = {**os.environ, "COURSEZOO_DATA_MIRROR": str(DATA_MIRROR)}
    bench = subprocess.Popen([sys.executable, "-m", "coursezoo", "bench", "--quick", "--cases", "batching-off",
                              "--models", digits_model, "--repo", str(EXPORTED), "--json", str(tmp_path / "r.json")],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert bench.stderr is not None
    servers: list[int] = []
    with killed_at_end(servers):
        for line in bench.stderr:
            if line.startswith("[bench] coursezoo serve pid"):
                servers.append(int(line.split()[4]))
                if len(servers) == 2:  # the default server and the variant are up: the cases run next
                    break
        wait_for(lambda: any("bench.loadgen" in cmdline(p) for p in descendants(bench.pid)), "the load generator")
        started = descendants(bench.pid)
        bench.send_signal(signal.SIGTERM)
        bench.communicate(timeout=120)
        assert bench.returncode == 128 + signal.SIGTERM
        assert [p for p in started if alive(p)] == []
        assert [pgid for pgid in servers if live(pgid)] == []


def test_a_failed_tritonclient_grpc_call_fails_the_row(digits_model: str) -> None:
    """The server dies during a tritonclient-grpc case: the threaded client's row is an error, not a slow one."""
    selected, _ = exports.select(EXPORTED, [digits_model])
    cases = server_load.oip_cases(selected[0], "coursezoo", (4,), ("tritonclient-grpc",),
                                  {"seconds": 5.0, "warmup": 0.2})
    with exports.server_repository(selected) as repo, Server(Path(repo), "--device", "cpu") as server:
        killer = threading.Timer(1.5, os.killpg, (server.pgid, signal.SIGKILL))
        killer.start()
        try:
            rows = load(server.target, cases, server.pgid)
        finally:
            killer.cancel()
    assert len(rows) == 1 and "error" in rows[0], rows
