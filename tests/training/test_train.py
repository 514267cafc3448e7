"""A short training run of each model family (a subset, one epoch) lowers the loss."""

import fcntl
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from training import data
from training import train as train_module
from training.catalog import CATALOG, resolve
from training.train import LOCK, MAX_SEED, TrainError, get_args_parser, main, train_batches, train_one

# (model, examples): a few optimizer steps of every family, enough for each to lower its loss by a tenth or more
# (mnist_softmax on 6,400 examples, mnist_cnn on 1,280, mnist_inception on 640 and logistic_regression in 20 steps
# lowered it by 0.4 to 5 %: too close to what the batches' differences alone give an untrained model)
SHORT_RUNS = [
    ("linear_regression", None), ("logistic_regression", None), ("diabetes_mlp", None),
    ("mnist_softmax", 12800), ("mnist_cnn", 2560), ("mnist_inception", 2560), ("mnist_resnet", 640),
    ("hello_rnncell", None), ("hello_rnn", None), ("hello_embedding", None), ("names_gru", 2560),
]
#: the most the last steps' loss may be of the first steps': without learning (no optimizer step) it stays
#: within 0.5 % of them (a different batch, the same weights), and each run above ends at 0.92 of them or less
LEARNED = 0.95


@pytest.mark.parametrize(("name", "limit"), SHORT_RUNS)
def test_one_epoch_lowers_the_loss(name: str, limit: int | None, data_cfg: data.DataConfig, tmp_path: Path) -> None:
    entry = CATALOG[name]
    # the toy sets are one batch: their "epoch" is a single step, so give them a hundred
    epochs = 1 if limit or entry.dataset == "diabetes" else 100
    report = train_one(entry, data_cfg, epochs=epochs, limit=limit, runs_dir=tmp_path, seed=0, progress=False)
    first, last = report["first_steps_loss"], report["last_steps_loss"]
    assert last < LEARNED * first, f"loss {first:.4f} -> {last:.4f}: {last / first:.3f} of it"
    assert (tmp_path / name / "model.pt").exists()
    assert report["data_sha256"] == data.data_sha256(entry.dataset, data_cfg)
    assert {"epochs", "seconds", "device", "seed", "metrics"} <= set(report)


def test_training_is_repeatable(data_cfg: data.DataConfig, tmp_path: Path) -> None:
    entry = CATALOG["diabetes_mlp"]
    a = train_one(entry, data_cfg, epochs=2, runs_dir=tmp_path / "a", progress=False)
    b = train_one(entry, data_cfg, epochs=2, runs_dir=tmp_path / "b", progress=False)
    assert a["losses"] == b["losses"] and a["metrics"] == b["metrics"]


def test_a_limited_run_draws_its_examples_from_every_class(data_cfg: data.DataConfig) -> None:
    """The names file is sorted by country: its first 2,560 names hold 4 of the 18; a seeded draw holds all."""
    generator = torch.Generator().manual_seed(0)
    batches = train_batches(CATALOG["names_gru"], data_cfg, generator, limit=2560)
    countries = {int(c) for _, target in batches for c in target}
    assert len(countries) == len(CATALOG["names_gru"].labels)


@pytest.mark.parametrize("name", ["linear_regression", "logistic_regression"])
def test_a_limit_applies_to_the_toy_points_too(name: str, data_cfg: data.DataConfig) -> None:
    """``--limit 2`` trained on all 3 points while the report recorded ``train_limit: 2``."""
    [((x,), y)] = train_batches(CATALOG[name], data_cfg, torch.Generator().manual_seed(0), limit=2)
    assert len(x) == len(y) == 2


@pytest.mark.parametrize("flag", ["--epochs", "--limit"])
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_counts_must_be_positive(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["diabetes_mlp", flag, value])
    assert "expected a whole number >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", str(MAX_SEED + 1)])
def test_a_seed_numpy_cannot_take_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """It was numpy's ValueError traceback after the data had loaded."""
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["diabetes_mlp", "--seed", value])
    assert f"expected a whole number from 0 to {MAX_SEED}" in capsys.readouterr().err


