"""The KServe v2 / Open Inference Protocol service through the stock ``tritonclient[grpc]`` client.

Every exported model is inferred through ``tritonclient.grpc`` (raw tensors) and compared with
onnxruntime on the exported file; typed ``contents`` go through tritonclient's own protobuf stubs;
``tritonclient.grpc.aio`` is used once. This process must not import the server's generated
``inference`` module (see serving/protos.py), so it only ever sees tritonclient's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
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
    return {spec.name: rng.uniform(-1, 4, size=shape).astype(spec.numpy_dtype)}


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
    assert metadata["name"] == "coursezoo" and "model_repository" in metadata["extensions"]
    for name, card in cards.items():
        assert triton_client.is_model_ready(name) and triton_client.is_model_ready(name, card.version)
        meta = triton_client.get_model_metadata(name, as_json=True)
        assert meta["platform"] == "onnxruntime_onnx" and card.version in meta["versions"]
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == \
            [(t.name, t.datatype, list(t.shape)) for t in card.inputs]
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
    result = triton_client.infer("logistic_regression", triton_inputs({"hours": np.array([[1.0], [4.0]], "float32")}),
                                 model_version=card.version, outputs=[triton.InferRequestedOutput("probability")])
    p = result.as_numpy("probability").reshape(-1)
    assert p[0] < 0.5 < p[1]  # the course's bar: 1 hour fails, 4 hours pass


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
    ("unsupported datatype", _raw("features", "FP16", [1, 8], bytes(16)), "INVALID_ARGUMENT", "FP16"),
    ("raw size mismatch", _raw("features", "FP32", [1, 8], bytes(30)), "INVALID_ARGUMENT", "32"),
    ("unknown output", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1, 1), "float32")}),
                                         outputs=[triton.InferRequestedOutput("nope")]), "INVALID_ARGUMENT", "nope"),
    ("too many rows", lambda c: c.infer("linear_regression", triton_inputs({"x": np.ones((1025, 1), "float32")})),
     "RESOURCE_EXHAUSTED", "1024"),
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
