"""Servers of their own: hot reload in a scratch repository, settings from the environment, limits,
unload/load, and a clean exit on SIGTERM. Waits are bounded polls of the server's state, never sleeps
whose length decides the outcome.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.card import sha256_file
from serving.client import CourseZooClient
from serving.process import ChildServer
from serving.protos import classifier_pb2 as pb
from tests.conftest import edit_card, wait_for

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

MODEL = "diabetes_mlp"
RECORD = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8]
#: card serving hints under which a batch waits 6 s for more (the drain tests' calls stay in the server)
WAITING_BATCHES = {"max_queue_delay_ms": 6000, "adaptive_queue_delay": False}


def add_version(repo: Path, source: Path, version: str, *, break_sha: bool = False) -> None:
    """Publish ``source`` as ``repo/MODEL/version`` the way an export should: build aside, rename in."""
    staging = repo / MODEL / f".staging-{version}"
    shutil.copytree(source, staging)
    edit_card(staging, lambda card: card.update(version=version))
    if break_sha:
        edit_card(staging, lambda card: card["files"]["model.onnx"].update(sha256="0" * 64))
    staging.rename(repo / MODEL / version)


@pytest.fixture(scope="module")
def source(exported_repo: Path) -> Path:
    return max((exported_repo / MODEL).iterdir(), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, source: Path,
            start_server: Callable[..., ServerProcess]) -> tuple[Path, ServerProcess]:
    """A server on a scratch repository holding version 1 of MODEL, polling it, with limits from the env."""
    repo = tmp_path_factory.mktemp("repo")
    add_version(repo, source, "1")
    env = {"COURSEZOO_MAX_ITEMS_PER_REQUEST": "16", "COURSEZOO_PORT": "1",  # the --port 0 flag beats this
           "COURSEZOO_POLL_INTERVAL_S": "0.2"}
    return repo, start_server(repo, "--max-queue-items", "8", env=env)


def test_settings_come_from_flags_then_environment(scratch: tuple[Path, ServerProcess]) -> None:
    _, proc = scratch
    assert not proc.target.endswith(":1")
    with CourseZooClient(proc.target) as client:
        assert len(client.classify_diabetes([RECORD] * 8).predictions) == 8
        with pytest.raises(grpc.RpcError) as info:
            client.classify_diabetes([RECORD] * 17)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 16" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # fits a request, not the model's queue of 8
            client.classify_diabetes([RECORD] * 9)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue holds at most 8" in info.value.details()


@pytest.mark.parametrize("variable,value,flag,why", [
    ("COURSEZOO_DEVICE", "gpu", "--device", "is not one of auto"),
    ("COURSEZOO_MODEL_CONTROL", "yes", "--model-control", "is not one of auto"),
    ("COURSEZOO_PORT", "abc", "--port", "is not a valid int"),
    ("COURSEZOO_MAX_QUEUE_ITEMS", "0", "--max-queue-items", "is below 1"),
    ("COURSEZOO_GRACE_S", "nan", "--grace-s", "is not a finite number")])  # NaN ended the drain at once
def test_a_bad_variable_stops_the_start_and_is_named(tmp_path: Path, variable: str, value: str, flag: str,
                                                     why: str) -> None:
    """As the flag would: a mistyped COURSEZOO_DEVICE must not leave a server running with no model loaded; and
    the error names the variable, which is where the value came from."""
    port = [] if flag == "--port" else ["--port", "0"]  # a flag wins over its variable, which is then not read
    done = subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--repo", str(tmp_path), *port],
                          capture_output=True, text=True, timeout=120, env={**os.environ, variable: value})
    assert done.returncode == 2
    assert f"argument {flag}: {value!r} {why}" in done.stderr and f"or else {variable})" in done.stderr


@pytest.mark.parametrize("flag,value", [("--max-queue-items", "0"), ("--grace-s", "-1"), ("--workers", "0")])
def test_a_setting_below_its_least_stops_the_start(tmp_path: Path, flag: str, value: str) -> None:
    """A queue of none refused every request; a negative grace ended the drain at once."""
    done = subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--repo", str(tmp_path), "--port", "0", flag,
                           value], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"argument {flag}: {value!r} is below" in done.stderr, done.stderr


def test_a_repository_that_is_not_there_stops_the_start(tmp_path: Path) -> None:
    """A typo in --repo served nothing, unhealthy for good, with one warning in the log."""
    done = subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--repo", str(tmp_path / "typo"), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == f"coursezoo serve: the model repository {tmp_path / 'typo'} is not a directory: " \
        "expected <repo>/<name>/<version>/{model.onnx,model.json} (--repo, or COURSEZOO_REPO)"


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="a GPU is here: --device cuda serves")
def test_device_cuda_without_a_gpu_is_one_line_not_a_traceback(tmp_path: Path, source: Path) -> None:
    add_version(tmp_path, source, "1")
    done = subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--repo", str(tmp_path), "--port", "0",
                           "--metrics-port", "-1", "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "coursezoo serve: device 'cuda': CUDAExecutionProvider cannot be used" in done.stderr


def test_latest_versions_serves_the_newest_and_says_so(tmp_path: Path, source: Path,
                                                       start_server: Callable[..., ServerProcess]) -> None:
    for version in ("1", "2"):
        add_version(tmp_path, source, version)
    server = start_server(tmp_path, "--latest-versions", "1")
    client = triton.InferenceServerClient(server.target)
    assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")
    policy = client.get_model_config(MODEL).config.version_policy
    assert policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions == 1


def test_each_version_is_counted_in_its_own_series(tmp_path: Path, source: Path,
                                                  start_server: Callable[..., ServerProcess]) -> None:
    """While two versions serve (a canary beside the old one), their calls, items, failures and batches are told
    apart, as Triton's metrics are: a call counts under the version that answered it, or, failing, the one it was
    to run on (the default model's for a call that names none), and one that names a version that does not serve
    under "", whatever it sent."""
    for version in ("1", "2"):
        add_version(tmp_path, source, version)
    server = start_server(tmp_path, "--poll-interval-s", "0.2")
    with CourseZooClient(server.target) as client:
        assert client.classify_diabetes([RECORD, RECORD]).model_version == "2"
        assert client.classify_diabetes([RECORD], version="1").model_version == "1"
        for model, version in (("", ""), (MODEL, ""), (MODEL, "1"), (MODEL, "99")):
            with pytest.raises(grpc.RpcError):  # one feature of 8: INVALID_ARGUMENT; no version 99: NOT_FOUND
                client.classify_diabetes([[0.0]], model=model, version=version)
    features = triton.InferInput("features", [3, 8], "FP32")
    features.set_data_from_numpy(np.tile(np.float32(RECORD), (3, 1)))
    assert triton.InferenceServerClient(server.target).infer(MODEL, [features], model_version="1") \
        .get_response().model_version == "1"
    series = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in server.metrics().splitlines()
              if line.startswith("coursezoo_")}
    call = f'model="{MODEL}",rpc="ClassifyDiabetes"'
    assert series[f"coursezoo_requests_total{{{call},version=\"2\"}}"] == 3
    assert series[f"coursezoo_requests_total{{{call},version=\"1\"}}"] == 2
    assert series[f"coursezoo_items_total{{{call},version=\"2\"}}"] == 2
    assert series[f"coursezoo_items_total{{{call},version=\"1\"}}"] == 1
    failures = "coursezoo_request_failures_total{code="
    assert series[f'{failures}"INVALID_ARGUMENT",{call},version="1"}}'] == 1
    assert series[f'{failures}"INVALID_ARGUMENT",{call},version="2"}}'] == 2  # the default model's too
    assert series[f'{failures}"NOT_FOUND",{call},version=""}}'] == 1
    assert series[f'coursezoo_items_total{{model="{MODEL}",rpc="ModelInfer",version="1"}}'] == 3
    assert series[f'coursezoo_batch_size_sum{{model="{MODEL}",version="1"}}'] == 1 + 3
    assert series[f'coursezoo_batch_size_sum{{model="{MODEL}",version="2"}}'] == 2
    assert not any('version="99"' in name for name in series)
    shutil.rmtree(tmp_path / MODEL / "1")  # retired on the next poll, and its series with it
    wait_for(lambda: 'version="1"' not in server.metrics(), "version 1's series to go")
    assert f'coursezoo_items_total{{{call},version="2"}} 2.0' in server.metrics()


def test_hot_reload_new_version_and_broken_version(scratch: tuple[Path, ServerProcess], source: Path) -> None:
    repo, proc = scratch
    triton_client = triton.InferenceServerClient(proc.target)
    with CourseZooClient(proc.target) as client:
        assert client.classify_diabetes([RECORD]).model_version == "1"

        add_version(repo, source, "2")  # picked up by polling
        wait_for(lambda: triton_client.is_model_ready(MODEL, "2"), "version 2 to load by polling")
        assert client.classify_diabetes([RECORD]).model_version == "2"
        assert client.classify_diabetes([RECORD], version="1").model_version == "1"

        add_version(repo, source, "3", break_sha=True)  # RepositoryModelLoad: the old version keeps serving
        triton_client.load_model(MODEL)
        index = {m["version"]: m for m in triton_client.get_model_repository_index(as_json=True)["models"]}
        assert index["3"]["state"] == "UNAVAILABLE" and "sha256" in index["3"]["reason"]
        assert index["2"]["state"] == "READY"
        assert client.classify_diabetes([RECORD]).model_version == "2"
        with pytest.raises(grpc.RpcError) as info:
            client.classify_diabetes([RECORD], version="3")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "sha256" in info.value.details()
        assert "model.onnx" in proc.output  # the broken version was logged

        add_version(repo, source, "4")  # served as soon as RepositoryModelLoad returns
        triton_client.load_model(MODEL)
        assert client.classify_diabetes([RECORD]).model_version == "4"


def test_unload_makes_a_model_unavailable_until_loaded(scratch: tuple[Path, ServerProcess]) -> None:
    _, proc = scratch
    triton_client = triton.InferenceServerClient(proc.target)
    with CourseZooClient(proc.target) as client, grpc.insecure_channel(proc.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service)).status

        triton_client.unload_model(MODEL)
        assert not triton_client.is_model_ready(MODEL)
        assert status(MODEL) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING  # no model left to serve
        client.timeout = 5  # UNAVAILABLE is retried by the client's policy; the model stays unloaded
        with pytest.raises(grpc.RpcError) as info:
            client.classify_diabetes([RECORD], model=MODEL)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "unloaded" in info.value.details()
        triton_client.unload_model("no_such_model")  # nothing to unload: done, as Triton answers clean-up code
        index = triton_client.get_model_repository_index(as_json=True)["models"]
        assert {"name": MODEL, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        assert not any(m["name"] == "no_such_model" for m in index)

        triton_client.load_model(MODEL)
        assert status(MODEL) == status("") == health_pb2.HealthCheckResponse.SERVING
        assert client.classify_diabetes([RECORD]).predictions


def test_sigterm_finishes_in_flight_work_and_exits_zero(start_server: Callable[..., ServerProcess], source: Path,
                                                        tmp_path: Path) -> None:
    """Calls in flight when SIGTERM arrives get their whole answers within --grace-s, and the server exits 0.
    The model's card makes a batch wait 6 s for more (not adaptive), and batches hold at most 2 records: the
    first call (1 record) forms a batch that waits, the second (2 records) cannot join it and queues, seen in
    ``coursezoo_queue_depth`` before the signal; so both are in the server, neither answered yet. With no grace
    they were cut off, and the test passed on an answer that came before the signal."""
    add_version(tmp_path, source, "1")
    edit_card(tmp_path / MODEL / "1", lambda card: card.update(serving=WAITING_BATCHES))
    proc = start_server(tmp_path, "--grace-s", "20", "--max-batch-size", "2")

    def queue_depth() -> str | None:
        return next((line.rsplit(" ", 1)[1] for line in proc.metrics().splitlines()
                     if line.startswith(f'coursezoo_queue_depth{{model="{MODEL}",version="1"}} ')), None)

    with CourseZooClient(proc.target) as client:
        record = pb.DiabetesRecord(features=RECORD)

        def call(n: int) -> grpc.Future:
            return client.stub.ClassifyDiabetes.future(pb.ClassifyDiabetesRequest(model=MODEL, records=[record] * n),
                                                       timeout=30)

        assert queue_depth() is None  # the model's series starts with the first item to enter its queue
        futures = [call(1)]  # sent alone: two calls, even on one connection, may reach the batcher in either order
        wait_for(lambda: queue_depth() is not None, "the first call to enter the queue")
        futures.append(call(2))
        wait_for(lambda: queue_depth() == "2.0", "the second call's 2 records to queue behind the first's batch")
        assert not any(f.done() for f in futures)
        assert proc.stop(signal.SIGTERM) == 0
        assert [len(f.result(timeout=30).predictions) for f in futures] == [1, 2]
    assert "coursezoo stopped" in proc.output


def test_calls_cut_off_by_the_end_of_the_grace_period_are_a_warning(start_server: Callable[..., ServerProcess],
                                                                     source: Path, tmp_path: Path) -> None:
    """A stop that outlasted its grace period cut calls off and said nothing in the log. The same two waiting calls
    as above, with a grace period of 0.5 s."""
    add_version(tmp_path, source, "1")
    edit_card(tmp_path / MODEL / "1", lambda card: card.update(serving=WAITING_BATCHES))
    proc = start_server(tmp_path, "--grace-s", "0.5", "--max-batch-size", "2",
                        env={**os.environ, "COURSEZOO_LOG_LEVEL": "info"})
    with CourseZooClient(proc.target) as client:
        record = pb.DiabetesRecord(features=RECORD)

        def call(n: int) -> grpc.Future:
            return client.stub.ClassifyDiabetes.future(pb.ClassifyDiabetesRequest(model=MODEL, records=[record] * n),
                                                       timeout=30)

        futures = [call(1)]
        wait_for(lambda: f'coursezoo_queue_depth{{model="{MODEL}",version="1"}}' in proc.metrics(),
                 "the first call to queue")
        futures.append(call(2))
        wait_for(lambda: f'coursezoo_queue_depth{{model="{MODEL}",version="1"}} 2.0' in proc.metrics(),
                 "the second to queue")
        assert proc.stop(signal.SIGTERM) == 0
        assert all(f.exception(timeout=30) is not None for f in futures)
    lines = [json.loads(line) for line in proc.output.splitlines() if line.startswith("{")]
    said = {line["msg"].split(":")[0]: line for line in lines if line["logger"] == "coursezoo.serve"}
    assert said["stopping"]["in_flight"] == 2 and said["stopping"]["level"] == "INFO"
    assert said["the grace period (0.5 s) is over with 2 calls in flight"]["level"] == "WARNING"
    assert said["the grace period (0.5 s) is over with 2 calls in flight"]["cut_off"] == 2
    assert said["stopped"]["seconds"] >= 0.5


def test_a_health_watch_hears_not_serving_and_does_not_hold_up_a_stop(start_server: Callable[..., ServerProcess],
                                                                      source: Path, tmp_path: Path) -> None:
    """A prober watching health (grpc.health.v1 Watch, as Kubernetes and load balancers do) is told
    NOT_SERVING when the drain starts, and its endless stream does not keep the server for the whole
    grace period: the stop below would time out (30 s) and kill it, with a grace of 120 s."""
    add_version(tmp_path, source, "1")
    proc = start_server(tmp_path, "--grace-s", "120")
    with grpc.insecure_channel(proc.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert proc.stop(signal.SIGTERM, timeout=30) == 0
        heard = []
        with pytest.raises(grpc.RpcError):  # the stream ends with the server
            heard.extend(reply.status for reply in watch)
        assert heard == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_an_open_stream_is_ended_by_the_drain_after_its_answers(start_server: Callable[..., ServerProcess],
                                                                 source: Path, tmp_path: Path) -> None:
    """A stream kept taking requests after SIGTERM until the grace period ran out, and was then cut off with its
    requests in flight. Now it answers those read and ends UNAVAILABLE at once: the stop below would time out
    (30 s) with a grace of 120 s."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    add_version(tmp_path, source, "1")
    proc = start_server(tmp_path, "--grace-s", "120")
    outbox: queue.Queue[object] = queue.Queue()

    def requests() -> Iterator[object]:
        while (request := outbox.get()) is not None:
            yield request

    def request(i: int) -> object:
        message = service_pb2.ModelInferRequest(model_name=MODEL, id=str(i), raw_input_contents=[bytes(32)])
        message.inputs.add(name="features", datatype="FP32", shape=[1, 8])
        return message

    with grpc.insecure_channel(proc.target) as channel:
        replies = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=300)
        ids = []
        for i in range(3):
            outbox.put(request(i))
            ids.append(next(replies).infer_response.id)
        assert proc.stop(signal.SIGTERM, timeout=30) == 0
        with pytest.raises(grpc.RpcError) as info:
            ids.extend(reply.infer_response.id for reply in replies)
        outbox.put(None)
    assert ids == ["0", "1", "2"]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "send the rest on a new stream" in info.value.details()


