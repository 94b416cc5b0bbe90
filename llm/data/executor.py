"""Where the data stages' units of work run: this machine's process pool, or a Dask cluster.

In datatrove's terms the stages (filter, dedup's four phases, tokenize) are the *steps* and this
module is the *executor*. A step cuts its work into **units** (a shard; for dedup's exact and
cluster phases one global table or one (band, partition) bucket table; for tokenize a slice of a
row group) and hands them to :func:`run_units`, which

* runs every unit that has no finished part yet, on the executor, results in unit order (so the
  stage's output never depends on the executor, the worker count or timing);
* has each unit, where it ran, write its own small manifest ``<parts>/<unit>.json`` atomically
  (llm/storage.py write_atomic) *after* the unit's own files were renamed into place, recording the
  unit's result and the size of every file it declared;
* on a rerun after a crash finds those manifests and redoes only the units without one, or whose
  declared files are gone or changed.

The parts live under the stage's ``.partial`` work dir, in dot-prefixed folders that a publish
never lists, and the stage's ``manifest.json`` is still written last by run_stage.

Executors (:func:`make_executor`, from ``--executor`` or ``run.executor``):

* ``local`` (the default): the spawned process pool of llm/data/parallel.py, whose workers die with
  the stage; one worker runs units in this process.
* ``dask``: a ``dask.distributed`` ``LocalCluster`` on 127.0.0.1 with ``workers`` processes.
* ``dask://HOST:PORT`` or ``tcp://HOST:PORT``: an existing scheduler (dask-jobqueue, dask-kubernetes,
  Coiled, ``dask scheduler``). Its workers must mount the artifact root at the same path. An
  address that does not answer is one error line naming it, before any unit runs.

A Dask worker that dies mid-unit (OOM kill, lost node) has its unit rescheduled by the scheduler on
another worker; the dead unit left only dot-prefixed temp files, never a part or a manifest.
Tests and Prefect flows may put their own executor in place with :func:`use_executor` (flows do,
to run units as Prefect tasks on a DaskTaskRunner; llm/ itself never imports Prefect).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from llm.data.parallel import parallel_map, worker_pool
from llm.storage import write_atomic

CONNECT_TIMEOUT_S = 10  # a scheduler that does not answer in this long is reported unreachable
DASK_SCHEMES = ("dask://", "tcp://", "tls://")


class ExecutorError(ValueError):
    """A bad executor name or an unreachable scheduler: one line naming it (the CLI prints it as such)."""


class Executor(Protocol):
    """Runs ``fn(task)`` for every task and returns the results in task order. Given ``total``, the
    bar may count what tasks report with llm.data.parallel.advance (documents) instead of tasks."""

    name: str
    workers: int

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, desc: str, progress: bool,
            total: int | None = None, unit: str = "unit") -> list[Any]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- local


class LocalExecutor:
    """Today's process pool, created on the first map that needs one and reused by later phases
    (dedup pays interpreter start-up once); it must be used from the thread that created it."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool = None

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, desc: str, progress: bool,
            total: int | None = None, unit: str = "unit") -> list[Any]:
        if total is not None:  # counting units that workers report needs a pool of its own
            return parallel_map(fn, list(tasks), self.workers, progress, desc, unit=unit, total=total)
        if self.workers > 1 and len(tasks) > 1 and self._pool is None:
            self._pool = worker_pool(self.workers)
        pool = self._pool if len(tasks) > 1 else None
        return parallel_map(fn, list(tasks), self.workers, progress, desc, unit="unit", pool=pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


# --------------------------------------------------------------------------- dask


def scheduler_address(spec: str) -> str:
    """``dask://HOST:PORT`` -> ``tcp://HOST:PORT`` (what distributed dials); tcp:// and tls:// as given."""
    return "tcp://" + spec[len("dask://"):] if spec.startswith("dask://") else spec


class DaskExecutor:
    """Units as ``dask.distributed`` tasks, on a LocalCluster of ``workers`` processes or at ``address``."""

    name = "dask"

    def __init__(self, workers: int, address: str = "", shown: str = "") -> None:
        from distributed import Client, LocalCluster

        self.address = address
        self._cluster = None
        if address:
            _dial(address, shown or address)  # refused at once, instead of retrying until the timeout
            try:
                self.client = Client(address, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as e:
                raise ExecutorError(f"dask scheduler {shown or address} is unreachable ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else 'no answer'})") from None
        else:
            self._cluster = LocalCluster(n_workers=max(1, int(workers)), threads_per_worker=1, processes=True,
                                         host="127.0.0.1", dashboard_address=":0")
            self.client = Client(self._cluster)
        self.workers = len(self.client.scheduler_info().get("workers", {})) or max(1, int(workers))

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, desc: str, progress: bool,
            total: int | None = None, unit: str = "unit") -> list[Any]:
        """The bar counts finished tasks (``total`` is ignored: workers on other hosts report nothing)."""
        from distributed import as_completed
        from tqdm import tqdm

        # pure=False: every call is its own task, even for equal arguments (a rerun after a crash).
        futures = [self.client.submit(fn, t, pure=False, key=f"kiln-{desc.replace(' ', '-')}-{i}-{time.time_ns()}")
                   for i, t in enumerate(tasks)]
        try:
            with tqdm(total=len(futures), desc=desc, unit="unit", disable=not progress) as bar:
                for fut in as_completed(futures):
                    fut.result()  # the first failing unit's error, at once
                    bar.update()
            return [f.result() for f in futures]
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


# --------------------------------------------------------------------------- choosing one


def check_spec(spec: str) -> str:
    """``spec`` if it names an executor (local, dask, dask://HOST:PORT, tcp://HOST:PORT), else a one-line error."""
    if spec in ("local", "dask") or (spec.startswith(DASK_SCHEMES) and ":" in spec.split("://", 1)[1]):
        return spec
    raise ExecutorError(f"executor {spec!r}: expected local, dask, dask://HOST:PORT or tcp://HOST:PORT")


_override = threading.local()


@contextlib.contextmanager
def use_executor(executor: Executor) -> Iterator[Executor]:
    """Run the data stages started in this thread inside the block on ``executor`` (a Prefect flow's,
    a test's), whatever the config says; the caller owns it and closes it."""
    saved = getattr(_override, "executor", None)
    _override.executor = executor
    try:
        yield executor
    finally:
        _override.executor = saved


@contextlib.contextmanager
def stage_executor(spec: str, workers: int) -> Iterator[Executor]:
    """The executor a stage runs its units on: the one set by :func:`use_executor`, else a new one for
    ``spec`` that is closed when the stage is done (a LocalCluster is stopped with it)."""
    given = getattr(_override, "executor", None)
    if given is not None:
        yield given
        return
    executor = make_executor(spec, workers)
    try:
        yield executor
    finally:
        executor.close()


def probe(spec: str) -> None:
    """Fail now, in one line naming it, when ``spec`` is a scheduler address that accepts no connection:
    before any stage (or any upstream stage) does work that a run on it would then waste."""
    spec = check_spec(spec)
    if spec not in ("local", "dask"):
        _dial(scheduler_address(spec), spec)


def _dial(address: str, shown: str) -> None:
    """Open (and close) a TCP connection to the scheduler at ``address``, or a one-line error naming ``shown``."""
    host, _, port = address.split("://", 1)[1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ExecutorError(f"dask scheduler {shown} is unreachable ({e.strerror or type(e).__name__})") from None


def make_executor(spec: str, workers: int) -> Executor:
    spec = check_spec(spec)
    if spec == "local":
        return LocalExecutor(workers)
    return DaskExecutor(workers, "" if spec == "dask" else scheduler_address(spec), spec)


# --------------------------------------------------------------------------- units and their parts


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``fn(arg)`` returns a JSON-able result; ``outputs`` are the files it writes
    (each atomically), checked on resume. A unit that may write nothing lists its file anyway."""

    uid: str  # the part manifest's name: unique within the phase, the same on every rerun
    arg: Any
    outputs: tuple[str, ...] = field(default=())
    size: int = 0  # what the unit reports with advance() (documents), for a progress bar in those units


def _sizes(outputs: Sequence[str]) -> dict[str, int | None]:
    return {p: (Path(p).stat().st_size if Path(p).exists() else None) for p in outputs}


@dataclass(frozen=True)
class _UnitCall:
    """What a worker runs for a unit: the work, then its part manifest (last, atomically)."""

    fn: Callable[[Any], Any]
    encode: Callable[[Any], Any] | None
    manifest: str

    def __call__(self, unit: Unit) -> str:
        result = self.fn(unit.arg)
        body = json.dumps({"unit": unit.uid, "result": self.encode(result) if self.encode else result,
                           "outputs": _sizes(unit.outputs)}, sort_keys=True)
        write_atomic(Path(self.manifest) / f"{unit.uid}.json", body)
        return body


def _finished(parts: Path, unit: Unit) -> str | None:
    """The part manifest of a unit done by an earlier attempt, if its files are still as it left them."""
    path = parts / f"{unit.uid}.json"
    try:
        body = path.read_text()
        recorded = json.loads(body)
    except (OSError, ValueError):
        return None
    return body if recorded.get("unit") == unit.uid and recorded.get("outputs") == _sizes(unit.outputs) else None


def run_units(executor: Executor, fn: Callable[[Any], Any], units: Sequence[Unit], parts: Path, *, desc: str,
              progress: bool = False, encode: Callable[[Any], Any] | None = None,
              decode: Callable[[Any], Any] | None = None, unit: str = "unit") -> list[Any]:
    """Every unit's result in unit order, running only the units an earlier attempt did not finish.

    A result always comes back through its JSON part manifest (``encode`` to JSON-able, ``decode``
    back), so a resumed unit's result is exactly a fresh one's and the stage manifest is the same.
    """
    parts.mkdir(parents=True, exist_ok=True)
    bodies: dict[str, str] = {}
    todo = []
    for u in units:
        done = _finished(parts, u)
        if done is None:
            todo.append(u)
        else:
            bodies[u.uid] = done
    if todo:
        total = sum(u.size for u in todo) if unit != "unit" else None
        ran = executor.map(_UnitCall(fn, encode, str(parts)), todo, desc=desc, progress=progress, total=total, unit=unit)
        bodies.update((u.uid, b) for u, b in zip(todo, ran))
    results = [json.loads(bodies[u.uid])["result"] for u in units]
    return [decode(r) for r in results] if decode else results
