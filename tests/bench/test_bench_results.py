"""How the harness turns measurements into rows, ratios and files: what a failure, a rounded print or a
careless path would otherwise get wrong without a word."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench import batch_cli, exports, harness, inprocess, report
from bench import data as bench_data
from bench.stats import PERCENTILE_MIN_CALLS, summarize
from serving.batch.summary import Summary, Tally
from tests.conftest import DATA_MIRROR, EXPORTED, REPO_ROOT


def test_an_onnxruntime_failure_fails_its_row_only(digits_model: str) -> None:
    """onnxruntime's exceptions (here Fail, from a batch of none) are no RuntimeErrors: one such failure must
    not lose the rows measured before it."""
    selected, _ = exports.select(EXPORTED, [digits_model])
    results, failures = inprocess.run(selected, seconds=0.0, warmup=0, min_calls=1, cuda=False, batch_sizes=(1, 0))
    assert {r.case for r in results if r.batch == 1} >= {"ORT CPU", inprocess.RUNTIME_CPU}
    expected = f"in-process ORT CPU {digits_model} failed at batch 0: [ONNXRuntimeError]"
    assert any(f.startswith(expected) for f in failures), failures


def test_a_gpu_run_without_a_gpu_labels_no_row_cuda(digits_model: str) -> None:
    """Asked for CUDA where the provider cannot be created, ORT makes the session on the CPU without an error: the
    in-process group must refuse the CUDA rows, say why, and still measure the CPU ones (this host has no GPU)."""
    selected, _ = exports.select(EXPORTED, [digits_model])
    if inprocess.cuda_available(selected[0]):
        pytest.skip("ONNX Runtime runs on a GPU here: nothing falls back")
    args = harness.get_args_parser().parse_args(["--models", digits_model, "--repo", str(EXPORTED),
                                                 "--batch-sizes", "1"])
    plan = dataclasses.replace(harness.QUICK, inproc_seconds=0.0, inproc_warmup=0, inproc_min_calls=1)
    run = harness.Run(args, plan, selected, cuda=True)
    run.server_settings = {"max_queue_delay_ms": 1.0}  # named by a server ratio's label
    run.group("in-process baselines", run.inprocess)
    assert not [r.key for r in run.results if "cuda" in r.key or "CUDA" in r.case]
    assert {r.case for r in run.results} >= {"ORT CPU", inprocess.RUNTIME_CPU}
    assert any("session on CPUExecutionProvider, not CUDAExecutionProvider" in e for e in run.errors), run.errors
    cuda_ratios = [r for r in report.compute_ratios(run.results, run.ratios(), {"inprocess"}) if "cuda" in r["name"]]
    assert cuda_ratios and all(r["value"] is None for r in cuda_ratios)


def test_full_fp32_turns_torchs_tf32_off_and_back() -> None:
    """The eager CUDA row runs in full FP32, as the server's ORT CUDA sessions do; settings are restored after."""
    torch = pytest.importorskip("torch")
    switches = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
    before = [s.fp32_precision for s in switches]
    with inprocess.full_fp32():
        assert [s.fp32_precision for s in switches] == ["ieee"] * 3
    assert [s.fp32_precision for s in switches] == before


def test_batch_cli_throughput_comes_from_its_rate() -> None:
    """2,000 items in 0.095 s print as "0.10 s" (20,000 items/s): the rate line says 21,052.6."""
    summary = Summary(out="out.csv", engine="local", tally=Tally(classes=Counter({"7": 2000})), started=0.0,
                      finished=0.095)
    items, seconds = batch_cli.throughput(summary.render()) or (0, 0.0)
    assert items == 2000
    assert items / seconds == pytest.approx(2000 / 0.095, rel=1e-5)
    assert batch_cli.throughput("no summary") is None


