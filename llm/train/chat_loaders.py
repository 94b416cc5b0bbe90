"""Data loaders for the two chat stages: the midtraining mixture and SFT.

Both hand the trainer rows of ``seq_len + 1`` tokens per example; ``x = row[:-1]`` and
``y = row[1:]`` with ``-1`` where a target is not trained. Both are deterministic
functions of (seed, epoch, position), so their whole state is a few integers: a resumed
run continues with exactly the rows an uninterrupted run would have seen.

Multi-GPU: every rank walks the same global sequence of rows and keeps its own slice
(rows ``[r·B, (r+1)·B)`` of every ``W·B``-row micro-batch). Generating the other ranks' rows
is cheap (index arithmetic over memmaps) and it means every rank's state, and its
per-source token counts, are the exact global ones.

Midtraining (:class:`MixtureStream`) — packed, not padded: pretraining documents and rendered
conversations are concatenated into one token stream and cut into rows. Which source the
next document comes from is decided by deficit: chat goes next whenever its share of the
tokens so far is below ``chat_ratio``. Documents longer than ``crop`` tokens are cropped
(the rest is skipped, not carried), so the realised ratio never strays from the target by
more than one cropped document. Every target token is attributed to its source and counted.

SFT (:class:`SFTStream`) — best-fit packing: each epoch shuffles the conversations with a
seeded permutation and packs them into rows: the oldest waiting conversation opens a row,
then the largest waiting conversation that still fits is added until none fits; the rest
of the row is padding. Every row therefore starts with ``<|bos|>``; only assistant tokens
(and ``<|assistant_end|>``) are targets, padding and everything else are ``-1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.chat.format import RenderedChats
from llm.data.shards import DocTable, open_split

WEB, CHAT = 0, 1
SOURCE_NAMES = {WEB: "web", CHAT: "chat"}


def _perm(n: int, seed: int, epoch: int, salt: int) -> np.ndarray:
    """The seeded order of ``n`` items in ``epoch`` (independent streams per salt)."""
    return np.random.default_rng([seed, salt, epoch]).permutation(n)


# --------------------------------------------------------------------------- documents


class _Cursor:
    """Walks one source's documents in a seeded, per-epoch reshuffled order."""

    def __init__(self, table: DocTable, seed: int, salt: int):
        if len(table) == 0:
            raise ValueError("a mixture source has no documents")
        self.table, self.seed, self.salt = table, seed, salt
        self.epoch, self.pos = 0, 0
        self._order: np.ndarray | None = None

    def next_doc(self) -> int:
        if self._order is None:
            self._order = _perm(len(self.table), self.seed, self.epoch, self.salt)
        i = int(self._order[self.pos])
        self.pos += 1
        if self.pos == len(self.table):
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return i

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, st: dict[str, int]) -> None:
        self.epoch, self.pos, self._order = int(st["epoch"]), int(st["pos"]), None


# --------------------------------------------------------------------------- midtraining mixture


