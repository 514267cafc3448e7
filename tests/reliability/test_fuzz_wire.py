"""Hostile input over the wire: fuzzed requests to a real server, then proof that it still serves.

Every reply must be a correct answer or the documented status (INVALID_ARGUMENT for a malformed input,
RESOURCE_EXHAUSTED for one over a limit); never INTERNAL or UNKNOWN, never a hang or a crash, and the
server logs no error. Requests go through raw stubs so that they can carry what no typed client would send:
non-UTF-8 strings, bytes that are no message at all, tensors that contradict their shapes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from serving.card import ModelCard
from serving.protos import classifier_pb2 as pb
from serving.protos import classifier_pb2_grpc
from tests.reliability.fuzzing import floats, fuzz, image_files, infer_requests, png_claiming, strip, texts

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

OK, INVALID, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_ITEMS = 32
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(scratch_repo: Path, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(scratch_repo, "--max-items-per-request", str(MAX_ITEMS), "--max-image-pixels", "1000000",
                        "--max-message-mb", "4", "--poll-interval-s", "0")


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield channel


@pytest.fixture(scope="module")
def classifier(channel: grpc.Channel) -> classifier_pb2_grpc.ClassifierStub:
    return classifier_pb2_grpc.ClassifierStub(channel)


def status(call: Callable[[], object]) -> tuple[grpc.StatusCode, object]:
    """(code, reply or status details) of one call."""
    try:
        return OK, call()
    except grpc.RpcError as e:
        return e.code(), e.details()


def assert_documented(code: grpc.StatusCode, detail: object, allowed: tuple[grpc.StatusCode, ...]) -> None:
    assert code in allowed, f"{code}: {detail}"
    if code is not OK:
        assert "expected" in str(detail) or "at most" in str(detail) or "no digit" in str(detail), detail


@fuzz(400)
@given(images=st.lists(image_files() | st.sampled_from((png_claiming(40_000, 40_000), strip(100_000, 1), b"")),
                       max_size=3))
def test_fuzzed_images(classifier: classifier_pb2_grpc.ClassifierStub, digits_name: str, images: list[bytes],
                       count_case: Callable[[], None]) -> None:
    count_case()
    request = pb.ClassifyDigitsRequest(model=digits_name, images=[pb.Image(encoded=b) for b in images])
    code, reply = status(lambda: classifier.ClassifyDigits(request, timeout=TIMEOUT))
    assert_documented(code, reply, (OK, INVALID, EXHAUSTED))
    if code is OK:
        assert [0 <= p.digit <= 9 for p in reply.predictions] == [True] * len(images)


@fuzz(300)
@given(model=st.sampled_from(("names_gru", "hello_rnn")), words=texts, top_k=st.integers(-5, 30))
def test_fuzzed_texts(classifier: classifier_pb2_grpc.ClassifierStub, model: str, words: list[str], top_k: int,
                      count_case: Callable[[], None]) -> None:
    count_case()
    request = pb.ClassifySequencesRequest(model=model, texts=words, top_k=top_k)
    code, reply = status(lambda: classifier.ClassifySequences(request, timeout=TIMEOUT))
    assert_documented(code, reply, (OK, INVALID))
    if code is OK:
        assert len(reply.predictions) == len(words)


def string_field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand: the library refuses invalid UTF-8."""
    out, n = bytearray([number << 3 | 2]), len(value)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]) + value)


@fuzz(300)
@given(texts=st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=4))
def test_texts_that_are_not_utf8(channel: grpc.Channel, texts: list[bytes], count_case: Callable[[], None]) -> None:
    count_case()
    fields = pb.ClassifySequencesRequest.DESCRIPTOR.fields_by_name
    body = string_field(fields["model"].number, b"names_gru") + b"".join(
        string_field(fields["texts"].number, t) for t in texts)
    call = channel.unary_unary("/coursezoo.v1.Classifier/ClassifySequences")
    code, reply = status(lambda: call(body, timeout=TIMEOUT))
    assert_documented(code, reply, (OK, INVALID))
    if any(not _is_utf8(t) for t in texts):
        assert code is INVALID and "UTF-8" in str(reply)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@fuzz(300)
