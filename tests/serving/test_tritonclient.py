"""The KServe v2 / Open Inference Protocol service through the stock ``tritonclient[grpc]`` client.

Every exported model is inferred through ``tritonclient.grpc`` (raw tensors) and compared with
onnxruntime on the exported file; typed ``contents`` go through tritonclient's own protobuf stubs;
``tritonclient.grpc.aio`` is used once. Triton's extensions a client leans on are checked the same way:
the stream, the model configuration and the statistics. This process must not import the server's
generated ``inference`` module (see serving/protos.py), so it only ever sees tritonclient's.
"""

from __future__ import annotations

import asyncio
import queue
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.card import ModelCard
from serving.preprocess import encode_hello, encode_names

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

DATATYPE_OF = {"float32": "FP32", "int64": "INT64"}


@pytest.fixture(scope="module")
def cards(exported_repo: Path) -> dict[str, ModelCard]:
    """Every exported model's newest card."""
    return {d.name: ModelCard.load(max(d.iterdir(), key=lambda p: int(p.name)))
            for d in sorted(exported_repo.iterdir()) if any(d.glob("*/model.json"))}


@pytest.fixture(scope="module")
def triton_client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.target)


def sample(card: ModelCard, n: int = 3) -> dict[str, np.ndarray]:
    """Valid, varied inputs for a model of any task, by the card's tensor names."""
    rng = np.random.default_rng(len(card.name))
    names = [t.name for t in card.inputs]
    if card.task == "names":
        return dict(zip(names, encode_names(["Smith", "Tanaka", "Rossi", "Nguyen"][:n]), strict=True))
    if card.task == "hello":
        return {names[0]: encode_hello(["hello", "ohl", "lol", "eh"][:n], card.preprocessing["vocabulary"])}
    (spec,) = card.inputs
    shape = [n, *spec.shape[1:]]
    low, high = card.preprocessing.get("feature_range", (-1, 4))  # diabetes records: scaled as in the course CSV
    return {spec.name: rng.uniform(low, high, size=shape).astype(spec.numpy_dtype)}


def onnx_outputs(repo: Path, card: ModelCard, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(repo / card.name / card.version / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in card.outputs], session.run(None, inputs), strict=True))


def triton_inputs(inputs: dict[str, np.ndarray]) -> list[triton.InferInput]:
    tensors = []
    for name, array in inputs.items():
        tensor = triton.InferInput(name, list(array.shape), DATATYPE_OF[str(array.dtype)])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def test_server_and_model_metadata(triton_client: triton.InferenceServerClient, cards: dict[str, ModelCard]) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata(as_json=True)
    assert metadata["name"] == "coursezoo"
    assert {"model_repository", "binary_tensor_data", "parameters"} <= set(metadata["extensions"])
    for name, card in cards.items():
        assert triton_client.is_model_ready(name) and triton_client.is_model_ready(name, card.version)
        meta = triton_client.get_model_metadata(name, as_json=True)
        assert meta["platform"] == "onnxruntime_onnx" and card.version in meta["versions"]
        # one value per item (names_gru's lengths) is [-1, 1], as its configuration's dims [1] (Triton's metadata)
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == \
            [(t.name, t.datatype, list(t.shape) if len(t.shape) > 1 else [-1, 1]) for t in card.inputs]
        assert [t["name"] for t in meta["outputs"]] == [t.name for t in card.outputs]
    assert not triton_client.is_model_ready("no_such_model")


