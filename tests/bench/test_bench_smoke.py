"""Smoke test of ``coursezoo bench --quick``: it runs end to end and its JSON has the promised shape.

Only the shape is checked, never a number: wall-clock thresholds would make CI flaky on a shared
machine, and the targets are reported by the harness, not enforced by tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import h2load
from tests.conftest import DATA_MIRROR, EXPORTED, REPO_ROOT, digits_models

RESULT_FIELDS = {"key": str, "group": str, "case": str, "model": str, "batch": int, "concurrency": int, "items": int,
                 "calls": int, "seconds": float, "throughput": float, "note": str}
OPTIONAL_FLOATS = ("p50_ms", "p90_ms", "p99_ms", "model_cpu_ms", "client_cpu_ms")
GROUPS = {"in-process", "server", "oip", "batch-cli", "peer"}


def test_quick_run_writes_the_promised_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "COURSEZOO_DATA_MIRROR": str(DATA_MIRROR)}
    proc = subprocess.run([sys.executable, "-m", "coursezoo", "bench", "--quick", "--repo", str(EXPORTED),
                           "--workers", "3", "--json", str(out)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "items/s" in proc.stdout  # the printed table
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()

    assert {"schema", "started", "duration_s", "machine", "versions", "settings", "groups", "results", "ratios",
            "targets", "best_batch", "notes", "errors"} <= report.keys()
    for group in report["groups"]:
        assert {"name", "seconds", "before", "after"} <= group.keys()
        assert {"loadavg", "busy_processes"} <= group["before"].keys()
    assert report["errors"] == []
    assert {"cpu", "cores", "memory_gib", "gpus", "at_start", "at_end"} <= report["machine"].keys()
    assert {"python", "onnxruntime-gpu", "grpcio", "numpy"} <= report["versions"].keys()
    assert {"quick", "device", "cases", "models", "plan", "server", "command"} <= report["settings"].keys()

    keys = [r["key"] for r in report["results"]]
    assert len(keys) == len(set(keys)), "result keys must be unique: ratios refer to them"
    for row in report["results"]:
        for name, kind in RESULT_FIELDS.items():
            assert isinstance(row[name], kind), (row["key"], name, row[name])
        for name in OPTIONAL_FLOATS:
            assert row[name] is None or isinstance(row[name], float), (row["key"], name)
        assert row["group"] in GROUPS
        assert row["items"] > 0 and row["seconds"] > 0
        if row["group"] in ("server", "oip"):  # from the load generator, which counts its connections
            assert isinstance(row["connections"], int) and row["connections"] >= 1, row["key"]

    groups = {r["group"] for r in report["results"]}
    expected = {"in-process", "server"} | ({"oip", "batch-cli"} if digits_models(EXPORTED) else set())
    assert expected <= groups, f"groups measured: {sorted(groups)}"
    if digits_models(EXPORTED):  # each server variant (one setting changed) has its rows beside the default's
        variants = {"server-off", "server-thread", "server-inline", "server-glibcheap", "server-nopool",
                    "server-workers3", "server-delay0"}  # --workers 3, --max-queue-delay-ms 0
        assert variants | {f"{v}-baseline" for v in variants} <= {key.split("/")[0] for key in keys}
        # the transport target's parts, measured in turn
        for part in ("inturn/inproc/ort-cpu/", "inturn/inproc/coursezoo-runtime-cpu/", "inturn/modelinfer-raw/",
                     "inturn/modelinfer-shm/"):
            assert any(key.startswith(part) for key in keys), part

    # every declared ratio is there; each whose groups all ran has a value (a misspelled key or a lost row would
    # otherwise drop a ratio without a word)
    ran = set(report["settings"]["cases"]) | ({"h2load"} if h2load.find()[0] else set())
    assert any(ratio["value"] is not None for ratio in report["ratios"])
    for ratio in report["ratios"]:
        assert {"name", "value", "unit", "target", "met", "numerator", "denominator", "needs", "not_run",
                "note"} <= ratio.keys()
        if set(ratio["needs"]) <= ran:
            assert ratio["value"] is not None, ratio
            assert ratio["numerator"]["key"] in keys and ratio["denominator"]["key"] in keys
        else:
            assert ratio["value"] is None and ratio["not_run"] and ratio["note"].startswith("not measured"), ratio
    for target in report["targets"]:
        assert {"name", "key", "metric", "op", "threshold", "measured", "met"} <= target.keys()
    inproc = {(r["model"], r["case"]) for r in report["results"] if r["group"] == "in-process"}
    assert {(b["model"], b["case"]) for b in report["best_batch"]} <= inproc and report["best_batch"]
    for best in report["best_batch"]:
        assert best["batch"] in best["measured"] and len(best["measured"]) > 1
