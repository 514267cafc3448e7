"""``serving.services.base.Handler.infer``: a version retired after a call chose it, on a real repository.

A call picks its model version, then may wait (its images decoding, room in a stream's queue) before it
reaches the version's batcher; a swap in that window retires the version it chose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.metrics import Metrics
from serving.repository import ModelNotReady, ModelRepository
from serving.services.base import Handler
from tests.serving.test_repository import CPU_SETTINGS, add_version, features

WAIT_S = 30.0


def test_an_unpinned_call_whose_version_was_retired_is_answered_by_the_one_serving_now(tmp_path: Path) -> None:
    async def main() -> None:
        repo = ModelRepository(tmp_path, CPU_SETTINGS)
        add_version(tmp_path, "diabetes_mlp", "1")
        await repo.start()
        handler = Handler(repo, Metrics(), SimpleNamespace(max_items_per_request=1024))
        chosen = repo.get("diabetes_mlp")
        add_version(tmp_path, "diabetes_mlp", "2")  # a new version swapped in, the old one's folder removed,
        shutil.rmtree(tmp_path / "diabetes_mlp" / "1")  # while the call waited (decoding its images, say)
        await repo._scan_all()
        assert not chosen.ready
        answered, outputs = await handler.infer(chosen, features(3), pinned=False)
        assert answered.version == "2" and outputs["probability"].shape == (3, 1)
        with pytest.raises(ModelNotReady, match="diabetes_mlp/1 is no longer served"):  # asked for version 1
            await handler.infer(chosen, features(3), pinned=True)
        await repo.stop()

    asyncio.run(asyncio.wait_for(main(), WAIT_S))


def test_a_version_that_takes_other_inputs_is_not_asked_instead(tmp_path: Path) -> None:
    """The inputs were made for the chosen version's card: another preprocessing would misread them."""
    async def main() -> None:
        repo = ModelRepository(tmp_path, CPU_SETTINGS)
        add_version(tmp_path, "diabetes_mlp", "1")
        await repo.start()
        handler = Handler(repo, Metrics(), SimpleNamespace(max_items_per_request=1024))
        chosen = repo.get("diabetes_mlp")
        add_version(tmp_path, "diabetes_mlp", "2", edit=lambda card: dataclasses.replace(
            card, preprocessing={**card.preprocessing, "feature_range": [0.0, 1.0]}))
        shutil.rmtree(tmp_path / "diabetes_mlp" / "1")
        await repo._scan_all()
        with pytest.raises(ModelNotReady):
            await handler.infer(chosen, features(3), pinned=False)
        await repo.stop()

    asyncio.run(asyncio.wait_for(main(), WAIT_S))
