"""``coursezoo batch --local`` end to end on real files: accuracy, every input once, error rows, exit codes,
overwrite refusal, resume after a kill, CSV and text inputs."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from coursezoo import cli
from serving.batch.engines import EngineError
from serving.batch.engines.local import LocalEngine
from serving.batch.output import BASE_COLUMNS, partial_path
from serving.card import ModelCard
from serving.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from tests.batch.conftest import BROKEN_DIGITS, Run, digit_label, read_rows
from tests.conftest import EXPORTED, REPO_ROOT, edit_card

Batch = Callable[..., Run]


def _reason(row: dict[str, str]) -> str:
    return row["error"].split(":", 1)[0]


def test_digits_folder_accurate_and_every_file_once(batch: Batch, digits_dir: Path, best_digits_repo: Path,
                                                    tmp_path: Path) -> None:
    run = batch(digits_dir, "--recursive", "--repo", best_digits_repo, "--top-k", "3", "--workers", "2",
                "--batch-size", "64", out=tmp_path / "digits.csv")
    assert run.code == 2, run.err  # the broken files fail, the rest is classified
    files = sorted(str(p) for p in digits_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert [row["path"] for row in run.rows] == files  # each once, in name order
    rows = run.by_id()
    assert {Path(p).name: _reason(r) for p, r in rows.items() if r["error"]} == BROKEN_DIGITS
    digits = [r for p, r in rows.items() if not r["error"]]
    assert len(digits) == 200 and all(r["model"] and r["model_version"] for r in digits)
    correct = Counter(Path(r["path"]).parent.name for r in digits if r["prediction"] == digit_label(r["path"]))
    assert sum(correct.values()) >= 0.95 * 200, correct
    assert all(n >= 0.8 * 200 / 6 for n in correct.values()), correct  # every form of image is read well
    assert all(r["top1"] == r["prediction"] and float(r["top1_score"]) >= float(r["top2_score"]) for r in digits)
    assert "classified    200" in run.out and "image too large  1" in run.out


def test_workers_that_run_the_model_answer_as_this_process_does(batch: Batch, digits_dir: Path,
                                                                best_digits_repo: Path, tmp_path: Path) -> None:
    """On the CPU the decoding workers run the model too; every row, error rows included, is what the
    in-process run (--workers 0) writes."""
    args = (digits_dir, "--recursive", "--repo", best_digits_repo, "--top-k", "2", "--batch-size", "32")
    in_workers = batch(*args, "--workers", "2", out=tmp_path / "workers.csv")
    in_process = batch(*args, "--workers", "0", out=tmp_path / "process.csv")
    assert "CPUExecutionProvider in 2 worker processes" in in_workers.out
    assert "worker processes" not in in_process.out
    assert in_workers.rows == in_process.rows and len(in_workers.rows) == 200 + len(BROKEN_DIGITS)


def test_kind_inferred_model_named_and_jsonl(batch: Batch, digits_dir: Path, best_digits_repo: Path,
                                             tmp_path: Path) -> None:
    """Without --recursive only the top-level files count; --kind is needed there, as they mix text and images."""
    mixed = batch(digits_dir, "--repo", best_digits_repo, out=tmp_path / "mixed.csv")
    assert mixed.code == 1 and "pass --kind" in mixed.err and not mixed.rows
    png = batch(f"{digits_dir}/png/*.png", "--repo", best_digits_repo, "--workers", "0", out=tmp_path / "r.jsonl")
    assert png.code == 0, png.err
    assert len(png.rows) == len(list((digits_dir / "png").iterdir())) and set(png.rows[0]) == set(BASE_COLUMNS)


def test_a_named_file_of_another_kind_is_refused_wherever_it_stands(batch: Batch, digits_dir: Path,
                                                                     names_rows: list[tuple[str, str]],
                                                                     tmp_path: Path) -> None:
    """A names list after a folder of images was an "invalid image" row (exit 2, after the whole run) when the
    folder held more files than inference reads; named first, or next to a CSV, it was refused before any work."""
    names = tmp_path / "names.txt"
    names.write_text("\n".join(name for name, _ in names_rows[:3]) + "\n")
    for inputs in ((digits_dir, "-r", names), (names, digits_dir, "-r")):
        run = batch(*inputs, "--repo", EXPORTED, out=tmp_path / "o.csv")
        assert run.code == 1 and not run.rows, run.err
        assert "they mix kinds" in run.err and f"1 text, {names}" in run.err and "pass --kind" in run.err


def test_inputs_may_follow_options(batch: Batch, tmp_path: Path) -> None:
    """``coursezoo batch a.txt --kind names b.txt`` refused b.txt as an unrecognized argument."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("Nakamura\n")
    run = batch(tmp_path / "a.txt", "--kind", "names", tmp_path / "b.txt", "--repo", EXPORTED, out=tmp_path / "o.csv")
    assert run.code == 0 and [r["path"] for r in run.rows] == [f"{tmp_path}/a.txt:1", f"{tmp_path}/b.txt:1"], run.err


