"""The CourseZoo server over loopback: which requests are sent, at what concurrency, against which settings.

This module only describes cases (plain dicts that ``bench.loadgen`` runs in its own process); starting
and stopping servers is ``bench.processes``. Batched rows keep 4 requests in flight, as
``CourseZooClient`` does by default, so a batch is decoded while the previous one runs.
"""

from __future__ import annotations

from typing import Any

from bench.exports import Export

IN_FLIGHT = 4
PNG_BATCH = 256
RAW_BATCH = 1024
TABULAR_BATCH = 256
CLIENTS = 64


def _case(key: str, group: str, case: str, export: Export, kind: str, batch: int, concurrency: int,
          timing: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"key": key, "group": group, "case": case, "model": export.name, "kind": kind, "batch": batch,
            "concurrency": concurrency, **timing, **extra}


def _digits_extra(export: Export) -> dict[str, Any]:
    """What a ModelInfer client must know: the card's tensor names and the normalization it applies itself."""
    prep = export.card.preprocessing
    return {"input": export.card.inputs[0].name, "output": export.card.outputs[0].name, "mean": prep["mean"],
            "std": prep["std"]}


def _prefix(off: bool) -> str:
    return "server-off" if off else "server"


OFF_NOTE = "batching off (--max-batch-size 1)"


def unary(digits: Export, timing: dict[str, float], off: bool = False) -> dict[str, Any]:
    """One PNG per request, one caller: the latency a single interactive user sees."""
    return _case(f"{_prefix(off)}/classify-png/{digits.name}/b1/c1", "server", "ClassifyDigits 1 PNG", digits,
                 "digits", 1, 1, timing, note=OFF_NOTE if off else "")


def concurrent(digits: Export, timing: dict[str, float], off: bool = False) -> list[dict[str, Any]]:
    """64 callers with one image each: the case where per-request cost and dynamic batching decide."""
    note = OFF_NOTE if off else ""
    return [
        _case(f"{_prefix(off)}/classify-png/{digits.name}/b1/c{CLIENTS}", "server", "ClassifyDigits 1 PNG", digits,
              "digits", 1, CLIENTS, timing, note=note),
        _case(f"{_prefix(off)}/modelinfer-raw/{digits.name}/b1/c{CLIENTS}", "server", "ModelInfer raw FP32", digits,
              "model_infer", 1, CLIENTS, timing, note=note, **_digits_extra(digits)),
    ]


def domain_cases(exports: dict[str, Export], timing: dict[str, float]) -> list[dict[str, Any]]:
    """Every domain-API and raw ModelInfer case on the server with default (batching on) settings."""
    cases: list[dict[str, Any]] = []
    if digits := exports.get("digits"):
        m = digits.name
        cases += [
            unary(digits, timing),
            _case(f"server/classify-png/{m}/b{PNG_BATCH}/c{IN_FLIGHT}", "server", "ClassifyDigits PNG batch", digits,
                  "digits", PNG_BATCH, IN_FLIGHT, timing),
            _case(f"server/classify-pixels/{m}/b{PNG_BATCH}/c{IN_FLIGHT}", "server", "ClassifyDigits pixels batch",
                  digits, "digits", PNG_BATCH, IN_FLIGHT, timing, encoding="pixels",
                  note="raw 28x28 uint8: the PNG row without decoding"),
            _case(f"server/stream-png/{m}/b{PNG_BATCH}/w{IN_FLIGHT}", "server", "StreamClassifyDigits PNG", digits,
                  "stream", PNG_BATCH, IN_FLIGHT, timing, note=f"one stream, {IN_FLIGHT} messages in flight"),
            _case(f"server/modelinfer-raw/{m}/b{RAW_BATCH}/c1", "server", "ModelInfer raw FP32", digits,
                  "model_infer", RAW_BATCH, 1, timing, **_digits_extra(digits)),
            *concurrent(digits, timing),
        ]
    for task, kind, rpc in (("diabetes", "diabetes", "ClassifyDiabetes"), ("names", "names", "ClassifySequences")):
        if export := exports.get(task):
            cases += [
                _case(f"server/{kind}/{export.name}/b1/c1", "server", rpc, export, kind, 1, 1, timing),
                _case(f"server/{kind}/{export.name}/b{TABULAR_BATCH}/c{IN_FLIGHT}", "server", f"{rpc} batch", export,
                      kind, TABULAR_BATCH, IN_FLIGHT, timing),
            ]
    return cases


def oip_cases(digits: Export, server: str, concurrencies: tuple[int, ...], clients: tuple[str, ...],
              timing: dict[str, float]) -> list[dict[str, Any]]:
    """Single-image ModelInfer from the real tritonclient, for CourseZoo and the Triton peer alike."""
    group = "oip" if server == "coursezoo" else "peer"
    label = {"coursezoo": "CourseZoo", "triton": "Triton (PyTriton)"}[server]
    return [_case(f"oip/{server}/{client}/{digits.name}/c{c}", group, f"{label} ModelInfer via {client}", digits,
                  "model_infer", 1, c, timing, client=client, **_digits_extra(digits))
            for client in clients for c in concurrencies]
