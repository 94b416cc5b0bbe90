"""The "eval" stage: CORE, bits-per-byte and sample completions for one checkpoint.

Inputs (roles): ``model`` a training stage output (or anything :func:`llm.checkpoint.load_model`
accepts), ``tokenizer`` the tokenizer stage output, ``tokens`` the tokenize stage output (its
``val`` split is used for bits-per-byte; without it bpb is reported as not run).

Outputs: ``core.json`` (``{"core", "label", "n_tasks", "tasks": {label: {accuracy, centered, n,
...}}, "missing": [...], "references": ...}``), ``core.csv``, ``bpb.json``, ``samples.json``.
Metrics go to MLflow (one per task plus CORE and bpb).

With ``eval.nproc`` > 1 (or "auto" on a multi-GPU box) the work runs under ``torchrun``
(:func:`llm.torchrun.launch`, the launcher training uses): ``python -m llm.eval.stage SPEC.json``
on every rank, examples strided across ranks, rank 0 writing the results. Otherwise it runs in
this process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llm.config import KilnConfig, config_from_json
from llm.stages.output import StageError, StageOutput
from llm.storage import write_atomic

RESULT_FILES = ("core.json", "core.csv", "bpb.json", "samples.json")




# --------------------------------------------------------------------------- the work (every rank)


def evaluate_checkpoint(spec: dict[str, Any], outdir: Path, *, progress: bool = False) -> dict[str, Any] | None:
    """Run CORE, bpb and samples; rank 0 writes RESULT_FILES into ``outdir`` and returns a summary."""
    import torch.distributed as dist

    from llm.eval.samples import complete

    cfg = config_from_json(spec["config"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = _rank_device(spec["device"])
    log = (lambda msg: print(f"[eval] {msg}", flush=True)) if rank == 0 and progress else None
    model, meta, tokenizer = _load_pair(spec, cfg, device)
    core, bundle, bundle_src = _core(cfg, model, tokenizer, device, progress, log)
    bpb = _bpb(spec, cfg, model, tokenizer, device, progress)
    if rank != 0:
        return None
    smp = complete(model, tokenizer, cfg.eval.sample_prompts, cfg.eval.sample_max_tokens)  # cheap, same everywhere
    result = core.to_json() | _core_context(core, bundle, bundle_src)
    result["checkpoint"] = {"uri": spec["model"], "step": meta.get("step"), "tokens": meta.get("tokens")}
    result["device"] = device
    _write_results(outdir, result, core, bpb, smp)
    return {"core": result, "bpb": bpb, "samples": smp}


def _rank_device(device: str) -> str:
    """This rank's device: its own GPU (LOCAL_RANK) under torchrun on CUDA."""
    if device != "cuda":
        return device
    import torch

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def _load_pair(spec: dict[str, Any], cfg: KilnConfig, device: str) -> tuple[Any, dict[str, Any], Any]:
    """The model and its tokenizer, refused together when the tokenizer has ids the model has no row for."""
    from llm.checkpoint import load_model
    from llm.tokenizer import load_tokenizer

    model, meta = load_model(spec["model"], device=device, endpoint_url=cfg.run.s3_endpoint)
    tokenizer = load_tokenizer(spec["tokenizer"], cfg.run.s3_endpoint)
    if getattr(tokenizer, "vocab_size", model.config.vocab_size) > model.config.vocab_size:
        raise StageError(f"tokenizer {spec['tokenizer']} has vocab {tokenizer.vocab_size}, larger than the "
                         f"model's {model.config.vocab_size}: they do not belong together")
    return model, meta, tokenizer


