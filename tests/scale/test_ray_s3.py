"""``coursezoo batch s3://...``: inputs in an S3 bucket (moto's S3 server on loopback) answer as the same files on
disk do: same rows and errors, ids that differ only by their prefix, the Ray engine and the local engine alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.batch.conftest import Run
from tests.conftest import EXPORTED, digits_models, require_tool
from tests.scale.conftest import free_port, wait_for_port
from tests.scale.test_ray_engine import assert_same_rows

Batch = Callable[..., Run]
#: the version CI installs (`pip install 'moto[server]==5.2.5'`)
MOTO = "moto[server]==5.2.5"
BUCKET, PREFIX = "scans", "batch/2024"
N_S3_DIGITS = 50
#: the broken inputs uploaded beside the digits, as in tests/scale/conftest.py's ``scans``
S3_BROKEN = {"corrupt.png": "invalid image", "empty.png": "empty file", "notes.txt": "invalid image"}

# Ray's worker processes take the environment of the test session when its Ray instance starts, which may be
# before this module's fixtures run, so moto's (fake) credentials are set at collection. The endpoint is not:
# it travels from the driver to the Ray tasks inside the pickled pyarrow file system.
for _name, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                      ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the length of this module."""
    try:
        import moto
    except ImportError:
        moto = None
    server = shutil.which("moto_server", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    require_tool(moto and server, "moto's S3 server", f"pip install '{MOTO}'")
    port = free_port()
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, "moto_server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str, scans: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(``s3://scans/batch/2024``, a local folder holding the same files): 50 MNIST PNGs under ``digits/``, the
    broken files beside them, plus a hidden file and an object outside the prefix, which no run may read."""
    from pyarrow import fs as pafs

    local = tmp_path_factory.mktemp("same-as-s3")
    (local / "digits").mkdir()
    for i in range(N_S3_DIGITS):
        shutil.copy(scans / "digits" / f"{i:05d}.png", local / "digits")
    for name in S3_BROKEN:
        shutil.copy(scans / name, local)
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    uploads = {f"{PREFIX}/{p.relative_to(local)}": p.read_bytes() for p in local.rglob("*") if p.is_file()}
    uploads[f"{PREFIX}/.DS_Store"] = b"\0hidden"
    uploads[f"{PREFIX}-old/00000.png"] = (local / "digits" / "00000.png").read_bytes()
    for key, data in uploads.items():
        with s3.open_output_stream(f"{BUCKET}/{key}") as f:
            f.write(data)
    return f"s3://{BUCKET}/{PREFIX}", local


def _as_local(run: Run, uri: str, local: Path) -> Run:
    """The run with its ids' URI prefix replaced by the local folder's path."""
    assert all(row["path"].startswith(f"{uri}/") for row in run.rows), [row["path"] for row in run.rows]
    return Run(run.code, run.out, run.err, [{**row, "path": str(local) + row["path"][len(uri):]} for row in run.rows])


def test_s3_inputs_answer_as_local_files(batch: Batch, ray_local: Any, bucket: tuple[str, Path], s3_endpoint: str,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not digits_models(EXPORTED):
        pytest.skip(f"no digits model in {EXPORTED}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    uri, local = bucket
    common = ("--recursive", "--repo", EXPORTED, "--top-k", "3")
    expected = batch(local, *common, "--kind", "digits", "--workers", "0", out=tmp_path / "local.csv")
    assert expected.code == 2 and len(expected.rows) == N_S3_DIGITS + len(S3_BROKEN), expected.err

    ray_run = batch(uri, *common, "--engine", "ray", "--batch-size", "16", out=tmp_path / "ray.csv")  # kind sniffed
    assert ray_run.code == 2, ray_run.err
    assert_same_rows(_as_local(ray_run, uri, local), expected)
    assert {p.rsplit("/", 1)[1]: r["error"].split(":", 1)[0] for p, r in ray_run.by_id().items() if r["error"]} \
        == S3_BROKEN

    local_engine = batch(f"{uri}/", *common, "--workers", "0", out=tmp_path / "local-engine.csv")
    assert local_engine.code == 2, local_engine.err
    assert_same_rows(_as_local(local_engine, uri, local), expected)


def test_s3_listing_and_missing_prefix(batch: Batch, bucket: tuple[str, Path], s3_endpoint: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    uri, _ = bucket
    top = batch(uri, "--kind", "digits", "--repo", EXPORTED, "--workers", "0", out=tmp_path / "top.csv")
    assert top.code == 2, top.err  # without --recursive: only the broken files beside digits/
    assert [row["path"] for row in top.rows] == [f"{uri}/{name}" for name in sorted(S3_BROKEN)]
    assert "skipped 1 subfolders; pass --recursive" in top.err

    one = batch(f"{uri}/digits/00007.png", "--repo", EXPORTED, out=tmp_path / "one.csv")
    assert one.code == 0 and [row["path"] for row in one.rows] == [f"{uri}/digits/00007.png"], one.err

    missing = batch(f"s3://{BUCKET}/no/such/prefix", "--repo", EXPORTED, out=tmp_path / "missing.csv")
    assert missing.code == 1 and "no such object or prefix" in missing.err
