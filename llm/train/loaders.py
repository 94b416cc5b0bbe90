"""Trainer data loaders: one protocol, pluggable by kind.

The trainer (``llm.train.trainer``) never knows where tokens come from. A job names a loader *kind* and a JSON
*spec*; :func:`make_loader` imports the class registered in :data:`LOADER_KINDS` and builds it with::

    Loader(spec: dict, *, batch_size: int, seq_len: int, rank: int, world_size: int, seed: int, tokenizer)

``tokenizer`` is an ``llm.tokenizer.Tokenizer`` or None (loaders that render chats need it; the pretrain
loader does not).

The protocol (:class:`TrainLoader`) — every kind must provide:

``next_batch() -> (x, y)``
    Two CPU ``torch.int64`` tensors of shape ``(batch_size, seq_len)``. ``y`` is ``x`` shifted by one
    (the next-token targets); ``y == -1`` marks a position that must not be trained on (padding, user
    turns in SFT). Each call returns THIS rank's micro-batch; the trainer calls it ``grad_accum`` times per
    optimizer step. A loader never ends: it starts a new epoch (and bumps ``epoch``) when data runs out.

``state_dict() -> dict`` / ``load_state_dict(state: dict) -> None``
    JSON-able state (ints, floats, strings, lists, dicts — no numpy types, no tensors) such that a freshly
    constructed loader with the same constructor arguments, after ``load_state_dict(s)``, yields exactly
    the batches the original would have yielded after ``s`` was taken. The trainer saves it with every
    checkpoint (``loader.json``, one entry per rank) — this is what makes resume bit-exact and guarantees
    no token is read twice. Raise ``ValueError`` when the state does not fit the spec (different data).

``epoch: int``
    Passes completed over the data (0 during the first pass).

``tokens_seen_by_source: dict[str, int]``
    Input tokens (``x`` positions, ``B·T`` per batch) this rank has delivered so far, by data source
    (``{"pretrain": n}`` here; midtrain reports e.g. ``{"pretrain": a, "smoltalk": b}``). Restored by
    ``load_state_dict``. The trainer sums it over ranks into the manifest's ``tokens_by_source``, so it
    sums to the trainer's "tokens" (steps × total_batch_tokens; padding positions included, as their own
    source). On a resume with another world size the trainer moves the restored total to rank 0.
    Loss-bearing targets (``y != -1``) are counted by the trainer itself (``supervised_tokens``).
    A row of ``T + 1`` shard tokens gives ``T`` input positions: "tokens" counts positions, not shard reads.

``val_batches(max_tokens: int) -> Iterator[(x, y)]``
    A fresh, deterministic pass over held-out data (same shapes and ``-1`` convention), independent of
    the training position: every call yields the same batches. All ranks together cover about
    ``max_tokens`` input tokens, and every rank MUST yield the same number of batches (the trainer
    all-reduces after the loop). May yield fewer tokens when the held-out data is smaller.

Distributed contract: ranks get disjoint data. For equal results across world sizes the pretrain loader
builds one global stream of rows and hands rank ``r`` rows ``[(k·W + r)·B, (k·W + r + 1)·B)`` of its
``k``-th micro-batch group, so 1 process × 2 accumulation steps sees the same rows per optimizer step as
2 processes × 1 step.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from llm.data.shards import DocTable, open_split

LOADER_KINDS: dict[str, str] = {
    "pretrain": "llm.train.loaders:PretrainLoader",
    "midtrain": "llm.train.chat_loaders:MixtureLoader",
    "sft": "llm.train.chat_loaders:SFTLoader",
}

Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class TrainLoader(Protocol):
    """What the trainer needs from a loader (see the module docstring for the exact semantics)."""

    epoch: int
    tokens_seen_by_source: dict[str, int]

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def val_batches(self, max_tokens: int) -> Iterator[Batch]: ...


def make_loader(kind: str, spec: dict[str, Any], *, batch_size: int, seq_len: int, rank: int, world_size: int,
                seed: int, tokenizer: Any = None) -> TrainLoader:
    """Build the loader registered under ``kind``."""
    if kind not in LOADER_KINDS:
        raise ValueError(f"unknown loader kind {kind!r} (known: {sorted(LOADER_KINDS)})")
    mod, cls = LOADER_KINDS[kind].split(":")
    loader_cls = getattr(importlib.import_module(mod), cls)
    return loader_cls(spec, batch_size=batch_size, seq_len=seq_len, rank=rank, world_size=world_size,
                      seed=seed, tokenizer=tokenizer)


class _Packer:
    """Best-fit, BOS-aligned packing of documents into rows of ``row_len`` tokens, with no padding.

    Documents arrive in ``order(epoch)`` and wait in a small buffer. A row is filled by repeatedly
    taking the LARGEST buffered document that still fits; when none fits, the SHORTEST one is cropped to
    fill the row exactly (its tail is dropped — counted in ``tokens_cropped``). Every row therefore starts
    at a document start (a BOS token), rows are always full, and cropping only happens once per row.
    The state (epoch, cursor, buffer) is a few ints: cheap to checkpoint and exact to restore.

    Epochs are exact: the buffer only ever holds documents of the current epoch. At the end of a pass
    it drains (packing from fewer candidates) before the next permutation starts, so every epoch uses
    every document exactly once and ``epoch`` is the number of passes completed. (Refilling across the
    boundary used to mix two epochs in the buffer; on data smaller than the buffer the same document
    could even sit in it twice, and ``epoch`` ran ahead of the documents actually consumed.)
    """

    def __init__(self, docs: DocTable, row_len: int, order: Callable[[int], np.ndarray], buffer_docs: int):
        self.docs, self.row_len, self.order, self.buffer_docs = docs, row_len, order, buffer_docs
        self.epoch, self.cursor, self.buffer = 0, 0, []  # buffer: global doc ids
        self.tokens_cropped = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _perm_for(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = self.order(epoch), epoch
        return self._perm

    def _fill(self) -> None:
        """Top the buffer up from the current epoch's permutation only (never past its end)."""
        self._end_epoch_if_done()  # a state saved exactly at the end of a pass
        perm = self._perm_for(self.epoch)
        take = min(self.buffer_docs - len(self.buffer), len(perm) - self.cursor)
        if take > 0:
            self.buffer.extend(int(d) for d in perm[self.cursor:self.cursor + take])
            self.cursor += take

    def _end_epoch_if_done(self) -> None:
        """Every document of this epoch consumed: the pass is complete, the next one starts."""
        if not self.buffer and self.cursor >= len(self._perm_for(self.epoch)):
            self.epoch, self.cursor = self.epoch + 1, 0

    def next_row(self) -> list[tuple[int, int]]:
        """(doc, tokens to take from its start) pieces summing to ``row_len``."""
        need, row = self.row_len, []
        lengths = self.docs.length
        while need > 0:
            self._fill()
            lens = lengths[self.buffer]
            fits = lens <= need
            if fits.any():
                i = int(np.argmax(np.where(fits, lens, -1)))
                take = int(lens[i])
            else:
                i = int(np.argmin(lens))
                take = need
                self.tokens_cropped += int(lens[i]) - need
            row.append((self.buffer.pop(i), take))
            need -= take
            self._end_epoch_if_done()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "buffer": list(self.buffer),
                "tokens_cropped": self.tokens_cropped}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        self.buffer = [int(d) for d in s["buffer"]]
        self.tokens_cropped = int(s.get("tokens_cropped", 0))
        if any(d < 0 or d >= self.docs.n_docs for d in self.buffer) or self.cursor > self.docs.n_docs:
            raise ValueError("loader state does not fit this data (document ids out of range)")


