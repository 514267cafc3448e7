"""The shipped exports reach their bars on the real held-out data and match their cards."""

from pathlib import Path

import pytest

from training import data
from training.catalog import CATALOG
from training.evaluate import evaluate_export, latest_version

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(CATALOG))
def test_shipped_export_meets_its_bar(name: str, data_cfg: data.DataConfig) -> None:
    result = evaluate_export(CATALOG[name], latest_version(REPO / "exported", name), data_cfg)
    assert result["meets_bar"], result["verdict"]
    assert result["matches_card"], f"fresh evaluation differs from the card by {result['card_delta']:.4f}"
