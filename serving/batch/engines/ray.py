"""The Ray engine: ``coursezoo batch --engine ray`` runs the local engine's steps as a Ray Data pipeline.

One machine decodes a few thousand images a second; a bucket of millions wants a cluster, and Ray is
one people already operate. The steps are the local engine's own, so both engines answer identically:

    items -> blocks of ``--batch-size`` pickled Items (the driver lists the inputs, as for the local engine)
          -> map_batches(prepare)   Ray tasks on any CPU: the batch ``Preparer`` (serving.preprocess)
          -> map_batches(Predictor) an actor pool of ``--concurrency`` actors, each a ``LocalEngine``
                                    (serving.runtime + serving.postprocess; CUDA with --num-gpus-per-worker)
          -> the driver writes each batch of rows in input order (Ray Data's ``preserve_order``)

Rows carry their input's position, so the driver can check that every input came back exactly once
(Ray retries failed tasks; a retried block must not become two rows). The model's bytes travel through
Ray's object store, so workers on other machines need no copy of ``--repo``, only coursezoo itself. Inputs
given as ``s3://``/``gs://`` URIs are read by the tasks themselves, through the driver's pyarrow file systems
(their endpoint and options; credentials come from each worker's own environment).
"""

from __future__ import annotations

import itertools
import logging
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyarrow import fs as pafs

from serving.batch import sources
from serving.batch.engines import EngineError
from serving.batch.engines.local import LocalEngine
from serving.batch.engines.models import find_model
from serving.batch.pipeline import Outcome, _classify
from serving.batch.prepare import PreparedBatch, Preparer
from serving.batch.types import Item
from serving.card import ONNX_FILE, CardError, ModelCard

try:
    import ray
    import ray.data
    from ray.exceptions import RayError
except ImportError as e:  # the extra is optional: the server image and most users never need it
    raise EngineError("--engine ray needs Ray: pip install 'coursezoo[ray]'") from e

log = logging.getLogger(__name__)

#: columns of the pipeline's rows: input position, pickled Item, pickled model input, pickled outcome
INDEX, ITEM, INPUT, OUTCOME = "index", "item", "input", "outcome"


class RayEngine:
    """One model version of ``--repo``, run by an actor pool of a Ray cluster (a local one by default)."""

    def __init__(self, card: ModelCard, model: bytes, *, address: str | None, num_gpus: float, concurrency: int,
                 device: str, top_k: int, max_image_pixels: int, threads: int | None) -> None:
        self.kind = card.task
        self.labels = card.labels
        self.preparer = Preparer(card.task, card.preprocessing, max_image_pixels)
        self.concurrency, self.num_gpus = concurrency, num_gpus
        device = device if device != "auto" else "cuda" if num_gpus else "cpu"  # GPU actors have a GPU, others not
        self._started = not ray.is_initialized()  # a caller's (a test's) Ray instance is left running
        if self._started:
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise EngineError(f"cannot start or reach Ray at {address or 'a new local instance'}: {e}") from e
        try:
            self._check_resources()
        except EngineError:
            self.close()
            raise
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI shows its own progress
        context.execution_options.preserve_order = True  # rows in input order, as the local engine writes them
        # An actor holds one CPU, so ONNX Runtime gets one thread unless --threads says otherwise.
        self._predictor_args = {"card": card, "model": ray.put(model), "device": device, "top_k": top_k,
                                "max_image_pixels": max_image_pixels, "threads": threads or 1}
        gpus = f", {num_gpus:g} GPU each" if num_gpus else ""
        self.description = (f"{card.name} v{card.version}, Ray Data, {concurrency} ONNX Runtime actor"
                            f"{'s' if concurrency > 1 else ''} ({device}{gpus})")

    @classmethod
    def open(cls, repo: Path, spec: str | None, kind: str | None, **options: Any) -> RayEngine:
        """The newest version of the model ``spec`` names, else the most accurate of ``kind``, whose ONNX file
        matches its card (checked here, before any actor starts; the actors check the bytes they get again)."""
        errors = []
        for card, directory in find_model(repo, spec, kind):
            try:
                model = card.verify_file(directory).read_bytes()
            except (CardError, OSError) as e:
                log.warning("skipping a broken model version", extra={"path": str(directory), "error": str(e)})
                errors.append(str(e))
                continue
            return cls(card, model, **options)
        raise EngineError("; ".join(errors))

    def _check_resources(self) -> None:
        """Refuse a pool the cluster cannot hold: Ray would wait for the missing actors forever.

        Each actor holds one CPU. CPU actors also decode (Ray fuses the prepare step into them, as both
        want one CPU); GPU actors leave decoding to tasks on the CPUs they do not hold.
        """
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        if self.num_gpus and self.num_gpus * self.concurrency > gpus:
            raise EngineError(f"--concurrency {self.concurrency} x --num-gpus-per-worker {self.num_gpus:g} needs "
                              f"{self.num_gpus * self.concurrency:g} GPUs; the Ray cluster has {gpus:g}")
        if self.concurrency + bool(self.num_gpus) > cpus:
            raise EngineError(f"--concurrency {self.concurrency} needs {self.concurrency + bool(self.num_gpus)} "
                              f"CPUs; the Ray cluster has {cpus:g}")

    def run(self, items: Iterable[Item], *, batch_size: int,
            on_batch: Callable[[list[tuple[Item, Outcome]]], None]) -> None:
        """Classify every item, calling ``on_batch`` with each batch's (item, outcome) pairs in input order."""
        blocks = list(_blocks(items, batch_size))
        expected = sum(block.num_rows for block in blocks)
        if not expected:
            return
        data = ray.data.from_arrow(blocks)
        data = data.map_batches(_prepare, fn_kwargs={"preparer": self.preparer, "filesystems": sources.opened()},
                                batch_format="pyarrow", batch_size=None)  # a block is one batch already
        data = data.map_batches(_Predictor, fn_constructor_kwargs=self._predictor_args, batch_format="pyarrow",
                                batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=self.concurrency),
                                num_gpus=self.num_gpus or None)
        seen: set[int] = set()
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="pyarrow"):
                pairs = []
                for index, item, outcome in zip(*(batch[c].to_pylist() for c in (INDEX, ITEM, OUTCOME)), strict=True):
                    if index not in seen:
                        seen.add(index)
                        pairs.append((pickle.loads(item), pickle.loads(outcome)))
                on_batch(pairs)
        except RayError as e:
            raise EngineError(f"the Ray pipeline failed: {_last_line(e)}") from e
        if len(seen) != expected:
            raise EngineError(f"Ray returned {len(seen)} of {expected} inputs; --resume classifies the rest")

    def close(self) -> None:
        """Shut down the Ray instance this engine started (a cluster it joined keeps running)."""
        if self._started and ray.is_initialized():
            ray.shutdown()


