"""Faults on both ends: clients that cancel, half-close or give up before the batch runs; a server that is
stopped under load, whose model files are damaged while it serves, or that is offered broken versions.

The server must stay healthy, free the work nobody waits for, and never lose a request silently: every
call ends with an answer or a clean status. Waits are bounded polls of the server's state.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.protos import classifier_pb2 as pb
from serving.protos import classifier_pb2_grpc
from tests.conftest import edit_card
from tests.serving.test_server_lifecycle import wait_for

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

SLOW = "diabetes_mlp"  # its card in this module's repository says: wait 2 s to fill a batch
SLOW_DELAY_MS = 2000
RECORD = pb.DiabetesRecord(features=[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8])
PIXELS = pb.Image(pixels=bytes(range(256)) * 3 + bytes(16))


@pytest.fixture(scope="module")
def repo(scratch_repo: Path) -> Path:
    """The scratch repository with a long batching delay for SLOW, waited out by every batch (not adaptive),
    set the supported way: its card's hints."""
    for card_path in (scratch_repo / SLOW).glob("*/model.json"):
        card = json.loads(card_path.read_text())
        card["serving"] = {"max_queue_delay_ms": SLOW_DELAY_MS, "adaptive_queue_delay": False}
        card_path.write_text(json.dumps(card))
    return scratch_repo


