"""The token plan: how many steps, tokens and FLOPs a training stage will run, and how to say it.

Pure arithmetic on the config and the model's exact counts, with no torch and no data, so the same
functions serve the trainer (which prints and logs the plan at step 0 and then runs exactly it) and
``kiln plan`` (which answers the same questions before anything is downloaded or a GPU is booked).
A plan computed in one place and printed from another could disagree; one home means it cannot.
"""

from __future__ import annotations

import math
from typing import Any

# Peak dense bf16 tensor-core FLOP/s per GPU, for MFU. Matched by substring of torch.cuda.get_device_name(),
# first match wins (so the PCIe variants are listed before the generic name).
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H200", 989.5e12), ("H800", 989.5e12),
    ("GH200", 989.5e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


class BatchPlanError(ValueError):
    """The batch sizes do not divide exactly: detected before any training starts."""


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a GPU by name (None when unknown: MFU is then not reported, never guessed)."""
    for key, val in PEAK_FLOPS_BF16:
        if key in device_name:
            return val
    return None


def plan_batch(total_batch_tokens: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Gradient-accumulation steps so that one optimizer step sees exactly ``total_batch_tokens``."""
    per_micro = device_batch_size * seq_len * world_size
    if device_batch_size <= 0 or seq_len <= 0 or world_size <= 0 or total_batch_tokens <= 0:
        raise BatchPlanError("batch sizes must be positive")
    if total_batch_tokens % per_micro:
        lo = (total_batch_tokens // per_micro) * per_micro
        raise BatchPlanError(
            f"total_batch_tokens {total_batch_tokens} is not a multiple of device_batch_size {device_batch_size} "
            f"× seq_len {seq_len} × world_size {world_size} = {per_micro} tokens per micro-step; "
            f"use e.g. {max(lo, per_micro)} or {lo + per_micro}"
        )
    return total_batch_tokens // per_micro


def _whole_steps(budget_tokens: float, tokens_per_step: int) -> int:
    """Steps to reach ``budget_tokens``, rounded UP (at least one). The 1e-9 step of slack absorbs float
    error (0.1 × 30 / 3 is 1.0000000000000002, which must stay 1 step, not become 2)."""
    return max(1, math.ceil(budget_tokens / tokens_per_step - 1e-9))


def plan_tokens(train: Any, num_params: int, flops_per_token: int, scaling_params: int | None = None) -> dict[str, Any]:
    """The token budget: explicit steps win, then a FLOPs target, then tokens = ratio × scaling params.

    ``scaling_params`` (``GPT.num_scaling_params()``: block matrices + lm_head) is what the ratio counts,
    as in nanochat; it defaults to ``num_params`` for callers that have only the total.
    A ratio or FLOPs budget is rounded UP to whole optimizer steps, so the run never trains on fewer
    tokens (or FLOPs) than asked and overshoots by less than one step. (It used to be ``round()``:
    nearest with ties to even, so a budget could silently land up to half a step short.) The plan
    carries the unrounded ``budget_tokens`` next to the ``tokens`` that will actually run.
    """
    tps = train.total_batch_tokens
    counted = num_params if scaling_params is None else scaling_params
    if train.steps is not None:
        steps, source = int(train.steps), f"steps={train.steps}"
        budget_tokens = float(steps * tps)
    elif train.target_flops:
        budget_tokens = train.target_flops / flops_per_token
        steps = _whole_steps(budget_tokens, tps)
        source = f"target_flops={train.target_flops:.3g}, rounded up to whole steps"
    else:
        budget_tokens = train.target_param_data_ratio * counted
        steps = _whole_steps(budget_tokens, tps)
        what = "params" if scaling_params is None else "scaling params"
        source = (f"tokens={train.target_param_data_ratio:g}×{what}={budget_tokens:,.0f}, "
                  "rounded up to whole steps")
    tokens = steps * tps
    return {"budget": source, "budget_tokens": budget_tokens, "steps": steps, "tokens_per_step": tps,
            "tokens": tokens, "params": num_params, "scaling_params": counted, "flops_per_token": flops_per_token,
            "flops": float(flops_per_token) * tokens, "tokens_per_param": tokens / num_params,
            "tokens_per_scaling_param": tokens / counted}


# nanochat base_train's reference point for its depth rules (scripts/base_train.py): at d12 the best total
# batch it measured was 2^19 tokens, at the d12 horizon D_ref = ratio × d12's scaling params.
BATCH_REF_TOKENS = 2 ** 19
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # B_opt ∝ D^0.383, nanochat's fit


def depth_scaling(ratio: float, scaling_params: int, ref_scaling_params: int) -> dict[str, float]:
    """nanochat's batch, LR and weight-decay rules for a model whose horizon is D = ratio × scaling params,
    relative to the d12 reference (D_ref = ratio × d12's scaling params, B_ref = 2^19 tokens):

    * total batch B = 2^round(log2(B_ref · (D/D_ref)^0.383)) (a power of two, so it divides evenly);
    * every LR × √(B/B_ref) (the AdamW √-batch rule, which nanochat also uses for Muon);
    * weight decay × √(B/B_ref) · D_ref/D, which keeps AdamW's "epoch time" τ = B/(η·λ·D) constant.
    """
    target, ref = ratio * scaling_params, ratio * ref_scaling_params
    batch = 2 ** round(math.log2(BATCH_REF_TOKENS * (target / ref) ** BATCH_EXPONENT))
    lr_scale = math.sqrt(batch / BATCH_REF_TOKENS)
    return {"total_batch_tokens": int(batch), "lr_scale": lr_scale, "wd_scale": lr_scale * ref / target,
            "horizon_tokens": target, "ref_horizon_tokens": ref}


def fmt_count(n: float) -> str:
    """1.44M, 11.22B: how people say model and data sizes."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_duration(seconds: float) -> str:
    """Seconds as the unit a person reads at a glance (s, min, h)."""
    return (f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60
            else f"{seconds:.0f} s")


def plan_text(p: dict[str, Any], m: Any) -> str:
    """The trainer's step-0 plan (``plan.json`` as printed) for model config ``m``: what will run, and how long."""
    eta_s = fmt_duration(p["eta_s"])
    return "\n".join([
        "token plan",
        f"  model      depth {m.depth}, dim {m.model_dim}, heads {m.n_heads}/{m.kv_heads} kv, head_dim {m.head_dim}, "
        f"seq_len {m.seq_len}, vocab {m.vocab_size}",
        f"  params     {p['params']:,} ({fmt_count(p['params'])}; non-embedding {p['params_non_embedding']:,})",
        f"  budget     {p['budget']}",
        f"  steps      {p['steps']:,} (starting at {p['start_step']})",
        f"  tokens     {p['tokens']:,} ({fmt_count(p['tokens'])}; {p['tokens_per_param']:.1f} per param, "
        f"{p['tokens_per_scaling_param']:.1f} per scaling param)",
        f"  per step   {p['tokens_per_step']:,} tokens = {p['device_batch_size']} × {p['seq_len']} × "
        f"{p['world_size']} proc × {p['grad_accum']} accum",
        f"  FLOPs      {p['flops']:.3e} ({p['flops_per_token']:,} per token)",
        f"  device     {p['device']} × {p['world_size']}; autocast {p['autocast']}"
        + ("; torch.compile" if p["compiled"] else ""),
        f"  ETA        {eta_s} at a measured {p['est_tokens_per_s']:,.0f} tokens/s",
    ])
