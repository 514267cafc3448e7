"""serving.workers: the worker pools of the server and the batch CLI, and the watcher that ends a broken one.

Real spawned processes: a worker killed while it writes its result into the pool's pipe (what the OOM killer
does at the wrong moment) must break the pool, whenever it happens, and a pool must end its workers however it
goes away.
"""

from __future__ import annotations

import gc
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from serving.workers import spawn_pool
from tests.conftest import REPO_ROOT


def _die_writing(delay_s: float) -> None:
    """After ``delay_s``, die as the OOM killer's victim would while writing a result: the header of a 1 MiB
    message and 100 bytes of it in the pool's result pipe, then SIGKILL."""
    time.sleep(delay_s)
    result_queue = sys._getframe(1).f_locals["result_queue"]  # concurrent.futures.process._process_worker's
    os.write(result_queue._writer.fileno(), struct.pack("!i", 1 << 20) + bytes(100))
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_result_during_a_shutdown_does_not_hang_it() -> None:
    """A server's stop shuts its decoding pool down and waits, while parts of calls cut off by the grace period
    still decode: a worker killed then left the pool's manager thread blocked on the half-written result, and
    the stop waited for ever (the watcher stopped watching at the shutdown)."""
    pool = spawn_pool(2)
    workers = list(pool._processes.values())
    try:
        future = pool.submit(_die_writing, 1.0)
        time.sleep(0.3)  # running in a worker
        closing = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True})
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "the shutdown hung"
        assert isinstance(future.exception(timeout=0), BrokenProcessPool)
    finally:  # without the fix: end the stuck pool, or this test process would never exit
        for worker in workers:
            worker.kill()
        if pool._result_queue is not None:
            pool._result_queue._writer.close()


def test_a_pool_dropped_without_a_shutdown_still_ends_its_workers() -> None:
    """The pool's watcher held it, so its workers outlived it (ProcessPoolExecutor ends them when it is
    collected); it now holds the pool weakly."""
    pool = spawn_pool(2)
    for future in [pool.submit(int) for _ in range(2)]:
        future.result(timeout=30)
    workers = list(pool._processes.values())
    del pool, future
    gc.collect()
    deadline = time.monotonic() + 30
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(w.is_alive() for w in workers)


#: A process that shuts a pool down, drops it and exits at once, while a thread other than the main one releases the
#: pool's semaphores, slowed between a semaphore's unlink and the word to the resource tracker (as a loaded machine
#: may deschedule a thread there).
_EXIT_WHILE_ANOTHER_THREAD_RELEASES = """
import threading
from multiprocessing import resource_tracker
from serving.workers import spawn_pool

releasing = threading.Event()
unregister = resource_tracker.unregister
def slow_unregister(name, rtype):
    if threading.current_thread() is not threading.main_thread():
        releasing.set()
        threading.Event().wait(0.5)
    unregister(name, rtype)
resource_tracker.unregister = slow_unregister

pool = spawn_pool(1)
pool.submit(int).result(timeout=60)
pool.shutdown(wait=True)
del pool
releasing.wait(10)
"""


def test_a_pool_released_as_the_process_exits_leaves_the_resource_tracker_nothing() -> None:
    """The watcher, a daemon thread, held the pool's manager thread and so its queues: their semaphores were
    released in the watcher as it ended, and a process exiting meanwhile froze it between a semaphore's unlink and
    the word to the resource tracker, which then printed a leak warning and an ENOENT traceback after the server's
    last line (CI, once). The process now waits for the watcher."""
    done = subprocess.run([sys.executable, "-c", _EXIT_WHILE_ANOTHER_THREAD_RELEASES], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # the tracker holds stderr until it is done
    assert done.returncode == 0, done.stderr
    assert "resource_tracker" not in done.stderr, done.stderr
