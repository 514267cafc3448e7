"""Start and stop the PyTriton peer (``bench/pytriton_app.py``) under its own Python 3.12 interpreter.

The peer is Triton as PyTriton runs it, not Triton's ONNX Runtime backend: ``PATH`` is what each batch goes
through, and the report names the peer "PyTriton (Python backend)" for it.

PyTriton bundles a Triton server built against Python 3.12, so it lives in a separate virtual environment
(``bench/peer-venv.sh`` makes ``.bench-venv312``; ``COURSEZOO_BENCH_PEER_PYTHON`` points elsewhere). That
interpreter's ``lib/`` folder must be on ``LD_LIBRARY_PATH`` for Triton's Python backend stub. When the
interpreter or the package is missing, ``find_python`` says why and the harness skips the peer's rows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.data import REPO_ROOT
from bench.exports import Export
from bench.processes import stop_group
from serving.process import ChildServer
from serving.runtime import CUDA_PROVIDER_OPTIONS, SESSION_CONFIG

DEFAULT_PYTHON = REPO_ROOT / ".bench-venv312" / "bin" / "python"
APP = Path(__file__).resolve().parent / "pytriton_app.py"
#: What a request to the peer goes through (Triton's Python backend, as PyTriton binds a Python callable)
PATH = ("tritonserver -> its Python backend stub -> the PyTriton app's process (bench/pytriton_app.py) -> "
        "ONNX Runtime")


def find_python() -> tuple[Path | None, str]:
    """The peer's interpreter and, when it cannot be used, the reason (printed as the skip note)."""
    python = Path(os.environ.get("COURSEZOO_BENCH_PEER_PYTHON", DEFAULT_PYTHON))
    if not python.exists():
        return None, f"PyTriton peer skipped: no interpreter at {python} (run bench/peer-venv.sh)"
    probe = ("import pytriton, onnxruntime, importlib.metadata as m; "
             "print('nvidia-pytriton', m.version('nvidia-pytriton') + ', onnxruntime', onnxruntime.__version__)")
    check = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        return None, f"PyTriton peer skipped: {python} cannot import pytriton/onnxruntime (run bench/peer-venv.sh)"
    return python, check.stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonPeer(ChildServer):
    """``with TritonPeer(python, export, ...) as peer: peer.target`` is Triton's gRPC address.

    Started as CourseZoo's own server is, in its own session, but ready once its ready file is written:
    Triton's log shares stdout, and the app writes the file once the model is loaded.
    """

    what = "the PyTriton peer"

    def __init__(self, python: Path, export: Export, *, max_batch_size: int, max_queue_delay_ms: float,
                 device: str = "cpu", timeout: float = 180.0) -> None:
        self.ports = [_free_port() for _ in range(3)]
        self._tmp = tempfile.TemporaryDirectory(prefix="coursezoo-bench-peer-")
        self.ready_file = Path(self._tmp.name) / "ready"
        card = export.card
        args = [str(python), str(APP), "--onnx", str(export.onnx), "--name", export.name,
                "--input", card.inputs[0].name, "--input-shape", ",".join(map(str, card.inputs[0].shape[1:])),
                "--output", card.outputs[0].name,
                "--output-shape", ",".join(map(str, card.outputs[0].shape[1:])),
                "--max-batch-size", str(max_batch_size),
                "--max-queue-delay-us", str(int(max_queue_delay_ms * 1000)), "--device", device,
                "--grpc-port", str(self.ports[0]), "--http-port", str(self.ports[1]),
                "--metrics-port", str(self.ports[2]), "--ready-file", str(self.ready_file),
                # ONNX Runtime configured as CourseZoo's server configures it: the comparison is of the
                # serving stacks, not of an ORT setting (spinning threads cost the peer ~20% on 2 cores)
                "--session-config", json.dumps(SESSION_CONFIG),
                "--cuda-options", json.dumps(CUDA_PROVIDER_OPTIONS)]
        libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        env = {**os.environ,
               "LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)}
        super().__init__(args, env=env, cwd=REPO_ROOT, timeout=timeout, new_session=True)
        self.target = f"127.0.0.1:{self.ports[0]}"
        self.provider = ""

    def start(self) -> TritonPeer:
        super().start()
        self.provider = self.ready_file.read_text(encoding="utf-8")
        return self

    def _ready(self, wait: float) -> bool:
        if self.ready_file.exists():
            return True
        time.sleep(wait)
        return False

    @property
    def pgid(self) -> int:
        """The peer's process group: PyTriton's proxy, tritonserver and its Python backend stubs."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop the whole group, PyTriton's proxy, tritonserver and its Python backend stubs: SIGTERM, then
        SIGKILL after ``timeout`` (``stop_group``; ``sig`` is not used)."""
        assert self.proc is not None
        stop_group(self.proc, grace=timeout)
        self._tmp.cleanup()
        return self.proc.returncode
