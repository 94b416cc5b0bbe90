"""One shared, lazily computed view of a document for every filter rule.

Why this exists: datatrove tokenises each document with spaCy (English) inside every filter
and then walks the words in Python. Most of its time goes there. Here a document is wrapped
once in :class:`Doc`; lines, paragraphs and words are computed on first use and shared by
all rules, and the per-word statistics are computed with C-level primitives (``re``,
``set``, ``map``, numpy) instead of Python loops.

Word tokenisation is a single regular expression that approximates spaCy's English
tokeniser on the points the heuristics are sensitive to: punctuation is split off words as
its own tokens ("end." -> "end", "."), "..." and "---" stay one token, hyphens between
letters are split ("well-known" -> "well", "-", "known"), numbers such as "3.5", "1,000",
"12:30" and "1/2" stay whole, URLs stay whole, and initialisms such as "U.S." / "e.g." stay
whole. It does not split clitics ("don't" is one token where spaCy gives "do", "n't"); the
agreement this buys is measured in bench/bench_filter.py.
"""

from __future__ import annotations

import re
from functools import cached_property, lru_cache

import numpy as np

# --------------------------------------------------------------------------- character classes


@lru_cache(maxsize=1)
def _all_chars() -> str:
    # every code point except surrogates, decoded in one go (much faster than a chr() loop)
    cps = np.concatenate([np.arange(0, 0xD800), np.arange(0xE000, 0x110000)]).astype("<u4")
    return cps.tobytes().decode("utf-32-le")


def _char_class(chars: str) -> str:
    """A compact ``[...]`` body (ranges) for a set of characters, usable in ``re``."""
    codes = sorted(set(map(ord, chars)))
    parts: list[str] = []
    i = 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        a, b = chr(codes[i]), chr(codes[j])
        parts.append(re.escape(a) if i == j else f"{re.escape(a)}-{re.escape(b)}")
        i = j + 1
    return "".join(parts)


@lru_cache(maxsize=1)
def punctuation_chars() -> str:
    """Characters that make a token "symbol only" for the Gopher word statistics.

    Unicode punctuation (P*), math/currency/modifier symbols (Sm, Sc, Sk) and control
    characters. Other symbols (©, °, emoji) count as words, as they do in datatrove.
    """
    import regex  # a tiktoken dependency, always present; scans all code points in C, once

    found = regex.findall(r"[\p{P}\p{Sm}\p{Sc}\p{Sk}\p{Cc}]", _all_chars())
    return "".join(c for c in found if not c.isspace())


@lru_cache(maxsize=1)
def terminal_punctuation() -> tuple[str, ...]:
    """Unicode Sentence_Terminal characters ('.', '!', '?', '。', '؟', ...), for line-end rules."""
    import regex  # a tiktoken dependency, always present; only used once to list the characters

    return tuple(regex.findall(r"\p{Sentence_Terminal}", _all_chars()))


PUNCT_CLASS = _char_class(punctuation_chars())

_ABBREVIATIONS = (
    "Mrs|Mr|Ms|Dr|St|Jr|Sr|Co|Corp|Inc|Ltd|vs|Gen|Gov|Sen|Rep|Rev|Prof|Mt|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov"
    "|Dec|Ala|Ariz|Ark|Calif|Colo|Conn|Del|Fla|Ga|Ill|Ind|Kan|Ky|La|Md|Mass|Mich|Minn|Miss|Mo|Neb|Nev|Okla|Ore|Pa|Tenn"
    "|Va|Wash|Wis"
)
_CLITIC = r"(?:[sSmMdD]|ll|re|ve|LL|RE|VE)\b"  # 's 'm 'd 'll 're 've, split off their word
_WORD = rf"\w+(?:(?:['’](?!{_CLITIC})|[-–—](?=\d))\w+)*"  # O'Neil, F-35, 258–269
# Order matters: the first alternative that matches at a position wins. The first one takes the
# common case (a word starting with a letter, not followed by "." or "://") in one atomic step;
# everything else falls through to the special cases, then to the general word rule.
TOKEN_RE = re.compile(
    rf"(?>[^\W\d_]\w*(?:(?:['’](?!{_CLITIC})|[-–—](?=\d))\w+)*)(?!\.|://)"
    r"|(?:https?://|www\.)[^\s]*[^\s.,;:!?)\]'\"]"      # URL, trailing punctuation left out
    r"|(?:[^\W\d_]\.){2,}"                             # initialisms: U.S. e.g. i.e.
    r"|[^\W\d_]\.(?=\s|$)"                            # initials: J. A.
    rf"|(?=[A-Z][a-z]{{0,4}}\.)(?:{_ABBREVIATIONS})\.(?=\s|$)"  # abbreviations (cheap gate first): Dr. Jan.
    r"|\d+(?:[.,:/]\d+)+(?:[^\W\d_]+)?"                # 3.5 1,000 12:30 1/2 1.5x
    rf"|['’]{_CLITIC}"
    rf"|{_WORD}"
    r"|\.{2,}|-{2,}|…"                                 # ellipses and dash runs stay whole
    r"|[^\w\s]"                                        # any other symbol: its own token
)
# Over "\n".join(tokens), one pass: the group captures a punctuation-only token, and is empty
# for a token with a letter; tokens with neither (numbers) do not match at all.
TOKEN_CLASS_RE = re.compile(rf"^(?:([{PUNCT_CLASS}]+)$|(?:[^\w\n]|[\d_])*[^\W\d_])", re.M)
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
        return TOKEN_RE.findall(self.text)

    @cached_property
    def _token_classes(self) -> tuple[int, int, int]:
        """(punctuation-only tokens, their characters, tokens with a letter)."""
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