class MixtureStream:
    """Global stream of packed rows mixing web documents and conversations by token ratio."""

    def __init__(self, web: DocTable, chat: DocTable, *, chat_ratio: float, seq_len: int, seed: int,
                 crop: int | None = None):
        if not 0.0 <= chat_ratio <= 1.0:
            raise ValueError(f"chat_ratio must be in [0, 1], got {chat_ratio}")
        self.ratio, self.T = float(chat_ratio), int(seq_len)
        self.crop = int(crop or seq_len)
        self.cursors = {WEB: _Cursor(web, seed, WEB), CHAT: _Cursor(chat, seed, CHAT)}
        self.emitted = {WEB: 0, CHAT: 0}  # stream tokens handed out (the scheduler's view)
        self.targets = {WEB: 0, CHAT: 0}  # trained target tokens per source (y positions)
        # Input positions per source (x positions, all ranks): what the loaders' tokens_seen_by_source,
        # hence the manifest's tokens_by_source and chat_ratio_realised, count. Kept so the loader's
        # realised_chat_ratio() is computed from those same numbers, not from the targets (off by the
        # tokens straddling row starts).
        self.inputs = {WEB: 0, CHAT: 0}
        self.rows = 0
        self._pending: tuple[int, int, int] | None = None  # (source, doc, offset into the cropped doc)

    def _choose(self) -> int:
        if self.ratio <= 0.0:
            return WEB
        if self.ratio >= 1.0:
            return CHAT
        total = self.emitted[WEB] + self.emitted[CHAT]
        return CHAT if self.emitted[CHAT] < self.ratio * total else WEB

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """One row of ``T+1`` tokens and the source id of each token."""
        need = self.T + 1
        toks, srcs = [], []
        while need:
            if self._pending is None:
                src = self._choose()
                self._pending = (src, self.cursors[src].next_doc(), 0)
            src, doc, off = self._pending
            piece = self.cursors[src].table.doc(doc, self.crop)[off:off + need]
            toks.append(piece)
            srcs.append(np.full(len(piece), src, dtype=np.uint8))
            self.emitted[src] += len(piece)
            need -= len(piece)
            off += len(piece)
            full = min(int(self.cursors[src].table.length[doc]), self.crop)
            self._pending = None if off >= full else (src, doc, off)
        row, src_row = np.concatenate(toks).astype(np.int64), np.concatenate(srcs)
        # Position 0 is input only; every other token is a target attributed to its source.
        self.targets[WEB] += int((src_row[1:] == WEB).sum())
        self.targets[CHAT] += int((src_row[1:] == CHAT).sum())
        self.inputs[WEB] += int((src_row[:-1] == WEB).sum())
        self.inputs[CHAT] += int((src_row[:-1] == CHAT).sum())
        self.rows += 1
        return row, src_row

    def tokens_by_source(self) -> dict[str, int]:
        return {SOURCE_NAMES[k]: v for k, v in self.targets.items()}

    def realised_ratio(self) -> float:
        """Chat share of the input positions handed out: the numbers tokens_by_source reports."""
        total = self.inputs[WEB] + self.inputs[CHAT]
        return self.inputs[CHAT] / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursors": {SOURCE_NAMES[k]: c.state() for k, c in self.cursors.items()},
            "emitted": {SOURCE_NAMES[k]: v for k, v in self.emitted.items()},
            "targets": self.tokens_by_source(),
            "inputs": {SOURCE_NAMES[k]: v for k, v in self.inputs.items()},
            "rows": self.rows,
            "pending": list(self._pending) if self._pending is not None else None,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        names = {v: k for k, v in SOURCE_NAMES.items()}
        for name, cs in st["cursors"].items():
            self.cursors[names[name]].load(cs)
        self.emitted = {names[k]: int(v) for k, v in st["emitted"].items()}
        self.targets = {names[k]: int(v) for k, v in st["targets"].items()}
        # A state from before inputs were counted: the targets are the closest figure there is.
        self.inputs = {names[k]: int(v) for k, v in st.get("inputs", st["targets"]).items()}
        self.rows = int(st["rows"])
        p = st.get("pending")
        self._pending = tuple(int(x) for x in p) if p is not None else None  # type: ignore[assignment]


# --------------------------------------------------------------------------- SFT packing


def best_fit_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, buffer: int = 64) -> list[list[int]]:
    """Pack conversations (visited in ``order``) into rows of at most ``capacity`` tokens.

    The oldest waiting conversation opens each row (so none waits forever), then the largest
    waiting one that fits is added until nothing fits. ``buffer`` bounds how far ahead we look,
    which keeps the epoch's order mostly random instead of sorted by length.
    """
    too_long = [int(i) for i in order if lengths[i] > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} conversations exceed the row capacity {capacity} "
                         f"(e.g. #{too_long[0]} has {int(lengths[too_long[0]])} tokens); render with max_tokens <= capacity")
    rows: list[list[int]] = []
    waiting: list[int] = []
    it = iter(int(i) for i in order)
    exhausted = False
    while True:
        while not exhausted and len(waiting) < buffer:
            nxt = next(it, None)
            if nxt is None:
                exhausted = True
            else:
                waiting.append(nxt)
        if not waiting:
            return rows
        row = [waiting.pop(0)]
        space = capacity - int(lengths[row[0]])
        while space > 0 and waiting:
            best, best_len = -1, -1
            for j, c in enumerate(waiting):
                L = int(lengths[c])
                if best_len < L <= space:
                    best, best_len = j, L
            if best < 0:
                break
            row.append(waiting.pop(best))
            space -= best_len
        rows.append(row)


