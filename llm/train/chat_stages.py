"""The two chat stages: midtraining on a web/chat mixture, then supervised fine-tuning.

Both reuse the trainer unchanged (``llm.train.stages.launch_training``): what they add is the
data. Before launching, conversations are read (``datasets``), validated and rendered ONCE in
this process into ``chat/{train,val}.{ids,mask,offsets}.npy`` inside the stage output, so

- every dropped row is counted by reason before any GPU time is spent, and lands in the manifest;
- the torchrun workers just memmap tokens (no tokenizer work per rank);
- the exact token stream the model saw is part of the content-addressed output.

Midtraining (``run_midtrain``): init from the pretrain checkpoint, loader kind "midtrain" (pretraining
shards + conversations packed by token ratio ``midtrain.chat_ratio``), LR decaying linearly to zero.
SFT (``run_sft``): init from the midtrain checkpoint, loader kind "sft" (best-fit packed rows, loss on
assistant tokens only), sized by ``sft.epochs`` unless ``sft.steps`` is set; the held-out chat loss is
measured before and after, and the final model answers ``sft.chat_prompts`` (``chat_samples.json``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from llm.chat.format import DropReport, render_many
from llm.chat.sources import iter_conversations
from llm.train.chat_loaders import SFTLoader, SFTStream
from llm.config import KilnConfig
from llm.eval.samples import chat_answers
from llm.sources import resolve_source
from llm.stages.output import StageError, StageOutput
from llm.storage import write_atomic

CHAT_DIR = "chat"


def prepare_chats(cfg: KilnConfig, tok: Any, chat_dir: Path, *, max_tokens: int | None,
                  progress: bool) -> dict[str, DropReport]:
    """Read, validate and render the train and val chat sets into ``chat_dir``; returns the drop reports."""
    reports: dict[str, DropReport] = {}
    cd = cfg.chat_data
    for split, kind, uri in (("train", "chat_train", cd.train), ("val", "chat_val", cd.val)):
        src = resolve_source(uri, kind, cfg.run.data_mirror)
        # Streamed: rows are read, validated and rendered batch by batch, never all held as text.
        convs, report, schema = iter_conversations(src, max_rows=cd.max_rows, max_chars=cd.max_chars_per_message,
                                                   name=f"chat {split}", s3_endpoint=cfg.run.s3_endpoint,
                                                   progress=progress)
        rendered = render_many(tok, convs, vocab_size=tok.vocab_size, max_tokens=max_tokens, report=report)
        if len(rendered) == 0:
            raise StageError(f"chat {split} source {src}: no usable conversations ({report.summary()})")
        rendered.save(chat_dir, split)
        report.schema = schema  # type: ignore[attr-defined]
        reports[split] = report
        if progress:
            print(f"{report.summary()}; schema {schema}; {int(rendered.offsets[-1]):,} tokens", flush=True)
        if report.rows_dropped:
            # Never silent: the reasons are printed even without progress output, and go to the manifest.
            print(f"[chat {split}] dropped rows by reason: {dict(report.dropped)}; examples: {report.examples}",
                  file=sys.stderr, flush=True)
    return reports


def _report_dicts(reports: dict[str, DropReport]) -> dict[str, Any]:
    return {k: {**r.as_dict(), "schema": getattr(r, "schema", None)} for k, r in reports.items()}


def _scaled(train_cfg: Any, **extra: Any) -> Any:
    """The stage's train config with ``init_lr_frac`` applied to the learning rates."""
    f = train_cfg.init_lr_frac
    upd: dict[str, Any] = {"lr": train_cfg.lr * f, **extra}
    if train_cfg.embedding_lr is not None:
        upd["embedding_lr"] = train_cfg.embedding_lr * f
    return train_cfg.model_copy(update=upd)


def _init_model_config(model_uri: str, cfg: KilnConfig) -> dict[str, Any]:
    """The upstream checkpoint's model config: downstream stages must build exactly that model."""
    from llm.checkpoint import read_meta, resolve_checkpoint_dir

    meta = read_meta(resolve_checkpoint_dir(model_uri, endpoint_url=cfg.run.s3_endpoint))
    mc = meta.get("model_config")
    if not mc:
        raise StageError(f"{model_uri}: checkpoint meta has no model_config")
    return dict(mc)


