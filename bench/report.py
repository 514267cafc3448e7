"""Turning results into the printed table, the ratios with their parts, the targets, and the JSON file.

A ratio is never printed alone: each line shows both rows' throughputs and what they are, so a reader
can see which side moved; a ratio whose rows are missing is printed as not measured, with why, never left
out. Targets are the issue's service targets, checked against this run's rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import Result

GROUP_TITLES = {
    "in-process": "In-process baselines (no transport)",
    "server": "CourseZoo server over loopback (load client in its own process)",
    "oip": "Open Inference Protocol, single image: CourseZoo under the real tritonclient and h2load",
    "peer": "CourseZoo vs the PyTriton peer (Triton, Python backend -> ONNX Runtime), measured in turn",
    "batch-cli": "coursezoo batch on a folder of PNGs",
}


@dataclass(frozen=True)
class Ratio:
    """``numerator``'s throughput over ``denominator``'s; with ``by_cpu``, its items per model-side CPU second
    over the denominator's (CPU efficiency: less sensitive to other load on a shared machine). Either way the
    value is the first part over the second, as printed."""

    name: str
    numerator: str  # result keys
    denominator: str
    target: float | None = None  # the numerator should reach target x the denominator
    by_cpu: bool = False
    needs: tuple[str, ...] = ()  # what must run for both rows to exist (the harness's groups, "h2load")


@dataclass(frozen=True)
class Target:
    name: str
    key: str
    metric: str  # "throughput", "p50_ms", "p99_ms"
    op: str  # "<=" or ">="
    threshold: float


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if digits == 0 else f"{x:,.{digits}f}"


def _rows_in_order(results: list[Result]) -> dict[str, list[Result]]:
    """Results by table section; in the peer's, each of its rows sits below CourseZoo's of the same client and
    concurrency, measured in the same rounds."""
    sections: dict[str, list[Result]] = {g: [] for g in GROUP_TITLES}
    for r in results:
        sections[r.group].append(r)
    for group in ("oip", "peer"):
        sections[group].sort(key=lambda r: (r.case.split(" via ")[-1], r.concurrency, "/triton/" in r.key))
    return {g: rows for g, rows in sections.items() if rows}


HEADER = ("case", "model", "batch", "conc", "calls", "items/s", "p50 ms", "p90 ms", "p99 ms",
          "model-side CPU ms/call", "client CPU ms/call", "note")
NUMERIC = range(2, 11)  # right-aligned columns
CPU_COLUMNS = (9, 10)  # left out of sections where nothing was measured (in-process rows have no client)


def _cells(r: Result) -> tuple[str, ...]:
    """A row's cells; "calls" are the timed ones the percentiles come from (too few leave p90 and p99 out,
    bench.stats.PERCENTILE_MIN_CALLS), none for a row timed as a whole (the batch CLI's)."""
    return (r.case, r.model, str(r.batch), str(r.concurrency), str(r.calls) if r.calls else "-",
            _fmt(r.throughput, 0), _fmt(r.p50_ms), _fmt(r.p90_ms), _fmt(r.p99_ms), _fmt(r.model_cpu_ms),
            _fmt(r.client_cpu_ms), r.note)


def _section(rows: list[Result]) -> tuple[list[int], list[tuple[str, ...]]]:
    """The column indices this section shows, and its header plus one tuple of cells per row."""
    cells = [_cells(r) for r in rows]
    shown = [i for i in range(len(HEADER)) if i not in CPU_COLUMNS or any(c[i] != "-" for c in cells)]
    return shown, [tuple(c[i] for i in shown) for c in [HEADER, *cells]]


def compute_ratios(results: list[Result], ratios: list[Ratio], ran: set[str]) -> list[dict[str, Any]]:
    """Every ratio, with both parts; one that cannot be computed has value and met None and a note saying
    why: what it ``needs`` did not run (not in ``ran``; listed in ``not_run``), or a row or its CPU time is
    missing (a failure: everything it needs ran)."""
    by_key = {r.key: r for r in results}
    out = []
    for ratio in ratios:
        rows = [by_key.get(ratio.numerator), by_key.get(ratio.denominator)]
        parts = _parts(ratio, rows)
        value = parts[0] / parts[1] if parts else None
        not_run = [n for n in ratio.needs if n not in ran]
        out.append({"name": ratio.name, "value": None if value is None else round(value, 3), "target": ratio.target,
                    "met": None if value is None or ratio.target is None else value >= ratio.target,
                    "unit": "items/CPU-s" if ratio.by_cpu else "items/s", "needs": list(ratio.needs),
                    "not_run": not_run, "note": "" if parts else _why_not(ratio, rows, not_run),
                    "numerator": {"key": ratio.numerator, "value": parts[0] if parts else None},
                    "denominator": {"key": ratio.denominator, "value": parts[1] if parts else None}})
    return out


def _parts(ratio: Ratio, rows: list[Result | None]) -> tuple[float, float] | None:
    """The numerator's and the denominator's value (throughput, or items per model-side CPU second), or None
    when a row, its CPU time or a non-zero denominator is missing."""
    num, den = rows
    if num is None or den is None:
        return None
    if ratio.by_cpu:
        if not num.model_cpu_ms or not den.model_cpu_ms:
            return None
        return num.batch * 1e3 / num.model_cpu_ms, den.batch * 1e3 / den.model_cpu_ms
    return (num.throughput, den.throughput) if den.throughput else None


def _why_not(ratio: Ratio, rows: list[Result | None], not_run: list[str]) -> str:
    if not_run:
        return f"not measured: {', '.join(not_run)} did not run"
    absent = [key for key, row in zip((ratio.numerator, ratio.denominator), rows, strict=True) if row is None]
    if absent:
        return (f"not measured: no row {' or '.join(absent)} in this run (a concurrency or batch size not chosen, a "
                "peer skipped, or a failure listed under the errors)")
    return "not measured: no CPU time" if ratio.by_cpu else "not measured: the denominator is 0"


def _part(ratio: dict[str, Any], side: str) -> str:
    return _fmt(ratio[side]["value"], 0)


def _split_not_run(ratios: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The ratios to list one by one (measured, or missing although all they need ran: a failure), and one
    line for the others, whose groups were left out of this run (``--cases``, no h2load), or "" when none."""
    listed = [r for r in ratios if r["value"] is not None or not r["not_run"]]
    left = [r for r in ratios if r["value"] is None and r["not_run"]]
    groups = sorted({n for r in left for n in r["not_run"]})
    return listed, f"{len(left)} more not measured: {', '.join(groups)} did not run" if left else ""


def _ratio_line(r: dict[str, Any]) -> str:
    """``name: numerator vs denominator unit = value x  target ...``, or ``name: not measured: why``."""
    if r["value"] is None:
        return f"{r['name']}: {r['note']}"
    target = f"  target >= {r['target']:g}x: {_verdict(r['met'])}" if r["target"] is not None else ""
    return f"{r['name']}: {_part(r, 'numerator')} vs {_part(r, 'denominator')} {r['unit']} = {r['value']:.2f}x{target}"


def check_targets(results: list[Result], targets: list[Target]) -> list[dict[str, Any]]:
    by_key = {r.key: r for r in results}
    out = []
    for t in targets:
        row = by_key.get(t.key)
        value = getattr(row, t.metric) if row else None
        met = None if value is None else (value <= t.threshold if t.op == "<=" else value >= t.threshold)
        out.append({"name": t.name, "key": t.key, "metric": t.metric, "op": t.op, "threshold": t.threshold,
                    "measured": value, "met": met})
    return out


def best_batches(results: list[Result]) -> list[dict[str, Any]]:
    """For each model and in-process path measured at several batch sizes, the batch size with the highest
    throughput: the answer to "which batch size should the server aim for on this device"."""
    by_path: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.group == "in-process":
            by_path.setdefault((r.model, r.case), []).append(r)
    out = []
    for (model, case), rows in by_path.items():
        if len({r.batch for r in rows}) > 1:
            best = max(rows, key=lambda r: r.throughput)
            out.append({"model": model, "case": case, "batch": best.batch, "throughput": best.throughput,
                        "measured": sorted(r.batch for r in rows)})
    return out


def _best_line(b: dict[str, Any]) -> str:
    return (f"{b['model']} {b['case']}: batch {b['batch']} ({_fmt(b['throughput'], 0)} items/s; measured "
            f"{', '.join(map(str, b['measured']))})")


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


def render_text(results: list[Result], ratios: list[dict[str, Any]], targets: list[dict[str, Any]],
                notes: list[str], best: Sequence[dict[str, Any]] = ()) -> str:
    lines: list[str] = []
    for group, rows in _rows_in_order(results).items():
        shown, table = _section(rows)
        widths = [max(len(c[j]) for c in table) for j in range(len(shown) - 1)]  # the note is not padded
        lines += ["", f"== {GROUP_TITLES[group]}"]
        for c in table:
            padded = (v.rjust(w) if i in NUMERIC else v.ljust(w) for i, v, w in zip(shown, c, widths, strict=False))
            lines.append("  ".join(padded) + ("  " + c[-1] if c[-1] else ""))
    if best:
        lines += ["", "== Best batch size (in-process throughput)", *(_best_line(b) for b in best)]
    if ratios:
        lines += ["", "== Ratios (numerator vs denominator, same run)"]
        listed, not_run = _split_not_run(ratios)
        lines += [_ratio_line(r) for r in listed] + ([not_run] if not_run else [])
    if targets:
        lines += ["", "== Targets"]
        for t in targets:
            measured = "-" if t["measured"] is None else _fmt(t["measured"], 0 if t["metric"] == "throughput" else 2)
            lines.append(f"{t['name']}: {measured} ({t['op']} {t['threshold']:g}) {_verdict(t['met'])}")
    if notes:
        lines += ["", "== Notes", *(f"- {n}" for n in notes)]
    return "\n".join(lines)


def render_markdown(results: list[Result], report: dict[str, Any]) -> str:
    """The same tables as Markdown, for docs/performance.md and the README's Performance section."""
    m = report["machine"]
    gpu = ", ".join(g["name"] for g in m["gpus"]) or "no GPU"
    out = [f"Measured {report['started']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {gpu}; "
           f"`{report['settings']['command']}`. Load average at start {m['at_start']['loadavg']}, "
           f"at end {m['at_end']['loadavg']}."]
    for group, rows in _rows_in_order(results).items():
        shown, table = _section(rows)
        out += ["", f"**{GROUP_TITLES[group]}**", "", "| " + " | ".join(table[0]) + " |",
                "|" + "|".join("---:" if i in NUMERIC else "---" for i in shown) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in table[1:]]
    if report.get("best_batch"):
        out += ["", "Best batch size (in-process throughput): " + "; ".join(map(_best_line, report["best_batch"]))]
    if report["ratios"]:
        listed, not_run = _split_not_run(report["ratios"])
        out += ["", "| ratio | numerator | denominator | unit | value | target |", "|---|---:|---:|---|---:|---|"]
        for r in listed:
            target = "" if r["target"] is None else f">= {r['target']:g}x: {_verdict(r['met'])}"
            value = r["note"] if r["value"] is None else f"{r['value']:.2f}x"
            out.append(f"| {r['name']} | {_part(r, 'numerator')} | {_part(r, 'denominator')} | {r['unit']} | "
                       f"{value} | {target} |")
        out += ["", not_run] if not_run else []
    if report["targets"]:
        out += ["", "| target | measured | goal | status |", "|---|---:|---|---|"]
        for t in report["targets"]:
            digits = 0 if t["metric"] == "throughput" else 2
            measured = "-" if t["measured"] is None else _fmt(t["measured"], digits)
            out.append(f"| {t['name']} | {measured} | {t['op']} {t['threshold']:g} | {_verdict(t['met'])} |")
    notes = report["notes"] + [f"ERROR {e}" for e in report["errors"]]
    if notes:
        out += ["", *(f"- {n}" for n in notes)]
    return "\n".join(out) + "\n"


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
