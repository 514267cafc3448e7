"""CourseZooClient against the shared server: chunking, files, pixel arrays, streaming, empty jobs."""

from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.client import BadReply, CourseZooClient, to_image
from serving.process import ServerProcess
from serving.protos import classifier_pb2 as pb
from tests.bad_server import BadServer, digit_png


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
    assert to_image(np.arange(784) % 256).pixels == bytes(range(256)) * 3 + bytes(range(16))  # 784 integers


@pytest.mark.parametrize(("pixels", "message"), [
    (np.full((28, 28), 0.5, np.float32), "dtype float32 from 0.5 to 0.5: expected integer grey levels 0..255"),
    (np.full((28, 28), 256), "from 256 to 256: expected integer grey levels 0..255"),
    (np.full((28, 28), -1), "from -1 to -1"),
    (np.zeros((2, 392), np.uint8), r"shape \(2, 392\): expected 28x28"),
])
def test_pixels_are_refused_rather_than_cast(pixels: np.ndarray, message: str) -> None:
    """Floats of 0..1 (torchvision's ToTensor) cast to uint8 were a near-blank image, answered confidently."""
    with pytest.raises(ValueError, match=message):
        to_image(pixels)


def test_a_lone_string_is_not_a_list_of_names(client: CourseZooClient) -> None:
    """Iterated, "Rossi" was five one-letter names, each answered."""
    with pytest.raises(TypeError, match="got a single str: wrap it in a list"):
        client.classify_sequences("Rossi")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got a single bytes"):
        client.classify_digits(b"\x89PNG...")  # type: ignore[arg-type]


@pytest.mark.parametrize("setting", ["chunk_size", "max_in_flight", "connections"])
def test_settings_below_one_are_refused(setting: str) -> None:
    with pytest.raises(ValueError, match=f"{setting}=0: expected 1 or more"):
        CourseZooClient("localhost:1", **{setting: 0})


@pytest.mark.parametrize(("target", "message"), [
    ("localhost", "'localhost' has no port: expected HOST:PORT (e.g. localhost:50051)"),  # was dialled at :443
    ("52201", "'52201' has no host: expected HOST:PORT (e.g. localhost:52201)"),  # was looked up as a host name
    ("http://localhost:52201", "is a URL: expected HOST:PORT without http://"),  # was "Misformatted domain name"
    ("localhost:", "has port '': expected HOST:PORT with a port 1..65535"),
    ("localhost:65536", "has port '65536'"),
    (":50051", "has no host"),
    ("::1:50051", "an IPv6 address in brackets"),
    ("[::1]", "'[::1]' has no port"),
    ("dns:///localhost", "has no port"),
    ("ipv4:127.0.0.1:1,127.0.0.2", "has no port"),
])
def test_an_address_without_a_port_or_a_url_is_refused(target: str, message: str) -> None:
    """gRPC takes each of these and fails only as an unreachable server, retried until the caller gives up."""
    with pytest.raises(ValueError, match=re.escape(message)):
        CourseZooClient(target)


@pytest.mark.parametrize("target", ["localhost:50051", "[::1]:50051", "dns:///localhost:50051",
                                    "dns://127.0.0.53/localhost:50051", "ipv4:127.0.0.1:1,127.0.0.2:2",
                                    "ipv6:[::1]:50051", "unix:/run/coursezoo.sock", "unix-abstract:coursezoo"])
def test_hosts_with_ports_and_grpcs_own_schemes_are_taken(target: str) -> None:
    CourseZooClient(target).close()


def test_an_error_in_a_chunk_says_which_items_it_carried(client: CourseZooClient) -> None:
    """The server counts positions within its request: the caller learns which of its items those are."""
    names = ["Rossi"] * 9 + ["Straße"] + ["Li"] * 3
    with CourseZooClient(client.target, chunk_size=4) as chunked, pytest.raises(grpc.RpcError) as info:
        chunked.classify_sequences(names)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("items 8..11 of this call, sent as one request: name 1: name 'Straße'")
    with pytest.raises(grpc.RpcError) as alone:  # one request: the server's own words
        client.classify_sequences(names[8:11])
    assert alone.value.details().startswith("name 1: name 'Straße'")


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


