"""The stage registry: every stage, what it reads, its cache key rule and its code version.

This is the one list of stages. Its order is the pipeline's order (llm/stages/pipeline.py builds the
plan from it), and every other list of stage names (the CLI's commands, the Prefect stage flows and
deployments, the data flow, config validation) is derived from it. Adding a stage is one
:class:`StageDef` here, its config section in llm/config.py, and its implementation.

A stage implementation is a plain function::

    def run(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict

``inputs`` maps role names (below) to upstream manifests (``manifest["uri"]`` is where the
files are). It writes files under ``out.workdir`` (``out.path(rel)``) and returns
``{"counts": {...}, ...}`` which lands in the manifest.

The key rule is the same for every stage (:meth:`StageDef.key_config`): each config section the stage
names, minus the fields llm/config.py marks ``Operational``, plus the run seed where the stage
uses it, plus the few true extras a stage's ``key_extras`` hook adds (a file's hash, a resolved
source). The code version is explicit and bumped by hand when a stage's output would change for
the same config and inputs; that is what keeps caching honest when a helper function changes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from llm.config import KilnConfig, operational_exclude
from llm.dist import check_devices
from llm.stages.output import ExternalInput, StageOutput, StageResult, input_manifest, output_address, run_stage
from llm.storage import Store


def _load(path: str) -> Callable[..., Any]:
    mod, fn = path.split(":")
    return getattr(importlib.import_module(mod), fn)


@dataclass(frozen=True)
class StageDef:
    name: str
    impl: str  # "module:function"
    sections: tuple[str, ...]
    # role name -> upstream stage name (the pipeline plan's default wiring)
    inputs: dict[str, str] = field(default_factory=dict)
    version: str = "1"
    # The role this stage's output can fill downstream ("docs", "tokenizer", "tokens", "model").
    produces: str = ""
    # Part of the data flow (flows/data.py): the stages before training, on the cpu pool.
    data: bool = False
    # Stages that launch torchrun or other heavy work are "training" and go to the gpu pool.
    gpu: bool = False
    # Stages whose torchrun job may span nodes (KILN_NNODES): on a node other than node 0 they run as a
    # follower that publishes nothing (llm/torchrun.py).
    multinode: bool = False
    # The run seed enters the output (weights, sampled text), so it enters the key.
    seeded: bool = False
    # "module:function" (cfg -> dict) adding what the output depends on beyond its sections' fields.
    key_extras: str = ""
    # One plan step per model stage named in the stage's section's `stages` list, labelled
    # <name>_<model stage>, its "model" role filled by that stage (eval_pretrain, ...).
    per_model: bool = False
    # Its inputs are every earlier plan step's output, each under the step's label (the report).
    reads_all: bool = False
    # Input roles the stage runs without: the plan fills them only when their step is in the plan
    # (export's "eval", when the model it exports was evaluated).
    optional: tuple[str, ...] = ()
    # The counts worth a column (`kiln ls`, the `kiln` summary): a glance tells which output is which.
    headline: tuple[str, ...] = ()
    description: str = ""
    # What `kiln <stage> --help` says it reads, where its input roles do not say it (none, or any).
    reads: str = ""
    # The columns a raw parquet docs input (llm/data/raw.py) must have, checked before any work.
    raw_columns: tuple[str, ...] = ("text",)

    def function(self) -> Callable[..., dict[str, Any]]:
        return _load(self.impl)

    def key_config(self, cfg: KilnConfig) -> dict[str, Any]:
        """The part of the config this stage's output depends on (see the module docstring)."""
        key = {s: keyed_section(cfg, s) for s in self.sections}
        if self.seeded:
            key["seed"] = cfg.run.seed
        if self.key_extras:
            key |= _load(self.key_extras)(cfg)
        return key


def keyed_section(cfg: KilnConfig, name: str) -> dict[str, Any]:
    """Section ``name`` as a cache key sees it: every field but the operational ones."""
    section = getattr(cfg, name)
    return section.model_dump(mode="json", exclude=operational_exclude(type(section)))


_TRAIN_COUNTS = ("steps", "tokens", "final_val_loss")