class SFTStream:
    """Global sequence of best-fit packed SFT rows over epochs, reshuffled each epoch."""

    def __init__(self, chats: RenderedChats, *, seq_len: int, seed: int, pad_id: int, shuffle: bool = True,
                 buffer: int = 64):
        if len(chats) == 0:
            raise ValueError("SFT has no conversations")
        self.chats, self.T, self.seed, self.pad = chats, int(seq_len), seed, int(pad_id)
        self.shuffle, self.buffer = shuffle, buffer
        self.lengths = chats.lengths()
        self.epoch, self.row = 0, 0
        self.tokens = 0  # conversation tokens placed in rows
        self.supervised = 0  # targets that carry loss
        self._rows: list[list[int]] | None = None

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        n = len(self.chats)
        order = _perm(n, self.seed, epoch, 7) if self.shuffle else np.arange(n)
        return best_fit_rows(self.lengths, order, self.T + 1, self.buffer)

    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(0))

    def next_row(self) -> tuple[np.ndarray, np.ndarray, int]:
        """``(tokens, mask, placed)``: T+1 token ids, the 0/1 supervision mask (padding is 0), and how
        many leading positions hold conversation tokens (the rest is padding)."""
        if self._rows is None:
            self._rows = self.epoch_rows(self.epoch)
        convs = self._rows[self.row]
        self.row += 1
        if self.row == len(self._rows):
            self.epoch, self.row, self._rows = self.epoch + 1, 0, None
        toks = np.full(self.T + 1, self.pad, dtype=np.int64)
        mask = np.zeros(self.T + 1, dtype=np.uint8)
        at = 0
        for c in convs:
            ids, m = self.chats.conversation(c)
            toks[at:at + len(ids)] = ids
            mask[at:at + len(ids)] = m
            at += len(ids)
        self.tokens += at
        self.supervised += int(mask[1:].sum())
        return toks, mask, at

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row, "tokens": self.tokens, "supervised": self.supervised}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.epoch, self.row = int(st["epoch"]), int(st["row"])
        self.tokens, self.supervised = int(st["tokens"]), int(st["supervised"])
        self._rows = None


