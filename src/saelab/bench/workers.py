"""Bench worker processes that never outlive the bench: they die with their parent however it ends.

A worker sets PR_SET_PDEATHSIG (Linux) so the kernel kills it when its parent dies, even by SIGKILL, and also
runs a watchdog thread that exits when its parent pid changes (the portable fallback). The parent turns SIGTERM
into an interrupt (`Terminated`) so that it stops its workers itself before exiting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

PR_SET_PDEATHSIG = 1
WATCHDOG_INTERVAL_S = 1.0


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the bench; handled like Ctrl-C (workers stopped, finished runs listed)."""

    signal_name = "SIGTERM"


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies. False where unsupported.

    The signal fires when the parent *thread* that started this process exits; bench workers are started
    from the parent's main thread, whose end is the end of the parent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, interval: float = WATCHDOG_INTERVAL_S) -> threading.Thread:
    """A daemon thread that ends this process as soon as its parent is no longer `parent_pid`."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:  # reparented: the parent is gone
                os._exit(1)
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="saelab-parent-watchdog", daemon=True)
    thread.start()
    return thread


def init_worker(parent_pid: int) -> None:
    """Initialiser of every bench worker process."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides what happens to its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    watch_parent(parent_pid)


def stop_processes(processes: Iterable[Any], grace: float = 5.0) -> None:
    """SIGTERM each live multiprocessing.Process, wait up to `grace` seconds, then SIGKILL what is left."""
    processes = [p for p in processes if p is not None]
    for p in processes:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.kill()
                p.join(1.0)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (once; a repeat is ignored during cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