STAGES: dict[str, StageDef] = {
    s.name: s
    for s in [
        StageDef("download", "llm.data.download:run", ("download",), produces="docs", data=True,
                 key_extras="llm.data.download:key_extras", headline=("files", "rows"),
                 description="fetch and verify parquet shards",
                 reads="Reads download.source (hf://datasets/<repo>@<rev>/<glob>, s3://... or a local glob); "
                       "with KILN_DATA_MIRROR set, hub sources come from that offline mirror."),
        # filter, dedup 2: file names kept whatever the root's spelling (under ./artifacts, version 1 shortened
        # them and could drop shards behind an ok), so a version-1 output is not reused
        # 2: names kept under ./artifacts (a v1 output may have lost shards); 3: words split as spaCy's English
        # tokenizer, Gopher symbol words by datatrove's list
        StageDef("filter", "llm.data.filter:run", ("filter",), {"docs": "download"}, version="3", produces="docs",
                 data=True, key_extras="llm.data.filter:key_extras", headline=("docs_in", "docs_out"),
                 description="FineWeb-recipe quality filters"),
        StageDef("dedup", "llm.data.dedup:run", ("dedup",), {"docs": "filter"}, version="2", produces="docs", data=True,
                 headline=("docs_in", "docs_out"), description="exact + MinHash LSH dedup"),
        # BPE training is deterministic: the run seed does not enter it.
        StageDef("tokenizer", "llm.data.tokenizer:run", ("tokenizer",), {"docs": "dedup"}, produces="tokenizer", data=True,
                 key_extras="llm.data.tokenizer:key_extras", headline=("vocab_size", "chars_per_token"),
                 raw_columns=("text", "id"),  # the held-out sample is chosen by id hash
                 description="train a byte-level BPE"),
        StageDef("tokenize", "llm.data.tokenize:run", ("tokenize",), {"docs": "dedup", "tokenizer": "tokenizer"},
                 produces="tokens", data=True, headline=("tokens", "docs"),
                 raw_columns=("text", "id"),  # the train/val split is by id hash
                 description="encode documents into token shards"),
        # 2: loader epochs read every document once; supervised_tokens; budgets round up
        StageDef("pretrain", "llm.train.stages:run_pretrain", ("model", "pretrain"),
                 {"tokens": "tokenize", "tokenizer": "tokenizer"}, version="2", produces="model", gpu=True,
                 multinode=True, seeded=True, headline=_TRAIN_COUNTS, description="pretrain the GPT"),
        # 2: as pretrain; ratio from counts
        StageDef("midtrain", "llm.train.chat_stages:run_midtrain", ("model", "midtrain", "chat_data"),
                 {"model": "pretrain", "tokens": "tokenize", "tokenizer": "tokenizer"}, version="2", produces="model",
                 gpu=True, multinode=True, seeded=True, headline=_TRAIN_COUNTS,
                 description="midtrain on a web/chat mixture"),
        # 2: supervised_tokens in metrics and summary
        StageDef("sft", "llm.train.chat_stages:run_sft", ("model", "sft", "chat_data"),
                 {"model": "midtrain", "tokenizer": "tokenizer"}, version="2", produces="model", gpu=True,
                 multinode=True, seeded=True, headline=_TRAIN_COUNTS, description="supervised fine-tuning"),
        # 2: core.json carries the bundle fingerprint
        StageDef("eval", "llm.eval.stage:run", ("eval",), {"model": "sft", "tokenizer": "tokenizer", "tokens": "tokenize"},
                 version="2", gpu=True, seeded=True, per_model=True, produces="eval", headline=("core",),
                 description="CORE, bits-per-byte and samples for one checkpoint"),
        # "eval" (this model's eval, eval_sft) is optional: it puts CORE and bpb in the model card.
        StageDef("export", "llm.export:run", ("export",), {"model": "sft", "tokenizer": "tokenizer", "eval": "eval"},
                 optional=("eval",), key_extras="llm.export:key_extras",
                 description="the SFT model as a Hugging Face transformers directory"),
        # 2: bundle fingerprint, supervised share, table layout
        StageDef("report", "llm.report:run", ("report",), {}, version="2", seeded=True, reads_all=True,
                 description="the run's report card",
                 reads="Inputs: any finished outputs as --input ROLE=URI; without any, the whole chain for this "
                       "config (run first if needed)."),
    ]
}


