"""The data flow: download -> filter -> dedup -> tokenizer -> tokenize, as Prefect tasks.

A subset of ``full-pipeline`` for iterating on data: same cached stage tasks, same keys, so
a later ``full-pipeline`` run finds these stages ``Cached``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.settings import flow_config
from llm.stages.registry import STAGES
from tasks.stage_tasks import run_stage_task

DATA_STAGES = ["download", "filter", "dedup", "tokenizer", "tokenize"]


@flow(name="data", log_prints=True)
def data_flow(preset: str = "tiny", overrides: dict[str, Any] | list[str] | None = None,
              force: list[str] | None = None) -> dict[str, str]:
    cfg = flow_config(preset, overrides)
    force = set(force or []) | set(cfg.orchestration.force)
    uris: dict[str, str] = {}
    for name in DATA_STAGES:
        inputs = {role: uris[up] for role, up in STAGES[name].inputs.items()}
        summary, cached = run_stage_task(name, cfg, inputs, force=name in force or "all" in force)
        uris[name] = summary["uri"]
        print(f"[kiln] {name}: {'cached' if cached else 'computed'} -> {summary['uri']}")
    return uris


if __name__ == "__main__":
    print(data_flow())