def _core(cfg: KilnConfig, model: Any, tokenizer: Any, device: str, progress: bool, log: Any) -> tuple[Any, Any, str]:
    """CORE over the bundle: (result, bundle, where the bundle came from)."""
    from llm.eval.bundle import load_bundle
    from llm.eval.core import evaluate_core, model_scorer
    from llm.sources import resolve_source

    # Like nanochat, score the full few-shot context; crop only beyond what the model can
    # position (its rotary table), or at eval.max_seq_len when set.
    rope = getattr(model, "rope_cos", None)
    max_seq_len = cfg.eval.max_seq_len or (int(rope.shape[0]) if rope is not None else model.config.seq_len)
    bundle_src = resolve_source(cfg.eval.bundle, "core_eval", cfg.run.data_mirror)
    bundle = load_bundle(bundle_src, sha256=cfg.eval.bundle_sha256, s3_endpoint=cfg.run.s3_endpoint)
    if log and bundle.missing:
        log(f"{bundle.label}: excluded " + "; ".join(f"{m.label} ({m.reason})" for m in bundle.missing))
    core = evaluate_core(model_scorer(model, device), tokenizer, bundle, max_per_task=cfg.eval.max_per_task,
                         batch_tokens=cfg.eval.batch_tokens, max_seq_len=max_seq_len, device=device,
                         tasks=cfg.eval.tasks, progress=progress, log=log)
    return core, bundle, bundle_src


def _core_context(core: Any, bundle: Any, bundle_src: str) -> dict[str, Any]:
    """What a CORE number needs beside it: which bundle, and the GPT-2 references over the same tasks."""
    from llm.eval.core import comparison_table

    return {"bundle": bundle_src, "bundle_fingerprint": bundle.fingerprint(),
            "references": {m: {"core_22": bundle.reference_core.get(m)} for m in bundle.references},
            "comparison": comparison_table(core, bundle)}


