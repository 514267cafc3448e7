"""What the numbers were measured on: hardware, software versions, and what else was using the machine.

Benchmark numbers are only as good as their context, so every run records the CPU, cores, memory, GPU,
package versions, and the load average plus the busiest other processes at its start and end.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("onnxruntime-gpu", "onnxruntime", "grpcio", "protobuf", "numpy", "Pillow", "torch", "tritonclient")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs as nvidia-smi reports them (empty without a driver)."""
    if not shutil.which("nvidia-smi"):
        return []
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, check=False)
    rows = [line.split(", ") for line in proc.stdout.strip().splitlines() if proc.returncode == 0]
    return [{"name": r[0], "memory": r[1], "driver": r[2]} for r in rows if len(r) == 3]


def versions() -> dict[str, str]:
    """Installed distributions, and the onnxruntime module actually imported: on a GPU host the harness runs
    an unpacked onnxruntime-gpu from ``PYTHONPATH`` (bench/gpu.sh) over an installed CPU build, whose
    metadata alone would name the wrong version."""
    import onnxruntime

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["onnxruntime (imported)"] = (f"{onnxruntime.__version__} from {Path(onnxruntime.__file__).parent}, "
                                       f"{', '.join(onnxruntime.get_available_providers())}")
    return found


def _cpu_ticks() -> dict[int, int]:
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks


def busy_processes(window_s: float = 0.3, limit: int = 5) -> list[str]:
    """Other processes that used >= 5% of a core over the last ``window_s`` seconds, busiest first."""
    before = _cpu_ticks()
    time.sleep(window_s)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    rows = []
    for pid, ticks in after.items():
        share = (ticks - before.get(pid, ticks)) / hz / window_s * 100
        if pid != os.getpid() and share >= 5.0:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            rows.append((share, f"{share:.0f}% {cmd[:100]}"))
    return [text for _, text in sorted(rows, reverse=True)[:limit]]


def snapshot() -> dict[str, Any]:
    """The load on the machine now: load average and the busiest other processes."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy_processes()}


def describe() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": _cpu_model(), "cores": cores, "memory_gib": _memory_gib(), "gpus": gpus(),
            "os": platform.platform(), "hostname": platform.node()}


def run_record(started: datetime, at_start: dict[str, Any]) -> dict[str, Any]:
    """The keys every results file starts with: its schema, when the run started and how long it took, the
    machine (with its load at the start, ``snapshot()`` then, and now) and the versions measured."""
    return {"schema": 1, "started": started.isoformat(timespec="seconds"),
            "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
            "machine": {**describe(), "at_start": at_start, "at_end": snapshot()}, "versions": versions()}
