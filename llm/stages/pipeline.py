"""The whole pipeline as plain Python, without a Prefect server.

This is what ``kiln run`` calls and what a single-stage ``kiln <stage>`` uses to find its
inputs: upstream stages are looked up by content key and reused when their output
verifies, so asking for ``pretrain`` after a finished data run computes only ``pretrain``.
The Prefect flow in ``flows/full_pipeline.py`` has the same shape, one task per stage.
"""

from __future__ import annotations

from typing import Callable, Iterable

from llm.config import KilnConfig
from llm.stages.output import StageResult
from llm.stages.registry import STAGES, execute

CHAIN = ["download", "filter", "dedup", "tokenizer", "tokenize", "pretrain", "midtrain", "sft"]


def eval_inputs(results: dict[str, StageResult], model_stage: str) -> dict[str, str]:
    return {"model": results[model_stage].uri, "tokenizer": results["tokenizer"].uri, "tokens": results["tokenize"].uri}


def export_inputs(uris: dict[str, str]) -> dict[str, str]:
    """The export stage's inputs from {label: URI}: the SFT model, its tokenizer and, when the SFT model
    was evaluated, that eval (its CORE and bpb go into the model card)."""
    out = {"model": uris["sft"], "tokenizer": uris["tokenizer"]}
    if "eval_sft" in uris:
        out["eval"] = uris["eval_sft"]
    return out


def report_inputs(results: dict[str, StageResult]) -> dict[str, str]:
    return {name: r.uri for name, r in results.items() if name != "report"}


def run_pipeline(
    cfg: KilnConfig,
    *,
    until: str | None = None,
    force: Iterable[str] = (),
    progress: bool = True,
    on_stage: Callable[[str, StageResult], None] | None = None,
) -> dict[str, StageResult]:
    """Run the chain up to ``until`` (inclusive; default: everything including eval, export and report)."""
    force = set(force) | set(cfg.orchestration.force)
    forced = lambda n: "all" in force or n in force  # noqa: E731
    results: dict[str, StageResult] = {}

    def step(name: str, label: str, inputs: dict[str, str]) -> StageResult:
        r = execute(name, cfg, inputs, force=forced(name), progress=progress)
        results[label] = r
        if on_stage:
            on_stage(label, r)
        return r

    for name in CHAIN:
        inputs = {role: results[up].uri for role, up in STAGES[name].inputs.items()}
        # A multi-node follower publishes nothing: what comes next needs the leader's output.
        if step(name, name, inputs).follower or name == until:
            return results
    if until in (None, "eval", "export", "report"):
        for model_stage in cfg.eval.stages:
            step("eval", f"eval_{model_stage}", eval_inputs(results, model_stage))
    if until in (None, "export", "report"):
        step("export", "export", export_inputs({label: r.uri for label, r in results.items()}))
    if until in (None, "report"):
        step("report", "report", report_inputs(results))
    return results
