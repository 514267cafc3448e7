"""A disk that fills up mid-run: the run ends with a clear message, and no finished result is lost.

Two ways to fill a disk for real: a 16 KiB tmpfs (needs mount rights, as root in CI) and a file-size
limit on the process (RLIMIT_FSIZE, which fails writes with EFBIG where mounting is not allowed).
"""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.batch.conftest import read_rows

REPO = Path(__file__).resolve().parents[2]
N_DIGITS = 300
LIMIT_BYTES = 16 * 1024  # room for roughly a third of the rows


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory, mnist_test: tuple[np.ndarray, np.ndarray]) -> Path:
    folder = tmp_path_factory.mktemp("fill")
    images, _ = mnist_test
    for i in range(N_DIGITS):
        Image.fromarray(images[i % len(images)]).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT_BYTES}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the RLIMIT_FSIZE variant covers the behaviour")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # make an over-limit write fail with EFBIG, not kill us
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def _batch(*args: str | Path, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coursezoo", "batch", *map(str, args), "--repo",
                           str(REPO / "exported"), "--model", "mnist_cnn", "--batch-size", "16", "--workers", "1"],
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec, cwd=REPO)


def _check_full_disk_run(run: subprocess.CompletedProcess, out: Path, digit_folder: Path, tmp_path: Path,
                         reason: str) -> None:
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"cannot write results to {out}.partial: {reason}" in run.stderr
    assert "--resume" in run.stderr
    assert not out.exists()  # never a half-written results file under the final name
    # every row that reached the disk is a finished, correct-looking result, in input order
    text = Path(f"{out}.partial").read_text()
    kept = tmp_path / "results.csv.partial"
    kept.write_text(text[: text.rfind("\n") + 1])  # as --resume does: a row the disk cut short is redone
    rows = read_rows(kept)
    assert 0 < len(rows) < N_DIGITS
    assert [r["path"] for r in rows] == [str(digit_folder / f"{i:04d}.png") for i in range(len(rows))]
    assert all(r["prediction"] and not r["error"] for r in rows)
    # with room again, --resume finishes the run: every input exactly once
    done = _batch(digit_folder, "--out", tmp_path / "results.csv", "--resume")
    assert done.returncode == 0, done.stderr
    final = read_rows(tmp_path / "results.csv")
    assert sorted(r["path"] for r in final) == sorted(str(p) for p in digit_folder.glob("*.png"))


def test_tmpfs_fills_up(digit_folder: Path, small_disk: Path, tmp_path: Path) -> None:
    out = small_disk / "results.csv"
    run = _batch(digit_folder, "--out", out)
    _check_full_disk_run(run, out, digit_folder, tmp_path, os.strerror(28))  # ENOSPC


def test_file_size_limit(digit_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "limited" / "results.csv"
    run = _batch(digit_folder, "--out", out, preexec=_limit_file_size)
    _check_full_disk_run(run, out, digit_folder, tmp_path, os.strerror(27))  # EFBIG