def _bpb(spec: dict[str, Any], cfg: KilnConfig, model: Any, tokenizer: Any, device: str,
         progress: bool) -> dict[str, Any]:
    """Bits per byte on the tokenize stage's held-out split, when that input was given."""
    if not spec.get("tokens"):
        return {"bpb": None, "skipped": "no tokens input (tokenize stage output) given"}
    from llm.data.shards import open_split
    from llm.eval.loss import evaluate_bpb, val_tokens

    toks = val_tokens(open_split(spec["tokens"], "val", cfg.run.s3_endpoint), cfg.eval.bpb_tokens + 1)
    seq_len = min(model.config.seq_len, max(1, len(toks) - 1))
    bpb = evaluate_bpb(model, toks, tokenizer.token_bytes, seq_len=seq_len,
                       batch_size=max(1, cfg.eval.batch_tokens // seq_len), device=device, progress=progress)
    bpb["split"] = "val"
    return bpb


def _write_results(outdir: Path, result: dict[str, Any], core: Any, bpb: dict[str, Any], smp: Any) -> None:
    from llm.eval.core import core_csv

    outdir.mkdir(parents=True, exist_ok=True)
    write_atomic(outdir / "core.json", json.dumps(result, indent=2))
    write_atomic(outdir / "core.csv", core_csv(core))
    write_atomic(outdir / "bpb.json", json.dumps(bpb, indent=2))
    write_atomic(outdir / "samples.json", json.dumps(smp, indent=2, ensure_ascii=False))


# --------------------------------------------------------------------------- the stage


def _log_mlflow(cfg: KilnConfig, model_stage: str, core: dict[str, Any], bpb: dict[str, Any], outdir: Path,
                inputs: dict[str, dict] | None = None) -> None:
    """Per-task centered/accuracy, CORE and bpb; never fails the stage (logging is best effort)."""
    from llm.tracking import config_tracker

    tracker = config_tracker(cfg, run_name=f"eval-{model_stage}",
                             tags={"kiln.stage": "eval", "kiln.model_stage": model_stage})
    try:
        metrics: dict[str, float | None] = {"core": core["core"]}
        for label, t in core["tasks"].items():
            metrics[f"core_centered/{label}"] = t["centered"]  # not "core/..": "core" itself is a metric
            metrics[f"core_acc/{label}"] = t["accuracy"]
        # MLflow 3: against the evaluated model's LoggedModel and the data each number was measured on,
        # so the Models tab shows CORE and bpb per model (and per evaluation dataset).
        from llm.tracking import logged_model_of_checkpoint

        client = getattr(tracker, "client", None)
        model_id = logged_model_of_checkpoint(client, inputs["model"]["uri"], cfg.run.s3_endpoint) \
            if client is not None and inputs and "model" in inputs else None
        bundle_digest = str(core.get("bundle_fingerprint") or "")[:20] or None
        tracker.log_metrics(metrics, model_id=model_id, dataset=("core_eval", bundle_digest) if bundle_digest else None)
        tokens = (inputs or {}).get("tokens") or {}
        tracker.log_metrics({"bpb": bpb.get("bpb")}, model_id=model_id,
                            dataset=(tokens.get("stage") or "tokenize", tokens["hash"]) if tokens.get("hash") else None)
        if inputs:  # what was scored, as MLflow dataset inputs (the pipeline's child run gets these too)
            scored = {role: {k: m.get(k) for k in ("uri", "hash", "stage", "counts")} for role, m in inputs.items()}
            if bundle_digest:
                scored["core_bundle"] = {"uri": str(core.get("bundle") or cfg.eval.bundle), "hash": bundle_digest,
                                         "stage": "core_eval", "counts": {"tasks": core.get("n_tasks")}}
            tracker.log_inputs("eval", scored)
        if model_id:
            tracker.set_tags({"kiln.model_id": model_id})
        tracker.set_tags({"core_label": core["label"], "core_missing": ",".join(core["missing"]) or "none"})
        for name in RESULT_FILES:
            if (outdir / name).exists():
                tracker.log_artifact(outdir / name, "eval")
        tracker.end()
    except Exception as e:  # noqa: BLE001
        print(f"[eval] MLflow logging failed, results are still on disk: {e}", file=sys.stderr)


def run(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    if "model" not in inputs:
        raise StageError("eval needs a 'model' input (a training stage output or checkpoint)")
    if "tokenizer" not in inputs:
        raise StageError("eval needs a 'tokenizer' input (the tokenizer stage output)")
    from llm.dist import resolve_devices

    device, nproc = resolve_devices(cfg.eval, "eval")
    spec = {
        "config": cfg.model_dump_json(),
        "model": inputs["model"]["uri"],
        "tokenizer": inputs["tokenizer"]["uri"],
        "tokens": inputs["tokens"]["uri"] if "tokens" in inputs else None,
        "device": device,
    }
    model_stage = inputs["model"].get("stage", "model")
    t0 = time.time()
    if nproc <= 1:
        evaluate_checkpoint(spec, out.workdir, progress=progress)
    else:
        _evaluate_under_torchrun(spec, out, nproc, progress)
    core = json.loads((out.workdir / "core.json").read_text())
    bpb = json.loads((out.workdir / "bpb.json").read_text())
    _log_mlflow(cfg, model_stage, core, bpb, out.workdir, inputs)
    return {
        "counts": {
            "core": core["core"],
            "n_tasks": core["n_tasks"],
            "examples": core["examples"],
            "examples_per_s": core["examples_per_s"],
            "bpb": bpb.get("bpb"),
            "ranks": nproc,
            "wall_s": round(time.time() - t0, 3),
        },
        "core_label": core["label"],
        "missing_tasks": core["missing"],
        "model_stage": model_stage,
    }


def _evaluate_under_torchrun(spec: dict[str, Any], out: StageOutput, nproc: int, progress: bool) -> None:
    """:func:`evaluate_checkpoint` on ``nproc`` ranks (:func:`_main` on each), through the one launcher."""
    from llm.torchrun import launch

    spec_path = out.path("_spec.json.tmp")  # .tmp: scratch, not published
    spec_path.write_text(json.dumps(spec))
    try:
        launch("llm.eval.stage", [str(spec_path), str(out.workdir), *(["--progress"] if progress else [])],
               label="eval", nproc=nproc, env={"OMP_NUM_THREADS": "1", **os.environ}, progress=progress)
    finally:
        spec_path.unlink(missing_ok=True)


def _main(argv: list[str]) -> int:
    """torchrun entry point: ``python -m llm.eval.stage SPEC.json OUTDIR [--progress]``."""
    import torch.distributed as dist

    from llm.dist import barrier, finish, init_distributed

    spec = json.loads(Path(argv[0]).read_text())
    d = init_distributed(spec["device"], {}, "eval.device")
    try:
        evaluate_checkpoint(spec, Path(argv[1]), progress="--progress" in argv)
        barrier(d)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    return finish(0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
