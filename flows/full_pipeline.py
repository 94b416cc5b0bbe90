"""`full-pipeline`: the whole DAG, download to report, as one Prefect flow.

    download → filter → dedup → tokenizer → tokenize → pretrain → midtrain → sft
                                                          ↓           ↓        ↓
                                                   eval_pretrain eval_midtrain eval_sft → export → report

The steps are ``llm.stages.pipeline.plan``'s, the same ``kiln run`` walks (one task per step,
steps pass artifact URIs). Every stage task is cached on its content key (tasks/stage_tasks.py), so an unchanged config
finishes with every stage ``Cached``; ``force`` recomputes the named stages (``eval`` means
every eval, ``all`` everything).

GPU routing: with ``orchestration.use_deployments`` the training and eval stages
(``StageDef.gpu``) run as their own deployments (``pretrain/<preset>`` ...) on the gpu pool
and this flow, on the cpu pool, waits for them; a failed child fails this flow with the
child's error. Evals are submitted as soon as their model exists, so eval_pretrain runs
while midtrain trains when the gpu pool has room. Without deployments every stage runs in
this flow's process, one after the other (stages export their MLflow run id through the
process environment, so they must not overlap there).

MLflow: one parent run for this flow run, one child per stage (tasks/tracking_tasks.py), a
Prefect link artifact to the parent, the report as a Prefect markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture

from llm.config import ConfigError, KilnConfig
from llm.stages.pipeline import Step, plan
from llm.stages.registry import STAGES
from flows.settings import flow_config
from tasks.stage_tasks import resolve_future, run_stage_task, submit_stage_task
from tasks.tracking_tasks import PipelineTracker


def _flow_run_and_url() -> tuple[Any, str | None]:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None, None
    from prefect.utilities.urls import url_for

    try:
        url = url_for(ctx.flow_run)
    except Exception:  # noqa: BLE001 - a URL is a nicety; never fail a run for it
        url = None
    return ctx.flow_run, url


Pending = tuple[str, str, PrefectFuture]  # (stage, label, future) of a submitted step


class _Runner:
    """Runs stages for one flow run: routing, tracking, a status line per stage."""

    def __init__(self, cfg: KilnConfig, tracker: PipelineTracker, forced: set[str]):
        self.cfg = cfg
        self.tracker = tracker
        self.forced = forced
        self.remote = cfg.orchestration.use_deployments
        self.status: dict[str, str] = {}

    def _force(self, name: str) -> bool:
        return "all" in self.forced or name in self.forced

    def start(self, step: Step, uris: dict[str, str]) -> Pending | None:
        """Start ``step`` on the outputs in ``uris``: run it now and record its URI, or, for a gpu stage
        with deployments, submit it and return what :meth:`collect` waits on."""
        inputs = {role: uris[label] for role, label in step.inputs.items()}
        if self.remote and STAGES[step.stage].gpu:
            return self.submit(step.stage, step.label, inputs)
        uris[step.label] = self.run(step.stage, step.label, inputs)["uri"]
        return None

    def run(self, name: str, label: str, inputs: dict[str, str]) -> dict[str, Any]:
        try:
            run_id = self.tracker.stage_start(label, name)
            summary, cached = run_stage_task(name, self.cfg, inputs, force=self._force(name), label=label,
                                             mlflow_run_id=run_id, via_deployment=self.remote and STAGES[name].gpu)
        except BaseException as e:
            self.tracker.stage_failed(label, e)
            self.status[label] = "failed"
            raise
        return self._done(name, label, summary, cached)

    def submit(self, name: str, label: str, inputs: dict[str, str]) -> Pending:
        try:
            run_id = self.tracker.stage_start(label, name)
            fut = submit_stage_task(name, self.cfg, inputs, force=self._force(name), label=label,
                                    mlflow_run_id=run_id, via_deployment=self.remote and STAGES[name].gpu)
        except BaseException as e:
            self.tracker.stage_failed(label, e)
            self.status[label] = "failed"
            raise
        return name, label, fut

    def collect(self, pending: Pending) -> dict[str, Any]:
        name, label, fut = pending
        try:
            summary, cached = resolve_future(fut)
        except BaseException as e:
            self.tracker.stage_failed(label, e)
            self.status[label] = "failed"
            raise
        return self._done(name, label, summary, cached)

    def _done(self, name: str, label: str, summary: dict[str, Any], cached: bool) -> dict[str, Any]:
        self.tracker.stage_done(label, name, summary, cached)
        self.status[label] = ("follower" if summary.get("follower") else "cached" if cached
                              else "reused" if summary.get("reused") else "computed")
        print(f"[kiln] {label}: {self.status[label]} -> {summary['uri']}")
        return summary


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(
    preset: str = "tiny",
    overrides: dict[str, Any] | list[str] | None = None,
    force: list[str] | None = None,
    executor: str | None = None,
) -> dict[str, str]:
    """Run every stage for ``preset`` + ``overrides``; returns {stage label: output URI}.

    ``overrides``: ``{"pretrain.steps": 10}`` or ``["pretrain.steps=10"]``.
    ``force``: stage names to recompute (``all`` for everything).
    ``executor``: where the data stages run their units (``run.executor``: local, dask, dask://HOST:PORT).
    """
    cfg = flow_config(preset, overrides)
    if executor:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"executor": executor})})
        from llm.data.executor import probe

        probe(executor)  # a bad name or an unreachable scheduler: one line, before any stage
    forced = set(force or []) | set(cfg.orchestration.force)
    unknown = forced - set(STAGES) - {"all"}
    if unknown:
        raise ConfigError(f"force names unknown stages {sorted(unknown)}; known: {list(STAGES)}")
    flow_run, flow_url = _flow_run_and_url()
    tracker = PipelineTracker.start(
        cfg, params={"preset": preset, "overrides": overrides or {}, "force": sorted(forced)},
        flow_run=flow_run, flow_run_url=flow_url)
    if flow_run is not None:
        create_link_artifact(link=tracker.url, link_text="MLflow run of this pipeline", key="kiln-mlflow-run",
                             description=f"MLflow parent run {tracker.run_id} (experiment {cfg.run.mlflow_experiment})")
    print(f"[kiln] MLflow run: {tracker.url}")
    runner = _Runner(cfg, tracker, forced)
    uris: dict[str, str] = {}
    pending: dict[str, Pending] = {}
    try:
        _run_plan(runner, plan(cfg), uris, pending)
        markdown = tracker.log_report(uris["report"])
        if markdown and flow_run is not None:
            create_markdown_artifact(markdown=markdown, key="kiln-report",
                                     description=f"Kiln report, preset {cfg.preset}, output {uris['report']}")
        tracker.finish(ok=True)
    except BaseException as e:
        # Steps already running (evals) finish (and are cached) before this run fails, so a retry of
        # this run does not redo them; their own errors are recorded on their child runs.
        for p in pending.values():
            try:
                runner.collect(p)
            except BaseException:  # noqa: BLE001, S110 - the first error is the one to report
                pass
        tracker.finish(ok=False, error=f"{type(e).__name__}: {e}")
        raise
    print("[kiln] " + ", ".join(f"{k}={v}" for k, v in runner.status.items()))
    return uris


def _run_plan(runner: _Runner, steps: list[Step], uris: dict[str, str], pending: dict[str, Pending]) -> None:
    """Run ``steps``, filling ``uris`` {label: output URI}; ``pending`` holds the submitted ones.

    Each step starts as soon as its inputs exist, in plan order. In this process that is the plan's
    order, one after the other. With deployments a gpu step is submitted and the flow goes on, so an
    eval runs on the gpu pool while the next training stage trains; the flow waits for a submitted
    step only when the next step in plan order needs it (and for all of them at the end).
    """
    todo = list(steps)
    while todo:
        ready = next((s for s in todo if all(label in uris for label in s.inputs.values())), None)
        if ready is None:  # wait for the oldest submitted step the first waiting one reads
            label = next(label for label in pending if label in todo[0].inputs.values())
            uris[label] = runner.collect(pending.pop(label))["uri"]
            continue
        todo.remove(ready)
        if (p := runner.start(ready, uris)) is not None:
            pending[ready.label] = p
    while pending:
        label = next(iter(pending))
        uris[label] = runner.collect(pending.pop(label))["uri"]


if __name__ == "__main__":
    print(full_pipeline())
