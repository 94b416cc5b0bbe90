"""`filter-sharded`: the filter stage with one Prefect task per shard, on a Dask cluster.

The registered ``filter`` stage already runs shards in parallel processes on one machine. This
flow spreads the same per-shard work (``llm.data.filter.filter_shard``) over a Dask cluster
through prefect-dask's ``DaskTaskRunner``: a local cluster of ``n_workers`` processes, or an
existing scheduler at ``dask_address`` (``tcp://host:8786``).

It publishes to the same content-addressed place as the ``filter`` stage (same key: config,
input manifest hash, code version), so a later ``full-pipeline`` run finds ``filter`` done and
reuses it. Workers write shard files straight into the stage's work directory, so on a real
cluster that directory must be on a filesystem every worker mounts (a local artifact root on
NFS/Lustre); with an ``s3://`` artifact root use a local cluster.

    python -m flows.sharded_filter --preset tiny --workers 2
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow, task
from prefect_dask import DaskTaskRunner

from flows.settings import flow_config
from llm.config import FilterConfig, KilnConfig
from llm.data.filter import ShardReport, check_output, filter_shard, input_shards, summarize
from llm.stages.output import StageOutput, run_stage
from llm.stages.registry import STAGES
from llm.storage import Store
from tasks.stage_tasks import retry_on_transient


@task(name="filter-shard", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_on_transient,
      task_run_name="filter {name}")
def filter_shard_task(src: str, name: str, dst: str, fcfg: dict[str, Any], examples_per_rule: int) -> ShardReport:
    return filter_shard(src, name, dst, FilterConfig.model_validate(fcfg), examples_per_rule)


def _body(cfg: KilnConfig):
    def body(out: StageOutput, manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
        shards = input_shards(cfg, manifests)  # validates every shard before spending time on any
        fcfg = cfg.filter.model_dump(mode="json")
        futures = [filter_shard_task.submit(str(path), name, str(out.path(name)), fcfg, cfg.filter.examples_per_rule)
                   for name, path in shards]
        reports = [f.result() for f in futures]
        check_output(out, reports)
        return summarize(reports, cfg.filter.examples_per_rule)

    return body


@flow(name="filter-sharded", log_prints=True, task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2}))
def filter_sharded(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                   inputs: dict[str, str] | None = None, force: bool = False) -> dict[str, Any]:
    """Filter every shard of ``inputs["docs"]`` (default: this config's download output) as Dask tasks."""
    cfg = flow_config(preset, overrides)
    if not inputs:
        from llm.stages.pipeline import step, upstream_inputs

        inputs = upstream_inputs(cfg, step("filter"), progress=False)
    sd = STAGES["filter"]
    res = run_stage(Store(cfg.run.artifact_root, cfg.run.s3_endpoint), "filter", sd.key_config(cfg), inputs,
                    sd.version, _body(cfg), force=force)
    print(f"[kiln] filter: {'reused' if res.cached else 'computed'} -> {res.uri}")
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    p.add_argument("--address", default="", help="an existing Dask scheduler, tcp://host:8786")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    print(filter_sharded.with_options(task_runner=runner(a.workers, a.address))(a.preset, a.overrides, force=a.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
