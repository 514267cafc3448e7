"""serving.repository: loading, verification, versions, hot reload, unload, defaults, batching through it.

Each test builds its own repository in tmp_path from copies of the shipped exports, then adds, breaks
or removes versions there; exported/ itself is never written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import shutil
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.card import ONNX_FILE, ModelCard, sha256_file
from serving.repository import (
    LOADING,
    READY,
    UNAVAILABLE,
    IndexEntry,
    ModelNotFound,
    ModelNotReady,
    ModelRepository,
    ServingSettings,
    settings_for,
)
from serving.runtime import CPU, OnnxModel, ProviderError

EXPORTED = Path(__file__).resolve().parents[2] / "exported"
WAIT_S = 30.0
CPU_SETTINGS = ServingSettings(device="cpu", max_batch_size=64, max_queue_delay_ms=1, intra_op_threads=1,
                               inline_run_ms=0, poll_interval_s=0)


class Metrics:
    """Records the repository's metrics hooks."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, str, int]] = []
        self.ready: list[tuple[str, str, bool]] = []

    def observe_batch(self, model: str, version: str, size: int, seconds: float, waits: Sequence[float]) -> None:
        self.batches.append((model, version, size))

    def queue_changed(self, model: str, version: str, items: int) -> None:
        pass

    def set_model_ready(self, model: str, version: str, ready: bool | None) -> None:
        self.ready.append((model, version, ready))


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def add_version(repo: Path, name: str, version: str, *, source: str = "diabetes_mlp",
                edit: Callable[[ModelCard], ModelCard] = lambda c: c) -> Path:
    """Copy the newest shipped export of ``source`` to repo/name/version with its card adjusted."""
    src = max((p for p in (EXPORTED / source).glob("[0-9]*") if (p / "model.json").exists()),
              key=lambda p: int(p.name))
    dest = repo / name / version
    dest.mkdir(parents=True)
    shutil.copy2(src / ONNX_FILE, dest / ONNX_FILE)
    card = dataclasses.replace(ModelCard.load(src), name=name, version=version)
    edit(card).save(dest)
    return dest


def features(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"features": np.random.default_rng(seed).uniform(-1, 1, (n, 8)).astype(np.float32)}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    add_version(root, "diabetes_mlp", "1")
    add_version(root, "names_gru", "1", source="names_gru")
    return root


def test_start_loads_verifies_and_serves_every_model(repo: Path) -> None:
    metrics = Metrics()

    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS, metrics=metrics)
        await r.start()
        assert r.index() == [IndexEntry("diabetes_mlp", "1", READY), IndexEntry("names_gru", "1", READY)]
        assert [(m.name, m.version, m.provider, m.ready) for m in r.models()] == [
            ("diabetes_mlp", "1", CPU, True), ("names_gru", "1", CPU, True)]
        served = r.get("diabetes_mlp")
        out = await served.infer(features(5))
        direct = OnnxModel(repo / "diabetes_mlp/1/model.onnx", served.card, "cpu").run(features(5))
        np.testing.assert_array_equal(out["probability"], direct["probability"])
        # a client batch up to the request limit runs as one execution; concurrent requests merge up to 64
        assert (served.batcher.max_batch_size, served.batcher.chunk_size) == (64, CPU_SETTINGS.max_items_per_request)
        big = await served.infer(features(300))
        np.testing.assert_array_equal(big["probability"], OnnxModel(repo / "diabetes_mlp/1/model.onnx", served.card,
                                                                    "cpu").run(features(300))["probability"])
        await r.stop()
        assert r.models() == []
        with pytest.raises(ModelNotReady):
            await served.infer(features(1))

    run(main())
    assert ("diabetes_mlp", "1", True) in metrics.ready and ("diabetes_mlp", "1", False) in metrics.ready


def test_concurrent_requests_are_batched_and_answered_in_order(repo: Path) -> None:
    metrics = Metrics()
    answering: list[str] = []  # the version that served

    async def main() -> None:
        r = ModelRepository(repo, dataclasses.replace(CPU_SETTINGS, max_queue_delay_ms=20), metrics=metrics)
        await r.start()
        served = r.get("diabetes_mlp")
        answering.append(served.version)
        requests = [features(1, seed=i) for i in range(64)]
        results = await asyncio.gather(*(served.infer(x) for x in requests))
        want = served.session.run({"features": np.concatenate([x["features"] for x in requests])})["probability"]
        np.testing.assert_allclose(np.concatenate([o["probability"] for o in results]), want, atol=1e-6)
        await r.stop()

    run(main())
    sizes = [size for model, _, size in metrics.batches if model == "diabetes_mlp"]
    assert max(sizes) > 1 and sum(sizes) == 64
    assert {version for model, version, _ in metrics.batches if model == "diabetes_mlp"} == set(answering)


