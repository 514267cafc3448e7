"""CourseZooClient against the shared server: chunking, files, pixel arrays, streaming, empty jobs."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.client import CourseZooClient, to_image
from serving.protos import classifier_pb2 as pb


def test_chunked_requests_answer_like_one_request(client: CourseZooClient) -> None:
    records = np.random.default_rng(1).uniform(-1, 1, size=(50, 8)).tolist()
    whole = client.classify_diabetes(records)
    with CourseZooClient(client.target, chunk_size=7, max_in_flight=3) as chunked:
        parts = chunked.classify_diabetes(records)
    assert parts.model == whole.model and parts.model_version == whole.model_version
    assert [p.probability for p in parts.predictions] == [p.probability for p in whole.predictions]


def test_chunks_over_several_connections_answer_in_order(client: CourseZooClient) -> None:
    records = np.random.default_rng(2).uniform(-1, 1, size=(40, 8)).tolist()
    whole = client.classify_diabetes(records)
    with CourseZooClient(client.target, chunk_size=3, max_in_flight=5, connections=4) as spread:
        spread.wait_ready()
        parts = spread.classify_diabetes(records)
    assert [p.probability for p in parts.predictions] == [p.probability for p in whole.predictions]
    with pytest.raises(ValueError, match="connections=0"):
        CourseZooClient(client.target, connections=0)


def test_sequences_chunked_keep_order(client: CourseZooClient) -> None:
    names = ["Smith", "Tanaka", "Rossi", "Nguyen", "Kowalski"] * 3
    client.chunk_size = 4
    try:
        reply = client.classify_sequences(names, top_k=1)
    finally:
        client.chunk_size = 256
    assert [p.label for p in reply.predictions] == [p.label for p in client.classify_sequences(names).predictions]
    assert all(len(p.top) == 1 for p in reply.predictions)


def test_classify_files_and_pixels(client: CourseZooClient, digits_model: str, tmp_path: Path,
                                   mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = mnist_test
    paths = []
    for i, a in enumerate(images[:5]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    by_files = client.classify_files(paths, model=digits_model)
    by_pixels = client.classify_digits(list(images[:5]), model=digits_model)
    assert [p.digit for p in by_files.predictions] == [p.digit for p in by_pixels.predictions]


def test_to_image() -> None:
    buffer = io.BytesIO()
    Image.new("L", (3, 3)).save(buffer, "PNG")
    assert to_image(buffer.getvalue()).WhichOneof("source") == "encoded"
    assert to_image(np.zeros((28, 28), np.uint8)).pixels == bytes(784)
    assert to_image(pb.Image(pixels=b"x")).pixels == b"x"
    with pytest.raises(ValueError, match="28x28"):
        to_image(np.zeros((27, 28)))


def test_empty_job_gets_the_servers_answer(client: CourseZooClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classify_sequences([])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no texts" in info.value.details()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_refused_or_shutdown_cancelled_call_is_resent(code: grpc.StatusCode) -> None:
    """A stopping server answers UNAVAILABLE, or CANCELLED for calls it held but had not handled yet
    (grpc/grpc#41785): the client's retry policy resends both, and the caller sees only the answer.
    A real gRPC server on loopback that fails each call's first attempt with ``code``."""
    from concurrent import futures

    from serving.protos import classifier_pb2_grpc

    attempts: list[int] = []

    class FailsFirst(classifier_pb2_grpc.ClassifierServicer):
        def ClassifyDiabetes(self, request: pb.ClassifyDiabetesRequest,  # noqa: N802 - the RPC's name
                             context: grpc.ServicerContext) -> pb.ClassifyDiabetesResponse:
            attempts.append(len(request.records))
            if len(attempts) == 1:
                context.abort(code, "shutting down")
            return pb.ClassifyDiabetesResponse(model="stub", predictions=[pb.DiabetesPrediction(label=1)])

    server = grpc.server(futures.ThreadPoolExecutor(2))
    classifier_pb2_grpc.add_ClassifierServicer_to_server(FailsFirst(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with CourseZooClient(f"127.0.0.1:{port}", timeout=10) as client:
            reply = client.classify_diabetes([[0.0] * 8])
    finally:
        server.stop(None)
    assert reply.model == "stub" and attempts == [1, 1]
