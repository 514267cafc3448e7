"""Triton's system shared memory extension through the stock ``tritonclient[grpc]`` client.

Regions are made with Python's ``multiprocessing.shared_memory`` (POSIX ``shm_open``, as tritonclient's
own ``utils.shared_memory`` does; that module needs ``pkg_resources``, which current setuptools no longer
has). The server reads inputs from them and writes outputs into them; answers are compared with
onnxruntime on the exported file. Like test_tritonclient.py, this process never imports the server's
generated ``inference`` module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.card import ModelCard
from serving.preprocess import InputError, encode_names
from serving.shared_memory import SharedMemoryRegistry
from tests.serving.test_tritonclient import onnx_outputs, triton_inputs

if TYPE_CHECKING:
    from tests.conftest import ServerProcess


@pytest.fixture()
def triton_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.target)
    yield client
    client.unregister_system_shared_memory()  # every region, so a failed test leaves none behind


@pytest.fixture()
def block() -> Iterator[shared_memory.SharedMemory]:
    """A 1 MiB POSIX shared memory object; its key is ``/`` + its name."""
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    yield shm
    shm.close()
    shm.unlink()


def _card(repo: Path, name: str) -> ModelCard:
    return ModelCard.load(repo / name / "1")


def _status(client: triton.InferenceServerClient, name: str = "") -> dict:
    return client.get_system_shared_memory_status(region_name=name, as_json=True).get("regions", {})


def test_batch_in_and_out_of_shared_memory(triton_client: triton.InferenceServerClient, block, digits_model: str,
                                           exported_repo: Path, mnist_test) -> None:
    card = _card(exported_repo, digits_model)
    mean, std = card.preprocessing["mean"], card.preprocessing["std"]
    images = ((mnist_test[0][:128].astype(np.float32) / 255 - mean) / std).reshape(128, 1, 28, 28)
    expected = onnx_outputs(exported_repo, card, {"image": images})["logits"]
    in_bytes, out_bytes = images.nbytes, expected.nbytes
    block.buf[:in_bytes] = images.tobytes()
    triton_client.register_system_shared_memory("batch", "/" + block.name, in_bytes + out_bytes + 64)
    assert _status(triton_client, "batch")["batch"]["key"] == "/" + block.name

    tensor = triton.InferInput("image", list(images.shape), "FP32").set_shared_memory("batch", in_bytes)
    output = triton.InferRequestedOutput("logits")
    output.set_shared_memory("batch", out_bytes + 64, offset=in_bytes)
    result = triton_client.infer(digits_model, [tensor], outputs=[output])

    placed = result.get_output("logits").parameters  # (its as_json=True returns None in tritonclient 2.41)
    assert placed["shared_memory_region"].string_param == "batch"
    assert placed["shared_memory_byte_size"].int64_param == out_bytes
    logits = np.frombuffer(bytes(block.buf[in_bytes : in_bytes + out_bytes]), dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == mnist_test[1][:128]).mean() > 0.9


def test_one_input_in_shared_memory_and_one_raw(triton_client: triton.InferenceServerClient, block,
                                                exported_repo: Path) -> None:
    """tritonclient sends raw buffers only for the inputs not in shared memory: they must still line up."""
    chars, lengths = encode_names(["Smith", "Tanaka", "Rossi"])
    expected = onnx_outputs(exported_repo, _card(exported_repo, "names_gru"), {"chars": chars, "lengths": lengths})
    block.buf[: chars.nbytes] = chars.tobytes()
    triton_client.register_system_shared_memory("chars", "/" + block.name, chars.nbytes)
    shared = triton.InferInput("chars", list(chars.shape), "INT64").set_shared_memory("chars", chars.nbytes)
    (raw,) = triton_inputs({"lengths": lengths})
    result = triton_client.infer("names_gru", [shared, raw])  # the output comes back in the reply
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=1e-4, atol=1e-4)


def test_status_and_unregister(triton_client: triton.InferenceServerClient, block) -> None:
    key = "/" + block.name
    triton_client.register_system_shared_memory("a", key, 4096)
    triton_client.register_system_shared_memory("b", key, 4096, offset=4096)
    assert {n: (r["key"], int(r.get("offset", 0)), int(r["byte_size"])) for n, r in _status(triton_client).items()} \
        == {"a": (key, 0, 4096), "b": (key, 4096, 4096)}
    triton_client.unregister_system_shared_memory("a")
    assert set(_status(triton_client)) == {"b"}
    triton_client.unregister_system_shared_memory("a")  # again: not an error, as in Triton
    triton_client.unregister_system_shared_memory()
    assert _status(triton_client) == {}


def _register(name: str, key: str, size: int, offset: int = 0):
    return lambda client, block: client.register_system_shared_memory(name, key.replace("BLOCK", block.name), size,
                                                                      offset)


def _infer_from(region: str, byte_size: int, register: int = 0, output_size: int = 0):
    """A digits ModelInfer of one image from ``region`` (``register`` > 0: register the block as it first)."""
    def call(client: triton.InferenceServerClient, block) -> object:
        if register:
            client.register_system_shared_memory(region, "/" + block.name, register)
        tensor = triton.InferInput("image", [1, 1, 28, 28], "FP32").set_shared_memory(region, byte_size)
        outputs = None
        if output_size:
            outputs = [triton.InferRequestedOutput("logits")]
            outputs[0].set_shared_memory(region, output_size, offset=3136)
        return client.infer("mnist_cnn", [tensor], outputs=outputs)
    return call


SHM_ERRORS = [
    ("no such object", _register("x", "/coursezoo-test-missing", 64), "NOT_FOUND", "coursezoo-test-missing"),
    ("key with a path", _register("x", "/../etc/passwd", 64), "INVALID_ARGUMENT", "POSIX shared memory name"),
    ("larger than the object", _register("x", "/BLOCK", 2 << 20), "INVALID_ARGUMENT", "do not fit"),
    ("empty name", _register("", "/BLOCK", 64), "INVALID_ARGUMENT", "name"),
    ("unregistered region", _infer_from("nowhere", 3136), "NOT_FOUND", "nowhere"),
    ("byte size not the tensor's", _infer_from("r", 3000, register=4096), "INVALID_ARGUMENT", "3136"),
    ("beyond the region", _infer_from("r", 3136, register=1024), "INVALID_ARGUMENT", "do not fit"),
    ("output region too small", _infer_from("r", 3136, register=8192, output_size=8), "INVALID_ARGUMENT", "40"),
    ("output byte size past the region", _infer_from("r", 3136, register=4096, output_size=4096), "INVALID_ARGUMENT",
     "4096 bytes at offset 3136 do not fit"),
    ("status of an unknown region", lambda c, b: c.get_system_shared_memory_status("nowhere"), "NOT_FOUND",
     "nowhere"),
]


@pytest.mark.parametrize(("case", "call", "code", "fragment"), SHM_ERRORS, ids=[e[0] for e in SHM_ERRORS])
def test_shared_memory_errors(triton_client: triton.InferenceServerClient, block, case: str, call, code: str,
                              fragment: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(triton_client, block)
    assert info.value.status() == f"StatusCode.{code}", info.value.message()
    assert fragment in info.value.message()
    assert triton_client.is_server_ready()


def test_registering_a_name_twice_is_refused(triton_client: triton.InferenceServerClient, block) -> None:
    triton_client.register_system_shared_memory("twice", "/" + block.name, 64)
    with pytest.raises(InferenceServerException) as info:
        triton_client.register_system_shared_memory("twice", "/" + block.name, 64)
    assert info.value.status() == "StatusCode.ALREADY_EXISTS"


def test_off_when_asked(start_server, exported_repo: Path, block) -> None:
    server = start_server(exported_repo, "--shared-memory", "off", "--poll-interval-s", "0")
    client = triton.InferenceServerClient(server.target)
    assert "system_shared_memory" not in client.get_server_metadata(as_json=True)["extensions"]
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("x", "/" + block.name, 64)
    assert info.value.status() == "StatusCode.UNIMPLEMENTED" and "--shared-memory" in info.value.message()
    tensor = triton.InferInput("image", [1, 1, 28, 28], "FP32").set_shared_memory("x", 3136)
    with pytest.raises(InferenceServerException) as info:
        client.infer("mnist_cnn", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "shared memory is off" in info.value.message()


def test_a_shrunk_object_is_refused_not_a_crash(triton_client: triton.InferenceServerClient) -> None:
    """Reading a mapped page past an object's end is SIGBUS; a region whose object shrank is refused."""
    path = Path("/dev/shm/coursezoo-test-shrink")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8192)
        triton_client.register_system_shared_memory("shrink", "/" + path.name, 8192)
        os.ftruncate(fd, 1024)  # this process never maps it, so only the server could touch the lost pages
        tensor = triton.InferInput("image", [1, 1, 28, 28], "FP32").set_shared_memory("shrink", 3136)
        with pytest.raises(InferenceServerException) as info:
            triton_client.infer("mnist_cnn", [tensor])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "shrunk" in info.value.message()
        assert triton_client.is_server_ready()
    finally:
        os.close(fd)
        path.unlink()


