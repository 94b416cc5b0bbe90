"""One shared, lazily computed view of a document for every filter rule.

Why this exists: datatrove tokenises each document with spaCy (English) inside every filter
and then walks the words in Python. Most of its time goes there. Here a document is wrapped
once in :class:`Doc`; lines, paragraphs and words are computed on first use and shared by
all rules, and the per-word statistics are computed with C-level primitives (``re``,
``set``, ``map``, numpy) instead of Python loops.

Words are spaCy's English tokens, reproduced by :mod:`.words` (datatrove's filters count
spaCy's words, and the recipe's thresholds were set on them). Splits and the per-word classes
(symbol only, has a letter) are memoised per whitespace chunk, so a document's counts are sums.
"""

from __future__ import annotations

import re
from functools import cached_property

import numpy as np

from llm.data.filters.words import split_text

PARAGRAPH_SPLIT_RE = re.compile(r"\n{2,}")
LINES_SPLIT_RE = re.compile(r"\n+")

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def duplicate_stats(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them), counting every occurrence after the first.

    Equal to a set-walk over the list, computed with set/len/map only: the characters of the
    first occurrences are the characters of the distinct items.
    """
    distinct = set(items)
    n_dup = len(items) - len(distinct)
    if n_dup == 0:
        return 0, 0
    return n_dup, sum(map(len, items)) - sum(map(len, distinct))


class Doc:
    """A document's text plus cached views shared by every rule (see module docstring)."""

    def __init__(self, text: str) -> None:
        self.text = text

    # ---- lines and paragraphs
    @cached_property
    def lines(self) -> list[str]:
        """``str.splitlines()``: what the Gopher and C4 line rules use."""
        return self.text.splitlines()

    @cached_property
    def nl_lines(self) -> list[str]:
        """Non-empty runs between ``\\n`` characters (Gopher repetition's line unit)."""
        return LINES_SPLIT_RE.split(self.text)

    @cached_property
    def paragraphs(self) -> list[str]:
        return PARAGRAPH_SPLIT_RE.split(self.text.strip())

    # ---- words
    @cached_property
    def _split(self) -> tuple[list[str], int, int, int]:
        """(words, symbol-only words, their characters, words with a letter): see words.split_text."""
        return split_text(self.text)

    @property
    def words(self) -> list[str]:
        return self._split[0]

    @property
    def n_symbol_words(self) -> int:
        return self._split[1]

    @property
    def symbol_word_chars(self) -> int:
        return self._split[2]

    @property
    def n_alpha_words(self) -> int:
        return self._split[3]

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @cached_property
    def word_cumlen(self) -> np.ndarray:
        """cumlen[i] = characters in words[:i]; so a window's characters are a difference."""
        out = np.zeros(len(self.words) + 1, dtype=np.int64)
        np.cumsum(self.word_lengths, out=out[1:])
        return out

    @cached_property
    def word_hashes(self) -> np.ndarray:
        # Python's str hash is salted per process, which is fine: hashes only decide equality
        # within one document, and a 64-bit collision between two distinct n-grams is negligible.
        return np.fromiter(map(hash, self.words), dtype=np.int64, count=len(self.words)).view(np.uint64)

    def ngram_hashes(self, n: int) -> np.ndarray:
        """One 64-bit hash per word n-gram (length ``len(words) - n + 1``), built incrementally."""
        cache: dict[int, np.ndarray] = self.__dict__.setdefault("_ngram_cache", {})
        if n in cache:
            return cache[n]
        w = self.word_hashes
        if n == 1:
            h = w
        else:
            prev = self.ngram_hashes(n - 1)
            if len(w) < n:
                h = np.zeros(0, dtype=np.uint64)
            else:
                h = prev[:-1] * _HASH_MULT + w[n - 1:]
        cache[n] = h
        return h

    def ngram_chars(self, n: int) -> np.ndarray:
        """Characters (spaces excluded) of each word n-gram."""
        c = self.word_cumlen
        return c[n:] - c[:-n] if len(c) > n else np.zeros(0, dtype=np.int64)


def as_doc(doc: Doc | str) -> Doc:
    return doc if isinstance(doc, Doc) else Doc(doc)
