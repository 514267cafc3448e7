"""Exports pass onnx.checker and agree with the eager model before anything is written."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from serving.card import ModelCard
from training import data
from training.catalog import CATALOG
from training.export import (
    PARITY_ATOL,
    Exported,
    ExportError,
    _check_close,
    export_one,
    get_args_parser,
    main,
    parity_inputs,
)
from training.train import train_one

# one model per family of exported graph: MLP, CNN, branches, RNN loop, packed bidirectional GRU
FAMILIES = [("diabetes_mlp", None), ("mnist_cnn", 640), ("mnist_inception", 320), ("mnist_resnet", 320),
            ("hello_rnncell", None), ("hello_embedding", None), ("names_gru", 1024)]


@pytest.mark.parametrize(("name", "limit"), FAMILIES)
def test_export_writes_checked_files_and_card(name: str, limit, data_cfg: data.DataConfig, tmp_path: Path) -> None:
    entry = CATALOG[name]
    train_one(entry, data_cfg, epochs=1, limit=limit, runs_dir=tmp_path / "runs", progress=False)
    # one epoch on a subset: below the bar for most, published on purpose to check the files
    dest = export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo", allow_below_bar=True).path
    assert dest == tmp_path / "repo" / name / "1"
    card = ModelCard.load(dest)
    assert [t.name for t in card.inputs] == [t.name for t in entry.inputs]
    for f in ("model.onnx", "model.pt"):
        card.verify_file(dest, f)
    onnx.checker.check_model(onnx.load(str(dest / "model.onnx")))
    parity = card.export["parity_max_abs_diff"]
    assert any(k.endswith("batch1") for k in parity) and len(parity) >= 3
    assert max(parity.values()) <= PARITY_ATOL
    assert card.data_sha256 == data.data_sha256(entry.dataset, data_cfg)
    assert json.loads((dest / "model.json").read_text())["labels"] == list(entry.labels)
    # the same run again: its files are the newest version's, byte for byte, so no version is added
    assert export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo",
                      allow_below_bar=True) == Exported(dest, written=False)
    assert [p.name for p in (tmp_path / "repo" / name).iterdir()] == ["1"]  # no staging folder left behind


def test_parity_failure_is_loud() -> None:
    with pytest.raises(ExportError, match="max abs diff"):
        _check_close("x", np.zeros((2, 3), np.float32), np.full((2, 3), 1e-3, np.float32))
    with pytest.raises(ExportError, match="shape"):
        _check_close("x", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))


def test_export_without_checkpoint_says_what_to_do(data_cfg: data.DataConfig, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="coursezoo train mnist_cnn"):
        export_one(CATALOG["mnist_cnn"], data_cfg, tmp_path / "runs", tmp_path / "repo")


def test_a_model_below_its_bar_is_not_exported(data_cfg: data.DataConfig, tmp_path: Path) -> None:
    """A smoke run (one epoch, a few hundred names) must not become the version the server serves."""
    entry = CATALOG["names_gru"]
    train_one(entry, data_cfg, epochs=1, limit=256, runs_dir=tmp_path / "runs", progress=False)
    with pytest.raises(ExportError, match=r"names_gru: accuracy .* below its bar: not exported .*--allow-below-bar"):
        export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo")
    assert not (tmp_path / "repo" / "names_gru").exists() or not any((tmp_path / "repo" / "names_gru").iterdir())
    dest = export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo", allow_below_bar=True).path
    assert ModelCard.load(dest).metrics["meets_bar"] is False


@pytest.mark.parametrize("damage", ["truncated", "replaced", "no report"])
def test_a_checkpoint_that_is_not_its_reports_is_refused(damage: str, data_cfg: data.DataConfig,
                                                         tmp_path: Path) -> None:
    """What an interrupted run or a run of another seed leaves behind: refused with what to do, no traceback."""
    entry = CATALOG["diabetes_mlp"]
    run = tmp_path / "runs" / entry.name
    train_one(entry, data_cfg, epochs=1, runs_dir=tmp_path / "runs", progress=False)
    if damage == "truncated":
        (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:100])
    elif damage == "replaced":
        report = (run / "metrics.json").read_text()
        train_one(entry, data_cfg, epochs=1, seed=1, runs_dir=tmp_path / "runs", progress=False)
        (run / "metrics.json").write_text(report)
    else:
        (run / "metrics.json").unlink()
    with pytest.raises(ExportError, match="diabetes_mlp: .*run `coursezoo train diabetes_mlp` again"):
        export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo", allow_below_bar=True)
    assert not (tmp_path / "repo").exists()


def test_parity_batches_reach_the_edges_of_the_dynamic_axes(data_cfg: data.DataConfig) -> None:
    """Names: every country, a one-letter name and one longer than any in the data; hello: 1 to 40 steps."""
    one, big = parity_inputs(CATALOG["names_gru"], data_cfg)
    assert len(one["lengths"]) == 1 and len(big["lengths"]) == 64
    items = data.NamesDataset(train=False, cfg=data_cfg).items
    longest = max(len(name) for name, _ in items)
    assert big["lengths"].min() == 1 and big["lengths"].max() > longest == 18
    assert big["chars"].shape[1] == big["lengths"].max()
    codes = {tuple(row[:n]) for row, n in zip(big["chars"].tolist(), big["lengths"].tolist(), strict=True)}
    countries = {country for name, country in items if tuple(name.encode()) in codes}
    assert countries == set(range(len(CATALOG["names_gru"].labels)))
    _, hello = parity_inputs(CATALOG["hello_rnn"], data_cfg)
    assert hello["chars"].shape == (6, 40)


@pytest.mark.parametrize("flag", ["--repo", "--out"])
def test_the_repository_flag_is_called_repo_as_elsewhere(flag: str) -> None:
    """``serve``, ``eval`` and ``batch`` name the model repository ``--repo``; export's former ``--out`` still works."""
    assert get_args_parser().parse_args(["all", flag, "somewhere"]).repo == Path("somewhere")


