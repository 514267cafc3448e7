"""The in-process engine: the server's own code path (card -> OnnxModel -> preprocess/postprocess), no server.

Batches arrive already prepared by the worker processes (digits as float32 tensors), so this process
only encodes texts/records, runs ONNX Runtime on large batches and turns outputs into predictions with
``serving.postprocess``, exactly as the server's handlers do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving import postprocess, preprocess
from serving.batch.engines import EngineError, diabetes_answer, top_classes
from serving.batch.engines.models import find_model
from serving.batch.prepare import Preparer
from serving.batch.types import Failure, Prediction
from serving.card import CardError, ModelCard
from serving.runtime import OnnxModel, ProviderError
from serving.workers import cores

log = logging.getLogger(__name__)


class LocalEngine:
    """One model version of ``--repo``, run with ONNX Runtime in this process."""

    concurrency = 1  # ONNX Runtime already uses every core for one batch; the workers overlap decoding

    def __init__(self, card: ModelCard, directory: Path, *, device: str, top_k: int, max_image_pixels: int,
                 threads: int | None = None, decode_workers: int = 0) -> None:
        if threads is None and card.task == "digits" and decode_workers:
            # Workers decode on every core; ONNX Runtime's default (a spinning thread per core) would take
            # their CPU. Measured on MNIST PNGs, decoding costs ~5x the CNN's inference per image.
            threads = max(1, cores() // 4)
        try:
            self.model = OnnxModel(card.verify_file(directory), card, device=device, intra_op_threads=threads)
        except (CardError, ProviderError) as e:
            raise EngineError(str(e)) from e
        self.card = card
        self.kind = card.task
        self.labels = card.labels
        self.top_k = top_k
        self.preparer = Preparer(card.task, card.preprocessing, max_image_pixels)
        self.description = f"{card.name} v{card.version}, local ONNX Runtime, {self.model.provider}"

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
            except EngineError as e:
                log.warning("skipping a broken model version", extra={"path": str(directory), "error": str(e)})
                errors.append(str(e))
        raise EngineError("; ".join(errors))

    def classify(self, inputs: Any) -> list[Prediction | Failure]:
        card, prep = self.card, self.card.preprocessing
        first, output = card.inputs[0].name, card.outputs[0].name
        if self.kind == "digits":
            results = postprocess.digit_predictions(self.model.run({first: inputs})[output])
            return [self._answer(self.labels[r.digit], r.confidence, r.probabilities) for r in results]
        outputs = self.model.run(preprocess.model_inputs(card, inputs))[output]
        if self.kind == "diabetes":
            results = postprocess.diabetes_predictions(outputs)
            return [self._answer(self.labels[r.label], *diabetes_answer(r.label, r.probability)) for r in results]
        if self.kind == "names":
            results = postprocess.names_predictions(outputs, self.labels, max(self.top_k, 1))
        else:
            results = postprocess.hello_predictions(outputs, inputs, prep["vocabulary"])
        return [Prediction(r.label, r.confidence, card.name, card.version, r.top[: self.top_k]) for r in results]

    def _answer(self, label: str, confidence: float, scores: Sequence[float]) -> Prediction:
        return Prediction(label, confidence, self.card.name, self.card.version,
                          top_classes(scores, self.labels, self.top_k))

    def close(self) -> None:
        """Nothing to release: the session goes with the process."""

