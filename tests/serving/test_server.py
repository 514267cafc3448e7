"""The domain API (coursezoo.v1.Classifier), health, reflection and metrics of a real server subprocess.

Answers are checked against the truth (MNIST labels) or against running the exported ONNX file directly
with onnxruntime, never against the server's own output.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image, ImageOps

from serving.card import ModelCard
from serving.client import CourseZooClient
from serving.postprocess import softmax
from serving.preprocess import InputError, encode_names
from serving.protos import classifier_pb2 as pb
from serving.services.base import MAX_MESSAGE_BYTES, message_of

if TYPE_CHECKING:
    from tests.conftest import ServerProcess


@pytest.fixture(scope="module")
def card(exported_repo: Path) -> Callable[[str], ModelCard]:
    """name -> the card of its newest exported version."""
    return lambda name: ModelCard.load(max((exported_repo / name).iterdir(), key=lambda p: int(p.name)))


@pytest.fixture(scope="module")
def onnx(exported_repo: Path, card: Callable[[str], ModelCard]) -> Callable[[str], ort.InferenceSession]:
    """name -> an onnxruntime CPU session on the exported file, to compare the server with."""
    return lambda name: ort.InferenceSession(str(exported_repo / name / card(name).version / "model.onnx"),
                                             providers=["CPUExecutionProvider"])


def _encode(pixels: np.ndarray, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **kw)
    return buffer.getvalue()


def _status(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- ListModels --------------------------------------------------------------------------------------

def test_list_models_describes_every_export(client: CourseZooClient, exported_repo: Path, card: Callable) -> None:
    models = {m.name: m for m in client.list_models()}
    exported = {p.parent.parent.name for p in exported_repo.glob("*/*/model.json")}
    assert exported <= set(models)
    for name in exported:
        expected, info = card(name), models[name]
        assert info.ready and info.version == expected.version and expected.version in info.versions
        assert info.task == expected.task and list(info.labels) == list(expected.labels)
        assert info.provider.endswith("ExecutionProvider")
        assert json_format.MessageToDict(info.metrics) == json.loads(json.dumps(expected.metrics))
    assert {m.name for m in client.list_models(task="hello")} == {n for n in exported if card(n).task == "hello"}


def test_default_model_is_the_most_accurate_of_its_task(client: CourseZooClient, exported_repo: Path,
                                                        card: Callable) -> None:
    exported = {p.parent.parent.name for p in exported_repo.glob("*/*/model.json")}
    for task in ("diabetes", "names", "digits"):
        infos = client.list_models(task=task)
        assert {m.name for m in infos} >= {n for n in exported if card(n).task == task}, task  # none left out
        if not infos:  # none exported (a COURSEZOO_TEST_REPO without this task)
            continue
        defaults = [m.name for m in infos if m.is_default]
        best = max(infos, key=lambda m: m.metrics["accuracy"])
        assert defaults == [best.name]


# --- ClassifyDigits ----------------------------------------------------------------------------------

def test_digits_from_png_jpeg_inverted_and_padded_images(client: CourseZooClient, digits_model: str, card: Callable,
                                                         mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    """Raw pixels score as the card says; every way of sending the same digits scores (nearly) as well."""
    images, labels = mnist_test
    by_pixels = client.classify_digits(list(images), model=digits_model)
    assert by_pixels.model == digits_model and len(by_pixels.predictions) == len(labels)
    accuracy = (np.array([p.digit for p in by_pixels.predictions]) == labels).mean()
    assert accuracy >= min(0.95, card(digits_model).metrics["accuracy"] - 0.05)

    # A plain MNIST PNG is placed and normalized exactly as the raw pixels are.
    by_png = client.classify_digits([_encode(a, "PNG") for a in images], model=digits_model)
    for a, b in zip(by_png.predictions, by_pixels.predictions, strict=True):
        assert a.digit == b.digit
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)

    variants = {
        "jpeg": [_encode(a, "JPEG", quality=90) for a in images],
        "inverted (dark on light)": [_encode(255 - a, "PNG") for a in images],
        "padded and scaled (photo-like)": [
            _encode(np.asarray(ImageOps.expand(Image.fromarray(255 - a), border=(40, 10, 5, 30), fill=255)
                               .resize((150, 152))), "PNG")
            for a in images],
    }
    for variant, files in variants.items():
        reply = client.classify_digits(files, model=digits_model)
        variant_accuracy = (np.array([p.digit for p in reply.predictions]) == labels).mean()
        assert variant_accuracy >= accuracy - 0.05, f"{variant}: accuracy {variant_accuracy:.3f} vs {accuracy:.3f}"


def test_large_pixel_batches_answer_like_small_ones(client: CourseZooClient, digits_model: str,
                                                   mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    """Pixel batches over INLINE_PIXEL_IMAGES convert in a worker thread: same answers, same order."""
    images = list(mnist_test[0])
    small = client.classify_digits(images, model=digits_model).predictions
    with CourseZooClient(client.target, chunk_size=1024) as one_request:
        large = one_request.classify_digits(images * 4, model=digits_model).predictions  # 800 images, one request
    assert len(large) == 4 * len(small)
    for i, p in enumerate(large):
        assert p.digit == small[i % len(small)].digit
        np.testing.assert_allclose(p.probabilities, small[i % len(small)].probabilities, atol=1e-6)


def test_digits_prediction_fields(client: CourseZooClient, digits_model: str, card: Callable,
                                  mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    version = card(digits_model).version
    reply = client.classify_digits([mnist_test[0][0]], model=digits_model, version=version)
    (p,) = reply.predictions
    assert reply.model_version == version
    assert len(p.probabilities) == 10 and abs(sum(p.probabilities) - 1) < 1e-4
    assert p.confidence == max(p.probabilities) and p.probabilities[p.digit] == p.confidence


def test_empty_model_means_the_default_digits_model(client: CourseZooClient, digits_model: str,
                                                    mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    default = next(m.name for m in client.list_models(task="digits") if m.is_default)
    assert client.classify_digits([mnist_test[0][0]]).model == default


def test_stream_answers_in_order_like_unary(client: CourseZooClient, digits_model: str,
                                            mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images = list(mnist_test[0][:50])
    client.chunk_size = 7
    try:
        replies = list(client.stream_classify_digits(images, model=digits_model))
    finally:
        client.chunk_size = 256
    assert [r.id for r in replies] == [str(i) for i in range(8)]
    streamed = [p.digit for r in replies for p in r.predictions]
    assert streamed == [p.digit for p in client.classify_digits(images, model=digits_model).predictions]


def test_stream_error_ends_the_stream_with_its_status(server: ServerProcess, digits_model: str) -> None:
    stub = CourseZooClient(server.target).stub
    requests = [pb.ClassifyDigitsRequest(model=digits_model, images=[pb.Image(pixels=bytes(784))], id="ok"),
                pb.ClassifyDigitsRequest(model=digits_model, images=[pb.Image(pixels=b"\0" * 10)], id="bad")]
    replies = stub.StreamClassifyDigits(iter(requests), timeout=60)
    assert next(replies).id == "ok"
    error = _status(lambda: next(replies))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "784" in error.details()


# --- ClassifyDiabetes and ClassifySequences: the same numbers as onnxruntime on the export ----------

def test_diabetes_equals_onnxruntime(client: CourseZooClient, onnx: Callable) -> None:
    records = np.random.default_rng(0).uniform(-1, 1, size=(40, 8)).astype(np.float32)
    reply = client.classify_diabetes(records.tolist(), model="diabetes_mlp")
    (probability,) = onnx("diabetes_mlp").run(None, {"features": records})
    assert reply.model == "diabetes_mlp"
    got = np.array([p.probability for p in reply.predictions])
    np.testing.assert_allclose(got, probability.reshape(-1), rtol=1e-6, atol=1e-7)
    assert [p.label for p in reply.predictions] == (probability.reshape(-1) > 0.5).astype(int).tolist()


def test_names_equal_onnxruntime(client: CourseZooClient, onnx: Callable, card: Callable) -> None:
    names = ["Hinton", "Nakamura", "Schmidt", "Rossi", "Dvořák", "O'Neill", "Nguyen", "Ó Briain", "Kowalski"]
    reply = client.classify_sequences(names, model="names_gru", top_k=5)
    chars, lengths = encode_names(names)
    (logits,) = onnx("names_gru").run(None, {"chars": chars, "lengths": lengths})
    probs = softmax(logits)
    labels = card("names_gru").labels
    for p, row in zip(reply.predictions, probs, strict=True):
        assert p.label == labels[int(row.argmax())]
        assert p.confidence == pytest.approx(float(row.max()), abs=1e-6)
        assert [t.label for t in p.top] == [labels[i] for i in np.argsort(-row, kind="stable")[:5]]


def test_hello_models_say_ohlol(client: CourseZooClient, exported_repo: Path, card: Callable) -> None:
    exported = {p.parent.parent.name for p in exported_repo.glob("*/*/model.json")}
    hello = sorted(name for name in exported if card(name).task == "hello")
    if not hello:
        pytest.skip(f"no hello model in {exported_repo}")
    infos = client.list_models(task="hello")
    assert sorted(info.name for info in infos) == hello  # all of them, or the loop below checks too few
    for info in infos:
        reply = client.classify_sequences(["hello"], model=info.name)
        assert reply.predictions[0].label == "ohlol", info.name
        assert 0 < reply.predictions[0].confidence <= 1


def test_sequences_default_to_the_names_model(client: CourseZooClient) -> None:
    assert client.classify_sequences(["Tanaka"]).model == "names_gru"


# --- Errors: a status code and a message that says what is expected; the server keeps serving -------

class Case(NamedTuple):
    """One error case: ``call(client, digits_model)`` makes the failing call."""

    name: str
    call: Callable[[CourseZooClient, str], object]
    code: grpc.StatusCode
    fragment: str
    needs_digits: bool = False


def _digits(name: str, code: grpc.StatusCode, fragment: str, **request: object) -> Case:
    """A ClassifyDigits case on the digits model (``model`` in ``request`` overrides it)."""
    def call(client: CourseZooClient, model: str) -> object:
        return client.stub.ClassifyDigits(pb.ClassifyDigitsRequest(**{"model": model, **request}), timeout=30)
    return Case(name, call, code, fragment, needs_digits="model" not in request)


BLANK = pb.Image(pixels=bytes(784))
INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
ERRORS = [
    _digits("undecodable image", INVALID, "image 0", images=[pb.Image(encoded=b"not an image")]),
    _digits("empty encoded image", INVALID, "image 0", images=[pb.Image(encoded=b"")]),
    _digits("image without a source", INVALID, "set `encoded`", images=[pb.Image()]),
    _digits("wrong pixel count", INVALID, "784", images=[pb.Image(pixels=bytes(783))]),
    _digits("wrong pixel count in a batch", INVALID, "image 3: 10 bytes of pixels",
            images=[BLANK] * 3 + [pb.Image(pixels=bytes(10))] + [BLANK] * 3),
    _digits("wrong pixel count in a large batch", INVALID, "image 700: 785 bytes of pixels",
            images=[BLANK] * 700 + [pb.Image(pixels=bytes(785))] + [BLANK] * 99),
    _digits("no images", INVALID, "no images"),
    _digits("too many images", EXHAUSTED, "at most 1024", images=[BLANK] * 1025),
    _digits("oversized image", EXHAUSTED, "pixels",
            images=[pb.Image(encoded=_encode(np.zeros((5000, 5000), np.uint8), "PNG"))]),
    _digits("unknown model", NOT_FOUND, "mnist_nope", model="mnist_nope", images=[BLANK]),
    _digits("path-like model name", NOT_FOUND, "invalid model name", model="../exported", images=[BLANK]),
    _digits("model of another task", INVALID, "digits model", model="names_gru", images=[BLANK]),
    Case("unknown version", lambda c, m: c.classify_sequences(["Smith"], model="names_gru", version="999"),
         NOT_FOUND, "999"),
    Case("wrong feature count", lambda c, m: c.classify_diabetes([[0.0] * 7]), INVALID, "expected 8"),
    Case("NaN feature", lambda c, m: c.classify_diabetes([[0.0] * 7 + [float("nan")]]), INVALID, "NaN"),
    Case("an unscaled record (the original Pima row)",
         lambda c, m: c.classify_diabetes([[0.1] * 8, [6, 148, 72, 35, 0, 33.6, 0.627, 50]]), INVALID,
         "record 1 feature 0 is 6: expected features scaled as in the course CSV, -1..1 (accepted: -2..2)"),
    Case("infinite feature", lambda c, m: c.classify_diabetes([[float("inf")] + [0.0] * 7]), INVALID, "infinite"),
    Case("no records", lambda c, m: c.classify_diabetes([]), INVALID, "no records"),
    Case("empty text", lambda c, m: c.classify_sequences(["Smith", ""]), INVALID, "empty"),
    Case("hello text off the vocabulary", lambda c, m: c.classify_sequences(["help"], model="hello_rnn"), INVALID,
         "'p'"),
    Case("diabetes model for sequences", lambda c, m: c.classify_sequences(["x"], model="diabetes_mlp"), INVALID,
         "names or hello model"),
    Case("negative top_k", lambda c, m: c.classify_sequences(["Smith"], top_k=-1), INVALID, "top_k"),
    # echoed whole, these went past the client's 16 KiB metadata limit (RESOURCE_EXHAUSTED); int() refuses
    # over 4,300 digits (INTERNAL)
    Case("a version of 5,000 digits", lambda c, m: c.classify_sequences(["Smith"], model="names_gru",
                                                                         version="1" * 5000),
         INVALID, "(5000 characters) is not a whole number > 0 of at most 18 digits"),
    Case("a model name of 20,000 characters", lambda c, m: c.classify_sequences(["Smith"], model="x" * 20000),
         NOT_FOUND, "(20000 characters): expected letters, digits, '_', '.' and '-' only, at most 255"),
    Case("an unknown task filter", lambda c, m: c.list_models(task="Digits"), INVALID,
         "unknown task 'Digits': expected one of digits, diabetes"),
]


def test_status_messages_are_cut_to_fit_a_trailer() -> None:
    """By UTF-8 bytes: the trailer percent-encodes each byte beyond ASCII as 3 characters."""
    assert message_of(InputError("x" * 50)) == "x" * 50
    cut = message_of(InputError("x" * 100_000))
    assert cut == "x" * MAX_MESSAGE_BYTES + "... (cut from 100000 characters)"
    assert message_of(InputError("名" * 20_000)) == "名" * (MAX_MESSAGE_BYTES // 3) + "... (cut from 20000 characters)"


@pytest.mark.parametrize("case", ERRORS, ids=[e.name for e in ERRORS])
def test_errors_have_a_status_and_a_helpful_message(client: CourseZooClient, case: Case) -> None:
    digits = [m.name for m in client.list_models(task="digits")]
    if case.needs_digits and not digits:
        pytest.skip("no digits model exported yet")
    error = _status(lambda: case.call(client, digits[0] if digits else ""))
    assert error.code() == case.code, error.details()
    assert case.fragment in error.details()
    assert client.classify_sequences(["Smith"]).predictions  # still serving


# --- Dynamic batching, metrics, health, reflection ---------------------------------------------------

def test_concurrent_requests_form_batches(server: ServerProcess, client: CourseZooClient) -> None:
    """In rounds of 640 calls from 32 threads, until an execution has run more than one request: the adaptive
    delay learns that calls come together from a probe, once a second (``PROBE_S``), and a round on a server
    just started (this test alone) can end before the first probe."""
    record = [[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8]]
    expected = client.classify_diabetes(record, model="diabetes_mlp").predictions[0].probability

    def worker() -> None:
        for _ in range(20):
            results.append(client.classify_diabetes(record, model="diabetes_mlp").predictions[0].probability)

    rounds = 0
    while rounds < 5:
        rounds += 1
        results: list[float] = []
        threads = [threading.Thread(target=worker) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [expected] * 640  # batched or not, every caller gets its own row back
        metrics = server.metrics()
        count = float(re.search(r'coursezoo_batch_size_count\{model="diabetes_mlp",version="1"\} (\S+)',
                                metrics).group(1))
        single = float(re.search(r'coursezoo_batch_size_bucket\{le="1.0",model="diabetes_mlp",version="1"\} (\S+)',
                                 metrics).group(1))
        if single < count:
            break
    assert single < count, "no execution ran more than one request"
    assert re.search(r'coursezoo_requests_total\{model="diabetes_mlp",rpc="ClassifyDiabetes",version="1"\} (\d+)',
                     metrics)
    assert re.search(r'coursezoo_request_latency_seconds_bucket\{.*model="diabetes_mlp"', metrics)
    assert re.search(r'coursezoo_queue_depth\{model="diabetes_mlp",version="1"\}', metrics)
    assert re.search(r"^coursezoo_decoder_restarts_total 0\.0$", metrics, re.MULTILINE)  # none died here
    # where the time went, per request (queue) and per execution (compute), as Triton's queue and compute durations
    queued = float(re.search(r'coursezoo_queue_duration_seconds_count\{model="diabetes_mlp",version="1"\} (\S+)',
                             metrics).group(1))
    computed = float(re.search(r'coursezoo_compute_duration_seconds_count\{model="diabetes_mlp",version="1"\} (\S+)',
                               metrics).group(1))
    assert queued >= 1 + 640 * rounds and computed == count  # every request, the first one's too; every execution


def test_failures_are_counted_per_model_and_code(server: ServerProcess, client: CourseZooClient) -> None:
    _status(lambda: client.classify_diabetes([[0.0]], model="diabetes_mlp"))
    assert re.search(r'coursezoo_request_failures_total\{code="INVALID_ARGUMENT",model="diabetes_mlp",'
                     r'rpc="ClassifyDiabetes",version="1"\} [1-9]', server.metrics())


def test_requests_that_are_not_their_message_are_counted(server: ServerProcess) -> None:
    """Refused before any handler runs (the handlers count calls), so they were in no metric."""
    series = 'coursezoo_request_failures_total{code="INVALID_ARGUMENT",model="",rpc="ClassifyDigits",version=""}'

    def count() -> float:
        return next((float(line.rpartition(" ")[2]) for line in server.metrics().splitlines()
                     if line.startswith(series)), 0.0)

    before = count()
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/coursezoo.v1.Classifier/ClassifyDigits")
        for _ in range(2):
            error = _status(lambda: call(b"\xff\xff\xff", timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in error.details()
    assert count() == before + 2


def test_health_overall_and_per_model(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="names_gru")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="linear_regression")).status == serving
        error = _status(lambda: health.Check(health_pb2.HealthCheckRequest(service="no_such_model")))
        assert error.code() == grpc.StatusCode.NOT_FOUND  # what it was, and what may be asked
        assert error.details().startswith("no service 'no_such_model': expected '' (the server) or a model name: '', ")
        assert error.details().endswith("'mnist_resnet' and 2 more")  # 12 names: the first 10 of them


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in reply.list_services_response.service}
        assert {"coursezoo.v1.Classifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="coursezoo.v1.Classifier")
        (reply,) = stub.ServerReflectionInfo(iter([request]))
        assert reply.file_descriptor_response.file_descriptor_proto  # grpcurl can describe the API