def test_newest_valid_version_serves_and_old_versions_stay_servable(repo: Path) -> None:
    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        add_version(repo, "diabetes_mlp", "2")
        await r.load("diabetes_mlp")
        assert r.get("diabetes_mlp").version == "2"
        assert r.get("diabetes_mlp", "1").version == "1"
        with pytest.raises(ModelNotFound, match="no version '7'"):
            r.get("diabetes_mlp", "7")
        await r.stop()

    run(main())


def corrupt_bytes(dest: Path) -> None:
    """Flip the model file's bytes: the card's sha256 no longer matches."""
    path = dest / ONNX_FILE
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))


def garbage_with_matching_hash(dest: Path) -> None:
    """A model file that is not ONNX, with a card that vouches for it: loading must still fail safely."""
    (dest / ONNX_FILE).write_bytes(b"not an onnx model")
    card = ModelCard.load(dest)
    files = {**card.files, ONNX_FILE: {"sha256": sha256_file(dest / ONNX_FILE), "bytes": 17}}
    dataclasses.replace(card, files=files).save(dest)


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (corrupt_bytes, "sha256 .* does not match the card"),
        (garbage_with_matching_hash, "(?i)protobuf|onnx|load"),
        (lambda dest: (dest / ONNX_FILE).unlink(), "cannot read"),
        (lambda dest: (dest / "model.json").write_text("{"), "cannot read"),
    ],
    ids=["sha-mismatch", "not-onnx", "no-model-file", "bad-card"],
)
def test_a_broken_new_version_is_rejected_and_the_old_one_keeps_serving(
    repo: Path, breakage: Callable[[Path], None], reason: str
) -> None:
    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        breakage(add_version(repo, "diabetes_mlp", "2"))
        await r.load("diabetes_mlp")  # one version still loads: no error
        assert r.get("diabetes_mlp").version == "1"
        (entry,) = [e for e in r.index() if e.version == "2"]
        assert entry.state == UNAVAILABLE
        assert re.search(reason, entry.reason), entry.reason
        with pytest.raises(ModelNotReady, match="diabetes_mlp/2 is unavailable"):
            r.get("diabetes_mlp", "2")
        np.testing.assert_equal((await r.get("diabetes_mlp").infer(features(2)))["probability"].shape, (2, 1))
        await r.stop()

    run(main())


def test_the_ready_series_follows_the_versions(repo: Path) -> None:
    """1 while a version serves, 0 for one that failed to load (a failed deploy shows), and no series once its
    directory is gone: left at 0, every retired version alerted on model_ready == 0 for good."""
    async def main() -> None:
        metrics = Metrics()
        r = ModelRepository(repo, CPU_SETTINGS, metrics=metrics)
        await r.start()
        corrupt_bytes(add_version(repo, "diabetes_mlp", "2"))
        add_version(repo, "diabetes_mlp", "3")
        await r.load("diabetes_mlp")
        shutil.rmtree(repo / "diabetes_mlp" / "1")
        shutil.rmtree(repo / "diabetes_mlp" / "2")
        await r._scan_all()
        events = [(v, ready) for m, v, ready in metrics.ready if m == "diabetes_mlp"]
        assert sorted(events[:3]) == [("1", True), ("2", False), ("3", True)]  # versions load in listing order
        assert sorted(events[3:], key=str) == [("1", False), ("1", None), ("2", None)]
        await r.stop()

    run(main())


