"""serving.heap: large requests stop faulting their memory in anew, counted in page faults (never in time).

Each check runs in a fresh process, so glibc's malloc starts from its own defaults there: what the
server's first request meets. The server-level test sends real 1024-image ModelInfer requests to two
servers, one with ``--keep-heap false``, and reads each one's minor page faults from /proc.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving.card import ModelCard
from serving.heap import OPERATOR_VARIABLES
from tests.conftest import REPO_ROOT, ServerProcess, digits_models

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/stat").exists(),
                                reason="glibc's malloc settings and Linux's /proc page-fault counts")

#: What a 1024-image raw request leaves live at once in the server: a few 3.2 MB copies (gRPC's buffer,
#: the message bytes, protobuf's parse, the tensor), all freed when the call ends.
WORKLOAD = """
import json, resource, sys
from serving.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def call():
    live = [bytearray(3_211_264) for _ in range(4)]
    for b in live:
        b[::4096] = b"x" * len(b[::4096])  # touch every page, as a copy into it does
for _ in range(5):
    call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    call()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def workload(mode: str, env: dict[str, str] | None = None) -> dict:
    """The workload's page faults in a fresh process, with glibc's defaults unless ``env`` says otherwise."""
    clean = {k: v for k, v in os.environ.items() if k not in OPERATOR_VARIABLES and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True,
                          cwd=REPO_ROOT, env={**clean, **(env or {})})
    return json.loads(done.stdout)


def test_kept_heap_stops_large_blocks_faulting_in_anew() -> None:
    glibc, kept = workload("glibc"), workload("keep")
    assert kept["kept"] is True
    pages = 40 * 4 * 3_211_264 // 4096  # every page of every call, faulted in again
    assert glibc["faults"] > pages // 2, glibc  # glibc's defaults give the memory back after each call
    assert kept["faults"] < pages // 20, kept


def test_the_operators_malloc_variables_win() -> None:
    result = workload("keep", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert result["kept"] is False


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_server_keeps_the_memory_of_large_requests(exported_repo: Path,
                                                   start_server: Callable[..., ServerProcess]) -> None:
    names = digits_models(exported_repo)
    if not names:
        pytest.skip("no digits model exported")
    card = ModelCard.load(max((exported_repo / names[0]).iterdir(), key=lambda v: int(v.name)))
    x = np.random.default_rng(0).random((1024, 1, 28, 28), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=card.name)
    request.inputs.add(name=card.inputs[0].name, datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    faults = {}
    for keep in ("true", "false"):
        proc = start_server(exported_repo, "--keep-heap", keep, "--poll-interval-s", "0")
        with grpc.insecure_channel(proc.target, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            for _ in range(5):
                infer(request, timeout=60)
            before = _minor_faults(proc.proc.pid)
            for _ in range(20):
                assert len(infer(request, timeout=60).raw_output_contents[0]) == 1024 * 10 * 4
            faults[keep] = (_minor_faults(proc.proc.pid) - before) / 20
    pages = x.nbytes // 4096  # one copy of the request faulted in again per call
    # Kept: 4-233 faults per call seen across servers, the rest all in gRPC's event-engine threads, whose own
    # malloc arenas unmap a heap once it is wholly free, whatever the trim threshold (perf; docs/performance.md).
    assert faults["true"] < pages / 2 < faults["false"], faults