@pytest.fixture(scope="module")
def server(repo: Path, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(repo, "--poll-interval-s", "0")


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> classifier_pb2_grpc.ClassifierStub:
    return classifier_pb2_grpc.ClassifierStub(channel)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when it does not exist yet)."""
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.MULTILINE)
    for found, value in pattern.findall(server.metrics()):
        if all(part in found.split(",") for part in selector.split(",") if part):
            return float(value)
    return 0.0


def healthy(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# --- client faults -----------------------------------------------------------------------------------------------

def test_deadlines_shorter_than_the_queue_delay_cost_no_model_time(server: ServerProcess, channel: grpc.Channel,
                                                                   stub: classifier_pb2_grpc.ClassifierStub) -> None:
    request = pb.ClassifyDiabetesRequest(model=SLOW, records=[RECORD])
    stub.ClassifyDiabetes(request, timeout=30)  # the model's metrics series exist from here on
    ran = metric(server, "coursezoo_batch_size_sum", model=SLOW)
    futures = [stub.ClassifyDiabetes.future(request, timeout=0.2) for _ in range(40)]
    assert {f.exception().code() for f in futures} == {grpc.StatusCode.DEADLINE_EXCEEDED}  # type: ignore[union-attr]
    # counted as what they were: timeouts, told apart from clients that cancelled (next test)
    wait_for(lambda: metric(server, "coursezoo_request_failures_total", model=SLOW, code="DEADLINE_EXCEEDED") >= 40,
             "the server to count the 40 calls whose deadline passed")
    assert stub.ClassifyDiabetes(request, timeout=30).predictions  # later requests are served
    assert metric(server, "coursezoo_batch_size_sum", model=SLOW) == ran + 1  # the 40 never ran
    assert metric(server, "coursezoo_queue_depth", model=SLOW) == 0
    assert healthy(channel)


def test_cancelled_unary_calls_are_freed(server: ServerProcess, channel: grpc.Channel,
                                         stub: classifier_pb2_grpc.ClassifierStub) -> None:
    # 30 x 2 records stay under the batch limit (64 items), so none runs before the 2 s delay: with 4 records
    # each the first 16 filled a batch that ran at once and could be answered before the cancel
    request = pb.ClassifyDiabetesRequest(model=SLOW, records=[RECORD] * 2)
    before = metric(server, "coursezoo_request_failures_total", model=SLOW, code="CANCELLED")
    futures = [stub.ClassifyDiabetes.future(request, timeout=30) for _ in range(30)]
    stub.ListModels(pb.ListModelsRequest(), timeout=30)  # same connection, answered in order: the 30 have arrived
    for future in futures:
        future.cancel()
    assert all(f.cancelled() for f in futures)
    wait_for(lambda: metric(server, "coursezoo_request_failures_total", model=SLOW, code="CANCELLED") > before,
             "the server to see the cancellations")
    wait_for(lambda: metric(server, "coursezoo_queue_depth", model=SLOW) == 0, "the queue to empty")
    assert stub.ClassifyDiabetes(request, timeout=30).predictions
    assert healthy(channel)


def rss_mib(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS")).split()[1]) // 1024


@pytest.mark.parametrize(("refusal", "code"), [("too many rows", "RESOURCE_EXHAUSTED"),
                                               ("no token", "UNAUTHENTICATED")])
def test_refused_large_requests_are_freed_when_answered(repo: Path, start_server: Callable[..., ServerProcess],
                                                        refusal: str, code: str) -> None:
    """An error status set with ``context.abort`` joined a reference cycle inside grpc.aio that held the call's
    request until the garbage collector ran: 30 refused 32 MB requests in a row left 1.2 GB resident. Refused
    by a handler or, unparsed, by the token check alike."""
    env = {"COURSEZOO_AUTH_TOKEN": "s3cret"} if refusal == "no token" else None
    server = start_server(repo, "--poll-interval-s", "0", "--keep-heap", "false", env=env)
    assert server.proc is not None
    client = triton.InferenceServerClient(server.target)
    images = triton.InferInput("image", [10_000, 1, 28, 28], "FP32")  # 31 MB, over the 1024-row request limit
    images.set_data_from_numpy(np.zeros((10_000, 1, 28, 28), dtype=np.float32))
    before = rss_mib(server.proc.pid)
    for _ in range(20):
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer("mnist_cnn", [images], client_timeout=60)
        assert info.value.status() == f"StatusCode.{code}"
    grown = rss_mib(server.proc.pid) - before
    client.close()
    assert grown < 10 * 31, f"{grown} MiB more resident after 20 refused 31 MB requests"


def test_a_full_queue_is_temporary_and_a_request_larger_than_the_queue_is_not(
        repo: Path, start_server: Callable[..., ServerProcess]) -> None:
    """A queue that is full now answers UNAVAILABLE, which clients retry (CourseZooClient, the batch CLI,
    Triton's clients); RESOURCE_EXHAUSTED is kept for what can never fit, which a client must split."""
    server = start_server(repo, "--max-queue-items", "4", "--max-batch-size", "2", "--poll-interval-s", "0")
    with grpc.insecure_channel(server.target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)

        def records(n: int) -> pb.ClassifyDiabetesRequest:
            return pb.ClassifyDiabetesRequest(model=SLOW, records=[RECORD] * n)

        def classify(n: int) -> pb.ClassifyDiabetesResponse:
            return stub.ClassifyDiabetes(records(n), timeout=30)

        classify(1)  # the metrics series exist from here on
        # SLOW's batch waits 2 s for more; one record forms it, and 2 more cannot join it (batches of at most 2)
        futures = [stub.ClassifyDiabetes.future(records(n), timeout=60) for n in (1, 2)]
        wait_for(lambda: metric(server, "coursezoo_queue_depth", model=SLOW) == 2, "the 2 records to queue")
        futures.append(stub.ClassifyDiabetes.future(records(2), timeout=60))
        wait_for(lambda: metric(server, "coursezoo_queue_depth", model=SLOW) == 4, "4 records to queue")
        with pytest.raises(grpc.RpcError) as full:
            classify(1)
        assert full.value.code() == grpc.StatusCode.UNAVAILABLE and "retry later" in full.value.details()
        with pytest.raises(grpc.RpcError) as never:
            classify(5)
        assert never.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 4" in never.value.details()
        assert [len(f.result().predictions) for f in futures] == [1, 2, 2]
        assert metric(server, "coursezoo_queue_depth", model=SLOW) == 0
        assert len(classify(1).predictions) == 1


def test_a_stream_waits_for_room_in_a_full_queue(repo: Path, digits_name: str, tmp_path: Path,
                                                start_server: Callable[..., ServerProcess]) -> None:
    """A stream is flow-controlled: its pipelined requests wait for room in a full queue instead of ending
    it with UNAVAILABLE after the answers before them. Here the digits model's batches wait 2 s for more
    and hold at most 2 images, and its queue 4: the first request (1 image) forms a batch, the next two
    (2 images each) fill the queue, and the three after them must wait."""
    own = tmp_path / "repo"
    shutil.copytree(repo / digits_name, own / digits_name)
    for card_path in (own / digits_name).glob("*/model.json"):
        card = json.loads(card_path.read_text())
        card["serving"] = {"max_queue_delay_ms": SLOW_DELAY_MS, "adaptive_queue_delay": False}
        card_path.write_text(json.dumps(card))
    server = start_server(own, "--max-queue-items", "4", "--max-batch-size", "2", "--poll-interval-s", "0")
    sizes = [1, 2, 2, 2, 2, 2]
    requests = [pb.ClassifyDigitsRequest(model=digits_name, images=[PIXELS] * n, id=str(i))
                for i, n in enumerate(sizes)]
    with grpc.insecure_channel(server.target) as channel:
        replies = list(classifier_pb2_grpc.ClassifierStub(channel).StreamClassifyDigits(iter(requests), timeout=60))
    assert [(r.id, len(r.predictions)) for r in replies] == [(str(i), n) for i, n in enumerate(sizes)]


def test_a_stream_leaves_half_the_queue_to_unary_calls(exported_repo: Path,
                                                       start_server: Callable[..., ServerProcess]) -> None:
    """A stream's requests wait for room, and took it the moment it appeared: while one stream of 1024-image
    requests ran, every unary call to the model failed UNAVAILABLE ("2048 items are queued"). Streams now fill
    at most half of the queue."""
    model = "mnist_inception"  # ~60 ms per 1024 images here: the stream keeps the queue busy for seconds
    server = start_server(exported_repo, "--max-queue-items", "2048", "--poll-interval-s", "0")
    client = triton.InferenceServerClient(server.target)
    batch = triton.InferInput("image", [1024, 1, 28, 28], "FP32")
    batch.set_data_from_numpy(np.zeros((1024, 1, 28, 28), dtype=np.float32))
    one = triton.InferInput("image", [1, 1, 28, 28], "FP32")
    one.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
    answered: list[object] = []
    client.start_stream(callback=lambda result, error: answered.append(error or result))
    try:
        for i in range(48):
            client.async_stream_infer(model, [batch], request_id=str(i))
        wait_for(lambda: metric(server, "coursezoo_queue_depth", model=model) >= 1024, "the stream to queue")
        codes: Counter[str] = Counter()
        while len(answered) < 40:
            try:
                client.infer(model, [one], client_timeout=30)
                codes["OK"] += 1
            except triton.InferenceServerException as e:
                codes[e.status()] += 1
        assert codes and set(codes) == {"OK"}, codes
        wait_for(lambda: len(answered) == 48, "the stream's answers")
        assert not [a for a in answered if isinstance(a, Exception)]
    finally:
        client.stop_stream()
        client.close()


def digit_requests(model: str, n: int | None) -> Iterator[pb.ClassifyDigitsRequest]:
    """``n`` requests (forever when None), each one image, numbered by ``id``."""
    i = 0
    while n is None or i < n:
        yield pb.ClassifyDigitsRequest(model=model, images=[PIXELS], id=str(i))
        i += 1


def test_half_closed_streams_get_every_answer_in_order(stub: classifier_pb2_grpc.ClassifierStub,
                                                       digits_name: str) -> None:
    replies = list(stub.StreamClassifyDigits(digit_requests(digits_name, 50), timeout=60))
    assert [r.id for r in replies] == [str(i) for i in range(50)]


def test_cancelled_streams_are_freed(server: ServerProcess, channel: grpc.Channel,
                                     stub: classifier_pb2_grpc.ClassifierStub, digits_name: str) -> None:
    for _ in range(10):
        call = stub.StreamClassifyDigits(digit_requests(digits_name, None), timeout=60)
        assert [next(call).id for _ in range(3)] == ["0", "1", "2"]
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: metric(server, "coursezoo_queue_depth", model=digits_name) == 0, "the queue to empty")
    assert len(list(stub.StreamClassifyDigits(digit_requests(digits_name, 5), timeout=60))) == 5
    assert healthy(channel)