def test_latest_versions_serves_the_newest_that_load(repo: Path) -> None:
    """Triton's version policy ``latest N``, except that a broken newer version does not push out an older one
    that serves; a version left out is in the index with the reason, has no ready series, and comes back when
    the versions ahead of it go."""
    async def main() -> None:
        add_version(repo, "diabetes_mlp", "2")
        metrics = Metrics()
        r = ModelRepository(repo, dataclasses.replace(CPU_SETTINGS, latest_versions=1), metrics=metrics)
        await r.start()
        assert [m.version for m in r.models() if m.name == "diabetes_mlp"] == ["2"]
        with pytest.raises(ModelNotReady, match=r"diabetes_mlp/1 is unavailable: .*--latest-versions 1"):
            r.get("diabetes_mlp", "1")
        assert ("diabetes_mlp", "1", True) not in metrics.ready

        corrupt_bytes(add_version(repo, "diabetes_mlp", "3"))
        await r.load("diabetes_mlp")
        assert r.get("diabetes_mlp").version == "2"
        add_version(repo, "diabetes_mlp", "4")
        await r.load("diabetes_mlp")
        states = {e.version: e.state for e in r.index() if e.name == "diabetes_mlp"}
        assert states == {"1": UNAVAILABLE, "2": UNAVAILABLE, "3": UNAVAILABLE, "4": READY}
        assert metrics.ready[-2:] == [("diabetes_mlp", "2", False), ("diabetes_mlp", "2", None)]

        shutil.rmtree(repo / "diabetes_mlp" / "4")
        await r.load("diabetes_mlp")
        assert r.get("diabetes_mlp").version == "2"
        np.testing.assert_equal((await r.get("diabetes_mlp").infer(features(2)))["probability"].shape, (2, 1))
        await r.stop()

    run(main())


def test_a_rollback_under_latest_versions_never_leaves_the_model_without_a_version(repo: Path) -> None:
    """Deleting the newest folder with --latest-versions 1: the removed version serves until the older one is
    loaded again (it was retired first, and calls were refused while the older one loaded)."""
    async def main() -> list[str]:
        add_version(repo, "diabetes_mlp", "2")
        r = ModelRepository(repo, dataclasses.replace(CPU_SETTINGS, latest_versions=1))
        await r.start()
        shutil.rmtree(repo / "diabetes_mlp" / "2")
        scan = asyncio.ensure_future(r._scan_all())
        seen = []
        while not scan.done():  # every turn of the loop the scan gives up while the old version loads
            try:
                seen.append(r.get("diabetes_mlp").version)
            except ModelNotReady as e:
                seen.append(f"refused: {e}")
            await asyncio.sleep(0)
        await scan
        seen.append(r.get("diabetes_mlp").version)
        await r.stop()
        return seen

    seen = run(main())
    assert set(seen) == {"2", "1"} and seen[-1] == "1", seen


def test_a_model_with_no_loadable_version_is_not_ready(tmp_path: Path) -> None:
    async def main() -> None:
        root = tmp_path / "repo"
        corrupt_bytes(add_version(root, "diabetes_mlp", "1"))
        r = ModelRepository(root, CPU_SETTINGS)
        await r.start()
        with pytest.raises(ModelNotReady, match="no ready version: version 1: .*sha256"):
            r.get("diabetes_mlp")
        with pytest.raises(ModelNotReady, match="no loadable version"):
            await r.load("diabetes_mlp")
        await r.stop()

    run(main())


def test_card_of_another_model_is_rejected(tmp_path: Path) -> None:
    async def main() -> None:
        root = tmp_path / "repo"
        dest = add_version(root, "diabetes_mlp", "1")
        shutil.copytree(dest, root / "impostor" / "1")
        r = ModelRepository(root, CPU_SETTINGS)
        await r.start()
        (entry,) = [e for e in r.index() if e.name == "impostor"]
        assert entry.state == UNAVAILABLE and "describes diabetes_mlp/1, not impostor/1" in entry.reason
        await r.stop()

    run(main())


def test_polling_picks_up_new_versions_and_retires_removed_ones(repo: Path) -> None:
    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def main() -> None:
        r = ModelRepository(repo, dataclasses.replace(CPU_SETTINGS, poll_interval_s=0.02))
        await r.start()
        (repo / "diabetes_mlp" / ".2.staging").mkdir()  # an export in progress is not a version
        add_version(repo, "diabetes_mlp", "2")
        await until(lambda: r.get("diabetes_mlp").version == "2")
        old = r.get("diabetes_mlp", "1")
        shutil.rmtree(repo / "diabetes_mlp" / "1")
        await until(lambda: not old.ready)
        with pytest.raises(ModelNotFound):
            r.get("diabetes_mlp", "1")
        add_version(repo, "hello_rnn", "1", source="hello_rnn")  # a new model appears too
        await until(lambda: any(m.name == "hello_rnn" for m in r.models()))
        assert [e.version for e in r.index() if e.name == "diabetes_mlp"] == ["2"]
        await r.stop()

    run(main())


