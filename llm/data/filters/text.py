"""One shared, lazily computed view of a document for every filter rule.

Why this exists: datatrove tokenises each document with spaCy (English) inside every filter
and then walks the words in Python. Most of its time goes there. Here a document is wrapped
once in :class:`Doc`; lines, paragraphs and words are computed on first use and shared by
all rules, and the per-word statistics are computed with C-level primitives (``re``,
``set``, ``map``, numpy) instead of Python loops.

Words are spaCy's English tokens, reproduced by :mod:`.words` (datatrove's filters count
spaCy's words, and the recipe's thresholds were set on them).
"""

from __future__ import annotations

import re
import string
from functools import cached_property, lru_cache

import numpy as np

from .words import all_chars, char_class, classes, split_words


@lru_cache(maxsize=1)
def terminal_punctuation() -> tuple[str, ...]:
    """Unicode Sentence_Terminal characters ('.', '!', '?', '。', '؟', ...), for line-end rules."""
    import regex  # a tiktoken dependency, always present; only used once to list the characters

    return tuple(regex.findall(r"\p{Sentence_Terminal}", all_chars()))


@lru_cache(maxsize=1)
def symbol_chars() -> str:
    """Characters that make a word "symbol only" for the Gopher word statistics.

    The set datatrove's Gopher filter uses, so that word counts and mean word lengths agree:
    ASCII punctuation, a short list of typographic and CJK marks, control characters and
    sentence terminals. Symbols outside it ("‘", "§", "£", "•", "×") count as words there,
    and so they do here.
    """
    controls = "".join(map(chr, (*range(0, 9), *range(11, 32), *range(127, 160))))
    return string.punctuation + "«´»–—’“”„…∶━►、〈〉《》「」【】％（），１：；～" + controls + "".join(terminal_punctuation())


SYMBOL_CLASS = char_class(symbol_chars())
# Over "\n".join(words), one pass: the group captures a symbol-only word, and is empty for a word
# with a letter (``str.isalpha``, as datatrove counts them); words with neither do not match.
TOKEN_CLASS_RE = re.compile(rf"^(?:([{SYMBOL_CLASS}]+)$|[^{classes()['alpha']}\n]*[{classes()['alpha']}])", re.M)
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
    def words(self) -> list[str]:
        return split_words(self.text)

    @cached_property
    def _token_classes(self) -> tuple[int, int, int]:
        """(symbol-only words, their characters, words with a letter)."""
        found = TOKEN_CLASS_RE.findall("\n".join(self.words))
        symbols = [t for t in found if t]
        return len(symbols), sum(map(len, symbols)), len(found) - len(symbols)

    @property
    def n_symbol_words(self) -> int:
        return self._token_classes[0]

    @property
    def symbol_word_chars(self) -> int:
        return self._token_classes[1]

    @property
    def n_alpha_words(self) -> int:
        return self._token_classes[2]

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