def test_all_beside_names_means_every_model_and_a_name_twice_runs_once() -> None:
    """``train all hello_rnn`` answered "unknown model(s) all; choose from: all, ..."."""
    assert resolve(["all", "hello_rnn"]) == resolve("all")
    assert [e.name for e in resolve(["hello_rnn", "diabetes_mlp", "hello_rnn"])] == ["hello_rnn", "diabetes_mlp"]
    with pytest.raises(SystemExit, match="unknown model.s. hello_rnnn; choose from"):  # not lost beside "all"
        resolve(["all", "hello_rnnn"])


def test_a_limit_that_keeps_everything_is_the_full_run(data_cfg: data.DataConfig) -> None:
    """A limit beyond the data's size drew a permutation from the generator, so the run differed from the full one."""
    entry = CATALOG["diabetes_mlp"]
    full, limited = (list(train_batches(entry, data_cfg, torch.Generator().manual_seed(0), limit))
                     for limit in (None, 10**8))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0][0], b[0][0]) for a, b in zip(full, limited, strict=True))


def _held(run_dir: Path) -> int:
    """Hold ``run_dir``'s lock as a running ``coursezoo train`` would; close the descriptor to let go."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_run_folder_in_use_is_refused_and_the_others_still_train(data_cfg: data.DataConfig, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Two trainings of one model into one folder wrote their checkpoints and reports in turn, and the report
    left could name the other run's checkpoint (export then shipped weights under another run's card)."""
    fd = _held(tmp_path / "linear_regression")
    try:
        with pytest.raises(TrainError, match="another `coursezoo train linear_regression` is writing"):
            train_one(CATALOG["linear_regression"], data_cfg, epochs=5, runs_dir=tmp_path, progress=False)
        assert not (tmp_path / "linear_regression" / "model.pt").exists()
        args = get_args_parser().parse_args(["linear_regression", "logistic_regression", "--epochs", "5",
                                             "--runs", str(tmp_path)])
        assert main(args) == 1
    finally:
        os.close(fd)
    captured = capsys.readouterr()
    assert "[ERR] linear_regression: another `coursezoo train linear_regression`" in captured.err
    assert "logistic_regression" in captured.out and (tmp_path / "logistic_regression" / "model.pt").exists()
    # the lock dies with its holder: the next run goes ahead
    train_one(CATALOG["linear_regression"], data_cfg, epochs=5, runs_dir=tmp_path, progress=False)


def test_a_run_folder_that_cannot_be_written_is_found_before_training(data_cfg: data.DataConfig,
                                                                      tmp_path: Path) -> None:
    """It surfaced as an OSError traceback once every epoch had run, the weights lost."""
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    with pytest.raises(TrainError, match=r"cannot write into .*runs/diabetes_mlp .*writable --runs"):
        train_one(CATALOG["diabetes_mlp"], data_cfg, epochs=1, runs_dir=tmp_path / "runs", progress=False)


def test_a_missing_held_out_file_is_found_before_the_first_epoch(data_cfg: data.DataConfig, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The test split was first read to evaluate, after every epoch had run."""
    if data_cfg.mirror is None:
        pytest.skip("needs the data mirror (COURSEZOO_DATA_MIRROR)")
    mirror = tmp_path / "mirror"
    (mirror / "names").mkdir(parents=True)
    shutil.copy(data_cfg.mirror / "names" / "names_train.csv.gz", mirror / "names")
    cfg = data.DataConfig(root=tmp_path / "root", mirror=mirror)
    with caplog.at_level(logging.INFO, logger="coursezoo.train"), \
            pytest.raises(data.DataError, match="missing names/names_test.csv.gz"):
        train_one(CATALOG["names_gru"], cfg, epochs=1, limit=64, runs_dir=tmp_path / "runs", progress=False)
    assert not [r for r in caplog.records if r.getMessage() == "epoch done"]


def test_any_failure_of_one_model_leaves_the_others_to_train(data_cfg: data.DataConfig, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Only missing data and a busy folder were caught: a CUDA out-of-memory error in one model was a traceback,
    and the models after it never trained."""
    fit = train_module._fit

    def out_of_memory_for_linear(entry, *args, **kwargs):
        if entry.name == "linear_regression":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(and pages more)")
        return fit(entry, *args, **kwargs)

    monkeypatch.setattr(train_module, "_fit", out_of_memory_for_linear)
    args = get_args_parser().parse_args(["linear_regression", "logistic_regression", "--epochs", "5",
                                         "--runs", str(tmp_path)])
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "[ERR] linear_regression: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n" in captured.err
    assert (tmp_path / "logistic_regression" / "model.pt").exists()