def test_a_model_whose_folder_goes_is_a_warning(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its calls then fail NOT_FOUND, counted under model="" as clients' typos are, and the log said it at INFO
    only. An older version's folder going while a newer one serves is routine (INFO)."""
    add_version(repo, "diabetes_mlp", "2")

    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        with caplog.at_level(logging.INFO, logger="coursezoo.repository"):
            shutil.rmtree(repo / "diabetes_mlp" / "1")
            await r._scan_all()
            assert [r.levelname for r in caplog.records] == ["INFO"]
            shutil.rmtree(repo / "diabetes_mlp")
            await r._scan_all()
        await r.stop()

    run(main())
    assert [(r.levelname, r.getMessage()) for r in caplog.records][1:] == [
        ("INFO", "retired diabetes_mlp/2: its directory is gone"),
        ("WARNING", "model diabetes_mlp has no version serving any more (the directories of versions 2 are gone)")]


def test_a_listing_that_fails_changes_nothing(tmp_path: Path, repo: Path) -> None:
    """A repository (or model directory) that is there but cannot be listed (out of file descriptors, an NFS
    hiccup; here a symbolic link loop, ELOOP) keeps every model serving: it read as empty, and the next poll
    retired every model. Only a directory that is gone retires what it held."""
    root, model_link = tmp_path / "root", repo / "linked"
    root.symlink_to(repo)

    def loop(link: Path) -> None:  # the path now fails to list, with an OSError other than "not found"
        link.unlink()
        link.symlink_to(link)

    async def polls(r: ModelRepository) -> None:
        for _ in range(5):
            await r._scan_all()

    async def main() -> None:
        add_version(tmp_path / "elsewhere", "linked", "1")
        model_link.symlink_to(tmp_path / "elsewhere" / "linked")
        r = ModelRepository(root, CPU_SETTINGS)
        await r.start()
        assert {m.name for m in r.models()} == {"diabetes_mlp", "names_gru", "linked"}
        loop(root)
        await polls(r)
        loop(model_link)
        root.unlink()
        root.symlink_to(repo)
        await polls(r)
        assert {m.name for m in r.models()} == {"diabetes_mlp", "names_gru", "linked"}
        assert (await r.get("diabetes_mlp").infer(features(1)))["probability"].shape == (1, 1)
        shutil.rmtree(repo / "diabetes_mlp")  # gone: retired
        await polls(r)
        assert {m.name for m in r.models()} == {"names_gru", "linked"}
        await r.stop()

    run(main())


def test_unload_takes_a_model_out_until_it_is_loaded_again(repo: Path) -> None:
    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        served = r.get("diabetes_mlp")
        await r.unload("diabetes_mlp")
        with pytest.raises(ModelNotReady, match="unloaded"):
            r.get("diabetes_mlp")
        with pytest.raises(ModelNotReady):
            await served.infer(features(1))
        assert IndexEntry("diabetes_mlp", "1", UNAVAILABLE, "unloaded") in r.index()  # with the versions it had
        assert [m.name for m in r.models()] == ["names_gru"]
        await r.load("diabetes_mlp")
        assert (await r.get("diabetes_mlp").infer(features(1)))["probability"].shape == (1, 1)
        await r.unload("no_such_model")  # nothing to unload: done, as Triton answers it
        assert not r.knows("no_such_model")
        await r.unload("names_gru")
        shutil.rmtree(repo / "names_gru")  # unloaded, then its folder went: forgotten as any gone model
        await r._scan_all()
        assert not r.knows("names_gru") and all(e.name != "names_gru" for e in r.index())
        with pytest.raises(ModelNotFound):
            await r.load("no_such_model")
        await r.stop()

    run(main())


def test_the_listing_shows_models_on_disk_not_loaded_yet(repo: Path) -> None:
    """Without polling a new model folder is not loaded, but a client finds it in the index, then loads it; one
    unloaded before it was ever scanned stays out."""
    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        add_version(repo, "diabetes_new", "1")
        add_version(repo, "diabetes_kept_out", "1")
        await r.unload("diabetes_kept_out")
        rows = {(e.name, e.version): (e.state, e.reason) for e in await r.listing()}
        assert rows[("diabetes_new", "")] == (UNAVAILABLE, "not loaded: RepositoryModelLoad loads it")
        assert rows[("diabetes_kept_out", "")] == (UNAVAILABLE, "unloaded")
        await r._scan_all()
        assert r.get("diabetes_new").version == "1"  # a scan loads the new one
        with pytest.raises(ModelNotReady, match="unloaded"):
            r.get("diabetes_kept_out")
        await r.stop()

    run(main())


def test_load_unload_load_ends_loaded_whatever_their_overlap(repo: Path) -> None:
    """Each call is answered as of its own turn at the repository: three calls in quick succession (a
    deployment script, two operators) all succeed and leave the state of the last, loaded and serving."""
    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        calls = [r.load, r.unload, r.load]
        tasks = []
        for call in calls:
            tasks.append(asyncio.create_task(call("diabetes_mlp")))
            await asyncio.sleep(0)  # each call under way before the next
        assert await asyncio.gather(*tasks, return_exceptions=True) == [None, None, None]
        assert (await r.get("diabetes_mlp").infer(features(1)))["probability"].shape == (1, 1)
        assert all(e.state == READY for e in r.index() if e.name == "diabetes_mlp")
        await r.stop()

    run(main())


def test_a_cancelled_load_still_loads_the_model(repo: Path) -> None:
    """A RepositoryModelLoad whose client gives up (deadline, disconnect) half way through the load: the
    load finishes anyway, rather than leaving the version LOADING with nothing to retry it."""
    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        await r.unload("names_gru")
        call = asyncio.create_task(r.load("names_gru"))
        while IndexEntry("names_gru", "1", LOADING, "") not in r.index():
            await asyncio.sleep(0.001)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await r.load("names_gru")
        assert IndexEntry("names_gru", "1", READY, "") in r.index()
        assert r.get("names_gru").version == "1"
        await r.stop()

    run(main())


def test_a_cancelled_unload_still_answers_the_queued_requests(repo: Path) -> None:
    """A RepositoryModelUnload whose client gives up while the model has requests queued: the unload runs to its
    end and every queued request is answered; it cancelled them, their callers still waiting ("Stream removed"
    for unary calls, a stream with no end). Two guards, either enough here: the unload runs as a task of its own,
    and the batcher's close never cancels its worker (tests/serving/test_batching.py)."""
    add_version(repo, "mnist_inception", "1", source="mnist_inception")  # ~0.1 s per batch of 512 here

    async def main() -> None:
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        model = r.get("mnist_inception")
        images = {"image": np.zeros((512, 1, 28, 28), np.float32)}
        calls = [asyncio.create_task(model.infer(images)) for _ in range(6)]
        while model.batcher.queue_depth == 0:
            await asyncio.sleep(0.001)
        unload = asyncio.create_task(r.unload("mnist_inception"))
        await asyncio.sleep(0.01)
        unload.cancel()
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(a).__name__ for a in answers] == ["dict"] * 6
        assert all(a["logits"].shape == (512, 10) for a in answers)
        with pytest.raises(ModelNotReady, match="is unloaded"):
            r.get("mnist_inception")
        await r.stop()

    run(main())