@pytest.mark.parametrize("planted", ["link", "folder"])
def test_only_shared_memory_objects_can_be_regions(tmp_path: Path, planted: str) -> None:
    """A link planted in /dev/shm would make any file the server may write a region a client reads and
    writes through; a folder is no object either. Both are refused and the target is untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"ORIGINAL-CONTENT")
    path = Path(f"/dev/shm/coursezoo-test-{planted}-{os.getpid()}")
    path.symlink_to(victim) if planted == "link" else path.mkdir()
    registry = SharedMemoryRegistry(64 << 20)
    try:
        what = "is a symbolic link" if planted == "link" else "cannot open"  # a folder: "Is a directory"
        with pytest.raises(InputError, match=what):
            registry.register("r", "/" + path.name, 0, 16)
        assert registry.status() == [] and victim.read_bytes() == b"ORIGINAL-CONTENT"
    finally:
        path.unlink() if planted == "link" else path.rmdir()


def test_a_region_unregistered_while_a_request_holds_it_still_gets_its_output(block) -> None:
    """As Triton defers such an unregister: the name goes at once, the object stays open until the request has
    written its output (the server used to answer NOT_FOUND after running the model)."""
    registry = SharedMemoryRegistry(64 << 20)
    registry.register("r", "/" + block.name, 0, 4096)
    region = registry.region("r", "output y").hold()
    registry.unregister("r")
    assert registry.status() == []
    region.write(8, b"\x01\x02\x03\x04", "output y")
    assert bytes(block.buf[8:12]) == b"\x01\x02\x03\x04"
    fd = region.fd
    region.let_go()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once the last request let go


@pytest.mark.parametrize("placed", ["input", "output"])
def test_an_object_shrunk_while_requests_use_it_never_kills_the_server(start_server, exported_repo: Path,
                                                                      placed: str) -> None:
    """A client thread shrinks the object to nothing and grows it back while requests read or write it. Read
    through a mapping, a page past the object's end is SIGBUS: the server died within ~20 requests (exit 135).
    Every call must now end OK or INVALID_ARGUMENT ("shrunk"), and the server keep serving."""
    server = start_server(exported_repo, "--poll-interval-s", "0")
    client = triton.InferenceServerClient(server.target)
    images = np.zeros((256, 1, 28, 28), dtype=np.float32)
    size = images.nbytes + 256 * 10 * 4
    path = Path(f"/dev/shm/coursezoo-test-flip-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)

    try:
        os.ftruncate(fd, size)
        client.register_system_shared_memory("flip", "/" + path.name, size)
        flipper = threading.Thread(target=flip, daemon=True)
        flipper.start()
        codes: Counter[str] = Counter()
        for _ in range(150):
            if placed == "input":
                tensor = triton.InferInput("image", list(images.shape), "FP32").set_shared_memory("flip", images.nbytes)
                outputs = None
            else:
                (tensor,) = triton_inputs({"image": images})
                outputs = [triton.InferRequestedOutput("logits")]
                outputs[0].set_shared_memory("flip", size - images.nbytes, offset=images.nbytes)
            try:
                client.infer("mnist_cnn", [tensor], outputs=outputs, client_timeout=30)
                codes["OK"] += 1
            except InferenceServerException as e:
                assert e.status() == "StatusCode.INVALID_ARGUMENT" and "shrunk" in e.message(), e.message()
                codes["shrunk"] += 1
        stop.set()
        flipper.join()
        assert server.proc.poll() is None and client.is_server_ready(), codes
    finally:
        stop.set()
        os.close(fd)
        path.unlink()
        client.close()


def test_an_output_asked_for_twice_in_two_places_is_refused(triton_client: triton.InferenceServerClient,
                                                            block) -> None:
    """One of the two would have gone unwritten; the same output asked for twice alike is answered once."""
    triton_client.register_system_shared_memory("twice", "/" + block.name, 8192)
    (tensor,) = triton_inputs({"image": np.zeros((1, 1, 28, 28), dtype=np.float32)})
    inline, placed = triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("logits")
    placed.set_shared_memory("twice", 40)
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("mnist_cnn", [tensor], outputs=[placed, inline])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "requested twice" in info.value.message()
    result = triton_client.infer("mnist_cnn", [tensor], outputs=[inline, triton.InferRequestedOutput("logits")])
    assert result.as_numpy("logits").shape == (1, 10)


def test_regions_leave_most_file_descriptors_to_connections() -> None:
    """Each region is an open descriptor: under systemd's soft limit of 1024, 502 regions left none for new
    connections, and the 503rd registration was INTERNAL with a traceback. Now a quarter of the limit, and
    running out is RESOURCE_EXHAUSTED."""
    script = """