def test_infer_every_model_like_onnxruntime(triton_client: triton.InferenceServerClient, exported_repo: Path,
                                           cards: dict[str, ModelCard]) -> None:
    assert {"linear_regression", "logistic_regression"} <= set(cards)
    for name, card in cards.items():
        inputs = sample(card)
        result = triton_client.infer(name, triton_inputs(inputs), request_id=f"req-{name}")
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == (name, card.version, f"req-{name}")
        for output, expected in onnx_outputs(exported_repo, card, inputs).items():
            np.testing.assert_allclose(result.as_numpy(output), expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_requested_outputs_and_version(triton_client: triton.InferenceServerClient,
                                       cards: dict[str, ModelCard]) -> None:
    card = cards["logistic_regression"]
    hours = triton_inputs({"hours": np.array([[1.0], [4.0]], "float32")})
    result = triton_client.infer("logistic_regression", hours, model_version=card.version,
                                 outputs=[triton.InferRequestedOutput("probability")])
    p = result.as_numpy("probability").reshape(-1)
    assert p[0] < 0.5 < p[1]  # the course's bar: 1 hour fails, 4 hours pass
    # a version written with a leading zero is the same version, and an output asked for twice comes once (as Triton)
    again = triton_client.infer("logistic_regression", hours, model_version=f"0{card.version}",
                                outputs=[triton.InferRequestedOutput("probability")] * 2)
    assert len(again.get_response().outputs) == 1
    np.testing.assert_array_equal(again.as_numpy("probability"), result.as_numpy("probability"))


def test_classification_answers_the_top_classes(triton_client: triton.InferenceServerClient,
                                                mnist_test: tuple[np.ndarray, np.ndarray], cards: dict[str, ModelCard],
                                                exported_repo: Path) -> None:
    """Triton's classification extension (``class_count``): per item, the k largest values as "value:index:label",
    largest first; asking for more classes than there are answers them all."""
    images, _ = mnist_test
    x = (images[:4].astype(np.float32) / 255.0 - 0.1307) / 0.3081  # any valid input: compared with ORT's own logits
    x = x.reshape(4, 1, 28, 28)
    logits = onnx_outputs(exported_repo, cards["mnist_cnn"], {"image": x})["logits"]
    for k, expected in ((3, 3), (25, 10)):
        result = triton_client.infer("mnist_cnn", triton_inputs({"image": x}),
                                     outputs=[triton.InferRequestedOutput("logits", class_count=k)])
        classes = result.as_numpy("logits")
        assert classes.shape == (4, expected) and classes.dtype == object
        for row, answer in zip(logits, classes, strict=True):
            entries = [item.decode().split(":") for item in answer]
            indices = [int(index) for _, index, _ in entries]
            assert indices == list(np.argsort(-row, kind="stable")[:expected])
            assert [label for _, _, label in entries] == [cards["mnist_cnn"].labels[i] for i in indices]
            np.testing.assert_allclose([float(v) for v, _, _ in entries], row[indices], atol=1e-6)


def test_one_value_per_item_inputs_take_the_configured_shape(triton_client: triton.InferenceServerClient,
                                                              cards: dict[str, ModelCard]) -> None:
    """names_gru's lengths: [n, 1] (ModelMetadata's shape, ModelConfig's dims [1]) or [n] answer the same."""
    inputs = sample(cards["names_gru"])
    as_configured = dict(inputs, lengths=inputs["lengths"].reshape(-1, 1))
    np.testing.assert_array_equal(triton_client.infer("names_gru", triton_inputs(as_configured)).as_numpy("logits"),
                                  triton_client.infer("names_gru", triton_inputs(inputs)).as_numpy("logits"))


def test_data_in_two_places_is_refused(server: ServerProcess) -> None:
    """Typed contents and a raw buffer for one input: which would count? Triton refuses it too."""
    request = service_pb2.ModelInferRequest(model_name="linear_regression")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(100.0)
    request.raw_input_contents.append(np.array([[4.0]], np.float32).tobytes())
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "one place" in info.value.details()


def test_a_priority_must_be_a_number(server: ServerProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="linear_regression", raw_input_contents=[bytes(4)])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    request.parameters["priority"].string_param = "high"
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'priority' is a whole number" in info.value.details()


def test_load_parameters_are_refused_not_ignored(triton_client: triton.InferenceServerClient) -> None:
    """A configuration override would be silently dropped: the client is told instead."""
    with pytest.raises(InferenceServerException) as info:
        triton_client.load_model("linear_regression", config='{"max_batch_size": 8}')
    assert info.value.status() == "StatusCode.UNIMPLEMENTED" and "config" in info.value.message()
    assert triton_client.is_model_ready("linear_regression")


def test_typed_contents_equal_raw_contents(server: ServerProcess, triton_client: triton.InferenceServerClient,
                                           cards: dict[str, ModelCard]) -> None:
    """``contents.fp32_contents`` / ``int64_contents`` instead of raw buffers, through tritonclient's stubs."""
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name in ("diabetes_mlp", "names_gru", "linear_regression"):
            inputs = sample(cards[name])
            request = service_pb2.ModelInferRequest(model_name=name)
            for tensor, array in inputs.items():
                datatype = DATATYPE_OF[str(array.dtype)]
                item = request.inputs.add(name=tensor, datatype=datatype, shape=array.shape)
                getattr(item.contents, {"FP32": "fp32_contents", "INT64": "int64_contents"}[datatype]).extend(
                    array.reshape(-1).tolist())
            reply = stub.ModelInfer(request, timeout=30)
            raw = triton_client.infer(name, triton_inputs(inputs))
            for output, data in zip(reply.outputs, reply.raw_output_contents, strict=True):
                got = np.frombuffer(data, dtype=np.float32).reshape(output.shape)
                np.testing.assert_array_equal(got, raw.as_numpy(output.name))


def test_aio_client(server: ServerProcess, cards: dict[str, ModelCard]) -> None:
    async def infer() -> np.ndarray:
        client = triton_aio.InferenceServerClient(server.target)
        try:
            assert await client.is_server_ready()
            tensor = triton_aio.InferInput("x", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.array([[4.0]], dtype=np.float32))
            return (await client.infer("linear_regression", [tensor])).as_numpy("y")
        finally:
            await client.close()

    assert asyncio.run(infer())[0, 0] == pytest.approx(cards["linear_regression"].metrics["y"], abs=1e-5)


def _raw(name: str, datatype: str, shape: list[int], data: bytes) -> Callable[[triton.InferenceServerClient], object]:
    def call(client: triton.InferenceServerClient) -> object:
        tensor = triton.InferInput(name, shape, datatype)
        tensor._raw_content = data  # what set_data_from_numpy stores, minus its own size checks
        tensor._input.ClearField("contents")
        return client.infer("diabetes_mlp", [tensor])
    return call


def typed(model: str, name: str, datatype: str, field: str, values: list) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=[1, len(values)])
    getattr(tensor.contents, field).extend(values)
    return request


