"""bench.h2load against the real server: a load of good calls is counted, and failed calls are caught
although h2load itself sees every one of them as HTTP 200 (gRPC's status travels in the trailers)."""

from __future__ import annotations

import grpc
import pytest

from bench import data, h2load
from serving.protos import classifier_pb2 as pb
from tests.conftest import require_tool

METHOD = "/coursezoo.v1.Classifier/ClassifyDigits"


@pytest.fixture(scope="module")
def executable() -> str:
    path, _ = h2load.find()
    require_tool(path, "h2load", "apt-get install -y nghttp2-client")
    assert path is not None
    return path


def _request(model: str) -> bytes:
    return pb.ClassifyDigitsRequest(model=model, images=[pb.Image(encoded=data.pngs(1)[0])]).SerializeToString()


def test_every_answer_is_counted(server, digits_model: str, executable: str) -> None:
    request = _request(digits_model)
    with grpc.insecure_channel(server.target) as channel:
        reply = channel.unary_unary(METHOD)(request, timeout=60)
    assert pb.ClassifyDigitsResponse.FromString(reply).predictions
    load = h2load.H2Load(executable, server.target, METHOD, request, concurrency=20, connections=5)
    try:
        assert load.args[1:5] == ["-c", "5", "-m", "4"]  # 20 calls in flight: 5 connections of 4
        assert load.rate(0.2) > 0
        latencies, seconds, cpu = load.timed(150, len(reply))
    finally:
        load.close()
    assert len(latencies) == 150 and all(t > 0 for t in latencies)
    assert seconds > 0 and cpu >= 0


def test_failed_calls_are_not_counted_as_answers(server, digits_model: str, executable: str) -> None:
    good = _request(digits_model)
    with grpc.insecure_channel(server.target) as channel:
        reply_bytes = len(channel.unary_unary(METHOD)(good, timeout=60))
    load = h2load.H2Load(executable, server.target, METHOD, _request("no_such_model"), concurrency=4, connections=1)
    try:
        with pytest.raises(RuntimeError, match="some calls failed"):
            load.timed(20, reply_bytes)  # NOT_FOUND, every time: no reply message at all
    finally:
        load.close()


def test_grpc_frame_is_the_length_prefixed_message() -> None:
    assert h2load.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


@pytest.mark.parametrize("workers", range(1, 17))
def test_h2load_keeps_the_concurrency_it_is_given(workers: int) -> None:
    """h2load runs -c x -m calls at once: 20 connections for 64 callers (--workers 5) ran 80."""
    from bench import loadgen

    load = h2load.H2Load("h2load", "127.0.0.1:1", METHOD, b"", 64, loadgen.connections(64, workers))
    try:
        args = load.args
        connections, per_connection = int(args[args.index("-c") + 1]), int(args[args.index("-m") + 1])
        assert connections * per_connection == 64 and connections >= loadgen.connections(64, workers)
    finally:
        load.close()
