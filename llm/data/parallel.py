"""Worker pools for the data stages whose workers die with the stage that started them.

A ``kill -9`` of a stage process (an OOM kill, a cancelled Prefect run, a lost node) runs no
cleanup, so a plain ``ProcessPoolExecutor``'s workers lived on under PID 1: they finished their
shard, renamed it into a ``.partial`` whose owner was gone, and then held their memory forever
(issue 13, item 4). Every worker here instead:

* asks Linux for ``SIGKILL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks that
  its parent is still the process that started the pool, since the parent may have died before the
  request was made (the worker would then already belong to PID 1 and never get the signal);
* runs a watchdog thread that exits the process once ``os.getppid()`` is no longer that parent: the
  portable fallback where ``prctl`` is missing.

Linux delivers the parent-death signal when the *thread* that started the worker exits, so a pool
must be used from the thread that created it (every stage here does: created, used and shut down
in one call). Workers are spawned, not forked, so they inherit no threads or locks from a Prefect
or MLflow parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCHDOG_INTERVAL_S = 0.5


def _orphaned() -> None:
    """Leave at once, without cleanup: nothing of a dead stage may be finished or flushed."""
    os._exit(1)


def _request_parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(WATCHDOG_INTERVAL_S):
        if os.getppid() != parent:
            _orphaned()


def _init_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Runs first in every worker (spawn: in the worker process): bind its life to ``parent``, then the
    stage's own initializer."""
    _request_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the request: no signal will ever come
        _orphaned()
    threading.Thread(target=_watch_parent, args=(parent,), name="kiln-parent-watchdog", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def worker_pool(max_workers: int, initializer: Callable[..., None] | None = None,
                initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A spawn-context process pool whose workers die with this process; ``initializer(*initargs)``
    still runs in each worker, after the parent-death guard is in place."""
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(), initializer, initargs))
