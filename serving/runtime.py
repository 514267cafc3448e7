"""One ONNX Runtime session per model version, on the GPU when asked and able, else on the CPU.

The card says what the session must look like (tensor names, datatypes, shapes); ``OnnxModel`` checks the
file against it when loading and checks every client tensor against it before running, so a mistake is
an ``InputError`` that names the tensor rather than an opaque runtime failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from coursezoo.logs import one_line
from serving.card import DATATYPE_OF, CardError, ModelCard, TensorSpec
from serving.preprocess import MAX_TEXT_LENGTH, InputError, check_task_inputs, quote
from serving.workers import cores

log = logging.getLogger("coursezoo.runtime")

DEVICES = ("auto", "cpu", "cuda")
#: What a card's ``serving.device`` may say. "cpu" runs the model on the CPU whatever device the process runs models
#: on, as Triton's instance group of KIND_CPU does: for a model too small for a GPU to pay. On an H200 the diabetes
#: MLP's ORT CUDA runs were 0.10-0.26x its CPU runs at batches 1 to 1024 (docs/performance.md). "auto", the
#: default, follows the process.
CARD_DEVICES = ("auto", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

CUDA_PROVIDER_OPTIONS = {
    "device_id": "0",
    # TF32 (ORT's default on Ampere and later) rounds conv and matmul inputs to 10-bit mantissas, which
    # moves logits by ~1e-3 against the CPU. The course models are small enough that full FP32 costs
    # little, and then GPU and CPU answers agree within 1e-4: a digit never flips with the device.
    "use_tf32": "0",
    # EXHAUSTIVE (the default) benchmarks cuDNN algorithms for every new input shape; a dynamic batcher
    # makes many batch sizes, and each would pay that on its first request. The heuristic pick is close.
    "cudnn_conv_algo_search": "HEURISTIC",
    # Grow the arena by what is asked for, not in powers of two: many small models share one GPU.
    "arena_extend_strategy": "kSameAsRequested",
}

#: Session configuration entries (see ``_session_options``); the benchmark's Triton peer gets the same.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

#: On the CPU every run is single-threaded, and a batch of more than this many items is cut into slices, at
#: least one per thread, the slices run side by side on the same session. ONNX Runtime's own intra-op pool
#: splits every operator instead and waits for all its threads at each one: on a small machine, where the
#: event loop and the decoders take a core now and then, one preempted thread stalls the others at every
#: layer. Slices meet once per batch. Measured on 2 cores, mnist_cnn, old and new code in turn: raw
#: ModelInfer of 1024 images +10% by median, server CPU per request 26.8-30.1 -> 25.1-26.1 ms
#: (docs/performance.md). Up to this size one thread is as fast as two (batch 1: 25 us on one thread,
#: 35-70 us on a pool; batch 8: the same wall time, a third less CPU) and a slice would not pay for its
#: thread hop.
SMALL_BATCH = 8

#: No CPU run holds more than this many items: a larger batch is cut into more slices than threads, which
#: the lanes take in turn (one thread alone runs them one after another). A run's working set then stays
#: near the core's caches (conv1 of mnist_cnn writes 1.5 MB of activations for 64 images, 11.8 MB for 512).
#: In-process on 2 cores (1 MB of L2 each), 1024 items on 2 lanes, slices of 64 vs 512 (the old one per
#: thread): mnist_cnn 184k vs 122k items/s, names_gru 49k vs 22k, mnist_resnet 78k vs 65k, mnist_inception
#: 17.1k vs 13.9k; ORT's own 2-thread pool on the whole batch 155k, 17k, 74k, 15.0k (docs/performance.md).
SLICE_ITEMS = 64

#: Slices pay only for a model whose run of SLICE_ITEMS items takes at least this long on one thread (timed
#: once per model, at warm-up or its first batch above SMALL_BATCH); any other runs every batch whole. The
#: regressions, the diabetes MLP and the hello RNNs take 3-15 us for 64 items, less than handing a slice to
#: a lane and back (in-process, diabetes_mlp 1024: 80M items/s whole, 3.3M in 16 slices); the digit models and
#: the GRU take 0.3-7 ms.
SLICE_WORTH_S = 100e-6


def device_for(device: str, card: ModelCard) -> str:
    """The device ``card``'s model runs on in a process that runs models on ``device`` (``CARD_DEVICES``)."""
    asked = card.serving.get("device", "auto")
    if asked not in CARD_DEVICES:
        raise CardError(f"{card.name}/{card.version}: bad serving value: device {asked!r}: expected one of "
                        f"{', '.join(CARD_DEVICES)} (cpu: on the CPU whatever --device says)")
    return "cpu" if asked == "cpu" else device


