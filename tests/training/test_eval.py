"""The shipped exports reach their bars on the real held-out data and match their cards."""

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.card import CardError
from tests.conftest import edit_card
from training import data
from training.catalog import CATALOG
from training.evaluate import evaluate_export, get_args_parser, latest_version, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(CATALOG))
def test_shipped_export_meets_its_bar(name: str, data_cfg: data.DataConfig) -> None:
    result = evaluate_export(CATALOG[name], latest_version(REPO / "exported", name), data_cfg)
    assert result["meets_bar"], result["verdict"]
    assert result["matches_card"], f"fresh evaluation differs from the card by {result['card_delta']:.4f}"


def _edited_copy(tmp_path: Path, name: str, edit: Callable[[dict], None]) -> Path:
    """The newest shipped version of ``name`` under ``tmp_path``, its card edited (the files stay as shipped)."""
    version = latest_version(REPO / "exported", name)
    copy = shutil.copytree(version, tmp_path / name / version.name)
    edit_card(copy, edit)
    return copy


@pytest.mark.parametrize(("edit", "fields"), [
    (lambda card: card["labels"].reverse(), ["labels"]),  # every answer named wrong; accuracy (by index) unchanged
    (lambda card: card["preprocessing"].update(feature_range=[0, 1]), ["preprocessing"]),
    (lambda card: card["metrics"]["bar"].update(accuracy=0.5), ["bar"]),
    (lambda card: card["preprocessing"].update(note="reworded"), []),  # prose, not a setting
])
def test_eval_compares_the_card_with_the_catalogue(tmp_path: Path, data_cfg: data.DataConfig,
                                                    edit: Callable[[dict], None], fields: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    copy = _edited_copy(tmp_path, "diabetes_mlp", edit)
    result = evaluate_export(CATALOG["diabetes_mlp"], copy, data_cfg)
    assert result["meets_bar"] and result["matches_card"] and result["differs_from_catalogue"] == fields
    args = get_args_parser().parse_args(["diabetes_mlp", "--repo", str(tmp_path), "--data-root", str(data_cfg.root)]
                                        + (["--data-mirror", str(data_cfg.mirror)] if data_cfg.mirror else []))
    assert main(args) == (1 if fields else 0)
    assert (f"(card and catalogue differ: {', '.join(fields)})" in capsys.readouterr().out) == bool(fields)


def test_eval_reports_a_card_without_its_metric(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    copy = _edited_copy(tmp_path, "diabetes_mlp", lambda card: card["metrics"].pop("accuracy"))
    with pytest.raises(CardError, match="its metrics lack accuracy"):
        evaluate_export(CATALOG["diabetes_mlp"], copy, data_cfg)


def test_eval_of_a_repository_that_is_not_there_says_so_once(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """It printed one "no exported versions" [ERR] per model, never that the folder was missing."""
    args = get_args_parser().parse_args(["--repo", str(tmp_path / "nope")])
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err == f"coursezoo eval: the model repository {tmp_path / 'nope'} is not a directory (--repo)\n"
    assert captured.out == ""


def test_a_card_of_another_model_is_refused_before_it_runs(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    """hello_embedding's folder copied as hello_rnn/7 passed as "[ok] hello_rnn v1": the hello models share one
    contract and bar, and eval printed the card's version, not the folder's. The server refuses such a card."""
    shutil.copytree(latest_version(REPO / "exported", "hello_embedding"), tmp_path / "hello_rnn" / "7")
    with pytest.raises(CardError, match=r"describes hello_embedding/1, not hello_rnn/7"):
        evaluate_export(CATALOG["hello_rnn"], tmp_path / "hello_rnn" / "7", data_cfg)


def _eval_args(tmp_path: Path, data_cfg: data.DataConfig, root: Path | None = None) -> list[str]:
    return ["--repo", str(tmp_path), "--data-root", str(root or data_cfg.root),
            *(["--data-mirror", str(data_cfg.mirror)] if data_cfg.mirror and root is None else [])]


def test_one_broken_version_does_not_stop_the_others(tmp_path: Path, data_cfg: data.DataConfig,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An ONNX file ORT cannot read (its card's sha256 updated to match) was a traceback, the models after it never
    evaluated and ``--json`` never written; the JSON also left out the [ERR] rows."""
    broken = _edited_copy(tmp_path, "linear_regression", lambda card: None)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    edit_card(broken, lambda card: card["files"]["model.onnx"].update(sha256=hashlib.sha256(b"not an onnx file")
                                                                      .hexdigest()))
    shutil.copytree(latest_version(REPO / "exported", "hello_rnn"), tmp_path / "hello_rnn" / "1")
    report = tmp_path / "eval.json"
    args = get_args_parser().parse_args(["linear_regression", "hello_rnn", *_eval_args(tmp_path, data_cfg),
                                         "--json", str(report)])
    assert main(args) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[ERR] linear_regression: InvalidProtobuf: ") and out[1].startswith("[ok ] hello_rnn v1")
    rows = json.loads(report.read_text())
    assert [r["name"] for r in rows] == ["linear_regression", "hello_rnn"] and "InvalidProtobuf" in rows[0]["error"]


def test_a_card_metric_that_is_not_a_number_is_a_card_error(tmp_path: Path, data_cfg: data.DataConfig) -> None:
    """``"accuracy": "0.99"`` was a TypeError traceback."""
    copy = _edited_copy(tmp_path, "diabetes_mlp", lambda card: card["metrics"].update(accuracy="0.99"))
    with pytest.raises(CardError, match=r"its metrics.accuracy is '0.99', expected a number"):
        evaluate_export(CATALOG["diabetes_mlp"], copy, data_cfg)


def test_data_other_than_the_cards_is_named_not_blamed_on_the_model(tmp_path: Path, data_cfg: data.DataConfig,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Measured on other data, the model was reported as differing from its card, the data never named."""
    _edited_copy(tmp_path / "repo", "diabetes_mlp", lambda card: None)
    root = tmp_path / "data"
    (root / "diabetes").mkdir(parents=True)
    rows = gzip.decompress((data_cfg.root / "diabetes" / "diabetes.csv.gz").read_bytes()).splitlines(keepends=True)
    (root / "diabetes" / "diabetes.csv.gz").write_bytes(gzip.compress(b"".join(rows[:-8])))  # eight rows less
    args = get_args_parser().parse_args(["diabetes_mlp", *_eval_args(tmp_path / "repo", data_cfg, root)])
    assert main(args) == 1
    assert f"(measured on other data than the card's: diabetes/diabetes.csv.gz under {root})" in capsys.readouterr().out
