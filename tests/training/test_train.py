"""A short training run of each model family (a subset, one epoch) lowers the loss."""

from pathlib import Path

import pytest
import torch

from training import data
from training.catalog import CATALOG
from training.train import get_args_parser, train_batches, train_one

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
