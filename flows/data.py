"""The data flow: the registry's data stages (download -> filter -> dedup -> tokenizer -> tokenize), as Prefect tasks.

A subset of ``full-pipeline`` for iterating on data: the same plan's first steps, the same cached
stage tasks and keys, so a later ``full-pipeline`` run finds these stages ``Cached``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.settings import flow_config
from llm.stages.pipeline import plan
from llm.stages.registry import STAGES
from tasks.stage_tasks import run_stage_task

DATA_STAGES = [name for name, sd in STAGES.items() if sd.data]


@flow(name="data", log_prints=True)
def data_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
              force: list[str] | None = None) -> dict[str, str]:
    cfg = flow_config(preset, overrides)
    force = set(force or []) | set(cfg.orchestration.force)
    uris: dict[str, str] = {}
    for step in [s for s in plan(cfg) if s.stage in DATA_STAGES]:
        inputs = {role: uris[label] for role, label in step.inputs.items()}
        summary, cached = run_stage_task(step.stage, cfg, inputs, force=step.stage in force or "all" in force)
        uris[step.label] = summary["uri"]
        print(f"[kiln] {step.label}: {'cached' if cached else 'computed'} -> {summary['uri']}")
    return uris


if __name__ == "__main__":
    print(data_flow())