@given(records=st.lists(st.lists(floats, max_size=10), max_size=MAX_ITEMS + 2))
def test_fuzzed_records(classifier: classifier_pb2_grpc.ClassifierStub, records: list[list[float]],
                        count_case: Callable[[], None]) -> None:
    count_case()
    request = pb.ClassifyDiabetesRequest(records=[pb.DiabetesRecord(features=r) for r in records])
    code, reply = status(lambda: classifier.ClassifyDiabetes(request, timeout=TIMEOUT))
    assert_documented(code, reply, (OK, INVALID, EXHAUSTED))
    assert (code is EXHAUSTED) == (len(records) > MAX_ITEMS)


def test_fuzzed_model_infer(channel: grpc.Channel, scratch_repo: Path, count_case: Callable[[], None]) -> None:
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    cards = [ModelCard.load(max(p.iterdir(), key=lambda v: int(v.name))) for p in sorted(scratch_repo.iterdir())]

    @fuzz(500)
    @given(case=infer_requests(cards))
    def check(case: tuple[str, kserve.ModelInferRequest]) -> None:
        count_case()
        code, reply = status(lambda: stub.ModelInfer(case[1], timeout=TIMEOUT))
        assert_documented(code, reply, (OK, INVALID, EXHAUSTED))

    check()


@pytest.mark.parametrize("model,shapes,expected", [
    ("hello_rnn", {"chars": [0, 2**62, 2**62]}, (INVALID, "too large an array")),  # numpy's own limit
    ("names_gru", {"chars": [1, 0], "lengths": [1]}, (INVALID, "at least one element on every axis")),
    ("names_gru", {"chars": [1, 100_000], "lengths": [1]}, (INVALID, "at most 256 long")),
])
def test_model_infer_shapes_at_the_edges(channel: grpc.Channel, model: str, shapes: dict[str, list[int]],
                                         expected: tuple[grpc.StatusCode, str]) -> None:
    """Shapes found by review, not by the fuzzer: each is a clear refusal, not INTERNAL."""
    request = kserve.ModelInferRequest(model_name=model)
    for name, shape in shapes.items():
        request.inputs.add(name=name, datatype="INT64", shape=shape)
        count = 0 if 0 in shape else shape[0] * (shape[1] if len(shape) > 1 else 1)
        request.raw_input_contents.append(bytes(8 * count))
    code, reply = status(lambda: kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT))
    assert (code, expected[1] in str(reply)) == (expected[0], True), reply
    assert_documented(code, reply, (INVALID, EXHAUSTED))


#: Methods that change nothing; garbage is not sent to RepositoryModelLoad/Unload (it would only be NOT_FOUND).
READ_ONLY = ("/coursezoo.v1.Classifier/ListModels", "/coursezoo.v1.Classifier/ClassifyDigits",
             "/coursezoo.v1.Classifier/ClassifyDiabetes", "/coursezoo.v1.Classifier/ClassifySequences",
             "/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelMetadata",
             "/inference.GRPCInferenceService/ModelReady", "/inference.GRPCInferenceService/RepositoryIndex",
             "/inference.GRPCInferenceService/ModelConfig", "/inference.GRPCInferenceService/ModelStatistics",
             "/grpc.health.v1.Health/Check")


@fuzz(400)
@given(method=st.sampled_from(READ_ONLY), body=st.binary(max_size=200))
def test_bytes_that_are_no_message(channel: grpc.Channel, method: str, body: bytes,
                                   count_case: Callable[[], None]) -> None:
    """Random bytes usually do not parse (INVALID_ARGUMENT); when they happen to, the request is judged
    like any other (an unknown model name: NOT_FOUND)."""
    count_case()
    code, reply = status(lambda: channel.unary_unary(method)(body, timeout=TIMEOUT))
    assert code in (OK, INVALID, EXHAUSTED, grpc.StatusCode.NOT_FOUND), f"{code}: {reply}"


