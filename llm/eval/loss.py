"""Bits per byte on the held-out token split: a loss that does not depend on the tokenizer.

Mean cross-entropy per *token* cannot compare models with different vocabularies (a bigger
vocabulary packs more text into a token). Summing the loss in nats over the predicted tokens
and dividing by ``ln 2 ×`` the UTF-8 bytes those tokens stand for gives bits per byte, which
can. Special tokens (BOS) have 0 bytes and are excluded as targets, so document boundaries cost
nothing.

The val split is read in order from the tokenize stage's shards, cut into rows of
``seq_len + 1`` tokens (inputs and shifted targets), and rows are strided across ranks; the
two sums are all-reduced, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import numpy as np
import torch


def val_tokens(shards: Sequence[Any], max_tokens: int) -> np.ndarray:
    """The first ``max_tokens`` tokens of a split (``TokenShard``s in order), as int64."""
    parts: list[np.ndarray] = []
    have = 0
    for sh in shards:
        if have >= max_tokens:
            break
        take = np.asarray(sh.tokens[: max_tokens - have], dtype=np.int64)
        parts.append(take)
        have += len(take)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, tokens: np.ndarray, token_bytes: np.ndarray, *, seq_len: int,
                 batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """``{"bpb", "loss_per_token", "tokens", "bytes"}`` over ``tokens`` (this rank scores every world-th row)."""
    import torch.distributed as dist

    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n_rows = max(0, (len(tokens) - 1) // seq_len)
    if n_rows == 0:
        raise ValueError(f"bits-per-byte needs more than seq_len={seq_len} tokens, got {len(tokens)}")
    tb = torch.as_tensor(np.asarray(token_bytes, dtype=np.int64), device=device)
    mine = list(range(rank, n_rows, world))
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    ntok = torch.zeros((), dtype=torch.float64, device=device)
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    it: Any = batches
    if progress and rank == 0:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="bpb", unit="batch")
    for rows in it:
        chunk = np.stack([tokens[r * seq_len : r * seq_len + seq_len + 1] for r in rows])
        x = torch.from_numpy(chunk[:, :-1]).to(device)
        y = torch.from_numpy(chunk[:, 1:]).to(device)
        yb = tb[y]
        y = torch.where(yb > 0, y, torch.full_like(y, -1))  # special tokens: no bytes, not a target
        with amp:
            loss = model(x, targets=y, reduction="none")
        nats += loss.double().sum()
        nbytes += yb.double().sum()
        ntok += (yb > 0).double().sum()
    if world > 1:
        for t in (nats, nbytes, ntok):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    n, b = float(nats.item()), float(nbytes.item())
    return {
        "bpb": n / (math.log(2) * b) if b else float("nan"),
        "loss_per_token": n / float(ntok.item()) if ntok.item() else float("nan"),
        "tokens": int(ntok.item()),
        "bytes": int(b),
        "seq_len": seq_len,
    }
