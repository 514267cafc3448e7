"""``coursezoo bench``: every inference path measured side by side, in one run, on this machine.

    coursezoo bench --quick                      # about 80-90 s on 2 cores (CI allows 3 minutes); what CI runs
    coursezoo bench                              # the full run (20,000 PNGs, concurrency 1..64, the PyTriton peer)
    coursezoo bench --cases server oip --models mnist_resnet --json /tmp/r.json

Groups, in the order they run: ``inprocess`` (PyTorch eager, TorchScript, ONNX Runtime), ``server``
(the domain API and raw ModelInfer over loopback), ``raw-in-turn`` (ModelInfer of 1024 images, raw and in
shared memory, and in-process ONNX Runtime on the same batch size, measured in turn), ``batching-off`` and
the other variants (a server restarted with one setting changed, measured in turn with a default one),
``oip`` (ModelInfer from the real tritonclient at rising concurrency, and from h2load, an external C client:
bench/h2load.py), ``batch-cli`` (``coursezoo batch`` on a folder of PNGs), ``peer`` (the PyTriton peer, Triton with
its Python backend, and a default CourseZoo server, measured in turn under the same load clients). Everything
compared is measured in the same run; each ratio is printed with its parts, or says it was not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import batch_cli, data, exports, h2load, inprocess, machine, report, server_load, triton_peer
from bench.exports import Export
from bench.loadgen import CALLERS_PER_CONNECTION, CONNECTIONS_PER_PROCESS
from bench.processes import Server, load
from bench.report import Ratio, Target
from bench.stats import Result
from coursezoo.args import at_least

log = logging.getLogger("coursezoo.bench")

VARIANTS = server_load.VARIANT_NAMES  # the server restarted with one setting changed
CASES = ("inprocess", "server", "raw-in-turn", *VARIANTS, "oip", "batch-cli", "peer")
QUICK_CASES = tuple(c for c in CASES if c != "peer")  # the peer is optional in --quick
#: What a ratio may need beside the groups: h2load's rows exist only where h2load is installed
H2LOAD = "h2load"
#: The peer as the ratios name it: Triton's server hands each batch to a Python backend stub, which passes it
#: to the PyTriton app's process, where ONNX Runtime runs it (bench/pytriton_app.py)
PEER = "PyTriton peer (Python backend)"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how wide each group measures; --quick trades precision for a run that fits CI."""

    inproc_seconds: float
    inproc_warmup: int
    inproc_min_calls: int
    load_seconds: float
    load_warmup: float
    oip_concurrency: tuple[int, ...]
    batch_images: int
    ab_rounds: int  # a variant and the default server are measured in turn this many times
    transport_rounds: int  # raw ModelInfer 1024 and in-process ORT are measured in turn this many times

    @property
    def timing(self) -> dict[str, float]:
        return {"seconds": self.load_seconds, "warmup": self.load_warmup}


#: CI gives --quick 3 minutes on 2 cores; about 80 cases of load make up most of it, so their seconds count most
QUICK = Plan(inproc_seconds=0.2, inproc_warmup=1, inproc_min_calls=2, load_seconds=0.5, load_warmup=0.2,
             oip_concurrency=(1, 64), batch_images=2_000, ab_rounds=1, transport_rounds=1)
FULL = Plan(inproc_seconds=2.0, inproc_warmup=3, inproc_min_calls=5, load_seconds=5.0, load_warmup=1.0,
            oip_concurrency=(1, 2, 4, 8, 16, 32, 64), batch_images=20_000, ab_rounds=3,
            transport_rounds=5)
OIP_CLIENTS = ("tritonclient-grpc", "tritonclient-aio")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure every inference path side by side, in one run, on this "
                                            "machine; print a table and write JSON (see docs/performance.md).")
    p.add_argument("--quick", action="store_true", help="short timings, fewer models and images (CI smoke run)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda adds ORT CUDA, ORT CUDA IO binding and PyTorch eager CUDA rows and runs the servers on "
                        "the GPU (exit 1 without a usable GPU); auto (default) = cuda when usable")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help=f"models to measure (default: {' '.join(exports.QUICK_MODELS)} with --quick, else "
                        f"{' '.join(exports.FULL_MODELS)}); the server cases use {exports.SERVER_DIGITS} when it is "
                        "among them, else the first digits model")
    p.add_argument("--cases", nargs="+", choices=CASES, metavar="CASE",
                   help=f"groups to run, from {', '.join(CASES)} (default: all; --quick leaves out the peer)")
    p.add_argument("--batch-sizes", nargs="+", type=at_least(1), default=list(inprocess.BATCH_SIZES), metavar="N",
                   help="batch sizes of the in-process baselines (default: %(default)s); on a GPU add larger ones "
                        "to find the best batch size")
    p.add_argument("--concurrency", nargs="+", type=at_least(1), metavar="N",
                   help=f"concurrencies of the tritonclient sweep of the oip and peer groups (default: "
                        f"{' '.join(map(str, FULL.oip_concurrency))}; with --quick "
                        f"{' '.join(map(str, QUICK.oip_concurrency))}); fewer keep a device run short")
    p.add_argument("--workers", type=at_least(2), default=server_load.DEFAULT_WORKERS, metavar="N",
                   help="server processes of the 'workers' case (default: %(default)s, for 2 cores; more on a "
                        "many-core host)")
    p.add_argument("--repo", type=_absolute, default="exported",
                   help="model repository with the exports (default: exported)")
    data.add_place_options(p, _absolute)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="results file, with a Markdown copy beside it: the same name ending in .md "
                        "(default: bench/results/latest.json)")
    return p


