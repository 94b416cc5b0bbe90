"""Held-out loss and bits per byte: the one implementation, for pretraining, SFT and the eval stage.

Mean cross-entropy per *token* cannot compare models with different vocabularies (a bigger
vocabulary packs more text into a token). Summing the loss in nats over the predicted tokens
and dividing by ``ln 2 ×`` the UTF-8 bytes those tokens stand for gives bits per byte, which
can. Special tokens (BOS, chat markers) have 0 bytes, so they add nothing to either sum of the
bits per byte and document boundaries cost nothing.

:func:`evaluate_loss` scores any iterable of ``(x, y)`` batches (``y == -1``: not a target) and
returns four sums; every caller derives its numbers from them:

- the trainer's periodic ``val_loss`` / ``val_bpb`` (the loader's ``val_batches``, all-reduced
  across ranks through the ``reduce`` hook);
- the SFT stage's held-out chat loss before and after training (one process);
- the eval stage's ``bpb.json`` (:func:`evaluate_bpb`: the tokenize stage's val split cut into rows
  of ``seq_len + 1`` tokens, rows strided across ranks, special tokens not scored at all).

The sums are accumulated in float64 on the device (one host sync at the end), so the result does
not depend on how the rows are batched or split across ranks beyond float64 rounding.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

# Sums the per-rank values over all ranks (the trainer passes its all-reduce); None: this process only.
Reduce = Callable[[list[float]], list[float]]


@dataclass(frozen=True)
class LossSums:
    """Summed held-out loss: over every target, and over the targets that stand for text (bytes > 0)."""

    nats: float  # cross-entropy summed over every target (y != -1)
    tokens: float  # the number of those targets
    byte_nats: float  # cross-entropy summed over the targets with bytes > 0
    bytes: float  # the UTF-8 bytes of those targets

    @property
    def mean_loss(self) -> float:
        """Mean nats per target; 0.0 when nothing was scored (like the model's ``reduction="mean"``)."""
        return self.nats / max(self.tokens, 1.0)

    @property
    def bpb(self) -> float:
        """Bits per byte; NaN without bytes (no tokenizer byte table, or only special tokens)."""
        return self.byte_nats / (math.log(2) * self.bytes) if self.bytes else float("nan")


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                  token_bytes: Any = None, amp_dtype: torch.dtype | None = None,
                  reduce: Reduce | None = None) -> LossSums:
    """Score ``batches`` with ``model`` (in eval mode, restored after) and return the summed loss.

    ``token_bytes`` (bytes per token id, e.g. ``tokenizer.token_bytes``) enables the byte sums;
    without it ``byte_nats`` and ``bytes`` are 0. ``amp_dtype`` runs the forward under autocast, as
    training does. ``reduce`` sums the four values over ranks; every rank must call it.
    """
    device = next(model.parameters()).device
    tb = None if token_bytes is None else torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, byte_nats, bytes
    was_training = model.training
    model.eval()
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp_dtype):
            loss = model(x, y, reduction="none").double()  # 0 where y == -1
        valid = y != -1
        sums[0] += loss.sum()
        sums[1] += valid.double().sum()
        if tb is not None:
            nb = torch.where(valid, tb[y.clamp(min=0)], torch.zeros_like(y))
            sums[2] += (loss * (nb > 0)).sum()
            sums[3] += nb.double().sum()
    model.train(was_training)
    values = sums.tolist()
    if reduce is not None:
        values = reduce(values)
    return LossSums(*values)


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


def _row_batches(tokens: np.ndarray, token_bytes: np.ndarray, rows: Iterable[list[int]],
                 seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` for each list of row indices; targets with no bytes (special tokens) become -1."""
    for idx in rows:
        chunk = np.stack([tokens[r * seq_len : r * seq_len + seq_len + 1] for r in idx])
        y = chunk[:, 1:]
        y = np.where(token_bytes[y] > 0, y, -1)
        yield torch.from_numpy(np.ascontiguousarray(chunk[:, :-1])), torch.from_numpy(y)


def _sum_over_ranks(device: torch.device) -> Reduce:
    import torch.distributed as dist

    def reduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    return reduce


def evaluate_bpb(model: torch.nn.Module, tokens: np.ndarray, token_bytes: np.ndarray, *, seq_len: int,
                 batch_size: int = 8, device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """``{"bpb", "loss_per_token", "tokens", "bytes", "seq_len"}`` over ``tokens`` (the eval stage).

    The stream is cut into rows of ``seq_len + 1`` tokens; under torchrun this rank scores every
    world-th row and the sums are all-reduced, so every rank returns the same numbers. Special
    tokens are not targets here, so ``tokens`` and ``loss_per_token`` count text tokens only.
    """
    import torch.distributed as dist

    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n_rows = max(0, (len(tokens) - 1) // seq_len)
    if n_rows == 0:
        raise ValueError(f"bits-per-byte needs more than seq_len={seq_len} tokens, got {len(tokens)}")
    token_bytes = np.asarray(token_bytes, dtype=np.int64)
    mine = list(range(rank, n_rows, world))
    rows: Iterable[list[int]] = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if progress and rank == 0:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="bpb", unit="batch")
    sums = evaluate_loss(model, _row_batches(tokens, token_bytes, rows, seq_len), token_bytes=token_bytes,
                         amp_dtype=torch.bfloat16 if device.type == "cuda" else None,
                         reduce=_sum_over_ranks(device) if world > 1 else None)
    return {
        "bpb": sums.bpb,
        "loss_per_token": sums.nats / sums.tokens if sums.tokens else float("nan"),
        "tokens": int(sums.tokens),
        "bytes": int(sums.bytes),
        "seq_len": seq_len,
    }