class ProviderError(RuntimeError):
    """``device="cuda"`` was asked for and the CUDA execution provider cannot be used."""


class OnnxModel:
    """A loaded ``model.onnx``; ``run`` is synchronous and thread-safe (ORT sessions are).

    ``intra_op_threads`` is how many CPU threads one run may use (None or 0: one per core this process may
    use): on the CPU, the slices of a batch (see SMALL_BATCH); on the GPU, ONNX Runtime's pool for the
    operators left on the CPU.
    """

    def __init__(self, path: Path, card: ModelCard, device: str = "auto", intra_op_threads: int | None = None):
        if device not in DEVICES:
            raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
        self.card = card
        self.path = Path(path)
        self._session = _create_session(self.path, card, device, intra_op_threads)
        self.provider: str = self._session.get_providers()[0]
        threads = (intra_op_threads or cores()) if self.provider == CPU else 1
        # The lane threads start at warm-up (or first use), wait idle between batches and end with the model.
        self._lanes = ThreadPoolExecutor(threads, f"ort-{card.name}") if threads > 1 else None
        self._lane_count = threads
        # Kernel errors caused by client values come back as InputError; ORT need not log them as well.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        self._inputs = {t.name: t for t in card.inputs}
        self._output_names = [t.name for t in card.outputs]
        self._slices_pay: bool | None = None  # see SLICE_WORTH_S

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise InputError naming the first tensor whose name, datatype, shape or values the card does not allow."""
        unknown = sorted(set(inputs) - set(self._inputs))
        if unknown:
            raise InputError(f"unknown input tensor {quote(unknown[0])}: expected {_describe(self.card.inputs)}")
        missing = sorted(set(self._inputs) - set(inputs))
        if missing:
            raise InputError(f"missing input tensor {missing[0]!r}: expected {_describe(self.card.inputs)}")
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        for name, array in arrays.items():
            _check_tensor(self._inputs[name], array)
        batch = {name: array.shape[0] for name, array in arrays.items()}
        if len(set(batch.values())) > 1:
            raise InputError(f"input tensors disagree on the batch size (first axis): {batch}; expected one size")
        check_task_inputs(self.card, arrays)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by the card's names. Values the model itself refuses (an index out of range, say)
        become InputError too: they came from the client."""
        feeds = dict(inputs)
        slices = self._slice_count(len(next(iter(feeds.values()))))
        try:
            if slices == 1:
                outputs = self._session.run(self._output_names, feeds, self._run_options)
            else:
                outputs = _run_in_slices(self._session, self._lanes, slices, self._output_names, feeds,
                                         self._run_options)
        except InvalidArgument as e:
            # Keep ORT's reason ("indices element out of data bounds, idx=4 must be within ...") without its
            # node names and error-code preamble.
            reason = str(e).rpartition("Status Message: ")[2].strip() or "a value is out of the model's range"
            raise InputError(f"{self.card.name}/{self.card.version} refused the input values ({reason}): expected "
                             f"values in the ranges the model was trained on (see its card)") from e
        return dict(zip(self._output_names, outputs, strict=True))

    def _slice_count(self, n: int) -> int:
        """How many slices a CPU batch of ``n`` items runs in: one per lane (each of SMALL_BATCH items or
        more), or more where that would put over SLICE_ITEMS items in one run; one for a model too cheap for
        slices to pay (SLICE_WORTH_S). The GPU runs a batch whole."""
        if self.provider != CPU or n <= SMALL_BATCH or not self._slicing_pays():
            return 1
        return max(min(self._lane_count, -(-n // SMALL_BATCH)), -(-n // SLICE_ITEMS))

    def _slicing_pays(self) -> bool:
        """Time one run of SLICE_ITEMS sample items on this thread, once (the fastest of three: the first pays
        for lazy initialization); two threads racing here both time it, and either answer will do."""
        if self._slices_pay is None:
            feeds = sample_inputs(self.card, SLICE_ITEMS)
            fastest = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                self._session.run(self._output_names, feeds, self._run_options)
                fastest = min(fastest, time.perf_counter() - start)
            self._slices_pay = fastest >= SLICE_WORTH_S
            log.debug("%s: %d items in %.0f us on one thread; slices %s", self.card.name, SLICE_ITEMS, fastest * 1e6,
                      "pay" if self._slices_pay else "do not pay")
        return self._slices_pay

    def warmup(self) -> dict[str, np.ndarray]:
        """Start every lane thread and run one tiny real-shaped batch, and one in slices (where they pay), so
        the first client does not pay for lazy initialization, a model that cannot run is found before it
        serves, and the process's thread count is settled before it serves (the executor starts a thread only
        when none is idle: all of them wait at one barrier here, so all are started). On the CPU, whether
        slices pay for this model is timed here too, not at its first large batch."""
        if self.provider == CPU:
            self._slicing_pays()
        if self._lanes is not None:
            started = threading.Barrier(self._lane_count)
            for waiting in [self._lanes.submit(started.wait) for _ in range(self._lane_count)]:
                waiting.result()
            self.run(sample_inputs(self.card, SMALL_BATCH + 1))
        return self.run(sample_inputs(self.card))


def _run_in_slices(session: ort.InferenceSession, lanes: ThreadPoolExecutor | None, slices: int,
                   output_names: list[str], feeds: dict[str, np.ndarray], run_options: ort.RunOptions
                   ) -> list[np.ndarray]:
    """The batch cut along its first axis into ``slices`` near-even slices, run side by side on ``lanes``
    (or one after another in this thread when there are none), outputs joined."""
    n = len(next(iter(feeds.values())))
    step = -(-n // slices)
    parts = ({k: v[i : i + step] for k, v in feeds.items()} for i in range(0, n, step))
    if lanes is None:
        results = [session.run(output_names, part, run_options) for part in parts]
    else:
        results = [r.result() for r in [lanes.submit(session.run, output_names, part, run_options) for part in parts]]
    return [np.concatenate(column) for column in zip(*results, strict=True)]


def sample_inputs(card: ModelCard, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Inputs of the card's shapes (dynamic axes 1) filled with ones: a valid value for every course model
    (pixel value, feature, character code 1, a names length of 1 over 1 character, hello index 1)."""
    return {
        t.name: np.ones([batch_size, *(1 if d < 0 else d for d in t.shape[1:])], dtype=t.numpy_dtype)
        for t in card.inputs
    }


def _describe(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in specs)


def _check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    expected = f"expected {spec.datatype} {list(spec.shape)} (-1: any size)"
    if array.dtype != np.dtype(spec.numpy_dtype):
        given = DATATYPE_OF.get(array.dtype, str(array.dtype))
        raise InputError(f"input {spec.name!r} has datatype {given}: {expected}")
    if len(array.shape) != len(spec.shape) or any(0 <= d != n for d, n in zip(spec.shape, array.shape, strict=True)):
        raise InputError(f"input {spec.name!r} has shape {list(array.shape)}: {expected}")
    if array.shape[0] == 0:
        raise InputError(f"input {spec.name!r} has an empty batch: expected at least one item")
    if 0 in array.shape[1:]:
        raise InputError(f"input {spec.name!r} has shape {list(array.shape)}: expected at least one element on every "
                         f"axis after the batch axis ({spec.datatype} {list(spec.shape)})")
    longest = max((n for d, n in zip(spec.shape[1:], array.shape[1:], strict=True) if d < 0), default=0)
    if longest > MAX_TEXT_LENGTH:
        # The free axes of the course models are sequence lengths, held to the domain API's text limit: a
        # recurrent model's run grows with them, and one unbounded sequence would hold the model for minutes.
        raise InputError(f"input {spec.name!r} has shape {list(array.shape)}: a sequence axis is at most "
                         f"{MAX_TEXT_LENGTH} long")
    if array.dtype.kind == "i" and array.min() < 0:
        # The integer inputs of the course models are character indices and lengths; ONNX's Gather reads a
        # negative index from the end, so -1 would answer for the last character instead of being refused.
        raise InputError(f"input {spec.name!r} has negative values: expected indices and lengths >= 0")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # A NaN would flow through the model into a confident-looking answer; the domain API refuses it too.
        raise InputError(f"input {spec.name!r} has NaN or infinite values: expected finite numbers")


def _session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    """All graph optimizations; ``intra_op_threads`` None lets ORT use one thread per physical core,
    a number bounds it.

    Spinning is off: an idle ORT worker thread otherwise busy-waits for the next run, which on a small
    machine takes the CPU the gRPC event loop and the image decoders need. Profiled on 2 cores (bench/):
    server CPU per unary request 2.47 ms with spinning, 1.05 ms without; ModelInfer 1024 63 ms -> 40 ms.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads or 0
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = 3  # errors only: quiet by default
    return so


def _create_session(path: Path, card: ModelCard, device: str, intra_op_threads: int | None) -> ort.InferenceSession:
    """``cuda``: CUDA or ProviderError; ``auto``: CUDA when a session can be created and run there, else CPU;
    ``cpu``: CPU, single-threaded (``OnnxModel`` runs large batches in slices). A session whose file the card
    does not describe is a CardError (a broken version, found at load time, not per request)."""
    if device == "cuda" or (device == "auto" and _cuda["usable"]):
        session, reason = _try_cuda(path, card, _session_options(intra_op_threads), quiet=device == "auto")
        if session is not None:
            return session
        # Whose fault: a model that fails on the CPU too (a card that does not describe its file, say) raises
        # its own error here, and CUDA stays usable for the others.
        cpu = _cpu_session(path, card)
        cpu.run(None, sample_inputs(card))
        if device == "cuda":
            raise ProviderError(f"device 'cuda': {CUDA} cannot be used for {path}: {reason}")
        _fall_back_once(reason)
        return cpu
    return _cpu_session(path, card)


def _cpu_session(path: Path, card: ModelCard) -> ort.InferenceSession:
    """A single-threaded CPU session of ``path``, checked against ``card``."""
    return _check_card(ort.InferenceSession(str(path), _session_options(1), providers=[CPU]), card)


#: A card's datatype as ONNX Runtime names a tensor's type
ORT_TYPES = {"FP32": "tensor(float)", "FP64": "tensor(double)", "INT64": "tensor(int64)", "INT32": "tensor(int32)",
             "UINT8": "tensor(uint8)"}


def _check_card(session: ort.InferenceSession, card: ModelCard) -> ort.InferenceSession:
    """``session``, unless the card does not describe its file: its tensors' names and datatypes (CardError)."""
    have_in = sorted(i.name for i in session.get_inputs())
    have_out = sorted(o.name for o in session.get_outputs())
    want_in, want_out = sorted(t.name for t in card.inputs), sorted(t.name for t in card.outputs)
    if have_in != want_in or have_out != want_out:
        raise CardError(f"{card.name}/{card.version}: model.onnx has inputs {have_in} and outputs {have_out}; "
                        f"the card lists {want_in} and {want_out}")
    types = {t.name: t.type for t in (*session.get_inputs(), *session.get_outputs())}
    wrong = [f"{t.name} is {types[t.name]}, the card says {t.datatype}" for t in (*card.inputs, *card.outputs)
             if types[t.name] != ORT_TYPES[t.datatype]]
    if wrong:
        raise CardError(f"{card.name}/{card.version}: in model.onnx {'; '.join(wrong)}")
    return session


# ``auto`` gives up on CUDA for the whole process after one failure that was CUDA's (the model runs on the
# CPU): if CUDA cannot serve one model it is unlikely to serve the next, and one log line says so.
_cuda_lock = threading.Lock()
_cuda = {"usable": True, "preloaded": False}


def _try_cuda(path: Path, card: ModelCard, so: ort.SessionOptions, quiet: bool
              ) -> tuple[ort.InferenceSession | None, str]:
    """A CUDA session that has run the card's sample batch, or None and why not.

    Three ways CUDA fails, each found its own way: ORT falls back to CPU itself, logging an error, when the
    provider library cannot load (the providers it ends up with tell); an error while the session
    initializes (cuDNN or cuBLAS handles, GPU memory for the weights) is one of ORT's own exception classes,
    which are no RuntimeError, so ORT's fallback lets it through (caught here); and onnxruntime-gpu 1.31
    loads cuDNN only when a kernel needs it, so without cuDNN the session is created on CUDA and its first
    convolution or GRU fails ("cuDNN is not available"; the sample batch finds it).
    """
    if CUDA not in ort.get_available_providers():
        return None, "this onnxruntime build has no CUDA support (install onnxruntime-gpu)"
    with _cuda_lock:
        _preload_cuda_libraries()
        if quiet:
            ort.set_default_logger_severity(4)  # our one fallback line replaces ORT's multi-line error
        try:
            session = ort.InferenceSession(str(path), so, providers=[(CUDA, CUDA_PROVIDER_OPTIONS), CPU])
            if session.get_providers()[0] != CUDA:
                return None, "no usable NVIDIA GPU, or the CUDA 13 / cuDNN 9 libraries are missing"
            # Under the lock, so concurrent loads take turns here: a tiny batch, once per model version.
            _check_card(session, card).run(None, sample_inputs(card))
        except Exception as e:  # noqa: BLE001 - any failure on CUDA is a reason to say, and for auto to use CPU
            return None, one_line(e)
        finally:
            ort.set_default_logger_severity(3)  # errors only: quiet by default
    return session, ""


#: The NVIDIA driver's control device: on a host (or container) without it there is no GPU to miss.
NVIDIA_DEVICE = Path("/dev/nvidiactl")


def _fall_back_once(reason: str) -> None:
    """One line for the process. A warning where a GPU is there and CUDA still failed (libraries missing); on a
    host without one, CPU is what ``auto`` means, so every batch run and start there said it at info only."""
    with _cuda_lock:
        if not _cuda["usable"]:
            return
        _cuda["usable"] = False
    log.log(
        logging.WARNING if NVIDIA_DEVICE.exists() else logging.INFO,
        "device auto: %s not available (%s); running on %s. Use --device cuda to see onnxruntime's error.",
        CUDA, reason, CPU, extra={"provider": CPU, "reason": reason},
    )


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels when ORT offers it (1.21+): without torch in the
    process nothing else puts them on the loader's path. Harmless when they are installed system-wide.
    Called under ``_cuda_lock``."""
    if _cuda["preloaded"] or not hasattr(ort, "preload_dlls"):
        return
    _cuda["preloaded"] = True
    try:
        ort.preload_dlls()
    except Exception as e:  # noqa: BLE001 - preloading only helps; creating the session decides
        log.debug("onnxruntime.preload_dlls failed: %s", e)
