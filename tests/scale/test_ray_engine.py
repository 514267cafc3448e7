"""``coursezoo batch --engine ray`` on a local Ray instance: the local engine's rows, exactly, for real MNIST
scans with broken files and for a list of names; resume; and the errors that stop a run before it starts."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.batch.conftest import Run
from tests.conftest import EXPORTED, digits_models
from tests.scale.conftest import BROKEN, N_DIGITS

Batch = Callable[..., Run]
#: columns holding scores, equal between engines up to float rounding across batch sizes
SCORES = ("confidence", "top1_score", "top2_score", "top3_score")


def assert_same_rows(ray_run: Run, local_run: Run) -> None:
    """Every input once in each, in the same (input) order, and per input the same answer: labels, errors, model;
    scores within 1e-6."""
    assert len(ray_run.by_id()) == len(ray_run.rows), "an input appears twice in the Ray engine's output"
    assert [row["path"] for row in ray_run.rows] == [row["path"] for row in local_run.rows]
    for path, expected in local_run.by_id().items():
        got = ray_run.by_id()[path]
        assert {k: v for k, v in got.items() if k not in SCORES} == {k: v for k, v in expected.items()
                                                                     if k not in SCORES}, path
        for column in SCORES:
            if expected.get(column):
                assert math.isclose(float(got[column]), float(expected[column]), abs_tol=1e-6), (path, column)
            else:
                assert not got.get(column), (path, column)


def test_ray_rows_equal_local_rows_and_resume_completes(batch: Batch, ray_local: Any, scans: Path,
                                                        tmp_path: Path) -> None:
    if not digits_models(EXPORTED):
        pytest.skip(f"no digits model in {EXPORTED}")
    common = (scans, "--recursive", "--kind", "digits", "--repo", EXPORTED, "--top-k", "3")
    local = batch(*common, "--workers", "0", out=tmp_path / "local.csv")
    assert local.code == 2, local.err
    assert len(local.rows) == N_DIGITS + len(BROKEN)

    out = tmp_path / "ray.csv"
    first = batch(*common, "--engine", "ray", "--batch-size", "32", "--limit", "100", out=out)
    assert first.code == 2 and len(first.rows) == 100, first.err  # corrupt.png sorts first: 1 error, 99 digits
    assert "Ray Data, 1 ONNX Runtime actor (cpu)" in first.out
    rest = batch(*common, "--engine", "ray", "--batch-size", "32", "--resume", out=out)
    assert rest.code == 2, rest.err
    assert_same_rows(rest, local)
    assert {Path(p).name: r["error"].split(":", 1)[0] for p, r in rest.by_id().items() if r["error"]} == BROKEN
    assert f"classified    {N_DIGITS - 99}" in rest.out  # this run's share; the summary counts only new rows


def test_ray_names_equal_local(batch: Batch, ray_local: Any, tmp_path: Path) -> None:
    """Text inputs: a list of names with an empty line (skipped), accents (dropped) and a name the model cannot
    read (refused)."""
    if not (EXPORTED / "names_gru").is_dir():
        pytest.skip(f"no names model in {EXPORTED}")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["Nakamura", "Schmidt", "", "O'Neill", "Dvořák", "Straße", "Rossi", "Zhang"] * 20)
                     + "\n")
    common = (names, "--kind", "names", "--repo", EXPORTED, "--top-k", "2")
    local = batch(*common, out=tmp_path / "local.csv")
    ray_run = batch(*common, "--engine", "ray", "--batch-size", "4", "--concurrency", "2", out=tmp_path / "ray.csv")
    assert ray_run.code == local.code == 2, ray_run.err
    assert_same_rows(ray_run, local)


def test_pool_larger_than_the_cluster_is_refused(batch: Batch, ray_local: Any, scans: Path, tmp_path: Path) -> None:
    run = batch(scans / "digits", "--kind", "digits", "--repo", EXPORTED, "--engine", "ray", "--concurrency", "3",
                out=tmp_path / "r.csv")
    assert run.code == 1 and "--concurrency 3 needs 3 CPUs; the Ray cluster has 2" in run.err
    assert not run.rows and not (tmp_path / "r.csv.partial").exists()


def test_ray_does_not_combine_with_a_server(batch: Batch, scans: Path, tmp_path: Path) -> None:
    run = batch(scans / "digits", "--engine", "ray", "--server", "localhost:1", out=tmp_path / "r.csv")
    assert run.code == 1 and "does not combine with --server" in run.err


def test_without_ray_the_error_says_how_to_install_it(batch: Batch, scans: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where the extra is not installed
    monkeypatch.delitem(sys.modules, "serving.batch.engines.ray", raising=False)
    run = batch(scans / "digits", "--kind", "digits", "--repo", EXPORTED, "--engine", "ray", out=tmp_path / "r.csv")
    assert run.code == 1 and "pip install 'coursezoo[ray]'" in run.err
