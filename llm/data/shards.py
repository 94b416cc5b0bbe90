"""Token shards: flat binary files of token ids plus a document index, read through ``np.memmap``.

Layout of a tokenize stage output::

    meta.json                     {"format", "version", "dtype", "vocab_size", "bos_id",
                                   "splits": {"train": {"tokens", "docs", "shards": [...]}, "val": {...}}}
    train/shard_00000.bin         raw token ids, little-endian ``dtype`` (uint16 when vocab <= 65,536)
    train/shard_00000.idx.npy     int64 offset of every document's first token (its BOS) in the shard
    val/...

Token counts (``meta.json`` ``splits.*.tokens``, the manifest's ``*_tokens``) include the one BOS that
starts every document: they are exactly the sizes of the ``.bin`` files. Every document starts with BOS,
and documents never straddle shards: a shard is closed before a
document that would push it past ``shard_tokens`` (a single longer document gets a shard of its
own). So every shard starts with BOS and can be read on its own.

The train/val split is a pure function of the document id (:func:`doc_bucket`), so it is the same
whatever the worker count, file order or corpus size, and a document never moves between splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from llm.storage import Store, join

META_FILE = "meta.json"
FORMAT = "kiln-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A token shard or meta.json that is missing or inconsistent; the message names the file."""


def doc_bucket(doc_id: str) -> float:
    """A stable uniform number in [0, 1) for a document id (xxh64 of its UTF-8 bytes, seed 0)."""
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8")) / 2.0**64


def split_of(doc_id: str, val_fraction: float) -> str:
    return "val" if doc_bucket(doc_id) < val_fraction else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so a vocabulary of up to 65,536 tokens fits; beyond that uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard_{index:05d}.bin"


def index_name(bin_name: str) -> str:
    return bin_name[: -len(".bin")] + ".idx.npy"


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends BOS-prefixed documents of one split into rolling shards under ``root``.

    ``add(tokens, doc_lens)`` takes many documents at once: ``tokens`` is their concatenation
    (each already starting with BOS) and ``doc_lens`` their lengths. Shards are written with plain
    appends, so memory holds only the current batch and the current shard's document offsets.
    """

    def __init__(self, root: str | Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.root = Path(root)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[str] = []
        self.tokens = 0
        self.docs = 0
        self._file = None
        self._fill = 0  # tokens in the open shard
        self._starts: list[np.ndarray] = []

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")
        self.shards.append(name)
        self._fill = 0
        self._starts = []

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        np.save(self.root / index_name(self.shards[-1]), starts.astype(np.int64))

    def add(self, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        doc_lens = np.asarray(doc_lens, dtype=np.int64)
        if int(doc_lens.sum()) != len(tokens):
            raise ValueError(f"doc_lens sum {int(doc_lens.sum())} != {len(tokens)} tokens")
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        pos = 0  # first token of the remaining documents
        d = 0  # first remaining document
        while d < len(doc_lens):
            if self._file is None:
                self._open()
            cum = np.cumsum(doc_lens[d:])
            room = self.shard_tokens - self._fill
            k = int(np.searchsorted(cum, room, side="right"))  # documents that fit entirely
            if k == 0:
                if self._fill > 0:  # roll over; the document starts the next shard
                    self._close()
                    continue
                k = 1  # a document longer than a whole shard gets a shard of its own
            n = int(cum[k - 1])
            starts = self._fill + np.concatenate(([0], cum[: k - 1])).astype(np.int64)
            self._file.write(tokens[pos : pos + n].tobytes())
            self._starts.append(starts)
            self._fill += n
            self.tokens += n
            self.docs += k
            pos += n
            d += k
            if self._fill >= self.shard_tokens:
                self._close()

    def close(self) -> dict[str, Any]:
        self._close()
        return {"tokens": self.tokens, "docs": self.docs, "shards": list(self.shards)}


# --------------------------------------------------------------------------- reading


@dataclass
class TokenShard:
    """One shard: ``tokens`` (read-only memmap) and ``doc_starts`` (int64 offsets, each at a BOS)."""

    path: str
    tokens: np.memmap
    doc_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (starting with BOS)."""
        end = self.doc_starts[i + 1] if i + 1 < len(self.doc_starts) else len(self.tokens)
        return np.asarray(self.tokens[self.doc_starts[i] : end])


