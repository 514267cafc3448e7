"""A gRPC server on loopback that breaks the domain API's contract on purpose, for the client's own checks.

Its digits "model" answers each image with the digit of its first pixel // 10 (so an image whose pixels are
all 10 * k is a k), and then misbehaves as ``mode`` says. It stands in for a buggy or hostile server, never for
CourseZoo's own: every test of the server's answers talks to a real ``coursezoo serve``.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from PIL import Image

from serving.protos import classifier_pb2 as pb
from serving.protos import classifier_pb2_grpc

MODES = ("honest", "more", "fewer", "wrong_model", "nan", "digit_42", "no_labels", "hang", "flip_version",
         "stream_ends_early", "stream_wrong_id", "huge_answer", "eleven_scores", "new_version")


class BadServer(classifier_pb2_grpc.ClassifierServicer):
    """``with BadServer(mode) as server:`` serves on ``server.target`` until the block ends."""

    def __init__(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.calls = 0
        self.release = threading.Event()  # ends a "hang" when the test is done
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(8))
        classifier_pb2_grpc.add_ClassifierServicer_to_server(self, self._server)
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> BadServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.stop(None)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:  # noqa: N802
        labels = [] if self.mode == "no_labels" else [str(d) for d in range(10)]
        version = "1"
        if self.mode == "new_version" and self.calls:  # version 2 came in after the first call, with new labels
            labels, version = [f"digit {d}" for d in range(10)], "2"
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="mnist_cnn", versions=[version], version=version,
                                                          task="digits", labels=labels, ready=True, provider="bad",
                                                          is_default=True)])

    def ClassifyDigits(self, request: pb.ClassifyDigitsRequest,  # noqa: N802 - the RPC's name
                       context: grpc.ServicerContext) -> pb.ClassifyDigitsResponse:
        with self._lock:
            self.calls += 1
            first_call = self.calls == 1
        if self.mode == "hang":
            self.release.wait()
        predictions = [_prediction(image) for image in request.images]
        model, version = "mnist_cnn", "1"
        if self.mode == "more":
            predictions.append(predictions[0])
        elif self.mode == "fewer":
            predictions = predictions[1:]
        elif self.mode == "wrong_model":
            model, version = "other_model", "9"
        elif self.mode == "nan":
            predictions[0].confidence = float("nan")
        elif self.mode == "digit_42":
            predictions[0].digit = 42
        elif self.mode == "eleven_scores":
            predictions[0].probabilities.append(0.0)
        elif self.mode == "new_version" and not first_call:
            version = "2"
        elif self.mode == "huge_answer":  # the answer to the image of a 0 is over the client's 64 MiB
            for prediction in predictions:
                if prediction.digit == 0:
                    prediction.probabilities.extend(bytes(17 << 20))
        elif self.mode == "flip_version":  # version 1 for the first images, 2 for the rest: a new version came
            # mid-call; and version 1 to a request that names another (the bug: the pin is ignored)
            version = "1" if request.version or predictions[0].digit == 0 else "2"
        return pb.ClassifyDigitsResponse(model=model, model_version=version, predictions=predictions)

    def StreamClassifyDigits(self, requests: Iterator[pb.ClassifyDigitsRequest],  # noqa: N802 - the RPC's name
                             context: grpc.ServicerContext) -> Iterator[pb.ClassifyDigitsResponse]:
        for i, request in enumerate(requests):
            if self.mode == "stream_ends_early" and i > 0:
                continue  # read every message, answer the first only, then end the stream as if done
            reply = self.ClassifyDigits(request, context)
            reply.id = str(i + 1) if self.mode == "stream_wrong_id" else request.id
            yield reply


def _prediction(image: pb.Image) -> pb.DigitPrediction:
    digit = Image.open(io.BytesIO(image.encoded)).getpixel((0, 0)) // 10
    probabilities = [0.0] * 10
    probabilities[digit] = 1.0
    return pb.DigitPrediction(digit=digit, confidence=1.0, probabilities=probabilities)


def digit_png(digit: int) -> bytes:
    """A 28x28 PNG that ``BadServer`` reads as ``digit``."""
    out = io.BytesIO()
    Image.new("L", (28, 28), 10 * digit).save(out, "PNG")
    return out.getvalue()
