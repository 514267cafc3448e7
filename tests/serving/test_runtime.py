"""serving.runtime: ONNX Runtime sessions of the shipped exports, device choice and tensor validation."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as C

from serving import runtime
from serving.card import CardError, ModelCard, TensorSpec
from serving.postprocess import hello_predictions, names_predictions
from serving.preprocess import MAX_TEXT_LENGTH, InputError, encode_hello, encode_names
from serving.runtime import CPU, CUDA, OnnxModel, ProviderError, sample_inputs

EXPORTED = Path(__file__).resolve().parents[2] / "exported"


def export(name: str) -> tuple[Path, ModelCard]:
    """(model.onnx, card) of the newest shipped version of ``name``."""
    versions = sorted((p for p in (EXPORTED / name).glob("[0-9]*") if (p / "model.json").exists()),
                      key=lambda p: int(p.name))
    if not versions:
        pytest.skip(f"no export of {name} in {EXPORTED}")
    return versions[-1] / "model.onnx", ModelCard.load(versions[-1])


@pytest.fixture(scope="module")
def names() -> OnnxModel:
    return OnnxModel(*export("names_gru"), device="cpu", intra_op_threads=1)


def test_cpu_session_answers_like_onnxruntime_itself(names: OnnxModel) -> None:
    chars, lengths = encode_names(["Nakamura", "Schmidt", "O'Neill"])
    got = names.run({"chars": chars, "lengths": lengths})
    direct = ort.InferenceSession(str(names.path), providers=[CPU]).run(None, {"chars": chars, "lengths": lengths})
    assert names.provider == CPU
    assert list(got) == ["logits"]
    np.testing.assert_array_equal(got["logits"], direct[0])
    labels = [r.label for r in names_predictions(got["logits"], names.card.labels)]
    assert labels[0] == "Japanese"


def test_hello_model_says_ohlol() -> None:
    model = OnnxModel(*export("hello_rnn"), device="cpu")
    vocab = model.card.preprocessing["vocabulary"]
    out = model.run({"chars": encode_hello(["hello"], vocab)})
    assert hello_predictions(out["logits"], ["hello"], vocab)[0].label == "ohlol"


@pytest.mark.parametrize("name", ["diabetes_mlp", "names_gru", "hello_embedding", "linear_regression"])
def test_warmup_runs_a_real_shaped_batch(name: str) -> None:
    model = OnnxModel(*export(name), device="cpu")
    out = model.warmup()
    assert set(out) == {t.name for t in model.card.outputs}
    assert all(v.shape[0] == 1 and np.isfinite(v).all() for v in out.values())


def test_sample_inputs_follow_the_card() -> None:
    _, card = export("names_gru")
    x = sample_inputs(card, batch_size=3)
    assert {k: (v.shape, v.dtype) for k, v in x.items()} == {
        "chars": ((3, 1), np.dtype("int64")), "lengths": ((3,), np.dtype("int64"))}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"chars": np.ones((2, 4), np.int64)}, "missing input tensor 'lengths': expected chars INT64"),
        ({"chars": np.ones((2, 4), np.int64), "lengths": np.ones(2, np.int64), "x": np.ones(2)},
         "unknown input tensor 'x'"),
        ({"chars": np.ones((2, 4), np.int32), "lengths": np.ones(2, np.int64)},
         r"input 'chars' has datatype INT32: expected INT64 \[-1, -1\]"),
        ({"chars": np.ones((2, 4), np.float16), "lengths": np.ones(2, np.int64)},
         "input 'chars' has datatype float16: expected INT64"),
        ({"chars": np.ones((2, 4, 1), np.int64), "lengths": np.ones(2, np.int64)},
         r"input 'chars' has shape \[2, 4, 1\]: expected INT64 \[-1, -1\]"),
        ({"chars": np.ones((0, 4), np.int64), "lengths": np.ones(0, np.int64)}, "empty batch"),
        ({"chars": np.ones((1, 0), np.int64), "lengths": np.zeros(1, np.int64)},
         r"input 'chars' has shape \[1, 0\]: expected at least one element on every axis after the batch axis"),
        ({"chars": np.full((1, 3), -1, np.int64), "lengths": np.full(1, 3, np.int64)},
         "input 'chars' has negative values: expected indices and lengths >= 0"),
        ({"chars": np.ones((1, 257), np.int64), "lengths": np.full(1, 257, np.int64)},
         r"input 'chars' has shape \[1, 257\]: a sequence axis is at most 256 long"),
        ({"chars": np.ones((2, 4), np.int64), "lengths": np.ones(3, np.int64)}, "disagree on the batch size"),
        # values a names encoder never produces: the model would answer them (length 0, padding inside a name)
        # or fail inside ONNX Runtime (codes past the embedding, lengths past the width)
        ({"chars": np.ones((2, 4), np.int64), "lengths": np.array([4, 0], np.int64)},
         r"input 'lengths' item 1 is 0: expected a name's length, 1..4 \(the width of 'chars'\)"),
        ({"chars": np.ones((2, 4), np.int64), "lengths": np.array([5, 4], np.int64)},
         r"input 'lengths' item 0 is 5: expected a name's length, 1..4"),
        ({"chars": np.array([[65, 66, 0, 0], [65, 0, 66, 0]], np.int64), "lengths": np.array([2, 3], np.int64)},
         "input 'chars' row 1 has code 0 at position 1, inside its length 3: 0 is padding"),
        ({"chars": np.full((1, 3), 128, np.int64), "lengths": np.full(1, 3, np.int64)},
         r"input 'chars' has value 128: expected character codes \(ASCII\), 0..127"),
    ],
)
def test_validate_names_the_tensor_and_what_is_expected(names: OnnxModel, inputs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        names.validate(inputs)


def test_a_sequence_of_the_longest_length_is_served(names: OnnxModel) -> None:
    chars = np.full((1, MAX_TEXT_LENGTH), ord("a"), dtype=np.int64)
    inputs = {"chars": chars, "lengths": np.array([MAX_TEXT_LENGTH], dtype=np.int64)}
    names.validate(inputs)
    assert names.run(inputs)["logits"].shape[0] == 1


def test_validate_checks_fixed_axes() -> None:
    model = OnnxModel(*export("diabetes_mlp"), device="cpu")
    model.validate({"features": np.zeros((5, 8), np.float32)})
    with pytest.raises(InputError, match=r"input 'features' has shape \[5, 7\]: expected FP32 \[-1, 8\]"):
        model.validate({"features": np.zeros((5, 7), np.float32)})


def test_values_the_model_refuses_are_input_errors(names: OnnxModel) -> None:
    chars = np.full((1, 3), 500, dtype=np.int64)  # outside the 128-character embedding
    with pytest.raises(InputError, match="refused the input"):
        names.run({"chars": chars, "lengths": np.array([3], dtype=np.int64)})


def test_a_padded_name_is_valid(names: OnnxModel) -> None:
    """Codes after a name's length are never read: padding may hold anything the embedding has."""
    names.validate({"chars": np.array([[65, 66, 0], [65, 66, 67]], np.int64), "lengths": np.array([2, 3], np.int64)})