def test_a_chunked_call_is_answered_by_one_version_when_a_new_one_arrives_midway(
        start_server: Callable[..., ServerProcess], source: Path, tmp_path: Path) -> None:
    """CourseZooClient splits a job into chunks, each asking for the newest version; version 2 is published
    and loaded between the first chunk and the second (by a spy around the real stub). The chunk version 1
    answered is asked again of version 2: the reply is version 2's throughout, as it says."""
    add_version(tmp_path, source, "1")
    retrained = tmp_path / "retrained"  # version 2: other weights, so that its answers differ
    shutil.copytree(source, retrained)
    model = onnx.load(retrained / "model.onnx")
    weights = model.graph.initializer[0]
    weights.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weights) * 2, weights.name))
    onnx.save(model, retrained / "model.onnx")
    edit_card(retrained, lambda card: card["files"].update({"model.onnx": {
        "sha256": sha256_file(retrained / "model.onnx"), "bytes": (retrained / "model.onnx").stat().st_size}}))
    proc = start_server(tmp_path, "--poll-interval-s", "0")

    class PublishingAfterTheFirstChunk:
        def __init__(self, stub: object) -> None:
            self.stub, self.calls = stub, 0

        def __getattr__(self, method: str) -> object:
            return self

        def future(self, request: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls == 2:
                add_version(tmp_path, retrained, "2")
                triton.InferenceServerClient(proc.target).load_model(MODEL)
            return self.stub.ClassifyDiabetes.future(request, **kwargs)

        def __call__(self, request: object, **kwargs: object) -> object:
            return self.stub.ClassifyDiabetes(request, **kwargs)

    with CourseZooClient(proc.target, chunk_size=2, max_in_flight=1) as client:
        client._stubs = [PublishingAfterTheFirstChunk(stub) for stub in client._stubs]
        reply = client.classify_diabetes([RECORD] * 4, model=MODEL)
        assert (reply.model, reply.model_version, len(reply.predictions)) == (MODEL, "2", 4)
        again = client.classify_diabetes([RECORD] * 4, model=MODEL, version="2")
        assert [p.probability for p in reply.predictions] == [p.probability for p in again.predictions]
        first = client.classify_diabetes([RECORD], model=MODEL, version="1").predictions[0].probability
        assert first != again.predictions[0].probability  # the versions do answer differently


def test_a_taken_metrics_port_fails_the_start_cleanly(source: Path, tmp_path: Path) -> None:
    """Found before serving, named in one line; not a traceback of a half-started server."""
    add_version(tmp_path, source, "1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "coursezoo", "serve", "--repo", str(tmp_path), "--host",
                               "127.0.0.1", "--port", "0", "--metrics-port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-port): Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_server_raises_its_open_files_limit(exported_repo: Path) -> None:
    """Every connection is a descriptor: under a soft limit of 1024 (systemd's default; the hard one is far
    higher) a thousand idle connections left none for new clients. The server lifts it to the hard limit."""
    script = ("import resource, runpy, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); sys.argv = ['coursezoo', *sys.argv[1:]]; "
              "runpy.run_module('coursezoo', run_name='__main__')")
    server = ChildServer([sys.executable, "-c", script, "serve", "--repo", str(exported_repo), "--host", "127.0.0.1",
                          "--port", "0", "--metrics-port", "-1", "--poll-interval-s", "0"], env=dict(os.environ))
    with server:
        assert server.proc is not None
        line = next(line for line in Path(f"/proc/{server.proc.pid}/limits").read_text().splitlines()
                    if line.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        assert soft == hard != "256", line


@pytest.mark.parametrize("hard", [256, None])
def test_a_low_open_files_limit_is_a_warning_at_start(hard: int | None, tmp_path: Path) -> None:
    """Under a hard limit of 256 nothing said so until clients timed out and /metrics went dark. (The repository is
    missing, so the server stops right after the check: the warning comes first.)"""
    if hard is None and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096:  # serving.server.LOW_OPEN_FILES,
        # not importable here beside tritonclient (their protobuf descriptors clash)
        pytest.skip("this machine's own hard limit on open files is low: the server warns on it too")
    limit = f"resource.setrlimit(resource.RLIMIT_NOFILE, ({hard}, {hard})); " if hard else ""
    script = (f"import resource, runpy, sys; {limit}sys.argv = ['coursezoo', *sys.argv[1:]]; "
              "runpy.run_module('coursezoo', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script, "serve", "--repo", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    warnings = [json.loads(line) for line in done.stderr.splitlines() if "may open only" in line]
    if hard:
        assert [(w["level"], w["open_files_limit"]) for w in warnings] == [("WARNING", 256)]
    else:
        assert not warnings


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + bytes([4, 0]) + bytes(4)  # a client preface, empty SETTINGS
GOAWAY = 7  # HTTP/2 frame type


def _frame_types_until_closed(sock: socket.socket) -> list[int]:
    """The types of the HTTP/2 frames the server sends until it closes ``sock`` (socket.timeout if it does not)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    types, at = [], 0
    while at + 9 <= len(data):
        types.append(data[at + 3])
        at += 9 + int.from_bytes(data[at:at + 3], "big")
    return types


@pytest.mark.parametrize("limit", ["HANDSHAKE_TIMEOUT_S", "MAX_CONNECTION_IDLE_S"])
def test_silent_and_idle_connections_are_closed(exported_repo: Path, limit: str) -> None:
    """A connection that never finishes its handshake, or carries no call for ``MAX_CONNECTION_IDLE_S``, holds a
    descriptor: 1,100 such connections took them all. gRPC's defaults keep them for two minutes and for ever.
    Here the one ``limit`` tested is 1 s (20 s and 5 minutes when served) and the other an hour, so that only it
    can close the connection within the test's 15 s: the silent one, or the idle one with a GOAWAY."""
    script = (f"import runpy, sys, serving.server as s; s.HANDSHAKE_TIMEOUT_S = s.MAX_CONNECTION_IDLE_S = 3600.0; "
              f"s.{limit} = 1.0; sys.argv = ['coursezoo', *sys.argv[1:]]; runpy.run_module('coursezoo', "
              "run_name='__main__')")
    server = ChildServer([sys.executable, "-c", script, "serve", "--repo", str(exported_repo), "--host", "127.0.0.1",
                          "--port", "0", "--metrics-port", "-1", "--poll-interval-s", "0"], env=dict(os.environ))
    with server, socket.create_connection(server.target.rsplit(":", 1), timeout=15) as sock:
        if limit == "MAX_CONNECTION_IDLE_S":
            sock.sendall(PREFACE)
            assert GOAWAY in _frame_types_until_closed(sock)
        else:  # the server's SETTINGS, and nothing from the client
            _frame_types_until_closed(sock)


def _fails_at_run_time(folder: Path) -> None:
    """Make ``folder``'s diabetes export one that loads, warms up (on ones) and answers, but fails inside ONNX
    Runtime for a batch whose first record's first feature is below -0.99: the mean of each record's features,
    taken through a Reshape to rows of 8, or of 3 for such a batch, which 8 values cannot fill ("The input tensor
    cannot be reshaped", an ORT ``Fail``: the server's own failure, not the caller's)."""
    from onnx import TensorProto, helper

    def const(name: str, value: object) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(np.asarray(value), name)

    graph = helper.make_graph(
        [helper.make_node("Slice", ["features", "zeros", "ones", "zeros"], ["first_record"]),
         helper.make_node("Gather", ["first_record", "zero"], ["first_feature"], axis=1),
         helper.make_node("Less", ["first_feature", "limit"], ["low"]),
         helper.make_node("Cast", ["low"], ["lowered"], to=TensorProto.INT64),
         helper.make_node("Mul", ["lowered", "five"], ["cut"]),
         helper.make_node("Sub", ["eight", "cut"], ["width"]),
         helper.make_node("Concat", ["any", "width"], ["shape"], axis=0),
         helper.make_node("Reshape", ["features", "shape"], ["rows"]),
         helper.make_node("ReduceMean", ["rows", "ones"], ["probability"], keepdims=1)],
        "fails_at_run_time",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        [const("zeros", np.int64([0])), const("ones", np.int64([1])), const("zero", np.int64(0)),
         const("limit", np.float32([-0.99])), const("five", np.int64([5])), const("eight", np.int64([8])),
         const("any", np.int64([-1]))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
              folder / "model.onnx")
    edit_card(folder, lambda card: card["files"]["model.onnx"].update(sha256=sha256_file(folder / "model.onnx")))


def test_a_version_failing_at_run_time_is_internal_and_logged_under_that_version(
        tmp_path: Path, source: Path, start_server: Callable[..., ServerProcess]) -> None:
    """The server's own failure, through a real server: INTERNAL, its details kept from the client and logged
    with a traceback, counted and logged under the version that failed (the default, version 2, for a call
    that pinned none: the log said version ""), while version 1 answers the same record."""
    for version in ("1", "2"):
        add_version(tmp_path, source, version)
    _fails_at_run_time(tmp_path / MODEL / "2")
    server = start_server(tmp_path)
    bad = [-1.0, *RECORD[1:]]
    with CourseZooClient(server.target) as client:
        assert client.classify_diabetes([RECORD]).model_version == "2"
        with pytest.raises(grpc.RpcError) as info:
            client.classify_diabetes([bad])
        assert client.classify_diabetes([bad], version="1").model_version == "1"
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error (Fail); the server log has the details"
    failures = 'coursezoo_request_failures_total{code="INTERNAL",model="diabetes_mlp",rpc="ClassifyDiabetes"'
    assert f'{failures},version="2"}} 1.0' in server.metrics()
    server.stop()
    logged = [json.loads(line) for line in server.output.splitlines() if line.startswith("{")]
    internal = [line for line in logged if line["msg"] == "internal error"]
    assert len(internal) == 1 and "cannot be reshaped" in internal[0]["exc"]
    assert (internal[0]["model"], internal[0]["version"], internal[0]["rpc"]) == (MODEL, "2", "ClassifyDiabetes")
