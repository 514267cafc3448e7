"""serving.decoding.ImageDecoder: where a request's images decode (loop, thread, process pool), same results.

Real MNIST test images, real worker processes: the pool's output must equal ``decode_digits`` in this
process bit for bit, keep the request's order across the parts it is split into, name the first bad
image by its position in the whole request, and survive a worker that dies.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving import decoding
from serving.decoding import (
    INLINE_MAX_BYTES,
    INLINE_MAX_PIXELS,
    MAX_PART_PIXELS,
    MIN_PART_IMAGES,
    POOL_MIN_IMAGES,
    ImageDecoder,
)
from serving.preprocess import DEFAULT_MAX_IMAGE_PIXELS, InputError, InputTooLarge, decode_digits
from training.catalog import DIGITS_PREPROCESSING as PREP

REPO_ROOT = Path(__file__).resolve().parents[2]
MIRROR = Path(os.environ.get("COURSEZOO_DATA_MIRROR", REPO_ROOT.parent / "shared" / "data"))
N = 3 * MIN_PART_IMAGES + 5  # one part per worker, the last one short


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    path = MIRROR / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"no MNIST test set at {path} (set COURSEZOO_DATA_MIRROR)")
    images = np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return [png(a if i % 3 else 255 - a) for i, a in enumerate(images[:N])]


@pytest.fixture(scope="module")
def decoder() -> Iterator[ImageDecoder]:
    decoder = ImageDecoder(processes=2, max_image_pixels=100 * 100)
    decoder.start()
    yield decoder
    decoder.close()


def started() -> tuple[ImageDecoder, ProcessPoolExecutor, list[BaseProcess]]:
    """A decoder of two processes, started, with its pool and the pool's workers (to kill, or to check on)."""
    decoder = ImageDecoder(processes=2, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    decoder.start()
    pool = decoder._pool
    assert pool is not None
    return decoder, pool, list(pool._processes.values())


def test_the_pool_gives_the_same_bits_in_the_same_order(decoder: ImageDecoder, files: list[bytes]) -> None:
    want, errors = decode_digits(files, PREP)
    assert not errors
    got = asyncio.run(decoder.decode(files, PREP))
    np.testing.assert_array_equal(got, want)


def test_small_requests_decode_in_process_with_the_same_result(decoder: ImageDecoder, files: list[bytes]) -> None:
    for n in (1, POOL_MIN_IMAGES - 1):
        np.testing.assert_array_equal(asyncio.run(decoder.decode(files[:n], PREP)), decode_digits(files[:n], PREP)[0])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_lone_large_image_decodes_off_the_event_loop(monkeypatch: pytest.MonkeyPatch, files: list[bytes],
                                                       fmt: str) -> None:
    """A digit decodes on the loop (a hand-over would cost more); a lone photo-sized image, whose decoding
    takes milliseconds, in a thread, so the loop goes on serving meanwhile. The decoding is the real one,
    only noted on its way."""
    threads: list[bool] = []

    def noting(images: list[bytes], prep: dict) -> tuple[np.ndarray, dict]:
        threads.append(threading.get_ident() == loop_thread)
        return decode_digits(images, prep)

    monkeypatch.setattr(decoding, "decode_digits", noting)
    stroke = np.zeros((600, 600), np.uint8)
    stroke[100:500, 250:350] = 255  # a "1"
    large = io.BytesIO()
    Image.fromarray(stroke).save(large, fmt)
    decoder = ImageDecoder(processes=0, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    loop_thread = threading.get_ident()  # asyncio.run runs the loop in this thread
    for image in (files[0], large.getvalue()):
        assert asyncio.run(decoder.decode([image], PREP)).shape == (1, 1, 28, 28)
    decoder.close()
    assert threads == [True, False]


def test_a_lone_small_image_of_many_bytes_decodes_off_the_event_loop(monkeypatch: pytest.MonkeyPatch,
                                                                     files: list[bytes]) -> None:
    """A 28x28 PNG by its header, with an ancillary chunk of more than INLINE_MAX_BYTES: decoding costs per byte
    too, and one of 60 MB held every caller ~240 ms on the loop."""
    threads: list[bool] = []

    def noting(images: list[bytes], prep: dict) -> tuple[np.ndarray, dict]:
        threads.append(threading.get_ident() == loop_thread)
        return decode_digits(images, prep)

    monkeypatch.setattr(decoding, "decode_digits", noting)
    chunk = b"prVt" + bytes(INLINE_MAX_BYTES)  # right after the IHDR chunk
    padded = files[0][:33] + struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
    padded += files[0][33:]
    decoder = ImageDecoder(processes=0, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    loop_thread = threading.get_ident()
    np.testing.assert_array_equal(asyncio.run(decoder.decode([padded], PREP)), decode_digits(files[:1], PREP)[0])
    decoder.close()
    assert threads == [False]


def test_decoding_threads_are_the_decoders_own_and_few(monkeypatch: pytest.MonkeyPatch, files: list[bytes]) -> None:
    """Not the loop's default executor, whose threads run the models: decoding there held them up (six requests
    of 15 large PNGs took another caller's 19 ms model run to 94-127 ms, 1.3 s in the reviewer's run). close()
    ends them."""
    threads: set[threading.Thread] = set()

    def noting(images: list[bytes], prep: dict) -> tuple[np.ndarray, dict]:
        threads.add(threading.current_thread())
        time.sleep(0.01)  # long enough for the calls to overlap
        return decode_digits(images, prep)

    class Refusing(ThreadPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> Future:
            raise AssertionError("decoding went to the event loop's default executor")

    async def calls() -> list[np.ndarray]:
        asyncio.get_running_loop().set_default_executor(Refusing())
        return await asyncio.gather(*(decoder.decode(files[:2], PREP) for _ in range(3 * decoding.MAX_DECODE_THREADS)))

    monkeypatch.setattr(decoding, "decode_digits", noting)
    monkeypatch.setattr(decoding, "cores", lambda: 64)
    decoder = ImageDecoder(processes=0, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    for got in asyncio.run(calls()):
        np.testing.assert_array_equal(got, decode_digits(files[:2], PREP)[0])
    assert len(threads) == decoding.MAX_DECODE_THREADS and all(t.name.startswith("coursezoo-decode") for t in threads)
    decoder.close()
    assert not any(t.is_alive() for t in threads)


def test_the_first_bad_image_is_named_by_its_position_in_the_request(decoder: ImageDecoder, files: list[bytes]) -> None:
    bad = list(files)
    second = decoding._parts(files, decoder.processes)[1].start
    bad[second + 7] = b"not an image"
    bad[second + 9] = b""
    with pytest.raises(InputError, match=rf"^image {second + 7}: not a recognised image"):
        asyncio.run(decoder.decode(bad, PREP))


def test_the_workers_apply_the_servers_pixel_limit(decoder: ImageDecoder, files: list[bytes]) -> None:
    """The limit travels to the spawned workers (it is process-wide Pillow state), and so does the error type."""
    big = list(files)
    big[40] = png(np.zeros((200, 200), dtype=np.uint8))
    with pytest.raises(InputTooLarge, match=r"^image 40: image of .* at most 10000 are accepted"):
        asyncio.run(decoder.decode(big, PREP))


def test_a_dead_worker_is_replaced_and_the_request_still_answered(files: list[bytes],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """And the log says which worker ended, and how: an operator tells the OOM killer from a crash by it; the
    restart is told to ``on_restart`` (the server's coursezoo_decoder_restarts_total)."""
    restarts: list[None] = []
    decoder = ImageDecoder(processes=2, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                           on_restart=lambda: restarts.append(None))
    decoder.start()
    try:
        asyncio.run(decoder.decode(files, PREP))
        pool = decoder._pool
        assert pool is not None
        pids = list(pool._processes)
        with caplog.at_level(logging.WARNING, logger="coursezoo.workers"):
            for pid in pids:  # as the kernel's OOM killer would
                os.kill(pid, signal.SIGKILL)
            got = asyncio.run(decoder.decode(files, PREP))
            deadline = time.monotonic() + 10
            while not caplog.records and time.monotonic() < deadline:  # the pool's watcher thread says it
                time.sleep(0.05)
        np.testing.assert_array_equal(got, decode_digits(files, PREP)[0])
        assert decoder._pool is not pool and len(restarts) == 1
        said = [(r.pid, r.getMessage()) for r in caplog.records if r.name == "coursezoo.workers"]
        assert said and all(pid in pids and message == f"worker process {pid} ended: killed by SIGKILL (the "
                            "out-of-memory killer, or kill -9)" for pid, message in said), said
    finally:
        decoder.close()


def _die(images: list[bytes], prep: dict) -> None:
    """A decoding process that dies on every part: a poison image, or memory too short for any."""
    os._exit(1)


def test_workers_dying_twice_is_unavailable_not_internal(files: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """INTERNAL, with a traceback logged, which clients do not retry; UNAVAILABLE they retry later."""
    from serving.services.base import status_of

    decoder = ImageDecoder(processes=2, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    decoder.start()
    monkeypatch.setattr(decoding, "decode_digits", _die)
    try:
        with pytest.raises(decoding.DecodersUnavailable, match="died twice") as info:
            asyncio.run(decoder.decode(files, PREP))
        assert status_of(info.value).name == "UNAVAILABLE"
    finally:
        decoder.close()


def _die_writing_once(images: list[bytes], prep: dict) -> tuple[np.ndarray, dict]:
    """The first part decoded anywhere dies as the OOM killer's victim would while writing its result into the
    pool's pipe: the header of a 1 MiB message and 100 bytes of it; every other part decodes."""
    try:
        os.close(os.open(os.environ["COURSEZOO_TEST_DIED"], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return decode_digits(images, prep)
    result_queue = sys._getframe(1).f_locals["result_queue"]  # concurrent.futures.process._process_worker's
    os.write(result_queue._writer.fileno(), struct.pack("!i", 1 << 20) + bytes(100))
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def test_a_decoder_killed_while_it_writes_its_result_is_replaced(files: list[bytes], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's hang: the pool's manager thread waited for ever for the rest of the dead worker's message,
    so no future failed, the request (and every later one, their places taken) waited for ever, and so did the
    server's stop (``close`` joins that thread)."""
    monkeypatch.setenv("COURSEZOO_TEST_DIED", str(tmp_path / "died"))  # before the workers start: they inherit it
    monkeypatch.setattr(decoding, "decode_digits", _die_writing_once)
    decoder, pool, workers = started()
    try:
        got = asyncio.run(asyncio.wait_for(decoder.decode(files, PREP), 30))
        np.testing.assert_array_equal(got, decode_digits(files, PREP)[0])
        assert (tmp_path / "died").exists() and decoder._pool is not pool
        closing = threading.Thread(target=decoder.close)
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "the decoder's close hung"
    finally:  # without the fix: end the stuck pool, or this test process would never exit
        for worker in workers:
            worker.kill()
        if pool._result_queue is not None:
            pool._result_queue._writer.close()
        decoder.close()


def _slow(images: list[bytes], prep: dict) -> tuple[np.ndarray, dict]:
    """A decoding process busy for a while with each part, as with large photos."""
    time.sleep(0.3)
    return decode_digits(images, prep)


def test_a_decoder_dying_while_a_cancelled_calls_images_wait_fails_no_one(files: list[bytes],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's case: calls whose images fill the pool, one of them cancelled (its deadline passed), then a
    decoding process killed. On Python 3.11 a cancelled future inside the pool killed its manager thread when the
    process died (CPython gh-107219): the calls behind it waited forever and a decoding process was left running."""
    decoder, pool, workers = started()
    monkeypatch.setattr(decoding, "decode_digits", _slow)

    async def calls() -> list[np.ndarray]:
        queued = [asyncio.create_task(decoder.decode(files, PREP)) for _ in range(4)]
        await asyncio.sleep(0.1)  # all parts handed to the pool
        queued[2].cancel()
        os.kill(workers[0].pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*queued[:2], queued[3]), 30)

    try:
        for got in asyncio.run(calls()):
            np.testing.assert_array_equal(got, decode_digits(files, PREP)[0])
        deadline = time.monotonic() + 10
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(w.is_alive() for w in workers)
    finally:
        for worker in workers:  # without the fix one is left, and the test process would never exit
            worker.kill()
        decoder.close()


def test_a_cancelled_call_never_cancels_a_future_inside_the_pool(files: list[bytes]) -> None:
    """The pool's own futures stay as they are; a cancelled call only drops their results (see above why)."""
    submitted: list[Future] = []

    class Pool:
        def submit(self, *args: object) -> Future:
            submitted.append(Future())
            return submitted[-1]

    decoder = ImageDecoder(processes=2, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    decoder._pool = Pool()  # type: ignore[assignment]  # one that never starts the work

    async def cancelled() -> None:
        call = asyncio.create_task(decoder.decode(files, PREP))
        while not submitted:
            await asyncio.sleep(0)
        call.cancel()
        await asyncio.wait([call])

    asyncio.run(cancelled())
    assert submitted and not any(f.cancelled() for f in submitted)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the manager thread's death
def test_a_broken_pools_workers_are_ended_even_when_the_pool_does_not(files: list[bytes]) -> None:
    """When the pool's manager thread dies (as in gh-107219), replacing the pool ends its workers itself."""
    decoder, pool, workers = started()
    try:
        sleeps = [pool.submit(time.sleep, 30) for _ in range(5)]  # 2 running, 1 queued, 2 waiting in the pool
        assert sleeps[-1].cancel()
        os.kill(workers[0].pid, signal.SIGKILL)
        assert isinstance(sleeps[0].exception(timeout=10), BrokenProcessPool)  # then the manager thread died
        np.testing.assert_array_equal(asyncio.run(decoder.decode(files, PREP)), decode_digits(files, PREP)[0])
        deadline = time.monotonic() + 10
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(w.is_alive() for w in workers)
    finally:
        for worker in workers:
            worker.kill()
        decoder.close()


def test_digit_batches_go_one_part_per_process_large_images_in_parts_within_the_pixel_budget(
        files: list[bytes]) -> None:
    """More parts cost throughput (1024 digits in parts of 64: ~+20% per call), larger ones a cancelled call's waste."""
    assert [p.stop - p.start for p in decoding._parts(files[:2 * MIN_PART_IMAGES], 2)] == [MIN_PART_IMAGES] * 2
    assert [p.stop - p.start for p in decoding._parts(files[: 2 * MIN_PART_IMAGES - 1], 2)] == [2 * MIN_PART_IMAGES - 1]
    large = [_stroke(600, 600)] * 256 + [b"\xff\xd8 a JPEG, counted as INLINE_MAX_PIXELS"] * 100
    weights = [600 * 600] * 256 + [INLINE_MAX_PIXELS] * 100
    parts = decoding._parts(large, 2)
    pixels = [sum(weights[part]) for part in parts]
    assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]] and parts[-1].stop == len(large)
    assert len(parts) % 2 == 0 and max(pixels) <= MAX_PART_PIXELS and max(pixels) - min(pixels) <= 2 * 600 * 600


def test_headers_claiming_huge_images_do_not_make_huge_parts() -> None:
    """16 PNG headers of 33 bytes claiming 2^24 x 2^24 pixels each made millions of parts: 10 s of the event loop
    and 6 GB before the images were refused. An image weighs at most one part."""
    header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">II", 1 << 24, 1 << 24) + bytes(9)
    parts = decoding._parts([header] * 16, 2)
    assert len(parts) <= 16 and parts[-1].stop == 16


def test_a_cancelled_call_leaves_the_pool_at_most_one_part_per_process(files: list[bytes],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Large images go in parts within MAX_PART_PIXELS, and the pool holds no more parts than it has processes:
    the others wait outside it, where a cancelled call drops them. Cut into one part per process, a cancelled
    call's images were all decoded anyway, before the next call's."""
    decoder = ImageDecoder(processes=2, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    decoder.start()
    monkeypatch.setattr(decoding, "decode_digits", _slow)
    pool = decoder._pool
    assert pool is not None
    submit, submitted, sizes, in_pool = pool.submit, [], [], []

    def noting(fn: Callable, images: list[bytes], prep: dict) -> Future:
        sizes.append(len(images))
        in_pool.append(1 + sum(not f.done() for f in submitted))
        submitted.append(submit(fn, images, prep))
        return submitted[-1]

    monkeypatch.setattr(pool, "submit", noting)
    large = [_stroke(512, 512)] * 300

    async def calls() -> np.ndarray:
        cancelled = asyncio.create_task(decoder.decode(large, PREP))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        return await decoder.decode(files, PREP)

    try:
        np.testing.assert_array_equal(asyncio.run(calls()), decode_digits(files, PREP)[0])
    finally:
        decoder.close()
    first_two = [p.stop - p.start for p in decoding._parts(large, 2)[:2]]
    assert sizes == first_two + [p.stop - p.start for p in decoding._parts(files, 2)]
    assert max(in_pool) == 2


def _stroke(height: int, width: int) -> bytes:
    """A PNG of a "1", as large as asked."""
    stroke = np.zeros((height, width), np.uint8)
    stroke[height // 6 : -height // 6, width * 2 // 5 : -width * 2 // 5] = 255
    return png(stroke)


def test_no_processes_means_decoding_in_the_server_process(files: list[bytes]) -> None:
    decoder = ImageDecoder(processes=0, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    decoder.start()
    assert decoder._pool is None
    np.testing.assert_array_equal(asyncio.run(decoder.decode(files, PREP)), decode_digits(files, PREP)[0])


def test_workers_end_with_a_killed_parent(tmp_path: Path) -> None:
    """A server killed with SIGKILL (or by the OOM killer) leaves no idle decoding processes behind."""
    script = ("from serving.decoding import ImageDecoder; import sys, time\n"
              "d = ImageDecoder(processes=2, max_image_pixels=1000); d.start()\n"
              "print(' '.join(str(p) for p in d._pool._processes), flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    """Running, not a zombie awaiting its (dead) parent's reaping."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
