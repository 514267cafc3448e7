"""Fixtures of the reliability and security suites: a scratch model repository and the fuzz-case tally
(the hypothesis profile is in ``fuzzing.py``).

The scratch repository holds copies of real exports (never written in place: tests corrupt and remove
files in their copies) and a digits model: the exported MNIST one when there is one, otherwise a tiny
linear ONNX model built here, so the image paths are exercised whatever training has produced so far.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from serving.card import CARD_FILE, ONNX_FILE, ModelCard, TensorSpec, sha256_file
from tests.conftest import digits_models
from tests.reliability.fuzzing import FUZZ_CASES

#: Real exports copied into every scratch repository (all small; names_gru is the largest at 2.5 MB).
COPIED = ("diabetes_mlp", "names_gru", "hello_rnn", "linear_regression")
SYNTHETIC_DIGITS = "digits_synthetic"

@pytest.fixture
def count_case(request: pytest.FixtureRequest) -> Callable[[], None]:
    """Call once per hypothesis example; the totals are printed at the end of the run."""
    name = request.node.name

    def count() -> None:
        FUZZ_CASES[name] += 1

    return count


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FUZZ_CASES:
        terminalreporter.section("fuzz cases")
        for name, n in sorted(FUZZ_CASES.items()):
            terminalreporter.write_line(f"{n:7d}  {name}")
        terminalreporter.write_line(f"{sum(FUZZ_CASES.values()):7d}  total")


def write_synthetic_digits(repo: Path, name: str = SYNTHETIC_DIGITS, version: str = "1") -> Path:
    """A linear 784 -> 10 digits model with a valid card: the serving path of a digits export, in 8 KB."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "digits_synthetic",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(rng.normal(0, 0.05, (784, 10)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(10, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    directory = repo / name / version
    directory.mkdir(parents=True)
    onnx.save(model, directory / ONNX_FILE)
    ModelCard(
        name=name, version=version, task="digits", lecture="test", description="random linear digits model",
        inputs=(TensorSpec("image", "FP32", (-1, 1, 28, 28)),), outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        labels=tuple("0123456789"),
        preprocessing={"height": 28, "width": 28, "fit_box": 20, "mean": 0.1307, "std": 0.3081,
                       "polarity": "light_on_dark"},
        metrics={"accuracy": 0.0}, files={ONNX_FILE: {"sha256": sha256_file(directory / ONNX_FILE)}},
    ).save(directory)
    return directory


def make_repo(root: Path, exported: Path) -> Path:
    """A scratch repository: COPIED real exports plus a digits model (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copytree(exported / name, root / name)
    real_digits = digits_models(exported)
    if real_digits:
        shutil.copytree(exported / real_digits[0], root / real_digits[0])
    else:
        write_synthetic_digits(root)
    return root


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory: pytest.TempPathFactory, exported_repo: Path) -> Path:
    return make_repo(tmp_path_factory.mktemp("repo") / "models", exported_repo)


@pytest.fixture(scope="module")
def digits_name(scratch_repo: Path) -> str:
    return next(p.parent.parent.name for p in sorted(scratch_repo.glob(f"*/*/{CARD_FILE}"))
                if ModelCard.load(p.parent).task == "digits")
