"""The data flow: download -> filter -> dedup -> tokenizer -> tokenize, as Prefect tasks."""

from __future__ import annotations

from typing import Any

from prefect import flow

from llm.config import load_config
from llm.stages import STAGES
from tasks.stage_tasks import run_stage_task

DATA_STAGES = ["download", "filter", "dedup", "tokenizer", "tokenize"]


@flow(name="data", log_prints=True)
def data_flow(preset: str = "tiny", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict[str, str]:
    cfg = load_config(preset, overrides or {})
    force = set(force or [])
    uris: dict[str, str] = {}
    for name in DATA_STAGES:
        inputs = {role: uris[up] for role, up in STAGES[name].inputs.items()}
        uris[name] = run_stage_task(name, cfg, inputs, force=name in force or "all" in force)["uri"]
    return uris


if __name__ == "__main__":
    print(data_flow())