def _absolute(path: str) -> Path:
    """A path as the user meant it, relative to where they ran the command: the harness's subprocesses (the
    batch CLI among them) run in the repository root."""
    return Path(path).resolve()


def markdown_path(json_path: Path) -> Path:
    """Where the Markdown copy of ``json_path`` goes: beside it, ending in .md (``x.md.md`` for a JSON file
    named ``x.md``, which the copy would otherwise overwrite)."""
    md = json_path.with_suffix(".md")
    return md if md != json_path else json_path.with_name(json_path.name + ".md")


def unwritable(path: Path) -> str | None:
    """Why the results cannot be written to ``path`` (or None), asked before the run: at its end, the
    measurements would be lost. Its folder is made now if missing, as writing would make it."""
    if path.is_dir():
        return f"{path} is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot make the folder {path.parent}: {e.strerror}"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"the folder {path.parent} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


class Run:
    """One benchmark run: collects rows, notes and errors while the groups execute."""

    def __init__(self, args: argparse.Namespace, plan: Plan, selected: list[Export], cuda: bool) -> None:
        self.args, self.plan, self.cuda = args, plan, cuda
        self.by_task = {task: e for task in exports.TASKS if (e := exports.first_of(selected, task))}
        self.selected = selected
        self.server_models = list(self.by_task.values())
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.errors: list[str] = []
        self.server_settings: dict[str, Any] = {}
        self.groups: list[dict[str, Any]] = []
        self.variants = server_load.variants(args.workers)

    def group(self, name: str, fn: Callable[[], None]) -> None:
        """Run one group; a failure is recorded and the remaining groups still run.

        What else was using the machine is sampled before and after each group, so a reader can tell
        which rows were measured on a busy machine (a shared 2-core box rarely stays quiet for a run).
        """
        before = machine.snapshot()
        start = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the others' numbers
            self.errors.append(f"{name}: {type(e).__name__}: {e}")
            log.debug("%s failed:\n%s", name, traceback.format_exc())
            print(f"[bench] {name} FAILED: {e}", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        print(f"[bench] {name} took {seconds:.1f} s", file=sys.stderr, flush=True)
        after = machine.snapshot()
        self.groups.append({"name": name, "seconds": round(seconds, 1), "before": before, "after": after})
        others = sorted({p for snap in (before, after) for p in snap["busy_processes"]})
        if others:
            self.notes.append(f"{name}: other processes busy around it: {'; '.join(others)}")

    def _add_loaded(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if "error" in row:
                self.errors.append(f"{row['key']}: {row['error']}")
            else:
                self.results.append(Result(**row))

    def server_args(self) -> list[str]:
        """The flags every benchmark server gets: the device, and the settings that shape a benchmark spelled
        out, so a ``COURSEZOO_*`` variable in the environment cannot change them behind the report's back."""
        s = self.server_settings
        return ["--device", "cuda" if self.cuda else "cpu",
                *(f"--{key.replace('_', '-')}={s[key]}" for key in SPELLED_OUT)]

    # --- groups ---------------------------------------------------------------------------------------------

    def inprocess(self) -> None:
        p = self.plan
        results, failures = inprocess.run(self.selected, seconds=p.inproc_seconds, warmup=p.inproc_warmup,
                                          min_calls=p.inproc_min_calls, cuda=self.cuda,
                                          batch_sizes=tuple(self.args.batch_sizes))
        self.results += results
        self.errors += failures
        if digits := self.by_task.get("digits"):
            self.results.append(inprocess.decode_cost(digits, seconds=p.inproc_seconds))

    def server(self, cases: set[str], tmp_repo: Path) -> None:
        """The default-settings server: domain cases, the OIP sweep and the batch CLI through it share one start."""
        digits = self.by_task.get("digits")
        with Server(tmp_repo, *self.server_args()) as srv:
            if "server" in cases:
                self._add_loaded(load(srv.target, server_load.domain_cases(self.by_task, self.plan.timing), srv.pgid))
            if "oip" in cases and digits:
                oip = server_load.oip_cases(digits, "coursezoo", self.plan.oip_concurrency, OIP_CLIENTS,
                                            self.plan.timing)
                self._add_loaded(load(srv.target, oip + self.h2load_cases(digits, "coursezoo"), srv.pgid))
            if "batch-cli" in cases and digits:
                self.batch_cli(digits, srv.target)

    def raw_in_turn(self, tmp_repo: Path) -> None:
        """The raw 1024-image ``ModelInfer`` row (and its shared-memory twin) and in-process ONNX Runtime on
        batches of the same size, measured in turn ``transport_rounds`` times with the server up (and idle while
        ORT runs here): the parts of the transport target. On the shared 2-core host both flip, within seconds,
        between a fast phase and one where every call costs ~1.4x the CPU (in-process ORT 1024: 93-98k vs
        62-68k images/s), which moved the ratio of the two rows from their own groups between 0.70x and 0.97x
        across runs; a median round can land in either phase, so each row's throughput and CPU are its fastest
        round's (noise only ever slows a call), and its latencies the median round's (``_one_round``)."""
        digits = self.by_task.get("digits")
        if not digits:
            return
        # On the CPU the server's own runtime too: the server's ratio to it is the transport's share alone.
        paths = ["ORT CUDA"] if self.cuda else ["ORT CPU", inprocess.RUNTIME_CPU]
        binds = inprocess.ort_paths(digits, self.cuda)
        feeds = inprocess.distinct_inputs(digits, server_load.RAW_BATCH)  # the very batches the server gets
        p, variant = self.plan, server_load.IN_TURN
        cases = [server_load.raw_batches(digits, p.timing, variant),
                 server_load.shared_memory_batches(digits, p.timing, variant)]
        rounds: dict[str, list[dict[str, Any]]] = {}
        with Server(tmp_repo, *self.server_args()) as srv:
            for _ in range(p.transport_rounds):
                for path in paths:
                    row = inprocess.measure(digits, path, binds[path], feeds, seconds=p.inproc_seconds,
                                            warmup=p.inproc_warmup, min_calls=p.inproc_min_calls, note=variant.note,
                                            prefix=f"{variant.prefix}/inproc", case=f"{path}, in turn with the server")
                    rounds.setdefault(row.key, []).append(row.to_json())
                for r in load(srv.target, cases, srv.pgid):
                    rounds.setdefault(r["key"], []).append(r)
        self._add_loaded([_one_round(rows, fastest=True) for rows in rounds.values()])

    def variant(self, name: str, tmp_repo: Path) -> None:
        """A server with one setting changed (its flag given last wins) and a default one, both up, measured
        in turn on the rows that setting is for, ``ab_rounds`` times: on a shared machine conditions drift
        within minutes, and measuring A then B once can flip a 10% difference. Each row is its median round."""
        digits = self.by_task.get("digits")
        if not digits:
            return
        variant = self.variants[name]
        with Server(tmp_repo, *self.server_args()) as base, \
                Server(tmp_repo, *self.server_args(), *variant.flags) as changed:
            sides = [(srv, server_load.variant_cases(name, measured, digits, self.plan.timing,
                                                     h2load=self.h2load_available()))
                     for srv, measured in ((base, variant.baseline), (changed, variant))]
            rounds = _rounds_in_turn(sides, self.plan.ab_rounds)
        self._add_loaded([_one_round(rows) for rows in rounds.values()])

    def batch_cli(self, digits: Export, target: str | None) -> None:
        n = self.plan.batch_images
        device = "cuda" if self.cuda else "cpu"
        with batch_cli.PngFolder(n) as folder:
            self.results.append(batch_cli.ort_decoded(digits, n, "CUDAExecutionProvider" if self.cuda
                                                      else "CPUExecutionProvider"))
            self.results.append(batch_cli.run_cli(digits, folder.path, n,
                                                  ["--local", "--repo", str(self.args.repo), "--device", device],
                                                  "--local", f"batchcli/local/{digits.name}/n{n}"))
            if self.cuda:  # on CUDA one process runs the model for all; on the CPU every worker does, core by core
                self.results.append(batch_cli.run_cli(digits, folder.path, n,
                                                      ["--local", "--repo", str(self.args.repo), "--device", "cpu"],
                                                      "--local --device cpu", f"batchcli/local-cpu/{digits.name}/n{n}"))
            if target:
                self.results.append(batch_cli.run_cli(digits, folder.path, n, ["--server", target], "--server",
                                                      f"batchcli/server/{digits.name}/n{n}"))

    def peer(self, tmp_repo: Path) -> None:
        """The PyTriton peer and a default CourseZoo server, both up, measured in turn ``ab_rounds`` times under
        the same clients (the tritonclient sweep, h2load); each row is its median round. Rows minutes apart
        move by up to 25% on a shared machine, so CourseZoo's side is not taken from the ``oip`` group. On a
        GPU run a peer whose ONNX Runtime fell back to the CPU fails the group: it would compare devices."""
        digits = self.by_task.get("digits")
        python, info = triton_peer.find_python()
        if python is None or digits is None:
            self.notes.append(info if python is None else "PyTriton peer skipped: no digits model selected")
            return
        batching = {k: self.server_settings[k] for k in ("max_batch_size", "max_queue_delay_ms")}
        with triton_peer.TritonPeer(python, digits, device="cuda" if self.cuda else "cpu", **batching) as peer:
            if why := peer_on_wrong_device(self.cuda, peer.provider):
                raise RuntimeError(why)
            self.notes.append(f"PyTriton peer: {info} ({python.parent.parent.name}) on {peer.provider}; "
                              f"{triton_peer.PATH}; Triton's dynamic batcher with CourseZoo's batching limits (its "
                              "queue delay always waited out, as Triton does)")
            with Server(tmp_repo, *self.server_args()) as coursezoo:
                sides = [(srv, server_load.peer_cases(digits, name, self.plan.oip_concurrency, OIP_CLIENTS,
                                                      self.plan.timing, self.h2load_available()))
                         for srv, name in ((coursezoo, "coursezoo"), (peer, "triton"))]
                rounds = _rounds_in_turn(sides, self.plan.ab_rounds)
        self._add_loaded([_one_round(rows) for rows in rounds.values()])

    def h2load_available(self) -> bool:
        """Whether h2load is there; notes (once) its version, or that its rows are skipped and why."""
        executable, info = h2load.find()
        note = info if executable is None else (f"h2load: {info}; every reply counted (bench/h2load.py)")
        if note not in self.notes:
            self.notes.append(note)
        return executable is not None

    def h2load_cases(self, digits: Export, server: str) -> list[dict[str, Any]]:
        """The external client's rows for ``server``, or none when h2load is missing."""
        return server_load.h2load_cases(digits, server, self.plan.timing) if self.h2load_available() else []

    # --- ratios and targets -----------------------------------------------------------------------------------

    def ratios(self) -> list[Ratio]:
        """Every ratio this run sets out to measure (a CUDA path's only on a GPU run), each with the groups its
        rows come from (``needs``): one whose rows are missing is reported as not measured, never left out."""
        return [dataclasses.replace(r, needs=self.needs(r)) for r in self._ratios()]

    def needs(self, ratio: Ratio) -> tuple[str, ...]:
        """The ``--cases`` groups whose rows ``ratio`` divides, and ``H2LOAD`` for h2load's rows, read off the
        rows' keys (``<prefix>/...``; the variants' prefixes, with or without ``-baseline``, name their groups)."""
        groups = {"inproc": "inprocess", "server": "server", server_load.IN_TURN.prefix: "raw-in-turn",
                  "oip": "oip", "h2load": "oip", "batchcli": "batch-cli", server_load.PEER_TURN: "peer"}
        for name, variant in self.variants.items():
            groups |= {variant.prefix: name, variant.baseline.prefix: name}
        keys = (ratio.numerator, ratio.denominator)
        found = {groups[key.split("/")[0]] for key in keys}
        if any("h2load" in key.split("/") for key in keys):
            found.add(H2LOAD)
        return tuple(sorted(found))

    def _ratios(self) -> list[Ratio]:
        io_binding = inprocess.path_key(inprocess.IO_BINDING)
        paths = [inprocess.path_key(inprocess.RUNTIME_CPU), *(["ort-cuda", io_binding] if self.cuda else [])]
        what = {io_binding: f" ({inprocess.DEVICE_RESIDENT})"}  # the label says what its figure cannot promise
        out = [Ratio(f"{e.name} b{bs}: {path} vs ORT CPU{what.get(path, '')}", f"inproc/{path}/{e.name}/b{bs}",
                     f"inproc/ort-cpu/{e.name}/b{bs}")
               for e in self.selected for bs in self.args.batch_sizes for path in paths]
        if digits := self.by_task.get("digits"):
            m, ort = digits.name, "ort-cuda" if self.cuda else "ort-cpu"
            v, w = self.variants, self.args.workers
            delay = f"the default {self.server_settings['max_queue_delay_ms']:g} ms adaptive queue delay"
            n, c = self.plan.batch_images, server_load.CLIENTS
            # the transport target's parts, measured in turn (raw_in_turn), by key
            turn, b = server_load.IN_TURN.prefix, server_load.RAW_BATCH
            raw, shm, inproc = (f"{turn}/modelinfer-raw/{m}/b{b}/c1", f"{turn}/modelinfer-shm/{m}/b{b}/c1",
                                f"{turn}/inproc/{ort}/{m}/b{b}")
            runtime = f"{turn}/inproc/{inprocess.path_key(inprocess.RUNTIME_CPU)}/{m}/b{b}"
            out += [
                Ratio(f"ModelInfer raw b1024 vs in-process {ort} b1024 ({m}), measured in turn", raw, inproc, 0.8),
                Ratio(f"ModelInfer raw b1024 vs in-process {ort} b1024 ({m}), rows of separate groups",
                      f"server/modelinfer-raw/{m}/b{b}/c1", f"inproc/{ort}/{m}/b{b}"),
                Ratio(f"ModelInfer raw b1024 vs in-process {ort} b1024 ({m}), measured in turn, CPU per item",
                      raw, inproc, by_cpu=True),
                *([] if self.cuda else [  # the in-process runtime is measured in turn on the CPU only
                    Ratio(f"ModelInfer raw b1024 vs the server's runtime in-process b1024 ({m}), measured in turn: "
                          "the transport alone", raw, runtime)]),
                Ratio(f"ModelInfer b1024 in shared memory vs in-process {ort} b1024 ({m}), measured in turn",
                      shm, inproc),
                Ratio(f"ModelInfer b1024 in shared memory vs raw in the message ({m}), measured in turn", shm, raw),
                Ratio(f"{c} clients ClassifyDigits 1 PNG: batching on vs off",
                      *_in_turn(v["batching-off"], f"classify-png/{m}/b1/c{c}")),
                Ratio(f"{c} clients ModelInfer raw 1 image: batching on vs off",
                      *_in_turn(v["batching-off"], f"modelinfer-raw/{m}/b1/c{c}")),
                Ratio("unary ClassifyDigits 1 PNG: short runs inline vs every run in a thread",
                      *_in_turn(v["inline-off"], f"classify-png/{m}/b1/c1")),
                Ratio(f"{c} clients ClassifyDigits 1 PNG: short runs inline vs every run in a thread",
                      *_in_turn(v["inline-off"], f"classify-png/{m}/b1/c{c}")),
                Ratio("ModelInfer raw b1024: short runs inline vs every run in a thread",
                      *_in_turn(v["inline-off"], f"modelinfer-raw/{m}/b{server_load.RAW_BATCH}/c1")),
                Ratio(f"{c} clients h2load ModelInfer: every short run inline vs the default",
                      *_in_turn_reversed(v["inline-all"], f"h2load/modelinfer-raw/{m}/c{c}")),
                Ratio(f"{c} clients ModelInfer raw 1 image (grpc.aio client): every short run inline vs the default",
                      *_in_turn_reversed(v["inline-all"], f"modelinfer-raw/{m}/b1/c{c}")),
                Ratio(f"{c} clients ClassifyDigits 1 PNG: every short run inline vs the default",
                      *_in_turn_reversed(v["inline-all"], f"classify-png/{m}/b1/c{c}")),
                Ratio("ModelInfer raw b1024: freed memory kept vs glibc's defaults",
                      *_in_turn(v["heap-default"], f"modelinfer-raw/{m}/b{server_load.RAW_BATCH}/c1")),
                Ratio(f"ClassifyDigits PNG batches of {server_load.PNG_BATCH}: freed memory kept vs glibc's defaults",
                      *_in_turn(v["heap-default"],
                                f"classify-png/{m}/b{server_load.PNG_BATCH}/c{server_load.IN_FLIGHT}")),
                Ratio(f"ClassifyDigits PNG batches of {server_load.PNG_BATCH}: decoding processes vs in-process",
                      *_in_turn(v["decode-in-process"],
                                f"classify-png/{m}/b{server_load.PNG_BATCH}/c{server_load.IN_FLIGHT}")),
                *self._peer_ratios(m),
                Ratio(f"{c} clients h2load ModelInfer: --workers {w} vs one process",
                      *_in_turn_reversed(v["workers"], f"h2load/modelinfer-raw/{m}/c{c}")),
                Ratio(f"{c} clients h2load ClassifyDigits 1 PNG: --workers {w} vs one process",
                      *_in_turn_reversed(v["workers"], f"h2load/classify-png/{m}/c{c}")),
                Ratio(f"{c} clients ModelInfer raw 1 image (grpc.aio client): --workers {w} vs one process",
                      *_in_turn_reversed(v["workers"], f"modelinfer-raw/{m}/b1/c{c}")),
                Ratio(f"{c} clients ClassifyDigits 1 PNG: {delay} vs none",
                      *_in_turn(v["queue-delay"], f"classify-png/{m}/b1/c{c}")),
                Ratio(f"{c} clients ModelInfer raw 1 image (grpc.aio client): {delay} vs none",
                      *_in_turn(v["queue-delay"], f"modelinfer-raw/{m}/b1/c{c}")),
                Ratio(f"{c} clients h2load ModelInfer: {delay} vs none",
                      *_in_turn(v["queue-delay"], f"h2load/modelinfer-raw/{m}/c{c}")),
                Ratio(f"unary ClassifyDigits 1 PNG: {delay} vs none (a lone caller should not wait)",
                      *_in_turn(v["queue-delay"], f"classify-png/{m}/b1/c1")),
                Ratio(f"batch --local vs in-process ORT on decoded tensors ({n} PNGs)",
                      f"batchcli/local/{m}/n{n}", f"batchcli/ort-decoded/{m}/n{n}", 0.7),
                Ratio(f"batch --server vs in-process ORT on decoded tensors ({n} PNGs)",
                      f"batchcli/server/{m}/n{n}", f"batchcli/ort-decoded/{m}/n{n}"),
                *([Ratio(f"batch --local on a GPU host: --device cpu vs cuda ({n} PNGs)",
                         f"batchcli/local-cpu/{m}/n{n}", f"batchcli/local/{m}/n{n}")] if self.cuda else []),
            ]
        return out

    def _peer_ratios(self, m: str) -> list[Ratio]:
        """CourseZoo against the PyTriton peer at 64 clients: rows measured in turn (``peer``), and ``--workers``
        against the peer, whose rows come from separate groups (and say so)."""
        c, w, peer = server_load.CLIENTS, self.args.workers, PEER
        rows = {client: (f"{server_load.PEER_TURN}/oip/coursezoo/{client}/{m}/c{c}",
                         f"{server_load.PEER_TURN}/oip/triton/{client}/{m}/c{c}") for client in OIP_CLIENTS}
        rows["h2load"] = (f"{server_load.PEER_TURN}/h2load/coursezoo/modelinfer-raw/{m}/c{c}",
                          f"{server_load.PEER_TURN}/h2load/triton/modelinfer-raw/{m}/c{c}")
        return [
            Ratio(f"{c} clients tritonclient-aio: CourseZoo vs {peer}, measured in turn", *rows["tritonclient-aio"],
                  2.0),
            Ratio(f"{c} clients tritonclient-aio: CourseZoo vs {peer}, measured in turn, CPU per item",
                  *rows["tritonclient-aio"], by_cpu=True),
            Ratio(f"{c} clients tritonclient-grpc: CourseZoo vs {peer}, measured in turn", *rows["tritonclient-grpc"]),
            Ratio(f"{c} clients h2load: CourseZoo vs {peer}, measured in turn", *rows["h2load"], 2.0),
            Ratio(f"{c} clients h2load: CourseZoo vs {peer}, measured in turn, CPU per item", *rows["h2load"],
                  by_cpu=True),
            Ratio(f"{c} clients h2load: CourseZoo --workers {w} vs {peer}, rows of separate groups",
                  f"{self.variants['workers'].prefix}/h2load/modelinfer-raw/{m}/c{c}", rows["h2load"][1], 2.0),
        ]

    def targets(self) -> list[Target]:
        digits = self.by_task.get("digits")
        if not digits:
            return []
        m, c = digits.name, server_load.CLIENTS
        return [
            Target("unary ClassifyDigits 1 PNG p50 ms", f"server/classify-png/{m}/b1/c1", "p50_ms", "<=", 1.0),
            Target("unary ClassifyDigits 1 PNG p99 ms", f"server/classify-png/{m}/b1/c1", "p99_ms", "<=", 2.5),
            # The same call from the C client: the Python client's own ~0.25 ms per call is then left out.
            Target("unary ClassifyDigits 1 PNG p50 ms, h2load client", f"h2load/coursezoo/classify-png/{m}/c1",
                   "p50_ms", "<=", 1.0),
            Target("unary ClassifyDigits 1 PNG p99 ms, h2load client", f"h2load/coursezoo/classify-png/{m}/c1",
                   "p99_ms", "<=", 2.5),
            Target("ClassifyDigits PNG batches of 256, mnist_cnn, images/s",
                   f"server/classify-png/mnist_cnn/b{server_load.PNG_BATCH}/c{server_load.IN_FLIGHT}",
                   "throughput", ">=", 10_000),
            Target(f"{c} clients tritonclient-aio single image p99 ms", f"oip/coursezoo/tritonclient-aio/{m}/c{c}",
                   "p99_ms", "<=", 50.0),
            Target(f"{c} clients ClassifyDigits 1 PNG p99 ms", f"server/classify-png/{m}/b1/c{c}", "p99_ms", "<=",
                   50.0),
        ]


def _in_turn(variant: server_load.Variant, row: str) -> tuple[str, str]:
    """The keys of one row as measured in turn: on the default server (the ratio's numerator), then on
    ``variant``."""
    return f"{variant.baseline.prefix}/{row}", f"{variant.prefix}/{row}"


def _in_turn_reversed(variant: server_load.Variant, row: str) -> tuple[str, str]:
    """``_in_turn`` with the variant as the numerator: for a setting that is meant to add speed."""
    default, changed = _in_turn(variant, row)
    return changed, default


def _rounds_in_turn(sides: list[tuple[Any, list[dict[str, Any]]]], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Each side's cases against its server (a ``Server`` or the peer: ``target``, ``pgid``), one side after the
    other, ``rounds`` times: every row's rounds, by key, for ``_one_round``."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for srv, cases in sides:
            for row in load(srv.target, cases, srv.pgid):
                by_key.setdefault(row["key"], []).append(row)
    return by_key


#: A row's latency columns, and the timed calls they come from
LATENCIES = ("calls", "p50_ms", "p90_ms", "p99_ms")


def _one_round(rows: list[dict[str, Any]], fastest: bool = False) -> dict[str, Any]:
    """Of one case's rounds, the one with the median throughput, its note saying so. With ``fastest``, the
    throughput and CPU per call are the fastest round's, the latencies (and the calls they come from) still the
    median round's: a fastest round's percentiles would be the luckiest of several draws."""
    if len(rows) == 1 or any("error" in r for r in rows):
        return next((r for r in rows if "error" in r), rows[0])
    ranked = sorted(rows, key=lambda r: r["throughput"])
    median = ranked[len(rows) // 2]
    rates = ", ".join(f"{r['throughput']:,.0f}" for r in rows)
    if not fastest:
        return {**median, "note": f"{median['note']}; median of {len(rows)} rounds in turn ({rates} items/s)"}
    return {**ranked[-1], **{k: median[k] for k in LATENCIES},
            "note": f"{median['note']}; items/s and CPU: the fastest of {len(rows)} rounds in turn ({rates} items/s), "
                    f"latencies: the median round ({median['throughput']:,.0f} items/s)"}


def peer_on_wrong_device(cuda: bool, provider: str) -> str | None:
    """Why the peer must not be compared (or None): on a GPU run, a peer whose ONNX Runtime fell back to the CPU
    (its CUDA libraries missing, say) would make the ratio one of devices, not of serving stacks."""
    if cuda and provider != "CUDAExecutionProvider":
        return (f"the PyTriton peer runs ONNX Runtime on {provider or 'an unknown provider'}, not "
                "CUDAExecutionProvider, on a GPU run: its rows would compare devices, so none are measured")
    return None


#: The server settings that shape a benchmark: recorded in the JSON and passed to every server explicitly.
SPELLED_OUT = ("max_batch_size", "max_queue_delay_ms", "adaptive_queue_delay", "inline_run_ms", "decode_processes",
               "workers", "keep_heap")


def _server_defaults() -> dict[str, Any]:
    """The server's own defaults for the settings that shape a benchmark, as its code declares them."""
    from serving.server import ServerSettings

    keep = (*SPELLED_OUT, "max_queue_items", "intra_op_threads", "max_items_per_request")
    return {f.name: f.default for f in dataclasses.fields(ServerSettings) if f.name in keep}


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``, ``kill``, a cancelled CI job) unwinds the run as Ctrl-C does, so every ``with``
    block stops what it started: the servers and the peer run in sessions of their own, which no signal to
    this process reaches. Raised once: a second SIGTERM (``timeout`` also signals the whole process group)
    must not cut the clean-up short."""
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _ort_threads(intra_op_threads: int | None) -> dict[str, str]:
    """How ONNX Runtime runs in each kind of row: the paths differ in this on purpose, and a reader of the
    numbers must know how (read from ``serving.runtime``, which the servers and the peer's options come from)."""
    from serving import runtime
    from serving.workers import cores

    config = ", ".join(f"{key}={value}" for key, value in runtime.SESSION_CONFIG.items())
    lanes = intra_op_threads or f"one per core, {cores()} here"
    pool = f"of {intra_op_threads} threads" if intra_op_threads else "of one thread per physical core"
    return {
        "in-process ORT rows, batch CLI baseline": "onnxruntime's defaults (an intra-op pool of one thread per "
                                                   "physical core, spinning on); on CUDA serving.runtime's CUDA "
                                                   "options",
        "CourseZoo servers, in-process CourseZoo runtime rows": (
            f"serving.runtime: on the CPU single-threaded sessions, batches of more than {runtime.SMALL_BATCH} "
            f"items cut into slices of at most {runtime.SLICE_ITEMS} that run side by side on lane threads "
            f"({lanes}; per process with --workers) where slicing pays for the model; on CUDA an intra-op pool "
            f"{pool} for the operators left on the CPU, and serving.runtime's CUDA options; both with {config}"),
        "coursezoo batch --local": "serving.runtime as in the servers, with the batch CLI's own thread count",
        PEER: f"onnxruntime's default intra-op pool (one thread per physical core) with serving.runtime's session "
              f"config entries ({config}) and CUDA options",
    }


def set_data_places(root: Path | None, mirror: Path | None) -> None:
    """Put the data places (the options, else the environment's, else the defaults) in the environment as
    absolute paths: ``bench.data`` reads them there, here and in the load generators this run starts, which
    run in the repository root, where a relative path the user meant from elsewhere would miss."""
    data.choose_places(root, mirror)
    for variable, place in zip(("COURSEZOO_DATA_ROOT", "COURSEZOO_DATA_MIRROR"), data.places(), strict=True):
        os.environ[variable] = str(_absolute(str(place)))


def _preflight(args: argparse.Namespace) -> str | None:
    """Why the run cannot start (the results unwritable, a data file missing), or None: checked before any
    server starts, since without them every case fails, after minutes."""
    for path in (args.json, markdown_path(args.json)):
        if why := unwritable(path):
            return f"cannot write the results: {why} (--json)"
    set_data_places(args.data_root, args.data_mirror)
    try:
        for rel in data.FILES:
            data.data_file(rel)
    except FileNotFoundError as e:
        return str(e)
    return None


def _run_groups(run: Run, cases: set[str]) -> None:
    """Measure the selected groups, each server group against one copy of the exports."""
    if not run.by_task.get("digits"):
        run.notes.append("no digits model selected: the server's digits, OIP, batch-CLI and peer cases are skipped")
    if "inprocess" in cases:
        run.group("in-process baselines", run.inprocess)
    if cases & {"server", "raw-in-turn", "oip", "batch-cli", *VARIANTS, "peer"}:
        with exports.server_repository(run.server_models) as tmp_repo:
            if cases & {"server", "oip", "batch-cli"}:
                run.group("server (default settings)", lambda: run.server(cases, Path(tmp_repo)))
            if "raw-in-turn" in cases:
                run.group("server (raw and shared-memory ModelInfer, in-process ORT, in turn)",
                          lambda: run.raw_in_turn(Path(tmp_repo)))
            for name in VARIANTS:
                if name in cases:
                    run.group(f"server ({name})", lambda name=name: run.variant(name, Path(tmp_repo)))
            if "peer" in cases:
                run.group(f"{PEER} and a default server, in turn", lambda: run.peer(Path(tmp_repo)))


def main(args: argparse.Namespace) -> int:
    started = datetime.now(UTC)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if why := _preflight(args):
        print(f"coursezoo bench: {why}", file=sys.stderr)
        return 1
    plan = QUICK if args.quick else FULL
    if args.concurrency:
        plan = dataclasses.replace(plan, oip_concurrency=tuple(sorted(set(args.concurrency))))
    cases = set(args.cases or (QUICK_CASES if args.quick else CASES))
    names = args.models or list(exports.QUICK_MODELS if args.quick else exports.FULL_MODELS)
    selected, missing = exports.select(args.repo, names)
    if not selected:
        print(f"coursezoo bench: nothing to measure: {'; '.join(missing)}", file=sys.stderr)
        return 1
    at_start = machine.snapshot()
    cuda = args.device != "cpu" and inprocess.cuda_available(selected[0])
    if args.device == "cuda" and not cuda:
        print("coursezoo bench: --device cuda, but ONNX Runtime cannot use a GPU here", file=sys.stderr)
        return 1

    run = Run(args, plan, selected, cuda)
    run.notes += missing
    run.server_settings = _server_defaults()
    _run_groups(run, cases)

    ran = cases | ({H2LOAD} if h2load.find()[0] else set())
    ratios = report.compute_ratios(run.results, run.ratios(), ran)
    targets = report.check_targets(run.results, run.targets())
    best = report.best_batches(run.results)
    result = {
        **machine.run_record(started, at_start),
        "settings": {
            "command": " ".join(["coursezoo bench", *(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])]),
            "quick": args.quick, "device": "cuda" if cuda else "cpu", "cases": sorted(cases),
            "models": [f"{e.name}/{e.version}" for e in selected], "plan": dataclasses.asdict(plan),
            "server": {**run.server_settings, "flags": run.server_args()},
            "load_client": f"separate process; grpc.aio with pre-serialized requests (raw), tritonclient, or h2load; "
                           f"every client one TCP connection per {CALLERS_PER_CONNECTION} callers (at least "
                           f"{CONNECTIONS_PER_PROCESS} per server process against --workers), each row noting how "
                           "many it held",
            "ort_threads": _ort_threads(run.server_settings["intra_op_threads"]),
        },
        "groups": run.groups,
        "results": [r.to_json() for r in run.results],
        "ratios": ratios,
        "targets": targets,
        "best_batch": best,
        "notes": run.notes,
        "errors": run.errors,
    }
    print(report.render_text(run.results, ratios, targets, run.notes + [f"ERROR {e}" for e in run.errors], best))
    report.write_json(args.json, result)
    markdown_path(args.json).write_text(report.render_markdown(run.results, result), encoding="utf-8")
    print(f"\nwrote {args.json} and {markdown_path(args.json)}")
    return 1 if run.errors else 0