def _export_args(tmp_path: Path, data_cfg: data.DataConfig, *names: str) -> list[str]:
    return [*names, "--runs", str(tmp_path / "runs"), "--repo", str(tmp_path / "repo"), "--data-root",
            str(data_cfg.root), *(["--data-mirror", str(data_cfg.mirror)] if data_cfg.mirror else [])]


def test_a_new_run_is_a_new_version_and_the_same_run_again_is_not(data_cfg: data.DataConfig, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A restarted trainer job exported its run again: a byte-identical version, and a reload, per restart."""
    entry = CATALOG["diabetes_mlp"]
    train_one(entry, data_cfg, epochs=1, runs_dir=tmp_path / "runs", progress=False)
    args = get_args_parser().parse_args(_export_args(tmp_path, data_cfg, "diabetes_mlp", "--allow-below-bar"))
    assert main(args) == 0 and main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"diabetes_mlp: wrote {tmp_path / 'repo' / 'diabetes_mlp' / '1'} (")
    assert out[1].startswith(f"diabetes_mlp: unchanged, {tmp_path / 'repo' / 'diabetes_mlp' / '1'} already holds")
    train_one(entry, data_cfg, epochs=1, seed=1, runs_dir=tmp_path / "runs", progress=False)
    assert export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo", allow_below_bar=True) == \
        Exported(tmp_path / "repo" / "diabetes_mlp" / "2", written=True)


def test_one_model_that_fails_does_not_hold_back_the_others(data_cfg: data.DataConfig, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``export all`` stopped at the first failure, and a compose trainer job published a catalogue-order part."""
    train_one(CATALOG["linear_regression"], data_cfg, runs_dir=tmp_path / "runs", progress=False)
    args = get_args_parser().parse_args(_export_args(tmp_path, data_cfg, "diabetes_mlp", "linear_regression"))
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "export failed: diabetes_mlp: no checkpoint" in captured.err
    assert "coursezoo export: 1 of 2 not exported: diabetes_mlp" in captured.err
    assert "linear_regression: wrote" in captured.out and (tmp_path / "repo" / "linear_regression" / "1").is_dir()


def test_data_other_than_the_runs_is_refused(data_cfg: data.DataConfig, tmp_path: Path) -> None:
    """The bar was judged, and the card's accuracy measured, on data the card did not name (it named the run's)."""
    entry = CATALOG["diabetes_mlp"]
    train_one(entry, data_cfg, epochs=1, runs_dir=tmp_path / "runs", progress=False)
    other = data.DataConfig(root=tmp_path / "other")
    (other.root / "diabetes").mkdir(parents=True)
    rows = gzip.decompress((data_cfg.root / "diabetes" / "diabetes.csv.gz").read_bytes()).splitlines(keepends=True)
    (other.root / "diabetes" / "diabetes.csv.gz").write_bytes(gzip.compress(b"".join(rows[:-1])))  # one row less
    with pytest.raises(ExportError, match=r"diabetes_mlp: the data under .*other is not what the run trained on "
                                          r"\(diabetes/diabetes.csv.gz: not the sha256 its report names\)"):
        export_one(entry, other, tmp_path / "runs", tmp_path / "repo", allow_below_bar=True)
    assert not (tmp_path / "repo").exists()


def test_a_repository_that_cannot_be_written_is_refused_before_the_work(data_cfg: data.DataConfig,
                                                                        tmp_path: Path) -> None:
    """It failed with an OSError traceback once the ONNX export, the parity checks and the evaluation had run."""
    entry = CATALOG["linear_regression"]
    train_one(entry, data_cfg, epochs=5, runs_dir=tmp_path / "runs", progress=False)
    (tmp_path / "repo").write_text("a file where the repository should be")
    with pytest.raises(ExportError, match=r"cannot write into the repository at .*repo \(not a writable folder\)"):
        export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo", allow_below_bar=True)


def test_a_copy_that_fails_leaves_no_staging_folder(data_cfg: data.DataConfig, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while copying left a hidden ``.1.*.staging`` folder of the partial copy, and a traceback."""
    entry = CATALOG["linear_regression"]
    train_one(entry, data_cfg, epochs=5, runs_dir=tmp_path / "runs", progress=False)

    def disk_full(src, dst, **kwargs):  # the copy's first file fills the disk
        shutil.copy(Path(src) / "model.json", dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", disk_full)
    with pytest.raises(ExportError, match=r"cannot write .*linear_regression/1 \(\[Errno 28\] No space left on "
                                          r"device\); nothing was published"):
        export_one(entry, data_cfg, tmp_path / "runs", tmp_path / "repo", allow_below_bar=True)
    assert list((tmp_path / "repo" / "linear_regression").iterdir()) == []