def test_percentiles_need_calls_beyond_them() -> None:
    row = summarize("k", "in-process", "c", "m", batch=1, concurrency=1, items=3, seconds=0.3,
                    latencies_s=[0.1, 0.1, 0.1])
    assert (row.calls, row.p90_ms, row.p99_ms) == (3, None, None) and row.p50_ms == pytest.approx(100.0)
    enough = PERCENTILE_MIN_CALLS[99]
    row = summarize("k", "in-process", "c", "m", batch=1, concurrency=1, items=enough, seconds=1.0,
                    latencies_s=[0.01] * enough)
    assert row.calls == enough and row.p99_ms == pytest.approx(10.0)


def test_a_cpu_ratio_prints_the_division_it_is() -> None:
    """The numerator costs 1 CPU ms per item, the denominator 2: the first is twice as efficient, and the
    printed parts divide to the printed value."""
    lean, costly = (summarize(key, "server", "c", "m", batch=1, concurrency=1, items=100, seconds=1.0,
                              latencies_s=[0.01] * 100, model_cpu_s=cpu)
                    for key, cpu in (("lean", 0.1), ("costly", 0.2)))
    ratios = report.compute_ratios([lean, costly], [report.Ratio("lean vs costly", "lean", "costly", by_cpu=True)],
                                   ran=set())
    assert ratios[0]["value"] == pytest.approx(2.0)
    assert "lean vs costly: 1,000 vs 500 items/CPU-s = 2.00x" in report.render_text([], ratios, [], [])


def test_a_relative_repo_is_the_one_under_the_current_directory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the batch CLI runs in the repository root: it must get the path meant here
    assert harness.get_args_parser().parse_args(["--repo", "models"]).repo == tmp_path / "models"


