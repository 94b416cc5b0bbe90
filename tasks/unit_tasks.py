"""The data stages' units as Prefect tasks: an executor (llm/data/executor.py) for flows.

Inside a flow whose task runner is prefect-dask's ``DaskTaskRunner``, every unit of filter, dedup or
tokenize becomes one Prefect task run on the Dask cluster, with Prefect's retries for transient
failures and a task run per shard in the UI. The unit's work and its part manifest are the stage's
own (llm/data); this module only submits them, so there is one implementation of every stage body.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.stage_tasks import retry_on_transient


@task(name="data-unit", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_on_transient,
      cache_policy=NO_CACHE, task_run_name="{desc} {index}")
def unit_task(fn: Callable[[Any], Any], arg: Any, desc: str, index: int) -> Any:
    """One unit; its part manifest (written by ``fn``) is what a rerun resumes from, not Prefect's cache."""
    return fn(arg)


class PrefectExecutor:
    """Units as Prefect tasks on the current flow's task runner (a DaskTaskRunner: units on Dask)."""

    name = "prefect"

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, desc: str, progress: bool,
            total: int | None = None, unit: str = "unit") -> list[Any]:
        futures = [unit_task.submit(fn, t, desc, i) for i, t in enumerate(tasks)]
        return [f.result() for f in futures]  # in unit order; the first failure raises

    def close(self) -> None:
        pass
