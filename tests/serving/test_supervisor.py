"""``coursezoo serve --workers N`` (serving/supervisor.py): several server processes on one port.

Each test starts its own supervisor on a one-model scratch repository and looks at the real processes
in /proc: the workers it spawned, which answered (the connections each holds: a call is answered by the
process that holds its connection's socket), and what is left after a stop, a crash or a lost supervisor.
The supervisor's one /metrics must count every call, whichever worker answered it. Waits are bounded
polls, never sleeps that decide the outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from serving.client import CourseZooClient
from serving.decoding import MAX_AUTO_PROCESSES
from serving.process import ServerProcess
from serving.protos import classifier_pb2 as pb
from serving.protos import classifier_pb2_grpc
from serving.supervisor import worker_settings
from serving.workers import cores
from tests.conftest import REPO_ROOT, alive, children, wait_for

MODEL = "diabetes_mlp"
RECORD = pb.DiabetesRecord(features=[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8])
CONNECTIONS = 16  # the kernel spreads connections, not calls: all 16 on one of 2 workers has odds 2^-15


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, exported_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("workers-repo")
    source = max((exported_repo / MODEL).iterdir(), key=lambda p: int(p.name))
    shutil.copytree(source, root / MODEL / source.name)
    return root


def workers_of(server: ServerProcess) -> list[int]:
    """The supervisor's worker processes (its other children are multiprocessing's resource tracker)."""
    assert server.proc is not None
    return [pid for pid in children(server.proc.pid)
            if "coursezoo" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            or b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


#: a channel of its own connection: gRPC otherwise hands a new channel the connection of an earlier one to the
#: same target (its global subchannel pool), even one just closed, and all calls would share a worker
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@contextlib.contextmanager
def fresh_connections(target: str) -> Iterator[list[grpc.Channel]]:
    """CONNECTIONS channels to ``target``, each with a connection of its own, open until the block ends."""
    channels = [grpc.insecure_channel(target, OWN_CONNECTION) for _ in range(CONNECTIONS)]
    try:
        yield channels
    finally:
        for channel in channels:
            channel.close()


def classify_on(channels: list[grpc.Channel]) -> None:
    for channel in channels:
        reply = classifier_pb2_grpc.ClassifierStub(channel).ClassifyDiabetes(
            pb.ClassifyDiabetesRequest(model=MODEL, records=[RECORD] * 3), timeout=60)
        assert len(reply.predictions) == 3


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` whose socket process ``pid`` holds (from /proc)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            sockets.add(os.readlink(fd))
    # the columns: sl, local address:port (hex), remote one, state (01: established), ..., inode (the 10th)
    rows = [row.split() for table in ("tcp", "tcp6")
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]]
    return sum(int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "01" and f"socket:[{r[9]}]" in sockets for r in rows)


def answered_by(workers: list[int], target: str) -> list[int]:
    """The connections to ``target`` that each worker holds: only the process holding a connection's socket can
    answer the calls on it."""
    port = int(target.rsplit(":", 1)[1])
    return [connections_held(pid, port) for pid in workers]


def requests_counted(metrics: str) -> float:
    return sum(float(v) for v in re.findall(r'^coursezoo_requests_total\{model="diabetes_mlp",rpc="ClassifyDiabetes",'
                                            r'version="\d+"\} (\S+)$', metrics, re.MULTILINE))


def test_two_workers_share_the_port_and_stop_cleanly(repo: Path, tmp_path: Path) -> None:
    """Both workers answer, the one /metrics counts every call, and a stop leaves no process and no files."""
    server = ServerProcess(repo, "--workers", "2", "--poll-interval-s", "0", env={"TMPDIR": str(tmp_path)}).start()
    try:
        assert "2 worker processes share the port" in server.output
        assert "model control off" in server.output and "shared memory off" in server.output
        assert server.metrics_urls == [server.metrics_url], server.output  # one /metrics for the whole server
        (metrics_dir,) = tmp_path.glob("coursezoo-metrics-*")  # the workers' values, summed by the supervisor
        workers = workers_of(server)
        assert len(workers) == 2, server.output
        with fresh_connections(server.target) as channels:
            classify_on(channels)
            held = answered_by(workers, server.target)
        assert sum(held) == CONNECTIONS and all(held), held  # both workers answered
        metrics = server.metrics()
        assert requests_counted(metrics) == CONNECTIONS
        ready = r'^coursezoo_model_ready\{model="diabetes_mlp",version="\d+"\} 1\.0$'  # one series, not one per worker
        assert len(re.findall(ready, metrics, re.MULTILINE)) == 1, metrics
    finally:
        code = server.stop(signal.SIGTERM, timeout=60)
    assert code == 0, server.output
    assert not any(alive(pid) for pid in workers)
    assert not metrics_dir.exists()
    assert server.output.rstrip().endswith("coursezoo stopped")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_to_the_whole_group_is_a_clean_stop(repo: Path, sig: signal.Signals) -> None:
    """Ctrl-C and systemd (KillMode=control-group) signal every process of the group at once: the workers
    drain and end before the supervisor looks, which it took for a failure (exit 1, "worker 0 exited with
    code 0"); SIGHUP killed every process at once, multiprocessing's resource tracker too, whose stand-in
    printed a KeyError traceback for every semaphore released after."""
    server = ServerProcess(repo, "--workers", "2", "--poll-interval-s", "0", new_session=True).start()
    workers = workers_of(server)
    assert server.proc is not None
    os.killpg(server.proc.pid, sig)
    assert server.proc.wait(timeout=60) == 0, server.output
    assert "exited with code" not in server.output and server.output.rstrip().endswith("coursezoo stopped")
    assert "Traceback" not in server.output, server.output
    assert not any(alive(pid) for pid in workers)


@pytest.mark.parametrize("after_s", [0.3, 0.6, 1.0])
def test_ctrl_c_while_the_workers_start_is_a_clean_stop(repo: Path, after_s: float) -> None:
    """The group's SIGINT reaches workers still importing (they end by it, or with 1 from a KeyboardInterrupt
    in multiprocessing's bootstrap): that was "worker 0 exited ... before serving" and exit 1."""
    proc = subprocess.Popen([sys.executable, "-m", "coursezoo", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                             "--port", "0", "--metrics-port", "-1", "--workers", "2"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(after_s)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "before serving" not in output


def test_a_restart_binds_the_port_its_last_run_served_on(repo: Path) -> None:
    """The stopped run closed its clients' connections, which wait out TIME_WAIT on its port for a minute:
    a restart (a restart policy, a rolling update) must still bind it, as one process does."""
    first = ServerProcess(repo, "--workers", "2", "--poll-interval-s", "0").start()
    port = first.target.rsplit(":", 1)[1]
    with fresh_connections(first.target) as channels:  # connected when the server stops: its side closes first
        try:
            classify_on(channels)
        finally:
            assert first.stop(signal.SIGTERM, timeout=60) == 0, first.output
    second = ServerProcess(repo, "--workers", "2", "--poll-interval-s", "0", "--port", port).start()
    try:
        assert second.target.endswith(f":{port}")
        with fresh_connections(second.target) as channels:
            classify_on(channels)
    finally:
        second.stop()


def test_one_client_reaches_every_worker_over_its_connections(repo: Path) -> None:
    """CourseZooClient(connections=N) sends call i on connection i mod N; with one connection (the default)
    a whole job would stay on one worker."""
    server = ServerProcess(repo, "--workers", "2", "--poll-interval-s", "0").start()
    try:
        with CourseZooClient(server.target, timeout=60, connections=CONNECTIONS) as client:
            for _ in range(CONNECTIONS):
                assert len(client.classify_diabetes([list(RECORD.features)] * 2, MODEL).predictions) == 2
            held = answered_by(workers_of(server), server.target)
        assert sum(held) == CONNECTIONS and all(held), held
        assert requests_counted(server.metrics()) == CONNECTIONS
    finally:
        server.stop()


def test_a_worker_that_dies_stops_the_server(repo: Path) -> None:
    """A restart policy then brings the whole server back, rather than one quietly serving with fewer workers."""
    server = ServerProcess(repo, "--workers", "2", "--poll-interval-s", "0").start()
    try:
        first, second = workers_of(server)
        os.kill(first, signal.SIGKILL)
        assert server.proc is not None
        server.proc.wait(timeout=60)
    finally:
        server.stop()
    assert server.proc.returncode == 1
    assert re.search(rf"worker \d \(pid {first}\) exited with code -9; stopping the others", server.output)
    wait_for(lambda: not alive(second), "the other worker to stop")


def test_workers_leave_when_the_supervisor_is_killed(repo: Path, tmp_path: Path) -> None:
    """TMPDIR is the test's: a killed supervisor cannot remove its metrics directory (the next run makes a fresh
    one)."""
    server = ServerProcess(repo, "--workers", "2", "--poll-interval-s", "0", env={"TMPDIR": str(tmp_path)}).start()
    workers = workers_of(server)
    server.stop(signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to exit after their supervisor")


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--host", "127.0.0.1", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("flag", ["--model-control", "--shared-memory"])
def test_per_process_state_needs_one_worker(repo: Path, flag: str) -> None:
    """Model control and shared memory regions live in one process: with workers they cannot be asked for."""
    done = serve("--repo", str(repo), "--port", "0", "--workers", "2", flag, "on")
    assert done.returncode == 1
    assert f"{flag} on needs --workers 1" in done.stderr


def test_a_busy_port_fails_as_for_one_process(repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--repo", str(repo), "--port", str(port), "--workers", "2")
    assert done.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr


def test_a_busy_metrics_port_fails_before_any_worker_starts(repo: Path, tmp_path: Path) -> None:
    """The supervisor serves the workers' /metrics: a taken port is named in one line, as for one process,
    before a worker loads a model, and leaves no files."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--repo", str(repo), "--port", "0", "--workers", "2", "--metrics-port", str(port),
                     env={"TMPDIR": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"coursezoo serve: cannot serve metrics on 127.0.0.1:{port} (--metrics-port): "
                                        "Address already in use"]
    assert done.stdout == ""  # no worker started, so none stopped
    assert not list(tmp_path.glob("coursezoo-metrics-*"))


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The fields worker_settings reads: this module must not import serving.server (tests/conftest.py says why)."""

    workers: int = 2
    port: int = 0
    metrics_port: int = 8002
    model_control: str = "auto"
    shared_memory: str = "auto"
    intra_op_threads: int = 0
    decode_processes: int = -1


def test_workers_share_out_the_cores_unless_told() -> None:
    share = max(1, cores() // 2)
    first, second = (worker_settings(_Settings(), 50051, i) for i in range(2))  # type: ignore[arg-type]
    assert (first.port, first.metrics_port, second.metrics_port) == (50051, -1, -1)  # the supervisor serves /metrics
    assert first.workers == 1 and first.model_control == "off" and first.shared_memory == "off"
    assert first.intra_op_threads == share and first.decode_processes == min(MAX_AUTO_PROCESSES, share)
    told = worker_settings(_Settings(intra_op_threads=3, decode_processes=0), 50051, 1)  # type: ignore[arg-type]
    assert (told.intra_op_threads, told.decode_processes) == (3, 0)
