"""Worker process pools of the server (image decoding) and the batch CLI (file preparation).

Spawned, not forked: the parent holds gRPC and ONNX Runtime threads, which a fork would copy mid-state.
Each worker ignores Ctrl-C (it reaches the whole process group in a terminal, and the parent decides how
to stop) and exits when its parent is gone, however the parent ended: a server or CLI killed with
SIGKILL or by the OOM killer must not leave idle workers behind.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import resource_tracker

from serving.preprocess import set_max_image_pixels


def cores() -> int:
    """CPUs this process may use (its affinity, e.g. a container's limit), not all the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (one per process tree, which every spawned child shares) deaf
    to SIGHUP, as it is to SIGINT and SIGTERM. A SIGHUP to the whole process group (a terminal closing, a
    group stop) killed it; a new one was started for the semaphores the pools then released, and it printed a
    KeyError traceback for each one it had never seen. An ignored signal stays ignored across exec."""
    if threading.current_thread() is not threading.main_thread():
        resource_tracker.ensure_running()  # signal handlers can be set from the main thread only
        return
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)


def spawn_pool(processes: int, max_image_pixels: int | None = None) -> ProcessPoolExecutor:
    """A pool of ``processes`` workers, all started now (ProcessPoolExecutor starts them on demand), so
    their start-up (~0.5 s each) overlaps the caller's own instead of delaying the first task.
    ``max_image_pixels`` sets the workers' Pillow pixel limit (process-wide state)."""
    start_resource_tracker()
    # Started with SIGINT blocked (a signal mask survives fork and exec): a Ctrl-C to the group while they
    # import was a KeyboardInterrupt traceback from each, before _init_worker could ignore it. It stays
    # pending here, not lost.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(max_image_pixels,))
        for _ in range(processes):
            pool.submit(int)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pool


def _init_worker(max_image_pixels: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()
    if max_image_pixels is not None:
        set_max_image_pixels(max_image_pixels)


def _exit_with_parent(sentinel: int) -> None:
    """The parent's sentinel becomes ready when the parent process ends (its end of a pipe closes)."""
    multiprocessing.connection.wait([sentinel])
    os._exit(0)