@pytest.mark.parametrize("method", ["/coursezoo.v1.Classifier/StreamClassifyDigits",
                                    "/inference.GRPCInferenceService/ModelStreamInfer"])
def test_a_garbled_stream_message_ends_the_stream_cleanly(channel: grpc.Channel, digits_name: str, method: str) -> None:
    """Both streams answer the requests before it, then end with INVALID_ARGUMENT (a failed request that could be
    read is answered in place instead: see test_tritonclient)."""
    if method.endswith("StreamClassifyDigits"):
        good = pb.ClassifyDigitsRequest(model=digits_name, images=[pb.Image(encoded=strip(28, 28))]).SerializeToString()
    else:
        request = kserve.ModelInferRequest(model_name=digits_name, raw_input_contents=[bytes(4 * 784)])
        request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
        good = request.SerializeToString()
    stream = channel.stream_stream(method)
    replies = stream(iter([good, good, b"\xff\xff\xff", good]), timeout=TIMEOUT)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        received.extend(replies)
    assert len(received) == 2 and info.value.code() is INVALID and "wire format" in info.value.details()


@pytest.mark.parametrize("items,code", [(0, INVALID), (MAX_ITEMS, OK), (MAX_ITEMS + 1, EXHAUSTED), (5000, EXHAUSTED)])
def test_batch_size_limits(classifier: classifier_pb2_grpc.ClassifierStub, items: int, code: grpc.StatusCode) -> None:
    request = pb.ClassifyDiabetesRequest(records=[pb.DiabetesRecord(features=[0.1] * 8)] * items)
    assert status(lambda: classifier.ClassifyDiabetes(request, timeout=TIMEOUT))[0] is code


def test_an_oversized_message_is_refused_without_being_buffered(start_server: Callable[..., ServerProcess],
                                                               exported_repo: Path, tmp_path: Path) -> None:
    """A 48 MiB request to a server with a 1 MiB limit: RESOURCE_EXHAUSTED, and the server's peak memory
    (VmHWM, a fresh small server so its peak is its current size) does not grow by the message."""
    shutil.copytree(exported_repo / "diabetes_mlp", tmp_path / "diabetes_mlp")
    proc = start_server(tmp_path, "--max-message-mb", "1")
    assert proc.proc is not None
    before = peak_rss(proc.proc.pid)
    with grpc.insecure_channel(proc.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        request = pb.ClassifyDigitsRequest(images=[pb.Image(encoded=bytes(48 << 20))])
        code, detail = status(lambda: classifier_pb2_grpc.ClassifierStub(channel).ClassifyDigits(request, timeout=60))
        assert code is EXHAUSTED, f"{code}: {detail}"
        growth = peak_rss(proc.proc.pid) - before
        print(f"48 MiB message refused; server peak RSS grew by {growth / 2**20:.1f} MiB")
        assert growth < 24 << 20
        assert status(lambda: classifier_pb2_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest()))[0] is OK


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_the_server_is_healthy_and_clean_after_the_fuzzing(server: ServerProcess, channel: grpc.Channel,
                                                           classifier: classifier_pb2_grpc.ClassifierStub) -> None:
    """Runs last in this module (pytest keeps file order): the fuzzing above left no damage behind."""
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = classifier.ClassifyDiabetes(pb.ClassifyDiabetesRequest(records=[pb.DiabetesRecord(features=[0.1] * 8)]),
                                        timeout=TIMEOUT)
    assert len(reply.predictions) == 1
    assert server.proc is not None and server.proc.poll() is None
    metrics = server.metrics()
    assert 'code="INTERNAL"' not in metrics and 'code="UNKNOWN"' not in metrics
    assert '"level": "ERROR"' not in server.output and "Traceback" not in server.output, server.output[-3000:]
