"""The shipped exports reach their bars on the real held-out data and match their cards."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.card import CardError
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
    card = json.loads((copy / "model.json").read_text())
    edit(card)
    (copy / "model.json").write_text(json.dumps(card))
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
