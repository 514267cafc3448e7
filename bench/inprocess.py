"""In-process baselines: what each model costs with no transport at all, on the inputs the server gets.

PyTorch eager (the course's module, ``eval()`` + ``no_grad``), TorchScript (the exported ``model.pt``)
and ONNX Runtime (the exported ``model.onnx``: CPU EP, and CUDA EP with and without IO binding when a GPU
is there), at the batch sizes the issue names. These rows are the denominators of the server's ratios.
torch is imported lazily, only here, so the rest of the harness (and the load generators) stay light.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import data
from bench.exports import Export
from bench.stats import Result, summarize, time_calls
from serving.preprocess import decode_digit, encode_names

log = logging.getLogger("coursezoo.bench")

BATCH_SIZES = (1, 64, 1024)
#: the path name of the server's own runtime (``serving.runtime.OnnxModel``) on the CPU
RUNTIME_CPU = "CourseZoo runtime CPU"
EAGER_CUDA = "PyTorch eager CUDA"
IO_BINDING = "ORT CUDA IO binding"
#: what the IO-binding row measures, wherever it or a ratio of it is shown: it is no reachable serving speed
DEVICE_RESIDENT = ("a device-resident ceiling (inputs uploaded once, outputs left on the GPU) that no "
                   "numpy-in/numpy-out consumer, the server included, can reach")
#: What each CUDA row's timed call includes, in its note: the rows differ in what they copy and how they round,
#: and a reader comparing them must not have to read this file to know.
CUDA_NOTES = {
    "ORT CUDA": "numpy in and out: inputs copied to the GPU and outputs back on every call",
    IO_BINDING: DEVICE_RESIDENT,
    EAGER_CUDA: "inputs placed on the GPU before timing, output copied back to the host on every call; full FP32 "
                "(torch's TF32 off for conv, RNN and matmul, as the server's ORT CUDA sessions run)",
}
#: binds one batch of inputs and returns the call that is timed
Bind = Callable[[dict[str, np.ndarray]], Callable[[], object]]
#: the repository root: `coursezoo train`'s default runs folder is found under it, wherever the bench runs from
REPO_ROOT = Path(__file__).resolve().parents[1]


#: At most this many items are held for one path's distinct batches: batch sizes past 1024 (a GPU run's search
#: for the best one) cycle through fewer batches rather than hold gigabytes
DISTINCT_ITEMS = data.DISTINCT * 1024


def inputs(export: Export, n: int, i: int = 0) -> dict[str, np.ndarray]:
    """Batch ``i`` of ``n`` real held-out items for ``export`` (items ``i * n`` on), as the tensors its card
    names: the items of the load generator's request ``i`` of that size."""
    names = [t.name for t in export.card.inputs]
    if export.task == "digits":
        prep = export.card.preprocessing
        return {names[0]: data.digit_tensors(n, prep["mean"], prep["std"], start=i * n)}
    if export.task == "diabetes":
        rows = data.diabetes_records()
        return {names[0]: rows[(np.arange(n) + i * n) % len(rows)]}
    texts = data.cycle(data.names(), n, start=i * n)
    chars, lengths = encode_names(texts, export.card.preprocessing["vocab_size"])  # card.check requires it
    return {names[0]: chars, names[1]: lengths}


