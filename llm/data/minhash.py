"""MinHash building blocks for the dedup stage: normalisation, shingles, signatures, bands.

Everything here is a pure function of its input, so the signature of a document does not
depend on which worker computed it or in what order: that is what lets the dedup stage
compute signatures per shard in parallel and still get one deterministic answer.

* **Normalisation** (used for both exact and near dedup): ``str.lower()``, then every run of
  characters that are not Unicode letters or digits (punctuation, symbols, underscores,
  whitespace of any kind) becomes one space, and the ends are stripped. Words are what lies
  between the spaces. ``"Hello,  World!"`` and ``"hello world"`` normalise alike.
* **Exact key**: xxh3-64 of the UTF-8 bytes of the normalised text.
* **Shingles**: word n-grams (n = 5 by default) of the normalised text, as the UTF-8 bytes of
  the n words joined by single spaces. A document with fewer than n words has one shingle,
  all of its words; an empty one has none (it can only be an exact duplicate).
* **Signature**: datasketch ``MinHash.bulk`` with ``hashfunc=xxhash.xxh32_intdigest`` (its
  default SHA-1 is most of the cost) and a fixed seed, in datasketch's ``affine32`` scheme:
  ``num_perm`` uint32 values.
* **Bands**: the signature cut into ``bands`` runs of ``rows`` values; a band's bucket key is
  xxh3-64 of its ``rows`` little-endian uint32 values. Two documents are candidates when
  any band's key matches, exactly what ``MinHashLSH(num_perm, params=(bands, rows))`` does.
"""

from __future__ import annotations

import inspect
import re
from typing import Iterable, Sequence

import numpy as np
import xxhash
from datasketch import MinHash

_NOT_WORD = re.compile(r"[\W_]+")

# datasketch >= 2.0 has permutation schemes; pin the one we use so a future default change
# cannot silently change every signature (and so every cache key's meaning).
_HAS_SCHEME = "scheme" in inspect.signature(MinHash.__init__).parameters
SCHEME = "affine32" if _HAS_SCHEME else "legacy"


def normalize(text: str) -> bytes:
    """Lowercase; runs of non-letter/non-digit characters become one space; UTF-8 bytes."""
    return _NOT_WORD.sub(" ", text.lower()).strip().encode("utf-8")


def exact_key(norm: bytes) -> int:
    """64-bit key of a normalised text; equal texts get equal keys."""
    return xxhash.xxh3_64_intdigest(norm)


def shingles(norm: bytes, n: int) -> list[bytes]:
    """Word n-grams of a normalised text (see module docstring), as bytes slices.

    Slicing the normalised buffer between word boundaries is ~1.5x faster than joining
    word lists, and gives the same bytes because words are separated by exactly one space.
    """
    if not norm:
        return []
    spaces = np.flatnonzero(np.frombuffer(norm, dtype=np.uint8) == 32)
    if len(spaces) + 1 < n:  # fewer than n words: the whole text is the one shingle
        return [norm]
    starts = np.concatenate(([0], spaces + 1))
    ends = np.concatenate((spaces, [len(norm)]))
    return [norm[s:e] for s, e in zip(starts[: len(starts) - n + 1].tolist(), ends[n - 1 :].tolist())]


class Signer:
    """Computes MinHash signatures with fixed permutations (num_perm, seed) and xxh32."""

    def __init__(self, num_perm: int, seed: int):
        self.num_perm = num_perm
        self.seed = seed
        self._kwargs: dict = {"num_perm": num_perm, "seed": seed, "hashfunc": xxhash.xxh32_intdigest}
        if _HAS_SCHEME:
            self._kwargs["scheme"] = SCHEME

    def sign(self, shingle_lists: Sequence[list[bytes]]) -> np.ndarray:
        """(len(shingle_lists), num_perm) uint32 signatures; all-max rows for empty lists."""
        out = np.empty((len(shingle_lists), self.num_perm), dtype=np.uint32)
        if not len(shingle_lists):
            return out
        for i, m in enumerate(MinHash.generator(shingle_lists, **self._kwargs)):
            out[i] = m.hashvalues
        return out

    def minhash(self, hashvalues: np.ndarray) -> MinHash:
        """A datasketch MinHash object for a stored signature (for MinHashLSH cross-checks)."""
        kw = {k: v for k, v in self._kwargs.items() if k != "num_perm"}
        return MinHash(hashvalues=np.asarray(hashvalues, dtype=np.uint32 if _HAS_SCHEME else np.uint64), **kw)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 bucket keys: xxh3-64 of each band's ``rows`` uint32 values."""
    n = sigs.shape[0]
    if sigs.shape[1] != bands * rows:
        raise ValueError(f"signature has {sigs.shape[1]} values, expected bands*rows = {bands}*{rows}")
    keys = np.empty((n, bands), dtype=np.uint64)
    width = rows * 4
    h = xxhash.xxh3_64_intdigest
    for b in range(bands):
        buf = np.ascontiguousarray(sigs[:, b * rows : (b + 1) * rows], dtype="<u4").tobytes()
        keys[:, b] = [h(buf[i * width : (i + 1) * width]) for i in range(n)]
    return keys


def lsh_threshold(bands: int, rows: int) -> float:
    """Jaccard similarity where the S-curve 1-(1-s^r)^b is steepest: about (1/b)^(1/r)."""
    return (1.0 / bands) ** (1.0 / rows)


def collision_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that two documents with this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def jaccard(a: Iterable[bytes], b: Iterable[bytes]) -> float:
    """Exact Jaccard similarity of two shingle sets (for tests and recall measurement)."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class UnionFind:
    """Union-find over document ids where every root is its cluster's smallest id.

    Only ids that take part in a candidate pair are ever stored, so memory grows with the
    number of duplicate candidates, not with the corpus.
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while True:
            p = parent.get(root, root)
            if p == root:
                break
            root = p
        while x != root:  # path compression
            nxt = parent.get(x, x)
            parent[x] = root
            x = nxt
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra < rb:
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb

    def clusters(self) -> dict[int, list[int]]:
        """root -> sorted members, for every cluster with at least two members."""
        out: dict[int, list[int]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        for root, members in out.items():
            if root not in members:
                members.append(root)
            members.sort()
        return {r: m for r, m in out.items() if len(m) > 1}