import os, resource, sys
from multiprocessing import shared_memory
from serving.shared_memory import SharedMemoryRegistry, TooManyRegions
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
block = shared_memory.SharedMemory(create=True, size=4096)
try:
    registry = SharedMemoryRegistry(64 << 20)
    for i in range(64):
        try:
            registry.register(f"r{i}", "/" + block.name, 0, 64)
        except TooManyRegions as e:
            print(i, e)
            break
    registry.close()
finally:
    block.close()
    block.unlink()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.startswith("16 16 shared memory regions are registered"), done.stdout + done.stderr


@pytest.mark.parametrize(("shape", "byte_size", "code", "fragment"), [
    ([1, 1, 28, 28], 60 << 20, "INVALID_ARGUMENT", "expected 3136"),  # a byte size that is not the tensor's
    ([171_197, 1, 28, 28], 171_197 * 3136, "RESOURCE_EXHAUSTED", "at most"),  # beyond what a message may carry
])
def test_a_huge_shared_memory_input_is_refused_before_it_is_read(start_server, exported_repo: Path, shape: list,
                                                                 byte_size: int, code: str, fragment: str) -> None:
    """The server read a region's whole byte size before comparing it with the tensor: 2 GiB of a sparse object
    took 5 s of its event loop, in which it served no one, and 2.1 GB of memory, to answer INVALID_ARGUMENT."""
    server = start_server(exported_repo, "--poll-interval-s", "0")
    client = triton.InferenceServerClient(server.target)
    size = 2 << 30
    path = Path(f"/dev/shm/coursezoo-test-sparse-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse: no memory until written or read
        client.register_system_shared_memory("sparse", "/" + path.name, size)
        peak = _peak_mib(server.proc.pid)
        tensor = triton.InferInput("image", shape, "FP32").set_shared_memory("sparse", byte_size)
        with pytest.raises(InferenceServerException) as info:
            client.infer("mnist_cnn", [tensor])
        assert info.value.status() == f"StatusCode.{code}" and fragment in info.value.message(), info.value.message()
        assert _peak_mib(server.proc.pid) - peak < 30  # not read
    finally:
        client.unregister_system_shared_memory()
        client.close()
        os.close(fd)
        path.unlink()


def test_a_requests_inputs_in_shared_memory_are_bounded_together(start_server, exported_repo: Path) -> None:
    """Capped one input at a time, 60 inputs of the limit each in one request were all read (240 MiB under a
    4 MiB limit) before the unknown names were refused."""
    server = start_server(exported_repo, "--poll-interval-s", "0", "--max-message-mb", "4")
    client = triton.InferenceServerClient(server.target)
    size = 4 << 20
    path = Path(f"/dev/shm/coursezoo-test-many-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        client.register_system_shared_memory("many", "/" + path.name, size)
        peak = _peak_mib(server.proc.pid)
        tensors = [triton.InferInput(f"in{i}", [size // 4], "FP32").set_shared_memory("many", size) for i in range(8)]
        with pytest.raises(InferenceServerException) as info:
            client.infer("mnist_cnn", tensors)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value.message()
        assert "for one request" in info.value.message()
        # nor may a negative size cancel another's out of the total: 16 MiB read under a 4 MiB limit
        tensors = [triton.InferInput("a", [size], "FP32").set_shared_memory("many", size),
                   triton.InferInput("b", [1], "FP32").set_shared_memory("many", -3 * size)]
        with pytest.raises(InferenceServerException) as info:
            client.infer("mnist_cnn", tensors)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and ">= 0" in info.value.message()
        assert _peak_mib(server.proc.pid) - peak < 8  # neither the 240 MiB nor the 16 MiB was read
        # nor raw inputs beside them: 3 MiB in shared memory and 2 MiB in a message that fits the limit
        raw = triton.InferInput("raw", [1 << 19], "FP32")
        raw.set_data_from_numpy(np.zeros(1 << 19, np.float32))
        tensors = [triton.InferInput("a", [3 << 18], "FP32").set_shared_memory("many", 3 << 20), raw]
        with pytest.raises(InferenceServerException) as info:
            client.infer("mnist_cnn", tensors)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value.message()
        assert "and 2097152 in the message" in info.value.message()
        # nor typed contents (tritonclient sends raw buffers only, so the message is built here)
        request = service_pb2.ModelInferRequest(model_name="mnist_cnn")
        placed = request.inputs.add(name="a", datatype="FP32", shape=[3 << 18]).parameters
        placed["shared_memory_region"].string_param = "many"
        placed["shared_memory_byte_size"].int64_param = 3 << 20
        request.inputs.add(name="typed", datatype="FP32", shape=[1 << 19]).contents.fp32_contents.extend(
            np.ones(1 << 19, np.float32))
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as failed:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.value.details()
        # the messages themselves are received and parsed (2 MiB each, ~13-15 MiB of peak in all): CI saw 16
        assert _peak_mib(server.proc.pid) - peak < 32
    finally:
        client.unregister_system_shared_memory()
        client.close()
        os.close(fd)
        path.unlink()


def _peak_mib(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM")).split()[1]) // 1024