def distinct_inputs(export: Export, n: int) -> list[dict[str, np.ndarray]]:
    """The batches of ``n`` items a path cycles through while it is timed: the load generator's
    ``data.DISTINCT`` (fewer past ``DISTINCT_ITEMS``), so an in-process row and a server row of the same batch
    size run the same items (batch 1 on one name alone was its shortest, 'Abl': 46 µs a run against 75 µs
    for a 7-letter name)."""
    count = data.DISTINCT if n * data.DISTINCT <= DISTINCT_ITEMS else max(1, DISTINCT_ITEMS // n)
    return [inputs(export, n, i) for i in range(count)]


def ort_session(export: Export, provider: str) -> ort.InferenceSession:
    """A plain session with ORT's defaults (what a user of the ONNX file gets); CUDA with the server's options.

    Refused (RuntimeError) unless it really runs on ``provider``: when the CUDA provider cannot be created, ORT
    logs an error and makes the session on the CPU, and its rows would be CPU numbers labelled CUDA."""
    if provider == "CUDAExecutionProvider":
        from serving.runtime import CUDA_PROVIDER_OPTIONS

        ort.preload_dlls()
        session = ort.InferenceSession(str(export.onnx), providers=[(provider, CUDA_PROVIDER_OPTIONS)])
    else:
        session = ort.InferenceSession(str(export.onnx), providers=[provider])
    if (got := session.get_providers()[0]) != provider:
        raise RuntimeError(f"ONNX Runtime made the session on {got}, not {provider} (the provider could not be "
                           "created, e.g. no GPU or CUDA libraries missing): its rows would be mislabelled")
    return session


def cuda_available(export: Export) -> bool:
    """Whether ONNX Runtime here really runs on an NVIDIA GPU: the server's own provider choice decides.

    torch, when installed, is imported first: its CUDA libraries must be loaded before ONNX Runtime's
    ``preload_dlls()`` loads the ones it finds. The other way round torch binds to ORT's cuDNN and refuses
    it when that is older than torch's own build (seen on the GPU host: torch built with cuDNN 9.19, the
    host's nvidia wheel 9.14), and every PyTorch CUDA row fails.
    """
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    from serving.runtime import OnnxModel

    return OnnxModel(export.onnx, export.card, device="auto").provider == "CUDAExecutionProvider"


def ort_paths(export: Export, cuda: bool) -> dict[str, Bind]:
    """Path name -> a factory that binds a batch and returns the call to time.

    Beside plain ORT, the server's own runtime on the CPU (``serving.runtime.OnnxModel``: single-threaded
    runs, large batches in cache-sized slices on one lane per core): its rows tell how much of a server row's
    ratio to plain ORT comes from how the model runs rather than from the transport."""
    from serving.runtime import OnnxModel

    cpu = ort_session(export, "CPUExecutionProvider")
    runtime = OnnxModel(export.onnx, export.card, device="cpu")
    paths: dict[str, Bind] = {
        "ORT CPU": lambda feeds: lambda: cpu.run(None, feeds),
        RUNTIME_CPU: lambda feeds: lambda: runtime.run(feeds),
    }
    return {**paths, **(ort_cuda_paths(export) if cuda else {})}


def ort_cuda_paths(export: Export) -> dict[str, Bind]:
    """Plain ORT on CUDA (numpy in and out) and with IO binding; RuntimeError when ORT is not on CUDA."""
    gpu = ort_session(export, "CUDAExecutionProvider")

    def bound(feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        binding = gpu.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for out in export.card.outputs:
            binding.bind_output(out.name, "cuda")
        return lambda: gpu.run_with_iobinding(binding)

    return {"ORT CUDA": lambda feeds: lambda: gpu.run(None, feeds), IO_BINDING: bound}


def torch_paths(export: Export, cuda: bool) -> tuple[dict[str, Bind], str]:
    """PyTorch eager and TorchScript calls, and a note on where the eager weights came from."""
    import torch

    from training.catalog import CATALOG, CHECKPOINT, DEFAULT_RUNS
    from training.models import build

    names = [t.name for t in export.card.inputs]
    paths: dict[str, Bind] = {}
    note = ""
    if export.name in CATALOG:
        model = build(CATALOG[export.name])
        ckpt = REPO_ROOT / DEFAULT_RUNS / export.name / CHECKPOINT
        if ckpt.is_file():
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        else:  # speed does not depend on the weights' values; say so rather than skip the row
            note = f"eager weights untrained (no {ckpt.relative_to(REPO_ROOT)})"
        model.eval()
        paths["PyTorch eager"] = _torch_call(model, names, "cpu")
        if cuda and torch.cuda.is_available():
            paths[EAGER_CUDA] = _torch_call(copy.deepcopy(model).to("cuda"), names, "cuda")
    if export.torchscript.is_file():
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated upstream; the export still ships model.pt
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(str(export.torchscript), map_location="cpu")
        except RuntimeError as e:  # e.g. an older torch than the exporter's (the GPU hosts' own torch)
            log.warning("TorchScript row of %s skipped: torch %s cannot load %s: %s", export.name,
                        torch.__version__, export.torchscript, str(e).splitlines()[0])
        else:
            paths["TorchScript"] = _torch_call(scripted, names, "cpu")
    return paths, note


def _torch_call(module: Any, names: list[str], device: str) -> Bind:
    """A torch module (eager or scripted) called on the batch's tensors. On CUDA the inputs are placed on the GPU
    before timing, and the output is copied back to the host in the timed call (which also waits for the GPU), as
    a numpy-in/numpy-out consumer such as the server needs it, and as the plain ORT CUDA row pays."""
    import torch

    def bind(feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        args = [torch.from_numpy(feeds[n]).to(device) for n in names]

        def call() -> object:
            with torch.no_grad():
                out = module(*args)
            return out.cpu() if device == "cuda" else out

        return call

    return bind


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """torch's CUDA convolutions, RNNs and matmuls in full FP32 for the block, their settings restored after.

    torch defaults cuDNN convolutions and RNNs to TF32 (10-bit mantissas), while the server's ORT CUDA sessions
    turn TF32 off (``serving.runtime.CUDA_PROVIDER_OPTIONS``): the eager CUDA row would otherwise do cheaper
    arithmetic than the ORT rows beside it. Only torch's per-operator ``fp32_precision`` switches are set (its
    ``allow_tf32`` flags are deprecated, and torch refuses to read them while the two APIs disagree)."""
    import torch

    switches = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
    before = [s.fp32_precision for s in switches]
    for s in switches:
        s.fp32_precision = "ieee"
    try:
        yield
    finally:
        for s, precision in zip(switches, before, strict=True):
            s.fp32_precision = precision


def run(exports: list[Export], *, seconds: float, warmup: int, min_calls: int, cuda: bool,
        batch_sizes: tuple[int, ...] = BATCH_SIZES) -> tuple[list[Result], list[str]]:
    """Every path x model x batch size, and a note for each path that failed (its other rows still count);
    without torch installed only the ONNX Runtime rows are measured. ORT CUDA rows whose session is not on CUDA
    are not measured at all, and say why.

    Failures are caught as ``Exception``: onnxruntime's own (``Fail``, ``EPFail``, ``InvalidArgument``, ... from
    ``onnxruntime.capi.onnxruntime_pybind11_state``, e.g. CUDA out of memory at a large batch size) are not
    RuntimeErrors."""
    results: list[Result] = []
    failed: dict[str, str] = {}  # "path model" -> why
    for export in exports:
        try:
            paths = ort_paths(export, cuda=False)
        except Exception as e:  # noqa: BLE001 - the other models' rows still count
            failed[f"ONNX Runtime {export.name}"] = f"session creation: {_first_line(e)}"
            log.warning("in-process ONNX Runtime sessions of %s failed: %s", export.name, e)
            continue
        if cuda:
            try:
                paths |= ort_cuda_paths(export)
            except Exception as e:  # noqa: BLE001 - the CPU rows still count
                failed[f"ORT CUDA (and {IO_BINDING}) {export.name}"] = f"session creation: {_first_line(e)}"
                log.warning("in-process ORT CUDA rows of %s not measured: %s", export.name, e)
        weights = ""
        try:
            torch_rows, weights = torch_paths(export, cuda)
            paths = {**torch_rows, **paths}
        except ImportError as e:
            log.warning("PyTorch baselines skipped (%s): install the train extra to measure them", e)
        for bs in batch_sizes:
            feeds = distinct_inputs(export, bs)
            for path, bind in paths.items():
                if f"{path} {export.name}" in failed:
                    continue
                note = "; ".join(n for n in (weights if path.startswith("PyTorch") else "", CUDA_NOTES.get(path))
                                 if n)
                try:
                    with full_fp32() if path == EAGER_CUDA else contextlib.nullcontext():
                        results.append(measure(export, path, bind, feeds, seconds=seconds, warmup=warmup,
                                               min_calls=min_calls, note=note))
                except Exception as e:  # noqa: BLE001 - one broken runtime (a CUDA library mismatch, memory
                    # running out at a large batch) must not hide the rest
                    failed[f"{path} {export.name}"] = f"batch {bs}: {_first_line(e)}"
                    log.warning("in-process %s on %s failed at batch %d: %s", path, export.name, bs, e)
    return results, [f"in-process {what} failed at {why}" for what, why in failed.items()]


def _first_line(e: Exception) -> str:
    """An exception's first line (onnxruntime's carry the whole stack of the failed call), or its type's name."""
    return next(iter(str(e).splitlines()), type(e).__name__)


def measure(export: Export, path: str, bind: Bind, feeds: list[dict[str, np.ndarray]], *, seconds: float,
            warmup: int, min_calls: int, note: str = "", prefix: str = "inproc", case: str | None = None) -> Result:
    """One path on batches of one size, called back to back, each call on the next of ``feeds`` (in a cycle):
    the row keyed ``<prefix>/<path>/<model>/b<batch>``."""
    bs = len(next(iter(feeds[0].values())))
    t = time_calls(cycling([bind(f) for f in feeds]), seconds=seconds, warmup=warmup, min_calls=min_calls)
    return summarize(f"{prefix}/{path_key(path)}/{export.name}/b{bs}", "in-process", case or path, export.name,
                     batch=bs, concurrency=1, items=bs * len(t.latencies), seconds=t.wall, latencies_s=t.latencies,
                     model_cpu_s=t.cpu, note=note)


def cycling(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One call that makes each of ``calls`` in turn, round and round: the inputs change from call to call
    inside the timed loop, as the server's requests do, at the cost of one ``next()``."""
    turns = itertools.cycle(calls)
    return lambda: next(turns)()


def path_key(path: str) -> str:
    """A path's name as it appears in row keys: "ORT CUDA IO binding" -> "ort-cuda-io-binding"."""
    return path.lower().replace(" ", "-")


def decode_cost(export: Export, *, seconds: float) -> Result:
    """One core decoding PNGs with the server's own rule (``serving.preprocess.decode_digit``).

    Not a server path: it bounds what any PNG path can reach per core, which explains the server's
    batched-PNG and batch-CLI rows.
    """
    images = data.pngs(256)
    prep = export.card.preprocessing
    state = {"i": 0}

    def call() -> None:
        decode_digit(images[state["i"] % len(images)], prep)
        state["i"] += 1

    t = time_calls(call, seconds=seconds, warmup=10)
    return summarize(f"inproc/decode-png/{export.name}", "in-process", "decode PNG (serving.preprocess)", export.name,
                     batch=1, concurrency=1, items=len(t.latencies), seconds=t.wall, latencies_s=t.latencies,
                     model_cpu_s=t.cpu, note="one core, no inference")
