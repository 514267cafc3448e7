"""The CourseZoo server over loopback: which requests are sent, at what concurrency, against which settings.

This module only describes cases (plain dicts that ``bench.loadgen`` runs in its own process); starting
and stopping servers is ``bench.processes``. Batched rows keep 4 requests in flight, as
``CourseZooClient`` does by default, so a batch is decoded while the previous one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Variant:
    """A server started with one setting changed, to show what that setting gives, side by side."""

    prefix: str  # of the rows' keys
    note: str
    flags: tuple[str, ...]
    processes: int = 1  # server processes the load client spreads its connections over (bench.loadgen)

    @property
    def baseline(self) -> Variant:
        """The default server as measured in turn with this variant (its rows' keys end the prefix in -baseline),
        under the same load client: as many connections on both sides."""
        return Variant(f"{self.prefix}-baseline", "default settings, measured in turn with: " + self.note, (),
                       self.processes)


DEFAULT = Variant("server", "", ())
#: The default server's raw and shared-memory 1024 rows measured in turn with in-process ONNX Runtime (the
#: transport target's parts)
IN_TURN = Variant("inturn", "measured in turn with in-process ONNX Runtime on batches of the same size", ())
#: The default server and the PyTriton peer measured in turn (``Run.peer``): the comparison's rows
PEER_TURN = "peerturn"
#: What the peer is: Triton's server, which hands each batch to a Python backend stub, which passes it to the
#: PyTriton app's process, where ONNX Runtime runs it
PEER_LABEL = "PyTriton (Python backend)"
#: The ``--workers`` count of the ``workers`` variant unless ``coursezoo bench --workers`` says otherwise.
DEFAULT_WORKERS = 2


def variants(workers: int = DEFAULT_WORKERS) -> dict[str, Variant]:
    """The variants by name; ``workers`` is the process count of the ``workers`` one (2 suits 2 cores, a
    16-core GPU host wants more), and its rows' keys name it."""
    return {
        "batching-off": Variant("server-off", "batching off (--max-batch-size 1)", ("--max-batch-size", "1")),
        "inline-off": Variant("server-thread", "every model run in a worker thread (--inline-run-ms 0)",
                              ("--inline-run-ms", "0")),
        # Every run under 100 ms on the event loop (on a GPU: every lone request's): asks whether runs the
        # default times in a thread, GIL wait included, are kept off the loop for nothing (docs/performance.md).
        "inline-all": Variant("server-inline", "every model run under 100 ms on the event loop (--inline-run-ms 100)",
                              ("--inline-run-ms", "100")),
        "heap-default": Variant("server-glibcheap", "glibc's malloc defaults: freed memory given back to the kernel "
                                "(--keep-heap false)", ("--keep-heap", "false")),
        "decode-in-process": Variant("server-nopool", "images decoded in the server process (--decode-processes 0)",
                                     ("--decode-processes", "0")),
        "workers": Variant(f"server-workers{workers}", f"{workers} server processes sharing the port "
                           f"(--workers {workers})", ("--workers", str(workers)), workers),
        # What the default's adaptive queue delay gives: many callers' replies leave together, so a client on
        # the same host is woken once for several of them, and a lone caller does not wait (docs/performance.md).
        "queue-delay": Variant("server-delay0", "no queue delay (--max-queue-delay-ms 0)",
                               ("--max-queue-delay-ms", "0")),
    }


VARIANT_NAMES = tuple(variants())


def unary(digits: Export, timing: dict[str, float], variant: Variant = DEFAULT) -> dict[str, Any]:
    """One PNG per request, one caller: the latency a single interactive user sees."""
    return _case(f"{variant.prefix}/classify-png/{digits.name}/b1/c1", "server", "ClassifyDigits 1 PNG", digits,
                 "digits", 1, 1, timing, note=variant.note)


def concurrent(digits: Export, timing: dict[str, float], variant: Variant = DEFAULT) -> list[dict[str, Any]]:
    """64 callers with one image each: the case where per-request cost and dynamic batching decide."""
    return [
        _case(f"{variant.prefix}/classify-png/{digits.name}/b1/c{CLIENTS}", "server", "ClassifyDigits 1 PNG", digits,
              "digits", 1, CLIENTS, timing, note=variant.note, processes=variant.processes),
        _case(f"{variant.prefix}/modelinfer-raw/{digits.name}/b1/c{CLIENTS}", "server", "ModelInfer raw FP32",
              digits, "model_infer", 1, CLIENTS, timing, note=variant.note, processes=variant.processes,
              **_digits_extra(digits)),
    ]


def png_batches(digits: Export, timing: dict[str, float], variant: Variant = DEFAULT) -> dict[str, Any]:
    """Batches of PNGs, a few in flight: where image decoding decides."""
    return _case(f"{variant.prefix}/classify-png/{digits.name}/b{PNG_BATCH}/c{IN_FLIGHT}", "server",
                 "ClassifyDigits PNG batch", digits, "digits", PNG_BATCH, IN_FLIGHT, timing, note=variant.note)


def raw_batches(digits: Export, timing: dict[str, float], variant: Variant = DEFAULT) -> dict[str, Any]:
    """Raw FP32 tensors of 1024 images, one at a time: transport and model, no decoding."""
    return _case(f"{variant.prefix}/modelinfer-raw/{digits.name}/b{RAW_BATCH}/c1", "server", "ModelInfer raw FP32",
                 digits, "model_infer", RAW_BATCH, 1, timing, note=variant.note, **_digits_extra(digits))


def shared_memory_batches(digits: Export, timing: dict[str, float], variant: Variant = DEFAULT) -> dict[str, Any]:
    """The raw 1024-image ModelInfer with its input in a registered shared memory region instead of the
    message (the reply still carries the 40 KB of logits): what a client on the same host can send."""
    note = "; ".join(filter(None, ("input in a system shared memory region, logits in the reply", variant.note)))
    return _case(f"{variant.prefix}/modelinfer-shm/{digits.name}/b{RAW_BATCH}/c1", "server",
                 "ModelInfer FP32 in shared memory", digits, "model_infer", RAW_BATCH, 1, timing, shared_memory=True,
                 note=note, **_digits_extra(digits))


def variant_cases(name: str, variant: Variant, digits: Export, timing: dict[str, float],
                  h2load: bool = False) -> list[dict[str, Any]]:
    """The rows variant ``name`` changes, measured on ``variant`` (it, or its baseline): batching the
    many-clients rows, inline runs the single-image and raw ones (and, for ``inline-all``, the many-clients
    ones), the decoding pool the PNG batches, the kept heap the large requests (raw and PNG batches), worker
    processes the many-clients rows, a queue delay the single-image and many-clients ones (the ``workers``,
    ``inline-all`` and ``queue-delay`` rows from h2load too, when ``h2load``: the client that leaves the
    server the cores)."""
    if name == "decode-in-process":
        return [png_batches(digits, timing, variant)]
    if name == "heap-default":
        return [raw_batches(digits, timing, variant), png_batches(digits, timing, variant)]
    rows = [] if name == "workers" else [unary(digits, timing, variant)]
    rows += concurrent(digits, timing, variant)
    if name in ("workers", "inline-all", "queue-delay") and h2load:
        rows += h2load_cases(digits, "coursezoo", timing, (CLIENTS,), variant)
    if name == "inline-off":
        rows.append(raw_batches(digits, timing, variant))
    return rows


def domain_cases(exports: dict[str, Export], timing: dict[str, float]) -> list[dict[str, Any]]:
    """Every domain-API and raw ModelInfer case on the server with default (batching on) settings."""
    cases: list[dict[str, Any]] = []
    if digits := exports.get("digits"):
        m = digits.name
        cases += [
            unary(digits, timing),
            png_batches(digits, timing),
            _case(f"server/classify-pixels/{m}/b{PNG_BATCH}/c{IN_FLIGHT}", "server", "ClassifyDigits pixels batch",
                  digits, "digits", PNG_BATCH, IN_FLIGHT, timing, encoding="pixels",
                  note="raw 28x28 uint8: the PNG row without decoding"),
            _case(f"server/stream-png/{m}/b{PNG_BATCH}/w{IN_FLIGHT}", "server", "StreamClassifyDigits PNG", digits,
                  "stream", PNG_BATCH, IN_FLIGHT, timing, note=f"one stream, {IN_FLIGHT} messages in flight"),
            raw_batches(digits, timing),
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


LABELS = {"coursezoo": "CourseZoo", "triton": PEER_LABEL}


def oip_cases(digits: Export, server: str, concurrencies: tuple[int, ...], clients: tuple[str, ...],
              timing: dict[str, float]) -> list[dict[str, Any]]:
    """Single-image ModelInfer from the real tritonclient, for CourseZoo and the PyTriton peer alike."""
    return [_case(f"oip/{server}/{client}/{digits.name}/c{c}", "oip", f"{LABELS[server]} ModelInfer via {client}",
                  digits, "model_infer", 1, c, timing, client=client, **_digits_extra(digits))
            for client in clients for c in concurrencies]


def peer_cases(digits: Export, server: str, concurrencies: tuple[int, ...], clients: tuple[str, ...],
               timing: dict[str, float], h2load: bool) -> list[dict[str, Any]]:
    """The ``ModelInfer`` rows of the peer comparison on ``server`` ("coursezoo" or "triton"): the tritonclient
    sweep and, when ``h2load``, h2load's rows, keyed ``peerturn/<the default server's key>``; the two servers'
    rows are measured in turn (``Run.peer``), so each ratio divides rows of the same rounds."""
    other = "the PyTriton peer" if server == "coursezoo" else "a default CourseZoo server"
    cases = oip_cases(digits, server, concurrencies, clients, timing)
    if h2load:
        cases += [c for c in h2load_cases(digits, server, timing) if c["kind"] == "model_infer"]
    return [{**c, "key": f"{PEER_TURN}/{c['key']}", "group": "peer", "note": f"measured in turn with {other}"}
            for c in cases]


#: Concurrencies of the h2load rows: one caller (latency) and the 64 of the many-clients target.
H2LOAD_CONCURRENCY = (1, CLIENTS)


def h2load_cases(digits: Export, server: str, timing: dict[str, float],
                 concurrencies: tuple[int, ...] = H2LOAD_CONCURRENCY, variant: Variant = DEFAULT) \
        -> list[dict[str, Any]]:
    """Single-image calls from the external C client (``bench.h2load``): ModelInfer on either server, and on
    CourseZoo also ClassifyDigits with one PNG. Keys: ``h2load/<server>/...`` on the default servers,
    ``<variant prefix>/h2load/...`` on a variant."""
    prefix = f"h2load/{server}" if variant is DEFAULT else f"{variant.prefix}/h2load"
    m, processes = digits.name, variant.processes
    cases = [_case(f"{prefix}/modelinfer-raw/{m}/c{c}", "oip", f"{LABELS[server]} ModelInfer via h2load", digits,
                   "model_infer", 1, c, timing, client="h2load", note=variant.note, processes=processes,
                   **_digits_extra(digits)) for c in concurrencies]
    if server == "coursezoo":
        cases += [_case(f"{prefix}/classify-png/{m}/c{c}", "server", "ClassifyDigits 1 PNG via h2load", digits,
                        "digits", 1, c, timing, client="h2load", note=variant.note, processes=processes)
                  for c in concurrencies]
    return cases
