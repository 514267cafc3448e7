"""The server on CUDAExecutionProvider: runs where a CUDA device works, skipped with the reason elsewhere.

The runtime turns TF32 off (serving/runtime.py CUDA_PROVIDER_OPTIONS), so GPU answers match the CPU's
within 1e-4; the tolerances below are that promise.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2 as mc

from serving.card import ModelCard
from serving.client import CourseZooClient

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

pytestmark = pytest.mark.gpu


def _cuda_unusable(repo: Path) -> str | None:
    """Why CUDA cannot run here, or None: a session must actually come up on CUDAExecutionProvider."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider"
    model = next(repo.glob("linear_regression/*/model.onnx"), None)
    if model is None:
        return f"no linear_regression export in {repo} to probe CUDA with"
    try:
        session = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any failure means: no usable GPU
        return f"CUDAExecutionProvider does not load: {e}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "CUDAExecutionProvider fell back to CPU (no CUDA device or libraries)"
    return None


@pytest.fixture(scope="module")
def gpu_client(exported_repo: Path, start_server: Callable[..., ServerProcess]) -> CourseZooClient:
    reason = _cuda_unusable(exported_repo)
    if reason:
        pytest.skip(reason)
    return CourseZooClient(start_server(exported_repo, "--device", "cuda").target, timeout=60)


def test_every_model_runs_on_cuda(gpu_client: CourseZooClient) -> None:
    assert {m.provider for m in gpu_client.list_models()} == {"CUDAExecutionProvider"}


def test_gpu_answers_match_cpu(gpu_client: CourseZooClient, client: CourseZooClient,
                               mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    records = np.random.default_rng(2).uniform(-1, 1, size=(64, 8)).tolist()
    gpu = [p.probability for p in gpu_client.classify_diabetes(records).predictions]
    cpu = [p.probability for p in client.classify_diabetes(records).predictions]
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    names = ["Smith", "Tanaka", "Rossi", "Nguyen", "Kowalski", "Dubois"]
    assert [p.label for p in gpu_client.classify_sequences(names).predictions] == \
        [p.label for p in client.classify_sequences(names).predictions]
    if gpu_client.list_models(task="digits"):
        images = list(mnist_test[0])
        gpu_digits = gpu_client.classify_digits(images).predictions
        cpu_digits = client.classify_digits(images).predictions
        assert [p.digit for p in gpu_digits] == [p.digit for p in cpu_digits]
        np.testing.assert_allclose([p.probabilities for p in gpu_digits], [p.probabilities for p in cpu_digits],
                                   atol=1e-4)


def test_a_card_that_says_cpu_stays_on_the_cpu(exported_repo: Path, tmp_path: Path,
                                                start_server: Callable[..., ServerProcess]) -> None:
    """A card's ``serving.device`` "cpu" (Triton's KIND_CPU) keeps its model on the CPU of a ``--device cuda``
    server, and says so (ListModels' provider, ModelConfig's instance group); the other models run on the GPU."""
    reason = _cuda_unusable(exported_repo)
    if reason:
        pytest.skip(reason)
    for name in ("diabetes_mlp", "names_gru"):
        shutil.copytree(exported_repo / name, tmp_path / name)
    version_dir = max((tmp_path / "diabetes_mlp").glob("[0-9]*"), key=lambda p: int(p.name))
    dataclasses.replace(ModelCard.load(version_dir), serving={"device": "cpu"}).save(version_dir)
    server = start_server(tmp_path, "--device", "cuda")
    with CourseZooClient(server.target, timeout=60) as client:
        assert {m.name: m.provider for m in client.list_models()} == {"diabetes_mlp": "CPUExecutionProvider",
                                                                      "names_gru": "CUDAExecutionProvider"}
        assert client.classify_diabetes([[0.1] * 8]).model == "diabetes_mlp"
    groups = {name: triton.InferenceServerClient(server.target).get_model_config(name).config.instance_group[0].kind
              for name in ("diabetes_mlp", "names_gru")}
    assert groups == {"diabetes_mlp": mc.ModelInstanceGroup.KIND_CPU, "names_gru": mc.ModelInstanceGroup.KIND_GPU}