def class_count_zero() -> service_pb2.ModelInferRequest:
    """Asked for explicitly (tritonclient sends no parameter for class_count=0), as Triton refuses it."""
    request = typed("linear_regression", "x", "FP32", "fp32_contents", [4.0])
    request.outputs.add(name="y").parameters["classification"].int64_param = 0
    return request


def region_by_number() -> service_pb2.ModelInferRequest:
    """Was NOT_FOUND for region '' (the int read as an empty string)."""
    request = service_pb2.ModelInferRequest(model_name="linear_regression")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    tensor.parameters["shared_memory_region"].int64_param = 1
    tensor.parameters["shared_memory_byte_size"].int64_param = 4
    return request


INFER_ERRORS = [
    ("unknown model", lambda c: c.infer("no_such_model", triton_inputs({"x": np.ones((1, 1), "float32")})),
     "NOT_FOUND", "no_such_model"),
    ("unknown version", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                          model_version="42"), "NOT_FOUND", "42"),
    ("wrong tensor name", lambda c: c.infer("linear_regression", triton_inputs({"z": np.ones((1, 1), "float32")})),
     "INVALID_ARGUMENT", "'z'"),
    ("wrong shape", lambda c: c.infer("diabetes_mlp", triton_inputs({"features": np.ones((2, 7), "float32")})),
     "INVALID_ARGUMENT", "shape"),
    ("wrong datatype", lambda c: c.infer("diabetes_mlp", triton_inputs({"features": np.ones((2, 8), "int64")})),
     "INVALID_ARGUMENT", "INT64"),
    ("unsupported datatype", _raw("features", "FP16", [1, 8], bytes(16)), "INVALID_ARGUMENT",
     "input 'features' has datatype 'FP16': expected FP32"),
    ("raw size mismatch", _raw("features", "FP32", [1, 8], bytes(30)), "INVALID_ARGUMENT", "32"),
    ("unknown output", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                         outputs=[triton.InferRequestedOutput("nope")]), "INVALID_ARGUMENT", "nope"),
    ("too many rows", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1025, 1), "float32")})),
     "RESOURCE_EXHAUSTED", "1024"),
    ("version not a number", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                               model_version="latest"), "INVALID_ARGUMENT", "whole number > 0"),
    ("version in other digits", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                                  model_version="1_0"), "INVALID_ARGUMENT", "whole number > 0"),
    ("version not positive", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                               model_version="-1"), "INVALID_ARGUMENT", "whole number > 0"),
    ("reserved parameter", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                             parameters={"triton_x": 1}), "INVALID_ARGUMENT", "reserved"),
    ("a sequence", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                     sequence_id=7, sequence_start=True), "INVALID_ARGUMENT", "sequence"),
    ("an input name of 20,000 CJK characters, an unknown datatype",  # echoed whole, percent-encoded: 60 KB
     _raw("名" * 20000, "FOO", [1, 8], bytes(32)), "INVALID_ARGUMENT", "(cut from"),
    ("an input name of 20,000 characters",
     lambda c: c.infer("linear_regression", triton_inputs({"z" * 20000: np.ones((1, 1), "float32")})),
     "INVALID_ARGUMENT", "(20000 characters): expected x FP32"),
    ("an unscaled diabetes record",
     lambda c: c.infer("diabetes_mlp", triton_inputs({"features": np.array([[0, 148, 0, 0, 0, 0, 0, 0]], "float32")})),
     "INVALID_ARGUMENT", "input 'features' row 0 feature 1 is 148: expected features scaled"),
    ("a names length of 0", lambda c: c.infer("names_gru", triton_inputs({"chars": np.full((1, 3), 65, "int64"),
                                                                        "lengths": np.zeros(1, "int64")})),
     "INVALID_ARGUMENT", "'lengths' item 0 is 0"),
    ("an index past the vocabulary",
     lambda c: c.infer("hello_rnn", triton_inputs({"chars": np.full((1, 5), 4, "int64")})),
     "INVALID_ARGUMENT", "expected indices into 'ehlo', 0..3"),
    ("negative class count", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                               outputs=[triton.InferRequestedOutput("y", class_count=-1)]),
     "INVALID_ARGUMENT", "class count"),
]


