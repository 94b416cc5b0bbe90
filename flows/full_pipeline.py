"""`full-pipeline`: the whole DAG, download to report, as one Prefect flow.

    download → filter → dedup → tokenizer → tokenize → pretrain → midtrain → sft
                                                          ↓           ↓        ↓
                                                   eval_pretrain eval_midtrain eval_sft → export → report

Same shape as ``llm.stages.pipeline.run_pipeline`` (one task per stage, stages pass artifact URIs).
Every stage task is cached on its content key (tasks/stage_tasks.py), so an unchanged config
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

from llm.config import STAGES as STAGE_NAMES
from llm.config import ConfigError, KilnConfig
from llm.stages.pipeline import CHAIN, export_inputs
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

    def submit(self, name: str, label: str, inputs: dict[str, str]) -> tuple[str, str, PrefectFuture]:
        try:
            run_id = self.tracker.stage_start(label, name)
            fut = submit_stage_task(name, self.cfg, inputs, force=self._force(name), label=label,
                                    mlflow_run_id=run_id, via_deployment=self.remote and STAGES[name].gpu)
        except BaseException as e:
            self.tracker.stage_failed(label, e)
            self.status[label] = "failed"
            raise
        return name, label, fut

    def collect(self, pending: tuple[str, str, PrefectFuture]) -> dict[str, Any]:
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
) -> dict[str, str]:
    """Run every stage for ``preset`` + ``overrides``; returns {stage label: output URI}.

    ``overrides``: ``{"pretrain.steps": 10}`` or ``["pretrain.steps=10"]``.
    ``force``: stage names to recompute (``all`` for everything).
    """
    cfg = flow_config(preset, overrides)
    forced = set(force or []) | set(cfg.orchestration.force)
    unknown = forced - set(STAGE_NAMES) - {"all"}
    if unknown:
        raise ConfigError(f"force names unknown stages {sorted(unknown)}; known: {STAGE_NAMES}")
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
    pending: list[tuple[str, str, PrefectFuture]] = []
    try:
        for name in CHAIN:
            inputs = {role: uris[up] for role, up in STAGES[name].inputs.items()}
            uris[name] = runner.run(name, name, inputs)["uri"]
            if name in cfg.eval.stages and runner.remote:  # evaluate while the next stage trains
                pending.append(runner.submit("eval", f"eval_{name}", _eval_inputs(uris, name)))
        for model_stage in cfg.eval.stages:
            if not runner.remote:
                uris[f"eval_{model_stage}"] = runner.run("eval", f"eval_{model_stage}", _eval_inputs(uris, model_stage))["uri"]
        while pending:
            p = pending.pop(0)
            uris[p[1]] = runner.collect(p)["uri"]
        uris["export"] = runner.run("export", "export", export_inputs(uris))["uri"]
        uris["report"] = runner.run("report", "report", dict(uris))["uri"]
        markdown = tracker.log_report(uris["report"])
        if markdown and flow_run is not None:
            create_markdown_artifact(markdown=markdown, key="kiln-report",
                                     description=f"Kiln report, preset {cfg.preset}, output {uris['report']}")
        tracker.finish(ok=True)
    except BaseException as e:
        # Evals already running finish (and are cached) before this run fails, so a retry of
        # this run does not redo them; their own errors are recorded on their child runs.
        for p in pending:
            try:
                runner.collect(p)
            except BaseException:  # noqa: BLE001, S110 - the first error is the one to report
                pass
        tracker.finish(ok=False, error=f"{type(e).__name__}: {e}")
        raise
    print("[kiln] " + ", ".join(f"{k}={v}" for k, v in runner.status.items()))
    return uris


def _eval_inputs(uris: dict[str, str], model_stage: str) -> dict[str, str]:
    return {"model": uris[model_stage], "tokenizer": uris["tokenizer"], "tokens": uris["tokenize"]}


if __name__ == "__main__":
    print(full_pipeline())
