"""`filter-sharded`: a data stage (filter by default; dedup or tokenize) with one Prefect task per unit, on Dask.

The stage body is the registered stage's own (llm/data/filter.py ...); this flow only puts its units
on Prefect tasks (tasks/unit_tasks.py) run by prefect-dask's ``DaskTaskRunner``: a local cluster of
``n_workers`` processes, or an existing scheduler at ``dask_address`` (``tcp://host:8786``). So the
output, its key and its place are exactly the stage's (``kiln filter`` later finds it done), and a
rerun after a crash redoes only the units without a part. Without Prefect, ``kiln filter --executor
dask://HOST:PORT`` runs the same units on the same cluster.

Workers write their parts straight into the stage's work directory, so on a real cluster that
directory must be on a filesystem every worker mounts (a local artifact root on NFS/Lustre); with an
``s3://`` artifact root use a local cluster.

    python -m flows.sharded_filter --preset tiny --workers 2
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow
from prefect_dask import DaskTaskRunner

from flows.settings import flow_config
from llm.data.executor import use_executor
from llm.stages.registry import execute
from tasks.unit_tasks import PrefectExecutor

DATA_STAGES = ("filter", "dedup", "tokenize")


@flow(name="filter-sharded", log_prints=True, task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2}))
def filter_sharded(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                   inputs: dict[str, str] | None = None, force: bool = False, stage: str = "filter") -> dict[str, Any]:
    """Run ``stage`` on ``inputs`` (default: this config's upstream outputs), its units as Dask tasks."""
    if stage not in DATA_STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {DATA_STAGES}")
    cfg = flow_config(preset, overrides)
    if not inputs:
        from llm.stages.pipeline import step, upstream_inputs

        inputs = upstream_inputs(cfg, step(stage), progress=False)
    with use_executor(PrefectExecutor(getattr(cfg, stage).workers)):
        res = execute(stage, cfg, inputs, force=force, progress=False)
    print(f"[kiln] {stage}: {'reused' if res.cached else 'computed'} -> {res.uri}")
    return {"uri": res.uri, "counts": res.manifest["counts"], "reused": res.cached}


def runner(workers: int = 2, address: str = "") -> DaskTaskRunner:
    """A local cluster of ``workers`` processes, or the scheduler at ``address``."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", default="filter", choices=DATA_STAGES)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    p.add_argument("--address", default="", help="an existing Dask scheduler, tcp://host:8786")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    print(filter_sharded.with_options(task_runner=runner(a.workers, a.address))(a.preset, a.overrides, force=a.force,
                                                                                  stage=a.stage))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
