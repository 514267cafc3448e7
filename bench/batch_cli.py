"""``coursezoo batch`` on a folder of PNGs, locally and through the server, against in-process ORT.

The batch CLI runs as users run it (a subprocess, default workers and batch size); its throughput is the
one it prints itself (timed from its first item, so interpreter start and model load are left out; the
command's whole wall time goes into the note). The baseline is ONNX Runtime fed the same images already
decoded and normalized, in the CLI's batch size: what is left between the two is decoding and plumbing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import data
from bench.data import REPO_ROOT
from bench.exports import Export
from bench.inprocess import ort_session
from bench.stats import Result, summarize, time_calls

CLI_BATCH = 256  # `coursezoo batch --batch-size` default
_THROUGHPUT = re.compile(r"throughput\s+([\d,.]+) items/s \((\d+) in [\d.]+ s\)")


def write_pngs(folder: Path, n: int) -> None:
    """``n`` MNIST test images as PNG files (cycling through the 10,000)."""
    for i, blob in enumerate(data.pngs(n)):
        (folder / f"{i:05d}.png").write_bytes(blob)


def run_cli(export: Export, folder: Path, n: int, where: list[str], label: str, key: str) -> Result:
    """One ``coursezoo batch`` run; ``where`` is ``--local --repo R`` or ``--server HOST:PORT``."""
    out = folder.parent / f"{label}.csv"
    cmd = [sys.executable, "-m", "coursezoo", "batch", str(folder), "--model", export.name, "--out", str(out),
           "--overwrite", *where]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    wall = time.perf_counter() - start
    measured = throughput(proc.stdout)
    if proc.returncode != 0 or not measured:
        output = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"coursezoo batch {label} failed ({proc.returncode}):\n{output}")
    items, seconds = measured
    if items != n:
        raise RuntimeError(f"coursezoo batch {label} classified {items} of {n} images")
    return summarize(key, "batch-cli", f"coursezoo batch {label}", export.name, batch=CLI_BATCH, concurrency=1,
                     items=items, seconds=seconds, latencies_s=[],
                     note=f"command wall {wall:.1f} s incl. start-up and model load")


def throughput(summary: str) -> tuple[int, float] | None:
    """Items and seconds from the batch CLI's rate line, "throughput    21,052.6 items/s (2000 in 0.09 s)", or
    None without one. The seconds follow from the rate: the printed ones are rounded to 10 ms, and 2,000 PNGs
    in 0.09 or 0.10 s would be 22,222 or 20,000 items/s."""
    match = _THROUGHPUT.search(summary)
    if match is None:
        return None
    items, rate = int(match.group(2)), float(match.group(1).replace(",", ""))
    return items, items / rate if rate else 0.0


def ort_decoded(export: Export, n: int, provider: str) -> Result:
    """In-process ORT over the same ``n`` images, decoded and normalized beforehand, ``CLI_BATCH`` per call."""
    prep = export.card.preprocessing
    x = data.digit_tensors(n, prep["mean"], prep["std"])
    session = ort_session(export, provider)
    name = export.card.inputs[0].name
    chunks = [x[i:i + CLI_BATCH] for i in range(0, n, CLI_BATCH)]
    state = {"i": 0}

    def call() -> None:
        session.run(None, {name: chunks[state["i"] % len(chunks)]})
        state["i"] += 1

    t = time_calls(call, seconds=0.0, warmup=2, min_calls=len(chunks), max_calls=len(chunks))
    return summarize(f"batchcli/ort-decoded/{export.name}/n{n}", "batch-cli", "in-process ORT, decoded tensors",
                     export.name, batch=CLI_BATCH, concurrency=1, items=n, seconds=t.wall, latencies_s=t.latencies,
                     model_cpu_s=t.cpu, note=provider.removesuffix("ExecutionProvider"))


class PngFolder:
    """A temporary folder of ``n`` PNGs, removed on exit."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._tmp = tempfile.TemporaryDirectory(prefix="coursezoo-bench-pngs-")
        self.path = Path(self._tmp.name) / "pngs"

    def __enter__(self) -> PngFolder:
        self.path.mkdir()
        write_pngs(self.path, self.n)
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()
