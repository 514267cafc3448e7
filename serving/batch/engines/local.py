"""The in-process engine: the server's own code path (card -> OnnxModel -> preprocess/postprocess), no server.

Batches arrive already prepared by the worker processes (digits as float32 tensors), so this process
only encodes texts/records, runs ONNX Runtime on large batches and turns outputs into predictions with
``serving.postprocess``, exactly as the server's handlers do.

On the CPU, digits go further in the workers: each runs the model itself, one ONNX Runtime thread per
worker, right after decoding a batch, and answers it there (``WorkerClassifier``; the pipeline renders the
rows there too). Only the rows' text crosses back, and this process, which also lists the inputs and
writes every row, is no longer the bottleneck (docs/performance.md). On a GPU this process keeps the one
CUDA session.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving import postprocess, preprocess
from serving.batch.engines import EngineError, diabetes_answer, top_classes
from serving.batch.engines.models import find_model
from serving.batch.prepare import Preparer
from serving.batch.types import Failure, Prediction
from serving.card import CardError, ModelCard
from serving.runtime import CPU, OnnxModel, ProviderError, device_for

log = logging.getLogger(__name__)


class LocalEngine:
    """One model version of ``--repo``, run with ONNX Runtime in this process."""

    concurrency = 1  # ONNX Runtime already uses every core for one batch; the workers overlap decoding

    def __init__(self, card: ModelCard, directory: Path, *, device: str, top_k: int, max_image_pixels: int,
                 threads: int | None = None, decode_workers: int = 0) -> None:
        """``decode_workers``: the processes that prepare digits batches (0: none), which on the CPU also run
        the model, with ``threads`` (default 1) each."""
        if card.task == "digits" and decode_workers:
            # On the CPU the workers run the model, one thread each (as many workers as cores), and this
            # session only checks the file and picks the device.
            threads = threads or 1
        try:
            self.model = OnnxModel(card.verify_file(directory), card, device=device_for(device, card),
                                   intra_op_threads=threads)
        except CardError as e:
            raise BrokenVersion(str(e)) from e
        except ProviderError as e:  # the device, not this version: no other version would run either
            raise EngineError(str(e)) from e
        self.card = card
        self.kind = card.task
        self.labels = card.labels
        self.top_k = top_k
        self.preparer = Preparer(card.task, card.preprocessing, max_image_pixels)
        self.description = f"{card.name} v{card.version}, local ONNX Runtime, {self.model.provider}"
        self.worker_classify: WorkerClassifier | None = None
        if card.task == "digits" and decode_workers and self.model.provider == CPU:
            self.worker_classify = WorkerClassifier(str(directory), card, threads or 1, top_k)
            self.description += f" in {decode_workers} worker processes"

    @classmethod
    def open(cls, repo: Path, spec: str | None, kind: str | None, *, device: str, top_k: int,
             max_image_pixels: int, threads: int | None = None, decode_workers: int = 0) -> LocalEngine:
        """The newest valid version of the model ``spec`` names (NAME or NAME:VERSION), else of the most
        accurate model of ``kind`` in ``repo``; a version whose files fail their card's check is skipped."""
        errors = []
        for card, directory in find_model(repo, spec, kind):
            try:
                return cls(card, directory, device=device, top_k=top_k, max_image_pixels=max_image_pixels,
                           threads=threads, decode_workers=decode_workers)
            except BrokenVersion as e:
                log.warning("skipping a broken model version", extra={"path": str(directory), "error": str(e)})
                errors.append(str(e))
        raise EngineError("; ".join(errors))

    def classify(self, inputs: Any) -> list[Prediction | Failure]:
        card, prep = self.card, self.card.preprocessing
        first, output = card.inputs[0].name, card.outputs[0].name
        if self.kind == "digits":
            return digit_answers(card, self.model.run({first: inputs})[output], self.top_k)
        outputs = self.model.run(preprocess.model_inputs(card, inputs))[output]
        if self.kind == "diabetes":
            results = postprocess.diabetes_predictions(outputs)
            return [_answer(card, self.labels[r.label], *diabetes_answer(r.label, r.probability), self.top_k)
                    for r in results]
        if self.kind == "names":
            results = postprocess.names_predictions(outputs, self.labels, max(self.top_k, 1))
        else:
            results = postprocess.hello_predictions(outputs, inputs, prep["vocabulary"])
        return [Prediction(r.label, r.confidence, card.name, card.version, r.top[: self.top_k]) for r in results]

    def close(self) -> None:
        """Nothing to release: the session goes with the process."""


class BrokenVersion(EngineError):
    """A model version whose files fail their card's check: ``open`` goes on to an older version."""


def digit_answers(card: ModelCard, probabilities: np.ndarray, top_k: int) -> list[Prediction]:
    """A digits model's outputs for a batch -> its answers, as the server's handlers make them."""
    return [_answer(card, card.labels[r.digit], r.confidence, r.probabilities, top_k)
            for r in postprocess.digit_predictions(probabilities)]


def _answer(card: ModelCard, label: str, confidence: float, scores: Sequence[float], top_k: int) -> Prediction:
    return Prediction(label, confidence, card.name, card.version, top_classes(scores, card.labels, top_k))


@dataclass(frozen=True)
class WorkerClassifier:
    """A digits model that a worker process loads once and runs on the batches it has just decoded."""

    directory: str
    card: ModelCard
    threads: int
    top_k: int

    def __call__(self, digits: np.ndarray) -> list[Prediction]:
        model = _worker_models.get(self.directory)
        if model is None:
            try:  # checked again here: the file may have been replaced since this run's main process loaded it
                path = self.card.verify_file(Path(self.directory))
            except CardError as e:
                raise EngineError(str(e)) from e
            model = _worker_models[self.directory] = OnnxModel(path, self.card, device="cpu",
                                                               intra_op_threads=self.threads)
        return digit_answers(self.card, model.run({self.card.inputs[0].name: digits})[self.card.outputs[0].name],
                             self.top_k)


#: the models loaded in this (worker) process, by folder
_worker_models: dict[str, OnnxModel] = {}