@pytest.mark.parametrize("name", ["", ".", "..", "../exported", "a/b", "/etc", "x..y", "name with space", "é"])
def test_bad_model_names_are_not_found_without_touching_the_file_system(name: str, tmp_path: Path) -> None:
    async def main() -> None:
        r = ModelRepository(tmp_path / "does-not-exist", CPU_SETTINGS)  # any file access would fail differently
        with pytest.raises(ModelNotFound, match="invalid model name"):
            r.get(name)
        with pytest.raises(ModelNotFound, match="invalid model name"):
            await r.load(name)
        with pytest.raises(ModelNotFound, match="invalid model name"):
            await r.unload(name)

    run(main())


def test_default_model_is_the_most_accurate_ready_one_of_its_task(repo: Path) -> None:
    def accuracy(value: float) -> Callable[[ModelCard], ModelCard]:
        return lambda c: dataclasses.replace(c, metrics={**c.metrics, "accuracy": value})

    async def main() -> None:
        add_version(repo, "diabetes_better", "1", edit=accuracy(0.99))
        corrupt_bytes(add_version(repo, "diabetes_broken", "1", edit=accuracy(1.0)))
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        assert r.default_model("diabetes") == "diabetes_better"
        assert r.default_model("names") == "names_gru"
        with pytest.raises(ModelNotFound, match="no ready digits model"):
            r.default_model("digits")
        await r.unload("diabetes_better")
        assert r.default_model("diabetes") == "diabetes_mlp"
        await r.stop()

    run(main())