def test_diabetes_csv_with_bad_rows(batch: Batch, diabetes_rows: list[list[str]], tmp_path: Path) -> None:
    """The course file with a header and its label column, plus rows a spreadsheet export really produces."""
    lines = ["Pregnancies,Glucose,BloodPressure,SkinThickness,Insulin,BMI,Pedigree,Age,Outcome"]
    lines += [",".join(row) for row in diabetes_rows]
    lines += ["0.1,0.2,0.3", "0.1,x,0,0,0,0,0,0,1", "nan,0,0,0,0,0,0,0,1", "6,148,72,35,0,33.6,0.627,50,1", "",
              "0,0,0,0,0,0,0,0,1"]
    (tmp_path / "patients.dat").write_text("\n".join(lines) + "\n")
    run = batch(tmp_path / "patients.dat", "--repo", EXPORTED, "--top-k", "2", out=tmp_path / "d.csv")
    assert run.code == 2, run.err
    assert len(run.rows) == len(diabetes_rows) + 5  # the blank line is not a record
    assert [r["path"] for r in run.rows[:2]] == [f"{tmp_path}/patients.dat:2", f"{tmp_path}/patients.dat:3"]
    errors = [r for r in run.rows if r["error"]]
    assert [_reason(r) for r in errors] == ["bad row"] * 4
    # columns as the file names them, not positions in a one-record check ("record 0 feature 0 is 6")
    assert [r["error"] for r in errors[1:]] == [
        "bad row: column 2 (Glucose) is 'x': expected a number",
        "bad row: the row has NaN or infinite values (or beyond float32's range): expected finite numbers, "
        "|x| < 3.4e38",
        "bad row: column 1 (Pregnancies) is 6: expected features scaled as in the course CSV, -1..1 (accepted: "
        "-2..2)"]  # unscaled
    good = [r for r in run.rows if not r["error"]]
    accuracy = sum(r["prediction"] == r["label"] for r in good[:-1]) / len(diabetes_rows)
    assert accuracy >= 0.7  # the model's test-split accuracy is 0.757; the file is mostly training rows
    assert f"{accuracy:.4f}"[:4] in run.out and "label column" in run.out
    assert all({r["top1"], r["top2"]} == {"0", "1"} for r in good)


