"""The load clients open the connections the harness says they do, and the peer comparison divides rows of the
same rounds: gRPC quietly shares one TCP connection among channels of identical arguments, and a ratio of rows
measured minutes apart moved with the machine."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as tc_grpc
import tritonclient.grpc.aio as tc_aio

from bench import exports, harness, loadgen, report, server_load
from bench.processes import Server, load
from tests.conftest import DATA_MIRROR, EXPORTED

TIMING = {"seconds": 0.3, "warmup": 0.1}


def test_callers_spread_over_connections_by_the_rule() -> None:
    """One connection per 4 callers; against several server processes at least 4 each (SO_REUSEPORT spreads
    connections, not calls); never more than the callers."""
    assert [loadgen.connections(c) for c in (1, 4, 5, 8, 64)] == [1, 1, 2, 2, 16]
    assert loadgen.connections(64, processes=2) == 16
    assert loadgen.connections(64, processes=8) == 32
    assert loadgen.connections(64, processes=16) == 64
    assert loadgen.connections(1, processes=2) == 1


@pytest.mark.parametrize("module, channel", [(tc_grpc, "grpc.insecure_channel"),
                                             (tc_aio, "grpc.aio.insecure_channel")])
def test_tritonclient_keeps_its_own_channel_arguments(module: Any, channel: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients get tritonclient's defaults (what it builds when given none) plus a connection of their own."""
    seen: list[list[tuple[str, Any]]] = []
    real = grpc.insecure_channel  # a plain channel serves either client: none of them sends a call here

    def spy(target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        seen.append(list(options))
        return real(target, options=options)

    monkeypatch.setattr(channel, spy)
    module.InferenceServerClient("127.0.0.1:1")
    assert loadgen.triton_channel_args(module) == [*seen[0], loadgen.OWN_CONNECTION]


def test_every_client_holds_the_connections_it_is_meant_to(server, digits_model: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted from /proc by the load generator while it runs: 8 callers hold 2 connections, 8 against a
    server of 2 processes 8, whichever client sends (tritonclient's clients all shared one before)."""
    monkeypatch.setenv("COURSEZOO_DATA_MIRROR", str(DATA_MIRROR))
    selected, _ = exports.select(EXPORTED, [digits_model])
    digits = selected[0]
    cases = server_load.oip_cases(digits, "coursezoo", (8,), harness.OIP_CLIENTS, TIMING)
    raw = [case for case in server_load.concurrent(digits, TIMING) if case["kind"] == "model_infer"][0]
    cases += [{**raw, "concurrency": 8}, {**raw, "key": "spread", "concurrency": 8, "processes": 2}]
    # one caller, its inputs in shared memory: the region's registration channel is not the client's own
    cases.append(server_load.shared_memory_batches(digits, TIMING, server_load.DEFAULT))
    rows = load(server.target, cases)
    assert [r.get("error") for r in rows] == [None] * len(rows)
    assert [r["connections"] for r in rows] == [2, 2, 2, 8, 1]
    assert all(r["note"].endswith(f"{r['connections']} TCP connection" + "s" * (r["connections"] != 1)) for r in rows)


def _stand_in_peer(repo: Path, provider: str) -> type:
    """A CourseZoo server in the PyTriton peer's place: what is under test is how the harness measures the two
    servers, not Triton."""

    class StandIn(Server):
        def __init__(self, python: Path, export: exports.Export, **_: Any) -> None:
            super().__init__(repo, "--device", "cpu")
            self.provider = provider

    return StandIn


def _peer_run(digits_model: str, monkeypatch: pytest.MonkeyPatch, cuda: bool = False) -> harness.Run:
    args = harness.get_args_parser().parse_args(["--models", digits_model, "--repo", str(EXPORTED)])
    plan = dataclasses.replace(harness.QUICK, oip_concurrency=(server_load.CLIENTS,), ab_rounds=2,
                               load_seconds=TIMING["seconds"], load_warmup=TIMING["warmup"])
    run = harness.Run(args, plan, exports.select(EXPORTED, [digits_model])[0], cuda)
    # the server's own defaults (harness._server_defaults) import its protos, which clash with tritonclient's here
    run.server_settings = {"max_batch_size": 64, "max_queue_delay_ms": 1.0}
    monkeypatch.setattr(run, "server_args", lambda: ["--device", "cpu"])
    return run


def test_the_peer_comparison_divides_rows_of_the_same_rounds(digits_model: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURSEZOO_DATA_MIRROR", str(DATA_MIRROR))
    run = _peer_run(digits_model, monkeypatch)
    monkeypatch.setattr(harness.triton_peer, "find_python", lambda: (Path(sys.executable), "a stand-in"))
    with exports.server_repository(run.server_models) as repo:
        monkeypatch.setattr(harness.triton_peer, "TritonPeer", _stand_in_peer(Path(repo), "CPUExecutionProvider"))
        run.group("peer", lambda: run.peer(Path(repo)))
    assert run.errors == []
    rows = {r.key: r for r in run.results}
    for key, row in rows.items():
        assert key.startswith(f"{server_load.PEER_TURN}/") and row.group == "peer"
        assert "median of 2 rounds in turn" in row.note, row.note
    ours = {k for k in rows if "/coursezoo/" in k}
    assert ours and {k.replace("/coursezoo/", "/triton/") for k in ours} == set(rows) - ours  # each has its twin
    ran = {"peer", harness.H2LOAD} if harness.h2load.find()[0] else {"peer"}
    peer_ratios = [r for r in run.ratios() if "peer" in r.needs]
    assert peer_ratios and all("PyTriton peer (Python backend)" in r.name for r in peer_ratios)
    for ratio in report.compute_ratios(run.results, peer_ratios, ran):
        assert (ratio["value"] is not None) == (not ratio["not_run"]), ratio
        if ratio["value"] is not None:
            assert "measured in turn" in ratio["name"]
            assert {ratio["numerator"]["key"], ratio["denominator"]["key"]} <= set(rows)


def test_a_peer_on_the_cpu_in_a_gpu_run_fails_the_group(digits_model: str, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """Its ONNX Runtime fell back to the CPU: the group is an error, and no CourseZoo server is even started."""
    run = _peer_run(digits_model, monkeypatch, cuda=True)
    monkeypatch.setattr(harness.triton_peer, "find_python", lambda: (Path(sys.executable), "a stand-in"))

    class FellBack:
        provider = "CPUExecutionProvider"

        def __init__(self, *_: Any, **__: Any) -> None: ...

        def __enter__(self) -> FellBack:
            return self

        def __exit__(self, *_: object) -> None: ...

    monkeypatch.setattr(harness.triton_peer, "TritonPeer", FellBack)
    monkeypatch.setattr(harness, "Server", None)  # starting one would fail the test with a TypeError
    run.group("peer", lambda: run.peer(tmp_path))
    assert run.results == []
    assert len(run.errors) == 1 and "CPUExecutionProvider, not CUDAExecutionProvider" in run.errors[0]
    assert harness.peer_on_wrong_device(True, "CUDAExecutionProvider") is None
    assert harness.peer_on_wrong_device(False, "CPUExecutionProvider") is None