def read_meta(uri: str, endpoint_url: str = "") -> dict[str, Any]:
    where = join(str(uri), META_FILE)
    try:
        raw = Store(str(uri), endpoint_url).get_bytes(where)
    except FileNotFoundError:
        raise ShardError(f"{where}: not found (is {uri} a tokenize stage output?)") from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ShardError(f"{where}: not valid JSON ({e})") from e
    for f in ("dtype", "vocab_size", "bos_id", "splits"):
        if f not in meta:
            raise ShardError(f"{where}: missing field {f!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ShardError(f"{where}: field 'dtype' is {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    return meta


def open_shard(bin_path: str | Path, dtype: np.dtype | str, bos_id: int | None = None, name: str | None = None) -> TokenShard:
    """Memory-map one shard and its index, checking they agree (sizes, offsets, BOS at each start)."""
    bin_path = Path(bin_path)
    name = name or str(bin_path)
    dtype = np.dtype(dtype)
    idx_path = Path(index_name(str(bin_path)))
    if not bin_path.is_file():
        raise ShardError(f"{name}: shard file not found")
    if not idx_path.is_file():
        raise ShardError(f"{index_name(name)}: document index not found")
    size = bin_path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise ShardError(f"{name}: size {size} bytes is not a positive multiple of {dtype.itemsize} ({dtype})")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    starts = np.load(idx_path)
    if starts.dtype != np.int64 or starts.ndim != 1 or len(starts) == 0:
        raise ShardError(f"{index_name(name)}: expected a non-empty 1-D int64 array, got {starts.dtype} {starts.shape}")
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(tokens):
        raise ShardError(f"{index_name(name)}: document offsets are not increasing from 0 within {len(tokens)} tokens")
    if bos_id is not None and np.any(tokens[starts] != bos_id):
        bad = int(starts[np.flatnonzero(tokens[starts] != bos_id)[0]])
        raise ShardError(f"{name}: document at offset {bad} does not start with BOS ({bos_id})")
    return TokenShard(path=str(bin_path), tokens=tokens, doc_starts=starts)


def open_split(uri: str, split: str, endpoint_url: str = "") -> list[TokenShard]:
    """Every shard of ``split`` ("train" or "val") of a tokenize stage output (local or s3://)."""
    meta = read_meta(uri, endpoint_url)
    if split not in meta["splits"]:
        raise ShardError(f"{join(str(uri), META_FILE)}: no split {split!r} (have {sorted(meta['splits'])})")
    store = Store(str(uri), endpoint_url)
    out = []
    for rel in meta["splits"][split]["shards"]:
        u = join(str(uri), rel)
        try:
            local = store.cache_path(u)
            store.cache_path(index_name(u))
        except FileNotFoundError:
            raise ShardError(f"{u}: listed in meta.json but missing") from None
        out.append(open_shard(local, meta["dtype"], meta["bos_id"], name=u))
    return out


@dataclass
class DocTable:
    """A flat index over the documents of several token arrays: document ``i`` is
    ``arrays[shard[i]][start[i]:start[i] + length[i]]``.

    A document's position here is its global id, the id trainer loaders checkpoint, so the order is
    fixed: shards in the order given, documents in offset order, empty documents left out.
    """

    arrays: list[np.ndarray]
    shard: np.ndarray  # int32 index into arrays
    start: np.ndarray  # int64 offset of the document's first token
    length: np.ndarray  # int64 token count

    def __len__(self) -> int:
        return len(self.start)

    @property
    def n_docs(self) -> int:
        return len(self.start)

    @property
    def n_tokens(self) -> int:
        return int(self.length.sum())

    def doc(self, i: int, crop: int | None = None) -> np.ndarray:
        """Tokens of document ``i`` (its first ``crop`` when given), in the array's own dtype."""
        n = int(self.length[i]) if crop is None else min(int(self.length[i]), crop)
        a = int(self.start[i])
        return np.asarray(self.arrays[int(self.shard[i])][a:a + n])

    def read(self, i: int, take: int) -> np.ndarray:
        """The first ``take`` tokens of document ``i`` as int64 (what the trainer feeds to the model)."""
        return np.asarray(self.doc(i, take), dtype=np.int64)

    @classmethod
    def from_shards(cls, shards: list[Any] | tuple[Any, ...], what: str = "token shards") -> "DocTable":
        """From objects with ``tokens`` (1-D array) and ``doc_starts`` (int64 offsets), e.g. :class:`TokenShard`.

        Offsets that do not start at 0, go backwards or run past the tokens are a ``ValueError``
        naming ``what`` and the shard; so is a table with no documents at all.
        """
        arrays, shard_ids, starts, lengths = [], [], [], []
        for k, sh in enumerate(shards):
            toks, ds = sh.tokens, np.asarray(sh.doc_starts, dtype=np.int64)
            arrays.append(toks)
            if len(ds) == 0:
                continue
            ends = np.append(ds[1:], len(toks))
            if ds[0] != 0 or np.any(ends < ds) or ends[-1] > len(toks):
                raise ValueError(f"{what}: shard {k} has inconsistent document offsets")
            keep = ends > ds
            shard_ids.append(np.full(int(keep.sum()), k, dtype=np.int32))
            starts.append(ds[keep])
            lengths.append((ends - ds)[keep])
        if not starts or not sum(len(s) for s in starts):
            raise ValueError(f"{what}: no documents")
        return cls(arrays, np.concatenate(shard_ids), np.concatenate(starts), np.concatenate(lengths))

    @classmethod
    def from_chats(cls, chats: Any) -> "DocTable":
        """From one token array with document boundaries, e.g. ``llm.chat.format.RenderedChats`` (``ids``, ``offsets``)."""
        off = np.asarray(chats.offsets, dtype=np.int64)
        return cls([chats.ids], np.zeros(len(off) - 1, dtype=np.int32), off[:-1], np.diff(off))