def _log_to_run(cfg: KilnConfig, run_id: str | None, stage: str, metrics: dict[str, float],
                dicts: dict[str, Any]) -> None:
    """Add the stage's own results to the MLflow run the trainer created (rank 0 is us, now).

    Only into an existing run: if the trainer was not tracking, no stray run is started for these.
    """
    from llm.tracking import config_tracker

    tr = config_tracker(cfg, run_name=f"{cfg.run.name}-{stage}", resume_run_id=run_id, existing_only=True)
    tr.log_metrics(metrics)
    for name, data in dicts.items():
        tr.log_dict(data, name)
    tr.end("FINISHED")


# --------------------------------------------------------------------------- midtraining


def run_midtrain(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    """Registry stage "midtrain": inputs "model" (pretrain output), "tokens" (tokenize), "tokenizer"."""
    from llm.tokenizer import load_tokenizer
    from llm.train.stages import launch_training, mlflow_settings, training_counts, upload_uri_for

    mt = cfg.midtrain
    tokens_uri, tok_uri, model_uri = inputs["tokens"]["uri"], inputs["tokenizer"]["uri"], inputs["model"]["uri"]
    tok = load_tokenizer(tok_uri, cfg.run.s3_endpoint)
    model_cfg = _init_model_config(model_uri, cfg)
    if model_cfg["vocab_size"] < tok.vocab_size:
        raise StageError(f"midtrain: tokenizer {tok_uri} has {tok.vocab_size} tokens, model only {model_cfg['vocab_size']}")
    chat_dir = out.workdir / CHAT_DIR
    reports = prepare_chats(cfg, tok, chat_dir, max_tokens=None, progress=progress)
    spec = {"tokens_uri": tokens_uri, "split": "train", "val_split": "val", "chat_dir": str(chat_dir),
            "chat_ratio": mt.chat_ratio, "crop": mt.crop_tokens}
    summary = launch_training(
        stage="midtrain", model_config=model_cfg, train_config=_scaled(mt), loader_kind="midtrain",
        loader_spec=spec, out_dir=out.workdir, tokenizer_uri=tok_uri, init_checkpoint=model_uri, seed=cfg.run.seed,
        upload_uri=upload_uri_for(cfg, out), s3_endpoint=cfg.run.s3_endpoint, mlflow=mlflow_settings(cfg, "midtrain"),
        progress=progress,
    )
    counts = training_counts(summary, with_sources=True)
    by_src = counts["tokens_by_source"]
    total = sum(by_src.values())
    counts["chat_ratio_target"] = mt.chat_ratio
    counts["chat_ratio_realised"] = by_src.get("chat", 0) / total if total else None
    counts["chat_rows_in"] = reports["train"].rows_in
    counts["chat_rows_kept"] = reports["train"].rows_kept
    counts["chat_rows_dropped"] = reports["train"].rows_dropped
    chat = _report_dicts(reports)
    _log_to_run(cfg, summary.get("mlflow_run_id"), "midtrain",
                {"chat_ratio_realised": counts["chat_ratio_realised"] or 0.0,
                 **{f"tokens_by_source/{k}": float(v) for k, v in by_src.items()},
                 "chat_rows_dropped": float(reports["train"].rows_dropped)},
                {"chat_data.json": chat})
    if progress:
        sources = ", ".join(f"{k} {v:,}" for k, v in by_src.items())
        print(f"[midtrain] tokens by source: {sources}; chat ratio realised {counts['chat_ratio_realised']:.4f} "
              f"(target {mt.chat_ratio})", flush=True)
    return {"counts": counts, "chat_data": chat, "model_config": model_cfg, "mlflow_run_id": summary.get("mlflow_run_id"),
            "best": summary.get("best"), "device": summary.get("device"), "world_size": summary.get("world_size"),
            "flops": summary.get("flops")}


# --------------------------------------------------------------------------- SFT


def heldout_loss(model: Any, spec: dict[str, Any], *, batch_size: int, seq_len: int, seed: int,
                 max_tokens: int) -> float:
    """Mean loss per supervised token on the held-out conversations (the trainer's val batches, one process)."""
    import torch

    from llm.eval.loss import evaluate_loss

    loader = SFTLoader(spec, batch_size=batch_size, seq_len=seq_len, rank=0, world_size=1, seed=seed)
    cuda = next(model.parameters()).device.type == "cuda"
    sums = evaluate_loss(model, loader.val_batches(max_tokens), amp_dtype=torch.bfloat16 if cuda else None)
    return sums.mean_loss


def sft_steps(rows_per_epoch: int, epochs: int, total_batch_tokens: int, seq_len: int) -> int:
    """Optimizer steps for ``epochs`` passes: each step consumes total_batch_tokens / seq_len rows."""
    rows_per_step = total_batch_tokens // seq_len
    return max(1, math.ceil(epochs * rows_per_epoch / rows_per_step))


def run_sft(cfg: KilnConfig, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    """Registry stage "sft": inputs "model" (midtrain output) and "tokenizer"."""
    from llm.checkpoint import load_model
    from llm.chat.format import RenderedChats
    from llm.dist import resolve_device
    from llm.tokenizer import load_tokenizer
    from llm.train.stages import launch_training, mlflow_settings, training_counts, upload_uri_for

    sft = cfg.sft
    tok_uri, model_uri = inputs["tokenizer"]["uri"], inputs["model"]["uri"]
    tok = load_tokenizer(tok_uri, cfg.run.s3_endpoint)
    model_cfg = _init_model_config(model_uri, cfg)
    T = int(model_cfg["seq_len"])
    chat_dir = out.workdir / CHAT_DIR
    reports = prepare_chats(cfg, tok, chat_dir, max_tokens=min(sft.max_conversation_tokens, T + 1), progress=progress)
    spec = {"chat_dir": str(chat_dir), "chat_train": "train", "chat_val": "val", "pad_id": tok.bos_id}
    rows_per_epoch = SFTStream(RenderedChats.load(chat_dir, "train"), seq_len=T, seed=cfg.run.seed,
                               pad_id=tok.bos_id).rows_per_epoch()
    steps = sft.steps if sft.steps is not None else sft_steps(rows_per_epoch, sft.epochs, sft.total_batch_tokens, T)
    device = resolve_device(sft.device, "sft.device")
    init_model, _ = load_model(model_uri, device=device, endpoint_url=cfg.run.s3_endpoint)
    eval_kw = dict(batch_size=sft.device_batch_size, seq_len=T, seed=cfg.run.seed, max_tokens=sft.eval_tokens)
    val_before = heldout_loss(init_model, spec, **eval_kw)
    del init_model
    summary = launch_training(
        stage="sft", model_config=model_cfg, train_config=_scaled(sft, steps=steps), loader_kind="sft",
        loader_spec=spec, out_dir=out.workdir, tokenizer_uri=tok_uri, init_checkpoint=model_uri, seed=cfg.run.seed,
        upload_uri=upload_uri_for(cfg, out), s3_endpoint=cfg.run.s3_endpoint, mlflow=mlflow_settings(cfg, "sft"),
        progress=progress,
    )
    final, _ = load_model(str(out.workdir / "final"), device=device)
    val_after = heldout_loss(final, spec, **eval_kw)
    samples = chat_answers(final, tok, sft.chat_prompts, sft.chat_sample_tokens)
    write_atomic(out.path("chat_samples.json"), json.dumps(samples, indent=2, ensure_ascii=False))
    counts = training_counts(summary, with_sources=True)
    counts.update({
        "heldout_loss_before": val_before, "heldout_loss_after": val_after, "epochs_planned": sft.epochs,
        "rows_per_epoch": rows_per_epoch, "epochs_done": round(steps * (sft.total_batch_tokens // T) / rows_per_epoch, 3),
        "conversations": reports["train"].rows_kept, "chat_rows_dropped": reports["train"].rows_dropped,
    })
    chat = _report_dicts(reports)
    _log_to_run(cfg, summary.get("mlflow_run_id"), "sft",
                {"heldout_loss_before": val_before, "heldout_loss_after": val_after,
                 **{f"tokens_by_source/{k}": float(v) for k, v in counts["tokens_by_source"].items()}},
                {"chat_samples.json": samples, "chat_data.json": chat})
    if progress:
        print(f"[sft] held-out chat loss {val_before:.4f} -> {val_after:.4f} over {steps} steps "
              f"({counts['epochs_done']} epochs)", flush=True)
        for s in samples:
            print(f"[sft] sample | {s['prompt']!r} -> {s['answer']!r}", flush=True)
    return {"counts": counts, "chat_data": chat, "chat_samples": samples, "model_config": model_cfg,
            "mlflow_run_id": summary.get("mlflow_run_id"), "best": summary.get("best"),
            "device": summary.get("device"), "world_size": summary.get("world_size"), "flops": summary.get("flops")}
