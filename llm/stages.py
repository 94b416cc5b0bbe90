"""The stage registry: what each stage reads, which config it is keyed on, and its code version.

A stage implementation is a plain function::

    def run(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict

``inputs`` maps role names (below) to upstream manifests (``manifest["uri"]`` is where the
files are). It writes files under ``out.workdir`` (``out.path(rel)``) and returns
``{"counts": {...}, ...}`` which lands in the manifest.

The code version is explicit and bumped by hand when a stage's output would change for the
same config and inputs; that is what keeps caching honest when a helper function changes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import KilnConfig
from .stage import StageOutput, StageResult, run_stage
from .storage import Store


# Fields that change how a stage runs, never what it produces: changing them must find the same
# output (and, for training, resume the same .partial run rather than start over). nproc stays in
# the key on purpose: a checkpoint's loader state is laid out per rank.
OPERATIONAL_FIELDS = frozenset({"workers", "nccl_env", "log_every", "ckpt_every", "keep_last", "compile"})


def without_operational(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in OPERATIONAL_FIELDS}


@dataclass(frozen=True)
class StageDef:
    name: str
    impl: str  # "module:function"
    sections: tuple[str, ...]
    # role name -> upstream stage name (documentation + the default chain in llm.pipeline)
    inputs: dict[str, str] = field(default_factory=dict)
    version: str = "1"
    # Stages that launch torchrun or other heavy work are "training" and go to the gpu pool.
    gpu: bool = False
    description: str = ""

    def function(self) -> Callable[..., dict[str, Any]]:
        mod, fn = self.impl.split(":")
        return getattr(importlib.import_module(mod), fn)

    def key_config(self, cfg: KilnConfig) -> dict[str, Any]:
        """The part of the config this stage's output depends on."""
        mod = importlib.import_module(self.impl.split(":")[0])
        custom = getattr(mod, "key_config", None)
        if custom is not None:
            return custom(cfg)
        return {s: without_operational(cfg.section(s)) for s in self.sections} | {"seed": cfg.run.seed}


STAGES: dict[str, StageDef] = {
    s.name: s
    for s in [
        StageDef("download", "llm.data.download:run", ("download",), description="fetch and verify parquet shards"),
        StageDef("filter", "llm.data.filter:run", ("filter",), {"docs": "download"}, description="FineWeb-recipe quality filters",
                 version="2"),  # 2: words split as spaCy's English tokenizer, datatrove's symbol list
        StageDef("dedup", "llm.data.dedup:run", ("dedup",), {"docs": "filter"}, description="exact + MinHash LSH dedup"),
        StageDef("tokenizer", "llm.tokenizer:run", ("tokenizer",), {"docs": "dedup"}, description="train a byte-level BPE"),
        StageDef("tokenize", "llm.data.tokenize:run", ("tokenize",), {"docs": "dedup", "tokenizer": "tokenizer"},
                 description="encode documents into token shards"),
        StageDef("pretrain", "llm.train_stage:run_pretrain", ("model", "pretrain"),
                 {"tokens": "tokenize", "tokenizer": "tokenizer"}, gpu=True, description="pretrain the GPT",
                 # 2: loader epochs read every document once; supervised_tokens; budgets round up
                 version="2"),
        StageDef("midtrain", "llm.chat_stages:run_midtrain", ("model", "midtrain", "chat_data"),
                 {"model": "pretrain", "tokens": "tokenize", "tokenizer": "tokenizer"}, gpu=True,
                 description="midtrain on a web/chat mixture", version="2"),  # 2: as pretrain; ratio from counts
        StageDef("sft", "llm.chat_stages:run_sft", ("model", "sft", "chat_data"),
                 {"model": "midtrain", "tokenizer": "tokenizer"}, gpu=True, description="supervised fine-tuning",
                 version="2"),  # 2: supervised_tokens in metrics and summary
        StageDef("eval", "llm.eval.stage:run", ("eval",), {"model": "sft", "tokenizer": "tokenizer", "tokens": "tokenize"},
                 gpu=True, description="CORE, bits-per-byte and samples for one checkpoint",
                 version="2"),  # 2: core.json carries the bundle fingerprint
        StageDef("report", "llm.report:run", ("report",), {}, description="the run's report card",
                 version="2"),  # 2: bundle fingerprint, supervised share, table layout
    ]
}


# The stages whose output can fill a role. A role names a kind of data, not one stage, so
# `kiln tokenize --input docs=<a filter output>` (skipping dedup) is fine; a tokenizer dir given as
# docs is not, and is caught here by the producing stage's name in its manifest, before any compute,
# instead of surfacing as "no parquet files" (or worse) inside the stage.
ROLE_PRODUCERS: dict[str, tuple[str, ...]] = {
    "docs": ("download", "filter", "dedup"),
    "tokenizer": ("tokenizer",),
    "tokens": ("tokenize",),
    "model": ("pretrain", "midtrain", "sft", "checkpoint"),  # "checkpoint": a bare checkpoint dir
}


def _external_input(cfg: KilnConfig, name: str) -> Callable[[str, str], dict[str, Any] | None] | None:
    if "model" not in STAGES[name].inputs:
        return None
    from .checkpoint import as_stage_input

    # A model input may also be a bare checkpoint dir (a step of a running or unpublished run).
    return lambda role, uri: as_stage_input(uri, endpoint_url=cfg.run.s3_endpoint) if role == "model" else None


def check_inputs(name: str, cfg: KilnConfig, inputs: dict[str, str], store: Store | None = None) -> None:
    """Raise :class:`~llm.stage.StageError` naming the role and URI of an input that is missing,
    unfinished, or another kind of stage's output. Cheap (manifests and file sizes only)."""
    from .stage import StageError, input_manifest

    store = store or Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    external = _external_input(cfg, name)
    for role, uri in inputs.items():
        m = input_manifest(store, name, role, uri, external)
        allowed = ROLE_PRODUCERS.get(role) if role in STAGES[name].inputs else None
        produced_by = m.get("stage")
        if allowed and produced_by not in allowed:
            names = [a for a in allowed if a != "checkpoint"]
            want = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" or {names[-1]}"
            raise StageError(f"{name} input {role!r}: {uri} is a {produced_by} output; {role} must come from "
                             f"a {want} output")


def execute(
    name: str,
    cfg: KilnConfig,
    inputs: dict[str, str],
    *,
    force: bool = False,
    progress: bool = True,
    store: Store | None = None,
) -> StageResult:
    """Run one stage (or reuse its verified output) and return its URI and manifest."""
    sd = STAGES[name]
    store = store or Store(cfg.run.artifact_root, cfg.run.s3_endpoint)
    fn = sd.function()

    def body(out: StageOutput, manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return fn(cfg, out, manifests, progress=progress)

    check_inputs(name, cfg, inputs, store)
    return run_stage(store, name, sd.key_config(cfg), inputs, sd.version, body, force=force,
                     external=_external_input(cfg, name))
