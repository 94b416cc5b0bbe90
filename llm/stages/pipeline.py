"""The pipeline plan, and the whole pipeline as plain Python without a Prefect server.

:func:`plan` is the one description of the pipeline: the ordered steps (label, stage, which earlier
step fills each input role), built from the registry's order and wiring. ``kiln run``
(:func:`run_pipeline`), the Prefect ``full-pipeline`` and ``data`` flows, and the lookup of a single
stage's inputs (``kiln <stage>``, a stage flow run alone: :func:`upstream_inputs`) all walk it.
Upstream stages are looked up by content key and reused when their output verifies, so asking for
``pretrain`` after a finished data run computes only ``pretrain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from llm.config import ConfigError, KilnConfig
from llm.stages.output import StageResult
from llm.stages.registry import STAGES, execute


@dataclass(frozen=True)
class Step:
    """One stage run of the pipeline: ``label`` names its output (``pretrain``, ``eval_sft``) and
    ``inputs`` maps each input role to the label of the earlier step whose output fills it."""

    label: str
    stage: str
    inputs: dict[str, str]


def step(stage: str, model_stage: str | None = None) -> Step:
    """The step of a stage wired as the registry says; for a per-model stage (eval) given
    ``model_stage``, the step ``<stage>_<model_stage>`` that reads that model.

    An input from a per-model stage is that stage's step for this step's model: export reads the SFT
    model, so its "eval" input is ``eval_sft``.
    """
    sd = STAGES[stage]
    inputs = dict(sd.inputs) if model_stage is None else {**sd.inputs, "model": model_stage}
    inputs = {role: f"{up}_{inputs['model']}" if STAGES[up].per_model and "model" in inputs else up
              for role, up in inputs.items()}
    return Step(stage if model_stage is None else f"{stage}_{model_stage}", stage, inputs)


def plan(cfg: KilnConfig, until: str | None = None) -> list[Step]:
    """Every step of the pipeline for ``cfg``, in order, up to the steps of stage ``until`` (inclusive).

    Registry order: one step per stage, one per evaluated model for a per-model stage (eval; the
    models its section's ``stages`` names), and a reads-all stage (the report) reads every step before it.
    """
    steps: list[Step] = []
    for name, sd in STAGES.items():
        if sd.per_model:
            steps += [step(name, m) for m in getattr(cfg, name).stages]
        elif sd.reads_all:
            steps.append(Step(name, name, {s.label: s.label for s in steps}))
        else:
            steps.append(_without_missing_optional(step(name), sd.optional, steps))
        if name == until:
            break
    return steps


def _without_missing_optional(s: Step, optional: tuple[str, ...], before: list[Step]) -> Step:
    """``s`` without the optional roles whose step is not in the plan (an eval that was not configured)."""
    labels = {b.label for b in before}
    return Step(s.label, s.stage, {r: l for r, l in s.inputs.items() if r not in optional or l in labels})


def needed(steps: list[Step], labels: Iterable[str]) -> list[Step]:
    """The steps of ``steps`` (in order) that producing ``labels`` takes: those and their upstream."""
    by_label = {s.label: s for s in steps}
    want, todo = set(), list(labels)
    while todo:
        label = todo.pop()
        if label not in by_label:
            raise ConfigError(f"{label!r} is no step of this pipeline (steps: {', '.join(by_label)})")
        if label not in want:
            want.add(label)
            todo += by_label[label].inputs.values()
    return [s for s in steps if s.label in want]


def run_steps(
    cfg: KilnConfig,
    steps: list[Step],
    *,
    force: Iterable[str] = (),
    progress: bool = True,
    on_stage: Callable[[str, StageResult], None] | None = None,
) -> dict[str, StageResult]:
    """Run ``steps`` in order in this process; {label: result}. ``force`` names stages (or ``all``)."""
    force = set(force) | set(cfg.orchestration.force)
    results: dict[str, StageResult] = {}
    for s in steps:
        inputs = {role: results[label].uri for role, label in s.inputs.items()}
        r = execute(s.stage, cfg, inputs, force="all" in force or s.stage in force, progress=progress)
        results[s.label] = r
        if on_stage:
            on_stage(s.label, r)
        if r.follower:  # a multi-node follower publishes nothing: what comes next needs the leader's output
            break
    return results


def run_pipeline(
    cfg: KilnConfig,
    *,
    until: str | None = None,
    force: Iterable[str] = (),
    progress: bool = True,
    on_stage: Callable[[str, StageResult], None] | None = None,
) -> dict[str, StageResult]:
    """Run the plan up to stage ``until`` (inclusive; default: everything including eval and report)."""
    return run_steps(cfg, plan(cfg, until), force=force, progress=progress, on_stage=on_stage)


def upstream_inputs(cfg: KilnConfig, target: Step, roles: Iterable[str] | None = None, *,
                    progress: bool = True) -> dict[str, str]:
    """URIs for ``target``'s input roles (only ``roles``, default all), found by content key: the plan
    steps they need run first, each reused when its output is already there."""
    roles = list(target.inputs if roles is None else roles)
    results = run_steps(cfg, upstream_steps(cfg, target, roles), progress=progress)
    return {r: results[target.inputs[r]].uri for r in roles}


def upstream_steps(cfg: KilnConfig, target: Step, roles: Iterable[str]) -> list[Step]:
    """The plan steps that filling ``roles`` of ``target`` takes, in order."""
    return needed(plan(cfg), [target.inputs[r] for r in roles])


def target_step(cfg: KilnConfig, stage: str, model_stage: str | None = None) -> Step:
    """The plan's step for ``stage`` run alone: a reads-all stage reads the whole plan before it."""
    if STAGES[stage].reads_all:
        return next(s for s in plan(cfg, stage) if s.stage == stage)
    return step(stage, model_stage)