# The stages whose output can fill a role. A role names a kind of data, not one stage, so
# `kiln tokenize --input docs=<a filter output>` (skipping dedup) is fine; a tokenizer dir given as
# docs is not, and is caught here by the producing stage's name in its manifest, before any compute,
# instead of surfacing as "no parquet files" (or worse) inside the stage. A model may also be a bare
# checkpoint directory, whose stand-in manifest names the stage "checkpoint"; docs may be a raw parquet
# folder or glob (llm/data/raw.py), whose stand-in manifest names the stage "raw".
_STAND_INS = {"model": ("checkpoint",), "docs": ("raw",)}
ROLE_PRODUCERS: dict[str, tuple[str, ...]] = {
    role: tuple(n for n, sd in STAGES.items() if sd.produces == role) + _STAND_INS.get(role, ())
    for role in dict.fromkeys(sd.produces for sd in STAGES.values() if sd.produces)
}


def _external_input(cfg: KilnConfig, name: str) -> ExternalInput | None:
    """How this stage reads inputs that are not stage outputs: a model may be a bare checkpoint dir (a
    step of a running or unpublished run), docs may be raw parquet (a folder or glob, local, s3, hf)."""
    roles = STAGES[name].inputs
    readers: dict[str, Callable[[str], dict[str, Any] | None]] = {}
    if "model" in roles:
        from llm.checkpoint import as_stage_input

        readers["model"] = lambda uri: as_stage_input(uri, endpoint_url=cfg.run.s3_endpoint)
    if "docs" in roles:
        from llm.data.raw import raw_docs_input

        columns = STAGES[name].raw_columns
        readers["docs"] = lambda uri: raw_docs_input(uri, s3_endpoint=cfg.run.s3_endpoint, columns=columns)
    if not readers:
        return None
    return lambda role, uri: readers[role](uri) if role in readers else None


def _store(cfg: KilnConfig, store: Store | None) -> Store:
    return store or Store(cfg.run.artifact_root, cfg.run.s3_endpoint)


def _keyed(name: str, cfg: KilnConfig) -> tuple[dict[str, Any], str, ExternalInput | None]:
    """What stage ``name``'s key is made of besides its inputs' hashes, and how its inputs are read:
    (key config, code version, reader of inputs that are not stage outputs)."""
    sd = STAGES[name]
    return sd.key_config(cfg), sd.version, _external_input(cfg, name)


def stage_key(name: str, cfg: KilnConfig, inputs: dict[str, str], store: Store | None = None) -> tuple[str, str]:
    """(content key, output URI) of stage ``name`` for this config and these inputs, without running it.

    The same derivation :func:`execute` runs the stage under (the same key rule, code version and
    reading of inputs, bare checkpoint directories included), so an orchestrator's cache record and
    the stage's output always agree.
    """
    config, version, external = _keyed(name, cfg)
    key, uri, _ = output_address(_store(cfg, store), name, config, inputs, version, external)
    return key, uri


def check_inputs(name: str, cfg: KilnConfig, inputs: dict[str, str], store: Store | None = None) -> None:
    """Raise :class:`~llm.stages.output.StageError` naming the role and URI of an input that is missing,
    unfinished, or another kind of stage's output. Cheap (manifests and file sizes only)."""
    from llm.stages.output import StageError

    store = _store(cfg, store)
    external = _external_input(cfg, name)
    for role, uri in inputs.items():
        m = input_manifest(store, name, role, uri, external)
        allowed = ROLE_PRODUCERS.get(role) if role in STAGES[name].inputs else None
        produced_by = m.get("stage")
        if allowed and produced_by not in allowed:
            names = [a for a in allowed if a not in ("checkpoint", "raw")]
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
    """Run one stage (or reuse its verified output) and return its URI and manifest.

    Its output is where :func:`stage_key` says: the same key rule, version and input reading.
    """
    sd = STAGES[name]
    store = _store(cfg, store)
    fn = sd.function()
    config, version, external = _keyed(name, cfg)

    def body(out: StageOutput, manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
        # Only when computing: a reused output needs no devices (the stage may have run elsewhere).
        check_devices(cfg, name)
        return fn(cfg, out, manifests, progress=progress)

    check_inputs(name, cfg, inputs, store)
    from llm.torchrun import is_follower

    return run_stage(store, name, config, inputs, version, body, force=force, external=external,
                     follower=sd.multinode and is_follower())
