"""``coursezoo batch --server``: the same answers as ``--local``, bad inputs isolated to their own rows, a server
restart mid-run loses nothing, an unreachable server is a clear exit 1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.batch.cli import default_workers
from serving.batch.output import partial_path
from serving.workers import cores
from tests.batch.conftest import BROKEN_DIGITS, Run, digit_label, read_rows
from tests.conftest import EXPORTED, REPO_ROOT, ServerProcess

Batch = Callable[..., Run]


def _same_answers(a: Run, b: Run) -> None:
    assert [r["path"] for r in a.rows] == [r["path"] for r in b.rows]
    for x, y in zip(a.rows, b.rows, strict=True):
        assert (x["prediction"], x["error"].split(":")[0]) == (y["prediction"], y["error"].split(":")[0]), x["path"]
        if x["confidence"]:
            assert float(x["confidence"]) == pytest.approx(float(y["confidence"]), abs=1e-5)


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["read-here", "read-in-workers"])
def test_digits_through_the_server_match_local(batch: Batch, server: ServerProcess, digits_dir: Path,
                                               best_digits_repo: Path, tmp_path: Path,
                                               workers: tuple[str, ...]) -> None:
    """Same files, same answers and the same failure reasons, whichever process reads the files; the server's
    refusals of a whole request are narrowed down to the one bad file."""
    remote = batch(digits_dir, "-r", "--server", server.target, "--batch-size", "50", "--top-k", "2", *workers,
                   out=tmp_path / "remote.csv")
    local = batch(digits_dir, "-r", "--repo", best_digits_repo, "--batch-size", "50", "--top-k", "2",
                  out=tmp_path / "local.csv")
    assert remote.code == local.code == 2, remote.err
    _same_answers(remote, local)
    failed = {Path(r["path"]).name: r["error"].split(":")[0] for r in remote.rows if r["error"]}
    assert failed == BROKEN_DIGITS
    good = [r for r in remote.rows if not r["error"]]
    assert sum(r["prediction"] == digit_label(r["path"]) for r in good) >= 0.95 * len(good) == 0.95 * 200
    assert f"server {server.target}" in remote.out


def test_records_and_names_through_the_server_match_local(batch: Batch, server: ServerProcess,
                                                          diabetes_rows: list[list[str]],
                                                          names_rows: list[tuple[str, str]], tmp_path: Path) -> None:
    records = [",".join(row[:8]) for row in diabetes_rows[:300]] + ["inf,0,0,0,0,0,0,0", "1,2"]
    (tmp_path / "records.csv").write_text("\n".join(records) + "\n")
    (tmp_path / "names.txt").write_text("\n".join(name for name, _ in names_rows[::40]) + "\n\n\u00e9\u00e9\n")
    for data in ("records.csv", "names.txt"):
        remote = batch(tmp_path / data, "--server", server.target, "--top-k", "2", "--batch-size", "64",
                       out=tmp_path / f"{data}.remote.csv")
        local = batch(tmp_path / data, "--repo", EXPORTED, "--top-k", "2", "--batch-size", "64",
                      out=tmp_path / f"{data}.local.csv")
        assert remote.code == local.code == 2, remote.err
        _same_answers(remote, local)
    unknown = batch(tmp_path / "names.txt", "--server", server.target, "--model", "names_gru:999", out=tmp_path / "x")
    assert unknown.code == 1 and "no ready model 'names_gru:999'" in unknown.err


def test_unreachable_server_is_exit_1(batch: Batch, tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("Smith\n")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = batch(tmp_path / "names.txt", "--server", f"127.0.0.1:{port}", "--retry-for", "1", out=tmp_path / "o.csv")
    assert run.code == 1 and "unreachable" in run.err and not run.rows


def test_server_restart_mid_run_loses_nothing(diabetes_rows: list[list[str]], tmp_path: Path) -> None:
    """SIGKILL the server while requests are in flight, start it again on the same port: the run waits,
    retries and ends with every record answered exactly once."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "diabetes_mlp").symlink_to((EXPORTED / "diabetes_mlp").resolve())  # one small model: quick starts
    records = tmp_path / "records.csv"
    records.write_text("\n".join(",".join(row) for row in diabetes_rows * 8) + "\n")
    out = tmp_path / "out.csv"
    first = ServerProcess(repo, "--poll-interval-s", "0").start()
    port = first.target.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "coursezoo", "batch", str(records), "--server", first.target, "--out", str(out),
               "--batch-size", "4", "--in-flight", "2", "--retry-for", "60"]
    batch_proc = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        partial = partial_path(out)
        while batch_proc.poll() is None and (not partial.exists() or partial.stat().st_size < 5_000):
            time.sleep(0.02)
        first.stop(signal.SIGKILL)
        if batch_proc.poll() is not None:
            pytest.skip("the run finished before the server was killed")
        time.sleep(1.0)  # the client now retries against a closed port
        second = ServerProcess(repo, "--poll-interval-s", "0", "--port", port).start()
        stdout, stderr = batch_proc.communicate(timeout=120)
    finally:
        batch_proc.kill()
        first.stop()
        if second:
            second.stop()
    assert batch_proc.returncode == 0, stderr
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [f"{records}:{n}" for n in range(1, 8 * len(diabetes_rows) + 1)]
    assert all(r["prediction"] in ("0", "1") and not r["error"] for r in rows)
    assert "server unavailable, retrying" in stderr


def test_local_files_sent_to_a_server_are_read_in_this_process_by_default() -> None:
    """The server decodes, so worker processes would only read local files; objects in a bucket keep them."""
    assert default_workers("localhost:8001", ["scans", "more/*.png"]) == 0
    assert default_workers("localhost:8001", ["scans", "s3://bucket/scans"]) == cores() > 0
    assert default_workers(None, ["scans"]) == cores()