def test_a_stream_whose_deadline_passes_counts_its_waiting_requests_as_timed_out(server: ServerProcess) -> None:
    """The requests a stream had in the queue when its deadline passed are DEADLINE_EXCEEDED in the metrics, as
    unary calls are: an operator tells timeouts too short for the load from clients that went away."""
    def timed_out() -> float:
        return metric(server, "coursezoo_request_failures_total", model=SLOW, rpc="ModelStreamInfer",
                      code="DEADLINE_EXCEEDED")

    before, errors = timed_out(), []
    features = triton.InferInput("features", [1, 8], "FP32")
    features.set_data_from_numpy(np.array([RECORD.features], dtype=np.float32))
    client = triton.InferenceServerClient(server.target)
    client.start_stream(callback=lambda result, error: errors.append(error), stream_timeout=0.5)
    for i in range(3):
        client.async_stream_infer(SLOW, [features], request_id=str(i))
    wait_for(lambda: timed_out() >= before + 3, "the server to count the stream's 3 requests as timed out")
    client.stop_stream()
    client.close()
    assert metric(server, "coursezoo_queue_depth", model=SLOW) == 0


# --- a model's files damaged while it serves; broken new versions -------------------------------------------------

def newest(repo: Path, name: str) -> Path:
    return max((repo / name).iterdir(), key=lambda p: int(p.name))


