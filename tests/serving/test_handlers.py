"""``serving.services.base.Handler.infer``: a version retired after a call chose it, on a real repository.

A call picks its model version, then may wait (its images decoding, room in a stream's queue) before it
reaches the version's batcher; a swap in that window retires the version it chose.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.card import ModelCard
from serving.metrics import Metrics
from serving.repository import ModelNotReady, ModelRepository, ServedModel
from serving.services.base import Handler, InternalErrors
from tests.serving.test_repository import CPU_SETTINGS, add_version, features, run


async def swapped(directory: Path, edit: Callable[[ModelCard], ModelCard] = lambda card: card) -> \
        tuple[ModelRepository, Handler, ServedModel]:
    """A repository serving diabetes_mlp/1, the handler, and version 1 as a call chose it; then version 2 (its
    card through ``edit``) swapped in and version 1's folder removed, while the call waited (decoding its
    images, say)."""
    repo = ModelRepository(directory, CPU_SETTINGS)
    add_version(directory, "diabetes_mlp", "1")
    await repo.start()
    handler = Handler(repo, Metrics(), SimpleNamespace(max_items_per_request=1024))
    chosen = repo.get("diabetes_mlp")
    add_version(directory, "diabetes_mlp", "2", edit=edit)
    shutil.rmtree(directory / "diabetes_mlp" / "1")
    await repo._scan_all()
    return repo, handler, chosen


def test_an_unpinned_call_whose_version_was_retired_is_answered_by_the_one_serving_now(tmp_path: Path) -> None:
    async def main() -> None:
        repo, handler, chosen = await swapped(tmp_path)
        assert not chosen.ready
        answered, outputs = await handler.infer(chosen, features(3), pinned=False)
        assert answered.version == "2" and outputs["probability"].shape == (3, 1)
        with pytest.raises(ModelNotReady, match="diabetes_mlp/1 is no longer served"):  # asked for version 1
            await handler.infer(chosen, features(3), pinned=True)
        await repo.stop()

    run(main())


def test_a_version_that_takes_other_inputs_is_not_asked_instead(tmp_path: Path) -> None:
    """The inputs were made for the chosen version's card: another preprocessing would misread them."""
    async def main() -> None:
        repo, handler, chosen = await swapped(tmp_path, lambda card: dataclasses.replace(
            card, preprocessing={**card.preprocessing, "feature_range": [0.0, 1.0]}))
        with pytest.raises(ModelNotReady):
            await handler.infer(chosen, features(3), pinned=False)
        await repo.stop()

    run(main())


def test_internal_errors_log_one_traceback_per_kind_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    """A broken version failed 258 calls with 258 tracebacks (687 KB in 0.3 s): one per kind (RPC, model,
    exception type) a minute now, and the next line says how many were not logged."""
    now = [0.0]
    errors = InternalErrors(every_s=60.0, clock=lambda: now[0])
    kind = {"rpc": "ModelInfer", "model": "mnist_cnn", "version": "4", "peer": "ipv4:127.0.0.1:5000"}
    with caplog.at_level(logging.ERROR, logger="coursezoo.serve"):
        for _ in range(258):
            errors.log(ValueError("reshape"), **kind)
        errors.log(KeyError("x"), **kind)  # another kind: logged at once
        now[0] = 61.0
        errors.log(ValueError("reshape"), **kind)
    logged = [(r.exc_info[0].__name__, r.unlogged_since_last, r.version, r.peer) for r in caplog.records]
    assert logged == [("ValueError", 0, "4", "ipv4:127.0.0.1:5000"), ("KeyError", 0, "4", "ipv4:127.0.0.1:5000"),
                      ("ValueError", 257, "4", "ipv4:127.0.0.1:5000")]
