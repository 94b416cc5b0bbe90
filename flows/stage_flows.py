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

from prefect import flow

from flows.settings import flow_config
from llm.config import KilnConfig
from llm.stages.pipeline import eval_inputs, export_inputs, report_inputs, run_pipeline
from llm.stages.registry import STAGES
from tasks.stage_tasks import run_stage_task


def _upstream_inputs(stage: str, cfg: KilnConfig, model_stage: str) -> dict[str, str]:
    """Inputs of ``stage`` found (or computed) by content key, in this process."""
    if stage == "report":
        return report_inputs(run_pipeline(cfg, until="export", progress=False))
    if stage == "export":
        return export_inputs({label: r.uri for label, r in run_pipeline(cfg, until="eval", progress=False).items()})
    if stage == "eval":
        return eval_inputs(run_pipeline(cfg, until=model_stage, progress=False), model_stage)
    ups = STAGES[stage].inputs
    if not ups:
        return {}
    from llm.stages.pipeline import CHAIN

    results = run_pipeline(cfg, until=max(ups.values(), key=CHAIN.index), progress=False)
    return {role: results[up].uri for role, up in ups.items()}


def run_one(stage: str, *, preset: str, overrides: dict[str, Any] | list[str] | None, inputs: dict[str, str] | None,
            force: bool, mlflow_run_id: str | None, config: dict[str, Any] | None,
            model_stage: str = "sft") -> dict[str, Any]:
    cfg = KilnConfig.model_validate(config) if config else flow_config(preset, overrides)
    inputs = dict(inputs or {})
    if not inputs and (STAGES[stage].inputs or stage == "report"):
        inputs = _upstream_inputs(stage, cfg, model_stage)
    label = f"eval_{model_stage}" if stage == "eval" else stage
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


# One function per stage (deployment entrypoints must be module-level functions).
# Parameters: preset/overrides (or a full `config` dict, which wins), explicit `inputs`
# {role: URI} (default: found by content key), `force`, and `mlflow_run_id` (the run to log into).


@flow(name="download", log_prints=True)
def download_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                  inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("download", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="filter", log_prints=True)
def filter_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("filter", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="dedup", log_prints=True)
def dedup_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
               inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
               config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("dedup", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                   inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                   config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("tokenizer", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="tokenize", log_prints=True)
def tokenize_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                  inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("tokenize", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                  inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("pretrain", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="midtrain", log_prints=True)
def midtrain_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                  inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("midtrain", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="sft", log_prints=True)
def sft_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
             inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
             config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("sft", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="eval", log_prints=True)
def eval_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
              inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
              config: dict[str, Any] | None = None, model_stage: str = "sft") -> dict[str, Any]:
    """``model_stage`` (pretrain/midtrain/sft) picks the checkpoint when ``inputs`` is not given."""
    return run_one("eval", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config, model_stage=model_stage)


@flow(name="export", log_prints=True)
def export_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("export", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


@flow(name="report", log_prints=True)
def report_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
                inputs: dict[str, str] | None = None, force: bool = False, mlflow_run_id: str | None = None,
                config: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_one("report", preset=preset, overrides=overrides, inputs=inputs, force=force,
                   mlflow_run_id=mlflow_run_id, config=config)


STAGE_FLOWS = {
    "download": download_flow, "filter": filter_flow, "dedup": dedup_flow, "tokenizer": tokenizer_flow,
    "tokenize": tokenize_flow, "pretrain": pretrain_flow, "midtrain": midtrain_flow, "sft": sft_flow,
    "eval": eval_flow, "export": export_flow, "report": report_flow,
}
assert set(STAGE_FLOWS) == set(STAGES), "every registered stage needs a flow here"