def index(target: str) -> dict[tuple[str, str], dict]:
    rows = triton.InferenceServerClient(target).get_model_repository_index(as_json=True)["models"]
    return {(row["name"], row.get("version", "")): row for row in rows}


@pytest.mark.parametrize("damage", ["corrupt", "remove"])
def test_a_model_file_damaged_at_run_time_leaves_the_serving_version_working(
        server: ServerProcess, repo: Path, stub: classifier_pb2_grpc.ClassifierStub, damage: str) -> None:
    """The session is in memory: the damaged file is noticed at the next scan (RepositoryModelLoad here, the
    poller in production: the same code) and refused, and the version keeps serving from memory."""
    version = newest(repo, "names_gru")
    onnx = version / "model.onnx"
    original = onnx.read_bytes()
    request = pb.ClassifySequencesRequest(model="names_gru", texts=["Nakamura"])
    expected = stub.ClassifySequences(request, timeout=30)
    try:
        if damage == "corrupt":
            onnx.write_bytes(original[: len(original) // 2] + b"garbage")
        else:
            onnx.unlink()
        triton.InferenceServerClient(server.target).load_model("names_gru")
        row = index(server.target)[("names_gru", version.name)]
        assert row["state"] == "READY" and row["reason"], row  # serving, with the reason the new file was refused
        assert stub.ClassifySequences(request, timeout=30) == expected
    finally:
        onnx.write_bytes(original)
    triton.InferenceServerClient(server.target).load_model("names_gru")  # the repaired file loads again
    assert stub.ClassifySequences(request, timeout=30) == expected


def break_onnx_keep_sha(directory: Path) -> None:
    """Not an ONNX model, with a card that vouches for it: loading must fail in ONNX Runtime, not at the hash."""
    (directory / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf graph")
    sha256 = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    edit_card(directory, lambda card: card["files"]["model.onnx"].update(sha256=sha256))


def editing(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda directory: edit_card(directory, change)


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "sha256 mismatch": editing(lambda c: c["files"]["model.onnx"].update(sha256="0" * 64)),
    "not an ONNX file": break_onnx_keep_sha,
    "card names other tensors": editing(lambda c: c["inputs"][0].update(name="pixels")),
    "card is not JSON": lambda d: (d / "model.json").write_text("{ truncated"),
    "model.onnx missing": lambda d: (d / "model.onnx").unlink(),
    "card for another version": editing(lambda c: c.update(version="1")),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_new_version_never_replaces_a_good_one(server: ServerProcess, repo: Path, breakage: str) -> None:
    good = newest(repo, "linear_regression")
    broken = repo / "linear_regression" / str(int(good.name) + 1)
    staging = repo / "linear_regression" / f".staging-{broken.name}"
    shutil.copytree(good, staging)
    edit_card(staging, lambda card: card.update(version=broken.name))
    BREAKAGES[breakage](staging)
    staging.rename(broken)
    kserve = triton.InferenceServerClient(server.target)
    try:
        kserve.load_model("linear_regression")
        assert index(server.target)[("linear_regression", broken.name)]["state"] == "UNAVAILABLE"
        x = triton.InferInput("x", [1, 1], "FP32").set_data_from_numpy(np.ones((1, 1), np.float32))
        result = kserve.infer("linear_regression", [x])
        assert result.get_response().model_version == good.name
    finally:
        shutil.rmtree(broken)
        kserve.load_model("linear_regression")


# --- SIGTERM under load ----------------------------------------------------------------------------------------------

def test_sigterm_under_load_answers_or_cleanly_refuses_every_call(repo: Path, digits_name: str,
                                                                  start_server: Callable[..., ServerProcess]) -> None:
    proc = start_server(repo, "--grace-s", "10", "--poll-interval-s", "0", env={"COURSEZOO_LOG_LEVEL": "DEBUG"})
    assert proc.proc is not None
    outcomes: Counter[str] = Counter()
    started = Counter[str]()
    lock = threading.Lock()
    stop = threading.Event()

    def worker(i: int) -> None:
        with grpc.insecure_channel(proc.target) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            calls: list[Callable[[], object]] = [
                lambda: stub.ClassifySequences(pb.ClassifySequencesRequest(model="names_gru", texts=["Rossi"] * 8),
                                               timeout=30),
                lambda: stub.ClassifyDiabetes(pb.ClassifyDiabetesRequest(model="diabetes_mlp", records=[RECORD]),
                                              timeout=30),
                lambda: list(stub.StreamClassifyDigits(digit_requests(digits_name, 4), timeout=30)),
            ]
            n = 0
            while not stop.is_set():
                with lock:
                    started["calls"] += 1
                try:
                    calls[(i + n) % len(calls)]()
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                with lock:
                    outcomes[code.name] += 1
                if code is not grpc.StatusCode.OK:
                    return  # refused: the server is going away
                n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    wait_for(lambda: outcomes["OK"] >= 64, "the load to run")
    assert proc.stop(signal.SIGTERM) == 0
    stop.set()
    for t in threads:
        t.join(60)
    print(f"SIGTERM under load: {dict(outcomes)} of {started['calls']} calls")
    assert not any(t.is_alive() for t in threads)
    assert sum(outcomes.values()) == started["calls"]  # every call ended
    # The drain answers calls that arrive during shutdown with UNAVAILABLE; CANCELLED stays a clean outcome (a
    # call reaching gRPC in the instant the port closes, before any handler saw it).
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, outcomes
    assert "coursezoo stopped" in proc.output
    # No handler was cancelled (grpc.aio logs each at DEBUG): no work that had started was thrown away.
    assert "RPC cancelled for servicer method" not in proc.output
