"""Training tests run on the real data sets, read from the mirror (COURSEZOO_DATA_MIRROR)."""

from pathlib import Path

import pytest

from training.data import DataConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def data_cfg() -> DataConfig:
    cfg = DataConfig.from_env(mirror=None)
    if cfg.mirror is None:
        default = REPO.parent / "shared" / "data"
        cfg.mirror = default if default.exists() else None
    if not cfg.root.is_absolute():
        cfg.root = REPO / cfg.root
    return cfg
