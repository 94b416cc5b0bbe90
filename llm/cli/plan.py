"""`kiln plan`: the token plan of a preset's training stages, before anything is downloaded or run.

The trainer prints this plan at step 0; by then data has been fetched and a GPU booked. Here the
same functions (``llm.train.plan``: ``plan_tokens``, ``plan_batch``, the peak FLOPs table used for
MFU; the model's exact parameter and FLOP counts) answer the questions people ask first: how big is
the model, how many tokens and steps, does the batch divide on N GPUs, and roughly how long at an
assumed MFU.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llm.config import ConfigError, KilnConfig, load_config
from llm.train.plan import BatchPlanError, fmt_count, fmt_duration, peak_flops, plan_batch, plan_tokens

STAGES = ("pretrain", "midtrain", "sft")


def plan_stage(cfg: KilnConfig, stage: str, *, nproc: int, gpu: str | None, mfu: float) -> dict[str, Any]:
    """The plan of one training stage, as the trainer would compute it with ``nproc`` processes."""
    from llm.model import GPT, GPTConfig

    import torch

    from llm.train.optim import scaled_for_depth

    # The vocabulary the tokenizer stage is asked for: the trained model's embedding size.
    mcfg = GPTConfig.from_model_config(cfg.model, cfg.tokenizer.vocab_size)
    tr = scaled_for_depth(getattr(cfg, stage), mcfg)  # what the trainer will use
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(mcfg)
    params, fpt = model.num_params(), model.flops_per_token()
    out: dict[str, Any] = {"stage": stage, "params": params, "flops_per_token": fpt, "nproc": nproc,
                           "seq_len": mcfg.seq_len, "device_batch_size": tr.device_batch_size,
                           "total_batch_tokens": tr.total_batch_tokens}
    try:
        out["grad_accum"] = plan_batch(tr.total_batch_tokens, tr.device_batch_size, mcfg.seq_len, nproc)
    except BatchPlanError as e:
        out["batch_error"] = str(e)
    if stage == "sft" and tr.steps is None:
        # SFT without explicit steps is sized by epochs over the rendered chat set, known only after it is built.
        out["budget"] = f"sft.epochs={tr.epochs} over the chat data (steps known once it is rendered)"
        return out
    out.update(plan_tokens(tr, params, fpt, model.num_scaling_params()))
    peak = peak_flops(gpu) if gpu else None
    if peak:
        seconds = out["flops"] / (peak * mfu * nproc)
        out["estimate"] = {"gpu": gpu, "mfu": mfu, "seconds": seconds}
    return out


def _text(p: dict[str, Any]) -> str:
    lines = [f"{p['stage']}"]
    lines.append(f"  params     {p['params']:,} ({fmt_count(p['params'])}); {p['flops_per_token']:,} FLOPs/token")
    lines.append(f"  budget     {p['budget']}")
    if "steps" in p:
        lines.append(f"  steps      {p['steps']:,} × {p['tokens_per_step']:,} tokens = {p['tokens']:,} "
                     f"({fmt_count(p['tokens'])}; {p['tokens_per_param']:.1f} per param, "
                     f"{p['tokens_per_scaling_param']:.1f} per scaling param)")
        lines.append(f"  FLOPs      {p['flops']:.3e}")
    if "batch_error" in p:
        lines.append(f"  batch      ERROR on {p['nproc']} process(es): {p['batch_error']}")
    else:
        lines.append(f"  batch      {p['device_batch_size']} × {p['seq_len']} × {p['nproc']} proc × "
                     f"{p['grad_accum']} accum = {p['total_batch_tokens']:,} tokens per step")
    if "estimate" in p:
        e = p["estimate"]
        lines.append(f"  time       ~{fmt_duration(e['seconds'])} on {p['nproc']} × {e['gpu']} at {e['mfu']:.0%} MFU "
                     "(an assumption: the trainer logs the real MFU)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Print the token plan (params, tokens, steps, batch split, FLOPs, time) without running anything."
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to plan the batch split for")
    p.add_argument("--gpu", default=None, help="GPU name for a time estimate, e.g. H100, A100 (peak bf16 FLOPs table)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the estimate")
    p.add_argument("--stage", choices=STAGES, action="append", help="only these stages (default: all three)")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.nproc < 1 or not 0 < args.mfu <= 1:
        print("kiln plan: --nproc must be ≥ 1 and --mfu in (0, 1]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.preset, args.overrides)
    except ConfigError as e:
        print(f"kiln plan: {e}", file=sys.stderr)
        return 2
    if args.gpu and peak_flops(args.gpu) is None:
        print(f"kiln plan: no peak-FLOPs entry for GPU {args.gpu!r} (try H100, H200, A100, L4, ...)", file=sys.stderr)
        return 2
    plans = [plan_stage(cfg, s, nproc=args.nproc, gpu=args.gpu, mfu=args.mfu) for s in (args.stage or STAGES)]
    if args.json:
        print(json.dumps(plans, indent=2))
    else:
        print(f"preset {cfg.preset}: model depth {cfg.model.depth}, seq_len {cfg.model.seq_len}, "
              f"vocab {cfg.tokenizer.vocab_size:,}\n")
        print("\n\n".join(_text(p) for p in plans))
    return 1 if any("batch_error" in p for p in plans) else 0
