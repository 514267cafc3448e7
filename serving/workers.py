"""Worker process pools of the server (image decoding) and the batch CLI (file preparation).

Spawned, not forked: the parent holds gRPC and ONNX Runtime threads, which a fork would copy mid-state.
Each worker ignores Ctrl-C (it reaches the whole process group in a terminal, and the parent decides how
to stop) and exits when its parent is gone, however the parent ended: a server or CLI killed with
SIGKILL or by the OOM killer must not leave idle workers behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess

from serving.preprocess import set_max_image_pixels

log = logging.getLogger("coursezoo.workers")


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
    # The manager thread exists once work was submitted; held here, as the pool drops it at shutdown(wait=False).
    # Not a daemon: holding the manager thread, the watcher holds the pool's queues, and so it is often the one
    # to release their semaphores as it ends. An exit meanwhile froze a daemon thread between a semaphore's unlink
    # and the word to the resource tracker, which then printed a leak warning and an ENOENT traceback after the
    # process's last line. The exit now waits for it: it ends within WATCH_S of the manager thread, which
    # ProcessPoolExecutor's own exit handler ends first.
    threading.Thread(target=_watch, args=(weakref.ref(pool), pool._executor_manager_thread),
                     name="coursezoo-pool-watch").start()
    return pool


#: How often a pool's watcher looks its workers up again (the pool may start one later), and how long it gives
#: the pool's manager thread to take a worker's death as broken by itself.
WATCH_S = 1.0


def _watch(pool_ref: weakref.ref[ProcessPoolExecutor], manager: threading.Thread | None) -> None:
    """Unblock the pool's manager thread when a worker dies and it does not see it; log how the worker ended.

    The manager thread watches the workers only between results: a worker killed (the OOM killer, SIGKILL) while
    it wrote a result into the pool's pipe left it blocked for ever reading the rest of that message. It then
    never failed the pool's futures with BrokenProcessPool, so every caller waited for ever (the server's pool
    places with them), and ``shutdown(wait=True)``, a server's stop, never returned: at a stop too, as a call cut
    off by the grace period leaves its images decoding. ``end_pool`` unblocks it, and it then fails the futures
    as when it sees a death itself. The watcher lasts as long as the manager thread, and holds the pool weakly:
    a pool dropped without a shutdown still ends its workers when it is collected.
    """
    stopped: set[int] = set()  # the sentinels of workers that ended cleanly: a ready sentinel stays ready
    while manager is not None and manager.is_alive():
        pool = pool_ref()
        workers = list((pool._processes or {}).values()) if pool is not None else []  # no public way to them
        del pool
        workers = [w for w in workers if w.sentinel not in stopped]
        if not workers:
            manager.join(WATCH_S)
            continue
        ended = multiprocessing.connection.wait([w.sentinel for w in workers], timeout=WATCH_S)
        stopped.update(ended)
        crashed = False
        for worker in (w for w in workers if w.sentinel in ended):
            exit_code = _exit_code(worker)
            if exit_code != 0:  # 0: told to stop by a shutdown
                crashed = True
                log.warning("worker process %d ended: %s", worker.pid, _how(exit_code),
                            extra={"pid": worker.pid, "exit_code": exit_code})
        if crashed:
            manager.join(WATCH_S)  # it saw the death itself: the pool is broken, and the thread ends
            if manager.is_alive() and (pool := pool_ref()) is not None and not pool._broken:
                end_pool(pool)  # blocked on the dead worker's half-written result
            return


def _exit_code(worker: BaseProcess) -> int | None:
    """How a process that has ended did, as ``Process.exitcode`` says it (a signal as its negative number), read
    without reaping it (``WNOWAIT``): the pool's manager thread and multiprocessing's exit handling reap their
    children themselves, and a worker they have reaped has its status in its Process object. None if it cannot
    be told within ``WATCH_S`` (the sentinel is ready a moment before the exit status is); the watcher then takes
    it as a death, which costs a needless unblocking at worst, where a death taken for a clean stop was a hang."""
    deadline = time.monotonic() + WATCH_S
    while True:
        try:
            status = os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already, by the Process object itself: it holds the status (a moment
            # after the reaping, in another thread)
            if (code := worker._popen.returncode if worker._popen is not None else None) is not None:
                return code
        else:
            if status is not None:
                return status.si_status if status.si_code == os.CLD_EXITED else -status.si_status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _how(exit_code: int | None) -> str:
    """How a process ended, in words an operator acts on (a negative exit code is the signal that ended it)."""
    if exit_code is None or exit_code >= 0:
        return f"exit status {exit_code}"
    name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else f"signal {-exit_code}"
    why = " (the out-of-memory killer, or kill -9)" if exit_code == -signal.SIGKILL else ""
    return f"killed by {name}{why}"


def end_pool(pool: ProcessPoolExecutor) -> None:
    """End a pool's workers and close this process's end of their result pipe, whatever state the pool is in.

    With every writer of the pipe gone, a manager thread blocked on a half-written result (see ``_watch``) reads
    the end of the pipe, takes the pool as broken and fails its futures; one that died (CPython gh-107219, see
    ``serving.decoding``) leaves workers no one else ends, and a worker left waiting for work would keep its
    parent from exiting. Not a shutdown: a shut-down pool refuses new work with a RuntimeError, where a broken
    one raises the BrokenProcessPool its users handle."""
    with _ending:  # the watcher and the pool's user may both end it: a descriptor closed twice at once could be
        # closed again after another file took its number
        workers = list(pool._processes.values()) if pool._processes else []
        queue = pool._result_queue  # None once the pool is shut down: its users call this before
        for worker in workers:
            worker.terminate()
        if queue is not None and not queue._writer.closed:
            queue._writer.close()


_ending = threading.Lock()


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