@pytest.mark.parametrize(("case", "call", "code", "fragment"), INFER_ERRORS, ids=[e[0] for e in INFER_ERRORS])
def test_infer_errors(triton_client: triton.InferenceServerClient, case: str, call: Callable, code: str,
                      fragment: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(triton_client)
    assert info.value.status() == f"StatusCode.{code}", info.value.message()
    assert fragment in info.value.message()
    assert triton_client.is_server_ready()


def test_repository_index_lists_every_version(triton_client: triton.InferenceServerClient,
                                              cards: dict[str, ModelCard]) -> None:
    index = triton_client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"]) for m in index if m["state"] == "READY"} >= \
        {(name, card.version) for name, card in cards.items()}


RAW_ERRORS = [
    ("values in another type's field", "ModelInfer", lambda: typed("diabetes_mlp", "features", "FP32", "fp64_contents",
                                                                   [0.5] * 8),
     "INVALID_ARGUMENT", "0 values in contents.fp32_contents (its datatype FP32's field), but 8 in "
     "contents.fp64_contents"),
    ("a class count of 0", "ModelInfer", class_count_zero, "INVALID_ARGUMENT", "a whole number >= 1"),
    ("a region named by a number", "ModelInfer", region_by_number,
     "INVALID_ARGUMENT", "the shared_memory_region parameter names a region: expected a string_param"),
    ("another repository", "RepositoryIndex", lambda: service_pb2.RepositoryIndexRequest(repository_name="other"),
     "UNIMPLEMENTED", "this server has one model repository"),
]


@pytest.mark.parametrize(("case", "method", "request_of", "code", "fragment"), RAW_ERRORS,
                         ids=[e[0] for e in RAW_ERRORS])
def test_raw_request_errors(server: ServerProcess, case: str, method: str, request_of: Callable, code: str,
                            fragment: str) -> None:
    """What tritonclient never sends, but another client may: refused as Triton refuses it, saying what to send."""
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        getattr(service_pb2_grpc.GRPCInferenceServiceStub(channel), method)(request_of(), timeout=30)
    assert info.value.code() is getattr(grpc.StatusCode, code) and fragment in info.value.details()


def test_an_empty_final_response_may_be_asked_for(triton_client: triton.InferenceServerClient) -> None:
    """tritonclient's ``enable_empty_final_response``: every reply here is its request's last and says so."""
    answers: queue.Queue = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        triton_client.async_stream_infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                         enable_empty_final_response=True)
    finally:
        triton_client.stop_stream()
    result, error = answers.get_nowait()
    assert error is None and result.get_response().parameters["triton_final_response"].bool_param
    assert result.as_numpy("y").shape == (1, 1)