def test_hello_indices_must_be_in_the_vocabulary() -> None:
    model = OnnxModel(*export("hello_embedding"), device="cpu")
    model.validate({"chars": np.array([[1, 0, 2, 2, 3]], np.int64)})
    with pytest.raises(InputError, match=r"input 'chars' has value 4: expected indices into 'ehlo', 0..3"):
        model.validate({"chars": np.array([[1, 0, 2, 2, 4]], np.int64)})


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_card_that_does_not_describe_its_file_is_refused(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Also under ``auto`` while CUDA is still tried (here until a first model falls back): the card is checked
    before any sample batch runs, and a broken version must not read as a CUDA failure."""
    monkeypatch.setitem(runtime._cuda, "usable", True)
    path, card = export("diabetes_mlp")
    wrong = dataclasses.replace(card, inputs=(TensorSpec("x", "FP32", (-1, 8)),))
    with pytest.raises(CardError, match=r"model.onnx has inputs \['features'\]"):
        OnnxModel(path, wrong, device=device)
    assert runtime._cuda["usable"]


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device 'tpu'"):
        OnnxModel(*export("diabetes_mlp"), device="tpu")


def test_cuda_is_used_or_fails_loudly() -> None:
    """``cuda`` never falls back silently: a CUDA session, or ProviderError saying why."""
    try:
        model = OnnxModel(*export("diabetes_mlp"), device="cuda")
    except ProviderError as e:
        assert CUDA in str(e)
    else:
        assert model.provider == CUDA


def test_auto_falls_back_to_cpu_with_one_log_line(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(runtime._cuda, "usable", True)  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="coursezoo.runtime"):
        models = [OnnxModel(*export(n), device="auto") for n in ("diabetes_mlp", "hello_rnn")]
    if models[0].provider == CUDA:
        pytest.skip("CUDA works here: nothing to fall back from")
    assert [m.provider for m in models] == [CPU, CPU]
    records = [r for r in caplog.records if r.name == "coursezoo.runtime"]
    assert len(records) == 1 and CUDA in records[0].getMessage() and CPU in records[0].getMessage()
    # a warning only where a GPU is there to miss: on a CPU host, CPU is what auto means
    assert records[0].levelno == (logging.WARNING if runtime.NVIDIA_DEVICE.exists() else logging.INFO)


class _InitFails(ort.InferenceSession):
    """A GPU host whose CUDA session fails while it initializes (cuDNN or cuBLAS handles, GPU memory for the
    weights). This host has no GPU, so the failure is injected at onnxruntime's boundary, as the exception
    class ORT raises there; every CPU session is real."""

    def __init__(self, path: str, so: ort.SessionOptions | None = None, providers: list | None = None) -> None:
        if any(CUDA in p for p in providers or []):
            raise C.RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
                                     "CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR")
        super().__init__(path, so, providers=providers)


class _CudaWorks(ort.InferenceSession):
    """A GPU host where CUDA works: a session asked for CUDA says it is on CUDA (underneath, a real CPU one)."""

    def __init__(self, path: str, so: ort.SessionOptions | None = None, providers: list | None = None) -> None:
        self.on_cuda = any(CUDA in p for p in providers or [])
        super().__init__(path, so, providers=[CPU])

    def get_providers(self) -> list[str]:
        return [CUDA, CPU] if self.on_cuda else [CPU]


class _NoCudnn(_CudaWorks):
    """A GPU host without cuDNN: onnxruntime-gpu 1.31 creates the session on CUDA and loads cuDNN only when
    the first convolution or GRU runs, which then fails. Injected as above; the session underneath is real."""

    def run(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - ORT's own signature
        if self.on_cuda:
            raise C.Fail("[ONNXRuntimeError] : 1 : FAIL : cuDNN is not available. Install cuDNN, update the system "
                         "library search path, or set enable_cudnn=0 to force native CUDA paths where available.")
        return super().run(*args, **kwargs)


@pytest.mark.parametrize(("session", "reason"), [(_InitFails, "CUDNN_STATUS_INTERNAL_ERROR"),
                                                 (_NoCudnn, "cuDNN is not available")])
def test_a_cuda_session_that_fails_to_start_or_run_falls_back_or_is_a_provider_error(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, session: type, reason: str) -> None:
    """ORT's own fallback catches only ValueError and RuntimeError, and its exception classes are neither:
    such a failure escaped as a raw exception, so ``auto`` never reached the CPU and ``cuda`` was no
    ProviderError; and a session created on CUDA without cuDNN was kept, its models failing at warm-up."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setitem(runtime._cuda, "usable", True)  # as in a fresh process
    with pytest.raises(ProviderError, match=reason):
        OnnxModel(*export("mnist_cnn"), device="cuda")
    with caplog.at_level(logging.INFO, logger="coursezoo.runtime"):
        model = OnnxModel(*export("mnist_cnn"), device="auto")
    assert model.provider == CPU and model.warmup()["logits"].shape == (1, 10)
    (record,) = [r for r in caplog.records if r.name == "coursezoo.runtime"]
    assert reason in record.getMessage() and not runtime._cuda["usable"]


def _renamed_output(card: ModelCard) -> ModelCard:
    return dataclasses.replace(card, outputs=(dataclasses.replace(card.outputs[0], name="nope"), *card.outputs[1:]))


def _fp64_input(card: ModelCard) -> ModelCard:
    return dataclasses.replace(card, inputs=(dataclasses.replace(card.inputs[0], datatype="FP64"), *card.inputs[1:]))


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda"])
@pytest.mark.parametrize(("damage", "message"), [(_renamed_output, "outputs"), (_fp64_input, "the card says FP64")])
def test_the_card_is_checked_on_every_device(monkeypatch: pytest.MonkeyPatch, device: str, damage: Callable,
                                             message: str) -> None:
    """A card with the right inputs but a wrong output name served on a working GPU and failed every request; a
    wrong datatype was ONNX Runtime's own error at warm-up, which the batch CLI did not take for a broken
    version (it skips those for an older one)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _CudaWorks)
    monkeypatch.setitem(runtime._cuda, "usable", True)
    path, card = export("diabetes_mlp")
    with pytest.raises(CardError, match=message):
        OnnxModel(path, damage(card), device=device)
    assert runtime._cuda["usable"]


def test_a_broken_version_on_a_gpu_that_works_is_its_own_error_not_a_provider_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda`` stops the server on a ProviderError; a card that does not describe its file is one
    broken version (CardError), whichever device it was tried on."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _NoCudnn)
    path, card = export("diabetes_mlp")
    wrong = dataclasses.replace(card, inputs=(TensorSpec("x", "FP32", (-1, 8)),))
    with pytest.raises(CardError, match=r"model.onnx has inputs \['features'\]"):
        OnnxModel(path, wrong, device="cuda")


def test_a_model_that_fails_on_the_cpu_too_leaves_cuda_to_the_others(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """``auto`` gives CUDA up for the process only when CUDA was to blame: a broken file fails on both."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _InitFails)
    monkeypatch.setitem(runtime._cuda, "usable", True)
    path, card = export("mnist_cnn")
    (tmp_path / "model.onnx").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(C.InvalidProtobuf):
        OnnxModel(tmp_path / "model.onnx", card, device="auto")
    assert runtime._cuda["usable"]


def _cuda_works() -> bool:
    try:
        return OnnxModel(*export("diabetes_mlp"), device="cuda").provider == CUDA
    except ProviderError:
        return False


@pytest.mark.gpu
def test_gpu_matches_cpu_within_fp32_tolerance() -> None:
    """With TF32 off (runtime.CUDA_PROVIDER_OPTIONS) GPU outputs stay within 1e-4 of the CPU's."""
    if not _cuda_works():
        pytest.skip("no usable CUDA execution provider on this machine")
    rng = np.random.default_rng(0)
    for name in ("names_gru", "diabetes_mlp", "hello_embedding", "mnist_cnn", "mnist_resnet"):
        if not (EXPORTED / name).is_dir():
            continue
        path, card = export(name)
        cpu, gpu = OnnxModel(path, card, "cpu"), OnnxModel(path, card, "cuda")
        inputs = sample_inputs(card, batch_size=16)
        for k, v in inputs.items():
            if v.dtype == np.float32:
                inputs[k] = rng.standard_normal(v.shape).astype(np.float32)
        want, got = cpu.run(inputs), gpu.run(inputs)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize(("threads", "n"), [(3, runtime.SMALL_BATCH * 3 + 1), (3, runtime.SLICE_ITEMS * 3 + 5),
                                         (1, runtime.SLICE_ITEMS * 2 + 5)])
def test_large_batches_run_in_slices_with_the_same_answers(threads: int, n: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU one single-threaded session: a batch above SMALL_BATCH is cut into slices that run on the
    model's lane threads (or one after another without lanes), and its rows are the rows of the same items
    run one at a time."""
    monkeypatch.setattr(runtime, "SLICE_WORTH_S", 0.0)  # slicing pays, whatever this machine's speed
    model = OnnxModel(*export("mnist_cnn"), device="cpu", intra_op_threads=threads)
    assert model._session.get_session_options().intra_op_num_threads == 1
    x = np.random.default_rng(0).normal(size=(n, 1, 28, 28)).astype(np.float32)
    name = model.card.inputs[0].name
    before = set(threading.enumerate())
    sliced = model.run({name: x})["logits"]
    lanes = [t for t in set(threading.enumerate()) - before if t.name.startswith("ort-mnist_cnn")]
    assert 1 <= len(lanes) <= 3 if threads > 1 else not lanes and model._lanes is None
    one_by_one = np.concatenate([model.run({name: x[i : i + 1]})["logits"] for i in range(n)])
    assert sliced.shape == (n, 10)
    np.testing.assert_allclose(sliced, one_by_one, rtol=1e-5, atol=1e-5)


def test_slices_are_one_per_lane_and_never_over_slice_items(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "SLICE_WORTH_S", 0.0)
    lanes = OnnxModel(*export("mnist_cnn"), device="cpu", intra_op_threads=2)
    alone = OnnxModel(*export("mnist_cnn"), device="cpu", intra_op_threads=1)
    small, large = runtime.SMALL_BATCH, runtime.SLICE_ITEMS
    assert [lanes._slice_count(n) for n in (1, small, small + 1, large * 2, large * 2 + 1, 1024)] == [1, 1, 2, 2, 3, 16]
    assert [alone._slice_count(n) for n in (small + 1, large, large + 1, 1024)] == [1, 1, 2, 16]


def test_a_model_too_cheap_for_slices_runs_every_batch_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether slices pay is timed once per model (SLICE_WORTH_S); a threshold no run reaches keeps every
    batch whole, with the same answers."""
    monkeypatch.setattr(runtime, "SLICE_WORTH_S", float("inf"))
    model = OnnxModel(*export("diabetes_mlp"), device="cpu", intra_op_threads=2)
    model.warmup()
    assert [model._slice_count(n) for n in (runtime.SMALL_BATCH + 1, 1024)] == [1, 1]
    x = np.random.default_rng(0).uniform(-1, 1, size=(100, 8)).astype(np.float32)
    name = model.card.inputs[0].name
    whole = next(iter(model.run({name: x}).values()))
    one_by_one = np.concatenate([next(iter(model.run({name: x[i : i + 1]}).values())) for i in range(100)])
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-5, atol=1e-6)


def test_warmup_starts_every_lane_so_the_thread_count_is_settled_before_serving() -> None:
    before = set(threading.enumerate())
    OnnxModel(*export("diabetes_mlp"), device="cpu", intra_op_threads=3).warmup()
    lanes = [t for t in set(threading.enumerate()) - before if t.name.startswith("ort-diabetes_mlp")]
    assert len(lanes) == 3


def test_sliced_runs_keep_every_input_aligned_and_refuse_bad_values_in_any_slice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-input model (names and their lengths) cut into slices: each name keeps its own length, and an
    out-of-range character in the last slice is the client's InputError, as in a batch run whole."""
    monkeypatch.setattr(runtime, "SLICE_WORTH_S", 0.0)
    model = OnnxModel(*export("names_gru"), device="cpu", intra_op_threads=2)
    people = ["Nakamura", "Schmidt", "O'Neill", "Rossi", "Dvorak", "Kowalski", "Nguyen", "Tanaka", "Ivanov",
              "Garcia", "Murphy"]
    chars, lengths = encode_names(people)
    whole = model.run({"chars": chars, "lengths": lengths})["logits"]
    single = [model.run({"chars": c[None, : int(n)], "lengths": n[None]})["logits"][0]
              for c, n in zip(chars, lengths, strict=True)]
    np.testing.assert_allclose(whole, np.stack(single), rtol=1e-5, atol=1e-5)
    chars[-1, 0] = 500  # outside the 128-character embedding
    with pytest.raises(InputError, match="refused the input"):
        model.run({"chars": chars, "lengths": lengths})