def rows_to_xy(rows: list[np.ndarray], masks: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Stack rows into ``x`` (B, T) and ``y`` (B, T); ``y`` is ``-1`` where the mask is 0."""
    r = np.stack(rows)
    x, y = r[:, :-1].copy(), r[:, 1:].copy()
    if masks is not None:
        m = np.stack(masks)[:, 1:]
        y[m == 0] = -1
    return x, y


# --------------------------------------------------------------------------- trainer loaders (llm.train.loaders protocol)


def _load_chats(spec: dict[str, Any], key: str) -> RenderedChats:
    """The rendered set named by ``spec[key]`` (default: "chat_train" -> "train", "chat_val" -> "val")."""
    if "chat_dir" not in spec:
        raise ValueError(f"chat loader spec needs 'chat_dir' (rendered conversations), got {sorted(spec)}")
    return RenderedChats.load(spec["chat_dir"], spec.get(key, key.removeprefix("chat_")))


class _RankSlicer:
    """Shared rank logic: walk W·B global rows per micro-batch, keep rows ``[r·B, (r+1)·B)``."""

    B: int
    T: int
    W: int
    rank: int

    def _group(self, next_row: Any) -> list[Any]:
        mine = []
        for g in range(self.W * self.B):
            row = next_row()
            if g // self.B == self.rank:
                mine.append(row)
        return mine

    def _check(self, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.B, self.T, self.rank, self.W = batch_size, seq_len, rank, world_size


class MixtureLoader(_RankSlicer):
    """Midtraining batches: pretraining documents + rendered conversations, packed, mixed by token ratio.

    spec: ``{"tokens_uri": <tokenize stage output>, "split": "train", "val_split": "val",
    "chat_dir": <dir with rendered chats>, "chat_train": "train", "chat_val": "val", "chat_ratio": 0.3,
    "crop": null}``. ``crop`` (default ``seq_len``) caps how many tokens one document contributes.
    Every target is trained on (midtraining is language modelling on the mixture), so ``y`` has no -1.
    """

    def __init__(self, spec: dict[str, Any], *, batch_size: int, seq_len: int, rank: int, world_size: int,
                 seed: int, tokenizer: Any = None):
        self._check(batch_size, seq_len, rank, world_size)
        for k in ("tokens_uri", "chat_ratio"):
            if k not in spec:
                raise ValueError(f"midtrain loader spec needs {k!r}, got {sorted(spec)}")
        self.spec, self.seed = dict(spec), seed
        self.ratio = float(spec["chat_ratio"])
        self.crop = int(spec.get("crop") or seq_len)
        web = DocTable.from_shards(open_split(spec["tokens_uri"], spec.get("split", "train")))
        chat = DocTable.from_chats(_load_chats(spec, "chat_train"))
        self.n_docs = (len(web), len(chat))
        self.stream = MixtureStream(web, chat, chat_ratio=self.ratio, seq_len=seq_len, seed=seed, crop=self.crop)
        self.tokens_seen_by_source: dict[str, int] = {"pretrain": 0, "chat": 0}

    @property
    def epoch(self) -> int:
        """Passes over the chat data (the smaller source, whose repetition is what matters)."""
        return self.stream.cursors[CHAT].epoch

    @property
    def epochs_by_source(self) -> dict[str, int]:
        return {"pretrain": self.stream.cursors[WEB].epoch, "chat": self.stream.cursors[CHAT].epoch}

    def _count(self, srcs: list[np.ndarray]) -> None:
        s = np.stack(srcs)[:, :-1]  # x positions
        self.tokens_seen_by_source["pretrain"] += int((s == WEB).sum())
        self.tokens_seen_by_source["chat"] += int((s == CHAT).sum())

    def next_batch(self):
        import torch

        mine = self._group(self.stream.next_row)
        self._count([s for _, s in mine])
        x, y = rows_to_xy([r for r, _ in mine], None)
        return torch.from_numpy(x), torch.from_numpy(y)

    def realised_chat_ratio(self) -> float:
        """Chat share of the input tokens so far, over all ranks: the same numbers as the ranks' summed
        ``tokens_seen_by_source`` (the manifest's tokens_by_source and chat_ratio_realised)."""
        return self.stream.realised_ratio()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "midtrain", "n_docs": list(self.n_docs), "seed": self.seed, "chat_ratio": self.ratio,
                "world_size": self.W, "batch_size": self.B, "seq_len": self.T, "crop": self.crop,
                "stream": self.stream.state_dict(), "tokens_seen_by_source": dict(self.tokens_seen_by_source)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "midtrain":
            raise ValueError(f"loader state is for kind {state.get('kind')!r}, not 'midtrain'")
        for key, mine in (("n_docs", list(self.n_docs)), ("seed", self.seed), ("chat_ratio", self.ratio),
                          ("seq_len", self.T), ("crop", self.crop)):
            if state.get(key) != mine:
                raise ValueError(f"midtrain loader state has {key}={state.get(key)!r}, this run has {mine!r}: "
                                 "different data or settings")
        self.stream.load_state_dict(state["stream"])
        self.tokens_seen_by_source = {k: int(v) for k, v in state["tokens_seen_by_source"].items()}

    def val_batches(self, max_tokens: int):
        """Held-out pretraining documents and held-out conversations, mixed at the same ratio, fixed order."""
        import torch

        web = DocTable.from_shards(open_split(self.spec["tokens_uri"], self.spec.get("val_split", "val")))
        chat = DocTable.from_chats(_load_chats(self.spec, "chat_val"))
        stream = MixtureStream(web, chat, chat_ratio=self.ratio, seq_len=self.T, seed=self.seed + 1, crop=self.crop)
        group = self.W * self.B * self.T
        avail = int(np.minimum(web.length, self.crop).sum() + np.minimum(chat.length, self.crop).sum())
        for _ in range(max(1, min(max_tokens, avail) // group)):
            x, y = rows_to_xy([r for r, _ in self._group(stream.next_row)], None)
            yield torch.from_numpy(x), torch.from_numpy(y)


class SFTLoader(_RankSlicer):
    """SFT batches: best-fit packed conversations, loss on assistant tokens only, epochs with reshuffle.

    spec: ``{"chat_dir": <dir with rendered chats>, "chat_train": "train", "chat_val": "val",
    "pad_id": <bos id>, "buffer": 64}``. Conversations must already fit a row (render them with
    ``max_tokens <= seq_len + 1``); a longer one is an error, never silently cut here.
    ``tokens_seen_by_source`` splits this rank's input positions into ``chat`` and ``padding``.
    """

    def __init__(self, spec: dict[str, Any], *, batch_size: int, seq_len: int, rank: int, world_size: int,
                 seed: int, tokenizer: Any = None):
        self._check(batch_size, seq_len, rank, world_size)
        self.spec, self.seed = dict(spec), seed
        pad = spec.get("pad_id", tokenizer.bos_id if tokenizer is not None else None)
        if pad is None:
            raise ValueError("sft loader spec needs 'pad_id' (or a tokenizer to take BOS from)")
        self.pad, self.buffer = int(pad), int(spec.get("buffer", 64))
        self.chats = _load_chats(spec, "chat_train")
        self.stream = SFTStream(self.chats, seq_len=seq_len, seed=seed, pad_id=self.pad, buffer=self.buffer)
        self.tokens_seen_by_source: dict[str, int] = {"chat": 0, "padding": 0}
        self.supervised_tokens = 0  # this rank's targets that carry loss

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def rows_per_epoch(self) -> int:
        return self.stream.rows_per_epoch()

    def next_batch(self):
        import torch

        mine = self._group(self.stream.next_row)
        x, y = rows_to_xy([r for r, _, _ in mine], [m for _, m, _ in mine])
        # x holds the first T of each row's T+1 tokens: conversation tokens there, the rest is padding.
        placed = sum(min(n, self.T) for _, _, n in mine)
        self.tokens_seen_by_source["chat"] += placed
        self.tokens_seen_by_source["padding"] += self.B * self.T - placed
        self.supervised_tokens += int((y != -1).sum())
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sft", "n_conversations": len(self.chats), "n_tokens": int(self.chats.offsets[-1]),
                "seed": self.seed, "seq_len": self.T, "world_size": self.W, "batch_size": self.B,
                "stream": self.stream.state_dict(), "tokens_seen_by_source": dict(self.tokens_seen_by_source),
                "supervised_tokens": self.supervised_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sft":
            raise ValueError(f"loader state is for kind {state.get('kind')!r}, not 'sft'")
        for key, mine in (("n_conversations", len(self.chats)), ("n_tokens", int(self.chats.offsets[-1])),
                          ("seed", self.seed), ("seq_len", self.T)):
            if state.get(key) != mine:
                raise ValueError(f"sft loader state has {key}={state.get(key)!r}, this run has {mine!r}: "
                                 "different data or settings")
        self.stream.load_state_dict(state["stream"])
        self.tokens_seen_by_source = {k: int(v) for k, v in state["tokens_seen_by_source"].items()}
        self.supervised_tokens = int(state.get("supervised_tokens", 0))

    def val_batches(self, max_tokens: int):
        """Held-out conversations, packed the same way in a fixed order (no shuffle)."""
        import torch

        val = _load_chats(self.spec, "chat_val")
        stream = SFTStream(val, seq_len=self.T, seed=self.seed, pad_id=self.pad, shuffle=False, buffer=self.buffer)
        rows = stream.rows_per_epoch()
        n = max(1, min(max_tokens // (self.W * self.B * self.T), rows // (self.W * self.B)))
        for _ in range(n):
            mine = self._group(stream.next_row)
            x, y = rows_to_xy([r for r, _, _ in mine], [m for _, m, _ in mine])
            yield torch.from_numpy(x), torch.from_numpy(y)