class PretrainLoader:
    """Pretraining batches from token shards (memmap), BOS-aligned best-fit packing, seeded per-epoch shuffle.

    spec: ``{"uri": <tokenize stage output dir or s3://>, "split": "train", "val_split": "val",
    "buffer_docs": 64}``. The document order of epoch e is ``permutation(n_docs)`` from
    ``numpy.random.default_rng([seed, e])``, so it is reproducible and needs no saved RNG beyond (seed, e).
    """

    def __init__(self, spec: dict[str, Any], *, batch_size: int, seq_len: int, rank: int, world_size: int,
                 seed: int, tokenizer: Any = None):
        if "uri" not in spec:
            raise ValueError(f"pretrain loader spec needs 'uri' (the tokenize stage output), got {spec}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.spec = dict(spec)
        self.uri = str(spec["uri"])
        self.split = spec.get("split", "train")
        self.val_split = spec.get("val_split", "val")
        self.buffer_docs = int(spec.get("buffer_docs", 64))
        self.B, self.T, self.rank, self.W, self.seed = batch_size, seq_len, rank, world_size, seed
        # The S3 endpoint, when there is one, reaches open_split through AWS_ENDPOINT_URL (set by llm.train.stages).
        self.docs = DocTable.from_shards(open_split(self.uri, self.split), f"{self.uri} split {self.split!r}")
        n = self.docs.n_docs
        self.packer = _Packer(self.docs, seq_len + 1,
                              lambda e: np.random.default_rng([seed, e]).permutation(n), self.buffer_docs)
        self.tokens_seen_by_source: dict[str, int] = {"pretrain": 0}
        self.rows_done = 0  # global rows packed so far (all ranks)

    @property
    def epoch(self) -> int:
        return self.packer.epoch

    def _rows(self, packer: _Packer, docs: DocTable) -> np.ndarray:
        """Pack one global group of W·B rows; read tokens only for this rank's B rows."""
        out = np.empty((self.B, self.T + 1), dtype=np.int64)
        for g in range(self.W * self.B):
            row = packer.next_row()
            if g // self.B == self.rank:
                out[g % self.B] = np.concatenate([docs.read(d, take) for d, take in row])
        return out

    def next_batch(self) -> Batch:
        rows = torch.from_numpy(self._rows(self.packer, self.docs))
        self.rows_done += self.W * self.B
        self.tokens_seen_by_source["pretrain"] += self.B * self.T
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "pretrain", "uri": self.uri, "split": self.split, "n_docs": self.docs.n_docs,
                "seed": self.seed, "world_size": self.W, "batch_size": self.B, "seq_len": self.T,
                "packer": self.packer.state_dict(), "rows_done": self.rows_done,
                "tokens_seen_by_source": dict(self.tokens_seen_by_source)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "pretrain":
            raise ValueError(f"loader state is for kind {state.get('kind')!r}, not 'pretrain'")
        if int(state["n_docs"]) != self.docs.n_docs:
            raise ValueError(f"loader state was taken on {state['n_docs']} documents, this split has "
                             f"{self.docs.n_docs}: different data")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this run uses {self.seed}")
        self.packer.load_state_dict(state["packer"])
        self.rows_done = int(state["rows_done"])
        self.tokens_seen_by_source = {k: int(v) for k, v in state["tokens_seen_by_source"].items()}

    @property
    def tokens_cropped(self) -> int:
        """Tokens dropped by cropping (global, all ranks) — the price of BOS-aligned rows."""
        return self.packer.tokens_cropped

    def val_batches(self, max_tokens: int) -> Iterator[Batch]:
        docs = DocTable.from_shards(open_split(self.uri, self.val_split), f"{self.uri} split {self.val_split!r}")
        packer = _Packer(docs, self.T + 1, lambda e: np.arange(docs.n_docs), self.buffer_docs)
        group = self.W * self.B * self.T
        n = max(1, min(max_tokens, docs.n_tokens) // group)
        for _ in range(n):
            rows = torch.from_numpy(self._rows(packer, docs))
            yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