class _Predictor:
    """A Ray actor: the model's bytes, written to the actor's own folder, loaded once into a ``LocalEngine``."""

    def __init__(self, card: ModelCard, model: ray.ObjectRef, *, device: str, top_k: int, max_image_pixels: int,
                 threads: int) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="coursezoo-ray-")
        directory = Path(self._folder.name)
        (directory / ONNX_FILE).write_bytes(ray.get(model))
        self.engine = LocalEngine(card, directory, device=device, top_k=top_k, max_image_pixels=max_image_pixels,
                                  threads=threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [pickle.loads(x) for x in batch[ITEM].to_pylist()]
        outcomes = [x and pickle.loads(x) for x in batch[OUTCOME].to_pylist()]
        ready = [pickle.loads(x) for x in batch[INPUT].to_pylist() if x is not None]
        prepared = PreparedBatch(outcomes, self.engine.preparer._collate(ready) if ready else None)
        pairs = _classify(self.engine.classify, items, prepared)
        return pa.table({INDEX: batch[INDEX], ITEM: batch[ITEM],
                         OUTCOME: pa.array([pickle.dumps(outcome) for _, outcome in pairs], pa.binary())})


def _prepare(batch: pa.Table, preparer: Preparer, filesystems: dict[str, pafs.FileSystem]) -> pa.Table:
    """A Ray task: decode and check one batch with the batch ``Preparer``; per row its input or its failure."""
    sources.adopt(filesystems)  # the buckets the driver listed, as it reaches them
    prepared = preparer([pickle.loads(x) for x in batch[ITEM].to_pylist()])
    ready = iter(prepared.inputs if prepared.ready else ())  # a stacked array iterates by item, as a list does
    inputs = [None if failure else pickle.dumps(next(ready)) for failure in prepared.outcomes]
    outcomes = [failure and pickle.dumps(failure) for failure in prepared.outcomes]
    return batch.append_column(INPUT, pa.array(inputs, pa.binary())).append_column(
        OUTCOME, pa.array(outcomes, pa.binary()))


def _blocks(items: Iterable[Item], size: int) -> Iterator[pa.Table]:
    """Tables of ``size`` rows (position, pickled item): one block, one prepare task, one model batch each."""
    numbered = enumerate(items)
    while chunk := list(itertools.islice(numbered, size)):
        yield pa.table({INDEX: pa.array([i for i, _ in chunk], pa.int64()),
                        ITEM: pa.array([pickle.dumps(item) for _, item in chunk], pa.binary())})


def _last_line(error: Exception) -> str:
    """Ray's errors carry the remote traceback; the last line says what went wrong."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