def test_a_version_below_its_bar_serves_with_a_warning(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``export --allow-below-bar`` publishes one on purpose; the operator still hears of it when it loads."""
    async def main() -> None:
        add_version(repo, "diabetes_mlp", "2", edit=lambda c: dataclasses.replace(
            c, metrics={**c.metrics, "meets_bar": False, "verdict": "accuracy 0.5000 (bar 0.750)"}))
        r = ModelRepository(repo, CPU_SETTINGS)
        with caplog.at_level("WARNING", logger="coursezoo.repository"):
            await r.start()
        assert r.get("diabetes_mlp").version == "2"
        (warning,) = [m for m in caplog.messages if "quality bar" in m]
        assert warning == "diabetes_mlp/2 misses its quality bar (accuracy 0.5000 (bar 0.750)) and serves: " \
            "exported with --allow-below-bar"
        await r.stop()

    run(main())


class CountingExecutor(ThreadPoolExecutor):
    """A thread pool that counts what it is given."""

    submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_model_runs_go_to_the_executor_given(repo: Path) -> None:
    """The server gives model runs threads of their own: on the loop's default pool, requests decoding large
    images in threads held every thread, and another caller's 19 ms run waited 1.3 s for one."""
    async def main() -> None:
        runs = CountingExecutor(2)
        r = ModelRepository(repo, dataclasses.replace(CPU_SETTINGS, inline_run_ms=0), executor=runs)
        await r.start()
        await r.get("diabetes_mlp").infer(features(3))
        assert runs.submitted == 1
        await r.stop()
        runs.shutdown()

    run(main())


def test_card_serving_hints_override_the_settings(repo: Path) -> None:
    async def main() -> None:
        add_version(repo, "diabetes_mlp", "2", edit=lambda c: dataclasses.replace(c, serving={"max_batch_size": 4}))
        add_version(repo, "diabetes_mlp", "3", edit=lambda c: dataclasses.replace(c, serving={"batch": 4}))
        add_version(repo, "diabetes_mlp", "4",
                    edit=lambda c: dataclasses.replace(c, serving={"adaptive_queue_delay": False}))
        add_version(repo, "diabetes_mlp", "5",  # a string: bool() would have taken "false" for true
                    edit=lambda c: dataclasses.replace(c, serving={"adaptive_queue_delay": "false"}))
        add_version(repo, "diabetes_mlp", "6",  # a queue of none: every request was refused
                    edit=lambda c: dataclasses.replace(c, serving={"max_queue_items": 0}))
        add_version(repo, "diabetes_mlp", "7",  # NaN is never below a least value
                    edit=lambda c: dataclasses.replace(c, serving={"max_queue_delay_ms": float("nan")}))
        add_version(repo, "diabetes_mlp", "8", edit=lambda c: dataclasses.replace(c, serving={"device": "gpu"}))
        r = ModelRepository(repo, CPU_SETTINGS)
        await r.start()
        assert r.get("diabetes_mlp", "2").settings.max_batch_size == 4
        assert r.get("diabetes_mlp", "1").settings.max_batch_size == CPU_SETTINGS.max_batch_size
        assert r.get("diabetes_mlp", "1").batcher.adaptive and not r.get("diabetes_mlp", "4").batcher.adaptive
        reasons = {e.version: e.reason for e in r.index() if e.state == UNAVAILABLE}
        assert "unknown serving keys ['batch']" in reasons["3"]
        assert "bad serving value: 'false' is not true or false" in reasons["5"]
        assert "bad serving value: max_queue_items 0: expected a number of at least 1" in reasons["6"]
        assert "bad serving value: max_queue_delay_ms nan: expected a number of at least 0" in reasons["7"]
        assert "bad serving value: device 'gpu': expected one of auto, cpu" in reasons["8"]
        await r.stop()

    run(main())


def test_a_card_that_says_cpu_runs_on_the_cpu_on_a_gpu_server() -> None:
    """``serving.device`` "cpu" is Triton's KIND_CPU: the model runs on the CPU whatever the server's --device (a
    model too small for a GPU to pay); "auto", or no word, follows the server."""
    card = ModelCard.load(max((EXPORTED / "diabetes_mlp").glob("[0-9]*")))
    for server in ("auto", "cuda"):
        settings = dataclasses.replace(CPU_SETTINGS, device=server)
        assert settings_for(settings, dataclasses.replace(card, serving={"device": "cpu"})).device == "cpu"
        assert settings_for(settings, dataclasses.replace(card, serving={"device": "auto"})).device == server
        assert settings_for(settings, card).device == server


def test_cuda_device_without_cuda_fails_start_loudly(repo: Path) -> None:
    async def main() -> None:
        r = ModelRepository(repo, dataclasses.replace(CPU_SETTINGS, device="cuda"))
        try:
            await r.start()
        except ProviderError:
            return
        assert all(m.provider == "CUDAExecutionProvider" for m in r.models())
        await r.stop()

    run(main())
