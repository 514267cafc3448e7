"""Engines classify prepared batches; the pipeline knows them only through the small ``Engine`` protocol.

``local`` runs the model in-process with ONNX Runtime, the server's own code path; ``remote`` sends
batches to a running ``coursezoo serve``. ``ray`` (engines/ray.py) runs the local engine's steps on a Ray
cluster with a loop of its own (``run``), which the CLI calls instead of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from serving.batch.prepare import Preparer
from serving.batch.types import BatchError, Failure, Prediction


class EngineError(BatchError):
    """The engine cannot run at all (no model, server unreachable after retries): exit status 1."""


class Engine(Protocol):
    kind: str  # the task of the model, one of serving.batch.types.KINDS
    labels: tuple[str, ...]  # the model's classes, in order (for the summary's histogram)
    description: str  # one line for the summary: model, version, where it runs
    concurrency: int  # batches that may be in classify() at once, from threads (a server wants several)
    preparer: Preparer  # what worker processes do to items before classify()
    # ``classify`` as a worker process can run it, right after preparing a batch (picklable; the local engine's
    # CPU model, so the tensors never cross back); None: classify() runs in this process
    worker_classify: Callable[[Any], list[Prediction | Failure]] | None

    def classify(self, inputs: Any) -> list[Prediction | Failure]:
        """One answer per ready item of a batch (``PreparedBatch.inputs``), in order; thread-safe."""
        ...

    def close(self) -> None: ...


def model_spec(spec: str | None) -> tuple[str, str]:
    """``--model NAME[:VERSION]`` as (name, version), "" for none; the version as the server reads it, a whole
    number ("01" is version 1), so that both engines refuse and find the same versions."""
    if not spec:
        return "", ""
    name, colon, version = spec.partition(":")
    if not name:
        raise EngineError(f"--model {spec!r} names no model: expected NAME or NAME:VERSION (e.g. mnist_cnn:1)")
    if not colon:
        return name, ""
    if not (version.isascii() and version.isdigit() and int(version) > 0):
        raise EngineError(f"--model {spec!r}: version {version!r} is not a whole number > 0: expected NAME or "
                          f"NAME:VERSION (e.g. {name}:1)")
    return name, str(int(version))


def top_classes(scores: Sequence[float], labels: Sequence[str], k: int) -> tuple[tuple[str, float], ...]:
    """The ``k`` best (label, score) pairs, best first; ties keep label order."""
    if k <= 0:  # the default: no sort per item (8 µs an image on a 2-core host, of ~100 in all)
        return ()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    return tuple((labels[i], float(scores[i])) for i in order)


def diabetes_answer(label: int, probability: float) -> tuple[float, tuple[float, float]]:
    """(confidence in ``label``, scores of labels 0 and 1) from a diabetes model's P(label 1), so records get a
    confidence and a top-k like every other kind."""
    scores = (1.0 - probability, probability)
    return scores[label], scores
