"""The data stages' one process-pool map, over worker pools whose workers die with the stage.

:func:`parallel_map` runs a task function over a list of tasks (the ``local`` executor's units, see
llm/data/executor.py) with a progress bar, results in task order and the first error raised at
once (tasks not yet started are cancelled). A task reports finer progress
than "one task done" by calling :func:`advance` (filter: documents), from a worker or in-process.

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
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from queue import Empty
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCHDOG_INTERVAL_S = 0.5
PROGRESS_POLL_S = 0.2

# Where advance() sends progress in this process: the bar's update in the parent, a queue's put in a
# worker of a pool whose map counts units, None (progress off).
_report: Callable[[int], Any] | None = None


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


def _init_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...],
                 progress: Any = None) -> None:
    """Runs first in every worker (spawn: in the worker process): bind its life to ``parent``, route
    :func:`advance` to the parent's ``progress`` queue (if any), then run the stage's own initializer."""
    global _report
    _request_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the request: no signal will ever come
        _orphaned()
    threading.Thread(target=_watch_parent, args=(parent,), name="kiln-parent-watchdog", daemon=True).start()
    _report = progress.put if progress is not None else None
    if initializer is not None:
        initializer(*initargs)


def worker_pool(max_workers: int, initializer: Callable[..., None] | None = None,
                initargs: tuple[Any, ...] = (), progress: Any = None) -> ProcessPoolExecutor:
    """A spawn-context process pool whose workers die with this process; ``initializer(*initargs)``
    still runs in each worker, after the parent-death guard is in place. Given a ``progress`` queue
    (spawn context), :func:`advance` in a worker puts its counts there."""
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(), initializer, initargs, progress))


# --------------------------------------------------------------------------- the maps


def advance(n: int) -> None:
    """Count ``n`` units of progress (e.g. documents) on the bar of the :func:`parallel_map` running
    this task, whether the task runs in a worker or in-process; a no-op when the bar is off."""
    if _report is not None:
        _report(n)


def parallel_map(fn: Callable[[T], R], tasks: Sequence[T], workers: int = 1, progress: bool = False, desc: str = "",
                 *, unit: str = "task", total: int | None = None, initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = (), pool: ProcessPoolExecutor | None = None) -> list[R]:
    """``[fn(t) for t in tasks]`` on ``workers`` processes (in this process when 1 or a single task),
    results in task order, so the output never depends on timing.

    The bar counts finished tasks, or, given ``total``, the units tasks report with :func:`advance`.
    The first failing task's error is raised as soon as it arrives; tasks not yet started are
    cancelled, and the pool is drained before this returns. ``pool`` reuses a pool the caller owns
    (dedup's two phases pay the start-up once); it counts tasks, not units. ``initializer(*initargs)``
    runs once in every process that runs tasks, this one included when it runs them.
    """
    from tqdm import tqdm

    if pool is not None and total is not None:
        raise ValueError("parallel_map: a caller's pool counts tasks; total (units) needs a pool of its own")
    with tqdm(total=len(tasks) if total is None else total, desc=desc, unit=unit, disable=not progress) as bar:
        if pool is not None:
            return _map_on(pool, fn, tasks, bar, None)
        if workers <= 1 or len(tasks) <= 1:
            return _map_here(fn, tasks, bar, by_units=total is not None, initializer=initializer, initargs=initargs)
        queue = get_context("spawn").Queue() if progress and total is not None else None
        with worker_pool(min(workers, len(tasks)), initializer, initargs, progress=queue) as own:
            results = _map_on(own, fn, tasks, bar, queue)
        if queue is not None:  # every task is done: show the whole count, whatever is still in the pipe
            bar.n = bar.total
            bar.refresh()
        return results


def _map_here(fn: Callable[[T], R], tasks: Sequence[T], bar: Any, *, by_units: bool,
              initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> list[R]:
    """The map in this process: :func:`advance` goes straight to the bar while it runs."""
    global _report
    if initializer is not None:
        initializer(*initargs)
    saved, _report = _report, (bar.update if by_units and not bar.disable else None)
    try:
        results = []
        for t in tasks:
            results.append(fn(t))
            if not by_units:
                bar.update()
        return results
    finally:
        _report = saved


def _map_on(pool: ProcessPoolExecutor, fn: Callable[[T], R], tasks: Sequence[T], bar: Any, queue: Any) -> list[R]:
    """Submit every task to ``pool``; collect results in task order, feeding the bar as tasks finish
    (or, with a ``queue``, as workers report units)."""
    futures: dict[Future[R], int] = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
    results: list[Any] = [None] * len(tasks)
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=PROGRESS_POLL_S if queue is not None else None,
                                 return_when=FIRST_COMPLETED)
            _drain(queue, bar)
            for fut in done:
                results[futures[fut]] = fut.result()  # a task's error is raised here, at once
                if queue is None:
                    bar.update()
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
    return results


def _drain(queue: Any, bar: Any) -> None:
    while queue is not None:
        try:
            bar.update(queue.get_nowait())
        except Empty:
            return