class SilentProxy:
    """A TCP relay to ``target`` that can go silent: it then keeps both connections open and forwards nothing,
    as a peer whose host died, or whose network path was cut, does."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.silent = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                downstream, _ = self.listener.accept()
                upstream = socket.create_connection(self.upstream)
                self.sockets += [downstream, upstream]
                for source, sink in ((downstream, upstream), (upstream, downstream)):
                    threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while (data := source.recv(65536)) and not self.silent.is_set():
                sink.sendall(data)

    def close(self) -> None:
        for s in (self.listener, *self.sockets):
            s.close()


def stream_until_it_fails(target: str, images: Iterator[np.ndarray],
                          replies: list[pb.ClassifyDigitsResponse]) -> grpc.RpcError:
    """Stream ``images`` one per message with keepalive 60 times faster than the client's own (pings every
    0.5 s, given up after 0.5 s), collecting ``replies``; the error that ends the stream."""
    outcome: list[grpc.RpcError] = []

    def stream() -> None:
        with CourseZooClient(target, chunk_size=1, keepalive_s=0.5, ping_timeout_s=0.5) as client:
            try:
                replies.extend(client.stream_classify_digits(images))
            except grpc.RpcError as e:
                outcome.append(e)

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    worker.join(30)  # a bound on the wait, not a measure: the pings give up about a second after the silence
    assert not worker.is_alive(), "the stream is still waiting on a silent connection"
    return outcome[0]


def test_a_stream_to_a_server_gone_silent_fails_instead_of_waiting_for_ever(server: ServerProcess) -> None:
    """Keepalive pings find the dead connection: the stream ends UNAVAILABLE ("ping timeout"). Without them it
    waited for ever, its requests still coming (a camera, say) and no reply."""
    proxy = SilentProxy(server.target)
    replies: list[pb.ClassifyDigitsResponse] = []

    def images() -> Iterator[np.ndarray]:
        yield np.zeros((28, 28), np.uint8)
        while not replies:  # the first image is answered before the connection goes silent
            time.sleep(0.01)
        proxy.silent.set()
        while True:
            yield np.zeros((28, 28), np.uint8)
            time.sleep(0.1)

    try:
        outcome = stream_until_it_fails(proxy.target, images(), replies)
    finally:
        proxy.close()
    assert len(replies) == 1 and outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome


def test_a_quiet_stream_keeps_pinging_and_fails_when_the_server_goes_silent() -> None:
    """A stream that sends nothing for a while (a camera pausing) then loses its server: gRPC sends at most 2
    pings without data unless told otherwise, so the keepalive had stopped before the server went away.
    A real gRPC server on loopback that accepts pings as often as they come (ours takes one per 10 s, the
    client's real interval is 30 s: the test runs 60 times faster)."""
    from concurrent import futures

    from serving.protos import classifier_pb2_grpc

    class Echo(classifier_pb2_grpc.ClassifierServicer):
        def StreamClassifyDigits(self, requests: Iterator[pb.ClassifyDigitsRequest],  # noqa: N802 - the RPC
                                 context: grpc.ServicerContext) -> Iterator[pb.ClassifyDigitsResponse]:
            for request in requests:  # one (empty) prediction per image: the client checks the count
                yield pb.ClassifyDigitsResponse(model="echo", id=request.id,
                                                predictions=[pb.DigitPrediction() for _ in request.images])

    server = grpc.server(futures.ThreadPoolExecutor(2), options=[
        ("grpc.http2.min_ping_interval_without_data_ms", 10), ("grpc.http2.max_ping_strikes", 0)])
    classifier_pb2_grpc.add_ClassifierServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    proxy = SilentProxy(f"127.0.0.1:{port}")
    replies: list[pb.ClassifyDigitsResponse] = []

    def images() -> Iterator[np.ndarray]:
        yield np.zeros((28, 28), np.uint8)
        time.sleep(3)  # quiet: 6 keepalive intervals, 3 times the pings gRPC sends without data by default
        proxy.silent.set()
        time.sleep(3600)  # the camera waits for its answer; it must not wait for ever
        yield np.zeros((28, 28), np.uint8)

    try:
        outcome = stream_until_it_fails(proxy.target, images(), replies)
    finally:
        proxy.close()
        server.stop(None)
    assert len(replies) == 1 and outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome
    assert "ping timeout" in outcome.details(), outcome.details()


@pytest.mark.parametrize(("mode", "message"), [
    ("stream_ends_early", r"the stream ended with 3 messages unanswered, from id '1'"),
    ("stream_wrong_id", r"the stream answered id '1', expected '0'"),
])
def test_a_stream_that_does_not_answer_each_message_is_an_error(mode: str, message: str) -> None:
    """Replies were yielded as they came: a stream ended early gave 3 of 10 predictions and no error."""
    with BadServer(mode) as server, CourseZooClient(server.target, chunk_size=3) as client:
        with pytest.raises(BadReply, match=message):
            list(client.stream_classify_digits([digit_png(d) for d in range(10)], timeout=30))


def test_a_chunk_answered_by_another_version_than_it_was_pinned_to_is_an_error() -> None:
    """A chunk answered by an older version is asked again, pinned to the last chunk's: a server answering
    that with yet another version made the reply say one version while some items came from another."""
    with BadServer("flip_version") as server, CourseZooClient(server.target, chunk_size=3) as client:
        with pytest.raises(BadReply, match=re.escape("items 0..2 of this call with mnist_cnn:1, asked for "
                                                     "mnist_cnn:2")):
            client.classify_digits([digit_png(d) for d in range(10)], model="mnist_cnn")


def test_a_version_asked_for_with_a_leading_zero_is_the_one_answered(client: CourseZooClient) -> None:
    """The server reads "01" as version 1 and answers "1": the client's check of the version must agree."""
    assert client.classify_diabetes([[0.0] * 8], model="diabetes_mlp", version="01").model_version == "1"


def test_a_bad_reply_to_one_chunk_of_many_is_a_bad_reply() -> None:
    """It was wrapped as the chunk's server error (ChunkError), so callers checking for BadReply missed it."""
    with BadServer("more") as server, CourseZooClient(server.target, chunk_size=3) as client:
        with pytest.raises(BadReply, match=re.escape("answered 4 predictions for the 3 items 0..2 of this call")):
            client.classify_digits([digit_png(d) for d in range(10)], model="mnist_cnn")