def test_names_lines_with_empty_lines(batch: Batch, names_rows: list[tuple[str, str]], tmp_path: Path) -> None:
    """Blank lines (between the parts of a list, at its end) are not inputs, as in a CSV: they were error rows,
    and exit 2 for a list whose every name was answered. A file of blank lines is one "empty file" row."""
    sample = names_rows[::20]  # 335 names of every country
    text = "\n".join(name for name, _ in sample[:100]) + "\n\n   \n" + "\n".join(name for name, _ in sample[100:])
    (tmp_path / "names.csv").write_text(text + "\n\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    run = batch(tmp_path / "names.csv", "--repo", EXPORTED, out=tmp_path / "n.csv")
    assert run.code == 0, run.err
    assert len(run.rows) == len(sample) and not any(r["error"] for r in run.rows)
    assert run.rows[100]["path"] == f"{tmp_path}/names.csv:103"  # numbered by line, blank ones counted
    blank = batch(tmp_path / "blank.txt", "--kind", "names", "--repo", EXPORTED, out=tmp_path / "b.csv")
    assert blank.code == 2 and [_reason(r) for r in blank.rows] == ["empty file"]
    predicted = [r["prediction"] for r in run.rows if not r["error"]]
    accuracy = sum(p == country for p, (_, country) in zip(predicted, sample, strict=True)) / len(sample)
    assert accuracy >= 0.75  # the card's test accuracy is 0.845


def test_refuses_to_overwrite_and_exit_codes(batch: Batch, names_rows: list[tuple[str, str]], tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("Nakamura\nSmith\n")
    out = tmp_path / "names.csv"
    assert batch(tmp_path / "names.txt", "--repo", EXPORTED, out=out).code == 0
    before = out.read_bytes()
    again = batch(tmp_path / "names.txt", "--repo", EXPORTED, out=out)
    assert again.code == 1 and "--overwrite" in again.err and out.read_bytes() == before
    assert batch(tmp_path / "names.txt", "--repo", EXPORTED, "--overwrite", out=out).code == 0
    assert batch(tmp_path / "missing.txt", "--repo", EXPORTED, out=tmp_path / "x.csv").code == 1
    assert batch(tmp_path / "names.txt", "--model", "no_such_model", out=tmp_path / "y.csv").code == 1
    wrong_model = batch(tmp_path / "names.txt", "--model", "diabetes_mlp", "--repo", EXPORTED, out=tmp_path / "z.csv")
    assert wrong_model.code == 1 and "--kind diabetes" in wrong_model.err
    assert batch(tmp_path / "names.txt", "--batch-size", "0", out=tmp_path / "w.csv").code == 1
    assert not any(tmp_path.glob("[xyzw].csv*"))


def test_limit_then_resume_covers_every_input_once(batch: Batch, names_rows: list[tuple[str, str]],
                                                   tmp_path: Path) -> None:
    """The results file sits in the input folder: it is never read as an input."""
    (tmp_path / "names.txt").write_text("\n".join(name for name, _ in names_rows[:500]) + "\n")
    out = tmp_path / "names.jsonl"
    first = batch(tmp_path, "--repo", EXPORTED, "--limit", "120", "--batch-size", "50", out=out)
    assert first.code == 0 and len(first.rows) == 120
    rest = batch(tmp_path, "--repo", EXPORTED, "--resume", "--batch-size", "50", out=out)
    assert rest.code == 0 and "resumed       120" in rest.out
    whole = batch(tmp_path / "names.txt", "--repo", EXPORTED, out=tmp_path / "whole" / "names.jsonl")
    assert rest.rows == whole.rows  # same rows, same order, as one uninterrupted run


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_without_loss_or_duplicates(names_rows: list[tuple[str, str]], tmp_path: Path,
                                                       sig: signal.Signals) -> None:
    """A kill mid-run keeps the flushed rows in <out>.partial (maybe a torn last line), Ctrl-C exits 130 with
    the same promise; --resume completes the file."""
    names = [name for name, _ in names_rows[::4]]
    inputs = []
    for part in range(4):
        path = tmp_path / f"names{part}.txt"
        path.write_text("\n".join(names) + "\n")
        inputs.append(str(path))
    out = tmp_path / "names.csv"
    command = [sys.executable, "-m", "coursezoo", "batch", *inputs, "--repo", str(EXPORTED), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    slow = [*command, "--batch-size", "8"]  # many small batches: a kill lands mid-run
    proc = subprocess.Popen(slow, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = partial_path(out)
    while proc.poll() is None and (not partial.exists() or partial.stat().st_size < 8_000):
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), stderr
    assert not out.exists() and partial.exists()
    kept = partial.read_bytes().count(b"\n") - 1
    assert 0 < kept < 4 * len(names)
    resumed = subprocess.run([*command, "--resume"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    ids = [row["path"] for row in read_rows(out)]
    expected = [f"{path}:{n}" for path in inputs for n in range(1, len(names) + 1)]
    assert ids == expected and not partial.exists()


def test_newest_valid_version_is_used_and_a_pinned_broken_one_refused(batch: Batch, tmp_path: Path) -> None:
    """Version 2's model.onnx does not match its card: the run falls back to version 1, as the server does."""
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(EXPORTED / "names_gru" / "1", repo / "names_gru" / version)
    edit_card(repo / "names_gru" / "2", lambda card: card.update(version="2"))
    (repo / "names_gru" / "2" / "model.onnx").write_bytes(b"not the exported graph")
    (tmp_path / "names.txt").write_text("Nakamura\n")
    run = batch(tmp_path / "names.txt", "--repo", repo, out=tmp_path / "a.csv")
    assert run.code == 0 and run.rows[0]["model_version"] == "1"
    pinned = batch(tmp_path / "names.txt", "--repo", repo, "--model", "names_gru:2", out=tmp_path / "b.csv")
    assert pinned.code == 1 and "sha256" in pinned.err


def test_a_version_that_is_not_there_or_not_a_number_is_named_as_such(batch: Batch, tmp_path: Path) -> None:
    """``--model NAME:7`` said "no model 'NAME:7'" and listed NAME among the models it has; ``NAME:x`` too."""
    (tmp_path / "names.txt").write_text("Nakamura\n")
    runs = {spec: batch(tmp_path / "names.txt", "--repo", EXPORTED, "--model", spec, out=tmp_path / "o.csv")
            for spec in ("names_gru:7", "names_gru:x", "names_gru:", ":1", "names_gru:01")}
    assert runs["names_gru:7"].err.splitlines()[-1] == ("coursezoo batch: error: model 'names_gru' has no version "
                                                        "'7'; versions: 1")
    assert "version 'x' is not a whole number > 0: expected NAME or NAME:VERSION (e.g. names_gru:1)" in \
        runs["names_gru:x"].err
    assert "version '' is not a whole number" in runs["names_gru:"].err and "names no model" in runs[":1"].err
    assert all(run.code == 1 and not run.rows for spec, run in runs.items() if spec != "names_gru:01")
    assert runs["names_gru:01"].code == 0 and runs["names_gru:01"].rows[0]["model_version"] == "1"  # as the server


def test_a_device_that_cannot_run_fails_once_not_as_a_broken_version(batch: Batch, tmp_path: Path) -> None:
    """``--device cuda`` without a usable GPU: the device's error, not "skipping a broken model version" for every
    version first (as if the files were bad)."""
    if "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidiactl").exists():
        pytest.skip("a GPU is here: the CUDA provider runs")
    (tmp_path / "names.txt").write_text("Nakamura\n")
    run = batch(tmp_path / "names.txt", "--repo", EXPORTED, "--device", "cuda", out=tmp_path / "a.csv")
    assert run.code == 1 and "CUDAExecutionProvider cannot be used" in run.err
    assert "broken model version" not in run.err


def test_a_card_that_says_cpu_runs_there_whatever_the_device(batch: Batch, tmp_path: Path) -> None:
    """A card's ``serving.device`` "cpu" (Triton's KIND_CPU, for a model too small for a GPU to pay) holds for the
    batch CLI as for the server: ``--device cuda`` runs it on the CPU, here where CUDA cannot run at all. Any other
    value is a broken version, named with the values expected."""
    (tmp_path / "names.txt").write_text("Nakamura\n")
    for version, device in (("1", "cpu"), ("2", "gpu")):
        repo = tmp_path / f"repo{version}"
        version_dir = shutil.copytree(EXPORTED / "names_gru" / "1", repo / "names_gru" / "1")
        dataclasses.replace(ModelCard.load(version_dir), serving={"device": device}).save(version_dir)
    run = batch(tmp_path / "names.txt", "--repo", tmp_path / "repo1", "--device", "cuda", out=tmp_path / "a.csv")
    assert run.code == 0 and run.rows[0]["prediction"] == "Japanese"
    run = batch(tmp_path / "names.txt", "--repo", tmp_path / "repo2", "--device", "cuda", out=tmp_path / "b.csv")
    assert run.code == 1 and "bad serving value: device 'gpu': expected one of auto, cpu" in run.err


def test_runs_without_pyarrow_and_says_what_a_uri_needs(names_rows: list[tuple[str, str]], tmp_path: Path) -> None:
    """The server image (which also runs the compose batch job) has no pyarrow: it comes with the ray extra.
    Local inputs must classify without it; an s3:// input must say what is missing instead of crashing."""
    names = tmp_path / "names.txt"
    names.write_text("\n".join(name for name, _ in names_rows[:50]) + "\n")
    no_pyarrow = ("import sys; sys.modules['pyarrow'] = None; "  # any import of pyarrow now raises ImportError
                  "from coursezoo import cli; sys.exit(cli.main(sys.argv[1:]))")

    def batch(*inputs: str, out: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", no_pyarrow, "batch", *inputs, "--repo", str(EXPORTED), "--out",
                               str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)

    local = batch(str(names), out=tmp_path / "local.csv")
    assert local.returncode == 0, local.stderr
    assert len(read_rows(tmp_path / "local.csv")) == 50
    uri = batch("s3://bucket/names.txt", out=tmp_path / "uri.csv")
    assert uri.returncode == 1 and "needs pyarrow" in uri.stderr, uri.stderr
    assert "Traceback" not in uri.stderr


def test_workers_check_the_model_file_they_load(tmp_path: Path) -> None:
    """A worker loads the model itself, so it checks the file against the card as the main process did: a
    file replaced after the run started stops the run with an error instead of answering from another model."""
    for folder in ("good", "replaced"):
        shutil.copytree(EXPORTED / "mnist_cnn" / "1", tmp_path / folder / "mnist_cnn" / "1")
    digits = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    for folder in ("good", "replaced"):
        engine = LocalEngine.open(tmp_path / folder, "mnist_cnn", None, device="cpu", top_k=0,
                                  max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, decode_workers=2)
        worker_classify = engine.worker_classify
        assert worker_classify is not None
        if folder == "good":
            answers, own = worker_classify(digits), engine.classify(digits)
            assert [a.label for a in answers] == [a.label for a in own]
            np.testing.assert_allclose([a.confidence for a in answers], [a.confidence for a in own], rtol=1e-5)
        else:
            shutil.copy(EXPORTED / "mnist_softmax" / "1" / "model.onnx", tmp_path / folder / "mnist_cnn" / "1")
            with pytest.raises(EngineError, match="does not match the card"):
                worker_classify(digits)


def test_the_course_names_file_reports_accuracy(batch: Batch, names_rows: list[tuple[str, str]],
                                                tmp_path: Path) -> None:
    """The course's own test file, quoted ``"Abl","Czech"`` rows with CRLF endings: the names are classified and
    the countries are the expected labels (it was read as whole lines: 4% "accuracy", exit 0)."""
    with open(tmp_path / "names_test.csv", "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\r\n").writerows(names_rows)
    run = batch(tmp_path / "names_test.csv", "--repo", EXPORTED, out=tmp_path / "n.csv")
    assert run.code == 0, run.err
    assert [(r["path"], r["label"]) for r in run.rows] == [(f"{tmp_path}/names_test.csv:{n}", country)
                                                          for n, (_, country) in enumerate(names_rows, 1)]
    accuracy = sum(r["prediction"] == r["label"] for r in run.rows) / len(names_rows)
    assert accuracy >= 0.8  # the card's test accuracy is 0.845
    assert f"accuracy      {accuracy:.4f}" in run.out


def test_a_diabetes_file_with_a_bad_first_row_goes_to_the_diabetes_model(batch: Batch, diabetes_rows: list[list[str]],
                                                                         tmp_path: Path) -> None:
    """A short first row neither makes the file "text" (every record a "name" for names_gru) nor fails the
    good rows after it: it is the one error row."""
    (tmp_path / "patients.csv").write_text("0.1,0.2,0.3\n" + "".join(",".join(r) + "\n" for r in diabetes_rows))
    run = batch(tmp_path / "patients.csv", "--repo", EXPORTED, out=tmp_path / "d.csv")
    assert run.code == 2, run.err
    assert [_reason(r) for r in run.rows if r["error"]] == ["bad row"] and run.rows[0]["error"]
    assert {r["model"] for r in run.rows[1:]} == {"diabetes_mlp"} and len(run.rows) == len(diabetes_rows) + 1


def test_skipped_subfolders_are_reported_once(batch: Batch, tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "names.txt").write_text("Nakamura\n")
    (tmp_path / "in" / "sub" / "more.txt").write_text("Smith\n")
    run = batch(tmp_path / "in", "--repo", EXPORTED, out=tmp_path / "n.csv")
    assert run.code == 0 and len(run.rows) == 1
    assert run.err.count("skipped 1 subfolders; pass --recursive") == 1, run.err


def test_a_file_name_that_is_not_utf8_gets_its_rows_and_resumes(batch: Batch, digits_dir: Path,
                                                                 best_digits_repo: Path, tmp_path: Path) -> None:
    """A name's bytes that are not UTF-8 are written as \\xNN (a backslash that would read as one as \\x5c), so
    the run goes on and --resume knows those rows; it used to stop every run, --resume too, at that file."""
    names = tmp_path / "names"
    names.mkdir()
    (names / os.fsdecode(b"caf\xe9.txt")).write_text("Nakamura\nRossi\n")  # Latin-1, as an old archive names it
    (names / "plain\\x41.txt").write_text("Smith\n")  # a backslash that looks like an escape
    expected = [f"{names}/caf\\xe9.txt:1", f"{names}/caf\\xe9.txt:2", f"{names}/plain\\x5cx41.txt:1"]
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"names.{fmt}"
        first = batch(names, "--repo", EXPORTED, "--limit", "1", out=out)
        assert first.code == 0 and [r["path"] for r in first.rows] == expected[:1], first.err
        rest = batch(names, "--repo", EXPORTED, "--resume", out=out)
        assert rest.code == 0 and "resumed       1 " in rest.out, rest.err
        assert [r["path"] for r in rest.rows] == expected and all(r["prediction"] for r in rest.rows)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sorted((digits_dir / "png").iterdir())[0], images / os.fsdecode(b"\xff.png"))
    digits = batch(images, "--repo", best_digits_repo, "--workers", "0", out=tmp_path / "digits.csv")
    assert digits.code == 0 and [r["path"] for r in digits.rows] == [f"{images}/\\xff.png"], digits.err
    assert digits.rows[0]["prediction"]  # the file was read under its real name


def test_out_naming_a_folder_is_refused_before_any_work(names_rows: list[tuple[str, str]], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever the options: --overwrite and --resume used to classify everything, then fail to rename the partial
    file over the folder, and point to each other."""
    (tmp_path / "names.txt").write_text("\n".join(name for name, _ in names_rows[:50]) + "\n")
    folder = tmp_path / "results"
    folder.mkdir()
    for options in ((), ("--overwrite",), ("--resume",)):
        code = cli.main(["batch", str(tmp_path / "names.txt"), "--repo", str(EXPORTED), "--out", str(folder),
                         *options])
        err = capsys.readouterr().err
        assert code == 1 and f"--out {folder} is a folder" in err and "--resume" not in err, err
    assert not any(folder.iterdir()) and not partial_path(folder).exists()


def test_resumed_counts_the_rows_kept_from_the_earlier_run(batch: Batch, tmp_path: Path) -> None:
    """A file may hold an id twice (written from overlapping arguments, or two files joined): the summary counts
    its rows, so its first line is the size of the results file (it counted distinct ids)."""
    (tmp_path / "names.txt").write_text("Nakamura\nRossi\nSmith\n")
    out = tmp_path / "names.csv"
    assert batch(tmp_path / "names.txt", "--repo", EXPORTED, "--limit", "2", out=out).code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join([*lines, lines[1]]))
    rest = batch(tmp_path / "names.txt", "--repo", EXPORTED, "--resume", out=out)
    assert rest.code == 0 and len(rest.rows) == 4, rest.err
    assert rest.out.startswith(f"4 inputs -> {out}") and "resumed       3 already in the output" in rest.out


def test_inputs_after_a_double_dash_are_inputs(names_rows: list[tuple[str, str]], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose name starts with '-' follows '--'; Python 3.11's intermixed parsing dropped it."""
    monkeypatch.chdir(tmp_path)
    Path("-names.txt").write_text("Nakamura\n")
    code = cli.main(["batch", "--repo", str(EXPORTED), "--out", "out.csv", "--", "-names.txt"])
    assert code == 0 and [row["path"] for row in read_rows(tmp_path / "out.csv")] == ["-names.txt:1"]  # file:line
