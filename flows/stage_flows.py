"""One flow per stage, each deployable and runnable alone.

    prefect deployment run pretrain/tiny --param overrides='{"pretrain.steps": 20}'
    prefect deployment run eval/tiny --param model_stage=midtrain

``full-pipeline`` calls these deployments for gpu stages (passing ``config``, ``inputs`` and
the MLflow run to log into). Called alone, a stage flow finds its inputs by content key like
``kiln <stage>`` does: upstream outputs that exist are reused, missing ones are computed in
this flow run first. Its own stage runs as the same cached task as in the pipeline, so
running a finished stage again is a ``Cached`` no-op unless ``force`` is set.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow

from flows.settings import flow_config
from llm.config import KilnConfig
from llm.stages.pipeline import target_step, upstream_inputs
from llm.stages.registry import STAGES
from tasks.stage_tasks import run_stage_task


def run_one(stage: str, *, preset: str, overrides: dict[str, Any] | list[str] | None, inputs: dict[str, str] | None,
            force: bool, mlflow_run_id: str | None, config: dict[str, Any] | None,
            model_stage: str | None = None) -> dict[str, Any]:
    cfg = KilnConfig.model_validate(config) if config else flow_config(preset, overrides)
    target = target_step(cfg, stage, model_stage)
    inputs = dict(inputs or {}) or upstream_inputs(cfg, target, progress=False)
    label = target.label
    if mlflow_run_id is None:  # alone: a small tree of its own (this flow run -> the stage)
        from prefect.context import FlowRunContext

        from tasks.tracking_tasks import PipelineTracker

        ctx = FlowRunContext.get()
        tracker = PipelineTracker.start(cfg, params={"stage": stage, "inputs": inputs, "force": force},
                                        flow_run=ctx.flow_run if ctx else None)
        try:
            run_id = tracker.stage_start(label, stage)
            summary, cached = run_stage_task(stage, cfg, inputs, force=force, mlflow_run_id=run_id, label=label)
        except BaseException as e:
            tracker.stage_failed(label, e)
            tracker.finish(ok=False, error=f"{type(e).__name__}: {e}")
            raise
        tracker.stage_done(label, stage, summary, cached)
        tracker.finish(ok=True)
    else:
        summary, cached = run_stage_task(stage, cfg, inputs, force=force, mlflow_run_id=mlflow_run_id, label=label)
    if summary.get("follower"):
        print(f"[kiln] {summary['follower']}")
    else:
        print(f"[kiln] {stage}: {'cached' if cached else ('reused' if summary['reused'] else 'computed')} -> {summary['uri']}")
    return summary


# One flow per stage, built from the registry. Parameters: preset/overrides (or a full `config` dict,
# which wins), explicit `inputs` {role: URI} (default: found by content key), `force`, and
# `mlflow_run_id` (the run to log into); a per-model stage (eval) also takes `model_stage`.


def _stage_flow(name: str) -> Flow:
    """The flow ``name`` (a deployment's entrypoint is ``flows/stage_flows.py:<name>_flow``)."""
    sd = STAGES[name]
    default_model = sd.inputs.get("model", "")  # a per-model stage's model when `model_stage` is not given

    def stage_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                   inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                   config: dict[str, Any] | None = None) -> dict[str, Any]:
        return run_one(name, preset=preset, overrides=overrides, inputs=inputs, force=force,
                       mlflow_run_id=mlflow_run_id, config=config)

    def per_model_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                       inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                       config: dict[str, Any] | None = None, model_stage: str = default_model) -> dict[str, Any]:
        return run_one(name, preset=preset, overrides=overrides, inputs=inputs, force=force,
                       mlflow_run_id=mlflow_run_id, config=config, model_stage=model_stage)

    fn = per_model_flow if sd.per_model else stage_flow
    fn.__name__ = fn.__qualname__ = f"{name}_flow"
    fn.__doc__ = f"Stage {name!r}: {sd.description}." + (
        " ``model_stage`` (a model stage) picks the checkpoint when ``inputs`` is not given." if sd.per_model else "")
    return flow(name=name, log_prints=True)(fn)


STAGE_FLOWS: dict[str, Flow] = {name: _stage_flow(name) for name in STAGES}
globals().update({f"{name}_flow": f for name, f in STAGE_FLOWS.items()})  # download_flow, ..., report_flow