def provider_kind(server: ServerProcess, name: str) -> str:
    """The instance kind a model's configuration must state: where the server's banner says it runs."""
    provider = re.search(rf"^{name}\s+\S+\s+\S+\s+(\S+)", server.output, re.MULTILINE)
    assert provider, server.output
    return "KIND_CPU" if provider.group(1) == "CPUExecutionProvider" else "KIND_GPU"


def test_model_config_describes_every_model(server: ServerProcess, triton_client: triton.InferenceServerClient,
                                            cards: dict[str, ModelCard]) -> None:
    """What a Triton client reads from get_model_config: the batch limit, and the tensors without the batch axis."""
    for name, card in cards.items():
        config = triton_client.get_model_config(name).config
        assert (config.name, config.platform, config.backend) == (name, "onnxruntime_onnx", "onnxruntime")
        assert config.max_batch_size == 1024  # --max-items-per-request: more rows are refused
        # one value per item (names_gru's lengths) is dims [1] reshaped to []: Triton refuses empty dims
        assert [(t.name, t.data_type, list(t.dims), t.HasField("reshape") and list(t.reshape.shape))
                for t in config.input] == \
            [(t.name, model_config_pb2.DataType.Value(f"TYPE_{t.datatype}"), list(t.shape[1:]) or [1],
              len(t.shape) == 1 and []) for t in card.inputs]
        assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == \
            [(t.name, model_config_pb2.DataType.Value(f"TYPE_{t.datatype}"), list(t.shape[1:])) for t in card.outputs]
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000  # the shared server's 2 ms
        assert list(config.dynamic_batching.preferred_batch_size) == [64]  # --max-batch-size
        assert config.version_policy.WhichOneof("policy_choice") == "all"
        (group,) = config.instance_group
        kind = model_config_pb2.ModelInstanceGroup.Kind.Value(provider_kind(server, name))
        assert (group.kind, group.count) == (kind, 1)
        assert triton_client.get_model_config(name, card.version).config == config
    with pytest.raises(InferenceServerException) as info:
        triton_client.get_model_config("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "no_such_model" in info.value.message()


def features(n: int) -> list[triton.InferInput]:
    return triton_inputs({"features": np.linspace(-1, 1, 8 * n, dtype=np.float32).reshape(n, 8)})


def test_statistics_count_what_each_version_served(start_server: Callable[..., ServerProcess], exported_repo: Path,
                                                  cards: dict[str, ModelCard], tmp_path: Path) -> None:
    """A server of its own, so every count is known: requests answered and failed at the model, items, runs,
    and the per batch size runs; a request refused before the model (a wrong shape) is not the model's."""
    card = cards["diabetes_mlp"]
    shutil.copytree(exported_repo / card.name / card.version, tmp_path / card.name / card.version)
    server = start_server(tmp_path, "--max-queue-items", "4", "--max-queue-delay-ms", "0", "--poll-interval-s", "0")
    client = triton.InferenceServerClient(server.target)
    (fresh,) = client.get_inference_statistics(card.name).model_stats
    assert (fresh.inference_count, fresh.execution_count, fresh.last_inference) == (0, 0, 0)
    started_ms = time.time() * 1000
    for n in (1, 3, 3):
        client.infer(card.name, features(n))
    for inputs, code in ((features(5), "RESOURCE_EXHAUSTED"),  # more rows than the queue holds: failed at the model
                         (triton_inputs({"features": np.ones((2, 7), "float32")}), "INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException) as info:
            client.infer(card.name, inputs)
        assert info.value.status() == f"StatusCode.{code}"

    (stats,) = client.get_inference_statistics(card.name).model_stats
    assert (stats.name, stats.version) == (card.name, card.version)
    assert (stats.inference_count, stats.execution_count) == (7, 3)
    assert started_ms - 1000 <= stats.last_inference <= time.time() * 1000 + 1000
    infer = stats.inference_stats
    assert (infer.success.count, infer.fail.count) == (3, 1)
    assert {infer.queue.count, infer.compute_input.count, infer.compute_infer.count, infer.compute_output.count} == {3}
    assert infer.success.ns >= infer.compute_infer.ns > 0
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(1, 1), (3, 2)]
    assert sum(b.compute_infer.ns for b in stats.batch_stats) == infer.compute_infer.ns  # one request per run here

    assert client.get_inference_statistics().model_stats == [stats]  # "" = every model
    assert client.get_inference_statistics(card.name, card.version).model_stats == [stats]
    assert client.get_inference_statistics("", "42").model_stats == [stats]  # no name: every model (Triton ignores
    # the version then)
    for name, version, code in (("no_such_model", "", "NOT_FOUND"), (card.name, "42", "NOT_FOUND"),
                                ("", "latest", "INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException) as info:
            client.get_inference_statistics(name, version)
        assert info.value.status() == f"StatusCode.{code}", info.value.message()


def test_stream_answers_in_order_and_reports_a_failure_in_its_place(
        triton_client: triton.InferenceServerClient, exported_repo: Path, cards: dict[str, ModelCard]) -> None:
    """tritonclient's stream: a failed request reaches the callback as that request's error, and the stream goes on."""
    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]] = queue.Queue()
    sent = [sample(cards["diabetes_mlp"], n) for n in (1, 2, 3, 1, 2, 3, 1, 2, 3, 1)]
    triton_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, inputs in enumerate(sent):
            triton_client.async_stream_infer("diabetes_mlp", triton_inputs(inputs), request_id=f"r{i}")
            if i == 4:
                wrong_shape = triton_inputs({"features": np.ones((2, 7), "float32")})
                triton_client.async_stream_infer("diabetes_mlp", wrong_shape, request_id="bad")
    finally:
        triton_client.stop_stream()  # half-closes, then waits for every answer
    received = [answers.get_nowait() for _ in range(answers.qsize())]
    assert len(received) == len(sent) + 1
    failed_result, error = received.pop(5)
    assert failed_result is None and error is not None and "shape" in error.message()
    for i, ((result, error), inputs) in enumerate(zip(received, sent, strict=True)):
        assert error is None and result is not None
        assert result.get_response().id == f"r{i}"
        np.testing.assert_allclose(result.as_numpy("probability"),
                                   onnx_outputs(exported_repo, cards["diabetes_mlp"], inputs)["probability"], atol=1e-6)


def test_stream_error_replies_carry_the_request_id(server: ServerProcess) -> None:
    """The id of a failed request comes back with its error (tritonclient's callback does not show it)."""
    bad = service_pb2.ModelInferRequest(model_name="no_such_model", id="lost")
    good = service_pb2.ModelInferRequest(model_name="linear_regression", id="found")
    good.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    good.raw_input_contents.append(np.array([[4.0]], np.float32).tobytes())
    with grpc.insecure_channel(server.target) as channel:
        replies = list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([bad, good]),
                                                                                            timeout=30))
    assert [(r.infer_response.id, bool(r.error_message)) for r in replies] == [("lost", True), ("found", False)]
    assert "no_such_model" in replies[0].error_message
    # one reply per request, each marked final: what stream clients such as PyTriton's wait for
    assert all(r.infer_response.parameters["triton_final_response"].bool_param for r in replies)


def test_aio_stream(server: ServerProcess, cards: dict[str, ModelCard]) -> None:
    async def requests() -> AsyncIterator[dict]:
        for hours in (1.0, 4.0):
            tensor = triton_aio.InferInput("hours", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.array([[hours]], dtype=np.float32))
            yield {"model_name": "logistic_regression", "inputs": [tensor], "request_id": str(hours)}

    async def stream() -> list[float]:
        client = triton_aio.InferenceServerClient(server.target)
        try:
            return [float(result.as_numpy("probability")[0, 0]) async for result, error in
                    client.stream_infer(requests()) if error is None]
        finally:
            await client.close()

    low, high = asyncio.run(stream())
    assert low < 0.5 < high