def test_relative_data_places_reach_the_load_generators_as_meant(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The load generators run in the repository root: a relative mirror from the environment reached them as
    a path under it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COURSEZOO_DATA_MIRROR", "shared/data")
    monkeypatch.setenv("COURSEZOO_DATA_ROOT", "ignored")
    harness.set_data_places(Path("mine"), None)
    assert (os.environ["COURSEZOO_DATA_ROOT"], os.environ["COURSEZOO_DATA_MIRROR"]) == (
        str(tmp_path / "mine"), str(tmp_path / "shared" / "data"))


def test_the_markdown_copy_never_overwrites_the_json() -> None:
    assert harness.markdown_path(Path("r/latest.json")) == Path("r/latest.md")
    assert harness.markdown_path(Path("r/x.md")) == Path("r/x.md.md")


def test_an_unwritable_json_path_is_refused_before_measuring(tmp_path: Path) -> None:
    env = {**os.environ, "COURSEZOO_DATA_MIRROR": str(DATA_MIRROR)}
    done = subprocess.run([sys.executable, "-m", "coursezoo", "bench", "--quick", "--repo", str(EXPORTED),
                           "--json", str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert f"cannot write the results: {tmp_path} is a directory" in done.stderr
    assert "[bench]" not in done.stderr  # nothing was measured


def test_missing_data_is_refused_before_any_server_starts(tmp_path: Path) -> None:
    """It started some 15 servers and wrote 70 rows of FileNotFoundError instead."""
    env = {**os.environ, "COURSEZOO_DATA_MIRROR": str(tmp_path / "no-mirror")}
    done = subprocess.run([sys.executable, "-m", "coursezoo", "bench", "--quick", "--repo", str(EXPORTED),
                           "--data-root", str(tmp_path / "no-root"), "--json", str(tmp_path / "r.json")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "[bench]" not in done.stderr
    assert done.stderr.startswith(f"coursezoo bench: no mnist/t10k-images-idx3-ubyte.gz in the data root "
                                  f"{tmp_path / 'no-root'} (--data-root, COURSEZOO_DATA_ROOT) or the mirror "
                                  f"{tmp_path / 'no-mirror'}")


def test_the_data_root_is_read_before_the_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As train reads it: files train fetched into data/ serve without a mirror."""
    root = tmp_path / "root"
    (root / "names").mkdir(parents=True)
    shutil.copy(DATA_MIRROR / bench_data.NAMES_TEST, root / bench_data.NAMES_TEST)
    monkeypatch.setenv("COURSEZOO_DATA_ROOT", str(root))
    monkeypatch.setenv("COURSEZOO_DATA_MIRROR", str(tmp_path / "no-mirror"))
    assert bench_data.data_file(bench_data.NAMES_TEST) == root / bench_data.NAMES_TEST
    with pytest.raises(FileNotFoundError, match="no diabetes/diabetes.csv.gz in the data root"):
        bench_data.data_file(bench_data.DIABETES)


def test_the_readme_sample_digits_are_the_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/mnist_pngs.py: the files the README's examples classify (digit_00.png a 7, digit_01.png a 2)."""
    import runpy

    from PIL import Image

    monkeypatch.setenv("COURSEZOO_DATA_MIRROR", str(DATA_MIRROR))
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "mnist_pngs.py"))
    assert script["main"]([str(tmp_path / "samples"), "--count", "2"]) == 0
    assert capsys.readouterr().out.endswith("their digits: 7 2\n")
    for i, expected in enumerate(bench_data.pixels(2)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "samples" / f"digit_0{i}.png")), expected)


def _row(key: str, throughput: float, p50: float) -> dict[str, object]:
    return {**summarize(key, "server", "c", "m", batch=1, concurrency=1, items=int(throughput), seconds=1.0,
                        latencies_s=[p50 / 1e3] * 10).to_json(), "note": "n"}


def test_rounds_in_turn_keep_the_median_latencies() -> None:
    """A row is its median round; kept "fastest", its throughput is the fastest round's and its latencies
    still the median round's, as its note says."""
    rounds = [_row("k", 100, 5.0), _row("k", 300, 1.0), _row("k", 200, 3.0)]
    median = harness._one_round(rounds)
    assert (median["throughput"], median["p50_ms"]) == (200, pytest.approx(3.0))
    assert median["note"] == "n; median of 3 rounds in turn (100, 300, 200 items/s)"
    fastest = harness._one_round(rounds, fastest=True)
    assert (fastest["throughput"], fastest["p50_ms"]) == (300, pytest.approx(3.0))
    assert "latencies: the median round (200 items/s)" in fastest["note"]


def test_a_ratio_whose_rows_are_missing_is_reported_as_not_measured() -> None:
    """Never left out: one whose group did not run says which, one whose row failed says which row."""
    row = summarize("here", "server", "c", "m", batch=1, concurrency=1, items=10, seconds=1.0, latencies_s=[0.1])
    declared = [report.Ratio("skipped", "here", "peerturn/x", needs=("peer", "server")),
                report.Ratio("failed", "here", "gone", 2.0, needs=("server",))]
    skipped, failed = report.compute_ratios([row], declared, ran={"server"})
    assert (skipped["value"], skipped["met"], skipped["not_run"]) == (None, None, ["peer"])
    assert (failed["value"], failed["met"], failed["not_run"]) == (None, None, [])
    # a missing row is no failure by itself (a concurrency or batch size not chosen, the peer skipped)
    assert failed["note"].startswith("not measured: no row gone in this run (a concurrency or batch size not chosen")
    text = report.render_text([], [skipped, failed], [], [])
    assert "failed: not measured: no row gone in this run" in text
    assert "1 more not measured: peer did not run" in text


def test_in_process_rows_cycle_through_the_load_generators_batches() -> None:
    """The names model at batch 1 ran 'Abl', its shortest name, alone; the server gets 16 distinct names."""
    selected, _ = exports.select(EXPORTED, ["names_gru"])
    if not selected:
        pytest.skip("no names_gru export")
    feeds = inprocess.distinct_inputs(selected[0], 1)
    lengths = [int(f[selected[0].card.inputs[1].name][0]) for f in feeds]
    assert lengths == [len(name) for name in bench_data.names()[:bench_data.DISTINCT]]
    called: list[int] = []
    position = {id(f): i for i, f in enumerate(feeds)}
    inprocess.measure(selected[0], "fake", lambda f: lambda: called.append(position[id(f)]), feeds, seconds=0.0,
                      warmup=0, min_calls=40)
    assert called == [i % bench_data.DISTINCT for i in range(40)]
